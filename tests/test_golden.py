"""Golden stores: written once by an old release, read by today's reader. Never regenerate them to make a
test pass; a failure here means existing users' stores stopped reading correctly."""
import json
from pathlib import Path

import numpy as np
import pytest

import fkdstore

V1_0 = Path(__file__).parent / "golden" / "v1.0"
CODECS = ["full", "hard", "smoothing", "ms", "mr"]


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(V1_0 / "expected.npz"))


@pytest.mark.parametrize("codec", CODECS)
def test_v1_0_store_migrates_identically(codec, expected, tmp_path):
    """Format 1.0 (fkdstore 0.1) is read by `convert` only: readers refuse it naming the migration, and the
    migrated 4.0 store holds exactly the 1.0 store's keys, sizes, crops and label fields."""
    from fkdstore.conversion import convert

    keys = json.loads((V1_0 / "keys.json").read_text())
    with pytest.raises(fkdstore.FormatError, match="format version 1.0 .*fkdstore convert"):
        fkdstore.open(V1_0 / f"{codec}.zarr")
    src = json.loads((V1_0 / f"{codec}.zarr" / "zarr.json").read_text())["attributes"]["fkdstore"]["codec"]
    out = convert(V1_0 / f"{codec}.zarr", tmp_path / "out", src)  # the same codec: a copy into 4.0
    assert out["images"] == len(keys) and out["missing"] == 0
    with fkdstore.open(tmp_path / "out") as r:
        assert r.complete and r.header.format_version == "4.0" and not r.header.seeded
        assert r.image_keys == keys
        np.testing.assert_array_equal(r.image_sizes, expected["sizes"])
        rec = r.read_batch(np.arange(r.num_images))
        np.testing.assert_array_equal(rec.boxes, expected["boxes"])
        np.testing.assert_array_equal(rec.flips, expected["flips"])
        for name, v in rec.fields.items():
            np.testing.assert_array_equal(v, expected[f"{codec}/{name}"])
        np.testing.assert_array_equal(r.decode(rec.fields), expected[f"{codec}/decoded"])
        everything = r.read_all()
        np.testing.assert_array_equal(everything.boxes, expected["boxes"])


V3_0 = Path(__file__).parent / "golden" / "v3.0"


@pytest.mark.parametrize("name,version", [("seeded", "3.0"), ("stored", "2.0")])
def test_v3_0_seeded_store_and_its_v2_0_twin_read_identically(name, version):
    """Seeded crops (format 3.0) are derived by today's slot sampler on every read: a change of the sampler
    that would replay other crops than the writer was given fails here."""
    from fkdstore.verification import verify

    expected = dict(np.load(V3_0 / "expected.npz"))
    keys = json.loads((V3_0 / "keys.json").read_text())
    with fkdstore.open(V3_0 / f"{name}.zarr") as r:
        assert r.complete and r.header.format_version == version and r.image_keys == keys
        if name == "seeded":
            assert r.header.sampler.get_config() == json.loads((V3_0 / "crop_sampler.json").read_text())
        np.testing.assert_array_equal(r.image_sizes, expected["sizes"])
        for rec in (r.read_batch(np.arange(r.num_images)), r.read_all()):
            np.testing.assert_array_equal(rec.box, expected["boxes"])
            np.testing.assert_array_equal(rec.flip, expected["flips"])
            for f, v in rec.fields.items():
                np.testing.assert_array_equal(v, expected[f"{name}/{f}"])
            np.testing.assert_array_equal(r.decode(rec.fields), expected[f"{name}/decoded"])
        np.testing.assert_array_equal(r.read(3).box, expected["boxes"][3])  # the fallback image
    assert verify(V3_0 / f"{name}.zarr") == []


V4_0 = Path(__file__).parent / "golden" / "v4.0"


@pytest.mark.parametrize("name", ["seeded", "stored"])
def test_v4_0_region_stores_read_identically(name):
    """Written by fkdstore 0.3 (the first 4.0 writer): today's reader returns what that writer was given, and
    every chunk (per-image ones included) matches its tag."""
    from fkdstore.verification import verify

    expected = dict(np.load(V4_0 / "expected.npz"))
    keys = json.loads((V4_0 / "keys.json").read_text())
    with fkdstore.open(V4_0 / f"{name}.zarr") as r:
        assert r.complete and r.header.format_version == "4.0" and r.image_keys == keys
        assert r.header.seeded == (name == "seeded")
        assert bytes.fromhex(r.header.store_id) == expected[f"{name}/store_id"].tobytes()
        if name == "seeded":
            assert r.header.sampler.get_config() == json.loads((V4_0 / "crop_sampler.json").read_text())
        np.testing.assert_array_equal(r.image_sizes, expected["sizes"])
        np.testing.assert_array_equal(r.labels, expected["labels"])
        for rec in (r.read_batch(np.arange(r.num_images)), r.read_all()):
            np.testing.assert_array_equal(rec.box, expected["boxes"])
            np.testing.assert_array_equal(rec.flip, expected["flips"])
            for f, v in rec.fields.items():
                np.testing.assert_array_equal(v, expected[f"{name}/{f}"])
            for k, v in rec.aug.items():
                np.testing.assert_array_equal(v, expected[f"aug/{k}"])
            np.testing.assert_array_equal(r.decode(rec.fields), expected[f"{name}/decoded"])
        np.testing.assert_array_equal(r.read(3).box, expected["boxes"][3])  # the fallback image
    assert verify(V4_0 / f"{name}.zarr") == []


def test_v4_0_label_map_store_reads_identically():
    from fkdstore.verification import verify

    expected = dict(np.load(V4_0 / "expected.npz"))
    with fkdstore.open(V4_0 / "maps.zarr") as r:
        assert r.kind == "label_map" and r.complete
        rec = r.read_batch(np.arange(r.num_images))
        np.testing.assert_array_equal(rec.indices, expected["maps/indices"])
        np.testing.assert_array_equal(rec.scores, expected["maps/scores"])
        got = r.pool([0, 4, 10], expected["maps/pool_boxes"], [False, True, False])
        np.testing.assert_allclose(got, expected["maps/pooled"], rtol=0, atol=1e-6)
    assert verify(V4_0 / "maps.zarr") == []


def test_v4_0_writer_is_deterministic(tmp_path):
    """The same inputs give the same store: every array decodes equal and the manifests (tags over decoded
    content, store id included) are equal, so the default store id and the tags depend on nothing else.
    (Compressed chunk bytes may differ between compressor library versions; decoded content may not.)"""
    import subprocess
    import sys

    out = tmp_path / "v4.0"
    subprocess.run([sys.executable, str(Path(__file__).parent / "golden" / "make_v4_0.py"), str(out)], check=True,
                   timeout=120)
    import zarr

    for name in ("seeded.zarr", "stored.zarr", "maps.zarr"):
        a, b = zarr.open_group(str(V4_0 / name), mode="r"), zarr.open_group(str(out / name), mode="r")
        assert dict(a.attrs)["fkdstore"] == {**dict(b.attrs)["fkdstore"],
                                            "library_version": dict(a.attrs)["fkdstore"]["library_version"]}
        arrays = sorted(k for k, _ in a.arrays()) + sorted(f"{g}/{k}" for g, grp in a.groups() for k, _ in grp.arrays())
        for k in arrays:
            np.testing.assert_array_equal(a[k][:], b[k][:], err_msg=f"{name}/{k}")
