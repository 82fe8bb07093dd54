"""Write weights as safetensors one group of tensors at a time, sharded the Hugging Face way when large.

The ``safetensors`` library's ``save_file`` needs every tensor in memory at once; an export must not (its peak
memory stays near the largest weight, not the model). The format is simple enough to stream: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then the raw bytes in
that order. Shapes and dtypes are known before any tensor is computed, so the header is written first and each
tensor's bytes follow as soon as it is made. The files are read back by ``safetensors.safe_open`` (the tests do).

Above ``max_shard_bytes`` the tensors go to ``model-0000i-of-0000n.safetensors`` with a
``model.safetensors.index.json`` naming each tensor's file, as ``transformers`` writes and reads them; otherwise
to one ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64", torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size ("5GB")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class TensorGroup:
    """Tensors made together (e.g. an int8 weight and its scales, from one read of the source weight)."""

    specs: list[TensorSpec]
    make: Callable[[], dict[str, torch.Tensor]]  # name -> tensor, one per spec, with its shape and dtype


def _fsync_write(path: Path, write: Callable[[object], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_file(path: Path, groups: Sequence[TensorGroup], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for group in groups:
        for spec in group.specs:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def write(f) -> None:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for group in groups:
            made = group.make()
            for spec in group.specs:
                t = made[spec.name]
                if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                    raise ValueError(f"{spec.name}: made {tuple(t.shape)} {t.dtype}, declared {spec.shape} {spec.dtype}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del made

    _fsync_write(path, write)


def write_safetensors(folder: Path, groups: Sequence[TensorGroup], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``groups`` under ``folder`` (one file, or shards + index above ``max_shard_bytes``); returns the file
    names written. A group is never split across shards."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this machine is big-endian")
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[TensorGroup]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(s.nbytes for s in group.specs)
        if shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += group_bytes
    if len(shards) == 1:
        _write_file(folder / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_file(folder / name, shard, metadata)
        weight_map.update({spec.name: name for group in shard for spec in group.specs})
    total = sum(s.nbytes for group in groups for s in group.specs)
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    _fsync_write(folder / INDEX_FILE, lambda f: f.write(index.encode("utf-8")))
    return [*names, INDEX_FILE]
