"""The FLOPs-per-token formula of hope_scale.train.flops against PyTorch's FLOP counter on real passes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hope_scale.model import ModelConfig, build_model
from hope_scale.train.flops import (attention_forward_flops_per_token, dense_matmul_params, flops_per_token, mfu,
                                    peak_flops)


def _cfg(arch, **kw):
    base = dict(arch=arch, vocab_size=64, d_model=48, n_layers=2, n_heads=2, mem_hidden_mult=1.5,
                chunk_size_memory=8, chunk_size_projection=16, max_seq_len=1024)
    base.update(kw)
    return ModelConfig.from_dict(base)


def _counted(cfg, seq_len, batch=1, backward=False):
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as fwd:
        loss = model.loss(x, x)
    counts = {str(k): v for k, v in fwd.get_flop_counts()["Global"].items()}
    total = sum(counts.values())
    if backward:
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        bcounts = {str(k): v for k, v in bwd.get_flop_counts()["Global"].items()}
        # the counter's convolution_backward ignores groups (depthwise conv): count it as 2x its forward
        bcounts.pop("aten.convolution_backward", None)
        total += sum(bcounts.values()) + 2 * counts.get("aten.convolution", 0)
    return total / (batch * seq_len)


@pytest.mark.parametrize("arch,kw", [("hope", {}), ("hope", {"adaptive_q": False}), ("hope", {"dgd_erase": False}),
                                     ("hope", {"inner_momentum": 0.9}), ("titans", {"inner_momentum": 0.9}),
                                     ("hope", {"retain_toward": "init_projections"}), ("hope", {"retain_toward": "zero"}),
                                     ("hope", {"proj_hidden_mult": 0.5}),
                                     ("titans", {}), ("transformer", {}), ("hope_attention", {})])
def test_forward_flops_match_counter(arch, kw):
    cfg = _cfg(arch, **kw)
    seq = 48  # not a multiple of the projection chunk: a partial last chunk
    f = flops_per_token(cfg, seq)
    counted = _counted(cfg, seq, batch=2)
    if arch in ("hope", "titans"):
        # the counter sees every matmul but the C x C triangular inverse (< 1% here)
        assert counted <= f.forward
        assert counted == pytest.approx(f.forward, rel=0.01)
    else:
        # CPU scaled_dot_product_attention is invisible to the counter: compare the dense part exactly
        assert f.memory == 0
        assert counted in (pytest.approx(f.dense / 3), pytest.approx((f.dense + f.attention) / 3))


def test_training_flops_are_three_forwards_at_long_sequences():
    cfg = _cfg("hope", n_layers=1, d_model=32, chunk_size_memory=4, chunk_size_projection=8)
    f = flops_per_token(cfg, 128)
    counted = _counted(cfg, 128, backward=True)
    # training = 3 x forward is the convention MFU uses; Hope's backward costs less than 2 x its forward: the
    # inner step's dependence on the fast weights is a constant of the outer gradient (first_order), and the first
    # chunk's momentum is a constant zero
    assert 0.8 * f.total <= counted <= 1.02 * f.total


def test_dense_params_and_attention_term():
    cfg = _cfg("transformer")
    model = build_model(cfg)
    n_all = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    # tied embedding: counted once, as the LM head
    assert dense_matmul_params(cfg) == n_all - norms
    assert attention_forward_flops_per_token(cfg, 100) == 4 * 2 * 2 * 24 * 100
    hope = _cfg("hope")
    n_state = sum(p.numel() for n, p in build_model(hope).named_parameters() if n.split(".")[-1] in
                  ("mem_w1", "mem_w2", "proj_w1", "proj_w2"))
    assert n_state > 0 and dense_matmul_params(hope) < sum(p.numel() for p in build_model(hope).parameters()) - n_state


def test_peak_flops_and_mfu():
    assert peak_flops("h100-sxm", "bf16") == 989e12
    assert peak_flops("cpu", "fp32", override=1e9) == 1e9
    # no declared peak for a CPU or an unknown device: no MFU (a measured CPU peak gave MFUs above 100%)
    assert peak_flops("cpu", "fp32") is None and peak_flops("tpu-v9", "bf16") is None
    if not torch.cuda.is_available():
        assert peak_flops("auto", "fp32") is None
    assert mfu(6e9, 1000.0, 1e13, 2) == pytest.approx(0.3)
