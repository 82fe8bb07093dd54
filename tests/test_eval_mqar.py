"""Multi-query associative recall generator and accuracy (hope_scale.eval.mqar)."""

import pytest
import torch
from torch import nn

from hope_scale.eval.mqar import MQARSpec, evaluate_grid, generate_mqar, mixed_batch, mqar_accuracy


def test_deterministic_given_seed():
    a = generate_mqar(16, 64, 8, 128, seed=1)
    b = generate_mqar(16, 64, 8, 128, seed=1)
    c = generate_mqar(16, 64, 8, 128, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("seq_len,k", [(64, 4), (64, 16), (128, 8), (256, 32)])
def test_sequences_are_what_they_claim(seq_len, k):
    vocab = 256
    x, y = generate_mqar(32, seq_len, k, vocab, seed=seq_len + k)
    assert x.shape == y.shape == (32, seq_len)
    for row in range(32):
        keys, values = x[row, 0:2 * k:2].tolist(), x[row, 1:2 * k:2].tolist()
        assert len(set(keys)) == k and len(set(values)) == k  # distinct keys and values
        assert all(1 <= key < vocab // 2 for key in keys)  # keys: lower half
        assert all(vocab // 2 <= v < vocab for v in values)  # values: upper half
        pos = (y[row] != -100).nonzero().flatten().tolist()
        assert len(pos) == k  # every key asked exactly once
        assert all(p >= 2 * k and (p - 2 * k) % 2 == 0 for p in pos)  # queries after the pairs, even slots
        pairs = dict(zip(keys, values))
        asked = [int(x[row, p]) for p in pos]
        assert sorted(asked) == sorted(keys)
        assert all(int(y[row, p]) == pairs[int(x[row, p])] for p in pos)  # label = the key's value


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError):
        generate_mqar(4, 64, 17, 256, seed=0)  # 4K > T
    with pytest.raises(ValueError):
        generate_mqar(4, 63, 4, 256, seed=0)  # odd length
    with pytest.raises(ValueError):
        generate_mqar(4, 64, 8, 12, seed=0)  # vocabulary too small


class RecallOracle(nn.Module):
    """Reads the pair list at the start of its input and answers each query from it (or deliberately wrong)."""

    def __init__(self, k: int, vocab: int, wrong: bool = False):
        super().__init__()
        self.k, self.vocab, self.wrong = k, vocab, wrong
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        for b in range(x.shape[0]):
            pairs = dict(zip(x[b, 0:2 * self.k:2].tolist(), x[b, 1:2 * self.k:2].tolist()))
            for t in range(2 * self.k, x.shape[1]):
                v = pairs.get(int(x[b, t]))
                if v is not None:
                    if self.wrong:
                        v = self.vocab // 2 + (v - self.vocab // 2 + 1) % (self.vocab - self.vocab // 2)
                    logits[b, t, v] = 1.0
        return logits


def test_accuracy_is_100_for_an_oracle_and_0_for_a_wrong_one():
    x, y = generate_mqar(20, 64, 8, 128, seed=3)
    right = mqar_accuracy(RecallOracle(8, 128), x, y, batch_size=7)
    wrong = mqar_accuracy(RecallOracle(8, 128, wrong=True), x, y, batch_size=7)
    assert right["accuracy"] == 1.0 and right["sequence_accuracy"] == 1.0 and right["queries"] == 160
    assert wrong["accuracy"] == 0.0 and wrong["sequence_accuracy"] == 0.0


def test_grid_skips_impossible_settings_and_mixed_batches_pad_after_queries():
    rows = evaluate_grid(RecallOracle(4, 128), [32, 64], [4, 16], 128, num_examples=4, seed=0)
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in rows] == [(32, 4), (64, 4), (64, 16)]
    assert rows[0]["accuracy"] == 1.0 and rows[1]["accuracy"] == 1.0
    x, y = mixed_batch([MQARSpec(32, 4), MQARSpec(64, 8)], 12, 128, seed=0)
    assert x.shape == y.shape == (12, 64)
    short = [(y[i] != -100).sum().item() == 4 for i in range(12)]
    assert any(short) and not all(short)
    for i in range(12):
        if short[i]:
            assert (y[i, 32:] == -100).all()
