"""Sharded per-crop arrays, read chunk by chunk with every check the spec asks of a reader. Shared by
:class:`fkdstore.reader.Reader` and :func:`fkdstore.verification.verify` (one decoder, one set of rules).

For each inner chunk a caller asks for, :meth:`ShardedArray.load`:

1. finds its shard file (key from the array's own ``chunk_key_encoding``: ``c/3/0/0``, ``c.3.0.0``, ...) and
   its entry in the shard index (fetched once per shard, crc32c-checked, cached in a bounded LRU);
2. treats a missing shard file or a missing index entry as damage when the chunk holds a written image
   (:class:`CorruptStoreError` naming array, shard file and images; never fill values);
3. fetches the chunk bytes (all chunks of one call in one batch of byte-range requests through
   :mod:`fkdstore.bytesource`: ``os.pread`` locally, concurrent coalesced requests remotely), checks crc32c
   (:class:`CorruptChunkError`) and blosc-decodes (small chunks to bytes joined with one copy, big ones in
   place into a preallocated array);
4. format 2.0: compares :func:`fkdstore.schema.manifest_tag` of the decoded chunk (computed once on the
   decoded bytes) with the store's ``manifest`` (a mismatch is a misplaced or stale chunk:
   :class:`CorruptStoreError`).

Through a local disk cache (:class:`fkdstore.bytesource.CachedSource`) the same checks apply to cached bytes;
an index or chunk that fails them is forgotten by the cache and fetched from the store once more, and only
a failure of the store's own bytes is raised.

Steps 1-4 for fetched chunks live in :meth:`ShardedArray._check_chunks`, used by the batch path
(:func:`load_many`) and by ``Reader.read``'s one-chunk path (:func:`take_one`). Hot-path costs: the chunk
location is vectorised per shard, each fetched chunk costs one Python iteration (about 3 C calls of crc32c
and one blosc call), shard keys and indexes are cached. Decoded chunks are cached per array up to
``CHUNK_CACHE_BYTES`` (read when an array is created; 0 turns the cache off, which is what random access
over a store much larger than the cache amounts to, and what ``benchmarks/store_layout.py`` calls cold).

The fast path applies to the codec pipeline this library writes (``sharding_indexed`` with inner
``bytes`` [+ ``blosc``] + ``crc32c`` and index ``bytes`` + ``crc32c`` at the end); any other pipeline is
read through Zarr, still with the missing-file and manifest checks.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import numcodecs.blosc as _blosc
import numcodecs.zstd as _numcodecs_zstd
import numpy as np

from . import schema as S
from .errors import CorruptChunkError, CorruptStoreError

__all__ = ["MISSING", "ArrayMeta", "parse_array_meta", "ShardedArray", "UnshardedArray", "Manifest", "group_rows",
           "load_many", "take_many", "take_one", "raise_first", "zstd_content_size", "chunk_index"]

MISSING = 2**64 - 1  # shard-index offset/nbytes of an inner chunk that is not stored
INDEX_CACHE_BYTES = 64 * 2**20  # shard indexes kept per array
CHUNK_CACHE_BYTES = 32 * 2**20  # decoded chunks kept per array (random reads revisit chunks)
CACHE_MAX_BLOCK_CHUNKS = 64  # a decoded block of more chunks than this is not cached (see ShardedArray._remember)
MANIFEST_CACHE_SHARDS = 1024
# crc32c of any bytes followed by their own crc32c (4 bytes, little-endian): checking a stored chunk is one
# crc32c call over the whole chunk (equivalent: crc(body + x) equals this for exactly one x, crc(body))
CRC32C_RESIDUE = 0x48674BC7
_crc = _crc32c.crc32c
_blosc_sizes, _blosc_decompress = _blosc._cbuffer_sizes, _blosc.decompress
_zstd_decompress = _numcodecs_zstd.decompress
_BLOSC_HEADER = 16  # bytes of a blosc 1 header (version, flags, typesize, nbytes, blocksize, cbytes)
DIRECT_DECODE_BYTES = 64 * 1024  # decoded chunks at least this big are decoded in place, not joined


# ----------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ArrayMeta:
    """The parts of an array's ``zarr.json`` the reader relies on, checked for type (never trusted for
    allocation before the caller compared them with the header)."""

    path: str
    shape: tuple[int, ...]
    data_type: str
    grid: tuple[int, ...]  # chunk shape of the grid: the shard shape for a sharded array
    inner: tuple[int, ...] | None  # inner chunk shape of a sharded array, else None
    fast: bool  # the pipeline this library writes (direct decoding applies)
    blosc: bool  # inner pipeline has blosc between bytes and crc32c
    doc: dict[str, Any] = field(repr=False, compare=False)
    # unsharded arrays: the codec names when the pipeline is ``bytes`` (little) [-> ``zstd``] [-> ``crc32c``],
    # which :class:`UnshardedArray` decodes itself with the size checked before decompressing; else None
    plain: tuple[str, ...] | None = None

    def chunk_key(self, coords) -> str:
        """Key (relative to the group) of the grid chunk / shard file at ``coords``."""
        return f"{self.path}/{chunk_key(self.doc, coords)}"


def chunk_key(doc: dict, coords) -> str:
    """A chunk's key from the array's ``chunk_key_encoding`` (Zarr v3: ``default`` with ``/`` or ``.``
    separator, ``c`` prefix; ``v2`` without it)."""
    enc = doc.get("chunk_key_encoding") or {"name": "default"}
    name = enc.get("name") if isinstance(enc, dict) else enc
    conf = enc.get("configuration", {}) if isinstance(enc, dict) else {}
    parts = [str(int(c)) for c in coords]
    if name == "default":
        return conf.get("separator", "/").join(["c", *parts])
    if name == "v2":
        return conf.get("separator", ".").join(parts) or "0"
    raise CorruptStoreError(f"unknown chunk_key_encoding {name!r}")


def chunk_index(doc: dict, suffix: str) -> int | None:
    """The first grid coordinate of the chunk whose key (relative to its array) is ``suffix``, per the array's
    ``chunk_key_encoding``; None when ``suffix`` is not a chunk key of that encoding."""
    enc = doc.get("chunk_key_encoding") or {"name": "default"}
    name = enc.get("name") if isinstance(enc, dict) else enc
    conf = enc.get("configuration", {}) if isinstance(enc, dict) else {}
    sep = conf.get("separator", "/" if name == "default" else ".") if isinstance(conf, dict) else "/"
    parts = suffix.split(sep)
    if name == "default":
        if not parts or parts[0] != "c":
            return None
        parts = parts[1:]
    return int(parts[0]) if parts and parts[0].isdigit() else None


def _names(codecs) -> list[str | None]:
    """The codec names of a pipeline (None for a codec object without a name)."""
    return [c.get("name") if isinstance(c, dict) else c for c in codecs]


def _little(codec) -> bool:
    if not isinstance(codec, dict):
        return True
    conf = codec.get("configuration", {})
    return isinstance(conf, dict) and conf.get("endian", "little") == "little"


def parse_array_meta(path: str, raw: bytes | None) -> ArrayMeta:
    """Parse ``<path>/zarr.json``; :class:`CorruptStoreError` naming the array when missing or malformed."""
    if raw is None:
        raise CorruptStoreError(f"array {path!r} is missing (no {path}/zarr.json)")
    try:
        doc = json.loads(bytes(raw))
        if not isinstance(doc, dict):
            raise ValueError(f"zarr.json must hold a JSON object, got {type(doc).__name__}")
        if doc.get("node_type") != "array":
            raise ValueError(f"node_type is {doc.get('node_type')!r}, not 'array'")
        shape = tuple(doc["shape"])
        grid = tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
        for what, t in (("shape", shape), ("chunk shape", grid)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in t):
                raise ValueError(f"{what} must be non-negative integers, got {list(t)}")
        data_type = doc["data_type"]
        data_type = data_type if isinstance(data_type, str) else json.dumps(data_type)
        codecs = doc.get("codecs", [])
        inner = None
        fast = blosc = False
        if codecs and isinstance(codecs[0], dict) and codecs[0].get("name") == "sharding_indexed":
            conf = codecs[0].get("configuration", {})
            inner = tuple(conf["chunk_shape"])
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in inner):
                raise ValueError(f"inner chunk shape must be positive integers, got {list(inner)}")
            names = _names(conf.get("codecs", []))
            blosc = names == ["bytes", "blosc", "crc32c"]
            fast = (
                len(codecs) == 1
                and (blosc or names == ["bytes", "crc32c"])
                and _little(conf["codecs"][0])
                and _names(conf.get("index_codecs", [])) == ["bytes", "crc32c"]
                and _little(conf["index_codecs"][0])
                and conf.get("index_location", "end") == "end"
            )
        plain = None
        if inner is None and isinstance(codecs, list):
            pipeline = tuple(_names(codecs))
            if pipeline in _PLAIN_PIPELINES and _little(codecs[0]):
                plain = tuple(str(n) for n in pipeline)  # all names: it is one of _PLAIN_PIPELINES
        chunk_key(doc, [0])  # unknown encodings are refused here, not at the first read
    except CorruptStoreError as e:
        raise CorruptStoreError(f"array {path!r}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise CorruptStoreError(f"array {path!r}: malformed {path}/zarr.json ({type(e).__name__}: {e})") from None
    return ArrayMeta(path, shape, data_type, grid, inner, fast, blosc, doc, plain)


_PLAIN_PIPELINES = {("bytes", "zstd", "crc32c"), ("bytes", "crc32c"), ("bytes", "zstd"), ("bytes",)}


# ----------------------------------------------------------------------------------------- manifest


class Manifest:
    """The ``manifest`` array: the tags binding every chunk to its content and position, one Zarr chunk per
    shard, read per shard on first use and cached. ``read_rows(a, b)`` returns its rows ``[a, b)`` (Zarr).

    Two layouts, given by the header (:attr:`fkdstore.schema.Header.manifest_shape`): 4.0 has one row per
    shard, ``lead`` tags of the per-image chunks then ``chunks_per_shard * P`` record tags; 2.0/3.0 have
    ``chunks_per_shard`` rows of ``P`` record tags per shard (``lead`` 0). :meth:`shard` returns the record
    tags ``(chunks of the shard, P)`` and :meth:`image_tags` the per-image ones, whatever the layout."""

    def __init__(self, meta: ArrayMeta, read_rows: Callable[[int, int], np.ndarray], exists: Callable[[str], bool],
                 *, rows_per_shard: int, num_rows: int, lead: int, columns: int, chunks_per_shard: int,
                 num_chunks: int):
        self.meta, self._read_rows, self._exists = meta, read_rows, exists
        self.rps, self.num_rows, self.lead, self.P = rows_per_shard, num_rows, lead, columns
        self.cps, self.num_chunks = chunks_per_shard, num_chunks
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def of(cls, header, meta: ArrayMeta, read_rows: Callable[[int, int], np.ndarray],
           exists: Callable[[str], bool]) -> Manifest:
        """The manifest of a store with ``header`` (:class:`fkdstore.schema.Header`)."""
        rows, _ = header.manifest_shape
        return cls(meta, read_rows, exists, rows_per_shard=header.manifest_chunk[0], num_rows=rows,
                   lead=len(header.bound_per_image), columns=len(header.record_specs()),
                   chunks_per_shard=header.chunks_per_shard, num_chunks=header.num_chunks)

    def _row(self, s: int) -> np.ndarray:
        hit = self._cache.get(s)
        if hit is not None:
            self._cache.move_to_end(s)
            return hit
        a = s * self.rps
        row = np.asarray(self._read_rows(a, min(self.num_rows, a + self.rps)), dtype=np.uint32).reshape(-1)
        self._cache[s] = row
        while len(self._cache) > MANIFEST_CACHE_SHARDS:
            self._cache.popitem(last=False)
        return row

    def shard(self, s: int) -> np.ndarray:
        """Record tags of the chunks of shard ``s``: ``(chunks in shard, P)``."""
        n = min(self.num_chunks, (s + 1) * self.cps) - s * self.cps
        return self._row(s)[self.lead:].reshape(-1, self.P)[:n]

    def image_tags(self, s: int) -> np.ndarray:
        """Tags of the per-image chunks of shard ``s`` (key, image_size, label; empty in 2.0/3.0)."""
        return self._row(s)[:self.lead]

    def prefetch(self, shards) -> None:
        """Read the uncached manifest chunks of ``shards`` in one Zarr read of the rows they span (its chunks
        are fetched concurrently); damage is left for :meth:`shard` to report, shard by shard."""
        todo = sorted(s for s in shards if s not in self._cache)[:MANIFEST_CACHE_SHARDS]
        if len(todo) < 2 or todo[-1] - todo[0] + 1 > 2 * len(todo):  # only nearly contiguous runs of shards
            return
        a, b = todo[0] * self.rps, min(self.num_rows, (todo[-1] + 1) * self.rps)
        try:
            rows = np.asarray(self._read_rows(a, b), dtype=np.uint32)
        except Exception:  # pragma: no cover - reported per shard by shard()
            return
        for s in todo:
            self._cache[s] = rows[s * self.rps - a:min(self.num_rows, (s + 1) * self.rps) - a].reshape(-1)
        while len(self._cache) > MANIFEST_CACHE_SHARDS:
            self._cache.popitem(last=False)

    def forget(self, s: int) -> None:
        """Drop the cached row of shard ``s`` (read again on next use)."""
        self._cache.pop(s, None)

    def missing_note(self, s: int) -> str:
        """A hint for a mismatch message when the manifest chunk of shard ``s`` itself is absent."""
        key = self.meta.chunk_key((s, 0))
        return "" if self._exists(key) else f"; the manifest chunk {key} itself is missing"

    def clear(self) -> None:
        self._cache.clear()


# ---------------------------------------------------------------------------------- unsharded arrays

_ZSTD_MAGIC = 0xFD2FB528


def zstd_content_size(frame) -> int | None:
    """The decompressed size a zstd frame declares in its header (``Frame_Content_Size``), None when the frame
    does not declare it; :class:`ValueError` when the bytes do not start with a zstd frame header."""
    if len(frame) < 5 or int.from_bytes(frame[:4], "little") != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame (bad magic number)")
    fhd = frame[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    did_size = (0, 1, 2, 4)[fhd & 3]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    pos = 5 + (0 if single else 1) + did_size
    if fcs_size == 0:
        return None
    if len(frame) < pos + fcs_size:
        raise ValueError("truncated zstd frame header")
    value = int.from_bytes(frame[pos:pos + fcs_size], "little")
    return value + 256 if fcs_size == 2 else value


class UnshardedArray:
    """One unsharded array (``key``, ``image_size``, ``label``, ``written``, ``manifest``) whose pipeline is
    :attr:`ArrayMeta.plain`, read chunk by chunk through the byte source: each chunk's stored size is bounded
    before it is read, its crc32c checked, and the size its zstd frame declares compared with the chunk shape
    before anything is decompressed (into a buffer of exactly that size), so a crafted chunk costs at most
    its declared shape in memory. A missing chunk reads as ``fill`` (callers compare tags). Errors are
    :class:`CorruptChunkError` naming the array, chunk and file."""

    def __init__(self, meta: ArrayMeta, source, dtype: str, fill: int = 0):
        self.meta, self.source, self.path = meta, source, meta.path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.grid = tuple(meta.grid)
        self.shape = tuple(meta.shape)
        self.fill = fill
        self.chunk_nbytes = math.prod(self.grid) * self.dtype.itemsize
        names = meta.plain or ()
        self._zstd, self._crc = "zstd" in names, "crc32c" in names
        # stored bytes of one chunk at most: zstd's worst case (ZSTD_compressBound) plus its frame and the trailer
        self.max_stored = self.chunk_nbytes + (self.chunk_nbytes >> 7) + 1024 + 4

    def key(self, c: int) -> str:
        return self.meta.chunk_key((c,) + (0,) * (len(self.shape) - 1))

    def _decode(self, c: int, raw) -> np.ndarray:
        where = f"array {self.path!r} chunk {c} ({self.key(c)})"
        n = len(raw)
        if self._crc:
            if n < 4:
                raise CorruptChunkError(f"{where}: truncated ({n} bytes)")
            if _crc(raw) != CRC32C_RESIDUE:
                raise CorruptChunkError(f"{where}: crc32c checksum mismatch (data corrupted)")
            body = memoryview(raw)[:-4]
        else:
            body = memoryview(raw)
        expect = self.chunk_nbytes
        if self._zstd:
            try:
                declared = zstd_content_size(body)
                if declared is not None and declared != expect:
                    raise ValueError(f"its zstd frame declares {declared} decoded bytes, the chunk shape "
                                     f"{self.grid} holds {expect}")
                out = _zstd_decompress(bytes(body), bytearray(expect))
            except Exception as e:  # numcodecs raises several types for damaged input
                raise CorruptChunkError(f"{where}: cannot decode ({e})") from None
        else:
            if len(body) != expect:
                raise CorruptChunkError(f"{where}: {len(body)} bytes, the chunk shape {self.grid} holds {expect}")
            out = bytes(body)
        return np.frombuffer(out, self.dtype).reshape(self.grid)

    def chunks(self, cs) -> list[np.ndarray]:
        """Decoded chunks ``cs`` (one batch of reads; missing ones as the fill value)."""
        raws = self.source.read_bounded_many([self.key(c) for c in cs], self.max_stored)
        return [np.full(self.grid, self.fill, self.dtype) if raw is None else self._decode(c, raw)
                for c, raw in zip(cs, raws)]

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` along the first axis (clipped to the shape), as a native-endian array."""
        b = min(b, self.shape[0])
        g = self.grid[0]
        if b <= a:
            return np.zeros((0, *self.shape[1:]), self.dtype.newbyteorder("="))
        c0, c1 = a // g, (b - 1) // g
        parts = self.chunks(range(c0, c1 + 1))
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = data[a - c0 * g:b - c0 * g][(slice(None),) + tuple(slice(0, n) for n in self.shape[1:])]
        return out.astype(self.dtype.newbyteorder("="))


# ------------------------------------------------------------------------------------------- arrays


_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    """``n`` zero bytes (the fill value of a chunk that is not stored), shared per size."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


def group_rows(rows: np.ndarray, ipc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group image rows by inner chunk: (unique chunk ids, position of each row's chunk, row in chunk)."""
    c = rows // ipc
    within = rows - c * ipc
    if len(rows) <= 1:
        return c, np.zeros(len(rows), np.intp), within
    if len(rows) <= 64:  # small batches: a sort of a few items beats np.unique's machinery
        order = np.argsort(c, kind="stable")
        sc = c[order]
        first = np.empty(len(sc), bool)
        first[0] = True
        np.not_equal(sc[1:], sc[:-1], out=first[1:])
        chunks = sc[first]
        inv = np.empty(len(rows), np.intp)
        inv[order] = np.cumsum(first) - 1
        return chunks, inv, within
    chunks, inv = np.unique(c, return_inverse=True)
    return chunks, inv.reshape(-1), within


class ShardedArray:
    """One per-crop array ``(N, M, ...)`` stored in shards of ``ips`` images and inner chunks of ``ipc``.

    ``source`` is a :class:`fkdstore.bytesource.ByteSource`; ``zarr_array`` a callable returning the Zarr array
    (fallback path only); ``manifest``/``column``/``tag_prefix`` bind chunks to positions (invariant 9);
    ``cache_bytes``: decoded chunks kept (default :data:`CHUNK_CACHE_BYTES` at creation; 0 = no cache)."""

    def __init__(self, meta: ArrayMeta, source, *, num_images: int, dtype: str, manifest: Manifest | None = None,
                 column: int = 0, zarr_array: Callable[[], Any] | None = None,
                 cache_bytes: int | None = None, tag_prefix: bytes = b"",
                 written: Callable[[int], np.ndarray | None] | None = None):
        self.meta, self.source, self.path = meta, source, meta.path
        # written(c): the reader's written flags of chunk c's rows (bool (ipc,)), for invariant 9's rule that a
        # chunk also matches its tag with the rows of images not marked written set to the fill value
        self._written_rows = written
        self.num_images = int(num_images)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shape = meta.shape
        self.ipc = meta.inner[0] if meta.inner else meta.grid[0]
        self.chunk_shape = (self.ipc, *meta.shape[1:])
        self.per_shard = meta.grid[0] // self.ipc
        self.num_chunks = math.ceil(self.num_images / self.ipc)
        self.chunk_nbytes = math.prod(self.chunk_shape) * self.dtype.itemsize
        self.fast = meta.fast and meta.inner is not None and meta.grid[0] % self.ipc == 0 \
            and tuple(meta.inner[1:]) == tuple(meta.shape[1:]) and tuple(meta.grid[1:]) == tuple(meta.shape[1:])
        self.manifest, self.column = manifest, column
        self._zarr_factory, self._zarr = zarr_array, None
        self._path_bytes = self.path.encode("utf-8")
        self._tag_prefix = tag_prefix  # the store id (4.0): the first bytes of every manifest tag
        self._tag_head = _crc32c.crc32c(tag_prefix + self._path_bytes + b"\0")  # continued over uint64_le(c)
        # bytes of the last inner chunk that hold images < N (the rest is taken as the fill value)
        self._tail_bytes = (self.num_images - (self.num_chunks - 1) * self.ipc) * (self.chunk_nbytes // self.ipc)
        # the chunk whose rows past N are tagged as fill values (-1: the last chunk is full)
        self._partial = self.num_chunks - 1 if self._tail_bytes < self.chunk_nbytes else -1
        self._blosc = meta.blosc
        # stored bytes of one inner chunk at most (blosc's worst case plus the crc32c trailer): a shard index
        # naming more (or an offset past 2**62) is damage, refused before any byte is requested
        self.max_stored = self.chunk_nbytes + (self.chunk_nbytes >> 4) + 4096
        self._cache_limit = max(0, int(CHUNK_CACHE_BYTES if cache_bytes is None else cache_bytes))
        self._keys: dict[int, str] = {}  # shard file keys (at most MAX_SHARDS per array)
        self.clear()

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_zarr"] = None
        d["_index"], d["_cache"], d["_cache_used"], d["_exists"] = OrderedDict(), OrderedDict(), 0, {}
        return d

    def clear(self) -> None:
        """Drop cached shard indexes, decoded chunks and file-existence answers."""
        self._index: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_used = 0
        self._exists: dict[int, bool] = {}

    def forget(self, s: int) -> None:
        """Drop what is cached of shard ``s``: its index, existence answer and decoded chunks."""
        self._index.pop(s, None)
        self._exists.pop(s, None)
        for c in range(s * self.per_shard, (s + 1) * self.per_shard):
            if self._cache.pop(c, None) is not None:
                self._cache_used -= self.chunk_nbytes

    # -- naming
    def shard_key(self, s: int) -> str:
        key = self._keys.get(s)
        if key is None:
            key = self._keys[s] = self.meta.chunk_key((s,) + (0,) * (len(self.shape) - 1))
        return key

    def where(self, c: int) -> str:
        a = c * self.ipc
        b = min(self.num_images, a + self.ipc) - 1
        return (f"array {self.path!r} chunk {c} (images {a}-{b}, shard file "
                f"{self.shard_key(c // self.per_shard)})")

    # -- shard indexes
    def _indexes(self, shards, raws=None) -> tuple[dict[int, np.ndarray | None], dict[int, Exception]]:
        """Fetch (one batch of suffix reads) and cache the indexes of ``shards``. Returns ``({shard: index or
        None for a missing file}, {shard: error})``; damaged indexes are not cached. ``raws``: the suffixes
        of the uncached ones, already fetched (:func:`load_many` fetches several arrays' at once)."""
        got: dict[int, np.ndarray | None] = {}
        todo = []
        for s in shards:
            if s in self._index:
                self._index.move_to_end(s)
                got[s] = self._index[s]
            else:
                todo.append(s)
        bad: dict[int, Exception] = {}
        if not todo:
            return got, bad
        n = self.per_shard * 16 + 4
        if raws is None:
            raws = self.source.read_suffixes([(self.shard_key(s), n) for s in todo])
        self._parse_indexes(todo, raws, got, bad)
        # A local cache (bytesource.CachedSource) may have served a damaged or stale index: forget it and ask the
        # store once more; an index the store itself serves damaged stays an error.
        again = sorted(bad)
        if again and self.source.invalidate(suffixes=[(self.shard_key(s), n) for s in again]):
            for s in again:
                del bad[s]
            self._parse_indexes(again, self.source.read_suffixes([(self.shard_key(s), n) for s in again]), got, bad)
        limit = max(8, INDEX_CACHE_BYTES // (self.per_shard * 16))
        while len(self._index) > limit:
            self._index.popitem(last=False)
        return got, bad

    def _parse_indexes(self, todo, raws, got: dict, bad: dict) -> None:
        """Check (size, crc32c) and remember the fetched index suffixes ``raws`` of shards ``todo``."""
        n = self.per_shard * 16 + 4
        for s, raw in zip(todo, raws):
            if raw is None:
                self._index[s] = got[s] = None
                continue
            raw = bytes(raw)
            images = f"images {s * self.per_shard * self.ipc}-" \
                     f"{min(self.num_images, (s + 1) * self.per_shard * self.ipc) - 1}"
            if len(raw) < n:
                bad[s] = CorruptChunkError(f"array {self.path!r} shard file {self.shard_key(s)} ({images}): "
                                           f"truncated ({len(raw)} bytes; the shard index alone needs {n})")
            elif _crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                bad[s] = CorruptChunkError(f"array {self.path!r} shard file {self.shard_key(s)} ({images}): the "
                                           f"shard index fails its crc32c checksum")
            else:
                index = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
                off, nb = index[:, 0], index[:, 1]
                missing = (off == MISSING) & (nb == MISSING)
                bad_entry = ~missing & ((off >= 2**62) | (nb > self.max_stored) | (nb < 4))
                if bad_entry.any():
                    j = int(np.flatnonzero(bad_entry)[0])
                    bad[s] = CorruptChunkError(
                        f"array {self.path!r} shard file {self.shard_key(s)} ({images}): the shard index gives inner "
                        f"chunk {j} {int(nb[j])} bytes at offset {int(off[j])}, beyond what a chunk of "
                        f"{self.chunk_nbytes} decoded bytes can take (at most {self.max_stored} stored bytes, offsets "
                        f"below 2**62)")
                else:
                    self._index[s] = got[s] = index

    # -- loading
    def load(self, cs, need=None) -> tuple[np.ndarray, list[Exception | None]]:
        """Decode inner chunks ``cs`` (unique) into one array ``(len(cs), ipc, M, ...)``.

        ``need[j]`` says chunk ``cs[j]`` holds a written image (default: all do): a missing chunk is then an
        error, otherwise it reads as the fill value. Returns the data and, per chunk, None or the error
        found (the caller raises or lists them); nothing is cached here."""
        return load_many([(self, cs, need)])[0]

    def _plan(self, cs, need) -> _Plan:
        """Locate chunks ``cs`` in their shard indexes (vectorised per shard) and list the byte ranges to
        fetch; missing files/entries of chunks that hold written images become errors here."""
        cs = np.asarray(cs, dtype=np.int64).reshape(-1)
        n = len(cs)
        need = np.ones(n, bool) if need is None else np.asarray(need, bool).reshape(-1)
        plan = _Plan(self, cs, need, [None] * n)
        if not n or not self.fast:
            return plan
        if n == 1:  # read(i): scalar path (numpy calls cost more than the work for one chunk)
            self._plan_one(plan)
            return plan
        groups = _shard_groups(cs // self.per_shard)
        got, bad = self._indexes([s for s, _ in groups])
        if len(groups) == 1 and self._plan_sole(plan, groups[0][0], got.get(groups[0][0])):
            return plan
        self._plan_groups(plan, groups, got, bad)
        return plan

    def _plan_one(self, plan: _Plan) -> None:
        """:meth:`_plan` of a single chunk."""
        c = int(plan.cs[0])
        s = c // self.per_shard
        got, bad = self._indexes([s])
        index = got.get(s)
        if s in bad:
            plan.errors[0] = bad[s]
        elif index is None:
            if plan.need[0]:
                plan.errors[0] = self._missing(c, shard=True)
        else:
            off, nb = index[c - s * self.per_shard].tolist()
            if off != MISSING:
                plan.requests, plan.slots = [(self.shard_key(s), off, off + nb)], [0]
            elif plan.need[0]:
                plan.errors[0] = self._missing(c, shard=False)

    def _plan_sole(self, plan: _Plan, s: int, index: np.ndarray | None) -> bool:
        """:meth:`_plan` of chunks that all lie in shard ``s`` when its index is read and sound and stores every
        one of them (the requests in one go); False, planning nothing, otherwise."""
        if index is None:
            return False
        entry = index[plan.cs - s * self.per_shard]
        offs = entry[:, 0]
        if (offs == MISSING).any():
            return False
        n = len(plan.cs)
        plan.requests = list(zip([self.shard_key(s)] * n, offs.tolist(), (offs + entry[:, 1]).tolist()))
        plan.slots = list(range(n))
        return True

    def _plan_groups(self, plan: _Plan, groups: list[tuple[int, np.ndarray | None]], got: dict, bad: dict) -> None:
        """:meth:`_plan` of chunks in several shards, or with shard files or index entries missing: ``groups``
        from :func:`_shard_groups`, ``got`` and ``bad`` from :meth:`_indexes`."""
        cs, need, errors = plan.cs, plan.need, plan.errors
        n, ps = len(cs), self.per_shard
        offs = np.empty(n, np.uint64)
        sizes = np.empty(n, np.uint64)
        keys: list = [None] * n
        ok = np.zeros(n, bool)
        for s, pos in groups:
            where = np.arange(n) if pos is None else pos
            index = got.get(s)
            if s in bad or index is None:
                for j in where.tolist():
                    if s in bad:
                        errors[j] = bad[s]  # one object per shard: verify reports a bad index once
                    elif need[j]:
                        errors[j] = self._missing(int(cs[j]), shard=True)
                continue
            entry = index[cs[where] - s * ps]
            offs[where], sizes[where] = entry[:, 0], entry[:, 1]
            ok[where] = True
            key = self.shard_key(s)
            for j in where.tolist():
                keys[j] = key
        absent = ok & (offs == MISSING)
        if absent.any():
            for j in np.flatnonzero(absent).tolist():
                if need[j]:
                    errors[j] = self._missing(int(cs[j]), shard=False)
            ok &= ~absent
        slots = np.flatnonzero(ok)
        a = offs[slots].tolist()
        b = (offs[slots] + sizes[slots]).tolist()
        plan.requests = list(zip([keys[j] for j in slots.tolist()], a, b))
        plan.slots = slots.tolist()

    def _missing(self, c: int, *, shard: bool) -> CorruptStoreError:
        """The error of chunk ``c``, which holds images marked written, when its shard file (``shard``) or its
        entry in the shard index is missing."""
        if shard:
            return CorruptStoreError(f"{self.where(c)}: the shard file is missing but the chunk holds images marked "
                                     f"written (a lost or partly copied file)")
        return CorruptStoreError(f"{self.where(c)}: the chunk is missing from the shard index but holds images "
                                 f"marked written")

    def _wanted_tags(self, plan: _Plan) -> list:
        """Manifest tag expected for each chunk of ``plan`` to be fetched (None: no check, because the chunk
        holds no written image; an exception: the manifest chunk cannot be read)."""
        m, cs, ps = self.manifest, plan.cs, self.per_shard
        col = self.column
        if m is None:  # no manifest: nothing to check
            return [None] * len(cs)
        if len(cs) == 1:
            s = int(cs[0]) // ps
            try:
                return [int(m.shard(s)[int(cs[0]) - s * ps, col])] if plan.need[0] else [None]
            except Exception as e:  # the manifest chunk itself cannot be read
                return [e]
        n = len(cs)
        shards = cs // ps
        one = shards[0] == shards[-1] and bool((shards == shards[0]).all())
        need = plan.need
        if one and need.all():  # the common case: one shard, every chunk holds written images
            s = int(shards[0])
            try:
                return m.shard(s)[cs - s * ps, col].tolist()
            except Exception as e:  # the manifest chunk itself cannot be read
                return [e] * n
        want: list = [None] * n
        need = need.tolist()
        for s in np.unique(shards).tolist():
            pos = np.arange(n) if one else np.flatnonzero(shards == s)
            try:
                vals = m.shard(s)[cs[pos] - s * ps, col].tolist()
            except Exception as e:  # the manifest chunk itself cannot be read
                vals = [e] * len(pos)
            for j, v in zip(pos.tolist(), vals):
                want[j] = v if need[j] else None
        return want

    def _finish(self, plan: _Plan, blobs) -> None:
        """Check and decode the fetched chunks: crc32c of the stored bytes, blosc (or raw) decoding, and the
        manifest tag computed once on the decoded bytes. Small chunks are decompressed to bytes and joined
        into the output with one copy (cheaper per chunk than decoding into array views); big ones are
        decoded in place into a preallocated array."""
        cs, errors = plan.cs, plan.errors
        n = len(cs)
        if not self.fast:
            plan.out = np.zeros((n, *self.chunk_shape), self.dtype)
            self._load_zarr(plan, plan.out)
            if self.manifest is not None:
                self._check_manifest(plan, plan.out, self.manifest)
            return
        expect = self.chunk_nbytes
        direct = expect >= DIRECT_DECODE_BYTES
        out = np.zeros((n, *self.chunk_shape), self.dtype) if direct else None
        flat = None if out is None else out.reshape(n, -1).view(np.uint8)
        if plan.tagged:  # fetch_many looked the tags up (the decode half touches no shared cache)
            want = plan.want
        else:
            want = self._wanted_tags(plan) if self.manifest is not None else None
        got = self._check_chunks(plan.slots, cs.tolist(), plan.requests, blobs, want, flat)
        parts = None if direct else [_zeros(expect)] * n
        for j, g in zip(plan.slots, got):
            if isinstance(g, Exception):
                errors[j] = g
            elif parts is not None:
                parts[j] = g
        if parts is not None:
            out = np.frombuffer(bytearray().join(parts), self.dtype).reshape(n, *self.chunk_shape)
        plan.out = out

    def _check_chunks(self, slots, cl, requests, blobs, want, dest=None) -> list:
        """Every check the spec asks for of fetched chunks; the one home of these rules. For each ``j`` of
        ``slots``, chunk ``cl[j]`` was fetched as ``blobs[i]`` (bytes ``[a, b)`` of its shard file, from
        ``requests[i] = (key, a, b)``): it must be present, complete, pass crc32c of the stored bytes, decode
        to the full chunk size and, when ``want[j]`` is its manifest tag (an int; None: not checked, or
        ``want`` None for none; an exception: the manifest could not be read), carry that tag. Returns, per
        chunk, the decoded bytes (decoded into ``dest[j]`` when ``dest`` is given) or the error.

        One loop per batch with the array's constants in locals: this is the reader's per-chunk cost."""
        expect, blosc, head0, partial = self.chunk_nbytes, self._blosc, self._tag_head, self._partial
        crc, sizes, decompress = _crc, _blosc_sizes, _blosc_decompress
        out = []
        for j, (_, a, b), raw in zip(slots, requests, blobs):
            c = cl[j]
            if raw is None:  # the file vanished between the index read and now
                out.append(CorruptStoreError(f"{self.where(c)}: the shard file is missing"))
                continue
            n = len(raw)
            if n != b - a or n < 4:
                out.append(CorruptChunkError(f"{self.where(c)}: truncated (bytes {a}..{b} of the file are not "
                                             f"all there)"))
                continue
            if raw.__class__ is not bytes:  # numcodecs' blosc has less per-call overhead on bytes than on a view
                raw = bytes(raw)
            if crc(raw) != CRC32C_RESIDUE:  # i.e. crc32c(body) != the stored trailer
                out.append(CorruptChunkError(f"{self.where(c)}: crc32c checksum mismatch (data corrupted)"))
                continue
            try:
                if blosc:
                    # blosc reads its input up to the compressed size its header states (it is given no length):
                    # that must be the body exactly, so the trailer can stay on (no copy) and nothing past it is read
                    if n - 4 < _BLOSC_HEADER:
                        raise ValueError(f"{n - 4} bytes, shorter than a blosc header")
                    nb, cb, _ = sizes(raw)
                    if nb != expect:
                        raise ValueError(f"decodes to {nb} bytes, expected {expect}")
                    if cb != n - 4:
                        raise ValueError(f"its blosc header states {cb} compressed bytes, the chunk holds {n - 4}")
                    if dest is None:
                        dec = decompress(raw)
                    else:
                        decompress(raw, dest[j])
                        dec = dest[j]
                elif n - 4 == expect:
                    dec = raw[:-4]
                    if dest is not None:
                        dest[j][:] = np.frombuffer(dec, np.uint8)
                else:
                    raise ValueError(f"{n - 4} bytes, expected {expect}")
            except Exception as e:  # blosc raises several types for damaged input
                out.append(CorruptChunkError(f"{self.where(c)}: cannot decode ({e})"))
                continue
            w = None if want is None else want[j]
            if w is not None:
                if isinstance(w, Exception):
                    out.append(CorruptStoreError(f"{self.where(c)}: its manifest entry cannot be read "
                                                 f"({type(w).__name__}: {w})"))
                    continue
                # schema.manifest_tag's rule on the decoded little-endian bytes: crc32c(store id + path +
                # b"\0" + uint64_le(c) + bytes), i.e. the crc of the header continued over the data (tests pin
                # it to schema.manifest_tag)
                head = crc(c.to_bytes(8, "little"), head0)
                if c == partial:
                    # rows past N count as the fill value whatever the stored chunk holds there (invariant 9)
                    tail = self._tail_bytes
                    tag = crc(_zeros(expect - tail), crc(memoryview(dec)[:tail], head))
                else:
                    tag = crc(dec, head)
                if tag != w and not self._matches_unwritten(c, dec, w):
                    out.append(CorruptStoreError(f"{self.where(c)} does not match the manifest: misplaced or "
                                                 f"stale data{self._missing_note(c // self.per_shard)}"))
                    continue
            out.append(dec)
        return out

    def _missing_note(self, s: int) -> str:
        """The manifest's hint for a mismatch in shard ``s`` (see :meth:`Manifest.missing_note`); empty without
        a manifest."""
        return "" if self.manifest is None else self.manifest.missing_note(s)

    def _matches_unwritten(self, c: int, dec, want: int) -> bool:
        """Invariant 9's second rule: chunk ``c`` (decoded bytes ``dec``) also matches tag ``want`` when the rows
        of images the reader does not see marked written are set to the fill value (a writer rewriting a
        partially flushed shard writes the data, holding rows it has not yet marked written, before the
        manifest row)."""
        if self._written_rows is None:
            return False
        w = self._written_rows(c)
        if w is None or w.all():
            return False
        row = self.chunk_nbytes // self.ipc
        data = np.frombuffer(dec, np.uint8)[:self.chunk_nbytes].copy().reshape(self.ipc, row)
        data[~np.asarray(w, bool)[:self.ipc]] = 0
        if c == self._partial:
            data.reshape(-1)[self._tail_bytes:] = 0
        return _crc(data.tobytes(), _crc(c.to_bytes(8, "little"), self._tag_head)) == want

    def _zarr_array(self):
        if self._zarr is None:
            try:
                self._zarr = self._zarr_factory()
            except CorruptStoreError:
                raise
            except Exception as e:  # zarr refuses its own metadata in several ways (codec configs, JSON)
                raise CorruptStoreError(f"array {self.path!r}: Zarr cannot open it ({type(e).__name__}: {e}); its "
                                        f"{self.path}/zarr.json is damaged") from e
        return self._zarr

    def _load_zarr(self, plan: _Plan, out: np.ndarray) -> None:
        """Read the chunks of ``plan`` through Zarr into ``out`` (the pipelines without a fast path)."""
        try:
            arr = self._zarr_array()
        except CorruptStoreError as e:
            plan.errors[:] = [e] * len(plan.errors)
            return
        for j, c in enumerate(plan.cs.tolist()):
            s = c // self.per_shard
            if plan.need[j]:
                ok = self._exists.get(s)
                if ok is None:
                    ok = self._exists[s] = self.source.exists(self.shard_key(s))
                if not ok:
                    plan.errors[j] = CorruptStoreError(
                        f"{self.where(c)}: the shard file is missing but the chunk holds images marked written")
                    continue
            a = c * self.ipc
            b = min(self.num_images, a + self.ipc)
            try:
                out[j, :b - a] = arr[a:b]
            except Exception as e:  # zarr raises several types for damaged chunks
                plan.errors[j] = CorruptChunkError(f"{self.where(c)}: cannot be read ({type(e).__name__}: {e})")

    def _check_manifest(self, plan: _Plan, out: np.ndarray, m: Manifest) -> None:
        """Compare the Zarr-read chunks ``out`` of ``plan`` with their tags in manifest ``m``."""
        errors = plan.errors
        tag = S.manifest_tag
        for j, c in enumerate(plan.cs.tolist()):
            if errors[j] is not None or not plan.need[j]:
                continue
            s = c // self.per_shard
            try:
                want = int(m.shard(s)[c - s * self.per_shard, self.column])
            except Exception as e:  # the manifest chunk itself cannot be read
                errors[j] = CorruptStoreError(f"{self.where(c)}: its manifest entry cannot be read "
                                              f"({type(e).__name__}: {e})")
                continue
            if tag(self.path, c, out[j], self._tag_prefix) != want and \
                    not self._matches_unwritten(c, np.ascontiguousarray(out[j]).astype(self.dtype).tobytes(), want):
                errors[j] = CorruptStoreError(
                    f"{self.where(c)} does not match the manifest: misplaced or stale data{m.missing_note(s)}")

    # -- cached access (Reader)
    def lookup(self, cs: np.ndarray) -> tuple[list, list[int]]:
        """Cache lookup of chunks ``cs``: (hit per chunk or None, positions to load)."""
        cache = self._cache
        if not cache:  # nothing cached (or the cache is off: random access over a large store)
            return [None] * len(cs), list(range(len(cs)))
        if len(cs) == 1:  # read(i): one chunk per array
            c = int(cs[0])
            h = cache.get(c)
            if h is None:
                return [None], [0]
            cache.move_to_end(c)
            return [h], []
        hits = [cache.get(c) for c in cs.tolist()]
        todo = [j for j, h in enumerate(hits) if h is None]
        for j, h in enumerate(hits):
            if h is not None:
                cache.move_to_end(int(cs[j]))
        return hits, todo

    def assemble(self, cs: np.ndarray, hits: list, todo: list[int], data: np.ndarray | None) -> np.ndarray:
        """Stack cached ``hits`` and freshly loaded ``data`` (for positions ``todo``) in the order of ``cs``,
        remembering the new chunks in the LRU cache."""
        if todo:
            if data is None:
                raise TypeError(f"array {self.path!r}: {len(todo)} chunks to assemble were not given their data")
            self._remember(cs[todo], data)
            if len(todo) == len(cs):
                return data
        if len(cs) == 1:
            return hits[0][None]
        out = np.empty((len(cs), *self.chunk_shape), self.dtype)
        if todo:
            out[todo] = data
        for j, h in enumerate(hits):
            if h is not None:
                out[j] = h
        return out

    def _remember(self, cs: np.ndarray, data: np.ndarray) -> None:
        """Cache decoded chunks as *copies*: a view would keep its whole decoded batch alive after the LRU
        evicts its neighbours, so memory would exceed what the cache accounts. Blocks of more than
        :data:`CACHE_MAX_BLOCK_CHUNKS` chunks (large random batches, whose chunks are rarely read again)
        are not cached at all, so they pay no copy."""
        if self._cache_limit < self.chunk_nbytes or len(cs) > CACHE_MAX_BLOCK_CHUNKS:
            return
        cache = self._cache
        for c, d in zip(cs.tolist(), data):
            if c not in cache:
                cache[c] = d.copy()
                self._cache_used += self.chunk_nbytes
        while self._cache_used > self._cache_limit:
            cache.popitem(last=False)
            self._cache_used -= self.chunk_nbytes

    def chunks(self, cs: np.ndarray) -> np.ndarray:
        """Decoded chunks ``cs`` (unique) stacked ``(len(cs), ipc, M, ...)`` through the LRU cache; raises the
        first error. Every requested chunk must hold a written image (the reader checked)."""
        return take_many([self], cs)[0]

    def take(self, chunks: np.ndarray, inv: np.ndarray, within: np.ndarray) -> np.ndarray:
        """Rows given as (unique chunk ids, index into them per row, row within its chunk)."""
        return self.chunks(chunks)[inv, within]

    def shard_chunks(self, s: int) -> np.ndarray:
        """Chunk ids of shard ``s`` (the last shard may hold fewer)."""
        a = s * self.per_shard
        return np.arange(a, min(self.num_chunks, a + self.per_shard))

    def shard_rows(self, s: int) -> np.ndarray:
        """Every image row of shard ``s`` (one batch of reads, not cached); all must be written images."""
        (data, errors), = load_many([(self, self.shard_chunks(s), None)])
        raise_first(errors)
        n0 = s * self.per_shard * self.ipc
        return data.reshape(-1, *self.chunk_shape[1:])[: min(self.num_images, n0 + self.per_shard * self.ipc) - n0]


@dataclass
class _Plan:
    array: ShardedArray
    cs: np.ndarray
    need: np.ndarray
    errors: list
    requests: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    blobs: list = field(default_factory=list)  # fetched bytes of ``requests`` (fetch_many)
    want: list | None = None  # expected manifest tag per chunk, when ``tagged`` (fetch_many)
    tagged: bool = False
    whole: bool = False  # ``blobs`` were cut from whole shard objects (fetch_many(whole=True))
    out: np.ndarray | None = None  # the decoded chunks (len(cs), ipc, ...), set by ShardedArray._finish

    def result(self) -> tuple[np.ndarray, list[Exception | None]]:
        """The decoded chunks and, per chunk, None or the error found; the plan must be finished."""
        if self.out is None:
            raise RuntimeError(f"array {self.array.path!r}: the chunks were planned but never decoded")
        return self.out, self.errors


def _shard_groups(shards: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
    """``shards`` (the shard of each chunk, at least two) as ``[(shard, positions of its chunks)]`` in shard
    order; positions None when every chunk lies in one shard (read(i), read_all, verify: no grouping needed)."""
    n = len(shards)
    if shards[0] == shards[-1] and (n < 3 or (shards == shards[0]).all()):
        return [(int(shards[0]), None)]
    order = np.argsort(shards, kind="stable")
    ss = shards[order]
    cut = np.flatnonzero(ss[1:] != ss[:-1]) + 1
    return [(int(ss[a]), order[a:b]) for a, b in zip([0, *cut.tolist()], [*cut.tolist(), n])]


def raise_first(errors) -> None:
    for e in errors:
        if e is not None:
            raise e


def load_many(items) -> list[tuple[np.ndarray, list[Exception | None]]]:
    """Load chunks of several arrays of one store at once: ``items`` = ``[(array, chunk ids, need), ...]``.
    The byte ranges of all of them go to the source in ONE call (concurrent and coalesced for a remote
    store, so a batch costs one round of latency, not one per array). Returns ``[(data, errors), ...]``."""
    return finish_many(fetch_many(items))


def fetch_many(items, lock=None, whole: bool = False) -> list[_Plan]:
    """The I/O half of :func:`load_many`: shard indexes, manifest tags and the chunks' stored bytes of
    ``items``, as plans for :func:`finish_many` (which does no I/O and touches no cache for sharded arrays,
    so it can decode one batch while another thread fetches the next). ``lock``: held while the shared
    caches (shard indexes, manifest chunks) are consulted and filled, released for the transfers.

    ``whole``: fetch the shard files the chunks live in as whole objects (one request per array and shard,
    index included, instead of an index round and then the ranges): for reads that need (nearly) every
    chunk of their shards, ``Reader.read_all`` on a remote store. The index is taken from the object's tail
    with the usual checks, and each chunk is the byte range of the object its index names."""
    if not items:
        return []
    guard = lock if lock is not None else contextlib.nullcontext()
    source = items[0][0].source
    objects: dict[str, Any] = {}
    if whole:
        pairs = {}
        for a, cs, _ in items:
            if a.fast and len(cs):
                for s in np.unique(np.asarray(cs, np.int64) // a.per_shard).tolist():
                    pairs[a.shard_key(s)] = (a, s)
        objects = _fetch_objects(source, list(pairs))
        with guard:
            for key, (a, s) in pairs.items():
                if s in a._index:
                    continue
                got: dict[int, np.ndarray | None] = {}
                bad: dict[int, Exception] = {}
                a._parse_indexes([s], [_tail(objects[key], a)], got, bad)
                if bad and source.invalidate(objects=[key]):  # a damaged object served by a local cache
                    objects.update(_fetch_objects(source, [key]))
                    a._indexes([s], [_tail(objects[key], a)])
    with guard:
        _prefetch(items)
        plans = [a._plan(cs, need) for a, cs, need in items]
        for p in plans:
            if p.array.fast:
                p.want = p.array._wanted_tags(p) if p.array.manifest is not None else None
                p.tagged = True
    requests = [r for p in plans for r in p.requests]
    if objects:
        blobs = [_range_of(objects, key, a, b) for key, a, b in requests]
    else:
        blobs = source.read_ranges(requests) if requests else []
    k = 0
    for p in plans:
        n = len(p.requests)
        p.blobs = blobs[k:k + n]
        p.whole = bool(objects)
        k += n
    return plans


def _fetch_objects(source, keys: list[str]) -> dict[str, Any]:
    """``{key: the whole object as a memoryview, or None where missing}``, fetched in one call."""
    return {k: None if obj is None else memoryview(obj) for k, obj in zip(keys, source.read_objects(keys))}


def _tail(obj, a: ShardedArray):
    """The shard index suffix of shard object ``obj`` (all of it when shorter: then reported truncated)."""
    return None if obj is None else obj[-(a.per_shard * 16 + 4):]


def _range_of(objects: dict, key: str, a: int, b: int):
    """Bytes ``[a, b)`` of the fetched object ``key`` (shorter when the object is: the checks call that
    truncated); None when the object is missing."""
    obj = objects.get(key)
    return None if obj is None else obj[a:b]


def finish_many(plans: list[_Plan]) -> list[tuple[np.ndarray, list[Exception | None]]]:
    """The decode half of :func:`load_many`: check and decode the fetched chunks of ``plans``."""
    if not plans:
        return []
    for p in plans:
        p.array._finish(p, p.blobs)
    _heal(plans[0].array.source, plans)
    return [p.result() for p in plans]


def _heal(source, plans) -> None:
    """Chunks that failed their checks after being fetched through a local cache (bytesource.CachedSource): the
    cached bytes are forgotten and the plan is finished again with those chunks fetched from the store once
    more (the others come from the cache); an error that remains is the store's own."""
    if not source.caching:
        return
    failed = [(p, [i for i, j in enumerate(p.slots) if p.errors[j] is not None]) for p in plans if p.requests]
    failed = [(p, bad) for p, bad in failed if bad]
    ranges = [p.requests[i] for p, bad in failed for i in bad]
    objects = sorted({key for p, bad in failed if p.whole for key, _, _ in (p.requests[i] for i in bad)})
    if not failed or not source.invalidate(ranges=ranges, objects=objects):
        return
    again = _fetch_objects(source, objects) if objects else {}  # whole again, so the cache holds them whole
    for p, bad in failed:
        for i in bad:
            p.errors[p.slots[i]] = None
        if p.whole:
            blobs = [_range_of(again, key, a, b) if key in again else blob
                     for (key, a, b), blob in zip(p.requests, p.blobs)]
        else:
            blobs = source.read_ranges(p.requests)
        p.array._finish(p, blobs)


def _prefetch(items) -> None:
    """Fetch the uncached shard indexes of every array in ``items`` in ONE suffix-read call, then the
    uncached manifest chunks of their shards in one Zarr read: on a remote store this is one round of
    latency for all arrays, not one per array (and one per shard for the manifest)."""
    wants = []
    single = all(len(cs) == 1 for _, cs, _ in items)
    for a, cs, _ in items:
        if a.fast and len(cs):
            shards = [int(cs[0]) // a.per_shard] if single else sorted(set((np.asarray(cs) // a.per_shard).tolist()))
            todo = [s for s in shards if s not in a._index]
            if todo:
                wants.append((a, todo))
    if len(wants) > 1:
        raws = wants[0][0].source.read_suffixes([(a.shard_key(s), a.per_shard * 16 + 4) for a, t in wants for s in t])
        k = 0
        for a, todo in wants:
            a._indexes(todo, raws[k:k + len(todo)])
            k += len(todo)
    if not single:  # one chunk per array: one manifest chunk, read by shard()
        prefetch_manifests([a for a, _, _ in items],
                           {s for a, cs, _ in items for s in (np.asarray(cs) // a.per_shard).tolist()})


def prefetch_manifests(arrays, shards) -> None:
    """Cache the manifest chunks of ``shards`` (of the manifest ``arrays`` share) in one Zarr read, ahead of a
    long read (``Reader.read_all`` on a remote store); at most as many as the cache holds. Damage is left
    for the reads to report, shard by shard."""
    manifest = next((a.manifest for a in arrays if a.manifest is not None), None)
    if manifest is not None:
        manifest.prefetch(shards)


def take_one(arrays, c: int) -> list[np.ndarray]:
    """Chunk ``c`` of every array in ``arrays`` (``Reader.read``): like ``take_many(arrays, [c])`` with the
    same checks (:meth:`ShardedArray._check_chunks`), minus the batch machinery: scalar index and manifest
    lookups (the manifest row of ``c`` is read once for arrays sharing a manifest), one byte range per array
    fetched in one call. Anything off the common path (a shard index not cached yet, a chunk not stored,
    the Zarr fallback pipeline, an unreadable manifest) goes through :func:`take_many`, which reports it.
    Returns ``[(ipc, M, ...) array per array]``."""
    got: list = [None] * len(arrays)
    requests, todo = [], []
    tags = None  # (manifest, shard, row of tags of chunk c) of the last array that needed it
    for k, a in enumerate(arrays):
        cache = a._cache
        if cache:
            hit = cache.get(c)
            if hit is not None:
                cache.move_to_end(c)
                got[k] = hit
                continue
        ps = a.per_shard
        s = c // ps
        index = a._index.get(s) if a.fast else None
        if index is None:
            return _take_one_slow(arrays, c)
        a._index.move_to_end(s)
        off, nb = index[c - s * ps].tolist()
        if off == MISSING:
            return _take_one_slow(arrays, c)
        want = None
        m = a.manifest
        if m is not None:
            if tags is None or tags[0] is not m or tags[1] != s:
                try:
                    tags = (m, s, m.shard(s)[c - s * ps].tolist())
                except Exception:  # reported by take_many
                    return _take_one_slow(arrays, c)
            want = tags[2][a.column]
        requests.append((a.shard_key(s), off, off + nb))
        todo.append((k, a, want))
    if requests:
        blobs = arrays[0].source.read_ranges(requests)
        for (k, a, want), req, raw in zip(todo, requests, blobs):
            dec, = a._check_chunks((0,), (c,), (req,), (raw,), (want,))
            if isinstance(dec, Exception):
                if a.source.invalidate(ranges=[req]):
                    return _take_one_slow(arrays, c)  # heals or raises
                raise dec
            data = np.frombuffer(dec, a.dtype).reshape(a.chunk_shape)  # read-only: cached and shared
            if a._cache_limit >= a.chunk_nbytes:
                a._remember(np.array([c]), data[None])
            got[k] = data
    return got


def _take_one_slow(arrays, c: int) -> list[np.ndarray]:
    return [x[0] for x in take_many(arrays, np.array([c], np.int64))]


def take_many(arrays, cs: np.ndarray) -> list[np.ndarray]:
    """Chunks ``cs`` (unique) of every array in ``arrays`` (all with the same inner chunking), through each
    array's cache, misses fetched in one :func:`load_many`; raises the first error."""
    looked = [a.lookup(cs) for a in arrays]
    misses = [(a, cs if len(todo) == len(cs) else cs[todo], None) for a, (_, todo) in zip(arrays, looked) if todo]
    loaded = iter(load_many(misses))
    out = []
    for a, (hits, todo) in zip(arrays, looked):
        data = None
        if todo:
            data, errors = next(loaded)
            raise_first(errors)
        out.append(a.assemble(cs, hits, todo, data))
    return out
