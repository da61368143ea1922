"""Stores being written stay readable, and writers never replace each other's images (spec sections 4 and 8).

* kill -9 inside the rewrite window of a partially flushed shard (after one data array, after every data
  array, inside the rename of a shard file written aside): every image marked written still reads through
  ``fkdstore.open``, ``verify`` lists only the incompleteness, and a resume removes the temp file and
  completes the store;
* a reader loop beside a writer (another process) that flushes partial shards over and over: every image
  the reader sees marked written reads, with the writer's labels, in every one of >= 1,000 reads;
* two writers on one shard (sequential, overlapping in threads, overlapping in processes) and ``put`` of
  an image already written (refused unless ``overwrite=True``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from storeutil import make_data

import fkdstore
from fkdstore import storage
from fkdstore.errors import ConcurrentWriterError, ValidationError
from fkdstore.verification import verify

REPO = Path(__file__).resolve().parents[1]
N, M, C, IPC, IPS = 24, 3, 7, 2, 8

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import fkdstore
    from fkdstore import storage, writer as W
    from storeutil import make_data

    path, step, count, mode, n = sys.argv[1], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    seen = [0]

    def hit(s):
        if s == step:
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    W._fault_point = lambda s, shard: hit(s)
    replace = os.replace

    def killing_replace(src, dst):  # a shard file of a rewrite written aside, killed before its rename
        if "/soft/" in str(dst) and str(dst).endswith("c/0/0/0"):
            hit("rename")
        return replace(src, dst)

    os.replace = killing_replace
    d = make_data(n, %(M)d, %(C)d, seed=3)
    w = fkdstore.write(path, num_images=n, crops_per_image=%(M)d, num_classes=%(C)d, codec="ms",
                       image_keys=d["keys"], image_sizes=d["sizes"], labels=d["labels"],
                       images_per_chunk=%(IPC)d, images_per_shard=%(IPS)d)
    todo = [i for i in range(n) if not w.written[i]]
    if mode == "loop":  # one image at a time, each flushed: every flush of shard s rewrites it partially
        storage.fsync_local = lambda *a, **k: None  # durability is not what this run tests; time is
        for i in todo:
            w.put([i], d["boxes"][[i]], d["flips"][[i]], d["probs"][[i]])
            w.flush()
    else:  # shard 0 in three partial flushes, then the rest
        for part in ([0, 1, 2], [3, 4], [5, 6, 7], list(range(8, n))):
            part = [i for i in part if i in todo]
            if part:
                w.put(part, d["boxes"][part], d["flips"][part], d["probs"][part])
                w.flush()
    w.close()
""") % dict(N=N, M=M, C=C, IPC=IPC, IPS=IPS)


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    script = tmp_path_factory.mktemp("child") / "child.py"
    script.write_text(CHILD)
    return script


def run_child(script, path, step="none", count=0, mode="parts", n=N, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(path), str(REPO / "tests"), step, str(count), mode, str(n)]
    if kw.get("background"):
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def temp_files(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*") if storage.is_temp_name(p.name)]


def check_written_images(path: Path) -> int:
    """Every image marked written reads through fkdstore.open with the labels put (read, read_batch)."""
    d = make_data(N, M, C, seed=3)
    with fkdstore.open(path) as r:
        done = np.flatnonzero(r.written)
        for i in done:
            rec = r.read(int(i))
            np.testing.assert_array_equal(rec.box, d["boxes"][i])
        if len(done):
            rec = r.read_batch(done)
            np.testing.assert_array_equal(rec.flip, d["flips"][done])
            expect = fkdstore.codecs.as_codec("ms").encode(d["probs"][done])
            np.testing.assert_array_equal(rec.fields["probs"], expect["probs"])
    return len(done)


@pytest.mark.parametrize("step, count", [
    ("array", 5),  # the rewrite of shard 0 (its 2nd flush) killed after its first data array
    ("data", 2),  # every data array of the rewrite written, its manifest row not yet
    ("rename", 3),  # killed inside the rewrite of soft/probs' shard file: written aside, not yet renamed
])
def test_kill_9_inside_the_rewrite_window_leaves_every_written_image_readable(child, tmp_path, step, count):
    path = tmp_path / "s.fkd"
    res = run_child(child, path, step, count)
    assert res.returncode == -signal.SIGKILL, res.stderr
    done = check_written_images(path)
    assert done == 3  # the first partial flush of shard 0
    assert [p for p in verify(path) if "incomplete" not in p] == []
    if step == "rename":
        assert len(temp_files(path)) == 1  # the shard file written aside; readers ignore it
    res = run_child(child, path)  # resume: removes the killed writer's temp file, completes the store
    assert res.returncode == 0, res.stderr
    assert temp_files(path) == []
    assert check_written_images(path) == N and verify(path) == []


def test_a_reader_beside_a_writer_that_flushes_partial_shards_never_fails(child, tmp_path):
    """The writer (another process) puts one image at a time and flushes it, so every flush rewrites a
    partially filled shard; the reader refreshes (or reopens) and reads images it sees marked written."""
    n = 32
    d = make_data(n, M, C, seed=3)
    expect = fkdstore.codecs.as_codec("ms").encode(d["probs"])["probs"]
    reads = errors = writers = 0
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + 60
    while reads < 1000 and time.monotonic() < deadline:
        path = tmp_path / f"s{writers}.fkd"
        proc = run_child(child, path, mode="loop", n=n, background=True)
        writers += 1
        r = None
        while proc.poll() is None:
            try:
                if r is None or reads % 50 == 0:
                    r = fkdstore.open(path)  # a cold reader: files opened after rewrites
                else:
                    r.refresh()
            except (fkdstore.errors.FormatError, FileNotFoundError):  # not created yet; the header comes last
                continue
            done = np.flatnonzero(r.written)
            for i in rng.choice(done, min(len(done), 8), replace=False) if len(done) else []:
                reads += 1
                try:
                    got = r.read(int(i))
                    np.testing.assert_array_equal(got.fields["probs"], expect[i])
                    np.testing.assert_array_equal(got.box, d["boxes"][i])
                except Exception as e:  # noqa: BLE001 - counted: the assertion below lists none
                    errors += 1
                    print("read error:", type(e).__name__, e)
        out, err = proc.communicate()
        assert proc.returncode == 0, err
    print(f"{reads} reads beside {writers} writer runs, {errors} errors")
    assert reads >= 1000 and errors == 0, (reads, errors)


# --------------------------------------------------------------------------------------- two writers


def _writer(path, d, **kw):
    return fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec="ms", image_keys=d["keys"],
                          image_sizes=d["sizes"], labels=d["labels"], images_per_chunk=IPC, images_per_shard=IPS,
                          **kw)


def _put(w, d, idx, probs=None):
    idx = np.asarray(idx)
    w.put(idx, d["boxes"][idx], d["flips"][idx], (d["probs"] if probs is None else probs)[idx])


def test_a_second_writer_keeps_the_images_another_writer_completed(tmp_path):
    """Writer A opened before writer B wrote half of shard 0 and closed; A then writes the other half: B's
    images stay (A re-reads the shard's flags when it takes the shard), and an image B wrote is refused."""
    path = tmp_path / "s.fkd"
    d = make_data(N, M, C, seed=3)
    a = _writer(path, d)
    with _writer(path, d) as b:
        _put(b, d, [0, 1, 2, 3])
    assert not a.written[:4].any()  # A's flags are stale...
    with pytest.raises(ValidationError, match=r"image 2 \('class2/img_00002.jpg'\) is already written"):
        _put(a, d, [7, 2])  # ...but re-read under ownership: B's image 2 is not replaced
    _put(a, d, [4, 5, 6, 7])
    a.close()
    assert check_written_images(path) == 8


def test_two_writers_overlapping_on_one_shard_in_threads(tmp_path):
    path = tmp_path / "s.fkd"
    d = make_data(N, M, C, seed=3)
    a, b = _writer(path, d), _writer(path, d)
    _put(a, d, [0, 1])  # A buffers shard 0 (owns it)
    errors = []

    def second():
        try:
            _put(b, d, [4, 5])
        except ConcurrentWriterError as e:
            errors.append(e)

    t = threading.Thread(target=second)
    t.start()
    t.join()
    assert len(errors) == 1 and "shard 0" in str(errors[0])
    a.close()  # releases shard 0
    _put(b, d, [4, 5])
    b.close()
    with fkdstore.open(path) as r:
        assert np.flatnonzero(r.written).tolist() == [0, 1, 4, 5]
    assert check_written_images(path) == 4


TWO = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import fkdstore
    from fkdstore.errors import ConcurrentWriterError
    from storeutil import make_data

    path, which, start = sys.argv[1], int(sys.argv[3]), float(sys.argv[4])
    d = make_data(%(N)d, %(M)d, %(C)d, seed=3)
    probs = make_data(%(N)d, %(M)d, %(C)d, seed=10 + which)["probs"]  # each writer's own labels
    while time.time() < start:
        time.sleep(0.001)
    try:
        with fkdstore.write(path, num_images=%(N)d, crops_per_image=%(M)d, num_classes=%(C)d, codec="ms",
                            image_keys=d["keys"], image_sizes=d["sizes"], labels=d["labels"],
                            images_per_chunk=%(IPC)d, images_per_shard=%(IPS)d) as w:
            idx = np.arange(4) + 4 * which
            w.put(idx, d["boxes"][idx], d["flips"][idx], probs[idx])
            time.sleep(0.05)
    except ConcurrentWriterError as e:
        print(e, file=sys.stderr)
        sys.exit(3)
""") % dict(N=N, M=M, C=C, IPC=IPC, IPS=IPS)


def test_two_writer_processes_on_one_shard_never_lose_an_image(tmp_path):
    """Two processes start together, each putting its half of shard 0: each either succeeds or is refused
    (ConcurrentWriterError, exit 3), and every image of a writer that succeeded holds that writer's labels."""
    script = tmp_path / "two.py"
    script.write_text(TWO)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    d = make_data(N, M, C, seed=3)
    ms = fkdstore.codecs.as_codec("ms")
    paths = [tmp_path / f"s{run}.fkd" for run in range(3)]
    for path in paths:
        with _writer(path, d):  # created up front: both processes open an existing store
            pass
    start = time.time() + 1.2
    procs = {path: [subprocess.Popen([sys.executable, str(script), str(path), str(REPO / "tests"), str(k), str(start)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for k in (0, 1)] for path in paths}
    for path, pair in procs.items():
        codes = [p.wait(timeout=120) for p in pair]
        assert set(codes) <= {0, 3} and 0 in codes, [p.stderr.read() for p in pair]
        with fkdstore.open(path) as r:
            for k, code in enumerate(codes):
                idx = np.arange(4) + 4 * k
                if code == 0:
                    assert r.written[idx].all()
                    want = ms.encode(make_data(N, M, C, seed=10 + k)["probs"][idx])["probs"]
                    np.testing.assert_array_equal(r.read_batch(idx).fields["probs"], want)
                else:
                    assert not r.written[idx].any()


def test_put_of_an_image_already_written_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "s.fkd"
    d = make_data(N, M, C, seed=3)
    other = make_data(N, M, C, seed=9)["probs"]
    with _writer(path, d) as w:
        _put(w, d, [0, 1])
        w.flush()
        with pytest.raises(ValidationError, match=r"image 1 \('class1/img_00001.jpg'\) is already written.*overwrite"):
            _put(w, d, [1], other)
        _put(w, d, [2])
        _put(w, d, [2], other)  # buffered, not yet written: a later put replaces it
    with _writer(path, d) as w:  # another writer (a resume) refuses too
        with pytest.raises(ValidationError, match="image 0 .* is already written"):
            w.put_fields([0], d["boxes"][[0]], d["flips"][[0]], fkdstore.codecs.as_codec("ms").encode(other[[0]]))
        w.put([0], d["boxes"][[0]], d["flips"][[0]], other[[0]], overwrite=True)
    ms = fkdstore.codecs.as_codec("ms")
    with fkdstore.open(path) as r:
        np.testing.assert_array_equal(r.read(0).fields["probs"], ms.encode(other[[0]])["probs"][0])
        np.testing.assert_array_equal(r.read(1).fields["probs"], ms.encode(d["probs"][[1]])["probs"][0])
        np.testing.assert_array_equal(r.read(2).fields["probs"], ms.encode(other[[2]])["probs"][0])
