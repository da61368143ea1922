"""Shared test data: random valid stores (sizes, boxes inside images, probabilities, keys, labels)."""

import numpy as np

import fkdstore


def make_data(N, M, C, seed=0, max_side=300, sampler=None):
    """Random sizes, probabilities, keys and labels; boxes and flips random (stored crops) or, with a
    ``sampler`` (:class:`fkdstore.seeded.SlotCropSampler`), the sampler's (seeded crops)."""
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
    if sampler is not None:
        drawn = [sampler.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N)]
        boxes, flips = np.stack([b for b, _ in drawn]), np.stack([f for _, f in drawn])
    return dict(sizes=sizes, probs=probs, boxes=boxes, flips=flips, keys=keys, labels=labels, sampler=sampler)


def create(path, d, codec="ms", **kw):
    N, M, C = d["probs"].shape
    kw.setdefault("crop_sampler", d.get("sampler"))
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
