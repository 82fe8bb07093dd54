"""The eval / generate / train-synthetic subcommands end to end on tiny models (in-process)."""

import json
import os

import pytest
import torch

from hope_scale.cli import main
from hope_scale.eval.checkpoint_io import load_checkpoint

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = "d_model=32,n_layers=2,n_heads=2,chunk_size_memory=8,chunk_size_projection=16"
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; "
        "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.\n") * 30


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def cli(*args):
    return main([str(a) for a in args])


def test_mqar_train_and_eval(tmp_path):
    for arch in ("hope", "transformer"):
        extra = ",cms_levels=1/1" if arch == "hope" else ""
        assert cli("train-synthetic", "--task", "mqar", "--model", f"{arch}:{TINY}{extra}", "--name", arch,
                   "--steps", 2, "--batch-size", 4, "--vocab-size", 64, "--train-seq-lens", 32,
                   "--train-kv-pairs", "2,4", "--out", tmp_path / f"{arch}.pt", "--threads", 1) == 0
    ck = load_checkpoint(tmp_path / "hope.pt")
    assert ck.meta["mqar"]["vocab_size"] == 64 and ck.meta["train"]["steps"] == 2
    out = tmp_path / "mqar.json"
    assert cli("eval", "mqar", "--checkpoint", tmp_path / "hope.pt", "--checkpoint", tmp_path / "transformer.pt",
               "--seq-lens", "32,64", "--kv-pairs", "2,4,16", "--examples", 8, "--out", out, "--threads", 1) == 0
    res = json.loads(out.read_text())
    assert [m["label"] for m in res["models"]] == ["hope", "transformer"]
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in res["models"][0]["rows"]] == [(32, 2), (32, 4), (64, 2),
                                                                                     (64, 4), (64, 16)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res["models"][0]["rows"])
    assert out.with_suffix(".png").stat().st_size > 1000


def test_passkey_train_and_niah_heatmap(tmp_path):
    ck = tmp_path / "pk.pt"
    assert cli("train-synthetic", "--task", "passkey", "--model", f"titans:{TINY}", "--steps", 2, "--batch-size", 2,
               "--length", 96, "--num-digits", 4, "--out", ck, "--threads", 1) == 0
    out = tmp_path / "niah.json"
    assert cli("eval", "niah", "--checkpoint", ck, "--lengths", "96,192", "--depths", "0,0.5,1", "--samples", 2,
               "--out", out, "--threads", 1) == 0
    res = json.loads(out.read_text())
    assert res["spec"]["template"] == "short" and res["spec"]["num_digits"] == 4  # taken from the checkpoint
    assert len(res["accuracy"]) == 2 and len(res["accuracy"][0]) == 3
    assert len(res["samples"]) == 2 * 3 * 2
    assert all(len(s["answers"]) == 1 and len(s["answers"][0]) == 4 for s in res["samples"])
    assert out.with_suffix(".png").is_file()


def test_passkey_train_on_a_schedule_of_lengths(tmp_path):
    """``--length-schedule`` / ``--schedule-from`` reach the batches (a long step changes the model differently
    from a short one) and are recorded in the checkpoint; a malformed schedule is refused by the parser."""
    common = ("train-synthetic", "--task", "passkey", "--model", f"transformer:{TINY}", "--steps", 2,
              "--batch-size", 2, "--length", 96, "--threads", 1, "--log-every", 0)
    assert cli(*common, "--out", tmp_path / "plain.pt") == 0
    assert cli(*common, "--length-schedule", "160:2:1", "--schedule-from", 1, "--out", tmp_path / "mixed.pt") == 0
    plain, mixed = (load_checkpoint(tmp_path / f) for f in ("plain.pt", "mixed.pt"))
    assert mixed.meta["niah"]["length_schedule"] == [160, 2, 1] and mixed.meta["niah"]["schedule_from"] == 1
    assert plain.meta["niah"]["length_schedule"] is None
    differs = [not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                     mixed.model.state_dict().values())]
    assert any(differs)
    with pytest.raises(SystemExit):
        cli(*common, "--length-schedule", "160", "--out", tmp_path / "bad.pt")


def test_text_train_perplexity_and_generate_with_memorize(tmp_path, capsys):
    data = tmp_path / "richard.txt"
    data.write_text(TEXT)
    ck = tmp_path / "ha.pt"
    assert cli("train-synthetic", "--task", "text", "--data", data, "--model",
               f"hope_attention:{TINY},cms_levels=8/1+32/1", "--steps", 3, "--batch-size", 2, "--seq-len", 32,
               "--out", ck, "--threads", 1) == 0
    out = tmp_path / "ppl.json"
    assert cli("eval", "perplexity", "--checkpoint", ck, "--text", data, "--holdout-fraction", 0.1, "--mode", "all",
               "--context-len", 32, "--out", out, "--threads", 1) == 0
    res = json.loads(out.read_text())
    held = TEXT[TEXT.rfind("\n", 0, int(len(TEXT) * 0.9)) + 1:]
    for mode in ("fixed", "sliding", "streaming"):
        assert res["results"][mode]["tokens"] == len(held.encode())
        assert res["results"][mode]["words"] == len(held.split())
        assert res["results"][mode]["token_perplexity"] > 1.0
    capsys.readouterr()
    before = load_checkpoint(ck).model.state_dict()
    assert cli("generate", "--checkpoint", ck, "--prompt", TEXT[:100], "--max-new-tokens", 8, "--seed", 0,
               "--memorize", "--memorize-levels", 1, "--memorize-lr", 0.1, "--save-memorized", tmp_path / "mem.pt",
               "--threads", 1) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(TEXT[:100])
    assert "L1 (period 32): 3" in captured.err  # 99 prompt tokens read: 3 updates of the period-32 level
    after = load_checkpoint(ck).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the checkpoint on disk is untouched
    mem = load_checkpoint(tmp_path / "mem.pt").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], mem[k])}
    assert changed and all(".cms.levels.1." in k for k in changed)
    # models without CMS cannot memorize
    tf = tmp_path / "tf.pt"
    assert cli("train-synthetic", "--task", "text", "--data", data, "--model", f"transformer:{TINY}", "--steps", 1,
               "--batch-size", 2, "--seq-len", 16, "--out", tf, "--threads", 1) == 0
    assert cli("generate", "--checkpoint", tf, "--prompt", "Now", "--memorize", "--max-new-tokens", 2) == 2


def test_continual_command(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text("import os\nprint(os.path.join('a', 'b'))\n" * 60)
    out = tmp_path / "cont.json"
    assert cli("eval", "continual", "--model", f"hope2=hope_attention:{TINY},cms_levels=16/1+64/1",
               "--model", f"tf=transformer:{TINY}", "--domain-a", a, "--domain-b", b, "--steps-a", 3, "--steps-b", 2,
               "--seq-len", 16, "--batch-size", 2, "--eval-tokens", 200, "--eval-points", 1, "--stream-tokens", 64,
               "--save-dir", tmp_path / "ckpts", "--out", out, "--threads", 1) == 0
    res = json.loads(out.read_text())
    assert [m["name"] for m in res["models"]] == ["hope2", "tf"]
    assert res["models"][0]["test_time"]["updates"] == {"0": 4, "1": 1}
    saved = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert saved == sorted(f"{n}-{p}.pt" for n in ("hope2", "tf") for p in ("after_a", "after_b_train",
                                                                             "after_b_test_time"))
    for png in ("cont.png", "cont-curve.png", "cont-test-time.png", "cont-test-time-curve.png"):
        assert (tmp_path / png).is_file()


def test_lm_eval_command_with_a_local_task(tmp_path):
    ck = tmp_path / "m.pt"
    assert cli("train-synthetic", "--task", "text", "--data", "builtin:pydoc", "--max-chars", 20000, "--model",
               f"transformer:{TINY}", "--steps", 1, "--batch-size", 2, "--seq-len", 16, "--out", ck,
               "--threads", 1) == 0
    data = tmp_path / "mc.jsonl"
    data.write_text('{"q": "1 + 1 =", "choices": [" 2", " 3"], "label": 0}\n')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n  cache_dir: {tmp_path / 'hf'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "lm.json"
    assert cli("eval", "lm-eval", "--checkpoint", ck, "--tasks", "tiny_local", "--include-path", tmp_path / "tasks",
               "--no-default-tasks", "--out", out, "--threads", 1) == 0
    res = json.loads(out.read_text())
    assert res["results"]["tiny_local"]["acc,none"] in (0.0, 1.0)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli("eval", "perplexity", "--checkpoint", tmp_path / "none.pt", "--text", "x") == 2
    assert "checkpoint not found" in capsys.readouterr().err
