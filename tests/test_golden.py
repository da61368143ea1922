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
def test_v1_0_store_reads_identically(codec, expected):
    keys = json.loads((V1_0 / "keys.json").read_text())
    with fkdstore.open(V1_0 / f"{codec}.zarr") as r:
        assert r.complete
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
