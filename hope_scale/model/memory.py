"""MLP memories updated in context by delta gradient descent with momentum: chunk-parallel, with a bounded step.

A memory is the paper's 2-layer residual MLP (Eq. 89), m(x) = x + W1 silu(W2 x), W1: [d, h], W2: [h, d]
(``branch_norm=True`` gives the earlier form x + n(W1 silu(W2 x)), n(y) = y / rms(y), kept for ablations).
Its inner loss on a key k and a target v̂ is L = 1/2 ||m(k) - v̂||^2. One token's update (delta gradient
descent with retention and momentum, paper Eqs. 86-88), with every gradient of a chunk taken at the
chunk-start weights W^g:

    S_t  = beta S_{t-1} - s eta_t g_t,          g_t = grad_W L_t(W^g)      (momentum; beta = 0 disables it)
    W2_t = W2_{t-1} (alpha_t I - eta_t k_t k_t^T) + (1 - alpha_t) A2 + S2_t  (erase along k: W2's input is k)
    W1_t = alpha_t W1_{t-1} + (1 - alpha_t) A1 + S1_t                         (plain retention)

Retention decays the weights toward an anchor A: the meta-learned initial weights (``anchor``; the default
``retain_toward: init``), so that it forgets what the context wrote and never what was meta-learned, or zero
(``anchor=None``, the paper's alpha_t W).

**Bounded step** (``step_bound`` = tau > 0; docs/hope-design.md §6). A chunk adds C gradients taken at the
same weights, amplified by momentum, so its step can overshoot the inner loss by orders of magnitude. With
kappa_t = ||J_t g_t||^2 / ||g_t||^2 the Gauss-Newton curvature of L_t along its own gradient (J_t = dm(k_t)/dW;
eta kappa = 1 is the exact minimizer along g_t, > 2 diverges), the chunk's overshoot after token t is

    lambda_t = sum_{i<=t} E_ti eta_i kappa_i,      s_t = min(1, tau / lambda_t)

and token t reads, and the chunk ends with, the chunk's recurrence with *all* its gradient terms so far scaled
by s_t. That is causal (s_t depends on tokens <= t only) and exactly the paper's update when lambda <= tau.

Chunk-parallel form. With gamma_t = prod_{j<=t} alpha_j, x_t = -eta_t W2_{t-1} k_t (the erase vector), and a
uniform gradient scale s, the chunk unrolls to (sum_{s<=t} D_ts (1 - alpha_s) = 1 - gamma_t)

    W_t = gamma_t W_0 + (1 - gamma_t) A + c_t S_0 + sum_{s<=t} D_ts x_s k_s^T - s sum_{i<=t} E_ti eta_i u_i r_i^T

with D_ts = gamma_t / gamma_s, E = D @ B (B_ji = beta^(j-i)), c = D @ (beta^1..beta^C), and u_i r_i^T the
rank-1 gradient of token i (u_i h_i^T for W1, delta_i k_i^T for W2). The erase vectors solve a unit
lower-triangular C x C system (the WY/UT form of DeltaNet), linear in s: x = x_state + s x_grad. Everything is
linear in s, so W_t = P_t + s_t Q_t is read for every t from C x C masked matrices and matmuls, without
materializing per-token weights.

All tensors carry arbitrary leading batch axes ``...`` (batch, heads, memory index); they never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MemoryState:
    """A (stack of) MLP memories at the start of its current chunk, and the tokens of that chunk seen so far.

    A chunk's gradients are taken at its start weights and its step bound depends on all its tokens so far,
    so the chunk is applied once it is complete; until then its tokens wait in fixed-size buffers of C rows
    (the first ``pos % C`` valid). Key buffers may have a singleton axis where keys are shared (the stacked
    projection memories).
    """

    w1: torch.Tensor  # [..., d, h]  weights at the start of the current chunk (where its gradients are taken)
    w2: torch.Tensor  # [..., h, d]
    s1: torch.Tensor  # momentum of w1
    s2: torch.Tensor  # momentum of w2
    keys: torch.Tensor  # [..., C, d]  pending tokens of the current chunk
    targets: torch.Tensor  # [..., C, d]
    eta: torch.Tensor  # [..., C]
    alpha: torch.Tensor  # [..., C]

    @classmethod
    def fresh(cls, w1: torch.Tensor, w2: torch.Tensor, chunk: int, key_axes: tuple[int, ...]) -> "MemoryState":
        """Start of a sequence: meta-learned initial weights, zero momentum, no pending tokens."""
        d = w1.shape[-2]
        new = lambda *s: w1.new_zeros(*s)  # noqa: E731
        return cls(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2), new(*key_axes, chunk, d),
                   new(*w1.shape[:-2], chunk, d), new(*key_axes, chunk), new(*key_axes, chunk))

    def pending(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first n buffered tokens: keys, targets, eta, alpha."""
        return self.keys[..., :n, :], self.targets[..., :n, :], self.eta[..., :n], self.alpha[..., :n]

    def with_pending(self, n: int, keys, targets, eta, alpha) -> tuple[torch.Tensor, ...]:
        """The current chunk so far: the first n buffered tokens followed by new ones (keys, targets, eta, alpha)."""
        if n == 0:  # a chunk that starts here (the usual case): nothing buffered, no copies
            return keys, targets, eta, alpha
        old = self.pending(n)
        return (torch.cat([old[0], keys], dim=-2), torch.cat([old[1], targets], dim=-2),
                torch.cat([old[2], eta], dim=-1), torch.cat([old[3], alpha], dim=-1))

    def committed(self, w1, w2, s1, s2) -> "MemoryState":
        """The state after a completed chunk: new start weights, empty buffers."""
        z = torch.zeros_like
        return MemoryState(w1, w2, s1, s2, z(self.keys), z(self.targets), z(self.eta), z(self.alpha))

    def advanced(self, w1, w2, s1, s2) -> "MemoryState":
        """``committed`` for a chunk none of whose tokens were buffered (it began in this forward): the buffers are
        still empty, so they are kept rather than reallocated (four fewer operations per chunk)."""
        return MemoryState(w1, w2, s1, s2, self.keys, self.targets, self.eta, self.alpha)

    def buffered(self, start: int, keys, targets, eta, alpha) -> "MemoryState":
        """The same chunk-start state with tokens written into buffer rows start.. (the chunk is not complete)."""
        def put(buf, new, matrix):
            end = start + new.shape[-2 if matrix else -1]
            new = new.expand(*buf.shape[:-2 if matrix else -1], *new.shape[-2 if matrix else -1:])
            if matrix:
                return torch.cat([buf[..., :start, :], new, buf[..., end:, :]], dim=-2)
            return torch.cat([buf[..., :start], new, buf[..., end:]], dim=-1)
        return MemoryState(self.w1, self.w2, self.s1, self.s2, put(self.keys, keys, True),
                           put(self.targets, targets, True), put(self.eta, eta, False), put(self.alpha, alpha, False))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "w2": self.w2, "s1": self.s1, "s2": self.s2, "keys": self.keys,
                "targets": self.targets, "eta": self.eta, "alpha": self.alpha}


RMS_EPS = 1e-6
KAPPA_MIN = 1e-2


def rms_normalize(y: torch.Tensor) -> torch.Tensor:
    """n(y) = y / sqrt(mean(y^2) + eps) over the last axis."""
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def mlp_apply(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, branch_norm: bool = False) -> torch.Tensor:
    """m(x) = x + W1 silu(W2 x) (or x + n(W1 silu(W2 x))) for x: [..., N, d]."""
    branch = F.silu(x @ w2.transpose(-1, -2)) @ w1.transpose(-1, -2)
    return x + (rms_normalize(branch) if branch_norm else branch)


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


@dataclass
class ChunkCoefficients:
    """Everything about a chunk that does not depend on the memory state (keys, eta, alpha, queries only).

    All fields carry the leading axes of eta; with an extra chunk axis they describe many chunks at once
    (``chunk_coefficients`` on [..., N, C] inputs), and ``unbind()`` splits them into chunks.
    """

    eta: torch.Tensor  # [..., C]
    gamma: torch.Tensor  # gamma_t = prod_{j<=t} alpha_j                     [..., C]
    c_vec: torch.Tensor | None  # c_t = sum_{j<=t} (gamma_t/gamma_j) beta^j  [..., C]  (None: zero, no momentum)
    d_mat: torch.Tensor  # D_ts = gamma_t / gamma_s for s <= t                 [..., C, C]
    e_mat: torch.Tensor  # E = D @ B, B_ji = beta^(j-i)                        [..., C, C]
    gamma_prev: torch.Tensor | None  # gamma_{s-1}, c_{s-1}, E_{s-1,i} k_i.k_s: what W2_{s-1} k_s needs
    c_prev: torch.Tensor | None
    e_kk_prev: torch.Tensor | None  # [..., C, C]
    erase_inverse: torch.Tensor | None  # (I + diag(eta) (D_{s-1,j} k_j.k_s))^-1  [..., C, C]
    d_qk: torch.Tensor | None  # D_ts q_t.k_s  (reads)                         [..., C, C]
    e_qk: torch.Tensor | None  # E_ti q_t.k_i

    def unbind(self) -> list["ChunkCoefficients"]:
        """Per-chunk coefficients from ones computed with a chunk axis just before the token axis.

        One ``unbind`` per field rather than indexing chunk n: the backward of an index allocates and fills a
        zero gradient of the whole [..., N, C, ...] tensor for every chunk (O(N^2) for N chunks); unbind's
        backward stacks the N chunk gradients once. The chunk axis is moved first and made contiguous before the
        unbind (``chunk_major``), so that each chunk's fields are contiguous: the Triton kernel needs contiguous
        inputs, and one copy per field and sequence replaces one per field and chunk."""
        n_chunks = self.eta.shape[-2]

        def split(name, t):
            if t is None:
                return [None] * n_chunks
            matrix = name in ("d_mat", "e_mat", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")
            return chunk_major(t, t.dim() - (3 if matrix else 2))
        fields = {k: split(k, v) for k, v in self.__dict__.items()}
        return [ChunkCoefficients(**{k: v[n] for k, v in fields.items()}) for n in range(n_chunks)]


def chunk_major(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
    """The slices of ``t`` along its chunk axis ``axis``, each contiguous (one copy of ``t``, then views)."""
    return t.movedim(axis, 0).contiguous().unbind(0)


def chunk_coefficients(keys: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, beta: float, erase: bool,
                       queries: torch.Tensor | None = None) -> ChunkCoefficients:
    """Coefficients of the unrolled recurrence of a chunk: keys [..., C, d], eta/alpha [..., C].

    D_ts = gamma_t / gamma_s (s <= t), B_ji = beta^(j-i), E = D @ B, c = D @ (beta^1..beta^C); computed in
    log space so that every coefficient is <= 1.
    """
    c_len = alpha.shape[-1]
    # alpha = 0 (sigmoid underflow when a memory learns to forget everything) would make log(gamma) -inf - -inf
    log_gamma = torch.cumsum(torch.log(alpha.clamp_min(torch.finfo(alpha.dtype).tiny)), dim=-1)
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


NEGLIGIBLE = 1e-20  # a squared gradient norm below this is a zero step (its ratio is defined as 0)


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is negligible; finite gradients everywhere (no 0 * inf in the backward)."""
    ok = den > NEGLIGIBLE
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def norm_jacobian(e: torch.Tensor, n: torch.Tensor, inv_rms: torch.Tensor) -> torch.Tensor:
    """J_n e for n(y) = y / rms(y) at n = n(y): (e - n (n . e) / d) / rms(y) (J_n is symmetric)."""
    return (e - n * (n * e).mean(-1, keepdim=True)) * inv_rms


def step_curvature(w1: torch.Tensor, keys: torch.Tensor, u: torch.Tensor, h: torch.Tensor, delta: torch.Tensor,
                   dsilu: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
    """kappa = ||J g||^2 / ||g||^2 per token: the Gauss-Newton curvature of 1/2||m(k) - v̂||^2 along its
    gradient g = (u h^T, delta k^T), where J g = ||h||^2 u + ||k||^2 W1 (silu'(z) * delta) (then through n's
    Jacobian for the normalized branch). Computed in at least fp32; 0 where g = 0."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    w1, keys, u, h, delta, dsilu = (t.to(dtype) for t in (w1, keys, u, h, delta, dsilu))
    hh, kk = h.pow(2).sum(-1, keepdim=True), keys.pow(2).sum(-1, keepdim=True)
    jg = hh * u + kk * ((dsilu * delta) @ w1.transpose(-1, -2))
    if norm is not None:
        jg = norm_jacobian(jg, *(t.to(dtype) for t in norm))
    gg = u.pow(2).sum(-1) * hh[..., 0] + delta.pow(2).sum(-1) * kk[..., 0]
    return safe_ratio(jg.pow(2).sum(-1), gg)


def chunk_overshoot(w1: torch.Tensor, keys: torch.Tensor, u: torch.Tensor, h: torch.Tensor, delta: torch.Tensor,
                    dsilu: torch.Tensor, rows: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
    """rho_t = sum_j c_tj ||J_j dW_t||^2 / ||dW_t||^2 for each row t of ``rows`` [..., R, C] (c_ti = E_ti eta_i).

    dW_t = sum_i c_ti g_i is the chunk's accumulated step after token t: the gradient of the chunk's weighted
    loss F_t = sum_j c_tj L_j. Along it, F_t's Gauss-Newton model has its minimum at 1/rho_t, so rho_t is how far
    the step overshoots (rho <= 1: not at all). One token: rho = eta kappa. Gram matrices keep it at
    O(R C^2 (d + h) + R C h d) without per-token weights; computed in at least fp32; 0 where dW = 0."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    w1, keys, u, h, delta, dsilu, rows = (t.to(dtype) for t in (w1, keys, u, h, delta, dsilu, rows))
    hh, kk = h @ h.transpose(-1, -2), keys @ keys.transpose(-1, -2)
    gram = (u @ u.transpose(-1, -2)) * hh + (delta @ delta.transpose(-1, -2)) * kk  # g_i . g_i'
    den = ((rows @ gram) * rows).sum(-1)  # ||dW_t||^2
    # every pair (row t, token j) is a row of one matmul: [..., R*C, C] @ [..., C, .] (no per-t copies of u, W1)
    pairs = lambda g: (rows[..., :, None, :] * g[..., None, :, :]).flatten(-3, -2)  # noqa: E731
    r_c = rows.shape[-2:]
    j_w1 = pairs(hh) @ u  # dW1_t h_j   [..., R*C, d]
    dw2_k = (pairs(kk) @ delta).unflatten(-2, r_c)  # dW2_t k_j   [..., R, C, h]
    jd = (j_w1 + (dsilu[..., None, :, :] * dw2_k).flatten(-3, -2) @ w1.transpose(-1, -2)).unflatten(-2, r_c)
    if norm is not None:  # jd = J_j dW_t  [..., R, C, d]
        jd = norm_jacobian(jd, *(t.to(dtype)[..., None, :, :] for t in norm))
    num = (rows * jd.pow(2).sum(-1)).sum(-1)
    return safe_ratio(num, den)


def retained(gamma: torch.Tensor, of_state: torch.Tensor, anchor, of_anchor) -> torch.Tensor:
    """gamma X(W_0) + (1 - gamma) X(A): what retention leaves of a linear function X of the chunk-start weights
    after decaying them toward the anchor A (gamma X(W_0) without an anchor); ``of_anchor(anchor)`` is X(A)."""
    if anchor is None:
        return gamma * of_state
    return gamma * of_state + (1 - gamma) * of_anchor(anchor)


@dataclass
class ChunkResult:
    """Weights and momentum after the chunk's last valid token, reads, and the step bound's statistics."""

    w1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    reads: torch.Tensor | None  # o_t = m_{W_t}(q_t)  [..., C, d]
    overshoot: torch.Tensor  # lambda after the last valid token (before the bound)  [...]
    scale: torch.Tensor  # s after the last valid token  [...]


@dataclass(frozen=True)
class UpdateRule:
    """How the inner step of a chunk is taken (docs/hope-design.md §6); the defaults are the stabilized rule."""

    step_bound: float = 1.0  # tau of s_t = min(1, tau / overshoot_t); 0 disables the bound
    overshoot: str = "rayleigh"  # "rayleigh": rho_t of the accumulated step; "aligned": sum_i E_ti eta_i kappa_i
    normalized_eta: bool = True  # eta_t is the fraction of token t's Gauss-Newton step taken: rate eta_t / kappa_t
    first_order: bool = True  # the inner step's dependence on the fast weights is a constant to the outer loop
    branch_norm: bool = False  # m(x) = x + n(W1 silu(W2 x)) instead of the paper's x + W1 silu(W2 x)


def chunk_update(state: MemoryState, keys: torch.Tensor, targets: torch.Tensor, coef: ChunkCoefficients,
                 beta: float, rule: UpdateRule, queries: torch.Tensor | None = None,
                 n_valid: int | None = None, anchor: tuple[torch.Tensor, torch.Tensor] | None = None) -> ChunkResult:
    """Apply one whole chunk (all its tokens) from the chunk-start ``state`` and optionally read the memory.

    keys [..., C, d] (L2-normalized), targets [..., C, d], ``coef`` from ``chunk_coefficients`` (with
    ``queries`` if reads are wanted, and ``erase`` deciding the DGD erase term). Gradients are taken at
    ``state.w1/w2``, which is also where the recurrence starts (with momentum ``state.s1/s2``). Returns the
    weights after token ``n_valid`` (the rest is padding with eta = 0) and, if ``queries`` [..., C, d] is
    given, the reads o_t = m_{W_t}(q_t). ``anchor`` (A1, A2), broadcastable to the weights, is what retention
    decays toward (None: zero).
    """
    momentum = beta > 0  # beta = 0: c = 0, so the carried momentum S_0 enters no weight and no read
    w1g, w2g = state.w1, state.w2
    if rule.first_order:  # the outer gradient flows through the carried state and the inputs, not through the
        w1g, w2g = w1g.detach(), w2g.detach()  # inner gradient's dependence on the weights (first-order meta-learning)
    # gradients of 1/2||m(k_i) - v̂_i||^2 at the chunk-start weights, as rank-1 factors
    z = keys @ w2g.transpose(-1, -2)  # [..., C, h]
    h = F.silu(z)
    y = h @ w1g.transpose(-1, -2)
    norm = None
    if rule.branch_norm:
        inv_rms = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        norm = (y * inv_rms, inv_rms)
        u = norm_jacobian(keys + norm[0] - targets, *norm)  # u_i = J_n^T dL/dm      [..., C, d]; grad W1 = u h^T
    else:
        u = keys + y - targets  # u_i = dL/dm(k_i)
    dsilu = silu_grad(z)
    delta = (u @ w1g) * dsilu  # delta_i    [..., C, h]; grad W2 = delta k^T
    eta = coef.eta  # the erase rate; the gradient-step rate is eta, or eta / kappa when normalized
    kappa = None
    if rule.normalized_eta or (rule.step_bound > 0 and rule.overshoot == "aligned"):
        kappa = step_curvature(w1g, keys, u, h, delta, dsilu, norm).to(eta.dtype)
    rate = eta / kappa.clamp_min(KAPPA_MIN) if rule.normalized_eta else eta
    eta_u, eta_delta = rate[..., None] * u, rate[..., None] * delta

    # step bound: s_t = min(1, tau / overshoot_t); without reads only the chunk's last row is needed
    last = (n_valid or eta.shape[-1]) - 1
    lam = torch.zeros_like(eta)
    if rule.step_bound > 0 and rule.overshoot == "rayleigh":
        rows = coef.e_mat if queries is not None else coef.e_mat[..., last:last + 1, :]
        rows = rows * rate[..., None, :]  # c_ti = E_ti rate_i
        lam = chunk_overshoot(w1g, keys, u, h, delta, dsilu, rows, norm).to(eta.dtype)
        lam = lam.expand(*lam.shape[:-1], eta.shape[-1])  # without reads: the last row, for every token
    elif rule.step_bound > 0:
        lam = (coef.e_mat @ (rate * kappa)[..., None])[..., 0]
    scale = rule.step_bound / lam.clamp_min(rule.step_bound) if rule.step_bound > 0 else torch.ones_like(lam)

    x_state = x_grad = None
    if coef.erase_inverse is not None:  # x_s = -eta_s W2_{s-1} k_s, split into its state and gradient parts
        z_state = keys @ state.w2.transpose(-1, -2) if rule.first_order else z  # differentiable in the state
        known = retained(coef.gamma_prev[..., None], z_state, anchor, lambda a: keys @ a[1].transpose(-1, -2))
        if momentum:
            known = known + coef.c_prev[..., None] * (keys @ state.s2.transpose(-1, -2))
        x_state = coef.erase_inverse @ (-eta[..., None] * known)
        x_grad = coef.erase_inverse @ (eta[..., None] * (coef.e_kk_prev @ eta_delta))

    # state after the last valid token L: row L of the coefficients, momentum carried by beta^(L-i)
    sc = lambda v: v[..., None, None]  # noqa: E731  scalar per batch element -> broadcast over a matrix
    s_end = sc(scale[..., last])
    g_end = sc(coef.gamma[..., last])
    c_end = sc(coef.c_vec[..., last]) if momentum else None  # c = 0 without momentum (c_vec may be None then)
    e_end, d_end = coef.e_mat[..., last, :, None], coef.d_mat[..., last, :, None]

    def carried(w0, s0, j):  # what the chunk-start weights and momentum leave: gamma W_0 + (1 - gamma) A + c S_0
        kept = retained(g_end, w0, anchor, lambda a: a[j])
        return kept + c_end * s0 if momentum else kept

    w1 = carried(state.w1, state.s1, 0) - s_end * ((e_end * eta_u).transpose(-1, -2) @ h)
    w2 = carried(state.w2, state.s2, 1) - s_end * ((e_end * eta_delta).transpose(-1, -2) @ keys)
    if x_state is not None:
        w2 = w2 + (d_end * x_state).transpose(-1, -2) @ keys + s_end * ((d_end * x_grad).transpose(-1, -2) @ keys)
    beta_c = beta ** (last + 1)
    if momentum:
        idx = torch.arange(eta.shape[-1], device=eta.device, dtype=eta.dtype)
        beta_to_end = torch.pow(torch.as_tensor(beta, dtype=eta.dtype), (last - idx).clamp(min=0))[:, None]
        s1 = beta_c * state.s1 - s_end * ((beta_to_end * eta_u).transpose(-1, -2) @ h)
        s2 = beta_c * state.s2 - s_end * ((beta_to_end * eta_delta).transpose(-1, -2) @ keys)
    else:  # the momentum after the chunk is its last token's step (later rows are padding: rate 0)
        s1 = beta_c * state.s1 - s_end * (eta_u[..., last, :, None] * h[..., last, None, :])
        s2 = beta_c * state.s2 - s_end * (eta_delta[..., last, :, None] * keys[..., last, None, :])
    stats = dict(overshoot=lam[..., last].detach(), scale=scale[..., last].detach())
    if queries is None:
        return ChunkResult(w1, w2, s1, s2, None, **stats)

    # reads: W2_t q_t and W1_t silu(W2_t q_t) for every t, through the unrolled form, gradient parts scaled by s_t
    s_t = scale[..., None]
    gamma_t = coef.gamma[..., None]
    zq = retained(gamma_t, queries @ state.w2.transpose(-1, -2), anchor, lambda a: queries @ a[1].transpose(-1, -2))
    if momentum:
        zq = zq + coef.c_vec[..., None] * (queries @ state.s2.transpose(-1, -2))
    zq_grad = -(coef.e_qk @ eta_delta)
    if x_state is not None:
        zq = zq + coef.d_qk @ x_state
        zq_grad = zq_grad + coef.d_qk @ x_grad
    hq = F.silu(zq + s_t * zq_grad)
    hh = hq @ h.transpose(-1, -2)  # h_i . hq_t  [..., C, C]
    branch = retained(gamma_t, hq @ state.w1.transpose(-1, -2), anchor, lambda a: hq @ a[0].transpose(-1, -2))
    if momentum:
        branch = branch + coef.c_vec[..., None] * (hq @ state.s1.transpose(-1, -2))
    else:  # S_0's coefficient c is 0: keep it in the graph with its zero gradient (as in the token recurrence)
        branch = branch + 0.0 * (state.s1.sum((-2, -1)) + state.s2.sum((-2, -1)))[..., None, None]
    branch = branch - s_t * ((coef.e_mat * hh) @ eta_u)
    reads = queries + (rms_normalize(branch) if rule.branch_norm else branch)
    return ChunkResult(w1, w2, s1, s2, reads, **stats)


def chunk_step(state: MemoryState, keys: torch.Tensor, targets: torch.Tensor, eta: torch.Tensor | None,
               alpha: torch.Tensor | None, beta: float, erase: bool, rule: UpdateRule,
               queries: torch.Tensor | None = None, coef: ChunkCoefficients | None = None,
               n_valid: int | None = None, update=chunk_update, anchor=None,
               coefficients=chunk_coefficients) -> ChunkResult:
    """One chunk of a memory: its state-independent coefficients (unless given, e.g. computed for all chunks at
    once on a chunk axis) by ``coefficients`` and ``update`` (``chunk_coefficients`` and ``chunk_update``, or the
    Triton kernels' ``kernels.coefficients.kernel_chunk_coefficients`` and
    ``kernels.chunk_update.kernel_chunk_update`` with the same arguments and results). The unit ``model.compile``
    compiles (``accel.py``)."""
    if coef is None:
        coef = coefficients(keys, eta, alpha, beta, erase, queries=queries)
    return update(state, keys, targets, coef, beta, rule, queries=queries, n_valid=n_valid, anchor=anchor)
