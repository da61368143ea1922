"""GaussianBlur (torchvision): a separable Gaussian filter with sigma drawn per slot, computed in float32.

Replay of a slot with stored ``sigma = blur_sigma > 0`` on a uint8 ``(H, W, 3)`` crop, kernel sizes
``(kx, ky)`` (odd; torchvision's ``kernel_size`` order: ``kx`` along the width, ``ky`` along the height):

1. Kernel (per axis, size ``k``, half-width ``h = (k - 1) / 2``): ``s = float(float16 sigma)``;
   ``e_j = exp(-x_j**2 / (2 s**2))`` with ``x_j = j - h`` for ``j = 0 .. k - 1``, and ``w_j = e_j / sum e``,
   computed in float64 and rounded once to float32.
2. Padding: ``numpy.pad(x, mode="reflect")`` by ``h`` on each side of the axis (torch's ``reflect``: the edge
   pixel is not repeated; mirrored again when ``h`` exceeds the side, where torchvision refuses).
3. Horizontal pass, then vertical pass, each in float32: ``acc = w_0 * x[.., i]``, then
   ``acc = acc + w_j * x[.., i + j]`` for ``j = 1 .. k - 1`` (every product and sum rounded to float32, in
   that order), over the padded float32 pixels.
4. ``round_half_even``, clip to ``[0, 255]``, uint8 (torchvision rounds with ``torch.round`` and casts).

torchvision (``_functional_tensor.gaussian_blur``, also its PIL path) convolves once with the float32
outer-product kernel ``w_y w_x^T`` (``conv2d``, an implementation-defined summation order) from a float32
kernel (``linspace``, ``exp``, sum): the same filter in exact arithmetic; the results can differ by one
level where a value lies within float32 rounding of ``.5`` (tests/test_augment_ssl.py measures it). The
stored sigma and this definition are what replay means (spec section 6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fkdstore.augment.base import Column, Policy, check_pixels, check_range, param, parse_float, parse_pair
from fkdstore.errors import ValidationError
from fkdstore.validation import int_in_range

__all__ = ["GaussianBlur", "gaussian_kernel", "blur"]

MAX_KERNEL = 255
SIGMA_RANGE = (1e-3, 1e3)  # stored as float16


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """The float32 1-D kernel of step 1 (module docstring)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    e = np.exp(-(x * x) / (2.0 * float(sigma) ** 2))
    return (e / e.sum()).astype(np.float32)


def _filter_axis(x: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Step 2 + 3 along ``axis`` of a float32 ``(H, W, 3)`` array."""
    h = (len(w) - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (h, h)
    xp = np.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    acc = w[0] * np.take(xp, np.arange(0, n), axis=axis)
    for j in range(1, len(w)):
        acc = acc + w[j] * np.take(xp, np.arange(j, j + n), axis=axis)
    return acc


def blur(pixels: np.ndarray, kernel_size: tuple[int, int], sigma: float) -> np.ndarray:
    """The blurred uint8 ``(H, W, 3)`` image (steps 1-4 of the module docstring)."""
    kx, ky = kernel_size
    x = pixels.astype(np.float32)
    x = _filter_axis(x, gaussian_kernel(kx, sigma), axis=1)
    x = _filter_axis(x, gaussian_kernel(ky, sigma), axis=0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _parse_kernel_size(value: Any) -> tuple[int, int]:
    """torchvision's ``kernel_size``: an int or an ``(kx, ky)`` pair of odd ints in [1, 255]."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"kernel_size must be an int or a pair of ints. Got {value!r}.")
    pair = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(pair) != 2:
        raise TypeError(f"kernel_size must be an int or a pair of ints. Got {value!r}.")
    kx, ky = (int_in_range(f"kernel_size[{i}]", v, 1, MAX_KERNEL) for i, v in enumerate(pair))
    if kx % 2 == 0 or ky % 2 == 0:
        raise ValidationError(f"kernel_size values must be odd. Got {value!r}.")
    return kx, ky


def _parse_sigma(value: Any) -> tuple[float, float]:
    """torchvision's ``sigma``: a number (fixed) or a ``(min, max)`` range, within ``SIGMA_RANGE``."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        s = parse_float("sigma", value, *SIGMA_RANGE)
        return s, s
    return parse_pair("sigma", value, *SIGMA_RANGE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianBlur(Policy):
    """torchvision ``GaussianBlur(kernel_size, sigma)`` applied with probability ``p`` (``RandomApply``, as
    SimCLR/BYOL/MoCo v2 use it; ``p=1`` is plain ``GaussianBlur``). Replay: module docstring.

    Column: ``blur_sigma`` float16, the drawn sigma (0 when the slot is not blurred).
    """

    name = "gaussian_blur"
    kernel_size: Any = 23
    sigma: Any = (0.1, 2.0)
    p: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_size", _parse_kernel_size(self.kernel_size))
        object.__setattr__(self, "sigma", _parse_sigma(self.sigma))
        object.__setattr__(self, "p", parse_float("p", self.p, 0.0, 1.0))

    def columns(self) -> tuple[Column, ...]:
        return (Column("blur_sigma", "float", "float16", ()),)

    def _draw(self, rng: np.random.Generator, **_: Any) -> dict[str, Any]:
        # Draw order: applied = random() < p; sigma = uniform(min, max) (drawn either way).
        applied = bool(rng.random() < self.p)
        sigma = float(rng.uniform(self.sigma[0], self.sigma[1]))
        return {"blur_sigma": sigma if applied else 0.0}

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        check_pixels(pixels)
        s = param(params, "blur_sigma")
        if s.shape != () or s.dtype != np.float16:
            raise ValidationError(f"blur_sigma must be one float16 per slot. Got dtype {s.dtype}, shape {s.shape}.")
        sigma = float(s)
        if sigma == 0.0:
            return pixels.copy()
        if not sigma > 0 or not np.isfinite(sigma):
            raise ValidationError(f"blur_sigma must be 0 (not blurred) or a finite sigma > 0. Got {sigma!r}.")
        return blur(pixels, self.kernel_size, sigma)

    def _check_values(self, columns, **_: Any) -> None:
        v = columns["blur_sigma"].astype(np.float64)
        lo, hi = self.sigma
        tol = float(np.spacing(np.float16(hi)))  # the float16 cast may round a bound outward by half an ulp
        blurred = v != 0
        if self.p == 0.0 and blurred.any():
            got = float(v[blurred].flat[0])
            raise ValidationError(f"augment column 'blur_sigma' must be 0 when p=0. Got {got!r}.")
        check_range("blur_sigma", v[blurred], lo - tol, hi + tol)
