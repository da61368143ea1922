"""Pixel operations on uint8 ``(H, W, 3)`` images, following torchvision's definitions for PIL images.

Each function is a pure function of its arguments, written from torchvision's documented behaviour
(``transforms/_functional_pil.py``, ``functional.py``, ``autoaugment.py``, ``v2`` MixUp/CutMix) on top of
Pillow and numpy. Deviations are listed in ``spec/format-v4.md`` section 6.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "RESAMPLE", "to_pil", "to_array", "brightness", "contrast", "saturation", "hue", "sharpness", "posterize",
    "solarize", "autocontrast", "equalize", "rotate", "shear", "translate", "blend", "paste_box", "noise_u8",
]

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, "RGB")


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """torchvision ``adjust_brightness`` (PIL): ``ImageEnhance.Brightness(img).enhance(factor)``."""
    return ImageEnhance.Brightness(img).enhance(factor)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """torchvision ``adjust_contrast`` (PIL): ``ImageEnhance.Contrast``."""
    return ImageEnhance.Contrast(img).enhance(factor)


def saturation(img: Image.Image, factor: float) -> Image.Image:
    """torchvision ``adjust_saturation`` (PIL): ``ImageEnhance.Color``."""
    return ImageEnhance.Color(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """torchvision ``adjust_sharpness`` (PIL): ``ImageEnhance.Sharpness``."""
    return ImageEnhance.Sharpness(img).enhance(factor)


def hue_shift(factor: float) -> int:
    """The uint8 shift of the HSV hue channel: ``trunc(factor * 255) mod 256``."""
    return int(math.trunc(factor * 255.0)) % 256


def hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision ``adjust_hue`` (PIL): shift Pillow's HSV hue channel by :func:`hue_shift` (mod 256)."""
    h, s, v = img.convert("HSV").split()
    np_h = (np.asarray(h, dtype=np.uint16) + hue_shift(factor)) % 256
    h = Image.fromarray(np_h.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """``ImageOps.posterize``: keep the ``bits`` high bits of each channel."""
    return ImageOps.posterize(img, int(bits))


def solarize(img: Image.Image, threshold: float) -> Image.Image:
    """``ImageOps.solarize``: ``v`` if ``v < threshold`` else ``255 - v`` (a float threshold compares as is)."""
    return ImageOps.solarize(img, threshold)  # type: ignore[arg-type]  # Pillow's stub says int; floats work


def autocontrast(img: Image.Image) -> Image.Image:
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image) -> Image.Image:
    return ImageOps.equalize(img)


def inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float], scale: float,
                   shear: tuple[float, float]) -> list[float]:
    """The 6 coefficients of the output->input affine map Pillow's ``Image.transform(AFFINE)`` takes.

    torchvision's ``_get_inverse_affine_matrix``: forward map ``T * C * RSS * C^-1`` with
    ``RSS = R(angle) * S(scale) * SHy(shear_y) * SHx(shear_x)`` (degrees), inverted in closed form.
    """
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def _affine(img: Image.Image, matrix: list[float], resample: Image.Resampling, fill: tuple[int, int, int]):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)


def shear(img: Image.Image, magnitude: float, axis: str, resample: Image.Resampling,
          fill: tuple[int, int, int]) -> Image.Image:
    """RandAugment ShearX/ShearY: ``affine`` with shear angle ``degrees(atan(magnitude))`` about (0, 0)."""
    deg = math.degrees(math.atan(magnitude))
    sh = (deg, 0.0) if axis == "x" else (0.0, deg)
    return _affine(img, inverse_affine((0.0, 0.0), 0.0, (0.0, 0.0), 1.0, sh), resample, fill)


def translate(img: Image.Image, pixels: int, axis: str, resample: Image.Resampling,
              fill: tuple[int, int, int]) -> Image.Image:
    """RandAugment TranslateX/TranslateY: ``affine`` with integer translation about the image centre."""
    w, h = img.size
    t = (float(pixels), 0.0) if axis == "x" else (0.0, float(pixels))
    return _affine(img, inverse_affine((w * 0.5, h * 0.5), 0.0, t, 1.0, (0.0, 0.0)), resample, fill)


def rotate(img: Image.Image, degrees: float, resample: Image.Resampling, fill: tuple[int, int, int]) -> Image.Image:
    """torchvision ``rotate`` (PIL): ``img.rotate(degrees, resample, expand=False, center=None)``."""
    return img.rotate(degrees, resample, expand=False, center=None, fillcolor=fill)


def blend(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Mixup of uint8 images: ``floor(lam * x + (1 - lam) * y + 0.5)`` in float64, clipped to [0, 255]."""
    out = np.floor(lam * x.astype(np.float64) + (1.0 - lam) * y.astype(np.float64) + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def paste_box(x: np.ndarray, y: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """CutMix: ``x`` with rows ``y1:y2`` and columns ``x1:x2`` taken from ``y`` (``box = (y1, x1, y2, x2)``)."""
    y1, x1, y2, x2 = box
    out = x.copy()
    out[y1:y2, x1:x2] = y[y1:y2, x1:x2]
    return out


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def noise_u8(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform uint8 noise reproducible without numpy's generators (SplitMix64 over the element index).

    Element ``k`` (C order) is the top byte of ``splitmix64(seed + (k + 1) * 0x9E3779B97F4A7C15)`` with the
    finaliser ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``
    (all arithmetic mod 2**64).
    """
    n = math.prod(shape)
    k = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(56)).astype(np.uint8).reshape(shape)
