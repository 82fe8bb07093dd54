"""The projection memories' scan kernel (``kernels/projection_scan.py``: all of a forward's whole projection chunks in
one launch per direction): ``kernel_scan_projection_chunks`` computes what ``titans.scan_projection_chunks``
computes one chunk at a time in PyTorch (k, v, q, eta, alpha, the end state, the step-bound statistics) and the
same gradients of every input (the forward's inputs through the per-memory linear maps, the static queries, the
initial weights, which are also the anchor retention decays toward, and the biases), for every branch the kernel
has; in fp32 and bf16; and it is the scan kernel that ran (every fallback warns: ``no_fallback``). Run in Triton's
CPU interpreter, as tests/test_model_kernel.py (whose fixtures this module uses), which runs a program's threads
as one: the kernel's barriers are exercised on a GPU only (``benchmarks/kernel_gpu_check.py``). The whole layer
and model with the kernel, in pieces and under activation checkpointing, are checked there (they scan with it)."""

import pytest
import torch

pytest.importorskip("triton")

from hope_scale.model import ModelConfig  # noqa: E402
from hope_scale.model.kernels import projection_scan  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans, scan_projection_chunks  # noqa: E402
from tests.test_model_kernel import interpreted_kernel, no_fallback, rel_err  # noqa: E402, F401

# name: (layer config overrides, scan options: chunks, memory frozen, model.write_cost's gradient on eta)
CASES = {
    "per-memory inputs, adaptive q, erase, anchor": (dict(), dict()),
    "shared inputs, static q": (dict(per_memory_inputs=False, adaptive_q=False), dict()),
    "raw v, no erase, retention toward zero": (dict(normalize_values=False, dgd_erase=False, retain_toward="zero"),
                                               dict()),
    "plain eta, no step bound, one chunk": (dict(normalized_eta=False, inner_step_bound=0.0), dict(n_chunks=1)),
    "padded tiles (C=8, d=12, h=9), tight bound": (dict(d_model=24, chunk_size_projection=8, proj_hidden_mult=0.75,
                                                        inner_step_bound=0.2), dict(n_chunks=4)),
    "memory frozen": (dict(), dict(frozen=True)),
    "write cost on eta": (dict(), dict(write_grad=0.25)),
}


def make_layer(overrides: dict) -> SelfModifyingTitans:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, chunk_size_memory=16,
                                chunk_size_projection=16, cms_levels=[{"period": 1, "hidden_mult": 1.0}]),
                         **overrides})
    return SelfModifyingTitans(cfg)


def scan(layer, scan_fn, n_chunks=3, frozen=False, write_grad=0.0, dtype=torch.float32, grad=True, batch=2):
    """``scan_fn`` over ``n_chunks`` whole chunks of random head inputs on the layer's device from its fresh state;
    returns the outputs and, for a loss of all of them, the gradients of the head inputs and of every parameter
    the scan uses."""
    layer.zero_grad()
    layer.to(dtype)
    layer.memory_frozen = frozen
    g = torch.Generator().manual_seed(3)
    t_len = n_chunks * layer.cfg.chunk_size_projection
    xh = torch.randn(batch, layer.n_heads, t_len, layer.d_head, generator=g).to(layer.eta_bias.device, dtype)
    xh.requires_grad_(grad)
    inputs = layer.memory_inputs(xh)
    static_q = None if layer.adaptive_q else torch.einsum("bhtd,hed->bhte", xh, layer.w_q)
    k, v, q, eta, alpha, proj, bounds = scan_fn(layer, layer.init_state(batch).proj, inputs, static_q, write_grad)
    layer.memory_frozen = False
    out = dict(k=k, v=v, q=q, eta=eta, alpha=alpha, w1=proj.w1, w2=proj.w2,
               overshoot=torch.stack([o for o, _ in bounds]), scale=torch.stack([s for _, s in bounds]))
    if not grad:
        return out, None
    g = torch.Generator().manual_seed(1)
    loss = sum((torch.randn(t.shape, generator=g).to(t.device) * t.float()).sum()
               for name, t in out.items() if name not in ("overshoot", "scale"))
    loss.backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return out, dict(grads, xh=xh.grad)


@pytest.mark.parametrize("case", CASES)
def test_projection_scan_kernel_equals_chunk_by_chunk(case, interpreted_kernel, no_fallback):
    overrides, kw = CASES[case]
    layer = make_layer(overrides)
    ref, ref_grads = scan(layer, scan_projection_chunks, **kw)
    out, grads = scan(layer, projection_scan.kernel_scan_projection_chunks, **kw)
    for name, r in ref.items():
        if name in ("overshoot", "scale"):  # without a step bound PyTorch's are per memory stack (all 0 or 1)
            r = r.expand_as(out[name])
        assert out[name].shape == r.shape, name
        assert rel_err(out[name], r) < 2e-5 if r.abs().max() > 0 else torch.equal(out[name], r), name
    if layer.rule.step_bound > 0 and not kw.get("frozen"):
        assert (ref["scale"] < 1).any(), case  # the step bound is active: its forward and backward are exercised
    assert set(grads) == set(ref_grads)
    used = {"proj_w1", "proj_w2", "w_inputs", "w_q"} | (set() if kw.get("frozen") else {"eta_bias", "alpha_bias"})
    assert set(ref_grads) == {"xh"} | {name for name in used if hasattr(layer, name)}  # frozen: eta, alpha constant
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 2e-5, (name, rel_err(grads[name], g))


def test_projection_scan_kernel_bfloat16(interpreted_kernel, no_fallback):
    """In bf16 both paths store the weights, keys, coefficients and targets in bf16 between their steps; the
    PyTorch path also rounds every other intermediate, the kernel only its products' operands (and it carries the
    weights' gradient in fp32). The kernel is within bf16 error of the PyTorch path and no further from the fp32
    result than it (plus one bf16 rounding): both are 12-66% from it in the gradients, the inputs' rounding to
    bf16, which they share. PyTorch's bf16 loses alpha's bias gradient (alpha near 1: 1 - alpha is coarse in
    bf16; 100% error), which the kernel keeps (21%)."""
    layer = make_layer(dict())
    exact, exact_grads = scan(layer, scan_projection_chunks)
    ref, ref_grads = scan(layer, scan_projection_chunks, dtype=torch.bfloat16)
    out, grads = scan(layer, projection_scan.kernel_scan_projection_chunks, dtype=torch.bfloat16)
    pairs = [(out[k], ref[k], exact[k], k) for k in ("k", "v", "q", "eta", "alpha", "w1", "w2")]
    pairs += [(grads[k], ref_grads[k], exact_grads[k], k) for k in exact_grads]
    for a, b, e, name in pairs:
        assert a.dtype == torch.bfloat16 and (rel_err(a, b) < 5e-2 or name == "alpha_bias"), (name, rel_err(a, b))
        assert rel_err(a, e) <= 1.05 * rel_err(b, e) + 8e-3, (name, rel_err(a, e), rel_err(b, e))


def test_unsupported_projection_scan_runs_chunk_by_chunk_with_a_warning(interpreted_kernel, monkeypatch):
    """The second-order rule is not in the scan kernel (its targets and backward are first-order): the chunks run
    one at a time, with a warning naming the reason, and give the same result."""
    from hope_scale.model.kernels import chunk_update

    monkeypatch.setattr(chunk_update, "_warned", set())
    layer = make_layer(dict(first_order=False))
    ref, _ = scan(layer, scan_projection_chunks, n_chunks=2, grad=False)
    with pytest.warns(UserWarning, match="first_order=False"):
        out, _ = scan(layer, projection_scan.kernel_scan_projection_chunks, n_chunks=2, grad=False)
    for name, r in ref.items():
        assert torch.equal(out[name], r), name
