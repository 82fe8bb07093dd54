"""The fused backward kernel of ``model.kernel: triton`` (``triton_chunk._chunk_update_bwd_kernel``): the gradients
of one chunk with respect to every tensor input of ``ChunkUpdate`` (the state, keys, targets, queries, the anchor
retention decays toward and each coefficient, here leaves of their own) equal the naive path's
(``memory.chunk_update`` and autograd) for every branch the kernel has, and it is the kernel that computed them (not
the recomputing fallback). Run in Triton's CPU interpreter, as tests/test_model_kernel.py (whose fixtures this
module uses); shapes are tiny.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hope_scale.model import memory  # noqa: E402
from hope_scale.model.kernels import chunk_update as kernel_module  # noqa: E402
from hope_scale.model.memory import ChunkCoefficients, MemoryState, UpdateRule, chunk_coefficients  # noqa: E402
from tests.test_model_kernel import interpreted_kernel, no_fallback, rel_err  # noqa: E402, F401

STATE = ("w1", "w2", "s1", "s2")


def chunk_leaves(batch=(1, 2), c=16, d=16, hid=16, reads=True, erase=True, shared_keys_axis=False, n_valid=None,
                 anchor=False, seed=0):
    """One chunk's inputs as ``ChunkUpdate`` sees them: state, keys, targets, queries and the coefficients
    (``chunk_coefficients`` of random keys, eta, alpha), each a tensor of its own; with ``shared_keys_axis`` the
    keys and coefficients have a singleton last batch axis that the state's broadcasts over (the projection
    memories); with ``anchor`` the weights retention decays toward (a1, a2) without the leading batch axis
    (broadcast over it, as the layer's meta-learned initial weights are: their gradients sum over it)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)  # noqa: E731
    key_batch = (*batch[:-1], 1) if shared_keys_axis else batch
    keys = F.normalize(rand(*key_batch, c, d), dim=-1)
    queries = F.normalize(rand(*batch, c, d), dim=-1) if reads else None
    eta = torch.rand(*key_batch, c, generator=g)
    alpha = 0.9 + 0.1 * torch.rand(*key_batch, c, generator=g)
    if n_valid is not None:  # a padded last chunk, as the layer pads it: eta = 0, alpha = 1
        eta[..., n_valid:] = 0.0
        alpha[..., n_valid:] = 1.0
    coef = chunk_coefficients(keys, eta, alpha, 0.0, erase, queries=queries)
    x = dict(w1=rand(*batch, d, hid, scale=0.5 / hid**0.5), w2=rand(*batch, hid, d, scale=1 / d**0.5),
             s1=rand(*batch, d, hid, scale=0.1), s2=rand(*batch, hid, d, scale=0.1), keys=keys,
             targets=rand(*batch, c, d), queries=queries)
    if anchor:
        x["a1"], x["a2"] = rand(*batch[1:], d, hid, scale=0.5 / hid**0.5), rand(*batch[1:], hid, d, scale=1 / d**0.5)
    return {**x, **{k: v for k, v in coef.__dict__.items()}}


def update_with_grads(update, x, rule, n_valid=None, dtype=torch.float32, seed=1):
    """One chunk through ``update`` (chunk_update's signature) on fresh leaves; returns the result and the
    gradients of a loss of every output (random weights, and nonlinear terms) with respect to every leaf (None:
    no gradient reached it)."""
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_(True) if v is not None else None
              for k, v in x.items()}
    state = MemoryState(*(leaves[k] for k in STATE), None, None, None, None)
    coef = ChunkCoefficients(**{k: leaves[k] for k in kernel_module.COEF_FIELDS})
    anchor = (leaves["a1"], leaves["a2"]) if "a1" in leaves else None
    r = update(state, leaves["keys"], leaves["targets"], coef, 0.0, rule, queries=leaves["queries"], n_valid=n_valid,
               anchor=anchor)
    g = torch.Generator().manual_seed(seed)
    weight = lambda t: torch.randn(t.shape, generator=g).to(device=t.device, dtype=dtype)  # noqa: E731
    loss = (r.w1 * weight(r.w1)).sum() + r.w2.sin().sum() + (r.s1 * weight(r.s1)).sum() + r.s2.pow(2).sum()
    if r.reads is not None:
        loss = loss + (r.reads * weight(r.reads)).sum() + r.reads.pow(2).sum()
    loss.backward()
    return r, {k: v.grad if v is not None else None for k, v in leaves.items()}


BOUND = UpdateRule(step_bound=0.3)  # active in the last tokens of every test chunk (checked)
CASES = {  # name: (chunk_leaves kwargs, rule, n_valid)
    "reads, erase": (dict(), BOUND, None),
    "reads, no erase": (dict(erase=False), BOUND, None),
    "no reads, erase, broadcast keys": (dict(batch=(2, 3), reads=False, shared_keys_axis=True), BOUND, None),
    "no reads, no erase": (dict(reads=False, erase=False), BOUND, None),
    "reads, default rule (bound 1)": (dict(), UpdateRule(), None),
    "reads, no bound": (dict(), UpdateRule(step_bound=0.0), None),
    "reads, plain eta, no bound": (dict(), UpdateRule(step_bound=0.0, normalized_eta=False), None),
    "reads, plain eta, bound": (dict(), UpdateRule(step_bound=0.1, normalized_eta=False), None),
    "no reads, plain eta, bound": (dict(reads=False), UpdateRule(step_bound=0.1, normalized_eta=False), None),
    "padded last chunk, reads": (dict(n_valid=11), BOUND, 11),
    "padded last chunk, no reads": (dict(reads=False, n_valid=5), BOUND, 5),
    "padded tiles (C=8, d=8, h=12)": (dict(c=8, d=8, hid=12), BOUND, None),
    "C=32, d=16, h=32 (largest fp32 backward tile)": (dict(batch=(1, 1), c=32, hid=32), BOUND, None),
    "C=64, d=40, h=64 (largest 16-bit backward tile, padded)": (dict(batch=(1, 1), c=64, d=40, hid=64, anchor=True),
                                                               BOUND, None),
    # retention toward an anchor (broadcast over the leading batch axis)
    "anchor, reads, erase": (dict(batch=(2, 2), anchor=True), BOUND, None),
    "anchor, reads, no erase": (dict(batch=(2, 2), erase=False, anchor=True), BOUND, None),
    "anchor, no reads, erase, broadcast keys": (dict(batch=(2, 3), reads=False, shared_keys_axis=True, anchor=True),
                                                BOUND, None),
    "anchor, padded last chunk, reads": (dict(batch=(2, 2), n_valid=11, anchor=True), BOUND, 11),
}


@pytest.mark.parametrize("case", [c for c in CASES if "16-bit" not in c])
def test_fused_backward_equals_naive_float32(case, interpreted_kernel, no_fallback):
    inputs, rule, n_valid = CASES[case]
    x = chunk_leaves(**inputs)
    ref_result, ref = update_with_grads(memory.chunk_update, x, rule, n_valid)
    _, out = update_with_grads(kernel_module.kernel_chunk_update, x, rule, n_valid)
    if rule.step_bound > 0 and rule.step_bound != 1.0:
        assert (ref_result.scale < 1).all()  # the bound's backward is exercised
    for name, g in ref.items():
        if name in ("s1", "s2"):  # beta = 0: the carried momentum enters nothing; its gradient is exactly 0
            assert torch.equal(g, torch.zeros_like(g)) and torch.equal(out[name], g), name
        elif g is None:  # absent, or unused by the rule (c_vec, c_prev; d_mat and d_qk without erase)
            assert out[name] is None, name
        else:
            assert out[name] is not None and out[name].shape == g.shape, name
            assert g.abs().max() > 0 and rel_err(out[name], g) < 1e-5, (name, rel_err(out[name], g))


@pytest.mark.parametrize("case, dtype", [("reads, erase", torch.bfloat16),
                                         ("no reads, erase, broadcast keys", torch.bfloat16),
                                         ("anchor, reads, erase", torch.bfloat16),
                                         ("anchor, reads, no erase", torch.bfloat16),  # the largest margin measured
                                         ("padded last chunk, reads", torch.float16),
                                         ("C=64, d=40, h=64 (largest 16-bit backward tile, padded)", torch.bfloat16)])
def test_fused_backward_16_bit(case, dtype, interpreted_kernel, no_fallback):
    """In 16 bits the naive path rounds every intermediate, the kernel only its matrix products' operands (the
    64-tile case: the backward's largest 16-bit tiles, which fit on an H100 only with 16-bit operands): against the fp32
    gradients, the kernel's are within 16-bit error and no further than the naive path's plus 2e-2 (measured over
    every case: at most 1.7e-2 further, on E_qk without erase; docs/training.md section 7)."""
    inputs, rule, n_valid = CASES[case]
    x = chunk_leaves(**inputs)
    _, exact = update_with_grads(memory.chunk_update, x, rule, n_valid)
    _, ref = update_with_grads(memory.chunk_update, x, rule, n_valid, dtype=dtype)
    _, out = update_with_grads(kernel_module.kernel_chunk_update, x, rule, n_valid, dtype=dtype)
    for name, g in exact.items():
        if g is None or name in ("s1", "s2"):
            continue
        assert out[name].dtype == dtype, name
        kernel_err, naive_err = rel_err(out[name], g), rel_err(ref[name], g)
        assert kernel_err < 5e-2 and kernel_err <= naive_err + 2e-2, (name, kernel_err, naive_err)


def counting(monkeypatch, module, name):
    """Replace module.name by a wrapper that counts its calls; returns the count (a list of one int)."""
    calls, original = [0], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_backward_runs_the_kernel(interpreted_kernel, no_fallback, monkeypatch):
    """First-order (the default): one backward kernel launch per chunk and no PyTorch recomputation, with an
    anchor or without; first_order=False recomputes (documented, no warning) and launches no backward kernel."""
    launches = counting(monkeypatch, interpreted_kernel, "launch_chunk_update_bwd")
    recomputes = counting(monkeypatch, kernel_module, "recompute_backward")
    x = chunk_leaves(batch=(1, 2), c=8, d=8, hid=8)
    update_with_grads(kernel_module.kernel_chunk_update, x, UpdateRule())
    assert (launches[0], recomputes[0]) == (1, 0)
    update_with_grads(kernel_module.kernel_chunk_update, chunk_leaves(batch=(2, 2), c=8, d=8, hid=8, anchor=True),
                      UpdateRule())
    assert (launches[0], recomputes[0]) == (2, 0)
    update_with_grads(kernel_module.kernel_chunk_update, x, UpdateRule(first_order=False))
    assert (launches[0], recomputes[0]) == (2, 1)


def test_backward_beyond_its_tiles_recomputes_with_a_warning(interpreted_kernel, monkeypatch):
    """An fp32 chunk whose tiles exceed the backward kernel's fp32 tiles (d = 40: padded to 64 > 32) runs the
    forward kernel and recomputes its backward in PyTorch, with a warning saying so; the gradients are the naive
    path's."""
    largest = interpreted_kernel.BWD_MAX_BLOCK[torch.float32]
    assert largest < interpreted_kernel.block(40) <= interpreted_kernel.MAX_BLOCK
    monkeypatch.setattr(kernel_module, "_warned", set())
    launches = counting(monkeypatch, interpreted_kernel, "launch_chunk_update_bwd")
    x = chunk_leaves(batch=(1,), c=8, d=40, hid=8)
    _, ref = update_with_grads(memory.chunk_update, x, BOUND)
    with pytest.warns(UserWarning, match=r"backward recomputes in PyTorch instead: C=8, d=40, h=8"):
        _, out = update_with_grads(kernel_module.kernel_chunk_update, x, BOUND)
    assert launches[0] == 0
    for name, g in ref.items():
        if g is not None:
            assert rel_err(out[name], g) < 1e-5, name
