"""ColorJitter: brightness, contrast, saturation and hue factors applied in a random order (torchvision)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import Column, Policy, check_pixels, check_range, param, parse_float, parse_pair
from fkdstore.errors import ValidationError

__all__ = ["ColorJitter", "ORDERS"]

# The 24 orders of (brightness=0, contrast=1, saturation=2, hue=3), lexicographic: cj_order stores the index.
ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))
_NAMES = ("brightness", "contrast", "saturation", "hue")


def _parse_jitter(name: str, value: Any, *, center: float, bound: float, clip_lo: float) -> tuple[float, float]:
    """torchvision's ``_check_input``: a number ``v`` means ``[max(clip_lo, center - v), center + v]``."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        v = parse_float(name, value, 0.0, bound)
        return max(clip_lo, center - v), center + v
    return parse_pair(name, value, clip_lo, center + bound)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColorJitter(Policy):
    """torchvision ``ColorJitter``: factors drawn uniformly from the ranges, applied in a random order.

    Columns: ``cj_factors`` float16 (4,) = (brightness, contrast, saturation, hue) factors and ``cj_order``
    uint8 = index into :data:`ORDERS` (the 24 permutations of the four ops, lexicographic). A factor whose
    range is the identity (1 for the first three, 0 for hue) is still stored (as 1 / 0) and its op skipped.
    """

    name = "color_jitter"
    brightness: Any = 0.4
    contrast: Any = 0.4
    saturation: Any = 0.4
    hue: Any = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "brightness", _parse_brightness(self.brightness))
        object.__setattr__(self, "contrast", _parse_contrast(self.contrast))
        object.__setattr__(self, "saturation", _parse_saturation(self.saturation))
        object.__setattr__(self, "hue", _parse_hue(self.hue))

    def columns(self) -> tuple[Column, ...]:
        return (Column("cj_factors", "float", "float16", (4,)), Column("cj_order", "int", "uint8", ()))

    def _ranges(self) -> tuple[tuple[float, float], ...]:
        return (self.brightness, self.contrast, self.saturation, self.hue)

    def _draw(self, rng: np.random.Generator, **_: Any) -> dict[str, Any]:
        # Draw order: order index integers(0, 24), then one uniform(lo, hi) per factor (b, c, s, h).
        order = int(rng.integers(0, len(ORDERS)))
        factors = [float(rng.uniform(lo, hi)) for lo, hi in self._ranges()]
        return {"cj_factors": factors, "cj_order": order}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        factors = param(params, "cj_factors").astype(np.float64)
        order = int(param(params, "cj_order"))
        if factors.shape != (4,) or not 0 <= order < len(ORDERS):
            raise ValidationError(f"cj params must be factors (4,) and order in [0, 23]. Got {factors.shape}, {order}.")
        img = ops.to_pil(pixels)
        identity = (1.0, 1.0, 1.0, 0.0)
        fns = (ops.brightness, ops.contrast, ops.saturation, ops.hue)
        for k in ORDERS[order]:
            if self._ranges()[k] == (identity[k], identity[k]):
                continue  # torchvision sets a degenerate range to None and skips the op
            img = fns[k](img, float(factors[k]))
        return ops.to_array(img)

    def _check_values(self, columns, **_: Any) -> None:
        f = columns["cj_factors"].astype(np.float64)
        for k, (lo, hi) in enumerate(self._ranges()):
            # the float16 cast may round a bound outward by half an ulp
            tol = float(np.spacing(np.float16(max(abs(lo), abs(hi)))))
            check_range(f"cj_factors[{_NAMES[k]}]", f[..., k], lo - tol, hi + tol)
        check_range("cj_order", columns["cj_order"], 0, len(ORDERS) - 1)


def _parse_brightness(value: Any) -> tuple[float, float]:
    return _parse_jitter("brightness", value, center=1.0, bound=1e4, clip_lo=0.0)


def _parse_contrast(value: Any) -> tuple[float, float]:
    return _parse_jitter("contrast", value, center=1.0, bound=1e4, clip_lo=0.0)


def _parse_saturation(value: Any) -> tuple[float, float]:
    return _parse_jitter("saturation", value, center=1.0, bound=1e4, clip_lo=0.0)


def _parse_hue(value: Any) -> tuple[float, float]:
    return _parse_jitter("hue", value, center=0.0, bound=0.5, clip_lo=-0.5)
