"""prepare-data: packing, EOS placement, split, idempotence, bad input, atomic output, sources, CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import builtin_corpus, sources
from data_prep.output import DatasetWriter
from data_prep.packing import Packer
from data_prep.prepare import PrepareConfig, PrepareError, prepare_builtin, prepare_dataset
from data_prep.tokenize import split_of
from hope_scale.data.manifest import read_manifest, verify_split
from hope_scale.data.tokenizer import load_tokenizer
from tests.test_data_support import paragraphs, read_split_samples, write_docs

REPO = Path(__file__).resolve().parents[1]
BYTE = load_tokenizer("byte")


def stream_of(samples: np.ndarray) -> np.ndarray:
    """The token stream that overlapping samples were cut from (consecutive samples share one token)."""
    if len(samples) == 0:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([samples[0], samples[1:, 1:].reshape(-1)]).astype(np.int64)


def expected_stream(texts: list[str]) -> np.ndarray:
    return np.array([t for text in texts for t in BYTE.encode(text) + [BYTE.eos_id]], dtype=np.int64)


def prep(tmp_path: Path, inputs, **kw) -> tuple[Path, object]:
    out = Path(kw.pop("out", tmp_path / "out"))
    kw.setdefault("workers", 1)
    kw.setdefault("quiet", True)
    return out, prepare_dataset(PrepareConfig(out=out, inputs=[str(i) for i in inputs], **kw))


# ------------------------------------------------------------------------------------------- packing


def test_packer_cuts_overlapping_samples_and_keeps_the_tail():
    p = Packer(seq_len=4, dtype=np.uint16)
    assert p.add(np.arange(3)).shape == (0, 5) and p.leftover_tokens == 3
    out = p.add(np.arange(3, 12))
    assert out.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert p.leftover_tokens == 3  # 9, 10, 11 (8 is already a label)
    assert p.add(np.arange(12, 13)).tolist() == [[8, 9, 10, 11, 12]]
    assert (p.samples_out, p.tokens_in, p.leftover_tokens) == (3, 13, 0)


def test_round_trip_packing_and_eos_placement(tmp_path, shakespeare):
    docs = paragraphs(shakespeare, 40)
    write_docs(tmp_path / "docs", docs)
    out, summary = prep(tmp_path, [tmp_path / "docs"], seq_len=64, val_fraction=0.0, shard_size_mb=0.01)
    samples = read_split_samples(out)
    assert samples.shape == (summary.samples["train"], 65) and samples.dtype == np.uint16
    assert len(json.loads((out / "train" / "index.json").read_text())["shards"]) > 1
    stream, want = stream_of(samples), expected_stream(docs)
    assert len(want) - len(stream) == summary.dropped_tokens["train"] < 64
    assert np.array_equal(stream, want[: len(stream)])  # docs in file order, each followed by EOS
    assert (stream == BYTE.eos_id).sum() == sum(1 for i in np.flatnonzero(want == BYTE.eos_id) if i < len(stream))
    decoded = BYTE.decode(stream.tolist(), skip_special_tokens=False).split("<|endoftext|>")
    assert decoded[:-1] == docs[: len(decoded) - 1]
    manifest = read_manifest(out)
    assert manifest["seq_len"] == 64 and manifest["sample_len"] == 65 and manifest["dtype"] == "uint16"
    assert manifest["summary"]["documents"] == {"train": 40, "val": 0}
    assert summary.tokens["train"] == len(want) and summary.text_bytes == sum(len(d.encode()) for d in docs)


def test_int32_columns_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    writer = DatasetWriter(tmp_path / "big", sample_len=5, dtype=np.int32, shard_size_bytes=1 << 20)
    writer.write("train", np.array([[70000, 1, 2, 3, 4]], dtype=np.int32))
    writer.commit({"fingerprint": "x"})
    assert read_split_samples(tmp_path / "big").tolist() == [[70000, 1, 2, 3, 4]]
    assert "ndarray:int32:5" in (tmp_path / "big" / "train" / "index.json").read_text()


# --------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_by_document_content():
    docs = [f"document number {i}" for i in range(4000)]
    splits = [split_of(d, 0.1, 0) for d in docs]
    assert splits == [split_of(d, 0.1, 0) for d in docs]
    assert 300 < splits.count("val") < 500
    assert [split_of(d, 0.1, 0) for d in reversed(docs)] == splits[::-1]  # order does not matter
    assert splits != [split_of(d, 0.1, 1) for d in docs]  # the seed does
    assert all(split_of(d, 0.0, 0) == "train" for d in docs)


def test_split_and_output_do_not_depend_on_worker_count(tmp_path, shakespeare):
    docs = paragraphs(shakespeare, 300, min_chars=100)
    write_docs(tmp_path / "docs", docs)
    out1, s1 = prep(tmp_path, [tmp_path / "docs"], out=tmp_path / "w1", seq_len=32, val_fraction=0.2, workers=1)
    out2, s2 = prep(tmp_path, [tmp_path / "docs"], out=tmp_path / "w2", seq_len=32, val_fraction=0.2, workers=2)
    want_val = [d for d in docs if split_of(d, 0.2, 0) == "val"]
    assert s1.documents == s2.documents == {"train": 300 - len(want_val), "val": len(want_val)}
    for split in ("train", "val"):
        assert np.array_equal(read_split_samples(out1, split), read_split_samples(out2, split))
    val_stream = stream_of(read_split_samples(out1, "val"))
    assert np.array_equal(val_stream, expected_stream(want_val)[: len(val_stream)])


# ------------------------------------------------------------------------------------- idempotence


def test_rerun_is_a_no_op_and_different_arguments_are_refused(tmp_path, shakespeare):
    write_docs(tmp_path / "docs", paragraphs(shakespeare, 20))
    out, first = prep(tmp_path, [tmp_path / "docs"], seq_len=32)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    _, again = prep(tmp_path, [tmp_path / "docs"], seq_len=32, workers=2)  # worker count is not an argument of the data
    assert again.already_done and again.samples == first.samples
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    with pytest.raises(PrepareError, match=r"seq_len: 32 -> 64.*--overwrite"):
        prep(tmp_path, [tmp_path / "docs"], seq_len=64)
    (tmp_path / "docs" / "doc_0003.txt").write_text("changed text")
    with pytest.raises(PrepareError, match="input files"):
        prep(tmp_path, [tmp_path / "docs"], seq_len=32)
    _, redone = prep(tmp_path, [tmp_path / "docs"], seq_len=64, overwrite=True)
    assert not redone.already_done and read_manifest(out)["seq_len"] == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_refuses_a_non_empty_foreign_folder(tmp_path, shakespeare):
    write_docs(tmp_path / "docs", paragraphs(shakespeare, 5))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="holds no prepared dataset"):
        prep(tmp_path, [tmp_path / "docs"], seq_len=16)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_failed_run_leaves_the_previous_dataset_intact(tmp_path, shakespeare, monkeypatch):
    write_docs(tmp_path / "docs", paragraphs(shakespeare, 30))
    out, _ = prep(tmp_path, [tmp_path / "docs"], seq_len=32)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    original = DatasetWriter.write

    def crash_midway(self, split, samples):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C while shards are being written
        original(self, split, samples)

    monkeypatch.setattr(DatasetWriter, "write", crash_midway)
    monkeypatch.setattr(sources, "UNIT_BYTES", 1)  # one unit per file, so the crash is mid-way
    with pytest.raises(KeyboardInterrupt):
        prep(tmp_path, [tmp_path / "docs"], seq_len=16, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert all(verify_split(out / s) == [] for s in ("train", "val"))


# -------------------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = "A perfectly good document. " * 20
    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "good": folder / "a_good.txt",
        "non_utf8": folder / "b_latin1.txt",
        "empty": folder / "c_empty.txt",
        "jsonl": folder / "d_records.jsonl",
        "parquet_missing": folder / "e_wrong_column.parquet",
    }
    files["good"].write_text(good)
    files["non_utf8"].write_bytes(b"first line\nsecond line caf\xe9\n")
    files["empty"].write_bytes(b"")
    lines = [json.dumps({"text": good}), "{not json", json.dumps({"body": "no text field"}), json.dumps({"text": good})]
    files["jsonl"].write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"body": ["x", "y"]}), files["parquet_missing"])
    return files


def test_bad_input_is_skipped_counted_and_located(bad_inputs, tmp_path):
    out, summary = prep(tmp_path, [bad_inputs["good"].parent], seq_len=16, val_fraction=0.0)
    assert summary.skipped == {"non_utf8": 1, "empty": 1, "bad_json": 1, "missing_field": 1, "missing_column": 1}
    assert summary.documents["train"] == 3
    shown = "\n".join(summary.first_problems)
    for where in ("b_latin1.txt:2", "c_empty.txt", "d_records.jsonl:2", "d_records.jsonl:3", "e_wrong_column.parquet"):
        assert where in shown
    assert read_manifest(out)["summary"]["skipped"] == summary.skipped


@pytest.mark.parametrize(
    "name, message",
    [
        ("non_utf8", r"b_latin1.txt:2: not valid UTF-8"),
        ("empty", r"c_empty.txt: empty"),
        ("jsonl", r"d_records.jsonl:2: not valid JSON"),
        ("parquet_missing", r"e_wrong_column.parquet: Parquet file lacks the text column"),
    ],
)
def test_strict_stops_on_bad_input_and_writes_nothing(bad_inputs, tmp_path, name, message):
    with pytest.raises(PrepareError, match=message):
        prep(tmp_path, [bad_inputs["good"], bad_inputs[name]], seq_len=16, strict=True)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_field_under_strict(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": "fine " * 10}) + "\n" + json.dumps({"content": "some content " * 3}) + "\n")
    with pytest.raises(PrepareError, match=r"r.jsonl:2: lacks the text field \(no 'text'\)"):
        prep(tmp_path, [path], seq_len=8, strict=True)
    _, summary = prep(tmp_path, [path], seq_len=8, text_field="content", val_fraction=0.0)
    assert summary.skipped == {"missing_field": 1} and summary.documents["train"] == 1


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrepareError, match="no training sample"):
        prep(tmp_path, [tmp_path / "empty.txt"], seq_len=8)
    with pytest.raises(PrepareError, match="input not found"):
        prep(tmp_path, [tmp_path / "nope"], seq_len=8)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ sources


def test_jsonl_chunks_compression_and_parquet_give_the_same_documents(tmp_path, shakespeare, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = paragraphs(shakespeare, 60)
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs[:30]) + "oops\n" + "".join(
        json.dumps({"text": d}) + "\n" for d in docs[30:]
    )
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "d.jsonl").write_text(body)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "d.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": docs[:30] + [None] + docs[30:]}), tmp_path / "pq" / "d.parquet", row_group_size=7)
    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 1000)  # many byte-range chunks, lines cut anywhere
    want = expected_stream(docs)
    for name, where in [("plain", "d.jsonl:31"), ("gz", "d.jsonl.gz:31"), ("zst", "d.jsonl.zst:31"), ("pq", "d.parquet (row 31)")]:
        out, summary = prep(tmp_path, [tmp_path / name], out=tmp_path / f"out-{name}", seq_len=32, val_fraction=0.0)
        stream = stream_of(read_split_samples(out))
        assert np.array_equal(stream, want[: len(stream)]), name
        assert summary.documents["train"] == 60 and sum(summary.skipped.values()) == 1, name
        assert where in summary.first_problems[0], (name, summary.first_problems)


def test_text_paragraph_documents_and_globs(tmp_path):
    (tmp_path / "book.txt").write_text("Para one\nline two\n\n\n  \nPara two\n\nPara three\n")
    (tmp_path / "skip.md").write_text("not matched by the glob")
    units = list(sources.plan_sources(sources.SourceConfig([str(tmp_path / "*.txt")], text_docs="paragraph")).units)
    texts = [t for u in units for t in u.read()]
    assert texts == ["Para one\nline two", "Para two", "Para three\n"]
    with pytest.raises(sources.SourceError, match="no file matches"):
        sources.plan_sources(sources.SourceConfig([str(tmp_path / "*.nothing")]))


def test_builtin_corpus_and_prepare_builtin(tmp_path):
    docs = builtin_corpus.iter_documents()
    first_id, first_text = next(docs)
    assert first_id.startswith("pydoc/") and first_text.strip()
    assert any(doc_id == "stdlib/json/decoder.py" for doc_id, _ in builtin_corpus.stdlib_files())
    assert not any("/test/" in doc_id or "site-packages" in doc_id for doc_id, _ in builtin_corpus.stdlib_files())
    root = prepare_builtin(tmp_path / "builtin", seq_len=64, max_mb=0.5)
    manifest = read_manifest(root)
    summary = manifest["summary"]
    assert summary["samples"]["train"] > 1000 and summary["samples"]["val"] > 0
    assert 0.5e6 <= summary["text_bytes"] < 6e6
    assert manifest["inputs"][0]["builtin"]["python"] == sys.version.split()[0]
    assert prepare_builtin(tmp_path / "builtin", seq_len=64, max_mb=0.5) == root  # no-op the second time
    assert read_manifest(root)["created_at"] == manifest["created_at"]


def test_hf_dataset_offline_gives_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "hope_scale.cli", "prepare-data", "--hf-dataset", "someone/some-corpus",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "could not open Hugging Face dataset 'someone/some-corpus'" in proc.stderr
    assert "need the network" in proc.stderr and not (tmp_path / "out").exists()


def test_cli_prepares_with_a_trained_tokenizer(tmp_path, shakespeare, capsys):
    from data_prep.train_tokenizer import train_bpe
    from hope_scale.cli import main

    write_docs(tmp_path / "docs", paragraphs(shakespeare, 80))
    train_bpe(paragraphs(shakespeare, 400), vocab_size=400).save(str(tmp_path / "tok.json"))
    argv = ["prepare-data", str(tmp_path / "docs"), "--out", str(tmp_path / "out"), "--seq-len", "32",
            "--tokenizer", str(tmp_path / "tok.json"), "--workers", "2", "--val-fraction", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for word in ("documents", "tokens", "samples", "skipped", "MB/s", "tokens/s"):
        assert word in printed
    manifest = read_manifest(tmp_path / "out")
    assert manifest["vocab_size"] == 400 and manifest["tokenizer"]["kind"] == "hf"
    tok = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))  # the dataset carries its tokenizer
    assert tok.to_spec()["sha256"] == manifest["tokenizer"]["sha256"]
    samples = read_split_samples(tmp_path / "out")
    assert samples.max() < 400 and Counter(samples.reshape(-1).tolist())[tok.eos_id] > 0
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert main(argv[:-2] + ["--val-fraction", "0.2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
