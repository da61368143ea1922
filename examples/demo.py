"""The main job, end to end, on real images that ship with scikit-learn (offline, ~2 minutes on 2 cores):

1. build an image folder from scikit-learn's digits (upscaled to 32 px, tinted RGB), train/test split;
2. train a small teacher CNN;
3. generate a label store with the teacher-runner (``fkdstore.generate``: M random-resized crops per image,
   Marginal Smoothing top-3 labels);
4. train a smaller student from the store with ``fkdstore.TorchDataset`` (m crops per image per batch,
   serrated cosine schedule), and the same student on hard labels with random crops for comparison;
5. print accuracies, timings, ``fkdstore inspect`` and ``fkdstore verify`` of the store.

    python examples/demo.py [--out demo-out] [--crops 24] [--passes 10]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import fkdstore
from fkdstore import cli
from fkdstore.images import list_images, load_image
from fkdstore.testing import make_digits_folder, tiny_cnn
from fkdstore.transforms import CropSampler, crop_resize, normalize

SIZE = 32
MEAN, STD = (0.3, 0.3, 0.3), (0.3, 0.3, 0.3)
SCALE = (0.25, 1.0)  # random-resized-crop area range: 8x8 digits upscaled lose the digit below ~1/4


def load_folder(root):
    """All images of a folder as a normalised tensor [N, 3, SIZE, SIZE] and labels (for evaluation)."""
    lst = list_images(root)
    x = torch.stack([torch.from_numpy(np.asarray(load_image(p))).permute(2, 0, 1) for p in lst.paths])
    return normalize(x, MEAN, STD), torch.tensor(lst.labels)


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def random_crops(images_u8, sampler, epoch):
    """Conventional augmentation: one fresh random-resized crop + flip per image (baseline student)."""
    out = []
    for i, img in enumerate(images_u8):
        (box,), (flip,) = sampler.sample(epoch * len(images_u8) + i, img.height, img.width, 1)
        out.append(crop_resize(img, box, bool(flip), SIZE))
    return normalize(torch.stack(out), MEAN, STD)


def serrated_lr(base, pass_idx, passes):
    """Cosine over passes: every crop of a pass shares one rate, so with m crops/image it is a staircase."""
    return 0.5 * base * (1 + math.cos(math.pi * pass_idx / passes))


def train_hard_labels(train_dir, model, epochs, seed, desc, batch_size=64):
    """Conventional training: one fresh random-resized crop per image per epoch, ground-truth labels,
    AdamW with a cosine learning rate stepped per epoch."""
    torch.manual_seed(seed)
    lst = list_images(train_dir)
    imgs = [load_image(p) for p in lst.paths]
    y = torch.tensor(lst.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sampler = CropSampler(scale=SCALE, seed=seed + 100)
    for ep in tqdm(range(epochs), desc=desc, unit="epoch"):
        for g in opt.param_groups:
            g["lr"] = serrated_lr(3e-3, ep, epochs)
        model.train()
        x = random_crops(imgs, sampler, ep)
        perm = torch.randperm(len(imgs))
        for s in range(0, len(imgs), batch_size):
            b = perm[s:s + batch_size]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_student_fkd(store_path, train_dir, passes, m, seed):
    torch.manual_seed(seed)
    ds = fkdstore.TorchDataset(store_path, train_dir, crops_per_sample=m, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, collate_fn=fkdstore.collate,
                                         num_workers=0, generator=torch.Generator().manual_seed(seed))
    student = tiny_cnn(10, width=12, seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=1e-4)
    for p in tqdm(range(passes), desc=f"student FKD (m={m})", unit="pass"):
        ds.set_epoch(p)
        for g in opt.param_groups:
            g["lr"] = serrated_lr(3e-3, p, passes)
        student.train()
        for batch in loader:
            loss = fkdstore.soft_cross_entropy(student(batch["crops"]), batch["soft_labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="work folder (recreated)")
    ap.add_argument("--crops", type=int, default=24, help="M: crops stored per image")
    ap.add_argument("--m", type=int, default=4, help="crops per image per batch in FKD training")
    ap.add_argument("--passes", type=int, default=10, help="FKD passes over the data (each = m epochs)")
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    times = {}

    t = time.perf_counter()
    train_dir = make_digits_folder(out / "images" / "train", size=SIZE, split="train", seed=a.seed)
    test_dir = make_digits_folder(out / "images" / "test", size=SIZE, split="test", seed=a.seed)
    x_test, y_test = load_folder(test_dir)
    times["image folder"] = time.perf_counter() - t
    print(f"image folder: {len(list_images(train_dir))} train / {len(y_test)} test digits, {SIZE}px, in {out / 'images'}")

    t = time.perf_counter()
    teacher = train_hard_labels(train_dir, tiny_cnn(10, width=32, seed=a.seed), a.teacher_epochs, a.seed, "teacher")
    times["teacher training"] = time.perf_counter() - t
    acc_teacher = accuracy(teacher, x_test, y_test)

    t = time.perf_counter()
    store_path = out / "labels.zarr"
    fkdstore.generate(
        teacher, train_dir, store_path, crops_per_image=a.crops, codec=fkdstore.get_codec("ms", k=3),
        input_size=SIZE, mean=MEAN, std=STD, seed=a.seed, scale=SCALE, batch_size=512, num_workers=0,
        teacher_name="tiny_cnn(width=32)",
    )
    times["label generation (teacher-runner)"] = time.perf_counter() - t

    t = time.perf_counter()
    student = train_student_fkd(store_path, train_dir, a.passes, a.m, a.seed)
    times[f"student FKD, {a.passes} passes x m={a.m}"] = time.perf_counter() - t
    acc_fkd = accuracy(student, x_test, y_test)

    t = time.perf_counter()
    hard = train_hard_labels(train_dir, tiny_cnn(10, width=12, seed=a.seed), a.passes * a.m, a.seed,
                             "student hard labels", batch_size=128)
    times[f"student hard labels, {a.passes * a.m} epochs"] = time.perf_counter() - t
    acc_hard = accuracy(hard, x_test, y_test)

    print("\n== accuracy on held-out digits ==")
    print(f"teacher (tiny_cnn width 32)                 {acc_teacher:6.1%}")
    print(f"student (width 12), FKD soft labels         {acc_fkd:6.1%}")
    print(f"student (width 12), hard labels, same crops {acc_hard:6.1%}")
    print("(one seed, small budget: benchmarks/reproduce.py compares the variants over 3 seeds)")
    print("\n== timings ==")
    for k, v in times.items():
        print(f"{k:45s} {v:7.1f} s")
    print("\n== fkdstore inspect ==")
    cli.main(["inspect", str(store_path)])
    print("\n== fkdstore verify ==")
    rc = cli.main(["verify", str(store_path)])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
