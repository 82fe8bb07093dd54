"""Continual-learning benchmark: learn domain A, then domain B; measure forgetting of A and learning of B.

Two regimes, run on every model under identical budgets (same tokens, batch, sequence length, learning
rates, evaluation windows):

* ``train`` (continued pretraining): AdamW on A for ``steps_a`` steps, then a fresh AdamW on B for
  ``steps_b`` steps (Hope archs keep their CMS schedule: a level is stepped only when its period of
  tokens has elapsed, with the mean gradient of that period).
* ``test-time`` (deployment): the model trained on A reads a stream of B and keeps learning only through
  CMS level updates at their periods (``CMSStreamLearner``: theta_l <- theta_l - lr * mean gradient of the
  next-token loss over the period; no optimizer state; the sequence-mixer memory is carried along the
  stream, read in segments of ``stream_segment_len`` tokens with the gradient truncated between segments).
  ``trainable_levels`` says which levels may change. Models without CMS (Transformer++, Titans)
  get the same rule on their MLPs as a single level with period ``baseline_period``, so "what the model
  may change at test time, and how often" is the only difference.

Reported per model: held-out loss / perplexity on A and B after A and after B, forgetting (loss on A after
B minus after A, nats/token) and learning (loss on B after A minus after B), and curves during phase B.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from hope_scale.model.cms import CMSStreamLearner, cms_level_parameters, cms_level_periods
from hope_scale.model.layers import SwiGLU

from .corpus import TokenDomain
from .perplexity import documents_nll
from .trainer import Trainer, TrainConfig, text_batches

MODES = ("train", "test-time", "both")


class ClippedStreamLearner(CMSStreamLearner):
    """``CMSStreamLearner`` whose per-segment gradient (all trainable levels together) is clipped to
    ``max_grad_norm`` before it is accumulated, the same safeguard as gradient clipping in training.

    Reading long streams, a Hope model occasionally produces gradients 10^3-10^4 times larger than usual
    (see docs/evaluation.md); one such segment makes an unclipped SGD update destroy the model. The update
    rule is otherwise unchanged: theta_l <- theta_l - lr * mean over the period of the (clipped) gradients."""

    def __init__(self, *args, max_grad_norm: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.clipped_segments = 0

    def _accumulate_and_update(self, grads, n_tokens: int) -> None:
        if self.max_grad_norm and grads:
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            if norm > self.max_grad_norm:
                grads = [g * (self.max_grad_norm / (norm + 1e-6)) for g in grads]
                self.clipped_segments += 1
        super()._accumulate_and_update(grads, n_tokens)


class MLPStreamLearner(ClippedStreamLearner):
    """The CMS test-time rule applied to a model without CMS: its per-block SwiGLU MLPs (the Transformer++
    and Titans FFNs) form a single level with period ``period``. Same feed/update code as
    ``CMSStreamLearner``; only which parameters form the level differs."""

    def __init__(self, model: nn.Module, lr: float, period: int, segment_len: int | None = None,
                 max_grad_norm: float | None = None):
        mlp_params = [p for m in model.modules() if isinstance(m, SwiGLU) for p in m.parameters()]
        if not mlp_params:
            raise ValueError("model has no SwiGLU MLPs to learn at test time")
        super().__init__(model, lr=lr, segment_len=segment_len, levels={0: (mlp_params, period)},
                         max_grad_norm=max_grad_norm)


def stream_learner(model: nn.Module, lr: float, trainable_levels: Iterable[int] | None,
                   baseline_period: int, segment_len: int | None = None,
                   max_grad_norm: float | None = None) -> CMSStreamLearner:
    """The CMS stream learner for models with CMS levels, MLPStreamLearner for the others (both with the
    optional per-segment gradient clipping of ``ClippedStreamLearner``)."""
    if cms_level_parameters(model):
        levels = None if trainable_levels is None else [i for i in trainable_levels if i in cms_level_parameters(model)]
        return ClippedStreamLearner(model, lr=lr, trainable_levels=levels, segment_len=segment_len,
                                    max_grad_norm=max_grad_norm)
    return MLPStreamLearner(model, lr=lr, period=baseline_period, segment_len=segment_len,
                            max_grad_norm=max_grad_norm)


@dataclass
class ContinualConfig:
    mode: str = "both"
    seq_len: int = 128
    batch_size: int = 8
    steps_a: int = 200  # 0: the models are already trained on A (loaded checkpoints)
    steps_b: int = 200
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_tokens: int = 8192  # held-out tokens of each domain per evaluation
    eval_points: int = 4  # evaluations during phase B / the stream (forgetting curves)
    stream_tokens: int = 16384  # test-time: tokens of B read by the stream learner
    stream_lr: float = 0.3
    stream_max_grad_norm: float | None = 1.0  # test-time: clip each segment's gradient (None/0: no clipping)
    stream_segment_len: int | None = None  # test-time: tokens per forward/backward (truncated backprop); None =
    # the smallest trainable period. Keep it near the training length: gradients through Hope's memory grow
    # quickly with the backprop length (see docs/evaluation.md)
    trainable_levels: list[int] | None = None  # test-time: CMS levels that may change (None = all)
    baseline_period: int | None = None  # test-time period of baseline MLPs (None: the smallest trainable CMS period)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelEntry:
    name: str
    model: nn.Module
    info: dict = field(default_factory=dict)
    steps_a: int | None = None  # this model's phase-A steps (None: the config's ``steps_a``); a control trained
    # longer on A shows how forgetting depends on how well A was learned


def heldout_loss(model: nn.Module, domain: TokenDomain, tokens: int, context_len: int, batch_size: int = 8) -> float:
    """Mean next-token loss on the first ``tokens`` held-out tokens, non-overlapping windows of
    ``context_len`` read from a fresh memory state (what the weights know, not the in-context memory)."""
    ids = domain.heldout[:tokens]
    n = (ids.size // (context_len + 1)) * (context_len + 1)
    if n == 0:
        raise ValueError(f"{domain.name}: fewer than {context_len + 1} held-out tokens")
    docs = list(ids[:n].reshape(-1, context_len + 1))
    nll = documents_nll(model, docs, mode="fixed", context_len=context_len, batch_size=batch_size)
    return float(np.concatenate(nll).mean())


def _levels_info(model: nn.Module) -> dict:
    periods = cms_level_periods(model)
    return {"cms_levels": len(periods), "cms_periods": [periods[i] for i in sorted(periods)]}


def run_continual(entries: list[ModelEntry], domain_a: TokenDomain, domain_b: TokenDomain, cfg: ContinualConfig,
                  log: Callable[[str], None] | None = print,
                  on_phase_end: Callable[[str, str, nn.Module], None] | None = None) -> dict:
    """Run the benchmark on every model entry; returns a JSON-able result dict."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode {cfg.mode!r} is not one of {MODES}")
    log = log or (lambda _m: None)
    ctx = cfg.seq_len

    def evaluate(model) -> dict:
        la = heldout_loss(model, domain_a, cfg.eval_tokens, ctx, cfg.batch_size)
        lb = heldout_loss(model, domain_b, cfg.eval_tokens, ctx, cfg.batch_size)
        return {"loss_a": la, "loss_b": lb, "ppl_a": math.exp(la), "ppl_b": math.exp(lb)}

    def summary(before: dict, after: dict) -> dict:
        return {"forgetting": after["loss_a"] - before["loss_a"], "learning": before["loss_b"] - after["loss_b"],
                "ppl_a_ratio": after["ppl_a"] / before["ppl_a"]}

    trainable_periods = []
    for e in entries:
        periods = cms_level_periods(e.model)
        levels = sorted(periods) if cfg.trainable_levels is None else [i for i in cfg.trainable_levels if i in periods]
        trainable_periods += [periods[i] for i in levels]
    baseline_period = cfg.baseline_period or (min(trainable_periods) if trainable_periods else ctx)

    results = []
    for k, e in enumerate(entries):
        row: dict = {"name": e.name, "parameters": sum(p.numel() for p in e.model.parameters()),
                     **_levels_info(e.model), **e.info}
        seed = cfg.seed * 1000 + 17
        model = e.model
        steps_a = row["steps_a"] = cfg.steps_a if e.steps_a is None else e.steps_a
        if steps_a > 0:
            log(f"[continual] {e.name}: phase A ({domain_a.name}), {steps_a} steps")
            tcfg = TrainConfig(steps=steps_a, lr=cfg.lr, warmup_steps=cfg.warmup_steps, log_every=0)
            trainer = Trainer(model, text_batches(domain_a.train, cfg.batch_size, ctx, seed), tcfg, e.name)
            row["phase_a_train"] = trainer.run(log=None).result(keep_history=False)
            if on_phase_end:
                on_phase_end(e.name, "after_a", model)
        row["after_a"] = evaluate(model)
        log(f"[continual] {e.name}: after A  loss_a {row['after_a']['loss_a']:.4f}  loss_b {row['after_a']['loss_b']:.4f}")

        if cfg.mode in ("train", "both"):
            m = copy.deepcopy(model) if cfg.mode == "both" else model
            curve = [{"tokens_b": 0, **row["after_a"]}]
            per = max(1, cfg.steps_b // max(1, cfg.eval_points))
            tcfg = TrainConfig(steps=cfg.steps_b, lr=cfg.lr, warmup_steps=cfg.warmup_steps, log_every=0)
            trainer = Trainer(m, text_batches(domain_b.train, cfg.batch_size, ctx, seed + 1), tcfg, e.name)
            while trainer.step < cfg.steps_b:  # one lr schedule over phase B, evaluated in between
                trainer.run(per, log=None)
                curve.append({"tokens_b": trainer.tokens, **evaluate(m)})
            after = curve[-1]
            row["train"] = {"after_b": {k2: v for k2, v in after.items() if k2 != "tokens_b"}, "curve": curve,
                            "phase_b_train": trainer.result(keep_history=False), **summary(row["after_a"], after)}
            log(f"[continual] {e.name}: train on B  forgetting {row['train']['forgetting']:+.4f}  "
                f"learning {row['train']['learning']:+.4f}")
            if on_phase_end:
                on_phase_end(e.name, "after_b_train", m)

        if cfg.mode in ("test-time", "both"):
            m = copy.deepcopy(model) if cfg.mode == "both" else model
            learner = stream_learner(m, cfg.stream_lr, cfg.trainable_levels, baseline_period, cfg.stream_segment_len,
                                     cfg.stream_max_grad_norm)
            stream = torch.from_numpy(domain_b.train[: cfg.stream_tokens + 1]).long()[None]
            curve = [{"tokens_b": 0, **row["after_a"]}]
            piece = max(learner.segment_len, (cfg.stream_tokens // max(1, cfg.eval_points))
                        // learner.segment_len * learner.segment_len)
            stream_losses, t0 = [], time.perf_counter()
            for a in range(0, stream.shape[1] - 1, piece):
                stream_losses.append(learner.feed(stream[:, a:a + piece + 1]))
                curve.append({"tokens_b": min(a + piece, stream.shape[1] - 1), "stream_loss": stream_losses[-1],
                              **evaluate(m)})
            after = curve[-1]
            row["test_time"] = {
                "after_b": {k2: after[k2] for k2 in ("loss_a", "loss_b", "ppl_a", "ppl_b")}, "curve": curve,
                "learner": type(learner).__name__, "segment_len": learner.segment_len,
                "trainable_levels": list(learner.trainable),
                "trainable_periods": [learner.periods[i] for i in learner.trainable],
                "updates": {str(i): n for i, n in learner.updates.items()},
                "clipped_segments": learner.clipped_segments,
                "seconds": time.perf_counter() - t0, **summary(row["after_a"], after)}
            log(f"[continual] {e.name}: test-time on B  forgetting {row['test_time']['forgetting']:+.4f}  "
                f"learning {row['test_time']['learning']:+.4f}  updates {row['test_time']['updates']}")
            if on_phase_end:
                on_phase_end(e.name, "after_b_test_time", m)
        results.append(row)
    return {"config": cfg.to_dict(), "baseline_period": baseline_period, "domain_a": domain_a.describe(),
            "domain_b": domain_b.describe(), "models": results}
