"""Read fkdstore stores: :func:`open` parses the header once and returns the reader of its record kind,
:class:`RegionReader` (FKD crop regions) or :class:`LabelMapReader` (ReLabel label maps), both
:class:`Reader` subclasses.

At open the reader parses the header (:func:`fkdstore.schema.parse_header`: checksum, caps, every codec,
policy, sampler and extension known) and checks, cheaply, that every array exists with the Zarr metadata
the header implies (shape, dtype, inner chunk and shard shape, the per-image, ``written`` and ``manifest``
chunking); a mismatch raises :class:`CorruptStoreError` naming the array. Every chunk it returns data from
is then checked by :mod:`fkdstore.shard` (present when its images are written, crc32c, manifest tag), and
the per-image arrays (keys, sizes, labels) against their manifest tags (4.0), so damage raises instead of
returning wrong data. A seeded-crops store has no ``box``/``flip`` arrays: the reader derives the slots it
returns with :mod:`fkdstore.derived`, after comparing one derived chunk with the manifest (every chunk in
:meth:`RegionReader.read_all`).

A store being written stays readable (spec invariant 9): a record chunk also matches its tag with the rows
of images this reader does not see marked written set to the fill value, and a mismatch makes the reader
forget what it cached of those shards (flags, manifest rows, per-image rows, shard indexes, decoded chunks,
open files) and read them once more before it raises.

Bounded by what a caller asks for (spec section 1.5): the ``written`` flags and the per-image rows are read
per shard, on first use (:attr:`Reader.written`, :attr:`Reader.image_sizes` and :attr:`Reader.labels` read
them whole), so a store claiming ``2**31`` images costs a read of image 0 one shard.

Record arrays are read through :mod:`fkdstore.bytesource`: ``os.pread`` on cached file
descriptors for a local folder, concurrent coalesced range requests for object storage; the per-image arrays
and the manifest through :class:`fkdstore.shard.UnshardedArray` (sizes bounded before decompressing). Zarr's
array API is used only for pipelines other than the one this library writes.
"""

from __future__ import annotations

import collections
import itertools
import json
import operator
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from . import bytesource as _bytesource
from . import labelmap as _labelmap
from . import progress as _progress
from . import schema as S
from . import storage as _storage
from .codecs import LabelCodec
from .derived import derivation
from .errors import CorruptStoreError, FormatError, IncompleteStoreError, ValidationError
from .labelmap import LabelMapSpec
from .shard import (
    ArrayMeta,
    Manifest,
    ShardedArray,
    UnshardedArray,
    fetch_many,
    finish_many,
    group_rows,
    load_many,
    parse_array_meta,
    prefetch_manifests,
    raise_first,
    take_many,
    take_one,
)

__all__ = ["open", "Reader", "RegionReader", "LabelMapReader", "CropRecords", "MapRecords"]

READ_ALL_BATCH_BYTES = 64 * 2**20  # decoded bytes of shards fetched together by read_all (overlaps latency)
READ_AHEAD = 2  # read_all on a remote store: batches being fetched while the oldest is decoded


@dataclass
class CropRecords:
    """Stored records for a set of images: leading dims ``(B, m)`` (or ``(m,)`` for one image).

    ``box`` (..., 4) integer (top, left, height, width); ``flip`` (...,) bool; ``aug`` maps each augmentation
    column name to its values (empty when the store has none); ``fields`` are the codec's stored label
    fields (:meth:`Reader.decode` turns them into distributions). ``boxes``/``flips`` are 0.1 aliases."""

    box: np.ndarray
    flip: np.ndarray
    aug: dict[str, np.ndarray] = field(default_factory=dict)
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def boxes(self) -> np.ndarray:
        return self.box

    @property
    def flips(self) -> np.ndarray:
        return self.flip

    def __len__(self) -> int:
        return len(self.box)

    def __getitem__(self, i) -> CropRecords:
        """Records of one image (or a slice of images) of a batch."""
        return CropRecords(self.box[i], self.flip[i], {k: v[i] for k, v in self.aug.items()},
                           {k: v[i] for k, v in self.fields.items()})


@dataclass
class MapRecords:
    """Stored label maps of a set of images: ``indices`` and ``scores`` of shape ``(B, K, S, S)`` (or
    ``(K, S, S)`` for one image): the top-K class ids and raw scores of every map cell."""

    indices: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> MapRecords:
        return MapRecords(self.indices[i], self.scores[i])


def open(location, *, storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
         cache_bytes: int | None = None,
         _problems: list[str] | None = None) -> RegionReader | LabelMapReader:  # noqa: A001 - as zarr.open
    """Open a store for reading: a local path, a URL (``s3://...``, with ``storage_options`` for fsspec), a
    :class:`zarr.Group` or a Zarr store. Returns the reader of the store's record kind:
    :class:`RegionReader` (crop regions, FKD) or :class:`LabelMapReader` (label maps, ReLabel).

    Raises :class:`FormatError` for something that is not a readable fkdstore store and
    :class:`CorruptStoreError` when its header or array metadata is damaged or edited.

    ``cache_dir``: a local folder caching the raw bytes read from a remote store (metadata, shard indexes,
    chunks), shared by processes and readers, bounded by ``cache_bytes`` (default 10 GiB) with LRU eviction;
    cached bytes get every check fetched ones get. See :class:`fkdstore.bytesource.CachedSource` for the key
    rule. Ignored for a local store (already on local disk). A local path that does not exist raises
    FileNotFoundError saying so."""
    where = _Where.of(location, storage_options, cache_dir, cache_bytes)
    header = _read_header(where.source, where.path)
    where.source.bind(f"{header.store_id}:{header.checksum}")  # a cache binds its entries to this store
    return KIND_READERS[header.kind](where, header, _problems)


@dataclass
class _Where:
    """Where a reader reads from: its byte source, Zarr group (if given one), prefix and printable path."""

    source: Any
    group: Any
    prefix: str
    path: str

    @classmethod
    def of(cls, location, storage_options, cache_dir, cache_bytes) -> _Where:
        group = None
        if isinstance(location, zarr.Group):
            group, store = location, location.store
            prefix = f"{location.path}/" if location.path else ""
        else:
            if isinstance(location, (str, os.PathLike)) and "://" not in os.fspath(location) \
                    and not os.path.exists(location):
                raise FileNotFoundError(f"store {os.fspath(location)} does not exist")
            store, prefix = _storage.as_store(location, read_only=True, storage_options=storage_options), ""
        path = _storage.describe(store) + (f"/{prefix.rstrip('/')}" if prefix else "")
        # The source owns the store: another process (DataLoader worker, fork or spawn) rebuilds it from the
        # URL and storage_options, never from the parent's connections.
        source = _bytesource.byte_source(store, prefix, location=None if group is not None else location,
                                      storage_options=storage_options, cache_dir=cache_dir, cache_bytes=cache_bytes)
        return cls(source, group, prefix, path)


def _read_header(source, path: str) -> S.Header:
    raw = source.read_bounded("zarr.json", _storage.MAX_METADATA_BYTES)
    if raw is None:
        raise FormatError(f"{path}: not a Zarr v3 group (no zarr.json)")
    try:
        doc = json.loads(bytes(raw))
    except (ValueError, RecursionError) as e:  # invalid UTF-8 or JSON, or nested deeper than Python parses
        raise FormatError(f"{path}: zarr.json is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise FormatError(f"{path}: not a Zarr v3 group (zarr.json node_type is "
                          f"{doc.get('node_type') if isinstance(doc, dict) else None!r})")
    attrs = doc.get("attributes") or {}
    if S.ATTR_KEY not in attrs:
        raise FormatError(
            f"{path}: not an fkdstore store (no {S.ATTR_KEY!r} attribute; a store whose creation was "
            f"interrupted also lacks it)")
    return S.parse_header(attrs[S.ATTR_KEY])


def _check_index(i) -> int:
    if isinstance(i, (bool, np.bool_)):
        raise TypeError(f"image index must be an integer, not a bool. Got {i!r}.")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"image index must be an integer. Got {type(i).__name__} {i!r}.") from None


def _int_array(x, what: str) -> np.ndarray:
    """``x`` as an int64 array; bool and float input are refused (TypeError), not cast."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0 and arr.dtype.kind == "f":  # np.asarray([]) is float64
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers (bool and float are not indices). Got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


def _check_slot_range(sl: np.ndarray, M: int) -> None:
    """ValidationError unless every slot of ``sl`` (int64) is in ``[0, M)``. Many slots: one reduction
    (negative slots read as unsigned are larger than any ``M``)."""
    if sl.size <= 16:  # read(i): a few slots; Python's min/max beat numpy's per-call cost
        vals = sl.ravel().tolist()
        if not vals or (min(vals) >= 0 and max(vals) < M):
            return
    elif sl.view(np.uint64).max() < M:
        return
    raise ValidationError(f"slots must be in [0, {M}). Got values in [{sl.min()}, {sl.max()}].")


class Reader:
    """Read access to a store, whatever its record kind; :func:`open` returns the kind's subclass.

    Attributes: ``header`` (:class:`fkdstore.schema.Header`), ``num_images``, ``num_classes``, ``meta``,
    ``path``, ``complete``; the per-image arrays (:attr:`image_keys`, :attr:`image_sizes`, :attr:`labels`,
    :attr:`written`), each checked against its manifest tags (4.0). Picklable (file handles and caches are
    rebuilt lazily in each process); a context manager."""

    def __init__(self, where: _Where, header: S.Header, _problems: list[str] | None = None):
        self._problems = _problems  # verify: collect metadata problems (and skip those arrays) instead of raising
        self._source, self._group, self._prefix, self.path = where.source, where.group, where.prefix, where.path
        self.header = header
        self._build()

    # -- opening
    def _expected(self) -> dict[str, dict[str, Any]]:
        """The Zarr metadata every array must have, from the header (invariant 3)."""
        h = self.header
        N, ips = h.num_images, h.images_per_shard
        out: dict[str, dict[str, Any]] = {
            name: dict(shape=(N, *row), dtype=dtype, shard=(ips, *row), inner=(h.images_per_chunk, *row))
            for name, (row, dtype) in h.stored_specs().items()}
        per = h.per_image_chunk
        out[S.KEY] = dict(shape=(N, h.key_length), dtype="uint8", grid=None if per is None else (per, h.key_length))
        out[S.IMAGE_SIZE] = dict(shape=(N, 2), dtype="int32", grid=None if per is None else (per, 2))
        out[S.LABEL] = dict(shape=(N,), dtype="int32", grid=None if per is None else (per,))
        out[S.WRITTEN] = dict(shape=(N,), dtype="uint8", grid=(ips,))
        out[S.MANIFEST] = dict(shape=h.manifest_shape, dtype="uint32", grid=h.manifest_chunk)
        return out

    def _build(self) -> None:
        """Read every array's zarr.json and check it against the header (cheap, at open)."""
        h = self.header
        expect = self._expected()
        names = list(expect)
        raws = self._source.read_bounded_many([f"{n}/zarr.json" for n in names], _storage.MAX_METADATA_BYTES)
        metas: dict[str, ArrayMeta] = {}
        for n, raw in zip(names, raws):
            try:
                metas[n] = parse_array_meta(n, raw)
            except CorruptStoreError as e:
                self._problem(e)
                continue
            bad = mismatches(metas[n], **expect[n])
            if not bad and not h.legacy and not (metas[n].fast if metas[n].inner is not None else metas[n].plain):
                # a 4.0 writer writes section 3's pipeline only; another one (zarr.json is not checksummed) would be
                # decoded by Zarr, whose decompression this reader cannot bound (spec 1.5)
                codecs = [c.get("name") if isinstance(c, dict) else c for c in metas[n].doc.get("codecs", [])]
                bad = [f"array {n!r}: the codec pipeline in {n}/zarr.json ({codecs}, or its inner or index codecs) is "
                       f"not the one spec section 3 gives a 4.0 store; refusing to decode it (its decoded sizes "
                       f"could not be bounded before decompressing)"]
            if bad:
                self._problem(CorruptStoreError(bad[0]), more=bad[1:])
                del metas[n]
        for name in h.derived_arrays:  # seeded crops: a stored box/flip would be another writer's or a stale copy
            if self._source.read(f"{name}/zarr.json") is not None:
                self._problem(CorruptStoreError(
                    f"array {name!r} exists in {self.path}, but the store has seeded crops: its {name} values are "
                    f"derived from the header's crop sampler and must not be stored (the store was mixed with "
                    f"another one)"))
        self._manifest = None
        if S.MANIFEST in metas:
            self._manifest = Manifest.of(h, metas[S.MANIFEST], _Rows(self, S.MANIFEST), self._source.exists)
        self._metas = metas
        # the unsharded arrays read by this library's own decoder (sizes bounded before decompressing)
        self._unsharded = {n: UnshardedArray(metas[n], self._source, expect[n]["dtype"], _UNSHARDED_FILL.get(n, 0))
                           for n in (*S.PER_IMAGE_ARRAYS, S.MANIFEST) if n in metas and metas[n].plain}
        columns = {name: p for p, name in enumerate(h.record_specs())}
        prefix = h.tag_prefix
        written_rows = _WrittenRows(self)
        self._arrays: dict[str, ShardedArray] = {
            name: ShardedArray(metas[name], self._source, num_images=h.num_images, dtype=dtype,
                               manifest=self._manifest, column=columns[name], zarr_array=_GroupArray(self, name),
                               tag_prefix=prefix, written=written_rows)
            for name, (_, dtype) in h.stored_specs().items() if name in metas
        }
        self._columns = columns
        self._ips = h.images_per_shard
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Forget every flag and per-image row read so far (open, :meth:`refresh`)."""
        self._written: np.ndarray | None = None  # the whole (N,) flags once a caller asked for them (views in _wflags)
        self._wflags: dict[int, np.ndarray] = {}  # shard -> its written flags (bool), read per shard on first use
        self._per_image: dict[str, np.ndarray] = {}  # verified whole per-image arrays (sizes, labels)
        self._pi_rows: dict[str, dict[int, np.ndarray]] = {}  # per-image array -> shard -> verified rows
        self._images_ok: set[int] = set()  # shards whose per-image chunks matched their tags

    def _problem(self, error: CorruptStoreError, more=()) -> None:
        if self._problems is None:
            raise error
        self._problems.append(str(error))
        self._problems.extend(more)

    @property
    def group(self):
        """The store's Zarr group (opened on first use; for tools and the Zarr fallback path)."""
        store = self._source.store  # this process's store (rebuilt after a fork)
        if self._group is None or self._group.store is not store:
            # zarr_format=3: a store is Zarr v3; without it Zarr first probes .zgroup/.zattrs/.zmetadata (3 requests)
            self._group = zarr.open_group(store=store, path=self._prefix.rstrip("/") or None, mode="r", zarr_format=3)
        return self._group

    def _small(self, name: str, a: int | None = None, b: int | None = None) -> np.ndarray:
        """Rows ``[a, b)`` of an unsharded array: this library's pipeline through :class:`UnshardedArray`
        (stored and decoded sizes bounded by the chunk shape), any other through Zarr; damage becomes
        CorruptStoreError naming it."""
        if name not in self._metas:
            raise CorruptStoreError(f"array {name!r} of {self.path} cannot be read (its metadata is damaged)")
        plain = self._unsharded.get(name)
        try:
            if plain is not None:
                return plain.rows(0 if a is None else a, plain.shape[0] if b is None else b)
            return self.group[name][a:b]
        except CorruptStoreError:
            raise
        except Exception as e:  # zarr raises several types (checksum, decode, missing)
            raise CorruptStoreError(f"array {name!r} (rows {a or 0}..{b if b is not None else 'end'}) cannot be "
                                    f"read: {type(e).__name__}: {e}") from e

    def _bound_rows(self, name: str, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows ``[a, b)`` of per-image array ``name``, each of its chunks (one per shard) compared with its
        manifest tag (4.0, invariant 9): a missing chunk (Zarr's fill values), a sibling store's chunk or a
        rolled-back one raises :class:`CorruptStoreError` instead of returning other data."""
        h = self.header
        b = h.num_images if b is None else b
        if name not in h.bound_per_image or b <= a:
            return self._small(name, a, b)
        ips = h.images_per_shard
        s0, s1 = a // ips, (b - 1) // ips
        rows = self._small(name, s0 * ips, min(h.num_images, (s1 + 1) * ips))
        self._check_tags(name, rows, range(s0, s1 + 1), s0)
        return rows[a - s0 * ips:b - s0 * ips]

    def _check_tags(self, name: str, rows: np.ndarray, shards, first: int) -> None:
        """Compare the chunks of per-image array ``name`` for ``shards`` (``rows`` starts at shard ``first``)
        with their manifest tags; :class:`CorruptStoreError` naming the array, chunk and images."""
        h = self.header
        ips = h.images_per_shard
        j = h.bound_per_image.index(name)
        if self._manifest is None:
            raise CorruptStoreError(f"{self.path}: the manifest cannot be read, so array {name!r} cannot be checked")
        if len(shards) > 1:
            self._manifest.prefetch(shards)
        fill, prefix = S.PER_IMAGE_FILL[name], h.tag_prefix
        for s in shards:
            part = rows[(s - first) * ips:(s - first + 1) * ips]
            try:
                want = int(self._manifest.image_tags(s)[j])
            except Exception as e:  # the manifest chunk itself cannot be read
                raise CorruptStoreError(f"{self.path}: manifest chunk of shard {s} cannot be read "
                                        f"({type(e).__name__}: {e}); array {name!r} cannot be checked") from e
            if S.manifest_tags(name, s, part, ips, prefix, fill)[0] != want:
                r = h.shard_range(s)
                raise CorruptStoreError(
                    f"{self.path}: array {name!r} chunk {s} (images {r.start}..{r.stop - 1}) does not match the "
                    f"manifest: missing, misplaced or stale data{self._manifest.missing_note(s)}")

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_group"] = None  # reopened lazily; sources and arrays drop handles/caches themselves
        return d

    # -- metadata
    @property
    def num_images(self) -> int:
        return self.header.num_images

    @property
    def num_classes(self) -> int:
        return self.header.num_classes

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.header.meta

    @property
    def kind(self) -> str:
        return self.header.kind

    # crop-region attributes: on a label-map store they raise FormatError naming the kind, so commands for
    # crop regions (convert, prune, show, ...) refuse a label-map store with one clear line
    @property
    def crops_per_image(self) -> int:
        return self.header.crops_per_image

    @property
    def codec(self) -> LabelCodec:
        return self.header.codec

    @property
    def image_keys(self) -> list[str]:
        """The N image keys (``key`` array decoded as UTF-8)."""
        return S.decode_keys(self._bound_rows(S.KEY))

    def image_key(self, i: int) -> str:
        """Key of image ``i``."""
        i = _check_index(i)
        if not 0 <= i < self.num_images:
            raise IndexError(f"image index must be in [0, {self.num_images}). Got {i}.")
        return S.decode_keys(self._bound_rows(S.KEY, i, i + 1), start=i)[0]

    def _cached(self, name: str) -> np.ndarray:
        """The whole per-image array ``name`` (image_size or label: 8 and 4 bytes per image), read once (one
        read of the whole array) with every chunk checked against its tag; read-only."""
        got = self._per_image.get(name)
        if got is None:
            got = self._small(name)
            ips, rows = self.header.images_per_shard, self._pi_rows.setdefault(name, {})
            todo = [s for s in range(self.header.num_shards) if s not in rows]
            if name in self.header.bound_per_image and todo:
                self._check_tags(name, got, todo, 0)
            got.flags.writeable = False
            self._per_image[name] = got
            for s in range(self.header.num_shards):  # the per-shard rows become views of the whole array
                rows[s] = got[s * ips:(s + 1) * ips]
        return got

    def _shard_rows(self, name: str, shards) -> dict[int, np.ndarray]:
        """``{shard: rows}`` of per-image array ``name`` (image_size or label) for ``shards``, each shard's chunk
        read once per reader and checked against its tag: reading an image costs its shard's rows, not the
        whole array (a store may claim 2**31 images)."""
        rows = self._pi_rows.setdefault(name, {})
        todo = [s for s in shards if s not in rows]
        if todo:
            ips, N = self.header.images_per_shard, self.num_images
            for a, b in _runs(todo):
                got = self._small(name, a * ips, min(N, b * ips))
                if name in self.header.bound_per_image:
                    self._check_tags(name, got, range(a, b), a)
                got.flags.writeable = False
                for s in range(a, b):
                    rows[s] = got[(s - a) * ips:(s - a + 1) * ips]
        return {s: rows[s] for s in shards}

    def _rows_of(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows of per-image array ``name`` for images ``idx`` (their shards' chunks checked)."""
        whole = self._per_image.get(name)
        if whole is not None:
            return whole[idx]
        idx = np.asarray(idx, np.int64).reshape(-1)
        ips = self.header.images_per_shard
        sh = idx // ips
        got = self._shard_rows(name, np.unique(sh).tolist())
        if not got:
            return self._small(name, 0, 0)
        if len(got) == 1:
            (s, rows), = got.items()
            return rows[idx - s * ips]
        first = next(iter(got.values()))
        out = np.empty((len(idx), *first.shape[1:]), first.dtype)
        for s, rows in got.items():
            sel = sh == s
            out[sel] = rows[idx[sel] - s * ips]
        return out

    def _check_images(self, shards) -> None:
        """Before records of ``shards`` are returned: their chunks of key, image_size and label match their
        tags (4.0; checked once per shard and reader). A damaged, missing, sibling or rolled-back per-image
        chunk fails every read of the images it covers, not only the reads that look at it; the other
        shards still read."""
        todo = [s for s in shards if s not in self._images_ok]
        if not todo or not self.header.bound_per_image:
            return
        ips = self.header.images_per_shard
        for a, b in _runs(todo):
            self._bound_rows(S.KEY, a * ips, min(self.num_images, b * ips))
        self._shard_rows(S.IMAGE_SIZE, todo)
        self._shard_rows(S.LABEL, todo)
        self._images_ok.update(todo)

    def _sizes_of(self, idx: np.ndarray) -> np.ndarray:
        """``image_size`` rows of images ``idx``, their shards' chunks checked."""
        return self._rows_of(S.IMAGE_SIZE, idx)

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int32 (height, width), read-only (read and checked once; :meth:`refresh` re-reads)."""
        return self._cached(S.IMAGE_SIZE)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 ground-truth classes, -1 where unknown, read-only (read and checked once)."""
        return self._cached(S.LABEL)

    def _flags(self, raw: np.ndarray, first: int) -> np.ndarray:
        bad = (raw != 0) & (raw != 1)
        if bad.any():
            raise CorruptStoreError(f"{self.path}: array 'written' holds values other than 0 and 1 at images "
                                    f"{(first + np.flatnonzero(bad)[:5]).tolist()}")
        return raw == 1

    def _written_shards(self, shards) -> None:
        """Read the ``written`` flags of the uncached ``shards`` (one read per run of consecutive shards)."""
        todo = [s for s in shards if s not in self._wflags]
        if not todo:
            return
        ips, N = self.header.images_per_shard, self.num_images
        for a, b in _runs(todo):
            flags = self._flags(self._small(S.WRITTEN, a * ips, min(N, b * ips)), a * ips)
            for s in range(a, b):
                self._wflags[s] = flags[(s - a) * ips:(s - a + 1) * ips]

    def _shard_written(self, s: int) -> np.ndarray:
        """The ``written`` flags of shard ``s`` (read once per reader, on first use)."""
        w = self._wflags.get(s)
        if w is None:
            self._written_shards((s,))
            w = self._wflags[s]
        return w

    def _is_written(self, idx: np.ndarray) -> np.ndarray:
        """Flags of images ``idx`` (in range), reading only the shards they are in."""
        if self._written is not None:
            return self._written[idx]
        ips = self.header.images_per_shard
        sh = idx // ips
        uniq = np.unique(sh).tolist()
        self._written_shards(uniq)
        if len(uniq) == 1:
            return self._wflags[uniq[0]][idx - uniq[0] * ips]
        out = np.empty(len(idx), bool)
        for s in uniq:
            sel = sh == s
            out[sel] = self._wflags[s][idx[sel] - s * ips]
        return out

    @property
    def written(self) -> np.ndarray:
        """(N,) bool completion flags (read once and cached; :meth:`refresh` re-reads them). Values other
        than 0 and 1 are damage (:class:`CorruptStoreError`). Reading images needs only the flags of their
        shards; this property reads them all."""
        if self._written is None:
            ips = self.header.images_per_shard
            if len(self._wflags) == self.header.num_shards:
                w = np.concatenate([self._wflags[s] for s in range(self.header.num_shards)])
            else:
                w = self._flags(self._small(S.WRITTEN), 0)
            w.flags.writeable = False
            self._written = w
            self._wflags = {s: w[s * ips:(s + 1) * ips] for s in range(self.header.num_shards)}
        return self._written

    def _forget(self, shards) -> None:
        """Drop everything cached about ``shards`` (flags, per-image rows, manifest rows, shard indexes,
        decoded chunks, open files) so the next read reads them again: the one re-read a reader makes before
        raising a mismatch (spec invariant 9: a writer may be replacing them)."""
        h = self.header
        ips = h.images_per_shard
        keys = []
        for s in shards:
            self._wflags.pop(s, None)
            self._images_ok.discard(s)
            for rows in self._pi_rows.values():
                rows.pop(s, None)
            if self._manifest is not None:
                self._manifest.forget(s)
            for a in self._arrays.values():
                a.forget(s)
                keys.append(a.shard_key(s))
            for arr in self._unsharded.values():
                keys.extend(arr.key(c) for c in range(s * ips // arr.grid[0], ((s + 1) * ips - 1) // arr.grid[0] + 1)
                            if c * arr.grid[0] < arr.shape[0])
        self._written = None
        self._per_image = {}
        if self._source.caching:
            self._source.invalidate(objects=keys)  # what the cache holds of them is fetched from the store again
            self._source.clear()  # a new listing: the objects rewritten since have new identities
        else:
            self._source.forget(keys)

    def refresh(self) -> None:
        """Re-read the header and the ``written`` flags, and drop every cache the new flags can invalidate
        (shard indexes, file handles, decoded chunks, manifest chunks): a long-lived reader sees images
        written since it opened. Raises :class:`CorruptStoreError` if the store's schema changed."""
        new = _read_header(self._source, self.path)
        if new.identity() != self.header.identity():
            raise CorruptStoreError(f"{self.path}: the store header changed since it was opened (another store "
                                    f"was written at this location); open it again")
        self.header = new
        self._source.clear()
        for a in self._arrays.values():
            a.clear()
        if self._manifest is not None:
            self._manifest.clear()
        self._group = None  # zarr caches nothing we rely on, but a fresh group is cheap
        self._reset_caches()

    def _forget_all(self) -> None:
        """:meth:`refresh` without re-reading the header (the re-read before ``read_all`` raises)."""
        self._source.clear()
        for a in self._arrays.values():
            a.clear()
        if self._manifest is not None:
            self._manifest.clear()
        self._reset_caches()

    @property
    def complete(self) -> bool:
        """True when every image is written."""
        return bool(self.written.all())

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``[start, stop)`` ranges of images not yet written."""
        w = np.concatenate([[True], self.written, [True]])
        edges = np.flatnonzero(np.diff(w.astype(np.int8)))
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]

    def array(self, name: str):
        """The underlying Zarr array (for tools such as ``inspect``)."""
        return self.group[name]

    @property
    def record_arrays(self) -> list[str]:
        """Paths of the stored record arrays, in manifest order."""
        return list(self._arrays)

    def sharded(self, name: str) -> ShardedArray:
        """The checked chunk reader of record array ``name`` (used by ``verify``)."""
        return self._arrays[name]

    # -- data
    def _check_written(self, idx: np.ndarray) -> None:
        N = self.num_images
        if len(idx) == 1:  # read(i): scalar checks
            i = int(idx[0])
            if 0 <= i < N:
                w = self._written
                if w is not None:
                    if w[i]:
                        return
                else:
                    s = i // self.header.images_per_shard
                    flags = self._wflags.get(s)
                    if flags is None:
                        flags = self._shard_written(s)
                    if flags[i - s * self.header.images_per_shard]:
                        return
        out = (idx < 0) | (idx >= N)
        if out.any():
            raise IndexError(f"image index must be in [0, {N}). Got {int(idx[out][0])}.")
        w = self._is_written(idx)
        if not w.all():
            i = int(idx[~w][0])
            if self._written is not None:
                note = f"{int((~self._written).sum())} of {N} images missing"
            else:
                s = i // self.header.images_per_shard
                flags = self._wflags[s]
                note = f"{int((~flags).sum())} of the {len(flags)} images of its shard {s} missing"
            raise IncompleteStoreError(
                f"image {i} ({self.image_key(i)!r}) has not been written; the store is incomplete ({note})")

    def _once_more(self, shards, read):
        """``read()``; when it raises :class:`CorruptStoreError`, forget what is cached about ``shards`` (flags,
        manifest rows, per-image rows, shard indexes, decoded chunks, open files) and call it once more
        (spec invariant 9: a writer may be replacing them; a store being written stays readable for every
        image marked written). The second error, if any, is raised."""
        try:
            return read()
        except CorruptStoreError:
            self._forget(shards)
        return read()

    def _rows(self, idx: np.ndarray, inner=None) -> dict[str, np.ndarray]:
        """Stored record rows of images ``idx`` (written, checked by the caller): ``{path: (B, *row)}``, or
        ``(B, m, ...)`` for ``inner`` (B, m) indices along each row's first axis (slots)."""
        if len(idx):
            self._check_images(np.unique(idx // self.header.images_per_shard).tolist())
        chunks, inv, within = group_rows(idx, self.header.images_per_chunk)
        arrays = list(self._arrays.values())
        stacks = take_many(arrays, chunks)
        if inner is None:
            return {a.path: st[inv, within] for a, st in zip(arrays, stacks)}
        inv2, within2 = inv[:, None], within[:, None]
        return {a.path: st[inv2, within2, inner] for a, st in zip(arrays, stacks)}

    def _one_row(self, i: int, inner=None) -> dict[str, np.ndarray]:
        """Stored record rows of image ``i`` (one chunk per array): copies, callers may modify them."""
        s = i // self.header.images_per_shard
        if s not in self._images_ok:
            self._check_images((s,))
        c, w = divmod(i, self.header.images_per_chunk)
        arrays = list(self._arrays.values())
        chunks = take_one(arrays, c)
        return {a.path: ch[w].copy() if inner is None else ch[w].take(inner, 0) for a, ch in zip(arrays, chunks)}

    def _all_rows_once_more(self, keep, progress) -> None:
        """:meth:`_all_rows`, once more after forgetting every cache when it raises :class:`CorruptStoreError`
        (the re-read of :meth:`_once_more`, for a whole-store read)."""
        try:
            return self._all_rows(keep, progress=progress)
        except CorruptStoreError:
            self._forget_all()
        if not self.complete:
            self._check_written(np.flatnonzero(~self.written)[:1])
        return self._all_rows(keep, progress=progress)

    def _all_rows(self, keep, *, progress: bool | None = False, desc: str = "reading shards") -> None:
        """Every shard's record rows, in batches of shards: ``keep(shards, [(data, errors) per array])``
        receives them (a remote store is read ahead; see :meth:`RegionReader.read_all`)."""
        h = self.header
        arrays = list(self._arrays.values())
        shard_bytes = sum(a.chunk_nbytes * a.per_shard for a in arrays)
        # A remote store is read ahead: READ_AHEAD batches are being fetched (their latency overlapping)
        # while this thread decodes the oldest; smaller batches keep that pipeline full. Its shard files are
        # fetched whole (one request per array and shard, index included: read_all needs every chunk).
        ahead = READ_AHEAD if self._source.remote and all(a.fast for a in arrays) else 0
        step = max(1, READ_ALL_BATCH_BYTES // (ahead + 1) // max(1, shard_bytes))
        batches = [range(s0, min(h.num_shards, s0 + step)) for s0 in range(0, h.num_shards, step)]

        def items(shards):
            return [(a, np.concatenate([a.shard_chunks(s) for s in shards]), None) for a in arrays]

        self._check_images(range(h.num_shards))
        lock = threading.Lock()  # the shard-index and manifest caches, shared with the fetching threads
        with _progress.progress(progress, total=len(batches), desc=desc, unit="batch") as bar:
            if not ahead:
                for shards in batches:
                    keep(shards, load_many(items(shards)), lock)
                    bar.update()
                return
            todo = iter(batches)

            def manifests():
                with lock:  # taken before any fetch needs a tag: every manifest chunk in one round
                    prefetch_manifests(arrays, range(h.num_shards))

            with ThreadPoolExecutor(max_workers=ahead + 1, thread_name_prefix="fkdstore-read-all") as pool:
                pool.submit(manifests)
                pending: collections.deque = collections.deque()
                try:
                    for shards in itertools.islice(todo, ahead):
                        pending.append((shards, pool.submit(fetch_many, items(shards), lock, True)))
                    while pending:
                        shards, fut = pending.popleft()
                        plans = fut.result()
                        nxt = next(todo, None)
                        if nxt is not None:
                            pending.append((nxt, pool.submit(fetch_many, items(nxt), lock, True)))
                        keep(shards, finish_many(plans), lock)
                        bar.update()
                finally:
                    for _, fut in pending:  # an error stops the read: fetches not started are dropped
                        fut.cancel()

    def close(self) -> None:
        """Close file handles and drop caches (the reader reopens them if used again)."""
        self._source.close()
        for a in self._arrays.values():
            a.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_images


class RegionReader(Reader):
    """Reader of a crop-regions store (FKD): per image ``M`` slots of crop box, flip, augmentation parameters
    and soft label. Adds ``crops_per_image``, ``codec``; methods :meth:`read`, :meth:`read_batch`,
    :meth:`read_all`, :meth:`soft_labels`, :meth:`decode`."""

    def _build(self) -> None:
        super()._build()
        h = self.header
        self._derived = derivation(h, _Sizes(self), self.path)  # seeded crops: box and flip derived
        self._specs = h.record_specs()  # manifest order, derived arrays (seeded crops) included
        # CropRecords keys of the arrays, computed once (read(i) builds one CropRecords per image)
        n = len(S.SOFT_GROUP) + 1
        self._field_paths = [(p, p[n:]) for p in self._specs if p.startswith(S.SOFT_GROUP + "/")]
        self._aug_paths = [(a.name, S.aug_path(a.name)) for a in h.aug]

    @property
    def aug_names(self) -> list[str]:
        return [a.name for a in self.header.aug]

    @property
    def per_crop_arrays(self) -> list[str]:
        """Paths of the stored per-crop arrays, in manifest order."""
        return self.record_arrays

    def _slots(self, slots, B: int) -> np.ndarray | None:
        if slots is None:
            return None
        sl = _int_array(slots, "slots")
        if sl.ndim != 2 or sl.shape[0] != B:
            raise ValidationError(f"slots must have shape ({B}, m). Got {sl.shape}.")
        _check_slot_range(sl, self.crops_per_image)
        return sl

    def _derive(self, idx: np.ndarray, slots=None) -> dict[str, np.ndarray]:
        """The derived arrays' rows of images ``idx`` (seeded crops: box and flip; slots as
        :meth:`fkdstore.derived.SeededCrops.rows`; nothing for stored crops). The first call of a reader
        compares the derived chunk of ``idx[0]`` with its manifest tags (spec: before any derived data is
        returned), so a sampler that cannot replay the store fails here, not silently."""
        if not self._derived.checked and len(idx):
            ipc = self.header.images_per_chunk
            c = int(idx[0]) // ipc
            self._check_derived(c, c + 1, self._derived.chunk_rows(c * ipc, (c + 1) * ipc))
        return self._derived.rows(idx, slots)

    def _check_derived(self, c0: int, c1: int, data: dict[str, np.ndarray]) -> None:
        """Compare the tags of the derived chunks ``[c0, c1)`` (``data`` from :meth:`SeededCrops.chunk_rows`)
        with the manifest; raises :class:`CorruptStoreError` with the first mismatch."""
        problems = self._derived_mismatches(c0, c1, data)
        if problems:
            raise CorruptStoreError(problems[0])
        self._derived.checked = True

    def _derived_mismatches(self, c0: int, c1: int, data: dict[str, np.ndarray],
                            written: np.ndarray | None = None) -> list[str]:
        """:meth:`SeededCrops.check` of the derived chunks ``[c0, c1)`` against the manifest, in every chunk
        holding a written image (``written``: the flags to use, default the store's): one message per
        mismatching array. Raises :class:`CorruptStoreError` when the manifest itself cannot be read (used by
        ``verify`` too, with the flags it read itself)."""
        h, sc = self.header, self._derived
        ipc, cps = h.images_per_chunk, h.chunks_per_shard
        if not data:  # nothing derived
            return []
        if self._manifest is None:
            raise CorruptStoreError(f"{self.path}: the manifest cannot be read, so the seeded crops cannot be checked")
        rows = []
        for s in range(c0 // cps, (c1 - 1) // cps + 1):
            a, b = max(c0, s * cps), min(c1, (s + 1) * cps)
            try:
                rows.append(self._manifest.shard(s)[a - s * cps:b - s * cps])
            except Exception as e:  # the manifest chunk itself cannot be read
                raise CorruptStoreError(f"{self.path}: manifest chunk of shard {s} cannot be read "
                                        f"({type(e).__name__}: {e}); the seeded crops cannot be checked") from e
        w = np.zeros((c1 - c0) * ipc, bool)
        if written is None:
            seen = self._is_written(np.arange(c0 * ipc, min(self.num_images, c1 * ipc)))
        else:
            seen = written[c0 * ipc:c1 * ipc]
        w[:len(seen)] = seen
        return sc.check(c0, data, np.concatenate(rows), self._columns, w.reshape(-1, ipc).any(1))

    def _records(self, data: dict[str, np.ndarray]) -> CropRecords:
        aug = {name: data[p] for name, p in self._aug_paths}
        return CropRecords(data[S.BOX], data[S.FLIP], aug, {name: data[p] for p, name in self._field_paths})

    def read(self, i: int, slots=None) -> CropRecords:
        """Records of image ``i``: leading dim ``(M,)``, or ``(len(slots),)`` when slots are given."""
        i = _check_index(i)
        w = self._written
        if w is not None:
            ok = 0 <= i < len(w) and w[i]
        else:  # flags read per shard: the common case costs two lookups
            s, r = divmod(i, self._ips)
            f = self._wflags.get(s)
            ok = f is not None and i >= 0 and r < len(f) and f[r]
        if not ok:
            self._check_written(np.array([i], np.int64))
        if slots is not None:
            slots = _int_array(slots, "slots").reshape(-1)
            _check_slot_range(slots, self.header.crops_per_image)
        try:
            return self._read_one(i, slots)
        except CorruptStoreError:
            self._forget((i // self.header.images_per_shard,))
        self._check_written(np.array([i], np.int64))
        return self._read_one(i, slots)

    def _read_one(self, i: int, slots) -> CropRecords:
        data = self._one_row(i, slots)
        data.update({name: v[0] for name, v in self._derive(np.array([i]), slots).items()})
        return self._records(data)

    def read_batch(self, indices, slots=None) -> CropRecords:
        """Records of images ``indices`` (B,): leading dims ``(B, M)``, or ``(B, m)`` for ``slots`` (B, m).

        One decode per inner chunk touched (recently used chunks are cached), the chunks of every array
        fetched in one batch of reads. Raises :class:`IncompleteStoreError` if an image is not written,
        :class:`CorruptStoreError` if its data is missing, misplaced or damaged."""
        idx = _int_array(indices, "indices").reshape(-1)
        self._check_written(idx)
        sl = self._slots(slots, len(idx))

        def read():
            self._check_written(idx)
            data = self._rows(idx, sl)
            data.update(self._derive(idx, sl))
            return self._records(data)

        return self._once_more(np.unique(idx // self.header.images_per_shard).tolist(), read)

    def read_all(self, slots=None, *, progress: bool | None = False) -> CropRecords:
        """Every image's records, shard by shard (a few shards per batch of reads). ``slots`` (N, m) keeps
        only the slots an epoch uses, so memory is N*m records. Requires a complete store."""
        h = self.header
        if not self.complete:
            self._check_written(np.flatnonzero(~self.written)[:1])
        N, M = h.num_images, h.crops_per_image
        sl = self._slots(slots, N)
        m = M if sl is None else sl.shape[1]
        out = {name: np.empty((N, m, *row[1:]), np.dtype(dtype)) for name, (row, dtype) in self._specs.items()}
        arrays = list(self._arrays.values())

        def keep(shards, loaded, lock):
            n0 = shards.start * h.images_per_shard
            n1 = min(N, shards.stop * h.images_per_shard)
            derived = self._derived.chunk_rows(n0, n1)  # every derived chunk checked against its manifest tags
            with lock:  # the manifest cache is shared with the fetching threads
                self._check_derived(shards.start * h.chunks_per_shard,
                                    min(h.num_chunks, shards.stop * h.chunks_per_shard), derived)
            for name, rows in derived.items():
                rows = rows[: n1 - n0]
                out[name][n0:n1] = rows if sl is None else rows[np.arange(n1 - n0)[:, None], sl[n0:n1]]
            for a, (data, errors) in zip(arrays, loaded):
                raise_first(errors)
                rows = data.reshape(-1, *a.chunk_shape[1:])[: n1 - n0]
                if sl is not None:
                    rows = rows[np.arange(n1 - n0)[:, None], sl[n0:n1]]
                out[a.path][n0:n1] = rows

        self._all_rows_once_more(keep, progress)
        return self._records(out)

    def decode(self, fields: Mapping[str, Any], temperature: float | None = None):
        """Decode codec fields (numpy or torch, any device) to distributions (..., C) at ``temperature``
        (default 1; every codec follows the one temperature rule of :mod:`fkdstore.codecs.base`)."""
        if temperature is None:
            return self.codec.decode(fields, self.num_classes)
        return self.codec.decode(fields, self.num_classes, temperature=temperature)

    def soft_labels(self, i: int, slots=None) -> np.ndarray:
        """Decoded soft labels of image ``i``: (M, C) float32, or (len(slots), C)."""
        return self.decode(self.read(i, slots).fields)

    def __enter__(self) -> RegionReader:
        return self

    def __repr__(self) -> str:
        return (f"fkdstore.RegionReader({self.path!r}, images={self.num_images}, "
                f"crops_per_image={self.crops_per_image}, classes={self.num_classes}, codec={self.codec!r}, "
                f"format={self.header.format_version})")


class LabelMapReader(Reader):
    """Reader of a label-map store (ReLabel, TokenLabeling): per image one ``K x S x S`` map of top-K class
    ids and raw scores. Adds ``spec`` (:class:`fkdstore.labelmap.LabelMapSpec`); methods :meth:`read`,
    :meth:`read_batch`, :meth:`read_all` and :meth:`pool` (soft labels of crops)."""

    @property
    def spec(self) -> LabelMapSpec:
        return self.header.label_map

    def _records(self, data: dict[str, np.ndarray]) -> MapRecords:
        return MapRecords(data[S.MAP_INDICES], data[S.MAP_SCORES])

    def read(self, i: int) -> MapRecords:
        """Maps of image ``i``: ``indices`` and ``scores`` of shape ``(K, S, S)``."""
        i = _check_index(i)
        idx = np.array([i], np.int64)
        self._check_written(idx)

        def read() -> MapRecords:
            self._check_written(idx)
            return self._records(self._one_row(i))

        return self._once_more([i // self.header.images_per_shard], read)

    def read_batch(self, indices) -> MapRecords:
        """Maps of images ``indices`` (B,): ``(B, K, S, S)`` each (errors as :meth:`RegionReader.read_batch`)."""
        idx = _int_array(indices, "indices").reshape(-1)
        self._check_written(idx)

        def read() -> MapRecords:
            self._check_written(idx)
            return self._records(self._rows(idx))

        return self._once_more(np.unique(idx // self.header.images_per_shard).tolist(), read)

    def read_all(self, *, progress: bool | None = False) -> MapRecords:
        """Every image's maps (a complete store), shard by shard."""
        h = self.header
        if not self.complete:
            self._check_written(np.flatnonzero(~self.written)[:1])
        N = h.num_images
        out = {name: np.empty((N, *row), np.dtype(dtype)) for name, (row, dtype) in h.record_specs().items()}
        arrays = list(self._arrays.values())

        def keep(shards, loaded, lock):
            n0, n1 = shards.start * h.images_per_shard, min(N, shards.stop * h.images_per_shard)
            for a, (data, errors) in zip(arrays, loaded):
                raise_first(errors)
                out[a.path][n0:n1] = data.reshape(-1, *a.chunk_shape[1:])[: n1 - n0]

        self._all_rows_once_more(keep, progress)
        return self._records(out)

    def pool(self, indices, boxes, flips=None, *, maps: MapRecords | None = None):
        """Soft labels of crops ``boxes`` (B, 4) (top, left, height, width, pixels of the original image) of
        images ``indices`` (B,), flipped where ``flips`` (B,) says: the store's replay equation
        (:func:`fkdstore.labelmap.pool_labels`): ``(B, C)`` float32, or ``(B, g, g, C)`` for a grid.
        ``maps``: the images' maps when already read (:meth:`read_batch`)."""
        idx = _int_array(indices, "indices").reshape(-1)
        maps = self.read_batch(idx) if maps is None else maps
        flips = np.zeros(len(idx), bool) if flips is None else flips
        return _labelmap.pool_labels(maps.indices, maps.scores, boxes, self.image_sizes[idx], flips, self.spec,
                                     self.num_classes)

    def __repr__(self) -> str:
        return (f"fkdstore.LabelMapReader({self.path!r}, images={self.num_images}, classes={self.num_classes}, "
                f"map={self.spec.map_shape}, format={self.header.format_version})")


def as_regions(reader: Reader) -> RegionReader:
    """``reader`` when its store holds crop regions, else the :class:`FormatError` naming the record kind
    (what every crop-region attribute of another reader raises)."""
    if not isinstance(reader, RegionReader):
        raise S.kind_error(reader.kind, S.REGIONS)
    return reader


KIND_READERS: dict[str, type[RegionReader] | type[LabelMapReader]] = {S.REGIONS: RegionReader,
                                                                     S.LABEL_MAP: LabelMapReader}


def _runs(values) -> list[tuple[int, int]]:
    """Sorted ints as half-open runs of consecutive values: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + 1)
        else:
            out.append((v, v + 1))
    return out


_UNSHARDED_FILL = {**S.PER_IMAGE_FILL, S.MANIFEST: 0}


class _WrittenRows:
    """Picklable ``c -> the reader's written flags of inner chunk c's rows`` (bool (ipc,), None when its shard's
    flags were not read yet): for :class:`fkdstore.shard.ShardedArray`'s rule for rows of unwritten images."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def __call__(self, c: int) -> np.ndarray | None:
        r = self.reader
        h = r.header
        cps, ipc = h.chunks_per_shard, h.images_per_chunk
        s = c // cps
        w = r._wflags.get(s)
        if w is None:
            return None
        rows = w[(c - s * cps) * ipc:(c - s * cps + 1) * ipc]
        if len(rows) < ipc:  # the last chunk: rows past N are taken as the fill value anyway
            rows = np.concatenate([rows, np.ones(ipc - len(rows), bool)])
        return rows


class _Sizes:
    """Picklable ``idx -> image sizes`` of a reader (what seeded crops are derived from; checked per shard)."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        return self.reader._sizes_of(idx)


class _GroupArray:
    """Picklable ``() -> reader.group[name]`` (the Zarr fallback of a sharded array)."""

    def __init__(self, reader: Reader, name: str):
        self.reader, self.name = reader, name

    def __call__(self):
        return self.reader.group[self.name]


class _Rows:
    """Picklable ``(a, b) -> rows [a, b) of an unsharded array`` (manifest chunks)."""

    def __init__(self, reader: Reader, name: str):
        self.reader, self.name = reader, name

    def __call__(self, a: int, b: int) -> np.ndarray:
        return self.reader._small(self.name, a, b)


def mismatches(meta: ArrayMeta, shape, dtype=None, *, shard=None, inner=None, grid=None) -> list[str]:
    """Differences between an array's Zarr metadata and what the header implies, one message each."""
    name, out = meta.path, []

    def bad(what, got, want):
        out.append(f"array {name!r}: {what} is {got} in {name}/zarr.json but the store header implies {want} "
                   f"(the array was re-chunked or edited, or the header was)")

    if tuple(meta.shape) != tuple(shape):
        bad("shape", tuple(meta.shape), tuple(shape))
    if dtype is not None and meta.data_type != dtype:
        bad("dtype", meta.data_type, dtype)
    if shard is not None:
        if meta.inner is None:
            bad("sharding", "absent", f"shards of {tuple(shard)}")
        else:
            if tuple(meta.grid) != tuple(shard):
                bad("shard shape", tuple(meta.grid), tuple(shard))
            if tuple(meta.inner) != tuple(inner):
                bad("inner chunk shape", tuple(meta.inner), tuple(inner))
    if grid is not None and tuple(meta.grid) != tuple(grid):
        bad("chunk shape", tuple(meta.grid), tuple(grid))
    return out
