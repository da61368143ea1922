"""Image sources: where the images of a store come from.

A store binds its labels to images by key (``image_keys``, in store order). An :class:`ImageSource` serves
those images, in that order, from wherever they live; :func:`as_source` picks one for what a user passes as
``images`` to :class:`fkdstore.TorchDataset` or :func:`fkdstore.generate`:

======================  ===========================================  ===========================================
``images``              source and keys                              ground-truth class (``labels``)
======================  ===========================================  ===========================================
a folder                :class:`FileSource`: relative posix paths    the first folder (torchvision ImageFolder)
                        of the image files below it, sorted
a list of image files   :class:`FileSource`: the paths as given      none (-1)
``s3://bucket/train/``  :class:`URLSource`: relative paths of the    the first folder
(any fsspec URL)        image objects under the prefix, sorted
tar shards              :class:`TarSource` (WebDataset layout):      the ``.cls`` member, else the key's first
                        member stems (``<key>.jpg`` -> ``<key>``),   folder
                        shard by shard, in member order
a ``datasets.Dataset``  :class:`HFSource`: an id column, else the    a ClassLabel (or integer) column
                        row index (``"0"``, ``"1"``, ...)
a mapping               :class:`MapSource`: ``mapping.keys()``       ``mapping.label(key)`` when it has one
======================  ===========================================  ===========================================

Tar shards are a ``.tar`` path or URL, a list of them, a brace pattern (``shards/shard-{000000..000009}.tar``)
or a folder / URL prefix holding ``.tar`` files and no images. URLs go through the store's own storage layer
(:func:`fkdstore.storage.as_store`, the same ``storage_options`` and credentials as stores), so an
unreachable URL raises a one-line :class:`~fkdstore.errors.StorageError`.

**The contract.** Every source has ``keys`` (str, no repeats), ``labels`` (int per key, -1 when unknown),
``classes`` (class names, possibly empty), ``where`` (names the source in messages) and ``len()``, and:

* ``name(i)`` names image ``i`` in messages (its path, URL or ``shard.tar:member``);
* ``size(i)`` is its ``(height, width)``, read from the file header without decoding the pixels where the
  format allows; ``header_sizes(indices)`` gives many at once (a remote source fetches them concurrently),
  with an unreadable header returned as its :class:`~fkdstore.errors.ImageReadError`;
* ``load(i)`` is the decoded RGB :class:`PIL.Image.Image`, decoded strictly
  (:func:`fkdstore.images.load_image`): a damaged image raises ImageReadError naming it, a missing one
  FileNotFoundError;
* ``prefetch(indices)`` announces the images loaded next, in that order. A remote source (URL, tar shards)
  then fetches their bytes in a background thread, at most ``read_ahead`` encoded images beyond the ones
  loaded (the bound on its memory: about ``read_ahead`` x the mean file size per process); other sources
  ignore it. ``TorchDataset`` announces each batch, the teacher-runner each teacher batch.
* worker-safe: a source pickles as its location, settings and index (never open files, connections or
  threads); a forked or unpickled copy (a DataLoader worker, fork or spawn) reopens them lazily in its own
  process, as MosaicML Streaming does.

**A map-style source of your own** (:class:`MapSource`): any object with ``keys()`` (the image keys, in
store order) and ``obj[key]`` returning the image as a PIL image, its encoded bytes, or a local file path.
Optional: ``size(key) -> (height, width)`` (else the image header is read, or the PIL image's size),
``label(key) -> int`` and ``classes`` (a list of names). A plain ``dict`` of key -> path works. It must
pickle (DataLoader workers get a copy). Subclassing :class:`ImageSource` is the other way in.

The key binding stays as strict as for folders: the consumer compares the source's keys with the store's
(a missing key raises FileNotFoundError naming it) and checks every loaded image's size against the stored
one.
"""

from __future__ import annotations

import copy
import io
import os
import posixpath
import re
import sys
import tarfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from . import bytesource as _bytesource
from . import storage as _storage
from .errors import ImageReadError, ValidationError
from .images import IMAGE_EXTENSIONS, ImageList, class_labels, image_size, is_image_name, list_images, load_image
from .validation import non_negative_int

__all__ = ["ImageSource", "FileSource", "URLSource", "TarSource", "HFSource", "MapSource", "as_source",
           "DEFAULT_READ_AHEAD", "HEADER_BYTES"]

DEFAULT_READ_AHEAD = 32  # encoded images a remote source fetches ahead of the loads, per process
HEADER_BYTES = 64 * 1024  # bytes read to find an image's size; the whole file when the header is longer
SCAN_WINDOW = 256  # image headers fetched concurrently by header_sizes
TAR_WINDOW = 1 << 20  # bytes per ranged read while walking the member headers of a remote tar shard
_TAR_EXT = frozenset(e[1:] for e in IMAGE_EXTENSIONS)
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ImageSource:
    """The images of a store, in store order; see the module docstring for the contract."""

    keys: list[str]
    labels: list[int]
    classes: list[str]
    where: str

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, i: int) -> str:
        """Image ``i`` named for messages."""
        return f"{self.keys[i]!r} in {self.where}"

    def size(self, i: int) -> tuple[int, int]:
        """``(height, width)`` of image ``i``."""
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Image ``i`` decoded (strictly) to RGB."""
        raise NotImplementedError

    def prefetch(self, indices: Sequence[int]) -> None:
        """Hint: images ``indices`` are loaded next, in this order (remote sources fetch ahead)."""

    def without_labels(self) -> ImageSource:
        """A copy of this source serving the same images and keys with no ground-truth class (``labels`` all
        -1, ``classes`` empty); this source is unchanged."""
        out = copy.copy(self)
        out.labels, out.classes = [-1] * len(self.keys), []
        return out

    def header_sizes(self, indices: Sequence[int] | None = None) -> list[tuple[int, int] | ImageReadError]:
        """``size(i)`` of each image (default all), read with a few threads; an unreadable header is
        returned as its :class:`ImageReadError` (a missing file still raises FileNotFoundError)."""
        idx = range(len(self)) if indices is None else [int(i) for i in indices]

        def one(i):
            try:
                return self.size(i)
            except ImageReadError as e:
                return e

        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as ex:
            return list(ex.map(one, idx, chunksize=256))

    def __repr__(self) -> str:
        return f"fkdstore.sources.{type(self).__name__}({self.where}, {len(self)} images)"


def _check_keys(keys: list[str], where: str) -> None:
    seen: set[str] = set()
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"image keys must be str. Got {k!r} ({type(k).__name__}) in {where}.")
        if k in seen:
            raise ValidationError(f"image keys must be unique, got {k!r} twice in {where}")
        seen.add(k)
    if not keys:
        raise ValidationError(f"no images found in {where}")


# --------------------------------------------------------------------------------------------- local files


class FileSource(ImageSource):
    """Image files on a local disk: a folder (ImageFolder-style, :func:`fkdstore.images.list_images`) or an
    explicit list of files. ``paths`` are absolute; ``root`` is the folder (None for a list)."""

    def __init__(self, images: str | os.PathLike | Sequence[str | os.PathLike] | ImageList):
        listing = images if isinstance(images, ImageList) else list_images(images)
        self.listing = listing
        self.root = listing.root
        self.keys, self.labels, self.classes = listing.keys, listing.labels, listing.classes
        self.paths = listing.paths
        self.where = listing.root if listing.root is not None else "the given file list"

    def name(self, i: int) -> str:
        return self.paths[i]

    def size(self, i: int) -> tuple[int, int]:
        return image_size(self.paths[i])

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i])


# --------------------------------------------------------------------------------------------- byte sources


class _ReadAhead:
    """The bytes of announced images, fetched in windows by one background thread: window ``w`` is
    submitted when the caller takes from window ``w - 1``, so at most two windows (``limit`` images) are
    fetched and not yet taken."""

    def __init__(self, fetch, limit: int):
        self.fetch, self.window = fetch, max(1, limit // 2)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fkdstore-images")
        self.lock = threading.Lock()
        self.schedule([])

    def schedule(self, indices: Sequence[int]) -> None:
        with self.lock:
            for fut in getattr(self, "futures", {}).values():
                fut.cancel()
            W = self.window
            self.windows = [list(indices[a:a + W]) for a in range(0, len(indices), W)]
            self.slot = {i: w for w in range(len(self.windows) - 1, -1, -1) for i in self.windows[w]}
            self.futures: dict[int, Any] = {}
            self.results: dict[int, dict[int, Any]] = {}
            self.submitted = 0
            self._submit_through(0)

    def _submit_through(self, w: int) -> None:
        while self.submitted < len(self.windows) and self.submitted <= w:
            self.futures[self.submitted] = self.pool.submit(self.fetch, self.windows[self.submitted])
            self.submitted += 1

    def take(self, i: int):
        """``(True, bytes or None)`` for an announced image (waiting for its window), else ``(False, None)``."""
        with self.lock:
            w = self.slot.pop(i, None)
            if w is None:
                return False, None
            self._submit_through(w + 1)
            fut = self.futures[w]
        got = self.results.get(w)
        if got is None:
            got = self.results[w] = dict(zip(self.windows[w], fut.result()))
        data = got.pop(i, None)
        if not got:
            self.results.pop(w, None)
            self.futures.pop(w, None)
        return True, data

    def close(self) -> None:
        self.schedule([])
        self.pool.shutdown(wait=False, cancel_futures=True)


class _ByteImages(ImageSource):
    """Images stored as byte ranges of objects of a :class:`fkdstore.bytesource.ByteSource`: image ``i`` is
    ``(object key, start, stop)`` (``stop`` None: the whole object). Subclasses set ``_bytes`` and
    ``_ref``."""

    _bytes: _bytesource.ByteSource
    read_ahead: int = DEFAULT_READ_AHEAD

    def _ref(self, i: int) -> tuple[str, int, int | None]:
        raise NotImplementedError

    def _fetch(self, indices: Sequence[int], header: bool = False) -> list[bytes | None]:
        """Bytes of images ``indices`` (None where the object is missing), all requests of one call issued
        concurrently; ``header``: only the first ``HEADER_BYTES`` of each."""
        refs = [self._ref(i) for i in indices]
        whole = [n for n, r in enumerate(refs) if r[2] is None and not header]
        ranged = [n for n, r in enumerate(refs) if r[2] is not None or header]
        out: list[bytes | None] = [None] * len(refs)
        if whole:
            for n, data in zip(whole, self._bytes.read_objects([refs[n][0] for n in whole])):
                out[n] = data
        if ranged:
            reqs = []
            for n in ranged:
                key, a, b = refs[n]
                stop = a + HEADER_BYTES if b is None else (min(b, a + HEADER_BYTES) if header else b)
                reqs.append((key, a, stop))
            for n, data in zip(ranged, self._bytes.read_ranges(reqs)):
                out[n] = None if data is None else bytes(data)
        return out

    def _ahead(self) -> _ReadAhead | None:
        if self.read_ahead <= 0:
            return None
        ra = self.__dict__.get("_ra")
        if ra is None or ra[0] != os.getpid():  # first use in this process (a forked worker has none)
            ra = self._ra = (os.getpid(), _ReadAhead(self._fetch, self.read_ahead))
        return ra[1]

    def prefetch(self, indices: Sequence[int]) -> None:
        ahead = self._ahead()
        if ahead is not None:
            ahead.schedule([int(i) for i in indices])

    def _data(self, i: int) -> bytes:
        ahead = self.__dict__.get("_ra")
        found, data = (False, None)
        if ahead is not None and ahead[0] == os.getpid():
            found, data = ahead[1].take(i)
        if not found:
            data = self._fetch([i])[0]
        if data is None:
            raise FileNotFoundError(f"image not found: {self.name(i)}")
        return data

    def load(self, i: int) -> Image.Image:
        return load_image(io.BytesIO(self._data(i)), name=self.name(i))

    def size(self, i: int) -> tuple[int, int]:
        return self._sizes([i])[0]

    def _sizes(self, indices: Sequence[int], errors: bool = False) -> list:
        heads = self._fetch(indices, header=True)
        out: list = []
        for i, head in zip(indices, heads):
            if head is None:
                raise FileNotFoundError(f"image not found: {self.name(i)}")
            try:
                out.append(image_size(io.BytesIO(head), name=self.name(i)))
                continue
            except ImageReadError as e:
                first = e
            _, a, b = self._ref(i)
            if len(head) < HEADER_BYTES or (b is not None and b - a <= HEADER_BYTES):
                if not errors:
                    raise first
                out.append(first)
                continue
            try:  # a header longer than HEADER_BYTES (large EXIF, ICC profile): read the whole file
                out.append(image_size(io.BytesIO(self._data(i)), name=self.name(i)))
            except ImageReadError as e:
                if not errors:
                    raise
                out.append(e)
        return out

    def header_sizes(self, indices: Sequence[int] | None = None) -> list[tuple[int, int] | ImageReadError]:
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        out: list[tuple[int, int] | ImageReadError] = []
        for a in range(0, len(idx), SCAN_WINDOW):
            out.extend(self._sizes(idx[a:a + SCAN_WINDOW], errors=True))
        return out

    def __getstate__(self):
        d = self.__dict__.copy()
        d.pop("_ra", None)  # threads belong to this process; a worker makes its own
        return d


def _parse_read_ahead(read_ahead) -> int:
    return DEFAULT_READ_AHEAD if read_ahead is None else non_negative_int("read_ahead", read_ahead)


class URLSource(_ByteImages):
    """The image objects under an fsspec URL prefix (``s3://bucket/train/``), listed once with one recursive
    listing: keys are their paths relative to the prefix (image extensions only), sorted, and the first
    folder names the class, as for a local folder. Read through :func:`fkdstore.storage.as_store` with
    ``storage_options`` (credentials may also come from the environment); a forked or unpickled copy
    reopens the URL in its own process. ``read_ahead``: see :meth:`ImageSource.prefetch`."""

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None, read_ahead: int | None = None,
                 _store=None, _listing: Mapping[str, int] | None = None):
        if not _storage.is_url(url):
            raise ValidationError(f"url must be a URL such as s3://bucket/train/. Got {url!r}.")
        self.url = str(url).rstrip("/")
        self.read_ahead = _parse_read_ahead(read_ahead)
        store = _store if _store is not None else _storage.as_store(self.url, read_only=True,
                                                                    storage_options=storage_options)
        listing = _listing if _listing is not None else _storage.object_sizes(store)
        self.keys = sorted(k for k in listing if is_image_name(k))
        self.where = self.url + "/"
        if not self.keys:
            raise ValidationError(f"no images found under {self.where} "
                                  f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.labels, self.classes = class_labels(self.keys)
        self._bytes = _bytesource.byte_source(store, location=self.url, storage_options=storage_options)

    def name(self, i: int) -> str:
        return f"{self.url}/{self.keys[i]}"

    def _ref(self, i: int):
        return self.keys[i], 0, None


# --------------------------------------------------------------------------------------------- tar shards


class _RangeFile(io.RawIOBase):
    """A read-only, seekable file over one object of a ByteSource, read in ``TAR_WINDOW`` ranges (for
    :mod:`tarfile` to walk the member headers of a remote shard)."""

    def __init__(self, source: _bytesource.ByteSource, key: str, name: str):
        self.source, self.key, self.name_ = source, key, name
        self.pos, self.buf, self.start = 0, b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:
            raise io.UnsupportedOperation("seek from the end")
        return self.pos

    def readinto(self, b) -> int:
        n = len(b)
        if not (self.start <= self.pos and self.pos + n <= self.start + len(self.buf)):
            data = self.source.read_ranges([(self.key, self.pos, self.pos + max(n, TAR_WINDOW))])[0]
            if data is None:
                raise FileNotFoundError(f"tar shard not found: {self.name_}")
            self.buf, self.start = bytes(data), self.pos
        chunk = self.buf[self.pos - self.start:self.pos - self.start + n]
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: ``dir/stem.ext.more`` -> key ``dir/stem``, extension ``ext.more`` (lowercase); None
    for a name without an extension or a hidden/metadata file (``__key__``, ``.x``)."""
    name = name.removeprefix("./")
    folder, base = posixpath.split(name)
    if "." not in base or base.startswith((".", "__")):
        return None
    stem, ext = base.split(".", 1)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000000..000002}.tar`` -> the three names (WebDataset's numeric ranges; zero-padding kept)."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    a, b = m.group(1), m.group(2)
    if int(b) < int(a):
        raise ValidationError(f"a brace range must count up, {{{a}..{b}}} does not (in {pattern!r})")
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    return [x for n in range(int(a), int(b) + 1)
            for x in expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():])]


class TarSource(_ByteImages):
    """Images in tar shards in WebDataset layout: members ``<key>.<ext>`` (ext one of the image extensions)
    and optional ``<key>.cls`` (an integer class). Keys are the member stems, shard by shard in the given
    order (a folder's or prefix's shards sorted by name), members in their order in the shard; the class
    is the ``.cls`` value when any key has one, else the key's first folder (ImageFolder's rule). A key with
    two images, or repeated across shards, is refused (:class:`ValidationError`).

    ``shards``: a ``.tar`` path or URL, or a list of them (all local or all URLs). Each shard's member
    headers are read once, when the source is built (local: seeks in the file; remote: about one ranged
    request per ``TAR_WINDOW`` bytes of shard, shards in parallel); the index (three integers per image)
    travels with the source to the DataLoader workers. Images are then read as byte ranges of their shard
    (a batch's ranges concurrently and coalesced).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *,
                 storage_options: Mapping[str, Any] | None = None, read_ahead: int | None = None):
        locs = [os.fspath(shards)] if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
        locs = [x for loc in locs for x in expand_braces(loc)]
        if not locs:
            raise ValidationError("shards must name at least one tar file. Got an empty list.")
        remote = [_storage.is_url(x) for x in locs]
        if any(remote) and not all(remote):
            raise ValidationError(f"tar shards must be all local paths or all URLs. Got {locs[remote.index(False)]!r} "
                                  f"and {locs[remote.index(True)]!r}.")
        self.read_ahead = _parse_read_ahead(read_ahead)
        self.shards = locs
        if all(remote):
            scheme = locs[0].split("://", 1)[0]
            paths = [x.split("://", 1)[1] for x in locs]
            root = f"{scheme}://" + posixpath.commonpath([posixpath.dirname(p) for p in paths])
            store = _storage.as_store(root, read_only=True, storage_options=storage_options)
            rel = [posixpath.relpath(p, root.split("://", 1)[1]) for p in paths]
            self._bytes = _bytesource.byte_source(store, location=root, storage_options=storage_options)
        else:
            if storage_options:
                raise TypeError(f"storage_options apply to URLs only. Got local tar shards {locs[0]!r}, ...")
            for x in locs:
                if not os.path.isfile(x):
                    raise FileNotFoundError(f"tar shard not found: {x}")
            full = [os.path.abspath(x) for x in locs]
            root = os.path.commonpath([os.path.dirname(p) for p in full])
            rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in full]
            self._bytes = _bytesource.byte_source(_storage.as_store(root, read_only=True))
        self._keys_in = rel
        self.where = locs[0] if len(locs) == 1 else f"{len(locs)} tar shards ({locs[0]} ... {locs[-1]})"
        workers = min(16, len(locs)) if all(remote) else 1
        with ThreadPoolExecutor(max_workers=workers) as ex:
            indexed = list(ex.map(self._index_shard, range(len(locs))))
        self._build(indexed)

    def _index_shard(self, s: int) -> list[tuple[str, str, str, int, int]]:
        """``[(member name, key, kind, offset, size)]`` of shard ``s`` (kind: "image" or "cls"), tar order."""
        loc = self.shards[s]
        fileobj = None if not _storage.is_url(loc) else io.BufferedReader(
            _RangeFile(self._bytes, self._keys_in[s], loc), buffer_size=512)
        out = []
        try:
            with tarfile.open(loc if fileobj is None else None, mode="r:", fileobj=fileobj) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    split = _split_member(m.name)
                    if split is None:
                        continue
                    kind = "image" if split[1] in _TAR_EXT else "cls" if split[1] == "cls" else None
                    if kind is not None:
                        out.append((m.name, split[0], kind, m.offset_data, m.size))
        except tarfile.TarError as e:
            raise ValidationError(f"tar shard {loc} cannot be read as a tar file: {e}") from None
        return out

    def _build(self, indexed: list[list[tuple[str, str, str, int, int]]]) -> None:
        keys: list[str] = []
        shard: list[int] = []
        start: list[int] = []
        size: list[int] = []
        members: list[str] = []
        cls_at: dict[str, tuple[int, int, int, str]] = {}
        first: dict[str, int] = {}
        for s, entries in enumerate(indexed):
            for name, key, kind, off, n in entries:
                if kind == "cls":
                    cls_at[key] = (s, off, n, name)
                    continue
                if key in first:
                    other = self.shards[shard[first[key]]]
                    raise ValidationError(
                        f"tar shards must hold one image per key: key {key!r} has {members[first[key]]!r} in "
                        f"{other} and {name!r} in {self.shards[s]}")
                first[key] = len(keys)
                keys.append(key)
                shard.append(s)
                start.append(off)
                size.append(n)
                members.append(name)
        if not keys:
            raise ValidationError(f"no images found in {self.where} (members <key>.<ext>, ext one of "
                                  f"{', '.join(sorted(_TAR_EXT))})")
        self.keys = keys
        self._shard = np.asarray(shard, np.int32)
        self._start = np.asarray(start, np.int64)
        self._stop = self._start + np.asarray(size, np.int64)
        self._ext = [sys.intern(posixpath.basename(m).split(".", 1)[1]) for m in members]
        if cls_at:
            self.labels, self.classes = self._read_cls(cls_at), []
        else:
            self.labels, self.classes = class_labels(keys)

    def _read_cls(self, cls_at: dict[str, tuple[int, int, int, str]]) -> list[int]:
        wanted = [(k, cls_at[k]) for k in self.keys if k in cls_at]
        blobs = self._bytes.read_ranges([(self._keys_in[s], off, off + n) for _, (s, off, n, _) in wanted])
        value: dict[str, int] = {}
        for (key, (s, _, _, name)), blob in zip(wanted, blobs):
            text = bytes(blob or b"").decode("utf-8", "replace").strip()
            try:
                value[key] = int(text)
            except ValueError:
                raise ValidationError(f"{self.shards[s]}:{name}: a .cls member must hold an integer class index. "
                                      f"Got {text[:40]!r}.") from None
        return [value.get(k, -1) for k in self.keys]

    def name(self, i: int) -> str:
        return f"{self.shards[int(self._shard[i])]}:{self.keys[i]}.{self._ext[i]}"

    def _ref(self, i: int):
        return self._keys_in[int(self._shard[i])], int(self._start[i]), int(self._stop[i])


# --------------------------------------------------------------------------------------------- datasets


class HFSource(ImageSource):
    """A Hugging Face ``datasets.Dataset`` (map-style, e.g. ``load_dataset(..., split="train")``) with an
    ``Image`` column. ``image_column``: default the dataset's only Image feature. ``key_column``: a column
    of unique strings naming the images (default: the row index, keys ``"0"``, ``"1"``, ...).
    ``label_column``: the ground-truth class (default ``"label"`` when it exists, else the only ClassLabel
    feature, else none); a ClassLabel's names become ``classes``. Rows are read in the Arrow format (no
    decoding of other columns); images are decoded here, strictly. ``datasets`` is imported only when a
    dataset is given (``pip install datasets``)."""

    def __init__(self, dataset, *, image_column: str | None = None, key_column: str | None = None,
                 label_column: str | None = None):
        try:
            import datasets  # noqa: PLC0415 - optional dependency, imported only when a dataset is given
        except ImportError as e:  # pragma: no cover - only reached with a datasets object in hand
            raise ImportError(f"a Hugging Face dataset as images needs the datasets package "
                              f"(pip install datasets): {e}") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise TypeError(f"images must be one split of a DatasetDict (e.g. dataset['train']). Got the splits "
                            f"{list(dataset)}.")
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"images must be a map-style datasets.Dataset (random access by row; an "
                            f"IterableDataset has none). Got {type(dataset).__name__}.")
        features = dataset.features
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if image_column is None:
            if len(images) != 1:
                raise ValidationError(f"image_column must name the dataset's image column: it has "
                                      f"{len(images)} Image features ({images}).")
            image_column = images[0]
        elif image_column not in images:
            raise ValidationError(f"image_column must be an Image feature of the dataset ({images}). "
                                  f"Got {image_column!r}.")
        if label_column is None:
            labels_ok = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
            label_column = "label" if "label" in features else (labels_ok[0] if len(labels_ok) == 1 else None)
        elif label_column not in features:
            raise ValidationError(f"label_column must be a column of the dataset ({list(features)}). "
                                  f"Got {label_column!r}.")
        name = getattr(dataset.info, "dataset_name", None) or getattr(dataset.info, "builder_name", None)
        self.where = f"datasets.Dataset {name + ' ' if name else ''}({len(dataset)} rows)"
        arrow = dataset.with_format("arrow")
        if key_column is not None:
            if key_column not in features:
                raise ValidationError(f"key_column must be a column of the dataset ({list(features)}). "
                                      f"Got {key_column!r}.")
            self.keys = [str(k) for k in arrow[key_column].to_pylist()]
        else:
            self.keys = [str(i) for i in range(len(dataset))]
        _check_keys(self.keys, self.where)
        self.classes = []
        if label_column is not None:
            self.labels = [-1 if v is None else int(v) for v in arrow[label_column].to_pylist()]
            if isinstance(features[label_column], datasets.ClassLabel):
                self.classes = list(features[label_column].names)
        else:
            self.labels = [-1] * len(self.keys)
        self.image_column = image_column
        self._rows = arrow

    def name(self, i: int) -> str:
        return f"row {i} (key {self.keys[i]!r}) of {self.where}"

    def _file(self, i: int):
        cell = self._rows[int(i)][self.image_column][0].as_py()
        if cell is None or (cell.get("bytes") is None and not cell.get("path")):
            raise FileNotFoundError(f"image not found: {self.name(i)} has no image")
        return io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]

    def size(self, i: int) -> tuple[int, int]:
        return image_size(self._file(i), name=self.name(i))

    def load(self, i: int) -> Image.Image:
        return load_image(self._file(i), name=self.name(i))


# --------------------------------------------------------------------------------------------- user maps


class MapSource(ImageSource):
    """Any map-style source keyed by image key (the protocol is in the module docstring): ``keys()`` in
    store order, ``obj[key]`` -> a PIL image, encoded bytes or a local path; optional ``size(key)``,
    ``label(key)`` and ``classes``. ``where`` names it in messages."""

    def __init__(self, mapping, *, where: str | None = None):
        if not (callable(getattr(mapping, "keys", None)) and hasattr(mapping, "__getitem__")):
            raise TypeError(f"a map-style image source needs keys() and [key]. Got {type(mapping).__name__}.")
        self.where = where or f"the {type(mapping).__name__} image source"
        self.keys = list(mapping.keys())
        _check_keys(self.keys, self.where)
        label = getattr(mapping, "label", None)
        self.labels = [int(label(k)) for k in self.keys] if callable(label) else [-1] * len(self.keys)
        self.classes = [str(c) for c in (getattr(mapping, "classes", None) or [])]
        self._map = mapping

    def _get(self, i: int):
        key = self.keys[i]
        try:
            value = self._map[key]
        except KeyError:
            raise FileNotFoundError(f"image {key!r} is missing from {self.where}") from None
        if isinstance(value, (bytes, bytearray, memoryview)):
            return io.BytesIO(bytes(value))
        if isinstance(value, (str, os.PathLike, Image.Image)):
            return value
        raise TypeError(f"{self.where}[{key!r}] must be a PIL image, encoded bytes or a file path. "
                        f"Got {type(value).__name__}.")

    def size(self, i: int) -> tuple[int, int]:
        size = getattr(self._map, "size", None)
        if callable(size):
            h, w = size(self.keys[i])
            return int(h), int(w)
        value = self._get(i)
        if isinstance(value, Image.Image):
            return int(value.height), int(value.width)
        return image_size(value, name=self.name(i))

    def load(self, i: int) -> Image.Image:
        value = self._get(i)
        if not isinstance(value, Image.Image):
            return load_image(value, name=self.name(i))
        try:
            value.load()
            return value if value.mode == "RGB" else value.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(f"cannot read image {self.name(i)}: {exc}") from exc


# --------------------------------------------------------------------------------------------- picking one


def _is_tar(loc: str) -> bool:
    return loc.lower().endswith(".tar") or bool(_BRACES.search(loc))


def as_source(images, *, storage_options: Mapping[str, Any] | None = None,
              read_ahead: int | None = None) -> ImageSource:
    """The :class:`ImageSource` for ``images`` (the table in the module docstring). ``storage_options``
    serve a URL (TypeError with anything else); ``read_ahead`` is for remote sources (default
    ``DEFAULT_READ_AHEAD``). A source is returned as it is."""
    if isinstance(images, ImageSource):
        if storage_options:
            raise TypeError("storage_options apply to a URL, not to an image source object (build the source "
                            "with them).")
        return images
    if isinstance(images, ImageList):
        return FileSource(images)
    if type(images).__module__.split(".", 1)[0] == "datasets":
        return HFSource(images)
    if isinstance(images, (str, os.PathLike)):
        loc = os.fspath(images)
        if _storage.is_url(loc):
            if _is_tar(loc):
                return TarSource(loc, storage_options=storage_options, read_ahead=read_ahead)
            return _from_prefix(loc, storage_options, read_ahead)
        if storage_options:
            raise TypeError(f"storage_options apply to URLs only. Got a local path {loc!r}.")
        if _is_tar(loc) and not os.path.isdir(loc):
            return TarSource(loc, read_ahead=read_ahead)
        try:
            return FileSource(loc)
        except ValidationError:
            tars = sorted(f for f in os.listdir(loc) if f.lower().endswith(".tar")) if os.path.isdir(loc) else []
            if not tars:
                raise
            return TarSource([os.path.join(loc, f) for f in tars], read_ahead=read_ahead)
    if isinstance(images, Mapping) or (callable(getattr(images, "keys", None)) and hasattr(images, "__getitem__")
                                       and not isinstance(images, Sequence)):
        return MapSource(images)
    if isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
        locs = [os.fspath(p) if isinstance(p, (str, os.PathLike)) else p for p in images]
        if locs and all(isinstance(x, str) and _is_tar(x) for x in locs):
            return TarSource(locs, storage_options=storage_options, read_ahead=read_ahead)
        if storage_options:
            raise TypeError("storage_options apply to URLs only. Got a list of local files.")
        return FileSource(images)
    raise TypeError(f"images must be a folder, a list of files, a URL, tar shards, a datasets.Dataset, a mapping "
                    f"of key -> image or an ImageSource. Got {type(images).__name__}.")


def _from_prefix(url: str, storage_options, read_ahead) -> ImageSource:
    """A URL prefix: its image objects (:class:`URLSource`), or its ``.tar`` objects when it holds no image."""
    store = _storage.as_store(url.rstrip("/"), read_only=True, storage_options=storage_options)
    listing = _storage.object_sizes(store)
    if not any(is_image_name(k) for k in listing):
        tars = sorted(k for k in listing if k.lower().endswith(".tar"))
        if tars:
            return TarSource([f"{url.rstrip('/')}/{k}" for k in tars], storage_options=storage_options,
                             read_ahead=read_ahead)
    return URLSource(url, storage_options=storage_options, read_ahead=read_ahead, _store=store, _listing=listing)
