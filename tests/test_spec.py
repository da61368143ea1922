"""spec/format-v4.md, implemented a second time from its text alone, and fkdstore checked against it.

The first half of this file is a reader of the format written from the spec (no fkdstore module is used to
read): canonical JSON and the header checksum (1.2), the strict header objects (1.3, 1.4, 10.1, 10.2, 11.1),
the caps (1.5), raw chunk reads with their crc32c and blosc/zstd pipelines (3), the manifest tags (4, inv. 9),
the slot sampler (10.3, in plain Python integers and floats), the label codecs and q8 (5), crop keys (5.3), the
`sampled` codec (5.4), the logits tail statistic and centred rows (5.5, 5.6), the augmentation draws and validity
rules of the policies added to 6.3, label-map pooling (11.3), the layout rule (7), the default store id (8) and the
2.0/3.0 rules (12). The tests drive fkdstore only through its public API (``write``, ``Writer.put``/``put_maps``,
``open``, ``read_batch``, ``decode``, ``LabelMapReader.pool``, ``verify``, the codecs' ``encode``/``decode``/
``validate_fields``/``tail_bound``, ``augment.Pipeline``, the TinyViT importer) and compare what it writes and
returns with what the spec says, or craft and damage stores by the spec's words and check that fkdstore refuses
them with the spec's error class.

Where the text and the code part ways, the test is marked ``xfail(strict=True, reason="spec-vs-code: ...")``
and the case is written up in the project's plan (spec-vs-code.md) for the lead to decide which side to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import crc32c
import numpy as np
import pytest
import zarr
from numcodecs import Blosc, Zstd, blosc

import fkdstore
from fkdstore.errors import (
    ConcurrentWriterError,
    CorruptStoreError,
    ExternalReplayError,
    FkdstoreError,
    FormatError,
    IncompleteStoreError,
    ValidationError,
)

GOLDEN3 = Path(__file__).parent / "golden" / "v3.0"
N, M, C, IPC, IPS = 10, 3, 7, 4, 8  # 2 shards of 2 inner chunks; chunk 2 holds images 8, 9; chunk 3 is past N
ATTR = "fkdstore"


class SpecError(AssertionError):
    """This file's reader found a store that breaks the spec text."""


def _need(cond, msg):
    if not cond:
        raise SpecError(msg)


# ================================================================ section 1.2: canonical JSON and checksum

_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _spec_string(s: str) -> str:
    """Strings escaped as Python's json does; other control and all non-ASCII characters as lowercase
    \\uXXXX, above U+FFFF as a surrogate pair, '/' not escaped."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch in _ESC:
            out.append(_ESC[ch])
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif cp <= 0xFFFF:
            out.append(f"\\u{cp:04x}")
        else:
            v = cp - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
    out.append('"')
    return "".join(out)


def spec_canonical_json(obj) -> str:
    """Keys sorted by code point, no whitespace, integers in decimal, floats as Python's repr."""
    if obj is None:
        return "null"
    if obj is True or obj is False:
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        _need(math.isfinite(obj), "canonical JSON has no NaN or infinities")
        return repr(obj)
    if isinstance(obj, str):
        return _spec_string(obj)
    if isinstance(obj, list):
        return "[" + ",".join(spec_canonical_json(v) for v in obj) + "]"
    if isinstance(obj, dict):
        keys = sorted(obj, key=lambda k: [ord(c) for c in k])
        return "{" + ",".join(_spec_string(k) + ":" + spec_canonical_json(obj[k]) for k in keys) + "}"
    raise TypeError(type(obj))


UNCHECKSUMMED = ("checksum", "meta", "library_version")


def spec_checksum(header: dict) -> str:
    """"crc32c:" + 8 lowercase hex digits over the canonical JSON without checksum, meta, library_version."""
    body = {k: v for k, v in header.items() if k not in UNCHECKSUMMED}
    return f"crc32c:{crc32c.crc32c(spec_canonical_json(body).encode('utf-8')):08x}"


# ============================================================ section 1: the header, strict objects, caps

TOP_REQUIRED = ["format", "format_version", "kind", "requires", "store_id", "num_images", "num_classes",
                "key_length", "has_labels", "layout", "replay", "checksum"]  # + the kind's object
TOP_ORDER = ["format", "format_version", "kind", "requires", "store_id", "num_images", "num_classes", "key_length",
             "has_labels", "layout", "replay", "regions", "label_map", "meta", "library_version", "checksum"]
REGIONS_KEYS = ["crops_per_image", "codec", "box_dtype", "crops", "aug", "augment"]
SAMPLER_KEYS = ["algorithm", "rng", "max_attempts", "scale", "ratio", "flip_p", "seed"]
CODEC_KEYS = {"full": {"dtype"}, "hard": set(), "smoothing": {"dtype"}, "ms": {"k", "dtype"}, "mr": {"k", "dtype"},
              "logits": {"k", "dtype", "tail", "centred"},
              "sampled": {"s", "k", "temperature", "input", "dtype", "logp", "seed"}}
POLICY_KEYS = {"color_jitter": {"brightness", "contrast", "saturation", "hue"},
               "randaugment": {"num_ops", "magnitude", "num_magnitude_bins", "interpolation", "fill"},
               "random_erasing": {"p", "scale", "ratio", "value"}, "mixup": {"alpha", "p", "window"},
               "cutmix": {"alpha", "p", "window"}, "random_grayscale": {"p"},
               "gaussian_blur": {"kernel_size", "sigma", "p"}, "mixup_exact": {"alpha", "p", "window"},
               "cutmix_box": {"alpha", "p", "window"}, "partner_crop": {"policies"},
               "external_seed": {"library", "pipeline", "rng", "pair_rule"}}
LABEL_MAP_KEYS = {"size", "k", "dtype", "fill", "box", "pool", "temperature", "flip"}
DTYPES = {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "float16", "float32"}
VOLATILE_META = ("time_taken_s", "finished_at", "created_at", "history", "skipped")  # section 9


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _strict(obj, keys, where):
    _need(isinstance(obj, dict), f"{where} must be an object")
    _need(set(obj) == set(keys), f"{where}: keys {sorted(obj)} are not exactly {sorted(keys)}")


def _int_in(v, lo, hi, where):
    _need(_is_int(v) and lo <= v <= hi, f"{where} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def spec_parse_header(h: dict) -> dict:
    """Sections 1, 1.3-1.5, 10.1, 10.2, 11.1 for format 4.0: every rule this reader applies at open, in
    the order of section 4's list (required keys, version, checksum, caps, kind, strict objects, requires).
    Returns the facts a reader needs."""
    _need(h.get("format") == "fkdstore", "format must be 'fkdstore'")
    kind = h.get("kind")
    for key in TOP_REQUIRED + ([kind] if kind in ("regions", "label_map") else []):
        _need(key in h, f"required key {key!r} missing")
    _need(h["format_version"].split(".")[0] == "4", "major version 4")
    _need(h["checksum"] == spec_checksum(h), "checksum mismatch")
    n, c, L = h["num_images"], h["num_classes"], h["key_length"]
    _int_in(n, 1, 2**31 - 1, "num_images")
    _int_in(c, 1, 2**20, "num_classes")
    _int_in(L, 1, 4096, "key_length")
    _need(kind in ("regions", "label_map"), f"unknown kind {kind!r}")
    _need(isinstance(h["requires"], list) and not h["requires"], "requires: no extension known")
    _need(isinstance(h["has_labels"], bool), "has_labels is a bool")
    sid = h["store_id"]
    _need(isinstance(sid, str) and len(sid) == 32 and sid == sid.lower() and bytes.fromhex(sid), "store_id")
    _strict(h["layout"], ["images_per_chunk", "images_per_shard"], "layout")
    ipc, ips = h["layout"]["images_per_chunk"], h["layout"]["images_per_shard"]
    _need(_is_int(ipc) and _is_int(ips) and ipc >= 1 and ips % ipc == 0 and ips >= ipc, "layout")
    replay = h["replay"]
    if replay is not None:
        _strict(replay, ["input_size", "interpolation", "mean", "std"], "replay")
        _need(len(replay["input_size"]) == 2, "replay.input_size")
        for side in replay["input_size"]:
            _int_in(side, 1, 1024, "replay.input_size")
        _need(replay["interpolation"] in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"), "interp")
        _need(len(replay["mean"]) == 3 and all(_is_num(v) for v in replay["mean"]), "replay.mean")
        _need(len(replay["std"]) == 3 and all(_is_num(v) and v > 0 for v in replay["std"]), "replay.std")
    facts = {"kind": kind, "n": n, "c": c, "L": L, "ipc": ipc, "ips": ips, "cps": ips // ipc,
             "sid": bytes.fromhex(sid), "header": h}
    if kind == "regions":
        reg = h["regions"]
        _strict(reg, REGIONS_KEYS, "regions")
        m = _int_in(reg["crops_per_image"], 1, 2**16, "regions.crops_per_image")
        codec = reg["codec"]
        _need(isinstance(codec, dict) and codec.get("name") in CODEC_KEYS, f"unknown codec {codec!r}")
        _strict(codec, CODEC_KEYS[codec["name"]] | {"name"}, "regions.codec")
        if "k" in codec and not (codec["name"] in ("logits", "sampled") and codec["k"] is None):
            _int_in(codec["k"], 1, c - (codec["name"] == "sampled"), "regions.codec.k")  # sampled: K < C
        if "dtype" in codec:
            _need(codec["dtype"] in ("float16", "float32", "q8"), "regions.codec.dtype")
        if codec["name"] == "logits":  # 5.5, 5.6
            _need(codec["tail"] in (None, "mean") and (codec["tail"] is None or codec["k"] is not None), "tail")
            _need(isinstance(codec["centred"], bool), "regions.codec.centred")
            _need(not codec["centred"] or (codec["k"] is None and codec["dtype"] != "q8"), "regions.codec.centred")
        if codec["name"] == "sampled":  # 5.4
            _int_in(codec["s"], 1, 65535, "regions.codec.s")
            _need(_is_num(codec["temperature"]) and codec["temperature"] > 0, "regions.codec.temperature")
            _need(codec["input"] in ("logits", "probs") and isinstance(codec["logp"], bool), "regions.codec.input")
            _int_in(codec["seed"], 0, 2**64 - 1, "regions.codec.seed")
        _need(reg["box_dtype"] in ("uint16", "int32"), "regions.box_dtype")
        crops = reg["crops"]
        _need(isinstance(crops, dict) and crops.get("mode") in ("seeded", "stored"), "regions.crops.mode")
        if crops["mode"] == "seeded":
            _strict(crops, ["mode", "sampler"], "regions.crops")
            spec_parse_sampler(crops["sampler"])
        else:
            _strict(crops, ["mode"], "regions.crops")
        for a in reg["aug"]:
            _strict(a, ["name", "kind", "dtype", "shape"], "regions.aug entry")
            _need(a["kind"] in ("float", "int", "bool", "index") and a["dtype"] in DTYPES, "aug entry")
        for pol in reg["augment"]:
            _need(pol.get("name") in POLICY_KEYS, f"unknown policy {pol.get('name')!r}")
            _strict(pol, POLICY_KEYS[pol["name"]] | {"name"}, f"regions.augment {pol['name']}")
        facts.update(m=m, codec=codec, box_dtype=np.dtype(reg["box_dtype"]), seeded=crops["mode"] == "seeded",
                     sampler=crops.get("sampler"), aug=reg["aug"])
        facts["records"] = spec_record_arrays(facts)
    else:
        lm = h["label_map"]
        _strict(lm, LABEL_MAP_KEYS, "label_map")
        _int_in(lm["size"], 1, 64, "label_map.size")
        _int_in(lm["k"], 1, min(256, c), "label_map.k")
        _need(lm["dtype"] in ("float16", "float32"), "label_map.dtype")
        _need(_is_num(lm["fill"]) and _is_num(lm["temperature"]) and lm["temperature"] > 0, "label_map values")
        _strict(lm["box"], ["order", "offset"], "label_map.box")
        _need(lm["box"]["order"] in ("xy", "yx") and _is_num(lm["box"]["offset"]), "label_map.box")
        _need(-1 <= lm["box"]["offset"] <= 1, "label_map.box.offset")
        _strict(lm["pool"], ["op", "sampling_ratio", "aligned", "grid"], "label_map.pool")
        _need(lm["pool"]["op"] == "roi_align" and isinstance(lm["pool"]["aligned"], bool), "label_map.pool")
        r = lm["pool"]["sampling_ratio"]
        _need(r == -1 or (_is_int(r) and 1 <= r <= 64), "label_map.pool.sampling_ratio")
        _int_in(lm["pool"]["grid"], 1, 32, "label_map.pool.grid")
        _need(isinstance(lm["flip"], bool), "label_map.flip")
        facts.update(m=1, label_map=lm, seeded=False)
        facts["records"] = spec_record_arrays(facts)
    for path, (shape, dtype) in facts["records"].items():  # 1.5: one decoded inner chunk / shard bounded
        row = math.prod(shape) * np.dtype(dtype).itemsize
        _need(ipc * row <= 64 * 2**20, f"{path}: decoded inner chunk over 64 MiB")
        _need(ips * row <= 2 * 2**30, f"{path}: decoded shard over 2 GiB")
    return facts


def spec_parse_sampler(cfg) -> dict:
    """Section 10.2: the strict sampler object and its ranges."""
    _strict(cfg, SAMPLER_KEYS, "sampler")
    _need(cfg["algorithm"] == "random_resized_crop" and cfg["max_attempts"] == 10
          and cfg["rng"] == "splitmix64(seed, image, slot, draw)", "sampler algorithm/rng/max_attempts")
    (s_lo, s_hi), (r_lo, r_hi) = cfg["scale"], cfg["ratio"]
    _need(all(_is_num(v) for v in (s_lo, s_hi, r_lo, r_hi, cfg["flip_p"])), "sampler numbers finite")
    _need(0 < s_lo <= s_hi <= 1 and math.exp(-8) <= r_lo <= r_hi <= math.exp(8) and 0 <= cfg["flip_p"] <= 1,
          "sampler ranges")
    _int_in(cfg["seed"], 0, 2**64 - 1, "sampler.seed")
    return cfg


def spec_codec_fields(codec: dict, c: int) -> dict:
    """Section 5: the fields of one slot, in the codec's field order: {field: (shape, dtype)}."""
    idx = "uint16" if c <= 65536 else "int32"
    pd = "uint8" if codec.get("dtype") == "q8" else codec.get("dtype")
    name, k = codec["name"], codec.get("k")
    if name == "full":
        return {"probs": ((c,), pd)}
    if name == "hard":
        return {"indices": ((), idx)}
    if name == "smoothing":
        return {"indices": ((), idx), "probs": ((), pd)}
    if name in ("ms", "mr"):
        return {"indices": ((k,), idx), "probs": ((k,), pd)}
    small = "float32" if codec.get("dtype") == "float32" else "float16"  # tail_mean, sample_logp
    if name == "sampled":  # section 5.4: w = min(S, C - K)
        w = min(codec["s"], c - (k or 0))
        out = {"indices": ((k,), idx), "probs": ((k,), pd)} if k else {}
        out |= {"sample_indices": ((w,), idx), "sample_counts": ((w,), "uint8" if codec["s"] <= 255 else "uint16")}
        return out | ({"sample_logp": ((w,), small)} if codec["logp"] else {})
    if k is None:  # logits
        return {"logits": ((c,), pd)}
    out = {"indices": ((k,), idx), "logits": ((k,), pd)}
    return out | ({"tail_mean": ((), small)} if codec.get("tail") == "mean" else {})


def spec_record_arrays(f: dict) -> dict:
    """Section 2: the record arrays in manifest order, {path: (per-image shape, dtype)}."""
    if f["kind"] == "label_map":
        lm = f["label_map"]
        shape = (lm["k"], lm["size"], lm["size"])
        return {"map/indices": (shape, "uint16" if f["c"] <= 65536 else "int32"), "map/scores": (shape, lm["dtype"])}
    m = f["m"]
    out = {"box": ((m, 4), f["box_dtype"].name), "flip": ((m,), "bool")}
    for a in f["aug"]:
        out[f"aug/{a['name']}"] = ((m, *a["shape"]), a["dtype"])
    for field, (shape, dtype) in spec_codec_fields(f["codec"], f["c"]).items():
        out[f"soft/{field}"] = ((m, *shape), dtype)
    return out


# ======================================================== section 3: raw chunk reads (no zarr, no fkdstore)

MISSING = 2**64 - 1


class RawArray:
    """One Zarr v3 array read from its files: ``zarr.json``, the chunk key encoding it declares, every
    crc32c compared before decoding, the blosc header's decoded size compared with the chunk shape."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "zarr.json").read_text())
        _need(self.meta["node_type"] == "array", f"{folder}: not an array")
        self.shape = tuple(self.meta["shape"])
        self.dtype = np.dtype(self.meta["data_type"]).newbyteorder("<")
        self.chunks = tuple(self.meta["chunk_grid"]["configuration"]["chunk_shape"])
        enc = self.meta["chunk_key_encoding"]
        self.sep = enc.get("configuration", {}).get("separator", "/") if enc["name"] == "default" else None
        _need(self.sep in ("/", "."), f"{folder}: chunk key encoding {enc}")
        codecs = self.meta["codecs"]
        self.sharded = codecs[0]["name"] == "sharding_indexed"
        if self.sharded:
            cfg = codecs[0]["configuration"]
            self.inner = tuple(cfg["chunk_shape"])
            self.pipeline, self.index_pipeline = cfg["codecs"], cfg["index_codecs"]
            _need(cfg["index_location"] == "end", "index_location end")
            self.per_shard = math.prod(s // i for s, i in zip(self.chunks, self.inner))
        else:
            self.pipeline = codecs

    def _file(self, s: int) -> Path:
        return self.folder / self.sep.join(["c", str(s)] + ["0"] * (len(self.shape) - 1))

    def _unchecksum(self, raw: bytes, what: str) -> bytes:
        _need(len(raw) >= 4 and crc32c.crc32c(raw[:-4]) == int.from_bytes(raw[-4:], "little"), f"{what}: crc32c")
        return raw[:-4]

    def chunk(self, s: int) -> np.ndarray | None:
        """Unsharded chunk ``s`` along the image axis (full chunk shape), None when its object is absent."""
        f = self._file(s)
        if not f.exists():
            return None
        body = self._unchecksum(f.read_bytes(), f"{self.folder.name} chunk {s}")
        names = [c["name"] for c in self.pipeline]
        _need(names == ["bytes", "zstd", "crc32c"], f"{self.folder.name}: pipeline {names}")
        return np.frombuffer(Zstd().decode(body), self.dtype).reshape(self.chunks)

    def inner_chunk(self, c: int) -> np.ndarray | None:
        """Inner chunk ``c`` (image axis, over the whole array) of a sharded array; None when its shard
        object is absent or the index marks it missing."""
        s, j = divmod(c, self.per_shard)
        f = self._file(s)
        if not f.exists():
            return None
        raw = f.read_bytes()
        tail = self._unchecksum(raw[-(self.per_shard * 16 + 4):], f"{self.folder.name} shard {s} index")
        off, nb = (int(x) for x in np.frombuffer(tail, "<u8").reshape(-1, 2)[j])
        if off == MISSING and nb == MISSING:
            return None
        body = self._unchecksum(raw[off:off + nb], f"{self.folder.name} chunk {c}")
        names = [p["name"] for p in self.pipeline]
        _need(names == ["bytes", "blosc", "crc32c"], f"{self.folder.name}: pipeline {names}")
        want = math.prod(self.inner) * self.dtype.itemsize
        # the blosc header (16 bytes: version, versionlz, flags, typesize, nbytes, blocksize, cbytes; LE)
        _need(len(body) >= 16 and int.from_bytes(body[4:8], "little") == want,
              f"{self.folder.name} chunk {c}: declared decoded size")
        return np.frombuffer(blosc.decompress(body), self.dtype).reshape(self.inner)


def _full_chunk(rows: np.ndarray, nrows: int, fill) -> np.ndarray:
    out = np.full((nrows, *rows.shape[1:]), fill, rows.dtype)
    out[:len(rows)] = rows
    return out


# ================================================================ section 4, invariant 9: manifest tags


def spec_tag(sid: bytes, path: str, c: int, chunk: np.ndarray) -> int:
    """tag(path, c, D) = crc32c(store_id_bytes || utf8(path) || 0x00 || uint64_le(c) || D)."""
    d = np.ascontiguousarray(chunk)
    d = d.view(np.uint8) if d.dtype == bool else d.astype(d.dtype.newbyteorder("<"), copy=False)
    return crc32c.crc32c(sid + path.encode("utf-8") + b"\x00" + c.to_bytes(8, "little") + d.tobytes())


PER_IMAGE = {"key": 0, "image_size": 0, "label": -1}  # bound per-image arrays and their fill


def spec_key(row: np.ndarray) -> str:
    """Section 2 recipe: take row i, cut at the first zero byte (or keep all L bytes), decode UTF-8."""
    b = bytes(row)
    cut = b.find(b"\x00")
    return (b if cut < 0 else b[:cut]).decode("utf-8")


class SpecStore:
    """A 4.0 store read by this file's rules only (section 4's list of what a reader checks)."""

    def __init__(self, path):
        self.path = Path(path)
        doc = json.loads((self.path / "zarr.json").read_text())
        self.h = doc["attributes"][ATTR]
        self.f = f = spec_parse_header(self.h)
        self.n, self.c, self.m, self.ipc, self.ips, self.cps = f["n"], f["c"], f["m"], f["ipc"], f["ips"], f["cps"]
        self.records = f["records"]
        self.shards = -(-self.n // self.ips)
        self.nchunks = -(-self.n // self.ipc)
        self.arrays = {}
        self.wrap_boxes = False  # True only to craft a store that breaks 10.2's uint16 rule
        self._expected = None
        self._check_metadata()

    def _check_metadata(self):
        """Invariant 3 and sections 2-3: shapes, dtypes, chunk and shard shapes, fill values, pipelines."""
        n, ips, ipc = self.n, self.ips, self.ipc
        per_image = {"key": ((n, self.f["L"]), "uint8", 0), "image_size": ((n, 2), "int32", 0),
                     "label": ((n,), "int32", -1), "written": ((n,), "uint8", 0),
                     "manifest": ((self.shards, 3 + self.cps * len(self.records)), "uint32", 0)}
        for name, (shape, dtype, fill) in per_image.items():
            a = RawArray(self.path / name)
            chunks = (1, shape[1]) if name == "manifest" else (ips, *shape[1:])
            _need((a.shape, a.dtype.name, a.chunks, a.meta["fill_value"]) == (shape, dtype, chunks, fill),
                  f"array {name}: {(a.shape, a.dtype.name, a.chunks, a.meta['fill_value'])}")
            _need(not a.sharded and a.pipeline[1]["configuration"]["level"] == 3, f"{name}: zstd level 3")
            self.arrays[name] = a
        for path, (shape, dtype) in self.records.items():
            folder = self.path / path
            if self.f["seeded"] and path in ("box", "flip"):
                _need(not folder.exists(), f"seeded store holds {path}")
                continue
            a = RawArray(folder)
            _need((a.shape, a.dtype.name, a.chunks, a.inner) == ((n, *shape), dtype, (ips, *shape), (ipc, *shape)),
                  f"array {path}: {(a.shape, a.dtype.name, a.chunks, a.inner)}")
            bl = a.pipeline[1]["configuration"]
            _need((bl["cname"], bl["clevel"], bl["shuffle"], bl["typesize"])
                  == ("lz4hc", 9, "bitshuffle", np.dtype(dtype).itemsize), f"{path}: blosc {bl}")
            _need([c["name"] for c in a.index_pipeline] == ["bytes", "crc32c"], f"{path}: index codecs")
            self.arrays[path] = a

    # ---- per-image arrays
    def per_image_chunk(self, name: str, s: int) -> np.ndarray:
        """Chunk ``s`` as invariant 9 takes it: a missing object reads as fill, rows past N are fill."""
        a = self.arrays[name]
        fill = a.meta["fill_value"]
        got = a.chunk(s)
        d = np.full(a.chunks, fill, a.dtype) if got is None else got.copy()
        d[max(0, self.n - s * self.ips):] = fill
        return d

    def per_image(self, name: str) -> np.ndarray:
        return np.concatenate([self.per_image_chunk(name, s) for s in range(self.shards)])[:self.n]

    @property
    def written(self) -> np.ndarray:
        w = self.per_image("written")
        _need(np.isin(w, (0, 1)).all(), "written values are 0 or 1")
        return w.astype(bool)

    # ---- record arrays
    def derived(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Section 10.2: box and flip of images ``i`` from the sampler, the box cast to box_dtype."""
        sizes = self.per_image("image_size")
        cfg = self.f["sampler"]
        out = [[spec_slot_sample(cfg, int(k), s, int(sizes[k, 0]), int(sizes[k, 1])) for s in range(self.m)]
               for k in i]
        boxes = np.array([[b for b, _ in row] for row in out], np.int64).reshape(len(i), self.m, 4)
        if self.f["box_dtype"] == np.uint16 and not self.wrap_boxes:
            bad = [int(k) for k in i if (sizes[k] > 65535).any()]
            _need(not bad, f"uint16 boxes cannot hold the derived boxes of images {bad}")
        flips = np.array([[f for _, f in row] for row in out], bool).reshape(len(i), self.m)
        return boxes.astype(self.f["box_dtype"]), flips

    def record_chunk(self, path: str, c: int) -> np.ndarray | None:
        """Inner chunk ``c`` of record array ``path`` (``ipc`` rows, rows past N as fill)."""
        if self.f["seeded"] and path in ("box", "flip"):
            i = np.arange(c * self.ipc, min(self.n, (c + 1) * self.ipc))
            box, flip = self.derived(i)
            d = box if path == "box" else flip
        else:
            d = self.arrays[path].inner_chunk(c)
            if d is None:
                return None
            d = d[:max(0, self.n - c * self.ipc)]
        return _full_chunk(d, self.ipc, 0)

    # ---- manifest
    def stored_manifest(self) -> np.ndarray:
        return np.concatenate([self.arrays["manifest"].chunk(s) for s in range(self.shards)])

    def expected_manifest(self) -> np.ndarray:
        """Invariant 9, row by row: both candidate tags of a record chunk (D, and D' with the rows of
        unwritten images set to fill) as a pair; the per-image tags exact."""
        if self._expected is None:
            self._expected = self._manifest()
        return self._expected

    def _manifest(self) -> np.ndarray:
        sid, written = self.f["sid"], self.written
        P = len(self.records)
        rows = np.zeros((self.shards, 3 + self.cps * P, 2), np.int64)
        for s in range(self.shards):
            for k, name in enumerate(PER_IMAGE):
                rows[s, k] = spec_tag(sid, name, s, self.per_image_chunk(name, s))
            if not written[s * self.ips:(s + 1) * self.ips].any():
                continue
            for j in range(self.cps):
                c = s * self.cps + j
                if c >= self.nchunks:
                    continue
                wmask = _full_chunk(written[c * self.ipc:(c + 1) * self.ipc], self.ipc, False)
                for p, path in enumerate(self.records):
                    d = self.record_chunk(path, c)
                    if d is None:
                        continue
                    d2 = d.copy()
                    d2[~wmask] = 0
                    rows[s, 3 + j * P + p] = [spec_tag(sid, path, c, d), spec_tag(sid, path, c, d2)]
        return rows

    def read(self, i: int) -> dict:
        """Every record of image ``i`` (a written image; every tag of every chunk it comes from compared)."""
        _need(self.written[i], f"image {i} not written")
        c, r = divmod(i, self.ipc)
        s, j = divmod(c, self.cps)
        man = self.stored_manifest()[s]
        exp = self.expected_manifest()[s]
        _need((man[:3] == exp[:3, 0]).all(), f"per-image tags of shard {s}")
        out = {}
        for p, path in enumerate(self.records):
            d = self.record_chunk(path, c)
            _need(d is not None, f"{path} chunk {c} missing")
            _need(man[3 + j * len(self.records) + p] in exp[3 + j * len(self.records) + p], f"{path} chunk {c} tag")
            out[path] = d[r]
        return out


def spec_check_manifest(st: SpecStore) -> None:
    """The stored manifest equals invariant 9's, bit for bit (a record tag may be D's or D''s)."""
    got, exp = st.stored_manifest().astype(np.int64), st.expected_manifest()
    assert got.shape == exp.shape[:2], (got.shape, exp.shape)
    ok = (got == exp[..., 0]) | (got == exp[..., 1])
    assert ok.all(), np.argwhere(~ok)


def spec_retag(path, wrap_boxes=False) -> None:
    """Rewrite the manifest as invariant 9 computes it from the store as it now is (a tool that knows the
    rule): only checks other than the tags can then catch an edit."""
    st = SpecStore(path)
    st.wrap_boxes = wrap_boxes
    rows = st.expected_manifest()[..., 1].astype(np.uint32)
    zarr.open_array(str(Path(path) / "manifest"), mode="r+")[:] = rows


# ================================================================= section 10.3: the slot sampler

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


def sampler_config(seed=7, scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_p=0.3) -> dict:
    """Section 10.2's object, spelled from the text."""
    return {"algorithm": "random_resized_crop", "rng": "splitmix64(seed, image, slot, draw)", "max_attempts": 10,
            "scale": list(scale), "ratio": list(ratio), "flip_p": flip_p, "seed": seed}


# ============================================================================ section 5: label codecs

_Q8_HEX = """
00000000 378c1a08 3798c6fb 37a69983 37b5ac2e 37c61bf2 37d80866 37eb93f8 3800721c 380c110c 3818bd20 38268eb2
3835a04d 38460ee5 3857fa0c 386b842e 3880696b 388c0778 3898b290 38a68309 38b5936b 38c600a6 38d7ea47 38eb72b4
39005fb8 390bfcb2 3918a695 392675b0 39358488 3945f005 3957d7ab 396b5dda 39805405 398bef8a 399897c3 39a664f8
39b571a2 39c5da9e 39d7bf63 39eb4241 3a00444e 3a0bdd9d 3a188346 3a264d81 3a3556b7 3a45bbae 3a579bc6 3a6b192e
3a802c95 3a8bc229 3a986375 3aa62894 3ab52bcb 3ac589b9 3ad7618b 3aead539 3b0004e1 3b0b93b7 3b182d11 3b25e8d2
3b34e0fa 3b4531db 3b56fa43 3b6a5bba 3b7f7abc 3b8b3f7a 3b97c9c6 3ba573b7 3bb456cb 3bc48eb8 3bd63995 3be97812
3bfe6da7 3c0aa068 3c170da6 3c24952c 3c334f7d 3c435721 3c54c8cf 3c67c391 3c7c68f0 3c896e91 3c95a398 3ca2e895
3cb1542a 3cc0fea8 3cd2022c 3ce47ab0 3cf88623 3d072240 3d12ebec 3d1fb238 3d2d885d 3d3c82b7 3d4cb6bf 3d5e3b09
3d712741 3d82ca0d 3d8dcd9e 3d99ab98 3da6719c 3db42d96 3dc2eda1 3dd2bfea 3de3b28d 3df5d367 3e0497f5 3e0eea71
3e19e720 3e259368 3e31f3fb 3e3f0cb3 3e4ce06a 3e5b70d2 3e6abe50 3e7ac7d7 3e85c563 3e8e8164 3e9794e2 3ea0fbe2
3eaab17a 3eb4afd1 3ebef024 3ec96ad8 3ed41785 3edeed11 3ee9e1ce 3ef4eb9a 3f000000 3f058a33 3f0b0f19 3f108978
3f15f43e 3f1b4a94 3f2087ee 3f25a818 3f2aa743 3f2f820f 3f34358f 3f38bf4e 3f3d1d4f 3f414e0a 3f45506c 3f4923cb
3f4cc7e5 3f503cd3 3f538301 3f569b26 3f598638 3f5c4564 3f5eda03 3f614593 3f6389ae 3f65a803 3f67a24c 3f697a4d
3f6b31cc 3f6cca8d 3f6e464c 3f6fa6be 3f70ed8c 3f721c4f 3f733494 3f7437d5 3f75277a 3f7604dd 3f76d141 3f778ddc
3f783bcf 3f78dc2b 3f796fef 3f79f80b 3f7a755f 3f7ae8bb 3f7b52e3 3f7bb48b 3f7c0e5c 3f7c60f2 3f7cacdd 3f7cf2a3
3f7d32c2 3f7d6dab 3f7da3c9 3f7dd57e 3f7e0325 3f7e2d10 3f7e538d 3f7e76e3 3f7e9752 3f7eb519 3f7ed06c 3f7ee981
3f7f0085 3f7f15a4 3f7f2906 3f7f3ace 3f7f4b1f 3f7f5a17 3f7f67d3 3f7f746c 3f7f7ffb 3f7f8a95 3f7f944f 3f7f9d3b
3f7fa56a 3f7facec 3f7fb3ce 3f7fba1f 3f7fbfea 3f7fc53a 3f7fca19 3f7fce91 3f7fd2aa 3f7fd66d 3f7fd9df 3f7fdd09
3f7fdfef 3f7fe298 3f7fe508 3f7fe745 3f7fe952 3f7feb33 3f7feced 3f7fee82 3f7feff5 3f7ff14a 3f7ff283 3f7ff3a1
3f7ff4a8 3f7ff599 3f7ff676 3f7ff740 3f7ff7fa 3f7ff8a4 3f7ff941 3f7ff9d0 3f7ffa53 3f7ffacc 3f7ffb3a 3f7ffba0
3f7ffbfd 3f7ffc52 3f7ffca0 3f7ffce8 3f7ffd29 3f7ffd66 3f7ffd9d 3f7ffdd0 3f7ffdfe 3f7ffe29 3f7ffe50 3f7ffe74
3f7ffe95 3f7ffeb3 3f7ffece 3f7ffee8"""
Q8 = np.array([struct.unpack(">f", bytes.fromhex(x))[0] for x in _Q8_HEX.split()], np.float32)  # Appendix B


def spec_q8_encode(p: np.ndarray) -> np.ndarray:
    """Section 5.2: the largest code with Q8[c] <= p."""
    return (np.searchsorted(Q8.astype(np.float64), np.asarray(p, np.float64), side="right") - 1).astype(np.uint8)


def _q8_whole_row(codes: np.ndarray) -> np.ndarray:
    """Section 5.2, a whole q8 row (full; logits with k null): zero codes get e, the row is normalised."""
    v = Q8[codes].astype(np.float64)
    S = v.sum(-1, keepdims=True)
    n0 = (codes == 0).sum(-1, keepdims=True)
    e = np.clip((np.maximum(1 - S, 0)) / np.maximum(n0, 1), float(Q8[1]) * 2.0**-10, float(Q8[1]) / 2)
    return (v + e * (codes == 0)) / (S + n0 * e)


def _f32_sum(x: np.ndarray) -> np.ndarray:
    """Sums over stored probabilities: float32, left to right in stored order."""
    acc = np.zeros(x.shape[:-1], np.float32)
    for k in range(x.shape[-1]):
        acc = (acc + x[..., k].astype(np.float32)).astype(np.float32)
    return acc


def _scatter(base: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
    np.put_along_axis(base, idx.astype(np.int64), vals, -1)
    return base


class SpecRefusal(ValueError):
    """The text says a reader MUST refuse this decode (sections 5.4 and 5.6)."""


def spec_decode(codec: dict, fields: dict, c: int, T: float = 1.0) -> np.ndarray:
    """Sections 5, 5.1, 5.2, 5.4-5.6: stored fields (..., per slot) to length-C distributions at temperature T.
    The T = 1 decode is in float32 as the section fixes it; temperatures and logits in float64. Raises
    SpecRefusal where the text says a reader MUST refuse."""
    name, q8 = codec["name"], codec.get("dtype") == "q8"
    if name == "logits" and q8 and T < 1:
        raise SpecRefusal("5.6: a q8 logits store is not decoded at T < 1")
    if name == "sampled" and T != 1 and not codec["logp"]:
        raise SpecRefusal("5.4: decode at T != 1 requires logp")
    first = next(iter(fields.values()))
    lead = first.shape if name in ("hard", "smoothing") else first.shape[:-1]
    if c == 1:
        return np.ones((*lead, 1), np.float64)
    if name == "sampled":
        return spec_sampled_decode(codec, fields, c, T)
    if name == "logits":
        if codec["k"] is None:  # 5.6: centred rows decode the same way, softmax(c / T)
            logq = np.log(_q8_whole_row(fields["logits"])) if q8 else fields["logits"].astype(np.float64)
            z = logq / T
            w = np.exp(z - z.max(-1, keepdims=True))
            return w / w.sum(-1, keepdims=True)
        idx = fields["indices"]
        K = idx.shape[-1]
        with np.errstate(divide="ignore"):
            l = np.log(Q8[fields["logits"]].astype(np.float64)) if q8 else fields["logits"].astype(np.float64)
        n = c - K
        r = np.maximum(0.0, 1 - np.exp(l).sum(-1, keepdims=True))
        if n > 0 and codec.get("tail") == "mean":  # 5.5
            _, logw, _ = spec_tail_interval(codec, fields, c, T)
            a = 1 / T
            wi = np.exp(a * l)
            with np.errstate(divide="ignore"):
                W = np.exp(logw)[..., None]
            Z = wi.sum(-1, keepdims=True) + W
            q = np.broadcast_to(W / n / Z, (*lead, c)).copy()
            return _scatter(q, idx, wi / Z)
        wi = np.exp(l / T)
        with np.errstate(divide="ignore"):
            wt = np.where(r > 0, np.exp(np.log(r / max(n, 1)) / T), 0.0) if n > 0 else np.zeros_like(r)
        Z = wi.sum(-1, keepdims=True) + n * wt
        q = np.broadcast_to(wt / Z, (*lead, c)).copy()
        return _scatter(q, idx, wi / Z)
    probs = fields.get("probs")
    if probs is not None:
        probs = Q8[probs] if q8 else probs.astype(np.float32)
    if name == "full":
        q = _q8_whole_row(fields["probs"]).astype(np.float32) if q8 else probs
    elif name == "hard":
        q = _scatter(np.zeros((*lead, c), np.float32), fields["indices"][..., None], np.float32(1))
    elif name == "smoothing":
        rest = np.maximum(np.float32(0), np.float32(1) - probs) / np.float32(c - 1)
        q = _scatter(np.broadcast_to(rest[..., None], (*lead, c)).astype(np.float32).copy(),
                     fields["indices"][..., None], probs[..., None])
    elif name == "ms":
        K = probs.shape[-1]
        rest = np.maximum(np.float32(0), np.float32(1) - _f32_sum(probs)) / np.float32(max(c - K, 1))
        base = np.broadcast_to(rest[..., None], (*lead, c)).astype(np.float32).copy()
        q = _scatter(base, fields["indices"], probs)
    else:  # mr
        K = probs.shape[-1]
        s = _f32_sum(probs)[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
            kept = np.where(s > 0, probs / s, np.float32(1 / K)).astype(np.float32)
        q = _scatter(np.zeros((*lead, c), np.float32), fields["indices"], kept)
    if T == 1:
        return q
    with np.errstate(divide="ignore"):
        lq = np.log(q.astype(np.float64))
    w = np.exp((lq - lq.max(-1, keepdims=True)) / T)
    return w / w.sum(-1, keepdims=True)


def spec_encode(codec: dict, x: np.ndarray, keys: np.ndarray | None = None) -> dict:
    """Section 5 (and 5.1, 5.4-5.6): what a byte-identical writer stores for inputs ``x`` (..., C)
    (probabilities, or raw outputs for ``logits``); ``keys`` (section 5.3, one per row; default: the content
    keys) only matter for ``sampled``."""
    name, dtype, k = codec["name"], codec.get("dtype"), codec.get("k")
    if name == "sampled":
        return spec_sampled_encode(codec, x, keys)
    q8 = dtype == "q8"
    c = x.shape[-1]
    idx_t = np.uint16 if c <= 65536 else np.int32

    def store(p):
        return spec_q8_encode(p) if q8 else np.asarray(p, np.float32).astype(dtype)

    if name == "logits":
        z = x.astype(np.float64)
        m = z.max(-1, keepdims=True)
        if codec.get("centred"):  # 5.6: c = z - max z, rounded toward -inf (the maximum is exactly 0)
            return {"logits": _down(z - m, dtype)}
        l = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
        order = np.argsort(-l, -1, kind="stable")
        if k is not None:
            kept = np.take_along_axis(l, order[..., :k], -1)
            out = {"indices": order[..., :k].astype(idx_t), "logits": _down(kept, dtype)}
            if codec.get("tail") == "mean":  # 5.5: the mean tail log-probability, float64, rounded toward -inf
                tail = np.take_along_axis(l, order[..., k:], -1)
                out["tail_mean"] = _down(tail.sum(-1) / (c - k), "float32" if dtype == "float32" else "float16")
            return out
        return {"logits": _down(l, dtype)}
    order = np.argsort(-x, -1, kind="stable")  # p descending, ties to the lower class index
    if name == "full":
        return {"probs": store(x)}
    top1 = order[..., 0]
    if name == "hard":
        return {"indices": top1.astype(idx_t)}
    if name == "smoothing":
        return {"indices": top1.astype(idx_t), "probs": store(np.take_along_axis(x, top1[..., None], -1)[..., 0])}
    return {"indices": order[..., :k].astype(idx_t), "probs": store(np.take_along_axis(x, order[..., :k], -1))}


def _down(l: np.ndarray, dtype: str) -> np.ndarray:
    """Float64 log-probabilities rounded toward -inf in the storage dtype (q8: codes of exp(l))."""
    if dtype == "q8":
        return spec_q8_encode(np.exp(l))
    t = np.dtype(dtype)
    v = l.astype(t)
    over = v.astype(np.float64) > l
    v[over] = np.nextafter(v[over], t.type(-np.inf))
    return v


# ================================================ sections 5.3 (crop keys), 5.4 (sampled), 5.5 (tail statistic)


def spec_crop_key(i: int, s: int) -> int:
    """Section 5.3: key(i, s) = mix(mix((i + 1) * G) + (s + 1) * G), uint64 wrap-around."""
    return _mix((_mix(((i + 1) * _G) & _MASK) + (s + 1) * _G) & _MASK)


def spec_content_key(row: np.ndarray) -> int:
    """Section 5.3: mix(sum_i mix(bits_i + (i + 1) * G)) (sum mod 2^64), bits_i the float32 bit pattern of x_i."""
    acc = 0
    for i, b in enumerate(np.asarray(row, np.float32).view(np.uint32).tolist()):
        acc = (acc + _mix((b + (i + 1) * _G) & _MASK)) & _MASK
    return _mix(acc)


def spec_crop_keys(n: int, m: int) -> np.ndarray:
    return np.array([[spec_crop_key(i, s) for s in range(m)] for i in range(n)], np.uint64)


def _generation(codec: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Section 5.4, generation distribution: (t, log p) in float64 for one row."""
    with np.errstate(divide="ignore"):
        x64 = x.astype(np.float64)
        t = (x64 if codec["input"] == "logits" else np.log(x64)) / codec["temperature"]
    l = t - t.max()
    return t, l - np.log(np.exp(l).sum())


def spec_sampled_encode(codec: dict, x: np.ndarray, keys: np.ndarray | None) -> dict:
    """Section 5.4, row by row: head, draws from the row's key, tally in canonical form."""
    c, S, K = x.shape[-1], codec["s"], codec["k"] or 0
    specs = spec_codec_fields(codec, c)
    rows = x.reshape(-1, c)
    keys = (np.array([spec_content_key(r) for r in rows], np.uint64) if keys is None
            else np.asarray(keys, np.uint64).reshape(-1))
    out = {f: np.zeros((len(rows), *shape), dtype) for f, (shape, dtype) in specs.items()}
    base = _mix((codec["seed"] + _G) & _MASK)
    for j, (xr, kappa) in enumerate(zip(rows, keys.tolist())):
        t, logp = _generation(codec, xr)
        head = np.argsort(-xr, kind="stable")[:K]
        if K:
            out["indices"][j] = head
            p = np.exp(logp[head])
            out["probs"][j] = spec_q8_encode(p) if codec["dtype"] == "q8" else p.astype(codec["dtype"])
        cw = xr.astype(np.float64) if codec["input"] == "probs" and codec["temperature"] == 1 else np.exp(t - t.max())
        cw[head] = 0
        F = np.cumsum(cw)  # float64, left to right
        counts = np.zeros(c, np.int64)
        if F[-1] > 0:
            row = _mix(kappa ^ base)
            for d in range(S):
                u = (_mix((row + (d + 1) * _G) & _MASK) >> 11) * 2.0**-53
                i = int(np.searchsorted(F, u * float(F[-1]), side="right"))  # the smallest i with F_i > u F_{C-1}
                counts[i if i < c else int(np.flatnonzero(cw > 0)[-1])] += 1
        drawn = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
        out["sample_indices"][j, :len(drawn)] = drawn
        out["sample_counts"][j, :len(drawn)] = counts[drawn]
        if codec["logp"]:
            out["sample_logp"][j, :len(drawn)] = logp[drawn].astype(specs["sample_logp"][1])
    return {f: v.reshape(*x.shape[:-1], *v.shape[1:]).astype(specs[f][1]) for f, v in out.items()}


def spec_sampled_decode(codec: dict, fields: dict, c: int, T: float) -> np.ndarray:
    """Section 5.4: decode at T = 1 (unbiased estimate of p, float32) and at T != 1 (self-normalised importance
    sampling with the stored log-probabilities, float64)."""
    K = codec["k"] or 0
    si, cnt = fields["sample_indices"].astype(np.int64), fields["sample_counts"].astype(np.float64)
    lead = si.shape[:-1]
    if K:
        hp = (Q8[fields["probs"]] if codec["dtype"] == "q8" else fields["probs"]).astype(np.float64)
        acc = np.zeros(lead)
        for i in range(K):  # left to right, float64
            acc = acc + hp[..., i]
        r = np.maximum(0.0, 1 - acc)
    else:
        r = np.ones(lead)
    n = cnt.sum(-1)
    a = 1 / T
    q = np.zeros((*lead, c))
    with np.errstate(divide="ignore", invalid="ignore"):
        drawn = r[..., None] * cnt / np.where(n > 0, n, 1)[..., None]
        if T != 1:
            drawn = drawn * np.exp((a - 1) * fields["sample_logp"].astype(np.float64))
    drawn = np.where(cnt > 0, drawn, 0.0)  # padding entries (index 0, count 0) add nothing
    np.add.at(q, (*np.indices(si.shape)[:-1], si), drawn)
    tail = np.ones((*lead, c), bool)
    if K:
        np.put_along_axis(tail, fields["indices"].astype(np.int64), False, -1)
        np.put_along_axis(q, fields["indices"].astype(np.int64), hp ** a if T != 1 else hp, -1)
    empty = (n == 0)[..., None] & tail
    q = np.where(empty, (r[..., None] / (c - K)) ** (a if T != 1 else 1), q)
    if T == 1:
        return q.astype(np.float32)
    return q / q.sum(-1, keepdims=True)


_LOG_STEP = {"float16": 2.0**-10, "float32": 2.0**-23}


def spec_tail_interval(codec: dict, fields: dict, c: int, T: float):
    """Section 5.5 for top-K logits: (log W_lo, log W, log W_hi) per crop (float64), W the tail's unnormalised
    mass at T: `W_u = n (r/n)^a`, `log W = log W_u - a (1 - a) D` clipped into the interval (tail_mean), or
    `W_u` (no statistic, or mu = -inf); at T = 1, W = r."""
    q8 = codec["dtype"] == "q8"
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l = np.log(Q8[fields["logits"]].astype(np.float64)) if q8 else fields["logits"].astype(np.float64)
        n, a = c - l.shape[-1], 1 / T
        r = np.maximum(0.0, 1 - np.exp(l).sum(-1))
        lr = np.log(r)
        lw_u = math.log(n) + a * (lr - math.log(n))
        lk = l.min(-1)  # the smallest kept log-probability, plus one storage step
        h = lk + (22 / 254 if q8 else np.abs(lk) * _LOG_STEP[codec["dtype"]])
        if q8:  # a kept code 0 (-inf) says only p < Q8[1]
            h = np.where(np.isneginf(lk), math.log(Q8[1]), h)
        h = np.maximum(np.minimum(h, lr), lr - math.log(n))
        y = np.exp(h)
        n1 = np.minimum(np.floor(r / y), n - 1)
        v = np.minimum(r - n1 * y, y)
        lw_v = np.log(n1 * np.exp(a * h) + v ** a)
        if a <= 1:
            lo, hi = lw_v, lw_u
        else:
            lo, hi = lw_u, lw_v
        lw = lw_u
        if codec.get("tail") == "mean":
            mu = fields["tail_mean"].astype(np.float64)
            ok = mu > -np.inf
            D = np.maximum(0.0, lr - math.log(n) - mu)
            if a <= 1:
                lo = np.where(ok, np.maximum(lw_u - a * D, lw_v), lo)
            lw = np.where(ok, np.clip(lw_u - a * (1 - a) * D, lo, hi), lw_u)
        if T == 1:
            lw = lr
        lw = np.where(r > 0, lw, -np.inf)  # no tail mass: W = 0
    return lo, lw, hi


# ===================================================== sections 6.2-6.4: the policies added to section 6.3

POLICY_COLUMNS = {  # section 6.3's tables (column, dtype, shape) of the policies added since 4.0's first draft
    "random_grayscale": [("gray_applied", "bool", [])],
    "gaussian_blur": [("blur_sigma", "float16", [])],
    "mixup_exact": [("mixup_exact_partner", "int32", []), ("mixup_exact_lam", "float32", [])],
    "cutmix_box": [("cutmix_box_partner", "int32", []), ("cutmix_box_rect", "uint16", [4]),
                   ("cutmix_box_lam", "float32", [])],
    "external_seed": [("external_seed", "int32", []), ("external_partner", "int32", []),
                      ("external_partner_seed", "int32", [])],
}


def spec_policy_columns(cfg: dict) -> list[tuple[str, str, list]]:
    """Section 6.3: a policy's columns; `partner_crop` adds `partner_crop_<c>` "as c" for each column of each
    policy of its `policies`."""
    if cfg["name"] == "partner_crop":
        inner = [("partner_crop_" + c, d, sh) for sub in cfg["policies"] for c, d, sh in spec_policy_columns(sub)]
        return [("partner_crop_box", "int32", [4]), ("partner_crop_flip", "bool", [])] + inner
    return POLICY_COLUMNS[cfg["name"]]


def spec_partner(rng: np.random.Generator, i: int, n: int, window: int) -> int:
    """Section 6.3 (`mixup`): the partner within a strided window."""
    if window == 0 or window >= n:
        S = 1
    else:
        S = 1
        while -(-n // S) > window:
            S *= 2
    size = (n - 1 - i % S) // S + 1
    if size > 1:
        r = int(rng.integers(0, size - 1))
        return i % S + S * (r + (r >= i // S))
    rng.integers(0, 1)
    return i


def spec_policy_sample(cfg: dict, seed: int, i: int, s: int, H: int, W: int, n: int) -> dict:
    """Sections 6.2-6.3: slot (i, s)'s draws from default_rng(SeedSequence([seed, crc32(name), i, s])), in the
    order the policy lists, cast to the column dtypes (H, W: the crop's output size)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(cfg["name"].encode("ascii")), i, s]))
    name = cfg["name"]
    applied = rng.random() < cfg["p"]
    if name == "random_grayscale":
        return {"gray_applied": np.bool_(applied)}
    if name == "gaussian_blur":
        lo, hi = cfg["sigma"]
        sigma = rng.uniform(lo, hi)  # drawn either way
        return {"blur_sigma": np.float16(sigma if applied else 0)}
    lam = rng.beta(cfg["alpha"], cfg["alpha"])
    if name == "mixup_exact":
        j = spec_partner(rng, i, n, cfg["window"])
        return {"mixup_exact_partner": np.int32(j if applied else -1),
                "mixup_exact_lam": np.float32(lam if applied else 1)}
    r_x, r_y = int(rng.integers(0, W)), int(rng.integers(0, H))
    j = spec_partner(rng, i, n, cfg["window"])
    r = 0.5 * math.sqrt(1 - lam)
    hw, hh = int(r * W), int(r * H)
    rect = [max(r_y - hh, 0), max(r_x - hw, 0), min(r_y + hh, H), min(r_x + hw, W)]
    return {"cutmix_box_partner": np.int32(j if applied else -1),
            "cutmix_box_rect": np.array(rect if applied else [0] * 4, np.uint16),
            "cutmix_box_lam": np.float32(lam if applied else 1)}


# ======================================================================= section 11.3: label-map pooling

_f = np.float32


def _bilinear(D: np.ndarray, y: np.float32, x: np.float32) -> np.ndarray:
    """Step 4's bilinear value of every class of the dense map ``D`` (C, S, S) at one sample."""
    S = D.shape[1]
    if not (-1 <= y <= S and -1 <= x <= S):
        return np.zeros(D.shape[0])
    lo_hi = []
    for v in (y, x):
        v = _f(0) if v <= 0 else v
        lo = int(v)  # trunc
        if lo >= S - 1:
            lo = hi = S - 1
            v = _f(S - 1)
        else:
            hi = lo + 1
        lv = _f(v - _f(lo))
        lo_hi.append((lo, hi, lv, _f(_f(1) - lv)))
    (ylo, yhi, ly, hy), (xlo, xhi, lx, hx) = lo_hi
    w = [_f(hy * hx), _f(hy * lx), _f(ly * hx), _f(ly * lx)]
    cells = [D[:, ylo, xlo], D[:, ylo, xhi], D[:, yhi, xlo], D[:, yhi, xhi]]
    return sum(float(wk) * ck.astype(np.float64) for wk, ck in zip(w, cells))


def spec_pool(lm: dict, c: int, indices: np.ndarray, scores: np.ndarray, H: int, W: int, box, phi: bool):
    """Section 11.3 steps 1-5 for one crop: (g, g, C) soft labels (float64 softmax of the pooled map)."""
    S, g = lm["size"], lm["pool"]["grid"]
    D = np.full((c, S, S), _f(lm["fill"]), np.float32)  # 1. dense map
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    for k in range(indices.shape[0]):
        D[indices[k].astype(np.int64), yy, xx] = scores[k].astype(np.float32)
    top, left, h, w = (int(v) for v in box)
    if lm["flip"] and phi:  # 2. flip
        D = D[:, :, ::-1]
        left = W - left - w
    t, l = top / H, left / W  # 3. box, float64
    b, r = t + h / H, l + w / W
    o = _f(lm["box"]["offset"])
    tp, lp, bp, rp = (_f(_f(_f(v) * _f(S)) + o) for v in (t, l, b, r))
    x1, y1, x2, y2 = (lp, tp, rp, bp) if lm["box"]["order"] == "xy" else (tp, lp, bp, rp)
    aligned, ratio = lm["pool"]["aligned"], lm["pool"]["sampling_ratio"]
    delta = _f(0.5) if aligned else _f(0)

    def axis(v1, v2):  # 4. per axis: sample coordinates of every bin
        start = _f(v1 - delta)
        side = _f(_f(v2 - delta) - start)
        if not aligned:
            side = max(side, _f(1))
        bin_ = _f(side / _f(g))
        n = ratio if ratio > 0 else math.ceil(_f(side / _f(g)))
        return [[_f(_f(start + _f(_f(q) * bin_)) + _f(_f(_f(j + 0.5) * bin_) / _f(n))) for j in range(max(n, 0))]
                for q in range(g)]

    ys, xs = axis(y1, y2), axis(x1, x2)
    pooled = np.zeros((g, g, c))
    for u in range(g):
        for v in range(g):
            acc = sum((_bilinear(D, sy, sx) for sy in ys[u] for sx in xs[v]), np.zeros(c))
            pooled[u, v] = acc / max(len(ys[u]) * len(xs[v]), 1)
    z = pooled / lm["temperature"]  # 5. softmax
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ================================================================ section 7: layout; section 8: store id


def spec_layout(n: int, row_bytes: int, R: int) -> tuple[int, int]:
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
    ips = min(ips, max(ipc, pow2_floor(Fraction(2**20, R))))
    ips = max(ips, ipc * ceil_div(n, 1024 * ipc))
    ips = min(ips, ipc * ceil_div(n, ipc))
    ips = max(ipc, ips // ipc * ipc)
    return ipc, ips


def spec_default_store_id(header: dict, st: SpecStore) -> str:
    """Section 8: sha256 of the canonical JSON of {header without store_id (and the unchecksummed keys),
    meta without the volatile keys}, then the raw little-endian key, image_size and label arrays."""
    body = {k: v for k, v in header.items() if k not in UNCHECKSUMMED + ("store_id",)}
    meta = {k: v for k, v in header.get("meta", {}).items() if k not in VOLATILE_META}
    h = hashlib.sha256(spec_canonical_json({"header": body, "meta": meta}).encode("utf-8"))
    for name in ("key", "image_size", "label"):
        h.update(np.ascontiguousarray(st.per_image(name)).astype(st.arrays[name].dtype).tobytes())
    return h.hexdigest()[:32]


# ============================================================== section 12: stores of 2.0 and 3.0

LEGACY_REQUIRED = ["num_images", "crops_per_image", "num_classes", "codec", "images_per_chunk", "images_per_shard",
                   "box_dtype", "key_length", "aug", "augment", "has_labels", "checksum"]


class SpecLegacyStore:
    """A 2.0/3.0 store read by section 12's rules: flat header, tags without store-id bytes, manifest
    (ceil(N / ipc), P) whose row c tags inner chunk c of every record array; per-image arrays unbound."""

    def __init__(self, path):
        self.path = Path(path)
        h = json.loads((self.path / "zarr.json").read_text())["attributes"][ATTR]
        version = h["format_version"]
        _need(version.split(".")[0] in ("2", "3"), version)
        for key in LEGACY_REQUIRED + (["crop_sampler"] if version.startswith("3") else []):
            _need(key in h, f"required key {key}")
        _need(h["checksum"] == spec_checksum(h), "checksum")
        self.h = h
        self.n, self.m, self.c = h["num_images"], h["crops_per_image"], h["num_classes"]
        self.ipc, self.ips = h["images_per_chunk"], h["images_per_shard"]
        self.seeded = version.startswith("3")
        self.sampler = spec_parse_sampler(h["crop_sampler"]) if self.seeded else None
        facts = {"kind": "regions", "m": self.m, "c": self.c, "aug": h["aug"], "codec": h["codec"],
                     "box_dtype": np.dtype(h["box_dtype"])}
        self.records = spec_record_arrays(facts)
        self.arrays = {p: RawArray(self.path / p) for p in self.records
                       if not (self.seeded and p in ("box", "flip"))}
        for name in ("key", "image_size", "label", "written", "manifest"):
            self.arrays[name] = RawArray(self.path / name)
        _need(self.arrays["written"].chunks == (self.ips,), "written chunked per shard")
        for name in ("key", "image_size", "label"):
            _need(self.arrays[name].chunks[0] == min(self.n, 65536), f"{name} chunked by min(N, 65536) images")
        _need(self.arrays["manifest"].shape == (-(-self.n // self.ipc), len(self.records)), "manifest shape")
        _need(self.arrays["manifest"].chunks == (self.ips // self.ipc, len(self.records)), "manifest chunks")

    def per_image(self, name: str) -> np.ndarray:
        a = self.arrays[name]
        return np.concatenate([a.chunk(s) for s in range(-(-a.shape[0] // a.chunks[0]))])[:a.shape[0]]

    def record_chunk(self, path: str, c: int) -> np.ndarray:
        rows = np.arange(c * self.ipc, min(self.n, (c + 1) * self.ipc))
        if self.seeded and path in ("box", "flip"):
            sizes = self.per_image("image_size")
            out = [[spec_slot_sample(self.sampler, int(i), s, int(sizes[i, 0]), int(sizes[i, 1]))
                    for s in range(self.m)] for i in rows]
            d = (np.array([[b for b, _ in r] for r in out]).astype(self.h["box_dtype"]) if path == "box"
                 else np.array([[f for _, f in r] for r in out], bool))
        else:
            d = self.arrays[path].inner_chunk(c)[:len(rows)]
        return _full_chunk(d, self.ipc, 0)

    def check_manifest(self) -> None:
        man = self.per_image("manifest")
        for c in range(man.shape[0]):
            for p, path in enumerate(self.records):
                _need(man[c, p] == spec_tag(b"", path, c, self.record_chunk(path, c)), f"{path} chunk {c} tag")

    def read_all(self) -> dict:
        return {path: np.concatenate([self.record_chunk(path, c) for c in range(-(-self.n // self.ipc))])[:self.n]
                for path in self.records}


# ============================================================================== stores written by fkdstore

CODEC_STORES = {  # name: (codec config spelled per section 5, seeded crops?)
    "ms_f16": ({"name": "ms", "k": 3, "dtype": "float16"}, False),
    "ms_q8": ({"name": "ms", "k": 3, "dtype": "q8"}, True),
    "full_f16": ({"name": "full", "dtype": "float16"}, True),
    "full_q8": ({"name": "full", "dtype": "q8"}, False),
    "hard": ({"name": "hard"}, True),
    "smoothing_f32": ({"name": "smoothing", "dtype": "float32"}, False),
    "mr_f16": ({"name": "mr", "k": 2, "dtype": "float16"}, True),
    "logits_f32": ({"name": "logits", "k": None, "dtype": "float32"}, False),
    "logits_q8": ({"name": "logits", "k": None, "dtype": "q8"}, True),
    "logits_k3_f16": ({"name": "logits", "k": 3, "dtype": "float16"}, True),
    "logits_k3_q8": ({"name": "logits", "k": 3, "dtype": "q8"}, False),
    "logits_k3_tail": ({"name": "logits", "k": 3, "dtype": "float32", "tail": "mean", "centred": False}, False),
    "logits_centred": ({"name": "logits", "k": None, "dtype": "float16", "tail": None, "centred": True}, True),
    "sampled_logits": ({"name": "sampled", "s": 40, "k": 2, "temperature": 1.5, "input": "logits", "dtype": "float16",
                        "logp": True, "seed": 2**64 - 3}, True),
    "sampled_probs": ({"name": "sampled", "s": 300, "k": None, "temperature": 1.0, "input": "probs", "dtype": "q8",
                       "logp": False, "seed": 9}, False),
    "sampled_q8_head": ({"name": "sampled", "s": 3, "k": 1, "temperature": 0.7, "input": "probs", "dtype": "q8",
                         "logp": True, "seed": 0}, False),
}
AUGMENT = [{"name": "color_jitter", "brightness": [0.6, 1.4], "contrast": [0.6, 1.4], "saturation": [1.0, 1.0],
            "hue": [-0.05, 0.05]},
           {"name": "mixup", "alpha": 0.2, "p": 1.0, "window": 0}]
AUG_COLUMNS = [{"name": "cj_factors", "kind": "float", "dtype": "float16", "shape": [4]},  # section 6.3's tables
               {"name": "cj_order", "kind": "int", "dtype": "uint8", "shape": []},
               {"name": "mixup_partner", "kind": "index", "dtype": "int32", "shape": []},
               {"name": "mixup_lam", "kind": "int", "dtype": "uint8", "shape": []}]
ONE_SHARD = {"images_per_chunk": 8, "images_per_shard": 16}  # cheaper stores (one shard, rows past N in chunk 1)
ONE_SHARD_STORES = {"logits_k3_tail", "logits_centred", "sampled_logits", "sampled_probs", "sampled_q8_head", "aug2",
                    "ext"}
AUGMENT2 = [{"name": "random_grayscale", "p": 0.5},  # section 6.3's added policies, every parameter spelled
            {"name": "gaussian_blur", "kernel_size": [3, 5], "sigma": [0.5, 2.0], "p": 0.5},
            {"name": "mixup_exact", "alpha": 0.4, "p": 0.7, "window": 0},
            {"name": "cutmix_box", "alpha": 1.0, "p": 0.7, "window": 2}]
EXTERNAL = [{"name": "external_seed", "library": "timm", "pipeline": "create_transform(is_training=True)",
             "rng": "numpy PCG64(seed)", "pair_rule": "seed_a ^ seed_b"}]
AUG_SEED = 77
REPLAY = {"input_size": [32, 48], "interpolation": "bicubic", "mean": [0.5, 0.25, 0], "std": [0.25, 0.5, 1]}
LABEL_MAPS = {  # section 11.1's object, spelled from the text
    "map_relabel": {"size": 5, "k": 3, "dtype": "float32", "fill": 0.0, "box": {"order": "yx", "offset": -0.5},
                    "pool": {"op": "roi_align", "sampling_ratio": -1, "aligned": False, "grid": 1},
                    "temperature": 1.0, "flip": False},
    "map_tokens": {"size": 4, "k": 2, "dtype": "float16", "fill": -1.5, "box": {"order": "xy", "offset": 0.25},
                   "pool": {"op": "roi_align", "sampling_ratio": 2, "aligned": True, "grid": 3},
                   "temperature": 2.0, "flip": True},
}


def make_inputs(n=N, m=M, c=C, seed=0, sides=(20, 90)):
    """Random image sizes, stored crops inside them, teacher logits and their softmax, keys, labels."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*sides, (n, 2))
    h = rng.integers(1, sizes[:, None, 0] + 1, (n, m))
    w = rng.integers(1, sizes[:, None, 1] + 1, (n, m))
    top = (rng.random((n, m)) * (sizes[:, None, 0] - h + 1)).astype(int)
    left = (rng.random((n, m)) * (sizes[:, None, 1] - w + 1)).astype(int)
    logits = rng.normal(size=(n, m, c)) * 2.5
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return {"sizes": sizes, "boxes": np.stack([top, left, h, w], -1), "flips": rng.random((n, m)) < 0.5,
            "logits": logits.astype(np.float32), "probs": probs.astype(np.float32),
            "keys": [f"cls{i % 3}/img_{i:03d}.jpg" for i in range(n)], "labels": rng.integers(-1, c, n)}


def write_regions(path, d, codec, *, seeded=False, puts=None, sampler=None, **kw):
    """A regions store written through the public API; ``puts`` lists the image index arrays put, in order
    (default: two puts out of order). Returns the boxes and flips the teacher saw."""
    n, m, c = d["probs"].shape
    cfg = (sampler or sampler_config()) if seeded else None
    boxes, flips = d["boxes"], d["flips"]
    if seeded:  # the teacher saw the sampler's crops (section 10.3, this file's implementation)
        out = [[spec_slot_sample(cfg, i, s, int(d["sizes"][i, 0]), int(d["sizes"][i, 1])) for s in range(m)]
               for i in range(n)]
        boxes = np.array([[b for b, _ in row] for row in out])
        flips = np.array([[f for _, f in row] for row in out])
    kw.setdefault("images_per_chunk", IPC)
    kw.setdefault("images_per_shard", IPS)
    x = _codec_input(codec, d)
    puts = [np.arange(n // 2, n), np.arange(n // 2)] if puts is None else puts
    aug = kw.pop("aug_values", None)
    with fkdstore.write(path, num_images=n, crops_per_image=m, num_classes=c, codec=codec, image_keys=d["keys"],
                        image_sizes=d["sizes"], labels=d["labels"], crop_sampler=cfg, **kw) as w:
        for i in puts:
            a = None if aug is None else {k: v[i] for k, v in aug.items()}
            w.put(i, None if seeded else boxes[i], None if seeded else flips[i], x[i], aug=a)
    return boxes, flips


def _codec_input(codec: dict, d: dict) -> np.ndarray:
    """What the codec's encode takes: raw outputs for `logits` and `sampled` with input logits, else
    probabilities."""
    return d["logits"] if codec["name"] == "logits" or codec.get("input") == "logits" else d["probs"]


def make_maps(n, lm, c, seed=0):
    """Random label maps for section 11.1's object ``lm``: distinct class ids per cell, raw scores."""
    rng = np.random.default_rng(seed)
    S, K = lm["size"], lm["k"]
    idx = np.argsort(rng.random((n, S, S, c)), -1)[..., :K].transpose(0, 3, 1, 2)
    scores = (rng.normal(size=(n, K, S, S)) * 3).astype(lm["dtype"])
    return idx.astype(np.uint16), scores


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    """Durability is not what this file checks: skip the writer's fsync calls (the bytes are the same)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def stores(tmp_path_factory, _no_fsync):
    """Every store the spec-reader tests read: one per codec, an augmented store, label-map stores."""
    root = tmp_path_factory.mktemp("stores")
    d = make_inputs()
    out = {"inputs": d}
    for name, (codec, seeded) in CODEC_STORES.items():
        out[name] = root / name
        layout = ONE_SHARD if name in ONE_SHARD_STORES else {}
        out[name, "crops"] = write_regions(out[name], d, codec, seeded=seeded, replay=REPLAY if seeded else None,
                                           **layout)
    rng = np.random.default_rng(5)
    cj = np.stack([rng.uniform(0.7, 1.3, (N, M)), rng.uniform(0.7, 1.3, (N, M)), np.ones((N, M)),
                   rng.uniform(-0.04, 0.04, (N, M))], -1).astype(np.float16)
    augv = {"cj_factors": cj, "cj_order": rng.integers(0, 24, (N, M)).astype(np.uint8),
            "mixup_partner": np.tile(((np.arange(N) + 1) % N)[:, None], (1, M)).astype(np.int32),
            "mixup_lam": rng.integers(0, 255, (N, M)).astype(np.uint8)}
    out["aug"], out["aug", "values"] = root / "aug", augv
    out["aug", "crops"] = write_regions(root / "aug", d, {"name": "ms", "k": 2, "dtype": "float16"},
                                        augment=AUGMENT, aug_values=augv, replay=REPLAY)
    hw = REPLAY["input_size"]
    drawn = [[{k: v for cfg in AUGMENT2 for k, v in spec_policy_sample(cfg, AUG_SEED, i, s, *hw, N).items()}
              for s in range(M)] for i in range(N)]
    augv2 = {c: np.array([[slot[c] for slot in row] for row in drawn])
             for cfg in AUGMENT2 for c, _, _ in spec_policy_columns(cfg)}
    out["aug2"], out["aug2", "values"] = root / "aug2", augv2
    out["aug2", "crops"] = write_regions(root / "aug2", d, {"name": "ms", "k": 2, "dtype": "float16"},
                                         augment=AUGMENT2, aug_values=augv2, replay=REPLAY, **ONE_SHARD)
    partner = np.tile(((np.arange(N) + 3) % N)[:, None], (1, M)).astype(np.int32)
    partner[::2] = -1
    ext = {"external_seed": rng.integers(-2**31, 2**31, (N, M)).astype(np.int32), "external_partner": partner,
           "external_partner_seed": np.where(partner >= 0, rng.integers(0, 2**31, (N, M)), 0).astype(np.int32)}
    out["ext"], out["ext", "values"] = root / "ext", ext
    whole = {"boxes": np.concatenate([np.zeros((N, M, 2), int), np.tile(d["sizes"][:, None], (1, M, 1))], -1),
             "flips": np.zeros((N, M), bool)}  # 6.3: placeholders, the whole image and no flip
    out["ext", "crops"] = write_regions(root / "ext", dict(d, **whole), {"name": "hard"}, augment=EXTERNAL,
                                        aug_values=ext, **ONE_SHARD)
    for name, lm in LABEL_MAPS.items():
        idx, scores = make_maps(N, lm, C, seed=len(name))
        out[name], out[name, "maps"] = root / name, (idx, scores)
        with fkdstore.write(root / name, num_images=N, num_classes=C, image_keys=d["keys"], image_sizes=d["sizes"],
                            label_map=lm, images_per_chunk=2, images_per_shard=4) as w:
            w.put_maps(np.arange(N), idx, scores)
    return out


REGION_STORES = [*CODEC_STORES, "aug", "aug2", "ext"]
ALL_STORES = [*REGION_STORES, *LABEL_MAPS]


def _header(p) -> dict:
    return json.loads((Path(p) / "zarr.json").read_text())["attributes"][ATTR]


def _edit_header(p, fn, *, checksum=True) -> None:
    """Edit the header with ``fn(header)``; with ``checksum`` the checksum is recomputed by THIS file's
    section 1.2 (an edit by a tool that knows the rule), else left as it was (a hand edit)."""
    zj = Path(p) / "zarr.json"
    doc = json.loads(zj.read_text())
    fn(doc["attributes"][ATTR])
    if checksum:
        doc["attributes"][ATTR]["checksum"] = spec_checksum(doc["attributes"][ATTR])
    zj.write_text(json.dumps(doc))


def _copy(stores, name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(stores[name], dst)
    return dst


def _raises(cls, fn, *parts):
    """``fn()`` raises the spec's error class ``cls`` with every part in the text."""
    with pytest.raises(FkdstoreError) as e:
        fn()
    assert isinstance(e.value, cls), (type(e.value).__name__, str(e.value))
    for part in parts:
        assert part in str(e.value), (part, str(e.value))
    return str(e.value)


def _read_everything(p):
    """Open with fkdstore and touch every per-image array and every record."""
    with fkdstore.open(p) as r:
        r.image_keys, r.image_sizes, r.labels  # noqa: B018 (each is checked against its tags)
        return r.read_batch(np.arange(r.num_images))


def _set(h: dict, dotted: str, value) -> None:
    """Set (or with ``value is DROP`` delete) a dotted key path in a header; list items by index."""
    parts = dotted.split(".")
    obj = h
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    if value is DROP:
        del obj[parts[-1]]
    else:
        obj[parts[-1]] = value


DROP = object()


def _write_shard(f: Path, chunks: list[bytes | None]) -> None:
    """A shard file by section 3's words: inner chunks, then the index (offset, nbytes) uint64 LE with
    2^64 - 1 for an absent chunk, then the index's crc32c."""
    body, index = b"", []
    for ch in chunks:
        index.append([MISSING, MISSING] if ch is None else [len(body), len(ch)])
        body += ch or b""
    tail = np.array(index, "<u8").tobytes()
    f.write_bytes(body + tail + crc32c.crc32c(tail).to_bytes(4, "little"))


def _inner_chunks(f: Path, per_shard: int) -> list[bytes | None]:
    raw = f.read_bytes()
    index = np.frombuffer(raw[-(per_shard * 16 + 4):-4], "<u8").reshape(-1, 2)
    return [None if int(o) == MISSING else raw[int(o):int(o) + int(n)] for o, n in index]


def _chunk_bytes(a: np.ndarray) -> bytes:
    """An inner chunk by section 3's pipeline: bytes (little) -> blosc lz4hc 9 bitshuffle -> crc32c."""
    body = Blosc(cname="lz4hc", clevel=9, shuffle=Blosc.BITSHUFFLE).encode(np.ascontiguousarray(a))
    return body + crc32c.crc32c(body).to_bytes(4, "little")


def _rewrite_record(p, path: str, values: np.ndarray) -> None:
    """Rewrite record array ``path`` with ``values`` (N, ...) as section 3 and invariant 8 say a writer does:
    every inner chunk of the array materialised, rows past N as fill."""
    st = SpecStore(p)
    a = st.arrays[path]
    for s in range(st.shards):
        chunks = []
        for c in range(s * st.cps, (s + 1) * st.cps):
            rows = values[c * st.ipc:(c + 1) * st.ipc].astype(a.dtype)
            chunks.append(_chunk_bytes(_full_chunk(rows, st.ipc, 0)) if c < st.nchunks else None)
        _write_shard(a._file(s), chunks)


def _edit_per_image(p, name: str, fn) -> None:
    a = zarr.open_array(str(Path(p) / name), mode="r+")
    v = a[:]
    fn(v)
    a[:] = v


def _sum_atol(dtype: str, n: int) -> float:
    rel, ab = {"float16": (2**-11, 2**-25), "float32": (2**-24, 2**-150), "q8": (0.0905, 0)}[dtype]
    return 0.001 + rel + n * ab


def _logits_atol(dtype: str, n: int) -> float:
    """Section 5: the stored-mass bound of float16/float32 `logits` rows of `n` log-probabilities."""
    return 0.001 + max(math.log(n), 1) * {"float16": 2**-10, "float32": 2**-23}[dtype]


# ================================================= 1. the spec's reader reads what fkdstore writes, and agrees with it


@pytest.mark.parametrize("name", ALL_STORES)
def test_spec_reader_parses_header_arrays_and_recomputes_every_manifest_tag(stores, name):
    """Sections 1-3 and invariant 9: the header passes section 1's rules (required keys, strict objects,
    checksum, caps); every array has the shapes, dtypes, chunk/shard shapes, fill values and pipeline of
    sections 2-3; every manifest row recomputed from the text (store id bytes, per-image tags per shard,
    record tags per inner chunk, `3 + cps * P` entries, 0 past the last chunk) equals the stored row."""
    st = SpecStore(stores[name])
    assert st.h["format_version"] == "4.0" and st.h["requires"] == []
    assert st.stored_manifest().shape == (st.shards, 3 + st.cps * len(st.records))
    spec_check_manifest(st)
    if st.nchunks < st.shards * st.cps:  # positions past ceil(N / ipc) are 0
        P = len(st.records)
        assert not st.stored_manifest()[-1, 3 + (st.nchunks % st.cps) * P:].any()
    assert [spec_key(row) for row in st.per_image("key")] == stores["inputs"]["keys"]
    np.testing.assert_array_equal(st.per_image("image_size"), stores["inputs"]["sizes"])
    with fkdstore.open(stores[name]) as r:
        assert r.image_keys == [spec_key(row) for row in st.per_image("key")]
        np.testing.assert_array_equal(r.image_sizes, st.per_image("image_size"))
        np.testing.assert_array_equal(r.labels, st.per_image("label"))
        np.testing.assert_array_equal(r.written, st.written)
        assert r.record_arrays == [p for p in st.records if not (st.f["seeded"] and p in ("box", "flip"))]


@pytest.mark.parametrize("name", REGION_STORES)
def test_spec_reader_records_and_decoded_labels_equal_fkdstore(stores, name):
    """Sections 2, 5, 5.1, 5.2, 6, 10.2: box and flip (stored, or derived by this file's slot sampler), aug
    columns and codec fields read by the spec equal fkdstore's ``read_batch``; the spec's decode equals
    fkdstore's bit for bit at T = 1 for the probability codecs (section 5 fixes the float32 sums) and within
    1e-6 otherwise (T != 1 and logits are computed in float64)."""
    st = SpecStore(stores[name])
    with fkdstore.open(stores[name]) as r:
        rec = r.read_batch(np.arange(N))
        mine = [st.read(i) for i in range(N)]
        np.testing.assert_array_equal(np.stack([x["box"] for x in mine]), rec.box)
        np.testing.assert_array_equal(np.stack([x["flip"] for x in mine]), rec.flip)
        boxes, flips = stores[name, "crops"]  # what the teacher saw
        np.testing.assert_array_equal(rec.box, boxes)
        np.testing.assert_array_equal(rec.flip, flips)
        fields = {p.split("/", 1)[1]: np.stack([x[p] for x in mine]) for p in st.records if p.startswith("soft/")}
        assert fields.keys() == rec.fields.keys()
        for f, v in fields.items():
            np.testing.assert_array_equal(v, rec.fields[f])
        for a in st.f["aug"]:
            np.testing.assert_array_equal(np.stack([x["aug/" + a["name"]] for x in mine]), rec.aug[a["name"]])
        codec = st.f["codec"]
        for T in (1.0, 0.5, 3.0):
            got = _decode_like_the_text(lambda t: r.decode(rec.fields, temperature=t), codec, fields, C, T)
            assert got is None or got.shape == (N, M, C)
        np.testing.assert_array_equal(r.soft_labels(4), r.decode(rec.fields)[4])


def _decode_like_the_text(decode, codec: dict, fields: dict, c: int, T: float, atol: float = 1e-6):
    """``decode(T)`` (fkdstore) refuses (ValidationError) where the text says a reader MUST refuse, else equals
    the text's decode: bit for bit at T = 1 for the probability codecs (section 5 fixes the float32 sums; 5.4
    fixes sampled's float64 sums and float32 result), within ``atol`` otherwise (T != 1 and logits are
    computed in float64). Returns fkdstore's decode, or None for a refusal."""
    try:
        want = spec_decode(codec, fields, c, T)
    except SpecRefusal:
        with pytest.raises(ValidationError):
            decode(T)
        return None
    got = np.asarray(decode(T))
    if T == 1.0 and codec["name"] != "logits":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
    return got


@pytest.mark.parametrize("name", list(CODEC_STORES))
def test_spec_writer_stores_the_fields_section_5_says(stores, name):
    """Section 5: "Top-K ranks classes by p descending, ties broken by the lower class index"; float rounding
    to nearest-even, logits `l = z - logsumexp(z)` in float64 rounded toward -inf in the storage dtype;
    q8 "picks the largest code with Q8[c] <= p" (for logits, of exp(l)); 5.5's `tail_mean`, 5.6's centred
    rows `z - max z`; 5.4's head, draws and tally from the crop keys of 5.3 ("A teacher-runner MUST pass
    `keys[b, m] = key(image_indices[b], m)`"; the reference writer `Writer.put` does). The stored fields are
    the spec's encoding of the teacher's outputs, byte for byte."""
    codec = CODEC_STORES[name][0]
    d = stores["inputs"]
    st = SpecStore(stores[name])
    want = spec_encode(codec, _codec_input(codec, d), keys=spec_crop_keys(N, M))
    assert [p for p in st.records if p.startswith("soft/")] == [f"soft/{f}" for f in want]
    for f, v in want.items():
        got = np.concatenate([st.record_chunk(f"soft/{f}", c) for c in range(st.nchunks)])[:N]
        assert got.dtype == v.dtype, (f, got.dtype, v.dtype)
        np.testing.assert_array_equal(got, v, err_msg=f)


def test_augmented_store_values_follow_section_6(stores):
    """Sections 1.3 and 6: the policy configs spell every parameter; the `aug/<name>` arrays come in header
    `aug` order after `box` and `flip` and hold the writer's values cast to the column dtype."""
    h = _header(stores["aug"])
    assert h["regions"]["augment"] == AUGMENT
    assert [a["name"] for a in h["regions"]["aug"]] == [a["name"] for a in AUG_COLUMNS]
    st = SpecStore(stores["aug"])
    assert list(st.records)[2:6] == [f"aug/{a['name']}" for a in AUG_COLUMNS]
    for name, v in stores["aug", "values"].items():
        got = np.concatenate([st.record_chunk(f"aug/{name}", c) for c in range(st.nchunks)])[:N]
        np.testing.assert_array_equal(got, v)
    assert fkdstore.verify(stores["aug"]) == []


@pytest.mark.parametrize("name", list(LABEL_MAPS))
def test_spec_label_map_pooling_equals_label_map_reader_pool(stores, name):
    """Section 11.3 steps 1-5 (dense map, flip, box in float64 then float32, RoIAlign with float32 sample
    coordinates and weights, softmax at T), re-implemented here, equal ``LabelMapReader.pool`` within 1e-6
    for crops of every kind: whole image, one pixel wide at the far edge, random, flipped and not."""
    lm = LABEL_MAPS[name]
    idx, scores = stores[name, "maps"]
    sizes = stores["inputs"]["sizes"]
    rng = np.random.default_rng(11)
    images, boxes, flips = [], [], []
    for i in range(N):
        H, W = (int(v) for v in sizes[i])
        for box in ((0, 0, H, W), (H - 1, W - 1, 1, 1), (0, W - 2, H, 2)):
            images.append(i), boxes.append(box), flips.append(bool(rng.random() < 0.5))
        for _ in range(2):
            h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
            images.append(i), flips.append(bool(rng.random() < 0.5))
            boxes.append((int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w))
    st = SpecStore(stores[name])
    with fkdstore.open(stores[name]) as r:
        maps = r.read_batch(np.arange(N))
        np.testing.assert_array_equal(maps.indices, idx)
        np.testing.assert_array_equal(maps.scores, scores)
        for p, want in (("map/indices", idx), ("map/scores", scores)):
            got = np.concatenate([st.record_chunk(p, c) for c in range(st.nchunks)])[:N]
            np.testing.assert_array_equal(got, want)
        got = r.pool(np.array(images), np.array(boxes), np.array(flips))
    g = lm["pool"]["grid"]
    assert got.shape == ((len(images), C) if g == 1 else (len(images), g, g, C))
    for j, (i, box, phi) in enumerate(zip(images, boxes, flips)):
        want = spec_pool(lm, C, idx[i], scores[i], int(sizes[i, 0]), int(sizes[i, 1]), box, phi)
        np.testing.assert_allclose(got[j].reshape(g, g, C), want, rtol=0, atol=1e-6, err_msg=str((i, box, phi)))


def test_section11_3_note_xy_flip_equals_mirrored_output():
    """Section 11.3, notes: "For order `xy`, `o = -0.5` and crops at least one map cell wide (`w S >= W`),
    step 2 equals pooling the unflipped map with the unflipped crop and mirroring the g x g output
    left-right" (the text checked against itself, with this file's step-by-step implementation)."""
    lm = {"size": 5, "k": 3, "dtype": "float32", "fill": 0.0, "box": {"order": "xy", "offset": -0.5},
          "pool": {"op": "roi_align", "sampling_ratio": -1, "aligned": False, "grid": 3}, "temperature": 1.0,
          "flip": True}
    idx, scores = make_maps(1, lm, C, seed=3)
    rng = np.random.default_rng(4)
    H, W = 47, 61
    for _ in range(12):
        w, h = int(rng.integers(-(-W // 5), W + 1)), int(rng.integers(1, H + 1))
        box = (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w)
        flipped = spec_pool(lm, C, idx[0], scores[0], H, W, box, True)
        plain = spec_pool(lm, C, idx[0], scores[0], H, W, box, False)
        np.testing.assert_allclose(flipped, plain[:, ::-1], rtol=0, atol=1e-6, err_msg=str(box))


def test_section10_3_sampler_reimplementation_equals_slot_crop_sampler():
    """Section 10.3: "the result is the same bits in any implementation that follows this section". This
    file's line-by-line implementation (Python integers and floats) equals ``SlotCropSampler`` on random
    configs, sizes, images and slots, including the centre-crop fallback."""
    rng = np.random.default_rng(12)
    cfg = sampler_config(seed=2**64 - 5, scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_p=0.3)
    assert spec_slot_sample(cfg, 0, 0, 1, 900)[0] == (0, (900 - 2) // 2, 1, 2)  # fallback: h = 1, w = rint(2.0)
    for _ in range(6):
        lo, hi = sorted(rng.uniform(0.01, 1, 2))
        rlo, rhi = sorted(np.exp(rng.uniform(-3, 3, 2)))
        cfg = sampler_config(seed=int(rng.integers(0, 2**63)) * 2 + 1, scale=(float(lo), float(hi)),
                             ratio=(float(rlo), float(rhi)), flip_p=float(rng.random()))
        ii, ss = rng.integers(0, 2**40, 250), rng.integers(0, 1000, 250)
        hh, ww = rng.integers(1, 3000, 250), rng.integers(1, 3000, 250)
        hh[:10] = 1  # thin images: the fallback
        got_b, got_f = fkdstore.SlotCropSampler.from_config(cfg).sample_slots(ii, ss, hh, ww)
        for j in range(len(ii)):
            want_b, want_f = spec_slot_sample(cfg, int(ii[j]), int(ss[j]), int(hh[j]), int(ww[j]))
            assert tuple(got_b[j].tolist()) == want_b and bool(got_f[j]) == want_f, (cfg, j)


def test_q8_table_is_the_formula_and_encoding_bound_holds():
    """Section 5.2 / Appendix B: `Q8[0] = 0`, `Q8[c] = sigmoid(-11 + (c - 1) 22/254)` in float64 rounded to
    float32, strictly increasing; encoding "picks the largest code with Q8[c] <= p", so
    `0 <= p - q8(p) <= max(0.0905 min(p, 1 - p), 1.67e-5)`."""
    formula = [0.0] + [1 / (1 + math.exp(-(-11 + (c - 1) * 22 / 254))) for c in range(1, 256)]
    np.testing.assert_array_equal(Q8, np.array(formula, np.float64).astype(np.float32))
    assert (np.diff(Q8) > 0).all()
    p = np.concatenate([np.random.default_rng(3).random(20000), Q8.astype(np.float64), [0.0, 1.0]])
    err = p - Q8[spec_q8_encode(p)].astype(np.float64)
    assert (err >= 0).all() and (err <= np.maximum(0.0905 * np.minimum(p, 1 - p), 1.67e-5)).all()


# ============================================================ 2. what fkdstore writes, byte for byte, against the text


def test_section4_9_manifest_bytes_and_header_checksum_as_the_text_says(stores, tmp_path):
    """Invariant 9 and section 1.2 at the byte level: each manifest chunk file is `bytes` (little) ->
    `zstd` -> `crc32c` of the uint32 row the text computes; the header checksum is section 1.2's. A partially
    written store: record tags of a shard with no written image are 0, a partly written chunk is tagged
    with its unwritten rows as fill; resuming it yields the same store, file for file, as one pass."""
    for name in ("ms_f16", "ms_q8", "map_tokens"):
        st = SpecStore(stores[name])
        assert st.h["checksum"] == spec_checksum(st.h)
        rows = st.expected_manifest()
        for s in range(st.shards):
            raw = (stores[name] / "manifest" / "c" / str(s) / "0").read_bytes()
            assert crc32c.crc32c(raw[:-4]) == int.from_bytes(raw[-4:], "little")
            assert Zstd().decode(raw[:-4]) == rows[s, :, 0].astype("<u4").tobytes(), (name, s)
    d = stores["inputs"]
    codec = CODEC_STORES["ms_q8"][0]
    part = tmp_path / "part"
    write_regions(part, d, codec, seeded=True, puts=[np.array([1, 2])], replay=REPLAY)  # shard 1 not at all
    st = SpecStore(part)
    np.testing.assert_array_equal(st.written, np.isin(np.arange(N), [1, 2]))
    spec_check_manifest(st)
    man = st.stored_manifest()
    assert not man[1, 3:].any() and man[1, :3].all()  # no written image in shard 1: record tags 0
    assert man[0, 3:].all()
    with fkdstore.open(part) as r:
        np.testing.assert_array_equal(r.read_batch([1, 2]).box, stores["ms_q8", "crops"][0][[1, 2]])
        _raises(IncompleteStoreError, lambda: r.read_batch([0]), "image 0")  # invariant 6
        _raises(IncompleteStoreError, lambda: r.read(9), "image 9")
    rest = np.setdiff1d(np.arange(N), [1, 2])
    write_regions(part, d, codec, seeded=True, puts=[rest[:4], rest[4:]], replay=REPLAY)
    spec_check_manifest(SpecStore(part))
    files = {f.relative_to(part).as_posix(): f.read_bytes() for f in part.rglob("*") if f.is_file()}
    ref = {f.relative_to(stores["ms_q8"]).as_posix(): f.read_bytes() for f in stores["ms_q8"].rglob("*")
           if f.is_file()}
    assert files.keys() == ref.keys()
    assert [k for k in files if files[k] != ref[k]] == []


def test_section8_default_store_id_is_the_digest_of_the_text(tmp_path):
    """Section 8: "takes the first 32 hex digits of the sha256 of: the canonical JSON of {"header": <the
    checksummed header without store_id>, "meta": <meta without the volatile keys>}, then the raw little-
    endian bytes of `key`, `image_size` and `label`". Volatile meta does not change it; other meta, labels
    or a given id do."""
    d = make_inputs(n=5, m=2, c=4, seed=9)
    codec = {"name": "hard"}

    def store(name, **kw):
        with fkdstore.write(tmp_path / name, num_images=5, crops_per_image=2, num_classes=4, codec=codec,
                            image_keys=d["keys"], image_sizes=d["sizes"], **kw):
            pass
        st = SpecStore(tmp_path / name)
        return st.h["store_id"], spec_default_store_id(st.h, st)

    base, want = store("a", labels=d["labels"], meta={"teacher": "t1", "history": [1]})
    assert base == want
    assert store("b", labels=d["labels"], meta={"teacher": "t1", "finished_at": 5, "history": [2]})[0] == base
    for name, kw in (("c", {"labels": d["labels"], "meta": {"teacher": "t2"}}), ("d", {"meta": {"teacher": "t1"}}),
                     ("e", {"labels": d["labels"], "meta": {"teacher": "t1"}, "crop_sampler": sampler_config()})):
        got, want = store(name, **kw)
        assert got == want and got != base, name
    given = "0123456789abcdef" * 2
    assert store("f", labels=d["labels"], store_id=given)[0] == given


def test_appendix_a_key_length_box_dtype_has_labels(tmp_path):
    """Appendix A: "`key_length` = the longest key's UTF-8 byte length; `box_dtype` = `uint16` iff every image
    side is at most 65535; `has_labels` = any label `>= 0`"; keys are stored per section 2's recipe."""
    keys = ["a", "dossier/été.jpg", "😀/x", "k" * 3]
    cases = [([[65535, 10], [1, 65535], [5, 5], [7, 7]], None, "uint16", False),
             ([[65536, 10], [1, 2], [5, 5], [7, 7]], [-1, -1, -1, -1], "int32", False),
             ([[10, 10], [1, 65536], [5, 5], [7, 7]], [-1, -1, 0, -1], "int32", True)]
    for j, (sizes, labels, box_dtype, has_labels) in enumerate(cases):
        p = tmp_path / str(j)
        with fkdstore.write(p, num_images=4, crops_per_image=1, num_classes=3, codec="hard", image_keys=keys,
                            image_sizes=np.array(sizes), labels=labels):
            pass
        h = _header(p)
        assert h["key_length"] == max(len(k.encode("utf-8")) for k in keys)
        assert (h["regions"]["box_dtype"], h["has_labels"]) == (box_dtype, has_labels), j
        st = SpecStore(p)
        assert [spec_key(r) for r in st.per_image("key")] == keys
        np.testing.assert_array_equal(st.per_image("label"), [-1] * 4 if labels is None else labels)
        assert RawArray(p / "box").dtype == np.dtype(box_dtype)


def test_appendix_a_header_keys_in_the_order_of_section_1(stores):
    """Appendix A: "The header object's keys in the order of section 1's table, except `checksum`, which comes
    last"."""
    for name in ("ms_f16", "map_relabel"):
        h = _header(stores[name])
        assert list(h) == [k for k in TOP_ORDER if k in h], list(h)


def test_appendix_a_kind_object_keys_in_table_order_and_zarr_json_spelling(stores):
    """Appendix A: the kind's object in its table's order; `zarr.json` files as zarr-python 3 writes them
    (JSON, 2-space indentation)."""
    assert list(_header(stores["ms_q8"])["regions"]) == REGIONS_KEYS
    assert list(_header(stores["ms_q8"])["regions"]["crops"]["sampler"]) == SAMPLER_KEYS
    for f in (stores["ms_q8"] / "zarr.json", stores["ms_q8"] / "soft" / "probs" / "zarr.json"):
        text = f.read_text()
        assert text == json.dumps(json.loads(text), indent=2), f


def test_section5_index_dtype_follows_c_and_creation_writes_only_per_image_chunks(tmp_path):
    """Section 5: "Index fields use `uint16` when `C <= 65536`, else `int32`" (11.2 likewise for
    `map/indices`). Section 8 / Appendix A: at creation "every chunk of `key`, `image_size`, `label` and
    `written` (all 0) and every manifest row (its per-image tags, record tags 0) is written before the
    header"; "no other all-fill chunk is written"."""
    cases = [("c65536", {"num_classes": 65536, "crops_per_image": 2, "codec": {"name": "ms", "k": 2, "dtype": "q8"}},
              "soft/indices", "uint16"),
             ("c65537", {"num_classes": 65537, "crops_per_image": 2, "codec": {"name": "ms", "k": 2, "dtype": "q8"}},
              "soft/indices", "int32"),
             ("m65537", {"num_classes": 65537, "label_map": dict(LABEL_MAPS["map_relabel"], size=1)}, "map/indices",
              "int32")]
    for name, kw, path, dtype in cases:
        p = tmp_path / name
        with fkdstore.write(p, num_images=5, image_keys=list("abcde"), image_sizes=[[4, 4]] * 5, images_per_chunk=2,
                            images_per_shard=4, **kw):
            pass
        st = SpecStore(p)
        assert st.arrays[path].dtype == np.dtype(dtype), name
        for a in ("key", "image_size", "label", "written", "manifest"):
            for s in range(st.shards):
                assert st.arrays[a].chunk(s) is not None, (name, a, s)
        assert not st.written.any()
        spec_check_manifest(st)
        assert not st.stored_manifest()[:, 3:].any() and st.stored_manifest()[:, :3].all()
        for rec in st.records:
            if (p / rec).exists():
                assert not [f for f in (p / rec).rglob("*") if f.is_file() and f.name != "zarr.json"], (name, rec)


def test_section7_default_layout_is_the_spec_algorithm(tmp_path):
    """Section 7, steps 1-5, re-implemented in exact arithmetic: ``schema.default_layout`` (named by the
    spec) agrees on a grid of sizes, and a new store written without a layout gets it, with `row_bytes` of
    the widest record array (derived `box` included) and `R` = M for regions, 1 for label maps."""
    from fkdstore.schema import default_layout

    for n in (1, 7, 2048, 2049, 50_000, 1_281_167, 10**9):
        for rb in (1, 3, 24, 1000, 4096, 8192, 8193, 2 * 200 * 1000, 10**6, 10**8):
            for R in (1, 8, 200, 1000, 2**21 + 1):
                assert default_layout(n, rb, R) == spec_layout(n, rb, R), (n, rb, R)
    n, m = 3000, 64
    sizes, keys = np.full((n, 2), 100), [f"k{i}" for i in range(n)]
    lm = LABEL_MAPS["map_relabel"]
    cases = [("stored", {"crops_per_image": m, "codec": "hard"}, spec_layout(n, m * 4 * 2, m)),
             ("seeded", {"crops_per_image": m, "codec": "hard", "crop_sampler": sampler_config()},
              spec_layout(n, m * 4 * 2, m)),
             ("full", {"crops_per_image": m, "codec": {"name": "full", "dtype": "float32"}},
              spec_layout(n, m * 5 * 4, m)),
             ("map", {"label_map": lm}, spec_layout(n, lm["k"] * lm["size"] ** 2 * 4, 1))]
    for name, kw, want in cases:
        with fkdstore.write(tmp_path / name, num_images=n, num_classes=5, image_keys=keys, image_sizes=sizes, **kw):
            pass
        layout = _header(tmp_path / name)["layout"]
        assert (layout["images_per_chunk"], layout["images_per_shard"]) == want, name


def test_section6_3_writer_declares_the_tables_columns(stores):
    """Section 1.3: "When `augment` is not empty, `aug` MUST equal the pipeline's columns in order", the
    columns of section 6.3's tables (name, kind, dtype, shape)."""
    assert _header(stores["aug"])["regions"]["aug"] == AUG_COLUMNS


def test_section6_3_reader_opens_a_store_declaring_the_tables_columns(stores, tmp_path):
    """A store whose `aug` is exactly section 6.3's columns (as another writer following the text writes
    it; checksum valid) is readable."""
    p = _copy(stores, "aug", tmp_path)
    _edit_header(p, lambda h: h["regions"].update(aug=AUG_COLUMNS))
    np.testing.assert_array_equal(_read_everything(p).aug["mixup_lam"], stores["aug", "values"]["mixup_lam"])


def test_section8_seeded_writer_refuses_boxes_or_flips_other_than_the_samplers(stores, tmp_path):
    """Section 8: "A writer MUST refuse boxes or flips given to it that differ from the sampler's"; the
    sampler's own (this file's section 10.3) are accepted; nothing is written for a refused put."""
    d = stores["inputs"]
    boxes, flips = stores["ms_q8", "crops"]
    p = tmp_path / "s"
    with fkdstore.write(p, num_images=N, crops_per_image=M, num_classes=C, codec=CODEC_STORES["ms_q8"][0],
                        image_keys=d["keys"], image_sizes=d["sizes"], crop_sampler=sampler_config(),
                        images_per_chunk=IPC, images_per_shard=IPS) as w:
        i = np.arange(IPS, N)
        bad_b = boxes[i].copy()
        bad_b[0, 1, 0] += 1 if bad_b[0, 1, 0] == 0 else -1
        with pytest.raises(FkdstoreError):
            w.put(i, bad_b, flips[i], d["probs"][i])
        with pytest.raises(FkdstoreError):
            w.put(i, boxes[i], ~flips[i], d["probs"][i])
        assert not w.written.any()
        w.put(i, boxes[i], flips[i], d["probs"][i])
    st = SpecStore(p)
    np.testing.assert_array_equal(st.written, np.arange(N) >= IPS)
    spec_check_manifest(st)


def test_section8_ownership_records_and_concurrent_writers(stores, tmp_path):
    """Section 8: "the reference writer records ownership of each shard it buffers in `owners/<shard>.json` (a
    JSON object: `token` (32 hex digits), `host`, `pid`, `since`, `renewed`) ... it refuses
    (`ConcurrentWriterError`, naming shard, host and pid) when another writer owns it ... records are removed
    when the shard is complete and at close. ... Readers and `verify` ignore `owners/`." Writers of disjoint
    shards need no coordination."""
    d = stores["inputs"]
    p = tmp_path / "s"

    def open_writer():
        return fkdstore.write(p, num_images=N, crops_per_image=M, num_classes=C, codec=CODEC_STORES["ms_f16"][0],
                              image_keys=d["keys"], image_sizes=d["sizes"], labels=d["labels"],
                              images_per_chunk=IPC, images_per_shard=IPS)

    def put(w, i):
        i = np.asarray(i)
        w.put(i, d["boxes"][i], d["flips"][i], d["probs"][i])

    w1 = open_writer()
    put(w1, [0])
    rec = json.loads((p / "owners" / "0.json").read_text())
    assert set(rec) == {"token", "host", "pid", "since", "renewed"} and len(rec["token"]) == 32
    int(rec["token"], 16)
    w2 = open_writer()
    _raises(ConcurrentWriterError, lambda: put(w2, [1]), "shard 0", socket.gethostname(), f"pid {os.getpid()}")
    put(w2, np.arange(IPS, N))  # a disjoint shard
    assert not (p / "owners" / "1.json").exists()  # complete shard: record removed
    w2.close()
    with fkdstore.open(p) as r:  # owners/0.json still there: readers ignore it
        np.testing.assert_array_equal(r.read_batch([9]).box, d["boxes"][[9]])
    assert [x for x in fkdstore.verify(p) if "owners" in x] == []
    put(w1, np.arange(1, IPS))
    w1.close()
    assert not (p / "owners").exists() or not any((p / "owners").iterdir())
    spec_check_manifest(SpecStore(p))


def test_section4_1_interrupted_creation_is_not_a_store_and_may_be_replaced(stores, tmp_path):
    """Invariant 1: "A group without the header is not a store; readers MUST refuse it with a format error. A
    group whose only attribute is `fkdstore_creating` ..., whose top-level entries are all names of section
    2, and whose `written` flags are all 0 is an interrupted creation: writers MAY delete it (and nothing
    else) before creating a store there." Crafted by those words from a store with nothing written."""
    d = stores["inputs"]
    p = tmp_path / "half"
    write_regions(p, d, CODEC_STORES["ms_f16"][0], puts=[])
    zj = p / "zarr.json"
    doc = json.loads(zj.read_text())
    doc["attributes"] = {"fkdstore_creating": {"library_version": "0.3.0", "started": 1.0}}
    zj.write_text(json.dumps(doc))
    _raises(FormatError, lambda: fkdstore.open(p))
    assert fkdstore.verify(p)
    write_regions(p, d, CODEC_STORES["ms_f16"][0])  # MAY delete it, then create
    spec_check_manifest(SpecStore(p))
    foreign = tmp_path / "foreign"  # a user's group: not an interrupted creation (an entry not of section 2)
    shutil.copytree(p, foreign)
    zarr.open_group(str(foreign), mode="r+").create_array("photos", shape=(2,), dtype="uint8")
    doc = json.loads((foreign / "zarr.json").read_text())
    doc["attributes"] = {"fkdstore_creating": {"library_version": "0.3.0", "started": 1.0}}
    (foreign / "zarr.json").write_text(json.dumps(doc))
    before = {f.relative_to(foreign): f.read_bytes() for f in foreign.rglob("*") if f.is_file()}
    with pytest.raises(FkdstoreError):
        write_regions(foreign, d, CODEC_STORES["ms_f16"][0])
    assert {f.relative_to(foreign): f.read_bytes() for f in foreign.rglob("*") if f.is_file()} == before


# =========================================== 3. conformance (sections 1, 1.1-1.5): headers crafted by the spec's words


@pytest.mark.parametrize("key", [*TOP_REQUIRED, "regions"])
def test_section1_missing_required_key_is_a_format_error_naming_it(stores, tmp_path, key):
    """Section 1: "Every key above except `meta` and `library_version` is REQUIRED; a header lacking one is
    refused with a format error naming it." (checksum recomputed, except when it is the missing key)."""
    p = _copy(stores, "ms_f16", tmp_path)
    _edit_header(p, lambda h: h.pop(key), checksum=key != "checksum")
    _raises(FormatError, lambda: fkdstore.open(p), key)


NOT_INTEGERS = [("num_classes", True), ("num_images", 10.0), ("regions.crops_per_image", 3.0),
                ("regions.codec.k", 3.0), ("layout.images_per_chunk", 4.0), ("key_length", "20"),
                ("regions.crops.sampler.seed", 7.0), ("has_labels", 1), ("requires", "none"),
                ("store_id", "ABCDEF0123456789ABCDEF0123456789"), ("store_id", "abc"), ("format_version", "4")]


@pytest.mark.parametrize("key,value", NOT_INTEGERS, ids=[f"{k}={v!r}" for k, v in NOT_INTEGERS])
def test_section1_1_types_integers_are_not_fractions_or_booleans(stores, tmp_path, key, value):
    """Section 1.1: "Integers are JSON integers (no fractions, no booleans)"; section 1's types (`store_id`
    32 lowercase hex digits, `has_labels` a bool, `requires` an array, `format_version` "major.minor"): a
    malformed header is a format error (checksum recomputed)."""
    p = _copy(stores, "ms_q8", tmp_path)
    _edit_header(p, lambda h: _set(h, key, value))
    _raises(FormatError, lambda: fkdstore.open(p))


def test_section1_1_integral_floats_may_be_spelled_as_json_integers(tmp_path):
    """Section 1.1: "Numbers that are floats in the model (`mean`, `std`, `scale`, `p`, ...) MAY be written
    as JSON integers when integral and compare as numbers": the same values spelled as integers (checksum
    recomputed) replay the same crops and read the same records."""
    d = make_inputs()
    p = tmp_path / "s"
    cfg = sampler_config(seed=3, scale=(0.5, 1.0), ratio=(1.0, 2.0), flip_p=1.0)
    write_regions(p, d, {"name": "hard"}, seeded=True, sampler=cfg, replay=dict(REPLAY, mean=[1.0, 0.0, 0.0]))
    want = _read_everything(p)
    _edit_header(p, lambda h: (h["regions"]["crops"]["sampler"].update(scale=[0.5, 1], ratio=[1, 2], flip_p=1),
                               h["replay"].update(mean=[1, 0, 0], std=[0.25, 0.5, 1])))
    got = _read_everything(p)
    np.testing.assert_array_equal(got.box, want.box)
    np.testing.assert_array_equal(got.flip, want.flip)
    assert fkdstore.verify(p) == []


def test_section1_2_checksum_mismatch_is_corrupt_meta_and_library_version_are_not_covered(stores, tmp_path):
    """Section 1.2: "Readers MUST verify it and refuse a mismatch (a corrupt-store error)" for an edit of
    anything but `meta` and `library_version`."""
    p = _copy(stores, "ms_f16", tmp_path)
    pristine = (p / "zarr.json").read_text()
    for key, value in (("num_classes", C + 1), ("regions.codec.k", 2), ("layout.images_per_chunk", 2),
                       ("has_labels", False), ("store_id", "f" * 32), ("replay", REPLAY)):
        _edit_header(p, lambda h, key=key, value=value: _set(h, key, value), checksum=False)
        _raises(CorruptStoreError, lambda: fkdstore.open(p), "checksum")
        (p / "zarr.json").write_text(pristine)
    _edit_header(p, lambda h: h.update(meta={"resumed": True}, library_version="9.9"), checksum=False)
    _read_everything(p)


def test_section1_2_canonical_spelling_of_every_json_value(stores, tmp_path):
    """Section 1.2: "A reader in another language MUST reproduce this spelling": floats as repr (exponent
    forms), escapes, non-ASCII and astral characters as \\u escapes, keys sorted by code point (U+FFFF before
    U+1F600, unlike UTF-16 order). fkdstore accepts the checksum this file computes for such a header and
    refuses it when one float's spelling changes."""
    p = _copy(stores, "ms_f16", tmp_path)
    exotic = {"\U0001F600": 1, "\uffff": 2, "b": [0.1, 1.0, 1e-05, 1e16, 1.5e-7, 123456789012345678, -0.0],
              "a": 'q"\\/\n\r\t\b\f\x01\x7f é \u2028 😀', "A": {"z": None, "y": True, "x": False}}
    _edit_header(p, lambda h: h.update(future=exotic))
    _read_everything(p)
    _edit_header(p, lambda h: h["future"]["b"].__setitem__(0, 0.1000000000000001), checksum=False)
    _raises(CorruptStoreError, lambda: fkdstore.open(p), "checksum")


def test_section1_3_unknown_kind_is_a_format_error(stores, tmp_path):
    """Section 1.3: "a reader MUST refuse a kind it does not implement (a format error naming it)"."""
    p = _copy(stores, "ms_f16", tmp_path)
    _edit_header(p, lambda h: h.update(kind="voxels", voxels={}))
    _raises(FormatError, lambda: fkdstore.open(p), "voxels")


@pytest.mark.parametrize("store,other", [("ms_f16", "label_map"), ("map_relabel", "regions")])
def test_section1_3_the_other_kinds_object_is_refused(stores, tmp_path, store, other):
    """Section 1: "`regions` ... exactly when `kind` is `"regions"`"; "`label_map` ... exactly when `kind` is
    `"label_map"`" (checksum recomputed)."""
    p = _copy(stores, store, tmp_path)
    _edit_header(p, lambda h: h.update({other: LABEL_MAPS["map_relabel"] if other == "label_map"
                                        else _header(stores["ms_f16"])["regions"]}))
    _raises(FormatError, lambda: fkdstore.open(p), other)


def test_section1_4_unknown_requires_entry_is_a_format_error(stores, tmp_path):
    """Section 1.4: "A reader MUST refuse (a format error naming them) a store whose `requires` names an
    extension it does not implement.\""""
    p = _copy(stores, "ms_f16", tmp_path)
    _edit_header(p, lambda h: h.update(requires=["zstd-dictionaries"], **{"zstd-dictionaries": {"n": 1}}))
    _raises(FormatError, lambda: fkdstore.open(p), "zstd-dictionaries")


def test_section1_4_unknown_top_level_keys_and_arrays_are_ignored(stores, tmp_path):
    """Section 1.4: "Unknown **top-level** header keys are extensions: a reader MUST ignore them"; "Other
    top-level arrays or groups than section 2's are extensions: readers ignore them"; invariant 2: a greater
    minor version is accepted."""
    p = _copy(stores, "ms_f16", tmp_path)
    _edit_header(p, lambda h: h.update(format_version="4.7", thumbnails={"path": "thumbs", "side": 32}))
    g = zarr.open_group(str(p), mode="r+")
    g.create_array("thumbs", shape=(N, 4), dtype="uint8", fill_value=0)[:] = 7
    rec = _read_everything(p)
    np.testing.assert_array_equal(rec.box, stores["inputs"]["boxes"])
    assert fkdstore.verify(p) == []


STRICT = [("ms_f16", "layout"), ("ms_q8", "replay"), ("ms_f16", "regions"), ("ms_f16", "regions.crops"),
          ("ms_q8", "regions.crops"), ("ms_q8", "regions.crops.sampler"), ("ms_f16", "regions.codec"),
          ("hard", "regions.codec"), ("aug", "regions.aug.0"), ("aug", "regions.augment.0"),
          ("aug", "regions.augment.1"), ("map_relabel", "label_map"), ("map_relabel", "label_map.box"),
          ("map_tokens", "label_map.pool"), ("sampled_probs", "regions.codec")]


@pytest.mark.parametrize("store,obj", STRICT)
def test_section1_4_unknown_key_in_a_strict_object_is_a_format_error(stores, tmp_path, store, obj):
    """Section 1.4: "Every object this document defines ... is **strict**: a reader MUST refuse an unknown
    key ... with a format error naming the key" (checksum recomputed: only strictness can catch it)."""
    p = _copy(stores, store, tmp_path)
    _edit_header(p, lambda h: _set(h, f"{obj}.zz_future", 1))
    _raises(FormatError, lambda: fkdstore.open(p), "zz_future")


MISSING_PARAMS = [("ms_f16", "regions.codec.k"), ("ms_f16", "regions.codec.dtype"), ("full_f16", "regions.codec.dtype"),
                  ("logits_f32", "regions.codec.k"), ("aug", "regions.augment.1.window"),
                  ("aug", "regions.augment.0.hue"), ("ms_q8", "regions.crops.sampler.seed"),
                  ("ms_q8", "regions.crops.sampler.max_attempts"), ("ms_q8", "replay.std"),
                  ("ms_f16", "layout.images_per_chunk"), ("ms_f16", "regions.crops.mode"),
                  ("aug", "regions.aug.3.kind"), ("map_tokens", "label_map.pool.grid"),
                  ("map_tokens", "label_map.temperature"), ("map_relabel", "label_map.box.offset"),
                  ("sampled_logits", "regions.codec.seed"), ("logits_k3_tail", "regions.codec.tail"),
                  ("logits_centred", "regions.codec.centred")]


@pytest.mark.parametrize("store,key", MISSING_PARAMS)
def test_section1_4_missing_parameter_in_4_0_is_a_format_error(stores, tmp_path, store, key):
    """Section 1.4: a missing key of a strict object is refused with a format error naming it: "A reader that
    ignored or defaulted a replay, codec, policy or sampler parameter would replay other crops or decode
    other labels" (in 4.0 nothing is defaulted, unlike section 12's 2.0/3.0)."""
    p = _copy(stores, store, tmp_path)
    _edit_header(p, lambda h: _set(h, key, DROP))
    _raises(FormatError, lambda: fkdstore.open(p), key.rsplit(".", 1)[1])


OUT_OF_RANGE = [("ms_q8", "replay.std", [0.2, 0.0, 0.2]), ("ms_q8", "replay.input_size", [0, 32]),
                ("ms_q8", "replay.interpolation", "cubic"), ("ms_q8", "replay.mean", [0.5, "x", 0.5]),
                ("ms_q8", "regions.crops.sampler.scale", [0.0, 0.5]), ("ms_q8", "regions.crops.sampler.ratio", [2, 1]),
                ("ms_q8", "regions.crops.sampler.flip_p", 1.5), ("ms_q8", "regions.crops.sampler.seed", 2**64),
                ("ms_q8", "regions.crops.sampler.algorithm", "resized_crop_v2"),
                ("ms_q8", "regions.crops.sampler.rng", "pcg64"), ("ms_q8", "regions.crops.sampler.max_attempts", 11),
                ("ms_f16", "regions.crops.mode", "drawn"), ("ms_f16", "regions.codec.dtype", "bfloat16"),
                ("ms_f16", "regions.box_dtype", "int64"), ("map_tokens", "label_map.box.order", "xyz"),
                ("map_tokens", "label_map.box.offset", 1.5), ("map_tokens", "label_map.pool.op", "roi_pool"),
                ("map_tokens", "label_map.pool.sampling_ratio", 0), ("map_tokens", "label_map.temperature", 0),
                ("map_tokens", "label_map.dtype", "q8"), ("sampled_logits", "regions.codec.s", 0),
                ("sampled_logits", "regions.codec.k", C), ("sampled_logits", "regions.codec.temperature", -1.5),
                ("sampled_probs", "regions.codec.logp", 1), ("logits_centred", "regions.codec.dtype", "q8"),
                ("logits_f32", "regions.codec.tail", "mean"), ("logits_k3_tail", "regions.codec.tail", "median")]


@pytest.mark.parametrize("store,key,value", OUT_OF_RANGE)
def test_section1_4_value_outside_its_range_is_a_format_error(stores, tmp_path, store, key, value):
    """Sections 1.4, 10.1, 10.2, 11.1: "a value outside its range" is refused "with a format error naming the
    key" (a tool that edits the header and recomputes the checksum passes 1.2 but not this)."""
    p = _copy(stores, store, tmp_path)
    _edit_header(p, lambda h: _set(h, key, value))
    _raises(FormatError, lambda: fkdstore.open(p), key.rsplit(".", 1)[1])


def test_section1_4_undeclared_aug_array_is_ignored_by_readers_reported_by_verify(stores, tmp_path):
    """Section 1.4: "inside the groups `aug/`, `soft/` and `map/` the arrays are exactly those the header
    declares (readers never read others; `verify` reports an undeclared one as a problem)"."""
    p = _copy(stores, "aug", tmp_path)
    g = zarr.open_group(str(p), mode="r+")
    g.create_array("aug/cutmix_center", shape=(N, M, 2), dtype="uint16", fill_value=0)[:] = 3
    g.create_array("soft/logits", shape=(N, M, 2), dtype="float16", fill_value=0)[:] = 1
    rec = _read_everything(p)
    assert sorted(rec.aug) == sorted(a["name"] for a in AUG_COLUMNS) and sorted(rec.fields) == ["indices", "probs"]
    problems = fkdstore.verify(p)
    assert any("aug/cutmix_center" in x for x in problems), problems
    assert any("soft/logits" in x for x in problems), problems


CAPS = [("ms_f16", "num_images", 2**31), ("ms_f16", "regions.crops_per_image", 2**16 + 1),
        ("ms_f16", "num_classes", 2**20 + 1), ("ms_f16", "key_length", 4097), ("ms_f16", "regions.codec.k", C + 1),
        ("ms_q8", "replay.input_size", [1025, 32]), ("map_tokens", "label_map.size", 65),
        ("map_tokens", "label_map.k", C + 1), ("map_tokens", "label_map.pool.grid", 33),
        ("ms_f16", "layout", {"images_per_chunk": 2**22, "images_per_shard": 2**22}),
        ("ms_f16", "layout", {"images_per_chunk": 4, "images_per_shard": 2**27})]


@pytest.mark.parametrize("store,key,value", CAPS, ids=[f"{k}={v}" for _, k, v in CAPS])
def test_section1_5_header_over_a_cap_is_a_format_error(stores, tmp_path, store, key, value):
    """Section 1.5: "Readers MUST check, before allocating anything from the header, that: N <= 2^31 - 1,
    M <= 2^16, C <= 2^20, L <= 4096, K <= C (label maps also S <= 64, K <= 256, g <= 32), each
    replay.input_size side <= 1024, and that one decoded inner chunk of any record array is at most 64 MiB
    and one decoded shard at most 2 GiB. A header over a cap is a format error." (checksum recomputed)."""
    p = _copy(stores, store, tmp_path)
    _edit_header(p, lambda h: _set(h, key, value))
    _raises(FormatError, lambda: fkdstore.open(p))


def test_section1_5_label_map_k_cap_256(tmp_path):
    """Section 1.5 / 11.1: label maps `K <= 256`, even where C allows more (a 300-class store whose `k`
    is edited to 257 with a valid checksum)."""
    p = tmp_path / "wide"
    lm = dict(LABEL_MAPS["map_relabel"], k=1, size=1)
    with fkdstore.write(p, num_images=2, num_classes=300, image_keys=["a", "b"], image_sizes=[[4, 4]] * 2,
                        label_map=lm) as w:
        w.put_maps([0, 1], np.zeros((2, 1, 1, 1), np.uint16), np.zeros((2, 1, 1, 1), np.float32))
    _edit_header(p, lambda h: h["label_map"].update(k=257))
    _raises(FormatError, lambda: fkdstore.open(p))


@pytest.mark.parametrize("version", ["5.0", "3.9", "0.4", "four"])
def test_section4_2_unknown_major_version_is_a_format_error(stores, tmp_path, version):
    """Invariant 2: "Readers MUST refuse a `format_version` whose major part they do not implement" (3.x is
    implemented with section 12's flat header, which this 4.0 header is not)."""
    p = _copy(stores, "ms_f16", tmp_path)
    _edit_header(p, lambda h: h.update(format_version=version))
    _raises(FormatError, lambda: fkdstore.open(p))


# =================================================== 3. conformance (sections 2-4): arrays damaged by the spec's words


def test_section2_written_value_other_than_0_1_is_damage(stores, tmp_path):
    """Section 2: "`written[i]`: `1` once every record ... else `0`; no other value (another value is
    damage)"; section 4: per-image arrays: "`written` values 0/1"."""
    p = _copy(stores, "ms_f16", tmp_path)
    zarr.open_array(str(p / "written"), mode="r+")[3] = 2
    with fkdstore.open(p) as r:
        _raises(CorruptStoreError, lambda: r.written, "written")
    with fkdstore.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read_batch([3]), "written")


def test_section3_readers_follow_the_declared_chunk_key_encoding(stores, tmp_path):
    """Section 3: "readers MUST follow whatever `chunk_key_encoding` the array metadata declares, `/` or
    `.`": every array re-encoded with `.` (as another Zarr tool may write it) reads the same."""
    p = _copy(stores, "aug", tmp_path)
    for zj in p.rglob("zarr.json"):
        doc = json.loads(zj.read_text())
        if doc.get("node_type") != "array":
            continue
        doc["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "."}}
        zj.write_text(json.dumps(doc))
        for f in [x for x in (zj.parent / "c").rglob("*") if x.is_file()]:
            os.replace(f, zj.parent / f.relative_to(zj.parent).as_posix().replace("/", "."))
        shutil.rmtree(zj.parent / "c")
    spec_check_manifest(SpecStore(p))
    rec = _read_everything(p)
    np.testing.assert_array_equal(rec.aug["mixup_lam"], stores["aug", "values"]["mixup_lam"])
    assert fkdstore.verify(p) == []


def test_section3_declared_decoded_size_is_compared_before_decompressing(stores, tmp_path):
    """Section 3: "A reader MUST compare a chunk's declared decoded size (the blosc header's) with the chunk
    shape before decompressing it": an inner chunk (valid crc32c) that declares twice the rows is refused."""
    p = _copy(stores, "ms_f16", tmp_path)
    f = p / "soft" / "probs" / "c" / "0" / "0" / "0"
    chunks = _inner_chunks(f, IPS // IPC)
    _write_shard(f, [chunks[0], _chunk_bytes(np.zeros((2 * IPC, M, 3), np.float16))])
    with fkdstore.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read_batch([5]), "soft/probs")


def test_section4_3_array_metadata_mismatch_is_corrupt(stores, tmp_path):
    """Invariant 3: "Readers MUST check the Zarr metadata of every array against the header when opening and
    refuse a mismatch (a corrupt-store error naming the array and the field)"; a missing array too."""
    p = _copy(stores, "ms_f16", tmp_path)

    def inner(doc):
        doc["codecs"][0]["configuration"]["chunk_shape"][0] = 2

    def shard(doc):
        doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 4

    def shape(doc):
        doc["shape"][0] = N + 1

    def dtype(doc):
        doc["data_type"] = "uint32"

    for name, fn in (("soft/probs", inner), ("box", shard), ("flip", shape), ("soft/indices", dtype),
                     ("label", dtype), ("key", shard), ("manifest", shape), ("written", shard)):
        zj = p / name / "zarr.json"
        pristine = zj.read_text()
        doc = json.loads(pristine)
        fn(doc)
        zj.write_text(json.dumps(doc))
        _raises(CorruptStoreError, lambda: fkdstore.open(p), name)
        zj.write_text(pristine)
    os.rename(p / "soft" / "probs", tmp_path / "gone")
    _raises(CorruptStoreError, lambda: fkdstore.open(p), "soft/probs")


def test_section4_3_seeded_store_holding_box_or_flip_is_corrupt(stores, tmp_path):
    """Invariant 3: "A store with seeded crops holding `box` or `flip` is corrupt." Section 2: they "MUST be
    absent from storage"."""
    p = _copy(stores, "ms_q8", tmp_path)
    for name in ("box", "flip"):  # the stored twin's arrays: same N, M, layout and dtypes
        shutil.copytree(stores["ms_f16"] / name, p / name)
        _raises(CorruptStoreError, lambda: fkdstore.open(p), name)
        shutil.rmtree(p / name)
    _read_everything(p)


def test_section4_7_chunk_crc32c_is_verified(stores, tmp_path):
    """Invariant 7 / section 3: "a reader MUST verify every `crc32c` (chunk and shard index) before decoding
    and MUST refuse the chunk on mismatch"; only the 4 checksum bytes are flipped (intact payload)."""
    p = _copy(stores, "ms_f16", tmp_path)
    f = p / "soft" / "probs" / "c" / "0" / "0" / "0"
    pristine = f.read_bytes()
    index = np.frombuffer(pristine[-(2 * 16 + 4):-4], "<u8").reshape(2, 2)
    off, nb = (int(x) for x in index[1])
    for where in (off + nb - 1, len(pristine) - 1):  # chunk 1's own crc32c; the index's crc32c
        raw = bytearray(pristine)
        raw[where] ^= 0x80
        f.write_bytes(bytes(raw))
        with fkdstore.open(p) as r, pytest.raises(CorruptStoreError, match="soft/probs"):
            r.read_batch([5])
    f.write_bytes(pristine)
    label = p / "label" / "c" / "1"
    raw = bytearray(label.read_bytes())
    raw[-1] ^= 0x01
    label.write_bytes(bytes(raw))
    with fkdstore.open(p) as r, pytest.raises(CorruptStoreError, match="label"):
        r.labels  # noqa: B018


def test_section4_8_missing_inner_chunk_or_shard_of_a_written_image_is_damage(stores, tmp_path):
    """Invariant 8: "For a written image, a missing shard object of a stored record array, or an inner chunk
    absent from its shard index (offset and length 2^64 - 1), is damage: readers MUST raise a corrupt-store
    error and MUST NOT substitute fill values." Undamaged images still read."""
    p = _copy(stores, "ms_f16", tmp_path)
    f = p / "box" / "c" / "0" / "0" / "0"
    chunks = _inner_chunks(f, IPS // IPC)
    _write_shard(f, [chunks[0], None])
    with fkdstore.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read_batch([5]), "box")
        np.testing.assert_array_equal(r.read_batch([2]).box, stores["inputs"]["boxes"][[2]])
    (p / "soft" / "indices" / "c" / "1" / "0" / "0").unlink()
    with fkdstore.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read_batch([9]), "soft/indices")


def test_section4_9_rows_past_n_are_fill_whatever_is_stored(stores, tmp_path):
    """Invariant 9: "rows past `N` in the last chunk taken as the array's fill value whatever the stored chunk
    holds there, and writers MUST store the fill value there"."""
    p = _copy(stores, "ms_f16", tmp_path)
    for path in SpecStore(p).records:
        f = p / path / "c" / "1" / "0" / "0"
        f = f if f.exists() else f.parent
        chunk = _inner_chunks(f, IPS // IPC)[0]
        a = RawArray(p / path)
        dec = np.frombuffer(blosc.decompress(chunk[:-4]), a.dtype).reshape(a.inner).copy()
        assert not dec[N - 2 * IPC:].any(), path  # the writer stored fill values past N
        if path == "box":
            dec[N - 2 * IPC:] = 7  # another writer left something there: still the same tag
            _write_shard(f, [_chunk_bytes(dec), None])
    rec = _read_everything(p)
    np.testing.assert_array_equal(rec.box, stores["inputs"]["boxes"])
    spec_check_manifest(SpecStore(p))


def test_section4_9_missing_or_sibling_per_image_chunk_is_caught(stores, tmp_path):
    """Invariant 9: "a missing per-image chunk (read as fill values), a chunk or shard from another store or
    another position (swapped files, a sibling store's file ...) is caught": each per-image chunk is bound by
    its tag to the store id and its position."""
    d = stores["inputs"]
    sib = tmp_path / "sibling"  # same shapes and layout, other labels and records: another store id
    d2 = dict(d, labels=d["labels"][::-1].copy(), probs=d["probs"][::-1].copy())
    write_regions(sib, d2, CODEC_STORES["ms_f16"][0])
    assert _header(sib)["store_id"] != _header(stores["ms_f16"])["store_id"]
    cases = [("label/c/0", "copy", "label"), ("image_size/c/1/0", "delete", "image_size"),
             ("key/c/0/0", "delete", "key"), ("soft/probs/c/0/0/0", "copy", "soft/probs")]
    for rel, how, name in cases:
        p = _copy(stores, "ms_f16", tmp_path / rel.replace("/", "_"))
        if how == "copy":
            shutil.copyfile(sib / rel, p / rel)
        else:
            (p / rel).unlink()
        with pytest.raises(CorruptStoreError, match=name):
            _read_everything(p)
    p = _copy(stores, "ms_f16", tmp_path / "swap")  # swapped shard files: each intact, at the wrong position
    a, b = p / "soft/probs/c/0/0/0", p / "soft/probs/c/1/0/0"
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb), b.write_bytes(ra)
    with pytest.raises(CorruptStoreError, match="soft/probs"):
        _read_everything(p)


@pytest.mark.parametrize("seeded", [False, True], ids=["stored", "seeded"])
def test_section4_9_record_tag_with_unwritten_rows_as_fill_also_matches(stores, tmp_path, seeded):
    """Invariant 9: "A record chunk also matches when its tag equals `tag(path, c, D')` with `D'` = `D` where
    the rows of images not marked written ... are set to the fill value: a writer rewriting a partially
    flushed shard writes the data before the manifest row (section 8), and the rows it adds are not yet
    marked written." Section 8: "invariant 9's rule for unwritten rows keeps every written image readable at
    every instant." The instant is built from fkdstore's own files: a store whose shard 0 was flushed with
    images 1 and 2 only, and then the shard-0 data objects of the completed shard (manifest row and flags
    not yet written). This file's reader accepts it; the written images 1, 2 must read."""
    d = stores["inputs"]
    name = "ms_q8" if seeded else "ms_f16"
    codec = CODEC_STORES[name][0]
    p = tmp_path / "resuming"
    write_regions(p, d, codec, seeded=seeded, puts=[np.array([1, 2])], replay=REPLAY if seeded else None)
    st = SpecStore(p)
    for path in st.arrays:
        if path in st.records:  # the writer's new shard-0 data objects are on disk ...
            f = st.arrays[path]._file(0)
            shutil.copyfile(stores[name] / f.relative_to(p), f)
    st = SpecStore(p)  # ... its manifest row and flags are not yet
    spec_check_manifest(st)
    assert [st.read(i)["soft/indices"].tolist() for i in (1, 2)]
    with fkdstore.open(p) as r:
        rec = r.read_batch([1, 2])
    with fkdstore.open(stores[name]) as r:
        np.testing.assert_array_equal(rec.fields["probs"], r.read_batch([1, 2]).fields["probs"])


SEMANTIC = [  # (store, edit, what verify's report names): invariants 4, 5, 11 and section 11.2, tags recomputed
    ("ms_f16", lambda p: _edit_per_image(p, "key", lambda v: v.__setitem__(5, v[4])), ["key", "duplicate"]),
    ("ms_f16", lambda p: _edit_per_image(p, "key", lambda v: v.__setitem__(6, 0)), ["key", "6"]),
    ("ms_f16", lambda p: _edit_per_image(p, "key", lambda v: v.__setitem__((3, 0), 0xFF)), ["key", "3", "UTF-8"]),
    ("ms_f16", lambda p: _edit_per_image(p, "key", lambda v: v.__setitem__((7, 1), 0)), ["key", "7", "NUL"]),
    ("ms_f16", lambda p: _edit_per_image(p, "label", lambda v: v.__setitem__(6, C)), ["label", "6"]),
    ("ms_f16", lambda p: _edit_per_image(p, "image_size", lambda v: v.__setitem__(6, [0, 5])), ["image_size", "6"]),
    ("ms_f16", "box", ["box", "image 3", "slot 1"]),
    ("ms_f16", "soft/indices", ["image 2", "slot 0"]),
    ("map_relabel", "map/indices", ["map/indices", "image 3"]),
    ("map_relabel", "map/scores", ["map/scores", "image 6"]),
]


@pytest.mark.parametrize("store,edit,names", SEMANTIC, ids=[f"{s}-{n[0]}-{n[1]}" for s, _, n in SEMANTIC])
def test_section4_verify_reports_semantic_damage_the_tags_vouch_for(stores, tmp_path, store, edit, names):
    """Section 4: "`verify` additionally checks every chunk of every written shard, invariants 4, 5, 11 and
    12": keys valid UTF-8, non-empty, NUL-free and unique (4); boxes inside the image in exact integers
    (5); codec fields by section 5 (indices in [0, C), distinct); label maps by 11.2 (indices in [0, C),
    distinct per cell, scores finite); per-image values in range (section 2). Each store is edited and its
    manifest recomputed by invariant 9, so the tags vouch for the edit and only these rules can catch it."""
    p = _copy(stores, store, tmp_path)
    st = SpecStore(p)
    if callable(edit):
        edit(p)
    else:
        v = np.concatenate([st.record_chunk(edit, c) for c in range(st.nchunks)])[:N].copy()
        if edit == "box":
            v[3, 1] = [0, 0, stores["inputs"]["sizes"][3, 0] + 1, 1]  # one row too tall
        elif edit == "soft/indices":
            v[2, 0, 1] = v[2, 0, 0]  # a repeated class
        elif edit == "map/indices":
            v[3, 1, 2, 2] = v[3, 0, 2, 2]
        else:
            v[6, 0, 0, 1] = np.inf
        _rewrite_record(p, edit, v)
    spec_retag(p)
    problems = fkdstore.verify(p)
    assert any(all(n in x for n in names) for x in problems), problems


# ===================================================== 3. conformance (sections 5, 6, 10): codecs, augmentation, crops


_Q1, _Q128, _Q200 = float(Q8[1]), float(Q8[128]), float(Q8[200])
EDGE_ROWS = np.array([[0.5, 0.5, 0, 0, 0, 0], [1 / 6] * 6, [0.2, 0.3, 0.3, 0.1, 0.1, 0.0], [1.0, 0, 0, 0, 0, 0],
                      [0.25, 0.25, 0.25, 0.25, 0, 0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0005],
                      [_Q200, 1 - _Q200, 0, 0, 0, 0], [_Q1, _Q128, 0.5 - _Q1, 0, 0, 0]], np.float32)
EDGE_CODECS = [{"name": "full", "dtype": "float16"}, {"name": "full", "dtype": "q8"}, {"name": "hard"},
               {"name": "smoothing", "dtype": "q8"}, {"name": "smoothing", "dtype": "float16"},
               {"name": "ms", "k": 3, "dtype": "q8"}, {"name": "ms", "k": 2, "dtype": "float16"},
               {"name": "mr", "k": 3, "dtype": "q8"}, {"name": "mr", "k": 2, "dtype": "float32"},
               {"name": "logits", "k": None, "dtype": "float16"}, {"name": "logits", "k": 2, "dtype": "q8"},
               {"name": "logits", "k": 1, "dtype": "q8", "tail": "mean", "centred": False},
               {"name": "logits", "k": 3, "dtype": "float16", "tail": "mean", "centred": False},
               {"name": "logits", "k": None, "dtype": "float32", "tail": None, "centred": True},
               {"name": "sampled", "s": 5, "k": 1, "temperature": 1.0, "input": "probs", "dtype": "float16",
                "logp": True, "seed": 3},
               {"name": "sampled", "s": 7, "k": None, "temperature": 2.0, "input": "logits", "dtype": "float32",
                "logp": True, "seed": 4}]


@pytest.mark.parametrize("cfg", EDGE_CODECS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_section5_codecs_on_edge_rows_encode_and_decode_as_the_text_says(cfg):
    """Section 5 on rows the random stores rarely hold: ties ("ties broken by the lower class index"),
    one-hot rows, a stored mass above 1 within PROB_ATOL (the `max(0, ...)` residuals), q8 values exactly on
    a table entry ("the largest code with Q8[c] <= p"), and crafted stored rows: a whole q8 row of zero
    codes (every class gets `e`), `mr` with Σprobs = 0 ("decodes to 1/K on each kept class"), top-K logits
    whose exp sum reaches 1 (no tail; with `tail_mean` -inf, W = W_u), a sampled row with nothing drawn
    (`q_j = r / (C - K)`). Encoding without keys uses section 5.3's content key per row. q8 logits are refused
    below T = 1 (5.6), sampled without `logp` at T != 1 (5.4)."""
    codec = fkdstore.get_codec(cfg)
    logits = np.log(np.maximum(EDGE_ROWS, 1e-30)) * 1.5
    x = _codec_input(cfg, {"logits": logits, "probs": np.minimum(EDGE_ROWS, 1.0005)})
    got, want = codec.encode(x.astype(np.float32)), spec_encode(cfg, x.astype(np.float32))  # 5.3: content keys
    assert got.keys() == want.keys()
    for f in want:
        np.testing.assert_array_equal(np.asarray(got[f]), want[f], err_msg=f)
        assert np.asarray(got[f]).dtype == want[f].dtype, f
    crafted = [want]
    if cfg == {"name": "full", "dtype": "q8"}:
        crafted.append({"probs": np.zeros((2, 6), np.uint8)})
    if cfg["name"] == "mr":
        crafted.append({"indices": np.array([[3, 1, 0]], np.uint16)[:, :cfg["k"]],
                        "probs": np.zeros((1, cfg["k"]), np.uint8 if cfg["dtype"] == "q8" else np.float32)})
    if cfg["name"] == "logits" and cfg["k"] == 2 and cfg["dtype"] == "q8":
        crafted.append({"indices": np.array([[3, 1]], np.uint16), "logits": np.array([[255, 255]], np.uint8)})
    if cfg["name"] == "logits" and cfg.get("tail"):  # 5.5: "If the stored mu is -inf, W = W_u"
        crafted.append({"indices": np.array([[3]], np.uint16), "logits": np.array([[200]], np.uint8),
                        "tail_mean": np.array([-np.inf], np.float16)}
                       if cfg["dtype"] == "q8" else
                       {"indices": np.array([[3, 1, 0]], np.uint16),
                        "logits": np.log(np.array([[0.5, 0.25, 0.125]], np.float16)),
                        "tail_mean": np.array([-np.inf], np.float16)})
    if cfg["name"] == "sampled" and cfg["k"]:  # nothing drawn (allowed with a head): ms's rule for the tail
        crafted.append({"indices": np.array([[4]], np.uint16), "probs": np.array([[0.75]], np.float16),
                        "sample_indices": np.zeros((1, 5), np.uint16), "sample_counts": np.zeros((1, 5), np.uint8),
                        "sample_logp": np.zeros((1, 5), np.float16)})
    for fields in crafted:
        for T in (1.0, 0.5, 2.0):
            _decode_like_the_text(lambda t, f=fields: codec.decode(f, 6, temperature=t), cfg, fields, 6, T, atol=1e-7)


def test_section5_3_crop_keys_and_content_keys():
    """Section 5.3: "key(i, s) = mix(mix((i + 1) * G) + (s + 1) * G)" (the reference: `crop_keys(image_indices[:,
    None], arange(M)[None, :])`); "A codec whose fields depend on random draws (`codec.keyed`: `sampled`) draws
    row j's values from keys[j], its config and row j of x only. Other codecs check keys (shape, integer dtype,
    values in [0, 2^64)) and ignore them." Without keys, the content key `mix(Σ_i mix(bits_i + (i + 1) G))`:
    "independent of the batch, but rows with bit-identical inputs share draws"."""
    rng = np.random.default_rng(21)
    ii, ss = rng.integers(0, 2**31 - 1, 40), rng.integers(0, 2**16, 40)
    ii[:2], ss[:2] = 0, 0
    got = fkdstore.codecs.crop_keys(ii, ss)
    assert got.dtype == np.uint64
    assert got.tolist() == [spec_crop_key(int(i), int(s)) for i, s in zip(ii, ss)]
    np.testing.assert_array_equal(fkdstore.codecs.crop_keys(np.arange(3)[:, None], np.arange(4)[None, :]),
                                  spec_crop_keys(3, 4))
    x = make_inputs(n=3, m=2, c=C, seed=6)
    keys = spec_crop_keys(3, 2)
    for cfg in (*EDGE_CODECS, *(c for c, _ in CODEC_STORES.values())):
        codec = fkdstore.get_codec(cfg)
        assert codec.keyed == (cfg["name"] == "sampled"), cfg
        xin = _codec_input(cfg, x)
        with_keys = codec.encode(xin, keys=keys)
        for f, v in spec_encode(cfg, xin, keys=keys).items():
            np.testing.assert_array_equal(with_keys[f], v, err_msg=str(cfg))
        if codec.keyed:  # another key, other draws; no key: the content key of each row
            assert any((codec.encode(xin, keys=keys ^ np.uint64(1))[f] != with_keys[f]).any() for f in with_keys)
            rows = xin.reshape(-1, C)
            content = np.array([spec_content_key(r) for r in rows], np.uint64).reshape(3, 2)
            for f, v in codec.encode(xin).items():
                np.testing.assert_array_equal(v, codec.encode(xin, keys=content)[f])
                np.testing.assert_array_equal(v[1:2], codec.encode(xin[1:2])[f])  # batch independence
            twin = np.stack([xin[0, 0], xin[0, 0]])[None]
            assert all((v[0, 0] == v[0, 1]).all() for v in codec.encode(twin).values())
        else:
            for f, v in codec.encode(xin).items():
                np.testing.assert_array_equal(v, with_keys[f])
        for bad in (keys[:2], keys.astype(np.float64), np.full(keys.shape, -1, np.int64)):
            with pytest.raises((ValueError, TypeError)):
                codec.encode(xin, keys=bad)


SAMPLED_RULES = {"name": "sampled", "s": 3, "k": 2, "temperature": 1.0, "input": "probs", "dtype": "float16",
                 "logp": True, "seed": 1}
SAMPLED_OK = {"indices": [0, 1], "probs": [0.5, 0.25], "sample_indices": [4, 2, 0], "sample_counts": [2, 1, 0],
              "sample_logp": [-1.5, -2.5, 0.0]}
SAMPLED_BAD = [  # (field, value, the rule of section 5.4 it breaks)
    ("sample_indices", [4, C, 0], "sample_indices in [0, C)"),
    ("indices", [0, C], "indices in [0, C)"),
    ("indices", [1, 1], "head: distinct"),
    ("probs", [0.25, 0.5], "head: descending"),
    ("probs", [0.75, np.nan], "head: finite"),
    ("probs", [1.25, 0.0], "head: in [0, 1 + PROB_ATOL]"),
    ("probs", [0.75, 0.75], "head: mass at most 1 + sum_atol"),
    ("sample_counts", [2, 0, 0], "counts sum to S"),
    ("sample_indices", [4, 2, 5], "padding index 0"),
    ("sample_logp", [-1.5, -2.5, -1.0], "padding logp 0"),
    ("sample_indices", [4, 1, 0], "drawn classes outside the head"),
    ("sample_indices", [4, 4, 0], "drawn classes distinct"),
    ("sample_counts", [1, 2, 0], "ordered by count descending"),
    ("sample_logp", [np.nan, -2.5, 0.0], "drawn logp not NaN"),
    ("sample_logp", [0.01, -2.5, 0.0], "drawn logp <= log(1 + PROB_ATOL)"),
]


@pytest.mark.parametrize("field,value,rule", SAMPLED_BAD, ids=[r for _, _, r in SAMPLED_BAD])
def test_section5_4_sampled_stored_field_rules(field, value, rule):
    """Section 5.4, "Stored-field rules (writer and verify; each names the first bad crop)": a crop crafted
    to break one rule is refused by ``validate_fields`` (the writer's and verify's check); the row it was
    made from passes. Ties: equal counts ordered by index ascending; counts may sum to 0 only with a head."""
    codec = fkdstore.get_codec(SAMPLED_RULES)
    specs = spec_codec_fields(SAMPLED_RULES, C)

    def fields(**change):
        return {f: np.array([[{**SAMPLED_OK, **change}[f]]], specs[f][1]) for f in specs}

    codec.validate_fields(fields(), C)
    codec.validate_fields(fields(sample_indices=[2, 4, 5], sample_counts=[1, 1, 1], sample_logp=[-2, -1, -3]), C)
    with pytest.raises(ValidationError):  # equal counts: index ascending
        codec.validate_fields(fields(sample_indices=[4, 2, 5], sample_counts=[1, 1, 1], sample_logp=[-2, -1, -3]), C)
    with pytest.raises(ValidationError):
        codec.validate_fields(fields(**{field: value}), C)
    codec.validate_fields(fields(sample_indices=[0, 0, 0], sample_counts=[0, 0, 0], sample_logp=[0, 0, 0]), C)
    headless = dict(SAMPLED_RULES, k=None)
    nohead = fkdstore.get_codec(headless)
    w = spec_codec_fields(headless, C)
    zero = {f: np.zeros((1, 1, *shape), dtype) for f, (shape, dtype) in w.items()}
    with pytest.raises(ValidationError):  # "counts sum to S (or to 0, only with a head)"
        nohead.validate_fields(zero, C)


def test_section5_4_sampled_config_conversion_and_refusals(stores):
    """Section 5.4: the config's ranges (`s` 1..65535, `k` >= 1 with K < C or null, `temperature` > 0,
    `input`, `dtype`, `logp` bool, `seed` 0..2^64-1); "Decode at T != 1 ... requires `logp = true`; otherwise a
    reader MUST refuse (ValidationError)"; "No store converts *to* `sampled`"; "A `sampled` store with a head
    converts to `ms`/`mr`/`hard`/`smoothing` of `K' <= K` through its head"."""
    base = CODEC_STORES["sampled_logits"][0]
    for key, value in (("s", 0), ("s", 65536), ("k", 0), ("k", C), ("temperature", 0.0), ("input", "scores"),
                       ("dtype", "int8"), ("seed", -1), ("seed", 2**64)):
        with pytest.raises((ValueError, TypeError)):  # K < C needs C: checked with the store's fields
            fkdstore.get_codec(dict(base, **{key: value})).fields(C)
    with pytest.raises(ValueError):
        fkdstore.codecs.from_config({k: v for k, v in base.items() if k != "seed"})  # every parameter spelled
    with fkdstore.open(stores["sampled_probs"]) as r:
        fields = r.read_batch([0, 1]).fields
        for T in (0.5, 1.0 + 1e-9):
            with pytest.raises(ValidationError):
                r.decode(fields, temperature=T)
    sampled = fkdstore.get_codec(base)
    for src in ({"name": "full", "dtype": "float32"}, {"name": "ms", "k": 3, "dtype": "float16"},
                {"name": "logits", "k": None, "dtype": "float16"}, base):
        assert fkdstore.codecs.conversion_problem(fkdstore.get_codec(src), sampled) is not None, src
    for dst, possible in (({"name": "ms", "k": 2, "dtype": "float32"}, True), ({"name": "hard"}, True),
                          ({"name": "mr", "k": 1, "dtype": "float16"}, True),
                          ({"name": "ms", "k": 3, "dtype": "float32"}, False)):
        problem = fkdstore.codecs.conversion_problem(sampled, fkdstore.get_codec(dst))
        assert (problem is None) == possible, (dst, problem)
    with fkdstore.open(stores["sampled_logits"]) as r:
        f = r.read_batch(np.arange(N)).fields
    ms = fkdstore.codecs.convert_fields(sampled, fkdstore.get_codec({"name": "ms", "k": 2, "dtype": "float16"}), f, C)
    np.testing.assert_array_equal(ms["indices"], f["indices"])
    np.testing.assert_array_equal(ms["probs"], f["probs"])


@pytest.mark.parametrize("name", ["logits_k3_tail", "logits_k3_f16", pytest.param(
    "logits_k3_q8")])
def test_section5_5_tail_bound_and_the_error_bound_it_states(stores, name):
    """Section 5.5: `Logits.tail_bound(fields, C, temperature=T)` "returns δ_T per crop" (0 at T = 1), with δ_T =
    max(log W_hi - log W, log W - log W_lo) and, "for stores without the statistic, the bound of the uniform
    rule, |log W_u - log W_v|"; the text's interval re-implemented here gives the same numbers. With the
    statistic, for T >= 1 "the tail mass ρ of softmax(z / T) and the decoded ρ̂ satisfy |logit ρ̂ - logit ρ|
    <= δ_T ... and every kept class is within a factor exp(±δ_T) of its softmax(z / T) value", plus "the kept
    values' storage rounding adds at most `a (-log(1 - Δ/r) + log(1 + Δ/(1 - r)) + max_i s_i)`" (here T = 2, 4,
    20; T = 1 in the next test), and `δ_T <= a D max(a, 1 - a)`."""
    codec_cfg = _header(stores[name])["regions"]["codec"]
    codec = fkdstore.get_codec(codec_cfg)
    with fkdstore.open(stores[name]) as r:
        f = r.read_batch(np.arange(N)).fields
    for T in (0.5, 1.0, 2.0, 4.0, 20.0):
        lo, lw, hi = spec_tail_interval(codec_cfg, f, C, T)
        want = np.maximum(hi - lw, lw - lo) if codec_cfg["tail"] == "mean" else np.abs(hi - lo)
        got = codec.tail_bound(f, C, temperature=T)
        np.testing.assert_allclose(got, 0 if T == 1 else want, rtol=1e-9, atol=1e-12, err_msg=str(T))
        if codec_cfg["tail"] == "mean" and T > 1:
            excess = _tail_claim_excess(codec, codec_cfg, f, stores["inputs"]["logits"], T, got)
            assert (excess <= 0).all(), (T, excess.max())
            a, l = 1 / T, f["logits"].astype(np.float64)
            r = np.maximum(0, 1 - np.exp(l).sum(-1))
            D = np.maximum(0, np.log(r / (C - 3)) - f["tail_mean"].astype(np.float64))
            assert (got <= a * D * max(a, 1 - a) + 1e-12).all(), T


def _tail_claim_excess(codec, cfg: dict, f: dict, z: np.ndarray, T: float, delta: np.ndarray) -> np.ndarray:
    """Section 5.5's claim per crop: max(|logit ρ̂ - logit ρ|, max_kept |log(q_i / p_i)|) - δ_T - the storage
    allowance, with p = softmax(z / T) of the teacher's outputs."""
    a, l = 1 / T, f["logits"].astype(np.float64)
    q = spec_decode(cfg, f, C, T)
    np.testing.assert_allclose(np.asarray(codec.decode(f, C, temperature=T)), q, rtol=1e-5, atol=1e-6)
    zt = z.astype(np.float64) / T
    p = np.exp(zt - zt.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = f["indices"].astype(np.int64)
    kept = np.zeros(p.shape, bool)
    np.put_along_axis(kept, idx, True, -1)
    rho, rho_hat = np.where(kept, 0, p).sum(-1), np.where(kept, 0, q).sum(-1)
    err = np.abs(np.log(rho_hat / rho) - np.log1p(-rho_hat) + np.log1p(-rho))
    err = np.maximum(err, np.abs(np.log(np.take_along_axis(q, idx, -1) / np.take_along_axis(p, idx, -1))).max(-1))
    s = np.abs(l) * _LOG_STEP[cfg["dtype"]]  # one storage step of each kept value
    r = np.maximum(0, 1 - np.exp(l).sum(-1))
    d = (np.exp(l) * np.expm1(s)).sum(-1)
    return err - delta - a * (-np.log1p(-d / r) + np.log1p(d / (1 - r)) + s.max(-1))


def test_section5_5_storage_rounding_allowance_at_t_1(stores):
    """Section 5.5: δ_1 = 0 and the storage allowance `a (-log(1 - Δ/r) + log(1 + Δ/(1 - r)) + max_i s_i)`: at
    T = 1 the decoded tail mass ρ̂ = r of the float32 store is within that of the teacher's tail mass, in logit,
    and every kept class within it in log."""
    codec_cfg = _header(stores["logits_k3_tail"])["regions"]["codec"]
    codec = fkdstore.get_codec(codec_cfg)
    with fkdstore.open(stores["logits_k3_tail"]) as r:
        f = r.read_batch(np.arange(N)).fields
    excess = _tail_claim_excess(codec, codec_cfg, f, stores["inputs"]["logits"], 1.0, np.zeros((N, M)))
    assert (excess <= 0).all(), excess.max()


def test_section5_5_extreme_point_of_a_kept_q8_code_0():
    """Section 5.5: "with `h` the smallest kept log-probability plus one storage step (... q8 `22/254` ...; for a
    kept q8 code 0, whose log-probability is -inf, `h = log Q8[1]` ...)": a top-K q8 row whose second kept class
    has code 0 (value below Q8[1]). The decode at T = 2 and the bound follow."""
    cfg = {"name": "logits", "k": 2, "dtype": "q8", "tail": "mean", "centred": False}
    f = {"indices": np.array([[0, 1]], np.uint16), "logits": np.array([[255, 0]], np.uint8),
         "tail_mean": np.array([-100.0], np.float16)}
    codec = fkdstore.get_codec(cfg)
    lo, lw, hi = spec_tail_interval(cfg, f, 6, 2.0)
    np.testing.assert_allclose(codec.tail_bound(f, 6, temperature=2.0), np.maximum(hi - lw, lw - lo), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(codec.decode(f, 6, temperature=2.0)), spec_decode(cfg, f, 6, 2.0),
                               rtol=1e-5, atol=1e-7)


def test_section5_6_centred_rows_and_q8_below_t_1(stores):
    """Section 5.6: "`centred = true` (only with `k = null` and `dtype` float16/float32) ... Rule: each row's
    maximum is exactly 0 and no value is NaN (instead of "rows sum to 1"). `kept_mass` is 1." "A reader MUST
    refuse `decode(temperature=T)` with `T < 1` on a `logits` store of dtype q8 (ValidationError)"."""
    base = CODEC_STORES["logits_centred"][0]
    for bad in ({"k": 3}, {"dtype": "q8"}):
        with pytest.raises(ValidationError):
            fkdstore.get_codec(dict(base, **bad))
    with pytest.raises(ValidationError):
        fkdstore.get_codec({"name": "logits", "k": None, "dtype": "float16", "tail": "mean", "centred": False})
    codec = fkdstore.get_codec(base)
    with fkdstore.open(stores["logits_centred"]) as r:
        f = r.read_batch(np.arange(N)).fields
    assert (f["logits"].max(-1) == 0).all() and np.exp(f["logits"].astype(np.float64)).sum(-1).min() > 1
    codec.validate_fields(f, C)
    np.testing.assert_array_equal(np.asarray(codec.kept_mass(f)), np.ones((N, M)))
    for edit in (lambda v: v - np.float16(0.5), lambda v: np.where(v == 0, np.float16(0.25), v),
                 lambda v: np.where(v == v.min(), np.float16(np.nan), v)):
        with pytest.raises(ValidationError):
            codec.validate_fields({"logits": edit(f["logits"]).astype(np.float16)}, C)
    q8 = _header(stores["logits_q8"])["regions"]["codec"]
    with fkdstore.open(stores["logits_q8"]) as r:
        f = r.read_batch(np.arange(N)).fields
        with pytest.raises(ValidationError):
            r.decode(f, temperature=1 - 1e-9)
        for T in (1.0, 1.5):
            _decode_like_the_text(lambda t: r.decode(f, temperature=t), q8, f, C, T)


def test_section5_1_t_equal_1_is_the_plain_decode_not_renormalised(stores):
    """Section 5.1: "**`T = 1` is exactly the `T = 1` decode**, not renormalised: a stored row whose sum is
    off 1 by its rounding (within `sum_atol`) stays so, while any `T != 1` renormalises; so `T = 1 + ε` and
    `T = 1` differ by at most the row's `sum_atol`". "`T` MUST be a finite number > 0."."""
    with fkdstore.open(stores["full_f16"]) as r:
        fields = r.read_batch(np.arange(N)).fields
        q1 = r.decode(fields, temperature=1.0)
        np.testing.assert_array_equal(q1, fields["probs"].astype(np.float32))  # not renormalised
        off = np.abs(q1.astype(np.float64).sum(-1) - 1)
        assert off.max() > 0 and (off <= _sum_atol("float16", C)).all()
        qe = r.decode(fields, temperature=1 + 1e-9)
        np.testing.assert_allclose(qe.astype(np.float64).sum(-1), 1, atol=1e-6)
        assert np.abs(qe - q1).max() <= _sum_atol("float16", C)
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError):
                r.decode(fields, temperature=bad)


C1_FIELDS = {  # C = 1: stored values that are not 1 ("the stored value ... is not looked at")
    "full": {"probs": np.array([[0.7]], np.float16)}, "hard": {"indices": np.array([0], np.uint16)},
    "smoothing": {"indices": np.array([0], np.uint16), "probs": np.array([0.6], np.float32)},
    "ms": {"indices": np.array([[0]], np.uint16), "probs": np.array([[200]], np.uint8)},
    "mr": {"indices": np.array([[0]], np.uint16), "probs": np.array([[0.0]], np.float16)},
    "logits": {"logits": np.array([[-3.0]], np.float32)},
    "logits_k": {"indices": np.array([[0]], np.uint16), "logits": np.array([[7]], np.uint8)},
    "sampled": {"sample_indices": np.array([[0]], np.uint16), "sample_counts": np.array([[3]], np.uint8),
                "sample_logp": np.array([[-0.5]], np.float16)},
}
C1_CODECS = {"full": {"name": "full", "dtype": "float16"}, "hard": {"name": "hard"},
             "smoothing": {"name": "smoothing", "dtype": "float32"}, "ms": {"name": "ms", "k": 1, "dtype": "q8"},
             "mr": {"name": "mr", "k": 1, "dtype": "float16"}, "logits": {"name": "logits", "k": None,
                                                                          "dtype": "float32"},
             "logits_k": {"name": "logits", "k": 1, "dtype": "q8"},
             "sampled": {"name": "sampled", "s": 4, "k": None, "temperature": 1.0, "input": "probs",
                         "dtype": "float16", "logp": True, "seed": 0}}


def test_section5_one_class_decodes_to_one_for_every_codec_and_temperature(tmp_path):
    """Section 5: "`C = 1` — every codec decodes to `[1]`, at every temperature (a distribution over one
    class; the stored value, e.g. a q8 code below 1, is not looked at)". End to end for a q8 store, and
    through the codec of every other config on stored values that are not 1 (a sampled count not summing to
    S included). Section 5.6's refusal of q8 logits below T = 1 holds for C = 1 too (the refusal is at decode
    time, whatever the store holds)."""
    p = tmp_path / "one"
    d = make_inputs(n=3, m=2, c=1)
    write_regions(p, d, C1_CODECS["ms"], images_per_chunk=2, images_per_shard=2)
    with fkdstore.open(p) as r:
        rec = r.read_batch(np.arange(3))
        for T in (1.0, 0.3, 4.0):
            np.testing.assert_array_equal(r.decode(rec.fields, temperature=T), np.ones((3, 2, 1)))
    for name, cfg in C1_CODECS.items():
        codec = fkdstore.get_codec(cfg)
        for T in (1.0, 0.3, 4.0):
            got = _decode_like_the_text(lambda t, c=codec, f=C1_FIELDS[name]: c.decode(f, 1, temperature=t), cfg,
                                        C1_FIELDS[name], 1, T)
            assert got is None or (got.shape[-1] == 1 and (got == 1).all()), (name, T)


def test_section5_k_equal_c_drops_the_residual(stores):
    """Section 5: "`K = C` — the residual of `ms` is dropped (divided by `max(C - K, 1)` and put nowhere)";
    5.1: for `logits`, "`K = C` is allowed: the tail is empty (`n = 0`, `w_t` unused)"."""
    rng = np.random.default_rng(2)
    idx = np.stack([rng.permutation(C) for _ in range(4)]).astype(np.uint16)
    probs = np.sort(rng.dirichlet(np.ones(C), 4) * 0.9, -1)[:, ::-1].astype(np.float32)  # mass 0.9
    ms = {"name": "ms", "k": C, "dtype": "float32"}
    got = np.asarray(fkdstore.get_codec(ms).decode({"indices": idx, "probs": probs}, C))
    np.testing.assert_array_equal(got, spec_decode(ms, {"indices": idx, "probs": probs}, C))
    np.testing.assert_allclose(got.sum(-1), 0.9, atol=1e-6)
    lg = {"name": "logits", "k": C, "dtype": "float32"}
    logits = np.log(probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    for T in (1.0, 0.5, 2.0):
        got = np.asarray(fkdstore.get_codec(lg).decode({"indices": idx, "logits": logits}, C, temperature=T))
        want = spec_decode(lg, {"indices": idx, "logits": logits}, C, T)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        z = logits.astype(np.float64) / T
        soft = np.exp(z - z.max(-1, keepdims=True))
        np.testing.assert_allclose(np.take_along_axis(got, idx.astype(np.int64), -1),
                                   soft / soft.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_section5_float16_logits_stored_mass_uses_logits_atol():
    """Section 5: for float16/float32 `logits` "the stored mass `Σ exp(l_i)` is bounded instead by
    `logits_atol(dtype, n) = PROB_ATOL + max(log n, 1) · step`, `step = 2^-10` for float16 and `2^-23` for
    float32": a whole row (n = C) or a top-K row (n = K) whose mass is just over 1 + that bound is refused,
    just under it accepted; an honest uniform float16 row of C = 57 (mass 1 - 0.0038, beyond `sum_atol`) too."""
    for cfg, n in (({"name": "logits", "k": None, "dtype": "float16"}, C),
                   ({"name": "logits", "k": 3, "dtype": "float16"}, 3),
                   ({"name": "logits", "k": None, "dtype": "float32"}, C)):
        codec = fkdstore.get_codec(cfg)
        t = np.dtype(cfg["dtype"]).type
        v = t(math.log((1 + _logits_atol(cfg["dtype"], n)) / n))  # the storage values on either side of the bound
        while n * math.exp(float(v)) - 1 > _logits_atol(cfg["dtype"], n):
            v = np.nextafter(v, t(-np.inf))
        for value, ok in ((v, True), (np.nextafter(v, t(0)), False)):
            l = np.full((1, 1, n), value, cfg["dtype"])
            fields = {"logits": l} if cfg["k"] is None else {"indices": np.arange(n, dtype=np.uint16)[None, None],
                                                             "logits": l}
            assert (np.exp(l.astype(np.float64)).sum() - 1 <= _logits_atol(cfg["dtype"], n)) == ok
            if ok:
                codec.validate_fields(fields, C)
            else:
                with pytest.raises(ValueError):
                    codec.validate_fields(fields, C)
    codec = fkdstore.get_codec({"name": "logits", "k": None, "dtype": "float16"})
    stored = codec.encode(np.zeros((1, 57), np.float32))
    np.testing.assert_array_equal(stored["logits"], _down(np.full((1, 57), -math.log(57)), "float16"))
    deficit = 1 - np.exp(stored["logits"].astype(np.float64)).sum()
    assert _sum_atol("float16", 57) < deficit <= _logits_atol("float16", 57)
    codec.validate_fields(stored, 57)


PARTNER_CROP = [{"name": "partner_crop", "policies": [AUGMENT2[0], AUGMENT2[1]]}, AUGMENT2[2], AUGMENT2[3]]


def test_section6_3_added_policies_columns_configs_and_draws(stores):
    """Section 6.3's added policies: the columns of their tables (name, dtype, shape; `partner_crop_<c>` "as c"),
    configs spelling every field (an int `kernel_size` and a number `sigma` mean both; `p` defaults 1 for
    `gaussian_blur`, 0.1 for `random_grayscale`; `window` 4096 as `mixup`); the reference writer's draws by
    section 6.2 (`default_rng(SeedSequence([seed, crc32(name), i, s]))`, in the listed order, cast) equal
    ``Pipeline.sample`` for windows over all images, strided windows and windows of one image (`j = i`);
    `partner_crop` and `external_seed` are "not sampled by writers (refused)". The store written with these
    draws declares the tables' columns in pipeline order and passes verify."""
    Pipeline = fkdstore.augment.Pipeline
    for cfgs in (AUGMENT2, EXTERNAL, PARTNER_CROP):
        pipe = Pipeline.from_config(cfgs)
        assert pipe.get_config() == cfgs
        cols = [c.to_json() for c in pipe.columns()]
        want = [x for cfg in cfgs for x in spec_policy_columns(cfg)]
        assert [(c["name"], c["dtype"], c["shape"]) for c in cols] == want
        assert all(c["kind"] in ("float", "int", "bool", "index") and set(c) == {"name", "kind", "dtype", "shape"}
                   for c in cols)
        for cfg in pipe.get_config():
            assert set(cfg) == POLICY_KEYS[cfg["name"]] | {"name"}, cfg
    short = Pipeline.from_config([{"name": "random_grayscale"},
                                  {"name": "gaussian_blur", "kernel_size": 7, "sigma": 1.5},
                                  {"name": "mixup_exact", "alpha": 0.3}]).get_config()
    assert short[0]["p"] == 0.1 and short[1] == {"name": "gaussian_blur", "kernel_size": [7, 7], "sigma": [1.5, 1.5],
                                                 "p": 1.0}
    assert short[2]["window"] == 4096
    for n, window in ((N, 0), (N, 2), (37, 4), (37, 3)):
        cfgs = [dict(c, window=window) if "window" in c else c for c in AUGMENT2]
        pipe = Pipeline.from_config(cfgs)
        for i in (0, 1, 5, n - 1):
            got = pipe.sample(AUG_SEED + window, i, np.arange(M), image_size=(32, 48), num_images=n, crops_per_image=M)
            for slot in range(M):
                want = {k: v for c in cfgs
                        for k, v in spec_policy_sample(c, AUG_SEED + window, i, slot, 32, 48, n).items()}
                for col, v in want.items():
                    assert got[col][slot].dtype == v.dtype and (got[col][slot] == v).all(), (n, window, i, slot, col)
    for cfgs in (EXTERNAL, PARTNER_CROP):
        with pytest.raises(ValidationError):
            Pipeline.from_config(cfgs).sample(0, 0, [0], image_size=(32, 48), num_images=N, crops_per_image=M)
    h = _header(stores["aug2"])
    assert h["regions"]["augment"] == AUGMENT2
    assert [(a["name"], a["dtype"], a["shape"]) for a in h["regions"]["aug"]] == [
        x for cfg in AUGMENT2 for x in spec_policy_columns(cfg)]
    with fkdstore.open(stores["aug2"]) as r:
        rec = r.read_batch(np.arange(N))
    for col, v in stores["aug2", "values"].items():
        np.testing.assert_array_equal(rec.aug[col], v)
    assert (stores["aug2", "values"]["mixup_exact_partner"] >= 0).any()
    assert (stores["aug2", "values"]["cutmix_box_partner"] == -1).any()
    assert fkdstore.verify(stores["aug2"]) == []


def test_section6_3_every_policy_table_gives_the_column_kind():
    """Sections 1.3 and 6: an `aug` entry is `{"name", "kind", "dtype", "shape"}` and MUST equal the pipeline's
    columns, so a writer following the text needs each column's kind from section 6.3's tables."""
    text = (Path(__file__).parents[1] / "spec" / "format-v4.md").read_text()
    part = text[text.index("### 6.3 Policies"):text.index("### 6.4")]
    heads = [ln for ln in part.splitlines() if ln.startswith("| column |")]
    assert len(heads) >= 11 and all("| kind |" in ln for ln in heads), heads


PIPELINE_REFUSED = [  # section 6.3's rules on configs and pipelines
    [{"name": "gaussian_blur", "kernel_size": [4, 5], "sigma": [0.5, 2.0], "p": 1.0}],
    [{"name": "gaussian_blur", "kernel_size": [3, 257], "sigma": [0.5, 2.0], "p": 1.0}],
    [{"name": "gaussian_blur", "kernel_size": [3, 3], "sigma": [0.0005, 2.0], "p": 1.0}],
    [{"name": "gaussian_blur", "kernel_size": [3, 3], "sigma": [2.0, 1.0], "p": 1.0}],
    [{"name": "random_grayscale", "p": 1.5}],
    [dict(EXTERNAL[0], library="")],
    [*EXTERNAL, AUGMENT2[0]],
    [{"name": "partner_crop", "policies": [AUGMENT2[2]]}],
    [{"name": "partner_crop", "policies": []}, {"name": "partner_crop", "policies": []}],
    [AUGMENT2[2], {"name": "partner_crop", "policies": []}],
]


@pytest.mark.parametrize("cfgs", PIPELINE_REFUSED, ids=range(len(PIPELINE_REFUSED)))
def test_section6_3_added_policies_refuse_configs_outside_the_text(cfgs):
    """Section 6.3: `kernel_size` odd in 1..255, `sigma` `0.001 <= min <= max <= 1000`, `p` in [0, 1], `library`
    non-empty; "`external_seed` MUST be the only policy of its pipeline"; `partner_crop`'s `policies` are
    non-mixing; "A pipeline holds at most one `partner_crop`, placed among the non-mixing policies"."""
    with pytest.raises((ValidationError, TypeError)):
        fkdstore.augment.Pipeline.from_config(cfgs)


def _validity_cases():
    """(pipeline configs, columns edit, valid?) for section 6.3's validity rules, on columns drawn by 6.2."""
    H, W = REPLAY["input_size"]
    top = float(np.float16(2.0)) + float(np.spacing(np.float16(2.0)))  # one float16 step of max above it
    return [
        (AUGMENT2, {"blur_sigma": (0, np.float16(top))}, True),
        (AUGMENT2, {"blur_sigma": (0, np.nextafter(np.float16(top), np.float16(9)))}, False),
        (AUGMENT2, {"blur_sigma": (0, np.float16(0.49))}, False),
        ([dict(AUGMENT2[1], p=0.0)], {"blur_sigma": (0, np.float16(1.0))}, False),
        (AUGMENT2, {"mixup_exact_lam": (0, np.float32(1.5)), "mixup_exact_partner": (0, 3)}, False),
        (AUGMENT2, {"mixup_exact_lam": (0, np.float32(0.5)), "mixup_exact_partner": (0, -1)}, False),
        (AUGMENT2, {"mixup_exact_lam": (0, np.float32(0.5)), "mixup_exact_partner": (0, N)}, False),
        (AUGMENT2, {"mixup_exact_lam": (0, np.float32(0.5)), "mixup_exact_partner": (0, N - 1)}, True),
        (AUGMENT2, {"cutmix_box_partner": (0, 2), "cutmix_box_rect": (0, [0, 0, H, W]),
                    "cutmix_box_lam": (0, np.float32(0.25))}, True),
        (AUGMENT2, {"cutmix_box_partner": (0, 2), "cutmix_box_rect": (0, [0, 0, H + 1, W]),
                    "cutmix_box_lam": (0, np.float32(0.25))}, False),
        (AUGMENT2, {"cutmix_box_partner": (0, 2), "cutmix_box_rect": (0, [5, 0, 4, W]),
                    "cutmix_box_lam": (0, np.float32(0.25))}, False),
        (AUGMENT2, {"cutmix_box_partner": (0, 2), "cutmix_box_rect": (0, [0, 0, 4, 4]),
                    "cutmix_box_lam": (0, np.float32(-0.25))}, False),
        (AUGMENT2, {"cutmix_box_partner": (0, -1), "cutmix_box_rect": (0, [0, 0, 4, 4]),
                    "cutmix_box_lam": (0, np.float32(1.0))}, False),
        (AUGMENT2, {"cutmix_box_partner": (0, -1), "cutmix_box_rect": (0, [0, 0, 0, 0]),
                    "cutmix_box_lam": (0, np.float32(0.5))}, False),
        (PARTNER_CROP, {}, True),
        (PARTNER_CROP, {"partner_crop_box": (0, [0, 0, 0, 5])}, False),
        (PARTNER_CROP, {"partner_crop_box": (0, [-1, 0, 4, 5])}, False),
        (PARTNER_CROP, {"partner_crop_blur_sigma": (0, np.float16(3.0))}, False),
        (PARTNER_CROP, {"mixup_exact_partner": (0, 2), "mixup_exact_lam": (0, np.float32(0.5)),
                        "cutmix_box_partner": (0, 3), "cutmix_box_rect": (0, [0, 0, 4, 4]),
                        "cutmix_box_lam": (0, np.float32(0.5))}, False),
        (PARTNER_CROP, {"mixup_exact_partner": (0, 3), "mixup_exact_lam": (0, np.float32(0.5)),
                        "cutmix_box_partner": (0, 3), "cutmix_box_rect": (0, [0, 0, 4, 4]),
                        "cutmix_box_lam": (0, np.float32(0.5))}, True),
        (EXTERNAL, {"external_partner": (0, N)}, False),
        (EXTERNAL, {"external_partner": (0, -2)}, False),
        (EXTERNAL, {"external_partner": (0, N - 1)}, True),
    ]


@pytest.mark.parametrize("case", range(len(_validity_cases())))
def test_section6_4_validity_of_the_added_policies(case):
    """Section 6.3's validity lines, checked by ``Pipeline.validate`` (section 6.4: "what a reader checks"):
    `blur_sigma` "is 0 or within [min, max] widened by one float16 step of max; 0 everywhere when p = 0";
    `mixup_exact`: "lam in [0, 1]; lam = 1.0 when not mixed"; `cutmix_box`: "0 <= y1 <= y2 <= H, 0 <= x1 <= x2 <= W;
    lam in [0, 1]; rect 0 and lam 1.0 when not mixed"; `partner_crop`: "the box is all 0 or has height, width >= 1
    and top, left >= 0; every partner_crop_<c> obeys c's rules; the mixing policies of a slot name one partner";
    `external_seed`: "`external_partner` in [-1, N)"; `-1 <= partner < N` (H, W: `replay.input_size`)."""
    cfgs, edits, valid = _validity_cases()[case]
    pipe = fkdstore.augment.Pipeline.from_config(cfgs)
    cols = {name: np.zeros((2, *shape), dtype) for name, dtype, shape in
            (x for cfg in cfgs for x in spec_policy_columns(cfg))}
    for name, v in cols.items():  # an unmixed slot is the valid base: lam 1.0, partner -1
        if name.endswith("_partner"):
            v[:] = -1
        if name in ("mixup_exact_lam", "cutmix_box_lam"):
            v[:] = 1.0
    for name, (row, value) in edits.items():
        cols[name][row] = value
    if valid:
        pipe.validate(cols, num_images=N, crops_per_image=M, image_size=REPLAY["input_size"])
    else:
        with pytest.raises(ValidationError):
            pipe.validate(cols, num_images=N, crops_per_image=M, image_size=REPLAY["input_size"])


def test_section6_3_external_seed_store_reads_labels_and_columns_but_no_pixels(stores, tmp_path):
    """Section 6.3, `external_seed`: "A reader MUST NOT produce pixels for it with its own ops: it MUST refuse
    to replay crops unless the user supplies a replay function, and MUST still read the labels and the stored
    columns"; the columns of its table; `external_partner` in [-1, N) (verify, invariant 11)."""
    p = stores["ext"]
    aug = _header(p)["regions"]["aug"]
    assert [(a["name"], a["dtype"], a["shape"]) for a in aug] == POLICY_COLUMNS["external_seed"]
    with fkdstore.open(p) as r:
        rec = r.read_batch(np.arange(N))
        for col, v in stores["ext", "values"].items():
            np.testing.assert_array_equal(rec.aug[col], v)
        np.testing.assert_array_equal(r.decode(rec.fields).argmax(-1), stores["inputs"]["probs"].argmax(-1))
        pipe = r.header.regions.augment
        params = {c: v[3, 1] for c, v in rec.aug.items()}
    pixels = np.zeros((32, 48, 3), np.uint8)
    for replay in (lambda: pipe.premix(pixels, params), lambda: pipe.apply(pixels, params)):
        with pytest.raises(ExternalReplayError, match="timm"):
            replay()
    assert fkdstore.verify(p) == []
    q = _copy(stores, "ext", tmp_path)
    st = SpecStore(q)
    v = np.concatenate([st.record_chunk("aug/external_partner", c) for c in range(st.nchunks)])[:N].copy()
    v[4, 2] = N
    _rewrite_record(q, "aug/external_partner", v)
    spec_retag(q)
    assert any("external_partner" in x for x in fkdstore.verify(q))


def test_section6_4_verify_reports_augmentation_values_breaking_their_policy(stores, tmp_path):
    """Section 6.4 / invariant 11: "`cj_order < 24` ...; `-1 <= partner < N`; `mixup_lam = 255` ... when not
    mixed"; factors inside the configured ranges (well outside here). Tags recomputed: only these rules
    catch the edits."""
    cases = [("aug/cj_order", (2, 1), 24, "cj_order"), ("aug/mixup_partner", (2, 1), N, "mixup_partner"),
             ("aug/mixup_partner", (2, 1), -1, "mixup_lam"), ("aug/cj_factors", (2, 1, 0), 1.5, "cj_factors")]
    for path, where, value, name in cases:
        p = _copy(stores, "aug", tmp_path / f"{name}{value}")
        st = SpecStore(p)
        v = np.concatenate([st.record_chunk(path, c) for c in range(st.nchunks)])[:N].copy()
        v[where] = value
        _rewrite_record(p, path, v)
        spec_retag(p)
        problems = fkdstore.verify(p)
        assert any(name in x for x in problems), (path, value, problems)


def test_section6_4_color_jitter_factors_within_one_float16_step_of_the_range(stores, tmp_path):
    """Section 6.4: "factors inside the configured ranges widened at each end by one float16 step of the larger
    bound, `numpy.spacing(float16(max(|min|, |max|)))`": for `brightness: [0.6, 1.4]` the float16 neighbour of
    1.4 above it (1.4004, within one step 2^-10) is accepted, the next one (1.4014) and the float16 just below
    0.6 - 2^-10 are reported by verify (invariant 11)."""
    step = float(np.spacing(np.float16(1.4)))
    above = [np.float16(1.4), np.nextafter(np.float16(1.4), np.float16(2))]
    below = np.nextafter(np.float16(0.6 - step), np.float16(0))
    assert 1.4 < float(above[0]) <= 1.4 + step < float(above[1]) and float(below) < 0.6 - step
    for value, reported in ((above[0], False), (above[1], True), (below, True)):
        p = _copy(stores, "aug", tmp_path / str(float(value)))
        st = SpecStore(p)
        v = np.concatenate([st.record_chunk("aug/cj_factors", c) for c in range(st.nchunks)])[:N].copy()
        v[2, 1, 0] = value
        _rewrite_record(p, "aug/cj_factors", v)
        spec_retag(p)
        problems = fkdstore.verify(p)
        assert any("cj_factors" in x for x in problems) == reported, (float(value), problems)


def test_section10_1_replay_edited_or_out_of_range(stores, tmp_path):
    """Section 10.1: the replay object "is covered by the header checksum: editing it is a corrupt-store
    error, and a reader MUST refuse a value outside these ranges at open (a format error)"."""
    p = _copy(stores, "ms_q8", tmp_path)
    pristine = (p / "zarr.json").read_text()
    _edit_header(p, lambda h: h["replay"].update(mean=[0.485, 0.456, 0.406]), checksum=False)
    _raises(CorruptStoreError, lambda: fkdstore.open(p), "checksum")
    for key, value in (("std", [0.2, -1, 0.2]), ("input_size", [32, 1025]), ("input_size", [32.0, 48]),
                       ("interpolation", "area"), ("mean", [0, 0])):
        (p / "zarr.json").write_text(pristine)
        _edit_header(p, lambda h, key=key, value=value: h["replay"].update({key: value}))
        _raises(FormatError, lambda: fkdstore.open(p), key)


def test_section10_2_uint16_boxes_with_a_side_over_65535_are_corrupt(tmp_path):
    """Section 10.2: "A store whose `box_dtype` is `uint16` while an image side exceeds 65535 cannot hold its
    derived boxes: readers MUST raise a corrupt-store error naming the image". Crafted: an int32 seeded store
    relabelled `uint16` with a valid checksum and a manifest recomputed by invariant 9 (boxes wrapped), so
    only this rule can catch it."""
    d = make_inputs(n=6, m=2, c=4, seed=4)
    d["sizes"][4] = (70000, 30)
    p = tmp_path / "s"
    write_regions(p, d, {"name": "hard"}, seeded=True, images_per_chunk=2, images_per_shard=4)
    assert _header(p)["regions"]["box_dtype"] == "int32"
    _edit_header(p, lambda h: h["regions"].update(box_dtype="uint16"))
    spec_retag(p, wrap_boxes=True)
    with fkdstore.open(p) as r:
        _raises(CorruptStoreError, lambda: r.read_batch([4]), "image 4")


def test_section10_2_replay_check_refuses_a_sampler_that_does_not_reproduce_the_tags(stores, tmp_path):
    """Section 10.2: "Before it returns derived data, a reader MUST derive at least one whole chunk holding a
    written image and compare its `box` and `flip` tags with the manifest ... A mismatch is a corrupt-store
    error saying that the crops cannot be replayed by this sampler, naming the array, the chunk and its
    images"; invariant 12 for verify. A sampler edit with a valid checksum is caught by the tags."""
    for key, value in (("seed", 8), ("scale", [0.3, 0.95]), ("flip_p", 0.31)):
        p = _copy(stores, "ms_q8", tmp_path / key)
        _edit_header(p, lambda h, key=key, value=value: h["regions"]["crops"]["sampler"].update({key: value}))
        with fkdstore.open(p) as r:
            _raises(CorruptStoreError, lambda: r.read_batch([1]), "chunk 0", "0..3")
        problems = fkdstore.verify(p)
        assert problems and all("'box'" in x or "'flip'" in x for x in problems), problems


# ======================================================================= 4. section 12: stores of 2.0 and 3.0, and 1.0


@pytest.mark.parametrize("name,version", [("seeded", "3.0"), ("stored", "2.0")])
def test_section12_golden_stores_read_by_the_legacy_rules_equal_fkdstore(name, version):
    """Section 12: a 2.0/3.0 store read by this file's legacy reader (flat header, checksum per 1.2, tags
    without store-id bytes, manifest row c = tags of inner chunk c, per-image arrays chunked by min(N, 65,536),
    seeded crops derived from `crop_sampler` in 3.0) gives what ``fkdstore.open`` gives and what the golden
    writer was given; its decoded labels equal fkdstore's bit for bit."""
    e = dict(np.load(GOLDEN3 / "expected.npz"))
    st = SpecLegacyStore(GOLDEN3 / f"{name}.zarr")
    assert st.h["format_version"] == version and "store_id" not in st.h
    st.check_manifest()
    recs = st.read_all()
    keys = [spec_key(row) for row in st.per_image("key")]
    assert keys == json.loads((GOLDEN3 / "keys.json").read_text())
    np.testing.assert_array_equal(recs["box"], e["boxes"])
    np.testing.assert_array_equal(recs["flip"], e["flips"])
    if version == "3.0":
        assert st.h["crop_sampler"] == json.loads((GOLDEN3 / "crop_sampler.json").read_text())
    with fkdstore.open(GOLDEN3 / f"{name}.zarr") as r:
        assert r.image_keys == keys
        np.testing.assert_array_equal(r.image_sizes, st.per_image("image_size"))
        np.testing.assert_array_equal(r.labels, st.per_image("label"))
        np.testing.assert_array_equal(r.written, st.per_image("written").astype(bool))
        rec = r.read_batch(np.arange(st.n))
        np.testing.assert_array_equal(rec.box, recs["box"])
        np.testing.assert_array_equal(rec.flip, recs["flip"])
        fields = {p.split("/", 1)[1]: v for p, v in recs.items() if p.startswith("soft/")}
        assert fields.keys() == rec.fields.keys()
        for f, v in fields.items():
            np.testing.assert_array_equal(rec.fields[f], v)
            np.testing.assert_array_equal(v, e[f"{name}/{f}"])
        want = spec_decode(st.h["codec"], fields, st.c)
        np.testing.assert_array_equal(r.decode(rec.fields), want)
        np.testing.assert_array_equal(want, e[f"{name}/decoded"])


def test_section12_legacy_tags_bind_position_and_writers_do_not_add_to_old_stores(tmp_path):
    """Section 12: 2.0/3.0 manifests tag each inner chunk with its position (a swapped shard is caught);
    "writers MUST NOT add to a store of an earlier version (a schema error ...)"; 1.0 "is read only to
    migrate it: readers refuse it with a format error that says so"."""
    p = tmp_path / "stored.zarr"
    shutil.copytree(GOLDEN3 / "stored.zarr", p)
    a, b = p / "soft/probs/c/0/0/0", p / "soft/probs/c/1/0/0"
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb), b.write_bytes(ra)
    with pytest.raises(SpecError):
        SpecLegacyStore(p).check_manifest()
    with fkdstore.open(p) as r, pytest.raises(CorruptStoreError, match="soft/probs"):
        r.read_batch(np.arange(11))
    a.write_bytes(ra), b.write_bytes(rb)
    e = dict(np.load(GOLDEN3 / "expected.npz"))
    h = _header(p)
    with pytest.raises(fkdstore.SchemaMismatchError):
        fkdstore.write(p, num_images=11, crops_per_image=5, num_classes=7, codec=h["codec"],
                       image_keys=json.loads((GOLDEN3 / "keys.json").read_text()), image_sizes=e["sizes"],
                       labels=e["labels"], images_per_chunk=2, images_per_shard=4)
    with pytest.raises(FormatError, match="convert"):
        fkdstore.open(Path(__file__).parent / "golden" / "v1.0" / "ms.zarr")


def test_section12_legacy_unknown_top_level_keys_are_ignored(tmp_path):
    """Section 12: in 2.0/3.0 "Unknown keys are ignored at the top level and inside `aug` entries" (the
    checksum recomputed by section 1.2's rule)."""
    p = tmp_path / "seeded.zarr"
    shutil.copytree(GOLDEN3 / "seeded.zarr", p)
    _edit_header(p, lambda h: h.update(format_version="3.4", future={"x": [1.5, "é"]}))
    SpecLegacyStore(p).check_manifest()
    e = dict(np.load(GOLDEN3 / "expected.npz"))
    with fkdstore.open(p) as r:
        np.testing.assert_array_equal(r.read_batch(np.arange(11)).box, e["boxes"])


def test_section12_legacy_per_image_arrays_chunked_by_min_n_65536_images():
    """Section 12: "The per-image arrays are chunked by `min(N, 65,536)` images and not bound"."""
    for store in ("stored.zarr", "seeded.zarr"):
        n = _header(GOLDEN3 / store)["num_images"]
        for name in ("key", "image_size", "label"):
            assert RawArray(GOLDEN3 / store / name).chunks[0] == min(n, 65536), (store, name)


# ========================================================== 5. section 9.1: provenance of an imported store

TV_K, TV_EPOCHS = 3, (4, 6)


@pytest.fixture(scope="module")
def tinyvit_import(tmp_path_factory, _no_fsync):
    """TinyViT's saved logits (the importer's documented layout: per epoch `logits_top{K}_epoch{E}/rank0-keys.txt`,
    one `str(ImageFolder index)` per line in sampler order, and `rank0-values.bin`, records of int32 seed, K int16
    class indices, K float16 probabilities; one rank, mixed pairs = lines 2l, 2l + 1) for 6 images, imported."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tinyvit")
    rng = np.random.default_rng(8)
    files = [f"{c}/img{k}.png" for c in ("n02", "n01") for k in range(3)]
    for k, f in enumerate(files):
        (root / "images" / f).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (7 + k, 5 + k), (k, 9, 99)).save(root / "images" / f)
    folder_order = sorted(files, key=lambda f: (f.split("/")[0], f))  # ImageFolder: classes sorted, then files
    rec = np.dtype([("seed", "<i4"), ("idx", "<i2", (TV_K,)), ("val", "<f2", (TV_K,))])
    records = {}
    for e in TV_EPOCHS:
        d = root / "src" / f"logits_top{TV_K}_epoch{e}"
        d.mkdir(parents=True)
        order = rng.permutation(len(files))  # dataset indices in sampler order
        probs = np.sort(rng.dirichlet(np.ones(C), len(files)), -1)[:, ::-1] * 0.98
        recs = np.array([(rng.integers(0, 2**31), np.argsort(-rng.random(C))[:TV_K], probs[k, :TV_K])
                         for k in range(len(files))], rec)
        (d / "rank0-keys.txt").write_text("".join(f"{i}\n" for i in order))
        recs.tofile(d / "rank0-values.bin")
        records[e] = {int(i): (recs[line], int(order[line ^ 1]), int(recs[line ^ 1]["seed"]))
                      for line, i in enumerate(order)}
    from fkdstore.importers import import_tinyvit

    args = (root / "src", root / "dst", root / "images")
    summary = import_tinyvit(*args, num_classes=C, keys="index")
    return {"root": root, "args": args, "summary": summary, "records": records, "folder_order": folder_order}


def test_section9_1_import_provenance_binding_and_resume(tinyvit_import):
    """Section 9.1: `meta["import"]` "Written by every importer and compared on resume (a rerun ... reopens the
    store only when its `meta["import"]` equals the new run's; any other non-empty destination is refused)";
    `format` (`tinyvit`), `source` (absolute path); `meta["history"]` "gets one record {"op": "import-<zoo>",
    "source", "to": codec config, "images"}"; "the header's `replay` is ... (TinyViT: null, its pixels are
    replayed externally; the values are recorded in `meta`)". The table's TinyViT row: `keys.txt` line =
    `str(ImageFolder index)`, epoch `epochs[s]` = slot `s`, columns `external_seed` (library timm, pair rule
    `seed_a ^ seed_b`); labels `ms` float16."""
    t = tinyvit_import
    src, dst, images = t["args"]
    h = _header(dst)
    meta = h["meta"]
    assert meta["import"]["format"] == "tinyvit" and meta["import"]["source"] == str(src.resolve())
    assert Path(meta["import"]["source"]).is_absolute()
    (hist,) = meta["history"]
    assert hist["op"] == "import-tinyvit" and hist["source"] == str(src.resolve()) and hist["images"] == 6
    assert hist["to"] == h["regions"]["codec"] and h["regions"]["codec"]["name"] == "ms"
    assert h["regions"]["codec"]["dtype"] == "float16" and h["regions"]["codec"]["k"] == TV_K
    assert h["replay"] is None and {"input_size", "mean", "std"} <= set(meta)
    (policy,) = h["regions"]["augment"]
    assert (policy["name"], policy["library"], policy["pair_rule"]) == ("external_seed", "timm", "seed_a ^ seed_b")
    with fkdstore.open(dst) as r:
        keys = r.image_keys
        rec = r.read_batch(np.arange(6))
    assert sorted(keys) == sorted(t["folder_order"])
    for s, e in enumerate(TV_EPOCHS):
        for ds, key in enumerate(t["folder_order"]):
            i = keys.index(key)
            (seed, idx, val), mate, mate_seed = t["records"][e][ds]
            np.testing.assert_array_equal(rec.fields["indices"][i, s], idx)
            np.testing.assert_array_equal(rec.fields["probs"][i, s], val)
            assert rec.aug["external_seed"][i, s] == seed and rec.aug["external_partner_seed"][i, s] == mate_seed
            assert keys[rec.aug["external_partner"][i, s]] == t["folder_order"][mate]
    before = {f: f.read_bytes() for f in dst.rglob("*") if f.is_file()}
    from fkdstore.importers import import_tinyvit

    again = import_tinyvit(src, dst, images, num_classes=C, keys="index")  # the same run: reopened, nothing to do
    assert again["resumed"] is True
    with pytest.raises(FkdstoreError):  # another run (other recorded settings) into the non-empty destination
        import_tinyvit(src, dst, images, num_classes=C, keys="index", timm_config={"mixup": 0.8})
    after = {f: f.read_bytes() for f in dst.rglob("*") if f.is_file()}
    assert after.keys() == before.keys() and all(after[f] == before[f] for f in after if f.name != "zarr.json")
    assert {k: v for k, v in _header(dst).items() if k != "meta"} == {k: v for k, v in h.items() if k != "meta"}


def test_section9_1_import_records_the_common_keys(tinyvit_import):
    """Section 9.1: "Common keys: `format` ..., `source` (absolute path(s)), `files`, `order` (`imagefolder` ...
    or `listing`), `binding` (how a record finds its image, in words), `slots` (how records become slots), and
    `flags`"."""
    imp = _header(tinyvit_import["args"][1])["meta"]["import"]
    assert imp["order"] in ("imagefolder", "listing") and isinstance(imp["flags"], list)
    assert {"format", "source", "files", "order", "binding", "slots", "flags"} <= set(imp), sorted(imp)
