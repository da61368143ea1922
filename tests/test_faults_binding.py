"""Fault injection for what format 4.0 binds beyond the record arrays: the per-image arrays (``key``,
``image_size``, ``label``) and the replay parameters. For each per-image array its chunk is deleted, replaced
by a same-shaped sibling store's chunk, and rolled back to an older version; each replay parameter is
edited. Every read path — ``read``, ``read_batch``, ``read_all``, ``soft_labels``, the per-image properties,
``TorchDataset`` — and ``verify`` must fail with an error naming the array and the images; never fill
values, never the sibling's values. (Opening is lazy: a store of 1.28M images opens without reading its
per-image arrays; the first read that returns records of a damaged shard raises.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from faultutil import header, set_header
from storeutil import small_store

import fkdstore
from fkdstore import schema as S
from fkdstore.errors import CorruptStoreError, FormatError
from fkdstore.seeded import SlotCropSampler
from fkdstore.transforms import Replay
from fkdstore.verification import verify

N, M, C, IPC, IPS = 16, 4, 10, 4, 8  # 2 shards; damage goes to shard 1 (images 8-15)
REPLAY = Replay(input_size=(12, 16), interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
BOUND = (S.KEY, S.IMAGE_SIZE, S.LABEL)


def _make(path, seed=0, **kw):
    """Keys in folder order (``img000.png`` ...), so an image folder lists them as the store does."""
    keys = [f"{'img' if seed == 0 else 'pic'}{i:03d}.png" for i in range(N)]
    return small_store(path, n=N, m=M, c=C, ipc=IPC, ips=IPS, seed=seed, crop_sampler=SlotCropSampler(seed=2),
                       replay=REPLAY, keys=keys, **kw)


@pytest.fixture
def pair(tmp_path):
    """A store and a sibling of the same shape (same N, M, C, layout) with other keys, sizes and labels."""
    a, b = tmp_path / "a", tmp_path / "b"
    _make(a, seed=0)
    _make(b, seed=1, meta={"teacher": {"name": "sibling"}})
    return a, b


def _chunk(path, name: str, shard: int) -> Path:
    ndim = len(json.loads((Path(path) / name / "zarr.json").read_text())["shape"])
    return Path(path) / name / "/".join(["c", str(shard)] + ["0"] * (ndim - 1))


def _every_read_fails(p, name: str, images: str = "images 8..15"):
    """Every read path raises CorruptStoreError naming the array and the shard's images; the other shard
    still reads (the damage is local)."""
    what = f"array {name!r} chunk 1 ({images})"
    r = fkdstore.open(p)  # lazy: opening reads no per-image chunk
    calls = {
        "read": lambda r: r.read(9),
        "read_batch": lambda r: r.read_batch([12, 1]),
        "read_all": lambda r: r.read_all(),
        "soft_labels": lambda r: r.soft_labels(10),
        "per-image property": lambda r: {S.KEY: lambda: r.image_keys, S.IMAGE_SIZE: lambda: r.image_sizes,
                                         S.LABEL: lambda: r.labels}[name](),
    }
    for label, call in calls.items():
        with pytest.raises(CorruptStoreError) as e:
            call(fkdstore.open(p))
        assert what in str(e.value), (label, str(e.value))
    assert r.read(2).box.shape == (M, 4)  # shard 0 is intact
    problems = verify(p)
    assert any(what in x for x in problems), problems
    return problems


def _torch_dataset_fails(p, tmp_path, name: str):
    torch = pytest.importorskip("torch")  # noqa: F841
    from fkdstore.pytorch import TorchDataset

    images = tmp_path / "imgs"
    if not images.exists():
        from PIL import Image

        r = fkdstore.open(tmp_path / "a")  # the intact twin gives keys and sizes for the image files
        for k, (h, w) in zip(r.image_keys, r.image_sizes):
            (images / k).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (int(w), int(h)), (9, 99, 199)).save(images / k)
    with pytest.raises((CorruptStoreError, FileNotFoundError)) as e:
        TorchDataset(p, images, crops_per_sample=1)
    assert f"array {name!r}" in str(e.value), str(e.value)


@pytest.mark.parametrize("name", BOUND)
def test_deleted_per_image_chunk_is_damage_not_fill_values(pair, tmp_path, name):
    a, _ = pair
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    _chunk(bad, name, 1).unlink()  # Zarr would read fill values (keys '', sizes 0, labels -1)
    problems = _every_read_fails(bad, name)
    assert any("missing, misplaced or stale" in x for x in problems)
    _torch_dataset_fails(bad, tmp_path, name)


@pytest.mark.parametrize("name", BOUND)
def test_sibling_stores_per_image_chunk_is_caught(pair, tmp_path, name):
    a, b = pair
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    shutil.copyfile(_chunk(b, name, 1), _chunk(bad, name, 1))  # a valid chunk, crc32c included, of a sibling
    _every_read_fails(bad, name)
    _torch_dataset_fails(bad, tmp_path, name)


def test_a_whole_sibling_shard_is_caught_by_the_store_id(pair, tmp_path):
    """Every file of shard 1 — record arrays, per-image chunks, manifest row, written flags — taken from a
    sibling store: each file is consistent with the others, only the store id in the tags tells."""
    a, b = pair
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    for name in [*S.PER_IMAGE_ARRAYS, S.MANIFEST, *fkdstore.open(a).record_arrays]:
        shutil.copyfile(_chunk(b, name, 1), _chunk(bad, name, 1))
    with pytest.raises(CorruptStoreError, match="does not match the manifest"):
        fkdstore.open(bad).read(9)
    assert fkdstore.open(bad).read(1).box.shape == (M, 4)
    assert any("chunk 1 (images 8..15)" in x for x in verify(bad))


@pytest.mark.parametrize("name", BOUND)
def test_rolled_back_per_image_chunk_is_caught(pair, tmp_path, name):
    """The store's own older chunk: shard 1's per-image data changed later (a rerun that fixed an image's
    size, a relabelled image) and its manifest row with it; an old copy of the chunk put back is stale."""
    a, _ = pair
    old = _chunk(a, name, 1).read_bytes()
    g = zarr.open_group(str(a), mode="r+")
    h = S.parse_header(g.attrs[S.ATTR_KEY])
    arr = g[name]
    rows = arr[8:16].copy()
    if name == S.KEY:
        rows[0, :4] = np.frombuffer(b"zzzz", np.uint8)
    elif name == S.IMAGE_SIZE:
        rows[0] += 1
    else:
        rows[0] = (rows[0] + 1) % C
    arr[8:16] = rows  # the newer version, tagged as a writer would
    m = g[S.MANIFEST]
    row = m[1].copy()
    j = S.BOUND_PER_IMAGE.index(name)
    row[j] = S.manifest_tags(name, 1, rows, IPS, h.tag_prefix, S.PER_IMAGE_FILL[name])[0]
    m[1] = row
    if name == S.LABEL:  # has_labels unchanged: still some labels; the store reads fine as changed
        assert fkdstore.open(a).labels[8] == rows[0]
    _chunk(a, name, 1).write_bytes(old)  # the rollback
    _every_read_fails(a, name)


def test_written_values_other_than_0_and_1_are_damage(pair):
    a, _ = pair
    zarr.open_group(str(a), mode="r+")[S.WRITTEN][3] = 2
    with pytest.raises(CorruptStoreError, match="written' holds values other than 0 and 1 at images \\[3\\]"):
        fkdstore.open(a).read(0)
    assert any("values other than 0/1 at images [3]" in x for x in verify(a))


def test_a_missing_written_chunk_is_listed_by_verify(pair):
    a, _ = pair
    _chunk(a, S.WRITTEN, 1).unlink()  # the flags read as 0: the images look unwritten
    with pytest.raises(fkdstore.IncompleteStoreError):
        fkdstore.open(a).read(9)
    assert any("array 'written' chunk 1 (images 8-15, written/c/1) is missing" in x for x in verify(a))


# ------------------------------------------------------------------------------------ replay parameters

EDITS = {
    "input_size": [64, 64],
    "interpolation": "nearest",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
OUT_OF_RANGE = {  # value, what the refusal says
    "input_size": ([4096, 4096], "input_size height must be an integer in"),  # over the cap: 192 MiB per crop
    "interpolation": ("sinc", "interpolation must be one of"),
    "mean": ([0.5, float("nan"), 0.5], "must be standard JSON"),  # NaN: not even a valid header
    "std": ([0.2, 0.0, 0.2], "std must be 3 numbers > 0"),
}


@pytest.mark.parametrize("key", sorted(EDITS))
def test_edited_replay_parameter_is_a_checksum_error(pair, tmp_path, key):
    """Replay parameters are in the checksummed header (not in meta): an edit fails at open, so nothing —
    no read, no TorchDataset, no verify — replays other pixels."""
    a, _ = pair
    set_header(a, **{f"replay.{key}": EDITS[key]})
    for call in (lambda: fkdstore.open(a), lambda: fkdstore.open(a).read(0)):
        with pytest.raises(CorruptStoreError, match="header checksum mismatch"):
            call()
    problems = verify(a)
    assert len(problems) == 1 and "header checksum mismatch" in problems[0]
    pytest.importorskip("torch")
    from fkdstore.pytorch import TorchDataset

    with pytest.raises(CorruptStoreError, match="header checksum mismatch"):
        TorchDataset(a, tmp_path, crops_per_sample=1)


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_crafted_replay_parameter_is_refused_at_open(pair, key):
    """The same edit with the checksum recomputed (a tool that knows the rule): the values are validated at
    open — finite, std > 0, a known filter, sides within the cap — and refused before anything is allocated."""
    a, _ = pair
    zj = Path(a) / "zarr.json"
    doc = json.loads(zj.read_text())
    h = doc["attributes"][S.ATTR_KEY]
    value, message = OUT_OF_RANGE[key]
    h["replay"][key] = value
    body = {k: v for k, v in h.items() if k not in S.CHECKSUM_EXCLUDES}
    crc = __import__("crc32c").crc32c(  # allow_nan: the crafted NaN must get in
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h["checksum"] = f"crc32c:{crc:08x}"
    zj.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=message):
        fkdstore.open(a)
    assert "cannot open store" in verify(a)[0]


def test_meta_is_provenance_only(pair):
    """Editing meta (not checksummed) changes nothing a reader replays: the replay parameters come from the
    header alone."""
    a, _ = pair
    set_header(a, meta={"input_size": 4096, "mean": [float("nan")] * 3, "interpolation": "nearest"})
    r = fkdstore.open(a)
    assert r.header.replay == REPLAY and r.read(0).box.shape == (M, 4)
    assert header(a)["meta"]["input_size"] == 4096
