"""``hope-scale train-tokenizer``: train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on a corpus.

The result is a standard ``tokenizer.json`` (GPT-2-style byte-level BPE: any text round-trips
exactly, no unknown tokens) with ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1), usable offline as
``--tokenizer path/to/tokenizer.json`` in prepare-data and in training configs. It reads the same
sources as prepare-data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from hope_scale.data.tokenizer import HFTokenizer

from .sources import Problem, SourceConfig, SourceError, add_source_arguments, iter_texts, source_config_from_args

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 2} (256 bytes + 2 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


class _Texts:
    """Source texts up to ``max_bytes``, counting what was read and skipped."""

    def __init__(self, cfg: SourceConfig, max_bytes: int | None, strict: bool):
        self.cfg, self.max_bytes, self.strict = cfg, max_bytes, strict
        self.documents = 0
        self.text_bytes = 0
        self.skipped: Counter = Counter()
        self.first_problem: Problem | None = None

    def __iter__(self) -> Iterator[str]:
        for item in iter_texts(self.cfg):
            if isinstance(item, Problem):
                if self.strict:
                    raise SourceError(f"bad input (--strict): {item.describe()}")
                self.skipped[item.reason] += 1
                self.first_problem = self.first_problem or item
                continue
            self.documents += 1
            self.text_bytes += len(item.encode("utf-8"))
            yield item
            if self.max_bytes is not None and self.text_bytes >= self.max_bytes:
                return


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = "Example: hope-scale train-tokenizer ./my_texts --vocab-size 16384 --out tokenizers/mine.json"
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a pair to be merged")
    parser.add_argument("--max-mb", type=float, default=500.0, help="train on at most this many MB of text")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        print(f"train-tokenizer: error: {out} exists; choose another --out or pass --overwrite", file=sys.stderr)
        return 2
    start = time.perf_counter()
    texts = _Texts(source_config_from_args(args), None if args.max_mb is None else int(args.max_mb * 1e6), args.strict)
    try:
        tok = train_bpe(texts, args.vocab_size, args.min_frequency, show_progress=sys.stderr.isatty())
    except (SourceError, ValueError) as err:
        print(f"train-tokenizer: error: {err}", file=sys.stderr)
        return 2
    if texts.documents == 0:
        print("train-tokenizer: error: no usable document in the input", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)
    loaded = HFTokenizer(tok, str(out.resolve()), EOS_TOKEN)
    seconds = time.perf_counter() - start
    print(f"wrote {out}: vocab {loaded.vocab_size:,}, eos {EOS_TOKEN!r} = {loaded.eos_id}")
    print(f"  trained on {texts.documents:,} documents, {texts.text_bytes / 1e6:.1f} MB in {seconds:.1f} s")
    if texts.skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(texts.skipped.items()))
        print(f"  skipped {sum(texts.skipped.values()):,} ({reasons}); first: {texts.first_problem.describe()}")
    return 0
