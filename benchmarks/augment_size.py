"""Bytes per crop on disk of a store with augmentation records (issue 9: <= 30 B/crop at M = 200, C = 1000,
MS top-5, RandomResizedCrop + flip + RandAugment(2 ops) + a Mixup or CutMix partner).

Writes real stores with :func:`fkdstore.write`: ImageNet-like image sizes and keys, the crop sampler's boxes,
teacher-like MS top-5 labels (``store_layout.teacher_like``), and the pipeline's own sampled params
(``Pipeline.sample``: the values ``fkdstore.generate`` stores), then reports ``fkdstore inspect``'s split:
labels / box+flip / aug, per column. Partners are drawn within the policy's window; with N below the window
the window is the whole store (at N = 4096 about as many candidates as ImageNet's 2,503 per window).

    python benchmarks/augment_size.py [--images 1024] [--crops 200] [--classes 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import fkdstore  # noqa: E402
from fkdstore import augment as A  # noqa: E402
from fkdstore import report  # noqa: E402
from fkdstore.codecs import get_codec  # noqa: E402
from fkdstore.seeded import SlotCropSampler  # noqa: E402

PIPELINES = {
    "crop+flip only": "",
    "RandAugment(2)": "randaugment:num_ops=2,magnitude=9",
    "RandAugment(2) + Mixup": "randaugment:num_ops=2,magnitude=9;mixup:alpha=0.2",
    "RandAugment(2) + CutMix": "randaugment:num_ops=2,magnitude=9;cutmix:alpha=1.0",
}


def teacher_like(rng, n, M, C):
    """Peaked softmax rows: each image has a dominant class, crops vary around it (store_layout.py's rule)."""
    cls = rng.integers(0, C, n)
    logits = rng.normal(0, 1.5, (n, M, C)).astype(np.float32)
    logits[np.arange(n)[:, None], np.arange(M), cls[:, None]] += rng.normal(4, 2, (n, M)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def make_store(path: Path, spec: str, N: int, M: int, C: int, input_size: int = 224) -> dict:
    pipe = A.parse_augment(spec)
    codec = get_codec("ms", k=5)
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 600, N), rng.integers(200, 600, N)], 1)
    keys = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(N)]
    sampler = SlotCropSampler(seed=0)  # stored crops (box+flip columns), as inspect splits them
    w = fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=keys,
                       image_sizes=sizes, aug=[c.to_json() for c in pipe.columns()], augment=pipe.get_config())
    B = 64
    lab_rng = np.random.default_rng(1)
    for s in range(0, N, B):
        idx = np.arange(s, min(N, s + B))
        bf = [sampler.sample(int(i), int(sizes[i, 0]), int(sizes[i, 1]), M) for i in idx]
        aug = None
        if len(pipe):
            per = [pipe.sample(0, int(i), np.arange(M), image_size=(input_size, input_size), num_images=N,
                               crops_per_image=M) for i in idx]
            aug = {c.name: np.stack([p[c.name] for p in per]) for c in pipe.columns()}
        fields = codec.encode(teacher_like(lab_rng, len(idx), M, C))
        w.put_fields(idx, np.stack([b for b, _ in bf]), np.stack([f for _, f in bf]), fields, aug=aug)
    w.close()
    info = report.inspect(path)
    return info


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="augsize"))
    try:
        for name, spec in PIPELINES.items():
            t0 = time.perf_counter()
            info = make_store(tmp / "s", spec, args.images, args.crops, args.classes)
            n = args.images * args.crops
            per_array = {k: a["stored_bytes"] / n for k, a in info["arrays"].items() if k.startswith("aug/")}
            rows.append({"pipeline": name, "spec": spec, "bytes_per_crop": info["bytes_per_crop"],
                         "labels": info["label_bytes_per_crop"], "box_flip": info["box_bytes_per_crop"],
                         "aug": info["aug_bytes_per_crop"], "aug_columns": per_array,
                         "seconds": time.perf_counter() - t0})
            shutil.rmtree(tmp / "s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"N = {args.images}, M = {args.crops}, C = {args.classes}, MS top-5, crop 224 (fkdstore inspect's split)")
    print(f"{'pipeline':26s} {'B/crop':>7s} {'labels':>7s} {'box+flip':>8s} {'aug':>6s}  aug columns (B/crop)")
    for r in rows:
        cols = ", ".join(f"{k[4:]} {v:.2f}" for k, v in r["aug_columns"].items())
        print(f"{r['pipeline']:26s} {r['bytes_per_crop']:7.2f} {r['labels']:7.2f} {r['box_flip']:8.2f} "
              f"{r['aug']:6.2f}  {cols}")
    out = {"images": args.images, "crops": args.crops, "classes": args.classes, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
