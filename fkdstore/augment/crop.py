"""RandomResizedCrop + flip: the format's crop stage, wrapping :mod:`fkdstore.transforms` unchanged.

Its params are the store's ``box`` / ``flip`` arrays (not aug columns) and its draws are the
:class:`~fkdstore.transforms.CropSampler` rule (``SeedSequence([seed, image_index])``), so stores written
before augmentation policies existed keep identical crops. ``fkdstore.transforms`` is imported on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fkdstore.augment.base import parse_int, parse_slots

__all__ = ["RandomResizedCrop", "crop"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomResizedCrop:
    """The crop stage: ``scale``, ``ratio``, ``flip_p`` as :class:`~fkdstore.transforms.CropSampler`."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        s = self.sampler(0)  # the sampler's own validation is the one home of these rules
        object.__setattr__(self, "scale", s.scale)
        object.__setattr__(self, "ratio", s.ratio)
        object.__setattr__(self, "flip_p", s.flip_p)

    def sampler(self, seed: int):
        """The :class:`~fkdstore.transforms.CropSampler` for ``seed``."""
        from fkdstore.transforms import CropSampler

        return CropSampler(scale=tuple(self.scale), ratio=tuple(self.ratio), flip_p=self.flip_p, seed=seed)

    def sample(self, seed: int, image_index: int, slots: Sequence[int] | np.ndarray, *,
               image_size: Sequence[int], crops_per_image: int, **_: Any) -> dict[str, np.ndarray]:
        """``{"box": int32 (n, 4), "flip": bool (n,)}`` of ``slots``; ``image_size`` is the SOURCE (H, W).

        The sampler draws all ``crops_per_image`` slots of the image at once (its rule), then picks ``slots``.
        """
        m = parse_int("crops_per_image", crops_per_image, 1)
        slot_arr = parse_slots(slots, m)
        boxes, flips = self.sampler(seed).sample(image_index, image_size[0], image_size[1], m)
        return {"box": boxes[slot_arr], "flip": flips[slot_arr]}


def crop(image, box: Sequence[int], flip: bool, size: int | tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """:func:`fkdstore.transforms.crop_resize` as a uint8 ``(H, W, 3)`` numpy image (the policies' input).

    The same Pillow crop-then-resize (:func:`fkdstore.transforms._resized`) and mirror, without torch.
    """
    from fkdstore.transforms import _check_box, _resample, _resized, _size_hw

    out_hw = _size_hw(size)
    resample = _resample(interpolation)
    W, H = image.size
    box = _check_box(box, H, W)
    if image.mode != "RGB":
        image = image.convert("RGB")
    hwc = np.asarray(_resized(image, box, out_hw, resample))
    if flip:
        hwc = hwc[:, ::-1]
    return np.ascontiguousarray(hwc)
