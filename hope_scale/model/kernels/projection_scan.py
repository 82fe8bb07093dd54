"""The projection memories' scan over a forward's whole chunks (``titans.scan_projection_chunks``) as one Triton
launch per direction (``triton_projection_scan.py``).

Per 64-token chunk the projection memories read k, v, q, eta, alpha and their targets from their chunk-start
weights, compute the chunk's coefficients and update all five memories: with the per-chunk kernels that is three
launches forward and three backward, plus about 29 PyTorch operations (gradient sums of the shared inputs, autograd's
accumulation, casts), for every chunk of every layer, the largest share of a hope-760m training step's operations
left (docs/training.md, section 7). Here one program per memory stack runs all of a forward's whole chunks, forward
and backward, and the Python loop over projection chunks is gone from the layer.

Runs where the projection-reads kernel and the chunk kernels' forward and backward would (first-order rule, no
momentum, no branch norm, Rayleigh step bound or none, C, d and h within the tiles: ``scan_unsupported``); anything
else scans one chunk at a time (``titans.scan_projection_chunks``, which uses the per-chunk kernels where they
apply), with a warning naming the reason, once per reason.
"""

from __future__ import annotations

import torch

from ..memory import MemoryState
from ..write_cost import charge_writes
from .chunk_update import _flat, backward_tiles_unsupported, rule_unsupported, triton_out_of_resources, warn_once
from .projection_reads import bias_grads, kernel_inputs, projection_reads_unsupported


class ProjectionScan(torch.autograd.Function):
    """Inputs: the launch options (dict), the number of chunks, then x [N, PX, T, d] (any strides but a unit one
    along d), w1, w2 [N, P, ...], static_q [N, T, d] or None, eta_bias, alpha_bias [H], anchor1, anchor2
    [H P, ...] or None. Outputs: the end state w1, w2, s1, s2 [N, P, ...], k, v, q [N, n_chunks, C, d], eta,
    alpha [N, n_chunks, C], overshoot and scale [N, n_chunks, P]."""

    @staticmethod
    def forward(ctx, options: dict, n_chunks: int, x, w1, w2, static_q, eta_bias, alpha_bias, anchor1, anchor2):
        from .triton_projection_scan import launch_projection_scan

        *outs, starts1, starts2 = launch_projection_scan(x, w1, w2, static_q, eta_bias, alpha_bias, anchor1, anchor2,
                                                         n_chunks=n_chunks, options=options)
        k, v, _, eta, alpha, overshoot, scale = outs[4:]
        ctx.save_for_backward(x, static_q, eta_bias, alpha_bias, anchor1, anchor2, starts1, starts2, k, v, eta, alpha)
        ctx.options = options
        ctx.mark_non_differentiable(overshoot, scale)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        from .triton_projection_scan import launch_projection_scan_bwd

        saved = ctx.saved_tensors  # unpacked once (activation checkpointing allows no more)
        x, static_q, eta_bias, alpha_bias, anchor1, anchor2, starts1 = saved[:7]
        g_x, g_w1, g_w2, g_q, g_eta_bias, g_alpha_bias, g_a1, g_a2 = launch_projection_scan_bwd(
            *saved, grads[:9], options=ctx.options)
        # per stack and chunk: summed over the batch and the chunks
        g_eta_bias, g_alpha_bias = bias_grads(g_eta_bias, g_alpha_bias, eta_bias, ctx.options["frozen"])
        if anchor1 is not None:  # stack n's anchors are entries (n % N_A) P + p
            g_a1, g_a2 = (g.flatten(0, 1).view(-1, *a.shape).sum(0) for g, a in ((g_a1, anchor1), (g_a2, anchor2)))
        found = (g_x, g_w1, g_w2, g_q, g_eta_bias, g_alpha_bias, g_a1, g_a2)
        like = (x, starts1, starts1, x, eta_bias, alpha_bias, anchor1, anchor2)
        return (None, None) + tuple(g.to(t.dtype) if need and g is not None else None
                                    for g, t, need in zip(found, like, ctx.needs_input_grad[2:]))


def options(layer) -> dict:
    """The layer's settings the scan kernels are compiled for."""
    cfg = layer.cfg
    return dict(eta_max=cfg.eta_max, normalize_values=cfg.normalize_values, adaptive_q=layer.adaptive_q,
                frozen=layer.memory_frozen, erase=layer.erase, step_bound=layer.rule.step_bound,
                normalized_eta=layer.rule.normalized_eta)


def scan_unsupported(layer, proj: MemoryState, inputs: torch.Tensor, static_q: torch.Tensor | None) -> str | None:
    """Why the scan kernels cannot run these chunks (None: they can)."""
    reason = rule_unsupported(layer.beta, layer.rule)
    if reason:
        return reason
    chunk = inputs[..., :layer.cfg.chunk_size_projection, :]
    reason = projection_reads_unsupported(layer, proj.w1, proj.w2, chunk, static_q)
    if reason:
        return reason
    return backward_tiles_unsupported(chunk, proj.w1, "the projection scan's backward")


def kernel_scan_projection_chunks(layer, proj: MemoryState, inputs: torch.Tensor, static_q: torch.Tensor | None,
                                  write_grad: float):
    """``titans.scan_projection_chunks`` (same arguments, same result) in one launch per direction where supported,
    else ``titans.scan_projection_chunks`` itself with a warning naming the reason (once per reason)."""
    from ..titans import scan_projection_chunks

    reason = scan_unsupported(layer, proj, inputs, static_q)
    if reason:
        warn_once(f"model.kernel=triton: the projection memories run one chunk at a time: {reason}")
        return scan_projection_chunks(layer, proj, inputs, static_q, write_grad)
    batch = proj.w1.shape[:2]  # [B, H]
    n_chunks = inputs.shape[3] // layer.cfg.chunk_size_projection
    anchor = layer.retention_anchor(True)
    anchor1, anchor2 = (a.flatten(0, 1) for a in anchor) if anchor is not None else (None, None)
    try:
        w1, w2, s1, s2, k, v, q, eta, alpha, overshoot, scale = ProjectionScan.apply(
            options(layer), n_chunks, kernel_inputs(inputs, batch), _flat(proj.w1, batch, 3), _flat(proj.w2, batch, 3),
            _flat(static_q, batch, 2), layer.eta_bias, layer.alpha_bias, anchor1, anchor2)
    except triton_out_of_resources() as e:  # a GPU with less shared memory than an H100's: the tiles do not fit
        warn_once(f"model.kernel=triton: the projection memories run one chunk at a time: {e}")
        return scan_projection_chunks(layer, proj, inputs, static_q, write_grad)
    unflat = lambda t: t.view(*batch, *t.shape[1:])  # noqa: E731
    proj = proj.advanced(unflat(w1), unflat(w2), unflat(s1), unflat(s2))
    k, v, q, eta, alpha = (unflat(t).flatten(2, 3) for t in (k, v, q, eta, alpha))
    bounds = list(zip(unflat(overshoot).unbind(2), unflat(scale).unbind(2)))
    return k, v, q, charge_writes(eta, write_grad), alpha, proj, bounds
