"""Token-by-token oracle of the (self-modifying) Titans layer, written for clarity, not speed.

It implements the same semantics as ``titans.SelfModifyingTitans.forward`` one token at a time, with
explicit weight matrices and inner gradients taken by autograd (``torch.func.grad``, so the self-generated
targets are constants of the inner problem while everything stays differentiable for the outer loop):

    at a chunk boundary:  snapshot <- current weights
    S      <- beta S - eta_t grad_W 1/2||m_snapshot(k_t) - v̂_t||^2      m(x) = x + n(W1 silu(W2 x))
    W2     <- W2 (alpha_t I - eta_t k_t k_t^T) + S2        (W2 <- alpha_t W2 + S2 without the erase term)
    W1     <- alpha_t W1 + S1
    o_t    = m_current(q_t)                                  (main memory only, after its update)

Run it in float64 to test the chunk-parallel layer against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory import RMS_EPS, MemoryState
from .titans import ALPHA, ETA, K, Q, V, SelfModifyingTitans, TitansState


def _mlp(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m(x) = x + n(W1 silu(W2 x)) for one vector per batch element: w1 [..., d, h], w2 [..., h, d], x [..., d]."""
    hidden = F.silu(torch.einsum("...hd,...d->...h", w2, x))
    branch = torch.einsum("...dh,...h->...d", w1, hidden)
    return x + branch / torch.sqrt(branch.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def _inner_grads(w1: torch.Tensor, w2: torch.Tensor, key: torch.Tensor, target: torch.Tensor):
    """grad_{W1, W2} of 1/2||m(k) - v̂||^2 per batch element (v̂ held constant)."""
    def loss(a, b):
        return 0.5 * ((_mlp(a, b, key) - target) ** 2).sum()
    return torch.func.grad(loss, argnums=(0, 1))(w1, w2)


def _step_memory(cur: dict, snap: dict, key, target, eta, alpha, beta: float, erase: bool) -> dict:
    """One token's delta-GD update of one memory; eta/alpha have the batch shape of ``key[..., 0]``."""
    g1, g2 = _inner_grads(snap["w1"], snap["w2"], key, target)
    e, a = eta[..., None, None], alpha[..., None, None]
    s1 = beta * cur["s1"] - e * g1
    s2 = beta * cur["s2"] - e * g2
    if erase:
        eye = torch.eye(key.shape[-1], dtype=key.dtype, device=key.device)
        retention = a * eye - e * torch.einsum("...i,...j->...ij", key, key)
        w2 = cur["w2"] @ retention + s2
    else:
        w2 = a * cur["w2"] + s2
    return {"w1": a * cur["w1"] + s1, "w2": w2, "s1": s1, "s2": s2}


def _as_dict(st: MemoryState) -> tuple[dict, dict]:
    return ({"w1": st.w1, "w2": st.w2, "s1": st.s1, "s2": st.s2}, {"w1": st.w1_snap, "w2": st.w2_snap})


def reference_forward(layer: SelfModifyingTitans, x: torch.Tensor, state: TitansState | None = None):
    """Oracle of ``layer(x, state)``: same outputs and final state, computed token by token."""
    cfg = layer.cfg
    if state is None:
        state = layer.init_state(x.shape[0])
    xh, conv_state = layer.head_inputs(x, state.conv)  # [B, H, T, d]
    n_proj = layer.proj_w1.shape[1] if layer.self_modifying else 0
    proj_cur, proj_snap = ([], [])
    if layer.self_modifying:  # unstack the P projection memories
        cur, snap = _as_dict(state.proj)
        proj_cur = [{n: w[:, :, i] for n, w in cur.items()} for i in range(n_proj)]
        proj_snap = [{n: w[:, :, i] for n, w in snap.items()} for i in range(n_proj)]
    mem_cur, mem_snap = _as_dict(state.mem)

    outputs = []
    for t in range(xh.shape[2]):
        pos, xt = state.pos + t, xh[:, :, t]
        if layer.self_modifying:
            if pos % cfg.chunk_size_projection == 0:
                proj_snap = [{"w1": c["w1"], "w2": c["w2"]} for c in proj_cur]
            outs = [_mlp(s["w1"], s["w2"], xt) for s in proj_snap]
            k, v = F.normalize(outs[K], dim=-1), outs[V]
            q = outs[Q] if layer.adaptive_q else torch.einsum("bhd,hed->bhe", xt, layer.w_q)
            q = F.normalize(q, dim=-1)
            eta, alpha = layer.eta_alpha(outs[ETA].mean(-1)[..., None], outs[ALPHA].mean(-1)[..., None])
            eta, alpha = eta[..., 0], alpha[..., 0]
            proj_cur = [_step_memory(c, s, k, _mlp(s["w1"], s["w2"], v), eta, alpha, layer.beta, layer.erase)
                        for c, s in zip(proj_cur, proj_snap)]
        else:
            k, v, q, eta, alpha = (p[:, :, 0] if p.dim() == 3 else p[:, :, 0]
                                   for p in layer.static_projections(xt[:, :, None]))
        if pos % cfg.chunk_size_memory == 0:
            mem_snap = {"w1": mem_cur["w1"], "w2": mem_cur["w2"]}
        target = _mlp(mem_snap["w1"], mem_snap["w2"], v) if layer.self_modifying else v
        mem_cur = _step_memory(mem_cur, mem_snap, k, target, eta, alpha, layer.beta, layer.erase)
        outputs.append(_mlp(mem_cur["w1"], mem_cur["w2"], q))
    o = torch.stack(outputs, dim=2)

    proj_state = None
    if layer.self_modifying:
        stack = lambda ds, n: torch.stack([d[n] for d in ds], dim=2)  # noqa: E731
        proj_state = MemoryState(*(stack(proj_cur, n) for n in ("w1", "w2", "s1", "s2")),
                                 stack(proj_snap, "w1"), stack(proj_snap, "w2"))
    mem_state = MemoryState(mem_cur["w1"], mem_cur["w2"], mem_cur["s1"], mem_cur["s2"],
                            mem_snap["w1"], mem_snap["w2"])
    return layer.project_output(o, x), TitansState(state.pos + xh.shape[2], conv_state, proj_state, mem_state)
