"""``fkdstore verify``: read every byte of a store and list every problem found.

:func:`verify` returns a list of one-line problem strings (empty when the store is clean). Checks, in order:

1. The group is an fkdstore store this library can read (header attribute, version, checksum, caps, record
   kind, codec, policies, sampler and required extensions known).
2. Attributes agree with the arrays: every array of the format exists with the shape, dtype, chunk and
   shard shape the header implies (the reader's own open-time check, :func:`fkdstore.reader.mismatches`);
   no undeclared array sits in a group the header declares exactly (``aug/``, ``soft/``, ``map/``);
   ``has_labels`` matches the ``label`` array.
3. Per-image arrays, shard by shard: every chunk present (4.0: they all exist from creation; one listing
   per array finds them, so a header claiming far more images than the store holds costs a listing, not a
   read per claimed shard), compared with its manifest tag (4.0: key, image_size, label), keys unique,
   non-empty, valid UTF-8 without NUL, sizes >= 1, labels in ``[-1, C)``, ``written`` in {0, 1}, and every
   image written (missing ranges listed).
4. Every record chunk is read through :mod:`fkdstore.shard`, the reader's checked decoder: shard index
   checksum, then each inner chunk's presence (a written image's chunk or shard file missing is damage),
   crc32c, decoding and its manifest tag (with the reader's rule for rows of unwritten images, spec
   invariant 9, against the flags verify read); seeded crops are derived and compared with their tags. A problem
   names the array, the chunk (``chunk c`` = images ``c*ipc .. (c+1)*ipc - 1``), the images and the file.
5. Per written image, the record kind's rules: regions: boxes inside the recorded image size
   (:func:`fkdstore.transforms.bad_boxes`, invariant 5), flips 0/1, aug values finite and within their
   policy's rules (invariant 11), codec fields valid (``codec.field_problems``) and decoded distributions
   finite, non-negative and summing to 1 within ``codec.sum_atol(C)``; label maps: class ids in ``[0, C)``
   and distinct per cell, finite scores.

``verify`` never raises for a damaged store: every failure becomes a listed problem (a store location that
cannot be reached raises :class:`~fkdstore.errors.StorageError`). Memory is bounded by one shard of every
array plus the keys seen (for duplicates); sizes in the metadata are compared with the header, and every
chunk's stored and decoded sizes with its shape, before anything is allocated from them.
"""

from __future__ import annotations

import numpy as np

from . import progress as _progress
from . import schema as S
from . import storage as _storage
from .errors import CorruptChunkError, CorruptStoreError, FkdstoreError, StorageError, ValidationError
from .reader import LabelMapReader, Reader, RegionReader
from .reader import open as _open
from .shard import chunk_index, load_many
from .transforms import bad_boxes

__all__ = ["verify", "summary", "format_problems", "MAX_PER_CHECK"]

MAX_PER_CHECK = 20  # problems of one kind listed before summarising the rest


class _Problems(list):
    """A list of problems that caps how many of one kind are listed."""

    def __init__(self) -> None:
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
    except StorageError:  # the location stopped answering: not a problem of the store
        raise
    except Exception as e:  # noqa: BLE001 - e.g. an I/O error of the disk: listed, never raised
        problems.add("error", f"verify stopped early: {type(e).__name__}: {e}")
    finally:
        reader.close()
    problems.summarise()
    return list(problems)


def _verify(reader: RegionReader | LabelMapReader, meta_problems: list[str], problems: _Problems,
            progress: bool | None) -> None:
    for msg in meta_problems:
        problems.add("array", msg)
    h = reader.header
    try:  # provenance only (readers ignore it), but section 1.1 asks for standard JSON
        S.check_json(dict(h.meta), "header meta")
    except ValidationError as e:
        problems.add("attrs", str(e))
    _undeclared(reader, problems)
    shards = _present_shards(reader, problems)
    arrays = [reader.sharded(n) for n in reader.record_arrays]
    ipc = h.images_per_chunk
    state = _Scan(h.num_images)
    with _progress.progress(progress, total=len(shards), desc="verifying shards", unit="shard") as bar:
        for s in shards:
            bar.update()
            r = h.shard_range(s)
            per = _per_image(reader, s, problems, state)
            w = per.get(S.WRITTEN)
            if w is None:  # unreadable flags: reported; nothing of this shard can be checked against them
                continue
            state.flags(r.start, w)
            if not w.any():
                continue
            block: dict[str, np.ndarray] = {}
            items = []
            for a in arrays:
                cs = a.shard_chunks(s)
                pad = np.zeros(len(cs) * ipc, bool)
                pad[:len(w)] = w
                items.append((a, cs, pad.reshape(len(cs), ipc).any(1)))
            try:
                loaded = load_many(items)
            except CorruptStoreError as e:  # a shard file that cannot even be opened (not a regular file)
                problems.add("missing", str(e))
                continue
            for a, (data, errors) in zip(arrays, loaded):
                bad = list({id(e): e for e in errors if e is not None}.values())  # a bad index fails all its chunks
                if bad:
                    more = f" (and {len(bad) - 1} more chunks of this shard)" if len(bad) > 1 else ""
                    kind = "chunk" if isinstance(bad[0], CorruptChunkError) else "missing"
                    problems.add(kind, f"{bad[0]}{more}")
                    continue
                block[a.path] = data.reshape(-1, *a.chunk_shape[1:])[:len(r)]
            if isinstance(reader, RegionReader):
                _region_checks(reader, s, block, w, per.get(S.IMAGE_SIZE), problems)
            else:
                _map_checks(reader, s, block, w, per.get(S.IMAGE_SIZE), problems)
    state.report(reader, shards, problems)


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
            if name != "zarr.json" and not _storage.is_temp_name(name) and f"{group}/{name}" not in declared:
                problems.add("array", f"array '{group}/{name}' is not declared by the header (another store's "
                                      f"array, or a column of another pipeline)")


class _Scan:
    """What verify gathers shard by shard: written counts and missing ranges, keys seen (duplicates), whether
    any label is known."""

    def __init__(self, num_images: int):
        self.N = num_images
        self.written = 0
        self.missing: list[list[int]] = []  # the first missing ranges [a, b)
        self.more_missing = False
        self.keys: dict[str, int] = {}
        self.duplicates: list[str] = []
        self.ndup = 0
        self.known_label = False
        self.labels_read = False

    def flags(self, start: int, w: np.ndarray) -> None:
        self.written += int(w.sum())
        for a, b in _ranges(~w):
            a, b = a + start, b + start
            if self.missing and self.missing[-1][1] == a:
                self.missing[-1][1] = b
            elif len(self.missing) < 10:
                self.missing.append([a, b])
            else:
                self.more_missing = True

    def report(self, reader: Reader, shards: list[int], problems: _Problems) -> None:
        h = reader.header
        N = self.N
        unread = N - sum(len(h.shard_range(s)) for s in shards)  # shards whose per-image chunks are all missing
        if self.written < N:
            shown = ", ".join(f"[{a}, {b})" for a, b in self.missing)
            problems.add("incomplete", f"store incomplete: {N - self.written} of {N} images not written, ranges "
                         + (shown or "-") + (" ..." if self.more_missing or unread else ""))
        if self.ndup:
            problems.add("keys", f"array 'key': {self.ndup} duplicate keys, e.g. {self.duplicates[:3]}")
        if self.labels_read and not unread and self.known_label != bool(h.has_labels):
            problems.add("attrs", f"attribute has_labels={h.has_labels} but the label array "
                         f"{'holds' if self.known_label else 'holds no'} known labels")


def _ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    w = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(w.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _present_shards(reader: Reader, problems: _Problems) -> list[int]:
    """The shards verify reads. 4.0: every chunk of the per-image arrays and manifest exists from creation
    (invariant 8): one listing per array finds them; a missing one is a problem (listed, then summarised), and
    a shard with none of them is not read (a store claiming more images than it holds costs a listing, not a
    read per claimed shard). 2.0/3.0: every shard."""
    h = reader.header
    if h.legacy:
        return list(range(h.num_shards))
    found: dict[str, set[int]] = {}
    store = reader._source.store
    for name in (*h.per_image_arrays, S.MANIFEST):
        meta = reader._metas.get(name)
        if meta is None:
            continue  # reported at open
        try:
            keys = _storage.list_prefix(store, f"{reader._prefix}{name}/")
        except Exception as e:  # noqa: BLE001 - a store that cannot list: read every shard instead
            problems.add("missing", f"cannot list array {name!r} ({type(e).__name__}: {e}); every shard is read")
            return list(range(h.num_shards))
        n = len(f"{reader._prefix}{name}/")
        got = {chunk_index(meta.doc, k[n:]) for k in keys if not _storage.is_temp_name(k)}
        found[name] = {c for c in got if c is not None and c < h.num_shards}
    present = set().union(*found.values()) if found else set()
    for name, have in found.items():
        absent = h.num_shards - len(have)
        if not absent:
            continue
        meta = reader._metas[name]
        if absent > 1000:  # a header claiming far more images than the store holds: summarised, not iterated
            first = next(c for c in range(h.num_shards) if c not in have)
            problems.add("missing", f"array {name!r}: {absent} of {h.num_shards} chunks are missing (the first is "
                                    f"chunk {first}, {meta.chunk_key((first,) + (0,) * (len(meta.shape) - 1))}); every "
                                    f"chunk exists from creation: lost files, or a header claiming more images than "
                                    f"the store holds")
            continue
        for c in range(h.num_shards):
            if c not in have:
                r = h.shard_range(c)
                what = ": its flags read as 0" if name == S.WRITTEN else ""
                key = meta.chunk_key((c,) + (0,) * (len(meta.shape) - 1))
                problems.add("missing", f"array {name!r} chunk {c} (images {r.start}-{r.stop - 1}, {key}) is "
                                        f"missing{what} (a lost or partly copied file; every chunk exists from "
                                        f"creation)")
    return sorted(present)


def _per_image(reader: Reader, s: int, problems: _Problems, state: _Scan) -> dict[str, np.ndarray]:
    """Shard ``s``'s rows of the per-image arrays, each chunk compared with its tag (4.0) and checked: keys
    unique, non-empty, valid UTF-8 without NUL; sizes >= 1; labels in ``[-1, C)``; ``written`` in {0, 1}.
    The shard's flags become the reader's (what the record checks compare against)."""
    h = reader.header
    r = h.shard_range(s)
    out: dict[str, np.ndarray] = {}
    for name in h.per_image_arrays:
        if name not in reader._metas:
            continue  # reported at open
        try:
            out[name] = reader._bound_rows(name, r.start, r.stop)
        except CorruptStoreError as e:
            problems.add("chunk", f"array {name!r} chunk {s} (images {r.start}-{r.stop - 1}): {e}")
    written = out.get(S.WRITTEN)
    if written is not None:
        bad = ~np.isin(written, (0, 1))
        if bad.any():
            problems.add("written", f"array 'written': values other than 0/1 at images "
                                    f"{(r.start + np.flatnonzero(bad)[:5]).tolist()}")
        out[S.WRITTEN] = reader._wflags[s] = written == 1
        reader._written = None
    keys = out.get(S.KEY)
    if keys is not None:
        try:
            for j, k in enumerate(S.decode_keys(keys, start=r.start)):
                if k in state.keys:
                    state.ndup += 1
                    if len(state.duplicates) < 3:
                        state.duplicates.append(k)
                else:
                    state.keys[k] = r.start + j
        except CorruptStoreError as e:
            problems.add("keys", str(e))
    sizes = out.get(S.IMAGE_SIZE)
    if sizes is not None and (sizes < 1).any():
        problems.add("sizes", f"array 'image_size': sizes < 1 at images "
                              f"{(r.start + np.flatnonzero((sizes < 1).any(1))[:5]).tolist()}")
    labels = out.get(S.LABEL)
    if labels is not None:
        state.labels_read = True
        bad = (labels < S.UNKNOWN_LABEL) | (labels >= h.num_classes)
        if bad.any():
            problems.add("labels", f"array 'label': values outside [-1, {h.num_classes}) at images "
                                   f"{(r.start + np.flatnonzero(bad)[:5]).tolist()}")
        state.known_label |= bool((labels >= 0).any())
    return out


def _region_checks(reader: RegionReader, s: int, block: dict[str, np.ndarray], w: np.ndarray,
                   sizes: np.ndarray | None, problems: _Problems) -> None:
    """Section 5 for crop regions: derived crops against their tags, then the per-slot rules (``w``, ``sizes``:
    the shard's flags and image sizes)."""
    h = reader.header
    r = h.shard_range(s)
    if sizes is not None:  # without sizes nothing can be derived (reported)
        c0 = s * h.chunks_per_shard
        try:
            data = reader._derived.chunk_rows(r.start, r.stop)
            for msg in reader._derived_mismatches(c0, min(h.num_chunks, c0 + h.chunks_per_shard), data):
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
        sz = sizes[rows]
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
        stored = block.get(S.soft_path(name))
        if stored is None:
            return
        fields[name] = stored[rows]
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


def _map_checks(reader: LabelMapReader, s: int, block: dict[str, np.ndarray], w: np.ndarray,
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
