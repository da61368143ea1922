"""SRe2L relabel files and their descendants (CDA, G-VBSM, LPLD, LPQLD): per-batch files bound to images by
the recorded sampler order.

Layouts:

* **SRe2L** (``relabel/generate_soft_label.py``): ``<src>/epoch_{e}/batch_{b}.tar``, each the ``torch.save``
  of ``[coords (B, 4) float32 = (i/H, j/W, h/H, w/W), flip (B,) bool, mix_index (B,) int64 | None,
  lam float | None, bbox [y1, x1, y2, x2] numpy.int64 | None, logits (B, C) float16]``. The files name no
  image: row ``r`` of batch ``b`` of epoch ``e`` is dataset image ``perm_e[b * B + r]``, where ``perm_e`` is
  the first of the two ``torch.randperm(N, generator=g)`` calls torch's ``RandomSampler`` makes per epoch
  with ``g`` seeded by ``--fkd-seed`` (42) once for the run. Its own training must reuse the batch size
  and patch torch's fetcher; an imported store trains at any batch size.
* **LPLD** (he-y/soft-label-pruning-for-dataset-distillation): the same files plus
  ``sampler_indices_epoch.json`` (``{epoch: [dataset indices in sampler order]}``); with label pruning
  the loader drops the last partial batch and the last epoch may stop early.
* **LPQLD** (he-y/soft-label-pruning-quantization-...): a flat ``<src>/batch_{counter}.tar`` over all
  epochs and ``sampler_indices_batch.json`` (``{counter: [dataset indices]}``); lists of 7 or 8: float16
  coords, ``mix_index`` uint8, bbox as 4 uint8 tensors, top-K logits (B, K) float16 and their class
  indices (B, K) int16, and for the ``MRS`` rule the per-sample minimum logit (B, 1) that fills the other
  classes.

Replay (the loaders, on the PIL image): crop ``coords * (H, W, H, W)`` (Pillow rounds each edge: FKD's rule,
:func:`fkdstore.importers.fkd.fkd_boxes`), resize to the input size (bilinear), flip, normalise, then mix
the whole batch: Mixup ``lam * x + (1 - lam) * x[mix_index]`` or CutMix (rows ``y1:y2``, columns ``x1:x2``
from ``x[mix_index]``); the partner is a batch-mate in the same epoch. Labels: ``softmax(logits / T)``
(full logits), ``softmax`` over the top-K (``MR``) or with the other classes' logits set to the minimum
(``MRS``). fkdstore: one slot per epoch (the partner's slot is then the same epoch); when the epochs do not
cover every image (label pruning), each image keeps its first M records, M the smallest count, and a mixed
slot carries its partner's crop (``partner_crop``). Refused, naming them: LPQLD's ``rand_params`` (timm
RandAugment applied before the crop) and LPLD's ImageNet-21K-P cutout (a per-crop fill colour).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import augment as _augment
from .. import progress as _progress
from ..errors import LabelFileError, ValidationError
from ..images import ImageList, list_images
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from ..validation import positive_int
from . import _zoo, safe_pickle
from .fkd import _clamp_boxes, fkd_boxes

__all__ = ["import_sre2l", "sre2l_plan", "TAILS", "sampler_order"]

TAILS = ("renorm", "fill")
EPOCH_RE = re.compile(r"^epoch_(\d+)$")
BATCH_RE = re.compile(r"^batch_(\d+)\.tar$")
EPOCH_JSON = "sampler_indices_epoch.json"
BATCH_JSON = "sampler_indices_batch.json"


@dataclass(frozen=True)
class BatchFile:
    """One batch file: its path, epoch, and the dataset index of each row."""

    path: Path
    epoch: int
    rows: np.ndarray


def sampler_order(num_images: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The dataset order of each epoch as torch's ``RandomSampler(generator=g)`` draws it (``g`` seeded with
    ``seed`` once): per epoch ``randperm(N, generator=g)`` (the epoch's order) and a second ``randperm``
    (``num_samples % N == 0`` rows of it, drawn all the same)."""
    import torch  # noqa: PLC0415 - torch is optional (fkdstore[torch]); core imports without it

    g = torch.Generator()
    g.manual_seed(int(seed))
    out = []
    for _ in range(epochs):
        out.append(torch.randperm(num_images, generator=g).numpy().astype(np.int64))
        torch.randperm(num_images, generator=g)
    return out


def _files(d: Path) -> dict[int, Path]:
    return {int(m.group(1)): d / f for f in os.listdir(d) if (m := BATCH_RE.match(f))}


def _rows_of(path: Path, trust_pickle: bool) -> list:
    try:
        obj = safe_pickle.load(path, what="SRe2L batch file", trust_pickle=trust_pickle)
    except Exception as e:
        raise LabelFileError(str(e)) from e
    if not isinstance(obj, (list, tuple)) or len(obj) not in (6, 7, 8):
        raise LabelFileError(f"SRe2L batch file {path} must hold a list of 6 to 8 entries (coords, flip, mix_index, "
                             f"lam, bbox, logits[, indices[, sample_min]]). Got {type(obj).__name__} of "
                             f"{len(obj) if isinstance(obj, (list, tuple)) else '-'}.")
    return list(obj)


def _n(x: Any) -> Any:
    """Tensors and numpy scalars as numpy; lists of them element-wise; None and floats as they are."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)):
        return [_n(v) for v in x]
    return x


def sre2l_plan(src: Path, N: int, *, seed: int, batch_size: int | None, epochs: int | None,
               trust_pickle: bool) -> tuple[str, int, list[BatchFile], dict[str, Any]]:
    """``(layout, B, batch files, binding provenance)``: every batch file of ``src`` with the dataset index of
    each row (from the sampler json, or the reconstructed ``RandomSampler`` order for SRe2L)."""
    epoch_dirs = {int(m.group(1)): src / d for d in os.listdir(src) if (m := EPOCH_RE.match(d))
                  and (src / d).is_dir()}
    flat = _files(src)
    if epoch_dirs and flat:
        raise LabelFileError(f"{src} holds both epoch_*/ folders and batch_*.tar files; point SRC at one run")
    if not epoch_dirs and not flat:
        raise LabelFileError(f"no SRe2L batch files under {src} (epoch_<e>/batch_<b>.tar or LPQLD's "
                             f"batch_<counter>.tar)")
    if flat:
        return _flat_plan(src, flat, N, epochs)
    have = sorted(epoch_dirs)
    if have != list(range(len(have))):
        missing = sorted(set(range(have[-1] + 1)) - set(have))
        raise LabelFileError(f"{src}: epoch folders must be epoch_0 .. epoch_{have[-1]} without gaps (each epoch's "
                             f"order follows from the previous ones). Missing epoch_{missing[0]}.")
    E = len(have) if epochs is None else positive_int("epochs", epochs)
    if E > len(have):
        raise ValidationError(f"epochs must be at most the {len(have)} epoch folders of {src}. Got {E}.")
    first = _files(epoch_dirs[0])
    if 0 not in first:
        raise LabelFileError(f"{epoch_dirs[0]} has no batch_0.tar")
    B = batch_size or int(np.shape(_n(_rows_of(first[0], trust_pickle)[0]))[0])
    jpath = src / EPOCH_JSON
    if jpath.is_file():
        orders = _read_json(jpath)
        binding = {"binding": f"{EPOCH_JSON}: dataset indices of each epoch in sampler order", "batch_size": B}
        lists = []
        for e in range(E):
            if str(e) not in orders:
                raise LabelFileError(f"{jpath} has no entry for epoch {e}")
            lists.append(np.asarray(orders[str(e)], np.int64))
    else:
        import torch  # noqa: PLC0415 - torch is optional (fkdstore[torch]); core imports without it

        lists = sampler_order(N, E, seed)
        binding = {"binding": f"RandomSampler order: torch.Generator seeded {seed}, randperm(N) twice per epoch, "
                              f"torch {torch.__version__}", "batch_size": B, "fkd_seed": seed}
    plan = []
    for e in range(E):
        files = _files(epoch_dirs[e])
        order = lists[e]
        nb = _zoo.ceil_div(len(order), B)
        extra = sorted(set(files) - set(range(nb)))
        missing = sorted(set(range(nb)) - set(files))
        if extra or missing:
            bad = f"batch_{(extra or missing)[0]}.tar is {'extra' if extra else 'missing'}"
            raise LabelFileError(f"{epoch_dirs[e]}: an epoch of {len(order)} images at batch size {B} has batches "
                                 f"0..{nb - 1}; {bad} (a file from another run, batch size or image count?)")
        plan += [BatchFile(files[b], e, order[b * B:(b + 1) * B]) for b in range(nb)]
    return "epochs", B, plan, binding


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise LabelFileError(f"sampler index file {path} cannot be read as JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LabelFileError(f"sampler index file {path} must hold a JSON object. Got {type(obj).__name__}.")
    return obj


def _flat_plan(src: Path, files: dict[int, Path], N: int, epochs: int | None):
    jpath = src / BATCH_JSON
    if not jpath.is_file():
        raise LabelFileError(f"{src}: flat batch_<counter>.tar files (LPQLD) need {BATCH_JSON} (the dataset indices "
                             f"of each batch); it is missing")
    table = _read_json(jpath)
    counters = sorted(files)
    if counters != list(range(len(counters))):
        raise LabelFileError(f"{src}: batch files must be batch_0 .. batch_{counters[-1]} without gaps")
    plan: list[BatchFile] = []
    seen: set[int] = set()
    epoch = 0
    for c in counters:
        if str(c) not in table:
            raise LabelFileError(f"{jpath} has no entry for batch {c} ({files[c]})")
        rows = np.asarray(table[str(c)], np.int64)
        if seen.intersection(rows.tolist()):  # an epoch is a permutation: a repeated image starts the next
            epoch, seen = epoch + 1, set()
        seen.update(rows.tolist())
        plan.append(BatchFile(files[c], epoch, rows))
    if epochs is not None:
        plan = [p for p in plan if p.epoch < positive_int("epochs", epochs)]
    B = max(len(p.rows) for p in plan)
    return "flat", B, plan, {"binding": f"{BATCH_JSON}: dataset indices of each batch", "batch_size": B}


def _slots(plan: list[BatchFile], N: int) -> tuple[str, int, list[np.ndarray], dict[str, int]]:
    """``(mode, M, slot of every row per batch (-1 = skipped), skipped counts)``: one slot per epoch when each
    epoch holds every image once, else the first M records of each image (M = the smallest count)."""
    epochs = sorted({p.epoch for p in plan})
    counts = np.zeros(N, np.int64)
    complete = True  # every epoch holds every image exactly once (the plan is in epoch order)
    current, this = None, np.zeros(N, np.int64)
    for p in plan:
        if (p.rows < 0).any() or (p.rows >= N).any():
            bad = int(p.rows[(p.rows < 0) | (p.rows >= N)][0])
            raise ValidationError(f"{p.path}: row of dataset index {bad}, but the image set has {N} images: the "
                                  f"labels were made for another image set (or order)")
        if p.epoch != current:
            complete = complete and (current is None or (this == 1).all())
            current, this = p.epoch, np.zeros(N, np.int64)
        np.add.at(this, p.rows, 1)
        np.add.at(counts, p.rows, 1)
    if complete and (this == 1).all():
        pos = {e: k for k, e in enumerate(epochs)}
        return "epoch", len(epochs), [np.full(len(p.rows), pos[p.epoch]) for p in plan], {}
    M = int(counts.min())
    if M == 0:
        never = np.flatnonzero(counts == 0)
        raise ValidationError(f"{len(never)} images have no record in any batch file (dataset indices "
                              f"{never[:5].tolist()}); the labels do not cover the image set")
    seen = np.zeros(N, np.int64)
    slots = []
    for p in plan:
        s = seen[p.rows].copy()
        seen[p.rows] += 1
        slots.append(np.where(s < M, s, -1))
    return "occurrence", M, slots, {"records_beyond_M": int((counts - M).sum())}


@dataclass(frozen=True)
class _Kind:
    """What the files hold: label kind, K (None for full logits), mixing type, coords dtype."""

    label: str
    k: int | None
    mix: str | None


def _kind_of(rows: list, path: Path, tail: str | None) -> _Kind:
    coords, second = _n(rows[0]), _n(rows[1])
    if np.ndim(second) == 2:
        raise LabelFileError(f"{path}: entry 1 is per-crop cutout params {np.shape(second)} (LPLD's ImageNet-21K-P "
                             f"CutoutPIL with a per-crop fill colour), which fkdstore cannot replay; refused")
    if len(rows) in (7, 8) and isinstance(rows[2], (list, tuple)) and not _is_tensor_like(rows[2]):
        raise LabelFileError(f"{path}: entry 2 is rand_params (LPQLD's timm RandAugment applied before the crop), "
                             f"which fkdstore cannot replay (its policies run after the crop); refused")
    if np.ndim(coords) != 2 or np.shape(coords)[1] != 4:
        raise LabelFileError(f"{path}: coords must have shape (B, 4). Got {np.shape(coords)}.")
    mix_index, bbox = rows[2], rows[4]
    mix = None if mix_index is None else ("mixup" if bbox is None else "cutmix")
    if len(rows) == 6:
        return _Kind("logits_full", None, mix)
    k = int(np.shape(_n(rows[5]))[-1])
    if len(rows) == 8:
        if tail not in (None, "fill"):
            raise ValidationError(f"{path} holds the per-sample minimum logit (LPQLD's MRS rule); tail must be "
                                  f"'fill' or None. Got {tail!r}.")
        return _Kind("logits_topk_fill", k, mix)
    if tail == "fill":
        raise ValidationError(f"{path} holds no fill logit (LPQLD's sample_min); tail='fill' needs it. Use 'renorm'.")
    return _Kind("logits_topk_renorm", k, mix)


def _is_tensor_like(x: Any) -> bool:
    return hasattr(x, "detach") or isinstance(x, np.ndarray)


def import_sre2l(src: str | os.PathLike, dst: str | os.PathLike, images: str | os.PathLike | Sequence[str], *,
                 codec=None, k: int | None = None, num_classes: int | None = None, fkd_seed: int = 42,
                 batch_size: int | None = None, epochs: int | None = None, order: str = "imagefolder",
                 tail: str | None = None, input_size: int = 224, interpolation: str = "bilinear",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 trust_pickle: bool = False, scratch_dir: str | os.PathLike | None = None, batch: int = 1024,
                 progress: bool | None = None, log: Callable[[str], None] | None = None,
                 storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import SRe2L / LPLD / LPQLD batch files (layouts in the module docstring) into a new store ``dst``.

    ``images``: the image folder the labels were made for (``order="imagefolder"``: torchvision ImageFolder's
    index; ``"listing"``: the listed order). ``fkd_seed``: SRe2L's ``--fkd-seed`` (its loader assumes 42);
    ``batch_size``: default the first file's rows; ``epochs``: import the first ``epochs`` epochs only.
    ``codec``: default keeps the labels at every temperature (``logits`` float16 for full logits, ``mr``
    float32 for top-K logits, ``logits`` float32 for MRS); ``num_classes`` is required for top-K files.
    ``tail``: the rule of top-K logits files without a fill logit, ``"renorm"`` (MR, default). Files are
    read twice over: once into a scratch folder (``scratch_dir``, default the system's temporary folder;
    about the output's size, removed at the end), then written image by image.
    Returns a summary: ``files``, ``images``, ``crops_per_image``, ``slots`` (``"epoch"`` or
    ``"occurrence"``), ``num_classes``, ``codec``, ``carried``, ``flags``, ``skipped``, ``bytes_before``,
    ``bytes_after``, ``resumed``.
    """
    if tail not in (None, *TAILS):
        raise ValidationError(f"tail must be one of {list(TAILS)} or None. Got {tail!r}.")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"SRe2L label folder not found: {src}")
    listing = list_images(images)
    N = len(listing)
    order_ = _zoo.dataset_order(listing, order)
    layout, B, plan, binding = sre2l_plan(src, N, seed=fkd_seed, batch_size=batch_size, epochs=epochs,
                                          trust_pickle=trust_pickle)
    mode, M, slots, skipped = _slots(plan, N)
    first = _rows_of(plan[0].path, trust_pickle)
    kind = _kind_of(first, plan[0].path, tail)
    C = _num_classes(kind, first, plan[0].path, num_classes)
    dst_codec = _zoo.label_codec(kind.label, kind.k, codec, k_out=k)
    side = positive_int("input_size", input_size)
    size = (side, side)
    sizes = _zoo.image_sizes(listing.paths)
    pipeline = _pipeline(kind, mode)
    specs = _zoo.scratch_specs(dst_codec, C, pipeline, {"box": ((4,), np.int32), "flip": ((), np.bool_)})
    fmt = {"epochs": "lpld" if binding["binding"].startswith(EPOCH_JSON) else "sre2l", "flat": "lpqld"}[layout]
    flags = _flags(kind, dst_codec)
    clamped = 0
    with _zoo.SlotScratch(N, M, specs, scratch_dir) as scratch:
        bar = _progress.progress(progress, total=len(plan), desc="import-sre2l: reading", unit="file")
        for p, slot in bar.wrap(list(zip(plan, slots))):
            rows = first if p is plan[0] else _rows_of(p.path, trust_pickle)
            clamped += _read_batch(p, slot, rows, kind, tail, dst_codec, C, size, order_, sizes, scratch,
                                   mode, pipeline)
        _check_covered(scratch, listing)
        if clamped:
            flags.append(f"{clamped} crops reach outside their image after the source's rounding (the source's "
                         f"loader pads them with black); fkdstore clips them to the image")
        meta_import = {"format": fmt, "source": _zoo.resolved(src), "layout": layout, "files": len(plan),
                       **binding, "epochs": len({p.epoch for p in plan}), "slots": mode, "mix": kind.mix,
                       "labels": kind.label, "k_in_files": kind.k, "order": order, "flags": flags}
        replay = _zoo.replay_of(size, interpolation, tuple(mean), tuple(std))

        def rows_out(todo: np.ndarray):
            for part in _zoo.batches(todo, batch):
                r, fields, aug = _zoo.scratch_records(scratch, part)
                yield part, r["box"], r["flip"], fields, aug or None

        done = _zoo.write_store(
            dst, op="import-sre2l", source=meta_import["source"], keys=listing.keys, sizes=sizes,
            labels=_zoo.folder_labels(listing, C), num_classes=C, codec=dst_codec, crops_per_image=M,
            augment=pipeline, meta={"import": meta_import}, replay=replay, rows=rows_out, progress=progress,
            storage_options=storage_options)
    if log:
        log(f"{fmt}: {len(plan)} batch files, {N} images x {M} slots ({mode}), batch size {B}")
    return {"files": len(plan), "images": N, "crops_per_image": M, "slots": mode, "num_classes": C,
            "codec": dst_codec.get_config(), "carried": _carried(kind, mode, dst_codec), "flags": flags,
            "skipped": skipped, "boxes_clamped": clamped, "bytes_before": _zoo.source_bytes(p.path for p in plan),
            **done}


# --------------------------------------------------------------------------------------------- the steps

def _num_classes(kind: _Kind, first: list, path: Path, num_classes: int | None) -> int:
    """C: the logits' width for full logits (``num_classes`` must match it), else ``num_classes`` (required)."""
    if kind.label == "logits_full":
        width = int(np.shape(_n(first[5]))[-1])
        if num_classes is not None and int(num_classes) != width:
            raise ValidationError(f"num_classes must match the logits' width {width} in {path}. Got {num_classes}.")
        return width
    if num_classes is None:
        raise ValidationError(f"{path} holds top-{kind.k} logits: pass num_classes (the teacher's class count, "
                              f"e.g. 1000)")
    return positive_int("num_classes", num_classes)


def _pipeline(kind: _Kind, mode: str) -> _augment.Pipeline:
    """The store's policies: the mixing of the files (exact Mixup or the CutMix box, the partner a batch-mate),
    after the partner's own crop when the partner's slot is not the same epoch (``occurrence`` slots)."""
    policies: list = []
    if kind.mix is not None and mode == "occurrence":
        policies.append(_augment.PartnerCrop(policies=[]))
    if kind.mix == "mixup":
        policies.append(_augment.MixupExact(alpha=0.8, p=1.0, window=0))
    elif kind.mix == "cutmix":
        policies.append(_augment.CutMixBox(alpha=1.0, p=1.0, window=0))
    return _augment.Pipeline(policies)


def _flags(kind: _Kind, dst_codec) -> list[str]:
    """Where the store's labels or replayed pixels differ from the source's (``meta["import"]["flags"]``)."""
    flags = [f"labels: {kind.label}" + (f" (top-{kind.k})" if kind.k else "") + f" stored as {dst_codec.describe()}"]
    if kind.label == "logits_full" and dst_codec.input != "logits":
        flags.append("probability codec: the temperature of the source's softmax(logits / T) is fixed at 1")
    if kind.mix == "mixup":
        flags.append("mixup pixels are rounded to uint8 by fkdstore's replay; the source mixes normalised floats "
                     "(difference at most half a grey level)")
    return flags


def _check_covered(scratch: _zoo.SlotScratch, listing: ImageList) -> None:
    """Every image has a record in every slot."""
    if not scratch.filled.all():
        i, s = (int(v) for v in np.argwhere(~scratch.filled)[0])
        raise ValidationError(f"image {listing.keys[i]!r} has no record for slot {s}")


def _carried(kind: _Kind, mode: str, dst_codec) -> dict[str, str]:
    """The summary's ``carried``: where each entry of the files went in the store."""
    carried = {"coords": "box (Pillow's edge rounding)", "flip": "flip",
               "logits": f"soft labels ({dst_codec.describe()})"}
    if kind.mix:
        carried["mix_index"] = "aug/*_partner (the batch-mate's image)" + (
            ", aug/partner_crop_box/flip" if mode == "occurrence" else "; partner slot = the same epoch")
        carried["lam"] = "aug/mixup_exact_lam" if kind.mix == "mixup" else "aug/cutmix_box_lam"
        if kind.mix == "cutmix":
            carried["bbox"] = "aug/cutmix_box_rect"
    return carried


def _read_batch(p: BatchFile, slot: np.ndarray, rows: list, kind: _Kind, tail, dst_codec, C: int, size,
                order_: np.ndarray, sizes: np.ndarray, scratch: _zoo.SlotScratch, mode: str, pipeline) -> int:
    """One batch file into the scratch; returns how many crops were clamped into their image."""
    got = _kind_of(rows, p.path, tail)
    if got != kind:
        raise LabelFileError(f"{p.path} holds {got}, the first file {kind}: files of two runs are mixed")
    coords, flip = np.asarray(_n(rows[0])), np.asarray(_n(rows[1]))
    Bf = len(p.rows)
    if coords.shape != (Bf, 4) or flip.shape != (Bf,):
        raise LabelFileError(f"{p.path}: coords and flip must have {Bf} rows (the batch's images in the sampler "
                             f"order). Got {coords.shape} and {flip.shape}: a file from another run, batch size or "
                             f"image count?")
    img = order_[p.rows]
    H, W = sizes[img, 0], sizes[img, 1]
    boxes = np.stack([fkd_boxes(coords[r], int(H[r]), int(W[r])) for r in range(Bf)])
    clamped = 0
    for r in range(Bf):
        boxes[r:r + 1], c = _clamp_boxes(boxes[r:r + 1], int(H[r]), int(W[r]))
        clamped += c
    z = np.asarray(_n(rows[5]), np.float64)
    if z.shape[0] != Bf or not np.isfinite(z).all():
        raise LabelFileError(f"{p.path}: logits must be finite with {Bf} rows. Got shape {z.shape}.")
    if kind.label == "logits_full":
        fields = _zoo.label_fields(kind.label, dst_codec, C, values=z)
    else:
        idx = np.asarray(_n(rows[6]), np.int64)
        if idx.shape != z.shape or (idx < 0).any() or (idx >= C).any():
            raise LabelFileError(f"{p.path}: top-K indices must have the logits' shape {z.shape} and lie in "
                                 f"[0, {C}). Got shape {idx.shape}, values in [{idx.min()}, {idx.max()}].")
        fill = np.asarray(_n(rows[7]), np.float64).reshape(Bf, 1) if kind.label == "logits_topk_fill" else None
        fields = _zoo.label_fields(kind.label, dst_codec, C, indices=idx, values=z, fill=fill)
    _zoo.check_fields(dst_codec, fields, C, p.path)
    values: dict[str, np.ndarray] = {"box": boxes, "flip": flip.astype(bool)}
    values |= {f"soft_{n}": v for n, v in fields.items()}
    if kind.mix is not None:
        values |= _mix_columns(p, rows, kind, img, boxes, flip, size, mode)
    keep = slot >= 0
    scratch.put(img[keep], slot[keep], {n: np.asarray(v)[keep] for n, v in values.items()}, str(p.path))
    return clamped


def _mix_columns(p: BatchFile, rows: list, kind: _Kind, img: np.ndarray, boxes, flip, size, mode) -> dict:
    Bf = len(p.rows)
    mi = np.asarray(_n(rows[2]))
    if mi.dtype == np.uint8 and Bf > 256:
        raise LabelFileError(f"{p.path}: mix_index is stored as uint8 and cannot address the {Bf} rows of the batch")
    mi = mi.astype(np.int64)
    if mi.shape != (Bf,) or not np.array_equal(np.sort(mi), np.arange(Bf)):
        raise LabelFileError(f"{p.path}: mix_index must be a permutation of the batch's {Bf} rows. Got {mi[:8]}...")
    lam = rows[3]
    lam = float(np.asarray(_n(lam)).reshape(()))
    if not 0.0 <= lam <= 1.0:
        raise LabelFileError(f"{p.path}: lam must be in [0, 1]. Got {lam}.")
    partner = img[mi]
    out: dict[str, np.ndarray] = {}
    if kind.mix == "mixup":
        out["aug_mixup_exact_partner"] = partner
        out["aug_mixup_exact_lam"] = np.full(Bf, lam, np.float32)
    else:
        bb = [int(np.asarray(_n(v)).reshape(())) for v in rows[4]]
        if len(bb) != 4 or not (0 <= bb[0] <= bb[2] <= size[0] and 0 <= bb[1] <= bb[3] <= size[1]):
            raise LabelFileError(f"{p.path}: bbox must be (y1, x1, y2, x2) inside the {size[0]}x{size[1]} crop. "
                                 f"Got {bb}.")
        out["aug_cutmix_box_partner"] = partner
        out["aug_cutmix_box_rect"] = np.tile(np.asarray(bb, np.int64), (Bf, 1))
        out["aug_cutmix_box_lam"] = np.full(Bf, lam, np.float32)
    if mode == "occurrence":
        out["aug_partner_crop_box"] = boxes[mi]
        out["aug_partner_crop_flip"] = flip.astype(bool)[mi]
    return out
