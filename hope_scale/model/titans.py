"""Self-modifying Titans (paper §8) and the Titans LMM baseline, multi-head and chunk-parallel.

Per head, on the head's input x_t (a slice of a linear projection of the block input, after a causal
depthwise short convolution):

    k_t = normalize(M_k(x_t))   v_t = M_v(x_t)   q_t = normalize(M_q(x_t))         (chunk-start states)
    eta_t = eta_max * sigmoid(mean_c M_eta(x_t) + b_eta)   alpha_t = sigmoid(mean_c M_alpha(x_t) + b_alpha)
    v̂_□,t = M_□(v_t)                        self-generated target of memory □ ∈ {k, v, q, eta, alpha, mem}
    M_□ <- delta-GD step on 1/2||M_□(k_t) - v̂_□,t||^2 with retention alpha_t and momentum (memory.py)
    o_t = M_mem,t(q_t)                       the main memory, read after the updates of tokens <= t

Two chunk sizes: the projection memories (k, v, q, eta, alpha) use ``chunk_size_projection``, the main
memory ``chunk_size_memory``. Chunks are aligned to absolute positions, so a sequence can be processed in
pieces (or token by token, ``step``) with the same result. The output is normalized per head, gated by
silu(W_gate x) and projected back by W_out, which is the only place where heads mix.

With ``self_modifying=False`` this is the Titans (LMM) baseline: static per-head k/v/q/eta/alpha
projections, target v̂ = v, plain GD with momentum and retention (no erase term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import CausalShortConv
from .memory import MemoryState, chunk_coefficients, chunk_update, mlp_apply

# index of each projection memory in the stacked projection weights
K, V, ETA, ALPHA, Q = 0, 1, 2, 3, 4


@dataclass
class TitansState:
    """Per-sample recurrent state of one layer: position, conv inputs, projection and main memories."""

    pos: int
    conv: torch.Tensor  # [B, w-1, H*d]
    proj: MemoryState | None  # stacked projection memories, weights [B, H, P, d, h] (self-modifying only)
    mem: MemoryState  # main memory, weights [B, H, d, h] / [B, H, h, d]


def _chunk_spans(start: int, length: int, chunk: int):
    """Split positions [start, start+length) at multiples of ``chunk``; yields (a, b, starts_new_chunk)."""
    a = 0
    while a < length:
        b = min(length, a + chunk - (start + a) % chunk)
        yield a, b, (start + a) % chunk == 0
        a = b


class SelfModifyingTitans(nn.Module):
    def __init__(self, cfg: ModelConfig, self_modifying: bool = True):
        super().__init__()
        h_, d, dh = cfg.n_heads, cfg.d_head, cfg.d_mem_hidden
        self.cfg, self.self_modifying = cfg, self_modifying
        self.n_heads, self.d_head = h_, d
        self.erase = cfg.dgd_erase and self_modifying
        self.beta = cfg.inner_momentum
        self.adaptive_q = cfg.adaptive_q and self_modifying
        self.w_in = nn.Linear(cfg.d_model, h_ * d, bias=False)  # column-parallel
        self.w_gate = nn.Linear(cfg.d_model, h_ * d, bias=False)  # column-parallel
        self.w_out = nn.Linear(h_ * d, cfg.d_model, bias=False)  # row-parallel
        self.conv = CausalShortConv(h_ * d, cfg.conv_width)
        self.out_norm_weight = nn.Parameter(torch.ones(h_, d))
        # meta-learned initial states of the memories (the outer loop learns them)
        self.mem_w1 = nn.Parameter(torch.randn(h_, d, dh) * (0.5 / math.sqrt(dh)))
        self.mem_w2 = nn.Parameter(torch.randn(h_, dh, d) / math.sqrt(d))
        n_proj = 5 if self.adaptive_q else 4
        if self_modifying:
            self.proj_w1 = nn.Parameter(torch.randn(h_, n_proj, d, dh) * (0.5 / math.sqrt(dh)))
            self.proj_w2 = nn.Parameter(torch.randn(h_, n_proj, dh, d) / math.sqrt(d))
        else:  # Titans: static k, v, q projections and linear eta/alpha
            self.w_kvq = nn.Parameter(torch.randn(h_, 3, d, d) / math.sqrt(d))
            self.w_eta_alpha = nn.Parameter(torch.randn(h_, 2, d) * (0.1 / math.sqrt(d)))
        if self_modifying and not self.adaptive_q:
            self.w_q = nn.Parameter(torch.randn(h_, d, d) / math.sqrt(d))
        self.eta_bias = nn.Parameter(torch.full((h_,), math.log(cfg.eta_init / (cfg.eta_max - cfg.eta_init))))
        self.alpha_bias = nn.Parameter(torch.full((h_,), math.log(cfg.alpha_init / (1 - cfg.alpha_init))))

    # ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> TitansState:
        """Fresh per-sample state: memories at their meta-learned initial weights, zero momentum."""
        b = batch_size
        expand = lambda p: p.expand(b, *p.shape)  # noqa: E731  one fast copy per sample
        proj = MemoryState.fresh(expand(self.proj_w1), expand(self.proj_w2)) if self.self_modifying else None
        conv = self.w_in.weight.new_zeros(b, self.cfg.conv_width - 1, self.n_heads * self.d_head)
        return TitansState(0, conv, proj, MemoryState.fresh(expand(self.mem_w1), expand(self.mem_w2)))

    def head_inputs(self, x: torch.Tensor, conv_state: torch.Tensor):
        """x [B, T, d_model] -> per-head memory inputs [B, H, T, d] (projection + causal short conv)."""
        u, conv_state = self.conv(self.w_in(x), conv_state)
        b, t, _ = u.shape
        return u.view(b, t, self.n_heads, self.d_head).transpose(1, 2), conv_state

    def eta_alpha(self, eta_logit: torch.Tensor, alpha_logit: torch.Tensor):
        """Squash per-head scalar logits [B, H, T] into eta in (0, eta_max) and alpha in (0, 1)."""
        eta = self.cfg.eta_max * torch.sigmoid(eta_logit + self.eta_bias[:, None])
        alpha = torch.sigmoid(alpha_logit + self.alpha_bias[:, None])
        return eta, alpha

    def static_projections(self, xh: torch.Tensor):
        """Titans baseline: k, v, q, eta, alpha as static per-head maps of xh [B, H, T, d]."""
        kvq = torch.einsum("bhtd,hjed->bhjte", xh, self.w_kvq)
        ea = torch.einsum("bhtd,hjd->bhjt", xh, self.w_eta_alpha)
        eta, alpha = self.eta_alpha(ea[:, :, 0], ea[:, :, 1])
        return F.normalize(kvq[:, :, 0], dim=-1), kvq[:, :, 1], F.normalize(kvq[:, :, 2], dim=-1), eta, alpha

    def read_projections(self, w1: torch.Tensor, w2: torch.Tensor, xh: torch.Tensor):
        """k, v, q, eta, alpha of tokens xh [B, H, n, d] from projection-memory weights [B, H, P, ...]."""
        outs = mlp_apply(w1, w2, xh[:, :, None])  # [B, H, P, n, d]
        eta, alpha = self.eta_alpha(outs[:, :, ETA].mean(-1), outs[:, :, ALPHA].mean(-1))
        if self.adaptive_q:
            q = outs[:, :, Q]
        else:
            q = torch.einsum("bhtd,hed->bhte", xh, self.w_q)
        return F.normalize(outs[:, :, K], dim=-1), outs[:, :, V], F.normalize(q, dim=-1), eta, alpha

    def project_output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMS norm of o [B, H, T, d], gate silu(W_gate x), output projection W_out."""
        o = F.rms_norm(o, (self.d_head,), eps=self.cfg.norm_eps) * self.out_norm_weight[:, None]
        b, _, t, _ = o.shape
        return self.w_out(o.transpose(1, 2).reshape(b, t, -1) * F.silu(self.w_gate(x)))

    def memory_targets(self, mem: MemoryState, v: torch.Tensor) -> torch.Tensor:
        """Targets of the main memory: self-generated v̂ = M_mem(v) at the chunk start (Hope), or v (Titans)."""
        return mlp_apply(mem.w1_snap, mem.w2_snap, v) if self.self_modifying else v

    # ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: TitansState | None = None):
        """x: [B, T, d_model] -> (y [B, T, d_model], new state)."""
        if state is None:
            state = self.init_state(x.shape[0])
        xh, conv_state = self.head_inputs(x, state.conv)
        t_len, pos = xh.shape[2], state.pos

        # phase 1: keys, values, queries, eta, alpha from the projection memories (chunk C_proj)
        proj = state.proj
        if self.self_modifying:
            pieces = []
            for a, b, new_chunk in _chunk_spans(pos, t_len, self.cfg.chunk_size_projection):
                if new_chunk:
                    proj = proj.snapshot()
                k, v, q, eta, alpha = self.read_projections(proj.w1_snap, proj.w2_snap, xh[:, :, a:b])
                targets = mlp_apply(proj.w1_snap, proj.w2_snap, v[:, :, None])  # v̂_□ = M_□(v)
                coef = chunk_coefficients(k[:, :, None], eta[:, :, None], alpha[:, :, None], self.beta, self.erase)
                proj, _ = chunk_update(proj, k[:, :, None], targets, coef, self.beta)
                pieces.append((k, v, q, eta, alpha))
            k, v, q, eta, alpha = (torch.cat(p, dim=2) for p in zip(*pieces))
        else:
            k, v, q, eta, alpha = self.static_projections(xh)

        # phase 2: the main memory, read after every update of tokens <= t (chunk C_mem). Its keys, eta and
        # alpha are known for the whole sequence, so the state-independent coefficients of all whole chunks
        # are computed at once on a [B, H, N, C] layout (the last chunk padded with eta = 0, alpha = 1).
        mem, outs = state.mem, []
        c_mem = self.cfg.chunk_size_memory
        head = min(t_len, (c_mem - pos % c_mem) % c_mem)  # tokens that finish a chunk begun earlier
        if head:
            coef = chunk_coefficients(k[:, :, :head], eta[:, :, :head], alpha[:, :, :head], self.beta, self.erase,
                                      queries=q[:, :, :head])
            mem, o = chunk_update(mem, k[:, :, :head], self.memory_targets(mem, v[:, :, :head]), coef, self.beta,
                                  queries=q[:, :, :head])
            outs.append(o)
        rest = t_len - head
        n_chunks = -(-rest // c_mem)
        pad = n_chunks * c_mem - rest

        def chunked(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            t = F.pad(t[:, :, head:], (0, 0, 0, pad) if t.dim() == 4 else (0, pad), value=fill)
            return t.view(*t.shape[:2], n_chunks, c_mem, *t.shape[3:])

        if n_chunks:
            k_c, v_c, q_c = chunked(k), chunked(v), chunked(q)
            coefs = chunk_coefficients(k_c, chunked(eta), chunked(alpha, 1.0), self.beta, self.erase, queries=q_c)
        for n in range(n_chunks):
            mem = mem.snapshot()
            n_valid = c_mem if n < n_chunks - 1 else c_mem - pad
            mem, o = chunk_update(mem, k_c[:, :, n], self.memory_targets(mem, v_c[:, :, n]), coefs.select(n),
                                  self.beta, queries=q_c[:, :, n], n_valid=n_valid)
            outs.append(o)
        o = torch.cat(outs, dim=2)[:, :, :t_len]
        self.last_stats = {"eta": eta.detach().mean(), "alpha": alpha.detach().mean(),
                           "mem_w1_norm": mem.w1.detach().norm(dim=(-2, -1)).mean(),
                           "mem_w2_norm": mem.w2.detach().norm(dim=(-2, -1)).mean()}
        return self.project_output(o, x), TitansState(pos + t_len, conv_state, proj, mem)
