"""Single-GPU training throughput of hope-760m and transformer-760m: tokens/s, achieved TFLOP/s, MFU, peak memory.

    python benchmarks/gpu_throughput.py [--models hope-760m transformer-760m] [--seq-len 4096]
                                        [--micro-batch N] [--steps 10] [--warmup 2] [--modes eager compiled]

One GPU, one process, no parallelism: the whole model on one device (the shipped 760m recipes split it over TP=2,
so their micro-batch of 2 is per TP pair; here the default micro-batch is 1 sequence of 4096 tokens, and
``--micro-batch`` changes it). Each model runs the training configuration's precision and activation
checkpointing (``configs/train/<model>.yaml``: bf16, ``train.activation_checkpointing``): bf16 weights,
activations and gradients, the memory layer's C x C triangular solve and step statistics in fp32 as in every run,
and a plain fused AdamW on the bf16 weights (the engine keeps fp32 masters in DeepSpeed's bf16 optimizer; the
forward and backward, which is what is timed, are the same).

Modes: ``eager``; ``compiled`` (``model.compile: true``: the memory layers' chunk step and the blocks' norms,
CMS / MLP and attention through ``torch.compile``, hope_scale/model/accel.py); ``triton`` (``model.kernel: triton``:
the memory chunk update's forward and first-order backward as fused Triton kernels, which in bf16 cover the
760m/1.3b shapes, hope_scale/model/kernels; the rest eager); ``compiled+triton`` (both: the kernel replaces the
compiled chunk step, the blocks stay compiled). Per mode: ``--warmup`` untimed steps (the first compiles), then
``--steps`` timed steps between CUDA synchronizations. The Triton rows have not been timed by this repository's authors (no GPU where the
kernel was written): docs/training.md section 7.

FLOPs per token are ``hope_scale/train/flops.py``'s (6N + attention + memory update/read terms, the same count
the training log uses); MFU = FLOPs/token x tokens/s / the device's dense bf16 peak from ``flops.PEAK_FLOPS``
(H100 SXM 989 TFLOP/s, H200 989, ...). An unknown GPU gets no MFU unless ``--peak-tflops`` is given. Peak memory
is ``torch.cuda.max_memory_allocated`` over the timed steps.

Without a CUDA device it prints why and exits with status 2 (it does not fall back to the CPU:
benchmarks/model_throughput.py is the CPU benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.parallel.recompute import apply_activation_checkpointing
from hope_scale.train.flops import detect_device, flops_per_token, peak_flops

NO_GPU_EXIT = 2
MODES = ("eager", "compiled", "triton", "compiled+triton")


def train_config(model: str) -> dict:
    """The training recipe of ``model`` (configs/train/<model>.yaml) as a mapping."""
    from hope_scale.train.config import TRAIN_CONFIG_DIR, read_yaml

    return read_yaml(TRAIN_CONFIG_DIR / f"{model}.yaml")


def run_mode(name: str, mode: str, seq_len: int, micro_batch: int, steps: int, warmup: int,
             checkpointing: str, device: str = "cuda") -> dict:
    """Time ``steps`` training steps of model ``name`` in ``mode`` on the current CUDA device (``device="cpu"``
    only for the test of this script, with a tiny model: no peak memory there)."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.named(name), compile=mode in ("compiled", "compiled+triton"),
                              kernel="triton" if mode in ("triton", "compiled+triton") else "naive")
    model = build_model(cfg).to(device=device, dtype=torch.bfloat16)
    apply_activation_checkpointing(model, checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    print(f"{name} {mode}: {warmup} warm-up step(s) in {warm:.0f} s", file=sys.stderr, flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    tokens_per_s = micro_batch * seq_len * steps / seconds
    fpt = flops_per_token(cfg, seq_len).total
    result = {"model": name, "mode": mode, "params": model.num_parameters(), "tokens_per_s": tokens_per_s,
              "tflops": fpt * tokens_per_s / 1e12,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "warmup_s": warm, "checkpointing": checkpointing}
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hope-760m", "transformer-760m"])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per step on the one GPU")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model and mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled", "triton"], choices=MODES)
    ap.add_argument("--checkpointing", default=None, choices=["none", "block", "memory"],
                    help="override the training config's train.activation_checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of this GPU, if not known")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_throughput.py: no CUDA device is visible (torch.cuda.is_available() is False), so there is "
              "nothing to measure; run it on a machine with an NVIDIA GPU (benchmarks/model_throughput.py is the "
              "CPU benchmark).", file=sys.stderr)
        return NO_GPU_EXIT
    device = detect_device()
    peak = peak_flops(device, "bf16", override=None if args.peak_tflops is None else args.peak_tflops * 1e12)
    print(f"## {torch.cuda.get_device_name()} ({device}; bf16 dense peak "
          f"{'unknown, no MFU' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}), torch {torch.__version__}, "
          f"seq {args.seq_len}, micro-batch {args.micro_batch}, {args.steps} timed steps")
    print("| model | mode | checkpointing | params | tokens/s | TFLOP/s | MFU | peak memory GiB | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        ckpt = args.checkpointing or (train_config(name).get("train") or {}).get("activation_checkpointing", "none")
        for mode in args.modes:
            r = run_mode(name, mode, args.seq_len, args.micro_batch, args.steps, args.warmup, ckpt)
            rows.append(r)
            util = "n/a" if peak is None else f"{100 * r['tflops'] * 1e12 / peak:.1f}%"
            print(f"| {name} | {mode} | {ckpt} | {r['params'] / 1e6:.0f}M | {r['tokens_per_s']:,.0f} | "
                  f"{r['tflops']:.1f} | {util} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |", flush=True)
    by = {(r["model"], r["mode"]): r["tokens_per_s"] for r in rows}
    for mode in args.modes:
        if ("hope-760m", mode) in by and ("transformer-760m", mode) in by:
            print(f"hope-760m / transformer-760m tokens/s ({mode}): "
                  f"{by[('hope-760m', mode)] / by[('transformer-760m', mode)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
