"""Label codecs: how one crop's teacher probability vector is stored and rebuilt.

Contract (every codec):

* ``codec.fields(C)`` -> ordered ``{name: FieldSpec(shape, dtype)}``: the arrays ``encode`` returns, with
  the trailing shape per crop.  Index fields use :func:`index_dtype` (``"uint16"`` when ``C <= 65536``,
  else ``"int32"``).  Raises :class:`ValidationError` when the codec cannot store ``C`` classes (``k > C``).
* ``codec.encode(probs)``: ``probs`` has shape ``(..., C)`` (any number of leading dims); returns fields
  of shape ``(...,) + spec.shape`` in the dtypes of ``fields(C)``.  numpy in -> numpy out; torch in ->
  torch out on the same device.  Normalisation is *not* checked here: call :func:`validate_probs`.
* ``codec.decode(fields, C)`` -> ``(..., C)`` float32, same framework/device as the fields; vectorised
  (scatter / put_along_axis; numpy and torch results are bit-identical).  It checks field names, shapes,
  dtype kinds and the index range ``[0, C)`` (one host sync on a GPU).  Extra keys are ignored.
* ``codec.kept_mass(fields)`` -> ``(...,)`` float32: stored probability mass (NaN for ``hard``).
* Selection rule, shared by all codecs: classes are ranked by the *input* probability, descending, ties
  broken by the lower class index (stable argsort of ``-p``).  So ``Hard``/``Smoothing`` store the top-1
  of ``MarginalSmoothing``/``MarginalReNorm``, and numpy and torch give the same indices.
* ``get_config()`` -> JSON-only dict with ``"name"``; ``from_config(cfg)`` rebuilds an equal codec
  (``cfg`` is copied, not consumed).  Codecs are frozen dataclasses: equal iff their configs are equal,
  and ``repr`` is a constructor call.

Codecs (paper eqs. (3)-(7); ``p`` = teacher probabilities, ``C`` classes, ``T`` = top-k set):

* ``full``      Full(dtype):  stores ``p`` (cast to ``dtype``); decode = ``p`` as float32.
* ``hard``      Hard():  stores ``argmax p``; decode = one-hot.
* ``smoothing`` Smoothing(dtype), eq. (4):  stores argmax and ``p_max``; decode ``p_max`` at the argmax
  and ``(1 - p_max) / (C - 1)`` elsewhere.
* ``ms``        MarginalSmoothing(k, dtype), eq. (5):  stores top-k indices and probs, descending;
  decode keeps them and puts ``(1 - sum_T p) / (C - k)`` on every other class.
* ``mr``        MarginalReNorm(k, dtype), eqs. (6)-(7):  same stored fields as ``ms`` (the raw top-k
  probs, so ``kept_mass`` is meaningful); decode = top-k divided by their sum, zero elsewhere.

The residual ``1 - stored mass`` is clamped at 0, so rounding of the stored probs to float16 never yields
negative labels; decoded rows then sum to 1 within the storage rounding (about ``k * 2**-11``).
``encode(decode(f)) == f`` holds exactly for ``full``, ``hard``, ``smoothing`` and ``ms`` when the stored
probs are distinct and each spread residual is below the smallest stored prob; for ``mr`` the indices are
reproduced and the stored probs are the renormalised ones.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ValidationError

try:  # torch is a dependency, but keep numpy-only use importable
    import torch
except ImportError:  # pragma: no cover
    torch = None

__all__ = [
    "FieldSpec", "LabelCodec", "Full", "Hard", "Smoothing", "MarginalSmoothing", "MarginalReNorm",
    "REGISTRY", "ALIASES", "register_codec", "from_config", "get_codec", "index_dtype", "validate_probs",
]

PROB_DTYPES = ("float16", "float32")
MAX_UINT16_CLASSES = 65536


@dataclass(frozen=True)
class FieldSpec:
    """One stored label field per crop slot: trailing ``shape`` per crop and numpy ``dtype`` name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValidationError(f"num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def index_dtype(num_classes: int) -> str:
    """Dtype of stored class indices: ``"uint16"`` when ``num_classes <= 65536``, else ``"int32"``."""
    return "uint16" if _check_num_classes(num_classes) <= MAX_UINT16_CLASSES else "int32"


# ----------------------------------------------------------------------------- array helpers (numpy | torch)
def _is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _check_array(x: Any, what: str) -> None:
    if not (isinstance(x, np.ndarray) or _is_torch(x)):
        raise TypeError(f"{what} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def _cast(x, dtype: str):
    if _is_torch(x):
        return x.to(getattr(torch, dtype))
    return np.asarray(x).astype(dtype, copy=False)


def _topk_indices(p, k: int):
    """Indices (int64) of the k largest entries along the last axis, descending, ties -> lower index."""
    if _is_torch(p):
        return torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k]
    return np.argsort(-p, axis=-1, kind="stable")[..., :k].astype(np.int64, copy=False)


def _argmax(p):
    if _is_torch(p):
        return torch.argmax(p, dim=-1)  # documented: first maximal index
    return np.argmax(p, axis=-1, keepdims=True)[..., 0]  # 0-d array, not a scalar, for 1-D input


def _gather(p, idx):
    if _is_torch(p):
        return torch.gather(p, -1, idx)
    return np.take_along_axis(p, idx, axis=-1)


def _f32(x):
    return x.to(torch.float32) if _is_torch(x) else np.asarray(x, dtype=np.float32)


def _scatter_into(base, idx, vals):
    """Write ``vals`` at class positions ``idx`` (shape (..., n)) of float32 ``base`` (..., C); returns it."""
    if _is_torch(base):
        return base.scatter_(-1, idx.to(torch.int64), vals)
    np.put_along_axis(base, idx.astype(np.intp), vals, axis=-1)
    return base


def _filled(like, shape, value):
    """float32 array of ``shape`` filled with ``value`` (scalar or (..., 1) array), framework/device of ``like``."""
    if _is_torch(like):
        out = torch.empty(shape, dtype=torch.float32, device=like.device)
        if _is_torch(value):  # copy_ of an expanded view: ~20x faster than out[...] = value on CPU
            return out.copy_(value.to(torch.float32).expand(shape))
        return out.fill_(float(value))
    out = np.empty(shape, dtype=np.float32)
    out[...] = value
    return out


def _copy(x):
    return x.clone() if _is_torch(x) else np.array(x, copy=True)


def _sum_last(x):
    return x.sum(-1) if _is_torch(x) else x.sum(-1, dtype=np.float32)


def _seq_sum_last(x):
    """Left-to-right float32 sum over a short last axis: bit-identical in numpy and torch (CPU or GPU)."""
    s = x[..., 0]
    for j in range(1, x.shape[-1]):
        s = s + x[..., j]
    return s


def _clamp0(x):
    return x.clamp(min=0) if _is_torch(x) else np.maximum(x, np.float32(0))


# ----------------------------------------------------------------------------- codecs
@dataclass(frozen=True, kw_only=True)
class LabelCodec:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                if not isinstance(value, str):
                    raise TypeError(f"{type(self).__name__}.dtype must be a str, got {type(value).__name__}")
                if value not in PROB_DTYPES:
                    raise ValidationError(f"{type(self).__name__}.dtype must be one of {PROB_DTYPES}, got {value!r}")
            elif f.name == "k":
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{type(self).__name__}.k must be an int, got {type(value).__name__}")
                if value < 1:
                    raise ValidationError(f"{type(self).__name__}.k must be >= 1, got {value}")
                object.__setattr__(self, "k", int(value))

    def get_config(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def fields(self, num_classes: int) -> dict[str, FieldSpec]:
        raise NotImplementedError

    def raw_bytes_per_crop(self, num_classes: int) -> int:
        """Sum of the stored field bytes of one crop, before compression."""
        return sum(spec.nbytes for spec in self.fields(num_classes).values())

    def encode(self, probs) -> dict:
        _check_array(probs, "probs")
        if probs.ndim < 1:
            raise ValidationError(f"probs must have shape (..., C) with ndim >= 1, got shape {tuple(probs.shape)}")
        specs = self.fields(int(probs.shape[-1]))
        out = self._encode(probs)
        return {name: _cast(out[name], spec.dtype) for name, spec in specs.items()}

    def decode(self, fields: Mapping, num_classes: int):
        self._check_fields(fields, num_classes)
        return self._decode(fields, num_classes)

    def kept_mass(self, fields: Mapping):
        """Probability mass carried by the stored entries, shape (...,) float32 (NaN for ``hard``)."""
        return _sum_last(_f32(fields["probs"]))

    def _check_fields(self, fields: Mapping, num_classes: int) -> None:
        if not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a mapping of name -> array, got {type(fields).__name__}")
        specs = self.fields(num_classes)
        missing = [n for n in specs if n not in fields]
        if missing:
            raise ValidationError(f"{self.name} fields must contain {list(specs)}, missing {missing}")
        kinds = {_is_torch(fields[n]) for n in specs}
        for n in specs:
            _check_array(fields[n], f"field {n!r}")
        if len(kinds) > 1:
            raise TypeError(f"{self.name} fields must all be numpy or all torch, got a mix")
        lead = None
        for n, spec in specs.items():
            arr = fields[n]
            shape = tuple(arr.shape)
            nt = len(spec.shape)
            if shape[len(shape) - nt:] != spec.shape or len(shape) < nt:
                raise ValidationError(f"field {n!r} must have trailing shape {spec.shape}, got shape {shape}")
            lead = shape[: len(shape) - nt] if lead is None else lead
            if shape[: len(shape) - nt] != lead:
                raise ValidationError(f"{self.name} fields must share leading shape {lead}, field {n!r} has {shape}")
            is_int = (not arr.is_floating_point() and not arr.is_complex() and arr.dtype != torch.bool) \
                if _is_torch(arr) else np.issubdtype(arr.dtype, np.integer)
            if n != "indices" and spec.dtype.startswith("float"):
                is_float = arr.is_floating_point() if _is_torch(arr) else np.issubdtype(arr.dtype, np.floating)
                if not is_float:
                    raise ValidationError(f"field {n!r} must have a floating dtype, got {arr.dtype}")
            if n == "indices":
                if not is_int:
                    raise ValidationError(f"field 'indices' must have an integer dtype, got {arr.dtype}")
                if (arr.numel() if _is_torch(arr) else arr.size) > 0:
                    a = arr.to(torch.int64) if _is_torch(arr) else arr  # torch has no min/max for uint16
                    lo, hi = int(a.min()), int(a.max())
                    if lo < 0 or hi >= num_classes:
                        raise ValidationError(
                            f"field 'indices' must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


@dataclass(frozen=True, kw_only=True)
class Full(LabelCodec):
    """Store the whole probability vector in ``dtype``."""

    name: ClassVar[str] = "full"
    dtype: str = "float16"

    def fields(self, num_classes):
        return {"probs": FieldSpec((_check_num_classes(num_classes),), self.dtype)}

    def _encode(self, p):
        return {"probs": _copy(p)}  # never alias the caller's array

    def _decode(self, f, num_classes):
        return _copy(_f32(f["probs"]))


@dataclass(frozen=True, kw_only=True)
class Hard(LabelCodec):
    """Store only the argmax; decode to a one-hot vector."""

    name: ClassVar[str] = "hard"

    def fields(self, num_classes):
        return {"indices": FieldSpec((), index_dtype(num_classes))}

    def _encode(self, p):
        return {"indices": _argmax(p)}

    def _decode(self, f, num_classes):
        idx = f["indices"]
        out = _filled(idx, tuple(idx.shape) + (num_classes,), 0.0)
        ones = _filled(idx, tuple(idx.shape) + (1,), 1.0)
        return _scatter_into(out, idx[..., None], ones)

    def kept_mass(self, fields):
        idx = fields["indices"]
        return _filled(idx, tuple(idx.shape), float("nan"))


@dataclass(frozen=True, kw_only=True)
class Smoothing(LabelCodec):
    """Eq. (4): argmax and p_max; the rest spread uniformly over the other C - 1 classes."""

    name: ClassVar[str] = "smoothing"
    dtype: str = "float16"

    def fields(self, num_classes):
        return {"indices": FieldSpec((), index_dtype(num_classes)), "probs": FieldSpec((), self.dtype)}

    def _encode(self, p):
        idx = _argmax(p)
        return {"indices": idx, "probs": _gather(p, idx[..., None])[..., 0]}

    def _decode(self, f, num_classes):
        idx, pm = f["indices"], _f32(f["probs"])[..., None]
        other = _clamp0(1.0 - pm) / max(num_classes - 1, 1)
        out = _filled(pm, tuple(pm.shape[:-1]) + (num_classes,), other)
        return _scatter_into(out, idx[..., None], pm)

    def kept_mass(self, fields):
        return _copy(_f32(fields["probs"]))


@dataclass(frozen=True, kw_only=True)
class _TopK(LabelCodec):
    k: int = 5
    dtype: str = "float16"

    def fields(self, num_classes):
        c = _check_num_classes(num_classes)
        if self.k > c:
            raise ValidationError(f"{self.name} needs k <= num_classes, got k={self.k} > num_classes={c}")
        return {"indices": FieldSpec((self.k,), index_dtype(c)), "probs": FieldSpec((self.k,), self.dtype)}

    def _encode(self, p):
        idx = _topk_indices(p, self.k)
        return {"indices": idx, "probs": _gather(p, idx)}


@dataclass(frozen=True, kw_only=True)
class MarginalSmoothing(_TopK):
    """Eq. (5): top-k kept; the residual 1 - sum(top-k) spread uniformly over the other C - k classes."""

    name: ClassVar[str] = "ms"

    def _decode(self, f, num_classes):
        idx, pk = f["indices"], _f32(f["probs"])
        rest = _clamp0(1.0 - _seq_sum_last(pk))[..., None] / max(num_classes - self.k, 1)
        out = _filled(pk, tuple(pk.shape[:-1]) + (num_classes,), rest)
        return _scatter_into(out, idx, pk)


@dataclass(frozen=True, kw_only=True)
class MarginalReNorm(_TopK):
    """Eqs. (6)-(7): top-k divided by their sum, zero elsewhere (uniform over top-k if they sum to 0)."""

    name: ClassVar[str] = "mr"

    def _decode(self, f, num_classes):
        idx, pk = f["indices"], _f32(f["probs"])
        s = _seq_sum_last(pk)[..., None]
        if _is_torch(pk):
            vals = torch.where(s > 0, pk / torch.where(s > 0, s, torch.ones_like(s)), 1.0 / self.k)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                vals = np.where(s > 0, pk / np.where(s > 0, s, 1), np.float32(1.0 / self.k)).astype(np.float32)
        out = _filled(pk, tuple(pk.shape[:-1]) + (num_classes,), 0.0)
        return _scatter_into(out, idx, vals)


# ----------------------------------------------------------------------------- registry
REGISTRY: dict[str, type[LabelCodec]] = {}
ALIASES: dict[str, str] = {
    "marginal_smoothing": "ms", "marginal-smoothing": "ms",
    "marginal_renorm": "mr", "marginal-renorm": "mr", "mrn": "mr",
    "one-hot": "hard", "smooth": "smoothing",
}


def register_codec(cls: type[LabelCodec]) -> type[LabelCodec]:
    """Add a codec class to :data:`REGISTRY` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, LabelCodec)):
        raise TypeError(f"register_codec needs a LabelCodec subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValidationError(f"codec class must define a non-empty str name, got {cls.name!r}")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValidationError(f"codec name must be unique, got {cls.name!r} already used by {REGISTRY[cls.name]}")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (Full, Hard, Smoothing, MarginalSmoothing, MarginalReNorm):
    register_codec(_cls)


def get_codec(name: str, **kwargs) -> LabelCodec:
    """Build a codec by registered name or alias, e.g. ``get_codec("ms", k=10)``."""
    if not isinstance(name, str):
        raise TypeError(f"codec name must be a str, got {type(name).__name__}")
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in REGISTRY:
        raise ValidationError(
            f"codec name must be one of {sorted(REGISTRY)} or aliases {sorted(ALIASES)}, got {name!r}")
    try:
        return REGISTRY[key](**kwargs)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            fields = [f.name for f in dataclasses.fields(REGISTRY[key])]
            raise ValidationError(f"codec {key!r} accepts parameters {fields}, got {sorted(kwargs)}") from None
        raise


def from_config(cfg: dict) -> LabelCodec:
    """Inverse of ``codec.get_config()``; ``cfg`` is not modified."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"codec config must be a dict, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValidationError(f"codec config must have a 'name' key, got keys {sorted(cfg)}")
    return get_codec(cfg.pop("name"), **cfg)


# ----------------------------------------------------------------------------- input validation
def validate_probs(probs, num_classes: int, *, atol: float = 1e-3) -> None:
    """Check that ``probs`` (..., C) holds probability rows; raise ValidationError naming the first bad row.

    Rules: ndim >= 1, last dim == ``num_classes``, floating dtype, every value finite and >= 0, and each
    row's sum (accumulated in float32) satisfies ``|sum - 1| <= atol`` (default 1e-3).
    """
    _check_array(probs, "probs")
    c = _check_num_classes(num_classes)
    shape = tuple(probs.shape)
    if len(shape) < 1:
        raise ValidationError(f"probs must have shape (..., C) with ndim >= 1, got shape {shape}")
    if shape[-1] != c:
        raise ValidationError(f"probs last dim must equal num_classes={c}, got shape {shape}")
    if _is_torch(probs):
        if not probs.is_floating_point():
            raise ValidationError(f"probs must have a floating dtype, got {probs.dtype}")
        probs = probs.detach().to("cpu", torch.float32).numpy()
    elif not np.issubdtype(probs.dtype, np.floating):
        raise ValidationError(f"probs must have a floating dtype, got {probs.dtype}")
    if probs.size == 0:
        return
    x = probs.reshape(-1, c)

    def row(i: int):
        return tuple(int(v) for v in np.unravel_index(i, shape[:-1]))

    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise ValidationError(f"probs must be finite, got {float(x[i, j])} at row {row(i)} class {j}")
    bad = x < 0
    if bad.any():
        i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise ValidationError(f"probs must be >= 0, got {float(x[i, j]):.6g} at row {row(i)} class {j}")
    s = x.sum(-1, dtype=np.float32)
    bad = np.abs(s - np.float32(1)) > atol
    if bad.any():
        i = int(np.argmax(bad))
        raise ValidationError(f"probs rows must sum to 1 within atol={atol}, got sum {float(s[i]):.6g} at row {row(i)}")
