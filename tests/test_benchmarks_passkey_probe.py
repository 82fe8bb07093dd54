"""benchmarks/passkey_probe.py: its hooks change nothing unless an intervention is chosen, every intervention
changes the model's reading, and it runs on a model that quality.py (c) saved."""

import pytest
import torch

from tests.benchmark_scripts import load_benchmark as load


@pytest.fixture(scope="module")
def quality():
    return load("quality")


@pytest.fixture(scope="module")
def probe_module():
    return load("passkey_probe")


def test_interventions_change_only_what_they_name(quality, probe_module):
    """'as trained' gives the unhooked model's logits bit for bit, and so does the drift bound at the largest drift
    of the same prompt (it never binds); every other intervention, and a tighter drift bound, changes them."""
    model = quality.make(0, **quality.ARCHS["Hope"]).eval()
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))  # chunks end mid-prompt
    with torch.no_grad():
        plain = model(ids)
    probe = probe_module.Probe(model)

    def logits(name):
        probe.intervention = name
        with torch.no_grad():
            return model(ids)

    assert torch.equal(logits("as trained"), plain)
    radius = probe_module.drift_radius(model, probe, [ids[0].tolist()])
    probe.radius = radius
    assert torch.equal(logits("main-memory drift bounded"), plain)
    for name in ("no retention (alpha = 1)", "half the forgetting", "no step bound (tau = 0)",
                 "projection memories frozen"):
        assert not torch.allclose(logits(name), plain), name
    probe.radius = [0.5 * r for r in radius]
    assert not torch.allclose(logits("main-memory drift bounded"), plain)
    assert torch.equal(logits("as trained"), plain)  # nothing is left behind


def test_oracle_skips_exactly_the_haystack(quality, probe_module):
    """The oracle intervention zeroes eta on the haystack's tokens, never on the needle's or the question's, and
    changes the reading only when it knows the sample."""
    from hope_scale.data.tokenizer import load_tokenizer
    from hope_scale.eval.niah import NIAHGenerator, get_task

    tok = load_tokenizer("byte")
    sample = NIAHGenerator(get_task("passkey", template="short", num_digits=5), tok, seed=777,
                           name="passkey").sample(128, 0.5)
    model = quality.make(0, **quality.ARCHS["Hope"]).eval()
    probe = probe_module.Probe(model)
    probe.sample = sample
    mask = probe.haystack(0, sample.prompt_tokens)
    assert int(mask.sum()) == sample.context_token_end - sample.context_token_start - sample.needle_tokens
    assert not mask[sample.needle_token_start] and not mask[sample.context_token_end:].any()
    assert probe.haystack(sample.prompt_tokens, 8).sum() == 0  # generated tokens are written

    ids = torch.tensor([tok.encode(sample.prompt)])
    with torch.no_grad():
        plain = model(ids)
        probe.intervention = probe_module.ORACLE
        probe.sample, probe.position = sample, [0, 0]
        assert not torch.allclose(model(ids), plain)
        assert probe.position == [ids.shape[1]] * 2
        probe.sample = None
        assert torch.equal(model(ids), plain)


def test_probe_takes_titans_too(quality, probe_module):
    """Titans' memory layers (no projection memories) take the same hooks."""
    model = quality.make(0, **quality.ARCHS["Titans"]).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids)
    probe = probe_module.Probe(model)
    assert len(probe.layers) == 2
    with torch.no_grad():
        assert torch.equal(model(ids), plain)
        probe.intervention = "no step bound (tau = 0)"
        assert not torch.allclose(model(ids), plain)
    with pytest.raises(SystemExit, match="no Titans memory layer"):
        probe_module.Probe(quality.make(0, **quality.ARCHS["Transformer++"]))


def test_traces_report_every_layer(quality, probe_module):
    model = quality.make(0, **quality.ARCHS["Hope"]).eval()
    probe = probe_module.Probe(model)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (70, 90)]
    rows = probe_module.traces(model, probe, prompts, [32, 64, 128], chunk=16)
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["eta"] < 1 and 0 < row["prod_alpha"] <= row["alpha"] < 1
        assert 0 < row["scale"] <= 1 and row["overshoot"] > 0
        assert row["drift"][32] > 0 and row["w1"][128] > 0  # 128: past both prompts, their last chunks


def test_probe_runs_on_a_model_saved_by_quality(quality, probe_module, tmp_path, capsys):
    """quality.py's ``save_model`` (what (c) --save-models writes) gives a safetensors file the probe loads with the
    same config and weights; its 'as trained' row is the accuracy evaluate_samples measures on the same samples."""
    from hope_scale.data.tokenizer import load_tokenizer
    from hope_scale.eval.niah import NIAHGenerator, evaluate_samples, get_task

    model = quality.make(0, **quality.ARCHS["Hope"]).eval()
    path = tmp_path / "c-passkey-s0-Hope.safetensors"
    quality.save_model(model, path, {"seed": 0, "model": "Hope", "train_length": 96, "steps": 2,
                                     "mixed_in": [192, 2, 1], "mixed_from_step": 1})
    loaded, run = probe_module.load_model(path)
    assert loaded.cfg == model.cfg and run["mixed_in"] == [192, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    capsys.readouterr()
    assert probe_module.main([str(path), "--samples", "1", "--multiples", "1,2",
                              "--only", "as trained,main-memory drift bounded"]) == 0
    out = capsys.readouterr().out
    assert "longest: 192" in out
    tok = load_tokenizer("byte")
    test = NIAHGenerator(get_task("passkey", template="short", num_digits=5), tok, seed=777,
                         name="passkey").grid([96], probe_module.DEPTHS, samples_per_cell=1)
    expected = 100 * sum(r["score"] for r in evaluate_samples(model, tok, test, batch_size=4)) / len(test)
    row = next(line for line in out.splitlines() if line.startswith("| as trained |"))
    assert row.split("|")[2].strip().startswith(f"{expected:.1f} (")
    assert "| 0 |" in out and "| 1 |" in out  # the per-layer trace table
    with pytest.raises(SystemExit, match="unknown intervention"):
        probe_module.main([str(path), "--only", "as trained,alpha = 2"])


def test_probe_refuses_a_file_that_is_not_a_saved_model(probe_module, tmp_path):
    from hope_scale.train.safe_tree import UnsafeFileError

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(UnsafeFileError):
        probe_module.load_model(bad)
