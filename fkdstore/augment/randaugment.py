"""RandAugment (torchvision's op list and magnitude bins), params stored as uint8 op ids + int8 signed bins."""

from __future__ import annotations

import dataclasses
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
    parse_choice,
    parse_rgb,
)
from fkdstore.errors import ValidationError
from fkdstore.validation import int_in_range

__all__ = ["RandAugment", "OPS", "magnitude_value"]

# torchvision RandAugment._augmentation_space, in its order: op id = index in this tuple.
OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
    "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"})
NO_MAGNITUDE = frozenset({"Identity", "AutoContrast", "Equalize"})
MAX_BINS = 128  # signed bins are stored as int8


def _linspace_at(start: float, end: float, num: int, i: int) -> float:
    return start + (end - start) * i / (num - 1)


def magnitude_value(op: str, bin_index: int, num_bins: int, image_size: tuple[int, int]) -> float:
    """The (unsigned) magnitude of ``op`` at ``bin_index`` of ``num_bins`` for an ``(H, W)`` image.

    ``linspace(start, end, num_bins)[bin]`` evaluated as ``start + (end - start) * bin / (num_bins - 1)``:
    Shear 0..0.3, TranslateX 0..150/331*W, TranslateY 0..150/331*H, Rotate 0..30 (degrees), Brightness /
    Color / Contrast / Sharpness 0..0.9, Solarize 255..0, Posterize ``8 - round(bin / ((num_bins-1)/4))``
    (round half to even); 0 for Identity, AutoContrast, Equalize.
    """
    h, w = image_size
    if op in ("ShearX", "ShearY"):
        return _linspace_at(0.0, 0.3, num_bins, bin_index)
    if op == "TranslateX":
        return _linspace_at(0.0, 150.0 / 331.0 * w, num_bins, bin_index)
    if op == "TranslateY":
        return _linspace_at(0.0, 150.0 / 331.0 * h, num_bins, bin_index)
    if op == "Rotate":
        return _linspace_at(0.0, 30.0, num_bins, bin_index)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return _linspace_at(0.0, 0.9, num_bins, bin_index)
    if op == "Posterize":
        return float(8 - int(round(bin_index / ((num_bins - 1) / 4))))
    if op == "Solarize":
        return _linspace_at(255.0, 0.0, num_bins, bin_index)
    return 0.0


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
        # Draw order, per op k = 0..num_ops-1: op id integers(0, 14), then sign integers(0, 2) (always drawn).
        op_ids, bins = [], []
        for _k in range(self.num_ops):
            op = int(rng.integers(0, len(OPS)))
            negative = int(rng.integers(0, 2)) == 1
            name = OPS[op]
            b = 0 if name in NO_MAGNITUDE else self.magnitude
            if name in SIGNED and negative:
                b = -b
            op_ids.append(op)
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

    def apply_op(self, img, op: str, signed_bin: int):
        """One op on a PIL image with a signed magnitude bin (torchvision's ``_apply_op``)."""
        h, w = img.height, img.width
        mag = magnitude_value(op, abs(signed_bin), self.num_magnitude_bins, (h, w))
        if signed_bin < 0:
            mag = -mag
        resample = ops.RESAMPLE[self.interpolation]
        if op == "Identity":
            return img
        if op in ("ShearX", "ShearY"):
            return ops.shear(img, mag, "x" if op == "ShearX" else "y", resample, self.fill)
        if op in ("TranslateX", "TranslateY"):
            return ops.translate(img, int(mag), "x" if op == "TranslateX" else "y", resample, self.fill)
        if op == "Rotate":
            return ops.rotate(img, mag, resample, self.fill)
        if op == "Brightness":
            return ops.brightness(img, 1.0 + mag)
        if op == "Color":
            return ops.saturation(img, 1.0 + mag)
        if op == "Contrast":
            return ops.contrast(img, 1.0 + mag)
        if op == "Sharpness":
            return ops.sharpness(img, 1.0 + mag)
        if op == "Posterize":
            return ops.posterize(img, int(mag))
        if op == "Solarize":
            return ops.solarize(img, mag)
        if op == "AutoContrast":
            return ops.autocontrast(img)
        return ops.equalize(img)  # Equalize

    def _check_values(self, columns, **_: Any) -> None:
        op_ids = columns["ra_ops"]
        check_range("ra_ops", op_ids, 0, len(OPS) - 1)
        bins = columns["ra_mag"].astype(np.int64)
        top = self.num_magnitude_bins - 1
        check_range("ra_mag", bins, -top, top)
        names = np.asarray(OPS)[op_ids.astype(np.int64)]
        unsigned = ~np.isin(names, sorted(SIGNED))
        if (bins[unsigned] < 0).any():
            raise ValidationError(f"augment column 'ra_mag' must be >= 0 for unsigned ops. Got {int(bins[unsigned].min())}.")
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

