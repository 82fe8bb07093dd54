"""Where the named configs are, in a source checkout and in an installed wheel.

The YAML files live in ``configs/model`` and ``configs/train`` at the repository root (the paths the README and
the launch scripts use). A wheel ships the same files as package data under ``hope_scale/configs``
(``pyproject.toml`` maps that package onto ``configs/``), so ``pip install .`` finds the named models and the
default training config too. A source checkout's folder wins, so an editable install reads the files you edit.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hope_scale.model import ConfigError, ModelConfig

_SOURCE = Path(__file__).resolve().parents[1] / "configs"


def config_dir(kind: str) -> Path:
    """The folder of the named ``kind`` configs ("model" or "train")."""
    if (_SOURCE / kind).is_dir():
        return _SOURCE / kind
    return Path(str(resources.files("hope_scale.configs") / kind))


def named_model_config(name: str) -> ModelConfig:
    """The model config ``<config_dir("model")>/<name>.yaml`` (e.g. ``hope-tiny``); ConfigError naming the known
    ones if there is none."""
    path = config_dir("model") / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in config_dir("model").glob("*.yaml"))
        raise ConfigError(f"model: no named config {name!r}; known: {known}")
    return ModelConfig.from_yaml(path)
