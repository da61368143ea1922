"""Plumbing the label-zoo importers share (ml-dr, TinyViT, SRe2L/LPLD, ReLabel): dataset order, label fields,
a disk-backed slot scratch, and :func:`write_store`, the one function that writes an imported store.

* :func:`dataset_order`: the zoos index images by their position in a torchvision ``ImageFolder`` (or in the
  dataset's own list); this maps that index to the image's position in :func:`fkdstore.images.list_images`.
* :func:`label_fields`: a zoo's stored labels (top-K probabilities, full logits, top-K logits with a tail
  rule) as the destination codec's fields, exactly where the codec can hold them.
* :func:`image_sizes` and :func:`folder_labels`: the store's image sizes and ground-truth labels from the
  image listing.
* :class:`SlotScratch`: epoch-major source files (one file per epoch and batch or rank) are turned into
  image-major rows through memory-mapped arrays in a temporary folder, so memory stays bounded;
  :func:`scratch_specs` and :func:`scratch_records` name its arrays for a codec's fields and a pipeline's
  columns.
* :func:`write_store` (crop regions) and :func:`write_map_store` (label maps): create the store with the
  public :func:`fkdstore.write` arguments, or resume the store a killed run of the same import left (images
  already written are skipped), and remove their own output when an error stops them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import codecs as _codecs
from .. import progress as _progress
from .. import storage as _storage
from .. import writer as _writer
from ..codecs import conversion_problem, convert_fields
from ..errors import ConversionError, LabelFileError, ValidationError
from ..images import ImageList, image_size
from ..output import MADE_BY, check_options, history_record, location_name, made_by, open_destination, remove_on_error
from ..report import storage_stats
from ..transforms import Replay

__all__ = ["ORDERS", "dataset_order", "imagefolder_order", "image_sizes", "folder_labels", "LABEL_KINDS",
           "label_codec", "label_fields", "check_fields", "SlotScratch", "scratch_specs", "scratch_records",
           "replay_of", "write_store", "write_map_store", "source_bytes"]

ORDERS = ("imagefolder", "listing")
LABEL_KINDS = ("probs_topk", "logits_full", "logits_topk_renorm", "logits_topk_fill")


# ------------------------------------------------------------------------------------------- image order

def imagefolder_order(listing: ImageList) -> np.ndarray:
    """``order[k]`` = the listing position of torchvision ``ImageFolder``'s sample ``k`` of the same folder.

    ImageFolder sorts the class folders by name, walks each with ``sorted(os.walk(...))`` (folders in path
    order) and sorts the file names of each folder; the listing sorts whole relative paths, which differs
    when a class name is a prefix of another followed by a character below ``/`` (``n1-b`` vs ``n1``) or in
    nested folders. Images directly in the root are not ImageFolder samples and are refused.
    """
    if listing.root is None:
        raise ValidationError("the ImageFolder order needs an image folder. Got a file list; pass order='listing' "
                              "when the list is in the dataset's order.")
    keys = listing.keys
    loose = [k for k in keys if "/" not in k]
    if loose:
        raise ValidationError(f"ImageFolder ignores images directly in the image root; their index is undefined. "
                              f"Got {len(loose)} such images, e.g. {loose[:3]}; move them into class folders.")

    def sort_key(i: int) -> tuple[str, str, str]:
        parts = keys[i].split("/")
        return parts[0], "/".join(parts[:-1]), parts[-1]

    return np.array(sorted(range(len(keys)), key=sort_key), dtype=np.int64)


def dataset_order(listing: ImageList, order: str) -> np.ndarray:
    """``order[k]`` = listing position of the zoo's dataset index ``k``: ``"imagefolder"``
    (:func:`imagefolder_order`) or ``"listing"`` (the listing's own order, e.g. a file list in dataset order)."""
    if order not in ORDERS:
        raise ValidationError(f"order must be one of {list(ORDERS)}. Got {order!r}.")
    return imagefolder_order(listing) if order == "imagefolder" else np.arange(len(listing), dtype=np.int64)


def image_sizes(paths: Iterable[str | os.PathLike]) -> np.ndarray:
    """``(N, 2)`` int64 ``(height, width)`` of the image files, read from their headers (the store's
    ``image_sizes``)."""
    return np.array([image_size(p) for p in paths], dtype=np.int64)


def folder_labels(listing: ImageList, num_classes: int, chosen: Sequence[int] | None = None) -> np.ndarray | None:
    """The store's ground-truth labels: the image folder's class of each image (of the listing positions
    ``chosen``, default every image) when the folder has exactly ``num_classes`` class folders (ImageFolder's
    class order), else None (the classes are unknown)."""
    if len(listing.classes) != num_classes:
        return None
    labels = np.asarray(listing.labels, np.int64)
    return labels if chosen is None else labels[np.asarray(chosen, np.int64)]


# --------------------------------------------------------------------------------------------- labels

def label_codec(kind: str, k: int | None, codec=None, *, k_out: int | None = None) -> _codecs.LabelCodec:
    """The destination codec of a source with labels of ``kind`` (:data:`LABEL_KINDS`) and top-``k``:
    ``codec`` (a name, spec, config or codec; ``k_out`` sets its K) or the default that keeps what the source
    holds at every temperature: ``ms`` float16 for top-K probabilities, ``logits`` float16 for all logits,
    ``mr`` float32 for top-K logits without a tail (softmax over the K: ``mr`` decodes ``p ** (1/T)``
    renormalised, which is exact; float32 so that no kept class underflows), ``logits`` float32 for top-K logits
    with a filled tail (float32 keeps the small tail mass the temperature needs). Refused (ConversionError):
    a codec that needs classes the source does not hold, and a ``logits`` codec for tail-less top-K logits
    (it assumes equal tail logits)."""
    if kind not in LABEL_KINDS:
        raise ValidationError(f"label kind must be one of {list(LABEL_KINDS)}. Got {kind!r}.")
    if kind == "logits_full":
        return _codecs.Logits(k=k_out, dtype="float16") if codec is None else \
            _codecs.as_codec(codec, k=k_out, default_k=k)
    if k is None:
        raise TypeError(f"label kind {kind!r} holds top-K labels: k must be an int. Got None.")
    if codec is None:
        if kind == "probs_topk":
            return _codecs.MarginalSmoothing(k=k_out or k, dtype="float16")
        if kind == "logits_topk_renorm":
            return _codecs.MarginalReNorm(k=k_out or k, dtype="float32")
        return _codecs.Logits(k=k_out or k, dtype="float32")
    dst = _codecs.as_codec(codec, k=k_out, default_k=k)
    if kind == "logits_topk_renorm" and dst.input == "logits":
        raise ConversionError(f"cannot import top-{k} logits without a tail as {dst.describe()}: the logits codec "
                              f"gives the other classes equal logits; use mr (softmax over the kept classes)")
    why = conversion_problem(_codecs.MarginalSmoothing(k=k, dtype="float32"), dst)
    if why:
        raise ConversionError(f"cannot import these top-{k} labels as {dst.describe()}: {why}")
    return dst


def label_fields(kind: str, dst: _codecs.LabelCodec, num_classes: int, *, indices=None, values=None,
                 fill=None) -> dict[str, np.ndarray]:
    """Rows of a zoo's labels as ``dst``'s fields (leading dims kept; ``dst`` from :func:`label_codec`).

    ``kind``:
    * ``"probs_topk"``: ``indices`` (..., K) and probabilities ``values`` (..., K), in any order; the other
      classes share ``1 - sum`` (marginal smoothing: TinyViT's and ml-dr's ``smooth`` rule);
    * ``"logits_full"``: ``values`` (..., C) raw logits (SRe2L); a ``logits`` codec stores their
      log-softmax (decoded ``softmax(z / T)``), a probability codec ``softmax(z)``;
    * ``"logits_topk_renorm"``: top-K raw logits ``values`` at ``indices``, the others absent (``softmax``
      over the K only: LPQLD's MR), stored as the probabilities ``softmax(z_K)``;
    * ``"logits_topk_fill"``: top-K raw logits, every other class's logit = ``fill`` (..., 1) (LPQLD's MRS).
    """
    C = int(num_classes)
    z = np.asarray(values, np.float64)
    if kind == "logits_full":
        return dst.encode(z if dst.input == "logits" else _softmax(z))
    idx = np.asarray(indices, np.int64)
    if kind == "logits_topk_renorm":
        kind, z = "probs_topk", _softmax(z)
    elif kind == "logits_topk_fill":
        dense = np.broadcast_to(np.asarray(fill, np.float64), (*z.shape[:-1], C)).copy()
        np.put_along_axis(dense, idx, z, -1)
        if dst.input == "logits":
            return dst.encode(dense)
        kind, z = "probs_topk", np.take_along_axis(_softmax(dense), idx, -1)
    if kind != "probs_topk":
        raise ValidationError(f"label kind must be one of {list(LABEL_KINDS)}. Got {kind!r}.")
    src = _codecs.MarginalSmoothing(k=int(idx.shape[-1]), dtype="float32")
    return convert_fields(src, dst, {"indices": idx, "probs": z.astype(np.float32)}, C)


def check_fields(codec: _codecs.LabelCodec, fields: Mapping[str, np.ndarray], num_classes: int, where) -> None:
    """The codec's value rules (indices in range and distinct, probabilities in [0, 1], mass at most 1, ...)
    on fields made from a source file: a breach is a LabelFileError naming the file."""
    try:
        codec.validate_fields(fields, num_classes)
    except ValidationError as e:
        raise LabelFileError(f"{where}: labels break the rules of {codec.describe()}: {e}") from None


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------- scratch

class SlotScratch:
    """Rows ``(N, M, *shape)`` of named arrays, filled slot by slot in any order and read back by image,
    memory-mapped in a temporary folder under ``folder`` (removed by :meth:`close`). ``filled`` counts the
    slots put; a slot put twice is an error naming it."""

    def __init__(self, num_images: int, crops_per_image: int, specs: Mapping[str, tuple[tuple[int, ...], Any]],
                 folder: str | os.PathLike | None = None):
        self.N, self.M = int(num_images), int(crops_per_image)
        self.dir = tempfile.mkdtemp(prefix="fkdstore-import-", dir=folder)
        self.arrays: dict[str, np.ndarray] = {}
        self._filled: np.ndarray | None = None
        try:
            for name, (shape, dtype) in specs.items():
                self.arrays[name] = np.lib.format.open_memmap(
                    os.path.join(self.dir, f"{name}.npy"), mode="w+", dtype=np.dtype(dtype),
                    shape=(self.N, self.M, *shape))
            self._filled = np.lib.format.open_memmap(os.path.join(self.dir, "_filled.npy"), mode="w+",
                                                     dtype=np.bool_, shape=(self.N, self.M))
        except BaseException:
            self.close()
            raise

    @property
    def filled(self) -> np.ndarray:
        """Bool ``(N, M)``: the slots put so far (the scratch must be open)."""
        if self._filled is None:
            raise ValueError(f"the slot scratch {self.dir} is closed")
        return self._filled

    @property
    def nbytes(self) -> int:
        """Bytes of the scratch files."""
        return int(sum(a.nbytes for a in self.arrays.values()) + self.filled.nbytes)

    def put(self, images: np.ndarray, slots: np.ndarray, values: Mapping[str, np.ndarray], where: str) -> None:
        """Rows ``values[name][r]`` into ``(images[r], slots[r])``; ``where`` names the source in errors."""
        images, slots = np.asarray(images, np.int64), np.asarray(slots, np.int64)
        again = self.filled[images, slots]
        if again.any():
            r = int(np.argmax(again))
            raise ValidationError(f"{where}: image {int(images[r])} slot {int(slots[r])} has a record already "
                                  f"(two records bind to one image and slot)")
        for name, v in values.items():
            self.arrays[name][images, slots] = v
        self.filled[images, slots] = True

    def rows(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every array's rows ``(len(images), M, ...)`` of ``images`` (ascending gives sequential reads)."""
        return {name: np.asarray(a[images]) for name, a in self.arrays.items()}

    def close(self) -> None:
        self.arrays = {}
        self._filled = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SlotScratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scratch_specs(codec: _codecs.LabelCodec, num_classes: int, pipeline,
                  base: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """:class:`SlotScratch` specs of an import's slots: ``base`` (the importer's own arrays), then ``codec``'s
    fields as ``soft_<field>`` and ``pipeline``'s augmentation columns as ``aug_<column>``."""
    specs = dict(base)
    specs |= {f"soft_{n}": (f.shape, f.dtype) for n, f in codec.fields(num_classes).items()}
    specs |= {f"aug_{c.name}": (c.shape, c.dtype) for c in pipeline.columns()}
    return specs


def scratch_records(scratch: SlotScratch, images: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                                       dict[str, np.ndarray],
                                                                       dict[str, np.ndarray]]:
    """The rows of ``images`` in a scratch made with :func:`scratch_specs`: ``(every array, codec fields,
    aug columns)``, the last two without their ``soft_`` / ``aug_`` prefix."""
    rows = scratch.rows(images)
    fields = {n[5:]: v for n, v in rows.items() if n.startswith("soft_")}
    aug = {n[4:]: v for n, v in rows.items() if n.startswith("aug_")}
    return rows, fields, aug


# --------------------------------------------------------------------------------------------- writing

def replay_of(input_size: int | Sequence[int], interpolation: str, mean: Sequence[float],
              std: Sequence[float]) -> Replay:
    """The header's replay parameters of an imported store (the source pipeline's input size, interpolation and
    normalisation), checked as :meth:`~fkdstore.transforms.Replay.from_config` checks the stored object: sizes
    in ``[1, MAX_INPUT_SIDE]``, three finite ``mean`` values, three ``std`` values ``> 0``."""
    return Replay.from_config({"input_size": input_size, "interpolation": interpolation, "mean": mean, "std": std})


Rows = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]
MapRows = tuple[np.ndarray, np.ndarray, np.ndarray]


def write_store(dst, *, op: str, source: str, keys, sizes, labels, num_classes: int, codec,
                crops_per_image: int, augment, meta: dict[str, Any], meta_extra: dict[str, Any] | None = None,
                replay: Replay | None = None,
                rows: Callable[[np.ndarray], Iterable[Rows]], progress: bool | None = None,
                storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write an imported crop-regions store with :func:`fkdstore.write` and return ``{"bytes_after",
    "resumed", "images_written_before"}``.

    ``augment``: a :class:`~fkdstore.augment.Pipeline` (its columns become ``aug``); ``replay``: the source
    pipeline's input size, interpolation and normalisation (the header's replay parameters, what
    :class:`~fkdstore.TorchDataset` replays); ``meta`` is stored as given plus ``meta_extra``, with
    ``meta["import"]`` (provenance, compared on resume) and a ``meta["history"]`` record of ``op``.
    ``rows(todo)`` yields ``(image indices, boxes (B, M, 4), flips (B, M), codec fields, aug columns or None)``
    for the ascending image indices ``todo`` (those not written yet).

    Resume (:func:`fkdstore.output.open_destination`, the one rule of every command that makes a store): a
    store at ``dst`` made by this import with the same ``meta["import"]`` and codec (its ``meta["made_by"]``: a
    run that was killed or stopped) is reopened and only its unwritten images are written (none when it is
    complete); any other non-empty destination is refused. An error removes the store this run created or
    resumed; a Ctrl-C writes the images already put (a rerun continues after them).
    """
    def put(w: _writer.Writer, row: Rows) -> int:
        idx, boxes, flips, fields, aug = row
        w.put_fields(idx, boxes, flips, fields, aug=aug or None)
        return len(idx)

    records = {"crops_per_image": crops_per_image, "codec": codec, "aug": augment.columns(), "augment": augment,
               "crop_sampler": None}
    return _write(dst, op=op, source=source, to=codec.get_config(), keys=keys, sizes=sizes, labels=labels,
                  num_classes=num_classes, records=records, meta=meta, meta_extra=meta_extra, replay=replay,
                  rows=rows, put=put, progress=progress, storage_options=storage_options)


def write_map_store(dst, *, op: str, source: str, keys, sizes, labels, num_classes: int, label_map,
                    meta: dict[str, Any], meta_extra: dict[str, Any] | None = None, replay: Replay | None = None,
                    rows: Callable[[np.ndarray], Iterable[MapRows]], progress: bool | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`write_store` for a label-map store (``label_map``: its :class:`~fkdstore.labelmap.LabelMapSpec`):
    ``rows(todo)`` yields ``(image indices (B,), indices (B, K, S, S), scores (B, K, S, S))``, written with
    :meth:`fkdstore.Writer.put_maps`. Same resume, cleanup and provenance rules."""
    def put(w: _writer.Writer, row: MapRows) -> int:
        idx, indices, scores = row
        w.put_maps(idx, indices, scores)
        return len(idx)

    return _write(dst, op=op, source=source, to=label_map.get_config(), keys=keys, sizes=sizes, labels=labels,
                  num_classes=num_classes, records={"label_map": label_map}, meta=meta, meta_extra=meta_extra,
                  replay=replay, rows=rows, put=put, progress=progress, storage_options=storage_options)


def _write(dst, *, op: str, source: str, to: dict[str, Any], keys, sizes, labels, num_classes: int,
           records: dict[str, Any], meta: dict[str, Any], meta_extra: dict[str, Any] | None, replay: Replay | None,
           rows: Callable[[np.ndarray], Iterable[Any]], put: Callable[[_writer.Writer, Any], int],
           progress: bool | None, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The record kind's ``records`` (:func:`fkdstore.write` arguments) written from ``rows(todo)`` by
    ``put(writer, row) -> images``: create or resume, progress, cleanup (see :func:`write_store`)."""
    check_options(storage_options, dst)
    store = _storage.as_store(dst, read_only=False, storage_options=storage_options)
    record = made_by(op, **{"import": meta["import"], "to": to})
    full_meta = {**(meta_extra or {}), **meta, MADE_BY: record,
                 "history": [history_record(op, source=source, to=to, images=len(keys))]}
    resumed = open_destination(dst, store, record)
    w = _writer.write(store, num_images=len(keys), num_classes=num_classes, image_keys=keys, image_sizes=sizes,
                      labels=labels, meta=full_meta, replay=replay, **records)
    done = w.written
    with remove_on_error(store), w:  # a Ctrl-C closes the writer (what is buffered is written) and keeps it
        todo = np.flatnonzero(~done)
        with _progress.progress(progress, total=len(todo), desc=f"{op}: writing", unit="image") as bar:
            for row in rows(todo):
                bar.update(put(w, row))
    return {"bytes_after": storage_stats(store)["_total"]["bytes"], "resumed": resumed,
            "images_written_before": int(done.sum())}


def source_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Total size of the source files."""
    return int(sum(os.path.getsize(p) for p in paths))


def batches(todo: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``todo`` in consecutive pieces of at most ``size``."""
    for a in range(0, len(todo), size):
        yield todo[a:a + size]


def resolved(path: str | os.PathLike) -> str:
    """The source location as recorded in provenance."""
    return location_name(Path(path))


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (0 when ``b`` is 0)."""
    return -(-a // b) if b else 0

