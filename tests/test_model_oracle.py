"""The chunk-parallel (self-modifying) Titans layer against the token-by-token float64 oracle."""

import copy

import pytest
import torch

from hope_scale.model.config import EARLIER_UPDATE, ModelConfig
from hope_scale.model.memory import MemoryState
from hope_scale.model.reference import reference_forward
from hope_scale.model.titans import SelfModifyingTitans, TitansState

# (batch, seq_len, d_model, heads, C_mem, C_proj, adaptive_q, momentum, erase)
SHAPES = [
    (2, 13, 16, 2, 4, 6, True, 0.9, True),  # seq len a multiple of neither chunk size
    (1, 17, 24, 3, 5, 3, False, 0.9, True),  # static q, C_proj < C_mem
    (3, 9, 16, 4, 16, 16, True, 0.0, True),  # chunks longer than the sequence, no momentum
    (2, 11, 16, 1, 1, 2, True, 0.5, False),  # token-level chunks, plain GD (no erase)
    (1, 90, 16, 2, 16, 64, True, 0.9, True),  # the production chunk sizes, a partial last chunk of each
]
# inner-update variants (ModelConfig overrides); the default is the stabilized rule
VARIANTS = {
    "default": {},
    "bound-active": dict(inner_step_bound=0.02, eta_init=0.5),  # s < 1 in most chunks
    "aligned-second-order": dict(inner_overshoot="aligned", first_order=False, normalized_eta=False,
                                 per_memory_inputs=False, inner_step_bound=0.05),
    "earlier": EARLIER_UPDATE,  # the earlier unbounded form with the normalized branch
    "init-projections": dict(retain_toward="init_projections"),  # the main memory decays toward zero
    "narrow-projections": dict(proj_hidden_mult=0.5),  # projection memories narrower than the main memory
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_layer(shape, self_modifying=True, dtype=torch.float64, variant="default"):
    _, _, d_model, heads, c_mem, c_proj, adaptive_q, momentum, erase = shape
    cfg = ModelConfig(**(dict(d_model=d_model, n_heads=heads, chunk_size_memory=c_mem, chunk_size_projection=c_proj,
                              mem_hidden_mult=1.5, adaptive_q=adaptive_q, dgd_erase=erase)
                         | VARIANTS[variant] | dict(inner_momentum=momentum)))
    torch.manual_seed(0)
    return SelfModifyingTitans(cfg, self_modifying=self_modifying).to(dtype)


def perturbed_state(layer: SelfModifyingTitans, batch: int, pos: int) -> TitansState:
    """A non-trivial initial state whose tensors require grad: mid-chunk position (pending tokens in the
    buffers), non-zero momentum, weights away from the meta-learned initial ones."""
    g = torch.Generator().manual_seed(1)
    fresh = layer.init_state(batch)

    def rand(t, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=t.dtype)

    def mem(st: MemoryState | None, chunk: int):
        if st is None:
            return None
        n = pos % chunk
        valid = lambda t: (torch.arange(t.shape[-1]) < n).to(t.dtype)  # noqa: E731  rows of pending tokens
        keys = torch.nn.functional.normalize(torch.randn(st.keys.shape, generator=g, dtype=st.keys.dtype), dim=-1)
        fields = [st.w1.detach() + 0.05 * rand(st.w1), st.w2.detach() + 0.05 * rand(st.w2),
                  0.05 * rand(st.s1), 0.05 * rand(st.s2), keys * valid(keys[..., 0])[..., None],
                  rand(st.targets) * valid(st.targets[..., 0])[..., None],
                  rand(st.eta, 0.0, 0.5) * valid(st.eta), rand(st.alpha, 0.9, 1.0) * valid(st.alpha)]
        return MemoryState(*(f.requires_grad_() for f in fields))

    cfg = layer.cfg
    return TitansState(pos, (0.1 * rand(fresh.conv)).requires_grad_(), mem(fresh.proj, cfg.chunk_size_projection),
                       mem(fresh.mem, cfg.chunk_size_memory))


def state_tensors(st: TitansState) -> dict[str, torch.Tensor]:
    out = {"conv": st.conv}
    for name in ("proj", "mem"):
        part = getattr(st, name)
        if part is not None:
            out.update({f"{name}.{k}": v for k, v in part.tensors().items()})
    return out


CASES = ([(shape, "default") for shape in SHAPES]
         + [(SHAPES[0], "bound-active"), (SHAPES[4], "bound-active"), (SHAPES[0], "aligned-second-order"),
            (SHAPES[1], "aligned-second-order"), (SHAPES[0], "earlier"), (SHAPES[1], "earlier"),
            (SHAPES[0], "init-projections"), (SHAPES[0], "narrow-projections"), (SHAPES[4], "narrow-projections")])


@pytest.mark.parametrize("self_modifying", [True, False], ids=["hope", "titans"])
@pytest.mark.parametrize("shape,variant", CASES, ids=[f"shape{SHAPES.index(s)}-{v}" for s, v in CASES])
@pytest.mark.parametrize("start", ["fresh", "mid-chunk"])
def test_chunk_parallel_matches_token_loop_float64(shape, variant, self_modifying, start):
    batch, seq_len, d_model = shape[:3]
    layer = make_layer(shape, self_modifying, variant=variant)
    x = torch.randn(batch, seq_len, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    pos = 7 if shape[5] < 64 else 83  # mid-chunk for both chunk sizes
    state = None if start == "fresh" else perturbed_state(layer, batch, pos=pos)
    init_tensors = {} if state is None else state_tensors(state)

    if variant == "narrow-projections" and self_modifying:  # the case really has two hidden widths
        assert layer.proj_w1.shape[-1] < layer.mem_w1.shape[-1]
    y_fast, st_fast = layer(x, state)
    y_ref, st_ref = reference_forward(layer, x, state)

    assert rel_err(y_fast, y_ref) < 1e-6
    fast_t, ref_t = state_tensors(st_fast), state_tensors(st_ref)
    assert fast_t.keys() == ref_t.keys()
    for k in fast_t:
        assert rel_err(fast_t[k], ref_t[k]) < 1e-6, k
    assert st_fast.pos == st_ref.pos == (0 if state is None else pos) + seq_len
    if variant == "bound-active":  # the case really exercises the bound
        assert layer.last_stats["mem_step_scale"] < 0.9

    # gradients of a random loss on outputs and final states, w.r.t. every parameter, x and the initial state
    proj = torch.randn(y_fast.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    wrt = dict(layer.named_parameters()) | {"x": x} | {f"init.{k}": v for k, v in init_tensors.items()}
    names = list(wrt)

    def grads(y, st):
        loss = (y * proj).sum() + 0.1 * st.mem.w1.sum() + 0.1 * st.mem.s2.pow(2).sum()
        return torch.autograd.grad(loss, [wrt[n] for n in names], allow_unused=True)

    g_fast, g_ref = grads(y_fast, st_fast), grads(y_ref, st_ref)
    for n, a, b in zip(names, g_fast, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, n
            continue
        assert a is not None, n
        assert rel_err(a, b) < 1e-6, n


@pytest.mark.parametrize("self_modifying", [True, False], ids=["hope", "titans"])
def test_chunk_parallel_float32_close_to_float64_oracle(self_modifying):
    shape = (2, 21, 32, 2, 8, 16, True, 0.9, True)
    layer64 = make_layer(shape, self_modifying)
    layer32 = copy.deepcopy(layer64).float()
    x = torch.randn(2, 21, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y_ref, _ = reference_forward(layer64, x)
    y32, _ = layer32(x.float())
    assert rel_err(y32.double(), y_ref) < 1e-3

    proj = torch.randn(y_ref.shape, dtype=torch.float64)
    g_ref = torch.autograd.grad((y_ref * proj).sum(), list(layer64.parameters()))
    g32 = torch.autograd.grad((y32 * proj.float()).sum(), list(layer32.parameters()))
    for (name, _), a, b in zip(layer64.named_parameters(), g32, g_ref):
        assert rel_err(a.double(), b) < 1e-3, name


def test_oracle_detects_a_wrong_fast_path(monkeypatch):
    """The comparison can fail: break the erase term in the fast path and the oracle disagrees."""
    import hope_scale.model.memory as memory
    shape = SHAPES[0]
    layer = make_layer(shape)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y_ref, _ = reference_forward(layer, x)
    real = memory.chunk_coefficients

    def no_erase(keys, eta, alpha, beta, erase, queries=None):
        return real(keys, eta, alpha, beta, False, queries)

    monkeypatch.setattr(layer, "coefficients", no_erase)  # the main memory's coefficients
    y_bad, _ = layer(x)
    assert rel_err(y_bad, y_ref) > 1e-4


def test_oracle_detects_a_non_causal_step_bound(monkeypatch):
    """A step bound computed from the whole chunk (the chunk's last row for every token) leaks later tokens
    into earlier reads: the oracle, whose bound at token t sees tokens <= t only, disagrees."""
    import hope_scale.model.memory as memory
    layer = make_layer(SHAPES[0], variant="bound-active")
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y_ref, _ = reference_forward(layer, x)
    assert rel_err(layer(x)[0], y_ref) < 1e-10
    real = memory.chunk_overshoot

    def whole_chunk(w1, keys, u, h, delta, dsilu, rows, norm=None):
        rho = real(w1, keys, u, h, delta, dsilu, rows, norm)
        return rho[..., -1:].expand_as(rho)

    monkeypatch.setattr(memory, "chunk_overshoot", whole_chunk)
    assert rel_err(layer(x)[0], y_ref) > 1e-4


@pytest.mark.parametrize("retain_toward", ["init", "zero", "init_projections"])
@pytest.mark.parametrize("self_modifying", [True, False])
def test_retention_decays_toward_its_target(retain_toward, self_modifying, monkeypatch):
    """With no writes (eta = 0) and alpha < 1, 64 tokens of retention take every memory from a state away from its
    meta-learned initial weights A to A + 0.9^64 (W - A) (``retain_toward: init``) or to 0.9^64 W (``zero``; and
    the main memory under ``init_projections``): the semantics the oracle and the chunk-parallel layer share."""
    shape = (2, 64, 16, 2, 16, 32, True, 0.0, True)
    layer = make_layer(shape, self_modifying, variant="default")
    layer.cfg.retain_toward = retain_toward
    monkeypatch.setattr(layer, "eta_alpha", lambda e, a: (torch.zeros_like(e), torch.full_like(a, 0.9)))
    state = perturbed_state(layer, 2, 0)
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    _, end = layer(x, state)
    decay = 0.9 ** 64
    pairs = [(state.mem, end.mem, (layer.mem_w1, layer.mem_w2), retain_toward == "init")]
    if self_modifying:
        pairs.append((state.proj, end.proj, (layer.proj_w1, layer.proj_w2), retain_toward != "zero"))
    for start, final, anchor, toward_init in pairs:
        for w0, w, a in ((start.w1, final.w1, anchor[0]), (start.w2, final.w2, anchor[1])):
            a = a.detach() if toward_init else torch.zeros_like(a)
            expected = a + decay * (w0.detach() - a)
            assert rel_err(w.detach(), expected) < 1e-10
