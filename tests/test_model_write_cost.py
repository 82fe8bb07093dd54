"""``model.write_cost``: the gradient the layers add where η is made equals the gradient of the explicit auxiliary
loss λ · mean(η_t / η_max) over layers, heads and tokens, alone and under ``TrainStep``'s micro-batches; the
forward is unchanged; training-only in configs, resumes and exports. (The parallel layouts are checked in
tests/test_parallel_equivalence.py against the same explicit loss.)"""

from __future__ import annotations

import pytest
import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.model.config import ConfigError
from hope_scale.model.titans import SelfModifyingTitans
from hope_scale.train.schedules import LRSchedule
from hope_scale.train.step import OptimizerSettings, TrainStep

LAM = 0.3  # large, so that the cost's share of the gradient is far above the tolerance


def small_cfg(arch: str, **kw) -> ModelConfig:
    d = dict(arch=arch, vocab_size=32, d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8,
             chunk_size_projection=16, max_seq_len=64, cms_levels=[{"period": 1, "hidden_mult": 1.0}])
    return ModelConfig(**{**d, **kw})


def record_etas(model) -> list:
    """Make every memory layer append η/η_max (with its graph) to the returned list when it computes η."""
    etas: list = []
    for m in model.modules():
        if isinstance(m, SelfModifyingTitans):
            def eta_alpha(eta_logit, alpha_logit, _orig=m.eta_alpha, _m=m):
                eta, alpha = _orig(eta_logit, alpha_logit)
                etas.append(eta / _m.cfg.eta_max)
                return eta, alpha
            m.eta_alpha = eta_alpha
    return etas


def explicit_cost(etas: list, lam: float) -> torch.Tensor:
    """lam * the mean of every recorded η/η_max: the cost as a differentiable loss term."""
    return lam * torch.cat([e.flatten() for e in etas]).mean()


def explicit_loss(model, etas: list, lam: float, ids, labels):
    """Cross-entropy + the cost of the forward's writes, as one differentiable loss."""
    etas.clear()
    ce = model.loss(ids, labels)
    return ce + explicit_cost(etas, lam)


def twin_models(arch: str, **kw):
    """(model with write_cost=LAM, the same weights with write_cost=0 and recorded etas), in float64."""
    torch.manual_seed(0)
    charged = build_model(small_cfg(arch, write_cost=LAM, **kw)).double()
    plain = build_model(small_cfg(arch, write_cost=0.0, **kw)).double()
    plain.load_state_dict(charged.state_dict())
    return charged, plain, record_etas(plain)


def batch(b: int = 2, t: int = 41, seed: int = 1):  # 41: a padded last chunk of both chunk sizes
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("arch", ["hope", "titans"])
def test_gradient_equals_the_explicit_cost(arch):
    charged, plain, etas = twin_models(arch)
    ids, labels = batch()
    charged.loss(ids, labels).backward()
    explicit_loss(plain, etas, LAM, ids, labels).backward()
    plain_ce = build_model(small_cfg(arch, write_cost=0.0)).double()
    plain_ce.load_state_dict(charged.state_dict())
    plain_ce.loss(ids, labels).backward()
    cost_share = 0.0
    for (name, p), q, r in zip(charged.named_parameters(), plain.parameters(), plain_ce.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-13), name
        cost_share = max(cost_share, (q.grad - r.grad).abs().max().item())
    assert cost_share > 1e-4  # the cost changes the gradient (far beyond the tolerance)


def test_forward_and_evaluation_unchanged():
    charged, plain, _ = twin_models("hope")
    ids, labels = batch()
    assert torch.equal(charged(ids), plain(ids))
    charged.eval()
    plain.eval()
    charged.loss(ids, labels).backward()  # evaluation mode: no cost (e.g. a gradient probe)
    plain.loss(ids, labels).backward()
    for p, q in zip(charged.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_train_step_scales_the_cost_like_the_loss():
    """Two micro-batches: the update of CE/2 + cost/2 per micro-batch, clipping off."""
    charged, plain, etas = twin_models("hope")
    micro = [batch(seed=1), batch(seed=2)]
    sched = LRSchedule("constant", 1e-2, 10, 0, 1.0)
    TrainStep(charged, OptimizerSettings(lr=1e-2), sched, grad_clip=0.0, cms_schedule=False).step(micro)
    reference = TrainStep(plain, OptimizerSettings(lr=1e-2), sched, grad_clip=0.0, cms_schedule=False)
    reference.optimizer.zero_grad()
    for ids, labels in micro:
        (explicit_loss(plain, etas, LAM, ids, labels) / len(micro)).backward()
    reference.optimizer.step()
    for (name, p), q in zip(charged.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12), name


def test_train_step_starts_the_cost_at_write_cost_from_step():
    """``write_cost_from_step=1``: step 0 is the step of the model without the cost (bitwise), step 1's gradient
    is the charged model's gradient at those weights (clipping off)."""
    charged, plain, _ = twin_models("hope")
    sched = LRSchedule("constant", 1e-2, 10, 0, 1.0)

    def train_step(model, start):
        return TrainStep(model, OptimizerSettings(lr=1e-2), sched, grad_clip=0.0, cms_schedule=False,
                         write_cost_from_step=start)

    delayed, uncharged = train_step(charged, 1), train_step(plain, 0)
    delayed.step([batch(seed=1)])
    uncharged.step([batch(seed=1)])
    for (name, p), q in zip(charged.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    expected = build_model(small_cfg("hope", write_cost=LAM)).double()
    expected.load_state_dict(charged.state_dict())
    expected.loss(*batch(seed=2)).backward()
    plain.zero_grad()
    plain.loss(*batch(seed=2)).backward()
    delayed.step([batch(seed=2)])
    cost_share = 0.0
    for (name, p), q, r in zip(charged.named_parameters(), expected.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-15), name
        cost_share = max(cost_share, (q.grad - r.grad).abs().max().item())
    assert cost_share > 1e-4


def test_train_step_ramps_the_cost():
    """``write_cost_ramp_steps=4``: step 0 charges a quarter of the cost, so its gradient is that of a model with
    write_cost λ/4 (the cost's gradient is linear in λ), and not that of the full cost."""
    charged, plain, _ = twin_models("hope")
    quarter = build_model(small_cfg("hope", write_cost=LAM / 4)).double()
    quarter.load_state_dict(plain.state_dict())
    sched = LRSchedule("constant", 1e-2, 10, 0, 1.0)
    TrainStep(charged, OptimizerSettings(lr=1e-2), sched, grad_clip=0.0, cms_schedule=False,
              write_cost_ramp_steps=4).step([batch(seed=1)])
    TrainStep(plain, OptimizerSettings(lr=1e-2), sched, grad_clip=0.0, cms_schedule=False).step([batch(seed=1)])
    quarter.loss(*batch(seed=1)).backward()
    for (name, p), q, r in zip(charged.named_parameters(), quarter.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-15), name
    assert max((p.grad - r.grad).abs().max().item() for p, r in zip(charged.parameters(), plain.parameters())) > 1e-5


def test_config_checks_and_training_only():
    from hope_scale.export.export import exported_model_config
    from hope_scale.model.config import DEFAULT_WRITE_COST
    from hope_scale.train.pretrain import model_differences

    # unset: on for the memory architectures, off for the attention ones; 0 turns it off
    assert {a: small_cfg(a).write_cost for a in ("hope", "titans", "hope_attention", "transformer")} == {
        "hope": DEFAULT_WRITE_COST, "titans": DEFAULT_WRITE_COST, "hope_attention": 0.0, "transformer": 0.0}
    assert DEFAULT_WRITE_COST > 0 and small_cfg("hope", write_cost=0).write_cost == 0
    assert ModelConfig.from_dict(small_cfg("titans").to_dict()).write_cost == DEFAULT_WRITE_COST

    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="model.write_cost"):
            small_cfg("hope", write_cost=bad)
    with pytest.raises(ConfigError, match="model.write_cost: .*'transformer'"):
        small_cfg("transformer", write_cost=0.1)
    cfg = small_cfg("hope", write_cost=0.05)
    assert model_differences(small_cfg("hope").to_dict(), cfg.to_dict()) == []  # resumes under a new value
    assert model_differences(small_cfg("hope", d_model=64, n_heads=2).to_dict(), cfg.to_dict()) == ["d_model"]
    assert exported_model_config(cfg)["write_cost"] == DEFAULT_WRITE_COST  # the architecture's default
    assert exported_model_config(small_cfg("transformer"))["write_cost"] == 0.0
