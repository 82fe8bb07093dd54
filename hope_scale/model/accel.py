"""``model.compile: true``: the same model, run through ``torch.compile`` (docs/training.md, section 7).

The eager path is the reference; ``tests/test_model_compile.py`` checks that the compiled model's outputs and
gradients equal it in float64, and that the chunk step compiles to one graph without a break.

What is compiled (``compile_model``):

* every memory layer's per-chunk step (``memory.chunk_step``: the chunk's state-independent coefficients unless
  precomputed, its update and its reads) is one ``torch.compile`` graph, shared by all layers (one compiled
  function, so 24 layers do not count against Dynamo's recompile limit), with its backward compiled by
  AOTAutograd;
* every block's norms and feed-forward part (CMS levels or SwiGLU), and the attention layer of the attention
  architectures, as compiled modules (``nn.Module.compile``: parameter names, state dicts and checkpoints do not
  change).

The loops over chunks stay Python, by design: each chunk's inner gradients are taken at the weights the previous
chunk left (a true recurrence, so the chunks cannot be batched), and tracing the loop would unroll 64 projection
and 256 main-memory chunks of a 4096-token layer into one graph that compiles for many minutes, and again for
every other sequence length. A compiled Hope layer is therefore: its input and output projections eager, and in
its chunk loops one compiled call per chunk. The other Python work per chunk (slicing, buffering of an unfinished
chunk, the projection memories' reads) stays eager.

``build_model`` compiles both. The training engine (``hope_scale.parallel.engine``, every ``hope-scale train``
run) compiles the chunk steps only: its blocks' linear layers are Megatron's parallel layers (with collectives
under TP), which are not compiled here.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from .memory import chunk_step


# torch.compile's backend; tests use "aot_eager" (the same graphs and backward, no C++ code generation), also in
# spawned training processes through the environment variable
BACKEND = os.environ.get("HOPE_SCALE_COMPILE_BACKEND", "inductor")


# Graphs Dynamo may build for the one shared chunk step: one per call site (projection memories; the main memory's
# continued and whole chunks), fresh or carried momentum, grad mode and architecture (erase term or not), each
# first with static and then with dynamic shapes. A process that trains Hope at several batch sizes and lengths,
# evaluates it and trains Titans built 24 in a measured run (tests/test_model_compile.py checks that new lengths add
# none); Dynamo's default limit of 8 per function would end it with FailOnRecompileLimitHit (``fullgraph`` makes
# the limit an error, not a fallback to eager).
CHUNK_STEP_RECOMPILE_LIMIT = 64


@functools.cache
def compiled_chunk_step(backend: str):
    """``memory.chunk_step`` compiled once per process and backend (every layer and every model shares it);
    ``fullgraph``: a graph break inside it is an error, not a silent fallback to eager. Raises Dynamo's
    (process-wide) recompile limit to ``CHUNK_STEP_RECOMPILE_LIMIT`` if it is lower."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, CHUNK_STEP_RECOMPILE_LIMIT)
    return torch.compile(chunk_step, fullgraph=True, backend=backend)


FEED_FORWARD = ("mixer_norm", "mlp_norm", "mlp", "cms")  # Block submodules compiled whole


def compile_model(model: nn.Module, blocks: bool = True, backend: str | None = None) -> nn.Module:
    """Compile ``model``'s memory chunk steps and (``blocks``) its blocks' norms, feed-forward parts and attention
    layers, in place; returns ``model``. Nothing is traced until the first forward."""
    backend = backend or BACKEND
    from .attention import CausalSelfAttention
    from .lm import Block
    from .titans import SelfModifyingTitans

    for module in model.modules():
        if isinstance(module, SelfModifyingTitans):
            module.chunk_step = compiled_chunk_step(backend)
        if blocks and isinstance(module, Block):
            for name in FEED_FORWARD:
                if hasattr(module, name):
                    getattr(module, name).compile(backend=backend)
            if isinstance(module.mixer, CausalSelfAttention):
                module.mixer.compile(backend=backend)
    return model
