"""``hope-scale prepare-data``: tokenize a corpus into MDS shards of fixed-length samples.

Pipeline: sources are cut into work units (``sources``); worker processes read and tokenize them and
assign each document to train or val (``tokenize``); the main process packs the token streams into
samples of ``seq_len + 1`` tokens (``packing``) and writes them (``output``). Units are consumed in
their fixed order, so the result is the same for any number of workers.

Library use::

    from data_prep.prepare import PrepareConfig, prepare_dataset, prepare_builtin
    summary = prepare_dataset(PrepareConfig(out="data/shakespeare", inputs=["shakespeare/"], seq_len=1024))
    root = prepare_builtin("data/builtin-byte-1024", seq_len=1024)   # the offline default corpus

With ``workers > 1`` the worker processes are spawned: a calling script needs ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from hope_scale.data.manifest import SPLITS
from hope_scale.data.tokenizer import HFTokenizer, TokenizerError, load_tokenizer

from .output import DatasetWriter, OutputExistsError, check_existing, fingerprint
from .packing import Packer
from .sources import SourceConfig, SourceError, add_source_arguments, plan_sources
from .tokenize import UnitEncoder, UnitResult, encode_in_worker, init_worker

SHOWN_PROBLEMS = 5  # first bad-input locations printed in the summary


class PrepareError(RuntimeError):
    """prepare-data stopped (bad input under --strict, unusable source, output conflict)."""


@dataclass
class PrepareConfig:
    """Everything ``prepare_dataset`` needs; the CLI flags map one to one onto these fields."""

    out: str | Path
    inputs: list[str] = field(default_factory=list)
    seq_len: int = 1024
    tokenizer: str = "byte"
    eos_token: str | None = None
    val_fraction: float = 0.01
    split_seed: int = 0
    format: str = "auto"
    text_field: str = "text"
    text_docs: str = "file"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    builtin: bool = False
    max_mb: float | None = None
    shard_size_mb: float = 64.0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    strict: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a progress bar only on a terminal
    quiet: bool = False

    def sources(self) -> SourceConfig:
        return SourceConfig(
            list(self.inputs), self.format, self.text_field, self.text_docs,
            self.hf_dataset, self.hf_config, self.hf_split, self.builtin,
        )


@dataclass
class Summary:
    """What a run did (also stored in the dataset manifest)."""

    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    samples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    dropped_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict[str, int] = field(default_factory=dict)
    first_problems: list[str] = field(default_factory=list)
    input_bytes: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    already_done: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)

    def report(self, out_dir: Path, sample_len: int) -> str:
        def per_split(d: dict[str, int]) -> str:
            return f"{sum(d.values()):,} (train {d['train']:,}, val {d['val']:,})"

        lines = [
            f"prepared {out_dir}",
            f"  documents  {per_split(self.documents)}",
            f"  tokens     {per_split(self.tokens)}",
            f"  samples    {per_split(self.samples)} of {sample_len} tokens",
            f"  skipped    {sum(self.skipped.values()):,}"
            + (" (" + ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items())) + ")" if self.skipped else ""),
        ]
        lines += [f"    {p}" for p in self.first_problems]
        lines += [
            f"  dropped    {per_split(self.dropped_tokens)} tail tokens shorter than one sample",
            f"  throughput {self.text_bytes / 1e6:.1f} MB of text in {self.seconds:.1f} s: "
            f"{self.mb_per_s:.2f} MB/s, {self.tokens_per_s:,.0f} tokens/s (+ {self.startup_seconds:.1f} s start-up)",
        ]
        return "\n".join(lines)


def _dataset_config(cfg: PrepareConfig, tok_spec: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine the dataset's content (worker count, progress etc. do not)."""
    identity = {k: v for k, v in tok_spec.items() if k != "source"}  # a moved tokenizer file is the same tokenizer
    return {
        "seq_len": cfg.seq_len,
        "tokenizer": identity,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "max_mb": cfg.max_mb,
        "shard_size_mb": cfg.shard_size_mb,
        **cfg.sources().describe(),
    }


def _ordered_map(units: Iterable[Any], workers: int, init_args: tuple) -> Iterator[UnitResult]:
    """Encode units with ``workers`` processes (in this process if 1), yielding results in unit order."""
    if workers <= 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker means one core, as documented
        encoder = UnitEncoder(load_tokenizer(init_args[0]), *init_args[1:])
        yield from map(encoder, units)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork: tokenizer thread pools do not survive it
    with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for unit in units:
            pending.append(pool.apply_async(encode_in_worker, (unit,)))
            if len(pending) >= 2 * workers:  # bounded read-ahead keeps memory flat
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _progress(cfg: PrepareConfig, total: int | None) -> Any:
    from tqdm import tqdm

    disable = cfg.quiet or (cfg.progress is False) or (cfg.progress is None and not sys.stderr.isatty())
    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare-data", disable=disable, file=sys.stderr)


def prepare_dataset(cfg: PrepareConfig) -> Summary:
    """Build (or find already built) the dataset ``cfg`` describes; return what was done."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.out).expanduser().resolve()
    if cfg.seq_len < 1:
        raise PrepareError(f"--seq-len must be >= 1, got {cfg.seq_len}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    tokenizer = load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token)
    tok_spec = tokenizer.to_spec()
    try:
        plan = plan_sources(cfg.sources())
    except SourceError as err:
        raise PrepareError(str(err)) from err
    config = _dataset_config(cfg, tok_spec)
    try:
        existing = check_existing(out_dir, config, plan.inputs, cfg.overwrite)
    except (OutputExistsError, ValueError) as err:  # ValueError: an unreadable manifest in --out
        raise PrepareError(str(err)) from err
    if existing is not None:
        summary = Summary(**{k: v for k, v in existing["summary"].items() if k in Summary.__dataclass_fields__})
        summary.already_done = True
        if not cfg.quiet:
            print(f"{out_dir} already holds this dataset (same arguments and inputs): nothing to do")
        return summary

    sample_len = cfg.seq_len + 1
    writer = DatasetWriter(out_dir, sample_len, tokenizer.token_dtype, int(cfg.shard_size_mb * (1 << 20)))
    packers = {s: Packer(cfg.seq_len, tokenizer.token_dtype) for s in SPLITS}
    summary = Summary()
    line_base: dict[str, int] = {}
    max_bytes = None if cfg.max_mb is None else int(cfg.max_mb * 1e6)
    bar = _progress(cfg, plan.total_bytes)
    start = time.perf_counter()  # throughput counts from here; start-up (imports, planning) is reported apart
    summary.startup_seconds = start - t0
    results = _ordered_map(plan.units, cfg.workers, (tok_spec, cfg.val_fraction, cfg.split_seed))
    try:
        for result in results:
            _record_problems(result, line_base, summary, cfg.strict)
            for split in SPLITS:
                writer.write(split, packers[split].add(result.tokens[split]))
                summary.documents[split] += result.documents[split]
                summary.tokens[split] += len(result.tokens[split])
            summary.input_bytes += result.input_bytes
            summary.text_bytes += result.text_bytes
            bar.update(result.input_bytes)
            if max_bytes is not None and summary.text_bytes >= max_bytes:
                break
        results.close()  # stops the worker pool early when --max-mb was reached
        for split in SPLITS:
            summary.samples[split] = packers[split].samples_out
            summary.dropped_tokens[split] = packers[split].leftover_tokens
        if summary.samples["train"] == 0:
            raise PrepareError(
                f"no training sample: {summary.tokens['train']:,} training tokens are fewer than one sample of "
                f"{sample_len} (documents {summary.documents['train']}, skipped {sum(summary.skipped.values())})"
            )
        summary.seconds = time.perf_counter() - start
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(writer.staging / "tokenizer.json")
        manifest = {
            "fingerprint": fingerprint(config, plan.inputs),
            "config": config,
            "inputs": plan.inputs,
            "tokenizer": tok_spec,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "seq_len": cfg.seq_len,
            "sample_len": sample_len,
            "dtype": tokenizer.token_dtype.name,
            "summary": asdict(summary),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        writer.commit(manifest)
    except BaseException:
        results.close()
        writer.abort()
        raise
    finally:
        bar.close()
    if summary.samples["val"] == 0 and cfg.val_fraction > 0 and not cfg.quiet:
        print(
            f"warning: the validation split is empty ({summary.documents['val']} documents, "
            f"{summary.tokens['val']} tokens); use more documents, a larger --val-fraction, or --text-docs paragraph",
            file=sys.stderr,
        )
    if not cfg.quiet:
        print(summary.report(out_dir, sample_len))
    return summary


def _record_problems(result: UnitResult, line_base: dict[str, int], summary: Summary, strict: bool) -> None:
    """Count the unit's skipped input (fixing line numbers of chunked files); stop on the first under --strict."""
    base = line_base.get(result.line_key, 0) if result.line_key else 0
    problems = [p.shifted(base) for p in result.problems]
    if result.line_key:
        line_base[result.line_key] = base + result.lines
    if problems and strict:
        raise PrepareError(f"bad input (--strict): {problems[0].describe()}")
    for reason, n in result.problem_counts.items():
        summary.skipped[reason] = summary.skipped.get(reason, 0) + n
    room = SHOWN_PROBLEMS - len(summary.first_problems)
    summary.first_problems += [p.describe() for p in problems[: max(room, 0)]]


def prepare_builtin(
    out_dir: str | Path,
    seq_len: int,
    tokenizer: str = "byte",
    max_mb: float | None = 4.0,
    val_fraction: float = 0.02,
    workers: int = 1,
    quiet: bool = True,
) -> Path:
    """Prepare (once) the built-in offline corpus; return the dataset folder. Re-calls are no-ops.

    The trainer's embedded default: a few MB of Python documentation and standard-library source,
    ready in seconds. Call it on one rank per node (or on every rank against a node-local folder
    only after a barrier), since concurrent calls would each build a copy.
    """
    cfg = PrepareConfig(
        out=out_dir, builtin=True, seq_len=seq_len, tokenizer=tokenizer, max_mb=max_mb,
        val_fraction=val_fraction, workers=workers, progress=False, quiet=quiet,
    )
    prepare_dataset(cfg)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = (
        "Examples: hope-scale prepare-data ./my_texts --out data/mine --seq-len 1024 ; "
        "hope-scale prepare-data 'dumps/*.jsonl.zst' --text-field content --out data/web --tokenizer tok/tokenizer.json ; "
        "hope-scale prepare-data --hf-dataset roneneldan/TinyStories --out data/tinystories (online). "
        "See docs/data.md."
    )
    add_source_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder (created; must be new, identical, or --overwrite)")
    out.add_argument("--seq-len", type=int, default=1024, help="training sequence length; samples hold seq_len + 1 tokens")
    out.add_argument("--tokenizer", default="byte",
                     help="'byte' (vocab 258, no files), a tokenizer.json path, or a Hub name (online)")
    out.add_argument("--eos-token", help="end-of-text token of a Hugging Face tokenizer (found automatically if standard)")
    out.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents put in the validation split")
    out.add_argument("--split-seed", type=int, default=0, help="seed of the document-level train/val split")
    out.add_argument("--shard-size-mb", type=float, default=64.0, help="uncompressed size limit of one shard")
    out.add_argument("--max-mb", type=float, help="stop after this many MB of text (at a work-unit boundary)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing, different dataset in --out (once the new one is complete)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes, one core each (1: tokenize in this process, single-threaded)")
    run_group.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping and counting it")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_group.add_argument("--quiet", action="store_true", help="print nothing but errors")


def run(args: argparse.Namespace) -> int:
    cfg = PrepareConfig(
        out=args.out, inputs=args.inputs, seq_len=args.seq_len, tokenizer=args.tokenizer, eos_token=args.eos_token,
        val_fraction=args.val_fraction, split_seed=args.split_seed, format=args.format, text_field=args.text_field,
        text_docs=args.text_docs, hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
        builtin=args.builtin, max_mb=args.max_mb, shard_size_mb=args.shard_size_mb, workers=args.workers,
        strict=args.strict, overwrite=args.overwrite, progress=False if args.no_progress else None, quiet=args.quiet,
    )
    try:
        prepare_dataset(cfg)
    except (PrepareError, TokenizerError, SourceError) as err:
        print(f"prepare-data: error: {err}", file=sys.stderr)
        return 2
    return 0
