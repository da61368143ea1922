"""RandomGrayscale (torchvision): with probability ``p`` the crop becomes grey, kept as 3 equal channels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import Column, Policy, check_pixels, param, parse_float
from fkdstore.errors import ValidationError

__all__ = ["RandomGrayscale"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomGrayscale(Policy):
    """torchvision ``RandomGrayscale(p)`` on the uint8 crop, as its PIL path computes it: Pillow
    ``convert("L")`` (``L = R * 299/1000 + G * 587/1000 + B * 114/1000`` in Pillow's fixed-point arithmetic),
    then the grey channel repeated 3 times (``to_grayscale(img, num_output_channels=3)``).

    Column: ``gray_applied`` bool, whether the slot was converted.
    """

    name = "random_grayscale"
    p: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))

    def columns(self) -> tuple[Column, ...]:
        return (Column("gray_applied", "bool", "bool", ()),)

    def _draw(self, rng: np.random.Generator, **_: Any) -> dict[str, Any]:
        # Draw order: applied = random() < p.
        return {"gray_applied": bool(rng.random() < self.p)}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        flag = param(params, "gray_applied")
        if flag.shape != () or flag.dtype != np.bool_:
            raise ValidationError(f"gray_applied must be one bool per slot. Got dtype {flag.dtype}, "
                                  f"shape {flag.shape}.")
        if not bool(flag):
            return pixels.copy()
        grey = np.asarray(ops.to_pil(pixels).convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
