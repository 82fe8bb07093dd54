"""Pipeline stages for DeepSpeed's PipelineEngine (1F1B ``TrainSchedule``), built from a ModelPart.

The model is the layer sequence

    [embed (tied), block_0, ..., block_{N-1}, final norm, head (tied to embed, or its own column-parallel head)]

partitioned by counting blocks (``partition_method="type:BlockStage"``): stage s runs blocks
[s*N/p, (s+1)*N/p), the first stage also the embedding, the last the norm, head and loss. The tied embedding is
a DeepSpeed ``TiedLayerSpec``: the first and last stage each hold a copy, DeepSpeed all-reduces the two copies'
gradients between them every step and counts the weight once in the gradient norm (``ds_pipe_replicated``).

Only the local blocks are real modules; the other stages' blocks are unbuilt ``LayerSpec`` placeholders, so a
stage holds nothing but its own parameters.
"""

from __future__ import annotations

from torch import nn

from .layout import RankInfo
from .parallelize import ModelPart
from .recompute import checkpoint_function


class EmbedStage(nn.Module):
    """The (tensor-parallel) token embedding; called with ``as_head`` it is the tied output head."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


def _tied_head(stage: EmbedStage, hidden):
    return stage.embed(hidden, as_head=True)


class BlockStage(nn.Module):
    def __init__(self, block: nn.Module | None = None):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


class NormStage(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x)


class HeadStage(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x)


def build_pipeline_module(part: ModelPart, info: RankInfo, checkpoint_blocks: bool = False):
    """A DeepSpeed PipelineModule whose local layers are ``part``'s modules (same parameter objects).
    ``checkpoint_blocks``: DeepSpeed's pipeline activation checkpointing, one block per interval (``BlockStage``
    layers only), with PyTorch's non-reentrant checkpoint (``recompute.checkpoint_function``)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    cfg = part.cfg
    local = set(part.block_index_range())
    layers: list = [TiedLayerSpec("embed", EmbedStage, part.embed, tied_weight_attr="embed.weight")
                    if info.is_first_stage else TiedLayerSpec("embed", EmbedStage, None,
                                                              tied_weight_attr="embed.weight")]
    if not cfg.tie_embeddings:
        layers[0] = LayerSpec(EmbedStage, part.embed) if info.is_first_stage else LayerSpec(EmbedStage, None)
    for i in range(cfg.n_layers):
        layers.append(BlockStage(part.blocks[str(i)]) if i in local else LayerSpec(BlockStage))
    if info.is_last_stage:
        layers.append(NormStage(part.norm))
        if cfg.tie_embeddings:
            layers.append(TiedLayerSpec("embed", EmbedStage, part.embed, forward_fn=_tied_head,
                                        tied_weight_attr="embed.weight"))
        else:
            layers.append(HeadStage(part.head))
    else:
        layers.append(LayerSpec(NormStage, None))
        layers.append(TiedLayerSpec("embed", EmbedStage, None, forward_fn=_tied_head, tied_weight_attr="embed.weight")
                      if cfg.tie_embeddings else LayerSpec(HeadStage, None))
    topo = PipeModelDataParallelTopology(num_pp=info.pp_size, num_mp=info.tp_size, num_dp=info.dp_size)
    pipe = PipelineModule(layers=layers, topology=topo, loss_fn=part.loss_from_logits,
                          partition_method="type:BlockStage", activation_checkpoint_interval=int(checkpoint_blocks),
                          activation_checkpoint_func=checkpoint_function, checkpointable_layers=["BlockStage"])
    per = cfg.n_layers // info.pp_size
    expect = [0] + [1 + per * s for s in range(1, info.pp_size)] + [len(layers)]
    if list(pipe.parts) != expect:
        raise RuntimeError(f"pipeline partition {list(pipe.parts)} differs from the block split {expect}")
    if pipe._topo.get_coord(info.rank) != topo.get_coord(info.rank) or pipe.stage_id != info.pp_rank:
        raise RuntimeError("DeepSpeed's pipeline grid disagrees with Megatron's rank placement")
    return pipe
