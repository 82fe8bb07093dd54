"""Compile the chunk-update kernels for an H100/H200 (sm_90) on a machine without a GPU, to read what a program
needs on chip: the front end down to a cubin with triton's bundled ptxas, no device involved. Triton's CPU
interpreter (the kernel tests) runs code the GPU compiler may reject and does not see shared memory; this does.

Run in a process where ``triton_chunk`` was imported without ``TRITON_INTERPRET`` (the kernels must be JIT
functions, not interpreted ones)."""

from __future__ import annotations

from dataclasses import dataclass

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size
KERNELS = {  # name: (module of this package, kernel)
    "forward": ("triton_chunk", "_chunk_update_kernel"), "backward": ("triton_chunk", "_chunk_update_bwd_kernel"),
    "sequence forward": ("triton_chunk", "_sequence_update_kernel"),
    "sequence backward": ("triton_chunk", "_sequence_update_bwd_kernel"),
    "coefficients forward": ("triton_coefficients", "_chunk_coefficients_kernel"),
    "coefficients backward": ("triton_coefficients", "_chunk_coefficients_bwd_kernel"),
    "projection reads forward": ("triton_projection", "_projection_reads_kernel"),
    "projection reads backward": ("triton_projection", "_projection_reads_bwd_kernel"),
    "projection scan forward": ("triton_projection_scan", "_projection_scan_kernel"),
    "projection scan backward": ("triton_projection_scan", "_projection_scan_bwd_kernel")}
INTEGERS = ("C", "D", "HID", "last", "n_chunks", "n_full", "P", "PX", "H", "share", "n_anchors", "sx_n", "sx_p",
            "sx_t")
FLOATS = ("step_bound", "tiny", "eta_max")
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
    chunk size c, key width d and hidden width h (padded as at launch) and the given constexpr branches (those
    the kernel has: the sequence kernels always read, with Hope's self-generated targets; the projection reads
    with normalized values, adaptive q and the memory on), as its launcher would launch it."""
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_chunk as tc

    module_name, kernel_name = KERNELS[kernel]
    module = importlib.import_module(f".{module_name}", __package__)
    if module.INTERPRETED:
        raise RuntimeError(f"{module_name} was imported with TRITON_INTERPRET=1: its kernels cannot be compiled")
    fn = getattr(module, kernel_name)
    sig = {n: ("*" + dtype if n.endswith(("_ptr", "_out", "_grad")) else "i32" if n in INTEGERS
               else "fp32" if n in FLOATS else "constexpr") for n in fn.arg_names}
    blocks = {k: v for k, v in dict(BC=tc.block(c), BD=tc.block(d), BH=tc.block(h)).items() if k in fn.arg_names}
    consts = dict(blocks, NORMALIZED=normalized, BOUND=bound, ERASE=erase, READS=reads, ANCHOR=anchor,
                  SELF_TARGET=True, NORM_V=True, ADAPTIVE_Q=True, FROZEN=False,
                  PRECISION=tc.PRECISION[getattr(torch, DTYPES[dtype])])
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget(*TARGET),
                              options=dict(num_warps=tc.num_warps(*blocks.values())))
    return Compiled(compiled.metadata.shared, len(compiled.asm["cubin"]))
