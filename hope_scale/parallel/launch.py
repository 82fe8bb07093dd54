"""Run a function on N local processes (one per rank) over gloo/nccl: for tests and small local jobs.

    results = run_local("tests.test_parallel_engine:worker", world_size=4, payload={...})

Each worker process imports ``module:function``, calls ``function(payload)`` with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, and the returned object (tensors allowed) comes back to the parent,
one per rank. Workers exit through ``destroy_process_group`` + ``os._exit`` (DeepSpeed's gloo threads can
otherwise abort the interpreter at exit), and the shared-memory files DeepSpeed leaves in /dev/shm are removed.
"""

from __future__ import annotations

import glob
import importlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


class WorkerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_deepspeed_shm(port: int) -> None:
    """Remove the shared-memory all-reduce buffers DeepSpeed's CPU backend created for a job on ``port``
    (named deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>)."""
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(f)
        except OSError:
            pass


def run_local(target: str, world_size: int, payload=None, timeout: float = 600.0,
              env: dict[str, str] | None = None) -> list:
    """Start ``world_size`` worker processes running ``target`` ("module:function") on ``payload``; return the
    per-rank results (index = rank). Raises WorkerError with the failing ranks' output."""
    with tempfile.TemporaryDirectory(prefix="hope_scale_launch_") as tmp:
        tmp_path = Path(tmp)
        torch.save(payload, tmp_path / "payload.pt")
        port = free_port()
        procs = []
        for rank in range(world_size):
            e = dict(os.environ)
            e.update(env or {})
            e.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                      "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            if not torch.cuda.is_available():
                e.setdefault("DS_ACCELERATOR", "cpu")
            log = open(tmp_path / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "hope_scale.parallel.launch", target, tmp],
                                           env=e, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        failed = []
        try:
            for rank, (p, _) in enumerate(procs):
                left = max(1.0, deadline - time.monotonic())
                try:
                    rc = p.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    failed.append((rank, "timeout"))
                    break
                if rc != 0:
                    failed.append((rank, f"exit code {rc}"))
                    break
        finally:
            for p, log in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
            remove_deepspeed_shm(port)
        if failed:
            logs = []
            for rank in range(world_size):
                text = (tmp_path / f"rank{rank}.log").read_text(errors="replace")
                logs.append(f"--- rank {rank} ---\n{text[-6000:]}")
            raise WorkerError(f"{target}: ranks failed {failed}\n" + "\n".join(logs))
        return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(world_size)]


def _worker_main(target: str, tmp: str) -> None:
    code = 0
    try:
        module_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        payload = torch.load(Path(tmp) / "payload.pt", weights_only=False)
        result = fn(payload)
        torch.save(result, Path(tmp) / f"result{os.environ['RANK']}.pt")
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            if torch.distributed.is_initialized():
                if code == 0:
                    torch.distributed.barrier()
                torch.distributed.destroy_process_group()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
