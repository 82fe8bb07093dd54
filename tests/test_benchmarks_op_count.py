"""benchmarks/op_count.py: the operation counter counts what launches device work, and the script runs."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_counter_counts_compute_not_views_or_allocations():
    bench = load_benchmark("op_count")
    x = torch.randn(4, 4, requires_grad=True)
    with bench.OpCounter() as counter:
        y = torch.empty(4, 4)
        # mm, a copy (reshape of a transpose), sum; backward: ones_like, 2 mm, add; views and empty not counted
        (x @ x).t().reshape(16).sum().backward()
    assert y.shape == (4, 4)
    assert counter.ops == 7 and counter.launches == 0


def test_step_counts_grow_with_chunks():
    """More tokens mean more memory chunks, hence more operations for Hope; a Transformer's count does not depend on
    the sequence length; the script prints one row per model and kernel."""
    bench = load_benchmark("op_count")
    from hope_scale.model import ModelConfig

    cfg = ModelConfig.named("hope-tiny")
    short, _ = bench.count_step(cfg, 32, "none")
    long, _ = bench.count_step(cfg, 64, "none")
    assert long > short > 0
    tcfg = ModelConfig.named("transformer-tiny")
    assert bench.count_step(tcfg, 32, "none")[0] == bench.count_step(tcfg, 64, "none")[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "op_count.py"), "--seq-len", "32",
                           "--kernels", "naive"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| hope-760m") or
            line.startswith("| transformer-760m")]
    assert len(rows) == 2
    total = {row.split("|")[1].strip(): int(row.split("|")[-2].replace(",", "")) for row in rows}
    assert total["hope-760m"] > total["transformer-760m"] > 0
