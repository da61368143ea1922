"""PartnerCrop: a mixed slot carries its partner's crop and pre-mix params (imported label sets).

fkdstore's own mixing takes the partner's pixels from the partner image's crop in the SAME slot
(``spec/format-v3.md`` 6.1). Some systems draw the partner's crop independently and store it with the mixed
sample: Apple's ml-dr records, for a mixed sample, the partner's RandomResizedCrop box, flip, RandAugment ops
and RandomErasing box next to its own; SRe2L-style label sets whose epochs do not cover every image map their
records to slots in a way that breaks "same slot". :class:`PartnerCrop` holds those values in the slot itself:

* ``partner_crop_box`` int32 (4,) = (top, left, height, width) of the partner's crop in the partner's SOURCE
  image (all 0 when the slot is not mixed),
* ``partner_crop_flip`` bool,
* ``partner_crop_<column>`` for every column of the non-mixing policies in ``policies`` (the partner's own
  pre-mix params, applied to the partner's crop in that order).

With a PartnerCrop in the pipeline the partner pixels of EVERY mixing policy of a mixed slot ``(i, s)`` with
partner ``j`` are ``premix_pc(crop(image_j, partner_crop_box, partner_crop_flip))``; ``premix_pc`` applies
``policies`` with the ``partner_crop_*`` params. The mixing policies of one slot must name the same partner.
The policy's own pixel step is the identity (it changes nothing of the slot's own image). It holds imported
values only: it cannot be sampled by ``generate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fkdstore.augment.base import Column, Policy, check_pixels, check_range, param
from fkdstore.augment.registry import get_policy
from fkdstore.errors import ValidationError

__all__ = ["PartnerCrop", "PREFIX"]

PREFIX = "partner_crop_"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartnerCrop(Policy):
    """A mixed slot's partner crop and pre-mix params, stored in the slot; see the module docstring.

    ``policies``: the non-mixing policies (objects or configs) the partner's crop went through, in order.
    """

    name = "partner_crop"
    policies: Any = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", _parse_policies(self.policies))

    def get_config(self) -> dict:
        return {"name": self.name, "policies": [p.get_config() for p in self.policies]}

    def columns(self) -> tuple[Column, ...]:
        cols = (Column(PREFIX + "box", "int", "int32", (4,)), Column(PREFIX + "flip", "bool", "bool", ()))
        return cols + tuple(Column(PREFIX + c.name, c.kind, c.dtype, c.shape) for p in self.policies
                            for c in p.columns())

    def _draw(self, rng: np.random.Generator, **_: Any) -> dict[str, Any]:
        raise ValidationError("policy 'partner_crop' holds partner crops imported from another system; it cannot "
                              "be sampled (generate does not take it).")

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        """The slot's own pixels are unchanged (the carried values describe the partner)."""
        return check_pixels(pixels).copy()

    def crop_of(self, params: Mapping[str, Any]) -> tuple[list[int], bool]:
        """The partner's crop box (top, left, height, width) in its source image and its flip."""
        box = [int(v) for v in param(params, PREFIX + "box").reshape(4)]
        return box, bool(param(params, PREFIX + "flip"))

    def premix(self, pixels: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """The partner's pre-mix pixels: ``policies`` applied in order with the ``partner_crop_*`` params."""
        check_pixels(pixels)
        for p in self.policies:
            pixels = p.apply(pixels, {c.name: param(params, PREFIX + c.name) for c in p.columns()})
        return pixels

    def _check_values(self, columns, *, num_images, crops_per_image, image_size) -> None:
        box = columns[PREFIX + "box"].astype(np.int64)
        empty = (box == 0).all(-1)
        top, left, h, w = (box[..., k] for k in range(4))
        check_range("partner_crop_box top and left", np.stack([top, left], -1)[~empty], 0, 2**31 - 1)
        check_range("partner_crop_box height and width", np.stack([h, w], -1)[~empty], 1, 2**31 - 1)
        for p in self.policies:
            sub = {c.name: columns[PREFIX + c.name] for c in p.columns()}
            try:
                p._check_values(sub, num_images=num_images, crops_per_image=crops_per_image, image_size=image_size)
            except ValidationError as e:
                raise ValidationError(f"partner_crop params of policy {p.name!r}: {e}") from None


def _parse_policies(value: Any) -> tuple[Policy, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"policies must be a list of non-mixing policies or their configs. Got {value!r}.")
    out = []
    for p in value:
        p = p if isinstance(p, Policy) else get_policy(p)
        if p.mixing or isinstance(p, PartnerCrop) or getattr(p, "external", False):
            raise ValidationError(f"partner_crop policies must be non-mixing pixel policies. Got {p.name!r}.")
        out.append(p)
    return tuple(out)
