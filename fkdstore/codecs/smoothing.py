"""``smoothing``: argmax and its probability, the rest spread uniformly (paper eq. (4))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import _array as A
from .base import FieldSpec, LabelCodec, index_dtype


@dataclass(frozen=True, kw_only=True)
class Smoothing(LabelCodec):
    """Eq. (4): argmax and p_max; decode ``p_max`` there and ``(1 - p_max) / (C - 1)`` elsewhere."""

    name: ClassVar[str] = "smoothing"
    dtype: str = "float16"

    @property
    def kept_classes(self):
        return 1

    def fields(self, num_classes):
        return {"indices": FieldSpec((), index_dtype(num_classes)), "probs": FieldSpec((), self._value_dtype())}

    def _encode(self, p):
        idx = A.argmax(p)
        return {"indices": idx, "probs": self._store_probs(A.gather(p, idx[..., None])[..., 0])}

    def _decode1(self, f, num_classes):
        idx, pm = f["indices"], self._load_probs(f["probs"])[..., None]
        other = A.clamp0(1.0 - pm) / max(num_classes - 1, 1)
        out = A.filled(pm, tuple(pm.shape[:-1]) + (num_classes,), other)
        return A.scatter_into(out, idx[..., None], pm)

    def kept_mass(self, fields):
        return self._load_probs(fields["probs"])

    def sorted_probs(self, fields, num_classes):
        idx = np.asarray(fields["indices"]).astype(np.int64)[..., None]
        return idx, np.asarray(self._load_probs(np.asarray(fields["probs"])), np.float32)[..., None]

    def from_sorted(self, indices, probs, num_classes):
        return self._finish({"indices": indices[..., 0], "probs": self._store_probs(probs[..., 0])}, num_classes)

    def roles(self):
        return {"indices": "indices_top1", "probs": "probs_top1" + self._q()}

    def paper_values_per_crop(self, num_classes):
        return 5 + 2
