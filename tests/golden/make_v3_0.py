"""Write the golden format 3.0 (seeded crops) and 2.0 stores. Run ONCE; never regenerate silently.

``seeded.zarr`` (format 3.0: no box/flip arrays, crops derived from the header's ``crop_sampler``) and its
stored-crop twin ``stored.zarr`` (format 2.0), with ``expected.npz`` holding the crops and labels the writer
was given, were written by fkdstore 0.2 (the commit that added seeded crops). ``tests/test_golden.py`` reads
them with today's reader: a change of the crop sampler, of the reader or of numpy's generator streams that
would replay other crops fails there (for the seeded store, as a ``CorruptStoreError`` from the manifest tags).
The seeded store's crops come from ``fkdstore.seeded.SlotCropSampler`` (spec section 10.3).
Usage: python tests/golden/make_v3_0.py tests/golden/v3.0
"""
import json
import sys
from pathlib import Path

import numpy as np

import fkdstore
from fkdstore.seeded import SlotCropSampler

N, M, C = 11, 5, 7  # ipc=2, ips=4: three shards, the last one partial
CODEC = {"name": "ms", "k": 3, "dtype": "q8"}
SAMPLER = SlotCropSampler(seed=20261127, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(20261127)
    sizes = rng.integers(20, 90, size=(N, 2)).astype(np.int32)
    sizes[3] = (1, 90)  # every attempt fails: the centre-crop fallback
    keys = [f"class{i % 3}/img_{i:03d}.png" for i in range(N)]
    labels = (np.arange(N) % C).astype(np.int32)
    crops = [SAMPLER.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N)]
    boxes, flips = np.stack([b for b, _ in crops]), np.stack([f for _, f in crops])
    logits = rng.normal(size=(N, M, C)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    expected = {"sizes": sizes, "labels": labels, "boxes": boxes, "flips": flips}
    for name, sampler in (("seeded", SAMPLER), ("stored", None)):
        path = out / f"{name}.zarr"
        with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=CODEC, image_keys=keys,
                            image_sizes=sizes, labels=labels, meta={"golden": name}, crop_sampler=sampler,
                            images_per_chunk=2, images_per_shard=4) as w:
            order = rng.permutation(N)  # out of order, in two puts
            for part in (order[:5], order[5:]):
                w.put(part, boxes[part], flips[part], probs[part])
        with fkdstore.open(path) as r:
            rec = r.read_batch(np.arange(N))
            for f, v in rec.fields.items():
                expected[f"{name}/{f}"] = v
            expected[f"{name}/decoded"] = r.decode(rec.fields)
    np.savez(out / "expected.npz", **expected)
    (out / "keys.json").write_text(json.dumps(keys))
    (out / "crop_sampler.json").write_text(json.dumps(SAMPLER.get_config()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
