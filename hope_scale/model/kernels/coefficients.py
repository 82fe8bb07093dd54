"""``memory.chunk_coefficients`` as one Triton launch per direction (``triton_coefficients.py``).

A chunk's state-independent coefficients -- the decay products gamma and D (= E without momentum), the erase
system's terms and its triangular inverse, and for reads D * (Q K^T) -- are about 37 PyTorch operations forward and
48 backward. The main memory computes them once per sequence for all its chunks, but the projection memories read
their keys, eta and alpha from their own chunk-start state, so they compute them once per chunk: at 64-token chunks
that was about half of a projection chunk's operations in a training step (docs/training.md, section 7). Here the
forward is one kernel launch and the backward another; ``model.kernel: triton`` uses them wherever the layer or its
chunk step computes coefficients (``SelfModifyingTitans.coefficients`` and ``kernel_chunk_step``).

Without momentum only (beta = 0: E = D and c = 0, so ``c_vec`` and ``c_prev`` are None, as ``memory.chunk_update``
allows without momentum); C and d up to 64; one dtype of float32, bfloat16, float16. Anything else computes
``memory.chunk_coefficients`` in PyTorch, with a warning naming the reason, once per reason.
"""

from __future__ import annotations

import torch

from ..memory import ChunkCoefficients, chunk_coefficients
from .chunk_update import _flat, tensors_unsupported, warn_once


class CoefficientsFunction(torch.autograd.Function):
    """Inputs: erase, then keys [N, C, d], eta, alpha [N, C], queries [N, C, d] or None (flat, contiguous).
    Outputs: the present ones of ``triton_coefficients.OUTPUTS``, in that order."""

    @staticmethod
    def forward(ctx, erase: bool, keys, eta, alpha, queries):
        from .triton_coefficients import launch_chunk_coefficients

        outs = launch_chunk_coefficients(keys, eta, alpha, queries, erase=erase)
        ctx.save_for_backward(keys, eta, alpha, queries)
        ctx.erase, ctx.present = erase, [t is not None for t in outs]
        return tuple(t for t in outs if t is not None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        from .triton_coefficients import launch_chunk_coefficients_bwd

        found = iter(grads)
        grads = [next(found) if present else None for present in ctx.present]
        keys, eta, alpha, queries = ctx.saved_tensors
        g = launch_chunk_coefficients_bwd(keys, eta, alpha, queries, grads, erase=ctx.erase)
        return (None,) + tuple(t if need else None for t, need in zip(g, ctx.needs_input_grad[1:]))


def coefficients_unsupported(keys: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, beta: float,
                             queries: torch.Tensor | None) -> str | None:
    """Why the coefficient kernels cannot compute these chunks' coefficients (None: they can)."""
    from .triton_coefficients import INTERPRETED, MAX_BLOCK

    if beta != 0:
        return f"inner_momentum={beta} (the coefficient kernel has no momentum; beta = 0 only)"
    reason = tensors_unsupported([keys, eta, alpha, queries], INTERPRETED)
    if reason:
        return reason
    c, d = keys.shape[-2:]
    if max(c, d) > MAX_BLOCK:
        return f"C={c}, d={d}: the coefficient kernel keeps a chunk's C x C matrices on chip, up to {MAX_BLOCK}"
    return None


def kernel_chunk_coefficients(keys: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, beta: float, erase: bool,
                              queries: torch.Tensor | None = None) -> ChunkCoefficients:
    """``memory.chunk_coefficients`` (same arguments, the same coefficients; ``c_vec`` and ``c_prev`` None: zero
    without momentum) through the Triton kernels where supported, else ``memory.chunk_coefficients`` itself with a
    warning naming the reason (once per reason)."""
    reason = coefficients_unsupported(keys, eta, alpha, beta, queries)
    if reason:
        warn_once(f"model.kernel=triton: the chunk coefficients are computed in PyTorch: {reason}")
        return chunk_coefficients(keys, eta, alpha, beta, erase, queries=queries)
    shapes = [keys.shape[:-2], eta.shape[:-1], alpha.shape[:-1]] + ([queries.shape[:-2]] if queries is not None
                                                                    else [])
    batch = torch.broadcast_shapes(*shapes)
    outs = iter(CoefficientsFunction.apply(erase, _flat(keys, batch, 2), _flat(eta, batch, 1),
                                           _flat(alpha, batch, 1), _flat(queries, batch, 2)))
    unflat = lambda t: t.view(*batch, *t.shape[1:])  # noqa: E731
    gamma, d_mat = unflat(next(outs)), unflat(next(outs))
    gamma_prev, e_kk_prev, inverse = (unflat(next(outs)) for _ in range(3)) if erase else (None, None, None)
    d_qk = unflat(next(outs)) if queries is not None else None
    # beta = 0: E = D and E_qk = D_qk (one tensor each: autograd sums the gradients of both uses)
    return ChunkCoefficients(eta, gamma, None, d_mat, d_mat, gamma_prev, None, e_kk_prev, inverse, d_qk, d_qk)
