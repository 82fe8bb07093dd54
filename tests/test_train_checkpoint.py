"""CheckpointManager: atomic sharded saves, checksums verified on load, fallback to the previous valid one."""

import json
import multiprocessing
import os
import signal

import pytest
import torch

from hope_scale.train.checkpoint import (FORMAT, LATEST, MANIFEST, TRAINER_FILE, CheckpointError, CheckpointManager,
                                        NonFiniteStateError, SaveFailedError, capture_rng, rank_file, restore_rng,
                                        step_dir_name)


def _payload(step):
    return {"engine": {"w": torch.full((64, 64), float(step))}, "rng": capture_rng()}


def _save(mgr, step):
    return mgr.save(step, _payload(step), {"step": step, "data": {"epoch": 0, "sample_in_epoch": step}},
                    meta={"tokens": step * 10})


def _messages():
    out = []
    return out, out.append


def test_round_trip_manifest_latest_and_pruning(tmp_path):
    msgs, log = _messages()
    mgr = CheckpointManager(tmp_path, keep_last_n=2, log=log)
    for step in (1, 2, 3):
        _save(mgr, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, step_dir_name(2), step_dir_name(3)]
    assert (tmp_path / LATEST).read_text().strip() == step_dir_name(3)
    manifest = json.loads((tmp_path / step_dir_name(3) / MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and manifest["tokens"] == 30
    assert set(manifest["files"]) == {rank_file(0), TRAINER_FILE}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    loaded = mgr.load()
    assert loaded.step == 3 and loaded.trainer["data"]["sample_in_epoch"] == 3
    assert torch.equal(loaded.rank_part(0)["engine"]["w"], torch.full((64, 64), 3.0))
    assert [p["engine"]["w"][0, 0].item() for p in loaded.rank_parts()] == [3.0]


def test_empty_root_has_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path / "none").load() is None
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointManager(tmp_path).load(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_latest_is_refused_and_previous_used(tmp_path, damage):
    msgs, log = _messages()
    mgr = CheckpointManager(tmp_path, keep_last_n=3, log=log)
    _save(mgr, 1)
    _save(mgr, 2)
    newest = tmp_path / step_dir_name(2)
    victim = newest / rank_file(0)
    if damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        expect = "truncated"
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        expect = "sha256"
    elif damage == "delete":
        victim.unlink()
        expect = "is missing"
    else:
        (newest / MANIFEST).write_text("{not json")
        expect = "not valid JSON"
    loaded = mgr.load()
    assert loaded.step == 1
    assert torch.equal(loaded.rank_part(0)["engine"]["w"], torch.full((64, 64), 1.0))
    refusal = [m for m in msgs if "REFUSING" in m]
    assert len(refusal) == 1 and str(newest) in refusal[0] and expect in refusal[0]
    assert any("newest valid" in m for m in msgs)
    # an explicit path to the damaged checkpoint is refused outright
    with pytest.raises(CheckpointError, match="failed verification"):
        mgr.load(newest)


def test_all_damaged_is_an_error(tmp_path):
    mgr = CheckpointManager(tmp_path, log=lambda m: None)
    _save(mgr, 1)
    (tmp_path / step_dir_name(1) / TRAINER_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="all failed verification"):
        mgr.load()


def _save_and_die(root, stage):
    def hook(point):
        if point == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    mgr = CheckpointManager(root, keep_last_n=5, log=lambda m: None)
    mgr.save(2, _payload(2), {"step": 2}, _hook=hook)


@pytest.mark.parametrize("stage", ["rank_file_written", "before_rename", "before_latest"])
def test_kill_mid_save_keeps_previous_checkpoint(tmp_path, stage):
    mgr = CheckpointManager(tmp_path, keep_last_n=5, log=lambda m: None)
    _save(mgr, 1)
    proc = multiprocessing.get_context("fork").Process(target=_save_and_die, args=(tmp_path, stage))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    assert (tmp_path / LATEST).read_text().strip() == step_dir_name(1)
    loaded = mgr.load()
    assert loaded.step == 1 and loaded.rank_part(0)["engine"]["w"][0, 0].item() == 1.0
    # the next save cleans up and completes
    _save(mgr, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert mgr.load().step == 2


def test_resave_over_a_corrupt_step(tmp_path):
    mgr = CheckpointManager(tmp_path, log=lambda m: None)
    _save(mgr, 1)
    _save(mgr, 2)
    (tmp_path / step_dir_name(2) / rank_file(0)).write_bytes(b"x")
    assert mgr.load().step == 1  # resumed from 1 ...
    _save(mgr, 2)  # ... and the run reaches step 2 again
    assert mgr.load().step == 2 and CheckpointManager.verify(tmp_path / step_dir_name(2)) == []


def test_rng_round_trip():
    import random

    import numpy as np

    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class _CreatesFile:
    """Unpickling this object creates ``path``: what a malicious checkpoint could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(root, marker, fmt):
    """A checkpoint folder whose files are pickles that would create ``marker``, with a manifest that matches them
    (the sha256s live in the same folder, so whoever hands over the folder controls them too)."""
    import hashlib

    folder = root / step_dir_name(1)
    folder.mkdir(parents=True)
    evil = {"engine": _CreatesFile(marker), "step": 1, "tokens": 0, "data": {}}
    if fmt == "v1":  # the pickle-based format: rank_00000.pt and trainer.pt
        names = {"rank_00000.pt": evil, "trainer.pt": evil}
    else:  # today's file names, a pickle where the safetensors rank file belongs
        names = {rank_file(0): evil, TRAINER_FILE: None}
    files = {}
    for name, obj in names.items():
        if obj is None:
            (folder / name).write_text(json.dumps({"step": 1, "tokens": 0, "data": {}}))
        else:
            torch.save(obj, folder / name)
        data = (folder / name).read_bytes()
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    fmt_name = "hope-scale/checkpoint/v1" if fmt == "v1" else FORMAT
    (folder / MANIFEST).write_text(json.dumps({"format": fmt_name, "step": 1, "world_size": 1, "files": files,
                                               "config": {"data": {}}}))
    (root / LATEST).write_text(step_dir_name(1) + "\n")
    return folder


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_crafted_checkpoint_cannot_run_code(tmp_path, fmt, capsys):
    """A checkpoint whose pickle would create a file is refused with a clear message by every loader (pretrain
    --resume, eval, generate), and nothing is created."""
    from hope_scale.cli import main
    from hope_scale.eval.checkpoint_io import CheckpointError as EvalCheckpointError
    from hope_scale.eval.checkpoint_io import load_checkpoint

    marker = tmp_path / "pwned"
    root = tmp_path / "ckpt"
    folder = _crafted_checkpoint(root, marker, fmt)
    msgs, log = _messages()
    expect = "pickled files, which can run code" if fmt == "v1" else "not a safetensors file"
    with pytest.raises(CheckpointError) as err:
        loaded = CheckpointManager(root, log=log).load(folder)  # what pretrain --resume does ...
        next(loaded.rank_parts())  # ... and then it reads the rank files
    assert expect in str(err.value) + " ".join(msgs)
    with pytest.raises(EvalCheckpointError, match=expect):
        load_checkpoint(root)
    assert main(["generate", "--checkpoint", str(root), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    assert expect in capsys.readouterr().err
    assert not marker.exists()


def test_non_finite_state_is_never_saved(tmp_path):
    mgr = CheckpointManager(tmp_path, log=lambda m: None)
    _save(mgr, 1)
    payload = _payload(2)
    payload["engine"]["w"][3, 5] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"step 2 not saved: engine\.w holds NaN or infinity .*latest is "
                                                  r"still " + step_dir_name(1)):
        mgr.save(2, payload, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, step_dir_name(1)]
    assert mgr.load().step == 1


def test_failed_write_leaves_nothing_and_keeps_latest(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) removes the partial folder, says so, keeps `latest` and the
    previous checkpoint; the caller's state is untouched and a later save works."""
    import errno

    from hope_scale.train import checkpoint as ckpt

    msgs, log = _messages()
    mgr = CheckpointManager(tmp_path, keep_last_n=2, log=log)
    _save(mgr, 1)
    real_save_tree = ckpt.save_tree

    def disk_full(tree, path):
        path.write_bytes(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_tree", disk_full)
    payload = _payload(2)
    with pytest.raises(SaveFailedError, match=r"step 2 NOT saved: .*No space left on device.*removed the partial "
                                              r"folder, latest is still " + step_dir_name(1)):
        mgr.save(2, payload, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, step_dir_name(1)]
    assert torch.equal(payload["engine"]["w"], torch.full((64, 64), 2.0))
    assert mgr.load().step == 1
    monkeypatch.setattr(ckpt, "save_tree", real_save_tree)
    _save(mgr, 2)
    assert mgr.load().step == 2


def test_short_space_prunes_only_what_keep_last_n_allows(tmp_path, monkeypatch):
    """With less free space than a checkpoint needs, the checkpoints keep_last_n would delete after the save are
    deleted before it (never the newest); if that is not enough, nothing is written."""
    from collections import namedtuple

    from hope_scale.train import checkpoint as ckpt

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage",  # 400 bytes taken per checkpoint on a 1000-byte disk
                        lambda p: usage(1000, 0, 1000 - 400 * len(list(tmp_path.glob("step_*")))))
    msgs, log = _messages()
    mgr = CheckpointManager(tmp_path, keep_last_n=2, log=log)
    for step in (1, 2):
        _save(mgr, step)
    mgr.save(3, _payload(3), {"step": 3}, need_bytes=300)  # 200 free: step 1 goes first, as keep_last_n=2 allows
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [step_dir_name(2), step_dir_name(3)]
    assert any("removing step_00000001 before writing" in m for m in msgs)
    lone = CheckpointManager(tmp_path / "lone", keep_last_n=1, log=log)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(1000, 0, 600))
    _save(lone, 1)
    with pytest.raises(SaveFailedError, match="allows no further deletion"):
        lone.save(2, _payload(2), {"step": 2}, need_bytes=700)
    assert lone.load().step == 1 and sorted(p.name for p in (tmp_path / "lone").iterdir()) == [LATEST, step_dir_name(1)]


def test_preflight_finds_unwritable_folders_and_short_space(tmp_path, monkeypatch):
    from collections import namedtuple

    from hope_scale.model import ConfigError
    from hope_scale.train import checkpoint as ckpt
    from hope_scale.train.preflight import check_checkpoint_space, check_writable

    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ConfigError, match=r"checkpoint.dir: cannot write to .*file/ckpt"):
        check_writable(tmp_path / "file" / "ckpt", "checkpoint.dir")
    check_writable(tmp_path / "new" / "ckpt", "checkpoint.dir")  # created, and nothing left in it
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []
    mgr = CheckpointManager(tmp_path / "new" / "ckpt", keep_last_n=1)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10, 5, 5 * 2**30))
    check_checkpoint_space(mgr, 4 * 2**30)
    with pytest.raises(ConfigError, match=r"checkpoint.dir: .* room for 5.00 GiB .* needs about 16.00 GiB"):
        check_checkpoint_space(mgr, 16 * 2**30)
