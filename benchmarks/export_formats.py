"""Size, held-out perplexity and decoding speed of each export format of a checkpoint, as `transformers` runs it.

    python benchmarks/export_formats.py --checkpoint runs/hope.pt [--checkpoint runs/tf.pt] \
        --text tests/data/tinyshakespeare-head.txt [--holdout-fraction 0.1] [--tokens 2048] [--new-tokens 128]

For every checkpoint: the native model, then exports (hf fp32 / bf16 / fp16 / int8 / int8+bf16, and llama fp32 /
bf16 for Transformer++) loaded with ``from_pretrained(..., dtype="auto")``. Prints one markdown table: weight
bytes on disk, perplexity on the first ``--tokens`` tokens of the held-out end of ``--text`` (the part
``train-synthetic --holdout-fraction`` did not train on) relative to fp32, and greedy decoding tokens/s at batch 1
(``generate()`` of ``--new-tokens`` tokens after a 64-token prompt, recurrent cache; the best of 2 runs).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

FORMATS = [("hf fp32", ["--format", "hf"]), ("hf bf16", ["--dtype", "bf16"]), ("hf fp16", ["--dtype", "fp16"]),
           ("hf int8", ["--quantize", "int8"]), ("hf int8 + bf16", ["--quantize", "int8", "--dtype", "bf16"])]
LLAMA_FORMATS = [("llama fp32", ["--format", "llama"]), ("llama bf16", ["--format", "llama", "--dtype", "bf16"])]


def held_out_tokens(text_file: str, fraction: float, n: int) -> torch.Tensor:
    from hope_scale.data.tokenizer import ByteTokenizer
    from hope_scale.eval.corpus import load_domain

    return torch.tensor([load_domain(text_file, ByteTokenizer(), fraction).heldout[:n].tolist()])


def perplexity(logits_fn, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = logits_fn(ids)
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


def decode_tokens_per_s(generate, prompt: torch.Tensor, new_tokens: int) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        with torch.no_grad():
            generate(prompt, new_tokens)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def main() -> None:
    from transformers import AutoModelForCausalLM

    from hope_scale.cli import main as cli
    from hope_scale.eval.checkpoint_io import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--holdout-fraction", type=float, default=0.1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = held_out_tokens(args.text, args.holdout_fraction, args.tokens)
    prompt = ids[:, :64]
    print(f"held-out tokens: {ids.shape[1]}; decoding: {args.new_tokens} new tokens after a 64-token prompt, "
          f"batch 1, {torch.get_num_threads()} thread(s)\n")
    print("| checkpoint | format | weights on disk | perplexity | vs fp32 | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for checkpoint in args.checkpoint:
        loaded = load_checkpoint(checkpoint, log=lambda m: None)
        model, name = loaded.model, Path(checkpoint).stem
        base = perplexity(model, ids)
        speed = decode_tokens_per_s(lambda p, n: model.generate(p, n, temperature=0), prompt, args.new_tokens)
        print(f"| {name} ({loaded.config.arch}) | native (hope-scale) | - | {base:.3f} | 1 | {speed:.0f} |", flush=True)
        formats = FORMATS + (LLAMA_FORMATS if loaded.config.arch == "transformer" else [])
        work = Path(tempfile.mkdtemp())
        try:
            for label, extra in formats:
                out = work / label.replace(" ", "_").replace("+", "")
                assert cli(["export", "--checkpoint", checkpoint, "--out", str(out), *extra]) == 0
                size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
                hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype="auto").eval()
                ppl = perplexity(lambda x: hf(x).logits, ids)
                speed = decode_tokens_per_s(
                    lambda p, n: hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False), prompt,
                    args.new_tokens)
                print(f"| {name} | {label} | {size / 2**10:.0f} KiB | {ppl:.3f} | {ppl / base:.5f} | {speed:.0f} |",
                      flush=True)
        finally:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
