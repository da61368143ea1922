"""PyTorch side of fkdstore: replay stored crops and soft labels in any training loop (FKD's training phase).

:class:`TorchDataset` is a map-style dataset over the images of a store. Item ``i`` loads image ``i`` once
and returns ``m`` of its ``M`` stored crops, replayed with the shared crop function
(:func:`fkdstore.transforms.replay_crops`), together with their soft labels::

    ds = fkdstore.TorchDataset("labels.fkd", "train/", crops_per_sample=4)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=8, collate_fn=fkdstore.collate)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                      # before iter(loader)
        for batch in loader:                     # batch["crops"] [64*4, 3, H, W], batch["soft_labels"] [256, C]
            loss = fkdstore.soft_cross_entropy(model(batch["crops"]), batch["soft_labels"])

A label-map store (ReLabel, ``kind = "label_map"``) gets a :class:`fkdstore.pytorch_maps.LabelMapDataset`
instead, with the same item layout: fresh crops per epoch or a region store's crops (``crops_from=``), and
each crop's soft label pooled from the image's map (see that module).

Item ``i`` is a dict:

=================  ============================  ===========================================================
key                value                         meaning
=================  ============================  ===========================================================
``crops``          [m, 3, H, W] float32 / uint8  the replayed crops, normalised (``normalize=True``) or uint8
``soft_labels``    [m, C] float32, or dict       decoded labels (``soft_labels="dense"``) or the codec's fields
                                                 ``{name: [m, ...]}`` (``soft_labels="sparse"``; class indices
                                                 as int32) for :func:`densify` on the GPU
``target``         int                           ground-truth class, -1 if unknown
``index``          int                           the image's index in the store
``slots``          [m] int64                     which stored crop slots were used
=================  ============================  ===========================================================

A store made with augmentation policies (``generate(augment=...)``, header ``augment``) is replayed
pixel-exactly from its stored ``aug`` columns by :func:`fkdstore.augment.replay.replay_slots`, the
function the teacher-runner called (a mixed slot also loads its partner image and reads the partner
slot's box, flip and params). Its items hold four more keys (P = number of mixing policies):

=================  ============================  ===========================================================
``mixed``          [m] bool                      the slot was mixed by at least one policy
``lam``            [m] float32                   weight of the image's own ``target`` in the mixed pixels
``partner_target`` [m, P] int64                  ground-truth class of each policy's partner (-1: not mixed)
``partner_weight`` [m, P] float32                its weight; ``lam + partner_weight.sum(-1) == 1``
=================  ============================  ===========================================================

(for a hard-label term: ``lam * CE(target) + sum_p partner_weight[:, p] * CE(partner_target[:, p])``). A store
whose pixels need another library's pipeline (an ``external_seed`` policy, e.g. imported TinyViT seeds) is
replayed only with the user's ``external_replay``; its items have P = 1 (the stored partner).

Epoch-to-slot rule (:func:`epoch_slots`): image ``i`` walks its own sequence of permutations of the ``M``
slots; permutation number ``c`` is ``default_rng(SeedSequence([seed, i, c])).permutation(M)``, and epoch
``e`` uses positions ``e*m ... e*m + m - 1`` of the concatenated sequence. Consecutive epochs therefore use
fresh slots until the pool is exhausted (``M // m`` epochs), and the choice depends on ``(seed, i, e)``
only — never on batch size, ``num_workers``, DistributedSampler's world size or rank.

Label reading: DataLoader calls :meth:`TorchDataset.__getitems__` with a whole batch, which reads the
batch's labels with one :meth:`fkdstore.Reader.read_batch` (one decode per inner chunk) and decodes them
in one vectorised call; images are the only per-item I/O. Each image is decoded once and its m crops are
written straight into one batch buffer (in shared memory inside a worker) by the shared crop function, with
flip, HWC -> CHW and normalisation fused into one pass per crop, bit-identical to
``normalize(replay_crops(...))``, which the teacher-runner saw; :func:`collate` hands that buffer on without
copying.

Memory: a fresh shared-memory batch buffer costs about as much as filling it (its pages are allocated, zeroed
and mapped on first touch, then freed), so each DataLoader worker keeps up to ``batch_pool`` (default 4)
buffers per batch size and refills one only once the main process has dropped every reference to the
batch's memory (views, ``numpy()`` and ``detach()`` included: holding batches is safe, the worker then
allocates fresh buffers). With non-persistent fork workers the main process keeps up to
``num_workers * batch_pool`` buffers per batch size for the dataset's lifetime, so the next epoch's workers
start on them; they are freed with the dataset. ``batch_pool=0``: a fresh buffer per batch, freed with the
batch. Details: the comment above ``_BatchPool`` in this module. ``normalize=False`` (uint8 crops, normalised on the GPU) moves and writes 4x fewer bytes and is the
fastest path (``benchmarks/dataset_profile.py``). A remote store (a URL) is read by epoch instead: ``set_epoch``
reads the epoch's records with one ``read_all(slots)`` into shared memory the workers map
(:mod:`fkdstore.preload`; ``preload=`` chooses), since a random batch from object storage costs hundreds of
requests. For a local store the per-batch read is as fast and runs in the workers
(``benchmarks/README.md``, "TorchDataset throughput").

Images come from any :mod:`fkdstore.sources` source (folder, file list, URL prefix, tar shards,
``datasets``, a mapping); each batch is announced to the source first, so a remote one fetches the batch's
bytes ahead of decoding.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no batch pool
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

from . import codecs as _codecs
from .errors import CorruptStoreError, IncompleteStoreError, ValidationError
from . import storage as _storage
from .validation import int_in_range
from .preload import EpochRecords
from .reader import Reader
from .reader import open as _open_store
from .sources import ImageSource, as_source
from .transforms import Replay, replay_crops, write_crops

__all__ = ["TorchDataset", "collate", "densify", "soft_cross_entropy", "epoch_slots", "mix_batch", "BatchMix"]

LABEL_MODES = ("dense", "sparse")


def _check_int(name: str, value: Any, minimum: int) -> int:
    return int_in_range(name, value, minimum)


def epoch_slots(index: int, epoch: int, crops_per_sample: int, crops_per_image: int, seed: int = 0) -> np.ndarray:
    """The ``m`` slots (int64, in use order) image ``index`` uses in ``epoch``; see the module docstring.

    Position ``p = epoch*m + j`` (``j < m``) is entry ``p % M`` of permutation ``p // M``, where
    permutation ``c`` is ``numpy.random.default_rng(SeedSequence([seed, index, c])).permutation(M)``.
    """
    m, M = crops_per_sample, crops_per_image
    pos = np.arange(epoch * m, epoch * m + m, dtype=np.int64)
    cycles = pos // M
    out = np.empty(m, np.int64)
    for c in range(int(cycles[0]), int(cycles[-1]) + 1):  # one or two permutations (m <= M)
        perm = np.random.default_rng(np.random.SeedSequence([seed, index, c])).permutation(M)
        sel = cycles == c
        out[sel] = perm[pos[sel] % M]
    return out


def epoch_slots_many(indices, epoch: int, crops_per_sample: int, crops_per_image: int, seed: int = 0) -> np.ndarray:
    """``(len(indices), m)``: :func:`epoch_slots` of each image, computed in one loop (same values)."""
    m, M = crops_per_sample, crops_per_image
    idx = [int(i) for i in indices]
    pos = np.arange(epoch * m, epoch * m + m, dtype=np.int64)
    cycles, cols = pos // M, pos % M
    c0, c1 = int(cycles[0]), int(cycles[-1])
    out = np.empty((len(idx), m), np.int64)
    if c0 == c1 and max([seed, c0, *idx], default=0) < 2**32:  # one permutation per image (always when m | M)
        # SeedSequence([seed, i, c]) of ints below 2**32 equals SeedSequence of the same words as a uint32
        # array, which numpy takes without converting each int (about half the cost per image)
        words = np.array([seed, 0, c0], np.uint32)
        for r, i in enumerate(idx):
            words[1] = i
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))
            out[r] = rng.permutation(M)[cols]
        return out
    for r, i in enumerate(idx):
        out[r] = epoch_slots(i, epoch, m, M, seed)
    return out


class TorchDataset(torch.utils.data.Dataset):
    """Replays a store's crops and soft labels; see the module docstring for the item layout and slot rule.

    Args:
        store: a store folder, a URL (``s3://bucket/labels.fkd``; with ``storage_options``) or an opened
            :class:`fkdstore.Reader`.
        images: the images the store was made from: a folder, a file list, a URL prefix
            (``s3://bucket/train/``), WebDataset tar shards, a ``datasets.Dataset``, a mapping of key ->
            image or an :class:`fkdstore.sources.ImageSource` (:func:`fkdstore.sources.as_source`). Its keys
            must equal the store's ``image_keys`` in order: a store key missing from it raises
            FileNotFoundError naming the image, any other difference raises :class:`ValidationError` naming
            the first mismatching key. Remote images are fetched ahead of decoding, a batch at a time
            (bounded by the source's ``read_ahead``).
        crops_per_sample: ``m``, crops per image per item (``1 <= m <= M``).
        output_size: int or (height, width); default: the store's replay ``input_size`` (the size the
            teacher saw, so replay is exact; checksummed in the header and at most
            :data:`fkdstore.transforms.MAX_INPUT_SIDE` per side), else 224.
        epoch: initial epoch (see :meth:`set_epoch`).
        transform: optional callable applied to each item's crops tensor [m, 3, H, W] (after normalising).
        soft_labels: ``"dense"`` ([m, C] float32) or ``"sparse"`` (codec fields, for :func:`densify`).
        seed: seed of the epoch-to-slot rule.
        allow_incomplete: an incomplete store raises :class:`IncompleteStoreError` unless True; then the
            dataset covers only the images written when it was built (``len`` is their count, item ``j``
            is image ``image_indices[j]``; slots still depend on the store index), unwritten images are
            skipped.
        interpolation: resampling filter; default the store's replay ``interpolation``, else ``"bilinear"``.
        normalize: return float32 ``(x/255 - mean)/std`` (True) or the uint8 crops (False; normalise on
            the GPU with :func:`fkdstore.transforms.normalize` to move 4x fewer bytes).
        mean, std: default the store's replay ``mean`` / ``std``, else ImageNet's.
        temperature: decoding temperature ``T`` (``codec.decode(..., temperature=T)``; for a ``logits`` store
            ``softmax(z / T)``, for probability codecs ``normalise(p ** (1/T))``): a finite number > 0,
            checked here (:class:`ValidationError`). Also the default of :func:`densify` for this dataset.
        storage_options: for a URL ``store`` and/or URL ``images``, passed to fsspec (endpoint, credentials,
            ...); credentials may instead come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
            ...). Images on another endpoint or account: pass ``images=as_source(url, storage_options=...)``.
        cache_dir, cache_bytes: for a URL ``store``, a local folder caching the bytes read from it (bounded
            by ``cache_bytes``, default 10 GiB), shared by the DataLoader workers; see :func:`fkdstore.open`.
        preload: read labels by epoch instead of by batch: :meth:`set_epoch` (and the constructor) reads the
            epoch's ``N x m`` records with one :meth:`fkdstore.Reader.read_all` into shared memory that the
            DataLoader workers map (:mod:`fkdstore.preload`: about ``N * m * 29`` bytes for MS top-5, one
            copy for all workers), and batches take their labels from it. Default (None): on for a remote
            store (a URL, or a Reader on one) that is complete, where a random batch would cost hundreds of
            requests; off for a local store (per-batch reads are as fast and work in parallel in the
            workers). True on an incomplete store raises :class:`IncompleteStoreError`.
        batch_pool: how many shared-memory batch buffers each DataLoader worker keeps per batch size and
            refills (default 4 = DataLoader's default ``prefetch_factor`` 2 + 2; use ``prefetch_factor + 2``).
            A buffer is refilled only after the main process has dropped every reference to the batch's
            crops (views, ``numpy()`` and ``detach()`` included), so holding batches is safe: when all are
            busy the worker allocates a fresh buffer (it never waits). With fork workers that are not
            persistent, the main process keeps up to ``num_workers * batch_pool`` of them per batch size
            (in /dev/shm) until the dataset is freed, for the next epoch's workers. ``0``: a fresh buffer
            per batch, freed with the batch. No effect without workers (``num_workers=0``) or with the
            ``file_system`` sharing strategy. Send a batch's crops on to another process only as a copy
            (``clone()``): the pool cannot see references held by a third process.
        external_replay: for a store whose pixels need another library's pipeline (an ``external_seed``
            policy, e.g. TinyViT's timm pipeline run from a stored seed): a picklable callable
            ``f(image, params, partner_image, output_size)`` returning the slot's uint8 ``(H, W, 3)`` pixels, or
            ``(pixels, lam)`` with ``lam`` the weight of the image's own target; ``image`` and ``partner_image``
            (None when not mixed) are decoded PIL images, ``params`` the slot's stored columns
            (``external_seed``, ``external_partner``, ``external_partner_seed``). Without it such a store is
            refused (:class:`~fkdstore.errors.ExternalReplayError`); its labels still load with
            :func:`fkdstore.open` (``read_batch``). A mixed slot's ``lam`` is NaN when ``f`` returns pixels only.

    The image's size is checked against the recorded one when it is loaded (a mismatch raises
    :class:`ValidationError` naming the image). Works with DataLoader workers (fork and spawn; the store
    is reopened lazily in each worker: pickling carries the location and ``storage_options``, never open
    files or connections, and a forked worker builds its own remote filesystem) and DistributedSampler.
    An unreachable URL (bad URL, missing bucket, refused credentials) raises
    :class:`~fkdstore.errors.StorageError` with a one-line message when the dataset is built.
    """

    def __new__(cls, store=None, images=None, **kwargs):
        """A label-map store gets a :class:`fkdstore.pytorch_maps.LabelMapDataset` (same item layout, each
        crop's soft label pooled from the image's map; its own options: ``crops_from``, ``crop_sampler``);
        a crop-regions store gets this class."""
        if cls is TorchDataset and store is not None:
            from . import pytorch_maps  # label-map items live there (it imports this module)

            if pytorch_maps.is_label_map_store(store, kwargs.get("storage_options")):
                return pytorch_maps.LabelMapDataset(store, images, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        store: str | os.PathLike | Reader,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        crops_per_sample: int = 1,
        output_size: int | tuple[int, int] | None = None,
        epoch: int = 0,
        transform=None,
        soft_labels: str = "dense",
        seed: int = 0,
        allow_incomplete: bool = False,
        interpolation: str | None = None,
        normalize: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        temperature: float = 1.0,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int | None = None,
        batch_pool: int = 4,
        external_replay=None,
        preload: bool | None = None,
    ):
        self._cache = {"cache_dir": cache_dir, "cache_bytes": cache_bytes}
        # storage_options serve whichever of store and images is a URL
        image_options = _storage.options_for(images, storage_options)
        if isinstance(store, Reader):
            if (storage_options and image_options is None) or cache_dir is not None or cache_bytes is not None:
                raise TypeError("storage_options, cache_dir and cache_bytes apply when store is a path or URL, "
                                "not an opened Reader (pass them to fkdstore.open).")
            reader, self._store_path, storage_options = store, None, None
        else:
            self._store_path = os.fspath(store)
            if image_options is not None:
                storage_options = _storage.options_for(self._store_path, storage_options)
            reader = _open_store(store, storage_options=storage_options, **self._cache)  # local + options: TypeError
        self._storage_options = dict(storage_options) if storage_options else None
        self._reader: Reader | None = reader
        self.num_classes = reader.num_classes
        self.crops_per_image = reader.crops_per_image
        self.codec = reader.codec
        stored = reader.header.replay or Replay()  # checksummed in the header (4.0), validated at open

        self.crops_per_sample = _check_int("crops_per_sample", crops_per_sample, 1)
        if self.crops_per_sample > self.crops_per_image:
            raise ValidationError(
                f"crops_per_sample must be <= the store's crops_per_image={self.crops_per_image}. "
                f"Got {crops_per_sample}.")
        if soft_labels not in LABEL_MODES:
            raise ValidationError(f"soft_labels must be one of {list(LABEL_MODES)}. Got {soft_labels!r}.")
        self.soft_labels = soft_labels
        self.seed = _check_int("seed", seed, 0)
        try:
            replay = Replay(input_size=stored.input_size if output_size is None else output_size,
                            interpolation=stored.interpolation if interpolation is None else interpolation,
                            mean=stored.mean if mean is None else mean, std=stored.std if std is None else std)
        except TypeError as e:
            raise TypeError(f"TorchDataset: {e}") from None
        self.replay = replay
        self.output_size, self.interpolation = replay.input_size, replay.interpolation
        self.mean, self.std = replay.mean, replay.std
        self.normalize = bool(normalize)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable. Got {type(transform).__name__}.")
        self.transform = transform
        self.temperature = _codecs.parse_temperature(temperature)
        self.batch_pool = _check_int("batch_pool", batch_pool, 0)
        self._pool_token = os.urandom(8).hex()  # names this dataset's batch buffers across processes
        self._owner_pid = os.getpid()  # a worker whose parent this is inherited _retained by fork
        self._retained: dict[int, list[_PooledBuffer]] = {}  # nbytes -> buffers kept for later workers
        _DATASETS[self._pool_token] = self

        self._images: ImageSource = as_source(images, storage_options=image_options)
        _match_images(reader.image_keys, self._images)
        self._sizes = np.asarray(reader.image_sizes, dtype=np.int64)
        targets = np.asarray(reader.labels, dtype=np.int64)
        if not (targets >= 0).any() and (np.asarray(self._images.labels) >= 0).any():
            targets = np.asarray(self._images.labels, dtype=np.int64)  # store has no labels: use the source's
        self._targets = targets

        written = reader.written
        if not written.all() and not allow_incomplete:
            first = int(np.flatnonzero(~written)[0])
            raise IncompleteStoreError(
                f"store {reader.path} is incomplete: {int((~written).sum())} of {reader.num_images} images are "
                f"not written (first: image {first}, {os.path.basename(self._images.name(first))!r}); finish "
                f"generating it, or pass allow_incomplete=True to train on the written images only")
        self.image_indices = np.flatnonzero(written).astype(np.int64)
        # Validated at open (fkdstore.reader refuses unknown policies); None = crop and flip only (fast path).
        pipeline = reader.header.augment
        self.augment = pipeline if len(pipeline) else None
        self.external_replay = _check_external(pipeline, external_replay, reader)

        # The epoch lives in shared memory so persistent DataLoader workers see set_epoch() too.
        self._epoch = torch.zeros((), dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # pragma: no cover - no shared memory: workers see it at (re)start
            pass
        self._preload = _preload_records(reader, preload, written.all())
        self.set_epoch(epoch)

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the slots of ``epoch``. Call it before ``iter(loader)``; persistent workers see it too. With
        ``preload``, this reads the epoch's labels (in this process, into memory the workers share)."""
        self._epoch.fill_(_check_int("epoch", epoch, 0))
        if self._preload is not None and self._preload.epoch != int(epoch):
            r = self.reader
            slots = epoch_slots_many(range(r.num_images), int(epoch), self.crops_per_sample, self.crops_per_image,
                                     self.seed)
            self._preload.fill(r, slots, int(epoch))

    def slots(self, item: int, epoch: int | None = None) -> np.ndarray:
        """The slots item ``item`` uses in ``epoch`` (default: the current epoch)."""
        i = int(self.image_indices[item])
        e = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        return epoch_slots(i, e, self.crops_per_sample, self.crops_per_image, self.seed)

    # ------------------------------------------------------------------ store handle, pickling
    @property
    def reader(self) -> Reader:
        if self._reader is None:
            self._reader = _open_store(self._store_path, storage_options=self._storage_options, **self._cache)
        return self._reader

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_retained"] = {}  # shared memory reaches a spawned worker by fork only
        if self._store_path is not None:
            d["_reader"] = None  # reopened lazily in the worker
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._pool_token = os.urandom(8).hex()  # a copy (or a spawned worker's dataset) keeps buffers of its own
        self._owner_pid = os.getpid()
        _DATASETS[self._pool_token] = self

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.image_indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of items; used by DataLoader.

        Labels: one ``read_batch`` and one decode for the whole batch. Crops: every item's crops are written
        (in one fused crop/flip/layout/normalise pass per crop) into one batch buffer, in shared memory inside
        a DataLoader worker, so :func:`collate` returns that buffer without copying.
        """
        items = np.asarray([int(k) for k in items], dtype=np.int64)
        n = len(self)
        if ((items < -n) | (items >= n)).any():
            bad = int(items[(items < -n) | (items >= n)][0])
            raise IndexError(f"item {bad} is out of range for a dataset of {n} images")
        idx = self.image_indices[items]
        self._images.prefetch(idx.tolist())
        slots, rec, soft = self._read_labels(idx)
        if self.augment is not None:
            return self._augmented_items(idx, slots, rec, soft)
        dtype = torch.float32 if self.normalize else torch.uint8
        bufs = _empty((len(idx), self.crops_per_sample, 3, *self.output_size), dtype, self).unbind(0)
        return [{"crops": self._crops(i, boxes, flips, out=buf), "soft_labels": lab, "target": target,
                 "index": i, "slots": sl}
                for i, target, boxes, flips, buf, lab, sl in zip(
                    idx.tolist(), self._targets[idx].tolist(), rec.boxes, rec.flips, bufs, soft,
                    torch.from_numpy(slots).unbind(0))]

    def _read_labels(self, idx: np.ndarray):
        """Slots (B, m), records and per-item soft labels of store images ``idx``: one ``read_batch`` (or the
        epoch's preloaded records) and one decode; item ``b``'s labels are views of the batch's (so
        :func:`collate` does not copy them)."""
        e, m, M = self.epoch, self.crops_per_sample, self.crops_per_image
        slots = epoch_slots_many(idx, e, m, M, self.seed)
        if self._preload is not None and self._preload.epoch == e:
            rec = self._preload.records(idx)
        else:
            rec = self.reader.read_batch(idx, slots)
        if self.soft_labels == "dense":
            soft = torch.from_numpy(np.ascontiguousarray(
                self.codec.decode(rec.fields, self.num_classes, temperature=self.temperature))).unbind(0)
        else:
            fields = {k: torch.from_numpy(_torch_friendly(v)).unbind(0) for k, v in rec.fields.items()}
            soft = [dict(zip(fields, row)) for row in zip(*fields.values())] if fields else [{} for _ in idx]
        return slots, rec, soft

    def _crops(self, i: int, boxes: np.ndarray, flips: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``i``'s crops ``boxes``/``flips`` replayed ([m, 3, H, W]), written into ``out`` when given."""
        image = self._load(i)
        norm = {"mean": self.mean, "std": self.std} if self.normalize else {}
        crops = replay_crops(image, boxes, flips, self.output_size, self.interpolation, out=out, **norm)
        if self.transform is not None:
            crops = self.transform(crops)
        return crops

    # ------------------------------------------------------------------ augmented stores
    def _augmented_items(self, idx: np.ndarray, slots: np.ndarray, rec, soft) -> list[dict[str, Any]]:
        """Items of a store with an augmentation pipeline: every slot replayed from its stored params."""
        from .augment.replay import mix_weights

        self._check_params(idx, slots, rec.aug)
        dtype = torch.float32 if self.normalize else torch.uint8
        bufs = _empty((len(idx), self.crops_per_sample, 3, *self.output_size), dtype, self).unbind(0)
        out = []
        for b, i in enumerate(idx.tolist()):
            params = {k: v[b] for k, v in rec.aug.items()}
            crops, ext_lam = self._augmented_crops(i, slots[b], rec.box[b], rec.flip[b], params, bufs[b])
            if ext_lam is None:
                lam, pidx, pw = mix_weights(self.augment, params, self.output_size)
            else:  # external replay: the partner is stored, the weight is what the user's replay returned
                pidx = np.asarray(params["external_partner"], np.int64).reshape(-1, 1)
                lam = np.where(pidx[:, 0] >= 0, ext_lam, 1.0)
                pw = np.where(pidx >= 0, 1.0 - lam[:, None], 0.0)
            ptarget = np.where(pidx >= 0, self._targets[np.maximum(pidx, 0)], -1)
            out.append({"crops": crops, "soft_labels": soft[b], "target": int(self._targets[i]), "index": i,
                        "slots": torch.from_numpy(slots[b]), "mixed": torch.from_numpy((pidx >= 0).any(1)),
                        "lam": torch.from_numpy(lam.astype(np.float32)),
                        "partner_target": torch.from_numpy(ptarget.astype(np.int64)),
                        "partner_weight": torch.from_numpy(pw.astype(np.float32))})
        return out

    def _check_params(self, idx: np.ndarray, slots: np.ndarray, aug: Mapping[str, np.ndarray]) -> None:
        """Stored params of a batch checked by the pipeline (ranges, partner indices); a bad value raises
        :class:`CorruptStoreError` naming the array, the image and the slot."""
        r = self.reader
        kw = dict(num_images=r.num_images, crops_per_image=self.crops_per_image, image_size=self.output_size)
        try:
            self.augment.validate(aug, **kw)
            return
        except ValidationError:
            pass
        for b, i in enumerate(idx.tolist()):
            for k, s in enumerate(slots[b].tolist()):
                for pol in self.augment.policies:
                    cols = [c.name for c in pol.columns()]
                    try:
                        pol.validate({c: aug[c][b, k] for c in cols}, **kw)
                    except ValidationError as e:
                        named = [c for c in cols if f"'{c}" in str(e)] or cols
                        raise CorruptStoreError(
                            f"store {r.path}: array {', '.join('aug/' + c for c in named)} (policy {pol.name!r}), "
                            f"image {i} ({r.image_key(i)!r}), slot {s}: {e}") from None
        raise CorruptStoreError(f"store {r.path}: the augment params of images {idx.tolist()} are not valid")

    def _augmented_crops(self, i: int, slots, boxes, flips, params, out: torch.Tensor):
        """``(crops [m, 3, H, W], lam)``: ``lam`` (m,) from an external replay, else None (see mix_weights)."""
        from .augment.replay import Partner, replay_slots

        image = self._load(i)
        decoded = {i: image}
        r = self.reader

        def partner_image(j: int):
            if j not in decoded:
                decoded[j] = self._load(j)
            return decoded[j]

        def partner(j: int, t: int) -> Partner:
            rec = r.read(j, [t])
            return Partner(partner_image(j), rec.box[0], bool(rec.flip[0]), {k: v[0] for k, v in rec.aug.items()})

        if self.augment.external is not None:
            hwc, lam = self._external_crops(image, slots, params, partner_image)
        else:
            hwc, lam = replay_slots(self.augment, image, slots, boxes, flips, params, self.output_size,
                                    self.interpolation, partner, partner_image), None
        write_crops(hwc, out, **({"mean": self.mean, "std": self.std} if self.normalize else {}))
        if self.transform is not None:
            out = self.transform(out)
        return out, lam

    def _external_crops(self, image, slots, params, partner_image) -> tuple[np.ndarray, np.ndarray]:
        """Slots of an ``external_seed`` store replayed by the user's ``external_replay``: (pixels, lam)."""
        H, W = self.output_size
        hwc = np.empty((len(slots), H, W, 3), np.uint8)
        lam = np.full(len(slots), np.nan)
        for k in range(len(slots)):
            prm = {name: int(np.asarray(v)[k]) for name, v in params.items()}
            j = prm["external_partner"]
            got = self.external_replay(image, prm, partner_image(j) if j >= 0 else None, (H, W))
            if isinstance(got, tuple):
                got, lam[k] = got[0], float(got[1])
            px = np.asarray(got)
            if px.dtype != np.uint8 or px.shape != (H, W, 3):
                raise ValidationError(f"external_replay must return uint8 pixels of shape {(H, W, 3)} (or "
                                      f"(pixels, lam)). Got {px.dtype} {px.shape}.")
            hwc[k] = px
        return hwc, lam

    def _load(self, i: int):
        """Image ``i`` decoded and its size checked against the store's."""
        image = self._images.load(i)
        H, W = self._sizes[i].tolist()
        if image.size != (W, H):
            raise ValidationError(
                f"image {i} ({self._images.name(i)}) has size (height={image.size[1]}, width={image.size[0]}) but "
                f"the store recorded (height={H}, width={W}); the images changed since the labels were generated")
        return image

    def __repr__(self) -> str:
        return (f"fkdstore.TorchDataset(images={len(self)}, crops_per_sample={self.crops_per_sample}, "
                f"crops_per_image={self.crops_per_image}, output_size={self.output_size}, soft_labels={self.soft_labels!r}, "
                f"epoch={self.epoch}, seed={self.seed})")


def _check_external(pipeline, external_replay, reader):
    """``external_replay`` for a store whose pipeline is an ``external_seed`` policy (refused without one);
    None otherwise (a replay given for any other store is refused too)."""
    from .errors import ExternalReplayError

    ext = pipeline.external
    if ext is None:
        if external_replay is not None:
            raise ValidationError("external_replay applies to stores with an external_seed augment policy only; "
                                  f"store {reader.path} is replayed by fkdstore.")
        return None
    if external_replay is None:
        raise ExternalReplayError(
            f"store {reader.path} needs an {ext.describe()}. Pass external_replay=f(image, params, partner_image, "
            f"output_size) to TorchDataset to replay the pixels with {ext.library}; the labels load without it "
            f"(fkdstore.open(...).read_batch).")
    if not callable(external_replay):
        raise TypeError(f"external_replay must be callable. Got {type(external_replay).__name__}.")
    return external_replay


def _torch_friendly(v: np.ndarray) -> np.ndarray:
    """uint16 class indices -> int32 (torch has few uint16 kernels); other dtypes unchanged."""
    if v.dtype == np.uint16 or v.dtype == np.uint32:
        return v.astype(np.int32)
    return np.ascontiguousarray(v)


def _match_images(store_keys: list[str], source: ImageSource) -> None:
    """Check that the source's keys are the store's, in store order; raise naming the first that does not match."""
    keys = source.keys
    if keys == store_keys:
        return
    where = source.where
    listed = set(keys)
    missing = [(i, k) for i, k in enumerate(store_keys) if k not in listed]
    if missing:
        i, k = missing[0]
        raise FileNotFoundError(
            f"image {k!r} (store index {i}) is missing from {where} ({len(missing)} of the store's "
            f"{len(store_keys)} images are missing); the images must be the ones the store was made from")
    known = set(store_keys)
    extra = [k for k in keys if k not in known]
    if extra:
        raise ValidationError(
            f"images do not match the store: {extra[0]!r} is in {where} but not in the store "
            f"({len(extra)} extra images); pass the folder or file list the store was made from")
    j = next(j for j, (a, b) in enumerate(zip(store_keys, keys)) if a != b)
    raise ValidationError(
        f"images do not match the store's order: position {j} is {store_keys[j]!r} in the store but "
        f"{keys[j]!r} in {where}")


# ---------------------------------------------------------------------------------------------- batches


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Flatten B items of m crops into one multi-crop mini-batch (``collate_fn`` for DataLoader).

    Returns ``crops`` [B*m, 3, H, W]; ``soft_labels`` [B*m, C] (dense) or ``{name: [B*m, ...]}`` (sparse);
    ``target``, ``index`` [B*m] int64 (each image's value repeated for its m crops); ``slots`` [B*m];
    for augmented stores also ``mixed``, ``lam`` [B*m] and ``partner_target``, ``partner_weight`` [B*m, P].
    Row ``b*m + j`` is crop j of item b.
    """
    if not batch:
        raise ValidationError("collate needs at least one item. Got an empty batch.")
    m = int(batch[0]["crops"].shape[0])
    out: dict[str, Any] = {"crops": _cat([b["crops"] for b in batch])}
    first = batch[0]["soft_labels"]
    if isinstance(first, Mapping):
        out["soft_labels"] = {k: _cat([b["soft_labels"][k] for b in batch]) for k in first}
    else:
        out["soft_labels"] = _cat([b["soft_labels"] for b in batch])
    for key in ("target", "index"):
        out[key] = torch.tensor([int(b[key]) for b in batch], dtype=torch.int64).repeat_interleave(m)
    out["slots"] = _cat([torch.as_tensor(b["slots"]) for b in batch])
    for key in ("mixed", "lam", "partner_target", "partner_weight"):  # augmented stores
        if key in batch[0]:
            out[key] = torch.cat([b[key] for b in batch])
    return out


def _empty(shape: tuple[int, ...], dtype: torch.dtype, dataset: TorchDataset | None = None) -> torch.Tensor:
    """An uninitialised CPU tensor; in a DataLoader worker in shared memory (as default_collate does), so
    sending it to the main process copies nothing. With ``dataset`` (``batch_pool > 0``), inside a worker,
    a buffer of the worker's :class:`_BatchPool` for that dataset, reused once free."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    if dataset is not None and dataset.batch_pool > 0 and _BatchPool.usable():
        return _BatchPool.of(dataset).empty(shape, dtype, dataset.batch_pool)
    return _fresh_shared(shape, dtype)


def _fresh_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(0, dtype=dtype)
    return t.new(t._typed_storage()._new_shared(math.prod(shape), device="cpu")).resize_(shape)


# --------------------------------------------------------------------- pool of shared batch buffers
#
# A fresh shared-memory batch buffer costs more than filling it: every page of it is allocated, zeroed
# and mapped on first touch in the worker, then freed after the main process drops the batch (about
# 0.4 ms per 224-px float32 crop, a third of the crop's whole cost). A worker therefore keeps its batch
# buffers and refills one only when every process is done with it:
#
# * the worker's own references are counted by the buffer's StorageImpl use count (the pool holds a
#   fixed number of them);
# * each time a tensor on a pooled buffer is pickled for the main process, the worker adds one to the
#   buffer's ``sent`` counter (a reducer for torch.Tensor installed in the worker's ForkingPickler, which
#   otherwise defers to torch's); the main process rebuilds it with :func:`_rebuild_pooled`, which puts a
#   finalizer on the rebuilt *storage*. PyTorch keeps a storage's Python object alive for as long as its
#   C++ storage lives (views, ``detach()``, ``numpy()``, ``from_numpy(t.numpy())`` and slices all keep it),
#   so the finalizer runs only once nothing in the main process uses the memory; it then adds one to the
#   buffer's ``released`` counter, through a separate one-page mapping of the counters;
# * a buffer is free when ``released == sent`` and the pool holds the only references in the worker.
#
# The counters are two int64 in a page after the data. Only a worker writes ``sent``, only the main
# process writes ``released``. A pickled batch that is never unpickled (a loader shut down with batches in
# flight) keeps its buffer busy: the pool then allocates fresh buffers instead (it never waits and never
# takes a busy buffer); the main process marks such a buffer released once no live worker owns it (below).
#
# Workers that are not persistent exit after each epoch. So that the next epoch's workers do not start with
# fresh buffers, the main process keeps a mapping of each pooled buffer it received from a worker it forked
# (``TorchDataset._retained``, at most num_workers x batch_pool per batch size, freed with the dataset);
# workers forked later inherit these mappings and claim them. A worker owns every buffer it uses through an
# open-file-description lock (F_OFD_SETLK) held until it exits, so two live workers (of two loaders over one
# dataset) never share one. Used only with the "file_descriptor" sharing strategy (Linux's default).

_PAGE = mmap.PAGESIZE
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None) if fcntl is not None else None
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None) if fcntl is not None else None
_WRITE_LOCK = struct.pack("hhqqixxxx", fcntl.F_WRLCK, 0, 0, 0, 0) if fcntl is not None else b""  # struct flock
_RELEASE_LOCK = threading.RLock()  # an RLock: a finalizer may run (garbage collection) while it is held
_LIVE: dict[tuple[int, int], int] = {}  # main process: buffer (st_dev, st_ino) -> rebuilt storages still alive
_DATASETS: weakref.WeakValueDictionary[str, TorchDataset] = weakref.WeakValueDictionary()  # token -> dataset


class _PooledBuffer:
    """One shared batch buffer: ``nbytes`` of data, then a page holding the int64 counters (sent, released)."""

    __slots__ = ("counters", "idle_refs", "key", "lock_fd", "nbytes", "storage", "trailer")

    def __init__(self, storage: torch.UntypedStorage, nbytes: int):
        self.storage, self.nbytes, self.trailer = storage, nbytes, _trailer(nbytes)
        self.counters = torch.empty(0, dtype=torch.int64).set_(storage, self.trailer // 8, (2,)).numpy()
        self.idle_refs = _USE_COUNT(storage._cdata)  # the references this object holds
        self.key: tuple[int, int] | None = None
        self.lock_fd: int | None = None

    @classmethod
    def new(cls, nbytes: int) -> _PooledBuffer:
        buf = cls(torch.UntypedStorage._new_shared(_trailer(nbytes) + _PAGE), nbytes)
        buf.counters[:] = 0
        return buf

    def claim(self) -> bool:
        """Own the buffer for the rest of this process's life (False: another live process owns it)."""
        fd, _ = self.storage._share_fd_cpu_()
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)  # a file description of our own
        try:
            fcntl.fcntl(own, _OFD_SETLK, _WRITE_LOCK)
        except OSError:
            os.close(own)
            return False
        self.lock_fd = own
        return True

    def unclaim(self) -> None:
        os.close(self.lock_fd)
        self.lock_fd = None

    def free(self) -> bool:
        return self.counters[0] == self.counters[1] and _USE_COUNT(self.storage._cdata) == self.idle_refs

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, dtype=dtype).set_(self.storage, 0, (math.prod(shape),)).view(shape)


def _trailer(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE  # the counters get a page of their own (mapped alone by the main process)


class _BatchPool:
    """The batch buffers one DataLoader worker process uses for one dataset (see the comment above)."""

    # this process's pools (dataset token -> pool) and its pooled buffers (data_ptr -> (buffer, retain info))
    pools: ClassVar[dict[str, _BatchPool]] = {}
    by_ptr: ClassVar[dict[int, tuple[_PooledBuffer, tuple | None]]] = {}
    pid: ClassVar[int | None] = None

    def __init__(self, retained: Mapping[int, list[_PooledBuffer]], retain: tuple | None):
        self.buffers: dict[int, list[_PooledBuffer]] = {}
        self.candidates = {k: list(v) for k, v in retained.items()} if retain is not None else {}
        self.retain = retain

    @staticmethod
    def usable() -> bool:
        return (_USE_COUNT is not None and _OFD_SETLK is not None and os.path.isdir("/proc/self/fd")
                and torch.multiprocessing.get_sharing_strategy() == "file_descriptor")

    @classmethod
    def of(cls, dataset: TorchDataset) -> _BatchPool:
        if cls.pid != os.getpid():  # first use in this process (a worker)
            from multiprocessing.reduction import ForkingPickler

            cls.pools, cls.by_ptr, cls.pid = {}, {}, os.getpid()
            torch_reduce = ForkingPickler._extra_reducers[torch.Tensor]
            ForkingPickler.register(torch.Tensor, functools.partial(_reduce_pooled, torch_reduce))
        pool = cls.pools.get(dataset._pool_token)
        if pool is None:
            info = torch.utils.data.get_worker_info()
            forked = dataset._owner_pid == os.getppid()  # forked from the dataset's process (not spawn/forkserver)
            retain = (dataset._pool_token, dataset.batch_pool * info.num_workers, os.getppid()) if forked else None
            pool = cls.pools[dataset._pool_token] = cls(dataset._retained, retain)
        return pool

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, limit: int) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        same = self.buffers.setdefault(nbytes, [])
        for buf in same:
            if buf.free():
                return buf.view(shape, dtype)
        candidates = self.candidates.get(nbytes, [])
        while len(same) < limit:
            if candidates:
                buf = candidates.pop()
                if not buf.claim():
                    continue  # a buffer the main process kept, owned by another live worker
                if not buf.free():  # still held in the main process, or its batches were lost (_lost)
                    buf.unclaim()
                    continue
            else:
                buf = _PooledBuffer.new(nbytes)
                buf.claim()  # nobody else knows it yet
            same.append(buf)
            type(self).by_ptr[buf.storage.data_ptr()] = (buf, self.retain)
            if buf.free():
                return buf.view(shape, dtype)
        return _fresh_shared(shape, dtype)


def _reduce_pooled(torch_reduce, t: torch.Tensor):
    """ForkingPickler reducer for torch.Tensor in a worker: torch's, plus a release hook for pooled buffers."""
    rebuild, args = torch_reduce(t)
    plain = t.device.type == "cpu" and t.layout == torch.strided
    entry = _BatchPool.by_ptr.get(t.untyped_storage().data_ptr()) if plain else None
    if entry is None:
        return rebuild, args
    buf, retain = entry
    buf.counters[0] += 1  # sent; counted before the bytes leave the worker
    return _rebuild_pooled, (rebuild, args, buf.nbytes, retain)


def _rebuild_pooled(rebuild, args, nbytes: int, retain: tuple | None) -> torch.Tensor:
    """Unpickle a tensor on a worker's pooled buffer (main process): torch's rebuild, then a finalizer on its
    storage that marks the buffer released when the storage dies; keeps the buffer for later workers."""
    t = rebuild(*args)
    storage = t.untyped_storage()
    fd, _ = storage._share_fd_cpu_()  # the rebuilt storage's own descriptor (it is already fd-backed)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    counters = mmap.mmap(fd, _PAGE, offset=_trailer(nbytes))
    with _RELEASE_LOCK:
        _LIVE[key] = _LIVE.get(key, 0) + 1
    weakref.finalize(storage, _release, counters, key).atexit = False
    if retain is not None:
        token, bound, parent = retain
        dataset = _DATASETS.get(token)
        if dataset is not None and parent == os.getpid():
            _retain(dataset._retained.setdefault(nbytes, []), fd, key, nbytes, bound)
    return t


def _retain(kept: list[_PooledBuffer], fd: int, key: tuple[int, int], nbytes: int, bound: int) -> None:
    """Keep buffer ``key`` for the workers forked later (at most ``bound`` of this size), and mark released
    the kept buffers whose batches were lost (see :func:`_lost`)."""
    with _RELEASE_LOCK:  # the pin-memory thread unpickles too
        for buf in kept:
            if buf.counters[0] != buf.counters[1] and _lost(buf):
                buf.counters[1] = buf.counters[0]
        if len(kept) < bound and all(b.key != key for b in kept):
            buf = _PooledBuffer(torch.UntypedStorage._new_shared_fd_cpu(fd, _trailer(nbytes) + _PAGE), nbytes)
            buf.key = key
            kept.append(buf)


def _lost(buf: _PooledBuffer) -> bool:
    """A kept buffer with batches sent but not released, no live user in the main process and no live worker
    owning it: its last batches were dropped unread (a loader shut down with batches in flight, e.g. after
    ``break``). A worker exits only after the main process read all it sent or dropped the loader, so nothing
    can still arrive on it."""
    if _LIVE.get(buf.key):
        return False
    fd, _ = buf.storage._share_fd_cpu_()
    probe = struct.unpack("hhqqixxxx", fcntl.fcntl(fd, _OFD_GETLK, _WRITE_LOCK))
    return probe[0] == fcntl.F_UNLCK


def _release(counters: mmap.mmap, key: tuple[int, int]) -> None:
    with _RELEASE_LOCK:  # finalizers may run in the pin-memory thread and the main thread
        struct.pack_into("=q", counters, 8, struct.unpack_from("=q", counters, 8)[0] + 1)
        left = _LIVE.pop(key) - 1
        if left:
            _LIVE[key] = left
    counters.close()


def _preload_records(reader: Reader, preload: bool | None, complete: bool) -> EpochRecords | None:
    """The epoch preload of a dataset (None: batches read the store): see ``TorchDataset(preload=...)``."""
    if preload is None:
        preload = bool(getattr(reader._source, "remote", False)) and complete
    elif not isinstance(preload, bool):
        raise TypeError(f"preload must be True, False or None. Got {preload!r}.")
    if preload and not complete:
        raise IncompleteStoreError(f"preload=True needs a complete store (the epoch preload reads every image); "
                                   f"{reader.path} is incomplete. Pass preload=False to read the written images "
                                   f"by batch.")
    return EpochRecords() if preload else None


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0. When the tensors are the consecutive rows of one contiguous tensor (the batch
    buffers ``__getitems__`` fills) that tensor is returned, reshaped, without a copy; otherwise the result
    is allocated with :func:`_empty`."""
    base = tensors[0]._base
    shape = (sum(int(t.shape[0]) for t in tensors), *tensors[0].shape[1:])
    if base is not None and base.is_contiguous() and base.numel() == math.prod(shape):
        offset = base.storage_offset()
        for t in tensors:
            if t._base is not base or not t.is_contiguous() or t.storage_offset() != offset \
                    or t.shape[1:] != tensors[0].shape[1:]:
                break
            offset += t.numel()
        else:
            return base.view(shape)
    if tensors[0].device.type != "cpu":
        return torch.cat(tensors)
    return torch.cat(tensors, out=_empty(shape, tensors[0].dtype))


def densify(fields: Mapping[str, Any], codec_or_store, num_classes: int | None = None, device=None,
            temperature: float | None = None) -> torch.Tensor:
    """Decode sparse codec fields (``soft_labels="sparse"`` batches) to [..., C] float32 on ``device``.

    ``codec_or_store``: a :class:`fkdstore.codecs.LabelCodec`, codec name or config (then ``num_classes``
    is required), or a :class:`fkdstore.Reader` / :class:`TorchDataset` (which know it). ``device``
    defaults to the fields' device; fields are moved there first (non-blocking), so decoding runs on the GPU.
    ``temperature``: passed to ``codec.decode`` (a finite number > 0, else :class:`ValidationError`); default
    the :class:`TorchDataset`'s ``temperature`` when given one, else 1.
    """
    if temperature is None:
        temperature = codec_or_store.temperature if isinstance(codec_or_store, TorchDataset) else 1.0
    temperature = _codecs.parse_temperature(temperature)
    if isinstance(codec_or_store, (Reader, TorchDataset)):
        codec, C = codec_or_store.codec, codec_or_store.num_classes
        if num_classes is not None and int(num_classes) != C:
            raise ValidationError(f"num_classes must match the store's {C}. Got {num_classes}.")
    else:
        if isinstance(codec_or_store, _codecs.LabelCodec):
            codec = codec_or_store
        elif isinstance(codec_or_store, str):
            codec = _codecs.get_codec(codec_or_store)
        elif isinstance(codec_or_store, Mapping):
            codec = _codecs.from_config(dict(codec_or_store))
        else:
            raise TypeError(f"codec_or_store must be a codec, codec name/config, Reader or TorchDataset. "
                            f"Got {type(codec_or_store).__name__}.")
        if num_classes is None:
            raise ValidationError("num_classes is required when densify is given a codec")
        C = int(num_classes)
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a mapping of name -> tensor. Got {type(fields).__name__}.")
    tensors = {}
    for k, v in fields.items():
        t = torch.from_numpy(_torch_friendly(v)) if isinstance(v, np.ndarray) else v
        tensors[k] = t.to(device, non_blocking=True) if device is not None else t
    return codec.decode(tensors, C, temperature=temperature)


class BatchMix(NamedTuple):
    """Result of :func:`mix_batch`: mixed ``images`` and ``soft_labels``, the weight ``lam`` of each crop's
    own image/label, ``index`` (crop ``b``'s partner is crop ``index[b]``; use it for the hard-label term
    ``lam * CE(target) + (1 - lam) * CE(target[index])``) and the CutMix ``box`` (None for Mixup)."""

    images: torch.Tensor
    soft_labels: torch.Tensor
    lam: float
    index: torch.Tensor
    box: tuple[int, int, int, int] | None


def mix_batch(images: torch.Tensor, soft_labels: torch.Tensor, mode: str = "mixup", alpha: float = 1.0,
              seed: int = 0, step: int = 0) -> BatchMix:
    """Training-time Mixup / CutMix of a batch of crops AND their stored soft labels (FKD's way), on any device.

    ``images`` [B, C, H, W] (uint8 or float), ``soft_labels`` [B, K] float (dense, e.g. from
    :func:`densify`). The draws are :func:`fkdstore.augment.batch.mix_params` ``(seed, step)`` (so the
    result depends only on the seed, the step and the batch), identical to the numpy
    :func:`fkdstore.augment.mix_batch`: ``x' = lam x + (1 - lam) x[index]`` (uint8 rounded as the numpy
    version, in float64) or the CutMix box pasted from ``x[index]``; ``y' = lam y + (1 - lam) y[index]``.
    Inputs are not modified.
    """
    from .augment.batch import mix_params

    if not isinstance(images, torch.Tensor) or not isinstance(soft_labels, torch.Tensor):
        raise TypeError(f"images and soft_labels must be torch tensors. Got {type(images).__name__} and "
                        f"{type(soft_labels).__name__}.")
    if images.dim() != 4:
        raise ValidationError(f"images must have shape [B, C, H, W]. Got {tuple(images.shape)}.")
    if soft_labels.dim() != 2 or soft_labels.shape[0] != images.shape[0]:
        raise ValidationError(f"soft_labels must have shape [B={images.shape[0]}, K]. Got {tuple(soft_labels.shape)}.")
    if not soft_labels.is_floating_point():
        raise TypeError(f"soft_labels must be floating point. Got {soft_labels.dtype}.")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point. Got {images.dtype}.")
    B, _, H, W = images.shape
    lam, index_np, box = mix_params(B, (H, W), mode=mode, alpha=alpha, seed=seed, step=step)
    index = torch.from_numpy(index_np).to(images.device)
    partner = images[index]
    if box is None:
        if images.dtype == torch.uint8:
            mixed = torch.floor(lam * images.double() + (1.0 - lam) * partner.double() + 0.5)
            out = mixed.clamp_(0, 255).to(torch.uint8)
        else:
            out = (lam * images + (1.0 - lam) * partner).to(images.dtype)
    else:
        y1, x1, y2, x2 = box
        out = images.clone()
        out[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]
    labels = (lam * soft_labels + (1.0 - lam) * soft_labels[index.to(soft_labels.device)]).to(soft_labels.dtype)
    return BatchMix(out, labels, lam, index, box)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                       reduction: str = "mean") -> torch.Tensor:
    """FKD's loss ``-sum_c target_c * log_softmax(logits / T)_c`` per row, averaged over rows (``"mean"``).

    ``logits`` and ``target`` are [N, C] (any leading dims); ``target`` rows are probability
    distributions (the stored teacher labels were already computed at the teacher's temperature). No
    ``T**2`` factor is applied: multiply by ``temperature**2`` yourself for Hinton-style gradient scaling.
    With a one-hot target and T = 1 this equals ``F.cross_entropy``. ``reduction``: mean | sum | none.
    """
    if logits.shape != target.shape:
        raise ValidationError(f"logits and target must have the same shape. Got {tuple(logits.shape)} and "
                              f"{tuple(target.shape)}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValidationError(f"temperature must be a finite number > 0. Got {temperature!r}.")
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    loss = -(target.to(logp.dtype) * logp).sum(-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValidationError(f"reduction must be one of ['mean', 'sum', 'none']. Got {reduction!r}.")
