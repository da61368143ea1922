"""Crops/s of fkdstore.TorchDataset (m = 1, 2, 4, 8 crops per loaded image) against a conventional loader.

The conventional loader is what normal training does: load the image, draw one RandomResizedCrop + flip,
resize, per image per step (same crop/resize code, :func:`fkdstore.transforms.crop_resize`, same output
size, dtype, workers and crops per batch). FKD loads an image once for m stored crops; the paper's claim
is that this makes its data loading faster than normal training (target: >= 1.5x at m = 4).

Also reported:
* the share of TorchDataset's time spent reading and decoding labels (slot choice + ``read_batch`` +
  decode), measured in-process over the same batches;
* the two label paths on a larger synthetic store (ImageNet-like M = 200, C = 1000, MS top-5): the per-batch
  ``read_batch`` TorchDataset uses, against a per-epoch preload with ``read_all(slots)``.

    python benchmarks/dataset_throughput.py [--image-size 160 --output-size 112 --workers 2 --quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

import fkdstore
from fkdstore.images import list_images, load_image
from fkdstore.pytorch import epoch_slots
from fkdstore.testing import make_digits_folder, make_photo_folder
from fkdstore.seeded import SlotCropSampler
from fkdstore.transforms import crop_resize, normalize


class Conventional(Dataset):
    """Normal training's loader: one fresh RandomResizedCrop (+ flip) of each image per step."""

    def __init__(self, paths, targets, size, normalize_=True):
        self.paths, self.targets, self.size, self.normalize = paths, targets, size, normalize_
        self.scale, self.log_ratio = (0.08, 1.0), (math.log(3 / 4), math.log(4 / 3))

    def __len__(self):
        return len(self.paths)

    def _box(self, H, W):  # torchvision's RandomResizedCrop.get_params
        for _ in range(10):
            area = H * W * random.uniform(*self.scale)
            r = math.exp(random.uniform(*self.log_ratio))
            w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if 0 < w <= W and 0 < h <= H:
                return random.randint(0, H - h), random.randint(0, W - w), h, w
        return 0, 0, H, W

    def __getitem__(self, i):
        img = load_image(self.paths[i])
        x = crop_resize(img, self._box(img.size[1], img.size[0]), random.random() < 0.5, self.size)
        return (normalize(x) if self.normalize else x), self.targets[i]


def make_photos(root: Path, copies: int) -> Path:
    """Real JPEG photographs: 30 tiles (160-398 px) of scikit-learn's two sample photos, each copied."""
    src = make_photo_folder(root / "tiles", tiles=15)
    out = root / "photo"
    for p in src.rglob("*.jpg"):
        for c in range(copies):
            q = out / p.parent.name / f"{p.stem}_{c:03d}.jpg"
            q.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, q)
    shutil.rmtree(src)
    return out


def make_images(root: Path, n_size: int, fmt: str) -> Path:
    if fmt == "photo":
        return make_photos(root, copies=40)
    src = make_digits_folder(root / "png", size=n_size)
    if fmt == "png":
        return src
    out = root / fmt
    for p in src.rglob("*.png"):
        q = out / p.relative_to(src).with_suffix(".jpg")
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).save(q, quality=90)
    shutil.rmtree(src)
    return out


def make_store(path: Path, folder: Path, M: int, C: int = 10, k: int = 5) -> Path:
    """Boxes from SlotCropSampler (as the teacher runner; stored here) and synthetic MS top-k labels (values don't matter here)."""
    lst = list_images(folder)
    sizes = np.array([list(reversed(Image.open(p).size)) for p in lst.paths])
    rng, sampler = np.random.default_rng(0), SlotCropSampler(seed=0)
    w = fkdstore.write(path, num_images=len(lst), crops_per_image=M, num_classes=C, codec={"name": "ms", "k": k},
                       image_keys=lst.keys, image_sizes=sizes, labels=lst.labels)
    with w:
        for s in range(0, len(lst), 256):
            idx = np.arange(s, min(s + 256, len(lst)))
            bf = [sampler.sample(int(i), *sizes[i], M) for i in idx]
            probs = rng.dirichlet(np.ones(C), (len(idx), M)).astype(np.float32)
            w.put(idx, np.stack([b for b, _ in bf]), np.stack([f for _, f in bf]), probs)
    return path


def time_loader(loader, repeat: int, warm_batches: int = 2) -> float:
    """Best-of-``repeat`` crops/s of one pass, after the first ``warm_batches`` (worker start-up excluded)."""
    return max(_one_pass(loader, warm_batches) for _ in range(repeat))


def _one_pass(loader, warm_batches: int) -> float:
    it = iter(loader)
    n = 0
    for _ in range(warm_batches):
        n += len(next(it)[0] if isinstance(loader.dataset, Conventional) else next(it)["crops"])
    t0, counted = time.perf_counter(), 0
    for batch in it:
        counted += len(batch[0] if isinstance(loader.dataset, Conventional) else batch["crops"])
    return counted / (time.perf_counter() - t0)


def cpu_rate(ds, crops_per_batch: int, crops: int) -> float:
    """Crops per CPU-second in this process (workers=0; time.process_time, so insensitive to other load)."""
    conv = isinstance(ds, Conventional)
    per = 1 if conv else ds.crops_per_sample
    B = crops_per_batch if conv else max(1, crops_per_batch // per)
    order = np.random.default_rng(2).permutation(len(ds))
    n_items = min(len(ds), max(B, crops // per))
    ds[0] if conv else ds.__getitems__([0])  # warm caches
    t0 = time.process_time()
    for s in range(0, n_items, B):
        items = order[s:s + B].tolist()
        default_collate([ds[i] for i in items]) if conv else fkdstore.collate(ds.__getitems__(items))
    return n_items * per / (time.process_time() - t0)


def loader_kwargs(workers):
    kw = dict(num_workers=workers)
    if workers:
        kw.update(multiprocessing_context="fork", prefetch_factor=4, persistent_workers=False)
    return kw


def label_share(ds, batch_images: int, rounds: int = 1) -> float:
    """Share of __getitems__ time spent in the label path (slots + read_batch + decode), in-process."""
    order = np.random.default_rng(1).permutation(len(ds))
    t_all = t_lab = 0.0
    for _ in range(rounds):
        for s in range(0, len(order), batch_images):
            items = order[s:s + batch_images]
            t0 = time.process_time()
            ds._read_labels(ds.image_indices[items])
            t1 = time.process_time()
            ds.__getitems__(items.tolist())  # labels again + images
            t2 = time.process_time()
            t_lab += t1 - t0
            t_all += t2 - t1
    return t_lab / t_all


def _distinct_top_k(rng, lead: tuple[int, ...], C: int, k: int) -> np.ndarray:
    """Random top-k class indices, distinct per crop (the writer refuses repeated indices): a random start
    plus strictly increasing offsets below C, modulo C."""
    offsets = np.concatenate([np.zeros((*lead, 1), np.int64),
                              np.cumsum(rng.integers(1, max(2, C // k), (*lead, k - 1)), -1)], -1)
    return ((rng.integers(0, C, (*lead, 1)) + offsets) % C).astype(np.uint16)


def label_paths(tmp: Path, N: int, M: int = 200, C: int = 1000, k: int = 5, m: int = 4, B: int = 256) -> dict:
    """Per-image cost of the per-batch read_batch path vs a per-epoch read_all(slots) preload."""
    path = tmp / "big.fkd"
    rng = np.random.default_rng(0)
    w = fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec={"name": "ms", "k": k},
                       image_keys=[f"{i}.jpg" for i in range(N)], image_sizes=np.full((N, 2), 400))
    with w:
        for s in range(0, N, 1000):
            b = min(1000, N - s)
            boxes = np.zeros((b, M, 4), np.int32)
            boxes[..., 2:] = rng.integers(50, 400, (b, M, 2))
            probs = np.sort(rng.dirichlet(np.ones(k), (b, M)) * 0.9, -1)[..., ::-1].astype(np.float16)
            w.put_fields(np.arange(s, s + b), boxes, rng.random((b, M)) < 0.5,
                         {"indices": _distinct_top_k(rng, (b, M), C, k),
                          "probs": np.ascontiguousarray(probs)})
    r = fkdstore.open(path)
    order = rng.permutation(N)
    t0 = time.perf_counter()
    for s in range(0, N, B):
        idx = order[s:s + B]
        slots = np.stack([epoch_slots(int(i), 1, m, M) for i in idx])
        r.decode(r.read_batch(idx, slots).fields)
    per_batch = (time.perf_counter() - t0) / N * 1e6
    t0 = time.perf_counter()
    slots = np.stack([epoch_slots(i, 1, m, M) for i in range(N)])
    t_slots = time.perf_counter() - t0
    rec = r.read_all(slots)
    t_read = time.perf_counter() - t0 - t_slots
    t0 = time.perf_counter()
    for s in range(0, N, B):  # the batches still need decoding
        idx = order[s:s + B]
        r.decode({f: v[idx] for f, v in rec.fields.items()})
    t_dec = time.perf_counter() - t0
    return {"N": N, "M": M, "C": C, "codec": f"ms k={k}", "m": m, "batch_images": B,
            "read_batch_us_per_image": round(per_batch, 1),
            "preload_us_per_image": round((t_slots + t_read + t_dec) / N * 1e6, 1),
            "preload_slots_us": round(t_slots / N * 1e6, 1), "preload_read_all_us": round(t_read / N * 1e6, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--format", choices=("jpg", "png", "photo"), default="jpg",
                   help="digits (--image-size px) as jpg/png, or 'photo': 1200 real JPEG photo tiles of 160-398 px")
    p.add_argument("--output-size", type=int, default=112)
    p.add_argument("--crops-per-batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=32, help="M stored crops per image")
    p.add_argument("--uint8", action="store_true", help="return uint8 crops (normalise on the GPU) in both loaders")
    p.add_argument("--label-store-images", type=int, default=20000, help="N of the label-path store (0: skip)")
    p.add_argument("--repeat", type=int, default=2, help="passes per loader; the best is reported")
    p.add_argument("--cpu-crops", type=int, default=3000, help="crops per loader for the CPU-time measure")
    p.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fkd_bench_"))
    try:
        folder = make_images(tmp, args.image_size, args.format)
        if args.quick:
            for p_ in sorted(folder.rglob("*.*"))[300:]:
                p_.unlink()
        store = make_store(tmp / "s.fkd", folder, args.slots)
        lst = list_images(folder)
        norm = not args.uint8
        res = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
               "images": len(lst), "image_size": args.image_size, "format": args.format,
               "output_size": args.output_size, "crops_per_batch": args.crops_per_batch,
               "workers": args.workers, "repeat": args.repeat, "slots": args.slots, "normalize": norm, "cpus": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version(), "rows": []}
        conv = Conventional(lst.paths, lst.labels, args.output_size, norm)
        loaders = {0: DataLoader(conv, batch_size=args.crops_per_batch, shuffle=True, **loader_kwargs(args.workers))}
        datasets = {0: conv}
        for m in (1, 2, 4, 8):
            ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, output_size=args.output_size,
                                       normalize=norm, epoch=1)
            datasets[m] = ds
            loaders[m] = DataLoader(ds, batch_size=max(1, args.crops_per_batch // m), shuffle=True,
                                    collate_fn=fkdstore.collate, **loader_kwargs(args.workers))
        # Interleaved repeats, best of each: other processes on a shared machine slow every loader alike.
        wall = {k: 0.0 for k in loaders}
        for _ in range(args.repeat):
            for k, dl in loaders.items():
                wall[k] = max(wall[k], time_loader(dl, 1))
        cpu = {k: cpu_rate(datasets[k], args.crops_per_batch, args.cpu_crops) for k in loaders}
        for k in loaders:
            row = {"loader": "conventional" if k == 0 else "TorchDataset", "m": max(k, 1),
                   "crops_per_s": round(wall[k]), "ratio": round(wall[k] / wall[0], 2),
                   "cpu_crops_per_s": round(cpu[k]), "cpu_ratio": round(cpu[k] / cpu[0], 2)}
            if k:
                row["label_share"] = round(label_share(datasets[k], max(1, args.crops_per_batch // k)), 4)
            res["rows"].append(row)
            print(row, flush=True)
        if args.label_store_images:
            res["label_paths"] = label_paths(tmp, args.label_store_images)
        print(json.dumps(res, indent=1))
        print(f"\n| loader | m | crops/s ({args.workers} workers) | vs conventional | crops per CPU-s | vs conventional "
              f"| label read+decode share |\n|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            share = f"{100 * r['label_share']:.1f} %" if "label_share" in r else "-"
            print(f"| {r['loader']} | {r['m']} | {r['crops_per_s']} | {r['ratio']:.2f}x | {r['cpu_crops_per_s']} "
                  f"| {r['cpu_ratio']:.2f}x | {share} |")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
