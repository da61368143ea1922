"""RandomErasing (torchvision): a box of the crop replaced by a constant colour or reproducible noise."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import (
    Column,
    Policy,
    check_pixels,
    check_range,
    param,
    parse_float,
    parse_pair,
    parse_rgb,
)
from fkdstore.errors import ValidationError
from fkdstore.transforms import IMAGENET_MEAN

__all__ = ["RandomErasing", "mean_fill"]

MAX_ATTEMPTS = 10


def mean_fill(mean=IMAGENET_MEAN) -> tuple[int, int, int]:
    """The uint8 colour that normalises to (nearly) 0 with ``mean``: ``round(255 * mean)`` per channel.

    torchvision's ``RandomErasing(value=0)`` after ``Normalize(mean, std)`` fills the box with 0 in normalised
    units, i.e. with the mean colour; erasing the uint8 crop with this colour gives that fill after
    normalisation up to the uint8 rounding (``|error| <= 0.5 / 255 / std``)."""
    if isinstance(mean, (str, bytes)) or not hasattr(mean, "__len__") or len(mean) != 3:
        raise TypeError(f"mean must be 3 numbers. Got {mean!r}.")
    r, g, b = (round(255 * parse_float(f"mean[{k}]", m, 0.0, 1.0)) for k, m in enumerate(mean))
    return r, g, b


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomErasing(Policy):
    """torchvision ``RandomErasing(p, scale, ratio, value)`` on the uint8 crop.

    Columns: ``re_box`` uint16 (4,) = (top, left, height, width) in crop pixels, all 0 when the slot is not
    erased; with ``value="random"`` also ``re_seed`` uint32, the seed of :func:`fkdstore.augment.ops.noise_u8`
    that fills the box (uniform uint8 noise, shape (height, width, 3)). ``value`` is otherwise a uint8 colour
    (an int or 3 ints; torchvision erases the *normalised* tensor, so its ``value=0`` is the mean colour there).
    """

    name = "random_erasing"
    p: float = 0.5
    scale: Any = (0.02, 0.33)
    ratio: Any = (0.3, 3.3)
    value: Any = (0, 0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))
        object.__setattr__(self, "scale", parse_pair("scale", self.scale, 0.0, 1.0, lo_open=True))
        object.__setattr__(self, "ratio", parse_pair("ratio", self.ratio, 0.0, 1e6, lo_open=True))
        object.__setattr__(self, "value", _parse_value(self.value))

    @property
    def random_fill(self) -> bool:
        return self.value == "random"

    def columns(self) -> tuple[Column, ...]:
        cols: tuple[Column, ...] = (Column("re_box", "int", "uint16", (4,)),)
        if self.random_fill:
            cols += (Column("re_seed", "int", "uint32", ()),)
        return cols

    def _draw(self, rng: np.random.Generator, *, image_size: tuple[int, int], **_: Any) -> dict[str, Any]:
        # Draw order: apply = random() < p; area fractions uniform(scale) (10,); log-ratios uniform(log ratio)
        # (10,); fill seed integers(0, 2**32); then, only for an erased slot with a valid attempt,
        # top integers(0, H - h + 1) and left integers(0, W - w + 1).
        H, W = image_size
        applied = bool(rng.random() < self.p)
        area = float(H * W) * rng.uniform(self.scale[0], self.scale[1], MAX_ATTEMPTS)
        aspect = np.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), MAX_ATTEMPTS))
        seed = int(rng.integers(0, 2**32))
        box = [0, 0, 0, 0]
        if applied:
            for a, r in zip(area.tolist(), aspect.tolist()):
                h = int(round(math.sqrt(a * r)))
                w = int(round(math.sqrt(a / r)))
                if h < H and w < W:
                    top = int(rng.integers(0, H - h + 1))
                    left = int(rng.integers(0, W - w + 1))
                    box = [top, left, h, w]
                    break
        if box[2] == 0 or box[3] == 0:
            box = [0, 0, 0, 0]
        out: dict[str, Any] = {"re_box": box}
        if self.random_fill:
            out["re_seed"] = seed if box[2] else 0
        return out

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        top, left, h, w = (int(v) for v in param(params, "re_box").reshape(4))
        out = pixels.copy()
        if h == 0 or w == 0:
            return out
        H, W = pixels.shape[:2]
        if top + h > H or left + w > W:
            raise ValidationError(
                f"re_box (top={top}, left={left}, height={h}, width={w}) must lie inside the crop of size "
                f"(height={H}, width={W})."
            )
        if self.random_fill:
            out[top:top + h, left:left + w] = ops.noise_u8(int(param(params, "re_seed")), (h, w, 3))
        else:
            out[top:top + h, left:left + w] = np.asarray(self.value, dtype=np.uint8)
        return out

    def _check_values(self, columns, *, image_size, **_: Any) -> None:
        box = columns["re_box"].astype(np.int64)
        top, left, h, w = box[..., 0], box[..., 1], box[..., 2], box[..., 3]
        empty = (h == 0) | (w == 0)
        if (empty & ((top != 0) | (left != 0) | (h != 0) | (w != 0))).any():
            raise ValidationError("augment column 're_box' must be all 0 for a slot that is not erased.")
        if image_size is not None:
            H, W = image_size
            check_range("re_box bottom (top + height)", (top + h)[~empty], 1, H)
            check_range("re_box right (left + width)", (left + w)[~empty], 1, W)


def _parse_value(value: Any) -> tuple[int, int, int] | str:
    if isinstance(value, str):
        if value == "mean":
            return mean_fill()
        if value != "random":
            raise ValidationError(f"value must be 'random', 'mean' or a uint8 colour. Got {value!r}.")
        return value
    return parse_rgb("value", value)
