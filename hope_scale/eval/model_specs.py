"""Model configurations from short command-line specs, for training small models from scratch.

A spec is a named config (``hope-tiny``), a YAML path, or an architecture name (``hope``, ``titans``,
``transformer``, ``hope_attention``, ``transformer++`` = ``transformer``), optionally followed by
``:key=value,key=value`` overrides of ``ModelConfig`` fields. ``cms_levels`` is written as
``period/hidden_mult`` items joined by ``+``: ``hope:d_model=64,cms_levels=64/2+1024/2``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hope_scale.model import ModelConfig
from hope_scale.model.config import ARCHITECTURES, ConfigError

ARCH_ALIASES = {"transformer++": "transformer", "hope-attention": "hope_attention"}


def parse_cms_levels(text: str) -> list[dict]:
    """``"64/2+1024/2"`` -> ``[{"period": 64, "hidden_mult": 2.0}, {"period": 1024, "hidden_mult": 2.0}]``."""
    levels = []
    for item in text.split("+"):
        period, _, mult = item.partition("/")
        try:
            levels.append({"period": int(period), "hidden_mult": float(mult) if mult else 2.0})
        except ValueError:
            raise ConfigError(f"cms_levels item {item!r} is not PERIOD/HIDDEN_MULT") from None
    return levels


def _coerce(name: str, value: str):
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if name not in fields:
        raise ConfigError(f"unknown model field {name!r} in override; known: {sorted(fields)}")
    if name == "cms_levels":
        return parse_cms_levels(value)
    default = getattr(ModelConfig(arch="hope"), name)
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int) or name == "head_dim":
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def parse_field_overrides(text: str) -> dict:
    """``"d_model=64,alpha_init=0.999"`` -> ``{"d_model": 64, "alpha_init": 0.999}``, typed by ModelConfig's fields."""
    out = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip()] = _coerce(key.strip(), value.strip())
    return out


def config_from_spec(spec: str, **overrides) -> ModelConfig:
    """Build a ModelConfig from ``spec`` (see module doc); keyword overrides are applied last."""
    base, _, over = spec.partition(":")
    base = ARCH_ALIASES.get(base, base)
    if base in ARCHITECTURES:
        d = ModelConfig(arch=base).to_dict()
    elif base.endswith((".yaml", ".yml")) or Path(base).is_file():
        d = ModelConfig.from_yaml(base).to_dict()
    else:
        d = ModelConfig.named(base).to_dict()
    d.update(parse_field_overrides(over))
    d.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(d)
