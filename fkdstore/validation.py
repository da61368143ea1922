"""Small argument checks shared by the whole library (one home for each rule).

Convention (every public function of fkdstore follows it):

* a value of the wrong *type* raises :class:`TypeError`;
* a value of the right type that breaks a rule raises :class:`fkdstore.errors.ValidationError`
  (a :class:`ValueError`);
* messages read ``"<name> must be <rule>. Got <value>."``, with the value as ``repr``.

The command line parses its integer options with the same functions (see :mod:`fkdstore.cli`), so an
option and the keyword argument it feeds reject a value with the same rule.

This module imports nothing beyond the standard library and :mod:`fkdstore.errors`.
"""

from __future__ import annotations

import numbers
from typing import Any

from .errors import ValidationError

__all__ = ["positive_int", "non_negative_int", "int_in_range", "boolean"]


def int_in_range(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python ``int`` when it is an integer in ``[lo, hi]`` (``hi=None``: no upper bound).

    The one integer check of the library; :func:`positive_int` and :func:`non_negative_int` are its
    common cases. ``bool`` is refused (it is an ``int`` subclass); numpy integers are accepted.
    """
    rule = ("a positive integer" if lo == 1 else "a non-negative integer" if lo == 0 else f"an integer >= {lo}") \
        if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {rule}. Got {value!r} ({type(value).__name__}).")
    n = int(value)  # "-3" in messages, not "np.int32(-3)"
    if n < lo or (hi is not None and n > hi):
        raise ValidationError(f"{name} must be {rule}. Got {n}.")
    return n


def positive_int(name: str, value: Any) -> int:
    """``value`` as a Python ``int`` when it is an integer ``>= 1`` (numpy integers accepted).

    Raises :class:`TypeError` for anything that is not an integer (``bool``, ``float`` and ``str``
    included) and :class:`~fkdstore.errors.ValidationError` for an integer ``< 1``, e.g.
    ``"num_images must be a positive integer. Got 0."``.
    """
    return int_in_range(name, value, 1)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as a Python ``int`` when it is an integer ``>= 0``; errors as :func:`positive_int`."""
    return int_in_range(name, value, 0)


def boolean(name: str, value: Any) -> bool:
    """``value`` when it is a ``bool`` (numpy bools accepted); anything else (``0``, ``"yes"``) is a TypeError."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be True or False. Got {value!r} ({type(value).__name__}).")
    return bool(value)
