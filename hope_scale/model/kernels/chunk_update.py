"""``memory.chunk_update`` with its forward and (first-order) backward fused into Triton kernels (``triton_chunk.py``).

Supported: the default update rule without momentum (beta = 0), no branch norm, Rayleigh step bound or none,
normalized or plain eta, first-order or not, erase on or off, with or without reads, retention toward an anchor or
toward zero, any n_valid, fp32 / bf16 / fp16 inputs of one dtype, C, d and h up to 64 (padded to powers of two
>= 16). Anything else (``unsupported_reason``) runs ``memory.chunk_update`` itself, with a warning naming the reason,
once per reason.

The backward is fused too, for the first-order rule (the default): ``ChunkUpdate.backward`` launches one Triton
kernel per chunk (``triton_chunk._chunk_update_bwd_kernel``, one program per batch element) that recomputes the
chunk's intermediates from the saved inputs (the forward keeps nothing but its inputs) and writes the gradients with
respect to the state, the keys, targets and queries, the anchor retention decays toward (``anchor``; its gradient
per batch element, summed over the batch it is broadcast over by autograd through ``_flat``'s expand) and every
coefficient (which carry the gradients of eta, alpha and the keys through ``chunk_coefficients``, in PyTorch). With
beta = 0 the carried momentum s1, s2 enters nothing (zero gradients) and c_vec, c_prev are unused (None), as in the
naive path. Still recomputed in PyTorch (``chunk_update`` again and ``torch.autograd.grad``, exact): the
second-order rule (``first_order=False``, an ablation: by design, without a warning), and, with a warning naming the
reason (once), chunks whose padded C, d or h exceed ``triton_chunk.BWD_MAX_BLOCK`` (64 for bf16 / fp16 inputs, 32
for fp32, the largest fp32 size compiled for sm_90) or a GPU that reports the backward out of resources.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..memory import ChunkCoefficients, ChunkResult, MemoryState, UpdateRule, chunk_step, chunk_update

MAX_DIM = 64  # triton_chunk.MAX_BLOCK (not imported here: importing triton_chunk decorates the kernel)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COEF_FIELDS = ("eta", "gamma", "c_vec", "d_mat", "e_mat", "gamma_prev", "c_prev", "e_kk_prev", "erase_inverse",
               "d_qk", "e_qk")
# ChunkUpdate's tensor inputs (anchor1, anchor2: what retention decays toward, None: zero)
INPUTS = ("w1", "w2", "s1", "s2", "keys", "targets", "queries", "anchor1", "anchor2", *COEF_FIELDS)
MATRIX_FIELDS = ("d_mat", "e_mat", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")


def rule_unsupported(beta: float, rule: UpdateRule) -> str | None:
    """Why the kernel cannot run this update rule (None: it can)."""
    if beta != 0:
        return f"inner_momentum={beta} (the kernel has no momentum; beta = 0 only)"
    if rule.branch_norm:
        return "mem_branch_norm=True (the kernel implements m(x) = x + W1 silu(W2 x) only)"
    if rule.step_bound > 0 and rule.overshoot != "rayleigh":
        return f"inner_overshoot={rule.overshoot!r} (the kernel implements the Rayleigh overshoot only)"
    return None


def kernel_mode_unavailable() -> str | None:
    """Why no Triton kernel can run in this process (None: CUDA is available, or TRITON_INTERPRET is set)."""
    try:
        import triton
    except ImportError as e:
        return f"triton is not importable ({e})"
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads its environment variables there
    interpret = knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not torch.cuda.is_available() and not interpret:
        return "CUDA is not available and TRITON_INTERPRET is not set"
    return None


def tensors_unsupported(tensors: list, interpreted: bool) -> str | None:
    """Why a kernel loaded in this mode (``interpreted``: under TRITON_INTERPRET=1) cannot take ``tensors`` (None
    where absent), whatever their shapes: mixed or unsupported dtypes, several devices, a device the kernel was not
    loaded for, autocast (None: it can)."""
    tensors = [t for t in tensors if t is not None]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        return f"dtypes {sorted(map(str, dtypes))} (the kernel needs one of float32, bfloat16, float16)"
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return "inputs on several devices"
    if device.type != "cuda" and not interpreted:
        return f"tensors on {device.type} and the kernel was not loaded under TRITON_INTERPRET=1"
    if device.type == "cuda" and interpreted:
        return "tensors on cuda but the kernel was loaded under TRITON_INTERPRET=1 (CPU interpreter)"
    if torch.is_autocast_enabled(device.type):
        return "autocast is enabled (the kernel computes in fp32 and stores in the inputs' dtype)"
    return None


def unsupported_reason(state: MemoryState, keys: torch.Tensor, targets: torch.Tensor, coef: ChunkCoefficients,
                       beta: float, rule: UpdateRule, queries: torch.Tensor | None,
                       anchor: tuple[torch.Tensor, torch.Tensor] | None = None) -> str | None:
    """Why this call cannot run the kernel (None: it can): the rule, dtypes, device, shapes or autocast."""
    reason = rule_unsupported(beta, rule)
    if reason:
        return reason
    tensors = [state.w1, state.w2, state.s1, state.s2, keys, targets, queries, *(anchor or ()),
               *(getattr(coef, f) for f in COEF_FIELDS)]
    from . import triton_chunk

    reason = tensors_unsupported(tensors, triton_chunk.INTERPRETED)
    if reason:
        return reason
    c, d, hid = keys.shape[-2], keys.shape[-1], state.w1.shape[-1]
    if max(c, d, hid) > MAX_DIM:
        return f"C={c}, d={d}, h={hid}: the kernel keeps a chunk on chip, up to {MAX_DIM} each"
    return None


_warned: set[str] = set()


def triton_out_of_resources() -> type[Exception]:
    """Triton's error for a kernel that needs more shared memory or registers than the GPU has."""
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def warn_once(message: str) -> None:
    """A ``UserWarning`` the first time ``message`` occurs in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


class ChunkUpdate(torch.autograd.Function):
    """Forward: the fused Triton kernel. Backward: the fused backward kernel (first-order rule, tiles up to
    ``BWD_MAX_BLOCK``), else recompute ``memory.chunk_update`` and differentiate it. Inputs are flat: one leading
    batch axis N, contiguous; ``tensors`` are ``INPUTS``: (w1, w2, s1, s2, keys, targets, queries, anchor1,
    anchor2, *COEF_FIELDS), None where absent. Outputs: w1, w2, s1, s2, overshoot, scale, then reads if queries
    are given."""

    @staticmethod
    def forward(ctx, beta: float, rule: UpdateRule, n_valid: int | None, *tensors):
        from .triton_chunk import KERNEL_INPUTS, launch_chunk_update

        x = dict(zip(INPUTS, tensors))
        last = (n_valid or x["keys"].shape[-2]) - 1
        new_w1, new_w2, new_s1, new_s2, reads, overshoot, scale = launch_chunk_update(
            *(x[name] for name in KERNEL_INPUTS), last=last, step_bound=rule.step_bound,
            normalized_eta=rule.normalized_eta)
        ctx.save_for_backward(*tensors)
        ctx.beta, ctx.rule, ctx.n_valid = beta, rule, n_valid
        ctx.mark_non_differentiable(overshoot, scale)
        ctx.set_materialize_grads(False)
        return (new_w1, new_w2, new_s1, new_s2, overshoot, scale) + ((reads,) if reads is not None else ())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing's unpack hooks allow no second unpack
        reason = fused_backward_unsupported(ctx, saved)
        if reason is None:
            try:
                return (None, None, None) + fused_backward(ctx, saved, grads)
            except triton_out_of_resources() as e:  # the backward's tiles need more shared memory than the GPU has
                reason = str(e)
        if ctx.rule.first_order:  # the second-order rule recomputes by design: no warning
            warn_once(f"model.kernel=triton: the chunk update's backward recomputes in PyTorch instead: {reason}")
        return (None, None, None) + recompute_backward(ctx, saved, grads)


def backward_tiles_unsupported(keys: torch.Tensor, w1: torch.Tensor, kernel: str) -> str | None:
    """Why a backward kernel (``kernel`` names it in the reason) cannot hold the chunks of ``keys`` [..., C, d] and
    weights ``w1`` [..., d, h] on chip: padded C, d or h beyond ``triton_chunk.BWD_MAX_BLOCK`` (None: it can)."""
    from .triton_chunk import BWD_MAX_BLOCK, block

    c, d, hid = keys.shape[-2], keys.shape[-1], w1.shape[-1]
    largest = BWD_MAX_BLOCK[keys.dtype]
    if max(block(c), block(d), block(hid)) > largest:
        return (f"C={c}, d={d}, h={hid}: {kernel} keeps a chunk on chip in tiles up to {largest} in {keys.dtype} "
                "(triton_chunk.BWD_MAX_BLOCK)")
    return None


def fused_backward_unsupported(ctx, saved: tuple) -> str | None:
    """Why the backward kernel cannot run for this chunk (None: it can): the second-order rule, or tiles beyond
    ``triton_chunk.BWD_MAX_BLOCK``."""
    if not ctx.rule.first_order:
        return "first_order=False (the kernel's backward is first-order)"
    saved = dict(zip(INPUTS, saved))
    return backward_tiles_unsupported(saved["keys"], saved["w1"], "the backward kernel")


def fused_backward(ctx, saved: tuple, grads) -> tuple:
    """The gradients of ``ChunkUpdate``'s tensor inputs from the backward kernel (first-order rule): s1, s2 get
    zeros (beta = 0: the carried momentum enters nothing), c_vec and c_prev None (unused without momentum), and
    so do inputs whose gradient is not needed."""
    from .triton_chunk import KERNEL_INPUTS, launch_chunk_update_bwd

    saved = dict(zip(INPUTS, saved))
    g_w1, g_w2, g_s1, g_s2, _, _, *g_reads = grads
    found = launch_chunk_update_bwd([saved[name] for name in KERNEL_INPUTS],
                                    (g_w1, g_w2, g_s1, g_s2, g_reads[0] if g_reads else None),
                                    last=(ctx.n_valid or saved["keys"].shape[-2]) - 1,
                                    step_bound=ctx.rule.step_bound, normalized_eta=ctx.rule.normalized_eta)
    g = dict(zip(KERNEL_INPUTS, found), s1=torch.zeros_like(saved["s1"]), s2=torch.zeros_like(saved["s2"]))
    return tuple(g.get(name) if need else None for name, need in zip(INPUTS, ctx.needs_input_grad[3:]))


def recompute_backward(ctx, saved: tuple, grads) -> tuple:
    """The gradients of ``ChunkUpdate``'s tensor inputs by recomputing the chunk with ``memory.chunk_update`` and
    differentiating it (exact; for what the backward kernel does not cover: ``fused_backward_unsupported``)."""
    needs = ctx.needs_input_grad[3:]
    inputs = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip(saved, needs)]
    w1, w2, s1, s2, keys, targets, queries, anchor1, anchor2, *coef = inputs
    with torch.enable_grad():  # inputs shared by several programs (launch_chunk_update) repeated for each
        n = w1.shape[0]
        share, n_anchors = n // keys.shape[0], anchor1.shape[0] if anchor1 is not None else n
        each = lambda t: t.repeat_interleave(share, 0) if t is not None and share > 1 else t  # noqa: E731
        keys, queries, coef = each(keys), each(queries), [each(t) for t in coef]
        if n_anchors < n:
            anchor1, anchor2 = (a.repeat(n // n_anchors, 1, 1) for a in (anchor1, anchor2))
        r = chunk_update(MemoryState(w1, w2, s1, s2, None, None, None, None), keys, targets,
                         ChunkCoefficients(**dict(zip(COEF_FIELDS, coef))), ctx.beta, ctx.rule,
                         queries=queries, n_valid=ctx.n_valid,
                         anchor=None if anchor1 is None else (anchor1, anchor2))
    outs = [r.w1, r.w2, r.s1, r.s2, None, None] + ([r.reads] if queries is not None else [])
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    if not pairs or not wrt:
        return (None,) * len(inputs)
    found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)


def _flat(t: torch.Tensor | None, batch: torch.Size, trailing: int) -> torch.Tensor | None:
    """t [..., *trailing dims] broadcast to the batch axes and flattened to [N, *trailing dims], contiguous."""
    if t is None:
        return None
    tail = t.shape[t.dim() - trailing:]
    return t.expand(*batch, *tail).reshape(-1, *tail).contiguous()


def kernel_chunk_update(state: MemoryState, keys: torch.Tensor, targets: torch.Tensor, coef: ChunkCoefficients,
                        beta: float, rule: UpdateRule, queries: torch.Tensor | None = None,
                        n_valid: int | None = None, anchor: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> ChunkResult:
    """``memory.chunk_update`` (same arguments, same result) through the Triton kernel where supported, else
    through ``memory.chunk_update`` with a warning naming the reason (once per reason)."""
    reason = unsupported_reason(state, keys, targets, coef, beta, rule, queries, anchor)
    if reason:
        warn_once(f"model.kernel=triton: running the naive chunk update instead: {reason}")
        return chunk_update(state, keys, targets, coef, beta, rule, queries=queries, n_valid=n_valid, anchor=anchor)
    shapes = [state.w1.shape[:-2], state.w2.shape[:-2], state.s1.shape[:-2], state.s2.shape[:-2], keys.shape[:-2],
              targets.shape[:-2]] + ([queries.shape[:-2]] if queries is not None else [])
    shapes += [getattr(coef, f).shape[:-2 if f in MATRIX_FIELDS else -1] for f in COEF_FIELDS
               if getattr(coef, f) is not None]
    batch = torch.broadcast_shapes(*shapes)
    anchor1, anchor2 = anchor if anchor is not None else (None, None)
    shared = [keys, queries] + [getattr(coef, f) for f in COEF_FIELDS]
    shared_trailing = [2, 2] + [2 if f in MATRIX_FIELDS else 1 for f in COEF_FIELDS]
    # the stacked projection memories share their keys and coefficients (a singleton last batch axis): the kernel
    # reads them at program // share instead of a copy per memory; likewise an anchor broadcast over the batch
    share_batch = (*batch[:-1], 1)
    shares = len(batch) > 0 and all(t is None or t.shape[:t.dim() - k] == share_batch
                                    for t, k in zip(shared, shared_trailing))
    anchors_batch = batch[1:] if anchor1 is not None and anchor1.shape[:-2] == batch[1:] else batch
    tensors = [_flat(t, batch, 2) for t in (state.w1, state.w2, state.s1, state.s2)]
    tensors += [_flat(keys, share_batch if shares else batch, 2), _flat(targets, batch, 2),
                _flat(queries, share_batch if shares else batch, 2)]
    tensors += [_flat(t, anchors_batch, 2) for t in (anchor1, anchor2)]
    tensors += [_flat(getattr(coef, f), share_batch if shares else batch, 2 if f in MATRIX_FIELDS else 1)
                for f in COEF_FIELDS]
    try:
        w1, w2, s1, s2, overshoot, scale, *reads = ChunkUpdate.apply(beta, rule, n_valid, *tensors)
    except triton_out_of_resources() as e:  # a GPU with less shared memory than an H100's: the tiles do not fit
        warn_once(f"model.kernel=triton: running the naive chunk update instead: {e}")
        return chunk_update(state, keys, targets, coef, beta, rule, queries=queries, n_valid=n_valid, anchor=anchor)
    unflat = lambda t: t.view(*batch, *t.shape[1:])  # noqa: E731
    return ChunkResult(unflat(w1), unflat(w2), unflat(s1), unflat(s2), unflat(reads[0]) if reads else None,
                       overshoot.view(batch), scale.view(batch))


def kernel_chunk_step(*args, **kwargs) -> ChunkResult:
    """``memory.chunk_step`` (same arguments) through the kernels: the coefficients (unless given) in one launch
    (``coefficients.kernel_chunk_coefficients``), the state-dependent rest of the chunk in another
    (``kernel_chunk_update``)."""
    from .coefficients import kernel_chunk_coefficients

    return chunk_step(*args, update=kernel_chunk_update, coefficients=kernel_chunk_coefficients, **kwargs)
