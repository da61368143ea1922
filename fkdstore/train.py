"""Train a student from an fkdstore label store: a drop-in for FKD's ``train_FKD.py`` (``python -m fkdstore.train``).

FKD's command line works as it is, with the store in place of the per-image label files::

    # FKD:      python train_FKD.py -a resnet50 --lr 0.1 --num_crops 4 -b 1024 --cos --temp 1.0 \\
    #               --softlabel_path FKD_soft_label_500_crops_marginal_smoothing_k_5/imagenet /data/imagenet
    python -m fkdstore.train -a resnet50 --lr 0.1 --num_crops 4 -b 1024 --cos --temp 1.0 \\
        --softlabel_path labels.zarr /data/imagenet
    torchrun --nproc_per_node=8 -m fkdstore.train ... (the same options; one process per GPU)

What it does (FKD's recipe; the options keep FKD's names and defaults where FKD has them):

* **Data**: ``DATA/train`` (or ``DATA`` itself when it has no ``train`` folder) replayed by
  :class:`fkdstore.TorchDataset` with ``--num_crops`` (m) stored crops of each loaded image per mini-batch;
  ``-b`` is the number of *crops* per step over all processes (FKD's meaning), so each process loads
  ``ceil(b / m / world_size)`` images per step. Crops leave the DataLoader workers as uint8 with sparse labels;
  :class:`fkdstore.DeviceLoader` normalises them and decodes the labels on the device.
* **Serrated schedule**: one pass over the data counts as m epochs; the learning rate (``--cos`` cosine, else
  steps at ``--schedule`` epochs, FKD's ``adjust_learning_rate``) is set once per pass, at the pass's first
  epoch. The last m epochs run with one crop per image and a learning rate per epoch (FKD's fine-grained end;
  ``--no-final-single-crop`` keeps passes to the end). Slots continue without repeats across the switch:
  pass ``p`` uses positions ``p*m .. p*m + m - 1`` of each image's slot sequence, single-crop epoch ``e``
  position ``e`` (:func:`fkdstore.pytorch.epoch_slots`).
* **Loss**: ``soft_cross_entropy(output / --temp, stored soft label)`` (FKD's ``Soft_CrossEntropy``).
* **Mixup / CutMix** (``--mixup_cutmix``): one of the two per batch on the crops *and* their soft labels
  (:func:`fkdstore.pytorch.mix_batch`, mode ``"switch"``), as FKD's ``mixup_cutmix``: Mixup with probability
  ``--mixup_switch_prob`` (FKD's code: the probability of Mixup), alpha ``--mixup`` / ``--cutmix`` (0 turns
  that method off), any mixing with probability ``--mixup_cutmix_prob``; partners never the crop itself;
  deterministic from ``(--seed, step, rank)``.
* **Distributed**: under ``torchrun`` (``WORLD_SIZE > 1``) a process group is created (``--dist-backend``:
  nccl on CUDA, gloo on CPU), the model is wrapped in DistributedDataParallel and every process reads its
  share of the images (DistributedSampler). FKD's ``--multiprocessing-distributed`` spawning is replaced by
  torchrun.
* **GPU**: autocast (bf16 where supported, else fp16 with a GradScaler) and channels_last when CUDA is present
  (``--no-amp``, ``--no-channels-last``).
* **Checkpoints**: after every pass (and every single-crop epoch) rank 0 writes
  ``--save_checkpoint_path/checkpoint.pth.tar`` atomically (FKD's keys ``epoch``, ``arch``, ``state_dict``,
  ``best_acc1``, ``optimizer``, plus ``step``, ``scaler``, ``rng`` and ``args``; ``state_dict`` without DDP's
  ``module.`` prefix) and ``model_best.pth.tar`` when the validation accuracy improves. ``--resume PATH``
  continues from the saved epoch with the same data order, mixing draws and random state, so a resumed run
  equals an uninterrupted one.
* **Validation**: ``DATA/val`` (or ``--val DIR``) after every pass: resize the shorter side to
  ``size / 0.875``, centre crop, top-1 / top-5 accuracy. ``-e`` evaluates ``--resume``'s weights only.

``--arch`` takes a torchvision model name (when torchvision is installed) or ``module:factory`` (any importable
callable taking ``num_classes``, e.g. ``fkdstore.testing:tiny_cnn``). ``--soft_label_type`` and
``--num_classes`` are optional here (the store knows its codec and class count); when given they are checked
against the store.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from .distributed import World
from .errors import FormatError, ValidationError
from .images import list_images, load_image
from .pytorch import DeviceLoader, TorchDataset, collate, mix_batch, soft_cross_entropy
from .teacher import to_channels_last

__all__ = ["main", "build_parser", "Phase", "phases", "learning_rate", "FKD_LABEL_TYPES"]

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
EVAL_CROP_RATIO = 0.875  # resize to size / 0.875, centre crop size (FKD's 256 -> 224)

# FKD's --soft_label_type names -> the store codec they correspond to (name, k)
FKD_LABEL_TYPES = {
    "ori": ("full", None), "hard": ("hard", None), "smoothing": ("smoothing", None),
    "marginal_smoothing_k5": ("ms", 5), "marginal_smoothing_k10": ("ms", 10),
    "marginal_renorm": ("mr", None), "marginal_renorm_k5": ("mr", 5),
}


class UsageError(ValidationError):
    """A command-line value the training script refuses before it starts (exit code 2)."""


# --------------------------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fkdstore.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a student from an fkdstore label store (FKD's train_FKD.py options).",
        epilog="example: python -m fkdstore.train -a resnet50 --lr 0.1 --num_crops 4 -b 1024 --cos "
               "--softlabel_path labels.zarr /data/imagenet\n(torchrun --nproc_per_node=8 -m fkdstore.train ... "
               "for several GPUs)")
    p.add_argument("data", metavar="DIR", help="image root: DIR/train (or DIR itself) and optionally DIR/val")
    p.add_argument("--softlabel_path", "--softlabel-path", "--store", dest="softlabel_path", required=True,
                   metavar="STORE", help="the fkdstore label store made from the training images (folder or URL)")
    p.add_argument("-a", "--arch", default="resnet50",
                   help="torchvision model name, or module:factory taking num_classes (default resnet50)")
    p.add_argument("-j", "--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="DataLoader workers per process")
    p.add_argument("--epochs", type=int, default=300, metavar="N", help="effective epochs (a pass is m of them)")
    p.add_argument("--start-epoch", type=int, default=0, metavar="N", help="first epoch (a phase start; see --resume)")
    p.add_argument("-b", "--batch-size", type=int, default=1024, metavar="N",
                   help="crops per step over all processes (FKD's meaning); images per step = b / num_crops")
    p.add_argument("--lr", "--learning-rate", type=float, default=0.1, dest="lr", metavar="LR")
    p.add_argument("--schedule", type=int, nargs="*", default=[120, 240], help="epochs where lr drops 10x (no --cos)")
    p.add_argument("--cos", action="store_true", help="cosine learning rate (per pass: the serrated schedule)")
    p.add_argument("--momentum", type=float, default=0.9, metavar="M")
    p.add_argument("--wd", "--weight-decay", type=float, default=1e-4, dest="weight_decay", metavar="W")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd (FKD's CNNs) or adamw (ViTs)")
    p.add_argument("-p", "--print-freq", type=int, default=10, metavar="N", help="log every N steps")
    p.add_argument("--resume", default="", metavar="PATH", help="continue from this checkpoint")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate --resume's weights on the validation set")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order, slots and mixing")
    p.add_argument("--num_crops", "--num-crops", type=int, default=4, dest="num_crops", metavar="M",
                   help="m: crops of each loaded image per mini-batch (1 = standard training)")
    p.add_argument("--temp", type=float, default=1.0, help="temperature on the student's logits")
    p.add_argument("--save_checkpoint_path", "--save-checkpoint-path", default="./FKD_checkpoints_output",
                   dest="save_checkpoint_path", metavar="DIR")
    p.add_argument("--soft_label_type", "--soft-label-type", default=None, dest="soft_label_type",
                   choices=sorted(FKD_LABEL_TYPES), help="optional: checked against the store's codec")
    p.add_argument("--num_classes", "--num-classes", type=int, default=None, dest="num_classes",
                   help="optional: checked against the store's class count")
    p.add_argument("--mixup_cutmix", "--mixup-cutmix", action="store_true", dest="mixup_cutmix",
                   help="Mixup or CutMix on every batch's crops and soft labels")
    p.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha; 0 turns Mixup off")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha; 0 turns CutMix off")
    p.add_argument("--mixup_cutmix_prob", "--mixup-cutmix-prob", type=float, default=1.0, dest="mixup_cutmix_prob",
                   help="probability that a batch is mixed")
    p.add_argument("--mixup_switch_prob", "--mixup-switch-prob", type=float, default=0.5, dest="mixup_switch_prob",
                   help="probability of Mixup when both are on (FKD's code; CutMix otherwise)")
    p.add_argument("--final-single-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="the last num_crops epochs with one crop per image (FKD's fine-grained end; default on)")
    p.add_argument("--val", default=None, metavar="DIR", help="validation folder (default DIR/val when present)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="autocast (default: on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and inputs (default: on CUDA)")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK when CUDA is present, else cpu")
    p.add_argument("--dist-backend", default=None, help="process group backend (default nccl on CUDA, else gloo)")
    p.add_argument("--multiprocessing-distributed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dist-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--gpu", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values that cannot work, naming the option (:class:`UsageError`)."""
    if args.multiprocessing_distributed or args.dist_url or args.world_size or args.rank is not None:
        raise UsageError("--multiprocessing-distributed, --dist-url, --world-size and --rank are replaced by torchrun: "
                         "run 'torchrun --nproc_per_node=N -m fkdstore.train ...' with the other options.")
    for name in ("epochs", "batch_size", "num_crops", "print_freq"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1. Got {getattr(args, name)}.")
    if args.workers < 0 or args.start_epoch < 0 or args.seed < 0:
        raise UsageError(f"--workers, --start-epoch and --seed must be >= 0. Got {args.workers}, {args.start_epoch}, "
                         f"{args.seed}.")
    for name in ("mixup_cutmix_prob", "mixup_switch_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name} must be in [0, 1]. Got {getattr(args, name)}.")
    if args.mixup < 0 or args.cutmix < 0:
        raise UsageError(f"--mixup and --cutmix (alphas) must be >= 0. Got {args.mixup}, {args.cutmix}.")
    if not (math.isfinite(args.temp) and args.temp > 0):
        raise UsageError(f"--temp must be a finite number > 0. Got {args.temp}.")
    if args.evaluate and not args.resume:
        raise UsageError("-e/--evaluate needs --resume PATH (the weights to evaluate).")
    return args


# --------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One loader pass: it starts at effective epoch ``epoch``, replays ``crops`` crops of each image and counts
    as ``crops`` epochs (``crops`` = 1: a single-crop epoch). ``dataset_epoch`` is what
    :meth:`TorchDataset.set_epoch` gets, so the slot positions continue across phases."""

    epoch: int
    crops: int

    @property
    def dataset_epoch(self) -> int:
        return self.epoch // self.crops


def phases(epochs: int, num_crops: int, final_single_crop: bool = True) -> list[Phase]:
    """FKD's loop: passes of ``num_crops`` crops at epochs 0, m, 2m, ...; with ``final_single_crop``, from the
    first pass start at or after ``epochs - m`` every remaining epoch is a single-crop phase."""
    out, e, m = [], 0, num_crops
    while e < epochs:
        if final_single_crop and m > 1 and e >= epochs - m:
            out += [Phase(epoch=k, crops=1) for k in range(e, epochs)]
            break
        out.append(Phase(epoch=e, crops=m))
        e += m
    return out


def learning_rate(epoch: int, args) -> float:
    """FKD's ``adjust_learning_rate`` at effective epoch ``epoch``: cosine over ``--epochs`` with ``--cos``,
    else ``lr * 0.1 ** (number of --schedule milestones <= epoch)``."""
    if args.cos:
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    return args.lr * 0.1 ** sum(epoch >= m for m in args.schedule)


def mix_options(args) -> dict | None:
    """:func:`mix_batch` keyword arguments for FKD's mixing options (None: no mixing)."""
    if not args.mixup_cutmix or (args.mixup <= 0 and args.cutmix <= 0):
        return None
    if args.mixup > 0 and args.cutmix > 0:
        return {"mode": "switch", "alpha": (args.mixup, args.cutmix), "switch_prob": 1.0 - args.mixup_switch_prob,
                "p": args.mixup_cutmix_prob}
    mode, alpha = ("mixup", args.mixup) if args.mixup > 0 else ("cutmix", args.cutmix)
    return {"mode": mode, "alpha": alpha, "p": args.mixup_cutmix_prob}


# --------------------------------------------------------------------------------------------- pieces


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """``module:factory`` (called with ``num_classes``) or a torchvision model name."""
    if ":" in arch:
        module, _, factory = arch.partition(":")
        try:
            fn = getattr(importlib.import_module(module), factory)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--arch {arch!r} must name an importable module:factory. Got: {e}.") from None
        return fn(num_classes=num_classes)
    try:
        import torchvision.models as tvm  # noqa: PLC0415 - optional dependency, only for torchvision model names
    except Exception:  # noqa: BLE001 - not installed, or a build that does not import with this torch
        raise UsageError(f"--arch {arch!r} is a torchvision model name, but torchvision does not import here; install "
                         "torchvision or pass module:factory (a callable taking num_classes).") from None
    if not callable(getattr(tvm, arch, None)) or arch.startswith("_"):
        raise UsageError(f"--arch must be a torchvision model name or module:factory. Got {arch!r}.")
    return getattr(tvm, arch)(num_classes=num_classes)


def check_store(ds: TorchDataset, args) -> None:
    """``--num_classes`` and ``--soft_label_type``, when given, must describe the store."""
    if args.num_classes is not None and args.num_classes != ds.num_classes:
        raise UsageError(f"--num_classes must equal the store's class count {ds.num_classes}. Got {args.num_classes}.")
    if args.soft_label_type is not None:
        name, k = FKD_LABEL_TYPES[args.soft_label_type]
        cfg = ds.codec.get_config()
        if cfg["name"] != name or (k is not None and cfg.get("k") != k):
            held = cfg["name"] + (f" k={cfg['k']}" if "k" in cfg else "")
            raise UsageError(f"--soft_label_type {args.soft_label_type} means codec {name}" + (f" k={k}" if k else "")
                             + f", but the store holds {held}; drop the option (the store knows its codec).")


def _fkd_label_files(path) -> bool:
    """True when ``path`` is a folder holding FKD's per-image label files (``<class>/<stem>.tar`` or ``.pth.tar``,
    one or two levels down; a few entries are looked at)."""
    root = Path(path)
    if not root.is_dir():
        return False
    for pattern in ("*/*.tar", "*/*/*.tar"):
        for _ in root.glob(pattern):
            return True
    return False


def split_dirs(data: str, val: str | None) -> tuple[Path, Path | None]:
    """The training folder (``DATA/train`` or ``DATA``) and the validation folder (``--val``, ``DATA/val``, or None)."""
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"DIR must be an image folder. Got {data!r}, which does not exist or is not a folder.")
    train = root / "train" if (root / "train").is_dir() else root
    if val is not None:
        if not Path(val).is_dir():
            raise UsageError(f"--val must be a folder. Got {val!r}.")
        return train, Path(val)
    return train, (root / "val" if (root / "val").is_dir() else None)


class EvalFolder(torch.utils.data.Dataset):
    """An ImageFolder for validation: resize the shorter side to ``size / 0.875`` (bilinear), centre crop
    ``size``; uint8 ``[3, size, size]`` and the class index."""

    def __init__(self, folder, size: tuple[int, int]):
        lst = list_images(folder)
        self.paths, self.labels, self.size = list(lst.paths), list(lst.labels), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = load_image(self.paths[i])
        h, w = self.size
        scale = (max(h, w) / EVAL_CROP_RATIO) / min(img.size)
        W, H = max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))
        img = img.resize((W, H), Image.Resampling.BILINEAR)
        top, left = (H - h) // 2, (W - w) // 2
        x = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)
        return torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous(), self.labels[i]


@torch.no_grad()
def evaluate(model, folder, ds: TorchDataset, device, world: World, batch_size: int, workers: int, amp,
             channels_last: bool = False) -> dict:
    """Top-1 / top-5 accuracy (%) on ``folder`` over all processes (each evaluates every world_size-th image)."""
    data = EvalFolder(folder, ds.output_size)
    mine = list(range(world.rank, len(data), world.world_size))
    loader = DataLoader(torch.utils.data.Subset(data, mine), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    was = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in DeviceLoader(loader, device, dataset=ds, channels_last=channels_last):
        with amp():
            out = model(x).float()
        top5 = out.topk(min(5, out.shape[-1]), -1).indices
        hit = top5 == y.view(-1, 1)
        counts += torch.tensor([hit[:, 0].sum().item(), hit.any(-1).sum().item(), len(y)], dtype=torch.float64,
                               device=device)
    if world.world_size > 1:
        dist.all_reduce(counts)
    model.train(was)
    n = max(counts[2].item(), 1.0)
    return {"acc1": 100.0 * counts[0].item() / n, "acc5": 100.0 * counts[1].item() / n, "images": int(counts[2].item())}


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _state_dict(sd: dict) -> dict:
    """A state dict without DDP's ``module.`` prefix (FKD's checkpoints have it)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, folder: Path, is_best: bool) -> None:
    """Write ``checkpoint.pth.tar`` atomically (a crash never leaves half a file), and ``model_best.pth.tar``."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT)
    if is_best:
        tmp = folder / f"{BEST}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, folder / BEST)


def _log(world: World, msg: str) -> None:
    if world.rank == 0:
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the training; returns ``{"epoch", "step", "loss", "best_acc1", "val", "images_seen"}`` (rank 0's view;
    ``images_seen``: images loaded per phase, summed over the processes)."""
    args = check_args(build_parser().parse_args(argv))
    world = World.detect()
    device = torch.device(args.device or (f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} needs CUDA, which this machine does not have; use --device cpu.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cuda = device.type == "cuda"
    own_group = world.world_size > 1 and not (dist.is_available() and dist.is_initialized())
    if own_group:
        dist.init_process_group(backend=args.dist_backend or ("nccl" if cuda else "gloo"))
    try:
        return _train(args, world, device, cuda)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(args, world: World, device: torch.device, cuda: bool) -> dict:
    train_dir, val_dir = split_dirs(args.data, args.val)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    use_amp = cuda if args.amp is None else bool(args.amp) and cuda
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    channels_last = cuda if args.channels_last is None else bool(args.channels_last)
    datasets = _Datasets(args, train_dir)
    plan = phases(args.epochs, args.num_crops, args.final_single_crop)
    ds = _first_dataset(datasets, plan, args, train_dir)
    check_store(ds, args)
    model = build_model(args.arch, ds.num_classes).to(device)
    if channels_last:
        model = to_channels_last(model)
    opt: torch.optim.Optimizer
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    start, step, best = args.start_epoch, 0, 0.0
    if args.resume:
        start, step, best = _resume(args, model, opt, scaler, device, world)
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    amp = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    run = _Run(args=args, world=world, device=device, cuda=cuda, channels_last=channels_last, model=model, opt=opt,
               scaler=scaler, amp=amp)
    if args.evaluate:
        if val_dir is None:
            raise UsageError("-e/--evaluate needs a validation folder: DIR/val or --val DIR.")
        val = run.evaluate(val_dir, ds)
        _log(world, f" * Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f}")
        return {"epoch": start, "step": step, "loss": float("nan"), "best_acc1": best, "val": val, "images_seen": []}
    starts = [ph.epoch for ph in plan]
    if start and start not in starts and start < args.epochs:
        raise UsageError(f"the start epoch must begin a pass of this schedule ({starts}). Got {start} "
                         "(a checkpoint of a run with other --epochs/--num_crops?).")
    return _fit(run, datasets, plan, val_dir, start, step, best)


class _Datasets:
    """The training :class:`TorchDataset` of each crops-per-sample ``m`` (uint8 crops, sparse labels), built
    once each."""

    def __init__(self, args, train_dir: Path):
        self.args, self.train_dir = args, train_dir
        self._by_crops: dict[int, TorchDataset] = {}

    def __call__(self, m: int) -> TorchDataset:
        if m not in self._by_crops:
            self._by_crops[m] = TorchDataset(self.args.softlabel_path, self.train_dir, crops_per_sample=m,
                                             normalize=False, soft_labels="sparse", seed=self.args.seed)
        return self._by_crops[m]


def _first_dataset(datasets: _Datasets, plan: list[Phase], args, train_dir: Path) -> TorchDataset:
    """The dataset of the first phase; a ``--softlabel_path`` holding FKD's label files is refused with the
    import command that turns it into a store."""
    try:
        return datasets(args.num_crops if plan and plan[0].crops > 1 else 1)
    except FormatError:
        if _fkd_label_files(args.softlabel_path):
            raise UsageError(
                f"--softlabel_path {args.softlabel_path!r} holds FKD's per-image label files, not an fkdstore store: "
                f"import them once with 'fkdstore import-fkd {args.softlabel_path} labels.zarr --images {train_dir} "
                "--num-classes C', then pass --softlabel_path labels.zarr") from None
        raise


def _resume(args, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            device: torch.device, world: World) -> tuple[int, int, float]:
    """Load ``--resume``'s weights into ``model`` and, unless ``--evaluate``, the optimizer, scaler and random
    state; returns ``(start epoch, step, best acc@1)`` (``--start-epoch``, 0, 0 when evaluating)."""
    if not os.path.isfile(args.resume):
        raise UsageError(f"--resume must be a checkpoint file. Got {args.resume!r}, which does not exist.")
    start, step, best = args.start_epoch, 0, 0.0
    ckpt = torch.load(args.resume, map_location=device, weights_only=False)
    model.load_state_dict(_state_dict(ckpt["state_dict"]))
    if not args.evaluate:
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("rng"):
            _set_rng_state(ckpt["rng"])
        start, step, best = int(ckpt["epoch"]), int(ckpt.get("step", 0)), float(ckpt.get("best_acc1", 0.0))
    _log(world, f"=> resumed from {args.resume} (epoch {ckpt['epoch']})")
    return start, step, best


@dataclass(frozen=True, kw_only=True)
class _Run:
    """The fixed parts of one training run: options, process, device, the model (DDP-wrapped when
    distributed), its optimizer and grad scaler, ``amp`` (a context-manager factory: autocast or nothing)."""

    args: argparse.Namespace
    world: World
    device: torch.device
    cuda: bool
    channels_last: bool
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Callable[[], contextlib.AbstractContextManager[Any]]

    def evaluate(self, folder: Path, ds: TorchDataset) -> dict:
        """:func:`evaluate` of the model on ``folder``, at ``-b`` images per step over all processes."""
        return evaluate(self.model, folder, ds, device=self.device, world=self.world,
                        batch_size=max(1, self.args.batch_size // self.world.world_size), workers=self.args.workers,
                        amp=self.amp, channels_last=self.channels_last)


def _fit(run: _Run, datasets: _Datasets, plan: list[Phase], val_dir: Path | None, start: int, step: int,
         best: float) -> dict:
    """The phases of ``plan`` from epoch ``start`` (global step ``step``, best acc@1 ``best``): one pass each,
    then validation and the checkpoint (rank 0); returns :func:`main`'s result."""
    args, world = run.args, run.world
    mixing = mix_options(args)
    result: dict[str, Any] = {"epoch": start, "step": step, "loss": float("nan"), "best_acc1": best, "val": None,
                              "images_seen": []}
    loaders: dict[int, tuple[DataLoader, DistributedSampler | _EpochSampler]] = {}
    for ph in (ph for ph in plan if ph.epoch >= start):
        ds = datasets(ph.crops)
        if ph.crops not in loaders:
            loaders[ph.crops] = _loader(ds, ph.crops, args, world, run.cuda)
        loader, sampler = loaders[ph.crops]
        sampler.set_epoch(ph.epoch)
        ds.set_epoch(ph.dataset_epoch)  # before iter(loader); persistent workers see it too
        lr = learning_rate(ph.epoch, args)
        t0 = time.perf_counter()
        stats, step = _one_pass(run, ph, loader, ds, lr, step, mixing)
        loss_avg = stats[0].item() / max(stats[1].item(), 1.0)
        msg = (f"epoch {ph.epoch + ph.crops}/{args.epochs} (pass of {ph.crops} crops from epoch {ph.epoch}) "
               f"lr {lr:.5g} loss {loss_avg:.4f} crops/s {stats[1].item() / (time.perf_counter() - t0):.0f}")
        val: dict | None = None
        if val_dir is not None:
            val = run.evaluate(val_dir, ds)
            msg += f" val Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f}"
        _log(world, msg)
        is_best = val is not None and val["acc1"] > best
        best = max(best, val["acc1"]) if val is not None else best
        result = {"epoch": ph.epoch + ph.crops, "step": step, "loss": loss_avg, "best_acc1": best, "val": val,
                  "images_seen": result["images_seen"] + [int(stats[2].item())]}
        if world.rank == 0:
            state = {"epoch": ph.epoch + ph.crops, "arch": args.arch, "state_dict": _unwrap(run.model).state_dict(),
                     "best_acc1": best, "optimizer": run.opt.state_dict(), "scaler": run.scaler.state_dict(),
                     "step": step, "rng": _rng_state(), "args": vars(args), "store": str(args.softlabel_path)}
            save_checkpoint(state, Path(args.save_checkpoint_path), is_best)
    _log(world, "result " + json.dumps({k: v for k, v in result.items() if k != "val"}))
    return result


def _loader(ds: TorchDataset, crops: int, args, world: World,
            cuda: bool) -> tuple[DataLoader, DistributedSampler | _EpochSampler]:
    """The training loader of ``ds`` (``crops`` crops per image) and its sampler: ``-b`` crops per step over
    all processes, each process its share of a shuffled order drawn from ``(--seed, epoch)``."""
    per_rank = max(1, math.ceil(args.batch_size / crops / world.world_size))
    sampler: DistributedSampler | _EpochSampler
    if world.world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=args.seed)
    else:
        sampler = _EpochSampler(len(ds), args.seed)
    loader = DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=args.workers, collate_fn=collate,
                        pin_memory=cuda, persistent_workers=args.workers > 0, drop_last=len(sampler) >= per_rank)
    return loader, sampler


def _one_pass(run: _Run, ph: Phase, loader: DataLoader, ds: TorchDataset, lr: float, step: int,
              mixing: dict | None) -> tuple[torch.Tensor, int]:
    """One pass of phase ``ph`` over ``loader`` at learning rate ``lr``, from global step ``step``, mixing
    batches with ``mixing`` (:func:`mix_options`); returns ``[loss * crops, crops, images]`` summed over all
    processes (float64) and the step after the pass."""
    args, world, model, opt, scaler = run.args, run.world, run.model, run.opt, run.scaler
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    total, n, images, correct = 0.0, 0, 0, 0
    batches = DeviceLoader(loader, run.device, dataset=ds, channels_last=run.channels_last)
    for i, batch in enumerate(batches):
        x, y, target = batch["crops"], batch["soft_labels"], batch["target"]
        if mixing is not None:
            x, y = mix_batch(x, y, seed=args.seed, step=step * world.world_size + world.rank, **mixing)[:2]
        with run.amp():
            out = model(x)
        loss = soft_cross_entropy(out.float(), y, temperature=args.temp)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        total, n = total + loss.item() * len(x), n + len(x)
        images += len(x) // ph.crops
        correct += int((out.detach().argmax(-1) == target).sum())
        if i % args.print_freq == 0:
            _log(world, f"Epoch: [{ph.epoch}][{i}/{len(batches)}] crops {ph.crops} LR {lr:.5f} "
                        f"Loss {loss.item():.4e} Acc@1 {100.0 * correct / max(n, 1):6.2f}")
    stats = torch.tensor([total, n, images], dtype=torch.float64, device=run.device)
    if world.world_size > 1:
        dist.all_reduce(stats)
    return stats, step


class _EpochSampler(torch.utils.data.Sampler):
    """A shuffled order of ``range(n)`` drawn from ``(seed, epoch)`` only (so a resumed run sees the same order)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        return iter(rng.permutation(self.n).tolist())


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m fkdstore.train``: exit 0, 2 for refused options (one line), 130 on Ctrl-C."""
    try:
        main(argv)
    except UsageError as e:
        print(f"fkdstore.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("fkdstore.train: interrupted; rerun with --resume <save_checkpoint_path>/checkpoint.pth.tar to continue",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
