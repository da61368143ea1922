"""Epoch preload of a store's records into shared memory, for :class:`fkdstore.TorchDataset` (imports torch).

A random batch read from object storage touches an inner chunk of every shard file per image: hundreds of
range requests per batch, each paying the network's latency. :meth:`fkdstore.Reader.read_all` with the
epoch's slots reads every shard file whole instead (one request per array and shard, a few batches of
shards in flight while the previous one is decoded), so a whole epoch's labels cost a handful of round
trips. :class:`EpochRecords` holds what it returns:

* **what**: the records (box, flip, aug columns, codec fields) of the ``m`` slots each image uses in one
  epoch, for every image of the store: ``N x m`` records, about ``N * m * record_bytes`` (MS top-5: 4 box
  coordinates of 2 or 4 bytes + 1 flip byte + 5 * (2 + 2) = 29 or 37 B per record, so ImageNet-1k at m = 4
  holds 150-190 MB). Reading an epoch briefly needs twice that plus ``READ_ALL_BATCH_BYTES`` (64 MiB) of
  decoded shards.
* **where**: one shared-memory buffer (``torch.Tensor.share_memory_``), allocated by the process that
  builds the dataset, at the first fill. DataLoader workers map it, forked (inherited) or spawned (passed
  by torch's shared-memory pickling); they never read the store for labels.
* **when**: :meth:`fill` runs in the process that calls ``TorchDataset.set_epoch`` (the main process),
  before ``iter(loader)`` starts the workers or hands persistent workers the new epoch's indices; it
  refills the same buffer in place and records the epoch it holds (shared too), so a worker can tell a
  buffer that does not hold its epoch and read the store instead.
"""

from __future__ import annotations

import numpy as np
import torch

from .reader import CropRecords, RegionReader

__all__ = ["EpochRecords"]

_ALIGN = 64


class EpochRecords:
    """The records of one epoch (``(N, m)`` per array) in one shared-memory buffer; see the module
    docstring. Picklable: the buffer travels as shared memory through torch's multiprocessing pickler
    (DataLoader workers), as a copy through plain pickle."""

    def __init__(self) -> None:
        self._shm: torch.Tensor | None = None
        self._layout: list[tuple[str, int, str, tuple[int, ...]]] = []
        self._epoch = torch.full((), -1, dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # pragma: no cover - no shared memory: each process fills its own
            pass
        self._views: dict[str, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """The epoch whose records the buffer holds (-1: none)."""
        return int(self._epoch)

    @property
    def nbytes(self) -> int:
        return 0 if self._shm is None else int(self._shm.numel())

    def fill(self, reader: RegionReader, slots: np.ndarray, epoch: int) -> None:
        """Read every image's records at ``slots`` (N, m) with ``reader.read_all`` and store them as ``epoch``'s.
        The store must be complete (``read_all`` raises otherwise)."""
        rec = reader.read_all(slots)
        arrays = {"box": rec.box, "flip": rec.flip, **{f"aug/{k}": v for k, v in rec.aug.items()},
                  **{f"soft/{k}": v for k, v in rec.fields.items()}}
        layout, off = [], 0
        for name, a in arrays.items():
            layout.append((name, off, a.dtype.str, tuple(a.shape)))
            off += -(-a.nbytes // _ALIGN) * _ALIGN
        self._epoch.fill_(-1)  # a reader in another process sees "not this epoch" while the buffer changes
        if self._shm is None or layout != self._layout:
            shm = torch.empty(max(off, 1), dtype=torch.uint8)
            try:
                shm.share_memory_()
            except (RuntimeError, OSError):  # pragma: no cover - no shared memory: private to this process
                pass
            self._shm, self._layout, self._views = shm, layout, None
        views = self._arrays()
        for name, a in arrays.items():
            np.copyto(views[name], a)
        self._epoch.fill_(int(epoch))

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._shm is None:
            raise RuntimeError("EpochRecords holds no records yet: fill() it with an epoch's records first")
        if self._views is None:
            raw = self._shm.numpy()
            self._views = {name: raw[off:off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                           for name, off, dt, shape in self._layout}
        return self._views

    def records(self, idx: np.ndarray) -> CropRecords:
        """The records of store images ``idx`` (B,): leading dims ``(B, m)``, copies. RuntimeError before the
        first :meth:`fill`."""
        v = self._arrays()
        aug = {k[4:]: a[idx] for k, a in v.items() if k.startswith("aug/")}
        fields = {k[5:]: a[idx] for k, a in v.items() if k.startswith("soft/")}
        return CropRecords(v["box"][idx], v["flip"][idx], aug, fields)

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_views"] = None  # numpy views are rebuilt over the (shared) buffer in the receiving process
        return d
