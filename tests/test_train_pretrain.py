"""`hope-scale pretrain` end to end on CPU: the embedded default, exact resume after a kill, fallback from a
corrupted checkpoint, config errors before any work, and resharded resumption across layouts (gloo processes).

Every run uses a tiny Hope model (d_model 32, 2 layers, 2 heads, 32-token sequences) on a slice of the
built-in corpus that the first run prepares itself. ``OMP_NUM_THREADS=1``: the same thread count in every run
keeps CPU arithmetic bit-identical between an uninterrupted and a resumed run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
    "model.chunk_size_memory=8", "model.chunk_size_projection=16",
    # a CMS level with a period of 2 optimizer steps (128 tokens each): its schedule state must resume too
    "model.cms_levels=[{period: 1, hidden_mult: 1.0}, {period: 256, hidden_mult: 1.0}]",
    "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4", f"train.max_steps={STEPS}",
    "train.eval_every=4", "train.eval_batches=2", "checkpoint.every_steps=4", "checkpoint.keep_last_n=3",
    "logging.log_every=1", "schedule.warmup_steps=2", "logging.peak_flops=1e10",
    "data.builtin_max_mb=0.2", "data.builtin_val_fraction=0.1",
]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env.update({"TMPDIR": str(tmp / "tmp"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run_args(run: Path, data: Path, extra=()) -> list[str]:
    return [*TINY, f"data.path={data}", f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'tb'}",
            f"data.cache_dir={run / 'cache'}", *extra]


CPU_CONFIG = str(REPO / "configs" / "train" / "hope-tiny-cpu.yaml")


def pretrain(run: Path, data: Path, extra=(), nproc: int = 1, launcher: str = "python",
             kill_after_line: str | None = None, term_after_line: str | None = None,
             timeout: float = 900, max_file_bytes: int | None = None) -> tuple[int, str]:
    """Run `hope-scale pretrain`; returns (exit code, output). ``launcher``:

    python        ``python -m hope_scale.cli pretrain OVERRIDES`` (the embedded default config; nproc 1)
    single_node   ``launch/single_node.sh NPROC CONFIG OVERRIDES``
    multi_node    ``launch/multi_node.sh HOSTFILE CONFIG OVERRIDES`` with a "localhost slots=NPROC" hostfile
    slurm         NPROC processes of ``launch/slurm_task.sh CONFIG OVERRIDES`` with the variables srun sets

    With ``kill_after_line``, SIGKILL the whole process group as soon as a line starting with it appears;
    with ``term_after_line``, send the process SIGTERM (preemption) and let it finish. ``max_file_bytes``: no
    file can grow beyond that size (RLIMIT_FSIZE: writes fail as on a full disk).
    """
    run.mkdir(parents=True, exist_ok=True)
    overrides = _run_args(run, data, extra)
    env = _env(run)
    if launcher == "slurm":
        return _slurm_tasks(run, nproc, overrides, env, timeout)
    if launcher == "python":
        assert nproc == 1
        cmd = [sys.executable, "-m", "hope_scale.cli", "pretrain", *overrides]
    elif launcher == "single_node":
        cmd = ["bash", str(REPO / "launch" / "single_node.sh"), str(nproc), CPU_CONFIG, *overrides]
    else:
        (run / "hostfile").write_text(f"# test hostfile\nlocalhost slots={nproc}\n")
        env["DS_LAUNCHER_ARGS"] = "--no_ssh_check"  # one host, no ssh: the launcher starts the ranks locally
        cmd = ["bash", str(REPO / "launch" / "multi_node.sh"), str(run / "hostfile"), CPU_CONFIG, *overrides]
    limit = None if max_file_bytes is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)))
    proc = subprocess.Popen(cmd, cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=limit)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_after_line is not None and line.startswith(kill_after_line):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if term_after_line is not None and line.startswith(term_after_line):
                proc.send_signal(signal.SIGTERM)
                term_after_line = None
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(lines)


def _slurm_tasks(run: Path, ntasks: int, overrides: list[str], env: dict, timeout: float) -> tuple[int, str]:
    from hope_scale.parallel.launch import free_port, remove_deepspeed_shm

    port = free_port()
    procs = []
    for task in range(ntasks):
        task_env = dict(env, SLURM_PROCID=str(task), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(task),
                        SLURM_NTASKS_PER_NODE=f"{ntasks}(x1)", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(run / f"task{task}.log", "w")
        procs.append((subprocess.Popen(["bash", str(REPO / "launch" / "slurm_task.sh"), CPU_CONFIG, *overrides],
                                       cwd=run, env=task_env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    code = 0
    try:
        for p, _ in procs:
            code = code or p.wait(timeout=timeout)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
        remove_deepspeed_shm(port)
    return code, "".join((run / f"task{t}.log").read_text() for t in range(ntasks))


def metrics(run: Path) -> dict[int, dict]:
    """Per-step train metrics from metrics.jsonl (full precision)."""
    out = {}
    for line in (run / "tb" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row
    return out


def losses(run: Path, steps) -> list[float]:
    m = metrics(run)
    return [m[s]["train/loss"] for s in steps]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The embedded default command (no --config) with tiny overrides, uninterrupted: prepares the data."""
    root = tmp_path_factory.mktemp("pretrain")
    data = root / "data" / "builtin-byte-32"
    run = root / "reference"
    code, out = pretrain(run, data)
    assert code == 0, out[-4000:]
    return {"root": root, "data": data, "run": run, "out": out}


def test_embedded_default_runs_end_to_end(reference):
    run, out = reference["run"], reference["out"]
    assert "holds no dataset: preparing the built-in corpus" in out and str(reference["data"]) in out
    assert (reference["data"] / "hope_data.json").is_file()
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(step_lines) == STEPS and all("tok/s" in s and "MFU" in s and "ETA" in s for s in step_lines)
    assert sum(line.startswith("eval ") for line in out.splitlines()) == 2
    m = metrics(run)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[STEPS]["train/loss"] < m[1]["train/loss"] - 0.1  # it learns
    assert all(0 < m[s]["perf/mfu"] <= 1 and m[s]["perf/tokens_per_sec"] > 0 for s in m)  # logging.peak_flops set
    clipped = [m[s]["train/grad_norm"] > 1.0 for s in sorted(m)]  # optimizer.grad_clip 1.0
    assert [m[s]["train/clipped_fraction"] for s in sorted(m)] == [sum(clipped[:i + 1]) / (i + 1) for i in range(STEPS)]
    assert (f"fraction of clipped steps {sum(clipped) / STEPS:.3f} ({sum(clipped)} of {STEPS}, clip 1)"
            in out.splitlines()[-1])
    # TensorBoard event files with the scalars the issue asks for, incl. Hope memory-state statistics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/clipped_fraction", "perf/tokens_per_sec",
                "perf/mfu", "perf/peak_memory_gib", "eval/loss", "hope/layer0/eta", "hope/layer1/alpha",
                "hope/layer0/mem_w1_norm", "hope/layer1/mem_w2_norm"):
        assert tag in tags, tag
    assert len(acc.Scalars("train/loss")) == STEPS
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000004", "step_00000008"]
    manifest = json.loads((ckpt / "step_00000008" / "manifest.json").read_text())
    assert manifest["step"] == STEPS and manifest["tokens"] == STEPS * 4 * 32
    assert set(manifest["files"]) == {"rank_00000.safetensors", "trainer.json"}


def test_kill_and_preemption_then_resume_is_bit_exact(reference, tmp_path):
    """SIGKILL after step 5 (checkpoint 4 survives), resume; SIGTERM after step 6 (every rank saves at the next
    step boundary and exits 0), resume again, this time recomputing every block in backward
    (``train.activation_checkpointing=block``): steps 5-8 equal the uninterrupted run's bit for bit."""
    run = tmp_path / "killed"
    code, out = pretrain(run, reference["data"], kill_after_line="step      5/")
    assert code == -signal.SIGKILL, out[-3000:]
    assert (run / "ckpt" / "latest").read_text().strip() == "step_00000004"
    code, out = pretrain(run, reference["data"], term_after_line="step      6/")
    assert code == 0, out[-4000:]
    assert "resumed from" in out and "step_00000004 at step 4" in out
    stopped = int(out.split("train: stopping at step ")[1].split()[0])
    assert 6 <= stopped < STEPS
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{stopped:08d}"
    code, out = pretrain(run, reference["data"], extra=["train.activation_checkpointing=block"])
    assert code == 0, out[-4000:]
    assert f"at step {stopped} " in out
    ref, got = metrics(reference["run"]), metrics(run)
    for step in range(5, STEPS + 1):  # bit-exact on CPU: same losses and gradient norms
        assert got[step]["train/loss"] == ref[step]["train/loss"], step
        assert got[step]["train/grad_norm"] == ref[step]["train/grad_norm"], step
        assert got[step]["train/lr"] == ref[step]["train/lr"], step
        assert got[step]["train/clipped_fraction"] == ref[step]["train/clipped_fraction"], step
    assert got[STEPS]["progress/tokens"] == ref[STEPS]["progress/tokens"]


def test_corrupted_checkpoint_is_refused_and_previous_used(reference, tmp_path):
    run = tmp_path / "corrupt"
    shutil.copytree(reference["run"] / "ckpt", run / "ckpt")
    victim = run / "ckpt" / "step_00000008" / "rank_00000.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    code, out = pretrain(run, reference["data"])
    assert code == 0, out[-4000:]
    assert "REFUSING" in out and "step_00000008" in out and "truncated" in out
    assert "step_00000004 at step 4" in out
    assert losses(run, range(5, STEPS + 1)) == losses(reference["run"], range(5, STEPS + 1))
    assert (run / "ckpt" / "latest").read_text().strip() == "step_00000008"


def test_config_error_stops_before_any_work(tmp_path):
    code, out = pretrain(tmp_path / "bad", tmp_path / "data", extra=["parallel.tensor_parallel=3"])
    assert code == 2
    assert "parallel.tensor_parallel: model.n_heads=2 is not divisible by tensor_parallel=3" in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "bad" / "ckpt").exists()


@pytest.mark.slow
def test_resharded_resume_across_layouts_and_zero_stages(reference, tmp_path):
    """TP=2 x PP=2 (4 processes, ZeRO-1) saves at step 4; resumed at DP=2 with ZeRO-2 (2 processes), which saves
    at step 8; that resumed on 1 process with ZeRO-0. Each continuation matches the 4-process run's own losses
    (up to float reduction order: the layouts sum in different orders). The three runs go through the three
    launch scripts: SLURM tasks (as srun starts them), the multi-node script (a one-host hostfile) and the
    single-node script."""
    ten = ["train.max_steps=10"]  # the schedule depends on max_steps: every run of the chain uses the same
    a = tmp_path / "tp2pp2"
    code, out = pretrain(a, reference["data"], [*ten, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                                                "parallel.zero_stage=1"], nproc=4, launcher="slurm")
    assert code == 0, out[-4000:]
    # initial weights do not depend on the layout: step 1 equals the single-process run's
    assert metrics(a)[1]["train/loss"] == pytest.approx(metrics(reference["run"])[1]["train/loss"], rel=1e-6)
    b = tmp_path / "dp2-zero2"
    code, out = pretrain(b, reference["data"], [*ten, "parallel.zero_stage=2",
                                                f"checkpoint.resume={a / 'ckpt' / 'step_00000004'}"],
                         nproc=2, launcher="multi_node")
    assert code == 0, out[-4000:]
    assert "saved at TP=2 PP=2 DP=1 ZeRO-1 on 4 process(es), now TP=1 PP=1 DP=2 ZeRO-2 on 2" in out
    assert losses(b, range(5, 11)) == pytest.approx(losses(a, range(5, 11)), rel=2e-5)
    c = tmp_path / "single"
    code, out = pretrain(c, reference["data"], [*ten, f"checkpoint.resume={b / 'ckpt' / 'step_00000008'}"],
                         nproc=1, launcher="single_node")
    assert code == 0, out[-4000:]
    assert "saved at TP=1 PP=1 DP=2 ZeRO-2 on 2 process(es), now TP=1 PP=1 DP=1 ZeRO-0 on 1" in out
    assert losses(c, (9, 10)) == pytest.approx(losses(a, (9, 10)), rel=2e-5)


@pytest.mark.parametrize("key", ["checkpoint.dir", "logging.dir"])
def test_unwritable_folder_stops_before_any_work(tmp_path, key):
    """A checkpoint or log folder that cannot be written (here a file is in the way; a read-only or full
    filesystem fails the same probe) is found at start-up, before data preparation or any step."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    code, out = pretrain(tmp_path / "run", tmp_path / "data", extra=[f"{key}={tmp_path / 'blocker' / 'sub'}"])
    assert code == 2, out[-3000:]
    assert f"{key}: cannot write to {tmp_path / 'blocker' / 'sub'}" in out
    assert not (tmp_path / "data").exists() and "step " not in out


def test_non_finite_update_is_never_saved(reference, tmp_path):
    """lr 1e38 from step 8 on: within a few steps an update makes the state unusable (a non-finite loss or
    gradient norm, weights that give a non-finite loss, or non-finite tensors). No such state is saved: every
    checkpoint written is finite, `latest` stays at the last good one and the run stops naming it. (With the
    bounded inner update, a 1e38 step can leave finite but useless weights that fail one step later: the run is
    then resumed, with a sane learning rate, from the checkpoint before the learning-rate change.)"""
    run = tmp_path / "diverged"
    shutil.copytree(reference["run"] / "ckpt", run / "ckpt")
    code, out = pretrain(run, reference["data"], extra=["train.max_steps=14", "checkpoint.every_steps=1",
                                                         "optimizer.lr=1e38", "schedule.kind=constant"])
    assert code == 1, out[-3000:]
    good = Path(re.search(r"The last good checkpoint is (\S+?)\.?$", out, re.M).group(1))
    assert good.parent == run / "ckpt" and (run / "ckpt" / "latest").read_text().strip() == good.name
    last_good = int(good.name.split("_")[1])
    assert 8 <= last_good < 14 and f"step {last_good + 1}" in out
    saved = sorted(p.name for p in (run / "ckpt").iterdir() if p.name.startswith("step_"))
    assert saved[-1] == good.name  # nothing after the last good state
    m = metrics(run)
    assert all(math.isfinite(m[s]["train/loss"]) for s in m if s <= last_good)
    before = run / "ckpt" / "step_00000008"
    code, out = pretrain(run, reference["data"], extra=["train.max_steps=15", f"checkpoint.resume={before}",
                                                         f"checkpoint.dir={tmp_path / 'resumed'}"])
    assert code == 0, out[-3000:]
    assert "step_00000008 at step 8" in out


def test_mistyped_data_path_is_not_filled_with_the_builtin_corpus(tmp_path):
    """data.prepare_builtin (on in the default config) fills only a folder named builtin-<tokenizer>-<seq_len>:
    a mistyped path to a real dataset stops the run, naming data.path, instead of training on the built-in corpus."""
    code, out = pretrain(tmp_path / "run", tmp_path / "data" / "fineweb-edu-32k-4096")
    assert code == 2, out[-3000:]
    assert f"data.path: {tmp_path / 'data' / 'fineweb-edu-32k-4096'} holds no prepared dataset" in out
    assert "fills only a folder named builtin-byte-32" in out
    assert not (tmp_path / "data").exists() and "preparing" not in out


def test_restart_after_the_whole_job_is_killed(reference, tmp_path):
    """kill -9 of the whole process group (scancel, preemption, a cgroup OOM kill) before the first evaluation
    leaves streaming's shared memory of the validation loader behind; the restart removes it and resumes."""
    run = tmp_path / "group-killed"
    every2 = ["checkpoint.every_steps=2"]
    code, out = pretrain(run, reference["data"], extra=every2, kill_after_line="step      3/")
    assert code == -signal.SIGKILL, out[-3000:]
    assert (run / "ckpt" / "latest").read_text().strip() == "step_00000002"
    code, out = pretrain(run, reference["data"], extra=every2)
    assert code == 0, out[-4000:]  # used to fail: "ValueError: Reused local directory ... /val"
    assert "removed 1 stale shared-memory registration(s) of a killed job" in out
    assert "step_00000002 at step 2" in out
    assert losses(run, range(3, STEPS + 1)) == losses(reference["run"], range(3, STEPS + 1))


def test_corrupt_validation_shard_is_found_before_step_1(reference, tmp_path):
    """Every split the run reads is verified at start-up: a corrupt validation shard stops the run before any
    step (it used to be found at the first evaluation, losing the steps since the last save)."""
    data = tmp_path / "data" / "builtin-byte-32"
    shutil.copytree(reference["data"], data)
    shard = sorted((data / "val").glob("shard.*"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, out = pretrain(tmp_path / "run", data)
    assert code == 2, out[-3000:]
    assert f"{data / 'val'}: 1 shard(s) differ from what prepare-data wrote, found before training" in out
    assert f"{shard.name}: xxh64 checksum mismatch" in out
    assert "step      1/" not in out and not list((tmp_path / "run" / "ckpt").iterdir())


_FAKE_SLURM = {  # stand-ins for the SLURM commands launch/slurm.sbatch calls, on one host
    "srun": """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done  # srun's own options
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_NTASKS_PER_NODE=1
setsid "$@" &  # one task, in its own process group (slurmd signals every process of a step)
echo $! > "$FAKE_SLURM/task"
wait $!
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_SLURM/calls"
[[ $1 == --signal=TERM ]] && kill -TERM -- "-$(cat "$FAKE_SLURM/task")"
""",
    "scontrol": """#!/usr/bin/env bash
if [[ $1 == show ]]; then echo localhost; else echo "scontrol $*" >> "$FAKE_SLURM/calls"; fi
""",
}


def test_slurm_job_saves_and_requeues_itself_before_the_time_limit(reference, tmp_path):
    """launch/slurm.sbatch under stand-ins for srun / scancel / scontrol: SLURM's USR1 before the time limit makes
    the tasks save and stop, the job requeues itself, and the requeued job (the script run again) finishes the
    run from that checkpoint with the uninterrupted run's losses."""
    from hope_scale.parallel.launch import free_port

    fake = tmp_path / "slurm"
    (fake / "bin").mkdir(parents=True)
    for name, text in _FAKE_SLURM.items():
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    run = tmp_path / "job"
    run.mkdir()
    env = dict(_env(run), PATH=f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM=str(fake),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO),
               MASTER_PORT=str(free_port()))
    cmd = ["bash", str(REPO / "launch" / "slurm.sbatch"), CPU_CONFIG, *_run_args(run, reference["data"])]

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step      3/"):
                proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 does
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    stopped = int(out.split("train: stopping at step ")[1].split()[0])
    assert 3 <= stopped < STEPS and (run / "ckpt" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert (fake / "calls").read_text().splitlines() == ["scancel --signal=TERM 4242", "scontrol requeue 4242"]

    requeued = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-4000:]
    assert f"at step {stopped} " in requeued.stdout
    assert (fake / "calls").read_text().splitlines() == ["scancel --signal=TERM 4242", "scontrol requeue 4242"]
    assert losses(run, range(stopped + 1, STEPS + 1)) == losses(reference["run"], range(stopped + 1, STEPS + 1))


def test_failed_saves_keep_training_and_leave_nothing_behind(reference, tmp_path):
    """Writes that fail as on a full disk (no file may exceed 300 KB; a checkpoint is ~550 KB): each save is
    reported, its partial folder removed and `latest` left alone; training continues after the periodic save, and
    the failed last save ends the run with exit code 1."""
    run = tmp_path / "full"
    shutil.copytree(reference["run"] / "cache", run / "cache")  # the shard cache is already filled
    code, out = pretrain(run, reference["data"], max_file_bytes=300_000)
    assert code == 1, out[-3000:]
    assert "checkpoint step 4 NOT saved: rank 0 could not write" in out and "File too large" in out
    assert "removed the partial folder, latest is still none. Training continues; the next save is at step 8" in out
    assert "step      8/8" in out and "checkpoint step 8 NOT saved" in out
    assert out.rstrip().endswith("This run has no checkpoint yet.")
    assert list((run / "ckpt").iterdir()) == []


def test_write_cost_starts_at_its_step_and_ramps(reference, tmp_path):
    """``schedule.write_cost_from_step=4``: the first 4 updates are those of a run without the cost (the same
    losses through step 5, whose forward is the weights after them), the later ones are not; the start is logged.
    With ``write_cost_ramp_steps=3`` as well, update 4 charges a third of the cost: loss 6 differs from the
    unramped run's."""
    data = reference["data"]
    runs = {}
    for name, extra in (("ramped", ["model.write_cost=0.5", "schedule.write_cost_from_step=4",
                                    "schedule.write_cost_ramp_steps=3"]),
                        ("delayed", ["model.write_cost=0.5", "schedule.write_cost_from_step=4"]),
                        ("off", ["model.write_cost=0"])):
        code, out = pretrain(tmp_path / name, data, [*extra, "checkpoint.every_steps=0", "train.eval_every=0"])
        assert code == 0, out[-4000:]
        runs[name] = (losses(tmp_path / name, range(1, STEPS + 1)), out)
    (ramped, ramped_out), (delayed, out), (off, _) = runs["ramped"], runs["delayed"], runs["off"]
    assert "model.write_cost 0.5 on from step 4 (schedule" in out
    assert "model.write_cost 0.5 on from step 4, rising to it over 3 steps" in ramped_out
    assert delayed[:5] == off[:5] == ramped[:5]
    assert all(a != b for a, b in zip(delayed[5:], off[5:]))
    assert all(a not in (b, c) for a, b, c in zip(ramped[5:], delayed[5:], off[5:]))
