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

(b) **Trainer checkpoints** (``hope_scale/train/checkpoint.py``: ``latest`` + ``step_N/`` folders with a
    manifest, ``trainer.json`` and one ``rank_*.safetensors`` per rank). ``path`` is the checkpoint root (the newest
    valid checkpoint is used) or one ``step_N`` folder; the files are verified with the trainer's own
    checks, and the sharded weights of any parallel layout are consolidated into one model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable
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


def eager(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``model.compile`` off: a model loaded for evaluation or generation runs eager (compiling costs
    minutes on a CPU, and again for every new sequence length of a recurrent step); the outputs are the same."""
    return dataclasses.replace(cfg, compile=False)


def checkpoint_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p / CHECKPOINT_FILE if p.is_dir() or str(path).endswith(os.sep) else p


def save_checkpoint(path: str | os.PathLike, model: LanguageModel, tokenizer: Tokenizer | dict | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + weights), its tokenizer spec and ``meta`` atomically; returns the file.

    ``path`` is a file name, or an existing folder / a name ending in ``/`` (then ``<path>/model.pt``).
    """
    target = checkpoint_file(path)
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


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, log: Callable[[str], None] = _to_stderr) -> LoadedModel:
    """Load a checkpoint of any supported format into an eval-mode model on ``device``. ``log`` (stderr by
    default) is told which checkpoint is used and, for a trainer checkpoint root, why newer ones were refused."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if p.is_dir() and not (p / CHECKPOINT_FILE).is_file():
        loaded = _load_trainer_checkpoint(p, device, log)
    else:
        loaded = _load_eval_checkpoint(checkpoint_file(p))
    log(f"checkpoint: using {loaded.path}" + (f" (step {loaded.meta['step']})" if "step" in loaded.meta else ""))
    if dtype is not None:
        loaded.model.to(dtype=dtype)
    loaded.model.to(device).eval()
    return loaded


def read_eval_checkpoint(file: Path, mmap: bool = False) -> dict[str, Any]:
    """The checked payload of an evaluation checkpoint file (``weights_only`` loading: plain containers and
    tensors only); with ``mmap`` the tensors are memory-mapped, read when touched."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated file, not a torch file, ...
        raise CheckpointError(f"{file} is not a readable checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file} is not a {FORMAT_NAME} file (format={payload.get('format') if isinstance(payload, dict) else type(payload).__name__})")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unsupported checkpoint version {payload.get('version')}")
    return payload


def _load_eval_checkpoint(file: Path) -> LoadedModel:
    payload = read_eval_checkpoint(file)
    cfg = eager(ModelConfig.from_dict(payload["model_config"]))
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the recorded config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    tokenizer = load_tokenizer(payload.get("tokenizer") or "byte")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{file}: tokenizer vocabulary {tokenizer.vocab_size} > model vocab {cfg.vocab_size}")
    return LoadedModel(model, tokenizer, cfg, str(file), FORMAT_NAME, dict(payload.get("meta") or {}))


def _load_trainer_checkpoint(folder: Path, device, log: Callable[[str], None]) -> LoadedModel:
    """A trainer checkpoint (``hope_scale/train/checkpoint.py``): ``folder`` is a checkpoint root (its newest
    valid checkpoint is used) or one ``step_N`` folder. Files are verified (sizes, sha256) by the trainer's
    own manager; the sharded fp32 weights of all rank files are consolidated into one model (any layout:
    TP/PP/DP/ZeRO), and the tokenizer is the one the training data was prepared with."""
    try:
        from hope_scale.parallel.engine import consolidate_full_state
        from hope_scale.train.checkpoint import FORMAT as TRAIN_FORMAT
        from hope_scale.train.checkpoint import CheckpointError as TrainCheckpointError
        from hope_scale.train.checkpoint import CheckpointManager
    except ImportError as err:
        raise CheckpointError(f"{folder} holds no {CHECKPOINT_FILE}, and the trainer's checkpoint code "
                              f"(hope_scale.train) cannot be imported: {err}") from None
    messages: list[str] = []

    def record(message: str) -> None:  # a refused newer checkpoint is said at once, and kept in the result
        messages.append(message)
        log(message)

    manager = CheckpointManager(folder, log=record)
    try:
        found = manager.load(folder)
    except TrainCheckpointError as err:
        raise CheckpointError(f"{err}; " + " | ".join(messages)) from None
    if found is None:
        raise CheckpointError(f"{folder} holds no {CHECKPOINT_FILE} and no trainer checkpoint "
                              "(no step_* folder with a manifest.json)")
    try:
        engines = [part["engine"] for part in found.rank_parts()]
        cfg = eager(ModelConfig.from_dict(engines[0]["model_config"]))
        full = consolidate_full_state(engines, "value")
    except TrainCheckpointError as err:
        raise CheckpointError(str(err)) from None
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{found.path}: cannot assemble the model weights from the rank files: {err}") from err
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if cfg.tie_embeddings:
        missing = [m for m in missing if m != "head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{found.path}: weights do not match the model config "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    train_cfg = found.manifest.get("config") or found.trainer.get("config") or {}
    tokenizer, tok_source = trainer_tokenizer(train_cfg.get("data") or {})
    meta = {"step": found.step, "tokens": found.manifest.get("tokens"), "model_name": found.manifest.get("model_name"),
            "layout": found.manifest.get("layout"), "tokenizer_source": tok_source, "messages": messages}
    return LoadedModel(model, tokenizer, cfg, str(found.path), TRAIN_FORMAT, meta)


def trainer_tokenizer(data_cfg: dict) -> tuple[Tokenizer, str]:
    """The tokenizer of a training run: the one recorded in its prepared dataset's manifest when that folder
    is readable, else the run's ``data.tokenizer`` setting (``byte`` by default)."""
    from hope_scale.data.manifest import read_manifest

    path = data_cfg.get("path")
    if path and "://" not in str(path) and Path(path).is_dir():
        manifest = read_manifest(path)
        if manifest and manifest.get("tokenizer"):
            spec = dict(manifest["tokenizer"])
            if spec.get("kind") == "hf" and not Path(spec.get("source", "")).exists():
                spec["source"] = str(Path(path) / "tokenizer.json")  # the copy kept next to the shards
            return load_tokenizer(spec), f"dataset manifest {Path(path) / 'hope_data.json'}"
    return load_tokenizer(data_cfg.get("tokenizer") or "byte"), "data.tokenizer of the training config"
