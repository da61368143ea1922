"""Teacher runner (fkdstore.generate, with fkdstore.teacher and fkdstore.distributed): end to end on real
photographs and digits with a small CNN teacher, determinism, kill -9 and resume, two processes under
torchrun, bad input, and the ``generate`` command line."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import fkdstore
from fkdstore import schema as S
from fkdstore.cli import GENERATE_OPTIONS, SAMPLER_OPTIONS, build_parser, generate_options, main
from fkdstore.distributed import World
from fkdstore.errors import FormatError, SchemaMismatchError, ValidationError
from fkdstore.images import ImageReadError, image_size, load_image
from fkdstore.labelmap import LabelMapSpec
from fkdstore.runner import Execution, LabelSpec, Provenance, generate
from fkdstore.seeded import SlotCropSampler
from fkdstore.teacher import file_sha256, load_teacher, state_sha256, to_channels_last
from fkdstore.testing import make_digits_folder, make_photo_folder, tiny_cnn
from fkdstore.transforms import Replay, normalize, replay_crops

REPO = Path(__file__).resolve().parents[1]
FAST = dict(crops_per_image=4, codec="ms", input_size=32, images_per_shard=4, batch_size=8, num_workers=0,
            progress=False)
PHOTOS = dict(FAST, num_classes=10)  # a 10-class teacher on the 2 photo folders: the width is stated


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), tiles=4, size=96)  # 8 real JPEG tiles


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), size=32, per_class=2)  # 20 PNGs


def arrays(path) -> dict[str, np.ndarray]:
    """Every stored array, and for seeded crops the derived box and flip (a complete store)."""
    r = fkdstore.open(path)
    names = list(r.header.per_image_arrays) + list(r.header.stored_specs())
    out = {n: r.array(n)[:] for n in names}
    if r.header.seeded:
        rec = r.read_all()
        out[S.BOX], out[S.FLIP] = rec.box, rec.flip
    return out


def assert_same_arrays(a, b):
    a, b = arrays(a), arrays(b)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]), n


def file_state(path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- end to end


def test_end_to_end_photos_matches_teacher_on_replayed_crops(photos, tmp_path):
    teacher = tiny_cnn(10)
    out = tmp_path / "photos.fkd"
    r = generate(teacher, photos, out, temperature=2.0, teacher_name="tiny", weights_sha256="abc", **PHOTOS)
    assert r.complete and len(r) == 8 and r.num_classes == 10
    keys = r.image_keys
    assert keys[0].startswith("china/") and keys[-1].startswith("flower/")
    assert r.labels.tolist() == [0] * 4 + [1] * 4
    assert [tuple(s) for s in r.image_sizes] == [image_size(photos / k) for k in keys]
    m = r.meta
    assert m["generator"] == "fkdstore.generate"
    assert m["teacher"]["name"] == "tiny" and m["teacher"]["weights_sha256"] == "abc"
    assert m["teacher"]["state_sha256"] == state_sha256(teacher)
    assert m["temperature"] == 2.0
    # the replay parameters are in the checksummed header, not in meta
    assert r.header.replay == Replay(input_size=(32, 32), interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225))
    assert not {"input_size", "interpolation", "mean", "std"} & set(m)
    # seeded crops by default: the sampler is in the header, box and flip are not stored
    assert r.header.seeded and r.header.sampler == SlotCropSampler(seed=0) and "sampler" not in m
    assert S.BOX not in r.record_arrays and S.FLIP not in r.record_arrays
    assert m["classes"] == ["china", "flower"] and m["skipped"] == []
    assert m["time_taken_s"] > 0 and m["history"][-1]["images_labelled"] == 8
    assert r.header.library_version == fkdstore.__version__

    sampler = SlotCropSampler(seed=0)
    codec = fkdstore.get_codec("ms")
    teacher.eval()
    for i, k in enumerate(keys):
        rec = r.read(i)
        H, W = image_size(photos / k)
        boxes, flips = sampler.sample(i, H, W, 4)
        assert np.array_equal(rec.boxes, boxes) and np.array_equal(rec.flips, flips)
        with torch.inference_mode():
            x = normalize(replay_crops(load_image(photos / k), rec.boxes.astype(np.int64), rec.flips, 32))
            p = torch.softmax(teacher(x) / 2.0, -1)
        want = codec.encode(p.numpy())
        assert np.array_equal(rec.fields["indices"], want["indices"])
        np.testing.assert_allclose(rec.fields["probs"].astype(np.float32), want["probs"].astype(np.float32), atol=1e-3)

    # store_crops=True: the same crops and labels, box and flip stored, the sampler recorded in meta
    s = generate(teacher, photos, tmp_path / "stored.fkd", temperature=2.0, teacher_name="tiny", weights_sha256="abc",
                 store_crops=True, **PHOTOS)
    assert s.complete and not s.header.seeded and s.header.sampler is None
    assert S.BOX in s.record_arrays and S.FLIP in s.record_arrays
    assert s.meta["sampler"] == sampler.get_config()
    a, b = r.read_all(), s.read_all()
    for x, y in ((a.box, b.box), (a.flip, b.flip), *((a.fields[f], b.fields[f]) for f in a.fields)):
        assert np.array_equal(x, y)


def test_determinism_workers_and_rerun(digits, tmp_path):
    a = generate(tiny_cnn(10), digits, tmp_path / "a", **FAST)
    b = generate(tiny_cnn(10), digits, tmp_path / "b", **{**FAST, "num_workers": 2})
    assert a.complete and b.complete and len(a) == 20
    assert a.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert_same_arrays(tmp_path / "a", tmp_path / "b")
    # Rerunning a finished store labels nothing and changes nothing but the volatile meta.
    before = {k: v for k, v in file_state(tmp_path / "a").items() if k != "zarr.json"}
    c = generate(tiny_cnn(10), digits, tmp_path / "a", **FAST)
    assert c.meta["history"][-1]["images_labelled"] == 0 and len(c.meta["history"]) == 2
    assert {k: v for k, v in file_state(tmp_path / "a").items() if k != "zarr.json"} == before


def test_file_list_input_and_hard_codec(photos, tmp_path):
    files = sorted(str(p) for p in photos.rglob("*.jpg"))[:3]
    r = generate(tiny_cnn(10), files, tmp_path / "l", **{**FAST, "codec": "hard"})
    assert r.complete and r.image_keys == files and (r.labels == -1).all()
    assert r.read(0).fields["indices"].shape == (4,)


# --------------------------------------------------------------------------------------------- resume

SLOW_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from fkdstore.testing import tiny_cnn
    from fkdstore.runner import generate

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = tiny_cnn(10)
        def forward(self, x):
            time.sleep(float(sys.argv[3]))
            return self.m(x)

    generate(Slow(), sys.argv[1], sys.argv[2], crops_per_image=4, codec="ms", input_size=32,
             images_per_shard=4, batch_size=8, num_workers=0, progress=False)
""")


@pytest.mark.slow
def test_kill_9_and_resume_equals_uninterrupted_run(digits, tmp_path):
    script = tmp_path / "slow_generate.py"
    script.write_text(SLOW_SCRIPT)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(digits), str(out), "0.2"], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until at least one shard (4 images) is on disk
            try:
                if fkdstore.open(out).written.sum() >= 4:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        else:
            pytest.fail("no shard was written within 60 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = int(fkdstore.open(out).written.sum())
    assert 4 <= done < 20 and done % 4 == 0  # whole shards only
    assert not fkdstore.open(out).complete

    subprocess.run([sys.executable, str(script), str(digits), str(out), "0"], env=env, check=True)
    r = fkdstore.open(out)
    assert r.complete
    assert r.meta["history"][-1]["images_labelled"] == 20 - done  # written images were not recomputed
    ref = generate(tiny_cnn(10), digits, tmp_path / "ref", **PHOTOS)  # same weights, no sleep, no kill
    assert ref.complete
    assert_same_arrays(out, tmp_path / "ref")


def test_interrupted_creation_is_cleared_and_recreated(digits, tmp_path):
    """The rule itself (what counts as an interrupted creation, never a foreign group) is tested in
    test_writer.py; here generate reruns over a creation killed before the header was written."""
    out = tmp_path / "half"
    g = zarr.open_group(str(out), mode="w", attributes={S.CREATING_KEY: {"started": 0}})  # as a killed writer
    g.create_array(S.KEY, shape=(3, 4), dtype="uint8")
    assert generate(tiny_cnn(10), digits, out, **FAST).complete


# --------------------------------------------------------------------------------------------- processes

DIST_SCRIPT = textwrap.dedent("""
    import sys, torch.distributed as dist
    from fkdstore.testing import tiny_cnn
    from fkdstore.runner import generate
    from fkdstore.distributed import World
    init = sys.argv[3] == "init"
    if init:
        dist.init_process_group("gloo")
    r = generate(tiny_cnn(10), sys.argv[1], sys.argv[2], crops_per_image=4, codec="ms", input_size=32,
                 images_per_shard=4, batch_size=8, num_workers=0, progress=False)
    assert r.complete
    if init:
        assert World.detect().world_size == 2
        dist.destroy_process_group()
    else:
        assert not dist.is_initialized()  # the group generate() created is gone again
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["init", "env"])
def test_two_processes_equal_one_process(digits, tmp_path, mode):
    script = tmp_path / "dist_generate.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(script), str(digits), str(out), mode]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr
    r = fkdstore.open(out)
    assert r.complete
    run = r.meta["history"][-1]
    assert run["world_size"] == 2 and run["images_labelled"] == 20
    assert run["images_per_rank"] == [12, 8]  # 5 shards of 4 images: rank 0 takes shards 0, 2, 4
    ref = generate(tiny_cnn(10), digits, tmp_path / "one", **FAST)
    assert_same_arrays(out, tmp_path / "one")
    meta2 = {k: v for k, v in r.meta.items() if k not in S.VOLATILE_META}
    meta1 = {k: v for k, v in ref.meta.items() if k not in S.VOLATILE_META}
    assert meta2 == meta1


def test_world_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.detect() == World(0, 1, 0) and World.detect().is_leader
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = World.detect()
    assert (w.rank, w.world_size, w.local_rank) == (1, 3, 1) and not w.is_leader
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValidationError, match="0 <= RANK < WORLD_SIZE. Got RANK=3, WORLD_SIZE=3."):
        World.detect()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValidationError, match="RANK must be an integer. Got 'x'."):
        World.detect()


# --------------------------------------------------------------------------------------------- errors


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValidationError, match="no images found"):
        generate(tiny_cnn(10), tmp_path / "empty", tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_teacher_width_mismatch_writes_nothing(digits, tmp_path):
    with pytest.raises(ValidationError, match="outputs 10 classes but num_classes=7"):
        generate(tiny_cnn(10), digits, tmp_path / "w", num_classes=7, **FAST)
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValidationError, match=r"it has 10 \('0', '1', .*\), the teacher outputs 6 classes"):
        generate(tiny_cnn(6), digits, tmp_path / "w", **FAST)
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValidationError, match="logits"):
        generate(torch.nn.Flatten(0), digits, tmp_path / "w", **FAST)  # returns a 1-D tensor
    assert not (tmp_path / "w").exists()


def test_existing_store_with_other_parameters_is_not_touched(photos, tmp_path):
    out = tmp_path / "s"
    generate(tiny_cnn(10), photos, out, **PHOTOS)
    before = file_state(out)
    for kwargs, match in [
        ({"crop_sampler": SlotCropSampler(seed=1)}, "sampler"),
        ({"store_crops": True}, "stored"),
        ({"crops_per_image": 5}, "crops_per_image"),
        ({"codec": "mr"}, "codec"),
        ({"temperature": 3.0}, "temperature"),
    ]:
        with pytest.raises(SchemaMismatchError, match=match):
            generate(tiny_cnn(10), photos, out, **{**PHOTOS, **kwargs})
    with pytest.raises(SchemaMismatchError, match="num_classes"):  # a teacher of another width
        generate(tiny_cnn(12), photos, out, **{**PHOTOS, "num_classes": 12})
    with pytest.raises(SchemaMismatchError, match="state_sha256"):  # same architecture, other weights
        generate(tiny_cnn(10, seed=1), photos, out, **PHOTOS)
    assert file_state(out) == before
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValidationError, match="refusing to overwrite"):
        generate(tiny_cnn(10), photos, other, **PHOTOS)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.fixture
def broken_photos(photos, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(photos, root)
    victim = root / "china" / "china_1.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated: header readable, pixels not
    return root, victim, data


def test_truncated_image_stop_names_the_path(broken_photos, tmp_path):
    root, victim, _ = broken_photos
    with pytest.raises(ImageReadError, match="china_1.jpg"):
        generate(tiny_cnn(10), root, tmp_path / "stop", **PHOTOS)
    r = fkdstore.open(tmp_path / "stop")  # shards before the bad image may be written; never complete
    assert not r.complete and not r.written[1]


def test_truncated_image_skip_then_fix_and_resume(broken_photos, photos, tmp_path):
    root, victim, data = broken_photos
    out = tmp_path / "skip"
    with pytest.warns(UserWarning, match="china_1.jpg"):
        r = generate(tiny_cnn(10), root, out, on_error="skip", **PHOTOS)
    assert r.meta["skipped"] == ["china/china_1.jpg"]
    assert not r.complete and r.written.tolist() == [True, False] + [True] * 6
    with pytest.raises(fkdstore.IncompleteStoreError, match="china_1.jpg"):
        r.read(1)
    victim.write_bytes(data)  # the file is repaired: a rerun labels only that image
    r = generate(tiny_cnn(10), root, out, on_error="skip", **PHOTOS)
    assert r.complete and r.meta["skipped"] == [] and r.meta["history"][-1]["images_labelled"] == 1
    generate(tiny_cnn(10), photos, tmp_path / "ref", **PHOTOS)
    assert_same_arrays(out, tmp_path / "ref")


def test_unreadable_header_skip(photos, tmp_path):
    root = tmp_path / "garbage"
    shutil.copytree(photos, root)
    (root / "flower" / "zz.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageReadError, match="zz.jpg"):
        generate(tiny_cnn(10), root, tmp_path / "g0", **PHOTOS)
    assert not (tmp_path / "g0").exists()  # header scan fails before the store is created
    with pytest.warns(UserWarning, match="zz.jpg"):
        r = generate(tiny_cnn(10), root, tmp_path / "g", on_error="skip", **PHOTOS)
    assert r.meta["skipped"] == ["flower/zz.jpg"] and int((~r.written).sum()) == 1


def test_bad_arguments(digits, tmp_path):
    for kwargs, match in [
        ({"on_error": "ignore"}, r"on_error must be one of \['stop', 'skip'\]. Got 'ignore'."),
        ({"temperature": 0}, "temperature must be a finite number > 0. Got 0."),
        ({"crops_per_image": 0}, "crops_per_image must be a positive integer. Got 0."),
        ({"interpolation": "x"}, "interpolation must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer. Got 0."),
        ({"num_workers": -1}, "num_workers must be a non-negative integer. Got -1."),
        ({"input_size": 0}, r"input_size height must be an integer in \[1, 1024\]. Got 0."),
        ({"input_size": 1025}, r"input_size height must be an integer in \[1, 1024\]. Got 1025."),
        ({"num_classes": 0}, "num_classes must be a positive integer. Got 0."),
        ({"std": (1.0, 0.0, 1.0)}, "std must be 3 numbers > 0"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers. Got"),  # a pair: a bad value, not a bad type
    ]:
        with pytest.raises(ValidationError, match=match):
            generate(tiny_cnn(10), digits, tmp_path / "x", **{**FAST, **kwargs})
    # wrong types are TypeError (the library-wide convention), with the same message style
    for kwargs, match in [
        ({"crops_per_image": "4"}, r"crops_per_image must be a positive integer. Got '4' \(str\)."),
        ({"batch_size": True}, r"batch_size must be a positive integer. Got True \(bool\)."),
        ({"num_workers": 1.0}, "num_workers must be a non-negative integer"),
        ({"temperature": "2"}, r"temperature must be a finite number > 0. Got '2' \(str\)."),
        ({"mean": "rgb"}, "mean must be a sequence of 3 numbers. Got 'rgb'."),
        ({"crop_sampler": {"seed": 1}}, "crop_sampler must be a SlotCropSampler. Got dict."),
        ({"seed": 1}, r"generate\(\) got unknown options \['seed'\]"),  # 0.2's keywords: crop_sampler=
        ({"seeded_crops": True}, r"unknown options \['seeded_crops'\]"),  # seeded is the default; store_crops=
    ]:
        with pytest.raises(TypeError, match=match):
            generate(tiny_cnn(10), digits, tmp_path / "x", **{**FAST, **kwargs})
    with pytest.raises(ValidationError, match="scale"):  # the sampler checks its own fields
        SlotCropSampler(scale=(0.5, 0.1))
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module. Got function."):
        generate(lambda x: x, digits, tmp_path / "x", **FAST)
    assert not (tmp_path / "x").exists()


def test_load_teacher_errors(tmp_path):
    with pytest.raises(ValidationError, match="teacher must be 'MODULE:FACTORY'"):
        load_teacher("fkdstore.testing.tiny_cnn")
    with pytest.raises(ValidationError, match="cannot import teacher module 'no_such_mod'"):
        load_teacher("no_such_mod:f")
    with pytest.raises(ValidationError, match="has no attribute 'nope'"):
        load_teacher("fkdstore.testing:nope")
    torch.save({"model": {"module.x": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValidationError, match="unexpected keys \\['x'\\]"):  # wrapper and DDP prefix removed
        load_teacher("fkdstore.testing:tiny_cnn", tmp_path / "bad.pt", {"num_classes": 10})
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValidationError, match="must hold a state dict. Got list."):
        load_teacher("fkdstore.testing:tiny_cnn", tmp_path / "list.pt")


def test_to_channels_last_converts_in_place_and_keeps_the_outputs():
    model = tiny_cnn(10, seed=1).eval()
    x = torch.rand(2, 3, 16, 16)
    want = model(x)
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and not any(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert to_channels_last(model) is model
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)
    torch.testing.assert_close(model(x), want)


def test_label_spec_M_is_the_crop_count_and_refused_for_label_maps():
    assert LabelSpec(crops_per_image=3, codec="full").M == 3
    with pytest.raises(FormatError, match="store holds 'label_map' records"):
        _ = LabelSpec(label_map=LabelMapSpec(size=3, k=2, box_order="xy")).M


# --------------------------------------------------------------------------------------------- CLI


def test_cli_generate_with_weights(photos, tmp_path, capsys):
    model = tiny_cnn(10, seed=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    out = tmp_path / "cli.fkd"
    argv = ["generate", "--images", str(photos), "--teacher", "fkdstore.testing:tiny_cnn",
            "--teacher-kwargs", '{"num_classes": 10}', "--weights", str(tmp_path / "w.pt"), "--out", str(out),
            "--crops", "4", "--codec", "ms", "--k", "3", "--input-size", "32", "--images-per-shard", "4",
            "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--num-classes", "10", "--no-progress"]
    assert main(argv) == 0
    r = fkdstore.open(out)
    assert r.complete and r.codec == fkdstore.get_codec("ms", k=3)
    assert r.meta["teacher"]["weights_sha256"] == file_sha256(tmp_path / "w.pt")
    assert r.meta["teacher"]["name"] == 'fkdstore.testing:tiny_cnn({"num_classes": 10})'
    assert r.meta["teacher"]["state_sha256"] == state_sha256(model)
    generate(model, photos, tmp_path / "api", **{**PHOTOS, "codec": fkdstore.get_codec("ms", k=3)})
    assert_same_arrays(out, tmp_path / "api")

    # Failures after parsing exit 1 with a one-line message, not a traceback.
    capsys.readouterr()
    assert main([*argv[:-1], "--seed", "5"]) == 1  # the store exists with another sampler
    err = capsys.readouterr().err
    assert err.startswith("fkdstore: error: ") and "sampler" in err and "Traceback" not in err
    assert main(["generate", "--images", str(photos), "--teacher", "no_such_mod:f", "--out", str(tmp_path / "z"),
                 "--crops", "2"]) == 2  # a bad --teacher is bad input: exit 2, before anything runs
    assert "--teacher 'no_such_mod:f': cannot import teacher module 'no_such_mod'" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()

    # --codec takes a spec string too (one parser: fkdstore.as_codec); --dtype overrides the spec's dtype
    spec_out = tmp_path / "spec.fkd"
    spec_argv = [a if a != str(out) else str(spec_out) for a in argv if a not in ("--k", "3")]
    spec_argv[spec_argv.index("ms")] = "ms:k=2,dtype=q8"
    assert main(spec_argv) == 0
    assert fkdstore.open(spec_out).codec == fkdstore.as_codec("ms:k=2,dtype=q8")


def test_cli_generate_exit_codes(broken_photos, tmp_path, capsys):
    root, _, _ = broken_photos
    base = ["generate", "--images", str(root), "--teacher", "fkdstore.testing:tiny_cnn", "--crops", "4",
            "--input-size", "32", "--images-per-shard", "4", "--batch-size", "8", "--num-workers", "0",
            "--device", "cpu", "--num-classes", "10", "--no-progress"]
    # 2: usage or bad input on the command line; nothing runs, nothing is written
    for extra, needle in [
        (["--teacher-kwargs", "[1]"], "--teacher-kwargs: must be a JSON object. Got '[1]'."),
        (["--teacher-kwargs", "{x"], "--teacher-kwargs: must be a JSON object"),
        (["--on-error", "ignore"], "--on-error: must be one of ['skip', 'stop']. Got 'ignore'."),
        (["--interpolation", "cubic"], "--interpolation: must be one of"),
        (["--batch-size", "0"], "--batch-size: value must be a positive integer. Got 0."),
        (["--num-workers", "-1"], "--num-workers: value must be a non-negative integer. Got -1."),
        (["--num-classes", "ten"], "--num-classes: value must be a positive integer. Got 'ten' (str)."),
        (["--no-such-option"], "unrecognized arguments"),
    ]:
        assert main([*base, "--out", str(tmp_path / "u"), *extra]) == 2, extra
        assert needle in capsys.readouterr().err, extra
    assert main(["generate", "--images", str(root), "--out", str(tmp_path / "u")]) == 2  # --teacher, --crops
    assert "required" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()
    # 1: ran, and the store is incomplete (a skipped image)
    with pytest.warns(UserWarning, match="china_1.jpg"):
        assert main([*base, "--out", str(tmp_path / "s"), "--on-error", "skip"]) == 1
    assert "is incomplete: 1 images missing (skipped: 1)" in capsys.readouterr().err
    # 1: a library error (an unreadable image with --on-error stop)
    assert main([*base, "--out", str(tmp_path / "t")]) == 1
    assert "fkdstore: error: " in capsys.readouterr().err


def test_cli_generate_options_map_to_the_api(capsys):
    configs = (LabelSpec, Replay, Execution, Provenance)
    fields = {f.name: f for cls in configs for f in dataclasses.fields(cls)}
    # every option of generate() has a command-line option (crop_sampler: built from the sampler's fields;
    # label_map: from --label-map and the --map-* / replay options), and no option is stray
    assert set(GENERATE_OPTIONS) == set(fields) - {"crops_per_image", "codec", "crop_sampler", "label_map"} | \
        {"crops_from", "storage_options"}
    assert set(SAMPLER_OPTIONS) == {f.name for f in dataclasses.fields(SlotCropSampler)}
    parser, _ = build_parser()
    required = ["generate", "--images", "d", "--teacher", "m:f", "--out", "o", "--crops", "2"]
    assert generate_options(parser.parse_args(required)) == {}  # left out: the library's defaults apply
    given = parser.parse_args([
        *required, "--input-size", "32", "--batch-size", "8", "--seed", "3", "--scale", "0.2", "0.9",
        "--ratio", "0.5", "2", "--flip-p", "0", "--temperature", "2", "--mean", "0", "0", "0", "--std", "1", "1", "1",
        "--interpolation", "bicubic", "--device", "cpu", "--num-workers", "0", "--on-error", "skip",
        "--images-per-shard", "4", "--num-classes", "10", "--no-amp", "--no-progress", "--teacher-name", "t",
        "--weights-sha256", "ab", "--store-crops"])
    assert generate_options(given) == dict(
        input_size=32, batch_size=8,
        crop_sampler=SlotCropSampler(seed=3, scale=(0.2, 0.9), ratio=(0.5, 2.0), flip_p=0.0), temperature=2.0,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic", device="cpu",
        num_workers=0, on_error="skip", images_per_shard=4, num_classes=10, amp=False, progress=False,
        teacher_name="t", weights_sha256="ab", store_crops=True)
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--input-size" in text and "--on-error" in text and "torchrun" in text
    defaults = {**{n: f.default for n, f in fields.items()},
                **{f.name: f.default for f in dataclasses.fields(SlotCropSampler)}}
    for name in ("input_size", "batch_size", "flip_p", "interpolation", "on_error"):  # defaults shown from the API
        assert f"(default: {defaults[name]!r})" in " ".join(text.split()), name


def test_cli_generate_num_classes_option():
    parser, _ = build_parser()
    args = parser.parse_args(["generate", "--images", "d", "--teacher", "m:f", "--out", "o", "--crops", "2",
                              "--num-classes", "10"])
    assert generate_options(args) == {"num_classes": 10}
    with pytest.raises(SystemExit):  # the 0.1 spelling --classes is gone
        parser.parse_args(["generate", "--images", "d", "--teacher", "m:f", "--out", "o", "--crops", "2",
                           "--classes", "10"])
