"""Seeded crops (format 3.0): a store whose ``box`` and ``flip`` are derived from a seed instead of stored.

A seeded store keeps a crop sampler's config in its header (``crop_sampler``) and no ``box``/``flip``
arrays: slot ``s`` of image ``i`` has the crop :class:`SlotCropSampler` draws for ``(seed, i, s)`` and the
image's size, recomputed on read. That is TinyViT's idea (store the seed that replays a pipeline) applied
to the crop stage: at MS top-5 q8 the box and flip arrays are about a third of the store.

The sampler is torchvision's RandomResizedCrop (area scale, log-uniform aspect ratio, 10 attempts,
centre-crop fallback) plus a flip, drawn from a *counter-based* generator: every random number is
``splitmix64`` of ``(seed, image, slot, draw)``, and the arithmetic uses only integer operations and
correctly rounded float64 ``+ - * /`` and ``sqrt`` (the aspect ratio's ``exp`` is a fixed polynomial, not
a libm call). So the crops are the same bits on any IEEE machine, numpy version or language (spec section
10.3), and any set of slots is derived without the others: a training batch that uses 4 of 200 slots
derives 4, vectorised over the whole batch.

Derived data cannot be misplaced or stale on disk, and its inputs (the header, ``image_size``) are
checksummed. A sampler implementation that does not reproduce the writer's crops (a bug, a port) is the
remaining risk, so the manifest keeps the ``box`` and ``flip`` columns, tagged by the writer over the boxes
and flips the teacher used (:func:`fkdstore.schema.manifest_tag`), and :class:`SeededCrops` compares them:
once per reader before the first derived data is returned, for every chunk of an epoch read
(``read_all``), and in ``verify``. A mismatch raises :class:`CorruptStoreError`. This module is the one
home of the sampler and of that rule; the writer, reader, verify and the teacher-runner call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import schema as S
from .errors import CorruptStoreError, ValidationError
from .transforms import CropSampler, fallback_sides
from .validation import int_in_range

__all__ = ["SlotCropSampler", "SeededCrops", "splitmix64", "exp_poly", "log_poly"]

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
DERIVE_PAIRS = 2**17  # SeededCrops derives at most this many (image, slot) pairs per sampler call
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
    """The crop sampler of seeded-crop stores: torchvision's RandomResizedCrop + flip per slot, from a
    counter-based generator (module docstring; spec section 10.3). Same parameters and interface as
    :class:`fkdstore.transforms.CropSampler` (``sample(i, H, W, M)``, ``get_config``/``from_config``),
    plus :meth:`sample_slots` for any set of ``(image, slot)`` pairs. Its crops differ from
    ``CropSampler``'s for the same seed (another generator)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        ref = CropSampler(scale=self.scale, ratio=self.ratio, flip_p=self.flip_p, seed=self.seed)  # its rules
        seed = int_in_range("seed", ref.seed, 0, 2**64 - 1)
        if abs(math.log(ref.ratio[0])) > MAX_LOG_RATIO or abs(math.log(ref.ratio[1])) > MAX_LOG_RATIO:
            raise ValidationError(f"ratio must lie within [e**-{MAX_LOG_RATIO:g}, e**{MAX_LOG_RATIO:g}]. "
                                  f"Got {self.ratio!r}.")
        for name, v in (("scale", ref.scale), ("ratio", ref.ratio), ("flip_p", ref.flip_p), ("seed", seed)):
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
        width), flips bool ``(num_crops,)`` (the interface of ``CropSampler.sample``)."""
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


class SeededCrops:
    """Derives the ``box`` and ``flip`` values of a seeded-crops store (``header.seeded``) and checks them
    against the manifest. ``sizes`` is a callable returning the store's ``(N, 2)`` image sizes (read lazily:
    a reader that never touches boxes does not read them)."""

    def __init__(self, header: S.Header, sizes: Callable[[], np.ndarray], where: str = ""):
        if not header.seeded:
            raise ValueError("SeededCrops needs a seeded-crops (format 3.0) header")
        self.header, self.where = header, where
        self.sampler = SlotCropSampler.from_config(header.crop_sampler)
        self._sizes_fn, self._sizes = sizes, None
        self.checked = False  # set by the reader once a derived chunk matched its manifest tags

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_sizes"] = None  # re-read lazily in another process
        return d

    @property
    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            sizes = np.asarray(self._sizes_fn(), dtype=np.int64)
            limit = np.iinfo(self.header.box_dtype).max
            if sizes.size and sizes.max() > limit:  # a derived box must cast exactly (spec 10.3)
                i = int(np.argmax(sizes.max(1)))
                raise CorruptStoreError(
                    f"{self.where}: image {i} has size {sizes[i].tolist()}, beyond the store's box_dtype "
                    f"{self.header.box_dtype!r} (at most {limit}): its seeded crops cannot be derived exactly")
            self._sizes = sizes
        return self._sizes

    def rows(self, idx: np.ndarray, slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(B, M|m, 4)`` (the store's box dtype) and flips ``(B, M|m)`` of images ``idx`` (B,): every
        slot, or ``slots`` ((B, m), or (m,) for every image). Only the asked slots are derived."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        M = self.header.crops_per_image
        sl = np.broadcast_to(np.arange(M), (len(idx), M)) if slots is None else np.asarray(slots, np.int64)
        if sl.ndim == 1:
            sl = np.broadcast_to(sl, (len(idx), len(sl)))
        hw = self.sizes[idx]
        m = sl.shape[1]
        box = np.empty((len(idx), m, 4), self.header.box_dtype)
        flip = np.empty((len(idx), m), bool)
        step = max(1, DERIVE_PAIRS // max(m, 1))  # bounded temporaries (the sampler's are ~100 B per pair)
        for a in range(0, len(idx), step):
            b = slice(a, a + step)
            box[b], flip[b] = self.sampler.sample_slots(idx[b, None], sl[b], hw[b, 0:1], hw[b, 1:2])
        return box, flip

    def chunk_rows(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """``{box, flip}`` rows of images ``[first, stop)`` padded with the fill value to whole inner chunks
        (``first`` a multiple of ``images_per_chunk``): the data the manifest tags cover."""
        h = self.header
        ipc = h.images_per_chunk
        n = -(-(stop - first) // ipc) * ipc
        box, flip = self.rows(np.arange(first, min(stop, h.num_images)))
        pad = n - len(box)
        if pad:
            box = np.concatenate([box, np.full((pad, *box.shape[1:]), S.FILL_VALUE, box.dtype)])
            flip = np.concatenate([flip, np.zeros((pad, *flip.shape[1:]), bool)])
        return {S.BOX: box, S.FLIP: flip}

    def tags(self, first_chunk: int, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Manifest tags of the derived chunks ``first_chunk, ...`` covering ``data`` (from :meth:`chunk_rows`)."""
        ipc = self.header.images_per_chunk
        return {name: S.manifest_tags(name, first_chunk, v, ipc) for name, v in data.items()}

    def check(self, first_chunk: int, data: dict[str, np.ndarray], manifest_rows: np.ndarray,
              columns: dict[str, int], need: np.ndarray | None = None) -> list[str]:
        """Compare the tags of derived chunks ``first_chunk, ...`` (``data`` from :meth:`chunk_rows`) with the
        manifest rows of those chunks (``columns``: manifest column of ``box`` and ``flip``); ``need`` (one
        bool per chunk) limits the check to chunks holding written images. Returns one message per mismatching
        array (empty when they all match)."""
        ipc = self.header.images_per_chunk
        out = []
        for name, tags in self.tags(first_chunk, data).items():
            want = np.asarray(manifest_rows)[:, columns[name]].astype(np.uint32)
            bad = tags != want
            if need is not None:
                bad &= need
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                c = first_chunk + j
                a, b = c * ipc, min(self.header.num_images, (c + 1) * ipc) - 1
                out.append(
                    f"{self.where}: array {name!r} (seeded crops) chunk {c} (images {a}..{b}): the crops this "
                    f"library's sampler derives do not match the manifest tags the writer recorded for the crops "
                    f"the teacher saw ({int(bad.sum())} of {len(bad)} chunks checked differ); this fkdstore "
                    f"cannot replay this store's crops (sampler {self.header.crop_sampler})")
        return out
