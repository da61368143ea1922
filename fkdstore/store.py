"""Create, write and read fkdstore stores on Zarr v3.

``write(path, ...)`` creates a store (or re-opens one with an identical schema, to resume) and returns a
:class:`Writer`; ``open(path)`` returns a :class:`Reader`. The layout is defined in :mod:`fkdstore.schema`.

Writing: a writer buffers whole storage shards in memory and writes each shard once, when all its images
have been put (or on :meth:`Writer.flush` / :meth:`Writer.close`); the ``written`` flags of a shard are
written after its data, in a chunk of their own, so a crash never marks an image written whose labels are
missing, and processes writing disjoint shards never touch the same file.

Reading: Zarr's array API costs ~0.5-0.8 ms of Python per call. The reader therefore reads sharded arrays
directly when their codec pipeline is the one this library writes (cached shard index, ``os.pread`` of the
inner chunk, crc32c check, numcodecs blosc decode); the files stay standard Zarr v3, and any other
pipeline or store falls back to Zarr.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import crc32c as _crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from . import codecs as _codecs
from . import schema as S
from .errors import FkdstoreError, FormatError, IncompleteStoreError, SchemaMismatchError, ValidationError

__all__ = ["write", "open", "Writer", "Reader", "CropRecords", "CorruptChunkError", "array_names"]

_MISSING = 2**64 - 1  # shard-index offset/nbytes of an inner chunk that was never written


class CorruptChunkError(FkdstoreError):
    """A chunk's crc32c checksum does not match its bytes."""


def _library_version() -> str:
    from . import __version__

    return __version__


@dataclass
class CropRecords:
    """Stored records for a set of images: leading dims ``(B, m)`` (or ``(m,)`` for one image).

    ``fields`` are the codec's stored label fields; :meth:`Reader.decode` turns them into distributions.
    """

    boxes: np.ndarray  # (..., 4) int (top, left, height, width)
    flips: np.ndarray  # (...,) bool
    aug: np.ndarray | None  # (..., A) float32 or None
    fields: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.boxes)


def array_names(codec: _codecs.LabelCodec, num_classes: int, num_aug: int) -> list[str]:
    """Every per-crop array of a store, in a fixed order."""
    names = [S.BOX, S.FLIP] + ([S.AUG] if num_aug else [])
    return names + [S.soft_path(f) for f in codec.fields(num_classes)]


def _crop_specs(codec, num_classes: int, box_dtype: str, num_aug: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{array path: (trailing shape per crop, dtype)}`` of every per-crop array; validates k <= C."""
    specs = {S.BOX: ((4,), box_dtype), S.FLIP: ((), "bool")}
    if num_aug:
        specs[S.AUG] = ((num_aug,), S.V1_AUG_DTYPE)
    for name, spec in codec.fields(num_classes).items():
        specs[S.soft_path(name)] = (tuple(spec.shape), spec.dtype)
    return specs


def _per_crop_specs(header: S.Header, codec) -> dict[str, tuple[tuple[int, ...], str]]:
    return _crop_specs(codec, header.num_classes, header.box_dtype, len(header.aug))


def _compressors(dtype: str):
    return [BloscCodec(typesize=np.dtype(dtype).itemsize, **S.COMPRESSOR), Crc32cCodec()]


# --------------------------------------------------------------------------------------------- writing


def write(
    path: str | os.PathLike,
    *,
    num_images: int,
    crops_per_image: int,
    num_classes: int,
    codec: _codecs.LabelCodec | str | Mapping,
    image_keys: Sequence[str],
    image_sizes,
    labels=None,
    meta: Mapping[str, Any] | None = None,
    aug: Sequence | None = None,
    images_per_chunk: int | None = None,
    images_per_shard: int | None = None,
    primary: bool = True,
) -> Writer:
    """Create a label store at ``path`` (or re-open an existing one with the identical schema) for writing.

    Args:
        num_images, crops_per_image, num_classes: N, M and C.
        codec: a :class:`fkdstore.codecs.LabelCodec`, a codec name, or a codec config dict.
        image_keys: N unique strings (relative paths or ids) binding labels to images.
        image_sizes: (N, 2) integer (height, width) of each original image.
        labels: optional (N,) ground-truth classes, -1 where unknown.
        meta: JSON-serialisable provenance (sampler, teacher, ...). On re-open it must match, except the
            keys listed in :data:`fkdstore.schema.VOLATILE_META`.
        aug: names (or ``(name, kind)`` pairs) of extra per-crop augmentation parameters.
        images_per_chunk, images_per_shard: layout override; defaults from :func:`schema.default_layout`.
        primary: only the primary writer (rank 0) creates the store and writes attributes. Non-primary
            writers require the store to exist already.

    Returns a :class:`Writer`. Raises :class:`ValidationError` for bad input and
    :class:`SchemaMismatchError` if an existing store differs; nothing is written in either case.
    """
    codec = _as_codec(codec)
    header, keys, sizes, labels_arr = _make_header(
        num_images, crops_per_image, num_classes, codec, image_keys, image_sizes, labels, meta, aug,
        images_per_chunk, images_per_shard,
    )
    path = Path(path)
    if (path / "zarr.json").exists():
        group = zarr.open_group(str(path), mode="r+")
        _check_same_schema(group, header, keys, sizes, labels_arr)
    elif not primary:
        raise FormatError(f"{path}: no store to join; the primary writer must create it first")
    else:
        if path.exists() and any(path.iterdir()):
            raise ValidationError(f"{path} exists and is not an fkdstore store; refusing to overwrite it")
        group = _create(path, header, codec, keys, sizes, labels_arr)
    return Writer(group, header, codec, primary=primary)


def _as_codec(codec) -> _codecs.LabelCodec:
    if isinstance(codec, _codecs.LabelCodec):
        return codec
    if isinstance(codec, str):
        return _codecs.get_codec(codec)
    if isinstance(codec, Mapping):
        return _codecs.from_config(dict(codec))
    raise TypeError(f"codec must be a LabelCodec, a name or a config dict. Got {type(codec).__name__}.")


def _make_header(N, M, C, codec, image_keys, image_sizes, labels, meta, aug, ipc, ips):
    for name, v in (("num_images", N), ("crops_per_image", M), ("num_classes", C)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValidationError(f"{name} must be a positive integer. Got {v!r}.")
    N, M, C = int(N), int(M), int(C)
    keys = [str(k) for k in image_keys]
    if len(keys) != N:
        raise ValidationError(f"image_keys must have num_images={N} entries. Got {len(keys)}.")
    if len(set(keys)) != N:
        seen, dup = set(), None
        for k in keys:
            if k in seen:
                dup = k
                break
            seen.add(k)
        raise ValidationError(f"image_keys must be unique. {dup!r} appears more than once.")
    sizes = np.asarray(image_sizes)
    if sizes.shape != (N, 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise ValidationError(f"image_sizes must be an integer array of shape ({N}, 2). Got {sizes.dtype}{sizes.shape}.")
    if (sizes < 1).any():
        i = int(np.argwhere((sizes < 1).any(1))[0, 0])
        raise ValidationError(f"image_sizes must be >= 1. Image {i} ({keys[i]!r}) has size {sizes[i].tolist()}.")
    if labels is None:
        labels_arr = np.full(N, S.UNKNOWN_LABEL, dtype=np.int32)
    else:
        labels_arr = np.asarray(labels)
        if labels_arr.shape != (N,) or not np.issubdtype(labels_arr.dtype, np.integer):
            raise ValidationError(f"labels must be an integer array of shape ({N},). Got {labels_arr.dtype}{labels_arr.shape}.")
        bad = (labels_arr < S.UNKNOWN_LABEL) | (labels_arr >= C)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValidationError(f"labels must be in [-1, {C}). Image {i} has label {int(labels_arr[i])}.")
        labels_arr = labels_arr.astype(np.int32)
    aug_params = S.parse_aug(aug)
    bdtype = S.box_dtype(int(sizes.max()))
    specs = _crop_specs(codec, C, bdtype, len(aug_params))  # validates k <= C etc.
    row_bytes = max(M * int(np.prod(t, dtype=np.int64)) * np.dtype(d).itemsize for t, d in specs.values())
    d_ipc, d_ips = S.default_layout(N, row_bytes)
    ipc = int(ipc or min(d_ipc, ips or d_ipc))
    ips = int(ips or max(d_ips, ipc) // ipc * ipc)
    meta = dict(meta or {})
    _check_json(meta, "meta")
    header = S.Header(
        num_images=N, crops_per_image=M, num_classes=C, codec=codec.get_config(),
        images_per_chunk=ipc, images_per_shard=ips, box_dtype=bdtype,
        aug=aug_params, has_labels=bool((labels_arr >= 0).any()), meta=meta,
        library_version=_library_version(), format_version="1.0",  # until writer.py writes 2.0
    )
    return header, keys, sizes.astype(np.int32), labels_arr


def _check_json(obj, what):
    import json

    try:
        json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"{what} must be JSON-serialisable: {e}") from None


def _create(path: Path, header: S.Header, codec, keys, sizes, labels) -> zarr.Group:
    """Create every array, fill the per-image ones, and write the header attribute last."""
    group = zarr.open_group(str(path), mode="w")
    N, M = header.num_images, header.crops_per_image
    pc = min(N, S.PER_IMAGE_CHUNK)
    small = [ZstdCodec(level=3), Crc32cCodec()]
    a = group.create_array(S.IMAGE_KEY, shape=(N,), dtype=str, chunks=(pc,), compressors=small)
    a[:] = np.asarray(keys, dtype=object)
    group.create_array(S.IMAGE_SIZE, shape=(N, 2), dtype="int32", chunks=(pc, 2), compressors=small)[:] = sizes
    group.create_array(S.LABEL, shape=(N,), dtype="int32", chunks=(pc,), compressors=small, fill_value=S.UNKNOWN_LABEL)[:] = labels
    # One chunk of `written` per storage shard: disjoint shards never share a flag chunk.
    group.create_array(S.WRITTEN, shape=(N,), dtype="uint8", chunks=(header.images_per_shard,), compressors=small, fill_value=0)
    group.create_group(S.SOFT_GROUP)
    for name, (trail, dtype) in _per_crop_specs(header, codec).items():
        group.create_array(
            name, shape=(N, M, *trail), dtype=dtype,
            chunks=(header.images_per_chunk, M, *trail), shards=(header.images_per_shard, M, *trail),
            compressors=_compressors(dtype), fill_value=0, write_data=False,
        )
    group.attrs[S.ATTR_KEY] = header.to_json()  # last: a store without it is not a store
    return group


def _check_same_schema(group, header: S.Header, keys, sizes, labels):
    old = read_header(group)
    new_key, old_key = header.schema_key(), old.schema_key()
    for k in new_key:
        if new_key[k] != old_key.get(k):
            raise SchemaMismatchError(
                f"existing store has {k}={old_key.get(k)!r}, this run asks for {new_key[k]!r}; "
                f"use another path or the original parameters"
            )
    old_meta = {k: v for k, v in old.meta.items() if k not in S.VOLATILE_META}
    new_meta = {k: v for k, v in header.meta.items() if k not in S.VOLATILE_META}
    for k in sorted(set(old_meta) | set(new_meta)):
        if old_meta.get(k) != new_meta.get(k):
            raise SchemaMismatchError(
                f"existing store has meta[{k!r}]={old_meta.get(k)!r}, this run asks for {new_meta.get(k)!r}"
            )
    for name, new in ((S.IMAGE_KEY, np.asarray(keys, dtype=object)), (S.IMAGE_SIZE, sizes), (S.LABEL, labels)):
        old_arr = group[name][:]
        if not np.array_equal(old_arr, new):
            i = int(np.argwhere((old_arr != new).reshape(len(new), -1).any(1))[0, 0])
            raise SchemaMismatchError(f"existing store's {name}[{i}] is {old_arr[i]!r}, this run has {new[i]!r}")


def read_header(group) -> S.Header:
    try:
        attrs = group.attrs.asdict()
    except Exception as e:  # pragma: no cover - zarr raises several types
        raise FormatError(f"cannot read group attributes: {e}") from e
    if S.ATTR_KEY not in attrs:
        raise FormatError(
            f"not an fkdstore store (no {S.ATTR_KEY!r} attribute; a store whose creation was interrupted "
            f"also lacks it)"
        )
    return S.Header.from_json(attrs[S.ATTR_KEY])


class Writer:
    """Writes whole images into a store; see :func:`write`. Use as a context manager or call :meth:`close`."""

    def __init__(self, group: zarr.Group, header: S.Header, codec, *, primary: bool = True):
        self.group, self.header, self.codec, self.primary = group, header, codec, primary
        self._specs = _per_crop_specs(header, codec)
        self._sizes = group[S.IMAGE_SIZE][:]
        self._written = group[S.WRITTEN][:].astype(bool)
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._closed = False

    # -- properties
    @property
    def num_images(self) -> int:
        return self.header.num_images

    @property
    def written(self) -> np.ndarray:
        """(N,) bool: images whose labels are on disk (buffered images are not yet written)."""
        return self._written.copy()

    # -- input
    def put(self, image_indices, boxes, flips, probs, aug=None) -> None:
        """Encode ``probs`` (B, M, C) with the store's codec and write images ``image_indices`` (B,).

        ``boxes`` (B, M, 4) integer (top, left, height, width) inside each image; ``flips`` (B, M) bool;
        ``aug`` (B, M, A) when the store declares A augmentation parameters. Rows of ``probs`` must be
        finite, non-negative and sum to 1 within 1e-3 (see :func:`fkdstore.codecs.validate_probs`).
        Everything is validated before anything is buffered.
        """
        probs = _to_numpy(probs)
        idx = self._check_indices(image_indices)
        B, M, C = len(idx), self.header.crops_per_image, self.header.num_classes
        if probs.shape != (B, M, C):
            raise ValidationError(f"probs must have shape (B, M, C) = ({B}, {M}, {C}). Got {probs.shape}.")
        _codecs.validate_probs(probs, C)
        self._put(idx, boxes, flips, self.codec.encode(probs.astype(np.float32, copy=False)), aug)

    def put_fields(self, image_indices, boxes, flips, fields: Mapping[str, Any], aug=None) -> None:
        """Write already-encoded codec fields (used by convert and importers); validated like :meth:`put`."""
        idx = self._check_indices(image_indices)
        self._put(idx, boxes, flips, {k: _to_numpy(v) for k, v in fields.items()}, aug)

    def _check_indices(self, image_indices) -> np.ndarray:
        self._check_open()
        idx = np.asarray(_to_numpy(image_indices))
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValidationError(f"image_indices must be a 1-D integer array. Got {idx.dtype}{idx.shape}.")
        if ((idx < 0) | (idx >= self.num_images)).any():
            bad = int(idx[(idx < 0) | (idx >= self.num_images)][0])
            raise ValidationError(f"image index {bad} is out of range [0, {self.num_images}).")
        if len(np.unique(idx)) != len(idx):
            raise ValidationError("image_indices must not repeat an image within one put().")
        return idx.astype(np.int64)

    def _put(self, idx, boxes, flips, fields, aug):
        h = self.header
        B, M, C = len(idx), h.crops_per_image, h.num_classes
        boxes, flips = np.asarray(_to_numpy(boxes)), np.asarray(_to_numpy(flips))
        if boxes.shape != (B, M, 4) or not np.issubdtype(boxes.dtype, np.integer):
            raise ValidationError(f"boxes must be an integer array of shape ({B}, {M}, 4). Got {boxes.dtype}{boxes.shape}.")
        _check_boxes(boxes, self._sizes[idx], idx, self.group)
        if flips.shape != (B, M) or not (flips.dtype == bool or np.isin(flips, (0, 1)).all()):
            raise ValidationError(f"flips must be a bool array of shape ({B}, {M}). Got {flips.dtype}{flips.shape}.")
        data = {S.BOX: boxes, S.FLIP: flips.astype(bool)}
        if h.aug:
            if aug is None:
                raise ValidationError(f"this store declares aug parameters {[a.name for a in h.aug]}; pass aug=(B, M, {len(h.aug)}).")
            aug = np.asarray(_to_numpy(aug), dtype=np.float32)
            if aug.shape != (B, M, len(h.aug)) or not np.isfinite(aug).all():
                raise ValidationError(f"aug must be finite with shape ({B}, {M}, {len(h.aug)}). Got {aug.shape}.")
            data[S.AUG] = aug
        elif aug is not None:
            raise ValidationError("this store declares no aug parameters; pass aug=None.")
        expected = self.codec.fields(C)
        if set(fields) != set(expected):
            raise ValidationError(f"codec {self.codec.name!r} stores fields {list(expected)}. Got {sorted(fields)}.")
        for name, spec in expected.items():
            v = np.asarray(fields[name])
            if v.shape != (B, M, *spec.shape):
                raise ValidationError(f"field {name!r} must have shape {(B, M, *spec.shape)}. Got {v.shape}.")
            if np.issubdtype(np.dtype(spec.dtype), np.integer):
                if not np.issubdtype(v.dtype, np.integer) or (v < 0).any() or (v >= C).any():
                    raise ValidationError(f"field {name!r} must hold class indices in [0, {C}).")
            elif not np.isfinite(v).all() or (v < 0).any() or (v > 1.001).any():
                raise ValidationError(f"field {name!r} must hold probabilities in [0, 1].")
            data[S.soft_path(name)] = v
        # Validated: buffer per shard, write shards that are complete.
        shards = idx // h.images_per_shard
        for s in np.unique(shards):
            sel = shards == s
            buf = self._buffer(int(s))
            rows = idx[sel] - s * h.images_per_shard
            for name, v in data.items():
                buf[name][rows] = v[sel]
            buf["_mask"][rows] = True
            if buf["_mask"].all():
                self._flush_shard(int(s))

    def _buffer(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._buffers:
            n = len(self.header.shard_range(s))
            M = self.header.crops_per_image
            buf = {name: np.zeros((n, M, *trail), dtype=dtype) for name, (trail, dtype) in self._specs.items()}
            buf["_mask"] = np.zeros(n, dtype=bool)
            self._buffers[s] = buf
        return self._buffers[s]

    def _flush_shard(self, s: int) -> None:
        buf = self._buffers.pop(s)
        mask = buf.pop("_mask")
        r = self.header.shard_range(s)
        sl = slice(r.start, r.stop)
        keep = self._written[sl] & ~mask  # images written earlier (resume) that this buffer lacks
        # Every chunk is materialised (even all-zero ones), so a missing chunk always means damage.
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name, v in buf.items():
                arr = self.group[name]
                if keep.any():
                    old = arr[sl]
                    v[keep] = old[keep]
                arr[sl] = v  # one whole-shard write: no read-modify-write of a shard file
        flags = self._written[sl] | mask
        self.group[S.WRITTEN][sl] = flags.astype(np.uint8)  # after the data: a crash never over-claims
        self._written[sl] = flags

    def flush(self) -> None:
        """Write every buffered (partially filled) shard now."""
        for s in sorted(self._buffers):
            self._flush_shard(s)

    def update_meta(self, **items) -> None:
        """Merge ``items`` into the store's ``meta`` attribute (primary writer only)."""
        if not self.primary:
            return
        _check_json(items, "meta")
        attrs = self.group.attrs[S.ATTR_KEY]
        attrs["meta"] = {**attrs.get("meta", {}), **items}
        self.group.attrs[S.ATTR_KEY] = attrs
        self.header = S.Header.from_json(attrs)

    def close(self) -> None:
        """Flush buffered shards. Idempotent."""
        if not self._closed:
            self.flush()
            self._closed = True

    def _check_open(self):
        if self._closed:
            raise FkdstoreError("writer is closed")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_boxes(boxes, sizes, idx, group):
    top, left, hh, ww = (boxes[..., i].astype(np.int64) for i in range(4))
    H, W = sizes[:, 0:1].astype(np.int64), sizes[:, 1:2].astype(np.int64)
    bad = (top < 0) | (left < 0) | (hh < 1) | (ww < 1) | (top + hh > H) | (left + ww > W)
    if bad.any():
        b, m = (int(x) for x in np.argwhere(bad)[0])
        i = int(idx[b])
        key = group[S.IMAGE_KEY][i]
        raise ValidationError(
            f"box must have height, width >= 1 and lie inside the image. Image {i} ({key!r}, "
            f"size {sizes[b].tolist()}) slot {m} has box (top, left, height, width)={boxes[b, m].tolist()}."
        )


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor without importing torch here
        return x.detach().cpu().numpy()
    return x


# --------------------------------------------------------------------------------------------- reading


def open(path: str | os.PathLike | zarr.Group) -> Reader:  # noqa: A001 - mirrors zarr.open / safetensors
    """Open a store for reading. Raises :class:`FormatError` for a non-fkdstore group or a newer major version."""
    return Reader(path)


class _ShardedArray:
    """Direct reader for a sharded array written by this library; falls back to Zarr otherwise."""

    def __init__(self, arr: zarr.Array, root: str | None):
        self.name = arr.path
        self.shape = arr.shape
        self.dtype = np.dtype(str(arr.dtype))
        self.arr = arr
        self.root = root
        meta = arr.metadata.to_dict()
        self.fast = root is not None and self._supported(meta)
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])  # one file of the grid
        codec0 = meta["codecs"][0]
        self.chunk = tuple(codec0["configuration"]["chunk_shape"]) if codec0["name"] == "sharding_indexed" else self.shard
        self.per_shard = self.shard[0] // self.chunk[0]
        self._fd: dict[int, int] = {}
        self._index: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pid = os.getpid()

    @staticmethod
    def _supported(meta) -> bool:
        c = meta.get("codecs", [])
        if len(c) != 1 or c[0]["name"] != "sharding_indexed":
            return False
        cfg = c[0]["configuration"]
        names = [x["name"] for x in cfg["codecs"]]
        inner = names == ["bytes", "blosc", "crc32c"] and cfg["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
        index = [x["name"] for x in cfg["index_codecs"]] == ["bytes", "crc32c"]
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        only_first = all(g == s for g, s in zip(grid[1:], meta["shape"][1:])) and all(
            a == b for a, b in zip(cfg["chunk_shape"][1:], meta["shape"][1:])
        )
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        return inner and index and cfg.get("index_location", "end") == "end" and only_first and sep == "/" \
            and meta.get("chunk_key_encoding", {}).get("name") == "default"

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_fd"], d["_index"], d["_cache"] = {}, {}, OrderedDict()
        return d

    def _file(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent, reopen ours
            self._fd, self._pid = {}, os.getpid()
        fd = self._fd.get(s)
        if fd is None:
            key = "/".join(["c", str(s)] + ["0"] * (len(self.shape) - 1))
            try:
                fd = os.open(os.path.join(self.root, self.name, key), os.O_RDONLY)
            except FileNotFoundError:
                fd = -1  # shard never written: every chunk reads as the fill value
            self._fd[s] = fd
        return fd

    def _shard_index(self, s: int) -> np.ndarray:
        idx = self._index.get(s)
        if idx is None:
            fd = self._file(s)
            if fd < 0:
                idx = self._index[s] = np.full((self.per_shard, 2), _MISSING, dtype="<u8")
                return idx
            n = self.per_shard * 16 + 4
            size = os.fstat(fd).st_size
            raw = os.pread(fd, n, size - n)
            if _crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise CorruptChunkError(f"array {self.name!r} shard {s}: shard index fails its crc32c checksum")
            idx = self._index[s] = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
        return idx

    def _decode(self, raw: bytes, c: int) -> np.ndarray:
        body, crc = raw[:-4], raw[-4:]
        if _crc32c.crc32c(body) != int.from_bytes(crc, "little"):
            raise CorruptChunkError(f"array {self.name!r} chunk {c}: crc32c checksum mismatch (data corrupted)")
        try:
            buf = numcodecs.blosc.decompress(body)
        except Exception as e:
            raise CorruptChunkError(f"array {self.name!r} chunk {c}: cannot decompress ({e})") from e
        return np.frombuffer(buf, self.dtype.newbyteorder("<")).reshape(self.chunk)

    def chunk_data(self, c: int) -> np.ndarray:
        """Decoded inner chunk ``c`` (images ``c*ipc ... (c+1)*ipc``), cached (LRU of 32)."""
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        s, j = divmod(c, self.per_shard)
        off, nb = (int(x) for x in self._shard_index(s)[j])
        if off == _MISSING:
            data = np.zeros(self.chunk, self.dtype)
        else:
            data = self._decode(os.pread(self._file(s), nb, off), c)
        self._cache[c] = data
        if len(self._cache) > 32:
            self._cache.popitem(last=False)
        return data

    def shard_data(self, s: int) -> np.ndarray:
        """Every image of shard ``s`` in one read (used by :meth:`Reader.read_all`)."""
        n0 = s * self.shard[0]
        n1 = min(self.shape[0], n0 + self.shard[0])
        if not self.fast:
            return self.arr[n0:n1]
        fd = self._file(s)
        index = self._shard_index(s)
        out = np.empty((self.per_shard * self.chunk[0], *self.chunk[1:]), self.dtype)
        present = index[:, 0] != _MISSING
        lo = int(index[present, 0].min()) if present.any() else 0
        hi = int((index[present, 0] + index[present, 1]).max()) if present.any() else 0
        blob = os.pread(fd, hi - lo, lo) if present.any() else b""
        ipc = self.chunk[0]
        for j in range(self.per_shard):
            off, nb = (int(x) for x in index[j])
            dst = out[j * ipc:(j + 1) * ipc]
            if off == _MISSING:
                dst[...] = 0
            else:
                dst[...] = self._decode(blob[off - lo:off - lo + nb], s * self.per_shard + j)
        return out[: n1 - n0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (images) ``rows`` in the given order, grouped by inner chunk: one decode per chunk."""
        if not self.fast:
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
            if len(rows):
                order = np.argsort(rows, kind="stable")  # Zarr reads sorted selections
                out[order] = self.arr.oindex[rows[order]]
            return out
        return self.take_grouped(*_group_rows(rows, self.chunk[0]))

    def take_grouped(self, chunks: np.ndarray, inv: np.ndarray, within: np.ndarray) -> np.ndarray:
        """Rows given as (unique chunk ids, index into them per row, row within its chunk)."""
        if len(chunks) == 1:
            return self.chunk_data(int(chunks[0]))[within]
        stacked = np.stack([self.chunk_data(int(c)) for c in chunks])
        return stacked[inv, within]

    def close(self):
        for fd in self._fd.values():
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd, self._index, self._cache = {}, {}, OrderedDict()


def _group_rows(rows: np.ndarray, ipc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group image rows by inner chunk: (unique chunk ids, position of each row's chunk, row in chunk)."""
    c = rows // ipc
    if len(rows) == 1:
        return c, np.zeros(1, np.intp), rows % ipc
    chunks, inv = np.unique(c, return_inverse=True)
    return chunks, inv, rows % ipc


class Reader:
    """Read access to a store. Attributes: ``num_images``, ``crops_per_image``, ``num_classes``, ``codec``,
    ``meta``, ``header``, ``complete``; methods :meth:`read`, :meth:`read_batch`, :meth:`read_all`,
    :meth:`soft_labels`, :meth:`decode`. Picklable (file handles reopen lazily in each process)."""

    def __init__(self, path):
        if isinstance(path, zarr.Group):
            group = path
        else:
            p = Path(path)
            if not (p / "zarr.json").exists():
                raise FormatError(f"{p}: not a Zarr v3 group (no zarr.json)")
            try:
                group = zarr.open_group(str(p), mode="r")
            except Exception as e:
                raise FormatError(f"{p}: cannot open as a Zarr v3 group: {e}") from e
        self.group = group
        self.path = str(getattr(group.store, "root", "") or path)
        self.header = read_header(group)
        self.codec = _codecs.from_config(dict(self.header.codec))
        root = str(group.store.root) if hasattr(group.store, "root") else None
        self._arrays = {
            name: _ShardedArray(group[name], root)
            for name in array_names(self.codec, self.header.num_classes, len(self.header.aug))
        }
        self._written = None

    # -- metadata
    num_images = property(lambda self: self.header.num_images)
    crops_per_image = property(lambda self: self.header.crops_per_image)
    num_classes = property(lambda self: self.header.num_classes)
    meta = property(lambda self: self.header.meta)
    aug_names = property(lambda self: [a.name for a in self.header.aug])

    @property
    def image_keys(self) -> list[str]:
        return [str(k) for k in self.group[S.IMAGE_KEY][:]]

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int32 (height, width)."""
        return self.group[S.IMAGE_SIZE][:]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 ground-truth classes, -1 where unknown."""
        return self.group[S.LABEL][:]

    @property
    def written(self) -> np.ndarray:
        """(N,) bool completion flags (read once and cached; call :meth:`refresh` to re-read)."""
        if self._written is None:
            self._written = self.group[S.WRITTEN][:].astype(bool)
        return self._written

    def refresh(self) -> None:
        self._written = None

    @property
    def complete(self) -> bool:
        """True when every image is written."""
        return bool(self.written.all())

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``[start, stop)`` ranges of images not yet written."""
        w = np.concatenate([[True], self.written, [True]])
        edges = np.flatnonzero(np.diff(w.astype(np.int8)))
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]

    def array(self, name: str) -> zarr.Array:
        """The underlying Zarr array (for tools such as ``inspect`` and ``verify``)."""
        return self.group[name]

    @property
    def per_crop_arrays(self) -> list[str]:
        return list(self._arrays)

    # -- data
    def _check_written(self, idx: np.ndarray) -> None:
        if ((idx < 0) | (idx >= self.num_images)).any():
            bad = int(idx[(idx < 0) | (idx >= self.num_images)][0])
            raise IndexError(f"image index {bad} is out of range [0, {self.num_images})")
        w = self.written[idx]
        if not w.all():
            i = int(idx[~w][0])
            raise IncompleteStoreError(
                f"image {i} ({self.group[S.IMAGE_KEY][i]!r}) has not been written; the store is incomplete "
                f"({int((~self.written).sum())} of {self.num_images} images missing)"
            )

    def _records(self, data: dict[str, np.ndarray]) -> CropRecords:
        return CropRecords(
            boxes=data[S.BOX], flips=data[S.FLIP], aug=data.get(S.AUG),
            fields={n[len(S.SOFT_GROUP) + 1:]: v for n, v in data.items() if n.startswith(S.SOFT_GROUP + "/")},
        )

    def read(self, i: int, slots=None) -> CropRecords:
        """Records of image ``i``: leading dim ``(M,)``, or ``(len(slots),)`` when slots are given."""
        r = self.read_batch(np.asarray([i]), None if slots is None else np.asarray(slots)[None])
        return CropRecords(r.boxes[0], r.flips[0], None if r.aug is None else r.aug[0], {k: v[0] for k, v in r.fields.items()})

    def read_batch(self, indices, slots=None) -> CropRecords:
        """Records of images ``indices`` (B,): leading dims ``(B, M)``, or ``(B, m)`` for ``slots`` (B, m).

        One decode per inner chunk touched, whatever B; raises :class:`IncompleteStoreError` if any image
        is not written.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check_written(idx)
        if all(a.fast for a in self._arrays.values()):  # group once: every per-crop array shares the chunking
            groups = _group_rows(idx, self.header.images_per_chunk)
            data = {name: a.take_grouped(*groups) for name, a in self._arrays.items()}
        else:
            data = {name: a.take(idx) for name, a in self._arrays.items()}
        if slots is not None:
            data = _select_slots(data, np.asarray(slots), self.crops_per_image)
        return self._records(data)

    def read_all(self, slots=None, *, progress: bool = False) -> CropRecords:
        """Every image's records, shard by shard (one read per shard file). ``slots`` (N, m) keeps only
        the slots an epoch uses, so memory is N*m records. Requires a complete store."""
        if not self.complete:
            self._check_written(np.flatnonzero(~self.written)[:1])
        slots = None if slots is None else np.asarray(slots)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self._arrays}
        shards = range(self.header.num_shards)
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(shards, desc="reading shards", unit="shard")
        for s in shards:
            r = self.header.shard_range(s)
            block = {n: a.shard_data(s) for n, a in self._arrays.items()}
            if slots is not None:
                block = _select_slots(block, slots[r.start:r.stop], self.crops_per_image)
            for n, v in block.items():
                parts[n].append(v)
        return self._records({n: np.concatenate(v) for n, v in parts.items()})

    def decode(self, fields: Mapping[str, Any]):
        """Decode codec fields (numpy or torch, any device) to distributions (..., C)."""
        return self.codec.decode(fields, self.num_classes)

    def soft_labels(self, i: int, slots=None) -> np.ndarray:
        """Decoded soft labels of image ``i``: (M, C) float32, or (len(slots), C)."""
        return self.decode(self.read(i, slots).fields)

    def close(self) -> None:
        for a in self._arrays.values():
            a.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"fkdstore.Reader({self.path!r}, images={self.num_images}, crops_per_image={self.crops_per_image}, "
            f"classes={self.num_classes}, codec={self.codec!r}, complete={self.complete})"
        )


def _select_slots(data: dict[str, np.ndarray], slots: np.ndarray, M: int) -> dict[str, np.ndarray]:
    B = next(iter(data.values())).shape[0]
    if slots.ndim != 2 or slots.shape[0] != B:
        raise ValidationError(f"slots must have shape ({B}, m). Got {slots.shape}.")
    if ((slots < 0) | (slots >= M)).any():
        raise ValidationError(f"slots must be in [0, {M}).")
    rows = np.arange(B)[:, None]
    return {n: v[rows, slots] for n, v in data.items()}


def storage_stats(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Bytes and files on disk per array of a local store (metadata files under ``"."``), plus ``"_total"``."""
    root = Path(path)
    out: dict[str, dict[str, int]] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            name = ("/" + rel).split("/c/")[0].lstrip("/") if "/c/" in "/" + rel else "."
            d = out.setdefault(name, {"bytes": 0, "files": 0})
            d["bytes"] += os.path.getsize(os.path.join(dirpath, f))
            d["files"] += 1
    out["_total"] = {k: sum(d[k] for d in out.values()) for k in ("bytes", "files")}
    return out
