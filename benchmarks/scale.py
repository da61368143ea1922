"""Scale benchmark: how the cost of writing, verifying, inspecting and reading a store grows with N, up to
ImageNet-1K (1,281,167 images x 200 slots, C = 1000, MS top-5 float16).

    python benchmarks/scale.py                         # N = 10,000 and 100,000 (what `make bench` runs)
    python benchmarks/scale.py --full                  # adds N = 1,281,167 (~5 GB on disk, tens of minutes)
    python benchmarks/scale.py --sizes 2000 --keep --out /tmp/scale
    python benchmarks/scale.py --seeded-crops          # no box/flip arrays, derived on read

The stores hold synthetic but valid, ImageNet-shaped content, made vectorised from a seed (no teacher):
image sizes drawn like ImageNet's (mostly 500x375 / 375x500, a log-normal tail from ~100 px up to a few
thousand px), keys ``n01440764/n01440764_10026.JPEG`` (1000 synthetic wnids, images in class order, as an
ImageFolder listing), RandomResizedCrop-style boxes inside each image, random flips, and MS top-5 labels:
per image a true class and 7 confusable classes, per slot 5 distinct of those 8 (the true class first
70 % of the time), probabilities descending (geometric with a random ratio) summing to a random kept mass
in [0.6, 0.99).

Every operation runs in a fresh subprocess, so the peak resident memory (``ru_maxrss`` of that child,
from ``os.wait4``) is per operation; a bare ``import fkdstore, zarr, numpy`` process is measured too
(``baseline``). Operations, per N:

write        ``fkdstore.write`` + ``Writer.put_fields`` in batches of 1024 images, in image order, + close
             (time excludes synthesising the labels, which is reported separately)
verify       ``python -m fkdstore verify STORE`` (must exit 0)
inspect      ``python -m fkdstore inspect STORE --json``
read_all     ``Reader.read_all(slots)`` of one epoch, m = 4 random slots per image
read_batch   ``Reader.read_batch(idx, slots)`` of 256 random images x m = 4 slots, read only; images/s over
             the batches after the first (the first one loads shard indexes; reported apart)
label path   what ``TorchDataset`` does per batch without images: epoch slots of 256 random images,
             one ``read_batch``, decode to dense [256*4, C] float32 (``TorchDataset._read_labels`` of a real
             dataset whose folder listing is the store's keys; its construction time is reported as well)

``--seeded-crops`` writes seeded-crop stores (``write(crop_sampler=SlotCropSampler(seed))``, the default of
``generate``):
the writer derives every slot's box and flip from the sampler (the synthetic ones are not used) and stores
none; every read derives the slots it returns (``read_all`` and ``verify`` derive every slot, to check the
manifest), so the table shows what that costs next to the bytes it saves.

``--json PATH`` writes every number; ``--record PATH`` (default ``benchmarks/scale_full.json`` with
``--full``) keeps the results so ``run_all.py`` can show the ImageNet row next to the fresh small ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGENET_N = 1_281_167
DEFAULT_SIZES = (10_000, 100_000)
BATCH = 256
WRITE_BATCH = 1024
RESULT_TAG = "@@scale-result "

# 5-permutations of 8 candidate classes, lexicographic: the first 840 start with candidate 0 (the true class).
_PERMS = np.array(list(itertools.permutations(range(8), 5)), dtype=np.int64)
_TRUE_FIRST = 7 * 6 * 5 * 4


# ------------------------------------------------------------------------------------------- synthetic data
def image_sizes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) int32 (height, width) distributed like ImageNet-1K train: ~55 % 375x500, ~15 % 500x375,
    ~5 % 500x333 / 333x500, the rest a log-normal long side (median 500, clipped to [80, 4000]) with an
    aspect ratio in [1/2, 2]."""
    rng = np.random.default_rng([seed, 1])
    u = rng.random(n)
    long_side = np.clip(np.exp(rng.normal(np.log(500), 0.45, n)), 80, 4000)
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    h = np.where(ratio >= 1, long_side, long_side * ratio)
    w = np.where(ratio >= 1, long_side / ratio, long_side)
    sizes = np.stack([h, w], 1).round().clip(16, None).astype(np.int32)
    sizes[u < 0.55] = (375, 500)
    sizes[(u >= 0.55) & (u < 0.70)] = (500, 375)
    sizes[(u >= 0.70) & (u < 0.725)] = (500, 333)
    sizes[(u >= 0.725) & (u < 0.75)] = (333, 500)
    return sizes


def image_keys(n: int, num_classes: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """ImageFolder-style keys ``nXXXXXXXX/nXXXXXXXX_<id>.JPEG`` in class order, and the (n,) class labels."""
    rng = np.random.default_rng([seed, 2])
    wnids = np.sort(rng.choice(np.arange(1_000_000, 15_000_000), num_classes, replace=False))
    labels = (np.arange(n, dtype=np.int64) * num_classes) // n
    first = np.searchsorted(labels, labels, side="left")
    ids = 1 + 3 * (np.arange(n) - first) + rng.integers(0, 3, n)  # unique within a class, like ImageNet's
    keys = [f"n{w:08d}/n{w:08d}_{i}.JPEG" for w, i in zip(wnids[labels].tolist(), ids.tolist())]
    keys.sort()  # a folder listing's order; the class prefix keeps the labels in order
    return keys, labels.astype(np.int32)


def _offsets_table(num_classes: int, seed: int, rows: int = 4096) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    return np.stack([rng.choice(np.arange(1, num_classes), 7, replace=False) for _ in range(rows)])


def synth_batch(start: int, sizes: np.ndarray, labels: np.ndarray, M: int, C: int, k: int, offsets: np.ndarray,
                seed: int = 0):
    """Boxes (B, M, 4) int32, flips (B, M) bool and MS fields of images ``start .. start+B``, vectorised and
    deterministic from ``(seed, start)``."""
    if k > 5:
        raise ValueError(f"synthetic labels draw 5 of 8 candidate classes per slot; k must be <= 5. Got {k}.")
    B = len(sizes)
    rng = np.random.default_rng([seed, 4, start])
    H = sizes[:, 0:1].astype(np.float32)
    W = sizes[:, 1:2].astype(np.float32)
    area = H * W * rng.uniform(0.08, 1.0, (B, M)).astype(np.float32)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (B, M))).astype(np.float32)
    bw = np.clip(np.rint(np.sqrt(area * ratio)), 1, W).astype(np.int32)
    bh = np.clip(np.rint(np.sqrt(area / ratio)), 1, H).astype(np.int32)
    top = (rng.random((B, M), dtype=np.float32) * (H.astype(np.int32) - bh + 1)).astype(np.int32)
    left = (rng.random((B, M), dtype=np.float32) * (W.astype(np.int32) - bw + 1)).astype(np.int32)
    top = np.minimum(top, H.astype(np.int32) - bh)  # float rounding at the upper edge
    left = np.minimum(left, W.astype(np.int32) - bw)
    boxes = np.stack([top, left, bh, bw], -1)
    flips = rng.random((B, M), dtype=np.float32) < 0.5
    cand = np.empty((B, 8), np.int64)
    cand[:, 0] = labels
    cand[:, 1:] = (labels[:, None] + offsets[rng.integers(0, len(offsets), B)]) % C
    r = np.where(rng.random((B, M)) < 0.7, rng.integers(0, _TRUE_FIRST, (B, M)), rng.integers(0, len(_PERMS), (B, M)))
    pick = _PERMS[r][..., :k]  # (B, M, k) distinct candidates
    indices = np.take_along_axis(cand, pick.reshape(B, M * k), 1).reshape(B, M, k).astype(np.uint16)
    kept = rng.uniform(0.6, 0.99, (B, M, 1)).astype(np.float32)
    q = rng.uniform(0.05, 0.7, (B, M, 1)).astype(np.float32)
    w = q ** np.arange(k, dtype=np.float32)
    probs = (kept * w / w.sum(-1, keepdims=True)).astype(np.float16)  # descending; rounding keeps the order
    return boxes, flips, {"indices": indices, "probs": probs}


# ------------------------------------------------------------------------------------------- operations (children)
def _peak_mib_self() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def op_write(a) -> dict:
    import fkdstore
    from fkdstore.codecs import get_codec

    N, M, C = a.n, a.crops, a.classes
    t0 = time.perf_counter()
    sizes = image_sizes(N, a.seed)
    keys, labels = image_keys(N, C, a.seed)
    offsets = _offsets_table(C, a.seed)
    t_setup = time.perf_counter() - t0
    t_synth = 0.0  # label synthesis inside the timed loop, subtracted from the write time
    sampler = None
    if a.seeded_crops:
        from fkdstore.seeded import SlotCropSampler

        sampler = SlotCropSampler(seed=a.seed)
    t_start = time.perf_counter()
    with fkdstore.write(a.store, num_images=N, crops_per_image=M, num_classes=C, codec=get_codec("ms", k=a.k),
                        image_keys=keys, image_sizes=sizes, labels=labels, crop_sampler=sampler,
                        meta={"benchmark": "benchmarks/scale.py", "seed": a.seed}) as w:
        t_create = time.perf_counter() - t_start
        for s in range(0, N, WRITE_BATCH):
            e = min(N, s + WRITE_BATCH)
            t = time.perf_counter()
            boxes, flips, fields = synth_batch(s, sizes[s:e], labels[s:e], M, C, a.k, offsets, a.seed)
            t_synth += time.perf_counter() - t
            if sampler is not None:  # seeded crops: the writer derives them (its cost is part of the write)
                boxes = flips = None
            w.put_fields(np.arange(s, e), boxes, flips, fields)
    total = time.perf_counter() - t_start
    r = fkdstore.open(a.store)
    return {"seconds": total - t_synth, "create_seconds": t_create, "synth_seconds": t_synth + t_setup,
            "complete": bool(r.complete),
            "images_per_chunk": r.header.images_per_chunk, "images_per_shard": r.header.images_per_shard,
            "format_version": r.header.format_version}


def op_read_all(a) -> dict:
    import fkdstore

    r = fkdstore.open(a.store)
    slots = np.random.default_rng([a.seed, 5]).integers(0, r.crops_per_image, (r.num_images, a.m))
    t = time.perf_counter()
    rec = r.read_all(slots)
    sec = time.perf_counter() - t
    nbytes = rec.boxes.nbytes + rec.flips.nbytes + sum(v.nbytes for v in rec.fields.values())
    assert rec.boxes.shape[:2] == (r.num_images, a.m)
    return {"seconds": sec, "result_mib": nbytes / 2**20, "slots_mib": slots.nbytes / 2**20}


def _random_batches(N: int, n_batches: int, seed: int):
    rng = np.random.default_rng([seed, 6])
    return [rng.choice(N, min(BATCH, N), replace=False) for _ in range(n_batches)]


def op_read_batch(a) -> dict:
    import fkdstore

    r = fkdstore.open(a.store)
    batches = _random_batches(r.num_images, a.batches + 1, a.seed)
    slots = np.random.default_rng([a.seed, 7]).integers(0, r.crops_per_image, (len(batches), BATCH, a.m))
    t = time.perf_counter()
    r.read_batch(batches[0], slots[0, :len(batches[0])])
    first = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for b, idx in enumerate(batches[1:], 1):
        r.read_batch(idx, slots[b, :len(idx)])
        n += len(idx)
    sec = time.perf_counter() - t
    return {"first_batch_ms": first * 1e3, "images": n, "seconds": sec, "images_per_s": n / sec}


def op_label_path(a) -> dict:
    import fkdstore
    from fkdstore import pytorch

    r = fkdstore.open(a.store)
    # A real TorchDataset, built without image files: its image source maps the store's own keys to paths under a
    # root that is never read (the label path does not open images). The constructor's cost is reported too.
    root = "/nonexistent-scale-bench-images"
    images = {k: f"{root}/{k}" for k in r.image_keys}  # a map-style source (fkdstore.sources.MapSource)
    t = time.perf_counter()
    ds = pytorch.TorchDataset(r, images, crops_per_sample=a.m, seed=a.seed, soft_labels="dense")
    construct = time.perf_counter() - t
    del images
    batches = _random_batches(r.num_images, a.batches + 1, a.seed + 1)
    ds._read_labels(batches[0])  # shard indexes, torch warm-up
    times = []
    for idx in batches[1:]:
        t = time.perf_counter()
        _, _, soft = ds._read_labels(idx)  # what __getitems__ does for a batch, before the images
        times.append(time.perf_counter() - t)
    assert tuple(soft[0].shape) == (a.m, r.num_classes)
    return {"ms_per_batch": 1e3 * float(np.median(times)), "ms_per_batch_mean": 1e3 * float(np.mean(times)),
            "batches": len(times), "construct_seconds": construct}


def op_baseline(a) -> dict:
    import zarr  # noqa: F401

    import fkdstore  # noqa: F401

    return {}


def op_keys(a) -> dict:
    """``Reader.image_keys`` (what TorchDataset's constructor reads): the one whole-array load of the reader."""
    import fkdstore

    r = fkdstore.open(a.store)
    t = time.perf_counter()
    keys = r.image_keys
    return {"seconds": time.perf_counter() - t, "keys": len(keys)}


OPS = {"write": op_write, "read_all": op_read_all, "read_batch": op_read_batch, "label_path": op_label_path,
       "baseline": op_baseline, "keys": op_keys}


def child_main(a) -> int:
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        res = prof.runcall(OPS[a.op], a)
        out = Path(a.profile) / f"{a.op}-{a.n}.txt"
        with open(out, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(40)
    else:
        res = OPS[a.op](a)
    res["self_peak_mib"] = _peak_mib_self()
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------- parent
def run_child(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` with stdout/stderr to ``log``; wall seconds, exit code, the child's own peak RSS (MiB,
    from ``os.wait4``, so per operation) and the JSON result line if it printed one."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    res = {"wall_seconds": wall, "rc": p.returncode, "peak_mib": ru.ru_maxrss / 1024}
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            res.update(json.loads(line[len(RESULT_TAG):]))
    if p.returncode != 0:
        res["error"] = text[-3000:]
    return res


def storage(path: Path) -> dict:
    total, files = 0, 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(dirpath, n))
            files += 1
    return {"bytes": total, "files": files}


def measure(N: int, a, work: Path) -> dict:
    store = work / f"n{N}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--store", str(store), "--n", str(N), "--crops", str(a.crops), "--classes", str(a.classes),
              "--k", str(a.k), "--m", str(a.m), "--seed", str(a.seed), "--batches", str(a.batches)] \
        + (["--seeded-crops"] if a.seeded_crops else [])
    if a.profile:
        common += ["--profile", a.profile]
    row: dict = {"N": N, "M": a.crops, "C": a.classes}

    def op(name, cmd):
        print(f"[scale] N={N:,} {name} ...", flush=True)
        res = run_child(cmd, work / f"n{N}-{name}.log")
        print(f"[scale] N={N:,} {name}: {res['wall_seconds']:.1f} s wall, peak {res['peak_mib']:.0f} MiB"
              + ("" if res["rc"] == 0 else f", FAILED rc={res['rc']}: {res.get('error', '')[-500:]}"), flush=True)
        row[name] = res
        return res

    op("write", me + ["--op", "write", *common])
    if row["write"]["rc"] != 0:
        return row
    row["storage"] = storage(store)
    op("verify", [sys.executable, "-m", "fkdstore", "verify", str(store)])
    op("inspect", [sys.executable, "-m", "fkdstore", "inspect", str(store), "--json"])
    for name in ("read_all", "read_batch", "label_path", "keys"):
        op(name, me + ["--op", name, *common])
    if not a.keep:
        shutil.rmtree(store, ignore_errors=True)
    return row


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def _get(row, op, key):
    r = row.get(op) or {}
    return r.get(key) if r.get("rc", 1) == 0 else None


def table(rows: list[dict]) -> str:
    """The scale table (markdown), one row per N, and the same costs per image."""
    L = ["| N | write s | write img/s | write MB/s | bytes | B/crop | files | writer peak MiB | verify s | verify MiB "
         "| inspect s | inspect MiB | read_all s | read_all MiB | read_batch img/s | label path ms/batch |",
         "|" + "---:|" * 16]
    for r in rows:
        N, M = r["N"], r["M"]
        st = r.get("storage", {})
        ws = _get(r, "write", "seconds")
        L.append(
            f"| {N:,} | {_f(ws, '.1f')} | {_f(ws and N / ws, ',.0f')} "
            f"| {_f(ws and st.get('bytes', 0) / ws / 1e6, '.2f')} "
            f"| {st.get('bytes', 0):,} | {_f(st.get('bytes') and st['bytes'] / (N * M), '.2f')} "
            f"| {st.get('files', '-')} "
            f"| {_f(_get(r, 'write', 'peak_mib'), '.0f')} "
            f"| {_f(_get(r, 'verify', 'wall_seconds'), '.1f')} | {_f(_get(r, 'verify', 'peak_mib'), '.0f')} "
            f"| {_f(_get(r, 'inspect', 'wall_seconds'), '.1f')} | {_f(_get(r, 'inspect', 'peak_mib'), '.0f')} "
            f"| {_f(_get(r, 'read_all', 'seconds'), '.1f')} | {_f(_get(r, 'read_all', 'peak_mib'), '.0f')} "
            f"| {_f(_get(r, 'read_batch', 'images_per_s'), ',.0f')} "
            f"| {_f(_get(r, 'label_path', 'ms_per_batch'), '.1f')} |")
    L += ["", "Per image: times per image should stay flat as N grows; peak memory above the bare-import baseline per "
          "image should fall (memory bounded independently of N). inspect is a total (it samples a fixed number of "
          "crops, so it should stay flat itself). verify and inspect times are the CLI's wall time, process start-up "
          "included.", "",
          "| N | write us/img | verify us/img | inspect s | read_all us/img | write peak B/img | verify peak B/img "
          "| read_all peak B/img | read_batch first batch ms | image_keys s | image_keys MiB | TorchDataset init s |",
          "|" + "---:|" * 12]
    for r in rows:
        N = r["N"]
        base = r.get("baseline_mib", 0.0)

        def per(op, key, scale, r=r, N=N):
            v = _get(r, op, key)
            return None if v is None else v * scale / N

        def mem(op, r=r, N=N, base=base):
            v = _get(r, op, "peak_mib")
            return None if v is None else max(0.0, v - base) * 2**20 / N

        L.append(f"| {N:,} | {_f(per('write', 'seconds', 1e6), '.0f')} "
                 f"| {_f(per('verify', 'wall_seconds', 1e6), '.0f')} "
                 f"| {_f(_get(r, 'inspect', 'wall_seconds'), '.1f')} "
                 f"| {_f(per('read_all', 'seconds', 1e6), '.1f')} | {_f(mem('write'), ',.0f')} "
                 f"| {_f(mem('verify'), ',.0f')} "
                 f"| {_f(mem('read_all'), ',.0f')} | {_f(_get(r, 'read_batch', 'first_batch_ms'), '.0f')} "
                 f"| {_f(_get(r, 'keys', 'seconds'), '.2f')} | {_f(_get(r, 'keys', 'peak_mib'), '.0f')} "
                 f"| {_f(_get(r, 'label_path', 'construct_seconds'), '.2f')} |")
    return "\n".join(L)


def describe(res: dict) -> str:
    rows = res["rows"]
    layouts = ", ".join(
        f"N={r['N']:,}: chunk {r['write'].get('images_per_chunk')} / shard {r['write'].get('images_per_shard')} images"
        for r in rows if r.get("write", {}).get("rc") == 0)
    return (f"{res['when']}, {res['machine']}, load average at start {res['load']}, format "
            f"{next((r['write'].get('format_version') for r in rows if r.get('write', {}).get('rc') == 0), '?')} "
            f"({layouts}){', seeded crops (box and flip derived, not stored)' if res.get('seeded_crops') else ''}. "
            f"M = {res['M']}, C = {res['C']}, MS top-{res['k']} float16, m = {res['m']}, "
            f"{res['batches']} batches of {BATCH} per read_batch / label-path figure. A bare `import fkdstore, zarr` "
            f"process peaks at {res['baseline_mib']:.0f} MiB (included in every peak) and takes "
            f"{res['baseline_seconds']:.1f} s to start and exit. Page cache as the OS left it after the write "
            f"(not dropped, not pre-warmed): a store larger than what the machine keeps cached is read partly from "
            f"disk. Measured under load on shared cores: times are context.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated N values")
    ap.add_argument("--full", action="store_true", help=f"also N = {IMAGENET_N:,} (ImageNet-1K)")
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--m", type=int, default=4, help="slots per image per epoch (read_all, read_batch, label path)")
    ap.add_argument("--batches", type=int, default=100, help="timed batches of 256 for read_batch / label path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeded-crops", action="store_true", help="seeded-crop stores: no box/flip arrays")
    ap.add_argument("--out", default=None, help="work folder (default: a new folder under /work/bench-out or $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (default: delete each after measuring)")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--record", default=None,
                    help="also keep the results here (default with --full: benchmarks/scale_full.json)")
    ap.add_argument("--profile", default=None, help="folder for cProfile summaries of the in-process operations")
    # child mode
    ap.add_argument("--op", choices=sorted(OPS), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.op:
        return child_main(a)

    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if a.full and IMAGENET_N not in sizes:
        sizes.append(IMAGENET_N)
    if any(n < BATCH for n in sizes):
        ap.error(f"--sizes must be >= {BATCH}. Got {sizes}.")
    base_dir = Path("/work/bench-out") if Path("/work/bench-out").is_dir() else Path(tempfile.gettempdir())
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="fkd-scale-", dir=base_dir))
    work.mkdir(parents=True, exist_ok=True)
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    baseline = run_child(me + ["--op", "baseline", "--n", "0"], work / "baseline.log")
    res = {"when": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "M": a.crops, "C": a.classes, "k": a.k, "m": a.m,
           "batches": a.batches, "seeded_crops": a.seeded_crops, "baseline_mib": baseline["peak_mib"],
           "baseline_seconds": baseline["wall_seconds"],
           "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": []}
    for N in sizes:
        row = measure(N, a, work)
        row["baseline_mib"] = baseline["peak_mib"]
        res["rows"].append(row)
        if a.json:  # after every N: a long run keeps what it measured
            Path(a.json).write_text(json.dumps(res, indent=1))
    res["markdown"] = table(res["rows"])
    res["description"] = describe(res)
    print("\n" + res["description"] + "\n\n" + res["markdown"])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    record = a.record or (str(HERE / "scale_full.json") if a.full else None)
    if record:
        Path(record).write_text(json.dumps(res, indent=1))
    if not a.out and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r["N"] for r in res["rows"] if any(isinstance(v, dict) and v.get("rc", 0) != 0 for v in r.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
