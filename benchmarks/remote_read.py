"""Reading labels from S3-compatible object storage vs local disk, at an added per-request latency.

    python benchmarks/remote_read.py                      # 20,000 images x 32 crops, MS top-5, C = 1000
    python benchmarks/remote_read.py --num-images 100000 --delay-ms 20 --json out.json

One ImageNet-shaped store (image sizes 200..500 px, teacher-like top-5 labels) is written once to a local
folder and once to a moto S3 server on 127.0.0.1 (``tests/s3util.py``: the server runs in a child
process), both through :func:`fkdstore.write`. Reads from S3 go through a latency proxy in that child
process, which holds every HTTP request for ``--delay-ms`` before forwarding it (a stand-in for a network
round trip; moto itself answers in well under a millisecond of network time) and counts requests. Both
sides are measured in the same run, cold (a fresh :func:`fkdstore.open` each time, so no shard index or
chunk is cached):

* open: requests and seconds for :func:`fkdstore.open`;
* epoch preload: ``read_all(slots)`` with ``m`` slots per image (what an epoch of ``TorchDataset`` needs);
* random batches: ``read_batch(indices, slots)`` of ``--batch`` random images, throughput and requests
  per batch;
* S3 + local cache (``open(url, cache_dir=...)``): the epoch preload twice, each after a fresh open; the
  first fills the cache folder, the second is served from it (requests and seconds);
* the TorchDataset label path (``--torch``, on by default): what ``TorchDataset.__getitems__`` does for labels
  (epoch slots, records, dense decode), per batch of ``--batch`` shuffled images and over a whole epoch, for
  the local store (read by batch, the default for local stores), the S3 store (the default for URLs: the
  epoch is preloaded by ``set_epoch`` into shared memory, :mod:`fkdstore.preload`), and, for reference, the
  S3 store read by batch (``preload=False``, ``--torch-s3-batches`` batches). Epoch 1 is measured (epoch 0
  is loaded by the constructor, reported separately). In one process: DataLoader workers would split the
  per-batch work, while the preload runs in the main process;
* images from S3 (``--images K``, off by default): K JPEGs loaded in batches of ``--image-batch`` through
  :class:`fkdstore.sources.URLSource` (each batch announced with ``prefetch``, as TorchDataset does) with the
  default read-ahead and with none, against the same files on local disk (images per second, requests).

The local side reads from the page cache (the store was just written), the fastest local disk there is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # this checkout; the S3 server lives with the tests

from s3util import S3Server  # noqa: E402

import fkdstore  # noqa: E402
from fkdstore.reader import open as open_store  # noqa: E402

TARGET_RATIO = 3.0  # epoch preload from S3 within 3x of local disk
TORCH_TARGET_RATIO = 2.0  # TorchDataset label path from S3 within 2x of local disk, per epoch and per batch


def make_labels(N: int, M: int, C: int, k: int, seed: int):
    """Image sizes, boxes, flips and MS top-``k`` fields like a teacher's (distinct indices, decreasing
    probabilities summing to < 1), generated directly (no (N, M, C) tensor)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 501, size=(N, 2))
    H, W = sizes[:, None, 0], sizes[:, None, 1]
    h = (8 + rng.random((N, M)) * (H - 8)).astype(np.int64)
    w = (8 + rng.random((N, M)) * (W - 8)).astype(np.int64)
    top = (rng.random((N, M)) * (H - h + 1)).astype(np.int64)
    left = (rng.random((N, M)) * (W - w + 1)).astype(np.int64)
    boxes = np.stack([top, left, h, w], -1)
    flips = rng.random((N, M)) < 0.5
    steps = np.concatenate([np.zeros((N, M, 1), np.int64), rng.integers(1, C // (2 * k), (N, M, k - 1))], -1)
    indices = (rng.integers(0, C, (N, M, 1)) + np.cumsum(steps, -1)) % C
    p1 = 0.3 + 0.65 * rng.random((N, M, 1))
    r = 0.05 + 0.45 * rng.random((N, M, 1))
    probs = p1 * r ** np.arange(k)
    probs = probs / np.maximum(1.0, probs.sum(-1, keepdims=True) / 0.999)
    return sizes, boxes, flips, {"indices": indices.astype(np.uint16), "probs": probs.astype(np.float16)}


def write_store(location, data, N, M, C, k, storage_options=None) -> float:
    sizes, boxes, flips, fields = data
    t = time.perf_counter()
    w = fkdstore.write(location, num_images=N, crops_per_image=M, num_classes=C, codec={"name": "ms", "k": k},
                       image_keys=[f"n{i // 1300:08d}/img_{i:08d}.JPEG" for i in range(N)], image_sizes=sizes,
                       storage_options=storage_options)
    step = 4096
    for a in range(0, N, step):
        sl = slice(a, min(N, a + step))
        w.put_fields(np.arange(sl.start, sl.stop), boxes[sl], flips[sl], {n: v[sl] for n, v in fields.items()})
    w.close()
    return time.perf_counter() - t


def measure(open_fn, stats_fn, N: int, M: int, m: int, batch: int, batches: int, seed: int, repeats: int) -> dict:
    """Cold open, epoch preload and random batches; ``stats_fn(reset)`` returns request counts (or None)."""
    rng = np.random.default_rng(seed)
    slots = np.argsort(rng.random((N, M)), axis=1)[:, :m]
    out: dict = {}
    stats_fn(True)
    t = time.perf_counter()
    r = open_fn()
    out["open_s"] = time.perf_counter() - t
    out["open_requests"] = (stats_fn(True) or {}).get("requests")
    best = None
    for _ in range(repeats):
        r = open_fn()
        stats_fn(True)
        t = time.perf_counter()
        recs = r.read_all(slots)
        dt = time.perf_counter() - t
        req = (stats_fn(True) or {}).get("requests")
        if best is None or dt < best[0]:
            best = (dt, req)
        r.close()
    out["read_all_s"], out["read_all_requests"] = best
    out["read_all_records"] = int(np.prod(recs.box.shape[:2]))
    r = open_fn()
    order = [np.sort(rng.choice(N, batch, replace=False)) for _ in range(batches)]
    stats_fn(True)
    t = time.perf_counter()
    for idx in order:
        r.read_batch(idx, slots[idx])
    dt = time.perf_counter() - t
    req = (stats_fn(True) or {}).get("requests")
    out["batch_s"] = dt / batches
    out["batch_images_per_s"] = batch * batches / dt
    out["batch_requests"] = None if req is None else req / batches
    r.close()
    return out


def measure_cache(url, so, s3, cache_dir, N: int, M: int, m: int, seed: int) -> dict:
    """Epoch preload through a local cache folder (``open(url, cache_dir=...)``): the first epoch fills it,
    the second (a fresh open, as a new training process would) is served from it. Requests and seconds of
    each; the open is counted separately."""
    rng = np.random.default_rng(seed)
    slots = np.argsort(rng.random((N, M)), axis=1)[:, :m]
    out: dict = {}
    for epoch in ("first", "second"):
        s3.proxy_stats(True)
        t = time.perf_counter()
        r = open_store(url, storage_options=so, cache_dir=cache_dir)
        out[f"{epoch}_open_s"] = time.perf_counter() - t
        out[f"{epoch}_open_requests"] = s3.proxy_stats(True)["requests"]
        t = time.perf_counter()
        r.read_all(slots)
        out[f"{epoch}_read_all_s"] = time.perf_counter() - t
        out[f"{epoch}_read_all_requests"] = s3.proxy_stats(True)["requests"]
        r.close()
    out["cache_bytes_on_disk"] = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file())
    return out


class _KeysOnly:
    """A map-style image source with the store's keys and no pixels (the label path never loads images)."""

    def __init__(self, keys):
        self._keys = list(keys)

    def keys(self):
        return self._keys

    def __getitem__(self, key):
        raise KeyError(key)


def measure_torch(location, storage_options, stats_fn, N: int, m: int, batch: int, seed: int, preload=None,
                  max_batches: int | None = None) -> dict:
    """The TorchDataset label path (``_read_labels``: slots, records, dense decode) of epoch 1: ``set_epoch`` +
    every batch of a shuffled epoch (or the first ``max_batches``); seconds and store requests of each part."""
    from fkdstore.pytorch import TorchDataset

    keys = _KeysOnly([f"n{i // 1300:08d}/img_{i:08d}.JPEG" for i in range(N)])
    out: dict = {}
    stats_fn(True)
    t = time.perf_counter()
    ds = TorchDataset(location, keys, crops_per_sample=m, storage_options=storage_options, preload=preload)
    out["build_s"] = time.perf_counter() - t
    out["build_requests"] = (stats_fn(True) or {}).get("requests")
    out["preload_bytes"] = 0 if ds._preload is None else ds._preload.nbytes
    t = time.perf_counter()
    ds.set_epoch(1)
    out["set_epoch_s"] = time.perf_counter() - t
    out["set_epoch_requests"] = (stats_fn(True) or {}).get("requests")
    order = np.random.default_rng(seed).permutation(len(ds))
    batches = [order[a:a + batch] for a in range(0, len(order), batch)]
    if max_batches is not None:
        batches = batches[:max_batches]
    times = []
    for b in batches:
        t = time.perf_counter()
        ds._read_labels(ds.image_indices[b])
        times.append(time.perf_counter() - t)
    out["batch_requests"] = (stats_fn(True) or {}).get("requests")
    out["batches"] = len(batches)
    out["batch_s"] = float(np.mean(times))
    out["batches_s"] = float(np.sum(times))
    full = -(-N // batch)
    out["epoch_s"] = out["set_epoch_s"] + out["batch_s"] * full  # = set_epoch + every batch when all were run
    return out


def measure_images(s3, url: str, so: dict, K: int, batch: int, tmp: Path) -> dict:
    """Load K photo-like JPEGs (about 30 KB) from local disk and from S3 through a URLSource, in batches
    announced with prefetch; S3 with the default read-ahead and with none."""
    from PIL import Image

    from fkdstore.sources import DEFAULT_READ_AHEAD, FileSource, URLSource

    rng = np.random.default_rng(0)
    folder = tmp / "images"
    fs = s3.filesystem()
    base = np.linspace(0, 255, 240)[None, :, None] * np.ones((180, 1, 3))
    for i in range(K):
        (folder / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        px = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"c{i % 10}" / f"im{i:05d}.jpg"
        Image.fromarray(px).save(p, quality=90)
        fs.pipe(url[len("s3://"):] + "/images/" + p.relative_to(folder).as_posix(), p.read_bytes())

    def run(src, stats):
        order = np.random.default_rng(1).permutation(len(src)).tolist()
        stats(True)
        t = time.perf_counter()
        for a in range(0, len(order), batch):
            part = order[a:a + batch]
            src.prefetch(part)
            for i in part:
                src.load(i)
        dt = time.perf_counter() - t
        return {"s": dt, "images_per_s": len(order) / dt, "requests": (stats(True) or {}).get("requests")}

    out = {"images": K, "batch": batch, "mean_bytes": float(np.mean([p.stat().st_size for p in folder.rglob("*.jpg")])),
           "local": run(FileSource(folder), lambda reset: None)}
    for name, ahead in (("s3_read_ahead", DEFAULT_READ_AHEAD), ("s3_no_read_ahead", 0)):
        src = URLSource(url + "/images/", storage_options=so, read_ahead=ahead)
        out[name] = {"read_ahead": ahead, **run(src, lambda reset: s3.proxy_stats(reset))}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=20_000)
    ap.add_argument("--crops", type=int, default=32, help="stored crops per image M")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--m", type=int, default=4, help="slots per image an epoch uses")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="added latency per S3 request")
    ap.add_argument("--repeats", type=int, default=2, help="epoch preloads per side (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the TorchDataset label path (needs torch)")
    ap.add_argument("--torch-s3-batches", type=int, default=5,
                    help="batches measured for the reference row: S3 read by batch (preload=False)")
    ap.add_argument("--skip-reader", action="store_true", help="skip the Reader measurements")
    ap.add_argument("--images", type=int, default=0, help="also load this many JPEGs from S3 through a URLSource")
    ap.add_argument("--image-batch", type=int, default=64, help="images announced (prefetch) at a time")
    a = ap.parse_args(argv)
    N, M, C, k = a.num_images, a.crops, a.classes, a.k
    data = make_labels(N, M, C, k, a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="fkd-remote-"))
    res: dict = {"num_images": N, "crops_per_image": M, "num_classes": C, "codec": f"ms k={k}", "m": a.m,
                 "batch": a.batch, "delay_ms": a.delay_ms}
    try:
        with S3Server(delay_ms=a.delay_ms, auth=False) as s3:
            url = s3.make_bucket("bench") + "/labels.fkd"
            res["write_local_s"] = write_store(tmp / "labels.fkd", data, N, M, C, k)
            res["write_s3_s"] = write_store(url, data, N, M, C, k, storage_options=s3.storage_options())
            so = s3.storage_options(proxy=True)
            with open_store(tmp / "labels.fkd") as r:
                res["store_bytes"] = sum(f.stat().st_size for f in (tmp / "labels.fkd").rglob("*") if f.is_file())
                res["layout"] = {"images_per_chunk": r.header.images_per_chunk,
                                 "images_per_shard": r.header.images_per_shard, "shards": r.header.num_shards}
            args = (N, M, a.m, a.batch, a.batches, a.seed, a.repeats)
            stats = lambda reset: s3.proxy_stats(reset)  # noqa: E731
            if not a.skip_reader:
                res["local"] = measure(lambda: open_store(tmp / "labels.fkd"), lambda reset: None, *args)
                res["s3"] = measure(lambda: open_store(url, storage_options=so), stats, *args)
                res["s3_cache"] = measure_cache(url, so, s3, tmp / "cache", N, M, a.m, a.seed)
            if a.torch:
                targs = (N, a.m, a.batch, a.seed)
                res["torch"] = {
                    "local": measure_torch(tmp / "labels.fkd", None, lambda reset: None, *targs),
                    "local_preload": measure_torch(tmp / "labels.fkd", None, lambda reset: None, *targs, preload=True),
                    "s3": measure_torch(url, so, stats, *targs),
                    "s3_by_batch": measure_torch(url, so, stats, *targs, preload=False,
                                                 max_batches=a.torch_s3_batches),
                }
            if a.images:
                res["images"] = measure_images(s3, s3.make_bucket("bench"), so, a.images, a.image_batch, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "local" in res:
        lo, s = res["local"], res["s3"]
        res["read_all_ratio"] = s["read_all_s"] / lo["read_all_s"]
        res["target_met"] = res["read_all_ratio"] <= TARGET_RATIO
        print(report(res))
    if "torch" in res:
        t = res["torch"]
        res["torch_epoch_ratio"] = t["s3"]["epoch_s"] / t["local"]["epoch_s"]
        res["torch_batch_ratio"] = t["s3"]["batch_s"] / t["local"]["batch_s"]
        res["torch_target_met"] = max(res["torch_epoch_ratio"], res["torch_batch_ratio"]) <= TORCH_TARGET_RATIO
        print(torch_report(res))
    if "images" in res:
        print(images_report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


def report(res: dict) -> str:
    lo, s = res["local"], res["s3"]
    n = res["read_all_records"] if "read_all_records" in res else s["read_all_records"]
    L = [f"store: {res['num_images']:,} images x {res['crops_per_image']} crops, {res['num_classes']} classes, "
         f"{res['codec']}, {res['store_bytes'] / 2**20:.1f} MiB, {res['layout']['shards']} shards of "
         f"{res['layout']['images_per_shard']} images (chunks of {res['layout']['images_per_chunk']}); "
         f"S3 = moto on 127.0.0.1 + {res['delay_ms']:g} ms per request; written in {res['write_local_s']:.1f} s "
         f"(local) / {res['write_s3_s']:.1f} s (S3, no added latency)",
         "",
         "| what | local disk | S3 (+latency) | S3 / local |",
         "|---|---:|---:|---:|",
         f"| open: seconds (requests) | {lo['open_s']:.3f} | {s['open_s']:.3f} ({s['open_requests']}) | "
         f"{s['open_s'] / lo['open_s']:.1f}x |",
         f"| epoch preload read_all(m={res['m']}): seconds (requests) | {lo['read_all_s']:.3f} | "
         f"{s['read_all_s']:.3f} ({s['read_all_requests']}) | **{res['read_all_ratio']:.2f}x** |",
         f"| epoch preload: records per second | {n / lo['read_all_s']:,.0f} | {n / s['read_all_s']:,.0f} | |",
         f"| random read_batch({res['batch']}): ms per batch (requests per batch) | {1e3 * lo['batch_s']:.1f} | "
         f"{1e3 * s['batch_s']:.1f} ({s['batch_requests']:.1f}) | {s['batch_s'] / lo['batch_s']:.1f}x |",
         f"| random read_batch({res['batch']}): images per second | {lo['batch_images_per_s']:,.0f} | "
         f"{s['batch_images_per_s']:,.0f} | |",
         *_cache_rows(res, lo),
         "",
         f"Epoch preload from S3 within {TARGET_RATIO:g}x of local disk: "
         f"{'met' if res['target_met'] else 'MISSED'} ({res['read_all_ratio']:.2f}x)."]
    return "\n".join(L)


def _cache_rows(res: dict, lo: dict) -> list[str]:
    c = res.get("s3_cache")
    if not c:
        return []
    return [f"| S3 + local cache, first epoch read_all(m={res['m']}): seconds (requests) | {lo['read_all_s']:.3f} | "
            f"{c['first_read_all_s']:.3f} ({c['first_read_all_requests']}) | "
            f"{c['first_read_all_s'] / lo['read_all_s']:.2f}x |",
            f"| S3 + local cache, second epoch read_all(m={res['m']}): seconds (requests) | {lo['read_all_s']:.3f} | "
            f"{c['second_read_all_s']:.3f} ({c['second_read_all_requests']}) | "
            f"**{c['second_read_all_s'] / lo['read_all_s']:.2f}x** |",
            f"| S3 + local cache, second open: seconds (requests) | {lo['open_s']:.3f} | "
            f"{c['second_open_s']:.3f} ({c['second_open_requests']}) | |"]


def torch_report(res: dict) -> str:
    t = res["torch"]
    lo = t["local"]
    N, B = res["num_images"], res["batch"]

    def req(x):
        return "" if x is None else f" ({x})"

    def row(name, d):
        return (f"| {name} | {d['build_s']:.2f}{req(d['build_requests'])} | {d['set_epoch_s']:.3f}"
                f"{req(d['set_epoch_requests'])} | {1e3 * d['batch_s']:.2f}{req(d['batch_requests'])} | "
                f"{d['epoch_s']:.2f} | {d['epoch_s'] / lo['epoch_s']:.2f}x | {d['batch_s'] / lo['batch_s']:.2f}x | "
                f"{d['preload_bytes'] / 2**20:.1f} |")

    s = t["s3_by_batch"]
    L = [f"TorchDataset label path (slots + records + dense decode, m = {res['m']}, batches of {B} shuffled images, "
         f"epoch 1 of {N:,} images = {-(-N // B)} batches; S3 = moto on 127.0.0.1 + {res['delay_ms']:g} ms per "
         f"request; one process):",
         "",
         "| store, label path | build: s (requests) | set_epoch: s (requests) | per batch: ms (requests in all "
         "batches) | per epoch: s | epoch vs local | batch vs local | preload MiB |",
         "|---|---:|---:|---:|---:|---:|---:|---:|",
         row("local disk, by batch (default)", lo),
         row("local disk, preload=True", t["local_preload"]),
         row("**S3, epoch preload (default for URLs)**", t["s3"]),
         f"| S3, by batch (preload=False; {s['batches']} batches) | {s['build_s']:.2f}{req(s['build_requests'])} | "
         f"{s['set_epoch_s']:.3f} | {1e3 * s['batch_s']:.0f}{req(s['batch_requests'])} | {s['epoch_s']:.0f} "
         f"(extrapolated) | {s['epoch_s'] / lo['epoch_s']:.0f}x | {s['batch_s'] / lo['batch_s']:.0f}x | 0 |",
         "",
         f"S3 label path within {TORCH_TARGET_RATIO:g}x of local disk per epoch and per batch: "
         f"{'met' if res['torch_target_met'] else 'MISSED'} (epoch {res['torch_epoch_ratio']:.2f}x, "
         f"batch {res['torch_batch_ratio']:.2f}x)."]
    return "\n".join(L)


def images_report(res: dict) -> str:
    d = res["images"]
    lo = d["local"]
    L = [f"Images through fkdstore.sources ({d['images']} JPEGs of {d['mean_bytes'] / 1024:.0f} KB on average, "
         f"decoded; batches of {d['batch']} announced with prefetch; S3 = moto + {res['delay_ms']:g} ms per request):",
         "",
         "| source | seconds | images per second | requests | vs local |",
         "|---|---:|---:|---:|---:|",
         f"| local folder (FileSource) | {lo['s']:.2f} | {lo['images_per_s']:,.0f} | | 1.00x |"]
    for name in ("s3_read_ahead", "s3_no_read_ahead"):
        x = d[name]
        L.append(f"| S3 URLSource, read_ahead={x['read_ahead']} | {x['s']:.2f} | {x['images_per_s']:,.0f} | "
                 f"{x['requests']} | {x['s'] / lo['s']:.2f}x |")
    return "\n".join(L)


if __name__ == "__main__":
    main()
