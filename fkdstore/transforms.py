"""The shared crop function of the fkdstore format and the parameters that replay the teacher's pixels.

The teacher labels ``M`` random-resized crops per image once (drawn by
:class:`fkdstore.seeded.SlotCropSampler`); training replays exactly those crops. :func:`crop_resize` (or
:func:`replay_crops`) is the single function both the teacher runner and the training dataset call, so the
student sees pixel-identical inputs to the ones the teacher labelled; :class:`Replay` holds what they are
resized and normalised with; :func:`bad_boxes` is the box rule (invariant 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fkdstore.errors import ValidationError
from fkdstore.validation import int_in_range

if TYPE_CHECKING:  # torch is imported by the functions that return tensors: the rest needs no torch
    import torch

__all__ = [
    "fallback_sides",
    "parse_range",
    "INTERPOLATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Replay",
    "MAX_INPUT_SIDE",
    "parse_input_size",
    "bad_boxes",
    "crop_resize",
    "replay_crops",
    "write_crops",
    "normalize",
]


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _is_int(value: Any) -> bool:
    """``value`` is an integer (Python or numpy), not a bool: the one home of this test outside
    :mod:`fkdstore.validation` (which checks it inside :func:`~fkdstore.validation.int_in_range`)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def parse_range(name: str, value: Any) -> tuple[float, float]:
    """``value`` as a finite ordered pair ``(min, max)`` of floats (a sampler's ``scale`` or ``ratio``)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValidationError(f"{name} must be a pair of numbers (min, max), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValidationError(f"{name} must be finite, got {value!r}")
    if lo > hi:
        raise ValidationError(f"{name} must be ordered (min <= max), got {value!r}")
    return lo, hi


def fallback_sides(H, W, ratio: tuple[float, float]):
    """RandomResizedCrop's fallback when no attempt is valid: the centre crop's ``(h, w)`` with the aspect
    ratio clamped into ``ratio`` (whole image when the image's ratio is inside it): ``w = W``,
    ``h = rint(W / r_lo)`` for a too tall image, ``h = H``, ``w = rint(H * r_hi)`` for a too wide one (float64,
    round half to even), each side clamped to ``[1, side]`` (torchvision would return an empty crop there).
    Elementwise over integer arrays ``H``, ``W``; used by :class:`fkdstore.seeded.SlotCropSampler`."""
    r_lo, r_hi = ratio
    in_ratio = W / H
    below = in_ratio < r_lo
    above = ~below & (in_ratio > r_hi)
    h = np.where(below, np.rint(W / r_lo), H)
    w = np.where(above, np.rint(H * r_hi), W)
    return np.clip(h, 1, H).astype(np.int64), np.clip(w, 1, W).astype(np.int64)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if _is_int(size):
        s = int_in_range("size", size, 1)
        return s, s
    try:
        h, w = size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValidationError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    return int_in_range("size height", h, 1), int_in_range("size width", w, 1)


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[interpolation]
    except (KeyError, TypeError):
        raise ValidationError(
            f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}"
        ) from None


def _check_box(box: Sequence[int], H: int, W: int) -> tuple[int, int, int, int]:
    try:
        top, left, h, w = box
    except (TypeError, ValueError):
        raise ValidationError(f"box must be (top, left, height, width), got {box!r}") from None
    if not all(_is_int(v) for v in (top, left, h, w)):
        raise ValidationError(f"box must hold integers, got {box!r}")
    top, left, h, w = int(top), int(left), int(h), int(w)
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > H or left + w > W:
        raise ValidationError(
            f"box (top={top}, left={left}, height={h}, width={w}) must be non-empty and inside "
            f"the image of size (height={H}, width={W})"
        )
    return top, left, h, w


def _resized(image: Image.Image, box: tuple[int, int, int, int], out_hw: tuple[int, int],
             resample: Image.Resampling) -> Image.Image:
    """The pixels of the format: exact integer crop of ``box``, then ``resize`` of that region only.

    ``Image.resize(box=...)`` is not used: at the box's edges its filter also reads pixels just outside
    the box, so it differs from crop-then-resize (and from torchvision's ``resized_crop``) for every
    filter; stores written by fkdstore 0.1 replay only with crop-then-resize.
    """
    top, left, h, w = box
    return image.crop((left, top, left + w, top + h)).resize((out_hw[1], out_hw[0]), resample)


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``mean`` and ``std`` as float32 ``(3, 1, 1)`` arrays, checked as :func:`normalize` checks them."""
    if len(mean) != 3 or len(std) != 3:
        raise ValidationError(f"mean and std must have 3 values, got mean={mean!r}, std={std!r}")
    if any(not float(s) > 0 for s in std):
        raise ValidationError(f"std values must be > 0, got {std!r}")
    m = np.array([float(v) for v in mean], dtype=np.float32).reshape(3, 1, 1)
    s = np.array([float(v) for v in std], dtype=np.float32).reshape(3, 1, 1)
    return m, s


def _optional_normalizer(mean: Sequence[float] | None,
                         std: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_normalizer` of ``mean`` and ``std``, None when both are omitted (uint8 output)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValidationError("mean and std must be given together (normalised output) or both omitted (uint8)")
    return _normalizer(mean, std)


def _to_chw(pixels: Image.Image | np.ndarray, flip: bool, dst: np.ndarray,
            norm: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Write one resized crop into ``dst`` ``[3, H, W]``: HWC -> CHW, the horizontal flip, and for float32
    ``dst`` the normalisation ``(x / 255 - mean) / std``.

    A Pillow image is written one channel at a time (``tobytes("raw", band)`` gives each plane contiguous, so
    every numpy pass is contiguous; the flip is Pillow's mirror), a numpy ``(H, W, 3)`` image in one strided
    pass. The float path does the same float32 operations in the same order as :func:`normalize` (convert,
    divide by 255, subtract, divide; each IEEE-exact), so it is bit-identical to ``normalize`` of the uint8
    crop.
    """
    if isinstance(pixels, Image.Image):
        image = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else pixels
        H, W = dst.shape[1:]
        for c, band in enumerate("RGB"):
            plane = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8).reshape(H, W)
            if norm is None:
                dst[c] = plane
            else:
                np.divide(plane, np.float32(255.0), out=dst[c], dtype=np.float32)
                np.subtract(dst[c], norm[0][c], out=dst[c])
                np.divide(dst[c], norm[1][c], out=dst[c])
        return
    hwc = np.asarray(pixels)
    if flip:
        hwc = hwc[:, ::-1]
    src = hwc.transpose(2, 0, 1)
    if norm is None:
        np.copyto(dst, src)
        return
    mean, std = norm
    np.divide(src, np.float32(255.0), out=dst, dtype=np.float32)
    np.subtract(dst, mean, out=dst)
    np.divide(dst, std, out=dst)


def crop_resize(
    image: Image.Image,
    box: Sequence[int],
    flip: bool,
    size: int | tuple[int, int],
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Crop ``box`` = ``(top, left, height, width)`` from ``image``, resize, optionally flip.

    This is the one crop function of the format: the teacher runner and the training dataset
    both call it (or :func:`replay_crops`, which applies it to many boxes), so replayed crops are
    pixel-identical. The crop is an exact integer crop (no float rounding) and only that region is
    resampled, with Pillow's ``resample`` filter; the result equals torchvision's ``resized_crop``
    on a PIL image followed by a horizontal flip when ``flip``. ``size`` is an int (square) or
    ``(height, width)``. Returns a uint8 tensor ``[3, height, width]`` (RGB, CHW).
    """
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    out = np.empty((3, *_size_hw(size)), dtype=np.uint8)
    resample = _resample(interpolation)
    W, H = image.size
    box = _check_box(box, H, W)
    if image.mode != "RGB":
        image = image.convert("RGB")
    _to_chw(_resized(image, box, out.shape[1:], resample), bool(flip), out, None)
    return torch.from_numpy(out)


def replay_crops(
    image: Image.Image,
    boxes: np.ndarray | Sequence[Sequence[int]],
    flips: np.ndarray | Sequence[bool],
    size: int | tuple[int, int],
    interpolation: str = "bilinear",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`crop_resize` for every ``(box, flip)``: uint8 ``[M, 3, height, width]``.

    With ``mean`` and ``std`` it returns float32 crops normalised in the same pass, bit-identical to
    ``normalize(replay_crops(image, boxes, flips, size, interpolation), mean, std)`` but without the
    uint8 intermediate and the extra passes. ``out``: a contiguous CPU tensor of that shape and dtype
    to write into (e.g. a slice of a batch buffer); it is returned.
    """
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    boxes = np.asarray(boxes)
    flips = np.asarray(flips)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4).astype(np.int32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype.kind not in "iu":
        raise ValidationError(f"boxes must be an integer array of shape (M, 4), got shape {boxes.shape}")
    if flips.shape != (boxes.shape[0],):
        raise ValidationError(f"flips must have shape ({boxes.shape[0]},) to match boxes, got {flips.shape}")
    norm = _optional_normalizer(mean, std)
    shape = (len(boxes), 3, *_size_hw(size))
    resample = _resample(interpolation)
    dtype = torch.uint8 if norm is None else torch.float32
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu" or not out.is_contiguous():
        raise ValidationError(f"out must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                              f"{out.dtype} {tuple(out.shape)} on {out.device}")
    W, H = image.size
    box_list = boxes.tolist()  # plain ints: a few boxes are checked faster in Python than with numpy
    for box in box_list:
        top, left, h, w = box
        if h < 1 or w < 1 or top < 0 or left < 0 or top + h > H or left + w > W:
            _check_box(box, H, W)  # raises, naming the first bad box
    if image.mode != "RGB":
        image = image.convert("RGB")
    dst = out.numpy()
    for j, (box, flip) in enumerate(zip(box_list, flips.tolist())):
        _to_chw(_resized(image, box, shape[2:], resample), bool(flip), dst[j], norm)
    return out


def write_crops(pixels: np.ndarray, out: torch.Tensor, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> torch.Tensor:
    """Write final uint8 crops ``pixels`` ``(m, H, W, 3)`` (e.g. augmented, already flipped) into ``out``
    ``[m, 3, H, W]``: uint8, or float32 normalised with ``mean``/``std`` in the same pass, bit-identical to
    :func:`normalize` (the fused layout/normalise step of :func:`replay_crops`). Returns ``out``."""
    norm = _optional_normalizer(mean, std)
    dst = out.numpy()
    if pixels.ndim != 4 or pixels.shape[3] != 3 or dst.shape != (pixels.shape[0], 3, *pixels.shape[1:3]):
        raise ValidationError(f"pixels (m, H, W, 3) must match out [m, 3, H, W]. Got {pixels.shape} and {dst.shape}.")
    for j in range(len(pixels)):
        _to_chw(pixels[j], False, dst[j], norm)
    return out


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel for uint8 ``x`` of shape ``[..., 3, H, W]``.

    Returns float32 on ``x``'s device (run it after moving the batch to the GPU to transfer
    uint8 rather than float32).
    """
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise ValidationError(f"normalize expects a uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValidationError(f"normalize expects shape [..., 3, H, W], got {tuple(x.shape)}")
    m, s = (torch.from_numpy(v).to(x.device) for v in _normalizer(mean, std))
    return (x.to(torch.float32) / 255.0 - m) / s


# ------------------------------------------------------------------------------------------- replay


MAX_INPUT_SIDE = 1024
"""Largest side of the teacher's input (a store's ``replay.input_size``): a crafted store must not make
every replayed crop allocate gigabytes (1024 x 1024 x 3 float32 = 12 MiB per crop)."""


def _three_finite(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of 3 numbers. Got {value!r} ({type(value).__name__}).")
    if len(value) != 3:
        raise ValidationError(f"{name} must be 3 finite numbers. Got {list(value)!r}.")
    out = []
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name}[{k}] must be a number. Got {v!r}.")
        if not math.isfinite(float(v)):
            raise ValidationError(f"{name} must be 3 finite numbers. Got {list(value)!r}.")
        out.append(float(v))
    return out[0], out[1], out[2]


def parse_input_size(value: Any, name: str = "input_size") -> tuple[int, int]:
    """``(height, width)`` of the teacher's input: an int (square) or a pair, each in [1, MAX_INPUT_SIDE]
    (a string is refused whole, not read per character). ``name`` names the argument in errors."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, np.integer, Sequence)) \
            or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints. Got {value!r} "
                        f"({type(value).__name__}).")
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2:
        raise ValidationError(f"{name} must be an int or a (height, width) pair of ints. Got {value!r}.")
    return (int_in_range(f"{name} height", pair[0], 1, MAX_INPUT_SIDE),
            int_in_range(f"{name} width", pair[1], 1, MAX_INPUT_SIDE))


@dataclass(frozen=True, kw_only=True)
class Replay:
    """How the teacher's pixels are rebuilt from an image and a crop box (spec: the header's ``replay``):
    the crop is resized to ``input_size`` ``(height, width)`` with ``interpolation``, flipped, augmented,
    and normalised as ``(x / 255 - mean) / std``. The teacher-runner records it; :class:`TorchDataset`
    replays from it. Every field is validated: finite, ``std > 0``, sides in ``[1, MAX_INPUT_SIDE]``."""

    input_size: tuple[int, int] = (224, 224)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", parse_input_size(self.input_size))
        if not isinstance(self.interpolation, str) or self.interpolation not in INTERPOLATIONS:
            raise ValidationError(f"interpolation must be one of {sorted(INTERPOLATIONS)}. "
                                  f"Got {self.interpolation!r}.")
        object.__setattr__(self, "mean", _three_finite("mean", self.mean))
        std = _three_finite("std", self.std)
        if min(std) <= 0:
            raise ValidationError(f"std must be 3 numbers > 0. Got {list(std)}.")
        object.__setattr__(self, "std", std)

    @property
    def size(self) -> tuple[int, int]:
        """``input_size`` (height, width)."""
        return self.input_size

    def get_config(self) -> dict[str, Any]:
        """The header's ``replay`` object (every field spelled)."""
        return {"input_size": list(self.input_size), "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_config(cls, cfg: Any) -> Replay:
        """Parse a ``replay`` object strictly: exactly the keys :meth:`get_config` writes."""
        if not isinstance(cfg, dict):
            raise TypeError(f"replay must be a JSON object. Got {type(cfg).__name__}.")
        keys = ("input_size", "interpolation", "mean", "std")
        unknown, missing = sorted(set(cfg) - set(keys)), [k for k in keys if k not in cfg]
        if unknown or missing:
            raise ValidationError(f"replay must have exactly the keys {list(keys)}. "
                                  f"Got unknown {unknown}, missing {missing}.")
        return cls(input_size=cfg["input_size"], interpolation=cfg["interpolation"], mean=cfg["mean"],
                   std=cfg["std"])


# -------------------------------------------------------------------------------------------- boxes


def bad_boxes(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Invariant 5, the one home of the box rule: mask ``(..., M)`` of boxes that are NOT inside their
    image. ``boxes`` (B, M, 4) (top, left, height, width); ``sizes`` (B, 2) (height, width). Computed in
    int64 with every coordinate bounded before any sum, so no overflow hides a bad box (e.g. top = 2**63 - 1)."""
    b = np.asarray(boxes)
    if b.dtype.kind not in "iub":
        b = b.astype(object)
    elif b.dtype.kind == "u" and b.dtype.itemsize >= 8:
        b = np.where(b > np.iinfo(np.int64).max, -1, b.astype(np.int64))  # too large: as bad as negative
    else:
        b = b.astype(np.int64)
    top, left, hh, ww = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    s = np.asarray(sizes).astype(np.int64)
    H, W = s[:, 0:1], s[:, 1:2]
    # Each term alone is bounded by the image side first, so a sum that overflows int64 only occurs in a
    # box already marked bad.
    with np.errstate(over="ignore"):
        bad = (top < 0) | (left < 0) | (hh < 1) | (ww < 1) | (top > H) | (left > W) | (hh > H) | (ww > W) \
            | (top + hh > H) | (left + ww > W)
    return np.asarray(bad, dtype=bool)
