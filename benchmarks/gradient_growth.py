"""Outer gradient norm vs sequence length, fresh and briefly trained, with the inner step statistics.

    python benchmarks/gradient_growth.py                                   # hope-tiny, titans-tiny
    python benchmarks/gradient_growth.py --model hope-tiny --model hope-tiny:inner_step_bound=0 --train-steps 0
    python benchmarks/gradient_growth.py --text tests/data/tinyshakespeare-head.txt --out runs/grad.json

For every model (a named config, optionally ``name:key=value,...`` overrides): the total gradient norm of the
LM loss on one real-text sequence (the built-in corpus unless ``--text``) of each length, once on the fresh
model and once after ``--train-steps`` AdamW steps at ``--train-len`` tokens, plus, per length, what the
inner step bound did: the mean chunk overshoot rho of the main and projection memories (before the bound)
and the fraction of (chunk, head) updates it scaled down. Goal (issue 8): the norm at 4096 tokens within
10x of the norm at 128, finite everywhere, fresh and trained.
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
from hope_scale.eval.corpus import load_domain  # noqa: E402
from hope_scale.eval.trainer import TrainConfig, Trainer, text_batches  # noqa: E402
from hope_scale.eval.model_specs import config_from_spec  # noqa: E402
from hope_scale.model import build_model  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans  # noqa: E402


def model_from_spec(spec: str, seed: int) -> torch.nn.Module:
    """``name`` or ``name:key=value,key=value`` (``hope_scale.eval.model_specs``), initialized with ``seed``."""
    torch.manual_seed(seed)
    return build_model(config_from_spec(spec))


def gradient_norm(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, dict]:
    """(total gradient norm, loss, inner-step statistics averaged over the Titans layers) of one sequence."""
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    sq = sum(float(p.grad.detach().double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    stats: dict[str, list[float]] = {}
    for module in model.modules():
        if isinstance(module, SelfModifyingTitans):
            for k, v in module.last_stats.items():
                if "overshoot" in k or "bounded" in k:
                    stats.setdefault(k, []).append(float(v))
    model.zero_grad(set_to_none=True)
    return math.sqrt(sq), float(loss.detach()), {k: float(np.mean(v)) for k, v in stats.items()}


def measure(model, stream: np.ndarray, lengths: list[int]) -> list[dict]:
    rows = []
    for n in lengths:
        ids = torch.from_numpy(stream[: n + 1].astype(np.int64))[None]
        t0 = time.perf_counter()
        norm, loss, stats = gradient_norm(model, ids)
        rows.append({"length": n, "grad_norm": norm, "loss": loss, "seconds": time.perf_counter() - t0, **stats})
    return rows


def fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", dest="models",
                    help="name[:key=value,...] (repeatable; default: hope-tiny and titans-tiny)")
    ap.add_argument("--lengths", default="128,512,1024,2048,4096")
    ap.add_argument("--text", default="builtin:pydoc", help="text source (file, folder, builtin[:pydoc|:stdlib])")
    ap.add_argument("--train-steps", type=int, default=60, help="AdamW steps before the 'trained' measurement")
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    tok = load_tokenizer("byte")
    dom = load_domain(args.text, tok, holdout_fraction=0.1)
    if len(dom.heldout) < max(lengths) + 1:
        raise SystemExit(f"{args.text}: held-out part has {len(dom.heldout)} tokens, need {max(lengths) + 1}")
    specs = args.models or ["hope-tiny", "titans-tiny"]
    results = []
    for spec in specs:
        model = model_from_spec(spec, args.seed)
        for state in ("fresh", "trained"):
            if state == "trained":
                if args.train_steps <= 0:
                    continue
                tr = Trainer(model, text_batches(dom.train, args.batch, args.train_len, seed=args.seed),
                             TrainConfig(steps=args.train_steps, lr=args.lr, warmup_steps=min(10, args.train_steps),
                                         log_every=0), spec).run(log=None)
                trained = tr.result(keep_history=False)
            rows = measure(model, dom.heldout, lengths)
            entry = {"model": spec, "state": state, "rows": rows}
            if state == "trained":
                entry["train"] = trained
            results.append(entry)
            ratio = rows[-1]["grad_norm"] / rows[0]["grad_norm"]
            print(f"{spec:40s} {state:8s} " + "  ".join(f"{r['length']}:{fmt(r['grad_norm'])}" for r in rows)
                  + f"   ratio {lengths[-1]}/{lengths[0]} = {fmt(ratio)}", flush=True)

    print("\n| model | state | " + " | ".join(str(n) for n in lengths) + f" | {lengths[-1]}/{lengths[0]} |")
    print("|---|---|" + "---|" * (len(lengths) + 1))
    for e in results:
        norms = [r["grad_norm"] for r in e["rows"]]
        print(f"| {e['model']} | {e['state']} | " + " | ".join(fmt(x) for x in norms) + f" | {fmt(norms[-1] / norms[0])} |")
    keys = sorted({k for e in results for r in e["rows"] for k in r if "overshoot" in k or "bounded" in k})
    if keys:
        print("\ninner step per length (mean over layers; overshoot = rho before the bound, bounded = fraction of "
              "chunk-head updates scaled down)\n")
        print("| model | state | length | " + " | ".join(keys) + " |")
        print("|---|---|---|" + "---|" * len(keys))
        for e in results:
            for r in e["rows"]:
                print(f"| {e['model']} | {e['state']} | {r['length']} | " + " | ".join(fmt(r.get(k, float('nan'))) for k in keys) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
