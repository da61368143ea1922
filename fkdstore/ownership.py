"""One writer per shard: ownership records ``owners/<shard>.json`` (spec section 8), the one home of the rule.

A writer records itself in :data:`OWNERS`/``<shard>.json`` before it buffers a shard, re-reads the record before
writing the shard's data and again before its flags, and raises
:class:`~fkdstore.errors.ConcurrentWriterError` if another writer owns the shard. Writers of disjoint shards
never touch each other's records. :func:`claim_rule` says when a record left by a killed writer may be taken
over. Under its ownership a writer also re-reads the shard's ``written`` flags (when it takes the shard, and
again before it writes the shard's data), so images another writer completed are kept, never replaced
(:class:`fkdstore.writer.Writer`).

Exclusivity: a record is created with :func:`fkdstore.storage.create_if_absent`: exclusive on a local folder
(a link that fails if the name exists) and on S3 (a conditional PUT, ``If-None-Match: *``); on other object
stores it is check-then-set. What remains, on every store: renewing a record and taking over a stale one
(deleted, then created again) are not conditional, and each check is followed by the write it guards, so a
writer that stalls between them for longer than :data:`OWNER_LEASE_S` (its record then stale) can write
after another took the shard over; the re-read of the flags before the data then keeps the other writer's
images or refuses (:class:`~fkdstore.errors.ConcurrentWriterError`), and the window left is that writer's own
stall.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import Any

from zarr.core.sync import sync

from . import storage
from .errors import ConcurrentWriterError

__all__ = ["OWNERS", "OWNER_LEASE_S", "Owners", "claim_rule"]

OWNERS = "owners"  # store prefix of the ownership records: owners/<shard>.json (not a Zarr node)
OWNER_LEASE_S = 900.0  # a record not renewed for this long may be taken over from any host


def claim_rule(record: Mapping[str, Any] | None, token: str, now: float) -> str:
    """What a writer holding ``token`` may do with a shard's ownership record at time ``now``:

    * ``"ours"``: the record carries our token;
    * ``"free"``: there is no record, or it is unreadable (a writer killed while writing it), or it is stale:
      written on this host by a process that is no longer running, or not renewed for :data:`OWNER_LEASE_S`
      seconds (owners renew on every put into the shard at least every quarter lease; clocks of hosts
      sharing a store are assumed to agree within minutes);
    * ``"taken"``: another live writer owns it.
    """
    if not isinstance(record, Mapping) or not isinstance(record.get("token"), str):
        return "free"
    if record["token"] == token:
        return "ours"
    renewed = record.get("renewed")
    if not isinstance(renewed, (int, float)) or now - renewed > OWNER_LEASE_S:
        return "free"
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return "free"
        except (PermissionError, OSError):
            pass
    return "taken"


class Owners:
    """Ownership records ``owners/<shard>.json`` of one writer: ``{"token", "host", "pid", "since", "renewed"}``."""

    def __init__(self, store, where: str):
        self.store, self.where = store, where
        self.token = secrets.token_hex(16)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.held: dict[int, float] = {}  # shard -> time we last wrote our record

    def key(self, s: int) -> str:
        return f"{OWNERS}/{s}.json"

    def _read(self, s: int) -> dict | None:
        raw = storage.get_bytes(self.store, self.key(s))
        if raw is None:
            return None
        try:
            rec = json.loads(raw)
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _record(self, since: float, now: float) -> bytes:
        return json.dumps({"token": self.token, "host": self.host, "pid": self.pid, "since": since,
                           "renewed": now}).encode()

    def _refuse(self, s: int, rec: Mapping, doing: str) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"shard {s} of {self.where} is owned by another writer (host {rec.get('host')!r}, pid "
            f"{rec.get('pid')!r}, record {self.key(s)}); refusing to {doing}. Two writers on one shard lose data: "
            f"give each process disjoint shards. If that writer is dead, its record expires {OWNER_LEASE_S:.0f} s "
            f"after its last renewal, or delete {self.key(s)}."
        )

    def claim(self, s: int) -> None:
        """Own shard ``s`` (create, renew or take over our record) or raise ConcurrentWriterError."""
        now = time.time()
        last = self.held.get(s)
        if last is not None and now - last < OWNER_LEASE_S / 4:
            return
        for _ in range(3):
            rec = self._read(s)
            state = claim_rule(rec, self.token, now)
            if state == "taken":
                raise self._refuse(s, rec or {}, "buffer images for it")
            if state == "ours" and rec is not None:
                since = rec.get("since", now)
                sync(self.store.set(self.key(s), storage.as_buffer(self._record(since, now))))
                self.held[s] = now
                return
            if rec is not None:  # stale: remove, then race any other taker through an exclusive create
                sync(self.store.delete(self.key(s)))
            storage.create_if_absent(self.store, self.key(s), self._record(now, now))
            now = time.time()
        rec = self._read(s) or {}
        if claim_rule(rec, self.token, now) != "ours":
            raise self._refuse(s, rec, "buffer images for it")
        self.held[s] = now

    def check(self, s: int, doing: str) -> None:
        """Raise ConcurrentWriterError unless our record still owns shard ``s`` (re-created if it vanished)."""
        rec = self._read(s)
        if rec is None:
            storage.create_if_absent(self.store, self.key(s), self._record(time.time(), time.time()))
            rec = self._read(s)
        if rec is None or claim_rule(rec, self.token, time.time()) != "ours" or rec.get("token") != self.token:
            raise self._refuse(s, rec or {}, doing)

    def release(self, s: int) -> None:
        """Delete our record of shard ``s`` (after it is complete, or at close)."""
        if self.held.pop(s, None) is None:
            return
        rec = self._read(s)
        if rec is not None and rec.get("token") == self.token:
            sync(self.store.delete(self.key(s)))

    def drop_stale(self, complete: set[int]) -> None:
        """Delete stale records (see :func:`_claim_rule`) of complete shards: a writer killed after a shard's
        flags but before releasing its record leaves one that no resume would otherwise touch."""
        now = time.time()
        for key in storage.list_dir(self.store, OWNERS):
            stem = key[:-len(".json")] if key.endswith(".json") else ""
            s = int(stem) if stem.isdigit() else -1
            if s in complete and claim_rule(self._read(s), self.token, now) == "free":
                sync(self.store.delete(self.key(s)))

    def release_all(self) -> None:
        for s in sorted(self.held):
            self.release(s)
        root = storage.local_root(self.store)
        if root is not None:
            try:
                os.rmdir(os.path.join(root, OWNERS))  # only if empty: other writers' records stay
            except OSError:
                pass
