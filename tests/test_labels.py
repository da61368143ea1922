"""Issue 12: logits through the teacher-runner, load-time temperature, prune, relabel (crops_from), ensemble."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import make_store

import fkdstore
from fkdstore import codecs as K
from fkdstore.cli import main
from fkdstore.conversion import confident_slots, pruned_slots, random_slots
from fkdstore.errors import ValidationError
from fkdstore.images import list_images, load_image
from fkdstore.runner import generate
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import make_digits_folder, tiny_cnn
from fkdstore.transforms import normalize, replay_crops

FAST = dict(input_size=32, images_per_shard=4, batch_size=16, num_workers=0, progress=False)
M = 6


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), size=32, per_class=1)  # 10 PNGs


def teacher_logits(teacher, folder, reader, size=32):
    """The teacher's logits on every stored crop, replayed from the store's boxes and flips: (N, M, C) float64."""
    teacher.eval()
    out = []
    for i, key in enumerate(reader.image_keys):
        rec = reader.read(i)
        x = normalize(replay_crops(load_image(Path(folder) / key), rec.box.astype(np.int64), rec.flip, size))
        with torch.inference_mode():
            out.append(teacher(x).double().numpy())
    return np.stack(out)


def softmax(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------ logits through generate
@pytest.fixture(scope="module")
def logits_store(digits, tmp_path_factory):
    teacher = tiny_cnn(10, seed=3)
    path = tmp_path_factory.mktemp("lg") / "logits.fkd"
    r = generate(teacher, digits, path, crops_per_image=M, codec="logits:k=none,dtype=float32", **FAST)
    return r, teacher_logits(teacher, digits, r)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_generated_logits_store_decodes_to_softmax_at_T(logits_store, T):
    r, z = logits_store
    assert r.codec == K.Logits(k=None, dtype="float32")
    d = r.decode(r.read_all().fields, temperature=T)
    np.testing.assert_allclose(d, softmax(z, T), rtol=1e-4, atol=1e-6)
    # top-K logits: softmax(z / T) on the kept classes, renormalised (the codec's equations)
    topk = K.Logits(k=3, dtype="float32")
    f = topk.encode(z)
    idx = f["indices"].astype(np.int64)
    kept = np.take_along_axis(topk.decode(f, 10, temperature=T), idx, -1)
    ref = np.take_along_axis(softmax(z, T), idx, -1)
    np.testing.assert_allclose(kept / kept.sum(-1, keepdims=True), ref / ref.sum(-1, keepdims=True), rtol=1e-5)


def test_generated_topk_logits_store_keeps_the_teachers_ratios(digits, logits_store, tmp_path):
    r0, z = logits_store
    r = generate(tiny_cnn(10, seed=3), digits, tmp_path / "k3.fkd", crops_per_image=M,
                 codec="logits:k=3,dtype=float32", **FAST)
    rec = r.read_all()
    idx = rec.fields["indices"].astype(np.int64)
    np.testing.assert_array_equal(idx, np.argsort(-z, -1, kind="stable")[..., :3])
    for T in (1, 2, 4):
        kept = np.take_along_axis(r.decode(rec.fields, temperature=T), idx, -1)
        ref = np.take_along_axis(softmax(z, T), idx, -1)
        np.testing.assert_allclose(kept / kept.sum(-1, keepdims=True), ref / ref.sum(-1, keepdims=True), rtol=1e-4)


def test_logits_codec_refuses_a_generation_temperature(digits, tmp_path):
    with pytest.raises(ValidationError, match="temperature must be 1 with the 'logits' codec"):
        generate(tiny_cnn(10), digits, tmp_path / "x", crops_per_image=2, codec="logits:k=3", temperature=2.0, **FAST)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ load-time temperature
@pytest.mark.parametrize("T", [0, -1.0, float("nan"), float("inf")])
def test_dataset_and_densify_refuse_bad_temperatures(logits_store, digits, T):
    r, _ = logits_store
    with pytest.raises(ValidationError, match="temperature must be a finite number > 0"):
        fkdstore.TorchDataset(r, digits, temperature=T)
    rec = r.read(0)
    with pytest.raises(ValidationError, match="temperature must be a finite number > 0"):
        fkdstore.densify(rec.fields, r, temperature=T)


def test_dataset_and_densify_decode_at_their_temperature(logits_store, digits):
    r, z = logits_store
    for T in (1.0, 2.0, 4.0):
        ds = fkdstore.TorchDataset(r, digits, crops_per_sample=2, temperature=T)
        item = ds[3]
        np.testing.assert_allclose(item["soft_labels"].numpy(), softmax(z[3][item["slots"].numpy()], T),
                                   rtol=1e-4, atol=1e-6)
        sp = fkdstore.TorchDataset(r, digits, crops_per_sample=2, soft_labels="sparse", temperature=T)
        b = fkdstore.collate([sp[3], sp[4]])
        want = np.concatenate([softmax(z[i][sp.slots(i)], T) for i in (3, 4)])
        np.testing.assert_allclose(fkdstore.densify(b["soft_labels"], sp).numpy(), want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(fkdstore.densify(b["soft_labels"], r.codec, 10, temperature=T).numpy(), want,
                                   rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ prune
def test_pruned_slot_rules():
    assert [pruned_slots(k, 8) for k in (1, 0.5, 0.25, 0.125, 0.01)] == [8, 4, 2, 1, 1]
    a = random_slots(7, 3, 20, 5)
    assert np.array_equal(a, random_slots(7, 3, 20, 5)) and len(set(a.tolist())) == 5 and (np.diff(a) > 0).all()
    assert not np.array_equal(a, random_slots(7, 4, 20, 5)) or not np.array_equal(a, random_slots(8, 3, 20, 5))
    # confident: lowest entropy first, ties by slot index
    p = np.full((1, 4, 3), 1 / 3, np.float32)
    p[0, 2] = [0.98, 0.01, 0.01]
    p[0, 3] = [0.98, 0.01, 0.01]
    codec = K.Full(dtype="float32")
    np.testing.assert_array_equal(confident_slots(codec, codec.encode(p), 3, 1), [[2]])
    np.testing.assert_array_equal(confident_slots(codec, codec.encode(p), 3, 3), [[0, 2, 3]])


def test_prune_random_copies_the_kept_slots_and_records_history(tmp_path, capsys):
    src, dst = tmp_path / "s.fkd", tmp_path / "p.fkd"
    make_store(src, n=12, m=8, c=20, codec="ms", ipc=4, ips=4, aug=["brightness"], write=list(range(10)))
    assert main(["prune", str(src), str(dst), "--keep", "0.25", "--seed", "5"]) == 0
    assert "pruned 10 images to 2 of 8 slots each (rule random, seed 5)" in capsys.readouterr().out
    a, b = fkdstore.open(src), fkdstore.open(dst)
    assert b.crops_per_image == 2 and b.codec == a.codec and b.image_keys == a.image_keys
    np.testing.assert_array_equal(b.written, a.written)
    np.testing.assert_array_equal(b.labels, a.labels)
    for i in range(10):
        sl = random_slots(5, i, 8, 2)
        ra, rb = a.read(i, sl), b.read(i)
        for x, y in [(ra.box, rb.box), (ra.flip, rb.flip), *((ra.aug[k], rb.aug[k]) for k in ra.aug),
                     *((ra.fields[k], rb.fields[k]) for k in ra.fields)]:
            np.testing.assert_array_equal(x, y)
    h = b.meta["history"][-1]
    assert (h["op"], h["keep"], h["rule"], h["seed"], h["slots_kept"], h["crops_per_image_before"]) == \
        ("prune", 0.25, "random", 5, 2, 8)
    assert b.meta["teacher"] == a.meta["teacher"]
    # the random rule depends on (seed, image) only: pruning again gives the same store
    fkdstore.prune(src, tmp_path / "q.fkd", keep=0.25, seed=5)
    q = fkdstore.open(tmp_path / "q.fkd")
    np.testing.assert_array_equal(q.read_batch(range(10)).box, b.read_batch(range(10)).box)


def test_prune_confident_keeps_the_lowest_entropy_slots(tmp_path):
    src = tmp_path / "s.fkd"
    d = make_store(src, n=5, m=8, c=20, codec="full")
    fkdstore.prune(src, tmp_path / "c.fkd", keep=0.5, rule="confident")
    c = fkdstore.open(tmp_path / "c.fkd")
    p = d["probs"].astype(np.float16).astype(np.float64)
    h = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
    for i in range(5):
        want = np.sort(np.argsort(h[i], kind="stable")[:4])
        np.testing.assert_array_equal(c.read(i).box, d["boxes"][i, want])


@pytest.mark.parametrize("keep,err", [(0, ValidationError), (-0.5, ValidationError), (1.5, ValidationError),
                                      (float("nan"), ValidationError), ("0.5", TypeError), (True, TypeError)])
def test_prune_refuses_bad_keep_and_writes_nothing(tmp_path, keep, err):
    src = tmp_path / "s.fkd"
    make_store(src, n=4, m=4, c=10)
    with pytest.raises(err, match="keep must be"):
        fkdstore.prune(src, tmp_path / "p.fkd", keep=keep)
    assert not (tmp_path / "p.fkd").exists()


def test_prune_refusals(tmp_path, capsys):
    src = tmp_path / "s.fkd"
    make_store(src, n=4, m=4, c=10)
    with pytest.raises(ValidationError, match=r"rule must be one of \['random', 'confident'\]"):
        fkdstore.prune(src, tmp_path / "p", keep=0.5, rule="best")
    assert main(["prune", str(src), str(tmp_path / "p"), "--keep", "0"]) == 2
    assert "must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["prune", str(src), str(src), "--keep", "0.5"]) == 1
    assert "destination must differ" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_prune_refuses_a_pipeline_that_mixes_slots(digits, tmp_path):
    mix = tmp_path / "mix.fkd"
    generate(tiny_cnn(10), digits, mix, crops_per_image=4, codec="ms:k=3", augment="color_jitter;mixup:window=4",
             **FAST)
    with pytest.raises(ValidationError, match=r"mixes slots \(mixup\)"):
        fkdstore.prune(mix, tmp_path / "pm", keep=0.5)
    assert not (tmp_path / "pm").exists()


def test_torch_dataset_on_a_pruned_store_samples_among_the_kept_slots(logits_store, digits, tmp_path):
    r, z = logits_store
    fkdstore.prune(r.path, tmp_path / "p.fkd", keep=0.5, seed=1)
    ds = fkdstore.TorchDataset(tmp_path / "p.fkd", digits, crops_per_sample=2)
    assert ds.crops_per_image == 3
    seen = set()
    for e in range(3):  # M' / m = 1.5 epochs per cycle: slots cycle through all 3 kept slots
        ds.set_epoch(e)
        item = ds[4]
        kept = random_slots(1, 4, M, 3)
        src_slots = kept[item["slots"].numpy()]
        seen.update(item["slots"].tolist())
        np.testing.assert_allclose(item["soft_labels"].numpy(), softmax(z[4][src_slots]), rtol=1e-4, atol=1e-6)
        want = normalize(replay_crops(load_image(digits / r.image_keys[4]), r.read(4, src_slots).box.astype(np.int64),
                                      r.read(4, src_slots).flip, 32))
        assert torch.equal(item["crops"], want)
    assert seen == {0, 1, 2}
    with pytest.raises(ValidationError, match="crops_per_sample must be <= the store's crops_per_image=3"):
        fkdstore.TorchDataset(tmp_path / "p.fkd", digits, crops_per_sample=4)


# ------------------------------------------------------------------------------ relabel + ensemble
def test_relabel_and_ensemble_equal_the_mean_of_two_teachers(digits, tmp_path, capsys):
    """Must show: two tiny teachers, one set of crops (A sampled, B relabels A's crops), E = ensemble(A, B)
    equals the mean of the two teachers' softmax outputs on the same replayed pixels within 1e-5."""
    t1, t2 = tiny_cnn(10, seed=11), tiny_cnn(10, seed=22)
    full = "full:dtype=float32"
    a = generate(t1, digits, tmp_path / "a.fkd", crops_per_image=M, codec=full, crop_sampler=SlotCropSampler(seed=4),
                 **FAST)
    with pytest.raises(ValidationError, match="crop_sampler and store_crops must stay default with crops_from"):
        generate(t2, digits, tmp_path / "b.fkd", crops_per_image=M, codec=full, crops_from=tmp_path / "a.fkd",
                 crop_sampler=SlotCropSampler(seed=99, scale=(0.5, 0.6)), **FAST)  # the crops come from the source
    assert not (tmp_path / "b.fkd").exists()
    b = generate(t2, digits, tmp_path / "b.fkd", crops_per_image=M, codec=full, crops_from=tmp_path / "a.fkd", **FAST)
    ra, rb = a.read_all(), b.read_all()
    np.testing.assert_array_equal(ra.box, rb.box)
    np.testing.assert_array_equal(ra.flip, rb.flip)
    assert b.meta["crops_from"]["path"] == a.path
    assert b.header.sampler == a.header.sampler == SlotCropSampler(seed=4)  # a seeded source: a seeded relabel
    # a stored-crops source gives a stored-crops relabel, with the source's sampler recorded in meta
    sa = generate(t1, digits, tmp_path / "sa.fkd", crops_per_image=M, codec=full, store_crops=True, **FAST)
    sb = generate(t2, digits, tmp_path / "sb.fkd", crops_per_image=M, codec=full, crops_from=sa.path, **FAST)
    assert sb.header.sampler is None and sb.meta["sampler"] == sa.meta["sampler"] == SlotCropSampler().get_config()
    np.testing.assert_array_equal(sb.read_all().box, sa.read_all().box)
    assert b.meta["teacher"]["state_sha256"] != a.meta["teacher"]["state_sha256"]
    p1, p2 = softmax(teacher_logits(t1, digits, a)), softmax(teacher_logits(t2, digits, a))
    np.testing.assert_allclose(ra.fields["probs"], p1, atol=1e-5)
    np.testing.assert_allclose(rb.fields["probs"], p2, atol=1e-5)
    assert np.abs(p1 - p2).max() > 0.01 > 1e-5  # the teachers really differ (untrained: near-uniform outputs)

    assert main(["ensemble", str(tmp_path / "a.fkd"), str(tmp_path / "b.fkd"), str(tmp_path / "e.fkd")]) == 0
    assert "ensembled 2 stores over 10 images as full" in capsys.readouterr().out
    e = fkdstore.open(tmp_path / "e.fkd")
    re_ = e.read_all()
    np.testing.assert_allclose(e.decode(re_.fields), (p1 + p2) / 2, atol=1e-5)
    np.testing.assert_array_equal(re_.box, ra.box)
    h = e.meta["history"][-1]
    assert h["op"] == "ensemble" and len(h["sources"]) == 2 and h["to"] == {"name": "full", "dtype": "float32"}
    assert [t["state_sha256"] for t in h["teachers"]] == [a.meta["teacher"]["state_sha256"],
                                                          b.meta["teacher"]["state_sha256"]]
    # another codec for the output: MS top-3 of the mean
    fkdstore.ensemble([tmp_path / "a.fkd", tmp_path / "b.fkd"], tmp_path / "e3.fkd", codec="ms:k=3")
    e3 = fkdstore.open(tmp_path / "e3.fkd")
    want = K.MarginalSmoothing(k=3).encode(((p1 + p2) / 2).astype(np.float32))
    np.testing.assert_array_equal(e3.read_all().fields["indices"], want["indices"])


def test_relabel_refusals(digits, tmp_path):
    src = tmp_path / "a.fkd"
    generate(tiny_cnn(10), digits, src, crops_per_image=3, codec="ms:k=3", **FAST)
    keys = list_images(digits)
    with pytest.raises(ValidationError, match="crops_per_image must equal the crops_from store's M=3. Got 4"):
        generate(tiny_cnn(10), digits, tmp_path / "x", crops_per_image=4, codec="ms", crops_from=src, **FAST)
    other = tmp_path / "other"
    shutil.copytree(digits, other)
    (other / keys.keys[2]).rename(other / keys.keys[2].replace(".png", "b.png"))
    want = keys.keys[2].replace(".png", "b.png")
    with pytest.raises(ValidationError, match=f"position 2 is '{keys.keys[2]}' in .* but '{want}' in the images"):
        generate(tiny_cnn(10), other, tmp_path / "x", crops_per_image=3, codec="ms", crops_from=src, **FAST)
    assert not (tmp_path / "x").exists()
    # incomplete source
    part = tmp_path / "part.fkd"
    a = fkdstore.open(src)
    rec = a.read_batch(range(5))
    with fkdstore.write(part, num_images=10, crops_per_image=3, num_classes=10, codec=a.codec,
                        image_keys=a.image_keys, image_sizes=a.image_sizes) as w:
        w.put_fields(np.arange(5), rec.box, rec.flip, rec.fields)
    with pytest.raises(ValidationError, match=r"part.fkd is incomplete \(5 of 10 images not written\)"):
        generate(tiny_cnn(10), digits, tmp_path / "x", crops_per_image=3, codec="ms", crops_from=part, **FAST)
    assert not (tmp_path / "x").exists()


AUG = ";".join(["color_jitter", "randaugment:num_ops=2,magnitude=9,interpolation=bilinear",
                "random_erasing:p=0.5,value=[10,20,30]", "mixup:alpha=0.4,p=0.7,window=4", "cutmix:p=0.6"])


def test_relabel_and_ensemble_replay_the_sources_augmentations(digits, tmp_path):
    """A store labelled through an augmentation pipeline (with Mixup/CutMix partners) relabelled by a second
    teacher: same boxes, flips, aug params and pipeline; each teacher's label = its output on the replayed
    (augmented, mixed) pixels; the ensemble = the mean of both."""
    t1, t2 = tiny_cnn(10, seed=11).eval(), tiny_cnn(10, seed=22).eval()
    kw = dict(crops_per_image=4, codec="full:dtype=float32", **FAST)
    generate(t1, digits, tmp_path / "a.fkd", augment=AUG, **kw)
    with pytest.raises(ValidationError, match="augment must be None with crops_from"):
        generate(t2, digits, tmp_path / "x", augment="color_jitter", crops_from=tmp_path / "a.fkd", **kw)
    assert not (tmp_path / "x").exists()
    generate(t2, digits, tmp_path / "b.fkd", crops_from=tmp_path / "a.fkd", **kw)
    a, b = fkdstore.open(tmp_path / "a.fkd"), fkdstore.open(tmp_path / "b.fkd")
    assert b.header.augment == a.header.augment and b.header.aug == a.header.aug
    ra, rb = a.read_all(), b.read_all()
    np.testing.assert_array_equal(ra.box, rb.box)
    np.testing.assert_array_equal(ra.flip, rb.flip)
    assert ra.aug.keys() == rb.aug.keys() and len(ra.aug) > 5
    for k in ra.aug:
        np.testing.assert_array_equal(ra.aug[k], rb.aug[k], err_msg=k)
    fkdstore.ensemble([tmp_path / "a.fkd", tmp_path / "b.fkd"], tmp_path / "e.fkd")
    mixed = 0
    for name, want in (("a.fkd", lambda x: softmax_t(t1, x)), ("b.fkd", lambda x: softmax_t(t2, x)),
                       ("e.fkd", lambda x: (softmax_t(t1, x) + softmax_t(t2, x)) / 2)):
        ds = fkdstore.TorchDataset(tmp_path / name, digits, crops_per_sample=4)
        batch = fkdstore.collate([ds[i] for i in range(len(ds))])
        np.testing.assert_allclose(batch["soft_labels"].numpy(), want(batch["crops"]), atol=1e-5, err_msg=name)
        mixed += int(batch["mixed"].sum())
    assert mixed > 0  # partners were exercised


def softmax_t(teacher, x):
    with torch.inference_mode():
        return torch.softmax(teacher(x), -1).double().numpy()


def test_relabel_carries_aug_columns(digits, tmp_path):
    listing = list_images(digits)
    src = tmp_path / "cols.fkd"
    from fkdstore.images import image_size

    n = len(listing)
    sizes = np.array([image_size(p) for p in listing.paths])
    rng = np.random.default_rng(0)
    boxes = np.stack([rng.integers(0, 10, (n, 3)), rng.integers(0, 10, (n, 3)), np.full((n, 3), 12),
                      np.full((n, 3), 15)], -1)
    flips = rng.random((n, 3)) < 0.5
    col = rng.normal(size=(n, 3)).astype(np.float32)
    with fkdstore.write(src, num_images=n, crops_per_image=3, num_classes=10, codec="ms:k=3",
                        image_keys=listing.keys, image_sizes=sizes, aug=["note"]) as w:
        w.put(np.arange(n), boxes, flips, rng.dirichlet(np.ones(10), (n, 3)).astype(np.float32), aug={"note": col})
    teacher = tiny_cnn(10, seed=5)
    b = generate(teacher, digits, tmp_path / "b.fkd", crops_per_image=3, codec="full:dtype=float32",
                 crops_from=src, **FAST)
    rb = b.read_all()
    np.testing.assert_array_equal(rb.box, boxes)
    np.testing.assert_array_equal(rb.flip, flips)
    np.testing.assert_array_equal(rb.aug["note"], col)
    np.testing.assert_allclose(rb.fields["probs"], softmax(teacher_logits(teacher, digits, b)), atol=1e-5)


def test_ensemble_refuses_stores_whose_crops_differ(tmp_path, capsys):
    a, b, c = tmp_path / "a.fkd", tmp_path / "b.fkd", tmp_path / "c.fkd"
    make_store(a, n=8, m=4, c=10, aug=["v"], seed=0)
    make_store(b, n=8, m=4, c=10, aug=["v"], seed=0)
    # same crops except one box of image 5, slot 2
    d = make_store(c, n=8, m=4, c=10, aug=["v"], seed=0)
    boxes = d["boxes"].copy()
    boxes[5, 2, 0] += 1
    c2 = tmp_path / "c2.fkd"
    with fkdstore.write(c2, num_images=8, crops_per_image=4, num_classes=10, codec="ms",
                        image_keys=[f"cls{i % 3}/img{i}.png" for i in range(8)], image_sizes=d["sizes"],
                        labels=d["labels"], aug=["v"]) as w:
        w.put(np.arange(8), boxes, d["flips"], d["probs"], aug=d["aug"])
    assert main(["ensemble", str(a), str(c2), str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "stores must share crops: image 5 ('cls2/img5.png') slot 2 has a different box" in err
    assert not (tmp_path / "e").exists()
    # a different flip / aug value
    for what, change in (("flip", "flips"), ("aug/v", "aug")):
        x = tmp_path / f"{what.replace('/', '_')}.fkd"
        arr = d[change].copy()
        if change == "flips":
            arr[3, 1] = ~arr[3, 1]
        else:
            arr[3, 1] += 1
        with fkdstore.write(x, num_images=8, crops_per_image=4, num_classes=10, codec="ms",
                            image_keys=[f"cls{i % 3}/img{i}.png" for i in range(8)], image_sizes=d["sizes"],
                            labels=d["labels"], aug=["v"]) as w:
            w.put(np.arange(8), d["boxes"], arr if change == "flips" else d["flips"], d["probs"],
                  aug=arr if change == "aug" else d["aug"])
        with pytest.raises(ValidationError, match=f"image 3 \\('cls0/img3.png'\\) slot 1 has a different {what}"):
            fkdstore.ensemble([a, x], tmp_path / "e")
    # other keys, other M
    make_store(tmp_path / "m5.fkd", n=8, m=5, c=10, aug=["v"])
    with pytest.raises(ValidationError, match="crops_per_image is 4 in .* but 5 in"):
        fkdstore.ensemble([a, tmp_path / "m5.fkd"], tmp_path / "e")
    with pytest.raises(ValidationError, match="at least 2 stores"):
        fkdstore.ensemble([a], tmp_path / "e")
    assert main(["ensemble", str(a), str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()
    # same crops: fine, and the mean of decoded rows
    fkdstore.ensemble([a, b], tmp_path / "ok.fkd", codec="full:dtype=float32")
    ra = fkdstore.open(a)
    np.testing.assert_allclose(fkdstore.open(tmp_path / "ok.fkd").read_all().fields["probs"],
                               ra.decode(ra.read_all().fields), atol=1e-7)


def test_cli_generate_crops_from(digits, tmp_path, capsys):
    common = ["--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--crops", "3", "--input-size", "32",
              "--device", "cpu", "--num-workers", "0", "--no-progress", "--images-per-shard", "4"]
    assert main(["generate", *common, "--out", str(tmp_path / "a.fkd"), "--codec", "ms", "--k", "3",
                 "--teacher-kwargs", '{"seed": 1}']) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "b.fkd"), "--codec", "logits", "--k", "3",
                 "--dtype", "q8", "--teacher-kwargs", '{"seed": 2}', "--crops-from", str(tmp_path / "a.fkd")]) == 0
    a, b = fkdstore.open(tmp_path / "a.fkd"), fkdstore.open(tmp_path / "b.fkd")
    assert b.codec == K.Logits(k=3, dtype="q8")
    np.testing.assert_array_equal(a.read_all().box, b.read_all().box)
    assert main(["generate", *common, "--out", str(tmp_path / "c.fkd"), "--crops", "4",
                 "--crops-from", str(tmp_path / "a.fkd")]) == 1
    assert "crops_per_image must equal the crops_from store's M=3. Got 4." in capsys.readouterr().err
    assert not (tmp_path / "c.fkd").exists()
