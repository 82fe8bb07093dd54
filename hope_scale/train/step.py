"""The update rules of every training run, and ``TrainStep``, their single-process driver.

The rules (one implementation each, shared by pretraining and the evaluation benchmarks):

* AdamW (``CMSAdamW``) over ``param_groups``: weight decay on matrices and memory initial states, none on gains,
  biases and other vectors (``decays``); every CMS level in groups of its own;
* the CMS update schedule (paper Eq. 71, ``CMSPeriodSchedule``): level l steps only once ``period_l`` stream
  tokens have passed since its last step, with the mean of the (clipped) gradients accumulated since then;
* gradient clipping to a global norm, counted by ``ClipCounter`` (the fraction of clipped steps);
* the learning-rate schedule of ``schedules.LRSchedule`` (warm-up, then cosine / WSD / constant).

``hope_scale.parallel.engine.TrainEngine`` applies them through DeepSpeed at any parallel layout (clipping by
DeepSpeed's global norm, the CMS schedule inside ``CMSAdamW.step``); ``TrainStep`` applies them to a plain
``LanguageModel`` on one process, which is what the evaluation benchmarks train with
(``hope_scale.eval.trainer``). On one process both give the same updates (``tests/test_train_step.py`` checks
``TrainStep`` against the plain-PyTorch oracle that ``tests/test_parallel_engine.py`` checks the engine
against).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hope_scale.model.cms import cms_level_periods
from hope_scale.model.write_cost import loss_grad_scale
from hope_scale.parallel.optim import CMSAdamW

from .schedules import LRSchedule, write_cost_factor

_CMS_NAME = re.compile(r"^blocks\.\d+\.cms\.levels\.(\d+)\.")


@dataclass
class OptimizerSettings:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    @classmethod
    def coerce(cls, value: "OptimizerSettings | dict | None") -> "OptimizerSettings":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = sorted(set(value) - {"lr", "betas", "eps", "weight_decay"})
        if unknown:
            raise ValueError(f"optimizer: unknown key(s) {unknown}")
        out = cls(**value)
        out.betas = tuple(out.betas)
        return out


def cms_level_of(name: str) -> int | None:
    """The CMS level index of parameter ``name`` (``blocks.<i>.cms.levels.<level>.*``), else None."""
    m = _CMS_NAME.match(name)
    return int(m.group(1)) if m else None


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay on matrices and memory initial states; none on gains, biases and other vectors."""
    return p.ndim >= 2 and not name.endswith(("norm_weight", "norm.weight"))


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """CMSAdamW's parameter groups, tagged ``main|cms<l>`` x ``decay|no_decay`` (the same tags at every layout)."""
    groups: dict[str, dict] = {}
    for name, p in named_parameters:
        level = cms_level_of(name)
        wd = decays(name, p)
        tag = f"{'main' if level is None else f'cms{level}'}/{'decay' if wd else 'no_decay'}"
        g = groups.setdefault(tag, {"params": [], "tag": tag, "cms_level": level,
                                    "weight_decay": weight_decay if wd else 0.0})
        g["params"].append(p)
    return [groups[t] for t in sorted(groups)]


class CMSPeriodSchedule:
    """Which CMS levels step on this optimizer step.

    ``advance(tokens)`` adds this step's global stream tokens; a level is due once ``period`` tokens have been
    seen since its last update, and its update averages the gradients of the steps since then.
    """

    def __init__(self, periods: dict[int, int]):
        self.periods = dict(periods)
        self.tokens_since = {i: 0 for i in self.periods}
        self.steps_accumulated = {i: 0 for i in self.periods}

    def advance(self, tokens: int) -> dict[int, tuple[bool, int]]:
        plan = {}
        for i, period in self.periods.items():
            self.tokens_since[i] += tokens
            self.steps_accumulated[i] += 1
            due = self.tokens_since[i] >= period
            plan[i] = (due, self.steps_accumulated[i])
            if due:
                self.tokens_since[i], self.steps_accumulated[i] = 0, 0
        return plan

    def state_dict(self) -> dict:
        return {"tokens_since": dict(self.tokens_since), "steps_accumulated": dict(self.steps_accumulated)}

    def load_state_dict(self, sd: dict) -> None:
        self.tokens_since = {int(k): int(v) for k, v in sd["tokens_since"].items()}
        self.steps_accumulated = {int(k): int(v) for k, v in sd["steps_accumulated"].items()}


@dataclass
class ClipCounter:
    """Optimizer steps whose global gradient norm (before clipping) exceeded the clip threshold ``max_norm``
    (0: clipping off, no step counts as clipped)."""

    max_norm: float
    steps: int = 0
    clipped: int = 0

    def add(self, grad_norm: float) -> bool:
        """Count one step; whether it was clipped."""
        hit = self.max_norm > 0 and grad_norm > self.max_norm
        self.steps += 1
        self.clipped += int(hit)
        return hit

    @property
    def fraction(self) -> float:
        return self.clipped / self.steps if self.steps else 0.0


class TrainStep:
    """Optimizer steps of ``model`` on one process under the shared rules (see the module docstring).

    ``step(micro_batches)`` runs one optimizer step on a list of ``(input_ids, labels)`` micro-batches (labels
    -100 ignored): lr from ``schedule`` at this step, the mean micro-batch loss backpropagated, the global
    gradient norm clipped to ``grad_clip`` (0: off), the CMS plan for the step's tokens, AdamW. Returns
    ``{"loss", "grad_norm", "clipped", "lr", "tokens", "cms_stepped"}``. ``cms_schedule=False`` steps every CMS
    level on every step, like any other parameter. ``model.write_cost`` is left out of the steps before
    ``write_cost_from_step`` and then rises to its full value over ``write_cost_ramp_steps``
    (``schedules.write_cost_factor``).
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerSettings | dict | None, schedule: LRSchedule,
                 grad_clip: float, cms_schedule: bool = True, write_cost_from_step: int = 0,
                 write_cost_ramp_steps: int = 0):
        settings = OptimizerSettings.coerce(optimizer)
        self.model, self.schedule = model, schedule
        self.params = [p for p in model.parameters() if p.requires_grad]
        trainable = ((n, p) for n, p in model.named_parameters() if p.requires_grad)
        self.optimizer = CMSAdamW(param_groups(trainable, settings.weight_decay), lr=settings.lr,
                                  betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
        self.cms = CMSPeriodSchedule(cms_level_periods(model)) if cms_schedule else None
        self.clips = ClipCounter(grad_clip)
        self.write_cost_from_step, self.write_cost_ramp_steps = write_cost_from_step, write_cost_ramp_steps
        self.steps = 0

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        lr = self.schedule(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        # model.write_cost's gradient, scaled like the loss and by its schedule
        write_cost = write_cost_factor(self.steps, self.write_cost_from_step, self.write_cost_ramp_steps)
        with loss_grad_scale(write_cost / len(micro_batches)):
            for ids, labels in micro_batches:
                loss = self.model.loss(ids, labels) / len(micro_batches)
                loss.backward()
                total += float(loss.detach())
        max_norm = self.clips.max_norm if self.clips.max_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm))
        tokens = sum(int(ids.numel()) for ids, _ in micro_batches)
        plan = self.cms.advance(tokens) if self.cms is not None else {}
        self.optimizer.level_plan = plan  # levels absent from the plan step every time
        self.optimizer.step()
        self.steps += 1
        return {"loss": total, "grad_norm": grad_norm, "clipped": self.clips.add(grad_norm), "lr": lr,
                "tokens": tokens, "cms_stepped": {lvl: due for lvl, (due, _) in plan.items()}}
