"""Train a student with Fast Knowledge Distillation from an fkdstore label store (no teacher needed).

Each mini-batch holds B images x m crops (``--crops-per-sample``): an image is loaded once and m of its
stored crops are replayed with their soft labels; the loss is the soft cross-entropy. One pass over the
data therefore counts as m epochs, and the cosine learning rate is stepped once per pass: over the
effective epochs the schedule is a staircase with steps m epochs wide (the paper's "serrated" schedule).

    python examples/train_fkd.py --store labels.fkd --images train/ --epochs 10 --crops-per-sample 4 \\
        --checkpoint ckpt.pt [--resume] [--val val/]

``--epochs`` counts passes. Checkpoints hold (model, optimiser, pass) and are written after every pass;
``--resume`` continues from the checkpoint (the learning rate is recomputed from the pass number).
Crops travel as uint8 and sparse labels; normalisation and label decoding run on the training device.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import fkdstore
from fkdstore.images import list_images, load_image
from fkdstore.testing import cosine_lr
from fkdstore.transforms import normalize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="label store made from --images")
    p.add_argument("--images", required=True, help="image folder the store was made from")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data (each = m epochs)")
    p.add_argument("--crops-per-sample", type=int, default=4, help="m: crops per image per mini-batch")
    p.add_argument("--batch-size", type=int, default=64, help="images per mini-batch (crops = this x m)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--model", default="fkdstore.testing:tiny_cnn", help="module:factory(num_classes=C)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="path to write (model, optimiser, pass) after every pass")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--val", help="optional ImageFolder to report top-1 accuracy on after every pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_model(spec: str, num_classes: int) -> torch.nn.Module:
    module, _, factory = spec.partition(":")
    return getattr(importlib.import_module(module), factory)(num_classes=num_classes)


def lr_at(pass_index: int, passes: int, base_lr: float) -> float:
    """Cosine over the run, constant within a pass (stepped once per pass: the serrated schedule)."""
    return cosine_lr(base_lr, pass_index, passes)


@torch.no_grad()
def evaluate(model, folder, size, mean, std, device, batch_size=256) -> float:
    """Top-1 accuracy on an ImageFolder; each whole image is resized to the training input size."""
    lst = list_images(folder)
    model.eval()
    correct = 0
    for s in range(0, len(lst), batch_size):
        xs = []
        for path in lst.paths[s:s + batch_size]:
            img = load_image(path).resize((size[1], size[0]), 2)  # bilinear
            xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        x = normalize(torch.stack(xs).to(device), mean, std)
        pred = model(x).argmax(-1).cpu()
        correct += int((pred == torch.tensor(lst.labels[s:s + batch_size])).sum())
    model.train()
    return correct / len(lst)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    ds = fkdstore.TorchDataset(args.store, args.images, crops_per_sample=args.crops_per_sample,
                               soft_labels="sparse", normalize=False, seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=fkdstore.collate, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed),
                        drop_last=len(ds) > args.batch_size)
    model = build_model(args.model, ds.num_classes).to(device)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    start = 0
    if args.resume:
        if not args.checkpoint or not os.path.exists(args.checkpoint):
            raise SystemExit(f"--resume needs an existing --checkpoint, got {args.checkpoint!r}")
        state = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        print(f"resumed from {args.checkpoint} after pass {start}")

    m = args.crops_per_sample
    result = {"epoch": start, "loss": float("nan"), "val_acc": None}
    for e in range(start, args.epochs):
        ds.set_epoch(e)  # fresh stored slots every pass; before iter(loader)
        loader.generator.manual_seed(args.seed * 100003 + e)  # same shuffle whether resumed or not
        lr = lr_at(e, args.epochs, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        t0, total, n = time.time(), 0.0, 0
        for batch in loader:
            x = normalize(batch["crops"].to(device, non_blocking=True), ds.mean, ds.std)
            target = fkdstore.densify(batch["soft_labels"], ds, device=device)
            loss = fkdstore.soft_cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(x), n + len(x)
        result = {"epoch": e + 1, "loss": total / max(n, 1), "val_acc": None}
        msg = (f"epoch {e + 1}/{args.epochs} (= effective epochs {e * m + 1}-{(e + 1) * m}) lr {lr:.4g} "
               f"loss {result['loss']:.4f} crops/s {n / (time.time() - t0):.0f}")
        if args.val:
            result["val_acc"] = evaluate(model, args.val, ds.output_size, ds.mean, ds.std, device)
            msg += f" val accuracy {result['val_acc']:.3f}"
        print(msg, flush=True)
        if args.checkpoint:
            tmp = f"{args.checkpoint}.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": e + 1,
                        "args": vars(args)}, tmp)
            os.replace(tmp, args.checkpoint)  # atomic: a crash never leaves a half-written checkpoint
    return result


if __name__ == "__main__":
    main()
