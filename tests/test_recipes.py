"""Training recipes as timm and torchvision define them: Mixup OR CutMix with a switch probability, in a stored
pipeline (the ``mix`` policy) and at training time (``mix_batch(mode="switch")``); batch partners never the
crop itself; an erasing fill equal to torchvision's default after Normalize."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fkdstore import augment as A
from fkdstore.augment import ops
from fkdstore.augment.batch import derangement, mix_params
from fkdstore.errors import ValidationError
from fkdstore.pytorch import mix_batch
from fkdstore.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

SIZE = (24, 32)


def within(count: int, n: int, prob: float, sigmas: float = 5.0) -> bool:
    """``count`` successes of ``n`` Bernoulli(prob) trials lie within ``sigmas`` standard deviations."""
    return abs(count - n * prob) <= sigmas * math.sqrt(n * prob * (1 - prob)) + 1e-9


# ------------------------------------------------------------------ training time: mix_batch(mode="switch")
@pytest.mark.parametrize("switch_prob, p", [(0.5, 1.0), (0.2, 1.0), (0.7, 0.6), (0.0, 1.0), (1.0, 0.3)])
def test_batch_switch_frequencies_match_the_configured_probabilities(switch_prob, p):
    n = 3000
    mixed = cut = 0
    for step in range(n):
        lam, index, box = mix_params(8, SIZE, mode="switch", seed=11, step=step, switch_prob=switch_prob, p=p)
        if lam < 1.0 or box is not None:
            mixed += 1
            cut += box is not None
    assert within(mixed, n, p), (mixed, n * p)
    assert within(cut, mixed, switch_prob), (cut, mixed * switch_prob)
    if 0 < switch_prob < 1:
        assert 0 < cut < mixed


def test_batch_switch_draws_each_method_with_its_own_alpha():
    """Mixup batches draw lam ~ Beta(0.8, 0.8) (mean 0.5, variance 1/(4 * 2.6)); CutMix's lam comes from the box."""
    lams = [mix_params(4, (224, 224), mode="switch", alpha=(0.8, 1.0), seed=2, step=s)
            for s in range(4000)]
    mixup = np.array([lam for lam, _, box in lams if box is None])
    assert abs(mixup.mean() - 0.5) < 0.02 and abs(mixup.var() - 1 / (4 * 2.6)) < 0.01
    cutmix = [(lam, box) for lam, _, box in lams if box is not None]
    for lam, (y1, x1, y2, x2) in cutmix[:50]:
        assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 224**2)
    with pytest.raises(TypeError, match=r"alpha must be a pair \(mixup_alpha, cutmix_alpha\) with mode='switch'"):
        mix_params(4, SIZE, mode="switch", alpha=1.0)
    with pytest.raises(ValidationError, match=r"cutmix_alpha must be in \(0, 1000\]\. Got 0\.0\."):
        mix_params(4, SIZE, mode="switch", alpha=(0.8, 0.0))
    with pytest.raises(ValidationError, match=r"switch_prob must be in \[0, 1\]\. Got 1\.5\."):
        mix_params(4, SIZE, mode="switch", switch_prob=1.5)


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "switch"])
def test_batch_partners_are_never_the_crop_itself(mode):
    for B in (2, 3, 5, 128, 129):
        for step in range(200 if B < 100 else 20):
            _, index, _ = mix_params(B, SIZE, mode=mode, seed=5, step=step)
            assert sorted(index.tolist()) == list(range(B))
            assert (index != np.arange(B)).all(), (B, step, index)
    rng = np.random.default_rng(0)
    counts = np.zeros((4, 4))
    for _ in range(3000):
        d = derangement(rng, 4)
        counts[np.arange(4), d] += 1
    assert (np.diag(counts) == 0).all() and (counts[~np.eye(4, dtype=bool)] > 800).all()  # every other crop


def test_batch_of_one_crop_and_unmixed_batches_are_returned_as_they_are():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    y = torch.softmax(torch.randn(2, 6), -1)
    one = mix_batch(x[:1], y[:1], "switch", seed=0, step=0)
    assert one.lam == 1.0 and one.box is None and torch.equal(one.images, x[:1])
    off = mix_batch(x, y, "switch", seed=0, step=0, p=0.0)
    assert off.lam == 1.0 and off.images is x and off.soft_labels is y and (off.index != torch.arange(2)).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_torch_switch_equals_numpy_and_mixes_labels_with_the_pixels(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(6, 3, 8, 10, generator=g) * 255).to(dtype)
    y = torch.softmax(torch.randn(6, 5, generator=g), -1)
    seen = set()
    for step in range(12):
        a = mix_batch(x, y, "switch", alpha=(0.8, 1.0), seed=3, step=step, switch_prob=0.5)
        ref = A.mix_batch(x.numpy(), y.numpy(), mode="switch", alpha=(0.8, 1.0), seed=3, step=step)
        np.testing.assert_array_equal(a.images.numpy(), ref.images)
        np.testing.assert_allclose(a.soft_labels.numpy(), ref.soft_labels, rtol=0, atol=1e-7)
        assert a.lam == ref.lam and a.box == ref.box and np.array_equal(a.index.numpy(), ref.index)
        torch.testing.assert_close(a.soft_labels, a.lam * y + (1 - a.lam) * y[a.index])
        if a.box is None:
            np.testing.assert_array_equal(a.images.numpy(), ops.blend(x.numpy(), x.numpy()[ref.index], a.lam)
                                          if dtype == torch.uint8 else a.images.numpy())
        else:
            y1, x1, y2, x2 = a.box
            assert torch.equal(a.images[:, :, y1:y2, x1:x2], x[a.index][:, :, y1:y2, x1:x2])
        seen.add(a.box is None)
    assert seen == {True, False}  # both methods occurred


# ------------------------------------------------------------------ stored pipelines: the ``mix`` policy
def sample_mix(policy, n_images=50, slots=40):
    out = [policy.sample(7, i, range(slots), image_size=SIZE, num_images=n_images, crops_per_image=slots)
           for i in range(n_images)]
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


@pytest.mark.parametrize("switch_prob, p", [(0.5, 1.0), (0.25, 0.8), (0.9, 0.5)])
def test_stored_switch_frequencies_match_the_configured_probabilities(switch_prob, p):
    cols = sample_mix(A.Mix(switch_prob=switch_prob, p=p))
    n = len(cols["mix_partner"])
    mixed = cols["mix_partner"] >= 0
    cut = cols["mix_cut"] == 1
    assert within(int(mixed.sum()), n, p) and within(int(cut[mixed].sum()), int(mixed.sum()), switch_prob)
    assert not cut[~mixed].any() and (cols["mix_lam"][~mixed] == 255).all()
    assert (cols["mix_center"][mixed & ~cut] == 0).all()  # Mixup slots store no centre
    assert (cols["mix_center"][cut] != 0).any(axis=1).mean() > 0.9
    A.Mix(switch_prob=switch_prob, p=p).validate(cols, num_images=50, crops_per_image=40, image_size=SIZE)


def test_stored_mix_replays_as_mixup_or_cutmix_and_never_both():
    pol = A.Mix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, p=1.0)
    rng = np.random.default_rng(3)
    x, y = (rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(2))
    params = pol.sample(1, 0, range(30), image_size=SIZE, num_images=10, crops_per_image=30)
    kinds = set()
    for s in range(30):
        prm = {k: v[s] for k, v in params.items()}
        out = pol.apply(x, prm, partner=y)
        info = pol.mix_info(prm, SIZE)
        q = int(prm["mix_lam"])
        if prm["mix_cut"] == 1:
            same = A.CutMix().apply(x, {"cutmix_partner": prm["mix_partner"], "cutmix_center": prm["mix_center"],
                                        "cutmix_lam": prm["mix_lam"]}, partner=y)
            np.testing.assert_array_equal(out, same)
            changed = (out != x).any(-1)
            y1, x1, y2, x2 = pol.box(prm, SIZE)
            assert not changed[:y1].any() and not changed[y2:].any()  # pixels outside the box untouched
            assert info.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (SIZE[0] * SIZE[1]))
            kinds.add("cutmix")
        else:
            np.testing.assert_array_equal(out, ops.blend(x, y, q / 255))
            assert info.lam == q / 255
            kinds.add("mixup")
    assert kinds == {"mixup", "cutmix"}
    assert A.parse_augment("mix").get_config() == [
        {"name": "mix", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "p": 1.0, "window": 4096}]


def test_stored_mix_columns_are_validated():
    pol = A.Mix()
    cols = pol.sample(0, 1, range(8), image_size=SIZE, num_images=4, crops_per_image=8)
    kw = dict(num_images=4, crops_per_image=8, image_size=SIZE)
    bad = dict(cols, mix_cut=np.full_like(cols["mix_cut"], 2))
    with pytest.raises(ValidationError, match=r"augment column 'mix_cut' values must be in \[0, 1\]\. Got 2\."):
        pol.validate(bad, **kw)
    mixup = np.flatnonzero((cols["mix_partner"] >= 0) & (cols["mix_cut"] == 0))
    if len(mixup):
        center = cols["mix_center"].copy()
        center[mixup[0]] = [3, 3]
        with pytest.raises(ValidationError, match="'mix_center' must be 0 for a Mixup slot"):
            pol.validate(dict(cols, mix_center=center), **kw)
    with pytest.raises(ValidationError, match=r"switch_prob must be in \[0, 1\]\. Got 2\.0\."):
        A.Mix(switch_prob=2.0)
    with pytest.raises(ValidationError, match=r"mixup_alpha must be in \(0, 1000\]\. Got 0\.0\."):
        A.parse_augment("mix:mixup_alpha=0")


# ------------------------------------------------------------------ erasing fill = torchvision's default
def test_erasing_mean_fill_is_torchvisions_default_after_normalize():
    pol = A.parse_augment("random_erasing:p=1.0,value=mean").policies[0]
    assert pol.value == A.mean_fill() == tuple(round(255 * m) for m in IMAGENET_MEAN) == (124, 116, 104)
    x = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    params = pol.sample(0, 0, [0], image_size=SIZE, num_images=1, crops_per_image=1)
    top, left, h, w = params["re_box"][0].tolist()
    assert h and w
    out = pol.apply(x, {"re_box": params["re_box"][0]})
    z = normalize(torch.from_numpy(out).permute(2, 0, 1)).numpy()
    box = z[:, top:top + h, left:left + w]
    bound = 0.5 / 255 / np.array(IMAGENET_STD)[:, None, None]
    assert (np.abs(box) <= bound).all()  # torchvision's RandomErasing(value=0) after Normalize: exactly 0
    assert A.mean_fill((0.5, 0.5, 0.5)) == (128, 128, 128)
    with pytest.raises(ValidationError, match=r"value must be 'random', 'mean' or a uint8 colour\. Got 'grey'\."):
        A.RandomErasing(value="grey")


def test_erasing_mean_fill_against_torchvision():
    tv = pytest.importorskip("torchvision.transforms", reason="torchvision is not importable here")
    x = torch.randint(0, 256, (3, *SIZE), dtype=torch.uint8)
    erased = tv.RandomErasing(p=1.0, value=0)(normalize(x))
    mask = (erased == 0).all(0)
    ours = normalize(torch.tensor(A.mean_fill(), dtype=torch.uint8).view(3, 1, 1).expand(3, *SIZE))
    torch.testing.assert_close(ours[:, mask], erased[:, mask], rtol=0, atol=0.5 / 255 / min(IMAGENET_STD))
