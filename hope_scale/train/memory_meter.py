"""Peak memory of tensors allocated inside a region, on any device (CPU included), without an allocator API.

    with AllocationMeter() as meter:
        model.loss(ids, labels).backward()
    meter.peak_bytes      # most bytes alive at once of the storages created inside the block
    meter.live_bytes      # bytes of those still alive now (e.g. the gradients)
    meter.allocated_bytes # bytes of every storage created inside the block, freed or not (total work on memory)

Every operator's output storage is counted once when it is created and un-counted when it is freed (a weak
reference on the storage), so ``peak_bytes`` is the high-water mark of activations, saved tensors, temporaries and
gradients created in the region; tensors that existed before it (parameters, inputs) are not counted. The
forward and the autograd engine's backward both run through the meter (a ``TorchDispatchMode``; the engine runs a
CPU backward on the calling thread with the mode's thread-local state). It measures what PyTorch allocates, not
what an allocator reserves (a GPU caching allocator adds fragmentation on top).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationMeter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocated_bytes = 0
        self._live: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:  # a view or an in-place result: no new memory
                continue
            self._live.add(key)
            self.live_bytes += nbytes
            self.allocated_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def _storage_key(t: torch.Tensor) -> int | None:
    return None if t.device.type == "meta" else t.untyped_storage().data_ptr()
