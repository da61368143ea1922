"""Loading ``torch.save`` files from other systems without executing code from them: the one home of the
allow-list.

:func:`load` calls ``torch.load(weights_only=True)`` with only numpy's array-rebuilding globals allowed (both
``numpy.core.*``, written by numpy 1, and ``numpy._core.*``, numpy 2), so a file can rebuild tensors, numpy
arrays, dtypes, lists, tuples, dicts and scalars, and nothing else. ``trust_pickle=True`` uses
``weights_only=False``, which runs whatever the pickle says: only for files from a source the user trusts.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import FkdstoreError

__all__ = ["load", "numpy_safe_globals"]


def numpy_safe_globals() -> list:
    """What torch's weights-only unpickler needs to rebuild plain numpy arrays and scalars (no code
    execution)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in ("bool", "float16", "float32", "float64", "int8", "int16", "int32",
                                          "int64", "uint8", "uint16", "uint32", "uint64")]
    out: list = [np.ndarray, np.dtype, *dtypes]
    for fn, name in ((_reconstruct, "_reconstruct"), (scalar, "scalar")):
        out += [fn, (fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    return out


def load(path: str | os.PathLike, *, what: str = "file", trust_pickle: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU through the safe allow-list (see the module docstring). Any
    failure raises :class:`~fkdstore.errors.FkdstoreError` naming ``what`` and the file."""
    import torch

    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)  # trusted input only: runs pickled code
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = str(e).strip().splitlines()
        hint = "" if trust_pickle else "; if the files come from a source you trust, pass --trust-pickle"
        detail = next((ln for ln in lines if "Unsupported global" in ln), lines[-1] if lines else type(e).__name__)
        raise FkdstoreError(f"cannot load {what} {path}: {detail.strip()}{hint}") from e
