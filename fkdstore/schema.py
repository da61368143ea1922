"""The fkdstore format in code. This module mirrors ``spec/format-v4.md`` section for section.

Everything that names an array, an attribute, a cap or a layout rule lives here; the writer, reader, verify
and CLI import these constants and functions instead of repeating them. A store is a Zarr v3 group whose
attribute ``"fkdstore"`` (:data:`ATTR_KEY`) holds the header. :func:`parse_header` turns that JSON object
into a :class:`Header` once, at open: one parse function per format version (4.0, and 3.0 / 2.0 written by
fkdstore 0.2) and one per record kind, into the same in-memory model, so no other module branches on the
version. Writers write 4.0 only (:meth:`Header.to_json`).

Arrays (``N`` images, ``L`` key bytes; per kind the record arrays, ``P`` of them in manifest order):

=================  ==================  ==========  ====================================================
array              shape               dtype       meaning
=================  ==================  ==========  ====================================================
``key``            (N, L)              uint8       zero-padded UTF-8 key of each image
``image_size``     (N, 2)              int32       (height, width) of the original image in pixels
``label``          (N,)                int32       ground-truth class, -1 if unknown
``written``        (N,)                uint8       1 once every record of the image is stored, else 0
``manifest``       (shards, T)         uint32      position-bound tag of every chunk (section 4)
regions:
``box``            (N, M, 4)           uint16/i32  crop (top, left, height, width); derived when seeded
``flip``           (N, M)              bool        horizontal flip applied after cropping; derived when seeded
``aug/<name>``     (N, M, *shape)      per column  one augmentation parameter column
``soft/<field>``   (N, M, ...)         per codec   the label codec's fields (see ``fkdstore.codecs``)
label_map:
``map/indices``    (N, K, S, S)        uint16/i32  top-K class ids per map cell
``map/scores``     (N, K, S, S)        f16/f32     their raw scores
=================  ==================  ==========  ====================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import numpy as np

from . import codecs as _codecs
from .augment.base import KINDS as AUG_KINDS
from .augment.base import Column
from .augment.pipeline import Pipeline
from .augment.registry import registered_policies
from .errors import CorruptStoreError, FormatError, ValidationError
from .labelmap import LabelMapSpec
from .seeded import SlotCropSampler
from .transforms import Replay
from .validation import int_in_range

__all__ = ["Header", "Layout", "Regions", "LabelMap", "parse_header", "Column", "parse_aug",
           "manifest_tag", "manifest_tags", "encode_keys", "decode_keys", "default_layout", "box_dtype",
           "canonical_json", "check_json", "header_checksum", "check_version"]

FORMAT_NAME = "fkdstore"
FORMAT_VERSION = "4.0"  # what this library writes; readers refuse a newer major, accept a newer minor
READ_MAJORS = (2, 3, 4)  # majors this library reads (2.0 and 3.0: written by fkdstore 0.2)
ATTR_KEY = "fkdstore"
# The root group's only attribute while a writer creates a store (invariant 1): a group holding exactly this
# attribute and no header is an interrupted creation, which a writer may delete; nothing else ever is.
CREATING_KEY = "fkdstore_creating"

# Record kinds (section 1.3): what one image's records are.
REGIONS = "regions"  # M crop slots: box, flip, augmentation parameters, a codec's soft label (FKD)
LABEL_MAP = "label_map"  # one K x S x S map of top-K class scores over the whole image (ReLabel)
KINDS = (REGIONS, LABEL_MAP)
# Extension names a reader of this library understands in the header's ``requires`` list (section 1.4).
EXTENSIONS: frozenset[str] = frozenset()

# Array names (section 2).
KEY = "key"
IMAGE_SIZE = "image_size"
LABEL = "label"
WRITTEN = "written"
BOX = "box"
FLIP = "flip"
AUG = "aug"  # a group of per-column arrays
SOFT_GROUP = "soft"
MAP_GROUP = "map"
MAP_INDICES = "map/indices"
MAP_SCORES = "map/scores"
MANIFEST = "manifest"
DECLARED_GROUPS = (AUG, SOFT_GROUP, MAP_GROUP)  # groups whose arrays the header declares exactly

PER_IMAGE_ARRAYS = (KEY, IMAGE_SIZE, LABEL, WRITTEN)
BOUND_PER_IMAGE = (KEY, IMAGE_SIZE, LABEL)  # per-image arrays tagged in the manifest (4.0), in this order
UNKNOWN_LABEL = -1
FILL_VALUE = 0  # fill value of every record array and of key, image_size, written, manifest
PER_IMAGE_FILL = {KEY: 0, IMAGE_SIZE: 0, LABEL: UNKNOWN_LABEL, WRITTEN: 0}
# meta keys a resumed run may change; every other meta key must match for a writer to re-open a store
VOLATILE_META = ("time_taken_s", "finished_at", "created_at", "history", "skipped")
CHECKSUM_EXCLUDES = ("checksum", "meta", "library_version")  # header fields the checksum does not cover

AUG_COLUMN_KEYS = ("name", "kind", "dtype", "shape")  # the keys of one entry of the header's ``aug`` list
AUG_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float16", "float32")
BOX_DTYPES = ("uint16", "int32")
CROP_MODES = ("seeded", "stored")

# Layout defaults, chosen by measurement (benchmarks/store_layout.py and read_breakdown.py; spec section 7).
LEGACY_PER_IMAGE_CHUNK = 65536  # images per chunk of the per-image arrays in 2.0 and 3.0 stores
TARGET_CHUNK_BYTES = 8 * 1024  # raw bytes of the widest record array in one inner chunk
TARGET_SHARD_BYTES = 64 * 1024 * 1024  # raw bytes of the widest record array in one shard file
MAX_IMAGES_PER_CHUNK = 1024
MAX_SLOTS_PER_SHARD = 2**20  # a shard is buffered whole: this bounds the teacher work a kill can lose
MAX_SHARDS = 1024  # wide rows (Full labels) get larger shards rather than more files (each array has a file per shard)
COMPRESSOR: dict[str, Any] = {"cname": "lz4hc", "clevel": 9, "shuffle": "bitshuffle"}  # inside blosc; crc32c after it

# Caps (section 1.5): a store may come from an untrusted download, so a header claiming more is refused at
# open, before anything is allocated. Memory then stays bounded by these caps plus what a caller asks for.
MAX_IMAGES = 2**31 - 1  # image indices, sizes and partners are int32
MAX_CROPS_PER_IMAGE = 2**16
MAX_CLASSES = 2**20  # one decoded soft label is C float32 values
MAX_KEY_LENGTH = 4096  # bytes of one image key
MAX_CHUNK_BYTES = 2**26  # decoded bytes of one inner chunk of one record array (64 MiB)
MAX_SHARD_BYTES = 2**31  # decoded bytes of one shard of one record array (what a writer buffers)


def soft_path(field_name: str) -> str:
    """Path of a codec field's array inside the group, e.g. ``soft/indices``."""
    return f"{SOFT_GROUP}/{field_name}"


def aug_path(column: str) -> str:
    """Path of an augmentation column's array, e.g. ``aug/ra_ops``."""
    return f"{AUG}/{column}"


def box_dtype(max_side: int) -> str:
    """Box coordinates are uint16 when every image side fits (<= 65535 px), else int32 (section 2)."""
    return "uint16" if max_side <= np.iinfo(np.uint16).max else "int32"


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def default_layout(num_images: int, row_bytes: int, records_per_image: int = 1) -> tuple[int, int]:
    """Return ``(images_per_chunk, images_per_shard)``: the layout rule of spec section 7, as an algorithm.

    ``row_bytes`` is the raw size of one image's row in the widest record array; ``records_per_image`` is
    what one image costs the teacher (``M`` crop slots; 1 for a label map).

    1. ``chunk = min(MAX_IMAGES_PER_CHUNK, pow2_floor(TARGET_CHUNK_BYTES / row_bytes))`` (at least 1): one
       image read decompresses a few images, not thousands.
    2. ``shard = max(chunk, pow2_floor(TARGET_SHARD_BYTES / row_bytes))``: about 64 MiB per shard file.
    3. ``shard = min(shard, max(chunk, pow2_floor(MAX_SLOTS_PER_SHARD / records_per_image)))``: a shard holds
       at most 2**20 records, so a writer killed mid-shard loses a bounded amount of teacher work.
    4. ``shard = max(shard, chunk * ceil(N / MAX_SHARDS / chunk))``: at most 1024 shards per array (wide
       rows such as Full labels grow their shards instead of their file count; this wins over step 3).
    5. ``shard = min(shard, chunk * ceil(N / chunk))`` (never larger than the data), then rounded down to
       a multiple of ``chunk`` (at least ``chunk``).
    """
    row_bytes = max(1, int(row_bytes))
    chunk = min(MAX_IMAGES_PER_CHUNK, _pow2_floor(TARGET_CHUNK_BYTES / row_bytes))
    shard = max(chunk, _pow2_floor(TARGET_SHARD_BYTES / row_bytes))
    shard = min(shard, max(chunk, _pow2_floor(MAX_SLOTS_PER_SHARD / max(1, int(records_per_image)))))
    shard = max(shard, chunk * math.ceil(num_images / MAX_SHARDS / chunk))
    shard = min(shard, chunk * math.ceil(num_images / chunk))
    shard = max(chunk, chunk * (shard // chunk))
    return chunk, shard


# ------------------------------------------------------------------------------------------------ keys


def encode_keys(keys: Sequence[str]) -> np.ndarray:
    """Image keys -> the ``key`` array: ``(N, L)`` uint8 of zero-padded UTF-8, ``L`` = the longest key's byte
    length (at least 1; section 2).

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
    if length > MAX_KEY_LENGTH:
        i = next(i for i, b in enumerate(raw) if len(b) == length)
        raise ValidationError(f"image keys must be at most {MAX_KEY_LENGTH} bytes of UTF-8. Key {i} has {length}.")
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
        if not b:
            raise CorruptStoreError(f"array {KEY!r}: image {start + i} has an empty key")
    return out


# -------------------------------------------------------------------------------------------- manifest


def manifest_tag(path: str, chunk_index: int, chunk: np.ndarray, prefix: bytes = b"") -> int:
    """The manifest value binding chunk ``chunk_index`` of array ``path`` to its content (invariant 9):
    ``crc32c(prefix + utf8(path) + b"\\0" + uint64_le(chunk_index) + bytes)``, where ``prefix`` is the
    store id's 16 bytes (4.0; empty in 2.0 and 3.0) and ``bytes`` the decoded chunk (full chunk shape, C
    order, little-endian, bool as one byte; rows past N hold the array's fill value)."""
    head = _crc32c.crc32c(prefix + path.encode("utf-8") + b"\0" + int(chunk_index).to_bytes(8, "little"))
    data = np.ascontiguousarray(chunk)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return _crc32c.crc32c(data.reshape(-1).view(np.uint8).data, head)


def manifest_tags(path: str, first_chunk: int, data: np.ndarray, rows_per_chunk: int, prefix: bytes = b"",
                  fill: int = FILL_VALUE) -> np.ndarray:
    """Tags of consecutive chunks ``first_chunk, first_chunk + 1, ...`` covering ``data`` (rows = images).
    A partial last chunk is padded with ``fill`` to ``rows_per_chunk`` rows."""
    n = math.ceil(len(data) / rows_per_chunk)
    out = np.empty(n, np.uint32)
    for j in range(n):
        part = data[j * rows_per_chunk:(j + 1) * rows_per_chunk]
        if len(part) < rows_per_chunk:
            pad = np.full((rows_per_chunk - len(part), *part.shape[1:]), fill, part.dtype)
            part = np.concatenate([part, pad])
        out[j] = manifest_tag(path, first_chunk + j, part, prefix)
    return out


# ------------------------------------------------------------------------------------- augment columns


_COLUMN_DEFAULTS: tuple[Any, ...] = ("float", "float32", ())  # kind, dtype, shape of a column given by name


def parse_column(obj: Any) -> Column:
    """One ``aug`` entry: a :class:`Column`, a name (a float32 scalar column), a ``(name, kind[, dtype[,
    shape]])`` tuple or a ``{"name", "kind", "dtype", "shape"}`` object, checked (section 1.1)."""
    name: Any  # as given: checked below
    kind: Any
    dtype: Any
    shape: Any
    if isinstance(obj, Column):
        name, kind, dtype, shape = obj
    elif isinstance(obj, str):
        name, (kind, dtype, shape) = obj, _COLUMN_DEFAULTS
    elif isinstance(obj, Mapping):
        unknown = set(obj) - set(AUG_COLUMN_KEYS)
        if unknown or "name" not in obj:
            raise ValidationError(f"aug column keys must be {', '.join(AUG_COLUMN_KEYS)}. Got {sorted(obj)}.")
        name, kind, dtype, shape = (obj["name"], obj.get("kind", "float"), obj.get("dtype", "float32"),
                                    obj.get("shape", ()))
    elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 4:
        given: list[Any] = [*obj, *_COLUMN_DEFAULTS[len(obj) - 1:]]
        name, kind, dtype, shape = given
    else:
        raise TypeError(f"aug columns must be names, tuples, dicts or Column. Got {obj!r}.")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValidationError(f"aug column names must be identifiers. Got {name!r}.")
    if kind not in AUG_KINDS:
        raise ValidationError(f"aug column kind must be one of {list(AUG_KINDS)}. Got {kind!r}.")
    if dtype not in AUG_DTYPES:
        raise ValidationError(f"aug column dtype must be one of {list(AUG_DTYPES)}. Got {dtype!r}.")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise ValidationError(f"aug column shape must be positive integers. Got {shape!r}.")
    return Column(name, kind, dtype, tuple(int(s) for s in shape))


def parse_aug(aug: Any) -> tuple[Column, ...]:
    """The ``aug`` list: :func:`parse_column` of each entry; names unique."""
    out = tuple(parse_column(a) for a in (aug or ()))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValidationError(f"aug column names must be unique. Got {names}.")
    return out


# ------------------------------------------------------------------------------------------------ JSON


def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for checksums and comparisons: sorted keys, no spaces, no NaN (1.2)."""
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


def header_checksum(d: Mapping[str, Any]) -> str:
    """``"crc32c:%08x"`` of the canonical JSON of a header object without ``checksum``, ``meta`` and
    ``library_version`` (section 1.2): an edit of anything else is detected; provenance may change (a resumed
    run updates ``meta``)."""
    body = {k: v for k, v in d.items() if k not in CHECKSUM_EXCLUDES}
    crc = _crc32c.crc32c(canonical_json(body).encode("utf-8"))
    return f"crc32c:{crc:08x}"


def check_version(version: Any) -> tuple[int, int]:
    """Parse ``"major.minor"``; raise :class:`FormatError` for a major version this library cannot read."""
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise FormatError(f"format_version must be 'major.minor'. Got {version!r}.") from None
    if major > max(READ_MAJORS):
        raise FormatError(f"store has format version {version}, newer than this library reads ({FORMAT_VERSION}); "
                          f"upgrade fkdstore")
    if major == 1:
        raise FormatError("store has format version 1.0 (fkdstore 0.1): this library reads it only to convert it "
                          "(`fkdstore convert SRC DST` writes a 4.0 store)")
    if major not in READ_MAJORS:
        raise FormatError(f"format_version major must be one of {list(READ_MAJORS)}. Got {version!r}.")
    return major, minor


# ------------------------------------------------------------------------------------- the model


@dataclass(frozen=True, kw_only=True)
class Layout:
    """``images_per_chunk`` (inner chunk of the record arrays) and ``images_per_shard`` (one shard file per
    record array, one chunk of every per-image array, one row of the manifest; a multiple of the chunk)."""

    images_per_chunk: int
    images_per_shard: int

    def __post_init__(self) -> None:
        ipc = int_in_range("images_per_chunk", self.images_per_chunk, 1, MAX_IMAGES)
        ips = int_in_range("images_per_shard", self.images_per_shard, 1, MAX_IMAGES)
        if ips % ipc:
            raise ValidationError(f"images_per_shard must be a multiple of images_per_chunk. Got {ips} and {ipc}.")
        object.__setattr__(self, "images_per_chunk", ipc)
        object.__setattr__(self, "images_per_shard", ips)

    def get_config(self) -> dict[str, int]:
        return {"images_per_chunk": self.images_per_chunk, "images_per_shard": self.images_per_shard}


@dataclass(frozen=True, kw_only=True)
class Regions:
    """Record kind ``regions`` (FKD): ``M`` crop slots per image, each a crop (box, flip), augmentation
    parameters and a soft label encoded by ``codec``. ``sampler`` set: seeded crops, ``box`` and ``flip``
    derived from it (section 10); None: stored crops."""

    crops_per_image: int
    codec: _codecs.LabelCodec
    box_dtype: str
    sampler: SlotCropSampler | None = None
    aug: tuple[Column, ...] = ()
    augment: Pipeline = field(default_factory=lambda: Pipeline(()))

    kind = REGIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "crops_per_image",
                           int_in_range("crops_per_image", self.crops_per_image, 1, MAX_CROPS_PER_IMAGE))
        if not isinstance(self.codec, _codecs.LabelCodec):
            raise TypeError(f"codec must be a LabelCodec. Got {type(self.codec).__name__}.")
        if self.box_dtype not in BOX_DTYPES:
            raise ValidationError(f"box_dtype must be one of {list(BOX_DTYPES)}. Got {self.box_dtype!r}.")
        if self.sampler is not None and not isinstance(self.sampler, SlotCropSampler):
            raise TypeError(f"sampler must be a SlotCropSampler or None. Got {type(self.sampler).__name__}.")
        if not isinstance(self.augment, Pipeline):
            raise TypeError(f"augment must be a Pipeline. Got {type(self.augment).__name__}.")
        object.__setattr__(self, "aug", parse_aug(self.aug))
        if len(self.augment):
            want = [c.to_json() for c in self.augment.columns()]
            have = [a.to_json() for a in self.aug]
            if want != have:
                raise ValidationError(f"aug columns {have} must be the augment pipeline's columns {want}")

    @property
    def seeded(self) -> bool:
        return self.sampler is not None

    @property
    def records_per_image(self) -> int:
        return self.crops_per_image

    @property
    def derived(self) -> tuple[str, ...]:
        """Record arrays that are derived, not stored: ``(box, flip)`` for seeded crops, else none. They keep
        their manifest columns (tags of the derived chunks)."""
        return (BOX, FLIP) if self.seeded else ()

    def specs(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{path: (row shape per image, dtype)}`` of every record array in manifest order: box, flip, aug
        columns, codec fields (derived arrays included)."""
        M = self.crops_per_image
        out: dict[str, tuple[tuple[int, ...], str]] = {BOX: ((M, 4), self.box_dtype), FLIP: ((M,), "bool")}
        for a in self.aug:
            out[aug_path(a.name)] = ((M, *a.shape), a.dtype)
        for name, spec in self.codec.fields(num_classes).items():
            out[soft_path(name)] = ((M, *spec.shape), spec.dtype)
        return out

    def get_config(self) -> dict[str, Any]:
        crops = {"mode": "stored"} if self.sampler is None else {"mode": "seeded", "sampler": self.sampler.get_config()}
        return {"crops_per_image": self.crops_per_image, "codec": self.codec.get_config(),
                "box_dtype": self.box_dtype, "crops": crops, "aug": [a.to_json() for a in self.aug],
                "augment": self.augment.get_config()}


@dataclass(frozen=True, kw_only=True)
class LabelMap:
    """Record kind ``label_map`` (ReLabel, TokenLabeling): per image one ``K x S x S`` map of top-K class
    scores over the whole image, pooled per crop at training time (:mod:`fkdstore.labelmap`)."""

    spec: LabelMapSpec

    kind = LABEL_MAP
    derived = ()
    records_per_image = 1

    def __post_init__(self) -> None:
        if not isinstance(self.spec, LabelMapSpec):
            raise TypeError(f"spec must be a LabelMapSpec. Got {type(self.spec).__name__}.")

    def specs(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{map/indices, map/scores}`` with their row shape ``(K, S, S)`` and dtypes."""
        shape = self.spec.map_shape
        return {MAP_INDICES: (shape, self.spec.index_dtype(num_classes)), MAP_SCORES: (shape, self.spec.dtype)}

    def get_config(self) -> dict[str, Any]:
        return self.spec.get_config()


_KIND_RECORDS = {REGIONS: "crop regions (FKD soft labels)", LABEL_MAP: "label maps"}


def kind_error(kind: str, wanted: str) -> FormatError:
    """The error of asking a store of ``kind`` records for what only ``wanted`` records have."""
    return FormatError(f"store holds {kind!r} records, not {_KIND_RECORDS[wanted]}")


@dataclass(frozen=True, kw_only=True)
class Header:
    """A store's header, parsed (:func:`parse_header`) or built by a writer. ``records`` is the record kind's
    object (:class:`Regions` or :class:`LabelMap`); ``replay`` how the teacher's pixels are rebuilt (None
    when the store does not say). ``store_id`` is empty and ``legacy`` true for 2.0 and 3.0 stores, which
    bind neither the per-image arrays nor the store id (their manifest has one row per inner chunk)."""

    num_images: int
    num_classes: int
    key_length: int
    has_labels: bool
    layout: Layout
    records: Regions | LabelMap
    replay: Replay | None = None
    store_id: str = ""
    requires: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    library_version: str = ""
    format_version: str = FORMAT_VERSION
    checksum: str = field(default="", compare=False)
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_images", int_in_range("num_images", self.num_images, 1, MAX_IMAGES))
        object.__setattr__(self, "num_classes", int_in_range("num_classes", self.num_classes, 1, MAX_CLASSES))
        object.__setattr__(self, "key_length", int_in_range("key_length", self.key_length, 1, MAX_KEY_LENGTH))
        if not isinstance(self.has_labels, bool):
            raise ValidationError(f"has_labels must be a bool. Got {self.has_labels!r}.")
        if not isinstance(self.records, (Regions, LabelMap)):
            raise TypeError(f"records must be Regions or LabelMap. Got {type(self.records).__name__}.")
        if self.replay is not None and not isinstance(self.replay, Replay):
            raise TypeError(f"replay must be a Replay or None. Got {type(self.replay).__name__}.")
        if not isinstance(self.meta, Mapping):
            raise ValidationError(f"meta must be a JSON object. Got {type(self.meta).__name__}.")
        if not self.legacy and (not isinstance(self.store_id, str) or len(self.store_id) != 32
                                or any(c not in "0123456789abcdef" for c in self.store_id)):
            raise ValidationError(f"store_id must be 32 lowercase hex digits. Got {self.store_id!r}.")
        if isinstance(self.records, LabelMap):
            self.records.spec.check_num_classes(self.num_classes)
        self._check_caps()

    def _check_caps(self) -> None:
        """Section 1.5: decoded chunk and shard sizes within the caps (checked before anything is allocated)."""
        for path, (row, dtype) in self.record_specs().items():
            row_bytes = math.prod(row) * np.dtype(dtype).itemsize
            for what, images, cap in (("inner chunk", self.images_per_chunk, MAX_CHUNK_BYTES),
                                      ("shard", self.images_per_shard, MAX_SHARD_BYTES)):
                if row_bytes * images > cap:
                    raise ValidationError(f"array {path!r}: one {what} would decode to {row_bytes * images} bytes, "
                                          f"more than the cap of {cap}")
        # the unsharded arrays: one chunk of key (ips x L bytes) and one manifest row are read whole
        rows = self.per_image_chunk or LEGACY_PER_IMAGE_CHUNK
        for path, nbytes in ((KEY, rows * self.key_length), (MANIFEST, 4 * math.prod(self.manifest_chunk))):
            if nbytes > MAX_SHARD_BYTES:
                raise ValidationError(f"array {path!r}: one chunk would decode to {nbytes} bytes, more than the cap "
                                      f"of {MAX_SHARD_BYTES}")

    # -- version and kind
    @property
    def major(self) -> int:
        return check_version(self.format_version)[0]

    @property
    def legacy(self) -> bool:
        """A 2.0 or 3.0 store (fkdstore 0.2): read-only for this library."""
        return self.format_version.split(".")[0] in ("2", "3")

    @property
    def kind(self) -> str:
        return self.records.kind

    @property
    def regions(self) -> Regions:
        """The :class:`Regions` records; FormatError for another kind."""
        if not isinstance(self.records, Regions):
            raise kind_error(self.kind, REGIONS)
        return self.records

    @property
    def label_map(self) -> LabelMapSpec:
        """The label-map spec; FormatError for another kind."""
        if not isinstance(self.records, LabelMap):
            raise kind_error(self.kind, LABEL_MAP)
        return self.records.spec

    # regions shortcuts (FormatError for a label-map store)
    @property
    def crops_per_image(self) -> int:
        return self.regions.crops_per_image

    @property
    def codec(self) -> _codecs.LabelCodec:
        return self.regions.codec

    @property
    def box_dtype(self) -> str:
        return self.regions.box_dtype

    @property
    def aug(self) -> tuple[Column, ...]:
        return self.regions.aug

    @property
    def augment(self) -> Pipeline:
        return self.regions.augment

    @property
    def sampler(self) -> SlotCropSampler | None:
        return self.regions.sampler

    @property
    def seeded(self) -> bool:
        """Seeded crops (false for a label-map store)."""
        return isinstance(self.records, Regions) and self.records.seeded

    # -- layout
    @property
    def images_per_chunk(self) -> int:
        return self.layout.images_per_chunk

    @property
    def images_per_shard(self) -> int:
        return self.layout.images_per_shard

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
        """Image indices stored in one shard (and in one chunk of every per-image array and manifest row)."""
        start = shard * self.images_per_shard
        return range(start, min(self.num_images, start + self.images_per_shard))

    # -- arrays
    def record_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{path: (row shape per image, dtype)}`` of every record array, in manifest order (derived included)."""
        return self.records.specs(self.num_classes)

    @property
    def derived_arrays(self) -> tuple[str, ...]:
        return self.records.derived

    def stored_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """:meth:`record_specs` without the derived arrays: the record arrays that exist on storage."""
        return {k: v for k, v in self.record_specs().items() if k not in self.derived_arrays}

    def row_bytes(self) -> int:
        """Raw bytes of one image's row in the widest record array (input of :func:`default_layout`)."""
        return max(math.prod(r) * np.dtype(d).itemsize for r, d in self.record_specs().values())

    @property
    def per_image_arrays(self) -> tuple[str, ...]:
        return PER_IMAGE_ARRAYS

    @property
    def bound_per_image(self) -> tuple[str, ...]:
        """Per-image arrays whose chunks the manifest binds: key, image_size, label (4.0); none in 2.0/3.0."""
        return () if self.legacy else BOUND_PER_IMAGE

    @property
    def per_image_chunk(self) -> int | None:
        """Rows per chunk of key, image_size and label: one shard (4.0); not fixed in 2.0/3.0 (None)."""
        return None if self.legacy else self.images_per_shard

    @property
    def tag_prefix(self) -> bytes:
        """The bytes every manifest tag starts with: the store id (4.0), nothing in 2.0/3.0."""
        return bytes.fromhex(self.store_id) if self.store_id else b""

    @property
    def manifest_width(self) -> int:
        """Columns of the manifest: 4.0: ``3 + chunks_per_shard * P`` (one row per shard); 2.0/3.0: ``P``
        (one row per inner chunk)."""
        P = len(self.record_specs())
        return P if self.legacy else len(BOUND_PER_IMAGE) + self.chunks_per_shard * P

    @property
    def manifest_shape(self) -> tuple[int, int]:
        rows = self.num_chunks if self.legacy else self.num_shards
        return rows, self.manifest_width

    @property
    def manifest_chunk(self) -> tuple[int, int]:
        """Chunk shape of the manifest: one chunk per shard."""
        return (self.chunks_per_shard if self.legacy else 1), self.manifest_width

    # -- JSON
    def to_json(self) -> dict[str, Any]:
        """The 4.0 attribute object with ``checksum`` computed (writers only; a 2.0/3.0 header is read-only)."""
        if self.legacy:
            raise FormatError(f"a format {self.format_version} header is read-only: this library writes "
                              f"{FORMAT_VERSION} (convert the store: `fkdstore convert SRC DST`)")
        d: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": self.format_version, "kind": self.kind,
            "requires": list(self.requires), "store_id": self.store_id, "num_images": self.num_images,
            "num_classes": self.num_classes, "key_length": self.key_length, "has_labels": self.has_labels,
            "layout": self.layout.get_config(),
            "replay": None if self.replay is None else self.replay.get_config(),
            self.kind: self.records.get_config(),
            "meta": dict(self.meta), "library_version": self.library_version,
        }
        d["checksum"] = header_checksum(d)
        return d

    def identity(self) -> str:
        """Canonical JSON of everything the checksum covers: two headers of the same store agree on it."""
        d = self.raw if self.raw is not None else self.to_json()
        return canonical_json({k: v for k, v in d.items() if k not in CHECKSUM_EXCLUDES})

    def with_meta(self, meta: Mapping[str, Any]) -> Header:
        """This header with another ``meta`` (provenance; not covered by the checksum)."""
        return dataclasses.replace(self, meta=dict(meta), raw=None)


# ---------------------------------------------------------------------------------------- parsing


def parse_header(d: Any) -> Header:
    """Parse and check the attribute object: :class:`FormatError` if it is not a readable fkdstore header
    (wrong format, newer major version, missing or malformed field, unknown kind, codec, policy, sampler
    or required extension); :class:`CorruptStoreError` if its checksum does not match (edited or damaged)."""
    if not isinstance(d, Mapping):
        raise FormatError(f"not an fkdstore store: group attribute {ATTR_KEY!r} must be a JSON object. "
                          f"Got {type(d).__name__}.")
    if d.get("format") != FORMAT_NAME:
        got = "it is missing" if "format" not in d else f"Got {d['format']!r}"
        raise FormatError(f"not an fkdstore store: header key 'format' must be {FORMAT_NAME!r}; {got}.")
    if not isinstance(d.get("format_version"), str):
        raise FormatError(f"fkdstore header key 'format_version' must be a string 'major.minor'. "
                          f"Got {d.get('format_version')!r}.")
    major, _ = check_version(d["format_version"])
    missing = [k for k in _required_keys(d, major) if k not in d]
    if missing:  # before the checksum: a header without `checksum` lacks a key, it is not damaged (section 4)
        raise FormatError(f"fkdstore header (format {d['format_version']}) lacks required keys {missing}")
    try:
        expected = header_checksum(d)
    except (TypeError, ValueError) as e:  # NaN, infinity or a non-JSON value: not a header this format allows
        raise FormatError(f"fkdstore header must be standard JSON (section 1.1): {e}") from None
    if d.get("checksum") != expected:
        raise CorruptStoreError(f"fkdstore header checksum mismatch: stored {d.get('checksum')!r}, computed "
                                f"{expected!r} (the group attribute {ATTR_KEY!r} in zarr.json was edited or damaged)")
    try:
        return _PARSERS[major](d)
    except FormatError:
        raise
    except (TypeError, ValidationError, KeyError, ValueError, OverflowError) as e:
        raise FormatError(f"malformed fkdstore header (format {d['format_version']}): {e}") from None


def _exact(obj: Any, keys: Sequence[str], what: str) -> Mapping[str, Any]:
    """A JSON object with exactly ``keys`` (every object the 4.0 spec defines is strict, section 1.4)."""
    if not isinstance(obj, Mapping):
        raise FormatError(f"header {what} must be a JSON object. Got {obj!r}.")
    unknown, missing = sorted(set(obj) - set(keys)), [k for k in keys if k not in obj]
    if unknown or missing:
        raise FormatError(f"header {what} must have exactly the keys {list(keys)}: unknown {unknown}, "
                          f"missing {missing}")
    return obj


def _typed(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    v = d[key]
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise FormatError(f"header key {key!r} must be {what}. Got {v!r}.")
    return v


def _strict_codec(cfg: Any) -> _codecs.LabelCodec:
    """A 4.0 codec config: a known name and every parameter spelled (a silently defaulted parameter decodes
    other labels)."""
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("name"), str):
        raise FormatError(f"header codec must be a config object with a 'name'. Got {cfg!r}.")
    cls = _codecs.REGISTRY.get(cfg["name"])
    if cls is None:
        raise FormatError(f"store uses label codec {cfg['name']!r}, which this version of fkdstore does not know "
                          f"(known: {sorted(_codecs.REGISTRY)}); upgrade fkdstore")
    _exact(cfg, ["name", *(f.name for f in dataclasses.fields(cls))], f"codec {cfg['name']!r}")
    return _codecs.from_config(cfg)


def _strict_pipeline(cfgs: Any) -> Pipeline:
    """A 4.0 augment list: known policy names, every parameter spelled."""
    if not isinstance(cfgs, list):
        raise FormatError(f"header augment must be a list of policy configs. Got {cfgs!r}.")
    known = registered_policies()
    for cfg in cfgs:
        if not isinstance(cfg, Mapping) or cfg.get("name") not in known:
            name = cfg.get("name") if isinstance(cfg, Mapping) else cfg
            raise FormatError(f"store uses augment policy {name!r}, which this version of fkdstore does not know "
                              f"(known: {sorted(known)}); upgrade fkdstore")
        _exact(cfg, ["name", *(f.name for f in dataclasses.fields(known[cfg["name"]]))], f"policy {cfg['name']!r}")
    return Pipeline.from_config(cfgs)


_TOP_4 = ("format", "format_version", "kind", "requires", "store_id", "num_images", "num_classes", "key_length",
          "has_labels", "layout", "replay", "checksum")


def _required_keys(d: Mapping[str, Any], major: int) -> tuple[str, ...]:
    """The top-level keys a header of format ``major`` must hold (4.0: section 1's table, the kind's object
    included when the kind is known; 2.0/3.0: section 12's list)."""
    if major == 4:
        kind = d.get("kind")
        return _TOP_4 + ((kind,) if isinstance(kind, str) and kind in _KIND_PARSERS else ())
    return _REQUIRED_LEGACY + (("crop_sampler",) if major == 3 else ())


def _parse_v4(d: Mapping[str, Any]) -> Header:
    requires = _typed(d, "requires", list, "a list of extension names")
    unknown = [r for r in requires if r not in EXTENSIONS]
    if unknown:
        raise FormatError(f"store requires extensions {unknown}, which this version of fkdstore does not know "
                          f"(known: {sorted(EXTENSIONS)}); upgrade fkdstore")
    kind = d["kind"]
    if kind not in _KIND_PARSERS:
        raise FormatError(f"store holds records of kind {kind!r}, which this version of fkdstore does not know "
                          f"(known: {list(KINDS)}); upgrade fkdstore")
    other = [k for k in _KIND_PARSERS if k != kind and k in d]
    if other:
        raise FormatError(f"fkdstore header of kind {kind!r} must not hold the {other[0]!r} object (it is the "
                          f"object of kind {other[0]!r}; section 1)")
    layout = _exact(d["layout"], ("images_per_chunk", "images_per_shard"), "layout")
    replay = None if d["replay"] is None else Replay.from_config(dict(d["replay"]))
    records, has_labels = _KIND_PARSERS[kind](d[kind]), _typed(d, "has_labels", bool, "a bool")
    meta = d.get("meta", {})
    if not isinstance(meta, Mapping):
        raise FormatError(f"header key 'meta' must be a JSON object. Got {meta!r}.")
    return Header(num_images=d["num_images"], num_classes=d["num_classes"], key_length=d["key_length"],
                  has_labels=has_labels, layout=Layout(**layout), records=records, replay=replay,
                  store_id=_typed(d, "store_id", str, "32 lowercase hex digits"), requires=tuple(requires),
                  meta=dict(meta), library_version=str(d.get("library_version", "")),
                  format_version=d["format_version"], checksum=d["checksum"], raw=dict(d))


def _parse_regions_v4(obj: Any) -> Regions:
    r = _exact(obj, ("crops_per_image", "codec", "box_dtype", "crops", "aug", "augment"), "regions")
    crops = r["crops"]
    if not isinstance(crops, Mapping) or crops.get("mode") not in CROP_MODES:
        raise FormatError(f"header regions.crops must be {{'mode': 'seeded', 'sampler': ...}} or "
                          f"{{'mode': 'stored'}}. Got {crops!r}.")
    sampler = None
    if crops["mode"] == "seeded":
        _exact(crops, ("mode", "sampler"), "regions.crops")
        sampler = SlotCropSampler.from_config(crops["sampler"])
        if sampler.get_config() != {**crops["sampler"], "scale": list(crops["sampler"]["scale"]),
                                    "ratio": list(crops["sampler"]["ratio"])}:
            raise FormatError(f"header crop sampler values must be spelled as SlotCropSampler.get_config writes "
                              f"them ({sampler.get_config()}). Got {dict(crops['sampler'])!r}.")
    else:
        _exact(crops, ("mode",), "regions.crops")
    if not isinstance(r["aug"], list):
        raise FormatError(f"header regions.aug must be a list. Got {r['aug']!r}.")
    aug = [_exact(a, AUG_COLUMN_KEYS, "regions.aug entry") for a in r["aug"]]
    return Regions(crops_per_image=r["crops_per_image"], codec=_strict_codec(r["codec"]), box_dtype=r["box_dtype"],
                   sampler=sampler, aug=parse_aug(aug), augment=_strict_pipeline(r["augment"]))


def _parse_label_map_v4(obj: Any) -> LabelMap:
    return LabelMap(spec=LabelMapSpec.from_config(obj))


_KIND_PARSERS: dict[str, Callable[[Any], Regions | LabelMap]] = {REGIONS: _parse_regions_v4,
                                                                 LABEL_MAP: _parse_label_map_v4}

_REQUIRED_LEGACY = ("num_images", "crops_per_image", "num_classes", "codec", "images_per_chunk",
                    "images_per_shard", "box_dtype", "key_length", "aug", "augment", "has_labels", "checksum")


def _parse_legacy(d: Mapping[str, Any]) -> Header:
    """2.0 (stored crops) and 3.0 (seeded crops: ``crop_sampler``), written by fkdstore 0.2: a flat header
    of regions records. Codec and policy parameters a 0.2 writer left out take their defaults, as 0.2 read
    them; unknown keys are ignored at the top level; replay parameters come from ``meta`` (unchecksummed in
    these versions), validated like 4.0's."""
    major = check_version(d["format_version"])[0]
    if major == 2 and "crop_sampler" in d:
        raise FormatError("crop_sampler (seeded crops) needs format 3.0; this header is format 2.0")
    for key, kind, what in (("aug", list, "a list"), ("augment", list, "a list"), ("has_labels", bool, "a bool")):
        _typed(d, key, kind, what)
    codec_cfg = d["codec"]
    if not isinstance(codec_cfg, Mapping) or codec_cfg.get("name") not in set(_codecs.REGISTRY) | set(_codecs.ALIASES):
        name = codec_cfg.get("name") if isinstance(codec_cfg, Mapping) else codec_cfg
        raise FormatError(f"store uses label codec {name!r}, which this version of fkdstore does not know "
                          f"(known: {sorted(_codecs.REGISTRY)}); upgrade fkdstore")
    known = registered_policies()
    for cfg in d["augment"]:
        if not isinstance(cfg, Mapping) or cfg.get("name") not in known:
            name = cfg.get("name") if isinstance(cfg, Mapping) else cfg
            raise FormatError(f"store uses augment policy {name!r}, which this version of fkdstore does not know "
                              f"(known: {sorted(known)}); upgrade fkdstore")
    sampler = None
    if major == 3:
        sampler = SlotCropSampler.from_config(d["crop_sampler"])
        if sampler.get_config() != {**d["crop_sampler"], "scale": list(d["crop_sampler"]["scale"]),
                                    "ratio": list(d["crop_sampler"]["ratio"])}:
            raise FormatError(f"crop_sampler values must be as SlotCropSampler.get_config writes them "
                              f"({sampler.get_config()}). Got {dict(d['crop_sampler'])!r}.")
    aug = [{k: v for k, v in a.items() if k in AUG_COLUMN_KEYS} if isinstance(a, Mapping) else a for a in d["aug"]]
    records = Regions(crops_per_image=d["crops_per_image"], codec=_codecs.from_config(dict(codec_cfg)),
                      box_dtype=d["box_dtype"], sampler=sampler, aug=parse_aug(aug),
                      augment=Pipeline.from_config(list(d["augment"])))
    meta = d.get("meta", {})
    if not isinstance(meta, Mapping):
        raise FormatError(f"header key 'meta' must be a JSON object. Got {meta!r}.")
    return Header(num_images=d["num_images"], num_classes=d["num_classes"], key_length=d["key_length"],
                  has_labels=d["has_labels"], records=records, replay=_legacy_replay(meta),
                  layout=Layout(images_per_chunk=d["images_per_chunk"], images_per_shard=d["images_per_shard"]),
                  meta=dict(meta), library_version=str(d.get("library_version", "")),
                  format_version=d["format_version"], checksum=d["checksum"], raw=dict(d))


def _legacy_replay(meta: Mapping[str, Any]) -> Replay | None:
    """0.2's teacher-runner recorded input_size, interpolation, mean and std in ``meta``."""
    keys = ("input_size", "interpolation", "mean", "std")
    if not all(k in meta for k in keys):
        return None
    try:
        return Replay(input_size=meta["input_size"], interpolation=meta["interpolation"], mean=meta["mean"],
                      std=meta["std"])
    except (TypeError, ValidationError) as e:
        raise FormatError(f"store's replay parameters in meta are not valid: {e}") from None


_PARSERS = {2: _parse_legacy, 3: _parse_legacy, 4: _parse_v4}
