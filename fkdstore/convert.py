"""Re-encode stores without the teacher (:func:`convert`), import FKD's release files (:func:`import_fkd`),
keep a subset of each image's slots (:func:`prune`) and average stores that share crops (:func:`ensemble`).

Conversions work on the *stored fields*, never on decoded distributions: decoding an ``mr`` store gives the
renormalised top-K, and re-encoding that as ``ms`` would claim a residual of 0. Every codec that keeps a
top-K stores the raw teacher probabilities of those classes, in descending order (``fkdstore.codecs``), so

=============  =========================================================================================
source         possible targets
=============  =========================================================================================
``full``       everything (``full`` with another dtype; the others by encoding the stored vector)
``ms``/``mr``  ``ms``/``mr`` with K' <= K (the first K' stored entries), ``smoothing``, ``hard``
``smoothing``  ``smoothing``, ``hard``, ``ms``/``mr`` with K = 1
``hard``       ``hard``
=============  =========================================================================================

Anything else needs information the source does not hold and is refused with the reason
(:class:`ConversionError`). The output copies boxes, flips, aug, image keys, sizes, labels and ``meta``,
and appends a record to ``meta["history"]``. Conversion streams one source shard at a time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import codecs as _codecs
from . import storage as _storage
from .errors import ConversionError, FkdstoreError, ValidationError
from .validation import non_negative_int

__all__ = ["ConversionError", "conversion_problem", "convert_fields", "convert", "import_fkd", "fkd_boxes",
           "load_fkd_file", "FKD_SUFFIXES", "prune", "pruned_slots", "random_slots", "confident_slots",
           "PRUNE_RULES", "ensemble", "check_same_crops"]

FKD_SUFFIXES = (".pth.tar", ".tar")


def _describe(codec) -> str:
    return codec.describe()


def conversion_problem(src: _codecs.LabelCodec, dst: _codecs.LabelCodec) -> str | None:
    """Why ``src -> dst`` is impossible, or None when it is possible (``dst.conversion_problem(src)``)."""
    return dst.conversion_problem(src)


def convert_fields(src: _codecs.LabelCodec, dst: _codecs.LabelCodec, fields: dict[str, np.ndarray],
                   num_classes: int) -> dict[str, np.ndarray]:
    """Stored fields of ``src`` -> stored fields of ``dst`` (leading dims kept). Raises ConversionError."""
    why = conversion_problem(src, dst)
    if why:
        raise ConversionError(f"cannot convert {_describe(src)} -> {_describe(dst)}: {why}")
    idx, p = src.sorted_probs(fields, num_classes)
    return dst.from_sorted(idx, p, num_classes)


def _history_record(op: str, **items) -> dict[str, Any]:
    from . import __version__

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"op": op, **items, "at": now, "library_version": __version__}


def _location_name(location) -> str:
    """A location as recorded in ``meta["history"]``: the URL, or the absolute path."""
    return str(location) if _storage.is_url(location) else str(Path(location).resolve())


def _check_dst(dst, dst_store, src=None) -> None:
    if src is not None and _location_name(dst).rstrip("/") == _location_name(src).rstrip("/"):
        raise ValidationError(f"destination must differ from the source. Got {dst} for both.")
    if not _storage.is_empty(dst_store):
        raise ValidationError(f"destination {dst} exists and is not empty; choose a new path")


@contextlib.contextmanager
def _remove_on_error(dst_store):
    """Delete the new output ``dst_store`` (which :func:`_check_dst` found absent or empty) if writing it fails."""
    try:
        yield
    except BaseException:
        _storage.remove_all(dst_store)
        raise


def _tqdm(it, progress: bool, **kw):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def _written_batches(reader) -> list[np.ndarray]:
    """The written images of ``reader``, one index array per shard (shards with none left out): the unit in
    which convert, prune and ensemble read a source and write their output (one whole-shard put each)."""
    h, written = reader.header, reader.written
    batches = (h.shard_range(s).start + np.flatnonzero(written[h.shard_range(s).start:h.shard_range(s).stop])
               for s in range(h.num_shards))
    return [idx for idx in batches if len(idx)]


def _write_like(dst_store, reader, *, codec, meta, crops_per_image: int | None = None):
    """A writer for a new store with ``reader``'s images (keys, sizes, labels), aug columns and augment
    pipeline, and the given codec, ``meta`` and (default: the source's) crops per image. A seeded-crops source
    (format 3.0) gives a seeded output with the same sampler, unless ``crops_per_image`` selects slots
    (pruning): slot j of the output is then not the sampler's slot j, so its crops are stored (2.0)."""
    from . import writer as _writer

    h = reader.header
    return _writer.write(
        dst_store, num_images=h.num_images, crops_per_image=crops_per_image or h.crops_per_image,
        num_classes=h.num_classes, codec=codec, image_keys=reader.image_keys, image_sizes=reader.image_sizes,
        labels=reader.labels, meta=meta, aug=h.aug, augment=list(h.augment),
        crop_sampler=h.crop_sampler if crops_per_image is None else None,
    )


def convert(src: str | os.PathLike, dst: str | os.PathLike, codec, *, k: int | None = None,
            progress: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-encode store ``src`` into a new store ``dst`` with ``codec`` (name, config dict or LabelCodec).

    ``src`` and ``dst`` are folders or URLs (``s3://...``); ``storage_options`` apply to whichever of them
    is a URL (:func:`fkdstore.storage.options_for`). Only written images are converted (an incomplete
    source gives an equally incomplete output). Returns ``{from, to, images, missing, bytes_before,
    bytes_after}``.
    """
    from . import reader as _reader
    from . import writer as _writer

    _check_options(storage_options, src, dst)
    src_options, dst_options = _storage.options_for(src, storage_options), _storage.options_for(dst, storage_options)
    reader = _reader.open(src, storage_options=src_options)
    dst_codec = _codecs.as_codec(codec, k=k, default_k=reader.codec.k)
    why = conversion_problem(reader.codec, dst_codec)
    if why:
        raise ConversionError(f"cannot convert {_describe(reader.codec)} -> {_describe(dst_codec)}: {why}")
    dst_store = _storage.as_store(dst, read_only=False, storage_options=dst_options)
    _check_dst(dst, dst_store, src)
    h = reader.header
    meta = dict(h.meta)
    written = reader.written
    meta["history"] = list(meta.get("history") or []) + [_history_record(
        "convert", source=_location_name(src), **{"from": dict(h.codec), "to": dst_codec.get_config()},
        images=int(written.sum()))]
    with _remove_on_error(dst_store), _write_like(dst_store, reader, codec=dst_codec, meta=meta) as w:
        for idx in _tqdm(_written_batches(reader), progress, desc="converting", unit="shard"):
            rec = reader.read_batch(idx)
            fields = convert_fields(reader.codec, dst_codec, rec.fields, h.num_classes)
            w.put_fields(idx, rec.box, rec.flip, fields, aug=rec.aug or None)
    reader.close()
    return {
        "from": dict(h.codec), "to": dst_codec.get_config(), "images": int(written.sum()),
        "missing": int((~written).sum()),
        "bytes_before": _writer.storage_stats(src, storage_options=src_options)["_total"]["bytes"],
        "bytes_after": _writer.storage_stats(dst_store)["_total"]["bytes"],
    }


def _check_options(storage_options, *locations) -> None:
    """``storage_options`` need at least one URL among ``locations`` (as :func:`fkdstore.storage.as_store`)."""
    if storage_options and not any(_storage.is_url(x) for x in locations):
        raise TypeError(f"storage_options apply to URLs only. Got local paths {[str(x) for x in locations]}.")


# ============================================================================================ import-fkd
def _numpy_safe_globals() -> list:
    """What torch's weights-only unpickler needs to rebuild plain numpy arrays (no code execution)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [type(np.dtype(t)) for t in ("bool", "float16", "float32", "float64", "int8", "int16", "int32",
                                          "int64", "uint8", "uint16", "uint32", "uint64")]
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def load_fkd_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> list:
    """Load one FKD label file (``torch.save`` of ``[coords, flip, labels]``) as a list of numpy arrays.

    By default with ``torch.load(weights_only=True)`` and only numpy's array-rebuilding globals allowed:
    loading never executes code from the file. ``trust_pickle=True`` uses ``weights_only=False``, which
    runs whatever the pickle says: only for files from a source you trust.
    """
    import torch

    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted input only: runs pickled code
        else:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()
        hint = "" if trust_pickle else "; if the files come from a source you trust, pass --trust-pickle"
        detail = next((ln for ln in first if "Unsupported global" in ln), first[-1] if first else type(e).__name__)
        raise FkdstoreError(f"cannot load FKD label file {path}: {detail.strip()}{hint}") from e
    if not isinstance(obj, (list, tuple)) or len(obj) < 3:
        raise ValidationError(f"FKD label file {path} must hold a list [coords, flip, labels]. Got {type(obj).__name__}.")
    out = []
    for x in obj[:3]:
        out.append(x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x))
    return out


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
        raise ValidationError(f"FKD labels in {path}: class indices must be non-negative integers. Got {idxf[(idxf != np.round(idxf)) | (idxf < 0)][:3].tolist()}.")
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
               trust_pickle: bool = False, batch: int = 256, progress: bool = False,
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
    from . import writer as _writer
    from .images import image_size, list_images

    _check_options(storage_options, dst)
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"FKD label folder not found: {src}")
    files = _scan_fkd(src)
    if not files:
        raise ValidationError(f"no FKD label files ({', '.join(FKD_SUFFIXES)}) found under {src}")
    imgs = list_images(images)
    by_key = {}
    for n, key in enumerate(imgs.keys):
        kp = Path(key)
        by_key[(kp.parent.name, kp.name[: -len(kp.suffix)] if kp.suffix else kp.name)] = n
    orphans = [files[key] for key in files if key not in by_key]
    if orphans:
        raise ValidationError(
            f"{len(orphans)} label files have no image in {images} (matched by class folder and stem), "
            f"e.g. {[str(p) for p in orphans[:3]]}")
    dst_store = _storage.as_store(dst, read_only=False, storage_options=storage_options)
    _check_dst(dst, dst_store)
    chosen = sorted(by_key[key] for key in files)
    inv = {by_key[key]: files[key] for key in files}
    label_files = [inv[n] for n in chosen]
    keys = [imgs.keys[n] for n in chosen]
    paths = [imgs.paths[n] for n in chosen]

    coords0, flip0, labels0 = load_fkd_file(label_files[0], trust_pickle=trust_pickle)
    M = int(coords0.shape[0])
    kind, file_k = _label_kind(labels0, label_files[0])
    src_codec = _source_codec(kind, file_k)
    if codec is None:
        dst_codec = {"topk": _codecs.as_codec("ms", k=k, default_k=file_k), "smoothing": _codecs.Smoothing(),
                     "hard": _codecs.Hard()}[kind]
    else:
        dst_codec = _codecs.as_codec(codec, k=k, default_k=file_k if kind == "topk" else 1)
    why = conversion_problem(src_codec, dst_codec)
    if why:
        what = {"topk": f"top-{file_k} labels", "smoothing": "smoothing labels", "hard": "hard labels"}[kind]
        raise ConversionError(f"cannot import FKD files holding {what} as {_describe(dst_codec)}: {why}")

    def load(p):
        coords, flip, labels = load_fkd_file(p, trust_pickle=trust_pickle)
        if coords.shape != (M, 4):
            raise ValidationError(f"FKD coords in {p} must have shape ({M}, 4) like the first file. Got {coords.shape}.")
        if flip.shape != (M,):
            raise ValidationError(f"FKD flip in {p} must have shape ({M},). Got {flip.shape}.")
        kd = _label_kind(labels, p)
        if kd != (kind, file_k) or labels.shape[0] != M:
            raise ValidationError(f"FKD labels in {p} have shape {labels.shape}; the first file's are {labels0.shape}.")
        return coords, flip, _file_fields(labels, kind, p)

    if num_classes is None:
        top = -1
        for p in _tqdm(label_files, progress, desc="scanning classes", unit="file"):
            top = max(top, int(load(p)[2]["indices"].max()))
        num_classes = top + 1
        if log:
            log(f"num_classes = {num_classes} (largest stored class index + 1; pass --classes to set it)")
    num_classes = int(num_classes)
    sizes = np.array([image_size(p) for p in paths], dtype=np.int64)
    labels_gt = None
    if len(imgs.classes) == num_classes:
        labels_gt = np.array([imgs.labels[n] for n in chosen], dtype=np.int64)
    meta = {
        "import": {"format": "fkd-release", "source": str(src.resolve()), "files": len(label_files),
                   "label_kind": kind, "k_in_files": file_k if kind == "topk" else None,
                   "coords_dtype": str(coords0.dtype), "box_rule": "pillow-crop-round"},
        "history": [_history_record("import-fkd", source=str(src.resolve()), to=dst_codec.get_config(),
                                    images=len(label_files))],
    }
    clamped = 0
    N = len(label_files)
    with _remove_on_error(dst_store), _writer.write(
        dst_store, num_images=N, crops_per_image=M, num_classes=num_classes, codec=dst_codec, image_keys=keys,
        image_sizes=sizes, labels=labels_gt, meta=meta,
    ) as w:
        for a in _tqdm(range(0, N, batch), progress, desc="importing", unit="batch"):
            b = range(a, min(N, a + batch))
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
            w.put_fields(np.arange(b.start, b.stop), np.stack(boxes), np.stack(flips), out)
    return {
        "files": N, "images": N, "images_without_labels": len(imgs) - N, "crops_per_image": M,
        "num_classes": num_classes, "codec": dst_codec.get_config(), "coords_dtype": str(coords0.dtype),
        "boxes_clamped": clamped,
        "bytes_before": int(sum(os.path.getsize(p) for p in label_files)),
        "bytes_after": _writer.storage_stats(dst_store)["_total"]["bytes"],
    }


# ============================================================================================ prune
PRUNE_RULES = ("random", "confident")


def _check_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise TypeError(f"keep must be a number in (0, 1]. Got {type(keep).__name__} {keep!r}.")
    k = float(keep)
    if not (k > 0 and k <= 1):  # also refuses NaN
        raise ValidationError(f"keep must be a fraction of the slots in (0, 1]. Got {keep!r}.")
    return k


def pruned_slots(keep: float, crops_per_image: int) -> int:
    """``M' = max(1, round(M * keep))``: how many of an image's ``M`` slots :func:`prune` keeps."""
    return max(1, int(round(crops_per_image * _check_keep(keep))))


def random_slots(seed: int, image: int, crops_per_image: int, kept: int) -> np.ndarray:
    """The ``kept`` slots (ascending) the ``random`` rule keeps for ``image``: a function of ``(seed, image)``
    only, ``sort(default_rng(SeedSequence([seed, image])).choice(M, kept, replace=False))``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(image)]))
    return np.sort(rng.choice(crops_per_image, kept, replace=False)).astype(np.int64)


def confident_slots(codec, fields: dict[str, np.ndarray], num_classes: int, kept: int) -> np.ndarray:
    """(B, kept) ascending: the slots whose decoded distribution (T = 1) has the lowest entropy, ties by the
    lower slot index, for fields of leading shape (B, M)."""
    d = np.asarray(codec.decode(fields, num_classes), np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(d > 0, d * np.log(d), 0.0).sum(-1)  # (B, M) nats
    order = np.argsort(h, axis=-1, kind="stable")[:, :kept]  # stable: equal entropies keep slot order
    return np.sort(order, axis=-1).astype(np.int64)


def _check_int_seed(seed: Any) -> int:
    return non_negative_int("seed", seed)


def prune(src: str | os.PathLike, dst: str | os.PathLike, *, keep: float, seed: int = 0, rule: str = "random",
          progress: bool = False, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``dst``: store ``src`` with ``M' = max(1, round(M * keep))`` of each image's ``M`` slots.

    ``rule``: ``"random"`` keeps :func:`random_slots` ``(seed, image)`` (independent of everything else, so
    any subset of the images prunes the same way); ``"confident"`` keeps the slots whose decoded soft label
    has the lowest entropy (:func:`confident_slots`; ``seed`` unused). Kept slots keep their order; box,
    flip, aug columns and label fields are copied bit for bit; keys, sizes, labels, codec, aug columns, the
    augment pipeline and ``meta`` are copied, with a record appended to ``meta["history"]``. Only written
    images are copied (an incomplete source gives an equally incomplete output, as :func:`convert`).
    :class:`fkdstore.TorchDataset` on the result samples among the ``M'`` kept slots.

    ``src`` and ``dst`` are folders or URLs; ``storage_options`` apply to whichever is a URL.
    Refused (:class:`ValidationError`, nothing written): ``keep`` not in ``(0, 1]`` (NaN too), an unknown
    rule, a negative seed, ``dst`` equal to ``src`` or not empty, and a store whose augment pipeline mixes
    slots (Mixup/CutMix store partner *slots*, which pruning would drop or renumber).
    Returns ``{images, missing, crops_per_image_before, crops_per_image, rule, seed, keep, bytes_before,
    bytes_after}``.
    """
    from . import reader as _reader
    from . import writer as _writer

    keep = _check_keep(keep)
    seed = _check_int_seed(seed)
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str. Got {type(rule).__name__}.")
    if rule not in PRUNE_RULES:
        raise ValidationError(f"rule must be one of {list(PRUNE_RULES)}. Got {rule!r}.")
    _check_options(storage_options, src, dst)
    src_options, dst_options = _storage.options_for(src, storage_options), _storage.options_for(dst, storage_options)
    reader = _reader.open(src, storage_options=src_options)
    h = reader.header
    M = h.crops_per_image
    kept = pruned_slots(keep, M)
    if h.augment:
        from .augment import Pipeline

        mixing = [p.name for p in Pipeline.from_config(list(h.augment)).mixing]
        if mixing:
            raise ValidationError(
                f"prune cannot drop slots of a store whose augment pipeline mixes slots ({', '.join(mixing)}): a kept "
                f"slot's partner slot could be dropped. Got a store with augment {[p['name'] for p in h.augment]}.")
    dst_store = _storage.as_store(dst, read_only=False, storage_options=dst_options)
    _check_dst(dst, dst_store, src)
    written = reader.written
    meta = dict(h.meta)
    meta["history"] = list(meta.get("history") or []) + [_history_record(
        "prune", source=_location_name(src), keep=keep, rule=rule, seed=seed, crops_per_image_before=M,
        slots_kept=kept, images=int(written.sum()))]
    with _remove_on_error(dst_store), _write_like(dst_store, reader, codec=reader.codec, meta=meta,
                                                  crops_per_image=kept) as w:
        for idx in _tqdm(_written_batches(reader), progress, desc="pruning", unit="shard"):
            if rule == "random":
                slots = np.stack([random_slots(seed, int(i), M, kept) for i in idx])
                rec = reader.read_batch(idx, slots)
            else:
                rec = reader.read_batch(idx)
                slots = confident_slots(reader.codec, rec.fields, h.num_classes, kept)
                rec = _take_slots(rec, slots)
            w.put_fields(idx, rec.box, rec.flip, rec.fields, aug=rec.aug or None)
    reader.close()
    return {"images": int(written.sum()), "missing": int((~written).sum()), "crops_per_image_before": M,
            "crops_per_image": kept, "rule": rule, "seed": seed, "keep": keep,
            "bytes_before": _writer.storage_stats(src, storage_options=src_options)["_total"]["bytes"],
            "bytes_after": _writer.storage_stats(dst, storage_options=dst_options)["_total"]["bytes"]}


def _take_slots(rec, slots: np.ndarray):
    """Records (B, M, ...) -> (B, m, ...) at ``slots`` (B, m)."""
    from .reader import CropRecords

    def take(v):
        return np.take_along_axis(v, slots.reshape(slots.shape + (1,) * (v.ndim - 2)), axis=1)

    return CropRecords(take(rec.box), take(rec.flip), {k: take(v) for k, v in rec.aug.items()},
                       {k: take(v) for k, v in rec.fields.items()})


# ============================================================================================ ensemble
def _first_diff(a, b) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (None if equal)."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def check_same_crops(readers: list, names: list[str]) -> None:
    """Refuse (:class:`ValidationError`) stores that do not share crops: same N, M, C, keys (in order), image
    sizes, written images, aug columns and augment pipeline, and, for every written image and slot, the same
    box, flip and aug values. The message names the first differing image index, key, slot and array."""
    a, na = readers[0], names[0]
    ha = a.header
    for b, nb in zip(readers[1:], names[1:]):
        hb = b.header
        for what, x, y in (("num_images", ha.num_images, hb.num_images),
                           ("crops_per_image", ha.crops_per_image, hb.crops_per_image),
                           ("num_classes", ha.num_classes, hb.num_classes),
                           ("aug columns", [c.to_json() for c in ha.aug], [c.to_json() for c in hb.aug]),
                           ("augment pipeline", list(ha.augment), list(hb.augment))):
            if x != y:
                raise ValidationError(f"stores must share crops: {what} is {x!r} in {na} but {y!r} in {nb}.")
        j = _first_diff(a.image_keys, b.image_keys)
        if j is not None:
            ka = a.image_keys[j] if j < len(a.image_keys) else None
            kb = b.image_keys[j] if j < len(b.image_keys) else None
            raise ValidationError(f"stores must share crops: image {j} has key {ka!r} in {na} but {kb!r} in {nb}.")
        bad = np.flatnonzero((a.image_sizes != b.image_sizes).any(-1))
        if len(bad):
            i = int(bad[0])
            raise ValidationError(f"stores must share crops: image {i} ({a.image_keys[i]!r}) has size "
                                  f"{a.image_sizes[i].tolist()} in {na} but {b.image_sizes[i].tolist()} in {nb}.")
        bad = np.flatnonzero(a.written != b.written)
        if len(bad):
            i = int(bad[0])
            raise ValidationError(f"stores must have the same written images: image {i} ({a.image_keys[i]!r}) is "
                                  f"{'written' if a.written[i] else 'not written'} in {na} but not in {nb}.")


def _first_crop_diff(ra, rb, idx: np.ndarray) -> tuple[int, int, str] | None:
    """(image, slot, array) of the first crop whose box, flip or an aug column differs between two records."""
    arrays = [("box", ra.box, rb.box), ("flip", ra.flip, rb.flip)]
    arrays += [(f"aug/{k}", ra.aug[k], rb.aug[k]) for k in ra.aug]
    first = None
    for name, x, y in arrays:
        with np.errstate(invalid="ignore"):
            diff = ~((x == y) | ((x != x) & (y != y)))  # NaN == NaN for float aug columns
        diff = diff.reshape(diff.shape[:2] + (-1,)).any(-1)
        if diff.any():
            b, m = (int(v) for v in np.argwhere(diff)[0])
            cand = (b, m, name)
            if first is None or cand[:2] < first[:2]:
                first = cand
    if first is None:
        return None
    return int(idx[first[0]]), first[1], first[2]


def ensemble(stores: list, dst: str | os.PathLike, *, codec=None, progress: bool = False,
             storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Average the decoded soft labels (T = 1) of stores that share crops and write them to ``dst``.

    Every crop of ``dst`` holds ``mean_s decode_s(crop)`` (float64 mean of the float32 decoded rows),
    encoded with ``codec`` (a codec, name, spec string or config; default: the first store's). For a codec
    that stores logits the log of the mean is stored. Keys, sizes, labels, boxes, flips, aug columns, the
    augment pipeline and the first store's ``meta`` are copied; ``meta["history"]`` gets an ``ensemble``
    record naming the sources, their codecs and teachers. Only written images are averaged, and every
    store must have the same written images.

    Refused (nothing written): fewer than 2 stores; stores that do not share crops
    (:func:`check_same_crops`; box/flip/aug compared per image and slot, the message names the first
    differing image index, key, slot and array); ``dst`` equal to a source or not empty. Stores and ``dst``
    are folders or URLs; ``storage_options`` apply to those that are URLs.
    Returns ``{images, missing, sources, codec, bytes_after}``.
    """
    from . import reader as _reader
    from . import writer as _writer

    if isinstance(stores, (str, bytes, os.PathLike)) or not isinstance(stores, (list, tuple)):
        raise TypeError(f"stores must be a list of store paths. Got {type(stores).__name__}.")
    if len(stores) < 2:
        raise ValidationError(f"ensemble needs at least 2 stores. Got {len(stores)}.")
    srcs = list(stores)
    _check_options(storage_options, *srcs, dst)
    for s in srcs:
        if _location_name(dst) == _location_name(s):
            raise ValidationError(f"destination must differ from the sources. Got {dst} for both.")
    readers = [_reader.open(s, storage_options=_storage.options_for(s, storage_options)) for s in srcs]
    names = [str(s) for s in srcs]
    out_codec = readers[0].codec if codec is None else _codecs.as_codec(codec)
    check_same_crops(readers, names)
    a = readers[0]
    h = a.header
    C = h.num_classes
    out_codec.fields(C)  # refuses a codec that cannot store C classes (k > C) before anything is written
    written = a.written
    # crops: compare every written image's box/flip/aug before writing anything
    shards = _written_batches(a)
    for idx in shards:
        ra = a.read_batch(idx)
        for b, nb in zip(readers[1:], names[1:]):
            d = _first_crop_diff(ra, b.read_batch(idx), idx)
            if d is not None:
                i, m, arr = d
                raise ValidationError(f"stores must share crops: image {i} ({a.image_keys[i]!r}) slot {m} has a "
                                      f"different {arr} in {nb} than in {names[0]}.")
    dst_options = _storage.options_for(dst, storage_options)
    dst_store = _storage.as_store(dst, read_only=False, storage_options=dst_options)
    _check_dst(dst, dst_store)
    meta = dict(h.meta)
    meta["history"] = list(meta.get("history") or []) + [_history_record(
        "ensemble", sources=[_location_name(s) for s in srcs], codecs=[dict(r.header.codec) for r in readers],
        teachers=[(r.meta or {}).get("teacher") for r in readers], to=out_codec.get_config(),
        images=int(written.sum()))]
    with _remove_on_error(dst_store), _write_like(dst_store, a, codec=out_codec, meta=meta) as w:
        for idx in _tqdm(shards, progress, desc="ensembling", unit="shard"):
            recs = [r.read_batch(idx) for r in readers]
            mean = np.zeros(recs[0].box.shape[:2] + (C,), np.float64)
            for r, rec in zip(readers, recs):
                mean += r.decode(rec.fields)
            mean /= len(readers)
            if out_codec.input == "logits":
                with np.errstate(divide="ignore"):
                    x = np.log(np.maximum(mean, np.finfo(np.float64).tiny))
            else:
                x = mean.astype(np.float32)
            w.put(idx, recs[0].box, recs[0].flip, x, aug=recs[0].aug or None)
    for r in readers:
        r.close()
    return {"images": int(written.sum()), "missing": int((~written).sum()), "sources": names,
            "codec": out_codec.get_config(),
            "bytes_after": _writer.storage_stats(dst, storage_options=dst_options)["_total"]["bytes"]}
