"""The Triton forward kernel of ``memory.chunk_update`` for the default rule without momentum.

One program per leading-batch element (batch x heads x memory index, flattened): the chunk's C tokens, the
chunk-start weights and the chunk's state-independent coefficients are loaded once, and everything else stays in
registers until the new weights, momentum, reads and step-bound statistics are stored. Per program, with
K, V̂, Q: [C, d], W1: [d, h], W2: [h, d]:

    z = K W2^T,  h = silu(z),  u = K + h W1^T - V̂,  delta = (u W1) * silu'(z)             (rank-1 gradient factors)
    kappa_i = ||J_i g_i||^2 / ||g_i||^2,  J_i g_i = ||h_i||^2 u_i + ||k_i||^2 W1 (silu'(z_i) * delta_i)
    r_i = eta_i / max(kappa_i, KAPPA_MIN)          (or eta_i without ``normalized_eta``)
    rho_t = sum_j c_tj ||J_j dW_t||^2 / ||dW_t||^2,  c_ti = E_ti r_i    (rows t = 0..C-1 with reads, else t = L)
    s_t = tau / max(rho_t, tau)                                        (s = 1 without a step bound)
    X_state = A^-1 (-eta * (gamma_prev * z + (1 - gamma_prev) * z_A)),  z_A = K A2^T (0 without an anchor)
               X_grad = A^-1 (eta * ((E_{s-1,i} k_i.k_s) @ (r * delta)))   (erase)
    W1' = gamma_L W1 + (1 - gamma_L) A1 - s_L (E_L * r u)^T h
    W2' = gamma_L W2 + (1 - gamma_L) A2 - s_L (E_L * r delta)^T K + (D_L * (X_state + s_L X_grad))^T K
    S1' = -s_L r_L u_L h_L^T,  S2' = -s_L r_L delta_L k_L^T                (beta = 0: the last token's step)
    o_t = q_t + (gamma_t W1 + (1 - gamma_t) A1) hq_t - s_t sum_i E_ti (hq_t . h_i) r_i u_i,
    hq_t = silu((gamma_t W2 + (1 - gamma_t) A2) q_t + (D_qk X_state)_t + s_t (D_qk X_grad - E_qk (r delta))_t)

(A1, A2: the anchor retention decays toward, ``memory.chunk_update``'s ``anchor``; ANCHOR=False: zero.)

(memory.py derives these; L is the last valid token.) The erase system's inverse A^-1 and the other coefficients
come precomputed (``memory.chunk_coefficients``, computed by the layer for all chunks of a sequence at once).
Tiles are padded to powers of two >= 16 (``tl.dot``'s minimum) with masked loads: padded rows and columns are zero
and contribute nothing. Everything is computed in fp32 (``tl.dot`` with ``input_precision="ieee"`` for fp32 inputs,
TF32 for 16-bit inputs, whose reference computes in 16 bits) and stored in the inputs' dtype.

This module decorates its kernels when imported: set ``TRITON_INTERPRET=1`` before importing it to run them on
CPU (numpy interpreter; for tests). ``INTERPRETED`` says which mode it was imported in. The kernels call only
triton.language builtins and this module's own jit functions, so the interpreter runs them even where triton
was imported before ``TRITON_INTERPRET`` was set (triton.language's jit functions, such as ``tl.sum``, are
decorated in the mode of triton's own import).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..memory import KAPPA_MIN, NEGLIGIBLE

# largest padded C, d or h: every tile of a chunk lives in one program. Compiled for sm_90, C = d = h = 64 needs
# 196 KiB of shared memory (an H100/H200 block may use 227 KiB) and spills some registers; 128 would need more
# shared memory than any GPU has (tests/test_model_kernel.py compiles the kernel for sm_90 and checks this)
MAX_BLOCK = 64
SM90_SHARED_BYTES = 232448  # shared memory one block may use on sm_90 (227 KiB)
_NEGLIGIBLE = tl.constexpr(NEGLIGIBLE)
_KAPPA_MIN = tl.constexpr(KAPPA_MIN)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    """sum over ``axis`` (tl.reduce with this module's own combine function: the interpreter runs it whenever
    this module was imported, unlike triton.language's jit functions such as tl.sum, decorated at its import)."""
    return tl.reduce(x, axis, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _safe_ratio(num, den):
    """num / den, 0 where den <= NEGLIGIBLE (memory.safe_ratio)."""
    ok = den > _NEGLIGIBLE
    return tl.where(ok, num / tl.where(ok, den, 1.0), 0.0)


@triton.jit
def _overshoot_row(rows, gram, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION: tl.constexpr):
    """rho_t for one row c_t. of the accumulated step (memory.chunk_overshoot): ||dW_t||^2 = c_t^T G c_t and
    J_j dW_t = sum_i c_ti (h_j.h_i) u_i + W1 (silu'(z_j) * sum_i c_ti (k_j.k_i) delta_i)."""
    den = _sum(_sum(gram * rows[None, :], axis=1) * rows, axis=0)
    j_w1 = tl.dot(hh_gram * rows[None, :], u, input_precision=PRECISION)  # [C, d]
    dw2_k = tl.dot(kk_gram * rows[None, :], delta, input_precision=PRECISION)  # [C, h]
    jd = j_w1 + tl.dot(dsilu * dw2_k, tl.trans(w1), input_precision=PRECISION)
    num = _sum(rows * _sum(jd * jd, axis=1), axis=0)
    return _safe_ratio(num, den)


@triton.jit
def _chunk_update_kernel(
    w1_ptr, w2_ptr, keys_ptr, targets_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
    w1_out, w2_out, s1_out, s2_out, reads_out, overshoot_out, scale_out,
    C, D, HID, last, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rc, rd, rh = tl.arange(0, BC), tl.arange(0, BD), tl.arange(0, BH)
    mc, md, mh = rc < C, rd < D, rh < HID
    m_cd, m_cc = mc[:, None] & md[None, :], mc[:, None] & mc[None, :]
    m_dh, m_hd = md[:, None] & mh[None, :], mh[:, None] & md[None, :]
    off_cd = pid * C * D + rc[:, None] * D + rd[None, :]
    off_cc = pid * C * C + rc[:, None] * C + rc[None, :]
    off_dh = pid * D * HID + rd[:, None] * HID + rh[None, :]
    off_hd = pid * HID * D + rh[:, None] * D + rd[None, :]

    w1 = tl.load(w1_ptr + off_dh, mask=m_dh, other=0.0).to(tl.float32)  # [d, h]
    w2 = tl.load(w2_ptr + off_hd, mask=m_hd, other=0.0).to(tl.float32)  # [h, d]
    keys = tl.load(keys_ptr + off_cd, mask=m_cd, other=0.0).to(tl.float32)  # [C, d]
    targets = tl.load(targets_ptr + off_cd, mask=m_cd, other=0.0).to(tl.float32)
    eta = tl.load(eta_ptr + pid * C + rc, mask=mc, other=0.0).to(tl.float32)  # [C]
    gamma = tl.load(gamma_ptr + pid * C + rc, mask=mc, other=0.0).to(tl.float32)
    if ANCHOR:  # retention decays toward (A1, A2)
        a1 = tl.load(a1_ptr + off_dh, mask=m_dh, other=0.0).to(tl.float32)  # [d, h]
        a2 = tl.load(a2_ptr + off_hd, mask=m_hd, other=0.0).to(tl.float32)  # [h, d]

    # rank-1 factors of each token's gradient at the chunk-start weights
    z = tl.dot(keys, tl.trans(w2), input_precision=PRECISION)  # [C, h]
    sig = _sigmoid(z)
    h = z * sig
    dsilu = sig * (1.0 + z * (1.0 - sig))
    u = keys + tl.dot(h, tl.trans(w1), input_precision=PRECISION) - targets  # [C, d]
    delta = tl.dot(u, w1, input_precision=PRECISION) * dsilu  # [C, h]

    if NORMALIZED:  # kappa: Gauss-Newton curvature along each token's own gradient
        hh = _sum(h * h, axis=1)
        kk = _sum(keys * keys, axis=1)
        jg = hh[:, None] * u + kk[:, None] * tl.dot(dsilu * delta, tl.trans(w1), input_precision=PRECISION)
        gg = _sum(u * u, axis=1) * hh + _sum(delta * delta, axis=1) * kk
        kappa = _safe_ratio(_sum(jg * jg, axis=1), gg)
        rate = eta / tl.maximum(kappa, _KAPPA_MIN)
    else:
        rate = eta
    eta_u = rate[:, None] * u
    eta_delta = rate[:, None] * delta

    # step bound: the overshoot of the accumulated step after token t (every t with reads, else the last)
    at_last = rc == last
    if BOUND:
        hh_gram = tl.dot(h, tl.trans(h), input_precision=PRECISION)  # h_j . h_i
        kk_gram = tl.dot(keys, tl.trans(keys), input_precision=PRECISION)  # k_j . k_i
        gram = (tl.dot(u, tl.trans(u), input_precision=PRECISION) * hh_gram
                + tl.dot(delta, tl.trans(delta), input_precision=PRECISION) * kk_gram)  # g_j . g_i
        if READS:
            lam = tl.full([BC], 0.0, dtype=tl.float32)
            for t in range(0, C):
                rows = tl.load(e_ptr + pid * C * C + t * C + rc, mask=mc, other=0.0).to(tl.float32) * rate
                lam_t = _overshoot_row(rows, gram, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION)
                lam = tl.where(rc == t, lam_t, lam)
            scale = step_bound / tl.maximum(lam, step_bound)
            lam_end = _sum(tl.where(at_last, lam, 0.0), axis=0)
            s_end = _sum(tl.where(at_last, scale, 0.0), axis=0)
        else:
            rows = tl.load(e_ptr + pid * C * C + last * C + rc, mask=mc, other=0.0).to(tl.float32) * rate
            lam_end = _overshoot_row(rows, gram, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION)
            s_end = step_bound / tl.maximum(lam_end, step_bound)
            scale = tl.full([BC], 0.0, dtype=tl.float32) + s_end
    else:
        lam_end = _sum(tl.full([BC], 0.0, dtype=tl.float32), axis=0)
        s_end = lam_end + 1.0
        scale = tl.full([BC], 1.0, dtype=tl.float32)

    if ERASE:  # the erase vectors x_s = -eta_s W2_{s-1} k_s, split into their state and gradient parts
        gamma_prev = tl.load(gamma_prev_ptr + pid * C + rc, mask=mc, other=0.0).to(tl.float32)
        inverse = tl.load(inverse_ptr + off_cc, mask=m_cc, other=0.0).to(tl.float32)
        e_kk_prev = tl.load(e_kk_prev_ptr + off_cc, mask=m_cc, other=0.0).to(tl.float32)
        known = gamma_prev[:, None] * z  # W2_{s-1} k_s without the chunk's own terms
        if ANCHOR:
            known += (1.0 - gamma_prev)[:, None] * tl.dot(keys, tl.trans(a2), input_precision=PRECISION)
        x_state = tl.dot(inverse, -eta[:, None] * known, input_precision=PRECISION)  # [C, h]
        x_grad = tl.dot(inverse, eta[:, None] * tl.dot(e_kk_prev, eta_delta, input_precision=PRECISION),
                        input_precision=PRECISION)

    # the state after the last valid token L
    gamma_end = tl.load(gamma_ptr + pid * C + last).to(tl.float32)
    e_end = tl.load(e_ptr + pid * C * C + last * C + rc, mask=mc, other=0.0).to(tl.float32)
    if ANCHOR:
        w1_end, w2_end = gamma_end * w1 + (1.0 - gamma_end) * a1, gamma_end * w2 + (1.0 - gamma_end) * a2
    else:
        w1_end, w2_end = gamma_end * w1, gamma_end * w2
    new_w1 = w1_end - s_end * tl.dot(tl.trans(e_end[:, None] * eta_u), h, input_precision=PRECISION)
    new_w2 = w2_end - s_end * tl.dot(tl.trans(e_end[:, None] * eta_delta), keys, input_precision=PRECISION)
    if ERASE:
        d_end = tl.load(d_ptr + pid * C * C + last * C + rc, mask=mc, other=0.0).to(tl.float32)
        new_w2 += tl.dot(tl.trans(d_end[:, None] * (x_state + s_end * x_grad)), keys, input_precision=PRECISION)
    new_s1 = -s_end * tl.dot(tl.trans(tl.where(at_last[:, None], eta_u, 0.0)), h, input_precision=PRECISION)
    new_s2 = -s_end * tl.dot(tl.trans(tl.where(at_last[:, None], eta_delta, 0.0)), keys, input_precision=PRECISION)
    tl.store(w1_out + off_dh, new_w1.to(w1_out.dtype.element_ty), mask=m_dh)
    tl.store(w2_out + off_hd, new_w2.to(w2_out.dtype.element_ty), mask=m_hd)
    tl.store(s1_out + off_dh, new_s1.to(s1_out.dtype.element_ty), mask=m_dh)
    tl.store(s2_out + off_hd, new_s2.to(s2_out.dtype.element_ty), mask=m_hd)
    tl.store(overshoot_out + pid, lam_end.to(overshoot_out.dtype.element_ty))
    tl.store(scale_out + pid, s_end.to(scale_out.dtype.element_ty))

    if READS:  # o_t = m_{W_t}(q_t), the gradient parts of W_t scaled by s_t
        queries = tl.load(queries_ptr + off_cd, mask=m_cd, other=0.0).to(tl.float32)
        e_qk = tl.load(e_qk_ptr + off_cc, mask=m_cc, other=0.0).to(tl.float32)
        zq = gamma[:, None] * tl.dot(queries, tl.trans(w2), input_precision=PRECISION)  # [C, h]
        if ANCHOR:
            zq += (1.0 - gamma)[:, None] * tl.dot(queries, tl.trans(a2), input_precision=PRECISION)
        zq_grad = -tl.dot(e_qk, eta_delta, input_precision=PRECISION)
        if ERASE:
            d_qk = tl.load(d_qk_ptr + off_cc, mask=m_cc, other=0.0).to(tl.float32)
            zq += tl.dot(d_qk, x_state, input_precision=PRECISION)
            zq_grad += tl.dot(d_qk, x_grad, input_precision=PRECISION)
        zq = zq + scale[:, None] * zq_grad
        hq = zq * _sigmoid(zq)
        e_mat = tl.load(e_ptr + off_cc, mask=m_cc, other=0.0).to(tl.float32)
        hq_h = e_mat * tl.dot(hq, tl.trans(h), input_precision=PRECISION)  # E_ti (hq_t . h_i)
        branch = (gamma[:, None] * tl.dot(hq, tl.trans(w1), input_precision=PRECISION)
                  - scale[:, None] * tl.dot(hq_h, eta_u, input_precision=PRECISION))
        if ANCHOR:
            branch += (1.0 - gamma)[:, None] * tl.dot(hq, tl.trans(a1), input_precision=PRECISION)
        tl.store(reads_out + off_cd, (queries + branch).to(reads_out.dtype.element_ty), mask=m_cd)


INTERPRETED = not isinstance(_chunk_update_kernel, triton.runtime.JITFunction)


def block(n: int) -> int:
    """The padded tile size of a dimension n: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def num_warps(*blocks: int) -> int:
    """Warps per program: 4 for tiles up to 32, else 8 (more threads to hold 64 x 64 tiles in registers)."""
    return 4 if max(blocks) <= 32 else 8


def launch_chunk_update(w1, w2, keys, targets, queries, anchor1, anchor2, eta, gamma, d_mat, e_mat, gamma_prev, e_kk_prev, inverse,
                        d_qk, e_qk, *, last: int, step_bound: float, normalized_eta: bool):
    """Run the kernel on flat contiguous inputs (leading axis N: one program each); returns new (w1, w2, s1, s2),
    reads (None without queries), overshoot [N] and scale [N]. ``inverse`` None: no erase term; ``anchor1/2``
    None: retention toward zero."""
    n, c, d = keys.shape
    hid = w1.shape[-1]
    new_w1, new_w2 = torch.empty_like(w1), torch.empty_like(w2)
    new_s1, new_s2 = torch.empty_like(w1), torch.empty_like(w2)
    reads = torch.empty_like(queries) if queries is not None else None
    overshoot = eta.new_empty(n)
    scale = eta.new_empty(n)
    erase = inverse is not None
    precision = "ieee" if w1.dtype == torch.float32 else "tf32"
    dummy = eta  # pointer arguments that a constexpr branch never reads
    device = torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext()
    with device:  # launch on the inputs' GPU, whichever is current
        _chunk_update_kernel[(n,)](
            w1, w2, keys, targets, queries if queries is not None else dummy,
            anchor1 if anchor1 is not None else dummy, anchor2 if anchor2 is not None else dummy,
            eta, gamma, d_mat, e_mat, gamma_prev if erase else dummy, e_kk_prev if erase else dummy,
            inverse if erase else dummy, d_qk if queries is not None and erase else dummy,
            e_qk if queries is not None else dummy,
            new_w1, new_w2, new_s1, new_s2, reads if reads is not None else dummy, overshoot, scale,
            c, d, hid, last, float(step_bound),
            BC=block(c), BD=block(d), BH=block(hid),
            NORMALIZED=normalized_eta, BOUND=step_bound > 0, ERASE=erase, READS=queries is not None,
            ANCHOR=anchor1 is not None,
            PRECISION=precision, num_warps=num_warps(block(c), block(d), block(hid)),
        )
    return new_w1, new_w2, new_s1, new_s2, reads, overshoot, scale
