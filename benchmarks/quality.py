"""Quality benchmarks on CPU: Hope vs Titans vs Hope-Attention vs Transformer++ at equal budgets, over seeds.

    python benchmarks/quality.py --out runs/quality --shakespeare input.txt   # (a)-(d), seeds 0,1,2, both corpora
    python benchmarks/quality.py --out runs/quality --only a --seeds 0    # one section, one seed
    python benchmarks/quality.py --out runs/quality --summary             # only rebuild the tables
    python benchmarks/quality.py --out runs/smoke --scale 0.05 --seeds 0  # a quick smoke run
    python benchmarks/quality.py --out runs/quality-lr6e-3 --only a --lr 6e-3  # (a) at another peak lr
    python benchmarks/quality.py --out runs/quality-d128 --only a --d-model 128  # (a) with wider models

Every (section, corpus, seed) run writes ``<out>/<section>-<corpus>-s<seed>.json`` and is skipped when that
file exists, so runs can be split over processes (one per core) and resumed; ``<out>/summary.md`` gets the
tables with mean ± std over the seeds found.

(a) held-out perplexity at ``--seq-len`` (512) on each corpus (``shakespeare``: tinyshakespeare, ``--shakespeare``
    or the committed 210 KB head; ``builtin``: the built-in Python documentation), the last 10% held out, every model with the same parameters (within 3%),
    tokens, batch, AdamW, warm-up + cosine schedule and clipping; plus Transformer++ trained for Hope's CPU time.
    Also measured: held-out loss with the memory switched off at evaluation (eta = 0, alpha = 1: every memory
    keeps its meta-learned initial weights) and the loss by position within the context window, on and off;
(b) MQAR accuracy vs key-value pairs and sequence length (Zoology recipe, trained at T = 64);
(c) passkey NIAH accuracy at 1x, 4x and 16x the training length (``--passkey-len``, 128), 5000 steps: 128-token
    steps for the first half, then every 4th step 2 x 512 tokens (``--passkey-mix``, ``--passkey-mix-from``);
(d) continual learning (A = tinyshakespeare, B = Python documentation): forgetting and learning in continued
    training and at test time (CMS level updates only), Hope with 1, 2, 3 CMS levels vs Transformer++.

Every model is d_model 64 (``--d-model`` for (a)), 2 layers, 2 heads, byte vocabulary; torch runs on
``--threads`` threads (1 by default: on a shared 2-core machine more threads are slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hope_scale.data.tokenizer import load_tokenizer  # noqa: E402
from hope_scale.eval import plots  # noqa: E402
from hope_scale.eval.corpus import load_domain  # noqa: E402
from hope_scale.eval.perplexity import evaluate_text, evaluate_token_docs  # noqa: E402
from hope_scale.eval.results import write_json  # noqa: E402
from hope_scale.eval.trainer import (TrainConfig, Trainer, length_schedule, scheduled_niah_batches,  # noqa: E402
                                     text_batches)
from hope_scale.model import ModelConfig, build_model  # noqa: E402
from hope_scale.model.config import DEFAULT_WRITE_COST, MEMORY_ARCHITECTURES  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans  # noqa: E402
from hope_scale.train.safe_tree import save_tree  # noqa: E402

# tinyshakespeare: the 210 KB head committed for the tests unless ``--shakespeare`` names the whole file (1.1 MB,
# karpathy/char-rnn's data/tinyshakespeare/input.txt; docs/evaluation.md's tables use it). Every run records it.
SHAKESPEARE_HEAD = ROOT / "tests" / "data" / "tinyshakespeare-head.txt"
CORPORA = {"shakespeare": str(SHAKESPEARE_HEAD), "builtin": "builtin:pydoc"}
BASE = dict(d_model=64, n_layers=2, n_heads=2, chunk_size_memory=16, chunk_size_projection=64)


def lv(*items):
    return [{"period": p, "hidden_mult": m} for p, m in items]


# Equal parameters (130K within 3%): the MLP widths (CMS levels, SwiGLU) take what the sequence mixer leaves.
ARCHS = {
    "Hope": dict(arch="hope", cms_levels=lv((1, 1 / 3), (8192, 1 / 3))),
    "Titans": dict(arch="titans"),
    "Hope-Attention": dict(arch="hope_attention", cms_levels=lv((1, 1.625), (8192, 1.625))),
    "Transformer++": dict(arch="transformer", mlp_hidden_mult=3.375),
}

# Diagnostics of how each model spends its parameters (docs/evaluation.md, "(a) at 4x the steps"), run only when
# named in --models. At d_model 64 with 2 heads Hope's five projection memories hold 47% of its parameters and its
# CMS 14%; in the shipped hope-125m ... hope-1.3b they hold 4-7% and the CMS 53-68%
# (benchmarks/parameter_shares.py).
DIAGNOSTIC_ARCHS = {
    # Hope at the same 130K with half-width memories (hidden = head_dim / 2) and a CMS of hidden width 56, not 24
    "Hope-wideCMS": dict(arch="hope", mem_hidden_mult=0.5, cms_levels=lv((1, 0.875), (8192, 0.875))),
    # ... and further: quarter-width memories (hidden 8), a CMS of hidden width 72
    "Hope-widerCMS": dict(arch="hope", mem_hidden_mult=0.25, cms_levels=lv((1, 1.125), (8192, 1.125))),
    # only the projection memories at quarter width (hidden 8), the main memory at full width (32), CMS hidden 64
    "Hope-narrowProj": dict(arch="hope", proj_hidden_mult=0.25, cms_levels=lv((1, 1.0), (8192, 1.0))),
    # ... with both CMS levels stepped every optimizer step (period 1): at (a)'s 4096 tokens per step the slow
    # level (period 8192) gets half the updates of Titans' SwiGLU, as in the shipped hope-125m ... 1.3b (period
    # 2^20 at 524,288 tokens per step)
    "Hope-narrowProj-1freq": dict(arch="hope", proj_hidden_mult=0.25, cms_levels=lv((1, 1.0), (1, 1.0))),
    # Titans with Hope's feed-forward width (SwiGLU hidden 48 = Hope's two CMS levels; 81K parameters)
    "Titans-narrowFF": dict(arch="titans", mlp_hidden_mult=0.75),
}


# every section's peak learning rate (AdamW, warm-up + cosine); (a) takes another with --lr
LR = 3e-3
# (a)'s defaults: training/evaluation length (also (d)'s) and sequences per training step; results from before a
# setting was recorded were run at its default
SEQ_LEN, BATCH = 512, 8

# --write-cost: model.write_cost of the memory architectures (Hope, Titans) in every section
MEMORY_ARCH_EXTRA: dict = {}


def model_config(**extra) -> ModelConfig:
    """The benchmark's model: BASE with an architecture's fields, plus MEMORY_ARCH_EXTRA for Hope and Titans."""
    cfg = BASE | extra
    if cfg["arch"] in MEMORY_ARCHITECTURES:
        cfg |= MEMORY_ARCH_EXTRA
    return ModelConfig(**cfg)


def make(seed: int, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config(**extra))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def steps(n: int, scale: float) -> int:
    return max(2, int(round(n * scale)))


def _run_fraction(text: str, last_included: bool) -> float:
    value = float(text)
    if not (0 <= value <= 1 if last_included else 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"must be in [0, {'1]' if last_included else '1)'}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A float > 0 (an argparse type)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int > 0 (an argparse type)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def write_cost_start(text: str) -> float:
    """``--write-cost-from``: a fraction of a run's steps in [0, 1) (an argparse type)."""
    return _run_fraction(text, last_included=False)


def write_cost_ramp(text: str) -> float:
    """``--write-cost-ramp``: a fraction of a run's steps in [0, 1] (an argparse type)."""
    return _run_fraction(text, last_included=True)


def train_config(n_steps: int, lr: float, warmup_steps: int, write_cost_from: float = 0.0,
                 write_cost_ramp: float = 0.0) -> TrainConfig:
    """A training run of ``n_steps`` (no logging) whose model.write_cost starts after the fraction
    ``write_cost_from`` of its steps and rises to its full value over the fraction ``write_cost_ramp``
    (``--write-cost-from``, ``--write-cost-ramp``; schedule.write_cost_from_step, write_cost_ramp_steps)."""
    return TrainConfig(steps=n_steps, lr=lr, warmup_steps=warmup_steps, log_every=0,
                       write_cost_from_step=int(write_cost_from * n_steps),
                       write_cost_ramp_steps=int(write_cost_ramp * n_steps))


def set_memory_frozen(model: torch.nn.Module, frozen: bool) -> bool:
    """Switch the in-context memory off (eta = 0, alpha = 1) or on; False if the model has none."""
    found = False
    for m in model.modules():
        if isinstance(m, SelfModifyingTitans):
            m.memory_frozen, found = frozen, True
    return found


def window_profile(model, tok, stream: np.ndarray, seq_len: int, n_windows: int) -> dict:
    """Mean loss by position inside non-overlapping windows of ``seq_len`` tokens (log-spaced buckets)."""
    docs = [stream[i * seq_len:(i + 1) * seq_len] for i in range(min(n_windows, len(stream) // seq_len))]
    return evaluate_token_docs(model, tok, docs, mode="fixed", context_len=seq_len, batch_size=8)["profile"]


# -- (a) perplexity and memory use ---------------------------------------------------------------------------

def section_a_runs(names: str | None) -> list[tuple[str, dict, str | None]]:
    """(a)'s (label, spec, budget) runs for ``--models``: each architecture at equal steps, and Transformer++ for
    Hope's CPU time when both are chosen (budget "time")."""
    chosen = selected(names)
    runs = [(n, spec, None) for n, spec in chosen.items()]
    if {"Hope", "Transformer++"} <= set(chosen):
        runs.append(("Transformer++ (Hope's compute)", chosen["Transformer++"], "time"))
    return runs


def section_a(corpus: str, seed: int, args, tok) -> dict:
    dom = load_domain(CORPORA[corpus], tok, holdout_fraction=0.1)
    held_text = dom.heldout_text[:16384]
    seq, batch, n_steps = args.seq_len, args.batch, steps(150, args.scale)
    rows, hope_cpu = [], None

    def config(n: int) -> TrainConfig:
        return train_config(n, args.lr, 10, args.write_cost_from, args.write_cost_ramp)

    runs = section_a_runs(args.models)
    for name, spec, budget in runs:
        spec = spec | {"d_model": args.d_model}
        model, cfg = make(seed, **spec), config(n_steps)
        if budget == "time":  # as many steps as fit in Hope's CPU time, measured on a short probe run
            probe = Trainer(make(seed, **spec), text_batches(dom.train, batch, seq, seed=seed), config(10), name)
            probe.run(log=None)
            cfg = config(max(n_steps, int(hope_cpu / (probe.cpu_seconds / probe.step))))
        tr = Trainer(model, text_batches(dom.train, batch, seq, seed=seed), cfg, name).run(log=None, progress=True)
        res = tr.result(keep_history=True)
        if name == "Hope":
            hope_cpu = res["cpu_seconds"]
        row = {"model": name, "arch": spec["arch"], "parameters": model.num_parameters(), "steps": res["steps"],
               "tokens": res["tokens"], "train_cpu_seconds": res["cpu_seconds"],
               "clipped_fraction": res.get("clipped_fraction"), "final_train_loss": res["final_loss"],
               "loss_curve": res["loss_history"][:: max(1, len(res["loss_history"]) // 50)]}
        for mode in ("fixed", "streaming"):
            r = evaluate_text(model, tok, held_text, mode=mode, context_len=seq, batch_size=8)
            row[mode] = {k: r[k] for k in ("tokens", "loss", "token_perplexity", "bits_per_byte")}
        row["profile"] = window_profile(model, tok, dom.heldout, seq, 16)
        if set_memory_frozen(model, True):
            row["memory_off"] = {"loss": evaluate_text(model, tok, held_text, mode="fixed", context_len=seq,
                                                       batch_size=8)["loss"],
                                 "profile": window_profile(model, tok, dom.heldout, seq, 16)}
            set_memory_frozen(model, False)
        rows.append(row)
        log(f"(a) {corpus} s{seed} {name:32s} params {row['parameters']:7d} steps {row['steps']:4d} "
            f"cpu {row['train_cpu_seconds']:6.1f}s clipped {row['clipped_fraction'] or 0:.2f} held-out loss "
            f"{row['fixed']['loss']:.4f}" + (f" (memory off {row['memory_off']['loss']:.4f})" if "memory_off" in row else ""))
    return {"corpus": corpus, "source": CORPORA[corpus], "seed": seed, "seq_len": seq, "batch": batch, "lr": args.lr,
            "d_model": args.d_model, "rows": rows}


# -- (b) MQAR ---------------------------------------------------------------------------------------------

def section_b(corpus: str, seed: int, args, tok) -> dict:
    """MQAR at each learning rate of ``MQAR_LRS`` per architecture (the summary reports each one's best rate)."""
    from hope_scale.eval.mqar import MQARSpec, evaluate_grid, mixed_batch

    vocab, n_steps, batch = 64, steps(800, args.scale), 16
    train_specs = [MQARSpec(64, 2), MQARSpec(64, 4), MQARSpec(64, 8)]
    seq_lens, kvs = [64, 128, 256], [2, 4, 8, 16]
    models = []
    for lr in MQAR_LRS:
        for name, spec in selected(args.models).items():
            model = make(seed, vocab_size=vocab, **spec)  # as in Zoology, the model's vocabulary is the task's
            cfg = train_config(n_steps, lr, 20, args.write_cost_from, args.write_cost_ramp)
            tr = Trainer(model, lambda s: mixed_batch(train_specs, batch, vocab, seed=s + 100_003 * seed), cfg, name)
            tr.run(log=None, progress=True)
            rows = evaluate_grid(model, seq_lens, kvs, vocab, num_examples=128, seed=12345)
            models.append({"label": name, "lr": lr, "parameters": model.num_parameters(),
                           "train": tr.result(keep_history=False), "rows": rows})
            log(f"(b) s{seed} lr {lr:g} {name:16s} cpu {tr.cpu_seconds:6.1f}s  " + "  ".join(
                f"T{r['seq_len']}K{r['num_kv_pairs']}={100 * r['accuracy']:.0f}" for r in rows))
    return {"seed": seed, "vocab_size": vocab, "train_settings": [[s.seq_len, s.num_kv_pairs] for s in train_specs],
            "steps": n_steps, "batch": batch, "chance": 1 / (vocab - vocab // 2), "models": models}


MQAR_LRS = (LR,)  # the lr of every other section; add rates to sweep (the summary picks each model's best)


# -- (c) passkey NIAH -------------------------------------------------------------------------------------

# Transformer++ needs ~5000 steps of answer-only loss at 128 tokens to learn the task (85-90%); at 600 steps
# every model stays at chance, and at 256 tokens it is at 10% after 4000 steps (docs/hope-design.md §6.5)
PASSKEY_STEPS, PASSKEY_CELL = 5000, 8
# the training recipe: 128-token steps for the first half (3 of 4 seeds learned the task by then), then every 4th step
# 2 x 512 tokens (as many tokens as 8 x 128): the 128-token task alone leaves the haystack writes that pile up
# beyond the training length unconstrained (docs/hope-design.md §6.6 has the recipes compared over 4 seeds)
PASSKEY_MIX, PASSKEY_MIX_FROM = (512, 4, 2), 0.5


def selected(names: str | None) -> dict:
    """The architectures of ``ARCHS`` and ``DIAGNOSTIC_ARCHS`` named in ``names`` (comma-separated; all of
    ``ARCHS`` when None)."""
    if names is None:
        return ARCHS
    known = ARCHS | DIAGNOSTIC_ARCHS
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise SystemExit(f"--models: unknown {unknown or names!r}; choose from {', '.join(known)}")
    return {n: known[n] for n in chosen}


def passkey_recipe(args, n_steps: int) -> tuple[tuple[int, ...] | None, int]:
    """(c)'s schedule of training lengths and the step it starts at (by default half of ``n_steps``)."""
    mix_from = args.passkey_mix_from if args.passkey_mix_from is not None else int(PASSKEY_MIX_FROM * n_steps)
    return args.passkey_mix, mix_from if args.passkey_mix else 0


def save_model(model: torch.nn.Module, path: Path, run: dict) -> None:
    """A trained model for benchmarks/passkey_probe.py: its config, weights and ``run`` (how it was trained), as a
    safetensors file (loading it runs no code; tied weights are stored once per name)."""
    save_tree({"model": model.cfg.to_dict(), "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
               "run": run}, path)


def section_c(corpus: str, seed: int, args, tok) -> dict:
    from hope_scale.eval.niah import NIAHGenerator, accuracy_grid, evaluate_samples, get_task

    train_len, n_steps, batch = args.passkey_len, steps(PASSKEY_STEPS, args.scale), 8
    mix, mix_from = passkey_recipe(args, n_steps)
    lengths, depths = [train_len, 4 * train_len, 16 * train_len], [0.0, 0.25, 0.5, 0.75, 1.0]
    task = get_task("passkey", template="short", num_digits=5)
    test = NIAHGenerator(task, tok, seed=777, name="passkey").grid(lengths, depths, samples_per_cell=PASSKEY_CELL)
    models = []
    for name, spec in selected(args.models).items():
        model = make(seed, **spec)
        gen = NIAHGenerator(task, tok, seed=1 + seed, name="passkey-train")
        cfg = train_config(n_steps, LR, 20, args.write_cost_from, args.write_cost_ramp)
        tr = Trainer(model, scheduled_niah_batches(gen, batch, train_len, seed, tok.pad_id, mix, mix_from), cfg, name)
        tr.run(log=None, progress=True)
        if getattr(args, "save_models", False):
            save_model(model, Path(args.out) / f"c-{corpus}-s{seed}-{name}.safetensors",
                       {"seed": seed, "model": name, "train_length": train_len, "steps": n_steps,
                        "mixed_in": list(mix) if mix else None, "mixed_from_step": mix_from if mix else None})
        grid = accuracy_grid(evaluate_samples(model, tok, test, batch_size=4), lengths, depths)
        by_len = [float(np.mean(line)) for line in grid]
        models.append({"label": name, "parameters": model.num_parameters(), "train": tr.result(keep_history=False),
                       "accuracy": grid, "accuracy_by_length": by_len})
        log(f"(c) s{seed} {name:16s} loss {tr.result()['final_loss']:.3f}  accuracy by length "
            + "  ".join(f"{L}:{a:.0f}%" for L, a in zip(lengths, by_len)))
    return {"seed": seed, "train_length": train_len, "lengths": lengths, "depths": depths,
            "samples_per_cell": PASSKEY_CELL, "mixed_in": mix,
            "mixed_from_step": mix_from if mix else None,
            "steps": n_steps, "batch": batch, "models": models}


# -- (d) continual learning -------------------------------------------------------------------------------

# (d)'s CMS level periods; at test time Transformer++'s MLP steps as often as the fastest level
CONTINUAL_PERIODS = (1024, 4096, 16384)
CONTINUAL_STEPS_A, CONTINUAL_STEPS_B = 100, 60
# the control row: Transformer++ trained longer on A, to about Hope's loss on A after CONTINUAL_STEPS_A (forgetting
# grows with how well A was learned, so equal steps alone compare a model that learned A less)
LONGER_ON_A = 3


def continual_models(seed: int, names: str | None = None, steps_a: int = CONTINUAL_STEPS_A):
    """(d)'s model entries of the architectures ``names`` (as ``--models``; all of ``ARCHS`` when None): Hope with
    1, 2, 3 CMS levels (the CMS width split over the levels), Titans and Transformer++, all at 130K parameters
    within 3% and trained ``steps_a`` steps on A, plus Transformer++ trained LONGER_ON_A times as long on A; and,
    only when named, Hope-narrowProj with 2 levels (its projection memories at quarter width, the CMS wider) and
    Hope-narrowProj-1freq, the same with its second level at the first one's period (in training both levels step
    every optimizer step either way, a step being 4096 tokens; at test time the second level then updates as often
    as the first, not a quarter as often)."""
    from hope_scale.eval.continual import ModelEntry

    chosen, p = selected(names), CONTINUAL_PERIODS
    entries = [ModelEntry("Hope, 1 level", make(seed, arch="hope", cms_levels=lv((p[0], 2 / 3)))),
               ModelEntry("Hope, 2 levels", make(seed, arch="hope", cms_levels=lv((p[0], 1 / 3), (p[1], 1 / 3)))),
               ModelEntry("Hope, 3 levels",
                          make(seed, arch="hope", cms_levels=lv((p[0], 2 / 9), (p[1], 2 / 9), (p[2], 2 / 9)))),
               ModelEntry("Hope-narrowProj, 2 levels", make(seed, arch="hope", proj_hidden_mult=0.25,
                                                            cms_levels=lv((p[0], 1.0), (p[1], 1.0)))),
               ModelEntry("Hope-narrowProj-1freq, 2 levels", make(seed, arch="hope", proj_hidden_mult=0.25,
                                                                  cms_levels=lv((p[0], 1.0), (p[0], 1.0)))),
               ModelEntry("Titans", make(seed, **ARCHS["Titans"])),
               ModelEntry("Transformer++", make(seed, **ARCHS["Transformer++"])),
               ModelEntry(f"Transformer++, {LONGER_ON_A}x steps on A", make(seed, **ARCHS["Transformer++"]),
                          steps_a=LONGER_ON_A * steps_a)]
    return [e for e in entries if e.name.split(",")[0] in chosen]


def section_d(corpus: str, seed: int, args, tok) -> dict:
    from hope_scale.eval.continual import ContinualConfig, run_continual

    steps_a = steps(CONTINUAL_STEPS_A, args.scale)
    entries = continual_models(seed, args.models, steps_a)
    if not entries:
        raise SystemExit(f"--models: section (d) has only Hope, Hope-narrowProj, Hope-narrowProj-1freq, Titans and "
                         f"Transformer++, "
                         f"not {args.models}")
    dom_a = load_domain(CORPORA["shakespeare"], tok, 0.1, max_chars=600_000, name="shakespeare")
    dom_b = load_domain("builtin:pydoc", tok, 0.1, max_chars=600_000, name="python-docs")
    cfg = ContinualConfig(mode="both", seq_len=args.seq_len, batch_size=8, steps_a=steps_a,
                          steps_b=steps(CONTINUAL_STEPS_B, args.scale), baseline_period=CONTINUAL_PERIODS[0], lr=LR,
                          warmup_steps=10, eval_tokens=8192, eval_points=4,
                          stream_tokens=max(2048, int(32768 * min(1.0, args.scale * 2))), stream_lr=0.3,
                          stream_segment_len=args.seq_len, stream_max_grad_norm=1.0, seed=seed)
    res = run_continual(entries, dom_a, dom_b, cfg, log=log)
    res["seed"], res["source_a"] = seed, CORPORA["shakespeare"]
    return res


SECTIONS = {"a": (section_a, list(CORPORA)), "b": (section_b, ["mqar"]), "c": (section_c, ["passkey"]),
            "d": (section_d, ["shakespeare-pydoc"])}


# -- summary (mean ± std over seeds) ------------------------------------------------------------------------

def ms(values, spec: str = ".3f") -> str:
    v = [x for x in values if isinstance(x, (int, float)) and np.isfinite(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return format(v[0], spec)
    return f"{format(float(np.mean(v)), spec)} ± {format(float(np.std(v, ddof=1)), spec.lstrip('+'))}"


def load_runs(out: Path, section: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for f in sorted(out.glob(f"{section}-*-s*.json")):
        corpus = f.stem[len(section) + 1:].rsplit("-s", 1)[0]
        runs.setdefault(corpus, []).append(json.loads(f.read_text()))
    return runs


def by_model(runs: list[dict], rows: str, label: str) -> dict[str, list[dict]]:
    """Each model's rows over the runs (seeds), in first-seen order; a model may have skipped some seeds."""
    names = dict.fromkeys(r[label] for run in runs for r in run[rows])
    return {n: [r for run in runs for r in run[rows] if r[label] == n] for n in names}


def run_setting(out: Path, corpus: str, runs: list[dict], key: str, what: str, default):
    """The one value of setting ``key`` of the (a) runs of a corpus (``default`` for runs from before it was
    recorded); runs that differ in it are not averaged: each value needs its own --out."""
    values = sorted({run.get(key, default) for run in runs})
    if len(values) > 1:
        raise SystemExit(f"{out}: the (a) {corpus} runs differ in their {what} {values}; summarize each value "
                         "from its own --out")
    return values[0]


def summary(out: Path) -> str:
    lines = ["# Quality benchmark results (mean ± std over seeds)", ""]
    for corpus, runs in load_runs(out, "a").items():
        by = by_model(runs, "rows", "model")
        seq, batch, lr, width = (run_setting(out, corpus, runs, key, what, default) for key, what, default in
                                 (("seq_len", "training length", SEQ_LEN), ("batch", "sequences per step", BATCH),
                                  ("lr", "peak lr", LR), ("d_model", "d_model", BASE["d_model"])))
        lines += [f"## (a) held-out perplexity: {corpus} ({len(runs)} seeds, trained at {batch} x {seq} tokens, "
                  f"peak lr {lr:g}, d_model {width})", "",
                  "| model | params | steps | train CPU s | clipped steps | held-out loss | perplexity | "
                  "memory off: loss | streaming ppl |", "|---|---|---|---|---|---|---|---|---|"]
        for n, rs in by.items():
            off = [r["memory_off"]["loss"] for r in rs if "memory_off" in r]
            lines.append(f"| {n} | {rs[0]['parameters']} | {rs[0]['steps']} | {ms([r['train_cpu_seconds'] for r in rs], '.0f')} | "
                         f"{ms([r['clipped_fraction'] for r in rs], '.2f')} | {ms([r['fixed']['loss'] for r in rs], '.4f')} | "
                         f"{ms([r['fixed']['token_perplexity'] for r in rs], '.3f')} | {ms(off, '.4f')} | "
                         f"{ms([r['streaming']['token_perplexity'] for r in rs], '.3f')} |")
        lines.append("")
        prof = next(iter(by.values()))[0]["profile"]
        edges = [f"{a + 1}-{b}" for a, b in zip(prof["bucket_start"], prof["bucket_end"])]
        lines += [f"Loss by position in the {runs[0]['seq_len']}-token window ({corpus}, mean over seeds; 'off': "
                  "memory switched off at evaluation):", "", "| model | " + " | ".join(edges) + " |",
                  "|---" * (len(edges) + 1) + "|"]
        for n, rs in by.items():
            cols = np.mean([r["profile"]["loss"] for r in rs], axis=0)
            lines.append(f"| {n} | " + " | ".join(f"{x:.3f}" for x in cols) + " |")
            if "memory_off" in rs[0]:
                cols = np.mean([r["memory_off"]["profile"]["loss"] for r in rs], axis=0)
                lines.append(f"| {n} (off) | " + " | ".join(f"{x:.3f}" for x in cols) + " |")
        lines.append("")
    for _, runs in load_runs(out, "b").items():
        names = list(dict.fromkeys(m["label"] for m in runs[0]["models"]))
        keys = [(r["seq_len"], r["num_kv_pairs"]) for r in runs[0]["models"][0]["rows"]]

        def cells(name: str, lr: float) -> list[list[float]]:
            return [[100 * r["accuracy"] for r in next(m for m in run["models"] if m["label"] == name
                                                        and m.get("lr", lr) == lr)["rows"]] for run in runs]

        lines += [f"## (b) MQAR accuracy % ({len(runs)} seeds; vocab {runs[0]['vocab_size']}, trained on T=64 with K in "
                  f"2/4/8, {runs[0]['steps']} steps, lr {' or '.join(map(str, MQAR_LRS))}; "
                  f"chance {100 * runs[0]['chance']:.1f}%)", "",
                  "| model | lr | " + " | ".join(f"T{t} K{k}" for t, k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for n in names:
            lrs = sorted({m.get("lr") for m in runs[0]["models"] if m["label"] == n}, key=lambda x: x or 0)
            best = max(lrs, key=lambda lr: float(np.mean(cells(n, lr))))
            acc = cells(n, best)
            lines.append(f"| {n} | {best} | " + " | ".join(ms([a[i] for a in acc], ".1f") for i in range(len(keys))) + " |")
        lines.append("")
    for _, runs in load_runs(out, "c").items():
        c0 = runs[0]
        def recipe(run):  # runs from before --passkey-mix-from have no mixed_from_step: they mixed from step 0
            return {k: run.get(k) for k in ("train_length", "lengths", "steps", "batch", "mixed_in")} | {
                "mixed_from_step": run.get("mixed_from_step") or 0}

        differ = [k for k, v in recipe(c0).items() if any(recipe(run)[k] != v for run in runs)]
        if differ:
            raise SystemExit(f"{out}: the (c) runs differ in {differ}; summarize each recipe from its own --out")
        mix = c0.get("mixed_in")
        nth = f"{mix[1]}{'th' if 10 <= mix[1] % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(mix[1] % 10, 'th')}"
        mixed = (f", every {nth} step {mix[2] if len(mix) > 2 else c0['batch']} x {mix[0]} tokens"
                 + (f" from step {c0['mixed_from_step']}" if c0.get("mixed_from_step") else "") if mix else "")
        lines += [f"## (c) passkey NIAH accuracy % ({len(runs)} seeds; trained at {c0['train_length']} tokens{mixed}, "
                  f"{c0['steps']} steps)", "",
                  "| model | seeds | " + " | ".join(f"{L} ({L // c0['train_length']}x)" for L in c0["lengths"]) + " |",
                  "|---" * (len(c0["lengths"]) + 2) + "|"]
        for n, entries in by_model(runs, "models", "label").items():
            accs = [m["accuracy_by_length"] for m in entries]
            lines.append(f"| {n} | {len(accs)} | "
                         + " | ".join(ms([a[i] for a in accs], ".1f") for i in range(len(c0["lengths"]))) + " |")
        lines.append("")
    for _, runs in load_runs(out, "d").items():
        lines += [f"## (d) continual learning: shakespeare -> python-docs ({len(runs)} seeds; nats/token, forgetting = "
                  "loss on A after B - after A)", "",
                  "| model | CMS periods | steps on A | loss A after A | train: forgetting | train: learning | "
                  "test-time: forgetting | test-time: learning |", "|---" * 8 + "|"]
        for n, rs in by_model(runs, "models", "name").items():
            steps_a = rs[0].get("steps_a", runs[0]["config"]["steps_a"])
            lines.append(f"| {n} | {rs[0]['cms_periods'] or '-'} | {steps_a} | {ms([r['after_a']['loss_a'] for r in rs])} | "
                         f"{ms([r['train']['forgetting'] for r in rs], '+.3f')} | {ms([r['train']['learning'] for r in rs], '+.3f')} | "
                         f"{ms([r['test_time']['forgetting'] for r in rs], '+.4f')} | "
                         f"{ms([r['test_time']['learning'] for r in rs], '+.4f')} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def plot_losses(out: Path) -> None:
    """Training-loss curves of section (a), seed 0, one PNG per corpus."""
    for corpus, runs in load_runs(out, "a").items():
        run = min(runs, key=lambda r: r["seed"])
        curves = {r["model"]: (list(range(len(r["loss_curve"]))), r["loss_curve"]) for r in run["rows"]}
        plots.lines(curves, out / f"a_train_loss_{corpus}.png", title=f"training loss ({corpus}, seed {run['seed']})",
                    xlabel="logged point (every ~2% of the run)", ylabel="loss (nats/token)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--only", default="a,b,c,d", help="sections to run, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--corpora", default=",".join(CORPORA), help="corpora of section (a)")
    ap.add_argument("--shakespeare", default=str(SHAKESPEARE_HEAD),
                    help="tinyshakespeare text of (a) and (d) (default: the committed 210 KB head; the documented "
                         "tables use the whole 1.1 MB file)")
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN, help="training/evaluation length of (a) and (d)")
    ap.add_argument("--batch", type=positive_int, default=BATCH,
                    help=f"(a): sequences per training step (default {BATCH}; --seq-len 2048 --batch 2 keeps the "
                         "default's tokens per step and steps, so only the context length changes); recorded in every "
                         "result")
    ap.add_argument("--passkey-len", type=int, default=128, help="training length of (c)")
    ap.add_argument("--passkey-mix", type=length_schedule, default=PASSKEY_MIX, metavar="LEN:EVERY[:BATCH]|none",
                    help="(c): every EVERY-th training step uses a batch of BATCH (default: the usual 8) sequences "
                         "at LEN tokens instead (a schedule of training lengths; 512:4:2, the default, keeps the "
                         "tokens per step equal; none: every step at --passkey-len; evaluation lengths stay "
                         "1x/4x/16x of --passkey-len)")
    ap.add_argument("--passkey-mix-from", type=int, default=None, metavar="STEP",
                    help="(c): the --passkey-mix schedule starts at this step (before it, every step is at "
                         "--passkey-len: a short-to-long curriculum; default: half of the steps)")
    ap.add_argument("--save-models", action="store_true",
                    help="(c): also save every trained model as <out>/c-passkey-s<seed>-<model>.safetensors (for "
                         "benchmarks/passkey_probe.py)")
    ap.add_argument("--models", default=None, help="only these architectures, comma-separated "
                                                    f"(default: all of {', '.join(ARCHS)}; (d) has Hope and "
                                                    "Transformer++; diagnostics, only when named: "
                                                    f"{', '.join(DIAGNOSTIC_ARCHS)})")
    ap.add_argument("--lr", type=positive_float, default=LR,
                    help=f"(a): the peak learning rate of every model (default {LR:g}, the rate of every "
                         "section; a per-model sweep runs each rate into its own --out); recorded in every result")
    ap.add_argument("--d-model", type=int, default=BASE["d_model"],
                    help=f"(a): the width of every model (default {BASE['d_model']}; 2 heads, so the head width is "
                         "half of it; the architectures' widths keep their ratios to it, which keeps the parameter "
                         "counts within 4%% of each other at 128); recorded in every result")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs: 0.05)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-cost", type=float, default=None, metavar="LAMBDA",
                    help="model.write_cost of Hope and Titans: a cost LAMBDA * mean eta/eta_max on memory writes "
                         f"added to their training loss (docs/hope-design.md 6.7; default: the model's, "
                         f"{DEFAULT_WRITE_COST}; 0: off); recorded in every result")
    ap.add_argument("--write-cost-from", type=write_cost_start, default=0.0, metavar="FRACTION",
                    help="(a)-(c): the write cost starts after this fraction of each training run's steps "
                         "(schedule.write_cost_from_step; 0, the default: from the first step; 0.5: a model first "
                         "learns to write, then pays for it); recorded in every result")
    ap.add_argument("--write-cost-ramp", type=write_cost_ramp, default=0.0, metavar="FRACTION",
                    help="(a)-(c): from its start the write cost rises linearly to its full value over this "
                         "fraction of each training run's steps (schedule.write_cost_ramp_steps; 0, the default: "
                         "at once); recorded in every result")
    ap.add_argument("--summary", action="store_true", help="only rebuild summary.md from the runs in --out")
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    if not Path(args.shakespeare).is_file():
        ap.error(f"--shakespeare: no such file {args.shakespeare}")
    CORPORA["shakespeare"] = args.shakespeare
    selected(args.models)  # an unknown name is an error before any run starts
    try:  # so is a width no model can have
        model_config(**ARCHS["Titans"], d_model=args.d_model)
    except ValueError as e:
        ap.error(f"--d-model: {e}")
    try:  # a bad value is an error before any run starts; unset: the model's default
        write_cost = ModelConfig(arch="hope", write_cost=args.write_cost).write_cost
    except ValueError as e:
        ap.error(f"--write-cost: {e}")
    if args.write_cost is not None:
        MEMORY_ARCH_EXTRA["write_cost"] = args.write_cost
    for option, value in (("--write-cost-from", args.write_cost_from), ("--write-cost-ramp", args.write_cost_ramp)):
        if value and "d" in [s.strip() for s in args.only.split(",")]:
            ap.error(f"{option}: section (d) trains in two phases and does not take it; run (d) without it")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("byte")
    if not args.summary:
        for section in args.only.split(","):
            fn, names = SECTIONS[section.strip()]
            if section == "a":
                names = [c for c in args.corpora.split(",") if c]
            for seed in (int(s) for s in args.seeds.split(",")):
                for name in names:
                    path = out / f"{section}-{name}-s{seed}.json"
                    if path.exists():
                        log(f"{path} exists, skipped")
                        continue
                    t0 = time.perf_counter()
                    write_json(path, {**fn(name, seed, args, tok), "write_cost": write_cost,
                                      "write_cost_from": args.write_cost_from,
                                      "write_cost_ramp": args.write_cost_ramp})
                    log(f"({section}) {name} seed {seed} took {time.perf_counter() - t0:.0f}s")
        plot_losses(out)
    print(summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
