"""Sharded, atomic, checksummed training checkpoints.

Layout of ``checkpoint.dir`` (a filesystem every rank can reach: node-local only for single-node runs)::

    latest                      text file naming the newest complete checkpoint ("step_00000200")
    step_00000200/
        manifest.json           step, tokens, layout, world size, config, sha256 + size of every file below
        trainer.json            run state written by rank 0: step and token counters, data-loader state
        rank_00000.safetensors  what each rank exported: its slice of the fp32 weights and AdamW moments keyed
        rank_00001.safetensors  by global parameter name (TrainEngine.export_state), CMS schedule, RNG states
    .tmp-step_00000250/         a save in progress (or one killed mid-way): never read, removed by the next save

Nothing in a checkpoint is pickled: rank files are safetensors (tensors + a JSON structure, ``safe_tree``), the
rest is JSON, so loading a checkpoint someone else wrote cannot run code. Folders of the older pickle-based
format (v1) are refused with a message rather than loaded.

Saving (collective, every rank calls ``save``): rank 0 makes the temporary folder; each rank writes its file,
fsyncs it and hashes what is on disk; rank 0 gathers the hashes, writes ``trainer.json`` and ``manifest.json``
(fsynced), renames the folder to ``step_N`` (atomic), fsyncs the parent, then replaces ``latest`` through a
fsynced temporary file (atomic). A process killed at any point leaves either the previous checkpoint as
``latest`` or the new one complete. Older checkpoints beyond ``keep_last_n`` are deleted afterwards.

Loading: rank 0 checks the candidates newest first (``latest``, then every ``step_*`` folder by step): the
manifest must parse and every file must exist with the recorded size and sha256. A checkpoint that fails is
reported (which file, what is wrong) and skipped; the newest valid one is used, and its path is broadcast so
every rank reads the same checkpoint. Each rank then assembles its own slices from all rank files
(memory-mapped, so only the bytes it needs are read) -- which is what lets a checkpoint saved at one parallel
layout (TP x PP x DP, ZeRO stage) resume at another.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .safe_tree import UnsafeFileError, load_tree, save_tree

FORMAT = "hope-scale/checkpoint/v2"
PICKLE_FORMATS = ("hope-scale/checkpoint/v1",)  # torch.save files: never loaded (a pickle can run code)
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required, or a checkpoint that fails verification."""


class SaveFailedError(CheckpointError):
    """A save did not complete (nothing of it is left behind); the run's state and earlier checkpoints are intact."""


class NonFiniteStateError(CheckpointError):
    """A state holding NaN or infinity was not saved."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------
# small collective helpers that also work without an initialized process group


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _gather_to_all(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# file primitives


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(path: Path) -> dict[str, Any]:
    """A written file as the manifest records it: size and sha256 of what is on disk."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _first_non_finite(tree: Any, where: str = "") -> str | None:
    """The path of the first floating-point tensor in ``tree`` holding NaN or infinity, else None."""
    if torch.is_tensor(tree):
        return where if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _write_text_fsynced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    _write_text_fsynced(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------
# RNG state


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as JSON values and tensors (what ``save_tree`` stores)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its folder, manifest, rank 0's trainer state, and lazy access to rank files."""

    path: Path
    manifest: dict[str, Any]
    trainer: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    def rank_part(self, rank: int) -> dict[str, Any]:
        """The file saved by ``rank`` (memory-mapped: tensors are read when touched)."""
        try:
            return load_tree(self.path / rank_file(rank))
        except UnsafeFileError as err:
            raise CheckpointError(f"checkpoint {self.path}: {err}") from None

    def rank_parts(self) -> Iterator[dict[str, Any]]:
        for r in range(self.world_size):
            yield self.rank_part(r)


class CheckpointManager:
    """Save and find checkpoints under ``root`` (see module docstring). ``log`` receives messages on rank 0."""

    def __init__(self, root: str | os.PathLike, keep_last_n: int = 3, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.keep_last_n = keep_last_n
        self.log = log

    # -- saving ----------------------------------------------------------------------------------
    def save(self, step: int, rank_state: dict[str, Any], trainer_state: dict[str, Any],
             meta: dict[str, Any] | None = None, need_bytes: int = 0,
             _hook: Callable[[str], None] | None = None) -> Path:
        """Write checkpoint ``step`` (collective). ``rank_state`` is this rank's payload; ``trainer_state`` and
        ``meta`` (JSON-able, copied into the manifest) are taken from rank 0. Returns the final folder.

        Never leaves a bad state behind, and raises the same error on every rank:

        * NonFiniteStateError, before anything is written, if any rank's state holds NaN or infinity;
        * SaveFailedError if a write fails on any rank (full disk, lost permission, ...): the partial folder is
          removed, earlier checkpoints and ``latest`` are untouched, the caller's state is unchanged. When the
          filesystem has less than ``need_bytes`` free, the checkpoints ``keep_last_n`` would delete after this
          save are deleted first (never the newest); if that is not enough, nothing is written.
        """
        rank, world = _rank(), _world()
        bad = [b for b in _gather_to_all(_first_non_finite(rank_state)) if b]
        if bad:
            raise NonFiniteStateError(f"checkpoint step {step} not saved: {bad[0]} holds NaN or infinity "
                                      f"(latest is still {self.latest_name() or 'none'})")
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error = None
        if rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(f"{TMP_PREFIX}step_*"):  # saves killed mid-way
                    shutil.rmtree(stale, ignore_errors=True)
                error = self._make_room(need_bytes)
                if error is None:
                    tmp.mkdir()
            except OSError as err:
                error = f"cannot create {tmp}: {err}"
        error = _broadcast(error)
        if error is None:
            started = time.perf_counter()
            entry = None
            try:
                save_tree(rank_state, tmp / rank_file(rank))
                entry = _describe(tmp / rank_file(rank))
            except OSError as err:
                error = f"rank {rank} could not write {tmp / rank_file(rank)}: {err}"
            if _hook is not None:
                _hook("rank_file_written")
            entries = _gather_to_all((rank_file(rank), entry, error))
            if rank == 0:
                error = next((e for _, _, e in entries if e), None)
                if error is None:
                    try:
                        self._complete(step, world, tmp, final, {n: e for n, e, _ in entries}, trainer_state, meta,
                                       started, _hook)
                    except OSError as err:
                        error = f"could not complete {tmp}: {err}"
                if error is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    if not tmp.exists() and final.exists() and self.latest_name() != final.name:
                        shutil.rmtree(final, ignore_errors=True)  # renamed, but `latest` could not be updated
            error = _broadcast(error)
        if error is not None:
            raise SaveFailedError(f"checkpoint step {step} NOT saved: {error}; removed the partial folder, "
                                  f"latest is still {self.latest_name() or 'none'}")
        return final

    def _complete(self, step, world, tmp, final, files, trainer_state, meta, started, _hook) -> None:
        """Rank 0, every rank file written: trainer state and manifest, rename, ``latest``, pruning."""
        _write_text_fsynced(tmp / TRAINER_FILE, json.dumps(trainer_state))
        files[TRAINER_FILE] = _describe(tmp / TRAINER_FILE)
        manifest = {"format": FORMAT, "step": step, "world_size": world, "created": time.time(),
                    **(meta or {}), "files": files}
        _write_text_fsynced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        fsync_dir(tmp)
        if _hook is not None:
            _hook("before_rename")
        if final.exists():  # e.g. a corrupt checkpoint of this step that the run resumed before
            trash = self.root / f"{TMP_PREFIX}old-{final.name}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.root)
        if _hook is not None:
            _hook("before_latest")
        _write_text_atomic(self.root / LATEST, final.name + "\n")
        for old in self.prunable(saving=False):
            shutil.rmtree(old, ignore_errors=True)
        size = sum(e["bytes"] for e in files.values())
        self.log(f"checkpoint: saved {final} ({size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s)")

    def prunable(self, saving: bool = True) -> list[Path]:
        """Checkpoints ``keep_last_n`` lets go, oldest first, never the one ``latest`` names: those beyond the
        newest ``keep_last_n`` counting the one being saved (``saving``) or once it is saved and ``latest``."""
        steps = sorted(self._step_dirs(), key=self._step_of)
        others = [p for p in steps if p.name != self.latest_name()]
        return others[: max(0, len(steps) + int(saving) - self.keep_last_n)]

    def free_bytes(self, reclaim: bool = False) -> int:
        """Free bytes on the checkpoint filesystem, plus what deleting ``prunable()`` would give if ``reclaim``."""
        probe = self.root if self.root.exists() else next(p for p in self.root.parents if p.exists())
        free = shutil.disk_usage(probe).free
        return free + (sum(_folder_bytes(p) for p in self.prunable()) if reclaim else 0)

    def _make_room(self, need_bytes: int) -> str | None:
        """Rank 0 before a save: delete what ``prunable()`` allows while less than ``need_bytes`` is free; an
        error message if even that is not enough."""
        for old in self.prunable():
            if self.free_bytes() >= need_bytes:
                break
            self.log(f"checkpoint: {self.free_bytes() / 2**30:.2f} GiB free, {need_bytes / 2**30:.2f} GiB needed: "
                     f"removing {old.name} before writing (keep_last_n={self.keep_last_n} lets it go)")
            shutil.rmtree(old, ignore_errors=True)
        free = self.free_bytes()
        if free < need_bytes:
            return (f"{self.root} has {free / 2**30:.2f} GiB free, a checkpoint needs about {need_bytes / 2**30:.2f} "
                    f"GiB (keep_last_n={self.keep_last_n} allows no further deletion)")
        return None

    def latest_name(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    # -- finding and verifying ---------------------------------------------------------------------
    @staticmethod
    def _step_of(path: Path) -> int:
        m = STEP_DIR.match(path.name)
        return int(m.group(1)) if m else -1

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]

    def candidates(self) -> list[Path]:
        """Checkpoint folders to try, best first: the one ``latest`` names, then all by decreasing step."""
        ordered = sorted(self._step_dirs(), key=self._step_of, reverse=True)
        if self.latest_name():
            named = self.root / self.latest_name()
            if named in ordered:
                ordered.remove(named)
                ordered.insert(0, named)
        return ordered

    @staticmethod
    def verify(path: Path) -> list[str]:
        """Problems with checkpoint folder ``path`` (empty if it is complete and intact)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return [f"{manifest_path} is missing (incomplete save)"]
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return [f"{manifest_path} is not valid JSON ({e})"]
        if manifest.get("format") in PICKLE_FORMATS:
            return [f"{manifest_path}: format {manifest['format']!r} stores pickled files, which can run code when "
                    "loaded, so it is not loaded (resume it with the hope-scale version that wrote it, or start over)"]
        if manifest.get("format") != FORMAT:
            return [f"{manifest_path}: unknown format {manifest.get('format')!r}"]
        problems = []
        expected = {rank_file(r) for r in range(int(manifest.get("world_size", 0)))} | {TRAINER_FILE}
        missing_entries = sorted(expected - set(manifest.get("files", {})))
        if missing_entries:
            problems.append(f"{manifest_path} lists no entry for {missing_entries}")
        for name, info in sorted(manifest.get("files", {}).items()):
            f = path / name
            if not f.is_file():
                problems.append(f"{f} is missing")
            elif f.stat().st_size != info["bytes"]:
                problems.append(f"{f} has {f.stat().st_size} bytes, the manifest says {info['bytes']} (truncated?)")
            elif sha256_file(f) != info["sha256"]:
                problems.append(f"{f} fails its sha256 checksum (corrupted)")
        return problems

    def find_valid(self, path: str | os.PathLike | None = None) -> Path | None:
        """The newest checkpoint that passes ``verify`` (rank 0 checks, every rank gets the answer; collective).

        With ``path`` (a checkpoint folder, or a checkpoint root): that folder, or that root's newest valid one.
        Every rejected checkpoint is reported. Returns None if there is no checkpoint at all; raises
        CheckpointError if checkpoints exist but none is valid.
        """
        chosen: Any = None
        if _rank() == 0:
            chosen = self._find_valid_local(Path(path) if path is not None else None)
        chosen = _broadcast(chosen)
        if isinstance(chosen, CheckpointError):
            raise chosen
        return None if chosen is None else Path(chosen)

    def _find_valid_local(self, path: Path | None) -> str | CheckpointError | None:
        if path is None:
            cands = self.candidates()
        elif not path.exists():
            return CheckpointError(f"checkpoint {path} does not exist")
        elif (path / MANIFEST).exists() or STEP_DIR.match(path.name):
            cands = [path]  # one checkpoint folder: exactly that one
        else:
            cands = CheckpointManager(path, log=self.log).candidates()  # a checkpoint root
        rejected = []
        for cand in cands:
            problems = self.verify(cand)
            if not problems:
                if rejected:
                    self.log(f"checkpoint: using {cand}, the newest valid checkpoint")
                return str(cand)
            rejected.append(cand)
            self.log(f"checkpoint: REFUSING {cand}: " + "; ".join(problems)
                     + ("; trying the previous one" if cand is not cands[-1] else ""))
        if rejected:
            return CheckpointError(f"no valid checkpoint under {path or self.root}: "
                                   f"{len(rejected)} found, all failed verification (see messages above)")
        return None

    def load(self, path: str | os.PathLike | None = None) -> LoadedCheckpoint | None:
        """``find_valid`` and read the manifest and trainer state (collective). None if there is none."""
        found = self.find_valid(path)
        if found is None:
            return None
        manifest = json.loads((found / MANIFEST).read_text())
        try:
            trainer = json.loads((found / TRAINER_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{found / TRAINER_FILE} is not valid JSON ({err})") from None
        return LoadedCheckpoint(found, manifest, trainer)
