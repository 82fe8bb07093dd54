"""MQAR accuracy of Hope variants (ModelConfig overrides), with the setup of ``quality.py`` section (b).

    python benchmarks/mqar_ablation.py --variant default= --variant alpha098=alpha_init=0.98 --seeds 0,1,2
    python benchmarks/mqar_ablation.py --variant eta06=eta_init=0.6 --seeds 0 --out runs/mqar_ablation

Each variant is ``name=key=value,key=value`` (an empty override list is the default Hope of the quality
benchmark: d_model 64, 2 layers, 2 heads, 130K parameters; its ``alpha_init`` is 0.999 since the ablation in
docs/hope-design.md §6.5, which ran with 0.98 as the default and ``alpha999=alpha_init=0.999`` as the variant). Every (variant, seed) trains 800 steps of batch 16
on T = 64 with K in 2/4/8 at lr 3e-3 and is evaluated on the same grid as section (b); the table gives the
accuracy (%) per cell, mean ± std over seeds. Used for the recall diagnosis in docs/hope-design.md §6.5.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the benchmark's models, MQAR recipe and table helpers)

from hope_scale.eval.model_specs import parse_field_overrides  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name=key=value,key=value"`` -> (name, ModelConfig overrides)."""
    name, _, spec = text.partition("=")
    return name, parse_field_overrides(spec)


def run(overrides: dict, seed: int, scale: float, write_cost_from: float = 0.0,
        write_cost_ramp: float = 0.0) -> list[dict]:
    from hope_scale.eval.mqar import MQARSpec, evaluate_grid, mixed_batch

    vocab, batch, n_steps = 64, 16, quality.steps(800, scale)
    specs = [MQARSpec(64, 2), MQARSpec(64, 4), MQARSpec(64, 8)]
    model = quality.make(seed, vocab_size=vocab, **(quality.ARCHS["Hope"] | overrides))
    cfg = quality.train_config(n_steps, 3e-3, 20, write_cost_from, write_cost_ramp)
    quality.Trainer(model, lambda s: mixed_batch(specs, batch, vocab, seed=s + 100_003 * seed), cfg, "hope").run(log=None)
    return evaluate_grid(model, [64, 128, 256], [2, 4, 8, 16], vocab, num_examples=128, seed=12345)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="name=key=value,... (repeatable)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the step count (smoke runs: 0.05)")
    ap.add_argument("--out", default=None, help="write the results as JSON into this folder")
    ap.add_argument("--write-cost-from", type=quality.write_cost_start, default=0.0, metavar="FRACTION",
                    help="every variant's write cost starts after this fraction of the steps (as in quality.py)")
    ap.add_argument("--write-cost-ramp", type=quality.write_cost_ramp, default=0.0, metavar="FRACTION",
                    help="then rises to its full value over this fraction of the steps (as in quality.py)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for name, overrides in map(parse_variant, args.variant):
        results[name] = [run(overrides, seed, args.scale, args.write_cost_from, args.write_cost_ramp)
                         for seed in seeds]
        quality.log(f"{name} {overrides}: T64K4 " + ", ".join(
            f"{100 * next(r['accuracy'] for r in rows if (r['seq_len'], r['num_kv_pairs']) == (64, 4)):.1f}"
            for rows in results[name]))
    keys = [(r["seq_len"], r["num_kv_pairs"]) for r in next(iter(results.values()))[0]]
    print(f"\nMQAR accuracy % (seeds {args.seeds}; chance 3.1%)\n")
    print("| variant | " + " | ".join(f"T{t} K{k}" for t, k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, runs in results.items():
        print(f"| {name} | " + " | ".join(quality.ms([100 * rows[i]["accuracy"] for rows in runs], ".1f")
                                         for i in range(len(keys))) + " |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"mqar_ablation-s{args.seeds.replace(',', '_')}.json").write_text(
            json.dumps({"seeds": seeds, "variants": dict(map(parse_variant, args.variant)),
                        "write_cost_from": args.write_cost_from, "write_cost_ramp": args.write_cost_ramp,
                        "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
