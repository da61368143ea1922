"""Mixup and CutMix with a stored partner: the teacher labels the mixed pixels, training replays them.

Each mixed slot ``(i, s)`` stores its partner image ``j`` (int32); the partner slot is ``s`` itself (the
partner's crop in the same slot, so no column is needed). The partner's pixels are image ``j``'s crop for
slot ``s`` (its stored box and flip) followed by every *non-mixing* policy of the pipeline with slot
``(j, s)``'s stored params (see :meth:`Pipeline.premix`); the partner's own mixing params are not applied
(no recursion). A slot that is not mixed stores partner ``-1``.

Size choices (``spec/format-v4.md`` section 6.6): partners are drawn within a *strided window* of about
``window`` images (the images ``j = i mod S`` for a power of two ``S``), so the stored absolute index of the
images of one chunk differs only in its high bits and compresses well with bitshuffle; the window spans the
whole dataset (every ``S``-th image), so partners come from every class of a class-sorted folder. ``lam`` is
stored as uint8 ``q`` (``lam = q / 255``), and CutMix stores its box centre and ``q`` (the box is recomputed
from them): apply uses the stored values only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import Column, Policy, check_pixels, check_range, param, parse_float
from fkdstore.errors import ValidationError
from fkdstore.validation import int_in_range

__all__ = ["Mixup", "CutMix", "MixingPolicy", "MixInfo", "cutmix_box", "cutmix_lambda", "window_stride"]

NO_PARTNER = -1
LAM_SCALE = 255  # stored lam = q / 255, q uint8
DEFAULT_WINDOW = 4096
MAX_WINDOW = 2**31 - 1


class MixInfo(NamedTuple):
    """What a training loop needs of a mixed slot: partner image (-1 if unmixed) and the weight ``lam`` of
    the slot's own image (1.0 if unmixed). The partner's slot is the slot itself."""

    partner: int
    lam: float


def window_stride(num_images: int, window: int) -> int:
    """The stride ``S`` of the partner window: the smallest power of two with ``ceil(N / S) <= window``
    (1 when ``window`` is 0 or ``>= N``: the whole dataset)."""
    if window == 0 or window >= num_images:
        return 1
    stride = 1
    while -(-num_images // stride) > window:
        stride *= 2
    return stride


def _draw_partner(rng: np.random.Generator, image_index: int, num_images: int, window: int) -> int:
    """Partner image uniform over the other images of image ``i``'s window ``{j < N : j = i mod S}``
    (``S`` = :func:`window_stride`): ``n`` = window size, ``q = i // S``, ``r = integers(0, n - 1)``,
    ``j = i mod S + S * (r + (r >= q))``; when ``n == 1``, ``integers(0, 1)`` is drawn and ``j = i``."""
    stride = window_stride(num_images, window)
    c, q = image_index % stride, image_index // stride
    n = (num_images - 1 - c) // stride + 1
    if n > 1:
        r = int(rng.integers(0, n - 1))
        return c + stride * (r + 1 if r >= q else r)
    int(rng.integers(0, 1))  # keep the draw count fixed
    return image_index


def _lam_code(lam: float) -> int:
    """``lam`` as its stored uint8 code ``q = round_half_even(lam * 255)``."""
    return int(np.rint(lam * LAM_SCALE))


def _check_partner(prefix: str, columns, num_images: int) -> np.ndarray:
    partner = columns[f"{prefix}_partner"].astype(np.int64)
    check_range(f"{prefix}_partner", partner, NO_PARTNER, num_images - 1)
    return partner


def _partner_pixels(prefix: str, pixels: np.ndarray, params, partner: np.ndarray | None) -> np.ndarray | None:
    p = int(param(params, f"{prefix}_partner"))
    if p == NO_PARTNER:
        return None
    if partner is None:
        raise ValidationError(
            f"{prefix} slot is mixed with image {p} (the same slot): pass that slot's pre-mix pixels as partner."
        )
    check_pixels(partner, "partner")
    if partner.shape != pixels.shape:
        raise ValidationError(f"partner must have the shape of pixels {pixels.shape}. Got {partner.shape}.")
    return partner


def _cut_info(name: str, partner: int, image_size: tuple[int, int] | None,
              box: Callable[[tuple[int, int]], tuple[int, int, int, int]], what: str = "") -> MixInfo:
    """:class:`MixInfo` of a CutMix slot: ``lam`` = :func:`cutmix_lambda` of its box ``box(image_size)``."""
    if partner == NO_PARTNER:
        return MixInfo(NO_PARTNER, 1.0)
    if image_size is None:
        raise ValidationError(f"{name} mix_info needs image_size (height, width) of the crop{what}.")
    return MixInfo(partner, cutmix_lambda(box(image_size), image_size))


def center_box(params: Mapping[str, Any], prefix: str, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The CutMix box of a slot stored as centre and ``lam`` code (columns ``<prefix>_center``,
    ``<prefix>_lam``): :func:`cutmix_box` ``(q / 255, (r_y, r_x), image_size)``; the centre must lie inside
    the crop."""
    r_y, r_x = (int(v) for v in param(params, f"{prefix}_center").reshape(2))
    H, W = image_size
    if not (0 <= r_y < H and 0 <= r_x < W):
        raise ValidationError(f"{prefix}_center (r_y={r_y}, r_x={r_x}) must lie inside the crop of size "
                              f"(height={H}, width={W}).")
    return cutmix_box(int(param(params, f"{prefix}_lam")) / LAM_SCALE, (r_y, r_x), (H, W))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixingPolicy(Policy):
    """The contract of a mixing policy (``mixing = True``): column ``<name>_partner`` (the partner image,
    -1 when the slot is not mixed; the partner slot is the slot itself), :meth:`partner_of`,
    :meth:`mix_info`, and :meth:`apply`, which checks the partner's pixels and calls :meth:`_mix`."""

    mixing = True

    def partner_of(self, params: Mapping[str, Any]) -> int | None:
        """The partner image of one slot (its partner slot is the same slot), or None when not mixed."""
        partner = int(param(params, f"{self.name}_partner"))
        return None if partner == NO_PARTNER else partner

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner and ``lam`` (the weight of the slot's own image) of one slot."""
        raise NotImplementedError

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        other = _partner_pixels(self.name, pixels, params, partner)
        if other is None:
            return pixels.copy()
        return self._mix(pixels, other, params)

    def _mix(self, pixels: np.ndarray, other: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """The mixed pixels of a mixed slot, ``other`` being the partner's (checked) pixels."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class _AlphaMixing(MixingPolicy):
    """Fields of Mixup and CutMix and their exact siblings: ``alpha`` (of ``Beta(alpha, alpha)``), ``p`` (the
    probability that a slot is mixed), ``window`` (partners: see the module docstring)."""

    alpha: float = 0.2
    p: float = 1.0
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _parse_alpha(self.alpha))
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))
        object.__setattr__(self, "window", _parse_window(self.window))

    def _draw_mixup(self, rng: np.random.Generator, image_index: int, num_images: int) -> tuple[bool, float, int]:
        """Draw order: ``applied = random() < p``; ``lam = beta(alpha, alpha)``; partner. Returns them."""
        applied = bool(rng.random() < self.p)
        lam = float(rng.beta(self.alpha, self.alpha))
        return applied, lam, _draw_partner(rng, image_index, num_images, self.window)

    def _draw_cutmix(self, rng: np.random.Generator, image_index: int, image_size: tuple[int, int],
                     num_images: int) -> tuple[bool, float, tuple[int, int], int]:
        """Draw order: ``applied = random() < p``; ``lam = beta(alpha, alpha)``; ``r_x = integers(0, W)``;
        ``r_y = integers(0, H)``; partner. Returns ``(applied, lam, (r_y, r_x), partner)``."""
        H, W = image_size
        applied = bool(rng.random() < self.p)
        lam = float(rng.beta(self.alpha, self.alpha))
        r_x = int(rng.integers(0, W))
        r_y = int(rng.integers(0, H))
        return applied, lam, (r_y, r_x), _draw_partner(rng, image_index, num_images, self.window)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mixup(_AlphaMixing):
    """Mixup with a stored partner: ``out = floor(lam * x + (1 - lam) * partner + 0.5)``.

    ``lam ~ Beta(alpha, alpha)`` (torchvision v2 ``MixUp``), applied with probability ``p``; the partner is
    drawn within a strided ``window`` of images (0 = all images; see the module docstring). Columns:
    ``mixup_partner`` int32 (-1 = not mixed), ``mixup_lam`` uint8 ``q`` with ``lam = q / 255`` (255 when not
    mixed); apply uses the stored ``q / 255``.
    """

    name = "mixup"

    def columns(self) -> tuple[Column, ...]:
        return (Column("mixup_partner", "index", "int32", ()), Column("mixup_lam", "int", "uint8", ()))

    def _draw(self, rng: np.random.Generator, *, image_index: int, num_images: int, **_: Any) -> dict[str, Any]:
        applied, lam, partner = self._draw_mixup(rng, image_index, num_images)
        if not applied:
            return {"mixup_partner": NO_PARTNER, "mixup_lam": LAM_SCALE}
        return {"mixup_partner": partner, "mixup_lam": _lam_code(lam)}

    def _mix(self, pixels: np.ndarray, other: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        return ops.blend(pixels, other, self.mix_info(params).lam)

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner and ``lam = q / 255`` (the stored code) of one slot."""
        return MixInfo(int(param(params, "mixup_partner")), int(param(params, "mixup_lam")) / LAM_SCALE)

    def _check_values(self, columns, *, num_images, **_: Any) -> None:
        partner = _check_partner("mixup", columns, num_images)
        lam = columns["mixup_lam"].astype(np.int64)
        if (lam[partner == NO_PARTNER] != LAM_SCALE).any():
            raise ValidationError("augment column 'mixup_lam' must be 255 (lam = 1) for a slot that is not mixed.")


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
class CutMix(_AlphaMixing):
    """CutMix with a stored partner: the box ``y1:y2, x1:x2`` of the crop comes from the partner.

    ``lam ~ Beta(alpha, alpha)``, centre ``(r_y, r_x)`` uniform over the pixels, applied with probability
    ``p``, partner within a strided ``window`` (as :class:`Mixup`). Columns: ``cutmix_partner`` int32 (-1 =
    not mixed), ``cutmix_center`` uint16 (2,) = (r_y, r_x) (0 when not mixed), ``cutmix_lam`` uint8 ``q``
    (255 when not mixed). Replay: box = :func:`cutmix_box` ``(q / 255, centre, crop size)`` (torchvision v2
    ``CutMix``); the label weight is recomputed from the integer box by :func:`cutmix_lambda`, as torchvision
    does.
    """

    name = "cutmix"
    alpha: float = 1.0

    def columns(self) -> tuple[Column, ...]:
        return (Column("cutmix_partner", "index", "int32", ()), Column("cutmix_center", "int", "uint16", (2,)),
                Column("cutmix_lam", "int", "uint8", ()))

    def _draw(self, rng: np.random.Generator, *, image_index: int, image_size: tuple[int, int], num_images: int,
              **_: Any) -> dict[str, Any]:
        applied, lam, center, partner = self._draw_cutmix(rng, image_index, image_size, num_images)
        if not applied:
            return {"cutmix_partner": NO_PARTNER, "cutmix_center": [0, 0], "cutmix_lam": LAM_SCALE}
        return {"cutmix_partner": partner, "cutmix_center": list(center), "cutmix_lam": _lam_code(lam)}

    def _mix(self, pixels: np.ndarray, other: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        return ops.paste_box(pixels, other, self.box(params, pixels.shape[:2]))

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner and ``lam`` = :func:`cutmix_lambda` of the replayed box (needs ``image_size``)."""
        return _cut_info(self.name, int(param(params, "cutmix_partner")), image_size,
                         lambda size: self.box(params, size))

    def box(self, params: Mapping[str, Any], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The pasted box ``(y1, x1, y2, x2)`` of one slot: :func:`cutmix_box` of the stored centre and
        ``q / 255`` (empty when the slot is not mixed)."""
        return center_box(params, "cutmix", image_size)

    def _check_values(self, columns, *, num_images, image_size, **_: Any) -> None:
        partner = _check_partner("cutmix", columns, num_images)
        center = columns["cutmix_center"].astype(np.int64)
        lam = columns["cutmix_lam"].astype(np.int64)
        unmixed = partner == NO_PARTNER
        if (center[unmixed] != 0).any() or (lam[unmixed] != LAM_SCALE).any():
            raise ValidationError("augment columns 'cutmix_center' and 'cutmix_lam' must be 0 and 255 for a slot "
                                  "that is not mixed.")
        if image_size is not None:
            check_range("cutmix_center r_y", center[..., 0], 0, image_size[0] - 1)
            check_range("cutmix_center r_x", center[..., 1], 0, image_size[1] - 1)


def _parse_alpha(value: Any, name: str = "alpha") -> float:
    return parse_float(name, value, 0.0, 1e3, lo_open=True)


def _parse_window(value: Any) -> int:
    return int_in_range("window", value, 0, MAX_WINDOW)
