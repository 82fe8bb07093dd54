"""Streaming loader: ``(input_ids, labels)`` batches from prepared MDS datasets, resumable and elastic.

API::

    loader = build_train_loader(data_cfg, seq_len=1024, micro_batch_size=8,
                                dp_rank=dp_rank, dp_world_size=dp_size, seed=1234)
    input_ids, labels = next(loader)      # LongTensor [micro_batch_size, seq_len] each; endless (epoch after epoch)
    state = loader.state_dict()           # small JSON-able dict, identical on every rank: save it in the checkpoint
    loader.load_state_dict(state)         # on a fresh loader, before the first batch: continue exactly there
    loader.close()                        # release shared memory (also done by the garbage collector)

    val = build_val_loader(data_cfg, seq_len=1024, micro_batch_size=8, dp_rank=dp_rank, dp_world_size=dp_size)
    for input_ids, labels in val: ...     # one pass over the validation split, the same batches every time

``data_cfg`` is a ``DataConfig`` or a dict with its fields, e.g. ``{"path": "data/shakespeare"}`` or a
mixture ``{"streams": [{"path": "s3://bucket/web", "proportion": 0.8}, {"path": "data/code", "proportion": 0.2}]}``.
A path is the root of a dataset written by ``hope-scale prepare-data`` (holding ``train/`` and ``val/``),
local or remote (s3://, gs://, ...). Shards are copied (downloaded) into ``cache_dir`` and checked
against the xxh64 hashes of the index on the way, so a corrupt shard stops the run with a
"Checksum failure" error instead of feeding garbage; local data needs no network.

Verified when a loader is built, i.e. at start-up before the first step (``hope_scale.data.cache``): every
shard of a local dataset's split against its index (a corrupt validation shard is found before training, not
at the first evaluation), and every copy already in the cache (a bad one is removed and fetched again). The
cache folder is locked for the job, and streaming's shared memory left by a killed job on the same folder is
removed, so a restart after ``kill -9`` of the whole job works.

Parallel layout: the loader only takes the data-parallel rank and size. Every process of one DP
replica (all its tensor- and pipeline-parallel ranks) passes the same ``dp_rank`` and so receives
the same batches; different DP ranks receive disjoint samples. Internally, mosaicml-streaming
coordinates the processes of a node through the launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE`` (``LOCAL_SIZE`` from the DeepSpeed launcher is accepted), while the samples are
partitioned over the ``dp_world_size`` DP ranks only. Every process of the job must build its loader
(collective), as with any ``torch.distributed`` code.

Resumption: ``state_dict()`` records the epoch, the number of samples consumed in it by all DP
ranks together, and the shuffle settings. A resumed run yields exactly the batches the uninterrupted
run would have; resumed with another ``dp_world_size`` (and ``micro_batch_size``), it continues the
same epoch with the samples not consumed yet, none repeated or skipped.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import tempfile
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.world import World

from .cache import CacheInUseError, claim, clean_stale_registrations, release, verify_cached_copies
from .manifest import TOKENS_COLUMN, verify_split


class DataConfigError(ValueError):
    """The data configuration or the datasets it names do not fit the request."""


@dataclass
class DataConfig:
    """Where the data is and how to stream it (the ``data:`` section of a training config).

    path: one prepared dataset (local folder or remote URL); or
    streams: a mixture, each ``{"path": ..., "proportion": p}`` (or ``"repeat"``/``"choose"``, as in
        mosaicml-streaming); proportions are relative and need not sum to 1.
    cache_dir: node-local folder for the shard cache (default: ``$TMPDIR/hope-scale-data``). Two jobs
        running at once on one machine need different cache folders.
    shuffle, shuffle_algo, shuffle_block_size, num_canonical_nodes: mosaicml-streaming's shuffle
        settings (the seed is the ``seed`` argument). ``num_canonical_nodes`` fixes the sample order
        of a run; it is stored in the loader state and kept on resumption, which is what makes
        resuming on another number of ranks continue the same order.
    epoch_size: samples per epoch for mixtures (default: the sum of the streams' sizes).
    num_workers, prefetch_factor: ``torch.utils.data.DataLoader`` workers per rank.
    validate_hash: hash checked when a shard enters the cache (``None`` disables the check).
    cache_limit, predownload, download_timeout: passed to ``StreamingDataset``.
    """

    path: str | None = None
    streams: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: str | None = None
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None
    epoch_size: int | None = None
    num_workers: int = 1
    prefetch_factor: int = 2
    validate_hash: str | None = "xxh64"
    cache_limit: str | None = None
    predownload: int | None = None
    download_timeout: float = 120.0

    @classmethod
    def from_any(cls, cfg: "DataConfig | dict[str, Any]") -> "DataConfig":
        if isinstance(cfg, DataConfig):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise DataConfigError(f"unknown data config keys {unknown}; known: {sorted(known)}")
        return cls(**cfg)

    def validate(self) -> None:
        """Check every field before any work; messages start with ``data.<field>:``."""
        from streaming.base.shuffle import algos

        from .manifest import SHARD_HASHES

        self.stream_specs()
        if self.shuffle_algo not in algos:
            raise DataConfigError(f"data.shuffle_algo: {self.shuffle_algo!r} is not one of {sorted(algos)}")
        if self.validate_hash is not None and self.validate_hash not in SHARD_HASHES:
            raise DataConfigError(f"data.validate_hash: {self.validate_hash!r} is not one of the hashes prepared "
                                  f"datasets record {list(SHARD_HASHES)} (or null to skip the check)")
        for name, low in (("num_workers", 0), ("prefetch_factor", 1), ("shuffle_block_size", 1),
                          ("num_canonical_nodes", 1), ("epoch_size", 1), ("predownload", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise DataConfigError(f"data.{name}: must be >= {low}, got {value}")
        if not self.download_timeout > 0:
            raise DataConfigError(f"data.download_timeout: must be > 0, got {self.download_timeout}")

    def stream_specs(self) -> list[dict[str, Any]]:
        if bool(self.path) == bool(self.streams):
            raise DataConfigError("data config needs exactly one of `path` or `streams`")
        specs = self.streams or [{"path": self.path}]
        for spec in specs:
            extra = set(spec) - {"path", "proportion", "repeat", "choose"}
            if "path" not in spec or extra:
                raise DataConfigError(f"a stream is {{path, [proportion|repeat|choose]}}, got {spec}")
        return specs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local_path(path: str) -> str:
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def _cache_folder(cache_dir: str | None, root: str, split: str) -> str:
    """A cache folder per dataset root; for local data its key includes the index, so a rebuilt dataset gets a fresh cache."""
    base = cache_dir or os.path.join(tempfile.gettempdir(), "hope-scale-data")
    key = hashlib.sha256(root.encode("utf-8"))
    index = Path(root) / split / "index.json"
    if not _is_remote(root):
        if not index.is_file():
            raise DataConfigError(f"{root} has no {split}/index.json: not a dataset prepared by `hope-scale prepare-data`")
        key.update(index.read_bytes())
    return os.path.join(os.path.abspath(base), f"{Path(root).name or 'data'}-{key.hexdigest()[:16]}")


def _prepare_launcher_env() -> None:
    """Give mosaicml-streaming the local world size it needs to coordinate the processes of a node."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:  # DeepSpeed launcher
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        raise DataConfigError(
            "WORLD_SIZE > 1 but LOCAL_WORLD_SIZE is not set: launch with torchrun or deepspeed, or set "
            "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for every process"
        )


def collate_tokens(samples: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of ``seq_len + 1`` tokens into ``(input_ids, labels)``, each ``[batch, seq_len]`` int64."""
    tokens = torch.from_numpy(np.stack(samples).astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class ShardError(RuntimeError):
    """A shard could not be fetched into the cache or failed its checksum there."""


class TokenDataset(StreamingDataset):
    """A StreamingDataset whose samples are token arrays, partitioned over data-parallel ranks only."""

    def __init__(self, *, dp_rank: int, dp_world_size: int, **kwargs: Any):
        super().__init__(**kwargs)
        # StreamingDataset partitions samples over its "parallel world", by default every process
        # (RANK/WORLD_SIZE). With model parallelism only DP ranks may differ, so the parallel world
        # becomes the DP group: one node of dp_world_size ranks. (Its `replication` argument does
        # the same, but only when the ranks of a replica are consecutive.) Coordination through
        # shared memory keeps using the real process world (`_unique_rank_world`).
        self._parallel_rank_world = World(num_nodes=1, ranks_per_node=dp_world_size, workers_per_rank=1, worker=dp_rank)
        self.length = math.ceil(self.epoch_size / dp_world_size)

    def __getitem__(self, index: int) -> np.ndarray:
        return super().__getitem__(index)[TOKENS_COLUMN]

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            # Background download threads only report "Background thread failed"; keep the cause.
            self._shard_error = (shard_id, err)
            raise

    def __iter__(self) -> Iterator[np.ndarray]:
        # A failing download thread makes StreamingDataset stop early (in DataLoader workers,
        # silently) or raise "Background thread failed"; report the real cause instead.
        try:
            yield from super().__iter__()
        except Exception as err:
            if hasattr(self, "_shard_error"):
                raise self._shard_failure() from err
            raise
        if hasattr(self, "_shard_error"):
            raise self._shard_failure()

    def close(self) -> None:
        """Stop the download threads and free this dataset's shared memory now.

        streaming frees its segments only at process exit (``atexit`` holds them), each with an open file
        descriptor, and a new dataset attaches to every live registration while it looks for a free one: a
        process that builds many datasets (evaluation, the tests) would run out of descriptors. Segments this
        process created are unlinked, so the registration is gone; attached ones are only closed."""
        if hasattr(self, "_iterator"):
            self._iterator.exit()  # signals the threads and waits for them
        if hasattr(self, "_executor"):
            self._executor.shutdown(wait=True)
        for segment in _shared_segments(self):
            atexit.unregister(segment.cleanup)
            segment.cleanup()

    def _shard_failure(self) -> ShardError:
        shard_id, cause = self._shard_error
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw, zipped = self.shards[shard_id].file_pairs[0]
        return ShardError(
            f"shard {(zipped or raw).basename} of {os.path.join(stream.remote, stream.split)} is unusable: {cause}. "
            "A checksum failure means the shard is corrupt (it differs from what prepare-data wrote)."
        )


def _shared_segments(obj: Any, depth: int = 3) -> Iterator[Any]:
    """streaming's shared-memory segments held by ``obj``: directly, or inside its shared arrays, scalars and
    barriers (``streaming.base.shared``), up to ``depth`` attributes down."""
    from streaming.base.shared import SharedMemory

    for value in vars(obj).values():
        if isinstance(value, SharedMemory):
            yield value
        elif depth > 1 and type(value).__module__.startswith("streaming.base.shared"):
            yield from _shared_segments(value, depth - 1)


def _make_dataset(
    cfg: DataConfig, split: str, *, seq_len: int, micro_batch_size: int, dp_rank: int,
    dp_world_size: int, seed: int, shuffle: bool, weighted: bool,
) -> TokenDataset:
    if not 0 <= dp_rank < dp_world_size:
        raise DataConfigError(f"dp_rank {dp_rank} is not in [0, {dp_world_size})")
    _prepare_launcher_env()
    streams = []
    for spec in cfg.stream_specs():
        root = spec["path"] if _is_remote(spec["path"]) else _local_path(spec["path"])
        weights = {k: spec[k] for k in ("proportion", "repeat", "choose") if k in spec} if weighted else {}
        streams.append(Stream(remote=root, local=_cache_folder(cfg.cache_dir, root, split), split=split, **weights))
    claimed = _prepare_node(cfg, streams, split)
    try:
        dataset = TokenDataset(
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            streams=streams,
            batch_size=micro_batch_size,
            shuffle=shuffle,
            shuffle_seed=seed,
            shuffle_algo=cfg.shuffle_algo,
            shuffle_block_size=cfg.shuffle_block_size,
            num_canonical_nodes=cfg.num_canonical_nodes,
            epoch_size=cfg.epoch_size if weighted else None,
            validate_hash=cfg.validate_hash,
            cache_limit=cfg.cache_limit,
            predownload=cfg.predownload,
            download_timeout=cfg.download_timeout,
        )
    except BaseException as err:
        for local in claimed:
            release(local)
        if isinstance(err, RuntimeError) and "contains no samples" in str(err):
            raise DataConfigError(f"the {split} split is empty: {err}") from err
        raise
    dataset.release_cache = weakref.finalize(dataset, lambda: [release(local) for local in claimed])
    _check_sample_length(dataset, seq_len)
    return dataset


def _prepare_node(cfg: DataConfig, streams: list[Stream], split: str) -> list[str]:
    """Before a dataset is built, on the node's local leader: claim each stream's cache folder, remove a dead
    job's shared memory for them, verify a local source split and the cached copies (``hope_scale.data.cache``).
    Collective when torch.distributed is initialized: the other ranks wait, and all raise the same error.
    Returns the cache folders this process claimed (released with the dataset)."""
    claimed: list[str] = []
    error = None
    if World.detect().is_local_leader:
        try:
            fresh = []
            for stream in streams:
                if claim(stream.local):
                    fresh.append(stream.local)
                claimed.append(stream.local)
            registered = [os.path.abspath(os.path.join(local, split)) for local in fresh]  # as streaming records them
            if registered and (removed := clean_stale_registrations(registered)):
                print(f"data: removed {removed} stale shared-memory registration(s) of a killed job for "
                      f"{registered}", flush=True)
            for stream in streams:
                error = error or _verify_stream(stream, split, cfg.validate_hash)
        except CacheInUseError as err:
            error = DataConfigError(f"data.cache_dir: {err}; two jobs on one machine need different data.cache_dir")
    error = _agree(error)
    if error is not None:
        for local in claimed:
            release(local)
        raise error
    return claimed


def _verify_stream(stream: Stream, split: str, algo: str | None) -> Exception | None:
    """A local source split must match its index; cached copies that do not are removed (and fetched again)."""
    source_index = None
    if not _is_remote(stream.remote):
        source = Path(stream.remote) / split
        problems = verify_split(source, hash_algo=algo)
        if problems:
            return ShardError(f"{source}: {len(problems)} shard(s) differ from what prepare-data wrote, found "
                              f"before training: {'; '.join(problems[:5])}. Prepare the dataset again.")
        source_index = (source / "index.json").read_bytes()
    if algo is not None:
        for message in verify_cached_copies(stream.local, split, source_index, algo):
            print(f"data: {message}", flush=True)
    return None


def _agree(error: Exception | None) -> Exception | None:
    """The first rank's error, on every rank (collective when torch.distributed is initialized)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return None
    return error or (ShardError if first[0] == "ShardError" else DataConfigError)(first[1])


def _check_sample_length(dataset: TokenDataset, seq_len: int) -> None:
    """Every shard must hold a ``tokens`` column of exactly ``seq_len + 1`` ids."""
    for shard, stream_id in zip(dataset.shards, dataset.stream_per_shard):
        where = os.path.join(dataset.streams[stream_id].remote, shard.split)
        encoding = dict(zip(shard.column_names, shard.column_encodings)).get(TOKENS_COLUMN)
        if encoding is None:
            raise DataConfigError(f"{where} has no {TOKENS_COLUMN!r} column: not a hope-scale dataset")
        if encoding.split(":")[-1] != str(seq_len + 1):
            raise DataConfigError(
                f"{where} holds samples of {encoding.split(':')[-1]} tokens but seq_len is {seq_len} "
                f"(samples need seq_len + 1 = {seq_len + 1}): prepare the data again with --seq-len {seq_len}"
            )


def _data_loader(dataset: TokenDataset, micro_batch_size: int, cfg: DataConfig) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=collate_tokens,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        drop_last=True,  # fixed shapes on every rank (pipeline parallelism needs them)
        persistent_workers=False,
    )


class _Loader:
    """What both loaders share: ``close()`` (also as a context manager) frees the dataset's threads, shared
    memory and cache folder at once, instead of at process exit."""

    dataset: TokenDataset | None
    _loader: Any

    def close(self) -> None:
        self._loader = None
        if self.dataset is not None:
            self.dataset.close()
            self.dataset.release_cache()
        self.dataset = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class TrainLoader(_Loader):
    """Endless iterator of training micro-batches with checkpointable position (see module docstring)."""

    def __init__(self, dataset: TokenDataset, micro_batch_size: int, dp_world_size: int, cfg: DataConfig):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_world_size = dp_world_size
        self._loader = _data_loader(dataset, micro_batch_size, cfg)
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._yielded_this_pass = 0  # samples this rank has returned since the current pass began

    @property
    def samples_per_epoch(self) -> int:
        """Samples in one epoch over all DP ranks (a mixture's resampled size)."""
        return int(self.dataset.epoch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return len(self._loader)

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = self._passes()
        return next(self._batches)

    def _passes(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        empty_passes = 0
        while True:
            self._yielded_this_pass = 0
            for batch in self._loader:  # each pass over the DataLoader is one streaming epoch
                empty_passes = 0
                self._yielded_this_pass += len(batch[0])
                yield batch
            empty_passes += 1  # a resumed epoch can be already finished; two empty passes in a row cannot happen
            if empty_passes > 1:
                raise RuntimeError("the training data yields no batch: fewer samples than dp_world_size * micro_batch_size")

    def state_dict(self) -> dict[str, Any]:
        """Position in the data: epoch, samples consumed in it by all DP ranks, shuffle settings."""
        consumed = self._yielded_this_pass * self.dp_world_size
        return dict(self.dataset.state_dict(consumed, from_beginning=False))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict()``, possibly of a run with another DP size)."""
        if self._batches is not None:
            raise RuntimeError("load_state_dict must be called before the first batch is drawn")
        self.dataset.load_state_dict(dict(state))

    def close(self) -> None:
        self._batches = None  # closes the suspended epoch first
        super().close()


class ValLoader(_Loader):
    """Finite loader over the validation split: each ``iter()`` is one pass, in the same order."""

    def __init__(self, dataset: TokenDataset, micro_batch_size: int, cfg: DataConfig, max_batches: int | None):
        self.dataset = dataset
        self._loader = _data_loader(dataset, micro_batch_size, cfg)
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = len(self._loader)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self._loader):
            if i >= len(self):
                break
            yield batch


def build_train_loader(
    data_cfg: DataConfig | dict[str, Any], *, seq_len: int, micro_batch_size: int,
    dp_rank: int = 0, dp_world_size: int = 1, seed: int = 0,
) -> TrainLoader:
    """Shuffled, endless training batches for one data-parallel rank (see module docstring)."""
    cfg = DataConfig.from_any(data_cfg)
    dataset = _make_dataset(
        cfg, "train", seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
        dp_world_size=dp_world_size, seed=seed, shuffle=cfg.shuffle, weighted=True,
    )
    return TrainLoader(dataset, micro_batch_size, dp_world_size, cfg)


def build_val_loader(
    data_cfg: DataConfig | dict[str, Any], *, seq_len: int, micro_batch_size: int,
    dp_rank: int = 0, dp_world_size: int = 1, max_batches: int | None = None,
) -> ValLoader:
    """The validation split of every stream (unweighted, not shuffled), split over DP ranks; at most ``max_batches``."""
    cfg = DataConfig.from_any(data_cfg)
    dataset = _make_dataset(
        cfg, "val", seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
        dp_world_size=dp_world_size, seed=0, shuffle=False, weighted=False,
    )
    loader = ValLoader(dataset, micro_batch_size, cfg, max_batches)
    if len(loader) == 0:
        raise DataConfigError(
            f"the validation split has {dataset.epoch_size} samples, fewer than one batch on each of "
            f"{dp_world_size} DP ranks ({micro_batch_size} each)"
        )
    return loader
