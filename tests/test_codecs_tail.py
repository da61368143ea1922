"""Top-K logits at any temperature (the tail statistic and its error bound), centred logits for self-supervised
heads, q8 refused below T = 1, and stores written before these options decoding as before."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fkdstore.codecs import Full, Logits, from_config
from fkdstore.errors import ValidationError

HSET = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEP = {"float32": 2.0**-23, "float16": 2.0**-10}


def softmax(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def logit(x):
    return np.log(x) - np.log1p(-x)


def tail_logit(d, idx):
    """``logit`` of the mass outside the kept classes ``idx``, from the two sums (no ``1 - x`` cancellation)."""
    d = np.asarray(d, np.float64)
    kept = np.take_along_axis(d, idx, -1).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(d.sum(-1) - kept) - np.log(kept)


def logit_rows(seed, rows, C, scale, kind):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        z = rng.normal(0, scale, (rows, C))
    elif kind == "student":  # heavy tails: far from the Gaussian model of the estimate
        z = rng.standard_t(2, (rows, C)) * scale
    elif kind == "uniform":
        z = rng.uniform(-scale, scale, (rows, C))
    else:  # two clusters: a bimodal tail
        z = np.where(rng.random((rows, C)) < 0.3, 2 * scale, -2 * scale) + rng.normal(0, 0.3, (rows, C))
    z[:, 0] += 3 * scale  # a confident class
    return z.astype(np.float32)


cases = st.tuples(st.integers(0, 2**31), st.integers(3, 400), st.floats(0.05, 0.95),
                  st.sampled_from([0.3, 1.0, 3.0, 6.0]), st.sampled_from(["normal", "student", "uniform", "clusters"]))


@pytest.mark.parametrize("tail", ["mean", None])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@HSET
@given(case=cases)
def test_tail_mass_error_is_within_the_stated_bound(tail, dtype, case):
    """``|logit(decoded tail mass) - logit(tail mass of softmax(z / T))| <= tail_bound + a * step`` at
    T in {1, 2, 4, 20} (and 0.5), ``step`` = one storage step of the smallest kept log-probability (the kept
    sum's rounding); at T = 1 the bound is 0 and only storage rounding remains."""
    seed, C, frac, scale, kind = case
    k = max(1, min(C - 1, int(frac * C)))
    codec = Logits(k=k, dtype=dtype, tail=tail)
    z = logit_rows(seed, 4, C, scale, kind)
    f = codec.encode(z)
    idx = f["indices"].astype(np.int64)
    lk = np.abs(f["logits"][:, -1].astype(np.float64))
    r_true = 1 - np.take_along_axis(softmax(z), idx, -1).sum(-1)
    mask = np.ones(z.shape, bool)
    np.put_along_axis(mask, idx, False, -1)
    for T in (1, 2, 4, 20, 0.5):
        a = 1 / T
        p, d = softmax(z, T), codec.decode(f, C, temperature=T).astype(np.float64)
        true, dec = tail_logit(p, idx), tail_logit(d, idx)
        ok = np.isfinite(true) & np.isfinite(dec) & ((d * mask).min(-1) > 1e-30)  # no float32 underflow
        err = np.abs(np.where(ok, dec, 0) - np.where(ok, true, 0))[ok]  # (inf - inf where not ok)
        bound = codec.tail_bound(f, C, temperature=T)[ok]
        slack = a * STEP[dtype] * (lk[ok] + 1) + 1e-5  # + the float32 decode output
        if T == 1:
            assert (bound == 0).all()
            r_dec = 1 - np.exp(f["logits"].astype(np.float64)).sum(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                slack = slack + np.abs(np.log(r_dec / r_true))[ok]
        assert (err <= bound + slack).all(), (T, err, bound)


def test_the_mean_statistic_beats_the_uniform_tail_and_its_bound_is_tighter():
    z = logit_rows(0, 500, 1000, 2.0, "normal")
    for k in (5, 50):
        mean, old = Logits(k=k, dtype="float32", tail="mean"), Logits(k=k, dtype="float32")
        fm, fo = mean.encode(z), old.encode(z)
        idx = fm["indices"].astype(np.int64)
        for T in (2, 4, 20):
            true = logit(1 - np.take_along_axis(softmax(z, T), idx, -1).sum(-1))
            e = {name: np.abs(logit(1 - np.take_along_axis(c.decode(f, 1000, temperature=T), idx, -1)
                                      .astype(np.float64).sum(-1)) - true).mean()
                 for name, c, f in (("mean", mean, fm), ("old", old, fo))}
            assert e["mean"] < 0.2 * e["old"]
            a = 1 / T
            gap = np.log((1 - np.exp(fm["logits"].astype(np.float64)).sum(-1)) / (1000 - k)) - fm["tail_mean"]
            bm = mean.tail_bound(fm, 1000, temperature=T)
            assert (bm <= a * gap * max(a, 1 - a) + 1e-9).all()  # the closed form of the module docstring
            assert (bm < old.tail_bound(fo, 1000, temperature=T)).all()


def test_flat_tail_is_exact_and_the_decode_is_a_distribution():
    z = np.array([[5.0, 3.0, 1.0, 1.0, 1.0, 1.0], [-1.0, 2.0, -1.0, -1.0, 4.0, -1.0]], np.float32)
    c = Logits(k=2, dtype="float32", tail="mean")
    f = c.encode(z)
    for T in (0.3, 0.5, 2, 4, 20):
        d = c.decode(f, 6, temperature=T)
        np.testing.assert_allclose(d, softmax(z, T), rtol=5e-5)  # float32 rounding of l, amplified by 1 / T
        if T >= 1:  # a flat tail closes Jensen's interval (D = 0); below T = 1 the bound is the loose extreme point
            assert (c.tail_bound(f, 6, temperature=T) < 1e-4).all()


def test_tail_statistic_fields_config_and_conversion():
    from fkdstore.codecs import convert_fields
    from fkdstore.errors import ConversionError

    c = Logits(k=5, tail="mean")
    assert c.fields(1000)["tail_mean"].dtype == "float16" and c.raw_bytes_per_crop(1000) == 22
    assert Logits(k=5, tail="mean", dtype="float32").fields(1000)["tail_mean"].dtype == "float32"
    assert Logits(k=5, tail="mean", dtype="q8").fields(1000)["tail_mean"].dtype == "float16"
    assert c.get_config() == {"name": "logits", "k": 5, "dtype": "float16", "tail": "mean", "centred": False}
    assert from_config(c.get_config()) == c and c.describe() == "logits K=5 tail=mean"
    with pytest.raises(ValidationError, match=r"Logits\.tail must be one of \(None, 'mean'\), got 'min'"):
        Logits(k=5, tail="min")
    with pytest.raises(ValidationError, match=r"Logits\.tail applies to top-K stores"):
        Logits(tail="mean")
    z = logit_rows(1, 6, 30, 2.0, "normal")
    direct = Logits(k=4, dtype="float32", tail="mean").encode(z)
    via = convert_fields(Full(dtype="float32"), Logits(k=4, dtype="float32", tail="mean"),
                         Full(dtype="float32").encode(softmax(z).astype(np.float32)), 30)
    np.testing.assert_allclose(via["tail_mean"], direct["tail_mean"], rtol=1e-5)
    lsm = np.log(softmax(z))
    tail = np.sort(lsm, -1)[:, :-4]  # the 26 classes outside the top 4
    assert (direct["tail_mean"] <= tail.mean(-1)).all()  # rounded toward -inf: Jensen's bound stays valid
    np.testing.assert_allclose(direct["tail_mean"], tail.mean(-1), rtol=1e-6)
    with pytest.raises(ConversionError, match=r"stores the mean tail log-probability"):
        convert_fields(Logits(k=8), Logits(k=4, tail="mean"), Logits(k=8).encode(z), 30)


def test_stores_written_before_the_options_decode_as_before():
    """An old config (no ``tail``, no ``centred``) parses to the defaults and decodes with the uniform tail of
    its module docstring: w_t = exp(log(r / n) / T)."""
    old = from_config({"name": "logits", "k": 3, "dtype": "float16"})
    assert old == Logits(k=3) and old.tail is None and not old.centred and "tail_mean" not in old.fields(20)
    z = logit_rows(2, 5, 20, 2.0, "normal")
    f = old.encode(z)
    lp = f["logits"].astype(np.float64)
    r = 1 - np.exp(lp).sum(-1, keepdims=True)
    for T in (0.5, 2.0, 20.0):
        wk, wt = np.exp(lp / T), np.exp(np.log(r / 17) / T)
        zsum = wk.sum(-1, keepdims=True) + 17 * wt
        want = np.broadcast_to(wt / zsum, (5, 20)).copy()
        np.put_along_axis(want, f["indices"].astype(np.int64), wk / zsum, -1)
        np.testing.assert_allclose(old.decode(f, 20, temperature=T), want, rtol=1e-6)


# ----------------------------------------------------------------------------- self-supervised heads
def ssl_outputs(seed, rows=400, D=128):
    """A projection head's L2-normalised output (what MoCo v2 feeds its softmax): entries ~ N(0, 1/D)."""
    v = np.random.default_rng(seed).normal(size=(rows, D))
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_centred_logits_are_finer_at_low_temperature():
    z = ssl_outputs(0)
    want = softmax(z, 0.2)
    err = {}
    for centred in (False, True):
        c = Logits(dtype="float16", centred=centred)
        f = c.encode(z)
        d = c.decode(f, 128, temperature=0.2).astype(np.float64)
        err[centred] = np.abs(d / want - 1).max()
        np.testing.assert_allclose(c.kept_mass(f), 1.0, atol=0 if centred else c.sum_atol(128))
        assert c.field_problems(f, 128) == []
    assert err[True] < err[False] / 4 and err[True] < 3e-3  # max relative error of a probability


def test_centred_rows_rules_and_options():
    c = Logits(centred=True, dtype="float32")
    z = ssl_outputs(1, rows=3, D=16)
    f = c.encode(z)
    np.testing.assert_array_equal(f["logits"].max(-1), 0)
    np.testing.assert_allclose(f["logits"], z - z.max(-1, keepdims=True), atol=1e-7)
    bad = {"logits": f["logits"] - np.float32(0.5)}
    assert [rule for rule, _ in c.field_problems(bad, 16)] == ["centred rows (maximum exactly 0)"]
    assert c.get_config() == {"name": "logits", "k": None, "dtype": "float32", "tail": None, "centred": True}
    for kw in ({"k": 5}, {"dtype": "q8"}):
        with pytest.raises(ValidationError, match=r"Logits\.centred stores z - max\(z\) of every output"):
            Logits(centred=True, **kw)
    with pytest.raises(TypeError, match=r"Logits\.centred must be a bool"):
        Logits(centred=1)
    from fkdstore.codecs import convert_fields

    back = convert_fields(c, Full(dtype="float32"), f, 16)["probs"]
    np.testing.assert_allclose(back, softmax(z), rtol=1e-5)


@pytest.mark.parametrize("codec", [Logits(dtype="q8"), Logits(k=4, dtype="q8"), Logits(k=4, dtype="q8", tail="mean")],
                         ids=repr)
def test_q8_logits_are_refused_below_temperature_one(codec):
    z = ssl_outputs(2, rows=2, D=20) * 5
    f = codec.encode(z)
    for T in (0.99, 0.2):
        with pytest.raises(ValidationError, match=r"q8 logits store must not be decoded at temperature < 1.*"
                                                  rf"Got temperature={T:g}"):
            codec.decode(f, 20, temperature=T)
    for T in (1, 2.0):
        np.testing.assert_allclose(codec.decode(f, 20, temperature=T).sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(Logits(dtype="float16").decode(Logits(dtype="float16").encode(z), 20,
                                                              temperature=0.2).sum(-1), 1, atol=1e-5)


def test_tail_bound_edge_cases():
    c = Logits(k=3, dtype="float32", tail="mean")
    z = logit_rows(3, 2, 10, 1.0, "normal")
    f = c.encode(z)
    assert c.tail_bound(f, 10, temperature=1).tolist() == [0.0, 0.0]
    assert (Logits(dtype="float32").tail_bound(Logits(dtype="float32").encode(z), 10, temperature=4) == 0).all()
    # mu = -inf (a store converted from one with zero-mass classes): the uniform rule and its bound
    inf = {**f, "tail_mean": np.full(2, -np.inf, np.float32)}
    old = Logits(k=3, dtype="float32")
    np.testing.assert_allclose(c.decode(inf, 10, temperature=4), old.decode(f, 10, temperature=4))
    np.testing.assert_allclose(c.tail_bound(inf, 10, temperature=4), old.tail_bound(f, 10, temperature=4))
    with pytest.raises(ValidationError, match=r"temperature must be a finite number > 0"):
        c.tail_bound(f, 10, temperature=0)
