"""Hope and Transformer++ at TP=2, PP=2, DP=2 and TP=2 x PP=2 train exactly like one process.

Three optimizer steps of 2 micro-batches (2 x 32 tokens), clipping binding, CMS level 1 (period 300 tokens) due
at step 3 with the mean of 3 steps' gradients. TP and PP runs use fp64 (ZeRO-0) so that the comparison is sharp even for Hope, whose
gradients amplify fp32 rounding (a 1e-7 weight perturbation moves its gradient by ~1e-3 relative); DeepSpeed
reduces only fp32/bf16 gradients across data-parallel ranks, so the DP runs use fp32 with ZeRO-1.
Tolerances on the consolidated parameters vs a plain-PyTorch run (updates are ~1e-3):
fp64: 1e-8 abs; fp32: transformer 5e-7 (a few ulp of weights ~1), hope 2e-6 abs. Losses 1e-6 rel (Megatron's vocab-parallel
cross-entropy computes in fp32), grad norms 1e-6 rel (fp32 hope: 1e-4).

Activation checkpointing (``train.activation_checkpointing``) at a layout must not change anything: Hope at
TP=2 x PP=2 with ``block`` (DeepSpeed's pipeline checkpointing, with TP inside the blocks) and at DP=2 ZeRO-1 with
``memory``, Transformer++ at PP=2 with ``block``, each equal to the same layout without checkpointing (fp64: 1e-10
relative on parameters, losses and grad norms; fp32: bit for bit up to 1e-6 relative).

The cost on memory writes (``model.write_cost``), whose gradient the layers add where η is made, trains Hope at
TP=2 x PP=2 (heads split, layers on two stages, 2 micro-batches) and DP=2 ZeRO-1 like one process minimising the
explicit cross-entropy + cost, within the same tolerances.

All 2-process layouts of both architectures run in one set of 2 processes (engines built one after another),
the 4-process layout in another, to keep process start-up (imports of torch/DeepSpeed/Megatron) to two.
"""

from __future__ import annotations

import pytest
import torch

from hope_scale.parallel.layout import ParallelLayout

from .test_parallel_engine import check_against_reference, job, make_batches, max_param_diff, run_jobs, tiny_cfg

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": (ParallelLayout(tensor_parallel=2), "fp64"),
    "pp2": (ParallelLayout(pipeline_parallel=2), "fp64"),
    "dp2_zero1": (ParallelLayout(data_parallel=2, zero_stage=1), "fp32"),
    "tp2xpp2": (ParallelLayout(tensor_parallel=2, pipeline_parallel=2), "fp64"),
}
ARCHS = ("hope", "transformer")
RECOMPUTE = [("hope", "tp2xpp2", "block"), ("hope", "dp2_zero1", "memory"), ("transformer", "pp2", "block")]
WRITE_COST = [("hope", "tp2xpp2", "write_cost"), ("hope", "dp2_zero1", "write_cost")]
BATCHES = make_batches(steps=3, n_micro=2)


def _cfg(arch: str, extra: str = "none") -> dict:
    return tiny_cfg(arch, write_cost=0.2) if extra == "write_cost" else tiny_cfg(arch)


def _job(arch: str, case: str, extra: str = "none") -> dict:
    """The run of ``arch`` at layout ``case``; ``extra``: an activation-checkpointing mode or "write_cost"."""
    layout, precision = LAYOUTS[case]
    return job(_cfg(arch, extra), layout, BATCHES, gas=2 // layout.data_parallel, precision=precision,
               recompute="none" if extra == "write_cost" else extra)


@pytest.fixture(scope="module")
def results() -> dict:
    out = {}
    for world in (2, 4):
        keys = [(a, c) for a in ARCHS for c in LAYOUTS if LAYOUTS[c][0].world_size == world]
        keys += [k for k in RECOMPUTE + WRITE_COST if LAYOUTS[k[1]][0].world_size == world]
        for key, res in zip(keys, run_jobs(world, [_job(*k) for k in keys])):
            out[key] = res
    return out


@pytest.mark.parametrize("arch,case,recompute", RECOMPUTE)
def test_activation_checkpointing_changes_nothing(results, arch, case, recompute):
    from hope_scale.parallel.engine import consolidate_full_state

    plain, ckpt = results[(arch, case)], results[(arch, case, recompute)]
    assert all(c["mixer_calls"] == 2 * p["mixer_calls"] > 0 for c, p in zip(ckpt, plain))  # every mixer ran twice
    rel = 1e-10 if LAYOUTS[case][1] == "fp64" else 1e-6
    assert ckpt[0]["losses"] == pytest.approx(plain[0]["losses"], rel=rel)
    assert ckpt[0]["norms"] == pytest.approx(plain[0]["norms"], rel=rel)
    a, b = (consolidate_full_state([r["state"] for r in res]) for res in (ckpt, plain))
    for name in b:
        assert ((a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-300)).item() <= rel, name


@pytest.mark.parametrize("arch,case,extra", [(a, c, "none") for a in ARCHS for c in LAYOUTS] + WRITE_COST)
def test_layout_matches_one_process(results, arch, case, extra):
    layout, precision = LAYOUTS[case]
    res = results[(arch, case, extra) if extra != "none" else (arch, case)]
    cfg = _cfg(arch, extra)
    if precision == "fp64":
        tol, norm_rel, dtype = 1e-8, 1e-6, torch.float64
    else:
        (tol, norm_rel), dtype = (2e-6, 1e-4) if arch == "hope" else (5e-7, 1e-6), torch.float32
    dev = check_against_reference(res, cfg, BATCHES, dtype=dtype, loss_rel=1e-6, norm_rel=norm_rel, param_abs=tol)
    print(f"{arch} {case} {extra} {precision}: {dev}")
    if extra == "write_cost":  # the cost moved the weights far beyond the tolerance
        from hope_scale.parallel.engine import consolidate_full_state

        charged, plain = (consolidate_full_state([r["state"] for r in x]) for x in (res, results[(arch, case)]))
        assert max_param_diff(charged, plain) > 100 * tol
    assert sum(r["flags"]["logging"] for r in res) == 1
    assert {r["flags"]["last"] for r in res} == ({True, False} if layout.pipeline_parallel > 1 else {True})
    if arch == "hope":
        assert all(r["stepped"] == [{0: True, 1: False}, {0: True, 1: False}, {0: True, 1: True}] for r in res)
        stats = res[0]["stats"]  # gathered from every stage, averaged over TP ranks
        assert all(r["stats"] == stats for r in res)
        assert sorted(k.split("/")[0] for k in stats if k.endswith("/eta")) == ["layer0", "layer1"]
