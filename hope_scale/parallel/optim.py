"""AdamW with Continuum-Memory-System level scheduling that works wherever ZeRO keeps the gradient.

CMS level l must change only every ``period_l`` stream tokens, by the mean of the gradients accumulated since
its last update (paper Eq. 71). This optimizer is the one every training run uses: ``TrainEngine`` through
DeepSpeed, ``hope_scale.train.step.TrainStep`` on one process. Under ZeRO 1-3 and DeepSpeed's bf16 optimizer, ``p.grad`` is not what the optimizer reads:
gradients are reduced into flat fp32 partitions, one per parameter group, and the torch optimizer steps those.
So the schedule is applied *inside* the optimizer's ``step`` -- the one point that sees every gradient exactly
as it is about to be applied (reduced across data-parallel ranks, unscaled, clipped), whatever the ZeRO stage:

* every CMS level has its own parameter groups (tagged ``cms_level``), so a flat partition never mixes levels;
* on a step where level l is not due, its gradient is added to the optimizer-state buffer ``cms_grad_sum`` and
  hidden from AdamW (``grad = None``): no moment update, no step count, no weight decay -- the level's weights and
  optimizer state are untouched;
* on the step where it is due, AdamW receives ``(cms_grad_sum + grad) / n_steps`` and the buffer is cleared.

``cms_grad_sum`` lives in the optimizer state next to ``exp_avg``/``exp_avg_sq``, so DeepSpeed's per-parameter
state API (``safe_get_full_optimizer_state``) reads and writes it like a moment, and checkpoints reshard it.
Optimizer state is created eagerly (``materialize_state`` after DeepSpeed has built its partitions, and for
every parameter of every group on each ``step``, also when the group is skipped), so all keys exist.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

CMS_BUFFER = "cms_grad_sum"
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


class CMSAdamW(torch.optim.AdamW):
    def __init__(self, param_groups, **kwargs):
        super().__init__(param_groups, **kwargs)
        # level -> (due this step, number of steps whose gradients the update averages)
        self.level_plan: dict[int, tuple[bool, int]] = {}
        self.skip_all = False  # a step that only materializes state (no parameter or state changes)
        self.group_tag_of: dict[torch.Tensor, str] = {}

    def _ensure_state(self, p: torch.Tensor, group: dict) -> None:
        st = self.state[p]
        if len(st) == 0:  # exactly AdamW's lazy initialization (non-fused, non-capturable)
            st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("cms_level") is not None and CMS_BUFFER not in st:
            st[CMS_BUFFER] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.group_tag_of[p] = group["tag"]

    def materialize_state(self) -> None:
        """Create the state of every parameter the groups hold now (DeepSpeed ZeRO 1/2 links its per-parameter
        state views once, after the first step of the first group, so all groups' state must exist by then)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(p, group)

    @torch.no_grad()
    def step(self, closure=None):
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(p, group)
            level = group.get("cms_level")
            if self.skip_all:
                skip = True
            elif level is None:
                skip = False
            else:
                due, n_steps = self.level_plan.get(level, (True, 1))
                skip = not due
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    buf = self.state[p][CMS_BUFFER]
                    if due:
                        if n_steps > 1:
                            p.grad.add_(buf).div_(n_steps)
                        buf.zero_()
                    else:
                        buf.add_(p.grad)
            if skip:
                for p in group["params"]:
                    if p.grad is not None:
                        hidden.append((p, p.grad))
                        p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, g in hidden:
                p.grad = g

    # --- step counters by group tag (layout independent: every layout has the same tags) -------------
    def group_steps(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p, tag in self.group_tag_of.items():
            out[tag] = int(self.state[p]["step"].item())
        return out

    def set_group_steps(self, steps: dict[str, int]) -> None:
        for p, tag in self.group_tag_of.items():
            if tag in steps:
                self.state[p]["step"].fill_(float(steps[tag]))
