"""The DeepSpeed config the engine generates, and which of its keys ``parallel.deepspeed`` may override.

``build_deepspeed_config`` builds the config from the run's own settings (ZeRO stage, precision, clipping,
accumulation); ``check_overrides`` validates the user's extra entries before any work: a key that hope-scale
sets from one of its own config keys is refused naming that key, a top-level key outside ``PASS_THROUGH`` is
refused as unknown (DeepSpeed itself ignores unknown keys silently), and ``zero_optimization`` is checked by
DeepSpeed's own model of it (unknown nested keys, wrong types).
"""

from __future__ import annotations

from typing import Any

from hope_scale.dicts import deep_merge

from .layout import LayoutError, ParallelLayout

# DeepSpeed keys derived from hope-scale's config: set them there
OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation = global / (micro x data_parallel))",
    "gradient_clipping": "optimizer.grad_clip",
    "optimizer": "optimizer",
    "scheduler": "schedule",
    "bf16": "parallel.precision",
    "bfloat16": "parallel.precision",
    "fp16": "parallel.precision (fp16 is not supported: use bf16)",
}
# DeepSpeed sections that may be tuned through parallel.deepspeed
PASS_THROUGH = frozenset({
    "zero_optimization", "data_types", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "comms_logger", "flops_profiler",
    "timers", "checkpoint", "aio", "activation_checkpointing", "pipeline", "tensorboard", "wandb", "csv_monitor",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
})


def check_overrides(extra: dict[str, Any], layout: ParallelLayout) -> None:
    """Raise LayoutError naming ``parallel.deepspeed.<key>`` for an override the engine cannot honour."""
    where = "parallel.deepspeed"
    for key in sorted(extra):
        if key in OWNED:
            raise LayoutError(f"{where}.{key}: set by hope-scale from {OWNED[key]}; set it there")
        if key not in PASS_THROUGH:
            raise LayoutError(f"{where}.{key}: unknown DeepSpeed key (DeepSpeed would ignore it silently); keys "
                              f"that may be set here: {sorted(PASS_THROUGH)}")
    if "activation_checkpoint_interval" in (extra.get("pipeline") or {}):
        raise LayoutError(f"{where}.pipeline.activation_checkpoint_interval: set by hope-scale from "
                          f"train.activation_checkpointing; set it there")
    zero = extra.get("zero_optimization")
    if zero is None:
        return
    if not isinstance(zero, dict):
        raise LayoutError(f"{where}.zero_optimization: expected a mapping, got {zero!r}")
    if "stage" in zero and zero["stage"] != layout.zero_stage:
        raise LayoutError(f"{where}.zero_optimization.stage: set by hope-scale from parallel.zero_stage; set it there")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**{**_zero_section(layout), **zero})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise LayoutError(f"{where}.zero_optimization.{field}: {first['msg']}") from None


def _zero_section(layout: ParallelLayout) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": layout.zero_stage}
    if layout.zero_stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                     "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7})
    if layout.zero_stage == 3:  # parameters below the persistence threshold (1e5 elements) stay whole
        zero.update({"stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
                     "stage3_max_reuse_distance": 1e9})
    return zero


def build_deepspeed_config(layout: ParallelLayout, precision: str, grad_clip: float, grad_accum_steps: int,
                           extra: dict[str, Any] | None = None, pipeline_checkpoint_interval: int = 0) -> dict[str, Any]:
    """The engine's DeepSpeed config with ``extra`` (checked by ``check_overrides``) merged over it;
    ``pipeline_checkpoint_interval``: blocks per checkpointed interval of the pipeline engine (0: none)."""
    extra = extra or {}
    check_overrides(extra, layout)
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum_steps,
        # a huge threshold keeps DeepSpeed computing the global norm when clipping is off
        "gradient_clipping": grad_clip if grad_clip > 0 else 1e30,
        "zero_optimization": _zero_section(layout),
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if precision == "bf16":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if layout.pipeline_parallel > 1:
        cfg["pipeline"] = {"activation_checkpoint_interval": pipeline_checkpoint_interval}
    return deep_merge(cfg, extra)
