"""Training metrics: TensorBoard scalars, a JSON-lines log, and a console progress line with ETA.

Scalars written every ``logging.log_every`` steps (TensorBoard tag = JSON key):

    train/loss, train/lr, train/grad_norm           the optimizer step's mean loss, learning rate, global grad norm
    train/clipped_fraction                          fraction of the steps since step 0 whose grad norm was clipped
    perf/tokens_per_sec, perf/tokens_per_sec_per_device, perf/step_time
    perf/flops_per_sec_per_device                   achieved model FLOP/s (flops.py's count) per device
    perf/mfu                                        achieved / declared peak FLOP/s: only with a declared peak
                                                    (logging.peak_flops or a known device), never above 1
    perf/peak_memory_gib                            peak GPU memory allocated (CPU: peak resident set size)
    hope/layer{i}/{eta,alpha,mem_w1_norm,mem_w2_norm}  memory state of each Titans layer after the last forward:
                                                    mean inner learning rate eta and retention alpha, and the
                                                    Frobenius norms of the main memory's fast weights
    progress/tokens                                 tokens consumed since step 0
    eval/loss, eval/perplexity                      at every evaluation

``metrics.jsonl`` (next to the event files) holds the same values at full precision, one object per logged
step (and per evaluation), which is what the resume tests compare.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch


def peak_memory_gib() -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepTimer:
    """Wall time per step over a sliding window; the first step (warm-up, lazy initialization) only counts
    until a second one is known."""

    def __init__(self, window: int = 20):
        self.times: deque[float] = deque(maxlen=window)
        self._first: float | None = None

    def add(self, seconds: float) -> None:
        if self._first is None:
            self._first = seconds
        else:
            self.times.append(seconds)

    @property
    def mean(self) -> float:
        if self.times:
            return sum(self.times) / len(self.times)
        return self._first if self._first is not None else float("nan")

    def eta(self, steps_left: int) -> float:
        return self.mean * steps_left


class MetricsLogger:
    """Writes metrics on the one logging rank; other ranks get a logger whose calls do nothing."""

    def __init__(self, log_dir: str | Path, enabled: bool, max_steps: int, flops_per_token: float,
                 peak_flops_total: float | None, devices: int, stream=None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total  # None: no declared peak, so no MFU
        self._warned_mfu = False
        self.devices = devices
        self.stream = stream or sys.stdout
        self.timer = StepTimer()
        self.writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))
            self._jsonl = open(Path(log_dir) / "metrics.jsonl", "a")

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def log_step(self, step: int, tokens_total: int, loss: float, lr: float, grad_norm: float,
                 step_tokens: int, seconds: float, memory: dict[str, float] | None, write: bool,
                 clipped_fraction: float | None = None) -> None:
        """Record one optimizer step; ``write`` (every log_every steps) emits the line and the scalars."""
        self.timer.add(seconds)
        if not (self.enabled and write):
            return
        tps = step_tokens / seconds if seconds > 0 else float("nan")
        achieved = self.flops_per_token * tps  # model FLOP/s of all devices together
        scalars: dict[str, float] = {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "perf/tokens_per_sec": tps, "perf/tokens_per_sec_per_device": tps / self.devices,
            "perf/flops_per_sec_per_device": achieved / self.devices, "perf/step_time": seconds,
            "perf/peak_memory_gib": peak_memory_gib(), "progress/tokens": float(tokens_total),
        }
        if clipped_fraction is not None:
            scalars["train/clipped_fraction"] = clipped_fraction
        mfu = self._mfu(achieved)
        if mfu is not None:
            scalars["perf/mfu"] = mfu
        for key, value in (memory or {}).items():
            scalars[f"hope/{key}"] = value
        self._emit(step, scalars)
        eta = self.timer.eta(self.max_steps - step)
        speed = f"MFU {100 * mfu:.2f}%" if mfu is not None else f"{achieved / self.devices / 1e9:,.2f} GFLOP/s/device"
        self.print(f"step {step:>6d}/{self.max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad {grad_norm:.3f} | "
                   f"{tps:,.0f} tok/s | {speed} | mem {scalars['perf/peak_memory_gib']:.2f} GiB | "
                   f"tokens {tokens_total:,} | ETA {format_duration(eta)}")

    def _mfu(self, achieved: float) -> float | None:
        """achieved / declared peak FLOP/s; None without a declared peak, or above 100% (then the declared peak is
        wrong, which is said once, and the achieved FLOP/s are shown instead)."""
        if not self.peak_flops_total or not math.isfinite(achieved):
            return None
        mfu = achieved / self.peak_flops_total
        if mfu > 1.0:
            if not self._warned_mfu:
                self.print(f"metrics: achieved {achieved / self.devices:.3e} FLOP/s per device exceeds the declared "
                           f"peak {self.peak_flops_total / self.devices:.3e} (logging.peak_flops or the device "
                           "table): MFU is not reported")
                self._warned_mfu = True
            return None
        return mfu

    def log_eval(self, step: int, loss: float, batches: int) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        self._emit(step, {"eval/loss": loss, "eval/perplexity": ppl})
        self.print(f"eval  {step:>6d}/{self.max_steps} | val loss {loss:.4f} | ppl {ppl:.2f} | {batches} batches/rank")

    def _emit(self, step: int, scalars: dict[str, Any]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self._jsonl.close()
            self.writer = None
