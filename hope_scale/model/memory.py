"""MLP memories updated in context by (delta) gradient descent with momentum, chunk-parallel.

A memory is a 2-layer residual MLP with a normalized branch,  m(x) = x + n(W1 silu(W2 x)),  W1: [d, h],
W2: [h, d], n(y) = y / rms(y) (no gain). The normalization keeps self-generated targets v̂ = m(v) bounded;
without it the inner loop diverges (see docs/hope-design.md). Its inner loss on a key k and a target v̂ is
L = 1/2 ||m(k) - v̂||^2 (the factor 1/2 is folded into eta).
One token's update (delta gradient descent with retention and momentum, paper Eqs. 86-88):

    S_t  = beta S_{t-1} - eta_t grad_W L(W_grad; k_t, v̂_t)                 (momentum; beta = 0 disables it)
    W2_t = W2_{t-1} (alpha_t I - eta_t k_t k_t^T) + S2_t                     (erase along k: W2's input is k)
    W1_t = alpha_t W1_{t-1} + S1_t                                            (plain retention)

where W_grad is the state at the start of the current chunk. Because every gradient in a chunk is taken
at W_grad, the C updates of a chunk can be computed in parallel. Unrolling the recurrence with
gamma_t = prod_{j<=t} alpha_j and x_t = -eta_t W2_{t-1} k_t (the erase vector):

    W_t = gamma_t W_0 + c_t S_0 + sum_{s<=t} D_ts x_s k_s^T - sum_{i<=t} E_ti eta_i u_i r_i^T

with D_ts = gamma_t / gamma_s, E = D @ B (B_ji = beta^(j-i)), c = D @ (beta^1..beta^C), and u_i r_i^T the
rank-1 gradient of token i (u_i h_i^T for W1, delta_i k_i^T for W2; u_i is the loss gradient at W1 h_i). The erase vectors x solve a unit
lower-triangular C x C system (the WY/UT form of DeltaNet). Reads of token t use W_t, i.e. they see every
update of tokens <= t in the chunk (the TTT/Titans dual form) without materializing per-token weights.

All tensors carry arbitrary leading batch axes ``...`` (batch, heads, memory index); they never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MemoryState:
    """Fast weights of one (stack of) MLP memories: current weights, momentum, and the chunk-start snapshot."""

    w1: torch.Tensor  # [..., d, h]
    w2: torch.Tensor  # [..., h, d]
    s1: torch.Tensor  # momentum of w1
    s2: torch.Tensor  # momentum of w2
    w1_snap: torch.Tensor  # weights at the start of the current chunk (where gradients are taken)
    w2_snap: torch.Tensor

    @classmethod
    def fresh(cls, w1: torch.Tensor, w2: torch.Tensor) -> "MemoryState":
        """State at the start of a sequence: weights = meta-learned initial weights, zero momentum."""
        return cls(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2), w1, w2)

    def snapshot(self) -> "MemoryState":
        """Start a new chunk: gradients of the chunk are taken at the current weights."""
        return MemoryState(self.w1, self.w2, self.s1, self.s2, self.w1, self.w2)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "w2": self.w2, "s1": self.s1, "s2": self.s2,
                "w1_snap": self.w1_snap, "w2_snap": self.w2_snap}


RMS_EPS = 1e-6


def rms_normalize(y: torch.Tensor) -> torch.Tensor:
    """n(y) = y / sqrt(mean(y^2) + eps) over the last axis."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def mlp_apply(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m(x) = x + n(W1 silu(W2 x)) for x: [..., N, d]."""
    return x + rms_normalize(F.silu(x @ w2.transpose(-1, -2)) @ w1.transpose(-1, -2))


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


@dataclass
class ChunkCoefficients:
    """Everything about a chunk that does not depend on the memory state (keys, eta, alpha, queries only).

    All fields carry the leading axes of eta; with an extra chunk axis they describe many chunks at once
    (``chunk_coefficients`` on [..., N, C] inputs), and ``select(n)`` picks chunk n.
    """

    eta: torch.Tensor  # [..., C]
    gamma: torch.Tensor  # gamma_t = prod_{j<=t} alpha_j                     [..., C]
    c_vec: torch.Tensor  # c_t = sum_{j<=t} (gamma_t/gamma_j) beta^j           [..., C]
    d_mat: torch.Tensor  # D_ts = gamma_t / gamma_s for s <= t                 [..., C, C]
    e_mat: torch.Tensor  # E = D @ B, B_ji = beta^(j-i)                        [..., C, C]
    gamma_prev: torch.Tensor | None  # gamma_{s-1}, c_{s-1}, E_{s-1,i} k_i.k_s: what W2_{s-1} k_s needs
    c_prev: torch.Tensor | None
    e_kk_prev: torch.Tensor | None  # [..., C, C]
    erase_inverse: torch.Tensor | None  # (I + diag(eta) (D_{s-1,j} k_j.k_s))^-1  [..., C, C]
    d_qk: torch.Tensor | None  # D_ts q_t.k_s  (reads)                         [..., C, C]
    e_qk: torch.Tensor | None  # E_ti q_t.k_i

    def select(self, n: int) -> "ChunkCoefficients":
        """Chunk n of coefficients computed with a chunk axis just before the token axis."""
        def pick(name, t):
            if t is None:
                return t
            matrix = name in ("d_mat", "e_mat", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")
            return t[..., n, :, :] if matrix else t[..., n, :]
        return ChunkCoefficients(**{k: pick(k, v) for k, v in self.__dict__.items()})


def chunk_coefficients(keys: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, beta: float, erase: bool,
                       queries: torch.Tensor | None = None) -> ChunkCoefficients:
    """Coefficients of the unrolled recurrence of a chunk: keys [..., C, d], eta/alpha [..., C].

    D_ts = gamma_t / gamma_s (s <= t), B_ji = beta^(j-i), E = D @ B, c = D @ (beta^1..beta^C); computed in
    log space so that every coefficient is <= 1.
    """
    c_len = alpha.shape[-1]
    log_gamma = torch.cumsum(torch.log(alpha), dim=-1)
    causal = torch.ones(c_len, c_len, dtype=torch.bool, device=alpha.device).tril()
    diff = log_gamma[..., :, None] - log_gamma[..., None, :]
    d_mat = torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))
    idx = torch.arange(c_len, device=alpha.device, dtype=alpha.dtype)
    beta_t = torch.as_tensor(beta, dtype=alpha.dtype, device=alpha.device)
    b_mat = torch.where(causal, torch.pow(beta_t, (idx[:, None] - idx[None, :]).clamp(min=0)), 0.0)
    e_mat = d_mat @ b_mat
    c_vec = d_mat @ torch.pow(beta_t, idx + 1)
    gamma = log_gamma.exp()
    kk = keys @ keys.transpose(-1, -2)  # k_s . k_j
    gamma_prev = c_prev = e_kk_prev = inverse = None
    if erase:  # x_s = -eta_s W2_{s-1} k_s is a unit lower-triangular system in the x's
        gamma_prev = torch.cat([torch.ones_like(gamma[..., :1]), gamma[..., :-1]], dim=-1)
        c_prev = torch.cat([torch.zeros_like(c_vec[..., :1]), c_vec[..., :-1]], dim=-1)
        e_kk_prev = _shift_rows(e_mat) * kk
        system = torch.eye(c_len, dtype=kk.dtype, device=kk.device) + eta[..., None] * (_shift_rows(d_mat) * kk)
        eye = torch.eye(c_len, dtype=kk.dtype, device=kk.device).expand_as(system)
        # solved in at least fp32: there is no bf16/fp16 triangular solve, and the inverse amplifies rounding
        solve_dtype = torch.promote_types(system.dtype, torch.float32)
        inverse = torch.linalg.solve_triangular(system.to(solve_dtype), eye.to(solve_dtype), upper=False,
                                                unitriangular=True).to(system.dtype)
    d_qk = e_qk = None
    if queries is not None:
        qk = queries @ keys.transpose(-1, -2)  # q_t . k_s
        d_qk, e_qk = d_mat * qk, e_mat * qk
    return ChunkCoefficients(eta, gamma, c_vec, d_mat, e_mat, gamma_prev, c_prev, e_kk_prev, inverse, d_qk, e_qk)


def _shift_rows(m: torch.Tensor) -> torch.Tensor:
    """Row s of the result is row s-1 of m (row 0 is zero): coefficients 'just before token s'."""
    return torch.cat([torch.zeros_like(m[..., :1, :]), m[..., :-1, :]], dim=-2)


def chunk_update(state: MemoryState, keys: torch.Tensor, targets: torch.Tensor, coef: ChunkCoefficients,
                 beta: float, queries: torch.Tensor | None = None, n_valid: int | None = None):
    """Apply the updates of one chunk (all tokens of it) and optionally read the memory at each token.

    keys [..., C, d] (L2-normalized), targets [..., C, d], ``coef`` from ``chunk_coefficients`` (with
    ``queries`` if reads are wanted, and ``erase`` deciding the DGD erase term). Gradients are taken at
    ``state.w*_snap``; the recurrence starts from ``state.w*`` / ``state.s*``. Returns the new state and,
    if ``queries`` [..., C, d] is given, reads o_t = m_{W_t}(q_t) [..., C, d]. Only the first ``n_valid``
    tokens count (the rest is padding with eta = 0): the returned state is the one after token n_valid.
    """
    w1g, w2g = state.w1_snap, state.w2_snap
    # gradients of 1/2||m(k_i) - v̂_i||^2 at the chunk-start weights, as rank-1 factors
    z = keys @ w2g.transpose(-1, -2)  # [..., C, h]
    h = F.silu(z)
    y = h @ w1g.transpose(-1, -2)
    inv_rms = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    n = y * inv_rms
    err = keys + n - targets  # dL/dm(k)
    # back through n(y): J^T e = (e - n (n . e) / d) / rms(y)
    err = (err - n * (n * err).mean(-1, keepdim=True)) * inv_rms  # u_i        [..., C, d]; grad W1 = u h^T
    delta = (err @ w1g) * silu_grad(z)  # delta_i    [..., C, h]; grad W2 = delta k^T
    eta = coef.eta
    eta_err, eta_delta = eta[..., None] * err, eta[..., None] * delta

    erase_vecs = None
    if coef.erase_inverse is not None:  # x_s = -eta_s W2_{s-1} k_s
        z_start = z if state.w2 is w2g else keys @ state.w2.transpose(-1, -2)
        w2k_known = (coef.gamma_prev[..., None] * z_start
                     + coef.c_prev[..., None] * (keys @ state.s2.transpose(-1, -2))
                     - coef.e_kk_prev @ eta_delta)
        erase_vecs = coef.erase_inverse @ (-eta[..., None] * w2k_known)  # [..., C, h]

    # state after the last valid token L: row L of the coefficients, momentum carried by beta^(L-i)
    last = (n_valid or eta.shape[-1]) - 1
    sc = lambda v: v[..., None, None]  # noqa: E731  scalar per batch element -> broadcast over a matrix
    g_end, c_end = sc(coef.gamma[..., last]), sc(coef.c_vec[..., last])
    e_end, d_end = coef.e_mat[..., last, :, None], coef.d_mat[..., last, :, None]
    w1 = g_end * state.w1 + c_end * state.s1 - (e_end * eta_err).transpose(-1, -2) @ h
    w2 = g_end * state.w2 + c_end * state.s2 - (e_end * eta_delta).transpose(-1, -2) @ keys
    if erase_vecs is not None:
        w2 = w2 + (d_end * erase_vecs).transpose(-1, -2) @ keys
    idx = torch.arange(eta.shape[-1], device=eta.device, dtype=eta.dtype)
    beta_to_end = torch.pow(torch.as_tensor(beta, dtype=eta.dtype), (last - idx).clamp(min=0))[:, None]
    beta_c = beta ** (last + 1)
    s1 = beta_c * state.s1 - (beta_to_end * eta_err).transpose(-1, -2) @ h
    s2 = beta_c * state.s2 - (beta_to_end * eta_delta).transpose(-1, -2) @ keys
    new_state = MemoryState(w1, w2, s1, s2, state.w1_snap, state.w2_snap)
    if queries is None:
        return new_state, None

    # reads: W2_t q_t and W1_t silu(W2_t q_t) for every t, through the unrolled form
    zq = (coef.gamma[..., None] * (queries @ state.w2.transpose(-1, -2))
          + coef.c_vec[..., None] * (queries @ state.s2.transpose(-1, -2))
          - coef.e_qk @ eta_delta)
    if erase_vecs is not None:
        zq = zq + coef.d_qk @ erase_vecs
    hq = F.silu(zq)
    hh = hq @ h.transpose(-1, -2)  # h_i . hq_t  [..., C, C]
    out = queries + rms_normalize(coef.gamma[..., None] * (hq @ state.w1.transpose(-1, -2))
                                  + coef.c_vec[..., None] * (hq @ state.s1.transpose(-1, -2))
                                  - (coef.e_mat * hh) @ eta_err)
    return new_state, out
