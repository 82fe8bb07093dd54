"""Training the small models of the evaluation benchmarks: a run of ``TrainStep`` (hope_scale/train/step.py)
on one process, in pieces if wanted, within optional wall-time / CPU-time budgets.

Every update -- AdamW with pretraining's parameter groups, the learning-rate schedule (linear warm-up, cosine to
``min_lr_ratio``), gradient clipping and, for Hope / Hope-Attention, the CMS update schedule (paper Eq. 71: a
level steps only when its period of stream tokens has elapsed, with the mean of the gradients since its last
step) -- is the shared training step of ``hope_scale.train``, the rules pretraining applies at any scale. This
module only runs it: batches, budgets, the loss history and a result summary.

Batches come from a ``batch_fn(step) -> (inputs [B, T], labels [B, T])`` (labels -100 are ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from hope_scale.train.schedules import LRSchedule
from hope_scale.train.step import OptimizerSettings, TrainStep

from .corpus import random_windows
from .niah import NIAHGenerator


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    cms_schedule: bool = True  # Hope archs: step each CMS level only when its period has elapsed
    write_cost_from_step: int = 0  # model.write_cost off before this step (schedule.write_cost_from_step)
    write_cost_ramp_steps: int = 0  # then rising linearly to its full value over this many steps
    log_every: int = 50
    time_budget_s: float | None = None  # stop early once this much wall time is spent
    cpu_budget_s: float | None = None  # stop early once this process has used this much CPU time (robust to
    # other load on a shared machine, unlike wall time)

    def to_dict(self) -> dict:
        return asdict(self)

    def train_step(self, model: torch.nn.Module) -> TrainStep:
        """The shared training step for ``model`` with these settings (AdamW betas 0.9/0.95, cosine schedule)."""
        schedule = LRSchedule("cosine", self.lr, max(1, self.steps), self.warmup_steps, self.min_lr_ratio)
        return TrainStep(model, OptimizerSettings(lr=self.lr, weight_decay=self.weight_decay), schedule,
                         self.grad_clip, cms_schedule=self.cms_schedule,
                         write_cost_from_step=self.write_cost_from_step,
                         write_cost_ramp_steps=self.write_cost_ramp_steps)


class Trainer:
    """Runs the steps of one training run, possibly in pieces (``run(n)``), keeping the optimizer, the
    CMS schedule and the learning-rate schedule continuous between pieces."""

    def __init__(self, model: torch.nn.Module, batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                 cfg: TrainConfig, name: str = ""):
        self.model, self.batch_fn, self.cfg, self.name = model, batch_fn, cfg, name
        self.train_step = cfg.train_step(model)
        self.step, self.tokens, self.seconds, self.cpu_seconds = 0, 0, 0.0, 0.0
        self.history: list[float] = []

    def run(self, n_steps: int | None = None, log: Callable[[str], None] | None = print,
            progress: bool = False) -> "Trainer":
        """Run ``n_steps`` more steps (default: to the end), stopping early at the time budget; ``progress``
        shows a progress bar (steps, loss) on stderr."""
        cfg, model = self.cfg, self.model
        end = cfg.steps if n_steps is None else min(cfg.steps, self.step + n_steps)
        bar = tqdm(total=end - self.step, desc=self.name or "train", unit="step", disable=not progress,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        while self.step < end:
            if cfg.time_budget_s is not None and self.seconds + time.perf_counter() - t0 >= cfg.time_budget_s:
                break
            if cfg.cpu_budget_s is not None and self.cpu_seconds + time.process_time() - c0 >= cfg.cpu_budget_s:
                break
            out = self.train_step.step([self.batch_fn(self.step)])
            self.tokens += out["tokens"]
            self.history.append(out["loss"])
            if log and cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps - 1):
                log(f"[train {self.name}] step {self.step:5d}  loss {np.mean(self.history[-cfg.log_every:]):.4f}  "
                    f"lr {out['lr']:.2e}  tokens {self.tokens}  {self.seconds + time.perf_counter() - t0:.1f}s")
            self.step += 1
            bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
            bar.update()
        bar.close()
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        model.eval()
        return self

    def result(self, keep_history: bool = True) -> dict:
        h = self.history
        out = {"steps": len(h), "tokens": self.tokens, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
               "loss_first": float(np.mean(h[:10])) if h else float("nan"),
               "final_loss": float(np.mean(h[-min(20, len(h)):])) if h else float("nan"),
               "clipped_fraction": self.train_step.clips.fraction}
        if keep_history:
            out["loss_history"] = list(h)
        return out


def train(model: torch.nn.Module, batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
          log: Callable[[str], None] | None = print, name: str = "") -> dict:
    """Train ``model`` in place; returns the loss history and the budget actually used."""
    return Trainer(model, batch_fn, cfg, name).run(log=log).result()


# -- batch sources ------------------------------------------------------------------------------------

def text_batches(stream: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """Random windows of a token stream: inputs w[:-1], labels w[1:] (every position trained)."""

    def fn(step: int):
        rng = np.random.default_rng([seed, step])
        w = torch.from_numpy(random_windows(stream, batch_size, seq_len + 1, rng))
        return w[:, :-1], w[:, 1:]

    return fn


def niah_batches(generator: NIAHGenerator, batch_size: int, length: int, seed: int, pad_id: int,
                 depths: tuple[float, float] = (0.0, 1.0), answer_only: bool = True):
    """NIAH training batches at one length: prompt + answer, right-padded to ``length``; the loss is on the
    answer tokens (``answer_only``) or on every real token. Depths are drawn uniformly in ``depths``."""
    tok = generator.tokenizer

    def fn(step: int):
        rng = np.random.default_rng([seed, step])
        x = torch.full((batch_size, length), pad_id, dtype=torch.long)
        y = torch.full((batch_size, length), -100, dtype=torch.long)
        for row in range(batch_size):
            depth = float(rng.uniform(*depths))
            s = generator.sample(length, round(depth, 4), index=int(rng.integers(2**31)))
            prompt = tok.encode(s.prompt)
            answer = tok.encode(" " + ", ".join(s.answers) + ".")
            seq = (prompt + answer)[:length + 1]
            n = len(seq) - 1
            x[row, :n] = torch.tensor(seq[:-1])
            labels = torch.tensor(seq[1:])
            if answer_only:
                labels[: len(prompt) - 1] = -100
            y[row, :n] = labels
        return x, y

    return fn


def length_schedule(text: str) -> tuple[int, ...] | None:
    """``LEN:EVERY[:BATCH]`` -> (LEN, EVERY[, BATCH]), all positive; BATCH is the long steps' batch size.
    ``none`` -> None (every step at the training length). An argparse type."""
    if text.strip().lower() == "none":
        return None
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected LEN:EVERY or LEN:EVERY:BATCH (e.g. 512:4:2), got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"LEN, EVERY and BATCH must be positive, got {text!r}")
    return values


def interleave(batches, other, every: int, start: int = 0):
    """Step ``i`` draws from ``other`` when ``i >= start`` and ``i % every == every - 1``, else from ``batches``."""
    return lambda step: other(step) if step >= start and step % every == every - 1 else batches(step)


def scheduled_niah_batches(generator: NIAHGenerator, batch_size: int, length: int, seed: int, pad_id: int,
                           schedule: tuple[int, ...] | None = None, start: int = 0):
    """``niah_batches`` at ``length``, or with ``schedule`` = (LEN, EVERY[, BATCH]) from step ``start`` on every
    EVERY-th step BATCH (default ``batch_size``) x LEN tokens instead: a schedule of training lengths, and with
    ``start`` > 0 a short-to-long curriculum. The short steps are the same batches as without a schedule."""
    batches = niah_batches(generator, batch_size, length, seed=seed, pad_id=pad_id)
    if not schedule:
        return batches
    long_len, every, long_batch = (*schedule, batch_size)[:3]
    longer = niah_batches(generator, long_batch, long_len, seed=10_000 + seed, pad_id=pad_id)
    return interleave(batches, longer, every, start)
