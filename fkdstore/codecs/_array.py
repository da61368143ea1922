"""numpy | torch array helpers shared by the codecs; torch is never imported here.

A value is a torch tensor only if torch is already imported (``sys.modules``): a caller cannot hold a tensor
without having imported torch, so numpy-only users never pay for (or need) torch.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np


def torch_module():
    """The already-imported torch module (call only after :func:`is_torch` returned True)."""
    return sys.modules["torch"]


def is_torch(x: Any) -> bool:
    t = sys.modules.get("torch")
    return t is not None and isinstance(x, t.Tensor)


def check_array(x: Any, what: str) -> None:
    if not (isinstance(x, np.ndarray) or is_torch(x)):
        raise TypeError(f"{what} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def is_float(x) -> bool:
    return x.is_floating_point() if is_torch(x) else x.dtype.kind == "f"  # == np.issubdtype(.., np.floating)


def is_int(x) -> bool:
    if is_torch(x):
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch_module().bool
    return x.dtype.kind in "iu"  # == np.issubdtype(x.dtype, np.integer)


def numel(x) -> int:
    return x.numel() if is_torch(x) else x.size


def cast(x, dtype: str):
    if is_torch(x):
        return x.to(getattr(torch_module(), dtype))
    return np.asarray(x).astype(dtype, copy=False)


def cast_down(x, dtype: str):
    """``x`` (float64) cast to ``dtype`` rounded toward -inf (never above ``x``): the round-to-nearest cast,
    stepped one ulp down where it rounded up. numpy and torch give identical bits."""
    y = cast(x, dtype)
    if is_torch(x):
        t = torch_module()
        up = y.to(t.float64) > x
        return t.where(up, t.nextafter(y, t.full_like(y, -math.inf)), y)
    up = y.astype(np.float64) > x
    return np.where(up, np.nextafter(y, np.asarray(-np.inf, y.dtype)), y).astype(dtype, copy=False)


def f32(x):
    return x.to(torch_module().float32) if is_torch(x) else np.asarray(x, dtype=np.float32)


def f64(x):
    return x.to(torch_module().float64) if is_torch(x) else np.asarray(x, dtype=np.float64)


def i64(x):
    return x.to(torch_module().int64) if is_torch(x) else np.asarray(x).astype(np.int64, copy=False)


def topk_indices(p, k: int):
    """Indices (int64) of the k largest entries along the last axis, descending, ties -> lower index."""
    if is_torch(p):
        return torch_module().sort(p, dim=-1, descending=True, stable=True).indices[..., :k]
    return np.argsort(-p, axis=-1, kind="stable")[..., :k].astype(np.int64, copy=False)


def argmax(p):
    if is_torch(p):
        return torch_module().argmax(p, dim=-1)  # documented: first maximal index
    return np.argmax(p, axis=-1, keepdims=True)[..., 0]  # 0-d array, not a scalar, for 1-D input


def gather(p, idx):
    if is_torch(p):
        return torch_module().gather(p, -1, idx)
    return np.take_along_axis(p, idx, axis=-1)


def scatter_into(base, idx, vals):
    """Write ``vals`` at class positions ``idx`` (shape (..., n)) of ``base`` (..., C); returns it."""
    if is_torch(base):
        return base.scatter_(-1, idx.to(torch_module().int64), vals.to(base.dtype))
    idx = np.asarray(idx)
    if base.flags.c_contiguous and idx.shape[:-1] == base.shape[:-1] and idx.ndim == base.ndim and base.size:
        # one 2-D fancy assignment over the rows flattened (several times cheaper than put_along_axis for a
        # few rows); indices must be in [0, C), which decode checks before calling this
        c, n = base.shape[-1], idx.shape[-1]
        rows = base.size // c
        v = vals if getattr(vals, "shape", None) == idx.shape else np.broadcast_to(vals, idx.shape)
        base.reshape(rows, c)[_row_numbers(rows), idx.reshape(rows, n)] = v.reshape(rows, n)
        return base
    np.put_along_axis(base, idx.astype(np.intp), vals, axis=-1)
    return base


_ROWS: dict[int, np.ndarray] = {}


def _row_numbers(rows: int) -> np.ndarray:
    """``arange(rows)[:, None]`` (read-only; shared for the small row counts decode sees per batch)."""
    r = _ROWS.get(rows)
    if r is None:
        r = np.arange(rows, dtype=np.intp)[:, None]
        r.flags.writeable = False
        if rows <= 4096 and len(_ROWS) < 64:
            _ROWS[rows] = r
    return r


def filled(like, shape, value, dtype: str = "float32"):
    """Array of ``shape`` filled with ``value`` (scalar or (..., 1) array), framework/device of ``like``."""
    if is_torch(like):
        torch = torch_module()
        out = torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
        if is_torch(value):  # copy_ of an expanded view: one broadcast copy, cheaper than out[...] = value on CPU
            return out.copy_(value.to(out.dtype).expand(shape))
        return out.fill_(float(value))
    out = np.empty(shape, dtype=dtype)
    out[...] = value
    return out


def copy(x):
    return x.clone() if is_torch(x) else np.array(x, copy=True)


def f32_copy(x):
    """A float32 copy that never aliases ``x`` (one allocation for numpy input)."""
    return x.to(torch_module().float32, copy=True) if is_torch(x) else np.array(x, dtype=np.float32, copy=True)


def sum_last(x):
    return x.sum(-1) if is_torch(x) else x.sum(-1, dtype=x.dtype)


def seq_sum_last(x):
    """Left-to-right sum over a short last axis: bit-identical in numpy and torch (CPU or GPU)."""
    s = x[..., 0]
    for j in range(1, x.shape[-1]):
        s = s + x[..., j]
    return s


def clamp0(x):
    return x.clamp(min=0) if is_torch(x) else np.maximum(x, np.zeros((), x.dtype))


def floor(x):
    return torch_module().floor(x) if is_torch(x) else np.floor(x)


def minimum(a, b):
    """Elementwise minimum of two arrays of one framework (NaN-free inputs)."""
    return where(a < b, a, b)


def maximum(a, b):
    """Elementwise maximum of two arrays of one framework (NaN-free inputs)."""
    return where(a > b, a, b)


def clip(x, lo: float, hi: float):
    return x.clamp(lo, hi) if is_torch(x) else np.clip(x, lo, hi)


def exp(x):
    return torch_module().exp(x) if is_torch(x) else np.exp(x)


def log(x):
    """Natural log; log(0) = -inf without a warning."""
    if is_torch(x):
        return torch_module().log(x)
    with np.errstate(divide="ignore"):
        return np.log(x)


def amax_last(x, keepdim=True):
    if is_torch(x):
        return x.amax(-1, keepdim=keepdim)
    return x.max(-1, keepdims=keepdim)


def concat_last(a, b):
    if is_torch(a):
        return torch_module().cat([a, b], -1)
    return np.concatenate([a, b], -1)


def where(cond, a, b):
    if is_torch(cond):
        torch = torch_module()
        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def table_lookup(table: np.ndarray, codes):
    """``table[codes]`` for a small constant numpy table, in the framework/device of ``codes``."""
    if is_torch(codes):
        torch = torch_module()
        t = torch.tensor(table, device=codes.device)
        return t[codes.to(torch.int64)]
    return table[np.asarray(codes).astype(np.intp)]


def searchsorted_right(table: np.ndarray, x):
    """Index of the largest ``table`` entry <= ``x`` (``-1`` when none); ``table`` sorted ascending."""
    if is_torch(x):
        torch = torch_module()
        t = torch.tensor(table, device=x.device)
        return torch.searchsorted(t, x.to(t.dtype).contiguous(), right=True) - 1
    return np.searchsorted(table, np.asarray(x, dtype=table.dtype), side="right").astype(np.int64) - 1
