import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fkdstore.errors import ValidationError
from fkdstore.seeded import DRAW_FLIP, DRAW_LEFT, DRAW_TOP, SlotCropSampler
from fkdstore.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    crop_resize,
    normalize,
    replay_crops,
)


def reference_get_params(rng, H, W, scale, ratio):
    """Scalar transcription of torchvision's RandomResizedCrop.get_params (numpy RNG)."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def random_image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


# ---------------------------------------------------------------- sampler


@settings(max_examples=150, deadline=None)
@given(
    H=st.integers(1, 2000),
    W=st.integers(1, 2000),
    s=st.tuples(st.floats(0.001, 1.0), st.floats(0.001, 1.0)).map(sorted),
    r=st.tuples(st.floats(0.05, 20.0), st.floats(0.05, 20.0)).map(sorted),
    M=st.integers(1, 40),
    index=st.integers(0, 2**40),
)
def test_boxes_inside_image(H, W, s, r, M, index):
    sampler = SlotCropSampler(scale=tuple(s), ratio=tuple(r), seed=3)
    boxes, flips = sampler.sample(index, H, W, M)
    assert boxes.dtype == np.int32 and boxes.shape == (M, 4)
    assert flips.dtype == np.bool_ and flips.shape == (M,)
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()


def test_determinism_per_seed_and_index():
    sampler = SlotCropSampler(seed=7)
    a = sampler.sample(42, 480, 640, 16)
    b = SlotCropSampler(seed=7).sample(42, 480, 640, 16)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = sampler.sample(43, 480, 640, 16)
    d = SlotCropSampler(seed=8).sample(42, 480, 640, 16)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], d[0])


def test_sample_independent_of_processing_order():
    sampler = SlotCropSampler(seed=1)
    fresh = sampler.sample(5, 300, 200, 8)
    for i in [9, 0, 3, 4, 6]:
        sampler.sample(i, 300, 200, 8)
    np.random.seed(123)  # global RNG state must not matter
    torch.manual_seed(123)
    again = sampler.sample(5, 300, 200, 8)
    assert np.array_equal(fresh[0], again[0]) and np.array_equal(fresh[1], again[1])


_G, _MASK = 0x9E3779B97F4A7C15, 2**64 - 1


def _mix(z):
    """splitmix64's finaliser on a Python int (an independent transcription of the documented rule)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def test_rng_rule_is_splitmix64_of_seed_image_slot_draw():
    """The counter rule (module docstring of fkdstore.seeded): draw d of slot s of image i is
    mix(key + (d + 1) G) with key = mix(mix(mix(seed + G) + (i + 1) G) + (s + 1) G); position and flip are
    read from their draws exactly as documented, so a slot depends on (seed, i, s) alone."""
    sampler = SlotCropSampler(seed=11, flip_p=0.5)
    H, W, M = 300, 400, 6
    boxes, flips = sampler.sample(4, H, W, M)
    for s in range(M):
        key = _mix((_mix((_mix((11 + _G) & _MASK) + 5 * _G) & _MASK) + (s + 1) * _G) & _MASK)

        def draw(d, key=key):
            return _mix((key + (d + 1) * _G) & _MASK)

        top, left, h, w = (int(v) for v in boxes[s])
        assert top == ((draw(DRAW_TOP) >> 32) * (H - h + 1)) >> 32
        assert left == ((draw(DRAW_LEFT) >> 32) * (W - w + 1)) >> 32
        assert bool(flips[s]) == ((draw(DRAW_FLIP) >> 11) * 2.0**-53 < 0.5)


@pytest.mark.parametrize(
    "H,W,scale,ratio",
    [(224, 224, (0.08, 1.0), (3 / 4, 4 / 3)), (100, 400, (0.08, 1.0), (3 / 4, 4 / 3)),
     (500, 60, (0.5, 1.0), (0.2, 5.0))],
)
def test_distribution_matches_torchvision_reference(H, W, scale, ratio):
    n_images, M = 400, 10
    sampler = SlotCropSampler(scale=scale, ratio=ratio, flip_p=0.3, seed=0)
    ours = np.concatenate([sampler.sample(i, H, W, M)[0] for i in range(n_images)]).astype(float)
    flips = np.concatenate([sampler.sample(i, H, W, M)[1] for i in range(n_images)])
    rng = np.random.default_rng(99)
    ref = np.array([reference_get_params(rng, H, W, scale, ratio) for _ in range(n_images * M)], dtype=float)
    n = len(ref)
    for name, f in [
        ("area", lambda b: b[:, 2] * b[:, 3] / (H * W)),
        ("h", lambda b: b[:, 2] / H),
        ("w", lambda b: b[:, 3] / W),
        ("top", lambda b: b[:, 0] / H),
        ("left", lambda b: b[:, 1] / W),
    ]:
        x, y = f(ours), f(ref)
        se = math.sqrt(x.var() / n + y.var() / n) + 1e-12
        assert abs(x.mean() - y.mean()) < 5 * se, name
        assert abs(np.median(x) - np.median(y)) < 0.05, name
    area = ours[:, 2] * ours[:, 3] / (H * W)
    assert area.min() >= 0 and area.max() <= 1.0
    assert abs(flips.mean() - 0.3) < 0.03


def test_flip_probability_extremes():
    assert not SlotCropSampler(flip_p=0.0).sample(0, 50, 50, 100)[1].any()
    assert SlotCropSampler(flip_p=1.0).sample(0, 50, 50, 100)[1].all()


def test_fallback_wide_strip():
    # H=1: every attempt needs h >= 7, so all fail -> centre crop with ratio clamped to 4/3.
    boxes, _ = SlotCropSampler().sample(0, 1, 1000, 5)
    assert (boxes == np.array([0, 499, 1, 1], dtype=np.int32)).all()


def test_fallback_tall_and_whole_image():
    boxes, _ = SlotCropSampler(scale=(1.0, 1.0), ratio=(2.0, 2.0)).sample(0, 1000, 10, 3)
    # in_ratio 0.01 < 2 -> w = 10, h = round(10 / 2) = 5, centred.
    assert (boxes == np.array([497, 0, 5, 10])).all()
    # Tiny scale on a 2x2 image: every attempt rounds a side to 0; image ratio 1 is in range.
    boxes, _ = SlotCropSampler(scale=(0.01, 0.05), ratio=(0.5, 2.0)).sample(0, 2, 2, 3)
    assert (boxes == np.array([0, 0, 2, 2])).all()


def test_fallback_side_clamped_to_one():
    boxes, _ = SlotCropSampler(ratio=(100.0, 200.0)).sample(0, 10, 10, 4)
    assert (boxes[:, 2] >= 1).all() and (boxes == np.array([4, 0, 1, 10])).all()


def test_config_roundtrip_json():
    sampler = SlotCropSampler(scale=(0.25, 0.9), ratio=(0.5, 2.0), flip_p=0.1, seed=17)
    cfg = json.loads(json.dumps(sampler.get_config()))
    assert cfg["algorithm"] == "random_resized_crop"
    again = SlotCropSampler.from_config(cfg)
    assert again == sampler
    assert np.array_equal(again.sample(3, 64, 80, 5)[0], sampler.sample(3, 64, 80, 5)[0])
    with pytest.raises(ValidationError, match="algorithm"):
        SlotCropSampler.from_config({**cfg, "algorithm": "center_crop"})
    with pytest.raises(ValidationError, match="missing"):
        SlotCropSampler.from_config({"algorithm": "random_resized_crop"})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale": (0.5, 0.1)}, "scale must be ordered"),
        ({"scale": (0.0, 1.0)}, r"scale must lie in \(0, 1\]"),
        ({"scale": (0.1, 1.5)}, r"scale must lie in \(0, 1\]"),
        ({"ratio": (2.0, 1.0)}, "ratio must be ordered"),
        ({"ratio": (0.0, 1.0)}, "ratio must be > 0"),
        ({"flip_p": 1.5}, r"flip_p must be in \[0, 1\], got 1.5"),
        ({"seed": -1}, r"seed must be an integer in \[0, 18446744073709551615\]. Got -1."),
    ],
)
def test_sampler_validation(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        SlotCropSampler(**kwargs)


@pytest.mark.parametrize(
    "args,match",
    [((0, 0, 10, 1), "height must be a positive integer. Got 0."), ((0, 10, 0, 1), "width"),
     ((0, 10, 10, 0), "num_crops"), ((-1, 10, 10, 1), "index must be a non-negative integer")],
)
def test_sample_validation(args, match):
    with pytest.raises(ValidationError, match=match):
        SlotCropSampler().sample(*args)


# ---------------------------------------------------------------- crop function


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_crop_resize_matches_crop_then_resize(interpolation):
    img = random_image(120, 160)
    box = (10, 25, 70, 90)
    out = crop_resize(img, box, False, (48, 64), interpolation)
    ref = img.crop((25, 10, 115, 80)).resize((64, 48), INTERPOLATIONS[interpolation])
    assert out.dtype == torch.uint8 and out.shape == (3, 48, 64) and out.is_contiguous()
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(ref))
    flipped = crop_resize(img, box, True, (48, 64), interpolation)
    assert torch.equal(flipped, out.flip(-1))


def test_crop_resize_int_size_and_upscale_and_grey():
    img = random_image(30, 40, mode="L")
    out = crop_resize(img, (0, 0, 30, 40), False, 56)
    assert out.shape == (3, 56, 56)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    ref = img.convert("RGB").resize((56, 56), Image.Resampling.BILINEAR)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(ref))


def test_crop_resize_validation():
    img = random_image(20, 30)
    for box in [(0, 0, 0, 5), (0, 0, 5, 0), (-1, 0, 5, 5), (0, 26, 5, 5), (16, 0, 5, 5)]:
        with pytest.raises(ValidationError, match=r"inside the image of size \(height=20, width=30\)"):
            crop_resize(img, box, False, 8)
    with pytest.raises(ValidationError, match="integers"):
        crop_resize(img, (0.5, 0, 5, 5), False, 8)
    with pytest.raises(ValidationError, match="interpolation"):
        crop_resize(img, (0, 0, 5, 5), False, 8, "cubic")


def test_replay_sampled_crops_is_identical_and_matches_crop_resize():
    img = random_image(97, 131, seed=4)
    boxes, flips = SlotCropSampler(seed=2).sample(0, 97, 131, 6)
    a = replay_crops(img, boxes, flips, 32)
    b = replay_crops(img, boxes, flips, 32)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    for k in range(6):
        assert torch.equal(a[k], crop_resize(img, tuple(boxes[k]), bool(flips[k]), 32))
    twice = replay_crops(img, np.stack([boxes[0], boxes[0]]), np.array([False, False]), (16, 24))
    assert torch.equal(twice[0], twice[1])
    assert replay_crops(img, np.zeros((0, 4), np.int32), np.zeros(0, bool), 8).shape == (0, 3, 8, 8)
    with pytest.raises(ValidationError, match="flips must have shape"):
        replay_crops(img, boxes, flips[:3], 8)


def test_normalize_numerics():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    y = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert y.dtype == torch.float32 and y.shape == x.shape
    mean = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(3, 1, 1)
    ref = (x.numpy() / 255.0 - mean) / std
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
    single = normalize(x[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert single.min() >= -1 and single.max() <= 1
    white = torch.full((3, 1, 1), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(white, (0, 0, 0), (1, 1, 1)), torch.ones(3, 1, 1))
    with pytest.raises(ValidationError, match="uint8"):
        normalize(x.float())
    with pytest.raises(ValidationError, match="3 values"):
        normalize(x, (0.5, 0.5), (1, 1, 1))
    with pytest.raises(ValidationError, match=r"\[\.\.\., 3, H, W\]"):
        normalize(torch.zeros(4, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------- exact replay of 0.1 stores


def crop_resize_v01(image, box, flip, size, interpolation="bilinear"):
    """fkdstore 0.1.0's crop path, verbatim: crop, resize, PIL flip, HWC -> CHW (the pixels 0.1 teachers saw)."""
    top, left, h, w = box
    crop = image.convert("RGB").crop((left, top, left + w, top + h))
    out = crop.resize((size[1], size[0]), INTERPOLATIONS[interpolation])
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))


def smooth_image(h, w, seed):
    """Photo-like (smooth + fine noise) so resampling filters see gradients, not only white noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_replay_bit_identical_to_v01_crop_path(interpolation):
    """Random boxes, output sizes (down- and upscaling, non-square) and flips: every crop equals 0.1's path."""
    rng = np.random.default_rng(sorted(INTERPOLATIONS).index(interpolation))
    for trial in range(6):
        H, W = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        img = smooth_image(H, W, trial)
        boxes, flips = SlotCropSampler(seed=trial, scale=(0.01, 1.0)).sample(trial, H, W, 12)
        size = (int(rng.integers(1, 96)), int(rng.integers(1, 96)))
        got = replay_crops(img, boxes, flips, size, interpolation)
        ref = np.stack([crop_resize_v01(img, tuple(b), f, size, interpolation) for b, f in zip(boxes, flips)])
        assert np.array_equal(got.numpy(), ref)
        norm = replay_crops(img, boxes, flips, size, interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        assert torch.equal(norm, normalize(torch.from_numpy(ref), IMAGENET_MEAN, IMAGENET_STD))
        k = int(rng.integers(0, 12))
        assert np.array_equal(crop_resize(img, tuple(boxes[k]), bool(flips[k]), size, interpolation).numpy(), ref[k])


def test_resize_box_is_not_crop_then_resize():
    """Why the crop path keeps crop() + resize(): Image.resize(box=...) reads outside the box at its edges,
    so it differs from the format's pixels (for bilinear on almost every box)."""
    img = smooth_image(120, 160, 0)
    box = (17, 23, 61, 77)
    ours = crop_resize(img, box, False, 32).numpy().transpose(1, 2, 0)
    with_box = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR, box=(23, 17, 100, 78)))
    assert not np.array_equal(ours, with_box)


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.1, 0.9, 0.33), (0.07, 1.3, 0.61)), ((0, 0, 0), (1, 1, 1))])
def test_fused_normalisation_bit_identical_for_every_value(mean, std):
    """Every uint8 value in every channel: the fused pass equals normalize() exactly (float32, same op order)."""
    arr = ((np.arange(256)[:, None] + np.array([0, 7, 99])) % 256).astype(np.uint8).reshape(16, 16, 3)
    img = Image.fromarray(arr)
    for flip in (False, True):
        got = replay_crops(img, [[0, 0, 16, 16]], [flip], 16, "nearest", mean=mean, std=std)
        u8 = replay_crops(img, [[0, 0, 16, 16]], [flip], 16, "nearest")
        assert np.array_equal(u8[0].numpy().transpose(1, 2, 0), arr[:, ::-1] if flip else arr)
        assert got.dtype == torch.float32 and torch.equal(got, normalize(u8, mean, std))


def test_replay_into_out_and_argument_errors():
    img = smooth_image(40, 50, 1)
    boxes, flips = SlotCropSampler(seed=1).sample(0, 40, 50, 3)
    buf = torch.zeros(2, 3, 3, 8, 8)
    got = replay_crops(img, boxes, flips, 8, mean=IMAGENET_MEAN, std=IMAGENET_STD, out=buf[1])
    assert got.data_ptr() == buf[1].data_ptr() and (buf[0] == 0).all()
    assert torch.equal(buf[1], normalize(replay_crops(img, boxes, flips, 8), IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValidationError,
                       match=r"out must be a contiguous CPU torch.uint8 tensor of shape \(3, 3, 8, 8\)"):
        replay_crops(img, boxes, flips, 8, out=buf[1])
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        replay_crops(img, boxes, flips, 8, out=np.zeros((3, 3, 8, 8), np.uint8))
    with pytest.raises(ValidationError, match="mean and std must be given together"):
        replay_crops(img, boxes, flips, 8, mean=IMAGENET_MEAN)
    with pytest.raises(ValidationError, match="std values must be > 0"):
        replay_crops(img, boxes, flips, 8, mean=IMAGENET_MEAN, std=(1, 0, 1))
    bad = boxes.copy()
    bad[2] = (35, 0, 10, 10)
    with pytest.raises(ValidationError,
                       match=r"box \(top=35, left=0, height=10, width=10\) must be non-empty and inside"):
        replay_crops(img, bad, flips, 8)
