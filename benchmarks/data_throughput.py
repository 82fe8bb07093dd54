"""Data pipeline throughput on this machine: prepare-data (1 and 2 workers) and the streaming loader.

    python benchmarks/data_throughput.py [--corpus DIR] [--min-mb 20] [--seq-len 1024] [--bpe-vocab 8192]

The default corpus is a folder of real text made from this Python's standard library (its source,
test suites included, about 30 MB: the few files that are not UTF-8 are skipped and counted, as they
would be in any real folder). prepare-data is timed with the byte tokenizer and with a BPE tokenizer
trained here (``--bpe-vocab 0`` skips it), then the loader streams the byte-level dataset. The loader
must be at least 10x faster than training ``hope-tiny`` on the same machine (forward + backward +
AdamW, measured here too). Throughput excludes start-up (imports, planning), which is reported apart.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUIRED_RATIO = 10.0


def build_corpus(folder: Path, min_mb: float) -> int:
    """Copy the standard library's .py files (without site-packages) into ``folder``; return its size in bytes."""
    from data_prep.builtin_corpus import stdlib_root

    root, total = stdlib_root(), 0
    for dirpath, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(n for n in names if n.endswith(".py")):
            dst = folder / Path(dirpath, name).relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(dirpath, name), dst)
            total += dst.stat().st_size
    if total < min_mb * 1e6:
        raise SystemExit(f"the standard library gives only {total / 1e6:.1f} MB; pass a bigger --corpus")
    return total


def bench_prepare(corpus: Path, out: Path, seq_len: int, tokenizer: str, workers: int) -> dict:
    from data_prep.prepare import PrepareConfig, prepare_dataset

    started, cpu_before = time.perf_counter(), _cpu_seconds()
    s = prepare_dataset(PrepareConfig(out=out, inputs=[str(corpus)], seq_len=seq_len, tokenizer=tokenizer,
                                      workers=workers, overwrite=True, progress=False, quiet=True))
    return {
        "tokenizer": Path(tokenizer).name if tokenizer != "byte" else "byte", "workers": workers,
        "mb": s.text_bytes / 1e6, "tokens": sum(s.tokens.values()), "samples": sum(s.samples.values()),
        "skipped": sum(s.skipped.values()), "mb_s": s.mb_per_s, "tok_s": s.tokens_per_s,
        "seconds": s.seconds, "wall": time.perf_counter() - started,
        "cpu_main": _cpu_seconds()[0] - cpu_before[0], "cpu_workers": _cpu_seconds()[1] - cpu_before[1],
    }


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def bench_loader(data: Path, cache: Path, seq_len: int, batch: int, num_workers: int, seconds: float) -> float:
    """Training tokens per second the loader delivers to one rank (after its first batch)."""
    from hope_scale.data.loader import build_train_loader

    loader = build_train_loader({"path": str(data), "cache_dir": str(cache), "num_workers": num_workers},
                                seq_len=seq_len, micro_batch_size=batch, seed=0)
    next(loader)  # start-up: workers, shard copy into the cache
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        input_ids, _ = next(loader)
        n += input_ids.numel()
    rate = n / (time.perf_counter() - start)
    loader.close()
    return rate


def bench_hope_tiny(seq_len: int, batch: int, steps: int) -> float | None:
    """hope-tiny training tokens/s (forward + backward + AdamW), the best of 1 thread and all threads
    (the higher, the stricter the comparison), or None if the model is not available."""
    try:
        import torch

        from model_throughput import train_tokens_per_second  # benchmarks/ is on sys.path when run as a script
    except ImportError as err:
        print(f"model benchmark not importable ({err}): cannot compare with hope-tiny training throughput")
        return None
    threads = torch.get_num_threads()
    rates = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        rates.append(train_tokens_per_second("hope-tiny", batch, seq_len, steps)[0])
    torch.set_num_threads(threads)
    return max(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="folder of text files (default: built from the standard library)")
    ap.add_argument("--min-mb", type=float, default=20.0, help="smallest acceptable corpus")
    ap.add_argument("--seq-len", type=int, default=1024, help="sample length (hope-tiny's max_seq_len)")
    ap.add_argument("--bpe-vocab", type=int, default=8192, help="also time a BPE tokenizer of this size (0: skip)")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch size of the loader and of hope-tiny")
    ap.add_argument("--loader-seconds", type=float, default=10.0, help="how long to stream batches")
    ap.add_argument("--train-batch", type=int, default=1, help="sequences per timed hope-tiny step (CPU: keep it small)")
    ap.add_argument("--train-steps", type=int, default=2, help="timed hope-tiny optimizer steps")
    ap.add_argument("--workdir", type=Path, help="keep outputs here (default: a temporary folder)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hope-data-bench-"))
    os.environ["TMPDIR"] = str(work / "tmp")  # streaming's locks, private to this run
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(work / "tmp")
    corpus = args.corpus
    if corpus is None:
        corpus = work / "corpus"
        size = build_corpus(corpus, args.min_mb)
    else:
        size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"## prepare-data on {corpus} ({size / 1e6:.1f} MB), seq_len {args.seq_len}, {os.cpu_count()} CPU cores "
          f"(load average {load})")

    import streaming  # noqa: F401  (import once up front so that it is not part of any timing)

    tokenizers = ["byte"]
    if args.bpe_vocab:  # trained by the real command, in its own process
        started = time.perf_counter()
        tok_path = work / f"bpe{args.bpe_vocab}.json"
        subprocess.run([sys.executable, "-m", "hope_scale.cli", "train-tokenizer", str(corpus), "--vocab-size",
                        str(args.bpe_vocab), "--out", str(tok_path)], check=True, stdout=subprocess.DEVNULL)
        print(f"(trained a {args.bpe_vocab}-token BPE on the corpus with train-tokenizer in "
              f"{time.perf_counter() - started:.0f} s)")
        tokenizers.append(str(tok_path))

    print("| tokenizer | workers | MB of text | tokens | samples | skipped | MB/s | tokens/s | s (+start-up) "
          "| CPU s main / workers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tok in tokenizers:
        for workers in (1, 2):
            r = bench_prepare(corpus, work / f"data-{Path(tok).stem}-w{workers}", args.seq_len, tok, workers)
            print(f"| {r['tokenizer']} | {workers} | {r['mb']:.1f} | {r['tokens']:,} | {r['samples']:,} | {r['skipped']} "
                  f"| {r['mb_s']:.2f} | {r['tok_s']:,.0f} | {r['seconds']:.1f} (+{r['wall'] - r['seconds']:.1f}) "
                  f"| {r['cpu_main']:.1f} / {r['cpu_workers']:.1f} |")

    print(f"\n## Loader: batches of {args.batch} x {args.seq_len} tokens, one rank")
    rates = {}
    for num_workers in (0, 1):
        rates[num_workers] = bench_loader(work / "data-byte-w1", work / f"cache-{num_workers}", args.seq_len, args.batch,
                                          num_workers, args.loader_seconds)
        print(f"- num_workers={num_workers}: {rates[num_workers]:,.0f} tokens/s")
    train = bench_hope_tiny(args.seq_len, args.train_batch, args.train_steps)
    loader_rate = min(rates.values())
    if train is None:
        print(f"requirement: the loader ({loader_rate:,.0f} tokens/s) must deliver >= {REQUIRED_RATIO:.0f}x "
              "hope-tiny's training tokens/s; measure it once hope_scale.model is available")
        status = 0
    else:
        ratio = loader_rate / train
        ok = ratio >= REQUIRED_RATIO
        print(f"- hope-tiny training (forward+backward+AdamW, batch {args.train_batch} x {args.seq_len}): {train:,.0f} tokens/s")
        print(f"- loader / training = {ratio:,.0f}x (required >= {REQUIRED_RATIO:.0f}x): {'OK' if ok else 'TOO SLOW'}")
        status = 0 if ok else 1
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
