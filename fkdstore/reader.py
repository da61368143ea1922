"""Read fkdstore stores (format 1.0, 2.0 and 3.0): :func:`open` returns a :class:`Reader`.

At open the reader parses the header (format 2.0 and 3.0: its checksum is verified) and checks, cheaply, that every
array exists with the Zarr metadata the header implies (shape, dtype, inner chunk and shard shape, the
``written`` and ``manifest`` chunking); a mismatch raises :class:`CorruptStoreError` naming the array. Every
chunk it returns data from is then checked by :mod:`fkdstore.shard` (present when its images are written,
crc32c, manifest tag), so damage raises instead of returning wrong labels. A seeded-crops store (3.0) has no
``box``/``flip`` arrays: the reader derives the slots it returns with :mod:`fkdstore.seeded`, after comparing
one derived chunk with the manifest (every chunk in :meth:`Reader.read_all`).

Per-crop arrays are read through :mod:`fkdstore.storage`'s byte-range layer: ``os.pread`` on cached file
descriptors for a local folder, concurrent coalesced range requests for object storage. Zarr's array API
(~0.5 ms of Python per call) is used only for the small per-image arrays and for pipelines other than the
one this library writes.
"""

from __future__ import annotations

import inspect
import json
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from . import codecs as _codecs
from . import schema as S
from . import storage as _storage
from .errors import CorruptStoreError, FormatError, IncompleteStoreError, ValidationError
from .seeded import SeededCrops
from .shard import ArrayMeta, Manifest, ShardedArray, fetch_many, finish_many, group_rows, load_many, \
    parse_array_meta, prefetch_manifests, raise_first, take_many, take_one

__all__ = ["open", "Reader", "CropRecords"]

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


def open(location, *, storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
         cache_bytes: int | None = None) -> Reader:  # noqa: A001 - as zarr.open
    """Open a store for reading: a local path, a URL (``s3://...``, with ``storage_options`` for fsspec), a
    :class:`zarr.Group` or a Zarr store. Raises :class:`FormatError` for something that is not a readable
    fkdstore store and :class:`CorruptStoreError` when its header or array metadata is damaged or edited.

    ``cache_dir``: a local folder caching the raw bytes read from a remote store (metadata, shard indexes,
    chunks), shared by processes and readers, bounded by ``cache_bytes`` (default 10 GiB) with LRU eviction;
    cached bytes get every check fetched ones get. See :class:`fkdstore.storage.CachedSource` for the key
    rule (object ETag from one listing per process). Ignored for a local store (already on local disk).
    A local path that does not exist raises FileNotFoundError saying so."""
    return Reader(location, storage_options=storage_options, cache_dir=cache_dir, cache_bytes=cache_bytes)


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
    """Read access to a store; see :func:`open`. Attributes: ``num_images``, ``crops_per_image``,
    ``num_classes``, ``codec``, ``meta``, ``header``, ``complete``, ``path``; methods :meth:`read`,
    :meth:`read_batch`, :meth:`read_all`, :meth:`soft_labels`, :meth:`decode`, :meth:`refresh`.
    Picklable (file handles and caches are rebuilt lazily in each process); a context manager."""

    def __init__(self, location, *, storage_options=None, cache_dir=None, cache_bytes=None, _problems=None):
        import zarr

        self._problems = _problems  # verify: collect metadata problems (and skip those arrays) instead of raising
        group = None
        if isinstance(location, zarr.Group):
            group, store = location, location.store
            prefix = f"{location.path}/" if location.path else ""
        else:
            if isinstance(location, (str, os.PathLike)) and "://" not in os.fspath(location) \
                    and not os.path.exists(location):
                raise FileNotFoundError(f"store {os.fspath(location)} does not exist")
            store, prefix = _storage.as_store(location, read_only=True, storage_options=storage_options), ""
        self._prefix, self._group = prefix, group
        self.path = _storage.describe(store) + (f"/{prefix.rstrip('/')}" if prefix else "")
        # The source owns the store: another process (DataLoader worker, fork or spawn) rebuilds it from the
        # URL and storage_options, never from the parent's connections.
        self._source = _storage.byte_source(store, prefix, location=None if group is not None else location,
                                            storage_options=storage_options, cache_dir=cache_dir,
                                            cache_bytes=cache_bytes)
        self.header = self._read_header()
        self.codec = _codec_of(self.header)
        _check_augment(self.header)
        self._build()

    # -- opening
    def _read_header(self) -> S.Header:
        raw = self._source.read("zarr.json")
        if raw is None:
            raise FormatError(f"{self.path}: not a Zarr v3 group (no zarr.json)")
        try:
            doc = json.loads(bytes(raw))
        except ValueError as e:
            raise FormatError(f"{self.path}: zarr.json is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("node_type") != "group":
            raise FormatError(f"{self.path}: not a Zarr v3 group (zarr.json node_type is "
                              f"{doc.get('node_type') if isinstance(doc, dict) else None!r})")
        attrs = doc.get("attributes") or {}
        if S.ATTR_KEY not in attrs:
            raise FormatError(
                f"{self.path}: not an fkdstore store (no {S.ATTR_KEY!r} attribute; a store whose creation was "
                f"interrupted also lacks it)")
        return S.Header.from_json(attrs[S.ATTR_KEY])

    def _build(self) -> None:
        """Read every array's zarr.json and check it against the header (issue 14.3: cheap, at open)."""
        h = self.header
        N, M = h.num_images, h.crops_per_image
        all_specs = h.per_crop_specs(self.codec)  # manifest order, derived arrays (seeded crops) included
        columns = {name: p for p, name in enumerate(all_specs)}
        specs = h.stored_specs(self.codec)
        self._specs = all_specs
        names = list(specs) + list(h.per_image_arrays) + ([S.MANIFEST] if h.major >= 2 else [])
        raws = [self._source.read(f"{n}/zarr.json") for n in names]
        metas: dict[str, ArrayMeta] = {}
        for n, raw in zip(names, raws):
            try:
                metas[n] = parse_array_meta(n, raw)
            except CorruptStoreError as e:
                self._problem(e)
        expect = {name: dict(shape=(N, M, *trail), dtype=dtype, shard=(h.images_per_shard, M, *trail),
                             inner=(h.images_per_chunk, M, *trail)) for name, (trail, dtype) in specs.items()}
        expect[h.key_array] = dict(shape=(N, h.key_length) if h.major >= 2 else (N,),
                                   dtype="uint8" if h.major >= 2 else None)
        expect[S.IMAGE_SIZE] = dict(shape=(N, 2), dtype="int32")
        expect[S.LABEL] = dict(shape=(N,), dtype="int32")
        expect[S.WRITTEN] = dict(shape=(N,), dtype="uint8", grid=(h.images_per_shard,))
        if h.major >= 2:
            expect[S.MANIFEST] = dict(shape=(h.num_chunks, len(all_specs)), dtype="uint32",
                                      grid=(h.chunks_per_shard, len(all_specs)))
        for name in list(metas):
            bad = mismatches(metas[name], **expect[name])
            if bad:
                self._problem(CorruptStoreError(bad[0]), more=bad[1:])
                del metas[name]
        for name in h.derived_arrays:  # seeded crops: a stored box/flip would be another writer's or a stale copy
            if self._source.read(f"{name}/zarr.json") is not None:
                self._problem(CorruptStoreError(
                    f"array {name!r} exists in {self.path}, but the store has seeded crops (format "
                    f"{h.format_version}): its {name} values are derived from the header's crop_sampler and "
                    f"must not be stored (the store was mixed with another one)"))
        manifest = None
        if S.MANIFEST in metas:
            manifest = Manifest(metas[S.MANIFEST], _Rows(self, S.MANIFEST), self._source.exists,
                                h.chunks_per_shard, h.num_chunks)
        self._manifest = manifest
        self._metas = metas
        self._arrays: dict[str, ShardedArray] = {
            name: ShardedArray(metas[name], self._source, num_images=N, dtype=dtype, manifest=manifest,
                               column=columns[name], zarr_array=_GroupArray(self, name))
            for name, (trail, dtype) in specs.items() if name in metas
        }
        self._columns = columns
        self._seeded = SeededCrops(h, _Sizes(self), self.path) if h.seeded else None
        self._written = None
        # CropRecords keys of the arrays, computed once (read(i) builds one CropRecords per image)
        n = len(S.SOFT_GROUP) + 1
        self._field_paths = [(p, p[n:]) for p in specs if p.startswith(S.SOFT_GROUP + "/")]
        self._aug_paths = [(a.name, S.aug_path(a.name)) for a in h.aug]
        self._v1_aug = h.major < 2 and bool(h.aug)  # 1.0 kept every aug column in one array

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
            import zarr

            # zarr_format=3: a store is Zarr v3; without it Zarr first probes .zgroup/.zattrs/.zmetadata (3 requests)
            self._group = zarr.open_group(store=store, path=self._prefix.rstrip("/") or None, mode="r", zarr_format=3)
        return self._group

    def _small(self, name: str, a: int | None = None, b: int | None = None) -> np.ndarray:
        """Rows ``[a, b)`` of an unsharded array through Zarr; damage becomes CorruptStoreError naming it."""
        try:
            return self.group[name][a:b]
        except Exception as e:  # zarr raises several types (checksum, decode, missing)
            raise CorruptStoreError(f"array {name!r} (rows {a or 0}..{b if b is not None else 'end'}) cannot be "
                                    f"read: {type(e).__name__}: {e}") from e

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_group"] = None  # reopened lazily; sources and arrays drop handles/caches themselves
        return d

    # -- metadata
    num_images = property(lambda self: self.header.num_images)
    crops_per_image = property(lambda self: self.header.crops_per_image)
    num_classes = property(lambda self: self.header.num_classes)
    meta = property(lambda self: self.header.meta)
    aug_names = property(lambda self: [a.name for a in self.header.aug])

    @property
    def image_keys(self) -> list[str]:
        """The N image keys (``key`` array of format 2.0 decoded as UTF-8; ``image_key`` of 1.0)."""
        if self.header.major >= 2:
            return S.decode_keys(self._small(S.KEY))
        return [str(k) for k in self._small(S.IMAGE_KEY)]

    def image_key(self, i: int) -> str:
        """Key of image ``i``."""
        i = _check_index(i)
        if self.header.major >= 2:
            return S.decode_keys(self._small(S.KEY, i, i + 1), start=i)[0]
        return str(self._small(S.IMAGE_KEY, i, i + 1)[0])

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int32 (height, width)."""
        return self._small(S.IMAGE_SIZE)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 ground-truth classes, -1 where unknown."""
        return self._small(S.LABEL)

    @property
    def written(self) -> np.ndarray:
        """(N,) bool completion flags (read once and cached; :meth:`refresh` re-reads them)."""
        if self._written is None:
            self._written = self._small(S.WRITTEN) != 0
        return self._written

    def refresh(self) -> None:
        """Re-read the header and the ``written`` flags, and drop every cache the new flags can invalidate
        (shard indexes, file handles, decoded chunks, manifest chunks): a long-lived reader sees images
        written since it opened. Raises :class:`CorruptStoreError` if the store's schema changed."""
        old = self.header
        new = self._read_header()
        if new.schema_key() != old.schema_key():
            raise CorruptStoreError(f"{self.path}: the store header changed since it was opened (another store "
                                    f"was written at this location); open it again")
        self.header = new
        self._source.clear()
        for a in self._arrays.values():
            a.clear()
        if self._manifest is not None:
            self._manifest.clear()
        self._group = None  # zarr caches nothing we rely on, but a fresh group is cheap
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

    def array(self, name: str):
        """The underlying Zarr array (for tools such as ``inspect``)."""
        return self.group[name]

    @property
    def per_crop_arrays(self) -> list[str]:
        """Paths of the per-crop arrays, in manifest order."""
        return list(self._arrays)

    def sharded(self, name: str) -> ShardedArray:
        """The checked chunk reader of per-crop array ``name`` (used by ``verify``)."""
        return self._arrays[name]

    # -- data
    def _check_written(self, idx: np.ndarray) -> None:
        N = self.num_images
        if len(idx) == 1:  # read(i): scalar checks
            i = int(idx[0])
            if 0 <= i < N and self.written[i]:
                return
        out = (idx < 0) | (idx >= N)
        if out.any():
            raise IndexError(f"image index must be in [0, {N}). Got {int(idx[out][0])}.")
        w = self.written[idx]
        if not w.all():
            i = int(idx[~w][0])
            raise IncompleteStoreError(
                f"image {i} ({self.image_key(i)!r}) has not been written; the store is incomplete "
                f"({int((~self.written).sum())} of {N} images missing)")

    def _slots(self, slots, B: int) -> np.ndarray | None:
        if slots is None:
            return None
        sl = _int_array(slots, "slots")
        if sl.ndim != 2 or sl.shape[0] != B:
            raise ValidationError(f"slots must have shape ({B}, m). Got {sl.shape}.")
        _check_slot_range(sl, self.crops_per_image)
        return sl

    def _derive(self, idx: np.ndarray, slots=None) -> tuple[np.ndarray, np.ndarray]:
        """Seeded crops: boxes and flips of images ``idx`` (slots as :meth:`SeededCrops.rows`). The first call
        of a reader compares the derived chunk of ``idx[0]`` with its manifest tags (spec: before any derived
        data is returned), so a sampler that cannot replay the store fails here, not silently."""
        if not self._seeded.checked and len(idx):
            c = int(idx[0]) // self.header.images_per_chunk
            self._check_derived(c, c + 1, self._seeded.chunk_rows(c * self.header.images_per_chunk,
                                                                  (c + 1) * self.header.images_per_chunk))
        return self._seeded.rows(idx, slots)

    def _check_derived(self, c0: int, c1: int, data: dict[str, np.ndarray]) -> None:
        """Compare the tags of the derived chunks ``[c0, c1)`` (``data`` from :meth:`SeededCrops.chunk_rows`)
        with the manifest; raises :class:`CorruptStoreError` with the first mismatch."""
        problems = self._derived_mismatches(c0, c1, data)
        if problems:
            raise CorruptStoreError(problems[0])
        self._seeded.checked = True

    def _derived_mismatches(self, c0: int, c1: int, data: dict[str, np.ndarray],
                            written: np.ndarray | None = None) -> list[str]:
        """:meth:`SeededCrops.check` of the derived chunks ``[c0, c1)`` against the manifest, in every chunk
        holding a written image (``written``: the flags to use, default the store's): one message per
        mismatching array. Raises :class:`CorruptStoreError` when the manifest itself cannot be read (used by
        ``verify`` too, with the flags it read itself)."""
        h, sc = self.header, self._seeded
        ipc, cps = h.images_per_chunk, h.chunks_per_shard
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
        seen = (self.written if written is None else written)[c0 * ipc:c1 * ipc]
        w[:len(seen)] = seen
        return sc.check(c0, data, np.concatenate(rows), self._columns, w.reshape(-1, ipc).any(1))

    def _records(self, data: dict[str, np.ndarray]) -> CropRecords:
        if self._v1_aug:
            block = data[S.AUG]
            aug = {a.name: block[..., j] for j, a in enumerate(self.header.aug)}
        else:
            aug = {name: data[p] for name, p in self._aug_paths}
        return CropRecords(data[S.BOX], data[S.FLIP], aug, {name: data[p] for p, name in self._field_paths})

    def read(self, i: int, slots=None) -> CropRecords:
        """Records of image ``i``: leading dim ``(M,)``, or ``(len(slots),)`` when slots are given."""
        i = _check_index(i)
        written = self._written if self._written is not None else self.written
        if not (0 <= i < self.header.num_images and written[i]):
            self._check_written(np.array([i], np.int64))  # raises the error that applies
        if slots is not None:
            slots = _int_array(slots, "slots").reshape(-1)
            _check_slot_range(slots, self.header.crops_per_image)
        c, w = divmod(i, self.header.images_per_chunk)
        arrays = self._arrays.values()
        chunks = take_one(list(arrays), c)
        # a copy (not a view of a cached chunk): callers may modify what they get
        data = {a.path: ch[w].copy() if slots is None else ch[w].take(slots, 0) for a, ch in zip(arrays, chunks)}
        if self._seeded is not None:
            box, flip = self._derive(np.array([i]), slots)
            data[S.BOX], data[S.FLIP] = box[0], flip[0]
        return self._records(data)

    def read_batch(self, indices, slots=None) -> CropRecords:
        """Records of images ``indices`` (B,): leading dims ``(B, M)``, or ``(B, m)`` for ``slots`` (B, m).

        One decode per inner chunk touched (recently used chunks are cached), the chunks of every array
        fetched in one batch of reads. Raises :class:`IncompleteStoreError` if an image is not written,
        :class:`CorruptStoreError` if its data is missing, misplaced or damaged."""
        idx = _int_array(indices, "indices").reshape(-1)
        self._check_written(idx)
        sl = self._slots(slots, len(idx))
        chunks, inv, within = group_rows(idx, self.header.images_per_chunk)
        arrays = list(self._arrays.values())
        stacks = take_many(arrays, chunks)
        if sl is None:
            data = {a.path: st[inv, within] for a, st in zip(arrays, stacks)}
        else:
            inv2, within2 = inv[:, None], within[:, None]
            data = {a.path: st[inv2, within2, sl] for a, st in zip(arrays, stacks)}
        if self._seeded is not None:
            data[S.BOX], data[S.FLIP] = self._derive(idx, sl)
        return self._records(data)

    def read_all(self, slots=None, *, progress: bool = False) -> CropRecords:
        """Every image's records, shard by shard (a few shards per batch of reads). ``slots`` (N, m) keeps
        only the slots an epoch uses, so memory is N*m records. Requires a complete store."""
        h = self.header
        if not self.complete:
            self._check_written(np.flatnonzero(~self.written)[:1])
        N, M = h.num_images, h.crops_per_image
        sl = self._slots(slots, N)
        m = M if sl is None else sl.shape[1]
        out = {name: np.empty((N, m, *trail), np.dtype(dtype)) for name, (trail, dtype) in self._specs.items()}
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

        def keep(shards, loaded):
            n0 = shards.start * h.images_per_shard
            n1 = min(N, shards.stop * h.images_per_shard)
            if self._seeded is not None:  # derived here, every chunk checked against its manifest tags
                c0 = shards.start * h.chunks_per_shard
                derived = self._seeded.chunk_rows(n0, n1)
                with lock:  # the manifest cache is shared with the fetching threads
                    self._check_derived(c0, min(h.num_chunks, shards.stop * h.chunks_per_shard), derived)
                for name, rows in derived.items():
                    rows = rows[: n1 - n0]
                    out[name][n0:n1] = rows if sl is None else rows[np.arange(n1 - n0)[:, None], sl[n0:n1]]
            for a, (data, errors) in zip(arrays, loaded):
                raise_first(errors)
                rows = data.reshape(-1, *a.chunk_shape[1:])[: n1 - n0]
                if sl is not None:
                    rows = rows[np.arange(n1 - n0)[:, None], sl[n0:n1]]
                out[a.path][n0:n1] = rows

        import threading

        lock = threading.Lock()  # the shard-index and manifest caches, shared with the fetching threads
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), desc="reading shards", unit=f"{step} shards")
        try:
            if not ahead:
                for shards in batches:
                    keep(shards, load_many(items(shards)))
                    if bar is not None:
                        bar.update()
            else:
                import collections
                import itertools
                from concurrent.futures import ThreadPoolExecutor

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
                            keep(shards, finish_many(plans))
                            if bar is not None:
                                bar.update()
                    finally:
                        for _, fut in pending:  # an error stops the read: fetches not started are dropped
                            fut.cancel()
        finally:
            if bar is not None:
                bar.close()
        return self._records(out)

    def decode(self, fields: Mapping[str, Any], temperature: float | None = None):
        """Decode codec fields (numpy or torch, any device) to distributions (..., C). ``temperature`` is
        passed to codecs that support it (a codec that does not raises TypeError if one is given)."""
        if temperature is None:
            return self.codec.decode(fields, self.num_classes)
        if "temperature" not in inspect.signature(self.codec.decode).parameters:
            raise TypeError(f"codec {self.codec.name!r} does not support temperature. Got temperature={temperature!r}.")
        return self.codec.decode(fields, self.num_classes, temperature=temperature)

    def soft_labels(self, i: int, slots=None) -> np.ndarray:
        """Decoded soft labels of image ``i``: (M, C) float32, or (len(slots), C)."""
        return self.decode(self.read(i, slots).fields)

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

    def __repr__(self) -> str:
        return (f"fkdstore.Reader({self.path!r}, images={self.num_images}, crops_per_image={self.crops_per_image}, "
                f"classes={self.num_classes}, codec={self.codec!r}, format={self.header.format_version})")


class _Sizes:
    """Picklable ``() -> reader.image_sizes`` (what seeded crops are derived from)."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def __call__(self) -> np.ndarray:
        return self.reader.image_sizes


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


def _codec_of(header: S.Header):
    cfg = dict(header.codec)
    name = cfg.get("name")
    known = set(_codecs.REGISTRY) | set(getattr(_codecs, "ALIASES", {}))
    if name not in known:
        raise FormatError(f"store uses label codec {name!r}, which this version of fkdstore does not know "
                          f"(known: {sorted(_codecs.REGISTRY)}); upgrade fkdstore")
    try:
        return _codecs.from_config(cfg)
    except (ValidationError, TypeError) as e:
        raise FormatError(f"store's codec config {cfg} is not valid for codec {name!r}: {e}") from None


def _check_augment(header: S.Header) -> None:
    """Refuse an augmentation pipeline this library cannot replay: a policy name the registry of
    :mod:`fkdstore.augment` does not know (named in the message), an invalid policy config, or declared
    ``aug`` columns that differ from the pipeline's (format 2.0). numpy-only: no torch import."""
    if not header.augment:
        return
    from . import augment as _augment
    from .augment.registry import registered_policies

    known = registered_policies()
    for cfg in header.augment:
        if cfg.get("name") not in known:
            raise FormatError(f"store uses augment policy {cfg.get('name')!r}, which this version of fkdstore "
                              f"does not know (known: {sorted(known)}); upgrade fkdstore")
    try:
        pipeline = _augment.Pipeline.from_config(list(header.augment))
    except (ValidationError, TypeError) as e:
        raise FormatError(f"store's augment pipeline {list(header.augment)} is not valid: {e}") from None
    if header.major >= 2:
        want = [c.to_json() for c in pipeline.columns()]
        have = [a.to_json() for a in header.aug]
        if want != have:
            raise FormatError(f"store's aug columns {have} do not match its augment pipeline's columns {want}")
