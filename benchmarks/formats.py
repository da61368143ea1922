"""Storage and access cost of fkdstore against the soft-label formats in use today.

Equivalent label sets (same images, same crops, same teacher-like outputs, C = 1000) are written as

* **fkdstore**, one store per codec (hard, smoothing, MS top-5, MR top-5, MS top-10, full fp16);
* **FKD** (szq0214/FKD): one ``torch.save`` file per image holding ``[coords (M,4), flip (M,), labels]``
  with coords normalised and values in float16 (FKD's fp16 mode, its smallest form); labels are hard (M,),
  smoothing (M,2) or marginal top-K (M,2,K) (row 0 = class indices as floats), full (M,C);
* **SRe2L** (VILA-Lab/SRe2L relabel): one ``torch.save`` file per (epoch, batch) holding coords, flips, the
  mix parameters and the full fp16 logits of the batch; epoch ``e`` labels stored crop slot ``e`` of every
  image, in a seeded random batch order;
* **ReLabel** (naver-ai/relabel_imagenet): one ``.pt`` file per image with a [2, 5, 15, 15] float32 tensor
  (top-5 scores and class indices of a 15x15 label map); reading a crop's label RoI-aligns the crop box on
  the densified map (bilinear sampling with ``grid_sample``, 2x2 samples, output 1x1) and applies softmax.
  Its size does not depend on M.

For each M: bytes on disk, files, bytes per crop; random single-image read + decode of m stored crops to
dense float32 (fkdstore's chunk cache is cleared before every read, so each read decompresses its chunk, as
at ImageNet scale); one epoch's labels (every image, m crops each) read; decoding that epoch to dense on CPU.
Each figure is extrapolated to ImageNet-1K (1,281,167 images). All formats are timed in the same process on
the same data, from the OS page cache (no cold-disk effects), single-threaded; speeds are per second of
process CPU time (user + system), best of 3.

    python benchmarks/formats.py [--images 512] [--crops 8 32 200] [--m 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fkdstore
from fkdstore import schema as S
from fkdstore.codecs import get_codec
from fkdstore.report import storage_stats
from fkdstore.seeded import SlotCropSampler

IMAGENET_N = 1_281_167
C_DEFAULT = 1000
# Paper Table 2 (1.2M images, M = 200, C = 1000): bytes on disk per strategy.
TABLE2 = {"hard": 5.3e9, "smoothing": 6.2e9, "ms5": 13.3e9, "mr5": 13.3e9, "ms10": 22.2e9, "full": 0.9e12}
STRATEGIES = {  # name -> (codec name, kwargs)
    "hard": ("hard", {}), "smoothing": ("smoothing", {}), "ms5": ("ms", {"k": 5}), "mr5": ("mr", {"k": 5}),
    "ms10": ("ms", {"k": 10}), "full": ("full", {}),
}
LABEL = {"hard": "Hard", "smoothing": "Smoothing", "ms5": "MS K=5", "mr5": "MR K=5", "ms10": "MS K=10",
         "full": "Full (fp16)"}
RELABEL_GRID, RELABEL_K = 15, 5


# --------------------------------------------------------------------------------------------- data


def teacher_logits(seed: int, index: int, M: int, C: int) -> torch.Tensor:
    """Teacher-like logits (M, C) of image ``index``: a dominant class per image, crops vary around it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    cls = int(torch.randint(0, C, (1,), generator=g))
    logits = torch.randn(M, C, generator=g) * 1.5
    logits[:, cls] += 4 + 2 * torch.randn(M, generator=g)
    return logits


def image_sizes(N: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(200, 600, N), rng.integers(200, 600, N)], 1)  # ImageNet-like (h, w)


def crops(sizes: np.ndarray, M: int) -> tuple[np.ndarray, np.ndarray]:
    s = SlotCropSampler(seed=0)
    out = [s.sample(i, int(h), int(w), M) for i, (h, w) in enumerate(sizes)]
    return np.stack([b for b, _ in out]), np.stack([f for _, f in out])


def image_keys(N: int) -> list[str]:
    return [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(N)]  # ImageNet-like key lengths


def make_labels(N: int, M: int, C: int, n_full: int, seed: int = 0):
    """Top-10 fields (indices uint16, probs fp16) of every image; full fp16 probs and logits of the first n_full."""
    idx10 = np.empty((N, M, 10), np.uint16)
    p10 = np.empty((N, M, 10), np.float16)
    full_p = np.empty((n_full, M, C), np.float16)
    full_logits = np.empty((n_full, M, C), np.float16)
    for i in range(N):
        lg = teacher_logits(seed, i, M, C)
        p = torch.softmax(lg, -1)
        top = torch.topk(p, 10, dim=-1, sorted=True)
        idx10[i] = top.indices.numpy().astype(np.uint16)
        p10[i] = top.values.numpy().astype(np.float16)
        if i < n_full:
            full_p[i] = p.numpy().astype(np.float16)
            full_logits[i] = lg.numpy().astype(np.float16)
    return idx10, p10, full_p, full_logits


def fields_for(strategy: str, idx10, p10, full_p) -> dict[str, np.ndarray]:
    """The codec fields of ``strategy``, derived from the top-10 (same ranking rule as the codecs)."""
    if strategy == "hard":
        return {"indices": idx10[..., 0]}
    if strategy == "smoothing":
        return {"indices": idx10[..., 0], "probs": p10[..., 0]}
    if strategy in ("ms5", "mr5"):
        return {"indices": np.ascontiguousarray(idx10[..., :5]), "probs": np.ascontiguousarray(p10[..., :5])}
    if strategy == "ms10":
        return {"indices": idx10, "probs": p10}
    if strategy == "full":
        return {"probs": full_p}
    raise ValueError(strategy)


def codec_of(strategy: str):
    name, kw = STRATEGIES[strategy]
    return get_codec(name, **kw)


# --------------------------------------------------------------------------------------------- writers


def dir_stats(path: Path) -> dict[str, int]:
    n = b = 0
    for dp, _, fs in os.walk(path):
        for f in fs:
            n += 1
            b += os.path.getsize(os.path.join(dp, f))
    return {"bytes": b, "files": n}


def write_fkdstore(path: Path, strategy, fields, boxes, flips, sizes, keys, C):
    N, M = boxes.shape[:2]
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec_of(strategy),
                        image_keys=keys, image_sizes=sizes, labels=np.arange(N) % C) as w:
        w.put_fields(np.arange(N), boxes, flips, fields)


def fkd_labels(strategy: str, fields: dict[str, np.ndarray], i: int) -> np.ndarray:
    """FKD's per-image label array (fp16 mode): hard (M,), smoothing (M,2), marginal (M,2,K), full (M,C)."""
    if strategy == "hard":
        return fields["indices"][i].astype(np.float16)
    if strategy == "smoothing":
        return np.stack([fields["indices"][i].astype(np.float16), fields["probs"][i]], 1)
    if strategy == "full":
        return fields["probs"][i]
    return np.stack([fields["indices"][i].astype(np.float16), fields["probs"][i]], 1)


def write_fkd(root: Path, strategy, fields, boxes, flips, sizes, keys):
    for i, k in enumerate(keys):
        coords = (boxes[i] / np.r_[sizes[i], sizes[i]]).astype(np.float16)
        p = root / (k.rsplit(".", 1)[0] + ".tar")
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save([coords, flips[i], fkd_labels(strategy, fields, i)], p)


def sre2l_order(N: int, M: int, seed: int = 0) -> np.ndarray:
    """(M, N): image at each position of each epoch (seeded RandomSampler)."""
    return np.stack([np.random.default_rng([seed, e]).permutation(N) for e in range(M)])


def write_sre2l(root: Path, logits, boxes, flips, sizes, B):
    N, M = boxes.shape[:2]
    order = sre2l_order(N, M)
    for e in range(M):
        d = root / f"epoch_{e}"
        d.mkdir(parents=True, exist_ok=True)
        for b in range(math.ceil(N / B)):
            ii = order[e, b * B:(b + 1) * B]
            coords = torch.from_numpy((boxes[ii, e] / np.concatenate([sizes[ii], sizes[ii]], 1)).astype(np.float32))
            torch.save({"coords": coords, "flip": torch.from_numpy(flips[ii, e]),
                        "mix_index": torch.randperm(len(ii)), "mix_lam": 0.5,
                        "mix_bbox": torch.zeros(4, dtype=torch.int64),
                        "soft_label": torch.from_numpy(logits[ii, e])}, d / f"batch_{b}.tar")
    return order


def relabel_maps(N: int, C: int, seed: int = 1) -> np.ndarray:
    """(N, 2, 5, 15, 15) float32: top-5 scores (logits) and indices of a teacher-like 15x15 label map."""
    out = np.empty((N, 2, RELABEL_K, RELABEL_GRID, RELABEL_GRID), np.float32)
    for i in range(N):
        lg = teacher_logits(seed, i, RELABEL_GRID * RELABEL_GRID, C)  # (225, C) one "crop" per map cell
        top = torch.topk(lg, RELABEL_K, dim=-1)
        out[i, 0] = top.values.T.reshape(RELABEL_K, RELABEL_GRID, RELABEL_GRID).numpy()
        out[i, 1] = top.indices.T.reshape(RELABEL_K, RELABEL_GRID, RELABEL_GRID).numpy()
    return out


def write_relabel(root: Path, maps, keys):
    for i, k in enumerate(keys):
        p = root / (k.rsplit(".", 1)[0] + ".pt")
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(maps[i]), p)


# --------------------------------------------------------------------------------------------- ReLabel read


def roi_align_1x1(maps: torch.Tensor, boxes: torch.Tensor, sampling: int = 2) -> torch.Tensor:
    """RoI-align with output size 1x1 (torchvision ``roi_align(aligned=True)`` semantics, fixed sampling).

    ``maps`` (B, C, h, w); ``boxes`` (B, m, 4) as fractions of the image (top, left, height, width).
    Averages ``sampling x sampling`` bilinear samples at the bin's sub-cell centres. Returns (B, m, C).
    """
    B, m = boxes.shape[:2]
    t = (torch.arange(sampling, dtype=maps.dtype) + 0.5) / sampling  # (s,)
    ys = boxes[..., 0:1] + boxes[..., 2:3] * t  # (B, m, s) fraction of the image height
    xs = boxes[..., 1:2] + boxes[..., 3:4] * t
    gy = (2 * ys - 1)[..., :, None].expand(B, m, sampling, sampling)  # grid_sample, align_corners=False:
    gx = (2 * xs - 1)[..., None, :].expand(B, m, sampling, sampling)  # -1/+1 are the map's outer edges
    grid = torch.stack([gx, gy], -1).reshape(B, m, sampling * sampling, 2)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, m, s*s)
    return out.mean(-1).permute(0, 2, 1)


def relabel_decode(maps: torch.Tensor, boxes: torch.Tensor, C: int) -> torch.Tensor:
    """Dense soft labels (B*m, C) of crops ``boxes`` (B, m, 4 fractions) from top-k maps (B, 2, k, h, w)."""
    B = maps.shape[0]
    dense = torch.zeros(B, C, RELABEL_GRID * RELABEL_GRID)
    dense.scatter_(1, maps[:, 1].reshape(B, RELABEL_K, -1).long(), maps[:, 0].reshape(B, RELABEL_K, -1))
    pooled = roi_align_1x1(dense.reshape(B, C, RELABEL_GRID, RELABEL_GRID), boxes)
    return torch.softmax(pooled, -1).reshape(-1, C)


# --------------------------------------------------------------------------------------------- timing


def timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` process CPU times (user + system) of ``fn()``: single-threaded work from the page
    cache, so CPU time is the cost, and other jobs on a shared machine do not inflate it as wall time."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return max(best, 1e-9)


def fkdstore_layout_at(N: int, M: int, C: int, strategy: str) -> tuple[int, int]:
    """(images per chunk, images per shard) of a default-layout store (the rule of ``fkdstore.write``)."""
    codec = codec_of(strategy)
    specs = {S.BOX: (4, 2)} | {n: (int(np.prod(f.shape)), np.dtype(f.dtype).itemsize)
                                for n, f in codec.fields(C).items()}
    return S.default_layout(N, max(M * n * b for n, b in specs.values()), M)


def fkdstore_files_at(N: int, M: int, C: int, strategy: str, n_meta_files: int) -> int:
    """Files of a default-layout fkdstore store of N images (computed from the layout rule, not written)."""
    codec = codec_of(strategy)
    _, ips = fkdstore_layout_at(N, M, C, strategy)
    shards = math.ceil(N / ips)
    per_crop_arrays = 2 + len(codec.fields(C))  # stored crops: box and flip, then the codec's fields
    small = (len(S.PER_IMAGE_ARRAYS) + 1) * shards  # key, image_size, label, written, manifest: a chunk per shard
    return per_crop_arrays * shards + small + n_meta_files


def run_M(work: Path, N: int, M: int, C: int, m: int, n_full: int, sre2l_batch: int, relabel, n_random: int,
          strategies) -> dict:
    rng = np.random.default_rng(M)
    sizes = image_sizes(N)
    keys = image_keys(N)
    boxes, flips = crops(sizes, M)
    t = time.perf_counter()
    idx10, p10, full_p, full_logits = make_labels(N, M, C, n_full)
    res: dict = {"M": M, "images": N, "images_full": n_full, "m": m, "label_gen_s": time.perf_counter() - t}
    slots = np.stack([rng.choice(M, m, replace=False) for _ in range(N)])  # the m slots read per image
    order = rng.permutation(N)
    rand = order[:n_random]

    # ---------------------------------------------------------------- sizes
    size = {}
    for st in strategies:
        n = n_full if st == "full" else N
        f = fields_for(st, idx10[:n], p10[:n], full_p)
        p = work / f"fkdstore_{st}_M{M}"
        write_fkdstore(p, st, f, boxes[:n], flips[:n], sizes[:n], keys[:n], C)
        stt = storage_stats(p)
        img_bytes = sum(stt.get(a, {"bytes": 0})["bytes"] for a in S.PER_IMAGE_ARRAYS)
        meta = stt.get(".", {"bytes": 0, "files": 0})
        crop_bytes = stt["_total"]["bytes"] - img_bytes - meta["bytes"]
        imagenet_bytes = img_bytes / n * IMAGENET_N + crop_bytes / (n * M) * IMAGENET_N * M + meta["bytes"]
        size[f"fkdstore/{st}"] = {
            "format": "fkdstore", "strategy": st, "images": n, "bytes": stt["_total"]["bytes"],
            "files": stt["_total"]["files"], "bytes_per_crop": stt["_total"]["bytes"] / (n * M),
            "imagenet_bytes": imagenet_bytes,
            "imagenet_files": fkdstore_files_at(IMAGENET_N, M, C, st, meta["files"]),
        }
        q = work / f"fkd_{st}_M{M}"
        write_fkd(q, st, f, boxes[:n], flips[:n], sizes[:n], keys[:n])
        d = dir_stats(q)
        size[f"fkd/{st}"] = {
            "format": "FKD per-image torch.save", "strategy": st, "images": n, **d,
            "bytes_per_crop": d["bytes"] / (n * M), "imagenet_bytes": d["bytes"] / n * IMAGENET_N,
            "imagenet_files": IMAGENET_N,
        }
    sre = work / f"sre2l_M{M}"
    B = min(sre2l_batch, n_full)
    sre_order = write_sre2l(sre, full_logits, boxes[:n_full], flips[:n_full], sizes[:n_full], B)
    d = dir_stats(sre)
    size["sre2l/full"] = {
        "format": f"SRe2L per-(epoch,batch) torch.save, fp16 logits, batch {sre2l_batch}", "strategy": "full",
        "images": n_full, **d, "bytes_per_crop": d["bytes"] / (n_full * M),
        "imagenet_bytes": d["bytes"] / (n_full * M) * IMAGENET_N * M,
        "imagenet_files": M * math.ceil(IMAGENET_N / sre2l_batch),
    }
    relabel_root, maps = relabel
    d = dir_stats(relabel_root)
    size["relabel/top5map"] = {
        "format": "ReLabel per-image [2,5,15,15] f32 map", "strategy": "top5 map", "images": N, **d,
        "bytes_per_crop": d["bytes"] / (N * M), "imagenet_bytes": d["bytes"] / N * IMAGENET_N,
        "imagenet_files": IMAGENET_N,
    }
    res["size"] = size

    # ---------------------------------------------------------------- reads (MS-5, full, ReLabel)
    speed: dict = {}
    fr = work / f"fkdstore_ms5_M{M}"
    codec = codec_of("ms5")
    reader = fkdstore.open(fr)

    def fkdstore_random(rd, ids, st_codec):
        def go():
            for i in ids:
                for a in rd._arrays.values():  # cold chunk cache: each read decompresses its chunk
                    a._cache.clear()
                rec = rd.read(int(i), slots[i])
                st_codec.decode({k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.uint16 else v)
                                 for k, v in rec.fields.items()}, C)
        return go

    def fkd_random(root, st, ids):
        def go():
            for i in ids:
                coords, fl, lab = torch.load(root / (keys[i].rsplit(".", 1)[0] + ".tar"), weights_only=False)
                sel = lab[slots[i]]
                if st == "full":
                    torch.from_numpy(sel).float()
                else:
                    codec_of(st).decode({"indices": torch.from_numpy(sel[:, 0].astype(np.int64)),
                                         "probs": torch.from_numpy(sel[:, 1])}, C)
        return go

    inv = np.argsort(sre_order, axis=1)  # (M, n_full): position of image i in epoch e

    def sre2l_random(ids):
        def go():
            for i in ids:
                rows = []
                for s in slots[i]:  # crop slot s lives in epoch s's batch file
                    pos = inv[s, i]
                    d_ = torch.load(sre / f"epoch_{s}" / f"batch_{pos // B}.tar", weights_only=False)
                    rows.append(d_["soft_label"][pos % B])
                torch.softmax(torch.stack(rows).float(), -1)
        return go

    def relabel_random(ids):
        def go():
            for i in ids:
                mp = torch.load(relabel_root / (keys[i].rsplit(".", 1)[0] + ".pt"))
                b = boxes[i, slots[i]] / np.r_[sizes[i], sizes[i]]
                relabel_decode(mp[None], torch.from_numpy(b.astype(np.float32))[None], C)
        return go

    ids_full = [i for i in rand if i < n_full] or list(range(min(n_full, n_random)))
    rnd = {
        "fkdstore/ms5": (len(rand), fkdstore_random(reader, rand, codec)),
        "fkd/ms5": (len(rand), fkd_random(work / f"fkd_ms5_M{M}", "ms5", rand)),
        "relabel/top5map": (len(rand), relabel_random(rand)),
    }
    if "full" in strategies:
        reader_full = fkdstore.open(work / f"fkdstore_full_M{M}")
        rnd["fkdstore/full"] = (len(ids_full), fkdstore_random(reader_full, ids_full, codec_of("full")))
        rnd["fkd/full"] = (len(ids_full), fkd_random(work / f"fkd_full_M{M}", "full", ids_full))
        rnd["sre2l/full"] = (len(ids_full), sre2l_random(ids_full))
    speed["random_images_per_s"] = {k: n / timed(fn) for k, (n, fn) in rnd.items()}

    # one epoch: every image, m crops each (read only), then decode to dense in batches of 256 images
    def fkdstore_epoch(rd, n):
        return lambda: rd.read_all(slots[:n])

    def fkd_epoch(root, n):
        def go():
            out = []
            for i in range(n):
                coords, fl, lab = torch.load(root / (keys[i].rsplit(".", 1)[0] + ".tar"), weights_only=False)
                out.append((coords[slots[i]], fl[slots[i]], lab[slots[i]]))
            return out
        return go

    def sre2l_epoch():  # m epochs' files = the same N*m crops
        return [torch.load(sre / f"epoch_{e}" / f"batch_{b}.tar", weights_only=False)
                for e in range(m) for b in range(math.ceil(n_full / B))]

    def relabel_epoch():
        return [torch.load(relabel_root / (k.rsplit(".", 1)[0] + ".pt")) for k in keys]

    ep = {"fkdstore/ms5": (N, fkdstore_epoch(reader, N)), "fkd/ms5": (N, fkd_epoch(work / f"fkd_ms5_M{M}", N)),
          "relabel/top5map": (N, relabel_epoch)}
    if "full" in strategies:
        ep["fkdstore/full"] = (n_full, fkdstore_epoch(reader_full, n_full))
        ep["fkd/full"] = (n_full, fkd_epoch(work / f"fkd_full_M{M}", n_full))
        ep["sre2l/full"] = (n_full, sre2l_epoch)
    speed["epoch_images_per_s"] = {k: n / timed(fn) for k, (n, fn) in ep.items()}

    # decode to dense (B*m, C) float32 on CPU, batches of 256 images
    dec = {}
    for st in strategies:
        n = n_full if st == "full" else N
        rec = (reader_full if st == "full" else fkdstore.open(work / f"fkdstore_{st}_M{M}")).read_all(slots[:n])
        fl = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.uint16 else v) for k, v in rec.fields.items()}
        cd = codec_of(st)

        def go(fl=fl, cd=cd, n=n):
            for s in range(0, n, 256):
                cd.decode({k: v[s:s + 256] for k, v in fl.items()}, C)
        dec[f"fkdstore/{st}"] = n * m / timed(go)
    lg = torch.from_numpy(full_logits[np.arange(n_full)[:, None], slots[:n_full]])

    def sre_dec():
        for s in range(0, n_full, 256):
            torch.softmax(lg[s:s + 256].float(), -1)
    dec["sre2l/full"] = n_full * m / timed(sre_dec)
    mp_all = torch.from_numpy(maps)
    rel = boxes[np.arange(N)[:, None], slots] / np.concatenate([sizes, sizes], 1)[:, None]
    bx = torch.from_numpy(rel.astype(np.float32))

    def rel_dec():
        for s in range(0, N, 32):  # dense 1000x15x15 maps: 32 images at a time
            relabel_decode(mp_all[s:s + 32], bx[s:s + 32], C)
    dec["relabel/top5map"] = N * m / timed(rel_dec)
    speed["decode_crops_per_s"] = dec
    res["speed"] = speed
    for p in work.iterdir():
        if p.name.endswith(f"_M{M}"):
            shutil.rmtree(p, ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="N images (label sets with full C-vectors use fewer)")
    ap.add_argument("--crops", type=int, nargs="+", default=[8, 32, 200], help="M values")
    ap.add_argument("--classes", type=int, default=C_DEFAULT)
    ap.add_argument("--m", type=int, default=4, help="crops per image read per step")
    ap.add_argument("--full-crops", type=int, default=20000, help="crops budget (N*M) of the full-vector sets")
    ap.add_argument("--sre2l-batch", type=int, default=256)
    ap.add_argument("--random-reads", type=int, default=300)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--out", default=None, help="work folder (default: temporary, removed after)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(a.out or tempfile.mkdtemp(prefix="fkd-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    N, C = a.images, a.classes
    t0 = time.perf_counter()
    keys = image_keys(N)
    maps = relabel_maps(N, C)
    rl = work / "relabel"
    write_relabel(rl, maps, keys)
    out = {"images": N, "classes": C, "m": a.m, "imagenet_images": IMAGENET_N, "table2": TABLE2, "runs": []}
    try:
        for M in a.crops:
            m = min(a.m, M)
            n_full = max(1, min(N, a.full_crops // M))
            r = run_M(work, N, M, C, m, n_full, a.sre2l_batch, (rl, maps), min(a.random_reads, N), a.strategies)
            out["runs"].append(r)
            print(f"M={M} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)
    out["targets"] = check_targets(out)
    out["wall_s"] = time.perf_counter() - t0
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(to_markdown(out))
    return out


def check_targets(out: dict) -> dict:
    t = {}
    r200 = next((r for r in out["runs"] if r["M"] == 200), None)
    if r200 is not None:
        t["size_vs_table2"] = {
            st: {"fkdstore_bytes": r200["size"][f"fkdstore/{st}"]["imagenet_bytes"], "table2_bytes": TABLE2[st],
                 "ratio": TABLE2[st] / r200["size"][f"fkdstore/{st}"]["imagenet_bytes"],
                 "met": TABLE2[st] / r200["size"][f"fkdstore/{st}"]["imagenet_bytes"] >= 2.5}
            for st in TABLE2 if f"fkdstore/{st}" in r200["size"]
        }
    t["files"] = {}
    t["random_read"] = {}
    for r in out["runs"]:
        z = r["size"]
        t["files"][r["M"]] = {st: {"ratio": z[f"fkd/{st}"]["imagenet_files"] / z[f"fkdstore/{st}"]["imagenet_files"]}
                              for st in ("ms5", "full") if f"fkdstore/{st}" in z}
        for v in t["files"][r["M"]].values():
            v["met"] = v["ratio"] >= 100
        rs = r["speed"]["random_images_per_s"]
        t["random_read"][r["M"]] = {st: {"ratio": rs[f"fkdstore/{st}"] / rs[f"fkd/{st}"],
                                         "met": rs[f"fkdstore/{st}"] > rs[f"fkd/{st}"]}
                                    for st in ("ms5", "full") if f"fkdstore/{st}" in rs}
    return t


def _b(x: float) -> str:
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= f:
            return f"{x / f:.3g} {unit}"
    return f"{x:.0f} B"


def _n(x: float) -> str:
    return f"{x:,.0f}"


NAMES = {"fkdstore": "fkdstore", "fkd": "FKD per-image", "sre2l": "SRe2L per-batch", "relabel": "ReLabel map"}


def _name(key: str) -> str:
    f, st = key.split("/")
    return f"{NAMES[f]} · {LABEL.get(st, st)}"


def to_markdown(out: dict) -> str:
    L = []
    C = out["classes"]
    for r in out["runs"]:
        M, m = r["M"], r["m"]
        L.append(f"\n#### M = {M} stored crops per image (N = {r['images']} images; full-vector sets N = "
                 f"{r['images_full']}), C = {C}\n")
        L.append("| format · strategy | bytes/crop | files (here) | ImageNet-1K bytes | ImageNet-1K files |")
        L.append("|---|---:|---:|---:|---:|")
        for k, v in r["size"].items():
            L.append(f"| {_name(k)} | {v['bytes_per_crop']:.1f} | {_n(v['files'])} | {_b(v['imagenet_bytes'])} | "
                     f"{_n(v['imagenet_files'])} |")
        sp = r["speed"]
        L.append(f"\n| access (m = {m} crops per image) | random read + decode, img/s | epoch read, img/s | "
                 f"ImageNet epoch read | decode to dense, crops/s |")
        L.append("|---|---:|---:|---:|---:|")
        for k in sp["random_images_per_s"]:
            ri, ei = sp["random_images_per_s"][k], sp["epoch_images_per_s"][k]
            de = sp["decode_crops_per_s"].get(k)
            sec = IMAGENET_N / ei
            L.append(f"| {_name(k)} | {_n(ri)} | {_n(ei)} | {f'{sec:.0f} s' if sec < 120 else f'{sec / 60:.1f} min'} | "
                     f"{'' if de is None else _n(de)} |")
        rest = {k: v for k, v in sp["decode_crops_per_s"].items() if k not in sp["random_images_per_s"]}
        if rest:
            L.append("\nDecode to dense (crops/s) of the other codecs: " +
                     ", ".join(f"{LABEL[k.split('/')[1]]} {_n(v)}" for k, v in rest.items()))
    t = out.get("targets", {})
    if "size_vs_table2" in t:
        L.append("\n#### Targets\n")
        L.append("| fkdstore at M = 200, ImageNet-1K | fkdstore | paper Table 2 | Table 2 / fkdstore | >= 2.5x? |")
        L.append("|---|---:|---:|---:|---|")
        for st, v in t["size_vs_table2"].items():
            L.append(f"| {LABEL[st]} | {_b(v['fkdstore_bytes'])} | {_b(v['table2_bytes'])} | {v['ratio']:.2f}x | "
                     f"{'met' if v['met'] else '**missed**'} |")
    if t.get("files"):
        L.append("\n| M | files: FKD per-image / fkdstore (ImageNet-1K), MS K=5 | full | random read: fkdstore / FKD, "
                 "MS K=5 | full |")
        L.append("|---|---:|---:|---:|---:|")
        for M in t["files"]:
            f, rr = t["files"][M], t["random_read"][M]

            def c(d, st, fmt):
                if st not in d:
                    return ""
                return fmt.format(d[st]["ratio"]) + ("" if d[st]["met"] else " **missed**")
            L.append(f"| {M} | {c(f, 'ms5', '{:,.0f}x')} | {c(f, 'full', '{:,.0f}x')} | {c(rr, 'ms5', '{:.2f}x')} | "
                     f"{c(rr, 'full', '{:.2f}x')} |")
    return "\n".join(L)


def plot(out: dict, figdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    paths = []
    Ms = [r["M"] for r in out["runs"]]
    keys = [k for k in out["runs"][0]["size"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys:
        ax.plot(Ms, [r["size"][k]["imagenet_bytes"] for r in out["runs"]], "o-" if k.startswith("fkdstore") else "x--",
                label=_name(k))
    for b in TABLE2.values():
        ax.scatter([200], [b], marker="*", s=60, color="k", zorder=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(Ms, [str(x) for x in Ms])
    ax.set_xlabel("M stored crops per image")
    ax.set_ylabel("bytes on disk, extrapolated to ImageNet-1K")
    ax.set_title("Label storage (stars: paper Table 2 at M = 200)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(figdir / "formats_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "random_images_per_s", "random single-image read + decode (img/s)"),
                              (axes[1], "epoch_images_per_s", "one epoch's labels read (img/s)")):
        ks = list(out["runs"][0]["speed"][metric])
        w = 0.8 / len(ks)
        for j, k in enumerate(ks):
            ax.bar(np.arange(len(Ms)) + j * w, [r["speed"][metric][k] for r in out["runs"]], w, label=_name(k))
        ax.set_xticks(np.arange(len(Ms)) + 0.4 - w / 2, [f"M={x}" for x in Ms])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(figdir / "formats_speed.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


if __name__ == "__main__":
    main()
