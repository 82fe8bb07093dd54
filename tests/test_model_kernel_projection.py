"""The projection-reads kernels (``kernels/projection_reads.py``): ``kernel_projection_reads`` computes what
``titans.projection_reads`` computes -- a projection chunk's k, v, q, eta, alpha read from the stacked projection
memories and every memory's targets M_p(v) -- and the same gradients of the weights, the memories' inputs, the
static queries and the eta / alpha biases, against a float64 reference: with per-memory and shared inputs,
adaptive and static q, normalized and unnormalized v, the memory frozen (eta = 0, alpha = 1), padded tiles; in fp32
and bf16; and the second-order rule falls back to PyTorch with a warning. Run in Triton's CPU interpreter, as
tests/test_model_kernel.py (whose fixtures this module uses); the layers and models there read their projection
chunks through these kernels."""

import pytest
import torch

pytest.importorskip("triton")

from hope_scale.model import ModelConfig  # noqa: E402
from hope_scale.model.kernels import projection_reads as kernel  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans, projection_reads  # noqa: E402
from tests.test_model_kernel import interpreted_kernel, no_fallback, rel_err  # noqa: E402, F401

CASES = {  # name: (layer config overrides, memory frozen)
    "per-memory inputs, adaptive q, normalized v": (dict(), False),
    "shared inputs, static q, unnormalized v": (dict(per_memory_inputs=False, adaptive_q=False,
                                                     normalize_values=False), False),
    "memory frozen": (dict(), True),
    "padded tiles (C = 12, d = 8, h = 12)": (dict(d_model=16, chunk_size_projection=12, proj_hidden_mult=1.5), False),
}


def make_layer(overrides: dict, frozen: bool = False) -> SelfModifyingTitans:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, chunk_size_memory=16,
                                chunk_size_projection=16, cms_levels=[{"period": 1, "hidden_mult": 1.0}]),
                         **overrides})
    layer = SelfModifyingTitans(cfg)
    layer.memory_frozen = frozen
    return layer


def inputs(layer: SelfModifyingTitans, batch: int = 2, seed: int = 3) -> dict:
    """Chunk-start weights near the meta-learned ones, the memories' inputs and static queries for one chunk."""
    g = torch.Generator().manual_seed(seed)
    h, p, d, hp = layer.proj_w1.shape
    c = layer.cfg.chunk_size_projection
    def near(w):
        return w.detach()[None].expand(batch, *w.shape) + 0.1 * torch.randn(batch, *w.shape, generator=g)
    return dict(w1=near(layer.proj_w1), w2=near(layer.proj_w2),
                inputs=torch.randn(batch, h, p if layer.cfg.per_memory_inputs else 1, c, d, generator=g),
                static_q=torch.randn(batch, h, c, d, generator=g))


def run(layer, fn, x: dict, dtype) -> tuple[tuple, dict]:
    """``fn``'s k, v, q, eta, alpha, targets on fresh leaves of ``dtype``, and the gradients of a random linear
    function of all of them with respect to every leaf and the layer's biases."""
    layer.zero_grad()
    layer.to(dtype)
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_() for k, v in x.items()}
    outs = fn(layer, leaves["w1"], leaves["w2"], leaves["inputs"], None if layer.adaptive_q else leaves["static_q"])
    g = torch.Generator().manual_seed(1)
    sum((torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, dtype) * o).sum() for o in outs).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads.update(eta_bias=layer.eta_bias.grad, alpha_bias=layer.alpha_bias.grad)
    return outs, grads


def errors(got, want) -> dict:
    outs = {f"out {i}": rel_err(a, b) for i, (a, b) in enumerate(zip(got[0], want[0]))}
    for name, ref in want[1].items():
        assert (got[1][name] is None) == (ref is None), name
        if ref is not None:
            outs[name] = rel_err(got[1][name], ref)
    return outs


@pytest.mark.parametrize("case", CASES)
def test_projection_reads_kernel_equals_pytorch(case, interpreted_kernel, no_fallback):
    layer = make_layer(*CASES[case])
    x = inputs(layer)
    ref = run(layer, projection_reads, x, torch.float64)
    found = errors(run(layer, kernel.kernel_projection_reads, x, torch.float32), ref)
    naive = errors(run(layer, projection_reads, x, torch.float32), ref)
    for name, err in found.items():  # as close as PyTorch's fp32 (the biases' gradients sum C terms)
        assert err <= max(2e-6, 2 * naive[name]), (name, err, naive[name])


def test_projection_reads_kernel_bfloat16(interpreted_kernel, no_fallback):
    layer = make_layer({})
    x = inputs(layer)
    ref = run(layer, projection_reads, x, torch.float64)
    found = errors(run(layer, kernel.kernel_projection_reads, x, torch.bfloat16), ref)
    naive = errors(run(layer, projection_reads, x, torch.bfloat16), ref)
    for name, err in found.items():
        assert err <= max(2e-2, naive[name] + 1e-2), (name, err, naive[name])


def test_second_order_reads_in_pytorch_with_a_warning(interpreted_kernel, monkeypatch):
    warned: list[str] = []
    monkeypatch.setattr(kernel, "warn_once", warned.append)
    layer = make_layer(dict(first_order=False))
    x = inputs(layer)
    out, grads = run(layer, kernel.kernel_projection_reads, x, torch.float32)
    ref, ref_grads = run(layer, projection_reads, x, torch.float32)
    assert len(warned) == 1 and "first_order=False" in warned[0], warned
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads if ref_grads[k] is not None)


def test_projection_reads_kernel_on_a_view_of_longer_inputs(interpreted_kernel, no_fallback, monkeypatch):
    """The layer hands the kernel each chunk's inputs as a view of the whole forward's (split along the tokens, not
    contiguous): the kernel reads them through their strides, without a copy, with the same results."""
    from hope_scale.model.kernels import triton_projection

    strides = []

    def recorded(x, *args, _launch=triton_projection.launch_projection_reads, **kwargs):
        strides.append(x.stride())
        return _launch(x, *args, **kwargs)

    monkeypatch.setattr(triton_projection, "launch_projection_reads", recorded)

    def second_chunk(fn):  # the inputs as the second of two chunks of a longer sequence
        def run_fn(layer, w1, w2, inputs, static_q):
            longer = torch.cat([inputs.flip(3), inputs], dim=3)
            return fn(layer, w1, w2, longer.split(inputs.shape[3], dim=3)[1], static_q)
        return run_fn

    layer = make_layer({})
    x = inputs(layer)
    ref = run(layer, second_chunk(projection_reads), x, torch.float64)
    found = errors(run(layer, second_chunk(kernel.kernel_projection_reads), x, torch.float32), ref)
    assert max(found.values()) <= 2e-4, found  # the biases' gradients cancel: 7e-5 in PyTorch's fp32 too
    c, d = x["inputs"].shape[-2:]
    assert strides and strides[0][2] == d and strides[0][1] == 2 * c * d, strides  # a view: rows d apart, no copy
