"""Packing: cut a stream of token ids into fixed-length training samples.

Documents arrive as ``ids + [EOS]`` and are concatenated. Sample ``i`` holds stream tokens
``[i * seq_len, i * seq_len + seq_len + 1)``: ``seq_len + 1`` tokens, so that ``input_ids = s[:-1]`` and
``labels = s[1:]``. Consecutive samples share one token (the last of one is the first of the next),
as in Megatron's GPT dataset, so every token after the first is a label exactly once. The tail that
does not fill a whole sample is dropped (and counted).
"""

from __future__ import annotations

import numpy as np


class Packer:
    """Accumulates token chunks and returns every complete sample as rows of a ``[n, seq_len + 1]`` array."""

    def __init__(self, seq_len: int, dtype: np.dtype):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.tokens_in = 0
        self.samples_out = 0
        self._buf = np.empty(0, dtype=self.dtype)

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens``; return the samples completed by them (possibly zero rows)."""
        self.tokens_in += len(tokens)
        buf = np.concatenate([self._buf, tokens.astype(self.dtype, copy=False)])
        n = max(0, (len(buf) - 1) // self.seq_len)
        if n == 0:
            self._buf = buf
            return np.empty((0, self.seq_len + 1), dtype=self.dtype)
        windows = np.lib.stride_tricks.sliding_window_view(buf, self.seq_len + 1)[:: self.seq_len][:n]
        samples = np.ascontiguousarray(windows)
        self._buf = buf[n * self.seq_len :].copy()  # keeps the shared token
        self.samples_out += n
        return samples

    @property
    def leftover_tokens(self) -> int:
        """Tokens of the stream so far that are in no sample (the current tail)."""
        return len(self._buf) - (1 if self.samples_out else 0)
