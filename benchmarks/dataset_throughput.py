"""The loader table: TorchDataset (m = 1, 2, 4, 8 crops per loaded image) against a plain PIL loader.

Data and loaders as ``dataset_profile.py``: photo-sized JPEGs (~430x640, q90), a store of M SlotCropSampler boxes
and MS top-5 labels (C = 1000), 224 px bilinear crops, 2 persistent fork workers (as training runs them: their
start-up, a one-off, is left out by a warm-up epoch), 128 crops per batch. Two outputs, each with TorchDataset's
shared-memory batch pool (``batch_pool=4``, the default) and without it (``batch_pool=0``: torch copies each batch
into fresh shared memory), each against the plain loader with the same output:

* **uint8 + normaliser** (the fast path): ``TorchDataset(normalize=False)`` and the plain loader's
  PILToTensor, both through :class:`fkdstore.DeviceLoader`, which moves the batch to the device (CUDA when
  present, else the CPU of the main process) and normalises it there;
* **float32**: normalised in the workers (``TorchDataset(normalize=True)``, plain ToTensor + Normalize).

Per loader and epoch: crops per wall second; crops per CPU-second of the workers (user + system time of the
main process's child processes, from ``/proc/<pid>/stat``: the loading work) and of the workers + the main
process (receiving batches, the normaliser when it runs on the CPU). The **limit** is a loader that does only
the work no m-crop loader can skip: its workers decode each image and crop+resize its m stored boxes (the
format's crop function) and send nothing back, run like the others (same workers, batches and interleaved epochs,
so under the same load); "% of limit" is the workers' crops per CPU-second against the limit loader's. (The same
two parts timed alone in this process are listed too.) Each of ``--runs`` runs times one epoch of every loader in
the order of :func:`schedule`: per output dtype the plain loader opens and closes the group, and for each m the limit
loader and the rows with and without the pool follow each other. Rates are medians over the runs; ratios are the
medians of each run's own ratio (a row against the mean of the two plain epochs of its run and group, and against
the limit epoch beside it), so a drift of the shared machine during a run cancels.

Also (``--label-store-images N``): the two label paths on a larger synthetic store (ImageNet-like M = 200,
C = 1000, MS top-5): the per-batch ``read_batch`` TorchDataset uses, against a per-epoch ``read_all(slots)``.

    python benchmarks/dataset_throughput.py [--images 256 --crops 2048 --runs 3 --workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
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
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dataset_profile import PlainPIL, make_photos, make_store

import fkdstore
import fkdstore.transforms as ft
from fkdstore.images import list_images
from fkdstore.pytorch import epoch_slots

MS = (1, 2, 4, 8)
OUTPUTS = ("uint8", "uint8 no pool", "float32", "float32 no pool")
PLAIN = {o: o.split()[0] for o in OUTPUTS}  # the plain loader each is measured against (same output dtype)
POOL = {o: 0 if o.endswith("no pool") else 4 for o in OUTPUTS}  # TorchDataset's batch_pool (4 is its default)
LABEL = {"uint8": "uint8 + normaliser", "uint8 no pool": "uint8 + normaliser, no pool", "float32": "float32",
         "float32 no pool": "float32, no pool"}
TARGETS = {"m1_ratio": 1.0, "m4_ratio": 1.9, "of_limit": 0.85}  # issue 25, for the uint8 + normaliser rows


# --------------------------------------------------------------------------------------------- timing


_TICK = os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """User + system CPU seconds of the live child processes of this process (the DataLoader workers), from
    ``/proc/<pid>/stat`` (Linux)."""
    me, total = os.getpid(), 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return total


def _cpu() -> tuple[float, float]:
    """(CPU seconds of this process, of its live children), user + system."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    return a.ru_utime + a.ru_stime, _children_cpu()


def epoch(loader) -> dict:
    """One epoch: crops per wall second, per worker CPU-second and per CPU-second of workers + main process
    (persistent workers: their CPU time is read while they live)."""
    (s0, c0), t0, n = _cpu(), time.perf_counter(), 0
    for batch in loader:
        x = batch["crops"] if isinstance(batch, dict) else batch[0]
        n += len(x)
    wall = time.perf_counter() - t0
    (s1, c1) = _cpu()
    return {"wall": n / wall, "workers": n / max(c1 - c0, 1e-9), "all": n / max(c1 - c0 + s1 - s0, 1e-9),
            "main_us": (s1 - s0) / n * 1e6}


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


def limit_us(ds, n_images: int = 24) -> dict:
    """CPU µs per image of the work no loader can skip, measured alone: decode, and one crop+resize of a stored
    box (the crop function of the format), on the dataset's images and the slots of its epoch."""
    idx = [int(i) for i in ds.image_indices[:n_images]]
    source = ds.images
    slots = np.stack([epoch_slots(i, ds.epoch, ds.crops_per_sample, ds.crops_per_image, ds.seed) for i in idx])
    rec = ds.reader.read_batch(np.asarray(idx), slots)
    images = [source.load(i) for i in idx]
    resample = ft.INTERPOLATIONS[ds.interpolation]
    crops = [(images[k], tuple(rec.boxes[k, c].tolist()), ds.output_size, resample)
             for k in range(len(idx)) for c in range(slots.shape[1])]
    decode = cpu_per_call(source.load, [(i,) for i in idx]) * 1e6
    crop = cpu_per_call(ft._resized, crops) * 1e6
    return {"decode": decode, "crop_resize": crop}


class LimitDataset(torch.utils.data.Dataset):
    """The decode + crop limit of a TorchDataset: item ``i`` decodes image ``i`` and crops+resizes the boxes of
    its slots in the dataset's epoch (the format's crop function, no layout pass), returning only a count."""

    def __init__(self, ds: fkdstore.TorchDataset):
        self.crops_per_sample, self.images, self.size = ds.crops_per_sample, ds.images, ds.output_size
        self.resample = ft.INTERPOLATIONS[ds.interpolation]
        idx = self.idx = ds.image_indices
        slots = np.stack([epoch_slots(int(i), ds.epoch, ds.crops_per_sample, ds.crops_per_image, ds.seed) for i in idx])
        self.boxes = ds.reader.read_batch(idx, slots).boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images.load(int(self.idx[i]))
        for box in self.boxes[i].tolist():
            ft._resized(image, tuple(box), self.size, self.resample)
        return torch.tensor(self.crops_per_sample)


def _count_crops(items) -> dict:
    return {"crops": torch.empty(int(sum(items)), 0)}  # len() = the crops made, no pixels sent


def make_loader(ds, crops_per_batch: int, n_crops: int, workers: int):
    per = ds.crops_per_sample if isinstance(ds, (fkdstore.TorchDataset, LimitDataset)) else 1
    n_items = max(1, n_crops // per)
    order = np.random.default_rng(1).permutation(np.resize(np.arange(len(ds)), n_items)).tolist()
    kw = dict(num_workers=workers)
    if workers:
        kw.update(multiprocessing_context="fork", prefetch_factor=2, persistent_workers=True)
    collate = fkdstore.collate if isinstance(ds, fkdstore.TorchDataset) else \
        _count_crops if isinstance(ds, LimitDataset) else None
    return DataLoader(ds, batch_size=max(1, crops_per_batch // per), sampler=order, collate_fn=collate, **kw)


def schedule() -> list[tuple[str, int]]:
    """The loaders' order within one run: per output dtype, the plain loader opens and closes the group (each row is
    compared with the mean of the two, so a slow drift of the machine cancels); inside, for each m, the limit
    loader (uint8 group) and then the rows with and without the batch pool, side by side."""
    out: list[tuple[str, int]] = []
    for dtype in dict.fromkeys(PLAIN.values()):
        out.append((dtype, 0))
        for m in MS:
            if dtype == "uint8":
                out.append(("limit", m))
            out += [(o, m) for o in OUTPUTS if PLAIN[o] == dtype]
        out.append((dtype, 0))
    return out


# --------------------------------------------------------------------------------------------- label paths


def _distinct_top_k(rng, lead: tuple[int, ...], C: int, k: int) -> np.ndarray:
    """Random top-k class indices, distinct per crop (the writer refuses repeated indices): a random start
    plus strictly increasing offsets below C, modulo C."""
    offsets = np.concatenate([np.zeros((*lead, 1), np.int64),
                              np.cumsum(rng.integers(1, max(2, C // k), (*lead, k - 1)), -1)], -1)
    return ((rng.integers(0, C, (*lead, 1)) + offsets) % C).astype(np.uint16)


def label_paths(tmp: Path, N: int, M: int = 200, C: int = 1000, k: int = 5, m: int = 4, B: int = 256) -> dict:
    """Per-image cost of the per-batch read_batch path vs a per-epoch read_all(slots) preload."""
    path = tmp / "big.zarr"
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
                         {"indices": _distinct_top_k(rng, (b, M), C, k), "probs": np.ascontiguousarray(probs)})
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
    p.add_argument("--device", default=None, help="DeviceLoader's device (default: cuda when present, else cpu)")
    p.add_argument("--label-store-images", type=int, default=0, help="N of the label-path store (0: skip)")
    p.add_argument("--quick", action="store_true", help="96 images, 1024 crops per epoch (make bench)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.crops = min(a.images, 96), min(a.crops, 1024)
    torch.set_num_threads(1)
    random.seed(0)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = Path(tempfile.mkdtemp(prefix="fkd_loader_"))
    try:
        folder = make_photos(tmp / "photos", a.images)
        store = make_store(tmp / "s.zarr", folder, a.slots)
        lst = list_images(folder)
        args_text = " ".join(argv if argv is not None else sys.argv[1:])
        res = {"command": f"python benchmarks/dataset_throughput.py {args_text}".strip(),
               "images": len(lst), "mean_jpeg_kb": round(np.mean([os.path.getsize(q) for q in lst.paths]) / 1e3, 1),
               "output_size": a.output_size, "slots": a.slots, "workers": a.workers, "runs": a.runs,
               "crops_per_epoch": a.crops, "crops_per_batch": a.crops_per_batch, "device": str(device),
               "cpus": os.cpu_count(), "load_at_start": os.getloadavg(), "torch": torch.__version__,
               "python": platform.python_version(), "pillow": Image.__version__, "targets": TARGETS, "rows": []}
        loaders, datasets = {}, {}
        for out in OUTPUTS:
            norm = PLAIN[out] == "float32"
            if PLAIN[out] == out:
                datasets[(out, 0)] = PlainPIL(lst.paths, lst.labels, a.output_size, norm)
            for m in MS:
                datasets[(out, m)] = fkdstore.TorchDataset(store, folder, crops_per_sample=m, output_size=a.output_size,
                                                           normalize=norm, epoch=1, batch_pool=POOL[out])
            for k, ds in ((k, d) for (o, k), d in datasets.items() if o == out):
                dl = make_loader(ds, a.crops_per_batch, a.crops, a.workers)
                loaders[(out, k)] = dl if norm else fkdstore.DeviceLoader(dl, device)
        for m in MS:
            loaders[("limit", m)] = make_loader(LimitDataset(datasets[("uint8", m)]), a.crops_per_batch, a.crops,
                                                a.workers)
        for dl in loaders.values():  # start the persistent workers, warm the page cache
            epoch(dl)
        runs = {key: [] for key in loaders}
        plain_pairs = {PLAIN[o]: [] for o in OUTPUTS}  # per run: the plain epochs before and after its group
        lim = {m: [] for m in MS}
        for _ in range(a.runs):
            for key in schedule():
                if key[1] == 0 and key[0] in plain_pairs:  # the plain loader opens and closes its group
                    ep = epoch(loaders[key])
                    if not plain_pairs[key[0]] or len(plain_pairs[key[0]][-1]) == 2:
                        plain_pairs[key[0]].append([ep])
                    else:
                        plain_pairs[key[0]][-1].append(ep)
                        runs[key].append({f: (plain_pairs[key[0]][-1][0][f] + ep[f]) / 2 for f in ep})
                else:
                    runs[key].append(epoch(loaders[key]))
            for m in MS:
                lim[m].append(limit_us(datasets[("float32", m)]))
        res["load_at_end"] = os.getloadavg()
        res["limit_us"] = {str(m): {part: statistics.median(x[part] for x in lim[m])
                                    for part in ("decode", "crop_resize")} for m in MS}  # str keys: as in the JSON
        for out in OUTPUTS:
            plain = (PLAIN[out], 0)
            def paired(key, f, against=plain):  # per run: the row against its own run's reference epoch
                return [round(x[f] / y[f], 3) for x, y in zip(runs[key], runs[against])]

            for k in (0, *MS) if PLAIN[out] == out else MS:
                med = {f: statistics.median(r[f] for r in runs[(out, k)])
                       for f in ("wall", "workers", "all", "main_us")}
                row = {"output": LABEL[out],
                       "loader": "plain PIL" if k == 0 else "TorchDataset", "m": max(k, 1),
                       "crops_per_s": round(med["wall"]), "ratio": statistics.median(paired((out, k), "wall")),
                       "ratio_runs": paired((out, k), "wall"),
                       "worker_crops_per_cpu_s": round(med["workers"]),
                       "worker_ratio": statistics.median(paired((out, k), "workers")),
                       "worker_ratio_runs": paired((out, k), "workers"),
                       "crops_per_cpu_s": round(med["all"]), "cpu_ratio": statistics.median(paired((out, k), "all")),
                       "cpu_ratio_runs": paired((out, k), "all"),
                       "main_us_per_crop": round(med["main_us"], 1)}
                if k:
                    lu = res["limit_us"][str(k)]
                    row["limit_crops_per_cpu_s"] = round(statistics.median(r["workers"] for r in runs[("limit", k)]))
                    row["limit_alone_crops_per_cpu_s"] = round(k / (lu["decode"] + k * lu["crop_resize"]) * 1e6)
                    row["of_limit_runs"] = paired((out, k), "workers", ("limit", k))
                    row["of_limit"] = statistics.median(row["of_limit_runs"])
                res["rows"].append(row)
        res["verdict"] = verdict(res)
        if a.label_store_images:
            res["label_paths"] = label_paths(tmp, a.label_store_images)
        print(json.dumps(res, indent=1))
        print(to_markdown(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verdict(res: dict) -> dict:
    """The issue's targets on the loading work (crops per CPU-second of the workers; the normaliser runs on the
    device in the fast path), for the uint8 + normaliser rows with the batch pool and without it: ratios at
    m = 1 and 4 against the plain loader, and every m at >= 85 % of the limit loader. And every TorchDataset
    row, either output, with or without the pool, at least as fast as the plain loader."""
    t, out = res["targets"], {}
    for key, label in (("pool", LABEL["uint8"]), ("no_pool", LABEL["uint8 no pool"])):
        rows = {r["m"]: r for r in res["rows"] if r["output"] == label and r["loader"] == "TorchDataset"}
        out[key] = {"m1_ratio": rows[1]["worker_ratio"], "m1_met": rows[1]["worker_ratio"] >= t["m1_ratio"],
                    "m4_ratio": rows[4]["worker_ratio"], "m4_met": rows[4]["worker_ratio"] >= t["m4_ratio"],
                    "min_of_limit": min(r["of_limit"] for r in rows.values()),
                    "of_limit_met": all(r["of_limit"] >= t["of_limit"] for r in rows.values())}
    ours = [r for r in res["rows"] if r["loader"] == "TorchDataset"]
    out["never_slower"] = all(r["worker_ratio"] >= 1.0 for r in ours)
    out["slowest"] = min(ours, key=lambda r: r["worker_ratio"])["worker_ratio"]
    return out


def verdict_text(v: dict, t: dict) -> str:
    """The verdict as one line (the script's table and RESULTS.md's verdict list)."""
    def one(w: dict) -> str:
        return (f"m = 1 >= {t['m1_ratio']}x: {'met' if w['m1_met'] else '**missed**'} ({w['m1_ratio']:.2f}x); "
                f"m = 4 >= {t['m4_ratio']}x: {'met' if w['m4_met'] else '**missed**'} ({w['m4_ratio']:.2f}x); "
                f">= {100 * t['of_limit']:.0f} % of the limit at every m: "
                f"{'met' if w['of_limit_met'] else '**missed**'} (lowest {100 * w['min_of_limit']:.0f} %)")
    return (f"uint8 + normaliser with the batch pool: {one(v['pool'])}; without it: {one(v['no_pool'])}; every "
            f"TorchDataset row (uint8 and float32, with and without the pool) at least as fast as the plain loader: "
            f"{'yes' if v['never_slower'] else '**no**'} (slowest {v['slowest']:.2f}x)")


def to_markdown(res: dict) -> str:
    L = [f"{res['images']} photo-like JPEGs (mean {res['mean_jpeg_kb']} KB, ~430x640, q90), {res['output_size']} px "
         f"crops, M = {res['slots']}, MS top-5 C = 1000; {res['workers']} fork workers, {res['crops_per_batch']} crops "
         f"per batch, {res['crops_per_epoch']} crops per epoch, {res['runs']} runs (rates: medians; ratios: medians "
         f"of each run's paired ratio); normaliser "
         f"on {res['device']}; load average {', '.join(f'{x:.1f}' for x in res['load_at_start'])} at start, "
         f"{', '.join(f'{x:.1f}' for x in res['load_at_end'])} at end ({res['cpus']} CPUs).", "",
         "Limit = a loader whose workers only decode and crop+resize the stored boxes (same workers, batches and "
         "epochs); the same parts timed alone in this process: decode "
         f"{res['limit_us']['1']['decode']:.0f} µs per image, crop+resize {res['limit_us']['1']['crop_resize']:.0f} µs "
         "per crop.", "",
         "| output | loader | m | crops/s | vs plain | crops per worker CPU-s | vs plain | main µs per crop "
         "| crops per CPU-s (all) | vs plain | runs (workers, vs plain) | limit per CPU-s | % of limit |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in res["rows"]:
        lim = (f"{r['limit_crops_per_cpu_s']} | {100 * r['of_limit']:.0f} % "
               f"({', '.join(f'{100 * x:.0f}' for x in r['of_limit_runs'])})") if "of_limit" in r else "- | -"
        L.append(f"| {r['output']} | {r['loader']} | {r['m']} | {r['crops_per_s']} | {r['ratio']:.2f}x "
                 f"| {r['worker_crops_per_cpu_s']} | {r['worker_ratio']:.2f}x | {r['main_us_per_crop']:.0f} "
                 f"| {r['crops_per_cpu_s']} | {r['cpu_ratio']:.2f}x "
                 f"| {', '.join(f'{x:.2f}' for x in r['worker_ratio_runs'])} | {lim} |")
    L += ["", f"Targets (crops per worker CPU-second): {verdict_text(res['verdict'], res['targets'])}."]
    if "label_paths" in res:
        lp = res["label_paths"]
        L += ["", f"Label paths (N = {lp['N']}, M = {lp['M']}, C = {lp['C']}, {lp['codec']}, m = {lp['m']}): per batch "
              f"{lp['read_batch_us_per_image']} µs per image, per-epoch preload {lp['preload_us_per_image']} µs."]
    return "\n".join(L)


if __name__ == "__main__":
    main()
