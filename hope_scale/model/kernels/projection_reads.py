"""A projection-memory chunk's reads as one Triton launch per direction (``triton_projection.py``).

Each of Hope's 64-token projection chunks reads k, v, q, eta and alpha from the projection memories at the chunk's
start and takes every memory's self-generated targets M_p(v) there (``titans.projection_reads``): in PyTorch about
20 operations forward (the five stacked reads, three normalizations, two means and sigmoids, the targets) and twice
that backward, repeated by activation checkpointing's recomputation, for every chunk of every layer -- after the
coefficient kernels, the largest share of a projection chunk's operations (docs/training.md, section 7). Here the
forward is one kernel launch and the backward another.

Runs for the first-order rule (the targets' weights are constants of the outer gradient) and the paper's
m(x) = x + W1 silu(W2 x) (no branch norm), with C, d and h up to 64 and one dtype of float32, bfloat16, float16;
anything else runs ``titans.projection_reads`` in PyTorch, with a warning naming the reason, once per reason.
"""

from __future__ import annotations

import torch

from .chunk_update import _flat, tensors_unsupported, warn_once


class ProjectionReadsFunction(torch.autograd.Function):
    """Inputs: the launch options (dict), then x [N, PX, C, d], w1, w2 [N, P, ...], static_q [N, C, d] or None,
    eta_bias, alpha_bias [H] (flat, contiguous). Outputs: k, v, q [N, C, d], eta, alpha [N, C],
    targets [N, P, C, d]."""

    @staticmethod
    def forward(ctx, options: dict, x, w1, w2, static_q, eta_bias, alpha_bias):
        from .triton_projection import launch_projection_reads

        ctx.save_for_backward(x, w1, w2, static_q, eta_bias, alpha_bias)
        ctx.options = options
        return launch_projection_reads(x, w1, w2, static_q, eta_bias, alpha_bias, **options)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        from .triton_projection import launch_projection_reads_bwd

        x, w1, w2, static_q, eta_bias, alpha_bias = ctx.saved_tensors
        g_x, g_w1, g_w2, g_q, g_eta_bias, g_alpha_bias = launch_projection_reads_bwd(
            x, w1, w2, static_q, eta_bias, alpha_bias, [g.contiguous() for g in grads], **ctx.options)
        found = (g_x, g_w1, g_w2, g_q, *bias_grads(g_eta_bias, g_alpha_bias, eta_bias, ctx.options["frozen"]))
        return (None,) + tuple(g if need else None for g, need in zip(found, ctx.needs_input_grad[1:]))


def bias_grads(g_eta_bias: torch.Tensor, g_alpha_bias: torch.Tensor, eta_bias: torch.Tensor, frozen: bool):
    """The biases' gradients [H] from a kernel's per-program ones [N, ...] (program n has head n % H: summed over
    the batch and the trailing axes), in the biases' dtype; None for a frozen memory (eta and alpha are constants
    there: the biases enter nothing)."""
    if frozen:
        return None, None
    heads = eta_bias.shape[0]
    return tuple(g.reshape(-1, heads, g[0].numel()).sum((0, 2)).to(eta_bias.dtype) for g in (g_eta_bias, g_alpha_bias))


def kernel_inputs(inputs: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """The projection memories' inputs [B, H, P|1, T, d] as the kernels take them, [N, P|1, T, d]: a view of the
    forward's (the kernels take their strides) where the batch axes allow, else a contiguous copy."""
    if inputs.stride(-1) == 1:
        return inputs.expand(*batch, *inputs.shape[2:]).flatten(0, 1)
    return _flat(inputs, batch, 3)


def projection_reads_unsupported(layer, w1: torch.Tensor, w2: torch.Tensor, inputs: torch.Tensor,
                                 static_q: torch.Tensor | None) -> str | None:
    """Why the kernels cannot compute this chunk's reads (None: they can)."""
    from .triton_projection import INTERPRETED, MAX_BLOCK

    if not layer.cfg.first_order:
        return "first_order=False (the projection-reads kernel's targets are first-order)"
    if layer.cfg.mem_branch_norm:
        return "mem_branch_norm=True (the projection-reads kernel implements m(x) = x + W1 silu(W2 x) only)"
    reason = tensors_unsupported([w1, w2, inputs, static_q, layer.eta_bias, layer.alpha_bias], INTERPRETED)
    if reason:
        return reason
    c, d, hid = inputs.shape[-2], inputs.shape[-1], w1.shape[-1]
    if max(c, d, hid) > MAX_BLOCK:
        return f"C={c}, d={d}, h={hid}: the projection-reads kernel keeps a chunk on chip, up to {MAX_BLOCK} each"
    return None


def kernel_projection_reads(layer, w1: torch.Tensor, w2: torch.Tensor, inputs: torch.Tensor,
                            static_q: torch.Tensor | None):
    """``titans.projection_reads`` (same arguments, same results) through the Triton kernels where supported, else
    ``titans.projection_reads`` itself with a warning naming the reason (once per reason)."""
    from ..titans import projection_reads

    reason = projection_reads_unsupported(layer, w1, w2, inputs, static_q)
    if reason:
        warn_once(f"model.kernel=triton: the projection memories' reads run in PyTorch: {reason}")
        return projection_reads(layer, w1, w2, inputs, static_q)
    batch = w1.shape[:2]  # [B, H]
    options = dict(n_heads=layer.eta_bias.shape[0], eta_max=layer.cfg.eta_max,
                   normalize_values=layer.cfg.normalize_values, frozen=layer.memory_frozen)
    # the chunk's inputs as a view of the forward's, not a copy per chunk
    outs = ProjectionReadsFunction.apply(options, kernel_inputs(inputs, batch), _flat(w1, batch, 3),
                                         _flat(w2, batch, 3), _flat(static_q, batch, 2), layer.eta_bias,
                                         layer.alpha_bias)
    return tuple(t.view(*batch, *t.shape[1:]) for t in outs)
