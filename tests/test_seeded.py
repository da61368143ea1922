"""Seeded crops (the default of format 4.0): box and flip derived from the header's crop sampler instead of
stored. The records equal a stored-crop twin's, the store is smaller, bad input writes nothing, and every way
the derivation or the header can go wrong is an error, never other crops. (3.0 stores of fkdstore 0.2 are
read in test_golden.py.)"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from faultutil import set_header
from storeutil import make_data

import fkdstore
from fkdstore import schema as S
from fkdstore.conversion import convert, ensemble, prune
from fkdstore.errors import CorruptStoreError, FormatError, SchemaMismatchError, ValidationError
from fkdstore.report import estimate_bytes, inspect
from fkdstore.seeded import SlotCropSampler, exp_poly
from fkdstore.verification import verify

N, M, C, IPC, IPS = 22, 6, 9, 4, 8  # 3 shards, the last inner chunk partial
SAMPLER = SlotCropSampler(seed=11, scale=(0.2, 1.0), flip_p=0.4)


def _data(seed=0):
    d = make_data(N, M, C, seed=seed)
    crops = [SAMPLER.sample(i, *d["sizes"][i], M) for i in range(N)]
    d["boxes"], d["flips"] = np.stack([b for b, _ in crops]), np.stack([f for _, f in crops])
    return d


def _write(path, d, *, seeded=True, boxes=True, **kw):
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec="ms:k=3", image_keys=d["keys"],
                        image_sizes=d["sizes"], labels=d["labels"], images_per_chunk=IPC, images_per_shard=IPS,
                        crop_sampler=SAMPLER if seeded else None, **kw) as w:
        for a in range(0, N, 5):
            i = np.arange(a, min(N, a + 5))
            w.put(i, d["boxes"][i] if boxes else None, d["flips"][i] if boxes else None, d["probs"][i])
    return path


@pytest.fixture
def pair(tmp_path):
    d = _data()
    return _write(tmp_path / "stored", d, seeded=False), _write(tmp_path / "seeded", d, boxes=False), d


def _same(a, b):
    assert a.box.dtype == b.box.dtype and a.flip.dtype == b.flip.dtype
    np.testing.assert_array_equal(a.box, b.box)
    np.testing.assert_array_equal(a.flip, b.flip)
    assert a.fields.keys() == b.fields.keys()
    for k in a.fields:
        np.testing.assert_array_equal(a.fields[k], b.fields[k])


def test_seeded_store_reads_like_its_stored_twin_and_is_smaller(pair):
    stored, seeded, d = pair
    a, b = fkdstore.open(stored), fkdstore.open(seeded)
    assert (a.header.format_version, b.header.format_version) == ("4.0", "4.0")
    assert (a.header.seeded, b.header.seeded) == (False, True)
    assert b.header.sampler == SAMPLER and not (seeded / "box").exists() and not (seeded / "flip").exists()
    assert b.header.record_specs().keys() == a.header.record_specs().keys()  # manifest columns
    np.testing.assert_array_equal(b.read_all().box, d["boxes"])
    _same(a.read_all(), b.read_all())
    slots = np.random.default_rng(0).integers(0, M, (N, 2))
    _same(a.read_all(slots), b.read_all(slots))
    idx = np.array([21, 3, 3, 17, 0])
    _same(a.read_batch(idx), b.read_batch(idx))
    _same(a.read_batch(idx, slots[idx]), b.read_batch(idx, slots[idx]))
    _same(a.read_batch([]), b.read_batch([]))
    for i, sl in ((0, None), (21, None), (9, [5, 0, 5])):
        _same(a.read(i, sl), b.read(i, sl))
    _same(pickle.loads(pickle.dumps(b)).read(13), a.read(13))  # DataLoader workers get a pickled reader
    assert verify(seeded) == [] and verify(stored) == []
    size = {p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) for p in (stored, seeded)}
    box_bytes = sum(f.stat().st_size for n in ("box", "flip") for f in (stored / n).rglob("*") if f.is_file())
    # the box and flip files are gone; the header's sampler config (~250 B) is what comes back
    assert box_bytes - 500 < size[stored] - size[seeded] <= box_bytes
    info = inspect(seeded)
    assert info["crops"] == "seeded" and info["crop_sampler"]["seed"] == 11 and info["box_bytes_per_crop"] == 0
    est = {m: estimate_bytes(10**6, 200, 1000, "ms:k=5,dtype=q8", store_crops=m) for m in (False, True)}
    assert "box" in est[True]["arrays"] and "box" not in est[False]["arrays"]
    assert est[True]["bytes"] - est[False]["bytes"] == est[True]["arrays"]["box"] + est[True]["arrays"]["flip"]


def test_given_boxes_must_be_the_samplers(tmp_path):
    d = _data()
    bad = d["boxes"].copy()
    bad[3, 2, 1] += 1
    for boxes, flips, what in ((bad, d["flips"], "boxes"), (d["boxes"], ~d["flips"], "flips")):
        p = tmp_path / what
        with fkdstore.write(p, num_images=N, crops_per_image=M, num_classes=C, codec="ms:k=3", image_keys=d["keys"],
                            image_sizes=d["sizes"], images_per_chunk=IPC, images_per_shard=IPS,
                            crop_sampler=SAMPLER) as w:
            with pytest.raises(ValidationError, match=rf"{what} must be the crop sampler's.*Image 3 slot 2"
                               if what == "boxes" else rf"{what} must be the crop sampler's.*Image 0 slot 0"):
                w.put(np.arange(N), boxes, flips, d["probs"])
            assert not w.buffered_shards
        assert not fkdstore.open(p).written.any() and not list((p / "soft").rglob("c"))


def test_resume_needs_the_same_sampler(tmp_path):
    d = _data()
    p = tmp_path / "s"
    with fkdstore.write(p, num_images=N, crops_per_image=M, num_classes=C, codec="ms:k=3", image_keys=d["keys"],
                        image_sizes=d["sizes"], images_per_chunk=IPC, images_per_shard=IPS, crop_sampler=SAMPLER) as w:
        w.put(np.arange(10), None, None, d["probs"][:10])  # shard 0 complete, shard 1 partial (flushed at close)
    common = dict(num_images=N, crops_per_image=M, num_classes=C, codec="ms:k=3", image_keys=d["keys"],
                  image_sizes=d["sizes"])
    with pytest.raises(SchemaMismatchError, match="regions.crops.mode='seeded', this run asks for 'stored'"):
        fkdstore.write(p, **common)
    with pytest.raises(SchemaMismatchError, match="regions.crops.sampler.seed=11, this run asks for 12"):
        fkdstore.write(p, **common, crop_sampler=SlotCropSampler(seed=12, scale=(0.2, 1.0), flip_p=0.4))
    with pytest.raises(TypeError, match="crop_sampler must be a SlotCropSampler, its config dict or None"):
        fkdstore.write(p, **common, crop_sampler=object())
    with fkdstore.write(p, **common, crop_sampler=SAMPLER.get_config()) as w:
        w.put(np.arange(10, N), d["boxes"][10:], d["flips"][10:], d["probs"][10:])
    r = fkdstore.open(p)
    assert r.complete and verify(p) == []
    np.testing.assert_array_equal(r.read_all().box, d["boxes"])


def test_header_rules(pair):
    _, seeded, _ = pair
    zj = seeded / "zarr.json"
    pristine = zj.read_text()
    set_header(seeded, **{"regions.crops.sampler.seed": 12})  # an edit without a new checksum
    with pytest.raises(CorruptStoreError, match="checksum"):
        fkdstore.open(seeded)
    cfg = SAMPLER.get_config()
    cases = [  # edits with a valid checksum: the sampler rules refuse them
        ({"regions.crops": {"mode": "seeded"}}, r"regions.crops must have exactly the keys \['mode', 'sampler'\]"),
        ({"regions.crops": {"mode": "derived", "sampler": cfg}}, "regions.crops must be"),
        ({"regions.crops.sampler": {**cfg, "max_crop": 3}}, "unknown.*max_crop"),
        ({"regions.crops.sampler": {**cfg, "algorithm": "center_crop"}}, "algorithm"),
        ({"regions.crops.sampler": {**cfg, "rng": "numpy"}}, "rng"),
        ({"regions.crops.sampler": {**cfg, "flip_p": 1.5}}, "flip_p"),
        ({"format_version": "3.0"}, "lacks required keys"),
    ]
    for changes, msg in cases:
        zj.write_text(pristine)
        set_header(seeded, **changes, checksum=True)
        with pytest.raises(FormatError, match=msg):
            fkdstore.open(seeded)
        assert any("cannot open store" in p for p in verify(seeded))


def test_a_stored_box_array_in_a_seeded_store_is_refused(pair):
    stored, seeded, _ = pair
    import shutil

    shutil.copytree(stored / "box", seeded / "box")
    with pytest.raises(CorruptStoreError, match="array 'box' exists.*seeded crops"):
        fkdstore.open(seeded)
    assert any("array 'box' exists" in p for p in verify(seeded))


@pytest.fixture
def drifted(monkeypatch):
    """A sampler that no longer reproduces image 13's draws (as another numpy's streams could)."""
    original = SlotCropSampler.sample_slots

    def sample_slots(self, images, slots, heights, widths):
        boxes, flips = original(self, images, slots, heights, widths)
        hit = (np.broadcast_to(images, flips.shape) == 13) & (np.broadcast_to(slots, flips.shape) == 4)
        return boxes, flips ^ hit

    monkeypatch.setattr(SlotCropSampler, "sample_slots", sample_slots)


def test_a_sampler_that_cannot_replay_the_store_raises(pair, drifted):
    _, seeded, _ = pair
    where = r"array 'flip' \(seeded crops\) chunk 3 \(images 12\.\.15\).*cannot replay"
    for read in (lambda r: r.read(13), lambda r: r.read_batch([14, 2], [[0], [1]]), lambda r: r.read_all(),
                 lambda r: r.read_all(np.zeros((N, 1), np.int64))):
        with pytest.raises(CorruptStoreError, match=where):
            read(fkdstore.open(seeded))
    r = fkdstore.open(seeded)
    assert r.read(2).box.shape == (M, 4)  # the first derived read checked chunk 0, which still matches
    problems = verify(seeded)
    assert len(problems) == 1 and "array 'flip' (seeded crops) chunk 3" in problems[0]


def test_damaged_manifest_of_derived_columns_is_caught(pair):
    _, seeded, _ = pair
    import zarr

    m = zarr.open_array(str(seeded / "manifest"), mode="r+")
    tags = m[:]
    tags[2, len(S.BOUND_PER_IMAGE) + 1 * 4 + 0] ^= 1  # chunk 5 (images 20-21) = shard 2's chunk 1, column 0 = box
    m[:] = tags
    with pytest.raises(CorruptStoreError, match=r"array 'box' \(seeded crops\) chunk 5 \(images 20\.\.21\)"):
        fkdstore.open(seeded).read(21)
    assert fkdstore.open(seeded).read(0).box.shape == (M, 4)
    assert any("chunk 5" in p for p in verify(seeded))


def test_convert_ensemble_keep_and_prune_materialises_the_seeded_crops(pair, tmp_path):
    stored, seeded, d = pair
    convert(seeded, tmp_path / "q8", "ms:k=3,dtype=q8")
    ensemble([seeded, stored], tmp_path / "ens")
    for p in (tmp_path / "q8", tmp_path / "ens"):
        r = fkdstore.open(p)
        assert r.header.sampler == SAMPLER and r.header.format_version == "4.0"
        np.testing.assert_array_equal(r.read_all().box, d["boxes"])
    out = prune(seeded, tmp_path / "pruned", keep=0.5, seed=3)
    r = fkdstore.open(tmp_path / "pruned")
    assert not r.header.seeded and out["crops_per_image"] == 3
    from fkdstore.conversion import random_slots

    slots = np.stack([random_slots(3, i, M, 3) for i in range(N)])
    np.testing.assert_array_equal(r.read_all().box, np.take_along_axis(d["boxes"], slots[..., None], 1))
    assert verify(tmp_path / "pruned") == []


def test_generate_seeded_crops_and_relabel(tmp_path):
    torch = pytest.importorskip("torch")
    from fkdstore.runner import generate
    from fkdstore.testing import make_digits_folder, tiny_cnn

    digits = make_digits_folder(tmp_path / "digits", size=32, per_class=1)  # 10 PNGs
    sampler = SlotCropSampler(seed=5)
    fast = dict(crops_per_image=4, codec="ms:k=3,dtype=q8", input_size=32, images_per_shard=4, batch_size=8,
                num_workers=0, progress=False)
    teacher = tiny_cnn(10)
    b = generate(teacher, digits, tmp_path / "b", **fast, crop_sampler=sampler)  # seeded crops: the default
    assert b.header.format_version == "4.0" and b.header.seeded and not (tmp_path / "b" / "box").exists()
    assert b.header.sampler == sampler and "sampler" not in b.meta
    assert verify(tmp_path / "b") == []
    # the teacher labelled the sampler's crops: replay them and compare with the stored labels
    from fkdstore.images import load_image
    from fkdstore.transforms import normalize, replay_crops

    codec = b.codec
    teacher.eval()
    for i, k in enumerate(b.image_keys):
        rec = b.read(i)
        H, W = b.image_sizes[i]
        boxes, flips = sampler.sample(i, int(H), int(W), 4)
        assert np.array_equal(rec.box, boxes) and np.array_equal(rec.flip, flips)
        with torch.inference_mode():
            x = normalize(replay_crops(load_image(digits / k), boxes.astype(np.int64), flips, 32))
            want = codec.encode(torch.softmax(teacher(x), -1).numpy())
        assert np.array_equal(rec.fields["indices"], want["indices"])
        assert np.abs(rec.fields["probs"].astype(int) - want["probs"].astype(int)).max() <= 1  # q8 codes
    # a stored-crop twin (same crops and labels, format 2.0) replays identical training items
    rb = b.read_all()
    with fkdstore.write(tmp_path / "a", num_images=len(b), crops_per_image=4, num_classes=10, codec=codec,
                        image_keys=b.image_keys, image_sizes=b.image_sizes, labels=b.labels, meta=b.meta,
                        replay=b.header.replay) as w:
        w.put_fields(np.arange(len(b)), rb.box, rb.flip, rb.fields)
    with pytest.raises(ValidationError, match="crop_sampler and store_crops must stay default with crops_from"):
        generate(tiny_cnn(10, seed=1), digits, tmp_path / "c", **fast, store_crops=True, crops_from=tmp_path / "b")
    with pytest.raises(TypeError, match="store_crops must be True or False"):
        generate(tiny_cnn(10), digits, tmp_path / "c", **fast, store_crops=1)
    assert not (tmp_path / "c").exists()
    # training replays the same pixels and labels from either store
    da, db = (fkdstore.TorchDataset(p, digits, crops_per_sample=2, seed=3) for p in (tmp_path / "a", tmp_path / "b"))
    for x, y in zip(da.__getitems__(range(10)), db.__getitems__(range(10))):
        assert x.keys() == y.keys() and len(x) >= 3
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
    c = generate(tiny_cnn(10, seed=1), digits, tmp_path / "c", **fast, crops_from=tmp_path / "b")
    assert c.header.sampler == b.header.sampler
    np.testing.assert_array_equal(c.read_all().box, b.read_all().box)
    from fkdstore.cli import main

    assert main(["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out",
                 str(tmp_path / "cli"), "--crops", "4", "--codec", "ms:k=3,dtype=q8", "--input-size", "32",
                 "--seed", "5", "--images-per-shard", "4", "--num-workers", "0", "--no-progress"]) == 0
    cli = fkdstore.open(tmp_path / "cli")
    assert cli.header.sampler == sampler and verify(tmp_path / "cli") == []
    np.testing.assert_array_equal(cli.read_all().box, b.read_all().box)
    assert main(["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out",
                 str(tmp_path / "cli2"), "--crops", "4", "--codec", "ms:k=3,dtype=q8", "--input-size", "32",
                 "--seed", "5", "--images-per-shard", "4", "--num-workers", "0", "--no-progress",
                 "--store-crops"]) == 0
    stored = fkdstore.open(tmp_path / "cli2")
    assert not stored.header.seeded and (tmp_path / "cli2" / "box").exists()
    np.testing.assert_array_equal(stored.read_all().box, b.read_all().box)


def test_slot_sampler_rules():
    """The counter-based sampler: any subset of slots equals the same slots of a whole image; boxes inside the
    image; RandomResizedCrop's distribution (area fraction, aspect, flip rate); the fallback; exp_poly."""
    s = SlotCropSampler(seed=3)
    box, flip = s.sample(7, 375, 500, 200)
    sub_b, sub_f = s.sample_slots([7, 7, 7], [199, 0, 42], [375] * 3, [500] * 3)
    np.testing.assert_array_equal(sub_b, box[[199, 0, 42]])
    np.testing.assert_array_equal(sub_f, flip[[199, 0, 42]])
    np.testing.assert_array_equal(s.sample(7, 375, 500, 200)[0], box)  # deterministic
    assert not np.array_equal(SlotCropSampler(seed=4).sample(7, 375, 500, 200)[0], box)
    assert not np.array_equal(s.sample(8, 375, 500, 200)[0], box)
    rng = np.random.default_rng(0)
    n = 40000
    H, W = rng.integers(1, 2000, n), rng.integers(1, 2000, n)
    H[:50], W[:50] = 1, 1900  # no valid attempt: the fallback
    b, f = s.sample_slots(rng.integers(0, 10**9, n), rng.integers(0, 1000, n), H, W)
    top, left, h, w = b.T.astype(np.int64)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    np.testing.assert_array_equal(b[:50], np.tile([0, (1900 - 1) // 2, 1, 1], (50, 1)))  # centre, w = rint(1 * 4/3)
    assert abs(f.mean() - 0.5) < 0.02
    # the same distribution as torchvision's RandomResizedCrop.get_params (re-implemented here), per image shape
    for hh, ww in ((375, 500), (500, 375), (120, 900)):
        mine = s.sample_slots(np.arange(20000) // 100, np.arange(20000) % 100, hh, ww)[0].astype(np.int64)
        theirs = _rrc_reference(np.random.default_rng(hh), hh, ww, 20000)
        for stat in (lambda x, hh=hh, ww=ww: x[:, 2] * x[:, 3] / (hh * ww), lambda x: x[:, 3] / x[:, 2],
                     lambda x, hh=hh: x[:, 0] / hh, lambda x, ww=ww: x[:, 1] / ww):
            q = np.linspace(0.05, 0.95, 19)
            np.testing.assert_allclose(np.quantile(stat(mine), q), np.quantile(stat(theirs), q), atol=0.03, rtol=0.03)
    x = np.linspace(-8, 8, 100001)
    np.testing.assert_allclose(exp_poly(x), np.exp(x), rtol=1e-13)
    with pytest.raises(ValidationError, match="ratio"):
        SlotCropSampler(ratio=(1e-5, 1.0))
    with pytest.raises(ValidationError, match="seed"):
        SlotCropSampler(seed=2**64)


def _rrc_reference(rng, H, W, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params``, one crop at a time: (n, 4) int boxes."""
    out = np.empty((n, 4), np.int64)
    log_r = (np.log(ratio[0]), np.log(ratio[1]))
    for k in range(n):
        for _ in range(10):
            target = H * W * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(*log_r))
            w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < w <= W and 0 < h <= H:
                out[k] = (rng.integers(0, H - h + 1), rng.integers(0, W - w + 1), h, w)
                break
        else:  # the centre-crop fallback, aspect ratio clamped into ``ratio``
            if W / H < ratio[0]:
                w, h = W, int(round(W / ratio[0]))
            elif W / H > ratio[1]:
                w, h = int(round(H * ratio[1])), H
            else:
                w, h = W, H
            out[k] = ((H - h) // 2, (W - w) // 2, h, w)
    return out
