"""Streaming loader: round trip, DP partition, exact and elastic resumption, mixtures, validation, corrupt shards.

Several data-parallel ranks are simulated in one process by giving each rank its own cache folder
(as if each ran on its own node); tests/test_data_multirank.py runs real processes.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from data_prep.prepare import PrepareConfig, prepare_dataset
from hope_scale.data.loader import DataConfigError, ShardError, build_train_loader, build_val_loader
from hope_scale.data.tokenizer import load_tokenizer
from tests.test_data_support import (  # noqa: F401
    N_SAMPLES,
    SEQ,
    clean_shared_memory,
    flat,
    paragraphs,
    run_ranks,
    sample_keys,
    small_dataset,
    streaming_tmp,
    write_docs,
)

pytestmark = pytest.mark.usefixtures("clean_shared_memory", "streaming_tmp")

def test_round_trip_text_to_batches(tmp_path, shakespeare):
    docs = paragraphs(shakespeare, 30)
    write_docs(tmp_path / "in", docs)
    prepare_dataset(PrepareConfig(out=tmp_path / "data", inputs=[str(tmp_path / "in")], seq_len=SEQ,
                                  val_fraction=0.0, shard_size_mb=0.004, workers=1, quiet=True))
    tokens = []
    with build_train_loader({"path": str(tmp_path / "data"), "shuffle": False, "num_workers": 0,
                             "cache_dir": str(tmp_path / "cache")}, seq_len=SEQ, micro_batch_size=4) as loader:
        for _ in range(loader.batches_per_epoch):
            input_ids, labels = next(loader)
            assert input_ids.shape == labels.shape == (4, SEQ) and str(input_ids.dtype) == "torch.int64"
            assert (input_ids[:, 1:] == labels[:, :-1]).all()  # labels are the inputs shifted by one
            for x, y in zip(input_ids, labels):
                tokens += (x.tolist() + [int(y[-1])]) if not tokens else y.tolist()
    assert loader.dataset is None  # closed on leaving the block
    tok = load_tokenizer("byte")
    texts = tok.decode(tokens, skip_special_tokens=False).split("<|endoftext|>")
    assert texts[:-1] == docs[: len(texts) - 1] and docs[len(texts) - 1].startswith(texts[-1])
    assert len(texts) > 25


def test_shuffled_epoch_covers_every_sample_once_and_ranks_are_disjoint(small_dataset, tmp_path):
    steps, state = run_ranks(small_dataset, tmp_path, "dp2", dp=2, batch=4, steps=N_SAMPLES // 8)
    assert Counter(flat(steps)) == Counter(flat(run_ranks(small_dataset, tmp_path, "seq", dp=1, batch=8, steps=12,
                                                          shuffle=False)[0]))
    assert len(set(flat(steps))) == N_SAMPLES
    assert state["epoch"] == 0 and state["sample_in_epoch"] == N_SAMPLES
    again, _ = run_ranks(small_dataset, tmp_path, "dp2-again", dp=2, batch=4, steps=N_SAMPLES // 8)
    assert again == steps  # same seed, same order
    other_seed = build_train_loader({"path": str(small_dataset), "num_workers": 0, "cache_dir": str(tmp_path / "c")},
                                    seq_len=SEQ, micro_batch_size=8, seed=18)
    assert sample_keys(*next(other_seed)) != flat(run_ranks(small_dataset, tmp_path, "dp1", dp=1, batch=8, steps=1)[0])
    other_seed.close()


@pytest.mark.parametrize("stop", [5, 12, 14])  # mid-epoch, exactly at the epoch boundary, inside epoch 2
def test_exact_resume(small_dataset, tmp_path, stop):
    total = 20  # 12 steps per epoch (96 samples / (2 ranks * 4))
    full, _ = run_ranks(small_dataset, tmp_path, "full", dp=2, batch=4, steps=total)
    before, state = run_ranks(small_dataset, tmp_path, "before", dp=2, batch=4, steps=stop)
    after, _ = run_ranks(small_dataset, tmp_path, "after", dp=2, batch=4, steps=total - stop, state=state)
    assert before + after == full
    assert set(flat(full[12:])) <= set(flat(full[:12])) and flat(full[12:]) != flat(full[:8])  # epoch 2 is reshuffled


@pytest.mark.parametrize("dp_before, batch_before, steps_before, dp_after, batch_after", [
    (2, 4, 3, 1, 8),  # shrink, same global batch
    (1, 4, 6, 3, 4),  # grow
    (2, 4, 5, 4, 2),  # grow, same global batch
])
def test_elastic_resume_continues_the_epoch_without_repeats_or_gaps(
    small_dataset, tmp_path, dp_before, batch_before, steps_before, dp_after, batch_after
):
    reference, _ = run_ranks(small_dataset, tmp_path, "ref", dp=2, batch=4, steps=12)  # uninterrupted epoch
    before, state = run_ranks(small_dataset, tmp_path, "b", dp=dp_before, batch=batch_before, steps=steps_before)
    seen = dp_before * batch_before * steps_before
    assert state["sample_in_epoch"] == seen
    rest = (N_SAMPLES - seen) // (dp_after * batch_after)
    after, end_state = run_ranks(small_dataset, tmp_path, "a", dp=dp_after, batch=batch_after, steps=rest, state=state)
    assert Counter(flat(before) + flat(after)) == Counter(flat(reference))
    assert end_state["epoch"] == 0 and end_state["sample_in_epoch"] == N_SAMPLES


def test_mixture_follows_proportions(tmp_path, shakespeare):
    for name, text in [("lower", shakespeare[:20_000].lower()), ("upper", shakespeare[20_000:40_000].upper())]:
        write_docs(tmp_path / name, [text])
        prepare_dataset(PrepareConfig(out=tmp_path / f"data-{name}", inputs=[str(tmp_path / name)], seq_len=SEQ,
                                      val_fraction=0.0, workers=1, quiet=True))
    cfg = {"streams": [{"path": str(tmp_path / "data-lower"), "proportion": 3}, {"path": str(tmp_path / "data-upper"), "proportion": 1}],
           "epoch_size": 400, "num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    upper = 0
    with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=8, seed=3) as loader:
        assert loader.samples_per_epoch == 400 and loader.batches_per_epoch == 50
        for _ in range(50):
            input_ids, _ = next(loader)
            upper += sum(1 for row in input_ids if not any(97 <= t <= 122 for t in row.tolist()))
    assert upper == 100  # 1/4 of the epoch from the upper-case stream


def test_val_loader_is_finite_fixed_and_split_over_ranks(tmp_path, shakespeare):
    write_docs(tmp_path / "in", paragraphs(shakespeare, 400, min_chars=100))
    prepare_dataset(PrepareConfig(out=tmp_path / "data", inputs=[str(tmp_path / "in")], seq_len=SEQ,
                                  val_fraction=0.25, workers=1, quiet=True))
    passes = []
    for rank in range(2):
        val = build_val_loader({"path": str(tmp_path / "data"), "num_workers": 0, "cache_dir": str(tmp_path / f"c{rank}")},
                               seq_len=SEQ, micro_batch_size=4, dp_rank=rank, dp_world_size=2)
        first = [k for batch in val for k in sample_keys(*batch)]
        assert first == [k for batch in val for k in sample_keys(*batch)] and len(first) == 4 * len(val) > 0
        passes.append(first)
        val.close()
    assert not set(passes[0]) & set(passes[1])
    with build_val_loader({"path": str(tmp_path / "data"), "num_workers": 0, "cache_dir": str(tmp_path / "c9")},
                          seq_len=SEQ, micro_batch_size=4, max_batches=2) as limited:
        assert len(limited) == 2 and len(list(limited)) == 2


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_refused_when_the_loader_is_built(small_dataset, tmp_path):
    """Every shard of the split is checked when the loader is built (before a run's first step)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_dataset, bad)
    shard = sorted((bad / "train").glob("shard.*.mds.zstd"))[1]
    _flip_a_byte(shard)
    with pytest.raises(ShardError, match=rf"bad/train: 1 shard\(s\) differ .* found before training: .*{shard.name}: "
                                         "xxh64 checksum mismatch"):
        build_train_loader({"path": str(bad), "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
                           seq_len=SEQ, micro_batch_size=4)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shard_corrupted_after_start_is_refused_when_fetched(small_dataset, tmp_path, num_workers):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_dataset, bad)
    loader = build_train_loader({"path": str(bad), "shuffle": False, "num_workers": num_workers,
                                 "cache_dir": str(tmp_path / "cache")}, seq_len=SEQ, micro_batch_size=4)
    shard = sorted((bad / "train").glob("shard.*.mds.zstd"))[1]
    _flip_a_byte(shard)  # after the start-up check: streaming's check on the way into the cache finds it
    with pytest.raises(ShardError, match=rf"{shard.name} of .*bad/train is unusable: Checksum failure"):
        for _ in range(N_SAMPLES // 4):
            next(loader)
    loader.close()


def test_configuration_errors(small_dataset, tmp_path):
    cfg = {"path": str(small_dataset), "num_workers": 0, "cache_dir": str(tmp_path / "c")}
    with pytest.raises(DataConfigError, match="prepare the data again with --seq-len 64"):
        build_train_loader(cfg, seq_len=64, micro_batch_size=2)
    with pytest.raises(DataConfigError, match="unknown data config keys"):
        build_train_loader({**cfg, "shufle": True}, seq_len=SEQ, micro_batch_size=2)
    with pytest.raises(DataConfigError, match="dp_rank 2 is not in"):
        build_train_loader(cfg, seq_len=SEQ, micro_batch_size=2, dp_rank=2, dp_world_size=2)
    with pytest.raises(DataConfigError, match="not a dataset prepared"):
        build_train_loader({**cfg, "path": str(tmp_path)}, seq_len=SEQ, micro_batch_size=2)
    with pytest.raises(DataConfigError, match="split is empty"):
        build_val_loader(cfg, seq_len=SEQ, micro_batch_size=2)


def test_corrupted_cache_copy_is_verified_and_fetched_again(small_dataset, tmp_path, capsys):
    """A cached copy of a shard that was corrupted after it entered the cache is checked against the index when
    the next loader is built, removed and fetched again: the batches are the right ones, not garbage."""
    cfg = {"path": str(small_dataset), "shuffle": False, "num_workers": 0, "cache_dir": str(tmp_path / "cache")}

    def epoch():
        loader = build_train_loader(cfg, seq_len=SEQ, micro_batch_size=4)
        keys = [k for _ in range(N_SAMPLES // 4) for k in sample_keys(*next(loader))]
        loader.close()
        return keys

    first = epoch()
    cached = sorted((tmp_path / "cache").glob("*/train/shard.*.mds"))
    assert len(cached) > 1
    _flip_a_byte(cached[1])
    capsys.readouterr()
    assert epoch() == first
    assert f"{cached[1]}: cached copy fails its xxh64 check (corrupted); removed" in capsys.readouterr().out


def _open_shared_memory() -> set[str]:
    """Names of the shared-memory segments this process holds a file descriptor to (Linux: /proc/self/fd)."""
    names = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed while listing (the listing's own descriptor)
            continue
        if target.startswith("/dev/shm/"):
            names.add(target.removeprefix("/dev/shm/").removesuffix(" (deleted)"))
    return names


def test_close_frees_the_datasets_shared_memory_at_once(small_dataset, tmp_path):
    """streaming frees a dataset's shared memory only at process exit (one file descriptor per segment): a process
    that builds many loaders ran out of descriptors. ``close()`` stops the download threads, closes every segment
    and unlinks those it created, so its registration is gone from /dev/shm and a new loader can take its place."""
    from hope_scale.data.loader import _shared_segments

    cfg = {"path": str(small_dataset), "num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=4) as loader:
        next(loader)  # download threads running, mid-epoch
        ours = {segment.shm.name.lstrip("/") for segment in _shared_segments(loader.dataset)}
        assert len(ours) >= 6 and ours <= _open_shared_memory()  # locals, barrier, shard states, ...
    assert not ours & _open_shared_memory()
    assert not [name for name in ours if (Path("/dev/shm") / name).exists()]
    with build_train_loader(cfg, seq_len=SEQ, micro_batch_size=4) as again:  # same cache folder, same process
        assert len(sample_keys(*next(again))) == 4


_HOLD_A_LOADER = """
import signal, sys, time
from hope_scale.data.loader import build_train_loader
loader = build_train_loader({"path": sys.argv[1], "num_workers": 0, "cache_dir": sys.argv[2]}, seq_len=32,
                            micro_batch_size=4)
print("ready", flush=True)  # built, never iterated: like a validation loader before the first evaluation
time.sleep(600)
"""


def test_cache_is_one_jobs_and_a_killed_jobs_shared_memory_is_cleaned(small_dataset, tmp_path, capsys):
    """While a job runs, a second job on its cache folder is refused naming data.cache_dir; once its process
    group is killed with SIGKILL (its shared memory left behind), a new job on that folder starts; another job running on its
    own cache folder the whole time is not disturbed."""
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    ours = {"path": str(small_dataset), "num_workers": 0, "cache_dir": str(tmp_path / "ours")}
    other = build_train_loader({**ours, "cache_dir": str(tmp_path / "other")}, seq_len=SEQ, micro_batch_size=4)
    before = sample_keys(*next(other))
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    job = subprocess.Popen([sys.executable, "-c", _HOLD_A_LOADER, str(small_dataset), str(tmp_path / "ours")],
                           stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert job.stdout.readline().strip() == "ready"
        with pytest.raises(DataConfigError, match=rf"data.cache_dir: the shard cache .*ours.* is in use by another "
                                                  rf"running process \(pid {job.pid}\)"):
            build_train_loader(ours, seq_len=SEQ, micro_batch_size=4)
    finally:  # the whole process group, as scancel or an OOM kill does (python's resource tracker included)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    capsys.readouterr()
    restarted = build_train_loader(ours, seq_len=SEQ, micro_batch_size=4)  # used to fail: "Reused local directory"
    assert "removed 1 stale shared-memory registration(s) of a killed job" in capsys.readouterr().out
    assert len(sample_keys(*next(restarted))) == 4
    assert len(sample_keys(*next(other))) == 4 and before  # the other job keeps going
    restarted.close()
    other.close()
