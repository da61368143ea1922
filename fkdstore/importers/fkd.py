"""Import FKD's release files (szq0214/FKD: one ``torch.save`` per image, ``<root>/<class>/<stem>.tar``
holding ``[coords, flip, labels]``) into a store, with FKD's own crop replay rule (:func:`fkd_boxes`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import codecs as _codecs
from .. import progress as _progress
from .. import storage as _storage
from .. import writer as _writer
from ..codecs import conversion_problem, convert_fields
from ..errors import ConversionError, ValidationError
from ..images import ImageList, list_images
from ..output import MADE_BY, check_options, history_record, made_by, open_destination, remove_on_error
from ..report import storage_stats
from . import _zoo, safe_pickle

__all__ = ["import_fkd", "load_fkd_file", "fkd_boxes", "FKD_SUFFIXES"]

FKD_SUFFIXES = (".pth.tar", ".tar")


def load_fkd_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> list:
    """Load one FKD label file (``torch.save`` of ``[coords, flip, labels]``) as a list of numpy arrays, through
    :func:`fkdstore.importers.safe_pickle.load` (no code from the file runs unless ``trust_pickle``)."""
    obj = safe_pickle.load(path, what="FKD label file", trust_pickle=trust_pickle)
    if not isinstance(obj, (list, tuple)) or len(obj) < 3:
        raise ValidationError(f"FKD label file {path} must hold a list [coords, flip, labels]. "
                              f"Got {type(obj).__name__}.")
    return [x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in obj[:3]]


def fkd_boxes(coords: np.ndarray, height: int, width: int) -> np.ndarray:
    """FKD's normalised ``(i/H, j/W, h/H, w/W)`` -> integer ``(top, left, height, width)``, FKD's replay rule.

    FKD multiplies each coordinate (as a Python float) by the image size and calls torchvision's
    ``resized_crop``, i.e. Pillow's ``crop((j, i, j + w, i + h))``, which rounds each edge with Python's
    ``round`` (half to even): ``left = round(j)``, ``top = round(i)``, ``right = round(j + w)``,
    ``bottom = round(i + h)``. ``numpy.rint`` on float64 is the same rounding.
    """
    c = np.asarray(coords).astype(np.float64)
    i, j = c[..., 0] * height, c[..., 1] * width
    h, w = c[..., 2] * height, c[..., 3] * width
    top, left = np.rint(i), np.rint(j)
    bottom, right = np.rint(i + h), np.rint(j + w)
    return np.stack([top, left, bottom - top, right - left], -1).astype(np.int64)


def _clamp_boxes(b: np.ndarray, H: int, W: int) -> tuple[np.ndarray, int]:
    """Clip boxes into the image, keeping at least 1 pixel; returns (boxes, how many changed)."""
    top = np.clip(b[:, 0], 0, H - 1)
    left = np.clip(b[:, 1], 0, W - 1)
    bottom = np.clip(b[:, 0] + b[:, 2], top + 1, H)
    right = np.clip(b[:, 1] + b[:, 3], left + 1, W)
    out = np.stack([top, left, bottom - top, right - left], -1)
    return out, int((out != b).any(-1).sum())


def _label_kind(labels: np.ndarray, path) -> tuple[str, int]:
    if labels.ndim == 3 and labels.shape[1] == 2:
        return "topk", int(labels.shape[2])
    if labels.ndim == 2 and labels.shape[1] == 2:
        return "smoothing", 1
    if labels.ndim == 1:
        return "hard", 1
    raise ValidationError(f"FKD labels in {path} must have shape (M, 2, K), (M, 2) or (M,). Got {labels.shape}.")


def _file_fields(labels: np.ndarray, kind: str, path) -> dict[str, np.ndarray]:
    """FKD labels -> source-codec fields with float64 indices checked integral."""
    if kind == "topk":
        idx, p = labels[:, 0, :], labels[:, 1, :]
    elif kind == "smoothing":
        idx, p = labels[:, 0], labels[:, 1]
    else:
        idx, p = labels, None
    idxf = np.asarray(idx, dtype=np.float64)
    if not np.isfinite(idxf).all() or (idxf != np.round(idxf)).any() or (idxf < 0).any():
        bad = idxf[(idxf != np.round(idxf)) | (idxf < 0)][:3].tolist()
        raise ValidationError(f"FKD labels in {path}: class indices must be non-negative integers. Got {bad}.")
    out = {"indices": idxf.astype(np.int64)}
    if p is not None:
        out["probs"] = np.asarray(p, dtype=np.float32)
    return out


def _source_codec(kind: str, k: int) -> _codecs.LabelCodec:
    if kind == "topk":
        return _codecs.MarginalSmoothing(k=k, dtype="float32")
    if kind == "smoothing":
        return _codecs.Smoothing(dtype="float32")
    return _codecs.Hard()


def _flags(kind: str, k: int, dtype: np.dtype, dst_codec: _codecs.LabelCodec) -> list[str]:
    """Where the replayed pixels or labels can differ from FKD's loader (spec section 9.1's ``flags``)."""
    flags = ["crops whose box (Pillow's edge rounding of coords * image size) reaches outside the image are clipped "
             "to it (FKD's loader pads them with black); the import's summary counts them (boxes_clamped)"]
    exact: _codecs.LabelCodec | None = None  # the codec holding the files' labels bit for bit
    if kind == "hard":
        exact = _codecs.Hard()
    elif dtype in (np.float16, np.float32):
        exact = _codecs.MarginalSmoothing(k=k, dtype=str(dtype)) if kind == "topk" else \
            _codecs.Smoothing(dtype=str(dtype))
    if dst_codec != exact:
        what = {"topk": f"top-{k} probabilities", "smoothing": "top-1 probabilities (smoothing)",
                "hard": "hard labels"}[kind]
        flags.append(f"labels: the files' {what} ({dtype}) are stored as {dst_codec!r}")
    return flags


def _scan_fkd(src: Path) -> dict[tuple[str, str], Path]:
    files: dict[tuple[str, str], Path] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for f in sorted(filenames):
            suf = next((s for s in FKD_SUFFIXES if f.endswith(s)), None)
            if suf is None:
                continue
            p = Path(dirpath) / f
            key = (p.parent.name if p.parent != src else "", f[: -len(suf)])
            if key in files:
                raise ValidationError(
                    f"label files {files[key]} and {p} both belong to image {key[0]}/{key[1]}; point SRC at one "
                    f"split folder (e.g. <root>/train)")
            files[key] = p
    return files


def import_fkd(src: str | os.PathLike, dst: str | os.PathLike, images: str | os.PathLike, *,
               codec: str | None = None, k: int | None = None, num_classes: int | None = None,
               trust_pickle: bool = False, batch: int = 256, progress: bool | None = None,
               log: Callable[[str], None] | None = None,
               storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import FKD's release layout (``<src>/<class>/<stem>.tar`` or ``.pth.tar``) into a new store ``dst``
    (a folder, or a URL with ``storage_options``; ``src`` and ``images`` are local folders).

    ``images`` is the image folder the labels were made from (``<images>/<class>/<stem>.<ext>``); a label
    file matches the image with the same class folder and stem. Images without a label file are left out
    (counted in the result); a label file without an image is an error. ``codec`` defaults to what the files
    hold (``ms`` for top-K, ``smoothing``, ``hard``); ``ms``/``mr`` take the files' K unless ``k`` is smaller.
    ``num_classes`` defaults to the largest stored class index + 1, which costs an extra pass over the files
    and is wrong when the top classes never reach the last one: pass it (1000 for ImageNet-1K).
    Ground-truth labels are stored when the image folder has exactly ``num_classes`` class folders
    (the ImageFolder order), else -1.

    Returns ``{files, images, images_without_labels, crops_per_image, num_classes, codec, coords_dtype,
    boxes_clamped, bytes_before, bytes_after}``.
    """
    check_options(storage_options, dst)
    src = Path(src)
    files = _label_files(src)
    imgs = list_images(images)
    chosen, label_files = _match_images(files, imgs, images)
    dst_store = _storage.as_store(dst, read_only=False, storage_options=storage_options)
    layout = _layout_of(label_files[0], trust_pickle)
    src_codec, dst_codec = _codecs_of(layout, codec, k)
    load = functools.partial(_load_like, layout=layout, trust_pickle=trust_pickle)
    if num_classes is None:
        num_classes = _largest_class(label_files, load, progress) + 1
        if log:
            log(f"num_classes = {num_classes} (largest stored class index + 1; pass --num-classes to set it)")
    num_classes = int(num_classes)
    sizes = _zoo.image_sizes(imgs.paths[n] for n in chosen)
    meta_import = _meta_import(src, len(label_files), layout, dst_codec)
    record = made_by("import-fkd", **{"import": meta_import, "to": dst_codec.get_config(), "num_classes": num_classes})
    meta: dict[str, Any] = {
        "import": meta_import,
        "history": [history_record("import-fkd", source=str(src.resolve()), to=dst_codec.get_config(),
                                   images=len(label_files))],
        MADE_BY: record,
    }
    open_destination(dst, dst_store, record)  # this import's own interrupted output is continued
    N = len(label_files)
    with remove_on_error(dst_store), _writer.write(
        dst_store, num_images=N, crops_per_image=layout.crops, num_classes=num_classes, codec=dst_codec,
        image_keys=[imgs.keys[n] for n in chosen], image_sizes=sizes,
        labels=_zoo.folder_labels(imgs, num_classes, chosen), meta=meta,
    ) as w:
        clamped = _copy_records(w, label_files, sizes, load, src_codec, dst_codec, num_classes, batch=batch,
                                progress=progress)
    return {
        "files": N, "images": N, "images_without_labels": len(imgs) - N, "crops_per_image": layout.crops,
        "num_classes": num_classes, "codec": dst_codec.get_config(), "coords_dtype": str(layout.coords_dtype),
        "boxes_clamped": clamped, "bytes_before": _zoo.source_bytes(label_files),
        "bytes_after": storage_stats(dst_store)["_total"]["bytes"],
    }


# --------------------------------------------------------------------------------------------- the steps

def _label_files(src: Path) -> dict[tuple[str, str], Path]:
    """The label files under ``src`` by ``(class folder, stem)`` (at least one)."""
    if not src.is_dir():
        raise FileNotFoundError(f"FKD label folder not found: {src}")
    files = _scan_fkd(src)
    if not files:
        raise ValidationError(f"no FKD label files ({', '.join(FKD_SUFFIXES)}) found under {src}")
    return files


def _match_images(files: dict[tuple[str, str], Path], imgs: ImageList, images) -> tuple[list[int], list[Path]]:
    """``(listing positions of the images with a label file, ascending; their label files)``: a file matches
    the image of the same class folder and stem; a file without an image is refused."""
    by_key = {}
    for n, key in enumerate(imgs.keys):
        kp = Path(key)
        by_key[(kp.parent.name, kp.name[: -len(kp.suffix)] if kp.suffix else kp.name)] = n
    orphans = [files[key] for key in files if key not in by_key]
    if orphans:
        raise ValidationError(
            f"{len(orphans)} label files have no image in {images} (matched by class folder and stem), "
            f"e.g. {[str(p) for p in orphans[:3]]}")
    chosen = sorted(by_key[key] for key in files)
    inv = {by_key[key]: files[key] for key in files}
    return chosen, [inv[n] for n in chosen]


@dataclass(frozen=True, kw_only=True)
class _Layout:
    """What the first label file says every file holds: ``crops`` (M), the label ``kind`` and its ``k``, the
    labels' ``shape`` and the dtypes of coords and labels."""

    crops: int
    kind: str
    k: int
    shape: tuple[int, ...]
    coords_dtype: np.dtype
    labels_dtype: np.dtype


def _layout_of(path: Path, trust_pickle: bool) -> _Layout:
    """The :class:`_Layout` of the label file ``path``."""
    coords, _, labels = load_fkd_file(path, trust_pickle=trust_pickle)
    crops = int(coords.shape[0])
    kind, k = _label_kind(labels, path)
    return _Layout(crops=crops, kind=kind, k=k, shape=labels.shape, coords_dtype=coords.dtype,
                   labels_dtype=labels.dtype)


def _codecs_of(layout: _Layout, codec: str | None, k: int | None) -> tuple[_codecs.LabelCodec, _codecs.LabelCodec]:
    """``(the files' codec, the store's codec)``: ``codec`` (default: what the files hold), refused
    (ConversionError) when it needs what the files do not hold."""
    kind, file_k = layout.kind, layout.k
    src_codec = _source_codec(kind, file_k)
    if codec is None:
        dst_codec = {"topk": _codecs.as_codec("ms", k=k, default_k=file_k), "smoothing": _codecs.Smoothing(),
                     "hard": _codecs.Hard()}[kind]
    else:
        dst_codec = _codecs.as_codec(codec, k=k, default_k=file_k if kind == "topk" else 1)
    why = conversion_problem(src_codec, dst_codec)
    if why:
        what = {"topk": f"top-{file_k} labels", "smoothing": "smoothing labels", "hard": "hard labels"}[kind]
        raise ConversionError(f"cannot import FKD files holding {what} as {dst_codec.describe()}: {why}")
    return src_codec, dst_codec


def _load_like(p: Path, *, layout: _Layout, trust_pickle: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One label file as ``(coords, flip, source-codec fields)``, refused unless it has the first file's layout."""
    M = layout.crops
    coords, flip, labels = load_fkd_file(p, trust_pickle=trust_pickle)
    if coords.shape != (M, 4):
        raise ValidationError(f"FKD coords in {p} must have shape ({M}, 4) like the first file. "
                              f"Got {coords.shape}.")
    if flip.shape != (M,):
        raise ValidationError(f"FKD flip in {p} must have shape ({M},). Got {flip.shape}.")
    kd = _label_kind(labels, p)
    if kd != (layout.kind, layout.k) or labels.shape[0] != M:
        raise ValidationError(f"FKD labels in {p} have shape {labels.shape}; the first file's are {layout.shape}.")
    return coords, flip, _file_fields(labels, layout.kind, p)


Loader = Callable[[Path], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]


def _largest_class(label_files: list[Path], load: Loader, progress: bool | None) -> int:
    """The largest class index of the label files (a pass over every file)."""
    top = -1
    for p in _progress.progress(progress, total=len(label_files), desc="scanning classes", unit="file").wrap(
            label_files):
        top = max(top, int(load(p)[2]["indices"].max()))
    return top


def _meta_import(src: Path, files: int, layout: _Layout, dst_codec: _codecs.LabelCodec) -> dict[str, Any]:
    """The store's ``meta["import"]`` (spec section 9.1)."""
    return {
        "format": "fkd-release", "source": str(src.resolve()), "files": files, "order": "listing",
        "binding": "file <class>/<stem>.tar (or .pth.tar) = the image <class>/<stem>.<ext> of the image folder "
                   "(class folder and file stem)",
        "slots": "row r of the file's coords, flip and labels = slot r",
        "label_kind": layout.kind, "k_in_files": layout.k if layout.kind == "topk" else None,
        "coords_dtype": str(layout.coords_dtype), "box_rule": "pillow-crop-round",
        "flags": _flags(layout.kind, layout.k, layout.labels_dtype, dst_codec),
    }


def _copy_records(w: _writer.Writer, label_files: list[Path], sizes: np.ndarray, load: Loader,
                  src_codec: _codecs.LabelCodec, dst_codec: _codecs.LabelCodec, num_classes: int, *, batch: int,
                  progress: bool | None) -> int:
    """Every label file not written yet into ``w``, ``batch`` images at a time (boxes by FKD's rule, clipped
    into the image; labels converted to ``dst_codec``); returns how many boxes were clipped."""
    N = len(label_files)
    done = w.written  # a continued run skips what the killed one wrote
    clamped = 0
    steps = range(0, N, batch)
    for a in _progress.progress(progress, total=len(steps), desc="importing", unit="batch").wrap(steps):
        b = [n for n in range(a, min(N, a + batch)) if not done[n]]
        if not b:
            continue
        boxes, flips, fields = [], [], []
        for n in b:
            coords, flip, f = load(label_files[n])
            H, W = (int(x) for x in sizes[n])
            bx, c = _clamp_boxes(fkd_boxes(coords, H, W), H, W)
            clamped += c
            if (f["indices"] >= num_classes).any():
                raise ValidationError(f"FKD labels in {label_files[n]} hold class index "
                                      f"{int(f['indices'].max())} >= num_classes={num_classes}.")
            boxes.append(bx)
            flips.append(np.asarray(flip).astype(bool))
            fields.append(f)
        stacked = {name: np.stack([f[name] for f in fields]) for name in fields[0]}
        out = convert_fields(src_codec, dst_codec, stacked, num_classes)
        w.put_fields(np.asarray(b), np.stack(boxes), np.stack(flips), out)
    return clamped
