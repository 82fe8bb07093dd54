"""Continuum Memory System (paper §7.1): a chain of MLP levels updated at different frequencies.

Forward (levels ordered fast -> slow after the sequence mixer, as in the paper's Hope figure):

    sequential:   x <- x + MLP_l(norm_l(x))              for l = 1..K
    independent:  x <- x + sum_l w_l MLP_l(norm_l(x))     (learnable weights w_l, the paper's Agg)

Update schedule (paper Eq. 71): level l's parameters change only every ``period_l`` tokens, by the
gradient accumulated over those tokens, theta <- theta - eta_l * mean_{t in chunk} grad_t. Two drivers:

* ``CMSGradientSchedule`` (pretraining): called between backward and the optimizer step; it accumulates
  each level's gradient and hides it from the optimizer (``grad = None``) until the level's period of
  stream tokens has elapsed, then hands the optimizer the accumulated mean gradient.
* ``CMSStreamLearner`` (after training, continual learning): feeds a token stream through the model in
  segments, carrying the sequence-mixer memory, and applies each level's own SGD update when its period
  elapses; only the levels it is told to train change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import CMSLevel
from .layers import RMSNorm, SwiGLU, swiglu_hidden


class CMSLevelBlock(nn.Module):
    """One level: RMSNorm followed by a SwiGLU MLP (column/row parallel under TP)."""

    def __init__(self, d_model: int, level: CMSLevel, eps: float):
        super().__init__()
        self.period = level.period
        self.norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, swiglu_hidden(d_model, level.hidden_mult))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


class ContinuumMemorySystem(nn.Module):
    def __init__(self, d_model: int, levels: list[CMSLevel], variant: str = "sequential", eps: float = 1e-6):
        super().__init__()
        self.variant = variant
        self.levels = nn.ModuleList(CMSLevelBlock(d_model, lvl, eps) for lvl in levels)
        if variant == "independent":
            self.level_weights = nn.Parameter(torch.full((len(levels),), 1.0 / len(levels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "sequential":
            for level in self.levels:
                x = x + level(x)
            return x
        return x + sum(w * level(x) for w, level in zip(self.level_weights, self.levels))


def cms_level_parameters(model: nn.Module) -> dict[int, list[nn.Parameter]]:
    """Parameters of every CMS level of every layer, grouped by level index (period is per index)."""
    groups: dict[int, list[nn.Parameter]] = {}
    for module in model.modules():
        if isinstance(module, ContinuumMemorySystem):
            for i, level in enumerate(module.levels):
                groups.setdefault(i, []).extend(level.parameters())
    return groups


def cms_level_periods(model: nn.Module) -> dict[int, int]:
    periods: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, ContinuumMemorySystem):
            for i, level in enumerate(module.levels):
                periods[i] = level.period
    return periods


class CMSGradientSchedule:
    """Per-level gradient accumulation across optimizer steps (pretraining form of Eq. 71).

    Call ``apply(tokens)`` after backward and before ``optimizer.step()``, with the number of stream tokens
    this step consumed (global batch tokens). A level whose period has not elapsed accumulates its gradient
    and gets ``grad = None`` (torch optimizers skip such parameters: no step, no weight decay, no moment
    update); when it has, its parameters receive the mean of the accumulated gradients. Levels with period
    <= tokens per step are stepped every step. ``state_dict`` makes the schedule resumable.
    """

    def __init__(self, model: nn.Module):
        self.groups = cms_level_parameters(model)
        self.periods = cms_level_periods(model)
        self.tokens_since: dict[int, int] = {i: 0 for i in self.groups}
        self.steps_accumulated: dict[int, int] = {i: 0 for i in self.groups}
        self.buffers: dict[int, list[torch.Tensor | None]] = {i: [None] * len(ps) for i, ps in self.groups.items()}

    def apply(self, tokens: int) -> dict[int, bool]:
        """Returns, per level, whether it is stepped by this optimizer step."""
        stepped = {}
        for i, params in self.groups.items():
            self.tokens_since[i] += tokens
            self.steps_accumulated[i] += 1
            due = self.tokens_since[i] >= self.periods[i]
            for j, p in enumerate(params):
                if p.grad is None:
                    continue
                buf = self.buffers[i][j]
                self.buffers[i][j] = p.grad.detach().clone() if buf is None else buf.add_(p.grad)
                if due:
                    p.grad = self.buffers[i][j].div_(self.steps_accumulated[i])
                    self.buffers[i][j] = None
                else:
                    p.grad = None
            if due:
                self.tokens_since[i], self.steps_accumulated[i] = 0, 0
            stepped[i] = due
        return stepped

    def state_dict(self) -> dict:
        return {"tokens_since": dict(self.tokens_since), "steps_accumulated": dict(self.steps_accumulated),
                "buffers": {i: [None if b is None else b.clone() for b in bufs] for i, bufs in self.buffers.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.tokens_since = {int(k): v for k, v in sd["tokens_since"].items()}
        self.steps_accumulated = {int(k): v for k, v in sd["steps_accumulated"].items()}
        self.buffers = {int(k): list(v) for k, v in sd["buffers"].items()}


class CMSStreamLearner:
    """Test-time / deployment learning: read a stream and update CMS levels at their periods (Eq. 71).

    Each level owns its update: theta_l <- theta_l - lr_l * mean of the next-token-loss gradients over the
    ``period_l`` tokens since its last update. Nothing else is trained and no optimizer state is kept.
    The sequence-mixer memory state is carried across segments, so the model reads one continuous stream.
    """

    def __init__(self, model: nn.Module, lr: float | dict[int, float] = 1e-3,
                 trainable_levels: Iterable[int] | None = None, segment_len: int | None = None,
                 levels: dict[int, tuple[list[nn.Parameter], int]] | None = None):
        """``levels`` (index -> (parameters, period)) defaults to the model's CMS levels; giving it applies
        the same rule to other parameters (e.g. a baseline's MLPs as one level)."""
        self.model = model
        if levels is None:
            self.groups, self.periods = cms_level_parameters(model), cms_level_periods(model)
        else:
            self.groups = {i: list(ps) for i, (ps, _) in levels.items()}
            self.periods = {i: int(period) for i, (_, period) in levels.items()}
        self.trainable = sorted(self.groups if trainable_levels is None else trainable_levels)
        unknown = [i for i in self.trainable if i not in self.groups]
        if unknown:
            raise ValueError(f"trainable_levels {unknown} do not exist; the model has CMS levels {sorted(self.groups)}")
        self.lr = {i: (lr[i] if isinstance(lr, dict) else lr) for i in self.trainable}
        periods = [self.periods[i] for i in self.trainable]
        self.segment_len = segment_len or (min(periods) if periods else 512)
        for i in self.trainable:
            if self.periods[i] % self.segment_len:
                raise ValueError(f"CMS level {i} period {self.periods[i]} is not a multiple of the stream "
                                 f"segment length {self.segment_len}")
        self.tokens_since = {i: 0 for i in self.trainable}
        self.grad_sum = {i: [torch.zeros_like(p) for p in self.groups[i]] for i in self.trainable}
        self.segments_since = {i: 0 for i in self.trainable}
        self.state = None
        self.updates = {i: 0 for i in self.trainable}

    def reset_memory(self) -> None:
        """Forget the sequence-mixer memory (start of a new document); CMS levels keep what they learned."""
        self.state = None

    def feed(self, tokens: torch.Tensor) -> float:
        """Read ``tokens`` [B, N] (continuing the stream); returns the mean next-token loss before updates."""
        total, count = 0.0, 0
        for a in range(0, tokens.shape[1] - 1, self.segment_len):
            seg = tokens[:, a:a + self.segment_len + 1]
            if seg.shape[1] < 2:
                break
            inputs, labels = seg[:, :-1], seg[:, 1:]
            params = [p for i in self.trainable for p in self.groups[i]]
            if self.state is None:
                self.state = self.model.init_state(tokens.shape[0])
            with torch.enable_grad():
                logits, self.state = self.model(inputs, state=self.state)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
                grads = torch.autograd.grad(loss, params) if params else []
            self.state = _detach(self.state)
            total, count = total + loss.item() * labels.numel(), count + labels.numel()
            self._accumulate_and_update(grads, inputs.shape[1])
        return total / max(count, 1)

    @torch.no_grad()
    def _accumulate_and_update(self, grads, n_tokens: int) -> None:
        it = iter(grads)
        for i in self.trainable:
            for acc in self.grad_sum[i]:
                acc.add_(next(it))
            self.tokens_since[i] += n_tokens
            self.segments_since[i] += 1
            if self.tokens_since[i] >= self.periods[i]:
                for p, acc in zip(self.groups[i], self.grad_sum[i]):
                    p.sub_(self.lr[i] * acc / self.segments_since[i])
                    acc.zero_()
                self.tokens_since[i], self.segments_since[i] = 0, 0
                self.updates[i] += 1


def _detach(obj):
    """Detach every tensor inside a (nested) recurrent state so the stream does not grow the graph."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{f: _detach(getattr(obj, f)) for f in obj.__dataclass_fields__})
    return obj
