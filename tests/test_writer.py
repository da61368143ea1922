"""Writer (format 2.0): layout, resume, validation (nothing written on error), manifest, buffering, ownership,
failed flushes, interrupted creation, object storage. Kill -9 tests are in test_faults_writer.py."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from storeutil import create, fill, make_data

import fkdstore
from fkdstore import ownership, report, storage
from fkdstore import schema as S
from fkdstore import writer as W
from fkdstore.codecs import get_codec
from fkdstore.errors import (
    ConcurrentWriterError,
    FormatError,
    IncompleteStoreError,
    SchemaMismatchError,
    ValidationError,
)

REPO = Path(__file__).resolve().parents[1]


def expected_manifest(g, header):
    """The manifest recomputed from the arrays as Zarr reads them (spec section 4): one row per shard, the
    per-image chunk tags, then each inner chunk's tag of each record array (partial last chunk padded)."""
    names = list(header.record_specs())
    ipc, ips, cps, prefix = header.images_per_chunk, header.images_per_shard, header.chunks_per_shard, header.tag_prefix
    records = np.zeros((header.num_shards * cps, len(names)), np.uint32)
    for p, name in enumerate(names):
        records[:header.num_chunks, p] = S.manifest_tags(name, 0, g[name][:], ipc, prefix)
    written = g[S.WRITTEN][:].astype(bool)
    for s in range(header.num_shards):  # a shard never written has no record tags (0)
        if not written[header.shard_range(s)].any():
            records[s * cps:(s + 1) * cps] = 0
    lead = np.stack([S.manifest_tags(name, 0, g[name][:], ips, prefix, S.PER_IMAGE_FILL[name])
                     for name in S.BOUND_PER_IMAGE], 1)
    return np.concatenate([lead, records.reshape(header.num_shards, cps * len(names))], 1)


def stored(path):
    g = zarr.open_group(str(path), mode="r")
    h = S.parse_header(g.attrs[S.ATTR_KEY])
    return g, h


def test_layout_is_standard_zarr_with_crc32c_and_few_files(tmp_path):
    d = make_data(64, 10, 20)
    with create(tmp_path / "s", d, images_per_chunk=4, images_per_shard=32) as w:
        fill(w, d)
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    for name in (S.BOX, S.FLIP, S.soft_path("indices"), S.soft_path("probs")):
        meta = g[name].metadata.to_dict()
        (shard,) = meta["codecs"]
        assert shard["name"] == "sharding_indexed"
        assert [c["name"] for c in shard["configuration"]["codecs"]][-1] == "crc32c"
        assert shard["configuration"]["chunk_shape"][0] == 4
        assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 32
    for name in fkdstore.open(tmp_path / "s").header.per_image_arrays:
        assert g[name].metadata.to_dict()["codecs"][-1]["name"] == "crc32c"
    stats = report.storage_stats(tmp_path / "s")
    assert stats[S.BOX]["files"] == 2  # 64 images / 32 per shard
    assert stats["_total"]["files"] < 30
    attrs = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"][S.ATTR_KEY]
    assert attrs["format_version"] == S.FORMAT_VERSION == "4.0" and attrs["kind"] == "regions"
    assert attrs["regions"]["codec"] == {"name": "ms", "k": 5, "dtype": "float16"}


def test_default_layout_scales():
    ipc, ips = S.default_layout(1_281_167, 200 * 5 * 2)
    assert 1 <= ipc <= 16 and ips % ipc == 0
    assert 1_281_167 / ips < 1000  # a few hundred shard files per array, not millions
    ipc, ips = S.default_layout(1_281_167, 200 * 1000 * 2)  # Full fp16 at M=200: 400 KB per image
    assert -(-1_281_167 // ips) <= S.MAX_SHARDS and ips % ipc == 0
    assert S.default_layout(10, 100) == (S.default_layout(10, 100)[0],) * 2  # tiny store: one shard


def test_bytes_per_crop_ms5_under_24(tmp_path):
    """MS top-5 with integer boxes and flips: <= 24 stored bytes per crop (paper Table 2 stores ~60)."""
    N, M, C = 256, 64, 1000
    rng = np.random.default_rng(0)
    cls = rng.integers(0, C, N)
    logits = rng.normal(0, 1.5, (N, M, C)).astype(np.float32)
    logits[np.arange(N)[:, None], np.arange(M), cls[:, None]] += rng.normal(4, 2, (N, M))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    d = make_data(N, M, 2, max_side=600)
    d["probs"] = p
    d["labels"] = cls
    with create(tmp_path / "s", d, codec=get_codec("ms", k=5)) as w:
        fill(w, d, step=64)
    per_crop = report.storage_stats(tmp_path / "s")["_total"]["bytes"] / (N * M)
    assert per_crop <= 24, per_crop


def test_resume_gives_identical_store(tmp_path):
    d = make_data(30, 4, 9)
    with create(tmp_path / "a", d, images_per_chunk=2, images_per_shard=8) as w:
        fill(w, d)
    w = create(tmp_path / "b", d, images_per_chunk=2, images_per_shard=8)
    fill(w, d, order=[3, 9, 10, 11, 12, 13, 14, 15, 29])
    w.close()
    r = fkdstore.open(tmp_path / "b")
    assert not r.complete
    assert r.missing_ranges() == [(0, 3), (4, 9), (16, 29)]
    w = create(tmp_path / "b", d, images_per_chunk=2, images_per_shard=8)  # re-open: same schema
    assert w.written.sum() == 9
    todo = np.flatnonzero(~w.written)
    fill(w, d, order=todo)
    w.close()
    a, b = fkdstore.open(tmp_path / "a"), fkdstore.open(tmp_path / "b")
    assert b.complete
    for name in a.per_crop_arrays + list(a.header.per_image_arrays):
        np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)


def test_unflushed_images_are_not_written(tmp_path):
    d = make_data(20, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8)
    w.put(np.arange(8), d["boxes"][:8], d["flips"][:8], d["probs"][:8])  # shard 0 complete -> on disk
    w.put(np.arange(8, 10), d["boxes"][8:10], d["flips"][8:10], d["probs"][8:10])  # buffered only
    r = fkdstore.open(tmp_path / "s")
    assert r.written[:8].all() and not r.written[8:].any()  # a crash now loses nothing claimed
    with pytest.raises(IncompleteStoreError, match="image 9 .*has not been written"):
        r.read(9)
    with pytest.raises(IncompleteStoreError):
        r.read_all()
    w.close()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(crops_per_image=5), "crops_per_image"),
        (dict(codec="mr"), "codec"),
        (dict(images_per_shard=16), "images_per_shard"),
        (dict(meta={"teacher": "other"}), "meta"),
        (dict(image_keys=[f"x{i}" for i in range(20)]), "image_key"),
    ],
)
def test_reopen_with_other_schema_refused(tmp_path, change, message):
    d = make_data(20, 4, 6)
    base = dict(num_images=20, crops_per_image=4, num_classes=6, codec="ms", image_keys=d["keys"],
                image_sizes=d["sizes"], labels=d["labels"], images_per_chunk=2, images_per_shard=8,
                meta={"teacher": "t1"})
    with fkdstore.write(tmp_path / "s", **base) as w:
        fill(w, d)
    before = fkdstore.open(tmp_path / "s").array(S.BOX)[:]
    if "codec" in change:
        change = {**change}
        base["codec"] = change.pop("codec")
    with pytest.raises(SchemaMismatchError, match=message):
        fkdstore.write(tmp_path / "s", **{**base, **change})
    np.testing.assert_array_equal(fkdstore.open(tmp_path / "s").array(S.BOX)[:], before)


def test_volatile_meta_may_change_on_resume(tmp_path):
    d = make_data(10, 2, 6)
    kw = dict(images_per_chunk=2, images_per_shard=4)
    create(tmp_path / "s", d, meta={"teacher": "t", "time_taken_s": 1.0}, **kw).close()
    create(tmp_path / "s", d, meta={"teacher": "t", "time_taken_s": 7.0}, **kw).close()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["probs"].__setitem__((0, 0, 0), np.nan), "finite|NaN|nan"),
        (lambda d: d["probs"].__setitem__((1, 0, 0), np.inf), "finite|inf"),
        (lambda d: d["probs"].__setitem__((0, 1, slice(None)), np.r_[-0.5, 1.5, np.zeros(4)]), ">= 0|negative"),
        (lambda d: d["probs"].__setitem__((0, 1), d["probs"][0, 1] * 1.2), "sum"),
        (lambda d: d["boxes"].__setitem__((1, 1, 2), 0), "height, width >= 1"),
        (lambda d: d["boxes"].__setitem__((0, 0, 0), 10_000), "inside the image"),
        (lambda d: d["boxes"].__setitem__((0, 0, 1), -1), "inside the image"),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, mutate, message):
    d = make_data(8, 3, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=4)
    bad = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
    mutate(bad)
    with pytest.raises(ValidationError, match=message):
        w.put(np.arange(4), bad["boxes"][:4], bad["flips"][:4], bad["probs"][:4])
    assert not w._buffers and not w.written.any()
    w.close()
    assert not fkdstore.open(tmp_path / "s").written.any()


def test_shape_and_index_errors(tmp_path):
    d = make_data(8, 3, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=4)
    with pytest.raises(ValidationError, match=r"probs must have shape \(B, M, C\) = \(2, 3, 6\)"):
        w.put([0, 1], d["boxes"][:2], d["flips"][:2], d["probs"][:2, :, :5])
    with pytest.raises(ValidationError, match="out of range"):
        w.put([8], d["boxes"][:1], d["flips"][:1], d["probs"][:1])
    with pytest.raises(ValidationError, match="must not repeat"):
        w.put([1, 1], d["boxes"][:2], d["flips"][:2], d["probs"][:2])
    with pytest.raises(TypeError, match="boxes must be an integer array"):
        w.put([0], d["boxes"][:1].astype(float), d["flips"][:1], d["probs"][:1])
    with pytest.raises(ValidationError, match="declares no aug"):
        w.put([0], d["boxes"][:1], d["flips"][:1], d["probs"][:1], aug=np.zeros((1, 3, 1)))


def test_creation_errors(tmp_path):
    d = make_data(5, 2, 4)
    with pytest.raises(ValidationError, match="unique.*appears more than once"):
        fkdstore.write(tmp_path / "a", num_images=5, crops_per_image=2, num_classes=4, codec="ms",
                       image_keys=["a", "b", "a", "c", "d"], image_sizes=d["sizes"])
    with pytest.raises(ValidationError, match="k"):
        fkdstore.write(tmp_path / "b", num_images=5, crops_per_image=2, num_classes=4, codec=get_codec("ms", k=5),
                       image_keys=d["keys"], image_sizes=d["sizes"])
    with pytest.raises(ValidationError, match="labels must be in"):
        fkdstore.write(tmp_path / "c", num_images=5, crops_per_image=2, num_classes=4, codec="hard",
                       image_keys=d["keys"], image_sizes=d["sizes"], labels=[0, 1, 2, 3, 4])
    with pytest.raises(ValidationError, match="image_sizes must be an integer array of shape"):
        fkdstore.write(tmp_path / "d", num_images=5, crops_per_image=2, num_classes=4, codec="hard",
                       image_keys=d["keys"], image_sizes=d["sizes"][:4])
    for p in ("a", "b", "c", "d"):
        assert not (tmp_path / p).exists()  # nothing written
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "precious.txt").write_text("x")
    with pytest.raises(ValidationError, match="not an fkdstore store; refusing to overwrite"):
        create(tmp_path / "e", d, codec="hard")


def test_aug_parameters(tmp_path):
    d = make_data(6, 2, 6)
    w = create(tmp_path / "s", d, aug=["brightness", ("erase", "bool")], images_per_chunk=2, images_per_shard=2)
    aug = np.random.default_rng(0).random((6, 2, 2)).astype(np.float32)
    with pytest.raises(ValidationError, match="declares aug columns"):
        w.put([0], d["boxes"][:1], d["flips"][:1], d["probs"][:1])
    w.put(np.arange(6), d["boxes"], d["flips"], d["probs"], aug=aug)
    w.close()
    r = fkdstore.open(tmp_path / "s")
    assert r.aug_names == ["brightness", "erase"]
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    np.testing.assert_array_equal(g["aug/brightness"][4], aug[4, :, 0])
    assert g["aug/erase"].dtype == np.float32  # a (name, kind) pair keeps the 1.0 dtype: scalar float32
    np.testing.assert_array_equal(r.read(4).aug["erase"], aug[4, :, 1])


def test_large_images_use_int32_boxes(tmp_path):
    d = make_data(2, 1, 6)
    d["sizes"] = np.array([[70000, 10], [5, 5]])
    d["boxes"] = np.array([[[69990, 0, 10, 10]], [[0, 0, 5, 5]]])
    with create(tmp_path / "s", d) as w:
        fill(w, d)
    r = fkdstore.open(tmp_path / "s")
    assert r.header.box_dtype == "int32"
    np.testing.assert_array_equal(r.read(0).boxes, [[69990, 0, 10, 10]])


def test_torch_probs_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    d = make_data(4, 2, 6)
    with create(tmp_path / "s", d) as w:
        w.put(torch.arange(4), torch.as_tensor(d["boxes"]), torch.as_tensor(d["flips"]), torch.as_tensor(d["probs"]))
    r = fkdstore.open(tmp_path / "s")
    dense = r.decode({k: torch.as_tensor(v) for k, v in r.read(1).fields.items()})
    assert isinstance(dense, torch.Tensor) and dense.shape == (2, 6)
    assert os.path.exists(tmp_path / "s" / "zarr.json")


# ------------------------------------------------------------------------------------------ format 4.0


def test_format_4_arrays_header_and_manifest(tmp_path):
    d = make_data(37, 3, 9)
    d["keys"][5] = "dossier/été.jpg"  # multi-byte UTF-8
    cols = [("ops", "int", "uint8", (2,)), {"name": "mag", "kind": "float", "dtype": "float16"}]
    aug = {"ops": np.random.default_rng(1).integers(0, 14, (37, 3, 2)),
           "mag": np.random.default_rng(2).random((37, 3)).astype(np.float32)}
    codec = get_codec("ms", k=3)
    with create(tmp_path / "s", d, codec, aug=cols, images_per_chunk=4, images_per_shard=8) as w:
        for s in range(0, 37, 5):
            i = np.arange(s, min(37, s + 5))
            w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i], aug={k: v[i] for k, v in aug.items()})
    g, h = stored(tmp_path / "s")
    raw = g.attrs[S.ATTR_KEY]
    assert raw["format_version"] == S.FORMAT_VERSION == "4.0" and raw["checksum"] == S.header_checksum(raw)
    assert raw["regions"]["augment"] == [] and raw["key_length"] == max(len(k.encode()) for k in d["keys"])
    assert [a["dtype"] for a in raw["regions"]["aug"]] == ["uint8", "float16"]
    assert raw["regions"]["crops"] == {"mode": "stored"} and len(raw["store_id"]) == 32
    assert g[S.KEY].dtype == np.uint8 and S.decode_keys(g[S.KEY][:]) == d["keys"]
    assert g[S.IMAGE_SIZE].dtype == np.int32 and g[S.LABEL].dtype == np.int32
    np.testing.assert_array_equal(g["aug/ops"][:], aug["ops"])
    np.testing.assert_array_equal(g["aug/mag"][:], aug["mag"].astype(np.float16))
    names = list(h.record_specs())
    assert names == ["box", "flip", "aug/ops", "aug/mag", "soft/indices", "soft/probs"]
    man = g[S.MANIFEST]
    assert man.shape == (h.num_shards, 3 + 2 * len(names)) == (5, 15) and man.dtype == np.uint32
    assert man.metadata.to_dict()["chunk_grid"]["configuration"]["chunk_shape"] in ([1, 15], (1, 15))  # a row per shard
    np.testing.assert_array_equal(man[:], expected_manifest(g, h))
    for name in (S.KEY, S.IMAGE_SIZE, S.LABEL, S.WRITTEN):  # one chunk per shard, every chunk written
        assert g[name].metadata.to_dict()["chunk_grid"]["configuration"]["chunk_shape"][0] == 8
        assert len(list((tmp_path / "s" / name / "c").iterdir())) == 5
    assert g[S.WRITTEN][:].all()
    assert not (tmp_path / "s" / ownership.OWNERS).exists()  # records released at close


def test_every_inner_chunk_is_materialised(tmp_path):
    """All-zero chunks are written too, so a missing chunk of a written image always means damage."""
    d = make_data(8, 2, 5)
    d["flips"][:] = False  # the flip array is all fill values
    with create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8) as w:
        fill(w, d)
    raw = (tmp_path / "s" / S.FLIP / "c" / "0" / "0").read_bytes()
    index = np.frombuffer(raw[-(4 * 16 + 4):-4], "<u8").reshape(4, 2)
    assert (index != 2**64 - 1).all()


def test_default_layout_caps_slots_per_shard(tmp_path):
    for M in (1, 8, 64, 600):
        ipc, ips = S.default_layout(2_000_000, M * 24, M)
        assert ips * M <= max(S.MAX_SLOTS_PER_SHARD, ipc * M) or -(-2_000_000 // ips) <= S.MAX_SHARDS
        assert ips % ipc == 0
    d = make_data(300, 64, 4)
    w = create(tmp_path / "s", d, codec="hard")  # no layout given: the slot cap applies
    assert w.header.images_per_shard * 64 <= S.MAX_SLOTS_PER_SHARD
    w.close()


def test_resume_adopts_the_store_layout(tmp_path):
    d = make_data(20, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=6)  # not what the defaults give
    fill(w, d, order=np.arange(6))
    w.close()
    w = create(tmp_path / "s", d)  # no layout: adopt the store's
    assert (w.header.images_per_chunk, w.header.images_per_shard) == (2, 6)
    fill(w, d, order=np.arange(6, 20))
    w.close()
    g, h = stored(tmp_path / "s")
    assert g[S.WRITTEN][:].all()
    np.testing.assert_array_equal(g[S.MANIFEST][:], expected_manifest(g, h))
    with pytest.raises(SchemaMismatchError, match="layout.images_per_shard=6, this run asks for 12"):
        create(tmp_path / "s", d, images_per_shard=12)


def test_memory_is_bounded_for_any_put_order(tmp_path):
    d = make_data(64, 2, 6)
    ref_path, path = tmp_path / "ref", tmp_path / "s"
    with create(ref_path, d, images_per_chunk=2, images_per_shard=4) as w:
        fill(w, d)
    w = create(path, d, images_per_chunk=2, images_per_shard=4, max_buffered_shards=2)
    for i in np.random.default_rng(3).permutation(64):  # one image per put, random order
        w.put([i], d["boxes"][[i]], d["flips"][[i]], d["probs"][[i]])
        assert len(w.buffered_shards) <= 2
    w.close()
    for name in ("box", "flip", "soft/indices", "soft/probs", S.MANIFEST, S.WRITTEN):
        assert (path / name / "c").exists()
    a, b = zarr.open_group(str(ref_path), mode="r"), zarr.open_group(str(path), mode="r")
    for name in ("box", "flip", "soft/indices", "soft/probs", S.MANIFEST, S.WRITTEN, S.KEY):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_rewriting_a_shard_refuses_damaged_kept_data(tmp_path):
    d = make_data(8, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8)
    w.put([0, 1], d["boxes"][:2], d["flips"][:2], d["probs"][:2])
    w.flush()  # shard 0 written early with images 0, 1 only
    w.close()
    (tmp_path / "s" / S.BOX / "c" / "0" / "0" / "0").unlink()  # the shard file is lost
    w = create(tmp_path / "s", d)
    with pytest.raises(fkdstore.errors.CorruptStoreError, match="'box' shard 0 .*images 0..1.*manifest"):
        w.put(np.arange(2, 8), d["boxes"][2:], d["flips"][2:], d["probs"][2:])
    assert w.written.sum() == 2


# ------------------------------------------------------------------------------------- failed flushes


def test_failed_flush_keeps_the_buffer_and_retries(tmp_path, monkeypatch):
    d = make_data(12, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=4)
    w.put([4, 5], d["boxes"][4:6], d["flips"][4:6], d["probs"][4:6])  # buffered, shard 1
    real = zarr.Array.__setitem__
    fail = {"n": 1}

    def flaky(self, key, value):
        if self.path == "soft/probs" and fail["n"]:
            fail["n"] -= 1
            raise OSError(28, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", flaky)
    with pytest.raises(OSError, match=r"cannot write shard 1 of array 'soft/probs' \(soft/probs/c/1/0/0\): No space"):
        w.put([6, 7], d["boxes"][6:8], d["flips"][6:8], d["probs"][6:8])  # completes shard 1 -> flush fails
    assert w.buffered_shards == [1] and not w.written.any()
    assert not zarr.open_group(str(tmp_path / "s"), mode="r")[S.WRITTEN][:].any()  # no flag without data
    w.close()  # retried
    g, h = stored(tmp_path / "s")
    np.testing.assert_array_equal(g[S.WRITTEN][:], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(g["box"][4:8], d["boxes"][4:8])
    np.testing.assert_array_equal(g[S.MANIFEST][:], expected_manifest(g, h))


def test_writes_fsync_data_then_manifest_then_flags(tmp_path, monkeypatch):
    d = make_data(4, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=4)
    calls = []
    real = storage.fsync_local
    monkeypatch.setattr(storage, "fsync_local", lambda store, keys: (calls.append(list(keys)), real(store, keys)))
    fill(w, d)
    w.close()
    assert calls == [["box/c/0/0/0", "flip/c/0/0", "soft/indices/c/0/0/0", "soft/probs/c/0/0/0"],
                     ["manifest/c/0/0"], ["written/c/0"]]


# ------------------------------------------------------------------------------------------- ownership


def test_second_writer_on_a_shard_is_refused(tmp_path):
    d = make_data(16, 2, 6)
    w1 = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8)
    w1.put([0, 1], d["boxes"][:2], d["flips"][:2], d["probs"][:2])  # w1 owns shard 0
    w2 = create(tmp_path / "s", d)
    with pytest.raises(ConcurrentWriterError, match=rf"shard 0 of .* is owned by another writer .*pid {os.getpid()}"):
        w2.put([2], d["boxes"][2:3], d["flips"][2:3], d["probs"][2:3])
    w2.put(np.arange(8, 16), d["boxes"][8:], d["flips"][8:], d["probs"][8:])  # disjoint shard: fine
    w2.close()
    w1.put(np.arange(2, 8), d["boxes"][2:8], d["flips"][2:8], d["probs"][2:8])
    w1.close()
    assert stored(tmp_path / "s")[0][S.WRITTEN][:].all()


def test_owner_is_rechecked_before_data_and_before_flags(tmp_path, monkeypatch):
    d = make_data(8, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8)
    w.put([0], d["boxes"][:1], d["flips"][:1], d["probs"][:1])
    record = tmp_path / "s" / ownership.OWNERS / "0.json"
    mine = record.read_bytes()
    other = {"token": "f" * 32, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
             "renewed": time.time()}
    record.write_text(json.dumps(other))  # another writer took the shard
    with pytest.raises(ConcurrentWriterError, match="refusing to write its data"):
        w.flush()
    assert not (tmp_path / "s" / "box" / "c").exists()
    record.write_bytes(mine)
    monkeypatch.setattr(W, "_fault_point", lambda step, s: step == "manifest" and record.write_text(json.dumps(other)))
    with pytest.raises(ConcurrentWriterError, match="refusing to mark its images written"):
        w.flush()
    assert not stored(tmp_path / "s")[0][S.WRITTEN][:].any() and w.buffered_shards == [0]


def test_stale_records_do_not_block_a_resume(tmp_path):
    d = make_data(16, 2, 6)
    create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8).close()
    owners = tmp_path / "s" / ownership.OWNERS
    owners.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    (owners / "0.json").write_text(json.dumps(  # a killed writer on this host
        {"token": "a" * 32, "host": socket.gethostname(), "pid": int(dead.stdout), "since": now, "renewed": now}))
    (owners / "1.json").write_text(json.dumps(  # another host, lease expired
        {"token": "b" * 32, "host": "elsewhere", "pid": 1, "since": 0, "renewed": now - ownership.OWNER_LEASE_S - 1}))
    w = create(tmp_path / "s", d)
    fill(w, d)
    w.close()
    assert stored(tmp_path / "s")[0][S.WRITTEN][:].all() and not owners.exists()
    owners.mkdir()
    (owners / "0.json").write_text(json.dumps(  # another host, fresh: it may be alive
        {"token": "c" * 32, "host": "elsewhere", "pid": 1, "since": now, "renewed": now}))
    with pytest.raises(ConcurrentWriterError, match="host 'elsewhere'"):
        create(tmp_path / "s", d).put([0], d["boxes"][:1], d["flips"][:1], d["probs"][:1])


DISJOINT = textwrap.dedent("""
    import sys, numpy as np, fkdstore
    sys.path.insert(0, sys.argv[3])
    from storeutil import make_data
    d = make_data(32, 2, 6)
    lo, hi = (0, 16) if sys.argv[2] == "0" else (16, 32)
    w = fkdstore.write(sys.argv[1], num_images=32, crops_per_image=2, num_classes=6, codec="ms",
                       image_keys=d["keys"], image_sizes=d["sizes"], labels=d["labels"], primary=False)
    for i in range(lo, hi, 3):
        j = np.arange(i, min(hi, i + 3))
        w.put(j, d["boxes"][j], d["flips"][j], d["probs"][j])
    w.close()
""")


def test_two_processes_on_disjoint_shards_both_succeed(tmp_path):
    d = make_data(32, 2, 6)
    create(tmp_path / "ref", d, images_per_chunk=2, images_per_shard=8).close()
    with create(tmp_path / "ref", d) as w:
        fill(w, d)
    create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8).close()
    script = tmp_path / "part.py"
    script.write_text(DISJOINT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "s"), r, str(REPO / "tests")], env=env,
                              stderr=subprocess.PIPE, text=True) for r in ("0", "1")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a, b = zarr.open_group(str(tmp_path / "ref"), mode="r"), zarr.open_group(str(tmp_path / "s"), mode="r")
    for name in ("box", "flip", "soft/indices", "soft/probs", S.MANIFEST, S.WRITTEN):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_object_store_round_trip_with_ownership():
    d = make_data(10, 2, 6)
    url = f"memory://fkd-{os.getpid()}-{time.time_ns()}"
    w = fkdstore.write(url, num_images=10, crops_per_image=2, num_classes=6, codec="ms", image_keys=d["keys"],
                       image_sizes=d["sizes"], images_per_chunk=2, images_per_shard=4)
    w.put([0], d["boxes"][:1], d["flips"][:1], d["probs"][:1])
    assert storage.list_dir(w.store, ownership.OWNERS) == ["0.json"]
    other = fkdstore.write(url, num_images=10, crops_per_image=2, num_classes=6, codec="ms", image_keys=d["keys"],
                           image_sizes=d["sizes"])
    with pytest.raises(ConcurrentWriterError, match="shard 0"):
        other.put([1], d["boxes"][1:2], d["flips"][1:2], d["probs"][1:2])
    fill(w, d)
    w.close()
    g = zarr.open_group(store=w.store, mode="r")
    h = S.parse_header(g.attrs[S.ATTR_KEY])
    assert g[S.WRITTEN][:].all() and storage.list_dir(w.store, ownership.OWNERS) == []
    np.testing.assert_array_equal(g[S.MANIFEST][:], expected_manifest(g, h))


# ---------------------------------------------------------------------------------- interrupted creation


def test_write_clears_an_interrupted_creation_and_nothing_else(tmp_path):
    d = make_data(5, 2, 6)
    half = tmp_path / "half"
    g = zarr.open_group(str(half), mode="w", attributes={S.CREATING_KEY: {"started": 0}})  # killed after the
    g.create_array(S.KEY, shape=(5, 3), dtype="uint8")  # group (with its creation marker) and two arrays
    g.create_array(S.BOX, shape=(5, 2, 4), dtype="uint16")[:] = 1
    with create(half, d) as w:
        fill(w, d)
    assert stored(half)[0][S.WRITTEN][:].all()
    foreign = tmp_path / "foreign"  # a Zarr group that is not ours
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(3,), dtype="int32")
    named = tmp_path / "named"  # our names, but attributes someone else wrote
    gg = zarr.open_group(str(named), mode="w")
    gg.attrs["owner"] = "someone"
    gg.create_array(S.LABEL, shape=(3,), dtype="int32")
    for p in (foreign, named):
        before = sorted(x.relative_to(p) for x in p.rglob("*"))
        with pytest.raises(ValidationError, match="not an fkdstore store; refusing to overwrite"):
            create(p, d)
        assert not W.clear_interrupted_creation(p)
        assert sorted(x.relative_to(p) for x in p.rglob("*")) == before


# ------------------------------------------------------------------------------ issue 14 item 7 inputs


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda f: f["indices"].__setitem__((0, 0, 1), f["indices"][0, 0, 0]), ValidationError, "distinct"),
        (lambda f: f["probs"].__setitem__((0, 0), f["probs"][0, 0, ::-1]), ValidationError, "descending|sorted"),
        (lambda f: f["probs"].__setitem__((0, 0, 0), 1.5), ValidationError, r"\[0, 1"),
        (lambda f: f["probs"].__setitem__((1, 1, 2), np.nan), ValidationError, "finite"),
        (lambda f: f["indices"].__setitem__((0, 1, 0), 6), ValidationError, r"\[0, 6\)"),
        (lambda f: f.__setitem__("indices", f["indices"].astype(np.float32)), (TypeError, ValidationError),
         "dtype|integer"),
    ],
)
def test_put_fields_validates_like_put(tmp_path, change, error, message):
    d = make_data(4, 2, 6)
    codec = get_codec("ms", k=3)
    w = create(tmp_path / "s", d, codec, images_per_chunk=2, images_per_shard=4)
    fields = {k: np.array(v) for k, v in codec.encode(d["probs"]).items()}
    fields["probs"][..., 0] = np.maximum(fields["probs"][..., 0], fields["probs"][..., 1] + np.float16(0.01))
    w.put_fields(np.arange(2), d["boxes"][:2], d["flips"][:2], {k: v[:2] for k, v in fields.items()})  # valid
    change(fields)
    with pytest.raises(error, match=message):
        w.put_fields(np.arange(4), d["boxes"], d["flips"], fields)
    assert w.buffered_shards == [0] and w._buffers[0]["_mask"].sum() == 2  # nothing of the bad put buffered
    w.close()


def test_huge_box_values_do_not_overflow_the_bounds_check(tmp_path):
    d = make_data(2, 1, 6)
    w = create(tmp_path / "s", d)
    for box in ([2**63 - 1, 0, 1, 1], [0, 2**63 - 1, 1, 1], [1, 1, 2**63 - 1, 2**63 - 1]):
        with pytest.raises(ValidationError, match="inside the image"):
            w.put([0], np.array([[box]], dtype=np.int64), [[False]], d["probs"][:1])
    with pytest.raises(ValidationError, match="inside the image"):
        w.put([0], np.array([[[2**64 - 1, 0, 1, 1]]], dtype=np.uint64), [[False]], d["probs"][:1])
    w.close()


def test_meta_tuples_round_trip_and_nan_is_refused(tmp_path):
    d = make_data(6, 2, 6)
    meta = {"input_size": (224, 224), "sampler": {"scale": (0.08, 1.0)}}
    create(tmp_path / "s", d, meta=meta, images_per_chunk=2, images_per_shard=2).close()
    assert stored(tmp_path / "s")[1].meta == {"input_size": [224, 224], "sampler": {"scale": [0.08, 1.0]}}
    with create(tmp_path / "s", d, meta=meta) as w:  # resume with the same tuple meta works
        fill(w, d)
    for bad in ({"lr": float("nan")}, {"x": float("inf")}, {"f": object()}):
        with pytest.raises(ValidationError, match="meta must be standard JSON"):
            create(tmp_path / "t", d, meta=bad)
    assert not (tmp_path / "t").exists()
    w = create(tmp_path / "s", d, meta=meta)
    with pytest.raises(ValidationError, match="meta must be standard JSON"):
        w.update_meta(loss=float("nan"))
    w.close()


def test_image_sizes_must_fit_int32(tmp_path):
    d = make_data(2, 1, 6)
    d["sizes"] = np.array([[2**31, 10], [5, 5]], dtype=np.int64)
    with pytest.raises(ValidationError, match=r"image_sizes must be in \[1, 2147483647\].*Image 0"):
        create(tmp_path / "s", d)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("indices", [[1.7], np.array([1.0]), [True], np.array([True, False])])
def test_non_integer_image_indices_are_a_type_error(tmp_path, indices):
    d = make_data(4, 1, 6)
    w = create(tmp_path / "s", d)
    n = len(indices)
    with pytest.raises(TypeError, match="image_indices must be integers"):
        w.put(indices, d["boxes"][:n], d["flips"][:n], d["probs"][:n])
    w.close()


def test_unreadable_zarr_json_names_the_file(tmp_path):
    d = make_data(2, 1, 6)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "zarr.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"s/zarr.json is not valid JSON"):
        create(tmp_path / "s", d)


def test_storage_stats_counts_files_per_array(tmp_path):
    d = make_data(16, 2, 6)
    with create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8) as w:
        fill(w, d)
    st = report.storage_stats(tmp_path / "s")
    assert st[S.BOX]["files"] == 2 and st[S.MANIFEST]["files"] == 2 and st[S.WRITTEN]["files"] == 2
    total = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert st["_total"]["bytes"] == total
