"""Bytes of live tensor storages by part, and their peak per GPU: the counter behind ``di-star bench memory``.

A dispatch mode that follows every storage an op creates until it is freed, the method of torch's ``MemTracker``
(torch.distributed._tools) without its per-module bookkeeping, which cannot follow the DI* iteration (it hooks every
parameter of a module at its first call, failing on frozen ones, and refuses a module called twice per iteration).
It works on real tensors and, under ``FakeTensorMode``, on fake ones, so it can count what a full-size step would hold
without allocating it (:mod:`.memory`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PARTS", "LiveMemory"]

#: What the peak is made of. "activations" holds everything else that is live: saved activations, temporaries (the
#: optimiser step's too), autocast's bf16 copies of float32 weights, inputs, the clipping norms.
PARTS = ("weights", "gradients", "optimizer states", "activations")


class LiveMemory(TorchDispatchMode):
    """Bytes of every live tensor storage by part, and the peak of their sum per GPU for each of ``gpus``.

    A storage is counted once (views share it) from the op that creates it until it is freed (a weak reference's
    callback), under the part set by :meth:`add` / :meth:`relabel` or, for an op's output, :attr:`phase` (part,
    sharded). A storage with ``sharded`` set counts 1/N on each of N GPUs (FSDP2's parameters, gradients, optimiser
    states and the step's temporaries); the others count whole on every GPU. Tensors created outside the mode and
    never added are not seen.
    """

    def __init__(self, gpus: Sequence[int] = (1,)):
        super().__init__()
        self.phase = ("activations", False)
        self._live: dict[int, list] = {}  # id(storage) -> [part, bytes, sharded, weak reference]
        self._whole = dict.fromkeys(PARTS, 0)
        self._sharded = dict.fromkeys(PARTS, 0)
        self.peaks = {n: dict.fromkeys(PARTS, 0) for n in gpus}
        self._peak_totals = dict.fromkeys(gpus, 0)

    def _count(self, entry: list, sign: int) -> None:
        part, size, sharded, _ = entry
        (self._sharded if sharded else self._whole)[part] += sign * size

    def _free(self, key: int) -> None:
        self._count(self._live.pop(key), -1)

    def add(self, tensor: torch.Tensor, part: str, sharded: bool = False) -> None:
        """Count ``tensor``'s storage under ``part`` unless it is counted already."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        entry = [part, storage.nbytes(), sharded, weakref.ref(storage, lambda _, key=key: self._free(key))]
        self._live[key] = entry
        self._count(entry, +1)
        self._update_peaks()

    def relabel(self, tensor: torch.Tensor, part: str, sharded: bool) -> None:
        """Move ``tensor``'s storage to ``part`` (a gradient is an op's output before it lands in ``.grad``)."""
        entry = self._live.get(id(tensor.untyped_storage()))
        if entry is None:
            self.add(tensor, part, sharded)
            return
        self._count(entry, -1)
        entry[0], entry[2] = part, sharded
        self._count(entry, +1)

    def _update_peaks(self) -> None:
        whole, sharded = sum(self._whole.values()), sum(self._sharded.values())
        for n, best in self._peak_totals.items():
            if whole + sharded / n > best:
                self._peak_totals[n] = whole + sharded / n
                self.peaks[n] = {part: round(self._whole[part] + self._sharded[part] / n) for part in PARTS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.add(tensor, *self.phase)
        return out
