"""ExternalSeed: the slot's pixels are another library's pipeline run from a stored seed (TinyViT, timm).

TinyViT (microsoft/Cream) stores, per sample, a 4-byte seed that re-runs its whole timm augmentation
pipeline (RandomResizedCrop, flip, RandAugment with magnitude noise, colour jitter, RandomErasing) from
``numpy.random.Generator(PCG64(seed))``, and mixes each pair of samples with the seed ``seed_a ^ seed_b``.
fkdstore has no implementation of those ops and cannot reproduce that generator's call order, so it stores
the seeds and refuses to replay the pixels itself: :class:`~fkdstore.TorchDataset` needs the user's own
replay function (``external_replay=``), the labels load as usual.

Columns: ``external_seed`` int32 (the slot's seed), ``external_partner`` int32 (the image the slot was mixed
with, -1 when the pipeline does not mix), ``external_partner_seed`` int32 (the partner's seed in that pair, 0
when not mixed). The config names the replay: ``library`` (e.g. ``"timm"``), ``pipeline`` (which pipeline of
that library, in words), ``rng`` (how the seed seeds it) and ``pair_rule`` (how a mixed pair's seed is made,
e.g. ``"seed_a ^ seed_b"``; empty when not mixed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fkdstore.augment.base import Column, Policy, check_range
from fkdstore.errors import ExternalReplayError, ValidationError

__all__ = ["ExternalSeed"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExternalSeed(Policy):
    """Seeds of another library's augmentation pipeline; see the module docstring."""

    name = "external_seed"
    external: ClassVar[bool] = True
    library: str = ""
    pipeline: str = ""
    rng: str = ""
    pair_rule: str = ""

    def __post_init__(self) -> None:
        for f in ("library", "pipeline", "rng", "pair_rule"):
            if not isinstance(getattr(self, f), str):
                raise TypeError(f"{f} must be a str. Got {type(getattr(self, f)).__name__}.")
        if not self.library:
            raise ValidationError("library must name the library whose pipeline the seeds replay. Got ''.")

    def columns(self) -> tuple[Column, ...]:
        return (Column("external_seed", "int", "int32", ()), Column("external_partner", "index", "int32", ()),
                Column("external_partner_seed", "int", "int32", ()))

    def describe(self) -> str:
        """One line: which replay the pixels need."""
        pair = f"; mixed pairs seeded by {self.pair_rule}" if self.pair_rule else ""
        return (f"external replay: {self.library} ({self.pipeline or 'pipeline not named'}) from the stored "
                f"seed ({self.rng or 'rng not named'}){pair}; fkdstore cannot replay these pixels")

    def _draw(self, rng: np.random.Generator, **_: Any) -> dict[str, Any]:
        raise ValidationError("policy 'external_seed' holds seeds of another library's pipeline; it cannot be "
                              "sampled (generate does not take it).")

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        raise ExternalReplayError(f"{self.describe()}. Pass your own replay (TorchDataset(external_replay=...)).")

    def _check_values(self, columns, *, num_images, **_: Any) -> None:
        check_range("external_partner", columns["external_partner"].astype(np.int64), -1, num_images - 1)
