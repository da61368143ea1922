"""fkdstore 0.1 module names, kept for compatibility: ``fkdstore.store.write`` / ``Writer`` /
``storage_stats`` come from :mod:`fkdstore.writer`; ``open`` / ``Reader`` / ``CropRecords`` are the 0.1 reader
(kept here until :mod:`fkdstore.reader` replaces it; it reads format 1.0 and, without the manifest check,
format 2.0 stores).

Reading: Zarr's array API costs ~0.5-0.8 ms of Python per call. The reader therefore reads sharded arrays
directly when their codec pipeline is the one this library writes (cached shard index, ``os.pread`` of the
inner chunk, crc32c check, numcodecs blosc decode); the files stay standard Zarr v3, and any other
pipeline or store falls back to Zarr.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import crc32c as _crc32c
import numcodecs
import numpy as np
import zarr

from . import codecs as _codecs
from . import schema as S
from .errors import CorruptChunkError, FormatError, IncompleteStoreError, ValidationError
from .writer import Writer, _as_codec, storage_stats, write  # noqa: F401 - re-exported

__all__ = ["write", "open", "Writer", "Reader", "CropRecords", "CorruptChunkError", "array_names", "storage_stats"]

_MISSING = 2**64 - 1  # shard-index offset/nbytes of an inner chunk that was never written


@dataclass
class CropRecords:
    """Stored records for a set of images: leading dims ``(B, m)`` (or ``(m,)`` for one image).

    ``fields`` are the codec's stored label fields; :meth:`Reader.decode` turns them into distributions.
    ``aug`` is the (..., A) float32 array of a 1.0 store, a dict ``{column: array}`` of a 2.0 store, or None.
    """

    boxes: np.ndarray  # (..., 4) int (top, left, height, width)
    flips: np.ndarray  # (...,) bool
    aug: Any
    fields: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.boxes)


def array_names(codec: _codecs.LabelCodec, num_classes: int, num_aug: int) -> list[str]:
    """Every per-crop array of a format-1.0 store, in a fixed order (2.0: ``header.per_crop_specs(codec)``)."""
    names = [S.BOX, S.FLIP] + ([S.AUG] if num_aug else [])
    return names + [S.soft_path(f) for f in codec.fields(num_classes)]


def _per_crop_specs(header: S.Header, codec) -> dict[str, tuple[tuple[int, ...], str]]:
    return header.per_crop_specs(codec)


def read_header(group) -> S.Header:
    try:
        attrs = group.attrs.asdict()
    except Exception as e:  # pragma: no cover - zarr raises several types
        raise FormatError(f"cannot read group attributes: {e}") from e
    if S.ATTR_KEY not in attrs:
        raise FormatError(
            f"not an fkdstore store (no {S.ATTR_KEY!r} attribute; a store whose creation was interrupted "
            f"also lacks it)"
        )
    return S.Header.from_json(attrs[S.ATTR_KEY])


# --------------------------------------------------------------------------------------------- reading


def open(path: str | os.PathLike | zarr.Group) -> Reader:  # noqa: A001 - mirrors zarr.open / safetensors
    """Open a store for reading. Raises :class:`FormatError` for a non-fkdstore group or a newer major version."""
    return Reader(path)


class _ShardedArray:
    """Direct reader for a sharded array written by this library; falls back to Zarr otherwise."""

    def __init__(self, arr: zarr.Array, root: str | None):
        self.name = arr.path
        self.shape = arr.shape
        self.dtype = np.dtype(str(arr.dtype))
        self.arr = arr
        self.root = root
        meta = arr.metadata.to_dict()
        self.fast = root is not None and self._supported(meta)
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])  # one file of the grid
        codec0 = meta["codecs"][0]
        self.chunk = tuple(codec0["configuration"]["chunk_shape"]) if codec0["name"] == "sharding_indexed" else self.shard
        self.per_shard = self.shard[0] // self.chunk[0]
        self._fd: dict[int, int] = {}
        self._index: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pid = os.getpid()

    @staticmethod
    def _supported(meta) -> bool:
        c = meta.get("codecs", [])
        if len(c) != 1 or c[0]["name"] != "sharding_indexed":
            return False
        cfg = c[0]["configuration"]
        names = [x["name"] for x in cfg["codecs"]]
        inner = names == ["bytes", "blosc", "crc32c"] and cfg["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
        index = [x["name"] for x in cfg["index_codecs"]] == ["bytes", "crc32c"]
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        only_first = all(g == s for g, s in zip(grid[1:], meta["shape"][1:])) and all(
            a == b for a, b in zip(cfg["chunk_shape"][1:], meta["shape"][1:])
        )
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        return inner and index and cfg.get("index_location", "end") == "end" and only_first and sep == "/" \
            and meta.get("chunk_key_encoding", {}).get("name") == "default"

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_fd"], d["_index"], d["_cache"] = {}, {}, OrderedDict()
        return d

    def _file(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent, reopen ours
            self._fd, self._pid = {}, os.getpid()
        fd = self._fd.get(s)
        if fd is None:
            key = "/".join(["c", str(s)] + ["0"] * (len(self.shape) - 1))
            try:
                fd = os.open(os.path.join(self.root, self.name, key), os.O_RDONLY)
            except FileNotFoundError:
                fd = -1  # shard never written: every chunk reads as the fill value
            self._fd[s] = fd
        return fd

    def _shard_index(self, s: int) -> np.ndarray:
        idx = self._index.get(s)
        if idx is None:
            fd = self._file(s)
            if fd < 0:
                idx = self._index[s] = np.full((self.per_shard, 2), _MISSING, dtype="<u8")
                return idx
            n = self.per_shard * 16 + 4
            size = os.fstat(fd).st_size
            raw = os.pread(fd, n, size - n)
            if _crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise CorruptChunkError(f"array {self.name!r} shard {s}: shard index fails its crc32c checksum")
            idx = self._index[s] = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
        return idx

    def _decode(self, raw: bytes, c: int) -> np.ndarray:
        body, crc = raw[:-4], raw[-4:]
        if _crc32c.crc32c(body) != int.from_bytes(crc, "little"):
            raise CorruptChunkError(f"array {self.name!r} chunk {c}: crc32c checksum mismatch (data corrupted)")
        try:
            buf = numcodecs.blosc.decompress(body)
        except Exception as e:
            raise CorruptChunkError(f"array {self.name!r} chunk {c}: cannot decompress ({e})") from e
        return np.frombuffer(buf, self.dtype.newbyteorder("<")).reshape(self.chunk)

    def chunk_data(self, c: int) -> np.ndarray:
        """Decoded inner chunk ``c`` (images ``c*ipc ... (c+1)*ipc``), cached (LRU of 32)."""
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        s, j = divmod(c, self.per_shard)
        off, nb = (int(x) for x in self._shard_index(s)[j])
        if off == _MISSING:
            data = np.zeros(self.chunk, self.dtype)
        else:
            data = self._decode(os.pread(self._file(s), nb, off), c)
        self._cache[c] = data
        if len(self._cache) > 32:
            self._cache.popitem(last=False)
        return data

    def shard_data(self, s: int) -> np.ndarray:
        """Every image of shard ``s`` in one read (used by :meth:`Reader.read_all`)."""
        n0 = s * self.shard[0]
        n1 = min(self.shape[0], n0 + self.shard[0])
        if not self.fast:
            return self.arr[n0:n1]
        fd = self._file(s)
        index = self._shard_index(s)
        out = np.empty((self.per_shard * self.chunk[0], *self.chunk[1:]), self.dtype)
        present = index[:, 0] != _MISSING
        lo = int(index[present, 0].min()) if present.any() else 0
        hi = int((index[present, 0] + index[present, 1]).max()) if present.any() else 0
        blob = os.pread(fd, hi - lo, lo) if present.any() else b""
        ipc = self.chunk[0]
        for j in range(self.per_shard):
            off, nb = (int(x) for x in index[j])
            dst = out[j * ipc:(j + 1) * ipc]
            if off == _MISSING:
                dst[...] = 0
            else:
                dst[...] = self._decode(blob[off - lo:off - lo + nb], s * self.per_shard + j)
        return out[: n1 - n0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (images) ``rows`` in the given order, grouped by inner chunk: one decode per chunk."""
        if not self.fast:
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
            if len(rows):
                order = np.argsort(rows, kind="stable")  # Zarr reads sorted selections
                out[order] = self.arr.oindex[rows[order]]
            return out
        return self.take_grouped(*_group_rows(rows, self.chunk[0]))

    def take_grouped(self, chunks: np.ndarray, inv: np.ndarray, within: np.ndarray) -> np.ndarray:
        """Rows given as (unique chunk ids, index into them per row, row within its chunk)."""
        if len(chunks) == 1:
            return self.chunk_data(int(chunks[0]))[within]
        stacked = np.stack([self.chunk_data(int(c)) for c in chunks])
        return stacked[inv, within]

    def close(self):
        for fd in self._fd.values():
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd, self._index, self._cache = {}, {}, OrderedDict()


def _group_rows(rows: np.ndarray, ipc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group image rows by inner chunk: (unique chunk ids, position of each row's chunk, row in chunk)."""
    c = rows // ipc
    if len(rows) == 1:
        return c, np.zeros(1, np.intp), rows % ipc
    chunks, inv = np.unique(c, return_inverse=True)
    return chunks, inv, rows % ipc


class Reader:
    """Read access to a store. Attributes: ``num_images``, ``crops_per_image``, ``num_classes``, ``codec``,
    ``meta``, ``header``, ``complete``; methods :meth:`read`, :meth:`read_batch`, :meth:`read_all`,
    :meth:`soft_labels`, :meth:`decode`. Picklable (file handles reopen lazily in each process)."""

    def __init__(self, path):
        if isinstance(path, zarr.Group):
            group = path
        else:
            p = Path(path)
            if not (p / "zarr.json").exists():
                raise FormatError(f"{p}: not a Zarr v3 group (no zarr.json)")
            try:
                group = zarr.open_group(str(p), mode="r")
            except Exception as e:
                raise FormatError(f"{p}: cannot open as a Zarr v3 group: {e}") from e
        self.group = group
        self.path = str(getattr(group.store, "root", "") or path)
        self.header = read_header(group)
        self.codec = _codecs.from_config(dict(self.header.codec))
        root = str(group.store.root) if hasattr(group.store, "root") else None
        self._arrays = {
            name: _ShardedArray(group[name], root)
            for name in self.header.per_crop_specs(self.codec)
        }
        self._written = None

    # -- metadata
    num_images = property(lambda self: self.header.num_images)
    crops_per_image = property(lambda self: self.header.crops_per_image)
    num_classes = property(lambda self: self.header.num_classes)
    meta = property(lambda self: self.header.meta)
    aug_names = property(lambda self: [a.name for a in self.header.aug])

    @property
    def image_keys(self) -> list[str]:
        if self.header.major >= 2:
            return S.decode_keys(self.group[S.KEY][:])
        return [str(k) for k in self.group[S.IMAGE_KEY][:]]

    def _key(self, i: int) -> str:
        if self.header.major >= 2:
            return S.decode_keys(self.group[S.KEY][i:i + 1], start=i)[0]
        return str(self.group[S.IMAGE_KEY][i])

    @property
    def image_sizes(self) -> np.ndarray:
        """(N, 2) int32 (height, width)."""
        return self.group[S.IMAGE_SIZE][:]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int32 ground-truth classes, -1 where unknown."""
        return self.group[S.LABEL][:]

    @property
    def written(self) -> np.ndarray:
        """(N,) bool completion flags (read once and cached; call :meth:`refresh` to re-read)."""
        if self._written is None:
            self._written = self.group[S.WRITTEN][:].astype(bool)
        return self._written

    def refresh(self) -> None:
        self._written = None

    @property
    def complete(self) -> bool:
        """True when every image is written."""
        return bool(self.written.all())

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``[start, stop)`` ranges of images not yet written."""
        w = np.concatenate([[True], self.written, [True]])
        edges = np.flatnonzero(np.diff(w.astype(np.int8)))
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]

    def array(self, name: str) -> zarr.Array:
        """The underlying Zarr array (for tools such as ``inspect`` and ``verify``)."""
        return self.group[name]

    @property
    def per_crop_arrays(self) -> list[str]:
        return list(self._arrays)

    # -- data
    def _check_written(self, idx: np.ndarray) -> None:
        if ((idx < 0) | (idx >= self.num_images)).any():
            bad = int(idx[(idx < 0) | (idx >= self.num_images)][0])
            raise IndexError(f"image index {bad} is out of range [0, {self.num_images})")
        w = self.written[idx]
        if not w.all():
            i = int(idx[~w][0])
            raise IncompleteStoreError(
                f"image {i} ({self._key(i)!r}) has not been written; the store is incomplete "
                f"({int((~self.written).sum())} of {self.num_images} images missing)"
            )

    def _records(self, data: dict[str, np.ndarray]) -> CropRecords:
        return CropRecords(
            boxes=data[S.BOX], flips=data[S.FLIP],
            aug={n[len(S.AUG) + 1:]: v for n, v in data.items() if n.startswith(S.AUG + "/")} or data.get(S.AUG),
            fields={n[len(S.SOFT_GROUP) + 1:]: v for n, v in data.items() if n.startswith(S.SOFT_GROUP + "/")},
        )

    def read(self, i: int, slots=None) -> CropRecords:
        """Records of image ``i``: leading dim ``(M,)``, or ``(len(slots),)`` when slots are given."""
        r = self.read_batch(np.asarray([i]), None if slots is None else np.asarray(slots)[None])
        aug = {k: v[0] for k, v in r.aug.items()} if isinstance(r.aug, dict) else (None if r.aug is None else r.aug[0])
        return CropRecords(r.boxes[0], r.flips[0], aug, {k: v[0] for k, v in r.fields.items()})

    def read_batch(self, indices, slots=None) -> CropRecords:
        """Records of images ``indices`` (B,): leading dims ``(B, M)``, or ``(B, m)`` for ``slots`` (B, m).

        One decode per inner chunk touched, whatever B; raises :class:`IncompleteStoreError` if any image
        is not written.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        self._check_written(idx)
        if all(a.fast for a in self._arrays.values()):  # group once: every per-crop array shares the chunking
            groups = _group_rows(idx, self.header.images_per_chunk)
            data = {name: a.take_grouped(*groups) for name, a in self._arrays.items()}
        else:
            data = {name: a.take(idx) for name, a in self._arrays.items()}
        if slots is not None:
            data = _select_slots(data, np.asarray(slots), self.crops_per_image)
        return self._records(data)

    def read_all(self, slots=None, *, progress: bool = False) -> CropRecords:
        """Every image's records, shard by shard (one read per shard file). ``slots`` (N, m) keeps only
        the slots an epoch uses, so memory is N*m records. Requires a complete store."""
        if not self.complete:
            self._check_written(np.flatnonzero(~self.written)[:1])
        slots = None if slots is None else np.asarray(slots)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self._arrays}
        shards = range(self.header.num_shards)
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(shards, desc="reading shards", unit="shard")
        for s in shards:
            r = self.header.shard_range(s)
            block = {n: a.shard_data(s) for n, a in self._arrays.items()}
            if slots is not None:
                block = _select_slots(block, slots[r.start:r.stop], self.crops_per_image)
            for n, v in block.items():
                parts[n].append(v)
        return self._records({n: np.concatenate(v) for n, v in parts.items()})

    def decode(self, fields: Mapping[str, Any]):
        """Decode codec fields (numpy or torch, any device) to distributions (..., C)."""
        return self.codec.decode(fields, self.num_classes)

    def soft_labels(self, i: int, slots=None) -> np.ndarray:
        """Decoded soft labels of image ``i``: (M, C) float32, or (len(slots), C)."""
        return self.decode(self.read(i, slots).fields)

    def close(self) -> None:
        for a in self._arrays.values():
            a.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"fkdstore.Reader({self.path!r}, images={self.num_images}, crops_per_image={self.crops_per_image}, "
            f"classes={self.num_classes}, codec={self.codec!r}, complete={self.complete})"
        )


def _select_slots(data: dict[str, np.ndarray], slots: np.ndarray, M: int) -> dict[str, np.ndarray]:
    B = next(iter(data.values())).shape[0]
    if slots.ndim != 2 or slots.shape[0] != B:
        raise ValidationError(f"slots must have shape ({B}, m). Got {slots.shape}.")
    if ((slots < 0) | (slots >= M)).any():
        raise ValidationError(f"slots must be in [0, {M}).")
    rows = np.arange(B)[:, None]
    return {n: v[rows, slots] for n, v in data.items()}
