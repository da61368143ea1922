"""``logits``: the teacher's output vector, top-K or all of it, decoded at a temperature chosen at load time.

Input: logits ``z`` of shape ``(..., D)`` (``codec.input == "logits"``), any width ``D`` (the store's
``num_classes``): class scores, or a self-supervised teacher's prototype scores. Stored: the
log-probabilities ``l = z - logsumexp(z)`` (``log_softmax`` at T = 1, computed in float64) of

* every output, ``Logits(k=None)`` (field ``logits`` (D,)), or
* the ``k`` largest, descending (fields ``indices`` (k,) and ``logits`` (k,)), ``Logits(k=5)``.

Softmax ignores a shift of all logits, and ``l`` is ``z`` shifted by the row's ``logsumexp``: so nothing a
temperature needs is lost, and the tail mass at T = 1 is exact: ``r = 1 - sum_i exp(l_i)`` over kept ``i``.
(A raw output vector for feature regression is not a label; store it elsewhere.)

Decoding at temperature ``T`` (``decode(fields, C, temperature=T)``), with kept set ``K`` and ``n = C - k``:

* ``k=None``: ``d = softmax(l / T) = softmax(z / T)``, exact up to the storage rounding of ``l``.
* top-K: the tail's logits are unknown; they are taken equal, each ``t = log(r / n)``, which is exact at
  T = 1 and the maximum-entropy choice given ``r``::

      w_i = exp(l_i / T) (i in K),   w_t = exp(t / T),   Z = sum_K w_i + n * w_t
      d_i = w_i / Z (i in K),        d_j = w_t / Z (j not in K)

  So ``d_i / d_j = exp((z_i - z_j) / T)`` exactly for kept ``i, j`` (softmax(z / T) restricted to the kept
  classes and renormalised equals ``d`` restricted and renormalised), at T = 1 ``d`` is MS's distribution
  (eq. (5)) on the stored log-probabilities, and for ``T > 1`` the tail mass is over-estimated (Jensen).
  Stored ``l`` are rounded toward -inf in the storage dtype, so ``sum exp(l_i)`` never exceeds the
  teacher's kept mass and ``r`` is never lost to rounding (``r = 0`` only when the teacher's tail is 0).

This is the general temperature rule of :mod:`fkdstore.codecs.base` applied to the log domain, where it
keeps tiny probabilities that a float16 probability store would flush to 0 (they matter at large T).

Dtypes: ``float16`` (default: ``l`` within ``|l| * 2**-11``, i.e. a relative probability error below
``|l| * 2**-11``: 0.5 % at ``l = -10``), ``float32``, and ``q8`` (the q8 code of ``exp(l)``, one byte; the
bound of :mod:`fkdstore.codecs.quant` applies to each ``exp(l_i)``; with ``k=None`` a code 0 (``exp(l) <
Q8_PMIN``) decodes as in q8 ``full``, :func:`fkdstore.codecs.quant.dequantize_row`, so every class keeps a
probability > 0 and ``KL(teacher || decoded)`` stays finite).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ValidationError
from . import _array as A
from . import quant
from .base import PROB_ATOL, FieldSpec, LabelCodec, check_num_classes, index_dtype, row_sum_atol


@dataclass(frozen=True, kw_only=True)
class Logits(LabelCodec):
    """Top-``k`` (or, ``k=None``, all) log-softmax values of the teacher's logits; see the module docstring."""

    name: ClassVar[str] = "logits"
    input: ClassVar[str] = "logits"
    k: int | None = None
    dtype: str = "float16"

    @classmethod
    def _k_may_be_none(cls):
        return True

    def fields(self, num_classes):
        c = check_num_classes(num_classes)
        if self.k is None:
            return {"logits": FieldSpec((c,), self._value_dtype())}
        if self.k > c:
            raise ValidationError(f"{self.name} needs k <= num_classes, got k={self.k} > num_classes={c}")
        return {"indices": FieldSpec((self.k,), index_dtype(c)), "logits": FieldSpec((self.k,), self._value_dtype())}

    # -- stored values <-> log-probabilities (float64)
    def _store_logp(self, lp):
        # rounded toward -inf, as q8 rounds down: sum(exp(stored)) never exceeds the teacher's kept mass, so
        # the tail residual r of a top-K row is never lost to rounding (it would be 0 with round-to-nearest)
        return quant.quantize(A.exp(lp), PROB_ATOL) if self.quantized else A.cast_down(lp, self.dtype)

    def _load_logp(self, v):
        return quant.dequantize_log(v) if self.quantized else A.f64(v)

    def _encode(self, z):
        z64 = A.f64(z)
        m = A.amax_last(z64)
        logp = z64 - (m + A.log(A.sum_last(A.exp(z64 - m)))[..., None])
        if self.k is None:
            return {"logits": self._store_logp(logp)}
        idx = A.topk_indices(z, self.k)
        return {"indices": idx, "logits": self._store_logp(A.gather(logp, idx))}

    def _decode(self, f, num_classes, temperature):
        if self.k is None and self.quantized:  # zero codes get a share of the missing mass, as q8 ``full``
            lp = A.log(quant.dequantize_row(f["logits"]))
        else:
            lp = self._load_logp(f["logits"])
        if self.k is None or self.k == num_classes:
            m = A.amax_last(lp)
            w = A.exp((lp - A.where(m > -math.inf, m, m * 0)) / temperature)
            s = A.sum_last(w)[..., None]
            d = A.where(s > 0, w / A.where(s > 0, s, s * 0 + 1), w * 0 + 1.0 / lp.shape[-1])
            if self.k is None:
                return A.f32(d)
            out = A.filled(lp, tuple(lp.shape[:-1]) + (num_classes,), 0.0)
            return A.scatter_into(out, f["indices"], A.f32(d))
        n = num_classes - self.k
        r = A.clamp0(1.0 - A.seq_sum_last(A.exp(lp)))[..., None]
        lt = A.log(r / n)
        m = A.amax_last(A.concat_last(lp, lt))
        wk = A.exp((lp - m) / temperature)
        wt = A.exp((lt - m) / temperature)
        z = A.seq_sum_last(wk)[..., None] + n * wt
        out = A.filled(lp, tuple(lp.shape[:-1]) + (num_classes,), A.f32(wt / z))
        return A.scatter_into(out, f["indices"], A.f32(wk / z))

    def kept_mass(self, fields):
        p = A.exp(self._load_logp(fields["logits"]))
        return A.f32(A.sum_last(p) if self.k is None else A.seq_sum_last(p))

    # -- stored-field rules
    def sum_atol(self, num_classes):
        n = num_classes if self.k is None else self.k
        if self.quantized:
            return row_sum_atol("q8", n)
        # a log-probability l is stored within |l| * rel, so sum_i p_i * |l_i| * rel <= log(n) * rel
        rel = {"float16": 2.0**-11, "float32": 2.0**-24}[self.dtype]
        return PROB_ATOL + max(math.log(n), 1.0) * rel

    def _value_problems(self, f, num_classes, add):
        lp = np.asarray(self._load_logp(f["logits"]), np.float64)
        add(f"log-probabilities <= log(1 + {PROB_ATOL}) and not NaN", np.isnan(lp) | (lp > math.log1p(PROB_ATOL)))
        s = np.exp(lp).sum(-1)
        if self.k is None:
            add(f"rows whose probabilities sum to 1 within {self.sum_atol(num_classes):.3g}",
                np.abs(s - 1) > self.sum_atol(num_classes))
        else:
            with np.errstate(invalid="ignore"):
                add("top-K log-probabilities in descending order", np.diff(lp, axis=-1) > 0)
            add(f"top-K mass at most 1 + {self.sum_atol(num_classes):.3g}", s > 1 + self.sum_atol(num_classes))

    # -- conversion
    @property
    def kept_classes(self):
        return self.k

    def sorted_probs(self, fields, num_classes):
        p = np.exp(np.asarray(self._load_logp(np.asarray(fields["logits"])))).astype(np.float32)
        order = np.argsort(-p, axis=-1, kind="stable")
        idx = order if self.k is None else np.take_along_axis(np.asarray(fields["indices"]).astype(np.int64), order, -1)
        return idx, np.take_along_axis(p, order, -1)

    def from_sorted(self, indices, probs, num_classes):
        lp = np.asarray(A.log(np.asarray(probs, np.float64)))
        if self.k is None:
            full = np.full(indices.shape[:-1] + (num_classes,), -np.inf)
            np.put_along_axis(full, indices.astype(np.intp), lp, -1)
            return self._finish({"logits": self._store_logp(full)}, num_classes)
        return self._finish({"indices": indices[..., :self.k], "logits": self._store_logp(lp[..., :self.k])},
                            num_classes)

    # -- reporting
    def roles(self):
        if self.k is None:
            return {"logits": "logits_full" + self._q()}
        return {"indices": "indices_topk", "logits": "logits_topk" + self._q()}

    def paper_values_per_crop(self, num_classes):
        return 5 + (num_classes if self.k is None else 2 * self.k)
