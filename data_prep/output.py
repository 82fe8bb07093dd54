"""The output folder of prepare-data: written in a staging folder, published atomically, never mixed.

* Shards are written by ``streaming.MDSWriter`` (zstd, sha1 + xxh64 hashes) into a hidden staging
  folder next to the output; the manifest is written last; only then is the staging folder renamed
  to the output path. An interrupted run leaves the output untouched (and removes its staging folder
  unless killed outright).
* Idempotence: the manifest records a fingerprint of the arguments and inputs. Re-running with the
  same fingerprint is a no-op; with a different one it is refused unless ``overwrite`` is set, in
  which case the old dataset is replaced only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from hope_scale.data.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARD_HASHES,
    SPLITS,
    TOKENS_COLUMN,
    read_manifest,
    verify_split,
    write_manifest,
)


class OutputExistsError(RuntimeError):
    """The output folder holds something else than the dataset these arguments would produce."""


def fingerprint(config: dict[str, Any], inputs: list[Any]) -> str:
    """SHA-256 of the canonical JSON of what determines the dataset's content."""
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _differences(old: dict[str, Any], config: dict[str, Any], inputs: list[Any]) -> list[str]:
    diffs = [
        f"{key}: {old.get('config', {}).get(key)!r} -> {config.get(key)!r}"
        for key in sorted(set(old.get("config", {})) | set(config))
        if old.get("config", {}).get(key) != config.get(key)
    ]
    if old.get("inputs") != json.loads(json.dumps(inputs, default=str)):
        diffs.append("input files or their sizes / modification times changed")
    return diffs


def check_existing(out_dir: Path, config: dict[str, Any], inputs: list[Any], overwrite: bool) -> dict[str, Any] | None:
    """Return the existing manifest if ``out_dir`` already holds exactly this dataset, else None.

    Raises ``OutputExistsError`` if ``out_dir`` holds anything else and ``overwrite`` is not set.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder")
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest["fingerprint"] == fingerprint(config, inputs):
        broken = [p for split in SPLITS for p in verify_split(out_dir / split, hash_algo=None)]
        if not broken:
            return manifest
        if not overwrite:
            raise OutputExistsError(
                f"{out_dir} holds this dataset but some shards are missing or damaged "
                f"({broken[0]}); re-run with --overwrite to rebuild it"
            )
        return None
    if overwrite or not any(out_dir.iterdir()):
        return None
    if manifest is None:
        raise OutputExistsError(
            f"{out_dir} is not empty and holds no prepared dataset; choose a new output folder or pass --overwrite"
        )
    diffs = "; ".join(_differences(manifest, config, inputs))
    raise OutputExistsError(
        f"{out_dir} holds a dataset prepared with different arguments or inputs ({diffs}); refusing to mix "
        "them: choose a new output folder or pass --overwrite"
    )


class DatasetWriter:
    """Writes the ``train`` and ``val`` MDS splits to a staging folder and publishes them atomically."""

    def __init__(self, out_dir: Path, sample_len: int, dtype: np.dtype, shard_size_bytes: int, compression: str = "zstd"):
        from streaming import MDSWriter

        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out_dir.parent / f".{self.out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.sample_len = sample_len
        self.dtype = np.dtype(dtype)
        columns = {TOKENS_COLUMN: f"ndarray:{self.dtype.name}:{sample_len}"}
        self._writers = {
            split: MDSWriter(
                out=str(self.staging / split),
                columns=columns,
                compression=compression,
                hashes=list(SHARD_HASHES),
                size_limit=shard_size_bytes,
                max_workers=1,
            )
            for split in SPLITS
        }

    def write(self, split: str, samples: np.ndarray) -> None:
        """Append samples (rows of ``sample_len`` token ids) to ``split``."""
        writer = self._writers[split]
        for row in samples.astype(self.dtype, copy=False):
            writer.write({TOKENS_COLUMN: row})

    def commit(self, manifest: dict[str, Any]) -> None:
        """Finish the shards, write the manifest, then move the staging folder to ``out_dir``."""
        for writer in self._writers.values():
            writer.finish()
        write_manifest(self.staging, {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest})
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
        os.rename(self.staging, self.out_dir)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        """Discard everything written; ``out_dir`` is left as it was."""
        for writer in self._writers.values():
            writer.cancel_future_jobs()
        shutil.rmtree(self.staging, ignore_errors=True)
