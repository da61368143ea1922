"""The main job, end to end, on real images that ship with scikit-learn (offline, ~2 minutes on 2 cores):

1. build an image folder from scikit-learn's digits (upscaled to 16 px, tinted RGB), train/test split;
2. train a wide teacher CNN (``tiny_cnn(width=48)``, ~97 % on the held-out digits);
3. generate a label store with the teacher-runner (``fkdstore.generate``: M random-resized crops per image,
   their boxes and flips, and the teacher's Marginal Smoothing top-3 soft labels);
4. generate ReLabel's label maps from the same teacher (``fkdstore.generate(..., label_map=...)``: its
   classifier applied as a 1x1 conv over its last feature map of every whole image, the top-3 classes of
   every cell stored);
5. train a narrow student (``tiny_cnn(width=4)``) four ways on the same crop budget (E crops of every
   image, 64 crops per step, same optimiser, schedule and seed):
   - hard labels: a fresh random-resized crop per image per epoch, ground-truth class;
   - vanilla KD: the same crops, the teacher run on every crop at every step (online soft labels);
   - ReLabel: a fresh random-resized crop per image per epoch, its soft label pooled from the image's label
     map (RoIAlign + softmax) by ``fkdstore.TorchDataset``;
   - FKD: the stored crops and labels replayed with ``fkdstore.TorchDataset`` (m crops of each loaded image
     per step, E/m passes, cosine learning rate stepped per pass: the paper's serrated schedule);
6. print accuracies and training times side by side (label generation reported separately), then
   ``fkdstore inspect`` and ``fkdstore verify`` of the store, and write ``OUT/sheet.png``: a contact sheet of
   replayed crops with their soft labels (``fkdstore show``; ``docs/demo-sheet.png`` is one).

    python examples/demo.py [--out demo-out] [--seed 0] [--epochs 32] [--m 2]

Threads: torch runs single-threaded (see ``fkdstore.testing.limit_threads``) and no DataLoader workers are
used. The models are tiny, so a second thread gains ~20 % on a quiet 2-core machine, but thread pools on
cores shared with other jobs stall at every parallel region (the demo once took 22 minutes that way); one
thread also keeps every result bit-identical from the seed. ``--threads`` overrides it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import fkdstore
from fkdstore import cli
from fkdstore.images import list_images
from fkdstore.labelmap import LabelMapSpec
from fkdstore.labelmap_torch import class_map_shape, spatial_teacher
from fkdstore.report import storage_stats
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import (
    RandomCropDataset,
    accuracy,
    limit_threads,
    load_eval_folder,
    make_digits_folder,
    tiny_cnn,
    train_classifier,
)

SIZE = 16  # the digits are 8x8: 16 px keeps every stroke and costs a quarter of 32 px
# Random-resized-crop area range, close to ImageNet's (0.08, 1): many crops hold only part of a digit, so
# their ground-truth class is partly wrong for them; the teacher's label of each crop says what is visible
# (the region-level labels FKD stores). At (0.25, 1) crops keep the whole digit and the students tie.
SCALE = (0.1, 1.0)
CROPS_PER_STEP = 64
# ReLabel ran its teacher on whole images at the resolution the teacher was trained at (475 px, a 15 x 15 map);
# here the teacher's own 16 px give a 4 x 4 map (at 32 px its cells see too little of a digit: worse labels)
MAP_INPUT = SIZE
LR = 0.1
TEACHER_WIDTH, STUDENT_WIDTH = 48, 4


def random_crop_batches(train_dir, seed, epochs):
    """Conventional loader: a fresh random-resized crop + flip of every image per epoch (hard / vanilla KD)."""
    ds = RandomCropDataset(train_dir, SIZE, SCALE, seed=seed + 1_000_000, epochs=epochs)  # never the store's crops
    g = torch.Generator()

    def batches(p):
        ds.epoch = p
        g.manual_seed(seed * 7919 + p)
        yield from torch.utils.data.DataLoader(ds, batch_size=CROPS_PER_STEP, shuffle=True, generator=g, num_workers=0)
    return batches


def fkd_batches(store_path, train_dir, m, seed):
    """FKD loader: ``fkdstore.TorchDataset`` replays m stored crops of each loaded image with their soft labels;
    ``set_epoch`` picks fresh stored slots every pass."""
    ds = fkdstore.TorchDataset(store_path, train_dir, crops_per_sample=m, normalize=False, seed=seed)
    g = torch.Generator()
    loader = torch.utils.data.DataLoader(ds, batch_size=CROPS_PER_STEP // m, shuffle=True, generator=g,
                                         num_workers=0, collate_fn=fkdstore.collate)

    def batches(p):
        ds.set_epoch(p)
        g.manual_seed(seed * 7919 + p)
        for b in loader:  # crops [B*m, 3, H, W] uint8, soft_labels [B*m, C]
            yield b["crops"], b
    return batches


def relabel_batches(maps_path, train_dir, seed, epochs):
    """ReLabel loader: ``fkdstore.TorchDataset`` over the label-map store: a fresh random-resized crop + flip of
    every image per epoch (its own seed: not the store's crops), its soft label pooled from the image's map."""
    ds = fkdstore.TorchDataset(maps_path, train_dir, crops_per_sample=1, normalize=False, output_size=SIZE,
                               crop_sampler=SlotCropSampler(scale=SCALE, seed=seed + 2_000_000))
    g = torch.Generator()
    loader = torch.utils.data.DataLoader(ds, batch_size=CROPS_PER_STEP, shuffle=True, generator=g, num_workers=0,
                                         collate_fn=fkdstore.collate)

    def batches(p):
        ds.set_epoch(p)
        g.manual_seed(seed * 7919 + p)
        for b in loader:  # crops [B, 3, H, W] uint8, soft_labels [B, C] pooled from the maps
            yield b["crops"], b
    return batches


def phase(n, total, text):
    print(f"[{n}/{total}] {text}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="work folder (recreated)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the students, their crops and the FKD slots")
    ap.add_argument("--epochs", type=int, default=32, help="E: crops seen per image by every student")
    ap.add_argument("--m", type=int, default=2, help="FKD: crops per loaded image per step (E/m passes)")
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    a = ap.parse_args(argv)
    if a.epochs % a.m:
        ap.error(f"--epochs must be a multiple of --m. Got --epochs {a.epochs} --m {a.m}.")
    limit_threads(a.threads)
    t_start = time.perf_counter()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    E, m, M = a.epochs, a.m, a.epochs  # M = E stored crops: every stored crop is seen once
    steps = 9

    phase(1, steps, "image folders from scikit-learn's digits")
    train_dir = make_digits_folder(out / "images" / "train", size=SIZE, split="train", seed=0)
    test_dir = make_digits_folder(out / "images" / "test", size=SIZE, split="test", seed=0)
    x_test, y_test = load_eval_folder(test_dir, SIZE)
    n_train = len(list_images(train_dir))
    print(f"      {n_train} train / {len(y_test)} test digits, {SIZE} px, in {out / 'images'}", flush=True)

    phase(2, steps, f"teacher tiny_cnn(width={TEACHER_WIDTH}), {a.teacher_epochs} epochs of hard-label random crops")
    teacher = tiny_cnn(10, width=TEACHER_WIDTH, seed=1000)  # the teacher is fixed: --seed varies the students
    t_teacher, _ = train_classifier(teacher, random_crop_batches(train_dir, 1000, a.teacher_epochs), a.teacher_epochs,
                                    LR, lambda x, y: y, progress="teacher")
    acc_teacher = accuracy(teacher, x_test, y_test)
    print(f"      held-out accuracy {acc_teacher:.1%} ({t_teacher:.0f} s)", flush=True)

    phase(3, steps, f"label store: fkdstore.generate, M = {M} crops per image, MS top-3")
    store_path = out / "labels.zarr"
    t, c = time.perf_counter(), time.process_time()
    fkdstore.generate(teacher, train_dir, store_path, crops_per_image=M, codec=fkdstore.get_codec("ms", k=3),
                      input_size=SIZE, crop_sampler=SlotCropSampler(seed=0, scale=SCALE), batch_size=512,
                      num_workers=0, progress=None, teacher_name=f"tiny_cnn(width={TEACHER_WIDTH})")
    t_gen, c_gen = time.perf_counter() - t, time.process_time() - c

    spatial = spatial_teacher(teacher)  # the classifier as a 1x1 conv over the last feature map
    S = class_map_shape(spatial, MAP_INPUT)[1]
    phase(4, steps, f"label maps (ReLabel): fkdstore.generate(label_map=...), whole images at {MAP_INPUT} px, "
                    f"{S} x {S} cells, top-3")
    maps_path = out / "maps.zarr"
    t, c = time.perf_counter(), time.process_time()
    fkdstore.generate(spatial, train_dir, maps_path, label_map=LabelMapSpec(size=S, k=3, box_order="xy", flip=True),
                      input_size=MAP_INPUT, batch_size=512, num_workers=0, progress=None,
                      teacher_name=f"tiny_cnn(width={TEACHER_WIDTH}) as 1x1 conv")
    t_map, c_map = time.perf_counter() - t, time.process_time() - c

    results = {}

    def student(name, batches, passes, target_fn, n):
        phase(n, steps, f"student tiny_cnn(width={STUDENT_WIDTH}), {name}")
        model = tiny_cnn(10, width=STUDENT_WIDTH, seed=a.seed)
        wall, cpu = train_classifier(model, batches, passes, LR, target_fn, progress=name)
        results[name] = (accuracy(model, x_test, y_test), wall, cpu, passes)
        print(f"      held-out accuracy {results[name][0]:.1%}, training {wall:.1f} s wall, {cpu:.1f} s CPU",
              flush=True)

    @torch.no_grad()
    def teacher_labels(x, _):
        return torch.softmax(teacher(x), -1)

    student("hard labels", random_crop_batches(train_dir, a.seed, E), E, lambda x, y: y, 5)
    student("vanilla KD", random_crop_batches(train_dir, a.seed, E), E, teacher_labels, 6)
    student("ReLabel", relabel_batches(maps_path, train_dir, a.seed, E), E, lambda x, b: b["soft_labels"], 7)
    student(f"FKD, m={m}", fkd_batches(store_path, train_dir, m, a.seed), E // m, lambda x, b: b["soft_labels"], 8)

    kd_cpu = results["vanilla KD"][2]
    print(f"\n== held-out digits ({len(y_test)} images), seed {a.seed}, every student sees E = {E} crops per image, "
          f"{CROPS_PER_STEP} crops per step ==")
    print(f"{'model':44s} {'accuracy':>8s} {'train wall s':>12s} {'train CPU s':>11s} {'CPU vs KD':>9s} {'passes':>6s}")
    print(f"{f'teacher tiny_cnn(width={TEACHER_WIDTH})':44s} {acc_teacher:8.1%} {t_teacher:12.1f} {'':>11s} {'':>9s} "
          f"{a.teacher_epochs:6d}")
    for name, (acc, wall, cpu, passes) in results.items():
        label = f"student tiny_cnn(width={STUDENT_WIDTH}), {name}"
        print(f"{label:44s} {acc:8.1%} {wall:12.1f} {cpu:11.1f} {cpu / kd_cpu:8.2f}x {passes:6d}")
    sizes = {name: storage_stats(p)["_total"]["bytes"] for name, p in (("fkd", store_path), ("maps", maps_path))}
    print(f"{'FKD label generation (once, fkdstore.generate)':44s} {'':>8s} {t_gen:12.1f} {c_gen:11.1f}   "
          f"store {sizes['fkd'] / 1e3:,.0f} KB")
    print(f"{'ReLabel map generation (once)':44s} {'':>8s} {t_map:12.1f} {c_map:11.1f}   "
          f"store {sizes['maps'] / 1e3:,.0f} KB")
    acc_hard, acc_fkd = results["hard labels"][0], results[f"FKD, m={m}"][0]
    acc_rel, rel_cpu = results["ReLabel"][0], results["ReLabel"][2]
    fkd_cpu, fkd_wall = results[f"FKD, m={m}"][2], results[f"FKD, m={m}"][1]
    print(f"FKD vs hard labels: {100 * (acc_fkd - acc_hard):+.1f} points; FKD training time {fkd_cpu / kd_cpu:.2f}x "
          f"of vanilla KD's CPU time ({fkd_wall / results['vanilla KD'][1]:.2f}x wall; "
          f"{(fkd_cpu + c_gen) / kd_cpu:.2f}x CPU counting the one-off generation).")
    better = "FKD" if acc_fkd > acc_rel else "ReLabel" if acc_rel > acc_fkd else "neither"
    print(f"FKD vs ReLabel: {100 * (acc_fkd - acc_rel):+.1f} points ({better} ahead on this seed); FKD training time "
          f"{fkd_cpu / rel_cpu:.2f}x ReLabel's CPU time (ReLabel loads an image per crop, E passes, and pools the "
          f"crop's label from the image's map; FKD loads each image once for m = {m} stored crops).")
    print("One seed: benchmarks/reproduce.py runs the same comparison over 3 seeds (mean ± std).")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Demo wall time {time.perf_counter() - t_start:.0f} s, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load}.")

    phase(9, steps, "fkdstore inspect / verify / show")
    print("\n== fkdstore inspect ==", flush=True)
    cli.main(["inspect", str(store_path)])
    print("\n== fkdstore verify ==", flush=True)
    sys.stdout.flush()
    rc = cli.main(["verify", str(store_path)])
    print("\n== fkdstore show ==", flush=True)
    cli.main(["show", str(store_path), "--images", str(train_dir), "--grid", "2x4", "--out", str(out / "sheet.png")])
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
