"""The Triton forward and backward kernels of ``memory.chunk_update`` for the default rule without momentum.

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

(A1, A2: the anchor retention decays toward, ``memory.chunk_update``'s ``anchor``; ANCHOR=False: zero, and the
(1 - gamma) terms vanish. memory.py derives these; L is the last valid token.) The erase system's inverse A^-1
and the other coefficients come precomputed (``memory.chunk_coefficients``, computed by the layer for all chunks
of a sequence at once).

**Backward** (``_chunk_update_bwd_kernel``, first-order rule: W1, W2 inside z, h, u, delta, kappa and rho are
constants; they carry gradients through gamma_L W, the erase vectors' state part K W2^T and the reads' gamma W1,
gamma W2 only; the anchor A1, A2 through the (1 - gamma) terms, where gamma_L, gamma_t and gamma_prev then
multiply W - A). One program per batch element again: it recomputes the forward's intermediates from the same
inputs with the same jit helpers (``_factors``, ``_rate``, ``_overshoots``, ``_erase_known``, ``_erase_vectors``,
``_read_preactivations``; nothing is stored by the forward), then runs the equations above in reverse:
the reads (``_reads_bwd``), the state after token L (``_end_state_bwd``), the erase vectors (``_erase_bwd``), the
step scale and overshoot rows (``_overshoots_bwd``: ds_t/drho_t = -tau / rho_t^2 where rho_t > tau, else 0; each
row's rho_t = num / den differentiated through c_t., the Gram matrices and J_j dW_t by ``_overshoot_row_bwd``,
0 where den is negligible), the rates (``_rate_bwd``: 0 through kappa where it is clamped to KAPPA_MIN or |g|^2 is
negligible) and the rank-1 factors (``_factors_bwd``). It writes the gradients of every input of the forward
kernel: W1, W2, K, V̂, Q, A1, A2, eta, gamma, D (row L), E, gamma_prev, E_kk_prev, A^-1, D_qk, E_qk. Tiles up to
``BWD_MAX_BLOCK`` (per dtype: the backward has more live tiles than the forward, see there).
**Sequence kernels** (``_sequence_update_kernel`` and its backward, ``kernels/sequence_update.py``): one program
per memory runs all of a forward's whole chunks of the main memory, the weights kept in registers between chunks;
per chunk the targets V̂ = M(V) (``_targets``) and the same chunk body as the per-chunk kernels (``_chunk_forward``,
``_chunk_backward``: inputs at entry ``idx`` = pid * n_chunks + n of chunk-major tensors, the anchor at pid). The
backward runs the chunks in reverse from the chunk-start weights the forward stored, carrying dL/dW.

Tiles are padded to powers of two >= 16 (``tl.dot``'s minimum) with masked loads: padded rows and columns are zero
and contribute nothing. Everything is computed and accumulated in fp32 and stored in the inputs' dtype; the
operands of the matrix products (``_dot``) are fp32 for fp32 inputs and rounded to the inputs' dtype for 16-bit
inputs (as flash-linear-attention's kernels do; their reference, the naive path in 16 bits, rounds every
intermediate).

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

# dot-product operands by input dtype (``_dot``): fp32 inputs keep fp32 (IEEE), 16-bit inputs round the operands to
# their own dtype and accumulate in fp32
PRECISION = {torch.float32: "ieee", torch.bfloat16: "bf16", torch.float16: "fp16"}
# largest padded C, d or h: every tile of a chunk lives in one program (128 would hold four times the tiles of 64,
# more than the shared memory of a GPU block). What each kernel needs, compiled for sm_90:
# ``python benchmarks/kernel_shared_memory.py`` (tests/test_model_kernel.py checks the largest 16-bit shapes fit)
MAX_BLOCK = 64
# largest padded C, d or h of the backward kernel, by input dtype. 16-bit: 64, the shipped models' head size and
# projection chunks (at 64 with every branch on it needs 176 KiB; with TF32 operands, before ``_dot`` rounded them
# to 16 bits, 528 KiB: Hopper's wgmma keeps the B operand of every dot in shared memory, and the backward has many
# live tiles). fp32: 32, the largest size compiled for sm_90 (at 64 its IEEE fp32 products did not finish compiling
# in 10 minutes); larger fp32 chunks recompute their backward in PyTorch (ChunkUpdate.backward)
BWD_MAX_BLOCK = {torch.float32: 32, torch.bfloat16: 64, torch.float16: 64}
_NEGLIGIBLE = tl.constexpr(NEGLIGIBLE)
_KAPPA_MIN = tl.constexpr(KAPPA_MIN)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    """sum over ``axis``. Compiled: tl.reduce with this module's own combine function. Interpreted: tl.reduce with
    triton's ``_sum_combine``, which the interpreter recognizes by identity and sums in numpy without calling it (so
    it works even where triton.language was decorated for the compiler, before ``TRITON_INTERPRET`` was set); any
    other combine function the interpreter applies element by element in Python (the whole kernel 4-6x slower)."""
    if _INTERPRET:
        return tl.reduce(x, axis, tl.standard._sum_combine)
    else:
        return tl.reduce(x, axis, _add)


@triton.jit
def _round_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), kept in fp32: what a GPU's x.to(bfloat16) gives. For the
    interpreter, whose bfloat16 conversion truncates and whose bfloat16 dot products are wrong (triton 3.8)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. PRECISION "ieee": fp32 operands (fp32 inputs); "bf16" / "fp16": the operands
    rounded to the inputs' 16-bit dtype, as tensor cores take them (Hopper's wgmma keeps a dot's B operand in
    shared memory: 16-bit operands halve it, which is what fits the backward's 64-tiles, see BWD_MAX_BLOCK). The
    interpreter computes the bf16 products in fp32 from operands rounded as the GPU rounds them (the same
    numbers: a product of two bfloat16 values is exact in fp32)."""
    if PRECISION == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    elif PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif _INTERPRET:
        return tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _safe_ratio(num, den):
    """num / den, 0 where den <= NEGLIGIBLE (memory.safe_ratio)."""
    ok = den > _NEGLIGIBLE
    return tl.where(ok, num / tl.where(ok, den, 1.0), 0.0)


@triton.jit
def _at(x, where):
    """The entry of vector x where the mask ``where`` is true (one entry): a scalar."""
    return _sum(tl.where(where, x, 0.0), axis=0)


@triton.jit
def _load_tile(ptr, pid, R, K, BR: tl.constexpr, BK: tl.constexpr):
    """Program pid's [R, K] matrix (row-major, contiguous per program), zero-padded to [BR, BK], in fp32."""
    r, k = tl.arange(0, BR), tl.arange(0, BK)
    mask = (r < R)[:, None] & (k < K)[None, :]
    return tl.load(ptr + pid * R * K + r[:, None] * K + k[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _in_dtype_of(ptr, x):
    """x converted to ptr's dtype, rounded to the nearest value as a GPU rounds (the interpreter's fp32 -> bf16
    conversion truncates: a state stored and reloaded chunk after chunk would drift toward zero)."""
    if _INTERPRET:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _round_bf16(x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _store_tile(ptr, pid, x, R, K, BR: tl.constexpr, BK: tl.constexpr):
    """Store the [R, K] part of the padded tile x as program pid's matrix, in ptr's dtype."""
    r, k = tl.arange(0, BR), tl.arange(0, BK)
    mask = (r < R)[:, None] & (k < K)[None, :]
    tl.store(ptr + pid * R * K + r[:, None] * K + k[None, :], _in_dtype_of(ptr, x), mask=mask)


@triton.jit
def _load_vec(ptr, pid, N, BN: tl.constexpr):
    """Program pid's [N] vector, zero-padded to [BN], in fp32."""
    r = tl.arange(0, BN)
    return tl.load(ptr + pid * N + r, mask=r < N, other=0.0).to(tl.float32)


@triton.jit
def _store_vec(ptr, pid, x, N, BN: tl.constexpr):
    r = tl.arange(0, BN)
    tl.store(ptr + pid * N + r, _in_dtype_of(ptr, x), mask=r < N)


@triton.jit
def _load_row(ptr, pid, t, C, BC: tl.constexpr):
    """Row t of program pid's [C, C] matrix, zero-padded to [BC], in fp32."""
    r = tl.arange(0, BC)
    return tl.load(ptr + pid * C * C + t * C + r, mask=r < C, other=0.0).to(tl.float32)


# ---- the chunk's forward quantities, recomputed by the backward kernel from the same inputs

@triton.jit
def _factors(keys, targets, w1, w2, PRECISION: tl.constexpr):
    """Rank-1 factors of each token's inner gradient at the chunk-start weights: z = K W2^T, h = silu(z),
    silu'(z), u = K + h W1^T - V̂, p = u W1, delta = p * silu'(z)."""
    z = _dot(keys, tl.trans(w2), PRECISION)  # [C, h]
    sig = _sigmoid(z)
    h = z * sig
    dsilu = sig * (1.0 + z * (1.0 - sig))
    u = keys + _dot(h, tl.trans(w1), PRECISION) - targets  # [C, d]
    p = _dot(u, w1, PRECISION)  # [C, h]
    return z, h, dsilu, u, p, p * dsilu


@triton.jit
def _curvature_terms(keys, h, u, delta, dsilu, w1, PRECISION: tl.constexpr):
    """The parts of kappa_i = ||J_i g_i||^2 / ||g_i||^2: ||h_i||^2, ||k_i||^2, m_i = W1 (silu'(z_i) delta_i),
    J_i g_i = ||h_i||^2 u_i + ||k_i||^2 m_i and ||g_i||^2 = ||u_i||^2 ||h_i||^2 + ||delta_i||^2 ||k_i||^2."""
    hh = _sum(h * h, axis=1)
    kk = _sum(keys * keys, axis=1)
    m = _dot(dsilu * delta, tl.trans(w1), PRECISION)  # [C, d]
    jg = hh[:, None] * u + kk[:, None] * m
    gg = _sum(u * u, axis=1) * hh + _sum(delta * delta, axis=1) * kk
    return hh, kk, m, jg, gg


@triton.jit
def _rate(eta, keys, h, u, delta, dsilu, w1, NORMALIZED: tl.constexpr, PRECISION: tl.constexpr):
    """r_i = eta_i / max(kappa_i, KAPPA_MIN) (or eta_i without ``normalized_eta``)."""
    if NORMALIZED:
        hh, kk, m, jg, gg = _curvature_terms(keys, h, u, delta, dsilu, w1, PRECISION)
        rate = eta / tl.maximum(_safe_ratio(_sum(jg * jg, axis=1), gg), _KAPPA_MIN)
    else:
        rate = eta
    return rate


@triton.jit
def _grams(keys, h, u, delta, PRECISION: tl.constexpr):
    """Gram matrices of the chunk's tokens: h_j.h_i, k_j.k_i and g_j.g_i = (u_j.u_i)(h_j.h_i) + (d_j.d_i)(k_j.k_i)."""
    hh_gram = _dot(h, tl.trans(h), PRECISION)
    kk_gram = _dot(keys, tl.trans(keys), PRECISION)
    gram = (_dot(u, tl.trans(u), PRECISION) * hh_gram
            + _dot(delta, tl.trans(delta), PRECISION) * kk_gram)
    return hh_gram, kk_gram, gram


@triton.jit
def _row_jacobians(rows, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION: tl.constexpr):
    """J_j dW_t for every token j, dW_t = sum_i c_ti g_i (one row c_t. of the accumulated step):
    jd_j = sum_i c_ti (h_j.h_i) u_i + W1 (silu'(z_j) * dw2k_j), dw2k_j = sum_i c_ti (k_j.k_i) delta_i."""
    j_w1 = _dot(hh_gram * rows[None, :], u, PRECISION)  # [C, d]
    dw2_k = _dot(kk_gram * rows[None, :], delta, PRECISION)  # [C, h]
    return j_w1 + _dot(dsilu * dw2_k, tl.trans(w1), PRECISION), dw2_k


@triton.jit
def _overshoot_row(rows, gram, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION: tl.constexpr):
    """rho_t = sum_j c_tj ||J_j dW_t||^2 / ||dW_t||^2 for one row c_t. (memory.chunk_overshoot), with
    ||dW_t||^2 = c_t^T G c_t."""
    den = _sum(_sum(gram * rows[None, :], axis=1) * rows, axis=0)
    jd, dw2_k = _row_jacobians(rows, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION)
    return _safe_ratio(_sum(rows * _sum(jd * jd, axis=1), axis=0), den)


@triton.jit
def _bound_rows(C, last, READS: tl.constexpr):
    """The rows t whose overshoot is needed: every token with reads (each reads with its own s_t), else L."""
    if READS:
        lo = 0
        hi = C
    else:
        lo = last
        hi = last + 1
    return lo, hi


@triton.jit
def _overshoots(e_ptr, pid, C, last, rate, keys, h, u, delta, dsilu, w1, step_bound,
                BC: tl.constexpr, BOUND: tl.constexpr, READS: tl.constexpr, PRECISION: tl.constexpr):
    """rho_t (rows c_ti = E_ti r_i) and s_t = tau / max(rho_t, tau) for every token t (without reads: rho_L and
    s_L for every t); rho = 0, s = 1 without a step bound."""
    rc = tl.arange(0, BC)
    lam = tl.full([BC], 0.0, dtype=tl.float32)
    if BOUND:
        hh_gram, kk_gram, gram = _grams(keys, h, u, delta, PRECISION)
        lo, hi = _bound_rows(C, last, READS)
        for t in range(lo, hi):
            rows = _load_row(e_ptr, pid, t, C, BC) * rate
            lam = tl.where(rc == t, _overshoot_row(rows, gram, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION),
                           lam)
        if not READS:
            lam = lam * 0.0 + _at(lam, rc == last)
        scale = step_bound / tl.maximum(lam, step_bound)
    else:
        scale = lam + 1.0
    return lam, scale


@triton.jit
def _erase_known(z, keys, a2, gamma_prev, ANCHOR: tl.constexpr, PRECISION: tl.constexpr):
    """W2_{s-1} k_s without the chunk's own terms: known = gamma_prev * z + (1 - gamma_prev) * z_A, z_A = K A2^T
    (0 without an anchor). Returns known and z - z_A (its derivative in gamma_prev)."""
    if ANCHOR:
        z_a = _dot(keys, tl.trans(a2), PRECISION)  # [C, h]
        known = gamma_prev[:, None] * z + (1.0 - gamma_prev)[:, None] * z_a
        diff = z - z_a
    else:
        known = gamma_prev[:, None] * z
        diff = z
    return known, diff


@triton.jit
def _erase_vectors(inverse, e_kk_prev, eta, known, eta_delta, PRECISION: tl.constexpr):
    """The erase vectors x_s = -eta_s W2_{s-1} k_s = x_state + s x_grad: x_state = A^-1 (-eta * known) (known
    from ``_erase_known``), x_grad = A^-1 (eta * ekk_ed), ekk_ed = (E_{s-1,i} k_i.k_s) @ (r delta) (also
    returned)."""
    x_state = _dot(inverse, -eta[:, None] * known, PRECISION)  # [C, h]
    ekk_ed = _dot(e_kk_prev, eta_delta, PRECISION)
    x_grad = _dot(inverse, eta[:, None] * ekk_ed, PRECISION)
    return x_state, x_grad, ekk_ed


@triton.jit
def _read_preactivations(queries, w2, a2, gamma, d_qk, e_qk, x_state, x_grad, eta_delta,
                         ANCHOR: tl.constexpr, ERASE: tl.constexpr, PRECISION: tl.constexpr):
    """W2_t q_t = zq_state + s_t zq_grad: zq_state = gamma * q W2^T + (1 - gamma) * q A2^T + D_qk x_state (no
    anchor term without one), zq_grad = D_qk x_grad - E_qk (r delta). Also returns q_diff = q (W2 - A2)^T (q W2^T
    without an anchor), zq_state's derivative in gamma."""
    qw2 = _dot(queries, tl.trans(w2), PRECISION)  # [C, h]
    if ANCHOR:
        qa2 = _dot(queries, tl.trans(a2), PRECISION)
        zq_state = gamma[:, None] * qw2 + (1.0 - gamma)[:, None] * qa2
        q_diff = qw2 - qa2
    else:
        zq_state = gamma[:, None] * qw2
        q_diff = qw2
    zq_grad = -_dot(e_qk, eta_delta, PRECISION)
    if ERASE:
        zq_state += _dot(d_qk, x_state, PRECISION)
        zq_grad += _dot(d_qk, x_grad, PRECISION)
    return q_diff, zq_state, zq_grad


@triton.jit
def _chunk_forward(
    w1, w2, targets, idx, cid, sid, keys_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
    reads_out, overshoot_out, scale_out,
    C, D, HID, last, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    """One chunk from its start weights w1 [d, h], w2 [h, d] and its targets V̂ [C, d] (fp32 tiles): the chunk's
    keys, queries and coefficients are entry ``cid`` of their pointers (shared by the programs of one chunk's
    stacked memories), the anchor entry ``sid``. Stores the reads, overshoot and scale as entry ``idx``; returns
    the weights and momentum after token ``last`` (the module docstring's equations)."""
    at_last = tl.arange(0, BC) == last
    keys = _load_tile(keys_ptr, cid, C, D, BC, BD)  # [C, d]
    eta = _load_vec(eta_ptr, cid, C, BC)  # [C]
    gamma = _load_vec(gamma_ptr, cid, C, BC)

    z, h, dsilu, u, p, delta = _factors(keys, targets, w1, w2, PRECISION)
    rate = _rate(eta, keys, h, u, delta, dsilu, w1, NORMALIZED, PRECISION)
    eta_u = rate[:, None] * u
    eta_delta = rate[:, None] * delta
    lam, scale = _overshoots(e_ptr, cid, C, last, rate, keys, h, u, delta, dsilu, w1, step_bound,
                             BC, BOUND, READS, PRECISION)
    s_end = _at(scale, at_last)
    if ERASE:
        gamma_prev = _load_vec(gamma_prev_ptr, cid, C, BC)
        inverse = _load_tile(inverse_ptr, cid, C, C, BC, BC)
        e_kk_prev = _load_tile(e_kk_prev_ptr, cid, C, C, BC, BC)
        known, _ = _erase_known(z, keys, _load_tile(a2_ptr, sid, HID, D, BH, BD) if ANCHOR else w2, gamma_prev,
                                ANCHOR, PRECISION)
        x_state, x_grad, ekk_ed = _erase_vectors(inverse, e_kk_prev, eta, known, eta_delta, PRECISION)

    # the state after the last valid token L
    gamma_end = _at(gamma, at_last)
    e_end = _load_row(e_ptr, cid, last, C, BC)
    if ANCHOR:  # retention decays toward (A1, A2) (loaded where used: fewer live tiles)
        w1_end = gamma_end * w1 + (1.0 - gamma_end) * _load_tile(a1_ptr, sid, D, HID, BD, BH)
        w2_end = gamma_end * w2 + (1.0 - gamma_end) * _load_tile(a2_ptr, sid, HID, D, BH, BD)
    else:
        w1_end, w2_end = gamma_end * w1, gamma_end * w2
    new_w1 = w1_end - s_end * _dot(tl.trans(e_end[:, None] * eta_u), h, PRECISION)
    new_w2 = w2_end - s_end * _dot(tl.trans(e_end[:, None] * eta_delta), keys, PRECISION)
    if ERASE:
        d_end = _load_row(d_ptr, cid, last, C, BC)
        new_w2 += _dot(tl.trans(d_end[:, None] * (x_state + s_end * x_grad)), keys, PRECISION)
    new_s1 = -s_end * _dot(tl.trans(tl.where(at_last[:, None], eta_u, 0.0)), h, PRECISION)
    new_s2 = -s_end * _dot(tl.trans(tl.where(at_last[:, None], eta_delta, 0.0)), keys, PRECISION)
    tl.store(overshoot_out + idx, _in_dtype_of(overshoot_out, _at(lam, at_last)))
    tl.store(scale_out + idx, _in_dtype_of(scale_out, s_end))

    if READS:  # o_t = m_{W_t}(q_t), the gradient parts of W_t scaled by s_t
        queries = _load_tile(queries_ptr, cid, C, D, BC, BD)
        e_qk = _load_tile(e_qk_ptr, cid, C, C, BC, BC)
        if ERASE:
            d_qk = _load_tile(d_qk_ptr, cid, C, C, BC, BC)
        else:
            d_qk, x_state, x_grad = e_qk, h, h  # unused without erase
        a2 = _load_tile(a2_ptr, sid, HID, D, BH, BD) if ANCHOR else w2
        _, zq_state, zq_grad = _read_preactivations(queries, w2, a2, gamma, d_qk, e_qk, x_state, x_grad, eta_delta,
                                                    ANCHOR, ERASE, PRECISION)
        zq = zq_state + scale[:, None] * zq_grad
        hq = zq * _sigmoid(zq)
        e_mat = _load_tile(e_ptr, cid, C, C, BC, BC)
        hq_h = e_mat * _dot(hq, tl.trans(h), PRECISION)  # E_ti (hq_t . h_i)
        branch = (gamma[:, None] * _dot(hq, tl.trans(w1), PRECISION)
                  - scale[:, None] * _dot(hq_h, eta_u, PRECISION))
        if ANCHOR:
            a1 = _load_tile(a1_ptr, sid, D, HID, BD, BH)
            branch += (1.0 - gamma)[:, None] * _dot(hq, tl.trans(a1), PRECISION)
        _store_tile(reads_out, idx, queries + branch, C, D, BC, BD)
    return new_w1, new_w2, new_s1, new_s2


@triton.jit
def _store_state(w1_out, w2_out, s1_out, s2_out, pid, w1, w2, s1, s2, D, HID, BD: tl.constexpr, BH: tl.constexpr):
    """Store a memory's weights W1 [d, h], W2 [h, d] and momentum S1, S2 as program pid's."""
    _store_tile(w1_out, pid, w1, D, HID, BD, BH)
    _store_tile(w2_out, pid, w2, HID, D, BH, BD)
    _store_tile(s1_out, pid, s1, D, HID, BD, BH)
    _store_tile(s2_out, pid, s2, HID, D, BH, BD)


@triton.jit
def _chunk_update_kernel(
    w1_ptr, w2_ptr, keys_ptr, targets_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
    w1_out, w2_out, s1_out, s2_out, reads_out, overshoot_out, scale_out,
    C, D, HID, last, step_bound, share, n_anchors,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    """One chunk per program: ``_chunk_forward`` from the stored start weights (entry pid of the weights and
    targets; ``share`` consecutive programs share their keys, queries and coefficients, the stacked projection
    memories of one head; the anchor is entry pid % ``n_anchors``, broadcast over the batch)."""
    pid = tl.program_id(0).to(tl.int64)
    new_w1, new_w2, new_s1, new_s2 = _chunk_forward(
        _load_tile(w1_ptr, pid, D, HID, BD, BH), _load_tile(w2_ptr, pid, HID, D, BH, BD),
        _load_tile(targets_ptr, pid, C, D, BC, BD), pid, pid // share, pid % n_anchors, keys_ptr, queries_ptr,
        a1_ptr, a2_ptr,
        eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
        reads_out, overshoot_out, scale_out, C, D, HID, last, step_bound,
        BC, BD, BH, NORMALIZED, BOUND, ERASE, READS, ANCHOR, PRECISION)
    _store_state(w1_out, w2_out, s1_out, s2_out, pid, new_w1, new_w2, new_s1, new_s2, D, HID, BD, BH)


# ---- the backward (first order: the chunk-start weights inside the inner gradients are constants)

@triton.jit
def _reads_bwd(g_o, queries, w1, w2, a1, a2, h, eta_u, eta_delta, gamma, scale, e_mat, d_qk, e_qk, x_state, x_grad,
               ANCHOR: tl.constexpr, ERASE: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of o_t = q_t + (gamma_t W1 + (1 - gamma_t) A1) hq_t - s_t sum_i E_ti (hq_t.h_i) r_i u_i,
    hq = silu(zq), zq = q (gamma W2 + (1 - gamma) A2)^T + D_qk x_state + s (D_qk x_grad - E_qk (r delta)) (no A
    terms without an anchor), given g_o = dLoss/do. Returns the gradients of q, W1, W2, A1, A2 (0 without an
    anchor), gamma, s, E, h, r u, r delta, D_qk, E_qk, x_state, x_grad."""
    q_diff, zq_state, zq_grad = _read_preactivations(queries, w2, a2, gamma, d_qk, e_qk, x_state, x_grad,
                                                     eta_delta, ANCHOR, ERASE, PRECISION)
    zq = zq_state + scale[:, None] * zq_grad
    sig = _sigmoid(zq)
    hq = zq * sig
    hq_h = _dot(hq, tl.trans(h), PRECISION)  # hq_t . h_i
    g_w1 = _dot(tl.trans(gamma[:, None] * g_o), hq, PRECISION)
    g_hq = gamma[:, None] * _dot(g_o, w1, PRECISION)
    if ANCHOR:  # d/dgamma of gamma W1 + (1 - gamma) A1 is W1 - A1
        g_gamma = _sum(g_o * _dot(hq, tl.trans(w1 - a1), PRECISION), axis=1)
        g_a1 = _dot(tl.trans((1.0 - gamma)[:, None] * g_o), hq, PRECISION)
        g_hq += (1.0 - gamma)[:, None] * _dot(g_o, a1, PRECISION)
    else:
        g_gamma = _sum(g_o * _dot(hq, tl.trans(w1), PRECISION), axis=1)
        g_a1 = g_w1 * 0.0
    g_scale = -_sum(g_o * _dot(e_mat * hq_h, eta_u, PRECISION), axis=1)
    g_sum = -scale[:, None] * g_o  # dLoss / d(sum_i E_ti (hq_t.h_i) r_i u_i)
    g_hq_h = _dot(g_sum, tl.trans(eta_u), PRECISION)  # [C, C], then times E
    g_eu = _dot(tl.trans(e_mat * hq_h), g_sum, PRECISION)
    g_e = g_hq_h * hq_h
    g_hq_h = g_hq_h * e_mat
    g_hq += _dot(g_hq_h, h, PRECISION)
    g_h = _dot(tl.trans(g_hq_h), hq, PRECISION)
    g_zq = g_hq * sig * (1.0 + zq * (1.0 - sig))  # silu'
    g_gamma += _sum(g_zq * q_diff, axis=1)
    g_q = g_o + _dot(gamma[:, None] * g_zq, w2, PRECISION)
    g_w2 = _dot(tl.trans(gamma[:, None] * g_zq), queries, PRECISION)
    if ANCHOR:
        g_q += _dot((1.0 - gamma)[:, None] * g_zq, a2, PRECISION)
        g_a2 = _dot(tl.trans((1.0 - gamma)[:, None] * g_zq), queries, PRECISION)
    else:
        g_a2 = g_w2 * 0.0
    g_scale += _sum(g_zq * zq_grad, axis=1)
    g_zq_grad = scale[:, None] * g_zq
    g_eqk = -_dot(g_zq_grad, tl.trans(eta_delta), PRECISION)
    g_ed = -_dot(tl.trans(e_qk), g_zq_grad, PRECISION)
    if ERASE:
        g_dqk = (_dot(g_zq, tl.trans(x_state), PRECISION)
                 + _dot(g_zq_grad, tl.trans(x_grad), PRECISION))
        g_xs = _dot(tl.trans(d_qk), g_zq, PRECISION)
        g_xg = _dot(tl.trans(d_qk), g_zq_grad, PRECISION)
    else:
        g_dqk, g_xs, g_xg = g_eqk * 0.0, g_zq * 0.0, g_zq * 0.0
    return g_q, g_w1, g_w2, g_a1, g_a2, g_gamma, g_scale, g_e, g_h, g_eu, g_ed, g_dqk, g_eqk, g_xs, g_xg


@triton.jit
def _end_state_bwd(g_w1, g_w2, g_s1, g_s2, w1_d, w2_d, keys, h, eta_u, eta_delta, e_end, d_end, s_end, at_last,
                   x_state, x_grad, ERASE: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of W1' = gamma_L W1 + (1 - gamma_L) A1 - s_L (E_L * r u)^T h, W2' = gamma_L W2 + (1 - gamma_L) A2
    - s_L (E_L * r delta)^T K + (D_L * (x_state + s_L x_grad))^T K, S1' = -s_L r_L u_L h_L^T,
    S2' = -s_L r_L delta_L k_L^T (row L of E, D: e_end, d_end; w1_d, w2_d: W - A, or W without an anchor).
    Returns the gradients of gamma_L, s_L (scalars), E_L., D_L. (vectors), r u, r delta, h, K, x_state, x_grad;
    W1's and W2's are gamma_L g_w1 and gamma_L g_w2, A1's and A2's (1 - gamma_L) g_w1 and (1 - gamma_L) g_w2."""
    hg1 = _dot(h, tl.trans(g_w1), PRECISION)  # [C, d]: g_W1' h_i
    kg2 = _dot(keys, tl.trans(g_w2), PRECISION)  # [C, h]: g_W2' k_i
    steps = _sum(eta_u * hg1, axis=1) + _sum(eta_delta * kg2, axis=1)
    g_gamma_end = _sum(_sum(g_w1 * w1_d, axis=1), axis=0) + _sum(_sum(g_w2 * w2_d, axis=1), axis=0)
    g_e_end = -s_end * steps
    g_s_end = -_sum(e_end * steps, axis=0)
    g_eu = -s_end * e_end[:, None] * hg1
    g_ed = -s_end * e_end[:, None] * kg2
    g_h = -s_end * _dot(e_end[:, None] * eta_u, g_w1, PRECISION)
    g_k = -s_end * _dot(e_end[:, None] * eta_delta, g_w2, PRECISION)
    # the momentum after the chunk: token L's step
    hs1 = tl.where(at_last[:, None], _dot(h, tl.trans(g_s1), PRECISION), 0.0)
    ks2 = tl.where(at_last[:, None], _dot(keys, tl.trans(g_s2), PRECISION), 0.0)
    g_s_end -= _sum(_sum(eta_u * hs1, axis=1) + _sum(eta_delta * ks2, axis=1), axis=0)
    g_eu -= s_end * hs1
    g_ed -= s_end * ks2
    g_h -= s_end * tl.where(at_last[:, None], _dot(eta_u, g_s1, PRECISION), 0.0)
    g_k -= s_end * tl.where(at_last[:, None], _dot(eta_delta, g_s2, PRECISION), 0.0)
    if ERASE:
        x_end = x_state + s_end * x_grad
        g_d_end = _sum(x_end * kg2, axis=1)
        g_xs = d_end[:, None] * kg2
        g_xg = s_end * g_xs
        g_s_end += _sum(d_end * _sum(x_grad * kg2, axis=1), axis=0)
        g_k += _dot(d_end[:, None] * x_end, g_w2, PRECISION)
    else:
        g_d_end, g_xs, g_xg = e_end * 0.0, g_ed * 0.0, g_ed * 0.0
    return g_gamma_end, g_s_end, g_e_end, g_d_end, g_eu, g_ed, g_h, g_k, g_xs, g_xg


@triton.jit
def _erase_bwd(g_xs, g_xg, inverse, e_kk_prev, eta, known, eta_delta, ekk_ed, PRECISION: tl.constexpr):
    """Backward of x_state = A^-1 (-eta * known), x_grad = A^-1 (eta * (E_kk_prev (r delta))): the gradients of
    A^-1, eta, known (``_erase_known``), E_kk_prev and r delta."""
    n_state = -eta[:, None] * known
    g_inv = (_dot(g_xs, tl.trans(n_state), PRECISION)
             + _dot(g_xg, tl.trans(eta[:, None] * ekk_ed), PRECISION))
    g_n_state = _dot(tl.trans(inverse), g_xs, PRECISION)
    g_n_grad = _dot(tl.trans(inverse), g_xg, PRECISION)
    g_eta = -_sum(g_n_state * known, axis=1) + _sum(g_n_grad * ekk_ed, axis=1)
    g_ekk_ed = eta[:, None] * g_n_grad
    g_ekk = _dot(g_ekk_ed, tl.trans(eta_delta), PRECISION)
    g_ed = _dot(tl.trans(e_kk_prev), g_ekk_ed, PRECISION)
    return g_inv, g_eta, -eta[:, None] * g_n_state, g_ekk, g_ed


@triton.jit
def _overshoot_row_bwd(g_rho, rows, gram, hh_gram, kk_gram, u, delta, dsilu, w1, g_gram, g_hh, g_kk, g_u,
                       g_delta, g_dsilu, PRECISION: tl.constexpr):
    """Backward of rho_t = num / den (0 where den is negligible), num = sum_j c_j ||jd_j||^2, den = c^T G c,
    jd = (HH * c) U + (silu' * (KK * c) delta) W1^T, for one row c = c_t.: returns dLoss/dc and the gradient
    accumulators of G, HH, KK, u, delta, silu' with this row's terms added."""
    g_c_gram = _sum(gram * rows[None, :], axis=1)  # G c
    den = _sum(g_c_gram * rows, axis=0)
    jd, dw2_k = _row_jacobians(rows, hh_gram, kk_gram, u, delta, dsilu, w1, PRECISION)
    jj = _sum(jd * jd, axis=1)
    ok = den > _NEGLIGIBLE
    den = tl.where(ok, den, 1.0)
    g_num = tl.where(ok, g_rho / den, 0.0)
    g_den = tl.where(ok, -g_rho * _sum(rows * jj, axis=0) / (den * den), 0.0)
    g_c = 2.0 * g_den * g_c_gram + g_num * jj
    g_gram += g_den * rows[:, None] * rows[None, :]
    g_jd = (2.0 * g_num * rows)[:, None] * jd
    g_t = _dot(g_jd, w1, PRECISION)  # [C, h]
    g_dsilu += g_t * dw2_k
    g_dw2_k = g_t * dsilu
    g_hh_c = _dot(g_jd, tl.trans(u), PRECISION)  # [C, C]: of HH * c
    g_hh += g_hh_c * rows[None, :]
    g_u += _dot(tl.trans(hh_gram * rows[None, :]), g_jd, PRECISION)
    g_kk_c = _dot(g_dw2_k, tl.trans(delta), PRECISION)
    g_kk += g_kk_c * rows[None, :]
    g_delta += _dot(tl.trans(kk_gram * rows[None, :]), g_dw2_k, PRECISION)
    g_c += _sum(g_hh_c * hh_gram, axis=0) + _sum(g_kk_c * kk_gram, axis=0)
    return g_c, g_gram, g_hh, g_kk, g_u, g_delta, g_dsilu


@triton.jit
def _overshoots_bwd(g_scale, lam, e_ptr, pid, C, last, rate, keys, h, u, delta, dsilu, w1, step_bound,
                    BC: tl.constexpr, READS: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of s_t = tau / max(rho_t, tau) (ds/drho = -tau / rho^2 where rho > tau, else 0) and of rho_t for
    the rows c_ti = E_ti r_i (every t with reads, else t = L), then of the Gram matrices. Returns the gradients of
    r, E (a [C, C] tile with rows t), u, delta, silu', h and K."""
    rc = tl.arange(0, BC)
    hh_gram, kk_gram, gram = _grams(keys, h, u, delta, PRECISION)
    clamped = tl.maximum(lam, step_bound)
    g_rho = tl.where(lam > step_bound, -g_scale * step_bound / (clamped * clamped), 0.0)
    g_gram, g_hh, g_kk, g_e = gram * 0.0, gram * 0.0, gram * 0.0, gram * 0.0
    g_u, g_delta, g_dsilu, g_rate = u * 0.0, delta * 0.0, delta * 0.0, rate * 0.0
    lo, hi = _bound_rows(C, last, READS)
    for t in range(lo, hi):
        e_row = _load_row(e_ptr, pid, t, C, BC)
        g_c, g_gram, g_hh, g_kk, g_u, g_delta, g_dsilu = _overshoot_row_bwd(
            _at(g_rho, rc == t), e_row * rate, gram, hh_gram, kk_gram, u, delta, dsilu, w1, g_gram, g_hh, g_kk,
            g_u, g_delta, g_dsilu, PRECISION)
        g_e = tl.where((rc == t)[:, None], g_e + (g_c * rate)[None, :], g_e)
        g_rate += g_c * e_row
    # G = (U U^T) * HH + (delta delta^T) * KK, HH = h h^T, KK = K K^T (G, HH, KK symmetric; g_gram too)
    g_hh += g_gram * _dot(u, tl.trans(u), PRECISION)
    g_kk += g_gram * _dot(delta, tl.trans(delta), PRECISION)
    g_u += 2.0 * _dot(g_gram * hh_gram, u, PRECISION)
    g_delta += 2.0 * _dot(g_gram * kk_gram, delta, PRECISION)
    g_h = _dot(g_hh + tl.trans(g_hh), h, PRECISION)
    g_k = _dot(g_kk + tl.trans(g_kk), keys, PRECISION)
    return g_rate, g_e, g_u, g_delta, g_dsilu, g_h, g_k


@triton.jit
def _rate_bwd(g_rate, eta, keys, h, u, delta, dsilu, w1, NORMALIZED: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of r = eta / max(kappa, KAPPA_MIN) (0 through kappa where it is clamped; kappa = |Jg|^2 / |g|^2,
    0 gradient where |g|^2 is negligible) or r = eta: the gradients of eta, u, delta, silu', h and K."""
    if NORMALIZED:
        hh, kk, m, jg, gg = _curvature_terms(keys, h, u, delta, dsilu, w1, PRECISION)
        kappa = _safe_ratio(_sum(jg * jg, axis=1), gg)
        clamped = tl.maximum(kappa, _KAPPA_MIN)
        g_eta = g_rate / clamped
        g_kappa = tl.where(kappa > _KAPPA_MIN, -g_rate * eta / (clamped * clamped), 0.0)
        ok = gg > _NEGLIGIBLE
        gg = tl.where(ok, gg, 1.0)
        g_jg = tl.where(ok, 2.0 * g_kappa / gg, 0.0)[:, None] * jg
        g_gg = tl.where(ok, -g_kappa * kappa / gg, 0.0)
        g_hh = _sum(g_jg * u, axis=1) + g_gg * _sum(u * u, axis=1)
        g_kk = _sum(g_jg * m, axis=1) + g_gg * _sum(delta * delta, axis=1)
        g_u = hh[:, None] * g_jg + (2.0 * g_gg * hh)[:, None] * u
        g_m = _dot(kk[:, None] * g_jg, w1, PRECISION)  # of silu' * delta
        g_dsilu = g_m * delta
        g_delta = g_m * dsilu + (2.0 * g_gg * kk)[:, None] * delta
        g_h = (2.0 * g_hh)[:, None] * h
        g_k = (2.0 * g_kk)[:, None] * keys
    else:
        g_eta = g_rate
        g_u, g_k = u * 0.0, keys * 0.0
        g_delta, g_dsilu, g_h = delta * 0.0, delta * 0.0, delta * 0.0
    return g_eta, g_u, g_delta, g_dsilu, g_h, g_k


@triton.jit
def _factors_bwd(g_u, g_delta, g_dsilu, g_h, g_z, z, p, dsilu, w1, w2, PRECISION: tl.constexpr):
    """Backward of z = K W2^T, h = silu(z), u = K + h W1^T - V̂, delta = (u W1) * silu'(z) with W1, W2 constants
    (first order); g_z: the gradient of z from elsewhere (the erase vectors' state part). Returns the gradients of
    K and V̂."""
    g_dsilu += g_delta * p
    g_u += _dot(g_delta * dsilu, tl.trans(w1), PRECISION)
    g_h += _dot(g_u, w1, PRECISION)
    sig = _sigmoid(z)
    g_z += g_h * dsilu + g_dsilu * sig * (1.0 - sig) * (2.0 + z * (1.0 - 2.0 * sig))  # silu''
    return g_u + _dot(g_z, w2, PRECISION), -g_u


@triton.jit
def _chunk_backward(
    w1, w2, targets, g_w1, g_w2, g_s1, g_s2, idx, cid, sid, keys_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr, g_reads_ptr,
    keys_grad, queries_grad, eta_grad, gamma_grad, d_grad, e_grad, gamma_prev_grad, e_kk_prev_grad, inverse_grad,
    d_qk_grad, e_qk_grad,
    C, D, HID, last, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward of ``_chunk_forward`` for one chunk: from its start weights w1, w2 and targets (fp32 tiles) and the
    gradients of its end weights and momentum (g_w1, g_w2, g_s1, g_s2, tiles) and of its reads (entry ``idx`` of
    ``g_reads_ptr``), with its keys, queries and coefficients at entry ``cid`` (as ``_chunk_forward``). Stores the
    gradients of the chunk's other inputs as entry ``idx`` (per program: shared inputs' are summed by the caller);
    returns those of the start weights, the targets and the anchor (tiles: 0 without an anchor)."""
    rc = tl.arange(0, BC)
    at_last = rc == last
    # recompute the forward's intermediates (the forward stores none)
    keys = _load_tile(keys_ptr, cid, C, D, BC, BD)
    eta = _load_vec(eta_ptr, cid, C, BC)
    gamma = _load_vec(gamma_ptr, cid, C, BC)
    if ANCHOR:
        a1 = _load_tile(a1_ptr, sid, D, HID, BD, BH)
        a2 = _load_tile(a2_ptr, sid, HID, D, BH, BD)
        w1_d, w2_d = w1 - a1, w2 - a2  # d/dgamma of gamma W + (1 - gamma) A
    else:
        a1, a2 = w1, w2  # unused without an anchor
        w1_d, w2_d = w1, w2
    z, h, dsilu, u, p, delta = _factors(keys, targets, w1, w2, PRECISION)
    rate = _rate(eta, keys, h, u, delta, dsilu, w1, NORMALIZED, PRECISION)
    eta_u = rate[:, None] * u
    eta_delta = rate[:, None] * delta
    lam, scale = _overshoots(e_ptr, cid, C, last, rate, keys, h, u, delta, dsilu, w1, step_bound,
                             BC, BOUND, READS, PRECISION)
    s_end = _at(scale, at_last)
    e_end = _load_row(e_ptr, cid, last, C, BC)
    if ERASE:
        gamma_prev = _load_vec(gamma_prev_ptr, cid, C, BC)
        inverse = _load_tile(inverse_ptr, cid, C, C, BC, BC)
        e_kk_prev = _load_tile(e_kk_prev_ptr, cid, C, C, BC, BC)
        known, known_diff = _erase_known(z, keys, a2, gamma_prev, ANCHOR, PRECISION)
        x_state, x_grad, ekk_ed = _erase_vectors(inverse, e_kk_prev, eta, known, eta_delta, PRECISION)
        d_end = _load_row(d_ptr, cid, last, C, BC)
    else:
        x_state, x_grad, d_end = h, h, e_end  # unused without erase

    # backward, from the outputs to the inputs: the state after token L
    g_gamma_end, g_s_end, g_e_end, g_d_end, g_eu, g_ed, g_h, g_k, g_xs, g_xg = _end_state_bwd(
        g_w1, g_w2, g_s1, g_s2, w1_d, w2_d, keys, h, eta_u, eta_delta, e_end, d_end, s_end, at_last, x_state, x_grad,
        ERASE, PRECISION)
    g_a1 = (1.0 - _at(gamma, at_last)) * g_w1  # used with an anchor only
    g_a2 = (1.0 - _at(gamma, at_last)) * g_w2
    g_w1 = _at(gamma, at_last) * g_w1
    g_w2 = _at(gamma, at_last) * g_w2
    g_gamma = tl.where(at_last, g_gamma_end, 0.0)
    g_scale = tl.where(at_last, g_s_end, 0.0)
    g_e = tl.where(at_last[:, None], g_e_end[None, :], 0.0)
    if ERASE:  # D enters through row L only (and nothing without erase)
        _store_tile(d_grad, idx, tl.where(at_last[:, None], g_d_end[None, :], 0.0), C, C, BC, BC)
    if READS:
        queries = _load_tile(queries_ptr, cid, C, D, BC, BD)
        e_qk = _load_tile(e_qk_ptr, cid, C, C, BC, BC)
        if ERASE:
            d_qk = _load_tile(d_qk_ptr, cid, C, C, BC, BC)
        else:
            d_qk = e_qk  # unused without erase
        (g_q, g_w1_r, g_w2_r, g_a1_r, g_a2_r, g_gamma_r, g_scale_r, g_e_r, g_h_r, g_eu_r, g_ed_r, g_dqk, g_eqk,
         g_xs_r, g_xg_r) = _reads_bwd(_load_tile(g_reads_ptr, idx, C, D, BC, BD), queries, w1, w2, a1, a2, h, eta_u,
                                      eta_delta, gamma, scale, _load_tile(e_ptr, cid, C, C, BC, BC), d_qk, e_qk,
                                      x_state, x_grad, ANCHOR, ERASE, PRECISION)
        _store_tile(queries_grad, idx, g_q, C, D, BC, BD)
        _store_tile(e_qk_grad, idx, g_eqk, C, C, BC, BC)
        if ERASE:
            _store_tile(d_qk_grad, idx, g_dqk, C, C, BC, BC)
        g_w1 += g_w1_r
        g_w2 += g_w2_r
        g_a1 += g_a1_r
        g_a2 += g_a2_r
        g_gamma += g_gamma_r
        g_scale += g_scale_r
        g_e += g_e_r
        g_h += g_h_r
        g_eu += g_eu_r
        g_ed += g_ed_r
        g_xs += g_xs_r
        g_xg += g_xg_r
    _store_vec(gamma_grad, idx, g_gamma, C, BC)

    g_eta = eta * 0.0
    g_z = z * 0.0  # through the erase vectors' state part, K W2^T with W2 the state (not a constant)
    if ERASE:
        g_inv, g_eta, g_known, g_ekk, g_ed_x = _erase_bwd(g_xs, g_xg, inverse, e_kk_prev, eta, known, eta_delta,
                                                          ekk_ed, PRECISION)
        g_ed += g_ed_x
        _store_tile(inverse_grad, idx, g_inv, C, C, BC, BC)
        # known = gamma_prev * z + (1 - gamma_prev) * K A2^T
        _store_vec(gamma_prev_grad, idx, _sum(g_known * known_diff, axis=1), C, BC)
        _store_tile(e_kk_prev_grad, idx, g_ekk, C, C, BC, BC)
        g_z = gamma_prev[:, None] * g_known
        g_w2 += _dot(tl.trans(g_z), keys, PRECISION)
        if ANCHOR:
            g_z_a = (1.0 - gamma_prev)[:, None] * g_known
            g_a2 += _dot(tl.trans(g_z_a), keys, PRECISION)
            g_k += _dot(g_z_a, a2, PRECISION)

    # the step bound, then r u and r delta, the rate and the rank-1 factors
    g_u = rate[:, None] * g_eu
    g_delta = rate[:, None] * g_ed
    g_rate = _sum(g_eu * u, axis=1) + _sum(g_ed * delta, axis=1)
    g_dsilu = delta * 0.0
    if BOUND:
        g_rate_b, g_e_b, g_u_b, g_delta_b, g_dsilu, g_h_b, g_k_b = _overshoots_bwd(
            g_scale, lam, e_ptr, cid, C, last, rate, keys, h, u, delta, dsilu, w1, step_bound, BC, READS, PRECISION)
        g_rate += g_rate_b
        g_e += g_e_b
        g_u += g_u_b
        g_delta += g_delta_b
        g_h += g_h_b
        g_k += g_k_b
    _store_tile(e_grad, idx, g_e, C, C, BC, BC)
    g_eta_r, g_u_r, g_delta_r, g_dsilu_r, g_h_r, g_k_r = _rate_bwd(g_rate, eta, keys, h, u, delta, dsilu, w1,
                                                                   NORMALIZED, PRECISION)
    _store_vec(eta_grad, idx, g_eta + g_eta_r, C, BC)
    g_k_f, g_v = _factors_bwd(g_u + g_u_r, g_delta + g_delta_r, g_dsilu + g_dsilu_r, g_h + g_h_r, g_z, z, p, dsilu,
                              w1, w2, PRECISION)
    _store_tile(keys_grad, idx, g_k + g_k_r + g_k_f, C, D, BC, BD)
    return g_w1, g_w2, g_v, g_a1, g_a2


@triton.jit
def _store_start_grads(w1_grad, w2_grad, targets_grad, a1_grad, a2_grad, idx, g_w1, g_w2, g_t, g_a1, g_a2,
                       C, D, HID, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, ANCHOR: tl.constexpr):
    """Store ``_chunk_backward``'s gradients of the start weights, the targets and (ANCHOR) the anchor as entry
    ``idx``."""
    _store_tile(w1_grad, idx, g_w1, D, HID, BD, BH)
    _store_tile(w2_grad, idx, g_w2, HID, D, BH, BD)
    _store_tile(targets_grad, idx, g_t, C, D, BC, BD)
    if ANCHOR:
        _store_tile(a1_grad, idx, g_a1, D, HID, BD, BH)
        _store_tile(a2_grad, idx, g_a2, HID, D, BH, BD)


@triton.jit
def _chunk_update_bwd_kernel(
    w1_ptr, w2_ptr, keys_ptr, targets_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
    g_w1_ptr, g_w2_ptr, g_s1_ptr, g_s2_ptr, g_reads_ptr,
    w1_grad, w2_grad, keys_grad, targets_grad, queries_grad, a1_grad, a2_grad, eta_grad, gamma_grad, d_grad, e_grad,
    gamma_prev_grad, e_kk_prev_grad, inverse_grad, d_qk_grad, e_qk_grad,
    C, D, HID, last, step_bound, share, n_anchors,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, READS: tl.constexpr,
    ANCHOR: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradients of the forward kernel's inputs (``*_grad``) from those of its outputs W1', W2', S1', S2' and
    the reads (``g_*_ptr``); the same constexpr branches and indexing as the forward. One chunk per program:
    ``_chunk_backward``; every gradient is stored per program (the launcher sums shared inputs' and the
    anchor's)."""
    pid = tl.program_id(0).to(tl.int64)
    g_w1, g_w2, g_v, g_a1, g_a2 = _chunk_backward(
        _load_tile(w1_ptr, pid, D, HID, BD, BH), _load_tile(w2_ptr, pid, HID, D, BH, BD),
        _load_tile(targets_ptr, pid, C, D, BC, BD), _load_tile(g_w1_ptr, pid, D, HID, BD, BH),
        _load_tile(g_w2_ptr, pid, HID, D, BH, BD), _load_tile(g_s1_ptr, pid, D, HID, BD, BH),
        _load_tile(g_s2_ptr, pid, HID, D, BH, BD), pid, pid // share, pid % n_anchors, keys_ptr, queries_ptr,
        a1_ptr, a2_ptr, eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr,
        e_qk_ptr, g_reads_ptr,
        keys_grad, queries_grad, eta_grad, gamma_grad, d_grad, e_grad, gamma_prev_grad, e_kk_prev_grad, inverse_grad,
        d_qk_grad, e_qk_grad, C, D, HID, last, step_bound,
        BC, BD, BH, NORMALIZED, BOUND, ERASE, READS, ANCHOR, PRECISION)
    _store_start_grads(w1_grad, w2_grad, targets_grad, a1_grad, a2_grad, pid, g_w1, g_w2, g_v, g_a1, g_a2,
                       C, D, HID, BC, BD, BH, ANCHOR)


# ---- a whole sequence of chunks per program (the main memory's scan over a layer's chunks)

@triton.jit
def _targets(values, w1, w2, SELF_TARGET: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk's targets from its values [C, d]: V̂ = M(V) = V + silu(V W2^T) W1^T at the chunk-start weights
    (Hope's self-generated targets), or V (``SELF_TARGET=False``, the Titans baseline)."""
    if SELF_TARGET:
        zv = _dot(values, tl.trans(w2), PRECISION)  # [C, h]
        return values + _dot(zv * _sigmoid(zv), tl.trans(w1), PRECISION)
    else:
        return values


@triton.jit
def _targets_bwd(g_t, values, w1, w2, SELF_TARGET: tl.constexpr, PRECISION: tl.constexpr):
    """dLoss/dV from dLoss/dV̂ (first order: the weights in M(V) are constants, as ``self_target`` detaches them):
    g_V = g_V̂ + ((g_V̂ W1) * silu'(V W2^T)) W2."""
    if SELF_TARGET:
        zv = _dot(values, tl.trans(w2), PRECISION)
        sig = _sigmoid(zv)
        return g_t + _dot(_dot(g_t, w1, PRECISION) * sig * (1.0 + zv * (1.0 - sig)), w2, PRECISION)
    else:
        return g_t


@triton.jit
def _as_stored(x, PRECISION: tl.constexpr):
    """x rounded to the inputs' dtype and back to fp32: the state between two chunks, as the per-chunk kernels
    (and the backward, which reloads the stored chunk-start states) see it."""
    if PRECISION == "bf16":
        return _round_bf16(x)
    elif PRECISION == "fp16":
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _sequence_update_kernel(
    w1_ptr, w2_ptr, values_ptr, keys_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
    w1_out, w2_out, s1_out, s2_out, w1_starts_out, w2_starts_out, reads_out, overshoot_out, scale_out,
    n_chunks, n_full, C, D, HID, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, ANCHOR: tl.constexpr,
    SELF_TARGET: tl.constexpr, PRECISION: tl.constexpr,
):
    """A memory's ``n_chunks`` consecutive whole chunks in one program (one memory of the batch x heads), the
    weights kept on chip from chunk to chunk: per chunk n (inputs: entry pid * n_chunks + n, chunk-major per
    program), its start weights are stored (``*_starts_out``, for the backward), its targets computed
    (``_targets``), and ``_chunk_forward`` reads and updates. The weights and momentum after chunk ``n_full`` - 1
    are the outputs (a padded last chunk, n_full = n_chunks - 1, is read and not kept)."""
    pid = tl.program_id(0).to(tl.int64)
    w1 = _load_tile(w1_ptr, pid, D, HID, BD, BH)
    w2 = _load_tile(w2_ptr, pid, HID, D, BH, BD)
    for n in range(n_chunks):
        idx = pid * n_chunks + n
        _store_tile(w1_starts_out, idx, w1, D, HID, BD, BH)
        _store_tile(w2_starts_out, idx, w2, HID, D, BH, BD)
        targets = _targets(_load_tile(values_ptr, idx, C, D, BC, BD), w1, w2, SELF_TARGET, PRECISION)
        w1, w2, s1, s2 = _chunk_forward(
            w1, w2, targets, idx, idx, pid, keys_ptr, queries_ptr, a1_ptr, a2_ptr,
            eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
            reads_out, overshoot_out, scale_out, C, D, HID, C - 1, step_bound,
            BC, BD, BH, NORMALIZED, BOUND, ERASE, True, ANCHOR, PRECISION)
        w1 = _as_stored(w1, PRECISION)
        w2 = _as_stored(w2, PRECISION)
        if n == n_full - 1:
            _store_state(w1_out, w2_out, s1_out, s2_out, pid, w1, w2, s1, s2, D, HID, BD, BH)


@triton.jit
def _sequence_update_bwd_kernel(
    w1_starts_ptr, w2_starts_ptr, values_ptr, keys_ptr, queries_ptr, a1_ptr, a2_ptr,
    eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
    g_w1_ptr, g_w2_ptr, g_s1_ptr, g_s2_ptr, g_reads_ptr,
    w1_grad, w2_grad, values_grad, keys_grad, queries_grad, a1_grad, a2_grad, eta_grad, gamma_grad, d_grad, e_grad,
    gamma_prev_grad, e_kk_prev_grad, inverse_grad, d_qk_grad, e_qk_grad,
    n_chunks, n_full, C, D, HID, step_bound,
    BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    NORMALIZED: tl.constexpr, BOUND: tl.constexpr, ERASE: tl.constexpr, ANCHOR: tl.constexpr,
    SELF_TARGET: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward of ``_sequence_update_kernel``: the chunks in reverse, each from its stored start weights, carrying
    dLoss/dW (the gradient of chunk n's end weights is that of chunk n + 1's start weights, plus the outputs' at
    chunk n_full - 1) and summing the anchor's gradient over the chunks."""
    pid = tl.program_id(0).to(tl.int64)
    g_w1 = tl.full([BD, BH], 0.0, dtype=tl.float32)
    g_w2 = tl.full([BH, BD], 0.0, dtype=tl.float32)
    g_a1 = tl.full([BD, BH], 0.0, dtype=tl.float32)
    g_a2 = tl.full([BH, BD], 0.0, dtype=tl.float32)
    for i in range(n_chunks):
        n = n_chunks - 1 - i
        idx = pid * n_chunks + n
        g_s1 = tl.full([BD, BH], 0.0, dtype=tl.float32)
        g_s2 = tl.full([BH, BD], 0.0, dtype=tl.float32)
        if n == n_full - 1:  # the outputs are chunk n_full - 1's end state
            g_w1 += _load_tile(g_w1_ptr, pid, D, HID, BD, BH)
            g_w2 += _load_tile(g_w2_ptr, pid, HID, D, BH, BD)
            g_s1 = _load_tile(g_s1_ptr, pid, D, HID, BD, BH)
            g_s2 = _load_tile(g_s2_ptr, pid, HID, D, BH, BD)
        w1 = _load_tile(w1_starts_ptr, idx, D, HID, BD, BH)
        w2 = _load_tile(w2_starts_ptr, idx, HID, D, BH, BD)
        values = _load_tile(values_ptr, idx, C, D, BC, BD)
        g_w1, g_w2, g_t, g_a1_n, g_a2_n = _chunk_backward(
            w1, w2, _targets(values, w1, w2, SELF_TARGET, PRECISION), g_w1, g_w2, g_s1, g_s2, idx, idx, pid,
            keys_ptr, queries_ptr, a1_ptr, a2_ptr,
            eta_ptr, gamma_ptr, d_ptr, e_ptr, gamma_prev_ptr, e_kk_prev_ptr, inverse_ptr, d_qk_ptr, e_qk_ptr,
            g_reads_ptr, keys_grad, queries_grad, eta_grad, gamma_grad, d_grad, e_grad, gamma_prev_grad,
            e_kk_prev_grad, inverse_grad, d_qk_grad, e_qk_grad, C, D, HID, C - 1, step_bound,
            BC, BD, BH, NORMALIZED, BOUND, ERASE, True, ANCHOR, PRECISION)
        _store_tile(values_grad, idx, _targets_bwd(g_t, values, w1, w2, SELF_TARGET, PRECISION), C, D, BC, BD)
        g_a1 += g_a1_n
        g_a2 += g_a2_n
    _store_tile(w1_grad, pid, g_w1, D, HID, BD, BH)
    _store_tile(w2_grad, pid, g_w2, HID, D, BH, BD)
    if ANCHOR:
        _store_tile(a1_grad, pid, g_a1, D, HID, BD, BH)
        _store_tile(a2_grad, pid, g_a2, HID, D, BH, BD)


INTERPRETED = not isinstance(_chunk_update_kernel, triton.runtime.JITFunction)
_INTERPRET = tl.constexpr(INTERPRETED)  # for ``_dot`` (jit functions read module globals when they run or compile)


def block(n: int) -> int:
    """The padded tile size of a dimension n: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def num_warps(*blocks: int) -> int:
    """Warps per program: 4 for tiles up to 32, else 8 (more threads to hold 64 x 64 tiles in registers)."""
    return 4 if max(blocks) <= 32 else 8


def _tiles(c: int, d: int, hid: int) -> dict:
    """A kernel's padded tile sizes and warps per program for chunk size c, key width d and hidden width hid."""
    blocks = dict(BC=block(c), BD=block(d), BH=block(hid))
    return dict(blocks, num_warps=num_warps(*blocks.values()))


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, whichever is current (nothing to do on CPU, under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _grad_buffers(x: dict, grads, reads: torch.Tensor | None, dummy: torch.Tensor) -> tuple[tuple, list]:
    """For a backward kernel: the gradients of the forward's outputs w1, w2, s1, s2 and ``reads`` (an empty tensor
    of the reads' shape, None without reads) (contiguous; None: zero, or ``dummy`` where the output does not exist),
    and empty gradient buffers for the inputs ``x``, one entry per program (the leading size of w1; None for an
    absent input, and for d_mat and d_qk without erase: they enter nothing)."""
    n = x["w1"].shape[0]
    outputs = tuple(g.contiguous() if g is not None else torch.zeros_like(like) if like is not None else dummy
                    for g, like in zip(grads, (x["w1"], x["w2"], x["w1"], x["w2"], reads)))
    erase = x["erase_inverse"] is not None
    present = [t is not None and (name not in ("d_mat", "d_qk") or erase) for name, t in x.items()]
    return outputs, [t.new_empty(n, *t.shape[1:]) if ok else None for t, ok in zip(x.values(), present)]


def _summed(grads: list, names, share: int, n_anchors: int) -> tuple:
    """Per-program gradients of ``names`` (``KERNEL_INPUTS``) summed as the inputs were shared: the keys, queries
    and coefficients over their ``share`` consecutive programs, the anchors over the batch (entry pid % n_anchors)."""
    def summed(name, g):
        if g is None:
            return None
        if name in ("anchor1", "anchor2"):
            return g.view(-1, n_anchors, *g.shape[1:]).sum(0) if g.shape[0] > n_anchors else g
        if name not in ("w1", "w2", "targets") and share > 1:
            return g.view(-1, share, *g.shape[1:]).sum(1)
        return g
    return tuple(summed(name, g) for name, g in zip(names, grads))


def launch_chunk_update(w1, w2, keys, targets, queries, anchor1, anchor2, eta, gamma, d_mat, e_mat, gamma_prev,
                        e_kk_prev, inverse, d_qk, e_qk, *, last: int, step_bound: float, normalized_eta: bool):
    """Run the kernel on flat contiguous inputs (``KERNEL_INPUTS``: weights and targets [N, ...], one program each;
    keys, queries and coefficients [N / share, ...], shared by ``share`` consecutive programs; anchors [N_A, ...],
    program n's the entry n % N_A); returns new (w1, w2, s1, s2), reads [N, C, d] (None without queries), overshoot
    [N] and scale [N]. ``inverse`` None: no erase term; ``anchor1/2`` None: retention toward zero."""
    n, (c, d), hid = w1.shape[0], keys.shape[1:], w1.shape[-1]
    new_w1, new_w2 = torch.empty_like(w1), torch.empty_like(w2)
    new_s1, new_s2 = torch.empty_like(w1), torch.empty_like(w2)
    reads = queries.new_empty(n, c, d) if queries is not None else None
    overshoot = eta.new_empty(n)
    scale = eta.new_empty(n)
    erase = inverse is not None
    dummy = eta  # pointer arguments that a constexpr branch never reads
    with _on_device(keys):
        _chunk_update_kernel[(n,)](
            w1, w2, keys, targets, queries if queries is not None else dummy,
            anchor1 if anchor1 is not None else dummy, anchor2 if anchor2 is not None else dummy,
            eta, gamma, d_mat, e_mat, gamma_prev if erase else dummy, e_kk_prev if erase else dummy,
            inverse if erase else dummy, d_qk if queries is not None and erase else dummy,
            e_qk if queries is not None else dummy,
            new_w1, new_w2, new_s1, new_s2, reads if reads is not None else dummy, overshoot, scale,
            c, d, hid, last, float(step_bound), n // keys.shape[0], anchor1.shape[0] if anchor1 is not None else 1,
            **_tiles(c, d, hid),
            NORMALIZED=normalized_eta, BOUND=step_bound > 0, ERASE=erase, READS=queries is not None,
            ANCHOR=anchor1 is not None, PRECISION=PRECISION[w1.dtype],
        )
    return new_w1, new_w2, new_s1, new_s2, reads, overshoot, scale


# the forward kernel's tensor inputs, in its (and the backward's) argument order
KERNEL_INPUTS = ("w1", "w2", "keys", "targets", "queries", "anchor1", "anchor2", "eta", "gamma", "d_mat", "e_mat",
                 "gamma_prev", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")


def launch_chunk_update_bwd(inputs, grads, *, last: int, step_bound: float, normalized_eta: bool):
    """Run the backward kernel on the forward's flat contiguous inputs (``KERNEL_INPUTS``; None where absent, as
    in ``launch_chunk_update``, shared ones too) and the gradients of its outputs (w1, w2, s1, s2, reads; None:
    zero). Returns the gradients of the inputs, in that order and in their shapes: None for an absent input, and
    for d_mat and d_qk without erase (they enter nothing)."""
    x = dict(zip(KERNEL_INPUTS, inputs))
    w1, keys, anchor1 = x["w1"], x["keys"], x["anchor1"]
    n, (c, d), hid = w1.shape[0], keys.shape[1:], w1.shape[-1]
    share, n_anchors = n // keys.shape[0], anchor1.shape[0] if anchor1 is not None else 1
    dummy = x["eta"]  # pointer arguments that a constexpr branch never reads or writes
    reads = x["queries"].new_empty(n, c, d) if x["queries"] is not None else None
    output_grads, out = _grad_buffers(x, grads, reads, dummy)
    with _on_device(keys):
        _chunk_update_bwd_kernel[(n,)](
            *(t if t is not None else dummy for t in inputs), *output_grads,
            *(t if t is not None else dummy for t in out),
            c, d, hid, last, float(step_bound), share, n_anchors, **_tiles(c, d, hid),
            NORMALIZED=normalized_eta, BOUND=step_bound > 0, ERASE=x["erase_inverse"] is not None,
            READS=x["queries"] is not None, ANCHOR=anchor1 is not None, PRECISION=PRECISION[w1.dtype],
        )
    return _summed(out, KERNEL_INPUTS, share, n_anchors)


# the sequence kernel's tensor inputs, in its argument order (its backward takes the stored chunk-start weights,
# [N, n_chunks, ...], in place of w1 and w2)
SEQUENCE_INPUTS = ("w1", "w2", "values", "keys", "queries", "anchor1", "anchor2", "eta", "gamma", "d_mat", "e_mat",
                   "gamma_prev", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")


def _sequence_constexprs(x: dict, step_bound: float, normalized_eta: bool, self_target: bool) -> dict:
    """The sequence kernels' tile sizes, branches and warps for inputs ``x`` (``SEQUENCE_INPUTS``)."""
    return dict(_tiles(x["keys"].shape[-2], x["keys"].shape[-1], x["w1"].shape[-1]), NORMALIZED=normalized_eta,
                BOUND=step_bound > 0, ERASE=x["erase_inverse"] is not None, ANCHOR=x["anchor1"] is not None,
                SELF_TARGET=self_target, PRECISION=PRECISION[x["w1"].dtype])


def launch_sequence_update(inputs, *, n_full: int, step_bound: float, normalized_eta: bool, self_target: bool):
    """Run ``_sequence_update_kernel`` on flat contiguous inputs (``SEQUENCE_INPUTS``: w1, w2, anchors [N, ...];
    values, keys, queries and the coefficients [N, n_chunks, C, ...]; None where absent, as in
    ``launch_chunk_update``). Returns w1, w2, s1, s2 after chunk ``n_full`` - 1 (unset if n_full = 0), the
    chunk-start weights [N, n_chunks, ...] (for the backward), reads [N, n_chunks, C, d], overshoot and scale
    [N, n_chunks]."""
    x = dict(zip(SEQUENCE_INPUTS, inputs))
    w1, w2, keys = x["w1"], x["w2"], x["keys"]
    n, n_chunks, c, d = keys.shape
    outs = [torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w1), torch.empty_like(w2),
            w1.new_empty(n, n_chunks, *w1.shape[1:]), w2.new_empty(n, n_chunks, *w2.shape[1:]),
            torch.empty_like(x["queries"]), x["eta"].new_empty(n, n_chunks), x["eta"].new_empty(n, n_chunks)]
    dummy = x["eta"]  # pointer arguments that a constexpr branch never reads
    with _on_device(keys):
        _sequence_update_kernel[(n,)](
            *(t if t is not None else dummy for t in inputs), *outs, n_chunks, n_full, c, d, w1.shape[-1],
            float(step_bound), **_sequence_constexprs(x, step_bound, normalized_eta, self_target))
    return tuple(outs)


def launch_sequence_update_bwd(inputs, starts, grads, *, n_full: int, step_bound: float, normalized_eta: bool,
                               self_target: bool):
    """Run ``_sequence_update_bwd_kernel``: ``inputs`` as for ``launch_sequence_update``, ``starts`` the chunk-start
    weights it returned, ``grads`` those of its outputs (w1, w2, s1, s2, reads; None: zero). Returns the gradients
    of the inputs, in ``SEQUENCE_INPUTS`` order: None for an absent input, and for d_mat and d_qk without erase."""
    x = dict(zip(SEQUENCE_INPUTS, inputs))
    w1, keys = x["w1"], x["keys"]
    n, n_chunks, c, d = keys.shape
    dummy = x["eta"]
    output_grads, out = _grad_buffers(x, grads, x["queries"], dummy)
    with _on_device(keys):
        _sequence_update_bwd_kernel[(n,)](
            *starts, *(t if t is not None else dummy for t in inputs[2:]), *output_grads,
            *(t if t is not None else dummy for t in out), n_chunks, n_full, c, d, w1.shape[-1], float(step_bound),
            **_sequence_constexprs(x, step_bound, normalized_eta, self_target))
    return tuple(out)
