"""``inspect`` names the data types some Zarr v3 readers lack (issue 15): float16 (JavaScript without
Float16Array) and 1.0's ``string`` keys (a zarr-python extension TensorStore cannot open)."""
from pathlib import Path

import numpy as np
import zarr

import fkdstore
from fkdstore import report
from fkdstore.transforms import CropSampler

GOLDEN = Path(__file__).parent / "golden" / "v1.0"


def write_store(path, codec, aug=()):
    N, M, C = 10, 3, 20
    rng = np.random.default_rng(0)
    sizes = rng.integers(30, 90, (N, 2))
    sampler = CropSampler(seed=0)
    boxes, flips = map(np.stack, zip(*(sampler.sample(i, *map(int, sizes[i]), M) for i in range(N))))
    p = rng.dirichlet(np.ones(C), (N, M)).astype(np.float32)
    values = {a[0]: np.zeros((N, M), a[2]) for a in aug}
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec,
                        image_keys=[f"k{i}" for i in range(N)], image_sizes=sizes, aug=list(aug)) as w:
        w.put(np.arange(N), boxes, flips, p, aug=values or None)


def arrays_of(path):
    """inspect's ``arrays`` dict for every array of a store, built with the same helper inspect uses."""
    g = zarr.open_group(str(path), mode="r")
    return {name: report._array_info(a, {}) for name, a in g.arrays()} | {
        f"{sub}/{name}": report._array_info(a, {}) for sub, grp in g.groups() for name, a in grp.arrays()}


def test_float16_fields_and_columns_are_named(tmp_path):
    write_store(tmp_path / "s", {"name": "ms", "k": 3, "dtype": "float16"},
                aug=[("mix_lam", "float", "float16"), ("ops", "index", "uint8")])
    (entry,) = report.reader_compatibility(arrays_of(tmp_path / "s"))
    assert entry["dtype"] == "float16"
    assert sorted(entry["arrays"]) == ["aug/mix_lam", "soft/probs"]
    assert "Float16Array" in entry["note"]


def test_float32_and_q8_stores_need_nothing_special(tmp_path):
    write_store(tmp_path / "a", {"name": "ms", "k": 3, "dtype": "float32"})
    write_store(tmp_path / "b", {"name": "full", "dtype": "q8"}, aug=[("ops", "index", "uint8")])
    assert report.reader_compatibility(arrays_of(tmp_path / "a")) == []
    assert report.reader_compatibility(arrays_of(tmp_path / "b")) == []


def test_inspect_reports_and_prints_compatibility_of_a_1_0_store():
    d = report.inspect(GOLDEN / "full.zarr", sample=16)  # 1.0: string keys, float16 probabilities
    by_dtype = {c["dtype"]: c for c in d["compatibility"]}
    assert set(by_dtype) == {"string", "float16"}
    assert by_dtype["string"]["arrays"] == ["image_key"] and "TensorStore" in by_dtype["string"]["note"]
    assert by_dtype["float16"]["arrays"] == ["soft/probs"]
    text = report.format_inspect(d)
    assert "readers    float16 in soft/probs: JavaScript readers need Float16Array" in text
    assert "readers    string in image_key: a zarr-python extension" in text

    d = report.inspect(GOLDEN / "hard.zarr", sample=16)  # uint16 indices: only the keys are a problem
    assert [c["dtype"] for c in d["compatibility"]] == ["string"]


def test_format_inspect_says_so_when_nothing_is_missing():
    d = report.inspect(GOLDEN / "hard.zarr", sample=16)
    d["compatibility"] = report.reader_compatibility({k: v for k, v in d["arrays"].items() if k != "image_key"})
    assert d["compatibility"] == []
    assert "readers    core Zarr v3 data types only" in report.format_inspect(d)
