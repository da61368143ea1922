"""The fkdstore format, version 1, in code. This module mirrors ``spec/format-v1.md`` section for section.

Everything that names an array, an attribute or a layout rule lives here; ``store``, ``cli`` and the
other modules import these constants instead of repeating them.

A store is a Zarr v3 group. Its attribute ``"fkdstore"`` (:data:`ATTR_KEY`) holds a JSON object with
the fields of :class:`Header`. Arrays (``N`` images, ``M`` crop slots per image, ``C`` classes):

=================  =================  ==========  ======================================================
array              shape              dtype       meaning
=================  =================  ==========  ======================================================
``image_key``      (N,)               string      relative path or id of each image, unique
``image_size``     (N, 2)             int32       (height, width) of the original image in pixels
``label``          (N,)               int32       ground-truth class, -1 if unknown
``written``        (N,)               uint8       1 once every slot of the image is stored, else 0
``box``            (N, M, 4)          uint16/i32  crop (top, left, height, width), integer pixels
``flip``           (N, M)             bool        horizontal flip applied after cropping
``aug``            (N, M, A)          float32     named augmentation parameters (only when A > 0)
``soft/<field>``   (N, M, ...)        per codec   the label codec's fields (see ``fkdstore.codecs``)
=================  =================  ==========  ======================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError, ValidationError

FORMAT_NAME = "fkdstore"
FORMAT_VERSION = "1.0"  # major.minor: readers refuse a newer major; a newer minor only adds optional things
ATTR_KEY = "fkdstore"

# Array names (invariant 3 of the spec).
IMAGE_KEY = "image_key"
IMAGE_SIZE = "image_size"
LABEL = "label"
WRITTEN = "written"
BOX = "box"
FLIP = "flip"
AUG = "aug"
SOFT_GROUP = "soft"

PER_IMAGE_ARRAYS = (IMAGE_KEY, IMAGE_SIZE, LABEL, WRITTEN)
UNKNOWN_LABEL = -1
VOLATILE_META = ("time_taken_s", "finished_at", "created_at", "history", "skipped")  # meta keys a resumed run may change
AUG_DTYPE = "float32"
AUG_KINDS = ("float", "int", "bool")  # declared meaning of an aug column; all are stored as float32

# Layout defaults, chosen by measurement (benchmarks/README.md, spec section "Chunking").
PER_IMAGE_CHUNK = 65536  # images per chunk of the small per-image arrays (not sharded)
TARGET_CHUNK_BYTES = 8 * 1024  # raw bytes of the widest per-crop array in one inner chunk
TARGET_SHARD_BYTES = 64 * 1024 * 1024  # raw bytes of the widest per-crop array in one shard file
MAX_IMAGES_PER_CHUNK = 1024
MAX_SHARDS = 2048  # wide rows (Full labels) get larger shards rather than more files
COMPRESSOR = {"cname": "lz4hc", "clevel": 9, "shuffle": "bitshuffle"}  # inside blosc; crc32c after it


def soft_path(field_name: str) -> str:
    """Path of a codec field's array inside the group, e.g. ``soft/indices``."""
    return f"{SOFT_GROUP}/{field_name}"


def box_dtype(max_side: int) -> str:
    """Box coordinates are uint16 when every image side fits (<= 65535 px), else int32."""
    return "uint16" if max_side <= np.iinfo(np.uint16).max else "int32"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def default_layout(num_images: int, row_bytes: int) -> tuple[int, int]:
    """Return ``(images_per_chunk, images_per_shard)`` for a store whose widest per-crop array takes
    ``row_bytes`` raw bytes per image.

    Inner chunks hold about :data:`TARGET_CHUNK_BYTES` (so one image read decompresses a few images, not
    thousands) and shards about :data:`TARGET_SHARD_BYTES` (so 1.28M images make a few hundred files),
    but never more than :data:`MAX_SHARDS` shards (Full labels at M = 200 are 400 KB per image: their
    shards grow instead of their file count). The chunk is a power of two; the shard a multiple of it.
    """
    chunk = min(MAX_IMAGES_PER_CHUNK, _pow2_floor(TARGET_CHUNK_BYTES / max(1, row_bytes)))
    shard = max(chunk, _pow2_floor(TARGET_SHARD_BYTES / max(1, row_bytes)))
    shard = max(shard, chunk * math.ceil(num_images / MAX_SHARDS / chunk))
    shard = min(shard, chunk * math.ceil(num_images / chunk))  # never larger than the data
    shard = max(chunk, chunk * (shard // chunk))
    return chunk, shard


@dataclass(frozen=True, kw_only=True)
class AugParam:
    """One named augmentation parameter stored per crop slot in the ``aug`` array (as float32)."""

    name: str
    kind: str = "float"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValidationError(f"aug parameter names must be identifiers. Got {self.name!r}.")
        if self.kind not in AUG_KINDS:
            raise ValidationError(f"aug parameter kind must be one of {list(AUG_KINDS)}. Got {self.kind!r}.")


def parse_aug(aug) -> tuple[AugParam, ...]:
    """Accept ``None``, names, ``(name, kind)`` pairs, dicts or :class:`AugParam` and return AugParams."""
    out = []
    for a in aug or ():
        if isinstance(a, AugParam):
            out.append(a)
        elif isinstance(a, str):
            out.append(AugParam(name=a))
        elif isinstance(a, dict):
            out.append(AugParam(**a))
        else:
            out.append(AugParam(name=a[0], kind=a[1]))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValidationError(f"aug parameter names must be unique. Got {names}.")
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Header:
    """The JSON object stored under the group attribute ``"fkdstore"``."""

    num_images: int
    crops_per_image: int
    num_classes: int
    codec: dict[str, Any]
    images_per_chunk: int
    images_per_shard: int
    box_dtype: str
    aug: tuple[AugParam, ...] = ()
    has_labels: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""
    format_version: str = FORMAT_VERSION
    format: str = FORMAT_NAME

    def __post_init__(self):
        for name in ("num_images", "crops_per_image", "num_classes", "images_per_chunk", "images_per_shard"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValidationError(f"{name} must be a positive integer. Got {v!r}.")
        if self.images_per_shard % self.images_per_chunk:
            raise ValidationError(
                f"images_per_shard must be a multiple of images_per_chunk. "
                f"Got {self.images_per_shard} and {self.images_per_chunk}."
            )
        if self.box_dtype not in ("uint16", "int32"):
            raise ValidationError(f"box_dtype must be 'uint16' or 'int32'. Got {self.box_dtype!r}.")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.images_per_shard)

    def shard_range(self, shard: int) -> range:
        """Image indices stored in one shard (and in one chunk of ``written``)."""
        start = shard * self.images_per_shard
        return range(start, min(self.num_images, start + self.images_per_shard))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aug"] = [dataclasses.asdict(a) for a in self.aug]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Header:
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"not an fkdstore store: group attribute {ATTR_KEY!r} is missing or malformed")
        check_version(d.get("format_version"))
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # a newer minor version may add keys
        d["aug"] = parse_aug(d.get("aug"))
        return cls(**d)

    def schema_key(self) -> dict[str, Any]:
        """The fields two runs must agree on to write into the same store (resume, several processes)."""
        d = self.to_json()
        for volatile in ("library_version", "meta"):
            d.pop(volatile)
        return d


def check_version(version) -> tuple[int, int]:
    """Parse ``"major.minor"``; raise :class:`FormatError` for a newer major version than this library reads."""
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise FormatError(f"format_version must be 'major.minor'. Got {version!r}.") from None
    ours = int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise FormatError(
            f"store has format version {version}, newer than this library reads ({FORMAT_VERSION}); "
            f"upgrade fkdstore"
        )
    return major, minor
