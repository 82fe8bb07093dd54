"""Parallel layout (TP x PP x DP, ZeRO stage), its validation, and process-group start-up.

Rank order is Megatron-Core's default ``tp-cp-ep-dp-pp`` (tensor-parallel ranks adjacent), which is also the
order of DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model):

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so Megatron's tensor-parallel groups and DeepSpeed's pipeline grid agree on who is who.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass

import torch

from hope_scale.model.config import ModelConfig
from hope_scale.model.layers import swiglu_hidden


class LayoutError(ValueError):
    """A parallel layout cannot run this model on this many processes; the message names the field."""


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    zero_stage: int = 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @classmethod
    def for_world(cls, world_size: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                  zero_stage: int = 0) -> "ParallelLayout":
        """The layout whose data-parallel size fills ``world_size`` (rejected if it does not divide)."""
        mp = tensor_parallel * pipeline_parallel
        if mp <= 0 or world_size % mp:
            raise LayoutError(f"parallel.data_parallel: world size {world_size} is not a multiple of "
                              f"tensor_parallel * pipeline_parallel = {mp}")
        return cls(tensor_parallel, pipeline_parallel, world_size // mp, zero_stage)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, model_cfg: ModelConfig, world_size: int | None = None) -> None:
        """Raise LayoutError naming the offending field if this layout cannot run ``model_cfg``."""

        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise LayoutError(f"parallel.{field}: {msg}")

        for name in ("tensor_parallel", "pipeline_parallel", "data_parallel"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, f"must be an integer >= 1, got {v!r}")
        need(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if world_size is not None:
            need(world_size == self.world_size, "data_parallel",
                 f"tensor_parallel ({self.tensor_parallel}) x pipeline_parallel ({self.pipeline_parallel}) x "
                 f"data_parallel ({self.data_parallel}) = {self.world_size} != world size {world_size}")
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        need(model_cfg.n_heads % tp == 0, "tensor_parallel",
             f"model.n_heads={model_cfg.n_heads} is not divisible by tensor_parallel={tp} (heads are split across ranks)")
        need(model_cfg.vocab_size % tp == 0, "tensor_parallel",
             f"model.vocab_size={model_cfg.vocab_size} is not divisible by tensor_parallel={tp} "
             "(the embedding and output head are split by vocabulary rows)")
        hidden = []
        if model_cfg.arch in ("hope", "hope_attention"):
            hidden += [(f"model.cms_levels[{i}].hidden_mult", swiglu_hidden(model_cfg.d_model, lvl.hidden_mult))
                       for i, lvl in enumerate(model_cfg.cms_levels)]
        else:
            hidden.append(("model.mlp_hidden_mult", swiglu_hidden(model_cfg.d_model, model_cfg.mlp_hidden_mult)))
        for field, width in hidden:
            need(width % tp == 0, "tensor_parallel", f"MLP hidden width {width} ({field}) is not divisible by "
                 f"tensor_parallel={tp}")
        need(model_cfg.n_layers % pp == 0, "pipeline_parallel",
             f"model.n_layers={model_cfg.n_layers} is not divisible by pipeline_parallel={pp} "
             "(every stage holds the same number of blocks)")
        need(pp == 1 or self.zero_stage <= 1, "zero_stage",
             f"ZeRO stage {self.zero_stage} cannot be combined with pipeline_parallel={pp}: DeepSpeed's pipeline "
             "engine supports ZeRO stage 0 or 1 only (use zero_stage <= 1, or pipeline_parallel=1)")


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the layout."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """One rank that holds the global loss: tp 0, dp 0 of the last pipeline stage."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def to_dict(self) -> dict:
        return asdict(self)


def rank_coordinates(rank: int, layout: ParallelLayout) -> tuple[int, int, int]:
    """(tp_rank, pp_rank, dp_rank) of a global rank in Megatron's default tp-cp-ep-dp-pp order."""
    tp, dp = layout.tensor_parallel, layout.data_parallel
    return rank % tp, rank // (tp * dp), (rank // tp) % dp


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(layout: ParallelLayout, model_cfg: ModelConfig | None = None, backend: str | None = None,
                     timeout_minutes: int = 30) -> RankInfo:
    """Start (or join) the process group and Megatron's model-parallel groups for ``layout``.

    Reads the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a single process
    without them runs as rank 0 of 1). On a machine without CUDA: backend gloo, ``DS_ACCELERATOR=cpu`` and the CPU
    stand-ins for Megatron-Core (cpu_compat). Validates the layout (and the model against it) before any group
    is built. Idempotent for the same layout.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = backend or default_backend()
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", os.environ.get("RANK", "0")),
                         ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(var, default)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise LayoutError("parallel: MASTER_PORT is not set for a multi-process run")
        os.environ["MASTER_PORT"] = str(_free_port())
    world_size = int(os.environ["WORLD_SIZE"])
    layout.validate(model_cfg, world_size) if model_cfg is not None else _validate_world(layout, world_size)

    from .cpu_compat import apply_cpu_stand_ins, prepare_deepspeed_cpu_comm

    apply_cpu_stand_ins()
    import deepspeed
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        prepare_deepspeed_cpu_comm(world_size, int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() != layout.tensor_parallel
                or parallel_state.get_pipeline_model_parallel_world_size() != layout.pipeline_parallel):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tensor_parallel,
                                                 pipeline_model_parallel_size=layout.pipeline_parallel,
                                                 distributed_timeout_minutes=timeout_minutes)
    rank = torch.distributed.get_rank()
    info = RankInfo(rank=rank, world_size=world_size,
                    tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=layout.tensor_parallel,
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp_size=layout.pipeline_parallel,
                    dp_rank=parallel_state.get_data_parallel_rank(), dp_size=layout.data_parallel)
    expect = rank_coordinates(rank, layout)
    if (info.tp_rank, info.pp_rank, info.dp_rank) != expect:
        raise RuntimeError(f"rank {rank}: Megatron placed it at (tp, pp, dp)={(info.tp_rank, info.pp_rank, info.dp_rank)}"
                           f", expected {expect}")
    return info


def _validate_world(layout: ParallelLayout, world_size: int) -> None:
    if world_size != layout.world_size:
        raise LayoutError(f"parallel.data_parallel: tensor_parallel x pipeline_parallel x data_parallel = "
                          f"{layout.world_size} != world size {world_size}")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_distributed() -> None:
    """Destroy Megatron's groups and the default process group (call before a worker exits)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
