"""Label codecs: how one crop's teacher output is stored and rebuilt. This docstring is the contract.

Every codec is a frozen, keyword-only dataclass deriving from :class:`LabelCodec`, in one small module,
registered in ``fkdstore.codecs.REGISTRY`` under its ``name``:

* ``codec.input``: ``"probs"`` (``encode`` takes probability rows, e.g. ``softmax(z / T_teacher)``) or
  ``"logits"`` (``encode`` takes the raw output vector ``z`` of any width ``D``; the class count ``C`` of
  the store is then ``D``). A teacher-runner passes what the codec declares;
  ``codec.validate_input(x, C)`` checks it (:func:`validate_probs` for probabilities, finite values for
  logits).
* ``codec.fields(C)`` -> ordered ``{name: FieldSpec(shape, dtype)}``: the arrays ``encode`` returns, with
  the trailing shape per crop. Index fields use :func:`index_dtype` (``"uint16"`` when ``C <= 65536``,
  else ``"int32"``). Raises :class:`ValidationError` when the codec cannot store ``C`` classes (``k > C``).
* ``codec.encode(x, keys=None)``: ``x`` has shape ``(..., C)`` (any number of leading dims); returns fields
  of shape ``(...,) + spec.shape`` in the dtypes of ``fields(C)``. numpy in -> numpy out; torch in -> torch
  out on the same device. Normalisation is *not* checked here: call ``codec.validate_input``.
  ``keys``: optional crop identities, one unsigned 64-bit integer per row (shape ``x.shape[:-1]``, any
  integer dtype, values in ``[0, 2**64)``; :func:`parse_keys`). Codecs whose fields depend on random draws
  (``codec.keyed``, e.g. ``sampled``) draw row ``j``'s values from ``keys[j]`` and their config only, so any
  subset of rows encodes to the same bits in any batch; a teacher-runner passes
  :func:`fkdstore.codecs.sampled.crop_keys` ``(image, slot)`` of each row. Other codecs check and ignore them.
* ``codec.decode(fields, C, temperature=1.0)`` -> ``(..., C)`` float32, same framework/device as the
  fields; vectorised. It checks field names, shapes, dtype kinds and the index range ``[0, C)`` (one host
  sync on a GPU). Extra keys are ignored. At ``temperature == 1`` numpy and torch results are bit-identical
  (the logits codec, which needs ``exp`` even there, and ``temperature != 1`` agree to about 1 float32 ulp:
  numpy's and torch's ``exp``/``log`` may differ in the last bit of a float64).
* Temperature (one rule for every codec): ``decode(f, C, temperature=T) = normalise(decode(f, C) ** (1/T))``
  (computed in float64 in the log domain). For a distribution ``p = softmax(z)`` this is exactly
  ``softmax(z / T)``; so ``full`` and ``logits`` with ``k=None`` give ``softmax(z / T)`` (to storage
  rounding); ``mr`` gives ``softmax(z / T)`` restricted to the kept classes and renormalised; ``ms``,
  ``smoothing`` and top-K ``logits`` keep the exact ratios ``exp((z_i - z_j) / T)`` between kept classes
  and treat the unknown tail as ``C - K`` equal logits carrying the stored tail mass at ``T = 1``. That is
  exact when the tail's logits are equal and otherwise, by Jensen's inequality, over-estimates the tail's
  mass for ``T > 1`` (under-estimates for ``T < 1``). ``hard`` is one-hot at every ``T``. ``T`` must be a
  finite number > 0 (:func:`parse_temperature`).
* ``codec.kept_mass(fields)`` -> ``(...,)`` float32: stored probability mass at ``T = 1`` (NaN for ``hard``).
* Selection rule, shared by all codecs: classes are ranked by the *input*, descending, ties broken by the
  lower class index (stable argsort of ``-x``). So ``Hard``/``Smoothing`` store the top-1 of
  ``MarginalSmoothing``/``MarginalReNorm``/``Logits``, and numpy and torch give the same indices.
* Stored-field rules: ``codec.field_problems(fields, C)`` -> ``[(rule, bad crops mask)]`` and
  ``codec.validate_fields(fields, C)`` (raises :class:`ValidationError` naming the first bad crop) check what
  a store may hold: indices in ``[0, C)``, top-K indices distinct, probabilities finite in
  ``[0, 1 + PROB_ATOL]``, top-K values non-increasing, stored mass at most ``1 + codec.sum_atol(C)``, full
  rows summing to 1 within ``codec.sum_atol(C)``. Writer and ``verify`` both call them.
* Conversion without the teacher (``fkdstore convert``): ``codec.kept_classes`` (how many top classes the
  fields identify; ``None`` = all ``C``), ``codec.has_probs``; ``dst.conversion_problem(src)`` says why
  ``src -> dst`` is impossible (or None); ``src.sorted_probs(fields, C)`` -> (indices, probs) of the stored
  classes in descending order and ``dst.from_sorted(indices, probs, C)`` -> ``dst``'s fields.
* Reporting: ``codec.k`` (``None`` unless the codec keeps a top-K), ``codec.describe()`` (``"ms K=5"``),
  ``codec.roles()`` (``{field: calibration role}``), ``codec.paper_values_per_crop(C)`` (the paper's Table 2
  accounting: 4 coordinates + 1 flip + the label values, as float32).
* ``get_config()`` -> JSON-only dict with ``"name"``; ``from_config(cfg)`` rebuilds an equal codec (``cfg`` is
  copied, not consumed). Codecs are frozen dataclasses: equal iff their configs are equal, and ``repr`` is a
  constructor call. A codec with ``strict_config = True`` (``sampled``) is rebuilt by ``from_config`` only
  from a config that spells every parameter (a missing one is refused, as an unknown one is for every codec).

Probability dtypes (``dtype=``): ``"float16"``, ``"float32"`` and ``"q8"`` (one byte per value, log-odds
domain, rounded down; error bound in :mod:`fkdstore.codecs.quant`; ``full`` q8 gives zero-coded classes a
share of the missing mass so every decoded value is > 0: :class:`~fkdstore.codecs.full.Full`). Codecs: ``full``,
``hard``, ``smoothing``, ``ms``, ``mr`` (paper eqs. (3)-(7), one module each) and ``logits`` (top-K or all ``D``
log-probabilities; :mod:`fkdstore.codecs.logits`).

The residual ``1 - stored mass`` is clamped at 0, so rounding of the stored probs never yields negative
labels; decoded rows then sum to 1 within ``codec.sum_atol(C)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ValidationError
from ..validation import positive_int
from . import _array as A
from . import quant

__all__ = ["PROB_ATOL", "PROB_DTYPES", "FieldSpec", "LabelCodec", "index_dtype", "validate_probs",
           "validate_logits", "parse_temperature", "parse_keys", "row_sum_atol", "check_num_classes"]

PROB_DTYPES = ("float16", "float32", "q8")
MAX_UINT16_CLASSES = 65536

#: Tolerance on probability normalisation, the one constant writer, codecs and ``verify`` share.
#: A teacher's float32 softmax rows sum to 1 within about ``sqrt(C) * 2**-24`` (1e-5 at C = 1e5); a
#: bfloat16/float16 autocast softmax rounds each value to 2**-9 / 2**-11 relative, i.e. a row sum off by at
#: most 2e-3 / 5e-4 but in practice (random rounding signs) well below 1e-3. 1e-3 accepts all of those and
#: still rejects rows that were never normalised, a forgotten softmax, or a 0.1 % mass error in a converter.
#: Stored float16 values add their own rounding on top: see :func:`row_sum_atol`.
PROB_ATOL = 1e-3

# Worst-case rounding of a stored value: relative (half an ulp of a normal number) and absolute (half the
# smallest subnormal, for values that round into the subnormal range).
_REL_ROUND = {"float16": 2.0**-11, "float32": 2.0**-24}
_ABS_ROUND = {"float16": 2.0**-25, "float32": 2.0**-150}


def row_sum_atol(dtype: str, n: int) -> float:
    """Tolerance on ``|sum - 1|`` of ``n`` stored probabilities of one distribution in ``dtype``.

    ``PROB_ATOL`` + the worst case of storing: each float value moves by at most ``rel * p`` (normal range)
    or ``abs`` (subnormal), so the sum moves by at most ``rel + n * abs``: for float16 at ``C = 1000``
    ``1e-3 + 4.9e-4 + 3e-5``; at ``C = 10**5`` the subnormal term grows to 3e-3, which is why a full
    float16 row at large ``C`` needs more than ``PROB_ATOL``. ``q8`` rounds down, by at most
    ``Q8_REL * p`` or ``Q8_PMIN`` per value.
    """
    if dtype == "q8":
        return PROB_ATOL + quant.Q8_REL + n * quant.Q8_PMIN
    return PROB_ATOL + _REL_ROUND[dtype] + n * _ABS_ROUND[dtype]


@dataclass(frozen=True)
class FieldSpec:
    """One stored label field per crop slot: trailing ``shape`` per crop and numpy ``dtype`` name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def check_num_classes(num_classes: Any) -> int:
    return positive_int("num_classes", num_classes)


def index_dtype(num_classes: int) -> str:
    """Dtype of stored class indices: ``"uint16"`` when ``num_classes <= 65536``, else ``"int32"``."""
    return "uint16" if check_num_classes(num_classes) <= MAX_UINT16_CLASSES else "int32"


def parse_temperature(temperature: Any) -> float:
    """A temperature as float: TypeError unless a real number (bools and strings refused), ValidationError unless
    finite and > 0."""
    if temperature.__class__ is float and temperature == 1.0:  # decode's default, checked per call
        return 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a finite number > 0. Got {temperature!r} "
                        f"({type(temperature).__name__}).")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValidationError(f"temperature must be a finite number > 0. Got {temperature!r}.")
    return t


def parse_keys(keys: Any, lead: tuple[int, ...]) -> np.ndarray:
    """Crop keys for ``encode(x, keys=...)`` as a uint64 numpy array of shape ``lead`` (``x.shape[:-1]``).

    ``keys``: a numpy array or torch tensor of integers in ``[0, 2**64)`` with exactly that shape. Wrong types
    (not an array, bool or float dtype) raise TypeError; a wrong shape or a negative value ValidationError.
    """
    A.check_array(keys, "keys")
    if A.is_torch(keys):
        keys = keys.detach().to("cpu").numpy()
    keys = np.asarray(keys)
    if keys.dtype.kind not in "iu":
        raise TypeError(f"keys must have an integer dtype (one uint64 crop key per row). Got {keys.dtype}.")
    if tuple(keys.shape) != tuple(lead):
        raise ValidationError(f"keys must have shape x.shape[:-1] = {tuple(lead)} (one per row). "
                              f"Got shape {tuple(keys.shape)}.")
    if keys.dtype.kind == "i" and keys.size and int(keys.min()) < 0:
        raise ValidationError(f"keys must be in [0, 2**64). Got {int(keys.min())}.")
    return keys.astype(np.uint64)


def temper(d, temperature: float):
    """``normalise(d ** (1 / T))`` along the last axis, in float64 log space; float32 out."""
    logd = A.log(A.f64(d))
    z = (logd - A.amax_last(logd)) / temperature
    w = A.exp(z)
    return A.f32(w / A.sum_last(w)[..., None])


# ----------------------------------------------------------------------------- input validation
def _input_rows(x, num_classes: int, what: str):
    A.check_array(x, what)
    c = check_num_classes(num_classes)
    shape = tuple(x.shape)
    if len(shape) < 1:
        raise ValidationError(f"{what} must have shape (..., C) with ndim >= 1, got shape {shape}")
    if shape[-1] != c:
        raise ValidationError(f"{what} last dim must equal num_classes={c}, got shape {shape}")
    if not A.is_float(x):
        raise ValidationError(f"{what} must have a floating dtype, got {x.dtype}")
    if A.is_torch(x):
        x = x.detach().to("cpu").float().numpy()
    x = np.asarray(x)
    return x.reshape(-1, c), shape


def _row(i: int, shape) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(i, shape[:-1]))


def _first_bad(x, bad, shape, what: str, rule: str, fmt: str = ""):
    i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
    raise ValidationError(f"{what} must be {rule}, got {float(x[i, j]):{fmt}} at row {_row(int(i), shape)} "
                          f"class {j}")


def validate_probs(probs, num_classes: int, *, atol: float = PROB_ATOL) -> None:
    """Check that ``probs`` (..., C) holds probability rows; raise ValidationError naming the first bad row.

    Rules: ndim >= 1, last dim == ``num_classes``, floating dtype, every value finite and >= 0, and each
    row's sum (accumulated in float32) satisfies ``|sum - 1| <= atol`` (default :data:`PROB_ATOL`).
    """
    x, shape = _input_rows(probs, num_classes, "probs")
    if x.size == 0:
        return
    bad = ~np.isfinite(x)
    if bad.any():
        _first_bad(x, bad, shape, "probs", "finite")
    bad = x < 0
    if bad.any():
        _first_bad(x, bad, shape, "probs", ">= 0", ".6g")
    s = x.sum(-1, dtype=np.float32)
    bad = np.abs(s - np.float32(1)) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValidationError(f"probs rows must sum to 1 within atol={atol}, got sum {float(s[i]):.6g} "
                              f"at row {_row(i, shape)}")


def validate_logits(logits, num_classes: int) -> None:
    """Check that ``logits`` (..., D) is a floating array of finite values with ``D == num_classes``."""
    x, shape = _input_rows(logits, num_classes, "logits")
    bad = ~np.isfinite(x)
    if bad.any():
        _first_bad(x, bad, shape, "logits", "finite")


@functools.lru_cache(maxsize=256)
def _specs(codec: LabelCodec, num_classes: int) -> dict[str, FieldSpec]:
    """``codec.fields(num_classes)`` memoised for decode's per-call field check (codecs are frozen and
    hashable; only called with a plain ``int``, so ``True`` never hits the entry of ``1``). Read-only."""
    return codec.fields(num_classes)


def _unsigned(a: np.ndarray) -> np.ndarray:
    """A view of integer array ``a`` as the unsigned type of its width (negative values become >= 2**63)."""
    return a if a.dtype.kind == "u" else a.view(a.dtype.str.replace("i", "u"))


# ----------------------------------------------------------------------------- base class
@dataclass(frozen=True, kw_only=True)
class LabelCodec:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    #: allowed values of the ``dtype`` parameter (codecs with one)
    DTYPES: ClassVar[tuple[str, ...]] = PROB_DTYPES
    has_probs: ClassVar[bool] = True
    #: the fields depend on random draws keyed by crop identity (``encode(x, keys=...)``)
    keyed: ClassVar[bool] = False
    #: ``from_config`` refuses a config that leaves a parameter out
    strict_config: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                if not isinstance(value, str):
                    raise TypeError(f"{type(self).__name__}.dtype must be a str, got {type(value).__name__}")
                if value not in self.DTYPES:
                    raise ValidationError(f"{type(self).__name__}.dtype must be one of {self.DTYPES}, got {value!r}")
            elif f.name == "k":
                if value is None and self._k_may_be_none():
                    continue
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{type(self).__name__}.k must be an int, got {type(value).__name__}")
                if value < 1:
                    raise ValidationError(f"{type(self).__name__}.k must be >= 1, got {value}")
                object.__setattr__(self, "k", int(value))

    @classmethod
    def _k_may_be_none(cls) -> bool:
        return False

    @property
    def input(self) -> str:
        """What :meth:`encode` takes: ``"probs"`` (probability rows) or ``"logits"`` (a class attribute or a
        field of the codecs that take logits)."""
        return "probs"

    @property
    def k(self) -> int | None:
        """``k`` of top-K codecs (a dataclass field there); None for the others."""
        return None

    @property
    def _dtype(self) -> str:
        """The ``dtype`` parameter of the codecs with one; float32 for the others."""
        return getattr(self, "dtype", "float32")

    # -- config
    def get_config(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    # -- layout
    def fields(self, num_classes: int) -> dict[str, FieldSpec]:
        raise NotImplementedError

    def raw_bytes_per_crop(self, num_classes: int) -> int:
        """Sum of the stored field bytes of one crop, before compression."""
        return sum(spec.nbytes for spec in self.fields(num_classes).values())

    @property
    def kept_classes(self) -> int | None:
        """How many top classes the stored fields identify (None: all C)."""
        return self.k

    @property
    def quantized(self) -> bool:
        return self._dtype == "q8"

    def _value_dtype(self) -> str:
        """numpy dtype of the stored probability (or logit) values."""
        return "uint8" if self.quantized else self._dtype

    def _store_probs(self, p):
        """Probabilities -> stored values (quantized for ``q8``, else cast to ``dtype``)."""
        return quant.quantize(p, PROB_ATOL) if self.quantized else A.cast(p, self._dtype)

    def _load_probs(self, v):
        """Stored values -> float32 probabilities."""
        return quant.dequantize(v) if self.quantized else A.f32_copy(v)

    # -- encode / decode
    def validate_input(self, x, num_classes: int) -> None:
        """Check what ``encode`` takes (``codec.input``): probability rows or finite logits."""
        if self.input == "logits":
            validate_logits(x, num_classes)
        else:
            validate_probs(x, num_classes)

    def encode(self, x, *, keys=None) -> dict:
        A.check_array(x, self.input)
        if x.ndim < 1:
            raise ValidationError(f"{self.input} must have shape (..., C) with ndim >= 1, got shape {tuple(x.shape)}")
        specs = self.fields(int(x.shape[-1]))
        if keys is not None:
            keys = parse_keys(keys, tuple(x.shape[:-1]))
        out = self._encode(x, keys) if self.keyed else self._encode(x)
        return {name: A.cast(out[name], spec.dtype) for name, spec in specs.items()}

    def check_temperature(self, temperature: Any) -> float:
        """``temperature`` as a float when this codec can decode at it (what :meth:`decode` checks first):
        TypeError / ValidationError as :func:`parse_temperature`, and ValidationError where the codec refuses
        the temperature (a q8 ``logits`` store below 1, a ``sampled`` store without ``logp`` away from 1). A
        reader calls it up front (``TorchDataset(temperature=...)``) so a refused temperature fails at once."""
        return parse_temperature(temperature)

    def decode(self, fields: Mapping, num_classes: int, *, temperature: float = 1.0):
        t = self.check_temperature(temperature)
        self._check_fields(fields, num_classes)
        d = self._decode(fields, num_classes, t)
        # one class: every distribution is [1] (a q8 code of 1.0 would otherwise decode to Q8[255] < 1)
        return d * 0 + 1 if num_classes == 1 else d

    def _encode(self, x, keys=None) -> dict:
        """The fields of ``x`` (numpy or torch rows, checked), before the cast to the field dtypes; ``keys``
        (one crop key per row) for the keyed codecs only."""
        raise NotImplementedError

    def _decode1(self, fields, num_classes: int):
        """Decoded rows at temperature 1 (the fields checked)."""
        raise NotImplementedError

    def _decode(self, fields, num_classes: int, temperature: float):
        d = self._decode1(fields, num_classes)
        return d if temperature == 1.0 else temper(d, temperature)

    def kept_mass(self, fields: Mapping):
        """Probability mass carried by the stored entries, shape (...,) float32 (NaN for ``hard``)."""
        return A.sum_last(self._load_probs(fields["probs"]))

    # -- stored-field rules
    def sum_atol(self, num_classes: int) -> float:
        """Tolerance on ``|sum - 1|`` of stored mass and decoded rows (:func:`row_sum_atol`)."""
        n = self.kept_classes if self.kept_classes is not None else num_classes
        return row_sum_atol(self._dtype, n)

    def _check_fields(self, fields: Mapping, num_classes: int) -> None:
        if not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a mapping of name -> array, got {type(fields).__name__}")
        specs = _specs(self, num_classes) if type(num_classes) is int else self.fields(num_classes)
        missing = [n for n in specs if n not in fields]
        if missing:
            raise ValidationError(f"{self.name} fields must contain {list(specs)}, missing {missing}")
        arrs = [fields[n] for n in specs]
        plain = all(type(a) is np.ndarray for a in arrs)  # the common case: skip the framework checks
        if not plain:
            for n, a in zip(specs, arrs):
                A.check_array(a, f"field {n!r}")
            if len({A.is_torch(a) for a in arrs}) > 1:
                raise TypeError(f"{self.name} fields must all be numpy or all torch, got a mix")
        numpy_in = plain or not A.is_torch(arrs[0])
        lead = None
        for (n, spec), arr in zip(specs.items(), arrs):
            shape = tuple(arr.shape)
            nt = len(spec.shape)
            if shape[len(shape) - nt:] != spec.shape or len(shape) < nt:
                raise ValidationError(f"field {n!r} must have trailing shape {spec.shape}, got shape {shape}")
            lead = shape[: len(shape) - nt] if lead is None else lead
            if shape[: len(shape) - nt] != lead:
                raise ValidationError(f"{self.name} fields must share leading shape {lead}, field {n!r} has {shape}")
            if n == "indices":
                if not (arr.dtype.kind in "iu" if numpy_in else A.is_int(arr)):
                    raise ValidationError(f"field 'indices' must have an integer dtype, got {arr.dtype}")
                if A.numel(arr) > 0 and (not numpy_in or _unsigned(arr).max() >= num_classes):
                    # numpy: one reduction found a value out of range (negatives read as unsigned are >= C)
                    a = A.i64(arr) if A.is_torch(arr) else arr  # torch has no min/max for uint16
                    lo, hi = int(a.min()), int(a.max())
                    if lo < 0 or hi >= num_classes:
                        raise ValidationError(
                            f"field 'indices' must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
            elif np.dtype(spec.dtype).kind == "f":
                if not (arr.dtype.kind == "f" if numpy_in else A.is_float(arr)):
                    raise ValidationError(f"field {n!r} must have a floating dtype, got {arr.dtype}")
            elif not (arr.dtype.kind in "iu" if numpy_in else A.is_int(arr)):
                raise ValidationError(f"field {n!r} must have an integer dtype ({spec.dtype}), got {arr.dtype}")

    def field_problems(self, fields: Mapping, num_classes: int) -> list[tuple[str, np.ndarray]]:
        """Rules broken by stored (numpy) fields: ``[(rule, mask of bad crops over the leading dims)]``.

        Field names, shapes and dtype kinds are checked first (raising ValidationError, as ``decode`` does,
        except for the index range, which is reported here). Crops already reported under an earlier rule
        are not reported again.
        """
        specs = self.fields(num_classes)
        missing = [n for n in specs if n not in fields]
        if missing:
            raise ValidationError(f"{self.name} fields must contain {list(specs)}, missing {missing}")
        f = {n: np.asarray(fields[n]) for n in specs}
        for n, spec in specs.items():
            v = f[n]
            nt = len(spec.shape)
            if v.ndim < nt or v.shape[v.ndim - nt:] != spec.shape:
                raise ValidationError(f"field {n!r} must have trailing shape {spec.shape}, got shape {v.shape}")
            if np.dtype(spec.dtype).kind != v.dtype.kind and not (
                    np.issubdtype(np.dtype(spec.dtype), np.integer) and np.issubdtype(v.dtype, np.integer)):
                raise ValidationError(f"field {n!r} must have dtype {spec.dtype}, got {v.dtype}")
        first = next(iter(specs))
        lead: tuple[int, ...] = f[first].shape[: f[first].ndim - len(specs[first].shape)]
        out: list[tuple[str, np.ndarray]] = []
        known = np.zeros(lead, np.bool_)

        def add(rule: str, bad: np.ndarray) -> None:
            per_crop = bad.reshape(lead + (-1,)).any(-1) if bad.shape != lead else bad
            new = np.asarray(per_crop & ~known)
            if new.any():
                out.append((rule, new))
                known[...] |= new

        idx = f.get("indices")
        if idx is not None:
            i = idx.astype(np.int64)
            add(f"class indices in [0, {num_classes})", (i < 0) | (i >= num_classes))
            if i.ndim > len(lead) and i.shape[-1] > 1:
                s = np.sort(i, -1)
                add("distinct top-K class indices", (s[..., 1:] == s[..., :-1]))
        self._value_problems(f, num_classes, add)
        return out

    def _value_problems(self, f: dict, num_classes: int, add) -> None:
        p = f.get("probs")
        if p is None or self.quantized:  # every uint8 code is a valid q8 probability
            return
        pf = p.astype(np.float32)
        add(f"probabilities finite in [0, 1 + {PROB_ATOL}]", ~np.isfinite(pf) | (pf < 0) | (pf > 1 + PROB_ATOL))

    def validate_fields(self, fields: Mapping, num_classes: int) -> None:
        """Raise ValidationError for the first rule of :meth:`field_problems` broken, naming the crop."""
        for rule, bad in self.field_problems(fields, num_classes):
            where = tuple(int(x) for x in np.argwhere(bad)[0])
            raise ValidationError(f"{self.name} fields must hold {rule}. Got {int(bad.sum())} bad crops, "
                                  f"first at {where}.")

    # -- conversion
    def conversion_problem(self, src: LabelCodec) -> str | None:
        """Why ``src``'s stored fields cannot become this codec's fields (None when they can)."""
        if src.kept_classes is None:
            return None
        if self.kept_classes is None:
            return (f"a {src.describe()} store does not hold the full C-way distribution that {self.describe()} "
                    f"stores; only a store holding every class (full, logits with k=None) can be converted to it")
        if self.has_probs and not src.has_probs:
            return (f"a {src.describe()} store keeps only the argmax class, not the teacher's probability that "
                    f"{self.describe()} needs")
        if self.kept_classes > src.kept_classes:
            what = "the top-1 class and its probability" if src.kept_classes == 1 else \
                f"the top {src.kept_classes} classes"
            return f"a {src.describe()} store keeps only {what}; {self.describe()} needs the top {self.kept_classes}"
        return None

    def sorted_probs(self, fields: Mapping, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(indices int64, probs float32 or None), shape (..., n): the stored classes, descending (numpy)."""
        raise NotImplementedError

    def from_sorted(self, indices: np.ndarray, probs: np.ndarray | None, num_classes: int) -> dict:
        """This codec's fields from :meth:`sorted_probs` output of a source it can convert from (numpy)."""
        raise NotImplementedError

    def _finish(self, out: dict, num_classes: int) -> dict:
        return {n: np.asarray(out[n]).astype(spec.dtype, copy=False) for n, spec in self.fields(num_classes).items()}

    # -- reporting
    def describe(self) -> str:
        """Short human name: ``"ms K=5"``, ``"full"``."""
        return self.name + (f" K={self.k}" if self.k is not None else "")

    def roles(self) -> dict[str, str]:
        """``{field: role}``: which calibrated compression ratio of ``fkdstore.report`` applies to each field."""
        raise NotImplementedError

    def paper_values_per_crop(self, num_classes: int) -> int:
        """Float32 values per crop in the paper's Table 2: 4 coordinates + 1 flip + the label values."""
        raise NotImplementedError

    def _q(self) -> str:
        return "_q8" if self.quantized else ""
