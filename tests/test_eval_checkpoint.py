"""Evaluation checkpoints: save / load round trip, atomic writes, clear errors (hope_scale.eval.checkpoint_io)."""

import pytest
import torch

from hope_scale.data.tokenizer import load_tokenizer
from hope_scale.eval.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from hope_scale.eval.model_specs import config_from_spec, parse_cms_levels
from hope_scale.model import ModelConfig, build_model


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", ["hope", "titans", "transformer", "hope_attention"])
def test_round_trip_gives_identical_logits(tmp_path, arch):
    torch.manual_seed(0)
    extra = {"cms_levels": [{"period": 1, "hidden_mult": 1.0}, {"period": 64, "hidden_mult": 1.0}]} \
        if arch.startswith("hope") else {}
    model = build_model(ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8,
                                    chunk_size_projection=16, **extra)).eval()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, load_tokenizer("byte"), {"name": "m", "step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.config == model.cfg
    assert loaded.meta == {"name": "m", "step": 3}
    assert loaded.tokenizer.to_spec() == load_tokenizer("byte").to_spec()
    assert not loaded.model.training
    # tied embeddings stay tied after loading
    assert loaded.model.head.weight is loaded.model.embed.weight


def test_folder_form_and_errors(tmp_path):
    model = build_model(ModelConfig(arch="transformer", d_model=16, n_layers=1, n_heads=2))
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", model)
    assert (tmp_path / "run" / "model.pt").is_file()
    assert load_checkpoint(tmp_path / "run").config.arch == "transformer"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a hope-scale-eval-checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "trainer_run").mkdir()
    with pytest.raises(CheckpointError, match="trainer"):
        load_checkpoint(tmp_path / "trainer_run")


def test_model_specs():
    assert parse_cms_levels("64/2+1024/0.5") == [{"period": 64, "hidden_mult": 2.0},
                                                 {"period": 1024, "hidden_mult": 0.5}]
    cfg = config_from_spec("hope:d_model=48,n_layers=3,cms_levels=16/1+256/1,adaptive_q=false")
    assert (cfg.arch, cfg.d_model, cfg.n_layers, [lvl.period for lvl in cfg.cms_levels], cfg.adaptive_q) == \
        ("hope", 48, 3, [16, 256], False)
    assert config_from_spec("transformer++:d_model=64").arch == "transformer"
    assert config_from_spec("hope-tiny").d_model == 256
    with pytest.raises(ValueError, match="unknown model field"):
        config_from_spec("hope:widthh=3")
