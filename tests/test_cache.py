"""The local disk cache of a remote store (``fkdstore.open(url, cache_dir=, cache_bytes=)``,
:class:`fkdstore.bytesource.CachedSource`) against the moto S3 server of tests/s3util.py: requests counted at
its proxy, the size bound, corrupted entries healed, rewritten objects never served stale, several
processes sharing one folder, pickling."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_s3 import N, _same_records, _write

import fkdstore
from fkdstore.errors import CorruptChunkError, CorruptStoreError, ValidationError

pytestmark = pytest.mark.slow  # every test talks to the S3 server (moto) these tests start in a child process

IDX = [np.array([39, 3, 17, 16, 0]), np.array([1, 2, 30]), np.arange(8, 24)]


def _entries(folder) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]


def _disk_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _reads(r):
    return [r.read_all()] + [r.read_batch(i) for i in IDX] + [r.read(5)]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        _same_records(x, y)


@pytest.fixture
def remote(s3, s3_server, tmp_path):
    """(url, proxied storage_options, records read without a cache) of a freshly written store."""
    url, so = s3
    _write(url + "/labels.fkd", so)
    proxied = s3_server.storage_options(proxy=True)
    with fkdstore.open(url + "/labels.fkd", storage_options=proxied) as r:
        want = _reads(r)
    return url + "/labels.fkd", proxied, want


def test_second_read_through_the_cache_issues_no_request(remote, s3_server, tmp_path):
    url, so, want = remote
    cache = tmp_path / "cache"
    s3_server.proxy_stats(reset=True)
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        first = _reads(r)
    cold = s3_server.proxy_stats(reset=True)["requests"]
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        opened = s3_server.proxy_stats(reset=True)["requests"]
        second = _reads(r)
        assert r._source.stats["misses"] == 0 and r._source.stats["hits"] > 0
    warm = s3_server.proxy_stats(reset=True)["requests"]
    _same(first, want)
    _same(second, want)
    assert cold > 20, cold  # metadata, written flags, shard indexes, chunks, manifest
    assert opened <= 2, opened  # the listing (ETags) and at most the reachability probe
    assert warm == 0, warm


def test_cache_stays_within_its_bound(remote, tmp_path):
    url, so, want = remote
    cache, bound = tmp_path / "cache", 12_000  # a fraction of what the reads touch
    for _ in range(4):
        with fkdstore.open(url, storage_options=so, cache_dir=cache, cache_bytes=bound) as r:
            _same(_reads(r), want)
            assert _disk_bytes(cache) <= bound
    assert r._source.stats["evicted"] > 0
    assert 0 < _disk_bytes(cache) <= bound


def test_corrupted_cache_entries_are_detected_and_healed(remote, tmp_path):
    url, so, want = remote
    cache = tmp_path / "cache"
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        _reads(r)
    entries = _entries(cache)
    # 1. bit rot: the entry's own crc32c catches it; the entry is deleted and read from the store again.
    for p in entries:
        raw = bytearray(p.read_bytes())
        raw[-1] ^= 0xFF
        p.write_bytes(bytes(raw))
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        _same(_reads(r), want)
        assert r._source.stats["corrupt"] >= len(entries) // 2
    # 2. a chunk or shard-index entry that is intact as a file but holds wrong bytes (its crc32c recomputed):
    # the reader's own checks (chunk/index crc32c, manifest tag) reject it; the cache forgets it and the store
    # is asked once more.
    import crc32c

    from fkdstore.bytesource import _HEAD, _MAGIC

    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:  # whole shard objects (read_all's)
        src = r._source
        shard_objects = {Path(src._path(src._identity(k), k, "all", 0, 0)) for a in r._arrays.values()
                         for s in range(r.header.num_shards) for k in [a.shard_key(s)]}
    assert shard_objects <= set(_entries(cache))
    for p in _entries(cache):
        if p.suffix not in (".range", ".suffix") and p not in shard_objects:  # chunks, shard indexes, shard
            continue  # files: the reader's own checks apply
        raw = p.read_bytes()
        body = bytearray(raw[_HEAD:])
        if len(body) > 40:
            body[len(body) // 2] ^= 0x55
            crc = crc32c.crc32c(bytes(body)).to_bytes(4, "little")
            p.write_bytes(raw[:len(_MAGIC)] + crc + raw[len(_MAGIC) + 4:_HEAD] + bytes(body))
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        got = _reads(r)
        assert r._source.stats["invalidated"] > 0
    _same(got, want)
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:  # healed entries are served again
        _same(_reads(r), want)
        assert r._source.stats["invalidated"] == 0 and r._source.stats["misses"] == 0


def test_damage_in_the_store_itself_is_still_reported(remote, s3_server, tmp_path):
    url, so, _ = remote
    cache = tmp_path / "cache"
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        _reads(r)
    fs = s3_server.filesystem()
    key = url[len("s3://"):] + "/box/c/0/0/0"
    raw = bytearray(fs.cat_file(key))
    raw[10] ^= 0xFF  # a chunk of shard 0, same size: a new ETag, so the cached copy is not used
    fs.pipe_file(key, bytes(raw))
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        with pytest.raises((CorruptChunkError, CorruptStoreError)):
            r.read_all()


def test_a_rewritten_store_is_never_served_from_the_cache(s3, s3_server, tmp_path):
    url, so = s3
    cache = tmp_path / "cache"
    proxied = s3_server.storage_options(proxy=True)
    _write(url + "/labels.fkd", so, seed=0)
    with fkdstore.open(url + "/labels.fkd", storage_options=proxied, cache_dir=cache) as r:
        _reads(r)
    s3_server.filesystem().rm(url[len("s3://"):] + "/labels.fkd", recursive=True)
    _write(url + "/labels.fkd", so, seed=1)  # the same layout and header at the same URL, other labels
    _write(tmp_path / "seed1.fkd", seed=1)
    with fkdstore.open(url + "/labels.fkd", storage_options=proxied, cache_dir=cache) as r, \
            fkdstore.open(tmp_path / "seed1.fkd") as lo:
        _same(_reads(r), _reads(lo))


def _read_in_child(reader):
    out = [reader.read_batch(np.arange(N)).fields["probs"] for _ in range(3)]
    return out[-1], reader._source.stats


def test_two_processes_share_one_cache_folder(remote, s3_server, tmp_path):
    url, so, want = remote
    cache = tmp_path / "cache"
    r = fkdstore.open(url, storage_options=so, cache_dir=cache)
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.map(_read_in_child, [r, r])
    for probs, stats in got:
        np.testing.assert_array_equal(probs, want[0].fields["probs"])
        assert stats["corrupt"] == 0
    assert not [p for p in Path(cache).rglob(".tmp-*")]  # every entry was renamed into place
    s3_server.proxy_stats(reset=True)
    np.testing.assert_array_equal(r.read_batch(np.arange(N)).fields["probs"], want[0].fields["probs"])
    assert s3_server.proxy_stats(reset=True)["requests"] <= 1  # this process's listing; the data is cached
    r.close()


def test_pickled_reader_keeps_its_cache(remote, s3_server, tmp_path):
    url, so, want = remote
    cache = tmp_path / "cache"
    r = fkdstore.open(url, storage_options=so, cache_dir=cache, cache_bytes=10**7)
    _reads(r)
    copy = pickle.loads(pickle.dumps(r))
    assert (copy._source.cache_dir, copy._source.cache_bytes) == (str(cache), 10**7)
    s3_server.proxy_stats(reset=True)
    _same(_reads(copy), want)
    assert s3_server.proxy_stats(reset=True)["requests"] <= 1  # the listing
    assert copy._source.stats["misses"] == 0


def test_cache_arguments(remote, tmp_path):
    url, so, _ = remote
    _write(tmp_path / "local.fkd")
    with fkdstore.open(tmp_path / "local.fkd", cache_dir=tmp_path / "unused") as r:  # local: ignored
        r.read_all()
    assert not (tmp_path / "unused").exists()
    with pytest.raises(TypeError, match="cache_bytes applies with cache_dir only"):
        fkdstore.open(url, storage_options=so, cache_bytes=1000)
    with pytest.raises(ValidationError, match="cache_bytes must be a positive integer. Got 0."):
        fkdstore.open(url, storage_options=so, cache_dir=tmp_path / "c", cache_bytes=0)
    with pytest.raises(TypeError, match="cache_dir must be a folder path"):
        fkdstore.open(url, storage_options=so, cache_dir=3)


def test_another_stores_entries_swapped_into_the_cache_are_misses_never_data(remote, s3, tmp_path, monkeypatch):
    """Every entry of store A's cache is replaced by the intact entry of store B (other labels, same layout
    and keys) for the same object, read and byte range: each is another key's file (its id is not A's), so a
    miss, refetched from the store; A reads its own labels."""
    from fkdstore import bytesource

    url, so, want = remote
    other = s3[0] + "/other.fkd"
    _write(other, s3[1], seed=1)
    cache = tmp_path / "cache"
    saved: dict[tuple, dict[str, str]] = {}  # (object key, kind, range) -> {store url: entry path}
    original = bytesource.CachedSource._path

    def spy(self, ident, key, kind, a, b):
        path = original(self, ident, key, kind, a, b)
        saved.setdefault((key, kind, a, b), {})[self.url] = path
        return path

    monkeypatch.setattr(bytesource.CachedSource, "_path", spy)
    for location in (url, other):
        with fkdstore.open(location, storage_options=so, cache_dir=cache) as r:
            _reads(r)
    swapped = 0
    for paths in saved.values():
        mine = [p for u, p in paths.items() if u.startswith(url)]
        theirs = [p for u, p in paths.items() if not u.startswith(url)]
        if mine and theirs and os.path.exists(mine[0]) and os.path.exists(theirs[0]):
            Path(mine[0]).write_bytes(Path(theirs[0]).read_bytes())
            swapped += 1
    assert swapped > 10, swapped
    with fkdstore.open(url, storage_options=so, cache_dir=cache) as r:
        _same(_reads(r), want)
        assert r._source.stats["foreign"] >= swapped - 1, r._source.stats  # the root zarr.json: read before bind
