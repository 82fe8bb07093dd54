"""``HopeConfig``: the Hugging Face configuration of an exported hope-scale model (``configuration_hope.py``).

This file is copied verbatim into every exported folder, so it imports nothing but ``transformers``. The model is
described by ``hope_model``, the hope-scale ``ModelConfig`` as a dict (one source of truth: the modeling file
rebuilds the same ``ModelConfig`` from it); the usual Hugging Face names (``vocab_size``, ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``) are derived from it for tools that read them.
"""

from transformers import PretrainedConfig


class HopeConfig(PretrainedConfig):
    """Configuration of ``HopeForCausalLM``: Hope, Hope-Attention, Titans or Transformer++ (``hope_model["arch"]``).

    ``hope_quantization`` is None (floating-point weights) or ``"int8_weight_only"`` (the linear layers hold int8
    weights with one scale per output row; see ``Int8Linear`` in ``modeling_hope.py``).
    """

    model_type = "hope"

    def __init__(self, hope_model: dict | None = None, hope_quantization: str | None = None, use_cache: bool = True,
                 **kwargs):
        self.hope_model = dict(hope_model or {})
        self.hope_quantization = hope_quantization
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", bool(self.hope_model.get("tie_embeddings", True)))
        super().__init__(**kwargs)
        self.vocab_size = self.hope_model.get("vocab_size")
        self.hidden_size = self.hope_model.get("d_model")
        self.num_hidden_layers = self.hope_model.get("n_layers")
        self.num_attention_heads = self.hope_model.get("n_heads")
