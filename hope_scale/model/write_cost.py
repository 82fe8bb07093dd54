"""A cost on memory writes (``model.write_cost`` = λ): the auxiliary training loss

    L_write = λ · mean over layers, heads and tokens of η_t / η_max

that a training forward of a Hope or Titans model adds to its language-model loss (docs/hope-design.md §6.7).
A 128-token training sequence never makes a memory pay for writing haystack tokens; beyond the training length
those writes bury what matters. The cost makes every write pay.

Its gradient is added where η is computed, not through the loss (the pattern of Megatron-Core's MoE auxiliary
loss): the loss every driver backpropagates stays the cross-entropy, so pipeline stages (whose layers never see
the loss), tensor-parallel head shards and ZeRO need no change. Per token of a training forward of B sequences of
T tokens,

    ∂L_write / ∂η_t = λ · s / (η_max · n_layers · B · H · T)

with H the model's (global) number of heads and s the factor the driver's backward applies to each micro-batch's
loss (1 / micro-batches: ``TrainStep``; 1 / gradient accumulation steps: DeepSpeed), set with
``loss_grad_scale``. Data-parallel ranks average gradients as they average the cross-entropy's. The reported loss
stays the cross-entropy; ``last_stats["eta"]`` of every layer is the mean η, the cost's other factor.
"""

from __future__ import annotations

import contextlib

import torch

_LOSS_GRAD_SCALE = [1.0]


@contextlib.contextmanager
def loss_grad_scale(scale: float):
    """Within the block, write costs are scaled like a loss the driver backpropagates times ``scale`` (read at each
    forward, so wrap the forwards of an optimizer step)."""
    prev = _LOSS_GRAD_SCALE[0]
    _LOSS_GRAD_SCALE[0] = float(scale)
    try:
        yield
    finally:
        _LOSS_GRAD_SCALE[0] = prev


def eta_gradient(cfg, batch_size: int, seq_len: int) -> float:
    """∂L_write/∂η_t of every token of a training forward of ``batch_size`` x ``seq_len`` tokens (module docstring)."""
    n_writes = cfg.n_layers * batch_size * cfg.n_heads * seq_len
    return cfg.write_cost * _LOSS_GRAD_SCALE[0] / (cfg.eta_max * n_writes)


class _AddToGradient(torch.autograd.Function):
    """Identity in the forward; adds a constant to the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, constant: float) -> torch.Tensor:
        ctx.constant = constant
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad + ctx.constant, None


def charge_writes(eta: torch.Tensor, gradient: float) -> torch.Tensor:
    """``eta`` unchanged, with ``gradient`` added to its gradient (once, whatever uses it downstream)."""
    if gradient == 0.0 or not (torch.is_grad_enabled() and eta.requires_grad):
        return eta
    return _AddToGradient.apply(eta, gradient)
