"""Language-model level properties: recurrent inference, batch isolation, configs, CMS schedules."""

import re

import pytest
import torch

from hope_scale.model import CMSLevel, ConfigError, LanguageModel, ModelConfig, build_model
from hope_scale.model.cms import CMSGradientSchedule, CMSStreamLearner, cms_level_parameters
from hope_scale.resources import config_dir
from hope_scale.model.lm import sample_next

ARCHS = ["hope", "hope_attention", "titans", "transformer"]


def tiny(arch: str, **kw) -> LanguageModel:
    torch.manual_seed(0)
    cfg = dict(arch=arch, vocab_size=50, d_model=32, n_layers=2, n_heads=2, chunk_size_memory=4,
               chunk_size_projection=8, cms_levels=[CMSLevel(1, 1.0), CMSLevel(64, 1.0)])
    cfg.update(kw)
    return LanguageModel(ModelConfig(**cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_recurrent_step_matches_parallel_forward(arch):
    model = tiny(arch).double()
    ids = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    state, steps = model.init_state(2), []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, rtol=1e-9, atol=1e-9)
    # in pieces that do not align with the chunks
    state = model.init_state(2)
    a, state = model(ids[:, :7], state=state)
    b, state = model(ids[:, 7:], state=state)
    assert torch.allclose(torch.cat([a, b], 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_do_not_depend_on_later_tokens(arch):
    """Causality, with the inner step bound active in most chunks (its scale at token t must use tokens <= t)."""
    model = tiny(arch, inner_step_bound=0.05).double()
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(5))
    other = ids.clone()
    other[:, 23:] = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(6))
    a, b = model(ids), model(other)
    assert torch.equal(a[:, :23], b[:, :23])
    assert not torch.allclose(a[:, 23:], b[:, 23:])


@pytest.mark.parametrize("arch", ["hope", "titans"])
def test_recurrent_state_size_is_constant_in_context_length(arch):
    model = tiny(arch)
    state = model.init_state(1)
    sizes = []
    for t in range(40):
        _, state = model.step(torch.tensor([t % 50]), state)
        sizes.append(sum(x.numel() for s in state for x in _tensors(s)))
    assert len(set(sizes[1:])) == 1


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif hasattr(obj, "__dataclass_fields__"):
        for f in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, f))


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_k_equals_k_runs_of_batch_one(arch):
    """Sequences do not interact: the batch's outputs and summed-loss gradients are the single runs'. (Without
    model.write_cost, a mean over the batch's writes, which a sum of per-sequence losses does not have.)"""
    model = tiny(arch, write_cost=0.0).double()
    ids = torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())

    logits = model(ids)
    g_batch = torch.autograd.grad(logits.pow(2).sum(), params)
    g_sum = [torch.zeros_like(p) for p in params]
    for i in range(3):
        li = model(ids[i:i + 1])
        assert torch.allclose(li, logits[i:i + 1], rtol=1e-12, atol=1e-12)
        for acc, g in zip(g_sum, torch.autograd.grad(li.pow(2).sum(), params)):
            acc += g
    for a, b in zip(g_batch, g_sum):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_named_sizes_match_their_names():
    torch.set_default_device("meta")
    try:
        for path in sorted(config_dir("model").glob("*.yaml")):
            m = re.search(r"-(\d+(?:\.\d+)?)([mb])$", path.stem)
            if m is None:
                continue
            target = float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)
            n = LanguageModel(ModelConfig.named(path.stem)).num_parameters()
            assert abs(n - target) / target < 0.10, f"{path.stem}: {n / 1e6:.1f}M parameters"
        tiny_n = LanguageModel(ModelConfig.named("hope-tiny")).num_parameters()
        assert 1e6 < tiny_n < 10e6
    finally:
        torch.set_default_device("cpu")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown key.*'d_modle'"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ConfigError, match="model.n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match=r"cms_levels\[1\].period"):
        ModelConfig(cms_levels=[{"period": 1}, {"period": 0}])
    with pytest.raises(ConfigError, match="model.arch"):
        ModelConfig(arch="mamba")
    with pytest.raises(ConfigError, match="no named config"):
        ModelConfig.named("hope-7t")


@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_cms_variants_train(variant):
    model = tiny("hope", cms_variant=variant)
    ids = torch.randint(0, 50, (2, 17))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in cms_level_parameters(model)[1])


def test_cms_gradient_schedule_steps_each_level_at_its_period():
    model = tiny("hope", cms_levels=[CMSLevel(1, 1.0), CMSLevel(96, 1.0)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = CMSGradientSchedule(model)
    slow = cms_level_parameters(model)[1]
    fast = cms_level_parameters(model)[0]
    batches = [torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    tokens_per_step = 2 * 16
    slow_grads = []
    for step, ids in enumerate(batches, start=1):
        before_slow = [p.detach().clone() for p in slow]
        before_fast = [p.detach().clone() for p in fast]
        opt.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        slow_grads.append([p.grad.clone() for p in slow])
        stepped = sched.apply(tokens_per_step)
        if step == 3:  # 3 * 32 = 96 tokens: the slow level gets the mean of its 3 accumulated gradients
            for p, *gs in zip(slow, *slow_grads):
                assert torch.allclose(p.grad, sum(gs) / 3, atol=1e-7)
        opt.step()
        assert stepped == {0: True, 1: step == 3}
        assert all(not torch.equal(a, p) for a, p in zip(before_fast, fast))
        changed = [not torch.equal(a, p) for a, p in zip(before_slow, slow)]
        assert all(changed) if step == 3 else not any(changed)
    # resumable
    other = CMSGradientSchedule(model)
    other.load_state_dict(sched.state_dict())
    assert other.tokens_since == sched.tokens_since


def test_cms_stream_learner_updates_only_chosen_levels_at_their_periods(shakespeare):
    text = shakespeare.encode("utf-8")[:4000]
    ids = torch.tensor(list(text), dtype=torch.long)[None] % 50
    model = tiny("hope", cms_levels=[CMSLevel(16, 1.0), CMSLevel(64, 1.0), CMSLevel(32, 1.0)])
    levels = cms_level_parameters(model)
    frozen = [p.detach().clone() for p in levels[2]]
    learner = CMSStreamLearner(model, lr=0.05, trainable_levels=[0, 1])
    assert learner.segment_len == 16
    first = learner.feed(ids[:, :129])  # 128 predicted tokens: 8 updates of level 0, 2 of level 1
    assert learner.updates == {0: 8, 1: 2}
    assert all(torch.equal(a, p) for a, p in zip(frozen, levels[2]))
    for _ in range(6):
        learner.feed(ids[:, :129])
        learner.reset_memory()
    assert learner.feed(ids[:, :129]) < first  # it learned the repeated stream
    with pytest.raises(ValueError, match="period 32 is not a multiple"):
        CMSStreamLearner(model, trainable_levels=[2], segment_len=24)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, top_p=None, generator=g).tolist()) <= {3, 4}
    assert set(sample_next(logits, 1.0, top_k=None, top_p=0.5, generator=g).tolist()) == {4}
    assert sample_next(logits, 0.0, None, None).eq(4).all()
    model = tiny("hope")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
    again = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
    assert out.shape == (1, 8) and torch.equal(out, again)


def test_hope_trains_in_bfloat16():
    model = tiny("hope").to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 21))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
