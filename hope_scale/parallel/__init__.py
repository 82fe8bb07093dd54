"""Distributed training: tensor / pipeline / data parallelism and ZeRO for Hope and the baselines.

    layout.py       ParallelLayout (TP x PP x DP, ZeRO stage), validation, process groups
    parallelize.py  the one place that splits a plain model into this rank's part
    optim.py        AdamW that applies the CMS level schedule wherever ZeRO keeps the gradient
    pipeline.py     DeepSpeed pipeline stages (1F1B) built from a ModelPart
    engine.py       TrainEngine: train_step / eval_loss / export_state / import_state
    cpu_compat.py   CPU stand-ins for Megatron-Core's CUDA calls (no-op with CUDA)

See docs/parallelism.md.
"""

from .layout import LayoutError, ParallelLayout, RankInfo, init_distributed, shutdown_distributed

__all__ = ["LayoutError", "ParallelLayout", "RankInfo", "init_distributed", "shutdown_distributed",
           "TrainEngine", "OptimizerSettings", "assemble_rank_state", "consolidate_full_state"]


def __getattr__(name):  # engine imports deepspeed: load it on first use only
    if name in ("TrainEngine", "OptimizerSettings", "assemble_rank_state", "consolidate_full_state"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
