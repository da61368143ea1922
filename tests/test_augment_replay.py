"""Augmentation records end to end (issue 9): ``generate(augment=...)`` stores each slot's params and labels the
augmented (mixed) pixels; ``TorchDataset`` replays them pixel-exactly, so the teacher run on the replayed crops
equals the stored float32 labels. Determinism (reruns, batch size, workers, world size, kill -9 + resume), the
refusal of bad input (nothing written), and the torch batch mixer (FKD's training-time mixing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faultutil import set_header

import fkdstore
from fkdstore import augment as A
from fkdstore.cli import main as cli_main
from fkdstore.errors import CorruptStoreError, FormatError, ValidationError
from fkdstore.pytorch import TorchDataset, collate, mix_batch
from fkdstore.runner import generate
from fkdstore.testing import make_digits_folder, tiny_cnn

REPO = Path(__file__).resolve().parents[1]
SIZE = 24
FAST = dict(crops_per_image=4, codec={"name": "full", "dtype": "float32"}, input_size=SIZE, images_per_shard=4,
            batch_size=8, num_workers=0, progress=False)
POLICIES = {
    "color_jitter": "color_jitter:brightness=0.5,contrast=0.5,saturation=0.5,hue=0.2",
    "randaugment": "randaugment:num_ops=2,magnitude=9",
    "random_erasing": "random_erasing:p=0.8,value=random",
    "ssl_views": "random_grayscale:p=0.5;gaussian_blur:kernel_size=[5,3],sigma=[0.1,2.0],p=0.8",
    "mixup": "mixup:alpha=0.4,p=0.8,window=4",
    "cutmix": "cutmix:alpha=1.0,p=0.8",
    "mix": "mix:mixup_alpha=0.8,cutmix_alpha=1.0,switch_prob=0.5,p=0.8,window=4",
}
ALL = ";".join(["color_jitter", "randaugment:num_ops=2,magnitude=9,interpolation=bilinear",
                "random_erasing:p=0.5,value=[10,20,30]", "mixup:alpha=0.4,p=0.7,window=4", "cutmix:p=0.6"])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), size=SIZE, per_class=1)  # 10 PNGs


@pytest.fixture(scope="module")
def stores(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, spec in {**POLICIES, "all": ALL}.items():
        generate(tiny_cnn(10), digits, root / name, augment=spec, **FAST)
        out[name] = root / name
    return out


def all_arrays(path) -> dict[str, np.ndarray]:
    r = fkdstore.open(path)
    return {n: r.array(n)[:] for n in [*r.header.per_image_arrays, *r.per_crop_arrays]}


def assert_same_store(a, b, labels_atol=0.0):
    """Every array equal; with ``labels_atol`` the float32 labels may differ by that much (a different teacher
    batch size changes the float32 convolution's summation order, not the params or the pixels)."""
    x, y = all_arrays(a), all_arrays(b)
    assert x.keys() == y.keys() and any(k.startswith("aug/") for k in x)
    for n in x:
        assert x[n].dtype == y[n].dtype, n
        if labels_atol and n == "soft/probs":
            np.testing.assert_allclose(x[n], y[n], rtol=0, atol=labels_atol, err_msg=n)
        else:
            assert np.array_equal(x[n], y[n]), n
    ha, hb = fkdstore.open(a).header, fkdstore.open(b).header
    assert ha.aug == hb.aug and ha.augment == hb.augment


# ------------------------------------------------------------------ replay equals the stored teacher labels
@pytest.mark.parametrize("name", [*POLICIES, "all"])
def test_teacher_on_replayed_crops_equals_stored_labels(stores, digits, name):
    path = stores[name]
    r = fkdstore.open(path)
    pipe = A.parse_augment(POLICIES.get(name, ALL))
    assert r.header.augment.get_config() == pipe.get_config()
    assert [a.name for a in r.header.aug] == [c.name for c in pipe.columns()]
    teacher = tiny_cnn(10).eval()
    ds = TorchDataset(path, digits, crops_per_sample=2)
    seen_slots, mixed = set(), 0
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            for batch in loader:
                with torch.inference_mode():
                    p = torch.softmax(teacher(batch["crops"]), -1)
                assert p.shape == batch["soft_labels"].shape
                assert (p - batch["soft_labels"]).abs().max().item() <= 1e-5
                seen_slots |= set(zip(batch["index"].tolist(), batch["slots"].tolist()))
                w = batch["lam"] + batch["partner_weight"].sum(-1)
                torch.testing.assert_close(w, torch.ones_like(w))
                pt, pw = batch["partner_target"], batch["partner_weight"]
                assert ((pt >= 0) == (pw > 0) | ((pt >= 0) & (pw == 0))).all()
                assert torch.equal(batch["mixed"], (pt >= 0).any(1))
                mixed += int(batch["mixed"].sum())
    assert len(seen_slots) == 10 * 4  # two epochs of 2 crops walk all 4 slots
    if pipe.mixing:
        assert mixed > 0  # the test exercised partners
        rec = r.read_all()
        for pol in pipe.mixing:
            part = rec.aug[f"{pol.name}_partner"]
            j = part[part >= 0]
            assert (j != np.nonzero(part >= 0)[0]).all()  # never the image itself (N > 1)
            targets = r.labels[np.maximum(part, 0)]
            assert ((part < 0) | (targets >= 0)).all()


def test_replay_of_a_mixed_slot_uses_the_partners_own_crop_and_params(stores, digits):
    """The mixed pixels are the spec's equation, built here by hand from the stored values."""
    path = stores["all"]
    r = fkdstore.open(path)
    pipe = A.parse_augment(ALL)
    ds = TorchDataset(path, digits, crops_per_sample=4, normalize=False)
    rec = r.read_all()
    images = [fkdstore.images.load_image(digits / k) for k in r.image_keys]
    found = 0
    for i in range(len(r)):
        item = ds[i]
        for k, s in enumerate(item["slots"].tolist()):
            prm = A.slot_params({c: v[i] for c, v in rec.aug.items()}, s)
            if not pipe.partners(prm):
                continue
            found += 1
            x = A.crop(images[i], rec.box[i, s].tolist(), bool(rec.flip[i, s]), SIZE)
            partners = {}
            for name, j in pipe.partners(prm).items():
                pj = A.slot_params({c: v[j] for c, v in rec.aug.items()}, s)
                partners[name] = pipe.premix(A.crop(images[j], rec.box[j, s].tolist(), bool(rec.flip[j, s]), SIZE), pj)
            want = pipe.apply(x, prm, partners=partners)
            np.testing.assert_array_equal(item["crops"][k].permute(1, 2, 0).numpy(), want)
    assert found > 0


# ------------------------------------------------------------------ determinism
def test_two_runs_batch_sizes_and_workers_give_identical_stores(stores, digits, tmp_path):
    generate(tiny_cnn(10), digits, tmp_path / "again", augment=ALL, **FAST)
    assert_same_store(stores["all"], tmp_path / "again")
    generate(tiny_cnn(10), digits, tmp_path / "w", augment=ALL, **{**FAST, "num_workers": 2})
    assert_same_store(stores["all"], tmp_path / "w")
    generate(tiny_cnn(10), digits, tmp_path / "bw", augment=ALL, **{**FAST, "batch_size": 3, "num_workers": 2})
    assert_same_store(stores["all"], tmp_path / "bw", labels_atol=1e-6)  # params, boxes, flips: bit-equal


def test_world_size_does_not_change_params(stores, digits, tmp_path, monkeypatch):
    """Two ranks (RANK/WORLD_SIZE, no process group) write shards 0, 2 and 1; the store equals one process's."""
    for name in ("MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        generate(tiny_cnn(10), digits, tmp_path / "two", augment=ALL, **FAST)
    assert fkdstore.open(tmp_path / "two").complete
    assert_same_store(stores["all"], tmp_path / "two")


SLOW_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from fkdstore.testing import tiny_cnn
    from fkdstore.runner import generate

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = tiny_cnn(10)
        def forward(self, x):
            time.sleep(float(sys.argv[3]))
            return self.m(x)

    generate(Slow(), sys.argv[1], sys.argv[2], crops_per_image=4, codec={"name": "full", "dtype": "float32"},
             input_size=24, images_per_shard=4, batch_size=8, num_workers=0, progress=False, augment=sys.argv[4])
""")


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_identical_store(stores, digits, tmp_path):
    script = tmp_path / "slow_generate.py"
    script.write_text(SLOW_SCRIPT)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(digits), str(out), "0.3", ALL], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until at least one shard (4 images) is on disk
            try:
                if fkdstore.open(out).written.sum() >= 4:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("no shard was written within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = int(fkdstore.open(out).written.sum())
    assert 4 <= done < 10 and not fkdstore.open(out).complete
    subprocess.run([sys.executable, str(script), str(digits), str(out), "0", ALL], env=env, check=True)
    r = fkdstore.open(out)
    assert r.complete and r.meta["history"][-1]["images_labelled"] == 10 - done
    assert_same_store(stores["all"], out)


# ------------------------------------------------------------------ the header, inspect, the CLI
def test_inspect_shows_the_pipeline(stores, capsys):
    assert cli_main(["inspect", str(stores["all"])]) == 0
    text = capsys.readouterr().out
    assert "augment" in text and "randaugment" in text and "mixup" in text and "aug/mixup_partner" in text


def test_cli_generate_augment(digits, tmp_path, capsys):
    out = tmp_path / "cli.fkd"
    args = ["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out", str(out),
            "--crops", "4", "--codec", "full", "--input-size", str(SIZE), "--device", "cpu", "--num-workers", "0",
            "--images-per-shard", "4", "--no-progress", "--augment", "randaugment:num_ops=2;mixup:window=4"]
    assert cli_main(args) == 0
    r = fkdstore.open(out)
    assert [p["name"] for p in r.header.augment.get_config()] == ["randaugment", "mixup"]
    bad = tmp_path / "bad.fkd"
    assert cli_main([*args[:6], str(bad), *args[7:-1], "randaugment:magnitude=99"]) != 0
    assert "magnitude must be an integer in [0, 30]. Got 99." in capsys.readouterr().err
    assert not bad.exists()


def test_generate_help_documents_the_grammar(capsys):
    try:
        cli_main(["generate", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    assert "--augment SPEC" in text and 'policy := name [":" arg ("," arg)*]' in text and "window" in text


# ------------------------------------------------------------------ bad input: clear errors, nothing written
@pytest.mark.parametrize("spec, exc, message", [
    ("autoaugment", ValidationError, "augment policy name must be one of"),  # unknown op / policy
    ("randaugment:magnitude=31", ValidationError, "magnitude must be an integer in [0, 30]. Got 31."),
    ("mixup:p=1.5", ValidationError, "p must be in [0, 1]. Got 1.5."),
    ("random_erasing:p=-0.1", ValidationError, "p must be in [0, 1]. Got -0.1."),
    ("cutmix:alpha=1,beta=2", ValidationError,
     "cutmix config keys must be in ['alpha', 'p', 'window']. Got unknown ['beta']."),
    ([{"name": "mixup", "alpha": 0.2, "lam": 0.5}], ValidationError, "mixup config keys must be in"),
    ("mixup:window=-1", ValidationError, "window must be an integer in [0, 2147483647]. Got -1."),
    (3, TypeError, "augment spec must be a str, a list of configs or a Pipeline. Got int."),
])
def test_bad_augment_is_refused_before_anything_is_written(digits, tmp_path, spec, exc, message):
    out = tmp_path / "never"
    with pytest.raises(exc) as info:
        generate(tiny_cnn(10), digits, out, augment=spec, **FAST)
    assert message in str(info.value)
    assert not out.exists()


def crafted_store(path, M=3, partner=None):
    """A small store written with the writer: mixup params from the pipeline, optionally one partner edited."""
    pipe = A.parse_augment("mixup:p=1.0")
    folder = path.parent / "imgs"
    make_digits_folder(folder, size=SIZE, per_class=1)
    listing = fkdstore.images.list_images(folder)
    keys, N = listing.keys, len(listing.keys)
    params = [pipe.sample(0, i, range(M), image_size=(SIZE, SIZE), num_images=N, crops_per_image=M) for i in range(N)]
    aug = {c.name: np.stack([p[c.name] for p in params]) for c in pipe.columns()}
    if partner is not None:
        aug["mixup_partner"][partner[0], partner[1]] = partner[2]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), (N, M)).astype(np.float32)
    boxes = np.tile(np.array([0, 0, SIZE, SIZE], np.int32), (N, M, 1))
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=10, codec="full", image_keys=keys,
                        image_sizes=np.full((N, 2), SIZE), aug=[c.to_json() for c in pipe.columns()],
                        augment=pipe.get_config()) as w:
        w.put(np.arange(N), boxes, np.zeros((N, M), bool), probs, aug=aug)
    return folder


def test_partner_index_out_of_range_names_array_image_and_slot(tmp_path):
    folder = crafted_store(tmp_path / "s", partner=(2, 1, 10))  # N = 10: index 10 is out of range
    ds = TorchDataset(tmp_path / "s", folder, crops_per_sample=3)
    ds[0]  # other images replay
    with pytest.raises(CorruptStoreError) as info:
        ds[2]
    msg = str(info.value)
    assert "array aug/mixup_partner" in msg and "image 2" in msg and "slot 1" in msg
    assert "values must be in [-1, 9]. Got 10." in msg


def test_store_with_an_unknown_policy_is_refused_naming_it(tmp_path):
    crafted_store(tmp_path / "s")
    with pytest.raises(ValidationError, match="augment policy name must be one of .* Got 'autoaugment_v9'"):
        fkdstore.write(tmp_path / "w", num_images=2, crops_per_image=1, num_classes=10, codec="full",
                       image_keys=["a", "b"], image_sizes=np.full((2, 2), SIZE), augment=[{"name": "autoaugment_v9"}])
    assert not (tmp_path / "w").exists()  # the writer refuses it before a store exists
    set_header(tmp_path / "s", checksum=True, regions__augment=[{"name": "autoaugment_v9"}])  # a tool's edit
    with pytest.raises(FormatError, match="augment policy 'autoaugment_v9', which this version of fkdstore does not"):
        fkdstore.open(tmp_path / "s")


def test_store_whose_columns_differ_from_its_pipeline_is_refused(tmp_path):
    crafted_store(tmp_path / "s")
    cutmix = A.parse_augment("cutmix").get_config()
    with pytest.raises(ValidationError, match="must be the augment pipeline's columns"):
        fkdstore.write(tmp_path / "w", num_images=2, crops_per_image=1, num_classes=10, codec="full",
                       image_keys=["a", "b"], image_sizes=np.full((2, 2), SIZE),
                       aug=[c.to_json() for c in A.parse_augment("mixup").columns()], augment=cutmix)
    assert not (tmp_path / "w").exists()
    set_header(tmp_path / "s", checksum=True, regions__augment=cutmix)
    with pytest.raises(FormatError, match="must be the augment pipeline's columns"):
        fkdstore.open(tmp_path / "s")


def test_reader_stays_torch_free_with_augment_stores(stores):
    code = ("import sys, fkdstore; r = fkdstore.open(sys.argv[1]); r.read(0); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(stores["all"])], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


# ------------------------------------------------------------------ training-time mixing (FKD's way)
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_torch_mix_batch_equals_numpy_and_is_deterministic(mode, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 3, 8, 10, generator=g) * 255).to(dtype)
    y = torch.softmax(torch.randn(6, 5, generator=g), -1)
    a = mix_batch(x, y, mode, alpha=1.0, seed=3, step=7)
    b = mix_batch(x, y, mode, alpha=1.0, seed=3, step=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels, b.soft_labels) and a.lam == b.lam
    ref = A.mix_batch(x.numpy(), y.numpy(), mode=mode, alpha=1.0, seed=3, step=7)
    np.testing.assert_array_equal(a.images.numpy(), ref.images)
    np.testing.assert_allclose(a.soft_labels.numpy(), ref.soft_labels, rtol=0, atol=1e-7)
    assert a.lam == ref.lam and np.array_equal(a.index.numpy(), ref.index) and a.box == ref.box
    torch.testing.assert_close(a.soft_labels.sum(-1), torch.ones(6))
    c = mix_batch(x, y, mode, alpha=1.0, seed=3, step=8)
    assert c.lam != a.lam or not torch.equal(c.index, a.index)
    with pytest.raises(ValidationError, match="mode must be one of"):
        mix_batch(x, y, "mosaic")
    with pytest.raises(ValidationError, match=r"soft_labels must have shape \[B=6, K\]"):
        mix_batch(x, y[:5])
