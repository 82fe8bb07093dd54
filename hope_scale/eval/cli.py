"""``hope-scale eval <task> --checkpoint PATH [options]``: perplexity, niah, mqar, continual, lm-eval.

Every task writes a JSON result file (``--out``, default ``runs/eval/<task>-<time>.json``) and, where a
picture helps, a PNG next to it (``--plot`` to choose the path, ``--no-plot`` to skip).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

TASK_HELP = {
    "perplexity": "token/word-level perplexity of a text source or MDS split (fixed, sliding or streaming context)",
    "niah": "RULER-style needle-in-a-haystack accuracy per (length, depth), with a heat map",
    "mqar": "multi-query associative recall accuracy vs key-value pairs and sequence length",
    "continual": "continual learning: domain A then B, forgetting/learning, test-time CMS updates",
    "lm-eval": "lm-evaluation-harness tasks through the hope-scale adapter",
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, checkpoint_required: bool = True, multiple: bool = False) -> None:
    if multiple:
        p.add_argument("--checkpoint", action="append", default=[], required=checkpoint_required,
                       help="checkpoint file or folder (repeat to compare several models)")
    else:
        p.add_argument("--checkpoint", required=checkpoint_required, help="checkpoint file or folder")
    p.add_argument("--out", help="JSON result file (default runs/eval/<task>-<time>.json)")
    p.add_argument("--plot", help="PNG file (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write a plot")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    p = sub.add_parser("perplexity", help=TASK_HELP["perplexity"], description=TASK_HELP["perplexity"])
    _common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text file, folder, .jsonl, or builtin[:pydoc|:stdlib]")
    src.add_argument("--mds", help="prepared dataset folder (MDS shards, see hope_scale.data.manifest)")
    p.add_argument("--split", default="val", help="MDS split (default val)")
    p.add_argument("--max-samples", type=int, default=None, help="MDS: at most this many samples")
    p.add_argument("--concat", action="store_true", help="MDS: treat the split as one stream, not independent samples")
    p.add_argument("--mode", default="streaming", choices=["fixed", "sliding", "streaming", "all"])
    p.add_argument("--context-len", type=int, default=512, help="window (fixed/sliding) or segment (streaming) length")
    p.add_argument("--stride", type=int, default=None, help="sliding: tokens advanced per window (default context/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="text: score only the held-out tail (the same cut the trainers use, e.g. 0.1)")

    p = sub.add_parser("niah", help=TASK_HELP["niah"], description=TASK_HELP["niah"])
    _common(p)
    from .niah import TASKS

    p.add_argument("--task", dest="niah_task", default="passkey", choices=sorted(TASKS))
    p.add_argument("--lengths", type=_ints, default=[256, 1024, 4096], help="token lengths, e.g. 256,1024,4096")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=8, help="samples per (length, depth) cell")
    p.add_argument("--haystack-text", default=None,
                   help="text source for 'text' haystacks (file/folder/builtin); default builtin:pydoc")
    p.add_argument("--template", choices=["ruler", "short"], default=None,
                   help="prompt template (default: the checkpoint's training template, else ruler)")
    p.add_argument("--num-digits", type=int, default=None, help="digits of number needles (default: checkpoint's, else 7)")

    p = sub.add_parser("mqar", help=TASK_HELP["mqar"], description=TASK_HELP["mqar"])
    _common(p, multiple=True)
    p.add_argument("--seq-lens", type=_ints, default=[64, 128, 256])
    p.add_argument("--kv-pairs", type=_ints, default=[4, 8, 16, 32, 64])
    p.add_argument("--examples", type=int, default=256, help="test sequences per (seq_len, K)")
    p.add_argument("--vocab-size", type=int, default=None, help="MQAR vocabulary (default: the checkpoint's)")
    p.add_argument("--power-a", type=float, default=0.01)

    p = sub.add_parser("continual", help=TASK_HELP["continual"], description=TASK_HELP["continual"])
    _common(p, checkpoint_required=False, multiple=True)
    p.add_argument("--model", action="append", default=[], metavar="NAME=SPEC",
                   help="train this model from scratch (spec as in train-synthetic --model); repeatable")
    p.add_argument("--domain-a", required=True, help="text source of domain A (file/folder/jsonl/builtin:...)")
    p.add_argument("--domain-b", required=True, help="text source of domain B")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="read at most this many characters per domain")
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--mode", choices=["train", "test-time", "both"], default="both")
    p.add_argument("--steps-a", type=int, default=200, help="training steps on A (0: checkpoints are trained on A)")
    p.add_argument("--steps-b", type=int, default=200, help="training steps on B (train mode)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-points", type=int, default=4)
    p.add_argument("--stream-tokens", type=int, default=16384, help="test-time: tokens of B read")
    p.add_argument("--stream-lr", type=float, default=0.3, help="test-time: SGD step of a CMS level update")
    p.add_argument("--stream-clip", type=float, default=1.0,
                   help="test-time: clip each segment's gradient to this norm before accumulating (0: off)")
    p.add_argument("--stream-segment", type=int, default=None,
                   help="test-time: tokens per forward/backward, the truncated-backprop length (default: smallest "
                        "trainable period; must divide every trainable period)")
    p.add_argument("--trainable-levels", type=_ints, default=None,
                   help="test-time: CMS level indices that may change, e.g. 1,2 (default all)")
    p.add_argument("--baseline-period", type=int, default=None,
                   help="test-time: update period of the MLPs of models without CMS (default: smallest CMS period)")
    p.add_argument("--save-dir", default=None, help="save each model's checkpoints after A and after B here")

    p = sub.add_parser("lm-eval", help=TASK_HELP["lm-eval"], description=TASK_HELP["lm-eval"])
    _common(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
    p.add_argument("--max-length", type=int, default=None, help="truncate contexts / rolling window length")
    p.add_argument("--rolling", choices=["auto", "streaming", "fixed"], default="auto")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs (e.g. local data)")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="only the tasks of --include-path (skips indexing lm-eval's built-in tasks: faster)")


def _out_paths(args, task: str) -> tuple[Path, Path | None]:
    out = Path(args.out) if args.out else Path("runs/eval") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    plot = None if args.no_plot else (Path(args.plot) if args.plot else out.with_suffix(".png"))
    return out, plot


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    handler = {"perplexity": run_perplexity, "niah": run_niah, "mqar": run_mqar, "continual": run_continual_cmd,
               "lm-eval": run_lm_eval}[args.task]
    from .checkpoint_io import CheckpointError
    from .corpus import CorpusError

    try:
        return handler(args)
    except (CheckpointError, CorpusError, ValueError) as err:
        print(f"hope-scale eval {args.task}: error: {err}", file=sys.stderr)
        return 2


# -- perplexity ---------------------------------------------------------------------------------------

def run_perplexity(args) -> int:
    from . import plots
    from .checkpoint_io import load_checkpoint
    from .corpus import load_domain, read_documents, read_mds_split
    from .perplexity import MODES, evaluate_text, evaluate_token_docs
    from .results import write_json

    loaded = load_checkpoint(args.checkpoint, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    modes = list(MODES) if args.mode == "all" else [args.mode]
    results, source = {}, {}
    if args.text:
        if args.holdout_fraction:
            text = load_domain(args.text, tok, args.holdout_fraction).heldout_text
        else:
            text = "\n\n".join(read_documents(args.text))
        source = {"text": args.text, "holdout_fraction": args.holdout_fraction, "chars": len(text)}
        for mode in modes:
            t0 = time.perf_counter()
            results[mode] = evaluate_text(model, tok, text, mode, args.context_len, args.stride, args.batch_size,
                                          args.max_tokens)
            results[mode]["seconds"] = time.perf_counter() - t0
    else:
        import numpy as np

        docs = read_mds_split(args.mds, args.split, args.max_samples)
        if args.concat:
            docs = [np.concatenate(docs)]
        if args.max_tokens:
            kept, total = [], 0
            for d in docs:
                if total >= args.max_tokens:
                    break
                kept.append(d[: args.max_tokens - total])
                total += kept[-1].size
            docs = kept
        source = {"mds": args.mds, "split": args.split, "samples": len(docs)}
        for mode in modes:
            t0 = time.perf_counter()
            results[mode] = evaluate_token_docs(model, tok, docs, mode, args.context_len, args.stride, args.batch_size)
            results[mode]["seconds"] = time.perf_counter() - t0
    for mode, r in results.items():
        extra = f"  word ppl {r['word_perplexity']:.3f}" if "word_perplexity" in r else ""
        bpb = f"  bits/byte {r['bits_per_byte']:.4f}" if "bits_per_byte" in r else ""
        print(f"perplexity [{mode}, context {args.context_len}]: tokens {r['tokens']}  "
              f"token ppl {r['token_perplexity']:.4f}{extra}{bpb}")
    out, plot = _out_paths(args, "perplexity")
    write_json(out, {"task": "perplexity", "checkpoint": loaded.describe(), "source": source, "results": results})
    if plot:
        series = {m: ([(a + b) / 2 for a, b in zip(r["profile"]["bucket_start"], r["profile"]["bucket_end"])],
                      r["profile"]["loss"]) for m, r in results.items()}
        plots.lines(series, plot, title=f"loss by position ({loaded.config.arch}, context {args.context_len})",
                    xlabel="token position in document", ylabel="mean loss (nats/token)", logx=True)
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return 0


# -- niah -----------------------------------------------------------------------------------------------

def run_niah(args) -> int:
    from . import plots
    from .checkpoint_io import load_checkpoint
    from .corpus import read_documents
    from .niah import NIAHGenerator, accuracy_grid, evaluate_samples, get_task
    from .results import write_json

    loaded = load_checkpoint(args.checkpoint, device=args.device)
    trained = loaded.meta.get("niah", {})  # how a train-synthetic passkey model was trained
    task = get_task(args.niah_task, template=args.template or trained.get("template"),
                    num_digits=args.num_digits or trained.get("num_digits"))
    hay = None
    if task.haystack == "text":
        hay = "\n".join(read_documents(args.haystack_text or "builtin:pydoc", max_chars=2_000_000))
    gen = NIAHGenerator(task, loaded.tokenizer, seed=args.seed, haystack_text=hay, name=args.niah_task)
    t0 = time.perf_counter()
    samples = gen.grid(args.lengths, args.depths, args.samples)
    rows = evaluate_samples(loaded.model, loaded.tokenizer, samples, batch_size=args.batch_size)
    grid = accuracy_grid(rows, args.lengths, args.depths)
    per_length = {str(L): sum(line) / len(line) for L, line in zip(args.lengths, grid)}
    for L, line in zip(args.lengths, grid):
        print(f"niah {args.niah_task} length {L:6d}: " + "  ".join(f"d{d:.2f}={a:5.1f}" for d, a in zip(args.depths, line))
              + f"   mean {per_length[str(L)]:.1f}")
    out, plot = _out_paths(args, f"niah-{args.niah_task}")
    write_json(out, {"task": "niah", "niah_task": args.niah_task, "spec": task.__dict__, "checkpoint": loaded.describe(),
                     "lengths": args.lengths, "depths": args.depths, "samples_per_cell": args.samples,
                     "haystack_text": args.haystack_text if task.haystack == "text" else None,
                     "accuracy": grid, "accuracy_by_length": per_length,
                     "mean_accuracy": sum(per_length.values()) / len(per_length),
                     "seconds": time.perf_counter() - t0, "samples": rows})
    if plot:
        plots.heatmap(grid, args.lengths, [f"{100 * d:.0f}" for d in args.depths], plot,
                      title=f"NIAH {args.niah_task}: {loaded.config.arch}")
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return 0


# -- mqar -----------------------------------------------------------------------------------------------

def run_mqar(args) -> int:
    from . import plots
    from .checkpoint_io import load_checkpoint
    from .mqar import evaluate_grid
    from .results import write_json

    models = []
    for path in args.checkpoint:
        loaded = load_checkpoint(path, device=args.device)
        vocab = args.vocab_size or loaded.meta.get("mqar", {}).get("vocab_size") or loaded.config.vocab_size
        if vocab > loaded.config.vocab_size:
            raise ValueError(f"{path}: MQAR vocab {vocab} exceeds the model vocabulary {loaded.config.vocab_size}")
        t0 = time.perf_counter()
        rows = evaluate_grid(loaded.model, args.seq_lens, args.kv_pairs, vocab, args.examples, args.seed,
                             args.batch_size, args.power_a)
        label = loaded.meta.get("name") or loaded.config.arch
        for r in rows:
            print(f"mqar {label:18s} T={r['seq_len']:4d} K={r['num_kv_pairs']:3d}  acc {100 * r['accuracy']:5.1f}%")
        models.append({"label": label, "checkpoint": loaded.describe(), "vocab_size": vocab, "rows": rows,
                       "seconds": time.perf_counter() - t0})
    out, plot = _out_paths(args, "mqar")
    write_json(out, {"task": "mqar", "seq_lens": args.seq_lens, "kv_pairs": args.kv_pairs, "examples": args.examples,
                     "power_a": args.power_a, "models": models})
    if plot:
        plot_mqar(models, args.seq_lens, plot)
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return 0


def plot_mqar(models: list[dict], seq_lens: list[int], path) -> None:
    from . import plots

    panel = {}
    for T in seq_lens:
        series = {}
        for m in models:
            rows = [r for r in m["rows"] if r["seq_len"] == T]
            if rows:
                series[m["label"]] = ([r["num_kv_pairs"] for r in rows], [100 * r["accuracy"] for r in rows])
        if series:
            panel[f"sequence length {T}"] = series
    plots.panels(panel, path, title="MQAR accuracy", xlabel="key-value pairs", ylabel="accuracy (%)", logx=True,
                 ylim=(-2, 102))


# -- continual ------------------------------------------------------------------------------------------

def run_continual_cmd(args) -> int:
    from .checkpoint_io import load_checkpoint, save_checkpoint
    from .continual import ContinualConfig, ModelEntry, run_continual
    from .corpus import load_domain
    from .model_specs import config_from_spec
    from .results import write_json

    from hope_scale.data.tokenizer import load_tokenizer
    from hope_scale.model import build_model

    if not args.checkpoint and not args.model:
        raise ValueError("give at least one --checkpoint or --model NAME=SPEC")
    entries, tok_spec = [], None
    for path in args.checkpoint:
        loaded = load_checkpoint(path, device=args.device)
        if tok_spec is not None and loaded.tokenizer.to_spec() != tok_spec:
            raise ValueError("all checkpoints must share one tokenizer (the domains are tokenized once)")
        tok_spec = loaded.tokenizer.to_spec()
        entries.append(ModelEntry(loaded.meta.get("name") or Path(path).stem, loaded.model, {"checkpoint": path}))
    tokenizer = load_tokenizer(tok_spec or "byte")
    for item in args.model:
        name, eq, spec = item.partition("=")
        if not eq:
            raise ValueError(f"--model {item!r} is not NAME=SPEC")
        cfg = config_from_spec(spec, vocab_size=max(tokenizer.vocab_size, config_from_spec(spec).vocab_size))
        torch.manual_seed(args.seed)
        entries.append(ModelEntry(name, build_model(cfg), {"spec": spec}))
    dom_a = load_domain(args.domain_a, tokenizer, args.holdout_fraction, args.max_chars)
    dom_b = load_domain(args.domain_b, tokenizer, args.holdout_fraction, args.max_chars)
    ccfg = ContinualConfig(mode=args.mode, seq_len=args.seq_len, batch_size=args.batch_size, steps_a=args.steps_a,
                           steps_b=args.steps_b, lr=args.lr, eval_tokens=args.eval_tokens,
                           eval_points=args.eval_points, stream_tokens=args.stream_tokens, stream_lr=args.stream_lr,
                           stream_segment_len=args.stream_segment, stream_max_grad_norm=args.stream_clip or None,
                           trainable_levels=args.trainable_levels, baseline_period=args.baseline_period,
                           seed=args.seed)

    def save(name, phase, model):
        if args.save_dir:
            save_checkpoint(Path(args.save_dir) / f"{name}-{phase}.pt", model, tokenizer,
                            {"name": name, "phase": phase, "domain_a": args.domain_a, "domain_b": args.domain_b})

    result = run_continual(entries, dom_a, dom_b, ccfg, log=_log, on_phase_end=save)
    print_continual_table(result)
    out, plot = _out_paths(args, "continual")
    write_json(out, {"task": "continual", **result})
    if plot:
        plot_continual(result, plot)
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return 0


def print_continual_table(result: dict) -> None:
    print(f"{'model':24s} {'levels':>6s} {'params':>8s} {'loss A':>7s} {'loss B':>7s} | "
          f"{'regime':9s} {'A after B':>9s} {'B after B':>9s} {'forget':>7s} {'learn':>7s}")
    for r in result["models"]:
        for regime in ("train", "test_time"):
            if regime not in r:
                continue
            x = r[regime]
            print(f"{r['name']:24s} {r['cms_levels']:6d} {r['parameters']:8d} {r['after_a']['loss_a']:7.4f} "
                  f"{r['after_a']['loss_b']:7.4f} | {regime:9s} {x['after_b']['loss_a']:9.4f} {x['after_b']['loss_b']:9.4f} "
                  f"{x['forgetting']:+7.4f} {x['learning']:+7.4f}")


def plot_continual(result: dict, path) -> None:
    from . import plots

    path = Path(path)
    names = [r["name"] for r in result["models"]]
    for regime in ("train", "test_time"):
        if not all(regime in r for r in result["models"]):
            continue
        suffix = "" if regime == "train" else "-test-time"
        bars = {"forgetting of A (nats/token)": [r[regime]["forgetting"] for r in result["models"]],
                "learning of B (nats/token)": [r[regime]["learning"] for r in result["models"]]}
        plots.grouped_bars(names, bars, path.with_name(path.stem + suffix + ".png"),
                           title=f"continual learning ({regime.replace('_', '-')}): "
                                 f"{result['domain_a']['name']} -> {result['domain_b']['name']}",
                           ylabel="loss change (nats/token)")
        curves = {}
        for r in result["models"]:
            c = r[regime]["curve"]
            curves[f"{r['name']} on A"] = ([p["tokens_b"] for p in c], [p["loss_a"] for p in c])
        plots.lines(curves, path.with_name(path.stem + suffix + "-curve.png"),
                    title=f"held-out loss on A while learning B ({regime.replace('_', '-')})",
                    xlabel="tokens of B", ylabel="loss on A (nats/token)")


# -- lm-eval --------------------------------------------------------------------------------------------

def run_lm_eval(args) -> int:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_adapter import HopeScaleLM
    from .results import write_json

    lm = HopeScaleLM(checkpoint=args.checkpoint, batch_size=args.batch_size, max_length=args.max_length,
                     rolling=args.rolling, device=args.device)
    tm = TaskManager(include_path=args.include_path, include_defaults=not args.no_default_tasks) \
        if (args.include_path or args.no_default_tasks) else None
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    res = lm_eval.simple_evaluate(model=lm, tasks=[t for t in args.tasks.split(",") if t], num_fewshot=args.num_fewshot,
                                  limit=limit, task_manager=tm, log_samples=False, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed)
    results = res["results"] if res else {}
    for task, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v) and "stderr" not in k}
        print(f"lm-eval {task}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    out, _ = _out_paths(args, "lm-eval")
    write_json(out, {"task": "lm-eval", "tasks": args.tasks, "checkpoint": args.checkpoint, "results": results,
                     "config": {k: v for k, v in (res or {}).get("config", {}).items() if isinstance(v, (str, int, float, type(None)))}})
    print(f"wrote {out}")
    return 0
