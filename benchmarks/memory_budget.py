"""GPU memory per rank of the 760M / 1.3B training runs, from activation bytes measured on this machine.

    python benchmarks/memory_budget.py [--models hope-760m hope-1.3b] [--seq-len 4096] [--micro-batches 1 2 3 4]
                                       [--tensor-parallel 1 2] [--layers 1 2] [--dtype bf16]
                                       [--modes none block memory]

1. Activations (measured). For each tensor-parallel size, the model a TP rank runs -- the same widths with
   n_heads / tp heads (head dim kept), MLP / CMS hidden widths / tp and vocabulary / tp, which are exactly the
   local shapes of ``hope_scale/parallel/parallelize.py`` -- is built with ``--layers`` blocks at full width, in
   the training dtype, and one forward + backward of one sequence of ``--seq-len`` tokens is run on this CPU under
   ``AllocationMeter`` (hope_scale/train/memory_meter.py) with each activation checkpointing mode. Peak minus the
   gradients left at the end is the activation peak; a line through the layer counts gives, per mode, the bytes
   each block keeps for backward (slope) and the rest (intercept: embedding, head, loss, and with checkpointing
   the one block being recomputed). Both scale linearly with the micro-batch (measured at 1).
2. Per GPU, for a layout TP x PP x DP with ZeRO-1, bf16 (DeepSpeed's bf16 optimizer, fp32 gradient
   accumulation): bf16 weights (2 B/param) + bf16 gradients (2) + the fp32 gradient-accumulation buffer (4, not
   partitioned) + fp32 master weights and AdamW moments (12) and CMS gradient buffers (4, CMS levels) partitioned
   over DP; parameters of the largest pipeline stage (L/PP blocks + one embedding copy). Activations of the first
   stage, which holds PP micro-batches in flight under 1F1B: intercept + L x slope (PP does not shrink it).
3. Fits if 1.1 x (weights + gradients + optimizer + activations) + 2 GiB (CUDA context, NCCL and cuBLAS
   workspaces) <= 79.1 GiB (what an H100 80GB gives PyTorch); the 10% stands for allocator fragmentation.

The shipped configs (configs/train/<model>.yaml) are marked; their layout must fit (docs/training.md has the
table). Measured in one process on CPU; GPU kernels may hold other temporaries than PyTorch's CPU kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.model.layers import swiglu_hidden
from hope_scale.parallel.recompute import MODES, apply_activation_checkpointing
from hope_scale.train.config import TRAIN_CONFIG_DIR, TrainConfig, read_yaml
from hope_scale.train.memory_meter import AllocationMeter
from hope_scale.train.step import cms_level_of

GIB = 2 ** 30
USABLE_GIB = 79.1  # H100 80GB as PyTorch sees it
RESERVE_GIB = 2.0
FRAGMENTATION = 1.1
WORLD = {"760m": 8, "1.3b": 16}  # GPUs of the shipped configs (one node / two nodes of 8)


def rank_local_config(cfg: ModelConfig, tp: int, layers: int) -> ModelConfig:
    """The model one TP rank computes: heads, MLP/CMS hidden widths and vocabulary divided by ``tp``."""
    d = cfg.d_model
    per_rank = lambda mult: swiglu_hidden(d, mult) / tp / d  # noqa: E731  hidden_mult of the local slice
    levels = [dataclasses.replace(lvl, hidden_mult=per_rank(lvl.hidden_mult)) for lvl in cfg.cms_levels]
    return dataclasses.replace(cfg, n_layers=layers, n_heads=cfg.n_heads // tp, head_dim=cfg.d_head,
                               vocab_size=cfg.vocab_size // tp, cms_levels=levels,
                               mlp_hidden_mult=per_rank(cfg.mlp_hidden_mult))


def measure_peak(cfg: ModelConfig, mode: str, seq_len: int, dtype: torch.dtype) -> int:
    """Activation peak (bytes) of one forward + backward of one sequence: peak minus the final gradients."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(build_model(cfg).to(dtype), mode)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
    with AllocationMeter() as meter:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    return meter.peak_bytes - meter.live_bytes


@dataclasses.dataclass
class Activations:
    per_block: float  # bytes a block keeps for backward, per sequence
    rest: float  # everything else at the peak, per sequence

    def per_gpu(self, blocks: int, micro_batch: int) -> float:
        return micro_batch * (self.rest + blocks * self.per_block)


def fit(layers: list[int], peaks: list[int]) -> Activations:
    n = len(layers)
    mx, my = sum(layers) / n, sum(peaks) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(layers, peaks)) / sum((x - mx) ** 2 for x in layers)
    return Activations(slope, my - slope * mx)


def state_bytes(cfg: ModelConfig, tp: int, pp: int, dp: int) -> float:
    """Weights, gradients and optimizer state on the rank of the largest pipeline stage (bf16, ZeRO-1)."""
    with torch.device("meta"):
        local = build_model(rank_local_config(cfg, tp, cfg.n_layers // pp))
    total = 0.0
    for name, p in local.named_parameters():  # one stage's blocks and one (tied) embedding copy
        per_param = 2 + 2 + 4 + (12 + (4 if cms_level_of(name) is not None else 0)) / dp
        total += p.numel() * per_param
    return total


def fits(total_bytes: float) -> bool:
    return FRAGMENTATION * total_bytes / GIB + RESERVE_GIB <= USABLE_GIB


def shipped_layout(model: str) -> tuple[int, int, int, int]:
    """(TP, PP, micro-batch, mode index) of configs/train/<model>.yaml."""
    size = model.rsplit("-", 1)[1]
    cfg = TrainConfig.from_dict(read_yaml(TRAIN_CONFIG_DIR / f"{model}.yaml"), world_size=WORLD[size])
    return (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.micro_batch_size,
            cfg.train.activation_checkpointing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hope-760m", "hope-1.3b"])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--tensor-parallel", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pipeline-parallel", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="block counts the line is fitted on")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="checkpointing modes to measure (hope-1.3b's `none` at 2 blocks needs ~12 GiB of RAM)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    for model in args.models:
        cfg = ModelConfig.named(model)
        world = WORLD[model.rsplit("-", 1)[1]]
        shipped = shipped_layout(model)
        print(f"\n## {model} (L={cfg.n_layers}), seq {args.seq_len}, {args.dtype}, {world} GPUs, ZeRO-1")
        acts: dict[tuple[int, str], Activations] = {}
        for tp in args.tensor_parallel:
            for mode in args.modes:
                peaks = []
                for layers in args.layers:
                    started = time.perf_counter()
                    peaks.append(measure_peak(rank_local_config(cfg, tp, layers), mode, args.seq_len, dtype))
                    print(f"measured TP={tp} {mode:6s} {layers} block(s): activation peak {peaks[-1] / GIB:.2f} GiB "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                acts[(tp, mode)] = fit(args.layers, peaks)
        print("\nper sequence: | TP | checkpointing | kept per block | rest (embedding, head, loss, recompute) |")
        print("|---|---|---|---|")
        for (tp, mode), a in acts.items():
            print(f"| {tp} | {mode} | {a.per_block / GIB:.3f} GiB | {a.rest / GIB:.2f} GiB |")
        head = " | ".join(f"micro-batch {mb}" for mb in args.micro_batches)
        print(f"\nGiB per GPU (weights + gradients + optimizer + activations; fits: {FRAGMENTATION} x total + "
              f"{RESERVE_GIB:g} GiB <= {USABLE_GIB} GiB)")
        print(f"| layout | checkpointing | states | {head} |")
        print("|---|---|---|" + "---|" * len(args.micro_batches))
        for tp in args.tensor_parallel:
            for pp in args.pipeline_parallel:
                if world % (tp * pp) or cfg.n_layers % pp:
                    continue
                states = state_bytes(cfg, tp, pp, world // (tp * pp))
                for mode in args.modes:
                    cells = []
                    for mb in args.micro_batches:
                        total = states + acts[(tp, mode)].per_gpu(cfg.n_layers, mb)
                        mark = "**shipped**, " if (tp, pp, mb, mode) == shipped else ""
                        cells.append(f"{mark}{total / GIB:.1f} {'fits' if fits(total) else 'NO'}")
                    print(f"| TP{tp} PP{pp} DP{world // (tp * pp)} | {mode} | {states / GIB:.1f} | "
                          + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
