"""``ms`` and ``mr``: the top-K classes and their raw teacher probabilities (paper eqs. (5)-(7)).

Both store the same fields (the top-K indices and probabilities, descending, so ``kept_mass`` is
meaningful and either converts to the other); they differ only in decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ValidationError
from . import _array as A
from .base import FieldSpec, LabelCodec, check_num_classes, index_dtype


@dataclass(frozen=True, kw_only=True)
class _TopK(LabelCodec):
    k: int = 5
    dtype: str = "float16"

    def fields(self, num_classes):
        c = check_num_classes(num_classes)
        if self.k > c:
            raise ValidationError(f"{self.name} needs k <= num_classes, got k={self.k} > num_classes={c}")
        return {"indices": FieldSpec((self.k,), index_dtype(c)), "probs": FieldSpec((self.k,), self._value_dtype())}

    def _encode(self, p):
        idx = A.topk_indices(p, self.k)
        return {"indices": idx, "probs": self._store_probs(A.gather(p, idx))}

    def _value_problems(self, f, num_classes, add):
        super()._value_problems(f, num_classes, add)
        pf = np.asarray(self._load_probs(f["probs"]), np.float32)
        add("top-K probabilities in descending order", np.diff(pf, axis=-1) > 0)
        add(f"top-K mass at most 1 + {self.sum_atol(num_classes):.3g}",
            pf.astype(np.float64).sum(-1) > 1 + self.sum_atol(num_classes))

    def sorted_probs(self, fields, num_classes):
        idx = np.asarray(fields["indices"]).astype(np.int64)
        p = np.asarray(self._load_probs(np.asarray(fields["probs"])), np.float32)
        # stored descending; a stable sort keeps the stored order of equal values (the encoder's tie rule)
        order = np.argsort(-p, axis=-1, kind="stable")
        return np.take_along_axis(idx, order, -1), np.take_along_axis(p, order, -1)

    def from_sorted(self, indices, probs, num_classes):
        return self._finish({"indices": indices[..., :self.k], "probs": self._store_probs(probs[..., :self.k])},
                            num_classes)

    def roles(self):
        return {"indices": "indices_topk", "probs": "probs_topk" + self._q()}

    def paper_values_per_crop(self, num_classes):
        return 5 + 2 * self.k



@dataclass(frozen=True, kw_only=True)
class MarginalSmoothing(_TopK):
    """Eq. (5): top-k kept; the residual 1 - sum(top-k) spread uniformly over the other C - k classes."""

    name: ClassVar[str] = "ms"

    def _decode1(self, f, num_classes):
        idx, pk = f["indices"], self._load_probs(f["probs"])
        rest = A.clamp0(1.0 - A.seq_sum_last(pk))[..., None] / max(num_classes - self.k, 1)
        out = A.filled(pk, tuple(pk.shape[:-1]) + (num_classes,), rest)
        return A.scatter_into(out, idx, pk)


@dataclass(frozen=True, kw_only=True)
class MarginalReNorm(_TopK):
    """Eqs. (6)-(7): top-k divided by their sum, zero elsewhere (uniform over top-k if they sum to 0)."""

    name: ClassVar[str] = "mr"

    def _decode1(self, f, num_classes):
        idx, pk = f["indices"], self._load_probs(f["probs"])
        s = A.seq_sum_last(pk)[..., None]
        if A.is_torch(pk):
            torch = A.torch_module()
            vals = torch.where(s > 0, pk / torch.where(s > 0, s, torch.ones_like(s)), 1.0 / self.k)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                vals = np.where(s > 0, pk / np.where(s > 0, s, 1), np.float32(1.0 / self.k)).astype(np.float32)
        out = A.filled(pk, tuple(pk.shape[:-1]) + (num_classes,), 0.0)
        return A.scatter_into(out, idx, vals)

