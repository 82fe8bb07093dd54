"""Turn a plain model (built from ModelConfig) into this rank's part of it: tensor and pipeline parallelism.

This is the one place that knows how each parameter is split; the model files keep reading like the paper.

Tensor parallelism (TP = t, rank r of t). Nothing in a block mixes heads except the output projection, so each
rank owns H/t whole heads, like Megatron-Core's Mamba-2 / GDN mixers:

    parameter                                     split                            Megatron-Core layer
    mixer.w_in / w_gate / wq / wk / wv            rows (output features, by head)  ColumnParallelLinear
    mixer.w_out / wo                              columns (input features)         RowParallelLinear
    mixer.conv.weight [H*d, 1, w]                 channels, head-major             (plain, sliced)
    mixer.{mem,proj}_w*, w_kvq, w_eta_alpha, w_q,
      eta_bias, alpha_bias, out_norm_weight       dim 0 = head axis                (plain, sliced)
    SwiGLU w_gate / w_up (MLP and CMS levels)     rows                             ColumnParallelLinear
    SwiGLU w_down                                 columns                          RowParallelLinear
    embed.weight (tied head)                      vocabulary rows                  VocabParallelEmbedding,
                                                                                   vocab_parallel_cross_entropy
    norms                                         replicated                        -

The in-context memories (fast weights, momentum, chunk snapshots) of a head are computed from that head's
slice only, so the chunk updates need no communication; the row-parallel output projection's all-reduce is
where heads meet. CMS levels are SwiGLU MLPs and split like a Transformer MLP.

Pipeline parallelism (PP = p): stage s holds blocks [s*N/p, (s+1)*N/p); the first stage also holds the
embedding, the last the final norm and the head (tied to the embedding: both end stages hold a copy,
kept equal by all-reducing its gradient, see engine.py).

Every rank builds the full model from the seed and keeps its slices, so initial weights do not depend on
the layout: a run at TP=2 x PP=2 starts from exactly the weights of the single-process run.

Each local parameter carries a :class:`ShardSpec` (global name, global shape, and the box it covers in the
global tensor), which is what layout-independent checkpoints are keyed by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hope_scale.model.attention import CausalSelfAttention
from hope_scale.model.config import ModelConfig
from hope_scale.model.layers import SwiGLU
from hope_scale.model.lm import LanguageModel
from hope_scale.model.titans import SelfModifyingTitans

from .layout import RankInfo

# head-local parameters of SelfModifyingTitans: head axis first
TITANS_HEAD_PARAMS = ("mem_w1", "mem_w2", "proj_w1", "proj_w2", "w_kvq", "w_eta_alpha", "w_q", "w_inputs",
                      "eta_bias", "alpha_bias", "out_norm_weight")


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a global (unsharded) parameter a local parameter holds.

    ``box`` is one (start, length) per dimension of the global tensor. ``tp_replicated``: identical on every
    tensor-parallel rank (norm gains); ``pp_duplicate``: a copy of a parameter owned by another pipeline stage
    (the tied head on the last stage).
    """

    name: str
    global_shape: tuple[int, ...]
    box: tuple[tuple[int, int], ...]
    tp_replicated: bool = False
    pp_duplicate: bool = False

    @property
    def is_full(self) -> bool:
        return all(a == 0 and n == s for (a, n), s in zip(self.box, self.global_shape))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + n) for a, n in self.box)

    def to_dict(self) -> dict:
        return {"name": self.name, "global_shape": list(self.global_shape), "box": [list(b) for b in self.box]}


def _box(shape, dim: int | None = None, start: int = 0, length: int | None = None):
    box = [(0, s) for s in shape]
    if dim is not None:
        box[dim] = (start, length)
    return tuple(box)


def _mp_config(dtype: torch.dtype, tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype, sequence_parallel=False,
                               gradient_accumulation_fusion=False)


def _no_init(weight):  # weights are copied from the full model
    return weight


def _megatron_layers():
    """Megatron-Core layer classes adapted to nn.Linear's call convention (they return (output, bias))."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    class ColumnLinear(ColumnParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class RowLinear(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class TiedVocabEmbedding(VocabParallelEmbedding):
        """Vocab-parallel embedding that is also the output head: ``forward(h, as_head=True)`` returns this rank's
        vocabulary slice of the logits (the head is a call of the same module, so ZeRO-3 gathers the weight)."""

        def forward(self, x, as_head: bool = False):
            if as_head:
                return F.linear(copy_to_tensor_model_parallel_region(x), self.weight)
            return super().forward(x)

    return ColumnLinear, RowLinear, TiedVocabEmbedding


class ModelPart(nn.Module):
    """This rank's part of a LanguageModel. Parameter names equal the global ones (``blocks`` is keyed by global
    block index), and ``specs[name]`` says which slice of the global parameter each holds."""

    def __init__(self, cfg: ModelConfig, info: RankInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.embed: nn.Module | None = None
        self.blocks = nn.ModuleDict()
        self.norm: nn.Module | None = None
        self.head: nn.Module | None = None  # only when embeddings are untied
        self.specs: dict[str, ShardSpec] = {}
        self.loss_scale = 1.0  # the engine sets 0 for a step that must only materialize optimizer state

    # --- pieces (used directly by the pipeline stages) ------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks.values():
            x, _ = blk(x)
        return x

    def vocab_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + head: this rank's vocabulary slice of the logits [B, T, V/tp]."""
        h = self.norm(x)
        return self.embed(h, as_head=True) if self.head is None else self.head(h)

    def loss_from_logits(self, vocab_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_loss(vocab_logits, labels) * self.loss_scale

    # --- whole model (pipeline_parallel == 1) ---------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_from_logits(self.vocab_logits(self.run_blocks(self.embed_tokens(input_ids))), labels)

    def block_index_range(self) -> range:
        per = self.cfg.n_layers // self.info.pp_size
        return range(self.info.pp_rank * per, (self.info.pp_rank + 1) * per)


def vocab_parallel_loss(vocab_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from vocabulary-sliced logits; labels equal to -100 are ignored."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    mask = labels != -100
    logits = vocab_logits if vocab_logits.dtype == torch.float64 else vocab_logits.float()
    per_token = vocab_parallel_cross_entropy(logits, torch.where(mask, labels, 0))
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def parallelize(model: LanguageModel, info: RankInfo, dtype: torch.dtype = torch.float32) -> ModelPart:
    """This rank's part of ``model`` (consumed: its modules are reused). TP slices + PP stage selection."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    cfg = model.cfg
    tp, r = info.tp_size, info.tp_rank
    mpc = _mp_config(dtype, tp)
    ColumnLinear, RowLinear, TiedVocabEmbedding = _megatron_layers()
    part = ModelPart(cfg, info)
    specs: dict[str, ShardSpec] = {}

    def mark_sharded(p: nn.Parameter, dim: int) -> None:
        if tp > 1:  # DeepSpeed counts such parameters on every TP rank in the gradient norm
            set_tensor_model_parallel_attributes(p, True, dim, 1)

    def rows(full: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, int]:
        n = full.shape[dim] // tp
        return full.narrow(dim, r * n, n).detach().clone().to(dtype), r * n, n

    def column(lin: nn.Linear, name: str) -> nn.Module:
        w, a, n = rows(lin.weight, 0)
        m = ColumnLinear(lin.in_features, lin.out_features, config=mpc, init_method=_no_init, bias=False,
                         gather_output=False)
        m.weight.data.copy_(w)
        mark_sharded(m.weight, 0)
        specs[f"{name}.weight"] = ShardSpec(f"{name}.weight", tuple(lin.weight.shape), _box(lin.weight.shape, 0, a, n))
        return m

    def row(lin: nn.Linear, name: str) -> nn.Module:
        w, a, n = rows(lin.weight, 1)
        m = RowLinear(lin.in_features, lin.out_features, config=mpc, init_method=_no_init, bias=False,
                      input_is_parallel=True, skip_bias_add=False)
        m.weight.data.copy_(w)
        mark_sharded(m.weight, 1)
        specs[f"{name}.weight"] = ShardSpec(f"{name}.weight", tuple(lin.weight.shape), _box(lin.weight.shape, 1, a, n))
        return m

    def swiglu(mlp: SwiGLU, name: str) -> None:
        mlp.w_gate = column(mlp.w_gate, f"{name}.w_gate")
        mlp.w_up = column(mlp.w_up, f"{name}.w_up")
        mlp.w_down = row(mlp.w_down, f"{name}.w_down")

    def head_local(module: nn.Module, attr: str, name: str, dim: int, unit: int = 1) -> None:
        """Slice a plain parameter along ``dim`` by head (``unit`` elements per head along that dim)."""
        full = getattr(module, attr)
        n = full.shape[dim] // tp
        sliced = nn.Parameter(full.detach().narrow(dim, r * n, n).clone().to(dtype))
        mark_sharded(sliced, dim)
        setattr(module, attr, sliced)
        specs[f"{name}.{attr}"] = ShardSpec(f"{name}.{attr}", tuple(full.shape), _box(full.shape, dim, r * n, n))

    def replicated(p: nn.Parameter, name: str, pp_duplicate: bool = False) -> None:
        p.data = p.data.to(dtype)
        specs[name] = ShardSpec(name, tuple(p.shape), _box(p.shape), tp_replicated=True, pp_duplicate=pp_duplicate)

    # --- blocks of this stage ------------------------------------------------------------------------
    for i in part.block_index_range():
        blk, name = model.blocks[i], f"blocks.{i}"
        replicated(blk.mixer_norm.weight, f"{name}.mixer_norm.weight")
        mixer = blk.mixer
        if isinstance(mixer, SelfModifyingTitans):
            mixer.w_in = column(mixer.w_in, f"{name}.mixer.w_in")
            mixer.w_gate = column(mixer.w_gate, f"{name}.mixer.w_gate")
            mixer.w_out = row(mixer.w_out, f"{name}.mixer.w_out")
            head_local(mixer.conv, "weight", f"{name}.mixer.conv", 0)
            for attr in TITANS_HEAD_PARAMS:
                if hasattr(mixer, attr) and isinstance(getattr(mixer, attr), nn.Parameter):
                    head_local(mixer, attr, f"{name}.mixer", 0)
            mixer.n_heads = cfg.n_heads // tp  # local heads (used in the per-head views)
        elif isinstance(mixer, CausalSelfAttention):
            for lin in ("wq", "wk", "wv"):
                setattr(mixer, lin, column(getattr(mixer, lin), f"{name}.mixer.{lin}"))
            mixer.wo = row(mixer.wo, f"{name}.mixer.wo")
            mixer.n_heads = cfg.n_heads // tp
        else:
            raise TypeError(f"{name}.mixer: no tensor-parallel plan for {type(mixer).__name__}")
        if hasattr(blk, "cms"):
            for j, level in enumerate(blk.cms.levels):
                replicated(level.norm.weight, f"{name}.cms.levels.{j}.norm.weight")
                swiglu(level.mlp, f"{name}.cms.levels.{j}.mlp")
            if hasattr(blk.cms, "level_weights"):
                replicated(blk.cms.level_weights, f"{name}.cms.level_weights")
        else:
            replicated(blk.mlp_norm.weight, f"{name}.mlp_norm.weight")
            swiglu(blk.mlp, f"{name}.mlp")
        part.blocks[str(i)] = blk

    # --- embedding / head ----------------------------------------------------------------------------
    tied = cfg.tie_embeddings
    if info.is_first_stage or (info.is_last_stage and tied):
        emb = TiedVocabEmbedding(cfg.vocab_size, cfg.d_model, init_method=_no_init, config=mpc)
        w, a, n = rows(model.embed.weight, 0)
        emb.weight.data.copy_(w)
        mark_sharded(emb.weight, 0)
        part.embed = emb
        specs["embed.weight"] = ShardSpec("embed.weight", tuple(model.embed.weight.shape),
                                          _box(model.embed.weight.shape, 0, a, n),
                                          pp_duplicate=not info.is_first_stage)
    if info.is_last_stage:
        part.norm = model.norm
        replicated(part.norm.weight, "norm.weight")
        if not tied:
            part.head = column(model.head, "head")

    names = {n for n, _ in part.named_parameters()}
    if names != set(specs):
        raise RuntimeError(f"parallelize: parameters without a shard spec {sorted(names - set(specs))}, "
                           f"specs without a parameter {sorted(set(specs) - names)}")
    part.specs = specs
    return part


def shard_of(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The piece of a global tensor that ``spec`` covers."""
    return full[spec.slices()]
