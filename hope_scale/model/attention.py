"""Causal softmax attention with rotary position embeddings (Transformer++ and Hope-Attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for rotary embeddings at integer ``positions`` ([T]) -> [T, dim/2] each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: [B, H, T, D] by the angles in cos/sin: [T, D/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention, o = softmax(q k^T / sqrt(d)) v with RoPE on q and k.

    Heads are explicit: ``wq/wk/wv`` map d_model -> n_heads * d_head (column-parallel under TP) and
    ``wo`` maps back (row-parallel). The recurrent state is a KV cache.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, rope_theta: float):
        super().__init__()
        self.n_heads, self.d_head, self.rope_theta = n_heads, d_head, rope_theta
        self.wq = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.wk = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.wv = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.wo = nn.Linear(n_heads * d_head, d_model, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.d_head, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, -1, self.d_head).transpose(1, 2)  # noqa: E731  [B, H, T, D]
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        past = 0 if state is None else state["k"].shape[2]
        cos, sin = rope_cos_sin(torch.arange(past, past + t, device=x.device), self.d_head, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
            state = {"k": k, "v": v}
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries at positions past..past+t-1 attend to keys 0..past+t-1
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1)), state
