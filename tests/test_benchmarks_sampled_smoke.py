"""Tiny runs of the sampled / tail / SSL-precision benchmark scripts, so they cannot rot (a few seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sampled_size  # noqa: E402
import ssl_precision  # noqa: E402
import tail_temperature  # noqa: E402

from fkdstore.codecs import Sampled, get_codec  # noqa: E402
from fkdstore.report import teacher_like_probs  # noqa: E402


def test_sampled_size_writes_stores_and_measures_bias(tmp_path):
    p = teacher_like_probs(np.random.default_rng(0), 6, 20, 50)
    s = sampled_size.write_store(tmp_path / "s", Sampled(s=8, k=1), p)
    m = sampled_size.write_store(tmp_path / "m", get_codec("ms", k=6), p)
    for r in (s, m):
        assert r["info"]["label_bytes_per_crop"] > 0 and 0 < r["tv"] < 1 and r["noise"] > 0
    assert s["noise"] > m["noise"]  # one crop's sampled label is noisier than its top-K
    assert m["bias"] > 0  # truncation is systematic


def test_ssl_precision_and_tail_temperature_run():
    rows = ssl_precision.main(["--rows", "30"])["results"]
    by = {(r["outputs"], r["tau"], r["codec"]): r for r in rows}
    assert by["moco128", 0.2, "float16 centred"]["tv"] < by["moco128", 0.2, "float16"]["tv"]
    res = tail_temperature.main(["--rows", "200"])["results"]
    assert all(r["violations"] == 0 for r in res)
