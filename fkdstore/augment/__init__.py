"""Augmentation policies: sampled per slot from ``(seed, image, slot)``, stored, replayed pixel-exactly.

numpy + Pillow only (no torch import). Built in (registry names): ``color_jitter``, ``randaugment``,
``random_erasing``, ``random_grayscale``, ``gaussian_blur``, ``mixup``, ``cutmix``, ``mix`` (Mixup or CutMix per
slot, with a switch probability), ``mixup_exact`` and ``cutmix_box`` (float ``lam`` / explicit box, as other
systems store them), and for imported label sets ``partner_crop`` (partner crops carried in the slot) and
``external_seed`` (seeds of another library's pipeline, not replayable here); the crop stage (RandomResizedCrop +
flip, :class:`fkdstore.seeded.SlotCropSampler`) always runs first. See ``spec/format-v4.md`` section 6 for the
columns and the replay equations, and :mod:`fkdstore.augment.base` for the policy contract.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fkdstore.augment.base import Column, Policy, slot_rng
from fkdstore.augment.batch import BatchMix, mix_batch
from fkdstore.augment.blur import GaussianBlur
from fkdstore.augment.color import ColorJitter
from fkdstore.augment.crop import crop
from fkdstore.augment.erasing import RandomErasing, mean_fill
from fkdstore.augment.external import ExternalSeed
from fkdstore.augment.grayscale import RandomGrayscale
from fkdstore.augment.mix import Mix
from fkdstore.augment.mixing import CutMix, MixInfo, Mixup, cutmix_box, cutmix_lambda, window_stride
from fkdstore.augment.mixing_exact import CutMixBox, MixupExact
from fkdstore.augment.partner import PartnerCrop
from fkdstore.augment.pipeline import Pipeline, slot_params
from fkdstore.augment.randaugment import RandAugment
from fkdstore.augment.registry import get_policy, register_policy, registered_policies
from fkdstore.errors import ValidationError

for _cls in (ColorJitter, RandAugment, RandomErasing, RandomGrayscale, GaussianBlur, Mixup, CutMix, Mix, MixupExact,
             CutMixBox, PartnerCrop, ExternalSeed):
    register_policy(_cls)

__all__ = [
    "Column", "Policy", "Pipeline", "ColorJitter", "RandAugment", "RandomErasing", "RandomGrayscale", "GaussianBlur",
    "Mixup", "CutMix", "Mix", "MixInfo", "MixupExact", "CutMixBox", "PartnerCrop", "ExternalSeed",
    "BatchMix", "crop", "cutmix_box", "cutmix_lambda", "get_policy", "mean_fill", "mix_batch",
    "parse_augment", "register_policy", "registered_policies", "slot_params", "slot_rng", "window_stride",
]


def parse_augment(spec: str | Sequence[Mapping[str, Any]] | Mapping[str, Any] | Pipeline | None) -> Pipeline:
    """Build a :class:`Pipeline` from a readable spec string, JSON, a list of configs or a Pipeline.

    Grammar of the string form (whitespace around tokens is ignored)::

        spec   := "" | policy (";" policy)*
        policy := name [":" arg ("," arg)*]
        arg    := key "=" value
        value  := a JSON literal (2, 0.5, true, null, [0.02,0.33]) or a bare word taken as a string (random)

    Example: ``"randaugment:num_ops=2,magnitude=9;mixup:alpha=0.2,p=0.5;cutmix:alpha=1.0"``.
    Names: ``color_jitter`` (brightness, contrast, saturation, hue), ``randaugment`` (num_ops, magnitude,
    num_magnitude_bins, interpolation, fill), ``random_erasing`` (p, scale, ratio, value: a colour, ``random``
    or ``mean``), ``random_grayscale`` (p), ``gaussian_blur`` (kernel_size, sigma, p), ``mixup`` (alpha, p,
    window), ``cutmix`` (alpha, p, window), ``mix`` (mixup_alpha, cutmix_alpha, switch_prob, p, window: Mixup or
    CutMix per slot, CutMix with probability switch_prob, as timm's ``mixup 0.8 cutmix 1.0 switch_prob 0.5``);
    ``window``: partners are drawn among about that many images spread over the dataset (default 4096; 0 = all
    images). Mixing policies must come last. A string starting with ``[`` or ``{`` is JSON: a list of policy
    configs (``[{"name": "mixup", "alpha": 0.2}]``) or one config.
    """
    if spec is None:
        return Pipeline()
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, Mapping):
        return Pipeline([get_policy(spec)])
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith(("[", "{")):
            try:
                return parse_augment(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValidationError(f"augment spec must be valid JSON when it starts with '[' or '{{'. "
                                      f"Got {exc}.") from None
        return Pipeline([get_policy(_parse_policy(part)) for part in _split(text, ";") if part.strip()])
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return Pipeline.from_config(spec)
    raise TypeError(f"augment spec must be a str, a list of configs or a Pipeline. Got {type(spec).__name__}.")


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _parse_policy(part: str) -> dict[str, Any]:
    name, _, args = part.partition(":")
    cfg: dict[str, Any] = {"name": name.strip()}
    for arg in _split(args, ",") if args.strip() else []:
        key, eq, value = arg.partition("=")
        key = key.strip()
        if ":" in key:
            head = key.partition(":")[0].strip()
            fixed = re.sub(r",\s*" + re.escape(key), ";" + key, part.strip())
            raise ValidationError(
                f"augment spec keys must be field names. Got {key!r} in {part.strip()!r}: separate policies with "
                f"';', not ','" + (f" (e.g. {fixed!r})." if head in registered_policies() else "."))
        if not eq or not key:
            raise ValidationError(f"augment spec arguments must be key=value. Got {arg.strip()!r} in {part.strip()!r}.")
        if key in cfg:
            raise ValidationError(f"augment spec keys must be unique per policy. "
                                  f"Got {key!r} twice in {part.strip()!r}.")
        cfg[key] = _parse_value(value.strip())
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
