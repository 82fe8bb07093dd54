"""Token-by-token oracle of the (self-modifying) Titans layer, written for clarity, not speed.

It implements the same semantics as ``titans.SelfModifyingTitans.forward`` one token at a time, with
explicit weight matrices, inner gradients from autograd (``torch.func.grad``: the self-generated targets are
constants of the inner problem, everything stays differentiable for the outer loop) and the curvature of the
step bound from a Jacobian-vector product (``torch.func.jvp``). During a chunk each memory is kept as two
recurrences, P (no gradient terms) and Q (gradient terms only), so that W = P + s Q for any uniform scale s:

    at a chunk start:  W^g <- committed weights (a constant under first_order);  P <- (committed W, S);  Q <- 0
    g_t = grad_W 1/2||m_{W^g}(k_t) - v̂_t||^2,   kappa_t = ||J_t g_t||^2 / ||g_t||^2   m(x) = x + W1 silu(W2 x)
    r_t = eta_t / max(kappa_t, KAPPA_MIN)  (normalized_eta; else r_t = eta_t)
    E_ti <- alpha_t E_(t-1)i + beta^(t-i)          c_ti = E_ti r_i     dW_t = sum_i c_ti g_i
    rho_t = sum_j c_tj ||J_j dW_t||^2 / ||dW_t||^2  (rayleigh; aligned: sum_i c_ti kappa_i)
    s_t = min(1, tau / rho_t)
    for X in (P, Q):  S_X <- beta S_X - r_t g_t [Q only];  W2_X <- W2_X (alpha_t I - eta_t k kᵀ) + S2_X;
                      W1_X <- alpha_t W1_X + S1_X
                      W_P <- W_P + (1 - alpha_t) A   (retain_toward init: A = the meta-learned initial weights)
    o_t = m_{P + s_t Q}(q_t)                               (main memory only)
    at a chunk end:    committed <- P + s_t Q
    in training, model.write_cost adds lambda * s / (eta_max * n_layers * B * H * T) to the gradient of every eta_t
                       (s: the loss scale of write_cost.loss_grad_scale)

The tokens of an unfinished chunk are returned in the state's buffers and replayed first by the next call.
Run it in float64 to test the chunk-parallel layer against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory import KAPPA_MIN, NEGLIGIBLE, RMS_EPS, MemoryState
from .titans import ALPHA, ETA, K, Q, V, SelfModifyingTitans, TitansState
from .write_cost import charge_writes, eta_gradient

WEIGHTS = ("w1", "w2", "s1", "s2")


def _mlp(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, branch_norm: bool) -> torch.Tensor:
    """m(x) for one vector per batch element: w1 [..., d, h], w2 [..., h, d], x [..., d] (x may have more
    leading axes than the weights: they broadcast)."""
    hidden = F.silu(torch.einsum("...hd,...d->...h", w2, x))
    branch = torch.einsum("...dh,...h->...d", w1, hidden)
    if branch_norm:
        branch = branch / torch.sqrt(branch.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return x + branch


def _grad_and_curvature(w1, w2, key, target, branch_norm: bool):
    """grad_{W1, W2} of 1/2||m(k) - v̂||^2 per batch element (v̂ constant) and kappa = ||J g||^2 / ||g||^2."""
    def loss(a, b):
        return 0.5 * ((_mlp(a, b, key, branch_norm) - target) ** 2).sum()
    g1, g2 = torch.func.grad(loss, argnums=(0, 1))(w1, w2)
    _, jg = torch.func.jvp(lambda a, b: _mlp(a, b, key, branch_norm), (w1, w2), (g1, g2))
    gg = g1.pow(2).sum((-2, -1)) + g2.pow(2).sum((-2, -1))
    kappa = torch.where(gg > NEGLIGIBLE, jg.pow(2).sum(-1) / torch.where(gg > NEGLIGIBLE, gg, 1.0), 0.0)
    return g1, g2, kappa


class _Chunk:
    """One memory during one chunk: W = P + s Q, with lambda, mu of the step bound and the tokens seen."""

    def __init__(self, start: dict, layer: SelfModifyingTitans, anchor: tuple | None):
        self.start, self.layer, self.anchor = start, layer, anchor
        self.p = dict(start)
        self.q = {n: torch.zeros_like(t) for n, t in start.items()}
        self.scale = torch.ones(())
        self.tokens: list[tuple] = []
        self.seen: list[dict] = []  # per token of the chunk: key, gradient, rate, curvature, E_ti, beta^(t-i)

    def step(self, key, target, eta, alpha) -> None:
        layer, beta, cfg = self.layer, self.layer.beta, self.layer.cfg
        self.tokens.append((key, target, eta, alpha))
        g1, g2, kappa = _grad_and_curvature(*self.step_weights(), key, target, cfg.mem_branch_norm)
        geta = eta / kappa.clamp_min(KAPPA_MIN) if cfg.normalized_eta else eta  # gradient-step rate
        self.seen.append({"key": key, "g": (g1, g2), "rate": geta, "kappa": kappa, "E": 0.0, "mom": 1.0})
        for tok in self.seen:  # E_ti = alpha_t E_(t-1)i + beta^(t-i)
            tok["E"] = alpha * tok["E"] + tok["mom"]
            tok["mom"] = beta * tok["mom"]
        tau = cfg.inner_step_bound
        if tau > 0:
            self.scale = tau / torch.maximum(self.overshoot(), torch.full_like(eta, tau))
        e, a, ge = eta[..., None, None], alpha[..., None, None], geta[..., None, None]
        for part, (h1, h2) in ((self.p, (0.0, 0.0)), (self.q, (g1, g2))):
            part["s1"] = beta * part["s1"] - ge * h1
            part["s2"] = beta * part["s2"] - ge * h2
            if layer.erase:
                eye = torch.eye(key.shape[-1], dtype=key.dtype, device=key.device)
                part["w2"] = part["w2"] @ (a * eye - e * torch.einsum("...i,...j->...ij", key, key)) + part["s2"]
            else:
                part["w2"] = a * part["w2"] + part["s2"]
            part["w1"] = a * part["w1"] + part["s1"]
        if self.anchor is not None:  # retention decays toward the anchor: a gradient-free term (P)
            self.p["w1"] = self.p["w1"] + (1 - a) * self.anchor[0]
            self.p["w2"] = self.p["w2"] + (1 - a) * self.anchor[1]

    def overshoot(self) -> torch.Tensor:
        """With c_i = E_ti rate_i: sum_i c_i kappa_i (aligned bound), or the Rayleigh quotient
        sum_j c_j ||J_j dW||^2 / ||dW||^2 of the accumulated step dW = sum_i c_i g_i."""
        c = [tok["E"] * tok["rate"] for tok in self.seen]
        if self.layer.cfg.inner_overshoot == "aligned":
            return sum(ci * tok["kappa"] for ci, tok in zip(c, self.seen))
        dw = [sum(ci[..., None, None] * tok["g"][n] for ci, tok in zip(c, self.seen)) for n in (0, 1)]
        keys = torch.stack([tok["key"] for tok in self.seen])  # [j, ..., d]: one jvp gives J_j dW for every j
        _, jd = torch.func.jvp(lambda a, b: _mlp(a, b, keys, self.layer.cfg.mem_branch_norm), self.step_weights(),
                               tuple(dw))
        num = (torch.stack(c) * jd.pow(2).sum(-1)).sum(0)
        den = dw[0].pow(2).sum((-2, -1)) + dw[1].pow(2).sum((-2, -1))
        return torch.where(den > NEGLIGIBLE, num / torch.where(den > NEGLIGIBLE, den, 1.0), 0.0)


    def current(self) -> dict:
        s = self.scale[..., None, None]
        return {n: self.p[n] + s * self.q[n] for n in WEIGHTS}

    def step_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the chunk's inner gradients (and targets) are taken: the chunk-start weights, constants of the
        outer gradient under ``first_order``."""
        w = (self.start["w1"], self.start["w2"])
        return tuple(t.detach() for t in w) if self.layer.cfg.first_order else w

    def target(self, v) -> torch.Tensor:
        """The self-generated target v̂ = m(v) at the chunk start."""
        return _mlp(*self.step_weights(), v, self.layer.cfg.mem_branch_norm)

    def apply(self, x) -> torch.Tensor:
        """m(x) at the chunk-start weights (the projection memories' reads)."""
        return _mlp(self.start["w1"], self.start["w2"], x, self.layer.cfg.mem_branch_norm)

    def read(self, query) -> torch.Tensor:
        w = self.current()
        return _mlp(w["w1"], w["w2"], query, self.layer.cfg.mem_branch_norm)

    def next_chunk(self) -> "_Chunk":
        return _Chunk(self.current(), self.layer, self.anchor)


def _unstack(st: MemoryState, i: int | None) -> tuple[dict, list]:
    """Chunk-start weights and the pending tokens' buffers of one memory (index i of a stack, or None)."""
    pick = (lambda t: t) if i is None else (lambda t: t[:, :, min(i, t.shape[2] - 1)])
    return {n: pick(getattr(st, n)) for n in WEIGHTS}, [pick(t) for t in (st.keys, st.targets, st.eta, st.alpha)]


def _state(chunks: list[_Chunk], chunk_len: int, stacked: bool) -> MemoryState:
    """The chunk-start weights and fixed-size buffers of the current chunk's tokens (stacked memories: axis 2)."""
    def buf(c: _Chunk, j: int):
        like = c.start["w1"]
        rows = [t[j] for t in c.tokens]
        shape = like.shape[:-2] + ((like.shape[-2],) if j < 2 else ())
        pad = [torch.zeros(shape, dtype=like.dtype, device=like.device)] * (chunk_len - len(rows))
        return torch.stack(rows + pad, dim=-2 if j < 2 else -1)

    def one(c: _Chunk):
        return [c.start[n] for n in WEIGHTS] + [buf(c, j) for j in range(4)]

    if not stacked:
        return MemoryState(*one(chunks[0]))
    parts = [one(c) for c in chunks]
    fields = [torch.stack([p[j] for p in parts], dim=2) for j in range(8)]
    fields[4], fields[6], fields[7] = fields[4][:, :, :1], fields[6][:, :, :1], fields[7][:, :, :1]  # shared
    return MemoryState(*fields)


def reference_forward(layer: SelfModifyingTitans, x: torch.Tensor, state: TitansState | None = None):
    """Oracle of ``layer(x, state)``: same outputs and final state, computed token by token."""
    cfg = layer.cfg
    c_proj, c_mem = cfg.chunk_size_projection, cfg.chunk_size_memory
    if state is None:
        state = layer.init_state(x.shape[0])
    xh, conv_state = layer.head_inputs(x, state.conv)  # [B, H, T, d]
    write_grad = eta_gradient(cfg, xh.shape[0], xh.shape[2]) if layer.training and cfg.write_cost else 0.0

    def resume(st: MemoryState, i: int | None, chunk_len: int) -> _Chunk:
        """A chunk begun by an earlier call: start from its weights and replay its buffered tokens."""
        start, buffers = _unstack(st, i)
        anchor = layer.retention_anchor(projection=i is not None)
        if anchor is not None and i is not None:  # projection memory i of the stack
            anchor = tuple(a[:, i] for a in anchor)
        chunk = _Chunk(start, layer, anchor)
        for j in range(state.pos % chunk_len):
            chunk.step(buffers[0][..., j, :], buffers[1][..., j, :], buffers[2][..., j], buffers[3][..., j])
        return chunk

    n_proj = layer.proj_w1.shape[1] if layer.self_modifying else 0
    proj = [resume(state.proj, i, c_proj) for i in range(n_proj)]
    mem = resume(state.mem, None, c_mem)

    outputs = []
    for t in range(xh.shape[2]):
        pos, xt = state.pos + t, xh[:, :, t]
        inputs = [xt if not cfg.per_memory_inputs else torch.einsum("bhd,hed->bhe", xt, layer.w_inputs[:, i])
                  for i in range(len(proj))]  # each projection memory's input
        if layer.self_modifying:
            if pos % c_proj == 0:
                proj = [c.next_chunk() for c in proj]
            outs = [c.apply(x_i) for c, x_i in zip(proj, inputs)]
            q = outs[Q] if layer.adaptive_q else torch.einsum("bhd,hed->bhe", xt, layer.w_q)
            k, v, q = layer.keys_values_queries(outs[K], outs[V], q)
            eta, alpha = layer.eta_alpha(outs[ETA].mean(-1)[..., None], outs[ALPHA].mean(-1)[..., None])
            eta, alpha = charge_writes(eta[..., 0], write_grad), alpha[..., 0]
            for c in proj:
                c.step(k, c.target(v), eta, alpha)
        else:
            k, v, q, eta, alpha = (p[:, :, 0] for p in layer.static_projections(xt[:, :, None]))
            eta = charge_writes(eta, write_grad)
        if pos % c_mem == 0:
            mem = mem.next_chunk()
        target = mem.target(v) if layer.self_modifying else v
        mem.step(k, target, eta, alpha)
        outputs.append(mem.read(q))
    o = torch.stack(outputs, dim=2)

    end = state.pos + xh.shape[2]

    def finish(chunks: list[_Chunk], chunk_len: int, stacked: bool) -> MemoryState:
        if end % chunk_len == 0:  # the last chunk is complete: commit it
            chunks = [c.next_chunk() for c in chunks]
        return _state(chunks, chunk_len, stacked)

    proj_state = finish(proj, c_proj, True) if layer.self_modifying else None
    return layer.project_output(o, x), TitansState(end, conv_state, proj_state, finish([mem], c_mem, False))
