"""The fkdstore command line (exit codes, deprecated spellings, a torch-free start) and the inspect /
estimate reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fkdstore
from fkdstore import report
from fkdstore import schema as S
from fkdstore.cli import main
from fkdstore.report import storage_stats


def make_store(path, *, n=12, m=5, c=30, codec="ms", labels=True, meta=None, seed=0, write=None,
               ipc=None, ips=None, aug=None):
    """A small store of Dirichlet probabilities; ``write`` limits which images are put."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(40, 90, n), rng.integers(40, 90, n)], 1)
    top = rng.integers(0, sizes[:, None, 0] // 2, (n, m))
    left = rng.integers(0, sizes[:, None, 1] // 2, (n, m))
    boxes = np.stack([top, left, np.full((n, m), 17), np.full((n, m), 19)], -1)
    flips = rng.random((n, m)) < 0.5
    probs = rng.dirichlet(np.full(c, 0.2), (n, m)).astype(np.float32)
    lab = rng.integers(0, c, n) if labels else None
    a = rng.normal(size=(n, m, len(aug))).astype(np.float32) if aug else None
    idx = np.arange(n) if write is None else np.asarray(write)
    with fkdstore.write(path, num_images=n, crops_per_image=m, num_classes=c, codec=codec,
                        image_keys=[f"cls{i % 3}/img{i}.png" for i in range(n)], image_sizes=sizes, labels=lab,
                        meta=meta or {"teacher": {"name": "resnet-test", "temperature": 1.0},
                                      "sampler": {"scale": [0.08, 1.0], "seed": 3}},
                        images_per_chunk=ipc, images_per_shard=ips, aug=aug) as w:
        if len(idx):
            w.put(idx, boxes[idx], flips[idx], probs[idx], aug=None if a is None else a[idx])
    return dict(boxes=boxes, flips=flips, probs=probs, labels=lab, sizes=sizes, aug=a)


@pytest.fixture
def store(tmp_path):
    p = tmp_path / "s.fkd"
    data = make_store(p, ipc=4, ips=8)
    return p, data


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fkdstore {fkdstore.__version__}"


@pytest.mark.parametrize("cmd", ["inspect", "estimate", "verify", "convert", "import-fkd", "generate"])
def test_every_command_has_help_with_examples(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"fkdstore {cmd}" in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert main(["inspect"]) == 2  # missing PATH
    assert main(["estimate", "--num-images", "0", "--crops", "1", "--num-classes", "2", "--codec", "hard"]) == 2


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1  # exists, is not a store: the command failed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fkdstore: error: ") and "Traceback" not in err
    assert "not a Zarr v3 group" in err
    assert main(["inspect", str(tmp_path / "empty"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["estimate", "--num-images", "5", "--crops", "2", "--num-classes", "3", "--codec", "bogus"]) == 2
    assert "fkdstore estimate: error: --codec 'bogus': codec name must be one of" in capsys.readouterr().err


def test_inspect_text(store, capsys):
    p, _ = store
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    for needle in ("codec      ms", "12 / 12 images", "soft/indices", "resnet-test", "sampler",
                   "mean entropy", "ImageNet-1K (1,281,167 images x 5 crops", "13.3 GB"):
        assert needle in out, needle


def test_inspect_json_keys_and_values(store, capsys):
    p, data = store
    assert main(["inspect", str(p), "--json", "--sample", "40", "--seed", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    documented = ["path", "format", "format_version", "library_version", "codec", "num_images", "crops_per_image",
                  "num_classes", "aug", "has_labels", "images_per_chunk", "images_per_shard", "images_written",
                  "complete", "missing_ranges", "arrays", "total_bytes", "total_files", "bytes_per_crop",
                  "label_bytes_per_crop", "box_bytes_per_crop", "meta", "sampler", "teacher", "label_stats",
                  "imagenet_extrapolation"]
    assert set(documented) <= set(d)
    for key in documented:  # the module docstring and the CLI help document every key
        assert key in report.__doc__ and key in (main.__globals__["INSPECT_HELP"])
    assert d["codec"] == {"name": "ms", "k": 5, "dtype": "float16"}
    assert (d["num_images"], d["crops_per_image"], d["num_classes"]) == (12, 5, 30)
    assert d["complete"] and d["images_written"] == 12 and d["missing_ranges"] == []
    stats = storage_stats(p)
    assert d["total_bytes"] == stats["_total"]["bytes"] and d["total_files"] == stats["_total"]["files"]
    assert d["bytes_per_crop"] == pytest.approx(d["total_bytes"] / 60)
    assert {S.KEY, S.IMAGE_SIZE, S.LABEL, S.WRITTEN, S.MANIFEST} <= set(d["arrays"])  # format 2.0 arrays
    a = d["arrays"][S.soft_path("probs")]
    assert a["shape"] == [12, 5, 5] and a["dtype"] == "float16"
    assert a["chunks"] == [4, 5, 5] and a["shards"] == [8, 5, 5]
    assert a["raw_bytes"] == 12 * 5 * 5 * 2
    assert a["compression_ratio"] == pytest.approx(a["raw_bytes"] / a["stored_bytes"])
    assert a["files"] == 2
    # label statistics, checked against a direct computation on the same seeded sample
    ls = d["label_stats"]
    assert ls["sampled_crops"] == 40 and ls["seed"] == 1
    r = fkdstore.open(p)
    rng = np.random.default_rng(1)
    flat = np.sort(rng.choice(60, size=40, replace=False))
    probs = data["probs"][flat // 5, flat % 5]
    top5 = -np.sort(-probs, -1)[:, :5]
    assert ls["kept_mass_mean"] == pytest.approx(top5.astype(np.float16).astype(np.float64).sum(-1).mean(), abs=2e-3)
    dist = r.decode(r.codec.encode(probs))
    assert ls["entropy_mean_nats"] == pytest.approx(float(report._entropy(dist.astype(np.float64)).mean()), rel=1e-5)
    assert ls["top1_agreement"] == pytest.approx(float((probs.argmax(-1) == data["labels"][flat // 5]).mean()))
    assert ls["distinct_top1"] == len(np.unique(probs.argmax(-1)))
    e = d["imagenet_extrapolation"]
    assert e["num_images"] == 1_281_167 and e["paper_table2"] == "13.3 GB"
    assert e["paper_formula_bytes"] == 1_281_167 * 5 * 15 * 4


def test_inspect_incomplete_store(tmp_path, capsys):
    p = tmp_path / "part.fkd"
    make_store(p, n=12, write=[0, 1, 2, 3, 8, 9, 10, 11], ipc=4, ips=4, labels=False, codec="hard")
    assert main(["inspect", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images_written"] == 8 and not d["complete"] and d["missing_ranges"] == [[4, 8]]
    assert d["label_stats"]["kept_mass_mean"] is None and d["label_stats"]["top1_agreement"] is None
    assert main(["inspect", str(p)]) == 0
    assert "missing [4, 8)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- estimate
PAPER = {("full", None): 0.9 * 1024, ("hard", None): 5.3, ("smoothing", None): 6.2, ("mr", 5): 13.3,
         ("ms", 5): 13.3, ("ms", 10): 22.2}


@pytest.mark.parametrize("codec,k", list(PAPER))
def test_paper_formula_reproduces_table2(codec, k):
    gib = report.paper_bytes(1_200_000, 200, 1000, codec, k) / 2**30
    if codec == "full":
        assert round(gib / 1024, 1) == 0.9  # "~0.9 TB" (0.88 TiB)
    else:  # within 1.3% at exactly 1.2M images, always slightly above the printed "on disk" figure ...
        assert PAPER[codec, k] <= gib <= PAPER[codec, k] * 1.013
    # ... and digit for digit at 2.38e8 crops (1.19M x 200), see fkdstore.report's docstring.
    at = report.paper_bytes(1_190_000, 200, 1000, codec, k) / 2**30
    if codec == "full":
        assert round(at / 1024, 1) == 0.9
    else:
        assert round(at, 1) == PAPER[codec, k]
    assert report.paper_table2(codec, k) is not None


def test_estimate_cli_paper(capsys):
    base = ["estimate", "--num-images", "1200000", "--crops", "200", "--num-classes", "1000"]
    assert main(base + ["--codec", "hard", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "5.36 GiB" in out and "5.3 GB" in out and "(4 coords + 1 flip + 1 label values)" in out
    assert main(base + ["--codec", "ms", "--k", "10", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "22.35 GiB" in out and "22.2 GB" in out
    assert main(base + ["--codec", "full", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["paper_formula_bytes"] == 1_200_000 * 200 * 1005 * 4 and d["paper_table2"] == "~0.9 TB"
    assert main(base + ["--codec", "hard", "--k", "3"]) == 2  # k only for ms/mr: bad input


def test_estimate_matches_real_store(tmp_path):
    """The layout estimate is within 15% of a store written from teacher-like outputs (a fresh seed), for stored
    crops (``store_crops=True``) and for seeded crops (the default: no box/flip arrays)."""
    from fkdstore.seeded import SlotCropSampler

    N, M, C = 48, 64, 1000
    rng = np.random.default_rng(7)
    sizes = np.stack([rng.integers(300, 501, N), rng.integers(375, 501, N)], 1)
    sampler = SlotCropSampler(seed=7)
    bf = [sampler.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N)]
    labels = rng.integers(0, C, N)
    probs = report.teacher_like_probs(rng, N, M, C, labels)
    keys = [f"n{labels[i]:08d}/n{labels[i]:08d}_{i}.JPEG" for i in range(N)]
    for codec, k, seeded in (("ms", 5, False), ("smoothing", None, False), ("ms", 5, True)):
        p = tmp_path / f"{codec}{'_seeded' if seeded else ''}.fkd"
        with fkdstore.write(p, num_images=N, crops_per_image=M, num_classes=C,
                            codec=fkdstore.codecs.as_codec(codec, k=k), image_keys=keys, image_sizes=sizes,
                            labels=labels, crop_sampler=sampler if seeded else None) as w:
            w.put(np.arange(N), np.stack([b for b, _ in bf]), np.stack([f for _, f in bf]), probs)
        st = storage_stats(p)
        est = report.estimate_bytes(N, M, C, codec, k, store_crops=not seeded)
        arrays = fkdstore.open(p).per_crop_arrays
        assert (S.BOX in arrays) == (S.BOX in est["arrays"]) == (not seeded)
        for name in [n for n in arrays if n != S.FLIP]:  # flip: ~100 B here
            assert est["arrays"][name] == pytest.approx(st[name]["bytes"] + report.METADATA_BYTES, rel=0.15), name
        assert est["bytes"] == pytest.approx(st["_total"]["bytes"], rel=0.15)
        assert est["files"] == st["_total"]["files"]


def test_estimate_imagenet_scale_numbers():
    N = 1_281_167
    for store_crops, record_arrays in ((False, 2), (True, 4)):  # seeded crops (default): no box/flip files
        e = report.estimate_bytes(N, 200, 1000, "ms", 5, store_crops=store_crops)
        assert 15 < e["bytes_per_crop"] < 24  # the foundation issue's target: <= 24 B/crop for MS top-5
        # 2**20 slots per shard (a kill loses a bounded amount of teacher work): 313 shards per array at M = 200.
        # Format 4.0: every array (record arrays, the 4 per-image arrays, the manifest) has one file per shard
        # (+ its zarr.json), plus the root and soft/ groups: ~2-3k files, still ~450x fewer than one per image.
        assert e["images_per_shard"] == 4096
        assert e["files"] == (record_arrays + 4 + 1) * (313 + 1) + 2 and N / e["files"] > 450
        assert e["paper_formula_bytes"] / e["bytes"] > 2.5


def test_console_script_subprocess(store):
    p, _ = store
    exe = Path(sys.executable).with_name("fkdstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fkdstore.cli"]
    r = subprocess.run(cmd + ["verify", str(p)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    r = subprocess.run(cmd + ["inspect", str(p) + "-nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("fkdstore inspect: error: store ") and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("-nope' does not exist")


# ---------------------------------------------------------------------------------------------- conventions


def test_exit_code_convention(store, tmp_path, capsys):
    """0 success; 1 the command ran and failed or found problems; 2 usage or bad input on the command line."""
    p, _ = store
    assert main(["verify", str(p)]) == 0
    assert main(["estimate", "--num-images", "5", "--crops", "2", "--num-classes", "3", "--codec", "hard"]) == 0
    capsys.readouterr()
    # 1: ran and found problems (verify), or ran and failed (a library error)
    bad = tmp_path / "bad.fkd"
    make_store(bad, n=12, write=[0, 1, 2, 3], ipc=4, ips=4)
    assert main(["verify", str(bad)]) == 1
    assert main(["convert", str(p), str(tmp_path / "full.fkd"), "--codec", "full"]) == 1  # needs the teacher
    assert "fkdstore: error: " in capsys.readouterr().err
    # 2: usage or bad input, rejected before anything runs
    for argv in (["no-such-command"], ["inspect", str(p), "--sample", "-1"], ["inspect", str(p), "--bogus"],
                 ["convert", str(p), str(tmp_path / "x.fkd"), "--codec", "ms", "--k", "0"],
                 ["estimate", "--num-images", "five", "--crops", "2", "--num-classes", "3", "--codec", "hard"]):
        assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "--sample: value must be a non-negative integer. Got -1." in err
    assert "--k: value must be a positive integer. Got 0." in err
    assert "--num-images: value must be a positive integer. Got 'five' (str)." in err
    assert not (tmp_path / "x.fkd").exists()


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_imports_neither_the_runner_nor_the_teacher_code(store):
    """Only ``generate`` imports the teacher-runner; the other commands and --version never do."""
    p, _ = store
    res = _run_python("""
        import sys
        from fkdstore.cli import main
        assert main(["--version"]) == 0
        assert main(["inspect", sys.argv[1]]) == 0 and main(["verify", sys.argv[1]]) == 0
        loaded = sorted(m for m in ("fkdstore.runner", "fkdstore.teacher", "fkdstore.distributed",
                                    "fkdstore.pytorch") if m in sys.modules)
        assert not loaded, loaded
    """, str(p))
    assert res.returncode == 0, res.stderr


TORCH_BLOCKED = """
    import sys
    sys.modules["torch"] = None  # any "import torch" now raises ImportError, as if torch were not installed
    import numpy as np
    import fkdstore
    from fkdstore.cli import main
    r = fkdstore.open(sys.argv[1])
    rec = r.read(0)
    assert rec.boxes.shape == (5, 4) and r.decode(rec.fields).shape == (5, 30)
    assert np.allclose(r.soft_labels(0).sum(-1), 1, atol=1e-2)
    for argv in (["--version"], ["inspect", sys.argv[1]], ["verify", sys.argv[1]],
                 ["estimate", "--num-images", "10", "--crops", "2", "--num-classes", "30", "--codec", "ms"],
                 ["convert", sys.argv[1], sys.argv[1] + "-hard", "--codec", "hard"]):
        assert main(argv) == 0, argv
    try:
        fkdstore.generate
    except ImportError:
        pass
    else:
        raise AssertionError("fkdstore.generate needs torch")
"""


def test_core_works_without_torch(store):
    """``import fkdstore``, reading, decoding and the torch-free commands work when torch cannot be imported."""
    p, _ = store
    res = _run_python(TORCH_BLOCKED, str(p))
    assert res.returncode == 0, res.stderr


def test_version_and_inspect_do_not_import_torch(store):
    p, _ = store
    res = _run_python("""
        import sys
        from fkdstore.cli import main
        assert main(["--version"]) == 0 and main(["inspect", sys.argv[1]]) == 0
        assert "torch" not in sys.modules, "torch was imported"
    """, str(p))
    assert res.returncode == 0, res.stderr
