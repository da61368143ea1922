"""PyTorch side of fkdstore: replay stored crops and soft labels in any training loop (FKD's training phase).

:class:`TorchDataset` is a map-style dataset over the images of a store. Item ``i`` loads image ``i`` once
and returns ``m`` of its ``M`` stored crops, replayed with the shared crop function
(:func:`fkdstore.transforms.replay_crops`), together with their soft labels::

    ds = fkdstore.TorchDataset("labels.zarr", "train/", crops_per_sample=4)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=8, collate_fn=fkdstore.collate)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                      # before iter(loader)
        for batch in loader:                     # batch["crops"] [64*4, 3, H, W], batch["soft_labels"] [256, C]
            loss = fkdstore.soft_cross_entropy(model(batch["crops"]), batch["soft_labels"])

A label-map store (ReLabel, ``kind = "label_map"``) gets a :class:`fkdstore.pytorch_maps.LabelMapDataset`
instead, with the same item layouts: fresh crops per epoch or a region store's crops (``crops_from=``), and
each crop's soft label pooled from the image's map (see that module).

Two item layouts (``item=``):

``item="dict"`` (default): item ``i`` is a dict, flattened into a multi-crop batch by :func:`collate`:

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

``item="pair"``: item ``i`` is ``(image, target)``, as an ImageFolder-style dataset returns, for torch's
``default_collate`` and any loss taking soft targets (timm's ``SoftTargetCrossEntropy``,
:func:`soft_cross_entropy`, ``F.cross_entropy`` with probability targets):

===============  =========================================  ====================================================
``m``            ``image``                                  ``target``
===============  =========================================  ====================================================
1                [3, H, W]                                  [C] float32 (dense), or ``{name: [...]}`` (sparse)
> 1              [m, 3, H, W]: the image's m crops          [m, C], or ``{name: [m, ...]}``: row j labels crop j
===============  =========================================  ====================================================

``default_collate`` stacks them to ``[B, 3, H, W]`` / ``[B, C]`` (m = 1, exactly an image classification
batch with soft targets) or ``[B, m, 3, H, W]`` / ``[B, m, C]`` (flatten both with ``.flatten(0, 1)``);
:func:`collate` returns the flattened ``(images [B*m, 3, H, W], targets [B*m, C])`` without copying. A sparse
target (a dict of codec fields) is densified on the device by :func:`densify` or :class:`DeviceLoader`. The
pair is the store's soft label only: the ground-truth class and the mixing weights of augmented stores are in
the dict layout.

A store made with augmentation policies (``generate(augment=...)``, header ``augment``) is replayed
pixel-exactly from its stored ``aug`` columns by :func:`fkdstore.augment.replay.replay_slots`, the
function the teacher-runner called (a mixed slot also loads its partner image and reads the partner
slot's box, flip and params). Its dict items hold four more keys (P = number of mixing policies):

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
written straight into one batch tensor by the shared crop function, with flip, HWC -> CHW and normalisation
fused into one pass per crop, bit-identical to ``normalize(replay_crops(...))``, which the teacher-runner saw;
:func:`collate` hands that tensor on without copying.

Batch buffers (``batch_pool``): inside a DataLoader worker the batch tensor lives in one of the worker's
shared-memory buffers (``Tensor.share_memory_()``), so sending it to the main process copies nothing, and the
worker refills a buffer only once the main process has dropped every tensor and array that uses the batch's
memory. How, with public APIs only: the worker builds the batch as ``torch.from_numpy`` of a numpy view of
the buffer and holds only a weak reference to that view (it is dead once the worker's own tensors are);
:func:`collate` marks the batch tensor (a ``torch.Tensor`` subclass whose ``__reduce_ex__`` sends the shared
buffer and a shared release counter, counting the send); the main process rebuilds it as ``torch.from_numpy``
of a numpy view and puts a ``weakref.finalize`` on that view, which runs once nothing uses the memory (views,
``numpy()``, ``detach()`` and pinned copies' sources included: all keep the view alive) and adds one to the
counter. A buffer is free when the worker's view is dead and the counter equals the sends. Batches that are
never received (a loader shut down mid-epoch) keep their buffer busy; the worker then allocates others, up to
``batch_pool`` per batch size, and beyond that (or with ``batch_pool=0``) a batch on fresh shared memory, as
``default_collate`` allocates its batches in a worker, so sending it copies nothing either. Buffers live as
long as their worker.

The fast path: ``normalize=False`` gives uint8 crops (4x fewer bytes to write, send and copy to the device)
and :class:`DeviceLoader` moves each batch to the device, normalises it there (and densifies sparse labels),
overlapping the copy with compute on a CUDA side stream; ``benchmarks/dataset_throughput.py`` measures it
against a plain PIL loader.

A remote store (a URL) is read by epoch instead: ``set_epoch`` reads the epoch's records with one
``read_all(slots)`` into shared memory the workers map (:mod:`fkdstore.preload`; ``preload=`` chooses), since a
random batch from object storage costs hundreds of requests. For a local store the per-batch read is as fast
and runs in the workers (``benchmarks/dataset_throughput.py --label-store-images`` compares the two paths).

Images come from any :mod:`fkdstore.sources` source (folder, file list, URL prefix, tar shards,
``datasets``, a mapping); each batch is announced to the source first, so a remote one fetches the batch's
bytes ahead of decoding.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from . import codecs as _codecs
from . import storage as _storage
from .augment.batch import BatchMix, mix_params
from .augment.pipeline import Pipeline
from .augment.replay import Partner, mix_weights, replay_slots
from .errors import CorruptStoreError, ExternalReplayError, IncompleteStoreError, ValidationError
from .preload import EpochRecords
from .reader import CropRecords, Reader, RegionReader, as_regions
from .reader import open as _open_store
from .sources import ImageSource, as_source
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Replay, parse_input_size, replay_crops, write_crops
from .transforms import normalize as _normalize
from .validation import int_in_range

if TYPE_CHECKING:
    from PIL import Image
    from typing_extensions import TypeIs  # typing.TypeIs from Python 3.13

__all__ = ["TorchDataset", "DeviceLoader", "collate", "densify", "soft_cross_entropy", "epoch_slots", "mix_batch",
           "BatchMix"]

LABEL_MODES = ("dense", "sparse")
ITEM_MODES = ("dict", "pair")

_Labels = torch.Tensor | dict[str, torch.Tensor]  # an item's soft labels: dense [m, C], or sparse codec fields


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


class _Cache(TypedDict):
    """How a dataset reopens a URL store in a worker: :func:`fkdstore.open`'s ``cache_dir`` and ``cache_bytes``."""

    cache_dir: str | os.PathLike | None
    cache_bytes: int | None


class _StoreImages(torch.utils.data.Dataset):
    """What :class:`TorchDataset` and :class:`fkdstore.pytorch_maps.LabelMapDataset` share: the store's images
    (the source, matched to the store's keys and sizes), their targets, the written images the dataset covers,
    the crops' replay options and the epoch (in shared memory, so persistent workers see :meth:`set_epoch`)."""

    _store_path: str | None  # None: opened from a Reader, which pickles itself
    _images: ImageSource
    _sizes: np.ndarray
    _targets: np.ndarray
    image_indices: np.ndarray
    _epoch: torch.Tensor

    def _bind_images(self, reader: Reader, images: Any, image_options: Mapping[str, Any] | None,
                     allow_incomplete: bool) -> None:
        """Open the image source and check it against the store: keys (:func:`_match_images`), written
        images (:class:`IncompleteStoreError` unless ``allow_incomplete``); targets: the store's labels, else
        the source's."""
        self._images = as_source(images, storage_options=image_options)
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
        self._epoch = torch.zeros((), dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # pragma: no cover - no shared memory: workers see it at (re)start
            pass

    def _set_replay(self, stored: Replay, *, output_size: int | tuple[int, int] | None, interpolation: str | None,
                    mean: Sequence[float] | None, std: Sequence[float] | None, normalize: bool,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None, item: str) -> None:
        """The crops' replay: ``stored`` with the arguments that are not None (each validated), and the item
        layout."""
        if item not in ITEM_MODES:
            raise ValidationError(f"item must be one of {list(ITEM_MODES)}. Got {item!r}.")
        self.item = item
        size = stored.input_size if output_size is None else parse_input_size(output_size, "output_size")
        self.replay = Replay(  # Replay parses any sequence of 3 numbers; its fields are typed as the parsed tuples
            input_size=size, interpolation=stored.interpolation if interpolation is None else interpolation,
            mean=stored.mean if mean is None else mean, std=stored.std if std is None else std)  # type: ignore[arg-type]
        self.output_size, self.interpolation = self.replay.input_size, self.replay.interpolation
        self.mean, self.std = self.replay.mean, self.replay.std
        self.normalize = bool(normalize)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable. Got {type(transform).__name__}.")
        self.transform = transform

    def __getstate__(self) -> dict[str, Any]:
        """Pickled by location: a store opened from a path or URL is reopened in the process that unpickles."""
        d = self.__dict__.copy()
        if self._store_path is not None:
            d["_reader"] = None  # reopened lazily in the worker
        return d

    @property
    def images(self) -> ImageSource:
        """The image source, checked against the store: image ``i`` of the source is store image ``i``
        (``images.load(i)`` decodes it, as an item does before its size check and crops)."""
        return self._images

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        """The epoch whose crops the items replay (:meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch``. Call it before ``iter(loader)``; persistent workers see it too."""
        self._epoch.fill_(int_in_range("epoch", epoch, 0))

    def _epoch_or_current(self, epoch: int | None) -> int:
        return self.epoch if epoch is None else int_in_range("epoch", epoch, 0)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.image_indices)

    def _store_indices(self, items: Sequence[int]) -> np.ndarray:
        """The store indices of dataset items ``items`` (negative ones count from the end, others out of range
        raise IndexError), announced to the image source so that a remote one fetches them ahead."""
        pos = np.asarray([int(k) for k in items], dtype=np.int64)
        n = len(self)
        bad = (pos < -n) | (pos >= n)
        if bad.any():
            raise IndexError(f"item {int(pos[bad][0])} is out of range for a dataset of {n} images")
        idx = self.image_indices[pos]
        self._images.prefetch(idx.tolist())
        return idx

    def _load(self, i: int) -> Image.Image:
        """Image ``i`` decoded and its size checked against the store's."""
        image = self._images.load(i)
        H, W = self._sizes[i].tolist()
        if image.size != (W, H):
            raise ValidationError(
                f"image {i} ({self._images.name(i)}) has size (height={image.size[1]}, width={image.size[0]}) but "
                f"the store recorded (height={H}, width={W}); the images changed since the store was made")
        return image


class TorchDataset(_StoreImages):
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
        normalize: return float32 ``(x/255 - mean)/std`` (True) or the uint8 crops (False: the fast path;
            :class:`DeviceLoader` or :func:`fkdstore.transforms.normalize` normalise on the device, and 4x
            fewer bytes are written, sent between processes and copied to the device).
        mean, std: default the store's replay ``mean`` / ``std``, else ImageNet's.
        temperature: decoding temperature ``T`` (``codec.decode(..., temperature=T)``; for a ``logits`` store
            ``softmax(z / T)``, for probability codecs ``normalise(p ** (1/T))``): a finite number > 0 that
            the codec can decode at (:meth:`~fkdstore.codecs.LabelCodec.check_temperature`: a q8 ``logits`` store
            refuses T < 1, a ``sampled`` store without ``logp`` any T != 1), checked here
            (:class:`ValidationError`). Also the default of :func:`densify` for this dataset.
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
        item: ``"dict"`` (default; for :func:`collate`) or ``"pair"``: ``(image, target)`` items for torch's
            default collate and any soft-target loss (see the module docstring for their shapes).
        batch_pool: shared-memory batch buffers each DataLoader worker keeps and refills per batch size
            (default 4: DataLoader's default ``prefetch_factor`` 2 + 2; use ``prefetch_factor + 2``; /dev/shm
            must hold ``num_workers * batch_pool`` batches). A buffer is refilled only once the main process
            has dropped every reference to the batch's memory, so holding batches is safe. 0: no buffers
            (each batch is written into fresh shared memory, as ``default_collate`` does). Only batches made by
            :func:`collate` use them; no effect without workers.
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

    def __new__(cls, store: Any = None, images: Any = None, **kwargs: Any) -> Any:
        """A label-map store gets a :class:`fkdstore.pytorch_maps.LabelMapDataset` (same item layout, each
        crop's soft label pooled from the image's map; its own options: ``crops_from``, ``crop_sampler``);
        a crop-regions store gets this class."""
        if cls is TorchDataset and store is not None:
            from . import pytorch_maps  # noqa: PLC0415 - import cycle: pytorch_maps imports this module

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
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        item: str = "dict",
        batch_pool: int = 4,
        external_replay: Callable[..., Any] | None = None,
        preload: bool | None = None,
    ) -> None:
        self._cache: _Cache = {"cache_dir": cache_dir, "cache_bytes": cache_bytes}
        # storage_options serve whichever of store and images is a URL
        image_options = _storage.options_for(images, storage_options)
        if isinstance(store, Reader):
            if (storage_options and image_options is None) or cache_dir is not None or cache_bytes is not None:
                raise TypeError("storage_options, cache_dir and cache_bytes apply when store is a path or URL, "
                                "not an opened Reader (pass them to fkdstore.open).")
            reader, self._store_path, storage_options = as_regions(store), None, None
        else:
            self._store_path = os.fspath(store)
            if image_options is not None:
                storage_options = _storage.options_for(self._store_path, storage_options)
            # local + options: TypeError; a label-map store went to LabelMapDataset (__new__)
            reader = as_regions(_open_store(store, storage_options=storage_options, **self._cache))
        self._storage_options = dict(storage_options) if storage_options else None
        self._reader: RegionReader | None = reader
        self.num_classes = reader.num_classes
        self.crops_per_image = reader.crops_per_image
        self.codec = reader.codec
        stored = reader.header.replay or Replay()  # checksummed in the header (4.0), validated at open

        self.crops_per_sample = int_in_range("crops_per_sample", crops_per_sample, 1)
        if self.crops_per_sample > self.crops_per_image:
            raise ValidationError(
                f"crops_per_sample must be <= the store's crops_per_image={self.crops_per_image}. "
                f"Got {crops_per_sample}.")
        if soft_labels not in LABEL_MODES:
            raise ValidationError(f"soft_labels must be one of {list(LABEL_MODES)}. Got {soft_labels!r}.")
        self.soft_labels = soft_labels
        self.seed = int_in_range("seed", seed, 0)
        self._set_replay(stored, output_size=output_size, interpolation=interpolation, mean=mean, std=std,
                         normalize=normalize, transform=transform, item=item)
        self.temperature = self.codec.check_temperature(temperature)  # a refused temperature fails here
        self.batch_pool = int_in_range("batch_pool", batch_pool, 0)
        self._pool_token = os.urandom(8).hex()  # names this dataset's buffers in a worker's pool

        self._bind_images(reader, images, image_options, allow_incomplete)
        # Validated at open (fkdstore.reader refuses unknown policies); None = crop and flip only (fast path).
        pipeline = reader.header.augment
        self.augment = pipeline if len(pipeline) else None
        self.external_replay = _check_external(pipeline, external_replay, reader)
        self._preload = _preload_records(reader, preload, len(self.image_indices) == reader.num_images)
        self.set_epoch(epoch)

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Select the slots of ``epoch``. Call it before ``iter(loader)``; persistent workers see it too. With
        ``preload``, this reads the epoch's labels (in this process, into memory the workers share)."""
        super().set_epoch(epoch)
        if self._preload is not None and self._preload.epoch != int(epoch):
            r = self.reader
            slots = epoch_slots_many(range(r.num_images), int(epoch), self.crops_per_sample, self.crops_per_image,
                                     self.seed)
            self._preload.fill(r, slots, int(epoch))

    def slots(self, item: int, epoch: int | None = None) -> np.ndarray:
        """The slots item ``item`` uses in ``epoch`` (default: the current epoch)."""
        i = int(self.image_indices[item])
        return epoch_slots(i, self._epoch_or_current(epoch), self.crops_per_sample, self.crops_per_image, self.seed)

    # ------------------------------------------------------------------ store handle, pickling
    @property
    def reader(self) -> RegionReader:
        if self._reader is None:
            self._reader = as_regions(_open_store(self._store_path, storage_options=self._storage_options,
                                                  **self._cache))
        return self._reader

    # ------------------------------------------------------------------ items
    def __getitem__(self, item: int) -> dict[str, Any] | tuple[torch.Tensor, Any]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]] | list[tuple[torch.Tensor, Any]]:
        """A batch of items (dicts, or ``(image, target)`` pairs with ``item="pair"``); used by DataLoader.

        Labels: one ``read_batch`` and one decode for the whole batch. Crops: every item's crops are written
        (in one fused crop/flip/layout/normalise pass per crop) into one batch tensor, so :func:`collate`
        returns that tensor without copying.
        """
        out = self._items(items)
        if self.item == "dict":
            return out
        if self.crops_per_sample == 1:  # (image [3, H, W], target [C] or {name: [...]})
            return [(d["crops"][0], _first(d["soft_labels"])) for d in out]
        return [(d["crops"], d["soft_labels"]) for d in out]

    def _items(self, items: Sequence[int]) -> list[dict[str, Any]]:
        idx = self._store_indices(items)
        slots, rec, soft = self._read_labels(idx)
        if self.augment is not None:
            return self._augmented_items(self.augment, idx, slots, rec, soft)
        dtype = torch.float32 if self.normalize else torch.uint8
        bufs = _batch_tensor(self, (len(idx), self.crops_per_sample, 3, *self.output_size), dtype).unbind(0)
        return [{"crops": self._crops(i, boxes, flips, out=buf), "soft_labels": lab, "target": target,
                 "index": i, "slots": sl}
                for i, target, boxes, flips, buf, lab, sl in zip(
                    idx.tolist(), self._targets[idx].tolist(), rec.boxes, rec.flips, bufs, soft,
                    torch.from_numpy(slots).unbind(0))]

    def _read_labels(self, idx: np.ndarray) -> tuple[np.ndarray, CropRecords, Sequence[_Labels]]:
        """Slots (B, m), records and per-item soft labels of store images ``idx``: one ``read_batch`` (or the
        epoch's preloaded records) and one decode; item ``b``'s labels are views of the batch's (so
        :func:`collate` does not copy them)."""
        e, m, M = self.epoch, self.crops_per_sample, self.crops_per_image
        slots = epoch_slots_many(idx, e, m, M, self.seed)
        if self._preload is not None and self._preload.epoch == e:
            rec = self._preload.records(idx)
        else:
            rec = self.reader.read_batch(idx, slots)
        soft: Sequence[_Labels]
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
    def _augmented_items(self, pipeline: Pipeline, idx: np.ndarray, slots: np.ndarray, rec: CropRecords,
                         soft: Sequence[_Labels]) -> list[dict[str, Any]]:
        """Items of a store with an augmentation ``pipeline``: every slot replayed from its stored params."""
        self._check_params(pipeline, idx, slots, rec.aug)
        dtype = torch.float32 if self.normalize else torch.uint8
        bufs = _batch_tensor(self, (len(idx), self.crops_per_sample, 3, *self.output_size), dtype).unbind(0)
        out = []
        for b, i in enumerate(idx.tolist()):
            params = {k: v[b] for k, v in rec.aug.items()}
            crops, ext_lam = self._augmented_crops(pipeline, i, slots[b], rec.box[b], rec.flip[b], params, bufs[b])
            if ext_lam is None:
                lam, pidx, pw = mix_weights(pipeline, params, self.output_size)
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

    def _check_params(self, pipeline: Pipeline, idx: np.ndarray, slots: np.ndarray,
                      aug: Mapping[str, np.ndarray]) -> None:
        """Stored params of a batch checked by ``pipeline`` (ranges, partner indices); a bad value raises
        :class:`CorruptStoreError` naming the array, the image and the slot."""
        r = self.reader
        N, M, size = r.num_images, self.crops_per_image, self.output_size
        try:
            pipeline.validate(aug, num_images=N, crops_per_image=M, image_size=size)
            return
        except ValidationError:
            pass
        for b, i in enumerate(idx.tolist()):
            for k, s in enumerate(slots[b].tolist()):
                for pol in pipeline.policies:
                    cols = [c.name for c in pol.columns()]
                    try:
                        pol.validate({c: aug[c][b, k] for c in cols}, num_images=N, crops_per_image=M, image_size=size)
                    except ValidationError as e:
                        named = [c for c in cols if f"'{c}" in str(e)] or cols
                        raise CorruptStoreError(
                            f"store {r.path}: array {', '.join('aug/' + c for c in named)} (policy {pol.name!r}), "
                            f"image {i} ({r.image_key(i)!r}), slot {s}: {e}") from None
        raise CorruptStoreError(f"store {r.path}: the augment params of images {idx.tolist()} are not valid")

    def _augmented_crops(self, pipeline: Pipeline, i: int, slots: np.ndarray, boxes: np.ndarray, flips: np.ndarray,
                         params: Mapping[str, np.ndarray],
                         out: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """``(crops [m, 3, H, W], lam)``: ``lam`` (m,) from an external replay, else None (see mix_weights)."""
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

        if pipeline.external is not None:
            hwc, lam = self._external_crops(image, slots, params, partner_image)
        else:
            hwc, lam = replay_slots(pipeline, image, slots.tolist(), boxes, flips, params, self.output_size,
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

    def __repr__(self) -> str:
        return (f"fkdstore.TorchDataset(images={len(self)}, crops_per_sample={self.crops_per_sample}, "
                f"crops_per_image={self.crops_per_image}, output_size={self.output_size}, "
                f"soft_labels={self.soft_labels!r}, item={self.item!r}, epoch={self.epoch}, seed={self.seed})")


def _first(labels):
    """Row 0 of a dense label tensor or of every field of a sparse one."""
    return {k: v[0] for k, v in labels.items()} if isinstance(labels, Mapping) else labels[0]


def _check_external(pipeline, external_replay, reader):
    """``external_replay`` for a store whose pipeline is an ``external_seed`` policy (refused without one);
    None otherwise (a replay given for any other store is refused too)."""
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
            f"{len(store_keys)} images are missing); the images must be the ones the store was made from"
            + _renamed_hint([k for _, k in missing], keys))
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


def _renamed_hint(missing: list[str], listed: list[str]) -> str:
    """A hint when missing store keys exist under another file extension (images re-encoded, e.g. .jpg -> .png):
    the keys, and the crops' pixel values, belong to the original files."""
    stems = {os.path.splitext(k)[0]: k for k in listed}
    renamed = [(k, stems[os.path.splitext(k)[0]]) for k in missing if os.path.splitext(k)[0] in stems]
    if not renamed:
        return ""
    (a, b), n = renamed[0], len(renamed)
    return (f". {n} of them are here with another extension ({a!r} in the store, {b!r} here): the images were "
            f"re-encoded or renamed; use the files the store was made from (its keys include the extension, and "
            f"re-encoded pixels differ from those the teacher labelled)")


# ---------------------------------------------------------------------------------------------- batches


def _pairs(batch: Sequence[Mapping[str, Any]] | Sequence[tuple[torch.Tensor, Any]],
           ) -> TypeIs[Sequence[tuple[torch.Tensor, Any]]]:
    """Whether ``batch`` holds ``(image, target)`` items (``item="pair"``) rather than dicts, by its first item."""
    return isinstance(batch[0], (tuple, list))


def collate(batch: Sequence[Mapping[str, Any]] | Sequence[tuple[torch.Tensor, Any]],
            ) -> dict[str, Any] | tuple[torch.Tensor, Any]:
    """Flatten B items of m crops into one multi-crop mini-batch (``collate_fn`` for DataLoader).

    Dict items (``item="dict"``): returns ``crops`` [B*m, 3, H, W]; ``soft_labels`` [B*m, C] (dense) or
    ``{name: [B*m, ...]}`` (sparse); ``target``, ``index`` [B*m] int64 (each image's value repeated for its m
    crops); ``slots`` [B*m]; for augmented stores also ``mixed``, ``lam`` [B*m] and ``partner_target``,
    ``partner_weight`` [B*m, P]. Pairs (``item="pair"``): ``(images [B*m, 3, H, W], targets [B*m, C] or
    {name: [B*m, ...]})``. Row ``b*m + j`` is crop j of item b. The batch tensors a TorchDataset filled are
    returned without copying.
    """
    if not batch:
        raise ValidationError("collate needs at least one item. Got an empty batch.")
    if _pairs(batch):
        images = [b[0] for b in batch]
        per_crop = images[0].dim() == 4  # [m, 3, H, W] items (m > 1); [3, H, W] items are stacked
        targets = [b[1] for b in batch]
        x = _pooled(_join(images, per_crop))
        if isinstance(targets[0], Mapping):
            return x, {k: _join([t[k] for t in targets], per_crop) for k in targets[0]}
        return x, _join(targets, per_crop)
    m = int(batch[0]["crops"].shape[0])
    out: dict[str, Any] = {"crops": _pooled(_join([b["crops"] for b in batch]))}
    first = batch[0]["soft_labels"]
    if isinstance(first, Mapping):
        out["soft_labels"] = {k: _join([b["soft_labels"][k] for b in batch]) for k in first}
    else:
        out["soft_labels"] = _join([b["soft_labels"] for b in batch])
    for key in ("target", "index"):
        out[key] = torch.tensor([int(b[key]) for b in batch], dtype=torch.int64).repeat_interleave(m)
    out["slots"] = _join([torch.as_tensor(b["slots"]) for b in batch])
    for key in ("mixed", "lam", "partner_target", "partner_weight"):  # augmented stores
        if key in batch[0]:
            out[key] = torch.cat([b[key] for b in batch])
    return out


# ----------------------------------------------------------------------------- shared batch buffers (workers)


class _Buffer:
    """One shared-memory batch buffer of a DataLoader worker (see "Batch buffers" in the module docstring)."""

    __slots__ = ("data", "done", "sent", "view")

    def __init__(self, nbytes: int):
        self.data = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        self.done = torch.zeros(1, dtype=torch.int64).share_memory_()  # batches the main process released
        self.sent = 0  # batches sent to the main process (this worker writes it, in the pickling thread)
        # weak reference to the numpy view the worker's batch tensor lives on
        self.view: weakref.ref[np.ndarray] | None = None

    def free(self) -> bool:
        return (self.view is None or self.view() is None) and int(self.done[0]) == self.sent


class _Pool:
    """The batch buffers of this worker process: ``(dataset token, nbytes) -> buffers``, and the buffer of each
    batch handed out, by data pointer (for :func:`collate`)."""

    pid: int | None = None
    buffers: dict[tuple[str, int], list[_Buffer]] = {}
    leased: dict[int, _Buffer] = {}  # data pointer -> buffer (fixed per buffer, so bounded by the buffers)

    @classmethod
    def get(cls, token: str, nbytes: int, limit: int) -> _Buffer | None:
        if cls.pid != os.getpid():  # first use in this process (a fork inherits the parent's dicts)
            cls.pid, cls.buffers, cls.leased = os.getpid(), {}, {}
        same = cls.buffers.setdefault((token, nbytes), [])
        for buf in same:
            if buf.free():
                return buf
        if len(same) < limit:
            same.append(_Buffer(nbytes))
            return same[-1]
        return None  # all busy (batches held, or lost in a loader shut down mid-epoch): a plain tensor


def _batch_tensor(dataset: TorchDataset, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch tensor: in a DataLoader worker on a free shared buffer of the dataset's pool, as
    ``torch.from_numpy`` of a numpy view whose life the buffer follows (weakly), else (no pool, or every buffer
    busy) on fresh shared memory, as ``default_collate`` allocates its batches in a worker, so that sending it
    copies nothing; outside a worker a plain tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    buf = _Pool.get(dataset._pool_token, nbytes, dataset.batch_pool) if dataset.batch_pool else None
    if buf is None:
        return torch.empty(shape, dtype=dtype).share_memory_()  # not yet written: nothing to copy but pages
    view = buf.data.view(dtype).numpy().reshape(shape)
    buf.view = weakref.ref(view)
    out = torch.from_numpy(view)
    _Pool.leased[out.data_ptr()] = buf
    return out


class _PooledBatch(torch.Tensor):
    """A batch tensor on a worker's shared buffer, as :func:`collate` returns it inside a worker: a plain tensor
    in every respect except pickling, which sends the buffer and its release counter (:func:`_rebuild_pooled`).
    Tensors computed from it (same class, no ``_fkd_buffer``) pickle as plain tensors."""

    _fkd_buffer: _Buffer  # set by _pooled on the batch itself (an instance attribute, never a class one)

    def __reduce_ex__(self, protocol):
        buf = self.__dict__.get("_fkd_buffer")
        if buf is None:
            return _plain, (self.as_subclass(torch.Tensor),)
        buf.sent += 1  # before the bytes leave: the main process can only release after receiving
        return _rebuild_pooled, (buf.data, buf.done, self.dtype, tuple(self.shape))


def _pooled(t: torch.Tensor) -> torch.Tensor:
    """``t`` marked for sending without a copy when it is exactly a pooled batch of this worker."""
    buf = _Pool.leased.get(t.data_ptr()) if torch.utils.data.get_worker_info() is not None else None
    if buf is None or t.numel() * t.element_size() != buf.data.numel() or not t.is_contiguous():
        return t
    out = t.as_subclass(_PooledBatch)
    out._fkd_buffer = buf
    return out


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t


def _rebuild_pooled(data: torch.Tensor, done: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]):
    """Main process: the batch as ``torch.from_numpy`` of a numpy view of the shared buffer; when nothing uses
    that view any more, the worker's release counter goes up by one."""
    view = data.view(dtype).numpy().reshape(shape)
    weakref.finalize(view, done.add_, 1).atexit = False
    return torch.from_numpy(view)


def _join(tensors: list[torch.Tensor], concat: bool = True) -> torch.Tensor:
    """``torch.cat`` (``concat``) or ``torch.stack`` along dim 0. When the tensors are the consecutive rows of
    one contiguous storage that holds nothing else (the batch tensors ``__getitems__`` fills), a tensor on
    that storage is returned, without a copy."""
    first = tensors[0]
    k = int(concat)
    rows = sum(int(t.shape[0]) for t in tensors) if concat else len(tensors)
    shape = (rows, *first.shape[1:]) if concat else (rows, *first.shape)
    storage = first.untyped_storage()
    if first.storage_offset() == 0 and storage.nbytes() == math.prod(shape) * first.element_size():
        start = expect = storage.data_ptr()
        for t in tensors:
            if (not t.is_contiguous() or t.dtype != first.dtype or t.data_ptr() != expect
                    or t.untyped_storage().data_ptr() != start or t.shape[k:] != first.shape[k:]):
                break
            expect += t.numel() * t.element_size()
        else:
            return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, 0, shape,
                                                                               _contiguous_strides(shape))
    return torch.cat(tensors) if concat else torch.stack(tensors)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides (in elements) of a contiguous tensor of ``shape``, as torch computes them (sizes 0 count
    as 1)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


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


class DeviceLoader:
    """Moves a loader's batches to a device and normalises uint8 images there: the other half of the fast path
    (timm's ``PrefetchLoader`` for fkdstore batches).

    Args:
        loader: any iterable of batches: :func:`collate` dicts (``crops``, ``soft_labels``, ...) or
            ``(images, targets)`` pairs (``item="pair"`` with torch's default collate or :func:`collate`).
        device: where batches go; default ``"cuda"`` when available, else ``"cpu"``.
        dataset: the :class:`TorchDataset` (default: ``loader.dataset`` when it is one), which gives ``mean``,
            ``std`` and the codec for sparse labels.
        mean, std: normalisation; default the dataset's, else ImageNet's.
        dtype: floating dtype of the images handed out (default float32).
        channels_last: hand out images in ``torch.channels_last`` memory format.
        densify: decode sparse labels (a mapping of codec fields, ``soft_labels="sparse"``) into [N, C] on the
            device with :func:`densify` (needs the dataset).

    Each batch: every tensor is moved with ``non_blocking=True`` (pin the loader's memory, ``pin_memory=True``,
    for an asynchronous copy); uint8 images ([..., 3, H, W]) become ``(x / 255 - mean) / std`` in float32 on
    the device, the operations of :func:`fkdstore.transforms.normalize`, so the result equals
    ``TorchDataset(normalize=True)``'s crops; then the cast to ``dtype`` and the memory format. Floating images
    are only moved and cast. The structure of the batch is kept (dict keys, pair order). On CUDA the copy and
    normalisation of batch ``k + 1`` run on a side stream while the caller works on batch ``k``; the caller's
    stream waits for it before batch ``k + 1`` is handed out, and the tensors are recorded on the caller's
    stream (``Tensor.record_stream``) so their memory is not reused early.
    """

    def __init__(self, loader: Iterable, device: str | torch.device | None = None, *, dataset=None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, densify: bool = True):
        self.loader = loader
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        found = getattr(loader, "dataset", None)  # a DataLoader's
        if dataset is None and isinstance(found, TorchDataset):
            dataset = found
        if dataset is not None and not isinstance(dataset, TorchDataset):
            raise TypeError(f"dataset must be a TorchDataset. Got {type(dataset).__name__}.")
        self.dataset = dataset
        self.mean = tuple(mean if mean is not None else (dataset.mean if dataset is not None else IMAGENET_MEAN))
        self.std = tuple(std if std is not None else (dataset.std if dataset is not None else IMAGENET_STD))
        _normalize(torch.zeros(3, 1, 1, dtype=torch.uint8), self.mean, self.std)  # checks mean and std
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype. Got {dtype!r}.")
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.densify = bool(densify)

    @property
    def sampler(self):
        """The wrapped loader's sampler (for ``set_epoch`` of a DistributedSampler)."""
        return getattr(self.loader, "sampler", None)

    def __len__(self) -> int:
        if not isinstance(self.loader, Sized):
            raise TypeError(f"the wrapped loader ({type(self.loader).__name__}) has no len()")
        return len(self.loader)

    def __iter__(self) -> Iterator:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(device=self.device) if cuda else None
        context = (lambda: torch.cuda.stream(stream)) if cuda else contextlib.nullcontext
        with context():
            norm = tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(self.device)
                         for v in (self.mean, self.std))
        pending = None
        for batch in self.loader:
            with context():
                ready = self._prepare(batch, norm)
            if pending is not None:
                yield pending
            if stream is not None:  # CUDA
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                _apply(ready, lambda t, stream=current: t.record_stream(stream))
            pending = ready
        if pending is not None:
            yield pending

    def _prepare(self, batch, norm):
        moved = _map(batch, lambda t: t.to(self.device, non_blocking=True))
        if isinstance(moved, Mapping) and "crops" in moved:
            moved = dict(moved)
            moved["crops"] = self._images(moved["crops"], norm)
            if isinstance(moved.get("soft_labels"), Mapping):
                moved["soft_labels"] = self._labels(moved["soft_labels"])
            return moved
        if isinstance(moved, (tuple, list)) and len(moved) == 2:
            images, targets = moved
            if isinstance(targets, Mapping):
                targets = self._labels(targets)
            return type(moved)((self._images(images, norm), targets))
        raise TypeError("DeviceLoader batches must be dicts with 'crops' (fkdstore.collate) or (images, targets) "
                        f"pairs. Got {type(batch).__name__}.")

    def _images(self, x: torch.Tensor, norm) -> torch.Tensor:
        if x.dtype == torch.uint8:  # normalize()'s operations, in place on the one float copy
            x = x.to(torch.float32).div_(255.0).sub_(norm[0]).div_(norm[1])
        elif not x.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point. Got {x.dtype}.")
        x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _labels(self, fields: Mapping[str, torch.Tensor]):
        if not self.densify:
            return fields
        if self.dataset is None:
            raise ValidationError("DeviceLoader needs dataset= (a TorchDataset) to densify sparse labels; pass it, "
                                  "or densify=False.")
        return densify(fields, self.dataset, device=self.device)


def _map(obj, fn):
    """``fn`` applied to every tensor in nested dicts, lists and tuples (other values kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_map(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def _apply(obj, fn) -> None:
    _map(obj, lambda t: fn(t) or t)


def mix_batch(images: torch.Tensor, soft_labels: torch.Tensor, mode: str = "mixup", alpha=None,
              seed: int = 0, step: int = 0, *, switch_prob: float = 0.5, p: float = 1.0) -> BatchMix[torch.Tensor]:
    """Training-time Mixup / CutMix of a batch of crops AND their stored soft labels (FKD's way), on any device.

    ``images`` [B, C, H, W] (uint8 or float; any memory format), ``soft_labels`` [B, K] float (dense, e.g.
    from :func:`densify`). ``mode``: ``"mixup"`` or ``"cutmix"`` (``alpha`` a number, default 1.0), or
    ``"switch"``: Mixup or CutMix, one per batch, CutMix with probability ``switch_prob`` (``alpha =
    (mixup_alpha, cutmix_alpha)``, default ``(0.8, 1.0)``: timm's ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0,
    switch_prob=0.5)``, torchvision's ``RandomChoice([MixUp(), CutMix()])`` at ``switch_prob=0.5``). ``p``:
    probability that the batch is mixed at all (timm's ``prob``). Each crop's partner is another crop
    (a random cyclic derangement; a batch of one crop is not mixed). The draws are
    :func:`fkdstore.augment.batch.mix_params` ``(seed, step)``, so the result depends only on the seed, the
    step and the batch, identical to the numpy :func:`fkdstore.augment.mix_batch`: ``x' = lam x + (1 - lam)
    x[index]`` (uint8 rounded as the numpy version, in float64) or the CutMix box pasted from ``x[index]``;
    ``y' = lam y + (1 - lam) y[index]``. Inputs are not modified; an unmixed batch returns them as they are.
    """
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
    lam, index_np, box = mix_params(B, (H, W), mode=mode, alpha=alpha, seed=seed, step=step,
                                    switch_prob=switch_prob, p=p)
    index = torch.from_numpy(index_np).to(images.device)
    if lam == 1.0 and box is None:
        return BatchMix(images, soft_labels, 1.0, index, None)
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
