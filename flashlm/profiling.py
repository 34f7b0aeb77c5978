"""Profiling helpers for tests and sweeps: memory accounting that works without a GPU."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created inside the ``with`` block and still alive, and
    their peak: on a CPU, a stand-in for ``torch.cuda.max_memory_allocated`` (which counts the
    same storages, rounded up to the allocator's blocks). Tensors created before the block
    (parameters, say) are not counted; views share their base's storage and count once.

        with LiveTensorBytes() as meter:
            model(input_ids, labels=input_ids).loss.backward()
        meter.peak, meter.current
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live = {}

    def _free(self, key):
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._live and storage.nbytes():
                    self._live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out
