"""TrainEngine on one process: matches a plain-PyTorch reference (AdamW + clipping + the CMS schedule),
CMS periods hold, state export/import round-trips, and layouts are validated before any work starts.

Workers run in subprocesses (hope_scale.parallel.launch) so DeepSpeed's process group never lives in pytest.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hope_scale.model import ModelConfig, build_model
from hope_scale.parallel.layout import LayoutError, ParallelLayout
from hope_scale.parallel.launch import run_local

pytestmark = pytest.mark.slow

OPT = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-3, "weight_decay": 0.1}
CLIP = 0.5  # binds on these batches (norms ~ 2-6), so the clipping path is exercised


def tiny_cfg(arch: str = "hope", **kw) -> dict:
    d = dict(arch=arch, vocab_size=64, d_model=64, n_layers=2, n_heads=4, chunk_size_memory=16,
             chunk_size_projection=32, max_seq_len=64,
             cms_levels=[{"period": 1, "hidden_mult": 1.0}, {"period": 300, "hidden_mult": 1.0}])
    d.update(kw)
    return d


def make_batches(steps: int, n_micro: int, batch: int = 2, seq: int = 32, vocab: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        mbs = []
        for _ in range(n_micro):
            x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
            mbs.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
        out.append(mbs)
    return out


# --- worker (runs in each rank's process) ------------------------------------------------------------
def train_worker(p: dict) -> dict:
    import time

    from hope_scale.parallel.engine import TrainEngine, assemble_rank_state

    t0 = time.perf_counter()
    layout = ParallelLayout(**p["layout"])
    eng = TrainEngine(ModelConfig.from_dict(p["cfg"]), layout, p["opt"], precision=p.get("precision", "fp32"),
                      grad_clip=p["clip"], grad_accum_steps=p["gas"], seed=0,
                      deepspeed_config=p.get("ds_extra"), activation_checkpointing=p.get("recompute", "none"))
    out = {"losses": [], "norms": [], "stepped": [], "rank": eng.info.to_dict(),
           "flags": {"first": eng.is_first_stage, "last": eng.is_last_stage, "logging": eng.is_logging_rank}}
    out["t_init"] = time.perf_counter() - t0
    if p.get("import_parts") is not None:
        eng.import_state(assemble_rank_state(p["import_parts"], eng.state_needs()))
        out["after_import"] = eng.export_state()
    calls = [0]  # forward calls of this rank's sequence mixers (recomputation runs them again)
    for blk in eng.part.blocks.values():
        blk.mixer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    t1 = time.perf_counter()
    for mbs in p["batches"]:
        mine = mbs[eng.dp_rank * p["gas"]:(eng.dp_rank + 1) * p["gas"]]
        factors = p.get("write_cost_factors")  # schedules.write_cost_factor of each step; None: 1 throughout
        r = eng.train_step(mine, p["opt"]["lr"], write_cost=1.0 if factors is None else factors[len(out["losses"])])
        out["losses"].append(r["loss"])
        out["norms"].append(r["grad_norm"])
        out["stepped"].append(r["cms_stepped"])
    out["t_train"] = time.perf_counter() - t1
    out["mixer_calls"] = calls[0]
    out["compiled_steps"] = [("chunk_step" in vars(blk.mixer)) for blk in eng.part.blocks.values()]
    out["chunk_steps"] = [getattr(getattr(blk.mixer, "chunk_step", None), "__name__", None)  # None: attention
                          for blk in eng.part.blocks.values()]
    from hope_scale.model.kernels import chunk_update

    out["kernel_fallbacks"] = sorted(chunk_update._warned)  # model.kernel=triton warnings (naive update instead)
    if p.get("eval") is not None:
        out["eval"] = eng.eval_loss(p["eval"])
    out["stats"] = eng.memory_stats()
    t2 = time.perf_counter()
    out["state"] = eng.export_state()
    out["t_export"] = time.perf_counter() - t2
    eng.close(destroy_process_group=False)
    return out


def jobs_worker(p: dict) -> list[dict]:
    """Several train_worker jobs (layouts of the same world size) one after another in the same processes.
    A job with ``import_from: k`` starts from the state all ranks exported at the end of job k."""
    import torch.distributed as dist

    outs, states = [], []
    for job in p["jobs"]:
        if job.get("import_from") is not None:
            job = {**job, "import_parts": states[job["import_from"]]}
        out = train_worker(job)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out["state"])
        states.append(parts)
        outs.append(out)
    return outs


def job(cfg: dict, layout: ParallelLayout, batches, gas: int, **kw) -> dict:
    return {"cfg": cfg, "layout": layout.to_dict(), "opt": OPT, "clip": kw.pop("clip", CLIP), "gas": gas,
            "batches": batches, **kw}


def run_layout(cfg: dict, layout: ParallelLayout, batches, gas: int, **kw) -> list[dict]:
    return run_local("tests.test_parallel_engine:train_worker", layout.world_size,
                     job(cfg, layout, batches, gas, **kw), timeout=900)


def run_jobs(world_size: int, jobs: list[dict]) -> list[list[dict]]:
    """Run jobs in sequence on one set of ``world_size`` processes; returns per job the per-rank results."""
    per_rank = run_local("tests.test_parallel_engine:jobs_worker", world_size, {"jobs": jobs}, timeout=1200)
    return [[per_rank[r][j] for r in range(world_size)] for j in range(len(jobs))]


# --- plain PyTorch reference ---------------------------------------------------------------------------
_REFERENCE_CACHE: dict = {}


def reference_run(cfg: dict, batches, clip: float = CLIP, dtype: torch.dtype = torch.float32):
    """Cached (the same reference serves several layouts); see _reference_run."""
    key = (repr(sorted(cfg.items())), tuple(id(x) for mbs in batches for x, _ in mbs), clip, dtype)
    if key not in _REFERENCE_CACHE:  # keeps the batches alive, so their ids stay unique
        _REFERENCE_CACHE[key] = (batches, _reference_run(cfg, batches, clip, dtype))
    return _REFERENCE_CACHE[key][1]


def _reference_run(cfg: dict, batches, clip: float, dtype: torch.dtype):
    """Single-process training without DeepSpeed: mean micro-batch loss, clip over all gradients, then the CMS
    schedule (accumulate / hide / hand the mean), then AdamW with the engine's param groups. With
    ``model.write_cost`` the loss is the explicit cross-entropy + cost (the losses returned are the cross-entropy,
    as the engine reports)."""
    from hope_scale.train.step import CMSPeriodSchedule, cms_level_of, decays

    from .test_model_write_cost import explicit_cost, record_etas

    lam = ModelConfig.from_dict(cfg).write_cost
    mc = ModelConfig.from_dict({**cfg, "write_cost": 0.0})
    torch.manual_seed(0)
    model = build_model(mc).to(dtype)
    etas = record_etas(model)
    groups: dict = {}
    for n, p in model.named_parameters():
        lvl, wd = cms_level_of(n), decays(n, p)
        groups.setdefault((lvl, wd), {"params": [], "lvl": lvl, "weight_decay": OPT["weight_decay"] if wd else 0.0})
        groups[(lvl, wd)]["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"])
    sched = CMSPeriodSchedule({i: lvl.period for i, lvl in enumerate(mc.cms_levels)}
                              if mc.arch in ("hope", "hope_attention") else {})
    bufs: dict = {}
    losses, norms = [], []
    for mbs in batches:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in mbs:
            etas.clear()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100) / len(mbs)
            cost = explicit_cost(etas, lam) / len(mbs) if lam else 0.0
            (loss + cost).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else 1e30)))
        plan = sched.advance(sum(x.numel() for x, _ in mbs))
        for g in opt.param_groups:
            if g["lvl"] is None:
                continue
            due, n = plan[g["lvl"]]
            for p in g["params"]:
                buf = bufs.setdefault(p, torch.zeros_like(p))
                buf += p.grad
                if due:
                    p.grad = buf / n
                    bufs[p] = torch.zeros_like(p)
                else:
                    p.grad = None
        opt.step()
        losses.append(total)
    names = {p: n for n, p in model.named_parameters()}
    model.cms_buffers = {names[p]: b for p, b in bufs.items()}
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}, opt, model


def max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def check_against_reference(results: list[dict], cfg: dict, batches, dtype=torch.float32, loss_rel=1e-6,
                            norm_rel=1e-5, param_abs=1e-8) -> dict:
    """Every rank reports the reference's losses and grad norms; the parts' consolidated parameters equal the
    reference's. Returns the measured deviations."""
    from hope_scale.parallel.engine import consolidate_full_state

    ref_losses, ref_norms, ref_params, _, _ = reference_run(cfg, batches, dtype=dtype)
    for r in results:
        assert r["losses"] == results[0]["losses"]  # same value on every rank
        assert r["losses"] == pytest.approx(ref_losses, rel=loss_rel), r["rank"]
        assert r["norms"] == pytest.approx(ref_norms, rel=norm_rel), r["rank"]
    params = consolidate_full_state([r["state"] for r in results])
    diff = max_param_diff(params, ref_params)
    assert diff < param_abs, diff
    moved = max_param_diff(params, {n: p.detach() for n, p in _initial_params(cfg).items()})
    assert moved > 100 * param_abs  # the run changed the weights far more than the tolerance
    return {"param_diff": diff, "moved": moved,
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(results[0]["losses"], ref_losses)),
            "norm_rel": max(abs(a - b) / abs(b) for a, b in zip(results[0]["norms"], ref_norms))}


def _initial_params(cfg: dict) -> dict:
    torch.manual_seed(0)
    return dict(build_model(ModelConfig.from_dict(cfg)).named_parameters())


# --- tests -----------------------------------------------------------------------------------------------
def test_layout_validation_names_the_field():
    cfg = ModelConfig.from_dict(tiny_cfg(n_heads=4, n_layers=2, vocab_size=64))
    ParallelLayout(2, 2, 1, 1).validate(cfg, 4)
    cases = [
        (ParallelLayout(tensor_parallel=3, data_parallel=1), 3, "parallel.tensor_parallel", "n_heads"),
        (ParallelLayout(pipeline_parallel=4), 4, "parallel.pipeline_parallel", "n_layers"),
        (ParallelLayout(data_parallel=2), 4, "parallel.data_parallel", "world size 4"),
        (ParallelLayout(pipeline_parallel=2, zero_stage=2), 2, "parallel.zero_stage", "pipeline"),
        (ParallelLayout(zero_stage=4), 1, "parallel.zero_stage", "0, 1, 2 or 3"),
        (ParallelLayout(tensor_parallel=0), 0, "parallel.tensor_parallel", ">= 1"),
    ]
    for layout, world, field, words in cases:
        with pytest.raises(LayoutError, match=field) as e:
            layout.validate(cfg, world)
        assert words in str(e.value)
    odd_vocab = ModelConfig.from_dict(tiny_cfg(vocab_size=66, n_heads=4))
    with pytest.raises(LayoutError, match="vocab_size=66"):
        ParallelLayout(tensor_parallel=4).validate(odd_vocab, 4)
    with pytest.raises(LayoutError, match="parallel.data_parallel"):
        ParallelLayout.for_world(6, tensor_parallel=4)
    assert ParallelLayout.for_world(8, 2, 2) == ParallelLayout(2, 2, 2, 0)
    # precision checks happen in the engine before any process group or DeepSpeed import
    from hope_scale.parallel.engine import TrainEngine

    for layout, precision, words in [(ParallelLayout(), "bf16", "zero_stage >= 1"),
                                     (ParallelLayout(zero_stage=1), "fp64", "zero_stage=0"),
                                     (ParallelLayout(), "fp16", "not one of")]:
        with pytest.raises(LayoutError, match="parallel.precision") as e:
            TrainEngine(cfg, layout, precision=precision)
        assert words in str(e.value)
    with pytest.raises(LayoutError, match="train.grad_accum_steps"):
        TrainEngine(cfg, ParallelLayout(), grad_accum_steps=0)


def test_engine_with_model_compile_equals_eager(monkeypatch):
    """``model.compile: true`` in the engine (the chunk steps compiled; aot_eager backend, see
    tests/test_model_compile.py): in fp64 the same losses, norms and parameters as without, for hope and titans."""
    monkeypatch.setenv("HOPE_SCALE_COMPILE_BACKEND", "aot_eager")
    batches = make_batches(steps=2, n_micro=1, seq=40)  # a partial last main-memory and projection chunk
    for arch in ("hope", "titans"):
        eager, compiled = run_jobs(1, [job(tiny_cfg(arch, compile=c), ParallelLayout(), batches, gas=1,
                                           precision="fp64") for c in (False, True)])
        assert compiled[0]["compiled_steps"] == [True, True] and eager[0]["compiled_steps"] == [False, False]
        assert compiled[0]["losses"] == pytest.approx(eager[0]["losses"], rel=1e-10)
        assert compiled[0]["norms"] == pytest.approx(eager[0]["norms"], rel=1e-10)
        from hope_scale.parallel.engine import consolidate_full_state

        a, b = consolidate_full_state([eager[0]["state"]]), consolidate_full_state([compiled[0]["state"]])
        assert max_param_diff(a, b) < 1e-10


def test_engine_with_model_kernel_equals_naive(monkeypatch):
    """``model.kernel: triton`` in the engine, run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` in the
    spawned rank's environment, tests/test_model_kernel.py): the chunk steps are the kernel's, and losses and
    gradient norms equal the naive engine's."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # a partial last main-memory and projection chunk; one sequence, since the interpreter runs a program at a time
    batches = make_batches(steps=2, n_micro=1, batch=1, seq=40)
    naive, kernel = run_jobs(1, [job(tiny_cfg(kernel=k), ParallelLayout(), batches, gas=1)
                                 for k in ("naive", "triton")])
    assert kernel[0]["chunk_steps"] == ["kernel_chunk_step"] * 2 and naive[0]["chunk_steps"] == ["chunk_step"] * 2
    assert kernel[0]["kernel_fallbacks"] == []  # every chunk ran the kernel
    assert kernel[0]["losses"] == pytest.approx(naive[0]["losses"], rel=1e-5)
    assert kernel[0]["norms"] == pytest.approx(naive[0]["norms"], rel=1e-4)


def test_engine_charges_the_fraction_of_the_write_cost_it_is_given():
    """``train_step(write_cost=f)`` (``schedules.write_cost_factor``; fp64): with f = 0 then 1 (the cost from
    step 1), step 0 is a model's without the cost (same loss and gradient norm), step 1 has the same loss (same
    weights) but the cost's gradient; f = 0.5 of λ = 0.3 is λ = 0.15 in full (the cost's gradient is linear in λ)."""
    batches = make_batches(steps=2, n_micro=1, seq=40)
    delayed, off, on, half, halved = [r[0] for r in run_jobs(1, [
        job(tiny_cfg(write_cost=wc), ParallelLayout(), batches, gas=1, clip=0.0, precision="fp64",
            write_cost_factors=factors)
        for wc, factors in ((0.3, [0.0, 1.0]), (0.0, None), (0.3, None), (0.3, [0.5, 0.5]), (0.15, None))])]
    assert delayed["losses"] == pytest.approx(off["losses"], rel=1e-12)
    assert delayed["norms"][0] == pytest.approx(off["norms"][0], rel=1e-12)
    assert delayed["norms"][1] != pytest.approx(off["norms"][1], rel=1e-6)
    assert on["norms"][0] != pytest.approx(off["norms"][0], rel=1e-6)
    assert half["losses"] == pytest.approx(halved["losses"], rel=1e-12)
    assert half["norms"] == pytest.approx(halved["norms"], rel=1e-12)
    assert half["norms"][0] != pytest.approx(on["norms"][0], rel=1e-6)


def test_single_process_engine_matches_plain_pytorch_and_cms_periods():
    """hope, gas=2, clipping binding, CMS level 1 with period 300 tokens (= every 3rd step at 128 tokens/step):
    losses, grad norms and parameters match a plain-PyTorch loop; level 1 changes only on its steps."""
    cfg = tiny_cfg()
    batches = make_batches(steps=4, n_micro=2)
    (res,) = run_layout(cfg, ParallelLayout(), batches, gas=2,
                        eval=make_batches(1, 1, seed=7)[0][0])
    ref_losses, ref_norms, ref_params, _, _ = reference_run(cfg, batches)
    assert res["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert res["norms"] == pytest.approx(ref_norms, rel=1e-3)
    assert [s[1] for s in res["stepped"]] == [False, False, True, False]
    assert all(s[0] for s in res["stepped"])
    from hope_scale.parallel.engine import consolidate_full_state

    params = consolidate_full_state([res["state"]])
    assert max_param_diff(params, ref_params) < 1e-6
    torch.manual_seed(0)
    init = dict(build_model(ModelConfig.from_dict(cfg)).named_parameters())
    lvl1 = [n for n in params if ".cms.levels.1." in n]
    lvl0 = [n for n in params if ".cms.levels.0." in n]
    assert lvl1 and lvl0
    # level 1 moved (it stepped once, at step 3); its optimizer took exactly one step, level 0 four
    assert res["state"]["group_steps"]["cms1/decay"] == 1
    assert res["state"]["group_steps"]["cms0/decay"] == 4
    assert res["state"]["group_steps"]["main/decay"] == 4
    assert all((params[n] - init[n].detach()).abs().max() > 0 for n in lvl1 + lvl0)
    # after its step the accumulation buffer is empty again; the schedule counts the step since
    assert res["state"]["cms_schedule"]["tokens_since"] == {0: 0, 1: 128}
    buf = [res["state"]["params"][n]["cms_grad_sum"] for n in lvl1]
    assert all(float(b.abs().max()) > 0 for b in buf)  # holds step 4's gradient, waiting for the period
    assert set(res["stats"]) >= {"layer0/eta", "layer1/alpha", "layer0/mem_w1_norm"}
    assert 3.0 < res["eval"] < 6.0
