"""Tokenizers: byte-level (the default, needs no files) and Hugging Face ``tokenizers`` models.

``load_tokenizer(spec)`` accepts

* ``None`` or ``"byte"``: byte-level. Ids 0..255 are the UTF-8 bytes, ``EOS = 256``, ``PAD = 257``;
  ``vocab_size = 258`` exactly (models that want a multiple of 64/128 pad their embedding themselves).
* a path to a Hugging Face ``tokenizer.json`` (or a folder holding one), e.g. from ``hope-scale
  train-tokenizer``;
* a Hugging Face Hub model name such as ``"gpt2"`` (needs the network; a clear error offline);
* the dict returned by ``Tokenizer.to_spec()``, which is what checkpoints and dataset manifests record.
  For a Hugging Face tokenizer it carries a SHA-256 of the vocabulary, so loading a different file
  under the same path fails loudly instead of silently changing token ids.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# End-of-text tokens looked for (in this order) when a Hugging Face tokenizer is given without one.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
KNOWN_PAD_TOKENS = ("<|pad|>", "<pad>", "[PAD]")


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or does not fit the request."""


class Tokenizer(ABC):
    """What the data pipeline and the trainer need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int | None

    @abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no special tokens added) as an integer numpy array."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (EOS, PAD) are dropped unless ``skip_special_tokens=False``."""

    @abstractmethod
    def to_spec(self) -> dict[str, Any]:
        """A JSON-able description from which ``load_tokenizer`` rebuilds this tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode_array`` for several texts (subclasses may do it faster)."""
        return [self.encode_array(t) for t in texts]

    @property
    def token_dtype(self) -> np.dtype:
        """The smallest storage dtype for this vocabulary: uint16 when it fits, else int32."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.int32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255, then EOS = 256 and PAD = 257 (vocab_size 258)."""

    name = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        if skip_special_tokens:
            arr = arr[arr < 256]
        elif (arr >= 256).any():
            # Render specials as text markers so nothing is silently lost.
            parts, start = [], 0
            for i in np.flatnonzero(arr >= 256):
                parts.append(bytes(arr[start:i].astype(np.uint8)).decode("utf-8", errors="replace"))
                parts.append("<|endoftext|>" if arr[i] == self.eos_id else "<|pad|>")
                start = i + 1
            parts.append(bytes(arr[start:].astype(np.uint8)).decode("utf-8", errors="replace"))
            return "".join(parts)
        return bytes(arr.astype(np.uint8)).decode("utf-8", errors="replace")

    def to_spec(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (BPE, Unigram, ...) with a known end-of-text token."""

    def __init__(self, tok: Any, source: str, eos_token: str | None = None):
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token or _find_token(tok, KNOWN_EOS_TOKENS)
        if self.eos_token is None:
            raise TokenizerError(
                f"tokenizer {source!r} has none of the usual end-of-text tokens {KNOWN_EOS_TOKENS}; "
                "name the one it uses (e.g. --eos-token '<|im_end|>')"
            )
        eos_id = tok.token_to_id(self.eos_token)
        if eos_id is None:
            raise TokenizerError(f"tokenizer {source!r} has no token {self.eos_token!r}")
        self.eos_id = int(eos_id)
        pad = _find_token(tok, KNOWN_PAD_TOKENS)
        self.pad_id = None if pad is None else int(tok.token_to_id(pad))
        stem = Path(source).stem if source.endswith(".json") else source
        self.name = f"hf:{Path(source).parent.name if stem == 'tokenizer' else stem}"
        self.sha256 = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self.token_dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.token_dtype) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_spec(self) -> dict[str, Any]:
        return {
            "kind": "hf",
            "source": self.source,
            "eos_token": self.eos_token,
            "vocab_size": self.vocab_size,
            "sha256": self.sha256,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a ``tokenizer.json`` file."""
        self._tok.save(str(path))


def _find_token(tok: Any, candidates: Sequence[str]) -> str | None:
    return next((t for t in candidates if tok.token_to_id(t) is not None), None)


def _load_hf(source: str, eos_token: str | None) -> HFTokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return HFTokenizer(RawTokenizer.from_file(str(path)), str(path.resolve()), eos_token)
        except Exception as err:  # tokenizers raises plain Exception on malformed files
            if isinstance(err, TokenizerError):
                raise
            raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json: {err}") from err
    if source.endswith(".json") or path.exists() or source.startswith((".", "/", "~")):
        raise TokenizerError(f"tokenizer file not found: {source}")
    try:
        raw = RawTokenizer.from_pretrained(source)
    except Exception as err:
        raise TokenizerError(
            f"could not fetch tokenizer {source!r} from the Hugging Face Hub ({err}). Offline, use "
            "'byte', a local tokenizer.json, or train one with `hope-scale train-tokenizer`."
        ) from err
    return HFTokenizer(raw, source, eos_token)


def load_tokenizer(spec: str | dict[str, Any] | None = None, *, eos_token: str | None = None) -> Tokenizer:
    """Build a tokenizer from ``None``/"byte", a tokenizer.json path, a Hub name, or a ``to_spec()`` dict."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind != "hf":
            raise TokenizerError(f"unknown tokenizer kind {kind!r} in {spec}")
        tok = _load_hf(spec["source"], eos_token or spec.get("eos_token"))
        if spec.get("sha256") and spec["sha256"] != tok.sha256:
            raise TokenizerError(
                f"tokenizer at {spec['source']!r} differs from the recorded one (sha256 {tok.sha256[:12]}... "
                f"!= {spec['sha256'][:12]}...): token ids would not match"
            )
        return tok
    if isinstance(spec, (str, os.PathLike)):
        return _load_hf(os.fspath(spec), eos_token)
    raise TokenizerError(f"cannot build a tokenizer from {spec!r}")
