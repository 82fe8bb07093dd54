"""``model.kernel: triton`` (hope_scale/model/kernels): the fused chunk-update kernel computes what the naive
PyTorch ``memory.chunk_update`` computes, forward and backward, and the layer and model run it where configured.

There is no GPU here: the kernel runs in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` is read when a kernel is
decorated (``triton_chunk`` is imported), not when triton is imported, so the ``interpreted_kernel`` fixture sets
it and (re)imports ``triton_chunk`` under it, whatever the suite imported before, and restores both afterwards.
That suffices although torch may have imported triton already: the kernel calls only triton.language builtins
(triton.language's own jit functions, such as ``tl.sum``, keep the mode of triton's import). The fallback without a GPU and without the interpreter is checked in a fresh subprocess. Shapes are tiny (the
interpreter runs each program's tile operations in numpy).
"""

import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hope_scale.model import ConfigError, ModelConfig, build_model  # noqa: E402
from hope_scale.model import memory  # noqa: E402
from hope_scale.model.kernels import apply_kernel  # noqa: E402
from hope_scale.model.kernels import chunk_update as kernel_module  # noqa: E402
from hope_scale.model.memory import MemoryState, UpdateRule, chunk_coefficients, chunk_step  # noqa: E402
from hope_scale.model.titans import SelfModifyingTitans  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT_FIELDS = ("w1", "w2", "s1", "s2", "reads", "overshoot", "scale")


@pytest.fixture(scope="module")
def interpreted_kernel():
    """triton_chunk decorated under TRITON_INTERPRET=1 (the CPU interpreter) for this module's tests."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    # the other kernel modules bind triton_chunk's jit helpers when they run: reloaded after it, in the same mode
    modules = [importlib.import_module(f"hope_scale.model.kernels.{name}")
               for name in ("triton_chunk", "triton_coefficients", "triton_projection", "triton_projection_scan")]
    if not all(m.INTERPRETED for m in modules):
        modules = [importlib.reload(m) for m in modules]
    assert all(m.INTERPRETED for m in modules)
    yield modules[0]
    if before is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = before
    if torch.cuda.is_available():  # leave the compiled kernels to the rest of a GPU session
        for m in modules:
            importlib.reload(m)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fails the test if any chunk ran the naive update instead of the kernel (every fallback warns)."""
    fallbacks: set[str] = set()
    monkeypatch.setattr(kernel_module, "_warned", fallbacks)
    yield
    assert not fallbacks, fallbacks


def chunk_inputs(batch=(2, 2), c=16, d=16, hid=16, reads=True, shared_keys_axis=False, n_valid=None, seed=0,
                 anchor=False):
    """Random leaves of one chunk: a state, keys/targets/queries (normalized inside ``run``), eta and alpha; with
    ``shared_keys_axis`` the keys, eta and alpha have a singleton memory axis (the stacked projection memories);
    with ``anchor`` the weights retention decays toward, without the leading batch axis (broadcast over it, as
    the layer's meta-learned initial weights are)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)  # noqa: E731
    key_batch = (*batch[:-1], 1) if shared_keys_axis else batch
    x = dict(w1=rand(*batch, d, hid, scale=0.5 / hid**0.5), w2=rand(*batch, hid, d, scale=1 / d**0.5),
             s1=rand(*batch, d, hid, scale=0.1), s2=rand(*batch, hid, d, scale=0.1), keys=rand(*key_batch, c, d),
             targets=rand(*batch, c, d), eta=torch.rand(*key_batch, c, generator=g),
             alpha=0.9 + 0.1 * torch.rand(*key_batch, c, generator=g))
    if reads:
        x["queries"] = rand(*batch, c, d)
    if anchor:
        x["a1"], x["a2"] = rand(*batch[1:], d, hid, scale=0.5 / hid**0.5), rand(*batch[1:], hid, d, scale=1 / d**0.5)
    if n_valid is not None:  # a padded last chunk, as the layer pads it: eta = 0, alpha = 1
        x["eta"][..., n_valid:] = 0.0
        x["alpha"][..., n_valid:] = 1.0
    return x


def run(step, x, erase=True, rule=UpdateRule(), n_valid=None, dtype=torch.float32, grad=False):
    """One chunk through ``step`` (chunk_step's signature); returns the result and, with ``grad``, the gradients
    of a loss of every output with respect to every leaf."""
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_(grad) for k, v in x.items()}  # fresh leaves
    state = MemoryState(leaves["w1"], leaves["w2"], leaves["s1"], leaves["s2"], None, None, None, None)
    queries = F.normalize(leaves["queries"], dim=-1) if "queries" in leaves else None
    anchor = (leaves["a1"], leaves["a2"]) if "a1" in leaves else None
    r = step(state, F.normalize(leaves["keys"], dim=-1), leaves["targets"], leaves["eta"], leaves["alpha"], 0.0,
             erase, rule, queries=queries, n_valid=n_valid, anchor=anchor)
    if not grad:
        return r, None
    loss = r.w1.pow(2).sum() + r.w2.sin().sum() + r.s1.sum() + r.s2.pow(2).sum()
    if r.reads is not None:
        loss = loss + r.reads.pow(2).sum() + r.reads.sum()
    loss.backward()
    return r, {k: v.grad for k, v in leaves.items()}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (in fp32)."""
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_results_close(r, ref, tol):
    for name in RESULT_FIELDS:
        a, b = getattr(r, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
            assert rel_err(a, b) <= tol, (name, rel_err(a, b))


CASES = {  # name: (chunk_inputs kwargs, run kwargs)
    "main memory, reads, erase": (dict(), dict()),
    "main memory, reads, no erase": (dict(), dict(erase=False)),
    "main memory, reads, erase, anchor": (dict(anchor=True), dict()),
    "projection stack, no reads, anchor": (dict(batch=(2, 2, 3), reads=False, shared_keys_axis=True, anchor=True),
                                           dict()),
    "projection stack [B,H,P], no reads": (dict(batch=(2, 2, 3), reads=False, shared_keys_axis=True), dict()),
    "projection stack, no reads, no erase": (dict(batch=(2, 2, 3), reads=False, shared_keys_axis=True),
                                             dict(erase=False)),
    "padded last chunk, reads": (dict(n_valid=11), dict(n_valid=11, rule=UpdateRule(step_bound=0.3))),
    "padded last chunk, no reads": (dict(reads=False, n_valid=5), dict(n_valid=5, rule=UpdateRule(step_bound=0.3))),
    "padded tiles (C=8, d=8, h=12)": (dict(c=8, d=8, hid=12), dict()),
    "C=32, d=16, h=32": (dict(batch=(1, 2), c=32, hid=32), dict()),
    "plain eta, no step bound": (dict(), dict(rule=UpdateRule(step_bound=0.0, normalized_eta=False))),
    "not first-order, tighter bound": (dict(), dict(rule=UpdateRule(step_bound=0.5, first_order=False))),
    # the recomputed backward with shared keys and coefficients and an anchor broadcast over the batch
    "projection stack, anchor, not first-order": (dict(batch=(2, 2, 3), reads=False, shared_keys_axis=True,
                                                       anchor=True), dict(rule=UpdateRule(first_order=False))),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_naive_float32(case, interpreted_kernel, no_fallback):
    inputs, kw = CASES[case]
    x = chunk_inputs(**inputs)
    ref, _ = run(chunk_step, x, **kw)
    out, _ = run(kernel_module.kernel_chunk_step, x, **kw)
    assert_results_close(out, ref, tol=1e-5)
    if kw.get("rule", UpdateRule()).step_bound > 0:
        assert (ref.scale < 1).any()  # the step bound is active somewhere: its path is exercised


def test_projection_stack_shares_keys_coefficients_and_anchor(interpreted_kernel, no_fallback, monkeypatch):
    """The stacked projection memories' kernel reads their shared keys, eta and coefficients once per head and
    the anchor once per head and memory (program n: entry n // P, n % (H P)), not a copy per memory and sample:
    with B, H, P = 2, 2, 3 the launch gets 4 rows of keys and coefficients and 6 of anchors for 12 programs."""
    rows = {}

    def recorded(*args, _launch=interpreted_kernel.launch_chunk_update, **kwargs):
        x = dict(zip(interpreted_kernel.KERNEL_INPUTS, args))
        rows.update({name: x[name].shape[0] for name in ("w1", "keys", "eta", "erase_inverse", "anchor1")})
        return _launch(*args, **kwargs)

    monkeypatch.setattr(interpreted_kernel, "launch_chunk_update", recorded)
    inputs, kw = CASES["projection stack, no reads, anchor"]
    run(kernel_module.kernel_chunk_step, chunk_inputs(**inputs), **kw)
    assert rows == dict(w1=12, keys=4, eta=4, erase_inverse=4, anchor1=6), rows


@pytest.mark.parametrize("case", ["main memory, reads, erase, anchor", "projection stack [B,H,P], no reads"])
def test_kernel_bfloat16(case, interpreted_kernel, no_fallback):
    """In bf16 the naive path rounds every intermediate to bf16, the kernel only its matrix products' operands
    (accumulating and computing the rest in fp32): both are within bf16
    error of the fp32 result, and the kernel no further from it than the naive path (plus one bf16 rounding)."""
    inputs, kw = CASES[case]
    x = chunk_inputs(**inputs)
    exact, _ = run(chunk_step, x, **kw)
    ref, _ = run(chunk_step, x, dtype=torch.bfloat16, **kw)
    out, _ = run(kernel_module.kernel_chunk_step, x, dtype=torch.bfloat16, **kw)
    assert_results_close(out, ref, tol=5e-2)
    for name in RESULT_FIELDS:
        if getattr(exact, name) is not None:
            kernel_err, naive_err = rel_err(getattr(out, name), getattr(exact, name)), \
                rel_err(getattr(ref, name), getattr(exact, name))
            assert kernel_err <= naive_err + 8e-3, (name, kernel_err, naive_err)


@pytest.mark.parametrize("case", ["main memory, reads, erase", "projection stack [B,H,P], no reads",
                                  "padded last chunk, reads", "not first-order, tighter bound",
                                  "main memory, reads, erase, anchor", "projection stack, no reads, anchor"])
def test_kernel_gradients_equal_naive(case, interpreted_kernel, no_fallback):
    """Gradients with respect to the state (w1, w2, s1, s2), keys, targets, queries, the anchor, eta and alpha (the
    last two through the coefficients, in PyTorch): the backward kernel's (first-order; the second-order rule
    recomputes the chunk in PyTorch) match to fp32 rounding. tests/test_model_kernel_backward.py checks every
    coefficient."""
    inputs, kw = CASES[case]
    x = chunk_inputs(**inputs)
    _, ref = run(chunk_step, x, grad=True, **kw)
    _, out = run(kernel_module.kernel_chunk_step, x, grad=True, **kw)
    assert out.keys() == ref.keys()
    for name, g in ref.items():
        assert out[name] is not None and out[name].shape == g.shape, name
        if name in ("s1", "s2"):  # beta = 0: the carried momentum enters nothing; its gradient is exactly 0
            assert torch.equal(g, torch.zeros_like(g)) and torch.equal(out[name], g), name
        else:
            assert g.abs().max() > 0 and rel_err(out[name], g) < 1e-5, (name, rel_err(out[name], g))


def layer_config(kernel: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, chunk_size_memory=16,
                                 chunk_size_projection=16, max_seq_len=128, kernel=kernel,
                                 cms_levels=[{"period": 1, "hidden_mult": 1.0}]), **overrides})


@pytest.mark.parametrize("widths", [{}, {"proj_hidden_mult": 0.5}], ids=["equal-widths", "narrow-projections"])
def test_layer_in_pieces_mid_chunk_equals_naive(widths, interpreted_kernel, no_fallback):
    """A SelfModifyingTitans layer with the kernel, run in two pieces split mid-chunk (pending tokens in the state,
    a head chunk that continues them, a padded last chunk) equals the naive layer run in one piece, outputs and
    gradients of every parameter; also with projection memories narrower than the main memory. (Without
    model.write_cost, whose gradient is a mean over each forward's tokens.)"""
    torch.manual_seed(0)
    naive = SelfModifyingTitans(layer_config("naive", write_cost=0.0, **widths))
    fused = apply_kernel(SelfModifyingTitans(layer_config("triton", write_cost=0.0, **widths)), "triton")
    fused.load_state_dict(naive.state_dict())
    assert fused.chunk_step is kernel_module.kernel_chunk_step and naive.chunk_step is chunk_step
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    y_ref, _ = naive(x)
    state, pieces = fused.init_state(2), []
    for a, b in ((0, 9), (9, 37)):
        y, state = fused(x[:, a:b], state)
        pieces.append(y)
    y = torch.cat(pieces, dim=1)
    assert rel_err(y, y_ref) < 1e-5
    assert (naive.last_stats["mem_step_scale"] < 1) or (naive.last_stats["proj_step_scale"] < 1)  # bound active
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    for (name, p), q in zip(naive.named_parameters(), fused.parameters()):
        assert rel_err(q.grad, p.grad) < 1e-4, (name, rel_err(q.grad, p.grad))


@pytest.mark.parametrize("compile", [False, True])
def test_model_with_kernel_equals_naive(compile, interpreted_kernel, no_fallback, monkeypatch):
    """build_model applies model.kernel (with model.compile: after it, replacing its compiled chunk step; the blocks
    stay compiled, here by the aot_eager backend as in tests/test_model_compile.py): loss and gradients of a whole
    Hope model equal the naive eager model's."""
    from hope_scale.model import accel

    monkeypatch.setattr(accel, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    results = []
    for kernel in ("naive", "triton"):
        torch.manual_seed(0)
        model = build_model(layer_config(kernel, compile=compile and kernel == "triton"))
        results.append(loss_and_grads(model))
        layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
        expected = kernel_module.kernel_chunk_step if kernel == "triton" else chunk_step
        assert layers and all(m.chunk_step is expected for m in layers)
    torch._dynamo.reset()
    assert_same_loss_and_grads(results[1], results[0])


def loss_and_grads(model) -> tuple[torch.Tensor, dict]:
    """The loss of ``model`` on a fixed random batch and every parameter's gradient of it."""
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(2))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_loss_and_grads(result, reference) -> None:
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert abs(loss.item() - ref_loss.item()) < 1e-6 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 1e-4, name


@pytest.mark.parametrize("checkpointing", ["block", "memory"])
def test_kernel_under_activation_checkpointing(checkpointing, interpreted_kernel, no_fallback):
    """With train.activation_checkpointing the kernel's backward runs inside a recomputed region, whose saved
    tensors may be unpacked only once (found on an H200 with hope-760m's ``memory`` checkpointing): loss and
    gradients equal the naive model's without checkpointing."""
    from hope_scale.parallel.recompute import apply_activation_checkpointing

    results = []
    for kernel, mode in (("naive", "none"), ("triton", checkpointing)):
        torch.manual_seed(0)
        results.append(loss_and_grads(apply_activation_checkpointing(build_model(layer_config(kernel)), mode)))
    assert_same_loss_and_grads(results[1], results[0])


def test_unsupported_rule_runs_naive_with_a_warning(interpreted_kernel, monkeypatch):
    """Momentum (beta > 0) is not in the kernel: apply_kernel leaves the naive step on such a layer, and a direct
    call of the kernel step runs the naive update, each with a warning naming the reason."""
    monkeypatch.setattr(kernel_module, "_warned", set())
    layer = SelfModifyingTitans(layer_config("triton", inner_momentum=0.5))
    with pytest.warns(UserWarning, match=r"model\.kernel=triton: inner_momentum=0.5"):
        apply_kernel(layer, "triton")
    assert layer.chunk_step is chunk_step
    x = chunk_inputs()
    keys, queries = F.normalize(x["keys"], dim=-1), F.normalize(x["queries"], dim=-1)
    state = MemoryState(x["w1"], x["w2"], x["s1"], x["s2"], None, None, None, None)
    coef = chunk_coefficients(keys, x["eta"], x["alpha"], 0.5, True, queries=queries)
    ref = memory.chunk_update(state, keys, x["targets"], coef, 0.5, UpdateRule(), queries=queries)
    monkeypatch.setattr(kernel_module, "_warned", set())
    with pytest.warns(UserWarning, match="inner_momentum=0.5"):
        out = kernel_module.kernel_chunk_update(state, keys, x["targets"], coef, 0.5, UpdateRule(), queries=queries)
    assert_results_close(out, ref, tol=0.0)
    # float64 (the kernel computes in fp32): the naive update, in float64
    state64 = MemoryState(*(x[k].double() for k in ("w1", "w2", "s1", "s2")), None, None, None, None)
    coef64 = chunk_coefficients(keys.double(), x["eta"].double(), x["alpha"].double(), 0.0, True)
    ref = memory.chunk_update(state64, keys.double(), x["targets"].double(), coef64, 0.0, UpdateRule())
    with pytest.warns(UserWarning, match=r"dtypes \['torch.float64'\]"):
        out = kernel_module.kernel_chunk_update(state64, keys.double(), x["targets"].double(), coef64, 0.0,
                                                UpdateRule())
    assert_results_close(out, ref, tol=0.0)


def test_out_of_resources_runs_naive_with_a_warning(interpreted_kernel, monkeypatch):
    """A GPU whose shared memory the chunk's tiles do not fit (Triton's OutOfResources at launch): the naive update
    runs, with a warning saying so."""
    from triton.runtime.errors import OutOfResources

    def no_room(*args, **kwargs):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(interpreted_kernel, "launch_chunk_update", no_room)
    monkeypatch.setattr(kernel_module, "_warned", set())
    x = chunk_inputs()
    ref, _ = run(chunk_step, x)
    with pytest.warns(UserWarning, match="running the naive chunk update instead: out of resource: shared memory"):
        out, _ = run(kernel_module.kernel_chunk_step, x)
    assert_results_close(out, ref, tol=1e-6)  # not bit-equal: the coefficients still come from their kernel


def test_fallback_without_gpu_or_interpreter():
    """No CUDA and no TRITON_INTERPRET: build_model with model.kernel=triton warns once, naming model.kernel, and
    the layers keep the naive chunk step (a fresh process: nothing decorated under the interpreter)."""
    script = textwrap.dedent("""
        import warnings
        import torch
        from hope_scale.model import ModelConfig, build_model
        from hope_scale.model.memory import chunk_step
        from hope_scale.model.titans import SelfModifyingTitans
        assert not torch.cuda.is_available()
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, kernel="triton",
                          cms_levels=[{"period": 1, "hidden_mult": 1.0}])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(cfg)
            build_model(cfg)
        messages = [str(w.message) for w in caught]
        layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
        assert len(layers) == 2 and all(m.chunk_step is chunk_step for m in layers)
        print(repr(messages))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    messages = eval(proc.stdout.strip().splitlines()[-1])
    assert len(messages) == 1, messages  # once per process, not per layer or model
    assert "model.kernel=triton" in messages[0] and "TRITON_INTERPRET is not set" in messages[0]


SM90_COMPILE = """
import json, sys
from hope_scale.model.kernels.sm90 import compile_sm90

out = []
for kernel, dtype, c, d, h, flags in json.loads(sys.argv[1]):
    compiled = compile_sm90(kernel, dtype, c, d, h, **flags)
    out.append([compiled.shared_bytes, compiled.cubin_bytes, compiled.fits()])
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm90(tmp_path, interpreted_kernel):
    """The interpreter runs code that the GPU compiler may reject, and does not see shared memory: the kernels are
    compiled for sm_90 (H100/H200; front end to cubin with triton's bundled ptxas, no GPU needed) with every
    branch on and off, and at the largest supported 16-bit shapes (C = d = h = 64, the shipped models' head size
    and projection chunks, in bf16 for both kernels; the sequence kernels at the main memory's C = 16; the
    coefficient, projection-reads and projection-scan kernels at the projection memories' C = d = h = 64), each
    within the shared memory one block may use there. The
    fp32 backward is compiled at 16 with every branch on: at its limit, 32 (92 KiB of 227), its IEEE fp32
    products unroll into scalar code that takes over 2 minutes to compile, so that row is left to
    ``benchmarks/kernel_shared_memory.py --dtypes fp32``."""
    import json

    on = dict(normalized=True, bound=True, erase=True, reads=True, anchor=True)
    off = dict(normalized=False, bound=False, erase=False, reads=False, anchor=False)
    assert interpreted_kernel.BWD_MAX_BLOCK[torch.bfloat16] == interpreted_kernel.MAX_BLOCK == 64
    configs = [["forward", "fp32", 16, 16, 16, dict(on, anchor=False)],
               ["forward", "fp32", 8, 8, 12, off],
               ["forward", "bf16", 64, 64, 64, on],
               ["backward", "fp32", 8, 8, 12, off],
               ["backward", "fp32", 16, 16, 16, on],
               ["backward", "bf16", 64, 64, 64, on],
               ["backward", "bf16", 64, 64, 64, dict(on, reads=False)],  # the projection memories
               ["sequence forward", "bf16", 16, 64, 64, on],  # the shipped models' main memory, whole chunks
               ["sequence backward", "bf16", 16, 64, 64, on],
               ["sequence backward", "fp32", 16, 16, 16, dict(off, normalized=True)],
               ["coefficients forward", "bf16", 64, 64, 64, dict(on, reads=False)],  # the projection memories
               ["coefficients backward", "bf16", 64, 64, 64, dict(on, reads=False)],
               ["coefficients forward", "fp32", 16, 16, 16, on],
               ["coefficients backward", "fp32", 16, 16, 16, on],
               ["coefficients backward", "bf16", 16, 64, 64, off],
               ["projection reads forward", "bf16", 64, 64, 64, on],
               ["projection reads backward", "bf16", 64, 64, 64, on],
               ["projection reads backward", "fp32", 16, 16, 16, on],
               ["projection scan forward", "bf16", 64, 64, 64, dict(on, reads=False)],  # the shipped projections
               ["projection scan backward", "bf16", 64, 64, 64, dict(on, reads=False)],
               ["projection scan backward", "fp32", 8, 8, 12, dict(off, normalized=True)]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path))  # compiled afresh
    proc = subprocess.run([sys.executable, "-c", SM90_COMPILE, json.dumps(configs)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for config, (shared, cubin_bytes, fits) in zip(configs, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert cubin_bytes > 0 and fits, (config, shared)


def test_kernel_config_field():
    from hope_scale.export.export import exported_model_config
    from hope_scale.model.config import EXECUTION_FIELDS
    from hope_scale.train.pretrain import model_differences

    with pytest.raises(ConfigError, match=r"model\.kernel"):
        ModelConfig(kernel="cuda")
    assert "kernel" in EXECUTION_FIELDS
    assert exported_model_config(layer_config("triton"))["kernel"] == "naive"  # exported models run naive
    assert model_differences(layer_config("naive").to_dict(), layer_config("triton").to_dict()) == []
    old = {k: v for k, v in layer_config("naive").to_dict().items() if k != "kernel"}  # saved before the field
    assert model_differences(old, layer_config("triton").to_dict()) == []
    with pytest.raises(ValueError, match=r"model\.kernel"):
        apply_kernel(torch.nn.Linear(1, 1), "cuda")


def test_rule_variants_in_the_kernel_are_the_tested_ones():
    """Every rule the kernel accepts is one of CASES' (defaults, plain eta without bound, not first-order): the
    rule gate rejects the rest."""
    rule = UpdateRule()
    assert kernel_module.rule_unsupported(0.0, rule) is None
    assert kernel_module.rule_unsupported(0.0, dataclasses.replace(rule, step_bound=0.0, normalized_eta=False)) is None
    assert kernel_module.rule_unsupported(0.0, dataclasses.replace(rule, first_order=False)) is None
    assert "inner_momentum" in kernel_module.rule_unsupported(0.9, rule)
    assert "mem_branch_norm" in kernel_module.rule_unsupported(0.0, dataclasses.replace(rule, branch_norm=True))
    assert "inner_overshoot" in kernel_module.rule_unsupported(0.0, dataclasses.replace(rule, overshoot="aligned"))
