"""Logits codec, temperature, q8 error bound, stored-field rules, codec coercion, torch-free import."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optional_torch import torch

import fkdstore.codecs as codecs
from fkdstore.codecs import (
    REGISTRY,
    Full,
    Logits,
    MarginalReNorm,
    MarginalSmoothing,
    Smoothing,
    as_codec,
    get_codec,
    parse_spec,
)
from fkdstore.errors import ValidationError

HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def logits_rows(seed, lead, D, scale):
    return (np.random.default_rng(seed).normal(size=tuple(lead) + (D,)) * scale).astype(np.float32)


logit_cases = st.builds(logits_rows, seed=st.integers(0, 2**32 - 1),
                        lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
                        D=st.integers(8, 200), scale=st.sampled_from([0.5, 2.0, 6.0]))


def softmax(z, T):
    z = np.asarray(z, np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- logits codec
@pytest.mark.parametrize("T", [1, 2, 4])
@HSET
@given(z=logit_cases)
def test_full_logits_decode_is_softmax_at_T(T, z):
    for dtype, tol in (("float32", 1e-6), ("float16", 2e-2)):  # float16: l within |l| * 2**-11, |l| < 40
        c = Logits(dtype=dtype)
        d = c.decode(c.encode(z), z.shape[-1], temperature=T)
        assert d.dtype == np.float32
        np.testing.assert_allclose(d, softmax(z, T), rtol=tol, atol=1e-7)


@pytest.mark.parametrize("T", [1, 2, 4])
@HSET
@given(z=logit_cases, k=st.integers(1, 6))
def test_topk_logits_on_kept_classes_equal_softmax_at_T(T, z, k):
    c = Logits(k=k, dtype="float32")
    D = z.shape[-1]
    f = c.encode(z)
    idx = f["indices"].astype(np.int64)
    np.testing.assert_array_equal(idx, np.argsort(-z, -1, kind="stable")[..., :k])
    d = c.decode(f, D, temperature=T)
    np.testing.assert_allclose(d.sum(-1), 1, atol=1e-5)
    kept, ref = np.take_along_axis(d, idx, -1), np.take_along_axis(softmax(z, T), idx, -1)
    # restricted to the kept classes and renormalised: exactly softmax(z / T) (the codec's equations)
    np.testing.assert_allclose(kept / kept.sum(-1, keepdims=True), ref / ref.sum(-1, keepdims=True), rtol=1e-5)
    if T == 1:  # at T = 1 the kept values themselves are exact, the tail mass too
        np.testing.assert_allclose(kept, ref, rtol=1e-5, atol=1e-9)
    elif k < D:  # Jensen: the uniform-logit tail over-estimates the tail mass for T > 1
        assert (1 - kept.sum(-1) >= 1 - ref.sum(-1) - 1e-6).all()


@pytest.mark.parametrize("T", [0.5, 2, 4])
def test_topk_logits_exact_when_the_tail_is_flat(T):
    z = np.array([[5.0, 3.0, 1.0, 1.0, 1.0, 1.0], [-1.0, 2.0, -1.0, -1.0, 4.0, -1.0]], np.float32)
    c = Logits(k=2, dtype="float32")
    # stored log-probs are rounded toward -inf (1 float32 ulp, not half: the tail is never lost to rounding);
    # the flat tail's share then deviates by up to ~|l| * 2**-23 / T relative: 3e-6 at T = 0.5 here
    np.testing.assert_allclose(c.decode(c.encode(z), 6, temperature=T), softmax(z, T), rtol=5e-6)


@HSET
@given(z=logit_cases)
def test_topk_logits_at_T1_equal_ms_of_the_same_probs(z):
    D = z.shape[-1]
    p = softmax(z, 1).astype(np.float32)
    lg = Logits(k=3, dtype="float32").decode(Logits(k=3, dtype="float32").encode(z), D)
    ms = MarginalSmoothing(k=3, dtype="float32").decode(MarginalSmoothing(k=3, dtype="float32").encode(p), D)
    # atol: ms computes the residual 1 - sum(top-k) in float32 (steps of 6e-8); logits works in float64
    np.testing.assert_allclose(lg, ms, rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("codec", [Logits(), Logits(k=4), Logits(k=4, dtype="q8"), MarginalSmoothing(), Full(),
                                   Full(dtype="q8")],
                         ids=repr)
@pytest.mark.parametrize("T", [0.5, 3.0])
def test_numpy_and_torch_agree_at_temperature(codec, T):
    z = logits_rows(3, (4, 5), 50, 3.0)
    x = z if codec.input == "logits" else softmax(z, 1).astype(np.float32)
    fn = codec.encode(x)
    ft = {n: torch.from_numpy(v) for n, v in fn.items()}
    if codec.name == "logits" and codec.quantized and T < 1:  # refused in both frameworks (test_codecs_ssl.py)
        for f in (fn, ft):
            with pytest.raises(ValidationError, match=r"q8 logits store must not be decoded at temperature < 1"):
                codec.decode(f, 50, temperature=T)
        return
    np.testing.assert_allclose(codec.decode(ft, 50, temperature=T).numpy(), codec.decode(fn, 50, temperature=T),
                               rtol=1e-6, atol=1e-12)


def test_logits_fields_and_input():
    assert Logits().input == "logits" and MarginalSmoothing().input == "probs"
    assert Logits(k=5).fields(1000) == {"indices": codecs.FieldSpec((5,), "uint16"),
                                        "logits": codecs.FieldSpec((5,), "float16")}
    assert Logits().fields(384) == {"logits": codecs.FieldSpec((384,), "float16")}  # any width D
    assert Logits(k=5, dtype="q8").raw_bytes_per_crop(1000) == 15
    with pytest.raises(ValidationError, match=r"k <= num_classes, got k=5 > num_classes=4"):
        Logits(k=5).fields(4)
    Logits().validate_input(np.zeros((2, 7), np.float32), 7)
    with pytest.raises(ValidationError, match=r"logits must be finite, got nan at row \(1,\) class 2"):
        bad = np.zeros((2, 7), np.float32)
        bad[1, 2] = np.nan
        Logits().validate_input(bad, 7)


# ----------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("T", [0, -1.0, float("nan"), float("inf"), -float("inf"), "2", True, None])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bad_temperature_is_refused(name, T):
    c = REGISTRY[name]()
    f = c.encode(softmax(logits_rows(0, (2,), 10, 1.0), 1).astype(np.float32))
    error = TypeError if isinstance(T, (str, bool)) or T is None else ValidationError  # wrong type vs bad value
    with pytest.raises(error, match=r"temperature must be a finite number > 0\. Got "):
        c.decode(f, 10, temperature=T)


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_probability_codecs_temper_their_decoded_rows(T):
    z = logits_rows(1, (6,), 30, 2.0)
    p = softmax(z, 1).astype(np.float32)
    for c in (Full(dtype="float32"), MarginalSmoothing(k=4), MarginalReNorm(k=4), Smoothing(), Full(dtype="q8")):
        f = c.encode(p)
        d1 = c.decode(f, 30).astype(np.float64)
        want = d1 ** (1 / T) / (d1 ** (1 / T)).sum(-1, keepdims=True)
        np.testing.assert_allclose(c.decode(f, 30, temperature=T), want, rtol=1e-5, atol=1e-12)
    # full at T is softmax(z / T); mr at T is softmax(z / T) restricted to the top-K and renormalised
    np.testing.assert_allclose(Full(dtype="float32").decode(Full(dtype="float32").encode(p), 30, temperature=T),
                               softmax(z, T), rtol=1e-5)
    mr = MarginalReNorm(k=4, dtype="float32")
    f = mr.encode(p)
    idx = f["indices"].astype(np.int64)
    ref = np.take_along_axis(softmax(z, T), idx, -1)
    np.testing.assert_allclose(np.take_along_axis(mr.decode(f, 30, temperature=T), idx, -1),
                               ref / ref.sum(-1, keepdims=True), rtol=1e-5)
    h = get_codec("hard")
    np.testing.assert_array_equal(h.decode(h.encode(p), 30, temperature=T), h.decode(h.encode(p), 30))


# ----------------------------------------------------------------------------- q8
@HSET
@given(p=st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=1, max_size=300))
def test_q8_error_bound(p):
    p = np.asarray(p, np.float32)
    got = Full(dtype="q8").encode(p[None])["probs"][0]
    ph = codecs.Q8_TABLE[got].astype(np.float64)
    err = p.astype(np.float64) - ph
    assert (err >= 0).all(), "q8 rounds down"
    assert (err <= codecs.q8_bound(p) * (1 + 1e-6) + 1e-12).all()


def test_q8_bound_constants_and_out_of_range():
    assert 0.090 < codecs.Q8_REL < 0.091 and 1.6e-5 < codecs.Q8_PMIN < 1.7e-5
    assert codecs.Q8_TABLE[0] == 0 and (np.diff(codecs.Q8_TABLE) > 0).all()
    for bad in (np.nan, -0.01, 1.01):
        with pytest.raises(ValidationError, match=r"q8 stores probabilities in \[0, 1 \+ 0.001\]\. Got"):
            Full(dtype="q8").encode(np.array([[bad, 0.5]], np.float32))


def test_q8_keeps_the_ms_tail_of_a_confident_teacher():
    p = np.array([[0.995, 0.003, 0.001, 0.0005, 0.0005]], np.float32)
    d = MarginalSmoothing(k=2, dtype="q8").decode(MarginalSmoothing(k=2, dtype="q8").encode(p), 5)
    assert (d[0, 2:] > 0).all() and abs(d[0, 0] - 0.995) <= codecs.Q8_REL * 0.005


@HSET
@given(z=logit_cases)
def test_full_q8_decodes_every_class_positive_within_its_bound(z):
    """Full q8: zero-coded classes share the missing mass, so KL(teacher || decoded) is finite for every row."""
    p = softmax(z, 1).astype(np.float32)
    C = p.shape[-1]
    codec = Full(dtype="q8")
    f = codec.encode(p)
    d = codec.decode(f, C).astype(np.float64)
    assert (d > 0).all()
    np.testing.assert_allclose(d.sum(-1), 1, atol=1e-6)
    p64 = p.astype(np.float64)
    kl = (p64 * (np.log(np.maximum(p64, 1e-300)) - np.log(d))).sum(-1)
    assert np.isfinite(kl).all()
    ph = codecs.Q8_TABLE[f["probs"]].astype(np.float64)
    S = ph.sum(-1, keepdims=True)
    zero = f["probs"] == 0
    coded_lo = (p64 - codecs.q8_bound(p64)) / (1 + C * codecs.Q8_PMIN * 2**-10)
    assert (d[~zero] >= (coded_lo * (1 - 1e-6))[~zero]).all()
    assert (d <= np.where(zero, codecs.Q8_PMIN / (2 * S), p64 / S) * (1 + 1e-6)).all()


def test_full_q8_kl_is_finite_on_a_confident_1000_class_teacher():
    from fkdstore.report import teacher_like_probs

    rng = np.random.default_rng(0)
    p = teacher_like_probs(rng, 4, 50, 1000, rng.integers(0, 1000, 4))
    codec = Full(dtype="q8")
    f = codec.encode(p)
    assert (f["probs"] == 0).any(-1).mean() > 0.5  # most crops have classes below Q8_PMIN
    d = codec.decode(f, 1000).astype(np.float64)
    p64 = p.astype(np.float64)
    kl = np.where(p64 > 0, p64 * (np.log(np.where(p64 > 0, p64, 1)) - np.log(d)), 0).sum(-1)
    assert np.isfinite(kl).all() and kl.mean() < 0.01
    # logits with k=None and q8 stores the same codes and decodes the same way (at T = 1)
    lg = Logits(k=None, dtype="q8")
    fl = lg.encode(np.log(np.maximum(p, 1e-30)))
    np.testing.assert_array_equal(fl["logits"], f["probs"])
    np.testing.assert_allclose(lg.decode(fl, 1000), d, rtol=1e-6, atol=1e-12)
    assert (lg.decode(fl, 1000, temperature=2.0) > 0).all()


# ----------------------------------------------------------------------------- stored-field rules
def test_validate_fields_rules():
    c = MarginalSmoothing(k=3, dtype="float32")
    good = c.encode(softmax(logits_rows(0, (2, 4), 10, 2.0), 1).astype(np.float32))
    c.validate_fields(good, 10)
    assert c.field_problems(good, 10) == []
    cases = [
        ("indices", (1, 2, 1), 10, r"class indices in \[0, 10\)\. Got 1 bad crops, first at \(1, 2\)"),
        ("indices", (0, 1, 1), None, r"distinct top-K class indices\. Got 1 bad crops, first at \(0, 1\)"),
        ("probs", (1, 0, 2), 0.9, r"top-K probabilities in descending order"),
        ("probs", (0, 3, 0), 1.5, r"probabilities finite in \[0, 1 \+ 0.001\]"),
        ("probs", (0, 0, 0), np.nan, r"probabilities finite"),
    ]
    for field, where, value, msg in cases:
        bad = {k: v.copy() for k, v in good.items()}
        bad[field][where] = bad[field][where[:2] + (0,)] if value is None else value
        with pytest.raises(ValidationError, match=msg):
            c.validate_fields(bad, 10)
    bad = {k: v.copy() for k, v in good.items()}
    bad["probs"][1, 1] = [0.6, 0.5, 0.4]
    with pytest.raises(ValidationError, match=r"top-K mass at most 1 \+"):
        c.validate_fields(bad, 10)
    full = Full().encode(np.full((2, 10), 0.1, np.float32))
    full["probs"][1] *= 1.01
    with pytest.raises(ValidationError, match=r"rows summing to 1 within 0.00149.*first at \(1,\)"):
        Full().validate_fields(full, 10)


def test_sum_atol_grows_with_classes_for_float16_full():
    assert Full().sum_atol(1000) == pytest.approx(1e-3 + 2**-11 + 1000 * 2**-25)
    assert Full().sum_atol(100_000) > 3.5e-3 > Full(dtype="float32").sum_atol(100_000)
    assert codecs.PROB_ATOL == 1e-3


@pytest.mark.parametrize("codec", [REGISTRY[n]() for n in sorted(REGISTRY)], ids=repr)
def test_encoded_fields_pass_their_own_rules(codec):
    z = logits_rows(5, (3, 4), 40, 3.0)
    x = z if codec.input == "logits" else softmax(z, 1).astype(np.float32)
    assert codec.field_problems(codec.encode(x), 40) == []


# ----------------------------------------------------------------------------- conversion through codec methods
def test_logits_and_q8_conversions():
    from fkdstore.codecs import convert_fields
    from fkdstore.errors import ConversionError

    z = logits_rows(2, (3, 5), 20, 3.0)
    p = softmax(z, 1).astype(np.float32)
    full = Full(dtype="float32")
    lg = convert_fields(full, Logits(k=4, dtype="float32"), full.encode(p), 20)
    direct = Logits(k=4, dtype="float32").encode(z)
    np.testing.assert_array_equal(lg["indices"], direct["indices"])
    np.testing.assert_allclose(lg["logits"], direct["logits"], atol=1e-5)
    ms = convert_fields(Logits(k=4, dtype="float32"), MarginalSmoothing(k=2, dtype="q8"), direct, 20)
    np.testing.assert_array_equal(ms["probs"], MarginalSmoothing(k=2, dtype="q8").encode(p)["probs"])
    with pytest.raises(ConversionError, match=r"logits K=4 store keeps only the top 4 classes; ms K=5 needs the top 5"):
        convert_fields(Logits(k=4), MarginalSmoothing(k=5), Logits(k=4).encode(z), 20)
    with pytest.raises(ConversionError, match=r"does not hold the full C-way distribution"):
        convert_fields(MarginalSmoothing(), Logits(), MarginalSmoothing().encode(p), 20)


# ----------------------------------------------------------------------------- coercion
def test_as_codec_and_spec_strings():
    assert parse_spec("ms:k=5,dtype=q8") == {"name": "ms", "k": 5, "dtype": "q8"}
    assert parse_spec(' {"name": "mr", "k": 3} ') == {"name": "mr", "k": 3}
    assert as_codec("ms:k=5,dtype=q8") == MarginalSmoothing(k=5, dtype="q8")
    assert as_codec("logits:k=none") == Logits(k=None) == as_codec("logits")
    assert as_codec({"name": "ms", "k": 3}) == get_codec({"name": "ms", "k": 3}) == get_codec("ms", k=3)
    assert as_codec("ms", k=7) == MarginalSmoothing(k=7)
    assert as_codec("mr", default_k=2) == MarginalReNorm(k=2) and as_codec("mr:k=4", default_k=2).k == 4
    assert as_codec("full", default_k=2) == Full()
    c = MarginalSmoothing(k=2)
    assert as_codec(c) is c and as_codec(c, k=2) is c
    with pytest.raises(ValidationError, match=r"k applies to the top-K codecs \(logits, mr, ms, sampled\) only\. "
                                              r"Got codec 'hard' with k=3\."):
        as_codec("hard", k=3)
    with pytest.raises(ValidationError, match=r"k is given twice with different values"):
        as_codec("ms:k=5", k=3)
    with pytest.raises(ValidationError, match=r"key=value\. Got 'k5'"):
        parse_spec("ms:k5")
    with pytest.raises(TypeError, match=r"Got int\."):
        as_codec(5)
    cfg = {"name": "ms", "k": 4}
    get_codec(cfg)
    assert cfg == {"name": "ms", "k": 4}, "get_codec copies its config"


def test_codec_attributes_used_by_report_and_convert():
    assert [REGISTRY[n]().k for n in ("full", "hard", "smoothing", "ms", "mr", "logits")] == [None] * 3 + [5, 5, None]
    assert MarginalSmoothing(k=10).paper_values_per_crop(1000) == 25 and Full().paper_values_per_crop(1000) == 1005
    assert Logits(k=5, dtype="q8").roles() == {"indices": "indices_topk", "logits": "logits_topk_q8"}
    assert MarginalReNorm(k=3).describe() == "mr K=3" and Full().describe() == "full"


def test_codecs_import_and_work_without_torch():
    """fkdstore.codecs (loaded without fkdstore/__init__, which other modules own) never imports torch."""
    code = (
        "import sys, types; sys.modules['torch'] = None\n"
        f"pkg = types.ModuleType('fkdstore'); pkg.__path__ = [{str(Path(codecs.__file__).parents[1])!r}]\n"
        "sys.modules['fkdstore'] = pkg\n"
        "import numpy as np; import fkdstore.codecs as c\n"
        "m = c.as_codec('ms:k=2,dtype=q8'); p = np.array([[0.7, 0.2, 0.1]], np.float32)\n"
        "print(m.decode(m.encode(p), 3, temperature=2).shape, c.as_codec('logits:k=2').decode("
        "c.as_codec('logits:k=2').encode(np.log(p)), 3).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 3) (1, 3)"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_codec_has_calibrated_roles_for_estimate(name):
    from fkdstore import report

    dtypes = REGISTRY[name].DTYPES if "dtype" in REGISTRY[name].__dataclass_fields__ else (None,)
    for dtype in dtypes:
        codec = REGISTRY[name](**({"dtype": dtype} if dtype else {}))
        e = report.estimate_bytes(1000, 10, 100, codec)
        assert e["bytes"] > 0 and set(codec.roles()) <= set(codec.fields(100))
