"""convert, prune and ensemble killed mid-run (kill -9 at a shard write): a rerun of the same command continues
its own output and the result equals an uninterrupted run's, file for file; another command, or the same one
with other parameters, is refused on that output (the rule of :mod:`fkdstore.output`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from genkill import assert_same_objects
from storeutil import small_store

import fkdstore
from fkdstore import output
from fkdstore.errors import ValidationError

REPO = Path(__file__).resolve().parents[1]
N = 40

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import fkdstore
    from fkdstore import schema, writer

    schema.default_layout = lambda *a: (2, 8)  # outputs of 5 shards, as in the parent
    op, args, kill = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    seen = [0]

    def kill_at(step, shard):
        if step == "flags":
            seen[0] += 1
            if seen[0] == int(kill):
                os.kill(os.getpid(), signal.SIGKILL)

    writer._fault_point = kill_at
    getattr(fkdstore, op)(*args["args"], **args["kw"], progress=False)
""")

OPS = {
    "convert": lambda src, dst: ((str(src), str(dst), "mr"), {"k": 3}),
    "prune": lambda src, dst: ((str(src), str(dst)), {"keep": 0.5, "seed": 3}),
    "ensemble": lambda src, dst: (([str(src), str(src.parent / "twin.fkd")], str(dst)), {}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for name in ("src.fkd", "twin.fkd"):  # the same crops (ensemble needs them shared)
        small_store(root / name, n=N, m=4, c=12, ipc=2, ips=8)
    script = root / "child.py"
    script.write_text(CHILD)
    return root


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def five_shards(monkeypatch):
    """Outputs of 5 shards of 8 images (the default layout puts 40 images in one shard)."""
    from fkdstore import schema

    monkeypatch.setattr(schema, "default_layout", lambda *a: (2, 8))


@pytest.mark.parametrize("op", list(OPS))
def test_a_killed_run_is_continued_by_the_same_command(sources, tmp_path, op):
    src = sources / "src.fkd"
    args, kw = OPS[op](src, tmp_path / "ref.fkd")
    getattr(fkdstore, op)(*args, **kw, progress=False)  # uninterrupted
    dst = tmp_path / "out.fkd"
    args, kw = OPS[op](src, dst)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(sources / "child.py"), op, json.dumps({"args": args, "kw": kw}), "3"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    with fkdstore.open(dst) as r:
        assert 0 < int(r.written.sum()) < N  # killed half-way: an incomplete store of this command
        assert r.meta[output.MADE_BY]["op"] == op
    other = "prune" if op != "prune" else "convert"
    oargs, okw = OPS[other](src, dst)
    with pytest.raises(ValidationError, match=rf"exists and is not empty \(it was made by '{op}' with other"):
        getattr(fkdstore, other)(*oargs, **okw, progress=False)  # another command: refused
    if op != "ensemble":
        with pytest.raises(ValidationError, match="not empty"):  # the same command, other parameters: refused
            getattr(fkdstore, op)(*args, **{**kw, **({"k": 2} if op == "convert" else {"seed": 4})}, progress=False)
    getattr(fkdstore, op)(*args, **kw, progress=False)  # the same command: continued
    assert_same_objects(files(dst), files(tmp_path / "ref.fkd"))
    assert fkdstore.verify(dst) == []
    getattr(fkdstore, op)(*args, **kw, progress=False)  # once more on the complete output: nothing to do
    assert_same_objects(files(dst), files(tmp_path / "ref.fkd"))


def test_an_error_removes_the_output_and_a_foreign_destination_is_kept(sources, tmp_path, monkeypatch):
    src = sources / "src.fkd"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValidationError, match="not empty"):
        fkdstore.convert(src, foreign, "mr", k=3, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    dst = tmp_path / "out.fkd"

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fkdstore.Writer, "put_fields", broken)
    with pytest.raises(OSError, match="disk full"):
        fkdstore.convert(src, dst, "mr", k=3, progress=False)
    assert not dst.exists() or not any(dst.iterdir())


def test_an_interrupted_fkd_import_is_continued(tmp_path, monkeypatch):
    """import-fkd stopped after its first batch (Ctrl-C: what was put is written): the same import again
    continues it and equals an import run at once; another codec into that output is refused."""
    pytest.importorskip("torch")
    from test_convert import C, _fkd_tree

    from fkdstore.importers.fkd import import_fkd

    root, images, _ = _fkd_tree(tmp_path)
    calls = {"n": 0}
    put = fkdstore.Writer.put_fields

    def stops(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return put(self, *a, **kw)

    monkeypatch.setattr(fkdstore.Writer, "put_fields", stops)
    with pytest.raises(KeyboardInterrupt):
        import_fkd(root / "train", tmp_path / "out.fkd", images, num_classes=C, batch=2)
    monkeypatch.setattr(fkdstore.Writer, "put_fields", put)
    with fkdstore.open(tmp_path / "out.fkd") as r:
        assert r.written.sum() == 2 and r.meta[output.MADE_BY]["op"] == "import-fkd"
    with pytest.raises(ValidationError, match="not empty"):
        import_fkd(root / "train", tmp_path / "out.fkd", images, num_classes=C, codec="hard")
    import_fkd(root / "train", tmp_path / "out.fkd", images, num_classes=C, batch=2)
    import_fkd(root / "train", tmp_path / "ref.fkd", images, num_classes=C, batch=2)
    a, b = fkdstore.open(tmp_path / "out.fkd"), fkdstore.open(tmp_path / "ref.fkd")
    assert a.complete and a.header.store_id == b.header.store_id
    for x, y in zip(a.read_all().fields.values(), b.read_all().fields.values(), strict=True):
        assert (x == y).all()
