"""Where a store lives: a local folder or a URL (``s3://``, ``gs://``, ``memory://``, ...), through Zarr's
own store layer (:class:`zarr.storage.LocalStore` for paths, :class:`zarr.storage.FsspecStore` for URLs).

Every entry point that takes a store location (``open``, ``write``, ``generate``, ``TorchDataset``, the CLI)
calls :func:`as_store`; nothing else in fkdstore parses paths or URLs. Credentials come the usual way for
the scheme (environment, profiles) or through ``storage_options`` (passed to fsspec).

Unreachable locations: :func:`as_store` checks a URL with one request (:func:`check_reachable`) and turns
every way of not reaching it (unknown scheme, no bucket in the URL, missing bucket, refused or missing
credentials, an endpoint that does not answer) into one :class:`~fkdstore.errors.StorageError` whose
one-line message names the URL and the cause; :func:`storage_error` does the same mapping for an error
raised later, mid-read or mid-write.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import StorageError

__all__ = ["as_store", "is_url", "local_root", "describe", "check_reachable", "storage_error", "options_for",
           "object_sizes", "is_empty", "remove_all", "ByteSource", "LocalSource", "StoreSource", "byte_source",
           "coalesce"]

# Schemes whose first path component is a bucket (container) that must exist before a store is written.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
_CREDENTIALS_HINT = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or storage_options key/secret/profile",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or storage_options token",
    "az": "AZURE_STORAGE_* variables or storage_options account_name/account_key/sas_token",
}
_CREDENTIALS_HINT |= {"s3a": _CREDENTIALS_HINT["s3"], "gcs": _CREDENTIALS_HINT["gs"],
                      "abfs": _CREDENTIALS_HINT["az"], "abfss": _CREDENTIALS_HINT["az"]}
_HALF_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")  # "s3:/bucket": a URL with a slash missing


def is_url(location: Any) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which is a local path)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def as_store(
    location: str | os.PathLike,
    *,
    read_only: bool,
    storage_options: Mapping[str, Any] | None = None,
    check: bool = True,
):
    """A Zarr v3 store for a local path or a URL. ``storage_options`` are only valid with a URL.

    With ``check`` (default) a URL is probed once (:func:`check_reachable`), so a bad URL, a missing bucket,
    wrong credentials or a dead endpoint raise :class:`StorageError` here, before anything else is done.
    """
    import zarr.abc.store
    import zarr.storage

    if isinstance(location, zarr.abc.store.Store):
        return location
    if is_url(location):
        try:
            store = zarr.storage.FsspecStore.from_url(
                str(location), storage_options=_with_defaults(str(location), storage_options), read_only=read_only
            )
        except ImportError as e:
            raise StorageError(f"{location}: this URL needs an fsspec filesystem package that is not "
                               f"installed ({_one_line(e)}); for s3:// install fkdstore[s3]") from None
        except ValueError as e:  # fsspec: "Protocol not known: s4"
            scheme = str(location).split("://", 1)[0]
            raise StorageError(f"{location}: no installed filesystem handles the URL scheme {scheme!r} "
                               f"({_one_line(e)})") from None
        if check:
            check_reachable(store)
        return store
    if isinstance(location, str) and _HALF_URL.match(location):
        raise StorageError(f"{location}: not a valid URL (a URL is SCHEME://BUCKET/PATH; a local path "
                           f"never starts with 'SCHEME:/')")
    if storage_options:
        raise TypeError(f"storage_options apply to URLs only. Got a local path {str(location)!r}.")
    path = str(location)[len("file://"):] if str(location).startswith("file://") else location
    return zarr.storage.LocalStore(Path(path), read_only=read_only)


# s3fs defaults that cost round trips on the small objects of a store: a whole-object read with
# max_concurrency > 1 first asks for the size (a HEAD before every GET), and botocore keeps at most 10
# connections, which caps the concurrent range requests of one read_batch/read_all round.
S3_DEFAULTS = {"max_concurrency": 1, "config_kwargs": {"max_pool_connections": 64}}


def _with_defaults(url: str, storage_options: Mapping[str, Any] | None) -> dict:
    """``storage_options`` plus :data:`S3_DEFAULTS` for ``s3://`` URLs (the caller's values win)."""
    opts = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        opts.setdefault("max_concurrency", S3_DEFAULTS["max_concurrency"])
        opts["config_kwargs"] = {**S3_DEFAULTS["config_kwargs"], **dict(opts.get("config_kwargs") or {})}
    return opts


def options_for(location, storage_options: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``storage_options`` where ``location`` is a URL, else None: for commands with two locations (``convert``
    SRC DST, ``import-fkd``) where one ``--storage-options`` serves whichever of them is remote."""
    return storage_options if is_url(location) else None


def object_sizes(store) -> dict[str, int]:
    """Every object (file) of a store and its size in bytes, keyed relative to the store root.

    A local folder is walked; an fsspec store is listed with one recursive listing (``find``; S3 returns
    sizes with the listing, 1,000 keys per request); any other Zarr store through ``list_prefix`` and
    ``getsize``. Errors of a remote store become :class:`StorageError`."""
    root = local_root(store)
    if root is not None:
        out = {}
        for dirpath, _, files in os.walk(root):
            for f in files:
                full = os.path.join(dirpath, f)
                out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
        return out
    from zarr.core.sync import sync

    fs = getattr(store, "fs", None)
    try:
        if fs is not None:
            base = str(store.path).rstrip("/")
            fs.invalidate_cache(base)  # a listing cached before this process wrote would miss objects
            found = sync(fs._find(base, detail=True, withdirs=False))
            return {k[len(base) + 1:] if base else k: int(v.get("size") or 0) for k, v in found.items()
                    if v.get("type", "file") != "directory"}

        async def collect():
            keys = [k async for k in store.list_prefix("")]
            return {k: await store.getsize(k) for k in keys}

        return sync(collect())
    except Exception as e:
        raise storage_error(e, store) from None


def is_empty(store) -> bool:
    """True when the store holds no object (a missing folder or prefix counts as empty)."""
    root = local_root(store)
    if root is not None:
        return not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root))
    from zarr.core.sync import sync

    async def first():
        async for _ in store.list_dir(""):
            return False
        return True

    try:
        return sync(first())
    except Exception as e:
        raise storage_error(e, store) from None


def remove_all(store) -> None:
    """Delete every object of a store (a new output that failed half-way; never called on a user's store)."""
    root = local_root(store)
    if root is not None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        return
    from zarr.core.sync import sync

    try:
        sync(store.delete_dir(""))
    except Exception as e:
        raise storage_error(e, store) from None


def local_root(store) -> str | None:
    """The folder of a local store (where the fast ``os.pread`` path applies), else None."""
    import zarr.storage

    return str(store.root) if isinstance(store, zarr.storage.LocalStore) else None


def describe(store) -> str:
    """A short human name for a store, for messages: the folder or the URL."""
    root = local_root(store)
    if root is not None:
        return root
    path = getattr(store, "path", "")
    proto = _protocol(getattr(store, "fs", None))
    return f"{proto}://{path}" if proto else str(store)


def _protocol(fs) -> str | None:
    proto = getattr(fs, "protocol", None)
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_reachable(store) -> None:
    """Probe a remote store once; raise :class:`StorageError` (one line) when it cannot be reached.

    Probes ``<store>/zarr.json`` (an object a reader needs anyway); when that is absent and the scheme has
    buckets, probes the bucket, so "no such bucket" is told apart from "no store here yet" (which is fine
    for a writer; a reader then raises :class:`~fkdstore.errors.FormatError`). Local stores: no-op (a
    missing folder is reported by the reader).
    """
    fs = getattr(store, "fs", None)
    if fs is None or local_root(store) is not None:
        return
    from zarr.core.sync import sync

    proto = _protocol(fs)
    root = str(store.path).strip("/")
    bucket = root.split("/", 1)[0]
    if proto in BUCKET_PROTOCOLS and not bucket:
        raise StorageError(f"{describe(store)}: the URL names no bucket (expected {proto}://BUCKET/PATH)")
    try:
        sync(fs._info(f"{root}/zarr.json" if root else "zarr.json"))
        return
    except FileNotFoundError:
        pass
    except Exception as e:
        raise storage_error(e, store) from None
    if proto not in BUCKET_PROTOCOLS:
        return
    try:
        sync(fs._info(bucket))
    except FileNotFoundError:
        raise StorageError(f"{describe(store)}: bucket {bucket!r} does not exist") from None
    except Exception as e:
        raise storage_error(e, store) from None


def storage_error(e: BaseException, store) -> StorageError:
    """The :class:`StorageError` (one line naming the store and the cause) for an exception raised by a
    remote filesystem: refused credentials, no credentials, an endpoint that does not answer, else the
    original message. An existing :class:`StorageError` is returned unchanged."""
    if isinstance(e, StorageError):
        return e
    where = describe(store)
    proto = _protocol(getattr(store, "fs", None))
    names = {c.__name__ for c in type(e).__mro__}
    hint = _CREDENTIALS_HINT.get(proto or "", "the filesystem's credential settings or storage_options")
    if "NoCredentialsError" in names:
        return StorageError(f"{where}: no credentials found; set {hint}")
    if isinstance(e, PermissionError) or names & {"ClientAuthenticationError", "Forbidden", "Unauthorized"}:
        return StorageError(f"{where}: access denied ({_one_line(e)}); check the credentials ({hint})")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError"} \
            or isinstance(e, (ConnectionError, TimeoutError)):
        return StorageError(f"{where}: cannot connect to the storage endpoint ({_one_line(e)})")
    return StorageError(f"{where}: {type(e).__name__}: {_one_line(e)}")


# ------------------------------------------------------------------------------------- byte-range layer

COALESCE_GAP = 64 * 1024  # neighbouring ranges of one object closer than this are fetched as one request
MAX_OPEN_FILES = 256  # file descriptors a local source keeps open (least recently used are closed)


def coalesce(requests, gap: int) -> list[tuple[str, int, int, list[int]]]:
    """Merge byte ranges ``[(key, start, stop), ...]`` of the same object whose gap is below ``gap``.

    Returns ``[(key, start, stop, [request numbers]), ...]``: one entry per request actually issued."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][1]))
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

    store = None  # the Zarr store (subclasses: a property)

    def exists(self, key: str) -> bool:
        return self.read_suffixes([(key, 1)])[0] is not None

    def clear(self) -> None:
        """Forget cached handles (``Reader.refresh``)."""

    def close(self) -> None:
        self.clear()


class LocalSource(ByteSource):
    """Files under a local folder, read with ``os.pread`` on cached descriptors (a bounded LRU). Fork-safe:
    a child process reopens its own descriptors; pickling drops them."""

    def __init__(self, root: str, prefix: str = ""):
        self.root, self.prefix = str(root), prefix
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self._zarr_store = None

    @property
    def store(self):
        """A read-only :class:`zarr.storage.LocalStore` of the folder (for Zarr's array API)."""
        if self._zarr_store is None:
            import zarr.storage

            self._zarr_store = zarr.storage.LocalStore(self.root, read_only=True)
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
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            fd = -1
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
        out: list = [None] * len(requests)
        for key, a, b, members in coalesce(requests, COALESCE_GAP):
            fd = self._fd(key)
            if fd < 0:
                continue
            blob = os.pread(fd, b - a, a)
            if len(members) == 1:
                out[members[0]] = blob
                continue
            view = memoryview(blob)
            for i in members:
                out[i] = view[requests[i][1] - a:requests[i][2] - a]
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
        import pickle

        return pickle.loads(pickle.dumps(self._store))

    def __getstate__(self):
        return {"_store": None if self._recipe is not None else self._store, "prefix": self.prefix,
                "_recipe": self._recipe, "_pid": None}

    def __setstate__(self, d):
        self.__dict__.update(d)

    async def _get(self, key, byte_range=None):
        from zarr.core.buffer import default_buffer_prototype

        buf = await self.store.get(self.prefix + key, prototype=default_buffer_prototype(), byte_range=byte_range)
        return None if buf is None else buf.to_bytes()

    def _gather(self, calls):
        import asyncio

        from zarr.core.sync import sync

        _ = self.store  # rebuilt here, in the caller's thread, if this process did not make it

        async def run():
            return await asyncio.gather(*calls)

        return list(sync(run())) if calls else []

    def read(self, key):
        return self._gather([self._get(key)])[0]

    def read_suffixes(self, requests):
        from zarr.abc.store import SuffixByteRequest

        return self._gather([self._get(k, SuffixByteRequest(int(n))) for k, n in requests])

    def read_ranges(self, requests):
        from zarr.abc.store import RangeByteRequest

        merged = coalesce(requests, COALESCE_GAP)
        blobs = self._gather([self._get(k, RangeByteRequest(int(a), int(b))) for k, a, b, _ in merged])
        out: list = [None] * len(requests)
        for (key, a, b, members), blob in zip(merged, blobs):
            if blob is None:
                continue
            view = memoryview(blob)
            for i in members:
                out[i] = view[requests[i][1] - a:requests[i][2] - a]
        return out


def byte_source(store, prefix: str = "", *, location=None,
                storage_options: Mapping[str, Any] | None = None) -> ByteSource:
    """The byte-range source of a Zarr store (``prefix``: the group's path inside it, ``""`` or ``"a/b/"``).
    ``location``/``storage_options``: the URL the store was opened from, so another process can reopen it
    (:class:`StoreSource`)."""
    root = local_root(store)
    if root is not None:
        return LocalSource(root, prefix)
    return StoreSource(store, prefix, location=location if is_url(location) else None,
                       storage_options=storage_options)
