"""cpu_compat: Megatron-Core's CUDA calls get CPU stand-ins only when CUDA is unavailable.

Runs in a subprocess: the stand-ins patch torch.cuda process-wide, which must not leak into other tests.
"""

from __future__ import annotations

import pytest
import torch

from hope_scale.parallel.launch import run_local


def compat_worker(_payload) -> dict:
    from hope_scale.parallel.cpu_compat import apply_cpu_stand_ins, cpu_stand_ins_active, cpu_stand_ins_needed

    out = {"needed": cpu_stand_ins_needed(), "applied": apply_cpu_stand_ins()}
    out["idempotent"] = apply_cpu_stand_ins() == out["applied"]
    out["active"] = cpu_stand_ins_active()
    if not out["applied"]:
        return out
    out["device"] = torch.cuda.current_device()
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    stream.wait_stream(stream)
    stream.synchronize()
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(0)
    outer_expected = torch.rand(3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with tracker.fork():  # the tensor-model-parallel stream: seed + 2718 + tp_rank
        a = torch.rand(3)
    with tracker.fork():  # continues where the first fork stopped
        b = torch.rand(3)
    outer = torch.rand(3)
    ref = torch.Generator().manual_seed(123 + 2718 + 1)
    out["fork_first"] = torch.equal(a, torch.rand(3, generator=ref))
    out["fork_continues"] = torch.equal(b, torch.rand(3, generator=ref))
    out["outer_untouched"] = torch.equal(outer, outer_expected)
    # Megatron's checkpointed recomputation uses the tracker's states
    out["states"] = sorted(tracker.get_states())
    return out


def test_cpu_stand_ins_only_without_cuda():
    (r,) = run_local("tests.test_parallel_cpu_compat:compat_worker", 1, None, timeout=300)
    assert r["needed"] == (not torch.cuda.is_available())
    assert r["applied"] == r["needed"] and r["idempotent"] and r["active"] == r["applied"]
    if not r["applied"]:
        return  # CUDA available: nothing is stood in for (checked above)
    assert r["device"] == "cpu"
    assert r["fork_first"] and r["fork_continues"] and r["outer_untouched"]
    assert "model-parallel-rng" in r["states"] and "data-parallel-rng" in r["states"]


def one_process_comm_worker(_payload) -> dict:
    from deepspeed.comm import comm as ds_comm

    from hope_scale.parallel.layout import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    return {"shm_op": ds_comm.cdb.shm_comm_op is not None}


def test_one_process_needs_no_deepspeed_comm_compile(tmp_path):
    """A one-process CPU run does not build DeepSpeed's shared-memory op (in a fresh extension folder it would
    compile it for minutes first); with several processes and no cached build, a notice comes before it."""
    from hope_scale.parallel.cpu_compat import shm_comm_notice

    ext = tmp_path / "torch_extensions"
    (r,) = run_local("tests.test_parallel_cpu_compat:one_process_comm_worker", 1, None, timeout=300,
                     env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert r == {"shm_op": False}
    assert not list(ext.rglob("*.so")) and not list(ext.rglob("*.cpp"))  # nothing was compiled
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(ext))
        assert shm_comm_notice(1) is None
        if torch.cuda.is_available():  # GPU machines use NCCL: no CPU op, no notice
            assert shm_comm_notice(2) is None
        else:
            assert "compiling its CPU shared-memory communication op" in shm_comm_notice(2)
