"""Self-supervised stores: ``generate`` without class labels (a flat folder, a file list, a mapping, or
``class_labels=False``) with an embedding-head teacher of width D, centred float16 logits read at tau = 0.2, the
command line, and temperatures a codec refuses failing when the dataset is built."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

import fkdstore
from fkdstore.cli import main
from fkdstore.codecs import parse_spec
from fkdstore.errors import ValidationError
from fkdstore.runner import generate
from fkdstore.testing import make_digits_folder, tiny_cnn

D, M, SIZE, TAU = 128, 3, 16, 0.2
FAST = dict(crops_per_image=M, input_size=SIZE, images_per_shard=4, batch_size=8, num_workers=0, progress=False)
CENTRED = {"name": "logits", "centred": True}


class _L2(nn.Module):
    def forward(self, x):
        return nn.functional.normalize(x, dim=-1)


def ssl_head(seed: int = 0) -> nn.Module:
    """A MoCo-style head: a small CNN's D outputs, L2-normalised (entries about N(0, 1/D))."""
    return nn.Sequential(tiny_cnn(D, width=8, seed=seed), _L2())


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("tree"), size=24, per_class=1)  # 10 PNGs, 10 class folders


@pytest.fixture(scope="module")
def flat(tree, tmp_path_factory):
    """The same images with no class folders."""
    out = tmp_path_factory.mktemp("flat")
    for p in sorted(tree.rglob("*.png")):
        shutil.copy(p, out / f"{p.parent.name}_{p.name}")
    return out


def test_flat_folder_store_has_no_labels_and_decodes_within_the_centred_bound(flat, tmp_path):
    teacher = ssl_head()
    r = generate(teacher, flat, tmp_path / "ssl.zarr", codec=CENTRED, **FAST)
    assert r.complete and r.num_classes == D and not r.header.has_labels
    assert (np.asarray(r.labels) == -1).all() and r.meta["classes"] == []

    ds = fkdstore.TorchDataset(r, flat, temperature=TAU, crops_per_sample=M)
    worst = 0.0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            assert item["target"] == -1
            z = teacher(item["crops"]).double()  # the teacher on the replayed crops, all M slots
            c = z - z.max(-1, keepdim=True).values
            p = torch.softmax(z / TAU, -1)
            q = item["soft_labels"].double()
            # stored c is rounded toward -inf in float16 (|error| <= |c| 2**-10), so each decoded
            # log-probability is within max|c| 2**-10 / tau of the true one (plus float32 rounding)
            bound = torch.expm1(c.abs().max(-1).values * 2.0 ** -10 / TAU) + 1e-4
            rel = (q / p - 1).abs().max(-1).values
            assert (rel <= bound).all(), (i, rel, bound)
            worst = max(worst, float(rel.max()))
    assert worst > 0  # float16 rounding is visible: the comparison is not vacuous

    pairs = fkdstore.TorchDataset(r, flat, temperature=TAU, item="pair")
    image, target = pairs[0]
    assert image.shape == (3, SIZE, SIZE) and target.shape == (D,)
    torch.testing.assert_close(target.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    same = fkdstore.TorchDataset(r, flat, temperature=TAU)[0]  # the same slot (seed and epoch)
    torch.testing.assert_close(target, same["soft_labels"][0])


def test_sources_without_labels_and_class_labels_false(tree, flat, tmp_path):
    teacher = ssl_head(seed=1)
    files = sorted(str(p) for p in flat.glob("*.png"))[:4]
    mapping = {f"img{i}": p for i, p in enumerate(files)}
    for name, images in (("list", files), ("map", mapping)):
        r = generate(teacher, images, tmp_path / name, codec=CENTRED, **FAST)
        assert not r.header.has_labels and (np.asarray(r.labels) == -1).all(), name

    # a class-folder tree and an embedding head: refused with a pointer to class_labels=False ...
    with pytest.raises(ValidationError, match=r"class folders.*class_labels=False \(--no-class-labels\)"):
        generate(teacher, tree, tmp_path / "refused", codec=CENTRED, **FAST)
    assert not (tmp_path / "refused").exists()
    # ... which keeps the images and drops the folders' classes
    r = generate(teacher, tree, tmp_path / "tree", codec=CENTRED, class_labels=False, **FAST)
    assert not r.header.has_labels and (np.asarray(r.labels) == -1).all() and r.meta["classes"] == []
    assert len(r) == 10 and r.image_keys[0].split("/")[0] == "0"

    # a source whose ground-truth classes exceed the teacher's outputs: named, with the same pointer
    class Labelled(dict):
        def label(self, key):
            return 500 if key == "img2" else 1

    with pytest.raises(ValidationError, match=r"in \[0, 128\): 'img2' .* has class 500.*class_labels=False"):
        generate(teacher, Labelled(mapping), tmp_path / "labelled", codec=CENTRED, **FAST)


def test_cli_generate_flat_folder(flat, tmp_path):
    out = tmp_path / "cli.zarr"
    argv = ["generate", "--images", str(flat), "--teacher", "fkdstore.testing:tiny_cnn", "--teacher-kwargs",
            f'{{"num_classes": {D}, "width": 8}}', "--out", str(out), "--crops", str(M), "--codec",
            "logits:centred=true", "--input-size", str(SIZE), "--images-per-shard", "4", "--batch-size", "8",
            "--num-workers", "0", "--no-progress"]
    assert main(argv) == 0
    r = fkdstore.open(out)
    assert r.codec == fkdstore.get_codec(CENTRED) and r.num_classes == D
    assert not r.header.has_labels and (np.asarray(r.labels) == -1).all()
    api = generate(tiny_cnn(D, width=8), flat, tmp_path / "api", codec=CENTRED, **FAST)
    for name in ("logits",):
        np.testing.assert_array_equal(r.array(f"soft/{name}")[:], api.array(f"soft/{name}")[:])


def test_spec_strings_parse_booleans():
    assert parse_spec("logits:centred=true") == {"name": "logits", "centred": True}
    assert parse_spec("sampled:s=8,logp=TRUE,k=none") == {"name": "sampled", "s": 8, "logp": True, "k": None}
    assert parse_spec("logits:centred=False")["centred"] is False


def test_refused_temperatures_fail_when_the_dataset_is_built(flat, tmp_path):
    teacher = ssl_head(seed=2)
    files = sorted(str(p) for p in flat.glob("*.png"))[:2]
    q8 = generate(teacher, files, tmp_path / "q8", codec="logits:dtype=q8", **FAST)
    with pytest.raises(ValidationError, match=r"q8 logits store must not be decoded at temperature < 1.*0\.2"):
        fkdstore.TorchDataset(q8, files, temperature=TAU)
    assert fkdstore.TorchDataset(q8, files, temperature=1.0)[0]["soft_labels"].shape == (1, D)
    sampled = generate(teacher, files, tmp_path / "sampled", codec="sampled:s=8", **FAST)
    with pytest.raises(ValidationError, match=r"decodes only at temperature 1.*logp=True"):
        fkdstore.TorchDataset(sampled, files, temperature=4.0)
    with_logp = generate(teacher, files, tmp_path / "logp", codec="sampled:s=8,logp=true", **FAST)
    got = fkdstore.TorchDataset(with_logp, files, temperature=4.0)[0]["soft_labels"]
    torch.testing.assert_close(got.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
