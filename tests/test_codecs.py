"""Tests of fkdstore.codecs: every property is parametrised over REGISTRY, so a new codec is covered for free."""
import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optional_torch import cuda_available, torch

import fkdstore.codecs as codecs
from fkdstore.codecs import (
    REGISTRY,
    FieldSpec,
    Full,
    Hard,
    Logits,
    MarginalReNorm,
    MarginalSmoothing,
    Sampled,
    Smoothing,
    from_config,
    get_codec,
    index_dtype,
    validate_probs,
)
from fkdstore.errors import ValidationError

NAMES = sorted(REGISTRY)
SUM_TOL = {"float16": 2e-3, "float32": 1e-5, "q8": 1e-5}
# re-encoding a decoded MR row stores the renormalised probs, not the original ones; a decoded q8 full row is
# renormalised too; the logits codec re-derives log-probabilities with exp/log (equal to rounding, not bitwise)
NOT_FIXED_POINT = {"mr", "full:q8", "logits"}
HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_probs(seed, lead, C, mode="smooth", dtype=np.float32):
    """Probability rows (lead..., C): 'smooth' softmax, 'peaked', 'ties' (integer logits), 'sparse' (exact zeros)."""
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (C,)
    if mode == "ties":
        logits = rng.integers(0, 3, size=shape).astype(np.float64)
    elif mode == "peaked":
        logits = rng.normal(size=shape) * 8
    else:
        logits = rng.normal(size=shape) * 2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    if mode == "sparse":
        p = np.where(rng.random(shape) < 0.5, 0.0, p)
        np.put_along_axis(p, np.zeros(shape[:-1] + (1,), dtype=np.intp), 1.0, axis=-1)
    return (p / p.sum(-1, keepdims=True)).astype(dtype)


probs_cases = st.builds(
    make_probs,
    seed=st.integers(0, 2**32 - 1),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    C=st.integers(10, 300),
    mode=st.sampled_from(["smooth", "peaked", "ties", "sparse"]),
)


def codec_dtype(codec):
    return getattr(codec, "dtype", "float32")


def inp(codec, p):
    """What ``codec.encode`` takes for probability rows ``p``: ``p`` itself, or logits ``log p``."""
    if codec.input == "probs":
        return p
    # torch: the same logits as for numpy, so the codec is compared, not numpy's log vs torch's
    if type(p).__module__.startswith("torch"):
        return torch.from_numpy(inp(codec, p.cpu().numpy())).to(p.device)
    with np.errstate(divide="ignore"):
        return np.log(p)


def key(codec):
    return f"{codec.name}:{codec_dtype(codec)}"


def ref_order(row):
    return sorted(range(len(row)), key=lambda c: (-float(row[c]), c))


def q(x, dtype):
    if dtype == "q8":
        return float(codecs.Q8_TABLE[np.searchsorted(codecs.Q8_TABLE, np.float32(x), side="right") - 1])
    return float(np.asarray(x, dtype=np.float32).astype(dtype))


# Independent per-row float64 reference implementations of paper eqs. (3)-(7): (fields, decoded row).
def ref_full(c, row):
    v = [q(x, c.dtype) for x in row]
    if c.dtype == "q8":
        # zero codes get the missing mass, evenly, clipped to [Q8_PMIN / 1024, Q8_PMIN / 2]; then renormalised
        s = math.fsum(v)
        n0 = sum(1 for x in v if x == 0)
        e = min(max((max(1 - s, 0.0) / n0) if n0 else 0.0, codecs.Q8_PMIN / 1024), codecs.Q8_PMIN / 2)
        w = [x if x else e for x in v]
        return {"probs": v}, (np.asarray(w) / (s + n0 * e)).tolist()
    return {"probs": v}, v


def ref_hard(c, row):
    i = ref_order(row)[0]
    return {"indices": i}, [1.0 if j == i else 0.0 for j in range(len(row))]


def ref_smoothing(c, row):
    C, i = len(row), ref_order(row)[0]
    pm = q(row[i], c.dtype)
    other = max(1.0 - pm, 0.0) / max(C - 1, 1)
    return {"indices": i, "probs": pm}, [pm if j == i else other for j in range(C)]


def ref_ms(c, row):
    C, top = len(row), ref_order(row)[: c.k]
    vals = [q(row[j], c.dtype) for j in top]
    rest = max(1.0 - sum(vals), 0.0) / max(C - c.k, 1)
    out = [rest] * C
    for j, v in zip(top, vals):
        out[j] = v
    return {"indices": top, "probs": vals}, out


def ref_mr(c, row):
    C, top = len(row), ref_order(row)[: c.k]
    vals = [q(row[j], c.dtype) for j in top]
    s = sum(vals)
    out = [0.0] * C
    for j, v in zip(top, vals):
        out[j] = v / s if s > 0 else 1.0 / c.k
    return {"indices": top, "probs": vals}, out


REFS = {"full": ref_full, "hard": ref_hard, "smoothing": ref_smoothing, "ms": ref_ms, "mr": ref_mr}


def all_codecs():
    out = []
    for name in NAMES:
        cls = REGISTRY[name]
        out.append(cls())
        if "dtype" in cls.__dataclass_fields__:
            out += [cls(dtype="float32"), cls(dtype="q8")]
    out += [MarginalSmoothing(k=1), MarginalReNorm(k=10), Logits(k=5), Logits(k=1, dtype="float32"),
            Logits(k=3, dtype="q8"), Logits(k=5, tail="mean"), Logits(centred=True, dtype="float32"),
            Sampled(k=3, s=8, logp=True), Sampled(s=300, input="probs", dtype="float32")]
    return out


CODECS = all_codecs()
CODEC_IDS = [repr(c) for c in CODECS]
codec_param = pytest.mark.parametrize("codec", CODECS, ids=CODEC_IDS)


def stored_indices(codec, f, C):
    """The 'indices' field as int64 with a trailing slot axis ((...,) -> (..., 1))."""
    idx = f["indices"].astype(np.int64)
    return idx[..., None] if codec.fields(C)["indices"].shape == () else idx


def flat(x):
    return x.reshape(-1, x.shape[-1]) if x.ndim else x


# ----------------------------------------------------------------------------- decoded labels
@codec_param
@HSET
@given(p=probs_cases)
def test_decoded_rows_are_distributions(codec, p):
    C = p.shape[-1]
    f = codec.encode(inp(codec, p))
    for name, spec in codec.fields(C).items():
        assert f[name].dtype == np.dtype(spec.dtype)
        assert f[name].shape == p.shape[:-1] + spec.shape
    d = codec.decode(f, C)
    assert d.dtype == np.float32 and d.shape == p.shape
    assert np.isfinite(d).all() and (d >= 0).all()
    np.testing.assert_allclose(d.sum(-1), 1.0, atol=SUM_TOL[codec_dtype(codec)])


@codec_param
@HSET
@given(p=probs_cases)
def test_defining_equation_matches_reference(codec, p):
    if codec.name not in REFS:
        pytest.skip(f"no reference implementation for {codec.name}")
    C = p.shape[-1]
    f = codec.encode(p)
    d = flat(codec.decode(f, C))
    fl = {k: v.reshape((-1,) + codec.fields(C)[k].shape) for k, v in f.items()}
    for r, row in enumerate(flat(p)):
        ref_fields, ref_row = REFS[codec.name](codec, row)
        for k, v in ref_fields.items():
            got = fl[k][r]
            if k == "probs" and codec_dtype(codec) == "q8":
                got = codecs.Q8_TABLE[got]
            np.testing.assert_array_equal(np.asarray(got, dtype=np.float64), np.asarray(v, dtype=np.float64))
        np.testing.assert_allclose(d[r], ref_row, rtol=2e-6, atol=1e-7)


# a sampled head is followed by estimated tail values that may exceed it (tests/test_codecs_sampled.py)
@pytest.mark.parametrize("codec", [c for c in CODECS if c.k is not None and not c.keyed], ids=lambda c: repr(c))
@HSET
@given(p=probs_cases)
def test_topk_classes_and_order_preserved(codec, p):
    C = p.shape[-1]
    f = codec.encode(inp(codec, p))
    idx = f["indices"].astype(np.int64)
    expected = np.argsort(-p, axis=-1, kind="stable")[..., : codec.k]
    np.testing.assert_array_equal(idx, expected)
    d = codec.decode(f, C)
    kept = np.take_along_axis(d, idx, axis=-1)
    assert (np.diff(kept, axis=-1) <= 0).all(), "stored classes must stay in descending order"
    others = d.copy()
    np.put_along_axis(others, idx, -np.inf, axis=-1)
    tol = {"float16": 2e-3, "float32": 1e-6, "q8": 0.1}[codec.dtype]  # q8 rounds kept probs down by < 9.1 %
    assert (others.max(-1, initial=-np.inf) <= kept[..., -1] + tol).all()


# a sampled label (codec.keyed) is no fixed point: re-drawing from a decoded estimate draws other classes
@pytest.mark.parametrize("codec", [c for c in CODECS if not c.keyed], ids=lambda c: repr(c))
@HSET
@given(p=probs_cases)
def test_encode_decode_is_a_fixed_point(codec, p):
    """encode(decode(encode(x))) == encode(x) on rows whose stored entries are distinct and dominate the rest."""
    C = p.shape[-1]
    f = codec.encode(inp(codec, p))
    d = codec.decode(f, C)
    f2 = codec.encode(inp(codec, d))
    ok = np.ones(p.shape[:-1], dtype=bool)
    if "indices" in f:
        idx = stored_indices(codec, f, C)
        kept = np.take_along_axis(d, idx, axis=-1)
        others = d.copy()
        np.put_along_axis(others, idx, -np.inf, axis=-1)
        ok = kept.min(-1) > others.max(-1, initial=-np.inf)
        ok &= (np.diff(kept, axis=-1) < 0).all(-1)
    for name in f:
        a, b = f[name][ok], f2[name][ok]
        if name in ("probs", "logits") and (codec.name in NOT_FIXED_POINT or key(codec) in NOT_FIXED_POINT):
            continue
        if name == "tail_mean":  # the decoded tail is flat: its mean log-probability is log(r / n), not the teacher's
            continue
        np.testing.assert_array_equal(a, b, err_msg=f"field {name}")
    if codec_dtype(codec) == "q8":  # re-quantizing moves each stored value by < one q8 step (the tail absorbs them)
        d2 = codec.decode(f2, C)
        if "indices" in f:
            d2, d = np.take_along_axis(d2, idx, -1), np.take_along_axis(d, idx, -1)
        np.testing.assert_allclose(d2[ok], d[ok], rtol=2 * codecs.Q8_REL, atol=1e-4)
    else:
        np.testing.assert_allclose(codec.decode(f2, C)[ok], d[ok], atol=SUM_TOL[codec_dtype(codec)])


@HSET
@given(p=probs_cases)
def test_all_argmax_codecs_agree(p):
    want = np.argmax(p, axis=-1)
    got = {
        "hard": Hard().encode(p)["indices"],
        "smoothing": Smoothing().encode(p)["indices"],
        "ms": MarginalSmoothing(k=3).encode(p)["indices"][..., 0],
        "mr": MarginalReNorm(k=5, dtype="float32").encode(p)["indices"][..., 0],
    }
    for name, idx in got.items():
        np.testing.assert_array_equal(idx.astype(np.int64), want, err_msg=name)
    for name in NAMES:  # every registered codec that stores an argmax / top-k agrees too
        codec = REGISTRY[name]()
        f = codec.encode(p)
        if "indices" in f:
            np.testing.assert_array_equal(stored_indices(codec, f, p.shape[-1])[..., 0], want)


def test_ties_go_to_the_lowest_index():
    p = np.array([[0.1, 0.3, 0.3, 0.1, 0.1, 0.1]], dtype=np.float32)
    assert Hard().encode(p)["indices"].tolist() == [1]
    assert MarginalSmoothing(k=4).encode(p)["indices"].tolist() == [[1, 2, 0, 3]]
    assert MarginalReNorm(k=4).encode(torch.from_numpy(p))["indices"].long().tolist() == [[1, 2, 0, 3]]


# ----------------------------------------------------------------------------- numpy / torch
@codec_param
@HSET
@given(p=probs_cases)
def test_numpy_and_torch_agree(codec, p):
    C = p.shape[-1]
    fn, ft = codec.encode(inp(codec, p)), codec.encode(inp(codec, torch.from_numpy(p)))
    assert list(fn) == list(ft) == list(codec.fields(C))
    # bit-identical, except the logits codec, whose exp/log may differ in the last bit (base.py contract)
    same = np.testing.assert_array_equal if codec.input == "probs" else \
        (lambda a, b, **kw: np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-30, **kw))
    for name in fn:
        assert isinstance(ft[name], torch.Tensor)
        if codec.input == "probs":
            same(ft[name].numpy(), fn[name])
        elif ft[name].dtype.is_floating_point:  # float32 log-softmax 1 ulp apart may round 1 ulp apart in storage
            a, b = ft[name].numpy(), fn[name]
            ulp = np.spacing(np.abs(b)).astype(np.float64)
            np.testing.assert_array_less(np.abs(a.astype(np.float64) - b), ulp * 1.01 + 1e-30)
            ft[name] = torch.from_numpy(fn[name])
        else:  # a q8 code may differ by one step where exp differs at a grid boundary
            assert np.abs(ft[name].numpy().astype(int) - fn[name].astype(int)).max(initial=0) <= 1
            ft[name] = torch.from_numpy(fn[name])
    dn, dt = codec.decode(fn, C), codec.decode(ft, C)
    assert isinstance(dt, torch.Tensor) and dt.dtype == torch.float32
    same(dt.numpy(), dn)
    np.testing.assert_allclose(codec.kept_mass(ft).numpy(), codec.kept_mass(fn), rtol=0, atol=1e-6)


@pytest.mark.skipif(not cuda_available(), reason="needs CUDA")
@codec_param
def test_cuda_matches_cpu(codec):
    p = make_probs(0, (4, 3), 257)
    C = p.shape[-1]
    fc, fg = codec.encode(inp(codec, torch.from_numpy(p))), codec.encode(inp(codec, torch.from_numpy(p).cuda()))
    for name in fc:
        assert fg[name].is_cuda
        assert torch.equal(fg[name].cpu(), fc[name])
    dg = codec.decode(fg, C)
    assert dg.is_cuda
    torch.testing.assert_close(dg.cpu(), codec.decode(fc, C), rtol=0, atol=1e-6)


@codec_param
@pytest.mark.parametrize("lead", [(), (0,), (7,), (2, 3), (2, 1, 4)])
@pytest.mark.parametrize("in_dtype", [np.float16, np.float32, np.float64])
def test_leading_dims_and_input_dtypes(codec, lead, in_dtype):
    p = make_probs(1, lead, 40, dtype=in_dtype)
    f = codec.encode(inp(codec, p))
    d = codec.decode(f, 40)
    assert d.shape == lead + (40,) and d.dtype == np.float32
    assert codec.kept_mass(f).shape == lead and codec.kept_mass(f).dtype == np.float32
    dt = codec.decode(codec.encode(inp(codec, torch.from_numpy(p))), 40)
    assert tuple(dt.shape) == lead + (40,)


def test_encode_does_not_alias_input():
    p = make_probs(2, (3,), 8, dtype=np.float16)
    f = Full().encode(p)
    f["probs"][...] = 0
    assert p.sum() > 0


def test_kept_mass():
    p = make_probs(3, (5,), 30)
    f = MarginalSmoothing(k=4, dtype="float32").encode(p)
    np.testing.assert_allclose(MarginalSmoothing(k=4).kept_mass(f), np.sort(p, -1)[:, ::-1][:, :4].sum(-1), rtol=1e-6)
    np.testing.assert_allclose(Full().kept_mass(Full().encode(p)), 1.0, atol=2e-3)
    np.testing.assert_allclose(Smoothing().kept_mass(Smoothing().encode(p)), p.max(-1), rtol=1e-3)
    assert np.isnan(Hard().kept_mass(Hard().encode(p))).all()


# ----------------------------------------------------------------------------- fields / index dtype
def test_index_dtype_switch():
    assert index_dtype(1) == index_dtype(65536) == "uint16"
    assert index_dtype(65537) == "int32"


@codec_param
def test_large_num_classes_use_int32(codec):
    C = 70000
    p = np.full((2, C), 0.5 / (C - 2), dtype=np.float32)
    p[0, 69999], p[0, 66000] = 0.3, 0.2
    p[1, 65536], p[1, 3] = 0.3, 0.2
    f = codec.encode(inp(codec, p))
    if "indices" in f:
        assert codec.fields(C)["indices"].dtype == "int32" and f["indices"].dtype == np.int32
        assert stored_indices(codec, f, C)[:, 0].tolist() == [69999, 65536]
    d = codec.decode(f, C)
    assert d.shape == (2, C)
    if codec.keyed:  # a sampled label's argmax is a random draw: its mass lies exactly on the head and the draws
        assert codec.fields(C)["sample_indices"].dtype == "int32" and f["sample_indices"].dtype == np.int32
        for r in range(2):
            listed = set(f["sample_indices"][r][f["sample_counts"][r] > 0].tolist())
            listed |= set(f["indices"][r].tolist()) if "indices" in f else set()
            assert set(np.flatnonzero(d[r]).tolist()) == listed
    else:
        assert d[0].argmax() == 69999 and d[1].argmax() == 65536
    ft = codec.encode(inp(codec, torch.from_numpy(p)))
    np.testing.assert_allclose(codec.decode(ft, C).numpy(), d, atol=1e-7)


def test_fields_and_raw_bytes():
    assert MarginalSmoothing().fields(1000) == {"indices": FieldSpec((5,), "uint16"),
                                                "probs": FieldSpec((5,), "float16")}
    assert list(Smoothing().fields(10)) == ["indices", "probs"]
    assert Full().raw_bytes_per_crop(1000) == 2000
    assert Full(dtype="float32").raw_bytes_per_crop(1000) == 4000
    assert Hard().raw_bytes_per_crop(1000) == 2 and Hard().raw_bytes_per_crop(70000) == 4
    assert Smoothing().raw_bytes_per_crop(1000) == 4
    assert MarginalReNorm(k=10, dtype="float32").raw_bytes_per_crop(1000) == 60


# ----------------------------------------------------------------------------- config / registry
@codec_param
def test_config_json_and_repr_round_trip(codec):
    cfg = codec.get_config()
    assert cfg["name"] == codec.name and REGISTRY[codec.name] is type(codec)
    text = json.dumps(cfg)
    cfg2 = json.loads(text)
    assert cfg2 == cfg
    snapshot = dict(cfg2)
    back = from_config(cfg2)
    assert cfg2 == snapshot, "from_config must not modify its input"
    assert back == codec and hash(back) == hash(codec) and back.get_config() == cfg
    assert eval(repr(codec), vars(codecs)) == codec


def test_equality_is_by_config():
    assert MarginalSmoothing(k=5) == MarginalSmoothing()
    assert MarginalSmoothing(k=5) != MarginalSmoothing(k=6)
    assert MarginalSmoothing(k=5) != MarginalReNorm(k=5)
    assert Full() != Full(dtype="float32")


def test_get_codec_aliases():
    assert get_codec("marginal_smoothing", k=3) == MarginalSmoothing(k=3)
    assert get_codec("Marginal-Smoothing") == MarginalSmoothing()
    for alias in ("marginal_renorm", "marginal-renorm", "mrn", "mr"):
        assert get_codec(alias) == MarginalReNorm()
    assert get_codec("one-hot") == Hard()
    assert get_codec("smooth", dtype="float32") == Smoothing(dtype="float32")
    assert get_codec("full") == Full()


def test_codecs_are_frozen():
    c = MarginalSmoothing()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.k = 3


# ----------------------------------------------------------------------------- errors
def test_k_errors():
    with pytest.raises(ValidationError, match=r"k must be >= 1, got 0"):
        MarginalSmoothing(k=0)
    with pytest.raises(TypeError, match=r"k must be an int, got float"):
        MarginalReNorm(k=2.0)
    with pytest.raises(TypeError, match=r"k must be an int, got bool"):
        MarginalReNorm(k=True)
    assert MarginalSmoothing(k=np.int64(3)).get_config()["k"] == 3
    c = MarginalSmoothing(k=5)
    p = make_probs(0, (2,), 4)
    with pytest.raises(ValidationError, match=r"k <= num_classes, got k=5 > num_classes=4"):
        c.fields(4)
    with pytest.raises(ValidationError, match=r"k=5 > num_classes=4"):
        c.encode(p)
    with pytest.raises(ValidationError, match=r"k=5 > num_classes=4"):
        c.decode({"indices": np.zeros((2, 5), np.uint16), "probs": np.zeros((2, 5), np.float16)}, 4)


def test_dtype_errors():
    with pytest.raises(ValidationError, match=r"dtype must be one of .*float16.*got 'float64'"):
        Full(dtype="float64")
    with pytest.raises(TypeError, match=r"dtype must be a str, got type"):
        Smoothing(dtype=np.float16)
    with pytest.raises(TypeError):
        Hard(dtype="float16")


def test_registry_errors():
    with pytest.raises(ValidationError, match=r"codec name must be one of .*got 'topk'"):
        get_codec("topk")
    with pytest.raises(ValidationError, match=r"got 'nope'"):
        from_config({"name": "nope"})
    with pytest.raises(ValidationError, match=r"must have a 'name' key"):
        from_config({"k": 5})
    with pytest.raises(ValidationError, match=r"parameters must be in \['k', 'dtype'\]\. Got unknown \['kk'\]"):
        from_config({"name": "ms", "kk": 5})
    with pytest.raises(TypeError, match=r"must be a dict"):
        from_config("ms")
    with pytest.raises(TypeError, match=r"LabelCodec subclass"):
        codecs.register_codec(dict)


def test_decode_input_errors():
    c = MarginalSmoothing(k=2)
    good = c.encode(make_probs(0, (3,), 6))
    with pytest.raises(ValidationError, match=r"missing \['probs'\]"):
        c.decode({"indices": good["indices"]}, 6)
    with pytest.raises(ValidationError, match=r"must lie in \[0, 6\), got values in \[6, 6\]"):
        c.decode({"indices": np.full((3, 2), 6, np.uint16), "probs": good["probs"]}, 6)
    for dt in (np.int64, np.int8, ">i4", np.int32):  # signed: negatives are out of range too (one reduction)
        bad = good["indices"].astype(dt)
        bad[1, 0] = -3
        with pytest.raises(ValidationError, match=r"must lie in \[0, 6\), got values in \[-3, "):
            c.decode({"indices": bad, "probs": good["probs"]}, 6)
    with pytest.raises(ValidationError, match=r"got values in \[0, 70000\]"):
        c.decode({"indices": np.array([[0, 70000]] * 3, ">u4"), "probs": good["probs"]}, 6)
    with pytest.raises(ValidationError, match=r"trailing shape \(2,\), got shape \(3, 3\)"):
        c.decode({"indices": good["indices"], "probs": np.zeros((3, 3), np.float16)}, 6)
    with pytest.raises(ValidationError, match=r"share leading shape"):
        c.decode({"indices": good["indices"], "probs": np.zeros((4, 2), np.float16)}, 6)
    with pytest.raises(ValidationError, match=r"integer dtype"):
        c.decode({"indices": good["indices"].astype(np.float32), "probs": good["probs"]}, 6)
    with pytest.raises(ValidationError, match=r"field 'probs' must have a floating dtype, got int32"):
        c.decode({"indices": good["indices"], "probs": good["indices"].astype(np.int32)}, 6)
    with pytest.raises(TypeError, match=r"must all be numpy or all torch, got a mix"):
        c.decode({"indices": good["indices"], "probs": torch.from_numpy(good["probs"])}, 6)
    with pytest.raises(TypeError, match=r"num_classes must be a positive integer. Got 6.0 \(float\)"):
        c.decode(good, 6.0)
    with pytest.raises(TypeError, match=r"probs must be a numpy.ndarray or torch.Tensor, got list"):
        c.encode([[0.5, 0.5]])


@pytest.mark.parametrize("to", [lambda a: a, lambda a: torch.from_numpy(a)], ids=["numpy", "torch"])
def test_validate_probs(to):
    p = make_probs(0, (2, 3), 10)
    validate_probs(to(p), 10)
    validate_probs(to(p.astype(np.float16)), 10)
    cases = [
        ((2, 1, 4), np.nan, r"must be finite, got nan at row \(2, 1\) class 4"),
        ((1, 2, 0), np.inf, r"must be finite, got inf"),
        ((0, 0, 3), -0.01, r"must be >= 0, got -0.01.* at row \(0, 0\) class 3"),
    ]
    p = make_probs(0, (3, 3), 10)
    for where, value, msg in cases:
        bad = p.copy()
        bad[where] = value
        with pytest.raises(ValidationError, match=msg):
            validate_probs(to(bad), 10)
    bad = p.copy()
    bad[1, 2] *= 1.01
    with pytest.raises(ValidationError, match=r"sum to 1 within atol=0.001, got sum 1.01 at row \(1, 2\)"):
        validate_probs(to(bad), 10)
    validate_probs(to(bad), 10, atol=0.02)
    with pytest.raises(ValidationError, match=r"last dim must equal num_classes=11, got shape \(3, 3, 10\)"):
        validate_probs(to(p), 11)
    with pytest.raises(ValidationError, match=r"ndim >= 1"):
        validate_probs(to(np.array(1.0, dtype=np.float32)), 1)
    with pytest.raises(ValidationError, match=r"floating dtype"):
        validate_probs(to(np.eye(4, dtype=np.int64)), 4)
    validate_probs(to(np.zeros((0, 10), np.float32)), 10)
    one = np.array([1.0], np.float32)
    validate_probs(to(one), 1)
    bad = one * 0.5
    with pytest.raises(ValidationError, match=r"at row \(\)"):
        validate_probs(to(bad), 1)


def test_single_class_and_k_equals_c():
    p = np.ones((3, 1), np.float32)
    for codec in (Full(), Hard(), Smoothing(), MarginalSmoothing(k=1), MarginalReNorm(k=1)):
        np.testing.assert_array_equal(codec.decode(codec.encode(p), 1), p)
    p = make_probs(5, (4,), 6)
    for codec in (MarginalSmoothing(k=6, dtype="float32"), MarginalReNorm(k=6, dtype="float32")):
        np.testing.assert_allclose(codec.decode(codec.encode(p), 6), p, rtol=1e-6)


def test_mr_zero_mass_rows_are_uniform_over_topk():
    f = {"indices": np.array([[2, 0]], np.uint16), "probs": np.zeros((1, 2), np.float16)}
    np.testing.assert_array_equal(MarginalReNorm(k=2).decode(f, 4), [[0.5, 0, 0.5, 0]])
    ft = {k: torch.from_numpy(v) for k, v in f.items()}
    np.testing.assert_array_equal(MarginalReNorm(k=2).decode(ft, 4).numpy(), [[0.5, 0, 0.5, 0]])


def test_decode_of_numpy_subclasses_and_empty_leads_equals_plain_arrays(tmp_path):
    """decode's fast path takes plain ndarrays; subclasses (a memory-mapped field) take the general checks and
    give the same rows; the scatter helper agrees with put_along_axis for any leading shape, empty included."""
    from fkdstore.codecs import _array as A

    c = MarginalSmoothing(k=3)
    f = c.encode(make_probs(1, (2, 4), 12))
    mm = np.lib.format.open_memmap(tmp_path / "i.npy", mode="w+", dtype=f["indices"].dtype, shape=f["indices"].shape)
    mm[...] = f["indices"]
    np.testing.assert_array_equal(c.decode({"indices": mm, "probs": f["probs"]}, 12), c.decode(f, 12))
    mm[0, 0, 0] = 12
    with pytest.raises(ValidationError, match=r"must lie in \[0, 12\)"):
        c.decode({"indices": mm, "probs": f["probs"]}, 12)
    rng = np.random.default_rng(0)
    for lead in ((), (5,), (2, 3), (0,), (0, 4)):
        idx = np.argsort(rng.random(lead + (12,)), -1)[..., :3].astype(np.uint16)
        vals = rng.random(lead + (3,)).astype(np.float32)
        want = np.zeros(lead + (12,), np.float32)
        np.put_along_axis(want, idx.astype(np.intp), vals, -1)
        np.testing.assert_array_equal(A.scatter_into(np.zeros(lead + (12,), np.float32), idx, vals), want)
    assert c.decode({k: v[:0] for k, v in f.items()}, 12).shape == (0, 4, 12)
