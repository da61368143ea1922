"""Store layout benchmark: write throughput, bytes per crop, files, and label read + decode throughput of
fkdstore's layout against alternative Zarr layouts and FKD's one-``torch.save``-file-per-image format.

All sides run in this process on the same teacher-like MS top-5 labels; speeds are reported as ratios to
the per-image ``torch.load`` baseline measured in the same run.

    python benchmarks/store_layout.py [--images 2048] [--crops 200] [--classes 1000] [--out DIR]
        [--decode numpy|torch] [--repeat 3]

Reads are measured cold (a fresh reader with the decoded-chunk cache off: every chunk touched is fetched,
crc32c-checked, decompressed and manifest-checked, as in random access over a store much larger than the
cache; the headline) and warm (the cache already holds this small store), interleaved with the baseline.
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
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # measure this checkout's fkdstore

import fkdstore
import fkdstore.shard
from fkdstore.codecs import get_codec
from fkdstore.report import storage_stats


def teacher_like(rng, n, M, C):
    """Peaked softmax rows: each image has a dominant class, crops vary around it (like a real teacher)."""
    cls = rng.integers(0, C, n)
    logits = rng.normal(0, 1.5, (n, M, C)).astype(np.float32)
    logits[np.arange(n)[:, None], np.arange(M), cls[:, None]] += rng.normal(4, 2, (n, M)).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True), cls


def boxes_for(rng, sizes, M):
    from fkdstore.seeded import SlotCropSampler

    s = SlotCropSampler(seed=0)
    out = [s.sample(i, int(h), int(w), M) for i, (h, w) in enumerate(sizes)]
    return np.stack([b for b, _ in out]), np.stack([f for _, f in out])


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--crops", type=int, default=200)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--decode", choices=("numpy", "torch"), default="numpy",
                    help="framework both sides decode the labels they read in (default numpy)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved read runs; medians are reported")
    a = ap.parse_args(argv)
    N, M, C = a.images, a.crops, a.classes
    work = Path(a.out or tempfile.mkdtemp(prefix="fkd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 600, N), rng.integers(200, 600, N)], 1)
    boxes, flips = boxes_for(rng, sizes, M)
    codec = get_codec("ms", k=a.k)
    fields = {"indices": [], "probs": []}
    labels = np.empty(N, np.int64)
    t_teacher = time.perf_counter()
    for s in range(0, N, 64):
        p, cls = teacher_like(rng, min(64, N - s), M, C)
        labels[s:s + len(cls)] = cls
        for k, v in codec.encode(p).items():
            fields[k].append(v)
    fields = {k: np.concatenate(v) for k, v in fields.items()}
    print(f"made {N} x {M} teacher-like labels in {time.perf_counter() - t_teacher:.1f}s")
    keys = [f"n{i % 100:05d}/img_{i:07d}.JPEG" for i in range(N)]
    res: dict = {"images": N, "crops": M, "classes": C, "codec": codec.get_config()}

    # -- fkdstore (default layout)
    path = work / "fkdstore.zarr"
    shutil.rmtree(path, ignore_errors=True)

    def write_fkd():
        with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=keys,
                            image_sizes=sizes, labels=labels) as w:
            for s in range(0, N, 256):
                i = np.arange(s, min(N, s + 256))
                w.put_fields(i, boxes[i], flips[i], {k: v[i] for k, v in fields.items()})

    t_write = timed(write_fkd)
    st = storage_stats(path)["_total"]
    r = fkdstore.open(path)
    res["fkdstore"] = {
        "layout": f"chunk {r.header.images_per_chunk} img, shard {r.header.images_per_shard} img",
        "write_images_per_s": N / t_write, "bytes_per_crop": st["bytes"] / (N * M), "files": st["files"],
        "bytes": st["bytes"],
    }

    # -- alternatives: zarr, one chunk per image unsharded; and big zstd chunks in shards
    def zarr_layout(name, chunk, shard, compressors):
        p = work / name
        shutil.rmtree(p, ignore_errors=True)
        g = zarr.open_group(str(p), mode="w")
        arrays = {"box": boxes.astype(np.uint16), "flip": flips, **fields}
        t = time.perf_counter()
        for k, v in arrays.items():
            arr = g.create_array(k.replace("/", "_"), shape=v.shape, dtype=v.dtype, chunks=(chunk, *v.shape[1:]),
                                 shards=None if shard is None else (shard, *v.shape[1:]),
                                 compressors=compressors(v.dtype))
            arr[:] = v
        dt = time.perf_counter() - t
        stt = storage_stats(p)["_total"]
        return g, {"write_images_per_s": N / dt, "bytes_per_crop": stt["bytes"] / (N * M), "files": stt["files"],
                   "bytes": stt["bytes"]}

    def zstd(dt):
        return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=np.dtype(dt).itemsize), Crc32cCodec()]

    g_img, res["zarr_chunk_per_image"] = zarr_layout("per_image.zarr", 1, None, zstd)
    g_big, res["zarr_big_chunks_sharded"] = zarr_layout("big.zarr", 1024, 1024 * 8, zstd)
    res["zarr_chunk_per_image"]["layout"] = "chunk 1 img, unsharded"
    res["zarr_big_chunks_sharded"]["layout"] = "chunk 1024 img, shard 8192 img, zstd"

    # -- FKD baseline: one torch.save file per image [coords f32 (M,4) normalised, flip, labels (M,2,K)]
    fkd_dir = work / "fkd"
    shutil.rmtree(fkd_dir, ignore_errors=True)
    fkd_dir.mkdir()
    t = time.perf_counter()
    for i in range(N):
        coords = (boxes[i] / np.r_[sizes[i], sizes[i]]).astype(np.float32)
        lab = np.stack([fields["indices"][i].astype(np.float32), fields["probs"][i].astype(np.float32)], 1)
        torch.save([coords, flips[i], lab], fkd_dir / f"{i}.tar")
    t_fkd_w = time.perf_counter() - t
    fkd_bytes = sum(f.stat().st_size for f in fkd_dir.iterdir())
    res["fkd_torch_save"] = {"layout": "one torch.save file per image", "write_images_per_s": N / t_fkd_w,
                             "bytes_per_crop": fkd_bytes / (N * M), "files": N, "bytes": fkd_bytes}

    # -- reads (random images, labels decoded to dense)
    order = np.random.default_rng(1).permutation(N)
    n_single = min(N, 1000)

    # Training reads m of the M stored slots of each image and decodes only those (FKD picks randperm(M)[:m]).
    m = 4
    slots = np.random.default_rng(2).integers(0, M, (N, m))
    # Both sides decode what they read with the same codec.decode, in the same framework (--decode): numpy
    # arrays as read, or torch tensors made from them (torch's per-op overhead dominates a 4-row decode).
    as_in = (lambda v: v) if a.decode == "numpy" else torch.from_numpy

    def decode(fields):
        codec.decode({k: as_in(np.asarray(v)) for k, v in fields.items()}, C)

    def fkd_read(_r=None):
        for i in order[:n_single]:
            coords, fl, lab = torch.load(fkd_dir / f"{i}.tar", weights_only=False)
            sel = slots[i]
            decode({"indices": lab[sel, 0].astype(np.int64), "probs": lab[sel, 1]})

    def fkd_single(rd):
        for i in order[:n_single]:
            decode(rd.read(int(i), slots[i]).fields)

    def fkd_batch(rd):
        for s in range(0, N, 256):
            b = order[s:s + 256]
            decode(rd.read_batch(b, slots[b]).fields)

    def fkd_epoch(rd):
        rec = rd.read_all(slots)
        for s in range(0, N, 256):  # decode per training batch, as a loop would
            decode({k: v[order[s:s + 256]] for k, v in rec.fields.items()})

    def zarr_single(_r=None):
        arrs = [g_img[k] for k in ("box", "flip", "indices", "probs")]
        for i in order[: n_single // 4]:
            [a_[int(i)] for a_ in arrs]

    def reader(cold):
        """cold: a fresh reader with the decoded-chunk cache off, so every chunk a read touches is fetched,
        crc32c-checked, decompressed and manifest-checked (random access over a store far larger than the
        cache); warm: one reader whose 32 MiB chunk cache already holds this whole (small) store."""
        if not cold:
            return warm
        old = fkdstore.shard.CHUNK_CACHE_BYTES
        fkdstore.shard.CHUNK_CACHE_BYTES = 0
        try:
            return fkdstore.open(path)
        finally:
            fkdstore.shard.CHUNK_CACHE_BYTES = old

    warm = fkdstore.open(path)
    for s in range(0, N, 256):
        warm.read_batch(np.arange(s, min(N, s + 256)))
    cases = [  # (name, function, images per call, cold)
        ("torch.load per image (FKD format)", fkd_read, n_single, None),
        (f"fkdstore read(i, m={m} slots), cold", fkd_single, n_single, True),
        (f"fkdstore read(i, m={m} slots), warm cache", fkd_single, n_single, False),
        ("fkdstore read_batch(256 random images), cold", fkd_batch, N, True),
        ("fkdstore read_batch(256 random images), warm cache", fkd_batch, N, False),
        (f"fkdstore epoch preload read_all(slots m={m}) + batched decode", fkd_epoch, N, True),
    ]
    speeds: dict[str, list] = {name: [] for name, *_ in cases}
    ratios: dict[str, list] = {name: [] for name, *_ in cases}
    for _ in range(a.repeat):  # interleaved, so load changes hit every side alike; medians reported
        base_rep = None
        for name, fn, count, cold in cases:
            rd = reader(cold) if cold is not None else None
            t = time.perf_counter()
            fn(rd)
            v = count / (time.perf_counter() - t)
            base_rep = v if base_rep is None else base_rep
            speeds[name].append(v)
            ratios[name].append(v / base_rep)
    read = {name: float(np.median(v)) for name, v in speeds.items()}
    read["zarr arr[i] per image (chunk per image)"] = (n_single // 4) / timed(zarr_single, 1)
    base = read["torch.load per image (FKD format)"]
    res["read_decode"] = a.decode
    res["read_repeats"] = a.repeat
    res["read_torch_load_images_per_s"] = base
    res["read_images_per_s"] = read
    ratio = {name: float(np.median(v)) for name, v in ratios.items()}
    ratio["zarr arr[i] per image (chunk per image)"] = read["zarr arr[i] per image (chunk per image)"] / base
    res["read_ratio_vs_torch_load"] = ratio  # median over repeats of the same-repeat ratio

    # ---- report
    print(f"\n{N} images x {M} crops, C={C}, {codec!r}")
    print(f"{'layout':42s} {'B/crop':>7s} {'files':>6s} {'write img/s':>12s}")
    for k in ("fkdstore", "zarr_chunk_per_image", "zarr_big_chunks_sharded", "fkd_torch_save"):
        v = res[k]
        print(f"{k + ' (' + v['layout'] + ')':42.42s} {v['bytes_per_crop']:7.2f} {v['files']:6d} "
              f"{v['write_images_per_s']:12.0f}")
    print(f"\nlabel read + {a.decode} decode of m=4 slots per random image; medians of {a.repeat} interleaved runs")
    print(f"{'':62s} {'img/s':>9s} {'x torch.load':>12s}")
    for k, v in read.items():
        print(f"{k:62s} {v:9.0f} {ratio[k]:12.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
