"""Size after import against the source files, per label zoo (ml-dr, TinyViT, SRe2L, LPQLD).

Writes each zoo's files in its own layout with realistic shapes (ml-dr: NS = 100 records of top-5
probabilities per image, with and without RandAugment + Mixup/CutMix params; TinyViT: top-10 records per
epoch and rank; SRe2L: full float16 logits of C = 1000 per crop with a CutMix batch; LPQLD: top-10 float16
logits + int16 indices), imports them with :mod:`fkdstore.importers`, and prints a markdown table: source
files and bytes, store files and bytes, bytes per crop of both, and the largest difference between the
labels the store decodes and the labels the zoo's own loader builds (on every imported crop, at T = 1 and,
for logits, at the source's training temperature).

    python benchmarks/import_sizes.py [--images 256] [--json FILE]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import fkdstore  # noqa: E402
from fkdstore.importers import import_mldr, import_sre2l, import_tinyvit  # noqa: E402
from fkdstore.report import storage_stats  # noqa: E402

C = 1000


def images_folder(root: Path, n: int, rng) -> list[tuple[int, int]]:
    """``n`` small JPEGs in one class folder (listing order = ImageFolder order); returns their (H, W)."""
    os.makedirs(root / "c0", exist_ok=True)
    sizes = []
    for i in range(n):
        h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
        Image.new("RGB", (w, h), (i % 256, 0, 0)).save(root / "c0" / f"{i:06d}.jpg")
        sizes.append((h, w))
    return sizes


def teacher_logits(rng, n: int) -> np.ndarray:
    """Peaked teacher logits (a dominant class per row), float32 (n, C)."""
    z = rng.normal(0, 1.5, (n, C))
    z[np.arange(n), rng.integers(0, C, n)] += rng.normal(6, 2, n)
    return z.astype(np.float32)


def softmax(z, T=1.0):
    e = np.exp((z - z.max(-1, keepdims=True)) / T)
    return e / e.sum(-1, keepdims=True)


def box(rng, h, w):
    bh, bw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw


# ------------------------------------------------------------------------------------------------ ml-dr
def write_mldr(src: Path, sizes, rng, mixing: bool, ns=100, k=5):
    aug = {"uint8": {}, "random_resized_crop": {"size": 224}, "random_horizontal_flip": {"p": 0.5},
           "to_tensor": {}, "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    if mixing:
        aug |= {"rand_augment": {"p": 1.0}, "random_erase": {"p": 0.25},
                "mixup": {"alpha": 1.0, "div_by": 2.0, "p": 0.5}, "cutmix": {"alpha": 1.0, "p": 0.5}}
    os.makedirs(src, exist_ok=True)
    torch.save({"num_classes": C, "reinforce": {"num_samples": ns, "topk": k, "joblib": False,
                                                "image_augmentation": aug}}, src / "config.pth.tar")
    mags = {1: 0.09, 2: 0.09, 3: 150 / 331 * 224 * 0.3, 4: 150 / 331 * 224 * 0.3, 5: 9.0, 6: 0.27, 7: 0.27, 8: 0.27,
            9: 0.27, 10: 7.0, 11: 178.5}
    truth = []
    for i, (h, w) in enumerate(sizes):
        probs = softmax(teacher_logits(rng, ns)).astype(np.float32)
        recs, labels = [], []
        for r in range(ns):
            own = [box(rng, h, w), bool(rng.random() < 0.5)]
            if mixing:
                ra = [(op, float(np.float32(mags.get(op, 0.0))) * (1 if rng.random() < 0.5 or op > 9 else -1))
                      for op in rng.integers(0, 14, 2).tolist()]
                er = None if rng.random() > 0.25 else (2, 3, 50, 40)
                mix = float(rng.beta(1, 1) / 2) if rng.random() < 0.5 else None
                cut = None
                if rng.random() < 0.5:
                    lam = float(rng.beta(1, 1))
                    c = int(224 * math.sqrt(1 - lam)) // 2
                    cy, cx = int(rng.integers(224)), int(rng.integers(224))
                    cut = [lam] + [np.int64(np.clip(v, 0, 224)) for v in (cy - c, cx - c, cy + c, cx + c)]
                if mix is None and cut is None:
                    params = [None, own[0], own[1], ra, er, None, None]
                else:
                    j = int(rng.integers(0, len(sizes)))
                    pb = box(rng, *sizes[j])
                    params = [j, [own[0], pb], [own[1], False], [ra, None], [er, None], mix, cut]
            else:
                params = own
            ids = np.argpartition(probs[r], -k)[-k:]
            recs.append({"params": params, "prob": (probs[r][ids].tolist(), ids.tolist())})
            dense = np.full(C, (1 - probs[r][ids].astype(np.float64).sum()) / (C - k))
            dense[ids] = probs[r][ids]
            labels.append(dense)
        torch.save((i, recs), src / f"{i}.pth.tar", pickle_protocol=4)
        truth.append(np.stack(labels))
    return truth


# ---------------------------------------------------------------------------------------------- TinyViT
def write_tinyvit(src: Path, n: int, rng, epochs=10, world=8, k=10):
    rec = np.dtype([("seed", "<i4"), ("idx", "<i2", (k,)), ("val", "<f2", (k,))])
    truth = np.zeros((n, epochs, C))
    for e in range(epochs):
        d = src / f"logits_top{k}_epoch{e}"
        os.makedirs(d, exist_ok=True)
        g = torch.Generator()
        g.manual_seed(e)
        order = torch.randperm(n, generator=g)
        total = -(-n // (2 * world)) * 2 * world
        order = torch.cat([order, order[:total - n]])
        for r in range(world):
            seq = order.view(-1, 2)[r::world].flatten().tolist()
            keys, recs = [], []
            p = softmax(teacher_logits(rng, len(seq)))
            for q, i in enumerate(seq):
                if str(i) in keys:
                    continue
                idx = np.argsort(-p[q])[:k]
                val = p[q][idx].astype(np.float16)
                keys.append(str(i))
                recs.append((int(rng.integers(0, 1 << 31)), idx.astype(np.int16), val))
                if not truth[i, e].any():
                    truth[i, e] = (1 - val.astype(np.float64).sum()) / (C - k)
                    truth[i, e, idx] = val
            (d / f"rank{r}-keys.txt").write_text("".join(x + "\n" for x in keys))
            np.array(recs, rec).tofile(d / f"rank{r}-values.bin")
    return truth


# ------------------------------------------------------------------------------------------------ SRe2L
def write_sre2l(src: Path, sizes, rng, epochs=20, B=100, flat_topk=None):
    """SRe2L (epoch_{e}/batch_{b}.tar, full fp16 logits) or, with ``flat_topk``, LPQLD's flat MR-K files."""
    n = len(sizes)
    g = torch.Generator()
    g.manual_seed(42)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)), batch_size=B,
                                         sampler=torch.utils.data.RandomSampler(range(n), generator=g))
    truth, table, counter = {}, {}, 0
    os.makedirs(src, exist_ok=True)
    for e in range(epochs):
        for b, (idx,) in enumerate(loader):
            coords = torch.tensor([[t / sizes[i][0], l / sizes[i][1], h / sizes[i][0], w / sizes[i][1]]
                                   for i in idx.tolist() for t, l, h, w in [box(rng, *sizes[i])]], dtype=torch.float32)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            lam = float(rng.beta(1, 1))
            c = int(224 * math.sqrt(1 - lam)) // 2
            cy, cx = int(rng.integers(224)), int(rng.integers(224))
            bbox = [np.int64(np.clip(v, 0, 224)) for v in (cy - c, cx - c, cy + c, cx + c)]
            z = torch.from_numpy(teacher_logits(rng, len(idx))).half()
            if flat_topk is None:
                os.makedirs(src / f"epoch_{e}", exist_ok=True)
                torch.save([coords, flip, torch.randperm(len(idx)), lam, bbox, z],
                           src / f"epoch_{e}" / f"batch_{b}.tar")
                for r, i in enumerate(idx.tolist()):
                    truth[(i, e)] = z[r].float().numpy()
            else:
                top = torch.topk(z.float(), flat_topk, dim=1)
                torch.save([coords.half(), flip, torch.randperm(len(idx)).to(torch.uint8), lam,
                            [torch.tensor(int(v), dtype=torch.uint8) for v in bbox], top.values.half(),
                            top.indices.short()], src / f"batch_{counter}.tar")
                table[str(counter)] = idx.tolist()
                for r, i in enumerate(idx.tolist()):
                    truth[(i, e)] = (top.indices[r].numpy(), top.values[r].half().float().numpy())
                counter += 1
    if flat_topk is not None:
        (src / "sampler_indices_batch.json").write_text(json.dumps(table))
    return truth


# ------------------------------------------------------------------------------------------------- main
def measure(name, src: Path, dst: Path, n_files: int, crops: int, label_err: float, seconds: float) -> dict:
    src_bytes = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    st = storage_stats(str(dst))["_total"]
    return {"case": name, "crops": crops, "source_files": n_files, "source_bytes": src_bytes,
            "source_b_per_crop": src_bytes / crops, "store_files": st["files"], "store_bytes": st["bytes"],
            "store_b_per_crop": st["bytes"] / crops, "ratio": src_bytes / st["bytes"], "max_label_error": label_err,
            "import_s": seconds}


def label_error(store: Path, want, T: float = 1.0) -> float:
    """Largest |decoded - the loader's label| over every crop; ``want(i, s)`` gives the loader's (C,) label."""
    r = fkdstore.open(store)
    err = 0.0
    for i in range(r.num_images):
        rec = r.read(i, np.arange(r.crops_per_image))
        got = r.codec.decode(rec.fields, C, temperature=T)
        for s in range(r.crops_per_image):
            err = max(err, float(np.abs(got[s] - want(i, s)).max()))
    return err


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="images per zoo (default 256)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    N = args.images
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="import-sizes-"))
    rows = []
    try:
        imgs = tmp / "images"
        sizes = images_folder(imgs, N, rng)
        for mixing in (False, True):
            name = "ml-dr NS=100 top-5, " + ("RRC + RandAugment + erase + Mixup/CutMix" if mixing else "RRC + flip")
            src, dst = tmp / f"mldr{mixing}", tmp / f"mldr{mixing}.fkd"
            truth = write_mldr(src, sizes, rng, mixing)
            t0 = time.perf_counter()
            import_mldr(src, dst, imgs, progress=False)
            dt = time.perf_counter() - t0
            err = label_error(dst, lambda i, s, truth=truth: truth[i][s])
            rows.append(measure(name, src, dst, N + 1, N * 100, err, dt))
        src, dst = tmp / "tinyvit", tmp / "tinyvit.fkd"
        truth_t = write_tinyvit(src, N, rng)
        t0 = time.perf_counter()
        import_tinyvit(src, dst, imgs, num_classes=C, progress=False)
        dt = time.perf_counter() - t0
        rows.append(measure("TinyViT top-10, 10 epochs x 8 ranks (seeds kept)", src, dst, 160, N * 10,
                            label_error(dst, lambda i, s: truth_t[i, s]), dt))
        src = tmp / "sre2l"
        truth_s = write_sre2l(src, sizes, rng)
        for codec, what in ((None, "logits float16, all 1000"), ("logits:k=10,dtype=float16", "logits top-10")):
            dst = tmp / f"sre2l{codec}.fkd"
            t0 = time.perf_counter()
            import_sre2l(src, dst, imgs, codec=codec, progress=False)
            dt = time.perf_counter() - t0
            errs = [label_error(dst, lambda i, s, T=T: softmax(truth_s[(i, s)].astype(np.float64), T), T)
                    for T in (1, 20)]
            rows.append(measure(f"SRe2L C=1000 fp16 logits, CutMix, 20 epochs -> {what} (T=1 / T=20)", src, dst,
                                20 * math.ceil(N / 100), N * 20, max(errs), dt))
            rows[-1]["max_label_error_T"] = errs
        src, dst = tmp / "lpqld", tmp / "lpqld.fkd"
        truth_q = write_sre2l(src, sizes, rng, flat_topk=10)

        def mr(i, s, T):
            idx, z = truth_q[(i, s)]
            out = np.zeros(C)
            out[idx] = softmax(z.astype(np.float64), T)
            return out

        t0 = time.perf_counter()
        import_sre2l(src, dst, imgs, num_classes=C, progress=False)
        dt = time.perf_counter() - t0
        errs = [label_error(dst, lambda i, s, T=T: mr(i, s, T), T) for T in (1, 20)]
        rows.append(measure("LPQLD MR-10 (fp16 top-10 logits + int16 indices), flat, 20 epochs (T=1 / T=20)", src,
                            dst, 20 * math.ceil(N / 100) + 1, N * 20, max(errs), dt))
        rows[-1]["max_label_error_T"] = errs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{N} images per zoo; sizes from `du`-like sums of the files; store default layout and codec")
    print()
    print("| case | crops | source files | source bytes | B/crop | store files | store bytes | B/crop | source/store "
          "| max label diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        err = " / ".join(f"{e:.1e}" for e in r.get("max_label_error_T", [r["max_label_error"]]))
        print(f"| {r['case']} | {r['crops']:,} | {r['source_files']:,} | {r['source_bytes']:,} | "
              f"{r['source_b_per_crop']:.1f} | {r['store_files']} | {r['store_bytes']:,} | {r['store_b_per_crop']:.1f} "
              f"| {r['ratio']:.1f}x | {err} |")
    out = {"images": N, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
