"""The (image, target) item layout and the fast path on public APIs: uint8 batches from the workers and
DeviceLoader's normalisation on the device, equal to the float32 crops bit for bit (fkdstore.pytorch)."""

from __future__ import annotations

import gc
import inspect
import pickle
import re
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.nn.functional as F
from test_pytorch import C, _build
from torch.utils.data import DataLoader, default_collate

import fkdstore
import fkdstore.pytorch as fp
from fkdstore.errors import ValidationError
from fkdstore.testing import make_digits_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    folder = make_digits_folder(d / "images", size=32, per_class=1)  # 10 images
    return folder, _build(d / "s.fkd", folder, codec={"name": "ms", "k": 3})


def dict_batch(folder, store, m, items, **kw):
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, epoch=1, **kw)
    return fkdstore.collate(ds.__getitems__(items))


@pytest.mark.parametrize("m", [1, 3])
def test_pair_items_with_default_collate_equal_the_dict_items(data, m):
    folder, store = data
    ref = dict_batch(folder, store, m, [4, 1, 7])
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, epoch=1, item="pair")
    items = ds.__getitems__([4, 1, 7])
    image, target = items[0]
    assert image.shape == ((3, 24, 24) if m == 1 else (m, 3, 24, 24)) and target.shape == ((C,) if m == 1 else (m, C))
    x, y = default_collate(items)
    assert x.shape == ((3, 3, 24, 24) if m == 1 else (3, m, 3, 24, 24))
    assert torch.equal(x.reshape(-1, 3, 24, 24), ref["crops"]) and torch.equal(y.reshape(-1, C), ref["soft_labels"])
    x2, y2 = fkdstore.collate(items)  # flattened, without a copy
    assert torch.equal(x2, ref["crops"]) and torch.equal(y2, ref["soft_labels"])
    assert x2.data_ptr() == items[0][0].data_ptr()
    assert torch.equal(torch.stack([ds[i][0] for i in (4, 1, 7)]).reshape(-1, 3, 24, 24), ref["crops"])
    # any loss taking soft targets: F.cross_entropy with probabilities == fkdstore's soft cross-entropy
    logits = torch.randn(len(x2), C)
    torch.testing.assert_close(F.cross_entropy(logits, y2), fkdstore.soft_cross_entropy(logits, y2))


def test_pair_items_through_dataloader_workers_and_sparse_targets(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=2, epoch=1, item="pair", soft_labels="sparse",
                               normalize=False)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)  # torch's default collate
    dense = fkdstore.TorchDataset(store, folder, crops_per_sample=2, epoch=1)
    n = 0
    for b, (x, fields) in enumerate(loader):
        assert x.dtype == torch.uint8 and x.shape[1:] == (2, 3, 24, 24) and set(fields) == {"indices", "probs"}
        ref = fkdstore.collate(dense.__getitems__(list(range(4 * b, 4 * b + len(x)))))
        y = fkdstore.densify({k: v.flatten(0, 1) for k, v in fields.items()}, ds)
        torch.testing.assert_close(y, ref["soft_labels"], rtol=0, atol=1e-6)
        assert torch.equal(fkdstore.transforms.normalize(x.flatten(0, 1), ds.mean, ds.std), ref["crops"])
        n += len(x)
    assert n == len(ds)


@pytest.mark.parametrize("item", ["dict", "pair"])
def test_device_loader_normalises_uint8_as_the_float32_dataset(data, item):
    folder, store = data
    u8 = fkdstore.TorchDataset(store, folder, crops_per_sample=2, epoch=1, normalize=False, soft_labels="sparse",
                               item=item)
    loader = DataLoader(u8, batch_size=3, collate_fn=fkdstore.collate)
    dev = fkdstore.DeviceLoader(loader, "cpu", channels_last=True)
    assert len(dev) == len(loader) and dev.dataset is u8 and dev.sampler is loader.sampler
    ref = fkdstore.TorchDataset(store, folder, crops_per_sample=2, epoch=1)
    seen = 0
    for b, batch in enumerate(dev):
        x, y = (batch["crops"], batch["soft_labels"]) if item == "dict" else batch
        want = fkdstore.collate(ref.__getitems__(list(range(3 * b, min(3 * b + 3, len(ref))))))
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, want["crops"])  # bit for bit: the operations of normalize()
        torch.testing.assert_close(y, want["soft_labels"], rtol=0, atol=1e-6)
        if item == "dict":
            assert torch.equal(batch["target"], want["target"])
        seen += 1
    assert seen == len(loader)
    half = next(iter(fkdstore.DeviceLoader(loader, "cpu", dtype=torch.bfloat16)))
    assert half["crops" if item == "dict" else 0].dtype == torch.bfloat16


def test_device_loader_errors():
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        fkdstore.DeviceLoader([], "cpu", dtype=torch.uint8)
    with pytest.raises(ValidationError, match="std values must be > 0"):
        fkdstore.DeviceLoader([], "cpu", std=(1, 0, 1))
    sparse = [(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), {"indices": torch.zeros(1, 3, dtype=torch.int32)})]
    with pytest.raises(ValidationError, match=r"DeviceLoader needs dataset= \(a TorchDataset\) to densify"):
        list(fkdstore.DeviceLoader(sparse, "cpu"))
    with pytest.raises(TypeError, match="DeviceLoader batches must be dicts with 'crops'"):
        list(fkdstore.DeviceLoader([torch.zeros(2)], "cpu"))


def test_item_and_output_size_arguments(data):
    folder, store = data
    with pytest.raises(ValidationError, match=r"item must be one of \['dict', 'pair'\]\. Got 'tuple'\."):
        fkdstore.TorchDataset(store, folder, item="tuple")
    with pytest.raises(TypeError, match=r"output_size must be an int or a \(height, width\) pair of ints\. "
                                        r"Got '32' \(str\)\."):
        fkdstore.TorchDataset(store, folder, output_size="32")
    with pytest.raises(ValidationError, match=r"batch_pool must be a non-negative integer\. Got -1\."):
        fkdstore.TorchDataset(store, folder, batch_pool=-1)


def test_the_fast_path_uses_public_torch_apis_only():
    """No torch._C, no private storage or tensor methods, no process-wide pickler changes (the removed pool)."""
    src = inspect.getsource(fp)
    assert "torch._C" not in src and "ForkingPickler" not in src and "fcntl" not in src
    private = set(re.findall(r"\.(_[a-z][a-z_]*)\(", src)) | set(re.findall(r"\.(_base)\b", src))
    ours = {name for name in private if hasattr(fp, name) or hasattr(fp.TorchDataset, name)
            or hasattr(fp.DeviceLoader, name)}
    assert private - ours == set(), private - ours


# ------------------------------------------------------------------ shared batch buffers (public APIs only)
@pytest.mark.parametrize("persistent", [True, False])
def test_pooled_batches_equal_fresh_ones_and_held_batches_stay_intact(data, persistent):
    folder, store = data
    ref = fkdstore.TorchDataset(store, folder, crops_per_sample=2, normalize=False, batch_pool=0)
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=2, normalize=False, batch_pool=2)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=fkdstore.collate, persistent_workers=persistent)
    held, views = [], []
    for epoch in range(4):  # 5 batches per epoch, 2 workers with 2 buffers each: buffers are refilled
        ds.set_epoch(epoch)
        ref.set_epoch(epoch)
        for b, batch in enumerate(loader):
            want = fkdstore.collate(ref.__getitems__([2 * b, 2 * b + 1]))["crops"]
            assert type(batch["crops"]) is torch.Tensor and torch.equal(batch["crops"], want), (epoch, b)
            if epoch == 1:
                held.append((batch["crops"], want))  # whole batches kept
            if epoch == 2 and b < 2:
                views.append((batch["crops"][1], batch["crops"].numpy()[2], want[1], want[2].numpy()))  # parts kept
    for x, want in held:
        assert torch.equal(x, want)
    for v, n, wv, wn in views:
        assert torch.equal(v, wv) and (n == wn).all()


def test_pair_items_with_default_collate_release_their_buffers(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=1, normalize=False, item="pair", batch_pool=1)
    ref = fkdstore.TorchDataset(store, folder, crops_per_sample=1, normalize=False, item="pair", batch_pool=0)
    loader = DataLoader(ds, batch_size=3, num_workers=1, persistent_workers=True)  # torch's default collate copies
    for _ in range(2):
        for b, (x, y) in enumerate(loader):
            wx, wy = default_collate(ref.__getitems__(list(range(3 * b, min(3 * b + 3, len(ref))))))
            assert torch.equal(x, wx) and torch.equal(y, wy)


@pytest.fixture
def in_worker(monkeypatch):
    """This process plays a DataLoader worker (torch.utils.data.get_worker_info() is not None) with an empty pool."""
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    monkeypatch.setattr(fp._Pool, "pid", None)


def test_buffer_is_refilled_only_after_every_user_is_gone(in_worker):
    class DS:
        batch_pool, _pool_token = 2, "t"

    shape = (2, 3, 32, 32)
    t = fp._batch_tensor(DS, shape, torch.uint8)
    buf = fp._Pool.leased[t.data_ptr()]
    t.numpy()[:] = 7
    batch = fkdstore.collate([{"crops": c, "soft_labels": torch.zeros(3), "target": 0, "index": i,
                               "slots": torch.zeros(1, dtype=torch.int64)} for i, c in enumerate(t.unbind(0))])
    assert type(batch["crops"]).__name__ == "_PooledBatch" and not buf.free()
    payload = ForkingPickler.dumps(batch)  # what a worker sends: the buffer and its counter, no pixels
    assert len(payload) < t.numel() // 4
    del batch, t
    gc.collect()
    assert not buf.free() and buf.sent == 1  # sent, not yet released by the receiver
    got = pickle.loads(payload)["crops"]  # the main process's side
    assert type(got) is torch.Tensor and got.shape == (6, 32, 32) and int(got.sum()) == 7 * 6 * 32 * 32
    view, array, detached = got[1], got.numpy(), got.detach()
    del got
    for keep in (view, array, detached):
        gc.collect()
        assert not buf.free()  # any user of the memory keeps the buffer busy
        del keep
    del view, array, detached
    gc.collect()
    assert buf.free() and int(buf.done[0]) == 1
    again = fp._batch_tensor(DS, shape, torch.uint8)
    assert fp._Pool.leased[again.data_ptr()] is buf  # refilled
    other = fp._batch_tensor(DS, shape, torch.uint8)  # the first is busy (held here): a second buffer
    third = fp._batch_tensor(DS, shape, torch.uint8)  # both busy and batch_pool=2: a plain tensor
    assert fp._Pool.leased[other.data_ptr()] is not buf and third.data_ptr() not in fp._Pool.leased
    assert third.is_shared()  # on fresh shared memory, as default_collate's batches: sending copies nothing
    derived = fp._pooled(fp._join(list(again.unbind(0)))) + 0  # computed from a pooled batch: a plain send
    assert pickle.loads(ForkingPickler.dumps(derived)).data_ptr() != again.data_ptr()
    assert fp._Pool.leased[again.data_ptr()].sent == 1
    del again
    gc.collect()
    assert buf.free()  # never sent, dropped by the worker: free again


def test_without_the_pool_a_worker_batch_is_on_fresh_shared_memory(in_worker):
    """batch_pool=0: each batch in a worker is a new tensor on shared memory (sending copies nothing), never a
    pool buffer; outside a worker a plain tensor."""
    class DS:
        batch_pool, _pool_token = 0, "t0"

    a, b = (fp._batch_tensor(DS, (2, 3, 8, 8), torch.float32) for _ in range(2))
    assert a.is_shared() and b.is_shared() and a.data_ptr() != b.data_ptr()
    assert a.data_ptr() not in fp._Pool.leased and b.data_ptr() not in fp._Pool.leased
    torch.utils.data.get_worker_info = lambda: None  # the fixture's monkeypatch restores it
    assert not fp._batch_tensor(DS, (2, 3, 8, 8), torch.float32).is_shared()
