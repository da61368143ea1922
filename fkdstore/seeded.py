"""Seeded crops (format 3.0): a store whose ``box`` and ``flip`` are derived from a seed instead of stored.

A seeded store keeps the crop sampler's config in its header (``crop_sampler``) and no ``box``/``flip``
arrays: image ``i``'s boxes and flips are ``CropSampler.sample(i, height_i, width_i, M)`` (the reference
sampler, :class:`fkdstore.transforms.CropSampler`), recomputed on read. That is TinyViT's idea (store the
seed that replays a pipeline) applied to the crop stage: at MS top-5 q8 the box and flip arrays are about a
third of the store.

Derived data cannot be misplaced or stale on disk, and its inputs (the header, ``image_size``) are
checksummed. What is left is the sampler itself: a numpy whose generator streams or float64 rounding differ
would replay other crops than the teacher saw. So the manifest keeps the ``box`` and ``flip`` columns, tagged
by the writer over the boxes and flips the teacher used (:func:`fkdstore.schema.manifest_tag`), and
:class:`SeededCrops` compares them: once per reader before the first derived data is returned, for every
chunk of an epoch read (``read_all``), and in ``verify``. A mismatch raises :class:`CorruptStoreError`.
This module is the one home of that rule; the writer, reader and verify call it.

Cost: one ``CropSampler.sample`` call per image (about 40-70 µs at M = 32-200 on one core), paid per read
instead of reading and decompressing two arrays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import schema as S
from .errors import CorruptStoreError

__all__ = ["SeededCrops"]


class SeededCrops:
    """Derives the ``box`` and ``flip`` rows of a seeded-crops store (``header.seeded``) and checks them
    against the manifest. ``sizes`` is a callable returning the store's ``(N, 2)`` image sizes (read lazily:
    a reader that never touches boxes does not read them)."""

    def __init__(self, header: S.Header, sizes: Callable[[], np.ndarray], where: str = ""):
        from .transforms import CropSampler

        if not header.seeded:
            raise ValueError("SeededCrops needs a seeded-crops (format 3.0) header")
        self.header, self.where = header, where
        self.sampler = CropSampler.from_config(dict(header.crop_sampler))
        self._sizes_fn, self._sizes = sizes, None
        self.checked = False  # set once a derived chunk matched its manifest tags

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_sizes"] = None  # re-read lazily in another process
        return d

    @property
    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            sizes = np.asarray(self._sizes_fn(), dtype=np.int64)
            limit = np.iinfo(self.header.box_dtype).max
            if sizes.size and sizes.max() > limit:  # a derived box must cast exactly (spec 10.2)
                i = int(np.argmax(sizes.max(1)))
                raise CorruptStoreError(
                    f"{self.where}: image {i} has size {sizes[i].tolist()}, beyond the store's box_dtype "
                    f"{self.header.box_dtype!r} (at most {limit}): its seeded crops cannot be derived exactly")
            self._sizes = sizes
        return self._sizes

    def rows(self, idx: np.ndarray, slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(B, M|m, 4)`` (the store's box dtype) and flips ``(B, M|m)`` of images ``idx`` (B,), or of
        slots ``slots`` ((B, m), or (m,) for every image)."""
        h = self.header
        M = h.crops_per_image
        sizes, sample = self.sizes, self.sampler.sample
        B = len(idx)
        box = np.empty((B, M, 4), h.box_dtype)
        flip = np.empty((B, M), bool)
        for b, i in enumerate(np.asarray(idx).tolist()):
            H, W = sizes[i].tolist()
            box[b], flip[b] = sample(i, H, W, M)
        if slots is None:
            return box, flip
        sl = np.asarray(slots)
        if sl.ndim == 1:
            return box[:, sl], flip[:, sl]
        rows = np.arange(B)[:, None]
        return box[rows, sl], flip[rows, sl]

    def chunk_rows(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """``{box, flip}`` rows of images ``[first, stop)`` padded with the fill value to whole inner chunks
        (``first`` a multiple of ``images_per_chunk``): the data the manifest tags cover."""
        h = self.header
        ipc = h.images_per_chunk
        n = -(-(stop - first) // ipc) * ipc
        box, flip = self.rows(np.arange(first, min(stop, h.num_images)))
        pad = n - len(box)
        if pad:
            box = np.concatenate([box, np.full((pad, *box.shape[1:]), S.FILL_VALUE, box.dtype)])
            flip = np.concatenate([flip, np.zeros((pad, *flip.shape[1:]), bool)])
        return {S.BOX: box, S.FLIP: flip}

    def tags(self, first_chunk: int, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Manifest tags of the derived chunks ``first_chunk, ...`` covering ``data`` (from :meth:`chunk_rows`)."""
        ipc = self.header.images_per_chunk
        return {name: S.manifest_tags(name, first_chunk, v, ipc) for name, v in data.items()}

    def check(self, first_chunk: int, data: dict[str, np.ndarray], manifest_rows: np.ndarray,
              columns: dict[str, int], need: np.ndarray | None = None) -> list[str]:
        """Compare the tags of derived chunks ``first_chunk, ...`` (``data`` from :meth:`chunk_rows`) with the
        manifest rows of those chunks (``columns``: manifest column of ``box`` and ``flip``); ``need`` (one
        bool per chunk) limits the check to chunks holding written images. Returns one message per mismatching
        array (empty when they all match)."""
        ipc = self.header.images_per_chunk
        out = []
        for name, tags in self.tags(first_chunk, data).items():
            want = np.asarray(manifest_rows)[:, columns[name]].astype(np.uint32)
            bad = tags != want
            if need is not None:
                bad &= need
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                c = first_chunk + j
                a, b = c * ipc, min(self.header.num_images, (c + 1) * ipc) - 1
                out.append(
                    f"{self.where}: array {name!r} (seeded crops) chunk {c} (images {a}..{b}): the crops this "
                    f"library's sampler derives do not match the manifest tags the writer recorded for the crops "
                    f"the teacher saw ({int(bad.sum())} of {len(bad)} chunks checked differ); this numpy/fkdstore "
                    f"cannot replay this store's crops (sampler {self.header.crop_sampler})")
        return out

    def check_or_raise(self, first_chunk: int, data, manifest_rows, columns, need=None) -> None:
        """:meth:`check`, raising :class:`CorruptStoreError` with the first message; marks the reader checked."""
        problems = self.check(first_chunk, data, manifest_rows, columns, need)
        if problems:
            raise CorruptStoreError(problems[0])
        self.checked = True
