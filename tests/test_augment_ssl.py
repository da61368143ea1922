"""The self-supervised views' policies: random_grayscale and gaussian_blur (columns, draws, pixel-exact replay
against references written here from torchvision's definitions, and a store round trip)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from optional_torch import HAVE_TORCH, torch

import fkdstore
import fkdstore.augment as A
from fkdstore.augment.blur import gaussian_kernel
from fkdstore.errors import ValidationError

SIZE = (20, 27)
N, M = 6, 8


def image(seed: int, size=SIZE, smooth: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    base = rng.integers(0, 256, (size[0] // 4 + 1, size[1] // 4 + 1, 3)).astype(np.float64)
    up = np.kron(base, np.ones((4, 4, 1)))[: size[0], : size[1]]
    return np.clip(up + rng.normal(0, 6, up.shape), 0, 255).astype(np.uint8)


def params(**cols) -> dict:
    return {k: np.asarray(v[0], dtype=v[1]) for k, v in cols.items()}


# ------------------------------------------------------------------ references from torchvision's definitions
def ref_grayscale(x: np.ndarray) -> np.ndarray:
    """torchvision ``to_grayscale(img, 3)`` (PIL): ``img.convert("L")``, i.e. ITU-R 601-2 luma
    ``L = R 299/1000 + G 587/1000 + B 114/1000`` in Pillow's 16-bit fixed point (rounded), repeated 3 times."""
    r, g, b = (x[..., c].astype(np.int64) for c in range(3))
    grey = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)


def _reflect(i: int, n: int) -> int:
    """torch's ``reflect`` padding index (no edge repeat), mirrored again past the far edge."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return period - i if i >= n else i


def ref_blur(x: np.ndarray, kernel_size, sigma: float) -> np.ndarray:
    """Per pixel, from torchvision's ``_get_gaussian_kernel1d`` (``exp(-0.5 (x / sigma)**2)`` normalised, here in
    float64 rounded to float32), reflect padding, the x pass then the y pass with float32 products and sums in
    tap order, then round half to even and cast."""
    def kernel(k):
        h = (k - 1) / 2
        e = [math.exp(-0.5 * ((j - h) / sigma) ** 2) for j in range(k)]
        s = math.fsum(e)
        return [np.float32(v / s) for v in e]

    H, W, _ = x.shape
    kx, ky = kernel_size
    wx, wy = kernel(kx), kernel(ky)
    f = x.astype(np.float32)
    mid = np.zeros_like(f)
    for y in range(H):
        for c in range(3):
            for i in range(W):
                acc = np.float32(wx[0] * f[y, _reflect(i - kx // 2, W), c])
                for j in range(1, kx):
                    acc = np.float32(acc + np.float32(wx[j] * f[y, _reflect(i + j - kx // 2, W), c]))
                mid[y, i, c] = acc
    out = np.zeros_like(f)
    for i in range(W):
        for c in range(3):
            for y in range(H):
                acc = np.float32(wy[0] * mid[_reflect(y - ky // 2, H), i, c])
                for j in range(1, ky):
                    acc = np.float32(acc + np.float32(wy[j] * mid[_reflect(y + j - ky // 2, H), i, c]))
                out[y, i, c] = acc
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tv_tensor_blur(x: np.ndarray, kernel_size, sigma: float) -> np.ndarray:
    """torchvision ``_functional_tensor.gaussian_blur`` re-typed with torch ops (torchvision is not importable
    here): float32 linspace kernel, outer product, reflect pad, grouped conv2d, round, cast."""
    t = torch.from_numpy(x).permute(2, 0, 1)[None].float()

    def k1(k):
        h = (k - 1) * 0.5
        g = torch.linspace(-h, h, steps=k, dtype=torch.float32)
        pdf = torch.exp(-0.5 * (g / sigma).pow(2))
        return pdf / pdf.sum()

    kx, ky = kernel_size
    k2 = torch.mm(k1(ky)[:, None], k1(kx)[None, :]).expand(3, 1, ky, kx)
    t = torch.nn.functional.pad(t, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    t = torch.nn.functional.conv2d(t, k2, groups=3)
    return torch.round(t).to(torch.uint8)[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------ random_grayscale
def test_grayscale_replay_equals_pillow_luma_and_skips_unapplied_slots():
    g = A.RandomGrayscale(p=0.5)
    for seed in range(4):
        x = image(seed, smooth=bool(seed % 2))
        got = g.apply(x, params(gray_applied=(True, bool)))
        np.testing.assert_array_equal(got, ref_grayscale(x))
        # within half a level of the real-valued ITU-R 601-2 luma
        luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(got[..., 0] - luma).max() <= 0.5 + 1e-9
        same = g.apply(x, params(gray_applied=(False, bool)))
        np.testing.assert_array_equal(same, x)
        assert same is not x


def test_grayscale_draws_follow_p():
    for p, lo, hi in ((0.0, 0, 0), (1.0, 1, 1), (0.2, 0.17, 0.23)):
        g = A.RandomGrayscale(p=p)
        flags = np.concatenate([g.sample(7, i, range(100), image_size=SIZE, num_images=50, crops_per_image=100)
                                ["gray_applied"] for i in range(50)])
        assert flags.dtype == np.bool_ and lo <= flags.mean() <= hi  # 5000 slots: sd 0.006 at p = 0.2


def test_grayscale_column_and_config_errors():
    g = A.RandomGrayscale(p=0.3)
    assert g.columns() == (A.Column("gray_applied", "bool", "bool", ()),)
    with pytest.raises(ValidationError, match=r"'gray_applied' must have dtype bool\. Got uint8"):
        g.validate({"gray_applied": np.zeros((2, 3), np.uint8)}, num_images=2, crops_per_image=3)
    with pytest.raises(ValidationError, match=r"gray_applied must be one bool per slot"):
        g.apply(image(0), {"gray_applied": np.zeros(2, bool)})
    with pytest.raises(ValidationError, match=r"p must be in \[0, 1\]\. Got 1\.5"):
        A.RandomGrayscale(p=1.5)


# ------------------------------------------------------------------ gaussian_blur
@pytest.mark.parametrize("kernel_size, sigma, smooth", [
    ((5, 5), 0.7, False), ((3, 7), 1.3, True), ((23, 23), 2.0, True), ((23, 23), 0.1, False), ((1, 5), 1.0, True),
])
def test_blur_replay_equals_the_reference(kernel_size, sigma, smooth):
    b = A.GaussianBlur(kernel_size=kernel_size, sigma=(0.1, 2.0))
    x = image(11, size=(9, 13), smooth=smooth)  # 23 > 9: padding mirrors past the far edge (torchvision refuses)
    s = float(np.float16(sigma))
    got = b.apply(x, params(blur_sigma=(sigma, np.float16)))
    np.testing.assert_array_equal(got, ref_blur(x, kernel_size, s))


def test_blur_kernel_is_normalised_gaussian_in_float32():
    w = gaussian_kernel(23, 1.7)
    assert w.dtype == np.float32 and abs(float(w.astype(np.float64).sum()) - 1) < 1e-6
    x = np.arange(23) - 11.0
    np.testing.assert_allclose(w, np.exp(-x**2 / (2 * 1.7**2)) / np.exp(-x**2 / (2 * 1.7**2)).sum(), rtol=1e-6)
    np.testing.assert_array_equal(w, w[::-1])


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_blur_matches_torchvisions_tensor_algorithm_to_one_level():
    """torchvision's float32 outer-product conv2d and the defined separable float32 passes agree except where a
    value lies within float32 rounding of .5: at most 1 level, on a tiny fraction of pixels."""
    diff = total = 0
    for seed in range(6):
        x = image(seed, size=(64, 48), smooth=bool(seed % 2))
        for ks, sigma in (((23, 23), 1.9), ((5, 9), 0.6)):
            s = float(np.float16(sigma))
            a = A.GaussianBlur(kernel_size=ks).apply(x, params(blur_sigma=(sigma, np.float16)))
            d = np.abs(a.astype(int) - tv_tensor_blur(x, ks, s).astype(int))
            assert d.max() <= 1
            diff, total = diff + int((d > 0).sum()), total + d.size
    assert diff / total < 1e-3


def test_blur_draws_columns_and_zero_means_untouched():
    b = A.GaussianBlur(kernel_size=5, sigma=(0.5, 1.5), p=0.5)
    s = np.concatenate([b.sample(3, i, range(100), image_size=SIZE, num_images=40, crops_per_image=100)["blur_sigma"]
                        for i in range(40)])
    assert s.dtype == np.float16
    on = s[s != 0].astype(np.float64)
    assert 0.46 <= len(on) / len(s) <= 0.54  # 4000 slots, p = 0.5: sd 0.008
    assert on.min() >= 0.5 - 1e-3 and on.max() <= 1.5 + 1e-3 and abs(on.mean() - 1.0) < 0.02  # uniform(0.5, 1.5)
    b.validate({"blur_sigma": s.reshape(40, 100)}, num_images=40, crops_per_image=100)
    x = image(1)
    np.testing.assert_array_equal(b.apply(x, params(blur_sigma=(0.0, np.float16))), x)
    fixed = A.GaussianBlur(kernel_size=3, sigma=0.8)
    assert fixed.sigma == (0.8, 0.8) and fixed.kernel_size == (3, 3)
    assert set(fixed.sample(0, 0, range(5), image_size=SIZE, num_images=1, crops_per_image=5)["blur_sigma"].tolist()) \
        == {float(np.float16(0.8))}


def test_blur_column_and_config_errors():
    b = A.GaussianBlur(kernel_size=(5, 3), sigma=(0.1, 2.0), p=0.5)
    with pytest.raises(ValidationError, match=r"'blur_sigma' values must be in \[0\.098\d*, 2\.00\d*\]\. Got 3\.0"):
        b.validate({"blur_sigma": np.array([[0.0, 3.0]], np.float16)}, num_images=1, crops_per_image=2)
    with pytest.raises(ValidationError, match=r"'blur_sigma' must have dtype float16\. Got float32"):
        b.validate({"blur_sigma": np.zeros((1, 2), np.float32)}, num_images=1, crops_per_image=2)
    with pytest.raises(ValidationError, match=r"must be 0 when p=0\. Got 1\.0"):
        A.GaussianBlur(p=0.0).validate({"blur_sigma": np.array([1.0], np.float16)}, num_images=1, crops_per_image=1)
    with pytest.raises(ValidationError, match=r"a finite sigma > 0\. Got -1\.0"):
        b.apply(image(0), params(blur_sigma=(-1.0, np.float16)))
    with pytest.raises(ValidationError, match=r"kernel_size values must be odd\. Got \(4, 5\)"):
        A.GaussianBlur(kernel_size=(4, 5))
    with pytest.raises(ValidationError, match=r"sigma must be ordered"):
        A.GaussianBlur(sigma=(2.0, 1.0))
    with pytest.raises(ValidationError, match=r"sigma\[0\] must be in \[0\.001, 1000\]\. Got 0\.0"):
        A.GaussianBlur(sigma=(0.0, 1.0))
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a pair of ints"):
        A.GaussianBlur(kernel_size="5")


# ------------------------------------------------------------------ through a store and the Pipeline replay
def test_store_round_trip_and_pipeline_replay(tmp_path):
    pipe = A.parse_augment("color_jitter;random_grayscale:p=0.5;gaussian_blur:kernel_size=[5,3],p=0.7")
    assert [p.name for p in pipe.policies] == ["color_jitter", "random_grayscale", "gaussian_blur"]
    assert A.parse_augment(pipe.get_config()) == pipe
    cols = [c.name for c in pipe.columns()]
    params_ = [pipe.sample(5, i, range(M), image_size=SIZE, num_images=N, crops_per_image=M) for i in range(N)]
    stacked = {c: np.stack([p[c] for p in params_]) for c in cols}
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), (N, M)).astype(np.float32)
    boxes = np.tile(np.array([0, 0, 30, 30], np.int64), (N, M, 1))
    with fkdstore.write(tmp_path / "s", num_images=N, crops_per_image=M, num_classes=10, codec="ms:k=3",
                        image_keys=[f"i{i}.png" for i in range(N)], image_sizes=np.full((N, 2), 40),
                        aug=[(c.name, c.kind, c.dtype, c.shape) for c in pipe.columns()],
                        augment=pipe.get_config()) as w:
        w.put(np.arange(N), boxes, np.zeros((N, M), bool), probs, aug=stacked)
    r = fkdstore.open(tmp_path / "s")
    assert r.header.augment == pipe and r.header.augment.get_config() == pipe.get_config()
    rec = r.read_batch(np.array([4, 1]), np.array([[7, 0, 3], [2, 5, 6]]))
    pipe.validate(rec.aug, num_images=N, crops_per_image=M, image_size=SIZE)
    x = image(3)
    applied = {"random_grayscale": 0, "gaussian_blur": 0}
    for b, i in enumerate((4, 1)):
        for k, s in enumerate(((7, 0, 3), (2, 5, 6))[b]):
            stored = A.slot_params(rec.aug, (b, k))
            fresh = A.slot_params(params_[i], s)
            assert stored.keys() == fresh.keys()
            for c in cols:
                assert stored[c].dtype == fresh[c].dtype
                np.testing.assert_array_equal(stored[c], fresh[c])
            np.testing.assert_array_equal(pipe.apply(x, stored), pipe.apply(x, fresh))
            applied["random_grayscale"] += bool(stored["gray_applied"])
            applied["gaussian_blur"] += bool(stored["blur_sigma"] != 0)
    assert 0 < applied["random_grayscale"] < 6 and 0 < applied["gaussian_blur"] < 6  # both branches replayed
    # the replayed pipeline is the composition of the three policies' definitions
    i, s = 0, 0
    prm = A.slot_params(params_[i], s)
    y = pipe.policies[0].apply(x, prm)
    y = ref_grayscale(y) if prm["gray_applied"] else y
    y = ref_blur(y, (5, 3), float(prm["blur_sigma"])) if prm["blur_sigma"] != 0 else y
    np.testing.assert_array_equal(pipe.apply(x, prm), y)
