"""Test helpers that convert stores between format 1.0 and 2.0 (the writer writes 2.0; ``to_v1`` makes the
1.0 stores fkdstore 0.1 wrote, so every reader rule is tested on both), edit headers, re-encode chunk keys
and rewrite shard indexes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from fkdstore import codecs as _codecs
from fkdstore import schema as S


def to_v1(path) -> S.Header:
    """Rewrite the 2.0 store at ``path`` in place as fkdstore 0.1 wrote format 1.0: ``image_key`` (string)
    instead of ``key``, one float32 ``aug`` array (N, M, A) instead of ``aug/<name>``, no manifest, no
    checksum. Returns the 1.0 header."""
    path = Path(path)
    g = zarr.open_group(str(path), mode="r+")
    new = S.Header.from_json(g.attrs[S.ATTR_KEY])
    if new.major < 2:
        return new
    N, M = new.num_images, new.crops_per_image
    small = [ZstdCodec(level=3), Crc32cCodec()]
    keys = S.decode_keys(g[S.KEY][:])
    g.create_array(S.IMAGE_KEY, shape=(N,), dtype=str, chunks=(min(N, S.PER_IMAGE_CHUNK),),
                   compressors=small)[:] = np.asarray(keys, dtype=object)
    shutil.rmtree(path / S.KEY)
    shutil.rmtree(path / S.MANIFEST)
    if new.aug:
        block = np.stack([g[S.aug_path(a.name)][:].astype(np.float32) for a in new.aug], -1)
        shutil.rmtree(path / S.AUG)
        g = zarr.open_group(str(path), mode="r+")
        arr = g.create_array(S.AUG, shape=(N, M, len(new.aug)), dtype="float32",
                             chunks=(new.images_per_chunk, M, len(new.aug)),
                             shards=(new.images_per_shard, M, len(new.aug)), fill_value=0, write_data=False,
                             compressors=[BloscCodec(typesize=4, **S.COMPRESSOR), Crc32cCodec()])
        with zarr.config.set({"array.write_empty_chunks": True}):
            arr[:] = block
    old = S.Header(
        num_images=N, crops_per_image=M, num_classes=new.num_classes, codec=dict(new.codec),
        images_per_chunk=new.images_per_chunk, images_per_shard=new.images_per_shard, box_dtype=new.box_dtype,
        aug=[{"name": a.name, "kind": a.kind} for a in new.aug], has_labels=new.has_labels,
        meta=dict(new.meta), library_version="0.1.0", format_version="1.0",
    )
    g.attrs[S.ATTR_KEY] = old.to_json()
    return old


def set_header(path, **changes) -> None:
    """Edit header fields in zarr.json WITHOUT recomputing the checksum (simulates a hand edit)."""
    zj = Path(path) / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["attributes"][S.ATTR_KEY].update(changes)
    zj.write_text(json.dumps(doc))


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
