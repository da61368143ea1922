"""Write the golden v1.0 stores (one per codec) with fkdstore 0.1.0. Run ONCE; never regenerate silently.

The stores and ``expected.npz`` were written by the fkdstore 0.1.0 writer (commit 7181226) and are read by
``tests/test_golden.py`` with today's reader: a reader change that breaks an existing store fails there.
Usage (only with fkdstore 0.1.0 installed): python tests/golden/make_v1_0.py tests/golden/v1.0
"""
import json
import sys
from pathlib import Path

import numpy as np

import fkdstore

CODECS = {
    "full": {"name": "full", "dtype": "float16"},
    "hard": {"name": "hard"},
    "smoothing": {"name": "smoothing", "dtype": "float16"},
    "ms": {"name": "ms", "k": 3, "dtype": "float16"},
    "mr": {"name": "mr", "k": 3, "dtype": "float32"},
}
N, M, C = 11, 3, 7  # ipc=2, ips=4: three shards, the last one partial


def main(out: Path) -> None:
    assert fkdstore.__version__ == "0.1.0", "golden v1.0 stores are written by fkdstore 0.1.0 only"
    out.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(20261126)
    sizes = rng.integers(20, 60, size=(N, 2)).astype(np.int32)
    keys = [f"class{i % 3}/img_{i:03d}.png" for i in range(N)]
    labels = (np.arange(N) % C).astype(np.int32)
    boxes = np.zeros((N, M, 4), np.int64)
    for i in range(N):
        H, W = sizes[i]
        h = rng.integers(1, H + 1, M)
        w = rng.integers(1, W + 1, M)
        boxes[i, :, 0] = [rng.integers(0, H - a + 1) for a in h]
        boxes[i, :, 1] = [rng.integers(0, W - b + 1) for b in w]
        boxes[i, :, 2], boxes[i, :, 3] = h, w
    flips = rng.random((N, M)) < 0.5
    logits = rng.normal(size=(N, M, C)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    aug = rng.normal(size=(N, M, 2)).astype(np.float32)
    expected = {"sizes": sizes, "labels": labels, "boxes": boxes, "flips": flips, "aug": aug}
    for name, cfg in CODECS.items():
        path = out / f"{name}.zarr"
        with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=cfg, image_keys=keys,
                            image_sizes=sizes, labels=labels, meta={"golden": name}, aug=["a0", ("a1", "int")],
                            images_per_chunk=2, images_per_shard=4) as w:
            order = rng.permutation(N)  # out of order, in two puts
            for part in (order[:5], order[5:]):
                w.put(part, boxes[part], flips[part], probs[part].astype(np.float32), aug=aug[part])
        with fkdstore.open(path) as r:
            rec = r.read_batch(np.arange(N))
            for f, v in rec.fields.items():
                expected[f"{name}/{f}"] = v
            expected[f"{name}/decoded"] = r.decode(rec.fields)
    np.savez(out / "expected.npz", **expected)
    (out / "keys.json").write_text(json.dumps(keys))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
