"""Stores made from stores: re-encode without the teacher (:func:`convert`), keep a subset of each image's slots
(:func:`prune`) and average stores that share crops (:func:`ensemble`).

Conversions work on the *stored fields*, never on decoded distributions: decoding an ``mr`` store gives the
renormalised top-K, and re-encoding that as ``ms`` would claim a residual of 0. Every codec that keeps a
top-K stores the raw teacher probabilities of those classes, in descending order (``fkdstore.codecs``), so

=============  =========================================================================================
source         possible targets
=============  =========================================================================================
``full``       everything (``full`` with another dtype; the others by encoding the stored vector)
``ms``/``mr``  ``ms``/``mr`` with K' <= K (the first K' stored entries), ``smoothing``, ``hard``
``smoothing``  ``smoothing``, ``hard``, ``ms``/``mr`` with K = 1
``hard``       ``hard``
=============  =========================================================================================

Anything else needs information the source does not hold and is refused with the reason
(:class:`ConversionError`). The output copies boxes, flips, aug, image keys, sizes, labels and ``meta``,
and appends a record to ``meta["history"]``. Conversion streams one source shard at a time.

Destinations follow :mod:`fkdstore.output`'s rule: a rerun of the same command (same sources and parameters)
on its own output left incomplete by a kill or Ctrl-C continues it, writing only the images not yet written
(the result equals an uninterrupted run's); any other non-empty destination is refused; an error removes the
output.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import codecs as _codecs
from . import progress as _progress
from . import reader as _reader
from . import storage as _storage
from . import writer as _writer
from .codecs import conversion_problem, convert_fields
from .errors import ConversionError, ValidationError
from .importers.fkdstore_v1 import is_v1, open_v1
from .output import (
    MADE_BY,
    check_options,
    history_record,
    location_name,
    made_by,
    open_destination,
    remove_on_error,
    source_identity,
)
from .reader import CropRecords
from .report import storage_stats
from .validation import non_negative_int

__all__ = ["convert", "prune", "pruned_slots", "random_slots", "confident_slots", "PRUNE_RULES", "ensemble",
           "check_same_crops"]


def _written_batches(reader, done: np.ndarray | None = None) -> list[np.ndarray]:
    """The written images of ``reader``, one index array per shard (shards with none left out): the unit in
    which convert, prune and ensemble read a source and write their output (one whole-shard put each).
    ``done``: images the output holds already (a continued run), left out."""
    h, written = reader.header, reader.written
    if done is not None:
        written = written & ~done
    batches = (h.shard_range(s).start + np.flatnonzero(written[h.shard_range(s).start:h.shard_range(s).stop])
               for s in range(h.num_shards))
    return [idx for idx in batches if len(idx)]


def _write_like(dst_store, reader, *, codec, meta, crops_per_image: int | None = None):
    """A writer for a new store with ``reader``'s images (keys, sizes, labels), aug columns and augment
    pipeline, replay parameters, and the given codec, ``meta`` and (default: the source's) crops per image. A
    seeded-crops source gives a seeded output with the same sampler, unless ``crops_per_image`` selects slots
    (pruning): slot j of the output is then not the sampler's slot j, so its crops are stored."""

    h = reader.header
    return _writer.write(
        dst_store, num_images=h.num_images, crops_per_image=crops_per_image or h.crops_per_image,
        num_classes=h.num_classes, codec=codec, image_keys=reader.image_keys, image_sizes=reader.image_sizes,
        labels=reader.labels, meta=meta, aug=h.aug, augment=h.augment, replay=h.replay,
        crop_sampler=h.sampler if crops_per_image is None else None,
    )


def convert(src: str | os.PathLike, dst: str | os.PathLike, codec, *, k: int | None = None,
            progress: bool | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-encode store ``src`` into a new store ``dst`` with ``codec`` (name, config dict or LabelCodec).

    ``src`` and ``dst`` are folders or URLs (``s3://...``); ``storage_options`` apply to whichever of them
    is a URL (:func:`fkdstore.storage.options_for`). Only written images are converted (an incomplete
    source gives an equally incomplete output). Returns ``{from, to, images, missing, bytes_before,
    bytes_after}``. A source of format 1.0 (fkdstore 0.1) is migrated: this is the one place 1.0 is read
    (:mod:`fkdstore.importers.fkdstore_v1`).
    """
    check_options(storage_options, src, dst)
    src_options, dst_options = _storage.options_for(src, storage_options), _storage.options_for(dst, storage_options)
    reader = open_v1(src, storage_options=src_options) if is_v1(src, src_options) \
        else _reader.as_regions(_reader.open(src, storage_options=src_options))
    dst_codec = _codecs.as_codec(codec, k=k, default_k=reader.codec.k)
    why = conversion_problem(reader.codec, dst_codec)
    if why:
        raise ConversionError(f"cannot convert {reader.codec.describe()} -> {dst_codec.describe()}: {why}")
    dst_store = _storage.as_store(dst, read_only=False, storage_options=dst_options)
    h = reader.header
    record = made_by("convert", source=location_name(src), source_id=source_identity(h), to=dst_codec.get_config())
    open_destination(dst, dst_store, record, src)
    meta = dict(h.meta)
    written = reader.written
    meta["history"] = list(meta.get("history") or []) + [history_record(
        "convert", source=location_name(src), **{"from": h.codec.get_config(), "to": dst_codec.get_config()},
        images=int(written.sum()))]
    meta[MADE_BY] = record
    with remove_on_error(dst_store), _write_like(dst_store, reader, codec=dst_codec, meta=meta) as w:
        batches = _written_batches(reader, w.written)
        for idx in _progress.progress(progress, total=len(batches), desc="converting", unit="shard").wrap(batches):
            rec = reader.read_batch(idx)
            fields = convert_fields(reader.codec, dst_codec, rec.fields, h.num_classes)
            w.put_fields(idx, rec.box, rec.flip, fields, aug=rec.aug or None)
    reader.close()
    return {
        "from": h.codec.get_config(), "to": dst_codec.get_config(), "images": int(written.sum()),
        "missing": int((~written).sum()),
        "bytes_before": storage_stats(src, storage_options=src_options)["_total"]["bytes"],
        "bytes_after": storage_stats(dst_store)["_total"]["bytes"],
    }


# ============================================================================================ prune
PRUNE_RULES = ("random", "confident")


def _check_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise TypeError(f"keep must be a number in (0, 1]. Got {type(keep).__name__} {keep!r}.")
    k = float(keep)
    if not (k > 0 and k <= 1):  # also refuses NaN
        raise ValidationError(f"keep must be a fraction of the slots in (0, 1]. Got {keep!r}.")
    return k


def pruned_slots(keep: float, crops_per_image: int) -> int:
    """``M' = max(1, round(M * keep))``: how many of an image's ``M`` slots :func:`prune` keeps."""
    return max(1, int(round(crops_per_image * _check_keep(keep))))


def random_slots(seed: int, image: int, crops_per_image: int, kept: int) -> np.ndarray:
    """The ``kept`` slots (ascending) the ``random`` rule keeps for ``image``: a function of ``(seed, image)``
    only, ``sort(default_rng(SeedSequence([seed, image])).choice(M, kept, replace=False))``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(image)]))
    return np.sort(rng.choice(crops_per_image, kept, replace=False)).astype(np.int64)


def confident_slots(codec, fields: dict[str, np.ndarray], num_classes: int, kept: int) -> np.ndarray:
    """(B, kept) ascending: the slots whose decoded distribution (T = 1) has the lowest entropy, ties by the
    lower slot index, for fields of leading shape (B, M)."""
    d = np.asarray(codec.decode(fields, num_classes), np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(d > 0, d * np.log(d), 0.0).sum(-1)  # (B, M) nats
    order = np.argsort(h, axis=-1, kind="stable")[:, :kept]  # stable: equal entropies keep slot order
    return np.sort(order, axis=-1).astype(np.int64)


def _check_int_seed(seed: Any) -> int:
    return non_negative_int("seed", seed)


def prune(src: str | os.PathLike, dst: str | os.PathLike, *, keep: float, seed: int = 0, rule: str = "random",
          progress: bool | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``dst``: store ``src`` with ``M' = max(1, round(M * keep))`` of each image's ``M`` slots.

    ``rule``: ``"random"`` keeps :func:`random_slots` ``(seed, image)`` (independent of everything else, so
    any subset of the images prunes the same way); ``"confident"`` keeps the slots whose decoded soft label
    has the lowest entropy (:func:`confident_slots`; ``seed`` unused). Kept slots keep their order; box,
    flip, aug columns and label fields are copied bit for bit; keys, sizes, labels, codec, aug columns, the
    augment pipeline and ``meta`` are copied, with a record appended to ``meta["history"]``. Only written
    images are copied (an incomplete source gives an equally incomplete output, as :func:`convert`).
    :class:`fkdstore.TorchDataset` on the result samples among the ``M'`` kept slots.

    ``src`` and ``dst`` are folders or URLs; ``storage_options`` apply to whichever is a URL.
    Refused (:class:`ValidationError`, nothing written): ``keep`` not in ``(0, 1]`` (NaN too), an unknown
    rule, a negative seed, ``dst`` equal to ``src`` or not empty (unless it is this command's own incomplete
    output: continued, :mod:`fkdstore.output`), and a store whose augment pipeline mixes
    slots (Mixup/CutMix store partner *slots*, which pruning would drop or renumber).
    Returns ``{images, missing, crops_per_image_before, crops_per_image, rule, seed, keep, bytes_before,
    bytes_after}``.
    """
    keep = _check_keep(keep)
    seed = _check_int_seed(seed)
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str. Got {type(rule).__name__}.")
    if rule not in PRUNE_RULES:
        raise ValidationError(f"rule must be one of {list(PRUNE_RULES)}. Got {rule!r}.")
    check_options(storage_options, src, dst)
    src_options, dst_options = _storage.options_for(src, storage_options), _storage.options_for(dst, storage_options)
    reader = _reader.as_regions(_reader.open(src, storage_options=src_options))
    h = reader.header
    M = h.crops_per_image
    kept = pruned_slots(keep, M)
    mixing = [p.name for p in h.augment.mixing]
    if mixing:
        raise ValidationError(
            f"prune cannot drop slots of a store whose augment pipeline mixes slots ({', '.join(mixing)}): a kept "
            f"slot's partner slot could be dropped. Got a store with augment {[p.name for p in h.augment.policies]}.")
    dst_store = _storage.as_store(dst, read_only=False, storage_options=dst_options)
    record = made_by("prune", source=location_name(src), source_id=source_identity(h), keep=keep, rule=rule,
                     seed=seed)
    open_destination(dst, dst_store, record, src)
    written = reader.written
    meta = dict(h.meta)
    meta["history"] = list(meta.get("history") or []) + [history_record(
        "prune", source=location_name(src), keep=keep, rule=rule, seed=seed, crops_per_image_before=M,
        slots_kept=kept, images=int(written.sum()))]
    meta[MADE_BY] = record
    with remove_on_error(dst_store), _write_like(dst_store, reader, codec=reader.codec, meta=meta,
                                                  crops_per_image=kept) as w:
        batches = _written_batches(reader, w.written)
        for idx in _progress.progress(progress, total=len(batches), desc="pruning", unit="shard").wrap(batches):
            if rule == "random":
                slots = np.stack([random_slots(seed, int(i), M, kept) for i in idx])
                rec = reader.read_batch(idx, slots)
            else:
                rec = reader.read_batch(idx)
                slots = confident_slots(reader.codec, rec.fields, h.num_classes, kept)
                rec = _take_slots(rec, slots)
            w.put_fields(idx, rec.box, rec.flip, rec.fields, aug=rec.aug or None)
    reader.close()
    return {"images": int(written.sum()), "missing": int((~written).sum()), "crops_per_image_before": M,
            "crops_per_image": kept, "rule": rule, "seed": seed, "keep": keep,
            "bytes_before": storage_stats(src, storage_options=src_options)["_total"]["bytes"],
            "bytes_after": storage_stats(dst, storage_options=dst_options)["_total"]["bytes"]}


def _take_slots(rec, slots: np.ndarray):
    """Records (B, M, ...) -> (B, m, ...) at ``slots`` (B, m)."""

    def take(v):
        return np.take_along_axis(v, slots.reshape(slots.shape + (1,) * (v.ndim - 2)), axis=1)

    return CropRecords(take(rec.box), take(rec.flip), {k: take(v) for k, v in rec.aug.items()},
                       {k: take(v) for k, v in rec.fields.items()})


# ============================================================================================ ensemble
def _first_diff(a, b) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (None if equal)."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def check_same_crops(readers: list, names: list[str]) -> None:
    """Refuse (:class:`ValidationError`) stores that do not share crops: same N, M, C, keys (in order), image
    sizes, written images, aug columns and augment pipeline, and, for every written image and slot, the same
    box, flip and aug values. The message names the first differing image index, key, slot and array."""
    a, na = readers[0], names[0]
    ha = a.header
    for b, nb in zip(readers[1:], names[1:]):
        hb = b.header
        for what, x, y in (("num_images", ha.num_images, hb.num_images),
                           ("crops_per_image", ha.crops_per_image, hb.crops_per_image),
                           ("num_classes", ha.num_classes, hb.num_classes),
                           ("aug columns", [c.to_json() for c in ha.aug], [c.to_json() for c in hb.aug]),
                           ("augment pipeline", ha.augment.get_config(), hb.augment.get_config())):
            if x != y:
                raise ValidationError(f"stores must share crops: {what} is {x!r} in {na} but {y!r} in {nb}.")
        j = _first_diff(a.image_keys, b.image_keys)
        if j is not None:
            ka = a.image_keys[j] if j < len(a.image_keys) else None
            kb = b.image_keys[j] if j < len(b.image_keys) else None
            raise ValidationError(f"stores must share crops: image {j} has key {ka!r} in {na} but {kb!r} in {nb}.")
        bad = np.flatnonzero((a.image_sizes != b.image_sizes).any(-1))
        if len(bad):
            i = int(bad[0])
            raise ValidationError(f"stores must share crops: image {i} ({a.image_keys[i]!r}) has size "
                                  f"{a.image_sizes[i].tolist()} in {na} but {b.image_sizes[i].tolist()} in {nb}.")
        bad = np.flatnonzero(a.written != b.written)
        if len(bad):
            i = int(bad[0])
            raise ValidationError(f"stores must have the same written images: image {i} ({a.image_keys[i]!r}) is "
                                  f"{'written' if a.written[i] else 'not written'} in {na} but not in {nb}.")


def _first_crop_diff(ra, rb, idx: np.ndarray) -> tuple[int, int, str] | None:
    """(image, slot, array) of the first crop whose box, flip or an aug column differs between two records."""
    arrays = [("box", ra.box, rb.box), ("flip", ra.flip, rb.flip)]
    arrays += [(f"aug/{k}", ra.aug[k], rb.aug[k]) for k in ra.aug]
    first = None
    for name, x, y in arrays:
        with np.errstate(invalid="ignore"):
            diff = ~((x == y) | ((x != x) & (y != y)))  # NaN == NaN for float aug columns
        diff = diff.reshape(diff.shape[:2] + (-1,)).any(-1)
        if diff.any():
            b, m = (int(v) for v in np.argwhere(diff)[0])
            cand = (b, m, name)
            if first is None or cand[:2] < first[:2]:
                first = cand
    if first is None:
        return None
    return int(idx[first[0]]), first[1], first[2]


def ensemble(stores: list, dst: str | os.PathLike, *, codec=None, progress: bool | None = None,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Average the decoded soft labels (T = 1) of stores that share crops and write them to ``dst``.

    Every crop of ``dst`` holds ``mean_s decode_s(crop)`` (float64 mean of the float32 decoded rows),
    encoded with ``codec`` (a codec, name, spec string or config; default: the first store's). For a codec
    that stores logits the log of the mean is stored. Keys, sizes, labels, boxes, flips, aug columns, the
    augment pipeline and the first store's ``meta`` are copied; ``meta["history"]`` gets an ``ensemble``
    record naming the sources, their codecs and teachers. Only written images are averaged, and every
    store must have the same written images.

    Refused (nothing written): fewer than 2 stores; stores that do not share crops
    (:func:`check_same_crops`; box/flip/aug compared per image and slot, the message names the first
    differing image index, key, slot and array); ``dst`` equal to a source or not empty (unless it is this
    command's own incomplete output: continued, :mod:`fkdstore.output`). Stores and ``dst``
    are folders or URLs; ``storage_options`` apply to those that are URLs.
    Returns ``{images, missing, sources, codec, bytes_after}``.
    """
    if isinstance(stores, (str, bytes, os.PathLike)) or not isinstance(stores, (list, tuple)):
        raise TypeError(f"stores must be a list of store paths. Got {type(stores).__name__}.")
    if len(stores) < 2:
        raise ValidationError(f"ensemble needs at least 2 stores. Got {len(stores)}.")
    srcs = list(stores)
    check_options(storage_options, *srcs, dst)
    for s in srcs:
        if location_name(dst) == location_name(s):
            raise ValidationError(f"destination must differ from the sources. Got {dst} for both.")
    readers = [_reader.as_regions(_reader.open(s, storage_options=_storage.options_for(s, storage_options)))
               for s in srcs]
    names = [str(s) for s in srcs]
    out_codec = readers[0].codec if codec is None else _codecs.as_codec(codec)
    check_same_crops(readers, names)
    a = readers[0]
    h = a.header
    C = h.num_classes
    out_codec.fields(C)  # refuses a codec that cannot store C classes (k > C) before anything is written
    written = a.written
    # crops: compare every written image's box/flip/aug before writing anything
    shards = _written_batches(a)
    for idx in shards:
        ra = a.read_batch(idx)
        for b, nb in zip(readers[1:], names[1:]):
            d = _first_crop_diff(ra, b.read_batch(idx), idx)
            if d is not None:
                i, m, arr = d
                raise ValidationError(f"stores must share crops: image {i} ({a.image_keys[i]!r}) slot {m} has a "
                                      f"different {arr} in {nb} than in {names[0]}.")
    dst_options = _storage.options_for(dst, storage_options)
    dst_store = _storage.as_store(dst, read_only=False, storage_options=dst_options)
    record = made_by("ensemble", sources=[location_name(s) for s in srcs],
                     source_ids=[source_identity(r.header) for r in readers], to=out_codec.get_config())
    open_destination(dst, dst_store, record)
    meta = dict(h.meta)
    meta["history"] = list(meta.get("history") or []) + [history_record(
        "ensemble", sources=[location_name(s) for s in srcs], codecs=[r.header.codec.get_config() for r in readers],
        teachers=[(r.meta or {}).get("teacher") for r in readers], to=out_codec.get_config(),
        images=int(written.sum()))]
    meta[MADE_BY] = record
    with remove_on_error(dst_store), _write_like(dst_store, a, codec=out_codec, meta=meta) as w:
        shards = _written_batches(a, w.written)
        for idx in _progress.progress(progress, total=len(shards), desc="ensembling", unit="shard").wrap(shards):
            recs = [r.read_batch(idx) for r in readers]
            mean = np.zeros(recs[0].box.shape[:2] + (C,), np.float64)
            for r, rec in zip(readers, recs):
                mean += r.decode(rec.fields)
            mean /= len(readers)
            if out_codec.input == "logits":
                with np.errstate(divide="ignore"):
                    x = np.log(np.maximum(mean, np.finfo(np.float64).tiny))
            else:
                x = mean.astype(np.float32)
            w.put(idx, recs[0].box, recs[0].flip, x, aug=recs[0].aug or None)
    for r in readers:
        r.close()
    return {"images": int(written.sum()), "missing": int((~written).sum()), "sources": names,
            "codec": out_codec.get_config(),
            "bytes_after": storage_stats(dst, storage_options=dst_options)["_total"]["bytes"]}
