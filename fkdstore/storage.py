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

import asyncio
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
import zarr.abc.store
import zarr.storage
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from .errors import CorruptStoreError, FormatError, StorageError
from .validation import positive_int

__all__ = ["as_store", "is_url", "local_root", "describe", "check_reachable", "storage_error", "options_for",
           "object_sizes", "is_empty", "remove_all", "ByteSource", "LocalSource", "StoreSource", "CachedSource",
           "byte_source", "coalesce", "get_bytes", "as_buffer", "list_dir", "list_prefix",
           "read_group_json", "fsync_local", "zarr_array", "read_array", "FolderStore", "create_if_absent",
           "remove_stale_temps", "is_temp_name", "MAX_METADATA_BYTES"]

MAX_METADATA_BYTES = 16 * 2**20  # a zarr.json larger than this is refused (a crafted store must not cost GBs)

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
    return FolderStore(Path(path), read_only=read_only)


# ------------------------------------------------------------------------------------------ local folders

TEMP_SUFFIX = ".fkdstore-tmp"  # a file being written aside: <name>.<host tag>.<pid>.<random>.fkdstore-tmp
STALE_TEMP_S = 900.0  # a temp file not provably another live process's is left alone this long (as ownership)
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr-python's own temp files (LocalStore, zarr >= 3.1)


def is_temp_name(name: str) -> bool:
    """True for the name of a file being written aside (this library's, or zarr-python's ``*.partial``): not
    part of any store, never read, removed by :func:`remove_stale_temps` once its writer is gone."""
    return name.endswith(TEMP_SUFFIX) or bool(_ZARR_PARTIAL.search(name))


def _temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{_HOST_TAG}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _temp_is_stale(name: str, mtime: float, now: float) -> bool:
    """A temp file may be removed when the process that writes it is provably gone (this host, pid not
    running) or it was not touched for :data:`STALE_TEMP_S` seconds (another host's, or zarr's own)."""
    if name.endswith(TEMP_SUFFIX):
        parts = name[:-len(TEMP_SUFFIX)].rsplit(".", 3)
        if len(parts) == 4 and parts[1] == _HOST_TAG and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            return True
    return now - mtime > STALE_TEMP_S


def remove_stale_temps(store) -> list[str]:
    """Delete the temp files that writers killed mid-write left in a local store (see :func:`is_temp_name`
    and :func:`_temp_is_stale`); returns their store keys. A live writer's temp file is never touched, and
    readers never call this (they ignore temp files). Object stores have none (a PUT is whole): no-op."""
    root = local_root(store)
    if root is None or not os.path.isdir(root):
        return []
    removed, now = [], time.time()
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not is_temp_name(name):
                continue
            full = os.path.join(dirpath, name)
            try:
                if _temp_is_stale(name, os.lstat(full).st_mtime, now):
                    os.remove(full)
                    removed.append(os.path.relpath(full, root).replace(os.sep, "/"))
            except OSError:  # removed meanwhile
                pass
    return removed


def _too_big(path, size: int, limit: int) -> CorruptStoreError:
    return CorruptStoreError(f"{path}: more than {limit} bytes (got {size}{'+' if size == limit + 1 else ''}), "
                             f"beyond what this file may hold")


def _not_a_file(path, what: str) -> CorruptStoreError:
    return CorruptStoreError(f"{path}: {what}, not a regular file; a store holds regular files only (a FIFO, "
                             f"device, directory or symlink loop in its place is damage or a crafted store)")


def open_regular(path) -> int | None:
    """A read-only descriptor of the regular file ``path`` (symlinks followed), None when it does not exist.
    Anything else in its place (a FIFO, which would block a plain ``open`` for ever, a device, a directory,
    a symlink loop) raises :class:`CorruptStoreError` naming the path; the file is opened non-blocking and
    checked with ``fstat`` before any read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_a_file(path, "a symlink loop") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or special file"
        raise _not_a_file(path, kind)
    return fd


def _read_file(path: Path, prototype, byte_range):
    """Zarr's ``LocalStore`` read of ``path`` (whole or a byte range) through :func:`open_regular`; a
    ``zarr.json`` larger than :data:`MAX_METADATA_BYTES` is refused."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if byte_range is None:
            if path.name == "zarr.json" and size > MAX_METADATA_BYTES:
                raise CorruptStoreError(f"{path}: {size} bytes, more than the {MAX_METADATA_BYTES} a zarr.json "
                                        f"may have")
            a, b = 0, size
        elif isinstance(byte_range, RangeByteRequest):
            a, b = int(byte_range.start), min(size, int(byte_range.end))
        elif isinstance(byte_range, OffsetByteRequest):
            a, b = int(byte_range.offset), size
        elif isinstance(byte_range, SuffixByteRequest):
            a, b = max(0, size - int(byte_range.suffix)), size
        else:
            raise TypeError(f"Unexpected byte_range, got {byte_range}.")
        return prototype.buffer.from_bytes(os.pread(fd, max(0, b - a), a) if b > a else b"")
    finally:
        os.close(fd)


class FolderStore(zarr.storage.LocalStore):
    """Zarr's :class:`~zarr.storage.LocalStore` with the two rules a store folder needs here:

    * **reads** open regular files only (:func:`open_regular`: a FIFO, device, directory or symlink loop in
      place of a store file raises :class:`CorruptStoreError` instead of blocking or raising ``OSError``);
    * **writes** go to a temp file in the same directory (named by :func:`_temp_path`: host, pid, random)
      that is then renamed over the target (``os.replace``), so a reader sees the old file or the new one,
      never a torn one; a create-if-absent write (:meth:`set_if_not_exists`) links the temp file to the
      target, which fails if it exists. A writer killed mid-write leaves only a temp file, which
      :func:`remove_stale_temps` deletes once the writer is provably gone.
    """

    async def get(self, key, prototype=None, byte_range=None):
        if prototype is None:
            prototype = default_buffer_prototype()
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(_read_file, self.root / key, prototype, byte_range)

    def _open_sync(self) -> None:
        if not self._is_open:
            if not self.read_only:
                self.root.mkdir(parents=True, exist_ok=True)
            if not self.root.exists():
                raise FileNotFoundError(f"{self.root} does not exist")
            self._is_open = True

    def get_sync(self, key, *, prototype=None, byte_range=None):
        if prototype is None:
            prototype = default_buffer_prototype()
        self._open_sync()
        return _read_file(self.root / key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        return list(await asyncio.gather(*[asyncio.to_thread(_read_file, self.root / key, prototype, byte_range)
                                           for key, byte_range in key_ranges]))

    def _put_file(self, key: str, value, exclusive: bool = False) -> None:
        self._check_writable()
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        try:
            with open(tmp, "xb") as f:
                f.write(value.as_buffer_like())
            if exclusive:
                os.link(tmp, path)  # FileExistsError when the target exists: the create-if-absent
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    async def set(self, key, value):
        if not self._is_open:
            await self._open()
        await asyncio.to_thread(self._put_file, key, value)

    def set_sync(self, key, value):
        self._open_sync()
        self._put_file(key, value)

    async def set_if_not_exists(self, key, value):
        if not self._is_open:
            await self._open()
        try:
            await asyncio.to_thread(self._put_file, key, value, True)
        except FileExistsError:
            pass


def create_if_absent(store, key: str, data: bytes) -> None:
    """Write object ``key`` only if it does not exist, as atomically as the store allows: a local folder links
    a complete temp file to the name (exclusive); S3 (s3fs) sends a conditional PUT (``If-None-Match: *``);
    any other store uses Zarr's ``set_if_not_exists``, which there is check-then-set (another writer may slip
    in between its check and its write). An existing object is left as it is; callers re-read it to learn
    who won."""
    fs = getattr(store, "fs", None)
    if fs is not None and local_root(store) is None and _protocol(fs) in ("s3", "s3a"):
        path = f"{str(store.path).rstrip('/')}/{key}" if str(store.path).strip("/") else key
        try:
            sync(fs._pipe_file(path, data, mode="create"))
        except TypeError:  # an s3fs without mode="create"
            sync(store.set_if_not_exists(key, as_buffer(data)))
        except OSError as e:  # 412 PreconditionFailed: the object exists (s3fs: FileExistsError, or EINVAL)
            if not isinstance(e, FileExistsError) and "recondition" not in str(e):
                raise
        return
    sync(store.set_if_not_exists(key, as_buffer(data)))


# s3fs defaults that cost round trips on the small objects of a store: a whole-object read with
# max_concurrency > 1 first asks for the size (a HEAD before every GET), and botocore keeps at most 10
# connections, which caps the concurrent range requests of one read_batch/read_all round.
S3_DEFAULTS: dict[str, Any] = {"max_concurrency": 1, "config_kwargs": {"max_pool_connections": 64}}


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

    fs = getattr(store, "fs", None)
    try:
        if fs is not None:
            return {k: int(v.get("size") or 0) for k, v in _listing(store).items()}

        async def collect():
            keys = [k async for k in store.list_prefix("")]
            return {k: await store.getsize(k) for k in keys}

        return sync(collect())
    except Exception as e:
        raise storage_error(e, store) from None


def _listing(store, under: str = "") -> dict[str, dict]:
    """Every object of an fsspec store (under the store-relative prefix ``under``) with the details its
    listing gives (size, ETag, ...), keyed relative to the store root: one recursive listing (``find``;
    S3: 1,000 keys per request), never a cached one."""

    return sync(_alisting(store, under))


async def _alisting(store, under: str = "") -> dict[str, dict]:
    """:func:`_listing` for a caller already on Zarr's event loop."""
    fs = store.fs
    base = str(store.path).rstrip("/")
    top = "/".join(p for p in (base, under.strip("/")) if p)
    fs.invalidate_cache(top)  # a listing cached before this process (or another) wrote would miss objects
    found = await fs._find(top, detail=True, withdirs=False)
    return {k[len(base) + 1:] if base else k: v for k, v in found.items() if v.get("type", "file") != "directory"}


def is_empty(store) -> bool:
    """True when the store holds no object (a missing folder or prefix counts as empty)."""
    root = local_root(store)
    if root is not None:
        return not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root))

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

        shutil.rmtree(root, ignore_errors=True)
        return

    try:
        sync(store.delete_dir(""))
    except Exception as e:
        raise storage_error(e, store) from None


def local_root(store) -> str | None:
    """The folder of a local store (where the fast ``os.pread`` path applies), else None."""

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
            self._zarr_store = _caching_store_class()(inner, self)
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
            found = await _alisting(store, self.inner.prefix)
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


_CACHING_STORE = None


def _caching_store_class():
    """:class:`zarr.storage.WrapperStore` whose ``get`` goes through a :class:`CachedSource` (defined on first
    use: this module imports Zarr lazily)."""
    global _CACHING_STORE
    if _CACHING_STORE is None:

        class CachingStore(WrapperStore):
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

        _CACHING_STORE = CachingStore
    return _CACHING_STORE


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


# ------------------------------------------------------------------------------------------- store I/O


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """Member ``name`` of ``group``, an array: KeyError when it is absent (as ``group[name]``),
    :class:`~fkdstore.errors.FormatError` naming it when it is a group."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise FormatError(f"{describe(group.store)}: {name!r} must be an array. Got a group.")
    return node


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """The whole array ``name`` of ``group`` as numpy (:func:`zarr_array`)."""
    return np.asarray(zarr_array(group, name)[:])


def get_bytes(store, key: str) -> bytes | None:
    """The whole object ``key`` of a Zarr store, None when absent."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def as_buffer(data: bytes):
    """``data`` as a Zarr buffer (what ``store.set`` takes)."""
    return default_buffer_prototype().buffer.from_bytes(data)


def list_dir(store, prefix: str) -> list[str]:
    """Names directly under ``prefix`` of a Zarr store."""
    async def collect():
        return [k async for k in store.list_dir(prefix)]

    return sync(collect())


def list_prefix(store, prefix: str) -> list[str]:
    """Every key starting with ``prefix`` of a Zarr store."""
    async def collect():
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def read_group_json(store) -> dict | None:
    """The root ``zarr.json`` as a dict, None if absent; FormatError naming the location if unreadable."""
    try:
        raw = get_bytes(store, "zarr.json")
    except OSError as e:
        raise OSError(e.errno, f"{describe(store)}/zarr.json: cannot read ({e.strerror or e})") from e
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{describe(store)}/zarr.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{describe(store)}/zarr.json must hold a JSON object. Got {type(meta).__name__}.")
    return meta


def fsync_local(store, keys: Sequence[str]) -> None:
    """fsync the files of ``keys`` and their directories (local stores only; object-store PUTs are durable)."""
    root = local_root(store)
    if root is None:
        return
    dirs = set()
    for key in keys:
        path = os.path.join(root, key)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        d = os.path.dirname(path)
        while len(d) >= len(root):  # new directories of a first write must reach the disk too
            dirs.add(d)
            d = os.path.dirname(d)
    for d in sorted(dirs, key=len, reverse=True):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
