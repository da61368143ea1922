"""Test helpers that turn a format-1.0 store (what the writer on main writes until writer.py lands) into a
format-2.0 store, and that re-encode chunk keys. Delete ``to_v2`` when the 2.0 writer lands; the tests that
use it can then write 2.0 stores directly."""

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


def to_v2(path) -> S.Header:
    """Rewrite the 1.0 store at ``path`` in place as format 2.0: ``key`` (uint8, zero-padded UTF-8) instead of
    ``image_key``, one ``aug/<name>`` float32 array per aug column instead of ``aug``, the ``manifest`` of
    every chunk, and a checksummed 2.0 header. Returns the new header."""
    path = Path(path)
    g = zarr.open_group(str(path), mode="r+")
    old = S.Header.from_json(g.attrs[S.ATTR_KEY])
    assert old.major == 1
    codec = _codecs.from_config(dict(old.codec))
    N, M = old.num_images, old.crops_per_image
    small = [ZstdCodec(level=3), Crc32cCodec()]
    pc = min(N, S.PER_IMAGE_CHUNK)
    keys = S.encode_keys([str(k) for k in g[S.IMAGE_KEY][:]])
    g.create_array(S.KEY, shape=keys.shape, dtype="uint8", chunks=(pc, keys.shape[1]), compressors=small)[:] = keys
    shutil.rmtree(path / S.IMAGE_KEY)
    if old.aug:
        block = g[S.AUG][:]
        shutil.rmtree(path / S.AUG)
        g = zarr.open_group(str(path), mode="r+")
        g.create_group(S.AUG)
        for j, a in enumerate(old.aug):
            arr = g.create_array(
                S.aug_path(a.name), shape=(N, M), dtype="float32", chunks=(old.images_per_chunk, M),
                shards=(old.images_per_shard, M), fill_value=0, write_data=False,
                compressors=[BloscCodec(typesize=4, **S.COMPRESSOR), Crc32cCodec()],
            )
            with zarr.config.set({"array.write_empty_chunks": True}):
                arr[:] = block[..., j]
    new = S.Header(
        num_images=N, crops_per_image=M, num_classes=old.num_classes, codec=dict(old.codec),
        images_per_chunk=old.images_per_chunk, images_per_shard=old.images_per_shard, box_dtype=old.box_dtype,
        key_length=int(keys.shape[1]), aug=[a.to_json() for a in old.aug], augment=[], has_labels=old.has_labels,
        meta=dict(old.meta), library_version=old.library_version, format_version="2.0",
    )
    specs = new.per_crop_specs(codec)
    tags = np.zeros((new.num_chunks, len(specs)), np.uint32)
    for p, name in enumerate(specs):
        tags[:, p] = S.manifest_tags(name, 0, g[name][:], new.images_per_chunk)
    g.create_array(S.MANIFEST, shape=tags.shape, dtype="uint32", chunks=(new.chunks_per_shard, len(specs)),
                   compressors=small, fill_value=0)[:] = tags
    g.attrs[S.ATTR_KEY] = new.to_json()
    return new


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
