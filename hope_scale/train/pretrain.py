"""``hope-scale pretrain``: pretrain a model from a YAML config with ``key.sub=value`` overrides.

    hope-scale pretrain                                        # the embedded default: hope-tiny on CPU
    hope-scale pretrain --config configs/train/hope-760m.yaml train.max_steps=1000 optimizer.lr=3e-4
    launch/single_node.sh 8 configs/train/hope-760m.yaml       # one process per GPU (DeepSpeed launcher)

One process per device; the launcher's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT say where
each sits. Steps: validate the config (nothing else happens if it is wrong) -> check that the checkpoint and
log folders are writable and have room for a checkpoint -> prepare the built-in corpus if asked and absent ->
TrainEngine at the configured layout -> data loaders for this data-parallel rank -> resume
from the newest valid checkpoint (or ``--resume PATH``), at any layout -> loop: ``grad_accum_steps``
micro-batches per optimizer step, lr from the schedule, metrics every ``log_every`` steps, validation every
``eval_every`` steps, a checkpoint every ``every_steps`` steps and at the end. SIGTERM / SIGINT (e.g. SLURM
preemption) make every rank save a checkpoint at the next step boundary and stop.

Exit codes: 0 done (or stopped by a signal after saving); 2 bad input found before or at start-up (config,
folders, data, checkpoint); 1 the run failed: a non-finite loss, gradient norm or state (nothing non-finite is
ever saved: the message names the last good checkpoint), or the final save failed. A failed periodic save is
reported and training continues (the state in memory is intact; the next save tries again).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from hope_scale.model import ConfigError
from hope_scale.model.config import NON_MODEL_FIELDS

from .checkpoint import (CheckpointError, CheckpointManager, NonFiniteStateError, SaveFailedError, capture_rng,
                         restore_rng)
from .config import DEFAULT_CONFIG, TrainConfig, load_config
from .flops import flops_per_token, peak_flops
from .metrics import MetricsLogger, format_duration
from .preflight import check_checkpoint_space, check_writable
from .schedules import LRSchedule, write_cost_factor
from .step import ClipCounter

DATA_WAIT_SECONDS = 3600  # how long ranks other than 0 wait for rank 0 to prepare the built-in corpus


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"training YAML (default: the embedded {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="checkpoint folder (or checkpoint root) to resume from; overrides checkpoint.resume")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides after the options, e.g. optimizer.lr=3e-4 parallel.tensor_parallel=2")


def run(args: argparse.Namespace) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as e:
        print(f"hope-scale pretrain: invalid config: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from hope_scale.data.loader import DataConfigError, ShardError

    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.train()
    except (TrainingFailed, SaveFailedError) as e:
        print(f"hope-scale pretrain: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, DataConfigError, ShardError) as e:
        print(f"hope-scale pretrain: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    if world_size > 1:
        # gloo threads can outlive DeepSpeed's globals and abort the interpreter at exit (SIGABRT) after a
        # successful run: the process groups are destroyed (close), so leave without running finalizers
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# ----------------------------------------------------------------------------------------------
# data


def builtin_folder_name(cfg: TrainConfig) -> str:
    """The only folder name ``data.prepare_builtin`` fills: ``builtin-<tokenizer>-<seq_len>`` (builtin-byte-128)."""
    tok = cfg.prepare.tokenizer
    return f"builtin-{'byte' if tok == 'byte' else Path(tok).stem}-{cfg.train.seq_len}"


def ensure_data(cfg: TrainConfig, rank: int) -> None:
    """Prepare the built-in corpus into ``data.path`` if asked and absent (rank 0; others wait), then check
    that a local dataset fits the model (sequence length, vocabulary) before anything expensive starts.

    The built-in corpus is prepared only into a folder named ``builtin_folder_name(cfg)``: a mistyped path to
    a real dataset is an error, never silently filled with the built-in corpus and trained on."""
    from hope_scale.data.manifest import MANIFEST_NAME, read_manifest

    path = cfg.data.path
    if not path or "://" in path:
        return  # a mixture or remote data: the loader checks it
    root = Path(path)
    if read_manifest(root) is None:
        expected = builtin_folder_name(cfg)
        if not cfg.prepare.prepare_builtin or root.name != expected:
            why = (f"; data.prepare_builtin fills only a folder named {expected} (so that a mistyped path is not "
                   f"silently filled with the built-in corpus)" if cfg.prepare.prepare_builtin else
                   "; or set data.prepare_builtin=true with a folder named " + expected)
            raise ConfigError(f"data.path: {root} holds no prepared dataset ({MANIFEST_NAME} missing): check the "
                              f"path, or run `hope-scale prepare-data`{why}")
        if rank == 0:
            from data_prep.prepare import prepare_builtin

            print(f"data: {root} holds no dataset: preparing the built-in corpus (Python's documentation and "
                  f"standard library, {cfg.prepare.builtin_max_mb or 'all'} MB, tokenizer {cfg.prepare.tokenizer}, "
                  f"seq_len {cfg.train.seq_len}) into {root.resolve()} ...", flush=True)
            started = time.perf_counter()
            prepare_builtin(root, seq_len=cfg.train.seq_len, tokenizer=cfg.prepare.tokenizer,
                            max_mb=cfg.prepare.builtin_max_mb, val_fraction=cfg.prepare.builtin_val_fraction)
            print(f"data: ready in {time.perf_counter() - started:.0f} s", flush=True)
        else:
            deadline = time.monotonic() + DATA_WAIT_SECONDS
            while read_manifest(root) is None:  # the manifest is written last
                if time.monotonic() > deadline:
                    raise ConfigError(f"data.path: rank 0 did not finish preparing {root} in {DATA_WAIT_SECONDS} s")
                time.sleep(1.0)
    manifest = read_manifest(root)
    if manifest["seq_len"] != cfg.train.seq_len:
        raise ConfigError(f"train.seq_len: {cfg.train.seq_len}, but {root} was prepared with seq_len "
                          f"{manifest['seq_len']} (prepare it again, or use another data.path)")
    if manifest["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the vocabulary of the "
                          f"tokenizer {root} was prepared with ({manifest['vocab_size']})")


# ----------------------------------------------------------------------------------------------


class TrainingFailed(RuntimeError):
    """The run cannot continue (a non-finite loss, gradient norm or state); nothing after the last good
    checkpoint was saved."""


def model_differences(saved: dict, now: dict) -> list[str]:
    """Model config fields a checkpoint's model (``saved``) and this run's (``now``) disagree on. Execution fields
    (``model.compile``) and training-only fields (``model.write_cost``) are not the model: a run resumes under any
    value of them, and checkpoints written before such a field existed (the key absent) resume too."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in NON_MODEL_FIELDS)


class Trainer:
    """One process's part of a pretraining run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        from hope_scale.data.loader import build_train_loader, build_val_loader
        from hope_scale.parallel.engine import OptimizerSettings, TrainEngine, checkpoint_bytes

        self.cfg = cfg
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last_n, log=self.log)
        self.need_bytes = checkpoint_bytes(cfg.model)
        check_writable(cfg.checkpoint.dir, "checkpoint.dir")
        check_writable(cfg.logging.dir, "logging.dir")
        if self.rank == 0:
            check_checkpoint_space(self.ckpt, self.need_bytes)
        ensure_data(cfg, self.rank)
        self.layout = cfg.layout(self.world_size)
        t, o = cfg.train, cfg.optimizer
        self.engine = TrainEngine(
            cfg.model, self.layout,
            optimizer=OptimizerSettings(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay),
            precision=cfg.parallel.precision, grad_clip=o.grad_clip,
            grad_accum_steps=cfg.grad_accum_steps(self.world_size), seed=t.seed,
            deepspeed_config=cfg.parallel.deepspeed,
            backend=None if cfg.parallel.backend == "auto" else cfg.parallel.backend,
            activation_checkpointing=t.activation_checkpointing)
        info = self.engine.info
        self.loader = build_train_loader(cfg.data, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                                         dp_rank=info.dp_rank, dp_world_size=info.dp_size, seed=t.seed)
        self.val_loader = None
        if t.eval_every > 0:
            self.val_loader = build_val_loader(cfg.data, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                                               dp_rank=info.dp_rank, dp_world_size=info.dp_size,
                                               max_batches=t.eval_batches)
        self.schedule = LRSchedule.from_config(cfg.schedule, o.lr, t.max_steps)
        fpt = flops_per_token(cfg.model, t.seq_len).total if info.is_logging_rank else 0.0
        peak = peak_flops(cfg.logging.device, cfg.parallel.precision, cfg.logging.peak_flops)  # None: not declared
        self.metrics = MetricsLogger(cfg.logging.dir, enabled=info.is_logging_rank, max_steps=t.max_steps,
                                     flops_per_token=fpt, devices=self.world_size,
                                     peak_flops_total=None if peak is None else peak * self.world_size)
        self.step = 0
        self.tokens = 0
        self.clips = ClipCounter(o.grad_clip)  # steps since step 0 whose gradient norm exceeded the clip
        self.last_loss = float("nan")
        self.last_saved_step: int | None = None
        self.last_checkpoint: Path | None = None  # the newest good checkpoint of this run (saved or resumed)
        self._stop_requested = False
        rng = self._resume(resume)
        if rng is not None:
            restore_rng(rng)  # last, after everything that draws random numbers during set-up

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # -- resumption -----------------------------------------------------------------------------
    def _find_checkpoint(self, resume_arg: str | None):
        """The checkpoint to resume from (collective), or None to start at step 0.

        ``--resume PATH``: exactly that checkpoint folder (or that root's newest valid one). Otherwise
        ``checkpoint.resume``: ``never``; ``auto``: the newest valid one in ``checkpoint.dir``; a path: the newest
        valid one in ``checkpoint.dir`` if it has any (a restarted run continues its own progress), else the path.
        """
        source = self.cfg.checkpoint.resume
        if resume_arg is not None or source not in ("auto", "never"):
            own = None if resume_arg is not None else self.ckpt.load()
            path = resume_arg if resume_arg is not None else source
            loaded = own or self.ckpt.load(path)
            if loaded is None:
                raise CheckpointError(f"resume: no checkpoint at {path}")
            return loaded
        if source == "never":
            return None
        loaded = self.ckpt.load()
        if loaded is None:
            self.log(f"checkpoint: none in {self.ckpt.root}, starting from step 0")
        return loaded

    def _resume(self, resume_arg: str | None) -> dict | None:
        """Load the checkpoint ``_find_checkpoint`` picks; returns this rank's saved RNG state (or None)."""
        from hope_scale.parallel.engine import assemble_rank_state

        loaded = self._find_checkpoint(resume_arg)
        if loaded is None:
            return None
        saved_model = loaded.manifest["config"]["model"]
        now_model = self.cfg.model.to_dict()
        differ = model_differences(saved_model, now_model)
        if differ:
            raise CheckpointError(f"checkpoint {loaded.path} was saved for another model: model.{differ[0]} is "
                                  f"{saved_model.get(differ[0])!r} there, {now_model.get(differ[0])!r} here "
                                  f"(differing fields: {differ})")
        state = assemble_rank_state((part["engine"] for part in loaded.rank_parts()), self.engine.state_needs())
        self.engine.import_state(state)
        del state
        trainer = loaded.trainer
        self.step, self.tokens = int(trainer["step"]), int(trainer["tokens"])
        self.clips = ClipCounter(self.cfg.optimizer.grad_clip, self.step, int(trainer.get("clipped_steps", 0)))
        self.loader.load_state_dict(trainer["data"])
        self.last_saved_step = self.step
        self.last_checkpoint = loaded.path
        saved_layout = loaded.manifest.get("layout", {})
        self.log(f"checkpoint: resumed from {loaded.path} at step {self.step} ({self.tokens:,} tokens); saved at "
                 f"{_layout_str(saved_layout)} on {loaded.world_size} process(es), now "
                 f"{_layout_str(self.layout.to_dict())} on {self.world_size}")
        return loaded.rank_part(self.rank if self.rank < loaded.world_size else 0)["rng"]

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self._install_signal_handlers()
        accum = self.engine.grad_accum_steps
        self.metrics.print(
            f"train: model {cfg.model_name or cfg.model.arch}, layout {_layout_str(self.layout.to_dict())}, "
            f"{self.world_size} process(es), {t.global_batch_size} x {t.seq_len} tokens per step "
            f"({accum} micro-batch(es) of {t.micro_batch_size} per DP rank), steps {self.step} -> {t.max_steps}, "
            f"logs {cfg.logging.dir}, checkpoints {cfg.checkpoint.dir}")
        first, run_started = self.step, time.perf_counter()
        while self.step < t.max_steps:
            started = time.perf_counter()
            micro_batches = [next(self.loader) for _ in range(accum)]
            lr = self.schedule(self.step)
            s = cfg.schedule
            write_cost = write_cost_factor(self.step, s.write_cost_from_step, s.write_cost_ramp_steps)
            if self.step == s.write_cost_from_step and (s.write_cost_from_step or s.write_cost_ramp_steps) \
                    and cfg.model.write_cost:
                ramp = f", rising to it over {s.write_cost_ramp_steps} steps" if s.write_cost_ramp_steps else ""
                self.metrics.print(f"train: model.write_cost {cfg.model.write_cost:g} on from step {self.step}{ramp} "
                                   "(schedule.write_cost_from_step, write_cost_ramp_steps)")
            out = self.engine.train_step(micro_batches, lr, write_cost=write_cost)
            self._last_batch = micro_batches[-1]
            self.step += 1
            self.tokens += int(out["tokens"])
            self.clips.add(out["grad_norm"])
            self.last_loss = out["loss"]
            seconds = time.perf_counter() - started
            finite = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])  # the same on every rank
            write = (self.step % cfg.logging.log_every == 0 or self.step == t.max_steps or self.step == first + 1
                     or not finite)
            memory = self.engine.memory_stats() if write else None  # collective: same steps on every rank
            self.metrics.log_step(self.step, self.tokens, out["loss"], lr, out["grad_norm"], int(out["tokens"]),
                                  seconds, memory, write, clipped_fraction=self.clips.fraction)
            if not finite:
                raise TrainingFailed(f"step {self.step}: loss {out['loss']}, gradient norm {out['grad_norm']}: the "
                                     f"update is not finite, so nothing after it is saved. {self._last_good()}")
            if t.eval_every and self.step % t.eval_every == 0:
                self.evaluate()
            stop = self._agree_to_stop()
            every = cfg.checkpoint.every_steps
            if stop or (every and self.step % every == 0):
                self.save(final=stop)
            if stop:
                self.log(f"train: stopping at step {self.step} on a termination signal (checkpoint saved)")
                self._summary(first, time.perf_counter() - run_started)
                return
        if self.last_saved_step != self.step:
            self.save(final=True)
        if self.val_loader is not None and self.step % t.eval_every:
            self.evaluate()
        self._summary(first, time.perf_counter() - run_started)

    def _summary(self, first: int, seconds: float) -> None:
        """The end-of-run line (logging rank)."""
        if self.step == first:
            return
        c = self.clips
        self.metrics.print(f"train: done, steps {first} -> {self.step} of {self.cfg.train.max_steps} in "
                           f"{format_duration(seconds)}, {self.tokens:,} tokens, last loss {self.last_loss:.4f}, "
                           f"fraction of clipped steps {c.fraction:.3f} ({c.clipped} of {c.steps}, "
                           f"clip {self.cfg.optimizer.grad_clip:g})")

    def evaluate(self) -> float:
        losses = [self.engine.eval_loss(batch) for batch in self.val_loader]
        mean = sum(losses) / len(losses)
        self.metrics.log_eval(self.step, mean, len(losses))
        return mean

    def save(self, final: bool) -> None:
        """Checkpoint the current step (collective). Only a usable state is saved: if the weights give a
        non-finite loss on the step's last micro-batch, or any saved tensor holds NaN/Inf, nothing is written and
        the run stops (TrainingFailed). A failed write leaves no partial checkpoint; after a periodic save the run
        continues (its state in memory is intact), after the last one (``final``) SaveFailedError ends it."""
        probe = self.engine.eval_loss(self._last_batch)  # the weights after the update (forward only, no RNG)
        if not math.isfinite(probe):
            raise TrainingFailed(f"checkpoint step {self.step} not saved: the weights after this update give loss "
                                 f"{probe} on the step's last micro-batch. {self._last_good()}")
        rank_state = {"engine": self.engine.export_state(), "rng": capture_rng()}
        trainer_state = {"step": self.step, "tokens": self.tokens, "clipped_steps": self.clips.clipped,
                         "data": self.loader.state_dict()}
        meta = {"tokens": self.tokens, "layout": self.layout.to_dict(), "model_name": self.cfg.model_name,
                "config": self.cfg.to_dict()}
        try:
            self.last_checkpoint = self.ckpt.save(self.step, rank_state, trainer_state, meta, self.need_bytes)
        except NonFiniteStateError as err:
            raise TrainingFailed(f"{err}: the last update made the weights or optimizer state non-finite. "
                                 f"{self._last_good()}") from None
        except SaveFailedError as err:
            if final:
                raise SaveFailedError(f"{err}. {self._last_good()}") from None
            every = self.cfg.checkpoint.every_steps
            self.log(f"{err}. Training continues; the next save is at step {self.step + every}. {self._last_good()}")
            return
        self.last_saved_step = self.step

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "This run has no checkpoint yet."
        return f"The last good checkpoint is {self.last_checkpoint}."

    # -- termination signals ---------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):  # noqa: ARG001
            self._stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)

    def _agree_to_stop(self) -> bool:
        """Whether any rank got a termination signal (collective, so every rank saves and stops together)."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.engine.device)
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        for loader in (getattr(self, "loader", None), getattr(self, "val_loader", None)):
            if loader is not None:
                loader.close()
        if hasattr(self, "engine"):
            self.engine.close()


def _layout_str(layout: dict) -> str:
    return (f"TP={layout.get('tensor_parallel', '?')} PP={layout.get('pipeline_parallel', '?')} "
            f"DP={layout.get('data_parallel', '?')} ZeRO-{layout.get('zero_stage', '?')}")
