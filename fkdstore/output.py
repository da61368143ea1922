"""Destinations of the commands that create a store from other data (convert, prune, ensemble and the
importers): the one home of the rules for the output location and its provenance record.

The rule (:func:`open_destination`):

* a destination must differ from every source;
* a store there that this command left incomplete, with the same sources and parameters (its
  ``meta["made_by"]`` equals this run's :func:`made_by` record: a run killed, or stopped by Ctrl-C), is
  **continued**: the writer re-opens it and the command writes only the images not yet written, so the result
  equals an uninterrupted run's (on a complete one the rerun writes nothing: reruns are idempotent);
* a creation killed before the store's header was written is removed first (it is not a store yet);
* anything else that is not empty is refused (:class:`ValidationError`), whatever made it.

A run that fails with an error removes its output (:func:`remove_on_error`); a kill or Ctrl-C leaves it for a
rerun to continue. Each run appends a :func:`history_record` to the output's ``meta["history"]`` (volatile:
a continued run keeps the first run's).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from . import schema as _schema
from . import storage as _storage
from .errors import ValidationError
from .writer import clear_interrupted_creation

__all__ = ["history_record", "location_name", "check_destination", "remove_on_error", "check_options", "MADE_BY",
           "made_by", "open_destination", "source_identity"]

MADE_BY = "made_by"  # meta key: the command, sources and parameters that produced the store (compared on resume)


def history_record(op: str, **items: Any) -> dict[str, Any]:
    """One ``meta["history"]`` entry: ``{"op", **items, "at" (UTC ISO time), "library_version"}``."""
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
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


def source_identity(header) -> str:
    """What identifies a source store's content in a :func:`made_by` record: its ``store_id`` (4.0) and header
    checksum (a 1.0 store has neither: a digest of its parsed header), so another store at the same path is
    another source."""
    sid, checksum = getattr(header, "store_id", ""), getattr(header, "checksum", "")
    if not sid and not checksum:
        return "header-sha256:" + hashlib.sha256(repr(header).encode()).hexdigest()[:32]
    return f"{sid}:{checksum}"


def made_by(op: str, **params: Any) -> dict[str, Any]:
    """The ``meta["made_by"]`` record of a command's output: ``{"op", **params}`` (sources, their identities,
    the parameters that decide the output), as standard JSON. No times or counts: a rerun of the same command
    makes the same record, which is how :func:`open_destination` recognises its own output."""
    record = json.loads(json.dumps({"op": op, **params}))
    _schema.check_json(record, "made_by")
    return record


def open_destination(dst: Any, dst_store: Any, record: dict[str, Any], *sources: Any) -> bool:
    """Apply the destination rule (module docstring) before a command writes ``dst``: True when ``dst`` holds
    this command's own output (same :func:`made_by` ``record``), to be continued; False when it is new or
    empty; :class:`ValidationError` otherwise (and when ``dst`` is one of ``sources``)."""
    for src in sources:
        if location_name(dst).rstrip("/") == location_name(src).rstrip("/"):
            raise ValidationError(f"destination must differ from the source. Got {dst} for both.")
    _storage.remove_stale_temps(dst_store)
    clear_interrupted_creation(dst_store)  # a run killed before the header: not a store yet, removed
    group = _storage.read_group_json(dst_store)
    header = ((group or {}).get("attributes") or {}).get(_schema.ATTR_KEY)
    if isinstance(header, dict) and (header.get("meta") or {}).get(MADE_BY) == record:
        return True
    if not _storage.is_empty(dst_store):
        made = (header.get("meta") or {}).get(MADE_BY) if isinstance(header, dict) else None
        why = f" (it was made by {made.get('op')!r} with other sources or parameters)" if isinstance(made, dict) \
            else ""
        raise ValidationError(f"destination {dst} exists and is not empty{why}; choose a new path")
    return False


@contextlib.contextmanager
def remove_on_error(dst_store: Any) -> Iterator[None]:
    """Delete the output ``dst_store`` if the block raises an error (it could not be completed); a
    ``KeyboardInterrupt`` or ``SystemExit`` leaves it for a rerun to continue (:func:`open_destination`)."""
    try:
        yield
    except Exception:
        _storage.remove_all(dst_store)
        raise


def check_options(storage_options: Any, *locations: Any) -> None:
    """``storage_options`` need at least one URL among ``locations`` (as :func:`fkdstore.storage.as_store`)."""
    if storage_options and not any(_storage.is_url(x) for x in locations):
        raise TypeError(f"storage_options apply to URLs only. Got local paths {[str(x) for x in locations]}.")
