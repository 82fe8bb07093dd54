"""Perplexity evaluation (hope_scale.eval.perplexity) and its text / MDS sources."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hope_scale.data.tokenizer import load_tokenizer
from hope_scale.eval.corpus import load_domain, read_documents, read_mds_split
from hope_scale.eval.perplexity import documents_nll, evaluate_text, evaluate_token_docs, summarize
from hope_scale.model import ModelConfig, build_model

TINY = dict(d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8, chunk_size_projection=16)


def tiny(arch):
    torch.manual_seed(0)
    levels = {"cms_levels": [{"period": 1, "hidden_mult": 1.0}]} if arch.startswith("hope") else {}
    return build_model(ModelConfig(arch=arch, **TINY, **levels)).eval()


def full_nll(model, ids, prefix):
    seq = torch.tensor([[prefix] + list(ids)])
    with torch.no_grad():
        logits = model(seq[:, :-1])
    return F.cross_entropy(logits[0].float(), seq[0, 1:], reduction="none").double().numpy()


class Uniform(nn.Module):
    """Assigns probability 1/V to every token: perplexity must be exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def init_state(self, b):
        return None

    def forward(self, x, state="absent"):
        logits = torch.zeros(*x.shape, self.vocab)
        return logits if state == "absent" else (logits, state)


def test_uniform_model_has_perplexity_vocab_size_in_every_mode():
    tok = load_tokenizer("byte")
    text = "to be or not to be that is the question " * 5
    for mode in ("fixed", "sliding", "streaming"):
        r = evaluate_text(Uniform(258), tok, text, mode=mode, context_len=16, stride=5)
        n = len(text.encode())
        assert r["tokens"] == n  # every token predicted exactly once (first one from EOS)
        assert r["token_perplexity"] == pytest.approx(258.0)
        assert r["word_perplexity"] == pytest.approx(math.exp(n * math.log(258) / len(text.split())))
        assert r["bits_per_byte"] == pytest.approx(math.log2(258))


def test_summarize_hand_made():
    r = summarize(np.array([0.0, 0.0, math.log(4), math.log(4)]), n_words=2, n_bytes=4)
    assert r["token_perplexity"] == pytest.approx(2.0)
    assert r["word_perplexity"] == pytest.approx(4.0)
    assert r["bits_per_byte"] == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["hope", "transformer"])
def test_modes_agree_with_the_model_when_the_window_covers_the_document(arch):
    model = tiny(arch)
    ids = np.random.default_rng(0).integers(0, 256, size=70)
    ref = full_nll(model, ids, 256)
    big = documents_nll(model, [ids], mode="fixed", context_len=128, prefix_id=256)[0]
    np.testing.assert_allclose(big, ref, rtol=1e-4, atol=1e-5)
    # streaming in segments carries the memory / KV cache: same as one pass over the whole document
    stream = documents_nll(model, [ids], mode="streaming", context_len=16, prefix_id=256)[0]
    np.testing.assert_allclose(stream, ref, rtol=1e-4, atol=1e-4)
    # fixed windows lose context at window starts; the first window is identical
    fixed = documents_nll(model, [ids], mode="fixed", context_len=16, prefix_id=256)[0]
    np.testing.assert_allclose(fixed[:16], ref[:16], rtol=1e-4, atol=1e-5)


def test_sliding_window_scores_each_token_with_its_window_context():
    model = tiny("transformer")
    ids = np.random.default_rng(1).integers(0, 256, size=50)
    ctx, stride = 16, 4
    got = documents_nll(model, [ids], mode="sliding", context_len=ctx, stride=stride, prefix_id=256)[0]
    seq = np.concatenate([[256], ids])
    # token at input position p (predicting seq[p+1]) is scored by the window ending at the first
    # multiple-of-stride end >= p+1 after the first window: recompute by hand
    expect = np.zeros(len(ids))
    end = ctx
    with torch.no_grad():
        logits = model(torch.tensor(seq[None, :ctx]))
        expect[:ctx] = F.cross_entropy(logits[0], torch.tensor(seq[1:ctx + 1]), reduction="none").numpy()
        while end < len(ids):
            new_end = min(end + stride, len(ids))
            start = new_end - ctx
            logits = model(torch.tensor(seq[None, start:new_end]))
            nll = F.cross_entropy(logits[0], torch.tensor(seq[start + 1:new_end + 1]), reduction="none").numpy()
            expect[end:new_end] = nll[end - start:]
            end = new_end
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)


def test_batching_documents_does_not_change_results():
    model = tiny("hope")
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 256, size=n) for n in (40, 40, 33, 40)]
    for mode in ("streaming", "fixed"):
        together = documents_nll(model, docs, mode=mode, context_len=16, batch_size=4)
        alone = [documents_nll(model, [d], mode=mode, context_len=16, batch_size=1)[0] for d in docs]
        assert [len(a) for a in together] == [39, 39, 32, 39]  # no prefix: the first token is context
        for a, b in zip(together, alone):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_text_sources_and_holdout(tmp_path):
    tok = load_tokenizer("byte")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first document.\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n')
    assert read_documents(str(tmp_path / "d")) == ["first document.\n", "second", "third"]
    (tmp_path / "c.txt").write_text("line one\n" * 50 + "tail line\n" * 10)
    dom = load_domain(str(tmp_path / "c.txt"), tok, holdout_fraction=0.2)
    assert dom.heldout_text.startswith("line one") or dom.heldout_text.startswith("tail")
    assert dom.train.size + dom.heldout.size == len(("line one\n" * 50 + "tail line\n" * 10).encode())
    assert dom.heldout_text.endswith("tail line\n")


def test_mds_split_roundtrip_and_perplexity(tmp_path):
    from streaming import MDSWriter

    tok = load_tokenizer("byte")
    samples = [np.asarray(tok.encode(f"sample {i:02d} text here!")[:17], dtype=np.uint16) for i in range(6)]
    with MDSWriter(out=str(tmp_path / "ds" / "val"), columns={"tokens": "ndarray:uint16"}, compression="zstd",
                   size_limit=200) as w:
        for s in samples:
            w.write({"tokens": s})
    got = read_mds_split(tmp_path / "ds", "val")
    assert [g.tolist() for g in got] == [s.tolist() for s in samples]
    r = evaluate_token_docs(Uniform(258), tok, got, mode="fixed", context_len=8)
    assert r["tokens"] == 6 * 16  # first token of each sample is context only
    assert r["token_perplexity"] == pytest.approx(258.0)
    assert r["words"] == 6 * 4  # decoded scored text "ample 0i text he"
