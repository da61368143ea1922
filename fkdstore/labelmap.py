"""Label maps (ReLabel, TokenLabeling): the header object of a label-map store and the replay equation.

A label map holds, per image, a teacher's top-K raw class scores (pre-softmax) at every cell of an
``S x S`` grid laid over the whole image: ``indices`` ``(K, S, S)`` class ids and ``scores`` ``(K, S, S)``.
The soft label of one crop ``(top, left, height, width)`` of an image of ``(H, W)`` pixels, horizontally
flipped or not, is (:func:`pool_labels`; the spec's label-map replay section says the same in prose):

1. Dense map: ``D[c, y, x] = fill`` for every class ``c``, then ``D[indices[k, y, x], y, x] =
   scores[k, y, x]`` (:func:`dense_maps`; indices are distinct per cell).
2. Flip: when ``spec.flip`` and the crop is flipped, ``D`` is mirrored along ``x`` (its last axis) and the
   crop is taken as seen in the mirrored image: ``left := W - left - width``. The label is computed on the
   map of the image the network sees, with the box of what it sees (TokenLabeling's order of operations:
   flip image and map first, then draw the crop). For ``box_order="xy"``, ``box_offset=-0.5`` and crops at
   least one map cell wide (``width * S >= W``) this equals pooling the unflipped map and mirroring the
   ``g x g`` output left-right; a narrower crop differs, since a non-aligned RoIAlign widens a RoI to one
   cell towards +x. Without ``spec.flip`` the flag is ignored (ReLabel: the image is flipped after
   cropping, the label is not).
3. Box (:func:`map_boxes`): ``t = top / H``, ``l = left / W``, ``b = t + height / H``, ``r = l + width / W``
   in float64 (ReLabel's ``coords[:, 2:] += coords[:, :2]`` on ``(i/H, j/W, h/H, w/W)``), rounded to
   float32, then ``v * S + box_offset`` in float32. The RoI ``(x1, y1, x2, y2)`` is ``(l, t, r, b)`` for
   ``box_order="xy"`` (geometric) and ``(t, l, b, r)`` for ``"yx"`` (ReLabel and TokenLabeling as
   published: they pass ``(top, left, bottom, right)`` where ``roi_align`` expects ``(x1, y1, x2, y2)``).
4. RoIAlign of ``D`` over the RoI to a ``g x g`` grid with torchvision's compiled kernel semantics
   (spatial scale 1, ``spec.sampling_ratio``, ``spec.aligned``; :func:`roi_align_reference` is the
   definition, float32 sample coordinates and weights).
5. Soft label: ``softmax(pooled / temperature)`` over the ``C`` classes, per output cell.

:func:`pool_labels` computes steps 1-5 without building ``D``: RoIAlign is linear, so each output cell is
``fill * (total sample weight) + sum over map cells of weight * (score - fill)`` scattered into the stored
classes. :func:`pool_labels_dense` is the literal pipeline (dense map + :func:`roi_align_reference` +
softmax), kept as the reference the fast paths are tested against.

numpy at import; torch is used only for tensors a caller passes (:func:`pool_labels`, :func:`dense_maps`)
and never imported here. Generation helpers that need torch live in :mod:`fkdstore.labelmap_torch`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codecs import _array as A
from .codecs.base import check_num_classes, index_dtype, parse_temperature
from .errors import ValidationError
from .transforms import bad_boxes
from .validation import boolean, int_in_range

__all__ = ["LabelMapSpec", "MAX_SIZE", "MAX_K", "MAX_GRID", "MAX_SAMPLING_RATIO", "BOX_ORDERS", "MAP_DTYPES",
           "POOL_OP", "dense_maps", "map_boxes", "roi_align_reference", "pool_labels", "pool_labels_dense",
           "validate_maps"]

MAX_SIZE = 64
"""Largest map side ``S`` (ReLabel 15, TokenLabeling 14; 64 x 64 cells x K is already 16x ReLabel's data)."""
MAX_K = 256
"""Largest ``K`` (classes kept per cell); also ``K <= num_classes`` (:meth:`LabelMapSpec.check_num_classes`)."""
MAX_GRID = 32
"""Largest output grid ``g`` (TokenLabeling uses 14 at 224 px, 24 at 384 px)."""
MAX_SAMPLING_RATIO = 64
"""Largest fixed RoIAlign sampling ratio (``-1`` = adaptive, ``ceil(roi side / g)`` samples per bin)."""
OFFSET_RANGE = (-1.0, 1.0)
"""Range of ``box_offset`` (ReLabel and TokenLabeling: ``-0.5``, the pixel-centre convention)."""
BOX_ORDERS = ("yx", "xy")
MAP_DTYPES = ("float16", "float32")
POOL_OP = "roi_align"

_KEYS = ("size", "k", "dtype", "fill", "box", "pool", "temperature", "flip")
_BOX_KEYS = ("order", "offset")
_POOL_KEYS = ("op", "sampling_ratio", "aligned", "grid")


# ---------------------------------------------------------------------------------------- parameters
def _name(field: str) -> str:
    return f"label_map.{field}"


def _finite_real(name: str, value: Any, bounds: tuple[float, float] | None = None) -> float:
    rule = "a finite number" if bounds is None else f"a finite number in [{bounds[0]}, {bounds[1]}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {rule}. Got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v) or (bounds is not None and not bounds[0] <= v <= bounds[1]):
        raise ValidationError(f"{name} must be {rule}. Got {value!r}.")
    return v


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(allowed)}. Got {value!r} ({type(value).__name__}).")
    if value not in allowed:
        raise ValidationError(f"{name} must be one of {list(allowed)}. Got {value!r}.")
    return value


def parse_size(value: Any) -> int:
    """Map side ``S``: an integer in ``[1, MAX_SIZE]``."""
    return int_in_range(_name("size"), value, 1, MAX_SIZE)


def parse_k(value: Any) -> int:
    """Classes kept per cell ``K``: an integer in ``[1, MAX_K]`` (and ``<= num_classes`` where that is known)."""
    return int_in_range(_name("k"), value, 1, MAX_K)


def parse_dtype(value: Any) -> str:
    """Stored score dtype: ``"float16"`` or ``"float32"`` (raw scores; q8 would break the linearity of pooling)."""
    return _choice(_name("dtype"), value, MAP_DTYPES)


def parse_fill(value: Any) -> float:
    """Score of the classes absent from a cell: a finite number (ReLabel: 0.0)."""
    return _finite_real(_name("fill"), value)


def parse_box_order(value: Any) -> str:
    """``"xy"`` (RoI = (left, top, right, bottom), geometric) or ``"yx"`` (ReLabel's published order)."""
    return _choice(_name("box.order"), value, BOX_ORDERS)


def parse_box_offset(value: Any) -> float:
    """Added to ``normalised coordinate * S``: a finite number in :data:`OFFSET_RANGE` (ReLabel: -0.5)."""
    return _finite_real(_name("box.offset"), value, OFFSET_RANGE)


def parse_sampling_ratio(value: Any) -> int:
    """RoIAlign samples per bin and axis: ``-1`` (adaptive) or an integer in ``[1, MAX_SAMPLING_RATIO]``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == -1:
        return -1
    try:
        return int_in_range(_name("pool.sampling_ratio"), value, 1, MAX_SAMPLING_RATIO)
    except ValidationError:
        raise ValidationError(f"{_name('pool.sampling_ratio')} must be -1 (adaptive) or an integer in "
                              f"[1, {MAX_SAMPLING_RATIO}]. Got {int(value)}.") from None


def parse_grid(value: Any) -> int:
    """Output grid side ``g``: an integer in ``[1, MAX_GRID]`` (1 = one label per crop, ReLabel)."""
    return int_in_range(_name("pool.grid"), value, 1, MAX_GRID)


@dataclass(frozen=True, kw_only=True)
class LabelMapSpec:
    """The header object of a label-map store: map layout and every replay parameter.

    Fields (each checked by its ``parse_<field>`` function): ``size`` ``S`` and ``k`` ``K`` (the stored
    maps are ``(K, S, S)`` per image), ``dtype`` of the stored scores, ``fill`` (score of absent classes),
    ``box_order`` and ``box_offset`` (crop -> RoI rule), ``sampling_ratio`` and ``aligned`` (torchvision
    RoIAlign parameters), ``grid`` (output ``g x g``), ``temperature`` (the soft label is
    ``softmax(pooled / temperature)``) and ``flip`` (the label follows the crop's horizontal flip).
    ``size``, ``k`` and ``box_order`` have no default: the right order depends on how the maps were made
    (:meth:`relabel` and :meth:`tokenlabeling` give the published settings).

    :meth:`get_config` spells every parameter (the ``"label_map"`` header object); :meth:`from_config` is
    strict: an unknown or missing key is a :class:`ValidationError` naming it, since a defaulted replay
    parameter would silently replay other labels.
    """

    size: int
    k: int
    box_order: str
    dtype: str = "float32"
    fill: float = 0.0
    box_offset: float = -0.5
    sampling_ratio: int = -1
    aligned: bool = False
    grid: int = 1
    temperature: float = 1.0
    flip: bool = True

    def __post_init__(self) -> None:
        for field, value in (("size", parse_size(self.size)), ("k", parse_k(self.k)),
                             ("box_order", parse_box_order(self.box_order)), ("dtype", parse_dtype(self.dtype)),
                             ("fill", parse_fill(self.fill)), ("box_offset", parse_box_offset(self.box_offset)),
                             ("sampling_ratio", parse_sampling_ratio(self.sampling_ratio)),
                             ("aligned", boolean(_name("pool.aligned"), self.aligned)),
                             ("grid", parse_grid(self.grid)), ("temperature", self._temperature()),
                             ("flip", boolean(_name("flip"), self.flip))):
            object.__setattr__(self, field, value)

    def _temperature(self) -> float:
        try:
            return parse_temperature(self.temperature)
        except ValidationError:
            raise ValidationError(f"{_name('temperature')} must be a finite number > 0. "
                                  f"Got {self.temperature!r}.") from None

    # -- presets
    @classmethod
    def relabel(cls, *, size: int = 15, k: int = 5, dtype: str = "float32") -> LabelMapSpec:
        """ReLabel as published (``naver-ai/relabel_imagenet``): 15 x 15 top-5 float32 maps, ``(top, left,
        bottom, right)`` passed as the RoI, ``* S - 0.5``, adaptive 1 x 1 RoIAlign, flip ignored."""
        return cls(size=size, k=k, dtype=dtype, box_order="yx", flip=False)

    @classmethod
    def tokenlabeling(cls, *, size: int = 14, k: int = 5, grid: int = 14, dtype: str = "float16") -> LabelMapSpec:
        """TokenLabeling as published (``zihangJiang/TokenLabeling``): float16 maps, ReLabel's box rule,
        a ``grid x grid`` label per token, map flipped with the image before the crop is drawn."""
        return cls(size=size, k=k, dtype=dtype, box_order="yx", grid=grid, flip=True)

    # -- layout
    @property
    def map_shape(self) -> tuple[int, int, int]:
        """``(K, S, S)``: the shape of one image's ``indices`` and ``scores``."""
        return (self.k, self.size, self.size)

    def check_num_classes(self, num_classes: Any) -> int:
        """``num_classes`` as int when a positive integer ``>= k``; else TypeError / ValidationError."""
        c = check_num_classes(num_classes)
        if self.k > c:
            raise ValidationError(f"{_name('k')} must be <= num_classes={c}. Got {self.k}.")
        return c

    def index_dtype(self, num_classes: int) -> str:
        """Stored index dtype: ``"uint16"`` for ``num_classes <= 65536``, else ``"int32"``."""
        return index_dtype(self.check_num_classes(num_classes))

    def bytes_per_image(self, num_classes: int) -> int:
        """Raw (uncompressed) bytes of one image's maps: ``K * S * S * (index bytes + score bytes)``."""
        per = np.dtype(self.index_dtype(num_classes)).itemsize + np.dtype(self.dtype).itemsize
        return self.k * self.size * self.size * per

    # -- config
    def get_config(self) -> dict:
        """Every parameter as plain JSON (the ``"label_map"`` object of the header)."""
        return {"size": self.size, "k": self.k, "dtype": self.dtype, "fill": self.fill,
                "box": {"order": self.box_order, "offset": self.box_offset},
                "pool": {"op": POOL_OP, "sampling_ratio": self.sampling_ratio, "aligned": self.aligned,
                         "grid": self.grid},
                "temperature": self.temperature, "flip": self.flip}

    @classmethod
    def from_config(cls, cfg: Any) -> LabelMapSpec:
        """Rebuild from :meth:`get_config` output. Every key is required and no other key is allowed
        (ValidationError naming the key); ``pool.op`` must be ``"roi_align"``."""
        _exact_keys(cfg, _KEYS, "label_map")
        _exact_keys(cfg["box"], _BOX_KEYS, "label_map.box")
        _exact_keys(cfg["pool"], _POOL_KEYS, "label_map.pool")
        _choice(_name("pool.op"), cfg["pool"]["op"], (POOL_OP,))
        return cls(size=cfg["size"], k=cfg["k"], dtype=cfg["dtype"], fill=cfg["fill"],
                   box_order=cfg["box"]["order"], box_offset=cfg["box"]["offset"],
                   sampling_ratio=cfg["pool"]["sampling_ratio"], aligned=cfg["pool"]["aligned"],
                   grid=cfg["pool"]["grid"], temperature=cfg["temperature"], flip=cfg["flip"])


def _exact_keys(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, Mapping):
        raise ValidationError(f"{where} must be a JSON object with keys {list(keys)}. Got {type(obj).__name__}.")
    unknown = sorted(str(k) for k in obj if k not in keys)
    if unknown:
        raise ValidationError(f"{where} must have only the keys {list(keys)}. Got unknown key "
                              f"{where}.{unknown[0]}.")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValidationError(f"{where} must spell every parameter {list(keys)}. Missing key {where}.{missing[0]}.")


# ---------------------------------------------------------------------------------------- dense maps
def validate_maps(indices, scores, spec: LabelMapSpec | None, num_classes: int, *, check_range: bool = True):
    """Check a batch of maps: ``indices`` integer and ``scores`` floating, both ``(B, K, S, S)`` (``(K, S)``
    equal to ``spec``'s when given), same framework; with ``check_range`` every index in ``[0, C)`` (one
    reduction; one host sync on a GPU). Returns ``(B, K, S)``. Distinctness of the indices of one cell is a
    rule of stored maps, checked where maps enter (import, writer), not here."""
    A.check_array(indices, "indices")
    A.check_array(scores, "scores")
    if A.is_torch(indices) != A.is_torch(scores):
        raise TypeError("indices and scores must both be numpy arrays or both torch tensors, got a mix")
    ishape, sshape = tuple(indices.shape), tuple(scores.shape)
    if len(ishape) != 4 or ishape[2] != ishape[3] or ishape != sshape:
        raise ValidationError(f"indices and scores must have one shape (B, K, S, S). Got {ishape} and {sshape}.")
    if spec is not None and ishape[1:] != spec.map_shape:
        raise ValidationError(f"maps must have shape (B,) + {spec.map_shape} (label_map k and size). Got {ishape}.")
    if not A.is_int(indices):
        raise ValidationError(f"indices must have an integer dtype. Got {indices.dtype}.")
    if not A.is_float(scores):
        raise ValidationError(f"scores must have a floating dtype. Got {scores.dtype}.")
    if check_range and A.numel(indices) > 0:
        a = A.i64(indices)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_classes:
            raise ValidationError(f"indices must lie in [0, {num_classes}). Got values in [{lo}, {hi}].")
    return ishape[0], ishape[1], ishape[2]


def dense_maps(indices, scores, num_classes: int, fill: float = 0.0):
    """Dense float32 maps ``(B, C, S, S)``: ``fill`` everywhere, ``scores[b, k, y, x]`` at class
    ``indices[b, k, y, x]`` (step 1 of the replay equation). numpy in -> numpy out; torch in -> torch out on
    the same device. Memory is ``B * C * S * S * 4`` bytes: a reference, not the replay path."""
    c = check_num_classes(num_classes)
    fill = parse_fill(fill)
    B, _, S = validate_maps(indices, scores, None, c)
    if A.is_torch(scores):
        torch = A.torch_module()
        out = torch.full((B, c, S, S), fill, dtype=torch.float32, device=scores.device)
        return out.scatter_(1, indices.to(device=scores.device, dtype=torch.int64), scores.to(torch.float32))
    out = np.full((B, c, S, S), fill, dtype=np.float32)
    np.put_along_axis(out, np.asarray(indices).astype(np.int64), np.asarray(scores, dtype=np.float32), axis=1)
    return out


# ---------------------------------------------------------------------------------------- boxes
def _host(x, what: str, kind: str) -> np.ndarray:
    """A small per-crop argument (boxes, sizes, flips) as a numpy array (a torch tensor is copied to the host)."""
    if A.is_torch(x):
        x = x.detach().to("cpu").numpy()
    a = np.asarray(x)
    if kind == "int" and a.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers. Got dtype {a.dtype}.")
    if kind == "bool" and a.dtype.kind not in "bui":
        raise TypeError(f"{what} must hold booleans. Got dtype {a.dtype}.")
    return a


def _crops(boxes, sizes, flips) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = _host(boxes, "boxes", "int")
    s = _host(sizes, "sizes", "int")
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValidationError(f"boxes must have shape (B, 4) (top, left, height, width). Got {b.shape}.")
    if s.shape != (b.shape[0], 2):
        raise ValidationError(f"sizes must have shape ({b.shape[0]}, 2) (height, width). Got {s.shape}.")
    if (s < 1).any():
        raise ValidationError(f"sizes must be positive. Got {s[(s < 1).any(1)][0].tolist()}.")
    bad = bad_boxes(b[:, None, :], s)[:, 0]
    if bad.any():
        i = int(np.argmax(bad))
        raise ValidationError(f"boxes must lie inside their image with height, width >= 1. Got box "
                              f"{b[i].tolist()} in an image of size {s[i].tolist()} (row {i}).")
    if flips is None:
        f = np.zeros(b.shape[0], bool)
    else:
        f = _host(flips, "flips", "bool")
        if f.shape != (b.shape[0],):
            raise ValidationError(f"flips must have shape ({b.shape[0]},). Got {f.shape}.")
        f = f.astype(bool)
    return b.astype(np.int64), s.astype(np.int64), f


def _map_boxes(b: np.ndarray, s: np.ndarray, f: np.ndarray, spec: LabelMapSpec) -> np.ndarray:
    top, left, h, w = b.T
    H, W = s.T
    left = np.where(f & spec.flip, W - left - w, left)  # the crop as seen in the mirrored image
    t = top / H
    lft = left / W
    bottom = t + h / H
    right = lft + w / W
    v = (np.stack([lft, t, right, bottom] if spec.box_order == "xy" else [t, lft, bottom, right], 1)
         .astype(np.float32))
    return v * np.float32(spec.size) + np.float32(spec.box_offset)


def map_boxes(boxes, sizes, spec: LabelMapSpec, flips=None) -> np.ndarray:
    """RoIs ``(B, 4)`` float32 ``(x1, y1, x2, y2)`` in map cells for crops ``boxes`` ``(B, 4)`` integer
    ``(top, left, height, width)`` of images of ``sizes`` ``(B, 2)`` ``(H, W)`` (step 3 of the replay
    equation; with ``spec.flip`` a flipped crop is mirrored first, step 2). Boxes must lie inside their
    image with both sides >= 1 (the store's box rule)."""
    if not isinstance(spec, LabelMapSpec):
        raise TypeError(f"spec must be a LabelMapSpec. Got {type(spec).__name__}.")
    return _map_boxes(*_crops(boxes, sizes, flips), spec)


# ---------------------------------------------------------------------------------------- RoIAlign
def _bilinear(plane: np.ndarray, y: np.float32, x: np.float32) -> np.ndarray:
    """torchvision's ``bilinear_interpolate`` (CPU kernel) at one point of every channel of ``plane``
    ``(C, H, W)``, in float32: zero outside ``[-1, H] x [-1, W]``, coordinates <= 0 clamped to 0, the last
    row/column repeated beyond ``H - 1`` / ``W - 1``."""
    f32 = np.float32
    H, W = plane.shape[1:]
    if not (y >= -1.0 and y <= H and x >= -1.0 and x <= W):  # NaN included, as the kernel
        return np.zeros(plane.shape[0], np.float32)
    y = f32(0) if y <= 0 else y
    x = f32(0) if x <= 0 else x
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - f32(y_low)), f32(x - f32(x_low))
    hy, hx = f32(f32(1) - ly), f32(f32(1) - lx)
    w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
    return (w1 * plane[:, y_low, x_low] + w2 * plane[:, y_low, x_high]) + w3 * plane[:, y_high, x_low] \
        + w4 * plane[:, y_high, x_high]


def roi_align_reference(input: np.ndarray, rois: np.ndarray, output_size: int | tuple[int, int],
                        spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False, *,
                        accumulate: str = "float32") -> np.ndarray:
    """``torchvision.ops.roi_align`` as its compiled kernel computes it, in plain numpy (slow; a reference).

    ``input`` ``(N, C, H, W)`` float32, ``rois`` ``(R, 5)`` ``(batch index, x1, y1, x2, y2)``; returns
    ``(R, C, ph, pw)`` float32. Per RoI, in float32 as the kernel for float32 input: ``start = v * scale -
    (0.5 if aligned else 0)``; ``roi side = end - start``, at least 1 unless ``aligned``; ``bin = side / p``;
    samples per bin ``n = sampling_ratio`` if > 0 else ``ceil(side / p)``; sample ``i`` of bin ``q`` at
    ``(start + q * bin) + ((i + 0.5) * bin) / n``; each sample is the bilinear value (:func:`_bilinear`: zero
    outside ``[-1, H] x [-1, W]``); the output is the sum over the ``ny x nx`` samples divided by
    ``max(ny * nx, 1)``. ``accumulate="float32"`` sums in the kernel's order and precision (bit-faithful to
    the CPU kernel); ``"float64"`` sums the same float32 sample values in float64. torchvision's pure-Python
    ``_roi_align`` omits the outside-sample rule; the compiled kernel (what ReLabel ran) is followed here.
    """
    f32 = np.float32
    x = np.asarray(input)
    r = np.asarray(rois)
    if x.ndim != 4 or x.dtype != np.float32:
        raise ValidationError(f"input must be a float32 array (N, C, H, W). Got {x.dtype} {x.shape}.")
    if r.ndim != 2 or r.shape[1] != 5:
        raise ValidationError(f"rois must have shape (R, 5). Got {r.shape}.")
    ph_n, pw_n = (output_size, output_size) if isinstance(output_size, (int, numbers.Integral)) else output_size
    ph_n, pw_n = int_in_range("output height", ph_n, 1), int_in_range("output width", pw_n, 1)
    acc_t = {"float32": np.float32, "float64": np.float64}[accumulate]
    r = r.astype(np.float32)
    scale, off = f32(spatial_scale), f32(0.5 if aligned else 0.0)
    out = np.zeros((r.shape[0], x.shape[1], ph_n, pw_n), np.float32)
    for n in range(r.shape[0]):
        plane = x[int(r[n, 0])]
        sw, sh, ew, eh = (r[n, j] * scale - off for j in (1, 2, 3, 4))
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = max(rw, f32(1)), max(rh, f32(1))
        bh, bw = rh / f32(ph_n), rw / f32(pw_n)
        gh = sampling_ratio if sampling_ratio > 0 else int(np.ceil(rh / f32(ph_n)))
        gw = sampling_ratio if sampling_ratio > 0 else int(np.ceil(rw / f32(pw_n)))
        count = f32(max(gh * gw, 1))
        for ph in range(ph_n):
            for pw in range(pw_n):
                acc = np.zeros(x.shape[1], acc_t)
                for iy in range(gh):
                    yy = (sh + f32(ph) * bh) + (f32(iy + 0.5) * bh) / f32(gh)
                    for ix in range(gw):
                        xx = (sw + f32(pw) * bw) + (f32(ix + 0.5) * bw) / f32(gw)
                        acc += _bilinear(plane, yy, xx)
                out[n, :, ph, pw] = acc / count
    return out


def _softmax(z: np.ndarray, temperature: float, *, exp32: bool = False) -> np.ndarray:
    """float32 ``softmax(z / T)`` over the last axis, computed in float64; ``exp32``: the shifted values
    ``(z - max) / T`` are rounded to float32 before ``exp`` (a float32 ``exp`` is cheaper; the rounding changes
    the result by about float32 precision, the precision of the output anyway)."""
    z = np.asarray(z, np.float64)
    z = (z - z.max(-1, keepdims=True)) / temperature
    e = np.exp(z.astype(np.float32)) if exp32 else np.exp(z)
    return (e / e.sum(-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def pool_labels_dense(indices, scores, boxes, sizes, flips, spec: LabelMapSpec, num_classes: int) -> np.ndarray:
    """The replay equation literally (numpy): :func:`dense_maps`, mirror where flipped (``spec.flip``),
    :func:`map_boxes`, :func:`roi_align_reference` (float64 accumulation), softmax. Same contract and output
    as :func:`pool_labels`; memory ``B * C * S * S`` and slow: the reference the fast paths are tested
    against."""
    c = spec.check_num_classes(num_classes)
    validate_maps(indices, scores, spec, c)
    b, s, f = _crops(boxes, sizes, flips)
    if len(b) != np.asarray(indices).shape[0]:
        raise ValidationError(f"boxes must have one row per map. Got {len(b)} boxes for "
                              f"{np.asarray(indices).shape[0]} maps.")
    maps = dense_maps(np.asarray(indices), np.asarray(scores), c, spec.fill)
    if spec.flip:
        maps[f] = maps[f][..., ::-1]
    rois = np.concatenate([np.arange(len(b), dtype=np.float32)[:, None], _map_boxes(b, s, f, spec)], 1)
    pooled = roi_align_reference(maps, rois, spec.grid, 1.0, spec.sampling_ratio, spec.aligned,
                                 accumulate="float64")
    out = _softmax(pooled.transpose(0, 2, 3, 1), spec.temperature)
    return out[:, 0, 0] if spec.grid == 1 else out


# ---------------------------------------------------------------------------------------- fast pooling
def _axis_weights(lo: np.ndarray, hi: np.ndarray, pooled: int, n: int, sampling_ratio: int,
                  aligned: bool) -> tuple[np.ndarray, np.ndarray]:
    """One axis of RoIAlign for a batch of RoIs spanning ``[lo, hi]`` (float32) over ``n`` cells into
    ``pooled`` bins: ``(W, grid)`` with ``W[b, q, cell]`` the float64 sum over bin ``q``'s samples of their
    bilinear weight on ``cell`` (0 for samples outside ``[-1, n]``) and ``grid[b]`` the samples per bin.
    Sample coordinates and weights are float32, computed as :func:`roi_align_reference` does."""
    f32 = np.float32
    off = f32(0.5 if aligned else 0.0)
    start = lo.astype(f32) - off
    side = (hi.astype(f32) - off) - start
    if not aligned:
        side = np.maximum(side, f32(1))
    bin_ = side / f32(pooled)
    if sampling_ratio > 0:
        grid = np.full(len(lo), sampling_ratio, np.int64)
    else:
        grid = np.ceil(side / f32(pooled)).astype(np.int64)
    G = max(int(grid.max(initial=0)), 1)
    q = np.arange(pooled, dtype=f32)[None, :, None]
    i = np.arange(G)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (start[:, None, None] + q * bin_[:, None, None]) \
            + ((i.astype(f32) + f32(0.5))[None, None, :] * bin_[:, None, None]) / grid.astype(f32)[:, None, None]
    ok = (i[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= n)
    p = np.where(ok & (pos > 0), pos, f32(0))
    low = p.astype(np.int64)
    last = low >= n - 1
    low = np.where(last, n - 1, low)
    high = np.where(last, n - 1, low + 1)
    p = np.where(last, f32(n - 1), p)
    lw = np.where(ok, p - low.astype(f32), f32(0))
    hw = np.where(ok, f32(1) - lw, f32(0))
    cells = np.arange(n)
    w = ((low[..., None] == cells) * hw[..., None].astype(np.float64)
         + (high[..., None] == cells) * lw[..., None].astype(np.float64)).sum(2)
    return w, grid


def _window(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compact ``w`` ``(B, P, n)`` to the smallest common window: ``(cells, weights)`` ``(B, P, L)`` with
    ``L`` the longest run from the first to the last non-zero weight of any row (padding: weight 0)."""
    n = w.shape[-1]
    nz = w != 0
    has = nz.any(-1)
    first = np.argmax(nz, -1)
    length = np.where(has, n - np.argmax(nz[..., ::-1], -1) - first, 0)
    L = max(int(length.max(initial=0)), 1)
    j = np.arange(L)
    cells = np.minimum(first[..., None] + j, n - 1)
    weights = np.where(j < length[..., None], np.take_along_axis(w, cells, -1), 0.0)
    return cells, weights


@dataclass(frozen=True)
class _Plan:
    """Which map cells feed which output cell, with what weight: ``cells`` and ``weights`` ``(B, g*g, E)``
    (flat cell index ``y * S + x`` of the unmirrored map), ``wsum`` ``(B, g*g)`` the total weight."""

    cells: np.ndarray
    weights: np.ndarray
    wsum: np.ndarray


def _plan(b: np.ndarray, s: np.ndarray, f: np.ndarray, spec: LabelMapSpec) -> _Plan:
    S, g = spec.size, spec.grid
    rois = _map_boxes(b, s, f, spec)
    wy, gy = _axis_weights(rois[:, 1], rois[:, 3], g, S, spec.sampling_ratio, spec.aligned)
    wx, gx = _axis_weights(rois[:, 0], rois[:, 2], g, S, spec.sampling_ratio, spec.aligned)
    if spec.flip:
        wx[f] = wx[f][..., ::-1]  # the mirrored map's cell x is the stored map's cell S - 1 - x
    count = np.maximum(gy * gx, 1).astype(np.float64)[:, None, None]
    cy, vy = _window(wy)
    cx, vx = _window(wx)
    B, E = len(b), cy.shape[-1] * cx.shape[-1]
    cells = (cy[:, :, None, :, None] * S + cx[:, None, :, None, :]).reshape(B, g * g, E)
    weights = (vy[:, :, None, :, None] * vx[:, None, :, None, :]).reshape(B, g * g, E) / count
    wsum = (wy.sum(-1)[:, :, None] * wx.sum(-1)[:, None, :] / count).reshape(B, g * g)
    return _Plan(cells, weights, wsum)


def pool_labels(indices, scores, boxes, sizes, flips, spec: LabelMapSpec, num_classes: int, *,
                check_indices: bool = True):
    """Soft labels of crops from their images' label maps (the replay equation of the module docstring).

    ``indices`` integer and ``scores`` float16/float32, both ``(B, K, S, S)`` (one map per crop; repeat an
    image's map for several crops), numpy or torch (any device); ``boxes`` ``(B, 4)`` integer ``(top, left,
    height, width)`` inside images of ``sizes`` ``(B, 2)`` ``(H, W)``; ``flips`` ``(B,)`` bool or None (no
    crop flipped); boxes, sizes and flips may be numpy or tensors (copied to the host: they are small).
    Returns float32 ``(B, C)`` for ``spec.grid == 1``, else ``(B, g, g, C)`` (row = map ``y`` bin, column =
    ``x`` bin; for ``box_order="yx"`` the axes follow the published code's transposed box), numpy for numpy
    maps, a tensor on the maps' device for torch maps.

    Never builds the dense ``(B, C, S, S)`` maps: the float32 RoIAlign sample weights are computed on the
    host (identical for both paths), then each output cell gathers its map cells' top-K entries and
    scatter-adds ``weight * (score - fill)`` into its ``C`` classes, plus ``fill * total weight``; sums are
    float64 (float32 on devices without float64, e.g. MPS). Agrees with :func:`pool_labels_dense` within
    1e-6. ``check_indices`` checks the index range (one reduction, a host sync on a GPU).
    """
    if not isinstance(spec, LabelMapSpec):
        raise TypeError(f"spec must be a LabelMapSpec. Got {type(spec).__name__}.")
    c = spec.check_num_classes(num_classes)
    B, K, S = validate_maps(indices, scores, spec, c, check_range=check_indices)
    b, s, f = _crops(boxes, sizes, flips)
    if len(b) != B:
        raise ValidationError(f"boxes must have one row per map. Got {len(b)} boxes for {B} maps.")
    plan = _plan(b, s, f, spec)
    g, E = spec.grid, plan.cells.shape[-1]
    # target of entry (b, o, e, k): flat output (b, o, class); the plan's cells index the flattened map
    if A.is_torch(scores):
        pooled = _pool_torch(indices, scores, plan, spec, c)
    else:
        idx = np.asarray(indices).reshape(B, K, S * S)
        val = np.asarray(scores).reshape(B, K, S * S).astype(np.float64) - spec.fill
        cells = plan.cells.reshape(B, 1, g * g * E)
        cls = np.take_along_axis(idx, cells, 2).reshape(B, K, g * g, E).astype(np.int64)
        v = np.take_along_axis(val, cells, 2).reshape(B, K, g * g, E) * plan.weights[:, None]
        row = (np.arange(B)[:, None, None, None] * (g * g) + np.arange(g * g)[None, None, :, None]) * c
        pooled = np.bincount((row + cls).ravel(), v.ravel(), minlength=B * g * g * c)
        pooled = pooled.astype(np.float64, copy=False).reshape(B, g * g, c)  # (bincount of nothing is int64)
        pooled += spec.fill * plan.wsum[..., None]
        pooled = _softmax(pooled, spec.temperature, exp32=True)
    return pooled.reshape(B, c) if g == 1 else pooled.reshape(B, g, g, c)


def _pool_torch(indices, scores, plan: _Plan, spec: LabelMapSpec, c: int):
    torch = A.torch_module()
    dev = scores.device
    acc = torch.float32 if dev.type == "mps" else torch.float64
    B, K, S = indices.shape[0], indices.shape[1], indices.shape[2]
    g2, E = plan.cells.shape[1], plan.cells.shape[2]
    cells = torch.from_numpy(plan.cells.reshape(B, 1, g2 * E)).to(dev).expand(B, K, g2 * E)
    weights = torch.from_numpy(plan.weights).to(device=dev, dtype=acc)
    idx = indices.to(device=dev, dtype=torch.int64).reshape(B, K, S * S)  # torch's uint16 has few ops
    cls = torch.gather(idx, 2, cells).reshape(B, K, g2, E)
    val = torch.gather(scores.reshape(B, K, S * S).to(acc), 2, cells).reshape(B, K, g2, E) - spec.fill
    row = (torch.arange(B, device=dev)[:, None, None, None] * g2
           + torch.arange(g2, device=dev)[None, None, :, None]) * c
    pooled = torch.zeros(B * g2 * c, dtype=acc, device=dev)
    pooled.index_add_(0, (row + cls).reshape(-1), (val * weights[:, None]).reshape(-1))
    pooled = pooled.reshape(B, g2, c) + spec.fill * torch.from_numpy(plan.wsum).to(device=dev, dtype=acc)[..., None]
    return torch.softmax(pooled / spec.temperature, -1).to(torch.float32)
