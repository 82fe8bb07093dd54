"""Continual-learning benchmark and test-time CMS learning (hope_scale.eval.continual)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hope_scale.data.tokenizer import load_tokenizer
from hope_scale.eval.continual import ContinualConfig, MLPStreamLearner, ModelEntry, run_continual, stream_learner
from hope_scale.eval.corpus import load_domain
from hope_scale.model import ModelConfig, build_model
from hope_scale.model.cms import cms_level_parameters
from hope_scale.model.layers import SwiGLU

TINY = dict(d_model=32, n_layers=2, n_heads=2, chunk_size_memory=8, chunk_size_projection=16)

PROSE = ("The old sailor walked along the harbor at dawn, counting the boats and humming a song about the sea. "
         "Children waved from the pier while gulls circled above the fishing nets. ") * 40
CODE = ("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    if i % 2 == 0:\n        print(add(i, 1))\n"
        "class Box:\n    def __init__(self, x):\n        self.x = x\n") * 40


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    d = tmp_path_factory.mktemp("domains")
    (d / "prose.txt").write_text(PROSE)
    (d / "code.py").write_text(CODE)
    tok = load_tokenizer("byte")
    return load_domain(str(d / "prose.txt"), tok, 0.2), load_domain(str(d / "code.py"), tok, 0.2)


def _hope(levels):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="hope_attention", cms_levels=levels, **TINY))


def test_pipeline_end_to_end_on_tiny_models(domains):
    a, b = domains
    levels = [{"period": 32, "hidden_mult": 1.0}, {"period": 128, "hidden_mult": 1.0}]
    torch.manual_seed(0)
    entries = [ModelEntry("hope-attention-2", _hope(levels)),
               ModelEntry("hope-2", build_model(ModelConfig(arch="hope", cms_levels=levels, **TINY))),
               ModelEntry("transformer", build_model(ModelConfig(arch="transformer", **TINY)))]
    cfg = ContinualConfig(mode="both", seq_len=32, batch_size=4, steps_a=20, steps_b=20, lr=1e-2, warmup_steps=3,
                          eval_tokens=330, eval_points=2, stream_tokens=256, stream_lr=0.05)
    res = run_continual(entries, a, b, cfg, log=None)
    assert res["baseline_period"] == 32  # the smallest trainable CMS period
    for row in res["models"]:
        for regime in ("train", "test_time"):
            r = row[regime]
            for key in ("loss_a", "loss_b"):
                assert math.isfinite(r["after_b"][key])
            assert r["forgetting"] == pytest.approx(r["after_b"]["loss_a"] - row["after_a"]["loss_a"])
            assert r["learning"] == pytest.approx(row["after_a"]["loss_b"] - r["after_b"]["loss_b"])
            assert len(r["curve"]) == 3
        # training on B must lower the loss on B (the model learns the new domain)
        assert row["train"]["learning"] > 0.05
        assert row["after_a"]["loss_a"] < math.log(258) - 0.5  # phase A learned something
    for row in res["models"][:2]:
        assert row["test_time"]["updates"] == {"0": 256 // 32, "1": 256 // 128}
        assert row["cms_levels"] == 2 and row["cms_periods"] == [32, 128]
    assert res["models"][2]["test_time"]["updates"] == {"0": 256 // 32}
    assert res["models"][2]["test_time"]["learner"] == "MLPStreamLearner"


def test_an_entry_can_train_longer_on_a(domains):
    """``ModelEntry.steps_a`` overrides the config's phase-A steps for that model only: the same model trained
    through an override and through the config ends in the same place; the other entry keeps the config's."""
    a, b = domains
    torch.manual_seed(3)
    model = build_model(ModelConfig(arch="transformer", **TINY))
    copies = [copy.deepcopy(model) for _ in range(3)]
    cfg = dict(mode="train", seq_len=32, batch_size=4, steps_b=2, lr=1e-2, warmup_steps=1, eval_tokens=330,
               eval_points=1)
    res = run_continual([ModelEntry("short", copies[0]), ModelEntry("long", copies[1], steps_a=6)], a, b,
                        ContinualConfig(steps_a=2, **cfg), log=None)
    direct = run_continual([ModelEntry("long", copies[2])], a, b, ContinualConfig(steps_a=6, **cfg), log=None)
    short, long = res["models"]
    assert (short["steps_a"], short["phase_a_train"]["steps"]) == (2, 2)
    assert (long["steps_a"], long["phase_a_train"]["steps"]) == (6, 6)
    assert long["after_a"] == direct["models"][0]["after_a"]
    assert long["after_a"]["loss_a"] != short["after_a"]["loss_a"]


def test_test_time_learning_changes_only_the_trainable_levels(domains):
    _, b = domains
    model = _hope([{"period": 16, "hidden_mult": 1.0}, {"period": 64, "hidden_mult": 1.0}])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = stream_learner(model, lr=0.1, trainable_levels=[1], baseline_period=16)
    learner.feed(torch.from_numpy(b.train[:129]).long()[None])
    assert learner.updates == {1: 2}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    level1 = {n for n, p in model.named_parameters()
              if any(p is q for q in cms_level_parameters(model)[1])}
    assert changed == level1 and changed


def test_mlp_stream_learner_applies_the_cms_rule_to_the_mlps(domains):
    _, b = domains
    torch.manual_seed(1)
    model = build_model(ModelConfig(arch="transformer", **TINY))
    ref = build_model(ModelConfig(arch="transformer", **TINY))
    ref.load_state_dict(model.state_dict())
    mlp = [p for m in ref.modules() if isinstance(m, SwiGLU) for p in m.parameters()]
    tokens = torch.from_numpy(b.train[:33]).long()[None]
    # by hand: two segments of 16 with the KV cache carried, gradients at the unchanged weights, mean, one step
    state, grads = ref.init_state(1), [torch.zeros_like(p) for p in mlp]
    for a in (0, 16):
        seg = tokens[:, a:a + 17]
        logits, state = ref(seg[:, :-1], state=state)
        loss = F.cross_entropy(logits[0], seg[0, 1:])
        for g, gi in zip(grads, torch.autograd.grad(loss, mlp)):
            g += gi
        state = [{k: v.detach() for k, v in s.items()} for s in state]
    learner = MLPStreamLearner(model, lr=0.5, period=32, segment_len=16)
    learner.feed(tokens)
    assert learner.updates == {0: 1}
    got = [p for m in model.modules() if isinstance(m, SwiGLU) for p in m.parameters()]
    for p_new, p_old, g in zip(got, mlp, grads):
        torch.testing.assert_close(p_new, p_old - 0.5 * g / 2, rtol=1e-4, atol=1e-6)
    others_same = [torch.equal(p, q) for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())
                   if "mlp" not in n]
    assert all(others_same)


def test_domains_need_enough_heldout_tokens(domains):
    a, b = domains
    with pytest.raises(ValueError, match="held-out"):
        run_continual([ModelEntry("t", build_model(ModelConfig(arch="transformer", **TINY)))], a, b,
                      ContinualConfig(mode="train", seq_len=10_000, steps_a=0, steps_b=1), log=None)
    assert np.all(a.heldout < 256)


def test_clipped_stream_learner_bounds_each_segment_update(domains):
    from hope_scale.eval.continual import ClippedStreamLearner

    _, b = domains
    model = _hope([{"period": 16, "hidden_mult": 1.0}])
    params = cms_level_parameters(model)[0]
    before = [p.detach().clone() for p in params]
    learner = ClippedStreamLearner(model, lr=2.0, segment_len=16, max_grad_norm=1e-3)
    learner.feed(torch.from_numpy(b.train[:17]).long()[None])
    step = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(params, before)))
    assert learner.updates == {0: 1} and learner.clipped_segments == 1
    assert step.item() == pytest.approx(2.0 * 1e-3, rel=1e-3)
