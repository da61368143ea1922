"""Small-scale reproduction of the FKD paper's central claims on CPU (scikit-learn digits, upscaled).

A teacher CNN (``tiny_cnn``, wide) is trained on the digits train split; then a smaller student is trained
several ways with the same number of *effective epochs* E (crops seen per image), the same crops per
mini-batch, optimiser, learning-rate schedule and seeds:

(a) ``no KD``: hard labels, a fresh random-resized crop per image per epoch;
(b) ``vanilla KD``: same crops as (a), the teacher runs on every crop at every step (soft labels);
(c) ``FKD``: labels made once by :func:`fkdstore.generate` (M = E stored crops per image, Full float32),
    re-encoded into each codec (Full, MS-K, MR-K, Smoothing, Hard); training replays them with
    :class:`fkdstore.TorchDataset` (m crops of one loaded image per mini-batch, so E/m passes, and the
    cosine learning rate stepped once per pass: the serrated schedule);
(d) ``global label``: the same replayed crops and m as (c) Full, but every crop gets the teacher's soft label
    of the *whole* image (ReLabel-style global/region mismatch).

(e) ``pruned``: the Full store pruned to a fraction ``keep`` of its M slots per image
    (:func:`fkdstore.prune`, random rule, seed 0), trained with the same E and m, so the M' kept crops are
    reused E/M' times (the accuracy vs label-size curve; keep = 1 is (c) Full);
(f) ``q8``: (c) MS K with 8-bit labels (``dtype="q8"``) next to (c) MS K in float16;
(g) ``mixing stored``: a store generated with RandAugment(2) + Mixup/CutMix (``generate(augment=...)``: the
    teacher labelled the mixed pixels), replayed by TorchDataset, loss on the stored label of the mixed crop;
(h) ``mixing at training time`` (FKD's way): the (c) Full store, crops and stored labels mixed per batch by
    :func:`fkdstore.pytorch.mix_batch` with the same Mixup/CutMix parameters;
(i) the same RandAugment as (g) stored, mixing at training time; (j) Mixup/CutMix stored without RandAugment
    ((g)/(i) and (j)/(h) differ only in where the mixing happens). (g)-(j) use ``--augment-epochs`` (8 with
    ``--fast``: replaying a mixed slot costs ~1 ms of CPU here, several times the student's step).
(k) ``ReLabel``: label maps of the same teacher (``fkdstore.generate(spatial_teacher(teacher), ...,
    label_map=LabelMapSpec(...))``: its classifier as a 1x1 conv over its last feature map, run once on every
    whole image resized to ``--map-input`` px (default: the teacher's own input size, 4 x 4 cells),
    top-``--map-k`` per cell), each crop's label pooled from the map
    (RoIAlign + softmax) by :class:`fkdstore.TorchDataset`: fresh RandomResizedCrop crops every epoch (ReLabel's
    way) with m = 1 (E passes) and with the FKD rows' m;
(l) ``ReLabel on FKD's crops``: the same maps pooled on exactly the crops of (c) Full (``crops_from=``), m as
    (c): the labels are the only difference between (l) and (c) FKD Full / MS K.
(m) ``temperature``: Full vs MS top-K vs ``sampled`` labels at (about) equal raw label bytes per crop, decoded and
    trained at T = 1 and T = 4 (loss ``T**2 * soft_cross_entropy(student, target, temperature=T)``): at T = 1 (c)'s
    Full and MS K rows against ``sampled`` with as many draws as MS K's bytes allow; at T = 4 Full (``logits`` of every
    output, float32), MS K, ``logits`` top-K with ``tail="mean"``, ``sampled`` with ``logp=True`` (decoded at 4) and
    ``sampled`` drawn at T = 4 itself (decoded at 1). Accuracy and calibration (ECE, 15 bins, held-out digits) over
    seeds; each store's mean total variation to the teacher's ``softmax(z / T)``.
(n) ``SSL``: a MoCo-style embedding head (the teacher's pooled features, a fixed random projection to D = 128,
    L2-normalised) stored at tau = 0.2 with ``logits`` float16 centred vs not (float32 the reference), generated
    without class labels: the decoded-distribution error from the stores, and students (D outputs, loss
    ``soft_cross_entropy(student, target, temperature=tau)``) scored by a weighted k-NN probe.

m is varied for (c) Full (m = 1, 2, 4). Defaults: teacher `tiny_cnn(width=48)` (~97 %), student
`tiny_cnn(width=4)`, E = 32, m = 2, crop scale (0.1, 1) (the same setting as `examples/demo.py`). Test
accuracy on the held-out split (whole images) and the training wall time (data loading + teacher forwards +
steps; label generation is a one-off cost reported separately) are reported as mean ± std over seeds.
Single-threaded torch; every variant runs in this one process, interleaved per seed, so time ratios are
comparable.

    python benchmarks/reproduce.py --fast            # the `make bench` subset: 3 seeds (~6 min on 2 quiet cores)
    python benchmarks/reproduce.py                   # 5 seeds
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
from torch.utils.data import DataLoader

import fkdstore
from fkdstore.codecs import get_codec
from fkdstore.conversion import pruned_slots
from fkdstore.images import list_images
from fkdstore.labelmap import LabelMapSpec
from fkdstore.labelmap_torch import class_map_shape, spatial_teacher
from fkdstore.pytorch import soft_cross_entropy
from fkdstore.report import storage_stats
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import (
    RandomCropDataset,
    cosine_lr,
    limit_threads,
    load_eval_folder,
    make_digits_folder,
    tiny_cnn,
    train_classifier,
)
from fkdstore.transforms import normalize

NUM_CLASSES = 10
CROPS_PER_BATCH = 64
TEMPERATURES = (1.0, 4.0)  # (m)
SSL_DIM, SSL_TAU = 128, 0.2  # (n)


def lr_at(p: int, passes: int, base: float) -> float:
    """Cosine over passes, constant within a pass (with m crops per image: the serrated schedule)."""
    return cosine_lr(base, p, passes)


def load_folder(folder, size):
    return load_eval_folder(folder, size)


def train(model, batches, passes: int, lr: float, target_fn, soft_loss=None) -> tuple[float, float]:
    """:func:`fkdstore.testing.train_classifier` (the loop the demo uses); returns (wall s, process CPU s)."""
    return train_classifier(model, batches, passes, lr, target_fn, soft_loss=soft_loss)


ECE_BINS = 15


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE of a classifier: confidence = max softmax(logits) (T = 1, the student as it is deployed), ``bins``
    equal-width confidence bins over (0, 1], ``sum_b n_b / N |accuracy_b - mean confidence_b|``."""
    p = torch.softmax(logits.double(), -1)
    conf, pred = p.max(-1)
    hit = (pred == y).double()
    b = torch.clamp((conf * bins).ceil().long() - 1, 0, bins - 1)
    n = torch.bincount(b, minlength=bins).double()
    gap = (torch.bincount(b, hit, minlength=bins) - torch.bincount(b, conf, minlength=bins)).abs()
    return float(gap.sum() / n.sum())


def classifier_scores(model, x, y) -> dict:
    """Top-1 accuracy and 15-bin ECE of ``model`` on uint8 images ``x`` (whole held-out images)."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(normalize(x[i:i + 512])) for i in range(0, len(x), 512)])
    model.train(was)
    return {"acc": float((logits.argmax(-1) == y).float().mean()), "ece": expected_calibration_error(logits, y)}


def random_crop_batches(folder, size, scale, seed, epochs):
    ds = RandomCropDataset(folder, size, scale, seed=seed + 1_000_000, epochs=epochs)  # never the store's crops
    g = torch.Generator()

    def batches(p):
        ds.epoch = p
        g.manual_seed(seed * 7919 + p)
        yield from DataLoader(ds, batch_size=CROPS_PER_BATCH, shuffle=True, generator=g, num_workers=0)
    return batches


def fkd_batches(store, folder, m, seed, temperature=1.0):
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, soft_labels="dense", normalize=False, seed=seed,
                               temperature=temperature)
    g = torch.Generator()
    loader = DataLoader(ds, batch_size=max(1, CROPS_PER_BATCH // m), shuffle=True, generator=g, num_workers=0,
                        collate_fn=fkdstore.collate)

    def batches(p):
        ds.set_epoch(p)
        g.manual_seed(seed * 7919 + p)
        for b in loader:
            yield b["crops"], b
    return batches


def reencode(full_store: Path, codec, path: Path) -> Path:
    """Write ``full_store``'s labels (same crops) with another codec. A codec taking logits (``logits``,
    ``sampled``) needs a ``logits`` store of every output as the source: its stored log-softmax rows are the
    teacher's logits up to a per-row shift."""
    r = fkdstore.open(full_store)
    rec = r.read_all()
    if codec.input == "logits":
        if r.codec.name != "logits" or r.codec.k is not None:
            raise ValueError(f"re-encoding into {codec.describe()} needs a logits store of every output, got "
                             f"{r.codec.describe()}")
        probs = np.asarray(rec.fields["logits"], dtype=np.float32)
    else:
        probs = r.decode(rec.fields)
        probs = probs / probs.sum(-1, keepdims=True)
    with fkdstore.write(path, num_images=r.num_images, crops_per_image=r.crops_per_image, num_classes=r.num_classes,
                        codec=codec, image_keys=r.image_keys, image_sizes=r.image_sizes, labels=r.labels,
                        crop_sampler=r.header.sampler, replay=r.header.replay, meta=r.meta) as w:
        w.put(np.arange(r.num_images), rec.boxes.astype(np.int64), rec.flips, probs)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="the make-bench subset")
    ap.add_argument("--epochs", type=int, default=None, help="effective epochs E (crops seen per image)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--size", type=int, default=16, help="image / crop side in pixels")
    ap.add_argument("--teacher-width", type=int, default=48)
    ap.add_argument("--student-width", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--k", type=int, default=3, help="top-K of MS / MR (C = 10)")
    ap.add_argument("--m", type=int, default=2, help="crops per image per mini-batch for the codec runs")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4], help="m values of the ablation (Full)")
    ap.add_argument("--scale", type=float, nargs=2, default=(0.1, 1.0), help="random-resized-crop scale range")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--keeps", type=float, nargs="*", default=[0.5, 0.25, 0.125],
                    help="prune fractions of the accuracy vs size curve (e); none to skip")
    ap.add_argument("--prune-seeds", type=int, default=None,
                    help="seeds of the pruned variants (e) (default: 1 with --fast, else all seeds)")
    ap.add_argument("--no-q8", dest="q8", action="store_false", help="skip (f) MS K with q8 labels")
    ap.add_argument("--augment-epochs", type=int, default=None,
                    help="effective epochs of the augmentation rows (g)-(j); default 8 with --fast, else E")
    ap.add_argument("--map-input", type=int, default=None,
                    help="(k)/(l): side of the whole image fed to the teacher for its label map (default --size: the "
                         "teacher's own resolution, as ReLabel ran its teacher at the resolution it was trained at)")
    ap.add_argument("--map-k", type=int, default=None, help="(k)/(l): classes kept per map cell (default --k)")
    ap.add_argument("--no-relabel", dest="relabel", action="store_false", help="skip (k)/(l) ReLabel")
    ap.add_argument("--temperatures", type=float, nargs="*", default=list(TEMPERATURES),
                    help="(m): training temperatures of the Full vs top-K vs sampled rows at equal bytes (none to "
                         "skip; T = 1 reuses (c)'s Full and MS rows)")
    ap.add_argument("--no-ssl", dest="ssl", action="store_false",
                    help="skip (n): the self-supervised head stored as float16 logits, centred vs not")
    ap.add_argument("--ssl-dim", type=int, default=SSL_DIM, help="(n): width D of the embedding head")
    ap.add_argument("--ssl-tau", type=float, default=SSL_TAU, help="(n): the head's temperature tau")
    ap.add_argument("--per-class", type=int, default=None,
                    help="images per class in each split (default: every digit; smoke tests use a few)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants (smoke tests)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    E = a.epochs or 32
    seeds = list(range(a.seeds or (3 if a.fast else 5)))
    t_epochs = a.teacher_epochs or 40
    limit_threads(1)  # tiny models: one thread is nearly as fast and does not stall on shared cores
    t_all = time.perf_counter()
    work = Path(a.work or tempfile.mkdtemp(prefix="fkd-repro-"))
    work.mkdir(parents=True, exist_ok=True)
    size, scale = a.size, tuple(a.scale)
    train_dir, test_dir = work / "train", work / "test"
    if not train_dir.exists():
        make_digits_folder(train_dir, size=size, split="train", per_class=a.per_class)
        make_digits_folder(test_dir, size=size, split="test", per_class=a.per_class)
    x_test, y_test = load_folder(test_dir, size)
    n_train = len(list_images(train_dir))

    # ---- teacher
    teacher = tiny_cnn(NUM_CLASSES, width=a.teacher_width, seed=1000)
    t_teacher, _ = train(teacher, random_crop_batches(train_dir, size, scale, 1000, t_epochs), t_epochs, a.lr,
                      lambda x, y: y)
    teacher.eval()
    res: dict = {"config": {"effective_epochs": E, "seeds": seeds, "size": size, "scale": scale, "k": a.k,
                            "m": a.m, "ms": a.ms, "teacher_width": a.teacher_width, "student_width": a.student_width,
                            "teacher_epochs": t_epochs, "train_images": n_train, "test_images": len(y_test),
                            "keeps": list(a.keeps), "q8": a.q8,
                            "crops_per_batch": CROPS_PER_BATCH, "lr": a.lr},
                 "teacher": {**classifier_scores(teacher, x_test, y_test), "train_s": t_teacher}}
    print(f"teacher acc {res['teacher']['acc']:.4f} ({t_teacher:.0f}s)", file=sys.stderr, flush=True)

    # ---- labels: generate once (Full float32, M = E), re-encode per codec
    M = E
    full = work / "labels_full.fkd"
    shutil.rmtree(full, ignore_errors=True)
    t, tc = time.perf_counter(), time.process_time()
    fkdstore.generate(teacher, train_dir, full, crops_per_image=M, codec=get_codec("full", dtype="float32"),
                      input_size=size, crop_sampler=SlotCropSampler(seed=0, scale=scale), num_workers=0, progress=False,
                      batch_size=256)
    gen_s, gen_cpu = time.perf_counter() - t, time.process_time() - tc
    # teacher-only forward on the same number of crops, for the generation-cost row
    xs = torch.randint(0, 256, (256, 3, size, size), dtype=torch.uint8)
    tc = time.process_time()
    with torch.inference_mode():
        for _ in range(8):
            teacher(normalize(xs))
    fwd_crops_s = 8 * 256 / (time.process_time() - tc)
    res["generation"] = {"images": n_train, "M": M, "seconds": gen_s, "cpu_seconds": gen_cpu,
                         "crops_per_s": n_train * M / gen_cpu,
                         "teacher_forward_crops_per_s": fwd_crops_s}
    stores = {"Full": full}
    codecs = {f"MS K={a.k}": get_codec("ms", k=a.k), f"MR K={a.k}": get_codec("mr", k=a.k),
              "Smoothing": get_codec("smoothing"), "Hard": get_codec("hard")}
    if a.q8:
        codecs[f"MS K={a.k} q8"] = get_codec("ms", k=a.k, dtype="q8")
    for name, c in codecs.items():
        stores[name] = reencode(full, c, work / f"labels_{c.name}{'_q8' if c.quantized else ''}.fkd")
    pruned = {}
    for keep in a.keeps:
        if pruned_slots(keep, M) in {pruned_slots(k, M) for k in pruned}:
            continue  # same M' as a larger keep: the same store
        pruned[keep] = work / f"labels_full_keep{keep}.fkd"
        shutil.rmtree(pruned[keep], ignore_errors=True)
        fkdstore.prune(full, pruned[keep], keep=keep, seed=0)
        stores[f"Full keep={keep:g}"] = pruned[keep]
    r_full = fkdstore.open(full)
    res["store_bytes"] = {k: storage_stats(v)["_total"]["bytes"] for k, v in stores.items()}

    # global soft label per image: teacher on the whole image (resized to the crop size)
    x_train, _ = load_folder(train_dir, size)
    with torch.inference_mode():
        global_p = torch.softmax(teacher(normalize(x_train)), -1)
    keys = list_images(train_dir).keys
    assert keys == r_full.image_keys

    # ---- variants
    variants: dict[str, tuple] = {}  # name -> (batches factory, passes, target_fn factory)
    hard = lambda x, y: y  # noqa: E731

    def kd_target(x, y):
        with torch.no_grad():
            return torch.softmax(teacher(x), -1)

    variants["(a) no KD"] = (lambda s: random_crop_batches(train_dir, size, scale, s, E), E, hard)
    variants["(b) vanilla KD"] = (lambda s: random_crop_batches(train_dir, size, scale, s, E), E, kd_target)
    for name, st in stores.items():
        if st in pruned.values():
            continue
        tag = "(f)" if name.endswith(" q8") else "(c)"
        variants[f"{tag} FKD {name}, m={a.m}"] = (lambda s, st=st: fkd_batches(st, train_dir, a.m, s), E // a.m,
                                                   lambda x, b: b["soft_labels"])
    for m in a.ms:
        if m != a.m:
            variants[f"(c) FKD Full, m={m}"] = (lambda s, m=m: fkd_batches(full, train_dir, m, s), E // m,
                                                 lambda x, b: b["soft_labels"])
    variants[f"(d) global label, m={a.m}"] = (lambda s: fkd_batches(full, train_dir, a.m, s), E // a.m,
                                               lambda x, b: global_p[b["index"]])
    for keep, st in pruned.items():
        Mk = pruned_slots(keep, M)
        if Mk < a.m:
            continue  # fewer kept slots than crops per item
        variants[f"(e) FKD Full pruned keep={keep:g} (M'={Mk}), m={a.m}"] = (
            lambda s, st=st: fkd_batches(st, train_dir, a.m, s), E // a.m, lambda x, b: b["soft_labels"])
    variants.update(augment_variants(a, teacher, train_dir, full, work, size, scale, E, res))
    if a.relabel:
        variants.update(relabel_variants(a, teacher, train_dir, full, work, size, scale, E, res))
    if a.temperatures:
        variants.update(temperature_variants(a, teacher, train_dir, full, stores[f"MS K={a.k}"], work, size, scale,
                                             E, res))
    if a.ssl:
        variants.update(ssl_variants(a, teacher, train_dir, work, size, scale, E, res))
    if a.only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in a.only)}
    runs = {k: [] for k in variants}
    prune_seeds = a.prune_seeds if a.prune_seeds is not None else (1 if a.fast else len(seeds))
    res["config"]["prune_seeds"] = prune_seeds
    for si, s in enumerate(seeds):
        for name, (mk, passes, tfn, *opt) in variants.items():
            if name.startswith("(e) ") and si >= prune_seeds:
                continue
            opt = opt[0] if opt else {}  # rows (m)/(n): "loss", "outputs" (the student's width), "evaluate"
            student = tiny_cnn(opt.get("outputs", NUM_CLASSES), width=a.student_width, seed=s)
            secs, cpu = train(student, mk(s), passes, opt.get("lr", a.lr), tfn, soft_loss=opt.get("loss"))
            scores = opt["evaluate"](student) if "evaluate" in opt else classifier_scores(student, x_test, y_test)
            runs[name].append({"seed": s, **scores, "train_s": secs, "cpu_s": cpu,
                               "passes": passes, "final_lr": lr_at(passes - 1, passes, opt.get("lr", a.lr))})
            print(f"seed {s} {name}: acc {runs[name][-1]['acc']:.4f} {secs:.1f}s wall {cpu:.1f}s cpu", file=sys.stderr,
                  flush=True)
    res["runs"] = runs
    res["summary"] = {k: {"acc_mean": float(np.mean([r["acc"] for r in v])),
                          "acc_std": float(np.std([r["acc"] for r in v], ddof=1)) if len(v) > 1 else 0.0,
                          "time_mean": float(np.mean([r["train_s"] for r in v])),
                          "time_std": float(np.std([r["train_s"] for r in v], ddof=1)) if len(v) > 1 else 0.0,
                          "cpu_mean": float(np.mean([r["cpu_s"] for r in v])),
                          "cpu_std": float(np.std([r["cpu_s"] for r in v], ddof=1)) if len(v) > 1 else 0.0,
                          "passes": v[0]["passes"], "final_lr": v[0]["final_lr"], "seeds": len(v),
                          **({"ece_mean": float(np.mean([r["ece"] for r in v])),
                              "ece_std": float(np.std([r["ece"] for r in v], ddof=1)) if len(v) > 1 else 0.0}
                             if v and "ece" in v[0] else {})}
                      for k, v in runs.items() if v}
    res["claims"] = claims(res)
    res["wall_s"] = time.perf_counter() - t_all
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(to_markdown(res))
    return res


def _get(summary, prefix):
    return next((v for k, v in summary.items() if k.startswith(prefix)), None)


def claims(res: dict) -> dict:
    s, cfg = res["summary"], res["config"]
    out = {}
    kd, fkd = _get(s, "(b)"), _get(s, f"(c) FKD Full, m={cfg['m']}")
    fkd1 = _get(s, "(c) FKD Full, m=1")
    glob, none = _get(s, "(d)"), _get(s, "(a)")
    if kd and fkd:
        # "matches": within the larger of the two seeds' spreads (or 1 point)
        tol = max(0.01, kd["acc_std"] + fkd["acc_std"])
        out["fkd_matches_vanilla_kd"] = {
            "fkd_acc": fkd["acc_mean"], "kd_acc": kd["acc_mean"], "diff": fkd["acc_mean"] - kd["acc_mean"],
            "tolerance": tol, "agrees": fkd["acc_mean"] >= kd["acc_mean"] - tol,
            "time_ratio_fkd_over_kd": fkd["cpu_mean"] / kd["cpu_mean"],
            "wall_ratio_fkd_over_kd": fkd["time_mean"] / kd["time_mean"],
            "time_ratio_with_generation": (fkd["cpu_mean"] + res["generation"]["cpu_seconds"]) / kd["cpu_mean"]}
        if fkd1:
            out["fkd_matches_vanilla_kd"].update(
                fkd_m1_acc=fkd1["acc_mean"], fkd_m1_diff=fkd1["acc_mean"] - kd["acc_mean"],
                fkd_m1_agrees=fkd1["acc_mean"] >= kd["acc_mean"] - max(0.01, kd["acc_std"] + fkd1["acc_std"]),
                fkd_m1_time_ratio=fkd1["cpu_mean"] / kd["cpu_mean"])
    if fkd and glob:
        out["region_beats_global"] = {"region_acc": fkd["acc_mean"], "global_acc": glob["acc_mean"],
                                      "diff": fkd["acc_mean"] - glob["acc_mean"],
                                      "agrees": fkd["acc_mean"] > glob["acc_mean"]}
    ms = {m: _get(s, f"(c) FKD Full, m={m}") for m in cfg["ms"]}
    ms = {m: v for m, v in ms.items() if v}
    if 1 in ms and len(ms) > 1:
        base = ms[1]
        tol = max(0.01, base["acc_std"])
        out["m_does_not_hurt"] = {str(m): {"acc": v["acc_mean"], "diff_vs_m1": v["acc_mean"] - base["acc_mean"],
                                           "time_ratio_vs_m1": v["cpu_mean"] / base["cpu_mean"],
                                           "passes": v["passes"], "final_lr_fraction": v["final_lr"] / cfg["lr"],
                                           "agrees": v["acc_mean"] >= base["acc_mean"] - 2 * tol}
                                  for m, v in ms.items() if m != 1}
    if none:
        fkd_any = {k: v for k, v in s.items() if k.startswith("(c) FKD ") and k.endswith(f", m={cfg['m']}")}
        out["fkd_beats_hard_labels"] = {
            k[len("(c) FKD "):]: {"fkd_acc": v["acc_mean"], "hard_acc": none["acc_mean"],
                                  "diff": v["acc_mean"] - none["acc_mean"], "agrees": v["acc_mean"] >= none["acc_mean"],
                                  "time_ratio_vs_kd": v["cpu_mean"] / kd["cpu_mean"] if kd else None}
            for k, v in fkd_any.items()}
    q8, f16 = _get(s, f"(f) FKD MS K={cfg['k']} q8"), _get(s, f"(c) FKD MS K={cfg['k']}, m=")
    if q8 and f16:
        spread = q8["acc_std"] + f16["acc_std"]
        out["q8_within_seed_spread"] = {"q8_acc": q8["acc_mean"], "q8_std": q8["acc_std"], "f16_acc": f16["acc_mean"],
                                        "f16_std": f16["acc_std"], "diff": q8["acc_mean"] - f16["acc_mean"],
                                        "spread": spread, "agrees": abs(q8["acc_mean"] - f16["acc_mean"]) <= spread}
    full_m = _get(s, f"(c) FKD Full, m={cfg['m']}")
    curve = {k: v for k, v in s.items() if k.startswith("(e) ")}
    if full_m and curve:
        out["prune_curve"] = [{"keep": 1.0, "acc": full_m["acc_mean"], "std": full_m["acc_std"],
                               "bytes": res["store_bytes"]["Full"]}]
        for k, v in curve.items():
            keep = float(k.split("keep=")[1].split(" ")[0])
            out["prune_curve"].append({"keep": keep, "acc": v["acc_mean"], "std": v["acc_std"],
                                       "bytes": res["store_bytes"][f"Full keep={keep:g}"]})
    out.update(augment_claims(res))
    out.update(relabel_claims(res))
    out.update(temperature_claims(res))
    out.update(ssl_claims(res))
    if none and kd:
        out["kd_beats_no_kd"] = {"diff": kd["acc_mean"] - none["acc_mean"], "agrees": kd["acc_mean"] > none["acc_mean"]}
    return out


def to_markdown(res: dict) -> str:
    c, s = res["config"], res["summary"]
    L = [f"Digits (scikit-learn, upscaled to {c['size']} px): {c['train_images']} train / {c['test_images']} test "
         f"images, 10 classes. Teacher `tiny_cnn(width={c['teacher_width']})` trained {c['teacher_epochs']} epochs: "
         f"test accuracy **{res['teacher']['acc']:.3f}**. Students `tiny_cnn(width={c['student_width']})`, "
         f"E = {c['effective_epochs']} effective epochs (crops seen per image), {c['crops_per_batch']} crops per "
         f"mini-batch, SGD + cosine lr stepped per pass, crop scale {tuple(c['scale'])}, seeds {c['seeds']}. "
         f"FKD stores M = {res['generation']['M']} crops per image.\n",
         "Times: process CPU seconds of the training loop (torch single-threaded, no DataLoader workers, so CPU "
         "time is the work done; wall time on this shared machine is given as context). Passes = passes over "
         "the data (m effective epochs each); final lr = learning rate of the last pass / base lr.\n",
         "| variant | test accuracy, % (mean ± std) | training CPU s | CPU time vs vanilla KD | wall s | passes "
         "| final lr |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    kd = _get(s, "(b)")
    for k, v in s.items():
        ratio = f"{v['cpu_mean'] / kd['cpu_mean']:.2f}x" if kd else ""
        L.append(f"| {k} | {100 * v['acc_mean']:.2f} ± {100 * v['acc_std']:.2f} | {v['cpu_mean']:.1f} ± "
                 f"{v['cpu_std']:.1f} | {ratio} | {v['time_mean']:.1f} | {v['passes']} "
                 f"| {v['final_lr'] / c['lr']:.2f} |")
    fb = res.get("claims", {}).get("fkd_beats_hard_labels", {})
    if fb:
        L.append("\nFKD against hard labels on the same crop budget (mean over seeds): " + "; ".join(
            f"{k}: {100 * v['diff']:+.2f} points ({'FKD >= hard labels' if v['agrees'] else '**FKD < hard labels**'}"
            + (f", {v['time_ratio_vs_kd']:.2f}x vanilla KD's CPU time" if v["time_ratio_vs_kd"] else "") + ")"
            for k, v in fb.items()) + ".")
    cl = res.get("claims", {})
    if "prune_curve" in cl:
        L.append(f"\nLabel pruning (`fkdstore.prune`, random rule, seed 0; same E and m, so the kept crops are reused; "
                 f"pruned variants over {c.get('prune_seeds', len(c['seeds']))} seed(s)): "
                 "accuracy vs store size: " + "; ".join(
                     f"keep {p['keep']:g}: {100 * p['acc']:.2f} ± {100 * p['std']:.2f} % at {p['bytes'] / 1e3:,.0f} KB"
                     for p in cl["prune_curve"]) + ".")
    if "q8_within_seed_spread" in cl:
        v = cl["q8_within_seed_spread"]
        L.append(f"\n8-bit labels: MS K={c['k']} q8 {100 * v['q8_acc']:.2f} ± {100 * v['q8_std']:.2f} % vs float16 "
                 f"{100 * v['f16_acc']:.2f} ± {100 * v['f16_std']:.2f} % (difference {100 * v['diff']:+.2f} points, "
                 f"seed spread ±{100 * v['spread']:.2f}: {'within' if v['agrees'] else '**outside**'} the seed "
                 "spread).")
    g = res["generation"]
    L.append(f"\nOne-off label generation (`fkdstore.generate`, Full float32, {g['images']} images x M = {g['M']}): "
             f"{g['seconds']:.1f} s wall, {g['cpu_seconds']:.1f} s CPU = {g['crops_per_s']:,.0f} crops per CPU-second; "
             f"teacher-only forward "
             f"{g['teacher_forward_crops_per_s']:,.0f} crops/s. Store sizes: " +
             ", ".join(f"{k} {v / 1e3:,.0f} KB" for k, v in res["store_bytes"].items()) + ".")
    L += augment_markdown(res)
    L += relabel_markdown(res)
    L += temperature_markdown(res)
    L += ssl_markdown(res)
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------- augmentation
# Issue 9: Mixup / CutMix stored in the labels (the teacher labelled the mixed pixels, generate(augment=...))
# against FKD's way (the store holds plain crops; training mixes crops and their stored labels per batch).

AUGMENT_MIX = (("mixup", 0.2, 0.5), ("cutmix", 1.0, 0.5))  # (policy, alpha, p), applied in this order
AUGMENT_RA = "randaugment:num_ops=2,magnitude=9"
AUGMENT_STORED = AUGMENT_RA + "".join(f";{n}:alpha={al},p={p}" for n, al, p in AUGMENT_MIX)


def train_time_mix_batches(store, folder, m, seed, mix=AUGMENT_MIX):
    """:func:`fkd_batches` with FKD's training-time mixing: per batch, each ``(mode, alpha, p)`` of ``mix`` is
    applied with probability ``p`` (in order, as the stored pipeline applies its policies) by
    :func:`fkdstore.pytorch.mix_batch`, which mixes the crops and their stored soft labels alike. Draws depend
    on ``(seed, pass, batch)`` only."""
    from fkdstore.pytorch import mix_batch

    inner = fkd_batches(store, folder, m, seed)

    def batches(p):
        for b_idx, (x, info) in enumerate(inner(p)):
            y = info["soft_labels"]
            for k, (mode, alpha, prob) in enumerate(mix):
                step = (p * 1_000_000 + b_idx) * len(mix) + k
                if np.random.default_rng([seed, step]).random() < prob:
                    x, y = mix_batch(x, y, mode=mode, alpha=alpha, seed=seed, step=step)[:2]
            yield x, {**info, "soft_labels": y}
    return batches


def augment_variants(a, teacher, train_dir, full_store, work, size, scale, E, res) -> dict:
    """Rows (g) RandAugment(2) + Mixup/CutMix stored, (h) FKD Full store + training-time Mixup/CutMix (FKD's way),
    (i) RandAugment(2) stored + training-time Mixup/CutMix, (j) Mixup/CutMix stored on crop + flip. (g)/(i) and
    (j)/(h) differ only in where the mixing happens. Same effective epochs, m, schedule and seeds for all; the loss
    is the soft cross-entropy on the (stored or training-time mixed) soft label. Stores are generated when a row
    first needs them; their generation cost goes to ``res["augment"]``."""
    Ea = a.augment_epochs or (min(E, 8) if a.fast else E)
    if Ea < 1:
        raise SystemExit(f"--augment-epochs must be >= 1. Got {Ea}.")
    m = min(a.m, Ea)
    res["augment"] = {"effective_epochs": Ea, "m": m, "stored": AUGMENT_STORED, "mix": [list(x) for x in AUGMENT_MIX],
                      "randaugment": AUGMENT_RA, "generation": {}}
    made: dict[str, Path] = {}

    def store(spec: str) -> Path:
        if spec not in made:
            path = work / f"labels_aug{len(made)}.fkd"
            shutil.rmtree(path, ignore_errors=True)
            t, c = time.perf_counter(), time.process_time()
            fkdstore.generate(teacher, train_dir, path, crops_per_image=Ea, codec=get_codec("full", dtype="float32"),
                              input_size=size, crop_sampler=SlotCropSampler(seed=0, scale=scale), num_workers=0,
                              progress=False, batch_size=256, augment=spec)
            res["augment"]["generation"][spec] = {"seconds": time.perf_counter() - t,
                                                  "cpu_seconds": time.process_time() - c, "M": Ea,
                                                  "bytes": storage_stats(path)["_total"]["bytes"]}
            made[spec] = path
        return made[spec]

    soft = lambda x, b: b["soft_labels"]  # noqa: E731
    mix_only = AUGMENT_STORED[len(AUGMENT_RA) + 1:]
    return {
        f"(g) RandAugment(2) + Mixup/CutMix stored, E={Ea}, m={m}":
            (lambda s: fkd_batches(store(AUGMENT_STORED), train_dir, m, s), Ea // m, soft),
        f"(h) FKD Full + train-time Mixup/CutMix, E={Ea}, m={m}":
            (lambda s: train_time_mix_batches(full_store, train_dir, m, s), Ea // m, soft),
        f"(i) RandAugment(2) stored + train-time Mixup/CutMix, E={Ea}, m={m}":
            (lambda s: train_time_mix_batches(store(AUGMENT_RA), train_dir, m, s), Ea // m, soft),
        f"(j) Mixup/CutMix stored, E={Ea}, m={m}":
            (lambda s: fkd_batches(store(mix_only), train_dir, m, s), Ea // m, soft),
    }


def _mix_pair(stored: dict, train_time: dict) -> dict:
    tol = max(0.01, stored["acc_std"] + train_time["acc_std"])
    diff = stored["acc_mean"] - train_time["acc_mean"]
    return {"stored_acc": stored["acc_mean"], "stored_std": stored["acc_std"], "train_time_acc": train_time["acc_mean"],
            "train_time_std": train_time["acc_std"], "diff": diff, "tolerance": tol,
            "verdict": "tie" if abs(diff) <= tol else ("stored" if diff > 0 else "train-time"),
            "cpu_ratio_stored_over_train_time": stored["cpu_mean"] / train_time["cpu_mean"]}


def augment_claims(res: dict) -> dict:
    """``stored_mix_vs_train_time_mix``: (g) against (h) (the pairing FKD users face: RandAugment + mixing stored
    vs their plain store mixed at training time), plus ``same_augmentation``: (g) vs (i) and (j) vs (h), where
    only the place of the mixing differs."""
    s = res["summary"]
    g, h, i, j = (_get(s, t) for t in ("(g)", "(h)", "(i)", "(j)"))
    if not (g and h):
        return {}
    out = {**_mix_pair(g, h), "effective_epochs": res.get("augment", {}).get("effective_epochs"),
           "same_augmentation": {}}
    if i:
        out["same_augmentation"]["RandAugment(2)"] = _mix_pair(g, i)
    if j:
        out["same_augmentation"]["crop + flip only"] = _mix_pair(j, h)
    return {"stored_mix_vs_train_time_mix": out}


def augment_markdown(res: dict) -> list[str]:
    """The paragraph under the table for rows (g)-(j)."""
    v = res.get("claims", {}).get("stored_mix_vs_train_time_mix")
    if not v:
        return []
    aug = res["augment"]
    words = {"tie": "no difference beyond the seeds' spread", "stored": "stored mixing is better",
             "train-time": "training-time mixing is better"}

    def pair(p):
        return (f"{100 * p['stored_acc']:.2f} ± {100 * p['stored_std']:.2f} % stored vs "
                f"{100 * p['train_time_acc']:.2f} ± {100 * p['train_time_std']:.2f} % at training time, "
                f"{100 * p['diff']:+.2f} points: "
                f"{words[p['verdict']]} (tolerance ±{100 * p['tolerance']:.2f}), CPU time "
                f"{p['cpu_ratio_stored_over_train_time']:.2f}x")

    line = (f"\nMixing stored vs mixing at training time (rows (g)-(j); E = {aug['effective_epochs']}, m = {aug['m']}; "
            f"Mixup alpha 0.2 then CutMix alpha 1.0, each with p = 0.5, per slot when stored (`{aug['stored']}`: the "
            "teacher labelled the mixed pixels, the loss uses that stored label) and per batch at training time "
            "(`fkdstore.pytorch.mix_batch` on the crops and their stored labels, FKD's way). "
            f"(g) RandAugment(2) + mixing stored vs (h) plain crop + flip store mixed at training time: {pair(v)}.")
    for name, p in v["same_augmentation"].items():
        rows = "(g) vs (i)" if name.startswith("RandAugment") else "(j) vs (h)"
        line += f" Same augmentation ({name}), {rows}: {pair(p)}."
    gen = "; ".join(f"`{spec}`: {g['cpu_seconds']:.1f} s CPU for M = {g['M']}, {g['bytes'] / 1e3:,.0f} KB"
                    for spec, g in aug["generation"].items())
    return [line + " Stored mixing costs training time because replaying a mixed slot decodes the partner image "
            f"and replays its crop (and RandAugment). One-off generation of the augmented stores: {gen}."]


# ---------------------------------------------------------------------------------------------- ReLabel
# Issue 23: the paper's central comparison, region labels (FKD) against global label maps (ReLabel), from the
# same teacher, at the same crop budget.


def relabel_batches(maps, folder, m, seed, size, *, scale=None, crops_from=None):
    """ReLabel loader: ``fkdstore.TorchDataset`` over a label-map store: m crops of each loaded image resized to
    ``size``, each crop's label pooled from the image's map; fresh crops per epoch (``crop_sampler`` seeded
    apart from the store's crops and from the no-KD loader's) or the crops of the region store ``crops_from``."""
    opts = ({"crops_from": crops_from} if crops_from is not None
            else {"crop_sampler": SlotCropSampler(scale=tuple(scale), seed=seed + 2_000_000)})
    ds = fkdstore.TorchDataset(maps, folder, crops_per_sample=m, normalize=False, seed=seed, output_size=size, **opts)
    g = torch.Generator()
    loader = DataLoader(ds, batch_size=max(1, CROPS_PER_BATCH // m), shuffle=True, generator=g, num_workers=0,
                        collate_fn=fkdstore.collate)

    def batches(p):
        ds.set_epoch(p)
        g.manual_seed(seed * 7919 + p)
        for b in loader:
            yield b["crops"], b
    return batches


def relabel_variants(a, teacher, train_dir, full_store, work, size, scale, E, res) -> dict:
    """Rows (k) ReLabel fresh crops (m = 1 and m = a.m) and (l) ReLabel on (c) Full's crops (m = a.m). The label
    map is generated once, when a row first needs it (cost in ``res["relabel"]``)."""
    map_input = a.map_input or size
    k = a.map_k or a.k
    st = spatial_teacher(teacher)
    _, S_, _ = class_map_shape(st, map_input)
    spec = LabelMapSpec(size=S_, k=k, box_order="xy", flip=True)
    maps = work / "labels_maps.zarr"

    def store() -> Path:
        if "relabel" not in res:
            shutil.rmtree(maps, ignore_errors=True)
            t, c = time.perf_counter(), time.process_time()
            fkdstore.generate(st, train_dir, maps, label_map=spec, input_size=map_input, num_workers=0,
                              progress=False, batch_size=256)
            res["relabel"] = {"map_input": map_input, "size": S_, "k": k, "spec": spec.get_config(),
                              "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
                              "bytes": storage_stats(maps)["_total"]["bytes"]}
            res.setdefault("store_bytes", {})[f"ReLabel maps {S_}x{S_} K={k}"] = res["relabel"]["bytes"]
        return maps

    soft = lambda x, b: b["soft_labels"]  # noqa: E731
    m = a.m
    name = f"{S_}x{S_} top-{k} maps"
    return {
        f"(k) ReLabel {name}, fresh crops, m=1":
            (lambda s: relabel_batches(store(), train_dir, 1, s, size, scale=scale), E, soft),
        f"(k) ReLabel {name}, fresh crops, m={m}":
            (lambda s: relabel_batches(store(), train_dir, m, s, size, scale=scale), E // m, soft),
        f"(l) ReLabel {name} on FKD's crops, m={m}":
            (lambda s: relabel_batches(store(), train_dir, m, s, size, crops_from=full_store), E // m, soft),
    }


def relabel_claims(res: dict) -> dict:
    """``fkd_vs_relabel``: (c) FKD Full and MS K against (l) ReLabel on the same crops (only the labels differ) and
    against (k) ReLabel with fresh crops at the same m; each pair's verdict (tie within the seeds' spread, or the
    winner) and CPU-time ratio."""
    s, cfg = res["summary"], res["config"]
    m = cfg["m"]
    fkd = {"FKD Full": _get(s, f"(c) FKD Full, m={m}"), f"FKD MS K={cfg['k']}": _get(s, f"(c) FKD MS K={cfg['k']}, m=")}
    rel = {"ReLabel on FKD's crops": _get(s, "(l) ReLabel"),
           "ReLabel fresh crops": next((v for k2, v in s.items() if k2.startswith("(k) ReLabel")
                                        and k2.endswith(f", m={m}")), None),
           "ReLabel fresh crops, m=1": next((v for k2, v in s.items() if k2.startswith("(k) ReLabel")
                                             and k2.endswith(", m=1")), None)}
    out = {}
    for fn, f in fkd.items():
        for rn, r in rel.items():
            if not (f and r):
                continue
            tol = max(0.01, f["acc_std"] + r["acc_std"])
            diff = f["acc_mean"] - r["acc_mean"]
            out[f"{fn} vs {rn}"] = {"fkd_acc": f["acc_mean"], "fkd_std": f["acc_std"], "relabel_acc": r["acc_mean"],
                                    "relabel_std": r["acc_std"], "diff": diff, "tolerance": tol,
                                    "verdict": "tie" if abs(diff) <= tol else ("FKD" if diff > 0 else "ReLabel"),
                                    "cpu_ratio_fkd_over_relabel": f["cpu_mean"] / r["cpu_mean"]}
    return {"fkd_vs_relabel": out} if out else {}


def relabel_markdown(res: dict) -> list[str]:
    """The paragraph under the table for rows (k)/(l)."""
    v, rl = res.get("claims", {}).get("fkd_vs_relabel"), res.get("relabel")
    if not v or not rl:
        return []
    words = {"tie": "no difference beyond the seeds' spread", "FKD": "FKD's region labels are better",
             "ReLabel": "ReLabel's label maps are better"}
    pairs = "; ".join(f"{name}: {100 * p['fkd_acc']:.2f} ± {100 * p['fkd_std']:.2f} % vs "
                      f"{100 * p['relabel_acc']:.2f} ± {100 * p['relabel_std']:.2f} %, {100 * p['diff']:+.2f} points, "
                      f"{words[p['verdict']]} "
                      f"(tolerance ±{100 * p['tolerance']:.2f}; CPU time {p['cpu_ratio_fkd_over_relabel']:.2f}x)"
                      for name, p in v.items())
    full = res["store_bytes"].get("Full")
    ms = next((b for n, b in res["store_bytes"].items() if n.startswith("MS K=") and not n.endswith("q8")), None)
    return [f"\nFKD vs ReLabel (rows (k)/(l)): the same teacher's label maps, its classifier applied as a 1x1 conv "
            f"over its last feature map of each whole image at {rl['map_input']} px ({rl['size']} x {rl['size']} "
            f"cells, top-{rl['k']} per cell, box order xy, the label flipped with the crop), pooled per crop by "
            f"RoIAlign + "
            f"softmax; (l) uses exactly (c)'s crops. {pairs}. One-off map generation: {rl['cpu_seconds']:.1f} s CPU, "
            f"{rl['bytes'] / 1e3:,.0f} KB (FKD Full store {full / 1e3:,.0f} KB"
            + (f", MS K={res['config']['k']} {ms / 1e3:,.0f} KB" if ms else "") + ")."]


# ---------------------------------------------------------------------------------------------- temperatures
# Issue 27: Full vs MS top-K vs sampled labels at equal bytes per crop, trained and decoded at T = 1 and T = 4,
# with calibration; and a self-supervised head stored at tau = 0.2, float16 centred vs not.


def _selected(a, names) -> bool:
    """Whether ``--only`` keeps any of the row ``names`` (all rows when it is not given)."""
    return not a.only or any(o in n for n in names for o in a.only)


def raw_label_bytes(codec, num_classes: int) -> int:
    """Bytes per crop of a codec's fields before compression (shape x itemsize, summed)."""
    return int(sum(int(np.prod(f.shape, dtype=np.int64)) * np.dtype(f.dtype).itemsize
                   for f in codec.fields(num_classes).values()))


def label_bytes_on_disk(store: Path) -> float:
    """Compressed bytes of the label fields (``soft/*``) per crop."""
    r = fkdstore.open(store)
    st = storage_stats(store)
    return sum(d["bytes"] for k, d in st.items() if k.startswith("soft/")) / (r.num_images * r.crops_per_image)


SAMPLED_DRAWS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, 255)


def equal_stored_bytes_sampled(target: float, source: Path, work: Path, tag: str, **config):
    """``(codec, path)``: ``source`` (a ``logits`` store of every output) re-encoded as ``sampled`` (``config`` plus
    draws ``s`` from :data:`SAMPLED_DRAWS`) with stored label bytes per crop closest to ``target``. Stored bytes
    grow with ``s`` (more distinct classes drawn), so ``s`` is bisected; the probe stores are removed."""
    made: dict[int, tuple[float, object, Path]] = {}

    def size(i: int) -> float:
        if i not in made:
            codec = get_codec("sampled", s=SAMPLED_DRAWS[i], **config)
            path = work / f"labels_{tag}_s{codec.s}.fkd"
            shutil.rmtree(path, ignore_errors=True)
            reencode(source, codec, path)
            made[i] = (label_bytes_on_disk(path), codec, path)
        return made[i][0]

    lo, hi = 0, len(SAMPLED_DRAWS) - 1
    while lo < hi:  # the largest s whose store is not above target (or the smallest s)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= target else (lo, mid - 1)
    best = lo
    if lo + 1 < len(SAMPLED_DRAWS) and abs(size(lo + 1) - target) < abs(size(lo) - target):
        best = lo + 1
    for i, (_, _, path) in made.items():
        if i != best:
            shutil.rmtree(path, ignore_errors=True)
    return made[best][1], made[best][2]


def _decode_at(codec, T: float) -> float:
    """The decode temperature giving ``softmax(z / T)``: 1 for a ``sampled`` store drawn at ``T`` itself."""
    if codec.name == "sampled" and codec.temperature != 1.0:
        assert codec.temperature == T, (codec, T)
        return 1.0
    return T


def temperature_variants(a, teacher, train_dir, full_store, ms_store, work, size, scale, E, res) -> dict:
    """Rows (m): at each training temperature T of ``a.temperatures``, the student's loss is
    ``T**2 * soft_cross_entropy(student, target, temperature=T)`` (Hinton's T**2 keeps the gradient scale; T = 1 is
    every other row's loss) with ``target`` the store's label decoded at T, on (c)'s crops. Full is the ``logits``
    store of every output in float32 (exact at any T; at T = 1 (c)'s Full and MS K rows are the Full and MS rows).
    Against MS top-K (float16) and, at T != 1, ``logits`` top-K with ``tail="mean"``: ``sampled`` stores with as
    many draws as give the same stored (compressed) label bytes per crop (:func:`equal_stored_bytes_sampled`):
    equal to MS K at T = 1; at T != 1 with ``logp=True`` (decoded at T) equal to the ``logits`` top-K store, and
    drawn at T itself (decoded at 1) equal to MS K. Stores are re-encoded from the float32 logits store (same
    crops); ``res["temperature"]`` gets their raw and stored bytes and the mean total variation of their decoded
    labels to the teacher's ``softmax(z / T)``."""
    C, K, m = NUM_CLASSES, a.k, a.m
    ms_name, top_name = f"MS K={K}", f"logits K={K} tail=mean"
    plan = []  # (T, store key, row name)
    for T in a.temperatures:
        if T == 1.0:
            plan += [(T, "Full (c)", f"(c) FKD Full, m={m}"), (T, "MS", f"(c) FKD {ms_name}, m={m}"),
                     (T, "sampled T=1", f"(m) T=1 sampled, stored bytes of {ms_name}, m={m}")]
            continue
        plan += [(T, "Full", f"(m) T={T:g} Full (float32 logits), m={m}"), (T, "MS", f"(m) T={T:g} {ms_name}, m={m}"),
                 (T, "top", f"(m) T={T:g} {top_name}, m={m}"),
                 (T, f"sampled logp T={T:g}", f"(m) T={T:g} sampled logp, stored bytes of {top_name}, m={m}"),
                 (T, f"sampled drawn T={T:g}",
                  f"(m) T={T:g} sampled drawn at T={T:g}, stored bytes of {ms_name}, m={m}")]
    if not _selected(a, [row for _, _, row in plan if row.startswith("(m)")]):
        return {}
    logits_store = work / "labels_logits_f32.fkd"
    shutil.rmtree(logits_store, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    full_logits = get_codec("logits", dtype="float32")
    fkdstore.generate(teacher, train_dir, logits_store, crops_per_image=E, codec=full_logits, input_size=size,
                      crop_sampler=SlotCropSampler(seed=0, scale=scale), num_workers=0, progress=False, batch_size=256)
    gen = {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}
    top = get_codec("logits", k=K, tail="mean")
    stores = {"Full": ("Full", full_logits, logits_store), "Full (c)": ("Full", get_codec("full", dtype="float32"),
                                                                        full_store),
              "MS": (ms_name, get_codec("ms", k=K), ms_store)}
    if any(key == "top" for _, key, _ in plan):
        stores["top"] = (top_name, top, reencode(logits_store, top, work / "labels_logits_top.fkd"))
    for T, key, _ in plan:
        if key.startswith("sampled"):
            target = stores["top" if "logp" in key else "MS"][2]
            cfg = {"logp": True} if "logp" in key else ({"temperature": T} if "drawn" in key else {})
            codec, path = equal_stored_bytes_sampled(label_bytes_on_disk(target), logits_store, work,
                                                     key.replace(" ", "_").replace("=", ""), **cfg)
            label = f"sampled S={codec.s}" + (" logp" if codec.logp else "") + (
                f" drawn at T={T:g}" if codec.temperature != 1.0 else "")
            stores[key] = (label, codec, path)
    ref = np.asarray(fkdstore.open(logits_store).read_all().fields["logits"], np.float64)  # log-softmax, float32
    info = {}
    for key, (label, codec, path) in stores.items():
        r = fkdstore.open(path)
        fields = r.read_all().fields
        tv = {}
        for T in {T for T, k, _ in plan if k == key}:
            z = ref / T
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            q = np.asarray(r.decode(fields, temperature=_decode_at(codec, T)), np.float64)
            tv[f"{T:g}"] = float(0.5 * np.abs(q - p).sum(-1).mean())
        info[key] = {"label": label, "codec": codec.get_config(), "raw_bytes": raw_label_bytes(codec, C),
                     "disk_bytes": label_bytes_on_disk(path), "tv": tv}
    res["temperature"] = {"temperatures": list(a.temperatures), "k": K, "logits_generation": gen, "stores": info,
                          "rows": [{"T": T, "label": stores[key][0], "row": row, "store": key} for T, key, row in plan]}

    def loss(T):
        return lambda z, target: T * T * soft_cross_entropy(z, target, temperature=T)

    out = {}
    for T, key, row in plan:
        if row.startswith("(m)"):
            _, codec, path = stores[key]
            dt = _decode_at(codec, T)
            out[row] = (lambda s, path=path, dt=dt: fkd_batches(path, train_dir, m, s, temperature=dt),
                        E // m, lambda x, b: b["soft_labels"], {"loss": loss(T)})
    return out


def _verdict(rows: dict, key: str, lower_is_better: bool, floor: float) -> dict:
    """The best of ``rows`` (label -> summary) by ``key``_mean and whether it beats the runner-up beyond the seeds'
    spread (``max(floor, std_best + std_second)``)."""
    order = sorted(rows, key=lambda n: rows[n][f"{key}_mean"], reverse=not lower_is_better)
    if len(order) < 2:
        return {}
    b, s2 = rows[order[0]], rows[order[1]]
    tol = max(floor, b[f"{key}_std"] + s2[f"{key}_std"])
    gap = abs(b[f"{key}_mean"] - s2[f"{key}_mean"])
    return {"best": order[0], "runner_up": order[1], "gap": gap, "tolerance": tol, "clear": gap > tol}


def temperature_claims(res: dict) -> dict:
    """``temperature_rows``: per T, each store's accuracy, ECE, bytes and label TV; the best equal-bytes store
    (all but Full) by accuracy and by ECE, and whether it is clear of the runner-up beyond the seeds' spread."""
    t, s = res.get("temperature"), res["summary"]
    if not t:
        return {}
    out = {}
    for T in t["temperatures"]:
        rows = {}
        for r in t["rows"]:
            if r["T"] != T or r["row"] not in s or "ece_mean" not in s[r["row"]]:
                continue
            v, st = s[r["row"]], t["stores"][r["store"]]
            rows[r["label"]] = {k: v[k] for k in ("acc_mean", "acc_std", "ece_mean", "ece_std")} | {
                "raw_bytes": st["raw_bytes"], "disk_bytes": st["disk_bytes"], "tv": st["tv"].get(f"{T:g}")}
        if not rows:
            continue
        equal = {n: v for n, v in rows.items() if n != "Full"}
        full = rows.get("Full")
        for v in equal.values():
            if full:
                v["acc_diff_vs_full"] = v["acc_mean"] - full["acc_mean"]
                v["ece_diff_vs_full"] = v["ece_mean"] - full["ece_mean"]
        out[f"{T:g}"] = {"rows": rows, "accuracy": _verdict(equal, "acc", False, 0.01),
                         "ece": _verdict(equal, "ece", True, 0.005)}
    return {"temperature_rows": out} if out else {}


def _pm(v, key, scale=100):
    return f"{scale * v[f'{key}_mean']:.2f} ± {scale * v[f'{key}_std']:.2f}"


def _gap(v: dict) -> str:
    """``(clear of | within the seeds' spread of) <runner-up>: gap, tolerance`` of a :func:`_verdict`."""
    return (f"({'clear of' if v['clear'] else 'within the seeds' + chr(39) + ' spread of'} {v['runner_up']}: "
            f"{100 * v['gap']:.2f} points, tolerance ±{100 * v['tolerance']:.2f})")


def temperature_markdown(res: dict) -> list[str]:
    """The table and paragraph of rows (m)."""
    cl = res.get("claims", {}).get("temperature_rows")
    if not cl:
        return []
    L = ["\nFull vs top-K vs sampled labels at equal bytes per crop, trained at temperature T (rows (m); T = 1 reuses "
         "(c)'s Full and MS rows). Loss `T**2 * soft_cross_entropy(student, target, temperature=T)`, target the "
         f"store's label decoded at T; ECE: {ECE_BINS} bins, max softmax of the student at T = 1 on the held-out "
         "digits. Label bytes per crop: raw fields / stored (compressed, the equal-bytes rule: each sampled store has "
         "the draws S whose stored bytes come closest to its top-K store's); label TV: mean "
         "total variation of the decoded label to the teacher's softmax(z / T) over all stored crops.\n",
         "| T | store | label B/crop (raw / disk) | label TV | accuracy, % | ECE, % |",
         "|---:|---|---:|---:|---:|---:|"]
    for T, v in cl.items():
        for name, r in v["rows"].items():
            L.append(f"| {T} | {name} | {r['raw_bytes']} / {r['disk_bytes']:.1f} | {r['tv']:.4f} | {_pm(r, 'acc')} | "
                     f"{_pm(r, 'ece')} |")
    words = []
    for T, v in cl.items():
        acc, ece = v["accuracy"], v["ece"]
        if acc:
            words.append(f"T = {T}: best accuracy at equal bytes {acc['best']} {_gap(acc)}; best ECE {ece['best']} "
                         f"{_gap(ece)}")
    return L + (["\n" + "; ".join(words) + "."] if words else [])


class _L2(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


def ssl_head(teacher, dim: int, seed: int = 0) -> torch.nn.Module:
    """A MoCo-style embedding head on the digits teacher: its pooled features, a fixed random projection to ``dim``
    (Gaussian, seeded), L2-normalised (entries about N(0, 1/dim)). Shares the teacher's feature layers."""
    width = teacher[-1].in_features
    proj = torch.nn.Linear(width, dim, bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(dim, width, generator=g) / width ** 0.5)
    proj.requires_grad_(False)
    return torch.nn.Sequential(*list(teacher)[:-1], proj, _L2()).eval()


KNN_K, KNN_T = 20, 0.07


def knn_accuracy(model, bank_x, bank_y, x, y, k: int = KNN_K, t: float = KNN_T) -> float:
    """Weighted k-NN on the L2-normalised outputs of ``model`` (InstDisc / DINO protocol): the ``k`` most cosine-
    similar bank images vote for their class with weight ``exp(sim / t)``; top-1 accuracy on ``x``."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        emb = [torch.nn.functional.normalize(torch.cat([model(normalize(v[i:i + 512])) for i in range(0, len(v), 512)]),
                                             dim=-1) for v in (bank_x, x)]
    model.train(was)
    sim, idx = (emb[1] @ emb[0].T).topk(k, dim=-1)
    votes = torch.zeros(len(x), int(bank_y.max()) + 1).scatter_add_(1, bank_y[idx], (sim / t).exp())
    return float((votes.argmax(-1) == y).float().mean())


def ssl_variants(a, teacher, train_dir, work, size, scale, E, res) -> dict:
    """Rows (n): the embedding head (:func:`ssl_head`, D = ``a.ssl_dim``) labels (c)'s crops; stores of every output
    with the ``logits`` codec, float32 (the reference), float16 and float16 centred, generated without class labels
    (``class_labels=False``: the head's outputs are not the folders' classes). ``res["ssl"]`` gets each store's
    decoded-distribution error at ``tau`` against float64 ``softmax(l / tau)`` of the float32 store. Students
    (``tiny_cnn`` with D outputs) train on ``soft_cross_entropy(student, target, temperature=tau)`` with ``target``
    decoded at ``tau``; they are scored by :func:`knn_accuracy` (the train images as the bank, the held-out digits
    as queries)."""
    D, tau, m = a.ssl_dim, a.ssl_tau, a.m
    codecs = {"float32": get_codec("logits", dtype="float32"), "float16": get_codec("logits", dtype="float16"),
              "float16 centred": get_codec("logits", dtype="float16", centred=True)}
    rows = {n: f"(n) SSL head D={D}, tau={tau:g}, {n} logits ({raw_label_bytes(c, D)} B/crop), k-NN, m={m}"
            for n, c in codecs.items()}
    if not _selected(a, rows.values()):
        return {}
    head = ssl_head(teacher, D)
    paths, gen = {}, {}
    for name, codec in codecs.items():
        paths[name] = work / f"labels_ssl_{name.replace(' ', '_')}.fkd"
        shutil.rmtree(paths[name], ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        fkdstore.generate(head, train_dir, paths[name], crops_per_image=E, codec=codec, input_size=size,
                          crop_sampler=SlotCropSampler(seed=0, scale=scale), class_labels=False, num_workers=0,
                          progress=False, batch_size=256)
        gen[name] = {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}
    ref = np.asarray(fkdstore.open(paths["float32"]).read_all().fields["logits"], np.float64) / tau
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    errors = {}
    for name, path in paths.items():
        r = fkdstore.open(path)
        f = r.read_all().fields
        q = np.asarray(r.decode(f, temperature=tau), np.float64)
        stored = np.abs(np.asarray(f["logits"], np.float64))
        errors[name] = {"max_rel": float(np.abs(q / p - 1).max()), "tv": float(0.5 * np.abs(q - p).sum(-1).mean()),
                        "max_abs_stored": float(stored.max()), "has_labels": r.header.has_labels,
                        "raw_bytes": raw_label_bytes(codecs[name], D), "disk_bytes": label_bytes_on_disk(path)}
        if name != "float32":  # float16 rounded toward -inf: |log(q / p)| <= max|stored| 2**-10 / tau
            errors[name]["bound"] = float(np.expm1(stored.max(-1) * 2.0 ** -10 / tau).max())
    x_bank, y_bank = load_folder(train_dir, size)
    x_test, y_test = load_folder(train_dir.parent / "test", size)
    res["ssl"] = {"dim": D, "tau": tau, "generation": gen, "errors": errors, "knn": {"k": KNN_K, "t": KNN_T},
                  "teacher_knn": knn_accuracy(head, x_bank, y_bank, x_test, y_test),
                  "random_student_knn": knn_accuracy(tiny_cnn(D, width=a.student_width, seed=0), x_bank, y_bank,
                                                     x_test, y_test),
                  "rows": rows}
    opts = {"outputs": D, "loss": lambda z, target: soft_cross_entropy(z, target, temperature=tau),
            "evaluate": lambda model: {"acc": knn_accuracy(model, x_bank, y_bank, x_test, y_test)}}
    return {row: (lambda s, path=paths[n]: fkd_batches(path, train_dir, m, s, temperature=tau), E // m,
                  lambda x, b: b["soft_labels"], opts) for n, row in rows.items()}


def ssl_claims(res: dict) -> dict:
    """``ssl_centred``: the decoded-distribution errors per store and the students' k-NN accuracy, centred vs not
    (a tie within the seeds' spread, or the winner)."""
    ssl, s = res.get("ssl"), res["summary"]
    if not ssl:
        return {}
    students = {n: {"acc_mean": s[r]["acc_mean"], "acc_std": s[r]["acc_std"]} for n, r in ssl["rows"].items() if r in s}
    out = {"errors": ssl["errors"], "students": students, "teacher_knn": ssl["teacher_knn"],
           "random_student_knn": ssl["random_student_knn"], "dim": ssl["dim"], "tau": ssl["tau"]}
    c, u = students.get("float16 centred"), students.get("float16")
    if c and u:
        tol = max(0.01, c["acc_std"] + u["acc_std"])
        diff = c["acc_mean"] - u["acc_mean"]
        out["centred_vs_plain"] = {"diff": diff, "tolerance": tol,
                                   "verdict": "tie" if abs(diff) <= tol else ("centred" if diff > 0 else "plain")}
    return {"ssl_centred": out}


def ssl_markdown(res: dict) -> list[str]:
    """The table and paragraph of rows (n)."""
    v = res.get("claims", {}).get("ssl_centred")
    if not v:
        return []
    L = [f"\nSelf-supervised head (rows (n)): the digits teacher's pooled features, a fixed random projection to "
         f"D = {v['dim']}, L2-normalised (MoCo-style), stored with the `logits` codec (every output) without class "
         f"labels (`class_labels=False`) and read at tau = {v['tau']:g}. Error of `decode(temperature=tau)` against "
         "float64 softmax(l / tau) of the float32 store over every stored crop; students `tiny_cnn` with D outputs "
         f"trained on `soft_cross_entropy(student, target, temperature={v['tau']:g})`, scored by weighted k-NN "
         f"(k = {res['ssl']['knn']['k']}, cosine, votes exp(sim / {res['ssl']['knn']['t']:g}); train images as the "
         f"bank, held-out digits as queries). The head itself scores {100 * v['teacher_knn']:.2f} %, an untrained "
         f"student {100 * v['random_student_knn']:.2f} %.\n",
         "| store | label B/crop (raw / disk) | max \\|q/p - 1\\| | float16 bound | mean TV | "
         "student k-NN accuracy, % |",
         "|---|---:|---:|---:|---:|---:|"]
    for name, e in v["errors"].items():
        st = v["students"].get(name)
        L.append(f"| {name} | {e['raw_bytes']} / {e['disk_bytes']:.1f} | {e['max_rel']:.2e} | "
                 f"{e['bound']:.2e} | {e['tv']:.2e} | " if "bound" in e else
                 f"| {name} | {e['raw_bytes']} / {e['disk_bytes']:.1f} | {e['max_rel']:.2e} (reference) | - | "
                 f"{e['tv']:.2e} | ")
        L[-1] += (f"{100 * st['acc_mean']:.2f} ± {100 * st['acc_std']:.2f} |" if st else "- |")
    cv = v.get("centred_vs_plain")
    if cv:
        words = {"tie": "no difference beyond the seeds' spread", "centred": "centred is better",
                 "plain": "not centred is better"}
        L.append(f"\nStudents, centred vs not: {100 * cv['diff']:+.2f} points, {words[cv['verdict']]} (tolerance "
                 f"±{100 * cv['tolerance']:.2f}).")
    return L


def plot(res: dict, figdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir.mkdir(parents=True, exist_ok=True)
    s = res["summary"]
    names = list(s)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in names:
        v = s[k]
        ax.errorbar(v["cpu_mean"], 100 * v["acc_mean"], xerr=v["cpu_std"], yerr=100 * v["acc_std"], fmt="o", capsize=3,
                    label=k)
    ax.axhline(100 * res["teacher"]["acc"], color="grey", ls=":", label="teacher")
    ax.set_xlabel("student training time, CPU s (1 thread)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Digits: accuracy vs training time (mean ± std over seeds)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    p1 = figdir / "reproduce_acc_time.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    ms = [m for m in res["config"]["ms"] if _get(s, f"(c) FKD Full, m={m}")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if ms:
        v = [_get(s, f"(c) FKD Full, m={m}") for m in ms]
        ax.errorbar(ms, [100 * x["acc_mean"] for x in v], yerr=[100 * x["acc_std"] for x in v], fmt="o-", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("m crops per image per mini-batch")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("FKD Full: crops per image (paper Table 7)")
    fig.tight_layout()
    p2 = figdir / "reproduce_m.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


if __name__ == "__main__":
    main()
