"""Test helpers that damage or edit stores the way a tool or an attacker would: edit headers (with or
without a valid checksum), re-encode chunk keys, rewrite shard indexes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from fkdstore import schema as S


def header(path) -> dict:
    """The header object of the store at ``path`` (as stored)."""
    return json.loads((Path(path) / "zarr.json").read_text())["attributes"][S.ATTR_KEY]


def set_header(path, *, checksum: bool = False, **changes) -> None:
    """Edit header fields in zarr.json; keys may be dotted paths into nested objects (``"layout.images_per_chunk"``
    or ``regions__codec`` with ``__``). Without ``checksum`` the checksum is left as it was (a hand edit); with it,
    it is recomputed (an edit by a tool that knows the rule: only other checks can catch it)."""
    zj = Path(path) / "zarr.json"
    doc = json.loads(zj.read_text())
    h = doc["attributes"][S.ATTR_KEY]
    for key, value in changes.items():
        parts = key.replace("__", ".").split(".")
        obj = h
        for part in parts[:-1]:
            obj = obj[part]
        if value is DELETE:
            obj.pop(parts[-1], None)
        else:
            obj[parts[-1]] = value
    if checksum:
        h["checksum"] = S.header_checksum(h)
    zj.write_text(json.dumps(doc))


DELETE = object()  # set_header(path, key=DELETE) removes the key


def use_dot_separator(path) -> None:
    """Re-encode every sharded array's chunk keys with the ``.`` separator (``c.0.0.0``), as another Zarr
    tool may write them: zarr.json's ``chunk_key_encoding`` and the file names both change."""
    path = Path(path)
    for zj in path.rglob("zarr.json"):
        doc = json.loads(zj.read_text())
        if doc.get("node_type") != "array":
            continue
        folder = zj.parent
        doc["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "."}}
        zj.write_text(json.dumps(doc))
        croot = folder / "c"
        if not croot.exists():
            continue
        for f in [p for p in croot.rglob("*") if p.is_file()]:
            rel = f.relative_to(folder).as_posix().replace("/", ".")
            os.replace(f, folder / rel)
        shutil.rmtree(croot)


def shard_file(path, name: str, shard: int = 0) -> Path:
    """Path of shard file ``shard`` of per-crop array ``name`` (default ``/`` key encoding)."""
    ndim = len(json.loads((Path(path) / name / "zarr.json").read_text())["shape"])
    return Path(path) / name / "/".join(["c", str(shard)] + ["0"] * (ndim - 1))


def shard_index(f: Path, per_shard: int) -> np.ndarray:
    """The (per_shard, 2) uint64 (offset, nbytes) index at the end of a shard file (a writable copy)."""
    raw = f.read_bytes()
    return np.frombuffer(raw[-(per_shard * 16 + 4):-4], "<u8").reshape(-1, 2).copy()


def write_shard_index(f: Path, index: np.ndarray) -> None:
    """Replace a shard file's index with ``index`` and a VALID crc32c (so only the reader's rules catch it)."""
    import crc32c

    raw = f.read_bytes()
    body = np.ascontiguousarray(index, "<u8").tobytes()
    f.write_bytes(raw[:-(len(body) + 4)] + body + crc32c.crc32c(body).to_bytes(4, "little"))


def retag(path) -> None:
    """Recompute the manifest from the arrays as stored (spec section 4), as a writer with a bug in its
    values would have written it: the tags then vouch for whatever the arrays hold, so only the semantic
    checks (invariants 4, 5, 11, codec rules) can catch an edit. Stored crops only."""
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    h = S.parse_header(g.attrs[S.ATTR_KEY])
    assert not h.derived_arrays, "retag handles stored crops only"
    ipc, ips, cps, prefix = h.images_per_chunk, h.images_per_shard, h.chunks_per_shard, h.tag_prefix
    names = list(h.record_specs())
    records = np.zeros((h.num_shards * cps, len(names)), np.uint32)
    for p, name in enumerate(names):
        records[:h.num_chunks, p] = S.manifest_tags(name, 0, g[name][:], ipc, prefix)
    written = g[S.WRITTEN][:].astype(bool)
    for s in range(h.num_shards):
        if not written[h.shard_range(s)].any():
            records[s * cps:(s + 1) * cps] = 0
    lead = np.stack([S.manifest_tags(name, 0, g[name][:], ips, prefix, S.PER_IMAGE_FILL[name])
                     for name in S.BOUND_PER_IMAGE], 1)
    g[S.MANIFEST][:] = np.concatenate([lead, records.reshape(h.num_shards, cps * len(names))], 1)
