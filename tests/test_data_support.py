"""Shared helpers and fixtures for the data-pipeline tests (no tests here)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.prepare import PrepareConfig, prepare_dataset

@pytest.fixture
def streaming_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp folder for this test: mosaicml-streaming keeps its file locks in ``tempfile.gettempdir()``."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture(scope="module")
def clean_shared_memory():
    """Remove shared memory left by streaming datasets of aborted runs, before and after the module."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


def write_docs(folder: Path, texts: list[str]) -> list[Path]:
    """Write one text file per document (sorted names keep the order)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc_{i:04d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def paragraphs(text: str, n: int, min_chars: int = 200) -> list[str]:
    """``n`` consecutive chunks of ``text`` of at least ``min_chars`` characters, cut at blank lines."""
    parts = [p for p in text.split("\n\n") if p.strip()]
    docs, current = [], ""
    for part in parts:
        current = f"{current}\n\n{part}" if current else part
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
        if len(docs) == n:
            break
    return docs


def sample_keys(input_ids, labels) -> list[bytes]:
    """One hashable key per sample of a batch: its full ``seq_len + 1`` token ids."""
    full = np.concatenate([input_ids.numpy(), labels.numpy()[:, -1:]], axis=1).astype(np.int32)
    return [row.tobytes() for row in full]


def read_split_samples(root: Path, split: str = "train") -> np.ndarray:
    """Every sample of a prepared split in stored order, read with streaming's shard reader (no loader, no cache)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    split_dir = Path(root) / split
    raw_dir = Path(tempfile.mkdtemp(prefix="raw-shards-"))
    rows = []
    for info in json.loads((split_dir / "index.json").read_text())["shards"]:
        zipped = (split_dir / info["zip_data"]["basename"]).read_bytes()
        (raw_dir / info["raw_data"]["basename"]).write_bytes(decompress(info["compression"], zipped))
        shard = reader_from_json(str(raw_dir), None, info)
        rows += [shard.get_item(i)["tokens"] for i in range(shard.samples)]
    return np.stack(rows) if rows else np.empty((0, 0), dtype=np.uint16)


# ----------------------------------------------------------------------- loader tests: one small dataset

SEQ = 32
N_SAMPLES = 96


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, shakespeare) -> Path:
    """96 samples of 33 tokens (one 3072-byte document), in several shards."""
    root = tmp_path_factory.mktemp("small")
    write_docs(root / "in", [shakespeare[: N_SAMPLES * SEQ]])
    cfg = PrepareConfig(out=root / "data", inputs=[str(root / "in")], seq_len=SEQ, val_fraction=0.0,
                        shard_size_mb=0.002, workers=1, quiet=True)
    prepare_dataset(cfg)
    return root / "data"


def run_ranks(path, tmp_path, tag, *, dp, batch, steps, state=None, **cfg) -> tuple[list[list[bytes]], dict]:
    """``steps`` batches on each of ``dp`` simulated ranks; returns each step's samples (all ranks) and the state."""
    from hope_scale.data.loader import build_train_loader  # imports streaming (slow): only where needed

    data_cfg = {"path": str(path), "num_workers": 0, **cfg}
    loaders = [
        build_train_loader({**data_cfg, "cache_dir": str(tmp_path / f"cache-{tag}-{r}")}, seq_len=SEQ,
                           micro_batch_size=batch, dp_rank=r, dp_world_size=dp, seed=17)
        for r in range(dp)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    steps_seen = []
    for _ in range(steps):
        step = []
        for loader in loaders:
            step += sample_keys(*next(loader))
        steps_seen.append(step)
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # every rank can save the checkpoint's data state
    for loader in loaders:
        loader.close()
    return steps_seen, states[0]


def flat(steps: list[list[bytes]]) -> list[bytes]:
    """All samples of all steps, in order."""
    return [k for step in steps for k in step]
