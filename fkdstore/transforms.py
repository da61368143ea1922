"""Crop sampling and the shared crop function of the fkdstore format.

The teacher labels ``M`` random-resized crops per image once; training replays exactly those
crops. :class:`CropSampler` draws the crop boxes and flips, and :func:`crop_resize` (or
:func:`replay_crops`) is the single function both the teacher runner and the training dataset
call, so the student sees pixel-identical inputs to the ones the teacher labelled.
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

if TYPE_CHECKING:  # torch is imported by the functions that return tensors: CropSampler needs no torch
    import torch

__all__ = [
    "CropSampler",
    "INTERPOLATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "crop_resize",
    "replay_crops",
    "write_crops",
    "normalize",
]

ALGORITHM = "random_resized_crop"
RNG_RULE = "numpy.random.default_rng(numpy.random.SeedSequence([seed, index]))"
MAX_ATTEMPTS = 10

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
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    return int_in_range(name, value, minimum)


def _pair(name: str, value: Any) -> tuple[float, float]:
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
    Elementwise over integer arrays ``H``, ``W``; shared by :class:`CropSampler` and
    :class:`fkdstore.seeded.SlotCropSampler`."""
    r_lo, r_hi = ratio
    in_ratio = W / H
    below = in_ratio < r_lo
    above = ~below & (in_ratio > r_hi)
    h = np.where(below, np.rint(W / r_lo), H)
    w = np.where(above, np.rint(H * r_hi), W)
    return np.clip(h, 1, H).astype(np.int64), np.clip(w, 1, W).astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class CropSampler:
    """Draws RandomResizedCrop boxes and horizontal flips, deterministically per image.

    The algorithm is torchvision's ``RandomResizedCrop.get_params`` (same distribution),
    vectorised over crops: for each crop, up to 10 attempts draw
    ``area = H*W*U(scale)`` and ``ratio = exp(U(log ratio))``, then
    ``w = round(sqrt(area*ratio))``, ``h = round(sqrt(area/ratio))`` (round half to even, as
    Python's ``round``); the first attempt with ``0 < w <= W`` and ``0 < h <= H`` is taken and
    its position drawn as ``top ~ randint[0, H-h]``, ``left ~ randint[0, W-w]``. If all 10
    attempts fail, the fallback is a centre crop with the aspect ratio clamped into ``ratio``
    (whole image when the image ratio is inside the range); a fallback side that would round
    to 0 is clamped to 1 (torchvision would return an empty crop). A crop is flipped when
    ``U(0, 1) < flip_p``.

    Determinism rule of the format: all draws for image ``index`` come from
    ``numpy.random.default_rng(numpy.random.SeedSequence([seed, index]))`` (PCG64), in a fixed
    order (scale ``(M, 10)``, log-ratio ``(M, 10)``, top ``(M,)``, left ``(M,)``, flip
    ``(M,)``). They depend only on ``(seed, index)`` (and ``H, W, M``), never on batch size,
    worker count or the order in which images are processed.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        scale = _pair("scale", self.scale)
        if not (0.0 < scale[0] and scale[1] <= 1.0):
            raise ValidationError(f"scale must lie in (0, 1], got {self.scale!r}")
        ratio = _pair("ratio", self.ratio)
        if not ratio[0] > 0.0:
            raise ValidationError(f"ratio must be > 0, got {self.ratio!r}")
        try:
            flip_p = float(self.flip_p)
        except (TypeError, ValueError):
            raise ValidationError(f"flip_p must be a number in [0, 1], got {self.flip_p!r}") from None
        if not 0.0 <= flip_p <= 1.0:
            raise ValidationError(f"flip_p must be in [0, 1], got {self.flip_p!r}")
        seed = _check_positive_int("seed", self.seed, minimum=0)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "flip_p", flip_p)
        object.__setattr__(self, "seed", seed)

    def rng(self, index: int) -> np.random.Generator:
        """The generator for image ``index``: ``default_rng(SeedSequence([seed, index]))``."""
        index = _check_positive_int("index", index, minimum=0)
        return np.random.default_rng(np.random.SeedSequence([self.seed, index]))

    def sample(self, index: int, height: int, width: int, num_crops: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``num_crops`` crops for image ``index`` of size ``height x width``.

        Returns ``(boxes, flips)``: ``boxes`` int32 ``(num_crops, 4)`` as
        ``(top, left, height, width)`` integer pixels, non-empty and inside the image;
        ``flips`` bool ``(num_crops,)``.
        """
        H = _check_positive_int("height", height)
        W = _check_positive_int("width", width)
        M = _check_positive_int("num_crops", num_crops)
        rng = self.rng(index)

        area = float(H) * float(W)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        target_area = area * rng.uniform(self.scale[0], self.scale[1], size=(M, MAX_ATTEMPTS))
        aspect = np.exp(rng.uniform(log_lo, log_hi, size=(M, MAX_ATTEMPTS)))
        w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
        valid = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        ok = valid.any(axis=1)
        first = valid.argmax(axis=1)
        rows = np.arange(M)
        ch = np.where(ok, h[rows, first], 0)
        cw = np.where(ok, w[rows, first], 0)

        # Positions are always drawn (fallback rows draw from [0, 1)) so the draw count is fixed.
        top = rng.integers(0, np.where(ok, H - ch + 1, 1))
        left = rng.integers(0, np.where(ok, W - cw + 1, 1))
        flips = rng.random(M) < self.flip_p

        if not ok.all():
            fh, fw = fallback_sides(np.int64(H), np.int64(W), self.ratio)
            ch = np.where(ok, ch, fh)
            cw = np.where(ok, cw, fw)
            top = np.where(ok, top, (H - fh) // 2)
            left = np.where(ok, left, (W - fw) // 2)

        boxes = np.stack([top, left, ch, cw], axis=1).astype(np.int32).reshape(M, 4)
        return boxes, flips.astype(bool)

    def get_config(self) -> dict:
        """JSON-serialisable description of the sampler (stored in the format's attributes)."""
        return {
            "algorithm": ALGORITHM,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip_p": self.flip_p,
            "seed": self.seed,
            "max_attempts": MAX_ATTEMPTS,
            "rng": RNG_RULE,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> CropSampler:
        """Rebuild a sampler from :meth:`get_config` output; rejects other algorithms/RNG rules."""
        if not isinstance(cfg, dict):
            raise ValidationError(f"sampler config must be a dict, got {type(cfg).__name__}")
        algorithm = cfg.get("algorithm")
        if algorithm != ALGORITHM:
            raise ValidationError(f"sampler config algorithm must be {ALGORITHM!r}, got {algorithm!r}")
        for key, expected in (("max_attempts", MAX_ATTEMPTS), ("rng", RNG_RULE)):
            if key in cfg and cfg[key] != expected:
                raise ValidationError(f"sampler config {key} must be {expected!r}, got {cfg[key]!r}")
        try:
            return cls(scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]), flip_p=cfg["flip_p"], seed=cfg["seed"])
        except KeyError as exc:
            raise ValidationError(f"sampler config is missing key {exc.args[0]!r}") from None


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if _is_int(size):
        s = _check_positive_int("size", size)
        return s, s
    try:
        h, w = size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValidationError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    return _check_positive_int("size height", h), _check_positive_int("size width", w)


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
    import torch

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
    import torch

    boxes = np.asarray(boxes)
    flips = np.asarray(flips)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4).astype(np.int32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype.kind not in "iu":
        raise ValidationError(f"boxes must be an integer array of shape (M, 4), got shape {boxes.shape}")
    if flips.shape != (boxes.shape[0],):
        raise ValidationError(f"flips must have shape ({boxes.shape[0]},) to match boxes, got {flips.shape}")
    if (mean is None) != (std is None):
        raise ValidationError("mean and std must be given together (normalised output) or both omitted (uint8)")
    norm = None if mean is None else _normalizer(mean, std)
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
    if (mean is None) != (std is None):
        raise ValidationError("mean and std must be given together (normalised output) or both omitted (uint8)")
    norm = None if mean is None else _normalizer(mean, std)
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
    import torch

    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise ValidationError(f"normalize expects a uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValidationError(f"normalize expects shape [..., 3, H, W], got {tuple(x.shape)}")
    m, s = (torch.from_numpy(v).to(x.device) for v in _normalizer(mean, std))
    return (x.to(torch.float32) / 255.0 - m) / s
