"""The Hugging Face wrapper of a hope-scale ``LanguageModel``: the last part of an exported ``modeling_hope.py``.

``modeling_source.py`` writes ``modeling_hope.py`` as the sources of ``hope_scale/model`` followed by this file,
with the imports between them removed, so the exported model computes exactly what ``hope_scale.model``
computes and needs only PyTorch and ``transformers``. In the package this module imports ``hope_scale.model``
(for tests and the exporter); in an exported folder those names are defined above it.

Recurrent generation: ``past_key_values`` is a ``HopeCache`` holding every layer's state (Hope / Titans: fast
weights, momenta, the pending tokens of the current chunk, the convolution tail and the position; attention
baselines: the KV cache). ``generate()`` feeds only the new token at each step, so Hope and Titans decode in O(1)
per token, exactly as ``LanguageModel.step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hope_scale.model.config import ModelConfig
from hope_scale.model.lm import LanguageModel

from .hf_config import HopeConfig

INT8_WEIGHT_ONLY = "int8_weight_only"


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights: y = (x q^T) * s, where row n of the float weight is s_n q_n.

    ``weight`` [out, in] int8 and ``scale`` [out] are buffers (stored in the safetensors file). The product runs in
    the activations' dtype on the weight converted to it, on any device. (PyTorch's CPU int8 kernel
    ``torch._weight_int8pack_mm`` is private, slow for fp32 activations, and crashed on weights loaded from a
    safetensors file in our tests, so it is not used.)
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)


def int8_linear_names(model: LanguageModel) -> list[str]:
    """The linear layers an int8 export quantizes: every ``nn.Linear`` but the output head (which is the embedding
    when tied, and stays in floating point like it); memories' initial states, norms and the embedding are not
    linear layers and keep their precision."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"]


def use_int8_linears(model: LanguageModel) -> None:
    """Replace the layers named by ``int8_linear_names`` with ``Int8Linear`` (weights to be loaded)."""
    for name in int8_linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features))


def map_state(state, fn):
    """``fn`` applied to every tensor of a (nested) recurrent state: lists, dicts and dataclasses are rebuilt."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, list):
        return [map_state(s, fn) for s in state]
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if hasattr(state, "__dataclass_fields__"):
        return type(state)(**{f: map_state(getattr(state, f), fn) for f in state.__dataclass_fields__})
    return state


class HopeCache:
    """``past_key_values`` of a Hope model: the per-layer recurrent state after ``seen_tokens`` tokens.

    Every tensor of the state has the batch on its first axis, which is what ``reorder_cache`` (beam search)
    selects along.
    """

    def __init__(self, layers: list, seen_tokens: int):
        self.layers, self.seen_tokens = layers, seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.layers = map_state(self.layers, lambda t: t.index_select(0, beam_idx.to(t.device)))


class HopeForCausalLM(PreTrainedModel, GenerationMixin):
    """A hope-scale ``LanguageModel`` (``self.model``, same parameter names under ``model.``) as a causal LM."""

    config_class = HopeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # generate() makes no DynamicCache: the model returns its own HopeCache
    _tied_weights_keys = ["model.head.weight"]
    _no_split_modules = ["Block"]

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.model = LanguageModel(ModelConfig.from_dict(config.hope_model))
        if config.hope_quantization == INT8_WEIGHT_ONLY:
            use_int8_linears(self.model)
        elif config.hope_quantization is not None:
            raise ValueError(f"hope_quantization {config.hope_quantization!r} is not known "
                             f"(known: None, {INT8_WEIGHT_ONLY!r})")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: ``LanguageModel`` initializes its own weights (and loading replaces them)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: HopeCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` [B, T], continuing ``past_key_values`` if given. ``labels`` (shifted inside,
        -100 ignored) give the mean next-token loss. Padding is not supported: a recurrent memory would read the
        pad tokens, so ``attention_mask`` must be all ones (give equal-length prompts, or one at a time)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HopeForCausalLM does not support padding (attention_mask with zeros): the recurrent "
                             "memory would read the pad tokens; pass equal-length prompts or one prompt at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state, seen = (None, 0) if past_key_values is None else (past_key_values.layers, past_key_values.seen_tokens)
        if state is None and use_cache:
            state = self.model.init_state(input_ids.shape[0])
        if state is None:
            logits = self.model(input_ids)
        else:
            logits, state = self.model(input_ids, state=state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        cache = HopeCache(state, seen + input_ids.shape[1]) if state is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: HopeCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """With a cache, only the tokens it has not seen (the newest one) are fed."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen_tokens:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}
