"""Mixup and CutMix with a stored partner: the teacher labels the mixed pixels, training replays them.

Each mixed slot stores its partner image index (int32) and partner slot (uint16). The partner's pixels are
the partner image's crop for the partner slot (its stored box and flip) followed by every *non-mixing*
policy of the pipeline with the partner slot's stored params (see :meth:`Pipeline.premix`); the partner's own
mixing params are not applied (no recursion). A slot that is not mixed stores partner ``-1``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import Column, Policy, check_pixels, check_range, param, parse_float
from fkdstore.errors import ValidationError

__all__ = ["Mixup", "CutMix", "MixInfo", "cutmix_box", "cutmix_lambda"]

NO_PARTNER = -1


class MixInfo(NamedTuple):
    """What a training loop needs of a mixed slot: partner image and slot (-1, 0 if unmixed) and the weight
    ``lam`` of the slot's own image (1.0 if unmixed)."""

    partner: int
    partner_slot: int
    lam: float


def _draw_partner(rng: np.random.Generator, image_index: int, num_images: int, crops_per_image: int):
    """Partner image uniform over the other images (itself only when N == 1), partner slot uniform in [0, M)."""
    if num_images > 1:
        r = int(rng.integers(0, num_images - 1))
        partner = r + 1 if r >= image_index else r
    else:
        int(rng.integers(0, 1))  # keep the draw count fixed
        partner = image_index
    return partner, int(rng.integers(0, crops_per_image))


def _check_partner(prefix: str, columns, num_images: int, crops_per_image: int) -> np.ndarray:
    partner = columns[f"{prefix}_partner"].astype(np.int64)
    check_range(f"{prefix}_partner", partner, NO_PARTNER, num_images - 1)
    pslot = columns[f"{prefix}_pslot"].astype(np.int64)
    check_range(f"{prefix}_pslot", pslot, 0, crops_per_image - 1)
    return partner


def _partner_pixels(prefix: str, pixels: np.ndarray, params, partner: np.ndarray | None) -> np.ndarray | None:
    p = int(param(params, f"{prefix}_partner"))
    if p == NO_PARTNER:
        return None
    if partner is None:
        raise ValidationError(
            f"{prefix} slot is mixed with image {p} (slot {int(param(params, f'{prefix}_pslot'))}): pass that "
            "slot's pre-mix pixels as partner."
        )
    check_pixels(partner, "partner")
    if partner.shape != pixels.shape:
        raise ValidationError(f"partner must have the shape of pixels {pixels.shape}. Got {partner.shape}.")
    return partner


@dataclasses.dataclass(frozen=True, kw_only=True)
class _MixingPolicy(Policy):
    """Shared part of the mixing policies: columns ``<name>_partner`` and ``<name>_pslot``."""

    mixing = True

    def partner_of(self, params: Mapping[str, Any]) -> tuple[int, int] | None:
        """``(partner image, partner slot)`` of one slot, or None when the slot is not mixed."""
        partner = int(param(params, f"{self.name}_partner"))
        if partner == NO_PARTNER:
            return None
        return partner, int(param(params, f"{self.name}_pslot"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mixup(_MixingPolicy):
    """Mixup with a stored partner: ``out = floor(lam * x + (1 - lam) * partner + 0.5)``.

    ``lam ~ Beta(alpha, alpha)`` (torchvision v2 ``MixUp``), applied with probability ``p``. Columns:
    ``mixup_partner`` int32 (-1 = not mixed), ``mixup_pslot`` uint16, ``mixup_lam`` float16 (1.0 when not
    mixed); apply uses the float16 value.
    """

    name = "mixup"
    alpha: float = 0.2
    p: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _parse_alpha(self.alpha))
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))

    def columns(self) -> tuple[Column, ...]:
        return (Column("mixup_partner", "index", "int32", ()), Column("mixup_pslot", "index", "uint16", ()),
                Column("mixup_lam", "float", "float16", ()))

    def _draw(self, rng: np.random.Generator, *, image_index: int, num_images: int, crops_per_image: int,
              **_: Any) -> dict[str, Any]:
        # Draw order: apply = random() < p; lam = beta(alpha, alpha); partner; partner slot.
        applied = bool(rng.random() < self.p)
        lam = float(rng.beta(self.alpha, self.alpha))
        partner, pslot = _draw_partner(rng, image_index, num_images, crops_per_image)
        if not applied:
            return {"mixup_partner": NO_PARTNER, "mixup_pslot": 0, "mixup_lam": 1.0}
        return {"mixup_partner": partner, "mixup_pslot": pslot, "mixup_lam": lam}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        other = _partner_pixels("mixup", pixels, params, partner)
        if other is None:
            return pixels.copy()
        return ops.blend(pixels, other, self.mix_info(params).lam)

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner, partner slot and ``lam`` (the float16 value as a float) of one slot."""
        lam = float(np.float16(param(params, "mixup_lam")))
        return MixInfo(int(param(params, "mixup_partner")), int(param(params, "mixup_pslot")), lam)

    def _check_values(self, columns, *, num_images, crops_per_image, **_: Any) -> None:
        partner = _check_partner("mixup", columns, num_images, crops_per_image)
        lam = columns["mixup_lam"].astype(np.float64)
        check_range("mixup_lam", lam, 0.0, 1.0)
        if (lam[partner == NO_PARTNER] != 1.0).any():
            raise ValidationError("augment column 'mixup_lam' must be 1 for a slot that is not mixed.")


def cutmix_box(lam: float, center: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """torchvision v2 ``CutMix`` box ``(y1, x1, y2, x2)`` for ``lam`` and centre ``(r_y, r_x)``."""
    H, W = image_size
    r_y, r_x = center
    r = 0.5 * math.sqrt(1.0 - lam)
    r_w_half, r_h_half = int(r * W), int(r * H)
    return max(r_y - r_h_half, 0), max(r_x - r_w_half, 0), min(r_y + r_h_half, H), min(r_x + r_w_half, W)


def cutmix_lambda(box, image_size: tuple[int, int]) -> float:
    """``lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)``: the share of the slot's own pixels (torchvision's)."""
    y1, x1, y2, x2 = (int(v) for v in box)
    H, W = image_size
    return float(1.0 - (x2 - x1) * (y2 - y1) / (W * H))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CutMix(_MixingPolicy):
    """CutMix with a stored partner: the box ``y1:y2, x1:x2`` of the crop comes from the partner.

    ``lam ~ Beta(alpha, alpha)``, centre uniform over the pixels, box by :func:`cutmix_box` (torchvision v2
    ``CutMix``), applied with probability ``p``. Columns: ``cutmix_partner`` int32 (-1 = not mixed),
    ``cutmix_pslot`` uint16, ``cutmix_box`` uint16 (4,) = (y1, x1, y2, x2), all 0 when not mixed. The label
    weight is recomputed from the integer box by :func:`cutmix_lambda`, as torchvision does.
    """

    name = "cutmix"
    alpha: float = 1.0
    p: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _parse_alpha(self.alpha))
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))

    def columns(self) -> tuple[Column, ...]:
        return (Column("cutmix_partner", "index", "int32", ()), Column("cutmix_pslot", "index", "uint16", ()),
                Column("cutmix_box", "int", "uint16", (4,)))

    def _draw(self, rng: np.random.Generator, *, image_index: int, image_size: tuple[int, int], num_images: int,
              crops_per_image: int, **_: Any) -> dict[str, Any]:
        # Draw order: apply = random() < p; lam = beta(alpha, alpha); r_x integers(0, W); r_y integers(0, H);
        # partner; partner slot.
        H, W = image_size
        applied = bool(rng.random() < self.p)
        lam = float(rng.beta(self.alpha, self.alpha))
        r_x = int(rng.integers(0, W))
        r_y = int(rng.integers(0, H))
        partner, pslot = _draw_partner(rng, image_index, num_images, crops_per_image)
        if not applied:
            return {"cutmix_partner": NO_PARTNER, "cutmix_pslot": 0, "cutmix_box": [0, 0, 0, 0]}
        box = cutmix_box(lam, (r_y, r_x), image_size)
        return {"cutmix_partner": partner, "cutmix_pslot": pslot, "cutmix_box": list(box)}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        other = _partner_pixels("cutmix", pixels, params, partner)
        if other is None:
            return pixels.copy()
        y1, x1, y2, x2 = _box(params, pixels.shape[:2])
        return ops.paste_box(pixels, other, (y1, x1, y2, x2))

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner, partner slot and ``lam`` = :func:`cutmix_lambda` of the stored box (needs ``image_size``)."""
        partner = int(param(params, "cutmix_partner"))
        if partner == NO_PARTNER:
            return MixInfo(NO_PARTNER, 0, 1.0)
        if image_size is None:
            raise ValidationError("cutmix mix_info needs image_size (height, width) of the crop.")
        return MixInfo(partner, int(param(params, "cutmix_pslot")), cutmix_lambda(_box(params, image_size),
                                                                                 image_size))

    def _check_values(self, columns, *, num_images, crops_per_image, image_size, **_: Any) -> None:
        partner = _check_partner("cutmix", columns, num_images, crops_per_image)
        box = columns["cutmix_box"].astype(np.int64)
        if (box[partner == NO_PARTNER] != 0).any():
            raise ValidationError("augment column 'cutmix_box' must be all 0 for a slot that is not mixed.")
        if ((box[..., 2] < box[..., 0]) | (box[..., 3] < box[..., 1])).any():
            raise ValidationError("augment column 'cutmix_box' must satisfy y1 <= y2 and x1 <= x2.")
        if image_size is not None:
            check_range("cutmix_box y2", box[..., 2], 0, image_size[0])
            check_range("cutmix_box x2", box[..., 3], 0, image_size[1])


def _box(params, image_size) -> tuple[int, int, int, int]:
    y1, x1, y2, x2 = (int(v) for v in param(params, "cutmix_box").reshape(4))
    H, W = image_size
    if not (0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W):
        raise ValidationError(
            f"cutmix_box (y1={y1}, x1={x1}, y2={y2}, x2={x2}) must lie inside the crop of size "
            f"(height={H}, width={W})."
        )
    return y1, x1, y2, x2


def _parse_alpha(value: Any) -> float:
    return parse_float("alpha", value, 0.0, 1e3, lo_open=True)
