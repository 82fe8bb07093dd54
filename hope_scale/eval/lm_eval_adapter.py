"""lm-evaluation-harness adapter: ``--model hope-scale`` / ``HopeScaleLM`` for our checkpoints.

Every request is scored from a fresh memory state (``model.init_state``): a Hope/Titans memory never
carries over from one request to the next. Requests are batched with one state per sample; for
log-likelihoods a batch is right-padded (causal models never see the padding of a position that is
scored), for generation only prompts of equal token length share a batch.

``loglikelihood_rolling`` (perplexity tasks such as ``wikitext``):

* ``rolling="streaming"``: the whole document is read with the memory carried across segments of
  ``max_length`` tokens (Hope/Titans: constant memory, unbounded context; attention: a growing KV cache);
* ``rolling="fixed"``: lm-eval's standard disjoint windows of ``max_length`` tokens;
* ``rolling="auto"`` (default): streaming for hope/titans, fixed for the attention architectures.

Use it through ``hope-scale eval lm-eval`` (which imports this module, registering the model), or
programmatically: ``lm_eval.simple_evaluate(model=HopeScaleLM(checkpoint=...), tasks=[...])``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from hope_scale.model.config import MEMORY_ARCHITECTURES

from .checkpoint_io import load_checkpoint
from .generation import greedy_generate
from .perplexity import documents_nll

RECURRENT_ARCHS = MEMORY_ARCHITECTURES


@register_model("hope-scale")
class HopeScaleLM(LM):
    def __init__(self, checkpoint: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | str | None = None, rolling: str = "auto", device: str = "cpu",
                 dtype: str | None = None, **kwargs: Any):
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown hope-scale model_args: {sorted(kwargs)}")
        if checkpoint is not None:
            loaded = load_checkpoint(checkpoint, device=device,
                                     dtype=getattr(torch, dtype) if isinstance(dtype, str) and dtype else None)
            model, tokenizer = loaded.model, loaded.tokenizer
        if model is None or tokenizer is None:
            raise ValueError("give checkpoint=PATH, or both model= and tokenizer=")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length) if max_length not in (None, "", "None") else None
        arch = getattr(model.cfg, "arch", "transformer")
        if rolling == "auto":
            rolling = "streaming" if arch in RECURRENT_ARCHS else "fixed"
        if rolling not in ("streaming", "fixed"):
            raise ValueError(f"rolling must be auto, streaming or fixed, got {rolling!r}")
        self.rolling = rolling
        self._device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    @property
    def window(self) -> int:
        return self.max_length or int(getattr(self.model.cfg, "max_seq_len", 2048))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation; trailing context spaces move to the continuation and
        the pair is encoded jointly so the split matches how the whole string tokenizes."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tokenizer.encode(continuation)
        if not ctx:
            ctx = [self.eot_token_id]
        return ctx, cont

    # -- lm-eval API ---------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        results = self._score_pairs(pairs)
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    @torch.no_grad()
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces it."""
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                items.append((i, [], 0, 0))
                continue
            tokens = ctx + cont
            inputs = tokens[:-1]
            first = len(ctx) - 1  # input position whose prediction is the first continuation token
            if self.max_length and len(inputs) > self.max_length:
                cut = len(inputs) - self.max_length
                inputs, first = inputs[cut:], max(0, first - cut)
            items.append((i, inputs, first, len(cont)))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted((it for it in items if it[1]), key=lambda it: -len(it[1]))
        for b in range(0, len(order), self.batch_size):
            group = order[b:b + self.batch_size]
            t_max = len(group[0][1])
            x = torch.full((len(group), t_max), self.pad_id, dtype=torch.long)
            for row, (_, inputs, _, _) in enumerate(group):
                x[row, :len(inputs)] = torch.tensor(inputs)
            logp = F.log_softmax(self.model(x.to(self._device)).float(), dim=-1)
            for row, (i, inputs, first, n_cont) in enumerate(group):
                cont = torch.tensor(pairs[i][1][-n_cont:], device=logp.device)
                lp = logp[row, first:first + n_cont]
                out[i] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for r in requests:
            (text,) = r.args[:1]
            ids = self.tokenizer.encode(text)
            if not ids:
                results.append(0.0)
                continue
            nll = documents_nll(self.model, [ids], mode=self.rolling, context_len=self.window,
                                prefix_id=self.eot_token_id, batch_size=self.batch_size)[0]
            ll = -float(nll.sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            results.append(ll)
        return results

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for idxs in groups.values():
            gen_kwargs = dict(requests[idxs[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(gen_kwargs.pop("max_gen_toks", 256))
            prompts = []
            for i in idxs:
                ids = self.tokenizer.encode(requests[i].args[0]) or [self.eot_token_id]
                if self.max_length and len(ids) > self.max_length - max_gen:
                    ids = ids[-max(1, self.max_length - max_gen):]
                prompts.append(ids)

            def done(j: int, toks: list[int]) -> bool:
                text = self.tokenizer.decode(toks)
                return any(u in text for u in until)

            local = {i: j for j, i in enumerate(idxs)}
            gens = greedy_generate(self.model, prompts, max_gen, batch_size=self.batch_size,
                                   eos_id=self.eot_token_id, is_done=lambda j, toks: done(j, toks))
            for i in idxs:
                text = self.tokenizer.decode(gens[local[i]])
                for u in until:
                    if u and u in text:
                        text = text[:text.index(u)]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
