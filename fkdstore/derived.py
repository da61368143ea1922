"""Derived record arrays: the ``box`` and ``flip`` of a seeded-crops store, re-derived from the header's
:class:`~fkdstore.seeded.SlotCropSampler` and ``image_size`` on read, and checked against the manifest tags
the writer recorded over the crops the teacher saw (spec section 10.2). The one home of that rule: the
writer, reader and verify call :class:`SeededCrops`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import schema as S
from .errors import CorruptStoreError, ValidationError

__all__ = ["SeededCrops", "NoDerivedArrays", "derivation", "DERIVE_PAIRS"]

DERIVE_PAIRS = 2**17  # SeededCrops derives at most this many (image, slot) pairs per sampler call


class SeededCrops:
    """Derives the ``box`` and ``flip`` values of a seeded-crops store (``header.seeded``) and checks them
    against the manifest. ``sizes(idx)`` returns the ``(B, 2)`` image sizes of images ``idx`` (read lazily,
    and checked against their tags by the reader: a reader that never touches boxes does not read them)."""

    def __init__(self, header: S.Header, sizes: Callable[[np.ndarray], np.ndarray], where: str = ""):
        if not header.seeded or header.sampler is None:
            raise ValueError("SeededCrops needs a seeded-crops header")
        self.header, self.where = header, where
        self.sampler = header.sampler
        self._sizes_of = sizes
        self._limit = np.iinfo(header.box_dtype).max
        self.checked = False  # set by the reader once a derived chunk matched its manifest tags

    def sizes(self, idx: np.ndarray) -> np.ndarray:
        """``(B, 2)`` int64 sizes of images ``idx``; a side beyond ``box_dtype`` cannot be derived exactly
        (spec 10.2): :class:`CorruptStoreError` naming the image."""
        sizes = np.asarray(self._sizes_of(idx), dtype=np.int64).reshape(-1, 2)
        if sizes.size and sizes.max() > self._limit:
            j = int(np.argmax(sizes.max(1)))
            raise CorruptStoreError(
                f"{self.where}: image {int(np.asarray(idx).reshape(-1)[j])} has size {sizes[j].tolist()}, beyond "
                f"the store's box_dtype {self.header.box_dtype!r} (at most {self._limit}): its seeded crops cannot "
                f"be derived exactly")
        return sizes

    names = (S.BOX, S.FLIP)

    def rows(self, idx: np.ndarray, slots: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{box: (B, M|m, 4) (the store's box dtype), flip: (B, M|m)}`` of images ``idx`` (B,): every slot,
        or ``slots`` ((B, m), or (m,) for every image). Only the asked slots are derived."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        M = self.header.crops_per_image
        sl = np.broadcast_to(np.arange(M), (len(idx), M)) if slots is None else np.asarray(slots, np.int64)
        if sl.ndim == 1:
            sl = np.broadcast_to(sl, (len(idx), len(sl)))
        hw = self.sizes(idx)
        m = sl.shape[1]
        box = np.empty((len(idx), m, 4), self.header.box_dtype)
        flip = np.empty((len(idx), m), bool)
        step = max(1, DERIVE_PAIRS // max(m, 1))  # bounded temporaries (the sampler's are ~100 B per pair)
        for a in range(0, len(idx), step):
            b = slice(a, a + step)
            box[b], flip[b] = self.sampler.sample_slots(idx[b, None], sl[b], hw[b, 0:1], hw[b, 1:2])
        return {S.BOX: box, S.FLIP: flip}

    def given(self, idx: np.ndarray, values: dict[str, object]) -> dict[str, np.ndarray]:
        """What a writer stores for images ``idx``: the sampler's boxes and flips. Values given by the caller
        (``values[box]``, ``values[flip]``: the crops the teacher saw; None = not given) must equal them:
        ValidationError naming the image and slot otherwise, before anything is buffered."""
        want = self.rows(idx)
        M = self.header.crops_per_image
        for name, what in ((S.BOX, "boxes"), (S.FLIP, "flips")):
            given = values.get(name)
            if given is None:
                continue
            given = np.asarray(given)
            if given.shape != want[name].shape:
                raise ValidationError(f"{what} must have shape {want[name].shape} (or be None: seeded crops). "
                                      f"Got shape {given.shape}.")
            diff = given.astype(np.int64) != want[name].astype(np.int64)
            if diff.any():
                b, m = (int(x) for x in np.argwhere(diff.reshape(len(idx), M, -1).any(-1))[0])
                raise ValidationError(
                    f"this store has seeded crops: {what} must be the crop sampler's "
                    f"({self.sampler.get_config()}) or None. Image {int(idx[b])} slot {m} has "
                    f"{given[b, m].tolist()}, the sampler gives {want[name][b, m].tolist()}.")
        return want

    def chunk_rows(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """``{box, flip}`` rows of images ``[first, stop)`` padded with the fill value to whole inner chunks
        (``first`` a multiple of ``images_per_chunk``): the data the manifest tags cover."""
        h = self.header
        ipc = h.images_per_chunk
        n = -(-(stop - first) // ipc) * ipc
        rows = self.rows(np.arange(first, min(stop, h.num_images)))
        box, flip = rows[S.BOX], rows[S.FLIP]
        pad = n - len(box)
        if pad:
            box = np.concatenate([box, np.full((pad, *box.shape[1:]), S.FILL_VALUE, box.dtype)])
            flip = np.concatenate([flip, np.zeros((pad, *flip.shape[1:]), bool)])
        return {S.BOX: box, S.FLIP: flip}

    def tags(self, first_chunk: int, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Manifest tags of the derived chunks ``first_chunk, ...`` covering ``data`` (from :meth:`chunk_rows`)."""
        ipc = self.header.images_per_chunk
        prefix = self.header.tag_prefix
        return {name: S.manifest_tags(name, first_chunk, v, ipc, prefix) for name, v in data.items()}

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
                    f"the teacher saw ({int(bad.sum())} of {len(bad)} chunks checked differ); this fkdstore "
                    f"cannot replay this store's crops (sampler {self.sampler.get_config()})")
        return out


class NoDerivedArrays:
    """The derivation of a store that derives nothing (stored crops, label maps): the same interface as
    :class:`SeededCrops`, with no arrays, so readers and writers treat both alike."""

    names: tuple[str, ...] = ()
    checked = True

    def rows(self, idx: np.ndarray, slots: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {}

    def given(self, idx: np.ndarray, values: dict[str, object]) -> dict[str, np.ndarray]:
        return {}

    def chunk_rows(self, first: int, stop: int) -> dict[str, np.ndarray]:
        return {}

    def check(self, first_chunk: int, data: dict[str, np.ndarray], manifest_rows: np.ndarray,
              columns: dict[str, int], need: np.ndarray | None = None) -> list[str]:
        return []


def derivation(header: S.Header, sizes: Callable[[np.ndarray], np.ndarray], where: str = ""):
    """The derived arrays of a store (chosen once, at open): :class:`SeededCrops` for seeded crops, else
    :class:`NoDerivedArrays`. ``sizes(idx)``: image sizes of images ``idx``."""
    return SeededCrops(header, sizes, where) if header.seeded else NoDerivedArrays()
