"""Operations per training step -- about the number of GPU kernel launches -- of the 760m models at seq 4096.

    python benchmarks/op_count.py [--models hope-760m transformer-760m] [--seq-len 4096] [--kernels naive triton]

Why: on one H200 (docs/training.md section 7) hope-760m trains at 107 tokens/s with ``model.kernel: triton`` and
did not finish an eager step in two minutes, while transformer-760m runs 28,457 tokens/s: Hope's memory layers
update chunk by chunk (seq 4096 / C = 16: 256 main-memory chunks and 64 projection-memory chunks per layer), each
chunk a handful of small operations, so a step is a long series of tiny kernels whose launch and Python overhead,
not FLOPs, sets the time. This script counts them, on the CPU: every ATen operation that a GPU runs as at least one
kernel (views and allocations excluded; counted with a TorchDispatchMode through forward, the activation
checkpointing recomputation and backward of one training step's loss) plus the Triton launches of
``model.kernel: triton`` (run in Triton's CPU interpreter, whose own array work is not counted).

Op counts do not depend on the width, so each model runs at its own depth structure, chunk sizes and sequence
length but with d_model 128 (2 heads of 64, the shipped head size): one and two layers are counted, and the
difference (one block) is scaled to the model's depth. With the training config's activation checkpointing.
Divide a measured GPU step time by the count for the mean time per operation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hope_scale.model import ModelConfig, build_model
from hope_scale.parallel.recompute import apply_activation_checkpointing

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",  # allocations only
             "_unsafe_view"}  # a view that is not tagged as one


class OpCounter(TorchDispatchMode):
    """Counts ATen operations that launch device work (not views, not bare allocations), and Triton launches;
    operations issued inside a Triton launch (the interpreter's own copies) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.launches = 0
        self.inside_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_launch and not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))

    def counting(self, launch):
        def wrapped(*args, **kwargs):
            self.launches += 1
            self.inside_launch += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.inside_launch -= 1
        return wrapped

    def counting_kernel(self, kernel):
        """A kernel whose launches ``kernel[grid](...)`` are counted (the launchers' own tensor work is not a
        launch: it counts as operations)."""
        counter = self

        class Counted:
            def __getitem__(self, grid):
                return counter.counting(kernel[grid])
        return Counted()


def count_step(cfg: ModelConfig, seq_len: int, checkpointing: str) -> tuple[int, int]:
    """(ATen operations, Triton launches) of one bf16 training step (loss, backward) of ``cfg`` on one sequence."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(build_model(cfg).to(torch.bfloat16), checkpointing)  # as trained
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
    counter = OpCounter()
    patched = []  # (module, name, kernel)
    if cfg.kernel == "triton":
        import importlib

        from hope_scale.model.kernels import sm90

        for module_name, name in sm90.KERNELS.values():  # every Triton kernel of model.kernel: triton
            module = importlib.import_module(f"hope_scale.model.kernels.{module_name}")
            patched.append((module, name, getattr(module, name)))
            setattr(module, name, counter.counting_kernel(getattr(module, name)))
    try:
        with counter:
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
    finally:
        for module, name, launch in patched:
            setattr(module, name, launch)
    return counter.ops, counter.launches


def count_model(name: str, seq_len: int, kernel: str) -> dict:
    """Operations per step of model ``name`` at its depth, from one- and two-layer counts at d_model 128."""
    from gpu_throughput import train_config  # this folder is on sys.path when a benchmark runs

    full = ModelConfig.named(name)
    checkpointing = (train_config(name).get("train") or {}).get("activation_checkpointing", "none")
    narrow = dict(d_model=128, n_heads=2, head_dim=None, vocab_size=512, kernel=kernel)
    one = count_step(dataclasses.replace(full, n_layers=1, **narrow), seq_len, checkpointing)
    two = count_step(dataclasses.replace(full, n_layers=2, **narrow), seq_len, checkpointing)
    block = [b - a for a, b in zip(one, two)]
    rest = [a - b for a, b in zip(one, block)]
    ops, launches = (r + full.n_layers * b for r, b in zip(rest, block))
    return {"model": name, "kernel": kernel, "layers": full.n_layers, "checkpointing": checkpointing,
            "block_ops": block[0] + block[1], "ops": ops, "launches": launches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hope-760m", "transformer-760m"])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--kernels", nargs="+", default=["naive", "triton"], choices=["naive", "triton"],
                    help="model.kernel values for the Hope models (triton runs in Triton's CPU interpreter)")
    args = ap.parse_args(argv)
    if "triton" in args.kernels and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is imported, which happens later
    print(f"## Operations per training step (forward, recomputation, backward), seq {args.seq_len}, 1 sequence")
    print("| model | model.kernel | checkpointing | layers | ATen ops + Triton launches per block | "
          "ATen ops per step | Triton launches per step | total per step |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        kernels = args.kernels if ModelConfig.named(name).arch in ("hope", "titans") else ["naive"]
        for kernel in kernels:
            r = count_model(name, args.seq_len, kernel)
            print(f"| {name} | {kernel} | {r['checkpointing']} | {r['layers']} | {r['block_ops']:,} | {r['ops']:,} | "
                  f"{r['launches']:,} | {r['ops'] + r['launches']:,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
