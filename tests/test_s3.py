"""Stores on S3-compatible object storage, against a real S3 server (moto) started on 127.0.0.1 by the
tests (tests/s3util.py): Zarr round trip through storage.as_store, the latency proxy, and the one-line
errors for a bad URL, a missing bucket, wrong credentials and a dead endpoint."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zarr

from fkdstore import storage
from fkdstore.errors import StorageError

from s3util import s3, s3_server, S3Server  # noqa: F401 - fixtures


def test_zarr_round_trip_through_as_store(s3):
    url, so = s3
    g = zarr.open_group(storage.as_store(url, read_only=False, storage_options=so), mode="w")
    g.create_array("x", shape=(10, 3), chunks=(4, 3), dtype="int32")[:] = np.arange(30).reshape(10, 3)
    back = zarr.open_group(storage.as_store(url, read_only=True, storage_options=so), mode="r")
    np.testing.assert_array_equal(back["x"][:], np.arange(30).reshape(10, 3))
    assert storage.describe(back.store) == url
    env_only = storage.as_store(url, read_only=True)  # credentials and endpoint from the environment
    np.testing.assert_array_equal(zarr.open_group(env_only, mode="r")["x"][:], np.arange(30).reshape(10, 3))


@pytest.mark.parametrize("case, url, options, message", [
    ("unknown scheme", "s4://fkd/x.fkd", {}, "s4://fkd/x.fkd: no installed filesystem handles the URL scheme 's4'"),
    ("no bucket", "s3://", {}, "s3://: the URL names no bucket (expected s3://BUCKET/PATH)"),
    ("missing slash", "s3:/fkd/x.fkd", None, "s3:/fkd/x.fkd: not a valid URL"),
    ("missing bucket", "s3://no-such-bucket/x.fkd", {}, "s3://no-such-bucket/x.fkd: bucket 'no-such-bucket' does not exist"),
    ("wrong credentials", "s3://fkd/x.fkd", {"key": "AKIAWRONGKEY", "secret": "wrong"},
     "s3://fkd/x.fkd: access denied (Forbidden); check the credentials (AWS_ACCESS_KEY_ID"),
    ("dead endpoint", "s3://fkd/x.fkd", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}},
     "s3://fkd/x.fkd: cannot connect to the storage endpoint (Could not connect to the endpoint URL"),
])
def test_unreachable_locations_raise_one_line_storage_error(s3, case, url, options, message):
    _, so = s3
    opts = None if options is None else {**so, **options}
    for read_only in (True, False):
        with pytest.raises(StorageError) as e:
            storage.as_store(url, read_only=read_only, storage_options=opts)
        assert str(e.value).startswith(message), str(e.value)
        assert "\n" not in str(e.value)


def test_a_url_without_a_store_is_reachable(s3):
    url, so = s3  # nothing written under this prefix yet: fine for a writer
    assert storage.as_store(url + "/new.fkd", read_only=False, storage_options=so).path.endswith("new.fkd")


def test_latency_proxy_delays_and_counts_requests():
    try:
        server = S3Server(delay_ms=50).start()
    except (RuntimeError, OSError, ImportError) as e:
        pytest.skip(f"the moto S3 server could not start on 127.0.0.1: {e}")
    try:
        server.make_bucket("lat")
        fs = server.filesystem(proxy=True)
        fs.pipe("lat/a", b"x" * 1000)
        server.proxy_stats(reset=True)
        t = time.perf_counter()
        for _ in range(4):
            assert fs.cat_file("lat/a", start=10, end=20) == b"x" * 10
        dt = time.perf_counter() - t
        st = server.proxy_stats(reset=True)
        assert st["by_method"] == {"GET": 4} and st["requests"] == 4
        assert dt >= 4 * 0.05  # sequential requests each waited 50 ms
        assert server.proxy_stats()["requests"] == 0  # reset
    finally:
        server.stop()
    assert server.proc.returncode == 0


# --------------------------------------------------------------------------------------------- stores on S3

N, M, C = 40, 6, 12


def _labels(seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 60, size=(N, 2))
    h = rng.integers(4, 20, size=(N, M))
    w = rng.integers(4, 20, size=(N, M))
    boxes = np.stack([np.zeros_like(h), np.zeros_like(w), h, w], -1)
    probs = rng.dirichlet(np.ones(C), size=(N, M)).astype(np.float32)
    return sizes, boxes, rng.random((N, M)) < 0.5, probs


def _write(location, storage_options=None, seed=0):
    from fkdstore.writer import write

    sizes, boxes, flips, probs = _labels(seed)
    w = write(location, num_images=N, crops_per_image=M, num_classes=C, codec={"name": "ms", "k": 3},
              image_keys=[f"c{i % 3}/im{i}.png" for i in range(N)], image_sizes=sizes, labels=np.arange(N) % C,
              images_per_shard=16, images_per_chunk=8, storage_options=storage_options)
    with w:
        for a in range(0, N, 16):  # whole shards, in order
            w.put(np.arange(a, min(N, a + 16)), boxes[a:a + 16], flips[a:a + 16], probs[a:a + 16])
    return w


def _same_records(a, b):
    for name in ("box", "flip"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.fields.keys() == b.fields.keys()
    for k in a.fields:
        np.testing.assert_array_equal(a.fields[k], b.fields[k])


def test_write_then_read_on_s3_equals_local(s3, tmp_path):
    from fkdstore.reader import open as open_store

    url, so = s3
    _write(url + "/labels.fkd", so)
    _write(tmp_path / "labels.fkd")
    with open_store(url + "/labels.fkd", storage_options=so) as r, open_store(tmp_path / "labels.fkd") as lo:
        assert r.complete and r.path == url + "/labels.fkd"
        assert r.image_keys == lo.image_keys
        np.testing.assert_array_equal(r.labels, lo.labels)
        _same_records(r.read_all(), lo.read_all())
        slots = np.random.default_rng(1).integers(0, M, size=(N, 2))
        _same_records(r.read_all(slots), lo.read_all(slots))
        idx = np.array([39, 3, 17, 16, 0])
        _same_records(r.read_batch(idx, slots[idx]), lo.read_batch(idx, slots[idx]))
        np.testing.assert_array_equal(r.soft_labels(5), lo.soft_labels(5))


def test_store_written_to_s3_and_copied_to_disk_is_byte_identical(s3, s3_server, tmp_path):
    from pathlib import Path

    url, so = s3
    _write(url + "/labels.fkd", so)
    _write(tmp_path / "local.fkd")
    fs = s3_server.filesystem()
    fs.get(url[len("s3://"):] + "/labels.fkd/", str(tmp_path / "copy.fkd") + "/", recursive=True)

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    local, copy = tree(tmp_path / "local.fkd"), tree(tmp_path / "copy.fkd")
    assert sorted(copy) == sorted(local)
    differ = [k for k in local if local[k] != copy[k]]
    assert not differ, differ


def test_verify_reads_an_s3_store(s3):
    from fkdstore.verify import verify

    url, so = s3
    _write(url + "/labels.fkd", so)
    assert verify(url + "/labels.fkd", storage_options=so) == []
    assert verify(url + "/labels.fkd") == []  # endpoint and credentials from the environment


@pytest.mark.parametrize("url, env, message", [
    ("s4://fkd/x.fkd", {}, "s4://fkd/x.fkd: no installed filesystem handles the URL scheme 's4'"),
    ("s3://no-such-bucket/x.fkd", {}, "s3://no-such-bucket/x.fkd: bucket 'no-such-bucket' does not exist"),
    ("s3://fkd/x.fkd", {"AWS_ACCESS_KEY_ID": "AKIAWRONGKEY", "AWS_SECRET_ACCESS_KEY": "wrong"},
     "s3://fkd/x.fkd: access denied (Forbidden); check the credentials"),
])
def test_cli_prints_one_line_for_an_unreachable_store(s3, url, env, message):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fkdstore.cli import EXIT_ERROR

    repo = Path(__file__).resolve().parents[1]  # a fresh process: fsspec caches filesystems per process
    res = subprocess.run([sys.executable, "-m", "fkdstore", "verify", url], capture_output=True, text=True,
                         env={**os.environ, **env, "PYTHONPATH": str(repo)}, timeout=120)
    assert res.returncode == EXIT_ERROR, res.stderr
    assert res.stdout == ""
    assert res.stderr.startswith(f"fkdstore: error: {message}") and res.stderr.count("\n") == 1, res.stderr
