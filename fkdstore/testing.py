"""Small offline datasets and models for tests, examples and benchmarks (no downloads).

Requires scikit-learn (the ``test``/``demo`` extras): its bundled digits and sample photographs are real
images that ship inside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def make_digits_folder(
    root: str | os.PathLike, *, size: int = 32, per_class: int | None = None, split: str | None = None,
    test_fraction: float = 0.2, seed: int = 0, colour: bool = True,
) -> Path:
    """Write scikit-learn's 8x8 digits as an ImageFolder tree ``root/<digit>/<n>.png`` upscaled to ``size``.

    ``split="train"``/``"test"`` writes a seeded, stratified share of the images (``test_fraction``).
    ``colour`` tints each image with a seeded random RGB colour so the 3 channels differ. Returns ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    is_test = np.zeros(len(order), bool)
    for c in range(10):
        idx = order[d.target[order] == c]
        is_test[idx[: int(round(len(idx) * test_fraction))]] = True
    keep = {None: np.ones(len(order), bool), "train": ~is_test, "test": is_test}[split]
    root = Path(root)
    counts = dict.fromkeys(range(10), 0)
    tint = rng.uniform(0.4, 1.0, (len(order), 3))
    for i in range(len(d.target)):
        c = int(d.target[i])
        if not keep[i] or (per_class is not None and counts[c] >= per_class):
            continue
        counts[c] += 1
        g = (d.images[i] / 16.0).astype(np.float32)
        rgb = g[..., None] * (tint[i] if colour else np.ones(3))
        img = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        img.save(root / str(c) / f"{i:04d}.png")
    return root


def make_photo_folder(root: str | os.PathLike, *, tiles: int = 4, size: int = 160) -> Path:
    """Cut scikit-learn's two sample photographs (china, flower) into ``tiles`` JPEG tiles each, in class
    folders ``root/china`` and ``root/flower``, with varied sizes. Real photographs for end-to-end tests."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = Path(root)
    data = load_sample_images()
    for img, fn in zip(data.images, data.filenames):
        name = Path(fn).stem
        (root / name).mkdir(parents=True, exist_ok=True)
        H, W = img.shape[:2]
        for t in range(tiles):
            h, w = size + 17 * t, size + 29 * t
            top, left = (t * 53) % (H - h), (t * 97) % (W - w)
            Image.fromarray(img[top:top + h, left:left + w]).save(root / name / f"{name}_{t}.jpg", quality=90)
    return root


def tiny_cnn(num_classes: int = 10, width: int = 16, seed: int | None = 0):
    """A small CNN (3 conv blocks, global pooling, linear head) for any input size >= 8 px."""
    import torch
    from torch import nn

    if seed is not None:
        torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )
