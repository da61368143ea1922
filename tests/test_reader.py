"""fkdstore.reader: round trips of stored and seeded crops, the direct shard path vs Zarr, remote (store API)
sources, index types, pickling and child processes. Faults are in test_faults_reader.py; 2.0 and 3.0
stores (fkdstore 0.2) are read in test_golden.py."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import numpy as np
import pytest
import zarr
from faultutil import set_header, shard_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storeutil import create, make_data

from fkdstore import bytesource
from fkdstore import reader as R
from fkdstore import schema as S
from fkdstore.codecs import REGISTRY, crop_keys, get_codec
from fkdstore.errors import CorruptChunkError, FormatError, IncompleteStoreError, ValidationError
from fkdstore.seeded import SlotCropSampler


def _store(tmp_path, crops, N=40, M=6, C=12, codec="ms", aug=None, ipc=4, ips=16, seed=0):
    """A complete store; ``crops`` "stored" (random boxes) or "seeded" (the slot sampler's, derived on read)."""
    d = make_data(N, M, C, seed=seed, sampler=SlotCropSampler(seed=seed) if crops == "seeded" else None)
    p = tmp_path / f"s{crops}"
    aug_vals = np.random.default_rng(seed).random((N, M, len(aug or ()))).astype(np.float32)
    with create(p, d, codec, images_per_chunk=ipc, images_per_shard=ips, aug=aug) as w:
        for s in range(0, N, 7):
            i = np.arange(s, min(N, s + 7))
            w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i], aug=aug_vals[i] if aug else None)
    return p, d, aug_vals


@pytest.mark.parametrize("crops", ["seeded", "stored"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_round_trip_every_codec(tmp_path, crops, name):
    codec = get_codec(name, **({"k": 3} if name in ("ms", "mr") else {}))
    p, d, _ = _store(tmp_path, crops, codec=codec)
    r = R.open(p)
    assert r.complete and r.codec == codec and r.header.format_version == "4.0"
    assert r.header.seeded == (crops == "seeded")
    assert r.image_keys == d["keys"] and r.image_key(17) == d["keys"][17]
    np.testing.assert_array_equal(r.image_sizes, d["sizes"])
    np.testing.assert_array_equal(r.labels, d["labels"])
    n, m = d["probs"].shape[:2]
    enc = codec.encode(d["probs"], keys=crop_keys(np.arange(n)[:, None], np.arange(m)[None, :]))
    for i in (0, 17, 39):
        rec = r.read(i)
        np.testing.assert_array_equal(rec.box, d["boxes"][i])
        np.testing.assert_array_equal(rec.boxes, d["boxes"][i])
        np.testing.assert_array_equal(rec.flips, d["flips"][i])
        for k, v in enc.items():
            np.testing.assert_array_equal(rec.fields[k], v[i])
        np.testing.assert_array_equal(r.soft_labels(i), codec.decode({k: v[i] for k, v in enc.items()}, 12))
    everything = r.read_all()
    for k, v in enc.items():
        np.testing.assert_array_equal(everything.fields[k], v)
    np.testing.assert_array_equal(everything.box, d["boxes"])


@pytest.mark.parametrize("crops", ["seeded", "stored"])
def test_aug_columns_are_a_dict(tmp_path, crops):
    p, d, aug = _store(tmp_path, crops, N=12, aug=["brightness", ("erase", "bool")], ipc=2, ips=4)
    r = R.open(p)
    assert r.aug_names == ["brightness", "erase"]
    rec = r.read(4, [5, 0])
    assert set(rec.aug) == {"brightness", "erase"}
    np.testing.assert_array_equal(rec.aug["erase"], aug[4, [5, 0], 1])
    np.testing.assert_array_equal(r.read_all().aug["brightness"], aug[..., 0])
    assert R.open(_store(tmp_path / "x", crops, N=4)[0]).read(1).aug == {}


def test_read_batch_order_slots_and_read_all_slots(tmp_path):
    p, d, _ = _store(tmp_path, "stored", N=50, M=8, C=10, ipc=4, ips=8)
    r = R.open(p)
    idx = np.array([49, 3, 3, 20, 0])
    slots = np.array([[7, 0], [1, 2], [3, 3], [5, 6], [0, 7]])
    b = r.read_batch(idx, slots)
    np.testing.assert_array_equal(b.box, d["boxes"][idx[:, None], slots])
    np.testing.assert_array_equal(b.flip, d["flips"][idx[:, None], slots])
    all_slots = np.random.default_rng(0).integers(0, 8, (50, 3))
    np.testing.assert_array_equal(r.read_all(all_slots).box, d["boxes"][np.arange(50)[:, None], all_slots])
    with pytest.raises(ValidationError, match=r"slots must be in \[0, 8\)"):
        r.read_batch([0], [[8]])
    with pytest.raises(ValidationError, match=r"slots must have shape \(2, m\)"):
        r.read_batch([0, 1], [[1]])
    assert r.read_batch([]).box.shape == (0, 8, 4)


def test_slots_out_of_range_are_refused_by_every_read(tmp_path):
    """read(i) checks a few slots in Python, read_batch many with one unsigned reduction: both refuse negative
    slots (which numpy would otherwise wrap around) and slots >= M, naming the range."""
    p, d, _ = _store(tmp_path, "stored", N=20, M=8, C=10, ipc=4, ips=8)
    r = R.open(p)
    big = np.zeros((6, 3), np.int64)  # 18 slots: the vectorised check
    for bad in (-1, 8, np.iinfo(np.int64).min):
        with pytest.raises(ValidationError, match=rf"slots must be in \[0, 8\). Got values in \[{min(bad, 0)}, "):
            r.read(3, [0, bad])
        with pytest.raises(ValidationError, match=r"slots must be in \[0, 8\)"):
            r.read_batch([3], [[bad]])
        b = big.copy()
        b[4, 1] = bad
        with pytest.raises(ValidationError, match=r"slots must be in \[0, 8\)"):
            r.read_batch(np.arange(6), b)
    with pytest.raises(ValidationError, match=r"slots must be in \[0, 8\)"):
        r.read(3, np.array([2**63], np.uint64))  # wraps to negative as int64: still refused
    np.testing.assert_array_equal(r.read(3, [7, 0, 7]).box, d["boxes"][3, [7, 0, 7]])
    np.testing.assert_array_equal(r.read(3, []).box, d["boxes"][3, []])


def test_crc32c_residue_is_the_trailer_check():
    """shard.py checks a stored chunk (body + crc32c trailer) with one crc32c call over all of it: that equals
    CRC32C_RESIDUE exactly when the trailer is crc32c(body)."""
    import crc32c

    from fkdstore.shard import CRC32C_RESIDUE

    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 100, 5000):
        body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        good = crc32c.crc32c(body).to_bytes(4, "little")
        assert crc32c.crc32c(body + good) == CRC32C_RESIDUE
        for k in range(4):
            bad = bytearray(good)
            bad[k] ^= 1 << int(rng.integers(0, 8))
            assert crc32c.crc32c(body + bytes(bad)) != CRC32C_RESIDUE
        if n:
            flipped = bytearray(body)
            flipped[n // 2] ^= 0x10
            assert crc32c.crc32c(bytes(flipped) + good) != CRC32C_RESIDUE


def test_bool_and_float_indices_are_refused(tmp_path):
    p, d, _ = _store(tmp_path, "seeded", N=8)
    r = R.open(p)
    for bad in (1.7, True, np.float32(2), "3"):
        with pytest.raises(TypeError, match="image index must be an integer"):
            r.read(bad)
    with pytest.raises(TypeError, match="indices must be integers"):
        r.read_batch([True, False])
    with pytest.raises(TypeError, match="indices must be integers"):
        r.read_batch(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="slots must be integers"):
        r.read_batch([1], [[0.5]])
    with pytest.raises(IndexError, match=r"image index must be in \[0, 8\). Got -1."):
        r.read(-1)
    np.testing.assert_array_equal(r.read(np.int64(3)).box, d["boxes"][3])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 40), M=st.integers(1, 5), ipc=st.sampled_from([1, 2, 4, 8]), mult=st.integers(1, 3),
       data=st.data())
def test_direct_shard_path_equals_zarr(tmp_path_factory, N, M, ipc, mult, data):
    """The direct shard reader returns exactly what Zarr's own array API returns (2.0 stores)."""
    p, d, _ = _store(tmp_path_factory.mktemp("fast"), "stored", N=N, M=M, C=7, codec=get_codec("ms", k=2),
                     ipc=ipc, ips=ipc * mult, seed=N * 31 + M)
    r = R.open(p)
    idx = np.asarray(data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=12)))
    rec = r.read_batch(idx)
    assert all(r.sharded(n).fast for n in r.per_crop_arrays)
    order = np.argsort(np.argsort(idx, kind="stable"), kind="stable")
    np.testing.assert_array_equal(rec.box, r.array(S.BOX).oindex[np.sort(idx)][order])
    for name in r.per_crop_arrays:
        rows = [r.sharded(name).shard_rows(s) for s in range(r.header.num_shards)]
        np.testing.assert_array_equal(np.concatenate(rows), r.array(name)[:])


def test_zarr_fallback_keeps_the_checks(tmp_path):
    p, d, _ = _store(tmp_path, "stored", N=12, M=3, C=5, ipc=2, ips=4)
    r = R.open(p)
    a = r.sharded(S.BOX)
    a.fast = False  # force the Zarr path for this array
    np.testing.assert_array_equal(r.read_batch([11, 0, 5, 5]).box, d["boxes"][[11, 0, 5, 5]])
    shard_file(p, S.BOX, 1).unlink()
    r.refresh()
    with pytest.raises(R.CorruptStoreError, match=r"array 'box' chunk 2 \(images 4-5, shard file box/c/1/0/0\)"):
        r.read(5)


def test_remote_store_source_is_concurrent_coalesced_and_equal(tmp_path):
    """A store read through Zarr's store API (here a MemoryStore, as for s3://) returns the same records;
    all chunks of a batch go out in one gather, neighbours coalesced."""
    p, d, _ = _store(tmp_path, "stored", N=40, ipc=4, ips=16)
    mem = _memory_copy(p)
    calls = []
    original = bytesource.StoreSource.read_ranges

    def spy(self, requests):
        calls.append(len(requests))
        return original(self, requests)

    r = R.open(mem)
    assert isinstance(r._source, bytesource.StoreSource)
    bytesource.StoreSource.read_ranges = spy
    try:
        idx = np.array([39, 0, 17, 5, 22])
        rec = r.read_batch(idx)
    finally:
        bytesource.StoreSource.read_ranges = original
    assert len(calls) == 1 and calls[0] == 4 * len({int(i) // 4 for i in idx})  # one call for all arrays
    np.testing.assert_array_equal(rec.box, d["boxes"][idx])
    np.testing.assert_array_equal(r.read_all().flip, d["flips"])
    assert bytesource.coalesce([("a", 0, 10), ("a", 20, 30), ("b", 0, 5), ("a", 10**6, 10**6 + 1)], 100) == [
        ("a", 0, 30, [0, 1]), ("a", 10**6, 10**6 + 1, [3]), ("b", 0, 5, [2])]


def _memory_copy(p):
    """The store at ``p`` copied into a zarr MemoryStore (read through StoreSource, like s3://)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    local = zarr.storage.LocalStore(str(p), read_only=True)
    mem = zarr.storage.MemoryStore()

    async def copy():
        async for key in local.list():
            await mem.set(key, await local.get(key, prototype=default_buffer_prototype()))

    sync(copy())
    return mem


def test_remote_read_all_reads_ahead(tmp_path, monkeypatch):
    """read_all on a remote store: one batch per shard fetched ahead while the previous decodes, each shard
    file fetched whole in one request per array (no separate index round, no range requests); records equal
    the local read, with and without slots."""
    p, d, _ = _store(tmp_path, "stored", N=40, ipc=4, ips=8)  # 5 shards
    mem = _memory_copy(p)
    monkeypatch.setattr(R, "READ_ALL_BATCH_BYTES", 1)  # one shard per batch
    calls = {"suffixes": [], "ranges": [], "objects": []}
    for name in calls:
        orig = getattr(bytesource.StoreSource, "read_" + name)
        monkeypatch.setattr(bytesource.StoreSource, "read_" + name,
                            lambda self, q, orig=orig, seen=calls[name]: seen.append(sorted(q)) or orig(self, q))
    slots = np.random.default_rng(0).integers(0, 6, (40, 3))
    with R.open(mem) as r, R.open(p) as lo:
        assert r._source.remote and not lo._source.remote
        for seen in calls.values():
            seen.clear()  # opening read the arrays' zarr.json in one read_objects call
        whole = r.read_all(progress=True)
        assert calls["suffixes"] == [] and calls["ranges"] == []
        assert sorted(calls["objects"]) == [sorted(a.shard_key(s) for a in r._arrays.values()) for s in range(5)]
        assert len(r._arrays) == 4 and r._arrays["flip"].shard_key(3) == "flip/c/3/0"
        for got, want in ((whole, lo.read_all()), (r.read_all(slots), lo.read_all(slots))):
            np.testing.assert_array_equal(got.box, want.box)
            np.testing.assert_array_equal(got.flip, want.flip)
            for k in want.fields:
                np.testing.assert_array_equal(got.fields[k], want.fields[k])
    np.testing.assert_array_equal(whole.box, d["boxes"])


def test_remote_read_all_stops_at_a_damaged_shard(tmp_path, monkeypatch):
    """A chunk damaged in the 4th of 5 shards: read_all through the read-ahead pipeline raises the error
    naming array, chunk, images and shard file (not a hang, not zeros)."""
    p, _, _ = _store(tmp_path, "stored", N=40, ipc=4, ips=8)
    f = p / "box" / "c" / "3" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0xFF
    f.write_bytes(bytes(raw))
    monkeypatch.setattr(R, "READ_ALL_BATCH_BYTES", 1)
    with R.open(_memory_copy(p)) as r:
        with pytest.raises(R.CorruptStoreError, match=r"array 'box' chunk 6 \(images 24-27, shard file box/c/3/0/0\)"):
            r.read_all()


def test_open_refuses_non_stores_and_newer_versions(tmp_path):
    with pytest.raises(FormatError, match="no zarr.json"):
        R.open(tmp_path)
    zarr.open_group(str(tmp_path / "plain"), mode="w").attrs["x"] = 1
    with pytest.raises(FormatError, match="not an fkdstore store"):
        R.open(tmp_path / "plain")
    p, _, _ = _store(tmp_path, "seeded", N=4)
    set_header(p, format_version="5.0", checksum=True)
    with pytest.raises(FormatError, match="newer than this library"):
        R.open(p)
    set_header(p, format_version="4.7", future_optional_key=1, checksum=True)
    assert R.open(p).num_images == 4  # newer minor, unknown top-level key: readable
    assert R.open(zarr.open_group(str(p), mode="r")).num_images == 4  # a zarr Group works too


def test_incomplete_images_raise(tmp_path):
    d = make_data(20, 2, 6)
    w = create(tmp_path / "s", d, images_per_chunk=2, images_per_shard=8)
    w.put(np.arange(8), d["boxes"][:8], d["flips"][:8], d["probs"][:8])
    w.close()
    r = R.open(tmp_path / "s")
    assert r.missing_ranges() == [(8, 20)] and not r.complete
    with pytest.raises(IncompleteStoreError, match=r"image 9 \('class0/img_00009.jpg'\) has not been written"):
        r.read(9)
    with pytest.raises(IncompleteStoreError):
        r.read_all()


def test_corrupted_chunk_is_detected_not_decoded(tmp_path):
    p, d, _ = _store(tmp_path, "stored", N=16, M=4, C=6, ipc=2, ips=16)
    f = shard_file(p, S.BOX, 0)
    raw = bytearray(f.read_bytes())
    raw[20] ^= 0xFF  # inside the first inner chunk
    f.write_bytes(bytes(raw))
    r = R.open(p)
    with pytest.raises(CorruptChunkError, match=r"'box' chunk 0 \(images 0-1, shard file box/c/0/0/0\): crc32c"):
        r.read(0)
    np.testing.assert_array_equal(r.read(15).box, d["boxes"][15])  # other chunks still read


def test_decode_temperature_passthrough(tmp_path):
    p, _, _ = _store(tmp_path, "seeded", N=4)
    r = R.open(p)
    f = r.read(0).fields
    np.testing.assert_array_equal(r.decode(f, temperature=2.0), r.codec.decode(f, 12, temperature=2.0))
    assert not np.allclose(r.decode(f, temperature=2.0), r.decode(f))
    np.testing.assert_array_equal(r.decode(f), r.soft_labels(0))


def _read_in_child(reader, q):
    q.put(reader.read(3).box.tolist())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_pickles_and_works_in_child_processes(tmp_path, method):
    p, d, _ = _store(tmp_path, "stored", N=10, M=2, C=6, ipc=2, ips=4)
    r = R.open(p)
    r.read(0)  # open handles in the parent first
    r2 = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(r2.read(3).box, d["boxes"][3])
    ctx = mp.get_context(method)
    q = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(r, q))
    proc.start()
    got = q.get(timeout=60)
    proc.join()
    assert got == d["boxes"][3].tolist()
    np.testing.assert_array_equal(r.read(3).box, d["boxes"][3])  # the parent's handles still work


# ----------------------------------------------------------------------------- hot path (issue 13.4)


def test_cold_and_direct_decode_paths_read_identically(tmp_path, monkeypatch):
    """Uncached reads (CHUNK_CACHE_BYTES = 0, the benchmark's cold case) and in-place decoding of big chunks
    (DIRECT_DECODE_BYTES = 0) return what the default path returns, and still check the manifest."""
    from fkdstore import shard

    p, d, _ = _store(tmp_path, "stored")
    with R.open(p) as r:
        want = r.read_batch(np.arange(40))
    for knob in ("CHUNK_CACHE_BYTES", "DIRECT_DECODE_BYTES"):
        monkeypatch.setattr(shard, knob, 0)
        with R.open(p) as r:
            got = r.read_batch(np.arange(40)[::-1])
            for k, v in want.fields.items():
                np.testing.assert_array_equal(got.fields[k], v[::-1])
            np.testing.assert_array_equal(r.read(17).box, want.box[17])
            np.testing.assert_array_equal(r.read_all().fields["probs"], want.fields["probs"])
    # a manifest entry that does not match is caught on the in-place path too
    m = zarr.open_group(str(p), mode="r+")[S.MANIFEST]
    col = len(S.BOUND_PER_IMAGE) + 1 * 4 + 0  # shard 0's row: per-image tags, then chunk 1's tag of array 0 (box)
    m[0, col] = int(m[0, col]) ^ 1
    with R.open(p) as r, pytest.raises(R.CorruptStoreError, match="does not match the manifest"):
        r.read(5)


def test_read_returns_copies_not_cached_chunks(tmp_path):
    p, d, _ = _store(tmp_path, "stored")
    with R.open(p) as r:
        first = r.read(3)
        first.box[...] = 0
        first.fields["probs"][...] = 0
        again = r.read(3)
        np.testing.assert_array_equal(again.box, d["boxes"][3])
        assert again.fields["probs"].any()


def test_coalesce_merges_many_neighbouring_ranges_in_order():
    reqs = [("k", 10 * i, 10 * i + 8) for i in range(500)][::-1] + [("j", 0, 4), ("k", 10**6, 10**6 + 1)]
    merged = bytesource.coalesce(reqs, 64)
    assert [(k, a, b) for k, a, b, _ in merged] == [("j", 0, 4), ("k", 0, 4998), ("k", 10**6, 10**6 + 1)]
    assert merged[1][3] == list(range(499, -1, -1)) and merged[0][3] == [500] and merged[2][3] == [501]


def test_chunk_cache_holds_copies_so_memory_stays_within_its_limit(tmp_path):
    """Cached chunks must not be views of their decoded batch: a view keeps the whole batch alive after the
    LRU evicts its neighbours (memory above the accounted limit). Large random batches are not cached."""
    from fkdstore import shard

    p, d, _ = _store(tmp_path, "stored", N=100, ipc=1, ips=50)  # 100 chunks per array
    assert 100 > shard.CACHE_MAX_BLOCK_CHUNKS
    with R.open(p) as r:
        r.read_batch(np.arange(0, 40, 3))  # 14 chunks: cached, as owned copies
        for a in r._arrays.values():
            assert len(a._cache) == 14
            assert all(chunk.base is None for chunk in a._cache.values())
    with R.open(p) as r:
        got = r.read_batch(np.arange(100)[::-1])  # 100 chunks: not cached
        np.testing.assert_array_equal(got.box, d["boxes"][::-1])
        assert all(not a._cache for a in r._arrays.values())


def test_local_read_ranges_in_order_and_shuffled_agree_with_coalesce(tmp_path):
    """LocalSource merges requests that come by object and offset (the shard layer's order) in one pass, and
    sorts (bytesource.coalesce) otherwise; both return every range's bytes, and merge like coalesce."""
    rng = np.random.default_rng(0)
    blobs = {}
    for name in ("a", "b", "c"):
        blobs[name] = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
        (tmp_path / name).write_bytes(blobs[name])
    src = bytesource.LocalSource(str(tmp_path))
    for trial in range(30):
        reqs = []
        for name in ("b", "a", "c")[: 1 + trial % 3]:
            starts = np.sort(rng.choice(290_000, int(rng.integers(1, 40)), replace=False))
            reqs += [(name, int(s), int(s + rng.integers(0, 9000))) for s in starts]
        if trial % 5 == 0:
            reqs.append(("missing", 0, 10))
        runs = bytesource._ascending_runs(reqs, bytesource.COALESCE_GAP)
        merged = bytesource.coalesce(reqs, bytesource.COALESCE_GAP)
        assert sorted((reqs[i0][0], a, b) for i0, _, a, b in runs) == [(k, a, b) for k, a, b, _ in merged]
        for order in (np.arange(len(reqs)), rng.permutation(len(reqs))):
            asked = [reqs[i] for i in order]
            got = src.read_ranges(asked)
            want = [blobs[k][a:b] if k in blobs else None for k, a, b in asked]
            assert [None if g is None else bytes(g) for g in got] == want
    assert bytesource._ascending_runs([("a", 5, 9), ("a", 1, 3)], 64) is None
    src.close()
