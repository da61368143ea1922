"""The crop sampler of fkdstore, :class:`SlotCropSampler`: RandomResizedCrop + flip per slot, replayable bit
for bit anywhere.

A store with seeded crops (the default) keeps the sampler's config in its header (``regions.crops``) and no
``box``/``flip`` arrays: slot ``s`` of image ``i`` has the crop :class:`SlotCropSampler` draws for
``(seed, i, s)`` and the image's size, recomputed on read (:mod:`fkdstore.derived`). That is TinyViT's idea
(store the seed that replays a pipeline) applied to the crop stage: at MS top-5 q8 the box and flip arrays
are about a third of a store that stores them.

The sampler is torchvision's RandomResizedCrop (area scale, log-uniform aspect ratio, 10 attempts,
centre-crop fallback) plus a flip, drawn from a *counter-based* generator: every random number is
``splitmix64`` of ``(seed, image, slot, draw)``, and the arithmetic uses only integer operations and
correctly rounded float64 ``+ - * /`` and ``sqrt`` (the aspect ratio's ``exp`` is a fixed polynomial, not
a libm call). So the crops are the same bits on any IEEE machine, numpy version or language (spec section
10.3), and any set of slots is derived without the others: a training batch that uses 4 of 200 slots
derives 4, vectorised over the whole batch.

A sampler implementation that does not reproduce the writer's crops (a bug, a port) is the remaining risk
of derived data, so the manifest keeps the ``box`` and ``flip`` columns, tagged by the writer over the
boxes and flips the teacher used, and :class:`fkdstore.derived.SeededCrops` compares them. This module is
the one home of the sampler; the writer, reader, verify and the teacher-runner call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ValidationError
from .transforms import fallback_sides, parse_range
from .validation import int_in_range

__all__ = ["SlotCropSampler", "splitmix64", "exp_poly", "log_poly"]

ALGORITHM = "random_resized_crop"
RNG_RULE = "splitmix64(seed, image, slot, draw)"
MAX_ATTEMPTS = 10
GOLDEN_INT = 0x9E3779B97F4A7C15
GOLDEN = np.uint64(GOLDEN_INT)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11, _S32, _S48 = (np.uint64(x) for x in (30, 27, 31, 11, 32, 48))
_2M53 = 2.0 ** -53
# draws of a slot: attempt a uses draws 2a (area) and 2a + 1 (aspect); then top, left, flip
DRAW_TOP, DRAW_LEFT, DRAW_FLIP = 2 * MAX_ATTEMPTS, 2 * MAX_ATTEMPTS + 1, 2 * MAX_ATTEMPTS + 2
# (d + 1) * G mod 2**64 of every draw d, as uint64 constants (numpy scalar arithmetic would warn on the wrap)
_DRAW_OFFSET = np.array([((d + 1) * GOLDEN_INT) % 2**64 for d in range(DRAW_FLIP + 1)], np.uint64)
EXP_HALVINGS = 8  # exp_poly: x / 2**8, a degree-8 Taylor polynomial, squared 8 times
EXP_DEGREE = 8
LOG_TERMS = 30  # log_poly: 2 * atanh(t) = 2 * (t + t**3/3 + ... + t**59/59)
LN2 = 0.6931471805599453  # float64 nearest to ln 2 (0x3FE62E42FEFA39EF)
MAX_LOG_RATIO = 8.0  # |log ratio| bound of a config (ratios within [e**-8, e**8]); exp_poly is checked there
ASPECT_BITS = 16  # the aspect ratio's draw: 2**16 log-uniform levels (a table of exp_poly values)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic): ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
    z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``."""
    z = np.asarray(z, np.uint64)
    if z.ndim == 0:
        z = z.reshape(1)[0:1]  # a 1-element array: numpy scalars warn on the (intended) wrap-around
        return splitmix64(z)[0]
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def exp_poly(x: np.ndarray) -> np.ndarray:
    """``exp(x)`` for ``|x| <= 8`` from correctly rounded float64 operations only, evaluated exactly in this
    order (so every IEEE implementation gets the same bits): ``y = x / 256``; Horner
    ``p = 1 + y*(1 + y/2*(1 + y/3*( ... (1 + y/8))))``; then ``p = p*p`` eight times. Relative error against
    the true exp below 1e-13 on that range (tests/test_seeded.py)."""
    y = np.asarray(x, np.float64) / float(2 ** EXP_HALVINGS)
    p = np.ones_like(y)
    for n in range(EXP_DEGREE, 0, -1):
        p = 1.0 + (y / float(n)) * p
    for _ in range(EXP_HALVINGS):
        p = p * p
    return p


def log_poly(x: float) -> float:
    """``log(x)`` for a positive finite float from correctly rounded float64 operations only, in this order:
    ``(m, e) = frexp(x)`` (exact; ``m`` in [0.5, 1)), and ``m, e = 2m, e - 1`` when ``m < 0.75``;
    ``t = (m - 1) / (m + 1)``; ``s = t**2``; Horner ``q = 1/1 + s*(1/3 + s*(1/5 + ... + s*(1/59)))`` with
    each ``1/(2n+1)`` a float64 division; ``log = e * LN2 + 2 * t * q``. Used for the two aspect-ratio
    bounds, so no libm ``log`` (whose last bit may differ between platforms) enters the crops."""
    m, e = math.frexp(float(x))
    if m < 0.75:
        m, e = 2.0 * m, e - 1
    t = (m - 1.0) / (m + 1.0)
    s = t * t
    q = 1.0 / (2 * LOG_TERMS - 1)
    for n in range(LOG_TERMS - 2, -1, -1):
        q = 1.0 / (2 * n + 1) + s * q
    return e * LN2 + 2.0 * t * q


@dataclass(frozen=True, kw_only=True)
class SlotCropSampler:
    """The crop sampler of fkdstore: torchvision's RandomResizedCrop + flip per slot, from a counter-based
    generator (module docstring; spec section 10.3). ``sample(i, H, W, M)`` draws an image's slots,
    :meth:`sample_slots` any set of ``(image, slot)`` pairs; ``get_config``/``from_config`` are the
    header's sampler object. ``scale`` in (0, 1], ``ratio`` > 0 within [e**-8, e**8], ``flip_p`` in [0, 1],
    ``seed`` in [0, 2**64)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        scale = parse_range("scale", self.scale)
        if not (0.0 < scale[0] and scale[1] <= 1.0):
            raise ValidationError(f"scale must lie in (0, 1], got {self.scale!r}")
        ratio = parse_range("ratio", self.ratio)
        if not ratio[0] > 0.0:
            raise ValidationError(f"ratio must be > 0, got {self.ratio!r}")
        if abs(math.log(ratio[0])) > MAX_LOG_RATIO or abs(math.log(ratio[1])) > MAX_LOG_RATIO:
            raise ValidationError(f"ratio must lie within [e**-{MAX_LOG_RATIO:g}, e**{MAX_LOG_RATIO:g}]. "
                                  f"Got {self.ratio!r}.")
        if isinstance(self.flip_p, bool) or not isinstance(self.flip_p, (int, float, np.integer, np.floating)):
            raise TypeError(f"flip_p must be a number in [0, 1]. Got {self.flip_p!r}.")
        flip_p = float(self.flip_p)
        if not 0.0 <= flip_p <= 1.0:
            raise ValidationError(f"flip_p must be in [0, 1], got {self.flip_p!r}")
        seed = int_in_range("seed", self.seed, 0, 2**64 - 1)
        for name, v in (("scale", scale), ("ratio", ratio), ("flip_p", flip_p), ("seed", seed)):
            object.__setattr__(self, name, v)

    # -- config
    def get_config(self) -> dict[str, Any]:
        """The header's ``crop_sampler`` object (spec section 10.3)."""
        return {"algorithm": ALGORITHM, "rng": RNG_RULE, "max_attempts": MAX_ATTEMPTS, "scale": list(self.scale),
                "ratio": list(self.ratio), "flip_p": self.flip_p, "seed": self.seed}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SlotCropSampler:
        """Rebuild from :meth:`get_config` output, strictly: every key present, no other key, ``algorithm``,
        ``rng`` and ``max_attempts`` as written (a reader that ignored a parameter would replay other crops)."""
        if not isinstance(cfg, Mapping):
            raise ValidationError(f"crop_sampler must be a sampler config object. Got {cfg!r}.")
        want = {"algorithm", "rng", "max_attempts", "scale", "ratio", "flip_p", "seed"}
        unknown, missing = sorted(set(cfg) - want), sorted(want - set(cfg))
        if unknown or missing:
            raise ValidationError(f"crop_sampler must have exactly the keys {sorted(want)}: unknown {unknown}, "
                                  f"missing {missing}. Got {dict(cfg)!r}.")
        for key, value in (("algorithm", ALGORITHM), ("rng", RNG_RULE), ("max_attempts", MAX_ATTEMPTS)):
            if cfg[key] != value:
                raise ValidationError(f"crop_sampler {key} must be {value!r}. Got {cfg[key]!r}.")
        for key in ("scale", "ratio"):
            if not isinstance(cfg[key], (list, tuple)) or len(cfg[key]) != 2:
                raise ValidationError(f"crop_sampler {key} must be a [min, max] pair. Got {cfg[key]!r}.")
        if isinstance(cfg["flip_p"], bool) or not isinstance(cfg["flip_p"], (int, float)):
            raise ValidationError(f"crop_sampler flip_p must be a number. Got {cfg['flip_p']!r}.")
        return cls(scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]), flip_p=cfg["flip_p"], seed=cfg["seed"])

    # -- sampling
    def sample(self, index: int, height: int, width: int, num_crops: int) -> tuple[np.ndarray, np.ndarray]:
        """All ``num_crops`` slots of image ``index``: boxes int32 ``(num_crops, 4)`` (top, left, height,
        width), flips bool ``(num_crops,)``."""
        index = int_in_range("index", index, 0)
        H, W = int_in_range("height", height, 1), int_in_range("width", width, 1)
        M = int_in_range("num_crops", num_crops, 1)
        return self.sample_slots(np.full(M, index), np.arange(M), np.full(M, H), np.full(M, W))

    def sample_slots(self, images, slots, heights, widths) -> tuple[np.ndarray, np.ndarray]:
        """The crops of the ``(images[j], slots[j])`` pairs, for images of size ``(heights[j], widths[j])``
        (arrays of one shape, any length): boxes int32 ``(..., 4)`` and flips bool ``(...)``. Each pair
        depends on nothing else, so a subset of slots costs only itself."""
        i = np.asarray(images, np.int64)
        s = np.asarray(slots, np.int64)
        H = np.asarray(heights, np.int64)
        W = np.asarray(widths, np.int64)
        shape = np.broadcast_shapes(i.shape, s.shape, H.shape, W.shape)
        i, s, H, W = (np.broadcast_to(x, shape).reshape(-1) for x in (i, s, H, W))
        box, flip = self._sample(i, s, H, W)
        return box.reshape(*shape, 4), flip.reshape(shape)

    def _key(self, i: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Per pair: ``k = mix(mix(mix(seed + G) + (i + 1) G) + (s + 1) G)`` (uint64, wrapping; G the golden
        gamma 0x9E3779B97F4A7C15). Array arithmetic: uint64 arrays wrap without a warning."""
        one = np.uint64(1)
        k0 = splitmix64(np.array([(self.seed + GOLDEN_INT) % 2**64], np.uint64))
        k = splitmix64(k0 + (i.astype(np.uint64) + one) * GOLDEN)
        return splitmix64(k + (s.astype(np.uint64) + one) * GOLDEN)

    @staticmethod
    def _draw(key: np.ndarray, d) -> np.ndarray:
        """Draw ``d`` (an int, or an array of draw indices broadcast against ``key``) of each pair:
        ``mix(key + (d + 1) G)`` (uint64)."""
        return splitmix64(key + _DRAW_OFFSET[d])

    def _uniform(self, key: np.ndarray, d) -> np.ndarray:
        """``(draw(d) >> 11) * 2**-53``: a float64 in [0, 1)."""
        return (self._draw(key, d) >> _S11).astype(np.float64) * _2M53

    def aspect_table(self) -> np.ndarray:
        """``aspect[j] = exp_poly(l_lo + (l_hi - l_lo) * ((j + 0.5) / 2**16))`` for ``j < 2**16``, with
        ``l_lo, l_hi = log_poly(ratio)``: the log-uniform aspect ratios an attempt picks from (cached)."""
        table = self.__dict__.get("_aspect")
        if table is None:
            l_lo, l_hi = log_poly(self.ratio[0]), log_poly(self.ratio[1])
            j = np.arange(2 ** ASPECT_BITS, dtype=np.float64)
            table = exp_poly(l_lo + (l_hi - l_lo) * ((j + 0.5) / float(2 ** ASPECT_BITS)))
            object.__setattr__(self, "_aspect", table)
        return table

    def _attempts(self, key, area, H, W, attempts: range):
        """Sides of ``attempts`` for each pair (rows): ``(h, w, valid)`` of shape (pairs, len(attempts))."""
        d = 2 * np.asarray(attempts)  # attempt a: area from draw 2a, aspect from draw 2a + 1
        k = key[:, None]
        s_lo, s_hi = self.scale
        target = area[:, None] * (s_lo + (s_hi - s_lo) * self._uniform(k, d))
        aspect = self.aspect_table()[self._draw(k, d + 1) >> _S48]
        w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
        h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        return h, w, (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])

    def _sample(self, i, s, H, W) -> tuple[np.ndarray, np.ndarray]:
        key = self._key(i, s)
        area = H.astype(np.float64) * W.astype(np.float64)
        # attempt 0 for every pair, then attempts 1-9 (at once) for the pairs whose attempt 0 failed: the
        # first valid attempt is what the rule takes, so later attempts of a pair never matter once one is valid
        h, w, ok = self._attempts(key, area, H, W, range(1))
        ch, cw, ok = h[:, 0], w[:, 0], ok[:, 0]
        todo = np.flatnonzero(~ok)
        if len(todo):
            h, w, valid = self._attempts(key[todo], area[todo], H[todo], W[todo], range(1, MAX_ATTEMPTS))
            found = valid.any(1)
            first = valid.argmax(1)
            r = np.arange(len(todo))
            ch[todo] = np.where(found, h[r, first], 0)
            cw[todo] = np.where(found, w[r, first], 0)
            ok[todo] = found
            todo = todo[~found]
        if len(todo):  # no valid attempt: centre crop, aspect ratio clamped into `ratio`
            ch[todo], cw[todo] = fallback_sides(H[todo], W[todo], self.ratio)
        # positions: the high 32 bits times the number of positions, shifted down 32 (exact integers)
        top = ((self._draw(key, DRAW_TOP) >> _S32) * (H - ch + 1).astype(np.uint64)) >> _S32
        left = ((self._draw(key, DRAW_LEFT) >> _S32) * (W - cw + 1).astype(np.uint64)) >> _S32
        if len(todo):
            top[todo] = ((H[todo] - ch[todo]) // 2).astype(np.uint64)
            left[todo] = ((W[todo] - cw[todo]) // 2).astype(np.uint64)
        flip = self._uniform(key, DRAW_FLIP) < self.flip_p
        box = np.stack([top.astype(np.int64), left.astype(np.int64), ch, cw], -1).astype(np.int32)
        return box, flip
