"""Write the golden format 4.0 stores. Run ONCE; never regenerate silently.

Three stores written by fkdstore 0.3 (the commit that introduced format 4.0), with ``expected.npz`` holding
what the writer was given and what it read back:

- ``seeded.zarr``: crop regions with seeded crops (the default), MS top-3 q8, replay parameters;
- ``stored.zarr``: its stored-crop twin with a RandAugment + Mixup pipeline (aug columns), float16;
- ``maps.zarr``: a label-map store (ReLabel's settings, S = 5, K = 2).

``tests/test_golden.py`` reads them with today's reader and checks every chunk's tag (verify): a change of
the header model, the tags, the crop sampler or the codecs that would read other values fails there.
Usage: python tests/golden/make_v4_0.py tests/golden/v4.0
"""
import json
import sys
from pathlib import Path

import numpy as np

import fkdstore
from fkdstore.augment import parse_augment
from fkdstore.labelmap import LabelMapSpec
from fkdstore.seeded import SlotCropSampler
from fkdstore.transforms import Replay

N, M, C = 11, 5, 7  # ipc=2, ips=4: three shards, the last one partial
SAMPLER = SlotCropSampler(seed=20261207, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)
REPLAY = Replay(input_size=(24, 32), interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25))
AUGMENT = "randaugment:num_ops=2,magnitude=9;mixup:alpha=0.4,p=0.5"
MAP = LabelMapSpec.relabel(size=5, k=2)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(20261207)
    sizes = rng.integers(20, 90, size=(N, 2)).astype(np.int32)
    sizes[3] = (1, 90)  # every attempt fails: the centre-crop fallback
    keys = [f"class{i % 3}/img_{i:03d}.png" for i in range(N)]
    labels = (np.arange(N) % C).astype(np.int32)
    crops = [SAMPLER.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N)]
    boxes, flips = np.stack([b for b, _ in crops]), np.stack([f for _, f in crops])
    logits = rng.normal(size=(N, M, C)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    pipeline = parse_augment(AUGMENT)
    aug = {}
    for i in range(N):
        p = pipeline.sample(7, i, np.arange(M), image_size=REPLAY.input_size, num_images=N, crops_per_image=M)
        for k, v in p.items():
            aug.setdefault(k, []).append(v)
    aug = {k: np.stack(v) for k, v in aug.items()}
    expected = {"sizes": sizes, "labels": labels, "boxes": boxes, "flips": flips}
    expected.update({f"aug/{k}": v for k, v in aug.items()})
    common = dict(num_images=N, num_classes=C, image_keys=keys, image_sizes=sizes, labels=labels,
                  images_per_chunk=2, images_per_shard=4, replay=REPLAY)
    for name, codec, sampler, augment in (("seeded", "ms:k=3,dtype=q8", SAMPLER, None),
                                          ("stored", "ms:k=3", None, pipeline)):
        path = out / f"{name}.zarr"
        with fkdstore.write(path, crops_per_image=M, codec=codec, crop_sampler=sampler, augment=augment,
                            meta={"golden": name}, **common) as w:
            order = rng.permutation(N)  # out of order, in two puts
            for part in (order[:5], order[5:]):
                w.put(part, boxes[part], flips[part], probs[part],
                      aug={k: v[part] for k, v in aug.items()} if augment is not None else None)
        with fkdstore.open(path) as r:
            rec = r.read_batch(np.arange(N))
            for f, v in rec.fields.items():
                expected[f"{name}/{f}"] = v
            expected[f"{name}/decoded"] = r.decode(rec.fields)
            expected[f"{name}/store_id"] = np.frombuffer(bytes.fromhex(r.header.store_id), np.uint8)
    idx = np.stack([np.argsort(-rng.normal(size=(C, MAP.size, MAP.size)), axis=0, kind="stable")[:MAP.k]
                    for _ in range(N)])
    scores = rng.normal(size=(N, MAP.k, MAP.size, MAP.size)).astype(np.float32) * 3
    with fkdstore.write(out / "maps.zarr", label_map=MAP, meta={"golden": "maps"}, **common) as w:
        w.put_maps(np.arange(N), idx, scores)
    box = np.array([[0, 0, 10, 12], [5, 3, 7, 9], [1, 1, 1, 1]])
    with fkdstore.open(out / "maps.zarr") as r:
        expected["maps/indices"], expected["maps/scores"] = idx, scores
        expected["maps/pool_boxes"] = box
        expected["maps/pooled"] = r.pool([0, 4, 10], box, [False, True, False])
    np.savez(out / "expected.npz", **expected)
    (out / "keys.json").write_text(json.dumps(keys))
    (out / "crop_sampler.json").write_text(json.dumps(SAMPLER.get_config()))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
