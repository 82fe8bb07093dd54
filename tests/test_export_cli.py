"""`hope-scale export` as a command and its parts: usage errors (exit 2), atomic folders, weights read without the
optimizer state, tokenizers that encode like hope-scale's, the recurrent cache of `generate()`, and the guards of
the generated modeling file. Tiny models, in process (tests/test_export.py loads exports in isolation)."""

from __future__ import annotations

import json

import pytest
import torch

from hope_scale.cli import main
from hope_scale.data.tokenizer import ByteTokenizer, load_tokenizer
from hope_scale.eval.checkpoint_io import save_checkpoint
from hope_scale.export import export as export_module
from hope_scale.export.export import ExportError, export
from hope_scale.export.hf_model import HopeForCausalLM
from hope_scale.model import ModelConfig, build_model

from .conftest import SHAKESPEARE


TINY = dict(d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8, chunk_size_projection=16,
            cms_levels=[{"period": 1, "hidden_mult": 1.0}])


def tiny_checkpoint(path, arch="hope", **kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, **{**TINY, **kw})).eval()
    save_checkpoint(path, model)
    return model


@pytest.fixture
def ckpt(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    return tmp_path / "m.pt"


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --- the command ---------------------------------------------------------------------------------------------
def test_non_empty_out_needs_overwrite_which_replaces_it(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert f"--out {out} is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing"], "checkpoint not found"),
    (["--format", "llama"], "--format llama needs a Transformer++ checkpoint"),
    (["--format", "llama", "--quantize", "int8"], "--quantize int8 needs --format hf"),
    (["--tokenizer", "{tmp}/none.json"], "tokenizer file not found"),
])
def test_usage_errors_exit_2(ckpt, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(ckpt), *argv]
    assert main(["export", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_explains_the_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--format {hf,llama}", "trust_remote_code", "--quantize {int8}", "--overwrite", "step_N"):
        assert words in text


def test_failed_export_leaves_nothing(ckpt, tmp_path, monkeypatch):
    """A write failing half-way (here: the weights) leaves --out as it was and no temporary folder; a killed export's
    temporary folder is removed by the next export."""
    def failing(folder, groups, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module, "write_safetensors", failing)
    with pytest.raises(OSError, match="No space"):
        export(ckpt, tmp_path / "new", log=lambda m: None)
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="No space"):
        export(ckpt, tmp_path / "old", overwrite=True, log=lambda m: None)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / ".new.export-killed").mkdir()  # what a SIGKILL mid-export leaves
    export(ckpt, tmp_path / "new", log=lambda m: None)
    assert leftovers(tmp_path) == [] and (tmp_path / "new" / "config.json").is_file()


def test_run_folder_uses_the_newest_valid_checkpoint(tmp_path, capsys):
    """Given a run's checkpoint folder whose newest checkpoint is corrupt, export uses the previous one and says so."""
    from hope_scale.parallel.engine import STATE_FORMAT
    from hope_scale.train.checkpoint import CheckpointManager, rank_file

    model = tiny_checkpoint(tmp_path / "m.pt", arch="transformer")
    params = {name: {"global_shape": list(p.shape), "box": [[0, n] for n in p.shape], "value": p.detach()}
              for name, p in model.named_parameters()}
    engine = {"format": STATE_FORMAT, "model_config": model.cfg.to_dict(), "steps": 0, "cms_schedule": {},
              "group_steps": {}, "params": params}
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        CheckpointManager(root, log=lambda m: None).save(step, {"engine": engine, "rng": {}}, {"step": step},
                                                         {"config": {"data": {}}})
    newest = root / "step_00000002" / rank_file(0)
    newest.write_bytes(newest.read_bytes()[:-10])
    assert main(["export", "--checkpoint", str(root), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"REFUSING {root / 'step_00000002'}" in err and f"using {root / 'step_00000001'}" in err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hope_export"]["step"] == 1


# --- tokenizers ----------------------------------------------------------------------------------------------
TEXTS = ["hello world", "  two  spaces\n\ttab\r\n", "héllo ünïcode 日本語 🚀", "x<|endoftext|>y<|pad|>", "", "\x00\x7f"]


def test_byte_tokenizer_encodes_and_decodes_like_hope_scale(tmp_path):
    from transformers import AutoTokenizer

    from hope_scale.export.tokenizer_out import write_tokenizer

    write_tokenizer(ByteTokenizer(), tmp_path)
    hf, byte = AutoTokenizer.from_pretrained(tmp_path), ByteTokenizer()
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (byte.eos_id, byte.pad_id, byte.vocab_size)
    assert set(hf("x")) == {"input_ids", "attention_mask"}  # generate(**tok(text)) takes what it returns
    for text in TEXTS:
        assert hf(text)["input_ids"] == byte.encode(text), text
        ids = byte.encode(text) + [byte.eos_id, 65, byte.pad_id]
        assert hf.decode(ids, skip_special_tokens=True) == byte.decode(ids), text
    broken = [0xE6, 0x97, 65, 200]  # invalid UTF-8: the same replacement characters
    assert hf.decode(broken) == byte.decode(broken)


def test_bpe_tokenizer_is_shipped_as_trained(tmp_path, capsys):
    from transformers import AutoTokenizer

    from data_prep.train_tokenizer import train_bpe

    train_bpe([SHAKESPEARE.read_text(encoding="utf-8")[:20000]], vocab_size=300).save(str(tmp_path / "tok.json"))
    tok = load_tokenizer(str(tmp_path / "tok.json"))
    tiny_checkpoint(tmp_path / "m.pt", vocab_size=300)
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "out"),
                 "--tokenizer", str(tmp_path / "tok.json")]) == 0
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text) + [tok.eos_id], skip_special_tokens=True) == tok.decode(tok.encode(text))
    config = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eos_id, tok.pad_id) == (0, 1)
    tiny_checkpoint(tmp_path / "small.pt", vocab_size=258)
    assert main(["export", "--checkpoint", str(tmp_path / "small.pt"), "--out", str(tmp_path / "bad"),
                 "--tokenizer", str(tmp_path / "tok.json")]) == 2
    assert "the tokenizer has 300 tokens, the model only 258" in capsys.readouterr().err


# --- generation with the recurrent cache -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["hope", "titans"])
def test_generate_feeds_one_token_per_step(ckpt, tmp_path, arch):
    """After the prompt, each step runs the model on the new token only (the state carries the rest); the tokens
    equal those of a run without a cache (every step re-reads the whole sequence), for greedy and beam search."""
    tiny_checkpoint(tmp_path / "m.pt", arch=arch)
    export(tmp_path / "m.pt", tmp_path / "out", log=lambda m: None)
    hf = HopeForCausalLM.from_pretrained(tmp_path / "out").eval()
    lengths = []
    hf.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(args[0].shape[1]),
                                       with_kwargs=True)
    prompt = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert lengths == [11] + [1] * 11
    assert torch.equal(out, hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                        use_cache=False))
    beams = hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None)
    assert torch.equal(beams, hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None,
                                          use_cache=False))


def test_padding_is_refused(ckpt, tmp_path):
    export(ckpt, tmp_path / "out", log=lambda m: None)
    hf = HopeForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="does not support padding"):
        hf(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))


def test_compiled_model_exports_as_eager(tmp_path):
    """A model built with ``model.compile: true`` exports the same weights; the folder's config says compile false
    (the exported file has no ``build_model`` and runs eager) and its logits equal the native model's."""
    model = tiny_checkpoint(tmp_path / "m.pt", compile=True)
    assert model.cfg.compile
    export(tmp_path / "m.pt", tmp_path / "out", log=lambda m: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hope_model"]["compile"] is False
    hf = HopeForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    eager = build_model(ModelConfig(arch="hope", **TINY))
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, eager(ids), atol=1e-5)


# --- the generated modeling file -------------------------------------------------------------------------------
def test_modeling_file_is_the_model_source():
    import inspect

    from hope_scale.export.modeling_source import modeling_source
    from hope_scale.model import memory, titans

    source = modeling_source()
    for function in (memory.chunk_update, titans.SelfModifyingTitans.forward):
        assert inspect.getsource(function) in source
    assert "hope_scale.resources" not in source and "def named(" not in source
    assert "def build_model(" not in source and "compile_model" not in source  # exported models run eager


def test_modeling_file_guards(tmp_path, monkeypatch):
    from hope_scale.export import modeling_source as ms

    (tmp_path / "a.py").write_text("X = 1\n\ndef f():\n    return X\n")
    (tmp_path / "b.py").write_text("def f():\n    return 2\n")
    (tmp_path / "c.py").write_text("def g():\n    from hope_scale.model import build_model\n")
    monkeypatch.setattr(ms, "PACKAGE", tmp_path)
    monkeypatch.setattr(ms, "MODEL_SOURCES", [("a.py", ()), ("b.py", ())])
    with pytest.raises(ms.SourceError, match="f is defined in both"):
        ms.modeling_source()
    monkeypatch.setattr(ms, "MODEL_SOURCES", [("a.py", ()), ("c.py", ())])
    with pytest.raises(ms.SourceError, match="cannot import hope_scale"):
        ms.modeling_source()
    monkeypatch.setattr(ms, "MODEL_SOURCES", [("a.py", ()), ("b.py", ("f",))])
    assert "return 2" not in ms.modeling_source()
    monkeypatch.setattr(ms, "MODEL_SOURCES", [("a.py", ("g",))])
    with pytest.raises(ms.SourceError, match="g .to be left out. is not defined"):
        ms.modeling_source()
