"""The sampled-label codec: unbiasedness (statistical, fixed seeds), draws per the documented rule, determinism and
subset reproducibility, decode at T != 1, stored-field rules, strict configs, a store round trip."""
from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from optional_torch import HAVE_TORCH, torch

import fkdstore
from fkdstore.codecs import REGISTRY, Sampled, crop_keys, from_config, get_codec
from fkdstore.codecs.sampled import content_keys
from fkdstore.errors import ValidationError

C = 40
MASK = 2**64 - 1
G = 0x9E3779B97F4A7C15


def teacher_logits(seed: int, rows: int = 1, C: int = C, scale: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, (rows, C))
    z[:, rng.integers(0, C)] += 4  # a confident top class, a long tail
    return z.astype(np.float32)


def softmax(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("codec", [Sampled(s=8, dtype="float32"), Sampled(s=16, k=3, dtype="float32"),
                                   Sampled(s=4, k=1, temperature=3.0, dtype="float32"),
                                   Sampled(s=12, input="probs", temperature=0.5, dtype="float32")], ids=repr)
def test_mean_of_decoded_labels_converges_to_the_teacher(codec):
    """n crops of one teacher output, each with its own key: per class, |mean - p| <= 5 standard errors
    ``r sqrt(pi (1 - pi) / (S n))`` (tail share ``pi = p / r``), and the summed counts pass a chi-square test at
    6 standard deviations of chi2(df). A biased estimator (e.g. top-K truncation) fails both by far."""
    n = 6000
    z = teacher_logits(0)
    x = z if codec.input == "logits" else softmax(z).astype(np.float32)
    p = softmax(z, codec.temperature)[0]  # the generation distribution (probs input: x ** (1 / T) renormalised)
    f = codec.encode(np.repeat(x, n, 0), keys=crop_keys(np.arange(n), 3))
    mean = codec.decode(f, C).astype(np.float64).mean(0)
    head = np.zeros(C, bool)
    if codec.k:
        head[f["indices"][0].astype(int)] = True
        np.testing.assert_allclose(mean[head], p[head], rtol=1e-6)  # exact head
    r = p[~head].sum()
    pi = p / r
    se = r * np.sqrt(pi * (1 - pi) / (codec.s * n))
    assert (np.abs(mean - p)[~head] <= 5 * se[~head] + 1e-9).all()
    counts = np.zeros(C)
    np.add.at(counts, f["sample_indices"].astype(int).reshape(-1), f["sample_counts"].reshape(-1))
    expect = pi[~head] * codec.s * n
    chi2 = ((counts[~head] - expect) ** 2 / expect).sum()
    df = (~head).sum() - 1
    assert chi2 < df + 6 * math.sqrt(2 * df)
    # the same number of crops stored as MS top-K of equal bytes is biased far beyond that tolerance
    trunc = np.argsort(-p)[: codec.s]
    ms = np.full(C, (1 - p[trunc].sum()) / (C - codec.s))
    ms[trunc] = p[trunc]
    assert (np.abs(ms - p)[~head] > 5 * se[~head] + 1e-9).any()


def test_varied_teachers_unbiased_in_the_mean():
    """Different teacher rows: the decoded - teacher errors average to 0 within 5 standard errors per class."""
    n, codec = 4000, Sampled(s=16, k=2, dtype="float32")
    z = teacher_logits(1, rows=n)
    f = codec.encode(z, keys=crop_keys(np.arange(n) // 7, np.arange(n) % 7))
    err = codec.decode(f, C).astype(np.float64) - softmax(z)
    se = err.std(0) / math.sqrt(n)
    assert (np.abs(err.mean(0)) <= 5 * se + 1e-7).all()


def test_decode_at_another_temperature_uses_importance_weights():
    """With logp=True, decode(T) estimates softmax(z / (T_g T)): exact at T = 1, self-normalised importance
    sampling (consistent, O(1/S) bias) otherwise, so the crop-averaged error shrinks with S."""
    z = teacher_logits(2)
    n = 3000
    errs = {}
    for s in (8, 64):
        codec = Sampled(s=s, k=2, logp=True, temperature=2.0, dtype="float32")
        f = codec.encode(np.repeat(z, n, 0), keys=crop_keys(np.arange(n), 0))
        d1 = codec.decode(f, C)
        np.testing.assert_allclose(d1, Sampled(s=s, k=2, temperature=2.0, dtype="float32").decode(f, C), rtol=0)
        for T in (0.5, 3.0):
            d = codec.decode(f, C, temperature=T).astype(np.float64)
            np.testing.assert_allclose(d.sum(-1), 1, atol=1e-5)
            errs[s, T] = np.abs(d.mean(0) - softmax(z, 2.0 * T)[0]).sum()
    for T in (0.5, 3.0):
        assert errs[64, T] < errs[8, T] and errs[64, T] < 0.02
    no_logp = Sampled(s=8, k=2, temperature=2.0)
    with pytest.raises(ValidationError, match=r"decodes only at temperature 1 .* write the store with logp=True"):
        no_logp.decode(no_logp.encode(z, keys=crop_keys(np.zeros(1, int), 0)), C, temperature=2.0)


# ----------------------------------------------------------------------------- the draw rule
def _mix(v: int) -> int:
    v ^= v >> 30
    v = (v * 0xBF58476D1CE4E5B9) & MASK
    v ^= v >> 27
    v = (v * 0x94D049BB133111EB) & MASK
    return v ^ (v >> 31)


def ref_encode(codec: Sampled, z_row: np.ndarray, image: int, slot: int):
    """The module docstring's rule, per row, with Python ints and floats."""
    key = _mix((_mix(((image + 1) * G) & MASK) + (slot + 1) * G) & MASK)
    row = _mix(key ^ _mix((codec.seed + G) & MASK))
    t = [float(v) / codec.temperature for v in z_row]
    head = sorted(range(len(t)), key=lambda i: (-float(z_row[i]), i))[: codec.k or 0]
    c = [0.0 if i in head else math.exp(v - max(t)) for i, v in enumerate(t)]
    F, acc = [], 0.0
    for v in c:
        acc += v
        F.append(acc)
    draws = []
    for d in range(codec.s):
        u = (_mix((row + (d + 1) * G) & MASK) >> 11) * 2.0**-53
        i = bisect.bisect_right(F, u * F[-1])
        draws.append(i if i < len(F) else max(j for j, v in enumerate(c) if v > 0))
    tally = {}
    for i in draws:
        tally[i] = tally.get(i, 0) + 1
    entries = sorted(tally.items(), key=lambda t: (-t[1], t[0]))
    return head, entries


@pytest.mark.parametrize("codec", [Sampled(s=9, seed=5), Sampled(s=20, k=4, temperature=0.7, seed=2**64 - 1)],
                         ids=repr)
def test_draws_follow_the_documented_rule(codec):
    z = teacher_logits(3, rows=12, scale=1.0)
    images, slots = np.arange(12) * 1000 + 7, np.arange(12) % 5
    f = codec.encode(z, keys=crop_keys(images, slots))
    for j in range(12):
        head, entries = ref_encode(codec, z[j], int(images[j]), int(slots[j]))
        if codec.k:
            assert f["indices"][j].tolist() == head
        w = codec.width(C)
        ids = [i for i, _ in entries] + [0] * (w - len(entries))
        cnt = [c for _, c in entries] + [0] * (w - len(entries))
        assert f["sample_indices"][j].tolist() == ids and f["sample_counts"][j].tolist() == cnt


def test_crop_keys_formula_and_errors():
    got = crop_keys(np.array([[0], [5]]), np.array([[0, 1, 2]]))
    assert got.shape == (2, 3) and got.dtype == np.uint64
    assert int(got[1, 2]) == _mix((_mix((6 * G) & MASK) + 3 * G) & MASK)
    assert len(set(crop_keys(np.arange(300)[:, None], np.arange(200)[None]).ravel().tolist())) == 60000
    with pytest.raises(ValidationError, match=r"crop_keys images must be integers >= 0"):
        crop_keys(np.array([-1]), 0)


# ----------------------------------------------------------------------------- determinism
def test_any_subset_of_rows_reproduces_its_draws():
    codec = Sampled(s=16, k=2, logp=True)
    B, M = 5, 6
    z = teacher_logits(4, rows=B * M).reshape(B, M, C)
    idx = np.array([3, 9, 4, 0, 7])
    keys = crop_keys(idx[:, None], np.arange(M)[None])
    full = codec.encode(z, keys=keys)
    rng = np.random.default_rng(0)
    for _ in range(5):  # other batches: a random subset, shuffled, flat or 2-D
        rows = rng.choice(B * M, size=7, replace=False)
        sub = codec.encode(z.reshape(-1, C)[rows].reshape(7, 1, C), keys=keys.reshape(-1)[rows].reshape(7, 1))
        for name in full:
            np.testing.assert_array_equal(sub[name][:, 0], full[name].reshape(B * M, *full[name].shape[2:])[rows])
    again = codec.encode(z, keys=keys)
    for name in full:
        np.testing.assert_array_equal(again[name], full[name])
    other = Sampled(s=16, k=2, logp=True, seed=1).encode(z, keys=keys)
    assert not np.array_equal(other["sample_indices"], full["sample_indices"])


@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_torch_input_gives_the_same_draws():
    codec = Sampled(s=8, k=3)
    z = teacher_logits(5, rows=6).reshape(2, 3, C)
    keys = crop_keys(np.arange(2)[:, None], np.arange(3)[None])
    fn, ft = codec.encode(z, keys=keys), codec.encode(torch.from_numpy(z), keys=torch.from_numpy(keys))  # uint64
    for name in fn:
        assert isinstance(ft[name], torch.Tensor)
        np.testing.assert_array_equal(ft[name].numpy(), fn[name])
    np.testing.assert_allclose(codec.decode(ft, C).numpy(), codec.decode(fn, C), rtol=1e-7)


def test_keyless_fallback_depends_on_the_row_only():
    codec = Sampled(s=16)
    z = teacher_logits(6, rows=10)
    a = codec.encode(z[[2, 5, 7]])
    b = codec.encode(z[[7, 0, 2, 9]])
    np.testing.assert_array_equal(a["sample_indices"][[0, 2]], b["sample_indices"][[2, 0]])
    np.testing.assert_array_equal(a["sample_counts"][[0, 2]], b["sample_counts"][[2, 0]])
    keyed = codec.encode(z[[2, 5, 7]], keys=content_keys(z[[2, 5, 7]]))
    np.testing.assert_array_equal(keyed["sample_indices"], a["sample_indices"])


def test_keys_are_checked():
    codec, z = Sampled(), teacher_logits(0, rows=4).reshape(2, 2, C)
    with pytest.raises(ValidationError, match=r"keys must have shape x\.shape\[:-1\] = \(2, 2\)"):
        codec.encode(z, keys=np.zeros(4, np.uint64))
    with pytest.raises(TypeError, match=r"keys must have an integer dtype"):
        codec.encode(z, keys=np.zeros((2, 2)))
    with pytest.raises(ValidationError, match=r"keys must be in \[0, 2\*\*64\)\. Got -1"):
        codec.encode(z, keys=-np.ones((2, 2), np.int64))
    get_codec("ms").encode(softmax(z).astype(np.float32), keys=np.zeros((2, 2), np.uint64))  # checked, ignored


# ----------------------------------------------------------------------------- fields, configs, rules
def test_fields_sizes_and_dtypes():
    assert Sampled(s=16).fields(1000) == {"sample_indices": fkdstore.codecs.FieldSpec((16,), "uint16"),
                                          "sample_counts": fkdstore.codecs.FieldSpec((16,), "uint8")}
    assert [Sampled(s=s).raw_bytes_per_crop(1000) for s in (8, 16, 32)] == [24, 48, 96]
    assert Sampled(s=8, k=2).raw_bytes_per_crop(1000) == 8 + 24
    assert Sampled(s=8, k=2, dtype="q8", logp=True).raw_bytes_per_crop(1000) == 6 + 24 + 16
    assert Sampled(s=300).fields(1000)["sample_counts"].dtype == "uint16"
    assert Sampled(s=300, k=5).width(40) == 35 and Sampled(s=8).fields(70000)["sample_indices"].dtype == "int32"
    assert Sampled(s=8, k=3, temperature=4).describe() == "sampled S=8 K=3 T=4"
    assert Sampled(s=8, k=3).paper_values_per_crop(1000) == 5 + 6 + 16
    with pytest.raises(ValidationError, match=r"sampled needs k < num_classes \(a tail to draw from\), got k=40"):
        Sampled(k=40).fields(40)


def test_configs_are_strict_and_round_trip():
    c = Sampled(s=12, k=3, temperature=2.5, input="probs", dtype="q8", logp=True, seed=7)
    cfg = c.get_config()
    assert cfg == {"name": "sampled", "s": 12, "k": 3, "temperature": 2.5, "input": "probs", "dtype": "q8",
                   "logp": True, "seed": 7}
    assert from_config(cfg) == c and REGISTRY["sampled"] is Sampled
    for missing in ("seed", "temperature", "k"):
        with pytest.raises(ValidationError, match=rf"config must spell every parameter .*missing \['{missing}'\]"):
            from_config({n: v for n, v in cfg.items() if n != missing})
    with pytest.raises(ValidationError,
                       match=r"codec .sampled. parameters must be in \[.*\]\. Got unknown \[.draws.\]"):
        from_config(cfg | {"draws": 3})
    assert get_codec("sampled", s=4) == Sampled(s=4)  # building by name keeps the defaults
    for kw, exc, msg in [({"s": 0}, ValidationError, r"Sampled\.s"), ({"s": 70000}, ValidationError, r"Sampled\.s"),
                         ({"s": True}, TypeError, r"Sampled\.s must be an int"),
                         ({"temperature": 0}, ValidationError, r"temperature must be a finite number > 0"),
                         ({"input": "scores"}, ValidationError, r"Sampled\.input must be one of"),
                         ({"logp": 1}, TypeError, r"Sampled\.logp must be a bool"),
                         ({"seed": -1}, ValidationError, r"Sampled\.seed"),
                         ({"k": 0}, ValidationError, r"k must be >= 1")]:
        with pytest.raises(exc, match=msg):
            Sampled(**kw)


def test_stored_field_rules():
    codec = Sampled(s=6, k=2, logp=True)
    z = teacher_logits(7, rows=3, scale=0.3)
    f = codec.encode(z, keys=crop_keys(np.arange(3), 0))
    assert codec.field_problems(f, C) == []
    assert (f["sample_counts"][:, 0] >= 1).all() and (f["sample_counts"][:, -1] == 0).any()
    pad = int(np.flatnonzero(f["sample_counts"][:, -1] == 0)[0])  # a crop with a padding entry

    def broken(change):
        g = {k: v.copy() for k, v in f.items()}
        change(g)
        return [rule for rule, _ in codec.field_problems(g, C)]

    last = lambda g: int(np.flatnonzero(g["sample_counts"][0])[-1])  # noqa: E731
    assert broken(lambda g: g["sample_counts"].__setitem__((0, 0), 9))[0].startswith("sample counts summing to s=6")
    padded = broken(lambda g: g["sample_indices"].__setitem__((pad, -1), 5))
    assert padded == ["padding entries (count 0) with class index 0"]
    assert "distinct sampled classes" in broken(lambda g: g["sample_indices"].__setitem__((0, last(g)),
                                                                                          g["sample_indices"][0, 0]))
    assert "sampled classes outside the head" in broken(lambda g: g["sample_indices"].__setitem__((0, 0),
                                                                                                  g["indices"][0, 0]))
    swap = lambda g: g["sample_indices"].__setitem__((pad, [1, 2]), g["sample_indices"][pad, [2, 1]])  # noqa: E731
    assert f["sample_counts"][pad, 1] == f["sample_counts"][pad, 2]  # equal counts: their ids must ascend
    assert broken(swap) == ["sample entries ordered by count descending, then class index ascending"]
    assert broken(lambda g: g["sample_counts"].__setitem__((pad, slice(None)), g["sample_counts"][pad, ::-1])) != []
    assert broken(lambda g: g["sample_indices"].__setitem__((1, 0), 400)) == [f"sample indices in [0, {C})"]
    with pytest.raises(ValidationError, match=r"'sample_indices' must lie in \[0, 40\), got values in \[0, 400\]"):
        g = {k: v.copy() for k, v in f.items()}
        g["sample_indices"][1, 0] = 400
        codec.decode(g, C)
    with pytest.raises(ValidationError, match=r"sampled fields must hold sample counts summing"):
        codec.validate_fields({**f, "sample_counts": f["sample_counts"] * 2}, C)


def test_a_tail_without_mass_draws_nothing():
    codec = Sampled(s=5, k=2, input="probs", dtype="float32")
    p = np.zeros((2, 6), np.float32)
    p[:, 1], p[:, 4] = 0.75, 0.25
    f = codec.encode(p, keys=crop_keys(np.arange(2), 0))
    assert (f["sample_counts"] == 0).all() and (f["sample_indices"] == 0).all()
    assert codec.field_problems(f, 6) == []
    np.testing.assert_allclose(codec.decode(f, 6), p, atol=1e-7)
    np.testing.assert_allclose(codec.kept_mass(f), 1.0)


def test_conversion_is_refused_but_the_head_converts_to_ms():
    from fkdstore.codecs import convert_fields
    from fkdstore.errors import ConversionError

    z = teacher_logits(8, rows=4)
    f = Sampled(s=8, k=4, dtype="float32").encode(z, keys=crop_keys(np.arange(4), 0))
    ms = convert_fields(Sampled(s=8, k=4, dtype="float32"), get_codec("ms", k=3, dtype="float32"), f, C)
    np.testing.assert_array_equal(ms["indices"], f["indices"][:, :3])
    with pytest.raises(ConversionError, match=r"labels are drawn by the teacher-runner"):
        convert_fields(get_codec("full"), Sampled(), get_codec("full").encode(softmax(z).astype(np.float32)), C)


# ----------------------------------------------------------------------------- store round trip
def test_store_round_trip_with_keys_and_writer_put(tmp_path):
    N, M = 5, 4
    codec = Sampled(s=8, k=2, logp=True)
    z = teacher_logits(9, rows=N * M).reshape(N, M, C)
    boxes = np.tile(np.array([0, 0, 8, 8]), (N, M, 1))
    flips = np.zeros((N, M), bool)
    kw = dict(num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=[f"{i}.png" for i in range(N)],
              image_sizes=np.full((N, 2), 16))
    with fkdstore.write(tmp_path / "keyed", **kw) as w:  # what a teacher-runner does: encode with crop keys
        for part in (np.array([3, 1]), np.array([0, 2, 4])):
            fields = codec.encode(z[part], keys=crop_keys(part[:, None], np.arange(M)[None]))
            w.put_fields(part, boxes[part], flips[part], fields)
    with fkdstore.write(tmp_path / "put", **kw) as w:  # Writer.put encodes with the same crop keys
        w.put(np.arange(N), boxes, flips, z)
    r = fkdstore.open(tmp_path / "keyed")
    assert r.codec == codec and r.header.codec.get_config() == codec.get_config()
    rec = r.read_batch(np.arange(N))
    want = codec.encode(z, keys=crop_keys(np.arange(N)[:, None], np.arange(M)[None]))
    for name in want:
        np.testing.assert_array_equal(rec.fields[name], want[name])
    np.testing.assert_array_equal(r.decode(rec.fields), codec.decode(want, C))
    np.testing.assert_allclose(r.decode(rec.fields, temperature=2.0).sum(-1), 1, atol=1e-5)
    put = fkdstore.open(tmp_path / "put").read_batch(np.arange(N)).fields
    for name, v in want.items():
        np.testing.assert_array_equal(put[name], v)
