"""Training-time Mixup / CutMix of a batch of crops AND their stored soft labels (FKD's way), numpy core.

For stores whose slots are not mixed: the teacher labelled the plain crops and training mixes crops and
labels together. Deterministic from ``(seed, step)`` only.

Modes: ``"mixup"``, ``"cutmix"``, or ``"switch"``: Mixup *or* CutMix, one of the two per batch, CutMix with
probability ``switch_prob`` (timm's ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)`` and
torchvision's ``RandomChoice([MixUp(), CutMix()])`` at ``switch_prob=0.5``). ``p`` is the probability that
a batch is mixed at all (timm's ``prob``). Crop ``b`` is mixed with crop ``index[b] != b``: ``index`` is a
random cyclic derangement (every crop has another crop as partner; timm's ``flip`` pairing has the same
property for even batch sizes only).
"""

from __future__ import annotations

import zlib
from typing import Generic, NamedTuple, TypeVar

import numpy as np

from fkdstore.augment.base import parse_float
from fkdstore.augment.mixing import cutmix_box, cutmix_lambda
from fkdstore.augment.ops import blend
from fkdstore.errors import ValidationError
from fkdstore.validation import int_in_range

__all__ = ["mix_batch", "mix_params", "derangement", "parse_batch_alpha", "BatchMix", "MODES"]

MODES = ("mixup", "cutmix", "switch")
SWITCH_ALPHA = (0.8, 1.0)  # timm's defaults: (mixup_alpha, cutmix_alpha)
_TAG = zlib.crc32(b"mix_batch")


ArrayT = TypeVar("ArrayT")


class BatchMix(NamedTuple, Generic[ArrayT]):
    """Result of :func:`mix_batch` (numpy arrays) and :func:`fkdstore.pytorch.mix_batch` (torch tensors):
    mixed ``images`` and ``soft_labels``, the weight ``lam`` of each crop's own image/label (1.0: the batch
    was not mixed), ``index`` (crop ``b``'s partner is crop ``index[b]``, never ``b`` itself when B > 1; use
    it for the hard-label term ``lam * CE(target) + (1 - lam) * CE(target[index])``) and the CutMix ``box``
    ``(y1, x1, y2, x2)`` (None for Mixup or an unmixed batch)."""

    images: ArrayT
    soft_labels: ArrayT
    lam: float
    index: ArrayT  # type: ignore[assignment]  # the public field name shadows tuple.index
    box: tuple[int, int, int, int] | None


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` without fixed points (``n >= 2``): ``perm = rng.permutation(n)``, then
    ``index[perm[k]] = perm[(k + 1) % n]`` (one cycle through a random order). ``n == 1``: ``[0]``."""
    perm = rng.permutation(n)
    index = np.empty(n, dtype=np.int64)
    index[perm] = np.roll(perm, -1)
    return index


def parse_batch_alpha(mode: str, alpha) -> tuple[float, float]:
    """``(mixup_alpha, cutmix_alpha)`` for ``mode``: a number for ``"mixup"`` / ``"cutmix"`` (default 1.0), a
    pair ``(mixup_alpha, cutmix_alpha)`` for ``"switch"`` (default ``(0.8, 1.0)``, timm's); each in (0, 1000]."""
    if mode not in MODES:
        raise ValidationError(f"mode must be one of {list(MODES)}. Got {mode!r}.")
    if mode == "switch":
        if alpha is None:
            alpha = SWITCH_ALPHA
        if isinstance(alpha, (str, bytes)) or not hasattr(alpha, "__len__") or len(alpha) != 2:
            raise TypeError(f"alpha must be a pair (mixup_alpha, cutmix_alpha) with mode='switch'. Got {alpha!r}.")
        return (parse_float("mixup_alpha", alpha[0], 0.0, 1e3, lo_open=True),
                parse_float("cutmix_alpha", alpha[1], 0.0, 1e3, lo_open=True))
    a = parse_float("alpha", 1.0 if alpha is None else alpha, 0.0, 1e3, lo_open=True)
    return (a, a)


def mix_params(batch_size: int, image_size: tuple[int, int], *, mode: str = "mixup", alpha=None,
               seed: int = 0, step: int = 0, switch_prob: float = 0.5, p: float = 1.0
               ) -> tuple[float, np.ndarray, tuple[int, int, int, int] | None]:
    """The draws of :func:`mix_batch` for a batch of ``batch_size`` crops of ``(H, W)``: ``(lam, index, box)``
    (``box`` None for Mixup or an unmixed batch; for CutMix ``lam`` is already recomputed from the box). The
    one home of the rule, shared by the numpy and the torch (:func:`fkdstore.pytorch.mix_batch`) mixers.

    ``rng = default_rng(SeedSequence([seed, crc32("mix_batch"), step]))`` draws, in order: ``applied =
    random() < p``; ``cut = random() < switch_prob`` (mode ``"switch"`` only; ``"cutmix"`` is always cut);
    ``lam = beta(a, a)`` with ``a`` the chosen method's alpha; ``index`` = :func:`derangement` ``(B)``; for
    CutMix ``r_x = integers(0, W)``, ``r_y = integers(0, H)``, the box :func:`~fkdstore.augment.mixing.cutmix_box`
    and ``lam`` recomputed from it (torchvision v2). Not applied, or ``B == 1`` (no other crop to pair
    with): ``lam = 1.0``, no box.
    """
    mixup_alpha, cutmix_alpha = parse_batch_alpha(mode, alpha)
    switch_prob = parse_float("switch_prob", switch_prob, 0.0, 1.0)
    p = parse_float("p", p, 0.0, 1.0)
    seed = int_in_range("seed", seed, 0)
    step = int_in_range("step", step, 0)
    B = int_in_range("batch_size", batch_size, 1)
    H, W = image_size
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG, step]))
    applied = bool(rng.random() < p)
    cut = mode == "cutmix" or (mode == "switch" and bool(rng.random() < switch_prob))
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if cut else rng.beta(mixup_alpha, mixup_alpha))
    index = derangement(rng, B)
    box = None
    if cut:
        r_x = int(rng.integers(0, W))
        r_y = int(rng.integers(0, H))
        box = cutmix_box(lam, (r_y, r_x), (H, W))
        lam = cutmix_lambda(box, (H, W))
    if not applied or B == 1:
        return 1.0, index, None
    return lam, index, box


def mix_batch(images: np.ndarray, soft_labels: np.ndarray, *, mode: str = "mixup", alpha=None, seed: int = 0,
              step: int = 0, switch_prob: float = 0.5, p: float = 1.0,
              layout: str = "NCHW") -> BatchMix[np.ndarray]:
    """Mix a batch with a derangement of itself: ``x' = mix(x, x[index])``, ``y' = lam y + (1 - lam) y[index]``.

    Draws: :func:`mix_params`. ``mode``: ``"mixup"``, ``"cutmix"`` (``alpha`` a number, default 1.0) or
    ``"switch"`` (``alpha = (mixup_alpha, cutmix_alpha)``, default ``(0.8, 1.0)``; CutMix with probability
    ``switch_prob``); ``p``: probability that the batch is mixed at all. ``images`` is ``(B, C, H, W)``
    (``layout="NCHW"``) or ``(B, H, W, C)`` (``"NHWC"``), uint8 (Mixup rounds as
    :func:`~fkdstore.augment.ops.blend`) or float; ``soft_labels`` is ``(B, K)`` float (dense probabilities).
    Inputs are not modified (an unmixed batch returns copies).
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValidationError(f"layout must be one of ['NCHW', 'NHWC']. Got {layout!r}.")
    if not isinstance(images, np.ndarray) or not isinstance(soft_labels, np.ndarray):
        raise TypeError("images and soft_labels must be numpy arrays.")
    if images.ndim != 4:
        raise ValidationError(f"images must have 4 dims ({layout}). Got shape {images.shape}.")
    if soft_labels.ndim != 2 or soft_labels.shape[0] != images.shape[0]:
        raise ValidationError(f"soft_labels must have shape (B={images.shape[0]}, C). Got {soft_labels.shape}.")
    if not np.issubdtype(soft_labels.dtype, np.floating):
        raise TypeError(f"soft_labels must be floating point. Got {soft_labels.dtype}.")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be uint8 or floating point. Got {images.dtype}.")
    B = images.shape[0]
    H, W = (images.shape[2], images.shape[3]) if layout == "NCHW" else (images.shape[1], images.shape[2])

    lam, index, box = mix_params(B, (H, W), mode=mode, alpha=alpha, seed=seed, step=step,
                                 switch_prob=switch_prob, p=p)
    if lam == 1.0 and box is None:
        return BatchMix(images.copy(), soft_labels.copy(), 1.0, index, None)
    partner = images[index]
    if box is None:
        if images.dtype == np.uint8:
            out = blend(images, partner, lam)
        else:
            out = (lam * images + (1.0 - lam) * partner).astype(images.dtype)
    else:
        y1, x1, y2, x2 = box
        out = images.copy()
        if layout == "NCHW":
            out[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]
        else:
            out[:, y1:y2, x1:x2, :] = partner[:, y1:y2, x1:x2, :]
    labels = (lam * soft_labels + (1.0 - lam) * soft_labels[index]).astype(soft_labels.dtype)
    return BatchMix(out, labels, lam, index, box)
