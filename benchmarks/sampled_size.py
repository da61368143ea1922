"""Sampled labels against MS top-K at equal bytes: bytes per crop on disk and how close each stays to the teacher.

Writes real stores with :func:`fkdstore.write` (C = 1000, M = 200, a few hundred images of teacher-like outputs,
:func:`fkdstore.report.teacher_like_probs`; their logits are ``log p``): ``sampled`` with S = 8, 16, 32 draws
(with and without an exact top-1 head), encoded with crop keys as a teacher-runner does, and ``ms`` with
K = 1..32. Reports ``fkdstore inspect``'s label bytes per crop (stored, after compression, and raw), and per
store, against the teacher's distribution ``p`` of each crop:

* ``tv``: mean total-variation distance ``0.5 |q - p|_1`` of one crop's decoded label;
* ``bias``: the systematic error, the L2 norm of ``E[q - p]`` over classes, estimated without the noise of a
  finite sample: ``sqrt(max(0, sum_j (m_j**2 - v_j / n)))`` with ``m_j``, ``v_j`` the mean and variance of
  ``q_j - p_j`` over the ``n`` crops (``m_j**2 - v_j / n`` is unbiased for ``(E[q_j - p_j])**2``). MS's
  truncation error does not average out over crops and epochs; a sampled label's is 0 in expectation;
* ``noise``: ``sqrt(sum_j v_j)``, the per-crop random error (L2), which averages out over crops;
* ``ms_equal``: the MS K whose stored label bytes per crop are the closest not above the sampled store's.

    python benchmarks/sampled_size.py [--images 300] [--crops 200] [--classes 1000] [--json FILE]
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
sys.path.insert(0, str(HERE.parent))

import fkdstore  # noqa: E402
from fkdstore import report  # noqa: E402
from fkdstore.codecs import Sampled, crop_keys, get_codec  # noqa: E402

SAMPLED = [Sampled(s=s) for s in (8, 16, 32)] + [Sampled(s=s, k=1) for s in (8, 16, 32)]
MS_K = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
BATCH = 32


def write_store(path: Path, codec, probs: np.ndarray) -> dict:
    """One store of ``probs`` (N, M, C) with ``codec``; returns its inspect() dict and the fidelity metrics."""
    N, M, C = probs.shape
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 600, N), rng.integers(200, 600, N)], 1)
    boxes = np.zeros((N, M, 4), np.int64)
    boxes[..., 2:] = 100
    flips = np.zeros((N, M), bool)
    keys = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(N)]
    tv = 0.0
    s1, s2 = np.zeros(C), np.zeros(C)
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=keys,
                        image_sizes=sizes) as w:
        for s in range(0, N, BATCH):
            idx = np.arange(s, min(N, s + BATCH))
            p = probs[idx]
            x = np.log(p) if codec.input == "logits" else p
            if codec.keyed:  # what the teacher-runner passes: one key per (image, slot)
                fields = codec.encode(x, keys=crop_keys(idx[:, None], np.arange(M)[None]))
            else:
                fields = codec.encode(x)
            w.put_fields(idx, boxes[idx], flips[idx], fields)
            err = codec.decode(fields, C).astype(np.float64) - p
            tv += 0.5 * np.abs(err).sum()
            s1 += err.sum((0, 1))
            s2 += (err * err).sum((0, 1))
    info = report.inspect(path)
    n = N * M
    m, v = s1 / n, (s2 - s1 * s1 / n) / (n - 1)
    return {"info": info, "tv": tv / n, "bias": float(np.sqrt(max(0.0, (m * m - v / n).sum()))),
            "noise": float(np.sqrt(v.sum()))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    probs = report.teacher_like_probs(np.random.default_rng(0), args.images, args.crops, args.classes)
    probs = np.maximum(probs, np.float32(1e-30))
    probs /= probs.sum(-1, keepdims=True)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="sampledsize"))
    try:
        for codec in [get_codec("ms", k=k) for k in MS_K] + SAMPLED:
            t0 = time.perf_counter()
            res = write_store(tmp / "s", codec, probs)
            info = res["info"]
            n = args.images * args.crops
            ratios = {name[5:]: a["raw_bytes"] / a["stored_bytes"] for name, a in info["arrays"].items()
                      if name.startswith("soft/")}
            rows.append({"codec": codec.get_config(), "describe": codec.describe(),
                         "label_bytes_per_crop": info["label_bytes_per_crop"],
                         "raw_label_bytes_per_crop": codec.raw_bytes_per_crop(args.classes),
                         "stored_over_raw": {k: 1 / v for k, v in ratios.items()},
                         "bytes_per_crop": info["bytes_per_crop"], "tv": res["tv"], "bias": res["bias"],
                         "noise": res["noise"],
                         "seconds": time.perf_counter() - t0, "crops": n})
            shutil.rmtree(tmp / "s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = [r for r in rows if r["codec"]["name"] == "ms"]
    for r in rows:
        if r["codec"]["name"] == "sampled":
            fit = [m for m in ms if m["label_bytes_per_crop"] <= r["label_bytes_per_crop"]]
            r["ms_equal"] = max(fit, key=lambda m: m["label_bytes_per_crop"])["describe"] if fit else None
    print(f"N = {args.images}, M = {args.crops}, C = {args.classes}, teacher_like_probs; label bytes per crop "
          f"(fkdstore inspect), raw = before compression")
    print(f"{'codec':22s} {'stored B':>9s} {'raw B':>6s} {'tv':>7s} {'bias L2':>8s} {'noise L2':>8s}  equal-bytes MS")
    for r in rows:
        print(f"{r['describe']:22s} {r['label_bytes_per_crop']:9.2f} {r['raw_label_bytes_per_crop']:6d} "
              f"{r['tv']:7.4f} {r['bias']:8.5f} {r['noise']:8.5f}  {r.get('ms_equal') or ''}")
    out = {"images": args.images, "crops": args.crops, "classes": args.classes, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
