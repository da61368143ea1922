"""Stores from an untrusted download cost bounded memory and time (spec section 1.5): each crafted store below
is opened, read and verified in a torch-free subprocess under an address-space limit (``RLIMIT_AS``) and a time
limit. Every failure is an :class:`~fkdstore.errors.FkdstoreError` naming the file or header key at fault (never
a raw ``MemoryError``, ``OverflowError``, ``RecursionError``, ``OSError``, ...), nothing blocks, and ``verify``
returns its problems instead of raising."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from faultutil import claim_images, set_header, shard_file, shard_index, write_shard_index, zstd_rle_frame
from storeutil import small_store

from fkdstore import schema as S

REPO = Path(__file__).resolve().parents[1]
N, M, C, IPC, IPS = 12, 5, 30, 4, 8
LIMIT_MB = 1024  # address space of the child (a read of a crafted store must stay far below)
TIME_S = 120.0  # wall time of the child at most (each operation is asserted below 5 s)

CHILD = textwrap.dedent("""
    import json, resource, signal, sys, time
    limit = int(sys.argv[2]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import fkdstore
    from fkdstore.errors import FkdstoreError
    from fkdstore.verification import verify

    def alarm(*_):
        raise TimeoutError("operation took too long (blocked?)")

    signal.signal(signal.SIGALRM, alarm)
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        out, readers = {}, []

        def run(op, fn):
            t = time.monotonic()
            signal.alarm(10)
            try:
                fn()
                got = None
            except FkdstoreError as e:
                got = [type(e).__name__, str(e)]
            except BaseException as e:  # what the test asserts never happens
                got = ["RAW " + type(e).__name__, str(e)[:400]]
            finally:
                signal.alarm(0)
            out[op] = {"error": got, "s": round(time.monotonic() - t, 3)}

        run("open", lambda: readers.append(fkdstore.open(path)))
        if readers:
            r = readers[0]
            run("read", lambda: r.read(0))
            run("read_batch", lambda: r.read_batch([0, 1]))
            run("soft_labels", lambda: r.soft_labels(1))
            r.close()
        problems = []
        run("verify", lambda: problems.extend(verify(path)))
        out["problems"] = problems
        results[name] = out
    # VmHWM: this process's peak resident memory (ru_maxrss would carry the forking parent's over exec)
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    results["maxrss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else 0.0
    print(json.dumps(results))
""")

REPLAY = {"input_size": [32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _loop(p: Path) -> None:
    p.unlink()
    other = p.with_name(p.name + "-loop")
    os.symlink(other.name, p)
    os.symlink(p.name, other)


def _dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _probs(p: Path) -> Path:
    return shard_file(p, S.soft_path("probs"))


def _index(p: Path, nbytes=None, offset=None) -> None:
    f = _probs(p)
    index = shard_index(f, IPS // IPC)
    if nbytes is not None:
        index[0, 1] = nbytes
    if offset is not None:
        index[0, 0] = offset
    write_shard_index(f, index)


def _nest(p: Path) -> None:
    text = json.dumps(json.loads(p.read_text()))
    p.write_text(text[:-1] + ', "x": ' + "[" * 200000 + "]" * 200000 + "}")


def _nan_array(p: Path) -> None:
    f = p / "written" / "zarr.json"
    f.write_text(f.read_text().replace('"fill_value": 0', '"fill_value": NaN'))


def _gzip(p: Path, name: str) -> None:
    """Declare a gzip pipeline for array ``name`` (Zarr would decompress it without a bound) and store a gzip
    bomb as its chunk 0 (1 GiB of zeros in a few MB would take too long to make here: 64 MiB)."""
    import gzip

    f = p / name / "zarr.json"
    doc = json.loads(f.read_text())
    gz = [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}}]
    if doc["codecs"][0]["name"] == "sharding_indexed":
        doc["codecs"][0]["configuration"]["codecs"] = gz
    else:
        doc["codecs"] = gz
        (p / name / "c" / "0").write_bytes(gzip.compress(bytes(64 * 2**20), 1))
    f.write_text(json.dumps(doc))


def _sparse(p: Path) -> None:
    with open(p / "zarr.json", "r+b") as f:
        f.truncate(8 * 2**30)  # 8 GiB claimed, nothing on disk


def _bomb(declare: bool):
    return lambda p: (p / "written" / "c" / "0").write_bytes(zstd_rle_frame(2**31, declare=declare))


# case -> (base store, damage)
CASES = {
    "fifo shard": ("base", lambda p: _fifo(_probs(p))),
    "directory shard": ("base", lambda p: _dir(_probs(p))),
    "symlink loop shard": ("base", lambda p: _loop(_probs(p))),
    "fifo zarr.json": ("base", lambda p: _fifo(p / "zarr.json")),
    "fifo written/zarr.json": ("base", lambda p: _fifo(p / "written" / "zarr.json")),
    "fifo key/c/0/0": ("base", lambda p: _fifo(p / "key" / "c" / "0" / "0")),
    "fifo manifest/c/0/0": ("base", lambda p: _fifo(p / "manifest" / "c" / "0" / "0")),
    "2**31 images": ("wide", lambda p: claim_images(p, 2**31 - 1)),
    "bomb declared": ("bomb", _bomb(True)),
    "bomb undeclared": ("bomb", _bomb(False)),
    "chunk over its stored size": ("base", _bomb(True)),
    "cap num_classes": ("replay", lambda p: set_header(p, checksum=True, num_classes=2**27)),
    "cap crops_per_image": ("replay", lambda p: set_header(p, checksum=True, **{"regions.crops_per_image": 2**31})),
    "cap input_size": ("replay", lambda p: set_header(p, checksum=True, **{"replay.input_size": [4096, 4096]})),
    "cap key_length": ("replay", lambda p: set_header(p, checksum=True, key_length=2**13)),
    "index nbytes 2**33": ("base", lambda p: _index(p, nbytes=2**33)),
    "index offset 2**63": ("base", lambda p: _index(p, offset=2**63)),
    "nested zarr.json": ("base", lambda p: _nest(p / "zarr.json")),
    "nested written/zarr.json": ("base", lambda p: _nest(p / "written" / "zarr.json")),
    "nan in meta": ("base", lambda p: set_header(p, meta={"teacher": float("nan")})),
    "nan in written/zarr.json": ("base", _nan_array),
    "sparse 8 GiB zarr.json": ("base", _sparse),
    "gzip written": ("base", lambda p: _gzip(p, "written")),
    "gzip soft/probs": ("base", lambda p: _gzip(p, "soft/probs")),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's store, then ONE child process (address space capped at LIMIT_MB) opening, reading and
    verifying each, every operation under a 10 s alarm."""
    root = tmp_path_factory.mktemp("hostile")
    bases = {"base": dict(ipc=IPC, ips=IPS), "wide": dict(ipc=1024, ips=2**20), "bomb": dict(ipc=1024, ips=2**17),
             "replay": dict(ipc=IPC, ips=IPS, replay=REPLAY)}
    for name, kw in bases.items():
        small_store(root / name, n=N, m=M, c=C, **kw)
    paths = {}
    for k, (case, (base, damage)) in enumerate(CASES.items()):
        p = paths[case] = root / f"case{k}"
        shutil.copytree(root / base, p)
        damage(p)
    script = root / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    res = subprocess.run([sys.executable, str(script), json.dumps({c: str(p) for c, p in paths.items()}),
                          str(LIMIT_MB)], env=env, capture_output=True, text=True, timeout=TIME_S)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    got["_paths"] = paths
    return got


def run_child(results, case: str) -> dict:
    """The results of ``case``: no raw exception, every operation fast; the whole child's memory bounded."""
    got = results[case]
    for op, v in got.items():
        if isinstance(v, dict):
            assert v["error"] is None or not v["error"][0].startswith("RAW"), (op, v)
            assert v["s"] < 5.0, (op, v)
    assert results["maxrss_mb"] < 400, results["maxrss_mb"]
    return got


def _names(got: dict, op: str, *parts: str) -> None:
    err = got[op]["error"]
    assert err is not None, (op, got)
    for part in parts:
        assert part in err[1], (op, part, err)


def _verify_names(got: dict, *parts: str) -> None:
    assert got["verify"]["error"] is None, got["verify"]
    assert any(all(p in x for p in parts) for x in got["problems"]), (parts, got["problems"])


@pytest.mark.parametrize("case, what", [("fifo shard", "a FIFO"), ("directory shard", "a directory"),
                                        ("symlink loop shard", "a symlink loop")])
def test_a_special_file_in_place_of_a_shard_file(results, case, what):
    got = run_child(results, case)
    assert got["open"]["error"] is None
    for op in ("read", "read_batch"):
        _names(got, op, "soft/probs/c/0/0/0", what)
    _verify_names(got, "soft/probs/c/0/0/0", what)


@pytest.mark.parametrize("where", ["zarr.json", "written/zarr.json", "key/c/0/0", "manifest/c/0/0"])
def test_a_fifo_in_place_of_metadata_or_a_per_image_chunk(results, where):
    got = run_child(results, f"fifo {where}")
    op = "open" if where.endswith("zarr.json") else "read"
    _names(got, op, where, "a FIFO")
    if where != "zarr.json":
        _verify_names(got, where, "a FIFO")
    else:
        assert got["problems"] and "a FIFO" in got["problems"][0]


def test_a_store_claiming_2_31_images_reads_one_shard(results):
    """A few tens of KB claiming N = 2**31 - 1 (2048 shards of 2**20 images): read(0) reads shard 0's chunks (the
    images really there), not 2**31 flags; verify lists the missing chunks from one listing per array."""
    assert sum(f.stat().st_size for f in results["_paths"]["2**31 images"].rglob("*") if f.is_file()) < 128 * 1024
    got = run_child(results, "2**31 images")
    for op in ("open", "read", "read_batch", "soft_labels"):
        assert got[op]["error"] is None, (op, got[op])
    _verify_names(got, "array 'written': 2047 of 2048 chunks are missing")
    _verify_names(got, "store incomplete: 2147483635 of 2147483647 images not written")


@pytest.mark.parametrize("declare", [True, False])
def test_a_zstd_bomb_in_place_of_a_per_image_chunk(results, declare):
    """A 64 KB ``written`` chunk whose zstd frame decodes to 2 GiB (shards of 2**17 images, so 64 KB is a
    plausible stored size): refused before decompressing (the size its frame declares is compared with the
    chunk's shape) or when the decoded bytes overflow the chunk's shape (no size declared)."""
    got = run_child(results, "bomb declared" if declare else "bomb undeclared")
    why = "its zstd frame declares 2147483648 decoded bytes" if declare else "cannot decode"
    _names(got, "read", "array 'written' chunk 0 (written/c/0)", why)
    _verify_names(got, "written/c/0", why)


def test_a_chunk_larger_than_its_shape_allows_is_not_read(results):
    got = run_child(results, "chunk over its stored size")  # 64 KB for 8 flags
    _names(got, "read", "written/c/0", "more than")
    _verify_names(got, "written/c/0", "more than")


@pytest.mark.parametrize("named", ["num_classes", "crops_per_image", "input_size", "key_length"])
def test_a_header_over_a_cap_is_refused_at_open(results, named):
    got = run_child(results, f"cap {named}")
    _names(got, "open", named)
    assert got["problems"] and named in got["problems"][0]


@pytest.mark.parametrize("case, named", [("index nbytes 2**33", "8589934592 bytes at offset"),
                                         ("index offset 2**63", "at offset 9223372036854775808")])
def test_an_absurd_shard_index_entry(results, case, named):
    got = run_child(results, case)
    _names(got, "read", "soft/probs/c/0/0/0", named)
    _verify_names(got, "soft/probs/c/0/0/0", named)


@pytest.mark.parametrize("where", ["zarr.json", "written/zarr.json"])
def test_deeply_nested_json(results, where):
    got = run_child(results, f"nested {where}")
    _names(got, "open", where, "RecursionError")
    assert got["problems"]


def test_nan_in_the_header_meta_and_in_an_array_json(results):
    """NaN is not standard JSON (spec 1.1): in the unchecksummed ``meta`` (provenance only) the store still
    reads and verify lists it; in an array's zarr.json it is damage named by the array, or ignored where the
    reader never needs the value."""
    got = run_child(results, "nan in meta")
    assert got["open"]["error"] is None and got["read"]["error"] is None
    _verify_names(got, "header meta must be standard JSON")
    got = run_child(results, "nan in written/zarr.json")
    for op in ("open", "read"):
        assert got[op]["error"] is None or "written" in got[op]["error"][1], got
    assert got["verify"]["error"] is None


@pytest.mark.parametrize("name", ["written", "soft/probs"])
def test_a_pipeline_other_than_the_specs_is_refused_at_open(results, name):
    """zarr.json is not checksummed: a crafted one declaring another pipeline (here gzip, whose decompression
    Zarr would not bound) is refused at open, naming the array."""
    got = run_child(results, f"gzip {name}")
    _names(got, "open", f"array {name!r}: the codec pipeline", "not the one spec section 3 gives")
    _verify_names(got, name, "not the one spec section 3 gives")


def test_a_huge_sparse_zarr_json_is_refused_unread(results):
    got = run_child(results, "sparse 8 GiB zarr.json")
    _names(got, "open", "zarr.json", "more than")
