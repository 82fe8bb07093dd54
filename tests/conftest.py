"""Test-wide settings: CPU DeepSpeed, one extension build folder, the committed text fixture, the skip policy.

The suite needs nothing outside the repository: text comes from ``tests/data`` (or the built-in corpus), and
a skip that does not name a missing optional dependency fails the run (``tests/skip_policy.py``).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "hope_scale_torch_extensions"))

pytest_plugins = ["tests.skip_policy", "pytester"]

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare-head.txt"


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """The first 210 KB of tinyshakespeare (public domain), committed under tests/data."""
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine has 2 cores shared by several processes: more torch threads only contend."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
