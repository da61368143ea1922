"""The training script (fkdstore.train, ``python -m fkdstore.train``): FKD's train_FKD.py options, the serrated
schedule with a single-crop end, mixing with a switch, checkpoint + exact resume, validation, and 2 DDP ranks
(gloo, CPU) under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fkdstore
from fkdstore import train as T
from fkdstore.images import list_images
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import make_digits_folder
from fkdstore.transforms import Replay

REPO = Path(__file__).resolve().parents[1]
M, C, SIZE = 8, 10, 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA/train (20 digits), DATA/val (the same images) and a store of Dirichlet labels on SlotCropSampler boxes."""
    root = tmp_path_factory.mktemp("train")
    folder = make_digits_folder(root / "data" / "train", size=32, per_class=2)
    os.symlink(folder, root / "data" / "val")
    lst = list_images(folder)
    sizes = np.array([tuple(reversed(Image.open(p).size)) for p in lst.paths])
    rng, sampler = np.random.default_rng(0), SlotCropSampler(seed=1)
    with fkdstore.write(root / "labels.zarr", num_images=len(lst), crops_per_image=M, num_classes=C,
                        codec={"name": "ms", "k": 3}, image_keys=lst.keys, image_sizes=sizes, labels=lst.labels,
                        replay=Replay(input_size=SIZE, interpolation="bilinear")) as w:
        for i in range(len(lst)):
            boxes, flips = sampler.sample(i, *sizes[i], M)
            probs = rng.dirichlet(np.full(C, 0.3), M)
            probs[np.arange(M), lst.labels[i]] += 2.0  # a teacher that mostly agrees with the folder
            w.put([i], boxes[None], flips[None], (probs / probs.sum(-1, keepdims=True))[None])
    return root / "data", root / "labels.zarr"


def args(data, out, *extra):
    root, store = data
    return [str(root), "--softlabel_path", str(store), "-a", "fkdstore.testing:tiny_cnn", "-j", "0", "-b", "20",
            "--lr", "0.05", "--save_checkpoint_path", str(out), "-p", "100", *extra]


# ------------------------------------------------------------------ schedule
def test_serrated_schedule_and_single_crop_end():
    ph = T.phases(10, 4)
    assert [(p.epoch, p.crops) for p in ph] == [(0, 4), (4, 4), (8, 1), (9, 1)]  # FKD: passes at 0, 4; then 8, 9
    assert [(p.epoch, p.crops) for p in T.phases(12, 4)] == [(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1)]
    assert [(p.epoch, p.crops) for p in T.phases(10, 4, final_single_crop=False)] == [(0, 4), (4, 4), (8, 4)]
    assert [p.epoch for p in T.phases(5, 1)] == [0, 1, 2, 3, 4]
    # slot positions continue without repeats: pass p uses p*m .. p*m+m-1, single-crop epoch e uses e
    positions = []
    for p in ph:
        positions += list(range(p.dataset_epoch * p.crops, p.dataset_epoch * p.crops + p.crops))
    assert positions == list(range(10))
    a = T.build_parser().parse_args(["d", "--softlabel_path", "s", "--cos", "--lr", "0.4", "--epochs", "10"])
    lrs = [T.learning_rate(p.epoch, a) for p in ph]
    assert lrs[0] == 0.4 and lrs[0] > lrs[1] > lrs[2] > lrs[3] > 0  # one value per pass, then per epoch
    b = T.build_parser().parse_args(["d", "--softlabel_path", "s", "--lr", "0.1", "--schedule", "4", "8"])
    assert [round(T.learning_rate(e, b), 6) for e in (0, 3, 4, 8, 9)] == [0.1, 0.1, 0.01, 0.001, 0.001]


def test_fkd_mixing_options_map_to_mix_batch():
    def parse(*x):
        return T.build_parser().parse_args(["d", "--softlabel_path", "s", *x])

    assert T.mix_options(parse()) is None
    assert T.mix_options(parse("--mixup_cutmix", "--mixup_switch_prob", "0.3", "--mixup_cutmix_prob", "0.8")) == {
        "mode": "switch", "alpha": (0.8, 1.0), "switch_prob": pytest.approx(0.7), "p": 0.8}  # FKD: P(Mixup) = 0.3
    assert T.mix_options(parse("--mixup_cutmix", "--mixup", "0")) == {"mode": "cutmix", "alpha": 1.0, "p": 1.0}
    assert T.mix_options(parse("--mixup_cutmix", "--cutmix", "0", "--mixup", "0.2"))["mode"] == "mixup"


# ------------------------------------------------------------------ runs
def test_train_resume_equals_uninterrupted_and_checkpoints(data, tmp_path, capsys):
    common = ["--num_crops", "2", "--no-final-single-crop", "--schedule", "4", "--mixup_cutmix", "--seed", "3"]
    full = T.main(args(data, tmp_path / "full", "--epochs", "6", *common))
    assert full["epoch"] == 6 and full["images_seen"] == [20, 20, 20] and np.isfinite(full["loss"])
    T.main(args(data, tmp_path / "part", "--epochs", "4", *common))
    ckpt = tmp_path / "part" / T.CHECKPOINT
    saved = torch.load(ckpt, weights_only=False)
    assert {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "step"} <= set(saved) and saved["epoch"] == 4
    again = T.main(args(data, tmp_path / "part", "--epochs", "6", *common, "--resume", str(ckpt)))
    assert again["epoch"] == 6 and again["step"] == full["step"]
    a = torch.load(tmp_path / "full" / T.CHECKPOINT, weights_only=False)["state_dict"]
    b = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted, bit for bit
    out = capsys.readouterr().out
    assert "resumed from" in out and "val Acc@1" in out and (tmp_path / "full" / T.BEST).exists()


def test_single_crop_end_and_evaluate(data, tmp_path, capsys):
    res = T.main(args(data, tmp_path / "c", "--epochs", "5", "--num_crops", "2", "--optimizer", "adamw",
                      "--lr", "0.01", "--num_classes", "10"))
    assert res["images_seen"] == [20, 20, 20] and res["epoch"] == 5  # passes at 0, 2, then epoch 4 single-crop
    assert res["val"]["images"] == 20 and 0 <= res["val"]["acc1"] <= 100
    ev = T.main(args(data, tmp_path / "c", "-e", "--resume", str(tmp_path / "c" / T.CHECKPOINT)))
    assert ev["val"]["acc1"] == pytest.approx(res["val"]["acc1"])
    assert " * Acc@1" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--soft_label_type", "marginal_smoothing_k10"], "--soft_label_type marginal_smoothing_k10 means codec ms k=10, "
                                                      "but the store holds ms k=3"),
    (["--num_classes", "1000"], "--num_classes must equal the store's class count 10. Got 1000."),
    (["-a", "resnet50"], "torchvision"),
    (["-a", "nope.module:f"], "--arch 'nope.module:f' must name an importable module:factory"),
    (["--multiprocessing-distributed"], "replaced by torchrun"),
    (["--mixup_switch_prob", "2"], "--mixup_switch_prob must be in [0, 1]. Got 2.0."),
    (["-e"], "-e/--evaluate needs --resume PATH"),
    (["--resume", "missing.pth.tar"], "--resume must be a checkpoint file. Got 'missing.pth.tar'"),
])
def test_refused_options_exit_2_naming_the_option(data, tmp_path, capsys, extra, message):
    if extra == ["-a", "resnet50"]:
        try:
            import torchvision.models  # noqa: F401
            pytest.skip("torchvision imports here")
        except Exception:
            pass
    assert T.cli(args(data, tmp_path / "x", "--epochs", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fkdstore.train: error: ") and message in err


def test_fkd_label_folder_as_softlabel_path_points_to_import_fkd(data, tmp_path, capsys):
    root, _ = data
    fkd = tmp_path / "FKD_soft_label_500_crops_marginal_smoothing_k_5" / "imagenet"
    (fkd / "train" / "0").mkdir(parents=True)
    (fkd / "train" / "0" / "img.tar").write_bytes(b"not read")
    argv = [str(root), "--softlabel_path", str(fkd), "-a", "fkdstore.testing:tiny_cnn", "-j", "0", "--epochs", "1"]
    assert T.cli(argv) == 2
    err = capsys.readouterr().err
    assert f"--softlabel_path '{fkd}' holds FKD's per-image label files, not an fkdstore store: import them once " \
           f"with 'fkdstore import-fkd {fkd} labels.zarr --images {root / 'train'}" in err


@pytest.mark.slow
def test_two_ddp_ranks_on_cpu_with_gloo(data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "fkdstore.train",
           *args(data, tmp_path / "ddp", "--epochs", "3", "--num_crops", "2", "-j", "1", "--mixup_cutmix")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.split("result ", 1)[1].splitlines()[0])
    assert result["epoch"] == 3 and result["images_seen"] == [20, 20]  # a pass, then the single-crop epoch 2
    assert p.stdout.count("result ") == 1  # rank 0 logs; both ranks trained (the images are summed over ranks)
    ckpt = torch.load(tmp_path / "ddp" / T.CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 3 and not any(k.startswith("module.") for k in ckpt["state_dict"])
    single = T.main(args(data, tmp_path / "one", "-e", "--resume", str(tmp_path / "ddp" / T.CHECKPOINT)))
    assert single["val"]["images"] == 20
