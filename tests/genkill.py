"""kill -9 of ``fkdstore generate`` at a chosen step of a shard write (shared by test_faults_generate.py and
test_s3.py).

:data:`WRAPPER` is a tiny script that runs the real command line (``fkdstore.cli.main``) after pointing the
writer's fault hook (``fkdstore.writer._fault_point``, called between the steps of a shard write: ``"array"``
after each data array, ``"data"``, ``"manifest"``, ``"flags"``) at a function that sends the process
SIGKILL the ``COUNT``-th time step ``STEP`` is reached, read from the environment variable
``FKDSTORE_KILL_AT=STEP:COUNT``. So the kill lands at the same point of the same shard on every run,
whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILL_ENV = "FKDSTORE_KILL_AT"

WRAPPER = textwrap.dedent("""
    import os, signal, sys
    from fkdstore import writer

    step, _, count = os.environ.get("%s", "").partition(":")
    if step:
        seen = [0]

        def kill_at(s, shard):
            if s == step:
                seen[0] += 1
                if seen[0] == int(count):
                    os.kill(os.getpid(), signal.SIGKILL)

        writer._fault_point = kill_at

    from fkdstore.cli import main
    sys.exit(main(sys.argv[1:]))
""") % KILL_ENV

# 20 digit images, 5 shards of 4; the tiny CNN is seeded, so every run computes the same labels. Crops are
# seeded (derived from the sampler): ms k=3 stores soft/indices and soft/probs only, unless --store-crops.
GENERATE_ARGS = ["--teacher", "fkdstore.testing:tiny_cnn", "--crops", "4", "--codec", "ms", "--k", "3",
                 "--input-size", "32", "--images-per-shard", "4", "--batch-size", "8", "--num-workers", "0",
                 "--device", "cpu", "--no-progress"]


def run_generate(script: Path, images, out: str, *, kill_at: str | None = None, storage_options=None,
                 env: dict | None = None, timeout: float = 300,
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``fkdstore generate --images IMAGES --out OUT ...`` through :data:`WRAPPER` (``script``); ``extra``:
    more options (e.g. ``--store-crops``)."""
    e = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    e.pop(KILL_ENV, None)
    if kill_at:
        e[KILL_ENV] = kill_at
    cmd = [sys.executable, str(script), "generate", "--images", str(images), "--out", str(out), *GENERATE_ARGS, *extra]
    if storage_options:
        cmd += ["--storage-options", json.dumps(storage_options)]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)


def without_volatile_meta(zarr_json: bytes) -> dict:
    """The root ``zarr.json`` of a store minus the meta a resumed run changes by design (time taken, finish
    time, history of runs: ``fkdstore.schema.VOLATILE_META``); the header checksum does not cover meta."""
    from fkdstore import schema as S

    doc = json.loads(zarr_json)
    meta = doc["attributes"][S.ATTR_KEY]["meta"]
    for k in S.VOLATILE_META:
        meta.pop(k, None)
    return doc


def assert_same_objects(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Every object (file) of two stores is byte-identical; the root ``zarr.json`` equal up to volatile meta."""
    assert sorted(got) == sorted(want)
    differ = [k for k in want if k != "zarr.json" and got[k] != want[k]]
    assert not differ, differ
    assert without_volatile_meta(got["zarr.json"]) == without_volatile_meta(want["zarr.json"])
