"""Layout-independent state: export at layout X, import at layout Y, continue training as if never interrupted.

One chain of Hope runs on 2 processes (fp32; CMS level 1 has period 300 tokens = due at step 3, mean of 3 steps):

    job 0  TP=2, ZeRO-0   steps 1-2                   (level-1 gradients accumulate in the CMS buffers)
    job 1  DP=2, ZeRO-1   import job 0 (TP2 -> TP1)   step 3 (level 1 due: its buffer came through the reshard)
    job 2  PP=2, ZeRO-1   import job 1 (DP2 -> PP2)   step 4
    job 3  DP=2, ZeRO-2   import job 2 (PP2 -> DP2, ZeRO1 -> ZeRO2)   step 5
    job 4  DP=2, ZeRO-3   import job 2 (PP2 -> DP2, ZeRO1 -> ZeRO3)   step 5

Right after each import the engine's own export must equal what was imported exactly (fp32 parameters, AdamW
moments, CMS buffers, per-group step counts, CMS schedule); after the continued step the parameters and CMS buffers
match an uninterrupted plain-PyTorch run of the same steps (2e-6 abs; Hope amplifies fp32 rounding, see
test_parallel_equivalence).
"""

from __future__ import annotations

import pytest
import torch

from hope_scale.parallel.engine import assemble_rank_state, consolidate_full_state
from hope_scale.parallel.layout import ParallelLayout
from hope_scale.parallel.parallelize import ShardSpec

from .test_parallel_engine import job, make_batches, max_param_diff, reference_run, run_jobs, tiny_cfg

pytestmark = pytest.mark.slow

CFG = tiny_cfg("hope")
BATCHES = make_batches(steps=5, n_micro=2)
ZERO3_PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # no whole small params
FIELDS = ("value", "exp_avg", "exp_avg_sq", "cms_grad_sum")
CHAIN = [
    ("tp2_z0", ParallelLayout(tensor_parallel=2), None, BATCHES[0:2]),
    ("dp2_z1", ParallelLayout(data_parallel=2, zero_stage=1), 0, BATCHES[2:3]),
    ("pp2_z1", ParallelLayout(pipeline_parallel=2, zero_stage=1), 1, BATCHES[3:4]),
    ("dp2_z2", ParallelLayout(data_parallel=2, zero_stage=2), 2, BATCHES[4:5]),
    ("dp2_z3", ParallelLayout(data_parallel=2, zero_stage=3), 2, BATCHES[4:5]),
]


@pytest.fixture(scope="module")
def chain() -> list[list[dict]]:
    jobs = [{**job(CFG, layout, batches, gas=2 // layout.data_parallel, ds_extra=ZERO3_PARTITION_ALL),
             "import_from": src} for _, layout, src, batches in CHAIN]
    return run_jobs(2, jobs)


def _states(results: list[dict], key: str = "state") -> list[dict]:
    return [r[key] for r in results]


def assert_same_state(a_parts: list[dict], b_parts: list[dict]) -> None:
    for field in FIELDS:
        a, b = consolidate_full_state(a_parts, field), consolidate_full_state(b_parts, field)
        assert set(a) == set(b), field
        for n in a:
            assert torch.equal(a[n], b[n]), (field, n)
    for key in ("steps", "cms_schedule", "group_steps"):
        assert a_parts[0][key] == b_parts[0][key], key


@pytest.mark.parametrize("k", range(1, len(CHAIN)))
def test_import_reproduces_exported_state_exactly(chain, k):
    src = CHAIN[k][2]
    assert_same_state(_states(chain[src]), _states(chain[k], "after_import"))


@pytest.mark.parametrize("k", range(len(CHAIN)))
def test_continued_training_matches_uninterrupted_run(chain, k):
    steps = {0: 2, 1: 3, 2: 4, 3: 5, 4: 5}[k]
    ref_losses, _, ref_params, _, model = reference_run(CFG, BATCHES[:steps])
    res = chain[k]
    assert res[0]["losses"] == pytest.approx(ref_losses[steps - len(res[0]["losses"]):steps], rel=1e-6)
    params = consolidate_full_state(_states(res))
    assert max_param_diff(params, ref_params) < 2e-6
    bufs = consolidate_full_state(_states(res), "cms_grad_sum")
    level1 = sorted(n for n in bufs if ".cms.levels.1." in n)
    assert level1 and set(level1) <= set(model.cms_buffers)
    for n in level1:
        torch.testing.assert_close(bufs[n], model.cms_buffers[n].float(), rtol=0, atol=2e-6)
    state = res[0]["state"]
    assert state["steps"] == steps
    assert state["group_steps"]["main/decay"] == steps and state["group_steps"]["cms0/decay"] == steps
    assert state["group_steps"]["cms1/decay"] == (0 if steps < 3 else 1)
    assert state["cms_schedule"]["tokens_since"][1] == 128 * (steps % 3)
    if k == 1:  # the step where level 1 is due, right after the TP2 -> TP1 reshard
        assert all(r["stepped"] == [{0: True, 1: True}] for r in res)
        assert all(float(b.abs().max()) == 0 for n, b in bufs.items() if n in level1)


def test_assemble_rejects_incomplete_and_mismatched_parts(chain):
    parts = _states(chain[0])  # TP=2: each rank holds half of the sharded tensors
    name = "blocks.0.mixer.w_in.weight"
    shape = tuple(parts[0]["params"][name]["global_shape"]) if name in parts[0]["params"] else None
    shape = shape or tuple(parts[1]["params"][name]["global_shape"])
    full_box = tuple((0, s) for s in shape)
    needs = {name: ShardSpec(name, shape, full_box)}
    got = assemble_rank_state(parts, needs)
    assert tuple(got["params"][name]["value"].shape) == shape
    with pytest.raises(KeyError, match="do not cover"):
        assemble_rank_state(parts[:1], needs)
    with pytest.raises(ValueError, match="global shape"):
        bad = (shape[0] * 2, shape[1])
        assemble_rank_state(parts, {name: ShardSpec(name, bad, tuple((0, s) for s in bad))})
