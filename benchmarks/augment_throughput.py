"""Replay cost of augmentation records: TorchDataset crops/s with RandAugment and with Mixup / CutMix partners.

Same photo-like JPEGs as ``dataset_profile.py`` (~430x640, q90), same boxes and flips
(:class:`fkdstore.seeded.SlotCropSampler`, stored), same MS top-5 labels (C = 1000), same ``m``, one store per pipeline
of ``augment_size.PIPELINES`` (crop + flip only; RandAugment(2); RandAugment(2) + Mixup; RandAugment(2) +
CutMix) whose ``aug`` columns hold the pipeline's own sampled params (``Pipeline.sample``: what
``fkdstore.generate`` stores). Mixup and CutMix use their default ``p = 1``: every slot is mixed, so every
slot's replay also decodes its partner image and replays the partner's crop and RandAugment (the worst case;
with ``p`` < 1 the extra cost scales with the mixed share).

Timed: ``fkdstore.collate(ds.__getitems__(items))`` in this process (no DataLoader workers, torch single-threaded),
float32 output, ``--crops`` crops per run in batches of ``--crops-per-batch``; the datasets' runs are
interleaved and the median of ``--runs`` is reported, as crops per wall second and crops per process
CPU-second (steadier on a shared machine), each with its ratio against the crop + flip only store.

``--baseline REV_OR_DIR``: also time the TorchDataset of another version on the crop + flip only store, in the
same process and interleaved with the others: ``REV`` is a git revision of this repository (its ``fkdstore``
package is exported with ``git archive``), ``DIR`` a checkout (e.g. a ``git worktree``). That package is imported
under the name ``fkdstore_baseline`` (its absolute ``fkdstore`` imports rewritten), so both versions run side by
side; the ratio current / baseline shows whether the no-augmentation path got slower. The baseline must read
the stores this version writes (format 4.0: fkdstore 0.3 or later).

    python benchmarks/augment_throughput.py [--images 48 --slots 16 --m 4 --crops 256 --runs 3] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from augment_size import PIPELINES  # noqa: E402
from dataset_profile import make_photos  # noqa: E402

import fkdstore  # noqa: E402
from fkdstore import augment as A  # noqa: E402
from fkdstore.images import list_images, load_image  # noqa: E402
from fkdstore.seeded import SlotCropSampler  # noqa: E402
from fkdstore.transforms import Replay  # noqa: E402

BASE_ROW = "crop+flip only"
BASELINE_MODULE = "fkdstore_baseline"


def make_store(path: Path, folder: Path, M: int, spec: str, size: int, C: int = 1000, k: int = 5) -> Path:
    """A store over ``folder`` with the crop sampler's boxes/flips, MS top-k labels and ``spec``'s sampled params.

    Boxes, flips and labels depend on the image only (same seeds for every spec), so stores differ in their
    ``aug`` columns alone."""
    pipe = A.parse_augment(spec)
    lst = list_images(folder)
    N = len(lst)
    sizes = np.array([list(reversed(load_image(p).size)) for p in lst.paths])
    rng, sampler = np.random.default_rng(0), SlotCropSampler(seed=0)
    w = fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec={"name": "ms", "k": k},
                       image_keys=lst.keys, image_sizes=sizes, labels=lst.labels,
                       aug=[c.to_json() for c in pipe.columns()], augment=pipe.get_config(),
                       replay=Replay(input_size=size, interpolation="bilinear"))
    with w:
        idx = np.arange(N)
        bf = [sampler.sample(int(i), *sizes[i], M) for i in idx]
        probs = np.sort(rng.dirichlet(np.ones(k), (N, M)) * 0.9, -1)[..., ::-1].astype(np.float16)
        fields = {"indices": np.argsort(rng.random((N, M, C)), -1)[..., :k].astype(np.uint16),  # distinct top-k
                  "probs": np.ascontiguousarray(probs)}
        aug = None
        if len(pipe):
            per = [pipe.sample(0, int(i), np.arange(M), image_size=(size, size), num_images=N, crops_per_image=M)
                   for i in idx]
            aug = {c.name: np.stack([p[c.name] for p in per]) for c in pipe.columns()}
        w.put_fields(idx, np.stack([b for b, _ in bf]), np.stack([f for _, f in bf]), fields, aug=aug)
    return path


def import_baseline(source: str, tmp: Path, repo: Path = HERE.parent):
    """The ``fkdstore`` package of ``source`` (a directory holding ``fkdstore/``, or a git revision of ``repo``)
    imported as :data:`BASELINE_MODULE`, with its absolute ``fkdstore`` imports rewritten to that name.
    Returns ``(module, description)``."""
    dst = tmp / "baseline_src"
    dst.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    if (src / "fkdstore" / "__init__.py").is_file():
        shutil.copytree(src / "fkdstore", dst / BASELINE_MODULE, ignore=shutil.ignore_patterns("__pycache__"))
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        desc = f"{src} ({rev or 'not a git checkout'})"
    else:
        archive = subprocess.run(["git", "-C", str(repo), "archive", source, "fkdstore"], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"--baseline must be a directory holding fkdstore/ or a git revision of {repo}. "
                             f"Got {source!r}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)
        (dst / "fkdstore").rename(dst / BASELINE_MODULE)
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", source], capture_output=True,
                             text=True).stdout.strip()
        desc = f"git revision {source} ({rev})"
    pattern = re.compile(r"\b(from|import)\s+fkdstore(?=[\s.])")
    for py in (dst / BASELINE_MODULE).rglob("*.py"):
        text = py.read_text()
        py.write_text(pattern.sub(lambda mt: f"{mt.group(1)} {BASELINE_MODULE}", text))
    sys.path.insert(0, str(dst))
    try:
        importlib.import_module(BASELINE_MODULE)
        return importlib.import_module(f"{BASELINE_MODULE}.pytorch"), desc
    finally:
        sys.path.remove(str(dst))


def run_once(ds, collate, batches) -> tuple[float, float, int]:
    """(wall s, process CPU s, crops) of ``collate(ds.__getitems__(b))`` over ``batches``."""
    n = 0
    t, c = time.perf_counter(), time.process_time()
    for items in batches:
        n += len(collate(ds.__getitems__(items))["crops"])
    return time.perf_counter() - t, time.process_time() - c, n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48, help="photo-like JPEGs to synthesise")
    p.add_argument("--slots", type=int, default=16, help="M stored crops per image")
    p.add_argument("--m", type=int, default=4, help="crops per image per item")
    p.add_argument("--output-size", type=int, default=224)
    p.add_argument("--crops", type=int, default=256, help="crops per timed run")
    p.add_argument("--crops-per-batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="interleaved timed runs per dataset; the median is reported")
    p.add_argument("--baseline", default=None,
                   help="git revision or checkout directory whose TorchDataset is timed on the crop+flip store too")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    for name in ("images", "slots", "m", "output_size", "crops", "crops_per_batch", "runs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1. Got {getattr(a, name)}.")
    if a.m > a.slots:
        p.error(f"--m must be <= --slots ({a.slots}). Got {a.m}.")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fkd_augtp_"))
    try:
        folder = make_photos(tmp / "photos", a.images)
        size = a.output_size
        sets, collates = {}, {}
        for name, spec in PIPELINES.items():
            store = make_store(tmp / f"s{len(sets)}.fkd", folder, a.slots, spec, size)
            sets[name] = fkdstore.TorchDataset(store, folder, crops_per_sample=a.m, output_size=size, epoch=1)
            collates[name] = fkdstore.collate
        baseline = None
        if a.baseline:
            old, baseline = import_baseline(a.baseline, tmp)
            key = f"{BASE_ROW}, baseline TorchDataset"
            sets[key] = old.TorchDataset(tmp / "s0.fkd", folder, crops_per_sample=a.m, output_size=size, epoch=1)
            collates[key] = old.collate
            # same crops and labels from both versions, or the comparison means nothing
            got_old = old.collate(sets[key].__getitems__([0, 1]))
            got_new = fkdstore.collate(sets[BASE_ROW].__getitems__([0, 1]))
            if not (torch.equal(got_old["crops"], got_new["crops"])
                    and torch.equal(got_old["soft_labels"], got_new["soft_labels"])):
                raise SystemExit(f"the baseline's TorchDataset ({baseline}) replays other crops or labels than this "
                                 "one")
            leaked = sorted(m for m, mod in sys.modules.items() if m.startswith(BASELINE_MODULE)
                            and getattr(mod, "__file__", None) and not mod.__file__.startswith(str(tmp)))
            if leaked:
                raise SystemExit(f"baseline modules loaded from outside its copy: {leaked}")
        B = max(1, a.crops_per_batch // a.m)
        n_items = max(1, a.crops // a.m)
        order = np.random.default_rng(1).permutation(np.resize(np.arange(a.images), n_items)).tolist()
        batches = [order[s:s + B] for s in range(0, n_items, B)]
        for name, ds in sets.items():  # warm: page cache, chunk caches, first-touch allocations
            run_once(ds, collates[name], batches[:1])
        wall = {k: [] for k in sets}
        cpu = {k: [] for k in sets}
        load0 = os.getloadavg()
        for r in range(a.runs):  # interleaved, alternating direction, so drift in the machine's load hits all alike
            for name in list(sets)[::(-1) ** r]:
                ds = sets[name]
                w, c, n = run_once(ds, collates[name], batches)
                wall[name].append(n / w)
                cpu[name].append(n / c)
        args = argv if argv is not None else sys.argv[1:]
        res = {"command": "python benchmarks/augment_throughput.py " + " ".join(args),
               "images": a.images, "slots": a.slots, "m": a.m, "output_size": size, "crops": n_items * a.m,
               "crops_per_batch": B * a.m, "runs": a.runs, "baseline": baseline, "load_at_start": load0,
               "load_at_end": os.getloadavg(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "rows": []}
        base_w, base_c = statistics.median(wall[BASE_ROW]), statistics.median(cpu[BASE_ROW])
        for name in sets:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            res["rows"].append({"store": name, "spec": PIPELINES.get(name, ""), "crops_per_s": round(w, 1),
                                "ratio": round(w / base_w, 3), "crops_per_cpu_s": round(c, 1),
                                "cpu_ratio": round(c / base_c, 3),
                                "crops_per_s_runs": [round(x, 1) for x in wall[name]],
                                "crops_per_cpu_s_runs": [round(x, 1) for x in cpu[name]]})
        if baseline:
            key = f"{BASE_ROW}, baseline TorchDataset"
            res["current_over_baseline"] = {
                "wall": round(base_w / statistics.median(wall[key]), 3),
                "cpu": round(base_c / statistics.median(cpu[key]), 3),
                "cpu_runs": [round(x / y, 3) for x, y in zip(cpu[BASE_ROW], cpu[key])]}
        print(to_markdown(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_markdown(res: dict) -> str:
    L = [f"{res['images']} photo-like JPEGs (~430x640, q90), M = {res['slots']}, m = {res['m']}, "
         f"{res['output_size']} px float32 crops, MS top-5 C = 1000; `__getitems__` + `collate` in-process, "
         f"{res['crops_per_batch']} crops per batch, {res['crops']} crops per run, median of {res['runs']} "
         f"interleaved runs (alternating order); load average "
         f"{', '.join(f'{x:.1f}' for x in res['load_at_start'])} at start, "
         f"{', '.join(f'{x:.1f}' for x in res['load_at_end'])} at end ({res['cpus']} CPUs). Mixup/CutMix at p = 1: "
         "every slot decodes a partner image.", "",
         "| store | crops/s | vs crop+flip | crops per CPU-s | vs crop+flip | runs (crops per CPU-s) |",
         "|---|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        L.append(f"| {r['store']} | {r['crops_per_s']:.0f} | {r['ratio']:.2f}x | {r['crops_per_cpu_s']:.0f} | "
                 f"{r['cpu_ratio']:.2f}x | {', '.join(f'{x:.0f}' for x in r['crops_per_cpu_s_runs'])} |")
    if res.get("baseline"):
        c = res["current_over_baseline"]
        L += ["", f"No-augmentation path, this TorchDataset / the baseline's ({res['baseline']}) on the same store: "
                  f"{c['cpu']:.3f}x crops per CPU-second (runs {', '.join(f'{x:.3f}' for x in c['cpu_runs'])}), "
                  f"{c['wall']:.3f}x crops per wall second (> 1: faster now)."]
    return "\n".join(L)


if __name__ == "__main__":
    main()
