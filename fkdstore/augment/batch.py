"""Training-time Mixup / CutMix of a batch of crops AND their stored soft labels (FKD's way), numpy core.

For stores whose slots are not mixed: the teacher labelled the plain crops and training mixes crops and
labels together. Deterministic from ``(seed, step)`` only.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

from fkdstore.augment.base import parse_float, parse_int
from fkdstore.augment.mixing import cutmix_box, cutmix_lambda
from fkdstore.augment.ops import blend
from fkdstore.errors import ValidationError

__all__ = ["mix_batch", "mix_params", "BatchMix", "MODES"]

MODES = ("mixup", "cutmix")
_TAG = zlib.crc32(b"mix_batch")


class BatchMix(NamedTuple):
    images: np.ndarray
    soft_labels: np.ndarray
    lam: float  # weight of each crop's own image / label
    index: np.ndarray  # partner of crop b is crop index[b]
    box: tuple[int, int, int, int] | None  # CutMix box (y1, x1, y2, x2); None for Mixup


def mix_params(batch_size: int, image_size: tuple[int, int], *, mode: str = "mixup", alpha: float = 1.0,
               seed: int = 0, step: int = 0) -> tuple[float, np.ndarray, tuple[int, int, int, int] | None]:
    """The draws of :func:`mix_batch` for a batch of ``batch_size`` crops of ``(H, W)``: ``(lam, index, box)``
    (``box`` None for Mixup; for CutMix ``lam`` is already recomputed from the box). The one home of the rule,
    shared by the numpy and the torch (:func:`fkdstore.pytorch.mix_batch`) mixers."""
    if mode not in MODES:
        raise ValidationError(f"mode must be one of {list(MODES)}. Got {mode!r}.")
    alpha = parse_float("alpha", alpha, 0.0, 1e3, lo_open=True)
    seed = parse_int("seed", seed, 0)
    step = parse_int("step", step, 0)
    B = parse_int("batch_size", batch_size, 1)
    H, W = image_size
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG, step]))
    lam = float(rng.beta(alpha, alpha))
    index = rng.permutation(B)
    box = None
    if mode == "cutmix":
        r_x = int(rng.integers(0, W))
        r_y = int(rng.integers(0, H))
        box = cutmix_box(lam, (r_y, r_x), (H, W))
        lam = cutmix_lambda(box, (H, W))
    return lam, index, box


def mix_batch(images: np.ndarray, soft_labels: np.ndarray, *, mode: str = "mixup", alpha: float = 1.0, seed: int = 0,
              step: int = 0, layout: str = "NCHW") -> BatchMix:
    """Mix a batch with a permutation of itself: ``x' = mix(x, x[index])``, ``y' = lam y + (1 - lam) y[index]``.

    ``rng = default_rng(SeedSequence([seed, crc32("mix_batch"), step]))`` draws, in order:
    ``lam = beta(alpha, alpha)``, ``index = permutation(B)``, then for CutMix ``r_x = integers(0, W)``,
    ``r_y = integers(0, H)``; the CutMix box is :func:`~fkdstore.augment.mixing.cutmix_box` and ``lam`` is
    recomputed from it (torchvision v2). ``images`` is ``(B, C, H, W)`` (``layout="NCHW"``) or
    ``(B, H, W, C)`` (``"NHWC"``), uint8 (Mixup rounds as :func:`~fkdstore.augment.ops.blend`) or float;
    ``soft_labels`` is ``(B, C)`` float (dense probabilities). Inputs are not modified.
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

    lam, index, box = mix_params(B, (H, W), mode=mode, alpha=alpha, seed=seed, step=step)
    partner = images[index]
    if mode == "mixup":
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


