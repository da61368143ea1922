"""The small training kit in fkdstore.testing that the demo and benchmarks/reproduce.py share."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from fkdstore.testing import (  # noqa: E402
    RandomCropDataset,
    accuracy,
    cosine_lr,
    load_eval_folder,
    make_digits_folder,
    tiny_cnn,
    train_classifier,
)


def test_cosine_lr_is_constant_within_a_pass_and_anneals():
    assert cosine_lr(0.1, 0, 4) == pytest.approx(0.1)
    assert cosine_lr(0.1, 2, 4) == pytest.approx(0.05)
    assert cosine_lr(0.1, 3, 4) == pytest.approx(0.05 * (1 + math.cos(0.75 * math.pi)))


def test_random_crop_dataset_is_seeded_and_changes_per_epoch(tmp_path):
    folder = make_digits_folder(tmp_path / "d", size=16, per_class=1)
    a = RandomCropDataset(folder, 12, (0.1, 1.0), seed=3, epochs=2)
    b = RandomCropDataset(folder, 12, (0.1, 1.0), seed=3, epochs=2)
    x, y = a[4]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and y == int(a.labels[4])
    torch.testing.assert_close(x, b[4][0])
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.boxes[:, 0], a.boxes[:, 1])  # a fresh crop every epoch


def test_train_classifier_learns_the_digits(tmp_path):
    torch.set_num_threads(1)
    folder = make_digits_folder(tmp_path / "d", size=12, per_class=20)
    x, y = load_eval_folder(folder, 12)
    ds = RandomCropDataset(folder, 12, (0.5, 1.0), seed=0, epochs=15)

    def batches(p):
        ds.epoch = p
        yield from torch.utils.data.DataLoader(ds, batch_size=25, shuffle=True,
                                               generator=torch.Generator().manual_seed(p))

    model = tiny_cnn(10, width=8, seed=0)
    before = accuracy(model, x, y)
    wall, cpu = train_classifier(model, batches, 15, 0.1, lambda xn, t: t)
    assert wall > 0 and cpu > 0
    assert accuracy(model, x, y) > max(0.5, before + 0.2)
