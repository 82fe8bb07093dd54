"""Parallelism overhead on this machine, and the FLOP / MFU budget of the GPU model shapes.

    python benchmarks/parallel_overhead.py [--model hope-tiny] [--seq-len 128] [--micro-batch 4] [--steps 6]
    python benchmarks/parallel_overhead.py --flops-only

Part 1 trains ``--model`` with the real TrainEngine (DeepSpeed, Megatron-Core tensor parallelism, gloo) on
random tokens for ``--steps`` optimizer steps after ``--warmup`` steps, at three layouts, each a fresh set of
local processes:

    1 process            the reference
    TP=2 (2 processes)   the same batch, heads split over two ranks (all-reduces in every block)
    DP=2 (2 processes)   twice the batch, one micro-batch per rank (gradient all-reduce per step)

and prints tokens/s (optimizer-step tokens over wall time, slowest rank) and the ratio to 1 process. On a
CPU machine the processes share its cores, so the ratios measure communication + contention overhead
rather than speed-up; run it on idle cores. Threads per process: cores / processes (``--threads`` to fix
it); the layouts are measured in turn, ``--repeats`` times, and the best run of each is reported.

Part 2 prints the training FLOPs per token of hope-760m and hope-1.3b (and their Transformer baselines) at
sequence length 4096 from ``hope_scale.train.flops`` (6N + attention + Hope's memory updates and reads), and
the tokens/s per GPU that 100% and 40% MFU mean on an H100 SXM (989 TFLOP/s bf16).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def worker(payload: dict) -> dict:
    """One rank: build the engine at the payload's layout, time training steps on random tokens."""
    torch.set_num_threads(payload["threads"])
    from hope_scale.model import ModelConfig
    from hope_scale.parallel import ParallelLayout
    from hope_scale.parallel.engine import TrainEngine

    cfg = ModelConfig.named(payload["model"])
    world = int(os.environ["WORLD_SIZE"])
    layout = ParallelLayout.for_world(world, tensor_parallel=payload["tp"])
    engine = TrainEngine(cfg, layout, optimizer={"lr": 1e-3}, grad_accum_steps=1, seed=0)
    gen = torch.Generator().manual_seed(1000 + engine.dp_rank)
    b, t = payload["micro_batch"], payload["seq_len"]

    def batch():
        ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=gen)
        return [(ids[:, :-1], ids[:, 1:])]

    for _ in range(payload["warmup"]):
        engine.train_step(batch(), 1e-3)
    torch.distributed.barrier()
    start = time.perf_counter()
    tokens = 0
    for _ in range(payload["steps"]):
        tokens += engine.train_step(batch(), 1e-3)["tokens"]
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed}


def threads_for(args, world: int) -> int:
    return args.threads or max(1, (os.cpu_count() or 1) // world)


def measure(args, world: int, tp: int) -> float:
    from hope_scale.parallel.launch import run_local

    threads = threads_for(args, world)
    payload = {"model": args.model, "tp": tp, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
               "warmup": args.warmup, "steps": args.steps, "threads": threads}
    results = run_local("benchmarks.parallel_overhead:worker", world_size=world, payload=payload,
                        env={"OMP_NUM_THREADS": str(threads)}, timeout=args.timeout)
    seconds = max(r["seconds"] for r in results)
    return results[0]["tokens"] / seconds


def overhead_table(args) -> None:
    layouts = (("1 process", 1, 1), ("TP=2", 2, 2), ("DP=2", 2, 1))
    best = {name: 0.0 for name, _, _ in layouts}
    for rep in range(args.repeats):  # layouts interleaved, best of the repeats: less sensitive to other load
        for name, world, tp in layouts:
            tps = measure(args, world, tp)
            best[name] = max(best[name], tps)
            print(f"  repeat {rep + 1}: {name}: {tps:,.0f} tokens/s", flush=True)
    base = best["1 process"]
    print(f"\n{args.model}, seq {args.seq_len}, micro-batch {args.micro_batch} per rank, {args.steps} timed steps "
          f"(best of {args.repeats}), {os.cpu_count()} CPU cores")
    print("| layout | processes | threads per process | tokens/s | tokens/s per process | ratio to 1 process |")
    print("|---|---|---|---|---|---|")
    for name, world, _ in layouts:
        tps = best[name]
        print(f"| {name} | {world} | {threads_for(args, world)} | {tps:,.0f} | {tps / world:,.0f} | {tps / base:.2f} |")


def flops_table() -> None:
    from hope_scale.model import ModelConfig
    from hope_scale.train.flops import PEAK_FLOPS, dense_matmul_params, flops_per_token

    peak = PEAK_FLOPS["h100-sxm"]["bf16"]
    seq = 4096
    print(f"\nTraining FLOPs per token at seq {seq} (hope_scale/train/flops.py) and what MFU means on an H100 SXM "
          f"({peak / 1e12:.0f} TFLOP/s bf16)")
    print("| model | params | matmul params N | 6N | attention | memory | total | memory share | "
          "tok/s/GPU at 100% MFU | tok/s/GPU at 40% MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("hope-760m", "transformer-760m", "hope-1.3b", "transformer-1.3b"):
        cfg = ModelConfig.named(name)
        with torch.device("meta"):
            from hope_scale.model import build_model

            n_all = build_model(cfg).num_parameters()
        f = flops_per_token(cfg, seq)
        full = peak / f.total
        print(f"| {name} | {n_all / 1e6:,.0f}M | {dense_matmul_params(cfg) / 1e6:,.0f}M | {f.dense / 1e9:.2f} GF | "
              f"{f.attention / 1e9:.2f} GF | {f.memory / 1e9:.2f} GF | {f.total / 1e9:.2f} GF | "
              f"{f.memory / f.total:.0%} | {full:,.0f} | {0.4 * full:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hope-tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="threads per process (default: cores / processes)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--flops-only", action="store_true", help="skip the measurement, print the FLOP table")
    args = parser.parse_args()
    if not args.flops_only:
        overhead_table(args)
    flops_table()


if __name__ == "__main__":
    main()
