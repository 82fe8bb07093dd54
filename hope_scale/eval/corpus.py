"""Text for evaluation and continual learning: documents from files, folders, JSONL, the built-in offline
corpus or prepared MDS splits, turned into token streams with a deterministic held-out part.

Source specs (``read_documents``):

* ``builtin`` / ``builtin:pydoc`` / ``builtin:stdlib``: the built-in offline corpus
  (``data_prep.builtin_corpus``: Python's documentation topics and standard-library source);
* a ``.jsonl`` file: one document per line, text in the ``text`` field;
* any other file: one document (UTF-8 text);
* a folder: every file under it (sorted), each one document; undecodable files are skipped.

MDS splits (``read_mds_split``) are the prepared datasets of ``hope_scale.data.manifest``; each sample is
``seq_len + 1`` token ids.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hope_scale.data.tokenizer import Tokenizer

TEXT_SUFFIXES_SKIPPED = {".pyc", ".png", ".jpg", ".gz", ".zst", ".zstd", ".mds", ".pt", ".bin"}


class CorpusError(ValueError):
    """A text source does not exist or holds no text."""


def read_documents(spec: str, max_chars: int | None = None) -> list[str]:
    """Documents of a source spec (see module doc), stopping once ``max_chars`` characters are collected."""
    docs: list[str] = []
    total = 0

    def add(text: str) -> bool:
        nonlocal total
        if not text.strip():
            return True
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        docs.append(text)
        total += len(text)
        return max_chars is None or total < max_chars

    if spec == "builtin" or spec.startswith("builtin:"):
        part = spec.partition(":")[2] or "all"
        if part not in ("all", "pydoc", "stdlib"):
            raise CorpusError(f"unknown built-in corpus part {part!r}; use builtin, builtin:pydoc or builtin:stdlib")
        try:
            from data_prep import builtin_corpus
        except ImportError as err:
            raise CorpusError(f"the built-in offline corpus (data_prep.builtin_corpus) is not importable: {err}") from err
        for doc_id, text in builtin_corpus.iter_documents():
            if part != "all" and not doc_id.startswith(part + "/"):
                continue
            if not add(text):
                break
        if not docs:
            raise CorpusError(f"{spec}: the built-in corpus is empty on this Python")
        return docs

    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"text source not found: {spec}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file.suffix in TEXT_SUFFIXES_SKIPPED:
            continue
        try:
            if file.suffix == ".jsonl":
                with open(file, encoding="utf-8") as f:
                    for line in f:
                        if line.strip() and not add(str(json.loads(line).get("text", ""))):
                            return docs
                continue
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError, OSError):
            if path.is_file():
                raise CorpusError(f"{file} is not UTF-8 text (or not valid JSONL)") from None
            continue
        if not add(text):
            break
    if not docs:
        raise CorpusError(f"{spec} holds no text")
    return docs


def encode_documents(docs: list[str], tokenizer: Tokenizer, separator: int | None = None) -> np.ndarray:
    """One token stream: the documents' tokens joined by ``separator`` (default: the tokenizer's EOS)."""
    sep = tokenizer.eos_id if separator is None else separator
    parts = []
    for i, ids in enumerate(tokenizer.encode_batch(docs)):
        if i:
            parts.append(np.asarray([sep], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class TokenDomain:
    """A text domain as a token stream, split into a training part and a held-out tail."""

    name: str
    spec: str
    train: np.ndarray
    heldout: np.ndarray
    heldout_text: str  # the held-out part as text (for word/byte counts)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.spec, "train_tokens": int(self.train.size),
                "heldout_tokens": int(self.heldout.size)}


def load_domain(spec: str, tokenizer: Tokenizer, holdout_fraction: float = 0.1, max_chars: int | None = None,
                name: str | None = None) -> TokenDomain:
    """Read ``spec``; the last ``holdout_fraction`` of its characters (cut at a whitespace) is held out."""
    if not 0.0 < holdout_fraction < 1.0:
        raise CorpusError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    docs = read_documents(spec, max_chars=max_chars)
    text = "\n\n".join(docs)
    cut = int(len(text) * (1.0 - holdout_fraction))
    ws = text.rfind("\n", 0, cut)
    cut = ws + 1 if ws > len(text) // 2 else cut
    train_text, held_text = text[:cut], text[cut:]
    if not held_text.strip() or not train_text.strip():
        raise CorpusError(f"{spec}: too little text to hold out {holdout_fraction:.0%}")
    return TokenDomain(
        name=name or _short_name(spec),
        spec=spec,
        train=np.asarray(tokenizer.encode_array(train_text), dtype=np.int64),
        heldout=np.asarray(tokenizer.encode_array(held_text), dtype=np.int64),
        heldout_text=held_text,
    )


def _short_name(spec: str) -> str:
    if spec.startswith("builtin"):
        return spec.replace(":", "-")
    return Path(spec).stem or spec


def read_mds_split(root: str | os.PathLike, split: str = "val", max_samples: int | None = None) -> list[np.ndarray]:
    """Token samples of one split of a prepared dataset (``<root>/<split>/index.json`` + shards)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    root = Path(root)
    split_dir = root / split
    index_file = split_dir / "index.json"
    if not index_file.is_file():
        raise CorpusError(f"no MDS split at {split_dir} (missing index.json)")
    index = json.loads(index_file.read_text())
    samples: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="hope_eval_mds_") as tmp:
        (Path(tmp) / split).mkdir()
        for shard in index["shards"]:
            raw_name = shard["raw_data"]["basename"]
            if shard.get("zip_data"):
                data = (split_dir / shard["zip_data"]["basename"]).read_bytes()
                (Path(tmp) / split / raw_name).write_bytes(decompress(shard["compression"], data))
                base = tmp
            else:
                base = str(root)
            reader = reader_from_json(base, split, shard)
            for i in range(reader.samples):
                samples.append(np.asarray(reader.get_item(i)["tokens"], dtype=np.int64))
                if max_samples is not None and len(samples) >= max_samples:
                    return samples
            if shard.get("zip_data"):
                (Path(tmp) / split / raw_name).unlink()
    return samples


def random_windows(stream: np.ndarray, batch_size: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``batch_size`` random windows of ``length`` tokens from ``stream`` -> int64 array [B, length]."""
    if stream.size < length + 1:
        raise CorpusError(f"stream of {stream.size} tokens is shorter than a window of {length + 1}")
    starts = rng.integers(0, stream.size - length + 1, size=batch_size)
    return np.stack([stream[s:s + length] for s in starts])
