"""Optional (issue 15): zarrita, the JavaScript Zarr v3 implementation, reads every array of a store through
``benchmarks/interop/zarrita_check.mjs`` with a crc32c codec that verifies checksums, a float16 polyfill,
the spec's key recipe and the manifest tags recomputed in JavaScript. Runs when ``node`` is on PATH and
``npm install`` has been run in ``benchmarks/interop`` (see its README); skipped otherwise."""
import json
import shutil
import subprocess
from pathlib import Path

import crc32c
import numpy as np
import pytest
import zarr
from interop_stores import IPC, IPS, make_store

import fkdstore
from fkdstore.errors import CorruptStoreError

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "interop"
SCRIPT = HERE / "zarrita_check.mjs"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.optional,
    pytest.mark.skipif(NODE is None, reason="node is not on PATH (the zarrita check is optional)"),
    pytest.mark.skipif(not (HERE / "node_modules" / "zarrita").is_dir(),
                       reason="zarrita is not installed: run `npm install` in benchmarks/interop"),
]


def run(store, **env):
    import os

    return subprocess.run([NODE, str(SCRIPT), str(store)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("zarrita") / "s.zarr"  # float16 probs and a float16 aug column
    return path, make_store(path, {"name": "ms", "k": 5, "dtype": "float16"}, wide=True)


def test_zarrita_reads_every_array_like_fkdstore(store):
    path, inputs = store
    res = run(path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["manifest_ok"] is True  # every tag recomputed in JavaScript matched
    g = zarr.open_group(str(path), mode="r")
    with fkdstore.open(path) as r:
        assert out["keys"] == r.image_keys == inputs["keys"]
        rec = r.read_all()
        ours = {"key": g["key"][:], "manifest": g["manifest"][:], "image_size": r.image_sizes, "label": r.labels,
                "written": r.written.astype(np.uint8), "box": rec.box, "flip": rec.flip}
        ours |= {f"aug/{k}": v for k, v in rec.aug.items()} | {f"soft/{k}": v for k, v in rec.fields.items()}
    assert set(out["arrays"]) == set(ours)
    for name, v in ours.items():
        got = out["arrays"][name]
        assert (got["dtype"], tuple(got["shape"])) == (str(v.dtype), v.shape), name
        assert got["crc32c"] == crc32c.crc32c(np.ascontiguousarray(v).tobytes()), f"{name}: bytes differ"


def test_zarrita_reads_a_seeded_store_and_names_the_derived_columns(tmp_path):
    """Seeded crops: no box/flip arrays; every stored tag is recomputed, the derived columns are reported."""
    path = tmp_path / "seeded.zarr"
    make_store(path, {"name": "ms", "k": 5, "dtype": "float32"}, wide=False, seeded=True)
    res = run(path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["manifest_ok"] is True and out["unchecked"] == ["box", "flip"]
    assert "box" not in out["arrays"] and "soft/probs" in out["arrays"]


def test_zarrita_check_refuses_a_flipped_byte(store, tmp_path):
    path, _ = store
    copy = tmp_path / "s.zarr"
    shutil.copytree(path, copy)
    shard_file = copy / "soft" / "probs" / "c" / "1" / "0" / "0"
    blob = bytearray(shard_file.read_bytes())
    blob[len(blob) // 3] ^= 0x04  # a payload byte of an early inner chunk of shard 1
    shard_file.write_bytes(bytes(blob))
    res = run(copy)
    assert res.returncode == 1 and "crc32c mismatch" in res.stderr, (res.returncode, res.stderr)
    with fkdstore.open(copy) as r, pytest.raises(CorruptStoreError):
        r.read_batch(np.arange(IPS, 2 * IPS, IPC))


def test_zarrita_check_refuses_float16_without_float16array(store):
    path, _ = store
    res = run(path, ZARRITA_CHECK_NO_POLYFILL="1")
    if json.loads(run(path).stdout)["float16"] == "native":
        pytest.skip("this Node has a native Float16Array: nothing to refuse")
    assert res.returncode == 3 and "float16 needs Float16Array" in res.stderr, res.stderr
