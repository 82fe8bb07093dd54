"""benchmarks/gpu_throughput.py on a machine without a GPU: a clear message and exit status 2, no CPU fallback."""

import os
import subprocess
import sys
from pathlib import Path

from tests.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_throughput_without_cuda_says_so_and_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--steps", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device is visible" in proc.stderr
    assert proc.stdout == ""


def test_gpu_throughput_step_loop_runs():
    """The timed loop of the benchmark on a tiny model on the CPU (the GPU run cannot be tested here): bf16 training
    steps run, tokens/s and TFLOP/s are positive and the FLOP count is the model's."""
    bench = load_benchmark("gpu_throughput")
    r = bench.run_mode("hope-tiny", "eager", seq_len=32, micro_batch=1, steps=1, warmup=1, checkpointing="memory",
                       device="cpu")
    assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_gib"] is None
    assert r["checkpointing"] == "memory" and r["params"] > 1e6


def test_kernel_gpu_check_without_cuda_says_so_and_exits_2():
    """benchmarks/kernel_gpu_check.py (the kernels against the naive path on a real GPU) has no CPU mode: the tests in
    tests/test_model_kernel*.py are the CPU check, in Triton's interpreter."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_gpu_check.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device is visible" in proc.stderr
