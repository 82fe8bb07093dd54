"""``model.kernel``: which implementation runs the memory layers' chunk update (docs/training.md, section 7).

* ``naive`` (default): ``memory.chunk_step`` in PyTorch (or its ``torch.compile`` graph under ``model.compile``).
* ``triton``: ``chunk_update.kernel_chunk_step``: the chunk's coefficients (below), the state-dependent rest of a
  chunk (the inner gradients, curvature, step bound, erase solve, new weights and reads) fused into one Triton
  kernel (``triton_chunk.py``); its backward (first-order rule) is one more Triton kernel that recomputes the
  chunk's intermediates on chip, while the second-order rule and chunks beyond the backward's tiles (padded C, d or
  h above 32) recompute the chunk in PyTorch for the backward. Rules, dtypes and shapes the kernel does not
  implement run the naive update, with a warning naming the reason. The main memory's whole chunks of a forward
  (``titans.scan_chunks``) run as one launch per direction (``sequence_update.kernel_scan_chunks``: all chunks of a
  memory in one program, the targets M(v) computed in it), where the rule is first-order and the backward's tiles
  fit; the rest scans one chunk step at a time. A chunk's state-independent coefficients (decay products, the erase
  system's triangular inverse) are one launch per direction too (``coefficients.py``; the projection memories
  compute them once per chunk), and so are a projection chunk's reads of k, v, q, eta, alpha and its targets M_p(v)
  (``projection_reads.py``). The projection memories' whole chunks of a forward (``titans.scan_projection_chunks``)
  run as one launch per direction too (``projection_scan.kernel_scan_projection_chunks``: per chunk the reads, the
  coefficients and the five memories' updates in one program per head), where the rule is first-order and the
  backward's tiles fit.

``apply_kernel`` sets the step, the scans, the coefficients and the projection reads on every memory layer, the
way ``accel.compile_model`` sets the compiled step; with ``triton`` it replaces a compiled chunk step (the kernel
is not traced by ``torch.compile``), and where no kernel can run (no CUDA and no ``TRITON_INTERPRET=1``, or no
triton) it warns once and leaves the naive step.
``tests/test_model_kernel*.py`` check the kernels against the naive path (or a float64 reference) on CPU under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from torch import nn

from ..config import KERNELS
from .chunk_update import kernel_chunk_step, kernel_mode_unavailable, rule_unsupported, warn_once
from .coefficients import kernel_chunk_coefficients
from .projection_reads import kernel_projection_reads
from .projection_scan import kernel_scan_projection_chunks
from .sequence_update import kernel_scan_chunks


def apply_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Run ``model``'s memory layers' chunk steps with ``kernel`` ("naive" leaves them as they are); in place,
    returns ``model``."""
    if kernel == "naive":
        return model
    if kernel not in KERNELS:
        raise ValueError(f"model.kernel: {kernel!r} is not one of {KERNELS}")
    from ..titans import SelfModifyingTitans

    layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
    if not layers:
        return model
    reason = kernel_mode_unavailable()
    if reason:
        warn_once(f"model.kernel=triton: {reason}; the memory layers run the naive PyTorch update")
        return model
    for layer in layers:
        reason = rule_unsupported(layer.beta, layer.rule)
        if reason:
            warn_once(f"model.kernel=triton: {reason}; the memory layers run the naive PyTorch update")
            continue
        layer.chunk_step = kernel_chunk_step
        layer.scan_chunks = kernel_scan_chunks
        layer.coefficients = kernel_chunk_coefficients
        if layer.self_modifying:
            layer.projection_reads = kernel_projection_reads
            layer.scan_projection_chunks = kernel_scan_projection_chunks
    return model
