"""benchmarks/quality.py: the choice of models, section (c)'s recipe and summary, and equal parameters in every
section."""

import argparse
import subprocess
import sys

import pytest

from tests.benchmark_scripts import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def assert_refused_before_any_run(argv: list[str], message: str) -> None:
    """quality.py with ``argv`` exits with a usage error (2) naming ``message``, before it creates its --out."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), *argv, "--out", "unused"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (ROOT / "unused").exists()


def test_selected_models(quality):
    assert list(quality.selected(None)) == list(quality.ARCHS)
    assert list(quality.selected("Titans, Hope")) == ["Titans", "Hope"]
    assert not set(quality.DIAGNOSTIC_ARCHS) & set(quality.selected(None))  # diagnostics only when named
    assert quality.selected("Hope-wideCMS,Hope") == {"Hope-wideCMS": quality.DIAGNOSTIC_ARCHS["Hope-wideCMS"],
                                                     "Hope": quality.ARCHS["Hope"]}
    with pytest.raises(SystemExit, match="Hop"):
        quality.selected("Hop")


def test_every_section_compares_models_at_equal_parameters(quality):
    """(a)-(c)'s architectures and (d)'s models each have the same parameter count within 3%."""
    def spread(models):
        counts = [m.num_parameters() for m in models]
        return max(counts) / min(counts) - 1

    assert spread(quality.make(0, **arch) for arch in quality.ARCHS.values()) <= 0.03
    every = quality.ARCHS | quality.DIAGNOSTIC_ARCHS
    same_count = ("Hope", "Hope-wideCMS", "Hope-widerCMS", "Hope-narrowProj", "Hope-narrowProj-1freq")
    assert spread(quality.make(0, **every[n]) for n in same_count) == 0  # 130,248
    assert spread(e.model for e in quality.continual_models(0)) <= 0.03
    hope_2, narrow_2, narrow_1freq = (next(e.model for e in quality.continual_models(0, n) if "2 levels" in e.name)
                                      for n in ("Hope", "Hope-narrowProj", "Hope-narrowProj-1freq"))
    assert narrow_2.num_parameters() == hope_2.num_parameters() == narrow_1freq.num_parameters()
    assert [lv.period for lv in narrow_1freq.cfg.cms_levels] == [quality.CONTINUAL_PERIODS[0]] * 2


def test_continual_section_takes_the_model_choice(quality):
    """``--models`` picks (d)'s entries by architecture ("Hope" = its three CMS variants); a choice with none of
    (d)'s architectures is refused before any data is loaded."""
    def names(models=None):
        return [e.name for e in quality.continual_models(0, models)]

    assert names() == ["Hope, 1 level", "Hope, 2 levels", "Hope, 3 levels", "Titans", "Transformer++",
                       "Transformer++, 3x steps on A"]
    assert names("Transformer++") == ["Transformer++", "Transformer++, 3x steps on A"]
    assert names("Hope, Titans") == ["Hope, 1 level", "Hope, 2 levels", "Hope, 3 levels", "Titans"]
    assert names("Hope-narrowProj") == ["Hope-narrowProj, 2 levels"]
    assert names("Hope-narrowProj-1freq") == ["Hope-narrowProj-1freq, 2 levels"]
    assert [e.steps_a for e in quality.continual_models(0, "Transformer++", steps_a=40)] == [None, 120]
    with pytest.raises(SystemExit, match="only Hope, Hope-narrowProj, Hope-narrowProj-1freq, Titans and Transformer"):
        quality.section_d("shakespeare-pydoc", 0, argparse.Namespace(models="Hope-Attention", scale=1.0), tok=None)


def test_passkey_summary_takes_models_run_on_some_seeds(quality, tmp_path):
    """(c)'s table lists every model with the number of seeds it ran on (baselines may run on seed 0 only), and
    refuses to average runs of different recipes."""
    import json

    def run(seed, accuracies, mix=(512, 4, 2)):
        return {"seed": seed, "train_length": 128, "lengths": [128, 512, 2048], "steps": 5000, "batch": 8,
                "mixed_in": list(mix), "mixed_from_step": 2500,
                "models": [{"label": n, "accuracy_by_length": a} for n, a in accuracies.items()]}

    runs = [run(0, {"Hope": [100, 100, 90], "Titans": [5, 5, 5]}), run(1, {"Hope": [100, 90, 80]})]
    for r in runs:
        (tmp_path / f"c-passkey-s{r['seed']}.json").write_text(json.dumps(r))
    text = quality.summary(tmp_path)
    assert "| Hope | 2 | 100.0 ± 0.0 | 95.0 ± 7.1 | 85.0 ± 7.1 |" in text
    assert "| Titans | 1 | 5.0 | 5.0 | 5.0 |" in text
    assert "every 4th step 2 x 512 tokens from step 2500" in text
    (tmp_path / "c-passkey-s1.json").write_text(json.dumps(run(1, {"Hope": [1, 2, 3]}, mix=(512, 4))))
    with pytest.raises(SystemExit, match="mixed_in"):
        quality.summary(tmp_path)
    older, newer = run(0, {"Hope": [1, 2, 3]}), run(1, {"Hope": [3, 4, 5]})  # no mixed_from_step = from step 0
    del older["mixed_from_step"]
    newer["mixed_from_step"] = 0
    for r in (older, newer):
        (tmp_path / f"c-passkey-s{r['seed']}.json").write_text(json.dumps(r))
    assert "| Hope | 2 | 2.0 ± 1.4 | 3.0 ± 1.4 | 4.0 ± 1.4 |" in quality.summary(tmp_path)
    for r in (run(0, {"Hope": [1, 2, 3]}, mix=(512, 2, 2)), run(1, {"Hope": [3, 4, 5]}, mix=(512, 2, 2))):
        (tmp_path / f"c-passkey-s{r['seed']}.json").write_text(json.dumps(r))
    assert "every 2nd step 2 x 512 tokens from step 2500" in quality.summary(tmp_path)


def test_heldout_section_takes_the_model_choice(quality):
    """(a) runs the chosen architectures, and Transformer++ for Hope's CPU time only when both are chosen."""
    def labels(models=None):
        return [(name, budget) for name, _, budget in quality.section_a_runs(models)]

    assert labels() == [(n, None) for n in quality.ARCHS] + [("Transformer++ (Hope's compute)", "time")]
    assert labels("Hope,Titans") == [("Hope", None), ("Titans", None)]
    assert labels("Transformer++,Hope")[-1] == ("Transformer++ (Hope's compute)", "time")


def test_passkey_recipe_defaults_to_the_curriculum(quality):
    """(c) trains at 128 tokens for the first half, then every 4th step 2 x 512 (scaled runs keep the half);
    ``--passkey-mix none`` trains at 128 tokens only."""
    def recipe(*argv, n_steps=5000):
        return quality.passkey_recipe(quality.parser().parse_args(list(argv)), n_steps)

    assert recipe() == ((512, 4, 2), 2500)
    assert recipe(n_steps=250) == ((512, 4, 2), 125)
    assert recipe("--passkey-mix-from", "0") == ((512, 4, 2), 0)
    assert recipe("--passkey-mix", "512:4", "--passkey-mix-from", "100") == ((512, 4), 100)
    assert recipe("--passkey-mix", "none") == (None, 0)


def test_write_cost_applies_to_the_memory_architectures(quality, monkeypatch):
    """``--write-cost`` sets ``model.write_cost`` of Hope and Titans (every section builds through ``make``) and
    leaves the attention architectures, which have no memory writes, as they are."""
    monkeypatch.setitem(quality.MEMORY_ARCH_EXTRA, "write_cost", 0.01)
    costs = {name: quality.make(0, **arch).cfg.write_cost for name, arch in quality.ARCHS.items()}
    assert costs == {"Hope": 0.01, "Titans": 0.01, "Hope-Attention": 0.0, "Transformer++": 0.0}
    assert {e.model.cfg.write_cost for e in quality.continual_models(0, "Hope")} == {0.01}


def test_write_cost_from_and_ramp_are_fractions_of_each_run(quality):
    """``--write-cost-from F --write-cost-ramp R``: every training run of (a)-(c) leaves the write cost out of its
    first F * steps steps, then ramps it up over R * steps; a fraction outside its range, or one given with
    section (d), is refused before any run starts."""
    cfg = quality.train_config(5000, 3e-3, 20, 0.5, 0.16)
    assert (cfg.write_cost_from_step, cfg.write_cost_ramp_steps) == (2500, 800)
    cfg = quality.train_config(800, 3e-3, 20)
    assert (cfg.write_cost_from_step, cfg.write_cost_ramp_steps) == (0, 0)
    for argv, message in ((["--write-cost-from", "1"], "must be in [0, 1)"),
                          (["--write-cost-ramp", "1.5"], "must be in [0, 1]"),
                          (["--only", "c,d", "--write-cost-from", "0.5"], "section (d)"),
                          (["--only", "d", "--write-cost-ramp", "0.5"], "--write-cost-ramp: section (d)")):
        assert_refused_before_any_run(argv, message)


def test_heldout_section_trains_at_the_chosen_peak_lr_width_and_batch(quality, monkeypatch, tmp_path):
    """``--lr``, ``--d-model`` and ``--batch`` are (a)'s peak learning rate, width and sequences per step for every
    model (the defaults are every section's 3e-3, 64 and 8); the result records them, the summary names them and
    refuses to average runs that differ in any of them (or in ``--seq-len``), and a rate or batch <= 0 or a width
    the 2 heads cannot split is refused before any run starts."""
    import json

    class Stop(Exception):
        pass

    seen = []

    class Recorder:
        def __init__(self, model, batches, cfg, name):
            inputs, _ = batches(0)
            seen.append((cfg.lr, model.cfg.d_model, tuple(inputs.shape)))
            raise Stop

    monkeypatch.setattr(quality, "Trainer", Recorder)
    tok = quality.load_tokenizer("byte")
    for argv, setting in (([], (3e-3, 64, (8, 512))),
                          (["--lr", "6e-3", "--d-model", "128", "--seq-len", "1024", "--batch", "2"],
                           (6e-3, 128, (2, 1024)))):
        args = quality.parser().parse_args(["--models", "Titans", "--scale", "0.02", *argv])
        with pytest.raises(Stop):
            quality.section_a("builtin", 0, args, tok)
        assert seen[-1] == setting
    for bad in (["--lr", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            quality.parser().parse_args(bad)
    assert_refused_before_any_run(["--d-model", "63"], "--d-model: model.n_heads: d_model=63")
    counts = [quality.make(0, **arch, d_model=128).num_parameters() for arch in quality.ARCHS.values()]
    assert max(counts) / min(counts) - 1 <= 0.04  # the help's promise at 128

    row = {"model": "Titans", "parameters": 1, "steps": 2, "train_cpu_seconds": 1.0, "clipped_fraction": 0.0,
           "fixed": {"loss": 2.0, "token_perplexity": 7.4}, "streaming": {"token_perplexity": 7.4},
           "profile": {"bucket_start": [0], "bucket_end": [1], "loss": [2.0]}}
    run = {"seq_len": 512, "batch": 2, "lr": 0.006, "d_model": 128, "rows": [row]}
    (tmp_path / "a-builtin-s0.json").write_text(json.dumps(run))
    for other, message in (({"lr": None, "d_model": None}, r"peak lr \[0.003, 0.006\]"),
                           ({"d_model": None}, r"d_model \[64, 128\]"),
                           ({"seq_len": 2048}, r"training length \[512, 2048\]"),
                           ({"batch": 8}, r"sequences per step \[2, 8\]")):
        # runs from before the options were recorded (None: the key is missing) trained at 3e-3 and width 64
        changed = {k: v for k, v in (run | other).items() if v is not None}
        (tmp_path / "a-builtin-s1.json").write_text(json.dumps(changed))
        with pytest.raises(SystemExit, match=message):
            quality.summary(tmp_path)
    (tmp_path / "a-builtin-s1.json").write_text(json.dumps(run))
    assert "(2 seeds, trained at 2 x 512 tokens, peak lr 0.006, d_model 128)" in quality.summary(tmp_path)
