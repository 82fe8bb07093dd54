"""Compile the chunk-update kernels for an H100/H200 (sm_90) on a machine without a GPU, to read what a program
needs on chip: the front end down to a cubin with triton's bundled ptxas, no device involved. Triton's CPU
interpreter (the kernel tests) runs code the GPU compiler may reject and does not see shared memory; this does.

Run in a process where ``triton_chunk`` was imported without ``TRITON_INTERPRET`` (the kernels must be JIT
functions, not interpreted ones)."""

from __future__ import annotations

from dataclasses import dataclass

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size
KERNELS = {"forward": "_chunk_update_kernel", "backward": "_chunk_update_bwd_kernel",
           "sequence forward": "_sequence_update_kernel", "sequence backward": "_sequence_update_bwd_kernel"}
INTEGERS = ("C", "D", "HID", "last", "n_chunks", "n_full")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHARED_BYTES = 232448  # shared memory one block may use on sm_90 (227 KiB)


@dataclass(frozen=True)
class Compiled:
    shared_bytes: int  # shared memory one program (block) needs
    cubin_bytes: int

    def fits(self) -> bool:
        return 0 < self.shared_bytes <= SHARED_BYTES


def compile_sm90(kernel: str, dtype: str, c: int, d: int, h: int, *, normalized: bool = True, bound: bool = True,
                 erase: bool = True, reads: bool = True, anchor: bool = True) -> Compiled:
    """Compile ``kernel`` (a key of ``KERNELS``) for sm_90 with inputs of ``dtype`` ("fp32", "bf16", "fp16"),
    chunk size c, key width d and hidden width h (padded as at launch) and the given constexpr branches, as
    ``launch_chunk_update`` / ``launch_chunk_update_bwd`` (``launch_sequence_update`` / ``_bwd``: with reads, and
    Hope's self-generated targets) would launch it."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_chunk as tc

    if tc.INTERPRETED:
        raise RuntimeError("triton_chunk was imported with TRITON_INTERPRET=1: its kernels cannot be compiled")
    fn = getattr(tc, KERNELS[kernel])
    sig = {n: ("*" + dtype if n.endswith(("_ptr", "_out", "_grad")) else "i32" if n in INTEGERS
               else "fp32" if n == "step_bound" else "constexpr") for n in fn.arg_names}
    blocks = dict(BC=tc.block(c), BD=tc.block(d), BH=tc.block(h))
    consts = dict(blocks, NORMALIZED=normalized, BOUND=bound, ERASE=erase, ANCHOR=anchor,
                  PRECISION=tc.PRECISION[getattr(torch, DTYPES[dtype])])
    if kernel.startswith("sequence"):  # always with reads; Hope's self-generated targets
        consts["SELF_TARGET"] = True
    else:
        consts["READS"] = reads
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget(*TARGET),
                              options=dict(num_warps=tc.num_warps(*blocks.values())))
    return Compiled(compiled.metadata.shared, len(compiled.asm["cubin"]))
