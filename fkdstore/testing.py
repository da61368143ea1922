"""Small offline datasets and models for tests, examples and benchmarks (no downloads).

Requires scikit-learn (the ``test``/``demo`` extras): its bundled digits and sample photographs are real
images that ship inside the package.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .images import list_images, load_image
from .progress import progress as _progress
from .seeded import SlotCropSampler
from .transforms import crop_resize, normalize


def make_digits_folder(
    root: str | os.PathLike, *, size: int = 32, per_class: int | None = None, split: str | None = None,
    test_fraction: float = 0.2, seed: int = 0, colour: bool = True,
) -> Path:
    """Write scikit-learn's 8x8 digits as an ImageFolder tree ``root/<digit>/<n>.png`` upscaled to ``size``.

    ``split="train"``/``"test"`` writes a seeded, stratified share of the images (``test_fraction``).
    ``colour`` tints each image with a seeded random RGB colour so the 3 channels differ. Returns ``root``.
    """
    from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency (test/demo extras)

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
        img = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        img.save(root / str(c) / f"{i:04d}.png")
    return root


def make_photo_folder(root: str | os.PathLike, *, tiles: int = 4, size: int = 160) -> Path:
    """Cut scikit-learn's two sample photographs (china, flower) into ``tiles`` JPEG tiles each, in class
    folders ``root/china`` and ``root/flower``, with varied sizes. Real photographs for end-to-end tests."""
    from sklearn.datasets import load_sample_images  # noqa: PLC0415 - optional dependency (test/demo extras)

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
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import
    from torch import nn  # noqa: PLC0415 - as above

    if seed is not None:
        torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


# --------------------------------------------------------------------------- small training kit
# Shared by examples/demo.py and benchmarks/reproduce.py so that the teacher, every student variant and the
# benchmark run the same loop, loader and schedule (torch is imported lazily: this module stays torch-free
# at import).


def limit_threads(n: int = 1) -> None:
    """Pin torch (intra- and inter-op) and the OpenMP/MKL/BLAS pools to ``n`` threads.

    The models here are tiny, so one thread runs them nearly as fast as several, while a pool of threads on
    cores shared with other jobs spends its time in spin-waits at every parallel region. Call it before torch
    does any work; the environment variables reach pools that start later (numexpr, BLAS, workers).
    """
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set, or inter-op work already ran: the intra-op limit is what matters
        pass


def cosine_lr(base: float, pass_index: int, passes: int) -> float:
    """Cosine learning rate over ``passes``, constant within a pass.

    With ``m`` crops of each image per pass this is the FKD paper's serrated schedule (a staircase over the
    effective epochs); with ``m = 1`` it is a cosine stepped per epoch."""
    return 0.5 * base * (1.0 + math.cos(math.pi * pass_index / passes))


def load_eval_folder(folder: str | os.PathLike, size: int):
    """Every image of an ImageFolder, resized whole to ``size`` (bilinear): uint8 ``[N, 3, size, size]``
    and int64 labels ``[N]``, for :func:`accuracy`."""
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    lst = list_images(folder)
    x = torch.stack([torch.from_numpy(np.array(load_image(p).resize((size, size), 2))).permute(2, 0, 1)
                     for p in lst.paths])
    return x, torch.tensor(lst.labels, dtype=torch.int64)


def accuracy(model, x, y, mean=None, std=None, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` (normalised with ``mean``/``std``, default
    ImageNet's, as :func:`fkdstore.transforms.normalize`); the model is left in train mode afterwards."""
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import

    kw = {} if mean is None else {"mean": mean, "std": std}
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(normalize(x[s:s + batch_size], **kw)).argmax(-1) for s in range(0, len(x), batch_size)])
    model.train()
    return float((pred == y).float().mean())


class RandomCropDataset:
    """The conventional loader FKD is compared with: load an image, take a fresh random-resized crop + flip
    of it per epoch, return ``(uint8 crop [3, size, size], label)``.

    Crops of all ``epochs`` are drawn up front from :class:`fkdstore.seeded.SlotCropSampler` (seeded by
    ``seed``), so the per-item work is decode + crop + resize, as with torchvision's RandomResizedCrop, and a
    run is reproducible. Set ``.epoch`` before iterating an epoch. A map-style torch dataset.
    """

    def __init__(self, folder, size: int, scale=(0.08, 1.0), seed: int = 0, epochs: int = 1):
        lst = list_images(folder)
        self.paths, self.labels = lst.paths, np.asarray(lst.labels, dtype=np.int64)
        self.size, self.epoch, self.epochs = int(size), 0, int(epochs)
        sampler = SlotCropSampler(scale=tuple(scale), seed=seed)
        drawn = [sampler.sample(i, *load_image(p).size[::-1], self.epochs) for i, p in enumerate(self.paths)]
        self.boxes = np.stack([b for b, _ in drawn]).astype(np.int64)  # (N, epochs, 4)
        self.flips = np.stack([f for _, f in drawn])  # (N, epochs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        e = self.epoch
        crop = crop_resize(load_image(self.paths[i]), tuple(int(v) for v in self.boxes[i, e]), bool(self.flips[i, e]),
                           self.size)
        return crop, int(self.labels[i])


def train_classifier(model, batches, passes: int, lr: float, target_fn, *, mean=None, std=None,
                     progress: str | None = None, soft_loss=None) -> tuple[float, float]:
    """Train ``model`` for ``passes`` passes; return (wall seconds, process CPU seconds) of the loop.

    ``batches(p)`` yields ``(uint8 crops [n, 3, H, W], info)`` for pass ``p``; ``target_fn(x, info)`` returns
    int64 class targets (cross-entropy) or ``[n, C]`` soft targets (:func:`fkdstore.soft_cross_entropy`) for
    the normalised crops ``x``; ``soft_loss(logits, soft_targets)`` replaces the soft loss (e.g. a temperature:
    ``lambda z, t: T * T * soft_cross_entropy(z, t, temperature=T)``). SGD (momentum 0.9, Nesterov, weight decay
    5e-4), :func:`cosine_lr` per pass.
    ``progress``: report with that description (:mod:`fkdstore.progress`: a bar on a terminal, plain lines
    otherwise), or None.
    """
    import torch  # noqa: PLC0415 - torch stays optional: this module is torch-free at import
    import torch.nn.functional as F  # noqa: PLC0415 - as above

    from .pytorch import soft_cross_entropy  # noqa: PLC0415 - imports torch

    kw = {} if mean is None else {"mean": mean, "std": std}
    soft_loss = soft_cross_entropy if soft_loss is None else soft_loss
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps: Iterable[int] = range(passes)
    if progress:
        steps = _progress(None, total=passes, desc=progress, unit="pass", leave=False, mininterval=0.5).wrap(steps)
    model.train()
    t, c = time.perf_counter(), time.process_time()
    for p in steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, p, passes)
        for x, info in batches(p):
            xn = normalize(x, **kw)
            target = target_fn(xn, info)
            out = model(xn)
            loss = F.cross_entropy(out, target) if target.dtype == torch.int64 else soft_loss(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t, time.process_time() - c
