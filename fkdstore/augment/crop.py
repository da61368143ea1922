"""The crop stage of a replay as a numpy image: the policies' input (:func:`crop`). Its params are the
store's ``box`` / ``flip`` (not aug columns), drawn by :class:`fkdstore.seeded.SlotCropSampler`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fkdstore.transforms import _check_box, _resample, _resized, _size_hw

__all__ = ["crop"]


def crop(image, box: Sequence[int], flip: bool, size: int | tuple[int, int],
         interpolation: str = "bilinear") -> np.ndarray:
    """:func:`fkdstore.transforms.crop_resize` as a uint8 ``(H, W, 3)`` numpy image (the policies' input).

    The same Pillow crop-then-resize (:func:`fkdstore.transforms._resized`) and mirror, without torch.
    """
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
