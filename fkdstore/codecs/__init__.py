"""Label codecs (numcodecs style): the contract is :mod:`fkdstore.codecs.base`, one module per codec, and
the registry here. Turning a user's codec argument into a codec has one home: :func:`as_codec`.

numpy only at import; torch is used only for torch tensors a caller passes in (and never imported here).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ..errors import ConversionError, ValidationError
from .base import (
    PROB_ATOL,
    PROB_DTYPES,
    FieldSpec,
    LabelCodec,
    index_dtype,
    parse_keys,
    parse_temperature,
    row_sum_atol,
    validate_logits,
    validate_probs,
)
from .full import Full
from .hard import Hard
from .logits import Logits
from .quant import Q8_PMIN, Q8_REL, Q8_TABLE, q8_bound
from .sampled import Sampled, crop_keys
from .smoothing import Smoothing
from .topk import MarginalReNorm, MarginalSmoothing

__all__ = [
    "FieldSpec", "LabelCodec", "Full", "Hard", "Smoothing", "MarginalSmoothing", "MarginalReNorm", "Logits",
    "Sampled", "crop_keys", "parse_keys", "REGISTRY", "ALIASES", "register_codec", "from_config", "get_codec",
    "as_codec", "parse_spec", "index_dtype", "validate_probs", "validate_logits", "parse_temperature", "row_sum_atol",
    "PROB_ATOL", "PROB_DTYPES", "Q8_TABLE", "Q8_REL", "Q8_PMIN", "q8_bound", "conversion_problem", "convert_fields",
]

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


for _cls in (Full, Hard, Smoothing, MarginalSmoothing, MarginalReNorm, Logits, Sampled):
    register_codec(_cls)


def _resolve(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"codec name must be a str, got {type(name).__name__}")
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in REGISTRY:
        raise ValidationError(
            f"codec name must be one of {sorted(REGISTRY)} or aliases {sorted(ALIASES)}, got {name!r}")
    return key


def get_codec(name_or_config: str | Mapping, **kwargs) -> LabelCodec:
    """Build a codec from a config dict (numcodecs style, copied) or a registered name/alias plus parameters.

    ``get_codec({"name": "ms", "k": 10})`` == ``get_codec("ms", k=10)``.
    """
    if isinstance(name_or_config, Mapping):
        cfg = dict(name_or_config)
        if "name" not in cfg:
            raise ValidationError(f"codec config must have a 'name' key, got keys {sorted(cfg)}")
        cfg.update(kwargs)
        name_or_config = cfg.pop("name")
        kwargs = cfg
    key = _resolve(name_or_config)
    cls = REGISTRY[key]
    params = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        near = {u: u.lower() for u in unknown if u.lower() in params}
        hint = f" (parameter names are lower case: {', '.join(repr(v) for v in near.values())})" if near else ""
        raise ValidationError(f"codec {key!r} parameters must be in {params}. Got unknown {unknown}{hint}.")
    return cls(**kwargs)


def from_config(cfg: Mapping) -> LabelCodec:
    """Inverse of ``codec.get_config()``; ``cfg`` is not modified. For a codec with ``strict_config`` (``sampled``)
    every parameter must be present: a store's config says how its labels were made, so no default fills in."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"codec config must be a dict, got {type(cfg).__name__}")
    if "name" in cfg:
        cls = REGISTRY[_resolve(cfg["name"])]
        if cls.strict_config:
            params = [f.name for f in dataclasses.fields(cls)]
            missing = [p for p in params if p not in cfg]
            if missing:
                raise ValidationError(f"codec {cls.name!r} config must spell every parameter {params}, "
                                      f"got {sorted(cfg)} (missing {missing})")
    return get_codec(cfg)


def _parse_value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def parse_spec(spec: str) -> dict:
    """A codec spec string -> config dict: ``"ms"``, ``"ms:k=5,dtype=q8"``, ``"logits:k=none"`` or JSON.

    The one parser of codec strings (CLI ``--codec``). Values are ints, floats, ``none``/``null``,
    ``true``/``false`` (any case) or strings: ``"logits:centred=true"``, ``"sampled:s=16,logp=true"``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"codec spec must be a str, got {type(spec).__name__}")
    s = spec.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValidationError(
                f"codec spec must be valid JSON when it starts with '{{'. Got {spec!r} ({e}).") from None
        if not isinstance(obj, dict):
            raise ValidationError(f"codec spec JSON must be an object. Got {spec!r}.")
        return obj
    name, _, rest = s.partition(":")
    cfg: dict[str, Any] = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValidationError(f"codec spec parameters must look like key=value. Got {part!r} in {spec!r}.")
        cfg[key.strip()] = _parse_value(value)
    return cfg


def as_codec(codec: LabelCodec | str | Mapping, *, k: int | None = None,
             default_k: int | None = None) -> LabelCodec:
    """The one place that turns a user's codec argument into a :class:`LabelCodec`.

    ``codec``: a LabelCodec (returned as is), a config dict, or a name / spec string (:func:`parse_spec`).
    ``k``: a top-K given apart from the codec (the ``--k`` CLI flag, ``convert(..., k=)``): merged into
    the config; ValidationError if the codec has no ``k`` or its config sets a different one.
    ``default_k``: the ``k`` to use when neither the config nor ``k`` sets one (e.g. a source store's K
    in ``convert``); ignored by codecs without ``k``. Otherwise the codec class's default applies.
    """
    if isinstance(codec, LabelCodec):
        if k is not None and codec.k != k:
            raise ValidationError(f"k={k} disagrees with the codec {codec!r}; set k inside the codec.")
        return codec
    if isinstance(codec, str):
        cfg = parse_spec(codec)
        try:
            return _as_codec(cfg, k, default_k)
        except ValidationError as e:
            if ":" not in codec:  # a bare name: the message already quotes it
                raise
            raise ValidationError(f"{str(e).rstrip('.')} in the codec spec {codec!r}.") from None
    elif isinstance(codec, Mapping):
        cfg = dict(codec)
    else:
        raise TypeError(f"codec must be a LabelCodec, a name, a spec string or a config dict. "
                        f"Got {type(codec).__name__}.")
    return _as_codec(cfg, k, default_k)


def _as_codec(cfg: dict, k: int | None, default_k: int | None) -> LabelCodec:
    key = _resolve(cfg.get("name", ""))
    has_k = "k" in {f.name for f in dataclasses.fields(REGISTRY[key])}
    if k is not None:
        if not has_k:
            raise ValidationError(f"k applies to the top-K codecs ({', '.join(_k_codecs())}) only. "
                                  f"Got codec {key!r} with k={k}.")
        if "k" in cfg and cfg["k"] != k:
            raise ValidationError(f"k is given twice with different values. Got k={cfg['k']} in the codec and k={k}.")
        cfg["k"] = k
    elif has_k and "k" not in cfg and default_k is not None:
        cfg["k"] = default_k
    return get_codec(cfg)


def _k_codecs() -> list[str]:
    return sorted(n for n, c in REGISTRY.items() if "k" in {f.name for f in dataclasses.fields(c)})


# ------------------------------------------------------------------------ conversion without the teacher


def conversion_problem(src: LabelCodec, dst: LabelCodec) -> str | None:
    """Why ``src -> dst`` is impossible, or None when it is possible (``dst.conversion_problem(src)``)."""
    return dst.conversion_problem(src)


def convert_fields(src: LabelCodec, dst: LabelCodec, fields: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Stored fields of ``src`` -> stored fields of ``dst`` (leading dims kept). Raises ConversionError."""
    why = conversion_problem(src, dst)
    if why:
        raise ConversionError(f"cannot convert {src.describe()} -> {dst.describe()}: {why}")
    idx, p = src.sorted_probs(fields, num_classes)
    return dst.from_sorted(idx, p, num_classes)
