"""Where documents come from: local text / JSONL / Parquet files, a Hugging Face dataset, the built-in corpus.

A source is cut into *work units*: small picklable objects that a worker process reads on its own
(a batch of text files, a byte range of a JSONL file, one Parquet row group, a batch of Hub records).
Units come in a fixed order and each yields its documents in a fixed order, so the prepared dataset
does not depend on how many workers read them.

``unit.read()`` yields document texts and ``Problem``\\ s: bad input (non-UTF-8 bytes, an empty file,
a JSONL line that is not JSON or lacks the text field, a Parquet file without the column) that the
caller skips and counts, or stops on under ``--strict``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import builtin_corpus

UNIT_BYTES = 1 << 20  # target size of one work unit (small units keep the workers evenly busy)
JSONL_CHUNK_BYTES = 64 << 20  # uncompressed JSONL files larger than this are read in byte ranges
FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_DOCS = ("file", "paragraph")

REASONS = {
    "non_utf8": "not valid UTF-8",
    "empty": "empty",
    "bad_json": "not valid JSON",
    "missing_field": "lacks the text field",
    "missing_column": "Parquet file lacks the text column",
    "unreadable": "cannot be read",
}


class SourceError(RuntimeError):
    """An input cannot be used at all (missing path, no network for a Hub dataset, ...)."""


@dataclass(frozen=True)
class Problem:
    """One skipped piece of input. ``line`` is 1-based; ``unit="row"`` for Parquet/Hub rows."""

    reason: str
    path: str
    line: int | None = None
    detail: str = ""
    unit: str = "line"

    def location(self) -> str:
        if self.line is None:
            return self.path
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} (row {self.line})"

    def describe(self) -> str:
        text = f"{self.location()}: {REASONS[self.reason]}"
        return f"{text} ({self.detail})" if self.detail else text

    def shifted(self, lines: int) -> "Problem":
        return Problem(self.reason, self.path, None if self.line is None else self.line + lines, self.detail, self.unit)


# ----------------------------------------------------------------------------------------------- units


def _open_binary(path: str) -> io.BufferedIOBase:
    """Open a possibly compressed (.gz, .zst) file for binary reading."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _decode(data: bytes, path: str) -> str | Problem:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return Problem("non_utf8", path, line, f"byte 0x{data[err.start]:02x} at offset {err.start}")


def record_text(record: Any, text_field: str, path: str, line: int, unit: str = "line") -> str | Problem:
    """The text of one JSON record / table row, or the Problem that makes it unusable."""
    if not isinstance(record, dict) or text_field not in record:
        return Problem("missing_field", path, line, f"no {text_field!r}", unit)
    value = record[text_field]
    if not isinstance(value, str):
        return Problem("missing_field", path, line, f"{text_field!r} is {type(value).__name__}, not text", unit)
    if not value.strip():
        return Problem("empty", path, line, f"{text_field!r} is empty", unit)
    return value


_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


@dataclass
class TextFiles:
    """A batch of plain-text files: one document per file, or per blank-line-separated paragraph."""

    files: list[tuple[str, str]]  # (display name, path)
    paragraphs: bool = False
    nbytes: int = 0
    line_key: str | None = None

    def read(self) -> Iterator[str | Problem]:
        for display, path in self.files:
            try:
                with _open_binary(path) as f:
                    data = f.read()
            except (OSError, EOFError) as err:
                yield Problem("unreadable", display, None, str(err))
                continue
            text = _decode(data, display)
            if isinstance(text, Problem):
                yield text
            elif not text.strip():
                yield Problem("empty", display, None, f"{len(data)} bytes, no text")
            elif not self.paragraphs:
                yield text
            else:
                yield from (p for p in _PARAGRAPH_BREAK.split(text) if p.strip())


@dataclass
class JsonlChunk:
    """The lines of a JSONL file that start in ``[start, end)`` (the whole file when ``end`` is None).

    Problem line numbers count from the chunk's first line; ``line_key`` tells the caller to add the
    lines of the file's earlier chunks (``lines`` is set after reading).
    """

    path: str
    display: str
    text_field: str
    start: int = 0
    end: int | None = None
    nbytes: int = 0
    lines: int = 0

    @property
    def line_key(self) -> str:
        return self.display

    def read(self) -> Iterator[str | Problem]:
        self.lines = 0
        try:
            with _open_binary(self.path) as f:
                pos = self.start
                if self.start > 0:  # skip the line that began in the previous chunk
                    f.seek(self.start - 1)
                    pos = self.start - 1 + len(f.readline())
                while self.end is None or pos < self.end:
                    raw = f.readline()
                    if not raw:
                        break
                    pos += len(raw)
                    self.lines += 1
                    yield from self._parse(raw)
        except Exception as err:  # truncated or corrupt file (gzip, zstandard raise their own types)
            yield Problem("unreadable", self.display, self.lines + 1, str(err))

    def _parse(self, raw: bytes) -> Iterator[str | Problem]:
        line = _decode(raw, self.display)
        if isinstance(line, Problem):
            yield Problem("non_utf8", self.display, self.lines, line.detail)
            return
        if not line.strip():
            return  # blank lines between records are fine
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield Problem("bad_json", self.display, self.lines, err.msg)
            return
        yield record_text(record, self.text_field, self.display, self.lines)


@dataclass
class ParquetRowGroup:
    """One row group of a Parquet file (its text column only)."""

    path: str
    display: str
    text_field: str
    row_group: int
    first_row: int
    nbytes: int = 0
    line_key: str | None = None

    def read(self) -> Iterator[str | Problem]:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=[self.text_field])
        except Exception as err:  # pyarrow raises several types for corrupt data
            yield Problem("unreadable", self.display, None, f"row group {self.row_group}: {err}")
            return
        for i, value in enumerate(table.column(0).to_pylist()):
            yield record_text({self.text_field: value}, self.text_field, self.display, self.first_row + i + 1, "row")


@dataclass
class Records:
    """A batch of records already in memory (rows of a Hub dataset, pydoc topics)."""

    records: list[dict[str, Any]]
    text_field: str
    origin: str
    first_row: int
    nbytes: int = 0
    line_key: str | None = None

    def read(self) -> Iterator[str | Problem]:
        for i, record in enumerate(self.records):
            yield record_text(record, self.text_field, self.origin, self.first_row + i + 1, "row")


@dataclass
class ProblemUnit:
    """A problem found while planning (e.g. a Parquet file without the column), passed along in order."""

    problem: Problem
    nbytes: int = 0
    line_key: str | None = None

    def read(self) -> Iterator[str | Problem]:
        yield self.problem


# -------------------------------------------------------------------------------------------- planning


@dataclass
class SourceConfig:
    """What to read. ``inputs`` are files, folders (read recursively) or glob patterns."""

    inputs: list[str] = field(default_factory=list)
    format: str = "auto"
    text_field: str = "text"
    text_docs: str = "file"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    builtin: bool = False

    def describe(self) -> dict[str, Any]:
        """The settings that change which documents are read (part of the dataset fingerprint)."""
        return {
            "format": self.format,
            "text_field": self.text_field,
            "text_docs": self.text_docs,
            "hf_dataset": self.hf_dataset,
            "hf_config": self.hf_config,
            "hf_split": self.hf_split if self.hf_dataset else None,
            "builtin": self.builtin,
        }


@dataclass
class Plan:
    """The work units of every source, plus what identifies the inputs (for idempotence)."""

    units: Iterable[Any]
    inputs: list[Any]
    total_bytes: int | None


def detect_format(path: str) -> str:
    """``jsonl`` for .jsonl/.ndjson, ``parquet`` for .parquet, else ``text`` (.gz/.zst allowed for text and JSONL)."""
    name = path.lower()
    for ext in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(ext)
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """The files named by ``inputs`` (files, folders walked recursively without hidden entries, globs)."""
    files: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = [
                f for f in path.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
            ]
            if not found:
                raise SourceError(f"input folder {item} contains no files")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(item):
            found = [Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if os.path.isfile(p)]
            if not found:
                raise SourceError(f"no file matches {item!r}")
        else:
            raise SourceError(f"input not found: {item}")
        files.update((f.resolve(), None) for f in sorted(found))
    return list(files)


def _file_units(files: list[Path], cfg: SourceConfig) -> Iterator[Any]:
    batch: list[tuple[str, str]] = []
    batch_bytes = 0
    for path in files:
        fmt = detect_format(str(path)) if cfg.format == "auto" else cfg.format
        size = path.stat().st_size
        if fmt != "text" and batch:
            yield TextFiles(batch, cfg.text_docs == "paragraph", batch_bytes)
            batch, batch_bytes = [], 0
        if fmt == "text":
            batch.append((str(path), str(path)))
            batch_bytes += size
            if batch_bytes >= UNIT_BYTES or len(batch) >= 256:
                yield TextFiles(batch, cfg.text_docs == "paragraph", batch_bytes)
                batch, batch_bytes = [], 0
        elif fmt == "jsonl":
            yield from _jsonl_units(path, size, cfg.text_field)
        else:
            yield from _parquet_units(path, size, cfg.text_field)
    if batch:
        yield TextFiles(batch, cfg.text_docs == "paragraph", batch_bytes)


def _jsonl_units(path: Path, size: int, text_field: str) -> Iterator[JsonlChunk]:
    if path.suffix in (".gz", ".zst", ".zstd"):
        yield JsonlChunk(str(path), str(path), text_field, nbytes=size)  # compressed: not seekable
        return
    for start in range(0, max(size, 1), JSONL_CHUNK_BYTES):
        end = start + JSONL_CHUNK_BYTES
        yield JsonlChunk(str(path), str(path), text_field, start, None if end >= size else end, min(size, end) - start)


def _parquet_units(path: Path, size: int, text_field: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(str(path))
    except Exception as err:
        yield ProblemUnit(Problem("unreadable", str(path), None, f"not a Parquet file: {err}"), size)
        return
    schema = meta.schema_arrow
    if text_field not in schema.names:
        yield ProblemUnit(Problem("missing_column", str(path), None, f"columns are {schema.names}"), size)
        return
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        yield ProblemUnit(Problem("missing_column", str(path), None, f"{text_field!r} is {col_type}, not text"), size)
        return
    first_row, groups = 0, meta.metadata.num_row_groups
    for i in range(groups):
        rows = meta.metadata.row_group(i).num_rows
        yield ParquetRowGroup(str(path), str(path), text_field, i, first_row, size // max(groups, 1))
        first_row += rows


def _builtin_units() -> Iterator[Any]:
    topics = builtin_corpus.pydoc_topics()
    if topics:
        yield Records([{"text": t} for _, t in topics], "text", "builtin:pydoc", 0, _text_bytes(topics))
    batch, batch_bytes = [], 0
    for doc_id, path in builtin_corpus.stdlib_files():
        batch.append((doc_id, str(path)))
        batch_bytes += path.stat().st_size
        if batch_bytes >= UNIT_BYTES:
            yield TextFiles(batch, False, batch_bytes)
            batch, batch_bytes = [], 0
    if batch:
        yield TextFiles(batch, False, batch_bytes)


def _text_bytes(docs: list[tuple[str, str]]) -> int:
    return sum(len(text.encode("utf-8")) for _, text in docs)


def _open_hf(cfg: SourceConfig) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise SourceError("reading a Hugging Face dataset needs the `datasets` package") from err
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as err:
        raise SourceError(
            f"could not open Hugging Face dataset {cfg.hf_dataset!r} (config {cfg.hf_config}, split "
            f"{cfg.hf_split}): {type(err).__name__}: {err}. Hub datasets need the network; offline, "
            "download the data elsewhere and pass its JSONL or Parquet files instead."
        ) from err
    return first, it


def _hf_units(first: Any, rest: Iterator[Any], cfg: SourceConfig, batch_rows: int = 1000) -> Iterator[Records]:
    origin = f"hf:{cfg.hf_dataset}/{cfg.hf_split}"
    rows, nbytes, first_row = [], 0, 0
    source = rest if first is None else _chain_one(first, rest)
    for row in source:
        value = row.get(cfg.text_field) if isinstance(row, dict) else None
        rows.append({cfg.text_field: value} if isinstance(row, dict) and cfg.text_field in row else {})
        nbytes += len(value) if isinstance(value, str) else 0
        if len(rows) >= batch_rows or nbytes >= UNIT_BYTES:
            yield Records(rows, cfg.text_field, origin, first_row, nbytes)
            first_row += len(rows)
            rows, nbytes = [], 0
    if rows:
        yield Records(rows, cfg.text_field, origin, first_row, nbytes)


def _chain_one(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def plan_sources(cfg: SourceConfig) -> Plan:
    """Check the inputs exist (and, for a Hub dataset, that it can be opened) and list their work units."""
    if cfg.format not in FORMATS:
        raise SourceError(f"unknown format {cfg.format!r}; choose from {FORMATS}")
    if cfg.text_docs not in TEXT_DOCS:
        raise SourceError(f"unknown text_docs {cfg.text_docs!r}; choose from {TEXT_DOCS}")
    if not (cfg.inputs or cfg.hf_dataset or cfg.builtin):
        raise SourceError("no input: give files/folders/globs, --hf-dataset NAME, or --builtin")
    files = expand_inputs(cfg.inputs) if cfg.inputs else []
    inputs: list[Any] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    total: int | None = sum(f.stat().st_size for f in files)
    parts: list[Iterable[Any]] = []
    if files:
        parts.append(_file_units(files, cfg))
    if cfg.builtin:
        inputs.append({"builtin": builtin_corpus.fingerprint()})
        parts.append(_builtin_units())
        stdlib_bytes = sum(p.stat().st_size for _, p in builtin_corpus.stdlib_files())
        total = (total or 0) + stdlib_bytes + _text_bytes(builtin_corpus.pydoc_topics())
    if cfg.hf_dataset:
        first, rest = _open_hf(cfg)
        inputs.append({"hf_dataset": cfg.hf_dataset, "config": cfg.hf_config, "split": cfg.hf_split})
        parts.append(_hf_units(first, rest, cfg))
        total = None  # unknown length
    return Plan((unit for part in parts for unit in part), inputs, total)


def iter_texts(cfg: SourceConfig) -> Iterator[str | Problem]:
    """Every document text (and Problem) of the sources, in order, read in this process."""
    for unit in plan_sources(cfg).units:
        yield from unit.read()


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options that fill a ``SourceConfig`` (shared by prepare-data and train-tokenizer)."""
    src = parser.add_argument_group("sources")
    src.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="text/JSONL/Parquet files, folders (read recursively, hidden entries skipped) or quoted "
                          "glob patterns; .jsonl/.ndjson are JSONL, .parquet is Parquet, anything else is text "
                          "(.gz/.zst compression allowed for text and JSONL)")
    src.add_argument("--format", choices=FORMATS, default="auto", help="read every INPUT file as this format")
    src.add_argument("--text-field", default="text", help="JSONL field / Parquet column / Hub dataset column holding the text")
    src.add_argument("--text-docs", choices=TEXT_DOCS, default="file",
                     help="plain-text documents: one per file, or one per blank-line-separated paragraph "
                          "(for a corpus that is one big file)")
    src.add_argument("--hf-dataset", metavar="NAME", help="also read this Hugging Face Hub dataset, streamed (needs the network)")
    src.add_argument("--hf-config", metavar="CONFIG", help="configuration (subset) of --hf-dataset")
    src.add_argument("--hf-split", default="train", help="split of --hf-dataset to read")
    src.add_argument("--builtin", action="store_true",
                     help="also read the built-in offline corpus (this Python's docs and standard-library source)")


def source_config_from_args(args: argparse.Namespace) -> SourceConfig:
    return SourceConfig(
        list(args.inputs), args.format, args.text_field, args.text_docs,
        args.hf_dataset, args.hf_config, args.hf_split, args.builtin,
    )
