"""``mix``: Mixup *or* CutMix per slot, the two mutually exclusive, with a switch probability (timm's recipe).

timm's ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)`` and torchvision's
``RandomChoice([MixUp(alpha), CutMix(alpha)])`` pick ONE of the two methods for each mixed sample; the
``mixup`` and ``cutmix`` policies of a pipeline apply one after the other instead. This policy stores the
choice: a mixed slot is CutMix with probability ``switch_prob`` (timm's meaning: the probability of
*switching to* CutMix; torchvision's RandomChoice is ``switch_prob = 0.5``), else Mixup, and is mixed at all
with probability ``p`` (timm's ``prob``). The partner rule, the ``lam`` code and the CutMix box are those of
:class:`~fkdstore.augment.mixing.Mixup` and :class:`~fkdstore.augment.mixing.CutMix`; spec:
``spec/format-v4.md`` section 6.3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import Column, check_range, param, parse_float
from fkdstore.augment.mixing import (
    DEFAULT_WINDOW,
    LAM_SCALE,
    NO_PARTNER,
    MixInfo,
    MixingPolicy,
    _check_partner,
    _cut_info,
    _draw_partner,
    _lam_code,
    _parse_alpha,
    _parse_window,
    center_box,
)
from fkdstore.errors import ValidationError

__all__ = ["Mix"]

MIXUP, CUTMIX = 0, 1  # values of the mix_cut column


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mix(MixingPolicy):
    """Mixup or CutMix with a stored partner, one of the two per mixed slot.

    Fields: ``mixup_alpha`` (0.8), ``cutmix_alpha`` (1.0), ``switch_prob`` (0.5: probability that a mixed
    slot is CutMix), ``p`` (1.0: probability that the slot is mixed), ``window`` (partners, as Mixup).
    Columns: ``mix_partner`` int32 (-1 = not mixed), ``mix_cut`` uint8 (1 = CutMix, 0 = Mixup or not mixed),
    ``mix_lam`` uint8 ``q`` (``lam = q / 255``; 255 when not mixed), ``mix_center`` uint16 (2,) = CutMix box
    centre (r_y, r_x) (0 for Mixup and when not mixed). Replay: Mixup as :class:`~fkdstore.augment.Mixup`
    with ``q / 255``; CutMix as :class:`~fkdstore.augment.CutMix` from the stored centre and ``q``.
    """

    name = "mix"
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    p: float = 1.0
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixup_alpha", _parse_alpha(self.mixup_alpha, "mixup_alpha"))
        object.__setattr__(self, "cutmix_alpha", _parse_alpha(self.cutmix_alpha, "cutmix_alpha"))
        object.__setattr__(self, "switch_prob", parse_float("switch_prob", self.switch_prob, 0.0, 1.0))
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))
        object.__setattr__(self, "window", _parse_window(self.window))

    def columns(self) -> tuple[Column, ...]:
        return (Column("mix_partner", "index", "int32", ()), Column("mix_cut", "int", "uint8", ()),
                Column("mix_lam", "int", "uint8", ()), Column("mix_center", "int", "uint16", (2,)))

    def _draw(self, rng: np.random.Generator, *, image_index: int, image_size: tuple[int, int], num_images: int,
              **_: Any) -> dict[str, Any]:
        # Draw order: applied = random() < p; cut = random() < switch_prob; lam_mixup = beta(mixup_alpha,
        # mixup_alpha); lam_cutmix = beta(cutmix_alpha, cutmix_alpha); r_x integers(0, W); r_y integers(0, H);
        # partner. Every draw is made, so the count is fixed.
        H, W = image_size
        applied = bool(rng.random() < self.p)
        cut = bool(rng.random() < self.switch_prob)
        lam_mixup = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
        lam_cutmix = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        r_x = int(rng.integers(0, W))
        r_y = int(rng.integers(0, H))
        partner = _draw_partner(rng, image_index, num_images, self.window)
        if not applied:
            return {"mix_partner": NO_PARTNER, "mix_cut": MIXUP, "mix_lam": LAM_SCALE, "mix_center": [0, 0]}
        if cut:
            return {"mix_partner": partner, "mix_cut": CUTMIX, "mix_lam": _lam_code(lam_cutmix),
                    "mix_center": [r_y, r_x]}
        return {"mix_partner": partner, "mix_cut": MIXUP, "mix_lam": _lam_code(lam_mixup), "mix_center": [0, 0]}

    def _mix(self, pixels: np.ndarray, other: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        q = int(param(params, "mix_lam"))
        if int(param(params, "mix_cut")) == CUTMIX:
            return ops.paste_box(pixels, other, center_box(params, "mix", pixels.shape[:2]))
        return ops.blend(pixels, other, q / LAM_SCALE)

    def box(self, params: Mapping[str, Any], image_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """The pasted box ``(y1, x1, y2, x2)`` of a CutMix slot (None for a Mixup or unmixed slot)."""
        if int(param(params, "mix_partner")) == NO_PARTNER or int(param(params, "mix_cut")) != CUTMIX:
            return None
        return center_box(params, "mix", image_size)

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner and ``lam``: ``q / 255`` for Mixup, :func:`cutmix_lambda` of the replayed box for CutMix
        (which needs ``image_size``)."""
        partner = int(param(params, "mix_partner"))
        if partner == NO_PARTNER:
            return MixInfo(NO_PARTNER, 1.0)
        if int(param(params, "mix_cut")) != CUTMIX:
            return MixInfo(partner, int(param(params, "mix_lam")) / LAM_SCALE)
        return _cut_info(self.name, partner, image_size, lambda size: center_box(params, "mix", size),
                         " for a CutMix slot")

    def _check_values(self, columns, *, num_images, image_size, **_: Any) -> None:
        partner = _check_partner("mix", columns, num_images)
        cut = columns["mix_cut"].astype(np.int64)
        lam = columns["mix_lam"].astype(np.int64)
        center = columns["mix_center"].astype(np.int64)
        check_range("mix_cut", cut, MIXUP, CUTMIX)
        unmixed = partner == NO_PARTNER
        if (cut[unmixed] != MIXUP).any() or (lam[unmixed] != LAM_SCALE).any() or (center[unmixed] != 0).any():
            raise ValidationError("augment columns 'mix_cut', 'mix_lam' and 'mix_center' must be 0, 255 and 0 for a "
                                  "slot that is not mixed.")
        if (center[cut == MIXUP] != 0).any():
            raise ValidationError("augment column 'mix_center' must be 0 for a Mixup slot (mix_cut = 0).")
        if image_size is not None:
            check_range("mix_center r_y", center[..., 0], 0, image_size[0] - 1)
            check_range("mix_center r_x", center[..., 1], 0, image_size[1] - 1)
