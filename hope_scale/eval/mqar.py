"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al., 2023).

A sequence starts with ``K`` key-value pairs, then every key is queried once later in the sequence::

    inputs:  k1 v1 k2 v2 ... kK vK  x  x  k2  x  x  x  k1  x ...
    labels:  -   -  -  -      -  -  -  -  v2  -  -  -  v1  - ...      (- = -100, ignored)

At the position of a queried key the model must predict that key's value (the token that followed it in
the pair list). As in Zoology: keys are drawn without replacement from the lower half of the vocabulary
(ids 1 .. V/2-1), values from the upper half (V/2 .. V-1); queries sit at even offsets of the query region
whose distance from its start follows a power law (``power_a`` < 1 favours short gaps, 1.0 is uniform); filler positions hold random tokens of the whole vocabulary
(``random_non_queries``) or 0. Accuracy is measured on query positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch


@dataclass(frozen=True)
class MQARSpec:
    seq_len: int
    num_kv_pairs: int

    @property
    def name(self) -> str:
        return f"T{self.seq_len}-K{self.num_kv_pairs}"


def check_spec(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    if num_kv_pairs < 1:
        raise ValueError("num_kv_pairs must be >= 1")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for {num_kv_pairs} pairs and their queries "
                         f"(needs >= {4 * num_kv_pairs})")
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size} has too few keys/values for {num_kv_pairs} distinct pairs")


def generate_mqar(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int,
                  power_a: float = 0.01, random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_examples`` MQAR sequences -> (inputs [N, seq_len] int64, labels [N, seq_len] with -100)."""
    check_spec(seq_len, num_kv_pairs, vocab_size)
    rng = np.random.default_rng(seed)
    n, k = num_examples, num_kv_pairs
    half = vocab_size // 2
    # distinct keys and values per example: argsort of random numbers = a random permutation per row
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :k] + 1
    values = np.argsort(rng.random((n, vocab_size - half)), axis=1)[:, :k] + half
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:2 * k:2] = keys
    inputs[:, 1:2 * k:2] = values
    labels = np.full((n, seq_len), -100, dtype=np.int64)

    # query slots: even offsets of the region after the pairs, gaps drawn from a power law
    slots = (seq_len - 2 * k) // 2
    p = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    p /= p.sum()
    for i in range(n):
        gaps = rng.choice(slots, size=k, replace=False, p=p)
        pos = 2 * k + 2 * gaps
        inputs[i, pos] = keys[i]
        labels[i, pos] = values[i]
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def mixed_batch(specs: Iterable[MQARSpec], batch_size: int, vocab_size: int, seed: int,
                power_a: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch drawn from several (seq_len, K) settings, right-padded to the longest with
    random tokens and label -100 (padding sits after every query, so causal models ignore it)."""
    specs = list(specs)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(specs), size=batch_size)
    t_max = max(s.seq_len for s in specs)
    inputs = torch.from_numpy(rng.integers(0, vocab_size, size=(batch_size, t_max)))
    labels = torch.full((batch_size, t_max), -100, dtype=torch.int64)
    for j, spec in enumerate(specs):
        rows = np.flatnonzero(which == j)
        if rows.size:
            x, y = generate_mqar(rows.size, spec.seq_len, spec.num_kv_pairs, vocab_size,
                                 seed=int(rng.integers(2**31)), power_a=power_a)
            inputs[rows, :spec.seq_len] = x
            labels[rows, :spec.seq_len] = y
    return inputs, labels


@torch.no_grad()
def mqar_accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> dict:
    """Query-position accuracy (argmax == value) and the fraction of sequences with every query right."""
    correct = total = seqs_ok = 0
    device = next(model.parameters()).device
    for a in range(0, inputs.shape[0], batch_size):
        x, y = inputs[a:a + batch_size].to(device), labels[a:a + batch_size].to(device)
        pred = model(x).argmax(-1)
        mask = y != -100
        hit = (pred == y) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        seqs_ok += int((hit.sum(1) == mask.sum(1)).sum())
    return {"accuracy": correct / max(total, 1), "sequence_accuracy": seqs_ok / max(inputs.shape[0], 1),
            "queries": total, "sequences": int(inputs.shape[0])}


def evaluate_grid(model, seq_lens: Iterable[int], kv_pairs: Iterable[int], vocab_size: int, num_examples: int,
                  seed: int, batch_size: int = 64, power_a: float = 0.01) -> list[dict]:
    """Accuracy for every valid (seq_len, K) combination (invalid ones, K > seq_len/4, are skipped)."""
    rows = []
    for t in seq_lens:
        for k in kv_pairs:
            if 4 * k > t:
                continue
            x, y = generate_mqar(num_examples, t, k, vocab_size, seed=seed + 7919 * t + k, power_a=power_a)
            rows.append({"seq_len": t, "num_kv_pairs": k, **mqar_accuracy(model, x, y, batch_size)})
    return rows
