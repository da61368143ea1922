"""Mixup with a float32 ``lam`` and CutMix with an explicit box: the mixing parameters other systems store.

:class:`~fkdstore.augment.mixing.Mixup` stores ``lam`` as a uint8 code and
:class:`~fkdstore.augment.mixing.CutMix` a box centre plus that code; neither can hold an arbitrary ``lam``
or an arbitrary box. Label sets written by other systems (Apple's ml-dr, SRe2L and its descendants) record
the exact ``lam`` (a float) and the CutMix box (four integers), and their loaders replay those. The two
policies here store them as they are:

* ``mixup_exact``: ``mixup_exact_partner`` int32 (-1 = not mixed), ``mixup_exact_lam`` float32 (1.0 when
  not mixed). Replay: :func:`fkdstore.augment.ops.blend` with the stored ``lam``; label weight ``lam``.
* ``cutmix_box``: ``cutmix_box_partner`` int32, ``cutmix_box_rect`` uint16 (4,) = ``(y1, x1, y2, x2)`` in
  crop pixels (all 0 when not mixed), ``cutmix_box_lam`` float32 = the ``lam`` the box was drawn from (1.0
  when not mixed; kept because the source stores it, unused by replay). Replay: rows ``y1:y2``, columns
  ``x1:x2`` from the partner; label weight ``1 - (y2 - y1)(x2 - x1) / (H W)`` (recomputed from the box).

The partner's pixels are those of :class:`~fkdstore.augment.mixing.Mixup`: the partner image's crop in the
same slot after the non-mixing policies, unless the pipeline carries partner crops
(:class:`~fkdstore.augment.partner.PartnerCrop`). Both sample like their uint8 siblings (``alpha``, ``p``,
``window``), so ``generate`` can use them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from fkdstore.augment import ops
from fkdstore.augment.base import Column, check_range, param
from fkdstore.augment.mixing import NO_PARTNER, MixInfo, _AlphaMixing, _check_partner, _cut_info, cutmix_box
from fkdstore.errors import ValidationError

__all__ = ["MixupExact", "CutMixBox"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixupExact(_AlphaMixing):
    """Mixup with a stored partner and a float32 ``lam``: ``out = floor(lam * x + (1 - lam) * partner + 0.5)``.

    Sampling (``generate``): ``applied = random() < p``, ``lam = beta(alpha, alpha)``, partner within a
    strided ``window`` (as :class:`~fkdstore.augment.mixing.Mixup`). Columns: see the module docstring.
    """

    name = "mixup_exact"

    def columns(self) -> tuple[Column, ...]:
        return (Column("mixup_exact_partner", "index", "int32", ()), Column("mixup_exact_lam", "float", "float32", ()))

    def _draw(self, rng: np.random.Generator, *, image_index: int, num_images: int, **_: Any) -> dict[str, Any]:
        applied, lam, partner = self._draw_mixup(rng, image_index, num_images)
        if not applied:
            return {"mixup_exact_partner": NO_PARTNER, "mixup_exact_lam": 1.0}
        return {"mixup_exact_partner": partner, "mixup_exact_lam": lam}

    def _mix(self, pixels: np.ndarray, other: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        return ops.blend(pixels, other, self.mix_info(params).lam)

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner and the stored float32 ``lam`` (as float64) of one slot."""
        return MixInfo(int(param(params, "mixup_exact_partner")), float(np.float32(param(params, "mixup_exact_lam"))))

    def _check_values(self, columns, *, num_images, **_: Any) -> None:
        partner = _check_partner(self.name, columns, num_images)
        lam = columns["mixup_exact_lam"].astype(np.float64)
        check_range("mixup_exact_lam", lam, 0.0, 1.0)
        if (lam[partner == NO_PARTNER] != 1.0).any():
            raise ValidationError("augment column 'mixup_exact_lam' must be 1.0 for a slot that is not mixed.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CutMixBox(_AlphaMixing):
    """CutMix with a stored partner and an explicit box ``(y1, x1, y2, x2)``: the box comes from the partner.

    Sampling (``generate``): ``applied = random() < p``, ``lam = beta(alpha, alpha)``, ``r_x = integers(0, W)``,
    ``r_y = integers(0, H)``, partner as :class:`~fkdstore.augment.mixing.Mixup`; the stored box is
    :func:`~fkdstore.augment.mixing.cutmix_box` of the drawn float ``lam`` (torchvision v2). Columns: see the
    module docstring.
    """

    name = "cutmix_box"
    alpha: float = 1.0

    def columns(self) -> tuple[Column, ...]:
        return (Column("cutmix_box_partner", "index", "int32", ()), Column("cutmix_box_rect", "int", "uint16", (4,)),
                Column("cutmix_box_lam", "float", "float32", ()))

    def _draw(self, rng: np.random.Generator, *, image_index: int, image_size: tuple[int, int], num_images: int,
              **_: Any) -> dict[str, Any]:
        applied, lam, center, partner = self._draw_cutmix(rng, image_index, image_size, num_images)
        if not applied:
            return {"cutmix_box_partner": NO_PARTNER, "cutmix_box_rect": [0, 0, 0, 0], "cutmix_box_lam": 1.0}
        return {"cutmix_box_partner": partner, "cutmix_box_rect": list(cutmix_box(lam, center, image_size)),
                "cutmix_box_lam": lam}

    def _mix(self, pixels: np.ndarray, other: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        return ops.paste_box(pixels, other, self.box(params, pixels.shape[:2]))

    def box(self, params: Mapping[str, Any], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """The stored box ``(y1, x1, y2, x2)``, checked to lie inside a crop of ``image_size``."""
        y1, x1, y2, x2 = (int(v) for v in param(params, "cutmix_box_rect").reshape(4))
        H, W = image_size
        if not (0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W):
            raise ValidationError(f"cutmix_box_rect (y1={y1}, x1={x1}, y2={y2}, x2={x2}) must satisfy "
                                  f"0 <= y1 <= y2 <= {H} and 0 <= x1 <= x2 <= {W} (the crop's size).")
        return y1, x1, y2, x2

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> MixInfo:
        """Partner and ``lam`` = :func:`~fkdstore.augment.mixing.cutmix_lambda` of the stored box (needs
        ``image_size``)."""
        return _cut_info(self.name, int(param(params, "cutmix_box_partner")), image_size,
                         lambda size: self.box(params, size))

    def _check_values(self, columns, *, num_images, image_size, **_: Any) -> None:
        partner = _check_partner(self.name, columns, num_images)
        rect = columns["cutmix_box_rect"].astype(np.int64)
        lam = columns["cutmix_box_lam"].astype(np.float64)
        check_range("cutmix_box_lam", lam, 0.0, 1.0)
        unmixed = partner == NO_PARTNER
        if (rect[unmixed] != 0).any() or (lam[unmixed] != 1.0).any():
            raise ValidationError("augment columns 'cutmix_box_rect' and 'cutmix_box_lam' must be 0 and 1.0 for a "
                                  "slot that is not mixed.")
        y1, x1, y2, x2 = rect[..., 0], rect[..., 1], rect[..., 2], rect[..., 3]
        if ((y2 < y1) | (x2 < x1)).any():
            raise ValidationError("augment column 'cutmix_box_rect' must hold (y1, x1, y2, x2) with y1 <= y2 and "
                                  "x1 <= x2.")
        if image_size is not None:
            check_range("cutmix_box_rect y2", y2, 0, image_size[0])
            check_range("cutmix_box_rect x2", x2, 0, image_size[1])
