"""``inspect`` names the data types some Zarr v3 readers lack (issue 15): float16 (JavaScript without
Float16Array) and 1.0's ``string`` keys (a zarr-python extension TensorStore cannot open; `convert` migrates them)."""
from pathlib import Path

import numpy as np
import pytest
import zarr

import fkdstore
from fkdstore import report
from fkdstore.errors import FormatError
from fkdstore.seeded import SlotCropSampler

GOLDEN = Path(__file__).parent / "golden" / "v1.0"


def write_store(path, codec, aug=()):
    N, M, C = 10, 3, 20
    rng = np.random.default_rng(0)
    sizes = rng.integers(30, 90, (N, 2))
    sampler = SlotCropSampler(seed=0)
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


def test_inspect_reports_and_prints_compatibility_of_a_1_0_store(tmp_path):
    """1.0's string keys and float16 probabilities are named from the arrays themselves; ``inspect`` itself
    reads 1.0 stores no more (only ``convert`` does), and the migrated 4.0 store keeps only the float16 gap
    (its keys are uint8)."""
    by_dtype = {c["dtype"]: c for c in report.reader_compatibility(arrays_of(GOLDEN / "full.zarr"))}
    assert set(by_dtype) == {"string", "float16"}
    assert by_dtype["string"]["arrays"] == ["image_key"] and "TensorStore" in by_dtype["string"]["note"]
    assert by_dtype["float16"]["arrays"] == ["soft/probs"]
    assert [c["dtype"] for c in report.reader_compatibility(arrays_of(GOLDEN / "hard.zarr"))] == ["string"]
    with pytest.raises(FormatError, match="convert"):
        report.inspect(GOLDEN / "full.zarr", sample=16)

    fkdstore.convert(GOLDEN / "full.zarr", tmp_path / "full", "full", progress=False)  # float16 kept
    d = report.inspect(tmp_path / "full", sample=16)
    assert [(c["dtype"], c["arrays"]) for c in d["compatibility"]] == [("float16", ["soft/probs"])]
    text = report.format_inspect(d)
    assert "readers    float16 in soft/probs: JavaScript readers need Float16Array" in text
    assert "string in" not in text


def test_format_inspect_says_so_when_nothing_is_missing(tmp_path):
    fkdstore.convert(GOLDEN / "hard.zarr", tmp_path / "hard", "hard", progress=False)  # uint16 indices, uint8 keys
    d = report.inspect(tmp_path / "hard", sample=16)
    assert d["compatibility"] == []
    assert "readers    core Zarr v3 data types only" in report.format_inspect(d)
