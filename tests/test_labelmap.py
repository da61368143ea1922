"""Label maps: the replay equation (fkdstore.labelmap), generation helpers (fkdstore.labelmap_torch) and the
ReLabel / TokenLabeling importer (fkdstore.importers.relabel).

The numpy half runs without torch (the torch stand-in of optional_torch skips the torch half)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from optional_torch import torch

from fkdstore.errors import LabelFileError, ValidationError
from fkdstore.labelmap import LabelMapSpec, dense_maps, map_boxes, pool_labels, pool_labels_dense, roi_align_reference
from fkdstore.seeded import SlotCropSampler


# ------------------------------------------------------------------------------------------------ helpers
def random_maps(rng, B, K, S, C, dtype="float32", spread=4.0):
    """Top-K maps with distinct indices per cell, scores descending (as a teacher's top-K)."""
    idx = np.argsort(rng.random((B, C, S, S)), axis=1)[:, :K].astype(np.uint16)
    scores = -np.sort(-rng.normal(2.0, spread, (B, K, S, S)), axis=1)
    return idx, scores.astype(dtype)


def crop_set(rng, n_random=40):
    """Boxes and sizes: random RandomResizedCrop boxes on non-square images plus edge cases (whole image,
    1-pixel crops in every corner, 1-pixel-wide strips along the edges, a 1 x 1 image)."""
    sizes, boxes = [], []
    for i in range(n_random):
        H, W = (int(v) for v in rng.integers(7, 400, 2))
        sizes.append((H, W))
        boxes.append(SlotCropSampler(seed=3).sample(i, H, W, 1)[0][0])
    for H, W in ((37, 500), (480, 33), (224, 224)):
        for box in ((0, 0, H, W), (0, 0, 1, 1), (H - 1, W - 1, 1, 1), (0, W - 1, 1, 1), (H - 1, 0, 1, 1),
                    (0, 0, H, 1), (0, W - 1, H, 1), (H - 1, 0, 1, W), (H // 3, W // 5, H // 2, W // 3)):
            sizes.append((H, W))
            boxes.append(box)
    sizes.append((1, 1))
    boxes.append((0, 0, 1, 1))
    return np.array(boxes, np.int64), np.array(sizes, np.int64)


SPECS = [
    LabelMapSpec.relabel(),
    LabelMapSpec(size=15, k=5, box_order="xy"),
    LabelMapSpec.tokenlabeling(size=8, k=4, grid=4),
    LabelMapSpec(size=7, k=3, box_order="xy", grid=3, fill=-1.5, temperature=2.5),
    LabelMapSpec(size=9, k=2, box_order="yx", grid=2, sampling_ratio=2, flip=True),
    LabelMapSpec(size=6, k=3, box_order="xy", aligned=True, grid=2, box_offset=0.0, dtype="float16"),
    LabelMapSpec(size=5, k=2, box_order="xy", grid=2, box_offset=1.0),  # samples beyond the map: outside rule
]


def _spec_id(s):
    return f"{s.box_order}-S{s.size}-g{s.grid}-fill{s.fill}-sr{s.sampling_ratio}-al{int(s.aligned)}-{s.dtype}"


# ------------------------------------------------------------------------------------------------ the spec
def test_spec_config_round_trips_through_json_and_spells_every_parameter():
    for spec in SPECS:
        cfg = json.loads(json.dumps(spec.get_config()))
        assert LabelMapSpec.from_config(cfg) == spec
        assert set(cfg) == {"size", "k", "dtype", "fill", "box", "pool", "temperature", "flip"}
        assert set(cfg["box"]) == {"order", "offset"}
        assert set(cfg["pool"]) == {"op", "sampling_ratio", "aligned", "grid"}
    relabel = LabelMapSpec.relabel().get_config()
    assert relabel == {"size": 15, "k": 5, "dtype": "float32", "fill": 0.0, "box": {"order": "yx", "offset": -0.5},
                       "pool": {"op": "roi_align", "sampling_ratio": -1, "aligned": False, "grid": 1},
                       "temperature": 1.0, "flip": False}


@pytest.mark.parametrize("path,value,named", [
    (("size",), 65, "label_map.size"), (("size",), 0, "label_map.size"), (("k",), 0, "label_map.k"),
    (("k",), 257, "label_map.k"), (("dtype",), "q8", "label_map.dtype"), (("fill",), float("nan"), "label_map.fill"),
    (("box", "order"), "zx", "label_map.box.order"), (("box", "offset"), 1.5, "label_map.box.offset"),
    (("pool", "sampling_ratio"), 0, "label_map.pool.sampling_ratio"),
    (("pool", "sampling_ratio"), 65, "label_map.pool.sampling_ratio"),
    (("pool", "grid"), 33, "label_map.pool.grid"), (("pool", "op"), "roi_pool", "label_map.pool.op"),
    (("temperature",), 0.0, "label_map.temperature"),
])
def test_from_config_refuses_out_of_range_values_naming_the_key(path, value, named):
    cfg = LabelMapSpec.relabel().get_config()
    d = cfg
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    with pytest.raises(ValidationError, match=named.replace(".", r"\.")):
        LabelMapSpec.from_config(cfg)


@pytest.mark.parametrize("where", ["top", "box", "pool"])
def test_from_config_refuses_unknown_and_missing_keys(where):
    cfg = LabelMapSpec.relabel().get_config()
    d = cfg if where == "top" else cfg[where]
    d["extra"] = 1
    with pytest.raises(ValidationError, match="unknown key label_map.*extra"):
        LabelMapSpec.from_config(cfg)
    del d["extra"]
    victim = {"top": "temperature", "box": "offset", "pool": "aligned"}[where]
    del d[victim]
    with pytest.raises(ValidationError, match=f"Missing key label_map.*{victim}"):
        LabelMapSpec.from_config(cfg)


def test_spec_types_and_classes():
    with pytest.raises(TypeError, match="label_map.size"):
        LabelMapSpec(size=True, k=5, box_order="xy")
    with pytest.raises(TypeError, match="label_map.flip"):
        LabelMapSpec(size=15, k=5, box_order="xy", flip=1)
    with pytest.raises(ValidationError, match="label_map.k must be <= num_classes=3"):
        LabelMapSpec(size=15, k=5, box_order="xy").check_num_classes(3)
    spec = LabelMapSpec.relabel()
    assert spec.map_shape == (5, 15, 15) and spec.index_dtype(1000) == "uint16"
    assert spec.bytes_per_image(1000) == 5 * 15 * 15 * (2 + 4)  # ReLabel's file holds 5*15*15*2 float32: 9000 B


# ------------------------------------------------------------------------------------------------ reference RoIAlign
def _ramp(H=4, W=4):
    return np.arange(H * W, dtype=np.float32).reshape(1, 1, H, W)  # D[y, x] = W*y + x


def _ref(maps, box, out=1, **kw):
    return roi_align_reference(maps, np.array([[0, *box]], np.float32), out, **kw)[0, 0]


def test_reference_roi_align_hand_computed_cases():
    const = np.full((1, 2, 5, 5), 2.5, np.float32)
    for box in ((-0.5, -0.5, 4.5, 4.5), (0.3, 1.1, 2.9, 3.7), (-0.5, 3.0, 0.0, 4.5)):
        np.testing.assert_allclose(_ref(const, box, 2), 2.5, rtol=1e-6)
    D = _ramp()
    assert _ref(D, (1.5, 0.5, 2.5, 1.5))[0, 0] == 6.0          # a box of exactly one cell: its centre (y=1, x=2)
    assert _ref(D, (0.75, 0.5, 1.75, 1.5))[0, 0] == 5.25       # bilinear at (1, 1.25): .75*5 + .25*6
    assert _ref(D, (-2.0, 0.5, -1.0, 1.5))[0, 0] == 0.0        # sample at x = -1.5: outside, contributes 0
    assert _ref(D, (-1.5, 0.5, -0.5, 1.5))[0, 0] == 4.0        # x = -1 is inside, clamped to column 0
    assert _ref(D, (3.5, 0.5, 4.5, 1.5))[0, 0] == 7.0          # x = W is inside: the last column
    assert _ref(D, (3.6, 0.5, 4.6, 1.5))[0, 0] == 0.0          # x = 4.1 > W: outside
    assert _ref(D, (-0.5, -0.5, 3.5, 3.5))[0, 0] == 7.5        # whole map, adaptive 4 x 4 samples at the centres
    np.testing.assert_array_equal(_ref(D, (-0.5, -0.5, 3.5, 3.5), 2), [[2.5, 4.5], [10.5, 12.5]])
    assert _ref(D, (1.0, 1.0, 1.2, 1.2))[0, 0] == 7.5          # not aligned: the RoI is forced to 1 x 1
    np.testing.assert_allclose(_ref(D, (1.0, 1.0, 1.2, 1.2), aligned=True)[0, 0], 3.0, rtol=1e-6)  # (0.6, 0.6)
    np.testing.assert_allclose(_ref(D, (-0.5, -0.5, 3.5, 3.5), sampling_ratio=1)[0, 0], 7.5)  # 1 sample at (1.5, 1.5)
    # the float64 accumulation only changes the rounding of the sums
    maps = np.random.default_rng(0).normal(0, 5, (1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_ref(maps, (0.2, -0.4, 4.9, 3.3), 2), _ref(maps, (0.2, -0.4, 4.9, 3.3), 2,
                                                                          accumulate="float64"), atol=1e-5)


def _torchvision_roi_align():
    try:
        from torchvision.ops import roi_align
        roi_align(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1)  # the compiled op must load too
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA build that does not load with a CPU torch
        pytest.skip(f"torchvision's roi_align does not load here ({type(e).__name__})")
    return roi_align


def test_reference_equals_torchvision_compiled_kernel_where_it_loads():
    roi_align = _torchvision_roi_align()
    rng = np.random.default_rng(1)
    maps = rng.normal(0, 3, (3, 4, 9, 9)).astype(np.float32)
    lo = rng.uniform(-2.5, 9.5, (60, 2))
    rois = np.concatenate([rng.integers(0, 3, (60, 1)), lo, lo + rng.uniform(0.05, 8, (60, 2))], 1).astype(np.float32)
    for out, sr, aligned in ((1, -1, False), (3, -1, False), (2, 2, True), (4, -1, True)):
        want = roi_align(torch.from_numpy(maps), torch.from_numpy(rois), out, 1.0, sr, aligned).numpy()
        np.testing.assert_allclose(roi_align_reference(maps, rois, out, 1.0, sr, aligned), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_pooled_labels_equal_the_dense_reference(spec):
    rng = np.random.default_rng(spec.size * 7 + spec.grid)
    C = 23
    boxes, sizes = crop_set(rng)
    B = len(boxes)
    idx, scores = random_maps(rng, B, spec.k, spec.size, C, spec.dtype)
    flips = rng.random(B) < 0.5
    got = pool_labels(idx, scores, boxes, sizes, flips, spec, C)
    want = pool_labels_dense(idx, scores, boxes, sizes, flips, spec, C)
    assert got.dtype == np.float32 and got.shape == ((B, C) if spec.grid == 1 else (B, spec.grid, spec.grid, C))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    # against the kernel-faithful float32 accumulation too (the RoIAlign ReLabel ran), then softmax
    maps = dense_maps(idx, scores, C, spec.fill)
    if spec.flip:
        maps[flips] = maps[flips][..., ::-1]
    rois = np.concatenate([np.arange(B, dtype=np.float32)[:, None], map_boxes(boxes, sizes, spec, flips)], 1)
    z = roi_align_reference(maps, rois, spec.grid, 1.0, spec.sampling_ratio, spec.aligned).transpose(0, 2, 3, 1)
    z = z.astype(np.float64) / spec.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).reshape(got.shape)
    np.testing.assert_allclose(got, p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS[:4], ids=_spec_id)
def test_numpy_and_torch_paths_agree(spec):
    rng = np.random.default_rng(5)
    C = 40
    boxes, sizes = crop_set(rng, 20)
    B = len(boxes)
    idx, scores = random_maps(rng, B, spec.k, spec.size, C, spec.dtype)
    flips = rng.random(B) < 0.5
    want = pool_labels(idx, scores, boxes, sizes, flips, spec, C)
    for ti in (torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(idx.astype(np.int32)),
               torch.from_numpy(idx.view(np.int16)).view(torch.uint16)):
        got = pool_labels(ti, torch.from_numpy(scores), torch.from_numpy(boxes), torch.from_numpy(sizes),
                          torch.from_numpy(flips), spec, C)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_flip_in_the_geometric_convention_mirrors_the_token_grid():
    """order "xy", offset -0.5: the label of a flipped crop is the unflipped crop's g x g grid mirrored left-right
    (mirroring the map and the crop together is the same as mirroring the output) for crops at least one map
    cell wide. Narrower crops differ: RoIAlign widens a RoI to 1 cell towards +x, in the mirrored map too."""
    rng = np.random.default_rng(11)
    spec = LabelMapSpec(size=10, k=4, box_order="xy", grid=5)
    boxes, sizes = crop_set(rng, 30)
    idx, scores = random_maps(rng, len(boxes), 4, 10, 17)
    plain = pool_labels(idx, scores, boxes, sizes, None, spec, 17)
    flipped = pool_labels(idx, scores, boxes, sizes, np.ones(len(boxes), bool), spec, 17)
    wide = boxes[:, 3] * spec.size >= sizes[:, 1]
    assert 30 < wide.sum() < len(boxes)
    np.testing.assert_allclose(flipped[wide], plain[wide][:, :, ::-1], atol=1e-5)  # float32 box rounding only
    assert np.abs(flipped[~wide] - plain[~wide][:, :, ::-1]).max() > 1e-2
    assert np.abs(flipped - plain).max() > 1e-2  # the grid is not symmetric: the flip matters
    off = dataclasses.replace(spec, flip=False)
    np.testing.assert_array_equal(pool_labels(idx, scores, boxes, sizes, np.ones(len(boxes), bool), off, 17), plain)


def _scatter(topk_scores, topk_idx, C):
    """ReLabel's get_labelmaps / TokenLabeling's get_featuremaps: a zero [C, S, S] map per image, scatter_."""
    B, _, S, _ = topk_idx.shape
    maps = torch.zeros(B, C, S, S)
    for m, s, i in zip(maps, topk_scores, topk_idx):
        m.scatter_(0, i.long(), s.float())
    return maps


def _roi_align(maps, boxes, out):
    try:
        roi_align = _torchvision_roi_align()
        return roi_align(maps, boxes, output_size=(out, out))
    except pytest.skip.Exception:
        return torch.from_numpy(roi_align_reference(maps.numpy(), boxes.numpy(), out))


def _published_boxes(crops, S):
    """ReLabel's relabel_batch_fn: coords (i/H, j/W, h/H, w/W) as Python floats, collated to float64,
    coords[:, 2:] += coords[:, :2], .float(), then get_relabel's `* S - 0.5` with the batch index in front."""
    coords = torch.tensor(crops, dtype=torch.float64)
    coords[:, 2:] += coords[:, :2]
    return torch.cat([torch.arange(len(crops)).view(-1, 1).float(), coords.float() * S - 0.5], 1)


def test_tokenlabeling_published_flip_and_grid_are_replayed():
    """TokenLabeling flips image and map (label.flip(3)) BEFORE drawing the crop, then pools g x g with
    ReLabel's box rule. fkdstore records the same image as the crop (in the unflipped image) + flip."""
    rng = np.random.default_rng(12)
    spec = LabelMapSpec.tokenlabeling(size=8, k=3, grid=4)
    boxes, sizes = crop_set(rng, 30)
    B, C = len(boxes), 19
    idx, scores = random_maps(rng, B, 3, 8, C, "float16")
    flips = rng.random(B) < 0.5
    topk = torch.from_numpy(np.stack([scores.astype(np.float32), idx.astype(np.float32)], 1))  # [B, 2, K, S, S]
    topk[flips] = topk[flips].flip(-1)  # RandomHorizontalFlipWithLabel: label.flip(3) of the [2, K, S, S] map
    crops = []
    for (top, left, h, w), (H, W), f in zip(boxes, sizes, flips):
        j = W - left - w if f else left  # the same pixels, as a crop drawn in the flipped image
        crops.append((top / H, j / W, h / H, w / W))
    maps = _scatter(topk[:, 0], topk[:, 1], C)
    want = torch.softmax(_roi_align(maps, _published_boxes(crops, 8), 4), 1).permute(0, 2, 3, 1).numpy()
    got = pool_labels(idx, scores, boxes, sizes, flips, spec, C)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_pooling_refuses_bad_input():
    spec = LabelMapSpec.relabel(size=4, k=2)
    rng = np.random.default_rng(0)
    idx, scores = random_maps(rng, 2, 2, 4, 9)
    boxes, sizes = np.array([[0, 0, 5, 5], [1, 1, 2, 2]]), np.array([[5, 5], [5, 5]])
    pool_labels(idx, scores, boxes, sizes, None, spec, 9)
    with pytest.raises(ValidationError, match="boxes must lie inside"):
        pool_labels(idx, scores, np.array([[0, 0, 6, 5], [1, 1, 2, 2]]), sizes, None, spec, 9)
    with pytest.raises(ValidationError, match="boxes must lie inside"):
        pool_labels(idx, scores, np.array([[0, 0, 0, 5], [1, 1, 2, 2]]), sizes, None, spec, 9)
    with pytest.raises(ValidationError, match=r"indices must lie in \[0, 5\)"):
        pool_labels(idx, scores, boxes, sizes, None, spec, 5)
    with pytest.raises(ValidationError, match=r"shape \(B,\) \+ \(2, 4, 4\)"):
        pool_labels(idx[:, :1], scores[:, :1], boxes, sizes, None, spec, 9)
    with pytest.raises(ValidationError, match="one row per map"):
        pool_labels(idx, scores, boxes[:1], sizes[:1], None, spec, 9)
    with pytest.raises(TypeError, match="boxes must hold integers"):
        pool_labels(idx, scores, boxes.astype(float), sizes, None, spec, 9)


def test_dense_maps_and_boxes():
    rng = np.random.default_rng(2)
    idx, scores = random_maps(rng, 3, 4, 5, 11)
    d = dense_maps(idx, scores, 11, fill=-2.0)
    assert d.shape == (3, 11, 5, 5)
    np.testing.assert_array_equal(np.take_along_axis(d, idx.astype(np.int64), 1), scores)
    rest = d.copy()
    np.put_along_axis(rest, idx.astype(np.int64), -2.0, 1)
    assert (rest == -2.0).all()  # every other class holds the fill
    np.testing.assert_array_equal(dense_maps(torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(scores), 11,
                                             -2.0).numpy(), d)
    spec_yx, spec_xy = LabelMapSpec.relabel(), LabelMapSpec(size=15, k=5, box_order="xy")
    boxes, sizes = np.array([[10, 30, 50, 60]]), np.array([[100, 200]])
    want_yx = _published_boxes([(10 / 100, 30 / 200, 50 / 100, 60 / 200)], 15)[:, 1:].numpy()
    np.testing.assert_array_equal(map_boxes(boxes, sizes, spec_yx), want_yx)  # bit-identical to ReLabel's
    np.testing.assert_array_equal(map_boxes(boxes, sizes, spec_xy), want_yx[:, [1, 0, 3, 2]])
    np.testing.assert_allclose(map_boxes(boxes, sizes, spec_xy, np.array([True])),
                               [[(110 / 200) * 15 - 0.5, 1.0, (170 / 200) * 15 - 0.5, 8.5]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ generation
def test_topk_maps_order_ties_and_explicit_pooling():
    assert torch.Tensor  # without torch: skipped here
    from fkdstore.labelmap_torch import topk_maps

    maps = torch.zeros(1, 6, 2, 2)
    maps[0, :, 0, 0] = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    idx, sc = topk_maps(maps, 4)
    assert idx[0, :, 0, 0].tolist() == [1, 2, 4, 5] and sc[0, :, 0, 0].tolist() == [3.0, 3.0, 3.0, 2.0]
    assert idx[0, :, 1, 1].tolist() == [0, 1, 2, 3]  # all equal: lower class first
    big = torch.randn(2, 7, 6, 6)
    with pytest.raises(ValidationError, match="square"):
        topk_maps(big[..., :4], 3)
    idx, sc = topk_maps(big, 3, size=3)
    pooled = torch.nn.functional.avg_pool2d(big, 2)
    want = pooled.sort(dim=1, descending=True, stable=True)
    assert torch.equal(idx.long(), want.indices[:, :3]) and torch.allclose(sc, want.values[:, :3])
    with pytest.raises(ValidationError, match="k must be <= the number of classes"):
        topk_maps(big, 8)


def test_spatial_classifier_is_the_classifier_at_every_cell():
    assert torch.Tensor  # without torch: skipped here
    from fkdstore.labelmap_torch import SpatialClassifier

    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU())
    fc = torch.nn.Linear(6, 10)
    x = torch.randn(2, 3, 17, 17)
    teacher = SpatialClassifier(features, fc)
    maps = teacher(x)
    assert maps.shape == (2, 10, 8, 8)
    logits = fc(features(x).mean((2, 3)))  # the classifier: global average pool, then fc
    torch.testing.assert_close(maps.mean((2, 3)), logits, atol=1e-5, rtol=1e-5)

    class Tokens(torch.nn.Module):  # a ViT-like body: a class token then 4 x 4 patch tokens
        def forward(self, x):
            f = features(x)[:, :, :4, :4].flatten(2).transpose(1, 2)
            return torch.cat([torch.full_like(f[:, :1], 99.0), f], 1)

    tok = SpatialClassifier(Tokens(), fc)(x)
    torch.testing.assert_close(tok, maps[:, :, :4, :4])


def test_spatial_teacher_finds_the_head_of_resnet_and_timm_style_models():
    """torchvision's layout (children ending in ``avgpool`` and ``fc``) and timm's (``forward_features`` +
    ``get_classifier()``) are recognised: the class map's mean over cells is the model's own output."""
    assert torch.Tensor  # without torch: skipped here
    from fkdstore.labelmap_torch import SpatialClassifier, spatial_teacher

    torch.manual_seed(0)

    class ResNetLike(torch.nn.Module):  # forward runs the children in order, as torchvision's ResNet
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
            self.relu = torch.nn.ReLU()
            self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
            self.fc = torch.nn.Linear(6, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.avgpool(self.relu(self.conv(x))), 1))

    class TimmLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU())
            self.head = torch.nn.Linear(6, 10)

        def forward_features(self, x):
            return self.body(x)

        def get_classifier(self):
            return self.head

        def forward(self, x):
            return self.head(self.forward_features(x).mean((2, 3)))

    x = torch.randn(2, 3, 17, 17)
    for model, fc in ((ResNetLike(), "fc"), (TimmLike(), "head")):
        teacher = spatial_teacher(model)
        assert isinstance(teacher, SpatialClassifier) and teacher.fc is getattr(model, fc)
        maps = teacher(x)
        assert maps.shape == (2, 10, 8, 8)
        torch.testing.assert_close(maps.mean((2, 3)), model(x), atol=1e-5, rtol=1e-5)
    no_head = torch.nn.Conv2d(3, 10, 1)  # returns class maps already
    assert spatial_teacher(no_head, passthrough=True) is no_head
    with pytest.raises(TypeError, match="cannot find the feature extractor and classifier of Conv2d"):
        spatial_teacher(no_head)


# ------------------------------------------------------------------------------------------------ ReLabel import
def _write_relabel(root, keys, maps_topk, dtype):
    """ReLabel's layout: <root>/<synset>/<stem>.pt = torch.save of a [2, K, S, S] tensor (scores, indices)."""
    for key, m in zip(keys, maps_topk):
        p = root / (key.split("/")[0]) / (key.split("/")[1].split(".")[0] + ".pt")
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(m).to(getattr(torch, dtype)), p)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_import_round_trip_equals_relabel_pooling(tmp_path, dtype):
    from fkdstore.importers.relabel import prepare_import

    rng = np.random.default_rng(21)
    C, K, S = 1000, 5, 15
    keys = [f"n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(4)]
    idx, scores = random_maps(rng, len(keys), K, S, C)
    files = np.stack([scores, idx.astype(np.float32)], 1)  # [2, K, S, S] per image, indices stored as floats
    _write_relabel(tmp_path, keys, files, dtype)
    imp = prepare_import(tmp_path, keys, C)
    assert imp.spec == LabelMapSpec.relabel(dtype=dtype)
    assert imp.scan.missing == () and imp.scan.extra == ()
    got_i, got_idx, got_sc = (np.concatenate(x) for x in zip(*imp.batches(batch=5)))
    np.testing.assert_array_equal(got_i, np.arange(len(keys)))
    assert got_idx.dtype == np.uint16 and got_sc.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got_idx, idx)

    # 3 crops per image, flipped at random (ReLabel flips the image after cropping and ignores it for the label)
    H, W = rng.integers(50, 500, (len(keys), 2)).T
    crops, boxes, sizes, rows = [], [], [], []
    for n in range(len(keys)):
        b, _ = SlotCropSampler(seed=4).sample(n, int(H[n]), int(W[n]), 3)
        for top, left, h, w in b:
            crops.append((top / H[n], left / W[n], h / H[n], w / W[n]))
            boxes.append((top, left, h, w))
            sizes.append((H[n], W[n]))
            rows.append(n)
    boxes.append((0, 0, H[0], W[0]))  # and a whole image
    sizes.append((H[0], W[0]))
    crops.append((0.0, 0.0, 1.0, 1.0))
    rows.append(0)
    rows = np.array(rows)
    topk = torch.from_numpy(files)
    if dtype == "float16":
        topk = topk.half()
    topk = topk[torch.from_numpy(rows)]
    want = torch.softmax(_roi_align(_scatter(topk[:, 0], topk[:, 1], C), _published_boxes(crops, S), 1)
                         .reshape(len(rows), C), 1).numpy()
    got = pool_labels(got_idx[rows], got_sc[rows], np.array(boxes), np.array(sizes), rng.random(len(rows)) < 0.5,
                      imp.spec, C)
    np.testing.assert_allclose(got, want, atol=1e-6)
    got_t = pool_labels(torch.from_numpy(got_idx[rows].astype(np.int64)), torch.from_numpy(got_sc[rows]),
                        np.array(boxes), np.array(sizes), None, imp.spec, C)
    np.testing.assert_allclose(got_t.numpy(), want, atol=1e-6)


def test_naming_rule_scan_and_collisions(tmp_path):
    from fkdstore.importers.relabel import prepare_import, relabel_file_name, scan_relabel

    assert relabel_file_name("n01/n01_1.JPEG") == "n01/n01_1.pt"
    assert relabel_file_name("train/n01/a.v2.JPEG") == "n01/a.pt"  # last two components, cut at the first dot
    assert relabel_file_name("cls.x/a.jpg") == "cls.pt"
    assert relabel_file_name("a.jpg") == "a.pt"
    with pytest.raises(ValidationError,
                       match=r"'n01/a\.v2\.JPEG' and 'n01/a\.JPEG' both map to label-map file 'n01/a\.pt'"):
        scan_relabel(tmp_path, ["n01/a.v2.JPEG", "n01/a.JPEG"])
    rng = np.random.default_rng(0)
    idx, sc = random_maps(rng, 3, 2, 3, 8)
    _write_relabel(tmp_path, ["n01/a.jpg", "n01/b.jpg", "n02/zz.jpg"], np.stack([sc, idx.astype(np.float32)], 1),
                   "float32")
    keys = ["n01/a.jpg", "n01/b.jpg", "n01/c.jpg"]
    scan = scan_relabel(tmp_path, keys)
    assert scan.missing == (2,) and scan.extra == ("n02/zz.pt",) and scan.found == 2
    with pytest.raises(ValidationError, match=r"1 images have no label-map file.*n01/c\.jpg -> n01/c\.pt"):
        prepare_import(tmp_path, keys, 8)
    imp = prepare_import(tmp_path, keys, 8, missing="skip", box_order="xy", grid=2)
    assert imp.images == (0, 1) and imp.spec.box_order == "xy" and imp.spec.grid == 2
    assert imp.meta["import"]["images_without_file"] == 1 and imp.meta["import"]["extra_files"] == 1
    assert [b[0].tolist() for b in imp.batches(batch=1)] == [[0], [1]]
    with pytest.raises(ValidationError, match="size is read from the files"):
        prepare_import(tmp_path, keys, 8, missing="skip", size=3)


def test_bad_files_raise_a_named_error(tmp_path):
    from fkdstore.importers.relabel import iter_relabel_maps, load_relabel_file

    rng = np.random.default_rng(3)
    idx, sc = random_maps(rng, 1, 3, 4, 10)
    good = torch.from_numpy(np.stack([sc[0], idx[0].astype(np.float32)]))
    p = tmp_path / "n01" / "a.pt"
    p.parent.mkdir()
    torch.save(good, p)
    i, _ = load_relabel_file(p, 10)
    np.testing.assert_array_equal(i, idx[0])

    made = []

    def bad(obj=None, raw=None):
        q = tmp_path / "bad" / f"{len(made)}.pt"
        q.parent.mkdir(exist_ok=True)
        made.append(q)
        if raw is not None:
            q.write_bytes(raw)
        else:
            torch.save(obj, q)
        return q

    cases = [
        (bad(raw=p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be loaded"),  # truncated
        (bad(raw=b"not a torch file at all"), "cannot be loaded"),
        (bad(good[None]), r"shape \[2, K, S, S\]"),
        (bad(good[:, :, :3]), r"shape \[2, K, S, S\]"),
        (bad(good.double()), "float16 or float32"),
        (bad({"maps": good}), "one dense tensor"),
        (bad(torch.stack([good[0], good[1] + 0.5])), "class indices must be integers"),
        (bad(torch.stack([good[0], good[1] + 10])), r"class indices must be integers in \[0, 10\)"),
        (bad(torch.stack([good[0], torch.zeros_like(good[1])])), "distinct within a cell"),
        (bad(torch.stack([good[0] * float("nan"), good[1]])), "scores must be finite"),
    ]
    for q, rule in cases:
        with pytest.raises(LabelFileError, match=rule) as e:
            load_relabel_file(q, 10)
        assert str(q) in str(e.value)

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    with pytest.raises(LabelFileError, match="weights_only=True"):  # refused, never unpickled
        load_relabel_file(bad(Evil()), 10)
    # every file must share the first file's layout
    torch.save(torch.from_numpy(np.stack([sc[0, :2], idx[0, :2].astype(np.float32)])), tmp_path / "n01" / "b.pt")
    with pytest.raises(LabelFileError, match=r"b\.pt must have the layout of the first file, K=3"):
        list(iter_relabel_maps(tmp_path, ["n01/a.jpg", "n01/b.jpg"], 10))


def test_an_empty_batch_gives_empty_labels():
    spec = LabelMapSpec.tokenlabeling(size=4, k=2, grid=2)
    i, s = np.zeros((0, 2, 4, 4), np.uint16), np.zeros((0, 2, 4, 4), np.float16)
    no_boxes, no_sizes = np.zeros((0, 4), np.int64), np.zeros((0, 2), np.int64)
    assert pool_labels(i, s, no_boxes, no_sizes, None, spec, 7).shape == (0, 2, 2, 7)
    got = pool_labels(torch.from_numpy(i.astype(np.int64)), torch.from_numpy(s), no_boxes, no_sizes, None, spec, 7)
    assert tuple(got.shape) == (0, 2, 2, 7)
