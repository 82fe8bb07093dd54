"""The main memory's scan over a forward's whole chunks (``titans.scan_chunks``) as one Triton launch per direction.

The per-chunk kernel (``chunk_update.py``) still leaves the layer a Python loop with one launch, the self-generated
targets M(v) and a few tensor operations per chunk: at seq 4096 and chunk 16 that is 256 iterations per layer, and
the measured hope-760m step on an H200 was bound by those operations (docs/training.md, section 7). Here one
program per memory (batch x heads) runs all of the memory's chunks with the weights on chip
(``triton_chunk._sequence_update_kernel``): per chunk it computes the targets M(v) at the chunk-start weights,
then the same chunk body as the per-chunk kernel (``_chunk_forward``), and stores the chunk-start weights for the
backward. The backward (``_sequence_update_bwd_kernel``) runs the chunks in reverse from those weights, carrying
dLoss/dW from chunk to chunk, with the per-chunk backward's body (``_chunk_backward``).

Runs where the per-chunk kernel's forward and fused backward both would (``chunk_update.unsupported_reason``,
``triton_chunk.BWD_MAX_BLOCK``) and the rule is first-order (the targets' weights and the inner gradients' are
then constants of the outer gradient); anything else scans with ``titans.scan_chunks``, one per-chunk step each
(the per-chunk kernel where it applies), with a warning naming the reason, once per reason.
"""

from __future__ import annotations

import torch

from ..memory import ChunkCoefficients, MemoryState, UpdateRule
from .chunk_update import (MATRIX_FIELDS, _flat, backward_tiles_unsupported, triton_out_of_resources,
                           unsupported_reason, warn_once)

# coefficient fields the kernel reads (c_vec and c_prev carry the momentum, which it does not have: beta = 0)
COEF_FIELDS = ("eta", "gamma", "d_mat", "e_mat", "gamma_prev", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")


class SequenceUpdate(torch.autograd.Function):
    """Inputs: ``triton_chunk.SEQUENCE_INPUTS``, flat (leading axis N) and contiguous, None where absent. Outputs:
    w1, w2, s1, s2 after chunk n_full - 1, reads [N, n_chunks, C, d], overshoot and scale [N, n_chunks]."""

    @staticmethod
    def forward(ctx, rule: UpdateRule, n_full: int, self_target: bool, *tensors):
        from .triton_chunk import launch_sequence_update

        w1, w2, s1, s2, starts1, starts2, reads, overshoot, scale = launch_sequence_update(
            tensors, n_full=n_full, step_bound=rule.step_bound, normalized_eta=rule.normalized_eta,
            self_target=self_target)
        ctx.save_for_backward(*tensors, starts1, starts2)
        ctx.rule, ctx.n_full, ctx.self_target = rule, n_full, self_target
        ctx.mark_non_differentiable(overshoot, scale)
        ctx.set_materialize_grads(False)
        return w1, w2, s1, s2, reads, overshoot, scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_w1, g_w2, g_s1, g_s2, g_reads, _overshoot, _scale):
        from .triton_chunk import launch_sequence_update_bwd

        *tensors, starts1, starts2 = ctx.saved_tensors  # unpacked once (activation checkpointing allows no more)
        found = launch_sequence_update_bwd(tensors, (starts1, starts2), (g_w1, g_w2, g_s1, g_s2, g_reads),
                                           n_full=ctx.n_full, step_bound=ctx.rule.step_bound,
                                           normalized_eta=ctx.rule.normalized_eta, self_target=ctx.self_target)
        return (None, None, None) + tuple(g if need else None for g, need in zip(found, ctx.needs_input_grad[3:]))


def scan_unsupported(layer, mem: MemoryState, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                     coef: ChunkCoefficients) -> str | None:
    """Why the sequence kernel cannot scan these chunks (None: it can)."""
    rule = layer.rule
    anchor = layer.retention_anchor(False)
    reason = unsupported_reason(mem, keys, values, coef, layer.beta, rule, queries, anchor)
    if reason:
        return reason
    if not rule.first_order:
        return "first_order=False (the sequence kernel's targets and backward are first-order)"
    return backward_tiles_unsupported(keys, mem.w1, "the sequence kernel's backward")


def kernel_scan_chunks(layer, mem: MemoryState, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                       eta: torch.Tensor, alpha: torch.Tensor, coef: ChunkCoefficients, n_valid: int):
    """``titans.scan_chunks`` (same arguments, same result) in one launch of the sequence kernel where supported,
    else ``titans.scan_chunks`` itself with a warning naming the reason (once per reason)."""
    from ..titans import scan_chunks

    reason = scan_unsupported(layer, mem, keys, values, queries, coef)
    if reason:
        warn_once(f"model.kernel=triton: the main memory's chunks run one chunk step each: {reason}")
        return scan_chunks(layer, mem, keys, values, queries, eta, alpha, coef, n_valid)
    batch = mem.w1.shape[:-2]  # [B, H]
    n_chunks, c_len = keys.shape[-3], keys.shape[-2]
    n_full = n_chunks if n_valid == c_len else n_chunks - 1
    anchor1, anchor2 = layer.retention_anchor(False) or (None, None)
    tensors = [_flat(t, batch, 2) for t in (mem.w1, mem.w2)]
    tensors += [_flat(t, batch, 3) for t in (values, keys, queries)]
    tensors += [_flat(t, batch, 2) for t in (anchor1, anchor2)]
    tensors += [_flat(getattr(coef, f), batch, 3 if f in MATRIX_FIELDS else 2) for f in COEF_FIELDS]
    try:
        w1, w2, s1, s2, reads, overshoot, scale = SequenceUpdate.apply(layer.rule, n_full, layer.self_modifying,
                                                                       *tensors)
    except triton_out_of_resources() as e:  # a GPU with less shared memory than an H100's: the tiles do not fit
        warn_once(f"model.kernel=triton: the main memory's chunks run one chunk step each: {e}")
        return scan_chunks(layer, mem, keys, values, queries, eta, alpha, coef, n_valid)
    unflat = lambda t: t.view(*batch, *t.shape[1:])  # noqa: E731
    bounds = list(zip(unflat(overshoot).unbind(-1), unflat(scale).unbind(-1)))[:n_full]  # per chunk, as scan_chunks
    if n_full:
        mem = mem.advanced(unflat(w1), unflat(w2), unflat(s1), unflat(s2))
    if n_full < n_chunks:  # the padded last chunk waits in the state, with its targets at the state's weights
        targets = layer.memory_targets(mem, values[:, :, -1, :n_valid])
        mem = mem.buffered(0, keys[:, :, -1, :n_valid], targets, eta[:, :, -1, :n_valid], alpha[:, :, -1, :n_valid])
    return unflat(reads).flatten(2, 3), mem, bounds
