"""PyTorch side of label-map stores (ReLabel, TokenLabeling): crops of the images and their pooled soft labels.

:class:`LabelMapDataset` is what :class:`fkdstore.TorchDataset` returns for a label-map store
(``TorchDataset(store, images)`` dispatches on the store's record kind), with the same item layout, so
:func:`fkdstore.collate` and any training loop written for crop regions take it unchanged::

    ds = fkdstore.TorchDataset("maps.zarr", "train/", crops_per_sample=2)            # fresh crops (ReLabel)
    ds = fkdstore.TorchDataset("maps.zarr", "train/", crops_per_sample=2, crops_from="regions.zarr")  # FKD's crops
    loader = DataLoader(ds, batch_size=128, shuffle=True, collate_fn=fkdstore.collate)

Item ``i`` loads image ``i`` once and returns ``m`` crops of it with the soft label of each crop, pooled
from the image's stored map by the store's replay equation (:func:`fkdstore.labelmap.pool_labels`, spec
section 11.3). Where the crops come from:

* **fresh crops** (default, ReLabel's way): RandomResizedCrop + flip drawn by ``crop_sampler`` (a
  :class:`~fkdstore.seeded.SlotCropSampler`, default ``SlotCropSampler(seed=seed)``), with the epoch folded
  into the slot: crop ``j`` of image ``i`` in epoch ``e`` is the sampler's slot ``e * m + j`` of image ``i``.
  Every epoch gets new crops, and a crop depends only on ``(sampler, i, e, j)`` and the image size, never
  on batch size, workers or ranks. (A sampler equal to a region store's draws that store's slots, in slot
  order: give the loader another seed for crops the region store never labelled.)
* **a region store's crops** (``crops_from=``, the same crops as FKD, for a comparison on equal crops): the
  slots :func:`fkdstore.pytorch.epoch_slots` picks with ``seed`` (the rule :class:`TorchDataset` uses, so
  with the same ``seed``, ``crops_per_sample`` and output size the crops are pixel-identical to that store's
  ``TorchDataset`` items), their stored or derived boxes and flips. The region store must hold the same
  images (keys, in order) with the same sizes.

The flip: the crop's pixels are mirrored when its flip bit is set; the label follows it only when the
store's ``label_map.flip`` says so (TokenLabeling; ReLabel's published code ignores it). With a
``label_map.grid`` ``g > 1`` each crop's label is a ``g x g`` grid of distributions (one per token,
``[m, g, g, C]``).

=================  ==============================  ==========================================================
key                value                           meaning
=================  ==============================  ==========================================================
``crops``          [m, 3, H, W] float32 / uint8    the crops, normalised (``normalize=True``) or uint8
``soft_labels``    [m, C] or [m, g, g, C] float32  pooled soft labels (``softmax(pooled / temperature)``)
``target``         int                             ground-truth class, -1 if unknown
``index``          int                             the image's index in the store
``slots``          [m] int64                       the sampler slots (fresh crops) or region-store slots
=================  ==============================  ==========================================================

``item="pair"`` returns ``(crops, soft_labels)`` instead (``[3, H, W]`` and ``[C]`` for ``m = 1``), for
torch's ``default_collate`` and any loss taking soft targets.

Labels of a batch are pooled in one call from one ``read_batch`` of the maps (DataLoader calls
:meth:`LabelMapDataset.__getitems__` with the whole batch); images are the only per-item I/O.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from . import schema as S
from . import storage as _storage
from .codecs import parse_temperature
from .errors import ValidationError
from .labelmap import pool_labels
from .pytorch import _Cache, _StoreImages, epoch_slots, epoch_slots_many
from .reader import LabelMapReader, Reader, RegionReader
from .reader import open as _open_store
from .seeded import SlotCropSampler
from .transforms import Replay, replay_crops
from .validation import int_in_range

__all__ = ["LabelMapDataset", "is_label_map_store", "fresh_slots"]

_R = TypeVar("_R", bound=Reader)


def is_label_map_store(store, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``store`` (a path, a URL or an opened Reader) holds label maps: reads only the header's
    ``kind`` (one small object). Anything that cannot be read answers False (the caller's reader then
    raises its own error)."""
    if isinstance(store, Reader):
        return isinstance(store, LabelMapReader)
    if not isinstance(store, (str, os.PathLike)):
        return False
    try:
        meta = _storage.read_group_json(_storage.as_store(
            store, read_only=True, storage_options=_storage.options_for(store, storage_options)))
    except Exception:  # noqa: BLE001 - unreachable, not a store, bad options: the regions dataset reports it
        return False
    header = ((meta or {}).get("attributes") or {}).get(S.ATTR_KEY)
    return isinstance(header, Mapping) and header.get("kind") == S.LABEL_MAP


def fresh_slots(epoch: int, crops_per_sample: int) -> np.ndarray:
    """Sampler slots of the ``m`` fresh crops of an image in ``epoch``: ``epoch * m + j``, ``j < m`` (int64)."""
    m = int(crops_per_sample)
    return np.arange(epoch * m, epoch * m + m, dtype=np.int64)


def _open(location: Any, storage_options: Mapping[str, Any] | None, cache: _Cache, what: str,
          cls: type[_R]) -> tuple[_R, str | None]:
    """``location`` (a path, a URL or an opened Reader) as a reader of class ``cls`` (a store of another kind
    raises :class:`ValidationError` naming ``what``), and its path (None for a Reader)."""
    if isinstance(location, Reader):
        reader, path = location, None
    elif isinstance(location, (str, os.PathLike)):
        path = os.fspath(location)
        reader = _open_store(path, storage_options=_storage.options_for(path, storage_options), **cache)
    else:
        raise TypeError(f"{what} must be a store path, a URL or an opened Reader. Got {type(location).__name__}.")
    if not isinstance(reader, cls):
        kind = "label maps" if cls is LabelMapReader else "crop regions"
        raise ValidationError(f"{what} must be a store of {kind}. Got {reader.header.kind!r} records in "
                              f"{reader.path}.")
    return reader, path


class LabelMapDataset(_StoreImages):
    """Crops of a label-map store's images and their pooled soft labels; see the module docstring.

    Args:
        store: a label-map store (folder, URL, or an opened :class:`fkdstore.LabelMapReader`).
        images: the images the store was made from (any :func:`fkdstore.sources.as_source` source), keys
            equal to the store's in order (errors as :class:`fkdstore.TorchDataset`).
        crops_per_sample: ``m`` crops per image per item (with ``crops_from``: at most its ``M``).
        output_size, interpolation, mean, std: the crops' replay; default the ``crops_from`` store's replay
            (pixel-identical crops), else this store's, else 224 / bilinear / ImageNet's.
        epoch: the initial epoch (:meth:`set_epoch`).
        transform: a callable applied to each item's crops ``[m, 3, H, W]`` (after normalising).
        seed: the seed of the slot rule with ``crops_from``, and of the default crop sampler.
        crop_sampler: the :class:`~fkdstore.seeded.SlotCropSampler` of fresh crops (not with ``crops_from``).
        crops_from: a region store (path, URL or :class:`fkdstore.RegionReader`) whose crops are used.
        temperature: overrides the store's ``label_map.temperature`` (a finite number > 0).
        allow_incomplete: cover only the written images (item ``j`` is image ``image_indices[j]``) instead of
            raising :class:`IncompleteStoreError`.
        normalize: float32 ``(x/255 - mean)/std`` crops (True) or uint8 (False).
        item: ``"dict"`` (default, for :func:`fkdstore.collate`) or ``"pair"``.
        soft_labels: ``"dense"`` only (pooled labels are dense distributions).
        storage_options, cache_dir, cache_bytes: as :class:`fkdstore.TorchDataset`, for URL stores.

    Pickles by location (a DataLoader worker reopens the stores), so it works with fork and spawn workers;
    the epoch lives in shared memory, so persistent workers see :meth:`set_epoch`.
    """

    def __init__(self, store: Any, images: Any, *, crops_per_sample: int = 1,
                 output_size: int | tuple[int, int] | None = None, epoch: int = 0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 crop_sampler: SlotCropSampler | None = None, crops_from: Any = None,
                 temperature: float | None = None, allow_incomplete: bool = False, interpolation: str | None = None,
                 normalize: bool = True, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 item: str = "dict", soft_labels: str = "dense", storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None) -> None:
        self._cache: _Cache = {"cache_dir": cache_dir, "cache_bytes": cache_bytes}
        self._storage_options = dict(storage_options) if storage_options else None
        reader, self._store_path = _open(store, storage_options, self._cache, "store", LabelMapReader)
        self._reader: LabelMapReader | None = reader
        self.num_classes = reader.num_classes
        spec = reader.spec
        if temperature is not None:
            spec = dataclasses.replace(spec, temperature=parse_temperature(temperature))
        self.spec = spec
        self.crops_per_sample = int_in_range("crops_per_sample", crops_per_sample, 1)
        self.seed = int_in_range("seed", seed, 0)
        if soft_labels != "dense":
            raise ValidationError(f"soft_labels must be 'dense' for a label-map store (labels are pooled from the "
                                  f"maps, not stored per crop). Got {soft_labels!r}.")
        self.soft_labels = soft_labels

        self._regions: RegionReader | None = None
        self._regions_path: str | None = None
        self.crop_sampler: SlotCropSampler | None = None  # None: the crops come from the region store
        if crops_from is not None:
            if crop_sampler is not None:
                raise ValidationError("crop_sampler and crops_from are exclusive: the crops come from the region "
                                      "store. Got both.")
            regions, self._regions_path = _open(crops_from, storage_options, self._cache, "crops_from", RegionReader)
            self._check_regions(reader, regions)
            self._regions = regions
        else:
            sampler = SlotCropSampler(seed=self.seed) if crop_sampler is None else crop_sampler
            if not isinstance(sampler, SlotCropSampler):
                raise TypeError(f"crop_sampler must be a SlotCropSampler. Got {type(sampler).__name__}.")
            self.crop_sampler = sampler

        stored = (self._regions.header.replay if self._regions is not None else None) or reader.header.replay \
            or Replay()
        self._set_replay(stored, output_size=output_size, interpolation=interpolation, mean=mean, std=std,
                         normalize=normalize, transform=transform, item=item)
        self._bind_images(reader, images, _storage.options_for(images, storage_options), allow_incomplete)
        self.set_epoch(epoch)

    def _check_regions(self, maps: LabelMapReader, regions: RegionReader) -> None:
        if list(regions.image_keys) != list(maps.image_keys):
            a, b = regions.image_keys, maps.image_keys
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ValidationError(f"crops_from must hold the label-map store's images in its order: position {j} is "
                                  f"{a[j] if j < len(a) else None!r} in {regions.path} but "
                                  f"{b[j] if j < len(b) else None!r} in {maps.path}.")
        if not np.array_equal(regions.image_sizes, maps.image_sizes):
            i = int(np.flatnonzero((np.asarray(regions.image_sizes) != np.asarray(maps.image_sizes)).any(1))[0])
            raise ValidationError(f"crops_from must record the label-map store's image sizes: image {i} is "
                                  f"{list(regions.image_sizes[i])} in {regions.path} but {list(maps.image_sizes[i])} "
                                  f"in {maps.path}.")
        if self.crops_per_sample > regions.crops_per_image:
            raise ValidationError(f"crops_per_sample must be <= the crops_from store's crops_per_image="
                                  f"{regions.crops_per_image}. Got {self.crops_per_sample}.")
        if not regions.complete:
            raise ValidationError(f"crops_from store {regions.path} is incomplete; finish it first.")

    # ------------------------------------------------------------------ epochs and crops
    def slots(self, item: int, epoch: int | None = None) -> np.ndarray:
        """The slots item ``item`` uses in ``epoch`` (default: the current one): sampler slots
        (:func:`fresh_slots`) or, with ``crops_from``, the region store's (:func:`fkdstore.pytorch.epoch_slots`)."""
        i = int(self.image_indices[item])
        e = self._epoch_or_current(epoch)
        if self.crop_sampler is not None:
            return fresh_slots(e, self.crops_per_sample)
        return epoch_slots(i, e, self.crops_per_sample, self._region_store().crops_per_image, self.seed)

    def crops(self, indices: Any, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes (B, m, 4) int64, flips (B, m) bool, slots (B, m) int64)`` of store images ``indices`` in
        ``epoch`` (default: the current one)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        e = self._epoch_or_current(epoch)
        m = self.crops_per_sample
        if self.crop_sampler is not None:
            slots = np.broadcast_to(fresh_slots(e, m), (len(idx), m))
            H, W = self._sizes[idx, 0][:, None], self._sizes[idx, 1][:, None]
            boxes, flips = self.crop_sampler.sample_slots(idx[:, None], slots, H, W)
            return boxes.astype(np.int64), flips.astype(bool), np.ascontiguousarray(slots)
        regions = self._region_store()
        slots = epoch_slots_many(idx, e, m, regions.crops_per_image, self.seed)
        rec = regions.read_batch(idx, slots)
        return rec.box.astype(np.int64), rec.flip.astype(bool), slots

    # ------------------------------------------------------------------ store handles, pickling
    @property
    def reader(self) -> LabelMapReader:
        if self._reader is None:
            self._reader, _ = _open(self._store_path, self._storage_options, self._cache, "store", LabelMapReader)
        return self._reader

    def _region_store(self) -> RegionReader:
        """The ``crops_from`` store (reopened after pickling); only for a dataset made with one."""
        if self._regions is None:
            self._regions, _ = _open(self._regions_path, self._storage_options, self._cache, "crops_from",
                                     RegionReader)
        return self._regions

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        if self._regions_path is not None:
            d["_regions"] = None
        return d

    # ------------------------------------------------------------------ items
    def __getitem__(self, item: int) -> dict[str, Any] | tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any] | tuple[torch.Tensor, torch.Tensor]]:
        """A batch of items: one ``read_batch`` of the maps and one pooling call for the batch's crops."""
        idx = self._store_indices(items)
        boxes, flips, slots = self.crops(idx)
        labels = self.labels(idx, boxes, flips)
        B, m = len(idx), self.crops_per_sample
        dtype = torch.float32 if self.normalize else torch.uint8
        bufs = torch.empty((B, m, 3, *self.output_size), dtype=dtype).unbind(0)
        norm = {"mean": self.mean, "std": self.std} if self.normalize else {}
        out: list[dict[str, Any] | tuple[torch.Tensor, torch.Tensor]] = []
        for b, i in enumerate(idx.tolist()):
            crops = replay_crops(self._load(i), boxes[b], flips[b], self.output_size, self.interpolation,
                                 out=bufs[b], **norm)
            if self.transform is not None:
                crops = self.transform(crops)
            if self.item == "pair":
                out.append((crops[0], labels[b][0]) if m == 1 else (crops, labels[b]))
            else:
                out.append({"crops": crops, "soft_labels": labels[b], "target": int(self._targets[i]), "index": i,
                            "slots": torch.from_numpy(slots[b].copy())})
        return out

    def labels(self, indices: Any, boxes: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Pooled soft labels of crops ``boxes`` (B, m, 4) / ``flips`` (B, m) of store images ``indices``
        (B,): one tensor ``[m, C]`` (or ``[m, g, g, C]``) per image, views of one batch tensor."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        B, m = boxes.shape[:2]
        maps = self.reader.read_batch(idx)
        rep = np.repeat(np.arange(B), m)
        pooled = pool_labels(maps.indices[rep], maps.scores[rep], boxes.reshape(-1, 4),
                             self._sizes[idx][rep], flips.reshape(-1), self.spec, self.num_classes)
        return torch.from_numpy(pooled.reshape(B, m, *pooled.shape[1:])).unbind(0)

    def __repr__(self) -> str:
        crops = f"crops_from={self._regions_path or 'Reader'!r}" if self._regions_path or self._regions else \
            f"crop_sampler={self.crop_sampler!r}"
        return (f"fkdstore.LabelMapDataset(images={len(self)}, crops_per_sample={self.crops_per_sample}, {crops}, "
                f"output_size={self.output_size}, map={self.spec.map_shape}, grid={self.spec.grid}, "
                f"epoch={self.epoch}, seed={self.seed})")
