"""``q8``: one byte per stored probability, log-odds domain, fixed range, rounded down. No per-slot scale.

Code ``c`` (uint8) decodes to ``Q8_TABLE[c]``::

    Q8_TABLE[0] = 0
    Q8_TABLE[c] = sigmoid(-Q8_LOGIT_RANGE + (c - 1) * Q8_STEP),   c = 1 .. 255,
    Q8_STEP = 2 * Q8_LOGIT_RANGE / 254,  Q8_LOGIT_RANGE = 11

(stored as float32; strictly increasing). Encoding picks the **largest** code whose value is ``<= p`` (a
search in the table, so numpy and torch give the same codes and no ``log`` is evaluated). Hence, for every
``p`` in ``[0, 1]``:

    0 <= p - q8(p) <= max(Q8_REL * min(p, 1 - p), Q8_PMIN)          (the error bound)

with ``Q8_REL = exp(Q8_STEP) - 1 = 0.0905`` and ``Q8_PMIN = Q8_TABLE[1] = sigmoid(-11) = 1.67e-5``:
relative error below 9.1 % for small ``p`` and for ``1 - p`` when ``p`` is near 1 (the log-odds grid is
fine at both ends), absolute error below 1.7e-5 for ``p < Q8_PMIN`` (stored as exactly 0) and for
``p > 1 - Q8_PMIN``. Why these choices:

* log-odds, not log ``p``: a confident teacher's top-1 of 0.995 keeps its complement (the mass that ``ms``
  spreads over the other classes) to 9 %, where a log-``p`` grid with the same step rounds it to 1.0 and
  loses the tail entirely.
* rounding down, never up: stored mass never exceeds the teacher's, so ``ms``'s residual
  ``1 - sum(stored)`` is never negative and KL(teacher || decoded) stays finite whenever the teacher's
  tail is non-zero.
* a fixed range, no per-slot scale: a scale costs 2 bytes per slot (MS top-5 would need 17 bytes raw); the
  table's range covers every probability a float16 store could tell apart from 0 or 1 at this step.

Values outside ``[0, 1 + PROB_ATOL]`` or NaN are refused (ValidationError), never clipped silently.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ValidationError
from . import _array as A

Q8_LOGIT_RANGE = 11.0
Q8_STEP = 2 * Q8_LOGIT_RANGE / 254
_X = -Q8_LOGIT_RANGE + np.arange(255, dtype=np.float64) * Q8_STEP
Q8_TABLE = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-_X))]).astype(np.float32)
Q8_TABLE.setflags(write=False)
#: log(Q8_TABLE) in float64 (code 0 -> -inf), for codecs that decode in the log domain.
Q8_LOG_TABLE = np.log(Q8_TABLE.astype(np.float64), where=Q8_TABLE > 0,
                      out=np.full(256, -np.inf)).astype(np.float64)
Q8_LOG_TABLE.setflags(write=False)
Q8_PMIN = float(Q8_TABLE[1])
Q8_REL = math.expm1(Q8_STEP)
#: what a zero-coded class of a whole q8 row decodes to, before normalising, is clipped to this range
Q8_ZERO_MIN, Q8_ZERO_MAX = Q8_PMIN * 2.0**-10, Q8_PMIN / 2
assert (np.diff(Q8_TABLE) > 0).all()


def q8_bound(p):
    """The largest ``p - q8(p)`` the encoder can produce for each ``p`` (numpy, float64)."""
    p = np.asarray(p, dtype=np.float64)
    return np.maximum(Q8_REL * np.minimum(p, 1 - p), Q8_PMIN)


def quantize(p, atol: float):
    """Probabilities (numpy or torch, any float dtype) -> uint8 codes; refuses NaN and values outside [0, 1 + atol]."""
    p32 = A.f32(p)
    if A.numel(p32):
        bad = (p32 != p32) | (p32 < 0) | (p32 > 1 + atol)
        if bool(bad.any()):
            v = p32[bad]
            first = float(v.reshape(-1)[0])
            raise ValidationError(f"q8 stores probabilities in [0, 1 + {atol}]. Got {first!r} "
                                  f"({int(bad.sum())} values out of range).")
    return A.cast(A.searchsorted_right(Q8_TABLE, p32), "uint8")


def dequantize(codes):
    """uint8 codes -> float32 probabilities (a table lookup: bit-identical in numpy and torch)."""
    return A.table_lookup(Q8_TABLE, codes)


def dequantize_row(codes):
    """A whole q8 row (every class: ``full``, ``logits`` with ``k=None``) -> float64 distribution, > 0 everywhere.

    ``S = sum(Q8_TABLE[codes])``, ``r = max(1 - S, 0)``, ``n0`` = number of zero codes; each zero-coded class
    gets ``e = clip(r / n0, Q8_ZERO_MIN, Q8_ZERO_MAX)``, then the row is normalised (rule and bound:
    :class:`fkdstore.codecs.full.Full`). Sums of float32 table values are exact in float64, so numpy and
    torch agree bit for bit.
    """
    p64 = A.f64(dequantize(codes))
    zero = A.f64(p64 == 0)
    s = A.sum_last(p64)[..., None]
    n0 = A.sum_last(zero)[..., None]
    r = A.clamp0(1.0 - s)
    e = A.clip(r / A.where(n0 > 0, n0, n0 * 0 + 1), Q8_ZERO_MIN, Q8_ZERO_MAX)
    return (p64 + e * zero) / (s + n0 * e)


def dequantize_log(codes):
    """uint8 codes -> float64 log-probabilities (code 0 -> -inf)."""
    return A.table_lookup(Q8_LOG_TABLE, codes)
