"""Shared test data: random valid stores (sizes, boxes inside images, probabilities, keys, labels)."""

import numpy as np

import fkdstore


def make_data(N, M, C, seed=0, max_side=300):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, max_side, (N, 2))
    probs = rng.dirichlet(np.full(C, 0.2), (N, M)).astype(np.float32)
    h = rng.integers(1, sizes[:, None, 0] + 1, (N, M))
    w = rng.integers(1, sizes[:, None, 1] + 1, (N, M))
    top = (rng.random((N, M)) * (sizes[:, None, 0] - h + 1)).astype(int)
    left = (rng.random((N, M)) * (sizes[:, None, 1] - w + 1)).astype(int)
    boxes = np.stack([top, left, h, w], -1)
    flips = rng.random((N, M)) < 0.5
    keys = [f"class{i % 3}/img_{i:05d}.jpg" for i in range(N)]
    labels = rng.integers(-1, C, N)
    return dict(sizes=sizes, probs=probs, boxes=boxes, flips=flips, keys=keys, labels=labels)


def create(path, d, codec="ms", **kw):
    N, M, C = d["probs"].shape
    return fkdstore.write(
        path, num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=d["keys"],
        image_sizes=d["sizes"], labels=d["labels"], **kw,
    )


def fill(w, d, order=None, step=7):
    N = len(d["keys"])
    order = np.arange(N) if order is None else np.asarray(order)
    for s in range(0, len(order), step):
        i = order[s:s + step]
        w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])
