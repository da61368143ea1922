"""Destinations of the commands that create a store from other data (convert, prune, ensemble and the
importers): the one home of the rules for the output location and its provenance record.

A destination must be new or empty, and must differ from every source; a run that fails removes what it
created (never anything that was there before); each run appends a :func:`history_record` to the output's
``meta["history"]``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import storage as _storage
from .errors import ValidationError

__all__ = ["history_record", "location_name", "check_destination", "remove_on_error", "check_options"]


def history_record(op: str, **items: Any) -> dict[str, Any]:
    """One ``meta["history"]`` entry: ``{"op", **items, "at" (UTC ISO time), "library_version"}``."""
    from . import __version__

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"op": op, **items, "at": now, "library_version": __version__}


def location_name(location: Any) -> str:
    """A location as recorded in ``meta["history"]``: the URL, or the absolute path."""
    return str(location) if _storage.is_url(location) else str(Path(location).resolve())


def check_destination(dst: Any, dst_store: Any, *sources: Any) -> None:
    """Refuse a destination that is one of ``sources`` or exists and is not empty (ValidationError)."""
    for src in sources:
        if location_name(dst).rstrip("/") == location_name(src).rstrip("/"):
            raise ValidationError(f"destination must differ from the source. Got {dst} for both.")
    if not _storage.is_empty(dst_store):
        raise ValidationError(f"destination {dst} exists and is not empty; choose a new path")


@contextlib.contextmanager
def remove_on_error(dst_store: Any) -> Iterator[None]:
    """Delete the new output ``dst_store`` (which :func:`check_destination` found absent or empty) if the
    block raises."""
    try:
        yield
    except BaseException:
        _storage.remove_all(dst_store)
        raise


def check_options(storage_options: Any, *locations: Any) -> None:
    """``storage_options`` need at least one URL among ``locations`` (as :func:`fkdstore.storage.as_store`)."""
    if storage_options and not any(_storage.is_url(x) for x in locations):
        raise TypeError(f"storage_options apply to URLs only. Got local paths {[str(x) for x in locations]}.")
