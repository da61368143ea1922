"""Where a cold random label read spends its time, next to FKD's per-image ``torch.load`` (issue 13.4).

Same data and reads as ``benchmarks/store_layout.py`` (teacher-like MS top-5 labels, m = 4 random slots per
random image, both sides decoded with the same ``codec.decode``), measured part by part in one process:
best of ``--repeat`` passes, interleaved, per image:

- FKD side: ``torch.load`` of the image's file + taking the 4 slots; the numpy decode of those 4 rows.
- ``read(i)`` cold (a fresh reader, decoded-chunk cache off): the whole call; its chunk step alone
  (``shard.take_one``: index lookup, pread, crc32c, blosc, manifest tag, for every per-crop array); and a
  *floor*: the same C calls (``os.pread``, ``crc32c`` x 3, numcodecs blosc) for the same chunks with no other
  Python at all, i.e. what any reader doing every check the spec asks costs with these libraries.
- ``read_batch(256 random images)`` cold: the whole call, its chunk step (``shard.take_many``) and the floor
  of the same calls per chunk touched.

The bound printed: ``(torch.load + decode) / (floor + decode)``, the best ratio a single-image read can
reach against the baseline with this layout and these libraries, whatever the reader's own code costs.

Last, a *what-if* that no format has: every inner chunk of the four arrays packed into ONE chunk (each
array's bytes as byte planes, blosc lz4hc + bitshuffle, a crc32c), in one file: its size against the four
typed arrays, and the floor of a single-image read from it (one pread, one crc32c check, one blosc call,
one tag, then the four fields of the image unpacked from the planes): the bound a per-image record layout
would give.

    python benchmarks/read_breakdown.py [--images 4096] [--crops 32] [--repeat 7] [--images-per-chunk K]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import crc32c
import numpy as np
import torch
from numcodecs import blosc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # measure this checkout's fkdstore

from store_layout import boxes_for, teacher_like, timed

import fkdstore
import fkdstore.report
from fkdstore import shard
from fkdstore.codecs import get_codec


def _best(fn, count, repeat):
    """Best of ``repeat`` timings of ``fn``, in µs per one of its ``count`` operations."""
    return timed(fn, repeat) / count * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--crops", type=int, default=32)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--images-per-chunk", type=int, default=None, help="inner chunk (default: the layout rule)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed after)")
    a = ap.parse_args(argv)
    N, M, C, m = a.images, a.crops, a.classes, 4
    work = Path(a.out or tempfile.mkdtemp(prefix="fkd-breakdown-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 600, N), rng.integers(200, 600, N)], 1)
    boxes, flips = boxes_for(rng, sizes, M)
    codec = get_codec("ms", k=5)
    parts = [codec.encode(teacher_like(rng, min(64, N - s), M, C)[0]) for s in range(0, N, 64)]
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    path = work / "fkdstore.zarr"
    shutil.rmtree(path, ignore_errors=True)
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec,
                        image_keys=[f"img_{i:07d}.JPEG" for i in range(N)], image_sizes=sizes,
                        images_per_chunk=a.images_per_chunk) as w:
        w.put_fields(np.arange(N), boxes, flips, fields)
    fkd = work / "fkd"
    shutil.rmtree(fkd, ignore_errors=True)
    fkd.mkdir()
    for i in range(N):
        lab = np.stack([fields["indices"][i].astype(np.float32), fields["probs"][i].astype(np.float32)], 1)
        torch.save([(boxes[i] / np.r_[sizes[i], sizes[i]]).astype(np.float32), flips[i], lab], fkd / f"{i}.tar")

    order = np.random.default_rng(1).permutation(N)
    slots = np.random.default_rng(2).integers(0, M, (N, m))
    n1 = min(N, 1000)
    single = order[:n1].tolist()
    batches = [order[s:s + 256] for s in range(0, N, 256)]

    def decode(f):
        codec.decode(f, C)

    def cold():
        old, shard.CHUNK_CACHE_BYTES = shard.CHUNK_CACHE_BYTES, 0
        try:
            return fkdstore.open(path)
        finally:
            shard.CHUNK_CACHE_BYTES = old

    r = cold()
    arrays = list(r._arrays.values())
    ipc = r.header.images_per_chunk
    r.read_batch(np.arange(N))  # every shard index and manifest chunk cached, as after a reader's first reads
    # the floor: per array, its open shard file and index as Python lists; per chunk only the checked C calls
    info = []
    for arr in arrays:
        idx = [arr._indexes([s])[0][s].tolist() for s in range(-(-N // (arr.per_shard * ipc)))]
        fds = [os.open(path / arr.shard_key(s), os.O_RDONLY) for s in range(len(idx))]
        info.append((fds, idx, arr.per_shard, crc32c.crc32c(arr.path.encode() + b"\0")))
    crc, dec, sizes_of = crc32c.crc32c, blosc.decompress, blosc._cbuffer_sizes

    def fetch_check(c):
        for fds, idx, ps, head in info:
            off, nb = idx[c // ps][c % ps]
            raw = os.pread(fds[c // ps], nb, off)
            if crc(raw) != shard.CRC32C_RESIDUE or sizes_of(raw)[0] <= 0:
                raise RuntimeError(f"chunk {c} fails its checks")
            d = dec(raw)
            crc(d, crc(c.to_bytes(8, "little"), head))
            yield d

    def fkd_load():
        for i in single:
            lab = torch.load(fkd / f"{i}.tar", weights_only=False)[2]
            sel = slots[i]
            lab[sel, 0].astype(np.int64), lab[sel, 1]

    f0 = r.read(int(order[0]), slots[order[0]]).fields
    f0 = {"indices": f0["indices"].astype(np.int64), "probs": f0["probs"].astype(np.float32)}  # FKD's dtypes
    rows = {"torch.load + take 4 slots (FKD)": (fkd_load, n1),
            "decode of 4 rows (either side)": (lambda: [decode(f0) for _ in single], n1)}
    fresh = {}

    def read_all_single():
        rd = fresh["r"]
        for i in single:
            rd.read(i, slots[i])

    def take_single():
        for i in single:
            shard.take_one(arrays, i // ipc)

    def floor_single():
        for i in single:
            c, w = divmod(i, ipc)
            for d, arr in zip(fetch_check(c), arrays):
                np.frombuffer(d, arr.dtype).reshape(arr.chunk_shape)[w].take(slots[i], 0)

    def batch_all():
        rd = fresh["r"]
        for b in batches:
            rd.read_batch(b, slots[b])

    groups = [shard.group_rows(b, ipc) for b in batches]

    def take_batch():
        for cs, _, _ in groups:
            shard.take_many(arrays, cs)

    def floor_batch():
        for (cs, inv, within), b in zip(groups, batches):
            got = [[] for _ in arrays]
            for c in cs.tolist():
                for k, d in enumerate(fetch_check(c)):
                    got[k].append(d)
            for arr, g in zip(arrays, got):
                st = np.frombuffer(b"".join(g), arr.dtype).reshape(len(cs), *arr.chunk_shape)
                st[inv[:, None], within[:, None], slots[b]]

    rows.update({"read(i) cold: whole call": (read_all_single, n1),
                 "read(i) cold: chunk step (take_one, 4 arrays)": (take_single, n1),
                 "read(i) floor: pread + crc32c + blosc + tag, no other Python": (floor_single, n1),
                 "read_batch(256) cold: whole call": (batch_all, N),
                 "read_batch(256) cold: chunk step (take_many)": (take_batch, N),
                 "read_batch(256) floor: the same C calls per chunk + one gather": (floor_batch, N)})
    best = {k: float("inf") for k in rows}
    for _ in range(a.repeat):  # interleaved: load changes hit every row alike
        for name, (fn, count) in rows.items():
            fresh["r"] = cold()
            fresh["r"].read_batch(np.arange(N))  # indexes cached, as in a long run (the cache stays off)
            best[name] = min(best[name], _best(fn, count, 1))
    st = fkdstore.report.storage_stats(path)["_total"]["bytes"]
    print(f"{N} images x {M} crops, C={C}, ms k=5, {ipc} images per inner chunk, {st / (N * M):.2f} B/crop; "
          f"best of {a.repeat}; us per image")
    for name, v in best.items():
        print(f"{name:66s} {v:8.2f}")
    base = best["torch.load + take 4 slots (FKD)"] + best["decode of 4 rows (either side)"]
    D = best["decode of 4 rows (either side)"]
    print(f"{'read(i) ratio (whole call + decode)':66s} {base / (best['read(i) cold: whole call'] + D):8.2f}x")
    print(f"{'read(i) bound: (torch.load + decode) / (floor + decode)':66s} "
          f"{base / (best['read(i) floor: pread + crc32c + blosc + tag, no other Python'] + D):8.2f}x")
    print(f"{'read_batch ratio (whole call, batched decode not counted)':66s} "
          f"{base / best['read_batch(256) cold: whole call']:8.2f}x")
    record_bound(arrays, ipc, N, M, fetch_check, single, slots, base, D, a.repeat, work)
    for fds, _, _, _ in info:
        for fd in fds:
            os.close(fd)
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)


def record_bound(arrays, ipc, N, M, fetch_check, single, slots, base, D, repeat, work) -> None:
    """The per-image record what-if of the module docstring: size and single-read floor."""
    from numcodecs import Blosc

    codec = Blosc(cname="lz4hc", clevel=9, shuffle=Blosc.BITSHUFFLE, typesize=1)
    sizes = [a.dtype.itemsize for a in arrays]
    rows = [int(np.prod(a.chunk_shape[1:])) for a in arrays]  # items per image row of each array
    blobs, typed = [], 0
    for c in range(-(-N // ipc)):
        planes = []
        for d, it in zip(fetch_check(c), sizes):
            planes.append(np.frombuffer(d, np.uint8).reshape(-1, it).T.ravel())
        comp = codec.encode(np.concatenate(planes))
        blobs.append(comp + crc32c.crc32c(comp).to_bytes(4, "little"))
    for arr in arrays:  # the four typed arrays' chunk bytes (their shard files, indexes included)
        typed += sum((Path(work) / "fkdstore.zarr" / arr.shard_key(s)).stat().st_size
                     for s in range(-(-N // (arr.per_shard * ipc))))
    path = Path(work) / "records.bin"
    path.write_bytes(b"".join(blobs))
    offs = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    fd = os.open(path, os.O_RDONLY)
    crc, dec = crc32c.crc32c, blosc.decompress
    head = crc(b"record\0")
    bounds = []  # (offset, length) of each array's planes in a decoded record chunk
    o = 0
    for it, n in zip(sizes, rows):
        bounds.append((o, it, n))
        o += it * n * ipc

    def floor_record():
        for i in single:
            c, w = divmod(i, ipc)
            raw = os.pread(fd, offs[c + 1] - offs[c], offs[c])
            if crc(raw) != shard.CRC32C_RESIDUE:
                raise RuntimeError("record fails its checksum")
            d = dec(raw)
            crc(d, crc(c.to_bytes(8, "little"), head))
            u8 = np.frombuffer(d, np.uint8)
            for (start, it, n), arr in zip(bounds, arrays):
                planes = u8[start:start + it * n * ipc].reshape(it, ipc, n)[:, w]
                row = planes.T.copy().view(arr.dtype).reshape(arr.chunk_shape[1:])
                row.take(slots[i], 0)

    best = min(_best(floor_record, len(single), 1) for _ in range(repeat))
    os.close(fd)
    print(f"what-if record layout (one byte-plane chunk per inner chunk, all 4 arrays): "
          f"{sum(len(b) for b in blobs) / (N * M):.2f} B/crop vs {typed / (N * M):.2f} for the 4 typed arrays "
          f"({sum(len(b) for b in blobs) / typed - 1:+.1%})")
    print(f"{'record read(i) floor: one pread + crc32c + blosc + tag + unpack':66s} {best:8.2f}")
    print(f"{'record read(i) bound: (torch.load + decode) / (floor + decode)':66s} {base / (best + D):8.2f}x")


if __name__ == "__main__":
    main()
