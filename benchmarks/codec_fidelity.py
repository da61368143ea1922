"""Size on disk and fidelity of every codec x dtype: bytes per crop and mean KL(teacher || decoded).

Writes one small store per codec with :func:`fkdstore.write` from teacher-like outputs
(:func:`fkdstore.report.teacher_like_probs`, the distributions ``fkdstore.report`` calibrates on), measures
its files (:func:`fkdstore.report.inspect`: label bytes and total bytes per written crop) and decodes every
crop back. Prints a markdown table. KL is infinite for a crop whose decoded distribution is 0 where the
teacher's is not (hard, mr, values below a dtype's smallest number), so the table reports, over ALL crops,
the mean of a floored KL, ``KL(p || max(d, 1e-8))`` (decoded values floored at ``KL_FLOOR`` = 1e-8, not
renormalised: a class the codec drops costs ``p * log(p / 1e-8)``), and, separately, the fraction of crops
whose unfloored KL is infinite. Defaults (64 images x 200 crops x 1000 classes) run in well under 30 s.

    python benchmarks/codec_fidelity.py [--images 64] [--crops 200] [--classes 1000] [--seed 0]
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
from fkdstore.transforms import CropSampler

SPECS = [
    "full:dtype=float16", "full:dtype=q8", "hard", "smoothing", "smoothing:dtype=q8",
    "ms:k=5", "ms:k=5,dtype=q8", "mr:k=5", "mr:k=5,dtype=q8", "ms:k=10", "ms:k=10,dtype=q8",
    "logits:k=5", "logits:k=5,dtype=q8", "logits:k=none,dtype=q8",
]


KL_FLOOR = 1e-8


def kl(p: np.ndarray, d: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """KL(p || max(d, floor)) per row in nats (float64); inf where d <= floor = 0 < p."""
    p, d = p.astype(np.float64), np.maximum(d.astype(np.float64), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(d)), 0.0).sum(-1)


def run(num_images: int, crops: int, classes: int, seed: int, specs=SPECS) -> list[dict]:
    rng = np.random.default_rng(seed)
    N, M, C = num_images, crops, classes
    sizes = np.stack([rng.integers(300, 501, N), rng.integers(375, 501, N)], 1)
    sampler = CropSampler(seed=seed)
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
            try:
                _write(path, codec, x, N, M, C, keys, sizes, labels, boxes, flips)
            except fkdstore.ValidationError as e:  # a writer that predates codec.validate_fields
                print(f"skipped {spec}: the writer refused its fields ({e})")
                continue
            info = report.inspect(path, sample=0)
            with fkdstore.open(path) as r:
                rec = r.read_batch(np.arange(N))
                d = r.decode(rec.fields)
                k, kf = kl(probs, d), kl(probs, d, KL_FLOOR)
            rows.append({"codec": spec, "raw_label_bytes": codec.raw_bytes_per_crop(C),
                         "label_bytes_per_crop": info["label_bytes_per_crop"],
                         "bytes_per_crop": info["bytes_per_crop"],
                         "kl_floored_mean": float(np.mean(kf)),
                         "kl_finite_mean": float(np.mean(k[np.isfinite(k)])) if np.isfinite(k).any() else None,
                         "kl_inf_crops": int(np.isinf(k).sum()), "crops": int(k.size)})
    return rows


def _write(path, codec, x, N, M, C, keys, sizes, labels, boxes, flips) -> None:
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec,
                        image_keys=keys, image_sizes=sizes, labels=labels) as w:
        for a in range(0, N, 16):
            sl = slice(a, min(N, a + 16))
            # put_fields: the writer's put() takes probabilities; logits codecs get encoded fields
            w.put_fields(np.arange(sl.start, sl.stop), boxes[sl], flips[sl], codec.encode(x[sl]))


def table(rows: list[dict], base: str = "full:dtype=float16") -> str:
    ref = next((r["label_bytes_per_crop"] for r in rows if r["codec"] == base), None)
    out = ["| codec | raw label B/crop | label B/crop on disk | total B/crop on disk | label bytes vs full float16 "
           f"| mean KL(teacher ‖ max(decoded, {KL_FLOOR:g})), nats, all crops | crops with KL = inf (unfloored) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['label_bytes_per_crop'] / ref:.1%}" if ref else "-"
        inf = f"{r['kl_inf_crops'] / r['crops']:.1%} ({r['kl_inf_crops']}/{r['crops']})"
        out.append(f"| `{r['codec']}` | {r['raw_label_bytes']} | {r['label_bytes_per_crop']:.2f} | "
                   f"{r['bytes_per_crop']:.2f} | {rel} | {r['kl_floored_mean']:.5f} | {inf} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    rows = run(a.images, a.crops, a.classes, a.seed)
    print(f"codec fidelity: {a.images} images x {a.crops} crops x {a.classes} classes, teacher_like_probs "
          f"seed {a.seed} ({time.perf_counter() - t:.1f} s)\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"images": a.images, "crops": a.crops, "classes": a.classes,
                                            "seed": a.seed, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
