"""Model configuration: one dataclass shared by Hope and every baseline.

A config is loaded from YAML (``configs/model/*.yaml``) and validated before any work starts:
unknown keys and impossible shapes are rejected with the offending field named.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("hope", "hope_attention", "titans", "transformer")
MEMORY_ARCHITECTURES = ("hope", "titans")  # the architectures with an in-context memory layer (titans.py)
# model.write_cost of the memory architectures unless set: docs/hope-design.md §6.7 (passkey >= 90% at 1x/4x/16x on
# 8 of 8 seeds with it, 3 of 8 without; held-out loss within the seeds' spread; MQAR is learned on fewer seeds)
DEFAULT_WRITE_COST = 0.005
# fields that choose how the model is executed, not what it computes (outputs equal the eager path's): a
# checkpoint resumes, and a model exports, under any value of them
EXECUTION_FIELDS = ("compile", "kernel")
# fields that shape only the training loss, not what the model computes: a checkpoint resumes under any value of
# them, and an exported model carries their defaults
TRAINING_FIELDS = ("write_cost",)
# fields that are not part of the model: a checkpoint resumes under any value of them, an export carries defaults
NON_MODEL_FIELDS = EXECUTION_FIELDS + TRAINING_FIELDS
KERNELS = ("naive", "triton")
CMS_VARIANTS = ("sequential", "independent")
OVERSHOOTS = ("rayleigh", "aligned")
RETENTION_TARGETS = ("init", "zero", "init_projections")


# The inner update of hope-scale before the stabilization of issue 8 (docs/hope-design.md §6), for ablations:
# ``ModelConfig(**(cfg | EARLIER_UPDATE))`` or ``hope:...`` model specs with these overrides.
EARLIER_UPDATE = dict(mem_branch_norm=True, normalize_values=False, per_memory_inputs=False, normalized_eta=False,
                      inner_step_bound=0.0, first_order=False, inner_momentum=0.9, eta_init=0.1,
                      retain_toward="zero")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or inconsistent; the message names the field."""


@dataclass
class CMSLevel:
    """One Continuum Memory System level: a pre-norm residual SwiGLU MLP updated every ``period`` tokens."""

    period: int = 1  # update period in tokens (paper: chunk size C^(l)); 1 = every token seen by the optimizer
    hidden_mult: float = 2.0  # MLP hidden width = hidden_mult * d_model (rounded to a multiple of 8)


@dataclass
class ModelConfig:
    arch: str = "hope"
    vocab_size: int = 258
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None  # default d_model // n_heads
    max_seq_len: int = 2048  # only bounds RoPE tables and the recurrent position counter
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True

    # --- (self-modifying) Titans memory -------------------------------------------------------
    mem_hidden_mult: float = 1.0  # each memory MLP m(x) = x + W1 silu(W2 x) has hidden = mult * head_dim ...
    proj_hidden_mult: float | None = None  # ... but the projection memories' is this mult's when set
    chunk_size_memory: int = 16  # C_mem: chunk of the main memory M_mem
    chunk_size_projection: int = 64  # C_proj: chunk of the projection memories M_k, M_v, M_q, M_eta, M_alpha
    adaptive_q: bool = True  # False: q is a static per-head projection (paper text); True: q = M_q(x) (ablation table)
    inner_momentum: float = 0.0  # beta of the momentum S_t = beta S_{t-1} - eta_t grad; 0 disables momentum
    dgd_erase: bool = True  # delta gradient descent erase term -eta k k^T on the layer whose input is k
    # the inner update rule (memory.py UpdateRule; docs/hope-design.md §6 has the measurements behind each default)
    per_memory_inputs: bool = True  # each projection memory reads its own per-head linear map of the input
    normalize_values: bool = True  # v = normalize(M_v(x)) like k and q (keeps self-generated targets on k's scale)
    normalized_eta: bool = True  # eta_t is the fraction of token t's Gauss-Newton step taken (rate eta_t / kappa_t)
    inner_step_bound: float = 1.0  # tau of the chunk step bound s = min(1, tau / overshoot); 0 disables it
    inner_overshoot: str = "rayleigh"  # "rayleigh" (the accumulated step's own) or "aligned" (all tokens aligned)
    first_order: bool = True  # the outer gradient treats the inner step's dependence on the fast weights as constant
    mem_branch_norm: bool = False  # True: m(x) = x + n(W1 silu(W2 x)) (earlier form); False: paper Eq. 89
    eta_max: float = 1.0  # eta_t = eta_max * sigmoid(mean(M_eta(x)) + b_eta)
    eta_init: float = 0.3  # initial eta (sets b_eta)
    alpha_init: float = 0.999  # initial retention alpha (sets b_alpha); alpha_t = sigmoid(mean(M_alpha(x)) + b_alpha)
    # what retention decays the fast weights toward: "init", the meta-learned initial weights W_0
    # (W <- W_0 + alpha (W - W_0): forgets what the context wrote, never what was meta-learned), or "zero" (the
    # paper's W <- alpha W), or "init_projections" (the projection memories toward W_0, the main memory toward
    # zero); docs/hope-design.md §6.6
    retain_toward: str = "init"
    conv_width: int = 4  # causal depthwise short convolution before the memories
    # training only (TRAINING_FIELDS): lambda of the cost on memory writes, lambda * mean eta_t / eta_max added to the
    # training loss (hope_scale/model/write_cost.py; docs/hope-design.md §6.7); 0 = off; unset (null):
    # DEFAULT_WRITE_COST for the memory architectures, 0 for the attention ones
    write_cost: float | None = None

    # --- Continuum Memory System ---------------------------------------------------------------
    cms_levels: list[CMSLevel] = field(default_factory=lambda: [CMSLevel(1, 2.0), CMSLevel(4096, 2.0)])
    cms_variant: str = "sequential"

    # --- execution (EXECUTION_FIELDS; hope_scale/model/accel.py) ----------------------------------
    compile: bool = False  # torch.compile the memory layers' per-chunk step and the blocks' feed-forward parts
    kernel: str = "naive"  # "triton": the memory chunk update as a fused Triton kernel (hope_scale/model/kernels)

    # --- baselines -----------------------------------------------------------------------------
    mlp_hidden_mult: float = 8 / 3  # SwiGLU hidden width of Transformer++ / Titans blocks
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self.cms_levels = [lvl if isinstance(lvl, CMSLevel) else _from_dict(CMSLevel, lvl, "cms_levels[]")
                           for lvl in self.cms_levels]
        if self.write_cost is None:
            self.write_cost = DEFAULT_WRITE_COST if self.arch in MEMORY_ARCHITECTURES else 0.0
        self.validate()

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def retains_toward_init(self, projection: bool) -> bool:
        """Whether retention decays a memory (a projection memory, or the main memory) toward its initial weights."""
        return self.retain_toward == "init" or (projection and self.retain_toward == "init_projections")

    def _memory_hidden(self, mult: float) -> int:
        return max(1, int(round(mult * self.d_head)))

    @property
    def d_mem_hidden(self) -> int:
        """Hidden width of the main memory M_mem (of every memory unless ``proj_hidden_mult`` is set)."""
        return self._memory_hidden(self.mem_hidden_mult)

    @property
    def d_proj_hidden(self) -> int:
        """Hidden width of the projection memories M_k, M_v, M_q, M_eta, M_alpha."""
        return self._memory_hidden(self.mem_hidden_mult if self.proj_hidden_mult is None else self.proj_hidden_mult)

    def validate(self) -> None:
        def need(ok: bool, field_name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"model.{field_name}: {msg}")

        def is_number(value) -> bool:
            """A finite int or float, not a bool (YAML's true/false are ints to Python)."""
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(self.arch in ARCHITECTURES, "arch", f"{self.arch!r} is not one of {ARCHITECTURES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size_memory",
                     "chunk_size_projection", "conv_width", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0, "n_heads",
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)")
        for name in ("mem_hidden_mult", "proj_hidden_mult"):
            mult = getattr(self, name)
            need((mult is None and name == "proj_hidden_mult") or (is_number(mult) and mult > 0), name,
                 f"must be a finite number > 0, got {mult!r}")
        need(0.0 <= self.inner_momentum < 1.0, "inner_momentum", "must be in [0, 1)")
        need(math.isfinite(self.inner_step_bound) and self.inner_step_bound >= 0, "inner_step_bound",
             "must be a finite number >= 0 (0 disables the bound)")
        need(0.0 < self.eta_init < self.eta_max, "eta_init", f"must be in (0, eta_max={self.eta_max})")
        need(0.0 < self.alpha_init < 1.0, "alpha_init", "must be in (0, 1)")
        need(is_number(self.write_cost) and self.write_cost >= 0, "write_cost",
             f"must be a finite number >= 0, got {self.write_cost!r}")
        need(self.write_cost == 0 or self.arch in MEMORY_ARCHITECTURES, "write_cost",
             f"a cost on memory writes needs a memory layer (arch hope or titans), not {self.arch!r}")
        need(self.retain_toward in RETENTION_TARGETS, "retain_toward",
             f"{self.retain_toward!r} is not one of {RETENTION_TARGETS}")
        need(self.inner_overshoot in OVERSHOOTS, "inner_overshoot", f"{self.inner_overshoot!r} is not one of {OVERSHOOTS}")
        need(isinstance(self.compile, bool), "compile", f"expected true/false, got {self.compile!r}")
        need(self.kernel in KERNELS, "kernel", f"{self.kernel!r} is not one of {KERNELS}")
        need(self.cms_variant in CMS_VARIANTS, "cms_variant", f"{self.cms_variant!r} is not one of {CMS_VARIANTS}")
        if self.arch in ("hope", "hope_attention"):
            need(len(self.cms_levels) > 0, "cms_levels", "Hope needs at least one CMS level")
        for i, lvl in enumerate(self.cms_levels):
            need(isinstance(lvl.period, int) and lvl.period >= 1, f"cms_levels[{i}].period", "must be an integer >= 1")
            need(lvl.hidden_mult > 0, f"cms_levels[{i}].hidden_mult", "must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d, "model")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    @classmethod
    def named(cls, name: str) -> "ModelConfig":
        """Load ``configs/model/<name>.yaml`` (e.g. ``hope-tiny``, ``transformer-125m``; shipped in the wheel too)."""
        from hope_scale.resources import config_dir

        path = config_dir("model") / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in config_dir("model").glob("*.yaml"))
            raise ConfigError(f"model: no named config {name!r}; known: {known}")
        return cls.from_yaml(path)


def _from_dict(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**d)
