"""Training engine: DeepSpeed (ZeRO 0-3, AdamW, clipping, bf16) + Megatron-Core tensor parallelism + a 1F1B
pipeline, with the Continuum Memory System schedule and layout-independent state export/import.

    engine = TrainEngine(ModelConfig.named("hope-tiny"), ParallelLayout(tensor_parallel=2, data_parallel=2),
                         OptimizerSettings(lr=3e-4), precision="bf16", grad_clip=1.0, grad_accum_steps=4, seed=0)
    out = engine.train_step(micro_batches, lr=3e-4)      # {"loss", "grad_norm", "tokens", "cms_stepped"}
    part = engine.export_state()                         # save per rank; load at any layout:
    engine2.import_state(assemble_rank_state(all_parts, engine2.state_needs()))

See docs/parallelism.md for the design.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from hope_scale.model.accel import compile_model
from hope_scale.model.cms import cms_level_periods
from hope_scale.model.config import ModelConfig
from hope_scale.model.kernels import apply_kernel
from hope_scale.model.lm import build_model
from hope_scale.model.titans import SelfModifyingTitans
from hope_scale.model.write_cost import loss_grad_scale
from hope_scale.train.step import CMSPeriodSchedule, OptimizerSettings, cms_level_of, param_groups

from .ds_config import build_deepspeed_config
from .layout import LayoutError, ParallelLayout, RankInfo, init_distributed
from .optim import CMS_BUFFER, MOMENT_KEYS, CMSAdamW
from .parallelize import ModelPart, ShardSpec, parallelize
from .recompute import MODES, apply_activation_checkpointing

STATE_FORMAT = "hope-scale/rank-state/v1"
PRECISIONS = ("fp32", "bf16", "fp64")  # fp64: ZeRO-0 and DP=1 only, for exact layout-equivalence tests


def state_keys(name: str) -> tuple[str, ...]:
    """Optimizer-state tensors exported for parameter ``name`` besides its value."""
    return MOMENT_KEYS + ((CMS_BUFFER,) if cms_level_of(name) is not None else ())


def checkpoint_bytes(cfg: ModelConfig) -> int:
    """Bytes of fp32 tensors one checkpoint of ``cfg`` holds over all its rank files (``export_state``: every
    parameter's value and optimizer state, each element stored once), counted on a meta-device model."""
    with torch.device("meta"):
        model = build_model(cfg)
    return sum(4 * p.numel() * (1 + len(state_keys(name))) for name, p in model.named_parameters())


class MegatronMPU:
    """Megatron-Core's parallel_state in the ``mpu`` interface DeepSpeed expects (pipeline_parallel == 1)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1


class TrainEngine:
    """This rank's share of a training run at a given ParallelLayout.

    Args:
        model_cfg: the model (every rank builds it in full from ``seed`` and keeps its slice, so initial weights do
            not depend on the layout).
        layout: TP x PP x DP and ZeRO stage; validated against the model and the world size before any work.
        optimizer: AdamW settings {lr, betas, eps, weight_decay}.
        precision: "fp32" or "bf16" (bf16 weights/activations, fp32 master weights, gradient accumulation and
            optimizer state; needs zero_stage >= 1); "fp64"
            (ZeRO-0, DP=1 only) exists for exact equivalence tests across TP/PP layouts.
        grad_clip: global gradient-norm clip (0 disables clipping; the norm is still reported).
        grad_accum_steps: micro-batches per optimizer step on each data-parallel rank.
        seed: initial weights.
        deepspeed_config: extra DeepSpeed config entries merged over the generated ones (e.g. ZeRO bucket sizes).
        backend: torch.distributed backend (default gloo on CPU, nccl on GPU).
        activation_checkpointing: "none", "block" or "memory" (``recompute.py``; under pipeline parallelism
            "block" is DeepSpeed's pipeline checkpointing).
    """

    def __init__(self, model_cfg: ModelConfig, layout: ParallelLayout,
                 optimizer: OptimizerSettings | dict | None = None, precision: str = "fp32",
                 grad_clip: float = 1.0, grad_accum_steps: int = 1, seed: int = 0,
                 deepspeed_config: dict | None = None, backend: str | None = None,
                 activation_checkpointing: str = "none"):
        if precision not in PRECISIONS:
            raise LayoutError(f"parallel.precision: {precision!r} is not one of {PRECISIONS}")
        if precision == "bf16" and layout.zero_stage == 0:
            raise LayoutError("parallel.precision: bf16 needs parallel.zero_stage >= 1 (DeepSpeed keeps fp32 master "
                              "weights and fp32 gradient accumulation only in its ZeRO / bf16 optimizers; ZeRO-1 "
                              "costs no extra communication)")
        if precision == "fp64" and (layout.zero_stage != 0 or layout.data_parallel != 1):
            raise LayoutError("parallel.precision: fp64 (exactness tests) needs parallel.zero_stage=0 and "
                              "data_parallel=1: ZeRO keeps fp32 master weights and DeepSpeed reduces only fp32/bf16 "
                              "gradients across data-parallel ranks")
        if activation_checkpointing not in MODES:
            raise LayoutError(f"train.activation_checkpointing: {activation_checkpointing!r} is not one of {MODES}")
        if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
            raise LayoutError(f"train.grad_accum_steps: must be an integer >= 1, got {grad_accum_steps!r}")
        self.cfg, self.layout = model_cfg, layout
        self.opt_settings = OptimizerSettings.coerce(optimizer)
        self.precision, self.grad_clip, self.grad_accum_steps, self.seed = precision, grad_clip, grad_accum_steps, seed
        self.info: RankInfo = init_distributed(layout, model_cfg, backend)

        import deepspeed
        from megatron.core import parallel_state as ps

        self._ps = ps
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(seed)
        full = build_model(dataclasses.replace(model_cfg, compile=False, kernel="naive"))  # both set below, on the part
        self.master_dtype = torch.float64 if precision == "fp64" else torch.float32
        self.part: ModelPart = parallelize(full, self.info, dtype=self.master_dtype)
        del full
        pipeline_blocks = layout.pipeline_parallel > 1 and activation_checkpointing == "block"
        if not pipeline_blocks:  # (the pipeline engine checkpoints its blocks itself)
            apply_activation_checkpointing(self.part, activation_checkpointing)
        if model_cfg.compile:  # the chunk steps only: the blocks hold Megatron's parallel layers (accel.py)
            compile_model(self.part, blocks=False)
        apply_kernel(self.part, model_cfg.kernel)  # model.kernel: triton replaces the (compiled) chunk step
        self._seed_parallel_rng(seed)
        self.specs: dict[str, ShardSpec] = dict(self.part.specs)
        self.param_name: dict[nn.Parameter, str] = {p: n for n, p in self.part.named_parameters()}
        self.schedule = CMSPeriodSchedule(cms_level_periods(full_cms_model_stub(model_cfg)))
        self.optimizer = CMSAdamW(param_groups(self.part.named_parameters(), self.opt_settings.weight_decay),
                                  lr=self.opt_settings.lr, betas=self.opt_settings.betas,
                                  eps=self.opt_settings.eps, weight_decay=self.opt_settings.weight_decay)
        ds_config = build_deepspeed_config(layout, precision, grad_clip, grad_accum_steps, deepspeed_config,
                                           pipeline_checkpoint_interval=1 if pipeline_blocks else 0)
        if layout.pipeline_parallel == 1:
            self.ds, _, _, _ = deepspeed.initialize(model=self.part, optimizer=self.optimizer, config=ds_config,
                                                    mpu=MegatronMPU())
        else:
            from .pipeline import build_pipeline_module

            pipe = build_pipeline_module(self.part, self.info, checkpoint_blocks=pipeline_blocks)
            self.ds, _, _, _ = deepspeed.initialize(model=pipe, optimizer=self.optimizer, config=ds_config)
        self.optimizer.materialize_state()
        if precision == "fp64":  # DP=1: nothing to all-reduce, and DeepSpeed's reducer rejects fp64 gradients
            self.ds.enable_backward_allreduce = False
            self.ds.pipeline_enable_backward_allreduce = False
        if self._exact_fp32_norm():
            # ZeRO-0 fp32: DeepSpeed's clip_grad_norm_ counts replicated parameters per pipeline stage
            # inconsistently and keeps no norm; use the exact one (see global_grad_norm)
            self.ds.clip_fp32_gradients = self._clip_fp32_gradients
        self.steps = 0
        self._state_ready = False
        self.last_tokens_per_step = 0

    # --- construction helpers -----------------------------------------------------------------------
    def _seed_parallel_rng(self, seed: int) -> None:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed + 1000 * self.info.pp_rank)  # model has no dropout; keep streams distinct anyway

    def _exact_fp32_norm(self) -> bool:
        return self.layout.zero_stage == 0 and self.precision in ("fp32", "fp64")

    # --- rank info ----------------------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.info.dp_rank

    @property
    def dp_size(self) -> int:
        return self.info.dp_size

    @property
    def is_first_stage(self) -> bool:
        return self.info.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.info.is_last_stage

    @property
    def is_logging_rank(self) -> bool:
        return self.info.is_logging_rank

    # --- training -----------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def tokens_in(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Global stream tokens of one optimizer step (all micro-batches of all data-parallel ranks)."""
        local = torch.tensor([float(sum(ids.numel() for ids, _ in micro_batches))], dtype=torch.float64)
        dist.all_reduce(local, group=self._ps.get_data_parallel_group(with_context_parallel=False))
        return int(local.item())

    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float,
                   write_cost: float = 1.0) -> dict:
        """One optimizer step on this rank's ``grad_accum_steps`` micro-batches (input_ids, labels), each [B, T].

        Every rank of a data-parallel replica passes the same micro-batches (pipeline stages other than the first
        and last ignore them; only their shapes must agree). The CMS schedule decides from the step's global
        token count which levels update (inside the optimizer step, after gradients are reduced and clipped).
        ``write_cost`` is the fraction of ``model.write_cost`` this step charges (``schedules.write_cost_factor``;
        0 leaves it out).
        Returns {"loss": mean loss over all micro-batches of all DP ranks (same on every rank),
        "grad_norm": global gradient norm before clipping, "tokens": global tokens of the step,
        "cms_stepped": {level: stepped}}.
        """
        if len(micro_batches) != self.grad_accum_steps:
            raise ValueError(f"train_step: got {len(micro_batches)} micro-batches, the engine was built for "
                             f"grad_accum_steps={self.grad_accum_steps}")
        tokens = self.tokens_in(micro_batches)
        self.last_tokens_per_step = tokens
        plan = self.schedule.advance(tokens)
        self.set_lr(lr)
        loss = self._run_step(micro_batches, plan, write_cost=write_cost)
        self.steps += 1
        self._state_ready = True
        return {"loss": loss, "grad_norm": self.global_grad_norm(), "tokens": tokens,
                "cms_stepped": {lvl: due for lvl, (due, _) in plan.items()}}

    def _run_step(self, micro_batches, plan: dict[int, tuple[bool, int]], skip_all: bool = False,
                  write_cost: float = 1.0) -> float:
        self.optimizer.level_plan = plan
        self.optimizer.skip_all = skip_all
        self.part.loss_scale = 0.0 if skip_all else 1.0
        # DeepSpeed's backward divides each micro-batch's loss by the accumulation steps (and scales it by nothing
        # else: fp16 is rejected); model.write_cost's gradient, added inside the layers, is scaled the same way
        try:
            with loss_grad_scale(self.part.loss_scale / self.grad_accum_steps * float(write_cost)):
                batches = [(ids.to(self.device), labels.to(self.device)) for ids, labels in micro_batches]
                if self.layout.pipeline_parallel == 1:
                    total = torch.zeros((), dtype=torch.float64)
                    for ids, labels in batches:
                        loss = self.ds(ids, labels)
                        self.ds.backward(loss)
                        self.ds.step()
                        total += loss.detach().double().cpu()
                    mean = total / len(batches)
                    dist.all_reduce(mean, group=self._ps.get_data_parallel_group(with_context_parallel=False))
                    return float(mean.item()) / self.info.dp_size
                self._pipe_shape(batches)
                out = self.ds.train_batch(data_iter=iter(batches))
                return float(out.float().item())  # DeepSpeed hands other stages an fp32 copy: same value on all
        finally:
            self.optimizer.skip_all = False
            self.part.loss_scale = 1.0

    def _pipe_shape(self, batches) -> None:
        """DeepSpeed's pipeline engine sizes its send/receive buffers from the first micro-batch it sees; when the
        micro-batch shape changes (evaluation, a different sequence length) they must be rebuilt."""
        shape = tuple(batches[0][0].shape)
        if any(tuple(ids.shape) != shape for ids, _ in batches):
            raise ValueError("pipeline_parallel > 1 needs micro-batches of one shape within a step")
        if shape != getattr(self, "_last_pipe_shape", None):
            self.ds.reset_activation_shape()
            self._last_pipe_shape = shape

    def global_grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _clip_fp32_gradients(self) -> None:
        """Exact global norm for unpartitioned fp32 gradients: sharded parameters count on every TP rank,
        replicated ones once per TP group, the pipeline copy of the tied embedding not at all."""
        grads = []
        for p in self.part.parameters():
            if p.grad is None:
                continue
            spec = self.specs[self.param_name[p]]
            if spec.pp_duplicate or (spec.tp_replicated and self.info.tp_rank != 0):
                continue
            grads.append(p.grad.detach().double().pow(2).sum())
        sq = torch.stack(grads).sum() if grads else torch.zeros((), dtype=torch.float64)
        sq = sq.to(self.device)
        dist.all_reduce(sq, group=self._ps.get_model_parallel_group())
        norm = sq.sqrt()
        max_norm = self.ds.gradient_clipping()
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in self.part.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef.to(p.grad.dtype))
        self.ds._global_grad_norm = norm

    @torch.no_grad()
    def eval_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """Mean loss of this rank's (input_ids, labels) batch, averaged over data-parallel ranks (same on all)."""
        ids, labels = batch[0].to(self.device), batch[1].to(self.device)
        if self.layout.pipeline_parallel == 1:
            self.ds.eval()
            loss = self.ds(ids, labels).detach().double().cpu()
            self.ds.train()
            dist.all_reduce(loss, group=self._ps.get_data_parallel_group(with_context_parallel=False))
            return float(loss.item()) / self.info.dp_size
        self._pipe_shape([(ids, labels)])
        out = self.ds.eval_batch(data_iter=iter([(ids, labels)]), num_micro_batches=1)
        self.ds.train()
        return float(out.float().item())

    def memory_stats(self) -> dict[str, float]:
        """Memory-state statistics of the last forward ("layer{i}/{eta,alpha,mem_w1_norm,mem_w2_norm}"), averaged
        over tensor-parallel ranks (their heads) and data-parallel ranks (their batches) and gathered from every
        pipeline stage. Collective: call on all ranks; every rank gets the same full dict."""
        local: dict[str, float] = {}
        keys, vals = [], []
        for idx, blk in self.part.blocks.items():
            stats = getattr(blk.mixer, "last_stats", None) if isinstance(blk.mixer, SelfModifyingTitans) else None
            for k, v in sorted((stats or {}).items()):
                keys.append(f"layer{idx}/{k}")
                vals.append(float(v))
        if vals:
            t = torch.tensor(vals, dtype=torch.float64, device=self.device)
            if self.info.tp_size > 1:
                dist.all_reduce(t, group=self._ps.get_tensor_model_parallel_group())
                t /= self.info.tp_size
            if self.info.dp_size > 1:
                dist.all_reduce(t, group=self._ps.get_data_parallel_group(with_context_parallel=False))
                t /= self.info.dp_size
            local = dict(zip(keys, t.cpu().tolist()))
        if self.info.pp_size == 1:
            return local
        gathered: list = [None] * self.info.pp_size
        dist.all_gather_object(gathered, local, group=self._ps.get_pipeline_model_parallel_group())
        merged: dict[str, float] = {}
        for d in gathered:
            merged.update(d or {})
        return dict(sorted(merged.items(), key=lambda kv: _natural_key(kv[0])))

    # --- layout-independent state -------------------------------------------------------------------
    def _materialize_optimizer_state(self) -> None:
        """Run one step that changes nothing (loss x 0, every group skipped) so optimizer state and DeepSpeed's
        per-parameter state links exist before the first real step."""
        if self._state_ready:
            return
        n = min(8, self.cfg.max_seq_len)
        zeros = torch.zeros(1, n, dtype=torch.long)
        plan = {lvl: (False, 1) for lvl in self.schedule.periods}
        self._run_step([(zeros, zeros)] * self.grad_accum_steps, plan, skip_all=True)
        self._state_ready = True

    def _local_params_in_order(self) -> list[tuple[str, nn.Parameter]]:
        return sorted(self.part.named_parameters(), key=lambda kv: _natural_key(kv[0]))

    def _zero_partitioned(self, p: nn.Parameter) -> bool:
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def _full_local(self, p: nn.Parameter, key: str | None) -> torch.Tensor:
        """This rank's (TP/PP) shard of parameter p -- the fp32 master value or an optimizer-state tensor --
        gathered over ZeRO partitions (collective over the data-parallel group under ZeRO 1-3 and bf16)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self._zero_partitioned(p):
            t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
            return t.detach().to(self.master_dtype).cpu().reshape(_local_shape(self.specs[self.param_name[p]]))
        t = p.detach() if key is None else self.optimizer.state[p][key]
        return t.to(self.master_dtype).cpu().clone()

    def _set_local(self, p: nn.Parameter, key: str | None, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(self.device)
        if key is None:
            if hasattr(p, "ds_id"):  # ZeRO-3: the partitioned working copy, then the fp32 master
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
            if self._zero_partitioned(p):
                safe_set_full_fp32_param(p, value.float())
        elif self._zero_partitioned(p):
            safe_set_full_optimizer_state(p, value.float(), key)
        else:
            self.optimizer.state[p][key].copy_(value.to(self.optimizer.state[p][key].dtype))

    def export_state(self) -> dict:
        """This rank's part of the training state, keyed by global parameter name (collective: call on all ranks).

        Returns {"format", "layout", "rank", "model_config", "steps", "cms_schedule", "group_steps",
        "params": {global name: {"global_shape", "box", "value", "exp_avg", "exp_avg_sq"[, "cms_grad_sum"]}}}.
        Values are fp32 CPU tensors holding the box [(start, length) per dim] of the global tensor. Each piece
        of every global parameter is stored by exactly one rank: replicated pieces by TP rank 0, the tied head by
        the first stage only, and the pieces of a model-parallel shard are spread over its data-parallel ranks.
        """
        self._materialize_optimizer_state()
        params: dict[str, dict] = {}
        for k, (name, p) in enumerate(self._local_params_in_order()):
            spec = self.specs[name]
            owner = k % self.info.dp_size == self.info.dp_rank
            keep = owner and not spec.pp_duplicate and not (spec.tp_replicated and self.info.tp_rank != 0)
            entry = {"global_shape": list(spec.global_shape), "box": [list(b) for b in spec.box]}
            for key in (None,) + state_keys(name):  # gathering is collective over DP: every rank runs it
                t = self._full_local(p, key)
                if keep:
                    entry["value" if key is None else key] = t
            if keep:
                params[name] = entry
        return {
            "format": STATE_FORMAT,
            "layout": self.layout.to_dict(),
            "rank": self.info.to_dict(),
            "model_config": self.cfg.to_dict(),
            "steps": self.steps,
            "cms_schedule": self.schedule.state_dict(),
            "group_steps": self.optimizer.group_steps(),
            "params": params,
        }

    def state_needs(self) -> dict[str, ShardSpec]:
        """Global name -> the box of the global tensor this rank holds (what ``import_state`` needs)."""
        return dict(self.specs)

    def import_state(self, state: dict) -> None:
        """Load a state assembled for this rank (``assemble_rank_state(parts, engine.state_needs())``), saved at
        any layout. Collective: call on all ranks."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"import_state: unknown format {state.get('format')!r}")
        self._materialize_optimizer_state()
        params = state["params"]
        missing = sorted(set(self.specs) - set(params))
        if missing:
            raise KeyError(f"import_state: no value for {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for name, p in self._local_params_in_order():
            entry = params[name]
            self._check_box(name, entry)
            for key in (None,) + state_keys(name):
                field = "value" if key is None else key
                if field not in entry:
                    if key == CMS_BUFFER:
                        continue  # saved by a run without this level's buffer: keep zeros
                    raise KeyError(f"import_state: {name} has no {field!r}")
                self._set_local(p, key, entry[field])
        self.optimizer.set_group_steps({k: int(v) for k, v in state["group_steps"].items()})
        self.schedule.load_state_dict(state["cms_schedule"])
        self.steps = int(state["steps"])

    def _check_box(self, name: str, entry: dict) -> None:
        spec = self.specs[name]
        box = tuple(tuple(b) for b in entry["box"])
        if tuple(entry["global_shape"]) != spec.global_shape or box != spec.box:
            raise ValueError(f"import_state: {name} holds box {box} of {tuple(entry['global_shape'])}, this rank "
                             f"needs {spec.box} of {spec.global_shape}")

    def close(self, destroy_process_group: bool = True) -> None:
        """Release DeepSpeed's engine and Megatron's model-parallel groups; with ``destroy_process_group`` also the
        default process group (call before the process exits). Without it, another engine -- at another layout of
        the same world size -- can be built in this process."""
        from megatron.core import parallel_state

        if self.ds is not None:
            self.ds.destroy()
            self.ds = None
        self.part = None
        if destroy_process_group:
            from .layout import shutdown_distributed

            shutdown_distributed()
        elif parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()


def _local_shape(spec: ShardSpec) -> tuple[int, ...]:
    return tuple(n for _, n in spec.box)


def full_cms_model_stub(cfg: ModelConfig) -> nn.Module:
    """A module tree with the model's CMS levels (for their periods) without building the whole model."""
    from hope_scale.model.cms import ContinuumMemorySystem

    if cfg.arch not in ("hope", "hope_attention"):
        return nn.Module()
    return ContinuumMemorySystem(8, cfg.cms_levels, cfg.cms_variant, cfg.norm_eps)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --- resharding ----------------------------------------------------------------------------------------
def _intersect(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]):
    """Intersection of two boxes [(start, length)...] as (global slices, slices in a, slices in b) or None."""
    g, in_a, in_b = [], [], []
    for (sa, na), (sb, nb) in zip(a, b):
        lo, hi = max(sa, sb), min(sa + na, sb + nb)
        if hi <= lo:
            return None
        g.append(slice(lo, hi))
        in_a.append(slice(lo - sa, hi - sa))
        in_b.append(slice(lo - sb, hi - sb))
    return tuple(g), tuple(in_a), tuple(in_b)


def assemble_rank_state(parts: Iterable[dict], needs: dict[str, ShardSpec]) -> dict:
    """Build what one rank needs from the rank parts saved by ``export_state`` at any layout.

    ``parts``: the saved parts of all ranks of the old run (any iterable; each is read once, so parts can be
    loaded lazily, e.g. with ``torch.load(..., mmap=True)``). ``needs``: ``engine.state_needs()`` of the new rank.
    Returns a state for ``import_state``. Raises if some element of a needed box is not covered.
    """
    out_params: dict[str, dict] = {}
    filled: dict[str, torch.Tensor] = {}
    meta = None
    for part in parts:
        if part.get("format") != STATE_FORMAT:
            raise ValueError(f"assemble_rank_state: unknown format {part.get('format')!r}")
        if meta is None:
            meta = {k: part[k] for k in ("steps", "cms_schedule", "group_steps", "model_config")}
        else:
            meta["group_steps"] = {**part["group_steps"], **meta["group_steps"]}
        for name, entry in part["params"].items():
            spec = needs.get(name)
            if spec is None:
                continue
            if tuple(entry["global_shape"]) != spec.global_shape:
                raise ValueError(f"assemble_rank_state: {name} has global shape {tuple(entry['global_shape'])} in "
                                 f"the checkpoint, {spec.global_shape} in this model")
            hit = _intersect(spec.box, entry["box"])
            if hit is None:
                continue
            _, in_need, in_saved = hit
            dst = out_params.get(name)
            if dst is None:
                dst = out_params[name] = {"global_shape": list(spec.global_shape), "box": [list(b) for b in spec.box]}
                filled[name] = torch.zeros(tuple(n for _, n in spec.box), dtype=torch.bool)
            for field, t in entry.items():
                if not torch.is_tensor(t):
                    continue
                if field not in dst:
                    dst[field] = torch.zeros(tuple(n for _, n in spec.box), dtype=t.dtype)
                dst[field][in_need] = t[in_saved]
            filled[name][in_need] = True
    if meta is None:
        raise ValueError("assemble_rank_state: no parts given")
    missing = [n for n in needs if n not in filled or not bool(filled[n].all())]
    if missing:
        raise KeyError(f"assemble_rank_state: the parts do not cover {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}")
    return {"format": STATE_FORMAT, **meta, "params": out_params}


def consolidate_full_state(parts: Iterable[dict], field: str = "value") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors from all rank parts: {global name: tensor} for ``field`` ("value" = fp32 parameters,
    or an optimizer-state key such as "exp_avg"). Loads into a LanguageModel with ``load_state_dict(strict=False)``
    (the tied head is not a separate entry). Raises if some element is covered by no part."""
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, entry in part["params"].items():
            if field not in entry:
                continue
            if name not in full:
                full[name] = torch.zeros(tuple(entry["global_shape"]), dtype=entry[field].dtype)
                covered[name] = torch.zeros(tuple(entry["global_shape"]), dtype=torch.bool)
            box = tuple(slice(a, a + n) for a, n in entry["box"])
            full[name][box] = entry[field]
            covered[name][box] = True
    holes = [n for n, c in covered.items() if not bool(c.all())]
    if holes:
        raise KeyError(f"consolidate_full_state: {field!r} of {holes[:5]} is not fully covered by the parts")
    return full
