"""Reader (0.1 store module): round trips, slots, fast path vs Zarr, refusals, corruption, pickling. Writer tests
are in test_writer.py (shared helpers make_data/create/fill live here)."""

import multiprocessing as mp
import pickle

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fkdstore
from fkdstore import schema as S
from fkdstore import store as store_mod
from fkdstore.codecs import REGISTRY, get_codec
from fkdstore.errors import FormatError, ValidationError


def make_data(N, M, C, seed=0, max_side=300):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, max_side, (N, 2))
    probs = rng.dirichlet(np.full(C, 0.2), (N, M)).astype(np.float32)
    h = rng.integers(1, sizes[:, None, 0] + 1, (N, M))
    w = rng.integers(1, sizes[:, None, 1] + 1, (N, M))
    top = (rng.random((N, M)) * (sizes[:, None, 0] - h + 1)).astype(int)
    left = (rng.random((N, M)) * (sizes[:, None, 1] - w + 1)).astype(int)
    boxes = np.stack([top, left, h, w], -1)
    flips = rng.random((N, M)) < 0.5
    keys = [f"class{i % 3}/img_{i:05d}.jpg" for i in range(N)]
    labels = rng.integers(-1, C, N)
    return dict(sizes=sizes, probs=probs, boxes=boxes, flips=flips, keys=keys, labels=labels)


def create(path, d, codec="ms", **kw):
    N, M, C = d["probs"].shape
    return fkdstore.write(
        path, num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=d["keys"],
        image_sizes=d["sizes"], labels=d["labels"], **kw,
    )


def fill(w, d, order=None, step=7):
    N = len(d["keys"])
    order = np.arange(N) if order is None else np.asarray(order)
    for s in range(0, len(order), step):
        i = order[s:s + step]
        w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_round_trip_every_codec(tmp_path, name):
    d = make_data(40, 6, 12)
    codec = get_codec(name, **({"k": 3} if name in ("ms", "mr") else {}))
    with create(tmp_path / "s", d, codec, images_per_chunk=4, images_per_shard=16) as w:
        fill(w, d, order=np.random.default_rng(1).permutation(40))
    r = fkdstore.open(tmp_path / "s")
    assert r.complete and r.codec == codec and r.num_classes == 12 and r.crops_per_image == 6
    assert r.image_keys == d["keys"]
    np.testing.assert_array_equal(r.image_sizes, d["sizes"])
    np.testing.assert_array_equal(r.labels, d["labels"])
    enc = codec.encode(d["probs"])
    for i in (0, 17, 39):
        rec = r.read(i)
        np.testing.assert_array_equal(rec.boxes, d["boxes"][i])
        np.testing.assert_array_equal(rec.flips, d["flips"][i])
        for k, v in enc.items():
            np.testing.assert_array_equal(rec.fields[k], v[i])
        np.testing.assert_array_equal(r.soft_labels(i), codec.decode({k: v[i] for k, v in enc.items()}, 12))
    everything = r.read_all()
    for k, v in enc.items():
        np.testing.assert_array_equal(everything.fields[k], v)
    np.testing.assert_array_equal(everything.boxes, d["boxes"])


def test_read_batch_order_slots_and_read_all_slots(tmp_path):
    d = make_data(50, 8, 10)
    with create(tmp_path / "s", d, images_per_chunk=4, images_per_shard=8) as w:
        fill(w, d)
    r = fkdstore.open(tmp_path / "s")
    idx = np.array([49, 3, 3, 20, 0])
    slots = np.array([[7, 0], [1, 2], [3, 3], [5, 6], [0, 7]])
    b = r.read_batch(idx, slots)
    np.testing.assert_array_equal(b.boxes, d["boxes"][idx[:, None], slots])
    np.testing.assert_array_equal(b.flips, d["flips"][idx[:, None], slots])
    all_slots = np.random.default_rng(0).integers(0, 8, (50, 3))
    a = r.read_all(all_slots)
    np.testing.assert_array_equal(a.boxes, d["boxes"][np.arange(50)[:, None], all_slots])
    with pytest.raises(ValidationError, match="slots must be in"):
        r.read_batch([0], [[8]])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    N=st.integers(1, 40), M=st.integers(1, 5), ipc=st.sampled_from([1, 2, 4, 8]), mult=st.integers(1, 3),
    data=st.data(),
)
def test_fast_reader_equals_zarr(tmp_path_factory, N, M, ipc, mult, data):
    """The direct shard reader returns exactly what Zarr's own array API returns."""
    path = tmp_path_factory.mktemp("fast")
    d = make_data(N, M, 7, seed=N * 31 + M)
    with create(path / "s", d, codec=get_codec("ms", k=2), images_per_chunk=ipc, images_per_shard=ipc * mult) as w:
        fill(w, d)
    r = fkdstore.open(path / "s")
    idx = np.asarray(data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=12)))
    for name, arr in r._arrays.items():
        assert arr.fast, name
        np.testing.assert_array_equal(arr.take(idx), r.array(name).oindex[idx])
        np.testing.assert_array_equal(np.concatenate([arr.shard_data(s) for s in range(r.header.num_shards)]), r.array(name)[:])


def test_zarr_fallback_path_matches(tmp_path):
    d = make_data(12, 3, 5)
    with create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=4) as w:
        fill(w, d)
    r = fkdstore.open(tmp_path / "s")
    slow = store_mod._ShardedArray(r.array(S.BOX), None)
    assert not slow.fast
    idx = np.array([11, 0, 5, 5])
    np.testing.assert_array_equal(slow.take(idx), d["boxes"][idx])
    np.testing.assert_array_equal(slow.shard_data(1), d["boxes"][4:8])


def test_open_refuses_non_stores_and_newer_versions(tmp_path):
    with pytest.raises(FormatError, match="no zarr.json"):
        fkdstore.open(tmp_path)
    zarr.open_group(str(tmp_path / "plain"), mode="w").attrs["x"] = 1
    with pytest.raises(FormatError, match="not an fkdstore store"):
        fkdstore.open(tmp_path / "plain")
    d = make_data(4, 2, 6)
    with create(tmp_path / "s", d) as w:
        fill(w, d)
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    attrs = g.attrs[S.ATTR_KEY]
    g.attrs[S.ATTR_KEY] = {**attrs, "format_version": "3.0"}
    with pytest.raises(FormatError, match="newer than this library"):
        fkdstore.open(tmp_path / "s")
    g.attrs[S.ATTR_KEY] = {**attrs, "format_version": "1.7", "future_optional_key": 1}
    assert fkdstore.open(tmp_path / "s").num_images == 4  # newer minor: readable


def test_corrupted_chunk_is_detected_not_decoded(tmp_path):
    d = make_data(16, 4, 6)
    with create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=16) as w:
        fill(w, d)
    shard = tmp_path / "s" / S.BOX / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0xFF  # inside the first inner chunk
    shard.write_bytes(bytes(raw))
    r = fkdstore.open(tmp_path / "s")
    with pytest.raises(store_mod.CorruptChunkError, match="'box' chunk 0: crc32c"):
        r.read(0)
    r.read(15)  # other chunks still read


def _read_in_child(reader, q):
    q.put(reader.read(3).boxes.tolist())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_pickles_and_works_in_child_processes(tmp_path, method):
    d = make_data(10, 2, 6)
    with create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=4) as w:
        fill(w, d)
    r = fkdstore.open(tmp_path / "s")
    r.read(0)  # open handles in the parent first
    r2 = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(r2.read(3).boxes, d["boxes"][3])
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(r, q))
    p.start()
    got = q.get(timeout=60)
    p.join()
    assert got == d["boxes"][3].tolist()

