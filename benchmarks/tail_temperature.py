"""Top-K ``logits`` stores decoded at a temperature T != 1: the tail-mass error of the uniform tail (stores
without a tail statistic) against ``tail="mean"``, with the stated bound ``Logits.tail_bound``.

Rows: Gaussian logits (scale 3, C = 1000) and ``fkdstore.report.teacher_like_probs`` (C = 1000). Error:
``|logit(decoded tail mass) - logit(tail mass of softmax(z / T))|`` (float32 storage), mean / max over rows;
``bound``: the mean of ``tail_bound``; ``viol``: rows whose error exceeds the bound plus float32 slack.

    python benchmarks/tail_temperature.py [--rows 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fkdstore.codecs import Logits  # noqa: E402
from fkdstore.report import teacher_like_probs  # noqa: E402


def tail_logit(d: np.ndarray, idx: np.ndarray) -> np.ndarray:
    d = np.asarray(d, np.float64)
    kept = np.take_along_axis(d, idx, -1).sum(-1)
    return np.log(d.sum(-1) - kept) - np.log(kept)


def softmax(z: np.ndarray, T: float) -> np.ndarray:
    z = z.astype(np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    data = {"gauss3": (rng.normal(size=(args.rows, 1000)) * 3).astype(np.float32),
            "teacher": np.log(teacher_like_probs(rng, max(1, args.rows // 200), 200, 1000)).reshape(-1, 1000)}
    rows = []
    for name, z in data.items():
        for k in (5, 10, 50, 100):
            for tail in (None, "mean"):
                c = Logits(k=k, dtype="float32", tail=tail)
                f = c.encode(z)
                idx = f["indices"].astype(np.int64)
                for T in (2, 4, 20):
                    err = np.abs(tail_logit(c.decode(f, 1000, temperature=T), idx) - tail_logit(softmax(z, T), idx))
                    b = c.tail_bound(f, 1000, temperature=T)
                    rows.append({"rows": name, "k": k, "tail": tail, "T": T, "err_mean": float(err.mean()),
                                 "err_max": float(err.max()), "bound_mean": float(b.mean()),
                                 "violations": int((err > b + 1e-5).sum())})
    print("tail-mass logit error at T, float32 top-K logits, C = 1000 (mean / max over rows; bound = mean tail_bound)")
    print(f"{'rows':8s} {'K':>4s} {'tail':>6s} {'T':>3s} {'err mean':>9s} {'err max':>9s} {'bound':>7s} {'viol':>5s}")
    for r in rows:
        print(f"{r['rows']:8s} {r['k']:4d} {str(r['tail']):>6s} {r['T']:3d} {r['err_mean']:9.4f} {r['err_max']:9.4f} "
              f"{r['bound_mean']:7.3f} {r['violations']:5d}")
    out = {"rows": args.rows, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
