"""A nested structure of JSON values and tensors in one safetensors file: loading it never runs code.

Checkpoint rank files are such structures (``TrainEngine.export_state`` + RNG states). ``save_tree`` stores
every tensor of ``tree`` as a safetensors entry and the rest of the structure as JSON in the file's metadata,
each tensor replaced by ``{"__tensor__": key}``; ``load_tree`` rebuilds the structure. safetensors files hold
raw tensor bytes and a JSON header, nothing executable, so a checkpoint folder handed over by someone else
cannot run code (a pickle-based ``torch.load`` could). Tensors are memory-mapped on load: only the bytes a
reader touches are read, which is what resharding relies on.

Invariant: ``load_tree(p)`` equals the ``tree`` given to ``save_tree(tree, p)`` with tuples turned into
lists and dict keys into strings (JSON's types); tensors keep dtype, shape and values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TENSOR = "__tensor__"
_META_KEY = "hope-scale/tree"


class UnsafeFileError(ValueError):
    """A file that should be a safetensors tree is something else (e.g. a pickle): it was not loaded."""


def save_tree(tree: Any, path: str | os.PathLike) -> None:
    """Write ``tree`` (dicts, lists, tuples, str, int, float, bool, None and tensors) to ``path``, fsynced; a
    failed write (full disk, ...) raises OSError."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def strip(node: Any) -> Any:
        if torch.is_tensor(node):
            key = f"t{len(tensors)}"
            t = node.detach().cpu()
            # safetensors refuses tensors that share storage: a view of a larger tensor is copied
            whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
            tensors[key] = t if whole else t.contiguous().clone()
            return {TENSOR: key}
        if isinstance(node, dict):
            return {str(k): strip(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [strip(v) for v in node]
        if node is None or isinstance(node, (str, int, float, bool)):
            return node
        raise TypeError(f"save_tree: cannot store a {type(node).__name__} (only JSON values and tensors)")

    from safetensors import SafetensorError

    skeleton = json.dumps(strip(tree))
    try:
        save_file(tensors, str(path), metadata={_META_KEY: skeleton})
    except SafetensorError as err:  # safetensors reports a failed write (full disk, ...) as its own error
        if "I/O error" in str(err):
            raise OSError(f"cannot write {path}: {err}") from None
        raise
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def open_tree(path: str | os.PathLike) -> tuple[Any, Callable[[str], torch.Tensor]]:
    """The structure ``save_tree`` wrote to ``path`` with every tensor left as a ``{"__tensor__": key}`` reference,
    and ``read(key)``, which reads that one tensor: what lets a reader touch only the tensors it needs (export reads
    the weights of a checkpoint without its optimizer state). Each ``read`` maps the file anew, so a tensor's pages
    are released with the tensor. Raises UnsafeFileError if the file is not such a safetensors file, without
    interpreting its contents in any other way."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            skeleton = (handle.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError) as err:
        raise UnsafeFileError(f"{path} is not a safetensors file ({err}); not loaded") from None
    if skeleton is None:
        raise UnsafeFileError(f"{path} is a safetensors file without a hope-scale structure; not loaded")

    def read(key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    return json.loads(skeleton), read


def load_tree(path: str | os.PathLike) -> Any:
    """The structure ``save_tree`` wrote to ``path`` (tensors memory-mapped). Raises UnsafeFileError if the
    file is not such a safetensors file, without interpreting its contents in any other way."""
    from safetensors import safe_open

    skeleton, _ = open_tree(path)
    handle = safe_open(str(path), framework="pt", device="cpu")  # one mapping for all tensors

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {TENSOR}:
                return handle.get_tensor(node[TENSOR])
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    return fill(skeleton)
