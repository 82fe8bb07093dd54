"""Trainability of Hope at length: bounded inner steps keep the outer gradient flat in the sequence length.

The earlier update (``EARLIER_UPDATE``: unbounded, normalized branch, second-order outer gradient) grew the
gradient norm of a fresh hope-tiny from ~50 at 128 tokens to ~1e19 at 1024 (docs/hope-design.md §6); these
tests fail on that code.
"""

import math

import pytest
import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.model.config import EARLIER_UPDATE


def grad_norm(model, ids: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def byte_text(n: int) -> torch.Tensor:
    """Real text (this repository's own source) as bytes, so the test needs nothing outside the repo."""
    from pathlib import Path

    src = b"".join(p.read_bytes() for p in sorted(Path(__file__).resolve().parents[1].glob("hope_scale/**/*.py")))
    return torch.tensor(list(src[:n]), dtype=torch.long)[None]


@pytest.mark.parametrize("name", ["hope-tiny", "titans-tiny"])
def test_fresh_gradient_norm_is_flat_in_length(name):
    torch.manual_seed(0)
    model = build_model(name)
    ids = byte_text(1025)
    short, long = grad_norm(model, ids[:, :129]), grad_norm(model, ids)
    assert math.isfinite(long) and long < 10 * short, (short, long)


def test_unbounded_legacy_update_explodes():
    """The test above can fail: the earlier unbounded update does not pass it."""
    cfg = ModelConfig.named("hope-tiny").to_dict() | EARLIER_UPDATE
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(cfg))
    ids = byte_text(1025)
    short, long = grad_norm(model, ids[:, :129]), grad_norm(model, ids[:, :513])
    assert not long < 10 * short, (short, long)
