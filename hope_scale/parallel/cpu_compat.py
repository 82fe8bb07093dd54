"""CPU stand-ins for the few CUDA calls Megatron-Core makes on code paths we use.

Megatron-Core's tensor-parallel layers, RNG tracker and pipeline schedules call ``torch.cuda.current_device``,
``torch.cuda.synchronize``, ``torch.cuda.current_stream`` and the CUDA RNG state API even when every tensor is
on the CPU. On a machine without CUDA (our tests: gloo processes on one host) ``apply_cpu_stand_ins`` replaces
exactly those calls:

* ``torch.cuda.current_device()``  -> ``"cpu"`` (Megatron passes it as a ``device=`` argument)
* ``torch.cuda.synchronize()``     -> no-op
* ``torch.cuda.current_stream()``  -> a stream object whose methods are no-ops
* Megatron's CUDA RNG tracker      -> :class:`CPURNGStatesTracker`, the same named-state tracker on the CPU
  generator (``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` then work)

On a machine with CUDA it does nothing. It is applied once, before any model is built (``init_distributed``
calls it); every CPU workaround of the project lives in this module.

``prepare_deepspeed_cpu_comm`` handles DeepSpeed's CPU communication op: DeepSpeed JIT-compiles a shared-memory
all-reduce kernel at its first ``init_distributed`` on a machine (minutes on a small one, and a silent wait on a
file lock while another process compiles it). One process has nothing to all-reduce, so the op is turned off;
several processes use it, and a compile is announced before it starts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_APPLIED = False


class _NullStream:
    """Stand-in for a CUDA stream on the CPU: every operation completes immediately."""

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event

    def query(self) -> bool:
        return True


class CPURNGStatesTracker:
    """Megatron's named RNG-state tracker (``CudaRNGStatesTracker``) on the CPU default generator.

    ``add(name, seed)`` registers a generator state seeded with ``seed``; ``fork(name)`` runs a block with that
    state as the default CPU generator state, stores the advanced state and restores the original one.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        outer = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._current_state_name = outer


def cpu_stand_ins_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_stand_ins(force: bool = False) -> bool:
    """Install the stand-ins if CUDA is unavailable (or ``force``). Idempotent; returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not (force or cpu_stand_ins_needed()):
        return False
    null_stream = _NullStream()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: null_stream

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Megatron's initialize_rng_tracker(force_reset=True) would rebuild a CUDA tracker; keep ours instead
    original_init = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset:
            mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__wrapped__ = original_init
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    _APPLIED = True
    return True


def cpu_stand_ins_active() -> bool:
    return _APPLIED


SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


def shm_comm_notice(world_size: int) -> str | None:
    """What to print before ``deepspeed.init_distributed`` on CPU: a notice when it will compile (or wait for
    another process compiling) the shared-memory op, i.e. several processes and no cached build; else None."""
    if world_size == 1 or not cpu_stand_ins_needed():
        return None
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory(SHM_COMM_OP, verbose=False))
    if (build / f"{SHM_COMM_OP}.so").is_file():
        return None
    return (f"DeepSpeed: compiling its CPU shared-memory communication op into {build} (once per machine and "
            "extension folder, about a minute; a process may wait here while another one compiles it) ...")


def prepare_deepspeed_cpu_comm(world_size: int, local_rank: int) -> None:
    """Before ``deepspeed.init_distributed`` on a CPU-only machine: no shared-memory op for one process (it
    would only be compiled), and a notice on local rank 0 before the op is compiled for several."""
    if not cpu_stand_ins_needed():
        return
    if world_size == 1:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # DeepSpeed keeps this dict: the edit persists
        return
    notice = shm_comm_notice(world_size)
    if notice and local_rank == 0:
        print(notice, flush=True)
