"""Label zoos imported into stores (fkdstore.importers: mldr, tinyvit, sre2l).

Each test writes the zoo's files itself, in the zoo's exact on-disk layout (pickle protocol, numpy objects
pickled under numpy 1's ``numpy.core`` or numpy 2's ``numpy._core`` module path, ``torch.save``, raw
little-endian records), imports them, and checks TorchDataset items against the zoo's own loader semantics,
re-implemented here with Pillow from the zoo's code (not with fkdstore's replay): crops pixel-identical where
fkdstore has the op, labels within float16.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import fkdstore
import fkdstore.verification
from fkdstore.errors import ExternalReplayError, LabelFileError, ValidationError
from fkdstore.importers import IMPORTERS, import_mldr, import_sre2l, import_tinyvit

RNG = np.random.default_rng(7)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ shared helpers
def make_images(root, sizes, classes=("n01", "n01-b", "n02")):
    """An image folder with classes whose names sort differently as paths and as ImageFolder classes
    ("n01-b/..." < "n01/..." as strings; ImageFolder takes class n01 first)."""
    paths = []
    for k, (h, w) in enumerate(sizes):
        c = classes[k % len(classes)]
        os.makedirs(root / c, exist_ok=True)
        p = root / c / f"img{k:02d}.png"
        Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def imagefolder_paths(root):
    """torchvision ImageFolder's sample order: classes sorted, files sorted within each class."""
    out = []
    for c in sorted(d for d in os.listdir(root) if (root / d).is_dir()):
        out += [root / c / f for f in sorted(os.listdir(root / c))]
    return out


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy's globals under numpy 1's module path ``numpy.core.*`` (files published in 2023)."""

    def save_global(self, obj, name=None):
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


NUMPY1 = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="numpy1_pickle")


def save(obj, path, *, numpy1=False, protocol=2):
    torch.save(obj, path, pickle_protocol=protocol, **({"pickle_module": NUMPY1} if numpy1 else {}))
    raw = open(path, "rb").read()
    assert (b"numpy.core" in raw) == (numpy1 and b"numpy" in raw)  # the module path the file references


def pil_crop(img, box, flip, size):
    """torchvision resized_crop on a PIL image (integer box: Pillow crop, then resize), then hflip."""
    t, l, h, w = box
    x = img.crop((l, t, l + w, t + h)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else x


def pil_crop_float(img, coords, flip, size):
    """SRe2L/FKD: float (i, j, h, w) = coords * (H, W, H, W) given to resized_crop; Pillow rounds the edges."""
    H, W = img.size[1], img.size[0]
    i, j = float(coords[0]) * H, float(coords[1]) * W
    h, w = float(coords[2]) * H, float(coords[3]) * W
    x = img.crop((j, i, j + w, i + h)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else x


def dense_ms(ids, probs, C):
    p = np.full(C, (1.0 - np.sum(probs)) / (C - len(ids)))
    p[np.asarray(ids)] = probs
    return p


def softmax(z, T=1.0):
    e = np.exp((z - z.max()) / T)
    return e / e.sum()


# ============================================================================================ ml-dr
MLDR_OPS = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def tv_magnitudes(num_bins, hw):
    """torchvision RandAugment._augmentation_space (float32 torch tables)."""
    H, W = hw
    lin = lambda a, b: torch.linspace(a, b, num_bins)  # noqa: E731
    return {"Identity": torch.tensor(0.0), "ShearX": lin(0.0, 0.3), "ShearY": lin(0.0, 0.3),
            "TranslateX": lin(0.0, 150.0 / 331.0 * W), "TranslateY": lin(0.0, 150.0 / 331.0 * H),
            "Rotate": lin(0.0, 30.0), "Brightness": lin(0.0, 0.9), "Color": lin(0.0, 0.9),
            "Contrast": lin(0.0, 0.9), "Sharpness": lin(0.0, 0.9),
            "Posterize": 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int(),
            "Solarize": lin(255.0, 0.0), "AutoContrast": torch.tensor(0.0), "Equalize": torch.tensor(0.0)}


def inverse_affine(center, angle, translate, scale, shear):
    """torchvision _get_inverse_affine_matrix (degrees), written from its documented equations."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def tv_apply_op(img, op, mag):
    """torchvision autoaugment._apply_op on a PIL image, NEAREST, fill 0 (ml-dr's RandAugment defaults)."""
    near, fill = Image.Resampling.NEAREST, (0, 0, 0)
    w, h = img.size
    if op in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(mag))
        m = inverse_affine((0.0, 0.0), 0.0, (0.0, 0.0), 1.0, (deg, 0.0) if op == "ShearX" else (0.0, deg))
        return img.transform(img.size, Image.Transform.AFFINE, m, near, fillcolor=fill)
    if op in ("TranslateX", "TranslateY"):
        t = (int(mag), 0) if op == "TranslateX" else (0, int(mag))
        m = inverse_affine((w * 0.5, h * 0.5), 0.0, t, 1.0, (0.0, 0.0))
        return img.transform(img.size, Image.Transform.AFFINE, m, near, fillcolor=fill)
    if op == "Rotate":
        return img.rotate(mag, near, expand=False, center=None, fillcolor=fill)
    enh = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
           "Sharpness": ImageEnhance.Sharpness}
    if op in enh:
        return enh[op](img).enhance(1.0 + mag)
    if op == "Posterize":
        return ImageOps.posterize(img, int(mag))
    if op == "Solarize":
        return ImageOps.solarize(img, mag)
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    return img


MLDR_SIZE = (24, 24)


def mldr_config(ns, k, mixing=True):
    aug = {"uint8": {"enable": True}, "random_resized_crop": {"enable": True, "size": MLDR_SIZE[0]},
           "random_horizontal_flip": {"enable": True, "p": 0.5}, "rand_augment": {"enable": True, "p": 0.75},
           "to_tensor": {"enable": True}, "normalize": {"mean": list(MEAN), "std": list(STD)},
           "random_erase": {"enable": True, "p": 0.5}, "auto_augment": {"enable": False}}
    if mixing:
        aug |= {"mixup": {"enable": True, "alpha": 1.0, "div_by": 2.0, "p": 0.5},
                "cutmix": {"enable": True, "alpha": 1.0, "p": 0.5}}
    return {"dataset": "imagenet", "num_classes": 10, "seed": None,
            "reinforce": {"num_samples": ns, "topk": k, "compress": True, "joblib": False, "gzip": False,
                          "image_augmentation": aug}}


def mldr_sample_params(rng, img_hw, table, num_bins=31, magnitude=9):
    """One crop's parameters as ml-dr draws them: an integer RRC box, a flip, RandAugment (op index, float32
    magnitude) pairs or None, a RandomErasing box (top, left, h, w) or None."""
    H, W = img_hw
    h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
    box = (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w)
    flip = bool(rng.random() < 0.5)
    ra = None
    if rng.random() < 0.75:
        ra = []
        for _ in range(2):
            op = int(rng.integers(0, 14))
            name = MLDR_OPS[op]
            t = table[name]
            mag = float(t[magnitude].item()) if t.ndim > 0 else 0.0
            if name in SIGNED and rng.random() < 0.5:
                mag *= -1.0
            ra.append((op, mag))
    er = None
    if rng.random() < 0.5:
        eh, ew = int(rng.integers(1, MLDR_SIZE[0])), int(rng.integers(1, MLDR_SIZE[1]))
        er = (int(rng.integers(0, MLDR_SIZE[0] - eh + 1)), int(rng.integers(0, MLDR_SIZE[1] - ew + 1)), eh, ew)
    return box, flip, ra, er


def write_mldr(folder, images, ns=4, k=3, C=10, mixing=True, seed=0):
    """ml-dr's reinforce.py output: config.pth.tar and {id}.pth.tar per ImageFolder index (protocol 4);
    returns {id: [(params dict, prob)]} with the uncompressed params for the reference replay."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    torch.save(mldr_config(ns, k, mixing), folder / "config.pth.tar")
    ordered = imagefolder_paths(images)
    sizes = [Image.open(p).size[::-1] for p in ordered]
    table = tv_magnitudes(31, MLDR_SIZE)
    truth = {}
    for i in range(len(ordered)):
        records, plain = [], []
        for _ in range(ns):
            own = mldr_sample_params(rng, sizes[i], table)
            id2, part, mix, cut = None, None, None, None
            if mixing:
                j = int(rng.integers(0, len(ordered)))  # ml-dr may pair an image with itself
                mix = float(rng.beta(1.0, 1.0) / 2.0) if rng.random() < 0.5 else None
                if rng.random() < 0.5:
                    lam = float(rng.beta(1.0, 1.0))
                    r = math.sqrt(1.0 - lam)
                    ch, cw = int(MLDR_SIZE[0] * r), int(MLDR_SIZE[1] * r)
                    cx, cy = int(rng.integers(MLDR_SIZE[0])), int(rng.integers(MLDR_SIZE[1]))
                    cut = [lam, np.clip(cx - ch // 2, 0, MLDR_SIZE[0]), np.clip(cy - cw // 2, 0, MLDR_SIZE[1]),
                           np.clip(cx + ch // 2, 0, MLDR_SIZE[0]), np.clip(cy + cw // 2, 0, MLDR_SIZE[1])]
                    assert isinstance(cut[1], np.int64)
                if mix is not None or cut is not None:
                    id2, part = j, mldr_sample_params(rng, sizes[j], table)
            if id2 is None:
                compressed = ([None] if mixing else []) + [own[0], own[1], own[2], own[3]]
                if mixing:
                    compressed += [None, None]
            else:
                compressed = [id2] + [[own[q], part[q]] for q in range(4)] + [mix, cut]
            p = rng.random(C).astype(np.float32)
            p /= p.sum()
            ids = np.argpartition(p, -k)[-k:]
            prob = (p[ids].tolist(), ids.tolist())
            records.append({"params": compressed, "prob": prob})
            plain.append({"own": own, "id2": id2, "part": part, "mixup": mix, "cutmix": cut, "prob": prob})
        save((i, records), folder / f"{i}.pth.tar", numpy1=i % 2 == 0, protocol=4)
        truth[i] = plain
    return truth, ordered


def mldr_reference(rec, ordered, store_index_of):
    """ReinforcedDataset.__getitem__ for one record, in the uint8 domain before normalisation: the float
    result of Mixup is returned as float (ml-dr mixes floats)."""
    def prep(path, params):
        box, flip, ra, er = params
        x = pil_crop(Image.open(path).convert("RGB"), box, flip, MLDR_SIZE)
        for op, mag in ra or ():
            x = tv_apply_op(x, MLDR_OPS[op], mag)
        a = np.asarray(x, dtype=np.float64)
        if er is not None:
            t, l, h, w = er
            a[t:t + h, l:l + w] = 0.0
        return a

    x = prep(rec["path"], rec["own"])
    if rec["id2"] is not None:
        y = prep(ordered[rec["id2"]], rec["part"])
        if rec["mixup"] is not None:
            x = rec["mixup"] * x + (1 - rec["mixup"]) * y
        if rec["cutmix"] is not None:
            _, y1, x1, y2, x2 = rec["cutmix"]
            x[y1:y2, x1:x2] = y[y1:y2, x1:x2]
    return x


@pytest.fixture(scope="module")
def mldr(tmp_path_factory):
    root = tmp_path_factory.mktemp("mldr")
    images = root / "train"
    make_images(images, [(31, 40), (45, 29), (33, 33), (50, 38), (27, 60), (36, 30)])
    truth, ordered = write_mldr(root / "reinforced_data", images)
    summary = import_mldr(root / "reinforced_data", root / "labels.fkd", images, progress=False)
    return types.SimpleNamespace(root=root, images=images, truth=truth, ordered=ordered, summary=summary)


def test_mldr_items_equal_reinforced_dataset(mldr):
    keys = fkdstore.images.list_images(mldr.images).keys
    dataset_index = {str(p.relative_to(mldr.images)): k for k, p in enumerate(mldr.ordered)}
    ds = fkdstore.TorchDataset(mldr.root / "labels.fkd", mldr.images, crops_per_sample=4, normalize=False)
    assert ds.output_size == MLDR_SIZE and ds.interpolation == "bilinear"
    mixed_up = exact = 0
    for item in range(len(ds)):
        got = ds[item]
        k = dataset_index[keys[item]]
        for c, s in enumerate(got["slots"].tolist()):
            rec = dict(mldr.truth[k][s], path=mldr.ordered[k])
            want = mldr_reference(rec, mldr.ordered, None)
            crop = got["crops"][c].permute(1, 2, 0).numpy().astype(np.float64)
            if rec["id2"] is not None and rec["mixup"] is not None:
                assert np.abs(crop - want).max() <= 0.5 + 1e-9  # fkdstore rounds the float mix to uint8
                mixed_up += 1
            else:
                np.testing.assert_array_equal(crop, want)
                exact += 1
            assert bool(got["mixed"][c]) == (rec["id2"] is not None)
            ids, probs = rec["prob"][1], rec["prob"][0]
            np.testing.assert_allclose(got["soft_labels"][c].numpy(), dense_ms(ids, probs, 10), atol=2e-3, rtol=0)
    assert mixed_up and exact  # the fixture exercised both


def test_mldr_crop_and_flip_only_config(tmp_path):
    images = tmp_path / "train"
    make_images(images, [(31, 40), (45, 29), (33, 33)])
    cfg = mldr_config(3, 2, mixing=False)
    for t in ("rand_augment", "random_erase"):
        cfg["reinforce"]["image_augmentation"][t]["enable"] = False
    truth, ordered = write_mldr(tmp_path / "rd", images, ns=3, k=2, mixing=False)
    torch.save(cfg, tmp_path / "rd" / "config.pth.tar")
    for k, plain in truth.items():  # the records of this config hold [box, flip] only
        recs = [{"params": [p["own"][0], p["own"][1]], "prob": p["prob"]} for p in plain]
        save((k, recs), tmp_path / "rd" / f"{k}.pth.tar", protocol=4)
    import_mldr(tmp_path / "rd", tmp_path / "cf.fkd", images, progress=False)
    r = fkdstore.open(tmp_path / "cf.fkd")
    assert len(r.header.augment) == 0 and r.crops_per_image == 3
    keys = fkdstore.images.list_images(images).keys
    ds = fkdstore.TorchDataset(r, images, crops_per_sample=3, normalize=False)
    for item in range(len(ds)):
        got = ds[item]
        k = next(j for j, p in enumerate(ordered) if str(p.relative_to(images)) == keys[item])
        for c, s in enumerate(got["slots"].tolist()):
            box, flip = truth[k][s]["own"][:2]
            want = np.asarray(pil_crop(Image.open(ordered[k]).convert("RGB"), box, flip, MLDR_SIZE))
            np.testing.assert_array_equal(got["crops"][c].permute(1, 2, 0).numpy(), want)


def test_mldr_columns_and_summary(mldr):
    r = fkdstore.open(mldr.root / "labels.fkd")
    names = [p.name for p in r.header.augment.policies]
    assert names == ["randaugment", "random_erasing", "partner_crop", "mixup_exact", "cutmix_box"]
    assert r.crops_per_image == 4 and r.codec.get_config()["name"] == "ms" and r.codec.k == 3
    imp = r.meta["import"]
    assert imp["format"] == "ml-dr" and any("rounded to uint8" in f for f in imp["flags"])
    assert r.meta["history"][0]["op"] == "import-mldr"
    s = mldr.summary
    assert s["images"] == 6 and s["crops_per_image"] == 4 and "cutmix" in s["carried"] and s["bytes_after"] > 0
    assert fkdstore.verification.verify(mldr.root / "labels.fkd") == []


# ============================================================================================ SRe2L
SRE_SIZE = 20  # --input-size of the fixtures (SRe2L's loader: RandomResizedCrop(size), bilinear)


def rrc_box(rng, H, W):
    """An integer RandomResizedCrop box (top, left, h, w), as torchvision's get_params returns."""
    h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
    return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w


def write_sre2l(folder, images, *, B=3, epochs=3, mix="cutmix", C=12, seed=42, fp16_coords=False):
    """generate_soft_label.py's output: epoch_{e}/batch_{b}.tar, rows in the order of a DataLoader over
    RandomSampler(generator seeded `seed`); returns {(epoch, dataset index): (file, row)} and the batches."""
    rng = np.random.default_rng(1)
    ordered = imagefolder_paths(images)
    N = len(ordered)
    g = torch.Generator()
    g.manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(N)), batch_size=B,
                                         sampler=torch.utils.data.RandomSampler(range(N), generator=g))
    where, batches = {}, {}
    for e in range(epochs):
        os.makedirs(folder / f"epoch_{e}", exist_ok=True)
        for b, (idx,) in enumerate(loader):
            coords, flips = [], []
            for i in idx.tolist():
                W, H = Image.open(ordered[i]).size
                t, l, h, w = rrc_box(rng, H, W)
                coords.append(torch.FloatTensor((t / H, l / W, h / H, w / W)))
                flips.append(bool(rng.random() < 0.5))
            coords, flip = torch.stack(coords), torch.tensor(flips)
            n = len(idx)
            mix_index = lam = bbox = None
            if mix is not None:
                mix_index = torch.randperm(n)
                lam = float(rng.beta(1.0, 1.0))
                if mix == "cutmix":
                    r = np.sqrt(1.0 - lam)
                    cw = ch = int(SRE_SIZE * r)
                    cx, cy = int(rng.integers(SRE_SIZE)), int(rng.integers(SRE_SIZE))
                    bbox = [np.clip(cx - cw // 2, 0, SRE_SIZE), np.clip(cy - ch // 2, 0, SRE_SIZE),
                            np.clip(cx + cw // 2, 0, SRE_SIZE), np.clip(cy + ch // 2, 0, SRE_SIZE)]
            logits = torch.from_numpy(RNG.normal(0, 3, (n, C))).half()
            path = folder / f"epoch_{e}" / f"batch_{b}.tar"
            save([coords.half() if fp16_coords else coords, flip, mix_index, lam, bbox, logits], path,
                 numpy1=(e + b) % 2 == 1)
            batches[(e, b)] = dict(idx=idx.tolist(), coords=coords, flip=flips, mix_index=mix_index, lam=lam,
                                   bbox=bbox, logits=logits.float().numpy())
            for r, i in enumerate(idx.tolist()):
                where[(e, i)] = ((e, b), r)
    return where, batches, ordered


def sre2l_reference(batch, r, ordered):
    """ImageFolder_FKD_MIX + mix_aug for row r of one batch file, uint8 domain (Mixup stays float)."""
    def crop(k):
        img = Image.open(ordered[batch["idx"][k]]).convert("RGB")
        return np.asarray(pil_crop_float(img, batch["coords"][k].tolist(), batch["flip"][k], (SRE_SIZE, SRE_SIZE)),
                          np.float64)

    x = crop(r)
    if batch["mix_index"] is not None:
        y = crop(int(batch["mix_index"][r]))
        if batch["bbox"] is None:
            x = batch["lam"] * x + (1 - batch["lam"]) * y
        else:
            y1, x1, y2, x2 = (int(v) for v in batch["bbox"])
            x[y1:y2, x1:x2] = y[y1:y2, x1:x2]
    return x


@pytest.fixture(scope="module")
def sre2l(tmp_path_factory):
    root = tmp_path_factory.mktemp("sre2l")
    images = root / "syn"
    make_images(images, [(30, 41), (44, 28), (35, 35), (52, 40), (29, 61), (38, 31), (33, 47)])
    where, batches, ordered = write_sre2l(root / "FKD_cutmix_fp16", images)
    summary = import_sre2l(root / "FKD_cutmix_fp16", root / "labels.fkd", images, input_size=SRE_SIZE,
                           progress=False)
    return types.SimpleNamespace(root=root, images=images, where=where, batches=batches, ordered=ordered,
                                 summary=summary)


def test_sre2l_items_equal_the_patched_loader(sre2l):
    keys = fkdstore.images.list_images(sre2l.images).keys
    dataset_index = {str(p.relative_to(sre2l.images)): k for k, p in enumerate(sre2l.ordered)}
    assert sre2l.summary["slots"] == "epoch" and sre2l.summary["crops_per_image"] == 3
    assert fkdstore.verification.verify(sre2l.root / "labels.fkd") == []
    for T in (1.0, 3.0):
        ds = fkdstore.TorchDataset(sre2l.root / "labels.fkd", sre2l.images, crops_per_sample=3, normalize=False,
                                   temperature=T)
        for item in range(len(ds)):
            got = ds[item]
            k = dataset_index[keys[item]]
            for c, epoch in enumerate(got["slots"].tolist()):
                (eb, r) = sre2l.where[(epoch, k)]
                batch = sre2l.batches[eb]
                crop = got["crops"][c].permute(1, 2, 0).numpy().astype(np.float64)
                np.testing.assert_array_equal(crop, sre2l_reference(batch, r, sre2l.ordered))  # cutmix: exact
                want = softmax(batch["logits"][r], T)  # train_FKD: softmax(soft_label / T)
                np.testing.assert_allclose(got["soft_labels"][c].numpy(), want, rtol=2e-2, atol=1e-5)
                partner = batch["idx"][int(batch["mix_index"][r])]
                assert bool(got["mixed"][c])
                assert got["partner_target"][c, 0] == fkdstore.images.list_images(sre2l.images).labels[
                    keys.index(str(sre2l.ordered[partner].relative_to(sre2l.images)))]


def test_sre2l_any_batch_size_gives_the_same_items(sre2l):
    ds = fkdstore.TorchDataset(sre2l.root / "labels.fkd", sre2l.images, crops_per_sample=2, normalize=False)
    seen = {}
    for bs in (1, 2, 5):  # the labels were generated at batch size 3
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, collate_fn=fkdstore.collate,
                                             generator=torch.Generator().manual_seed(bs))
        got = {}
        for batch in loader:
            for row in range(len(batch["index"])):
                key = (int(batch["index"][row]), int(batch["slots"][row]))
                got[key] = (batch["crops"][row].clone(), batch["soft_labels"][row].clone())
        if seen:
            assert got.keys() == seen.keys()
            for key in got:
                assert torch.equal(got[key][0], seen[key][0]) and torch.equal(got[key][1], seen[key][1])
        seen = got
    assert len(seen) == len(ds) * 2


def test_sre2l_mixup_and_plain_runs(tmp_path):
    images = tmp_path / "syn"
    make_images(images, [(30, 41), (44, 28), (35, 35), (52, 40), (29, 61)])
    keys = fkdstore.images.list_images(images).keys
    for mix in ("mixup", None):
        where, batches, ordered = write_sre2l(tmp_path / f"fkd_{mix}", images, B=2, epochs=2, mix=mix,
                                              fp16_coords=True)
        import_sre2l(tmp_path / f"fkd_{mix}", tmp_path / f"{mix}.fkd", images, input_size=SRE_SIZE, progress=False)
        r = fkdstore.open(tmp_path / f"{mix}.fkd")
        assert [p.name for p in r.header.augment.policies] == (["mixup_exact"] if mix else [])
        dataset_index = {str(p.relative_to(images)): k for k, p in enumerate(ordered)}
        ds = fkdstore.TorchDataset(r, images, crops_per_sample=2, normalize=False)
        for item in range(len(ds)):
            got = ds[item]
            for c, epoch in enumerate(got["slots"].tolist()):
                eb, row = where[(epoch, dataset_index[keys[item]])]
                want = sre2l_reference(batches[eb], row, ordered)
                crop = got["crops"][c].permute(1, 2, 0).numpy().astype(np.float64)
                assert np.abs(crop - want).max() <= (0.5 + 1e-9 if mix else 0.0)
                if mix:
                    assert float(got["lam"][c]) == pytest.approx(batches[eb]["lam"], rel=1e-6)


def write_lpqld(folder, images, *, B=2, epochs=3, K=4, C=9, sample_min=False):
    """generate_soft_label_pruning_batch.py with label pruning (drop_last) and --label_quantization: flat
    batch_{counter}.tar of [coords fp16, flip, mix_index uint8, lam, bbox 4 x uint8, top-K logits fp16,
    int16 indices(, sample_min)] and sampler_indices_batch.json."""
    rng = np.random.default_rng(3)
    ordered = imagefolder_paths(images)
    N = len(ordered)
    g = torch.Generator()
    g.manual_seed(42)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(N)), batch_size=B,
                                         sampler=torch.utils.data.RandomSampler(range(N), generator=g),
                                         drop_last=True)
    os.makedirs(folder, exist_ok=True)
    table, batches, counter = {}, {}, 0
    for _ in range(epochs):
        for (idx,) in loader:
            coords, flips = [], []
            for i in idx.tolist():
                W, H = Image.open(ordered[i]).size
                t, l, h, w = rrc_box(rng, H, W)
                coords.append(torch.FloatTensor((t / H, l / W, h / H, w / W)))
                flips.append(bool(rng.random() < 0.5))
            mix_index = torch.randperm(len(idx)).to(torch.uint8)
            lam = float(rng.beta(1.0, 1.0))
            cw = int(SRE_SIZE * np.sqrt(1 - lam))
            cx, cy = int(rng.integers(SRE_SIZE)), int(rng.integers(SRE_SIZE))
            box = [np.clip(cx - cw // 2, 0, SRE_SIZE), np.clip(cy - cw // 2, 0, SRE_SIZE),
                   np.clip(cx + cw // 2, 0, SRE_SIZE), np.clip(cy + cw // 2, 0, SRE_SIZE)]
            full = torch.from_numpy(RNG.normal(0, 3, (len(idx), C))).float()
            top = torch.topk(full, K, dim=1)
            entry = [torch.stack(coords).half(), torch.tensor(flips), mix_index, lam,
                     [torch.tensor(v, dtype=torch.uint8) for v in box], top.values.half(), top.indices.short()]
            if sample_min:
                entry.append(full.min(dim=1, keepdim=True)[0].half())
            save(entry, folder / f"batch_{counter}.tar")
            table[str(counter)] = idx.tolist()
            batches[counter] = entry
            counter += 1
    with open(folder / "sampler_indices_batch.json", "w") as f:
        json.dump(table, f)
    return table, batches, ordered


def test_lpqld_flat_pruned_topk_logits(tmp_path):
    images = tmp_path / "syn"
    make_images(images, [(30, 41), (44, 28), (35, 35), (52, 40), (29, 61)])  # 5 images, batch 2: one dropped
    table, batches, ordered = write_lpqld(tmp_path / "lpqld", images)
    s = import_sre2l(tmp_path / "lpqld", tmp_path / "lpqld.fkd", images, num_classes=9, input_size=SRE_SIZE,
                     progress=False)
    assert s["slots"] == "occurrence" and s["codec"]["name"] == "mr"  # epochs miss one image each
    counts = np.bincount(np.concatenate([np.asarray(v) for v in table.values()]), minlength=5)
    assert s["crops_per_image"] == counts.min() and s["skipped"]["records_beyond_M"] == (counts - counts.min()).sum()
    r = fkdstore.open(tmp_path / "lpqld.fkd")
    assert [p.name for p in r.header.augment.policies] == ["partner_crop", "cutmix_box"]
    keys = fkdstore.images.list_images(images).keys
    dataset_index = {str(p.relative_to(images)): k for k, p in enumerate(ordered)}
    occurrences = {}  # (dataset index, occurrence) -> (batch counter, row)
    for c in range(len(table)):
        for row, i in enumerate(table[str(c)]):
            occurrences[(i, sum(1 for key in occurrences if key[0] == i))] = (c, row)
    for T in (1.0, 4.0):
        ds = fkdstore.TorchDataset(r, images, crops_per_sample=s["crops_per_image"], normalize=False, temperature=T)
        for item in range(len(ds)):
            got = ds[item]
            k = dataset_index[keys[item]]
            for c, slot in enumerate(got["slots"].tolist()):
                counter, row = occurrences[(k, slot)]
                e = batches[counter]
                batch = dict(idx=table[str(counter)], coords=e[0], flip=e[1].tolist(), mix_index=e[2], lam=e[3],
                             bbox=[int(v) for v in e[4]])
                crop = got["crops"][c].permute(1, 2, 0).numpy().astype(np.float64)
                np.testing.assert_array_equal(crop, sre2l_reference(batch, row, ordered))
                want = np.zeros(9)
                want[e[6][row].long().numpy()] = softmax(e[5][row].float().numpy(), T)  # MR: softmax over top-K
                np.testing.assert_allclose(got["soft_labels"][c].numpy(), want, rtol=2e-3, atol=1e-6)


def test_lpqld_mrs_fill_logit(tmp_path):
    images = tmp_path / "syn"
    make_images(images, [(30, 41), (44, 28), (35, 35), (52, 40)])
    table, batches, _ = write_lpqld(tmp_path / "mrs", images, epochs=2, sample_min=True)
    s = import_sre2l(tmp_path / "mrs", tmp_path / "mrs.fkd", images, num_classes=9, input_size=SRE_SIZE,
                     progress=False)
    assert s["slots"] == "epoch"
    assert s["codec"] == {"name": "logits", "k": 4, "dtype": "float32", "tail": None, "centred": False}
    r = fkdstore.open(tmp_path / "mrs.fkd")
    order = np.argsort([str(p.relative_to(images)) for p in imagefolder_paths(images)])
    store_of = np.empty(4, np.int64)
    store_of[order] = np.arange(4)
    for counter, entry in batches.items():
        for row, i in enumerate(table[str(counter)]):
            epoch = counter // 2
            fields = r.read(int(store_of[i]), [epoch]).fields
            dense = np.full(9, float(entry[7][row]))
            dense[entry[6][row].long().numpy()] = entry[5][row].float().numpy()
            for T in (1.0, 20.0):
                got = r.codec.decode(fields, 9, temperature=T)[0]
                # train_FKD_LPQLD (MRS): the source's logits are float16, so "within float16"
                np.testing.assert_allclose(got, softmax(dense, T), rtol=1e-3, atol=1e-7)


# ============================================================================================ TinyViT
def write_tinyvit(folder, images, *, epochs=(3, 4), world=2, K=4, C=11, mixing=True):
    """save_logits.py's output: per epoch and rank, keys (str(ImageFolder index)) in MyDistributedSampler
    order (seed 0 + epoch, padded, pairs when mixing), the writer keeping a key's first record per file, and
    records of int32 seed + K int16 indices (descending) + K float16 probabilities. Returns, per (epoch,
    dataset index), every (global position, seed, indices, values, pair-mate index, pair-mate seed)."""
    rng = np.random.default_rng(5)
    N = len(imagefolder_paths(images))
    rec = np.dtype([("seed", "<i4"), ("idx", "<i2", (K,)), ("val", "<f2", (K,))])
    written = {}
    for e in epochs:
        d = folder / f"logits_top{K}_epoch{e}"
        os.makedirs(d, exist_ok=True)
        g = torch.Generator()
        g.manual_seed(0 + e)
        order = torch.randperm(N, generator=g)
        T = 2 * world if mixing else world
        total = -(-N // T) * T
        order = torch.cat([order, order[:total - N]])
        for r in range(world):
            seq = (order.view(-1, 2)[r::world].flatten() if mixing else order[r::world]).tolist()
            seeds = rng.integers(0, 1 << 31, len(seq)).astype(np.int32)
            keys, recs = [], []
            for p, i in enumerate(seq):
                p_global = ((p // 2) * world + r) * 2 + p % 2 if mixing else p * world + r
                prob = np.sort(rng.random(C))[::-1]
                prob = prob / prob.sum() * 0.95
                idx = np.argsort(-rng.random(C))[:K]
                mate = p ^ 1 if mixing else None
                written.setdefault((e, i), []).append(
                    (p_global, int(seeds[p]), idx, prob[:K].astype(np.float16),
                     seq[mate] if mixing else -1, int(seeds[mate]) if mixing else 0))
                if str(i) in keys:
                    continue  # manager._Writer: `if key in keys: continue`
                keys.append(str(i))
                recs.append((seeds[p], idx.astype(np.int16), prob[:K].astype(np.float16)))
            with open(d / f"rank{r}-keys.txt", "w") as f:
                f.write("".join(k + "\n" for k in keys))
            np.array(recs, dtype=rec).tofile(d / f"rank{r}-values.bin")
    return written


@pytest.fixture(scope="module")
def tinyvit(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyvit")
    images = root / "train"
    make_images(images, [(30, 41), (44, 28), (35, 35), (52, 40), (29, 61), (38, 31), (33, 47)])  # 7: padding
    written = write_tinyvit(root / "logits", images)
    summary = import_tinyvit(root / "logits", root / "labels.fkd", images, num_classes=11, progress=False)
    return types.SimpleNamespace(root=root, images=images, written=written, summary=summary)


def _expected_tinyvit(written, e, i):
    return min(written[(e, i)], key=lambda t: t[0])  # the image's own draw: its smallest sampler position


def replay_stub(image, params, partner_image, output_size):
    """A stand-in for the user's timm replay: pixels and lam as functions of the seeds and images."""
    H, W = output_size
    x = np.full((H, W, 3), params["external_seed"] % 251, np.uint8)
    x[0, 0] = image.size[0] % 256
    if partner_image is None:
        return x
    x[0, 1] = partner_image.size[0] % 256
    return x, ((params["external_seed"] ^ params["external_partner_seed"]) % 100) / 100.0


def test_tinyvit_labels_seeds_and_pairs(tinyvit):
    s = tinyvit.summary
    assert s["epochs"] == [3, 4] and s["crops_per_image"] == 2 and s["skipped"]["padding_duplicates"] == 2
    listing = fkdstore.images.list_images(tinyvit.images)
    ordered = imagefolder_paths(tinyvit.images)
    dataset_index = {str(p.relative_to(tinyvit.images)): k for k, p in enumerate(ordered)}
    store_of = {k: listing.keys.index(str(p.relative_to(tinyvit.images))) for k, p in enumerate(ordered)}
    with pytest.raises(ExternalReplayError, match="timm"):
        fkdstore.TorchDataset(tinyvit.root / "labels.fkd", tinyvit.images)
    r = fkdstore.open(tinyvit.root / "labels.fkd")  # labels load without the replay
    ds = fkdstore.TorchDataset(r, tinyvit.images, crops_per_sample=2, normalize=False, external_replay=replay_stub)
    for item in range(len(ds)):
        got = ds[item]
        k = dataset_index[listing.keys[item]]
        for c, slot in enumerate(got["slots"].tolist()):
            pos, seed, idx, val, mate, mate_seed = _expected_tinyvit(tinyvit.written, (3, 4)[slot], k)
            rec = r.read(item, [slot])
            assert int(rec.aug["external_seed"][0]) == seed
            assert int(rec.aug["external_partner"][0]) == store_of[mate]
            assert int(rec.aug["external_partner_seed"][0]) == mate_seed
            want = np.full(11, (1.0 - val.astype(np.float64).sum()) / (11 - 4))  # main.py's minor_value
            want[idx] = val
            np.testing.assert_allclose(got["soft_labels"][c].numpy(), want, atol=1e-6, rtol=1e-3)
            crop = got["crops"][c].permute(1, 2, 0).numpy()
            assert crop[5, 5, 0] == seed % 251 and crop[0, 1, 0] == Image.open(ordered[mate]).size[0] % 256
            assert float(got["lam"][c]) == pytest.approx(((seed ^ mate_seed) % 100) / 100.0)
            assert got["partner_target"][c, 0] == listing.labels[store_of[mate]]
    text = fkdstore.report.format_inspect(fkdstore.report.inspect(tinyvit.root / "labels.fkd", sample=16))
    assert "pixels     replayed by external replay: timm" in text and "seed_a ^ seed_b" in text
    assert fkdstore.verification.verify(tinyvit.root / "labels.fkd") == []


def test_tinyvit_rank_file_deduplication_rebuilds_the_sampler(tmp_path):
    images = tmp_path / "train"
    make_images(images, [(30, 41), (44, 28), (35, 35), (52, 40), (29, 61)])  # 5 images, 1 rank, pairs: 1 padded
    written = write_tinyvit(tmp_path / "logits", images, epochs=(0,), world=1)
    lines = open(tmp_path / "logits" / "logits_top4_epoch0" / "rank0-keys.txt").read().split()
    assert len(lines) == 5  # the writer dropped the padded duplicate
    s = import_tinyvit(tmp_path / "logits", tmp_path / "t.fkd", images, num_classes=11, progress=False)
    assert any("dropped" in f for f in s["flags"])
    r = fkdstore.open(tmp_path / "t.fkd")
    listing = fkdstore.images.list_images(images)
    for k, p in enumerate(imagefolder_paths(images)):
        i = listing.keys.index(str(p.relative_to(images)))
        _, seed, _, _, mate, _ = _expected_tinyvit(written, 0, k)
        rec = r.read(i, [0])
        assert int(rec.aug["external_seed"][0]) == seed
        assert listing.keys[int(rec.aug["external_partner"][0])] == str(imagefolder_paths(images)[mate].relative_to(
            images))


# ============================================================================================ bad input
def _small_zoo(tmp_path, zoo):
    """A small label set of ``zoo`` in its layout: (images, src, importer kwargs)."""
    images = tmp_path / "imgs"
    make_images(images, [(30, 41), (44, 28), (35, 35), (29, 33)])
    if zoo == "mldr":
        write_mldr(tmp_path / "src", images, ns=2)
        return images, tmp_path / "src", {}
    if zoo == "sre2l":
        write_sre2l(tmp_path / "src", images, B=3, epochs=2)
        return images, tmp_path / "src", {"input_size": SRE_SIZE}
    write_tinyvit(tmp_path / "src", images, epochs=(0, 1), world=1)
    return images, tmp_path / "src", {"num_classes": 11}


IMPORT = {"mldr": import_mldr, "sre2l": import_sre2l, "tinyvit": import_tinyvit}
ONE_FILE = {"mldr": "1.pth.tar", "sre2l": "epoch_1/batch_1.tar", "tinyvit": "logits_top4_epoch1/rank0-values.bin"}


def _nothing_written(dst):
    return not dst.exists() or not any(dst.iterdir())


@pytest.mark.parametrize("zoo", sorted(IMPORT))
def test_truncated_file_is_named_and_nothing_is_imported(tmp_path, zoo):
    images, src, kw = _small_zoo(tmp_path, zoo)
    path = src / ONE_FILE[zoo]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 - 1])
    with pytest.raises(LabelFileError, match=ONE_FILE[zoo].split("/")[-1]):
        IMPORT[zoo](src, tmp_path / "out.fkd", images, progress=False, **kw)
    assert _nothing_written(tmp_path / "out.fkd")


@pytest.mark.parametrize("zoo", sorted(IMPORT))
def test_labels_of_another_image_set_are_refused(tmp_path, zoo):
    images, src, kw = _small_zoo(tmp_path, zoo)
    os.remove(sorted(images.rglob("*.png"))[-1])  # the labels name an image the folder no longer has
    with pytest.raises((ValidationError, LabelFileError), match="another image set|another run|image count"):
        IMPORT[zoo](src, tmp_path / "out.fkd", images, progress=False, **kw)
    assert _nothing_written(tmp_path / "out.fkd")


@pytest.mark.parametrize("zoo", sorted(IMPORT))
def test_a_file_from_another_epoch_count_is_refused(tmp_path, zoo):
    images, src, kw = _small_zoo(tmp_path, zoo)
    other = tmp_path / "other"
    if zoo == "mldr":  # a record file of a run with another num_samples
        write_mldr(other, images, ns=3)
        os.replace(other / "2.pth.tar", src / "2.pth.tar")
        match = "holds 3 records"
    elif zoo == "sre2l":  # an epoch folder of a run with another batch size
        write_sre2l(other, images, B=2, epochs=3)
        os.rename(other / "epoch_2", src / "epoch_2")
        match = "from another run, batch size"
    else:  # an epoch folder of a run with another top-K
        write_tinyvit(other, images, epochs=(2,), world=1, K=3)
        os.rename(other / "logits_top3_epoch2", src / "logits_top3_epoch2")
        match = "two runs are mixed"
    with pytest.raises(LabelFileError, match=match):
        IMPORT[zoo](src, tmp_path / "out.fkd", images, progress=False, **kw)
    assert _nothing_written(tmp_path / "out.fkd")


def test_unsupported_parameters_are_refused_by_name(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, [(30, 41), (44, 28)])
    cfg = mldr_config(2, 3)
    cfg["reinforce"]["image_augmentation"]["center_crop"] = {"size": 20}
    os.makedirs(tmp_path / "mldr")
    torch.save(cfg, tmp_path / "mldr" / "config.pth.tar")
    with pytest.raises(LabelFileError, match=r"\['center_crop'\]"):
        import_mldr(tmp_path / "mldr", tmp_path / "a.fkd", images, progress=False)
    os.makedirs(tmp_path / "lpqld")  # LPQLD with RandAugment before the crop: rand_params
    rows = [torch.zeros(2, 4).half(), torch.tensor([True, False]), [[torch.zeros(2), torch.zeros(2)]], None, None,
            None, torch.zeros(2, 3).half(), torch.zeros(2, 3).short()]
    save(rows, tmp_path / "lpqld" / "batch_0.tar")
    with open(tmp_path / "lpqld" / "sampler_indices_batch.json", "w") as f:
        json.dump({"0": [0, 1]}, f)
    with pytest.raises(LabelFileError, match="rand_params"):
        import_sre2l(tmp_path / "lpqld", tmp_path / "b.fkd", images, num_classes=5, progress=False)
    assert _nothing_written(tmp_path / "a.fkd") and _nothing_written(tmp_path / "b.fkd")


# ============================================================================================ resume, CLI
def test_killed_import_continues_and_foreign_destinations_are_refused(tmp_path, monkeypatch):
    images, src, _ = _small_zoo(tmp_path, "mldr")
    calls = {"n": 0}
    put = fkdstore.Writer.put_fields

    def dies(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill: nothing cleans up
        return put(self, *a, **kw)

    monkeypatch.setattr(fkdstore.Writer, "put_fields", dies)
    with pytest.raises(KeyboardInterrupt):
        import_mldr(src, tmp_path / "out.fkd", images, batch=1, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "out.fkd" / "zarr.json").exists()  # the interrupted store is still there
    s = import_mldr(src, tmp_path / "out.fkd", images, batch=1, progress=False)
    assert s["resumed"]
    fresh = import_mldr(src, tmp_path / "fresh.fkd", images, progress=False)
    a, b = fkdstore.open(tmp_path / "out.fkd"), fkdstore.open(tmp_path / "fresh.fkd")
    assert a.complete and not fresh["resumed"]
    ra, rb = a.read_batch(np.arange(4), np.tile(np.arange(2), (4, 1))), b.read_batch(
        np.arange(4), np.tile(np.arange(2), (4, 1)))
    assert all(np.array_equal(ra.aug[k], rb.aug[k]) for k in ra.aug) and np.array_equal(ra.box, rb.box)
    with pytest.raises(ValidationError, match="not empty"):  # another import into that store: refused
        import_mldr(src, tmp_path / "out.fkd", images, densify="zeros", progress=False)
    assert fkdstore.open(tmp_path / "out.fkd").complete


def test_cli_import_kinds(tmp_path, capsys):
    from fkdstore.cli import main

    images, src, _ = _small_zoo(tmp_path, "sre2l")
    assert set(IMPORTERS) == {"fkd", "mldr", "tinyvit", "sre2l", "relabel"}
    assert main(["import", "sre2l", str(src), str(tmp_path / "s.fkd"), "--images", str(images), "--input-size",
                 str(SRE_SIZE), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "imported 4 SRe2L/LPLD batch files (4 images x 2 crops, 12 classes) as logits:" in out
    assert "carried  bbox" in out
    assert main(["import", "sre2l", str(src), str(tmp_path / "t.fkd"), "--images", str(images), "--tail", "x"]) == 2
    for kind in ("fkd", "mldr", "tinyvit", "sre2l"):
        assert main(["import", kind, "--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    fkd = tmp_path / "fkd" / "train"  # FKD's release layout: <class>/<stem>.tar = [coords, flip, labels]
    for key in fkdstore.images.list_images(images).keys:
        os.makedirs(fkd / key.split("/")[0], exist_ok=True)
        labels = np.stack([np.tile(np.arange(3.0), (2, 1)), np.full((2, 3), 0.2)], 1).astype(np.float32)
        save([np.full((2, 4), 0.25, np.float32), np.array([True, False]), labels],
             fkd / key.split("/")[0] / (key.split("/")[1].split(".")[0] + ".tar"))
    for argv in (["import", "fkd"], ["import-fkd"]):  # import-fkd stays an alias of import fkd
        dst = tmp_path / f"{argv[-1]}.fkd"
        assert main([*argv, str(fkd), str(dst), "--images", str(images), "--num-classes", "5", "--no-progress"]) == 0
        assert fkdstore.open(dst).crops_per_image == 2
