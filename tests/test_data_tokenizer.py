"""Tokenizers: byte-level, Hugging Face tokenizer.json (trained offline with train-tokenizer), specs, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.train_tokenizer import EOS_TOKEN, train_bpe
from hope_scale.data.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer
from tests.test_data_support import paragraphs, write_docs

REPO = Path(__file__).resolve().parents[1]
TRICKY = "Héllo, wörld! 日本語 🚀\n\ttabs  and  spaces\r\n"


def test_byte_tokenizer_ids_and_round_trip():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and load_tokenizer("byte").to_spec() == tok.to_spec()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.token_dtype) == (258, 256, 257, np.uint16)
    ids = tok.encode(TRICKY)
    assert ids == list(TRICKY.encode("utf-8"))
    assert tok.decode(ids) == TRICKY
    assert tok.decode(ids + [tok.eos_id] + ids) == TRICKY + TRICKY  # specials skipped by default
    assert tok.decode([72, tok.eos_id, 105], skip_special_tokens=False) == "H<|endoftext|>i"
    assert isinstance(load_tokenizer(tok.to_spec()), ByteTokenizer)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, shakespeare) -> Path:
    raw = train_bpe(paragraphs(shakespeare, 400), vocab_size=400)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    raw.save(str(path))
    return path


def test_trained_bpe_round_trips_and_compresses(bpe_path, shakespeare):
    tok = load_tokenizer(str(bpe_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 400 and tok.eos_id == 0 and tok.eos_token == EOS_TOKEN and tok.pad_id == 1
    sample = shakespeare[200_000:210_000]
    ids = tok.encode(sample)
    assert len(ids) < 0.6 * len(sample.encode("utf-8"))  # a real subword vocabulary, not bytes
    assert tok.decode(ids) == sample
    assert tok.decode(tok.encode(TRICKY)) == TRICKY  # byte-level: unseen characters round-trip too
    assert [a.tolist() for a in tok.encode_batch([sample, TRICKY])] == [ids, tok.encode(TRICKY)]
    assert tok.encode("") == []


def test_spec_restores_and_detects_a_changed_vocabulary(bpe_path, tmp_path, shakespeare):
    tok = load_tokenizer(str(bpe_path.parent))  # a folder holding tokenizer.json works too
    spec = json.loads(json.dumps(tok.to_spec()))  # JSON-able, as stored in checkpoints
    again = load_tokenizer(spec)
    assert again.encode(TRICKY) == tok.encode(TRICKY) and again.eos_id == tok.eos_id
    other = tmp_path / "tokenizer.json"
    train_bpe(paragraphs(shakespeare, 50), vocab_size=300).save(str(other))
    with pytest.raises(TokenizerError, match="differs from the recorded one"):
        load_tokenizer({**spec, "source": str(other)})


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid"):
        load_tokenizer(str(bad))
    from tokenizers import Tokenizer, models

    no_eos = tmp_path / "no_eos.json"
    Tokenizer(models.BPE()).save(str(no_eos))
    with pytest.raises(TokenizerError, match="end-of-text"):
        load_tokenizer(str(no_eos))


def test_hub_tokenizer_offline_gives_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "hope_scale.cli", "prepare-data", str(tmp_path), "--out", str(tmp_path / "out"),
         "--tokenizer", "some-org/some-tokenizer"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2
    assert "could not fetch tokenizer 'some-org/some-tokenizer' from the Hugging Face Hub" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_cli(tmp_path, shakespeare):
    docs = write_docs(tmp_path / "docs", paragraphs(shakespeare, 300))
    (tmp_path / "docs" / "broken.txt").write_bytes(b"caf\xe9\n")  # skipped and reported
    out = tmp_path / "tok" / "tokenizer.json"
    cmd = [sys.executable, "-m", "hope_scale.cli", "train-tokenizer", str(docs[0].parent), "--vocab-size", "320", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "vocab 320" in proc.stdout and "non_utf8 1" in proc.stdout and "broken.txt:1" in proc.stdout
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 320 and tok.decode(tok.encode(TRICKY)) == TRICKY
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # never silently replaced
