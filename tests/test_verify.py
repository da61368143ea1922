"""fkdstore verify: checksums on every chunk, completeness, boxes, labels, attributes."""

from __future__ import annotations

import json

import numpy as np
import zarr
from faultutil import retag, set_header
from test_cli import make_store

import fkdstore
from fkdstore import schema as S
from fkdstore.cli import main
from fkdstore.verification import verify


def _shard_file(p, name, shard=0):
    arr = zarr.open_group(str(p), mode="r")[name]
    return p / name / "/".join(["c", str(shard)] + ["0"] * (len(arr.shape) - 1))


def test_clean_store(tmp_path, capsys):
    p = tmp_path / "s.fkd"
    make_store(p, n=20, ipc=4, ips=8, aug=["brightness"])
    assert verify(p) == []
    assert main(["verify", str(p)]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_in_shard_data_names_array_and_chunk(tmp_path, capsys):
    p = tmp_path / "s.fkd"
    make_store(p, n=20, ipc=4, ips=8)
    f = _shard_file(p, S.soft_path("probs"), shard=1)  # images 8..15, inner chunks 2 and 3
    raw = bytearray(f.read_bytes())
    n_idx = 2 * 16 + 4
    index = np.frombuffer(bytes(raw[-n_idx:-4]), "<u8").reshape(-1, 2)
    off, nb = (int(x) for x in index[1])  # second inner chunk of the shard = global chunk 3
    raw[off + nb // 2] ^= 0x40  # inside the data area, not the index
    f.write_bytes(bytes(raw))
    problems = verify(p)
    assert len(problems) == 1, problems
    assert "array 'soft/probs' chunk 3" in problems[0] and "crc32c" in problems[0]
    assert "soft/probs/c/1/0/0" in problems[0]
    # the reader refuses the same chunk instead of decoding garbage
    r = fkdstore.open(p)
    try:
        r.read_batch([12])
    except fkdstore.CorruptChunkError as e:
        assert "soft/probs" in str(e)
    else:
        raise AssertionError("reader decoded a corrupted chunk")
    assert main(["verify", str(p), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is False and d["problems"] == problems


def test_corrupt_shard_index_and_per_image_chunk(tmp_path):
    p = tmp_path / "s.fkd"
    make_store(p, n=8, ipc=4, ips=8)
    f = _shard_file(p, S.BOX)
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 1  # shard index
    f.write_bytes(bytes(raw))
    g = p / S.IMAGE_SIZE / "c" / "0" / "0"
    raw = bytearray(g.read_bytes())
    raw[len(raw) // 2] ^= 1
    g.write_bytes(bytes(raw))
    problems = verify(p)
    assert any("array 'box' shard file box/c/0/0/0 (images 0-7): the shard index fails its crc32c" in x
               for x in problems), problems
    assert any("array 'image_size' chunk 0 (images 0-7)" in x for x in problems), problems


def test_incomplete_store_lists_missing_ranges(tmp_path):
    p = tmp_path / "s.fkd"
    make_store(p, n=16, write=[0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15], ipc=4, ips=4)
    problems = verify(p)
    assert problems == ["store incomplete: 4 of 16 images not written, ranges [8, 12)"]
    assert main(["verify", str(p)]) == 1


def test_missing_shard_file_of_written_images(tmp_path):
    p = tmp_path / "s.fkd"
    make_store(p, n=16, ipc=4, ips=8)
    _shard_file(p, S.FLIP, shard=1).unlink()
    problems = verify(p)
    assert len(problems) == 1, problems
    assert problems[0].startswith("array 'flip' chunk 2 (images 8-11, shard file flip/c/1/0): the shard file is "
                                  "missing but the chunk holds images marked written"), problems
    assert "(and 1 more chunks of this shard)" in problems[0]


def test_box_outside_recorded_size_and_bad_labels(tmp_path):
    p = tmp_path / "s.fkd"
    data = make_store(p, n=8, ipc=4, ips=8, codec="ms")
    g = zarr.open_group(str(p), mode="r+")  # edits through Zarr, then re-tagged: only the value rules can tell
    sizes = data["sizes"].copy()
    b = data["boxes"][3, 2]
    sizes[3] = [b[0] + b[2] - 1, sizes[3, 1]]  # image 3 now too short for its slot-2 box
    g[S.IMAGE_SIZE][:] = sizes.astype(np.int32)
    probs = g[S.soft_path("probs")][:]
    probs[5, 1] = probs[5, 1][::-1]  # ascending top-K
    probs[6, 0, 0] = np.float16(np.nan)
    g[S.soft_path("probs")][:] = probs
    retag(p)
    problems = verify(p)
    assert any("array 'box'" in x and "image 3 slot 2" in x for x in problems), problems
    assert any("top-K probabilities in descending order: broken in 1 crops, first at image 5 slot 1" in x
               for x in problems), problems
    assert any("image 6 slot 0" in x and "probabilities finite in [0, 1 + 0.001]" in x for x in problems), problems


def test_attributes_inconsistent(tmp_path):
    p = tmp_path / "s.fkd"
    make_store(p, n=8, ipc=4, ips=8, labels=False)
    # edits with a valid checksum (a tool that knows the rule): only the arrays can contradict them
    set_header(p, has_labels=True, checksum=True)
    problems = verify(p)
    assert problems == ["attribute has_labels=True but the label array holds no known labels"], problems
    set_header(p, **{"layout.images_per_chunk": 2}, checksum=True)
    problems = verify(p)
    assert any("array 'box': inner chunk shape is (4, 5, 4) in box/zarr.json but the store header implies "
               "(2, 5, 4)" in x for x in problems), problems


def test_not_a_store(tmp_path):
    assert verify(tmp_path) == [f"cannot open store: {tmp_path}: not a Zarr v3 group (no zarr.json)"]


def test_negative_top_in_int32_boxes_is_found(tmp_path):
    """Invariant 5 through schema.bad_boxes: top >= 0 and left >= 0 too (an int32-box store can hold -5)."""
    p = tmp_path / "s.fkd"
    n, m = 4, 2
    sizes = np.array([[70000, 40], [50, 50], [50, 50], [50, 50]])
    boxes = np.tile([0, 0, 10, 10], (n, m, 1))
    probs = np.random.default_rng(0).dirichlet(np.ones(6), (n, m)).astype(np.float32)
    with fkdstore.write(p, num_images=n, crops_per_image=m, num_classes=6, codec="ms:k=2",
                        image_keys=[f"k{i}" for i in range(n)], image_sizes=sizes) as w:
        w.put(np.arange(n), boxes, np.zeros((n, m), bool), probs)
    g = zarr.open_group(str(p), mode="r+")
    assert g[S.BOX].dtype == np.int32
    g[S.BOX][2, 1, 0] = -5
    retag(p)  # edit through Zarr and re-tagged (the manifest would flag it first)
    problems = verify(p)
    assert len(problems) == 1 and "array 'box': 1 boxes outside the image" in problems[0], problems
    assert "image 2 slot 1: box [-5, 0, 10, 10]" in problems[0]
