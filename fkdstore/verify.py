"""``fkdstore verify``: read every byte of a store and list every problem found.

:func:`verify` returns a list of one-line problem strings (empty when the store is clean). Checks, in order:

1. The group is an fkdstore store this library can read (header attribute, version, codec config).
2. Attributes agree with the arrays: every array of the format exists with the shape, dtype, chunk and
   shard shape the header implies (``N``, ``M``, ``C``, codec fields, aug, ``images_per_chunk/shard``,
   ``box_dtype``); ``has_labels`` matches the ``label`` array.
3. Every chunk is read and its crc32c checked. Sharded per-crop arrays are read file by file: the shard
   index checksum, then each inner chunk's checksum and decompression; a problem names the array, the
   shard file and the inner chunk (``chunk c`` = images ``c*ipc .. (c+1)*ipc``, the numbering of
   :class:`fkdstore.store.CorruptChunkError`). Unsharded arrays are read chunk by chunk through Zarr.
   A written image whose inner chunk or shard file is missing (it would read back as zeros) is a problem.
4. Per-image arrays: keys unique and non-empty, sizes >= 1, labels in ``[-1, C)``, ``written`` in {0, 1},
   and every image written (the missing ranges are listed).
5. Per written image: boxes have height, width >= 1 and lie inside the recorded image size; flips are 0/1;
   aug values finite; codec fields valid (``codec.field_problems``: indices in ``[0, C)`` and distinct,
   probabilities finite in ``[0, 1 + PROB_ATOL]``, top-K non-increasing, stored mass at most
   ``1 + codec.sum_atol(C)``) and decoded distributions finite, non-negative and summing to 1 within
   ``codec.sum_atol(C)`` (``fkdstore.codecs.base``: one tolerance for writer, codecs and verify).

Reading everything costs one pass over the files (shards are read whole, one ``read`` each).
"""

from __future__ import annotations

import os
from pathlib import Path
import crc32c as _crc32c
import numcodecs
import numpy as np

from . import schema as S
from .errors import FkdstoreError

__all__ = ["verify", "MAX_PER_CHECK"]

_MISSING = 2**64 - 1
MAX_PER_CHECK = 20  # problems of one kind listed before summarising the rest


class _Problems(list):
    """A list of problems that caps how many of one kind are listed."""

    def __init__(self):
        super().__init__()
        self._counts: dict[str, int] = {}

    def add(self, kind: str, msg: str) -> None:
        n = self._counts[kind] = self._counts.get(kind, 0) + 1
        if n <= MAX_PER_CHECK:
            self.append(msg)

    def summarise(self) -> None:
        for kind, n in self._counts.items():
            if n > MAX_PER_CHECK:
                self.append(f"... and {n - MAX_PER_CHECK} more problems of kind {kind!r}")


def verify(path: str | os.PathLike, *, progress: bool = False) -> list[str]:
    """Check a store completely; return every problem as a one-line string (``[]`` when clean)."""
    from . import store as _store

    problems = _Problems()
    try:
        reader = _store.open(path)
    except (FkdstoreError, ValueError, KeyError, TypeError) as e:
        return [f"cannot open store: {e}"]
    h, codec = reader.header, reader.codec
    N, M, C = h.num_images, h.crops_per_image, h.num_classes
    root = Path(path)

    # 2. attributes vs arrays
    expected = _store._per_crop_specs(h, codec)
    present = {}
    for name, (trail, dtype) in expected.items():
        try:
            arr = reader.array(name)
        except (KeyError, FileNotFoundError, Exception) as e:  # zarr raises several types
            problems.add("array", f"array {name!r}: missing ({type(e).__name__})")
            continue
        present[name] = arr
        want_shape = (N, M, *trail)
        if tuple(arr.shape) != want_shape:
            problems.add("array", f"array {name!r}: shape {tuple(arr.shape)}, header implies {want_shape}")
        if str(arr.dtype) != dtype:
            problems.add("array", f"array {name!r}: dtype {arr.dtype}, header implies {dtype}")
        md = arr.metadata.to_dict()
        grid = tuple(md["chunk_grid"]["configuration"]["chunk_shape"])
        cod = md.get("codecs", ())
        if tuple(grid) != (h.images_per_shard, M, *trail):
            problems.add("array", f"array {name!r}: shard shape {grid}, header implies {(h.images_per_shard, M, *trail)}")
        if not cod or cod[0]["name"] != "sharding_indexed":
            problems.add("array", f"array {name!r}: not sharded")
        elif tuple(cod[0]["configuration"]["chunk_shape"]) != (h.images_per_chunk, M, *trail):
            problems.add("array", f"array {name!r}: chunk shape {tuple(cod[0]['configuration']['chunk_shape'])}, "
                         f"header implies {(h.images_per_chunk, M, *trail)}")
        elif "crc32c" not in [c["name"] for c in cod[0]["configuration"]["codecs"]]:
            problems.add("array", f"array {name!r}: chunks carry no crc32c checksum")
    for name, shape in ((S.IMAGE_KEY, (N,)), (S.IMAGE_SIZE, (N, 2)), (S.LABEL, (N,)), (S.WRITTEN, (N,))):
        try:
            arr = reader.array(name)
        except Exception as e:
            problems.add("array", f"array {name!r}: missing ({type(e).__name__})")
            continue
        present[name] = arr
        if tuple(arr.shape) != shape:
            problems.add("array", f"array {name!r}: shape {tuple(arr.shape)}, header implies {shape}")

    # 3 + 4. per-image arrays, chunk by chunk
    per_image = {}
    for name in (S.IMAGE_KEY, S.IMAGE_SIZE, S.LABEL, S.WRITTEN):
        if name in present and tuple(present[name].shape)[:1] == (N,):
            per_image[name] = _read_unsharded(present[name], problems)
    written = per_image.get(S.WRITTEN)
    if written is not None:
        bad = ~np.isin(written, (0, 1))
        if bad.any():
            problems.add("written", f"array 'written': values other than 0/1 at images {np.flatnonzero(bad)[:5].tolist()}")
        written = written == 1
        missing = reader.missing_ranges() if not bad.any() else []
        if not written.all():
            n = int((~written).sum())
            problems.add("incomplete", f"store incomplete: {n} of {N} images not written, ranges "
                         + ", ".join(f"[{a}, {b})" for a, b in missing[:10]) + (" ..." if len(missing) > 10 else ""))
    else:
        written = np.zeros(N, bool)
    keys = per_image.get(S.IMAGE_KEY)
    if keys is not None:
        ks = [str(k) for k in keys]
        if len(set(ks)) != len(ks):
            seen, dup = set(), []
            for k in ks:
                if k in seen:
                    dup.append(k)
                seen.add(k)
            problems.add("keys", f"array 'image_key': {len(dup)} duplicate keys, e.g. {dup[:3]}")
        empty = [i for i, k in enumerate(ks) if not k]
        if empty:
            problems.add("keys", f"array 'image_key': empty key at images {empty[:5]}")
    sizes = per_image.get(S.IMAGE_SIZE)
    if sizes is not None and (sizes < 1).any():
        problems.add("sizes", f"array 'image_size': sizes < 1 at images {np.flatnonzero((sizes < 1).any(1))[:5].tolist()}")
    labels = per_image.get(S.LABEL)
    if labels is not None:
        bad = (labels < S.UNKNOWN_LABEL) | (labels >= C)
        if bad.any():
            problems.add("labels", f"array 'label': values outside [-1, {C}) at images {np.flatnonzero(bad)[:5].tolist()}")
        if bool((labels >= 0).any()) != bool(h.has_labels):
            problems.add("attrs", f"attribute has_labels={h.has_labels} but the label array "
                         f"{'holds' if (labels >= 0).any() else 'holds no'} known labels")

    # 3 + 5. per-crop arrays, shard by shard
    shards = range(h.num_shards)
    if progress:
        from tqdm.auto import tqdm

        shards = tqdm(shards, desc="verifying shards", unit="shard")
    pc_names = [n for n in expected if n in present and tuple(present[n].shape)[:2] == (N, M)]
    for s in shards:
        r = h.shard_range(s)
        w = written[r.start:r.stop]
        block: dict[str, np.ndarray] = {}
        for name in pc_names:
            data = _read_shard(root, present[name], s, r, w, h, problems)
            if data is not None:
                block[name] = data
        if not w.any():
            continue
        _check_records(block, w, r, sizes, h, codec, problems)
    reader.close()
    problems.summarise()
    return list(problems)


def _read_unsharded(arr, problems: _Problems):
    """Read an unsharded array chunk by chunk so a bad chunk is named; None if any chunk fails."""
    n = arr.shape[0]
    step = arr.chunks[0]
    parts, ok = [], True
    for c, a in enumerate(range(0, n, step)):
        try:
            parts.append(arr[a:min(n, a + step)])
        except Exception as e:
            problems.add("chunk", f"array {arr.path!r} chunk {c}: cannot be read ({type(e).__name__}: {e})")
            ok = False
    return np.concatenate(parts) if ok and parts else None


def _read_shard(root: Path, arr, s: int, r: range, w: np.ndarray, h: S.Header, problems: _Problems):
    """Decode every inner chunk of shard ``s`` of a per-crop array; None when it cannot be read."""
    md = arr.metadata.to_dict()
    cod = md.get("codecs", ())
    trail = tuple(arr.shape[1:])
    dtype = np.dtype(str(arr.dtype)).newbyteorder("<")
    ipc = h.images_per_chunk
    per_shard = h.images_per_shard // ipc
    fast = (cod and cod[0]["name"] == "sharding_indexed"
            and [c["name"] for c in cod[0]["configuration"]["codecs"]] == ["bytes", "blosc", "crc32c"]
            and [c["name"] for c in cod[0]["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
            and cod[0]["configuration"].get("index_location", "end") == "end")
    if not fast:  # another pipeline: let Zarr read (and checksum) it
        try:
            return arr[r.start:r.stop]
        except Exception as e:
            problems.add("chunk", f"array {arr.path!r} shard {s}: cannot be read ({type(e).__name__}: {e})")
            return None
    key = "/".join(["c", str(s)] + ["0"] * (len(arr.shape) - 1))
    fpath = root / arr.path / key
    if not fpath.exists():
        if w.any():
            problems.add("missing", f"array {arr.path!r} shard {s} ({arr.path}/{key}): file missing but "
                         f"{int(w.sum())} of its images are marked written (they would read as zeros)")
        return None
    blob = fpath.read_bytes()
    n_idx = per_shard * 16 + 4
    if len(blob) < n_idx:
        problems.add("chunk", f"array {arr.path!r} shard {s} ({arr.path}/{key}): file truncated ({len(blob)} bytes)")
        return None
    raw_idx = blob[-n_idx:]
    if _crc32c.crc32c(raw_idx[:-4]) != int.from_bytes(raw_idx[-4:], "little"):
        problems.add("chunk", f"array {arr.path!r} shard {s} ({arr.path}/{key}): shard index fails its crc32c checksum")
        return None
    index = np.frombuffer(raw_idx[:-4], "<u8").reshape(-1, 2)
    out = np.zeros((per_shard * ipc, *trail), dtype)
    ok = True
    for j in range(per_shard):
        c = s * per_shard + j
        rows = slice(j * ipc, (j + 1) * ipc)
        off, nb = (int(x) for x in index[j])
        in_range = w[rows]
        if off == _MISSING:
            if in_range.any():
                problems.add("missing", f"array {arr.path!r} chunk {c} (shard {s}, inner {j}): not stored but "
                             f"{int(in_range.sum())} of its images are marked written (they would read as zeros)")
            continue
        where = f"array {arr.path!r} chunk {c} (shard file {arr.path}/{key}, inner chunk {j}, bytes {off}..{off + nb})"
        if off + nb > len(blob) - n_idx:
            problems.add("chunk", f"{where}: extends past the data area")
            ok = False
            continue
        body, crc = blob[off:off + nb - 4], blob[off + nb - 4:off + nb]
        if _crc32c.crc32c(body) != int.from_bytes(crc, "little"):
            problems.add("chunk", f"{where}: crc32c checksum mismatch (data corrupted)")
            ok = False
            continue
        try:
            buf = numcodecs.blosc.decompress(body)
            out[rows] = np.frombuffer(buf, dtype).reshape((ipc, *trail))
        except Exception as e:
            problems.add("chunk", f"{where}: cannot decompress ({type(e).__name__}: {e})")
            ok = False
    return out[: len(r)] if ok else None


def _check_records(block: dict[str, np.ndarray], w: np.ndarray, r: range, sizes, h: S.Header, codec,
                   problems: _Problems) -> None:
    C = h.num_classes
    rows = np.flatnonzero(w)
    first = r.start

    def where(mask: np.ndarray) -> str:
        b, m = (int(x) for x in np.argwhere(mask)[0])
        return f"image {first + int(rows[b])} slot {m}"

    box = block.get(S.BOX)
    if box is not None and sizes is not None:
        b = box[rows].astype(np.int64)
        sz = sizes[first + rows].astype(np.int64)
        H, W = sz[:, None, 0], sz[:, None, 1]
        bad = (b[..., 2] < 1) | (b[..., 3] < 1) | (b[..., 0] + b[..., 2] > H) | (b[..., 1] + b[..., 3] > W)
        if bad.any():
            i, m = (int(x) for x in np.argwhere(bad)[0])
            problems.add("box", f"array 'box': {int(bad.sum())} boxes outside the image or empty in images "
                         f"{r.start}..{r.stop}, first {where(bad)}: box {b[i, m].tolist()} in size "
                         f"{sz[i].tolist()}")
    flip = block.get(S.FLIP)
    if flip is not None and not np.isin(flip[rows].view(np.uint8), (0, 1)).all():
        problems.add("flip", f"array 'flip': values other than 0/1 in images {r.start}..{r.stop}")
    aug = block.get(S.AUG)
    if aug is not None and not np.isfinite(aug[rows]).all():
        problems.add("aug", f"array 'aug': non-finite values in images {r.start}..{r.stop}")
    fields = {}
    for name in codec.fields(C):
        v = block.get(S.soft_path(name))
        if v is None:
            return
        fields[name] = v[rows]
    known_bad = np.zeros((len(rows), h.crops_per_image), bool)  # reported once, not again when decoded
    for rule, bad in codec.field_problems(fields, C):  # the codec's stored-field rules (one home)
        problems.add("labels", f"label fields must hold {rule}: broken in {int(bad.sum())} crops, first at {where(bad)}")
        known_bad |= bad
    if "indices" in fields and (fields["indices"].astype(np.int64) >= C).any():
        return  # cannot decode
    # decoded distributions, in blocks of at most ~32 MiB
    nb = max(1, (32 * 2**20) // max(1, h.crops_per_image * C * 4))
    for a in range(0, len(rows), nb):
        with np.errstate(invalid="ignore"):
            dist = codec.decode({k: v[a:a + nb] for k, v in fields.items()}, C)
            s = dist.sum(-1, dtype=np.float64)
            bad = ~np.isfinite(dist).all(-1) | (dist < 0).any(-1) | (np.abs(s - 1) > codec.sum_atol(C))
        bad &= ~known_bad[a:a + nb]
        if bad.any():
            bb, m = (int(x) for x in np.argwhere(bad)[0])
            problems.add("decoded", f"decoded distributions: {int(bad.sum())} crops invalid (sum {float(s[bb, m]):.4g}), "
                         f"first at image {first + int(rows[a + bb])} slot {m}")


def format_problems(problems: list[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


def summary(path, problems: list[str]) -> str:
    if not problems:
        return f"{path}: OK (every chunk read, checksums, boxes, labels and attributes valid)"
    return f"{path}: {len(problems)} problem(s)\n" + format_problems(problems)

