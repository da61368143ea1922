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


def small_store(path, *, n=12, m=5, c=30, codec="ms", labels=True, meta=None, seed=0, write=None,
                ipc=None, ips=None, aug=None, crop_sampler=None, replay=None, keys=None):
    """A small store of Dirichlet probabilities (the fault-injection tests' store); ``write`` limits which
    images are put; with ``crop_sampler`` the crops are the sampler's (seeded, derived on read), else random
    17 x 19 boxes stored. Returns the data put."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(40, 90, n), rng.integers(40, 90, n)], 1)
    top = rng.integers(0, sizes[:, None, 0] // 2, (n, m))
    left = rng.integers(0, sizes[:, None, 1] // 2, (n, m))
    boxes = np.stack([top, left, np.full((n, m), 17), np.full((n, m), 19)], -1)
    flips = rng.random((n, m)) < 0.5
    if crop_sampler is not None:
        drawn = [crop_sampler.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), m) for i in range(n)]
        boxes, flips = np.stack([b for b, _ in drawn]), np.stack([f for _, f in drawn])
    probs = rng.dirichlet(np.full(c, 0.2), (n, m)).astype(np.float32)
    lab = rng.integers(0, c, n) if labels else None
    a = rng.normal(size=(n, m, len(aug))).astype(np.float32) if aug else None
    idx = np.arange(n) if write is None else np.asarray(write)
    with fkdstore.write(path, num_images=n, crops_per_image=m, num_classes=c, codec=codec,
                        image_keys=keys or [f"cls{i % 3}/img{i}.png" for i in range(n)], image_sizes=sizes,
                        labels=lab, meta=meta or {"teacher": {"name": "resnet-test", "temperature": 1.0}},
                        images_per_chunk=ipc, images_per_shard=ips, aug=aug, crop_sampler=crop_sampler,
                        replay=replay) as w:
        if len(idx):
            w.put(idx, boxes[idx], flips[idx], probs[idx], aug=None if a is None else a[idx])
    return dict(boxes=boxes, flips=flips, probs=probs, labels=lab, sizes=sizes, aug=a)
