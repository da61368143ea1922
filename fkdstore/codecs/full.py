"""``full``: the whole probability vector (paper eq. (3))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import _array as A
from . import quant
from .base import FieldSpec, LabelCodec, check_num_classes


@dataclass(frozen=True, kw_only=True)
class Full(LabelCodec):
    """Store the whole probability vector in ``dtype``; decode = the stored vector as float32.

    With ``dtype="q8"`` each value is rounded down to the q8 grid (:mod:`fkdstore.codecs.quant`), so a class
    below ``Q8_PMIN`` is stored as code 0. Decoding gives those classes back a share of the missing mass, so
    ``KL(teacher || decoded)`` stays finite (rounding to 0 and renormalising would make it infinite for
    nearly every crop of a 1000-class teacher). With ``S`` the sum of the stored values, ``r = max(1 - S, 0)``
    the missing mass and ``n0`` the number of zero-coded classes, each zero-coded class decodes to::

        e = clip(r / n0, Q8_PMIN * 2**-10, Q8_PMIN / 2)      (before normalising)

    i.e. the missing mass spread evenly over the zero-coded classes (as ``ms`` spreads its tail), but never
    more than half of ``Q8_PMIN`` (the midpoint of the interval ``[0, Q8_PMIN)`` their true values lie in;
    the rest of the missing mass is rounding of the coded classes, which the normalisation gives back to
    them in proportion) and never 0. The row is then normalised: ``d = (p_hat + e * [code == 0]) / (S + n0 * e)``.
    Error bound for a teacher row summing to at most 1 (``D = S + n0 * e``, so
    ``S <= D <= max(1, S + n0 * Q8_ZERO_MIN)``): a coded class decodes to ``d_i = p_hat_i / D``, so
    ``(p_i - q8_bound(p_i)) / (1 + C * Q8_ZERO_MIN) <= d_i <= p_i / S``; a zero-coded class
    (``p_j < Q8_PMIN``) decodes to ``0 < e / D <= Q8_PMIN / (2 * S)``. Every ``d > 0``, so
    ``KL(teacher || decoded)`` is finite for every row. Every sum is exact in float64 (float32 table values), so
    numpy and torch agree bit for bit. A row whose values all round to 0 decodes uniform.
    (:func:`fkdstore.codecs.quant.dequantize_row`, shared with ``logits`` with ``k=None``.)
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
        return A.f32(quant.dequantize_row(f["probs"]))

    def _value_problems(self, f, num_classes, add):
        super()._value_problems(f, num_classes, add)
        s = self._load_probs(f["probs"]).astype(np.float64).sum(-1)
        if self.quantized:
            add("rows with stored mass in (0, 1]", (s <= 0) | (s > 1 + self.sum_atol(num_classes)))
        else:
            atol = self.sum_atol(num_classes)
            add(f"rows summing to 1 within {atol:.3g}", np.abs(s - 1) > atol)

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
