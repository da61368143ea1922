"""Where a TorchDataset item's time goes, the limit it could reach, and crops/s against a plain PIL loader.

Data: photo-sized JPEGs (~430x640, quality 90) synthesised with Pillow from smooth multi-scale noise, gradients
and fine grain, so they compress and decode like photographs (~80 KB, like scikit-learn's 427x640 sample photos
re-saved at q90); a store with M crop boxes per image from :class:`fkdstore.seeded.SlotCropSampler` (stored) and
ImageNet-like MS top-5 labels (C = 1000). Output: 224 px crops, bilinear.

1. Profile of one item (``__getitems__`` + :func:`fkdstore.collate`, per image, in-process, CPU time): the parts
   timed *inside* the item (decode, crop+resize, flip+layout+normalise, slot choice, label read, label decode,
   collate, and the rest = per-item Python) against the same parts measured *alone* on the same images/boxes.
2. The limit: ``decode + m x (crop+resize)`` per image, measured alone; crops per CPU-second m / limit.
3. Through a DataLoader (2 fork workers, 128 crops per batch, workers restarted each epoch) for TorchDataset
   (m = 1, 2, 4, 8) and a plain PIL loader (open -> RandomResizedCrop via ``Image.resize(box=...)`` -> flip ->
   ToTensor + Normalize in place, or PILToTensor for uint8; default_collate) in the same run, float32 and uint8
   outputs, runs interleaved, median of ``--runs``: crops per wall second, and crops per CPU-second of the main
   process + its workers (``getrusage``; far steadier than wall time when other jobs share the cores).
   ``--quick`` (what ``make bench`` runs): 96 images, 1024 crops per epoch.

    python benchmarks/dataset_profile.py [--images 256 --crops 2048 --runs 3 --workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import fkdstore
import fkdstore.pytorch as fp
import fkdstore.transforms as ft
from fkdstore.images import list_images
from fkdstore.seeded import SlotCropSampler
from fkdstore.transforms import IMAGENET_MEAN, IMAGENET_STD, Replay

MS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------- data


def photo(seed: int, H: int, W: int) -> Image.Image:
    """A photo-like RGB image: smooth noise at 6 scales, a colour gradient and grain."""
    rng = np.random.default_rng(seed)
    out = np.zeros((H, W, 3), np.float32)
    for cells, amp in ((3, 80), (8, 45), (24, 30), (64, 20), (215, 30)):
        small = rng.normal(0, 1, (cells, max(2, cells * W // H), 3))
        small = ((small - small.min()) / (np.ptp(small) + 1e-9) * 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC), np.float32)
        out += (up - 127.5) / 127.5 * amp
    yy, xx = np.mgrid[0:H, 0:W]
    out += rng.uniform(-60, 60, 3) * (yy / H)[..., None] + rng.uniform(-60, 60, 3) * (xx / W)[..., None]
    out += rng.normal(0, 6, (H, W, 3))
    return Image.fromarray(np.clip(out + 128, 0, 255).astype(np.uint8))


def make_photos(root: Path, n: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        H, W = int(rng.integers(410, 451)), int(rng.integers(600, 681))
        d = root / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        photo(i, H, W).save(d / f"{i:05d}.jpg", quality=90)
    return root


def make_store(path: Path, folder: Path, M: int, C: int = 1000, k: int = 5) -> Path:
    """Boxes and flips from SlotCropSampler (as the teacher-runner draws them; stored here), MS top-k fields of a
    peaked teacher."""
    lst = list_images(folder)
    sizes = np.array([list(reversed(Image.open(p).size)) for p in lst.paths])
    rng, sampler = np.random.default_rng(0), SlotCropSampler(seed=0)
    w = fkdstore.write(path, num_images=len(lst), crops_per_image=M, num_classes=C, codec={"name": "ms", "k": k},
                       image_keys=lst.keys, image_sizes=sizes, labels=lst.labels,
                       replay=Replay(input_size=224, interpolation="bilinear"))
    with w:
        for s in range(0, len(lst), 256):
            idx = np.arange(s, min(s + 256, len(lst)))
            bf = [sampler.sample(int(i), *sizes[i], M) for i in idx]
            probs = np.sort(rng.dirichlet(np.ones(k), (len(idx), M)) * 0.9, -1)[..., ::-1].astype(np.float16)
            distinct = np.argsort(rng.random((len(idx), M, C)), -1)[..., :k].astype(np.uint16)
            w.put_fields(idx, np.stack([b for b, _ in bf]), np.stack([f for _, f in bf]),
                         {"indices": distinct, "probs": np.ascontiguousarray(probs)})
    return path


# --------------------------------------------------------------------------------------------- plain loader


class PlainPIL(Dataset):
    """A plain PIL loader: ImageFolder's loader, RandomResizedCrop via ``Image.resize(box=...)``, flip,
    torchvision's ToTensor + Normalize (done in place, no clone) or PILToTensor for uint8."""

    def __init__(self, paths, targets, size=224, normalize=True):
        self.paths, self.targets, self.size, self.normalize = list(paths), list(targets), size, normalize
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self):
        return len(self.paths)

    @staticmethod
    def get_params(H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):  # torchvision RandomResizedCrop.get_params
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            area = H * W * random.uniform(*scale)
            r = math.exp(random.uniform(*log_ratio))
            w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if 0 < w <= W and 0 < h <= H:
                return random.randint(0, H - h), random.randint(0, W - w), h, w
        return 0, 0, H, W

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        top, left, h, w = self.get_params(img.size[1], img.size[0])
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
        if self.normalize:
            x = x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)
        return x, self.targets[i]


# --------------------------------------------------------------------------------------------- timing


def cpu_per_call(fn, args_list, min_time=0.3) -> float:
    """CPU seconds per call of ``fn(*args)`` over ``args_list`` (cycled until ``min_time`` of CPU time)."""
    fn(*args_list[0])
    n, t0 = 0, time.process_time()
    while True:
        for a in args_list:
            fn(*a)
        n += len(args_list)
        if time.process_time() - t0 >= min_time:
            return (time.process_time() - t0) / n


class Timers:
    """Wraps module-level functions and reader methods, accumulating CPU time per part."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._undo = []

    def wrap(self, owner, name, part):
        orig = getattr(owner, name)
        own = name in getattr(owner, "__dict__", {})  # an instance's method is wrapped in the instance

        def timed(*a, **k):
            t0 = time.process_time()
            try:
                return orig(*a, **k)
            finally:
                self.t[part] = self.t.get(part, 0.0) + time.process_time() - t0

        setattr(owner, name, timed)
        self._undo.append((owner, name, orig if own else None))

    def restore(self):
        for owner, name, orig in reversed(self._undo):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._undo.clear()


def batches_of(ds, B, n_items, seed):
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(ds)), n_items))
    return [order[s:s + B].tolist() for s in range(0, n_items, B)]


def profile(ds, B: int, n_items: int) -> dict:
    """Per-image CPU µs of the item's parts measured inside ``__getitems__`` + collate, and alone."""
    batches = batches_of(ds, B, n_items, 3)
    fkdstore.collate(ds.__getitems__(batches[0]))  # warm
    tm = Timers()
    reader = ds.reader
    tm.wrap(ds.images, "load", "decode")
    tm.wrap(ft, "_resized", "crop+resize")
    tm.wrap(ft, "_to_chw", "flip+layout+normalise")
    tm.wrap(fp, "epoch_slots", "slot choice")
    tm.wrap(reader, "read_batch", "label read")
    tm.wrap(reader, "decode", "label decode")
    total = coll = 0.0
    try:
        for items in batches:
            t0 = time.process_time()
            got = ds.__getitems__(items)
            t1 = time.process_time()
            fkdstore.collate(got)
            t2 = time.process_time()
            total += t2 - t0
            coll += t2 - t1
    finally:
        tm.restore()
    n = sum(len(b) for b in batches)
    inside = {k: v / n * 1e6 for k, v in tm.t.items()}
    inside["collate"] = coll / n * 1e6
    inside["other (per-item Python)"] = total / n * 1e6 - sum(inside.values())

    # the same parts alone, on the same images and slots
    m, e = ds.crops_per_sample, ds.epoch
    idx = [int(ds.image_indices[i]) for b in batches[:4] for i in b]
    slots = np.stack([fp.epoch_slots(i, e, m, ds.crops_per_image, ds.seed) for i in idx])
    rec = reader.read_batch(np.asarray(idx), slots)
    imgs = [ds.images.load(i) for i in idx[:16]]
    resample, hw = ft.INTERPOLATIONS[ds.interpolation], ds.output_size
    crops_args = [(imgs[j], tuple(rec.boxes[j, c].tolist()), hw, resample) for j in range(len(imgs)) for c in range(m)]
    pix = [ft._resized(*a) for a in crops_args[:16]]
    norm = ft._normalizer(ds.mean, ds.std) if ds.normalize else None
    dst = np.empty((3, *hw), np.float32 if ds.normalize else np.uint8)
    read_args = [(ds.image_indices[b], np.stack([fp.epoch_slots(int(i), e, m, ds.crops_per_image, ds.seed)
                                                  for i in ds.image_indices[b]])) for b in batches[:4]]
    alone = {
        "decode": cpu_per_call(ds.images.load, [(i,) for i in idx[:32]]) * 1e6,
        "crop+resize": cpu_per_call(ft._resized, crops_args) * m * 1e6,
        "flip+layout+normalise": cpu_per_call(ft._to_chw, [(p, k % 2 == 1, dst, norm) for k, p in enumerate(pix)])
        * m * 1e6,
        "of which flip": (cpu_per_call(ft._to_chw, [(p, True, dst, norm) for p in pix])
                          - cpu_per_call(ft._to_chw, [(p, False, dst, norm) for p in pix])) * m * 1e6,
        "slot choice": cpu_per_call(fp.epoch_slots, [(i, e, m, ds.crops_per_image, ds.seed) for i in idx]) * 1e6,
        "label read": cpu_per_call(reader.read_batch, read_args) * len(read_args) / len(idx) * 1e6,
        "label decode": cpu_per_call(reader.decode, [(rec.fields,)]) / len(idx) * 1e6,
    }
    items = ds.__getitems__(batches[0])
    alone["collate"] = cpu_per_call(fkdstore.collate, [(items,)]) / len(items) * 1e6
    alone["limit: decode + m x crop+resize"] = alone["decode"] + alone["crop+resize"]
    return {"m": m, "normalize": ds.normalize, "item_us": total / n * 1e6, "inside_us": inside, "alone_us": alone}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children (DataLoader workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def epoch_rate(loader) -> tuple[float, float]:
    """(crops per wall second, crops per CPU-second of the main process and its workers) of one epoch.

    Workers are not persistent, so they exit (and are waited for) at the end of the epoch and their CPU
    time is counted; their start-up is counted too, alike for every loader."""
    c0, t0, n = _cpu_seconds(), time.perf_counter(), 0
    for batch in loader:
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["crops"])
    return n / (time.perf_counter() - t0), n / (_cpu_seconds() - c0)


def make_loader(ds, crops_per_batch, n_crops, workers):
    per = 1 if isinstance(ds, PlainPIL) else ds.crops_per_sample
    n_items = max(1, n_crops // per)
    sampler = np.random.default_rng(1).permutation(np.resize(np.arange(len(ds)), n_items)).tolist()
    kw = dict(num_workers=workers)
    if workers:
        kw.update(multiprocessing_context="fork", prefetch_factor=2, persistent_workers=False)
    return DataLoader(ds, batch_size=max(1, crops_per_batch // per), sampler=sampler,
                      collate_fn=None if isinstance(ds, PlainPIL) else fkdstore.collate, **kw)


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="photo-like JPEGs to synthesise")
    p.add_argument("--slots", type=int, default=32, help="M stored crops per image")
    p.add_argument("--output-size", type=int, default=224)
    p.add_argument("--crops", type=int, default=2048, help="crops per timed DataLoader epoch")
    p.add_argument("--crops-per-batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="interleaved timed epochs per loader; the median is reported")
    p.add_argument("--quick", action="store_true", help="small sizes for `make bench`")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.crops = min(a.images, 96), min(a.crops, 1024)
    torch.set_num_threads(1)
    random.seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="fkd_profile_"))
    try:
        folder = make_photos(tmp / "photos", a.images)
        store = make_store(tmp / "s.fkd", folder, a.slots)
        lst = list_images(folder)
        kb = np.mean([os.path.getsize(q) for q in lst.paths]) / 1e3
        given = argv if argv is not None else sys.argv[1:]
        res = {"command": "python benchmarks/dataset_profile.py " + " ".join(given),
               "images": len(lst), "mean_jpeg_kb": round(kb, 1), "output_size": a.output_size, "slots": a.slots,
               "workers": a.workers, "runs": a.runs, "crops_per_batch": a.crops_per_batch, "cpus": os.cpu_count(),
               "load_at_start": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
               "pillow": Image.__version__, "profiles": [], "rows": []}
        size = a.output_size
        sets = {}
        for norm in (True, False):
            sets[norm] = {0: PlainPIL(lst.paths, lst.labels, size, norm)}
            for m in MS:
                sets[norm][m] = fkdstore.TorchDataset(store, folder, crops_per_sample=m, output_size=size,
                                                      normalize=norm, epoch=1)
        # 1-2. profile and limit (in-process CPU time)
        for m in (1, 4):
            ds = sets[True][m]
            res["profiles"].append(profile(ds, max(1, a.crops_per_batch // m), max(16, min(len(ds), 512 // m))))
        limit_us = {}
        for m in MS:
            prof = res["profiles"][(1, 4).index(m)] if m in (1, 4) else \
                profile(sets[True][m], max(1, a.crops_per_batch // m), 32)
            limit_us[m] = prof["alone_us"]["limit: decode + m x crop+resize"]
        # 3. DataLoader crops/s and crops per CPU-second, interleaved runs
        loaders = {(n, k): make_loader(ds, a.crops_per_batch, a.crops, a.workers) for n, d in sets.items()
                   for k, ds in d.items()}
        epoch_rate(loaders[(True, 0)])  # warm the page cache
        wall = {key: [] for key in loaders}
        cpu = {key: [] for key in loaders}
        for _ in range(a.runs):
            for key, dl in loaders.items():
                w, c = epoch_rate(dl)
                wall[key].append(w)
                cpu[key].append(c)
        res["load_at_end"] = os.getloadavg()
        for norm in (True, False):
            base, cbase = statistics.median(wall[(norm, 0)]), statistics.median(cpu[(norm, 0)])
            for k in (0, *MS):
                med, cmed = statistics.median(wall[(norm, k)]), statistics.median(cpu[(norm, k)])
                row = {"output": "float32" if norm else "uint8", "loader": "plain PIL" if k == 0 else "TorchDataset",
                       "m": max(k, 1), "crops_per_s_runs": [round(x) for x in wall[(norm, k)]],
                       "crops_per_s": round(med), "ratio": round(med / base, 3),
                       "ratio_runs": [round(x / y, 3) for x, y in zip(wall[(norm, k)], wall[(norm, 0)])],
                       "cpu_crops_per_s_runs": [round(x) for x in cpu[(norm, k)]],
                       "cpu_crops_per_s": round(cmed), "cpu_ratio": round(cmed / cbase, 3)}
                if k:
                    row["limit_crops_per_cpu_s"] = round(k / limit_us[k] * 1e6)
                    row["of_limit"] = round(cmed / row["limit_crops_per_cpu_s"], 3)
                    row["limit_ratio"] = round(row["limit_crops_per_cpu_s"] / cbase, 3)
                res["rows"].append(row)
        print(json.dumps(res, indent=1))
        print(to_markdown(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_markdown(res: dict) -> str:
    L = [f"{res['images']} photo-like JPEGs (mean {res['mean_jpeg_kb']} KB, ~430x640, q90), "
         f"{res['output_size']} px crops, M = {res['slots']}, MS top-5 C = 1000; load average "
         f"{', '.join(f'{x:.1f}' for x in res['load_at_start'])} at start, "
         f"{', '.join(f'{x:.1f}' for x in res['load_at_end'])} at end ({res['cpus']} CPUs).", ""]
    for prof in res["profiles"]:
        item = prof["item_us"]
        L += [f"Profile of one TorchDataset item, m = {prof['m']}, float32 (CPU µs per image; item = "
              f"`__getitems__` + `collate` = {item:.0f} µs):", "",
              "| part | inside the item | alone | share of item |", "|---|---:|---:|---:|"]
        for part in ("decode", "crop+resize", "flip+layout+normalise", "of which flip", "slot choice", "label read",
                     "label decode", "collate", "other (per-item Python)", "limit: decode + m x crop+resize"):
            ins, alone = prof["inside_us"].get(part), prof["alone_us"].get(part)
            share = ins if ins is not None else (alone if part.startswith("limit") else None)
            L.append(f"| {part} | {'-' if ins is None else f'{ins:.0f}'} | {'-' if alone is None else f'{alone:.0f}'} "
                     f"| {'-' if share is None else f'{100 * share / item:.1f} %'} |")
        lab = sum(prof["inside_us"].get(k, 0) for k in ("slot choice", "label read", "label decode"))
        L += ["", f"Label path (slot choice + read + decode): {100 * lab / item:.1f} % of the item.", ""]
    L += [f"Through a DataLoader ({res['workers']} fork workers, {res['crops_per_batch']} crops per batch), median "
          f"of {res['runs']} interleaved runs: crops per wall second (each run's ratio listed) and crops per "
          "CPU-second of the main process + its workers (steadier on a shared machine); limit = "
          "m / (decode + m x crop+resize) per CPU-second, measured alone:", "",
          "| output | loader | m | crops/s | vs plain | runs' ratios | crops per CPU-s | vs plain | limit per CPU-s "
          "| vs plain at limit | % of limit |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lim = (f"{r['limit_crops_per_cpu_s']} | {r['limit_ratio']:.2f}x | {100 * r['of_limit']:.0f} %"
               if "of_limit" in r else "- | - | -")
        L.append(f"| {r['output']} | {r['loader']} | {r['m']} | {r['crops_per_s']} | {r['ratio']:.2f}x | "
                 f"{', '.join(f'{x:.2f}' for x in r['ratio_runs'])} | {r['cpu_crops_per_s']} | "
                 f"{r['cpu_ratio']:.2f}x | {lim} |")
    return "\n".join(L)


if __name__ == "__main__":
    main()
