"""Registry of augmentation policies by name (numcodecs style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from fkdstore.augment.base import Policy
from fkdstore.errors import ValidationError

__all__ = ["register_policy", "get_policy", "registered_policies"]

PolicyT = TypeVar("PolicyT", bound=type[Policy])
_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: PolicyT) -> PolicyT:
    """Register a :class:`~fkdstore.augment.base.Policy` subclass under ``cls.name`` (usable as a decorator)."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValidationError(f"policy name must be an identifier. Got {name!r}.")
    _REGISTRY[name] = cls
    return cls


def registered_policies() -> dict[str, type[Policy]]:
    """A copy of the registry: ``{name: class}``."""
    return dict(_REGISTRY)


def get_policy(config: Mapping[str, Any]) -> Policy:
    """Build a policy from its config ``{"name": ..., **fields}`` (the input is copied, not modified)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"policy config must be a dict. Got {type(config).__name__}.")
    config = dict(config)
    name = config.get("name")
    if name not in _REGISTRY:
        raise ValidationError(f"augment policy name must be one of {sorted(_REGISTRY)}. Got {name!r}.")
    return _REGISTRY[name].from_config(config)
