"""Fault injection: each damage below must make the reader, ``verify`` and TorchDataset fail with an error
naming the array, the file/key and the images, never return wrong labels. Stores with stored crops and with
seeded crops are both covered; the per-image arrays and replay parameters have their own tests in
test_faults_binding.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from faultutil import DELETE, set_header, shard_file, shard_index, use_dot_separator, write_shard_index
from storeutil import small_store as make_store

from fkdstore import bytesource
from fkdstore import reader as R
from fkdstore import schema as S
from fkdstore.errors import CorruptChunkError, CorruptStoreError, FormatError, IncompleteStoreError
from fkdstore.seeded import SlotCropSampler
from fkdstore.shard import MISSING
from fkdstore.verification import verify

N, M, C, IPC, IPS = 16, 5, 30, 4, 8  # shards of 8 images = 2 inner chunks; 2 shards
PROBS = S.soft_path("probs")
INDICES = S.soft_path("indices")


@pytest.fixture(params=["sequential", "read-ahead"], autouse=True)
def read_all_mode(request, monkeypatch):
    """read_all runs twice per damage: as on local disk, and with the read-ahead pipeline of a remote store
    (forced on local files, one shard per batch, so a later batch is fetched while an earlier one decodes)."""
    if request.param == "read-ahead":
        monkeypatch.setattr(bytesource.LocalSource, "remote", True)
        monkeypatch.setattr(R, "READ_ALL_BATCH_BYTES", 1)
    return request.param


@pytest.fixture(params=["stored", "seeded"])
def store(request, tmp_path):
    p = tmp_path / "s.fkd"
    if request.param == "stored":
        data = make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)
    else:  # the same store with the sampler's crops, derived on read (no box/flip arrays)
        sampler = SlotCropSampler(seed=4)
        data = make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS, crop_sampler=sampler)
    return p, data, request.param


def _assert_raises(p, i, cls, *parts):
    """The reader raises ``cls`` with every ``part`` in its message, for read, read_batch and read_all."""
    with R.open(p) as r:
        for call in (lambda: r.read(i), lambda: r.read_batch([i, 0]), lambda: r.read_all()):
            with pytest.raises(cls) as e:
                call()
            for part in parts:
                assert part in str(e.value), (part, str(e.value))


def _verify_names(p, *parts):
    problems = verify(p)
    assert any(all(part in x for part in parts) for x in problems), (parts, problems)
    return problems


def test_shard_file_deleted(store):
    p, _, _ = store
    shard_file(p, PROBS, 1).unlink()
    _assert_raises(p, 9, CorruptStoreError, "array 'soft/probs' chunk 2 (images 8-11, shard file soft/probs/c/1/0/0)",
                   "shard file is missing")
    _verify_names(p, "array 'soft/probs' chunk 2 (images 8-11, shard file soft/probs/c/1/0/0)", "missing")
    with R.open(p) as r:  # the other shard still reads
        r.read(3)


def test_inner_chunk_removed_from_index(store):
    p, _, _ = store
    f = shard_file(p, INDICES, 0)
    index = shard_index(f, IPS // IPC)
    index[1] = MISSING  # the sharding codec's "not stored" sentinel, with a valid index crc32c
    write_shard_index(f, index)
    where = "array 'soft/indices' chunk 1 (images 4-7, shard file soft/indices/c/0/0/0)"
    _assert_raises(p, 5, CorruptStoreError, where, "missing from the shard index")
    _verify_names(p, where, "missing from the shard index")


def test_shard_files_swapped(store):
    p, data, version = store
    a, b = shard_file(p, PROBS, 0), shard_file(p, PROBS, 1)
    tmp = a.with_name("tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    _assert_raises(p, 1, CorruptStoreError, "array 'soft/probs' chunk 0 (images 0-3, shard file soft/probs/c/0/0/0)",
                   "does not match the manifest: misplaced or stale data")
    with R.open(p) as r, pytest.raises(CorruptStoreError, match=r"array 'soft/probs' chunk 2 \(images 8-11, shard "
                                                                r"file soft/probs/c/1/0/0\).*does not match"):
        r.read(8)  # the other swapped shard: refused too, never shard 0's labels for image 8
    _verify_names(p, "array 'soft/probs' chunk 0", "soft/probs/c/0/0/0", "manifest")


def test_inner_chunks_swapped(store):
    p, data, version = store
    f = shard_file(p, INDICES, 1)
    index = shard_index(f, IPS // IPC)
    write_shard_index(f, index[::-1])
    _assert_raises(p, 9, CorruptStoreError, "array 'soft/indices' chunk 2 (images 8-11, shard file "
                   "soft/indices/c/1/0/0)", "does not match the manifest")
    with R.open(p) as r, pytest.raises(CorruptStoreError, match=r"array 'soft/indices' chunk 3 \(images 12-15"):
        r.read(12)
    _verify_names(p, "array 'soft/indices' chunk 2 (images 8-11, shard file soft/indices/c/1/0/0)", "manifest")


def test_payload_byte_flipped(store):
    p, _, _ = store
    f = shard_file(p, PROBS, 1)
    index = shard_index(f, IPS // IPC)
    off, nb = (int(x) for x in index[1])
    raw = bytearray(f.read_bytes())
    raw[off + nb // 2] ^= 0x40
    f.write_bytes(bytes(raw))
    _assert_raises(p, 13, CorruptChunkError, "array 'soft/probs' chunk 3 (images 12-15, shard file "
                   "soft/probs/c/1/0/0)", "crc32c")
    _verify_names(p, "array 'soft/probs' chunk 3", "crc32c")


@pytest.mark.parametrize("edit", [{"num_classes": 31}, {"regions.codec": {"name": "mr", "k": 5, "dtype": "float16"}},
                                  {"layout.images_per_chunk": 2},
                                  {"replay": {"input_size": [64, 64], "interpolation": "nearest", "mean": [0.5] * 3,
                                              "std": [0.5] * 3}},
                                  {"store_id": "0" * 32}])
def test_header_edited(tmp_path, edit):
    p = tmp_path / "s.fkd"
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)  # checksummed header
    set_header(p, **edit)
    with pytest.raises(CorruptStoreError, match="header checksum mismatch"):
        R.open(p)
    problems = verify(p)
    assert len(problems) == 1 and "header checksum mismatch" in problems[0], problems


@pytest.mark.parametrize("key,value,recompute", [
    ("checksum", DELETE, False),  # a missing key, not a checksum mismatch
    ("layout", DELETE, True),
    ("label_map", {"size": 2, "k": 1}, True),  # the other kind's object
])
def test_header_missing_key_or_other_kinds_object_is_a_format_error(tmp_path, key, value, recompute):
    """Section 1: every key but meta and library_version is required (a format error naming it, raised before
    the checksum is compared, so a header without `checksum` is not reported as damaged); the `regions` object
    is present exactly for kind regions and `label_map` exactly for kind label_map."""
    p = tmp_path / "s.fkd"
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)
    zj = p / "zarr.json"
    doc = json.loads(zj.read_text())
    h = doc["attributes"][S.ATTR_KEY]
    if value is DELETE:
        del h[key]
    else:
        h[key] = value
    if recompute:
        h["checksum"] = S.header_checksum(h)
    zj.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=f"'{key}'"):
        R.open(p)
    problems = verify(p)
    assert len(problems) == 1 and f"'{key}'" in problems[0], problems


def test_header_edit_with_a_recomputed_checksum_is_caught_by_the_arrays(tmp_path):
    """crc32c is no signature: a tool that recomputes it after an edit passes the header check; the arrays'
    metadata (here the inner chunk shape) and the manifest tags (here the store id) still disagree."""
    p = tmp_path / "s.fkd"
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)
    set_header(p, **{"layout.images_per_chunk": 2}, checksum=True)
    with pytest.raises(CorruptStoreError, match=r"array 'box': inner chunk shape is \(4, 5, 4\) in box/zarr.json "
                                                r"but the store header implies \(2, 5, 4\)"):
        R.open(p)
    set_header(p, **{"layout.images_per_chunk": IPC, "store_id": "0" * 32}, checksum=True)
    with R.open(p) as r, pytest.raises(CorruptStoreError, match="array 'key' chunk 0 .*does not match the manifest"):
        _ = r.image_keys  # the property reads the key array and checks its tag


def test_array_rechunked_header_untouched(store):
    p, _, _ = store
    zj = p / PROBS / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["codecs"][0]["configuration"]["chunk_shape"][0] = 2
    zj.write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError, match=r"array 'soft/probs': inner chunk shape is \(2, 5, 5\) in "
                                                r"soft/probs/zarr.json but the store header implies \(4, 5, 5\)"):
        R.open(p)
    _verify_names(p, "array 'soft/probs': inner chunk shape")


def test_absurd_shape_in_zarr_json_is_refused_before_allocating(store):
    p, _, _ = store
    for name in (INDICES, S.WRITTEN):
        zj = p / name / "zarr.json"
        doc = json.loads(zj.read_text())
        doc["shape"][0] = 10**15
        zj.write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError, match=r"array 'soft/indices': shape is \(1000000000000000, 5, 5\)"):
        R.open(p)
    problems = verify(p)  # returns promptly, allocating nothing of that size
    assert any("array 'soft/indices': shape" in x for x in problems)
    assert any("array 'written': shape" in x for x in problems)


def test_written_flag_without_data(tmp_path):
    p = tmp_path / "s.fkd"
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS, write=list(range(8)))  # shard 1 never written
    import zarr

    zarr.open_group(str(p), mode="r+")[S.WRITTEN][8:] = 1  # flags claim images 8..15
    _assert_raises(p, 10, CorruptStoreError, "chunk 2 (images 8-11, shard file ", "shard file is missing")
    _verify_names(p, "chunk 2 (images 8-11", "missing")


def test_refresh_sees_images_written_later(tmp_path):
    p = tmp_path / "s.fkd"
    data = make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS, write=list(range(8)))
    r = R.open(p)
    r.read(2)  # caches shard 0 index, handles, chunks
    with pytest.raises(IncompleteStoreError):
        r.read(9)
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)  # resume: the same data, all images
    r.refresh()
    assert r.complete
    np.testing.assert_array_equal(r.read(9).box, data["boxes"][9])
    np.testing.assert_array_equal(r.read_all().box, data["boxes"])


def test_dot_separator_store_is_read_and_verified(store):
    p, data, _ = store
    use_dot_separator(p)
    assert (p / INDICES / "c.1.0.0").exists()
    with R.open(p) as r:
        np.testing.assert_array_equal(r.read_batch(np.arange(N)).box, data["boxes"])
        np.testing.assert_array_equal(r.read_all().flip, data["flips"])
    assert verify(p) == []
    (p / INDICES / "c.1.0.0").unlink()
    _assert_raises(p, 9, CorruptStoreError, "shard file soft/indices/c.1.0.0", "images 8-11")


def test_unknown_codec_name_is_named(tmp_path):
    p = tmp_path / "s.fkd"
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)
    set_header(p, **{"regions.codec": {"name": "wavelet9"}}, checksum=True)  # a valid checksum: the codec check refuses
    with pytest.raises(FormatError, match="label codec 'wavelet9'"):
        R.open(p)
    assert "label codec 'wavelet9'" in verify(p)[0]


def test_torch_dataset_propagates_the_error(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from fkdstore import pytorch
    from fkdstore.testing import make_digits_folder

    images = make_digits_folder(tmp_path / "img", size=16, per_class=2)
    keys = sorted(str(f.relative_to(images)) for f in images.rglob("*.png"))
    import fkdstore

    n = len(keys)
    rng = np.random.default_rng(0)
    p = tmp_path / "s.fkd"
    with fkdstore.write(p, num_images=n, crops_per_image=2, num_classes=10, codec="ms", image_keys=keys,
                        image_sizes=np.full((n, 2), 16), images_per_chunk=2, images_per_shard=4) as w:
        w.put(np.arange(n), np.tile([0, 0, 8, 8], (n, 2, 1)), np.zeros((n, 2), bool),
              rng.dirichlet(np.ones(10), (n, 2)).astype(np.float32))
    ds = pytorch.TorchDataset(p, images, output_size=8)
    assert ds[0]["soft_labels"].shape == (1, 10)
    shard_file(p, PROBS, 1).unlink()
    with pytest.raises(CorruptStoreError, match=r"array 'soft/probs' chunk 2 \(images 4-5, shard file "
                                                r"soft/probs/c/1/0/0\)"):
        # a remote store's labels are preloaded when the dataset is built (the error comes from there);
        # a local one reads them per item
        pytorch.TorchDataset(p, images, output_size=8)[5]
    shutil.rmtree(p)


# -- damage found by the fast paths: read(i) once the shard's index and manifest are cached (shard.take_one),
#    and a reader with the decoded-chunk cache off (benchmarks/store_layout.py's "cold"), read and read_batch


def _flip_byte(p, name, shard, k):
    f = shard_file(p, name, shard)
    off, nb = (int(x) for x in shard_index(f, IPS // IPC)[k])
    raw = bytearray(f.read_bytes())
    raw[off + nb // 2] ^= 0x40
    f.write_bytes(bytes(raw))


def _point_at_neighbour(p, name, shard, k):
    """Inner chunk ``k`` of the shard becomes a copy of chunk ``k - 1`` (valid bytes, wrong position)."""
    f = shard_file(p, name, shard)
    index = shard_index(f, IPS // IPC)
    index[k] = index[k - 1]
    write_shard_index(f, index)


def _drop_from_index(p, name, shard, k):
    f = shard_file(p, name, shard)
    index = shard_index(f, IPS // IPC)
    index[k] = MISSING
    write_shard_index(f, index)


@pytest.mark.parametrize("cold", [False, True], ids=["cache", "cold"])
@pytest.mark.parametrize("damage, cls, what", [
    (_flip_byte, CorruptChunkError, "crc32c checksum mismatch"),
    (_point_at_neighbour, CorruptStoreError, "does not match the manifest: misplaced or stale data"),
    (_drop_from_index, CorruptStoreError, "missing from the shard index but holds images marked written"),
])
def test_damage_found_after_the_shard_is_cached(tmp_path, monkeypatch, cold, damage, cls, what):
    """Chunk 3 (images 12-15, shard 1) of one array is damaged; the reader first reads image 8 (chunk 2 of the
    same shard, intact: its index and manifest get cached, so read(12) takes the one-chunk fast path)."""
    from fkdstore import shard

    if cold:
        monkeypatch.setattr(shard, "CHUNK_CACHE_BYTES", 0)
    slow = []  # chunks that read(i) hands to the batch path
    monkeypatch.setattr(shard, "_take_one_slow", lambda arrays, c, f=shard._take_one_slow: slow.append(c) or
                        f(arrays, c))
    p = tmp_path / "s.fkd"
    data = make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)
    for name in (S.BOX, PROBS):
        d = tmp_path / "copy"
        shutil.copytree(p, d)
        damage(d, name, 1, 1)
        with R.open(d) as r:
            np.testing.assert_array_equal(r.read(8).box, data["boxes"][8])  # caches shard 1's index
            slow.clear()
            with pytest.raises(cls):
                r.read(12)
            # the fast path itself finds a bad checksum or position; a chunk that is not stored goes the batch way;
            # the one re-read before raising (spec invariant 9) forgot the shard's index, so it goes the batch way
            assert slow == ([3, 3] if damage is _drop_from_index else [3])
            where = f"array '{name}' chunk 3 (images 12-15, shard file {name}/c/1/0/0)"
            for call in (lambda: r.read(12), lambda: r.read(13, [0, 4]), lambda: r.read_batch([12, 0]),
                         lambda: r.read_batch([3, 14], [[1], [2]])):
                with pytest.raises(cls) as e:
                    call()
                assert where in str(e.value) and what in str(e.value), str(e.value)
            np.testing.assert_array_equal(r.read(9).box, data["boxes"][9])  # the rest still reads
            np.testing.assert_array_equal(r.read_batch([1, 10]).flip, data["flips"][[1, 10]])
        shutil.rmtree(d)


@pytest.mark.parametrize("cold", [False, True], ids=["cache", "cold"])
def test_cached_and_cold_reads_equal_the_data(tmp_path, monkeypatch, cold):
    from fkdstore import shard

    if cold:
        monkeypatch.setattr(shard, "CHUNK_CACHE_BYTES", 0)
    p = tmp_path / "s.fkd"
    n = N - 3  # a partial last chunk: its rows past N are tagged as fill values
    data = make_store(p, n=n, m=M, c=C, ipc=IPC, ips=IPS)
    slots = np.random.default_rng(0).integers(0, M, (n, 2))
    with R.open(p) as r:
        for _ in range(2):  # the second pass reads through cached indexes (and chunks, unless cold)
            for i in np.random.default_rng(1).permutation(n).tolist():
                rec = r.read(i, slots[i])
                np.testing.assert_array_equal(rec.box, data["boxes"][i, slots[i]])
                np.testing.assert_array_equal(rec.flip, data["flips"][i, slots[i]])
                np.testing.assert_array_equal(r.read(i).box, data["boxes"][i])
            b = np.array([12, 0, 5, 12, 7])
            rec = r.read_batch(b, slots[b])
            np.testing.assert_array_equal(rec.box, data["boxes"][b[:, None], slots[b]])
        assert verify(p) == []


@pytest.mark.parametrize("edit", ["cbytes_short", "cbytes_long", "tiny"])
def test_blosc_header_lying_about_its_size_is_refused(tmp_path, edit):
    """blosc is given no input length (it trusts its header): a chunk whose header states another compressed
    size than the chunk holds must fail before decompression, even with a valid crc32c (re-computed here)."""
    import crc32c

    p = tmp_path / "s.fkd"
    make_store(p, n=N, m=M, c=C, ipc=IPC, ips=IPS)
    f = shard_file(p, PROBS, 0)
    index = shard_index(f, IPS // IPC)
    off, nb = (int(x) for x in index[1])
    raw = bytearray(f.read_bytes())
    body = bytearray(raw[off:off + nb - 4])
    if edit == "tiny":
        body = body[:10]
    else:
        cb = int.from_bytes(body[12:16], "little")
        body[12:16] = (cb + (-1 if edit == "cbytes_short" else 1000)).to_bytes(4, "little")
    chunk = bytes(body) + crc32c.crc32c(bytes(body)).to_bytes(4, "little")
    raw[off:off + nb] = chunk
    assert index[0, 0] < off  # chunk 1 is the last before the index: resizing it moves nothing else
    index[1] = (off, len(chunk))
    f.write_bytes(bytes(raw))
    write_shard_index(f, index)
    what = "shorter than a blosc header" if edit == "tiny" else "its blosc header states"
    _assert_raises(p, 5, CorruptChunkError, "array 'soft/probs' chunk 1 (images 4-7, shard file soft/probs/c/0/0/0)",
                   "cannot decode", what)
    with R.open(p) as r:
        r.read(3)  # chunk 0 still reads
