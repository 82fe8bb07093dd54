"""The Triton kernels of the projection memories' scan over a forward's whole chunks (``projection_scan.py``).

One program per memory stack (batch x head) runs all of the stack's 64-token chunks in order. Per chunk n, from
the stacked memories' chunk-start weights W_p (p = k, v, eta, alpha, q):

    k, v, q, eta, alpha, V̂_p = M_p(v)      ``triton_projection._projection_reads``
    gamma, D = E, the erase system          ``triton_coefficients._coefficients`` (shared by the P memories)
    W_p <- the chunk's update of W_p        ``triton_chunk._chunk_forward``, for each p

so a chunk is three function calls inside one program instead of three kernel launches and the tensor work
between them. Each chunk's start weights are stored (``starts``, [N, n_chunks, P, ...]): the next chunk reads
them, and the backward starts from them. The five memories' weights do not fit on chip at once (5 x 2 x 64 x 64
in fp32 is 160 KiB), so they pass from chunk to chunk through those stores, and the reads, targets and
coefficients through global scratch: every phase that reads what another thread of the program stored waits at a
``tl.debug_barrier()`` first (the interpreter runs a program's threads as one, so the tests cannot check those
barriers; the GPU check can).

The backward (``_projection_scan_bwd_kernel``) runs the chunks in reverse, carrying dLoss/dW_p (fp32, in global
memory) from chunk to chunk. Per chunk it recomputes the targets and coefficients, runs each memory's update
backward (``_chunk_backward``: the start weights' gradient, and per memory the gradients of the shared keys, eta,
coefficients and of its targets), sums the shared gradients over the memories and takes them through the
coefficients (``_coefficients_bwd``) onto k, eta and alpha, adds those to the gradients the rest of the layer
gave k, eta and alpha, and takes everything through the reads (``_projection_reads_bwd``) onto the inputs, the
static queries, the biases and the start weights. First-order rule only (the targets' weights and the inner
gradients' are constants of the outer gradient), no momentum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_chunk import (PRECISION, _chunk_backward, _chunk_forward, _load_tile, _load_vec, _on_device,
                           _store_start_grads, _store_state, _store_tile, _store_vec, _targets, block, num_warps)
from .triton_coefficients import _coefficients, _coefficients_bwd, _decay, _log_decays
from .triton_projection import _projection_reads, _projection_reads_bwd


@triton.jit
def _summed_tile(ptr, base, P, R, K, BR: tl.constexpr, BK: tl.constexpr):
    """The sum over p < P of the [R, K] matrices at entries base P + p (one per memory of a stack), in fp32."""
    total = tl.full([BR, BK], 0.0, dtype=tl.float32)
    for p in range(P):
        total += _load_tile(ptr, base * P + p, R, K, BR, BK)
    return total


@triton.jit
def _summed_vec(ptr, base, P, N, BN: tl.constexpr):
    """The sum over p < P of the [N] vectors at entries base P + p, in fp32."""
    total = tl.full([BN], 0.0, dtype=tl.float32)
    for p in range(P):
        total += _load_vec(ptr, base * P + p, N, BN)
    return total


@triton.jit
def _projection_scan_kernel(
    x_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr, a1_ptr, a2_ptr,
    starts1_ptr, starts2_ptr, k_out, v_out, q_out, eta_out, alpha_out, overshoot_out, scale_out,
    w1_out, w2_out, s1_out, s2_out,
    targets_ptr, gamma_ptr, d_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr,
    n_chunks, P, PX, sx_n, sx_p, sx_t, H, n_anchors, C, D, HID, eta_max, tiny, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NORM_V: tl.constexpr, ADAPTIVE_Q: tl.constexpr,
    FROZEN: tl.constexpr, NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Memory stack ``pid``'s ``n_chunks`` chunks (the module docstring). Chunk n of the stack is entry
    oid = pid n_chunks + n of the outputs k, v, q, eta, alpha, of the coefficients and of the start weights
    (memory p: entry oid P + p, the first chunk's filled by the launcher); the targets are the stack's scratch
    (entries pid P + p). The state after the last chunk is the outputs w1, w2, s1, s2 (entries pid P + p); the
    anchor of memory p is entry (pid % n_anchors) P + p."""
    pid = tl.program_id(0).to(tl.int64)
    for n in range(n_chunks):
        oid = pid * n_chunks + n
        _projection_reads(x_ptr + pid * sx_n + n * C * sx_t, starts1_ptr, starts2_ptr, static_q_ptr, eta_bias_ptr,
                          alpha_bias_ptr, k_out, v_out, q_out, eta_out, alpha_out, targets_ptr, oid, oid, pid,
                          pid % H, P, PX, sx_p, sx_t, C, D, HID, eta_max, BC, BD, BH, NORM_V, ADAPTIVE_Q, FROZEN,
                          PRECISION)
        tl.debug_barrier()  # the coefficients read the keys, eta and alpha just stored
        _coefficients(k_out, eta_out, alpha_out, k_out, gamma_ptr, d_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr,
                      d_ptr, oid, C, D, tiny, BC, BD, ERASE, False, PRECISION)
        tl.debug_barrier()  # the updates read the coefficients and targets
        for p in range(P):
            new_w1, new_w2, new_s1, new_s2 = _chunk_forward(
                _load_tile(starts1_ptr, oid * P + p, D, HID, BD, BH),
                _load_tile(starts2_ptr, oid * P + p, HID, D, BH, BD),
                _load_tile(targets_ptr, pid * P + p, C, D, BC, BD), oid * P + p, oid, (pid % n_anchors) * P + p,
                k_out, k_out, a1_ptr, a2_ptr, eta_out, gamma_ptr, d_ptr, d_ptr, gamma_prev_ptr, e_kk_prev_ptr,
                inverse_ptr, d_ptr, d_ptr, k_out, overshoot_out, scale_out, C, D, HID, C - 1, step_bound,
                BC, BD, BH, NORMALIZED, BOUND, ERASE, False, ANCHOR, PRECISION)
            if n < n_chunks - 1:  # the next chunk's start weights
                _store_tile(starts1_ptr, (oid + 1) * P + p, new_w1, D, HID, BD, BH)
                _store_tile(starts2_ptr, (oid + 1) * P + p, new_w2, HID, D, BH, BD)
            else:
                _store_state(w1_out, w2_out, s1_out, s2_out, pid * P + p, new_w1, new_w2, new_s1, new_s2,
                             D, HID, BD, BH)
        tl.debug_barrier()  # the next chunk reads the weights just stored and rewrites the scratch


@triton.jit
def _projection_scan_bwd_kernel(
    x_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr, a1_ptr, a2_ptr, starts1_ptr, starts2_ptr,
    k_ptr, v_ptr, eta_ptr, alpha_ptr,
    g_k_ptr, g_v_ptr, g_q_ptr, g_eta_ptr, g_alpha_ptr, g_s1_ptr, g_s2_ptr, g_w1_ptr, g_w2_ptr,
    x_grad, static_q_grad, eta_bias_grad, alpha_bias_grad, a1_grad, a2_grad,
    targets_ptr, gamma_ptr, d_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr,
    targets_grad, w1_grad, w2_grad, keys_grad, eta_grad, gamma_grad, d_grad, e_grad, gamma_prev_grad,
    e_kk_prev_grad, inverse_grad,
    n_chunks, P, PX, sx_n, sx_p, sx_t, H, n_anchors, C, D, HID, eta_max, tiny, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NORM_V: tl.constexpr, ADAPTIVE_Q: tl.constexpr,
    FROZEN: tl.constexpr, NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward of ``_projection_scan_kernel`` (the module docstring), with the forward's indexing.
    ``g_w1_ptr``, ``g_w2_ptr`` (fp32) hold the gradient of the end weights on entry and carry dLoss/dW_p back
    through the chunks: on exit, the initial weights'. ``g_k_ptr``, ``g_eta_ptr`` and ``g_alpha_ptr`` (fp32
    copies of the outputs' gradients) get the update's and the coefficients' gradients added. The anchors'
    gradients (entries pid P + p) are summed over the chunks; everything else is stored per chunk, or is
    per-memory scratch (``targets_grad`` .. ``inverse_grad``: entries pid P + p)."""
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BC)
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        oid = pid * n_chunks + n
        # recompute the chunk's targets and coefficients, as the forward made them
        v = _load_tile(v_ptr, oid, C, D, BC, BD)
        for p in range(P):
            targets = _targets(v, _load_tile(starts1_ptr, oid * P + p, D, HID, BD, BH),
                               _load_tile(starts2_ptr, oid * P + p, HID, D, BH, BD), True, PRECISION)
            _store_tile(targets_ptr, pid * P + p, targets, C, D, BC, BD)
        _coefficients(k_ptr, eta_ptr, alpha_ptr, k_ptr, gamma_ptr, d_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr,
                      d_ptr, oid, C, D, tiny, BC, BD, ERASE, False, PRECISION)
        tl.debug_barrier()

        # each memory's update: dLoss/dW_p at the chunk start, and its gradients of the shared inputs and targets
        for p in range(P):
            mid = pid * P + p
            g_s1 = tl.full([BD, BH], 0.0, dtype=tl.float32)
            g_s2 = tl.full([BH, BD], 0.0, dtype=tl.float32)
            if n == n_chunks - 1:  # the end state's momentum (beta = 0: it enters nothing later, but may be given)
                g_s1 = _load_tile(g_s1_ptr, mid, D, HID, BD, BH)
                g_s2 = _load_tile(g_s2_ptr, mid, HID, D, BH, BD)
            g_w1, g_w2, g_t, g_a1, g_a2 = _chunk_backward(
                _load_tile(starts1_ptr, oid * P + p, D, HID, BD, BH),
                _load_tile(starts2_ptr, oid * P + p, HID, D, BH, BD),
                _load_tile(targets_ptr, mid, C, D, BC, BD), _load_tile(g_w1_ptr, mid, D, HID, BD, BH),
                _load_tile(g_w2_ptr, mid, HID, D, BH, BD), g_s1, g_s2, mid, oid, (pid % n_anchors) * P + p,
                k_ptr, k_ptr, a1_ptr, a2_ptr, eta_ptr, gamma_ptr, d_ptr, d_ptr, gamma_prev_ptr, e_kk_prev_ptr,
                inverse_ptr, d_ptr, d_ptr, k_ptr, keys_grad, keys_grad, eta_grad, gamma_grad, d_grad, e_grad,
                gamma_prev_grad, e_kk_prev_grad, inverse_grad, d_grad, d_grad, C, D, HID, C - 1, step_bound,
                BC, BD, BH, NORMALIZED, BOUND, ERASE, False, ANCHOR, PRECISION)
            if ANCHOR:
                g_a1 += _load_tile(a1_grad, mid, D, HID, BD, BH)
                g_a2 += _load_tile(a2_grad, mid, HID, D, BH, BD)
            tl.debug_barrier()  # every thread has read the carried gradient before it is overwritten
            _store_start_grads(g_w1_ptr, g_w2_ptr, targets_grad, a1_grad, a2_grad, mid, g_w1, g_w2, g_t, g_a1, g_a2,
                               C, D, HID, BC, BD, BH, ANCHOR)
        tl.debug_barrier()

        # the shared keys', eta's and coefficients' gradients summed over the memories, through the coefficients
        alpha, log_alpha, lg = _log_decays(alpha_ptr, oid, C, tiny, BC)
        keys = _load_tile(k_ptr, oid, C, D, BC, BD)
        eta = _load_vec(eta_ptr, oid, C, BC)
        g_d = _summed_tile(e_grad, pid, P, C, C, BC, BC)  # E = D: one coefficient
        g_gamma_prev, g_e_kk_prev, g_inverse = lg * 0.0, g_d * 0.0, g_d * 0.0  # used with ERASE
        if ERASE:
            g_d += _summed_tile(d_grad, pid, P, C, C, BC, BC)
            g_gamma_prev = _summed_vec(gamma_prev_grad, pid, P, C, BC)
            g_e_kk_prev = _summed_tile(e_kk_prev_grad, pid, P, C, C, BC, BC)
            g_inverse = _summed_tile(inverse_grad, pid, P, C, C, BC, BC)
        g_keys, g_eta, g_alpha = _coefficients_bwd(
            keys, eta, alpha, log_alpha, lg, _decay(lg, lg, r[None, :] <= r[:, None]),
            _summed_tile(keys_grad, pid, P, C, D, BC, BD), _summed_vec(gamma_grad, pid, P, C, BC), g_d,
            g_gamma_prev, g_e_kk_prev, g_inverse, tiny, BC, ERASE, PRECISION)
        g_keys += _load_tile(g_k_ptr, oid, C, D, BC, BD)
        g_eta += _load_vec(g_eta_ptr, oid, C, BC) + _summed_vec(eta_grad, pid, P, C, BC)
        g_alpha += _load_vec(g_alpha_ptr, oid, C, BC)
        tl.debug_barrier()
        _store_tile(g_k_ptr, oid, g_keys, C, D, BC, BD)
        _store_vec(g_eta_ptr, oid, g_eta, C, BC)
        _store_vec(g_alpha_ptr, oid, g_alpha, C, BC)
        tl.debug_barrier()

        # the reads: the inputs', static queries' and biases' gradients, and the start weights' through the reads
        _projection_reads_bwd(x_ptr + pid * sx_n + n * C * sx_t, starts1_ptr, starts2_ptr, static_q_ptr,
                              eta_bias_ptr, alpha_bias_ptr, g_k_ptr, g_v_ptr, g_q_ptr, g_eta_ptr, g_alpha_ptr,
                              targets_grad, x_grad, w1_grad, w2_grad, static_q_grad, eta_bias_grad,
                              alpha_bias_grad,
                              oid, oid, oid, pid, pid % H, P, PX, sx_p, sx_t, C, D, HID, eta_max,
                              BC, BD, BH, NORM_V, ADAPTIVE_Q, FROZEN, PRECISION)
        tl.debug_barrier()
        for p in range(P):
            mid = pid * P + p
            g_w1 = _load_tile(g_w1_ptr, mid, D, HID, BD, BH) + _load_tile(w1_grad, mid, D, HID, BD, BH)
            g_w2 = _load_tile(g_w2_ptr, mid, HID, D, BH, BD) + _load_tile(w2_grad, mid, HID, D, BH, BD)
            tl.debug_barrier()
            _store_tile(g_w1_ptr, mid, g_w1, D, HID, BD, BH)
            _store_tile(g_w2_ptr, mid, g_w2, HID, D, BH, BD)
        tl.debug_barrier()


INTERPRETED = not isinstance(_projection_scan_kernel, triton.runtime.JITFunction)
MAX_BLOCK = 64  # C, d and h up to this (the backward: triton_chunk.BWD_MAX_BLOCK)
# the forward's tensor inputs, in its (and the backward's) argument order
INPUTS = ("x", "static_q", "eta_bias", "alpha_bias", "anchor1", "anchor2")
# the backward's per-memory scratch, in its argument order: fp32 tiles [N * P, ...] of these shapes
_MEMORY_SCRATCH = ("targets_grad", "w1_grad", "w2_grad", "keys_grad", "eta_grad", "gamma_grad", "d_grad", "e_grad",
                   "gamma_prev_grad", "e_kk_prev_grad", "inverse_grad")


def _scalars(x, w1, n_chunks: int, eta_bias, anchor1, options: dict) -> tuple[list, dict]:
    """Both kernels' scalar arguments after their tensors, and their constexprs."""
    n, px, t, d = x.shape
    c, hid = t // n_chunks, w1.shape[-1]
    erase, frozen = options["erase"], options["frozen"]
    scalars = [n_chunks, w1.shape[1], px, *x.stride()[:3], eta_bias.shape[0],
               anchor1.shape[0] // w1.shape[1] if anchor1 is not None else 1, c, d, hid, float(options["eta_max"]),
               torch.finfo(x.dtype).tiny, float(options["step_bound"])]
    blocks = dict(BC=block(c), BD=block(d), BH=block(hid))
    constexprs = dict(blocks, NORM_V=options["normalize_values"], ADAPTIVE_Q=options["adaptive_q"], FROZEN=frozen,
                      NORMALIZED=options["normalized_eta"], BOUND=options["step_bound"] > 0, ERASE=erase,
                      ANCHOR=anchor1 is not None, PRECISION=PRECISION[w1.dtype],
                      num_warps=num_warps(*blocks.values()))
    return scalars, constexprs


def _coefficient_scratch(x, n: int, c: int, erase: bool) -> list:
    """gamma [n, C], D [n, C, C] and, with erase, gamma_prev, E_kk_prev and the inverse (else D stands in: a
    pointer no constexpr branch reads), in the inputs' dtype as the per-chunk kernels store them."""
    gamma, d_mat = x.new_empty(n, c), x.new_empty(n, c, c)
    if not erase:
        return [gamma, d_mat, d_mat, d_mat, d_mat]
    return [gamma, d_mat, x.new_empty(n, c), x.new_empty(n, c, c), x.new_empty(n, c, c)]


def launch_projection_scan(x, w1, w2, static_q, eta_bias, alpha_bias, anchor1, anchor2, *, n_chunks: int,
                           options: dict):
    """Run the forward kernel. x [N, PX, T, d] (T = n_chunks C; any strides but a unit one along d), w1 [N, P, d, h],
    w2 [N, P, h, d], static_q [N, T, d] or None, the biases [H] (stack n has head n % H), anchors [N_A P, ...] or
    None (contiguous; ``options``: ``projection_scan.options``). Returns the end state w1, w2, s1, s2
    [N, P, ...], k, v, q [N, n_chunks, C, d], eta, alpha [N, n_chunks, C], overshoot and scale [N, n_chunks, P],
    and the chunk-start weights [N, n_chunks, P, ...] (for the backward)."""
    n, _, t, d = x.shape
    c, p = t // n_chunks, w1.shape[1]
    assert x.stride(-1) == 1 and t == n_chunks * c
    starts1, starts2 = w1.new_empty(n, n_chunks, *w1.shape[1:]), w2.new_empty(n, n_chunks, *w2.shape[1:])
    starts1[:, 0], starts2[:, 0] = w1, w2
    k, v, q = (x.new_empty(n, n_chunks, c, d) for _ in range(3))
    eta, alpha = x.new_empty(n, n_chunks, c), x.new_empty(n, n_chunks, c)
    overshoot, scale = x.new_empty(n, n_chunks, p), x.new_empty(n, n_chunks, p)
    ends = [torch.empty_like(w) for w in (w1, w2, w1, w2)]
    scratch = [x.new_empty(n, p, c, d)] + _coefficient_scratch(x, n * n_chunks, c, options["erase"])
    scalars, constexprs = _scalars(x, w1, n_chunks, eta_bias, anchor1, options)
    dummy = eta_bias  # pointer arguments that a constexpr branch never reads
    with _on_device(x):
        _projection_scan_kernel[(n,)](
            x, static_q if static_q is not None else dummy, eta_bias, alpha_bias,
            anchor1 if anchor1 is not None else dummy, anchor2 if anchor2 is not None else dummy,
            starts1, starts2, k, v, q, eta, alpha, overshoot, scale, *ends, *scratch, *scalars, **constexprs)
    return (*ends, k, v, q, eta, alpha, overshoot, scale, starts1, starts2)


def launch_projection_scan_bwd(x, static_q, eta_bias, alpha_bias, anchor1, anchor2, starts1, starts2, k, v, eta,
                               alpha, grads, *, options: dict):
    """Run the backward kernel: the forward's inputs, its chunk-start weights and outputs k, v, eta, alpha, and the
    gradients ``grads`` of its outputs w1, w2, s1, s2, k, v, q, eta, alpha (None: zero). Returns the gradients of
    x [N, PX, T, d], w1, w2 [N, P, ...], static_q (None when adaptive), of the biases per stack and chunk [N,
    n_chunks] and of the anchors per stack [N, P, ...] (None without an anchor), all in fp32."""
    n, n_chunks, c, d = k.shape
    p, px = starts1.shape[2], x.shape[1]
    f32 = dict(dtype=torch.float32, device=x.device)
    like = (starts1[:, 0], starts2[:, 0], starts1[:, 0], starts2[:, 0], k, v, k, eta, alpha)
    g_w1, g_w2, g_s1, g_s2, g_k, g_v, g_q, g_eta, g_alpha = (
        torch.zeros(t.shape, **f32) if g is None else g.to(torch.float32, copy=True).contiguous()
        for g, t in zip(grads, like))
    x_grad = torch.empty(n, n_chunks, px, c, d, **f32)  # chunk-major: each chunk's tiles contiguous
    static_q_grad = torch.empty(n, n_chunks * c, d, **f32) if static_q is not None else None
    bias_grads = [torch.empty(n, n_chunks, **f32) for _ in range(2)]
    anchor_grads = [torch.zeros(starts.shape[:1] + starts.shape[2:], **f32) if anchor1 is not None else None
                    for starts in (starts1, starts2)]
    scratch = [x.new_empty(n, p, c, d)] + _coefficient_scratch(x, n * n_chunks, c, options["erase"])
    shapes = dict(targets_grad=(c, d), w1_grad=starts1.shape[-2:], w2_grad=starts2.shape[-2:], keys_grad=(c, d),
                  eta_grad=(c,), gamma_grad=(c,), d_grad=(c, c), e_grad=(c, c), gamma_prev_grad=(c,),
                  e_kk_prev_grad=(c, c), inverse_grad=(c, c))
    memory_scratch = [torch.empty(n * p, *shapes[name], **f32) for name in _MEMORY_SCRATCH]
    scalars, constexprs = _scalars(x, starts1[:, 0], n_chunks, eta_bias, anchor1, options)
    dummy = eta_bias
    with _on_device(x):
        _projection_scan_bwd_kernel[(n,)](
            x, static_q if static_q is not None else dummy, eta_bias, alpha_bias,
            anchor1 if anchor1 is not None else dummy, anchor2 if anchor2 is not None else dummy,
            starts1, starts2, k, v, eta, alpha, g_k, g_v, g_q, g_eta, g_alpha, g_s1, g_s2, g_w1, g_w2,
            x_grad, static_q_grad if static_q is not None else dummy, *bias_grads,
            *(g if g is not None else dummy for g in anchor_grads), *scratch, *memory_scratch,
            *scalars, **constexprs)
    x_grad = x_grad.permute(0, 2, 1, 3, 4).reshape(n, px, n_chunks * c, d)
    return (x_grad, g_w1, g_w2, static_q_grad, *bias_grads, *anchor_grads)
