"""``fkdstore verify``: read every byte of a store and list every problem found.

:func:`verify` returns a list of one-line problem strings (empty when the store is clean). Checks, in order:

1. The group is an fkdstore store this library can read (header attribute, version, codec config; format
   2.0: the header checksum).
2. Attributes agree with the arrays: every array of the format exists with the shape, dtype, chunk and
   shard shape the header implies (:func:`fkdstore.reader.mismatches`, the reader's own open-time check);
   ``has_labels`` matches the ``label`` array.
3. Every chunk is read through :mod:`fkdstore.shard`, the reader's checked decoder: shard index checksum,
   then each inner chunk's presence (a written image's chunk or shard file missing is damage), crc32c,
   decoding and (2.0) its manifest tag. A problem names the array, the chunk (``chunk c`` = images
   ``c*ipc .. (c+1)*ipc - 1``), the images and the shard file. Unsharded arrays are read chunk by chunk
   through Zarr.
4. Per-image arrays: keys unique, non-empty, valid UTF-8 without NUL (2.0 ``key``), sizes >= 1, labels in
   ``[-1, C)``, ``written`` in {0, 1}, and every image written (the missing ranges are listed).
5. Per written image: boxes inside the recorded image size (:func:`fkdstore.schema.bad_boxes`, invariant
   5); flips 0/1; aug values finite and (2.0) within their augment policy's rules (invariant 11:
   ``Pipeline.validate``, e.g. partners in ``[-1, N)``); codec fields valid (``codec.field_problems``: indices in ``[0, C)`` and
   distinct, probabilities finite in ``[0, 1 + PROB_ATOL]``, top-K non-increasing, stored mass at most
   ``1 + codec.sum_atol(C)``) and decoded distributions finite, non-negative and summing to 1 within
   ``codec.sum_atol(C)`` (``fkdstore.codecs.base``: one tolerance for writer, codecs and verify).

Memory is bounded by one shard of every per-crop array plus the per-image arrays (O(N)); sizes in the
metadata are compared with the header before anything is allocated from them.
"""

from __future__ import annotations


import numpy as np

from . import progress as _progress
from . import schema as S
from .errors import CorruptChunkError, CorruptStoreError, FkdstoreError, StorageError, ValidationError
from .shard import load_many

__all__ = ["verify", "MAX_PER_CHECK", "MAX_IMAGES"]

MAX_PER_CHECK = 20  # problems of one kind listed before summarising the rest
MAX_IMAGES = 2**31  # verify holds the per-image arrays in memory: refuse headers claiming more images


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


def verify(path, *, progress: bool | None = None, storage_options=None) -> list[str]:
    """Check a store completely; return every problem as a one-line string (``[]`` when clean). ``progress``:
    :func:`fkdstore.progress.progress` (None: a bar on a terminal, a plain line every 30 s otherwise)."""
    from .reader import Reader

    problems = _Problems()
    meta_problems: list[str] = []
    try:
        reader = Reader(path, storage_options=storage_options, _problems=meta_problems)
    except StorageError:  # the location cannot be reached: not a problem of the store (one line, exit 1)
        raise
    except (FkdstoreError, ValueError, KeyError, TypeError, OSError) as e:
        return [f"cannot open store: {e}"]
    for msg in meta_problems:
        problems.add("array", msg)
    h, codec = reader.header, reader.codec
    N, C = h.num_images, h.num_classes
    if N > MAX_IMAGES:
        return list(problems) + [f"header declares num_images={N}, more than verify checks (at most {MAX_IMAGES})"]
    metas = reader._metas

    # 3 + 4. per-image arrays, chunk by chunk
    per_image = {name: _read_unsharded(reader.array(name), problems) for name in h.per_image_arrays
                 if name in metas}
    written = per_image.get(S.WRITTEN)
    if written is not None:
        bad = ~np.isin(written, (0, 1))
        if bad.any():
            problems.add("written", f"array 'written': values other than 0/1 at images {np.flatnonzero(bad)[:5].tolist()}")
        written = written != 0
        if not written.all():
            w = np.concatenate([[True], written, [True]])
            edges = np.flatnonzero(np.diff(w.astype(np.int8)))
            missing = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
            problems.add("incomplete", f"store incomplete: {int((~written).sum())} of {N} images not written, ranges "
                         + ", ".join(f"[{a}, {b})" for a, b in missing[:10]) + (" ..." if len(missing) > 10 else ""))
    else:
        written = np.zeros(N, bool)
    _check_keys(h, per_image.get(h.key_array), problems)
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

    # 3 + 5. per-crop arrays, shard by shard, every chunk through the reader's checked decoder
    shards = _progress.progress(progress, total=h.num_shards, desc="verifying shards", unit="shard").wrap(
        range(h.num_shards))
    arrays = [reader.sharded(n) for n in reader.per_crop_arrays]
    pipeline = None
    if h.augment and h.major >= 2:  # the reader checked at open that every policy is known and valid
        from .augment import Pipeline

        pipeline = Pipeline.from_config(list(h.augment))
    ipc = h.images_per_chunk
    seeded = reader._seeded if sizes is not None else None  # without sizes nothing can be derived (reported)
    for s in shards:
        r = h.shard_range(s)
        w = written[r.start:r.stop]
        block: dict[str, np.ndarray] = {}
        items = []
        for a in arrays:
            cs = a.shard_chunks(s)
            pad = np.zeros(len(cs) * ipc, bool)
            pad[:len(w)] = w
            items.append((a, cs, pad.reshape(len(cs), ipc).any(1)))
        for a, (data, errors) in zip(arrays, load_many(items)):
            bad = list({id(e): e for e in errors if e is not None}.values())  # a bad index fails all its chunks
            if bad:
                more = f" (and {len(bad) - 1} more chunks of this shard)" if len(bad) > 1 else ""
                kind = "chunk" if isinstance(bad[0], CorruptChunkError) else "missing"
                problems.add(kind, f"{bad[0]}{more}")
                continue
            block[a.path] = data.reshape(-1, *a.chunk_shape[1:])[:len(r)]
        if seeded is not None and w.any():  # seeded crops: derived, every chunk against its manifest tags
            block.update(_check_seeded(reader, seeded, s, written, problems))
        if w.any():
            _check_records(block, w, r, sizes, h, codec, problems, pipeline)
    reader.close()
    problems.summarise()
    return list(problems)


def _check_seeded(reader, seeded, s: int, written: np.ndarray, problems: _Problems) -> dict[str, np.ndarray]:
    """Seeded crops of shard ``s``: derive box and flip and compare every chunk holding a written image with
    its manifest tags (the reader's check); returns the derived rows for the record checks."""
    h = reader.header
    r = h.shard_range(s)
    data = seeded.chunk_rows(r.start, r.stop)
    c0 = s * h.chunks_per_shard
    try:
        mismatches = reader._derived_mismatches(c0, min(h.num_chunks, c0 + h.chunks_per_shard), data, written)
    except CorruptStoreError as e:  # the manifest chunk cannot be read: reported, the rest is still checked
        problems.add("missing", f"{e}; seeded crops of images {r.start}..{r.stop - 1} not checked")
        return {}
    for msg in mismatches:
        problems.add("chunk", msg)
    return {name: v[:len(r)] for name, v in data.items()}


def _check_keys(h: S.Header, keys, problems: _Problems) -> None:
    if keys is None:
        return
    name = h.key_array
    if h.major >= 2:
        try:
            ks = S.decode_keys(keys)
        except CorruptStoreError as e:
            problems.add("keys", str(e))
            return
    else:
        ks = [str(k) for k in keys]
    if len(set(ks)) != len(ks):
        seen, dup = set(), []
        for k in ks:
            if k in seen:
                dup.append(k)
            seen.add(k)
        problems.add("keys", f"array {name!r}: {len(dup)} duplicate keys, e.g. {dup[:3]}")
    empty = [i for i, k in enumerate(ks) if not k]
    if empty:
        problems.add("keys", f"array {name!r}: empty key at images {empty[:5]}")


def _read_unsharded(arr, problems: _Problems):
    """Read an unsharded array chunk by chunk so a bad chunk is named; None if any chunk fails."""
    n = arr.shape[0]
    step = arr.chunks[0]
    parts, ok = [], True
    for c, a in enumerate(range(0, n, step)):
        try:
            parts.append(arr[a:min(n, a + step)])
        except Exception as e:
            problems.add("chunk", f"array {arr.path!r} chunk {c} (images {a}-{min(n, a + step) - 1}): cannot be "
                         f"read ({type(e).__name__}: {e})")
            ok = False
    return np.concatenate(parts) if ok and parts else None


def _check_records(block: dict[str, np.ndarray], w: np.ndarray, r: range, sizes, h: S.Header, codec,
                   problems: _Problems, pipeline=None) -> None:
    C = h.num_classes
    rows = np.flatnonzero(w)
    first = r.start

    def where(mask: np.ndarray) -> str:
        b, m = (int(x) for x in np.argwhere(mask)[0])
        return f"image {first + int(rows[b])} slot {m}"

    box = block.get(S.BOX)
    if box is not None and sizes is not None:
        b = box[rows]
        sz = sizes[first + rows]
        bad = S.bad_boxes(b, sz)
        if bad.any():
            i, m = (int(x) for x in np.argwhere(bad)[0])
            problems.add("box", f"array 'box': {int(bad.sum())} boxes outside the image or empty in images "
                         f"{r.start}..{r.stop - 1}, first {where(bad)}: box {b[i, m].tolist()} in size "
                         f"{sz[i].tolist()}")
    flip = block.get(S.FLIP)
    if flip is not None and not np.isin(flip[rows].view(np.uint8), (0, 1)).all():
        problems.add("flip", f"array 'flip': values other than 0/1 in images {r.start}..{r.stop}")
    for name, v in block.items():
        if (name == S.AUG or name.startswith(S.AUG + "/")) and v.dtype.kind == "f" and not np.isfinite(v[rows]).all():
            problems.add("aug", f"array {name!r}: non-finite values in images {r.start}..{r.stop - 1}")
    if pipeline is not None:  # invariant 11: every column within its policy's rules (partners in [-1, N), ...)
        prefix = S.AUG + "/"
        cols = {n[len(prefix):]: v[rows] for n, v in block.items() if n.startswith(prefix)}
        if len(cols) == len(h.aug):  # an unreadable column was reported above
            try:
                pipeline.validate(cols, num_images=h.num_images, crops_per_image=h.crops_per_image)
            except ValidationError as e:
                problems.add("aug", f"augment columns of images {r.start}..{r.stop - 1}: {e}")
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
        with np.errstate(invalid="ignore", over="ignore"):
            dist = codec.decode({k: v[a:a + nb] for k, v in fields.items()}, C)
            # Two passes over the decoded block (this loop is most of verify's time): a NaN or infinity in a
            # row makes its sum NaN or infinite, which fails the NaN-safe sum test. float32 pairwise summation
            # errs by ~1e-6 on C = 1000 terms, far inside sum_atol (>= PROB_ATOL = 1e-3).
            s = dist.sum(-1)
            bad = ~(np.abs(s - 1) <= codec.sum_atol(C)) | (dist < 0).any(-1)
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

