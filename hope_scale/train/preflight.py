"""Start-up checks of the filesystem a run writes to, so that a problem is found before the work, not at the
first save after it: the checkpoint and log folders must be writable, and the checkpoint filesystem must have
room for one checkpoint (counting what ``keep_last_n`` lets the run delete). Errors are ConfigErrors naming the
config key (``hope-scale pretrain`` exits with code 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from hope_scale.model import ConfigError

from .checkpoint import CheckpointManager


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create ``folder`` if needed and write, fsync and delete a probe file in it; ConfigError naming ``key`` if
    any of that fails (a read-only or full filesystem, missing permissions, a file in the way)."""
    path = Path(folder)
    probe = path / f".hope-scale-write-test-{os.getpid()}-{os.environ.get('RANK', '0')}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path}: {err}") from None


def check_checkpoint_space(manager: CheckpointManager, need_bytes: int, key: str = "checkpoint.dir") -> None:
    """ConfigError naming ``key`` unless the checkpoint filesystem can take a checkpoint of ``need_bytes``,
    counting the checkpoints ``keep_last_n`` would delete before writing it."""
    room = manager.free_bytes(reclaim=True)
    if room < need_bytes:
        raise ConfigError(f"{key}: {manager.root} has room for {room / 2**30:.2f} GiB (free space plus the "
                          f"checkpoints keep_last_n={manager.keep_last_n} lets go), a checkpoint of this model needs "
                          f"about {need_bytes / 2**30:.2f} GiB: free some space or choose another folder")
