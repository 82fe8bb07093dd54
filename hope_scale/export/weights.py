"""Read the weights of a checkpoint tensor by tensor, without its optimizer state.

``open_weights(path)`` understands what ``hope-scale`` writes:

* a trainer checkpoint root (its newest valid checkpoint, verified by the trainer's own checks) or one ``step_N``
  folder, at any layout (TP x PP x DP, ZeRO 0-3): every rank file stores, per global parameter, the box of it
  that rank owns; a weight is assembled from its boxes when it is asked for. Only the ``value`` entries are read
  (``safe_tree.open_tree``): AdamW moments and CMS buffers are never touched;
* a single consolidated file (``hope-scale train-synthetic``'s ``model.pt``, or a folder holding one), loaded
  ``weights_only`` and memory-mapped.

Invariant: ``source.tensor(name)`` is the full fp32 weight ``name`` of ``source.config``'s model, exactly what
``hope_scale.eval.checkpoint_io.load_checkpoint`` loads into it; ``source.names`` lists every parameter in the
model's order (the tied head is the embedding, not a separate entry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hope_scale.data.tokenizer import Tokenizer, load_tokenizer
from hope_scale.eval.checkpoint_io import (CHECKPOINT_FILE, CheckpointError, checkpoint_file, read_eval_checkpoint,
                                           trainer_tokenizer)
from hope_scale.model import LanguageModel, ModelConfig, build_model


@dataclass
class WeightSource:
    """A checkpoint's model config, its parameters' names and shapes, and a reader of one full weight at a time."""

    path: str  # the checkpoint used (for a checkpoint root: the step folder chosen)
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]  # parameter name -> shape, in the model's order
    read: Callable[[str], torch.Tensor]  # name -> the full fp32 weight
    tokenizer: Callable[[], Tokenizer]  # the tokenizer the model was trained with
    meta: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        t = self.read(name)
        if tuple(t.shape) != self.shapes[name]:
            raise CheckpointError(f"{self.path}: {name} has shape {tuple(t.shape)}, the model config says "
                                  f"{self.shapes[name]}")
        return t.float()


def meta_model(cfg: ModelConfig) -> LanguageModel:
    """The model of ``cfg`` on the meta device: names, shapes and modules without allocating weights."""
    with torch.device("meta"):
        return build_model(cfg)


def _parameter_shapes(cfg: ModelConfig, stored: set[str], where: str) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes, checked against the names the checkpoint stores."""
    shapes = {n: tuple(p.shape) for n, p in meta_model(cfg).named_parameters()}
    missing, unexpected = sorted(set(shapes) - stored), sorted(stored - set(shapes) - {"head.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return shapes


def open_weights(path: str | Path, log: Callable[[str], None] = print) -> WeightSource:
    """The weights of the checkpoint at ``path`` (see the module docstring); ``log`` hears which checkpoint is
    used and why newer ones were refused."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if p.is_dir() and not (p / CHECKPOINT_FILE).is_file():
        return _trainer_weights(p, log)
    return _file_weights(checkpoint_file(p))


def _file_weights(file: Path) -> WeightSource:
    payload = read_eval_checkpoint(file, mmap=True)
    cfg = ModelConfig.from_dict(payload["model_config"])
    state = payload["state_dict"]
    shapes = _parameter_shapes(cfg, set(state), str(file))
    spec = payload.get("tokenizer") or "byte"
    return WeightSource(str(file), cfg, shapes, state.__getitem__, lambda: load_tokenizer(spec),
                        dict(payload.get("meta") or {}))


def _trainer_weights(folder: Path, log: Callable[[str], None]) -> WeightSource:
    from hope_scale.train.checkpoint import CheckpointError as TrainCheckpointError
    from hope_scale.train.checkpoint import CheckpointManager, rank_file
    from hope_scale.train.safe_tree import TENSOR, UnsafeFileError, open_tree

    try:
        found = CheckpointManager(folder, log=log).load(folder)
    except TrainCheckpointError as err:
        raise CheckpointError(str(err)) from None
    if found is None:
        raise CheckpointError(f"{folder} holds no {CHECKPOINT_FILE} and no trainer checkpoint "
                              "(no step_* folder with a manifest.json)")
    log(f"checkpoint: using {found.path} (step {found.step})")
    boxes: dict[str, list[tuple[Callable[[], torch.Tensor], list]]] = {}
    global_shapes: dict[str, tuple[int, ...]] = {}
    model_config = None
    for rank in range(found.world_size):
        try:
            skeleton, read = open_tree(found.path / rank_file(rank))
        except UnsafeFileError as err:
            raise CheckpointError(str(err)) from None
        try:
            engine = skeleton["engine"]
            model_config = model_config or engine["model_config"]
            for name, entry in engine["params"].items():
                global_shapes[name] = tuple(entry["global_shape"])
                key = entry["value"][TENSOR]
                boxes.setdefault(name, []).append((lambda read=read, key=key: read(key), entry["box"]))
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{found.path / rank_file(rank)} holds no trainer weights where expected "
                                  f"(missing {err})") from None
    cfg = ModelConfig.from_dict(model_config)
    shapes = _parameter_shapes(cfg, set(boxes), str(found.path))

    def read_full(name: str) -> torch.Tensor:
        (read_box, box), *others = boxes[name]
        if not others and [tuple(b) for b in box] == [(0, n) for n in global_shapes[name]]:
            return read_box()  # one box holds all of it (a 1-process run, a replicated weight): no copy
        full = torch.zeros(global_shapes[name], dtype=torch.float32)
        covered = torch.zeros(global_shapes[name], dtype=torch.bool)
        for read_box, box in boxes[name]:
            index = tuple(slice(a, a + n) for a, n in box)
            full[index] = read_box()
            covered[index] = True
        if not bool(covered.all()):
            raise CheckpointError(f"{found.path}: {name} is not fully covered by the rank files")
        return full

    train_cfg = found.manifest.get("config") or found.trainer.get("config") or {}
    meta = {"step": found.step, "tokens": found.manifest.get("tokens"), "layout": found.manifest.get("layout")}
    return WeightSource(str(found.path), cfg, shapes, read_full,
                        lambda: trainer_tokenizer(train_cfg.get("data") or {})[0], meta)
