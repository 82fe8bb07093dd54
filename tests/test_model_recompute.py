"""Activation checkpointing (hope_scale/parallel/recompute.py) on a plain model: the same gradients, less memory.

Engine layouts (TP, PP with DeepSpeed's pipeline checkpointing, ZeRO) with checkpointing are checked against the
plain-PyTorch reference in tests/test_parallel_equivalence.py.
"""

import pytest
import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.parallel.recompute import apply_activation_checkpointing, checkpointed_modules
from hope_scale.train.memory_meter import AllocationMeter

ARCHS = ("hope", "hope_attention", "titans", "transformer")


def model_and_batch(arch: str, mode: str):
    cfg = ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=4, n_heads=2, chunk_size_memory=8,
                      chunk_size_projection=16, max_seq_len=128, inner_momentum=0.5,
                      cms_levels=[{"period": 1, "hidden_mult": 2.0}])
    torch.manual_seed(0)
    model = apply_activation_checkpointing(build_model(cfg).double(), mode)
    ids = torch.randint(0, 64, (2, 61), generator=torch.Generator().manual_seed(1))  # partial last chunks
    return model, ids


def grads_and_peak(arch: str, mode: str):
    model, ids = model_and_batch(arch, mode)
    with AllocationMeter() as meter:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    return {n: p.grad for n, p in model.named_parameters()}, meter.peak_bytes


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients_and_lowers_peak_memory(arch):
    ref, peak = grads_and_peak(arch, "none")
    for mode in ("block", "memory"):
        grads, mode_peak = grads_and_peak(arch, mode)
        assert grads.keys() == ref.keys()
        for name in ref:
            err = ((grads[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-300)).item()
            assert err < 1e-10, (mode, name, err)
        print(f"{arch} {mode}: peak {mode_peak / 2**20:.2f} MiB vs {peak / 2**20:.2f} MiB without")
        assert mode_peak < 0.8 * peak, (mode, mode_peak, peak)


def test_modes_pick_blocks_or_mixers_and_keep_parameter_names():
    model, _ = model_and_batch("hope", "none")
    names = [n for n, _ in model.named_parameters()]
    assert checkpointed_modules(model, "none") == []
    assert checkpointed_modules(model, "block") == list(model.blocks)
    assert checkpointed_modules(model, "memory") == [b.mixer for b in model.blocks]
    assert [n for n, _ in apply_activation_checkpointing(model, "block").named_parameters()] == names
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        checkpointed_modules(model, "layer")


def test_meter_counts_what_is_allocated_inside_and_freed():
    x = torch.randn(100, 100, requires_grad=True)
    with AllocationMeter() as meter:
        y = (x @ x).relu().sum()  # two 100 x 100 float32 results alive at once, then the gradient
        y.backward()
        with torch.no_grad():
            x.grad.add_(1.0)  # in place: no new memory
    assert meter.peak_bytes >= 2 * 40_000
    assert meter.live_bytes == 40_000 + 4  # x.grad and y
