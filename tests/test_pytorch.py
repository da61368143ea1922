"""TorchDataset, collate, densify and soft_cross_entropy (fkdstore.pytorch)."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faultutil import set_header
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import fkdstore
from fkdstore.errors import CorruptStoreError, FormatError, IncompleteStoreError, ValidationError
from fkdstore.images import list_images, load_image
from fkdstore.pytorch import epoch_slots
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import make_digits_folder, tiny_cnn
from fkdstore.transforms import IMAGENET_MEAN, IMAGENET_STD, Replay, normalize, replay_crops

ROOT = Path(__file__).resolve().parents[1]
M, C, SIZE = 8, 10, 24
REPLAY = Replay(input_size=SIZE, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _teacher():
    return tiny_cnn(C, width=8, seed=1).eval()


def _build(path, folder, *, codec=None, only=None):  # folder: a folder or a file list
    """A store labelled by a tiny teacher on replay_crops of SlotCropSampler boxes (what the teacher runner does).
    ``only``: write just these images (an incomplete store)."""
    lst = list_images(folder)
    N = len(lst)
    sizes = np.array([tuple(reversed(Image.open(p).size)) for p in lst.paths])
    sampler, teacher = SlotCropSampler(seed=3), _teacher()
    w = fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C,
                       codec=codec or {"name": "full", "dtype": "float32"}, image_keys=lst.keys,
                       image_sizes=sizes, labels=lst.labels, replay=REPLAY, images_per_chunk=4, images_per_shard=8)
    with w, torch.no_grad():
        for i in (range(N) if only is None else only):
            boxes, flips = sampler.sample(i, *sizes[i], M)
            x = normalize(replay_crops(load_image(lst.paths[i]), boxes, flips, SIZE), IMAGENET_MEAN, IMAGENET_STD)
            w.put([i], boxes[None], flips[None], teacher(x).softmax(-1)[None])
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fkd")
    folder = make_digits_folder(d / "images", size=32, per_class=2)  # 20 images
    store = _build(d / "s.fkd", folder)
    return folder, store


def _by_index(loader):
    out = {}
    for batch in loader:
        m = len(batch["index"]) // len(torch.unique(batch["index"]))
        for r in range(0, len(batch["index"]), m):
            i = int(batch["index"][r])
            assert i not in out
            out[i] = batch["slots"][r:r + m].tolist()
    return out


# ------------------------------------------------------------------------------------------- replay


def test_replay_matches_teacher_and_pixels(data):
    folder, store = data
    reader = fkdstore.open(store)
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=M)  # epoch 0 with m = M: every slot once
    raw = fkdstore.TorchDataset(store, folder, crops_per_sample=M, normalize=False)
    assert ds.output_size == (SIZE, SIZE) and ds.interpolation == "bilinear"  # from the header's replay
    teacher, paths = _teacher(), list_images(folder).paths
    for i in range(len(ds)):
        item, u8 = ds[i], raw[i]
        slots = item["slots"].numpy()
        assert sorted(slots.tolist()) == list(range(M))
        rec = reader.read(i, slots)
        expected = replay_crops(load_image(paths[i]), rec.boxes, rec.flips, SIZE)
        assert u8["crops"].dtype == torch.uint8 and torch.equal(u8["crops"], expected)
        assert torch.equal(item["crops"], normalize(expected, IMAGENET_MEAN, IMAGENET_STD))
        with torch.no_grad():
            out = teacher(item["crops"]).softmax(-1)
        np.testing.assert_allclose(item["soft_labels"].numpy(), reader.decode(rec.fields), atol=1e-6)
        np.testing.assert_allclose(out.numpy(), item["soft_labels"].numpy(), atol=1e-5)
        assert item["target"] == int(reader.labels[i]) and item["index"] == i


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_replay_matches_generate(data, tmp_path):
    folder, _ = data
    teacher = _teacher()
    path = tmp_path / "g.fkd"
    fkdstore.generate(teacher, folder, path, crops_per_image=4, codec="ms", input_size=SIZE,
                      crop_sampler=SlotCropSampler(seed=0),
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    ds = fkdstore.TorchDataset(path, folder, crops_per_sample=4)
    batch = fkdstore.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        out = teacher(batch["crops"]).softmax(-1)
    # MS top-5 fp16: the stored top-5 are the teacher's within fp16 rounding
    top = batch["soft_labels"].topk(5, -1)
    np.testing.assert_allclose(out.gather(-1, top.indices).numpy(), top.values.numpy(), atol=2e-3)


# ------------------------------------------------------------------------------------ epoch -> slots


@settings(max_examples=40, deadline=None)
@given(M_=st.integers(1, 12), m=st.integers(1, 12), seed=st.integers(0, 2**32), i=st.integers(0, 10**6))
def test_epoch_slots_walk_permutations(M_, m, seed, i):
    m = min(m, M_)
    epochs = (3 * M_) // m + 2
    walked = np.concatenate([epoch_slots(i, e, m, M_, seed) for e in range(epochs)])
    for c in range(len(walked) // M_):  # consecutive epochs: fresh slots until the pool is exhausted
        perm = np.random.default_rng(np.random.SeedSequence([seed, i, c])).permutation(M_)
        assert walked[c * M_:(c + 1) * M_].tolist() == perm.tolist()
    e = epochs // 2
    assert epoch_slots(i, e, m, M_, seed).tolist() == walked[e * m:(e + 1) * m].tolist()


def test_fresh_slots_until_exhausted(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=2, seed=5)
    used = []
    for e in range(M // 2):
        ds.set_epoch(e)
        used.append(ds[3]["slots"].tolist())
    assert sorted(sum(used, [])) == list(range(M))
    ds.set_epoch(M // 2)  # second pass: a new permutation
    assert ds[3]["slots"].tolist() == epoch_slots(3, M // 2, 2, M, 5).tolist()
    assert fkdstore.TorchDataset(store, folder, crops_per_sample=2, seed=6).slots(3, 0).tolist() != used[0] \
        or fkdstore.TorchDataset(store, folder, crops_per_sample=2, seed=7).slots(3, 0).tolist() != used[0]


@pytest.mark.slow
def test_slots_invariant_across_workers_and_batch_sizes(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=3, seed=1, epoch=2)
    ref = _by_index(DataLoader(ds, batch_size=4, collate_fn=fkdstore.collate))
    assert len(ref) == len(ds)
    for ctx, bs in (("fork", 3), ("spawn", 7)):
        dl = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=2, collate_fn=fkdstore.collate,
                        multiprocessing_context=ctx)
        assert _by_index(dl) == ref, ctx


@pytest.mark.slow
def test_persistent_workers_follow_set_epoch(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=2)
    dl = DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True, collate_fn=fkdstore.collate,
                    multiprocessing_context="fork")
    for e in (0, 1, 3):
        ds.set_epoch(e)
        got = _by_index(dl)
        assert got == {i: epoch_slots(i, e, 2, M, 0).tolist() for i in range(len(ds))}


def test_slots_invariant_across_world_size(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=3, epoch=1)
    def run(world, rank, bs):
        s = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
        s.set_epoch(1)
        return _by_index(DataLoader(ds, batch_size=bs, sampler=s, collate_fn=fkdstore.collate))
    one = run(1, 0, 4)
    two = [run(2, r, 3) for r in (0, 1)]
    assert not set(two[0]) & set(two[1])  # 20 images: no padding duplicates
    assert {**two[0], **two[1]} == one and len(one) == len(ds)


def test_pickle_reopens_store_lazily(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=2)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader is None
    assert torch.equal(clone[5]["crops"], ds[5]["crops"])
    reader_ds = fkdstore.TorchDataset(fkdstore.open(store), folder, crops_per_sample=2)
    assert torch.equal(pickle.loads(pickle.dumps(reader_ds))[5]["soft_labels"], ds[5]["soft_labels"])


# -------------------------------------------------------------------------------------------- errors


def _copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_image_size_mismatch_names_the_image(data, tmp_path):
    folder, store = data
    copy = _copy(folder, tmp_path)
    key = list_images(copy).keys[4]
    Image.open(copy / key).resize((30, 32)).save(copy / key)
    ds = fkdstore.TorchDataset(store, copy, crops_per_sample=2)
    ds[3]
    with pytest.raises(ValidationError, match=rf"image 4 \(.*{key}\) has size \(height=32, width=30\) but the "
                                              rf"store recorded \(height=32, width=32\)"):
        ds[4]


def test_missing_image_names_it(data, tmp_path):
    folder, store = data
    copy = _copy(folder, tmp_path)
    key = list_images(copy).keys[7]
    os.remove(copy / key)
    with pytest.raises(FileNotFoundError, match=rf"image '{key}' \(store index 7\) is missing from .*1 of the "
                                                rf"store's 20 images are missing"):
        fkdstore.TorchDataset(store, copy)
    # a file deleted after the dataset was built fails when it is loaded, naming the path
    copy2 = Path(shutil.copytree(folder, tmp_path / "copy2"))
    ds = fkdstore.TorchDataset(store, copy2)
    os.remove(copy2 / key)
    with pytest.raises(FileNotFoundError, match=key.split("/")[-1]):
        ds[7]


def test_mismatched_folder_names_first_mismatch(data, tmp_path):
    folder, store = data
    copy = _copy(folder, tmp_path)
    Image.new("RGB", (32, 32)).save(copy / "3" / "extra.png")
    with pytest.raises(ValidationError, match=r"'3/extra.png' is in .* but not in the store \(1 extra images\)"):
        fkdstore.TorchDataset(store, copy)
    paths = [str(folder / k) for k in list_images(folder).keys]
    listed = _build(tmp_path / "list.fkd", paths)  # a store made from a file list: keys are the paths
    fkdstore.TorchDataset(listed, paths)
    with pytest.raises(ValidationError, match=rf"position 0 is '{paths[0]}' in the store but '{paths[1]}'"):
        fkdstore.TorchDataset(listed, [paths[1], paths[0], *paths[2:]])


def test_incomplete_store_refused_unless_allowed(data, tmp_path):
    folder, _ = data
    store = _build(tmp_path / "inc.fkd", folder, only=range(8))  # shard 0 written, shard 1-2 not
    with pytest.raises(IncompleteStoreError, match=r"12 of 20 images are not written \(first: image 8"):
        fkdstore.TorchDataset(store, folder)
    ds = fkdstore.TorchDataset(store, folder, allow_incomplete=True, crops_per_sample=2)
    assert len(ds) == 8 and ds.image_indices.tolist() == list(range(8))
    assert [ds[j]["index"] for j in range(8)] == list(range(8))
    with pytest.raises(IndexError):
        ds[8]


def test_argument_errors(data):
    folder, store = data
    with pytest.raises(ValidationError, match="crops_per_sample must be <= the store's crops_per_image=8"):
        fkdstore.TorchDataset(store, folder, crops_per_sample=9)
    with pytest.raises(ValidationError, match="soft_labels must be one of"):
        fkdstore.TorchDataset(store, folder, soft_labels="soft")
    with pytest.raises(ValidationError, match="interpolation"):
        fkdstore.TorchDataset(store, folder, interpolation="cubic")
    with pytest.raises(ValidationError, match="epoch"):
        fkdstore.TorchDataset(store, folder).set_epoch(-1)


# ------------------------------------------------------------------------------ collate, densify, loss


def test_collate_and_densify(data, tmp_path):
    folder, _ = data
    store = _build(tmp_path / "ms.fkd", folder, codec={"name": "ms", "k": 3})
    dense = fkdstore.TorchDataset(store, folder, crops_per_sample=3, output_size=16)
    sparse = fkdstore.TorchDataset(store, folder, crops_per_sample=3, output_size=16, soft_labels="sparse")
    items = [2, 9, 11, 0]
    bd = DataLoader(dense, batch_size=4, sampler=items, collate_fn=fkdstore.collate)
    bs = DataLoader(sparse, batch_size=4, sampler=items, collate_fn=fkdstore.collate)
    bd, bs = next(iter(bd)), next(iter(bs))
    assert bd["crops"].shape == (12, 3, 16, 16) and bd["crops"].dtype == torch.float32
    assert bd["soft_labels"].shape == (12, C)
    assert bd["index"].tolist() == [2] * 3 + [9] * 3 + [11] * 3 + [0] * 3
    assert bd["target"].tolist() == np.repeat(fkdstore.open(store).labels[items], 3).tolist()
    assert set(bs["soft_labels"]) == {"indices", "probs"} and bs["soft_labels"]["indices"].shape == (12, 3)
    assert torch.equal(bs["crops"], bd["crops"]) and torch.equal(bs["slots"], bd["slots"])
    for ref in (sparse, fkdstore.open(store)):
        assert torch.equal(fkdstore.densify(bs["soft_labels"], ref, device="cpu"), bd["soft_labels"])
    codec = fkdstore.get_codec("ms", k=3)
    assert torch.equal(fkdstore.densify(bs["soft_labels"], codec, num_classes=C), bd["soft_labels"])
    with pytest.raises(ValidationError, match="num_classes is required"):
        fkdstore.densify(bs["soft_labels"], codec)
    np.testing.assert_allclose(bd["soft_labels"].sum(-1).numpy(), 1, atol=2e-3)


def test_collate_returns_batch_buffers_without_copy(data):
    """__getitems__ writes every item's crops (and decodes every label) into one batch tensor; collate hands
    those back as the batch. Items from separate calls are concatenated as before."""
    folder, store = data
    for normalize_ in (True, False):
        ds = fkdstore.TorchDataset(store, folder, crops_per_sample=3, normalize=normalize_, epoch=1)
        items = ds.__getitems__([4, 0, 17])
        batch = fkdstore.collate(items)
        assert batch["crops"].data_ptr() == items[0]["crops"].data_ptr()
        assert batch["soft_labels"].data_ptr() == items[0]["soft_labels"].data_ptr()
        separate = fkdstore.collate([ds[4], ds[0], ds[17]])
        assert separate["crops"].data_ptr() != batch["crops"].data_ptr()
        for key in ("crops", "soft_labels", "slots", "index", "target"):
            assert torch.equal(batch[key], separate[key]), key
        assert batch["crops"].dtype == (torch.float32 if normalize_ else torch.uint8)
        assert batch["crops"].shape == (9, 3, SIZE, SIZE) and batch["slots"].shape == (9,)
        # a subset or reordering of one call's items is not the buffer: it is concatenated
        part = fkdstore.collate([items[2], items[0]])
        assert torch.equal(part["crops"], torch.cat([items[2]["crops"], items[0]["crops"]]))
        assert part["crops"].data_ptr() != batch["crops"].data_ptr()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(2, 20), seed=st.integers(0, 2**31), scale=st.floats(0.1, 30))
def test_soft_ce_with_one_hot_equals_cross_entropy(n, c, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=g)
    got = fkdstore.soft_cross_entropy(logits, F.one_hot(y, c).double())
    torch.testing.assert_close(got, F.cross_entropy(logits.float(), y), rtol=1e-5, atol=1e-5)


def test_soft_ce_temperature_and_reduction():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g).softmax(-1)
    per_row = -(target * F.log_softmax(logits / 2.0, -1)).sum(-1)  # no T**2 factor
    torch.testing.assert_close(fkdstore.soft_cross_entropy(logits, target, 2.0, reduction="none"), per_row)
    torch.testing.assert_close(fkdstore.soft_cross_entropy(logits, target, 2.0), per_row.mean())
    torch.testing.assert_close(fkdstore.soft_cross_entropy(logits, target, 2.0, reduction="sum"), per_row.sum())
    # gradient w.r.t. logits (T=1) is softmax - target, per row / n
    x = logits.clone().requires_grad_()
    fkdstore.soft_cross_entropy(x, target).backward()
    torch.testing.assert_close(x.grad, (logits.softmax(-1) - target) / 5)
    with pytest.raises(ValidationError, match="same shape"):
        fkdstore.soft_cross_entropy(logits, target[:, :3])
    with pytest.raises(ValidationError, match="temperature"):
        fkdstore.soft_cross_entropy(logits, target, 0.0)


# ---------------------------------------------------------------------------------------- example


def test_soft_labels_mode_is_checked(data, tmp_path):
    folder, _ = data
    store = _build(tmp_path / "s.fkd", folder)
    with pytest.raises(ValidationError, match=r"soft_labels must be one of \['dense', 'sparse'\]. Got 'x'"):
        fkdstore.TorchDataset(store, folder, soft_labels="x")


def test_crafted_input_size_is_refused_not_allocated(data, tmp_path):
    """The replay parameters are in the checksummed header: a hand edit of input_size breaks the checksum, a
    tool's edit (checksum recomputed) claiming 40000 px is refused at open (cap 1024), so no item allocates
    gigabytes; an input_size in meta (outside the checksum) no longer steers TorchDataset."""
    folder, _ = data
    store = _build(tmp_path / "s.fkd", folder)
    set_header(store, meta={"input_size": 40000})  # meta is outside the header checksum: ignored
    assert fkdstore.TorchDataset(store, folder).output_size == (SIZE, SIZE)
    set_header(store, replay__input_size=[40000, 40000])
    with pytest.raises(CorruptStoreError, match="checksum"):
        fkdstore.TorchDataset(store, folder)
    set_header(store, checksum=True, replay__input_size=[40000, 40000])
    for kw in ({}, {"output_size": 16}):  # the store does not open at all, whatever the caller asks
        with pytest.raises(FormatError, match=r"input_size height must be an integer in \[1, 1024\]. Got 40000"):
            fkdstore.TorchDataset(store, folder, **kw)
