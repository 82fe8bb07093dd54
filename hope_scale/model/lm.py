"""Language-model wrapper shared by Hope and the baselines.

    LM(x) = head(norm(block_N(... block_1(embed(x)))))        head tied to the embedding

Blocks (pre-norm residual):
    hope            x <- x + SelfModifyingTitans(norm(x));  x <- CMS(x)
    hope_attention  x <- x + Attention(norm(x));            x <- CMS(x)
    titans          x <- x + Titans-LMM(norm(x));           x <- x + SwiGLU(norm(x))
    transformer     x <- x + Attention(norm(x));            x <- x + SwiGLU(norm(x))     (Transformer++)

Every block carries a per-sample recurrent state (memory fast weights, or a KV cache), so the same model
runs in parallel over a sequence (training), in pieces (streaming evaluation) or token by token
(``step`` / ``generate``) with the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalSelfAttention
from .cms import ContinuumMemorySystem
from .config import MEMORY_ARCHITECTURES, ModelConfig
from .layers import RMSNorm, SwiGLU, swiglu_hidden
from .titans import SelfModifyingTitans


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.arch in MEMORY_ARCHITECTURES:
            self.mixer = SelfModifyingTitans(cfg, self_modifying=cfg.arch == "hope")
        else:
            self.mixer = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.rope_theta)
        if cfg.arch in ("hope", "hope_attention"):
            self.cms = ContinuumMemorySystem(cfg.d_model, cfg.cms_levels, cfg.cms_variant, cfg.norm_eps)
        else:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_hidden_mult))

    def init_state(self, batch_size: int, device=None, dtype=None):
        if isinstance(self.mixer, SelfModifyingTitans):
            return self.mixer.init_state(batch_size)
        return self.mixer.init_state(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, state=None):
        h, state = self.mixer(self.mixer_norm(x), state)
        x = x + h
        if hasattr(self, "cms"):
            return self.cms(x), state
        return x + self.mlp(self.mlp_norm(x)), state


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        # output projections of residual branches scaled by 1/sqrt(2 * n_layers) (GPT-2 / Megatron)
        for name, p in self.named_parameters():
            if name.endswith(("w_out.weight", "wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=std / (2 * self.cfg.n_layers) ** 0.5)

    def init_state(self, batch_size: int) -> list:
        p = self.embed.weight
        return [blk.init_state(batch_size, p.device, p.dtype) for blk in self.blocks]

    def forward(self, input_ids: torch.Tensor, state: list | None = None):
        """input_ids [B, T] -> logits [B, T, V]; with ``state`` (from ``init_state`` or a previous call)
        returns (logits, new_state) and continues the sequence from where the state left off."""
        x = self.embed(input_ids)
        new_state = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, None if state is None else state[i])
            new_state.append(s)
        logits = self.head(self.norm(x))
        return logits if state is None else (logits, new_state)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; labels equal to -100 are ignored."""
        logits = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One recurrent step: token_ids [B] -> logits [B, V]; memory use is O(1) in context for Hope/Titans."""
        logits, state = self(token_ids[:, None], state=state)
        return logits[:, -1], state

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
        """Sample continuations of prompt_ids [B, T]; greedy when temperature == 0. Returns [B, T + new]."""
        state = self.init_state(prompt_ids.shape[0])
        logits, state = self(prompt_ids, state=state)
        logits, out = logits[:, -1], [prompt_ids]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            logits, state = self.step(nxt, state)
        return torch.cat(out, dim=1)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Temperature / top-k / nucleus sampling of logits [B, V] -> token ids [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def build_model(cfg: ModelConfig | str) -> LanguageModel:
    """A model from a config or the name of one in ``configs/model`` (e.g. ``hope-tiny``); with ``compile: true``
    compiled as ``accel.compile_model`` says, and with ``kernel: triton`` its memory chunk updates through the Triton
    kernel (``kernels.apply_kernel``); left out of exported models, which run eager and naive."""
    model = LanguageModel(ModelConfig.named(cfg) if isinstance(cfg, str) else cfg)
    if model.cfg.compile:
        from hope_scale.model.accel import compile_model

        compile_model(model)
    if model.cfg.kernel != "naive":
        from hope_scale.model.kernels import apply_kernel

        apply_kernel(model, model.cfg.kernel)
    return model
