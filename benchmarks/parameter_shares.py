"""Where each model's parameters go: the shipped model configs beside quality.py's 130K benchmark models.

    python benchmarks/parameter_shares.py                          # every configs/model/*.yaml, then quality.py's
    python benchmarks/parameter_shares.py --models hope-760m titans-760m

Each parameter is counted in one component (the fraction of the model's total is printed):

- projections: what produces a memory's keys, values, queries and its eta / alpha -- Hope's projection memories
  (their meta-learned initial weights and per-memory input maps), Titans' static maps, attention's q, k, v;
- main memory: the meta-learned initial weights of the main memory MLP;
- mixer in/out: the sequence mixer's other maps (input, gate, output, short convolution, norms and biases);
- feed-forward: the CMS levels (Hope, Hope-Attention) or the SwiGLU MLP (Titans, Transformer++);
- embedding and norms: the (tied) embedding and the block and final norms.

Models are built on the meta device, so even hope-1.3b takes no memory. Used for docs/evaluation.md, "(a) at 4x
the steps": the 2-head d_model 64 benchmark gives Hope's projection memories a far larger share than any shipped
size does.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from hope_scale.model import ModelConfig, build_model
from hope_scale.resources import config_dir

COMPONENTS = {  # component -> pattern on the parameter name (with block and level indices removed)
    "projections": r"mixer\.(proj_w[12]|w_inputs|w_q|w_kvq|w_eta_alpha|w[qkv]\.weight)$",
    "main memory": r"mixer\.mem_w[12]$",
    "mixer in/out": r"mixer\.(w_in|w_gate|w_out|wo|conv)\.weight$|mixer\.(out_norm_weight|eta_bias|alpha_bias)$",
    "feed-forward": r"(^|\.)(cms|mlp)\.",
    "embedding and norms": r"^embed\.weight$|(^|\.)(norm|mixer_norm|mlp_norm)\.weight$",
}


def component(name: str) -> str:
    """The component of the parameter ``name`` (e.g. ``blocks.0.mixer.proj_w1`` -> projections)."""
    plain = re.sub(r"\.\d+(?=\.)", "", name)
    for comp, pattern in COMPONENTS.items():
        if re.search(pattern, plain):
            return comp
    raise ValueError(f"parameter {name!r} is in no component of {list(COMPONENTS)}")


def shares(model: torch.nn.Module) -> tuple[int, dict[str, float]]:
    """(total parameters, fraction of them in each component)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[component(name)] += p.numel()
    total = sum(counts.values())
    return total, {c: n / total for c, n in counts.items()}


def shipped_models() -> dict[str, ModelConfig]:
    """configs/model/*.yaml by family, smallest first (hope-tiny, hope-125m, ..., hope-1.3b)."""
    def order(name: str) -> tuple[str, float]:
        family, size = name.rsplit("-", 1)
        return family, 0.0 if size == "tiny" else float(size[:-1]) * {"m": 1e6, "b": 1e9}[size[-1]]

    names = sorted((p.stem for p in config_dir("model").glob("*.yaml")), key=order)
    return {name: ModelConfig.named(name) for name in names}


def quality_models() -> dict[str, ModelConfig]:
    """quality.py's architectures (ARCHS and DIAGNOSTIC_ARCHS) as ``quality: <name>``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality

    return {f"quality: {name}": quality.model_config(**spec)
            for name, spec in (quality.ARCHS | quality.DIAGNOSTIC_ARCHS).items()}


def table(configs: dict[str, ModelConfig]) -> str:
    lines = ["| model | parameters | " + " | ".join(COMPONENTS) + " |", "|---" * (len(COMPONENTS) + 2) + "|"]
    for name, cfg in configs.items():
        with torch.device("meta"):
            total, frac = shares(build_model(cfg))
        lines.append(f"| {name} | {total:,} | " + " | ".join(f"{frac[c]:.2f}" for c in COMPONENTS) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help="named model configs (configs/model/<name>.yaml; default: all of them, then quality.py's)")
    args = ap.parse_args()
    configs = ({n: ModelConfig.named(n) for n in args.models} if args.models
               else shipped_models() | quality_models())
    print(table(configs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
