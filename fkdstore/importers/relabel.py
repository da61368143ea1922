"""ReLabel's and TokenLabeling's per-image label maps: naming rule, safe loading, validation, streaming.

Layout (``naver-ai/relabel_imagenet``, ``zihangJiang/TokenLabeling``): one file per training image,
``<root>/<synset>/<stem>.pt``, the ``torch.save`` of one tensor ``[2, K, S, S]``: row 0 the top-K raw
scores of every map cell (the teacher's classifier applied as a 1x1 conv to its last feature map), row 1
their class indices stored as floats. ReLabel publishes ``K = 5``, ``S = 15``, float32; TokenLabeling
writes float16 (its indices too, which is exact for classes below 2049).

The file of an image is ReLabel's own rule applied to the image's key (a relative posix path such as
``n01440764/n01440764_10026.JPEG``, or a path as given in a file list): ``'/'.join(key.split('/')[-2:])
.split('.')[0] + '.pt'`` (:func:`relabel_file_name`). The name is cut at the FIRST dot of the last two
components, so ``n01/a.v2.JPEG`` and ``n01/a.JPEG`` both name ``n01/a.pt``, and a class folder holding a
dot cuts there: such images are refused as ambiguous (:func:`scan_relabel`), never bound to a guess.

Files are loaded with ``torch.load(weights_only=True)`` only: a file that needs anything beyond plain
tensors is refused, never unpickled. Every file is checked (:func:`load_relabel_file`): one dense float16 or
float32 tensor ``[2, K, S, S]`` with ``S <= 64`` and ``K <= min(256, C)``, finite scores, indices integral in
``[0, C)`` and distinct within a cell, and the same ``K``, ``S`` and dtype as the first file; any breach is a
:class:`~fkdstore.errors.LabelFileError` naming the file.

:func:`prepare_import` plans an import: it returns the :class:`RelabelImport` (the header's
:class:`~fkdstore.labelmap.LabelMapSpec`, provenance, the scan) whose :meth:`~RelabelImport.batches` stream
``(image indices, indices (b, K, S, S), scores (b, K, S, S))`` with memory bounded by the batch;
:func:`import_relabel` (``fkdstore import relabel``) writes them into a store, resumably
(:func:`fkdstore.importers._zoo.write_map_store`).

torch is imported on use (reading ``.pt`` files needs it); importing this module needs numpy only.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import progress as _progress
from ..codecs.base import check_num_classes, index_dtype
from ..errors import LabelFileError, ValidationError
from ..images import list_images
from ..labelmap import MAP_DTYPES, MAX_K, MAX_SIZE, LabelMapSpec
from ..output import location_name
from ..validation import positive_int
from . import _zoo

__all__ = ["RELABEL_SUFFIX", "SYSTEMS", "relabel_file_name", "RelabelScan", "scan_relabel", "load_relabel_file",
           "iter_relabel_maps", "RelabelImport", "prepare_import", "import_relabel"]

RELABEL_SUFFIX = ".pt"
SYSTEMS = ("relabel", "tokenlabeling")
"""Published replay settings an import starts from (:meth:`LabelMapSpec.relabel`,
:meth:`~LabelMapSpec.tokenlabeling`)."""
MISSING_RULES = ("error", "skip")


def relabel_file_name(key: str) -> str:
    """The label-map file (relative posix path under the maps' root) of the image with ``key``, by
    ReLabel's loader rule ``'/'.join(key.split('/')[-2:]).split('.')[0] + '.pt'`` (cut at the first dot).
    A key with one component (an image directly in the image root) names ``<stem>.pt`` in the root."""
    if not isinstance(key, str):
        raise TypeError(f"image key must be a str. Got {type(key).__name__}.")
    return "/".join(key.split("/")[-2:]).split(".")[0] + RELABEL_SUFFIX


@dataclass(frozen=True)
class RelabelScan:
    """Which label-map file each image has: ``files[i]`` the relative path of image ``i``'s file (None when
    it has none), ``missing`` the indices of images without a file, ``extra`` the ``.pt`` files under the
    root that no image claims (empty when the root was not listed)."""

    root: str
    files: tuple[str | None, ...]
    missing: tuple[int, ...]
    extra: tuple[str, ...]

    @property
    def found(self) -> int:
        """How many images have a file."""
        return len(self.files) - len(self.missing)

    def path(self, i: int) -> Path:
        """Absolute path of image ``i``'s file (ValidationError when it has none)."""
        name = self.files[i]
        if name is None:
            raise ValidationError(f"image {i} has no label-map file under {self.root}.")
        return Path(self.root).joinpath(*name.split("/"))


def _list_pt(root: Path) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        out.update(prefix + f for f in filenames if f.endswith(RELABEL_SUFFIX))
    return out


def scan_relabel(root: str | os.PathLike, keys: Sequence[str], *, list_extra: bool = True) -> RelabelScan:
    """Bind every image key to its file under ``root`` (:func:`relabel_file_name`) and report what is missing
    or left over. Two keys naming one file raise :class:`ValidationError` naming both (ReLabel would give
    both images the same map). ``list_extra=False`` skips the listing of ``root`` (``extra`` is then empty
    and each file is checked with one ``stat``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"label-map folder not found: {root}")
    names: list[str] = []
    owner: dict[str, int] = {}
    for i, key in enumerate(keys):
        name = relabel_file_name(key)
        if name in owner:
            raise ValidationError(
                f"images {keys[owner[name]]!r} and {key!r} both map to label-map file {name!r} (ReLabel names a "
                f"file by cutting the image's last two path components at the first '.'); rename one, the "
                f"binding is ambiguous")
        owner[name] = i
        names.append(name)
    present = _list_pt(root) if list_extra else None
    files: list[str | None] = []
    for name in names:
        ok = name in present if present is not None else root.joinpath(*name.split("/")).is_file()
        files.append(name if ok else None)
    missing = tuple(i for i, f in enumerate(files) if f is None)
    extra = tuple(sorted(present - set(owner))) if present is not None else ()
    return RelabelScan(str(root.resolve()), tuple(files), missing, extra)


def _fail(path, rule: str) -> LabelFileError:
    return LabelFileError(f"ReLabel label map {path} {rule}")


def load_relabel_file(path: str | os.PathLike, num_classes: int, *,
                      like: tuple[int, int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One label-map file as ``(indices, scores)``: indices ``(K, S, S)`` in the store's index dtype
    (uint16 for ``C <= 65536``, else int32), scores ``(K, S, S)`` in the file's dtype (float16/float32).

    Loaded with ``torch.load(map_location="cpu", weights_only=True)``. ``like=(K, S, dtype)`` requires that
    layout (the first file's). Raises :class:`~fkdstore.errors.LabelFileError` naming the file for a file
    that does not load (truncated, not a torch file, holds more than tensors) or breaks the rules of the
    module docstring.
    """
    import torch  # noqa: PLC0415 - torch is optional (fkdstore[torch]); core imports without it

    c = check_num_classes(num_classes)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled objects the safe loader refuses ...
        lines = str(e).strip().splitlines()
        detail = next((ln for ln in lines if "Unsupported global" in ln), lines[-1] if lines else type(e).__name__)
        raise _fail(path, f"cannot be loaded with torch.load(weights_only=True) (truncated, not a torch file, "
                          f"or holding more than tensors): {detail.strip()}") from e
    if not isinstance(obj, torch.Tensor) or obj.layout != torch.strided:
        raise _fail(path, f"must hold one dense tensor [2, K, S, S]. Got {type(obj).__name__}.")
    dtype = str(obj.dtype).removeprefix("torch.")
    if dtype not in MAP_DTYPES:
        raise _fail(path, f"must hold a float16 or float32 tensor. Got {dtype}.")
    shape = tuple(obj.shape)
    if len(shape) != 4 or shape[0] != 2 or shape[2] != shape[3]:
        raise _fail(path, f"must hold a tensor of shape [2, K, S, S] (scores, indices). Got {list(shape)}.")
    k, s = shape[1], shape[2]
    if not (1 <= s <= MAX_SIZE and 1 <= k <= min(MAX_K, c)):
        raise _fail(path, f"must have 1 <= S <= {MAX_SIZE} and 1 <= K <= {min(MAX_K, c)} (num_classes={c}). "
                          f"Got K={k}, S={s}.")
    if like is not None and (k, s, dtype) != tuple(like):
        raise _fail(path, f"must have the layout of the first file, K={like[0]}, S={like[1]}, {like[2]}. "
                          f"Got K={k}, S={s}, {dtype}.")
    a = obj.detach().contiguous().numpy()
    scores, idxf = a[0], a[1].astype(np.float64)

    def where(bad: np.ndarray) -> str:
        kk, y, x = np.unravel_index(int(np.argmax(bad)), bad.shape)
        return f"(k={kk}, y={y}, x={x})"

    bad = ~np.isfinite(scores)
    if bad.any():
        raise _fail(path, f"scores must be finite. Got {scores[bad][0]} at {where(bad)}.")
    bad = ~np.isfinite(idxf) | (idxf != np.round(idxf)) | (idxf < 0) | (idxf >= c)
    if bad.any():
        raise _fail(path, f"class indices must be integers in [0, {c}). Got {idxf[bad][0]!r} at {where(bad)}.")
    idx = idxf.astype(np.int64)
    srt = np.sort(idx, 0)
    dup = (srt[1:] == srt[:-1]).any(0)
    if dup.any():
        y, x = np.unravel_index(int(np.argmax(dup)), dup.shape)
        raise _fail(path, f"class indices must be distinct within a cell. Got {sorted(idx[:, y, x].tolist())} "
                          f"at (y={y}, x={x}).")
    return idx.astype(index_dtype(c)), scores


def iter_relabel_maps(root: str | os.PathLike, keys: Sequence[str], num_classes: int, *,
                      scan: RelabelScan | None = None, images: Sequence[int] | None = None,
                      missing: str = "error") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Stream ``(image index, indices (K, S, S), scores (K, S, S))`` for ``images`` (default: all, in
    order), one file in memory at a time (:func:`load_relabel_file`; every file must share the first one's
    ``K``, ``S`` and dtype). ``missing="error"`` raises :class:`ValidationError` before anything is yielded
    when one of those images has no file; ``"skip"`` leaves such images out. ``scan`` reuses a
    :func:`scan_relabel` result of the same ``root`` and ``keys``."""
    if missing not in MISSING_RULES:
        raise ValidationError(f"missing must be one of {list(MISSING_RULES)}. Got {missing!r}.")
    scan = scan if scan is not None else scan_relabel(root, keys, list_extra=False)
    if len(scan.files) != len(keys):
        raise ValidationError(f"scan must cover the {len(keys)} keys. Got a scan of {len(scan.files)}.")
    todo = range(len(keys)) if images is None else [int(i) for i in images]
    absent = [i for i in todo if scan.files[i] is None]
    if absent and missing == "error":
        raise ValidationError(
            f"{len(absent)} images have no label-map file under {scan.root} (ReLabel's naming rule), e.g. "
            f"{[f'{keys[i]} -> {relabel_file_name(keys[i])}' for i in absent[:3]]}; pass missing='skip' to "
            f"leave them out")
    like = None
    for i in todo:
        if scan.files[i] is None:
            continue
        path = scan.path(i)
        indices, scores = load_relabel_file(path, num_classes, like=like)
        like = like or (indices.shape[0], indices.shape[1], str(scores.dtype))
        yield i, indices, scores


@dataclass(frozen=True)
class RelabelImport:
    """A planned import: the header's ``spec`` (layout from the first file, replay settings of ``system``
    with the caller's overrides), ``meta`` (provenance for the store's ``meta``), the ``scan``, and
    :meth:`batches` to stream the maps into a writer."""

    root: str
    keys: tuple[str, ...]
    num_classes: int
    spec: LabelMapSpec
    scan: RelabelScan
    missing: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> tuple[int, ...]:
        """Indices of the images that will be imported (all that have a file)."""
        return tuple(i for i, f in enumerate(self.scan.files) if f is not None)

    def batches(self, batch: int = 256, *, images: Sequence[int] | None = None,
                progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(image indices (b,) int64, indices (b, K, S, S), scores (b, K, S, S) in spec.dtype)`` for
        ``images`` (default :attr:`images`; a resuming writer passes the ones not yet written), at most
        ``batch`` images per item."""
        n = positive_int("batch", batch)
        todo = list(self.images if images is None else images)
        it = iter_relabel_maps(self.root, self.keys, self.num_classes, scan=self.scan, images=todo,
                               missing=self.missing)
        if progress:
            it = _progress.progress(True, total=len(todo), desc="importing label maps", unit="image").wrap(it)
        got: list[tuple[int, np.ndarray, np.ndarray]] = []
        for item in it:
            got.append(item)
            if len(got) == n:
                yield self._stack(got)
                got = []
        if got:
            yield self._stack(got)

    def _stack(self, got) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.array([g[0] for g in got], np.int64), np.stack([g[1] for g in got]),
                np.stack([g[2] for g in got]).astype(self.spec.dtype, copy=False))


def prepare_import(root: str | os.PathLike, keys: Sequence[str], num_classes: int, *, system: str = "relabel",
                   missing: str = "error", list_extra: bool = True, scan: RelabelScan | None = None,
                   **replay: Any) -> RelabelImport:
    """Plan the import of the label maps under ``root`` for the images ``keys`` (in store order).

    Binds keys to files (:func:`scan_relabel`; refused: ambiguous names), reads the first file for ``K``,
    ``S`` and the score dtype, and builds the :class:`LabelMapSpec` from the published settings of
    ``system`` (``"relabel"``: ``box_order="yx"``, ``flip=False``, ``grid=1``; ``"tokenlabeling"``:
    ``box_order="yx"``, ``flip=True``, ``grid=S``), with ``replay`` overriding any spec field except the
    layout (``size``, ``k``, ``dtype``), e.g. ``box_order="xy"`` for maps in the geometric convention.
    ``missing``: what :meth:`RelabelImport.batches` does with images without a file (``"error"`` is checked
    here, before anything is written). ``scan``: a :func:`scan_relabel` result of the same ``root`` and
    ``keys`` to reuse (the folder is not listed again).
    """
    if system not in SYSTEMS:
        raise ValidationError(f"system must be one of {list(SYSTEMS)}. Got {system!r}.")
    if missing not in MISSING_RULES:
        raise ValidationError(f"missing must be one of {list(MISSING_RULES)}. Got {missing!r}.")
    fixed = sorted({"size", "k", "dtype"} & set(replay))
    if fixed:
        raise ValidationError(f"{fixed[0]} is read from the files, not set. Got {fixed[0]}={replay[fixed[0]]!r}.")
    keys = tuple(keys)
    c = check_num_classes(num_classes)
    if scan is None:
        scan = scan_relabel(root, keys, list_extra=list_extra)
    elif len(scan.files) != len(keys):
        raise ValidationError(f"scan must cover the {len(keys)} keys. Got a scan of {len(scan.files)}.")
    if scan.found == 0:
        raise ValidationError(f"no label-map file under {scan.root} matches any of the {len(keys)} images "
                              f"(ReLabel's naming rule: e.g. {keys[0]!r} -> {relabel_file_name(keys[0])!r})"
                              if keys else "keys must name at least one image. Got none.")
    if scan.missing and missing == "error":
        list(iter_relabel_maps(root, keys, c, scan=scan, images=scan.missing[:1], missing="error"))
    first = next(i for i, f in enumerate(scan.files) if f is not None)
    indices, scores = load_relabel_file(scan.path(first), c)
    k, s, dtype = indices.shape[0], indices.shape[1], str(scores.dtype)
    base = LabelMapSpec.relabel(size=s, k=k, dtype=dtype) if system == "relabel" else \
        LabelMapSpec.tokenlabeling(size=s, k=k, grid=s, dtype=dtype)
    spec = replace(base, **replay)
    meta = {"import": {"format": system, "source": scan.root, "files": scan.found,
                       "images_without_file": len(scan.missing), "extra_files": len(scan.extra),
                       "dtype_in_files": dtype, "naming": "relabel: last two path components cut at the first '.'"}}
    return RelabelImport(root=scan.root, keys=keys, num_classes=c, spec=spec, scan=scan, missing=missing, meta=meta)


def import_relabel(src: str | os.PathLike, dst, images: str | os.PathLike, *, system: str = "relabel",
                   num_classes: int = 1000, missing: str = "error", batch: int = 256, progress: bool | None = None,
                   log=None, storage_options: dict[str, Any] | None = None, **replay: Any) -> dict[str, Any]:
    """Import ReLabel's (or TokenLabeling's) per-image ``.pt`` label maps under ``src`` into a new label-map
    store ``dst`` (a folder, or a URL with ``storage_options``), bound to the images of the folder ``images``
    by key (:func:`relabel_file_name`: ``<synset>/<stem>.pt`` for ``<synset>/<stem>.<ext>``).

    ``system`` (``"relabel"`` or ``"tokenlabeling"``) gives the published replay settings, ``replay`` keyword
    arguments override any :class:`~fkdstore.labelmap.LabelMapSpec` field but the layout (``box_order``,
    ``grid``, ``flip``, ``temperature``, ...). ``missing``: images without a file raise (``"error"``, before
    anything is written) or are left out of the store (``"skip"``). ``.pt`` files that no image claims are
    counted (``extra_files``), not imported. The store's labels are the image folder's classes when it has
    exactly ``num_classes`` class folders (ImageFolder's order), else -1. Maps are streamed ``batch`` images
    at a time; a run killed part way is resumed by running it again (:func:`fkdstore.importers._zoo.write_map_store`);
    any other error removes the new store.

    Returns ``{files, images, images_without_file, extra_files, num_classes, label_map, map_dtype, crops_per_image
    (1), codec (the label_map config), carried, flags, skipped, bytes_before, bytes_after, resumed,
    images_written_before}``.
    """
    if missing not in MISSING_RULES:
        raise ValidationError(f"missing must be one of {list(MISSING_RULES)}. Got {missing!r}.")
    root = Path(src)
    listing = list_images(images)
    c = check_num_classes(num_classes)
    scan = scan_relabel(root, listing.keys)
    keep = list(range(len(listing.keys))) if missing == "error" else \
        [i for i, f in enumerate(scan.files) if f is not None]
    keys = [listing.keys[i] for i in keep]
    kept = RelabelScan(scan.root, tuple(scan.files[i] for i in keep), scan.missing if missing == "error" else (),
                       scan.extra)
    imp = prepare_import(root, keys, c, system=system, missing="error", scan=kept, **replay)
    sizes = _zoo.image_sizes(listing.paths[i] for i in keep).reshape(-1, 2)
    labels = _zoo.folder_labels(listing, c, keep)
    meta_import = {**imp.meta["import"], "images": location_name(Path(images)),
                   "images_without_file": len(scan.missing), "extra_files": len(scan.extra),
                   "missing": missing, "label_map": imp.spec.get_config(), "order": "listing",
                   "binding": "file <root>/" + "'/'.join(key.split('/')[-2:]).split('.')[0] + '.pt' of the image's key "
                              "(ReLabel's loader rule)",
                   "slots": "none: one label map per image, crops drawn at training time",
                   "flags": []}  # scores and class ids are stored as the files hold them (ids as integers)
    if log:
        log(f"{system}: {len(keys):,} images with a map, {len(scan.missing):,} without (missing={missing!r}), "
            f"{len(scan.extra):,} .pt files without an image; maps K={imp.spec.k}, S={imp.spec.size}, "
            f"{imp.spec.dtype}")

    def rows(todo: np.ndarray):
        yield from imp.batches(batch, images=todo.tolist())

    done = _zoo.write_map_store(dst, op=f"import-{system}", source=imp.root, keys=keys, sizes=sizes, labels=labels,
                                num_classes=c, label_map=imp.spec, meta={"import": meta_import}, rows=rows,
                                progress=progress, storage_options=storage_options)
    files = [imp.scan.path(i) for i in imp.images]
    spec = imp.spec
    return {"files": len(files), "images": len(keys), "images_without_file": len(scan.missing),
            "extra_files": len(scan.extra), "num_classes": c, "label_map": spec.get_config(),
            "map_dtype": spec.dtype, "crops_per_image": 1, "codec": spec.get_config(),
            "carried": {"scores [2, K, S, S] row 0": f"map/scores ({spec.dtype})",
                        "indices (row 1, as floats)": f"map/indices ({spec.index_dtype(c)})"},
            "flags": [f"replay settings: {system}'s published ones"
                      + (f" with {sorted(replay)} given" if replay else "")
                      + f" (box order {spec.box_order}, offset {spec.box_offset}, grid {spec.grid}, flip {spec.flip})"],
            "skipped": {"images_without_file": len(scan.missing) if missing == "skip" else 0,
                        "pt_files_without_image": len(scan.extra)},
            "bytes_before": int(sum(os.path.getsize(p) for p in files)), **done}
