"""Where a store lives: a local folder or a URL (``s3://``, ``gs://``, ``memory://``, ...), through Zarr's
own store layer (:class:`zarr.storage.LocalStore` for paths, :class:`zarr.storage.FsspecStore` for URLs).

Every entry point that takes a store location (``open``, ``write``, ``generate``, ``TorchDataset``, the CLI)
calls :func:`as_store`; nothing else in fkdstore parses paths or URLs. Credentials come the usual way for
the scheme (environment, profiles) or through ``storage_options`` (passed to fsspec).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .errors import FormatError

__all__ = ["as_store", "is_url", "local_root", "describe"]


def is_url(location: Any) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which is a local path)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def as_store(location: str | os.PathLike, *, read_only: bool, storage_options: Mapping[str, Any] | None = None):
    """A Zarr v3 store for a local path or a URL. ``storage_options`` are only valid with a URL."""
    import zarr.abc.store
    import zarr.storage

    if isinstance(location, zarr.abc.store.Store):
        return location
    if is_url(location):
        try:
            return zarr.storage.FsspecStore.from_url(
                str(location), storage_options=dict(storage_options or {}), read_only=read_only
            )
        except ImportError as e:
            raise FormatError(f"{location}: reading this URL needs an fsspec filesystem package ({e})") from None
    if storage_options:
        raise TypeError(f"storage_options apply to URLs only. Got a local path {str(location)!r}.")
    path = str(location)[len("file://"):] if str(location).startswith("file://") else location
    return zarr.storage.LocalStore(Path(path), read_only=read_only)


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
    fs = getattr(store, "fs", None)
    proto = getattr(fs, "protocol", None)
    proto = proto[0] if isinstance(proto, (tuple, list)) else proto
    return f"{proto}://{path}" if proto else str(store)
