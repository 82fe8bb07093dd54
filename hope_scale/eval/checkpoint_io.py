"""Load a model for evaluation from a checkpoint: the one place every ``eval`` task goes through.

Formats understood:

(a) **Single-process evaluation checkpoints** (``FORMAT_NAME``), written by ``save_checkpoint`` from
    ``hope-scale train-synthetic`` and the continual-learning benchmark. One ``torch.save`` file holding
    a plain dict (loadable with ``weights_only=True``)::

        {"format": "hope-scale-eval-checkpoint", "version": 1,
         "model_config": ModelConfig.to_dict(), "state_dict": {...},
         "tokenizer": Tokenizer.to_spec(), "meta": {...free-form JSON-able info...}}

    ``path`` may be the file itself or a folder holding ``model.pt``. It is written atomically (temporary
    file in the same folder, fsync, rename), so a reader never sees half a checkpoint.

(b) **Trainer checkpoints** (``hope_scale/train``, sharded with a manifest). Until that format lands,
    a folder that is not (a) is rejected with an error that says so (see ``_load_trainer_checkpoint``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hope_scale.data.tokenizer import Tokenizer, load_tokenizer
from hope_scale.model import LanguageModel, ModelConfig, build_model

FORMAT_NAME = "hope-scale-eval-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "model.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or in a format this loader does not understand."""


@dataclass
class LoadedModel:
    """A model ready for evaluation, with the tokenizer it was trained with and what was recorded."""

    model: LanguageModel
    tokenizer: Tokenizer
    config: ModelConfig
    path: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for result files."""
        return {
            "path": self.path,
            "format": self.format,
            "arch": self.config.arch,
            "parameters": self.model.num_parameters(),
            "model_config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_spec(),
            "meta": self.meta,
        }


def _checkpoint_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p / CHECKPOINT_FILE if p.is_dir() or str(path).endswith(os.sep) else p


def save_checkpoint(path: str | os.PathLike, model: LanguageModel, tokenizer: Tokenizer | dict | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + weights), its tokenizer spec and ``meta`` atomically; returns the file.

    ``path`` is a file name, or an existing folder / a name ending in ``/`` (then ``<path>/model.pt``).
    """
    target = _checkpoint_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = load_tokenizer("byte")
    spec = tokenizer if isinstance(tokenizer, dict) else tokenizer.to_spec()
    if spec.get("vocab_size", 0) > model.cfg.vocab_size:
        raise CheckpointError(f"tokenizer vocabulary ({spec['vocab_size']}) is larger than the model's "
                              f"({model.cfg.vocab_size})")
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer": spec,
        "meta": json.loads(json.dumps(meta or {}, default=str)),  # JSON-able only: weights_only loading
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a checkpoint of any supported format into an eval-mode model on ``device``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if p.is_dir() and not (p / CHECKPOINT_FILE).is_file():
        loaded = _load_trainer_checkpoint(p, device)
    else:
        loaded = _load_eval_checkpoint(_checkpoint_file(p))
    if dtype is not None:
        loaded.model.to(dtype=dtype)
    loaded.model.to(device).eval()
    return loaded


def _load_eval_checkpoint(file: Path) -> LoadedModel:
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, not a torch file, ...
        raise CheckpointError(f"{file} is not a readable checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file} is not a {FORMAT_NAME} file (format={payload.get('format') if isinstance(payload, dict) else type(payload).__name__})")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unsupported checkpoint version {payload.get('version')}")
    cfg = ModelConfig.from_dict(payload["model_config"])
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the recorded config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    tokenizer = load_tokenizer(payload.get("tokenizer") or "byte")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{file}: tokenizer vocabulary {tokenizer.vocab_size} > model vocab {cfg.vocab_size}")
    return LoadedModel(model, tokenizer, cfg, str(file), FORMAT_NAME, dict(payload.get("meta") or {}))


def _load_trainer_checkpoint(folder: Path, device) -> LoadedModel:
    """Trainer checkpoints (``hope_scale/train``): not readable yet, their format has not landed."""
    try:
        import hope_scale.train.checkpoint  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"{folder} holds no {CHECKPOINT_FILE}; the trainer's sharded checkpoint format "
            "(hope_scale/train) is not available in this version, so only single-process evaluation "
            "checkpoints (hope-scale train-synthetic / eval continual --save-dir) can be loaded") from None
    raise CheckpointError(f"{folder}: loading trainer checkpoints is not wired into hope_scale.eval yet")
