"""The memory layers' work is linear in the sequence length: bytes allocated per token by a training step do not
grow with the number of chunks (a per-chunk index or slice of a whole-sequence tensor would: its backward fills a
zero gradient of the whole tensor for every chunk, O(N^2) in the chunks; docs/training.md section 7)."""

import pytest
import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.train.memory_meter import AllocationMeter


def allocated_bytes_per_token(arch: str, seq_len: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, d_model=64, n_layers=1, n_heads=2, vocab_size=64,
                                    max_seq_len=seq_len))
    ids = torch.randint(0, 64, (1, seq_len + 1))
    with AllocationMeter() as meter:
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
    return meter.allocated_bytes / seq_len


@pytest.mark.parametrize("arch", ["hope", "titans"])
def test_training_step_allocates_linearly_in_length(arch):
    short, long = allocated_bytes_per_token(arch, 512), allocated_bytes_per_token(arch, 2048)
    # 32 vs 128 main-memory chunks (8 vs 32 projection chunks); the quadratic backward gave 1.56x (Hope) and
    # 1.78x (Titans) here
    assert long < 1.1 * short, (short, long)
