"""Teacher-runner overhead: how much does `fkdstore.generate` add on top of the teacher's own compute?

On the same images and crops it times
  (a) the teacher alone: forward passes over pre-made, pre-normalised crop batches (inference_mode);
  (b) the full pipeline: `fkdstore.generate` into a fresh store (header scan, store creation, decoding and
      cropping in DataLoader workers, normalise, teacher, softmax, codec, shard writes, provenance);
and prints the overhead ratio b / a for a ResNet-18-sized CNN (defined inline; no torchvision), plus the
pipeline's own ceiling in crops/s with an identity-cost teacher (the teacher costs ~nothing, so the time is
decoding + cropping + encoding + writing).

    .venv/bin/python benchmarks/generate_overhead.py            # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/generate_overhead.py --input-size 112 --crops 32 --images 16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fkdstore.images import image_size, list_images, load_image  # noqa: E402
from fkdstore.runner import generate  # noqa: E402
from fkdstore.seeded import SlotCropSampler  # noqa: E402
from fkdstore.testing import make_photo_folder  # noqa: E402
from fkdstore.transforms import normalize, replay_crops  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(num_classes=1000):
    """ResNet-18 layout (11.7M parameters at 1000 classes): stem, 4 stages of 2 basic blocks, linear head."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class IdentityCost(nn.Module):
    """Returns logits at (almost) no cost: a slice of the input pixels."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x.flatten(1)[:, : self.num_classes]


def _cpu() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers are joined at the end)."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def teacher_alone(teacher, root, args) -> tuple[float, float]:
    """Seconds for the teacher's forward passes over the same crops, batched as generate batches them."""
    listing = list_images(root)
    sampler = SlotCropSampler(seed=0)  # generate's default sampler
    crops = []
    for i, p in enumerate(listing.paths):
        H, W = image_size(p)
        boxes, flips = sampler.sample(i, H, W, args.crops)
        crops.append(replay_crops(load_image(p), boxes, flips, args.input_size))
    x = normalize(torch.cat(crops))
    per_group = max(1, args.batch_size // args.crops) * args.crops
    batches = [x[j:j + per_group] for j in range(0, len(x), per_group)]
    teacher.eval()
    with torch.inference_mode():
        teacher(batches[0])  # warm-up
        t, c = time.perf_counter(), _cpu()
        for b in batches:
            for k in range(0, len(b), args.batch_size):
                torch.softmax(teacher(b[k:k + args.batch_size]).float(), -1)
        return time.perf_counter() - t, _cpu() - c


def pipeline(teacher, root, out, args, num_workers) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), _cpu()
    r = generate(teacher, root, out, crops_per_image=args.crops, codec="ms", input_size=args.input_size,
                 num_classes=1000, batch_size=args.batch_size, num_workers=num_workers, progress=False, device="cpu")
    dt, dc = time.perf_counter() - t, _cpu() - c
    assert r.complete
    return dt, dc


def _fmt(xs):
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="photo tiles (real photographs, 2 classes)")
    ap.add_argument("--crops", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=None, help="default: generate's (min(8, cpus - 1))")
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    args = ap.parse_args(argv)
    workers = args.num_workers if args.num_workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))

    tmp = Path(tempfile.mkdtemp(prefix="fkd_gen_bench_"))
    try:
        root = make_photo_folder(tmp / "photos", tiles=args.images // 2, size=200)
        n_crops = args.images * args.crops
        print(f"{args.images} photos, {args.crops} crops/image = {n_crops} crops at {args.input_size}px, "
              f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
              f"workers {workers}")
        net = resnet18()
        a_runs, b_runs = [], []
        for _ in range(args.repeats):  # interleaved, best of N: the machine is shared
            a_runs.append(teacher_alone(net, root, args))
            b_runs.append(pipeline(net, root, tmp / "store", args, workers))
        a, b = min(x[0] for x in a_runs), min(x[0] for x in b_runs)
        a_cpu, b_cpu = min(x[1] for x in a_runs), min(x[1] for x in b_runs)
        t = time.perf_counter()  # fixed costs: a rerun over the complete store labels nothing
        generate(net, root, tmp / "store", crops_per_image=args.crops, codec="ms", input_size=args.input_size,
                 num_classes=1000, batch_size=args.batch_size, num_workers=workers, progress=False, device="cpu")
        fixed = time.perf_counter() - t
        print(f"(a) ResNet-18 teacher alone : {a:7.2f} s wall {a_cpu:7.2f} s CPU  {n_crops / a:6.0f} crops/s  "
              f"wall runs {_fmt([x[0] for x in a_runs])}")
        print(f"(b) full generate pipeline  : {b:7.2f} s wall {b_cpu:7.2f} s CPU  {n_crops / b:6.0f} crops/s  "
              f"wall runs {_fmt([x[0] for x in b_runs])}")
        print(f"overhead ratio b/a          : {b / a:7.3f} wall, {b_cpu / a_cpu:.3f} CPU time")
        print(f"fixed cost per call (rerun of the complete store: listing, schema check, teacher hash, probe): "
              f"{fixed:.2f} s")
        for w in sorted({0, workers}):
            c = min(pipeline(IdentityCost(), root, tmp / "store", args, w)[0] for _ in range(args.repeats))
            print(f"identity-cost teacher, {w} workers: {c:7.2f} s  {n_crops / c:8.0f} crops/s "
                  f"({args.images / c:.1f} images/s)")
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
