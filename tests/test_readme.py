"""The README's API tour runs as written (on small data made here)."""

import re
from pathlib import Path

import numpy as np

from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import make_digits_folder, tiny_cnn

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


def test_readme_timm_section_runs(tmp_path, monkeypatch):
    """The "timm, or any training loop" block, with timm's SoftTargetCrossEntropy (its definition, timm/loss/
    cross_entropy.py) standing in for the package, which the tests do not install."""
    import sys
    import types

    import torch
    import torch.nn.functional as F
    from PIL import Image

    import fkdstore
    from fkdstore.images import list_images

    class SoftTargetCrossEntropy(torch.nn.Module):
        def forward(self, x, target):
            return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()

    timm, loss = types.ModuleType("timm"), types.ModuleType("timm.loss")
    loss.SoftTargetCrossEntropy, timm.loss = SoftTargetCrossEntropy, loss
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.loss", loss)
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "timm.loss" in b)
    monkeypatch.chdir(tmp_path)
    lst = list_images(make_digits_folder(tmp_path / "train", size=32, per_class=2))
    M, C = 4, 10
    sizes = np.array([tuple(reversed(Image.open(p).size)) for p in lst.paths])
    rng = np.random.default_rng(0)
    with fkdstore.write("teacher-labels.zarr", num_images=len(lst), crops_per_image=M, num_classes=C, codec="ms",
                        image_keys=lst.keys, image_sizes=sizes, labels=lst.labels,
                        replay=fkdstore.Replay(input_size=16)) as w:
        for i in range(len(lst)):
            boxes, flips = SlotCropSampler(seed=0).sample(i, *sizes[i], M)
            w.put([i], boxes[None], flips[None], rng.dirichlet(np.ones(C), (1, M)))
    model = tiny_cnn(C, width=4)
    before = [p.detach().clone() for p in model.parameters()]
    env = dict(model=model, epochs=2)
    exec(compile(block, str(README), "exec"), env)
    assert env["x"].shape == (8, 3, 16, 16) and env["x"].dtype == torch.float32 and env["y"].shape == (8, C)
    torch.testing.assert_close(env["y"].sum(-1), torch.ones(8))
    assert np.isfinite(env["loss"].item())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained


def test_public_api_section_lists_exactly_fkdstore_all():
    """The README's "Public API" list and ``fkdstore.__all__`` name the same objects, and each resolves."""
    import fkdstore

    section = README.read_text().split("### Public API", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section.split("\n\n", 2)[2]))
    assert listed == set(fkdstore.__all__)
    for name in fkdstore.__all__:
        assert getattr(fkdstore, name) is not None
