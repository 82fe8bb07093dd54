"""Peak memory of `hope-scale export` relative to the weights it writes, for a hope-125m-shaped checkpoint.

    python benchmarks/export_footprint.py [--model hope-125m] [--ranks 1] [--work /tmp/export-footprint]

Writes a random checkpoint in the trainer's format (``write_checkpoint``: ``--ranks`` gloo processes, each saving its
rows of every weight, so that a weight is assembled from several boxes as after a sharded run), then runs each export in
a fresh process and prints a table: the exported weight bytes, the process's resident memory once everything is
imported (before reading anything), its peak (``VmHWM``) and the ratio (peak - before) / exported weights.
Nothing else runs in those processes, so the peak is the export's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MEASURE = r"""
import json, re, sys, time
import psutil
from hope_scale.export.export import export
from hope_scale.export.weights import meta_model
from hope_scale.model import ModelConfig
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast  # all the export imports
meta_model(ModelConfig(d_model=32, n_layers=1, n_heads=2))  # loads the meta device's kernels (~110 MiB, once)
before = psutil.Process().memory_info().rss
start = time.perf_counter()
out = export(sys.argv[1], sys.argv[2], *json.loads(sys.argv[3]), log=lambda m: None)
seconds = time.perf_counter() - start
# the peak resident memory of this process image (ru_maxrss would include the parent's, inherited through exec)
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
print(json.dumps({"before": before, "peak": peak, "weights": weights, "seconds": seconds}))
"""


def save_worker(p: dict) -> None:
    """One rank of ``write_checkpoint``: its rows of every weight (as TP / ZeRO shards split them), with zero AdamW
    moments beside them as training stores them, written by the trainer's CheckpointManager (collective)."""
    import torch.distributed as dist

    from hope_scale.model import build_model
    from hope_scale.parallel.engine import STATE_FORMAT
    from hope_scale.train.checkpoint import CheckpointManager

    if p["ranks"] > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if p["ranks"] > 1 else 0
    torch.manual_seed(0)
    model = build_model(p["model"])
    params = {}
    for name, w in model.named_parameters():
        rows = torch.arange(w.shape[0]).tensor_split(p["ranks"])[rank]
        if len(rows):
            a, n = int(rows[0]), len(rows)
            value = w.detach()[a:a + n]
            params[name] = {"global_shape": list(w.shape), "box": [[a, n]] + [[0, s] for s in w.shape[1:]],
                            "value": value, "exp_avg": torch.zeros_like(value), "exp_avg_sq": torch.zeros_like(value)}
    engine = {"format": STATE_FORMAT, "model_config": model.cfg.to_dict(), "steps": 0, "cms_schedule": {},
              "group_steps": {}, "params": params}
    CheckpointManager(p["root"], log=lambda m: None).save(1, {"engine": engine, "rng": {}}, {"step": 1},
                                                          {"config": {"data": {"tokenizer": "byte"}}})


def write_checkpoint(model_name: str, ranks: int, root: Path) -> int:
    """A trainer checkpoint of a random ``model_name`` saved by ``ranks`` processes (no training); returns the
    bytes of its rank files."""
    from hope_scale.parallel.launch import run_local

    payload = {"model": model_name, "ranks": ranks, "root": str(root)}
    if ranks == 1:
        save_worker(payload)
    else:
        run_local("benchmarks.export_footprint:save_worker", ranks, payload, timeout=1800)
    return sum(f.stat().st_size for f in (root / "step_00000001").glob("rank_*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hope-125m")
    parser.add_argument("--ranks", type=int, default=1, help="rank files the checkpoint is split into")
    parser.add_argument("--work", default="/tmp/export-footprint")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    ckpt_bytes = write_checkpoint(args.model, args.ranks, work / "ckpt")
    print(f"{args.model}: trainer checkpoint in {args.ranks} rank file(s), {ckpt_bytes / 2**20:.0f} MiB (weights + "
          f"AdamW moments), written in {time.perf_counter() - start:.0f} s\n")
    print("| export | weights written | RSS before | peak RSS | (peak - before) / weights | time |")
    print("|---|---|---|---|---|---|")
    for label, extra in [("hf fp32", []), ("hf bf16", ["hf", "bf16"]), ("hf int8", ["hf", "fp32", "int8"])]:
        out = work / label.replace(" ", "-")
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(work / "ckpt"), str(out), json.dumps(extra)],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {label} | {r['weights'] / 2**20:.0f} MiB | {r['before'] / 2**20:.0f} MiB | {r['peak'] / 2**20:.0f} MiB "
              f"| {(r['peak'] - r['before']) / r['weights']:.2f} | {r['seconds']:.0f} s |", flush=True)
        shutil.rmtree(out)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
