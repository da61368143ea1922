"""The policy contract: what every augmentation policy implements (numpy + Pillow only, no torch).

A *policy* is a frozen, keyword-only dataclass, one small file per policy, registered by ``name``:

- ``name`` (class attribute): the registry id, stored in the store's ``augment`` attribute.
- ``mixing`` (class attribute): ``True`` for policies that mix in a second image (Mixup, CutMix).
- ``get_config()`` returns JSON values only and includes ``"name"``; ``from_config(cfg)`` rebuilds the
  policy and names unknown keys in a :class:`~fkdstore.errors.ValidationError`. Two policies are equal when
  their configs are; ``repr`` reads like the constructor call.
- ``columns()`` declares the per-slot parameter columns as :class:`Column` ``(name, kind, dtype, shape)``:
  ``dtype`` is the *storage* dtype (``uint8`` op ids, ``float16`` factors, ``int32`` partner image, ...).
  Column names are global within a pipeline, so each carries its policy's prefix (``ra_ops``, ``mixup_lam``).
- ``sample(seed, image_index, slots, *, image_size, num_images, crops_per_image)`` returns
  ``{column: array (len(slots), *shape)}`` already cast to the storage dtype. Slot ``s`` of image ``i`` draws
  only from :func:`slot_rng` ``(seed, policy.tag, i, s)``: never from batch size, workers, ranks or call order.
- ``apply(pixels, params, *, partner=None)`` is a pure function of a uint8 ``(H, W, 3)`` image and ONE
  slot's params (a mapping column -> value, as read back from the store) and returns a new uint8 image.
  Because ``sample`` casts before returning, the teacher applies exactly the stored values: replay from
  the store is pixel-identical.
- ``validate(columns, *, num_images, crops_per_image, image_size=None)`` checks stored params (ranges,
  partner indices) so a reader can refuse a corrupt or foreign store with a clear error.

``image_size`` is always the ``(height, width)`` of the pixels the policy operates on: for the policies
applied after the crop, the crop's output size (the teacher's input size).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from fkdstore.errors import ValidationError
from fkdstore.transforms import _is_int
from fkdstore.validation import int_in_range

__all__ = ["Column", "Policy", "slot_rng", "KINDS"]

KINDS = ("float", "int", "bool", "index")
MAX_SIDE = 65535  # boxes are stored as uint16


class Column(NamedTuple):
    """One per-slot parameter column: stored as array ``aug/<name>`` of shape ``(N, M, *shape)``."""

    name: str
    kind: str  # one of KINDS; "index" = refers to an image or slot of the store
    dtype: str  # numpy storage dtype name, little-endian in the store
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        """The column as the store's ``aug`` attribute entry."""
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def nbytes(self) -> int:
        """Raw (uncompressed) bytes per slot."""
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))


def slot_rng(seed: int, tag: int, image_index: int, slot: int) -> np.random.Generator:
    """The generator of one slot of one policy: ``default_rng(SeedSequence([seed, tag, image_index, slot]))``."""
    return np.random.default_rng(np.random.SeedSequence([seed, tag, image_index, slot]))


# ---------------------------------------------------------------- small parse helpers (one home, this package)

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def parse_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (or ``(lo, hi]`` with ``lo_open``)."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number. Got {type(value).__name__} {value!r}.")
    value = float(value)
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        rule = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValidationError(f"{name} must be in {rule}. Got {value!r}.")
    return value


def parse_pair(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> tuple[float, float]:
    """``value`` as an ordered pair ``(a, b)`` with both ends in ``[lo, hi]`` and ``a <= b``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (min, max). Got {value!r}.")
    a = parse_float(f"{name}[0]", value[0], lo, hi, lo_open=lo_open)
    b = parse_float(f"{name}[1]", value[1], lo, hi, lo_open=lo_open)
    if a > b:
        raise ValidationError(f"{name} must be ordered (min <= max). Got {value!r}.")
    return a, b


def parse_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` as one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str. Got {type(value).__name__} {value!r}.")
    if value not in choices:
        raise ValidationError(f"{name} must be one of {list(choices)}. Got {value!r}.")
    return value


def parse_rgb(name: str, value: Any) -> tuple[int, int, int]:
    """A fill colour: an int in [0, 255] (all channels) or three of them."""
    if _is_int(value):
        v = int_in_range(name, value, 0, 255)
        return v, v, v
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(f"{name} must be an int in [0, 255] or 3 of them. Got {value!r}.")
    r, g, b = (int_in_range(f"{name}[{k}]", v, 0, 255) for k, v in enumerate(value))
    return r, g, b


def parse_image_size(image_size: Any) -> tuple[int, int]:
    """``(height, width)`` of the pixels a policy operates on, each in [1, 65535]."""
    if isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise TypeError(f"image_size must be a (height, width) pair. Got {image_size!r}.")
    return int_in_range("image_size height", image_size[0], 1, MAX_SIDE), int_in_range(
        "image_size width", image_size[1], 1, MAX_SIDE
    )


def parse_slots(slots: Any, crops_per_image: int) -> np.ndarray:
    """Slot indices as int64, each in ``[0, crops_per_image)``."""
    arr = np.asarray(slots)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"slots must be a 1-d sequence of ints. Got {slots!r}.")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= crops_per_image)]
    if bad.size:
        raise ValidationError(f"slots must be in [0, {crops_per_image - 1}]. Got {int(bad[0])}.")
    return arr


def check_pixels(pixels: Any, name: str = "pixels") -> np.ndarray:
    """A uint8 ``(H, W, 3)`` numpy image."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"{name} must be a numpy array. Got {type(pixels).__name__}.")
    if pixels.dtype != np.uint8:
        raise TypeError(f"{name} must have dtype uint8. Got {pixels.dtype}.")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValidationError(f"{name} must have shape (H, W, 3). Got {pixels.shape}.")
    return pixels


# ---------------------------------------------------------------- the base class

@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """Base class of augmentation policies; the module docstring is the contract."""

    name: ClassVar[str] = ""
    mixing: ClassVar[bool] = False

    # -- config habits ------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """JSON-only config including ``name``; ``get_policy(cfg)`` rebuilds an equal policy."""
        cfg: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            cfg[f.name] = _to_json(getattr(self, f.name))
        return cfg

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Policy:
        """Rebuild from :meth:`get_config` output; unknown keys raise ValidationError naming them."""
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{cls.name} config must be a dict. Got {type(cfg).__name__}.")
        cfg = dict(cfg)
        name = cfg.pop("name", cls.name)
        if name != cls.name:
            raise ValidationError(f"config name must be {cls.name!r}. Got {name!r}.")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise ValidationError(f"{cls.name} config keys must be in {allowed}. Got unknown {unknown}.")
        return cls(**cfg)

    @property
    def tag(self) -> int:
        """The policy's stream tag in :func:`slot_rng`: ``zlib.crc32(name)``."""
        return zlib.crc32(self.name.encode("ascii"))

    # -- to implement ------------------------------------------------------------------------------
    def columns(self) -> tuple[Column, ...]:
        """The per-slot parameter columns this policy stores."""
        raise NotImplementedError

    def _draw(self, rng: np.random.Generator, *, image_index: int, image_size: tuple[int, int],
              num_images: int, crops_per_image: int) -> dict[str, Any]:
        """One slot's parameters (before the cast to the storage dtype), drawn from ``rng`` only."""
        raise NotImplementedError

    def apply(self, pixels: np.ndarray, params: Mapping[str, Any], *, partner: np.ndarray | None = None) -> np.ndarray:
        """Apply one slot's (stored) params to a uint8 ``(H, W, 3)`` image; returns a new image."""
        raise NotImplementedError

    def _check_values(self, columns: Mapping[str, np.ndarray], *, num_images: int, crops_per_image: int,
                      image_size: tuple[int, int] | None) -> None:
        """Range checks of stored values (per policy)."""

    # -- shared machinery ----------------------------------------------------------------------------
    def sample(self, seed: int, image_index: int, slots: Sequence[int] | np.ndarray, *,
               image_size: Sequence[int], num_images: int, crops_per_image: int) -> dict[str, np.ndarray]:
        """Params of ``slots`` of image ``image_index``, cast to the storage dtypes.

        Slot ``s`` draws from ``slot_rng(seed, self.tag, image_index, s)`` in the policy's documented order
        (``spec/format-v4.md`` section 6), so the result depends on ``(seed, image_index, s)`` and the config only.
        """
        seed = int_in_range("seed", seed, 0)
        num_images = int_in_range("num_images", num_images, 1)
        crops_per_image = int_in_range("crops_per_image", crops_per_image, 1, MAX_SIDE + 1)
        image_index = int_in_range("image_index", image_index, 0, num_images - 1)
        slot_arr = parse_slots(slots, crops_per_image)
        hw = parse_image_size(image_size)
        cols = self.columns()
        out = {c.name: np.zeros((len(slot_arr), *c.shape), dtype=c.dtype) for c in cols}
        for j, slot in enumerate(slot_arr.tolist()):
            values = self._draw(slot_rng(seed, self.tag, image_index, slot), image_index=image_index,
                                image_size=hw, num_images=num_images, crops_per_image=crops_per_image)
            for c in cols:
                out[c.name][j] = values[c.name]
        return out

    def validate(self, columns: Mapping[str, Any], *, num_images: int, crops_per_image: int,
                 image_size: Sequence[int] | None = None) -> None:
        """Check stored columns (any leading shape) for presence, dtype, trailing shape and value ranges."""
        hw = parse_image_size(image_size) if image_size is not None else None
        arrays = {}
        for c in self.columns():
            if c.name not in columns:
                raise ValidationError(f"augment column {c.name!r} of policy {self.name!r} is missing.")
            a = np.asarray(columns[c.name])
            if a.dtype != np.dtype(c.dtype):
                raise ValidationError(f"augment column {c.name!r} must have dtype {c.dtype}. Got {a.dtype}.")
            if tuple(a.shape[a.ndim - len(c.shape):]) != c.shape or a.ndim < len(c.shape):
                raise ValidationError(
                    f"augment column {c.name!r} must end in shape {c.shape}. Got {a.shape}."
                )
            arrays[c.name] = a
        self._check_values(arrays, num_images=num_images, crops_per_image=crops_per_image, image_size=hw)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def param(params: Mapping[str, Any], name: str) -> np.ndarray:
    """One column's value for one slot, as a numpy array (``KeyError`` -> ValidationError naming it)."""
    try:
        return np.asarray(params[name])
    except KeyError:
        raise ValidationError(f"params must hold column {name!r}. Got columns {sorted(params)}.") from None


def check_range(column: str, values: np.ndarray, lo: float, hi: float) -> None:
    """All ``values`` in ``[lo, hi]`` (NaN fails), else ValidationError naming the column and a bad value."""
    v = np.asarray(values)
    bad = ~((v >= lo) & (v <= hi))
    if bad.any():
        got = v[bad].flat[0].item()
        raise ValidationError(f"augment column {column!r} values must be in [{lo:g}, {hi:g}]. Got {got!r}.")
