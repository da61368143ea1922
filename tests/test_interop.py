"""Interoperability (issue 15, spec format 4.0 sections 2-4): a store is readable without fkdstore or
zarr-python.

Google TensorStore's ``zarr3`` driver (an independent C++ Zarr v3 implementation) opens EVERY array of a
store of every registered codec (and every probability dtype, and typed augmentation columns) with a
partial last shard, and reads it bit for bit equal to ``fkdstore.open``. The test then does what a third
party would do with the spec alone, implemented here without fkdstore's helpers:

* decode the keys from the uint8 ``key`` array (cut at the first NUL, UTF-8);
* recompute every manifest tag from the TensorStore-read chunks (``crc32c(store_id + path + NUL +
  uint64le(c) + D)``, the partial last chunk padded with the array's ``fill_value``) and find them in the
  stored ``manifest`` (one row per shard: the key, image_size and label chunks of the shard, then every inner
  chunk of every record array);
* walk a shard file by hand (index at the end, crc32c on the index and on each chunk, blosc) and check the
  decoded bytes of the partial chunk (rows past N hold the fill value, as the tag formula assumes);
* flip one payload byte of one inner chunk: TensorStore refuses that chunk (DATA_LOSS, digest mismatch)
  and still reads the others; fkdstore raises CorruptStoreError.
"""
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

ts = pytest.importorskip(
    "tensorstore", reason="TensorStore (PyPI 'tensorstore', in the 'test' extra) is not installed: "
    "the interoperability tests need it")

import crc32c  # noqa: E402
import numcodecs  # noqa: E402
from interop_stores import AUG, CODECS, IPC, IPS, N, make_store  # noqa: E402

import fkdstore  # noqa: E402
from fkdstore.codecs import PROB_DTYPES, REGISTRY  # noqa: E402
from fkdstore.errors import CorruptStoreError  # noqa: E402

CODEC_IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in CODECS]


def test_every_registered_codec_and_dtype_is_covered():
    assert {c["name"] for c in CODECS} == set(REGISTRY), "add a store of the new codec to CODECS"
    assert {c["dtype"] for c in CODECS if "dtype" in c} == set(PROB_DTYPES)


# -------------------------------------------------------------------------------- the spec, re-implemented


def spec_keys(key_rows: np.ndarray) -> list[str]:
    """Spec section 2 recipe: take row i, cut at the first zero byte (or keep all L bytes), decode UTF-8."""
    return [bytes(row).split(b"\0", 1)[0].decode("utf-8") for row in key_rows]


def spec_tag(store_id: str, path: str, c: int, chunk: np.ndarray) -> int:
    """Spec invariant 9: crc32c(store id (16 bytes) || utf8(path) || 0x00 || uint64_le(c) || D), D the decoded
    chunk, little-endian C order; ``c`` the chunk's index over the whole array."""
    d = np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))
    return crc32c.crc32c(bytes.fromhex(store_id) + path.encode("utf-8") + b"\0" + struct.pack("<Q", c) + d.tobytes())


BOUND = ["key", "image_size", "label"]  # per-image arrays the manifest binds, one chunk per shard, in this order


def manifest_column(j: int, p: int, P: int) -> int:
    """Column of inner chunk ``j`` (of its shard) of record array ``p`` (of ``P``) in a manifest row."""
    return len(BOUND) + j * P + p


def zarr_json(root: Path, name: str) -> dict:
    return json.loads((root / name / "zarr.json").read_text())


def array_paths(root: Path) -> list[str]:
    """Every array node of the store, found from the zarr.json files alone."""
    out = []
    for meta in sorted(root.rglob("zarr.json")):
        if json.loads(meta.read_text())["node_type"] == "array":
            out.append(meta.parent.relative_to(root).as_posix())
    return out


def ts_open(root: Path, name: str):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / name)}},
                   read=True, open=True).result()


def ts_read(root: Path, name: str) -> np.ndarray:
    return ts_open(root, name).read().result()


def padded_chunks(data: np.ndarray, ipc: int, fill) -> np.ndarray:
    """(num_chunks, ipc, ...) inner chunks of ``data`` (rows = images), the last one padded with ``fill``."""
    n = math.ceil(len(data) / ipc)
    out = np.full((n * ipc, *data.shape[1:]), fill, data.dtype)
    out[: len(data)] = data
    return out.reshape(n, ipc, *data.shape[1:])


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{what}: bits differ"


@pytest.fixture(scope="module", params=CODECS, ids=CODEC_IDS)
def store(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "s.zarr"
    inputs = make_store(path, request.param, wide=CODECS.index(request.param) % 2 == 1)
    return path, inputs


def ours(path: Path) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """What fkdstore's reader returns for every array: ({path: values}, image keys, per-crop paths)."""
    with fkdstore.open(path) as r:
        rec = r.read_all()
        out = {"image_size": r.image_sizes, "label": r.labels, "written": r.written,
               "box": rec.box, "flip": rec.flip}
        out.update({f"aug/{k}": v for k, v in rec.aug.items()})
        out.update({f"soft/{k}": v for k, v in rec.fields.items()})
        return out, r.image_keys, list(r.per_crop_arrays)


# -------------------------------------------------------------------------------------------------- tests


def test_tensorstore_reads_every_array_like_fkdstore(store):
    path, inputs = store
    mine, keys, per_crop = ours(path)
    header = json.loads((path / "zarr.json").read_text())["attributes"]["fkdstore"]
    names = array_paths(path)
    assert set(names) == {"key", "manifest", *mine}, "arrays of the store != what fkdstore reads + key + manifest"
    for name in names:
        got = ts_read(path, name)
        if name == "key":
            assert got.dtype == np.uint8 and got.shape == (N, header["key_length"])
            assert spec_keys(got) == keys == inputs["keys"]
        elif name == "written":  # the reader returns flags as bool; stored as uint8 0/1
            assert got.dtype == np.uint8 and set(np.unique(got)) == {1}
            assert_bits_equal(got.astype(bool), mine[name], name)
        elif name != "manifest":  # the manifest is checked against recomputed tags below
            assert_bits_equal(got, mine[name], name)
    assert_bits_equal(ts_read(path, "label"), inputs["labels"].astype(np.int32), "label vs input")
    assert header["kind"] == "regions" and header["regions"]["crops"] == {"mode": "stored"}
    assert_bits_equal(ts_read(path, "box"), inputs["boxes"].astype(header["regions"]["box_dtype"]), "box vs input")
    for k, v in inputs["aug"].items():
        assert_bits_equal(ts_read(path, f"aug/{k}"), v, f"aug/{k} vs input")
    # manifest order (spec section 2): box, flip, aug columns in header order, codec fields
    assert per_crop[:2 + len(AUG)] == ["box", "flip", *(f"aug/{a[0]}" for a in AUG)]


def test_manifest_tags_recomputed_from_tensorstore_chunks(store):
    """A third party verifies position binding (invariant 9) with TensorStore and crc32c only."""
    path, _ = store
    mine, _, per_crop = ours(path)
    header = json.loads((path / "zarr.json").read_text())["attributes"]["fkdstore"]
    sid, P, cps = header["store_id"], len(per_crop), IPS // IPC
    shards = math.ceil(N / IPS)
    manifest = ts_read(path, "manifest")
    assert manifest.dtype == np.uint32 and manifest.shape == (shards, len(BOUND) + cps * P)
    for b, name in enumerate(BOUND):  # per-image arrays: one chunk per shard, tagged first in each row
        meta = zarr_json(path, name)
        assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == IPS, name
        chunks = padded_chunks(ts_read(path, name), IPS, meta["fill_value"])
        assert [spec_tag(sid, name, s, chunk) for s, chunk in enumerate(chunks)] == manifest[:, b].tolist(), name
    for p, name in enumerate(per_crop):
        meta = zarr_json(path, name)
        (shard,) = meta["codecs"]
        ipc = shard["configuration"]["chunk_shape"][0]
        chunks = padded_chunks(ts_read(path, name), ipc, meta["fill_value"])
        for c, chunk in enumerate(chunks):
            s, j = divmod(c, cps)
            assert spec_tag(sid, name, c, chunk) == manifest[s, manifest_column(j, p, P)], f"{name} chunk {c}"
        for c in range(len(chunks), shards * cps):  # chunks past N (the last shard's) hold no tag
            s, j = divmod(c, cps)
            assert manifest[s, manifest_column(j, p, P)] == 0, f"{name} chunk {c} past N"
        # a chunk's tag depends on its position, its array and its store: moved or mixed data would not verify
        want = manifest[0, manifest_column(0, p, P)]
        assert spec_tag(sid, name, 1, chunks[0]) != want
        assert spec_tag(sid, "x" + name, 0, chunks[0]) != want
        assert spec_tag("f" * 32 if sid != "f" * 32 else "0" * 32, name, 0, chunks[0]) != want


def read_shard_chunk(root: Path, name: str, shard: int, inner: int) -> tuple[bytes, np.ndarray]:
    """Inner chunk ``inner`` of shard ``shard`` of a per-crop array, decoded by hand from the spec's pipeline
    (section 3): index at the end ((offset, nbytes) uint64le per chunk + crc32c), chunk = blosc + crc32c."""
    meta = zarr_json(root, name)
    (shard_codec,) = meta["codecs"]
    cfg = shard_codec["configuration"]
    assert cfg["index_location"] == "end"
    assert [c["name"] for c in cfg["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
    sep = meta["chunk_key_encoding"]["configuration"]["separator"]
    ndim = len(meta["shape"])
    blob = (root / name / sep.join(["c", str(shard)] + ["0"] * (ndim - 1))).read_bytes()
    per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // cfg["chunk_shape"][0]
    index = blob[-(16 * per_shard + 4):]
    assert struct.unpack("<I", index[-4:])[0] == crc32c.crc32c(index[:-4]), "shard index crc32c"
    offset, nbytes = struct.unpack_from("<QQ", index, 16 * inner)
    raw = blob[offset:offset + nbytes]
    assert struct.unpack("<I", raw[-4:])[0] == crc32c.crc32c(raw[:-4]), "chunk crc32c"
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    decoded = numcodecs.Blosc().decode(raw[:-4])
    return blob, np.frombuffer(decoded, dtype).reshape(cfg["chunk_shape"])


def test_partial_chunk_stored_bytes_hold_the_fill_value(store):
    """The manifest formula hashes rows past N as the fill value: the stored partial chunk holds exactly that,
    so a verifier working on raw chunks (no array bounds) gets the same tags."""
    path, _ = store
    _, _, per_crop = ours(path)
    sid = json.loads((path / "zarr.json").read_text())["attributes"]["fkdstore"]["store_id"]
    manifest = ts_read(path, "manifest")
    last_shard, last_inner = (N - 1) // IPS, ((N - 1) % IPS) // IPC
    c = (N - 1) // IPC
    for p, name in enumerate(per_crop):
        _, chunk = read_shard_chunk(path, name, last_shard, last_inner)
        rows = N - c * IPC
        assert (chunk[rows:] == zarr_json(path, name)["fill_value"]).all(), name
        col = manifest_column(last_inner, p, len(per_crop))
        assert spec_tag(sid, name, c, chunk) == manifest[last_shard, col], name


@pytest.mark.parametrize("target,where", [("box", "payload"), ("soft", "payload"), ("box", "index")])
def test_flipped_byte_is_refused_by_tensorstore(store, tmp_path, target, where):
    """One flipped bit in an inner chunk's payload (or in the shard index): TensorStore refuses it
    (DATA_LOSS, digest mismatch) and still reads every other chunk; fkdstore raises CorruptStoreError."""
    path, _ = store
    copy = tmp_path / "s.zarr"
    shutil.copytree(path, copy)
    _, _, per_crop = ours(copy)
    name = next(n for n in per_crop if n.split("/")[0] == target)
    shard, inner = 1, 2  # images 24..27
    blob, _ = read_shard_chunk(copy, name, shard, inner)
    index_at = len(blob) - (16 * (IPS // IPC) + 4)
    offset, nbytes = struct.unpack_from("<QQ", blob, index_at + 16 * inner)
    bad = bytearray(blob)
    if where == "payload":
        bad[offset + nbytes // 2] ^= 0x10  # inside the blosc payload, not the checksum
        a, b = shard * IPS + inner * IPC, shard * IPS + (inner + 1) * IPC  # the damaged chunk's images
    else:
        bad[index_at + 16 * inner] ^= 0x01  # the chunk's offset in the index: the index checksum fails
        a, b = shard * IPS, (shard + 1) * IPS  # the whole shard
    ndim = len(zarr_json(copy, name)["shape"])
    (copy / name / "/".join(["c", str(shard)] + ["0"] * (ndim - 1))).write_bytes(bytes(bad))

    t = ts_open(copy, name)
    with pytest.raises(ValueError, match=r"DATA_LOSS.*[Dd]igest mismatch"):
        t[a:b].read().result()
    good = ts_read(path, name)
    assert_bits_equal(t[:a].read().result(), good[:a], "chunks before the damaged one")  # damage stays local
    assert_bits_equal(t[b:].read().result(), good[b:], "chunks after the damaged one")
    with fkdstore.open(copy) as r:
        with pytest.raises(CorruptStoreError):
            r.read(a + 1)
        rec = r.read(a - 1)  # the image just before the damaged data still reads
        assert_bits_equal(rec.box if name == "box" else rec.fields[name.split("/", 1)[1]], good[a - 1], "neighbour")
