"""benchmarks/scale.py: the synthetic ImageNet-shaped data is valid, and each operation runs on a tiny store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scale  # noqa: E402

import fkdstore  # noqa: E402
from fkdstore import verification  # noqa: E402


def test_synthetic_sizes_keys_and_labels_are_valid():
    N, M, C, k = 3000, 16, 100, 5
    sizes = scale.image_sizes(N)
    assert sizes.shape == (N, 2) and sizes.dtype == np.int32 and (sizes >= 16).all()
    assert ((sizes == (375, 500)).all(1).mean()) > 0.5  # ImageNet's most common size dominates
    keys, labels = scale.image_keys(N, C)
    assert len(set(keys)) == N and keys == sorted(keys)  # unique, in ImageFolder (sorted) order
    assert keys[0].split("/")[0] + "_" == keys[0].split("/")[1].split("_")[0] + "_"
    assert (np.diff(labels) >= 0).all() and labels.min() == 0 and labels.max() == C - 1
    boxes, flips, f = scale.synth_batch(0, sizes[:512], labels[:512], M, C, k, scale._offsets_table(C, 0))
    H, W = sizes[:512, None, 0], sizes[:512, None, 1]
    t, lft, h, w = (boxes[..., i] for i in range(4))
    assert (t >= 0).all() and (lft >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (t + h <= H).all() and (lft + w <= W).all()
    assert flips.dtype == bool and 0.4 < flips.mean() < 0.6
    idx, p = f["indices"].astype(np.int64), f["probs"].astype(np.float32)
    assert idx.shape == (512, M, k) and (idx < C).all()
    assert (np.diff(np.sort(idx, -1), axis=-1) > 0).all()  # distinct per slot
    assert (np.diff(p, axis=-1) <= 0).all() and (p.sum(-1) < 1).all() and (p > 0).all()
    again = scale.synth_batch(0, sizes[:512], labels[:512], M, C, k, scale._offsets_table(C, 0))
    assert np.array_equal(again[0], boxes) and np.array_equal(again[2]["probs"], f["probs"])  # seeded


@pytest.mark.parametrize("seeded", [False, True])
def test_operations_on_a_tiny_store(tmp_path, seeded):
    store = tmp_path / "s.zarr"
    a = argparse.Namespace(store=str(store), n=600, crops=8, classes=50, k=5, m=2, seed=0, batches=2,
                           seeded_crops=seeded)
    w = scale.op_write(a)
    assert w["complete"] and w["seconds"] > 0 and w["format_version"] == "4.0"
    assert verification.verify(store) == []
    r = fkdstore.open(store)
    assert r.header.seeded == seeded and ("box" in r.record_arrays) == (not seeded)
    assert r.num_images == 600 and r.image_keys[0].endswith(".JPEG")
    ra = scale.op_read_all(a)
    assert ra["result_mib"] > 0 and ra["seconds"] > 0
    rb = scale.op_read_batch(a)
    assert rb["images"] == 2 * scale.BATCH and rb["images_per_s"] > 0
    lp = scale.op_label_path(a)
    assert lp["batches"] == 2 and lp["ms_per_batch"] > 0
    row = {"N": 600, "M": 8, "C": 50, "storage": scale.storage(store), "baseline_mib": 0.0,
           **{op: {"rc": 0, **res} for op, res in
              (("write", w), ("read_all", ra), ("read_batch", rb), ("label_path", lp))}}
    md = scale.table([row])
    assert "| 600 |" in md and md.count("\n|") >= 4


def test_encode_keys_pads_utf8_with_nul_and_round_trips():
    from fkdstore import schema as S

    keys = ["a", "n01440764/n01440764_10026.JPEG", "été/ø.png", "x" * 7]
    arr = S.encode_keys(keys)
    L = max(len(k.encode("utf-8")) for k in keys)
    assert arr.dtype == np.uint8 and arr.shape == (4, L) and arr.flags.writeable
    for row, k in zip(arr, keys):
        b = k.encode("utf-8")
        assert bytes(row[:len(b)]) == b and not row[len(b):].any()
    assert S.decode_keys(arr) == keys
    assert S.encode_keys([]).shape == (0, 1)
