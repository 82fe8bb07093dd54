"""The node-local side of a streaming dataset: its shard cache folder and mosaicml-streaming's shared memory.

Before a dataset is built, the node's local leader (the other local ranks wait) runs three steps per stream:

* **claim** the cache folder for this job: an exclusive ``flock`` on ``<cache folder>.lock``, which the kernel
  releases when the process ends, ``kill -9`` included. Another running job with the same folder is an error
  naming ``data.cache_dir``; jobs with different folders never touch each other's files or shared memory.
* **clean stale shared memory**: streaming registers every dataset in ``/dev/shm`` under a numbered prefix that
  records its cache folders. A job killed as a whole (``scancel``, preemption, an OOM kill of the process
  group) leaves its registration behind, and every later start then fails with "Reused local directory".
  A registration naming a folder this job has just claimed can only belong to a dead job, so it is unlinked.
  (streaming's own ``clean_stale_shared_memory`` unlinks every registration on the node, a running job's too.)
* **verify cached copies** against the sizes and hashes of the index: a bad copy is removed, so that streaming
  fetches it again from the source (checking it on the way); a corrupted cache never feeds training.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from tempfile import gettempdir
from typing import Any

from .manifest import hash_bytes


class CacheInUseError(RuntimeError):
    """Another running process holds the shard cache folder."""


_HELD: dict[str, list[int]] = {}  # lock file -> [fd, number of datasets of this process using it]
_MISSES_BEFORE_STOP = 64  # registrations are numbered from 0, with gaps where jobs ended


def _lock_path(local: str) -> str:
    return os.path.normpath(local) + ".lock"


def claim(local: str) -> bool:
    """Lock cache folder ``local`` for this process. True if it was free (no running process used it), False if
    this process already holds it. Raises CacheInUseError naming the holder's pid if another process does."""
    path = _lock_path(local)
    if path in _HELD:
        _HELD[path][1] += 1
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CacheInUseError(f"the shard cache {local} is in use by another running process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[path] = [fd, 1]
    return True


def release(local: str) -> None:
    """Undo one ``claim`` of this process; the lock is dropped with the last one."""
    entry = _HELD.get(_lock_path(local))
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        os.close(entry[0])
        del _HELD[_lock_path(local)]


def clean_stale_registrations(folders: list[str]) -> int:
    """Unlink streaming's shared memory (and its file locks in the temp folder) of every registration that names
    one of ``folders`` (``<cache folder>/<split>``, absolute, as streaming records them); call only for freshly
    claimed cache folders. Returns how many registrations were removed."""
    from multiprocessing.shared_memory import SharedMemory as BuiltinSharedMemory

    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    ours, removed, misses, prefix = set(folders), 0, 0, 0
    while misses < _MISSES_BEFORE_STOP:
        try:  # streaming's wrapper: attaching does not register the segment for cleanup at our exit
            shm = SharedMemory(_get_path(prefix, LOCALS), False, auto_cleanup=False)
        except FileNotFoundError:
            misses, prefix = misses + 1, prefix + 1
            continue
        misses = 0
        theirs, _ = _unpack_locals(bytes(shm.buf))
        shm.cleanup()
        if ours & set(theirs):
            for name in SHM_TO_CLEAN:
                try:
                    stale = BuiltinSharedMemory(_get_path(prefix, name), False)
                except FileNotFoundError:
                    continue
                stale.close()
                stale.unlink()
            for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
                Path(gettempdir(), _get_path(prefix, lock)).unlink(missing_ok=True)
            removed += 1
        prefix += 1
    return removed


def verify_cached_copies(local: str, split: str, source_index: bytes | None, algo: str) -> list[str]:
    """Remove every cached copy under ``<local>/<split>`` that differs from what the index records (size, hash
    ``algo``), and the cached index itself if it differs from ``source_index`` (local sources) or is unreadable.
    Returns one message per removed file; streaming fetches them again from the source, checked on the way."""
    folder = Path(local) / split
    index_file = folder / "index.json"
    if not index_file.is_file():
        return []
    cached = index_file.read_bytes()
    try:
        index = json.loads(cached)
    except (json.JSONDecodeError, UnicodeDecodeError):
        index = None
    if index is None or (source_index is not None and cached != source_index):
        index_file.unlink()
        return [f"{index_file}: differs from the dataset's index; removed"]
    removed = []
    for shard in index.get("shards", []):
        for info in (shard.get("raw_data"), shard.get("zip_data")):
            if info is None or algo not in info.get("hashes", {}):
                continue
            copy = folder / info["basename"]
            if copy.is_file() and not _matches(copy, info, algo):
                copy.unlink()
                removed.append(f"{copy}: cached copy fails its {algo} check (corrupted); removed, it is fetched "
                               f"again from the source")
    return removed


def _matches(path: Path, info: dict[str, Any], algo: str) -> bool:
    if path.stat().st_size != info["bytes"]:
        return False
    return hash_bytes(algo, path.read_bytes()) == info["hashes"][algo]
