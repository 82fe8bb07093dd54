"""Decoding helpers shared by NIAH, the lm-eval adapter and ``hope-scale generate``.

Requests are batched with one memory state per sample (``model.init_state(B)``), so K prompts in a batch
are K independent memories. The recurrent state keeps a single position counter per batch, so only
prompts of the same token length share a batch; ``greedy_generate`` groups them that way.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

from hope_scale.model.lm import sample_next


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
                    eos_id: int | None = None,
                    is_done: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations of every prompt (token lists, each non-empty).

    Generation of a sample stops at ``eos_id`` (not included) or when ``is_done(index, tokens_so_far)``
    is true; a batch stops when all its samples have stopped or ``max_new_tokens`` are produced.
    """
    results: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. EOS)")
        by_len[len(p)].append(i)
    device = next(model.parameters()).device
    for _, idxs in sorted(by_len.items()):
        for b in range(0, len(idxs), batch_size):
            group = idxs[b:b + batch_size]
            x = torch.tensor([list(prompts[i]) for i in group], dtype=torch.long, device=device)
            state = model.init_state(len(group))
            logits, state = model(x, state=state)
            logits = logits[:, -1]
            done = [False] * len(group)
            for _step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                for row, i in enumerate(group):
                    if done[row]:
                        continue
                    tok = int(nxt[row])
                    if eos_id is not None and tok == eos_id:
                        done[row] = True
                        continue
                    results[i].append(tok)
                    if is_done is not None and is_done(i, results[i]):
                        done[row] = True
                if all(done):
                    break
                logits, state = model.step(nxt, state)
    return results


class StreamDecoder:
    """Turns a growing list of token ids into text increments without splitting multi-byte characters."""

    def __init__(self, tokenizer, prefix_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix_ids)
        self.emitted = tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
            return ""
        if not text.startswith(self.emitted):  # a tokenizer that re-normalizes: emit the difference at the end
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            piece = text[common:]
        else:
            piece = text[len(self.emitted):]
        self.emitted = text
        return piece


@torch.no_grad()
def sample(model, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           seed: int | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """Sample one continuation (uses ``LanguageModel.generate``); ``on_token`` sees each new id."""
    device = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    callback = None if on_token is None else (lambda t: on_token(int(t[0])))
    out = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                         generator=gen, on_token=callback)
    new = out[0, len(prompt_ids):].tolist()
    if eos_id is not None and new and new[-1] == eos_id:
        new = new[:-1]
    return new


__all__ = ["greedy_generate", "StreamDecoder", "sample", "sample_next"]
