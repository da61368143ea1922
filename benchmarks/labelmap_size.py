"""Label maps: fkdstore's size per image and at ImageNet-1K scale against ReLabel's published files (10-12 GB).

Writes ReLabel's layout (one ``torch.save`` per image of a ``[2, K, S, S]`` tensor: top-K scores and class ids
as floats; K = 5, S = 15, C = 1000) for ``--images`` synthetic teacher-like maps
(:func:`fkdstore.report_maps.teacher_like_maps`: a true class and confusable classes over an object blob,
spatially smooth tails), in float32 (ReLabel) and float16 (TokenLabeling), imports them with
``fkdstore import relabel`` and measures both sides; then extrapolates each to ImageNet-1K (1,281,167 images)
and sets them next to the paper's Table 2 (ReLabel top-5 "10 GB", full "~1 TB") and fkdstore's estimate
(``fkdstore estimate --label-map 15,5``). The ``map/scores`` array dominates a store and does not compress
(raw float scores); ``map/indices`` compresses by how much a cell's top-K classes repeat its neighbours', which
a real teacher decides: the synthetic maps are a model of it (see report_maps.teacher_like_maps).

    python benchmarks/labelmap_size.py [--images 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fkdstore import report_maps  # noqa: E402
from fkdstore.importers import import_relabel  # noqa: E402
from fkdstore.labelmap import LabelMapSpec  # noqa: E402
from fkdstore.report import IMAGENET_1K_IMAGES, human_bytes, storage_stats  # noqa: E402

C, K, S = 1000, 5, 15


def relabel_tree(root: Path, n: int, dtype: str, rng) -> tuple[Path, Path, int]:
    """``n`` images ``<synset>/<stem>.JPEG`` and their ReLabel files; returns (images, maps, bytes of the maps)."""
    imgs, maps = root / "train", root / "maps"
    labels = rng.integers(0, C, n)
    idx, sc = report_maps.teacher_like_maps(rng, n, S, K, C, labels)
    total = 0
    for i in range(n):
        syn, stem = f"n{labels[i]:08d}", f"n{labels[i]:08d}_{i}"
        (imgs / syn).mkdir(parents=True, exist_ok=True)
        (maps / syn).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (int(rng.integers(300, 500)), int(rng.integers(300, 500)))).save(imgs / syn / f"{stem}.JPEG")
        t = torch.from_numpy(np.stack([sc[i], idx[i].astype(np.float32)])).to(getattr(torch, dtype))
        torch.save(t, maps / syn / f"{stem}.pt")
        total += os.path.getsize(maps / syn / f"{stem}.pt")
    return imgs, maps, total


def measure(n: int, dtype: str, system: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="fkd-lm-size-") as td:
        imgs, maps, src_bytes = relabel_tree(Path(td), n, dtype, rng)
        t = time.perf_counter()
        r = import_relabel(maps, Path(td) / "s.zarr", imgs, system=system, progress=False)
        secs = time.perf_counter() - t
        st = storage_stats(Path(td) / "s.zarr")
        per_image = {name: st[name]["bytes"] / n for name in ("map/indices", "map/scores")}
        rest = st["_total"]["bytes"] - sum(st[name]["bytes"] for name in ("map/indices", "map/scores"))
    maps_per_image = sum(per_image.values())
    est = report_maps.estimate_map_bytes(IMAGENET_1K_IMAGES, C, LabelMapSpec(size=S, k=K, dtype=dtype, box_order="xy"))
    return {"system": system, "dtype": dtype, "images": n, "source_bytes_per_image": src_bytes / n,
            "store_bytes_per_image": r["bytes_after"] / n, "map_bytes_per_image": maps_per_image,
            "indices_bytes_per_image": per_image["map/indices"], "scores_bytes_per_image": per_image["map/scores"],
            "other_bytes": rest, "import_s": secs,
            "imagenet_source_bytes": src_bytes / n * IMAGENET_1K_IMAGES,
            "imagenet_store_bytes": maps_per_image * IMAGENET_1K_IMAGES + est["arrays"]["key"]
            + est["arrays"]["per-image"] + est["arrays"]["manifest"], "imagenet_estimate_bytes": est["bytes"]}


def to_markdown(res: dict) -> str:
    p = res["paper"]
    L = [f"ReLabel's layout (one `torch.save` per image, [2, {K}, {S}, {S}]) for {res['rows'][0]['images']} synthetic "
         f"teacher-like maps (C = {C}), imported with `fkdstore import relabel`; ImageNet-1K = "
         f"{IMAGENET_1K_IMAGES:,} images. A `.pt` file of this shape is {res['pt_file_bytes']['float32']:,} B in "
         f"float32 and {res['pt_file_bytes']['float16']:,} B in float16 (torch {torch.__version__}).\n",
         "| maps | source B/image | fkdstore B/image (ids + scores) | ratio | ImageNet-1K source "
         "| ImageNet-1K fkdstore (measured per image) | `estimate --label-map` |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        L.append(f"| {r['system']} {r['dtype']} | {r['source_bytes_per_image']:,.0f} | {r['map_bytes_per_image']:,.0f} "
                 f"({r['indices_bytes_per_image']:,.0f} + {r['scores_bytes_per_image']:,.0f}) | "
                 f"{r['source_bytes_per_image'] / r['map_bytes_per_image']:.2f}x "
                 f"| {human_bytes(r['imagenet_source_bytes'])} "
                 f"| {human_bytes(r['imagenet_store_bytes'])} | {human_bytes(r['imagenet_estimate_bytes'])} |")
    L.append(f"\nThe paper's Table 2 for ReLabel at 1.2M images: top-5 maps {p['printed_top5']} (its formula N x 15 "
             f"x 15 x 10 x 4 B = {human_bytes(p['top5_bytes'])}), full maps {p['printed_full']} (N x 15 x 15 x 1000 "
             f"x 4 B = "
             f"{p['full_bytes'] / 1e12:.2f} TB); ReLabel's download is about 12 GB. fkdstore holds the same top-5 maps "
             "in the sizes above: uint16 class ids instead of float32 ones, compressed (the ids repeat across "
             "neighbouring cells; the raw float scores do not compress), with every image bound by key and "
             "checksummed. float16 scores (TokenLabeling's dtype) halve the larger array.")
    return "\n".join(L)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    pt = {}
    for dt in ("float32", "float16"):
        b = io.BytesIO()
        torch.save(torch.zeros(2, K, S, S, dtype=getattr(torch, dt)), b)
        pt[dt] = len(b.getvalue())
    rows = [measure(a.images, "float32", "relabel", a.seed), measure(a.images, "float16", "tokenlabeling", a.seed)]
    res = {"rows": rows, "pt_file_bytes": pt,
           "paper": {"printed_top5": report_maps.PAPER_RELABEL["top-5"],
                     "printed_full": report_maps.PAPER_RELABEL["full"],
                     "top5_bytes": report_maps.paper_map_bytes(1_200_000, S, C, K),
                     "full_bytes": report_maps.paper_map_bytes(1_200_000, S, C)}}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
