"""The README's API tour runs as written (on small data made here)."""

import re
from pathlib import Path

import numpy as np

from fkdstore.testing import make_digits_folder, tiny_cnn
from fkdstore.seeded import SlotCropSampler

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_tour_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    make_digits_folder(tmp_path / "train", size=32, per_class=2)
    N, M, C = 30, 8, 10
    rng = np.random.default_rng(0)
    sizes = rng.integers(40, 90, (N, 2))
    boxes = np.stack([SlotCropSampler(seed=0).sample(i, *sizes[i], M)[0] for i in range(N)])
    env = dict(
        N=N, M=M, C=C, keys=[f"img{i}.jpg" for i in range(N)], sizes=sizes, targets=rng.integers(0, C, N),
        image_indices=np.arange(N), boxes=boxes, flips=rng.random((N, M)) < 0.5,
        probs=rng.dirichlet(np.ones(C), (N, M)), slot_table=rng.integers(0, M, (N, 2)),
        teacher=tiny_cnn(10, width=4), model=tiny_cnn(10, width=4), epochs=1,
    )
    exec(compile(block, str(README), "exec"), env)
    assert env["soft"].shape == (M, C)
    assert env["batch"]["crops"].shape[0] == env["batch"]["soft_labels"].shape[0]
    assert np.isfinite(env["loss"].item())
    assert env["store"].complete and env["records"].boxes.shape == (N, 2, 4)
    assert env["store"].header.seeded and "box" not in env["store"].record_arrays  # generate: seeded crops
