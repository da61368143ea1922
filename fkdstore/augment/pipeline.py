"""Pipeline: the ordered list of policies applied after the crop (config = list of policy configs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from fkdstore.augment.base import Column, Policy, check_pixels
from fkdstore.augment.external import ExternalSeed
from fkdstore.augment.mixing import MixInfo, MixingPolicy
from fkdstore.augment.partner import PartnerCrop
from fkdstore.augment.registry import get_policy
from fkdstore.errors import ValidationError

__all__ = ["Pipeline", "slot_params"]


def slot_params(params: Mapping[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    """Row ``j`` of every column of a ``sample``/store result: one slot's params."""
    return {k: np.asarray(v)[j] for k, v in params.items()}


class Pipeline:
    """Policies applied in order to the crop; mixing policies (Mixup, CutMix) must come last.

    Replay of slot ``s`` of image ``i`` (what the teacher saw and what training replays)::

        x = crop(image_i, box[i, s], flip[i, s])              # fkdstore.transforms.crop_resize
        x = premix(x, params[i, s])                           # every non-mixing policy, in order
        for each mixing policy P (in order), with j = P's partner of (i, s), if j != -1:
            y = premix(crop(image_j, box[j, s], flip[j, s]), params[j, s])    # the partner's SAME slot s
            x = P.apply(x, params[i, s], partner=y)

    With a ``partner_crop`` policy the partner's pixels are instead carried by the slot itself
    (``premix_pc(crop(image_j, partner_crop_box, partner_crop_flip))``, :mod:`fkdstore.augment.partner`). An
    ``external_seed`` policy (the only policy of its pipeline) cannot be replayed here
    (:mod:`fkdstore.augment.external`).

    Config: ``[policy.get_config() for policy in policies]`` (``[]`` = crop and flip only).
    """

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        policies = tuple(policies)
        for p in policies:
            if not isinstance(p, Policy):
                raise TypeError(f"pipeline entries must be augment policies. Got {type(p).__name__}.")
        seen_mixing = None
        for p in policies:
            if p.mixing:
                seen_mixing = p
            elif seen_mixing is not None:
                raise ValidationError(
                    f"mixing policies must come after all other policies. Got {p.name!r} after {seen_mixing.name!r}."
                )
        names: set[str] = set()
        for c in (c for p in policies for c in p.columns()):
            if c.name in names:
                raise ValidationError(f"augment column names must be unique in a pipeline. Got {c.name!r} twice.")
            names.add(c.name)
        for attr, what in (("partner_crop", "partner_crop"), ("external", "external_seed")):
            found = [p.name for p in policies if _is(p, attr)]
            if len(found) > 1:
                raise ValidationError(f"a pipeline may hold at most one {what} policy. Got {found}.")
        if any(_is(p, "external") for p in policies) and len(policies) > 1:
            raise ValidationError(f"an external_seed policy replays the whole pipeline of another library and "
                                  f"must be the only policy. Got {[p.name for p in policies]}.")
        self.policies: tuple[Policy, ...] = policies

    # -- config habits ------------------------------------------------------------------------------
    def get_config(self) -> list[dict]:
        return [p.get_config() for p in self.policies]

    @classmethod
    def from_config(cls, cfg: Sequence[Mapping[str, Any]]) -> Pipeline:
        if isinstance(cfg, (str, bytes, Mapping)) or not isinstance(cfg, Sequence):
            raise TypeError(f"pipeline config must be a list of policy configs. Got {type(cfg).__name__}.")
        return cls(get_policy(c) for c in cfg)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(self.policies)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(p) for p in self.policies)}])"

    def __len__(self) -> int:
        return len(self.policies)

    # -- columns and sampling -----------------------------------------------------------------------
    def columns(self) -> tuple[Column, ...]:
        """All policies' columns, in pipeline order (names unique)."""
        return tuple(c for p in self.policies for c in p.columns())

    @property
    def mixing(self) -> tuple[MixingPolicy, ...]:
        """The mixing policies (``mixing = True``: :class:`~fkdstore.augment.mixing.MixingPolicy`), in order."""
        return tuple(cast(MixingPolicy, p) for p in self.policies if p.mixing)

    @property
    def partner_crop(self) -> PartnerCrop | None:
        """The :class:`~fkdstore.augment.partner.PartnerCrop` policy (partner crops carried in the slot), or
        None: partners are then the partner image's crop in the same slot."""
        return next((cast(PartnerCrop, p) for p in self.policies if _is(p, "partner_crop")), None)

    @property
    def external(self) -> ExternalSeed | None:
        """The :class:`~fkdstore.augment.external.ExternalSeed` policy (pixels need another library's
        replay), or None."""
        return next((cast(ExternalSeed, p) for p in self.policies if _is(p, "external")), None)

    def sample(self, seed: int, image_index: int, slots: Sequence[int] | np.ndarray, *, image_size: Sequence[int],
               num_images: int, crops_per_image: int) -> dict[str, np.ndarray]:
        """Every policy's params for ``slots`` (each policy draws from its own stream; see ``Policy.sample``)."""
        out: dict[str, np.ndarray] = {}
        for p in self.policies:
            out.update(p.sample(seed, image_index, slots, image_size=image_size, num_images=num_images,
                                crops_per_image=crops_per_image))
        return out

    # -- replay ---------------------------------------------------------------------------------------
    def premix(self, pixels: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """Every non-mixing policy, in order: the pixels a slot contributes when it is someone's partner."""
        check_pixels(pixels)
        for p in self.policies:
            if not p.mixing:
                pixels = p.apply(pixels, params)
        return pixels

    def partners(self, params: Mapping[str, Any]) -> dict[str, int]:
        """``{policy name: partner image}`` of the mixing policies that mix this slot (partner slot = this slot)."""
        out = {}
        for p in self.mixing:
            j = p.partner_of(params)
            if j is not None:
                out[p.name] = j
        return out

    def mix_info(self, params: Mapping[str, Any], image_size: tuple[int, int]) -> dict[str, MixInfo]:
        """``{policy name: MixInfo}`` of every mixing policy for one slot (lam 1.0 / partner -1 if unmixed)."""
        return {p.name: p.mix_info(params, image_size) for p in self.mixing}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *,
              partners: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Replay one slot on its crop ``pixels``; ``partners[name]`` = that policy's partner pre-mix pixels."""
        partners = dict(partners or {})
        x = self.premix(pixels, params)
        for p in self.mixing:
            x = p.apply(x, params, partner=partners.get(p.name))
        return x

    def validate(self, columns: Mapping[str, Any], *, num_images: int, crops_per_image: int,
                 image_size: Sequence[int] | None = None) -> None:
        """Check stored columns of every policy (see ``Policy.validate``); extra columns are refused."""
        known = {c.name for c in self.columns()}
        extra = sorted(set(columns) - known)
        if extra:
            raise ValidationError(f"augment columns must be declared by the pipeline's policies. Got unknown {extra}.")
        for p in self.policies:
            p.validate(columns, num_images=num_images, crops_per_image=crops_per_image, image_size=image_size)
        if self.partner_crop is not None and len(self.mixing) > 1:
            # one carried partner crop per slot: every policy that mixes a slot must name the same partner
            partners = np.stack([np.asarray(columns[f"{p.name}_partner"]).astype(np.int64) for p in self.mixing])
            named = np.where(partners >= 0, partners, partners.max(0))
            if ((partners >= 0) & (named != named.max(0))).any():
                raise ValidationError("augment columns '*_partner' of one slot must name the same partner image "
                                      "when the pipeline carries partner crops (partner_crop).")


def _is(policy: Policy, attr: str) -> bool:
    """``policy`` is a PartnerCrop (``attr="partner_crop"``) or an ExternalSeed (``"external"``)."""
    if attr == "partner_crop":
        return policy.name == "partner_crop"
    return bool(getattr(policy, "external", False))
