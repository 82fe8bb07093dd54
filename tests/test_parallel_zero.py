"""CMS level periods under ZeRO 2/3 and bf16 (DeepSpeed's bf16 optimizer, ZeRO-1, pipeline) on 2 processes.

Hope with CMS level 1 at period 300 tokens (128 tokens per step: due at step 3, with the mean of 3 steps):

    job 0  DP=2 ZeRO-2 fp32, 3 steps: matches plain PyTorch (2e-6 abs), level 1 stepped only at step 3
    job 1  DP=2 ZeRO-3 fp32, 2 steps: level-1 weights and moments bit-identical to the initial ones, its
           CMS buffers hold the sum of the 2 steps' gradients, its optimizer step count is 0
    job 2  DP=2 ZeRO-1 bf16, 3 steps                   } hope_attention (same CMS; Hope's memory update has no
    job 3  PP=2 ZeRO-1 bf16, 3 steps + eval at another  } bf16 kernel on CPU): losses within 2e-2 of the fp32
           sequence length                               reference, same CMS pattern
    job 4  DP=2 ZeRO-1 bf16, Hope itself: 8 steps on one batch at lr 3e-3: every loss finite, the loss falls,
           the first loss within 2e-2 of fp32 (the memory update's solves and step bound compute in fp32)
"""

from __future__ import annotations

import pytest
import torch

from hope_scale.parallel.engine import consolidate_full_state
from hope_scale.parallel.layout import ParallelLayout

from .test_parallel_engine import (OPT, _initial_params, job, make_batches, max_param_diff, reference_run, run_jobs,
                                   tiny_cfg)

pytestmark = pytest.mark.slow

CFG = tiny_cfg("hope")
CFG_BF16 = tiny_cfg("hope_attention")  # jobs 2-3: the CMS schedule under bf16 (cheaper than Hope's memory)
BATCHES = make_batches(steps=3, n_micro=2)
EVAL = make_batches(1, 1, seq=16, seed=9)[0][0]
JOBS = [
    (ParallelLayout(data_parallel=2, zero_stage=2), "fp32", BATCHES),
    (ParallelLayout(data_parallel=2, zero_stage=3), "fp32", BATCHES[:2]),
    (ParallelLayout(data_parallel=2, zero_stage=1), "bf16", BATCHES),
    (ParallelLayout(pipeline_parallel=2, zero_stage=1), "bf16", BATCHES),
    (ParallelLayout(data_parallel=2, zero_stage=1), "bf16", [BATCHES[0]] * 8),
]
HOPE_BF16_JOB = 4
STEPPED = [{0: True, 1: False}, {0: True, 1: False}, {0: True, 1: True}]


@pytest.fixture(scope="module")
def results() -> list[list[dict]]:
    jobs = [job(CFG if prec == "fp32" or k == HOPE_BF16_JOB else CFG_BF16, layout, b, gas=2 // layout.data_parallel,
                precision=prec, eval=EVAL, ds_extra={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
                **({"opt": {**OPT, "lr": 3e-3}} if k == HOPE_BF16_JOB else {}))
            for k, (layout, prec, b) in enumerate(JOBS)]  # ZeRO-3 partitions even the tiny test parameters
    return run_jobs(2, jobs)


def _level(names, level: int):
    return sorted(n for n in names if f".cms.levels.{level}." in n)


def test_zero2_cms_periods_match_plain_pytorch(results):
    res = results[0]
    ref_losses, _, ref_params, _, _ = reference_run(CFG, BATCHES)
    assert all(r["stepped"] == STEPPED for r in res)
    assert res[0]["losses"] == pytest.approx(ref_losses, rel=1e-6)
    assert max_param_diff(consolidate_full_state([r["state"] for r in res]), ref_params) < 2e-6
    steps = res[0]["state"]["group_steps"]
    assert steps["cms1/decay"] == 1 and steps["cms1/no_decay"] == 1 and steps["cms0/decay"] == 3


def test_zero3_level_untouched_before_its_period(results):
    res = results[1]
    parts = [r["state"] for r in res]
    params, init = consolidate_full_state(parts), _initial_params(CFG)
    lvl1, lvl0 = _level(params, 1), _level(params, 0)
    assert lvl1 and lvl0
    for n in lvl1:
        assert torch.equal(params[n], init[n].detach()), n
    for key in ("exp_avg", "exp_avg_sq"):
        moments = consolidate_full_state(parts, key)
        assert all(float(moments[n].abs().max()) == 0 for n in lvl1)
        assert all(float(moments[n].abs().max()) > 0 for n in lvl0)
    assert all(float((params[n] - init[n].detach()).abs().max()) > 0 for n in lvl0)
    _, _, _, _, model = reference_run(CFG, BATCHES[:2])
    bufs = consolidate_full_state(parts, "cms_grad_sum")
    for n in lvl1:
        torch.testing.assert_close(bufs[n], model.cms_buffers[n], rtol=0, atol=1e-6)
    assert parts[0]["group_steps"]["cms1/decay"] == 0 and parts[0]["group_steps"]["main/decay"] == 2


@pytest.mark.parametrize("k", [2, 3])
def test_bf16_trains_close_to_fp32_with_cms_schedule(results, k):
    res = results[k]
    ref_losses, _, _, _, _ = reference_run(CFG_BF16, BATCHES)
    assert all(r["stepped"] == STEPPED for r in res)
    assert all(r["losses"] == res[0]["losses"] for r in res)
    assert res[0]["losses"] == pytest.approx(ref_losses, abs=2e-2)
    steps = res[0]["state"]["group_steps"]
    assert steps["cms1/decay"] == 1 and steps["main/decay"] == 3
    assert all(abs(r["eval"] - res[0]["eval"]) < 1e-6 and 3.0 < r["eval"] < 6.0 for r in res)
    # master weights are exported in fp32
    assert all(e["value"].dtype == torch.float32 for r in res for e in r["state"]["params"].values())


def test_hope_trains_in_bf16_under_zero1(results):
    """Hope itself (not only Hope-Attention) trains under DeepSpeed's bf16 ZeRO-1 optimizer."""
    res = results[HOPE_BF16_JOB]
    losses = res[0]["losses"]
    assert all(r["losses"] == losses for r in res)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    ref_losses, _, _, _, _ = reference_run(CFG, [BATCHES[0]])
    assert losses[0] == pytest.approx(ref_losses[0], abs=2e-2)  # same weights, bf16 arithmetic
    assert losses[-1] < losses[0] - 0.1, losses  # fitting one batch: the loss must fall
    assert all(torch.isfinite(e["value"]).all() for r in res for e in r["state"]["params"].values())
