"""The on-disk layout of a prepared dataset, shared by ``data_prep`` (writer) and the loader (reader).

A prepared dataset is one folder::

    <root>/hope_data.json        manifest: tokenizer, seq_len, counts, fingerprint of arguments + inputs
    <root>/train/index.json      mosaicml-streaming MDS index (written last)
    <root>/train/shard.*.mds.zstd
    <root>/val/...               same for the validation split
    <root>/tokenizer.json        copy of the tokenizer, when it is a Hugging Face one

Every sample is one column, ``tokens``: ``seq_len + 1`` token ids (uint16 when the vocabulary fits,
else int32). The manifest is written last, so a folder with a manifest is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "hope_data.json"
FORMAT_NAME = "hope-scale-mds"
FORMAT_VERSION = 1
TOKENS_COLUMN = "tokens"
SPLITS = ("train", "val")
SHARD_HASHES = ("sha1", "xxh64")  # sha1 for offline audits, xxh64 (fast) for load-time checks


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of the dataset at ``root``, or None if there is none (not prepared, or incomplete)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported dataset format version {manifest.get('version')}")
    return manifest


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (temporary file + rename)."""
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def shard_files(split_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every file the MDS index of ``split_dir`` lists: ``{"basename", "bytes", "hashes"}``."""
    index = json.loads((Path(split_dir) / "index.json").read_text())
    files = []
    for shard in index["shards"]:
        files.append(shard["zip_data"] or shard["raw_data"])
    return files


def verify_split(split_dir: str | os.PathLike, *, hash_algo: str | None = "xxh64") -> list[str]:
    """Problems found with the shards of one split: missing files, wrong sizes, hash mismatches.

    With ``hash_algo=None`` only presence and sizes are checked (fast).
    """
    problems = []
    for info in shard_files(split_dir):
        path = Path(split_dir) / info["basename"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, index says {info['bytes']}")
        elif hash_algo and hash_bytes(hash_algo, path.read_bytes()) != info["hashes"][hash_algo]:
            problems.append(f"{path}: {hash_algo} checksum mismatch (corrupt shard)")
    return problems


def hash_bytes(algo: str, data: bytes) -> str:
    """Hex digest of ``data`` with one of streaming's hash algorithms (``SHARD_HASHES``)."""
    from streaming.base.hashing import get_hash  # imported here: `import streaming` takes seconds

    return get_hash(algo, data)
