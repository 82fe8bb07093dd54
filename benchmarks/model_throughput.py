"""Model throughput on this machine: training tokens/s of Hope vs baselines, eager vs compiled, chunk-parallel
vs token loop.

    python benchmarks/model_throughput.py [--seq-len 512] [--batch 4] [--steps 3] [--repeats 2] [--no-compile]

Prints two tables. Ratios are measured in one run on one machine, so they are comparable; absolute
numbers depend on the CPU and its load. Compiled rows (``model.compile: true``, Inductor) are timed after a
warm-up step that compiles them; the compile time is printed separately. Achieved GFLOP/s uses the FLOP count of
``hope_scale/train/flops.py`` (the same for eager and compiled), so the gap between models splits into "more
FLOPs per token by design" (the FLOP/token column) and "lower FLOP/s" (the GFLOP/s column).

``model.kernel: triton`` (the fused Triton chunk update, hope_scale/model/kernels) needs CUDA: with a GPU a third
table times hope-tiny on it, naive vs kernel; on a CPU-only machine the script says that these rows need CUDA
(the kernel's CPU interpreter is a correctness tool, far slower than PyTorch).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.model.accel import compile_model
from hope_scale.model.reference import reference_forward
from hope_scale.model.titans import SelfModifyingTitans
from hope_scale.train.flops import flops_per_token


MODES = {"eager": "", "compiled": " compiled", "step": " compiled (chunk step only)",
         "triton": " model.kernel=triton"}


def train_tokens_per_second(name: str, batch: int, seq_len: int, steps: int, mode: str = "eager",
                            repeats: int = 1, device: str = "cpu") -> tuple[float, float, ModelConfig, int]:
    """(tokens/s, seconds of the warm-up step, config, parameters) of AdamW training steps. ``mode``: ``eager``,
    ``compiled`` (``model.compile: true``: chunk step and blocks), ``step`` (the chunk step only, as the training
    engine compiles it) or ``triton`` (``model.kernel: triton``; needs ``device="cuda"``)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.named(name), compile=mode == "compiled",
                              kernel="triton" if mode == "triton" else "naive")
    model = build_model(cfg).to(device)
    if mode == "step":
        compile_model(model, blocks=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()

    start = time.perf_counter()
    step()  # warm-up (and compilation)
    sync()
    warm = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):  # the best window: other jobs on the machine only ever slow a window down
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        best = min(best, time.perf_counter() - start)
    return batch * seq_len * steps / best, warm, cfg, model.num_parameters()


def layer_forward_seconds(fn, repeats: int = 1) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per window")
    ap.add_argument("--repeats", type=int, default=2, help="timed windows per model (the best is reported)")
    ap.add_argument("--oracle-seq-len", type=int, default=2048, help="sequence length of the layer comparison")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (minutes of compilation)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    print(f"## Training throughput (forward+backward+AdamW), batch {args.batch} x seq {args.seq_len}, "
          f"{torch.get_num_threads()} threads")
    print("| model | params | tokens/s | vs Transformer++ eager | train GFLOP/token | achieved GFLOP/s | "
          "warm-up step s |")
    print("|---|---|---|---|---|---|---|")
    runs = [(name, "eager") for name in ("transformer-tiny", "hope-tiny", "titans-tiny", "hope-attention-tiny")]
    if not args.no_compile:
        runs += [("transformer-tiny", "compiled"), ("hope-tiny", "compiled"), ("hope-tiny", "step"),
                 ("titans-tiny", "step")]
    results = {run: train_tokens_per_second(run[0], args.batch, args.seq_len, args.steps, mode=run[1],
                                         repeats=args.repeats)
               for run in runs}
    base = results[("transformer-tiny", "eager")][0]
    for (name, mode), (tps, warm, cfg, n) in results.items():
        fpt = flops_per_token(cfg, args.seq_len).total
        print(f"| {name}{MODES[mode]} | {n / 1e6:.2f}M | {tps:,.0f} | {tps / base:.3f} | {fpt / 1e9:.4f} | "
              f"{fpt * tps / 1e9:.2f} | {warm:.1f} |")
    for name, mode in runs:
        if mode != "eager":
            ratio = results[(name, mode)][0] / results[(name, "eager")][0]
            print(f"{name}{MODES[mode]} / eager tokens/s: {ratio:.2f}")

    print(f"\n## One Hope layer (hope-tiny shapes), forward, batch 1 x seq {args.oracle_seq_len}, float32")
    cfg = ModelConfig.named("hope-tiny")
    torch.manual_seed(0)
    layer = SelfModifyingTitans(cfg)
    x = torch.randn(1, args.oracle_seq_len, cfg.d_model)
    with torch.no_grad():
        fast = layer_forward_seconds(lambda: layer(x), repeats=3)
        slow = layer_forward_seconds(lambda: reference_forward(layer, x), repeats=1)
    print("| implementation | seconds | tokens/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| chunk-parallel (C_mem={cfg.chunk_size_memory}, C_proj={cfg.chunk_size_projection}) | {fast:.3f} | "
          f"{args.oracle_seq_len / fast:,.0f} | {slow / fast:.1f}x |")
    print(f"| token-by-token reference | {slow:.3f} | {args.oracle_seq_len / slow:,.0f} | 1.0x |")

    print("\n## Memory chunk kernel (model.kernel), hope-tiny training, float32")
    if not torch.cuda.is_available():
        print("The model.kernel=triton rows need CUDA (no CUDA device here): the Triton kernel runs on a GPU; on a "
              "CPU it only runs in Triton's interpreter, for the tests. See docs/training.md section 7.")
        return
    print(f"{torch.cuda.get_device_name()}, batch {args.batch} x seq {args.seq_len}")
    print("| model | tokens/s | vs naive | warm-up step s |")
    print("|---|---|---|---|")
    gpu = {mode: train_tokens_per_second("hope-tiny", args.batch, args.seq_len, args.steps, mode=mode,
                                         repeats=args.repeats, device="cuda")
           for mode in ("eager", "triton")}
    for mode, (tps, warm, _, _) in gpu.items():
        print(f"| hope-tiny{MODES[mode] or ' naive'} (cuda) | {tps:,.0f} | {tps / gpu['eager'][0]:.2f} | "
              f"{warm:.1f} |")


if __name__ == "__main__":
    main()
