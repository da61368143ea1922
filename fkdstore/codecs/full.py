"""``full``: the whole probability vector (paper eq. (3))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import _array as A
from .base import FieldSpec, LabelCodec, check_num_classes


@dataclass(frozen=True, kw_only=True)
class Full(LabelCodec):
    """Store the whole probability vector in ``dtype``; decode = the stored vector as float32.

    With ``dtype="q8"`` each value is rounded down to the q8 grid (:mod:`fkdstore.codecs.quant`) and decode
    renormalises the row (``p_hat / sum(p_hat)``; the float64 sum of float32 table values is exact, so numpy
    and torch agree bit for bit); a row whose values all round to 0 decodes uniform.
    """

    name: ClassVar[str] = "full"
    dtype: str = "float16"

    @property
    def kept_classes(self):
        return None

    def fields(self, num_classes):
        return {"probs": FieldSpec((check_num_classes(num_classes),), self._value_dtype())}

    def _encode(self, p):
        return {"probs": self._store_probs(A.copy(p))}  # never alias the caller's array

    def _decode1(self, f, num_classes):
        p = self._load_probs(f["probs"])
        if not self.quantized:
            return p
        p64 = A.f64(p)
        s = A.sum_last(p64)[..., None]
        return A.f32(A.where(s > 0, p64 / A.where(s > 0, s, s * 0 + 1), p64 * 0 + 1.0 / num_classes))

    def _value_problems(self, f, num_classes, add):
        super()._value_problems(f, num_classes, add)
        s = self._load_probs(f["probs"]).astype(np.float64).sum(-1)
        if self.quantized:
            add("rows with stored mass in (0, 1]", (s <= 0) | (s > 1 + self.sum_atol(num_classes)))
        else:
            add(f"rows summing to 1 within {self.sum_atol(num_classes):.3g}", np.abs(s - 1) > self.sum_atol(num_classes))

    def sorted_probs(self, fields, num_classes):
        p = np.asarray(self._load_probs(np.asarray(fields["probs"])), np.float32)
        idx = np.argsort(-p, axis=-1, kind="stable")
        return idx, np.take_along_axis(p, idx, -1)

    def from_sorted(self, indices, probs, num_classes):
        out = np.zeros(indices.shape[:-1] + (num_classes,), np.float32)
        np.put_along_axis(out, indices.astype(np.intp), probs, -1)
        return self._finish({"probs": self._store_probs(out)}, num_classes)

    def roles(self):
        return {"probs": "probs_full" + self._q()}

    def paper_values_per_crop(self, num_classes):
        return 5 + num_classes
