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
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.abc.store
import zarr.storage
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import CorruptStoreError, FormatError, StorageError

__all__ = ["as_store", "is_url", "local_root", "describe", "check_reachable", "storage_error", "options_for",
           "object_sizes", "alisting", "is_empty", "remove_all", "open_regular", "get_bytes", "as_buffer", "list_dir",
           "list_prefix", "read_group_json", "fsync_local", "zarr_array", "read_array", "FolderStore",
           "create_if_absent", "remove_stale_temps", "is_temp_name", "MAX_METADATA_BYTES"]

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
    """:func:`alisting` for a caller outside Zarr's event loop."""

    return sync(alisting(store, under))


async def alisting(store, under: str = "") -> dict[str, dict]:
    """Every object of an fsspec store (under the store-relative prefix ``under``) with the details its
    listing gives (size, ETag, ...), keyed relative to the store root: one recursive listing (``find``;
    S3: 1,000 keys per request), never a cached one. A coroutine, for a caller on Zarr's event loop."""
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
