"""Test-wide settings: CPU DeepSpeed, one torch thread, one extension build folder, the committed text fixture,
the skip policy.

The suite needs nothing outside the repository: text comes from ``tests/data`` (or the built-in corpus), and
a skip that does not name a missing optional dependency fails the run (``tests/skip_policy.py``).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hope_scale_torch_extensions"))
# One thread per process (inherited by the distributed workers the tests start): two xdist workers and their
# subprocesses already keep both cores of the CI machine busy, and OpenMP threads contending for them made the
# suite's many small-op tests several times slower (tests/test_model_lm.py: 58.6 s with 2 threads, 23.7 s with
# 1, on the 2-core machine with one other busy process). Set OMP_NUM_THREADS to use more on a larger machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it is imported)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

pytest_plugins = ["tests.skip_policy", "pytester"]

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare-head.txt"


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The first 210 KB of tinyshakespeare (public domain), committed under tests/data."""
    return SHAKESPEARE.read_text(encoding="utf-8")
