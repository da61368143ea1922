"""Stores for the interoperability tests (test_interop.py: TensorStore; test_interop_js.py: zarrita):
N = 37 images, M = 6 slots, C = 1000 classes, 4 images per inner chunk and 16 per shard, so the last shard
is partial (5 images: one full chunk and one of 1 image); typed augmentation columns of three dtypes; keys
of varied UTF-8 length, one filling all L bytes. Crops are stored (``box`` and ``flip`` arrays, which a third
party reads as they are; seeded crops would need the slot sampler, re-implemented in test_spec.py)."""
from pathlib import Path

import numpy as np

import fkdstore
from fkdstore.codecs import get_codec
from fkdstore.seeded import SlotCropSampler

N, M, C = 37, 6, 1000
IPC, IPS = 4, 16  # 3 shards, the last one partial (5 images: one full chunk and one of 1 image)
AUG = [("ra_ops", "index", "uint8", (2,)), ("mix_lam", "float", "float16"), ("mix_partner", "index", "int32")]

# One store per entry: every registered codec, every probability dtype (float16, float32, q8).
CODECS = [
    {"name": "full", "dtype": "float16"},
    {"name": "full", "dtype": "q8"},
    {"name": "hard"},
    {"name": "smoothing", "dtype": "float32"},
    {"name": "ms", "k": 5, "dtype": "float16"},
    {"name": "ms", "k": 5, "dtype": "q8"},
    {"name": "mr", "k": 5, "dtype": "float16"},
    {"name": "logits", "dtype": "float16"},
    {"name": "logits", "k": 5, "dtype": "q8"},
    {"name": "logits", "k": 5, "dtype": "float32"},
    {"name": "sampled", "s": 8, "k": 2, "logp": True, "dtype": "float32"},
]


def make_store(path: Path, codec_cfg: dict, wide: bool, seeded: bool = False) -> dict:
    """Write a complete store (shards put out of order) and return its inputs; ``seeded``: the crops are the
    sampler's, derived on read (no box/flip arrays)."""
    rng = np.random.default_rng(15)
    sizes = np.stack([rng.integers(40, 400, N), rng.integers(40, 70000 if wide else 400, N)], 1)
    sizes[0, 1] = 70000 if wide else 399  # a side > 65535 makes the boxes int32, else uint16
    sampler = SlotCropSampler(seed=15)
    boxes, flips = map(np.stack, zip(*(sampler.sample(i, *map(int, sizes[i]), M) for i in range(N))))
    # Non-ASCII keys of varied byte length; one key fills all L bytes (no NUL after it).
    keys = [f"n{i % 7:08d}/ILSVRC_{i:05d}.JPEG" for i in range(N)]
    keys[3], keys[20], keys[36] = "fotos/Æbleskiver café.png", "画像/猫_0001.jpg", "x" * 40
    labels = rng.integers(-1, C, N)
    z = rng.normal(0.0, 3.0, (N, M, C))
    codec = get_codec(codec_cfg)
    if codec.input == "logits":
        x = z.astype(np.float32)
    else:
        p = np.exp(z - z.max(-1, keepdims=True))
        x = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    aug = {"ra_ops": rng.integers(0, 14, (N, M, 2)).astype(np.uint8),
           "mix_lam": rng.beta(1.0, 1.0, (N, M)).astype(np.float16),
           "mix_partner": rng.integers(0, N, (N, M)).astype(np.int32)}
    with fkdstore.write(path, num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=keys,
                        image_sizes=sizes, labels=labels, aug=AUG, images_per_chunk=IPC,
                        images_per_shard=IPS, crop_sampler=sampler if seeded else None) as w:
        for a in (16, 0, 32):  # out of order; the partial shard last
            sl = slice(a, min(N, a + IPS))
            w.put(np.arange(sl.start, sl.stop), boxes[sl], flips[sl], x[sl], aug={k: v[sl] for k, v in aug.items()})
    return {"keys": keys, "sizes": sizes, "labels": labels, "boxes": boxes, "flips": flips, "aug": aug}
