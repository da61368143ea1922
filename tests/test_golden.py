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
    from fkdstore.convert import convert

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
    from fkdstore.verify import verify

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
