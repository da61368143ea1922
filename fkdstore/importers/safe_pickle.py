"""Loading ``torch.save`` files from other systems without executing code from them: the one home of the
allow-list.

:func:`load` calls ``torch.load(weights_only=True)`` with only numpy's array-rebuilding globals allowed (both
``numpy.core.*``, written by numpy 1, and ``numpy._core.*``, numpy 2), so a file can rebuild tensors, numpy
arrays, dtypes, lists, tuples, dicts and scalars, and nothing else. torch's weights-only unpickler does not
read pickle protocol 4's framing (``torch.save(..., pickle_protocol=4)``, e.g. Apple's ml-dr files); such a
file holding no tensors is read by :class:`RestrictedUnpickler`, Python's unpickler limited to the same
numpy globals. ``trust_pickle=True`` uses ``weights_only=False``, which runs whatever the pickle says: only
for files from a source the user trusts.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from typing import Any

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]

from ..errors import FkdstoreError

__all__ = ["load", "numpy_safe_globals", "RestrictedUnpickler"]


def numpy_safe_globals() -> list:
    """What torch's weights-only unpickler needs to rebuild plain numpy arrays and scalars (no code
    execution)."""
    dtypes = [type(np.dtype(t)) for t in ("bool", "float16", "float32", "float64", "int8", "int16", "int32",
                                          "int64", "uint8", "uint16", "uint32", "uint64")]
    out: list = [np.ndarray, np.dtype, *dtypes]
    for fn, name in ((_reconstruct, "_reconstruct"), (scalar, "scalar")):
        out += [fn, (fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """Python's unpickler allowed to resolve only the globals of :func:`numpy_safe_globals` (numpy arrays,
    scalars and dtypes) and refusing persistent ids (tensor storages): plain containers, numbers, strings and
    numpy objects load, nothing else is imported or called."""

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    @classmethod
    def allowed(cls) -> dict[tuple[str, str], Any]:
        if cls._ALLOWED is None:
            table: dict[tuple[str, str], Any] = {}
            for g in numpy_safe_globals():
                if isinstance(g, tuple):
                    module, _, name = g[1].rpartition(".")
                    table[(module, name)] = g[0]
                else:
                    table[(g.__module__, g.__name__)] = g
            table[("numpy", "dtype")] = np.dtype
            table[("numpy", "ndarray")] = np.ndarray
            cls._ALLOWED = table
        return cls._ALLOWED

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported global: {module}.{name} (not in the safe allow-list)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a tensor in a protocol-4 file: torch's weights-only loader cannot read "
                                     "this file's framing and the restricted loader holds no tensors")


def _load_restricted(path: str | os.PathLike) -> Any:
    """The pickle of a ``torch.save`` zip file through :class:`RestrictedUnpickler`."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise pickle.UnpicklingError(f"not a torch.save zip file: {len(names)} data.pkl entries")
        return RestrictedUnpickler(io.BytesIO(z.read(names[0]))).load()


def load(path: str | os.PathLike, *, what: str = "file", trust_pickle: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU through the safe allow-list (see the module docstring). Any
    failure raises :class:`~fkdstore.errors.FkdstoreError` naming ``what`` and the file."""
    import torch  # noqa: PLC0415 - torch is optional (fkdstore[torch]); core imports without it

    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)  # trusted input only: runs pickled code
        try:
            with torch.serialization.safe_globals(numpy_safe_globals()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")  # handled below
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported operand 149" not in str(e):  # 149 = FRAME: protocol 4, read it ourselves
                raise
            return _load_restricted(path)
    except Exception as e:
        lines = str(e).strip().splitlines()
        hint = "" if trust_pickle else "; if the files come from a source you trust, pass --trust-pickle"
        detail = next((ln for ln in lines if "Unsupported global" in ln), lines[-1] if lines else type(e).__name__)
        raise FkdstoreError(f"cannot load {what} {path}: {detail.strip()}{hint}") from e
