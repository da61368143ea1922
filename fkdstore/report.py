"""What a store holds and what a store would cost: ``fkdstore inspect`` and ``fkdstore estimate``.

:func:`inspect` returns one JSON-serialisable dict; ``fkdstore inspect --json`` prints exactly it.
Keys (all sizes in bytes):

``path``, ``format``, ``format_version``, ``library_version``
    where the store is and which format/library wrote it.
``codec``
    the codec config, e.g. ``{"name": "ms", "k": 5, "dtype": "float16"}``.
``crops``, ``crop_sampler``
    ``"stored"`` (box and flip arrays) or ``"seeded"`` (format 3.0: derived from ``crop_sampler``, the
    sampler config in the header; null for stored crops).
``num_images``, ``crops_per_image``, ``num_classes``, ``aug`` (list of ``{name, kind}``), ``has_labels``,
``images_per_chunk``, ``images_per_shard``
    the header's shape and layout fields.
``images_written``, ``complete``, ``missing_ranges``
    completion: images whose ``written`` flag is set, and half-open ``[start, stop)`` ranges of the rest.
``arrays``
    one entry per array: ``{name: {shape, dtype, chunks, shards, raw_bytes, stored_bytes, files,
    compression_ratio}}``; ``shards`` is null for unsharded arrays, ``compression_ratio`` is
    ``raw_bytes / stored_bytes`` (raw = every element of the array, written or not).
``total_bytes``, ``total_files``
    everything under the store folder (or URL prefix), metadata included. For a remote store (``s3://``...)
    these come from one recursive listing through the store API (object sizes, nothing downloaded), so
    they are the same numbers a local copy of the store gives.
``bytes_per_crop``
    ``total_bytes / (images_written * crops_per_image)``; ``label_bytes_per_crop`` and
    ``box_bytes_per_crop`` and ``aug_bytes_per_crop`` split the per-crop arrays into the codec's fields,
    box+flip, and the augmentation columns.
``aug``, ``augment``
    the augmentation columns (name, kind, dtype, shape) and the pipeline the teacher saw (policy configs).
``replay``
    who replays the pixels (:func:`replay_note`): fkdstore, or the external library a store imported with
    seeds of another pipeline needs (e.g. TinyViT's timm pipeline).
``meta``
    the provenance attribute as stored (sampler, teacher, history, ...); ``sampler`` and ``teacher``
    repeat ``meta["sampler"]`` / ``meta["teacher"]`` (null when absent).
``label_stats``
    computed on a seeded sample of written crops (:func:`crop_sample`): ``{sampled_crops, seed, kept_mass_mean
    (null for hard), entropy_mean_nats, top1_agreement (null without ground-truth labels), distinct_top1,
    top1_prob_mean (mean decoded top-1 probability)}``.
``warnings``
    what looks wrong, from the header and the same crop sample: a list of ``{code, message, ...}`` with
    ``code`` one of ``top1_agreement`` (teacher top-1 agrees with the ground truth far less than its
    confidence says: a likely class-order or preprocessing mismatch), ``normalization`` (meta mean/std
    implausible, e.g. std in 0-255 units) and ``fallback_crops`` (many crops are RandomResizedCrop's centre
    fallback); empty when nothing does. The rules and their thresholds: :mod:`fkdstore.diagnose`.
``plots``
    only with ``inspect(..., plots=DIR)``: the PNG files written there (:func:`fkdstore.plots.write_plots`).
``compatibility``
    data types of this store that some Zarr v3 readers lack (:func:`reader_compatibility`): a list of
    ``{dtype, arrays, note}``, empty when the store uses core Zarr v3 types any reader has.
``imagenet_extrapolation``
    ``{num_images: 1281167, crops_per_image, bytes (this library, from this store's measured bytes per
    crop), paper_formula_bytes (Table 2's formula at the same shape), paper_table2 (the paper's printed
    figure for this strategy at 1.2M x 200, or null)}``.

Estimates. :func:`estimate_bytes` predicts the size of a store in this library's layout: raw bytes of every
array (from the codec's fields, :func:`fkdstore.schema.default_layout` and the box dtype) times a measured
compression ratio per array role (:data:`CALIBRATION`), plus shard-index, chunk-header and metadata overhead.
:func:`calibrate` measures those ratios by writing stores with teacher-like distributions
(:func:`teacher_like_probs`, a peaked softmax whose top classes repeat across an image's crops) and
torchvision-style crop boxes on ImageNet-like image sizes; the constants below are its output for
``calibrate(num_images=256, crops=200, classes=1000)`` (``python -m fkdstore.report`` re-runs it).
Real teachers differ: expect the estimate within about 10-15% for the label fields.

:func:`paper_bytes` is the paper's own accounting (Table 2, "+ Coordinate & Flip" row): every crop stores
4 coordinates, 1 flip and the label values as float32, i.e. ``N * M * (5 + L) * 4`` bytes with
``L = 1`` (hard), ``2`` (smoothing), ``2K`` (MS/MR top-K) or ``C`` (full). The paper prints GiB as "GB".
At exactly 1.2M x 200 the formula gives 5.36 / 6.26 / 13.41 / 22.35 GiB (full: 0.88 TiB) against the
printed 5.3 / 6.2 / 13.3 / 22.2 GB and ~0.9 TB: within 1.3%, every one slightly above. The printed
figures are "Real Cons. on Disk" and all match the formula to the printed digit at N*M = 2.38e8 crops
(e.g. 1.19M images), so they were most likely measured on a slightly smaller image count.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import codecs as _codecs
from . import diagnose
from . import plots as _plots
from . import reader as _reader
from . import report_maps as _maps
from . import schema as S
from . import storage as _storage
from . import writer as _writer
from .augment.pipeline import Pipeline
from .ownership import OWNERS
from .seeded import SlotCropSampler

__all__ = [
    "IMAGENET_1K_IMAGES", "PAPER_TABLE2", "CALIBRATION", "inspect", "format_inspect", "label_stats",
    "paper_bytes", "paper_table2", "estimate_bytes", "format_estimate", "teacher_like_probs", "calibrate",
    "human_bytes", "READER_GAPS", "reader_compatibility", "crop_sample",
]

IMAGENET_1K_IMAGES = 1_281_167
PAPER_IMAGES, PAPER_CROPS, PAPER_CLASSES = 1_200_000, 200, 1000
GIB, TIB = 2**30, 2**40

# Table 2 of the paper, "Real Cons. on Disk" (1.2M images x 200 crops x 1000 classes, float32), as printed.
PAPER_TABLE2: dict[tuple[str, int | None], str] = {
    ("full", None): "~0.9 TB",
    ("hard", None): "5.3 GB",
    ("smoothing", None): "6.2 GB",
    ("mr", 5): "13.3 GB",
    ("ms", 5): "13.3 GB",
    ("ms", 10): "22.2 GB",
}
PAPER_TABLE2_GIB: dict[tuple[str, int | None], float] = {
    ("full", None): 0.9 * 1024, ("hard", None): 5.3, ("smoothing", None): 6.2,
    ("mr", 5): 13.3, ("ms", 5): 13.3, ("ms", 10): 22.2,
}

# Stored/raw ratio per array role, measured by calibrate(num_images=256, crops=200, classes=1000) with
# zarr 3.1.6 and the compressor of fkdstore.schema.COMPRESSOR. See the module docstring.
CALIBRATION: dict[str, float] = {
    "box": 0.579,
    "flip": 0.253,
    "aug": 1.0,  # not calibrated: augmentation parameters are arbitrary float32
    "indices_topk": 0.634,
    "probs_topk": 0.875,
    "indices_top1": 0.561,
    "probs_top1": 0.854,
    "probs_full": 0.801,
    # q8 roles: calibrate(num_images=64, codecs=("full:dtype=q8", "smoothing:dtype=q8", "ms:k=5,dtype=q8"))
    "probs_full_q8": 0.76,
    "probs_top1_q8": 1.045,
    "probs_topk_q8": 0.957,
    # logits q8 stores the q8 codes of the same probabilities: byte-identical arrays (benchmarks/codec_fidelity.py)
    "logits_full_q8": 0.76,
    "logits_topk_q8": 0.957,
    "logits_topk": 1.0,  # not calibrated: float log-probabilities
    "logits_full": 1.0,  # not calibrated
    # sampled: measured by benchmarks/sampled_size.py (teacher_like_probs, 300 images x 200 crops, C = 1000, S = 16)
    "indices_sampled": 0.614,
    "counts_sampled": 0.226,
    "logp_sampled": 1.0,  # not calibrated: float log-probabilities
    "image_key": 0.234,  # per key character (zstd over sorted ImageNet-style paths)
    "per_image": 0.445,  # image_size + label + written, per raw byte (13 B per image)
}
CHUNK_OVERHEAD = 16 + 4 + 16  # shard-index entry + crc32c + blosc header, per inner chunk per array
METADATA_BYTES = 810  # one zarr.json (measured mean over a store's metadata files)
AVG_KEY_BYTES = 32  # e.g. "n01440764/n01440764_10026.JPEG"


# ------------------------------------------------------------------------------------------- helpers
def human_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; binary units, as the paper's "GB"."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"  # pragma: no cover


def _codec_key(codec: _codecs.LabelCodec) -> tuple[str, int | None]:
    return codec.name, codec.k


# ------------------------------------------------------------------------------------------- paper
def paper_values_per_crop(codec, num_classes: int) -> int:
    """Float32 values per crop in the paper's Table 2: 4 coordinates + 1 flip + the label values."""
    return _codecs.as_codec(codec).paper_values_per_crop(num_classes)


def paper_bytes(num_images: int, crops: int, num_classes: int, codec, k: int | None = None) -> int:
    """The paper's formula (Table 2): ``num_images * crops * (5 + L) * 4`` bytes (float32 values)."""
    return int(num_images) * int(crops) * paper_values_per_crop(_codecs.as_codec(codec, k=k), num_classes) * 4


def paper_table2(codec, k: int | None = None) -> str | None:
    """The paper's printed Table 2 figure for this strategy (1.2M x 200 x 1000), or None if not in the table."""
    return PAPER_TABLE2.get(_codec_key(_codecs.as_codec(codec, k=k)))


# ------------------------------------------------------------------------------------------- estimate
def estimate_bytes(num_images: int, crops: int, num_classes: int, codec, k: int | None = None, *,
                   max_side: int = 500, num_aug: int = 0, calibration: dict[str, float] | None = None,
                   store_crops: bool = False) -> dict[str, Any]:
    """Predicted size of a store in this library's layout.

    Returns ``{bytes, bytes_per_crop, files, images_per_chunk, images_per_shard, arrays: {name: bytes}}``.
    ``max_side`` (largest image side) picks the box dtype; ``calibration`` overrides :data:`CALIBRATION`;
    ``store_crops``: box and flip stored; by default they are derived from the crop sampler, not stored (they
    keep their manifest columns).
    """
    cal = dict(CALIBRATION, **(calibration or {}))
    codec = _codecs.as_codec(codec, k=k)
    N, M, C = int(num_images), int(crops), int(num_classes)
    if min(N, M, C) < 1:
        raise _codecs.ValidationError(f"images, crops and classes must be >= 1. Got {N}, {M}, {C}.")
    fields = codec.fields(C)
    bdt = S.box_dtype(max_side)
    per_crop = {S.BOX: (4 * np.dtype(bdt).itemsize, "box"), S.FLIP: (1, "flip")}
    for a in range(num_aug):  # format 2: one array per column; float32 unless a policy declares less
        per_crop[S.aug_path(f"a{a}")] = (4, "aug")
    roles = codec.roles()
    for name, spec in fields.items():
        per_crop[S.soft_path(name)] = (spec.nbytes, roles[name])
    row_bytes = max(M * b for b, _ in per_crop.values())
    ipc, ips = S.default_layout(N, row_bytes, M)
    n_chunks = math.ceil(N / ipc)
    n_shards = math.ceil(N / ips)
    columns = len(per_crop)  # manifest columns (derived arrays keep theirs)
    if not store_crops:
        per_crop = {k: v for k, v in per_crop.items() if k not in (S.BOX, S.FLIP)}
    arrays = {}
    for name, (raw, role) in per_crop.items():
        arrays[name] = int(N * M * raw * cal[role] + n_chunks * CHUNK_OVERHEAD + METADATA_BYTES)
    arrays[S.KEY] = int(N * AVG_KEY_BYTES * cal["image_key"] + METADATA_BYTES)
    arrays["per-image"] = int(N * 13 * cal["per_image"] + 3 * METADATA_BYTES)
    # crc32c tags are incompressible: one per inner chunk of every record array, three per shard (key, size, label)
    arrays[S.MANIFEST] = int(n_chunks * columns * 4 + n_shards * (len(S.BOUND_PER_IMAGE) * 4 + 8) + METADATA_BYTES)
    groups = 2 + (1 if num_aug else 0)  # root, soft (and aug) zarr.json
    total = sum(arrays.values()) + groups * METADATA_BYTES
    # record arrays, the 4 per-image arrays and the manifest: one file per shard each (+ zarr.json); the groups
    files = (len(per_crop) + len(S.PER_IMAGE_ARRAYS) + 1) * (n_shards + 1) + groups
    return {
        "kind": S.REGIONS, "codec": codec.get_config(), "num_images": N, "crops_per_image": M, "num_classes": C,
        "bytes": int(total), "bytes_per_crop": total / (N * M), "files": int(files),
        "images_per_chunk": ipc, "images_per_shard": ips, "arrays": arrays,
        "paper_formula_bytes": paper_bytes(N, M, C, codec),
    }


def format_estimate(e: dict[str, Any], paper: bool = False) -> str:
    """Human-readable rendering of an estimate (:func:`estimate_bytes`, or
    :func:`fkdstore.report_maps.estimate_map_bytes` for label maps); ``paper``: the paper's Table 2 accounting."""
    return kind_report(e.get("kind", S.REGIONS)).format_estimate(e, paper)


def _format_regions_estimate(e: dict[str, Any], paper: bool = False) -> str:
    cfg = e["codec"]
    name = cfg["name"] + (f" K={cfg['k']}" if "k" in cfg else "")
    shape = f"{e['num_images']:,} images x {e['crops_per_image']} crops x {e['num_classes']} classes, codec {name}"
    if paper:
        b = e["paper_formula_bytes"]
        fig = paper_table2(cfg)
        lines = [
            f"paper formula (Table 2, float32): {shape}",
            f"  N x M x (4 coords + 1 flip + {paper_values_per_crop(cfg, e['num_classes']) - 5} label values) x 4 B"
            f" = {b:,} bytes = {human_bytes(b)} ({b / 1e9:.2f} GB decimal)",
        ]
        if fig:
            lines.append(f"  paper's Table 2 figure for this strategy at 1.2M x 200 x 1000: {fig} (GiB)")
        return "\n".join(lines)
    return "\n".join([
        f"fkdstore layout estimate: {shape}",
        f"  {e['bytes']:,} bytes = {human_bytes(e['bytes'])}, {e['bytes_per_crop']:.2f} B/crop, "
        f"{e['files']:,} files (shards of {e['images_per_shard']:,} images, chunks of {e['images_per_chunk']})",
        *(f"    {n:<14} {human_bytes(b)}" for n, b in e["arrays"].items()),
        f"  paper's float32 formula for the same shape: {human_bytes(e['paper_formula_bytes'])} "
        f"({e['paper_formula_bytes'] / max(e['bytes'], 1):.1f}x this layout)",
    ])


# ------------------------------------------------------------------------------------------- teacher-like data
def teacher_like_probs(rng: np.random.Generator, num_images: int, crops: int, classes: int,
                       labels: np.ndarray | None = None) -> np.ndarray:
    """(N, M, C) float32 softmax outputs that look like a strong teacher's on random crops.

    Per image a true class and 4 confusable classes get logit boosts shared by all its crops (so top
    classes repeat within an image); each crop scales the boosts by U(0.3, 1.2) (crops that miss the
    object are less sure) and adds N(0, 1) noise over all classes.
    """
    N, M, C = num_images, crops, classes
    if labels is None:
        labels = rng.integers(0, C, N)
    conf = rng.integers(0, C, (N, 4))
    boost = np.zeros((N, C), np.float32)
    boost[np.arange(N)[:, None], conf] = rng.uniform(2, 6, (N, 4))
    boost[np.arange(N), labels] = rng.uniform(7, 11, N)
    base = rng.normal(0, 0.7, (N, 1, C)).astype(np.float32)
    out = np.empty((N, M, C), np.float32)
    for i in range(N):
        z = base[i] + boost[i][None] * rng.uniform(0.3, 1.2, (M, 1)).astype(np.float32)
        z += rng.normal(0, 1.0, (M, C)).astype(np.float32)
        z -= z.max(-1, keepdims=True)
        e = np.exp(z)
        out[i] = e / e.sum(-1, keepdims=True)
    return out


def calibrate(tmpdir: str | os.PathLike | None = None, *, num_images: int = 256, crops: int = 200,
              classes: int = 1000, codecs: tuple = ("full", "hard", "smoothing", "ms:k=5", "ms:k=10"),
              seed: int = 0) -> dict[str, float]:
    """Measure stored/raw per array role on stores written from :func:`teacher_like_probs`.

    Returns a dict with the keys of :data:`CALIBRATION` that the given codecs exercise.
    """
    rng = np.random.default_rng(seed)
    N, M, C = num_images, crops, classes
    sizes = np.stack([rng.integers(300, 501, N), rng.integers(375, 501, N)], 1)
    sampler = SlotCropSampler(seed=seed)
    boxes, flips = zip(*(sampler.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N)))
    boxes, flips = np.stack(boxes), np.stack(flips)
    labels = rng.integers(0, C, N)
    probs = teacher_like_probs(rng, N, M, C, labels)
    keys = [f"n{labels[i]:08d}/n{labels[i]:08d}_{i}.JPEG" for i in range(N)]
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=tmpdir) as td:
        for spec in codecs:
            codec = _codecs.as_codec(spec)
            path = Path(td) / spec.replace(":", "_").replace("=", "").replace(",", "_")
            with _writer.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec,
                              image_keys=keys, image_sizes=sizes, labels=labels) as w:
                for a in range(0, N, 64):
                    sl = slice(a, min(N, a + 64))
                    w.put(np.arange(sl.start, sl.stop), boxes[sl], flips[sl], probs[sl])
            stats = storage_stats(path)
            roles = {S.BOX: "box", S.FLIP: "flip"} | {S.soft_path(f): r for f, r in codec.roles().items()}
            raw = {S.BOX: 8, S.FLIP: 1} | {S.soft_path(f): s.nbytes for f, s in codec.fields(C).items()}
            for name, role in roles.items():
                out.setdefault(role, []).append(stats[name]["bytes"] / (N * M * raw[name]))
            out.setdefault("image_key", []).append(stats[S.KEY]["bytes"] / sum(len(k) for k in keys))
            out.setdefault("per_image", []).append(
                sum(stats[n]["bytes"] for n in (S.IMAGE_SIZE, S.LABEL, S.WRITTEN)) / (N * 13))
            out.setdefault("metadata_per_file", []).append(stats["."]["bytes"] / stats["."]["files"])
    return {k: round(float(np.mean(v)), 3) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- inspect
def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def crop_sample(reader, sample: int = 4096, seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded sample of written crops behind :func:`label_stats`, inspect's warnings and its plots.

    ``n = min(sample, written images x M)`` crops drawn without replacement with ``default_rng(seed)`` from the
    flat (image, slot) positions of the written images, in (image, slot) order. Returns arrays of length ``n``:
    ``image``, ``slot`` (int64), ``box`` ((n, 4) int64 top, left, height, width), ``size`` ((n, 2) the
    image's height, width), ``label`` (ground truth, -1 unknown), ``top1`` (argmax of the decoded label),
    ``top1_prob`` (its probability), ``entropy`` (nats) and ``kept`` (mass kept by the stored entries; NaN
    for the hard codec), all float64 but the first ones."""
    written = np.flatnonzero(reader.written)
    M, C = reader.crops_per_image, reader.num_classes
    n = min(max(int(sample), 0), len(written) * M)
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(len(written) * M, size=n, replace=False)) if n else np.zeros(0, np.int64)
    img, slot = written[flat // M], flat % M
    uniq, inv = np.unique(img, return_inverse=True)
    box, kept, ent, top1, top1_prob = [np.zeros((0, 4), np.int64)], [], [], [np.zeros(0, np.int64)], []
    step = max(1, (32 * 2**20) // max(1, M * C * 4))  # decode at most ~32 MiB at once
    for a in range(0, len(uniq), step):
        sel = (inv >= a) & (inv < a + step)
        rec = reader.read_batch(uniq[a:a + step])
        rows, sl = inv[sel] - a, slot[sel]
        fields = {k: v[rows, sl] for k, v in rec.fields.items()}
        box.append(np.asarray(rec.box[rows, sl], np.int64))
        kept.append(np.asarray(reader.codec.kept_mass(fields), np.float64))
        dist = reader.decode(fields)
        ent.append(_entropy(dist.astype(np.float64)))
        top1.append(np.argmax(dist, -1))
        top1_prob.append(np.max(dist, -1).astype(np.float64))
    return {"image": img.astype(np.int64), "slot": slot.astype(np.int64), "box": np.concatenate(box),
            "size": np.asarray(reader.image_sizes, np.int64)[img].reshape(-1, 2),
            "label": np.asarray(reader.labels, np.int64)[img], "top1": np.concatenate(top1).astype(np.int64),
            "top1_prob": np.concatenate(top1_prob or [np.zeros(0)]), "entropy": np.concatenate(ent or [np.zeros(0)]),
            "kept": np.concatenate(kept or [np.zeros(0)])}


def label_stats(reader, sample: int = 4096, seed: int = 0, *, crops: dict[str, np.ndarray] | None = None
                ) -> dict[str, Any]:
    """Statistics on ``sample`` crops drawn (seeded) from the written images of ``reader``
    (:func:`crop_sample`; pass its result as ``crops`` to reuse a sample)."""
    crops = crop_sample(reader, sample, seed) if crops is None else crops
    res: dict[str, Any] = {"sampled_crops": 0, "seed": int(seed), "kept_mass_mean": None, "entropy_mean_nats": None,
           "top1_agreement": None, "distinct_top1": 0, "top1_prob_mean": None}
    n = len(crops["image"])
    if n == 0:
        return res
    kept, top1 = crops["kept"], crops["top1"]
    res.update(sampled_crops=int(n), entropy_mean_nats=float(crops["entropy"].mean()),
               distinct_top1=int(len(np.unique(top1))), top1_prob_mean=float(crops["top1_prob"].mean()))
    if not np.isnan(kept).all():
        res["kept_mass_mean"] = float(np.nanmean(kept))
    labels = crops["label"]
    known = labels >= 0
    if known.any():
        res["top1_agreement"] = float((top1[known] == labels[known]).mean())
        res["top1_agreement_crops"] = int(known.sum())
    return res


def _array_info(arr, stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    md = arr.metadata.to_dict()
    grid = list(md["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = md.get("codecs", ())
    if codecs and codecs[0]["name"] == "sharding_indexed":
        chunks, shards = list(codecs[0]["configuration"]["chunk_shape"]), grid
    else:
        chunks, shards = grid, None
    dtype = str(arr.dtype)
    if arr.dtype.kind in "OTU" or "str" in dtype.lower():
        dtype, raw = "string", None
    else:
        raw = int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    st = stats.get(arr.path, {"bytes": 0, "files": 0})
    stored = st["bytes"]
    return {
        "shape": list(arr.shape), "dtype": dtype, "chunks": chunks, "shards": shards,
        "raw_bytes": raw, "stored_bytes": stored, "files": st["files"],
        "compression_ratio": (raw / stored) if (raw is not None and stored) else None,
    }


# Data types a store may use that some Zarr v3 readers lack (spec/format-v4.md section 3), with what to do.
READER_GAPS: dict[str, str] = {
    "float16": "JavaScript readers need Float16Array (ES2025; Node.js 20 lacks it) or a bit-exact polyfill, "
               "else they refuse (zarrita); float32 or q8 fields avoid it",
    "string": "a zarr-python extension, not core Zarr v3: TensorStore and other core readers cannot open it; "
              "`fkdstore convert` rewrites the store as format 2.0 (uint8 keys)",
}


def reader_compatibility(arrays: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries of :data:`READER_GAPS` this store hits: ``[{dtype, arrays, note}]`` from :func:`inspect`'s
    ``arrays`` dict (``{name: {"dtype": ...}}``); empty when every array has a type every reader has."""
    out = []
    for dtype, note in READER_GAPS.items():
        names = [n for n, a in arrays.items() if a["dtype"] == dtype]
        if names:
            out.append({"dtype": dtype, "arrays": names, "note": note})
    return out


def inspect(path: str | os.PathLike, *, sample: int = 4096, seed: int = 0,
            storage_options: dict[str, Any] | None = None, plots: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything ``fkdstore inspect`` shows, as one JSON-serialisable dict (keys: module docstring; a
    label-map store has the keys of :meth:`fkdstore.report_maps.MapReport.inspect` instead of the crop ones).

    ``path`` is a folder or a URL (with ``storage_options``). Stored bytes and file counts of a remote store
    come from one recursive listing through the store API (object sizes; no object is downloaded for them),
    so they equal what a local copy of the store holds. ``plots``: a folder to write the PNG plots of
    :func:`fkdstore.plots.write_plots` into (from the same crop sample; key ``plots``; crop regions only)."""
    r = _reader.open(path, storage_options=storage_options)
    h = r.header
    stats = storage_stats(path, storage_options=storage_options)
    names = [*h.per_image_arrays, *r.record_arrays, S.MANIFEST]
    arrays = {n: _array_info(r.array(n), stats) for n in names}
    written = int(r.written.sum())
    total = stats["_total"]["bytes"]
    kind = kind_report(h.kind)
    out = {
        "path": str(path), "format": S.FORMAT_NAME, "format_version": h.format_version, "kind": h.kind,
        "store_id": h.store_id, "library_version": h.library_version,
        "replay": None if h.replay is None else h.replay.get_config(),
        "num_images": h.num_images, "num_classes": h.num_classes, "has_labels": h.has_labels,
        "images_per_chunk": h.images_per_chunk, "images_per_shard": h.images_per_shard,
        "images_written": written, "complete": written == h.num_images,
        "missing_ranges": [list(x) for x in r.missing_ranges()],
        "arrays": arrays, "total_bytes": int(total), "total_files": int(stats["_total"]["files"]),
        "meta": dict(h.meta), "teacher": h.meta.get("teacher"),
        "compatibility": reader_compatibility(arrays),
    }
    extra, sampled = kind.inspect(r, arrays, total, sample=sample, seed=seed)
    out.update(extra)
    r.close()
    if plots is not None:
        out["plots"] = kind.plots(out, sampled, plots)
    return out


class _RegionReport:
    """The ``regions`` kind's part of :func:`inspect` and :func:`format_inspect` (crops, codec, per-crop sizes,
    label statistics of stored crops, warnings, the paper's Table 2 for the codec)."""

    @staticmethod
    def inspect(r, arrays: dict[str, dict[str, Any]], total: int, *, sample: int, seed: int):
        h = r.header
        crops = int(r.written.sum()) * h.crops_per_image
        soft = sum(a["stored_bytes"] for n, a in arrays.items() if n.startswith(S.SOFT_GROUP + "/"))
        geo = sum(arrays[n]["stored_bytes"] for n in (S.BOX, S.FLIP) if n in arrays)  # 0: seeded crops
        aug = sum(arrays[n]["stored_bytes"] for n in r.per_crop_arrays if n == S.AUG or n.startswith(S.AUG + "/"))
        codec = r.codec
        ext_bytes = None
        if crops:
            # per-crop arrays scale with N*M; per-image arrays and metadata with N (or not at all).
            per_crop_b = (soft + geo + aug) / crops
            per_image_b = sum(arrays[n]["stored_bytes"] for n in h.per_image_arrays) / h.num_images
            ext_bytes = int(per_crop_b * IMAGENET_1K_IMAGES * h.crops_per_image + per_image_b * IMAGENET_1K_IMAGES)
        sampled = crop_sample(r, sample, seed)
        return {
            "codec": codec.get_config(),
            "crops": "seeded" if h.seeded else "stored", "crop_sampler": h.sampler.get_config() if h.seeded else None,
            "crops_per_image": h.crops_per_image,
            "aug": [a.to_json() for a in h.aug], "augment": h.augment.get_config(),
            "pixel_replay": replay_note(h.augment),
            "bytes_per_crop": total / crops if crops else None,
            "label_bytes_per_crop": soft / crops if crops else None,
            "box_bytes_per_crop": geo / crops if crops else None,
            "aug_bytes_per_crop": aug / crops if crops else None,
            "sampler": h.meta.get("sampler"),
            "label_stats": label_stats(r, sample=sample, seed=seed, crops=sampled),
            "warnings": diagnose.store_warnings(h, codec, sampled),
            "imagenet_extrapolation": {
                "num_images": IMAGENET_1K_IMAGES, "crops_per_image": h.crops_per_image,
                "bytes": ext_bytes,
                "paper_formula_bytes": paper_bytes(IMAGENET_1K_IMAGES, h.crops_per_image, h.num_classes, codec),
                "paper_table2": PAPER_TABLE2.get(_codec_key(codec)),
            },
        }, sampled

    format_estimate = staticmethod(_format_regions_estimate)
    image = staticmethod(diagnose.image_slots)
    format_image = staticmethod(diagnose.format_image_slots)

    @staticmethod
    def plots(d, sampled, folder) -> list[str]:
        return _plots.write_plots(d, sampled, folder)

    @staticmethod
    def head(d: dict[str, Any]) -> list[str]:
        cfg = d["codec"]
        L = [f"codec      {cfg['name']}  config {cfg}",
             f"shape      {d['num_images']:,} images x {d['crops_per_image']} crops, {d['num_classes']} classes"
             + (f", aug {[a['name'] for a in d['aug']]}" if d["aug"] else "")]
        if d.get("crops") == "seeded":
            c = d["crop_sampler"]
            L.append(f"crops      seeded (box and flip derived, not stored): seed {c['seed']}, scale {c['scale']}, "
                     f"ratio {[round(x, 4) for x in c['ratio']]}, flip_p {c['flip_p']}")
        if d.get("augment"):
            L.append(f"augment    {_short(d['augment'], 320)}")
        return L

    @staticmethod
    def size_lines(d: dict[str, Any]) -> list[str]:
        return [f"per crop   {_fmt(d['bytes_per_crop'], '.2f')} B (labels {_fmt(d['label_bytes_per_crop'], '.2f')} B, "
                f"box/flip {_fmt(d['box_bytes_per_crop'], '.2f')} B, aug {_fmt(d.get('aug_bytes_per_crop'), '.2f')} B)"]

    @staticmethod
    def tail(d: dict[str, Any]) -> list[str]:
        s = d["label_stats"]
        e = d["imagenet_extrapolation"]
        return [
            "",
            f"labels     on {s['sampled_crops']:,} sampled crops (seed {s['seed']}):",
            f"  mass kept by stored entries  {_fmt(s['kept_mass_mean'])}",
            f"  mean entropy (nats)          {_fmt(s['entropy_mean_nats'])}",
            f"  teacher top-1 = ground truth {_fmt(s['top1_agreement'])}",
            f"  distinct top-1 classes       {s['distinct_top1']}",
            "",
            f"ImageNet-1K ({e['num_images']:,} images x {e['crops_per_image']} crops, same codec):",
            f"  this layout     {human_bytes(e['bytes'])}",
            f"  paper formula   {human_bytes(e['paper_formula_bytes'])} (float32, Table 2's accounting)",
            f"  paper Table 2   {e['paper_table2'] or 'not in the table'}"
            + (" (at 1.2M x 200 crops)" if e["paper_table2"] else ""),
        ]


def replay_note(augment: Pipeline) -> str:
    """Who replays a store's pixels, in one line: fkdstore (crops and policies, with partner crops carried in
    the slot when the pipeline has ``partner_crop``), or the external library an ``external_seed`` policy
    names (fkdstore cannot replay those pixels)."""
    pipeline = augment
    if pipeline.external is not None:
        return pipeline.external.describe()
    what = "crop and flip" + (" then " + ", ".join(p.name for p in pipeline.policies) if len(pipeline) else "")
    carried = "; mixed slots carry their partner's crop (partner_crop)" if pipeline.partner_crop else ""
    return f"fkdstore ({what}){carried}"


def _fmt_ranges(ranges: list, limit: int = 5) -> str:
    s = ", ".join(f"[{a}, {b})" for a, b in ranges[:limit])
    return s + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


def _short(v, limit: int = 200) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[: limit - 5] + " ...}"


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def format_inspect(d: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`inspect`'s dict (the record kind's lines from its report class)."""
    kind = kind_report(d.get("kind", S.REGIONS))
    L = [
        f"store      {d['path']}",
        f"format     {d['format']} {d['format_version']} (written by fkdstore {d['library_version'] or '?'})",
        *kind.head(d),
        f"written    {d['images_written']:,} / {d['num_images']:,} images"
        + ("" if d["complete"] else f"; missing {_fmt_ranges(d['missing_ranges'])}"),
        f"layout     {d['images_per_chunk']} images per chunk, {d['images_per_shard']} per shard",
    ]
    if d.get("replay"):
        r = d["replay"]
        L.append(f"replay     input {r['input_size'][0]} x {r['input_size'][1]} {r['interpolation']}, mean "
                 f"{r['mean']}, std {r['std']}")
    if d.get("pixel_replay"):
        L.append(f"pixels     replayed by {d['pixel_replay']}")
    L += [
        "",
        f"{'array':<18}{'shape':<18}{'dtype':<9}{'chunks':<16}{'shards':<16}{'stored':>12}{'ratio':>8}{'files':>7}",
    ]
    for n, a in d["arrays"].items():
        L.append(
            f"{n:<18}{str(tuple(a['shape'])):<18}{a['dtype'][:8]:<9}{str(tuple(a['chunks'])):<16}"
            f"{str(tuple(a['shards'])) if a['shards'] else '-':<16}{human_bytes(a['stored_bytes']):>12}"
            f"{_fmt(a['compression_ratio'], '.2f'):>8}{a['files']:>7}"
        )
    L += [
        f"total      {human_bytes(d['total_bytes'])} ({d['total_bytes']:,} bytes) in {d['total_files']} files",
        *kind.size_lines(d),
        *([f"readers    {c['dtype']} in {', '.join(c['arrays'])}: {c['note']}" for c in d["compatibility"]]
          or ["readers    core Zarr v3 data types only: any Zarr v3 reader with the spec's codecs reads it"]),
        "",
    ]
    if "sampler" in d:
        L.append(f"sampler    {_short(d['sampler'], 320) if d['sampler'] is not None else '-'}")
    L.append(f"teacher    {_short(d['teacher'], 320) if d['teacher'] is not None else '-'}")
    other = {k: v for k, v in d["meta"].items() if k not in ("sampler", "teacher", "history")}
    if other:
        L.append(f"meta       {_short(other)}")
    for h in d["meta"].get("history", []) or []:
        L.append(f"history    {_short(h)}")
    L += [
        *kind.tail(d),
        "",
        *([f"warning    [{w['code']}] {w['message']}" for w in d.get("warnings") or []] or ["warnings   none"]),
    ]
    if d.get("plots"):
        L.append(f"plots      {', '.join(d['plots'])}")
    return "\n".join(L)


if __name__ == "__main__":  # pragma: no cover - re-measure CALIBRATION
    print(calibrate())


def storage_stats(location, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Bytes and objects (files) on storage per array of a store (metadata objects under ``"."``, ownership
    records under ``"owners"``), plus ``"_total"``.

    ``location``: a folder, a URL (with ``storage_options``) or a Zarr store. A local folder is walked; a
    remote store is listed through its store API (:func:`fkdstore._storage.object_sizes`: one recursive
    listing, sizes included, no object is read)."""
    store = _storage.as_store(location, read_only=True, storage_options=storage_options)
    out: dict[str, dict[str, int]] = {}
    for rel, size in _storage.object_sizes(store).items():
        if "/c/" in "/" + rel:
            name = ("/" + rel).split("/c/")[0].lstrip("/")
        elif rel.startswith(OWNERS + "/"):
            name = OWNERS
        else:
            name = "."
        d = out.setdefault(name, {"bytes": 0, "files": 0})
        d["bytes"] += size
        d["files"] += 1
    out["_total"] = {k: sum(d[k] for d in out.values()) for k in ("bytes", "files")}
    return out



def kind_report(kind: str):
    """The record kind's part of :func:`inspect`, :func:`format_inspect`, :func:`format_estimate` and ``inspect
    --image`` (``image`` / ``format_image``): crop regions here, label maps in :mod:`fkdstore.report_maps` (which
    uses this module's helpers, hence looked up at call time)."""
    return {S.REGIONS: _RegionReport, S.LABEL_MAP: _maps.MapReport}[kind]
