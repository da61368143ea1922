"""spec/format-v3.md, one named test per rule: each numbered invariant of section 4 and every other normative
statement a second implementation must follow (sections 1, 1.2, 2, 3, 7, 8, 11). Each docstring quotes the
sentence it checks. Where the spec defines a computation (canonical JSON and its checksum, the manifest tag,
the key recipe, the layout algorithm) the test re-implements it from the spec text, not from ``fkdstore``,
and compares with what fkdstore writes and reads."""

from __future__ import annotations

import json
import math
import os
import socket
from fractions import Fraction
from pathlib import Path

import crc32c
import numpy as np
import pytest
import zarr
from numcodecs import Blosc, blosc

import fkdstore
from fkdstore import ownership, storage
from fkdstore import reader as R
from fkdstore import schema as S
from fkdstore import writer as W
from fkdstore.augment import Pipeline
from fkdstore.convert import convert
from fkdstore.errors import (
    ConcurrentWriterError, CorruptChunkError, CorruptStoreError, FormatError, IncompleteStoreError, ValidationError,
)
from fkdstore.shard import MISSING
from fkdstore.verify import verify
from storeutil import create, fill, make_data
from faultutil import shard_file, shard_index, write_shard_index

GOLDEN = Path(__file__).parent / "golden" / "v1.0"
N, M, C, IPC, IPS = 10, 3, 7, 4, 8  # 2 shards; the last inner chunk (images 8-9) is partial


# ------------------------------------------------------------------------ the spec's rules, re-implemented

_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _spec_string(s: str) -> str:
    """Section 1.2: strings escaped as Python's json does; other control and all non-ASCII characters as
    lowercase \\uXXXX, above U+FFFF as a surrogate pair, '/' not escaped."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch in _ESC:
            out.append(_ESC[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp <= 0xFFFF:
            out.append("\\u%04x" % cp)
        else:
            v = cp - 0x10000
            out.append("\\u%04x\\u%04x" % (0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF)))
    out.append('"')
    return "".join(out)


def spec_canonical_json(obj) -> str:
    """Section 1.2: keys sorted by code point, no whitespace, integers in decimal, floats as Python's repr."""
    if obj is None:
        return "null"
    if obj is True or obj is False:
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        assert math.isfinite(obj)
        return repr(obj)
    if isinstance(obj, str):
        return _spec_string(obj)
    if isinstance(obj, list):
        return "[" + ",".join(spec_canonical_json(v) for v in obj) + "]"
    if isinstance(obj, dict):
        keys = sorted(obj, key=lambda k: [ord(c) for c in k])
        return "{" + ",".join(_spec_string(k) + ":" + spec_canonical_json(obj[k]) for k in keys) + "}"
    raise TypeError(type(obj))


def spec_checksum(header: dict) -> str:
    """Section 1.2: "crc32c:" + 8 lowercase hex digits over the canonical JSON without checksum, meta and
    library_version."""
    body = {k: v for k, v in header.items() if k not in ("checksum", "meta", "library_version")}
    return "crc32c:%08x" % crc32c.crc32c(spec_canonical_json(body).encode("utf-8"))


def spec_manifest_tag(path: str, c: int, chunk: np.ndarray) -> int:
    """Invariant 9: crc32c(utf8(path) || 0x00 || uint64_le(c) || D), D little-endian C order, bool as 0/1."""
    d = np.ascontiguousarray(chunk)
    d = d.view(np.uint8) if d.dtype == bool else d.astype(d.dtype.newbyteorder("<"))
    return crc32c.crc32c(path.encode("utf-8") + b"\x00" + c.to_bytes(8, "little") + d.tobytes())


def spec_key(row: np.ndarray) -> str:
    """Section 2 recipe: take row i, cut at the first zero byte (or keep all L bytes), decode UTF-8."""
    b = bytes(row)
    cut = b.find(b"\x00")
    return (b if cut < 0 else b[:cut]).decode("utf-8")


def spec_layout(n: int, row_bytes: int, m: int) -> tuple[int, int]:
    """Section 7, steps 1-5, in exact rational arithmetic."""
    def pow2_floor(x: Fraction) -> int:
        p = 1
        while 2 * p <= x:
            p *= 2
        return p

    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    ipc = max(1, min(1024, pow2_floor(Fraction(8192, row_bytes))))
    ips = max(ipc, pow2_floor(Fraction(64 * 2**20, row_bytes)))
    ips = min(ips, max(ipc, pow2_floor(Fraction(2**20, m))))
    ips = max(ips, ipc * ceil_div(n, 2048 * ipc))
    ips = min(ips, ipc * ceil_div(n, ipc))
    ips = max(ipc, ips // ipc * ipc)
    return ipc, ips


# ---------------------------------------------------------------------------------------------- helpers


def _store(tmp_path, name="s", write=None, **kw):
    d = make_data(N, M, C, seed=3)
    p = tmp_path / name
    kw.setdefault("images_per_chunk", IPC)
    kw.setdefault("images_per_shard", IPS)
    with create(p, d, **kw) as w:
        fill(w, d, order=write)
    return p, d


def _doc(p):
    return json.loads((Path(p) / "zarr.json").read_text())


def _header(p) -> dict:
    return _doc(p)["attributes"][S.ATTR_KEY]


def _rewrite_header(p, drop=(), **changes) -> None:
    """Edit the header and store a checksum computed by THIS file's spec_checksum (a valid edit)."""
    doc = _doc(p)
    h = doc["attributes"][S.ATTR_KEY]
    h.update(changes)
    for k in drop:
        h.pop(k)
    if "checksum" in h:
        h["checksum"] = spec_checksum(h)
    (Path(p) / "zarr.json").write_text(json.dumps(doc))


def _raises(cls, fn, *parts):
    with pytest.raises(cls) as e:
        fn()
    assert type(e.value) is cls, (type(e.value), str(e.value))
    for part in parts:
        assert part in str(e.value), (part, str(e.value))
    return str(e.value)


# ------------------------------------------------------------------------------- section 4: invariants


def test_invariant_01_header_written_last_interrupted_creation_is_not_a_store(tmp_path, monkeypatch):
    """"It is written **last** at creation: a group without it is not a store (an interrupted creation);
    readers MUST refuse it with a format error; writers MAY delete such an interrupted creation (and nothing
    else) before creating a store there." """
    d = make_data(N, M, C)
    p = tmp_path / "half"

    def header_step(self):  # the writer reaches the header: kill it there
        raise KeyboardInterrupt("killed before the header")

    with monkeypatch.context() as mp:
        mp.setattr(S.Header, "to_json", header_step)
        with pytest.raises(KeyboardInterrupt):
            create(p, d, images_per_chunk=IPC, images_per_shard=IPS)
    # every array already exists when the header is due: it is the last thing written
    for name in ("key", "image_size", "label", "written", "manifest", "box", "flip", "soft/indices", "soft/probs"):
        assert (p / name / "zarr.json").exists(), name
    assert S.ATTR_KEY not in _doc(p).get("attributes", {})
    _raises(FormatError, lambda: R.open(p), "not an fkdstore store")
    assert any("not an fkdstore store" in x for x in verify(p))
    with create(p, d, images_per_chunk=IPC, images_per_shard=IPS) as w:  # MAY delete it, then create
        fill(w, d)
    assert fkdstore.open(p).complete


def test_invariant_01_writer_deletes_an_interrupted_creation_and_nothing_else(tmp_path):
    """"writers MAY delete such an interrupted creation (and nothing else) before creating a store there." """
    d = make_data(N, M, C)
    foreign = tmp_path / "foreign"  # a user's Zarr group (no attributes) with common array names
    g = zarr.open_group(str(foreign), mode="w")
    g.create_array("label", shape=(2,), dtype="int32")[:] = [3, 4]
    g.create_array("image_size", shape=(2, 2), dtype="int32")[:] = 5
    before = sorted(x.relative_to(foreign) for x in foreign.rglob("*"))
    with pytest.raises(ValidationError, match="not an fkdstore store"):
        create(foreign, d)
    assert sorted(x.relative_to(foreign) for x in foreign.rglob("*")) == before


def test_invariant_02_unknown_major_refused_greater_minor_accepted(tmp_path):
    """"Readers MUST refuse a `format_version` whose major part they do not implement, and MUST accept a
    greater minor part." """
    p, d = _store(tmp_path)
    _rewrite_header(p, format_version="2.9")
    with R.open(p) as r:
        np.testing.assert_array_equal(r.read_all().box, d["boxes"])
    for version in ("3.0", "0.1", "9.0"):
        _rewrite_header(p, format_version=version)
        _raises(FormatError, lambda: R.open(p), version)


def test_invariant_03_array_metadata_checked_against_header_at_open(tmp_path):
    """"Readers MUST check the Zarr metadata of every array against the header when opening and refuse a
    mismatch (a corrupt-store error naming the array and the field)" """
    p, _ = _store(tmp_path)
    pristine = {n: (p / n / "zarr.json").read_text() for n in ("soft/probs", "box", "written", "manifest", "label")}

    def edit(name, fn):
        zj = p / name / "zarr.json"
        doc = json.loads(pristine[name])
        fn(doc)
        zj.write_text(json.dumps(doc))

    def inner(doc):
        doc["codecs"][0]["configuration"]["chunk_shape"][0] = 2

    def shard(doc):
        doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 4

    def shape(doc):
        doc["shape"][0] = N + 1

    def dtype(doc):
        doc["data_type"] = "uint32"

    def grid(doc):
        doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 4

    cases = [("soft/probs", inner, "inner chunk shape"), ("box", shard, "shard shape"), ("box", shape, "shape"),
             ("soft/probs", dtype, "dtype"), ("written", grid, "chunk shape"), ("manifest", shape, "shape"),
             ("label", dtype, "dtype")]
    for name, fn, field in cases:
        edit(name, fn)
        _raises(CorruptStoreError, lambda: R.open(p), f"array {name!r}: {field}")
        (p / name / "zarr.json").write_text(pristine[name])
    R.open(p).close()
    for name in ("flip", "manifest"):  # "The arrays are exactly those of section 2": a missing one is refused
        os.rename(p / name / "zarr.json", p / name / "gone.json")
        with pytest.raises(CorruptStoreError, match=name):
            R.open(p)
        os.rename(p / name / "gone.json", p / name / "zarr.json")


def test_invariant_04_keys_valid_utf8_nonempty_nul_free_unique(tmp_path):
    """"`key` rows are valid UTF-8, non-empty, NUL-free (except padding) and unique." """
    d = make_data(N, M, C)
    for bad, what in ((["a"] * N, "unique"), ([""] + d["keys"][1:], "non-empty"), (["a\x00b"] + d["keys"][1:], "NUL")):
        _raises(ValidationError, lambda: create(tmp_path / "w", dict(d, keys=bad)), what)
        assert not (tmp_path / "w").exists()
    p, _ = _store(tmp_path)
    g = zarr.open_group(str(p), mode="r+")
    keys = g[S.KEY][:]
    bad = keys.copy()
    bad[3, 0] = 0xFF  # not UTF-8
    g[S.KEY][:] = bad
    with R.open(p) as r:
        _raises(CorruptStoreError, lambda: r.image_keys, "array 'key'", "image 3", "UTF-8")
    assert any("array 'key'" in x and "image 3" in x for x in verify(p))
    dup = keys.copy()
    dup[5] = keys[4]
    g[S.KEY][:] = dup
    assert any("array 'key'" in x and "duplicate" in x for x in verify(p))
    empty = keys.copy()
    empty[6] = 0
    g[S.KEY][:] = empty
    assert any("array 'key'" in x and "empty key at images [6]" in x for x in verify(p))
    nul = keys.copy()
    nul[7, 1] = 0  # a NUL inside the key, not padding: the reader refuses the row rather than cut it
    g[S.KEY][:] = nul
    with R.open(p) as r:
        _raises(CorruptStoreError, lambda: r.image_keys, "array 'key'", "image 7", "NUL")
    assert any("array 'key'" in x and "image 7" in x and "NUL" in x for x in verify(p))


def test_invariant_05_boxes_inside_the_image_in_exact_integer_arithmetic(tmp_path):
    """"For every written image and slot, in exact integer arithmetic: `0 <= top`, `0 <= left`,
    `1 <= height`, `1 <= width`, `top + height <= image_size[i][0]`, `left + width <= image_size[i][1]`." """
    H, Wd = 50, 70
    edge = [-1, 0, 1, 49, 50, 51, 70, 71, 2**31 - 1, 2**62, 2**63 - 1]
    rng = np.random.default_rng(0)
    boxes = rng.choice(edge, (4000, 4))
    expected = np.array([not (0 <= t and 0 <= l and 1 <= h and 1 <= w and t + h <= H and l + w <= Wd)
                         for t, l, h, w in boxes.tolist()])  # Python ints: exact
    got = S.bad_boxes(boxes.reshape(-1, 1, 4), np.tile([H, Wd], (len(boxes), 1)))[:, 0]
    np.testing.assert_array_equal(got, expected)
    d = make_data(4, 2, 5)
    d["boxes"][:] = [1, 2, 3, 4]
    d["sizes"][:] = [H, Wd]
    d["sizes"][0] = [H, 70000]  # int32 boxes, so a negative top can be stored
    with create(tmp_path / "s", d, codec="hard") as w:
        for box in ([-1, 0, 1, 1], [0, 0, 0, 5], [1, 0, H, 1], [0, 2**63 - 1, 1, 1]):
            b = d["boxes"][:1].copy()
            b[0, 1] = box
            _raises(ValidationError, lambda: w.put([0], b, d["flips"][:1], d["probs"][:1]), "inside the image",
                    "Image 0", "slot 1")
        fill(w, d)
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    g[S.IMAGE_SIZE][2] = [1, 1]  # the stored boxes of image 2 no longer fit: verify reports it
    assert any("array 'box'" in x and "image 2" in x for x in verify(tmp_path / "s"))


def test_invariant_06_reader_returns_no_data_of_an_unwritten_image(tmp_path):
    """"Readers MUST check `written` and MUST NOT return data of an unwritten image (an incomplete-store
    error)." """
    p, d = _store(tmp_path, write=np.arange(IPS))  # shard 1 (images 8, 9) never written
    with R.open(p) as r:
        assert not r.complete
        np.testing.assert_array_equal(r.read(7).box, d["boxes"][7])
        _raises(IncompleteStoreError, lambda: r.read(9), f"image 9 ({d['keys'][9]!r}) has not been written")
        _raises(IncompleteStoreError, lambda: r.read_batch([0, 8]), "image 8", "has not been written")
        _raises(IncompleteStoreError, lambda: r.read_all(), "image 8", "has not been written")
        _raises(IncompleteStoreError, lambda: r.soft_labels(8), "image 8", "has not been written")


def test_invariant_07_chunk_and_shard_index_crc32c_verified(tmp_path):
    """"Every chunk and shard index carries a crc32c; readers MUST verify it and MUST NOT decode a chunk
    whose checksum fails." """
    p, _ = _store(tmp_path)
    f = shard_file(p, "soft/probs", 1)
    pristine = f.read_bytes()
    off, nb = (int(x) for x in shard_index(f, IPS // IPC)[0])
    raw = bytearray(pristine)
    raw[off + 1] ^= 0x01  # payload byte
    f.write_bytes(bytes(raw))
    with R.open(p) as r:
        _raises(CorruptChunkError, lambda: r.read(8), "array 'soft/probs' chunk 2", "crc32c")
    raw = bytearray(pristine)
    raw[-10] ^= 0x01  # shard index byte
    f.write_bytes(bytes(raw))
    with R.open(p) as r:
        msg = _raises(CorruptChunkError, lambda: r.read(9), "array 'soft/probs'")
        assert "index" in msg and "crc32c" in msg, msg
    f.write_bytes(pristine)
    label = p / S.LABEL / "c" / "0"  # unsharded arrays carry a crc32c too
    raw = bytearray(label.read_bytes())
    raw[-1] ^= 0x01
    label.write_bytes(bytes(raw))
    with R.open(p) as r, pytest.raises(CorruptStoreError, match="label"):
        r.labels


def test_invariant_08_missing_chunk_of_a_written_image_is_damage_not_fill(tmp_path):
    """"Writers materialise every inner chunk of a shard they write (also all-fill chunks). For a written
    image, a missing shard object or an inner chunk absent from its shard index (offset and length
    `2^64 - 1`) is damage: readers MUST raise a corrupt-store error and MUST NOT substitute fill values." """
    d = make_data(N, M, C)
    d["flips"][:] = False  # every flip chunk is all fill values
    with create(tmp_path / "s", d, images_per_chunk=IPC, images_per_shard=IPS) as w:
        fill(w, d)
    p = tmp_path / "s"
    for s, chunks in ((0, 2), (1, 1)):
        index = shard_index(shard_file(p, S.FLIP, s), IPS // IPC)
        assert (index[:chunks] != 2**64 - 1).all(), (s, index)
    f = shard_file(p, S.BOX, 0)
    index = shard_index(f, IPS // IPC)
    index[1] = MISSING
    write_shard_index(f, index)
    with R.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read(5), "array 'box' chunk 1", "missing from the shard index")
    shard_file(p, "soft/probs", 1).unlink()
    with R.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read(9), "array 'soft/probs' chunk 2", "shard file is missing")
        np.testing.assert_array_equal(r.read(2).box, d["boxes"][2])  # undamaged images still read


def _raw_chunk(f: Path, j: int, per_shard: int) -> bytes:
    off, nb = (int(x) for x in shard_index(f, per_shard)[j])
    return f.read_bytes()[off:off + nb]


def test_invariant_09_manifest_binds_each_chunk_to_its_array_and_position(tmp_path):
    """"`manifest[c, p] = crc32c(utf8(path_p) ‖ 0x00 ‖ uint64_le(c) ‖ D)` ... `c` the index of the inner chunk
    along the image axis over the **whole array** ... Rows past `N` in the last chunk are taken as the fill
    value whatever the stored chunk holds there, and writers MUST store the fill value in them. For every
    chunk a reader returns data from, it MUST compare the tag and raise a corrupt-store error on mismatch" """
    aug = [("mag", "float", "float16", (2,))]
    d = make_data(N, M, C)
    vals = np.random.default_rng(1).random((N, M, 2)).astype(np.float32)
    p = tmp_path / "s"
    with create(p, d, aug=aug, images_per_chunk=IPC, images_per_shard=IPS) as w:
        w.put(np.arange(N), d["boxes"], d["flips"], d["probs"], aug={"mag": vals})
    g = zarr.open_group(str(p), mode="r")
    paths = ["box", "flip", "aug/mag", "soft/indices", "soft/probs"]  # the manifest order of section 2
    man = g[S.MANIFEST][:]
    assert man.shape == (math.ceil(N / IPC), len(paths))
    for col, path in enumerate(paths):
        a = g[path]
        for c in range(man.shape[0]):
            rows = a[c * IPC:min(N, (c + 1) * IPC)]
            D = np.zeros((IPC, *a.shape[1:]), a.dtype)  # rows past N: the fill value
            D[:len(rows)] = rows
            assert spec_manifest_tag(path, c, D) == man[c, col], (path, c)
        # writers store the fill value past N: decode the last chunk's raw bytes
        f = shard_file(p, path, 1)
        raw = _raw_chunk(f, 0, IPS // IPC)
        assert crc32c.crc32c(raw[:-4]) == int.from_bytes(raw[-4:], "little")
        dec = np.frombuffer(blosc.decompress(raw[:-4]), a.dtype).reshape(IPC, *a.shape[1:])
        assert not dec[N - 2 * IPC:].any(), path
    a, b = shard_file(p, "soft/probs", 0), shard_file(p, "soft/probs", 1)
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb)  # swapped shard files: each chunk is intact but at the wrong position
    b.write_bytes(ra)
    with R.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read(1), "array 'soft/probs' chunk 0", "does not match the manifest")
    assert any("manifest" in x for x in verify(p))


def test_invariant_09_rows_past_n_are_taken_as_fill_whatever_is_stored(tmp_path):
    """"Rows past `N` in the last chunk are taken as the fill value whatever the stored chunk holds there" """
    p, d = _store(tmp_path)
    f = shard_file(p, S.BOX, 1)
    per = IPS // IPC
    raw = _raw_chunk(f, 0, per)
    dec = np.frombuffer(blosc.decompress(raw[:-4]), np.uint16).reshape(IPC, M, 4).copy()
    dec[N - IPS:] = 7  # another writer left something past N
    body = Blosc(cname="lz4hc", clevel=9, shuffle=Blosc.BITSHUFFLE).encode(dec)
    chunk = body + crc32c.crc32c(body).to_bytes(4, "little")
    index = shard_index(f, per)
    index[0] = [0, len(chunk)]
    index[1:] = MISSING  # shard 1 has one inner chunk (images 8, 9) of the two slots
    tail = np.ascontiguousarray(index, "<u8").tobytes()
    f.write_bytes(chunk + tail + crc32c.crc32c(tail).to_bytes(4, "little"))
    with R.open(p) as r:
        np.testing.assert_array_equal(r.read(9).box, d["boxes"][9])
        np.testing.assert_array_equal(r.read_all().box, d["boxes"])
    assert verify(p) == []


def test_invariant_10_shards_are_whole_chunks_and_shard_objects_are_disjoint(tmp_path):
    """"`images_per_shard % images_per_chunk == 0`; chunk `s` of `written` and chunk `s` of `manifest` cover
    exactly the images of shard `s` of every per-crop array, so processes writing disjoint shards write
    disjoint objects." """
    d = make_data(N, M, C)
    _raises(ValidationError, lambda: create(tmp_path / "bad", d, images_per_chunk=4, images_per_shard=6),
            "images_per_shard must be a multiple of images_per_chunk")
    p = tmp_path / "s"
    w = create(p, d, images_per_chunk=IPC, images_per_shard=IPS)
    before = {x for x in p.rglob("*") if x.is_file()}
    i = np.arange(IPS, N)
    w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])  # completes shard 1 only
    new = {x.relative_to(p).as_posix() for x in p.rglob("*") if x.is_file()} - {x.relative_to(p).as_posix() for x in before}
    new -= {x for x in new if x.startswith(ownership.OWNERS + "/")}
    assert new == {"box/c/1/0/0", "flip/c/1/0", "soft/indices/c/1/0/0", "soft/probs/c/1/0/0", "manifest/c/1/0",
                   "written/c/1"}, new
    w.close()
    g = zarr.open_group(str(p), mode="r")
    assert g[S.WRITTEN].chunks == (IPS,) and g[S.MANIFEST].chunks == (IPS // IPC, 4)
    np.testing.assert_array_equal(g[S.WRITTEN][:], [0] * IPS + [1] * (N - IPS))
    _rewrite_header(p, images_per_shard=6, images_per_chunk=4)  # a valid checksum; the rule is broken
    _raises(FormatError, lambda: R.open(p), "images_per_shard must be a multiple of images_per_chunk")


def test_invariant_11_codec_fields_and_augment_columns_follow_their_rules(tmp_path, monkeypatch):
    """"Codec fields satisfy the codec's rules (section 5); augmentation columns satisfy their policy's rules
    (section 6); partner indices are in `[0, N)`." (section 4: "`verify` additionally checks ... invariants
    4, 5 and 11") """
    d = make_data(N, M, C)
    codec = fkdstore.codecs.get_codec("ms", k=2)
    fields = codec.encode(d["probs"])
    p = tmp_path / "s"
    with create(p, d, codec, images_per_chunk=IPC, images_per_shard=IPS) as w:
        bad = {k: v[:1].copy() for k, v in fields.items()}
        bad["indices"][0, 1, 0] = C  # a class index out of [0, C)
        _raises(ValidationError, lambda: w.put_fields([0], d["boxes"][:1], d["flips"][:1], bad), f"[0, {C})")
        monkeypatch.setattr(type(codec), "validate_fields", lambda self, f, c: None)  # a writer that skips it
        stored = {k: v.copy() for k, v in fields.items()}
        stored["indices"][0, 1, 0] = C
        w.put_fields(np.arange(N), d["boxes"], d["flips"], stored)
    monkeypatch.undo()
    assert any("image 0 slot 1" in x for x in verify(p)), verify(p)

    augment = [{"name": "mixup", "alpha": 0.2, "p": 1.0, "window": 0}]
    cols = [c.to_json() for c in Pipeline.from_config(augment).columns()]
    q = tmp_path / "mix"
    partner = np.tile(((np.arange(N) + 1) % N)[:, None], (1, M)).astype(np.int32)
    lam = np.full((N, M), 100, np.uint8)
    with create(q, d, aug=cols, augment=augment, images_per_chunk=IPC, images_per_shard=IPS) as w:
        partner_bad = partner.copy()
        partner_bad[3, 2] = N  # outside [0, N)
        w.put(np.arange(N), d["boxes"], d["flips"], d["probs"],
              aug={"mixup_partner": partner_bad, "mixup_lam": lam})
    problems = verify(q)
    assert any("mixup_partner" in x and "images 0..7" in x for x in problems), problems


_MASK = 2**64 - 1
_G = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _exp_poly(x: float) -> float:
    y = x / 256
    p = 1.0
    for n in range(8, 0, -1):
        p = 1.0 + (y / n) * p
    for _ in range(8):
        p = p * p
    return p


def _log_poly(x: float) -> float:
    m, e = math.frexp(x)
    if m < 0.75:
        m, e = 2 * m, e - 1
    t = (m - 1) / (m + 1)
    q = 1 / 59
    for n in range(28, -1, -1):
        q = 1 / (2 * n + 1) + t * t * q
    return e * float.fromhex("0x1.62e42fefa39efp-1") + 2 * t * q


def spec_slot_sample(cfg: dict, i: int, s: int, H: int, W: int) -> tuple[tuple[int, int, int, int], bool]:
    """Section 10.3, line by line, in Python integers and floats (no numpy): the crop of slot ``s`` of
    image ``i``."""
    (s_lo, s_hi), (r_lo, r_hi) = cfg["scale"], cfg["ratio"]
    key = _mix((_mix((_mix((cfg["seed"] + _G) & _MASK) + (i + 1) * _G) & _MASK) + (s + 1) * _G) & _MASK)

    def draw(d):
        return _mix((key + (d + 1) * _G) & _MASK)

    def u(d):
        return float(draw(d) >> 11) * 2.0 ** -53

    l_lo, l_hi = _log_poly(r_lo), _log_poly(r_hi)
    A = float(H) * float(W)
    for a in range(10):
        target = A * (s_lo + (s_hi - s_lo) * u(2 * a))
        aspect = _exp_poly(l_lo + (l_hi - l_lo) * (((draw(2 * a + 1) >> 48) + 0.5) / 65536))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            top = ((draw(20) >> 32) * (H - h + 1)) >> 32
            left = ((draw(21) >> 32) * (W - w + 1)) >> 32
            return (top, left, h, w), u(22) < cfg["flip_p"]
    r = W / H
    h, w = (round(W / r_lo), W) if r < r_lo else (H, round(H * r_hi)) if r > r_hi else (H, W)
    h, w = min(max(h, 1), H), min(max(w, 1), W)
    return ((H - h) // 2, (W - w) // 2, h, w), u(22) < cfg["flip_p"]


def test_invariant_12_seeded_crops_are_the_samplers_and_tagged(tmp_path):
    """"`box` and `flip` MUST NOT be stored" in 3.0; "`(box[i, s], flip[i, s]) = sample(seed, i, s,
    image_size[i][0], image_size[i][1])` ... (the slot sampler, section 10.3), the box cast to `box_dtype`"; "The manifest keeps its `P` columns
    ... their tags follow invariant 9 over the derived chunk (rows past `N` the fill value)"; a reader MUST
    refuse a `crop_sampler` with "a missing or unknown key" (section 10.2)."""
    from fkdstore.seeded import SlotCropSampler

    d = make_data(N, M, C, seed=3)
    d["sizes"][0] = (1, 900)  # an image whose every attempt fails: the fallback
    cfg = SlotCropSampler(seed=2**64 - 5, scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_p=0.3).get_config()
    crops = [[spec_slot_sample(cfg, i, s, int(d["sizes"][i, 0]), int(d["sizes"][i, 1])) for s in range(M)]
             for i in range(N)]
    boxes = np.array([[b for b, _ in row] for row in crops])
    flips = np.array([[f for _, f in row] for row in crops])
    assert tuple(boxes[0, 0]) == (0, (900 - 2) // 2, 1, 2)  # the fallback: h = 1, w = rint(1 * 2.0)
    rng = np.random.default_rng(12)
    for _ in range(6):  # the reference implementation equals this file's, bit for bit, on random configs
        lo, hi = sorted(rng.uniform(0.01, 1, 2))
        rlo, rhi = sorted(np.exp(rng.uniform(-3, 3, 2)))
        c = SlotCropSampler(seed=int(rng.integers(0, 2**63)), scale=(lo, hi), ratio=(rlo, rhi),
                            flip_p=float(rng.random())).get_config()
        ii, ss = rng.integers(0, 2**40, 300), rng.integers(0, 1000, 300)
        hh, ww = rng.integers(1, 3000, 300), rng.integers(1, 3000, 300)
        got_b, got_f = SlotCropSampler.from_config(c).sample_slots(ii, ss, hh, ww)
        for j in range(300):
            want_b, want_f = spec_slot_sample(c, int(ii[j]), int(ss[j]), int(hh[j]), int(ww[j]))
            assert tuple(got_b[j].tolist()) == want_b and bool(got_f[j]) == want_f, (c, j)
    p = tmp_path / "seeded"
    with create(p, d, images_per_chunk=IPC, images_per_shard=IPS, crop_sampler=cfg) as w:
        w.put(np.arange(N), boxes, flips, d["probs"])
    h = _header(p)
    assert h["format_version"] == "3.0" and h["crop_sampler"] == cfg and h["checksum"] == spec_checksum(h)
    assert not (p / "box").exists() and not (p / "flip").exists()
    tags = zarr.open_array(str(p / "manifest"), mode="r")[:]
    bt = np.dtype(h["box_dtype"])
    for col, (path, data) in enumerate((("box", boxes.astype(bt)), ("flip", flips))):
        for c in range(-(-N // IPC)):
            chunk = np.zeros((IPC, *data.shape[1:]), data.dtype)
            part = data[c * IPC:(c + 1) * IPC]
            chunk[:len(part)] = part
            assert tags[c, col] == spec_manifest_tag(path, c, chunk), (path, c)
    with R.open(p) as r:
        rec = r.read_all()
        np.testing.assert_array_equal(rec.box, boxes)
        np.testing.assert_array_equal(rec.flip, flips)
    assert verify(p) == []
    pristine = (p / "zarr.json").read_text()
    for changes in ({"crop_sampler": {**cfg, "extra": 1}}, {"crop_sampler": {k: v for k, v in cfg.items() if k != "seed"}}):
        _rewrite_header(p, **changes)
        _raises(FormatError, lambda: R.open(p), "crop_sampler")
        (p / "zarr.json").write_text(pristine)


# ----------------------------------------------------------------------------- section 1: the header


REQUIRED = ["format", "format_version", "num_images", "crops_per_image", "num_classes", "codec", "images_per_chunk",
            "images_per_shard", "box_dtype", "key_length", "aug", "augment", "has_labels", "checksum"]


def test_section1_missing_required_key_is_a_format_error_naming_it(tmp_path):
    """"Required keys (a reader MUST refuse a header lacking any of them with a format error)" """
    p, _ = _store(tmp_path)
    pristine = (p / "zarr.json").read_text()
    for key in REQUIRED:
        _rewrite_header(p, drop=[key])
        _raises(FormatError, lambda: R.open(p), repr(key) if key == "format" else key)
        (p / "zarr.json").write_text(pristine)
    _rewrite_header(p, drop=["has_labels", "key_length"])
    _raises(FormatError, lambda: R.open(p), "has_labels", "key_length")


def test_section1_malformed_required_value_is_a_format_error_naming_the_key(tmp_path):
    """Section 1.1: "Integers are JSON integers (no fractions, no booleans)", and the types of the table of
    required keys; a malformed header is a format error (one error class, not TypeError or KeyError)."""
    p, _ = _store(tmp_path)
    pristine = (p / "zarr.json").read_text()
    cases = {"num_images": [10.0, True, "10", 0], "crops_per_image": [3.5, False], "num_classes": [None, -1],
             "images_per_chunk": [4.0], "images_per_shard": ["8"], "key_length": [True, 0, 1.5],
             "box_dtype": ["float32", 16], "codec": ["ms", ["ms"]], "aug": ["mag", [{"name": "1x"}]],
             "augment": [{"name": "mixup"}, ["mixup"]], "has_labels": ["yes", 1, None],
             "format_version": [2.0, "2", "two.zero"]}
    for key, values in cases.items():
        for v in values:
            _rewrite_header(p, **{key: v})
            _raises(FormatError, lambda: R.open(p), key)
            (p / "zarr.json").write_text(pristine)


def test_section1_unknown_keys_ignored_at_every_level_but_codec_and_augment(tmp_path):
    """"Readers MUST ignore keys they do not know (a newer minor version may add them) **at every level
    except** `codec` and `augment` entries" """
    d = make_data(N, M, C)
    p = tmp_path / "s"
    with create(p, d, aug=[("mag", "float", "float16", ())], images_per_chunk=IPC, images_per_shard=IPS) as w:
        w.put(np.arange(N), d["boxes"], d["flips"], d["probs"], aug=np.zeros((N, M, 1)))
    h = _header(p)
    aug = [dict(a, unit="degrees", extra={"nested": [1, 2]}) for a in h["aug"]]  # unknown keys in aug entries
    _rewrite_header(p, format_version="2.3", future_array={"path": "x", "dtype": "uint8"}, aug=aug)
    with R.open(p) as r:
        assert r.header.format_version == "2.3" and r.aug_names == ["mag"]
        np.testing.assert_array_equal(r.read_all().box, d["boxes"])
    assert verify(p) == []


def test_section1_unknown_codec_name_or_parameter_is_refused_naming_it(tmp_path):
    """"whose unknown `name` or unknown parameter MUST be refused (a reader that ignored a codec parameter
    would decode wrong labels): the error names the codec/policy and the parameter." """
    p, _ = _store(tmp_path)
    codec = _header(p)["codec"]
    _rewrite_header(p, codec=dict(codec, name="wavelet9"))
    _raises(FormatError, lambda: R.open(p), "'wavelet9'")
    _rewrite_header(p, codec=dict(codec, temperature_bias=0.5))
    _raises(FormatError, lambda: R.open(p), "'ms'", "temperature_bias")


def test_section1_unknown_augment_policy_or_parameter_is_refused_naming_it(tmp_path):
    """"whose unknown `name` or unknown parameter MUST be refused ... the error names the codec/policy and
    the parameter." Section 6: "A reader MUST refuse a policy name it does not know, naming it." """
    p, _ = _store(tmp_path)
    _rewrite_header(p, augment=[{"name": "solarize_plus", "threshold": 3}])
    _raises(FormatError, lambda: R.open(p), "'solarize_plus'")
    augment = [{"name": "mixup", "alpha": 0.2, "p": 1.0, "window": 0, "beta_shift": 1}]
    cols = [c.to_json() for c in Pipeline.from_config([{k: v for k, v in augment[0].items() if k != "beta_shift"}]).columns()]
    _rewrite_header(p, augment=augment, aug=cols)
    _raises(FormatError, lambda: R.open(p), "mixup", "beta_shift")


def test_section1_2_checksum_is_crc32c_of_the_canonical_json(tmp_path):
    """"`checksum = "crc32c:" + lowercase 8-hex-digit crc32c` of the UTF-8 bytes of the canonical JSON of the
    header object **without** the keys `checksum`, `meta` and `library_version` ... A reader in another
    language MUST reproduce this spelling" """
    augment = [{"name": "color_jitter", "brightness": [0.6, 1.4], "contrast": [0.6, 1.4], "saturation": [1.0, 1.0],
                "hue": [-0.05, 0.05]}]
    cols = [c.to_json() for c in Pipeline.from_config(augment).columns()]
    d = make_data(N, M, C)
    p = tmp_path / "s"
    with create(p, d, aug=cols, augment=augment, meta={"note": "été ☃ 😀"}):
        pass
    h = _header(p)
    assert h["checksum"] == spec_checksum(h)
    # the spelling rules: floats (repr, exponent forms), escapes, non-ASCII, astral characters, key order by
    # code point (U+FFFF sorts before U+1F600, unlike UTF-16 order)
    exotic = {"\U0001F600": 1, "\uffff": 2, "b": [0.1, 1.0, 1e-05, 1e16, 1.5e-7, 123456789012345678, -0.0],
              "a": 'q"\\/\n\r\t\b\f\x01\x7f é \u2028 😀', "A": {"z": None, "y": True, "x": False}}
    _rewrite_header(p, future=exotic)
    assert _header(p)["checksum"] == spec_checksum(_header(p))
    R.open(p).close()
    h = _header(p)
    h["future"]["b"][0] = 0.1000000000000001  # the canonical spelling changes: the stored checksum is stale
    doc = _doc(p)
    doc["attributes"][S.ATTR_KEY] = h
    (p / "zarr.json").write_text(json.dumps(doc))
    _raises(CorruptStoreError, lambda: R.open(p), "checksum")


def test_section1_2_reader_refuses_a_checksum_mismatch_and_ignores_meta(tmp_path):
    """"Readers MUST verify it and refuse a mismatch (a corrupt-store error) ... `meta` is excluded because
    a resumed run updates it." """
    p, _ = _store(tmp_path)
    pristine = (p / "zarr.json").read_text()
    for edit in ({"num_classes": C + 1}, {"crops_per_image": M + 1}, {"images_per_chunk": 2},
                 {"codec": {"name": "mr", "k": 5, "dtype": "float16"}}, {"augment": [{"name": "mixup"}]}):
        doc = json.loads(pristine)
        doc["attributes"][S.ATTR_KEY].update(edit)  # checksum NOT recomputed
        (p / "zarr.json").write_text(json.dumps(doc))
        _raises(CorruptStoreError, lambda: R.open(p), "checksum")
    doc = json.loads(pristine)
    doc["attributes"][S.ATTR_KEY]["meta"] = {"resumed": True}
    doc["attributes"][S.ATTR_KEY]["library_version"] = "9.9"
    (p / "zarr.json").write_text(json.dumps(doc))
    R.open(p).close()


# ------------------------------------------------------------------------------ section 2: arrays, keys


def test_section2_key_recipe_cut_at_first_zero_byte_decode_utf8(tmp_path):
    """"`key[i]`: the image's key ... as UTF-8, zero-padded to `L` bytes. ... *Recipe*: take row `i`, cut at
    the first zero byte (or keep all `L` bytes), decode UTF-8." """
    d = make_data(N, M, C)
    d["keys"][2] = "dossier/été.jpg"
    d["keys"][4] = "😀/" + "x" * 30  # the longest: its row has no padding
    d["keys"][5] = "k"
    p = tmp_path / "s"
    with create(p, d, images_per_chunk=IPC, images_per_shard=IPS) as w:
        fill(w, d)
    raw = zarr.open_group(str(p), mode="r")[S.KEY][:]
    L = max(len(k.encode("utf-8")) for k in d["keys"])
    assert raw.dtype == np.uint8 and raw.shape == (N, L) and _header(p)["key_length"] == L
    assert [spec_key(row) for row in raw] == d["keys"]
    assert (raw[4] != 0).all() and not raw[5, 1:].any()
    with R.open(p) as r:
        assert r.image_keys == [spec_key(row) for row in raw]


# ------------------------------------------------------------------------- section 3: codec pipelines


def test_section3_checksums_are_an_obligation_not_stripped(tmp_path):
    """"**Checksums are an obligation**: a reader MUST verify every `crc32c` (chunk and shard index) before
    decoding and MUST refuse the chunk on mismatch. Stripping the 4 checksum bytes without comparing them
    (as some Zarr implementations do) does not conform." """
    p, d = _store(tmp_path)
    f = shard_file(p, S.BOX, 0)
    pristine = f.read_bytes()
    per = IPS // IPC
    off, nb = (int(x) for x in shard_index(f, per)[1])
    for where in (off + nb - 1, len(pristine) - 1):  # the chunk's own crc32c bytes; the index's crc32c bytes
        raw = bytearray(pristine)
        raw[where] ^= 0x80  # the payload is intact: only a reader that compares notices
        f.write_bytes(bytes(raw))
        with R.open(p) as r:
            _raises(CorruptChunkError, lambda: r.read(5), "array 'box'", "crc32c")
        assert any("array 'box'" in x and "crc32c" in x for x in verify(p))
    f.write_bytes(pristine)
    meta = json.loads((p / S.BOX / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    assert [c["name"] for c in sharding["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert [c["name"] for c in sharding["index_codecs"]] == ["bytes", "crc32c"]
    assert sharding["index_location"] == "end"
    assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}


# ---------------------------------------------------------------------------------- section 7: layout


def test_section7_default_layout_is_the_spec_algorithm():
    """"The default layout rule for a new store (`schema.default_layout`, `row_bytes` = raw bytes of one
    image's row of the widest per-crop array)": steps 1-5, re-implemented here in exact arithmetic."""
    Ns = [1, 2, 7, 1000, 2048, 2049, 4097, 50_000, 1_281_167, 14_197_122, 10**9]
    rows = [1, 3, 10, 24, 100, 1000, 2000, 4096, 8192, 8193, 24 * 200, 10 * 200, 2 * 200 * 1000, 2 * 1000, 10**6, 10**8]
    Ms = [1, 3, 8, 10, 64, 200, 600, 1000, 2**20, 2**21 + 1]
    for n in Ns:
        for rb in rows:
            for m in Ms:
                assert S.default_layout(n, rb, m) == spec_layout(n, rb, m), (n, rb, m)
    # ImageNet shapes through a real header's row_bytes: MS top-5 fp16 / Full fp16, M = 200 and 8
    for codec, m in (({"name": "ms", "k": 5}, 200), ({"name": "full"}, 200), ({"name": "ms", "k": 5}, 8),
                     ({"name": "hard"}, 600)):
        c = fkdstore.codecs.get_codec(codec)
        h = S.Header(num_images=1_281_167, crops_per_image=m, num_classes=1000, codec=c.get_config(),
                     images_per_chunk=1, images_per_shard=1, box_dtype="uint16", key_length=40)
        widest = max(m * math.prod(spec.shape) * np.dtype(spec.dtype).itemsize for spec in c.fields(1000).values())
        rb = max(widest, m * 4 * 2)  # box: 4 x uint16 per slot
        assert h.row_bytes(c) == rb
        ipc, ips = spec_layout(1_281_167, rb, m)
        assert S.default_layout(1_281_167, rb, m) == (ipc, ips)
        assert ips % ipc == 0 and math.ceil(1_281_167 / ips) <= 2048
        assert ips * m <= 2**20 or ips == ipc or ips == ipc * math.ceil(1_281_167 / 2048 / ipc)


def test_section7_a_new_store_gets_the_default_layout(tmp_path):
    """"The default layout rule for a new store" applies when the writer is given no layout."""
    d = make_data(300, 64, 4)
    p = tmp_path / "s"
    with create(p, d, codec="hard") as w:
        fill(w, d, step=100)
    g = zarr.open_group(str(p), mode="r")
    rb = max(int(np.prod(g[n].shape[1:])) * g[n].dtype.itemsize for n in ("box", "flip", "soft/indices"))
    h = _header(p)
    assert (h["images_per_chunk"], h["images_per_shard"]) == spec_layout(300, rb, 64)


def test_section7_resume_adopts_the_store_layout(tmp_path):
    """"The layout is part of the header; a writer resuming a store MUST use the store's layout." """
    d = make_data(N, M, C)
    p = tmp_path / "s"
    assert spec_layout(N, M * 8, M) != (2, 6)
    w = create(p, d, images_per_chunk=2, images_per_shard=6)
    fill(w, d, order=np.arange(6))
    w.close()
    with create(p, d) as w:  # no layout given: the store's, not the defaults
        assert (w.header.images_per_chunk, w.header.images_per_shard) == (2, 6)
        fill(w, d, order=np.arange(6, N))
    with R.open(p) as r:
        assert r.complete
        np.testing.assert_array_equal(r.read_all().box, d["boxes"])


# --------------------------------------------------------------------------- section 8: write protocol


def test_section8_shard_data_then_manifest_then_flags(tmp_path, monkeypatch):
    """"A writer buffers a shard and writes each per-crop array's shard object whole ..., then the shard's
    `manifest` chunk, then its `written` chunk. On a local file system it flushes (`fsync`) the data objects
    before writing the manifest and the manifest before the flags" """
    d = make_data(N, M, C)
    p = tmp_path / "s"
    data = ["box/c/{s}/0/0", "flip/c/{s}/0", "soft/indices/c/{s}/0/0", "soft/probs/c/{s}/0/0"]
    events = []

    def seen(step, s):
        exists = lambda k: (p / k.format(s=s)).exists()
        events.append((step, s, tuple(exists(k) for k in data), exists("manifest/c/{s}/0"), exists("written/c/{s}")))

    real_fsync = storage.fsync_local
    monkeypatch.setattr(W, "_fault_point", seen)
    monkeypatch.setattr(storage, "fsync_local", lambda store, keys: (events.append(("fsync", tuple(keys))),
                                                                real_fsync(store, keys)))
    with create(p, d, images_per_chunk=IPC, images_per_shard=IPS) as w:
        i = np.arange(IPS, N)
        w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])  # shard 1 first
        i = np.arange(IPS)
        w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])
    for s in (1, 0):
        ev = [e for e in events if e[0] == "fsync" and any(f"/c/{s}" in k for k in e[1])
              or e[0] != "fsync" and e[1] == s]
        assert [e[0] for e in ev] == ["array"] * 4 + ["fsync", "data", "fsync", "manifest", "fsync", "flags"], ev
        arrays = [e for e in ev if e[0] == "array"]
        for j, e in enumerate(arrays):  # data objects appear one by one; no manifest or flags yet
            assert e[2] == tuple(k <= j for k in range(4)) and not e[3] and not e[4], e
        by = {e[0]: e for e in ev if e[0] != "fsync"}
        assert by["data"][2] == (True,) * 4 and not by["data"][3] and not by["data"][4]
        assert by["manifest"][3] and not by["manifest"][4]
        assert by["flags"][4]
        fsyncs = [e[1] for e in ev if e[0] == "fsync"]
        assert fsyncs == [tuple(k.format(s=s) for k in data), (f"manifest/c/{s}/0",), (f"written/c/{s}",)]


def test_section8_two_writers_must_not_write_the_same_shard(tmp_path):
    """"Two writers MUST NOT write the same shard: the reference writer records ownership of each shard it
    buffers in `owners/<shard>.json` ... it refuses (`ConcurrentWriterError`, naming shard, host and pid) when
    another writer owns it. ... records are removed when the shard is complete and at close. ... Readers and
    `verify` ignore `owners/`." """
    d = make_data(N, M, C)
    p = tmp_path / "s"
    w1 = create(p, d, images_per_chunk=IPC, images_per_shard=IPS)
    w1.put([0], d["boxes"][:1], d["flips"][:1], d["probs"][:1])
    rec = json.loads((p / ownership.OWNERS / "0.json").read_text())
    assert set(rec) == {"token", "host", "pid", "since", "renewed"} and len(rec["token"]) == 32
    int(rec["token"], 16)
    w2 = create(p, d)
    _raises(ConcurrentWriterError, lambda: w2.put([1], d["boxes"][1:2], d["flips"][1:2], d["probs"][1:2]),
            "shard 0", socket.gethostname(), f"pid {os.getpid()}")
    i = np.arange(IPS, N)
    w2.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])  # a disjoint shard needs no coordination
    assert not (p / ownership.OWNERS / "1.json").exists()  # complete shard: record removed
    w2.close()
    with R.open(p) as r:  # owners/0.json is still there: readers ignore it
        np.testing.assert_array_equal(r.read(9).box, d["boxes"][9])
    assert [x for x in verify(p) if "owners" in x] == []
    i = np.arange(1, IPS)
    w1.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])
    w1.close()
    assert not (p / ownership.OWNERS).exists() or not any((p / ownership.OWNERS).iterdir())
    assert fkdstore.open(p).complete


# ------------------------------------------------------------------------------- section 11: format 1.0


@pytest.mark.parametrize("codec", ["full", "hard", "smoothing", "ms", "mr"])
def test_section11_golden_v1_0_stores_read_and_convert_to_2_0_with_identical_records(tmp_path, codec):
    """"Readers of 2.0 SHOULD read 1.0 stores (the reference reader does, tested against golden stores
    written by fkdstore 0.1.0) ... Writers write 2.0 only; `fkdstore convert` rewrites a 1.0 store as 2.0." """
    e = dict(np.load(GOLDEN / "expected.npz"))
    keys = json.loads((GOLDEN / "keys.json").read_text())
    src = GOLDEN / f"{codec}.zarr"
    with R.open(src) as r:
        assert r.header.format_version == "1.0" and r.complete and r.image_keys == keys
        old = r.read_all()
        np.testing.assert_array_equal(old.box, e["boxes"])
        np.testing.assert_array_equal(old.flip, e["flips"])
        for name, v in old.fields.items():
            np.testing.assert_array_equal(v, e[f"{codec}/{name}"])
        sizes, labels, hcodec = r.image_sizes, r.labels, dict(r.header.codec)
    dst = tmp_path / "v2.zarr"
    convert(src, dst, hcodec)
    h = _header(dst)
    assert h["format_version"] == "2.0" and h["checksum"] == spec_checksum(h)
    assert (dst / S.KEY).exists() and (dst / S.MANIFEST).exists() and not (dst / S.IMAGE_KEY).exists()
    with R.open(dst) as r:
        assert r.image_keys == keys
        np.testing.assert_array_equal(r.image_sizes, sizes)
        np.testing.assert_array_equal(r.labels, labels)
        new = r.read_all()
        np.testing.assert_array_equal(new.box, old.box)
        np.testing.assert_array_equal(new.flip, old.flip)
        assert new.fields.keys() == old.fields.keys() and new.aug.keys() == old.aug.keys()
        for name in old.fields:
            np.testing.assert_array_equal(new.fields[name], old.fields[name])
        for name in old.aug:
            np.testing.assert_array_equal(new.aug[name], old.aug[name])
    assert verify(dst) == []
