"""Worker side of prepare-data: read one work unit, tokenize its documents, assign each to a split.

The train/validation split is by document and deterministic: a document goes to ``val`` when a keyed
hash of its text falls below ``val_fraction``. It depends only on the text and the seed (not on file
names, order or worker count), and identical documents always land in the same split.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hope_scale.data.manifest import SPLITS
from hope_scale.data.tokenizer import Tokenizer, load_tokenizer

from .sources import Problem

PROBLEMS_KEPT_PER_UNIT = 5  # per reason; the rest are only counted


def split_of(text: str, val_fraction: float, seed: int) -> str:
    """``"val"`` for about ``val_fraction`` of all documents (chosen by a keyed hash of the text), else ``"train"``."""
    if val_fraction <= 0.0:
        return "train"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2.0**64 else "train"


@dataclass
class UnitResult:
    """The tokens of one unit, per split: each document's ids followed by EOS, concatenated."""

    tokens: dict[str, np.ndarray]
    documents: dict[str, int]
    text_bytes: int
    input_bytes: int
    problems: list[Problem] = field(default_factory=list)
    problem_counts: Counter = field(default_factory=Counter)
    line_key: str | None = None
    lines: int = 0


class UnitEncoder:
    """Turns work units into ``UnitResult``\\ s with one tokenizer and one split rule."""

    def __init__(self, tokenizer: Tokenizer, val_fraction: float, split_seed: int):
        self.tokenizer = tokenizer
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self._eos = np.array([tokenizer.eos_id], dtype=tokenizer.token_dtype)

    def __call__(self, unit: Any) -> UnitResult:
        texts: dict[str, list[str]] = {s: [] for s in SPLITS}
        problems: list[Problem] = []
        counts: Counter = Counter()
        text_bytes = 0
        for item in unit.read():
            if isinstance(item, Problem):
                counts[item.reason] += 1
                if counts[item.reason] <= PROBLEMS_KEPT_PER_UNIT:
                    problems.append(item)
                continue
            texts[split_of(item, self.val_fraction, self.split_seed)].append(item)
            text_bytes += len(item.encode("utf-8"))
        tokens = {s: self._join(texts[s]) for s in SPLITS}
        return UnitResult(
            tokens=tokens,
            documents={s: len(texts[s]) for s in SPLITS},
            text_bytes=text_bytes,
            input_bytes=unit.nbytes,
            problems=problems,
            problem_counts=counts,
            line_key=unit.line_key,
            lines=getattr(unit, "lines", 0),
        )

    def _join(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty(0, dtype=self.tokenizer.token_dtype)
        parts = []
        for ids in self.tokenizer.encode_batch(texts):
            parts.append(ids.astype(self.tokenizer.token_dtype, copy=False))
            parts.append(self._eos)
        return np.concatenate(parts)


# Worker-process entry points (a pool initializer builds one encoder per process).
_ENCODER: UnitEncoder | None = None


def init_worker(tokenizer_spec: dict[str, Any], val_fraction: float, split_seed: int) -> None:
    global _ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _ENCODER = UnitEncoder(load_tokenizer(tokenizer_spec), val_fraction, split_seed)


def encode_in_worker(unit: Any) -> UnitResult:
    assert _ENCODER is not None, "init_worker was not called"
    return _ENCODER(unit)
