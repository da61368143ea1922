"""Label-map stores in ``fkdstore inspect`` and ``fkdstore estimate`` (the ``label_map`` record kind's part of
:mod:`fkdstore.report`, which dispatches to :class:`MapReport` by the store's kind).

Sizes. ReLabel publishes one ``torch.save`` file per image holding a ``[2, K, S, S]`` tensor (top-K scores and
class ids as floats): ``2 K S^2`` values plus the zip container (:data:`TORCH_SAVE_OVERHEAD`, measured:
10,537 bytes for ReLabel's K = 5, S = 15 float32 file, about 12.6 GiB for ImageNet-1K). The paper's Table 2
counts float32 values: ``N S^2 C`` for full maps (~1 TB) and ``N S^2 2K`` for top-5 maps (10 GB) at
N = 1.2M, S = 15, C = 1000 (:func:`paper_map_bytes`). fkdstore stores the same maps as ``map/indices``
(uint16) and ``map/scores`` (float32 or float16), compressed (:func:`estimate_map_bytes`; the compression
ratios in :data:`MAP_CALIBRATION` are measured on synthetic teacher-like maps, :func:`calibrate_maps`).

Label statistics of a label-map store are computed on a seeded sample of RandomResizedCrop crops of the
written images, pooled by the store's replay equation with one label per crop (:func:`map_crop_sample`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import diagnose
from . import report as _report
from . import schema as S
from . import writer as _writer
from .errors import ValidationError
from .labelmap import LabelMapSpec, pool_labels
from .seeded import SlotCropSampler
from .validation import positive_int

__all__ = ["PAPER_RELABEL", "TORCH_SAVE_OVERHEAD", "MAP_CALIBRATION", "paper_map_bytes", "relabel_file_bytes",
           "estimate_map_bytes", "format_map_estimate", "parse_map_shape", "map_crop_sample", "map_label_stats",
           "MapReport", "teacher_like_maps", "calibrate_maps"]

PAPER_IMAGES, PAPER_SIZE, PAPER_K, PAPER_CLASSES = 1_200_000, 15, 5, 1000
PAPER_RELABEL = {"full": "~1 TB", "top-5": "10 GB"}
"""Table 2's ReLabel columns as printed ("Real Cons. on Disk", 1.2M images, 15 x 15 maps, 1000 classes)."""
TORCH_SAVE_OVERHEAD = 1537
"""Bytes a ``torch.save`` file adds to a ``[2, 5, 15, 15]`` tensor's data (torch 2.x zip container; measured
10,537 bytes for float32, 6,057 for float16)."""
MAP_CALIBRATION: dict[str, float] = {
    # stored / raw bytes, calibrate_maps(num_images=256, size=15, k=5, classes=1000), zarr 3.1, lz4hc + bitshuffle
    "map_indices": 0.552,
    "map_scores_float32": 1.008,  # raw float scores: incompressible (bitshuffle + lz4hc adds headers)
    "map_scores_float16": 1.008,
}


def paper_map_bytes(num_images: int, size: int, num_classes: int, k: int | None = None) -> int:
    """Table 2's accounting of ReLabel's maps (float32 values): ``N * S * S * C * 4`` for full maps
    (``k=None``), ``N * S * S * 2K * 4`` for top-K maps (scores and ids)."""
    per = int(num_classes) if k is None else 2 * int(k)
    return int(num_images) * int(size) ** 2 * per * 4


def relabel_file_bytes(size: int, k: int, dtype: str = "float32") -> int:
    """Bytes of one ReLabel / TokenLabeling ``.pt`` file: ``2 K S^2`` values of ``dtype`` plus the container."""
    return 2 * int(k) * int(size) ** 2 * np.dtype(dtype).itemsize + TORCH_SAVE_OVERHEAD


def parse_map_shape(text: str) -> LabelMapSpec:
    """``"S,K[,dtype]"`` (``estimate --label-map``) as a :class:`LabelMapSpec` (box order ``xy``; the replay
    fields do not change sizes). ValidationError naming the rule otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (2, 3) or not all(parts[:2]) or not all(p.isdigit() for p in parts[:2]):
        raise ValidationError(f"label map must be 'S,K' or 'S,K,dtype' (e.g. 15,5 or 15,5,float16). Got {text!r}.")
    return LabelMapSpec(size=int(parts[0]), k=int(parts[1]), dtype=parts[2] if len(parts) == 3 else "float32",
                        box_order="xy")


# ------------------------------------------------------------------------------------------- estimate
def estimate_map_bytes(num_images: int, num_classes: int, spec: LabelMapSpec, *,
                       calibration: dict[str, float] | None = None) -> dict[str, Any]:
    """Predicted size of a label-map store of ``num_images`` images in this library's layout.

    Returns ``{kind, label_map, num_images, num_classes, bytes, bytes_per_image, raw_bytes_per_image, files,
    images_per_chunk, images_per_shard, arrays: {name: bytes}, relabel_files_bytes, paper_formula_bytes (top-K),
    paper_full_bytes}``. ``calibration`` overrides :data:`MAP_CALIBRATION`."""
    if not isinstance(spec, LabelMapSpec):
        raise TypeError(f"spec must be a LabelMapSpec. Got {type(spec).__name__}.")
    cal = dict(MAP_CALIBRATION, **(calibration or {}))
    N, C = int(num_images), spec.check_num_classes(num_classes)
    if N < 1:
        raise ValidationError(f"images must be >= 1. Got {N}.")
    cells = spec.k * spec.size ** 2
    raw = {S.MAP_INDICES: (cells * np.dtype(spec.index_dtype(C)).itemsize, "map_indices"),
           S.MAP_SCORES: (cells * np.dtype(spec.dtype).itemsize, f"map_scores_{spec.dtype}")}
    ipc, ips = S.default_layout(N, max(b for b, _ in raw.values()), 1)
    n_chunks, n_shards = math.ceil(N / ipc), math.ceil(N / ips)
    arrays = {name: int(N * b * cal[role] + n_chunks * _report.CHUNK_OVERHEAD + _report.METADATA_BYTES)
              for name, (b, role) in raw.items()}
    arrays[S.KEY] = int(N * _report.AVG_KEY_BYTES * _report.CALIBRATION["image_key"] + _report.METADATA_BYTES)
    arrays["per-image"] = int(N * 13 * _report.CALIBRATION["per_image"] + 3 * _report.METADATA_BYTES)
    arrays[S.MANIFEST] = int(n_chunks * len(raw) * 4 + n_shards * (len(S.BOUND_PER_IMAGE) * 4 + 8)
                             + _report.METADATA_BYTES)
    groups = 2  # root and map/ zarr.json
    total = sum(arrays.values()) + groups * _report.METADATA_BYTES
    files = (len(raw) + len(S.PER_IMAGE_ARRAYS) + 1) * (n_shards + 1) + groups
    return {"kind": S.LABEL_MAP, "label_map": spec.get_config(), "num_images": N, "num_classes": C,
            "bytes": int(total), "bytes_per_image": total / N, "raw_bytes_per_image": spec.bytes_per_image(C),
            "files": int(files), "images_per_chunk": ipc, "images_per_shard": ips, "arrays": arrays,
            "relabel_files_bytes": N * relabel_file_bytes(spec.size, spec.k, spec.dtype),
            "paper_formula_bytes": paper_map_bytes(N, spec.size, C, spec.k),
            "paper_full_bytes": paper_map_bytes(N, spec.size, C)}


def _paper_figures(size: int, k: int | None, num_classes: int) -> dict[str, str | None]:
    same = size == PAPER_SIZE and num_classes == PAPER_CLASSES
    return {"full": PAPER_RELABEL["full"] if same else None,
            "top-k": PAPER_RELABEL["top-5"] if same and k == PAPER_K else None}


def format_map_estimate(e: dict[str, Any], paper: bool = False) -> str:
    """Human-readable rendering of :func:`estimate_map_bytes` (``paper``: Table 2's ReLabel columns next to
    fkdstore's size for the same maps)."""
    hb = _report.human_bytes
    m = e["label_map"]
    N, C, S_, K = e["num_images"], e["num_classes"], m["size"], m["k"]
    shape = f"{N:,} images, label maps K={K} x {S_} x {S_} ({m['dtype']} scores), {C} classes"
    fig = _paper_figures(S_, K, C)
    ours = f"{e['bytes']:,} bytes = {hb(e['bytes'])}, {e['bytes_per_image']:,.0f} B/image"
    if paper:
        full, topk = e["paper_full_bytes"], e["paper_formula_bytes"]
        where = f"{PAPER_IMAGES / 1e6:.1f}M x {PAPER_SIZE} x {PAPER_SIZE} x {PAPER_CLASSES}"
        return "\n".join([
            f"paper formula (Table 2, float32 values): {N:,} images x {S_} x {S_} label maps, {C} classes",
            f"  ReLabel (Full):    N x S x S x C x 4 B  = {full:,} bytes = {hb(full)} ({full / 1e12:.2f} TB decimal)"
            + (f"; paper's Table 2: {fig['full']}" if fig["full"] else f"; paper's Table 2 is at {where}"),
            f"  ReLabel (Top-{K}):   N x S x S x 2K x 4 B = {topk:,} bytes = {hb(topk)}"
            + (f"; paper's Table 2: {fig['top-k']}" if fig["top-k"] else f"; paper's Table 2 is at {where}, K=5"),
            f"  ReLabel's .pt files (torch.save per image): {hb(e['relabel_files_bytes'])}",
            f"  fkdstore, the same top-{K} maps ({m['dtype']} scores, uint16 ids, compressed; estimate): {ours}",
        ])
    return "\n".join([
        f"fkdstore layout estimate: {shape}",
        f"  {ours} (raw {e['raw_bytes_per_image']:,} B/image), {e['files']:,} files (shards of "
        f"{e['images_per_shard']:,} images, chunks of {e['images_per_chunk']})",
        *(f"    {n:<14} {hb(b)}" for n, b in e["arrays"].items()),
        f"  ReLabel's .pt files for the same maps: {hb(e['relabel_files_bytes'])} "
        f"({e['relabel_files_bytes'] / max(e['bytes'], 1):.1f}x this layout)",
        f"  paper's float32 formula for the same maps: top-{K} {hb(e['paper_formula_bytes'])}, full "
        f"{hb(e['paper_full_bytes'])}",
    ])


# ------------------------------------------------------------------------------------------- inspect
def map_crop_sample(reader, sample: int = 4096, seed: int = 0, *, batch: int = 512) -> dict[str, np.ndarray]:
    """A seeded sample of ``n = sample`` crops (0 without written images): images drawn with replacement from
    the written ones (``default_rng(seed)``), crop ``j`` the default :class:`~fkdstore.seeded.SlotCropSampler`
    (seed ``seed``) slot ``j`` of its image, pooled by the store's replay equation with one label per crop
    (``grid = 1``; flips follow the spec). Returns ``image``, ``box`` (n, 4), ``size`` (n, 2), ``label``,
    ``top1``, ``top1_prob``, ``entropy`` (nats), and per distinct sampled image ``whole_top1`` (the top-1 of
    the whole-image box), ``whole_label`` and ``cell_mass`` (mean over its cells of the stored classes' mass
    in the cell's softmax under the fill rule)."""
    written = np.flatnonzero(reader.written)
    n = int(sample) if len(written) else 0
    rng = np.random.default_rng(seed)
    img = np.sort(written[rng.integers(0, len(written), n)]) if n else np.zeros(0, np.int64)
    sizes = np.asarray(reader.image_sizes, np.int64)
    labels = np.asarray(reader.labels, np.int64)
    boxes, flips = SlotCropSampler(seed=seed).sample_slots(img, np.arange(n), sizes[img, 0], sizes[img, 1])
    spec = dataclasses.replace(reader.spec, grid=1)
    C = reader.num_classes
    top1, prob, ent = [np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)]
    uniq = np.unique(img)
    whole, mass = [np.zeros(0, np.int64)], [np.zeros(0)]
    for a in range(0, len(uniq), batch):
        u = uniq[a:a + batch]
        maps = reader.read_batch(u)
        sel = np.flatnonzero(np.isin(img, u))
        row = np.searchsorted(u, img[sel])
        p = pool_labels(maps.indices[row], maps.scores[row], boxes[sel], sizes[img[sel]], flips[sel], spec, C)
        top1.append(p.argmax(-1))
        prob.append(p.max(-1).astype(np.float64))
        ent.append(_report._entropy(p.astype(np.float64)))
        hw = sizes[u]
        full = np.stack([np.zeros(len(u), np.int64), np.zeros(len(u), np.int64), hw[:, 0], hw[:, 1]], 1)
        whole.append(pool_labels(maps.indices, maps.scores, full, hw, None, spec, C).argmax(-1))
        s = maps.scores.astype(np.float64)
        top = np.maximum(s.max(1, keepdims=True), spec.fill)
        kept = np.exp((s - top) / spec.temperature).sum(1)
        rest = (C - spec.k) * np.exp((spec.fill - top[:, 0]) / spec.temperature)
        mass.append((kept / (kept + rest)).mean((1, 2)))
    return {"image": img, "box": boxes.astype(np.int64).reshape(-1, 4), "size": sizes[img].reshape(-1, 2),
            "label": labels[img], "top1": np.concatenate(top1), "top1_prob": np.concatenate(prob),
            "entropy": np.concatenate(ent), "whole_top1": np.concatenate(whole), "whole_label": labels[uniq],
            "cell_mass": np.concatenate(mass)}


def map_label_stats(reader, sample: int = 4096, seed: int = 0, *, crops: dict[str, np.ndarray] | None = None
                    ) -> dict[str, Any]:
    """``{sampled_crops, seed, crop_sampler, entropy_mean_nats, top1_prob_mean, top1_agreement,
    distinct_top1, whole_image_top1_agreement, cell_topk_mass_mean}`` on :func:`map_crop_sample` (pass its
    result as ``crops`` to reuse it); agreements are null without ground-truth labels."""
    crops = map_crop_sample(reader, sample, seed) if crops is None else crops
    res: dict[str, Any] = {"sampled_crops": len(crops["image"]), "seed": int(seed),
                           "crop_sampler": SlotCropSampler(seed=seed).get_config(), "entropy_mean_nats": None,
                           "top1_prob_mean": None, "top1_agreement": None, "distinct_top1": 0,
                           "whole_image_top1_agreement": None, "cell_topk_mass_mean": None}
    if not len(crops["image"]):
        return res
    res.update(entropy_mean_nats=float(crops["entropy"].mean()), top1_prob_mean=float(crops["top1_prob"].mean()),
               distinct_top1=len(np.unique(crops["top1"])), cell_topk_mass_mean=float(crops["cell_mass"].mean()))
    known = crops["label"] >= 0
    if known.any():
        res["top1_agreement"] = float((crops["top1"][known] == crops["label"][known]).mean())
        wk = crops["whole_label"] >= 0
        res["whole_image_top1_agreement"] = float((crops["whole_top1"][wk] == crops["whole_label"][wk]).mean())
    return res


class MapReport:
    """The ``label_map`` kind's part of :func:`fkdstore.report.inspect` and :func:`~fkdstore.report.format_inspect`."""

    @staticmethod
    def inspect(r, arrays: dict[str, dict[str, Any]], total: int, *, sample: int, seed: int):
        """``(keys, crop sample)``: ``label_map`` (the spec's config), ``map_shape``, ``map_index_dtype``,
        ``bytes_per_image`` (whole store / written images), ``map_bytes_per_image`` (the ``map/`` arrays),
        ``raw_map_bytes_per_image``, ``label_stats`` (:func:`map_label_stats`), ``warnings`` and
        ``imagenet_extrapolation`` ``{num_images, bytes (this store's bytes per image), relabel_files_bytes,
        paper_formula_bytes (top-K), paper_full_bytes, paper_table2 {full, top-k} (printed figures where the
        shape is the paper's)}``."""
        h, spec = r.header, r.spec
        C, written = h.num_classes, int(r.written.sum())
        maps = sum(a["stored_bytes"] for n, a in arrays.items() if n.startswith(S.MAP_GROUP + "/"))
        per_image = sum(arrays[n]["stored_bytes"] for n in h.per_image_arrays) / h.num_images
        N = _report.IMAGENET_1K_IMAGES
        sampled = map_crop_sample(r, sample, seed)
        out = {
            "label_map": spec.get_config(), "map_shape": list(spec.map_shape),
            "map_index_dtype": spec.index_dtype(C),
            "bytes_per_image": total / written if written else None,
            "map_bytes_per_image": maps / written if written else None,
            "raw_map_bytes_per_image": spec.bytes_per_image(C),
            "label_stats": map_label_stats(r, sample, seed, crops=sampled),
            "warnings": [w for w in (diagnose.agreement_warning(sampled, True, h.meta.get("teacher")),
                                     diagnose.normalization_warning(None if h.replay is None
                                                                    else h.replay.get_config())) if w],
            "imagenet_extrapolation": {
                "num_images": N, "bytes": int((maps / written + per_image) * N) if written else None,
                "relabel_files_bytes": N * relabel_file_bytes(spec.size, spec.k, spec.dtype),
                "paper_formula_bytes": paper_map_bytes(N, spec.size, C, spec.k),
                "paper_full_bytes": paper_map_bytes(N, spec.size, C),
                "paper_table2": _paper_figures(spec.size, spec.k, C),
            },
        }
        return out, sampled

    format_estimate = staticmethod(format_map_estimate)

    @staticmethod
    def image(reader, image, *, top_k: int = 5) -> dict[str, Any]:
        """One image's map (``fkdstore inspect --image KEY`` on a label-map store)::

            {index, key, size: [H, W], label, whole: [[class, prob], ...], cells: [[class, ...] per row]}

        ``whole``: the ``top_k`` classes of the label pooled over the whole image (one label, ``grid = 1``);
        ``cells``: the stored top-1 class of every map cell, row by row (row 0 = the top of the image)."""
        top_k = positive_int("top_k", top_k)
        i = diagnose.find_image(reader, image)
        H, W = (int(v) for v in reader.image_sizes[i])
        rec = reader.read(i)
        spec = dataclasses.replace(reader.spec, grid=1)
        p = pool_labels(rec.indices[None], rec.scores[None], np.array([[0, 0, H, W]]), np.array([[H, W]]), None,
                        spec, reader.num_classes)[0]
        order = np.argsort(-p, kind="stable")[:top_k]
        best = np.take_along_axis(rec.indices.astype(np.int64), np.argmax(rec.scores, 0)[None], 0)[0]
        return {"index": i, "key": reader.image_key(i), "size": [H, W], "label": int(reader.labels[i]),
                "whole": [[int(c), float(p[c])] for c in order], "cells": best.tolist()}

    @staticmethod
    def format_image(d: dict[str, Any], names=None) -> str:
        """Text rendering of :meth:`image`."""
        H, W = d["size"]
        name = lambda c: diagnose.class_name(c, names)  # noqa: E731
        cells = d["cells"]
        width = max(len(name(c)) for row in cells for c in row)
        return "\n".join([
            f"image {d['index']} {d['key']!r}: {H} x {W} px, ground truth {name(d['label'])}, "
            f"{len(cells)} x {len(cells)} map",
            "whole image  " + ", ".join(f"{name(c)} {q:.3f}" for c, q in d["whole"]),
            "top-1 class of every cell (row 0 = top):",
            *("  " + " ".join(f"{name(c):>{width}}" for c in row) for row in cells),
        ])

    @staticmethod
    def plots(d, sampled, folder) -> list[str]:
        raise ValidationError("plots are drawn for crop-region stores; this store holds label maps")

    @staticmethod
    def head(d: dict[str, Any]) -> list[str]:
        m = d["label_map"]
        flip = "follows the crop's flip" if m["flip"] else "ignores the flip"
        return [
            f"records    label maps (ReLabel): K={m['k']} x {m['size']} x {m['size']} per image, {m['dtype']} scores, "
            f"{d['map_index_dtype']} class ids, fill {m['fill']}",
            f"pooling    box order {m['box']['order']} offset {m['box']['offset']}, {m['pool']['op']} to "
            f"{m['pool']['grid']} x {m['pool']['grid']} (sampling ratio {m['pool']['sampling_ratio']}, aligned "
            f"{m['pool']['aligned']}), softmax / {m['temperature']}, label {flip}",
            f"shape      {d['num_images']:,} images, {d['num_classes']} classes",
        ]

    @staticmethod
    def size_lines(d: dict[str, Any]) -> list[str]:
        f = _report._fmt
        return [f"per image  {f(d['bytes_per_image'], ',.1f')} B (maps {f(d['map_bytes_per_image'], ',.1f')} B; "
                f"raw maps {d['raw_map_bytes_per_image']:,} B)"]

    @staticmethod
    def tail(d: dict[str, Any]) -> list[str]:
        f, hb = _report._fmt, _report.human_bytes
        s, e = d["label_stats"], d["imagenet_extrapolation"]
        fig = e["paper_table2"]
        sc = s["crop_sampler"]
        return [
            "",
            f"labels     pooled on {s['sampled_crops']:,} RandomResizedCrop crops (scale {sc['scale']}, seed "
            f"{s['seed']}), one label per crop:",
            f"  mean entropy (nats)             {f(s['entropy_mean_nats'])}",
            f"  mean top-1 probability          {f(s['top1_prob_mean'])}",
            f"  teacher top-1 = ground truth    {f(s['top1_agreement'])}",
            f"  whole image top-1 = truth       {f(s['whole_image_top1_agreement'])}",
            f"  distinct top-1 classes          {s['distinct_top1']}",
            f"  stored top-K mass of a cell     {f(s['cell_topk_mass_mean'])} "
            "(softmax with the fill for absent classes)",
            "",
            f"ImageNet-1K ({e['num_images']:,} images, same maps):",
            f"  this layout       {hb(e['bytes'])}",
            f"  ReLabel .pt files {hb(e['relabel_files_bytes'])} (one torch.save per image)",
            f"  paper formula     top-K {hb(e['paper_formula_bytes'])}, full {hb(e['paper_full_bytes'])} "
            f"(Table 2's float32 accounting)",
            "  paper Table 2     " + (f"top-5 {fig['top-k'] or '-'}, full {fig['full']} (at 1.2M images)"
                                       if fig["full"] else "not at this map shape (15 x 15, 1000 classes)"),
        ]


# ------------------------------------------------------------------------------------------- calibration
def teacher_like_maps(rng: np.random.Generator, num_images: int, size: int, k: int, classes: int,
                      labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices uint16, scores float32)``, each ``(N, K, S, S)``: the top-K of synthetic class maps that
    look like a strong teacher's over a whole image. Per image a true class and 4 confusable classes get
    logit boosts inside an object blob (a Gaussian of random centre and radius over the grid) and 3 scene
    classes a weaker boost outside it; every class gets an image-level offset N(0, 0.7) and spatially smooth
    noise (standard deviation 0.5, a 5 x 5 box blur: neighbouring cells see overlapping regions). Scores
    descend within a cell. A model, not a teacher: where the tail classes of a cell are less correlated
    with its neighbours' (iid noise of standard deviation 1 gives 0.82), ``map/indices`` compresses less."""
    N, S_, K, C = num_images, size, k, classes
    if labels is None:
        labels = rng.integers(0, C, N)
    yy, xx = np.mgrid[0:S_, 0:S_].astype(np.float32) + 0.5
    idx = np.empty((N, K, S_, S_), np.uint16)
    sc = np.empty((N, K, S_, S_), np.float32)
    for i in range(N):
        cy, cx = rng.uniform(0.3, 0.7, 2) * S_
        r = rng.uniform(0.15, 0.4) * S_
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        z = np.float32(0.7) * rng.standard_normal((C, 1, 1), dtype=np.float32) + _smooth_noise(rng, C, S_)
        z[labels[i]] += rng.uniform(7, 11) * blob
        for c in rng.integers(0, C, 4):
            z[c] += rng.uniform(2, 6) * blob
        for c in rng.integers(0, C, 3):
            z[c] += rng.uniform(2, 5) * (1 - blob)
        part = np.argpartition(-z, K - 1, axis=0)[:K]  # the top K, then sorted descending
        top = np.take_along_axis(z, part, 0)
        order = np.argsort(-top, axis=0, kind="stable")
        idx[i] = np.take_along_axis(part, order, 0)
        sc[i] = np.take_along_axis(top, order, 0)
    return idx, sc


def _smooth_noise(rng: np.random.Generator, C: int, S_: int) -> np.ndarray:
    """Per-cell noise of standard deviation 0.5, correlated over 5 x 5 cells (overlapping receptive fields)."""
    z = rng.standard_normal((C, S_ + 4, S_ + 4), dtype=np.float32)
    window = (z[:, dy:dy + S_, dx:dx + S_] for dy in range(5) for dx in range(5))
    box = sum(window, np.zeros((C, S_, S_), np.float32)) / 5.0  # unit variance
    return (0.5 * box).astype(np.float32)


def calibrate_maps(tmpdir: str | os.PathLike | None = None, *, num_images: int = 256, size: int = 15, k: int = 5,
                   classes: int = 1000, seed: int = 0) -> dict[str, float]:
    """Stored / raw bytes of ``map/indices`` and ``map/scores`` (float32 and float16) on stores written from
    :func:`teacher_like_maps`: the keys of :data:`MAP_CALIBRATION`."""
    rng = np.random.default_rng(seed)
    N = num_images
    labels = rng.integers(0, classes, N)
    idx, sc = teacher_like_maps(rng, N, size, k, classes, labels)
    sizes = np.stack([rng.integers(300, 501, N), rng.integers(375, 501, N)], 1)
    keys = [f"n{labels[i]:08d}/n{labels[i]:08d}_{i}.JPEG" for i in range(N)]
    out = {}
    with tempfile.TemporaryDirectory(dir=tmpdir) as td:
        for dtype in ("float32", "float16"):
            spec = LabelMapSpec(size=size, k=k, dtype=dtype, box_order="xy")
            path = Path(td) / dtype
            with _writer.write(path, num_images=N, num_classes=classes, image_keys=keys, image_sizes=sizes,
                               labels=labels, label_map=spec) as w:
                w.put_maps(np.arange(N), idx, sc)
            stats = _report.storage_stats(path)
            cells = N * k * size ** 2
            out["map_indices"] = round(stats[S.MAP_INDICES]["bytes"] / (cells * 2), 3)
            out[f"map_scores_{dtype}"] = round(stats[S.MAP_SCORES]["bytes"] / (cells * np.dtype(dtype).itemsize), 3)
    return out


if __name__ == "__main__":  # pragma: no cover - re-measure MAP_CALIBRATION
    print(calibrate_maps())
