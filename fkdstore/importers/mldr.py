"""Apple's ml-dr (Dataset Reinforcement) label files: one ``{id}.pth.tar`` per image, bound to images by id.

Layout (``reinforce.py``, read by ``dr/data.py``'s ``ReinforcedDataset``): ``<src>/config.pth.tar`` (the
run's config: ``reinforce.num_samples`` NS, ``reinforce.topk`` K, ``reinforce.image_augmentation``) and per
dataset image ``id`` a file ``<src>/{id}.pth.tar`` = ``torch.save((id, [{"params": P, "prob": (values,
ids)}] * NS), pickle_protocol=4)``; ``id`` is the image's index in the training dataset (torchvision
``ImageFolder`` for ImageNet), ``prob`` the teacher's top-K probabilities (``argpartition`` order).

``P`` is ml-dr's compressed parameter list (``dr/transforms.py``, ``Compose.compress``): ``[id2]`` when the
config mixes (the partner's dataset id, or None when neither Mixup nor CutMix was applied), then one entry
per transform with random parameters, in ml-dr's order: ``random_resized_crop`` (top, left, height, width),
``random_horizontal_flip`` (bool), ``rand_augment`` ([(op index, magnitude)] * num_ops, or None when
skipped), ``random_erase`` ((top, left, height, width) in crop pixels, or None), ``mixup`` (lam or None),
``cutmix`` ([lam, y1, x1, y2, x2] or None). When the sample was mixed, every non-mixing entry is a pair
``[own, partner]``: the partner's crop was drawn independently and augmented on its own.

Replay (what ``ReinforcedDataset`` does, on the PIL image): crop ``(top, left, height, width)`` and resize
to the crop size (bilinear), flip, RandAugment with the stored ops and magnitudes (torchvision), to float,
erase the box to 0, normalise, then Mixup ``lam * x + (1 - lam) * x2`` and CutMix (rows ``y1:y2``, columns
``x1:x2`` from ``x2``), where ``x2`` is the partner image put through its own stored crop, flip, RandAugment
and erasing. fkdstore holds each of these as a column: boxes and flips, ``randaugment`` (magnitudes mapped
to their bin, refused when a magnitude is no bin of the config), ``random_erasing`` (value 0),
``partner_crop`` (the partner's crop and params), ``mixup_exact`` (float32 lam) and ``cutmix_box`` (the box
and lam). Mixup is rounded to uint8 by fkdstore's replay (ml-dr mixes floats): the only pixel difference,
at most half a grey level, recorded in ``meta["import"]["flags"]``. Labels: ``densify="smooth"`` (the
published training config: the stored probabilities, ``(1 - sum) / (C - K)`` elsewhere) or ``"zeros"``
(``ReinforcedDataset``'s default: ``softmax`` of the stored probabilities over the K ids, 0 elsewhere).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import augment as _augment
from ..augment.randaugment import NO_MAGNITUDE, OPS, SIGNED, magnitude_value
from ..errors import LabelFileError, ValidationError
from ..images import list_images
from ..transforms import INTERPOLATIONS
from . import _zoo, safe_pickle

__all__ = ["import_mldr", "MLDR_TRANSFORMS", "mldr_layout", "MldrLayout", "DENSIFY"]

CONFIG_NAME = "config.pth.tar"
FILE_RE = re.compile(r"^(\d+)\.pth\.tar$")
# ml-dr's TRANSFORMATION_TO_NAME order (dr/transforms.py): the order of the compressed parameters
MLDR_TRANSFORMS = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
                   "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix")
NO_PARAM = frozenset({"uint8", "center_crop", "to_tensor", "normalize"})
SUPPORTED = frozenset({"uint8", "random_resized_crop", "random_horizontal_flip", "rand_augment", "to_tensor",
                       "random_erase", "normalize", "mixup", "cutmix"})
DENSIFY = ("smooth", "zeros")


@dataclass(frozen=True)
class MldrLayout:
    """What a run's config says about its records: ``names`` (transforms with parameters, in record order),
    ``mixing`` (records start with the partner id), the fkdstore ``pipeline`` holding them, the crop
    ``size`` (H, W), ``interpolation``, ``mean``/``std``, ``num_samples`` and ``topk``."""

    names: tuple[str, ...]
    mixing: bool
    pipeline: _augment.Pipeline
    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_samples: int
    topk: int

    @property
    def randaugment(self) -> _augment.RandAugment | None:
        """The pipeline's RandAugment policy (records with ``rand_augment`` params), or None."""
        return next((p for p in self.pipeline.policies if isinstance(p, _augment.RandAugment)), None)


def _as_dict(v: Any, what: str) -> dict:
    if not isinstance(v, dict):
        raise LabelFileError(f"ml-dr config {what} must be a dict. Got {type(v).__name__}.")
    return v


def mldr_layout(config: dict, where: str = CONFIG_NAME) -> MldrLayout:
    """Parse ml-dr's config (``config.pth.tar``): the transforms of ``reinforce.image_augmentation`` (those
    with ``enable: false`` removed, as ml-dr's ``clean_config``) as a :class:`MldrLayout`. Transforms fkdstore
    cannot replay (``resize``, ``center_crop``, ``random_crop``, anything not listed by ml-dr) are refused,
    naming them."""
    rein = _as_dict(_as_dict(config, "").get("reinforce"), "'reinforce'")
    if rein.get("joblib"):
        raise LabelFileError(f"ml-dr config {where}: reinforce.joblib is true: the records are joblib pickles, "
                             f"which load only by running pickled code; re-save them with torch.save")
    aug = {k: dict(v) for k, v in _as_dict(rein.get("image_augmentation"), "'reinforce.image_augmentation'")
           .items() if dict(v).get("enable", True)}
    for v in aug.values():
        v.pop("enable", None)
    unknown = sorted(set(aug) - set(MLDR_TRANSFORMS))
    if unknown:
        raise LabelFileError(f"ml-dr config {where}: transforms {unknown} are not ml-dr's "
                             f"({', '.join(MLDR_TRANSFORMS)}); cannot parse its records")
    refused = sorted(set(aug) - SUPPORTED)
    if refused:
        raise LabelFileError(f"ml-dr config {where}: transforms {refused} have no fkdstore replay (fkdstore replays "
                             f"random_resized_crop, random_horizontal_flip, rand_augment, random_erase, mixup, "
                             f"cutmix); refused")
    if "random_resized_crop" not in aug:
        raise LabelFileError(f"ml-dr config {where}: records without random_resized_crop have no crop box; refused")
    rrc = aug["random_resized_crop"]
    size = rrc.get("size", 224)
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    interpolation = str(rrc.get("interpolation", "bilinear")).lower().split(".")[-1]
    if interpolation not in INTERPOLATIONS:
        raise LabelFileError(f"ml-dr config {where}: random_resized_crop interpolation {interpolation!r} is not one "
                             f"of fkdstore's ({', '.join(sorted(INTERPOLATIONS))}); refused")
    policies: list = []
    if "rand_augment" in aug:
        ra = aug["rand_augment"]
        interp = str(ra.get("interpolation", "nearest")).lower().split(".")[-1]
        fill = ra.get("fill")
        policies.append(_augment.RandAugment(
            num_ops=ra.get("num_ops", 2), magnitude=ra.get("magnitude", 9),
            num_magnitude_bins=ra.get("num_magnitude_bins", 31), interpolation=interp,
            fill=(0, 0, 0) if fill is None else fill))
    if "random_erase" in aug:  # ml-dr's RandomErasing.forward sets the box to 0 whatever its ``value``
        re_cfg = aug["random_erase"]
        policies.append(_augment.RandomErasing(p=re_cfg.get("p", 0.5), scale=tuple(re_cfg.get("scale", (0.02, 0.33))),
                                               ratio=tuple(re_cfg.get("ratio", (0.3, 3.3))), value=(0, 0, 0)))
    mixing = "mixup" in aug or "cutmix" in aug
    if mixing:
        policies.append(_augment.PartnerCrop(policies=list(policies)))
    if "mixup" in aug:
        policies.append(_augment.MixupExact(alpha=aug["mixup"].get("alpha", 1.0), p=aug["mixup"].get("p", 1.0),
                                            window=0))
    if "cutmix" in aug:
        policies.append(_augment.CutMixBox(alpha=aug["cutmix"].get("alpha", 1.0), p=aug["cutmix"].get("p", 1.0),
                                           window=0))
    norm = aug.get("normalize", {})
    names = tuple(t for t in MLDR_TRANSFORMS if t in aug and t not in NO_PARAM)
    try:
        ns, topk = int(rein["num_samples"]), int(rein["topk"])
    except (KeyError, TypeError, ValueError):
        raise LabelFileError(f"ml-dr config {where} must hold reinforce.num_samples and reinforce.topk") from None
    return MldrLayout(names=names, mixing=mixing, pipeline=_augment.Pipeline(policies), size=size,
                      interpolation=interpolation, mean=tuple(norm.get("mean", (0.485, 0.456, 0.406))),
                      std=tuple(norm.get("std", (0.229, 0.224, 0.225))), num_samples=ns, topk=topk)


# ----------------------------------------------------------------------------------------- one record

def _ra_bins(ops_: Any, ra: _augment.RandAugment, size: tuple[int, int], where: str) -> tuple[list[int], list[int]]:
    """ml-dr's ``[(op index, magnitude)]`` as fkdstore's ``ra_ops`` and signed ``ra_mag`` bins (identity when
    RandAugment was skipped). A magnitude that is no bin of the config is refused, naming it."""
    if ops_ is None:
        return [0] * ra.num_ops, [0] * ra.num_ops
    if not isinstance(ops_, (list, tuple)) or len(ops_) != ra.num_ops:
        raise LabelFileError(f"{where}: rand_augment params must be {ra.num_ops} (op, magnitude) pairs. Got {ops_!r}.")
    ids, bins = [], []
    for pair in ops_:
        op, mag = pair
        if not isinstance(op, (int, np.integer)) or not 0 <= int(op) < len(OPS):
            raise LabelFileError(f"{where}: rand_augment op index must be in [0, {len(OPS)}). Got {op!r}.")
        name, mag = OPS[int(op)], float(mag)
        if name in NO_MAGNITUDE:
            if mag != 0.0:
                raise LabelFileError(f"{where}: rand_augment op {name} has no magnitude. Got {mag!r}.")
            b = 0
        else:
            found = _bin_of(name, abs(mag), ra, size)
            if found is None:
                raise LabelFileError(
                    f"{where}: rand_augment op {name} magnitude {mag!r} is no magnitude bin of "
                    f"num_magnitude_bins={ra.num_magnitude_bins} for crops of {size[0]}x{size[1]}; refused")
            b = found
            if mag < 0:
                if name not in SIGNED:
                    raise LabelFileError(f"{where}: rand_augment op {name} takes no negative magnitude. Got {mag!r}.")
                b = -b
        ids.append(int(op))
        bins.append(b)
    return ids, bins


def _bin_of(name: str, mag: float, ra: _augment.RandAugment, size: tuple[int, int]) -> int | None:
    """The bin whose magnitude equals ``mag`` to float32 precision (torchvision builds the table with float32
    ``linspace``); the config's magnitude first when several bins share the value (Posterize)."""
    want = np.float32(mag)
    order = [ra.magnitude] + [b for b in range(ra.num_magnitude_bins) if b != ra.magnitude]
    for b in order:
        v = np.float32(magnitude_value(name, b, ra.num_magnitude_bins, size))
        if v == want or abs(float(v) - float(want)) <= 4 * float(np.spacing(np.float32(max(abs(float(v)), 1.0)))):
            return b
    return None


def _box(v: Any, where: str, what: str) -> list[int]:
    if not isinstance(v, (list, tuple)) or len(v) != 4 or not all(isinstance(x, (int, np.integer)) for x in v):
        raise LabelFileError(f"{where}: {what} must be 4 integers. Got {v!r}.")
    return [int(x) for x in v]


def _pair(v: Any, paired: bool, where: str, name: str) -> tuple[Any, Any]:
    if not paired:
        return v, None
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise LabelFileError(f"{where}: {name} params of a mixed sample must be [own, partner]. Got {v!r}.")
    return v[0], v[1]


def record_columns(params: Any, layout: MldrLayout, where: str) -> dict[str, Any]:
    """One ml-dr record's ``params`` list as fkdstore slot values: ``box``, ``flip``, ``partner`` (dataset id
    or None) and the pipeline's columns (partner columns still hold the dataset id)."""
    if not isinstance(params, (list, tuple)):
        raise LabelFileError(f"{where}: params must be a list (compressed ml-dr parameters). Got "
                             f"{type(params).__name__}.")
    want = len(layout.names) + layout.mixing
    if len(params) != want:
        raise LabelFileError(f"{where}: params must have {want} entries ({'id2, ' if layout.mixing else ''}"
                             f"{', '.join(layout.names)}). Got {len(params)}.")
    id2 = params[0] if layout.mixing else None
    if id2 is not None and not isinstance(id2, (int, np.integer)):
        raise LabelFileError(f"{where}: partner id must be an integer or None. Got {id2!r}.")
    paired = id2 is not None
    got = dict(zip(layout.names, params[1:] if layout.mixing else params))
    out: dict[str, Any] = {"partner": None if id2 is None else int(id2)}
    own_box, pc_box = _pair(got["random_resized_crop"], paired, where, "random_resized_crop")
    out["box"] = _box(own_box, where, "random_resized_crop box")
    own_flip, pc_flip = _pair(got.get("random_horizontal_flip", False), paired and "random_horizontal_flip" in got,
                              where, "random_horizontal_flip")
    out["flip"] = bool(own_flip)
    H, W = layout.size
    sub: dict[str, dict[str, Any]] = {"own": {}, "pc": {}}
    if "rand_augment" in got:
        ra = layout.randaugment
        if ra is None:
            raise LabelFileError(f"{where}: the record holds rand_augment params; the layout has no RandAugment "
                                 f"policy")
        own, part = _pair(got["rand_augment"], paired, where, "rand_augment")
        for who, v in (("own", own), ("pc", part)):
            sub[who]["ra_ops"], sub[who]["ra_mag"] = _ra_bins(v, ra, layout.size, where)
    if "random_erase" in got:
        own, part = _pair(got["random_erase"], paired, where, "random_erase")
        for who, v in (("own", own), ("pc", part)):
            box = [0, 0, 0, 0] if v is None else _box(v, where, "random_erase box")
            t, l, h, w = box
            if v is not None and (h < 1 or w < 1 or t < 0 or l < 0 or t + h > H or l + w > W):
                raise LabelFileError(f"{where}: random_erase box {box} must lie inside the {H}x{W} crop.")
            sub[who]["re_box"] = box
    out.update(sub["own"])
    if layout.mixing:
        out["partner_crop_box"] = [0, 0, 0, 0] if not paired else _box(pc_box, where, "partner crop box")
        out["partner_crop_flip"] = bool(pc_flip) if paired else False
        for name, v in sub["pc"].items():
            out["partner_crop_" + name] = v if paired else np.zeros_like(np.asarray(v))
    if "mixup" in got:
        lam = got["mixup"]
        if lam is not None and not (isinstance(lam, (float, int, np.floating)) and 0.0 <= float(lam) <= 1.0):
            raise LabelFileError(f"{where}: mixup lam must be a number in [0, 1] or None. Got {lam!r}.")
        if lam is not None and paired:
            out["mixup_exact_partner"], out["mixup_exact_lam"] = out["partner"], float(lam)
        else:
            out["mixup_exact_partner"], out["mixup_exact_lam"] = None, 1.0
    if "cutmix" in got:
        cm = got["cutmix"]
        applied = cm is not None and paired
        out["cutmix_box_partner"] = out["partner"] if applied else None
        if applied:
            if not isinstance(cm, (list, tuple)) or len(cm) != 5:
                raise LabelFileError(f"{where}: cutmix params must be [lam, y1, x1, y2, x2]. Got {cm!r}.")
            y1, x1, y2, x2 = _box(cm[1:], where, "cutmix box")
            if not (0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W):
                raise LabelFileError(f"{where}: cutmix box {[y1, x1, y2, x2]} must lie inside the {H}x{W} crop.")
            out["cutmix_box_rect"], out["cutmix_box_lam"] = [y1, x1, y2, x2], float(cm[0])
        else:
            out["cutmix_box_rect"], out["cutmix_box_lam"] = [0, 0, 0, 0], 1.0
    return out


def load_mldr_file(path, *, trust_pickle: bool = False) -> tuple[int, list]:
    """One ml-dr record file as ``(id, records)`` (safe loader; LabelFileError for anything else)."""
    try:
        obj = safe_pickle.load(path, what="ml-dr record file", trust_pickle=trust_pickle)
    except Exception as e:
        raise LabelFileError(str(e)) from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (int, np.integer))
            and isinstance(obj[1], list)):
        raise LabelFileError(f"ml-dr record file {path} must hold (id, [records]). Got {type(obj).__name__}.")
    return int(obj[0]), obj[1]


def _prob(rec: Any, k: int, where: str) -> tuple[list[int], list[float]]:
    if not isinstance(rec, dict) or "params" not in rec or "prob" not in rec:
        raise LabelFileError(f"{where}: a record must be a dict with 'params' and 'prob'. Got {rec!r:.80}.")
    pr = rec["prob"]
    if not (isinstance(pr, (tuple, list)) and len(pr) == 2 and len(pr[0]) == k and len(pr[1]) == k):
        raise LabelFileError(f"{where}: prob must be ([{k} probabilities], [{k} class ids]). Got {pr!r:.80}.")
    return [int(i) for i in pr[1]], [float(v) for v in pr[0]]


# ----------------------------------------------------------------------------------------------- import

def import_mldr(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike,
                images: str | os.PathLike | Sequence[str | os.PathLike], *, codec=None, k: int | None = None,
                num_classes: int | None = None, densify: str = "smooth", order: str = "imagefolder",
                trust_pickle: bool = False, batch: int = 64, progress: bool | None = None,
                log: Callable[[str], None] | None = None,
                storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import ml-dr reinforcement files (``src``: a folder holding ``config.pth.tar`` and ``{id}.pth.tar``, or
    several such folders, whose records are concatenated per image as ml-dr merges runs) into a new store
    ``dst``, one crop slot per record (``crops_per_image`` = the summed NS).

    ``images``: the dataset the records were made for; file ``{id}`` belongs to dataset index ``id`` in
    ``order`` (``"imagefolder"``: torchvision ImageFolder's index of the folder; ``"listing"``: the position
    in ``images`` as listed, e.g. a file list in dataset order). Every image needs its file, and no file may
    name an image the dataset lacks. ``codec`` defaults to ``ms`` float16 with the records' K;
    ``num_classes`` to the config's. ``densify``: the label rule of the training run (module docstring).
    Returns a summary: ``files``, ``images``, ``crops_per_image``, ``num_classes``, ``codec``, ``carried``
    (source parameter -> fkdstore column), ``flags``, ``skipped``, ``bytes_before``, ``bytes_after``,
    ``resumed``.
    """
    if densify not in DENSIFY:
        raise ValidationError(f"densify must be one of {list(DENSIFY)}. Got {densify!r}.")
    srcs = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    if not srcs:
        raise ValidationError("src must name at least one ml-dr folder. Got none.")
    listing = list_images(images)
    N = len(listing)
    order_ = _zoo.dataset_order(listing, order)
    dataset_of = np.empty(N, np.int64)
    dataset_of[order_] = np.arange(N)
    layouts, configs = _read_configs(srcs, N, trust_pickle)
    layout = layouts[0]
    M = sum(x.num_samples for x in layouts)
    C = int(num_classes if num_classes is not None else configs[0].get("num_classes", 1000))
    K = layout.topk
    dst_codec = _zoo.label_codec("probs_topk", K, codec, k_out=k)
    sizes = _zoo.image_sizes(listing.paths)
    files = [[(r, d / f"{int(dataset_of[i])}.pth.tar") for r, d in enumerate(srcs)] for i in range(N)]
    flags = _flags(densify, layout)
    sources = [_zoo.resolved(d) for d in srcs]
    meta_import = {
        "format": "ml-dr", "source": sources, "files": N * len(srcs),
        "records_per_file": [x.num_samples for x in layouts], "topk": K, "densify": densify, "order": order,
        "transforms": list(layout.names), "binding": "file {id}.pth.tar = dataset index id",
        "slots": "record r of the concatenated runs = slot r", "flags": flags,
    }
    replay = _zoo.replay_of(layout.size, layout.interpolation, layout.mean, layout.std)

    def rows(todo: np.ndarray):
        for part in _zoo.batches(todo, batch):
            idx, val, boxes, flips, aug = _read_records(part, files, layouts, dataset_of, order_, sizes, trust_pickle)
            yield part, boxes, flips, _label_fields(idx, val, densify, dst_codec, C, part), aug

    done = _zoo.write_store(
        dst, op="import-mldr", source=", ".join(sources), keys=listing.keys, sizes=sizes,
        labels=_zoo.folder_labels(listing, C), num_classes=C, codec=dst_codec, crops_per_image=M,
        augment=layout.pipeline, meta={"import": meta_import}, replay=replay, rows=rows, progress=progress,
        storage_options=storage_options)
    if log:
        log(f"ml-dr: {N} images x {M} records, {', '.join(layout.names)}")
    return {"files": N * len(srcs), "images": N, "crops_per_image": M, "num_classes": C,
            "codec": dst_codec.get_config(), "carried": _carried(layout, dst_codec), "flags": flags, "skipped": {},
            "bytes_before": _zoo.source_bytes(p for fs in files for _, p in fs) + sum(
                (d / CONFIG_NAME).stat().st_size for d in srcs),
            **done}


# --------------------------------------------------------------------------------------------- the steps

def _read_configs(srcs: list[Path], N: int, trust_pickle: bool) -> tuple[list[MldrLayout], list[dict]]:
    """Each folder's layout and config (``config.pth.tar``), its record files checked against the ``N``
    dataset indices; the folders must share one augmentation config and K (their records are concatenated)."""
    layouts, configs = [], []
    for d in srcs:
        if not d.is_dir():
            raise FileNotFoundError(f"ml-dr folder not found: {d}")
        cfg_path = d / CONFIG_NAME
        if not cfg_path.is_file():
            raise LabelFileError(f"ml-dr folder {d} has no {CONFIG_NAME} (the run's config); cannot parse its records")
        try:
            cfg = safe_pickle.load(cfg_path, what="ml-dr config", trust_pickle=trust_pickle)
        except Exception as e:
            raise LabelFileError(str(e)) from e
        layouts.append(mldr_layout(cfg, str(cfg_path)))
        configs.append(cfg)
        _check_files(d, N)
    layout = layouts[0]
    for d, other in zip(srcs[1:], layouts[1:]):
        if (other.names, other.pipeline, other.size, other.topk) != (layout.names, layout.pipeline, layout.size,
                                                                     layout.topk):
            raise LabelFileError(f"ml-dr folder {d} was made with another augmentation config or K than {srcs[0]}; "
                                 f"its records cannot share one store")
    return layouts, configs


def _flags(densify: str, layout: MldrLayout) -> list[str]:
    """Where the store's labels or replayed pixels differ from ml-dr's (``meta["import"]["flags"]``)."""
    flags = [f"densify={densify}: " + ("the stored probabilities, (1 - sum) / (C - K) elsewhere" if densify == "smooth"
                                       else "softmax of the stored probabilities over the K ids, 0 elsewhere")]
    if "mixup" in layout.names:
        flags.append("mixup pixels are rounded to uint8 by fkdstore's replay; ml-dr mixes normalised floats "
                     "(difference at most half a grey level)")
    if "rand_augment" in layout.names:
        flags.append("RandAugment magnitudes are stored as bins; fkdstore evaluates a bin in float64, ml-dr used "
                     "torchvision's float32 value")
    return flags


def _read_records(part: np.ndarray, files: list[list[tuple[int, Path]]], layouts: list[MldrLayout],
                  dataset_of: np.ndarray, order_: np.ndarray, sizes: np.ndarray,
                  trust_pickle: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The records of images ``part`` (every run's file of each image, concatenated in slot order) as
    ``(class ids (B, M, K), probabilities (B, M, K), boxes (B, M, 4), flips (B, M), aug columns)``."""
    layout, B = layouts[0], len(part)
    M, K, cols = sum(x.num_samples for x in layouts), layout.topk, layout.pipeline.columns()
    boxes = np.zeros((B, M, 4), np.int64)
    flips = np.zeros((B, M), bool)
    aug = {c.name: np.zeros((B, M, *c.shape), c.dtype) for c in cols}
    idx = np.zeros((B, M, K), np.int64)
    val = np.zeros((B, M, K), np.float64)
    for b, i in enumerate(part.tolist()):
        s = 0
        for run, path in files[i]:
            fid, recs = load_mldr_file(path, trust_pickle=trust_pickle)
            if fid != dataset_of[i]:
                raise LabelFileError(f"ml-dr record file {path} holds id {fid}; its name says {dataset_of[i]}")
            ns = layouts[run].num_samples
            if len(recs) != ns:
                raise LabelFileError(f"ml-dr record file {path} holds {len(recs)} records; its config "
                                     f"(reinforce.num_samples) says {ns}")
            for r, rec in enumerate(recs):
                where = f"ml-dr record file {path} record {r}"
                ids, vals = _prob(rec, K, where)
                idx[b, s], val[b, s] = ids, vals
                values = record_columns(rec["params"], layout, where)
                _put_slot(values, b, s, i, boxes, flips, aug, cols, order_, sizes, where)
                s += 1
    return idx, val, boxes, flips, aug


def _label_fields(idx: np.ndarray, val: np.ndarray, densify: str, dst_codec, C: int,
                  part: np.ndarray) -> dict[str, np.ndarray]:
    """The records' top-K class ids and probabilities of images ``part`` as ``dst_codec``'s fields, by the
    ``densify`` rule."""
    if (idx < 0).any() or (idx >= C).any():
        raise LabelFileError(f"ml-dr class ids must lie in [0, {C}) (num_classes). Got {int(idx.max())} "
                             f"among images {part.tolist()[:4]}...; pass num_classes")
    if densify == "zeros":
        e = np.exp(val - val.max(-1, keepdims=True))
        val = e / e.sum(-1, keepdims=True)
    fields = _zoo.label_fields("probs_topk", dst_codec, C, indices=idx, values=val)
    _zoo.check_fields(dst_codec, fields, C, f"ml-dr record files of images {part.tolist()}")
    return fields


def _carried(layout: MldrLayout, dst_codec) -> dict[str, str]:
    """The summary's ``carried``: where each of the layout's parameters went in the store."""
    carried = {"random_resized_crop": "box", "random_horizontal_flip": "flip", "rand_augment": "aug/ra_ops, ra_mag",
               "random_erase": "aug/re_box", "mixup": "aug/mixup_exact_partner, mixup_exact_lam",
               "cutmix": "aug/cutmix_box_partner, cutmix_box_rect, cutmix_box_lam",
               "id2 and the partner's params": "aug/partner_crop_*", "prob": f"soft labels ({dst_codec.describe()})"}
    return {key: v for key, v in carried.items() if key in layout.names or key == "prob"
            or (key.startswith("id2") and layout.mixing)}


def _check_files(d: Path, N: int) -> None:
    """Every dataset index 0..N-1 has ``{id}.pth.tar`` in ``d`` and no file names an index beyond."""
    ids = sorted(int(m.group(1)) for f in os.listdir(d) if (m := FILE_RE.match(f)) and f != CONFIG_NAME)
    beyond = [i for i in ids if i >= N]
    if beyond:
        raise ValidationError(f"ml-dr folder {d} has record files for dataset indices {beyond[:5]} beyond the "
                              f"{N} images given: the records were made for another image set (or order)")
    have = set(ids)
    missing = [i for i in range(N) if i not in have]
    if missing:
        raise ValidationError(f"ml-dr folder {d} has no record file for {len(missing)} of the {N} images, e.g. "
                              f"dataset indices {missing[:5]}")


def _put_slot(values: dict, b: int, s: int, i: int, boxes, flips, aug, cols, order_, sizes, where: str) -> None:
    """One record's values into row ``b`` slot ``s`` (partners: dataset id -> store index, boxes checked)."""
    N = len(order_)
    t, l, h, w = values["box"]
    H, W = sizes[i]
    if h < 1 or w < 1 or t < 0 or l < 0 or t + h > H or l + w > W:
        raise LabelFileError(f"{where}: crop box {values['box']} must lie inside the image of size {[int(H), int(W)]}")
    boxes[b, s], flips[b, s] = values["box"], values["flip"]
    partner = values["partner"]
    if partner is not None:
        if not 0 <= partner < N:
            raise LabelFileError(f"{where}: partner id {partner} is not a dataset index (0..{N - 1})")
        j = int(order_[partner])
        pt, pl, ph, pw = values["partner_crop_box"]
        PH, PW = sizes[j]
        if ph < 1 or pw < 1 or pt < 0 or pl < 0 or pt + ph > PH or pl + pw > PW:
            raise LabelFileError(f"{where}: partner crop box {values['partner_crop_box']} must lie inside partner "
                                 f"image {j} of size {[int(PH), int(PW)]}")
    for c in cols:
        v = values[c.name]
        if c.name.endswith("_partner"):
            v = -1 if v is None else int(order_[v])
        aug[c.name][b, s] = v

