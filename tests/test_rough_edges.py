"""The rough edges a new user hits (issue 25), one test per message: progress by default (a bar on a terminal,
plain lines otherwise), exit codes per the README, messages that name what was typed, and a cheap
``fkdstore --version``."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import fkdstore
from fkdstore import progress as P
from fkdstore.cli import main
from fkdstore.errors import SchemaMismatchError, ValidationError
from fkdstore.images import list_images
from fkdstore.runner import generate
from fkdstore.testing import make_digits_folder, tiny_cnn

REPO = Path(__file__).resolve().parents[1]
FAST = dict(crops_per_image=2, codec="ms:k=3", input_size=16, images_per_shard=4, batch_size=8, num_workers=0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), size=24, per_class=1)  # 10 classes, 10 PNGs


@pytest.fixture(scope="module")
def store(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    generate(tiny_cnn(10), digits, out, progress=False, **FAST)
    return out


def run_py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, env=env, **kw)


# ------------------------------------------------------------------ progress
def test_generate_progress_is_plain_lines_off_a_terminal(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "LINE_INTERVAL_S", 0.0)  # a line per update instead of one per 30 s
    generate(tiny_cnn(10), digits, tmp_path / "p.zarr", **FAST)  # progress=None: auto
    err = capsys.readouterr().err  # pytest's stderr is not a terminal
    lines = [ln for ln in err.splitlines() if ln.startswith("labelling p.zarr: ")]
    assert len(lines) >= 2 and "\r" not in err  # periodic plain lines, no carriage-return bar
    assert re.fullmatch(r"labelling p\.zarr: \d+/10 img \([\d.]+ img/s, \d+ s, (running|done)\)", lines[0])
    assert lines[-1].endswith("done)") and "10/10 img" in lines[-1]
    assert err.splitlines()[-1].startswith("fkdstore generate: 10 images labelled (10/10 in store, complete)")
    monkeypatch.setattr(P, "LINE_INTERVAL_S", 3600.0)
    generate(tiny_cnn(10), digits, tmp_path / "q.zarr", **FAST)
    assert "labelling q.zarr:" not in capsys.readouterr().err  # a short run prints no progress line at all


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert P.progress(None, total=3, stream=Tty()).mode == "bar"
    assert P.progress(None, total=3, stream=io.StringIO()).mode == "lines"
    assert P.progress(False, total=3).mode == "off"
    out = io.StringIO()
    with P.progress(None, total=2, desc="verifying shards", unit="shard", stream=out, interval=0.0) as bar:
        bar.update(2)
    assert out.getvalue().startswith("verifying shards: 2/2 shard (")
    import inspect

    from fkdstore import conversion, verification

    for fn in (verification.verify, conversion.convert, conversion.prune, conversion.ensemble):
        assert inspect.signature(fn).parameters["progress"].default is None, fn  # auto, not opt-in
    from fkdstore.runner import Execution

    assert Execution().progress is None  # generate(progress=...) fills Execution


# ------------------------------------------------------------------ exit codes (README: 2 = bad usage or input)
@pytest.mark.parametrize("argv, message", [
    (["estimate", "--num-images", "5", "--crops", "2", "--num-classes", "3", "--codec", "msx"],
     "fkdstore estimate: error: --codec 'msx': codec name must be one of"),
    (["generate", "--images", "{digits}", "--teacher", "fkdstore.testing:tiny_cnn", "--out", "{tmp}/a", "--crops", "2",
      "--augment", "randaugment:magnitude=99"], "fkdstore generate: error: --augment 'randaugment:magnitude=99': "
                                              "magnitude must be an integer in [0, 30]. Got 99."),
    (["generate", "--images", "{tmp}/nope", "--teacher", "fkdstore.testing:tiny_cnn", "--out", "{tmp}/a", "--crops",
      "2"], "fkdstore generate: error: --images '{tmp}/nope' does not exist"),
    (["generate", "--images", "{digits}", "--teacher", "fkdstore.testing", "--out", "{tmp}/a", "--crops", "2"],
     "fkdstore generate: error: --teacher 'fkdstore.testing': teacher must be 'MODULE:FACTORY'"),
    (["generate", "--images", "{digits}", "--teacher", "fkdstore.testing:no_such", "--out", "{tmp}/a", "--crops", "2"],
     "fkdstore generate: error: --teacher 'fkdstore.testing:no_such': module 'fkdstore.testing' has no attribute"),
    (["generate", "--images", "{digits}", "--teacher", "fkdstore.testing:tiny_cnn", "--weights", "{tmp}/w.pt",
      "--out", "{tmp}/a", "--crops", "2"], "fkdstore generate: error: --weights '{tmp}/w.pt' does not exist"),
    (["verify", "{tmp}/nope.zarr"], "fkdstore verify: error: store '{tmp}/nope.zarr' does not exist"),
    (["convert", "{tmp}/nope.zarr", "{tmp}/b", "--codec", "hard"],
     "fkdstore convert: error: source store '{tmp}/nope.zarr' does not exist"),
    (["prune", "{tmp}/nope.zarr", "{tmp}/b", "--keep", "0.5"],
     "fkdstore prune: error: source store '{tmp}/nope.zarr' does not exist"),
])
def test_bad_input_exits_2_before_anything_runs(digits, tmp_path, capsys, argv, message):
    fill = {"digits": str(digits), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(**fill)) and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_generate_without_torch_points_to_the_extra(digits, tmp_path):
    res = run_py("""
        import sys
        sys.modules["torch"] = None  # import torch now fails, as on a machine without it
        from fkdstore.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out",
                 str(tmp_path / "a"), "--crops", "2")
    assert res.returncode == 1, res.stderr
    assert "fkdstore generate needs PyTorch" in res.stderr and "pip install 'fkdstore[torch]'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "a").exists()


# ------------------------------------------------------------------ messages that name what was typed
def test_missing_store_says_it_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"store .*nope\.zarr does not exist"):
        fkdstore.open(tmp_path / "nope.zarr")
    with pytest.raises(FileNotFoundError, match=r"store .*nope\.zarr does not exist"):
        fkdstore.TorchDataset(tmp_path / "nope.zarr", tmp_path)
    from fkdstore.verification import verify

    assert verify(tmp_path / "nope.zarr") == [f"cannot open store: store {tmp_path / 'nope.zarr'} does not exist"]
    (tmp_path / "empty").mkdir()  # exists, but is no store: the format error stays
    with pytest.raises(fkdstore.FormatError, match="not a Zarr v3 group"):
        fkdstore.open(tmp_path / "empty")


def test_codec_spec_error_names_what_was_typed(capsys):
    with pytest.raises(ValidationError) as e:
        fkdstore.as_codec("ms:K=2")
    assert str(e.value) == ("codec 'ms' parameters must be in ['k', 'dtype']. Got unknown ['K'] (parameter names are "
                            "lower case: 'k') in the codec spec 'ms:K=2'.")
    assert main(["estimate", "--num-images", "5", "--crops", "2", "--num-classes", "3", "--codec", "ms:K=2"]) == 2
    err = capsys.readouterr().err
    assert "--codec 'ms:K=2'" in err and "Got unknown ['K']" in err and "['k']" not in err.split("Got unknown")[1]


def test_comma_between_policies_hints_at_semicolon(digits, tmp_path, capsys):
    argv = ["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out", str(tmp_path / "a"),
            "--crops", "2", "--augment", "randaugment:num_ops=2,mixup:alpha=0.2"]
    assert main(argv) == 2
    assert ("separate policies with ';', not ',' (e.g. 'randaugment:num_ops=2;mixup:alpha=0.2')"
            in capsys.readouterr().err)


def test_out_pointing_at_a_file(digits, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out",
                 str(tmp_path / "f"), "--crops", "2"]) == 2
    assert (f"fkdstore generate: error: --out '{tmp_path / 'f'}' is a file; give a folder (new, empty, or a store "
            "to resume) or a URL") in capsys.readouterr().err
    with pytest.raises(ValidationError, match=r"path must be a folder \(new, empty, or a store to resume\) or a URL\. "
                                              r"Got '.*f', which is a file\."):
        generate(tiny_cnn(10), digits, tmp_path / "f", progress=False, **FAST)
    assert (tmp_path / "f").read_text() == "x"


def test_output_size_string_is_refused_whole(store, digits):
    with pytest.raises(TypeError, match=r"output_size must be an int or a \(height, width\) pair of ints\. "
                                        r"Got '32' \(str\)\."):
        fkdstore.TorchDataset(store, digits, output_size="32")


def test_import_fkd_points_to_num_classes(tmp_path, capsys):
    from test_convert import _fkd_tree

    root, images, _ = _fkd_tree(tmp_path, n_classes=2, per_class=1)
    assert main(["import-fkd", str(root), str(tmp_path / "imp.zarr"), "--images", str(images)]) == 0
    err = capsys.readouterr().err
    assert "pass --num-classes to set it" in err and "--classes" not in err.replace("--num-classes", "")
    assert main(["import-fkd", "--help"]) == 0
    assert "--classes" not in capsys.readouterr().out.replace("--num-classes", "")


def test_class_folder_mismatch_lists_folders_and_hidden_folders_are_not_classes(digits, tmp_path):
    with pytest.raises(ValidationError) as e:
        generate(tiny_cnn(6), digits, tmp_path / "w", progress=False, **FAST)
    assert ("the image folder must have at most as many class folders as the teacher has outputs: it has 10 "
            "('0', '1', '2', '3', '4', '5', '6', '7', ... (10 in all)), the teacher outputs 6 classes") in str(e.value)
    copy = tmp_path / "digits"
    shutil.copytree(digits, copy)
    hidden = copy / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(next((copy / "3").iterdir()), hidden / "x-checkpoint.png")
    (copy / "3" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    lst = list_images(copy)
    assert lst.classes == [str(c) for c in range(10)] and len(lst) == 10 and not any("/." in k for k in lst.keys)
    r = generate(tiny_cnn(10), copy, tmp_path / "ok.zarr", progress=False, **FAST)
    assert r.complete and r.meta["classes"] == lst.classes


def test_teacher_with_more_outputs_than_class_folders_is_refused(digits, tmp_path):
    with pytest.raises(ValidationError) as e:
        generate(tiny_cnn(12), digits, tmp_path / "w", progress=False, **FAST)
    assert str(e.value).startswith("the teacher outputs 12 classes but the image folder has 10 class folders ('0', ")
    assert "Pass num_classes=12 (--num-classes 12)" in str(e.value) and not (tmp_path / "w").exists()
    r = generate(tiny_cnn(12), digits, tmp_path / "w", num_classes=12, progress=False, **FAST)  # stated: accepted
    assert r.num_classes == 12 and r.complete


def test_teacher_mismatch_message_names_the_differing_fields(digits, store, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    with pytest.raises(SchemaMismatchError) as e:
        generate(tiny_cnn(10, seed=5), digits, out, progress=False, **FAST)  # same architecture, other weights
    msg = str(e.value)
    assert "was made with another meta['teacher'] than this run: state_sha256: '" in msg
    assert "(stored) -> '" in msg and "(this run)" in msg and "{'" not in msg  # no raw dicts
    assert "resume with the same teacher" in msg


def test_device_cuda_without_cuda_names_the_option(digits, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out",
                 str(tmp_path / "a"), "--crops", "2", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fkdstore generate: error: --device 'cuda': device 'cuda' needs CUDA, which this machine "
                          "does not have")
    with pytest.raises(ValidationError, match="device 'cuda:0' needs CUDA"):
        generate(tiny_cnn(10), digits, tmp_path / "b", device="cuda:0", progress=False, **FAST)


def test_sigint_says_how_many_images_are_written_and_that_a_rerun_resumes(digits, tmp_path):
    """Ctrl-C after the second shard is complete: 8 of 10 images written, exit 130, then the same command resumes."""
    out = tmp_path / "s.zarr"
    argv = ["generate", "--images", str(digits), "--teacher", "fkdstore.testing:tiny_cnn", "--out", str(out),
            "--crops", "2", "--codec", "ms:k=3", "--input-size", "16", "--images-per-shard", "4", "--batch-size", "8",
            "--num-workers", "0", "--device", "cpu", "--no-progress"]
    res = run_py("""
        import os, signal, sys
        from fkdstore import writer

        # as at a terminal: a test runner's process may have SIGINT ignored or blocked, and a child inherits both
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        seen = [0]
        def interrupt_after(step, shard):
            if step == "flags":
                seen[0] += 1
                if seen[0] == 2:
                    os.kill(os.getpid(), signal.SIGINT)

        writer._fault_point = interrupt_after
        from fkdstore.cli import main
        sys.exit(main(sys.argv[1:]))
    """, *argv)
    assert res.returncode == 130, res.stderr
    assert (f"fkdstore generate: interrupted; 8 of 10 images are written in {out} (whole shards only); rerun the same "
            "command to resume: written images are kept, the rest are labelled") in res.stderr
    assert main(argv) == 0 and fkdstore.open(out).complete


def test_reencoded_images_get_a_hint(store, digits, tmp_path):
    copy = tmp_path / "png"
    for p in digits.rglob("*.png"):
        q = copy / p.relative_to(digits).with_suffix(".jpg" if p.parent.name in "01234" else ".png")
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).save(q)
    with pytest.raises(FileNotFoundError) as e:
        fkdstore.TorchDataset(store, copy)
    msg = str(e.value)
    assert "(5 of the store's 10 images are missing)" in msg
    assert ("5 of them are here with another extension ('0/" in msg and ".png' in the store, '0/" in msg
            and ".jpg' here): the images were re-encoded or renamed" in msg)


# ------------------------------------------------------------------ help texts and --version
def test_inspect_help_lists_every_json_key(store, digits, tmp_path, capsys):
    seeded = tmp_path / "seeded.zarr"  # a seeded-crops store with a mixing policy: the keys of both kinds
    generate(tiny_cnn(10), digits, seeded, augment="mix", progress=False, **FAST)
    assert main(["inspect", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for path in (store, seeded):
        assert main(["inspect", str(path), "--json", "--sample", "64"]) == 0
        d = json.loads(capsys.readouterr().out)
        for key in d:
            assert re.search(rf"\b{re.escape(key)}\b", help_text), f"inspect --json key {key!r} is not in --help"
        for outer in ("label_stats", "imagenet_extrapolation"):
            for key in d[outer] or {}:
                assert key in help_text, f"inspect --json key {outer}.{key} is not in --help"
        for entry in d["arrays"].values():
            assert all(k in help_text for k in entry)


@pytest.mark.parametrize("cmd", ["inspect", "estimate", "verify", "convert", "import-fkd", "prune", "ensemble",
                                 "generate"])
def test_help_examples_use_zarr_and_no_rst_markup(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert ".fkd" not in out and (".zarr" in out or cmd == "estimate")
    assert "``" not in out and not re.search(r":(class|func|meth|mod|attr):`", out)


def test_version_imports_neither_zarr_nor_torch():
    res = run_py("""
        import sys
        from fkdstore.cli import main
        rc = main(["--version"])
        assert rc == 0, rc
        heavy = sorted(m for m in ("zarr", "torch", "numpy") if m in sys.modules)
        assert not heavy, heavy
        import fkdstore
        assert fkdstore.open and "zarr" in sys.modules  # names resolve on first use
    """, cwd=str(REPO))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"fkdstore {fkdstore.__version__}"
