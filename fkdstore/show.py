"""``fkdstore show``: a contact sheet of replayed crops with their soft labels, to look at a store before
training on it. Needs torch (the crops come from :class:`fkdstore.TorchDataset`) and Pillow (default bitmap
font; no font files).

Every tile is exactly the uint8 pixels ``TorchDataset(store, images, normalize=False)`` returns for that
(image, slot): the sheet takes them from a ``TorchDataset(crops_per_sample=1, normalize=False)`` at the
epoch whose slot is that slot (image ``i``'s first ``M`` epochs use its ``M`` slots once each,
:func:`fkdstore.pytorch.epoch_slots`), augmentation and mixing included; no other crop code is involved.
Beside each crop: the image with the crop's box drawn on it, and for a store with mixing policies the
partner image with its box (one panel per mixing policy), then text lines: the image key, the slot, its flip
and box, the ground-truth class, the top-K classes of the soft label with their probabilities (bars), and
per mixing policy the weight of the image's own pixels (``lam``) and the partner's class and weight.

Layout (:class:`SheetLayout`, in pixels, ``(left, top, right, bottom)`` rectangles with right/bottom
exclusive, as :meth:`PIL.Image.Image.crop` takes them): a title band of :data:`TITLE_HEIGHT`, then
``rows x cols`` cells of :attr:`SheetLayout.cell_size`, cell ``n`` at row ``n // cols``, column
``n % cols``. In cell ``n`` at ``(x, y)``: the crop at :meth:`SheetLayout.crop_rect` ``= (x + PAD,
y + PAD, x + PAD + W * zoom, y + PAD + H * zoom)`` holding the ``H x W`` crop with every pixel repeated
``zoom x zoom`` times (nearest-neighbour, so ``tile[::zoom, ::zoom]`` is the crop); the image panel
(:meth:`SheetLayout.image_rect`) to its right, the partner panels after it, the text below.

The saved PNG carries the layout and the shown (image, slot) of each cell in its ``fkdstore-sheet`` text
chunk (JSON); :func:`sheet_info` reads them back, so tiles can be cut out of the file and checked.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from .augment.pipeline import Pipeline
from .augment.replay import mix_weights
from .diagnose import class_name, find_image, read_names
from .errors import IncompleteStoreError, ValidationError
from .images import list_images, load_image
from .plots import fit_text, font
from .reader import Reader, RegionReader, as_regions
from .reader import open as open_store
from .validation import int_in_range, positive_int

if TYPE_CHECKING:  # torch is optional: imported by contact_sheet only
    from .pytorch import TorchDataset

__all__ = ["PAD", "LINE", "TITLE_HEIGHT", "INFO_KEY", "DEFAULT_GRID", "SheetLayout", "choose_cells", "contact_sheet",
           "save_sheet", "write_sheet", "sheet_info", "parse_grid"]

PAD = 6  # margin around and between the parts of a cell
LINE = 12  # text line height (the default bitmap font is 11 px high)
TITLE_HEIGHT = PAD + 2 * LINE + PAD
MIN_CELL_WIDTH = 240  # room for about 38 characters of text
TILE_TARGET = 128  # default zoom: the smallest integer making the crop's longer side >= this (1 for big crops)
DEFAULT_GRID = (4, 4)
INFO_KEY = "fkdstore-sheet"
_BG, _TEXT, _DIM, _LINES = (255, 255, 255), (0, 0, 0), (110, 110, 110), (205, 205, 205)
_BOX, _PARTNER_BOX, _RIGHT, _WRONG, _BAR = (255, 40, 40), (255, 150, 0), (0, 130, 0), (200, 0, 0), (205, 222, 242)


@dataclass(frozen=True, kw_only=True)
class SheetLayout:
    """Where everything of a contact sheet lies (module docstring); all methods return pixel rectangles
    ``(left, top, right, bottom)``, right/bottom exclusive. ``mixing``: number of mixing policies (one partner
    panel and one text line each)."""

    rows: int
    cols: int
    crop_height: int
    crop_width: int
    zoom: int = 1
    top_k: int = 3
    mixing: int = 0

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "crop_height", "crop_width", "zoom", "top_k"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        object.__setattr__(self, "mixing", int_in_range("mixing", self.mixing, 0))

    @property
    def panel(self) -> int:
        """Side of the square image (and partner) panels: the zoomed crop's longer side."""
        return max(self.crop_height, self.crop_width) * self.zoom

    @property
    def text_lines(self) -> int:
        """Key, slot, ground truth, ``top_k`` classes, one line per mixing policy."""
        return 3 + self.top_k + self.mixing

    @property
    def cell_size(self) -> tuple[int, int]:
        """``(width, height)`` of one cell."""
        w = PAD + self.crop_width * self.zoom + (1 + self.mixing) * (PAD + self.panel) + PAD
        h = PAD + max(self.crop_height * self.zoom, self.panel) + PAD + self.text_lines * LINE + PAD
        return max(w, MIN_CELL_WIDTH), h

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the whole sheet."""
        w, h = self.cell_size
        return self.cols * w, TITLE_HEIGHT + self.rows * h

    def _origin(self, n: int) -> tuple[int, int]:
        n = int_in_range("cell", n, 0, self.rows * self.cols - 1)
        w, h = self.cell_size
        return (n % self.cols) * w, TITLE_HEIGHT + (n // self.cols) * h

    def cell_rect(self, n: int) -> tuple[int, int, int, int]:
        """Cell ``n``."""
        x, y = self._origin(n)
        w, h = self.cell_size
        return x, y, x + w, y + h

    def crop_rect(self, n: int) -> tuple[int, int, int, int]:
        """The crop tile of cell ``n``: ``crop_height * zoom`` rows, ``crop_width * zoom`` columns."""
        x, y = self._origin(n)
        return x + PAD, y + PAD, x + PAD + self.crop_width * self.zoom, y + PAD + self.crop_height * self.zoom

    def image_rect(self, n: int) -> tuple[int, int, int, int]:
        """The panel showing the whole image with the crop's box."""
        return self.partner_rect(n, -1)

    def partner_rect(self, n: int, policy: int = 0) -> tuple[int, int, int, int]:
        """The panel of mixing policy ``policy``'s partner image (``-1``: the image panel)."""
        x, y = self._origin(n)
        left = x + PAD + self.crop_width * self.zoom + PAD + (policy + 1) * (self.panel + PAD)
        return left, y + PAD, left + self.panel, y + PAD + self.panel

    def text_origin(self, n: int) -> tuple[int, int]:
        """Top-left corner of cell ``n``'s first text line."""
        x, y = self._origin(n)
        return x + PAD, y + PAD + max(self.crop_height * self.zoom, self.panel) + PAD

    def tile_rects(self) -> list[tuple[int, int, int, int]]:
        """:meth:`crop_rect` of every cell, in cell order."""
        return [self.crop_rect(n) for n in range(self.rows * self.cols)]

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SheetLayout:
        return cls(**{k: d[k] for k in ("rows", "cols", "crop_height", "crop_width", "zoom", "top_k", "mixing")})


def parse_grid(grid: Any) -> tuple[int, int]:
    """``(rows, cols)`` from ``"RxC"`` (e.g. ``"3x5"``) or a pair of positive integers."""
    if isinstance(grid, str):
        parts = grid.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValidationError(f"grid must be 'ROWSxCOLS', e.g. '4x4'. Got {grid!r}.")
        grid = tuple(int(p) for p in parts)
    try:
        rows, cols = grid
    except (TypeError, ValueError):
        raise ValidationError(f"grid must be 'ROWSxCOLS' or a (rows, cols) pair. Got {grid!r}.") from None
    return positive_int("grid rows", rows), positive_int("grid cols", cols)


def choose_cells(written: Sequence[int] | np.ndarray, crops_per_image: int, count: int, *,
                 images: Sequence[int] | None = None, slots: Sequence[int] | None = None,
                 seed: int = 0) -> list[tuple[int, int]]:
    """The ``(image index, slot)`` of up to ``count`` cells, deterministic for ``seed``.

    Images: ``images`` (in order), else a seeded random order of ``written``, as many as needed (each
    image gives ``len(slots)`` cells, or one, or more when there are fewer written images than cells).
    Slots of each image: ``slots``, else ``ceil(count / images)`` distinct random slots (at most ``M``).
    Cells are image-major (an image's slots side by side), cut at ``count``."""
    M = positive_int("crops_per_image", crops_per_image)
    count = positive_int("count", count)
    rng = np.random.default_rng(np.random.SeedSequence([int_in_range("seed", seed, 0), 0x5EE]))
    if slots is not None:
        slots = [int_in_range(f"slot (of {M} per image)", s, 0, M - 1) for s in slots]
        if not slots:
            raise ValidationError("slots must name at least one slot. Got an empty list.")
    if images is None:
        pool = rng.permutation(np.asarray(written, np.int64))
        per = len(slots) if slots is not None else min(M, max(1, math.ceil(count / max(len(pool), 1))))
        images = pool[: math.ceil(count / per)].tolist()
    images = [int(i) for i in images]
    if not images:
        return []
    per = min(M, math.ceil(count / len(images)))
    cells: list[tuple[int, int]] = []
    for i in images:
        chosen = slots if slots is not None else rng.choice(M, size=per, replace=False).tolist()
        cells.extend((i, int(s)) for s in chosen)
    return cells[:count]


def _names(names, listing, meta: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """Class names: ``names`` (a file path or a sequence), else the image folder's classes, else
    ``meta["classes"]``; None when none is known."""
    if names is not None:
        out = read_names(names) if isinstance(names, (str, os.PathLike)) else [str(n) for n in names]
        if len(out) < num_classes:
            where = f" in {os.fspath(names)}" if isinstance(names, (str, os.PathLike)) else ""
            raise ValidationError(f"names must name every one of the store's {num_classes} classes (one per line). "
                                  f"Got {len(out)}{where}.")
        return out
    if listing.classes:
        return list(listing.classes)
    classes = meta.get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def _panel(sheet: Image.Image, draw: ImageDraw.ImageDraw, rect, image: Image.Image, box, colour) -> None:
    """``image`` scaled to fit ``rect`` (centred), with ``box`` (top, left, height, width) outlined."""
    x0, y0, x1, y1 = rect
    W, H = image.size
    s = min((x1 - x0) / W, (y1 - y0) / H)
    w, h = max(1, round(W * s)), max(1, round(H * s))
    thumb = image.resize((w, h), Image.Resampling.NEAREST if s >= 1 else Image.Resampling.BILINEAR)
    ox, oy = x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2
    sheet.paste(thumb, (ox, oy))
    top, left, bh, bw = (int(v) for v in box)
    draw.rectangle([ox + left * s, oy + top * s, ox + (left + bw) * s - 1, oy + (top + bh) * s - 1], outline=colour,
                   width=2)


def _draw_labels(draw: ImageDraw.ImageDraw, at: tuple[int, int], width: int, head: list[tuple[str, tuple]],
                 soft: np.ndarray, target: int, top_k: int, names: list[str] | None) -> None:
    """A cell's text: the two ``head`` lines, the ground truth (green when it is the top-1 class, red when
    not), then the ``top_k`` classes of ``soft`` with their probabilities over bars of that length."""
    tx, ty = at
    soft = np.asarray(soft, np.float64)
    order = np.argsort(-soft, kind="stable")[:top_k].tolist()
    truth = (f"truth: {class_name(target, names)}", _DIM if target < 0 else _RIGHT if order[0] == target else _WRONG)
    for k, (text, colour) in enumerate([*head, truth]):
        draw.text((tx, ty + k * LINE), fit_text(draw, text, width), fill=colour, font=font())
    for k, c in enumerate(order):
        y = ty + (3 + k) * LINE
        p = float(soft[c])
        draw.rectangle([tx, y, tx + max(0.0, p) * width, y + LINE - 2], fill=_BAR)
        ptext = f"{p:.3f}"
        pw = draw.textlength(ptext, font=font())
        colour = _RIGHT if c == target else _TEXT
        draw.text((tx + 2, y), fit_text(draw, f"{k + 1}. {class_name(c, names)}", width - pw - 8), fill=colour,
                  font=font())
        draw.text((tx + width - pw, y), ptext, fill=colour, font=font())


def contact_sheet(store, images, *, grid: Any = None, keys: Sequence[str | int] | None = None,
                  slots: Sequence[int] | None = None, seed: int = 0, names=None, top_k: int = 3,
                  zoom: int | None = None, storage_options: Mapping[str, Any] | None = None) -> Image.Image:
    """A contact sheet (RGB PIL image) of replayed crops with their labels; see the module docstring.

    Args:
        store: a store folder, URL or opened :class:`fkdstore.Reader`.
        images: the image source the store was made from (a folder or file list, as :class:`TorchDataset`).
        grid: ``(rows, cols)`` or ``"RxC"``; default 4 x 4, or fewer cells when fewer are asked for.
        keys: images to show (store keys or indices; :func:`fkdstore.diagnose.find_image`); default random
            written images.
        slots: slots to show of each image; default random ones (:func:`choose_cells`).
        seed: seed of the random choices.
        names: class names: a text file (one per line, line ``c`` names class ``c``) or a sequence; default
            the image folder's class folders, else the store's ``meta["classes"]``, else class indices.
        top_k: classes listed per crop.
        zoom: integer pixel repetition of the crops (default: the smallest making the longer side >= 128 px).

    The returned image's ``info["fkdstore-sheet"]`` holds the layout and cells as JSON (:func:`sheet_info`);
    :func:`save_sheet` keeps it in the PNG.
    """
    from .pytorch import TorchDataset  # noqa: PLC0415 - torch is optional; show's other commands run without it

    reader = store if isinstance(store, Reader) else open_store(store, storage_options=storage_options)
    ds = TorchDataset(reader, images, crops_per_sample=1, normalize=False, allow_incomplete=True)
    listing = list_images(images)  # TorchDataset checked that its keys are the store's, in order
    regions = as_regions(reader)
    M, C = regions.crops_per_image, regions.num_classes
    top_k = min(positive_int("top_k", top_k), C)
    cells, rows, cols = _cells(regions, ds.image_indices, grid, keys, slots, seed)
    H, W = ds.output_size
    zoom = max(1, math.ceil(TILE_TARGET / max(H, W))) if zoom is None else positive_int("zoom", zoom)
    layout = SheetLayout(rows=rows, cols=cols, crop_height=H, crop_width=W, zoom=zoom, top_k=top_k,
                         mixing=len(ds.augment.mixing) if ds.augment is not None else 0)
    sheet = Image.new("RGB", layout.size, _BG)
    painter = _Painter(sheet=sheet, draw=ImageDraw.Draw(sheet), layout=layout, reader=regions, dataset=ds,
                       paths=listing.paths, names=_names(names, listing, reader.meta or {}, C))
    codec = regions.codec.get_config()
    painter.frame([f"fkdstore show: {reader.path}",
                   f"{codec['name']}{' K=' + str(codec['k']) if 'k' in codec else ''}, {reader.num_images} images "
                   f"x {M} crops, {C} classes; crops as TorchDataset(normalize=False) returns them, {H}x{W} px "
                   f"shown at {zoom}x; seed {seed}"])
    item_of = {int(i): k for k, i in enumerate(ds.image_indices.tolist())}
    shown = [painter.cell(n, i, s, item_of[i]) for n, (i, s) in enumerate(cells)]
    sheet.info[INFO_KEY] = json.dumps({"format": INFO_KEY, "version": 1, "layout": layout.to_json(),
                                       "cells": shown, "store": reader.path, "seed": seed})
    return sheet


def _cells(reader: RegionReader, written: np.ndarray, grid: Any, keys: Sequence[str | int] | None,
           slots: Sequence[int] | None, seed: int) -> tuple[list[tuple[int, int]], int, int]:
    """:func:`contact_sheet`'s cells (:func:`choose_cells` among the ``written`` images) and grid ``(rows,
    cols)``; :class:`IncompleteStoreError` when there is nothing to show or an image asked for is not written."""
    wanted = None if keys is None else [find_image(reader, k) for k in keys]
    if grid is not None:
        rows, cols = parse_grid(grid)
        count = rows * cols
    else:
        count = len(wanted) * len(slots) if wanted is not None and slots is not None else math.prod(DEFAULT_GRID)
    cells = choose_cells(written, reader.crops_per_image, count, images=wanted, slots=slots, seed=seed)
    if not cells:
        raise IncompleteStoreError(f"store {reader.path} has no written image to show")
    is_written = set(written.tolist())
    for i, _ in cells:
        if i not in is_written:
            raise IncompleteStoreError(f"image {i} ({reader.image_key(i)!r}) is not written in store {reader.path}")
    if grid is None:
        cols = min(DEFAULT_GRID[1], len(cells))
        rows = math.ceil(len(cells) / cols)
    return cells, rows, cols


@dataclass(frozen=True, kw_only=True)
class _Painter:
    """What the cells of one contact sheet are drawn with: the sheet, its layout, the store, the
    ``TorchDataset(crops_per_sample=1, normalize=False)`` giving the crops, the source images' ``paths`` and
    the class names; a few decoded source images are kept for the image and partner panels."""

    sheet: Image.Image
    draw: ImageDraw.ImageDraw
    layout: SheetLayout
    reader: RegionReader
    dataset: TorchDataset
    paths: Sequence[str]
    names: list[str] | None
    decoded: dict[int, Image.Image] = field(default_factory=dict)

    def frame(self, title: list[str]) -> None:
        """The title lines and the grid lines between the cells."""
        draw, layout = self.draw, self.layout
        for k, text in enumerate(title):
            draw.text((PAD, PAD + k * LINE), fit_text(draw, text, layout.size[0] - 2 * PAD), fill=_TEXT, font=font())
        cw, ch = layout.cell_size
        for c in range(1, layout.cols):
            draw.line([(c * cw, TITLE_HEIGHT), (c * cw, layout.size[1])], fill=_LINES)
        for r in range(layout.rows):
            draw.line([(0, TITLE_HEIGHT + r * ch), (layout.size[0], TITLE_HEIGHT + r * ch)], fill=_LINES)

    def image(self, i: int) -> Image.Image:
        """Source image ``i``, decoded (a few at a time are kept)."""
        if i not in self.decoded:
            if len(self.decoded) > 8:
                self.decoded.clear()
            self.decoded[i] = load_image(self.paths[i])
        return self.decoded[i]

    def item(self, i: int, s: int, k: int) -> dict[str, Any]:
        """The dataset's item ``k`` (image ``i``) at the epoch whose one slot is ``s``."""
        from .pytorch import epoch_slots  # noqa: PLC0415 - torch is optional; show's other commands run without it

        ds, M = self.dataset, self.reader.crops_per_image
        ds.set_epoch(int(np.flatnonzero(epoch_slots(i, 0, M, M, ds.seed) == s)[0]))
        item = ds[k]
        if not isinstance(item, dict):  # pragma: no cover - contact_sheet's dataset gives dict items
            raise TypeError(f"TorchDataset must return dict items here. Got {type(item).__name__}.")
        if int(item["slots"][0]) != s:  # pragma: no cover - the epoch rule guarantees it
            raise RuntimeError(f"TorchDataset returned slot {int(item['slots'][0])} for image {i}, not {s}")
        return item

    def cell(self, n: int, i: int, s: int, k: int) -> dict[str, Any]:
        """Cell ``n``: slot ``s`` of image ``i`` (the dataset's item ``k``); returns its ``cells`` entry."""
        layout, reader, zoom = self.layout, self.reader, self.layout.zoom
        item = self.item(i, s, k)
        crop = item["crops"][0].permute(1, 2, 0).numpy()
        x0, y0, _, _ = layout.crop_rect(n)
        self.sheet.paste(Image.fromarray(np.repeat(np.repeat(crop, zoom, 0), zoom, 1)), (x0, y0))
        rec = reader.read(i, [s])
        _panel(self.sheet, self.draw, layout.image_rect(n), self.image(i), rec.box[0], _BOX)
        tx, ty = layout.text_origin(n)
        key_line = (reader.image_key(i), _TEXT)
        where = (f"slot {s}, {'flipped' if rec.flip[0] else 'not flipped'}, box {int(rec.box[0, 2])}x"
                 f"{int(rec.box[0, 3])} at ({int(rec.box[0, 0])}, {int(rec.box[0, 1])})", _DIM)
        _draw_labels(self.draw, (tx, ty), layout.cell_size[0] - 2 * PAD, [key_line, where],
                     item["soft_labels"][0].numpy(), int(item["target"]), layout.top_k, self.names)
        if self.dataset.augment is not None and self.dataset.augment.mixing:
            self.partners(n, s, item, rec.aug, self.dataset.augment)
        return {"index": i, "key": reader.image_key(i), "slot": s}

    def partners(self, n: int, s: int, item: dict[str, Any], aug: Mapping[str, np.ndarray],
                 pipeline: Pipeline) -> None:
        """Cell ``n``'s partner panels and text lines, one per mixing policy of ``pipeline`` (partner images
        from the slot's params ``aug``, weights from the dataset's ``item``)."""
        draw, layout = self.draw, self.layout
        tx, ty = layout.text_origin(n)
        width = layout.cell_size[0] - 2 * PAD
        _, pidx, _ = mix_weights(pipeline, aug, self.dataset.output_size)  # partner images (weights: the item's)
        for q, pol in enumerate(pipeline.mixing):
            j = int(pidx[0, q])
            rect = layout.partner_rect(n, q)
            if j < 0:
                draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=(240, 240, 240))
                draw.text((rect[0] + 4, rect[1] + 4), f"{pol.name}: not mixed", fill=_DIM, font=font())
                text = f"{pol.name}: not mixed"
            else:
                _panel(self.sheet, draw, rect, self.image(j), self.reader.read(j, [s]).box[0], _PARTNER_BOX)
                text = (f"{pol.name}: lam {float(item['lam'][0]):.2f} own, partner "
                        f"{class_name(int(item['partner_target'][0, q]), self.names)} "
                        f"{float(item['partner_weight'][0, q]):.2f}")
            draw.text((tx, ty + (3 + layout.top_k + q) * LINE), fit_text(draw, text, width), fill=_TEXT, font=font())


def save_sheet(sheet: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``sheet`` as PNG with its ``fkdstore-sheet`` text chunk (layout and cells); returns the path."""
    info = PngInfo()
    if INFO_KEY in sheet.info:
        info.add_text(INFO_KEY, sheet.info[INFO_KEY])
    path = Path(path)
    sheet.save(path, format="PNG", pnginfo=info)
    return path


def write_sheet(store, images, out: str | os.PathLike, **kwargs) -> Path:
    """:func:`contact_sheet` saved as the PNG ``out`` (keyword arguments as there); returns the path."""
    return save_sheet(contact_sheet(store, images, **kwargs), out)


def sheet_info(sheet: Image.Image | str | os.PathLike) -> tuple[SheetLayout, list[dict[str, Any]]]:
    """The layout and the cells (``{index, key, slot}``, in cell order) of a sheet made by
    :func:`contact_sheet`, from the image or its saved PNG."""
    if not isinstance(sheet, Image.Image):
        with Image.open(sheet) as img:
            info = dict(img.info)
    else:
        info = sheet.info
    raw = info.get(INFO_KEY)
    if raw is None:
        raise ValidationError(f"a contact sheet must carry the {INFO_KEY!r} PNG text chunk (fkdstore show writes "
                              f"it). Got none.")
    d = json.loads(raw)
    return SheetLayout.from_json(d["layout"]), list(d["cells"])
