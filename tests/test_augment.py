"""Tests of fkdstore.augment: determinism, storage round trips, op definitions, configs, errors, mixing."""

from __future__ import annotations

import ast
import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import fkdstore.augment as A
from fkdstore.augment import ops
from fkdstore.augment.randaugment import AUGMENTATION_SPACE, NO_MAGNITUDE, OPS, SIGNED, magnitude_value
from fkdstore.errors import ValidationError

SIZE = (24, 32)  # (H, W) of the crop the policies see
N, M = 7, 9

POLICIES = {
    "color_jitter": A.ColorJitter(),
    "randaugment": A.RandAugment(num_ops=2, magnitude=9),
    "random_erasing": A.RandomErasing(p=1.0, value="random"),
    "random_grayscale": A.RandomGrayscale(p=0.5),
    "gaussian_blur": A.GaussianBlur(kernel_size=(5, 3), sigma=(0.1, 2.0), p=0.8),
    "mixup": A.Mixup(alpha=0.4, p=0.7),
    "cutmix": A.CutMix(alpha=1.0, p=0.7),
    "mixup_exact": A.MixupExact(alpha=0.4, p=0.7),
    "cutmix_box": A.CutMixBox(alpha=1.0, p=0.7),
    "mix": A.Mix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, p=0.7),
}
IMPORT_ONLY = {"partner_crop", "external_seed"}  # hold imported params, never sampled (tests/test_importers_zoo.py)


def image(seed: int = 0, size=SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def sample(policy, seed=3, index=2, slots=range(M)):
    return policy.sample(seed, index, slots, image_size=SIZE, num_images=N, crops_per_image=M)


def apply_slot(policy, params, j, x, partner=None):
    return policy.apply(x, A.slot_params(params, j), partner=partner)


def test_registry_holds_every_builtin():
    assert set(A.registered_policies()) == set(POLICIES) | IMPORT_ONLY


# ------------------------------------------------------------------ registry-wide
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_config_round_trip_json_equality_repr(name):
    policy = POLICIES[name]
    cfg = policy.get_config()
    assert cfg["name"] == name
    again = A.get_policy(json.loads(json.dumps(cfg)))
    assert again == policy and again.get_config() == cfg
    assert eval(repr(policy), vars(A)) == policy  # repr reads like the constructor
    assert type(policy).from_config(cfg) == policy
    assert cfg == policy.get_config()  # get_policy copied its input


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_unknown_config_key_is_named(name):
    cfg = POLICIES[name].get_config() | {"bogus": 1, "zeta": 2}
    with pytest.raises(ValidationError, match=r"Got unknown \['bogus', 'zeta'\]\."):
        A.get_policy(cfg)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_columns_declare_storage_dtypes_and_sample_matches(name):
    policy = POLICIES[name]
    out = sample(policy)
    assert [c.name for c in policy.columns()] == list(out)
    for c in policy.columns():
        assert c.name.isidentifier() and c.kind in A.base.KINDS
        assert out[c.name].dtype == np.dtype(c.dtype) and out[c.name].shape == (M, *c.shape)
    policy.validate(out, num_images=N, crops_per_image=M, image_size=SIZE)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32), index=st.integers(0, N - 1), data=st.data())
def test_sampling_depends_only_on_seed_image_slot(name, seed, index, data):
    policy = POLICIES[name]
    full = sample(policy, seed, index, range(M))
    subset = data.draw(st.lists(st.integers(0, M - 1), min_size=1, max_size=M))
    part = sample(policy, seed, index, subset)  # any order, repeats, batch size
    for k in full:
        np.testing.assert_array_equal(part[k], full[k][subset])


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_apply_is_deterministic_and_uses_stored_values(name):
    policy = POLICIES[name]
    params = sample(policy)
    x, y = image(1), image(2)
    for j in range(M):
        a = apply_slot(policy, params, j, x, partner=y)
        # what a reader gets back: the bytes of the stored arrays, decoded again
        stored = {k: np.frombuffer(v.tobytes(), dtype=v.dtype).reshape(v.shape) for k, v in params.items()}
        b = apply_slot(policy, stored, j, x.copy(), partner=y.copy())
        assert a.dtype == np.uint8 and a.shape == x.shape
        np.testing.assert_array_equal(a, b)


def test_package_never_imports_torch():
    root = pathlib.Path(A.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = node.module if isinstance(node, ast.ImportFrom) else ""
            assert not any(n.split(".")[0] == "torch" for n in names) and (module or "").split(".")[0] != "torch"


# ------------------------------------------------------------------ float16 round trip
def test_float16_values_are_what_apply_uses():
    cj = A.ColorJitter(brightness=0.5, contrast=0, saturation=0, hue=0)
    params = sample(cj)
    x = image(3)
    for j in range(M):
        f = float(params["cj_factors"][j, 0])
        expected = ops.to_array(ops.brightness(ops.to_pil(x), f))
        np.testing.assert_array_equal(apply_slot(cj, params, j, x), expected)
    mix = A.Mixup(alpha=0.5)
    p = sample(mix)
    q = int(p["mixup_lam"][0])
    assert p["mixup_lam"].dtype == np.uint8
    lam = q / 255  # the stored uint8 code is what apply uses
    assert mix.mix_info(A.slot_params(p, 0)).lam == lam
    x, y = image(4), image(5)
    want = np.clip(np.floor(lam * x.astype(float) + (1 - lam) * y.astype(float) + 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(apply_slot(mix, p, 0, x, y), want)


# ------------------------------------------------------------------ ops, hand-checkable
def const(value, size=(4, 5)) -> np.ndarray:
    return np.full((*size, 3), value, dtype=np.uint8)


def ra_apply(op: str, signed_bin: int, x: np.ndarray, **kw) -> np.ndarray:
    ra = A.RandAugment(num_ops=1, magnitude=abs(signed_bin) or 9, **kw)
    return ra.apply(x, {"ra_ops": np.array([OPS.index(op)], np.uint8), "ra_mag": np.array([signed_bin], np.int8)})


def test_magnitude_bins_follow_torchvision_linspace():
    assert magnitude_value("Rotate", 30, 31, SIZE) == pytest.approx(30.0)
    assert magnitude_value("Rotate", 9, 31, SIZE) == pytest.approx(9.0)
    assert magnitude_value("Solarize", 30, 31, SIZE) == 0.0
    assert magnitude_value("Solarize", 10, 31, SIZE) == pytest.approx(170.0)
    assert magnitude_value("TranslateX", 30, 31, (10, 331)) == pytest.approx(150.0)
    assert magnitude_value("TranslateY", 30, 31, (331, 10)) == pytest.approx(150.0)
    # Posterize: 8 - round(b / 7.5) for 31 bins (round half to even)
    assert [magnitude_value("Posterize", b, 31, SIZE) for b in (0, 3, 4, 9, 30)] == [8, 8, 7, 7, 4]
    assert magnitude_value("Equalize", 9, 31, SIZE) == 0.0


def test_pixel_ops_on_hand_checked_images():
    x = const(200)
    np.testing.assert_array_equal(ra_apply("Solarize", 9, x), const(55))  # 200 >= 178.5 -> 255 - 200
    np.testing.assert_array_equal(ra_apply("Solarize", 9, const(100)), const(100))
    np.testing.assert_array_equal(ra_apply("Posterize", 30, const(0b10111111)), const(0b10110000))  # 4 bits
    np.testing.assert_array_equal(ra_apply("Identity", 0, x), x)
    # Brightness 1 - 0.27 on a constant image: round(200 * 0.73)
    np.testing.assert_array_equal(ra_apply("Brightness", -9, x), const(146))
    # Contrast of a constant image is the image (its mean is itself)
    np.testing.assert_array_equal(ra_apply("Contrast", 9, x), x)


def test_translate_and_shear_move_pixels_exactly():
    x = image(6, (10, 331))
    # TranslateX bin 30 of 31 = int(150) pixels to the right, fill 7
    y = ra_apply("TranslateX", 30, x, fill=7, num_magnitude_bins=31)
    np.testing.assert_array_equal(y[:, 150:], x[:, :331 - 150])
    assert (y[:, :150] == 7).all()
    z = ra_apply("TranslateX", -30, x, fill=7)
    np.testing.assert_array_equal(z[:, :331 - 150], x[:, 150:])
    # Shear about the top-left corner leaves row 0 in place
    s = ra_apply("ShearX", 30, image(7, (8, 8)))
    np.testing.assert_array_equal(s[0], image(7, (8, 8))[0])


def test_hue_shift_and_color_jitter_order():
    assert ops.hue_shift(0.1) == 25 and ops.hue_shift(-0.1) == 231 and ops.hue_shift(0.0) == 0
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    # +1/3 turn of hue (shift 85 of 256): red -> green, in Pillow's HSV
    green = ops.to_array(ops.hue(ops.to_pil(red), 1 / 3))
    assert green[0, 0, 1] == 255 and green[0, 0, 0] < 10
    cj = A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0, hue=0)
    x = image(8)
    f = np.array([1.5, 0.5, 1.0, 0.0], np.float16)
    from fkdstore.augment.color import ORDERS
    i_bc = ORDERS.index((0, 1, 2, 3))
    i_cb = ORDERS.index((1, 0, 2, 3))
    bc = cj.apply(x, {"cj_factors": f, "cj_order": np.uint8(i_bc)})
    cb = cj.apply(x, {"cj_factors": f, "cj_order": np.uint8(i_cb)})
    pil = ops.to_pil(x)
    np.testing.assert_array_equal(bc, ops.to_array(ops.contrast(ops.brightness(pil, 1.5), 0.5)))
    np.testing.assert_array_equal(cb, ops.to_array(ops.brightness(ops.contrast(pil, 0.5), 1.5)))
    assert not np.array_equal(bc, cb)


def test_random_erasing_box_and_reproducible_noise():
    re = A.RandomErasing(p=1.0, value=[1, 2, 3])
    x = image(9)
    out = re.apply(x, {"re_box": np.array([2, 3, 4, 5], np.uint16)})
    assert (out[2:6, 3:8] == [1, 2, 3]).all()
    mask = np.ones(SIZE, bool)
    mask[2:6, 3:8] = False
    np.testing.assert_array_equal(out[mask], x[mask])
    rnd = A.RandomErasing(p=1.0, value="random")
    a = rnd.apply(x, {"re_box": np.array([0, 0, 3, 3], np.uint16), "re_seed": np.uint32(12345)})
    np.testing.assert_array_equal(a[:3, :3], ops.noise_u8(12345, (3, 3, 3)))
    # SplitMix64, element 0: top byte of splitmix64(seed + golden)
    z = (12345 + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    assert a[0, 0, 0] == (z ^ (z >> 31)) >> 56
    p = sample(A.RandomErasing(p=0.0))
    assert (p["re_box"] == 0).all()
    p = sample(A.RandomErasing(p=1.0, scale=(0.1, 0.2)))
    area = p["re_box"][:, 2].astype(int) * p["re_box"][:, 3]
    assert ((area > 0) & (area < 0.3 * SIZE[0] * SIZE[1])).all()


# ------------------------------------------------------------------ mixing with a partner
def test_mixup_lambda_one_keeps_own_pixels_and_zero_takes_partner():
    mix = A.Mixup()
    x, y = image(10), image(11)
    one = {"mixup_partner": np.int32(3), "mixup_lam": np.uint8(255)}
    np.testing.assert_array_equal(mix.apply(x, one, partner=y), x)
    np.testing.assert_array_equal(mix.apply(x, one | {"mixup_lam": np.uint8(0)}, partner=y), y)
    none = {"mixup_partner": np.int32(-1), "mixup_lam": np.uint8(255)}
    np.testing.assert_array_equal(mix.apply(x, none), x)  # unmixed slots need no partner
    with pytest.raises(ValidationError, match=r"mixed with image 3 \(the same slot\)"):
        mix.apply(x, one)


def test_cutmix_box_area_matches_lambda():
    cut = A.CutMix(alpha=1.0)
    p = sample(cut, slots=range(M))
    x = image(12)
    y = 255 - x  # differs from x at every pixel
    for j in range(M):
        prm = A.slot_params(p, j)
        info = cut.mix_info(prm, SIZE)
        out = cut.apply(x, prm, partner=y)
        if info.partner < 0:
            np.testing.assert_array_equal(out, x)
            continue
        taken = (out == y).all(axis=2)
        assert 1 - taken.mean() == pytest.approx(info.lam)
        y1, x1, y2, x2 = cut.box(prm, SIZE)
        centre = tuple(prm["cutmix_center"].tolist())
        assert (y1, x1, y2, x2) == A.cutmix_box(int(prm["cutmix_lam"]) / 255, centre, SIZE)
        assert taken[y1:y2, x1:x2].all() and info.lam == 1 - (y2 - y1) * (x2 - x1) / (SIZE[0] * SIZE[1])
    assert A.cutmix_box(0.0, (0, 0), (10, 10)) == (0, 0, 5, 5)
    assert A.cutmix_lambda((0, 0, 5, 5), (10, 10)) == 0.75


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, N - 1), slot=st.integers(0, M - 1))
def test_partners_are_other_images_and_valid_slots(seed, index, slot):
    for policy in (A.Mixup(p=1.0), A.CutMix(p=1.0)):
        prm = A.slot_params(policy.sample(seed, index, [slot], image_size=SIZE, num_images=N, crops_per_image=M), 0)
        partner = policy.partner_of(prm)
        assert partner != index and 0 <= partner < N
    single = A.Mixup(p=1.0).sample(seed, 0, [slot], image_size=SIZE, num_images=1, crops_per_image=M)
    assert single["mixup_partner"][0] == 0


def test_pipeline_replay_equation_with_partners():
    pipe = A.parse_augment("randaugment:num_ops=2,magnitude=9;mixup:alpha=0.4;cutmix:alpha=1.0")
    images = [image(20 + i) for i in range(N)]  # stand-ins for crop(image_i, box[i, s], flip[i, s])
    params = {i: pipe.sample(5, i, range(M), image_size=SIZE, num_images=N, crops_per_image=M) for i in range(N)}
    i, s = 4, 2
    prm = A.slot_params(params[i], s)
    partners = {name: pipe.premix(images[j], A.slot_params(params[j], s)) for name, j in pipe.partners(prm).items()}
    got = pipe.apply(images[i], prm, partners=partners)
    ra, mixup, cutmix = pipe.policies
    x = ra.apply(images[i], prm)
    for pol in (mixup, cutmix):
        j = pol.partner_of(prm)
        if j is not None:  # the partner's pixels are its own slot s (same slot)
            x = pol.apply(x, prm, partner=ra.apply(images[j], A.slot_params(params[j], s)))
    np.testing.assert_array_equal(got, x)
    assert set(pipe.mix_info(prm, SIZE)) == {"mixup", "cutmix"}


# ------------------------------------------------------------------ pipeline and parse_augment
def test_parse_augment_string_json_and_config_round_trip():
    text = ("randaugment:num_ops=2,magnitude=9;random_erasing:scale=[0.05,0.2],value=random;mixup:alpha=0.2,p=0.5;"
            "cutmix:alpha=1.0")
    pipe = A.parse_augment(text)
    assert [p.name for p in pipe.policies] == ["randaugment", "random_erasing", "mixup", "cutmix"]
    assert pipe.policies[1].scale == (0.05, 0.2) and pipe.policies[1].value == "random"
    assert A.parse_augment(json.dumps(pipe.get_config())) == pipe
    assert A.Pipeline.from_config(pipe.get_config()) == pipe
    assert A.parse_augment(pipe) is pipe and len(A.parse_augment("")) == 0 and len(A.parse_augment(None)) == 0
    assert A.parse_augment('{"name": "mixup", "alpha": 0.3}') == A.Pipeline([A.Mixup(alpha=0.3)])


def test_pipeline_columns_unique_and_compact():
    pipe = A.parse_augment("randaugment:num_ops=2;mixup")
    cols = pipe.columns()
    assert len({c.name for c in cols}) == len(cols)
    assert sum(c.nbytes for c in cols) == 9  # ra 2+2, mixup partner 4 + lam 1 (partner slot = own slot)
    assert sum(c.nbytes for c in A.parse_augment("randaugment:num_ops=2;cutmix").columns()) == 13  # + centre 2x2


# ------------------------------------------------------------------ errors with exact messages
@pytest.mark.parametrize(
    "spec, exc, message",
    [
        ("randaugment:magnitude=31", ValidationError, "magnitude must be an integer in [0, 30]. Got 31."),
        ("randaugment:magnitude=2.5", TypeError, "magnitude must be an integer in [0, 30]. Got 2.5 (float)."),
        ("randaugment:interpolation=cubic", ValidationError,
         "interpolation must be one of ['nearest', 'bilinear']. Got 'cubic'."),
        ("mixup:p=1.5", ValidationError, "p must be in [0, 1]. Got 1.5."),
        ("mixup:alpha=0", ValidationError, "alpha must be in (0, 1000]. Got 0.0."),
        ("color_jitter:hue=0.7", ValidationError, "hue must be in [0, 0.5]. Got 0.7."),
        ("random_erasing:value=noise", ValidationError,
         "value must be 'random', 'mean' or a uint8 colour. Got 'noise'."),
        ("random_erasing:scale=[0.5,0.1]", ValidationError, "scale must be ordered (min <= max). Got [0.5, 0.1]."),
        ("autoaugment:x=1", ValidationError,
         "augment policy name must be one of ['color_jitter', 'cutmix', 'cutmix_box', 'external_seed', "
         "'gaussian_blur', 'mix', 'mixup', 'mixup_exact', 'partner_crop', 'randaugment', 'random_erasing', "
         "'random_grayscale']. Got 'autoaugment'."),
        ("mixup;randaugment", ValidationError,
         "mixing policies must come after all other policies. Got 'randaugment' after 'mixup'."),
        ("mixup;mixup", ValidationError,
         "augment column names must be unique in a pipeline. Got 'mixup_partner' twice."),
        ("mixup:alpha", ValidationError, "augment spec arguments must be key=value. Got 'alpha' in 'mixup:alpha'."),
        ("[{", ValidationError, "augment spec must be valid JSON"),
        ("randaugment:num_ops=2,mixup:alpha=0.2", ValidationError,
         "augment spec keys must be field names. Got 'mixup:alpha' in 'randaugment:num_ops=2,mixup:alpha=0.2': "
         "separate policies with ';', not ',' (e.g. 'randaugment:num_ops=2;mixup:alpha=0.2')."),
    ],
)
def test_bad_specs_raise_clear_errors(spec, exc, message):
    with pytest.raises(exc) as info:
        A.parse_augment(spec)
    assert str(info.value).startswith(message)


def test_apply_refuses_unknown_op_id():
    ra = A.RandAugment(num_ops=1)
    with pytest.raises(ValidationError, match=r"RandAugment op id must be in \[0, 13\]\. Got 14\."):
        ra.apply(image(), {"ra_ops": np.array([14], np.uint8), "ra_mag": np.array([0], np.int8)})


def test_validate_stored_columns():
    pipe = A.parse_augment("randaugment;mixup;cutmix")
    cols = {k: np.stack([v, v]) for k, v in pipe.sample(1, 0, range(M), image_size=SIZE, num_images=N,
                                                           crops_per_image=M).items()}
    pipe.validate(cols, num_images=N, crops_per_image=M, image_size=SIZE)
    bad = dict(cols, mixup_partner=np.where(cols["mixup_partner"] >= 0, N, -1).astype(np.int32))
    with pytest.raises(ValidationError, match=rf"'mixup_partner' values must be in \[-1, {N - 1}\]\. Got {N}\."):
        pipe.validate(bad, num_images=N, crops_per_image=M)
    bad = dict(cols, cutmix_center=np.full_like(cols["cutmix_center"], SIZE[0]))
    with pytest.raises(ValidationError,
                       match=rf"'cutmix_center r_y' values must be in \[0, {SIZE[0] - 1}\]\. Got {SIZE[0]}\."):
        pipe.validate(bad, num_images=N, crops_per_image=M, image_size=SIZE)
    bad = dict(cols, ra_ops=np.full_like(cols["ra_ops"], 20))
    with pytest.raises(ValidationError, match=r"'ra_ops' values must be in \[0, 13\]\. Got 20\."):
        pipe.validate(bad, num_images=N, crops_per_image=M)
    with pytest.raises(ValidationError, match=r"'mixup_lam' must have dtype uint8\. Got float32\."):
        pipe.validate(dict(cols, mixup_lam=cols["mixup_lam"].astype(np.float32)), num_images=N, crops_per_image=M)
    with pytest.raises(ValidationError, match=r"column 'cutmix_center' of policy 'cutmix' is missing\."):
        pipe.validate({k: v for k, v in cols.items() if k != "cutmix_center"}, num_images=N, crops_per_image=M)
    with pytest.raises(ValidationError, match=r"Got unknown \['extra'\]\."):
        pipe.validate(dict(cols, extra=cols["ra_ops"]), num_images=N, crops_per_image=M)


def test_sample_argument_errors():
    mix = A.Mixup()
    with pytest.raises(ValidationError, match=r"image_index must be an integer in \[0, 6\]\. Got 7\."):
        mix.sample(0, 7, [0], image_size=SIZE, num_images=N, crops_per_image=M)
    with pytest.raises(ValidationError, match=r"slots must be in \[0, 8\]\. Got 9\."):
        mix.sample(0, 0, [9], image_size=SIZE, num_images=N, crops_per_image=M)
    with pytest.raises(TypeError, match=r"pixels must have dtype uint8\. Got float32\."):
        mix.apply(np.zeros((2, 2, 3), np.float32), {})


# ------------------------------------------------------------------ batch mixing of stored labels
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_mix_batch_deterministic_and_label_consistent(mode, layout):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 3, 8, 10) if layout == "NCHW" else (6, 8, 10, 3), dtype=np.uint8)
    labels = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    a = A.mix_batch(imgs, labels, mode=mode, alpha=1.0, seed=4, step=7, layout=layout)
    b = A.mix_batch(imgs.copy(), labels.copy(), mode=mode, alpha=1.0, seed=4, step=7, layout=layout)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.soft_labels, b.soft_labels)
    c = A.mix_batch(imgs, labels, mode=mode, alpha=1.0, seed=4, step=8, layout=layout)
    assert not (np.array_equal(a.index, c.index) and a.lam == c.lam)
    np.testing.assert_allclose(a.soft_labels, a.lam * labels + (1 - a.lam) * labels[a.index], rtol=1e-6)
    np.testing.assert_allclose(a.soft_labels.sum(1), 1.0, rtol=1e-5)
    if mode == "cutmix":
        y1, x1, y2, x2 = a.box
        assert a.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 80)
        hw = (slice(None), slice(None), slice(y1, y2), slice(x1, x2)) if layout == "NCHW" else \
            (slice(None), slice(y1, y2), slice(x1, x2))
        np.testing.assert_array_equal(a.images[hw], imgs[a.index][hw])
    else:
        np.testing.assert_array_equal(a.images, ops.blend(imgs, imgs[a.index], a.lam))
    with pytest.raises(ValidationError, match=r"mode must be one of \['mixup', 'cutmix', 'switch'\]\. Got 'mix'\."):
        A.mix_batch(imgs, labels, mode="mix")


# ------------------------------------------------------------------ the crop stage: the slot sampler + crop_resize
def test_crop_stage_keeps_existing_crops():
    """The crop stage's params are the slot sampler's (any subset of slots equals those slots of the whole
    image) and A.crop is crop_resize as a numpy image."""
    from fkdstore.seeded import SlotCropSampler
    from fkdstore.transforms import crop_resize

    sampler = SlotCropSampler(seed=11)
    got_box, got_flip = sampler.sample_slots([3, 3], [4, 1], [60, 60], [80, 80])
    boxes, flips = sampler.sample(3, 60, 80, 6)
    np.testing.assert_array_equal(got_box, boxes[[4, 1]])
    np.testing.assert_array_equal(got_flip, flips[[4, 1]])
    pil = Image.fromarray(image(30, (60, 80)))
    hwc = A.crop(pil, tuple(boxes[0]), bool(flips[0]), 16)
    np.testing.assert_array_equal(hwc, crop_resize(pil, tuple(boxes[0]), bool(flips[0]), 16).numpy().transpose(1, 2, 0))


def test_partner_window_is_strided_and_spans_the_dataset():
    assert A.window_stride(1_281_167, 4096) == 512 and A.window_stride(100, 4096) == 1 and A.window_stride(100, 0) == 1
    N, window = 1000, 64  # stride 16: image i's partners are the other images j = i mod 16
    stride = A.window_stride(N, window)
    assert stride == 16 and -(-N // stride) <= window
    seen = set()
    for i in (0, 7, 999):
        p = A.Mixup(p=1.0, window=window).sample(1, i, range(50), image_size=SIZE, num_images=N, crops_per_image=50)
        j = p["mixup_partner"].astype(np.int64)
        assert ((j % stride) == (i % stride)).all() and (j != i).all() and (j < N).all()
        seen |= set(j.tolist())
    assert max(seen) - min(seen) > N // 2  # spread over the whole dataset, not a block of neighbours
    whole = A.Mixup(p=1.0, window=0).sample(1, 3, range(20), image_size=SIZE, num_images=N, crops_per_image=20)
    assert (whole["mixup_partner"] != 3).all()


def test_randaugment_op_table_is_the_spec_list():
    """The op table is format data (spec 6.3): ids, names, signed ops and ops without magnitude as the spec says,
    and the op id draw spans exactly the table; changing it would redraw every seed."""
    spec = (pathlib.Path(__file__).parents[1] / "spec" / "format-v4.md").read_text()
    text = " ".join(spec.split("Op ids (torchvision's RandAugment list): ", 1)[1].split(". Draws", 1)[0].split())
    listed = [item.split(" ", 1) for item in text.split(", ")]
    assert [(int(i), n) for i, n in listed] == list(enumerate(OPS)) == [(i, op.name) for i, op in
                                                                         enumerate(AUGMENTATION_SPACE)]
    assert f"`op = integers(0, {len(OPS)})`" in spec
    assert SIGNED == set(OPS[1:10]) and NO_MAGNITUDE == {OPS[0], OPS[12], OPS[13]}
    drawn = A.RandAugment(num_ops=16).sample(0, 0, range(64), image_size=SIZE, num_images=1, crops_per_image=64)
    assert set(drawn["ra_ops"].ravel().tolist()) == set(range(len(OPS)))
