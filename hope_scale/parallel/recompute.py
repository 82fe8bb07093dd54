"""Activation checkpointing (``train.activation_checkpointing``): keep less for backward, recompute the rest.

    none    autograd keeps every intermediate of the forward until backward (fastest, most memory)
    block   each block keeps only its input; the whole block is run again in backward
    memory  each block's sequence mixer keeps only its input and is run again in backward: the Titans memory layer
            (its chunk recurrence holds most of a Hope block's activations) or, in the attention baselines, the
            attention layer; the rest of the block (norms, CMS / MLP) keeps its activations

Recomputation is PyTorch's non-reentrant checkpoint (``use_reentrant=False``), applied as hooks on the modules
(``torch.distributed._composable.checkpoint``): parameter names do not change (checkpoints, shard specs and ZeRO
see the same model), the recomputed forward goes through the module's own ``__call__`` (so ZeRO-3 gathers its
parameters again), and it runs the same code under the same autograd mode, so the ``.detach()`` of the
first-order inner gradient is reproduced exactly: gradients equal those without checkpointing bit for bit
(``tests/test_model_recompute.py``). Under pipeline parallelism ``block`` is DeepSpeed's own pipeline
checkpointing (``pipeline.build_pipeline_module``: one block per checkpointed interval), with the same checkpoint
function.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

MODES = ("none", "block", "memory")

# what DeepSpeed's PipelineModule calls on each checkpointed interval of layers
checkpoint_function = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def checkpointed_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules ``mode`` recomputes: every block (``block``), every block's sequence mixer (``memory``)."""
    from hope_scale.model.lm import Block

    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing: {mode!r} is not one of {MODES}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return {"none": [], "block": blocks, "memory": [b.mixer for b in blocks]}[mode]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Make ``model``'s blocks (or their mixers) recompute their forward in backward; returns ``model``."""
    from torch.distributed._composable import checkpoint

    for module in checkpointed_modules(model, mode):
        checkpoint(module)
    return model
