"""The shared training step (hope_scale/train/step.py): on one process it applies exactly the update rules that
TrainEngine is checked against (the plain-PyTorch oracle of tests/test_parallel_engine.py: AdamW with the
engine's parameter groups, clipping, the CMS schedule), counts clipped steps, and is what the evaluation
benchmarks' Trainer runs."""

import pytest
import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.train.schedules import LRSchedule
from hope_scale.train.step import ClipCounter, TrainStep
from tests.test_parallel_engine import CLIP, OPT, make_batches, reference_run, tiny_cfg


@pytest.mark.parametrize("arch", ["hope", "transformer"])
def test_train_step_applies_the_engines_rules(arch):
    """Losses, gradient norms and weights after 4 steps of 2 micro-batches equal the oracle's, with a CMS level
    of period 300 tokens (due every third step at 128 tokens per step) and clipping that binds."""
    cfg = tiny_cfg(arch)
    batches = make_batches(steps=4, n_micro=2)
    ref_losses, ref_norms, ref_params, _, ref_model = reference_run(cfg, batches)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(cfg))
    step = TrainStep(model, OPT, LRSchedule("constant", OPT["lr"], len(batches)), CLIP)
    outs = [step.step(mbs) for mbs in batches]
    assert [o["loss"] for o in outs] == pytest.approx(ref_losses, rel=1e-6)
    assert [o["grad_norm"] for o in outs] == pytest.approx(ref_norms, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=0, atol=1e-7, msg=name)
    if arch == "hope":
        assert [o["cms_stepped"][1] for o in outs] == [False, False, True, False]
    assert [o["clipped"] for o in outs] == [n > CLIP for n in ref_norms]
    assert step.clips.fraction == sum(n > CLIP for n in ref_norms) / 4 and step.clips.clipped > 0


def test_clip_counter():
    c = ClipCounter(1.0)
    assert [c.add(n) for n in (0.5, 1.0, 1.5, float("nan"), 3.0)] == [False, False, True, False, True]
    assert (c.steps, c.clipped, c.fraction) == (5, 2, 0.4)
    off = ClipCounter(0.0)
    assert not off.add(1e9) and off.fraction == 0.0 and ClipCounter(1.0).fraction == 0.0


def test_eval_trainer_runs_the_shared_step_and_reports_the_clipped_fraction(capsys):
    """hope_scale.eval.trainer keeps its interface (TrainConfig, Trainer(...).run(n).result()) and runs TrainStep:
    the same losses as driving TrainStep directly, in pieces or not, with or without a progress bar."""
    from hope_scale.eval.trainer import TrainConfig, Trainer

    cfg = tiny_cfg("hope")
    batches = [mbs[0] for mbs in make_batches(steps=6, n_micro=1)]
    tcfg = TrainConfig(steps=6, lr=1e-2, warmup_steps=2, grad_clip=0.5, log_every=0)
    torch.manual_seed(0)
    trainer = Trainer(build_model(ModelConfig.from_dict(cfg)), lambda s: batches[s], tcfg, "t")
    trainer.run(4, log=None, progress=True).run(log=None)
    bar = capsys.readouterr().err
    assert "4/4" in bar and "loss=" in bar and "6/6" not in bar  # only the piece that asked for it
    torch.manual_seed(0)
    direct = TrainStep(build_model(ModelConfig.from_dict(cfg)), {"lr": 1e-2, "weight_decay": 0.1},
                       LRSchedule("cosine", 1e-2, 6, 2, 0.1), 0.5)
    expect = [direct.step([b]) for b in batches]
    assert trainer.step == 6 and trainer.history == [o["loss"] for o in expect]
    res = trainer.result(keep_history=False)
    assert res["clipped_fraction"] == sum(o["clipped"] for o in expect) / 6 and "loss_history" not in res
    assert res["steps"] == 6 and res["tokens"] == 6 * batches[0][0].numel()
