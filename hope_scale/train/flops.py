"""Training FLOPs per token of Hope and the baselines, peak FLOP/s per device, and MFU.

    MFU = flops_per_token * tokens_per_second / (peak_flops_per_device * devices)

Training FLOPs per token = 3 x forward FLOPs (backward = 2 x forward, the usual convention), where a
multiply-add counts 2 and element-wise work (norms, activations, softmax, gating, decays) is not counted,
like torchtitan (``6N + 12 L H d_head T``). Forward FLOPs per token have three parts:

1. Dense: ``2 N`` where N counts every weight that multiplies a token activation: all linear layers
   (mixer projections, CMS / SwiGLU MLPs, the LM head, which is the tied embedding), the depthwise short
   convolution and the Titans baseline's static projections. Not counted: the embedding lookup, norm
   gains, the scalar eta/alpha biases, and the meta-learned *initial memory states* (``mem_w*``,
   ``proj_w*``): those are not applied to tokens directly, their use is the memory part below.

2. Attention (``hope_attention``, ``transformer``): ``4 L H d_head T`` forward (QK^T and PV over the full
   T x T score matrix, causal masking not subtracted; torchtitan's convention, 12 L H d_head T in training).

3. Memory (``hope``, ``titans``): the chunk-parallel updates and reads of ``model/memory.py:chunk_update``,
   per head and per token, with d = head dim, h = memory hidden width, C = chunk size. One memory's
   update costs, per token,

       U(C) = 6dh                      rank-1 gradient factors: z = W2 k, y = W1 silu(z), delta = W1^T u
            + 8dh                      chunk-end W1, W2, S1, S2 (four [d x C] @ [C x h] products / C; without
                                       momentum, beta = 0, S1 and S2 are the last token's rank-1 step: 4dh)
            + [2dh + 2dh + 2Ch + 2Ch]  erase (DGD) only: S2 k (momentum only), chunk-end erase term, the known part of
                                       W2 k (E * kk) @ (eta delta), and inverse @ rhs of the C x C system

   plus work shared by every memory that sees the same keys and decays (the stacked projection memories
   share it):

       S(C) = 2Cd                      key Gram matrix k k^T (C x C)
            + 2C^2 + 2C                coefficient matrices E = D B and c = D beta^(1..C)  (2C^3 + 2C^2 per chunk)
            + [C^2]                    erase only: inverting the unit lower-triangular C x C system (C^3 per chunk)

   and reading the main memory at the query of each token, through the unrolled form, costs

       R(C) = 8dh                      q W2^T, q S2^T, hq W1^T, hq S1^T (4dh without momentum)
            + 4Cd + 4Ch                q k^T, h hq^T and the two (E * .) @ (eta .) corrections
            + [2Ch]                    erase only: (D * q k^T) @ erase vectors

   A full MLP application m(x) = x + n(W1 silu(W2 x)) costs M = 4dh. Per head and token:

       hope:   P (M + M + U(C_proj)) + S(C_proj)         P projection memories (k, v, eta, alpha[, q]):
                                                          read at x, self-generated target M(v), update
             + M + U(C_mem) + S(C_mem) + R(C_mem)        main memory: target M(v), update, read
       titans: U(C_mem) + S(C_mem) + R(C_mem)            no erase, target = v (no MLP), static projections

   times n_heads and n_layers. ``tests/test_train_flops.py`` checks this against PyTorch's FLOP counter
   on real forward and forward+backward passes (the counter misses only the triangular inverse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.model.config import MEMORY_ARCHITECTURES

# Dense peak FLOP/s per device (no sparsity), by precision. Vendor datasheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bf16": 989e12, "fp32": 494e12},  # fp32 = TF32 tensor cores
    "h100-pcie": {"bf16": 756e12, "fp32": 378e12},
    "h200": {"bf16": 989e12, "fp32": 494e12},
    "gh200": {"bf16": 989e12, "fp32": 494e12},
    "b200": {"bf16": 2250e12, "fp32": 1100e12},
    "a100": {"bf16": 312e12, "fp32": 156e12},
    "l40s": {"bf16": 362e12, "fp32": 183e12},
    "a10g": {"bf16": 125e12, "fp32": 62.5e12},
    "mi300x": {"bf16": 1307e12, "fp32": 654e12},
}
MEMORY_STATE_PARAMS = ("mem_w1", "mem_w2", "proj_w1", "proj_w2")


@dataclass(frozen=True)
class FlopsPerToken:
    """Training (forward + backward) FLOPs per token, by part."""

    dense: float
    attention: float
    memory: float

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.memory

    @property
    def forward(self) -> float:
        return self.total / 3


def dense_matmul_params(cfg: ModelConfig) -> int:
    """N of the ``6N`` term (see the module docstring), counted on a meta-device model of ``cfg``."""
    with torch.device("meta"):
        model = build_model(cfg)
    n = 0
    for name, p in model.named_parameters():  # a tied head weight is listed once, as embed.weight
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or leaf in MEMORY_STATE_PARAMS or leaf == "out_norm_weight" or name == "embed.weight":
            continue
        n += p.numel()
    return n + cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else n


def _update(cfg: ModelConfig, d: int, h: int, c: int, erase: bool, read: bool) -> float:
    """Per token: one memory's chunk update (memory.chunk_update), rank-1 factors to the end state."""
    momentum = cfg.inner_momentum > 0  # without it the end momenta are rank-1 (no matmul) and S_0 enters nowhere
    n = (14 if momentum else 10) * d * h  # z, y, delta and the end-state matmuls (w1, w2[, s1, s2])
    if cfg.normalized_eta or (cfg.inner_step_bound > 0 and cfg.inner_overshoot == "aligned"):
        n += 2 * d * h  # kappa's J g
    if cfg.inner_step_bound > 0 and cfg.inner_overshoot == "aligned":
        n += 2 * c
    elif cfg.inner_step_bound > 0:  # the Rayleigh overshoot of R rows (every token's when the memory is read)
        rows = c if read else 1
        n += 2 * c * d + 4 * c * h + 2 * rows * c + 2 * rows * c * (d + h) + 2 * rows * h * d  # (+ k.k: _shared)
    if erase:  # erase vectors (state and gradient parts: W2_0 k, S2_0 k, A2 k) and their end-state terms
        n += (2 if cfg.first_order else 0) * d * h + (2 if momentum else 0) * d * h + 4 * d * h + 6 * c * h
        # retention toward the initial weights A (memory.retained) adds A2 k; only the main memory is read
        n += 2 * d * h if cfg.retains_toward_init(projection=not read) else 0
    return n


def _shared(cfg: ModelConfig, d: int, c: int, erase: bool) -> float:
    """Per token: what a chunk computes once for all memories sharing its keys (k.k, E = D B, c = D beta)."""
    rayleigh_kk = 2 * c * d if cfg.inner_step_bound > 0 and cfg.inner_overshoot == "rayleigh" else 0
    return 2 * c * d + 2 * c * c + 2 * c + (c * c if erase else 0) + rayleigh_kk


def _read(d: int, h: int, c: int, erase: bool, momentum: bool, anchor: bool) -> float:
    """Per token: the main memory's reads W2_t q_t and W1_t silu(W2_t q_t) in the unrolled form."""
    return (8 if momentum else 4) * d * h + (4 * d * h if anchor else 0) + 4 * c * d + 4 * c * h + (4 * c * h if erase else 0)


def memory_forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of all memory updates and reads of a Hope / Titans model (0 otherwise)."""
    if cfg.arch not in MEMORY_ARCHITECTURES:
        return 0.0
    d, h, hp = cfg.d_head, cfg.d_mem_hidden, cfg.d_proj_hidden
    cm, cp = cfg.chunk_size_memory, cfg.chunk_size_projection
    mlp, mlp_proj, momentum = 4 * d * h, 4 * d * hp, cfg.inner_momentum > 0
    if cfg.arch == "hope":
        erase = cfg.dgd_erase
        n_proj = 5 if cfg.adaptive_q else 4
        per_head = (n_proj * (2 * mlp_proj + _update(cfg, d, hp, cp, erase, False)) + _shared(cfg, d, cp, erase)
                    + mlp + _update(cfg, d, h, cm, erase, True) + _shared(cfg, d, cm, erase) + _read(d, h, cm, erase, momentum, cfg.retains_toward_init(projection=False)))
    else:
        per_head = _update(cfg, d, h, cm, False, True) + _shared(cfg, d, cm, False) + _read(d, h, cm, False, momentum, cfg.retains_toward_init(projection=False))
    return float(per_head * cfg.n_heads * cfg.n_layers)


def attention_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    if cfg.arch not in ("hope_attention", "transformer"):
        return 0.0
    return float(4 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsPerToken:
    """Training FLOPs per token of ``cfg`` at sequence length ``seq_len``."""
    return FlopsPerToken(dense=6.0 * dense_matmul_params(cfg),
                         attention=3.0 * attention_forward_flops_per_token(cfg, seq_len),
                         memory=3.0 * memory_forward_flops_per_token(cfg))


# ----------------------------------------------------------------------------------------------
# peak FLOP/s and MFU


def detect_device() -> str:
    """A key of ``PEAK_FLOPS`` for the current CUDA device, or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key, needles in (("gh200", ("gh200",)), ("h200", ("h200",)), ("h100-pcie", ("h100 pcie",)),
                         ("h100-sxm", ("h100",)), ("b200", ("b200",)), ("a100", ("a100",)),
                         ("l40s", ("l40s",)), ("a10g", ("a10g",)), ("mi300x", ("mi300x",))):
        if any(n in name for n in needles):
            return key
    return "unknown"


def peak_flops(device: str = "auto", precision: str = "bf16", override: float | None = None) -> float | None:
    """Declared peak FLOP/s of one device: ``override`` (``logging.peak_flops``) if given, else the datasheet
    value of a known device (``PEAK_FLOPS``; ``auto`` detects it). None for a CPU or an unknown device: no peak
    is declared, so no MFU is reported (a measured CPU "peak" on a busy machine gave MFUs above 100%)."""
    if override is not None:
        return float(override)
    device = detect_device() if device == "auto" else device
    return PEAK_FLOPS[device][precision] if device in PEAK_FLOPS else None


def mfu(flops_per_tok: float, tokens_per_second: float, peak_per_device: float, devices: int) -> float:
    """Model FLOPs utilization in [0, 1]."""
    return flops_per_tok * tokens_per_second / (peak_per_device * devices)
