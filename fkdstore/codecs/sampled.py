"""``sampled``: class ids drawn from the teacher's distribution, stored with counts (an unbiased label).

Per crop the codec forms the *generation distribution* ``p`` from its input and the recorded generation
temperature ``T_g`` (``temperature``):

* ``input="logits"``: ``p = softmax(z / T_g)`` of the raw outputs ``z``;
* ``input="probs"``: ``p = normalise(x ** (1 / T_g))`` of probability rows ``x`` (``p = x`` at ``T_g = 1``),

computed in float64 in the log domain. It keeps, optionally, an exact *head*: the ``k`` classes ranked first
by the input (descending, ties to the lower index: the selection rule of every codec), with their ``p``
(fields ``indices``, ``probs`` in ``dtype``, as ``ms``). It then draws ``S = s`` classes independently from
the *tail*, the other classes, with probabilities ``p_j / R`` where ``R = sum_{j in tail} p_j`` (every class
when ``k`` is None), and stores the distinct drawn classes with their counts:

* ``sample_indices`` (w,) (index dtype) and ``sample_counts`` (w,) (``uint8`` when ``S <= 255``, else
  ``uint16``), ``w = min(S, C - k)``: entries ordered by count descending, ties by class index ascending;
  unused entries are padding with index 0 and count 0. Counts sum to ``S``, or to 0 when ``R = 0``;
* with ``logp=True`` also ``sample_logp`` (w,) (``float32`` when ``dtype`` is ``float32``, else ``float16``,
  rounded to nearest): ``log p_j`` of each drawn class (0 in padding), needed to decode at ``T != 1``.

Draws (deterministic, resumable). Row ``j`` of a batch has a crop key ``kappa`` (``encode(x, keys=...)``; a
teacher-runner passes :func:`crop_keys` of the row's ``(image, slot)``). With ``G = 0x9E3779B97F4A7C15``,
``mix`` = :func:`fkdstore.seeded.splitmix64` and uint64 wrapping arithmetic::

    base = mix(seed + G);   row = mix(kappa XOR base)
    u_d  = (mix(row + (d + 1) * G) >> 11) * 2**-53                  d = 0 .. S - 1, a float64 in [0, 1)
    c_i  = 0 for head classes; else x_i for input="probs" at T_g = 1, otherwise exp(t_i - max_j t_j)
           with t = z / T_g (logits) or log(x) / T_g (probs)          (float64; proportional to p_i)
    F_i  = c_0 + c_1 + ... + c_i                                      (float64, left to right)
    draw d = the smallest class i with F_i > u_d * F_{C-1}           (product rounded as float64)

(when rounding leaves no such ``i``, the largest class with ``c_i > 0``). ``exp`` and ``log`` are the platform's
float64 functions (a last-bit difference between libms moves a draw only when ``u_d F_{C-1}`` falls within it
of some ``F_i``). So a crop's draws depend on the
config (``seed``, ``s``, ``k``, ``temperature``, ``input``), its key and its own input row only: never on the
batch, its size or order, the worker or the rank. Without ``keys`` the fallback key of a row is a hash of its
input values, ``mix(sum_i mix(bits_i + (i + 1) * G))`` with ``bits_i`` the float32 bit pattern of ``x_i``
(sum mod 2**64): still batch-independent, but crops whose inputs are bit-identical share draws, and a teacher
whose outputs change in the last bit (GPU kernels chosen by batch size) draws differently on resume. Stores
meant to be resumed or audited MUST be written with keys.

Decode at ``T = 1`` (the unbiased estimate of ``p``): ``n = sum counts`` (``= S``), residual
``r = max(0, 1 - sum(probs))`` (``r = 1`` without a head)::

    q_i = probs_i (head),   q_j = r * count_j / n (drawn tail classes),   0 for the other tail classes

``E[count_j] = S p_j / R`` and ``r = R`` up to the head's storage rounding, so ``E[q_j] = p_j`` for every class:
unbiased (exactly so with ``dtype="float32"`` up to float32 rounding of the head). When ``n = 0`` (no tail
mass) ``r`` is spread evenly over the ``C - k`` tail classes (``ms``'s rule, eq. (5)).

Decode at ``T != 1`` targets ``normalise(p ** (1 / T)) = softmax(z / (T_g * T))``: the temperature rule of
every codec, relative to the distribution the draws came from. It needs ``logp=True`` (ValidationError
otherwise: generate at the training temperature instead). With ``a = 1 / T`` and ``l_j`` the stored
``sample_logp``, the importance weights of the tail draws are ``p_j ** (a - 1)``::

    u_i = probs_i ** a (head),   u_j = (r * count_j / n) * exp((a - 1) * l_j) (drawn tail),
    q = u / sum(u)                       (n = 0: each tail class u = (r / (C - k)) ** a)

``sum_j u_j`` is an unbiased estimate of the tail's ``sum p_j ** a`` and each ``u`` of its target's
unnormalised mass; the normalised ``q`` is the self-normalised importance-sampling estimate: consistent,
biased by ``O(1 / S)`` for ``T != 1`` (the division by the estimated normaliser), unbiased at ``T = 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ValidationError
from ..seeded import GOLDEN, splitmix64
from ..validation import int_in_range
from . import _array as A
from .base import PROB_ATOL, FieldSpec, LabelCodec, check_num_classes, index_dtype, parse_temperature

__all__ = ["Sampled", "crop_keys", "content_keys", "MAX_DRAWS", "SAMPLED_INPUTS"]

MAX_DRAWS = 65535
SAMPLED_INPUTS = ("logits", "probs")
_ONE = np.uint64(1)
_S11 = np.uint64(11)
_2M53 = 2.0 ** -53
_HASH_ROWS = 4096  # rows hashed at once by the keyless fallback (bounded temporaries)


def crop_keys(images, slots) -> np.ndarray:
    """The crop key of slot ``slots[j]`` of image ``images[j]`` (broadcast together; integers >= 0), uint64:
    ``mix(mix((image + 1) * G) + (slot + 1) * G)`` (``mix`` = splitmix64, ``G = 0x9E3779B97F4A7C15``, uint64
    wrapping). A teacher-runner passes ``crop_keys(image_indices[:, None], np.arange(M)[None, :])`` for a
    ``(B, M, C)`` batch as ``codec.encode(x, keys=...)``."""
    i, s = np.asarray(images), np.asarray(slots)
    for what, v in (("images", i), ("slots", s)):
        if v.size and (v.dtype.kind not in "iu" or int(v.min()) < 0):
            raise ValidationError(f"crop_keys {what} must be integers >= 0. Got dtype {v.dtype}, "
                                  f"min {v.min() if v.size else None}.")
    i, s = np.broadcast_arrays(i.astype(np.uint64), s.astype(np.uint64))
    k = splitmix64(((i + _ONE) * GOLDEN).reshape(-1))
    return splitmix64(k + (s.reshape(-1) + _ONE) * GOLDEN).reshape(i.shape)


def content_keys(x: np.ndarray) -> np.ndarray:
    """The keyless fallback: rows ``(R, C)`` -> uint64 ``mix(sum_i mix(bits_i + (i + 1) * G))`` with ``bits_i``
    the float32 bit pattern of ``x[:, i]`` (module docstring)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    offs = (np.arange(x32.shape[-1], dtype=np.uint64) + _ONE) * GOLDEN
    out = np.empty(x32.shape[0], np.uint64)
    for a in range(0, x32.shape[0], _HASH_ROWS):
        bits = x32[a:a + _HASH_ROWS].view(np.uint32).astype(np.uint64)
        out[a:a + _HASH_ROWS] = splitmix64(splitmix64(bits + offs).sum(-1, dtype=np.uint64))
    return out


def _uniforms(seed: int, keys: np.ndarray, draws: int) -> np.ndarray:
    """``u_d`` of every row (module docstring): float64 ``(R, draws)`` in [0, 1)."""
    base = splitmix64(np.array([(seed + int(GOLDEN)) % 2**64], np.uint64))
    row = splitmix64(keys.reshape(-1) ^ base)
    d = (np.arange(draws, dtype=np.uint64) + _ONE) * GOLDEN
    return (splitmix64(row[:, None] + d[None, :]) >> _S11).astype(np.float64) * _2M53


def _inverse_cdf(c: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the smallest ``i`` with ``F_i > u_d * F_{C-1}`` (``F`` the left-to-right float64 cumulative sum
    of ``c``), else the last ``i`` with ``c_i > 0``: int64 ``(R, S)``. A vectorised binary search."""
    F = np.cumsum(c, axis=1)
    R, C = c.shape
    target = u * F[:, -1:]
    lo = np.zeros(target.shape, np.int64)
    hi = np.full(target.shape, C, np.int64)
    rows = np.arange(R)[:, None]
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) // 2
        le = F[rows, np.minimum(mid, C - 1)] <= target
        lo = np.where(open_ & le, mid + 1, lo)
        hi = np.where(open_ & ~le, mid, hi)
    last = C - 1 - np.argmax(c[:, ::-1] > 0, axis=1)
    return np.minimum(lo, last[:, None])


def _tally(draws: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``(R, S)`` -> distinct ids and counts ``(R, width)``, count descending then id ascending, padded
    with (0, 0)."""
    R, S = draws.shape
    sd = np.sort(draws, axis=1)
    start = np.ones((R, S), bool)
    start[:, 1:] = sd[:, 1:] != sd[:, :-1]
    run = np.cumsum(start, axis=1) - 1
    rows = np.broadcast_to(np.arange(R)[:, None], (R, S))
    counts = np.bincount((rows * S + run).reshape(-1), minlength=R * S).reshape(R, S)
    ids = np.zeros((R, S), np.int64)
    ids[rows[start], run[start]] = sd[start]
    order = np.lexsort((ids, -counts), axis=-1)[:, :width]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(counts, order, 1)


def _neg_inf(like):
    """A float64 array of -inf shaped and placed like ``like``."""
    return A.filled(like, tuple(like.shape), -math.inf, "float64")


def _parse_input(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Sampled.input must be a str, got {type(value).__name__}")
    if value not in SAMPLED_INPUTS:
        raise ValidationError(f"Sampled.input must be one of {SAMPLED_INPUTS}, got {value!r}")
    return value


def _parse_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Sampled.{name} must be a bool, got {type(value).__name__}")
    return bool(value)


@dataclass(frozen=True, kw_only=True)
class Sampled(LabelCodec):
    """``s`` draws per crop from the teacher's distribution at ``temperature`` (plus an optional exact top-``k``
    head), stored as distinct class ids and counts; see the module docstring for fields, draws and decode."""

    name: ClassVar[str] = "sampled"
    keyed: ClassVar[bool] = True
    strict_config: ClassVar[bool] = True
    s: int = 16
    k: int | None = None
    temperature: float = 1.0
    input: str = "logits"
    dtype: str = "float16"
    logp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.s, bool):
            raise TypeError(f"Sampled.s must be an int, got {type(self.s).__name__}")
        object.__setattr__(self, "s", int_in_range("Sampled.s", self.s, 1, MAX_DRAWS))
        object.__setattr__(self, "temperature", parse_temperature(self.temperature))
        object.__setattr__(self, "input", _parse_input(self.input))
        object.__setattr__(self, "logp", _parse_bool("logp", self.logp))
        object.__setattr__(self, "seed", int_in_range("Sampled.seed", self.seed, 0, 2**64 - 1))

    @classmethod
    def _k_may_be_none(cls):
        return True

    # -- layout
    def width(self, num_classes: int) -> int:
        """``w = min(s, C - k)``: entries of the sample fields per crop."""
        return min(self.s, check_num_classes(num_classes) - (self.k or 0))

    def fields(self, num_classes):
        c = check_num_classes(num_classes)
        if self.k is not None and self.k >= c:
            raise ValidationError(f"{self.name} needs k < num_classes (a tail to draw from), got k={self.k} >= "
                                  f"num_classes={c}")
        w = self.width(c)
        out = {}
        if self.k is not None:
            out["indices"] = FieldSpec((self.k,), index_dtype(c))
            out["probs"] = FieldSpec((self.k,), self._value_dtype())
        out["sample_indices"] = FieldSpec((w,), index_dtype(c))
        out["sample_counts"] = FieldSpec((w,), "uint8" if self.s <= 255 else "uint16")
        if self.logp:
            out["sample_logp"] = FieldSpec((w,), "float32" if self.dtype == "float32" else "float16")
        return out

    @property
    def kept_classes(self):
        return self.k or 0

    # -- encode
    def _encode(self, x, keys):
        torch_device = x.device if A.is_torch(x) else None
        if torch_device is not None:  # drawn on the host, so numpy and torch (any device) give the same bits
            torch = A.torch_module()
            xt = x.detach().to("cpu")
            xn = (xt if xt.dtype in (torch.float32, torch.float64) else xt.to(torch.float32)).numpy()
        else:
            xn = np.asarray(x)
        lead, C = xn.shape[:-1], xn.shape[-1]
        x2 = xn.reshape(-1, C)
        specs = self.fields(C)
        w = specs["sample_indices"].shape[0]
        keys = content_keys(x2) if keys is None else keys.reshape(-1)
        lz = A.f64(x2) if self.input == "logits" else A.log(A.f64(x2))
        lz = lz / self.temperature if self.temperature != 1.0 else lz
        with np.errstate(invalid="ignore"):
            m = lz.max(-1, keepdims=True)
            lz = lz - np.where(np.isfinite(m), m, 0)
            logp = lz - np.log(np.exp(lz).sum(-1, keepdims=True))
        p = np.exp(logp)
        out = {}
        # the draw weights: unnormalised (the rule is scale-free), so no sum enters the draws
        c = x2.astype(np.float64) if self.input == "probs" and self.temperature == 1.0 else np.exp(lz)
        if self.k is not None:
            head = A.topk_indices(x2, self.k)
            out["indices"] = head
            out["probs"] = self._store_probs(np.take_along_axis(p, head, 1))
            np.put_along_axis(c, head, 0.0, 1)
        draws = _inverse_cdf(c, _uniforms(self.seed, keys, self.s)) if len(c) else np.zeros((0, self.s), np.int64)
        ids, counts = _tally(draws, w)
        empty = c.sum(-1) == 0  # no tail mass: nothing drawn
        counts[empty] = 0
        ids[counts == 0] = 0
        out["sample_indices"], out["sample_counts"] = ids, counts
        if self.logp:
            out["sample_logp"] = np.where(counts > 0, np.take_along_axis(logp, ids, 1), 0.0)
        out = {n: np.asarray(v).astype(specs[n].dtype).reshape(lead + specs[n].shape) for n, v in out.items()}
        if torch_device is not None:
            torch = A.torch_module()
            out = {n: torch.from_numpy(v).to(torch_device) for n, v in out.items()}
        return out

    # -- decode
    def _check_fields(self, fields, num_classes):
        super()._check_fields(fields, num_classes)
        ids = fields["sample_indices"]
        if A.numel(ids):
            a = A.i64(ids)
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= num_classes:
                raise ValidationError(f"field 'sample_indices' must lie in [0, {num_classes}), got values in "
                                      f"[{lo}, {hi}]")

    def check_temperature(self, temperature) -> float:
        t = parse_temperature(temperature)
        if t != 1.0 and not self.logp:
            raise ValidationError(
                f"{self.describe()} decodes only at temperature 1 (the distribution its draws came from, "
                f"softmax(z / {self.temperature:g})); decoding at temperature={t:g} needs the drawn "
                f"classes' probabilities: write the store with logp=True, or generate at the training "
                f"temperature")
        return t

    def _decode(self, f, num_classes, temperature):
        cnt = A.f64(f["sample_counts"])
        ids = A.i64(f["sample_indices"])
        lead = tuple(cnt.shape[:-1])
        n_tail = num_classes - (self.k or 0)
        nc = A.sum_last(cnt)[..., None]
        drawn = nc > 0
        if self.k is not None:
            ph = A.f64(self._load_probs(f["probs"]))
            r = A.clamp0(1.0 - A.seq_sum_last(ph))[..., None]
        else:
            ph, r = None, A.filled(cnt, lead + (1,), 1.0, "float64")
        safe_nc = A.where(drawn, nc, nc * 0 + 1)
        if temperature == 1.0:
            tail = r * cnt / safe_nc
            fill = A.where(drawn, r * 0, r / n_tail)
            head = ph
        else:
            a = 1.0 / temperature
            lt = A.where(cnt > 0, A.log(r * cnt / safe_nc) + (a - 1.0) * A.f64(f["sample_logp"]), _neg_inf(cnt))
            lu = A.where(drawn, _neg_inf(r), a * A.log(r / n_tail))  # the uniform tail of a crop without draws
            lh = None if ph is None else a * A.log(ph)
            m = A.amax_last(A.concat_last(lt, lu) if lh is None else A.concat_last(A.concat_last(lt, lu), lh))
            m = A.where(m > -math.inf, m, r * 0)  # r is finite: a row of -inf weights cannot occur
            tail, fill = A.exp(lt - m), A.exp(lu - m)
            z = A.sum_last(tail)[..., None] + n_tail * fill
            head = None
            if lh is not None:
                head = A.exp(lh - m)
                z = z + A.seq_sum_last(head)[..., None]
            tail, fill = tail / z, fill / z
            head = None if head is None else head / z
        out = A.filled(cnt, lead + (num_classes + 1,), A.f32(fill))
        slot = A.where(cnt > 0, ids, ids * 0 + num_classes)  # padding writes go to the extra column
        out = A.scatter_into(out, slot, A.f32(tail))
        if head is not None:
            out = A.scatter_into(out, f["indices"], A.f32(head))
        out = out[..., :num_classes]
        return out.contiguous() if A.is_torch(out) else np.ascontiguousarray(out)

    def kept_mass(self, fields):
        """Mass on the listed classes at ``T = 1``: the head's plus the residual ``r`` when the crop has draws."""
        cnt = A.f64(fields["sample_counts"])
        drawn = A.f64(A.sum_last(cnt) > 0)
        if self.k is None:
            return A.f32(drawn)
        ph = A.f64(self._load_probs(fields["probs"]))
        s = A.seq_sum_last(ph)
        return A.f32(s + drawn * A.clamp0(1.0 - s))

    # -- stored-field rules
    def _value_problems(self, f, num_classes, add):
        ids = f["sample_indices"].astype(np.int64)
        cnt = f["sample_counts"].astype(np.int64)
        add(f"sample indices in [0, {num_classes})", (ids < 0) | (ids >= num_classes))
        if self.k is not None:
            super()._value_problems(f, num_classes, add)
            pf = np.asarray(self._load_probs(f["probs"]), np.float64)
            add("head probabilities in descending order", np.diff(pf, axis=-1) > 0)
            add(f"head mass at most 1 + {self.sum_atol(num_classes):.3g}",
                pf.sum(-1) > 1 + self.sum_atol(num_classes))
        total = cnt.sum(-1)
        ok_total = (total == self.s) | ((total == 0) if self.k is not None else False)
        add(f"sample counts summing to s={self.s}" + (" (or 0 when the tail has no mass)" if self.k else ""),
            ~ok_total)
        pos = cnt > 0
        add("padding entries (count 0) with class index 0", ~pos & (ids != 0))
        marked = np.where(pos, ids, -1 - np.arange(ids.shape[-1]))
        s = np.sort(marked, -1)
        add("distinct sampled classes", s[..., 1:] == s[..., :-1])
        if self.k is not None:
            head = f["indices"].astype(np.int64)
            add("sampled classes outside the head", (pos[..., :, None] & (ids[..., :, None] == head[..., None, :])))
        key = np.where(pos, cnt * (num_classes + 1) + (num_classes - ids), -1)  # count desc, then id asc
        add("sample entries ordered by count descending, then class index ascending", np.diff(key, axis=-1) > 0)
        if self.logp:
            lp = f["sample_logp"].astype(np.float64)
            add(f"sample log-probabilities <= log(1 + {PROB_ATOL}) and not NaN",
                pos & (np.isnan(lp) | (lp > math.log1p(PROB_ATOL))))
            add("padding log-probabilities equal to 0", ~pos & (lp != 0))

    # -- conversion
    def conversion_problem(self, src):
        return (f"{self.describe()} labels are drawn by the teacher-runner from the teacher's distribution with "
                f"each crop's key; a stored {src.describe()} store cannot be converted to them")

    def sorted_probs(self, fields, num_classes):
        if self.k is None:
            lead = np.asarray(fields["sample_counts"]).shape[:-1]
            return np.zeros(lead + (0,), np.int64), np.zeros(lead + (0,), np.float32)
        idx = np.asarray(fields["indices"]).astype(np.int64)
        p = np.asarray(self._load_probs(np.asarray(fields["probs"])), np.float32)
        order = np.argsort(-p, axis=-1, kind="stable")
        return np.take_along_axis(idx, order, -1), np.take_along_axis(p, order, -1)

    def from_sorted(self, indices, probs, num_classes):
        raise ValidationError(self.conversion_problem(self))

    # -- reporting
    def describe(self):
        out = f"{self.name} S={self.s}" + (f" K={self.k}" if self.k is not None else "")
        return out + (f" T={self.temperature:g}" if self.temperature != 1.0 else "")

    def roles(self):
        out = {"sample_indices": "indices_sampled", "sample_counts": "counts_sampled"}
        if self.k is not None:
            out = {"indices": "indices_topk", "probs": "probs_topk" + self._q(), **out}
        if self.logp:
            out["sample_logp"] = "logp_sampled"
        return out

    def paper_values_per_crop(self, num_classes):
        w = self.width(num_classes)
        return 5 + 2 * (self.k or 0) + 2 * w + (w if self.logp else 0)
