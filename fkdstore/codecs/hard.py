"""``hard``: the argmax class only; decodes to a one-hot vector."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import _array as A
from .base import FieldSpec, LabelCodec, index_dtype


@dataclass(frozen=True, kw_only=True)
class Hard(LabelCodec):
    """Store only the argmax; decode to a one-hot vector (at every temperature)."""

    name: ClassVar[str] = "hard"
    has_probs: ClassVar[bool] = False

    @property
    def kept_classes(self):
        return 1

    def fields(self, num_classes):
        return {"indices": FieldSpec((), index_dtype(num_classes))}

    def _encode(self, p):
        return {"indices": A.argmax(p)}

    def _decode(self, f, num_classes, temperature):
        idx = f["indices"]
        out = A.filled(idx, tuple(idx.shape) + (num_classes,), 0.0)
        ones = A.filled(idx, tuple(idx.shape) + (1,), 1.0)
        return A.scatter_into(out, idx[..., None], ones)

    def kept_mass(self, fields):
        idx = fields["indices"]
        return A.filled(idx, tuple(idx.shape), float("nan"))

    def sum_atol(self, num_classes):
        return 0.0

    def sorted_probs(self, fields, num_classes):
        return np.asarray(fields["indices"]).astype(np.int64)[..., None], None

    def from_sorted(self, indices, probs, num_classes):
        return self._finish({"indices": indices[..., 0]}, num_classes)

    def roles(self):
        return {"indices": "indices_top1"}

    def paper_values_per_crop(self, num_classes):
        return 5 + 1
