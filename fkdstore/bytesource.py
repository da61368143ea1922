"""Reading byte ranges of a store's objects (shard files, indexes, ``zarr.json``) for the reader's shard layer.

:func:`byte_source` picks the :class:`ByteSource` of a Zarr store: :class:`LocalSource` for a local folder
(``os.pread`` on a bounded set of open descriptors), :class:`StoreSource` for anything else (Zarr's async store
API, every request of one call issued concurrently, neighbouring ranges :func:`coalesce`\\ d into one request),
optionally wrapped in :class:`CachedSource`, a bounded local disk cache of a remote store's bytes whose entries
are keyed by each object's content identity and checked before use. Where a store lives and how it is opened is
:mod:`fkdstore.storage`'s job; this module only reads from an opened one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import crc32c
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from .errors import CorruptStoreError, StorageError
from .storage import FolderStore, alisting, as_store, describe, is_url, local_root, open_regular, storage_error
from .validation import positive_int

__all__ = ["ByteSource", "LocalSource", "StoreSource", "CachedSource", "byte_source", "coalesce", "COALESCE_GAP",
           "MAX_OPEN_FILES", "DEFAULT_CACHE_BYTES", "IDENTITY_FIELDS"]


def _too_big(path, size: int, limit: int) -> CorruptStoreError:
    return CorruptStoreError(f"{path}: more than {limit} bytes (got {size}{'+' if size == limit + 1 else ''}), "
                             f"beyond what this file may hold")


# ------------------------------------------------------------------------------------- byte-range layer

COALESCE_GAP = 64 * 1024  # neighbouring ranges of one object closer than this are fetched as one request
MAX_OPEN_FILES = 256  # file descriptors a local source keeps open (least recently used are closed)


def coalesce(requests, gap: int) -> list[tuple[str, int, int, list[int]]]:
    """Merge byte ranges ``[(key, start, stop), ...]`` of the same object whose gap is below ``gap``.

    Returns ``[(key, start, stop, [request numbers]), ...]``: one entry per request actually issued."""
    # sorted by (key, start[, stop]) with the tuples' own comparison (no Python key function per request)
    order = sorted(range(len(requests)), key=requests.__getitem__)
    out: list = []
    last = None
    for i in order:
        key, a, b = requests[i]
        if last is not None and last[0] == key and a - last[2] < gap:
            if b > last[2]:
                last[2] = b
            last[3].append(i)  # linear in the number of requests (one read_batch makes hundreds)
        else:
            last = [key, a, b, [i]]
            out.append(last)
    return [tuple(x) for x in out]


def _ascending_runs(requests, gap: int) -> list[tuple[int, int, int, int]] | None:
    """Merged ranges as :func:`coalesce` makes them, found in one pass without sorting when each object's
    requests come together and by start offset (how the shard layer asks: array by array, chunk by chunk):
    ``[(first request, stop request, start, stop byte), ...]``. None when an object's requests are not in
    offset order (then :func:`coalesce` sorts them)."""
    runs = []
    i0, key, a0, start, end = 0, None, 0, 0, 0
    for i, (k, a, b) in enumerate(requests):
        if k == key:
            if a < start:
                return None
            if a - end < gap:
                start = a
                end = max(end, b)
                continue
        if i:
            runs.append((i0, i, a0, end))
        i0, key, a0, start, end = i, k, a, a, b
    if requests:
        runs.append((i0, len(requests), a0, end))
    return runs


class ByteSource:
    """Byte access to the objects (files) of one store by key (``"soft/probs/c/0/0/0"``), relative to the
    store's group. The reader's shard layer reads through this interface only; :func:`byte_source` picks
    the implementation: :class:`LocalSource` (``os.pread``) for a local folder, :class:`StoreSource`
    (Zarr's async store API, concurrent requests) for anything else."""

    def read(self, key: str) -> bytes | None:
        """The whole object, or None if it does not exist."""
        raise NotImplementedError

    def read_suffixes(self, requests: Sequence[tuple[str, int]]) -> list[bytes | None]:
        """The last ``n`` bytes (fewer if the object is shorter) of each ``(key, n)``; None where missing."""
        raise NotImplementedError

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes | None]:
        """Bytes ``[start, stop)`` of each ``(key, start, stop)`` (shorter if the object is); None where the
        object is missing. Neighbouring ranges are coalesced into one request."""
        raise NotImplementedError

    def read_objects(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each whole object (None where missing); a remote source fetches them concurrently."""
        return [self.read(k) for k in keys]

    def read_bounded(self, key: str, limit: int) -> bytes | None:
        """The whole object if it has at most ``limit`` bytes (None if missing); a larger one raises
        :class:`CorruptStoreError` naming it, having transferred at most ``limit + 1`` bytes (metadata of an
        untrusted store must not cost unbounded memory)."""
        return self.read_bounded_many([key], limit)[0]

    def read_bounded_many(self, keys: Sequence[str], limit: int) -> list[bytes | None]:
        """:meth:`read_bounded` of several objects (concurrently for a remote source)."""
        if type(self).read_bounded is not ByteSource.read_bounded:  # a source with its own (LocalSource)
            return [self.read_bounded(k, limit) for k in keys]
        out = self.read_ranges([(k, 0, limit + 1) for k in keys])
        for k, raw in zip(keys, out):
            if raw is not None and len(raw) > limit:
                raise _too_big(k, len(raw), limit)
        return out

    def forget(self, keys: Sequence[str]) -> None:
        """Drop what this source keeps open for ``keys`` (descriptors); nothing to do for most sources."""

    def bind(self, identity: str) -> None:
        """Learn the identity of the store read (a cache keys its entries by it); nothing to do here."""

    store = None  # the Zarr store (subclasses: a property)
    prefix = ""  # the group's key prefix in the store (keys read are relative to it)
    caching = False  # True for CachedSource: fkdstore.shard retries failed reads once through invalidate()
    remote = True  # reads wait on a network: Reader.read_all fetches ahead while it decodes (False: local disk)

    def invalidate(self, ranges: Sequence[tuple[str, int, int]] = (), suffixes: Sequence[tuple[str, int]] = (),
                   objects: Sequence[str] = ()) -> bool:
        """Forget what a cache holds for these reads (they failed a check), so that reading them again asks
        the store. False (nothing to forget) except for :class:`CachedSource`."""
        return False

    def exists(self, key: str) -> bool:
        return self.read_suffixes([(key, 1)])[0] is not None

    def clear(self) -> None:
        """Forget cached handles (``Reader.refresh``)."""

    def close(self) -> None:
        self.clear()


class LocalSource(ByteSource):
    """Files under a local folder, read with ``os.pread`` on cached descriptors (a bounded LRU). Fork-safe:
    a child process reopens its own descriptors; pickling drops them."""

    remote = False

    def __init__(self, root: str, prefix: str = ""):
        self.root, self.prefix = str(root), prefix
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self._zarr_store = None

    @property
    def store(self):
        """A read-only :class:`zarr.storage.LocalStore` of the folder (for Zarr's array API)."""
        if self._zarr_store is None:
            self._zarr_store = FolderStore(self.root, read_only=True)
        return self._zarr_store

    def __getstate__(self):
        return {"root": self.root, "prefix": self.prefix}

    def __setstate__(self, d):
        self.__init__(d["root"], d["prefix"])

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *(self.prefix + key).split("/"))

    def _fd(self, key: str) -> int:
        """Descriptor of ``key``, -1 if the file does not exist."""
        if self._pid != os.getpid():  # forked: the parent's descriptors share offsets/lifetimes; use ours
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = open_regular(self._path(key))  # a FIFO, device, directory or symlink loop: CorruptStoreError
        fd = -1 if fd is None else fd
        self._fds[key] = fd
        while len(self._fds) > MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            if old >= 0:
                os.close(old)
        return fd

    def read(self, key):
        fd = self._fd(key)
        if fd < 0:
            return None
        return os.pread(fd, os.fstat(fd).st_size, 0)

    def read_bounded(self, key, limit):
        fd = self._fd(key)
        if fd < 0:
            return None
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_big(self._path(key), size, limit)
        return os.pread(fd, size, 0)

    def forget(self, keys) -> None:
        """Close the cached descriptors of ``keys``: the next read opens the file again (a writer may have
        renamed a new file over it; a kept descriptor reads the old one)."""
        if self._pid != os.getpid():
            return
        for key in keys:
            fd = self._fds.pop(key, None)
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def read_suffixes(self, requests):
        out = []
        for key, n in requests:
            fd = self._fd(key)
            if fd < 0:
                out.append(None)
                continue
            size = os.fstat(fd).st_size
            out.append(os.pread(fd, min(n, size), max(0, size - n)))
        return out

    def read_ranges(self, requests):
        if len(requests) <= 8 and len({r[0] for r in requests}) == len(requests):
            # one range per file (Reader.read: one chunk of each array): nothing to coalesce, one pread each
            fds = self._fds if self._pid == os.getpid() else None  # forked: _fd reopens
            out = []
            for key, a, b in requests:
                fd = fds.get(key) if fds is not None else None
                if fd is None:
                    fd = self._fd(key)
                else:
                    fds.move_to_end(key)
                out.append(None if fd < 0 else os.pread(fd, b - a, a))
            return out
        runs = _ascending_runs(requests, COALESCE_GAP)
        if runs is not None:  # the usual order (each array's chunks by offset): no sort, slices in one go
            out = []
            for i0, i1, a, b in runs:
                fd = self._fd(requests[i0][0])
                if fd < 0:
                    out.extend([None] * (i1 - i0))
                    continue
                blob = os.pread(fd, b - a, a)  # bytes slices (copies): what the chunk checks take fastest
                out.extend([blob] if i1 - i0 == 1 else [blob[x - a:y - a] for _, x, y in requests[i0:i1]])
            return out
        out = [None] * len(requests)
        for key, a, b, members in coalesce(requests, COALESCE_GAP):
            fd = self._fd(key)
            if fd < 0:
                continue
            blob = os.pread(fd, b - a, a)
            if len(members) == 1:
                out[members[0]] = blob
                continue
            for i in members:
                out[i] = blob[requests[i][1] - a:requests[i][2] - a]
        return out

    def clear(self):
        fds, self._fds = self._fds, OrderedDict()
        if self._pid != os.getpid():
            return  # a forked child must not close the parent's descriptors
        for fd in fds.values():
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self):
        try:
            self.clear()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class StoreSource(ByteSource):
    """Any Zarr store (object storage through fsspec/obstore, memory, ...): byte ranges through
    ``store.get(key, prototype, byte_range=...)``, all requests of one call issued concurrently
    (``asyncio.gather`` on Zarr's event loop), neighbouring ranges coalesced (``COALESCE_GAP``).

    Process-safe: an fsspec filesystem (its event loop, its HTTP sessions) belongs to the process that made
    it, so the store is rebuilt in any other process. With ``location`` (the URL and ``storage_options`` it
    was opened from) pickling carries that recipe, not the store, and a forked or unpickled copy calls
    :func:`as_store` again (no probe: the parent already reached it); without one (a store object given by
    the caller) the store is copied through pickle, which for fsspec makes a new filesystem from its
    arguments in this process."""

    def __init__(self, store, prefix: str = "", *, location: str | None = None,
                 storage_options: Mapping[str, Any] | None = None):
        self._store, self.prefix = store, prefix
        self._recipe = None if location is None else (str(location), dict(storage_options or {}),
                                                      bool(getattr(store, "read_only", True)))
        self._pid = os.getpid()

    @property
    def store(self):
        """The Zarr store, rebuilt first when this process did not make it (fork, unpickling)."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = self._reopen(), os.getpid()
        return self._store

    def _reopen(self):
        if self._recipe is not None:
            url, options, read_only = self._recipe
            return as_store(url, read_only=read_only, storage_options=options or None, check=False)

        return pickle.loads(pickle.dumps(self._store))

    def __getstate__(self):
        return {"_store": None if self._recipe is not None else self._store, "prefix": self.prefix,
                "_recipe": self._recipe, "_pid": None}

    def __setstate__(self, d):
        self.__dict__.update(d)

    async def _get(self, key, byte_range=None):
        buf = await self.store.get(self.prefix + key, prototype=default_buffer_prototype(), byte_range=byte_range)
        return None if buf is None else buf.to_bytes()

    def _gather(self, calls):
        _ = self.store  # rebuilt here, in the caller's thread, if this process did not make it

        async def run():
            return await asyncio.gather(*calls)

        return list(sync(run())) if calls else []

    def read(self, key):
        return self._gather([self._get(key)])[0]

    def read_objects(self, keys):
        return self._gather([self._get(k) for k in keys])

    def read_suffixes(self, requests):
        return self._gather([self._get(k, SuffixByteRequest(int(n))) for k, n in requests])

    def read_bounded_many(self, keys, limit):
        out = self._gather([self._get(k, RangeByteRequest(0, int(limit) + 1)) for k in keys])
        for k, raw in zip(keys, out):
            if raw is not None and len(raw) > limit:
                raise _too_big(k, len(raw), limit)
        return out

    def read_ranges(self, requests):
        merged = coalesce(requests, COALESCE_GAP)
        blobs = self._gather([self._get(k, RangeByteRequest(int(a), int(b))) for k, a, b, _ in merged])
        out: list = [None] * len(requests)
        for (_, a, _, members), blob in zip(merged, blobs):
            if blob is None:
                continue
            for i in members:  # bytes slices (copies): what the chunk checks and blosc take fastest
                out[i] = blob[requests[i][1] - a:requests[i][2] - a]
        return out


# ------------------------------------------------------------------------------------- local disk cache

DEFAULT_CACHE_BYTES = 10 * 2**30  # cache_dir without cache_bytes
# Listing fields that identify an object's content (S3/minio ETag; GCS md5Hash/generation; Azure etag; ...).
IDENTITY_FIELDS = ("ETag", "etag", "md5Hash", "generation", "VersionId", "version_id", "LastModified",
                   "last_modified", "updated", "mtime")
_MAGIC = b"FKDC\x02"
_ID = 16  # bytes of the entry id: the first 16 bytes of the sha256 its file name spells (its key)
_HEAD = len(_MAGIC) + 4 + 8 + _ID  # magic, crc32c of the content, content length, entry id
_TMP = ".tmp-"
_SCAN_FRACTION = 16  # a process rescans the folder after writing cache_bytes / 16 since its last scan
_EVICT_TO = 0.9  # eviction frees down to this fraction of cache_bytes
_STALE_TMP_S = 3600.0  # temp files older than this (a process killed mid-write) are removed by a scan


class CachedSource(ByteSource):
    """A bounded on-disk cache of the raw bytes a remote :class:`ByteSource` fetches: whole objects
    (``zarr.json``), suffixes (shard indexes) and byte ranges (chunks). ``fkdstore.open(url, cache_dir=...,
    cache_bytes=...)`` wraps the store's :class:`StoreSource` in one; local folders are never cached.

    **Key rule.** An entry is keyed by (store URL and group path, the store's identity (``store_id`` and header
    checksum, :meth:`bind`; not yet for the root ``zarr.json`` that gives them), object key, read kind and byte
    range, the object's *identity*): its ETag (or md5Hash / generation / version / modification time: whatever content
    identity the listing gives) and its size, taken from ONE recursive listing of the store per process
    (S3: one request per 1,000 objects), made at the first read and again after :meth:`clear`
    (``Reader.refresh``). A rewritten object has a new identity, so its old entries are never served (they
    age out). An object absent from the listing (written since) or whose listing gives no content identity
    is read from the store and not cached. Within one listing a reader sees a snapshot of the objects.

    **Never trusted blindly.** Each entry file holds its content's crc32c and its own id (the first bytes of
    the sha256 of its key, which its file name spells); an entry that fails the crc32c (torn, truncated, bit
    rot) or carries another id (another entry's file, of this store or another, copied or swapped in) is
    deleted and read from the store: a foreign entry is a miss, never data. The bytes then go through the reader's usual
    checks (chunk crc32c, decoding, manifest tag, shard-index crc32c); a chunk or index that fails them
    is :meth:`invalidate`d and fetched from the store once more by :mod:`fkdstore.shard`; only when the
    store's own bytes fail too is the error (``CorruptChunkError`` / ``CorruptStoreError``) raised. The
    per-image chunks and manifest rows (read whole) are forgotten by the reader's one re-read before it raises a
    mismatch (``Reader._forget``), so an edited entry of those is fetched from the store once more too; the
    ``zarr.json`` metadata are checked against the header (and the header by its checksum).

    **Bound.** Entries are files ``<cache_dir>/<2 hex>/<62 hex>.<kind>`` (sha256 of the key; kind ``all``,
    ``suffix``, ``range`` or ``offset``); a hit sets the
    file's mtime (the LRU clock). A process that has written more than ``cache_bytes / 16`` since its last
    scan, or believes the folder holds more than ``cache_bytes``, scans the folder and deletes the least
    recently used entries down to 90 % of ``cache_bytes``, so with one process the folder never exceeds
    ``cache_bytes`` after a read returns; with P processes sharing it (DataLoader workers) it may exceed it
    by what the others wrote since their last scan (at most P x ``cache_bytes`` / 16). An entry larger than
    the bound is not cached. The bound covers the whole folder (several stores may share one).

    **Several processes.** Entries are written to a temp file in the same folder and ``os.replace``d in,
    so a reader sees a whole entry or none; a file deleted by another process's eviction is a miss.
    Errors of the cache itself (disk full, read-only folder) never fail a read: the bytes come from the
    store. Picklable: the copy keeps ``cache_dir``/``cache_bytes`` and lists the store again."""

    caching = True

    def __init__(self, inner: ByteSource, cache_dir, cache_bytes: int | None = None, *, url: str | None = None):
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a folder path (str or os.PathLike). Got {cache_dir!r} "
                            f"({type(cache_dir).__name__}).")
        self.inner = inner
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else positive_int("cache_bytes", cache_bytes)
        self.url = url if url is not None else describe(inner.store).rstrip("/") + "/" + inner.prefix
        self.prefix = inner.prefix
        self._ids: dict[str, str] | None = None
        self._zarr_store = None
        self._pid = os.getpid()
        self._used: int | None = None  # bytes in the folder at the last scan plus what this process wrote since
        self._since_scan = 0
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "foreign": 0, "invalidated": 0, "evicted": 0}
        self.identity = ""  # the store's identity once bound (bind): part of every later entry's key

    def __getstate__(self):
        return {"inner": self.inner, "cache_dir": self.cache_dir, "cache_bytes": self.cache_bytes, "url": self.url,
                "identity": self.identity}

    def __setstate__(self, d):
        self.__init__(d["inner"], d["cache_dir"], d["cache_bytes"], url=d["url"])
        self.identity = d.get("identity", "")

    @property
    def store(self):
        """The wrapped Zarr store behind this cache (a Zarr ``WrapperStore``): reads of the Zarr array API
        (``written`` flags, manifest chunks, keys) go through the same entries and rules."""
        inner = self.inner.store  # rebuilt first in a new process
        if self._zarr_store is None or self._zarr_store._store is not inner:
            self._zarr_store = _CachingStore(inner, self)
        return self._zarr_store

    # -- identity and entry files
    def _listed(self) -> bool:
        return self._ids is not None and self._pid == os.getpid()

    def _identity(self, key: str) -> str | None:
        ids = self._ids if self._ids is not None and self._listed() else sync(self._list())
        return ids.get(self.inner.prefix + key)

    async def _list(self) -> dict[str, str]:
        """List the store once (see the key rule) and keep each object's identity."""
        store = self.inner.store
        try:
            found = await alisting(store, self.inner.prefix)
        except Exception as e:
            raise StorageError(f"{describe(store)}: cache_dir needs to list the store's objects (their ETags "
                               f"tell a rewritten object from a cached one): {storage_error(e, store)}") from None
        ids: dict[str, str] = {}
        for k, info in found.items():
            tag = [f"{f}={info[f]}" for f in IDENTITY_FIELDS if info.get(f) not in (None, "")]
            if tag:
                ids[k] = ";".join([f"size={info.get('size')}", *tag])
        self._ids, self._pid = ids, os.getpid()
        return ids

    def bind(self, identity: str) -> None:
        """Key every later entry by the store's identity too (``store_id`` and header checksum, given by the
        reader once it parsed the header): another store's entries never match, whatever its URL."""
        self.identity = str(identity)

    def _path(self, ident: str, key: str, kind: str, a: int, b: int) -> str:
        h = hashlib.sha256(json.dumps([self.url, self.identity, key, ident, kind, a, b]).encode()).hexdigest()
        return os.path.join(self.cache_dir, h[:2], f"{h[2:]}.{kind}")

    @staticmethod
    def _entry_id(path: str) -> bytes:
        """The id an entry file at ``path`` must carry: the first bytes of the sha256 its name spells."""
        stem = os.path.basename(path).split(".", 1)[0]
        return bytes.fromhex(os.path.basename(os.path.dirname(path)) + stem)[:_ID]

    def _load(self, path: str):
        """An entry's content, or None (absent; failed its crc32c; or another entry's file, whose id is not
        this path's: then deleted)."""
        try:
            fd = open_regular(path)
            if fd is None:
                return None
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
        except (OSError, CorruptStoreError):  # absent, evicted by another process, unreadable, not a file
            return None
        body = memoryview(raw)[_HEAD:]
        n = len(_MAGIC)
        if (raw[:n] != _MAGIC or int.from_bytes(raw[n + 4:n + 12], "little") != len(body)
                or crc32c.crc32c(body) != int.from_bytes(raw[n:n + 4], "little")):
            self.stats["corrupt"] += 1
            _remove(path)
            return None
        if raw[n + 12:_HEAD] != self._entry_id(path):  # intact, but saved under another key (a swapped file)
            self.stats["foreign"] += 1
            _remove(path)
            return None
        try:
            os.utime(path)  # the LRU clock
        except OSError:
            pass
        return body

    def _save(self, path: str, data) -> None:
        size = _HEAD + len(data)
        if size > self.cache_bytes:
            return
        folder = os.path.dirname(path)
        tmp = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + crc32c.crc32c(data).to_bytes(4, "little") + len(data).to_bytes(8, "little")
                        + self._entry_id(path))
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # the cache is an optimisation: a full or read-only disk never fails a read
            if tmp is not None:
                _remove(tmp)
            return
        if self._used is None:
            used = self._scan(evict=False)
        else:
            used = self._used = self._used + size
        self._since_scan += size
        if used > self.cache_bytes or self._since_scan > self.cache_bytes // _SCAN_FRACTION:
            self._scan(evict=True)

    def _scan(self, evict: bool) -> int:
        """Measure the folder; with ``evict``, delete least recently used entries down to 90 % of the bound
        once it is over (and temp files left by killed processes). Returns the bytes left in it."""

        entries, total, now = [], 0, time.time()
        try:
            subs = [e.path for e in os.scandir(self.cache_dir) if e.is_dir(follow_symlinks=False)]
        except OSError:
            subs = []
        for sub in subs:
            try:
                files = list(os.scandir(sub))
            except OSError:
                continue
            for e in files:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:  # deleted meanwhile
                    continue
                if e.name.startswith(_TMP):
                    if now - st.st_mtime > _STALE_TMP_S:
                        _remove(e.path)
                    continue
                entries.append((st.st_mtime, st.st_size, e.path))
                total += st.st_size
        if evict and total > self.cache_bytes:
            entries.sort()
            goal = int(self.cache_bytes * _EVICT_TO)
            for _, size, path in entries:
                if total <= goal:
                    break
                _remove(path)
                total -= size
                self.stats["evicted"] += 1
        self._used, self._since_scan = total, 0
        return total

    # -- reads
    def _cached(self, kind: str, requests, fetch):
        """Serve ``requests`` (``(key, a, b)``) from the cache; the misses from ``fetch(sub-list)`` in one
        call, then saved. Objects without an identity go to the store and are not saved."""
        out: list = [None] * len(requests)
        miss, paths = [], []
        for i, (key, a, b) in enumerate(requests):
            ident = self._identity(key)
            path = None if ident is None else self._path(ident, key, kind, a, b)
            hit = None if path is None else self._load(path)
            if hit is not None:
                out[i] = hit
                self.stats["hits"] += 1
            else:
                miss.append(i)
                paths.append(path)
        if miss:
            self.stats["misses"] += len(miss)
            for i, path, blob in zip(miss, paths, fetch([requests[i] for i in miss])):
                out[i] = blob
                if blob is not None and path is not None:
                    self._save(path, blob)
        return out

    async def _aget(self, store, key: str, prototype, byte_range):
        """Zarr's ``store.get`` through the cache (see :attr:`store`); ``key`` is relative to the store."""

        p = self.inner.prefix
        rel = key[len(p):] if key.startswith(p) else None
        if byte_range is None:
            kind, a, b = "all", 0, 0
        elif isinstance(byte_range, RangeByteRequest):
            kind, a, b = "range", int(byte_range.start), int(byte_range.end)
        elif isinstance(byte_range, SuffixByteRequest):
            kind, a, b = "suffix", int(byte_range.suffix), 0
        elif isinstance(byte_range, OffsetByteRequest):
            kind, a, b = "offset", int(byte_range.offset), 0
        else:
            rel = None
        if rel is not None and not self._listed():
            await self._list()
        ident = None if rel is None else self._identity(rel)
        if rel is None or ident is None:
            return await store.get(key, prototype, byte_range)
        path = self._path(ident, rel, kind, a, b)
        hit = self._load(path)
        if hit is not None:
            self.stats["hits"] += 1
            return prototype.buffer.from_bytes(bytes(hit))
        self.stats["misses"] += 1
        buf = await store.get(key, prototype, byte_range)
        if buf is not None:
            self._save(path, buf.to_bytes())
        return buf

    def read(self, key):
        return self.read_objects([key])[0]

    def read_objects(self, keys):
        return self._cached("all", [(k, 0, 0) for k in keys], lambda rs: self.inner.read_objects([k for k, _, _ in rs]))

    def read_bounded_many(self, keys, limit):
        # cached as whole objects (what a bounded read of an object within the bound returns)
        return self._cached("all", [(k, 0, 0) for k in keys],
                            lambda rs: self.inner.read_bounded_many([k for k, _, _ in rs], limit))

    def read_suffixes(self, requests):
        return self._cached("suffix", [(k, int(n), 0) for k, n in requests],
                            lambda rs: self.inner.read_suffixes([(k, n) for k, n, _ in rs]))

    def read_ranges(self, requests):
        return self._cached("range", [(k, int(a), int(b)) for k, a, b in requests], self.inner.read_ranges)

    def invalidate(self, ranges=(), suffixes=(), objects=()) -> bool:
        for kind, reqs in (("range", [(k, int(a), int(b)) for k, a, b in ranges]),
                           ("suffix", [(k, int(n), 0) for k, n in suffixes]),
                           ("all", [(k, 0, 0) for k in objects])):
            for key, a, b in reqs:
                ident = self._identity(key)
                if ident is not None:
                    _remove(self._path(ident, key, kind, a, b))
                    self.stats["invalidated"] += 1
        return True

    def clear(self) -> None:
        """Forget the listing (the next read lists the store again: ``Reader.refresh`` sees rewritten
        objects) and the wrapped source's handles. The entries on disk stay."""
        self._ids = None
        self.inner.clear()

    def close(self) -> None:
        self.inner.close()


class _CachingStore(WrapperStore):
    """:class:`zarr.storage.WrapperStore` whose ``get`` goes through a :class:`CachedSource`
    (:attr:`CachedSource.store`)."""

    def __init__(self, store, cache: CachedSource):
        super().__init__(store)
        self.cache = cache

    def _with_store(self, store):
        return type(self)(store, self.cache)

    async def get(self, key, prototype, byte_range=None):
        return await self.cache._aget(self._store, key, prototype, byte_range)

    def __getattr__(self, name):  # path, fs, ... of the wrapped store (describe(), messages)
        if name.startswith("__") or name in ("_store", "cache"):
            raise AttributeError(name)
        return getattr(self._store, name)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:  # already gone (another process evicted it)
        pass


def byte_source(store, prefix: str = "", *, location=None,
                storage_options: Mapping[str, Any] | None = None, cache_dir=None,
                cache_bytes: int | None = None) -> ByteSource:
    """The byte-range source of a Zarr store (``prefix``: the group's path inside it, ``""`` or ``"a/b/"``).
    ``location``/``storage_options``: the URL the store was opened from, so another process can reopen it
    (:class:`StoreSource`). ``cache_dir``/``cache_bytes``: wrap a remote source in a :class:`CachedSource`;
    ignored for a local folder (its files are already on local disk; caching them would only copy them)."""
    if cache_dir is None and cache_bytes is not None:
        raise TypeError(f"cache_bytes applies with cache_dir only. Got cache_bytes={cache_bytes!r} without cache_dir.")
    root = local_root(store)
    if root is not None:
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a folder path (str or os.PathLike). Got {cache_dir!r} "
                            f"({type(cache_dir).__name__}).")
        return LocalSource(root, prefix)
    source = StoreSource(store, prefix, location=location if is_url(location) else None,
                         storage_options=storage_options)
    if cache_dir is None:
        return source
    url = str(location).rstrip("/") + "/" + prefix if is_url(location) else None
    return CachedSource(source, cache_dir, cache_bytes, url=url)
