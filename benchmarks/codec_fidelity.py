"""Size on disk and fidelity of every codec x dtype: bytes per crop and mean KL(teacher || decoded).

Writes one small store per codec with :func:`fkdstore.write` from teacher-like outputs
(:func:`fkdstore.report.teacher_like_probs`, the distributions ``fkdstore.report`` calibrates on), measures
its files (:func:`fkdstore.report.inspect`: label bytes and total bytes per written crop) and decodes every
crop back. Prints a markdown table. KL is infinite for a crop whose decoded distribution is 0 where the
teacher's is not (hard, mr, values below a dtype's smallest number), so the table reports, over ALL crops,
the mean of a floored KL, ``KL(p || max(d, 1e-8))`` (decoded values floored at ``KL_FLOOR`` = 1e-8, not
renormalised: a class the codec drops costs ``p * log(p / 1e-8)``), and, separately, the fraction of crops
whose unfloored KL is infinite. Defaults (64 images x 200 crops x 1000 classes) run in well under 30 s.

Every store (format 4.0) is written twice: with stored crops and with seeded crops (the default of
``generate``; ``write(crop_sampler=...)``: no box and flip arrays), so the table gives both whole-store sizes. A small N
inflates the whole-store bytes per crop with metadata that does not grow with N (``zarr.json`` files, the
header), so ``--whole-store-images`` (default 256) measures the MS top-5 rows once more at that N: the
whole-store figure issue 12 asks about (per-image arrays and metadata are then ~0.2 B per crop, and less at
ImageNet's N).

    python benchmarks/codec_fidelity.py [--images 64] [--crops 200] [--classes 1000] [--seed 0]
        [--whole-store-images 256]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import fkdstore
from fkdstore import codecs, report
from fkdstore.seeded import SlotCropSampler

SPECS = [
    "full:dtype=float16", "full:dtype=q8", "hard", "smoothing", "smoothing:dtype=q8",
    "ms:k=5", "ms:k=5,dtype=q8", "mr:k=5", "mr:k=5,dtype=q8", "ms:k=10", "ms:k=10,dtype=q8",
    "logits:k=5", "logits:k=5,dtype=q8", "logits:k=none,dtype=q8",
]


KL_FLOOR = 1e-8
WHOLE_STORE_SPECS = ["ms:k=5", "ms:k=5,dtype=q8"]


def kl(p: np.ndarray, d: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """KL(p || max(d, floor)) per row in nats (float64); inf where d <= floor = 0 < p."""
    p, d = p.astype(np.float64), np.maximum(d.astype(np.float64), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(d)), 0.0).sum(-1)


def run(num_images: int, crops: int, classes: int, seed: int, specs=SPECS, fidelity: bool = True) -> list[dict]:
    """One row per codec spec: sizes from :func:`fkdstore.report.inspect` of a stored-crop and a seeded-crop
    store of the same data, and (``fidelity``) the KL of the decoded labels."""
    rng = np.random.default_rng(seed)
    N, M, C = num_images, crops, classes
    sizes = np.stack([rng.integers(300, 501, N), rng.integers(375, 501, N)], 1)
    sampler = SlotCropSampler(seed=seed)  # the seeded-crop sampler; both twins store its crops
    boxes, flips = map(np.stack, zip(*(sampler.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N))))
    labels = rng.integers(0, C, N)
    probs = report.teacher_like_probs(rng, N, M, C, labels)
    logits = np.log(np.maximum(probs, np.finfo(np.float32).tiny))  # softmax(logits) == probs (to float32)
    keys = [f"n{labels[i]:08d}/n{labels[i]:08d}_{i}.JPEG" for i in range(N)]
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for n, spec in enumerate(specs):
            codec = codecs.as_codec(spec)
            x = logits if codec.input == "logits" else probs
            path = Path(td) / f"{n}.fkd"
            seeded = Path(td) / f"{n}-seeded.fkd"
            try:
                _write(path, codec, x, N, M, C, keys, sizes, labels, boxes, flips)
                _write(seeded, codec, x, N, M, C, keys, sizes, labels, boxes, flips, crop_sampler=sampler)
            except fkdstore.ValidationError as e:  # a writer that predates codec.validate_fields
                print(f"skipped {spec}: the writer refused its fields ({e})")
                continue
            info, sinfo = report.inspect(path, sample=0), report.inspect(seeded, sample=0)
            row = {"codec": spec, "images": N, "raw_label_bytes": codec.raw_bytes_per_crop(C),
                   "label_bytes_per_crop": info["label_bytes_per_crop"],
                   "box_bytes_per_crop": info["box_bytes_per_crop"],
                   "bytes_per_crop": info["bytes_per_crop"],
                   "seeded_bytes_per_crop": sinfo["bytes_per_crop"]}
            if fidelity:
                with fkdstore.open(path) as r:
                    rec = r.read_batch(np.arange(N))
                    d = r.decode(rec.fields)
                    k, kf = kl(probs, d), kl(probs, d, KL_FLOOR)
                row.update({"kl_floored_mean": float(np.mean(kf)),
                            "kl_finite_mean": float(np.mean(k[np.isfinite(k)])) if np.isfinite(k).any() else None,
                            "kl_inf_crops": int(np.isinf(k).sum()), "crops": int(k.size)})
            rows.append(row)
    return rows


def _write(path, codec, x, N, M, C, keys, sizes, labels, boxes, flips, crop_sampler=None) -> None:
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec,
                        image_keys=keys, image_sizes=sizes, labels=labels, crop_sampler=crop_sampler) as w:
        for a in range(0, N, 16):
            sl = slice(a, min(N, a + 16))
            # put_fields: the writer's put() takes probabilities; logits codecs get encoded fields
            w.put_fields(np.arange(sl.start, sl.stop), boxes[sl], flips[sl], codec.encode(x[sl]))


def table(rows: list[dict], base: str = "full:dtype=float16") -> str:
    """The per-codec table (rows with KL), then the whole-store rows measured at a larger N, if any."""
    main = [r for r in rows if "kl_floored_mean" in r]
    ref = next((r["label_bytes_per_crop"] for r in main if r["codec"] == base), None)
    out = ["| codec | raw label B/crop | label B/crop on disk | total B/crop on disk, stored crops "
           "| total B/crop on disk, seeded crops (default) | label bytes vs full float16 "
           f"| mean KL(teacher ‖ max(decoded, {KL_FLOOR:g})), nats, all crops | crops with KL = inf (unfloored) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in main:
        rel = f"{r['label_bytes_per_crop'] / ref:.1%}" if ref else "-"
        inf = f"{r['kl_inf_crops'] / r['crops']:.1%} ({r['kl_inf_crops']}/{r['crops']})"
        out.append(f"| `{r['codec']}` | {r['raw_label_bytes']} | {r['label_bytes_per_crop']:.2f} | "
                   f"{r['bytes_per_crop']:.2f} | {r['seeded_bytes_per_crop']:.2f} | {rel} | "
                   f"{r['kl_floored_mean']:.5f} | {inf} |")
    whole = [r for r in rows if "kl_floored_mean" not in r]
    if whole:
        out += ["", f"Whole store at N = {whole[0]['images']} images (same data rule, MS top-5): bytes per crop on "
                "disk",
                "", "| codec | label fields | box + flip (stored crops) | whole store, stored crops "
                "| whole store, seeded crops (default) |", "|---|---:|---:|---:|---:|"]
        out += [f"| `{r['codec']}` | {r['label_bytes_per_crop']:.2f} | {r['box_bytes_per_crop']:.2f} | "
                f"{r['bytes_per_crop']:.2f} | {r['seeded_bytes_per_crop']:.2f} |" for r in whole]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whole-store-images", type=int, default=256,
                    help="N of the whole-store measurement of MS top-5 (0: skip)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    rows = run(a.images, a.crops, a.classes, a.seed)
    if a.whole_store_images:
        rows += run(a.whole_store_images, a.crops, a.classes, a.seed, WHOLE_STORE_SPECS, fidelity=False)
    print(f"codec fidelity: {a.images} images x {a.crops} crops x {a.classes} classes, teacher_like_probs "
          f"seed {a.seed} ({time.perf_counter() - t:.1f} s)\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"images": a.images, "crops": a.crops, "classes": a.classes,
                                            "seed": a.seed, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
