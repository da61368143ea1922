"""Label-map stores end to end: generate(label_map=...) and generate --label-map (resume, errors), TorchDataset
over a label-map store (fresh crops per epoch, a region store's crops), fkdstore import relabel (ReLabel's and
TokenLabeling's files, written here in their layout, against their pooling implemented here), inspect and
estimate."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fkdstore
from fkdstore.cli import main
from fkdstore.errors import ValidationError
from fkdstore.labelmap import LabelMapSpec, pool_labels
from fkdstore.labelmap_torch import spatial_teacher, topk_maps
from fkdstore.pytorch_maps import LabelMapDataset
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import make_digits_folder, tiny_cnn
from fkdstore.transforms import crop_resize, normalize, replay_crops

C = 10


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return make_digits_folder(root / "img", size=16, per_class=2)  # 20 images of 16 x 16


@pytest.fixture(scope="module")
def stores(digits, tmp_path_factory):
    """A label-map store (4 x 4 maps, top-3, a 2 x 2 label grid following the flip) and a region store (M = 4) of
    the same teacher and images."""
    root = tmp_path_factory.mktemp("stores")
    teacher = tiny_cnn(C, width=4, seed=3)
    spec = LabelMapSpec(size=4, k=3, box_order="xy", grid=2, flip=True)
    fkdstore.generate(spatial_teacher(teacher), digits, root / "maps.zarr", label_map=spec, input_size=16,
                      num_workers=0, progress=False, images_per_shard=8)
    fkdstore.generate(teacher, digits, root / "regions.zarr", crops_per_image=4, codec="full", input_size=16,
                      crop_sampler=SlotCropSampler(seed=5, scale=(0.2, 1.0)), num_workers=0, progress=False)
    return {"teacher": teacher, "spec": spec, "maps": root / "maps.zarr", "regions": root / "regions.zarr"}


# ------------------------------------------------------------------------------------------------ generate
def _expected_maps(teacher, folder, size, k):
    """The teacher's classifier at every cell of each whole image resized to ``size`` (independently of the
    runner: the module's own layers, then a linear map per cell), top-k per cell."""
    lst = fkdstore.as_source(folder)
    x = torch.stack([crop_resize(lst.load(i), (0, 0, *lst.load(i).size[::-1]), False, size) for i in range(len(lst))])
    teacher.eval()
    with torch.no_grad():
        f = teacher[:-3](normalize(x))  # features before global pooling
        maps = torch.einsum("bdhw,cd->bchw", f, teacher[-1].weight) + teacher[-1].bias[:, None, None]
    return topk_maps(maps, k)


def test_generated_maps_are_the_classifier_at_every_cell(stores, digits):
    r = fkdstore.open(stores["maps"])
    assert isinstance(r, fkdstore.reader.LabelMapReader) and r.complete and r.spec == stores["spec"]
    assert r.header.replay.input_size == (16, 16) and r.meta["label_map_input"] == "whole image"
    idx, sc = _expected_maps(stores["teacher"], digits, 16, 3)
    got = r.read_all()
    np.testing.assert_array_equal(got.indices, idx.numpy())
    np.testing.assert_allclose(got.scores, sc.numpy(), rtol=1e-5, atol=1e-5)
    assert r.image_keys == fkdstore.open(stores["regions"]).image_keys


def test_generate_resumes_an_interrupted_run(digits, tmp_path, stores):
    teacher = spatial_teacher(stores["teacher"])
    spec = stores["spec"]

    class Dies(torch.nn.Module):  # fails on its 3rd batch while armed (the 1st call measures the output)
        def __init__(self):
            super().__init__()
            self.inner, self.calls, self.armed = teacher, 0, True

        def forward(self, x):
            self.calls += 1
            if self.armed and self.calls == 4:
                raise RuntimeError("killed")
            return self.inner(x)

    kw = {"label_map": spec, "input_size": 16, "num_workers": 0, "progress": False, "images_per_shard": 4,
          "batch_size": 4, "teacher_name": "t"}
    dies = Dies()
    with pytest.raises(RuntimeError, match="killed"):
        fkdstore.generate(dies, digits, tmp_path / "m.zarr", **kw)
    assert 0 < int(fkdstore.open(tmp_path / "m.zarr").written.sum()) < 20
    dies.armed = False
    r = fkdstore.generate(dies, digits, tmp_path / "m.zarr", **kw)
    assert r.complete and r.meta["history"][-1]["images_labelled"] < 20
    a, b = r.read_all(), fkdstore.open(stores["maps"]).read_all()
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_generate_refuses_bad_label_map_runs(digits, tmp_path, stores):
    spatial = spatial_teacher(stores["teacher"])
    spec = stores["spec"]
    with pytest.raises(ValidationError, match="mutually exclusive with crops_per_image"):
        fkdstore.generate(spatial, digits, tmp_path / "a", label_map=spec, crops_per_image=2, input_size=16)
    with pytest.raises(ValidationError, match="temperature must be 1 with label_map"):
        fkdstore.generate(spatial, digits, tmp_path / "a", label_map=spec, temperature=2.0, input_size=16)
    with pytest.raises(ValidationError, match="crops_from applies to crop regions"):
        fkdstore.generate(spatial, digits, tmp_path / "a", label_map=spec, crops_from=stores["regions"])
    with pytest.raises(ValidationError, match="teacher returns 8 x 8 maps. Got label_map.size=4"):
        fkdstore.generate(spatial, digits, tmp_path / "a", label_map=spec, input_size=32, num_workers=0)
    with pytest.raises(ValidationError, match="spatial_teacher"):
        fkdstore.generate(stores["teacher"], digits, tmp_path / "a", label_map=spec, input_size=16, num_workers=0)
    with pytest.raises(ValidationError, match="needs crops_per_image and codec"):
        fkdstore.generate(spatial, digits, tmp_path / "a", codec="ms")
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match="cannot find the feature extractor"):
        spatial_teacher(torch.nn.Conv2d(3, 4, 1))


def test_cli_generate_label_map(digits, tmp_path, capsys, stores):
    torch.save(stores["teacher"].state_dict(), tmp_path / "t.pt")
    base = ["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--teacher-kwargs",
            '{"width": 4}', "--weights", str(tmp_path / "t.pt"), "--device", "cpu", "--num-workers", "0",
            "--no-progress", "--input-size", "16"]
    assert main(base + ["--out", str(tmp_path / "m.zarr"), "--label-map", "--map-k", "3", "--grid", "2",
                        "--flip"]) == 0
    r = fkdstore.open(tmp_path / "m.zarr")
    assert r.spec == stores["spec"]  # S measured from the teacher (4 x 4 at 16 px), the rest as given
    np.testing.assert_array_equal(r.read_all().indices, fkdstore.open(stores["maps"]).read_all().indices)
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "x.zarr"), "--label-map", "--crops", "2"]) == 2
    assert main(base + ["--out", str(tmp_path / "x.zarr"), "--label-map", "--codec", "ms"]) == 2
    assert main(base + ["--out", str(tmp_path / "x.zarr")]) == 2
    assert "--crops M (FKD crop regions) or --label-map" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ replay
def test_fresh_crops_each_epoch_pooled_like_the_reader(stores, digits):
    ds = fkdstore.TorchDataset(stores["maps"], digits, crops_per_sample=3, output_size=12, normalize=False)
    assert isinstance(ds, LabelMapDataset) and len(ds) == 20
    r = fkdstore.open(stores["maps"])
    src = fkdstore.as_source(digits)
    sampler = SlotCropSampler(seed=0)
    seen, flipped = [], 0
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        items = ds.__getitems__([4, 11])
        for it in items:
            i = it["index"]
            slots = np.arange(3 * epoch, 3 * epoch + 3)
            assert it["slots"].tolist() == slots.tolist()
            boxes, flips = sampler.sample_slots(np.full(3, i), slots, *r.image_sizes[i])
            want = r.pool(np.full(3, i), boxes.astype(np.int64), flips)
            assert it["soft_labels"].shape == (3, 2, 2, C)
            np.testing.assert_array_equal(it["soft_labels"].numpy(), want)
            assert torch.equal(it["crops"], replay_crops(src.load(i), boxes, flips, 12))
            assert it["target"] == r.labels[i]
            seen.append(boxes)
            # the label follows the flip (spec.flip): a flipped crop's grid is not the unflipped crop's
            unflipped = r.pool(np.full(3, i), boxes.astype(np.int64), None)
            assert all(np.abs(want[j] - unflipped[j]).max() > 1e-4 for j in np.flatnonzero(flips))
            flipped += int(flips.sum())
    assert flipped > 0
    assert not np.array_equal(seen[0], seen[2])  # epoch 1 draws new crops
    again = fkdstore.TorchDataset(stores["maps"], digits, crops_per_sample=3, output_size=12, normalize=False, epoch=1)
    assert torch.equal(again[11]["soft_labels"], ds[11]["soft_labels"])


def test_region_store_crops_are_pixel_identical(stores, digits):
    maps = fkdstore.TorchDataset(stores["maps"], digits, crops_per_sample=2, crops_from=stores["regions"], seed=3)
    regions = fkdstore.TorchDataset(stores["regions"], digits, crops_per_sample=2, seed=3)
    rm, rr = fkdstore.open(stores["maps"]), fkdstore.open(stores["regions"])
    for epoch in range(3):
        maps.set_epoch(epoch)
        regions.set_epoch(epoch)
        a, b = maps.__getitems__([0, 7, 19]), regions.__getitems__([0, 7, 19])
        for x, y in zip(a, b):
            assert torch.equal(x["crops"], y["crops"]) and torch.equal(x["slots"], y["slots"])
            rec = rr.read(x["index"], x["slots"].numpy())
            want = rm.pool(np.full(2, x["index"]), rec.box.astype(np.int64), rec.flip)
            np.testing.assert_array_equal(x["soft_labels"].numpy(), want)
    batch = fkdstore.collate(maps.__getitems__([1, 2]))
    assert batch["crops"].shape == (4, 3, 16, 16) and batch["soft_labels"].shape == (4, 2, 2, C)
    pair = fkdstore.TorchDataset(stores["maps"], digits, crops_from=stores["regions"], seed=3, item="pair")
    img, target = pair[5]
    assert img.shape == (3, 16, 16) and target.shape == (2, 2, C)
    import pickle

    copy = pickle.loads(pickle.dumps(maps))
    assert copy._reader is None and torch.equal(copy[3]["crops"], maps[3]["crops"])
    maps.set_epoch(1)  # workers see the epoch and reopen the stores
    loader = torch.utils.data.DataLoader(maps, batch_size=5, num_workers=2, collate_fn=fkdstore.collate)
    for k, batch in enumerate(loader):
        want = fkdstore.collate(maps.__getitems__(range(5 * k, 5 * k + 5)))
        assert torch.equal(batch["crops"], want["crops"]) and torch.equal(batch["soft_labels"], want["soft_labels"])


def test_replay_refuses_mismatched_inputs(stores, digits, tmp_path):
    with pytest.raises(ValidationError, match="crops_per_sample must be <= the crops_from store's"):
        fkdstore.TorchDataset(stores["maps"], digits, crops_per_sample=5, crops_from=stores["regions"])
    with pytest.raises(ValidationError, match="crop_sampler and crops_from are exclusive"):
        fkdstore.TorchDataset(stores["maps"], digits, crops_from=stores["regions"], crop_sampler=SlotCropSampler())
    with pytest.raises(ValidationError, match="must be a store of crop regions"):
        fkdstore.TorchDataset(stores["maps"], digits, crops_from=stores["maps"])
    with pytest.raises(ValidationError, match="must be a store of label maps"):
        LabelMapDataset(stores["regions"], digits)
    with pytest.raises(ValidationError, match="soft_labels must be 'dense'"):
        fkdstore.TorchDataset(stores["maps"], digits, soft_labels="sparse")
    # the checks both datasets share (fkdstore.pytorch._StoreImages)
    with pytest.raises(ValidationError, match="item must be one of"):
        fkdstore.TorchDataset(stores["maps"], digits, item="tuple")
    with pytest.raises(ValidationError, match="output_size"):
        fkdstore.TorchDataset(stores["maps"], digits, output_size=0)
    with pytest.raises(TypeError, match="transform must be callable"):
        fkdstore.TorchDataset(stores["maps"], digits, transform=3)
    ds = fkdstore.TorchDataset(stores["maps"], digits, output_size=12)
    with pytest.raises(IndexError, match="item 20 is out of range for a dataset of 20 images"):
        ds.__getitems__([3, 20])
    assert ds[-1]["index"] == 19
    other = make_digits_folder(tmp_path / "other", size=16, per_class=1)
    fkdstore.generate(stores["teacher"], other, tmp_path / "r.zarr", crops_per_image=2, codec="hard", input_size=16,
                      num_workers=0, progress=False)
    with pytest.raises(ValidationError, match="crops_from must hold the label-map store's images"):
        fkdstore.TorchDataset(stores["maps"], digits, crops_from=tmp_path / "r.zarr")


# ------------------------------------------------------------------------------------------------ ReLabel import
def _roi_align(plane, y1, x1, y2, x2, g):
    """torchvision's compiled roi_align (aligned=False, sampling_ratio=-1) of one RoI on ``plane`` [C, H, W], in
    float32 as the kernel: [C, g, g]."""
    f = np.float32
    Cn, H, W = plane.shape
    rh, rw = max(f(y2 - y1), f(1)), max(f(x2 - x1), f(1))
    bh, bw = f(rh / f(g)), f(rw / f(g))
    ny, nx = int(np.ceil(rh / f(g))), int(np.ceil(rw / f(g)))
    out = np.zeros((Cn, g, g), np.float64)
    for u in range(g):
        for v in range(g):
            for iy in range(ny):
                y = f(f(y1 + f(u) * bh) + f(f(iy + 0.5) * bh) / f(ny))
                for ix in range(nx):
                    x = f(f(x1 + f(v) * bw) + f(f(ix + 0.5) * bw) / f(nx))
                    if y < -1 or y > H or x < -1 or x > W:
                        continue
                    yy, xx = max(y, f(0)), max(x, f(0))
                    y0, x0 = min(int(yy), H - 1), min(int(xx), W - 1)
                    yy, xx = (f(y0) if y0 == H - 1 else yy), (f(x0) if x0 == W - 1 else xx)
                    yh, xh = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
                    ly, lx = f(yy - f(y0)), f(xx - f(x0))
                    out[:, u, v] += (f(1) - ly) * (f(1) - lx) * plane[:, y0, x0] + (f(1) - ly) * lx * plane[:, y0, xh] \
                        + ly * (f(1) - lx) * plane[:, yh, x0] + ly * lx * plane[:, yh, xh]
            out[:, u, v] /= max(ny * nx, 1)
    return out


def _published_label(topk, crop, size_hw, flip, g, C_):
    """ReLabel's get_labelmaps + get_relabel (TokenLabeling: the map flipped with the image first, the crop
    taken in the flipped image, a g x g grid): scatter into zeros [C, S, S], coords (i/H, j/W, h/H, w/W) in
    float64, [2:] += [:2], float32, * S - 0.5, passed as (x1, y1, x2, y2) = (top, left, bottom, right), RoIAlign,
    softmax over classes."""
    m = topk.float()
    top, left, h, w = crop
    H, W = size_hw
    if flip:
        m = m.flip(-1)
        left = W - left - w
    S_ = m.shape[-1]
    dense = torch.zeros(C_, S_, S_).scatter_(0, m[1].long(), m[0]).numpy()
    c = np.array([top / H, left / W, h / H, w / W], np.float64)
    c[2:] += c[:2]
    b = c.astype(np.float32) * np.float32(S_) - np.float32(0.5)
    pooled = _roi_align(dense, y1=b[1], x1=b[0], y2=b[3], x2=b[2], g=g)  # x1 <- top: the published order
    e = np.exp(pooled - pooled.max(0, keepdims=True))
    p = (e / e.sum(0, keepdims=True)).transpose(1, 2, 0)
    return p[0, 0] if g == 1 else p


def _relabel_tree(tmp_path, dtype, S_=7, K=5, C_=1000):
    """Images <synset>/<stem>.JPEG of several sizes and ReLabel's files <synset>/<stem>.pt ([2, K, S, S]: scores,
    class ids as floats) for each; returns (image folder, map folder, {key: tensor})."""
    rng = np.random.default_rng(7)
    imgs, maps, files = tmp_path / "train", tmp_path / "relabel", {}
    for syn, stem in [("n01", "a_1"), ("n01", "a_2"), ("n02", "b_1"), ("n03", "c_1"), ("n03", "c_2")]:
        H, W = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        (imgs / syn).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(imgs / syn / f"{stem}.JPEG")
        idx = np.argsort(rng.random((C_, S_, S_)), 0)[:K].astype(np.float32)
        t = torch.from_numpy(np.stack([-np.sort(-rng.normal(3, 3, (K, S_, S_)), 0), idx]).astype(np.float32))
        t = t.to(getattr(torch, dtype))
        (maps / syn).mkdir(parents=True, exist_ok=True)
        torch.save(t, maps / syn / f"{stem}.pt")
        files[f"{syn}/{stem}.JPEG"] = t
    torch.save(torch.zeros(2, K, S_, S_), maps / "n03" / "orphan.pt")  # a map no image claims
    return imgs, maps, files


@pytest.mark.parametrize("system,dtype", [("relabel", "float32"), ("tokenlabeling", "float16")])
def test_import_relabel_round_trip_equals_the_published_pooling(tmp_path, capsys, system, dtype):
    imgs, maps, files = _relabel_tree(tmp_path, dtype)
    assert main(["import", "relabel", str(maps), str(tmp_path / "s.zarr"), "--images", str(imgs), "--system", system,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"imported 5 {system} label maps (5 images, K=5, S=7, {dtype}, 1000 classes)" in out
    assert "skipped  1 pt files without image" in out
    r = fkdstore.open(tmp_path / "s.zarr")
    assert r.spec.dtype == dtype and r.spec.box_order == "yx" and r.spec.flip == (system == "tokenlabeling")
    assert r.meta["import"]["format"] == system and r.meta["import"]["extra_files"] == 1
    assert {"format", "source", "files", "order", "binding", "slots", "flags"} <= set(r.meta["import"])  # spec 9.1
    (hist,) = r.meta["history"]
    assert hist["op"] == f"import-{system}" and hist["to"] == r.spec.get_config() and hist["images"] == 5
    ds = fkdstore.TorchDataset(tmp_path / "s.zarr", imgs, crops_per_sample=4, output_size=8,
                               crop_sampler=SlotCropSampler(seed=2, scale=(0.02, 1.0)))
    g = r.spec.grid
    flipped = 0
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for it in ds.__getitems__(range(5)):
            key = r.image_keys[it["index"]]
            boxes, flips, _ = ds.crops([it["index"]])
            for j in range(4):
                want = _published_label(files[key], boxes[0, j], r.image_sizes[it["index"]],
                                        bool(flips[0, j]) and system == "tokenlabeling", g, 1000)
                np.testing.assert_allclose(it["soft_labels"][j].numpy(), want, atol=1e-6)
                flipped += int(flips[0, j])
    assert flipped > 0


def test_import_relabel_missing_files_resume_and_errors(tmp_path, monkeypatch):
    from fkdstore.importers import relabel

    imgs, maps, _ = _relabel_tree(tmp_path, "float32")
    (maps / "n02" / "b_1.pt").unlink()
    with pytest.raises(ValidationError, match="1 images have no label-map file"):
        relabel.import_relabel(maps, tmp_path / "s.zarr", imgs, progress=False)
    assert not (tmp_path / "s.zarr").exists()
    real = relabel.load_relabel_file
    calls = []

    def dies(path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(relabel, "load_relabel_file", dies)
    with pytest.raises(KeyboardInterrupt):
        relabel.import_relabel(maps, tmp_path / "s.zarr", imgs, missing="skip", batch=1, progress=False)
    monkeypatch.undo()
    done = relabel.import_relabel(maps, tmp_path / "s.zarr", imgs, missing="skip", batch=1, progress=False)
    fresh = relabel.import_relabel(maps, tmp_path / "f.zarr", imgs, missing="skip", progress=False)
    # the plan reads the first file, then image 0's and image 1's: killed while loading image 1
    assert done["resumed"] and done["images_written_before"] == 1 and not fresh["resumed"]
    a, b = fkdstore.open(tmp_path / "s.zarr"), fkdstore.open(tmp_path / "f.zarr")
    assert a.complete and a.image_keys == b.image_keys and len(a.image_keys) == 4 and "n02/b_1.JPEG" not in a.image_keys
    np.testing.assert_array_equal(a.read_all().scores, b.read_all().scores)
    with pytest.raises(ValidationError, match="not empty"):
        relabel.import_relabel(maps, tmp_path / "s.zarr", imgs, missing="skip", box_order="xy", progress=False)


# ------------------------------------------------------------------------------------------------ inspect, estimate
def test_inspect_a_label_map_store(stores, capsys):
    d = fkdstore.inspect(stores["maps"], sample=200)
    json.dumps(d)
    assert d["kind"] == "label_map" and d["map_shape"] == [3, 4, 4] and d["map_index_dtype"] == "uint16"
    assert d["bytes_per_image"] == pytest.approx(d["total_bytes"] / 20)
    assert d["raw_map_bytes_per_image"] == 3 * 16 * (2 + 4)
    s = d["label_stats"]
    assert s["sampled_crops"] == 200 and 0 < s["entropy_mean_nats"] <= np.log(C) and 0 < s["cell_topk_mass_mean"] < 1
    assert s["top1_agreement"] is not None and s["whole_image_top1_agreement"] is not None
    e = d["imagenet_extrapolation"]
    assert e["paper_full_bytes"] == 1_281_167 * 16 * C * 4 and e["paper_table2"]["full"] is None
    assert main(["inspect", str(stores["maps"]), "--sample", "50"]) == 0
    text = capsys.readouterr().out
    assert "records    label maps (ReLabel): K=3 x 4 x 4 per image" in text and "map/scores" in text
    assert "pooling    box order xy offset -0.5, roi_align to 2 x 2" in text
    assert main(["inspect", str(stores["maps"]), "--image", "0/0000.png", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    r = fkdstore.open(stores["maps"])
    rec = r.read(0)
    whole = pool_labels(rec.indices[None], rec.scores[None], np.array([[0, 0, 16, 16]]), np.array([[16, 16]]), None,
                        dataclasses.replace(r.spec, grid=1), C)[0]  # one label for the whole image
    assert one["index"] == 0 and len(one["whole"]) == 5
    assert [c for c, _ in one["whole"]] == np.argsort(-whole, kind="stable")[:5].tolist()
    np.testing.assert_allclose([p for _, p in one["whole"]], np.sort(whole)[::-1][:5], rtol=1e-6)
    assert one["cells"] == np.take_along_axis(rec.indices, rec.scores.argmax(0)[None], 0)[0].tolist()  # 4 x 4
    for cmd in (["convert", str(stores["maps"]), str(stores["maps"].parent / "c"), "--codec", "ms"],
                ["prune", str(stores["maps"]), str(stores["maps"].parent / "p"), "--keep", "0.5"]):
        assert main(cmd) == 1  # crop-region commands refuse a label-map store in one line, writing nothing
        assert "store holds 'label_map' records, not crop regions" in capsys.readouterr().err
    assert not (stores["maps"].parent / "c").exists() and not (stores["maps"].parent / "p").exists()
    with pytest.raises(ValidationError, match="plots are drawn for crop-region stores"):
        fkdstore.inspect(stores["maps"], sample=10, plots=stores["maps"].parent / "plots")


def test_estimate_label_maps_and_the_papers_table_2(tmp_path, capsys):
    from fkdstore import report_maps

    assert report_maps.paper_map_bytes(1_200_000, 15, 1000) == 1_080_000_000_000  # "~1 TB"
    assert report_maps.paper_map_bytes(1_200_000, 15, 1000, 5) == 10_800_000_000  # 10.06 GiB: "10 GB"
    assert main(["estimate", "--num-images", "1200000", "--num-classes", "1000", "--label-map", "15,5", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "ReLabel (Full):" in out and "paper's Table 2: ~1 TB" in out and "1.08 TB decimal" in out
    assert "= 10.06 GiB; paper's Table 2: 10 GB" in out and "fkdstore, the same top-5 maps" in out
    assert main(["estimate", "--num-images", "1281167", "--num-classes", "1000", "--label-map", "15,5,float16",
                 "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["kind"] == "label_map" and e["label_map"]["dtype"] == "float16" and e["paper_table2"]["top-k"] == "10 GB"
    assert e["relabel_files_bytes"] == 1_281_167 * (2 * 5 * 225 * 2 + report_maps.TORCH_SAVE_OVERHEAD)
    assert main(["estimate", "--num-images", "10", "--num-classes", "10"]) == 2
    assert main(["estimate", "--num-images", "10", "--num-classes", "10", "--label-map", "15"]) == 1
    # the estimate against a store written from the maps it is calibrated on
    rng = np.random.default_rng(1)
    N = 40
    idx, sc = report_maps.teacher_like_maps(rng, N, 15, 5, 1000)
    spec = LabelMapSpec(size=15, k=5, box_order="xy")
    keys = [f"n{i % 7:08d}/x_{i}.JPEG" for i in range(N)]
    with fkdstore.write(tmp_path / "m.zarr", num_images=N, num_classes=1000, image_keys=keys,
                        image_sizes=np.full((N, 2), 300), label_map=spec) as w:
        w.put_maps(np.arange(N), idx, sc)
    got = fkdstore.storage_stats(tmp_path / "m.zarr")
    want = report_maps.estimate_map_bytes(N, 1000, spec)
    for name in ("map/indices", "map/scores"):
        assert got[name]["bytes"] == pytest.approx(want["arrays"][name], rel=0.15)
