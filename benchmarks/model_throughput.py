"""Model throughput on this machine: training tokens/s of Hope vs baselines, chunk-parallel vs token loop.

    python benchmarks/model_throughput.py [--seq-len 512] [--batch 4] [--steps 3]

Prints two tables. Ratios are measured in one run on one machine, so they are comparable; absolute
numbers depend on the CPU and its load.
"""

from __future__ import annotations

import argparse
import time

import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.model.reference import reference_forward
from hope_scale.model.titans import SelfModifyingTitans


def train_tokens_per_second(name: str, batch: int, seq_len: int, steps: int) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1))

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seq_len * steps / (time.perf_counter() - start), model.num_parameters()


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
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model")
    ap.add_argument("--oracle-seq-len", type=int, default=2048, help="sequence length of the layer comparison")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    print(f"## Training throughput (forward+backward+AdamW), batch {args.batch} x seq {args.seq_len}, "
          f"{torch.get_num_threads()} threads")
    print("| model | params | tokens/s | vs Transformer++ |")
    print("|---|---|---|---|")
    results = {}
    for name in ("transformer-tiny", "hope-tiny", "titans-tiny", "hope-attention-tiny"):
        results[name] = train_tokens_per_second(name, args.batch, args.seq_len, args.steps)
    base = results["transformer-tiny"][0]
    for name, (tps, n) in results.items():
        print(f"| {name} | {n / 1e6:.2f}M | {tps:,.0f} | {tps / base:.3f} |")

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


if __name__ == "__main__":
    main()
