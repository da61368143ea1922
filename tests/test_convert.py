"""fkdstore convert (re-encoding without the teacher) and import-fkd (FKD's release layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import make_store

import fkdstore
from fkdstore import codecs as K
from fkdstore.cli import main
from fkdstore.codecs import convert_fields
from fkdstore.errors import ConversionError
from fkdstore.importers.fkd import fkd_boxes, import_fkd, load_fkd_file
from fkdstore.verification import verify

C = 30


def _teacher(n=10, m=4, seed=0):
    return np.random.default_rng(seed).dirichlet(np.full(C, 0.2), (n, m)).astype(np.float32)


# ------------------------------------------------------------------------------------------- fields
@pytest.mark.parametrize("src,dst", [
    (K.Full(), K.MarginalSmoothing(k=5)), (K.Full(), K.MarginalReNorm(k=3)), (K.Full(), K.Hard()),
    (K.Full(), K.Smoothing()), (K.Full(dtype="float32"), K.Full()),
    (K.MarginalSmoothing(k=5), K.MarginalSmoothing(k=3)), (K.MarginalSmoothing(k=5), K.MarginalReNorm(k=5)),
    (K.MarginalReNorm(k=5), K.MarginalSmoothing(k=5)), (K.MarginalReNorm(k=5), K.MarginalSmoothing(k=2)),
    (K.MarginalReNorm(k=5), K.Smoothing()), (K.MarginalSmoothing(k=5), K.Hard()),
    (K.Smoothing(), K.Hard()), (K.Smoothing(), K.MarginalSmoothing(k=1)), (K.Hard(), K.Hard()),
])
def test_conversion_equals_encoding_with_the_teacher(src, dst):
    """Converting stored fields gives exactly what the teacher's probabilities would have given."""
    p = _teacher()
    got = convert_fields(src, dst, src.encode(p), C)
    want = dst.encode(p if src.name != "full" else p.astype(src.dtype).astype(np.float32))
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def test_mr_to_ms_keeps_the_raw_mass():
    """MR stores raw top-K probs, so MS decoded from a converted MR store spreads the true residual."""
    p = _teacher()
    mr = K.MarginalReNorm(k=5).encode(p)
    ms = convert_fields(K.MarginalReNorm(k=5), K.MarginalSmoothing(k=3), mr, C)
    dist = K.MarginalSmoothing(k=3).decode(ms, C)
    top3 = -np.sort(-p, -1)[..., :3]
    resid = (1 - top3.astype(np.float16).astype(np.float32).sum(-1)) / (C - 3)
    assert resid.min() > 1e-3
    np.testing.assert_allclose(np.sort(dist, -1)[..., 0], resid, rtol=1e-3)


@pytest.mark.parametrize("src,dst,why", [
    (K.Hard(), K.Smoothing(), "keeps only the argmax class"),
    (K.MarginalSmoothing(k=5), K.MarginalSmoothing(k=10), "keeps only the top 5 classes; ms K=10 needs the top 10"),
    (K.Smoothing(), K.MarginalSmoothing(k=5), "keeps only the top-1 class and its probability; ms K=5 needs the top 5"),
    (K.MarginalReNorm(k=5), K.Full(), "does not hold the full C-way distribution"),
])
def test_impossible_conversions_are_refused(src, dst, why):
    with pytest.raises(ConversionError, match=why):
        convert_fields(src, dst, src.encode(_teacher()), C)


# ------------------------------------------------------------------------------------------- stores
def test_convert_store_copies_everything(tmp_path, capsys):
    src, dst = tmp_path / "full.fkd", tmp_path / "ms3.fkd"
    data = make_store(src, n=12, m=4, c=C, codec="full", ipc=4, ips=4, aug=["brightness"],
                      write=list(range(8)))
    assert main(["convert", str(src), str(dst), "--codec", "ms", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "converted 8 images full -> ms K=3" in out and "4 images were not written" in out
    a, b = fkdstore.open(src), fkdstore.open(dst)
    assert b.codec == K.MarginalSmoothing(k=3)
    assert b.image_keys == a.image_keys
    np.testing.assert_array_equal(b.image_sizes, a.image_sizes)
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_array_equal(b.written, a.written)
    ra, rb = a.read_batch(range(8)), b.read_batch(range(8))
    np.testing.assert_array_equal(rb.boxes, data["boxes"][:8])
    np.testing.assert_array_equal(rb.flips, data["flips"][:8])
    assert list(rb.aug) == list(ra.aug) == ["brightness"]
    for name in ra.aug:
        np.testing.assert_array_equal(rb.aug[name], ra.aug[name])
    want = K.MarginalSmoothing(k=3).encode(ra.fields["probs"].astype(np.float32))
    for name in want:
        np.testing.assert_array_equal(rb.fields[name], want[name])
    assert b.meta["teacher"] == a.meta["teacher"]
    h = b.meta["history"][-1]
    assert h["op"] == "convert" and h["from"]["name"] == "full"
    assert h["to"] == {"name": "ms", "k": 3, "dtype": "float16"}
    assert verify(dst) == ["store incomplete: 4 of 12 images not written, ranges [8, 12)"]
    # then ms3 -> hard, history grows
    assert main(["convert", str(dst), str(tmp_path / "hard.fkd"), "--codec", "hard"]) == 0
    hard = fkdstore.open(tmp_path / "hard.fkd")
    assert [x["op"] for x in hard.meta["history"]] == ["convert", "convert"]
    np.testing.assert_array_equal(hard.read_batch(range(8)).fields["indices"], rb.fields["indices"][..., 0])


def test_convert_refusals_from_cli(tmp_path, capsys):
    src = tmp_path / "ms.fkd"
    make_store(src, n=4, m=3, c=C, codec="ms")
    assert main(["convert", str(src), str(tmp_path / "x"), "--codec", "ms", "--k", "10"]) == 1
    err = capsys.readouterr().err
    assert "cannot convert ms K=5 -> ms K=10: a ms K=5 store keeps only the top 5 classes" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(src), str(src), "--codec", "hard"]) == 1
    assert "destination must differ" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "y"), "--codec", "mr"]) == 0  # default K: the source's
    assert fkdstore.open(tmp_path / "y").codec == K.MarginalReNorm(k=5)


# ------------------------------------------------------------------------------------------- import-fkd
def _fkd_tree(tmp_path, *, kind="topk", k=5, m=6, fp16=False, suffix=".tar", n_classes=3, per_class=2, seed=0):
    """An image folder and an FKD release tree <root>/train/<class>/<stem><suffix>; returns expectations."""
    rng = np.random.default_rng(seed)
    images, labels_root = tmp_path / "images", tmp_path / "fkd" / "train"
    expect = {}
    for ci in range(n_classes):
        cls = f"n{ci:05d}"
        (images / cls).mkdir(parents=True)
        (labels_root / cls).mkdir(parents=True)
        for j in range(per_class):
            H, W = int(rng.integers(60, 1300)), int(rng.integers(60, 1300))
            stem = f"{cls}_{j}"
            Image.new("RGB", (W, H)).save(images / cls / f"{stem}.JPEG")
            # integer boxes as torchvision would draw them, then normalised as FKD stores them
            h = rng.integers(1, H + 1, m)
            w = rng.integers(1, W + 1, m)
            top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            coords = np.stack([top / H, left / W, h / H, w / W], 1).astype(np.float16 if fp16 else np.float32)
            flip = rng.random(m) < 0.5
            p = rng.dirichlet(np.full(C, 0.3), m).astype(np.float32)
            order = np.argsort(-p, -1, kind="stable")[:, :k]
            topp = np.take_along_axis(p, order, -1)
            if kind == "topk":
                lab = np.stack([order.astype(np.float32), topp], 1)  # (M, 2, K)
            elif kind == "smoothing":
                lab = np.stack([order[:, 0].astype(np.float32), topp[:, 0]], 1)  # (M, 2)
            else:
                lab = order[:, 0].astype(np.float32)  # (M,)
            if fp16:
                lab = lab.astype(np.float16)
            torch.save([coords, flip, lab], labels_root / cls / f"{stem}{suffix}")
            expect[f"{cls}/{stem}.JPEG"] = dict(coords=coords, flip=flip, labels=lab, H=H, W=W, gt=ci)
    return tmp_path / "fkd", images, expect


def _pillow_rule(coords, H, W):
    out = []
    for c in coords:
        i, j, h, w = c[0].item() * H, c[1].item() * W, c[2].item() * H, c[3].item() * W
        left, top, right, bottom = round(j), round(i), round(j + w), round(i + h)
        out.append((top, left, bottom - top, right - left))
    return np.array(out)


@pytest.mark.parametrize("fp16,suffix", [(False, ".tar"), (True, ".pth.tar")])
def test_import_fkd_round_trips_every_value(tmp_path, fp16, suffix, capsys):
    root, images, expect = _fkd_tree(tmp_path, fp16=fp16, suffix=suffix)
    dst = tmp_path / "imp.fkd"
    assert main(["import-fkd", str(root), str(dst), "--images", str(images), "--num-classes", "6"]) == 1  # idx up to 29
    assert "class index" in capsys.readouterr().err and not dst.exists()
    assert main(["import-fkd", str(root), str(dst), "--images", str(images), "--num-classes", str(C)]) == 0
    out = capsys.readouterr().out
    assert "imported 6 FKD label files (6 crops each, 30 classes" in out
    r = fkdstore.open(dst)
    assert r.codec == K.MarginalSmoothing(k=5) and r.complete and r.image_keys == sorted(expect)
    clamped = 0
    for n, key in enumerate(r.image_keys):
        e = expect[key]
        rec = r.read(n)
        assert r.image_sizes[n].tolist() == [e["H"], e["W"]]
        want = _pillow_rule(e["coords"], e["H"], e["W"])
        inside = (want[:, 0] + want[:, 2] <= e["H"]) & (want[:, 1] + want[:, 3] <= e["W"]) & (want[:, 2:] > 0).all(1)
        clamped += int((~inside).sum())
        np.testing.assert_array_equal(rec.boxes[inside], want[inside])
        if not fp16:  # float32 coords round back to the integer boxes exactly
            assert inside.all()
        np.testing.assert_array_equal(rec.flips, e["flip"])
        np.testing.assert_array_equal(rec.fields["indices"], e["labels"][:, 0, :].astype(np.int64))
        np.testing.assert_array_equal(rec.fields["probs"], e["labels"][:, 1, :].astype(np.float16))
        assert r.labels[n] == -1  # 3 class folders != 30 classes: ground truth unknown
    assert r.meta["import"]["coords_dtype"] == ("float16" if fp16 else "float32")
    assert r.meta["history"][0]["op"] == "import-fkd"
    assert verify(dst) == []


@pytest.mark.parametrize("fp16,codec,labels_flag", [(True, None, False), (False, None, True), (True, "hard", True)])
def test_import_fkd_records_the_common_import_keys(tmp_path, fp16, codec, labels_flag):
    """Spec section 9.1: `meta["import"]` holds format, source, files, order, binding, slots and flags; the
    flags name the labels only where the store does not hold the files' values bit for bit."""
    root, images, expect = _fkd_tree(tmp_path, fp16=fp16, n_classes=3, per_class=1, m=4)
    dst = tmp_path / "imp.fkd"
    import_fkd(root / "train", dst, images, num_classes=C, codec=codec)
    with fkdstore.open(dst) as r:
        imp = r.meta["import"]
        keys = r.image_keys
    assert {"format", "source", "files", "order", "binding", "slots", "flags"} <= set(imp), sorted(imp)
    assert imp["format"] == "fkd-release" and imp["source"] == str((root / "train").resolve())
    assert imp["files"] == len(expect) == 3 and imp["order"] == "listing" and keys == sorted(expect)
    assert "<class>/<stem>" in imp["binding"] and "slot r" in imp["slots"]
    assert isinstance(imp["flags"], list) and any("clipped" in f for f in imp["flags"])
    assert any(f.startswith("labels:") for f in imp["flags"]) == labels_flag, imp["flags"]


def test_fkd_boxes_is_pillows_rounding():
    rng = np.random.default_rng(1)
    coords = rng.random((500, 4)).astype(np.float16)
    coords[:10] = [0.5, 0.125, 0.25, 0.375]  # exact halves after scaling: round half to even
    for H, W in ((333, 500), (1023, 2047), (7, 9)):
        np.testing.assert_array_equal(fkd_boxes(coords, H, W), _pillow_rule(coords, H, W))


@pytest.mark.parametrize("kind,codec,k", [("topk", "mr", 3), ("topk", "hard", None), ("smoothing", None, None),
                                          ("hard", None, None)])
def test_import_fkd_codecs(tmp_path, kind, codec, k):
    root, images, expect = _fkd_tree(tmp_path, kind=kind, n_classes=C, per_class=1, m=3)
    dst = tmp_path / "imp.fkd"
    summary = import_fkd(root / "train", dst, images, codec=codec, k=k)  # classes from the data
    r = fkdstore.open(dst)
    name = codec or {"topk": "ms", "smoothing": "smoothing", "hard": "hard"}[kind]
    assert r.codec.name == name and summary["num_classes"] <= C
    for n, key in enumerate(r.image_keys):
        lab = expect[key]["labels"]
        f = r.read(n).fields
        top1 = {"topk": lambda a: a[:, 0, 0], "smoothing": lambda a: a[:, 0], "hard": lambda a: a}[kind](lab)
        np.testing.assert_array_equal(f["indices"][..., 0] if f["indices"].ndim == 2 else f["indices"], top1)
        if name == "mr":
            np.testing.assert_array_equal(f["probs"], lab[:, 1, :3].astype(np.float16))
        if name == "smoothing":
            np.testing.assert_array_equal(f["probs"], lab[:, 1].astype(np.float16))
    if summary["num_classes"] == C:
        np.testing.assert_array_equal(r.labels, [expect[key]["gt"] for key in r.image_keys])


def test_import_fkd_refusals(tmp_path, capsys):
    root, images, _ = _fkd_tree(tmp_path, kind="smoothing")
    assert main(["import-fkd", str(root), str(tmp_path / "a"), "--images", str(images), "--codec", "ms"]) == 0
    assert fkdstore.open(tmp_path / "a").codec == K.MarginalSmoothing(k=1)  # smoothing holds exactly a top-1
    assert main(["import-fkd", str(root), str(tmp_path / "b"), "--images", str(images), "--codec", "ms",
                 "--k", "5"]) == 1
    assert "keeps only the top-1 class and its probability" in capsys.readouterr().err
    (images / "n00000" / "n00000_0.JPEG").unlink()
    assert main(["import-fkd", str(root), str(tmp_path / "c"), "--images", str(images)]) == 1
    assert "1 label files have no image" in capsys.readouterr().err


def test_import_fkd_loads_without_executing_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.tar"
    torch.save([np.zeros((2, 4), np.float32), np.zeros(2, bool), Evil()], p)
    with pytest.raises(fkdstore.FkdstoreError, match="--trust-pickle"):
        load_fkd_file(p)
    assert "pwned" not in capsys.readouterr().out
    ok = tmp_path / "ok.tar"
    torch.save([np.zeros((2, 4), np.float16), np.zeros(2, bool), np.zeros((2, 2, 5), np.float16)], ok)
    assert [a.dtype for a in load_fkd_file(ok)] == [np.float16, np.bool_, np.float16]
