"""Stores on S3-compatible object storage, against a real S3 server (moto) started on 127.0.0.1 by the
tests (tests/s3util.py): Zarr round trip through storage.as_store, the latency proxy, and the one-line
errors for a bad URL, a missing bucket, wrong credentials and a dead endpoint; then every entry point on
s3:// URLs: generate (in process, 2 torchrun ranks, 2 ranks without a process group, kill -9 and resume),
TorchDataset (main process, forked workers, pickling), and the inspect/verify/convert command line."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zarr
from s3util import S3Server

from fkdstore import storage
from fkdstore.errors import StorageError

pytestmark = pytest.mark.slow  # every test talks to the S3 server (moto) these tests start in a child process


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
    ("missing bucket", "s3://no-such-bucket/x.fkd", {},
     "s3://no-such-bucket/x.fkd: bucket 'no-such-bucket' does not exist"),
    ("wrong credentials", "s3://fkd/x.fkd", {"key": "AKIAWRONGKEY", "secret": "wrong"},
     "s3://fkd/x.fkd: access denied (Forbidden); check the credentials (AWS_ACCESS_KEY_ID"),
    ("dead endpoint", "s3://fkd/x.fkd",
     {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}},
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


def test_seeded_crops_store_on_s3_reads_like_local(s3, tmp_path):
    """A seeded-crops store (no box/flip arrays) written to S3: read_all (whole shard files, derived crops checked
    against the manifest), read_batch and verify give what the same store on disk gives."""
    from fkdstore.reader import open as open_store
    from fkdstore.seeded import SlotCropSampler
    from fkdstore.verification import verify
    from fkdstore.writer import write

    url, so = s3
    sizes, _, _, probs = _labels()
    sampler = SlotCropSampler(seed=9)
    for loc, opts in ((url + "/seeded.fkd", so), (tmp_path / "seeded.fkd", None)):
        with write(loc, num_images=N, crops_per_image=M, num_classes=C, codec={"name": "ms", "k": 3},
                   image_keys=[f"c{i % 3}/im{i}.png" for i in range(N)], image_sizes=sizes, images_per_shard=16,
                   images_per_chunk=8, storage_options=opts, crop_sampler=sampler) as w:
            w.put(np.arange(N), None, None, probs)
    with open_store(url + "/seeded.fkd", storage_options=so) as r, open_store(tmp_path / "seeded.fkd") as lo:
        assert r.header.format_version == "4.0" and r.header.seeded and "box" not in r.record_arrays
        _same_records(r.read_all(), lo.read_all())
        idx = np.array([39, 3, 17])
        _same_records(r.read_batch(idx, [[0], [5], [2]]), lo.read_batch(idx, [[0], [5], [2]]))
    assert verify(url + "/seeded.fkd", storage_options=so) == []


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
    from fkdstore.verification import verify

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


# --------------------------------------------------------------------------------------------- every entry point

GEN = dict(crops_per_image=4, codec={"name": "ms", "k": 3}, input_size=32, images_per_shard=4, batch_size=8,
           num_workers=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from fkdstore.testing import make_digits_folder

    return make_digits_folder(tmp_path_factory.mktemp("digits"), size=32, per_class=2)  # 20 PNGs, 5 shards of 4


def _objects(fs, url: str) -> dict[str, bytes]:
    """Every object under a URL prefix, by key relative to it."""
    base = url[len("s3://"):].rstrip("/")
    fs.invalidate_cache()
    return {k[len(base) + 1:]: fs.cat_file(k) for k in sorted(fs.find(base))}


def _all_arrays(reader) -> dict[str, np.ndarray]:
    names = [*reader.header.per_image_arrays, *reader.per_crop_arrays, "manifest"]
    return {n: reader.array(n)[:] for n in names}


def _assert_same_store(a, b):
    x, y = _all_arrays(a), _all_arrays(b)
    assert x.keys() == y.keys()
    for n in x:
        assert x[n].dtype == y[n].dtype and np.array_equal(x[n], y[n]), n


def test_generate_and_torch_dataset_on_s3_equal_local(s3, s3_server, digits, tmp_path):
    """generate(out=URL) writes what generate(out=folder) writes; TorchDataset on the S3 store gives the same
    items as on a local copy, in the main process and in forked DataLoader workers; pickling carries the
    URL and storage_options, never a filesystem or its connections."""
    import pickle

    torch = pytest.importorskip("torch")
    import fkdstore
    from fkdstore.testing import tiny_cnn

    url, so = s3
    r = fkdstore.generate(tiny_cnn(10), digits, url + "/gen.fkd", storage_options=so, **GEN)
    assert r.complete and r.path == url + "/gen.fkd"
    local = fkdstore.generate(tiny_cnn(10), digits, tmp_path / "gen.fkd", **GEN)
    _assert_same_store(r, local)
    s3_server.filesystem().get(url[len("s3://"):] + "/gen.fkd/", str(tmp_path / "copy.fkd") + "/", recursive=True)

    ds = fkdstore.TorchDataset(url + "/gen.fkd", digits, crops_per_sample=2, storage_options=so)
    lo = fkdstore.TorchDataset(tmp_path / "copy.fkd", digits, crops_per_sample=2)
    blob = pickle.dumps(ds)
    assert b"S3FileSystem" not in blob and b"aiobotocore" not in blob  # the location travels, not handles
    assert pickle.loads(blob)._reader is None

    def same(a, b):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k

    for e in (0, 1):
        ds.set_epoch(e)
        lo.set_epoch(e)
        for i in range(len(lo)):
            same(ds[i], lo[i])
    ds.set_epoch(0)
    lo.set_epoch(0)
    kw = dict(batch_size=5, collate_fn=fkdstore.collate)
    workers = torch.utils.data.DataLoader(ds, num_workers=2, multiprocessing_context="fork", **kw)
    for got, want in zip(workers, torch.utils.data.DataLoader(lo, num_workers=0, **kw), strict=True):
        same(got, want)
    reloaded = pickle.loads(blob)  # as a spawned worker: reopens s3://... with the options
    same(reloaded[3], lo[3])


def test_forked_reader_rebuilds_its_filesystem(s3):
    """A Reader opened on S3 before a fork reads in the child (an fsspec filesystem is not fork-safe: the
    child rebuilds the store from the URL and storage_options)."""
    import multiprocessing as mp

    from fkdstore.reader import open as open_store

    url, so = s3
    _write(url + "/labels.fkd", so)
    r = open_store(url + "/labels.fkd", storage_options=so)
    want = r.read_batch(np.arange(N)).fields["probs"]
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply(_read_probs, (r,))
    np.testing.assert_array_equal(got, want)


def _read_probs(reader):
    return reader.read_batch(np.arange(N)).fields["probs"]


def test_cli_inspect_verify_convert_on_s3_with_storage_options(s3, monkeypatch, capsys, tmp_path):
    """The CLI takes s3:// URLs for every store argument; --storage-options is what gets through (the
    environment's credentials are wrong here); without it the command ends with one error line."""
    import json

    import s3fs

    from fkdstore.cli import main
    from fkdstore.reader import open as open_store
    from fkdstore.report import storage_stats

    url, so = s3
    src, dst = url + "/ms3.fkd", url + "/hard.fkd"
    _write(src, so)
    _write(tmp_path / "local.fkd")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems by options: forget env-only ones
    opts = ["--storage-options", json.dumps(so)]

    assert main(["inspect", src, "--json", *opts]) == 0
    d = json.loads(capsys.readouterr().out)
    local = storage_stats(tmp_path / "local.fkd")
    assert d["path"] == src and d["complete"] and d["num_images"] == N
    assert d["total_bytes"] == local["_total"]["bytes"] and d["total_files"] == local["_total"]["files"]
    assert d["arrays"]["soft/probs"]["stored_bytes"] == local["soft/probs"]["bytes"] > 0
    assert main(["inspect", src, *opts]) == 0
    assert src in capsys.readouterr().out

    assert main(["verify", src, *opts]) == 0
    capsys.readouterr()
    assert main(["convert", src, dst, "--codec", "hard", *opts]) == 0
    assert "converted 40 images ms K=3 -> hard" in capsys.readouterr().out
    assert main(["verify", dst, "--json", *opts]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    with open_store(dst, storage_options=so) as r, open_store(src, storage_options=so) as s:
        np.testing.assert_array_equal(r.read_all().fields["indices"], s.read_all().fields["indices"][..., 0])
        assert r.meta["history"][-1]["source"] == src
    assert main(["convert", src, str(tmp_path / "down.fkd"), "--codec", "hard", *opts]) == 0  # S3 -> disk
    capsys.readouterr()
    assert main(["convert", src, dst, "--codec", "mr", *opts]) == 1  # the destination holds another conversion
    assert f"destination {dst} exists and is not empty" in capsys.readouterr().err

    assert main(["verify", src]) == 1  # the environment's (wrong) credentials
    err = capsys.readouterr().err
    assert err.startswith(f"fkdstore: error: {src}: access denied") and err.count("\n") == 1, err


BAD = [
    ("s4://fkd/x.fkd", {}, "s4://fkd/x.fkd: no installed filesystem handles the URL scheme 's4'"),
    ("s3://no-such-bucket/x.fkd", {}, "s3://no-such-bucket/x.fkd: bucket 'no-such-bucket' does not exist"),
    ("s3://fkd/x.fkd", {"key": "AKIAWRONGKEY", "secret": "wrong"}, "s3://fkd/x.fkd: access denied (Forbidden)"),
]


@pytest.mark.parametrize("url, options, message", BAD)
def test_generate_and_torch_dataset_raise_storage_error_for_unreachable_urls(s3, digits, url, options, message):
    pytest.importorskip("torch")
    import fkdstore

    _, so = s3
    opts = {**so, **options}

    class Untouched(__import__("torch").nn.Module):
        def forward(self, x):  # the URL is checked before the teacher runs
            raise AssertionError("the teacher ran")

    with pytest.raises(StorageError) as e:
        fkdstore.generate(Untouched(), digits, url, storage_options=opts, **GEN)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(StorageError) as e:
        fkdstore.TorchDataset(url, digits, storage_options=opts)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("url, options, message", BAD)
def test_cli_generate_prints_one_line_for_unreachable_urls(s3, digits, capsys, url, options, message):
    import json

    pytest.importorskip("torch")
    from fkdstore.cli import main

    _, so = s3
    code = main(["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out", url,
                 "--crops", "2", "--device", "cpu", "--no-progress", "--storage-options",
                 json.dumps({**so, **options})])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"fkdstore: error: {message}") and err.count("\n") == 1, err


DIST_S3 = """
import json, sys
from fkdstore.testing import tiny_cnn
from fkdstore.runner import generate

r = generate(tiny_cnn(10), sys.argv[1], sys.argv[2], storage_options=json.loads(sys.argv[3]), crops_per_image=4,
             codec={"name": "ms", "k": 3}, input_size=32, images_per_shard=4, batch_size=8, num_workers=0,
             progress=False, device="cpu")
assert r.complete or sys.argv[4:] == ["no-barrier"]  # without a process group rank 0 may finish first
"""


@pytest.mark.slow
def test_torchrun_two_processes_to_s3_equal_one_process(s3, digits, tmp_path):
    """Two ranks (torchrun, gloo) write disjoint shards of one S3 store through the store API only (no
    shared folder is involved); every array equals a one-process run's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    import fkdstore
    from fkdstore.testing import tiny_cnn

    url, so = s3
    script = tmp_path / "dist_s3.py"
    script.write_text(DIST_S3)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(script), str(digits), url + "/two.fkd", json.dumps(so)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    r = fkdstore.open(url + "/two.fkd", storage_options=so)
    run = r.meta["history"][-1]
    assert r.complete and run["world_size"] == 2 and run["images_per_rank"] == [12, 8]  # shards 0,2,4 | 1,3
    one = fkdstore.generate(tiny_cnn(10), digits, url + "/one.fkd", storage_options=so, **GEN)
    _assert_same_store(r, one)
    assert list(tmp_path.iterdir()) == [script]  # nothing was written to a local folder


@pytest.mark.slow
def test_kill_9_during_generate_to_s3_then_resume_is_byte_identical(s3, s3_server, digits, tmp_path):
    """``fkdstore generate --out s3://...`` killed after a shard's manifest and before its flags (writer
    fault hook), then rerun: every object equals an uninterrupted run's (zarr.json up to volatile meta)."""
    import signal

    pytest.importorskip("torch")
    from genkill import WRAPPER, assert_same_objects, run_generate

    import fkdstore
    from fkdstore.testing import tiny_cnn

    url, so = s3
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    ref = fkdstore.generate(tiny_cnn(), digits, url + "/ref.fkd", storage_options=so,  # what the CLI runs
                            teacher_name="fkdstore.testing:tiny_cnn", **GEN)
    assert ref.complete
    res = run_generate(script, digits, url + "/killed.fkd", kill_at="manifest:3", storage_options=so)
    assert res.returncode == -signal.SIGKILL, res.stderr
    fs = s3_server.filesystem()
    assert int(fkdstore.open(url + "/killed.fkd", storage_options=so).written.sum()) == 8  # shards 0 and 1
    assert any(k.startswith("owners/") for k in _objects(fs, url + "/killed.fkd"))
    res = run_generate(script, digits, url + "/killed.fkd", storage_options=so)  # same command: resume
    assert res.returncode == 0, res.stderr
    r = fkdstore.open(url + "/killed.fkd", storage_options=so)
    assert r.complete and r.meta["history"][-1]["images_labelled"] == 12
    assert_same_objects(_objects(fs, url + "/killed.fkd"), _objects(fs, url + "/ref.fkd"))


@pytest.mark.slow
def test_ranks_without_a_process_group_wait_for_the_header_on_s3(s3, digits, tmp_path):
    """The multi-node case with no rendezvous at all (only RANK/WORLD_SIZE set, as a scheduler does): rank 1
    starts first and polls the S3 store (one GET of zarr.json per 0.5 s) until rank 0 has created it, then
    both write their own shards."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    import fkdstore

    url, so = s3
    script = tmp_path / "rank.py"
    script.write_text(DIST_S3)
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    base |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    cmd = [sys.executable, str(script), str(digits), url + "/env.fkd", json.dumps(so), "no-barrier"]
    rank1 = subprocess.Popen(cmd, env={**base, "RANK": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        rank0 = subprocess.run(cmd, env={**base, "RANK": "0"}, capture_output=True, text=True, timeout=180)
        out1, _ = rank1.communicate(timeout=180)
    finally:
        if rank1.poll() is None:
            rank1.kill()
            rank1.wait()
    assert rank0.returncode == 0, rank0.stdout + rank0.stderr
    assert rank1.returncode == 0, out1
    r = fkdstore.open(url + "/env.fkd", storage_options=so)
    assert r.complete  # rank 1's shards (1, 3) are there: it found the store rank 0 created
    from fkdstore.testing import tiny_cnn

    _assert_same_store(r, fkdstore.generate(tiny_cnn(10), digits, tmp_path / "one.fkd", **GEN))


def test_cli_import_fkd_to_s3(s3, s3_server, tmp_path, capsys):
    """import-fkd writes its new store to a URL (--storage-options); a failed import leaves nothing there."""
    import json

    pytest.importorskip("torch")
    from test_convert import C as FKD_C
    from test_convert import _fkd_tree

    from fkdstore.cli import main
    from fkdstore.reader import open as open_store

    url, so = s3
    root, images, _ = _fkd_tree(tmp_path)
    dst, opts = url + "/imp.fkd", ["--storage-options", json.dumps(so)]
    assert main(["import-fkd", str(root), dst, "--images", str(images), "--num-classes", "6", *opts]) == 1
    assert "class index" in capsys.readouterr().err
    assert _objects(s3_server.filesystem(), dst) == {}  # the half-written output was removed
    assert main(["import-fkd", str(root), dst, "--images", str(images), "--num-classes", str(FKD_C), *opts]) == 0
    assert "imported 6 FKD label files" in capsys.readouterr().out
    assert main(["import-fkd", str(root), str(tmp_path / "imp.fkd"), "--images", str(images),
                 "--num-classes", str(FKD_C)]) == 0
    with open_store(dst, storage_options=so) as r, open_store(tmp_path / "imp.fkd") as lo:
        assert r.complete
        _assert_same_store(r, lo)


def test_prune_and_ensemble_between_s3_and_local_equal_local_runs(s3, tmp_path):
    """prune and ensemble take URLs for sources and destination (storage_options serve the URLs)."""
    import fkdstore
    from fkdstore.reader import open as open_store

    url, so = s3
    _write(url + "/a.fkd", so)
    _write(tmp_path / "a.fkd")
    fkdstore.prune(url + "/a.fkd", url + "/p.fkd", keep=0.5, seed=3, storage_options=so)  # S3 -> S3
    fkdstore.prune(tmp_path / "a.fkd", tmp_path / "p.fkd", keep=0.5, seed=3)
    fkdstore.ensemble([url + "/a.fkd", tmp_path / "a.fkd"], tmp_path / "e.fkd", storage_options=so)  # mixed
    with open_store(url + "/p.fkd", storage_options=so) as r, open_store(tmp_path / "p.fkd") as lo:
        assert r.crops_per_image == lo.crops_per_image == M // 2
        _same_records(r.read_all(), lo.read_all())
        assert r.meta["history"][-1]["source"] == url + "/a.fkd"
    with open_store(tmp_path / "e.fkd") as e, open_store(tmp_path / "a.fkd") as lo:
        _same_records(e.read_all(), lo.read_all())  # the mean of two identical teachers re-encodes identically
    with pytest.raises(TypeError, match="storage_options apply to URLs only"):
        fkdstore.prune(tmp_path / "a.fkd", tmp_path / "q.fkd", keep=0.5, storage_options=so)


def test_create_if_absent_is_a_conditional_put(s3, monkeypatch):
    """Ownership records are created with ``If-None-Match: *`` on S3: a second create of the same key leaves the
    first writer's record (no check-then-set window: Zarr's set_if_not_exists is not used)."""
    from fkdstore import storage

    url, so = s3
    store = storage.as_store(url + "/owners-test", read_only=False, storage_options=so)

    def check_then_set(*a, **k):
        raise AssertionError("check-then-set used on S3")

    monkeypatch.setattr(type(store), "set_if_not_exists", check_then_set)
    storage.create_if_absent(store, "owners/0.json", b'{"token": "first"}')
    storage.create_if_absent(store, "owners/0.json", b'{"token": "second"}')
    assert storage.get_bytes(store, "owners/0.json") == b'{"token": "first"}'
