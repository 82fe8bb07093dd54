"""Evaluation checkpoints: save / load round trip, atomic writes, clear errors (hope_scale.eval.checkpoint_io)."""

import pytest
import torch

from hope_scale.data.tokenizer import load_tokenizer
from hope_scale.eval.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from hope_scale.eval.model_specs import config_from_spec, parse_cms_levels
from hope_scale.model import ModelConfig, build_model


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


def _trainer_checkpoint(root, model, data_cfg):
    """A checkpoint in the trainer's format (hope_scale/train/checkpoint.py + TrainEngine.export_state),
    with each weight split into two boxes held by different parts, as a sharded run stores them."""
    from hope_scale.parallel.engine import STATE_FORMAT
    from hope_scale.train.checkpoint import CheckpointManager

    first, second = {}, {}
    for name, p in model.named_parameters():  # the tied head is not a separate entry
        t = p.detach().clone()
        half, rest = t.shape[0] // 2, [[0, n] for n in t.shape[1:]]
        first[name] = {"global_shape": list(t.shape), "box": [[0, half]] + rest, "value": t[:half].clone()}
        second[name] = {"global_shape": list(t.shape), "box": [[half, t.shape[0] - half]] + rest,
                        "value": t[half:].clone()}
    engine = {"format": STATE_FORMAT, "model_config": model.cfg.to_dict(), "steps": 7, "cms_schedule": {},
              "group_steps": {}, "params": first}
    manager = CheckpointManager(root, log=lambda m: None)
    manager.save(7, {"engine": engine, "rng": {}}, {"step": 7, "config": {"data": data_cfg}},
                 {"tokens": 1234, "model_name": "tiny", "config": {"data": data_cfg}})
    return second


def test_trainer_checkpoint_format(tmp_path, monkeypatch):
    from hope_scale.data.manifest import FORMAT_NAME, FORMAT_VERSION, write_manifest
    from hope_scale.train import checkpoint as train_ckpt

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="hope", d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8,
                                    chunk_size_projection=16, cms_levels=[{"period": 1, "hidden_mult": 1.0}])).eval()
    data = tmp_path / "data"
    data.mkdir()
    write_manifest(data, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": {"kind": "byte"}})
    second = _trainer_checkpoint(tmp_path / "ckpt", model, {"path": str(data), "tokenizer": "nonexistent.json"})
    # the rank file holds the first halves; serve the second halves as a second part, as a 2-rank run would
    real_parts = train_ckpt.LoadedCheckpoint.rank_parts

    def two_parts(self):
        yield from real_parts(self)
        yield {"engine": {"format": "hope-scale/rank-state/v1", "params": second}}

    monkeypatch.setattr(train_ckpt.LoadedCheckpoint, "rank_parts", two_parts)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "step_00000007"):
        loaded = load_checkpoint(path)
        assert loaded.format == "hope-scale/checkpoint/v2" and loaded.meta["step"] == 7
        assert loaded.meta["tokenizer_source"].startswith("dataset manifest")
        x = torch.randint(0, 256, (2, 24))
        with torch.no_grad():
            assert torch.equal(model(x), loaded.model(x))
    # a corrupted rank file is refused by the trainer's own verification
    rank0 = tmp_path / "ckpt" / "step_00000007" / train_ckpt.rank_file(0)
    rank0.write_bytes(rank0.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated|checksum"):
        load_checkpoint(tmp_path / "ckpt")


def test_eval_and_generate_say_which_checkpoint_they_use(tmp_path, capsys):
    """Pointed at a checkpoint root whose newest checkpoint is corrupt, eval and generate use the previous one
    and say so: which one is used, and why the newer one was refused."""
    from hope_scale.cli import main
    from hope_scale.parallel.engine import STATE_FORMAT
    from hope_scale.train.checkpoint import CheckpointManager, rank_file

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", d_model=16, n_layers=1, n_heads=2))
    params = {name: {"global_shape": list(p.shape), "box": [[0, n] for n in p.shape], "value": p.detach().clone()}
              for name, p in model.named_parameters()}
    engine = {"format": STATE_FORMAT, "model_config": model.cfg.to_dict(), "steps": 0, "cms_schedule": {},
              "group_steps": {}, "params": params}
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, log=lambda m: None)
    for step in (1, 2):
        manager.save(step, {"engine": engine, "rng": {}}, {"step": step}, {"config": {"data": {}}})
    newest = root / "step_00000002" / rank_file(0)
    newest.write_bytes(newest.read_bytes()[:-10])
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 20)
    for argv in (["generate", "--checkpoint", str(root), "--prompt", "To be", "--max-new-tokens", "2", "--seed", "0"],
                 ["eval", "perplexity", "--checkpoint", str(root), "--text", str(tmp_path / "text.txt"),
                  "--context-len", "16", "--mode", "fixed", "--out", str(tmp_path / "ppl.json"), "--no-plot"]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"REFUSING {root / 'step_00000002'}" in err and "truncated" in err
        assert f"checkpoint: using {root / 'step_00000001'} (step 1)" in err


def test_a_model_trained_compiled_loads_eager(tmp_path):
    """model.compile is an execution field: evaluation loads the same weights into an eager model."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="hope", vocab_size=258, d_model=32, n_layers=1, n_heads=2, chunk_size_memory=8,
                      chunk_size_projection=16, compile=True, cms_levels=[{"period": 1, "hidden_mult": 1.0}])
    model = build_model(cfg)
    assert "chunk_step" in vars(model.blocks[0].mixer)  # compiled
    save_checkpoint(tmp_path / "c.pt", model)
    loaded = load_checkpoint(tmp_path / "c.pt", log=lambda m: None)
    assert loaded.config.compile is False and "chunk_step" not in vars(loaded.model.blocks[0].mixer)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()))
