"""The Triton forward and backward kernels of ``memory.chunk_coefficients`` without momentum (beta = 0).

One program per chunk (the leading axes flattened). From the chunk's keys K [C, d], eta, alpha [C] and, for reads,
queries Q [C, d], with l_t = log max(alpha_t, tiny) and lg_t = sum_{j<=t} l_j = log gamma_t:

    gamma_t = exp(lg_t),    D_ts = exp(lg_t - lg_s) for s <= t,    E = D                       (beta = 0: B = I)
    gamma_prev_s = exp(lg_s - l_s) = gamma_{s-1},    E_kk_prev_sj = exp(lg_s - l_s - lg_j) k_j.k_s for j < s
    erase_inverse = (I + diag(eta) E_kk_prev)^-1            (unit lower triangular, by forward substitution, fp32)
    D_qk = E_qk = D * (Q K^T)                                                                            (reads)

(c_vec and c_prev are zero without momentum and not computed.) The backward recomputes these from the same inputs
and takes the gradients of K, eta, alpha and Q from those of the outputs: the inverse's through
dA = -A^-T d(A^-1) A^-T on the strictly lower triangle, each exp(a_t - b_s) through its row and column sums,
lg = cumsum(l) through suffix sums, and l through 1 / alpha (0 where alpha is clamped, as autograd's clamp).

Without these kernels a chunk's coefficients are about 37 PyTorch operations forward and 48 backward
(``chunk_coefficients``): for the projection memories, whose coefficients depend on the state and are computed one
chunk at a time, that was about half of every chunk's operations. Tiles are padded to powers of two >= 16, up to
64; everything is computed in fp32 and stored in the inputs' dtype (the products K K^T and Q K^T take their
operands as the chunk kernels do, ``triton_chunk._dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_chunk import (PRECISION, _dot, _load_tile, _load_vec, _on_device, _store_tile, _store_vec, _sum, block,
                           num_warps)


@triton.jit
def _log_decays(alpha_ptr, idx, C, tiny, BC: tl.constexpr):
    """alpha [BC] (padding 1), l_t = log max(alpha_t, tiny) and lg_t = sum_{j<=t} l_j."""
    r = tl.arange(0, BC)
    alpha = tl.load(alpha_ptr + idx * C + r, mask=r < C, other=1.0).to(tl.float32)
    log_alpha = tl.log(tl.maximum(alpha, tiny))
    lg = _sum(tl.where(r[None, :] <= r[:, None], log_alpha[None, :], 0.0), axis=1)
    return alpha, log_alpha, lg


@triton.jit
def _decay(a, b, mask):
    """exp(a_t - b_s) where ``mask`` [t, s] holds, else 0."""
    return tl.where(mask, tl.exp(tl.where(mask, a[:, None] - b[None, :], 0.0)), 0.0)


@triton.jit
def _unit_lower_inverse(m, BC: tl.constexpr):
    """(I + M)^-1 for a strictly lower-triangular M [BC, BC], by forward substitution: row i of the inverse T is
    e_i - sum_{j<i} M_ij T_j (rows j < i are final when row i is made)."""
    r = tl.arange(0, BC)
    inverse = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(1, BC):
        m_i = _sum(tl.where(r[:, None] == i, m, 0.0), axis=0)  # row i of M
        row = tl.where(r == i, 1.0, 0.0) - _sum(m_i[:, None] * inverse, axis=0)
        inverse = tl.where(r[:, None] == i, row[None, :], inverse)
    return inverse


@triton.jit
def _erase_system(keys, eta, lg, log_alpha, BC: tl.constexpr, PRECISION: tl.constexpr):
    """exp(lg_s - l_s - lg_j) (j < s), K K^T, E_kk_prev (their product) and the erase system's inverse."""
    r = tl.arange(0, BC)
    shifted = _decay(lg - log_alpha, lg, r[None, :] < r[:, None])  # D_{s-1, j}
    kk = _dot(keys, tl.trans(keys), PRECISION)
    e_kk_prev = shifted * kk
    return shifted, kk, e_kk_prev, _unit_lower_inverse(eta[:, None] * e_kk_prev, BC)


@triton.jit
def _coefficients(
    keys_ptr, eta_ptr, alpha_ptr, queries_ptr,
    gamma_out, d_out, gamma_prev_out, e_kk_prev_out, inverse_out, d_qk_out,
    idx, C, D, tiny,
    BC: tl.constexpr, BD: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr, PRECISION: tl.constexpr,
):
    """The coefficients of chunk ``idx`` (entry idx of every input and output; the module docstring's
    equations)."""
    r = tl.arange(0, BC)
    _, log_alpha, lg = _log_decays(alpha_ptr, idx, C, tiny, BC)
    d_mat = _decay(lg, lg, r[None, :] <= r[:, None])
    _store_vec(gamma_out, idx, tl.exp(lg), C, BC)
    _store_tile(d_out, idx, d_mat, C, C, BC, BC)
    keys = _load_tile(keys_ptr, idx, C, D, BC, BD)
    if ERASE:
        eta = _load_vec(eta_ptr, idx, C, BC)
        _, _, e_kk_prev, inverse = _erase_system(keys, eta, lg, log_alpha, BC, PRECISION)
        _store_vec(gamma_prev_out, idx, tl.exp(lg - log_alpha), C, BC)
        _store_tile(e_kk_prev_out, idx, e_kk_prev, C, C, BC, BC)
        _store_tile(inverse_out, idx, inverse, C, C, BC, BC)
    if READS:
        queries = _load_tile(queries_ptr, idx, C, D, BC, BD)
        _store_tile(d_qk_out, idx, d_mat * _dot(queries, tl.trans(keys), PRECISION), C, C, BC, BC)


@triton.jit
def _chunk_coefficients_kernel(
    keys_ptr, eta_ptr, alpha_ptr, queries_ptr,
    gamma_out, d_out, gamma_prev_out, e_kk_prev_out, inverse_out, d_qk_out,
    C, D, tiny,
    BC: tl.constexpr, BD: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr, PRECISION: tl.constexpr,
):
    """The coefficients of chunk ``pid``."""
    _coefficients(keys_ptr, eta_ptr, alpha_ptr, queries_ptr, gamma_out, d_out, gamma_prev_out, e_kk_prev_out,
                  inverse_out, d_qk_out, tl.program_id(0).to(tl.int64), C, D, tiny, BC, BD, ERASE, READS, PRECISION)


@triton.jit
def _coefficients_bwd(keys, eta, alpha, log_alpha, lg, d_mat, g_keys, g_gamma, g_d, g_gamma_prev, g_e_kk_prev,
                      g_inverse, tiny, BC: tl.constexpr, ERASE: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of a chunk's keys (added to ``g_keys``), eta and alpha from those of gamma, D (= E), and with
    ERASE gamma_prev, E_kk_prev and the inverse (tiles); ``_log_decays``' alpha, l, lg and D are recomputed by the
    caller."""
    r = tl.arange(0, BC)
    g_lg = g_gamma * tl.exp(lg)  # gamma = exp(lg)
    g_log_alpha = lg * 0.0
    g_eta = lg * 0.0
    if ERASE:
        shifted, kk, e_kk_prev, inverse = _erase_system(keys, eta, lg, log_alpha, BC, PRECISION)
        # the inverse of A = I + diag(eta) E_kk_prev: dA = -A^-T d(A^-1) A^-T, strictly lower (the rest is constant)
        g_system = -_dot(_dot(tl.trans(inverse), g_inverse, "ieee"), tl.trans(inverse), "ieee")
        g_system = tl.where(r[None, :] < r[:, None], g_system, 0.0)
        g_eta = _sum(g_system * e_kk_prev, axis=1)
        g_e_kk_prev += eta[:, None] * g_system
        g_kk = g_e_kk_prev * shifted
        g_keys += _dot(g_kk + tl.trans(g_kk), keys, PRECISION)
        g_exponent = g_e_kk_prev * e_kk_prev  # of exp(lg_prev_s - lg_j), per entry
        g_lg_prev = g_gamma_prev * tl.exp(lg - log_alpha) + _sum(g_exponent, axis=1)
        g_lg += g_lg_prev - _sum(g_exponent, axis=0)
        g_log_alpha -= g_lg_prev  # lg_prev = lg - l
    g_exponent = g_d * d_mat  # of exp(lg_t - lg_s)
    g_lg += _sum(g_exponent, axis=1) - _sum(g_exponent, axis=0)
    g_log_alpha += _sum(tl.where(r[:, None] >= r[None, :], g_lg[:, None], 0.0), axis=0)  # lg = cumsum(l)
    return g_keys, g_eta, tl.where(alpha >= tiny, g_log_alpha / tl.maximum(alpha, tiny), 0.0)


@triton.jit
def _chunk_coefficients_bwd_kernel(
    keys_ptr, eta_ptr, alpha_ptr, queries_ptr,
    g_gamma_ptr, g_d_ptr, g_gamma_prev_ptr, g_e_kk_prev_ptr, g_inverse_ptr, g_d_qk_ptr,
    keys_grad, eta_grad, alpha_grad, queries_grad,
    C, D, tiny,
    BC: tl.constexpr, BD: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradients of the keys, eta, alpha and queries of chunk ``pid`` from those of its coefficients (``g_d_ptr``:
    of D, which is also E)."""
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BC)
    alpha, log_alpha, lg = _log_decays(alpha_ptr, pid, C, tiny, BC)
    d_mat = _decay(lg, lg, r[None, :] <= r[:, None])
    g_d = _load_tile(g_d_ptr, pid, C, C, BC, BC)
    keys = _load_tile(keys_ptr, pid, C, D, BC, BD)
    g_keys = keys * 0.0
    if READS:  # D_qk = D * (Q K^T)
        queries = _load_tile(queries_ptr, pid, C, D, BC, BD)
        g_d_qk = _load_tile(g_d_qk_ptr, pid, C, C, BC, BC)
        g_d += g_d_qk * _dot(queries, tl.trans(keys), PRECISION)
        g_qk = g_d_qk * d_mat
        _store_tile(queries_grad, pid, _dot(g_qk, keys, PRECISION), C, D, BC, BD)
        g_keys += _dot(tl.trans(g_qk), queries, PRECISION)
    eta, g_gamma_prev, g_e_kk_prev, g_inverse = lg * 0.0, lg * 0.0, d_mat * 0.0, d_mat * 0.0  # used with ERASE
    if ERASE:
        eta = _load_vec(eta_ptr, pid, C, BC)
        g_gamma_prev = _load_vec(g_gamma_prev_ptr, pid, C, BC)
        g_e_kk_prev = _load_tile(g_e_kk_prev_ptr, pid, C, C, BC, BC)
        g_inverse = _load_tile(g_inverse_ptr, pid, C, C, BC, BC)
    g_keys, g_eta, g_alpha = _coefficients_bwd(keys, eta, alpha, log_alpha, lg, d_mat, g_keys,
                                               _load_vec(g_gamma_ptr, pid, C, BC), g_d, g_gamma_prev, g_e_kk_prev,
                                               g_inverse, tiny, BC, ERASE, PRECISION)
    if ERASE:
        _store_vec(eta_grad, pid, g_eta, C, BC)
    _store_vec(alpha_grad, pid, g_alpha, C, BC)
    if ERASE or READS:
        _store_tile(keys_grad, pid, g_keys, C, D, BC, BD)


INTERPRETED = not isinstance(_chunk_coefficients_kernel, triton.runtime.JITFunction)
MAX_BLOCK = 64  # C and d up to this (one chunk's C x C matrices on chip)
OUTPUTS = ("gamma", "d_mat", "gamma_prev", "e_kk_prev", "erase_inverse", "d_qk")


def _constexprs(keys: torch.Tensor, erase: bool, reads: bool) -> dict:
    c, d = keys.shape[-2:]
    return dict(BC=block(c), BD=block(d), ERASE=erase, READS=reads, PRECISION=PRECISION[keys.dtype],
                num_warps=num_warps(block(c), block(d)))


def launch_chunk_coefficients(keys, eta, alpha, queries, *, erase: bool):
    """Run the forward kernel on flat contiguous inputs (keys, queries [N, C, d], eta, alpha [N, C]; queries None:
    no reads). Returns ``OUTPUTS`` (gamma_prev, e_kk_prev and erase_inverse None without erase, d_qk without
    queries)."""
    n, c, d = keys.shape
    outs = dict(gamma=eta.new_empty(n, c), d_mat=keys.new_empty(n, c, c),
                gamma_prev=eta.new_empty(n, c) if erase else None,
                e_kk_prev=keys.new_empty(n, c, c) if erase else None,
                erase_inverse=keys.new_empty(n, c, c) if erase else None,
                d_qk=keys.new_empty(n, c, c) if queries is not None else None)
    dummy = eta  # pointer arguments that a constexpr branch never reads or writes
    with _on_device(keys):
        _chunk_coefficients_kernel[(n,)](
            keys, eta, alpha, queries if queries is not None else dummy,
            *(outs[name] if outs[name] is not None else dummy for name in OUTPUTS),
            c, d, torch.finfo(alpha.dtype).tiny, **_constexprs(keys, erase, queries is not None))
    return tuple(outs[name] for name in OUTPUTS)


def launch_chunk_coefficients_bwd(keys, eta, alpha, queries, grads, *, erase: bool):
    """Run the backward kernel: the forward's inputs and the gradients of its ``OUTPUTS`` (None where the output
    does not exist). Returns the gradients of keys, eta, alpha and queries (None for eta without erase, for the
    keys with neither erase nor reads, and for absent queries: they enter nothing)."""
    n, c, d = keys.shape
    reads = queries is not None
    dummy = eta  # pointer arguments that a constexpr branch never reads or writes
    keys_grad = torch.empty_like(keys) if erase or reads else None
    eta_grad = torch.empty_like(eta) if erase else None
    alpha_grad = torch.empty_like(alpha)
    queries_grad = torch.empty_like(queries) if reads else None
    with _on_device(keys):
        _chunk_coefficients_bwd_kernel[(n,)](
            keys, eta, alpha, queries if reads else dummy,
            *(g.contiguous() if g is not None else dummy for g in grads),
            *(t if t is not None else dummy for t in (keys_grad, eta_grad, alpha_grad, queries_grad)),
            c, d, torch.finfo(alpha.dtype).tiny, **_constexprs(keys, erase, reads))
    return keys_grad, eta_grad, alpha_grad, queries_grad
