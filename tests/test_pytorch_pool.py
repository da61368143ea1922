"""TorchDataset's pool of shared-memory batch buffers (fkdstore.pytorch._BatchPool): inside DataLoader workers
batch buffers are reused, but only once the main process holds no reference to a batch's memory."""

from __future__ import annotations

import gc
import os
import time
import weakref

import numpy as np
import pytest
import torch
from test_pytorch import _build
from torch.utils.data import DataLoader

import fkdstore
import fkdstore.pytorch as fp
from fkdstore.errors import ValidationError
from fkdstore.testing import make_digits_folder

pytestmark = pytest.mark.skipif(not fp._BatchPool.usable(), reason="needs Linux shared memory (file_descriptor)")

B, m = 3, 3  # 20 images: 6 full batches and one of 2 items per epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fkdpool")
    folder = make_digits_folder(d / "images", size=32, per_class=2)
    return folder, _build(d / "s.fkd", folder)


def _loader(data, pool, *, persistent=False, workers=2, **kw):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, batch_pool=pool, **kw)
    dl = DataLoader(ds, batch_size=B, num_workers=workers, collate_fn=fkdstore.collate,
                    multiprocessing_context="fork", persistent_workers=persistent)
    return ds, dl


def _buffer_id(t: torch.Tensor) -> tuple[int, int]:
    """The shared-memory file a batch tensor lives in (main process)."""
    st = os.fstat(t.untyped_storage()._share_fd_cpu_()[0])
    return st.st_dev, st.st_ino


def _epochs(ds, dl, epochs, keep):
    out, ids = [], []
    for e in range(epochs):
        ds.set_epoch(e)
        for batch in dl:
            ids.append(_buffer_id(batch["crops"]))
            out.append(keep(batch))
    return out, ids


@pytest.fixture(scope="module")
def reference(data):
    """Every batch of 4 epochs with a fresh buffer per batch (batch_pool=0)."""
    ds, dl = _loader(data, 0)
    out, ids = _epochs(ds, dl, 4, lambda b: {k: b[k].clone() for k in ("crops", "soft_labels", "index")})
    assert len(set(ids)) == len(ids)  # nothing reused without the pool
    return out


@pytest.mark.parametrize("persistent", [True, False])
def test_pool_reuses_buffers_and_pixels_match(data, reference, persistent):
    ds, dl = _loader(data, 4, persistent=persistent)
    out, ids = _epochs(ds, dl, 4, lambda b: {k: b[k].clone() for k in ("crops", "soft_labels", "index")})
    assert len(out) == len(reference)
    for got, ref in zip(out, reference):
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
    # reused across batches, and (non-persistent workers) across epochs through the buffers the main process kept
    assert len(set(ids)) < len(ids) // 2
    # at most batch_pool buffers per batch size and worker (two sizes: full batches and the last one)
    assert len(set(ids)) <= 2 * 4 * 2
    if not persistent:
        assert sum(len(v) for v in ds._retained.values()) <= 2 * 4 * 2


def test_held_batches_are_never_refilled(data, reference):
    """Holding every batch (list(loader)) forces fresh buffers: no batch is overwritten while it is held."""
    for pool in (1, 4):
        ds, dl = _loader(data, pool)
        out, ids = _epochs(ds, dl, 2, lambda b: b)  # the batches themselves, all held
        assert len(set(ids)) == len(ids)
        for got, ref in zip(out, reference):
            assert torch.equal(got["crops"], ref["crops"]) and torch.equal(got["index"], ref["index"])


def test_views_kept_after_the_batch_is_dropped_stay_intact(data, reference):
    """Slices, detach(), numpy() and from_numpy(numpy()) of a batch keep its buffer busy after the batch dict
    is dropped; the workers go on with other buffers."""
    keeps = [lambda c: c[1:4], lambda c: c.detach(), lambda c: c.numpy(), lambda c: torch.from_numpy(c.numpy())[2],
             lambda c: c.view(-1)[5:50]]
    ds, dl = _loader(data, 2, persistent=True)
    kept = []
    for e in range(3):
        ds.set_epoch(e)
        for j, batch in enumerate(dl):
            kept.append(keeps[(len(kept)) % len(keeps)](batch["crops"]) if j % 2 == 0 else None)
            del batch
            gc.collect()
    for k, (v, ref) in enumerate(zip(kept, reference)):
        if v is None:
            continue
        want = keeps[k % len(keeps)](ref["crops"].clone())
        assert np.array_equal(np.asarray(v), np.asarray(want)), k


def test_two_live_loaders_over_one_dataset_never_share_a_buffer(data, reference):
    """Two iterators alive at once (non-persistent workers forked from one main process) inherit the same kept
    buffers; a worker owns each buffer it uses (an open-file-description lock), so their batches stay correct."""
    ds, dl = _loader(data, 2)
    ds.set_epoch(0)
    for _ in dl:  # the main process now keeps buffers for the next workers
        pass
    assert ds._retained
    for e in (1, 2):
        ds.set_epoch(e)
        got_a, got_b = [], []
        for a, b in zip(iter(dl), iter(dl)):
            got_a.append(a["crops"].clone())
            got_b.append(b["crops"].clone())
        per_epoch = reference[7 * e:7 * e + 7]
        assert len(got_a) == len(got_b) == 7
        for x, y, ref in zip(got_a, got_b, per_epoch):
            assert torch.equal(x, ref["crops"]) and torch.equal(y, ref["crops"])


def test_sparse_labels_and_uint8_use_the_pool_too(data):
    _, dl = _loader(data, 3, persistent=True, normalize=False, soft_labels="sparse")
    _, dl0 = _loader(data, 0, normalize=False, soft_labels="sparse")
    got = [b["crops"].clone() for b in dl]
    ref = [b["crops"].clone() for b in dl0]
    assert all(torch.equal(x, y) for x, y in zip(got, ref)) and len(got) == len(ref) == 7
    assert got[0].dtype == torch.uint8


def test_finalizer_tracks_the_storage_not_the_tensor():
    """The rule the pool relies on (PyTorch keeps a storage's Python object as long as the C++ storage lives):
    a finalizer on a tensor's storage runs only after every view, numpy array and from_numpy alias is gone."""
    for keep in (lambda t: t[0], lambda t: t.detach(), lambda t: t.numpy(), lambda t: torch.from_numpy(t.numpy()),
                 lambda t: t._typed_storage(), lambda t: torch.empty(0).set_(t.untyped_storage(), 0, (4,), (1,))):
        fired = []
        t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
        weakref.finalize(t.untyped_storage(), fired.append, 1)
        k = keep(t)
        del t
        gc.collect()
        assert not fired
        del k
        gc.collect()
        assert fired


def test_no_workers_and_bad_argument(data):
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, batch_pool=4)
    items = ds.__getitems__([0, 1])  # main process: a plain tensor, no pool
    assert not items[0]["crops"].is_shared() and not fp._BatchPool.pools
    for bad in (-1, 1.5, "4"):
        with pytest.raises((ValidationError, TypeError)):
            fkdstore.TorchDataset(store, folder, batch_pool=bad)


def test_batches_dropped_unread_do_not_keep_buffers_busy(data, reference):
    """Leaving a loop early (non-persistent workers) drops the prefetched batches unread; the main process marks
    their kept buffers released once no worker owns them, so later epochs still reuse buffers."""
    ds, dl = _loader(data, 4)
    for batch in dl:  # a whole epoch: the main process keeps buffers
        pass
    stale = []  # kept buffers handed out to a batch the loop then dropped (or held) when it left early
    for e in range(3):
        ds.set_epoch(e)
        for batch in dl:
            # wait (not a fixed sleep: a loaded machine is slow) until the workers have sent prefetched batches
            # in kept buffers besides this one, which the main process will now drop unread
            deadline = time.monotonic() + 60
            while sum(int(b.counters[0] - b.counters[1]) for kept in ds._retained.values() for b in kept) < 2:
                assert time.monotonic() < deadline, "the workers sent no prefetched batch in a kept buffer"
                time.sleep(0.02)
            # the witnesses, taken now: how soon their release is seen (iterator shutdown, gc) is timing
            stale += [b for kept in ds._retained.values() for b in kept if b.counters[0] != b.counters[1]]
            break
        del batch
        gc.collect()
    out, ids = _epochs(ds, dl, 3, lambda b: b["crops"].clone())
    assert all(torch.equal(x, ref["crops"]) for x, ref in zip(out, reference)) and len(out) == 21
    kept = {b.key for bufs in ds._retained.values() for b in bufs}
    assert sum(i in kept for i in ids[-7:]) >= 4  # the last epoch's workers reuse the buffers the main process kept
    assert stale and all(b.counters[0] == b.counters[1] for b in stale)  # there were lost batches; released now


def test_spawn_workers_reuse_their_own_buffers(data, reference):
    """A spawned worker inherits nothing: it keeps its own buffers (the main process keeps none for it)."""
    folder, store = data
    ds = fkdstore.TorchDataset(store, folder, crops_per_sample=m, batch_pool=2)
    dl = DataLoader(ds, batch_size=B, num_workers=1, collate_fn=fkdstore.collate, multiprocessing_context="spawn",
                    persistent_workers=True)
    out, ids = _epochs(ds, dl, 2, lambda b: b["crops"].clone())
    assert all(torch.equal(x, ref["crops"]) for x, ref in zip(out, reference)) and len(out) == 14
    assert len(set(ids)) < len(ids) and not ds._retained


def test_a_copy_of_the_dataset_keeps_its_own_buffers(data):
    import copy

    ds, dl = _loader(data, 2)
    for _ in dl:
        pass
    twin = copy.deepcopy(ds)
    assert twin._pool_token != ds._pool_token and not twin._retained and ds._retained
