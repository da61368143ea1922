"""RandAugment (torchvision's op list and magnitude bins), params stored as uint8 op ids + int8 signed bins.

The ops are one table, :data:`AUGMENTATION_SPACE` (name, signed, magnitude per bin, replay), as torchvision's
``_augmentation_space``. It is format data (spec section 6.3): the op id is drawn as
``integers(0, len(AUGMENTATION_SPACE))``, so adding, removing or reordering an op would silently redraw every
seed and misread every stored op id. A new op list is a new policy (a new registered name), never an edit here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from fkdstore.augment import ops
from fkdstore.augment.base import (
    Column,
    Policy,
    check_pixels,
    check_range,
    param,
    parse_choice,
    parse_rgb,
)
from fkdstore.errors import ValidationError
from fkdstore.validation import int_in_range

__all__ = ["RandAugment", "Op", "AUGMENTATION_SPACE", "OPS", "magnitude_value"]

MAX_BINS = 128  # signed bins are stored as int8

Magnitude = Callable[[int, int, tuple[int, int]], float]
"""``(bin, num_bins, (H, W)) -> unsigned magnitude`` of an op."""
Apply = Callable[[Image.Image, float, Image.Resampling, tuple[int, int, int]], Image.Image]
"""``(image, signed magnitude, resample, fill) -> image``: one op on a Pillow image."""


def _linspace_at(start: float, end: float, num: int, i: int) -> float:
    return start + (end - start) * i / (num - 1)


def _linear(start: float, end: float) -> Magnitude:
    """``L(start, end)``: bin ``b`` of ``linspace(start, end, num_bins)``."""
    return lambda b, num_bins, hw: _linspace_at(start, end, num_bins, b)


def _translate(axis: int) -> Magnitude:
    """``L(0, 150/331 * side)``, the side being the image's height (``axis=0``) or width (``axis=1``)."""
    return lambda b, num_bins, hw: _linspace_at(0.0, 150.0 / 331.0 * hw[axis], num_bins, b)


def _posterize_bits(b: int, num_bins: int, hw: tuple[int, int]) -> float:
    """``8 - round(b / ((num_bins - 1) / 4))`` (round half to even)."""
    return float(8 - int(round(b / ((num_bins - 1) / 4))))


class Op(NamedTuple):
    """One row of :data:`AUGMENTATION_SPACE`: an op's name, whether the sign draw negates its magnitude,
    its magnitude per bin (``None``: the op has none, its stored bin is 0) and its replay on a Pillow image."""

    name: str
    signed: bool
    magnitude: Magnitude | None
    apply: Apply


AUGMENTATION_SPACE: tuple[Op, ...] = (
    # torchvision RandAugment._augmentation_space, in its order: op id = index in this table. Format data
    # (spec section 6.3): the draw integers(0, len(AUGMENTATION_SPACE)) depends on the length, so the table
    # never changes; a new op list is a new policy name.
    Op("Identity", False, None, lambda img, m, resample, fill: img),
    Op("ShearX", True, _linear(0.0, 0.3), lambda img, m, resample, fill: ops.shear(img, m, "x", resample, fill)),
    Op("ShearY", True, _linear(0.0, 0.3), lambda img, m, resample, fill: ops.shear(img, m, "y", resample, fill)),
    Op("TranslateX", True, _translate(1),
       lambda img, m, resample, fill: ops.translate(img, int(m), "x", resample, fill)),
    Op("TranslateY", True, _translate(0),
       lambda img, m, resample, fill: ops.translate(img, int(m), "y", resample, fill)),
    Op("Rotate", True, _linear(0.0, 30.0), lambda img, m, resample, fill: ops.rotate(img, m, resample, fill)),
    Op("Brightness", True, _linear(0.0, 0.9), lambda img, m, resample, fill: ops.brightness(img, 1.0 + m)),
    Op("Color", True, _linear(0.0, 0.9), lambda img, m, resample, fill: ops.saturation(img, 1.0 + m)),
    Op("Contrast", True, _linear(0.0, 0.9), lambda img, m, resample, fill: ops.contrast(img, 1.0 + m)),
    Op("Sharpness", True, _linear(0.0, 0.9), lambda img, m, resample, fill: ops.sharpness(img, 1.0 + m)),
    Op("Posterize", False, _posterize_bits, lambda img, m, resample, fill: ops.posterize(img, int(m))),
    Op("Solarize", False, _linear(255.0, 0.0), lambda img, m, resample, fill: ops.solarize(img, m)),
    Op("AutoContrast", False, None, lambda img, m, resample, fill: ops.autocontrast(img)),
    Op("Equalize", False, None, lambda img, m, resample, fill: ops.equalize(img)),
)

# Views of the table, by name.
OPS: tuple[str, ...] = tuple(op.name for op in AUGMENTATION_SPACE)
SIGNED = frozenset(op.name for op in AUGMENTATION_SPACE if op.signed)
NO_MAGNITUDE = frozenset(op.name for op in AUGMENTATION_SPACE if op.magnitude is None)
_BY_NAME = {op.name: op for op in AUGMENTATION_SPACE}


def _op(name: str) -> Op:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValidationError(f"RandAugment op must be one of {list(OPS)}. Got {name!r}.") from None


def magnitude_value(op: str, bin_index: int, num_bins: int, image_size: tuple[int, int]) -> float:
    """The (unsigned) magnitude of ``op`` at ``bin_index`` of ``num_bins`` for an ``(H, W)`` image.

    ``linspace(start, end, num_bins)[bin]`` evaluated as ``start + (end - start) * bin / (num_bins - 1)``:
    Shear 0..0.3, TranslateX 0..150/331*W, TranslateY 0..150/331*H, Rotate 0..30 (degrees), Brightness /
    Color / Contrast / Sharpness 0..0.9, Solarize 255..0, Posterize ``8 - round(bin / ((num_bins-1)/4))``
    (round half to even); 0 for Identity, AutoContrast, Equalize (see :data:`AUGMENTATION_SPACE`).
    """
    magnitude = _op(op).magnitude
    return 0.0 if magnitude is None else magnitude(bin_index, num_bins, image_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandAugment(Policy):
    """torchvision ``RandAugment(num_ops, magnitude, num_magnitude_bins, interpolation, fill)``.

    Columns: ``ra_ops`` uint8 (num_ops,) = op ids into :data:`OPS`; ``ra_mag`` int8 (num_ops,) = signed
    magnitude bin: ``+magnitude`` or ``-magnitude`` for signed ops (negative = the op's magnitude negated),
    ``+magnitude`` for Posterize / Solarize, 0 for ops without magnitude. Storing the bin (not the float)
    makes the stored value exact; the float is :func:`magnitude_value` of ``|bin|``.
    """

    name = "randaugment"
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31
    interpolation: str = "nearest"
    fill: Any = (0, 0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_ops", _parse_num_ops(self.num_ops))
        object.__setattr__(self, "num_magnitude_bins", _parse_num_magnitude_bins(self.num_magnitude_bins))
        object.__setattr__(self, "magnitude", _parse_magnitude(self.magnitude, self.num_magnitude_bins))
        object.__setattr__(self, "interpolation", parse_choice("interpolation", self.interpolation, list(ops.RESAMPLE)))
        object.__setattr__(self, "fill", parse_rgb("fill", self.fill))

    def columns(self) -> tuple[Column, ...]:
        n = (self.num_ops,)
        return (Column("ra_ops", "int", "uint8", n), Column("ra_mag", "int", "int8", n))

    def _draw(self, rng: np.random.Generator, **_: Any) -> dict[str, Any]:
        # Draw order, per op k = 0..num_ops-1: op id integers(0, len(AUGMENTATION_SPACE)), then sign
        # integers(0, 2) (always drawn).
        op_ids, bins = [], []
        for _k in range(self.num_ops):
            op_id = int(rng.integers(0, len(AUGMENTATION_SPACE)))
            negative = int(rng.integers(0, 2)) == 1
            op = AUGMENTATION_SPACE[op_id]
            b = 0 if op.magnitude is None else self.magnitude
            if op.signed and negative:
                b = -b
            op_ids.append(op_id)
            bins.append(b)
        return {"ra_ops": op_ids, "ra_mag": bins}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        op_ids = param(params, "ra_ops").reshape(-1)
        bins = param(params, "ra_mag").reshape(-1)
        if op_ids.shape != (self.num_ops,) or bins.shape != (self.num_ops,):
            raise ValidationError(
                f"ra_ops and ra_mag must have shape ({self.num_ops},). Got {op_ids.shape} and {bins.shape}."
            )
        img = ops.to_pil(pixels)
        for op_id, b in zip(op_ids.tolist(), bins.tolist()):
            img = self.apply_op(img, _op_name(op_id), int(b))
        return ops.to_array(img)

    def apply_op(self, img: Image.Image, op: str, signed_bin: int) -> Image.Image:
        """One op on a PIL image with a signed magnitude bin (torchvision's ``_apply_op``)."""
        mag = magnitude_value(op, abs(signed_bin), self.num_magnitude_bins, (img.height, img.width))
        if signed_bin < 0:
            mag = -mag
        return _op(op).apply(img, mag, ops.RESAMPLE[self.interpolation], self.fill)

    def _check_values(self, columns, **_: Any) -> None:
        op_ids = columns["ra_ops"]
        check_range("ra_ops", op_ids, 0, len(OPS) - 1)
        bins = columns["ra_mag"].astype(np.int64)
        top = self.num_magnitude_bins - 1
        check_range("ra_mag", bins, -top, top)
        names = np.asarray(OPS)[op_ids.astype(np.int64)]
        unsigned = ~np.isin(names, sorted(SIGNED))
        if (bins[unsigned] < 0).any():
            raise ValidationError(f"augment column 'ra_mag' must be >= 0 for unsigned ops. "
                                  f"Got {int(bins[unsigned].min())}.")
        none = np.isin(names, sorted(NO_MAGNITUDE))
        if (bins[none] != 0).any():
            got = int(bins[none][bins[none] != 0][0])
            raise ValidationError(f"augment column 'ra_mag' must be 0 for ops without magnitude. Got {got}.")


def _op_name(op_id: int) -> str:
    if not 0 <= op_id < len(OPS):
        raise ValidationError(f"RandAugment op id must be in [0, {len(OPS) - 1}]. Got {op_id}.")
    return OPS[op_id]


def _parse_num_ops(value: Any) -> int:
    return int_in_range("num_ops", value, 1, 16)


def _parse_num_magnitude_bins(value: Any) -> int:
    return int_in_range("num_magnitude_bins", value, 2, MAX_BINS)


def _parse_magnitude(value: Any, num_bins: int) -> int:
    return int_in_range("magnitude", value, 0, num_bins - 1)

