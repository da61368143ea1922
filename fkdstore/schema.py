"""The fkdstore format in code. This module mirrors ``spec/format-v3.md`` section for section; stores of
format 1.0 (``spec/format-v1.md``, written by fkdstore 0.1) are still read.

Everything that names an array, an attribute or a layout rule lives here; the writer, reader, verify and
CLI import these constants and functions instead of repeating them. A store is a Zarr v3 group whose
attribute ``"fkdstore"`` (:data:`ATTR_KEY`) holds the JSON object of :class:`Header`. Arrays (``N``
images, ``M`` crop slots per image, ``C`` classes, ``L`` key bytes, ``P`` per-crop arrays):

=================  ==================  ==========  ====================================================
array              shape               dtype       meaning
=================  ==================  ==========  ====================================================
``key``            (N, L)              uint8       zero-padded UTF-8 key of each image (2.0)
``image_key``      (N,)                string      key of each image (1.0 only; needs zarr's vlen-utf8)
``image_size``     (N, 2)              int32       (height, width) of the original image in pixels
``label``          (N,)                int32       ground-truth class, -1 if unknown
``written``        (N,)                uint8       1 once every slot of the image is stored, else 0
``box``            (N, M, 4)           uint16/i32  crop (top, left, height, width), integer pixels
``flip``           (N, M)              bool        horizontal flip applied after cropping
``aug/<name>``     (N, M, *shape)      per column  one augmentation parameter column (2.0)
``aug``            (N, M, A)           float32     all augmentation parameters (1.0 only)
``soft/<field>``   (N, M, ...)         per codec   the label codec's fields (see ``fkdstore.codecs``)
``manifest``       (chunks, P)         uint32      position-bound tag of every inner chunk (2.0)
=================  ==================  ==========  ====================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import crc32c as _crc32c
import numpy as np

from .errors import CorruptStoreError, FormatError, ValidationError
from .validation import positive_int

FORMAT_NAME = "fkdstore"
FORMAT_VERSION = "2.0"  # what this library writes for stored crops; readers refuse a newer major, accept a newer minor
SEEDED_FORMAT_VERSION = "3.0"  # what it writes for seeded crops (box and flip derived from `crop_sampler`)
READ_MAJORS = (1, 2, 3)  # majors this library reads
ATTR_KEY = "fkdstore"
# The root group's only attribute while a writer creates a store (invariant 1): a group holding exactly this
# attribute and no header is an interrupted creation, which a writer may delete; nothing else ever is.
CREATING_KEY = "fkdstore_creating"

# Array names (invariant 3 of the spec).
KEY = "key"
IMAGE_KEY = "image_key"  # 1.0
IMAGE_SIZE = "image_size"
LABEL = "label"
WRITTEN = "written"
BOX = "box"
FLIP = "flip"
AUG = "aug"  # 2.0: a group of per-column arrays; 1.0: one (N, M, A) float32 array
SOFT_GROUP = "soft"
MANIFEST = "manifest"

PER_IMAGE_ARRAYS = (KEY, IMAGE_SIZE, LABEL, WRITTEN)
UNKNOWN_LABEL = -1
FILL_VALUE = 0  # fill value of every per-crop array (and of rows past N in a partial last chunk)
# meta keys a resumed run may change; every other meta key must match for a writer to re-open a store
VOLATILE_META = ("time_taken_s", "finished_at", "created_at", "history", "skipped")
CHECKSUM_EXCLUDES = ("checksum", "meta", "library_version")  # header fields the checksum does not cover

AUG_COLUMN_KEYS = ("name", "kind", "dtype", "shape")  # the keys of one entry of the header's ``aug`` list
AUG_KINDS = ("float", "int", "bool", "index")  # declared meaning of an aug column
AUG_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float16", "float32")
V1_AUG_DTYPE = "float32"  # 1.0 stored every aug column as float32 in one array
BOX_DTYPES = ("uint16", "int32")

# Layout defaults, chosen by measurement (benchmarks/README.md, spec section "Layout").
PER_IMAGE_CHUNK = 65536  # images per chunk of the small per-image arrays (not sharded)
TARGET_CHUNK_BYTES = 8 * 1024  # raw bytes of the widest per-crop array in one inner chunk
TARGET_SHARD_BYTES = 64 * 1024 * 1024  # raw bytes of the widest per-crop array in one shard file
MAX_IMAGES_PER_CHUNK = 1024
MAX_SLOTS_PER_SHARD = 2**20  # a shard is buffered whole: this bounds the teacher work a kill can lose
MAX_SHARDS = 2048  # wide rows (Full labels) get larger shards rather than more files
COMPRESSOR = {"cname": "lz4hc", "clevel": 9, "shuffle": "bitshuffle"}  # inside blosc; crc32c after it


def soft_path(field_name: str) -> str:
    """Path of a codec field's array inside the group, e.g. ``soft/indices``."""
    return f"{SOFT_GROUP}/{field_name}"


def aug_path(column: str) -> str:
    """Path of an augmentation column's array (format 2.0), e.g. ``aug/ra_ops``."""
    return f"{AUG}/{column}"


def box_dtype(max_side: int) -> str:
    """Box coordinates are uint16 when every image side fits (<= 65535 px), else int32."""
    return "uint16" if max_side <= np.iinfo(np.uint16).max else "int32"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def default_layout(num_images: int, row_bytes: int, crops_per_image: int = 1) -> tuple[int, int]:
    """Return ``(images_per_chunk, images_per_shard)``: the layout rule of spec section 5, as an algorithm.

    ``row_bytes`` is the raw size of one image's row in the widest per-crop array (``M * bytes per slot``).

    1. ``chunk = min(MAX_IMAGES_PER_CHUNK, pow2_floor(TARGET_CHUNK_BYTES / row_bytes))`` (at least 1): one
       image read decompresses a few images, not thousands.
    2. ``shard = max(chunk, pow2_floor(TARGET_SHARD_BYTES / row_bytes))``: about 64 MiB per shard file.
    3. ``shard = min(shard, max(chunk, pow2_floor(MAX_SLOTS_PER_SHARD / M)))``: a shard holds at most
       2**20 slots, so a writer killed mid-shard loses a bounded amount of teacher work.
    4. ``shard = max(shard, chunk * ceil(N / MAX_SHARDS / chunk))``: at most 2048 shards per array (wide
       rows such as Full labels grow their shards instead of their file count; this wins over step 3).
    5. ``shard = min(shard, chunk * ceil(N / chunk))`` (never larger than the data), then rounded down to
       a multiple of ``chunk`` (at least ``chunk``).
    """
    row_bytes = max(1, int(row_bytes))
    chunk = min(MAX_IMAGES_PER_CHUNK, _pow2_floor(TARGET_CHUNK_BYTES / row_bytes))
    shard = max(chunk, _pow2_floor(TARGET_SHARD_BYTES / row_bytes))
    shard = min(shard, max(chunk, _pow2_floor(MAX_SLOTS_PER_SHARD / max(1, int(crops_per_image)))))
    shard = max(shard, chunk * math.ceil(num_images / MAX_SHARDS / chunk))
    shard = min(shard, chunk * math.ceil(num_images / chunk))
    shard = max(chunk, chunk * (shard // chunk))
    return chunk, shard


# ------------------------------------------------------------------------------------------------ keys


def encode_keys(keys: Sequence[str]) -> np.ndarray:
    """Image keys -> the ``key`` array: ``(N, L)`` uint8 of zero-padded UTF-8, ``L`` = longest key (>= 1).

    Keys must be non-empty strings without NUL characters (NUL is the padding), unique (checked by the
    writer, which knows N)."""
    raw = []
    for i, k in enumerate(keys):
        if not isinstance(k, str):
            raise TypeError(f"image keys must be str. Key {i} is {type(k).__name__}.")
        if not k or "\x00" in k:
            raise ValidationError(f"image keys must be non-empty and contain no NUL character. Key {i} is {k!r}.")
        raw.append(k.encode("utf-8"))
    length = max((len(b) for b in raw), default=1)
    # numpy's fixed-width bytes dtype pads with NUL: N*L bytes, no per-byte index arrays (those took 32 B per key
    # byte, ~0.9 GiB for ImageNet's keys)
    return np.array(raw, dtype=f"S{length}").view(np.uint8).reshape(len(raw), length)


def decode_keys(arr: np.ndarray, *, start: int = 0) -> list[str]:
    """The ``key`` array (or rows of it) -> list of str. ``start`` is the first row's image index, for errors."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 2:
        raise CorruptStoreError(f"array {KEY!r} must be 2-D (N, L). Got shape {arr.shape}.")
    fixed = arr.view(f"S{arr.shape[1]}").reshape(-1) if arr.shape[1] else np.zeros(len(arr), "S1")
    out = []
    for i, b in enumerate(fixed.tolist()):  # numpy's S dtype drops the trailing NUL padding
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            raise CorruptStoreError(f"array {KEY!r}: image {start + i} is not valid UTF-8") from None
        if b"\0" in b:  # invariant 4: NUL only as padding (the spec's recipe would cut the key here)
            raise CorruptStoreError(f"array {KEY!r}: image {start + i} has a NUL byte inside its key. Got {b!r}.")
    return out


# -------------------------------------------------------------------------------------------- manifest


def manifest_tag(path: str, chunk_index: int, chunk: np.ndarray) -> int:
    """The manifest value binding inner chunk ``chunk_index`` of per-crop array ``path`` to its content:
    ``crc32c(utf8(path) + b"\\0" + uint64_le(chunk_index) + bytes)``, where ``bytes`` is the decoded chunk
    (full inner-chunk shape, C order, little-endian, bool as one byte; rows past N hold the fill value)."""
    head = _crc32c.crc32c(path.encode("utf-8") + b"\0" + int(chunk_index).to_bytes(8, "little"))
    data = np.ascontiguousarray(chunk)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return _crc32c.crc32c(data.reshape(-1).view(np.uint8), head)


def manifest_tags(path: str, first_chunk: int, data: np.ndarray, images_per_chunk: int) -> np.ndarray:
    """Tags of consecutive inner chunks ``first_chunk, first_chunk + 1, ...`` covering ``data`` (rows =
    images). A partial last chunk is padded with the fill value to ``images_per_chunk`` rows."""
    n = math.ceil(len(data) / images_per_chunk)
    out = np.empty(n, np.uint32)
    for j in range(n):
        part = data[j * images_per_chunk:(j + 1) * images_per_chunk]
        if len(part) < images_per_chunk:
            pad = np.full((images_per_chunk - len(part), *part.shape[1:]), FILL_VALUE, part.dtype)
            part = np.concatenate([part, pad])
        out[j] = manifest_tag(path, first_chunk + j, part)
    return out


# ------------------------------------------------------------------------------------- augment columns


@dataclass(frozen=True, kw_only=True)
class AugColumn:
    """One named augmentation parameter stored per crop slot: array ``aug/<name>`` (2.0) of shape
    ``(N, M, *shape)`` and storage ``dtype``. ``kind`` says what it means (float, int, bool, index)."""

    name: str
    kind: str = "float"
    dtype: str = V1_AUG_DTYPE
    shape: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValidationError(f"aug column names must be identifiers. Got {self.name!r}.")
        if self.kind not in AUG_KINDS:
            raise ValidationError(f"aug column kind must be one of {list(AUG_KINDS)}. Got {self.kind!r}.")
        if self.dtype not in AUG_DTYPES:
            raise ValidationError(f"aug column dtype must be one of {list(AUG_DTYPES)}. Got {self.dtype!r}.")
        shape = tuple(self.shape)
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
            raise ValidationError(f"aug column shape must be positive integers. Got {self.shape!r}.")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}


def parse_aug(aug) -> tuple[AugColumn, ...]:
    """Accept ``None``, names, ``(name, kind[, dtype[, shape]])`` tuples, dicts or :class:`AugColumn`s."""
    out = []
    for a in aug or ():
        if isinstance(a, AugColumn):
            out.append(a)
        elif isinstance(a, str):
            out.append(AugColumn(name=a))
        elif isinstance(a, Mapping):
            unknown = set(a) - set(AUG_COLUMN_KEYS)
            if unknown:
                raise ValidationError(f"aug column keys must be {', '.join(AUG_COLUMN_KEYS)}. Got {sorted(unknown)}.")
            out.append(AugColumn(**{k: (tuple(v) if k == "shape" else v) for k, v in a.items()}))
        elif isinstance(a, (tuple, list)) and 1 <= len(a) <= 4:
            names = ("name", "kind", "dtype", "shape")
            out.append(AugColumn(**{k: (tuple(v) if k == "shape" else v) for k, v in zip(names, a)}))
        else:
            raise TypeError(f"aug columns must be names, tuples, dicts or AugColumn. Got {a!r}.")
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValidationError(f"aug column names must be unique. Got {names}.")
    return tuple(out)


# ------------------------------------------------------------------------------------------ invariants


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


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for checksums and comparisons: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def check_json(obj: Any, what: str) -> None:
    """Raise :class:`ValidationError` unless ``obj`` is standard JSON (no NaN/inf, str keys, lists not tuples
    after a round trip)."""
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"{what} must be standard JSON (no NaN/inf, str keys). Got an error: {e}.") from None
    if json.loads(text) != obj:
        raise ValidationError(f"{what} must round-trip through JSON unchanged (use lists, not tuples). Got {obj!r}.")


# -------------------------------------------------------------------------------------------- header

_REQUIRED = ("num_images", "crops_per_image", "num_classes", "codec", "images_per_chunk", "images_per_shard",
             "box_dtype")
_REQUIRED_2 = _REQUIRED + ("key_length", "aug", "augment", "has_labels", "checksum")
_REQUIRED_3 = _REQUIRED_2 + ("crop_sampler",)


def _parse_positive_int(name: str, v: Any) -> int:
    return positive_int(name, v)


@dataclass(frozen=True, kw_only=True)
class Header:
    """The JSON object stored under the group attribute ``"fkdstore"`` (spec section 1).

    Build one with keyword arguments (the writer does); read one with :meth:`from_json`, which raises
    :class:`FormatError` for anything malformed and :class:`CorruptStoreError` for a checksum mismatch."""

    num_images: int
    crops_per_image: int
    num_classes: int
    codec: dict[str, Any]
    images_per_chunk: int
    images_per_shard: int
    box_dtype: str
    key_length: int = 0
    aug: tuple[AugColumn, ...] = ()
    augment: tuple[dict[str, Any], ...] = ()
    has_labels: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    library_version: str = ""
    format_version: str = FORMAT_VERSION
    format: str = FORMAT_NAME
    checksum: str = field(default="", compare=False)
    crop_sampler: dict[str, Any] | None = None  # 3.0: the seeded crop sampler's config (box/flip derived)

    def __post_init__(self):
        for name in ("num_images", "crops_per_image", "num_classes", "images_per_chunk", "images_per_shard"):
            object.__setattr__(self, name, _parse_positive_int(name, getattr(self, name)))
        if self.images_per_shard % self.images_per_chunk:
            raise ValidationError(
                f"images_per_shard must be a multiple of images_per_chunk. "
                f"Got {self.images_per_shard} and {self.images_per_chunk}."
            )
        if self.box_dtype not in BOX_DTYPES:
            raise ValidationError(f"box_dtype must be one of {list(BOX_DTYPES)}. Got {self.box_dtype!r}.")
        if not isinstance(self.codec, Mapping) or not isinstance(self.codec.get("name"), str):
            raise ValidationError(f"codec must be a config object with a 'name'. Got {self.codec!r}.")
        if not isinstance(self.meta, Mapping):
            raise ValidationError(f"meta must be a JSON object. Got {type(self.meta).__name__}.")
        if isinstance(self.key_length, bool) or not isinstance(self.key_length, (int, np.integer)) or self.key_length < 0:
            raise ValidationError(f"key_length must be an integer >= 0. Got {self.key_length!r}.")
        if self.major >= 2 and self.key_length < 1:
            raise ValidationError(f"key_length must be >= 1 in format 2. Got {self.key_length!r}.")
        augment = tuple(self.augment)
        if not all(isinstance(p, Mapping) and isinstance(p.get("name"), str) for p in augment):
            raise ValidationError(f"augment must be a list of policy configs with a 'name'. Got {self.augment!r}.")
        object.__setattr__(self, "augment", tuple(dict(p) for p in augment))
        object.__setattr__(self, "aug", parse_aug(self.aug))
        if self.major < 2 and any(a.dtype != V1_AUG_DTYPE or a.shape for a in self.aug):
            raise ValidationError("format 1 stores aug columns as scalar float32 only.")
        if self.major >= 3:
            object.__setattr__(self, "crop_sampler", parse_crop_sampler(self.crop_sampler))
        elif self.crop_sampler is not None:
            raise ValidationError(f"crop_sampler (seeded crops) needs format {SEEDED_FORMAT_VERSION}; this header "
                                  f"is format {self.format_version}.")

    # -- layout
    @property
    def major(self) -> int:
        return check_version(self.format_version)[0]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.images_per_shard)

    @property
    def chunks_per_shard(self) -> int:
        return self.images_per_shard // self.images_per_chunk

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_images / self.images_per_chunk)

    def shard_range(self, shard: int) -> range:
        """Image indices stored in one shard (and in one chunk of ``written`` and of ``manifest``)."""
        start = shard * self.images_per_shard
        return range(start, min(self.num_images, start + self.images_per_shard))

    @property
    def key_array(self) -> str:
        """Name of the array holding image keys: ``key`` (2.0) or ``image_key`` (1.0)."""
        return KEY if self.major >= 2 else IMAGE_KEY

    @property
    def per_image_arrays(self) -> tuple[str, ...]:
        """The unsharded per-image arrays of this store's format version."""
        return (self.key_array, IMAGE_SIZE, LABEL, WRITTEN)

    @property
    def seeded(self) -> bool:
        """Format 3.0: box and flip are derived from :attr:`crop_sampler`, not stored."""
        return self.crop_sampler is not None

    @property
    def derived_arrays(self) -> tuple[str, ...]:
        """Per-crop arrays that are derived, not stored: ``(box, flip)`` for seeded crops (3.0), else none.
        They keep their manifest columns (tags of the derived chunks)."""
        return (BOX, FLIP) if self.seeded else ()

    def stored_specs(self, codec) -> dict[str, tuple[tuple[int, ...], str]]:
        """:meth:`per_crop_specs` without the derived arrays: the per-crop arrays that exist on storage."""
        derived = self.derived_arrays
        return {k: v for k, v in self.per_crop_specs(codec).items() if k not in derived}

    def per_crop_specs(self, codec) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{array path: (trailing shape per slot, dtype)}`` of every per-crop array, in manifest order
        (box, flip, aug columns, codec fields), derived ones included (:meth:`stored_specs` leaves them out).
        ``codec`` is the store's codec object (it knows its fields)."""
        specs: dict[str, tuple[tuple[int, ...], str]] = {BOX: ((4,), self.box_dtype), FLIP: ((), "bool")}
        if self.aug and self.major < 2:
            specs[AUG] = ((len(self.aug),), V1_AUG_DTYPE)
        else:
            for a in self.aug:
                specs[aug_path(a.name)] = (a.shape, a.dtype)
        for name, spec in codec.fields(self.num_classes).items():
            specs[soft_path(name)] = (tuple(spec.shape), spec.dtype)
        return specs

    def row_bytes(self, codec) -> int:
        """Raw bytes of one image's row in the widest per-crop array (input of :func:`default_layout`)."""
        M = self.crops_per_image
        return max(M * math.prod(t) * np.dtype(d).itemsize for t, d in self.per_crop_specs(codec).values())

    # -- JSON
    def to_json(self) -> dict[str, Any]:
        """The attribute object, with ``checksum`` computed (format 2) over the non-volatile fields."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["aug"] = [a.to_json() for a in self.aug]
        d["augment"] = [dict(p) for p in self.augment]
        d["meta"] = dict(self.meta)
        d["codec"] = dict(self.codec)
        if d["crop_sampler"] is None:  # 1.0 and 2.0 headers have no such key
            del d["crop_sampler"]
        else:
            d["crop_sampler"] = dict(d["crop_sampler"])
        if self.major < 2:  # 1.0 had neither field
            for k in ("key_length", "augment", "checksum"):
                d.pop(k)
            d["aug"] = [{"name": a.name, "kind": a.kind} for a in self.aug]
        else:
            d["checksum"] = header_checksum(d)
        return d

    @classmethod
    def from_json(cls, d: Any) -> Header:
        """Parse and check the attribute object: :class:`FormatError` if it is not a readable fkdstore
        header (wrong format, newer major version, missing or malformed field); :class:`CorruptStoreError`
        if a format-2 checksum does not match (the header was edited or damaged)."""
        if not isinstance(d, Mapping):
            raise FormatError(f"not an fkdstore store: group attribute {ATTR_KEY!r} must be a JSON object. "
                              f"Got {type(d).__name__}.")
        if d.get("format") != FORMAT_NAME:
            got = "it is missing" if "format" not in d else f"Got {d['format']!r}"
            raise FormatError(f"not an fkdstore store: header key 'format' must be {FORMAT_NAME!r}; {got}.")
        if not isinstance(d.get("format_version"), str):
            raise FormatError(f"fkdstore header key 'format_version' must be a string 'major.minor'. "
                              f"Got {d.get('format_version')!r}.")
        major, _ = check_version(d.get("format_version"))
        required = _REQUIRED_3 if major >= 3 else _REQUIRED_2 if major >= 2 else _REQUIRED
        missing = [k for k in required if k not in d]
        if missing:
            raise FormatError(f"fkdstore header (format {d.get('format_version')}) lacks required keys {missing}")
        if major >= 2:
            expected = header_checksum(d)
            if d.get("checksum") != expected:
                raise CorruptStoreError(
                    f"fkdstore header checksum mismatch: stored {d.get('checksum')!r}, computed {expected!r} "
                    f"(the group attribute {ATTR_KEY!r} in zarr.json was edited or damaged)"
                )
        for key, kind, what in (("aug", list, "a list"), ("augment", list, "a list"), ("has_labels", bool, "a bool")):
            if key in d and not isinstance(d[key], kind):
                raise FormatError(f"fkdstore header key {key!r} must be {what}. Got {d[key]!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}  # a newer minor version may add keys: ignore them
        if "aug" in kw:  # ... at every level except codec and augment entries (spec section 1)
            kw["aug"] = [{k: v for k, v in a.items() if k in AUG_COLUMN_KEYS} if isinstance(a, Mapping) else a
                         for a in kw["aug"]]
        try:
            return cls(**kw)
        except (TypeError, ValidationError) as e:
            raise FormatError(f"malformed fkdstore header: {e}") from None

    def schema_key(self) -> dict[str, Any]:
        """The fields two runs must agree on to write into the same store (resume, several processes)."""
        d = self.to_json()
        for volatile in ("library_version", "meta", "checksum"):
            d.pop(volatile, None)
        return d


def header_checksum(d: Mapping[str, Any]) -> str:
    """``"crc32c:%08x"`` of the canonical JSON of a header object without ``checksum``, ``meta`` and
    ``library_version`` (spec 1.2): an edit of N, M, C, the codec, the layout or the augment columns is
    detected; provenance may change (a resumed run updates ``meta``)."""
    body = {k: v for k, v in d.items() if k not in CHECKSUM_EXCLUDES}
    return "crc32c:%08x" % _crc32c.crc32c(canonical_json(body).encode("utf-8"))


def parse_crop_sampler(cfg: Any) -> dict[str, Any]:
    """The ``crop_sampler`` header object of a seeded-crops store (format 3.0), checked strictly by
    :meth:`fkdstore.seeded.SlotCropSampler.from_config` (every key present with a valid value, no other key:
    a reader that ignored a sampler parameter would replay other crops than the teacher saw). Returns the
    canonical config (as ``get_config`` writes it); values it would write differently are refused."""
    from .seeded import SlotCropSampler

    canonical = SlotCropSampler.from_config(cfg).get_config()
    if canonical != {**cfg, "scale": list(cfg["scale"]), "ratio": list(cfg["ratio"])}:
        raise ValidationError(f"crop_sampler values must be as SlotCropSampler.get_config writes them "
                              f"({canonical}). Got {dict(cfg)!r}.")
    return canonical


def check_version(version) -> tuple[int, int]:
    """Parse ``"major.minor"``; raise :class:`FormatError` for a major version this library cannot read."""
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise FormatError(f"format_version must be 'major.minor'. Got {version!r}.") from None
    if major > max(READ_MAJORS):
        raise FormatError(
            f"store has format version {version}, newer than this library reads ({FORMAT_VERSION}); "
            f"upgrade fkdstore"
        )
    if major not in READ_MAJORS:
        raise FormatError(f"format_version major must be one of {list(READ_MAJORS)}. Got {version!r}.")
    return major, minor
