"""``model.compile: true`` (hope_scale/model/accel.py): the compiled model computes what the eager one computes.

Whole models are compiled with the ``aot_eager`` backend: Dynamo captures the same graphs and AOTAutograd derives
the same backward as with Inductor, without generating and building C++ (several minutes per model on 2 cores).
The Inductor backend itself is checked on the chunk step alone (one graph, forward and backward), which is where
the memory layer's time goes.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hope_scale.model import ConfigError, ModelConfig, build_model
from hope_scale.model import accel
from hope_scale.model.memory import MemoryState, UpdateRule, chunk_step
from hope_scale.model.titans import SelfModifyingTitans
from hope_scale.parallel.recompute import apply_activation_checkpointing

ARCHS = ("hope", "titans", "hope_attention", "transformer")


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(accel, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def config(arch: str, compile: bool) -> ModelConfig:
    return ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8,
                       chunk_size_projection=16, max_seq_len=128, inner_momentum=0.5, compile=compile,
                       cms_levels=[{"period": 1, "hidden_mult": 2.0}])


def loss_and_grads(arch: str, compile: bool, checkpointing: str = "none"):
    torch.manual_seed(0)
    model = apply_activation_checkpointing(build_model(config(arch, compile)).double(), checkpointing)
    ids = torch.randint(0, 64, (2, 46), generator=torch.Generator().manual_seed(1))  # a partial last chunk
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_close(loss, grads, ref_loss, ref_grads, tol=1e-10):
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        err = ((grads[name] - g).norm() / g.norm().clamp_min(1e-300)).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_model_equals_eager_float64(arch, aot_eager):
    _, ref_loss, ref_grads = loss_and_grads(arch, False)
    model, loss, grads = loss_and_grads(arch, True)
    assert_close(loss, grads, ref_loss, ref_grads)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled
    assert not counters["graph_break"], dict(counters["graph_break"])  # and nowhere did Dynamo fall back to eager
    layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
    assert all(m.chunk_step is accel.compiled_chunk_step("aot_eager") for m in layers)
    assert [n for n, _ in model.named_parameters()] == list(ref_grads)  # names (checkpoints) unchanged


def test_compiled_model_runs_at_many_shapes(aot_eager):
    """A process that trains at several batch sizes and lengths compiles a bounded set of chunk-step graphs: new
    lengths (other remainders of the last, padded chunk) add none once shapes are dynamic, and Dynamo's recompile
    limit (an error under fullgraph) is not hit."""
    counters = torch._dynamo.utils.counters
    model = build_model(config("hope", True))

    def train(batch, length):
        ids = torch.randint(0, 64, (batch, length + 1), generator=torch.Generator().manual_seed(length))
        model.loss(ids[:, :-1], ids[:, 1:]).backward()

    for batch, length in ((1, 32), (2, 33), (1, 45)):  # static, then dynamic shapes
        train(batch, length)
    graphs = counters["stats"]["unique_graphs"]
    for length in (34, 36, 39):  # remainders 2, 4, 7 of the 8-token main-memory chunk, not seen above
        train(2, length)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_recurrent_pieces_equal_eager(aot_eager):
    """Sequences processed in pieces that start and end mid-chunk (head chunks, pending tokens in the state)."""
    torch.manual_seed(0)
    eager = build_model(config("hope", False)).double()
    compiled = build_model(config("hope", True)).double()
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (eager, compiled):
        state, logits = model.init_state(2), []
        for a, b in ((0, 13), (13, 40)):  # mid-chunk start and end for both memories
            out, state = model(ids[:, a:b], state=state)
            logits.append(out)
        outs.append(torch.cat(logits, dim=1))
    assert ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item() < 1e-10


@pytest.mark.parametrize("mode", ["block", "memory"])
def test_compile_with_activation_checkpointing(mode, aot_eager):
    _, ref_loss, ref_grads = loss_and_grads("hope", False)
    _, loss, grads = loss_and_grads("hope", True, checkpointing=mode)
    assert_close(loss, grads, ref_loss, ref_grads)


def test_compile_is_a_boolean_and_an_execution_field():
    with pytest.raises(ConfigError, match="compile"):
        ModelConfig(compile="yes")
    from hope_scale.export.export import exported_model_config
    from hope_scale.model.config import EXECUTION_FIELDS

    assert EXECUTION_FIELDS == ("compile", "kernel")
    assert exported_model_config(config("hope", True))["compile"] is False  # exported models run eager


@pytest.mark.slow
def test_inductor_chunk_step_equals_eager_float64():
    """The chunk step built by Inductor (C++ on CPU; about 1-2 minutes to build on 2 cores): the update, the reads
    and the gradients of a partial chunk with erase, momentum and an active step bound, against eager."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    b, h, c, d = 2, 2, 8, 8
    w1, w2 = rand(b, h, d, d).requires_grad_(), rand(b, h, d, d).requires_grad_()
    state = MemoryState(w1, w2, rand(b, h, d, d, scale=0.1), rand(b, h, d, d, scale=0.1), None, None, None, None)
    keys = F.normalize(rand(b, h, c, d), dim=-1).requires_grad_()
    targets, queries = rand(b, h, c, d).requires_grad_(), F.normalize(rand(b, h, c, d), dim=-1)
    eta = 0.9 * torch.rand(b, h, c, generator=g, dtype=torch.float64)
    alpha = 0.9 + 0.1 * torch.rand(b, h, c, generator=g, dtype=torch.float64)
    rule = dataclasses.replace(UpdateRule(), step_bound=0.5)

    def run(step):
        r = step(state, keys, targets, eta, alpha, 0.5, True, rule, queries=queries, n_valid=6)
        loss = r.reads.pow(2).sum() + r.w1.pow(2).sum() + r.w2.sum() + r.s2.sum()
        return [r.reads.detach(), r.w1.detach(), *torch.autograd.grad(loss, [w1, w2, keys, targets])], r.scale

    torch._dynamo.reset()
    ref, ref_scale = run(chunk_step)
    assert (ref_scale < 1).any()  # the bound is active somewhere
    out, _ = run(torch.compile(chunk_step, fullgraph=True, backend="inductor"))
    for a, b_ in zip(out, ref):
        assert ((a - b_).norm() / b_.norm()).item() < 1e-10


def test_resume_ignores_execution_fields_only():
    from hope_scale.train.pretrain import model_differences

    saved = config("hope", False).to_dict()
    assert model_differences(saved, config("hope", True).to_dict()) == []
    old = {k: v for k, v in saved.items() if k != "compile"}  # a checkpoint from before the field existed
    assert model_differences(old, config("hope", True).to_dict()) == []
    assert model_differences(saved, config("titans", True).to_dict()) == ["arch"]
