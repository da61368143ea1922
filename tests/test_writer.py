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

import fkdstore
from fkdstore import schema as S
from fkdstore import store as store_mod
from fkdstore import writer as W
from fkdstore.codecs import get_codec
from fkdstore.errors import (
    ConcurrentWriterError, FormatError, IncompleteStoreError, SchemaMismatchError, ValidationError,
)
from test_store import create, fill, make_data

REPO = Path(__file__).resolve().parents[1]


def expected_manifest(g, header, codec):
    """The manifest recomputed from the arrays as Zarr reads them (partial last chunk padded)."""
    names = list(header.per_crop_specs(codec))
    ipc = header.images_per_chunk
    out = np.zeros((header.num_chunks, len(names)), np.uint32)
    for p, name in enumerate(names):
        data = g[name][:]
        out[:, p] = S.manifest_tags(name, 0, data, ipc)
    return out


def stored(path):
    g = zarr.open_group(str(path), mode="r")
    h = S.Header.from_json(g.attrs[S.ATTR_KEY])
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
    stats = store_mod.storage_stats(tmp_path / "s")
    assert stats[S.BOX]["files"] == 2  # 64 images / 32 per shard
    assert stats["_total"]["files"] < 30
    attrs = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"][S.ATTR_KEY]
    assert attrs["format_version"] == S.FORMAT_VERSION and attrs["codec"] == {"name": "ms", "k": 5, "dtype": "float16"}


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
    per_crop = store_mod.storage_stats(tmp_path / "s")["_total"]["bytes"] / (N * M)
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
