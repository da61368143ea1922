"""Self-supervised heads read at a low temperature: the decoded-distribution error of a ``logits`` store, float16
log-softmax (``l = z - logsumexp z``) against centred (``c = z - max z``, ``centred=True``), and float32.

Teacher outputs (no trained teacher: their statistics are what matters to rounding):

* ``moco128``: MoCo v2's projection, an L2-normalised 128-d vector (entries ~ N(0, 1/128)), read as
  ``softmax(z / tau)`` as FKD section 3.4 stores it;
* ``cos128``: 128 cosine similarities in [-1, 1] (a query against 128 keys or prototypes);
* ``swav3000``: SwAV's 3000 prototype scores, cosines of a normalised 128-d embedding with 3000 normalised
  prototypes.

Errors against ``softmax(z / tau)`` computed in float64 from the float32 outputs: ``max_rel`` (largest
``|q / p - 1|`` over all classes and rows), ``tv`` (mean total variation) and ``kl`` (mean ``KL(p || q)``).

    python benchmarks/ssl_precision.py [--rows 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fkdstore.codecs import Logits  # noqa: E402


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def outputs(kind: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "moco128":
        return unit(rng.normal(size=(rows, 128))).astype(np.float32)
    if kind == "cos128":  # correlated with one key, like a positive pair among negatives
        q, keys = unit(rng.normal(size=(rows, 64))), unit(rng.normal(size=(128, 64)))
        s = q @ keys.T
        s[:, 0] = rng.uniform(0.5, 0.95, rows)
        return s.astype(np.float32)
    q, protos = unit(rng.normal(size=(rows, 128))), unit(rng.normal(size=(3000, 128)))
    return (q @ protos.T).astype(np.float32)


def errors(codec: Logits, z: np.ndarray, tau: float) -> dict:
    p = np.exp(z.astype(np.float64) / tau - (z.astype(np.float64) / tau).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = codec.decode(codec.encode(z), z.shape[-1], temperature=tau).astype(np.float64)
    return {"max_rel": float(np.abs(q / p - 1).max()), "tv": float(0.5 * np.abs(q - p).sum(-1).mean()),
            "kl": float((p * (np.log(p) - np.log(q))).sum(-1).mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    codecs = {"float16": Logits(dtype="float16"), "float16 centred": Logits(dtype="float16", centred=True),
              "float32": Logits(dtype="float32")}
    rows = []
    for kind in ("moco128", "cos128", "swav3000"):
        z = outputs(kind, args.rows, rng)
        for tau in (0.1, 0.2, 1.0):
            for name, codec in codecs.items():
                rows.append({"outputs": kind, "D": z.shape[-1], "tau": tau, "codec": name, **errors(codec, z, tau)})
    print(f"{args.rows} rows per output kind; errors of decode(temperature=tau) against softmax(z / tau) in float64")
    print(f"{'outputs':9s} {'D':>5s} {'tau':>4s} {'codec':16s} {'max |q/p-1|':>12s} {'mean TV':>10s} {'mean KL':>10s}")
    for r in rows:
        print(f"{r['outputs']:9s} {r['D']:5d} {r['tau']:4.1f} {r['codec']:16s} {r['max_rel']:12.2e} {r['tv']:10.2e} "
              f"{r['kl']:10.2e}")
    out = {"rows_per_kind": args.rows, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
