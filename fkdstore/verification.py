"""``fkdstore verify``: read every byte of a store and list every problem found.

:func:`verify` returns a list of one-line problem strings (empty when the store is clean). Checks, in order:

1. The group is an fkdstore store this library can read (header attribute, version, checksum, caps, record
   kind, codec, policies, sampler and required extensions known).
2. Attributes agree with the arrays: every array of the format exists with the shape, dtype, chunk and
   shard shape the header implies (the reader's own open-time check, :func:`fkdstore.reader.mismatches`);
   no undeclared array sits in a group the header declares exactly (``aug/``, ``soft/``, ``map/``);
   ``has_labels`` matches the ``label`` array.
3. Per-image arrays, shard by shard: every chunk present (4.0: they all exist from creation), compared with
   its manifest tag (4.0: key, image_size, label), keys unique, non-empty, valid UTF-8 without NUL, sizes
   >= 1, labels in ``[-1, C)``, ``written`` in {0, 1}, and every image written (missing ranges listed).
4. Every record chunk is read through :mod:`fkdstore.shard`, the reader's checked decoder: shard index
   checksum, then each inner chunk's presence (a written image's chunk or shard file missing is damage),
   crc32c, decoding and its manifest tag; seeded crops are derived and compared with their tags. A problem
   names the array, the chunk (``chunk c`` = images ``c*ipc .. (c+1)*ipc - 1``), the images and the file.
5. Per written image, the record kind's rules: regions: boxes inside the recorded image size
   (:func:`fkdstore.transforms.bad_boxes`, invariant 5), flips 0/1, aug values finite and within their
   policy's rules (invariant 11), codec fields valid (``codec.field_problems``) and decoded distributions
   finite, non-negative and summing to 1 within ``codec.sum_atol(C)``; label maps: class ids in ``[0, C)``
   and distinct per cell, finite scores.

``verify`` never raises for a damaged store: every failure becomes a listed problem (a store location that
cannot be reached raises :class:`~fkdstore.errors.StorageError`). Memory is bounded by one shard of every
record array plus the per-image arrays (O(N)); sizes in the metadata are compared with the header before
anything is allocated from them.
"""

from __future__ import annotations

import numpy as np

from . import progress as _progress
from . import schema as S
from . import storage as _storage
from .errors import CorruptChunkError, CorruptStoreError, FkdstoreError, StorageError, ValidationError
from .reader import LabelMapReader, Reader, RegionReader
from .reader import open as _open
from .shard import load_many
from .transforms import bad_boxes

__all__ = ["verify", "summary", "format_problems", "MAX_PER_CHECK"]

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


def verify(path, *, progress: bool | None = None, storage_options=None) -> list[str]:
    """Check a store completely; return every problem as a one-line string (``[]`` when clean).
    ``progress``: None = a bar on a terminal, periodic lines otherwise (:mod:`fkdstore.progress`)."""
    problems = _Problems()
    meta_problems: list[str] = []
    try:
        reader = _open(path, storage_options=storage_options, _problems=meta_problems)
    except StorageError:  # the location cannot be reached: not a problem of the store (one line, exit 1)
        raise
    except (FkdstoreError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        return [f"cannot open store: {e}"]
    try:
        _verify(reader, meta_problems, problems, progress)
    finally:
        reader.close()
    problems.summarise()
    return list(problems)


def _verify(reader: Reader, meta_problems: list[str], problems: _Problems, progress: bool | None) -> None:
    for msg in meta_problems:
        problems.add("array", msg)
    h = reader.header
    _undeclared(reader, problems)
    per_image = _per_image(reader, problems)
    written = per_image.get(S.WRITTEN)
    if written is None:
        written = np.zeros(h.num_images, bool)
    arrays = [reader.sharded(n) for n in reader.record_arrays]
    checks = _region_checks if isinstance(reader, RegionReader) else _map_checks
    sizes = per_image.get(S.IMAGE_SIZE)
    ipc = h.images_per_chunk
    with _progress.progress(progress, total=h.num_shards, desc="verifying shards", unit="shard") as bar:
        for s in range(h.num_shards):
            bar.update()
            r = h.shard_range(s)
            w = written[r.start:r.stop]
            if not w.any():
                continue
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
            checks(reader, s, block, w, written, sizes, problems)


def _undeclared(reader: Reader, problems: _Problems) -> None:
    """Arrays inside ``aug/``, ``soft/`` or ``map/`` that the header does not declare (section 1.4)."""
    declared = set(reader.header.record_specs())
    store = reader._source.store
    for group in S.DECLARED_GROUPS:
        try:
            names = _storage.list_dir(store, f"{reader._prefix}{group}")
        except Exception:  # noqa: BLE001 - a store that cannot list: nothing to report here
            continue
        for name in names:
            if name != "zarr.json" and f"{group}/{name}" not in declared:
                problems.add("array", f"array '{group}/{name}' is not declared by the header (another store's "
                                      f"array, or a column of another pipeline)")


def _per_image(reader: Reader, problems: _Problems) -> dict[str, np.ndarray]:
    """Read and check the per-image arrays shard by shard; returns those that could be read whole."""
    h = reader.header
    N, C = h.num_images, h.num_classes
    out: dict[str, np.ndarray] = {}
    for name in h.per_image_arrays:
        if name not in reader._metas:
            continue  # reported at open
        step = h.images_per_shard if h.per_image_chunk else reader._metas[name].grid[0]
        parts, ok = [], True
        for c, a in enumerate(range(0, N, step)):
            b = min(N, a + step)
            try:
                parts.append(reader._bound_rows(name, a, b))
            except CorruptStoreError as e:
                problems.add("chunk", f"array {name!r} chunk {c} (images {a}-{b - 1}): {e}")
                ok = False
        if ok and parts:
            out[name] = np.concatenate(parts)
    written = out.get(S.WRITTEN)
    if written is not None:
        bad = ~np.isin(written, (0, 1))
        if bad.any():
            problems.add("written", f"array 'written': values other than 0/1 at images "
                                    f"{np.flatnonzero(bad)[:5].tolist()}")
        written = out[S.WRITTEN] = written == 1
        if not written.all():
            w = np.concatenate([[True], written, [True]])
            edges = np.flatnonzero(np.diff(w.astype(np.int8)))
            missing = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
            problems.add("incomplete", f"store incomplete: {int((~written).sum())} of {N} images not written, ranges "
                         + ", ".join(f"[{a}, {b})" for a, b in missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if not h.legacy:
            _written_chunks(reader, problems)
    keys = out.get(S.KEY)
    if keys is not None:
        _check_keys(keys, problems)
    sizes = out.get(S.IMAGE_SIZE)
    if sizes is not None and (sizes < 1).any():
        problems.add("sizes", f"array 'image_size': sizes < 1 at images "
                              f"{np.flatnonzero((sizes < 1).any(1))[:5].tolist()}")
    labels = out.get(S.LABEL)
    if labels is not None:
        bad = (labels < S.UNKNOWN_LABEL) | (labels >= C)
        if bad.any():
            problems.add("labels", f"array 'label': values outside [-1, {C}) at images "
                                   f"{np.flatnonzero(bad)[:5].tolist()}")
        if bool((labels >= 0).any()) != bool(h.has_labels):
            problems.add("attrs", f"attribute has_labels={h.has_labels} but the label array "
                         f"{'holds' if (labels >= 0).any() else 'holds no'} known labels")
    return out


def _written_chunks(reader: Reader, problems: _Problems) -> None:
    """4.0: every chunk of ``written`` exists from creation; a missing one (read as zeros) is damage."""
    meta = reader._metas[S.WRITTEN]
    for s in range(reader.header.num_shards):
        key = meta.chunk_key((s,))
        if not reader._source.exists(key):
            r = reader.header.shard_range(s)
            problems.add("missing", f"array 'written' chunk {s} (images {r.start}-{r.stop - 1}, {key}) is missing: "
                                    f"its flags read as 0 (a lost or partly copied file)")


def _check_keys(keys: np.ndarray, problems: _Problems) -> None:
    try:
        ks = S.decode_keys(keys)
    except CorruptStoreError as e:
        problems.add("keys", str(e))
        return
    if len(set(ks)) != len(ks):
        seen, dup = set(), []
        for k in ks:
            if k in seen:
                dup.append(k)
            seen.add(k)
        problems.add("keys", f"array 'key': {len(dup)} duplicate keys, e.g. {dup[:3]}")


def _region_checks(reader: RegionReader, s: int, block: dict[str, np.ndarray], w: np.ndarray, written: np.ndarray,
                   sizes: np.ndarray | None, problems: _Problems) -> None:
    """Section 5 for crop regions: derived crops against their tags, then the per-slot rules."""
    h = reader.header
    r = h.shard_range(s)
    if sizes is not None:  # without sizes nothing can be derived (reported)
        data = reader._derived.chunk_rows(r.start, r.stop)
        c0 = s * h.chunks_per_shard
        try:
            for msg in reader._derived_mismatches(c0, min(h.num_chunks, c0 + h.chunks_per_shard), data, written):
                problems.add("chunk", msg)
            block.update({name: v[:len(r)] for name, v in data.items()})
        except CorruptStoreError as e:  # the manifest chunk cannot be read: reported, the rest is still checked
            problems.add("missing", f"{e}; seeded crops of images {r.start}..{r.stop - 1} not checked")
    C, M, codec = h.num_classes, h.crops_per_image, h.codec
    rows = np.flatnonzero(w)
    first = r.start

    def where(mask: np.ndarray) -> str:
        b, m = (int(x) for x in np.argwhere(mask)[0])
        return f"image {first + int(rows[b])} slot {m}"

    box = block.get(S.BOX)
    if box is not None and sizes is not None:
        b = box[rows]
        sz = sizes[first + rows]
        bad = bad_boxes(b, sz)
        if bad.any():
            i, m = (int(x) for x in np.argwhere(bad)[0])
            problems.add("box", f"array 'box': {int(bad.sum())} boxes outside the image or empty in images "
                         f"{r.start}..{r.stop - 1}, first {where(bad)}: box {b[i, m].tolist()} in size "
                         f"{sz[i].tolist()}")
    flip = block.get(S.FLIP)
    if flip is not None and not np.isin(flip[rows].view(np.uint8), (0, 1)).all():
        problems.add("flip", f"array 'flip': values other than 0/1 in images {r.start}..{r.stop}")
    prefix = S.AUG + "/"
    cols = {n[len(prefix):]: v[rows] for n, v in block.items() if n.startswith(prefix)}
    for name, v in cols.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            problems.add("aug", f"array 'aug/{name}': non-finite values in images {r.start}..{r.stop - 1}")
    if len(h.augment) and len(cols) == len(h.aug):  # invariant 11 (an unreadable column was reported above)
        image_size = None if h.replay is None else h.replay.input_size
        try:
            h.augment.validate(cols, num_images=h.num_images, crops_per_image=M, image_size=image_size)
        except ValidationError as e:
            problems.add("aug", f"augment columns of images {r.start}..{r.stop - 1}: {e}")
    fields = {}
    for name in codec.fields(C):
        v = block.get(S.soft_path(name))
        if v is None:
            return
        fields[name] = v[rows]
    known_bad = np.zeros((len(rows), M), bool)  # reported once, not again when decoded
    for rule, bad in codec.field_problems(fields, C):  # the codec's stored-field rules (one home)
        problems.add("labels", f"label fields must hold {rule}: broken in {int(bad.sum())} crops, first at "
                               f"{where(bad)}")
        known_bad |= bad
    if "indices" in fields and (fields["indices"].astype(np.int64) >= C).any():
        return  # cannot decode
    # decoded distributions, in blocks of at most ~32 MiB
    nb = max(1, (32 * 2**20) // max(1, M * C * 4))
    for a in range(0, len(rows), nb):
        with np.errstate(invalid="ignore", over="ignore"):
            dist = codec.decode({k: v[a:a + nb] for k, v in fields.items()}, C)
            # Two passes over the decoded block (this loop is most of verify's time): a NaN or infinity in a
            # row makes its sum NaN or infinite, which fails the NaN-safe sum test. float32 pairwise summation
            # errs by ~1e-6 on C = 1000 terms, far inside sum_atol (>= PROB_ATOL = 1e-3).
            total = dist.sum(-1)
            bad = ~(np.abs(total - 1) <= codec.sum_atol(C)) | (dist < 0).any(-1)
        bad &= ~known_bad[a:a + nb]
        if bad.any():
            bb, m = (int(x) for x in np.argwhere(bad)[0])
            problems.add("decoded", f"decoded distributions: {int(bad.sum())} crops invalid (sum "
                                    f"{float(total[bb, m]):.4g}), first at image {first + int(rows[a + bb])} slot {m}")


def _map_checks(reader: LabelMapReader, s: int, block: dict[str, np.ndarray], w: np.ndarray, written: np.ndarray,
                sizes: np.ndarray | None, problems: _Problems) -> None:
    """Section 5 for label maps: class ids in ``[0, C)`` and distinct per cell, finite scores."""
    r = reader.header.shard_range(s)
    rows = np.flatnonzero(w)
    idx, scores = block.get(S.MAP_INDICES), block.get(S.MAP_SCORES)
    if idx is not None:
        ids = idx[rows].astype(np.int64)
        bad = ((ids < 0) | (ids >= reader.num_classes)).any((1, 2, 3))
        if bad.any():
            problems.add("labels", f"array 'map/indices': class ids outside [0, {reader.num_classes}) in image "
                                   f"{r.start + int(rows[np.argmax(bad)])}")
        ordered = np.sort(ids, axis=1)
        rep = (ordered[:, 1:] == ordered[:, :-1]).any((1, 2, 3))
        if rep.any():
            problems.add("labels", f"array 'map/indices': a class repeats within a map cell of image "
                                   f"{r.start + int(rows[np.argmax(rep)])}")
    if scores is not None and not np.isfinite(scores[rows]).all():
        bad = ~np.isfinite(scores[rows]).all((1, 2, 3))
        problems.add("labels", f"array 'map/scores': non-finite scores in image {r.start + int(rows[np.argmax(bad)])}")


def format_problems(problems: list[str]) -> str:
    """Problems as an indented list, one per line."""
    return "\n".join(f"  - {p}" for p in problems)


def summary(path, problems: list[str]) -> str:
    """The one-paragraph verdict ``fkdstore verify`` prints."""
    if not problems:
        return f"{path}: OK (every chunk read, checksums, tags, records and attributes valid)"
    return f"{path}: {len(problems)} problem(s)\n" + format_problems(problems)
