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

Tail statistic (``tail="mean"``, top-K only): field ``tail_mean`` () holds ``mu``, the mean log-probability
of the ``n = C - k`` tail classes, ``(1/n) sum_j l_j`` (float64, rounded toward -inf into ``float32`` when
``dtype`` is float32, else ``float16``, also for q8 stores). With ``a = 1 / T``, ``W = sum_j exp(a l_j)`` the
tail's unnormalised mass at ``T``, ``W_u = n (r / n) ** a`` (all tail logits equal: the rule above) and
``D = log(r / n) - mu >= 0`` (Jensen's gap of the tail at T = 1)::

    log W = log W_u - a (1 - a) D                  (decode, T != 1; clipped into the interval below)

(exact for a flat tail, ``D = 0``, and for a Gaussian tail of logits in the limit of many classes, where
``log W(a) = log n + a mu + a**2 sigma**2 / 2`` and ``D = sigma**2 / 2``), spread evenly over the tail (each
tail class ``W / n``), with the kept ``w_i = exp(a l_i)``. **Error bound.** ``log W(a)`` is convex in ``a``,
``log n + a mu`` is its tangent at ``a = 0`` (Jensen: ``W >= n exp(a mu)`` for every ``a > 0``) and, for
``a <= 1``, ``log W_u`` bounds it from above (power means: ``(mean y**a)**(1/a) <= mean y``). So for ``T >= 1``::

    log W_u - a D  <=  log W  <=  log W_u,      |log W_decoded - log W| <= delta_T = a D max(a, 1 - a)

and ``delta_T = 0`` at ``T = 1`` (``W = r``). The tail mass ``rho`` of ``softmax(z / T)`` then satisfies
``|logit(rho_decoded) - logit(rho)| <= delta_T`` (``logit rho = log W - log sum_K exp(a l_i)``, the kept sum
being the same), so ``|rho_decoded - rho| <= tanh(delta_T / 4)``, and every kept class is within a factor
``exp(+-delta_T)`` of its value. ``delta_T`` is per crop (:meth:`Logits.tail_bound`): e.g. ``0.25 D`` at T = 2,
``0.19 D`` at T = 4 and ``0.0475 D`` at T = 20. For ``T < 1`` (``a > 1``) the decode uses the same formula
(``>= W_u``, the lower bound there) and the upper bound is the extreme point ``W_v`` below; the bound is the
larger distance. The bounds hold for the stored values taken as exact: ``mu`` and the kept values are
rounded toward -inf, which keeps both bounds valid, and the kept sum's own rounding adds at most ``a`` times one
storage step of the smallest kept ``l`` (the rounding that already affects ``T = 1``).

Without ``tail_mean`` (stores written before it, ``tail=None``) the decode is unchanged, ``W = W_u``, and
:meth:`Logits.tail_bound` gives its bound ``|log W_u - log W_v|``, where ``W_v`` is the extreme point with
as many tail classes as possible at ``e**h`` and the rest at 0 (``h``: the smallest kept log-probability plus
one storage step; ``n1 = min(floor(r / e**h), n - 1)``, ``v = min(r - n1 e**h, e**h)``,
``W_v = n1 e**(a h) + v**a``): ``W`` lies between ``W_v`` and ``W_u`` (Karamata: ``y -> y**a`` is concave for
``T > 1``, convex for ``T < 1``).

Centred logits (``centred=True``, ``k=None``, float16/float32): the stored row is ``c = z - max(z)`` instead
of ``z - logsumexp(z)``. Decoding (``softmax(c / T)``) is the same; the values lie nearer 0, where a float
has finer steps: for a self-supervised head read at ``T = 0.1 - 0.2`` (an error in ``l`` is multiplied by
``1 / T``) float16 ``l`` near -5 steps 2**-8 while ``c`` within ``[-1, 0)`` steps at most 2**-11.

Low temperatures: a ``q8`` logits store refuses ``decode(temperature=T)`` for ``T < 1`` (ValidationError):
its 9.05 % relative error in each probability becomes ``1.0905 ** (1 / T) - 1`` (54 % at T = 0.2).

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
from .base import PROB_ATOL, FieldSpec, LabelCodec, check_num_classes, index_dtype, parse_temperature, row_sum_atol

TAIL_STATS = (None, "mean")
#: upper bound of one storage step of a stored log-probability ``l`` < 0: relative (float) or absolute (q8)
_STEP_REL = {"float16": 2.0**-10, "float32": 2.0**-23}


@dataclass(frozen=True, kw_only=True)
class Logits(LabelCodec):
    """Top-``k`` (or, ``k=None``, all) log-softmax values of the teacher's logits; see the module docstring."""

    name: ClassVar[str] = "logits"
    input: ClassVar[str] = "logits"
    k: int | None = None
    dtype: str = "float16"
    tail: str | None = None
    centred: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tail is not None and not isinstance(self.tail, str):
            raise TypeError(f"Logits.tail must be None or a str, got {type(self.tail).__name__}")
        if self.tail not in TAIL_STATS:
            raise ValidationError(f"Logits.tail must be one of {TAIL_STATS}, got {self.tail!r}")
        if self.tail is not None and self.k is None:
            raise ValidationError(f"Logits.tail applies to top-K stores (k set); k=None stores every logit. "
                                  f"Got tail={self.tail!r} with k=None.")
        if not isinstance(self.centred, (bool, np.bool_)):
            raise TypeError(f"Logits.centred must be a bool, got {type(self.centred).__name__}")
        object.__setattr__(self, "centred", bool(self.centred))
        if self.centred and (self.k is not None or self.quantized):
            raise ValidationError(f"Logits.centred stores z - max(z) of every output in float16/float32 (k=None, "
                                  f"no q8: q8 codes are probabilities). Got k={self.k}, dtype={self.dtype!r}.")

    @classmethod
    def _k_may_be_none(cls):
        return True

    def fields(self, num_classes):
        c = check_num_classes(num_classes)
        if self.k is None:
            return {"logits": FieldSpec((c,), self._value_dtype())}
        if self.k > c:
            raise ValidationError(f"{self.name} needs k <= num_classes, got k={self.k} > num_classes={c}")
        out = {"indices": FieldSpec((self.k,), index_dtype(c)), "logits": FieldSpec((self.k,), self._value_dtype())}
        if self.tail == "mean":
            out["tail_mean"] = FieldSpec((), "float32" if self.dtype == "float32" else "float16")
        return out

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
        if self.centred:
            return {"logits": self._store_logp(z64 - m)}
        logp = z64 - (m + A.log(A.sum_last(A.exp(z64 - m)))[..., None])
        if self.k is None:
            return {"logits": self._store_logp(logp)}
        idx = A.topk_indices(z, self.k)
        out = {"indices": idx, "logits": self._store_logp(A.gather(logp, idx))}
        if self.tail == "mean":
            n = z.shape[-1] - self.k
            rest = A.sum_last(A.scatter_into(A.copy(logp), idx, A.filled(logp, tuple(idx.shape), 0.0, "float64")))
            out["tail_mean"] = A.cast_down(rest / max(n, 1), self.fields(z.shape[-1])["tail_mean"].dtype)
        return out

    def check_temperature(self, temperature) -> float:
        t = parse_temperature(temperature)
        if self.quantized and t < 1.0:
            raise ValidationError(
                f"a q8 logits store must not be decoded at temperature < 1: q8's 9.05 % relative error per "
                f"probability grows to 1.0905**(1/T) - 1. Got temperature={t:g}; store float16 or "
                f"float32 logits (centred=True for a self-supervised head) to read at T < 1.")
        return t

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
        if self.tail == "mean" and temperature != 1.0:
            _, lw, _ = self._tail_interval(f, lp, r, n, 1.0 / temperature)
            lt = A.where(r > 0, (lw - math.log(n)) * temperature, lt)  # the per-class logit at T = 1 giving W
        m = A.amax_last(A.concat_last(lp, lt))
        wk = A.exp((lp - m) / temperature)
        wt = A.exp((lt - m) / temperature)
        z = A.seq_sum_last(wk)[..., None] + n * wt
        out = A.filled(lp, tuple(lp.shape[:-1]) + (num_classes,), A.f32(wt / z))
        return A.scatter_into(out, f["indices"], A.f32(wk / z))

    # -- tail statistic
    def _tail_interval(self, f, lp, r, n: int, a: float):
        """``(log W_lo, log W_decoded, log W_hi)`` of the tail at ``a = 1 / T``, each (..., 1) float64 (module
        docstring). Without ``tail_mean``, or where ``mu`` is not finite, the decode is ``W_u`` and the interval
        is the extreme-point one."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lr = A.log(r)
            lw_u = math.log(n) + a * (lr - math.log(n))
            lw_v = self._extreme_point(lp, r, n, a)
            lo, hi = (lw_v, lw_u) if a <= 1 else (lw_u, lw_v)
            if self.tail != "mean":
                return lo, lw_u, hi
            mu = A.f64(f["tail_mean"])[..., None]
            gap = A.clamp0(lr - math.log(n) - mu)  # D >= 0 (stored mu is rounded down)
            ok = (mu > -math.inf) & (gap < math.inf)
            gap = A.where(ok, gap, gap * 0)
            lw = A.where(ok, lw_u - a * (1 - a) * gap, lw_u)
            if a <= 1:
                lo = A.where(ok, A.maximum(lo, lw_u - a * gap), lo)
            return lo, A.minimum(A.maximum(lw, lo), hi), hi  # the estimate, clipped into the interval

    def _extreme_point(self, lp, r, n: int, a: float):
        """``log W_v``: as many tail classes as possible at ``e**h`` (``h`` the smallest kept log-probability plus
        one storage step, at most ``log r``), one at the remainder ``v``, the rest at 0."""
        lk = lp[..., -1:]
        if self.quantized:  # a q8 code lies within one log-odds step (<= Q8_STEP in log p) below the value
            hi = A.where(lk > -math.inf, lk + quant.Q8_STEP, lk * 0 + math.log(quant.Q8_PMIN))
        else:
            hi = lk + A.where(lk < 0, -lk, lk * 0) * _STEP_REL[self.dtype]
        lr = A.log(r)
        hi = A.maximum(A.minimum(hi, lr), lr - math.log(n))  # the tail's max: <= r, >= its mean r / n
        y = A.exp(hi)
        n1 = A.clip(A.floor(r / y), 0.0, n - 1.0)
        v = A.minimum(A.clamp0(r - n1 * y), y)
        t1, t2 = A.log(n1) + a * hi, a * A.log(v)
        m = A.maximum(t1, t2)
        m0 = A.where(m > -math.inf, m, m * 0)
        return A.where(m > -math.inf, m0 + A.log(A.exp(t1 - m0) + A.exp(t2 - m0)), m)

    def tail_bound(self, fields, num_classes: int, *, temperature: float):
        """Per crop, float64 (...,): the bound ``delta_T`` on ``|logit(decoded tail mass) - logit(tail mass of
        softmax(z / T))|`` at ``temperature`` for the stored values (module docstring): the larger distance from
        the decoded ``log W`` to the ends of its interval, at most ``a D max(a, 1 - a)`` for ``T >= 1`` with
        ``tail="mean"``; without it (or where the stored ``mu`` is -inf) the bound of the uniform rule,
        ``|log W_u - log W_v|``. 0 at ``T = 1``, for ``k=None`` or ``k = C`` and where the tail holds no mass.
        It also bounds ``|log(decoded / true)|`` of every kept class."""
        t = parse_temperature(temperature)
        self._check_fields(fields, num_classes)
        lp = self._load_logp(fields["logits"])
        lead = tuple(lp.shape[:-1])
        if self.k is None or self.k == num_classes or t == 1.0:
            return A.filled(lp, lead, 0.0, "float64")
        n = num_classes - self.k
        r = A.clamp0(1.0 - A.seq_sum_last(A.exp(lp)))[..., None]
        lo, lw, hi = self._tail_interval(fields, lp, r, n, 1.0 / t)
        with np.errstate(invalid="ignore"):
            width = A.maximum(hi - lw, lw - lo)
        return A.where(r > 0, width, r * 0)[..., 0]

    def kept_mass(self, fields):
        if self.centred:  # every output is stored: all of the mass
            v = fields["logits"]
            return A.filled(v, tuple(v.shape[:-1]), 1.0)
        p = A.exp(self._load_logp(fields["logits"]))
        return A.f32(A.sum_last(p) if self.k is None else A.seq_sum_last(p))

    # -- stored-field rules
    def sum_atol(self, num_classes):
        n = num_classes if self.k is None else self.k
        if self.quantized:
            return row_sum_atol("q8", n)
        # a log-probability l is rounded toward -inf by less than one storage step, at most |l| * step (not half
        # a step: the rounding is directed), so the mass shrinks by at most sum_i p_i |l_i| step, the entropy of
        # at most n values of total mass <= 1 times step: <= max(log n, 1) * step (spec section 5)
        return PROB_ATOL + max(math.log(n), 1.0) * _STEP_REL[self.dtype]

    def _value_problems(self, f, num_classes, add):
        lp = np.asarray(self._load_logp(f["logits"]), np.float64)
        add(f"log-probabilities <= log(1 + {PROB_ATOL}) and not NaN", np.isnan(lp) | (lp > math.log1p(PROB_ATOL)))
        if self.centred:
            add("centred rows (maximum exactly 0)", lp.max(-1, initial=-np.inf) != 0)
            return
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
        lp = np.asarray(self._load_logp(np.asarray(fields["logits"])), np.float64)
        if self.centred:
            lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        p = np.exp(lp).astype(np.float32)
        order = np.argsort(-p, axis=-1, kind="stable")
        idx = order if self.k is None else np.take_along_axis(np.asarray(fields["indices"]).astype(np.int64), order, -1)
        return idx, np.take_along_axis(p, order, -1)

    def conversion_problem(self, src):
        if self.tail is not None and src.kept_classes is not None:
            return (f"{self.describe()} stores the mean tail log-probability, which only a store holding every "
                    f"class (full, logits with k=None) has; a {src.describe()} store does not")
        return super().conversion_problem(src)

    def from_sorted(self, indices, probs, num_classes):
        lp = np.asarray(A.log(np.asarray(probs, np.float64)))
        if self.k is None:
            full = np.full(indices.shape[:-1] + (num_classes,), -np.inf)
            np.put_along_axis(full, indices.astype(np.intp), lp, -1)
            if self.centred:
                full = full - full.max(-1, keepdims=True)
            return self._finish({"logits": self._store_logp(full)}, num_classes)
        out = {"indices": indices[..., :self.k], "logits": self._store_logp(lp[..., :self.k])}
        if self.tail == "mean":  # the source holds every class
            n = max(num_classes - self.k, 1)
            mu = lp[..., self.k:].sum(-1) / n
            out["tail_mean"] = A.cast_down(mu, self.fields(num_classes)["tail_mean"].dtype)
        return self._finish(out, num_classes)

    # -- reporting
    def roles(self):
        if self.k is None:
            return {"logits": "logits_full" + self._q()}
        out = {"indices": "indices_topk", "logits": "logits_topk" + self._q()}
        if self.tail is not None:
            out["tail_mean"] = "probs_top1"  # one float per crop
        return out

    def describe(self):
        return super().describe() + (f" tail={self.tail}" if self.tail else "") + (" centred" if self.centred else "")

    def paper_values_per_crop(self, num_classes):
        return 5 + (num_classes if self.k is None else 2 * self.k + (self.tail is not None))
