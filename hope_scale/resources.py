"""Where the named configs are, in a source checkout and in an installed wheel.

The YAML files live in ``configs/model`` and ``configs/train`` at the repository root (the paths the README and
the launch scripts use). A wheel ships the same files as package data under ``hope_scale/configs``
(``pyproject.toml`` maps that package onto ``configs/``), so ``pip install .`` finds the named models and the
default training config too. A source checkout's folder wins, so an editable install reads the files you edit.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[1] / "configs"


def config_dir(kind: str) -> Path:
    """The folder of the named ``kind`` configs ("model" or "train")."""
    if (_SOURCE / kind).is_dir():
        return _SOURCE / kind
    return Path(str(resources.files("hope_scale.configs") / kind))
