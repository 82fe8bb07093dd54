"""Shared memory the fused chunk-update kernels need on an H100/H200, compiled for sm_90 on this machine (no GPU).

    python benchmarks/kernel_shared_memory.py [--models hope-760m hope-1.3b] [--dtypes bf16 fp16 fp32]

A Triton program of ``model.kernel: triton`` keeps one memory's whole chunk on chip, so its tiles (C, d, h padded
to powers of two >= 16) must fit the 227 KiB of shared memory one block may use on sm_90; the interpreter the
kernel tests run in cannot see this. For each shipped model's two memory shapes -- the main memory (C =
chunk_size_memory, with reads) and the stacked projection memories (C = chunk_size_projection, no reads), head
size d and memory hidden width h -- and each dtype, both kernels are compiled with the default rule's branches
(normalized eta, step bound, erase, retention toward the initial weights) through
``hope_scale.model.kernels.sm90.compile_sm90`` (triton's front end and bundled ptxas), and the table gives the
shared memory per program, whether it fits, and whether the layer would run the kernel (the backward's tile
limit, ``triton_chunk.BWD_MAX_BLOCK``, is per dtype: where it is exceeded the backward recomputes in PyTorch).
The main memory's rows include the sequence kernels (``kernels/sequence_update.py``: a forward's whole chunks in
one program), which run only within the backward's tile limit, and every memory's rows the chunk-coefficient
kernels (``kernels/coefficients.py``), and the projection memories' rows their reads kernels
(``kernels/projection_reads.py``) and scan kernels (``kernels/projection_scan.py``: a forward's whole chunks of
all five memories in one program, within the backward's tile limit).
Compiling takes about 10-60 s per row on a CPU in 16 bits; fp32 at 64 tiles takes many minutes (its IEEE
products unroll into scalar code), and rows the layer would not run (the fp32 backward beyond 32) are skipped.
"""

from __future__ import annotations

import argparse

import torch

from hope_scale.model import ModelConfig
from hope_scale.model.kernels import sm90
from hope_scale.model.kernels import triton_chunk as tc
from hope_scale.model.kernels import triton_coefficients as tcoef
from hope_scale.model.kernels import triton_projection as tproj

KIB = 1024


def memory_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, int, bool]]:
    """(C, d, h, reads) of the main memory and of the projection memories of a Hope model."""
    d = cfg.d_head
    return {"main": (cfg.chunk_size_memory, d, cfg.d_mem_hidden, True),
            "projection": (cfg.chunk_size_projection, d, cfg.d_proj_hidden, False)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hope-760m", "hope-1.3b"], help="names from configs/model")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(sm90.DTYPES))
    args = ap.parse_args(argv)

    shapes = {}  # the same shapes across models are compiled once
    for name in args.models:
        for memory, shape in memory_shapes(ModelConfig.named(name)).items():
            shapes.setdefault(shape, []).append(f"{name} {memory}")
    print(f"| memories | C, d, h | dtype | kernel | shared memory (KiB, of {sm90.SHARED_BYTES // KIB}) | fits | "
          "runs |")
    print("|---|---|---|---|---|---|---|")
    for (c, d, h, reads), users in shapes.items():
        tiles = max(tc.block(c), tc.block(d), tc.block(h))
        for dtype in args.dtypes:
            bwd_largest = tc.BWD_MAX_BLOCK[getattr(torch, sm90.DTYPES[dtype])]
            largest = {"forward": tc.MAX_BLOCK, "backward": bwd_largest, "sequence forward": bwd_largest,
                       "sequence backward": bwd_largest, "coefficients forward": tcoef.MAX_BLOCK,
                       "coefficients backward": tcoef.MAX_BLOCK, "projection reads forward": tproj.MAX_BLOCK,
                       "projection reads backward": tproj.MAX_BLOCK, "projection scan forward": bwd_largest,
                       "projection scan backward": bwd_largest}
            # the main memory also scans whole chunks with the sequence kernels (both need the backward's tiles);
            # every memory's chunk coefficients are one more kernel each way, and the projection memories' reads
            # and their scan over whole chunks
            kernels = ("forward", "backward") + (("sequence forward", "sequence backward") if reads else
                                                 ("projection reads forward", "projection reads backward",
                                                  "projection scan forward", "projection scan backward"))
            for kernel in kernels + ("coefficients forward", "coefficients backward"):
                if tiles > largest[kernel]:
                    size, fits, runs = "not compiled", "-", f"no: tiles {tiles} > {largest[kernel]}, PyTorch"
                else:
                    compiled = sm90.compile_sm90(kernel, dtype, c, d, h, reads=reads)
                    size, fits = f"{compiled.shared_bytes / KIB:.0f}", "yes" if compiled.fits() else "**no**"
                    runs = "yes" if compiled.fits() else "no: out of resources, PyTorch"
                print(f"| {', '.join(users)} | {c}, {d}, {h} | {dtype} | {kernel} | {size} | {fits} | {runs} |",
                      flush=True)


if __name__ == "__main__":
    main()
