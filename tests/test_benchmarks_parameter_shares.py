"""benchmarks/parameter_shares.py: every parameter of every architecture is counted in exactly one component."""

import pytest
import torch

from hope_scale.model import ModelConfig, build_model
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def shares_module():
    return load_benchmark("parameter_shares")


@pytest.mark.parametrize("arch", ["hope", "titans", "hope_attention", "transformer"])
def test_components_cover_every_parameter(shares_module, arch):
    with torch.device("meta"):
        model = build_model(ModelConfig(arch=arch, d_model=64, n_layers=2, n_heads=2))
    total, frac = shares_module.shares(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert sum(frac.values()) == pytest.approx(1.0)
    feed_forward = sum(p.numel() for n, p in model.named_parameters() if ".cms." in n or ".mlp." in n)
    assert frac["feed-forward"] == pytest.approx(feed_forward / total)


def test_component_names(shares_module):
    c = shares_module.component
    assert c("blocks.3.mixer.proj_w1") == c("blocks.0.mixer.w_kvq") == c("blocks.1.mixer.wq.weight") == "projections"
    assert c("blocks.0.mixer.mem_w2") == "main memory"
    assert c("blocks.0.cms.levels.2.mlp.w_up.weight") == c("blocks.0.cms.levels.0.norm.weight") == "feed-forward"
    assert c("embed.weight") == c("blocks.0.mixer_norm.weight") == "embedding and norms"
    with pytest.raises(ValueError, match="no component"):
        c("blocks.0.mixer.new_thing")


def test_shipped_models_in_size_order(shares_module):
    names = [n for n in shares_module.shipped_models() if n.startswith("hope-") and not n.startswith("hope-att")]
    assert names == ["hope-tiny", "hope-125m", "hope-340m", "hope-760m", "hope-1.3b"]
