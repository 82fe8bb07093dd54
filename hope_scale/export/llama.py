"""A Transformer++ checkpoint as a plain ``LlamaForCausalLM`` folder (no remote code).

hope-scale's Transformer++ block is Llama's (pre-norm RMSNorm, causal attention with RoPE, SwiGLU MLP, no biases),
so only names change, and one permutation: hope-scale rotates interleaved pairs (q[2i], q[2i+1]) of each head,
Llama's ``rotate_half`` pairs (q[i], q[i + d/2]) at the same frequency theta^(-2i/d). Reordering the rows of each
head of W_q and W_k to (0, 2, 4, ..., 1, 3, 5, ...) turns one into the other; q.k products, and so the model, are
unchanged.
"""

from __future__ import annotations

import re

import torch

from hope_scale.model import ModelConfig
from hope_scale.model.layers import swiglu_hidden

# hope-scale parameter name (regex) -> Llama name
NAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"blocks\.(\d+)\.mixer_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.mixer\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.mlp\.w_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"head\.weight", "lm_head.weight"),
]
ROPE_PERMUTED = re.compile(r"blocks\.\d+\.mixer\.w[qk]\.weight")


def llama_name(name: str) -> str:
    for pattern, target in NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise KeyError(f"{name} has no Llama counterpart")


def llama_weight(name: str, weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The Llama tensor of hope-scale weight ``name``: W_q / W_k rows reordered per head for ``rotate_half``."""
    if not ROPE_PERMUTED.fullmatch(name):
        return weight
    d = cfg.d_head
    return weight.view(cfg.n_heads, d // 2, 2, -1).transpose(1, 2).reshape(cfg.n_heads * d, -1)


def llama_config(cfg: ModelConfig, eos_id: int, pad_id: int | None, dtype: torch.dtype, **extra):
    """The ``LlamaConfig`` of a Transformer++ config."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=swiglu_hidden(cfg.d_model, cfg.mlp_hidden_mult),
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, head_dim=cfg.d_head, hidden_act="silu",
                       max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                       attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
                       bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, dtype=dtype,
                       architectures=["LlamaForCausalLM"], **extra)
