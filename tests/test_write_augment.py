"""``fkdstore.write(augment=...)`` validates the pipeline as a reader will, before anything is created: an
unknown policy, a bad or unknown parameter, or aug columns that are not the pipeline's give an error naming
them and no folder, never a store that ``open`` then refuses."""

from __future__ import annotations

import numpy as np
import pytest

import fkdstore
from fkdstore.errors import ValidationError

N, M, C = 4, 2, 5


def _write(path, **kw):
    return fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec="ms:k=2",
                          image_keys=[f"k{i}" for i in range(N)], image_sizes=np.full((N, 2), 32), **kw)


@pytest.mark.parametrize("augment, exc, message", [
    ([{"name": "autoaugment_v9"}], ValidationError, "autoaugment_v9"),
    ([{"name": "mixup", "alpha": 0.2, "p": 1.5}], ValidationError, "p must be in [0, 1]. Got 1.5."),
    ([{"name": "mixup", "alpha": 0.2, "lam": 0.5}], ValidationError, "mixup config keys must be in"),
    ([{"name": "randaugment", "magnitude": 31}], ValidationError, "magnitude must be an integer in [0, 30]"),
    ({"name": "mixup"}, TypeError, "augment must be a list of policy configs"),
    ([{"name": "mixup"}, {"name": "color_jitter"}], ValidationError, "mixing"),
])
def test_bad_augment_is_refused_before_anything_is_created(tmp_path, augment, exc, message):
    out = tmp_path / "never.fkd"
    with pytest.raises(exc) as info:
        _write(out, augment=augment)
    assert message in str(info.value), str(info.value)
    assert not out.exists()


def test_aug_columns_other_than_the_pipelines_are_refused(tmp_path):
    out = tmp_path / "never.fkd"
    with pytest.raises(ValidationError, match="must be the augment pipeline's columns"):
        _write(out, augment=[{"name": "mixup"}], aug=["lam"])
    assert not out.exists()


def test_a_valid_augment_gives_a_store_that_opens(tmp_path):
    with _write(tmp_path / "s.fkd", augment=[{"name": "mixup", "alpha": 0.2}]):
        pass
    with fkdstore.open(tmp_path / "s.fkd") as r:
        assert [p.name for p in r.header.augment.policies] == ["mixup"]
