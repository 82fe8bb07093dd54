"""Perplexity: every token of a document predicted exactly once, under one of three context regimes.

* ``fixed``: the document is cut into non-overlapping windows of ``context_len`` tokens, each read from a
  fresh state (tokens early in a window see little context);
* ``sliding``: windows of ``context_len`` tokens advanced by ``stride``; each window scores only the
  tokens the previous one did not, so every token (after the first window) has at least
  ``context_len - stride`` tokens of context (the usual Hugging Face / lm-eval rolling evaluation);
* ``streaming``: the document is read in segments of ``context_len`` tokens with the recurrent state
  carried across segments, so the context is the whole document: for Hope/Titans the memory keeps
  learning across the document (constant memory), for attention models the KV cache grows (exact full
  attention, quadratic cost).

With ``prefix_id`` (EOS) the first token is predicted from that prefix, like lm-eval's rolling
log-likelihood, so the number of predicted tokens equals the document's token count. Results report
token-level perplexity, word-level perplexity exp(NLL / words) (words = whitespace-separated, as lm-eval's
``word_perplexity``) and bits per byte.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("fixed", "sliding", "streaming")


@dataclass
class _Window:
    doc: int
    start: int  # first input position (index into the doc's input positions)
    end: int  # one past the last input position
    score_from: int  # first input position whose prediction is scored


def _windows(n_inputs: int, doc: int, mode: str, context_len: int, stride: int) -> list[_Window]:
    if mode == "fixed":
        return [_Window(doc, a, min(a + context_len, n_inputs), a) for a in range(0, n_inputs, context_len)]
    if mode == "sliding":
        out = [_Window(doc, 0, min(context_len, n_inputs), 0)]
        while out[-1].end < n_inputs:
            end = min(out[-1].end + stride, n_inputs)
            out.append(_Window(doc, max(0, end - context_len), end, out[-1].end))
        return out
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood [B, T] (float32 log-softmax)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0]


@torch.no_grad()
def documents_nll(model, docs: Sequence[Sequence[int] | np.ndarray], mode: str = "streaming",
                  context_len: int = 512, stride: int | None = None, prefix_id: int | None = None,
                  batch_size: int = 8) -> list[np.ndarray]:
    """Per-token NLL (nats, float64) of every document; each array has one entry per predicted token.

    Independent documents are batched together (each with its own fresh memory state).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if context_len < 1:
        raise ValueError("context_len must be >= 1")
    stride = stride or max(1, context_len // 2)
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    seqs = []
    for d in docs:
        arr = np.asarray(d, dtype=np.int64)
        if prefix_id is not None:
            arr = np.concatenate([[prefix_id], arr])
        seqs.append(torch.from_numpy(arr))
    out = [np.zeros(max(0, len(s) - 1), dtype=np.float64) for s in seqs]
    device = next(model.parameters()).device

    if mode == "streaming":
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(seqs):
            if len(s) > 1:
                by_len[len(s)].append(i)
        for length, idxs in by_len.items():
            for b in range(0, len(idxs), batch_size):
                group = idxs[b:b + batch_size]
                batch = torch.stack([seqs[i] for i in group]).to(device)
                state = model.init_state(len(group))
                for a in range(0, length - 1, context_len):
                    e = min(a + context_len, length - 1)
                    logits, state = model(batch[:, a:e], state=state)
                    nll = _nll(logits, batch[:, a + 1:e + 1]).cpu().double().numpy()
                    for row, i in enumerate(group):
                        out[i][a:e] = nll[row]
        return out

    windows = [w for i, s in enumerate(seqs) for w in _windows(len(s) - 1, i, mode, context_len, stride)
               if len(s) > 1]
    by_len = defaultdict(list)
    for w in windows:
        by_len[w.end - w.start].append(w)
    for length, ws in by_len.items():
        for b in range(0, len(ws), batch_size):
            group = ws[b:b + batch_size]
            inputs = torch.stack([seqs[w.doc][w.start:w.end] for w in group]).to(device)
            targets = torch.stack([seqs[w.doc][w.start + 1:w.end + 1] for w in group]).to(device)
            nll = _nll(model(inputs), targets).cpu().double().numpy()
            for row, w in enumerate(group):
                k = w.score_from - w.start
                out[w.doc][w.score_from:w.end] = nll[row, k:]
    return out


def summarize(nll: np.ndarray | Sequence[np.ndarray], n_words: int | None = None,
              n_bytes: int | None = None) -> dict:
    """Token-level perplexity (and word-level / bits-per-byte when the counts are given)."""
    if not isinstance(nll, np.ndarray):
        nll = np.concatenate([np.asarray(x, dtype=np.float64) for x in nll]) if len(nll) else np.zeros(0)
    total = float(nll.sum())
    n = int(nll.size)
    res = {"tokens": n, "nll_sum": total, "loss": total / max(n, 1),
           "token_perplexity": math.exp(total / n) if n else float("nan")}
    if n_words:
        res["words"] = int(n_words)
        res["word_perplexity"] = math.exp(min(total / n_words, 700.0))
    if n_bytes:
        res["bytes"] = int(n_bytes)
        res["bits_per_byte"] = total / n_bytes / math.log(2)
    return res


def position_profile(nlls: Sequence[np.ndarray], n_buckets: int = 12) -> dict:
    """Mean loss by token position in the document, in log-spaced buckets (how context helps)."""
    longest = max((len(x) for x in nlls), default=0)
    if longest == 0:
        return {"bucket_start": [], "bucket_end": [], "loss": []}
    edges = np.unique(np.round(np.geomspace(1, longest + 1, n_buckets + 1)).astype(int)) - 1
    edges[-1] = longest
    starts, ends, losses = [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        vals = [x[a:b] for x in nlls if len(x) > a]
        vals = np.concatenate(vals) if vals else np.zeros(0)
        if vals.size:
            starts.append(int(a))
            ends.append(int(b))
            losses.append(float(vals.mean()))
    return {"bucket_start": starts, "bucket_end": ends, "loss": losses}


def count_words(text: str) -> int:
    return len(text.split())


def evaluate_text(model, tokenizer, text: str, mode: str = "streaming", context_len: int = 512,
                  stride: int | None = None, batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """Perplexity of one document given as text (word and byte counts come from the scored text)."""
    ids = np.asarray(tokenizer.encode_array(text), dtype=np.int64)
    if max_tokens is not None and ids.size > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids.tolist())
    nll = documents_nll(model, [ids], mode, context_len, stride, prefix_id=tokenizer.eos_id, batch_size=batch_size)
    res = summarize(nll, n_words=count_words(text), n_bytes=len(text.encode("utf-8")))
    res.update(mode=mode, context_len=context_len, stride=(stride or max(1, context_len // 2)) if mode == "sliding" else None)
    res["profile"] = position_profile(nll)
    return res


def evaluate_token_docs(model, tokenizer, docs: Sequence[np.ndarray], mode: str = "fixed", context_len: int = 512,
                        stride: int | None = None, batch_size: int = 8, prefix_id: int | None = None) -> dict:
    """Perplexity over token documents (e.g. MDS samples); word/byte counts come from decoding them."""
    nll = documents_nll(model, docs, mode, context_len, stride, prefix_id=prefix_id, batch_size=batch_size)
    words = n_bytes = 0
    for d in docs:
        text = tokenizer.decode([int(t) for t in (d if prefix_id is not None else d[1:])])
        words += count_words(text)
        n_bytes += len(text.encode("utf-8"))
    res = summarize(nll, n_words=words or None, n_bytes=n_bytes or None)
    res.update(mode=mode, context_len=context_len, documents=len(docs),
               stride=(stride or max(1, context_len // 2)) if mode == "sliding" else None)
    res["profile"] = position_profile(nll)
    return res
