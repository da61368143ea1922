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

__all__ = ["positive_int", "non_negative_int"]


def _int_at_least(name: str, value: Any, minimum: int, rule: str) -> int:
    # bool is an int subclass, and numpy integers register as numbers.Integral.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {rule}. Got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValidationError(f"{name} must be {rule}. Got {int(value)}.")  # "-3", not "np.int32(-3)"
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as a Python ``int`` when it is an integer ``>= 1`` (numpy integers accepted).

    Raises :class:`TypeError` for anything that is not an integer (``bool``, ``float`` and ``str``
    included) and :class:`~fkdstore.errors.ValidationError` for an integer ``< 1``, e.g.
    ``"num_images must be a positive integer. Got 0."``.
    """
    return _int_at_least(name, value, 1, "a positive integer")


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as a Python ``int`` when it is an integer ``>= 0``; errors as :func:`positive_int`."""
    return _int_at_least(name, value, 0, "a non-negative integer")
