"""The Triton forward and backward kernels of a projection-memory chunk's reads (``projection_reads.py``).

One program per memory stack (batch x head): from the stacked projection memories' chunk-start weights
W1_p [d, h], W2_p [h, d] (p = k, v, eta, alpha, q) and their inputs X_p [C, d] (one X shared by all, or one per
memory), with M_p(x) = x + silu(x W2_p^T) W1_p^T (``memory.mlp_apply``):

    k = n(M_k(X_k)),  v = n(M_v(X_v)) (or M_v(X_v) unnormalized),  q = n(M_q(X_q)) (or n(Q_static)),
    eta = eta_max sigmoid(mean_c M_eta(X_eta) + b_eta),  alpha = sigmoid(mean_c M_alpha(X_alpha) + b_alpha)
    V̂_p = M_p(v)                          (the self-generated targets, at the same weights, for every p)

with n(y) = y / max(||y||, 1e-12) (``F.normalize``); ``FROZEN`` (the memory switched off for evaluation) gives
eta = 0 and alpha = 1. The backward recomputes the reads from the same inputs and takes the gradients of the
weights (through the reads; the targets' weights are constants of the first-order rule, as ``self_target``
detaches them), the inputs, the static queries and the per-sample biases from those of k, v, q, eta, alpha and the
targets. Tiles are padded to powers of two >= 16, up to 64; computed in fp32, stored in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_chunk import (PRECISION, _dot, _load_tile, _load_vec, _on_device, _sigmoid, _store_tile, _store_vec,
                           _sum, _targets, _targets_bwd, block, num_warps)

_NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps


@triton.jit
def _mlp(x, w1, w2, PRECISION: tl.constexpr):
    """M(x) = x + silu(x W2^T) W1^T for x [C, d], W1 [d, h], W2 [h, d]; also z = x W2^T."""
    z = _dot(x, tl.trans(w2), PRECISION)
    return x + _dot(z * _sigmoid(z), tl.trans(w1), PRECISION), z


@triton.jit
def _mlp_bwd(g, x, z, w1, w2, PRECISION: tl.constexpr):
    """Gradients of x, W1, W2 from g = dLoss/dM(x) (z = x W2^T)."""
    sig = _sigmoid(z)
    g_z = _dot(g, w1, PRECISION) * sig * (1.0 + z * (1.0 - sig))
    return g + _dot(g_z, w2, PRECISION), _dot(tl.trans(g), z * sig, PRECISION), _dot(tl.trans(g_z), x, PRECISION)


@triton.jit
def _normalize(y):
    """y / max(||y||, eps) per row, and that denominator."""
    norm = tl.maximum(tl.sqrt(_sum(y * y, axis=1)), _NORM_EPS)
    return y / norm[:, None], norm


@triton.jit
def _normalize_bwd(g, y, norm):
    """dLoss/dy of n(y) = y / max(||y||, eps) from g = dLoss/dn (where ||y|| <= eps the denominator is constant)."""
    n = y / norm[:, None]
    radial = tl.where(norm > _NORM_EPS, _sum(n * g, axis=1), 0.0)
    return (g - n * radial[:, None]) / norm[:, None]


@triton.jit
def _read(x_ptr, w1_ptr, w2_ptr, wid, p, P, PX, sx_p, sx_t,
          C, D, HID, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
          PRECISION: tl.constexpr):
    """Memory p's read of its input: M_p(X_p), z, X_p and the weights (entry wid P + p). X shared: PX = 1, else
    PX = P; ``x_ptr`` points at the chunk's first row of X_0, X_p starts p sx_p further, its rows sx_t apart (a
    chunk's view of a whole forward's inputs)."""
    r, k = tl.arange(0, BC), tl.arange(0, BD)
    x = tl.load(x_ptr + (p % PX) * sx_p + r[:, None] * sx_t + k[None, :],
                mask=(r < C)[:, None] & (k < D)[None, :], other=0.0).to(tl.float32)
    w1 = _load_tile(w1_ptr, wid * P + p, D, HID, BD, BH)
    w2 = _load_tile(w2_ptr, wid * P + p, HID, D, BH, BD)
    out, z = _mlp(x, w1, w2, PRECISION)
    return out, z, x, w1, w2


@triton.jit
def _logit(out, D, BD: tl.constexpr):
    """mean over the d real columns of a read [C, BD]."""
    return _sum(out, axis=1) / D


@triton.jit
def _rates(eta_logit, alpha_logit, eta_bias, alpha_bias, eta_max):
    """eta = eta_max sigmoid(logit + b_eta), alpha = sigmoid(logit + b_alpha), and their sigmoids."""
    s_eta = _sigmoid(eta_logit + eta_bias)
    s_alpha = _sigmoid(alpha_logit + alpha_bias)
    return eta_max * s_eta, s_alpha, s_eta


@triton.jit
def _read_out(x_ptr, w1_ptr, w2_ptr, wid, p, P, PX, sx_p, sx_t, C, D, HID, BC: tl.constexpr, BD: tl.constexpr,
              BH: tl.constexpr, PRECISION: tl.constexpr):
    """Memory p's read of its input, M_p(X_p), alone."""
    out, z, x, w1, w2 = _read(x_ptr, w1_ptr, w2_ptr, wid, p, P, PX, sx_p, sx_t, C, D, HID, BC, BD, BH, PRECISION)
    return out


@triton.jit
def _projection_reads(
    x_ptr, w1_ptr, w2_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr,
    k_out, v_out, q_out, eta_out, alpha_out, targets_out,
    wid, oid, tid, head, P, PX, sx_p, sx_t, C, D, HID, eta_max,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NORM_V: tl.constexpr, ADAPTIVE_Q: tl.constexpr,
    FROZEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """k, v, q, eta, alpha (entry ``oid``, as the static queries read) and the P targets (entries tid P + p) of a
    chunk of one memory stack (the module docstring's equations; memory order k, v, eta, alpha, q as
    ``titans.K, V, ETA, ALPHA, Q``), from its inputs at ``x_ptr`` (``_read``) and the memories' weights (entries
    wid P + p) for head ``head``'s biases."""
    rc = tl.arange(0, BC)
    k, k_norm = _normalize(_read_out(x_ptr, w1_ptr, w2_ptr, wid, 0, P, PX, sx_p, sx_t,
                                     C, D, HID, BC, BD, BH, PRECISION))
    _store_tile(k_out, oid, k, C, D, BC, BD)
    v = _read_out(x_ptr, w1_ptr, w2_ptr, wid, 1, P, PX, sx_p, sx_t, C, D, HID, BC, BD, BH, PRECISION)
    if NORM_V:
        v, v_norm = _normalize(v)
    _store_tile(v_out, oid, v, C, D, BC, BD)
    if FROZEN:  # the memory switched off: no writes, full retention
        eta = tl.where(rc < C, 0.0, 0.0)
        alpha = tl.where(rc < C, 1.0, 1.0)
    else:
        eta_read = _read_out(x_ptr, w1_ptr, w2_ptr, wid, 2, P, PX, sx_p, sx_t, C, D, HID, BC, BD, BH, PRECISION)
        alpha_read = _read_out(x_ptr, w1_ptr, w2_ptr, wid, 3, P, PX, sx_p, sx_t, C, D, HID, BC, BD, BH, PRECISION)
        eta, alpha, s_eta = _rates(_logit(eta_read, D, BD), _logit(alpha_read, D, BD),
                                   tl.load(eta_bias_ptr + head).to(tl.float32),
                                   tl.load(alpha_bias_ptr + head).to(tl.float32), eta_max)
    _store_vec(eta_out, oid, eta, C, BC)
    _store_vec(alpha_out, oid, alpha, C, BC)
    if ADAPTIVE_Q:
        q = _read_out(x_ptr, w1_ptr, w2_ptr, wid, 4, P, PX, sx_p, sx_t, C, D, HID, BC, BD, BH, PRECISION)
    else:
        q = _load_tile(static_q_ptr, oid, C, D, BC, BD)
    q, q_norm = _normalize(q)
    _store_tile(q_out, oid, q, C, D, BC, BD)
    for p in range(P):  # the targets M_p(v)
        w1 = _load_tile(w1_ptr, wid * P + p, D, HID, BD, BH)
        w2 = _load_tile(w2_ptr, wid * P + p, HID, D, BH, BD)
        _store_tile(targets_out, tid * P + p, _targets(v, w1, w2, True, PRECISION), C, D, BC, BD)


@triton.jit
def _projection_reads_kernel(
    x_ptr, w1_ptr, w2_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr,
    k_out, v_out, q_out, eta_out, alpha_out, targets_out,
    P, PX, sx_n, sx_p, sx_t, H, C, D, HID, eta_max,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NORM_V: tl.constexpr, ADAPTIVE_Q: tl.constexpr,
    FROZEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """``_projection_reads`` of memory stack ``pid`` (everything entry pid; its inputs pid sx_n from x_ptr)."""
    pid = tl.program_id(0).to(tl.int64)
    _projection_reads(x_ptr + pid * sx_n, w1_ptr, w2_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr,
                      k_out, v_out, q_out, eta_out, alpha_out, targets_out, pid, pid, pid, pid % H,
                      P, PX, sx_p, sx_t, C, D, HID, eta_max, BC, BD, BH, NORM_V, ADAPTIVE_Q, FROZEN, PRECISION)


@triton.jit
def _read_bwd(g_out, z, x, w1, w2, w1_grad, w2_grad, wid, D, HID, BD: tl.constexpr, BH: tl.constexpr,
              PRECISION: tl.constexpr):
    """Backward of a read M(X) (``_read``'s z, X and weights) given dLoss/dM(X): stores the weights' gradients as
    entry ``wid`` and returns the input's."""
    g_x, g_w1, g_w2 = _mlp_bwd(g_out, x, z, w1, w2, PRECISION)
    _store_tile(w1_grad, wid, g_w1, D, HID, BD, BH)
    _store_tile(w2_grad, wid, g_w2, HID, D, BH, BD)
    return g_x


@triton.jit
def _input_grad(x_grad, g_x, g_x_p, oid, p, PX, C, D, BC: tl.constexpr, BD: tl.constexpr):
    """Memory p's input gradient: stored as its own (per-memory inputs, PX > 1: entry oid PX + p), or added to the
    shared input's running gradient ``g_x``. Returns the running gradient."""
    if PX > 1:
        _store_tile(x_grad, oid * PX + p, g_x_p, C, D, BC, BD)
    return tl.where(PX > 1, g_x, g_x + g_x_p)


@triton.jit
def _projection_reads_bwd(
    x_ptr, w1_ptr, w2_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr,
    g_k_ptr, g_v_ptr, g_q_ptr, g_eta_ptr, g_alpha_ptr, g_targets_ptr,
    x_grad, w1_grad, w2_grad, static_q_grad, eta_bias_grad, alpha_bias_grad,
    wid, oid, gid, tid, head, P, PX, sx_p, sx_t, C, D, HID, eta_max,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NORM_V: tl.constexpr, ADAPTIVE_Q: tl.constexpr,
    FROZEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradients of ``_projection_reads``' inputs from those of its outputs, recomputing the reads: the gradients
    of k, v, q, eta, alpha are entry ``gid``, the targets' entries tid P + p; stores the weights' gradients as
    entries tid P + p, the static queries', the biases' (per chunk and stack: the caller sums them) and the
    inputs' (entries oid PX + p, or oid when shared) as entry ``oid``. Each memory's weights get the gradient of
    their one read (the targets' weights are constants: first order)."""
    g_x = tl.full([BC, BD], 0.0, dtype=tl.float32)
    # k
    k_read, z, x, w1, w2 = _read(x_ptr, w1_ptr, w2_ptr, wid, 0, P, PX, sx_p, sx_t,
                                 C, D, HID, BC, BD, BH, PRECISION)
    k, k_norm = _normalize(k_read)
    g_k = _normalize_bwd(_load_tile(g_k_ptr, gid, C, D, BC, BD), k_read, k_norm)
    g_x = _input_grad(x_grad, g_x, _read_bwd(g_k, z, x, w1, w2, w1_grad, w2_grad, tid * P, D, HID, BD, BH,
                                             PRECISION), oid, 0, PX, C, D, BC, BD)
    # v: its own gradient and the P targets' M_p(v)
    v_read, z, x, w1, w2 = _read(x_ptr, w1_ptr, w2_ptr, wid, 1, P, PX, sx_p, sx_t,
                                 C, D, HID, BC, BD, BH, PRECISION)
    v = v_read
    if NORM_V:
        v, v_norm = _normalize(v_read)
    g_v = _load_tile(g_v_ptr, gid, C, D, BC, BD)
    for p in range(P):  # _targets_bwd: g_t + its gradient through M_p's branch, at constant weights
        g_v += _targets_bwd(_load_tile(g_targets_ptr, tid * P + p, C, D, BC, BD), v,
                            _load_tile(w1_ptr, wid * P + p, D, HID, BD, BH),
                            _load_tile(w2_ptr, wid * P + p, HID, D, BH, BD), True, PRECISION)
    if NORM_V:
        g_v = _normalize_bwd(g_v, v_read, v_norm)
    g_x = _input_grad(x_grad, g_x, _read_bwd(g_v, z, x, w1, w2, w1_grad, w2_grad, tid * P + 1, D, HID, BD, BH,
                                             PRECISION), oid, 1, PX, C, D, BC, BD)
    # eta and alpha: eta_max sigmoid(mean_c M(X) + b), sigmoid(mean_c M(X) + b) (constants when frozen)
    if FROZEN:
        zero_w1 = tl.full([BD, BH], 0.0, dtype=tl.float32)
        zero_w2 = tl.full([BH, BD], 0.0, dtype=tl.float32)
        for p in range(2, 4):
            _store_tile(w1_grad, tid * P + p, zero_w1, D, HID, BD, BH)
            _store_tile(w2_grad, tid * P + p, zero_w2, HID, D, BH, BD)
            g_x = _input_grad(x_grad, g_x, tl.full([BC, BD], 0.0, dtype=tl.float32), oid, p, PX, C, D, BC, BD)
        tl.store(eta_bias_grad + oid, 0.0)
        tl.store(alpha_bias_grad + oid, 0.0)
    else:
        rd = tl.arange(0, BD)
        eta_read, z_eta, x_eta, w1_eta, w2_eta = _read(x_ptr, w1_ptr, w2_ptr, wid, 2, P, PX, sx_p, sx_t,
                                                       C, D, HID,
                                                       BC, BD, BH, PRECISION)
        alpha_read, z, x, w1, w2 = _read(x_ptr, w1_ptr, w2_ptr, wid, 3, P, PX, sx_p, sx_t,
                                         C, D, HID, BC, BD, BH, PRECISION)
        eta, alpha, s_eta = _rates(_logit(eta_read, D, BD), _logit(alpha_read, D, BD),
                                 tl.load(eta_bias_ptr + head).to(tl.float32),
                                 tl.load(alpha_bias_ptr + head).to(tl.float32), eta_max)
        g_eta_logit = _load_vec(g_eta_ptr, gid, C, BC) * eta_max * s_eta * (1.0 - s_eta)
        g_alpha_logit = _load_vec(g_alpha_ptr, gid, C, BC) * alpha * (1.0 - alpha)
        tl.store(eta_bias_grad + oid, _sum(g_eta_logit, axis=0))
        tl.store(alpha_bias_grad + oid, _sum(g_alpha_logit, axis=0))
        real = (rd < D)[None, :]
        g_eta_read = tl.where(real, g_eta_logit[:, None] / D, 0.0)  # the mean over the d columns
        g_x = _input_grad(x_grad, g_x, _read_bwd(g_eta_read, z_eta, x_eta, w1_eta, w2_eta, w1_grad, w2_grad,
                                                 tid * P + 2, D, HID, BD, BH, PRECISION), oid, 2, PX, C, D, BC, BD)
        g_alpha_read = tl.where(real, g_alpha_logit[:, None] / D, 0.0)
        g_x = _input_grad(x_grad, g_x, _read_bwd(g_alpha_read, z, x, w1, w2, w1_grad, w2_grad, tid * P + 3, D, HID,
                                                 BD, BH, PRECISION), oid, 3, PX, C, D, BC, BD)
    # q: adaptive (memory 4) or the static queries
    g_q = _load_tile(g_q_ptr, gid, C, D, BC, BD)
    if ADAPTIVE_Q:
        q_read, z, x, w1, w2 = _read(x_ptr, w1_ptr, w2_ptr, wid, 4, P, PX, sx_p, sx_t,
                                     C, D, HID, BC, BD, BH, PRECISION)
        q, q_norm = _normalize(q_read)
        g_x = _input_grad(x_grad, g_x, _read_bwd(_normalize_bwd(g_q, q_read, q_norm), z, x, w1, w2, w1_grad,
                                                 w2_grad, tid * P + 4, D, HID, BD, BH, PRECISION),
                          oid, 4, PX, C, D, BC, BD)
    else:
        static_q = _load_tile(static_q_ptr, oid, C, D, BC, BD)
        q, q_norm = _normalize(static_q)
        _store_tile(static_q_grad, oid, _normalize_bwd(g_q, static_q, q_norm), C, D, BC, BD)
    if PX == 1:
        _store_tile(x_grad, oid, g_x, C, D, BC, BD)


@triton.jit
def _projection_reads_bwd_kernel(
    x_ptr, w1_ptr, w2_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr,
    g_k_ptr, g_v_ptr, g_q_ptr, g_eta_ptr, g_alpha_ptr, g_targets_ptr,
    x_grad, w1_grad, w2_grad, static_q_grad, eta_bias_grad, alpha_bias_grad,
    P, PX, sx_n, sx_p, sx_t, H, C, D, HID, eta_max,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NORM_V: tl.constexpr, ADAPTIVE_Q: tl.constexpr,
    FROZEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """``_projection_reads_bwd`` of memory stack ``pid`` (everything entry pid; the biases' gradients per program:
    the launcher sums them over the batch)."""
    pid = tl.program_id(0).to(tl.int64)
    _projection_reads_bwd(x_ptr + pid * sx_n, w1_ptr, w2_ptr, static_q_ptr, eta_bias_ptr, alpha_bias_ptr,
                          g_k_ptr, g_v_ptr, g_q_ptr, g_eta_ptr, g_alpha_ptr, g_targets_ptr,
                          x_grad, w1_grad, w2_grad, static_q_grad, eta_bias_grad, alpha_bias_grad,
                          pid, pid, pid, pid, pid % H, P, PX, sx_p, sx_t, C, D, HID, eta_max,
                          BC, BD, BH, NORM_V, ADAPTIVE_Q, FROZEN, PRECISION)


INTERPRETED = not isinstance(_projection_reads_kernel, triton.runtime.JITFunction)
MAX_BLOCK = 64  # C, d and h up to this


def _constexprs(w1: torch.Tensor, x: torch.Tensor, normalize_values: bool, adaptive_q: bool, frozen: bool) -> dict:
    blocks = dict(BC=block(x.shape[-2]), BD=block(x.shape[-1]), BH=block(w1.shape[-1]))
    return dict(blocks, NORM_V=normalize_values, ADAPTIVE_Q=adaptive_q, FROZEN=frozen,
                PRECISION=PRECISION[w1.dtype], num_warps=num_warps(*blocks.values()))


def launch_projection_reads(x, w1, w2, static_q, eta_bias, alpha_bias, *, n_heads: int, eta_max: float,
                            normalize_values: bool, frozen: bool):
    """Run the forward kernel on flat inputs, contiguous but x: x [N, PX, C, d] (PX = 1: shared; any strides but a
    unit one along d, e.g. a chunk's view of a whole forward's inputs, which is not copied), w1 [N, P, d, h],
    w2 [N, P, h, d], static_q [N, C, d] or None (adaptive q), eta_bias, alpha_bias [H] (program n has head
    n % H). Returns k, v, q [N, C, d], eta, alpha [N, C], targets [N, P, C, d]."""
    n, px, c, d = x.shape
    p = w1.shape[1]
    k, v, q = (x.new_empty(n, c, d) for _ in range(3))
    assert x.stride(-1) == 1, "the memories' inputs need unit stride along d"
    eta, alpha = x.new_empty(n, c), x.new_empty(n, c)
    targets = x.new_empty(n, p, c, d)
    with _on_device(x):
        _projection_reads_kernel[(n,)](
            x, w1, w2, static_q if static_q is not None else x, eta_bias, alpha_bias, k, v, q, eta, alpha, targets,
            p, px, *x.stride()[:3], n_heads, c, d, w1.shape[-1], float(eta_max),
            **_constexprs(w1, x, normalize_values, static_q is None, frozen))
    return k, v, q, eta, alpha, targets


def launch_projection_reads_bwd(x, w1, w2, static_q, eta_bias, alpha_bias, grads, *, n_heads: int,
                                eta_max: float, normalize_values: bool, frozen: bool):
    """Run the backward kernel: the forward's inputs and the gradients of its outputs (k, v, q, eta, alpha,
    targets; contiguous). Returns the gradients of x (contiguous), w1, w2, static_q (None for adaptive q), and of
    the biases per program [N] (to be summed over the batch)."""
    n, px, c, d = x.shape
    p = w1.shape[1]
    x_grad, w1_grad, w2_grad = x.new_empty(x.shape), torch.empty_like(w1), torch.empty_like(w2)  # x_grad contiguous
    static_q_grad = torch.empty_like(static_q) if static_q is not None else None
    eta_bias_grad, alpha_bias_grad = x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)
    with _on_device(x):
        _projection_reads_bwd_kernel[(n,)](
            x, w1, w2, static_q if static_q is not None else x, eta_bias, alpha_bias, *grads,
            x_grad, w1_grad, w2_grad, static_q_grad if static_q is not None else x, eta_bias_grad, alpha_bias_grad,
            p, px, *x.stride()[:3], n_heads, c, d, w1.shape[-1], float(eta_max),
            **_constexprs(w1, x, normalize_values, static_q is None, frozen))
    return x_grad, w1_grad, w2_grad, static_q_grad, eta_bias_grad, alpha_bias_grad
