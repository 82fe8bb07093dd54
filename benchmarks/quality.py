"""Quality benchmarks on CPU: Hope vs Titans vs Hope-Attention vs Transformer++ under equal budgets.

    python benchmarks/quality.py --out runs/quality                 # all four sections
    python benchmarks/quality.py --out runs/quality --only a,c      # some of them
    python benchmarks/quality.py --out runs/quality --scale 0.1     # a quick smoke run (10% of the steps)

Sections (each writes ``<out>/<section>.json`` and PNGs; ``<out>/summary.md`` collects the tables):

(a) held-out perplexity of models trained on the same real corpus (tinyshakespeare, else the built-in
    corpus) with the same parameters (within ~10%), tokens, batch and learning rate; plus Transformer++
    trained for as many steps as fit in Hope's CPU time (equal-compute budget; CPU time, not wall time,
    because the machine is shared);
(b) MQAR accuracy vs key-value pairs and sequence length (Zoology recipe, trained on T=64);
(c) passkey NIAH accuracy at 1x, 4x and 16x the training length;
(d) continual learning (A = tinyshakespeare, B = Python documentation of the built-in corpus): forgetting
    and learning with 1, 2 and 3 CMS levels vs Transformer++, in continued training and at test time.

Every model is d_model 64, 2 layers, 2 heads, byte vocabulary; torch runs on ``--threads`` threads (1 by
default: on a shared 2-core machine more threads are much slower).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hope_scale.data.tokenizer import load_tokenizer  # noqa: E402
from hope_scale.eval import plots  # noqa: E402
from hope_scale.eval.checkpoint_io import save_checkpoint  # noqa: E402
from hope_scale.eval.corpus import load_domain  # noqa: E402
from hope_scale.eval.results import write_json  # noqa: E402
from hope_scale.eval.trainer import TrainConfig, Trainer, text_batches  # noqa: E402
from hope_scale.model import ModelConfig, build_model  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BASE = dict(d_model=64, n_layers=2, n_heads=2, chunk_size_memory=16, chunk_size_projection=64)


def lv(*items):
    return [{"period": p, "hidden_mult": m} for p, m in items]


# Equal parameters (~117-131K): Hope's CMS levels share the MLP budget of one Transformer++ SwiGLU (8/3).
ARCHS = {
    "Hope": dict(arch="hope", cms_levels=lv((1, 2 / 3), (8192, 2 / 3))),
    "Titans": dict(arch="titans"),
    "Hope-Attention": dict(arch="hope_attention", cms_levels=lv((1, 4 / 3), (8192, 4 / 3))),
    "Transformer++": dict(arch="transformer"),
}


def make(name: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**BASE, **extra))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def steps(n: int, scale: float) -> int:
    return max(2, int(round(n * scale)))


# -- (a) perplexity ---------------------------------------------------------------------------------------

def section_a(out: Path, scale: float, tok) -> dict:
    from hope_scale.eval.perplexity import evaluate_text

    src = str(SHAKESPEARE) if SHAKESPEARE.is_file() else "builtin:pydoc"
    dom = load_domain(src, tok, holdout_fraction=0.1)
    held_text = dom.heldout_text[:8192]
    n_steps, batch, seq = steps(120, scale), 16, 128
    rows, curves, hope_cpu = [], {}, None
    runs = [(n, ARCHS[n], None) for n in ARCHS] + [("Transformer++ (Hope's compute time)", ARCHS["Transformer++"], "time")]
    for name, spec, budget in runs:
        model = make(name, **spec)
        cfg = TrainConfig(steps=n_steps, lr=3e-3, warmup_steps=10, log_every=0)
        if budget == "time":  # as many steps as fit in Hope's CPU time (measured on a short probe run)
            probe = Trainer(make(name, **spec), text_batches(dom.train, batch, seq, seed=0),
                            TrainConfig(steps=20, lr=3e-3, warmup_steps=10, log_every=0), name).run(log=None)
            cfg = TrainConfig(steps=max(n_steps, int(hope_cpu / (probe.cpu_seconds / probe.step))), lr=3e-3,
                              warmup_steps=10, log_every=0)
        tr = Trainer(model, text_batches(dom.train, batch, seq, seed=0), cfg, name).run(log=None)
        if name == "Hope":
            hope_cpu = tr.cpu_seconds
        res = tr.result()
        row = {"model": name, "arch": spec["arch"], "parameters": model.num_parameters(), "steps": res["steps"],
               "tokens": res["tokens"], "train_seconds": res["seconds"], "train_cpu_seconds": res["cpu_seconds"],
               "tokens_per_cpu_second": res["tokens"] / res["cpu_seconds"],
               "final_train_loss": res["final_loss"]}
        for mode in ("fixed", "streaming"):
            t0 = time.perf_counter()
            r = evaluate_text(model, tok, held_text, mode=mode, context_len=seq, batch_size=16)
            row[mode] = {k: r[k] for k in ("tokens", "loss", "token_perplexity", "word_perplexity", "bits_per_byte")}
            row[mode]["seconds"] = time.perf_counter() - t0
        rows.append(row)
        h = np.asarray(res["loss_history"])
        k = max(1, len(h) // 40)
        curves[name] = (list(np.arange(0, len(h) - k + 1, k) * batch * seq), [float(h[i:i + k].mean()) for i in range(0, len(h) - k + 1, k)])
        save_checkpoint(out / "ckpt" / f"a-{name.split()[0]}.pt", model, tok, {"name": name, "section": "a"})
        log(f"(a) {name:34s} params {row['parameters']:7d} steps {row['steps']:4d} cpu {row['train_cpu_seconds']:6.1f}s  "
            f"ppl fixed {row['fixed']['token_perplexity']:.3f}  streaming {row['streaming']['token_perplexity']:.3f}")
    plots.lines(curves, out / "a_train_loss.png", title="training loss (tinyshakespeare, byte level)",
                xlabel="tokens", ylabel="loss (nats/token)")
    result = {"source": src, "heldout_chars": len(held_text), "batch": batch, "seq_len": seq, "rows": rows}
    write_json(out / "a_perplexity.json", result)
    return result


# -- (b) MQAR ---------------------------------------------------------------------------------------------

def section_b(out: Path, scale: float) -> dict:
    from hope_scale.eval.mqar import MQARSpec, evaluate_grid, mixed_batch

    vocab, n_steps, batch = 64, steps(800, scale), 16
    train_specs = [MQARSpec(64, 2), MQARSpec(64, 4), MQARSpec(64, 8)]
    seq_lens, kvs = [64, 128, 256], [2, 4, 8, 16]
    models = []
    for name, spec in ARCHS.items():
        model = make(name, vocab_size=vocab, **spec)  # as in Zoology, the model's vocabulary is the task's
        cfg = TrainConfig(steps=n_steps, lr=1e-2, warmup_steps=20, log_every=0)
        tr = Trainer(model, lambda s: mixed_batch(train_specs, batch, vocab, seed=s), cfg, name).run(log=None)
        rows = evaluate_grid(model, seq_lens, kvs, vocab, num_examples=128, seed=12345)
        models.append({"label": name, "parameters": model.num_parameters(), "train": tr.result(keep_history=False),
                       "rows": rows})
        log(f"(b) {name:16s} cpu {tr.cpu_seconds:6.1f}s  " + "  ".join(
            f"T{r['seq_len']}K{r['num_kv_pairs']}={100 * r['accuracy']:.0f}" for r in rows))
    from hope_scale.eval.cli import plot_mqar

    plot_mqar(models, seq_lens, out / "b_mqar.png")
    result = {"vocab_size": vocab, "train_settings": [[s.seq_len, s.num_kv_pairs] for s in train_specs],
              "steps": n_steps, "batch": batch, "chance": 1 / (vocab - vocab // 2), "models": models}
    write_json(out / "b_mqar.json", result)
    return result


# -- (c) passkey NIAH -------------------------------------------------------------------------------------

def section_c(out: Path, scale: float, tok) -> dict:
    from hope_scale.eval.niah import NIAHGenerator, accuracy_grid, evaluate_samples, get_task
    from hope_scale.eval.trainer import niah_batches

    train_len, n_steps, batch = 128, steps(200, scale), 8
    lengths, depths = [train_len, 4 * train_len, 16 * train_len], [0.0, 0.25, 0.5, 0.75, 1.0]
    task = get_task("passkey", template="short", num_digits=5)
    test = NIAHGenerator(task, tok, seed=777, name="passkey").grid(lengths, depths, samples_per_cell=4)
    models = []
    for name, spec in ARCHS.items():
        model = make(name, **spec)
        gen = NIAHGenerator(task, tok, seed=1, name="passkey-train")
        cfg = TrainConfig(steps=n_steps, lr=3e-3, warmup_steps=20, log_every=0)
        tr = Trainer(model, niah_batches(gen, batch, train_len, seed=0, pad_id=tok.pad_id), cfg, name).run(log=None)
        t0 = time.perf_counter()
        rows = evaluate_samples(model, tok, test, batch_size=4)
        grid = accuracy_grid(rows, lengths, depths)
        by_len = [float(np.mean(line)) for line in grid]
        models.append({"label": name, "parameters": model.num_parameters(), "train": tr.result(keep_history=False),
                       "accuracy": grid, "accuracy_by_length": by_len, "eval_seconds": time.perf_counter() - t0,
                       "examples": rows[:3]})
        plots.heatmap(grid, lengths, [f"{100 * d:.0f}" for d in depths], out / f"c_niah_{name}.png",
                      title=f"passkey NIAH: {name} (trained at {train_len})")
        save_checkpoint(out / "ckpt" / f"c-{name}.pt", model, tok,
                        {"name": name, "section": "c", "niah": {"template": "short", "num_digits": 5,
                                                                 "train_length": train_len}})
        log(f"(c) {name:16s} train {tr.seconds:6.1f}s loss {tr.result()['final_loss']:.3f}  accuracy by length "
            + "  ".join(f"{L}:{a:.0f}%" for L, a in zip(lengths, by_len)))
    plots.lines({m["label"]: ([1, 4, 16], m["accuracy_by_length"]) for m in models}, out / "c_niah_by_length.png",
                title="passkey NIAH vs length (x training length)", xlabel="length / training length",
                ylabel="accuracy (%)", logx=True, ylim=(-2, 102))
    result = {"train_length": train_len, "lengths": lengths, "depths": depths, "samples_per_cell": 4,
              "steps": n_steps, "batch": batch, "models": models}
    write_json(out / "c_niah.json", result)
    return result


# -- (d) continual learning -------------------------------------------------------------------------------

def section_d(out: Path, scale: float, tok) -> dict:
    from hope_scale.eval.cli import plot_continual, print_continual_table
    from hope_scale.eval.continual import ContinualConfig, ModelEntry, run_continual

    a_src = str(SHAKESPEARE) if SHAKESPEARE.is_file() else "builtin:stdlib"
    dom_a = load_domain(a_src, tok, 0.1, max_chars=600_000, name="shakespeare" if SHAKESPEARE.is_file() else None)
    dom_b = load_domain("builtin:pydoc", tok, 0.1, max_chars=600_000, name="python-docs")
    p = (1024, 4096, 16384)
    entries = [
        ModelEntry("Hope, 1 level", make("h1", arch="hope", cms_levels=lv((p[0], 2 / 3 * 2)))),
        ModelEntry("Hope, 2 levels", make("h2", arch="hope", cms_levels=lv((p[0], 2 / 3), (p[1], 2 / 3)))),
        ModelEntry("Hope, 3 levels", make("h3", arch="hope", cms_levels=lv((p[0], 4 / 9), (p[1], 4 / 9), (p[2], 4 / 9)))),
        ModelEntry("Hope-Attention, 2 levels", make("a2", arch="hope_attention", cms_levels=lv((p[0], 4 / 3), (p[1], 4 / 3)))),
        ModelEntry("Hope-Attention, 3 levels",
                   make("a3", arch="hope_attention", cms_levels=lv((p[0], 8 / 9), (p[1], 8 / 9), (p[2], 8 / 9)))),
        ModelEntry("Transformer++", make("tf", arch="transformer")),
    ]
    cfg = ContinualConfig(mode="both", seq_len=128, batch_size=8, steps_a=steps(100, scale), steps_b=steps(60, scale),
                          lr=3e-3, warmup_steps=10, eval_tokens=8192, eval_points=4,
                          stream_tokens=max(2048, int(32768 * min(1.0, scale * 2))), stream_lr=0.3,
                          stream_segment_len=128, stream_max_grad_norm=1.0, seed=0)
    res = run_continual(entries, dom_a, dom_b, cfg, log=log,
                        on_phase_end=lambda n, ph, m: save_checkpoint(
                            out / "ckpt" / f"d-{n.replace(', ', '-').replace(' ', '_')}-{ph}.pt", m, tok,
                            {"name": n, "phase": ph}) if ph == "after_a" else None)
    print_continual_table(res)
    plot_continual(res, out / "d_continual.png")
    write_json(out / "d_continual.json", res)
    return res


# -- summary ---------------------------------------------------------------------------------------------

def num(x, spec: str = ".3f") -> str:
    """Format a number that JSON may have stored as the string 'nan' / 'inf'."""
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def summary(out: Path) -> str:
    lines = ["# Quality benchmark results", ""]
    f = out / "a_perplexity.json"
    if f.is_file():
        a = json.loads(f.read_text())
        lines += [f"## (a) held-out perplexity ({Path(a['source']).name}, byte level, trained at {a['seq_len']} tokens)", "",
                  "| model | params | steps | tokens | train CPU s | tok/CPU-s | ppl (fixed 128) | bits/byte | ppl (streaming) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            lines.append(f"| {r['model']} | {r['parameters']} | {r['steps']} | {r['tokens']} | {r['train_cpu_seconds']:.0f} | "
                         f"{r['tokens_per_cpu_second']:.0f} | {r['fixed']['token_perplexity']:.3f} | "
                         f"{r['fixed']['bits_per_byte']:.3f} | {r['streaming']['token_perplexity']:.3f} |")
        lines.append("")
    f = out / "b_mqar.json"
    if f.is_file():
        b = json.loads(f.read_text())
        keys = [(r["seq_len"], r["num_kv_pairs"]) for r in b["models"][0]["rows"]]
        lines += [f"## (b) MQAR accuracy % (vocab {b['vocab_size']}, trained on T=64, K in 2/4/8, {b['steps']} steps; "
                  f"chance {100 * b['chance']:.1f}%)", "",
                  "| model | " + " | ".join(f"T{t} K{k}" for t, k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for m in b["models"]:
            lines.append(f"| {m['label']} | " + " | ".join(f"{100 * r['accuracy']:.1f}" for r in m["rows"]) + " |")
        lines.append("")
    f = out / "c_niah.json"
    if f.is_file():
        c = json.loads(f.read_text())
        lines += [f"## (c) passkey NIAH accuracy % (trained at {c['train_length']} tokens, {c['steps']} steps)", "",
                  "| model | " + " | ".join(f"{L} ({L // c['train_length']}x)" for L in c["lengths"]) + " |",
                  "|---" * (len(c["lengths"]) + 1) + "|"]
        for m in c["models"]:
            lines.append(f"| {m['label']} | " + " | ".join(f"{a:.1f}" for a in m["accuracy_by_length"]) + " |")
        lines.append("")
    f = out / "d_continual.json"
    if f.is_file():
        d = json.loads(f.read_text())
        lines += [f"## (d) continual learning: {d['domain_a']['name']} -> {d['domain_b']['name']} "
                  f"(loss in nats/token; forgetting = loss on A after B - after A)", "",
                  "| model | params | CMS periods | loss A | loss B | train: A after B | train: B after B | train: forgetting | "
                  "train: learning | test-time: forgetting | test-time: learning | test-time updates |",
                  "|---" * 12 + "|"]
        for r in d["models"]:
            t, tt = r["train"], r["test_time"]
            lines.append(f"| {r['name']} | {r['parameters']} | {r['cms_periods'] or '-'} | {num(r['after_a']['loss_a'])} | "
                         f"{num(r['after_a']['loss_b'])} | {num(t['after_b']['loss_a'])} | {num(t['after_b']['loss_b'])} | "
                         f"{num(t['forgetting'], '+.3f')} | {num(t['learning'], '+.3f')} | {num(tt['forgetting'], '+.4f')} | "
                         f"{num(tt['learning'], '+.4f')} | {tt['updates']} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--only", default="a,b,c,d")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs: 0.05)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("byte")
    t0 = time.perf_counter()
    for s in args.only.split(","):
        ts = time.perf_counter()
        {"a": lambda: section_a(out, args.scale, tok), "b": lambda: section_b(out, args.scale),
         "c": lambda: section_c(out, args.scale, tok), "d": lambda: section_d(out, args.scale, tok)}[s.strip()]()
        log(f"section ({s}) took {time.perf_counter() - ts:.0f}s")
    print(summary(out))
    log(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
