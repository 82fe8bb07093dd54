"""Self-modifying Titans (paper §8) and the Titans LMM baseline, multi-head and chunk-parallel.

Per head, on the head's input x_t (a slice of a linear projection of the block input, after a causal
depthwise short convolution):

    k_t = normalize(M_k(x_t))   v_t = normalize(M_v(x_t))   q_t = normalize(M_q(x_t))   (chunk-start states)
    eta_t = eta_max * sigmoid(mean_c M_eta(x_t) + b_eta)   alpha_t = sigmoid(mean_c M_alpha(x_t) + b_alpha)
    v̂_□,t = M_□(v_t)                        self-generated target of memory □ ∈ {k, v, q, eta, alpha, mem}
    M_□ <- delta-GD step on 1/2||M_□(k_t) - v̂_□,t||^2 with retention alpha_t, momentum and a bounded step
           (retention decays M_□ toward its meta-learned initial weights, ``retain_toward: init``, or zero)
    o_t = M_mem,t(q_t)                       the main memory, read after the updates of tokens <= t

(memory.py has the update and its step bound; ``normalize_values: false`` gives the unnormalized v.)
Two chunk sizes: the projection memories (k, v, q, eta, alpha) use ``chunk_size_projection``, the main
memory ``chunk_size_memory``. Chunks are aligned to absolute positions, so a sequence can be processed in
pieces (or token by token, ``step``) with the same result: a chunk is applied once complete, and the tokens
of an unfinished chunk wait in the state. The output is normalized per head, gated by silu(W_gate x) and
projected back by W_out, which is the only place where heads mix.

With ``self_modifying=False`` this is the Titans (LMM) baseline: static per-head k/v/q/eta/alpha
projections, target v̂ = v, plain GD with momentum and retention (no erase term), the same step bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import CausalShortConv
from .memory import (ChunkCoefficients, ChunkResult, MemoryState, UpdateRule, chunk_coefficients, chunk_major,
                     chunk_step, mlp_apply)
from .write_cost import charge_writes, eta_gradient

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
    """Split positions [start, start+length) at multiples of ``chunk``; yields (a, b) offsets."""
    a = 0
    while a < length:
        b = min(length, a + chunk - (start + a) % chunk)
        yield a, b
        a = b


def _projection_segments(start: int, length: int, chunk: int):
    """``_chunk_spans`` of positions [start, start+length) grouped for the projection memories: yields (a, b, whole),
    a continued first chunk and an unfinished last one alone (whole=False), the whole chunks between them (begun
    at a chunk boundary and complete) as one segment (whole=True)."""
    segments = []
    for a, b in _chunk_spans(start, length, chunk):
        whole = (start + a) % chunk == 0 and (start + b) % chunk == 0
        if whole and segments and segments[-1][2]:
            segments[-1] = (segments[-1][0], b, True)
        else:
            segments.append((a, b, whole))
    return segments


def scan_projection_chunks(layer: "SelfModifyingTitans", proj: MemoryState, inputs: torch.Tensor,
                           static_q: torch.Tensor | None, write_grad: float):
    """The projection memories over whole chunks that begin at a chunk boundary (nothing buffered in ``proj``), one
    chunk at a time: each chunk's k, v, q, eta, alpha and targets v̂_□ = M_□(v) are read from the memories' weights
    at its start (``layer.projection_reads``), and every memory takes the chunk's update (``layer.chunk_step``).
    ``inputs`` [B, H, P|1, T, d] (``memory_inputs``), ``static_q`` [B, H, T, d] or None, T a multiple of the chunk;
    ``write_grad``: ``model.write_cost``'s gradient on eta. Returns k, v, q [B, H, T, d], eta, alpha [B, H, T], the
    state after the last chunk and the (overshoot, scale) of every chunk."""
    c = layer.cfg.chunk_size_projection
    # split, not sliced per chunk: a slice's backward would fill a whole-sequence zero gradient per chunk
    chunk_inputs = inputs.split(c, dim=3)
    chunk_q = [None] * len(chunk_inputs) if static_q is None else static_q.split(c, dim=2)
    pieces, bounds = [], []
    for x, q_static in zip(chunk_inputs, chunk_q):
        k, v, q, eta, alpha, targets = layer.projection_reads(layer, proj.w1, proj.w2, x, q_static)
        eta = charge_writes(eta, write_grad)
        r = layer._update(proj, k[:, :, None], targets, eta[:, :, None], alpha[:, :, None], projection=True)
        bounds.append((r.overshoot, r.scale))
        proj = proj.advanced(r.w1, r.w2, r.s1, r.s2)
        pieces.append((k, v, q, eta, alpha))
    k, v, q, eta, alpha = (torch.cat(p, dim=2) for p in zip(*pieces))
    return k, v, q, eta, alpha, proj, bounds


def scan_chunks(layer: "SelfModifyingTitans", mem: MemoryState, keys: torch.Tensor, values: torch.Tensor,
                queries: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, coef: ChunkCoefficients,
                n_valid: int) -> tuple[torch.Tensor, MemoryState, list]:
    """The main memory over whole chunks that begin at a chunk boundary, one ``layer.chunk_step`` each: keys,
    values, queries [B, H, N, C, d], eta, alpha [B, H, N, C] and ``coef`` with the chunk axis N; the last chunk has
    ``n_valid`` real tokens (the rest padding: eta = 0, alpha = 1). Every chunk reads (o_t = M_t(q_t)) after the
    updates of tokens <= t from its start weights, where its targets M(v) are also taken (``memory_targets``); a
    complete chunk is applied, a padded last one waits in the state. Returns the reads [B, H, N * C, d], the state
    after the last chunk, and the (overshoot, scale) of every applied chunk."""
    n_chunks, c_len = keys.shape[2], keys.shape[3]
    coefs = coef.unbind()
    # per-chunk slices by unbind, not indexing (an index's backward fills a whole-sequence zero gradient), each
    # contiguous (chunk_major: what the per-chunk Triton kernel takes without a copy per chunk)
    k_c, v_c, q_c, eta_c, alpha_c = (chunk_major(t, 2) for t in (keys, values, queries, eta, alpha))
    reads, bounds = [], []
    for n in range(n_chunks):
        targets = layer.memory_targets(mem, v_c[n])
        # no ``n_valid`` for a padded last chunk: only its reads are kept (its tokens are buffered, not applied),
        # and they do not depend on it; an int argument would compile a graph per value under ``model.compile``
        r = layer._update(mem, k_c[n], targets, None, None, queries=q_c[n], coef=coefs[n])
        reads.append(r.reads)
        if n < n_chunks - 1 or n_valid == c_len:  # began at a chunk boundary: nothing was buffered
            bounds.append((r.overshoot, r.scale))
            mem = mem.advanced(r.w1, r.w2, r.s1, r.s2)
        else:
            mem = mem.buffered(0, k_c[n][:, :, :n_valid], targets[:, :, :n_valid], eta_c[n][:, :, :n_valid],
                               alpha_c[n][:, :, :n_valid])
    return torch.cat(reads, dim=2), mem, bounds


def projection_reads(layer: "SelfModifyingTitans", w1: torch.Tensor, w2: torch.Tensor, inputs: torch.Tensor,
                     static_q: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """A projection chunk's k, v, q [B, H, n, d], eta, alpha [B, H, n] read from the projection memories' chunk-start
    weights [B, H, P, ...] (``read_projections``), and every projection memory's targets M_□(v) there
    [B, H, P, n, d] (``self_target``)."""
    k, v, q, eta, alpha = layer.read_projections(w1, w2, inputs, static_q)
    return k, v, q, eta, alpha, layer.self_target((w1, w2), v[:, :, None])


class SelfModifyingTitans(nn.Module):
    def __init__(self, cfg: ModelConfig, self_modifying: bool = True):
        super().__init__()
        h_, d, dh = cfg.n_heads, cfg.d_head, cfg.d_mem_hidden
        self.cfg, self.self_modifying = cfg, self_modifying
        self.n_heads, self.d_head = h_, d
        self.erase = cfg.dgd_erase and self_modifying
        self.beta = cfg.inner_momentum
        self.adaptive_q = cfg.adaptive_q and self_modifying
        self.rule = UpdateRule(cfg.inner_step_bound, cfg.inner_overshoot, cfg.normalized_eta, cfg.first_order,
                               cfg.mem_branch_norm)
        n_proj = 5 if self.adaptive_q else 4
        self.w_in = nn.Linear(cfg.d_model, h_ * d, bias=False)  # column-parallel
        self.w_gate = nn.Linear(cfg.d_model, h_ * d, bias=False)  # column-parallel
        self.w_out = nn.Linear(h_ * d, cfg.d_model, bias=False)  # row-parallel
        self.conv = CausalShortConv(h_ * d, cfg.conv_width)
        self.out_norm_weight = nn.Parameter(torch.ones(h_, d))
        # meta-learned initial states of the memories (the outer loop learns them)
        self.mem_w1 = nn.Parameter(torch.randn(h_, d, dh) * (0.5 / math.sqrt(dh)))
        self.mem_w2 = nn.Parameter(torch.randn(h_, dh, d) / math.sqrt(d))
        if self_modifying:
            ph = cfg.d_proj_hidden
            self.proj_w1 = nn.Parameter(torch.randn(h_, n_proj, d, ph) * (0.5 / math.sqrt(ph)))
            self.proj_w2 = nn.Parameter(torch.randn(h_, n_proj, ph, d) / math.sqrt(d))
        else:  # Titans: static k, v, q projections and linear eta/alpha
            self.w_kvq = nn.Parameter(torch.randn(h_, 3, d, d) / math.sqrt(d))
            self.w_eta_alpha = nn.Parameter(torch.randn(h_, 2, d) * (0.1 / math.sqrt(d)))
        if self_modifying and not self.adaptive_q:
            self.w_q = nn.Parameter(torch.randn(h_, d, d) / math.sqrt(d))
        if self_modifying and cfg.per_memory_inputs:  # the "q k v Linear" of the paper's figure, per head
            self.w_inputs = nn.Parameter(torch.randn(h_, n_proj, d, d) / math.sqrt(d))
        self.eta_bias = nn.Parameter(torch.full((h_,), math.log(cfg.eta_init / (cfg.eta_max - cfg.eta_init))))
        self.alpha_bias = nn.Parameter(torch.full((h_,), math.log(cfg.alpha_init / (1 - cfg.alpha_init))))

    # ---------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> TitansState:
        """Fresh per-sample state: memories at their meta-learned initial weights, zero momentum."""
        b, h_ = batch_size, self.n_heads
        expand = lambda p: p.expand(b, *p.shape)  # noqa: E731  one fast copy per sample
        proj = None
        if self.self_modifying:  # the stacked projection memories share their keys, eta and alpha
            proj = MemoryState.fresh(expand(self.proj_w1), expand(self.proj_w2), self.cfg.chunk_size_projection,
                                     (b, h_, 1))
        mem = MemoryState.fresh(expand(self.mem_w1), expand(self.mem_w2), self.cfg.chunk_size_memory, (b, h_))
        conv = self.mem_w1.new_zeros(b, self.cfg.conv_width - 1, self.conv.weight.shape[0])
        return TitansState(0, conv, proj, mem)

    def head_inputs(self, x: torch.Tensor, conv_state: torch.Tensor):
        """x [B, T, d_model] -> per-head memory inputs [B, H, T, d] (projection + causal short conv)."""
        u, conv_state = self.conv(self.w_in(x), conv_state)
        b, t, _ = u.shape
        return u.view(b, t, self.n_heads, self.d_head).transpose(1, 2), conv_state

    def memory_inputs(self, xh: torch.Tensor) -> torch.Tensor:
        """Inputs of the projection memories from xh [B, H, n, d]: [B, H, 1, n, d] shared, or [B, H, P, n, d]
        through each memory's own per-head linear map (``per_memory_inputs``)."""
        if not self.cfg.per_memory_inputs:
            return xh[:, :, None]
        return torch.einsum("bhtd,hped->bhpte", xh, self.w_inputs)

    memory_frozen = False  # set True to evaluate with the in-context memory switched off (eta = 0, alpha = 1)

    def eta_alpha(self, eta_logit: torch.Tensor, alpha_logit: torch.Tensor):
        """Squash per-head scalar logits [B, H, T] into eta in (0, eta_max) and alpha in (0, 1)."""
        eta = self.cfg.eta_max * torch.sigmoid(eta_logit + self.eta_bias[:, None])
        alpha = torch.sigmoid(alpha_logit + self.alpha_bias[:, None])
        if self.memory_frozen:  # no memory updates: every memory keeps its initial (meta-learned) weights
            return torch.zeros_like(eta), torch.ones_like(alpha)
        return eta, alpha

    def keys_values_queries(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor):
        """L2-normalize keys and queries, and values unless ``normalize_values`` is off."""
        v = F.normalize(v, dim=-1) if self.cfg.normalize_values else v
        return F.normalize(k, dim=-1), v, F.normalize(q, dim=-1)

    def static_projections(self, xh: torch.Tensor):
        """Titans baseline: k, v, q, eta, alpha as static per-head maps of xh [B, H, T, d]."""
        kvq = torch.einsum("bhtd,hjed->bhjte", xh, self.w_kvq)
        ea = torch.einsum("bhtd,hjd->bhjt", xh, self.w_eta_alpha)
        eta, alpha = self.eta_alpha(ea[:, :, 0], ea[:, :, 1])
        return *self.keys_values_queries(kvq[:, :, 0], kvq[:, :, 1], kvq[:, :, 2]), eta, alpha

    def read_projections(self, w1: torch.Tensor, w2: torch.Tensor, inputs: torch.Tensor,
                         static_q: torch.Tensor | None = None):
        """k, v, q, eta, alpha of n tokens from projection-memory weights [B, H, P, ...] and the memories' inputs
        [B, H, P|1, n, d] (``memory_inputs``); ``static_q`` [B, H, n, d] when q is not adaptive."""
        outs = mlp_apply(w1, w2, inputs, self.cfg.mem_branch_norm)  # [B, H, P, n, d]
        eta, alpha = self.eta_alpha(outs[:, :, ETA].mean(-1), outs[:, :, ALPHA].mean(-1))
        q = outs[:, :, Q] if self.adaptive_q else static_q
        return *self.keys_values_queries(outs[:, :, K], outs[:, :, V], q), eta, alpha

    def project_output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head RMS norm of o [B, H, T, d], gate silu(W_gate x), output projection W_out."""
        o = F.rms_norm(o, (self.d_head,), eps=self.cfg.norm_eps) * self.out_norm_weight[:, None]
        b, _, t, _ = o.shape
        return self.w_out(o.transpose(1, 2).reshape(b, t, -1) * F.silu(self.w_gate(x)))

    def memory_targets(self, mem: MemoryState, v: torch.Tensor) -> torch.Tensor:
        """Targets of the main memory: self-generated v̂ = M_mem(v) at the chunk start (Hope), or v (Titans)."""
        return self.self_target((mem.w1, mem.w2), v) if self.self_modifying else v

    def self_target(self, weights: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """v̂ = M(v) at the chunk-start weights (a constant of the outer loop's gradient in the first-order form)."""
        if self.cfg.first_order:
            weights = tuple(w.detach() for w in weights)
        return mlp_apply(*weights, v, self.cfg.mem_branch_norm)

    # the per-chunk step: ``memory.chunk_step``, or a compiled copy of it set on the layer by ``model.compile``
    # (hope_scale/model/accel.py), or the Triton kernel's by ``model.kernel`` (hope_scale/model/kernels; the same
    # computation)
    chunk_step = staticmethod(chunk_step)
    # the main memory's whole chunks of a forward: ``scan_chunks`` (one ``chunk_step`` each), or the Triton sequence
    # kernel's (``model.kernel: triton``: all of them in one launch; the same computation)
    scan_chunks = staticmethod(scan_chunks)
    # the coefficients of all the main memory's chunks at once: ``memory.chunk_coefficients``, or the Triton kernel's
    # (``model.kernel: triton``; the same coefficients)
    coefficients = staticmethod(chunk_coefficients)
    # a projection chunk's reads and targets: ``projection_reads``, or the Triton kernel's (``model.kernel: triton``)
    projection_reads = staticmethod(projection_reads)
    # the projection memories' whole chunks of a forward: ``scan_projection_chunks`` (one chunk at a time), or the
    # Triton scan kernel's (``model.kernel: triton``: all of them in one launch; the same computation)
    scan_projection_chunks = staticmethod(scan_projection_chunks)

    def retention_anchor(self, projection: bool):
        """What retention decays a memory toward: its meta-learned initial weights (``retain_toward: init``, or
        ``init_projections`` for the projection memories; [H, (P,) d, h] and [H, (P,) h, d], broadcast over the
        batch) or zero (None)."""
        if not self.cfg.retains_toward_init(projection):
            return None
        return (self.proj_w1, self.proj_w2) if projection else (self.mem_w1, self.mem_w2)

    def _update(self, mem: MemoryState, keys, targets, eta, alpha, queries=None, coef=None,
                projection: bool = False) -> ChunkResult:
        return self.chunk_step(mem, keys, targets, eta, alpha, self.beta, self.erase, self.rule, queries=queries,
                               coef=coef, anchor=self.retention_anchor(projection))

    # ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: TitansState | None = None):
        """x: [B, T, d_model] -> (y [B, T, d_model], new state)."""
        if state is None:
            state = self.init_state(x.shape[0])
        xh, conv_state = self.head_inputs(x, state.conv)
        t_len, pos = xh.shape[2], state.pos
        # model.write_cost: the gradient of the cost on this forward's writes, added where eta is made (write_cost.py)
        write_grad = eta_gradient(self.cfg, x.shape[0], t_len) if self.training and self.cfg.write_cost else 0.0
        bounds: dict[str, list] = {"proj": [], "mem": []}  # (overshoot, scale) of every completed chunk

        def note(prefix: str, r: ChunkResult) -> None:
            bounds[prefix].append((r.overshoot, r.scale))

        # phase 1: keys, values, queries, eta, alpha from the projection memories (chunk C_proj); a chunk's
        # k, v, q, eta, alpha and targets v̂_□ = M_□(v) all come from the projection memories at its start
        proj = state.proj
        if self.self_modifying:
            c_proj, pieces = self.cfg.chunk_size_projection, []
            inputs = self.memory_inputs(xh)  # state-independent: every token's inputs at once, split per segment
            static_q = None if self.adaptive_q else torch.einsum("bhtd,hed->bhte", xh, self.w_q)
            segments = _projection_segments(pos, t_len, c_proj)
            sizes = [b - a for a, b, _ in segments]
            inputs = inputs.split(sizes, dim=3)
            static_q = [None] * len(segments) if static_q is None else static_q.split(sizes, dim=2)
            for (a, b, whole), seg_inputs, seg_q in zip(segments, inputs, static_q):
                if whole:  # whole chunks: scanned (one chunk at a time, or in one launch of the Triton kernel)
                    *piece, proj, chunk_bounds = self.scan_projection_chunks(self, proj, seg_inputs, seg_q,
                                                                             write_grad)
                    bounds["proj"] += chunk_bounds
                    pieces.append(piece)
                    continue
                p = (pos + a) % c_proj  # a chunk begun in an earlier forward, or one that ends after this one
                k, v, q, eta, alpha, targets = self.projection_reads(self, proj.w1, proj.w2, seg_inputs, seg_q)
                eta = charge_writes(eta, write_grad)
                new = (k[:, :, None], targets, eta[:, :, None], alpha[:, :, None])
                if (pos + b) % c_proj:  # the chunk is not complete: its tokens wait in the state
                    proj = proj.buffered(p, *new)
                else:
                    r = self._update(proj, *proj.with_pending(p, *new), projection=True)
                    note("proj", r)
                    proj = proj.committed(r.w1, r.w2, r.s1, r.s2)
                pieces.append((k, v, q, eta, alpha))
            k, v, q, eta, alpha = (torch.cat(p, dim=2) for p in zip(*pieces))
        else:
            k, v, q, eta, alpha = self.static_projections(xh)
            eta = charge_writes(eta, write_grad)

        # phase 2: the main memory, read after every update of tokens <= t (chunk C_mem)
        mem, outs = state.mem, []
        c_mem = self.cfg.chunk_size_memory
        p = pos % c_mem
        head = min(t_len, (c_mem - p) % c_mem)  # tokens that continue a chunk begun earlier
        if head:
            new = (k[:, :, :head], self.memory_targets(mem, v[:, :, :head]), eta[:, :, :head], alpha[:, :, :head])
            keys, targets, etas, alphas = mem.with_pending(p, *new)
            queries = torch.cat([torch.zeros_like(keys[:, :, :p]), q[:, :, :head]], dim=2)
            r = self._update(mem, keys, targets, etas, alphas, queries=queries)
            outs.append(r.reads[:, :, p:])
            if p + head == c_mem:
                note("mem", r)
                mem = mem.committed(r.w1, r.w2, r.s1, r.s2)
            else:
                mem = mem.buffered(p, *new)

        # the remaining chunks: their keys, eta and alpha are known, so the state-independent coefficients of
        # all of them are computed at once on a [B, H, N, C] layout (the last chunk padded, eta = 0, alpha = 1)
        rest = t_len - head
        n_chunks = -(-rest // c_mem)
        pad = n_chunks * c_mem - rest

        def chunked(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            t = F.pad(t[:, :, head:], (0, 0, 0, pad) if t.dim() == 4 else (0, pad), value=fill)
            return t.view(*t.shape[:2], n_chunks, c_mem, *t.shape[3:])

        if n_chunks:
            k_c, v_c, q_c, eta_c, alpha_c = chunked(k), chunked(v), chunked(q), chunked(eta), chunked(alpha, 1.0)
            coef = self.coefficients(k_c, eta_c, alpha_c, self.beta, self.erase, queries=q_c)
            reads, mem, chunk_bounds = self.scan_chunks(self, mem, k_c, v_c, q_c, eta_c, alpha_c, coef, c_mem - pad)
            outs.append(reads)
            bounds["mem"] += chunk_bounds
        o = torch.cat(outs, dim=2)[:, :, :t_len]
        self.last_stats = {"eta": eta.detach().mean(), "alpha": alpha.detach().mean(),
                           "mem_w1_norm": mem.w1.detach().norm(dim=(-2, -1)).mean(),
                           "mem_w2_norm": mem.w2.detach().norm(dim=(-2, -1)).mean()}
        for prefix, chunks in bounds.items():
            if chunks:
                overshoot, scale = (torch.stack(t) for t in zip(*chunks))
                self.last_stats.update({f"{prefix}_overshoot": overshoot.mean(), f"{prefix}_step_scale": scale.mean(),
                                        f"{prefix}_bounded": (scale < 1).float().mean()})
        return self.project_output(o, x), TitansState(pos + t_len, conv_state, proj, mem)
