"""The chunk-coefficient kernels (``kernels/coefficients.py``): ``kernel_chunk_coefficients`` computes what
``memory.chunk_coefficients`` computes without momentum (gamma, D = E, gamma_prev, E_kk_prev, the erase system's
inverse, D_qk = E_qk) and the same gradients of the keys, eta, alpha and queries, against a float64 reference, with
and without erase and reads, at padded tiles and at the projection memories' shape (C = d = 64), with an alpha that
underflowed to 0 (clamped); in fp32 and bf16; and momentum falls back to PyTorch with a warning. Run in Triton's CPU
interpreter, as tests/test_model_kernel.py (whose fixtures this module uses); the layers and models there run their
coefficients through these kernels."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hope_scale.model.kernels import coefficients  # noqa: E402
from hope_scale.model.memory import chunk_coefficients  # noqa: E402
from tests.test_model_kernel import interpreted_kernel, no_fallback, rel_err  # noqa: E402, F401

FIELDS = ("eta", "gamma", "d_mat", "e_mat", "gamma_prev", "e_kk_prev", "erase_inverse", "d_qk", "e_qk")
CASES = {  # name: (C, d, erase, reads)
    "main memory: erase, reads": (16, 16, True, True),
    "projection memories: erase, no reads": (16, 16, True, False),
    "no erase, reads": (16, 16, False, True),
    "padded tiles (C = 12, d = 8)": (12, 8, True, True),
    "projection shape (C = d = 64)": (64, 64, True, False),
}


def inputs(c: int, d: int, batch=(2, 3), seed=0) -> dict:
    """Random keys and queries (normalized in ``run``), eta in (0, 1), alpha in (0.8, 1) with one 0 (underflow)."""
    g = torch.Generator().manual_seed(seed)
    x = dict(keys=torch.randn(*batch, c, d, generator=g), queries=torch.randn(*batch, c, d, generator=g),
             eta=torch.rand(*batch, c, generator=g), alpha=0.8 + 0.2 * torch.rand(*batch, c, generator=g))
    x["alpha"][0, 0, c // 2] = 0.0
    return x


def run(fn, x: dict, erase: bool, reads: bool, dtype) -> tuple[dict, dict]:
    """The coefficients of ``fn`` on fresh leaves of ``dtype`` and the gradients of a random linear function of
    all of them with respect to every leaf."""
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_() for k, v in x.items()}
    coef = fn(F.normalize(leaves["keys"], dim=-1), leaves["eta"], leaves["alpha"], 0.0, erase,
              queries=F.normalize(leaves["queries"], dim=-1) if reads else None)
    out = {f: getattr(coef, f) for f in FIELDS}
    g = torch.Generator().manual_seed(1)
    loss = sum((torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, dtype) * t).sum()
               for t in out.values() if t is not None)
    loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


def assert_close(out, grads, ref_out, ref_grads, tol):
    for name, ref in ref_out.items():
        assert (out[name] is None) == (ref is None), name
        if ref is not None:
            assert out[name].shape == ref.shape, (name, out[name].shape, ref.shape)
            assert rel_err(out[name], ref) <= tol, (name, rel_err(out[name], ref))
    for name, ref in ref_grads.items():
        assert (grads[name] is None) == (ref is None), name
        if ref is not None:
            assert rel_err(grads[name], ref) <= tol, ("grad", name, rel_err(grads[name], ref))


@pytest.mark.parametrize("case", CASES)
def test_coefficient_kernel_equals_chunk_coefficients(case, interpreted_kernel, no_fallback):
    c, d, erase, reads = CASES[case]
    x = inputs(c, d)
    ref = run(chunk_coefficients, x, erase, reads, torch.float64)
    out = run(coefficients.kernel_chunk_coefficients, x, erase, reads, torch.float32)
    naive = run(chunk_coefficients, x, erase, reads, torch.float32)
    # fp32 against float64: as close as PyTorch's own fp32 (the log-cumsum rounds ~1e-6 relative in both)
    assert_close(*out, *ref, tol=2e-5)
    assert_close(*naive, *ref, tol=2e-5)


def test_coefficient_kernel_bfloat16(interpreted_kernel, no_fallback):
    """bf16 inputs: within bf16 rounding of the float64 coefficients and gradients, and no further from them than
    PyTorch's bf16 computation plus that rounding."""
    x = inputs(16, 16)
    ref = run(chunk_coefficients, x, True, True, torch.float64)
    out = run(coefficients.kernel_chunk_coefficients, x, True, True, torch.bfloat16)
    naive = run(chunk_coefficients, x, True, True, torch.bfloat16)
    for got, want, bf16 in zip(out, ref, naive):
        for name, r in want.items():
            if r is not None:
                assert got[name].dtype == torch.bfloat16, name
                err, naive_err = rel_err(got[name], r), rel_err(bf16[name], r)
                assert err <= max(2e-2, naive_err + 1e-2), (name, err, naive_err)


def test_momentum_computes_coefficients_in_pytorch_with_a_warning(interpreted_kernel, monkeypatch):
    monkeypatch.setattr(coefficients, "warn_once", lambda message: warned.append(message))
    warned: list[str] = []
    x = inputs(16, 16)
    out, _ = run(lambda *a, **k: coefficients.kernel_chunk_coefficients(*a[:3], 0.5, *a[4:], **k), x, True, True,
                 torch.float32)
    ref, _ = run(lambda *a, **k: chunk_coefficients(*a[:3], 0.5, *a[4:], **k), x, True, True, torch.float32)
    assert len(warned) == 1 and "inner_momentum=0.5" in warned[0], warned
    for name, r in ref.items():
        assert torch.equal(out[name], r), name
