"""The pretraining configuration: one YAML file, ``key.sub=value`` overrides, validated before any work.

A config has seven sections (see ``configs/train/hope-tiny-cpu.yaml`` for a commented example)::

    model:       a name from configs/model (``hope-760m``), or a mapping of ModelConfig fields, optionally
                 with ``name:`` as the base the fields override (``{name: hope-tiny, d_model: 128}``)
    data:        the loader's DataConfig (path or weighted streams, cache, shuffle) and whether to prepare
                 the built-in corpus into ``data.path`` when it is absent
    parallel:    tensor/pipeline/data parallel sizes, ZeRO stage, precision
    optimizer:   AdamW hyper-parameters and gradient clipping
    schedule:    learning-rate schedule (cosine or WSD, with warm-up)
    train:       seed, sequence length, batch sizes, number of steps, evaluation cadence
    checkpoint:  folder, cadence, how many to keep, what to resume from
    logging:     TensorBoard folder, console cadence, peak FLOP/s used for MFU

Every error names the field (``optimizer.lr: expected a number, got 'abc'``,
``parallel.tensor_parallel: model.n_heads=4 is not divisible by tensor_parallel=3 ...``) and is raised by
``load_config`` before any model, process group or dataset is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hope_scale.dicts import deep_merge
from hope_scale.model import ConfigError, ModelConfig
from hope_scale.parallel.layout import LayoutError, ParallelLayout
from hope_scale.resources import config_dir

from .flops import PEAK_FLOPS

if typing.TYPE_CHECKING:
    from hope_scale.data.loader import DataConfig as LoaderDataConfig

TRAIN_CONFIG_DIR = config_dir("train")
DEFAULT_CONFIG = TRAIN_CONFIG_DIR / "hope-tiny-cpu.yaml"


def _choice(*values: str) -> dict:
    return {"choices": values}


@dataclass
class PrepareConfig:
    """The trainer's own ``data:`` keys: what to do when ``data.path`` holds no prepared dataset yet.

    The other ``data:`` keys are those of ``hope_scale.data.loader.DataConfig`` (path, streams, cache_dir,
    shuffle, ...), passed to the loader unchanged.
    """

    # prepare the built-in offline corpus into ``data.path`` if it is absent and named builtin-<tokenizer>-<seq_len>
    prepare_builtin: bool = False
    builtin_max_mb: float | None = 4.0  # how much of the built-in corpus to tokenize (None: all of it)
    builtin_val_fraction: float = 0.02  # fraction of its documents held out as the validation split
    tokenizer: str = "byte"  # tokenizer used when preparing


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int | None = None  # None: world_size // (tensor_parallel * pipeline_parallel)
    zero_stage: int = field(default=0, metadata=_choice(0, 1, 2, 3))
    precision: str = field(default="fp32", metadata=_choice("fp32", "bf16"))
    backend: str = field(default="auto", metadata=_choice("auto", "gloo", "nccl"))  # auto: nccl on GPU
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config merged over the generated one


@dataclass
class OptimizerConfig:
    lr: float = 4e-4  # peak learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables clipping


@dataclass
class ScheduleConfig:
    kind: str = field(default="cosine", metadata=_choice("cosine", "wsd", "constant"))
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optimizer.lr
    decay_fraction: float = 0.2  # WSD: fraction of the run spent in the final decay
    # model.write_cost is off before this optimizer step (0: on from the start); a model first learns to write,
    # then pays for it (docs/hope-design.md §6.7)
    write_cost_from_step: int = 0
    # from write_cost_from_step the cost rises linearly to its full value over this many steps (0: at once)
    write_cost_ramp_steps: int = 0


@dataclass
class TrainLoopConfig:
    seed: int = 1234
    seq_len: int = 128
    micro_batch_size: int = 4  # sequences per data-parallel rank per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    max_steps: int = 100
    eval_every: int = 50  # steps between validation evaluations; 0 disables periodic evaluation
    eval_batches: int = 4  # micro-batches per rank per evaluation
    # recompute in backward instead of keeping (hope_scale/parallel/recompute.py): nothing, whole blocks, or only
    # each block's sequence mixer (the Titans memory layer)
    activation_checkpointing: str = field(default="none", metadata=_choice("none", "block", "memory"))


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    every_steps: int = 50  # 0: only at the end
    keep_last_n: int = 3
    # auto: newest valid checkpoint in ``dir`` if any; never; or a path (checkpoint folder or root) used when
    # ``dir`` holds no checkpoint yet -- so a restarted run continues its own progress (see pretrain.py)
    resume: str = "auto"


@dataclass
class LoggingConfig:
    dir: str = "runs/default/tensorboard"  # TensorBoard event files
    log_every: int = 10  # steps between console lines and TensorBoard scalars
    device: str = "auto"  # peak-FLOPs table key for MFU (auto: detected; see hope_scale.train.flops)
    peak_flops: float | None = None  # overrides the table (FLOP/s per process)


SECTIONS = {"parallel": ParallelConfig, "optimizer": OptimizerConfig,
            "schedule": ScheduleConfig, "train": TrainLoopConfig, "checkpoint": CheckpointConfig,
            "logging": LoggingConfig}


@dataclass
class TrainConfig:
    model: ModelConfig
    model_name: str | None
    data: "LoaderDataConfig"
    prepare: PrepareConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainLoopConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], world_size: int | None = None) -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
        _reject_non_finite(raw, "")
        known = {"model", "data", *SECTIONS}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"config: unknown section(s) {unknown}; known sections: {sorted(known)}")
        if "model" not in raw:
            raise ConfigError("model: missing; give a name from configs/model or a mapping of model fields")
        model, model_name = _build_model(raw["model"])
        data, prepare = _build_data(raw.get("data") or {})
        sections = {name: _build_section(sec, raw.get(name) or {}, name) for name, sec in SECTIONS.items()}
        cfg = cls(model=model, model_name=model_name, data=data, prepare=prepare, **sections)
        cfg.validate(world_size)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that ``from_dict`` turns back into this config (stored in checkpoints)."""
        out: dict[str, Any] = {"model": self.model.to_dict(),
                               "data": {**self.data.to_dict(), **dataclasses.asdict(self.prepare)}}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    # ------------------------------------------------------------------------------------------
    def layout(self, world_size: int | None = None) -> ParallelLayout:
        """The parallel layout; its data-parallel size fills ``world_size`` unless ``parallel.data_parallel`` is set."""
        p = self.parallel
        dp = p.data_parallel
        if dp is None:
            mp = p.tensor_parallel * p.pipeline_parallel
            dp = world_size // mp if world_size is not None and mp > 0 and world_size % mp == 0 else 1
        return ParallelLayout(p.tensor_parallel, p.pipeline_parallel, dp, p.zero_stage)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.layout(world_size).data_parallel)

    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.train.seq_len

    def validate(self, world_size: int | None = None) -> None:
        """Cross-field checks; with ``world_size`` also that the layout fits the number of processes."""
        m, p, t, o, s = self.model, self.parallel, self.train, self.optimizer, self.schedule

        def need(ok: bool, where: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {msg}")

        layout = self.layout(world_size)
        try:
            layout.validate(m)  # the model-dependent checks first: they hold whatever the world size
            layout.validate(m, world_size)
        except LayoutError as e:
            raise ConfigError(str(e)) from None
        dp = layout.data_parallel if (world_size is not None or p.data_parallel is not None) else None

        for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_steps", "eval_batches"):
            need(getattr(t, name) >= 1, f"train.{name}", "must be >= 1")
        need(t.eval_every >= 0, "train.eval_every", "must be >= 0")
        need(t.seq_len <= m.max_seq_len, "train.seq_len", f"{t.seq_len} exceeds model max_seq_len={m.max_seq_len}")
        if dp is not None:
            per_step = t.micro_batch_size * dp
            need(t.global_batch_size % per_step == 0, "train.global_batch_size",
                 f"{t.global_batch_size} is not a multiple of micro_batch_size*data_parallel={per_step}")

        need(o.lr > 0, "optimizer.lr", "must be > 0")
        need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        need(0 <= o.beta1 < 1, "optimizer.beta1", "must be in [0, 1)")
        need(0 <= o.beta2 < 1, "optimizer.beta2", "must be in [0, 1)")
        need(o.eps > 0, "optimizer.eps", "must be > 0")
        need(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")
        need(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        need(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
        need(0 < s.decay_fraction <= 1, "schedule.decay_fraction", "must be in (0, 1]")
        need(s.write_cost_from_step >= 0, "schedule.write_cost_from_step", "must be >= 0")
        need(s.write_cost_ramp_steps >= 0, "schedule.write_cost_ramp_steps", "must be >= 0")
        need(p.precision != "bf16" or p.zero_stage >= 1, "parallel.precision",
             "bf16 needs parallel.zero_stage >= 1 (DeepSpeed keeps fp32 master weights and fp32 gradient "
             "accumulation only in its ZeRO / bf16 optimizers; ZeRO-1 costs no extra communication)")
        if p.deepspeed:
            from hope_scale.parallel.ds_config import check_overrides

            try:
                check_overrides(p.deepspeed, layout)
            except LayoutError as e:
                raise ConfigError(str(e)) from None
        resume = self.checkpoint.resume
        need(resume in ("auto", "never") or Path(resume).expanduser().exists(), "checkpoint.resume",
             f"{resume!r} is neither auto, never nor an existing checkpoint folder (or checkpoint root)")
        need(self.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        need(self.checkpoint.keep_last_n >= 1, "checkpoint.keep_last_n", "must be >= 1")
        need(self.logging.log_every >= 1, "logging.log_every", "must be >= 1")
        need(self.logging.peak_flops is None or self.logging.peak_flops > 0, "logging.peak_flops", "must be > 0")
        devices = ("auto", "cpu", *PEAK_FLOPS)
        need(self.logging.device in devices, "logging.device",
             f"{self.logging.device!r} is not one of {list(devices)} (or set logging.peak_flops)")


# ----------------------------------------------------------------------------------------------
# building and type-checking sections


def _build_model(raw: Any) -> tuple[ModelConfig, str | None]:
    if isinstance(raw, str):
        return ModelConfig.named(raw), raw
    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a name or a mapping, got {type(raw).__name__}")
    fields = dict(raw)
    name = fields.pop("name", None)
    base = ModelConfig.named(name).to_dict() if name is not None else {}
    base.update(fields)
    try:
        return ModelConfig.from_dict(base), name
    except TypeError as e:  # a wrong type that ModelConfig's own checks did not catch
        raise ConfigError(f"model: {e}") from None


def _build_data(raw: Any):
    from hope_scale.data.loader import DataConfig as LoaderDataConfig, DataConfigError

    if not isinstance(raw, dict):
        raise ConfigError(f"data: expected a mapping, got {type(raw).__name__}")
    mine = {f.name for f in dataclasses.fields(PrepareConfig)}
    loader_fields = {f.name for f in dataclasses.fields(LoaderDataConfig)}
    unknown = sorted(set(raw) - mine - loader_fields)
    if unknown:
        raise ConfigError(f"data: unknown key(s) {unknown}; known keys: {sorted(mine | loader_fields)}")
    prepare = _build_section(PrepareConfig, {k: v for k, v in raw.items() if k in mine}, "data")
    loader = _build_section(LoaderDataConfig, {k: v for k, v in raw.items() if k in loader_fields}, "data")
    try:
        loader.validate()
    except DataConfigError as e:
        raise ConfigError(str(e) if str(e).startswith("data.") else f"data: {e}") from None
    return loader, prepare


def _build_section(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    values = {}
    for name, value in raw.items():
        value = _coerce(value, hints[name], f"{where}.{name}")
        choices = fields[name].metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}.{name}: {value!r} is not one of {list(choices)}")
        values[name] = value
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field type; numbers written like ``4e-4`` (a string to PyYAML) are floats."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    container = typing.get_origin(hint) or hint
    if container in (list, dict):
        if isinstance(value, container):
            return value
        raise ConfigError(f"{where}: expected a {'list' if container is list else 'mapping'}, got {value!r}")
    raise AssertionError(f"unsupported config field type {hint} at {where}")


def _reject_non_finite(raw: Any, where: str) -> None:
    """No NaN or infinity anywhere in a config (YAML's ``.inf``/``.nan``): name the first one found."""
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"{where}: expected a finite number, got {raw!r}")
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        _reject_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))


# ----------------------------------------------------------------------------------------------
# YAML + command-line overrides


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["optimizer.lr=3e-4", "model.d_model=128"]`` -> ``[(["optimizer", "lr"], 3e-4), ...]``.

    Values are parsed as YAML (``true``, ``[1, 2]``, ``null``); ``key=`` with nothing after is an empty string.
    """
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse override value {text!r}: {e}") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``key.sub=value`` applied; a model given by name becomes ``{name: ...}``."""
    out = copy.deepcopy(raw)
    for path, value in parse_overrides(overrides):
        if path[0] == "model" and len(path) > 1 and isinstance(out.get("model"), str):
            out["model"] = {"name": out["model"]}
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path[:i + 1])}: is {child!r}, cannot set {'.'.join(path)}")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file. ``base: other.yaml`` (relative to this file's folder) inherits that config:
    mappings merge key by key, anything else (including ``model: <name>``) replaces the base's value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {path} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"base: {path} inherits from itself through {base_path}")
    return deep_merge(read_yaml(base_path, (*_seen, path.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> TrainConfig:
    """Read a YAML config (default: the embedded ``hope-tiny-cpu``), apply overrides, validate."""
    raw = read_yaml(path or DEFAULT_CONFIG)
    return TrainConfig.from_dict(apply_overrides(raw, overrides or []), world_size=world_size)
