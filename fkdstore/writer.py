"""Create and write fkdstore stores (format 4.0: ``spec/format-v4.md``; the format in code is :mod:`fkdstore.schema`).

``write(location, ...)`` creates a store (or re-opens one with an identical schema, to resume) and returns a
:class:`Writer`. ``location`` is a folder or a URL (``s3://``, ``gs://``, ``memory://``, ...; see
:func:`fkdstore.storage.as_store`).

Creation (invariant 1): every array is created, every chunk of the per-image arrays (key, image_size,
label, written) and every manifest row (with the per-image tags) written first; the header attribute
``"fkdstore"`` is written last, so a folder or prefix without it is not a store. A creation killed before
the header is removed by :func:`clear_interrupted_creation` (``write`` calls it); nothing else is ever
deleted.

Writing one shard (images ``shard_range(s)``), in this order:

1. every record array's shard, one whole-shard write each (every inner chunk materialised, even all-zero
   ones, so a missing chunk always means damage);
2. the shard's ``manifest`` row: the position-bound tags (:func:`fkdstore.schema.manifest_tags`) of the
   per-image chunks and of every inner chunk just written;
3. the shard's ``written`` chunk (flags of the images now stored).

On a local store every file is written aside and renamed over its name (:class:`fkdstore.storage.FolderStore`),
and every file of steps 1 and 2 (and its directory) is fsync'ed before the next step starts, so after a power
loss a flag never reaches the disk before the data and manifest it vouches for. On an object store each chunk
is one PUT, which is atomic and durable when it returns, and steps run in order. Temp files a killed writer
left are removed when a store is opened for writing (:func:`fkdstore.storage.remove_stale_temps`).

Buffering: a writer buffers partially filled shards in memory (at most ``max_buffered_shards``; the least
recently used one is written early, with flags for the images it holds, when more are needed) and writes a
shard as soon as all its images are put. A shard written early is later rewritten whole with its stored
images kept (read-modify-write); between its data and its manifest row the rows it adds are not yet marked
written, so readers keep reading every written image (spec invariant 9). A failed write keeps the buffer:
:meth:`Writer.flush` / :meth:`Writer.close` retry it, and the error is raised.

Ownership (one writer per shard): :mod:`fkdstore.ownership`. Under it, the writer re-reads the shard's
``written`` flags when it takes the shard and before it writes its data: another writer's images are kept,
and putting an image already written is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from . import __version__, storage
from . import codecs as _codecs
from . import schema as S
from .augment.base import Column
from .augment.pipeline import Pipeline
from .derived import derivation
from .errors import (
    ConcurrentWriterError,
    CorruptStoreError,
    FkdstoreError,
    FormatError,
    SchemaMismatchError,
    ValidationError,
)
from .labelmap import LabelMapSpec, validate_maps
from .ownership import OWNERS, Owners
from .seeded import SlotCropSampler
from .transforms import Replay, bad_boxes
from .validation import int_in_range, positive_int

__all__ = ["write", "Writer", "clear_interrupted_creation"]

MAX_BUFFERED_SHARDS = 4
_T = TypeVar("_T")
_INT32_MAX = np.iinfo(np.int32).max


_as_codec = _codecs.as_codec  # 0.1 name (fkdstore.store._as_codec); the one codec coercion is as_codec


def _compressors(dtype: str):
    return [BloscCodec(typesize=np.dtype(dtype).itemsize, **S.COMPRESSOR), Crc32cCodec()]


def _small_compressors():
    return [ZstdCodec(level=3), Crc32cCodec()]


# ---------------------------------------------------------------------------------- interrupted creation

_OURS = {S.KEY, S.IMAGE_SIZE, S.LABEL, S.WRITTEN, S.BOX, S.FLIP, S.AUG, S.SOFT_GROUP, S.MAP_GROUP, S.MANIFEST,
         OWNERS, "zarr.json"}


def clear_interrupted_creation(location, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Remove a store whose creation was killed before its header attribute was written, so a rerun can
    create it again; return True if something was removed.

    Only an interrupted fkdstore creation is removed: the root ``zarr.json`` is a Zarr group whose only
    attribute is the creation marker :data:`fkdstore.schema.CREATING_KEY` (a writer creates the group with
    it and replaces it by the header last, spec invariant 1), every top-level entry is a name fkdstore
    creates, and ``written`` holds no flag set (no image was ever marked written). Anything else — a store,
    a user's attribute-less Zarr group with the same array names, foreign data — is left alone. (This is
    the one home of the rule; ``write`` and so ``generate`` call it.)
    """
    store = storage.as_store(location, read_only=False, storage_options=storage_options)
    meta = storage.read_group_json(store)
    if meta is None or meta.get("node_type") != "group" or set(meta.get("attributes") or {}) != {S.CREATING_KEY}:
        return False
    entries = {e for e in storage.list_dir(store, "") if not storage.is_temp_name(e)}
    if not entries <= _OURS:
        return False
    if any(not k.endswith("zarr.json") for k in storage.list_prefix(store, S.WRITTEN + "/")):
        try:  # chunks written at creation: removable while no flag is set
            if np.asarray(zarr.open_array(store=store, path=S.WRITTEN, mode="r")[:]).any():
                return False
        except Exception:  # noqa: BLE001 - unreadable flags: not provably an empty creation, leave it
            return False
    for name in sorted(entries - {"zarr.json"}):
        sync(store.delete_dir(name))
    sync(store.delete("zarr.json"))
    root = storage.local_root(store)
    if root is not None:
        for name in sorted(entries - {"zarr.json"}):
            _remove_empty_dirs(os.path.join(root, name))
    return True


def _remove_empty_dirs(path: str) -> None:
    for dirpath, _, _ in sorted(os.walk(path), key=lambda t: len(t[0]), reverse=True):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ write


def write(
    location,
    *,
    num_images: int,
    num_classes: int,
    image_keys: Sequence[str],
    image_sizes,
    crops_per_image: int | None = None,
    codec: _codecs.LabelCodec | str | Mapping | None = None,
    crop_sampler: SlotCropSampler | Mapping | None = None,
    label_map: LabelMapSpec | Mapping | None = None,
    labels=None,
    replay: Replay | Mapping | None = None,
    meta: Mapping[str, Any] | None = None,
    aug: Sequence | None = None,
    augment: Sequence[Mapping[str, Any]] | None = None,
    images_per_chunk: int | None = None,
    images_per_shard: int | None = None,
    primary: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    max_buffered_shards: int = MAX_BUFFERED_SHARDS,
    store_id: str | None = None,
) -> Writer:
    """Create a store at ``location`` (or re-open an existing one with the identical schema, to resume) for
    writing; returns a :class:`Writer`. The store is format 4.0 (``spec/format-v4.md``).

    Record kind: crop regions (FKD; give ``crops_per_image`` and ``codec``) or, with ``label_map``, label
    maps (ReLabel; give neither).

    Args:
        location: a folder or a URL (with ``storage_options`` for fsspec).
        num_images, num_classes: N and C.
        image_keys: N unique non-empty strings without NUL (relative paths or ids) binding records to images.
        image_sizes: (N, 2) integer (height, width) of each original image, each in [1, 2**31 - 1].
        crops_per_image: M, crop slots per image (regions).
        codec: a :class:`fkdstore.codecs.LabelCodec`, a codec name or spec, or a config dict (regions).
        crop_sampler: a :class:`fkdstore.seeded.SlotCropSampler` (or its config): seeded crops, the store
            holds no ``box``/``flip`` arrays and :meth:`Writer.put` takes ``boxes=None, flips=None`` (or
            refuses boxes and flips that differ from the sampler's). ``None``: the crops are stored as given
            (imports, pruning, crops from elsewhere).
        label_map: a :class:`fkdstore.labelmap.LabelMapSpec` (or its config): a label-map store, written with
            :meth:`Writer.put_maps`.
        labels: optional (N,) ground-truth classes, -1 where unknown.
        replay: how the teacher's pixels are rebuilt (:class:`fkdstore.transforms.Replay` or its config):
            input size, interpolation, mean, std; checksummed in the header, what :class:`TorchDataset`
            replays. ``None``: the store does not say (training must pass them).
        meta: JSON provenance (teacher, ...); tuples become lists, NaN/inf are refused. On re-open it must
            match, except the keys listed in :data:`fkdstore.schema.VOLATILE_META`.
        aug: augmentation columns stored per crop (names, ``(name, kind[, dtype[, shape]])`` tuples, dicts or
            :class:`fkdstore.augment.base.Column`); default: the ``augment`` pipeline's columns.
        augment: the augmentation policy configs the teacher saw, validated here like a reader does.
        images_per_chunk, images_per_shard: layout override. Defaults: :func:`fkdstore.schema.default_layout`
            for a new store, the store's own layout on re-open (a different explicit value is refused).
        primary: only the primary writer (rank 0) creates the store and writes attributes; others require
            the store to exist.
        max_buffered_shards: at most this many partially filled shards are held in memory.
        store_id: 32 lowercase hex digits naming the store in every manifest tag. Default: a digest of what
            the store is (:func:`_default_store_id`: header, non-volatile ``meta``, keys, sizes, labels), so
            the same inputs give the same store byte for byte and stores of other teachers, codecs or images
            get other ids; a resumed store keeps its own.

    Raises :class:`ValidationError` / :class:`TypeError` for bad input and :class:`SchemaMismatchError` if an
    existing store differs; nothing is written in either case.
    """
    max_buffered_shards = positive_int("max_buffered_shards", max_buffered_shards)
    inputs = _parse_inputs(num_images, num_classes, image_keys, image_sizes, labels, meta)
    records = _records(num_classes, crops_per_image, codec, crop_sampler, label_map, aug, augment,
                       int(inputs["sizes"].max()))
    replay = _replay(replay)
    if store_id is not None and not isinstance(store_id, str):
        raise TypeError(f"store_id must be a str of 32 hex digits. Got {type(store_id).__name__}.")
    header = _make_header(inputs, records, replay, images_per_chunk, images_per_shard, store_id,
                          existing=None)  # every check before anything is written
    store = storage.as_store(location, read_only=False, storage_options=storage_options)
    where = storage.describe(store)
    storage.remove_stale_temps(store)  # files a killed writer was writing aside (never a live writer's)
    if primary:
        clear_interrupted_creation(store)
    group_meta = storage.read_group_json(store)
    if group_meta is not None:
        if S.ATTR_KEY not in group_meta.get("attributes", {}):
            raise ValidationError(f"{where} exists and is not an fkdstore store; refusing to overwrite it")
        old = S.parse_header(group_meta["attributes"][S.ATTR_KEY])
        if old.legacy:
            raise SchemaMismatchError(
                f"{where} is a format {old.format_version} store (fkdstore 0.2); this library writes format "
                f"{S.FORMAT_VERSION} and cannot add to it: finish it with fkdstore 0.2, or `fkdstore convert` it")
        header = _make_header(inputs, records, replay, images_per_chunk, images_per_shard, old.store_id,
                              existing=old)
        group = zarr.open_group(store=store, mode="r+")
        _check_same_schema(group, old, header, inputs, where)
    elif not primary:
        raise FormatError(f"{where}: no store to join; the primary writer must create it first")
    else:
        if storage.list_dir(store, ""):
            raise ValidationError(f"{where} exists and is not an fkdstore store; refusing to overwrite it")
        group = _create(store, header, inputs)
    return Writer(group, header, primary=primary, max_buffered_shards=max_buffered_shards)


def _records(num_classes, crops_per_image, codec, crop_sampler, label_map, aug, augment,
             max_side: int) -> S.Regions | S.LabelMap:
    """The record kind's object of a new store from ``write``'s arguments (every argument checked)."""
    if label_map is not None:
        extra = [n for n, v in (("crops_per_image", crops_per_image), ("codec", codec), ("crop_sampler", crop_sampler),
                                ("aug", aug), ("augment", augment)) if v]
        if extra:
            raise ValidationError(f"a label-map store takes none of {extra} (they describe crop regions)")
        if not isinstance(label_map, LabelMapSpec):
            if not isinstance(label_map, Mapping):
                raise TypeError(f"label_map must be a LabelMapSpec or its config. Got {type(label_map).__name__}.")
            label_map = LabelMapSpec.from_config(_normalised_json(dict(label_map), "label_map"))
        return S.LabelMap(spec=label_map)
    if crops_per_image is None or codec is None:
        raise ValidationError("write needs crops_per_image and codec (a crop-regions store), or label_map")
    codec = _codecs.as_codec(codec)
    codec.fields(positive_int("num_classes", num_classes))  # k <= C etc.
    pipeline = _pipeline(augment)
    columns = S.parse_aug(aug) if aug is not None else pipeline.columns()
    return S.Regions(crops_per_image=crops_per_image, codec=codec, box_dtype=S.box_dtype(max_side),
                     sampler=_sampler(crop_sampler), aug=columns, augment=pipeline)


def _pipeline(augment) -> Pipeline:
    """The augmentation pipeline of ``write(augment=...)``, validated as a reader will (unknown policies and
    bad parameters are refused here, before a store exists)."""
    if augment is None:
        return Pipeline(())
    if isinstance(augment, Pipeline):
        return augment
    if isinstance(augment, (str, bytes, Mapping)) or not isinstance(augment, Sequence):
        raise TypeError(f"augment must be a list of policy configs. Got {type(augment).__name__}.")
    return Pipeline.from_config(_normalised_json([dict(p) for p in augment], "augment"))


def _sampler(crop_sampler) -> SlotCropSampler | None:
    """``write(crop_sampler=...)``: a SlotCropSampler, its config, or None (stored crops)."""
    if crop_sampler is None or isinstance(crop_sampler, SlotCropSampler):
        return crop_sampler
    if not isinstance(crop_sampler, Mapping):
        raise TypeError(f"crop_sampler must be a SlotCropSampler, its config dict or None. "
                        f"Got {type(crop_sampler).__name__}.")
    return SlotCropSampler.from_config(_normalised_json(dict(crop_sampler), "crop_sampler"))


def _replay(replay) -> Replay | None:
    if replay is None or isinstance(replay, Replay):
        return replay
    if not isinstance(replay, Mapping):
        raise TypeError(f"replay must be a Replay, its config dict or None. Got {type(replay).__name__}.")
    return Replay.from_config(_normalised_json(dict(replay), "replay"))


def _normalised_json(obj: Any, what: str) -> Any:
    """``obj`` after one JSON round trip (tuples -> lists), refusing NaN/inf and non-JSON values."""
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"{what} must be standard JSON (no NaN or inf, str keys). Got an error: {e}.") from None
    out = json.loads(text)
    S.check_json(out, what)
    return out


def _parse_inputs(N, C, image_keys, image_sizes, labels, meta) -> dict[str, Any]:
    N = int_in_range("num_images", N, 1, S.MAX_IMAGES)
    C = int_in_range("num_classes", C, 1, S.MAX_CLASSES)
    if isinstance(image_keys, (str, bytes)):
        raise TypeError(f"image_keys must be a sequence of str. Got {type(image_keys).__name__}.")
    keys = list(image_keys)
    if len(keys) != N:
        raise ValidationError(f"image_keys must have num_images={N} entries. Got {len(keys)}.")
    key_arr = S.encode_keys(keys)
    if len(set(keys)) != N:
        seen: set[str] = set()
        for k in keys:
            if k in seen:
                raise ValidationError(f"image_keys must be unique. {k!r} appears more than once.")
            seen.add(k)
    sizes = np.asarray(image_sizes)
    if sizes.shape != (N, 2):
        raise ValidationError(f"image_sizes must be an integer array of shape ({N}, 2). Got shape {sizes.shape}.")
    if not np.issubdtype(sizes.dtype, np.integer):
        raise TypeError(f"image_sizes must be an integer array of shape ({N}, 2). Got dtype {sizes.dtype}.")
    bad = ((sizes < 1) | (sizes > _INT32_MAX)).any(1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValidationError(
            f"image_sizes must be in [1, {_INT32_MAX}] (stored as int32). Image {i} ({keys[i]!r}) has size "
            f"{sizes[i].tolist()}."
        )
    if labels is None:
        labels_arr = np.full(N, S.UNKNOWN_LABEL, dtype=np.int32)
    else:
        labels_arr = np.asarray(labels)
        if labels_arr.shape != (N,):
            raise ValidationError(f"labels must be an integer array of shape ({N},). Got shape {labels_arr.shape}.")
        if not np.issubdtype(labels_arr.dtype, np.integer):
            raise TypeError(f"labels must be an integer array of shape ({N},). Got dtype {labels_arr.dtype}.")
        bad = (labels_arr < S.UNKNOWN_LABEL) | (labels_arr >= C)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValidationError(f"labels must be in [-1, {C}). Image {i} has label {int(labels_arr[i])}.")
        labels_arr = labels_arr.astype(np.int32)
    meta = _normalised_json(dict(meta or {}), "meta")
    return dict(N=N, C=C, keys=keys, key_arr=key_arr, sizes=sizes.astype(np.int32), labels=labels_arr, meta=meta)


def _default_store_id(header: S.Header, inputs: Mapping[str, Any]) -> str:
    """The store id a writer picks when none is given: the first 128 bits of the sha256 of the header's
    checksummed content (its store id left out), the non-volatile ``meta`` (provenance: teacher, ...), and the
    keys, sizes and labels."""
    body = json.loads(header.identity())
    body.pop("store_id", None)
    meta = {k: v for k, v in header.meta.items() if k not in S.VOLATILE_META}
    h = hashlib.sha256(S.canonical_json({"header": body, "meta": meta}).encode("utf-8"))
    for name in ("key_arr", "sizes", "labels"):
        h.update(np.ascontiguousarray(inputs[name]).astype(inputs[name].dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()[:32]


def _make_header(inputs, records, replay, ipc, ips, store_id: str | None, *,
                 existing: S.Header | None) -> S.Header:
    N = inputs["N"]
    ipc = None if ipc is None else positive_int("images_per_chunk", ipc)
    ips = None if ips is None else positive_int("images_per_shard", ips)
    common = dict(num_images=N, num_classes=inputs["C"], key_length=int(inputs["key_arr"].shape[1]),
                  has_labels=bool((inputs["labels"] >= 0).any()), records=records, replay=replay,
                  store_id=store_id, meta=inputs["meta"], library_version=__version__)
    if existing is not None:  # resume adopts the store's layout; an explicit different one is refused below
        ipc = existing.images_per_chunk if ipc is None else ipc
        ips = existing.images_per_shard if ips is None else ips
    else:
        row = max(math.prod(r) * np.dtype(d).itemsize for r, d in records.specs(inputs["C"]).values())
        d_ipc, d_ips = S.default_layout(N, row, records.records_per_image)
        if ipc is None:
            ipc = d_ipc if ips is None or ips % d_ipc == 0 else math.gcd(ips, d_ipc)
        if ips is None:
            ips = max(d_ips, ipc) // ipc * ipc
    header = S.Header(layout=S.Layout(images_per_chunk=ipc, images_per_shard=ips), **{**common, "store_id": "0" * 32})
    if store_id is None:
        store_id = _default_store_id(header, inputs)
    return dataclasses.replace(header, store_id=store_id)


def _create(store, header: S.Header, inputs) -> zarr.Group:
    """Create every array, write every per-image chunk, ``written`` (all zero) and the manifest rows with the
    per-image tags, and write the header attribute last (invariant 1)."""
    marker: dict[str, Any] = {S.CREATING_KEY: {"library_version": header.library_version, "started": time.time()}}
    group = zarr.open_group(store=store, mode="w", attributes=marker)  # replaced by the header, last
    N, ips = header.num_images, header.images_per_shard
    per_image = {S.KEY: inputs["key_arr"], S.IMAGE_SIZE: inputs["sizes"], S.LABEL: inputs["labels"],
                 S.WRITTEN: np.zeros(N, np.uint8)}
    with zarr.config.set({"array.write_empty_chunks": True}):  # every chunk exists: a missing one is damage
        for name, data in per_image.items():
            group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(ips, *data.shape[1:]),
                               compressors=_small_compressors(), fill_value=S.PER_IMAGE_FILL[name])[:] = data
        manifest = group.create_array(S.MANIFEST, shape=header.manifest_shape, dtype="uint32",
                                      chunks=header.manifest_chunk, compressors=_small_compressors(),
                                      fill_value=0)
        manifest[:] = _manifest_rows(header, range(header.num_shards), per_image)
    for sub in {name.split("/")[0] for name in header.record_specs() if "/" in name}:
        group.create_group(sub)
    for name, (row, dtype) in header.stored_specs().items():
        group.create_array(
            name, shape=(N, *row), dtype=dtype, chunks=(header.images_per_chunk, *row), shards=(ips, *row),
            compressors=_compressors(dtype), fill_value=S.FILL_VALUE, write_data=False,
        )
    group.attrs.put({S.ATTR_KEY: header.to_json()})  # last, replacing the creation marker: now a store
    return group


def _image_tags(header: S.Header, s: int, per_image: Mapping[str, np.ndarray]) -> list[int]:
    """The manifest tags of shard ``s``'s chunks of key, image_size and label (``per_image``: whole arrays)."""
    r, ips = header.shard_range(s), header.images_per_shard
    return [int(S.manifest_tags(name, s, per_image[name][r.start:r.stop], ips, header.tag_prefix,
                                S.PER_IMAGE_FILL[name])[0]) for name in header.bound_per_image]


def _manifest_rows(header: S.Header, shards: range, per_image: Mapping[str, np.ndarray],
                   record_tags: np.ndarray | None = None) -> np.ndarray:
    """Manifest rows of ``shards``: per-image tags, then the record tags (``(shards, cps * P)``, default 0:
    nothing written yet)."""
    lead = np.array([_image_tags(header, s, per_image) for s in shards], np.uint32).reshape(len(shards), -1)
    if record_tags is None:
        record_tags = np.zeros((len(shards), header.manifest_width - lead.shape[1]), np.uint32)
    return np.concatenate([lead, record_tags], 1)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested header objects as dotted keys (``layout.images_per_shard``), for messages naming the field."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_schema(group, old: S.Header, new: S.Header, inputs, where: str) -> None:
    old_d, new_d = _flat(json.loads(old.identity())), _flat(json.loads(new.identity()))
    for k in sorted(set(old_d) | set(new_d)):
        if k == "key_length":
            continue  # compared below with the keys themselves, for a clearer message
        if new_d.get(k) != old_d.get(k):
            raise SchemaMismatchError(
                f"existing store {where} has {k}={old_d.get(k)!r}, this run asks for {new_d.get(k)!r}; "
                f"use another location or the original parameters"
            )
    old_meta = {k: v for k, v in old.meta.items() if k not in S.VOLATILE_META}
    new_meta = {k: v for k, v in new.meta.items() if k not in S.VOLATILE_META}
    for k in sorted(set(old_meta) | set(new_meta)):
        if old_meta.get(k) != new_meta.get(k):
            raise SchemaMismatchError(
                f"existing store {where} was made with another meta[{k!r}] than this run: "
                f"{_difference(old_meta.get(k), new_meta.get(k))}; resume with the same {k} (and teacher, weights "
                f"and options), or write to another location")
    try:
        old_keys = S.decode_keys(storage.read_array(group, S.KEY))
        old_arrays = {"image_sizes": storage.read_array(group, S.IMAGE_SIZE),
                      "labels": storage.read_array(group, S.LABEL)}
    except KeyError as e:
        raise FormatError(f"{where}: array {e} is missing") from None
    if old_keys != inputs["keys"]:
        i = next((i for i, (a, b) in enumerate(zip(old_keys, inputs["keys"])) if a != b), 0)
        raise SchemaMismatchError(f"existing store {where} has image_keys[{i}]={old_keys[i]!r}, this run has "
                                  f"{inputs['keys'][i]!r}")
    for what, arr in (("image_sizes", inputs["sizes"]), ("labels", inputs["labels"])):
        had = old_arrays[what]
        if not np.array_equal(had, arr):
            i = int(np.argmax((had != arr).reshape(len(arr), -1).any(1)))
            raise SchemaMismatchError(f"existing store {where} has {what}[{i}]={had[i].tolist()!r}, this run has "
                                      f"{arr[i].tolist()!r}")


def _difference(old, new) -> str:
    """What differs between two meta values, key by key for dicts (``key: stored -> this run``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
        return ", ".join(f"{k}: {old.get(k)!r} (stored) -> {new.get(k)!r} (this run)" for k in keys)
    return f"{old!r} (stored) -> {new!r} (this run)"


# ---------------------------------------------------------------------------------------------- writer


def _fault_point(step: str, shard: int) -> None:
    """Called between the steps of a shard write (``"array"`` after each data array, ``"data"``,
    ``"manifest"``, ``"flags"``). A no-op; fault-injection tests replace it to kill the process there."""


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return x


class Writer:
    """Writes whole images into a store; see :func:`write`. Use as a context manager or call :meth:`close`.

    Attributes: ``group`` (the Zarr group), ``header`` (:class:`fkdstore.schema.Header`), ``codec``,
    ``primary``, ``max_buffered_shards``; :attr:`written` (flags on storage)."""

    def __init__(self, group: zarr.Group, header: S.Header, *, primary: bool = True,
                 max_buffered_shards: int = MAX_BUFFERED_SHARDS):
        self.group, self.header, self.primary = group, header, primary
        self.codec: _codecs.LabelCodec | None = header.codec if header.kind == S.REGIONS else None
        self.max_buffered_shards = positive_int("max_buffered_shards", max_buffered_shards)
        self.store = group.store
        self._where = storage.describe(self.store)
        self._specs = header.record_specs()  # buffers hold derived arrays too (their manifest tags)
        self._columns = {name: p for p, name in enumerate(self._specs)}
        self._zarr_arrays: dict[str, zarr.Array] = {}
        self._derived = header.derived_arrays
        # the per-image arrays as stored (the writer tags their chunks in every manifest row it writes)
        self._per_image = {name: storage.read_array(group, name) for name in header.bound_per_image}
        self._sizes = self._per_image[S.IMAGE_SIZE]
        self._derivation = derivation(header, self._sizes.__getitem__, self._where)
        self._written = storage.read_array(group, S.WRITTEN).astype(bool)
        self._buffers: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()  # LRU order, oldest first
        self._owners = Owners(self.store, self._where)
        self._owners.drop_stale(self._complete_shards())
        self._closed = False

    def _complete_shards(self) -> set[int]:
        h = self.header
        return {s for s in range(h.num_shards) if self._written[h.shard_range(s).start:h.shard_range(s).stop].all()}

    # -- properties
    @property
    def num_images(self) -> int:
        return self.header.num_images

    @property
    def written(self) -> np.ndarray:
        """(N,) bool: images whose labels are on storage (buffered images are not yet written)."""
        return self._written.copy()

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) ``(height, width)`` as recorded (:meth:`set_image_sizes` changes those of unwritten images)."""
        return self._sizes.copy()

    @property
    def buffered_shards(self) -> list[int]:
        """Shards held in memory, least recently used first."""
        return list(self._buffers)

    # -- input
    def put(self, image_indices, boxes, flips, probs, aug=None, *, overwrite: bool = False) -> None:
        """Encode ``probs`` (B, M, C) with the store's codec and write images ``image_indices`` (B,).
        (``probs`` holds what the codec takes, ``codec.input``: probabilities, or logits for ``logits``.)

        ``boxes`` (B, M, 4) integer (top, left, height, width) inside each image; ``flips`` (B, M) bool;
        ``aug`` when the store declares augmentation columns: a dict ``{name: (B, M, *shape)}``, or one
        (B, M, A) array when every column is a scalar. Rows of ``probs`` must be finite, non-negative and sum
        to 1 within ``PROB_ATOL`` (``codec.validate_input``). Everything is validated before
        anything is buffered. An image put again before its shard is written replaces the earlier put.

        An image already written (marked in ``written``, by this writer or another, re-read from storage
        when this writer takes its shard and again before it writes it) is refused with a
        :class:`ValidationError` naming it, unless ``overwrite=True``: then its labels are replaced (a reader
        running meanwhile may need its one re-read to see the image, old or new).
        """
        idx = self._check_indices(image_indices)
        probs = _to_numpy(probs)
        B, M, C = len(idx), self.header.crops_per_image, self.header.num_classes  # FormatError for label maps
        if tuple(np.shape(probs)) != (B, M, C):
            raise ValidationError(f"probs must have shape (B, M, C) = ({B}, {M}, {C}). Got {np.shape(probs)}.")
        probs = np.asarray(probs)
        codec = self.header.codec
        codec.validate_input(probs, C)
        # a codec that draws (sampled) draws crop (i, s) from its crop key: independent of batching
        keys = _codecs.crop_keys(idx[:, None], np.arange(M)[None, :])
        fields = codec.encode(probs.astype(np.float32, copy=False), keys=keys)
        self._put(idx, boxes, flips, fields, aug, overwrite=overwrite)

    def put_fields(self, image_indices, boxes, flips, fields: Mapping[str, Any], aug=None, *,
                   overwrite: bool = False) -> None:
        """Write already-encoded codec fields (used by convert and importers); validated like :meth:`put`
        (shapes, then ``codec.validate_fields``: class indices in [0, C) and distinct, probabilities finite in
        [0, 1], top-K values non-increasing, stored mass at most 1; images already written as :meth:`put`)."""
        idx = self._check_indices(image_indices)
        self.header.regions  # noqa: B018 - FormatError for a label-map store
        if not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a mapping of field name -> array. Got {type(fields).__name__}.")
        self._put(idx, boxes, flips, {k: np.asarray(_to_numpy(v)) for k, v in fields.items()}, aug,
                  validate_values=True, overwrite=overwrite)

    def put_maps(self, image_indices, indices, scores, *, overwrite: bool = False) -> None:
        """Write the label maps of images ``image_indices`` (B,) of a label-map store: ``indices`` (B, K, S, S)
        integer class ids and ``scores`` (B, K, S, S) raw scores, checked by
        :func:`fkdstore.labelmap.validate_maps` (shapes, ids in [0, C) and distinct per cell, finite scores)
        before anything is buffered; images already written as :meth:`put`."""
        idx = self._check_indices(image_indices)
        spec, C = self.header.label_map, self.header.num_classes
        indices, scores = np.asarray(_to_numpy(indices)), np.asarray(_to_numpy(scores))
        want = (len(idx), *spec.map_shape)
        for what, v in (("indices", indices), ("scores", scores)):
            if v.shape != want:
                raise ValidationError(f"{what} must have shape (B, K, S, S) = {want}. Got {v.shape}.")
        validate_maps(indices, scores, spec, C)
        stored = scores.astype(spec.dtype)
        if not np.isfinite(stored).all():
            b = int(np.argwhere(~np.isfinite(stored))[0][0])
            raise ValidationError(f"scores must be finite in {spec.dtype}. Image {int(idx[b])} has a value that "
                                  f"is not (NaN, infinite, or beyond the {spec.dtype} range).")
        ordered = np.sort(indices, axis=1)
        repeat = (ordered[:, 1:] == ordered[:, :-1]).any(1)
        if repeat.any():
            b, y, x = (int(v) for v in np.argwhere(repeat)[0])
            raise ValidationError(f"indices must be distinct in every map cell. Image {int(idx[b])} cell (y={y}, "
                                  f"x={x}) repeats a class.")
        self._buffer_rows(idx, {S.MAP_INDICES: indices.astype(spec.index_dtype(C)), S.MAP_SCORES: stored},
                          overwrite=overwrite)

    def _check_indices(self, image_indices) -> np.ndarray:
        self._check_open()
        idx = np.asarray(_to_numpy(image_indices))
        if idx.dtype == bool or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"image_indices must be integers. Got dtype {idx.dtype}.")
        if idx.ndim != 1:
            raise ValidationError(f"image_indices must be a 1-D array. Got shape {idx.shape}.")
        idx = idx.astype(np.int64)
        out = (idx < 0) | (idx >= self.num_images)
        if out.any():
            raise ValidationError(f"image index {int(idx[out][0])} is out of range [0, {self.num_images}).")
        if len(np.unique(idx)) != len(idx):
            raise ValidationError("image_indices must not repeat an image within one put().")
        return idx

    def _put(self, idx, boxes, flips, fields, aug, *, validate_values: bool = False, overwrite: bool = False) -> None:
        h = self.header
        B, M, C = len(idx), h.crops_per_image, h.num_classes
        derived = self._derivation.given(idx, {S.BOX: _to_numpy(boxes), S.FLIP: _to_numpy(flips)})
        boxes, flips = derived.get(S.BOX, boxes), derived.get(S.FLIP, flips)  # seeded crops: the sampler's
        boxes, flips = np.asarray(_to_numpy(boxes)), np.asarray(_to_numpy(flips))
        if boxes.shape != (B, M, 4):
            raise ValidationError(f"boxes must be an integer array of shape ({B}, {M}, 4). Got shape {boxes.shape}.")
        if not np.issubdtype(boxes.dtype, np.integer):
            raise TypeError(f"boxes must be an integer array of shape ({B}, {M}, 4). Got dtype {boxes.dtype}.")
        bad = bad_boxes(boxes, self._sizes[idx])
        if bad.any():
            b, m = (int(x) for x in np.argwhere(bad)[0])
            i = int(idx[b])
            key = self._key(i)
            raise ValidationError(
                f"box must have height, width >= 1 and lie inside the image. Image {i} ({key!r}, "
                f"size {self._sizes[i].tolist()}) slot {m} has box (top, left, height, width)={boxes[b, m].tolist()}."
            )
        if flips.shape != (B, M):
            raise ValidationError(f"flips must be a bool array of shape ({B}, {M}). Got shape {flips.shape}.")
        if not (flips.dtype == bool or (np.issubdtype(flips.dtype, np.integer) and np.isin(flips, (0, 1)).all())):
            raise TypeError(f"flips must be a bool array of shape ({B}, {M}). Got dtype {flips.dtype}.")
        data = {S.BOX: boxes.astype(h.box_dtype), S.FLIP: flips.astype(bool)}
        data.update(self._aug_columns(aug, B))
        codec = h.codec
        expected = codec.fields(C)
        if set(fields) != set(expected):
            raise ValidationError(f"codec {codec.name!r} stores fields {list(expected)}. Got {sorted(fields)}.")
        for name, spec in expected.items():
            v = fields[name]
            if v.shape != (B, M, *spec.shape):
                raise ValidationError(f"field {name!r} must have shape {(B, M, *spec.shape)}. Got {v.shape}.")
        if validate_values:
            codec.validate_fields(fields, C)
        for name, spec in expected.items():
            data[S.soft_path(name)] = np.asarray(fields[name]).astype(spec.dtype, copy=False)
        self._buffer_rows(idx, data, overwrite=overwrite)

    def _aug_columns(self, aug, B: int) -> dict[str, np.ndarray]:
        cols, M = self.header.aug, self.header.crops_per_image
        if not cols:
            if aug is not None:
                raise ValidationError("this store declares no aug columns; pass aug=None.")
            return {}
        names = [a.name for a in cols]
        if aug is None:
            raise ValidationError(f"this store declares aug columns {names}; pass aug={{name: (B, M, ...)}}.")
        if isinstance(aug, Mapping):
            if set(aug) != set(names):
                raise ValidationError(f"aug must have the columns {names}. Got {sorted(aug)}.")
            values = {a.name: np.asarray(_to_numpy(aug[a.name])) for a in cols}
        else:
            arr = np.asarray(_to_numpy(aug))
            if any(a.shape for a in cols) or arr.shape != (B, M, len(cols)):
                raise ValidationError(
                    f"aug must be a dict {{name: (B, M, *shape)}} for columns {names}, or one (B, M, {len(cols)}) "
                    f"array when every column is a scalar. Got shape {arr.shape}."
                )
            values = {a.name: arr[..., j] for j, a in enumerate(cols)}
        return {S.aug_path(a.name): _column_values(a, values[a.name], (B, M, *a.shape)) for a in cols}

    # -- buffering
    def _buffer_rows(self, idx: np.ndarray, data: dict[str, np.ndarray], *, overwrite: bool = False) -> None:
        ips = self.header.images_per_shard
        shards = idx // ips
        order = np.argsort(shards, kind="stable")
        uniq, starts = np.unique(shards[order], return_index=True)
        for s in uniq:  # own every shard of this put before buffering any of it
            if int(s) not in self._buffers:
                self._owners.claim(int(s))
                self._reread_flags(int(s))  # under ownership: what other writers completed is seen here
        if not overwrite:
            self._refuse_written(idx)
        for s, sel in zip(uniq.tolist(), np.split(order, starts[1:])):
            self._owners.claim(s)  # renews a held record at most every quarter lease
            buf = self._buffer(s)
            rows = idx[sel] - s * ips
            for name, v in data.items():
                buf[name][rows] = v[sel]
            buf["_mask"][rows] = True
            buf["_over"][rows] = overwrite
            r = self.header.shard_range(s)
            if (buf["_mask"] | self._written[r.start:r.stop]).all():
                self._flush_shard(s)
            while len(self._buffers) > self.max_buffered_shards:
                self._flush_shard(next(iter(self._buffers)))  # least recently used partial shard

    def _buffer(self, s: int) -> dict[str, np.ndarray]:
        buf = self._buffers.get(s)
        if buf is None:
            n = len(self.header.shard_range(s))
            buf = {name: np.zeros((n, *row), dtype=dtype) for name, (row, dtype) in self._specs.items()}
            buf["_mask"] = np.zeros(n, dtype=bool)
            buf["_over"] = np.zeros(n, dtype=bool)  # rows put with overwrite=True
            self._buffers[s] = buf
        self._buffers.move_to_end(s)
        return buf

    def _flush_shard(self, s: int) -> None:
        """Write shard ``s``: data, then manifest, then flags. On error the buffer is kept for a retry."""
        buf = self._buffers[s]
        h = self.header
        r = h.shard_range(s)
        sl = slice(r.start, r.stop)
        mask = buf["_mask"]
        self._owners.check(s, "write its data")
        before = self._written[sl].copy()
        self._reread_flags(s)  # another writer's images (a lease taken over, an object store's race) are kept
        taken = self._written[sl] & ~before & mask & ~buf["_over"]
        if taken.any():
            i = r.start + int(np.flatnonzero(taken)[0])
            raise ConcurrentWriterError(
                f"{self._where}: image {i} ({self._key(i)!r}) of shard {s} was written by another writer while this "
                f"writer held the shard; refusing to replace its labels (two writers on one shard: give each "
                f"process disjoint shards)")
        keep = self._written[sl] & ~mask  # images stored earlier (resume, early flush) that this buffer lacks
        first, ipc, prefix = s * h.chunks_per_shard, h.images_per_chunk, h.tag_prefix
        old_tags = self._io(s, S.MANIFEST, "read", lambda: self._record_tags(s)) if keep.any() else None
        data = {}
        rest = np.flatnonzero(~mask)  # seeded crops: rows not put are tagged over their derived values too
        derived = self._derivation.rows(rest + r.start) if len(rest) else {}
        with zarr.config.set({"array.write_empty_chunks": True}):
            for p, name in enumerate(self._specs):
                v = buf[name]
                if name in self._derived:  # seeded crops: not stored, only tagged
                    if name in derived:
                        v = v.copy()
                        v[rest] = derived[name]
                    data[name] = v
                    continue
                if old_tags is not None:  # rows stored earlier are kept
                    v = v.copy()  # the buffer stays as put, for a retry
                    v[keep] = self._stored_rows(s, name, p, old_tags, keep)
                self._write(s, name, sl, v)  # one whole-shard write
                data[name] = v
                _fault_point("array", s)
        stored = [n for n in data if n not in self._derived]
        self._fsync(s, "data", stored)
        _fault_point("data", s)
        tags = np.zeros((h.chunks_per_shard, len(data)), np.uint32)  # chunks past N (last shard) stay 0
        for p, (name, v) in enumerate(data.items()):
            t = S.manifest_tags(name, first, v, ipc, prefix)
            tags[:len(t), p] = t
        row = _manifest_rows(h, range(s, s + 1), self._per_image, tags.reshape(1, -1))
        self._write(s, S.MANIFEST, slice(s, s + 1), row)
        self._fsync(s, S.MANIFEST, [S.MANIFEST])
        _fault_point("manifest", s)
        self._owners.check(s, "mark its images written")
        flags = self._written[sl] | mask
        self._write(s, S.WRITTEN, sl, flags.astype(np.uint8))
        self._fsync(s, S.WRITTEN, [S.WRITTEN])
        _fault_point("flags", s)
        self._written[sl] = flags
        del self._buffers[s]
        if flags.all():
            self._owners.release(s)  # complete: no writer needs it again

    def _stored_rows(self, s: int, name: str, p: int, old_tags: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Array ``name``'s stored shard ``s``, checked against its manifest in every chunk holding a ``keep``
        row: rewriting a shard never re-tags damaged or missing data as good."""
        h = self.header
        r = h.shard_range(s)
        old = self._io(s, name, "read", lambda: self._read(name, slice(r.start, r.stop)))
        ipc = h.images_per_chunk
        first, prefix = s * h.chunks_per_shard, h.tag_prefix
        # A writer killed mid-flush leaves either the new data with the old manifest (killed before the
        # manifest: the old version is the data with the rows not marked written reset to the fill value) or
        # new data and manifest (killed before the flags); both are consistent, anything else is damage.
        as_is = S.manifest_tags(name, first, old, ipc, prefix)
        reset = old.copy()
        reset[~self._written[r.start:r.stop]] = S.FILL_VALUE
        before = S.manifest_tags(name, first, reset, ipc, prefix)
        needed = np.flatnonzero(np.add.reduceat(keep, np.arange(0, len(keep), ipc)) > 0)
        ok = (as_is[needed] == old_tags[needed, p]) | (before[needed] == old_tags[needed, p])
        bad = needed[~ok]
        if len(bad):
            j = int(bad[0])
            raise CorruptStoreError(
                f"{self._where}: array {name!r} shard {s} ({self._chunk_key(name, s)}) "
                f"chunk {s * h.chunks_per_shard + j} "
                f"(images {r.start + j * ipc}..{min(r.stop, r.start + (j + 1) * ipc) - 1}, marked written) does not "
                f"match its manifest entry; refusing to rewrite the shard over damaged data (run fkdstore verify)"
            )
        return old[keep]

    def _reread_flags(self, s: int) -> None:
        """Re-read shard ``s``'s ``written`` chunk from storage into this writer's flags (a flag set by
        another writer is adopted; one this writer set stays)."""
        r = self.header.shard_range(s)
        fresh = self._io(s, S.WRITTEN, "read", lambda: self._read(S.WRITTEN, slice(r.start, r.stop))) == 1
        self._written[r.start:r.stop] |= fresh

    def _array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` (opened once: each open reads its metadata)."""
        arr = self._zarr_arrays.get(name)
        if arr is None:
            arr = self._zarr_arrays[name] = storage.zarr_array(self.group, name)
        return arr

    def _read(self, name: str, rows: slice) -> np.ndarray:
        """Rows ``rows`` of the Zarr array ``name`` as stored."""
        return np.asarray(self._array(name)[rows])

    def _key(self, i: int) -> str:
        return S.decode_keys(self._per_image[S.KEY][i:i + 1], start=i)[0]

    def _refuse_written(self, idx: np.ndarray) -> None:
        done = self._written[idx]
        if done.any():
            i = int(idx[np.argmax(done)])
            raise ValidationError(
                f"image {i} ({self._key(i)!r}) is already written in {self._where}; refusing to replace its labels "
                f"(pass overwrite=True to replace them)")

    def set_image_sizes(self, image_indices, image_sizes) -> None:
        """Set the recorded ``(height, width)`` of images not written yet (e.g. an image whose header could not
        be read when the store was created, recorded as 1 x 1, and readable now), so they can be written with
        their true size. Refused (:class:`ValidationError` naming the image) for an image already written or
        buffered; sizes are checked as :func:`write` checks them. Per shard, under this writer's ownership of
        it (the flags re-read first): the shard's ``image_size`` chunk is rewritten, then its manifest row
        with the new tags (the per-image tags and, for seeded crops of a shard holding written images, the
        tags of the derived crops, which depend on every image's size)."""
        self._check_open()
        idx = self._check_indices(image_indices)
        sizes = np.asarray(_to_numpy(image_sizes))
        if sizes.shape != (len(idx), 2):
            raise ValidationError(f"image_sizes must be an integer array of shape ({len(idx)}, 2). Got {sizes.shape}.")
        if not np.issubdtype(sizes.dtype, np.integer):
            raise TypeError(f"image_sizes must be an integer array of shape ({len(idx)}, 2). Got dtype {sizes.dtype}.")
        h, ips = self.header, self.header.images_per_shard
        limit = _INT32_MAX if h.kind != S.REGIONS or h.box_dtype == "int32" else np.iinfo(np.uint16).max
        bad = ((sizes < 1) | (sizes > limit)).any(1)
        if bad.any():
            i = int(idx[np.argmax(bad)])
            raise ValidationError(f"image_sizes must be in [1, {limit}] (this store's box dtype). Image {i} "
                                  f"({self._key(i)!r}) has size {sizes[np.argmax(bad)].tolist()}.")
        shards = sorted(set((idx // ips).tolist()))
        for s in shards:
            self._owners.claim(s)
            self._reread_flags(s)
        self._refuse_written(idx)
        for i in idx.tolist():
            buf = self._buffers.get(i // ips)
            if buf is not None and buf["_mask"][i - (i // ips) * ips]:
                raise ValidationError(f"image {i} ({self._key(i)!r}) is buffered (put, not yet written); set its "
                                      f"size before putting it")
        for s in shards:
            sel = (idx // ips) == s
            r = h.shard_range(s)
            self._sizes[idx[sel]] = sizes[sel].astype(np.int32)
            rows = self._sizes[r.start:r.stop].copy()
            self._write(s, S.IMAGE_SIZE, slice(r.start, r.stop), rows)
            self._fsync(s, S.IMAGE_SIZE, [S.IMAGE_SIZE])
            record = self._record_tags(s)
            if record.any() and self._derived:  # seeded crops: the derived chunks' tags follow the sizes
                derived = self._derivation.chunk_rows(r.start, r.stop)
                for name, tags in self._derivation.tags(s * h.chunks_per_shard, derived).items():
                    record[:len(tags), self._columns[name]] = tags
            row = _manifest_rows(h, range(s, s + 1), self._per_image, record.reshape(1, -1))
            self._write(s, S.MANIFEST, slice(s, s + 1), row)
            self._fsync(s, S.MANIFEST, [S.MANIFEST])
            if s not in self._buffers:
                self._owners.release(s)

    def _record_tags(self, s: int) -> np.ndarray:
        """The record tags of shard ``s`` as stored: ``(chunks_per_shard, P)``."""
        row = np.asarray(self._array(S.MANIFEST)[s], np.uint32)
        return row[len(self.header.bound_per_image):].reshape(self.header.chunks_per_shard, -1)

    def _chunk_key(self, name: str, s: int) -> str:
        arr = self._array(name)
        return f"{arr.path}/{arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))}"

    def _io(self, s: int, name: str, op: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, an I/O step on shard ``s`` of array ``name``: an OSError is raised again naming the store,
        the step, the shard and its chunk key."""
        try:
            return fn()
        except OSError as e:
            key = self._chunk_key(name, s) if name in self.group else name
            msg = f"{self._where}: cannot {op} shard {s} of array {name!r} ({key}): {e.strerror or e}"
            raise type(e)(e.errno, msg) if e.errno is not None else OSError(msg) from e

    def _write(self, s: int, name: str, rows: slice, value: np.ndarray) -> None:
        """Store ``value`` as rows ``rows`` of array ``name`` (in shard ``s``)."""
        self._io(s, name, "write", lambda: self._array(name).__setitem__(rows, value))

    def _fsync(self, s: int, what: str, names: Sequence[str]) -> None:
        """Make shard ``s``'s chunks of the arrays ``names`` durable (local stores; ``what`` names them in an
        error)."""
        self._io(s, what, "fsync", lambda: storage.fsync_local(self.store, [self._chunk_key(n, s) for n in names]))

    def flush(self) -> None:
        """Write every buffered (partially filled) shard now. A shard that fails stays buffered; the first
        error is raised after every shard was tried."""
        self._check_open()
        self._flush_all()

    def _flush_all(self) -> None:
        first_error = None
        for s in sorted(self._buffers):
            try:
                self._flush_shard(s)
            except Exception as e:  # noqa: BLE001 - kept, retried, re-raised below
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def update_meta(self, **items) -> None:
        """Merge ``items`` into the store's ``meta`` attribute (primary writer only)."""
        if not self.primary:
            return
        items = _normalised_json(items, "meta")
        header = self.header.with_meta({**self.header.meta, **items})
        self.group.attrs[S.ATTR_KEY] = header.to_json()
        self.header = header

    def close(self) -> None:
        """Flush buffered shards and release this writer's ownership records. Idempotent; if a flush fails
        the error is raised and the writer stays open, so ``close`` can be called again."""
        if self._closed:
            return
        self._flush_all()
        self._owners.release_all()
        self._closed = True

    def _check_open(self):
        if self._closed:
            raise FkdstoreError("writer is closed")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"fkdstore.Writer({self._where!r}, images={self.num_images}, written={int(self._written.sum())}, "
                f"buffered_shards={len(self._buffers)})")


def _column_values(col: Column, v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One aug column's values, checked against its declared dtype and cast to it."""
    if v.shape != shape:
        raise ValidationError(f"aug column {col.name!r} must have shape {shape}. Got {v.shape}.")
    dt = np.dtype(col.dtype)
    if v.dtype.kind not in "biuf":
        raise TypeError(f"aug column {col.name!r} must be numeric. Got dtype {v.dtype}.")
    if dt.kind == "f":
        out = v.astype(dt)
        if not np.isfinite(out).all():
            raise ValidationError(f"aug column {col.name!r} must be finite in {col.dtype}. Got a value out of range.")
        return out
    if v.dtype.kind == "f" and (not np.isfinite(v).all() or (v != np.round(v)).any()):
        raise ValidationError(f"aug column {col.name!r} ({col.dtype}) must hold integers. Got non-integral values.")
    lo, hi = (0, 1) if dt.kind == "b" else (np.iinfo(dt).min, np.iinfo(dt).max)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValidationError(
            f"aug column {col.name!r} ({col.dtype}) must be in [{lo}, {hi}]. Got values in [{v.min()}, {v.max()}]."
        )
    return v.astype(dt)
