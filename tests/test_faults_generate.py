"""kill -9 of ``fkdstore generate`` (the command line, in a child process) at deterministic points of a shard
write, then the same command again: no image is marked written without its data, and the resumed store is
byte-identical, file for file, to an uninterrupted run (the root zarr.json up to the run's volatile meta:
time taken, finish time, history). The kill points come from the writer's fault hook (tests/genkill.py):

* ``array``: during a shard's data, after some of its arrays were rewritten and before the others;
* ``data``: the shard's data written and fsync'ed, its manifest not;
* ``manifest``: data and manifest written, the ``written`` flags not.

(A kill after the flags, before the ownership record is released, is covered for the writer in
test_faults_writer.py; the S3 variant of the ``manifest`` point is in test_s3.py.)
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from genkill import WRAPPER, assert_same_objects, run_generate

import fkdstore
from fkdstore.testing import make_digits_folder
from fkdstore.verification import verify

pytestmark = pytest.mark.slow  # each test kills and reruns `fkdstore generate` in child processes

pytest.importorskip("torch")


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs: seeded crops (the default) and stored crops (``--store-crops``)."""
    root = tmp_path_factory.mktemp("gen")
    digits = make_digits_folder(root / "digits", size=32, per_class=2)  # 20 PNGs -> 5 shards of 4
    script = root / "wrapper.py"
    script.write_text(WRAPPER)
    refs = {}
    for extra in ((), ("--store-crops",)):
        res = run_generate(script, digits, root / f"ref{len(extra)}", extra=extra)
        assert res.returncode == 0, res.stderr
        refs[extra] = root / f"ref{len(extra)}", files(root / f"ref{len(extra)}")
    return script, digits, refs


@pytest.mark.parametrize(
    "kill_at, flagged, extra",
    [
        ("array:3", 4, ()),  # shard 1: 1 of its 2 stored arrays rewritten (ms k=3: indices, probs; box/flip derived)
        ("array:6", 4, ("--store-crops",)),  # shard 1: 2 of its 4 arrays rewritten (box, flip, indices, probs)
        pytest.param("data:2", 4, (), marks=pytest.mark.slow),  # shard 1: data on disk, manifest not
        ("manifest:3", 8, ()),  # shard 2: data and manifest on disk, flags not
    ],
)
def test_kill_9_during_generate_then_resume_is_byte_identical(reference, tmp_path, kill_at, flagged, extra):
    script, digits, refs = reference
    ref_path, expected = refs[extra]
    out = tmp_path / "killed.fkd"
    res = run_generate(script, digits, out, kill_at=kill_at, extra=extra)
    assert res.returncode == -signal.SIGKILL, res.stderr
    with fkdstore.open(out) as r, fkdstore.open(ref_path) as ref:
        assert r.header.seeded == (not extra)
        written = np.flatnonzero(r.written)
        assert len(written) == flagged  # whole shards only, exactly those before the kill point
        got, want = r.read_batch(written), ref.read_batch(written)  # checked against the manifest as read
        np.testing.assert_array_equal(got.box, want.box)
        np.testing.assert_array_equal(got.flip, want.flip)
        for k in want.fields:
            np.testing.assert_array_equal(got.fields[k], want.fields[k])
    assert list((out / "owners").iterdir())  # the killed writer's record is left behind ...

    res = run_generate(script, digits, out, extra=extra)  # ... and the same command resumes (same host, dead pid)
    assert res.returncode == 0, res.stderr
    with fkdstore.open(out) as r:
        assert r.complete
        assert r.meta["history"][-1]["images_labelled"] == 20 - flagged  # written images were not redone
    assert verify(out) == []
    assert_same_objects(files(out), expected)
