"""Write a hope-scale tokenizer as a Hugging Face tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) that ``AutoTokenizer.from_pretrained`` loads without remote code.

* The byte-level tokenizer (ids 0..255 = UTF-8 bytes, 256 = ``<|endoftext|>``, 257 = ``<|pad|>``) becomes a
  byte-level BPE with no merges whose vocabulary maps each byte's GPT-2 character to the byte's value, plus the two
  special tokens. ``split_special_tokens`` is set so that the text "<|endoftext|>" is encoded as its bytes, as
  hope-scale does: only the id 256 is end-of-text.
* A Hugging Face tokenizer (``tokenizer.json``, e.g. from ``hope-scale train-tokenizer``) is written as it is, with
  its end-of-text and padding tokens named.

Invariant: the exported tokenizer encodes text (``add_special_tokens=False``) to the same ids as
``hope_scale.data.tokenizer`` and decodes them (``skip_special_tokens=True``) to the same text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hope_scale.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

BYTE_SPECIALS = ("<|endoftext|>", "<|pad|>")  # ids 256 and 257, ByteTokenizer's EOS and PAD
INPUTS = ["input_ids", "attention_mask"]  # what the tokenizer returns: the model takes no token_type_ids


def byte_level_tokenizer():
    """``ByteTokenizer`` as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    chars = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes for it
    raw = RawTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(list(BYTE_SPECIALS))
    byte = ByteTokenizer()
    assert [raw.token_to_id(t) for t in BYTE_SPECIALS] == [byte.eos_id, byte.pad_id]
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=BYTE_SPECIALS[0], pad_token=BYTE_SPECIALS[1],
                                   split_special_tokens=True, clean_up_tokenization_spaces=False,
                                   model_input_names=INPUTS)


def hf_tokenizer(tok: HFTokenizer):
    """A Hugging Face ``tokenizers`` tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        tok.save(Path(tmp) / "tokenizer.json")
        fast = PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"), eos_token=tok.eos_token,
                                       clean_up_tokenization_spaces=False, model_input_names=INPUTS)
    if tok.pad_id is not None:
        fast.pad_token = fast.convert_ids_to_tokens(tok.pad_id)
    return fast


def transformers_tokenizer(tok: Tokenizer):
    """``tok`` as a ``transformers`` tokenizer (see the module docstring)."""
    if isinstance(tok, ByteTokenizer):
        return byte_level_tokenizer()
    if isinstance(tok, HFTokenizer):
        return hf_tokenizer(tok)
    raise TypeError(f"cannot export a {type(tok).__name__} as a Hugging Face tokenizer")


def write_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """Write ``tok``'s Hugging Face files into ``folder``."""
    transformers_tokenizer(tok).save_pretrained(str(folder))
