"""Stores written by fkdstore 0.1 (format 1.0, ``spec/format-v4.md`` appendix A): read only to migrate them.

:func:`open_v1` returns a :class:`V1Store` that ``fkdstore convert`` reads a 1.0 source through, with the
checks 1.0 allows: the ``written`` flags, every record chunk's presence, crc32c and decoding (the checked
decoder of :mod:`fkdstore.shard`); 1.0 has no manifest and no header checksum, so a swapped chunk or an
edited header cannot be detected there (which is why 4.0 binds them). Nothing else in the library reads 1.0.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from .. import bytesource as _bytesource
from .. import codecs as _codecs
from .. import schema as S
from .. import storage as _storage
from ..errors import CorruptStoreError, FormatError, IncompleteStoreError
from ..reader import CropRecords, mismatches
from ..shard import ShardedArray, group_rows, parse_array_meta, take_many
from ..transforms import Replay

__all__ = ["open_v1", "V1Store", "is_v1"]

V1_KEY = "image_key"  # a vlen-utf8 string array in 1.0
V1_AUG = "aug"  # one (N, M, A) float32 array in 1.0
_REQUIRED = ("num_images", "crops_per_image", "num_classes", "codec", "images_per_chunk", "images_per_shard",
             "box_dtype")


def _attrs(source, path: str) -> Mapping[str, Any] | None:
    raw = source.read("zarr.json")
    if raw is None:
        return None
    try:
        doc = json.loads(bytes(raw))
    except ValueError:
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs.get(S.ATTR_KEY) if isinstance(attrs, dict) else None


def is_v1(location, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``location`` holds a format-1.0 store (its header says so)."""
    store = _storage.as_store(location, read_only=True, storage_options=storage_options)
    h = _attrs(_bytesource.byte_source(store, "", location=location, storage_options=storage_options), str(location))
    return isinstance(h, Mapping) and h.get("format") == S.FORMAT_NAME and h.get("format_version") == "1.0"


@dataclass(frozen=True)
class V1Header:
    """What a 1.0 header says, in the names the converter uses."""

    num_images: int
    crops_per_image: int
    num_classes: int
    codec: _codecs.LabelCodec
    images_per_chunk: int
    images_per_shard: int
    box_dtype: str
    aug: tuple
    meta: Mapping[str, Any]
    replay: Replay | None
    sampler = None  # 1.0 stored its crops
    augment = None  # 1.0 had no augmentation pipelines (its aug columns are free-form float32)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.images_per_shard)

    def shard_range(self, s: int) -> range:
        a = s * self.images_per_shard
        return range(a, min(self.num_images, a + self.images_per_shard))


def open_v1(location, *, storage_options: Mapping[str, Any] | None = None) -> V1Store:
    """Open a format-1.0 store for migration (FormatError if it is not one)."""
    return V1Store(location, storage_options)


class V1Store:
    """Read access to a 1.0 store, as much of :class:`fkdstore.reader.RegionReader`'s API as the converter
    uses: ``header``, ``codec``, ``image_keys``, ``image_sizes``, ``labels``, ``written``, :meth:`read_batch`."""

    def __init__(self, location, storage_options: Mapping[str, Any] | None = None):
        store = _storage.as_store(location, read_only=True, storage_options=storage_options)
        self.path = _storage.describe(store)
        self._source = _bytesource.byte_source(store, "", location=location, storage_options=storage_options)
        d = _attrs(self._source, self.path)
        if not isinstance(d, Mapping) or d.get("format") != S.FORMAT_NAME or d.get("format_version") != "1.0":
            raise FormatError(f"{self.path} is not a format-1.0 fkdstore store")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise FormatError(f"{self.path}: the 1.0 header lacks required keys {missing}")
        aug = tuple(S.parse_column((a["name"], a.get("kind", "float"), "float32")) for a in d.get("aug", []))
        meta = d.get("meta", {}) if isinstance(d.get("meta", {}), Mapping) else {}
        replay = None
        if all(k in meta for k in ("input_size", "interpolation", "mean", "std")):
            replay = Replay(input_size=meta["input_size"], interpolation=meta["interpolation"], mean=meta["mean"],
                            std=meta["std"])
        try:
            codec = _codecs.from_config(dict(d["codec"]))
            self.header = V1Header(int(d["num_images"]), int(d["crops_per_image"]), int(d["num_classes"]), codec,
                                   int(d["images_per_chunk"]), int(d["images_per_shard"]), str(d["box_dtype"]),
                                   aug, dict(meta), replay)
        except (TypeError, ValueError, KeyError) as e:
            raise FormatError(f"{self.path}: malformed 1.0 header ({e})") from None
        self.codec = codec
        self._group = zarr.open_group(store=store, mode="r", zarr_format=3)
        h = self.header
        N, M = h.num_images, h.crops_per_image
        specs = {S.BOX: ((4,), h.box_dtype), S.FLIP: ((), "bool")}
        if aug:
            specs[V1_AUG] = ((len(aug),), "float32")
        for name, spec in codec.fields(h.num_classes).items():
            specs[S.soft_path(name)] = (tuple(spec.shape), spec.dtype)
        self._arrays = {}
        for name, (trail, dtype) in specs.items():
            meta_ = parse_array_meta(name, self._source.read(f"{name}/zarr.json"))
            bad = mismatches(meta_, (N, M, *trail), dtype, shard=(h.images_per_shard, M, *trail),
                             inner=(h.images_per_chunk, M, *trail))
            if bad:
                raise CorruptStoreError(bad[0])
            self._arrays[name] = ShardedArray(meta_, self._source, num_images=N, dtype=dtype,
                                              zarr_array=functools.partial(self._zarr_array, name))

    def _zarr_array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` of the store (CorruptStoreError when a group stands there)."""
        node = self._group[name]
        if not isinstance(node, zarr.Array):
            raise CorruptStoreError(f"{self.path}: {name!r} must be an array, got a group")
        return node

    def _small(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._zarr_array(name)[:])
        except Exception as e:  # zarr raises several types (checksum, decode, missing)
            raise CorruptStoreError(f"{self.path}: array {name!r} cannot be read: {type(e).__name__}: {e}") from e

    @property
    def image_keys(self) -> list[str]:
        return [str(k) for k in self._small(V1_KEY)]

    @property
    def image_sizes(self) -> np.ndarray:
        return self._small(S.IMAGE_SIZE)

    @property
    def labels(self) -> np.ndarray:
        return self._small(S.LABEL)

    @property
    def written(self) -> np.ndarray:
        return self._small(S.WRITTEN) != 0

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.header.meta

    def read_batch(self, indices) -> CropRecords:
        """Records of written images ``indices`` (B,): every chunk checked (presence, crc32c, decoding)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if not self.written[idx].all():
            raise IncompleteStoreError(f"{self.path}: image {int(idx[~self.written[idx]][0])} is not written")
        chunks, inv, within = group_rows(idx, self.header.images_per_chunk)
        arrays = list(self._arrays.values())
        data = {a.path: st[inv, within] for a, st in zip(arrays, take_many(arrays, chunks))}
        block = data.get(V1_AUG)
        aug = {a.name: block[..., j] for j, a in enumerate(self.header.aug)} if block is not None else {}
        fields = {p[len(S.SOFT_GROUP) + 1:]: v for p, v in data.items() if p.startswith(S.SOFT_GROUP + "/")}
        return CropRecords(data[S.BOX], data[S.FLIP], aug, fields)

    def close(self) -> None:
        self._source.close()
