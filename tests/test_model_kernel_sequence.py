"""The main memory's sequence kernel (``kernels/sequence_update.py``: all of a forward's whole chunks in one launch per
direction): ``kernel_scan_chunks`` computes what ``titans.scan_chunks`` computes with one naive ``chunk_step`` per
chunk (reads, end state with its buffers, step-bound statistics) and the same gradients of every input (chunk-start
state, keys, values, queries, eta and alpha through the coefficients, the anchor retention decays toward), for Hope's
self-generated targets and Titans' plain ones, with and without erase and anchor, with a padded last chunk and with
a padded chunk alone; in fp32 and bf16; and it is the sequence kernel that ran (every fallback warns:
``no_fallback``). Run in Triton's CPU interpreter, as tests/test_model_kernel.py (whose fixtures this module uses);
shapes are tiny. The whole layer and model with the kernel are checked there (they scan with this kernel)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hope_scale.model import ModelConfig  # noqa: E402
from hope_scale.model.kernels import sequence_update  # noqa: E402
from hope_scale.model.memory import MemoryState, chunk_coefficients  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans, scan_chunks  # noqa: E402
from tests.test_model_kernel import interpreted_kernel, no_fallback, rel_err  # noqa: E402, F401

# name: (layer config overrides, self_modifying, scan_inputs kwargs)
CASES = {
    "hope: erase, anchor": (dict(), True, dict()),
    "hope: padded last chunk, tight bound": (dict(inner_step_bound=0.3), True, dict(n_valid=7)),
    "hope: no erase, retention toward zero": (dict(dgd_erase=False, retain_toward="zero"), True, dict()),
    "hope: plain eta, no step bound": (dict(normalized_eta=False, inner_step_bound=0.0), True, dict(n_chunks=2)),
    "hope: one padded chunk alone": (dict(), True, dict(n_chunks=1, n_valid=5)),
    "hope: padded tiles (C=8, d=8, h=12)": (dict(d_model=16, chunk_size_memory=8, mem_hidden_mult=1.5), True,
                                            dict(c=8, d=8, hid=12, n_valid=3)),
    "titans: plain targets": (dict(), False, dict(n_valid=10)),
}


def make_layer(overrides: dict, self_modifying: bool) -> SelfModifyingTitans:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, chunk_size_memory=16,
                                chunk_size_projection=16, cms_levels=[{"period": 1, "hidden_mult": 1.0}]),
                         **overrides})
    return SelfModifyingTitans(cfg, self_modifying=self_modifying)


def scan_inputs(n_chunks=3, batch=(2, 2), c=16, d=16, hid=16, n_valid=None, seed=0) -> tuple[dict, int]:
    """A chunk-start state and a forward's chunked keys, values, queries, eta and alpha ([B, H, N, C, ...]), and
    the last chunk's number of real tokens: ``n_valid`` (padded after them as the layer pads it: eta = 0,
    alpha = 1), or C."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)  # noqa: E731
    x = dict(w1=rand(*batch, d, hid, scale=0.5 / hid**0.5), w2=rand(*batch, hid, d, scale=1 / d**0.5),
             s1=rand(*batch, d, hid, scale=0.1), s2=rand(*batch, hid, d, scale=0.1),
             keys=rand(*batch, n_chunks, c, d), values=rand(*batch, n_chunks, c, d),
             queries=rand(*batch, n_chunks, c, d), eta=torch.rand(*batch, n_chunks, c, generator=g),
             alpha=0.9 + 0.1 * torch.rand(*batch, n_chunks, c, generator=g))
    if n_valid is not None:
        x["eta"][..., -1, n_valid:] = 0.0
        x["alpha"][..., -1, n_valid:] = 1.0
    return x, c if n_valid is None else n_valid


def scan(layer, scan_fn, x, n_valid, dtype=torch.float32, grad=True):
    """``scan_fn`` over the chunks of ``x`` on fresh leaves; returns the reads, end state and step bounds, and the
    gradients of a loss of all of them with respect to every leaf and the layer's anchor (its initial weights)."""
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_(grad) for k, v in x.items()}
    layer.zero_grad()  # first: casting the layer would cast (in place) the gradients an earlier call returned
    layer.to(dtype)
    n_chunks, c_len, d = leaves["keys"].shape[-3:]
    keys, queries = F.normalize(leaves["keys"], dim=-1), F.normalize(leaves["queries"], dim=-1)
    values = F.normalize(leaves["values"], dim=-1)
    coef = chunk_coefficients(keys, leaves["eta"], leaves["alpha"], layer.beta, layer.erase, queries=queries)
    w1 = leaves["w1"]
    zeros = lambda *s: w1.new_zeros(*w1.shape[:-2], *s)  # noqa: E731
    mem = MemoryState(w1, leaves["w2"], leaves["s1"], leaves["s2"], zeros(c_len, d), zeros(c_len, d), zeros(c_len),
                      zeros(c_len))
    reads, mem, bounds = scan_fn(layer, mem, keys, values, queries, leaves["eta"], leaves["alpha"], coef, n_valid)
    out = dict(reads=reads, **mem.tensors(),
               overshoot=torch.cat([o.reshape(-1) for o, _ in bounds]) if bounds else None,
               scale=torch.cat([s.reshape(-1) for _, s in bounds]) if bounds else None)
    if not grad:
        return out, None
    g = torch.Generator().manual_seed(1)
    loss = sum((torch.randn(t.shape, generator=g).to(t.device) * t.float()).sum() + t.float().pow(2).sum()
               for name, t in out.items() if t is not None and name not in ("overshoot", "scale"))
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads.update({name: p.grad for name, p in (("anchor1", layer.mem_w1), ("anchor2", layer.mem_w2))})
    return out, grads


@pytest.mark.parametrize("case", CASES)
def test_sequence_kernel_equals_chunk_steps(case, interpreted_kernel, no_fallback):
    overrides, self_modifying, kw = CASES[case]
    layer = make_layer(overrides, self_modifying)
    x, n_valid = scan_inputs(**kw)
    ref, ref_grads = scan(layer, scan_chunks, x, n_valid)
    out, grads = scan(layer, sequence_update.kernel_scan_chunks, x, n_valid)
    for name, r in ref.items():
        if r is None:
            assert out[name] is None, name
            continue
        assert out[name].shape == r.shape, name
        assert rel_err(out[name], r) < 1e-5 if r.abs().max() > 0 else torch.equal(out[name], r), name
    if layer.rule.step_bound > 0 and ref["scale"] is not None:
        assert (ref["scale"] < 1).any()  # the step bound is active: its forward and backward are exercised
    for name, g in ref_grads.items():
        if g is None or not g.any():  # the anchor without retention toward it; the carried momentum (beta = 0)
            assert name in ("anchor1", "anchor2", "s1", "s2"), name
            assert grads[name] is None or not grads[name].any(), name
        else:
            assert rel_err(grads[name], g) < 1e-5, (name, rel_err(grads[name], g))


def test_sequence_kernel_bfloat16(interpreted_kernel, no_fallback):
    """In bf16 both paths round the state to bf16 between chunks; the naive path also rounds every intermediate,
    the kernel only its products' operands: both within bf16 error of the fp32 result, the kernel no further from
    it than the naive path (plus one bf16 rounding)."""
    layer = make_layer(dict(), True)
    x, n_valid = scan_inputs(n_valid=9)
    exact, exact_grads = scan(layer, scan_chunks, x, n_valid)
    ref, ref_grads = scan(layer, scan_chunks, x, n_valid, dtype=torch.bfloat16)
    out, grads = scan(layer, sequence_update.kernel_scan_chunks, x, n_valid, dtype=torch.bfloat16)
    pairs = [(out[k], ref[k], exact[k], k) for k in ("reads", "w1", "w2", "targets", "overshoot", "scale")]
    pairs += [(grads[k], ref_grads[k], exact_grads[k], k) for k in ("w1", "w2", "keys", "values", "queries", "eta",
                                                                   "alpha", "anchor1", "anchor2")]
    for a, b, e, name in pairs:
        assert a.dtype == torch.bfloat16 and rel_err(a, b) < 5e-2, (name, rel_err(a, b))
        assert rel_err(a, e) <= rel_err(b, e) + 8e-3, (name, rel_err(a, e), rel_err(b, e))


def test_unsupported_scan_runs_chunk_steps_with_a_warning(interpreted_kernel, monkeypatch):
    """The second-order rule is not in the sequence kernel (its targets and backward are first-order): the scan
    runs one chunk step each, with a warning naming the reason, and gives the same result."""
    from hope_scale.model.kernels import chunk_update

    monkeypatch.setattr(chunk_update, "_warned", set())
    layer = make_layer(dict(first_order=False), True)
    x, n_valid = scan_inputs(n_chunks=2)
    ref, _ = scan(layer, scan_chunks, x, n_valid, grad=False)
    with pytest.warns(UserWarning, match="first_order=False"):
        out, _ = scan(layer, sequence_update.kernel_scan_chunks, x, n_valid, grad=False)
    for name, r in ref.items():
        assert torch.equal(out[name], r), name


def test_model_scans_the_memories_in_one_launch(interpreted_kernel, no_fallback, monkeypatch):
    """A Hope model with ``model.kernel: triton`` runs its main memory's whole chunks through the sequence kernel
    and its projection memories' whole chunks through the projection scan kernel: one forward and one backward
    launch of each per layer and training step, whatever the number of chunks. The per-chunk kernels are left to
    what the scans do not cover (here a projection chunk that ends after the forward: its reads, in one launch
    each way), and the main memory's coefficients are one launch per direction for all its chunks. Without this
    the layer would silently keep the per-chunk path, or the coefficients or reads in PyTorch, which give the same
    numbers."""
    from hope_scale.model import build_model
    from hope_scale.model.kernels import triton_coefficients, triton_projection, triton_projection_scan
    from tests.test_model_kernel import layer_config

    launches = {}
    for module, names in ((interpreted_kernel, ("launch_chunk_update", "launch_chunk_update_bwd",
                                                "launch_sequence_update", "launch_sequence_update_bwd")),
                          (triton_coefficients, ("launch_chunk_coefficients", "launch_chunk_coefficients_bwd")),
                          (triton_projection, ("launch_projection_reads", "launch_projection_reads_bwd")),
                          (triton_projection_scan, ("launch_projection_scan", "launch_projection_scan_bwd"))):
        for name in names:
            def counted(*args, _launch=getattr(module, name), _name=name, **kwargs):
                launches[_name] = launches.get(_name, 0) + 1
                return _launch(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    torch.manual_seed(0)
    model = build_model(layer_config("triton", n_layers=2))
    ids = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(2))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    # 40 tokens per layer: main memory 2 whole chunks of 16 and a padded one; projection memories 2 whole chunks
    # of 16 (scanned) and 8 tokens that wait in the state (read only)
    assert launches == {"launch_sequence_update": 2, "launch_sequence_update_bwd": 2,
                        "launch_projection_scan": 2, "launch_projection_scan_bwd": 2,
                        "launch_chunk_coefficients": 2, "launch_chunk_coefficients_bwd": 2,
                        "launch_projection_reads": 2, "launch_projection_reads_bwd": 2}, launches
