"""Learning-rate schedules: linear warm-up, then cosine decay, WSD (warmup-stable-decay) or constant.

All are pure functions of the optimizer step (0-based: the lr used by the ``step``-th update), so a resumed
run needs no schedule state: the step counter in the checkpoint is enough.

    warm-up      lr(s) = peak * (s + 1) / W                                  for s < W
    cosine       lr(s) = min + (peak - min) * (1 + cos(pi * p)) / 2          p = (s - W) / (S - 1 - W)
    WSD          lr(s) = peak  until the last D = ceil(decay_fraction * (S - W)) steps, then
                 lr(s) = peak - (peak - min) * q,  q = (s - (S - D) + 1) / D  (linear to min at the last step)
    constant     lr(s) = peak

with S = total steps, W = warm-up steps, min = min_lr_ratio * peak. Cosine reaches ``min`` exactly at the
last step S - 1; WSD too (the decay phase's last step has q = 1). A run shorter than its warm-up
(a quick test of a big config) only warms up. WSD is the schedule of MiniCPM
(Hu et al., 2024) that lets one run be continued from the end of its stable phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    kind: str  # cosine | wsd | constant
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD only

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {self.total_steps}, {self.warmup_steps}")

    @classmethod
    def from_config(cls, schedule_cfg, peak_lr: float, total_steps: int) -> "LRSchedule":
        return cls(schedule_cfg.kind, peak_lr, total_steps, schedule_cfg.warmup_steps,
                   schedule_cfg.min_lr_ratio, schedule_cfg.decay_fraction)

    @property
    def min_lr(self) -> float:
        return self.min_lr_ratio * self.peak_lr

    @property
    def decay_steps(self) -> int:
        """WSD: length of the final decay phase."""
        return max(1, math.ceil(self.decay_fraction * max(0, self.total_steps - self.warmup_steps)))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        w, total = self.warmup_steps, self.total_steps
        if step < w:
            return self.peak_lr * (step + 1) / w
        if self.kind == "constant":
            return self.peak_lr
        step = min(step, total - 1)  # past the end: stay at the final value
        if self.kind == "cosine":
            span = total - 1 - w
            progress = 1.0 if span <= 0 else (step - w) / span
            return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_start = total - self.decay_steps
        if step < decay_start:
            return self.peak_lr
        q = (step - decay_start + 1) / self.decay_steps
        return self.peak_lr - (self.peak_lr - self.min_lr) * q


def write_cost_factor(step: int, from_step: int = 0, ramp_steps: int = 0) -> float:
    """The fraction of ``model.write_cost`` charged by the ``step``-th update (0-based; docs/hope-design.md §6.7):

        f(s) = 0                          s < F              (schedule.write_cost_from_step)
        f(s) = min(1, (s - F + 1) / R)    s >= F, R > 0      (schedule.write_cost_ramp_steps: a linear ramp,
        f(s) = 1                          s >= F, R = 0       counted like the lr warm-up)

    A pure function of the step, like the lr schedules, so a resumed run needs no extra state."""
    if step < 0 or from_step < 0 or ramp_steps < 0:
        raise ValueError(f"need step, from_step and ramp_steps >= 0, got {step}, {from_step}, {ramp_steps}")
    if step < from_step:
        return 0.0
    return 1.0 if ramp_steps == 0 else min(1.0, (step - from_step + 1) / ramp_steps)
