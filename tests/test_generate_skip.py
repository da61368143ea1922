"""``generate(on_error="skip")``, then the unreadable file is replaced by a readable copy, then the same
``generate`` again: the image skipped at the header scan (recorded as 1 x 1) gets its true size and is labelled,
and the store is complete (runner.retry_skipped_sizes, Writer.set_image_sizes)."""

from __future__ import annotations

import numpy as np
import pytest

import fkdstore
from fkdstore.testing import make_digits_folder, tiny_cnn
from fkdstore.verification import verify

torch = pytest.importorskip("torch")

FAST = dict(crops_per_image=2, codec="ms:k=3", input_size=32, images_per_shard=4, batch_size=8, num_workers=0,
            device="cpu", progress=False)


@pytest.mark.parametrize("store_crops", [False, True])
def test_skip_fix_rerun_completes_the_store_with_the_true_size(tmp_path, store_crops):
    from PIL import Image

    digits = make_digits_folder(tmp_path / "digits", size=32, per_class=1)  # 10 PNGs, shards of 4
    broken = sorted(digits.rglob("*.png"))[5]
    good = broken.read_bytes()
    broken.write_bytes(b"not a png at all")  # its header cannot be read
    out = tmp_path / "labels.fkd"
    with pytest.warns(UserWarning, match="skipping image"):
        r = fkdstore.generate(tiny_cnn(10), digits, out, on_error="skip", store_crops=store_crops, **FAST)
    key = broken.relative_to(digits).as_posix()
    i = r.image_keys.index(key)
    assert not r.complete and np.flatnonzero(~r.written).tolist() == [i]
    assert r.image_sizes[i].tolist() == [1, 1] and r.meta["skipped"] == [key]
    Image.open(__import__("io").BytesIO(good)).convert("RGB").resize((40, 48)).save(broken)  # 48 x 40 now
    r = fkdstore.generate(tiny_cnn(10), digits, out, on_error="skip", store_crops=store_crops, **FAST)
    assert r.complete and r.meta.get("skipped", []) == []
    assert r.image_sizes[i].tolist() == [48, 40]
    box = r.read(i).box
    assert (box[:, 0] + box[:, 2] <= 48).all() and (box[:, 1] + box[:, 3] <= 40).all()
    assert verify(out) == []
    ref = fkdstore.generate(tiny_cnn(10), digits, tmp_path / "ref.fkd", store_crops=store_crops, **FAST)
    np.testing.assert_array_equal(ref.read_all().fields["probs"], r.read_all().fields["probs"])
