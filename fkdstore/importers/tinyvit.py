"""TinyViT's saved teacher logits (microsoft/Cream, ``TinyViT/save_logits.py``): per epoch and rank, keys and
fixed-size records, bound to images by key.

Layout (``data/augmentation/manager.py``, ``dataset_wrapper.py``): ``<src>/logits_top{K}_epoch{E}/`` holds,
per training rank ``R``, ``rank{R}-keys.txt`` (one key per line: ``str(dataset index)`` for an
``ImageFolder``, the image name for ImageNet-22k) and ``rank{R}-values.bin``: line ``i``'s record at byte
``i * (4 + 4K)``, little-endian ``int32`` seed, ``K`` ``int16`` class indices (descending probability) and
``K`` ``float16`` probabilities. The writer keeps the first record of a key per file.

The seed re-runs TinyViT's whole timm augmentation pipeline (``numpy.random.Generator(PCG64(seed))``:
RandomResizedCrop, flip, RandAugment with magnitude noise, colour jitter, RandomErasing); each sampler pair
``(x[2i], x[2i+1])`` is then mixed (Mixup or CutMix) with the seed ``seed_a ^ seed_b``. fkdstore cannot run
that pipeline: the store keeps the seeds in an ``external_seed`` policy (``external_seed``, the pair-mate's
image ``external_partner`` and its seed ``external_partner_seed``), and :class:`~fkdstore.TorchDataset`
replays the pixels only with the user's ``external_replay``; the labels load as usual. Boxes are the whole
image and flips False (placeholders: the crop is part of the external pipeline).

Binding: the sampler (TinyViT's ``MyDistributedSampler``, ``pair=True`` when mixing) gives rank ``R`` of
``W`` the pairs ``R, R + W, ...`` of the epoch's shuffled and padded order, so line ``l`` of rank ``R`` is
at global position ``((l // 2) * W + R) * 2 + l % 2`` (``l * W + R`` without pairs) and its pair-mate is
line ``l ^ 1``. Padding repeats the first images of the order at the end: a key found at several positions
of one epoch keeps the record at the smallest (the image's own draw); the others are counted as skipped.
When a rank file lost a padded duplicate to the writer's de-duplication, the rank's order is rebuilt with
``torch.randperm(N, generator seeded epoch)`` (seed 0, as TinyViT) and checked against the keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import augment as _augment
from .. import progress as _progress
from ..errors import LabelFileError, ValidationError
from ..images import ImageList, list_images
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from ..validation import positive_int
from . import _zoo

__all__ = ["import_tinyvit", "record_dtype", "KEY_MODES", "rank_positions"]

DIR_RE = re.compile(r"^logits_top(\d+)_epoch(\d+)$")
RANK_RE = re.compile(r"^rank(\d+)-values\.bin$")
KEY_MODES = ("auto", "index", "stem")
INT16_CLASSES = 32768  # TinyViT stores class indices as int16
EMPTY = np.iinfo(np.int64).max


def record_dtype(k: int) -> np.dtype:
    """One record: little-endian int32 seed, K int16 indices, K float16 probabilities (4 + 4K bytes)."""
    return np.dtype([("seed", "<i4"), ("idx", "<i2", (k,)), ("val", "<f2", (k,))])


def rank_positions(lines: int, rank: int, world: int, pairs: bool) -> np.ndarray:
    """Global positions in the epoch's padded order of lines ``0..lines-1`` of rank ``rank`` of ``world``."""
    l = np.arange(lines, dtype=np.int64)
    if pairs:
        return ((l // 2) * world + rank) * 2 + l % 2
    return l * world + rank


def _rank_sequence(N: int, epoch: int, rank: int, world: int, pairs: bool) -> np.ndarray:
    """Rank ``rank``'s dataset indices in TinyViT's ``MyDistributedSampler`` order (shuffle, seed 0 + epoch,
    padding, pairs)."""
    import torch  # noqa: PLC0415 - torch is optional (fkdstore[torch]); core imports without it

    g = torch.Generator()
    g.manual_seed(epoch)
    idx = torch.randperm(N, generator=g).numpy().astype(np.int64)
    T = 2 * world if pairs else world
    total = _zoo.ceil_div(N, T) * T
    idx = np.resize(idx, total)  # padding repeats the order from its start
    if pairs:
        return idx.reshape(-1, 2)[rank::world].reshape(-1)
    return idx[rank::world]


def import_tinyvit(src: str | os.PathLike, dst: str | os.PathLike, images: str | os.PathLike | Sequence[str], *,
                   codec=None, k: int | None = None, num_classes: int | None = None,
                   epochs: Sequence[int] | None = None, mixing: bool = True, keys: str = "auto",
                   order: str = "imagefolder", input_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, timm_config: dict[str, Any] | None = None,
                   scratch_dir: str | os.PathLike | None = None, batch: int = 1024, progress: bool | None = None,
                   log: Callable[[str], None] | None = None,
                   storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import TinyViT's saved logits (layout and binding in the module docstring) into a new store ``dst``,
    one crop slot per epoch (``epochs``: the epoch numbers to import, default every ``logits_top{K}_epoch{E}``
    folder; they need not start at 0).

    ``images``: the training images; a key is ``str(dataset index)`` (``keys="index"``: the index in
    ``order``, ``"imagefolder"`` or ``"listing"``) or an image name (``keys="stem"``: the file name without
    extension, unique in ``images``); ``"auto"`` takes ``index`` when every key is a number. ``mixing``: the
    run mixed pairs (TinyViT's default with distillation; the sampler then pairs images), False for a run
    with mixup and cutmix off. ``codec`` defaults to ``ms`` float16 top-K (the stored probabilities, TinyViT's
    ``(1 - sum) / (C - K)`` elsewhere); ``num_classes`` to the largest stored index + 1 (pass it: 1000 or
    21841). ``timm_config``: the augmentation settings of the run, kept in ``meta["import"]`` for the replay.
    Returns a summary: ``files``, ``images``, ``crops_per_image``, ``epochs``, ``num_classes``, ``codec``,
    ``carried``, ``flags``, ``skipped``, ``bytes_before``, ``bytes_after``, ``resumed``.
    """
    if keys not in KEY_MODES:
        raise ValidationError(f"keys must be one of {list(KEY_MODES)}. Got {keys!r}.")
    src = Path(src)
    chosen, dirs, K = _epoch_folders(src, epochs)
    listing = list_images(images)
    ranks, world = _epoch_ranks(dirs)
    binding = _key_binding(keys, ranks[0][0][0], listing, order, images)
    N, M = len(listing), len(chosen)
    dst_codec = _zoo.label_codec("probs_topk", K, codec, k_out=k)
    external = _external_seed(mixing)
    pipeline = _augment.Pipeline([external])
    specs = _zoo.scratch_specs(dst_codec, INT16_CLASSES, pipeline, {"pos": ((), np.int64)})
    files = [p for rank_files in ranks for pair in rank_files for p in pair]
    with _zoo.SlotScratch(N, M, specs, scratch_dir) as scratch:
        read = _read_epochs(scratch, chosen, ranks, binding, K, mixing, dst_codec, progress)
        _check_covered(scratch, listing, dirs)
        C = _num_classes(read.top, num_classes, log)
        flags: list[str] = []
        if read.lost_partner:
            flags.append(f"{read.lost_partner} records were mixed with a padded duplicate whose own record the "
                         f"writer dropped: their partner seed is the partner's kept record (what TinyViT's reader "
                         f"finds)")
        sizes = _zoo.image_sizes(listing.paths)
        source = _zoo.resolved(src)
        meta_import = {"format": "tinyvit", "source": source, "files": len(files), "epochs": chosen,
                       "ranks": world, "topk": K, "keys": binding.mode, "order": order, "mixing": bool(mixing),
                       "binding": "rank<R>-keys.txt line -> the image of its key (see keys); a key at several "
                                  "sampler positions of an epoch keeps the smallest",
                       "slots": "slot s = epoch epochs[s]", "replay": external.describe(),
                       "timm_config": timm_config, "flags": flags}
        meta_extra = {"input_size": [positive_int("input_size", input_size)] * 2, "mean": list(mean),
                      "std": list(std)}

        def rows_out(todo: np.ndarray):
            for part in _zoo.batches(todo, batch):
                _, fields, aug = _zoo.scratch_records(scratch, part)
                boxes = np.zeros((len(part), M, 4), np.int64)  # the whole image: the crop is the external replay's
                boxes[..., 2:] = sizes[part][:, None, :]
                yield part, boxes, np.zeros((len(part), M), bool), fields, aug

        done = _zoo.write_store(
            dst, op="import-tinyvit", source=source, keys=listing.keys, sizes=sizes,
            labels=_zoo.folder_labels(listing, C), num_classes=C, codec=dst_codec, crops_per_image=M,
            augment=pipeline, meta={"import": meta_import}, meta_extra=meta_extra, rows=rows_out,
            progress=progress, storage_options=storage_options)
    return {"files": len(files), "images": N, "crops_per_image": M, "epochs": chosen, "num_classes": C,
            "codec": dst_codec.get_config(),
            "carried": {"seed": "aug/external_seed (policy external_seed: timm replay)",
                        "pair-mate": "aug/external_partner, aug/external_partner_seed",
                        "indices, values": f"soft labels ({dst_codec.describe()})"},
            "flags": flags, "skipped": {"padding_duplicates": int(read.records - N * M)},
            "bytes_before": _zoo.source_bytes(files), **done}


# --------------------------------------------------------------------------------------------- the steps

def _epoch_folders(src: Path, epochs: Sequence[int] | None) -> tuple[list[int], list[Path], int]:
    """``(epoch numbers, their folders, K)``: the ``logits_top{K}_epoch{E}`` folders of ``src`` to import
    (``epochs``, default all), which must exist and share one K."""
    if not src.is_dir():
        raise FileNotFoundError(f"TinyViT logits folder not found: {src}")
    found: dict[int, tuple[int, Path]] = {}
    for d in sorted(os.listdir(src)):
        m = DIR_RE.match(d)
        if m and (src / d).is_dir():
            found[int(m.group(2))] = (int(m.group(1)), src / d)
    if not found:
        raise LabelFileError(f"no TinyViT logits folders (logits_top<K>_epoch<E>) under {src}")
    chosen = sorted(found) if epochs is None else [int(e) for e in epochs]
    missing = [e for e in chosen if e not in found]
    if missing:
        raise ValidationError(f"epochs {missing} have no logits_top<K>_epoch<E> folder under {src}; it has "
                              f"{sorted(found)}")
    K = found[chosen[0]][0]
    other = [e for e in chosen if found[e][0] != K]
    if other:
        raise LabelFileError(f"{found[other[0]][1].name} holds top-{found[other[0]][0]} records, "
                             f"{found[chosen[0]][1].name} top-{K}: folders of two runs are mixed")
    return chosen, [found[e][1] for e in chosen], K


def _epoch_ranks(dirs: list[Path]) -> tuple[list[list[tuple[Path, Path]]], int]:
    """Each epoch folder's ``(keys, values)`` files per rank, and the world size they share."""
    ranks = [_rank_files(d) for d in dirs]
    world = len(ranks[0])
    for d, rank_files in zip(dirs, ranks):
        if len(rank_files) != world:
            raise LabelFileError(f"{d} holds {len(rank_files)} ranks, {dirs[0]} {world}: folders of two runs are "
                                 f"mixed")
    return ranks, world


@dataclass(frozen=True, kw_only=True)
class _Binding:
    """How the keys of the rank files name images: ``mode`` ``"index"`` (``order[dataset index]`` = the listing
    position) or ``"stem"`` (``by_stem[file name without extension]``)."""

    mode: str
    order: np.ndarray | None
    by_stem: Mapping[str, int]

    def images(self, names: list[str], N: int, kpath: Path) -> tuple[np.ndarray | None, np.ndarray]:
        """``(dataset index of each key (None for stems), listing position of each key)``."""
        if self.order is not None:
            ds = _index_keys(names, N, kpath)
            return ds, self.order[ds]
        return None, np.array([_stem(self.by_stem, n, kpath) for n in names], np.int64)


def _key_binding(keys: str, first_keys: Path, listing: ImageList, order: str, images) -> _Binding:
    """The :class:`_Binding` of ``keys`` (``"auto"``: ``index`` when the first key file's first key is a number)."""
    mode = _key_mode(keys, first_keys)
    if mode == "index":
        return _Binding(mode=mode, order=_zoo.dataset_order(listing, order), by_stem={})
    stems = [os.path.splitext(k.split("/")[-1])[0] for k in listing.keys]
    if len(set(stems)) != len(listing):
        raise ValidationError(f"keys='stem' needs image file names unique without extension in {images}")
    return _Binding(mode=mode, order=None, by_stem={s: i for i, s in enumerate(stems)})


def _external_seed(mixing: bool) -> _augment.ExternalSeed:
    """The policy that keeps TinyViT's seeds for the user's timm replay."""
    return _augment.ExternalSeed(
        library="timm", pipeline="TinyViT (microsoft/Cream) data/augmentation: create_transform(is_training=True)"
        " then Mixup(mode='pair2')", rng="aug_random.AugRandomContext: numpy.random.Generator(PCG64(seed))",
        pair_rule="seed_a ^ seed_b" if mixing else "")


@dataclass(frozen=True, kw_only=True)
class _Read:
    """What :func:`_read_epochs` counted: records read, records whose pair-mate's own record was dropped, and
    the largest class index (-1 for none)."""

    records: int
    lost_partner: int
    top: int


def _read_epochs(scratch: _zoo.SlotScratch, chosen: list[int], ranks: list[list[tuple[Path, Path]]],
                 binding: _Binding, K: int, mixing: bool, dst_codec, progress: bool | None) -> _Read:
    """Every rank file of every chosen epoch into the scratch (slot s = epoch ``chosen[s]``), each image
    keeping its record at the smallest sampler position."""
    N, world, rec = scratch.N, len(ranks[0]), record_dtype(K)
    records, lost_partner, top = 0, 0, -1
    scratch.arrays["pos"][:] = EMPTY
    bar = _progress.progress(progress, total=len(chosen) * world, desc="import-tinyvit: reading", unit="file")
    for slot, e in enumerate(chosen):
        for r, (kpath, vpath) in enumerate(ranks[slot]):
            names, data = _load_rank(kpath, vpath, rec, K)
            ds, img = binding.images(names, N, kpath)
            if len(data) and data["idx"].min() < 0:
                raise LabelFileError(f"{vpath}: class indices must be >= 0. Got {int(data['idx'].min())}.")
            seq_rec, pos, lost = _positions(len(names), ds, N, e, r, world, mixing, kpath)
            lost_partner += lost
            records += len(names)
            top = max(top, int(data["idx"].max()) if len(data) else -1)
            _merge(scratch, slot, img, data, seq_rec, pos, mixing, dst_codec, vpath)
            bar.update()
    bar.close()
    return _Read(records=records, lost_partner=lost_partner, top=top)


def _load_rank(kpath: Path, vpath: Path, rec: np.dtype, K: int) -> tuple[list[str], np.ndarray]:
    """One rank file's keys and records (one record per key, else a LabelFileError naming the file)."""
    with open(kpath) as f:
        names = [ln.strip() for ln in f]
    if names and names[-1] == "":
        names.pop()
    size = os.path.getsize(vpath)
    if size != len(names) * rec.itemsize:
        raise LabelFileError(f"{vpath} holds {size} bytes; {len(names)} keys in {kpath.name} need "
                             f"{len(names)} records of {rec.itemsize} bytes (top-{K}): truncated or "
                             f"from another run")
    return names, np.fromfile(vpath, dtype=rec) if names else np.zeros(0, rec)


def _check_covered(scratch: _zoo.SlotScratch, listing: ImageList, dirs: list[Path]) -> None:
    """Every image has a record in every slot's epoch."""
    if (scratch.arrays["pos"] == EMPTY).any():
        i, s = (int(v) for v in np.argwhere(scratch.arrays["pos"] == EMPTY)[0])
        raise ValidationError(f"image {listing.keys[i]!r} has no record in {dirs[s].name}: the keys do not cover "
                              f"the image set (another image set or order?)")


def _num_classes(top: int, num_classes: int | None, log: Callable[[str], None] | None) -> int:
    """``num_classes`` (checked against the largest stored class index ``top``), default ``top + 1``."""
    C = top + 1 if num_classes is None else positive_int("num_classes", num_classes)
    if top >= C:
        raise LabelFileError(f"TinyViT class indices must lie in [0, {C}) (num_classes). Got {top}.")
    if num_classes is None and log:
        log(f"num_classes = {C} (largest stored class index + 1; pass num_classes to set it)")
    return C


def _rank_files(d: Path) -> list[tuple[Path, Path]]:
    ranks = sorted(int(m.group(1)) for f in os.listdir(d) if (m := RANK_RE.match(f)))
    if not ranks or ranks != list(range(len(ranks))):
        raise LabelFileError(f"{d} must hold rank0..rank<W-1>-values.bin without gaps. Got ranks {ranks}.")
    out = []
    for r in ranks:
        kpath, vpath = d / f"rank{r}-keys.txt", d / f"rank{r}-values.bin"
        if not kpath.is_file():
            raise LabelFileError(f"{vpath} has no {kpath.name}")
        out.append((kpath, vpath))
    return out


def _key_mode(keys: str, kpath: Path) -> str:
    if keys != "auto":
        return keys
    with open(kpath) as f:
        first = f.readline().strip()
    return "index" if first.isdigit() else "stem"


def _index_keys(names: list[str], N: int, kpath: Path) -> np.ndarray:
    try:
        ds = np.array([int(n) for n in names], np.int64)
    except ValueError:
        bad = next(n for n in names if not n.lstrip("-").isdigit())
        raise LabelFileError(f"{kpath}: key {bad!r} is not a dataset index (keys='index')") from None
    if len(ds) and (ds.min() < 0 or ds.max() >= N):
        outside = int(ds[(ds < 0) | (ds >= N)][0])
        raise ValidationError(f"{kpath}: key {outside} is not an index of the {N} images given: the logits were made "
                              f"for another image set (or order)")
    return ds


def _stem(by_stem: Mapping[str, int], name: str, kpath: Path) -> int:
    try:
        return by_stem[name]
    except KeyError:
        raise ValidationError(f"{kpath}: key {name!r} names no image (file name without extension) of the image "
                              f"set: the logits were made for another image set") from None


def _positions(lines: int, ds: np.ndarray | None, N: int, epoch: int, rank: int, world: int, pairs: bool,
               kpath: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """``(record of each sequence position, global position of each sequence position, lost partners)``: the
    rank's sampler sequence (its lines, or the rebuilt order when the writer dropped duplicates)."""
    T = 2 * world if pairs else world
    expect = _zoo.ceil_div(N, T) * T // world
    if lines == expect:
        return np.arange(lines), rank_positions(lines, rank, world, pairs), 0
    if ds is None or lines > expect:
        raise LabelFileError(f"{kpath} holds {lines} keys; rank {rank} of {world} draws {expect} samples of {N} "
                             f"images per epoch{' in pairs' if pairs else ''} (another image count, world size or "
                             f"mixing setting?)")
    seq = _rank_sequence(N, epoch, rank, world, pairs)
    first: dict[int, int] = {}
    for v in seq.tolist():
        first.setdefault(v, len(first))
    if list(first) != ds.tolist():
        raise LabelFileError(f"{kpath}: its keys are not rank {rank}'s sampler order of epoch {epoch} (seed 0, "
                             f"{world} ranks, pairs={pairs}) with duplicates dropped; cannot recover the pairs")
    recs = np.array([first[v] for v in seq.tolist()], np.int64)
    pos = rank_positions(len(seq), rank, world, pairs)
    lost = 0
    if pairs:  # positions whose pair-mate's own record was dropped (a repeated key)
        mate = np.arange(len(seq)) ^ 1
        dropped = np.ones(len(seq), bool)
        dropped[np.unique(recs, return_index=True)[1]] = False
        lost = int(dropped[mate].sum())
    return recs, pos, lost


def _merge(scratch, slot: int, img: np.ndarray, data: np.ndarray, seq_rec: np.ndarray, pos: np.ndarray,
           pairs: bool, dst_codec, path: Path) -> None:
    """Sequence positions of one rank file into slot ``slot``, keeping per image the smallest position."""
    if not len(seq_rec):
        return
    images = img[seq_rec]
    if pairs:
        mate = np.arange(len(seq_rec)) ^ 1
        partner, pseed = images[mate], data["seed"][seq_rec[mate]]
    else:
        partner, pseed = np.full(len(seq_rec), -1, np.int64), np.zeros(len(seq_rec), np.int32)
    o = np.argsort(pos, kind="stable")
    first = o[np.unique(images[o], return_index=True)[1]]  # each image's smallest position in this file
    cur = scratch.arrays["pos"][images[first], slot]
    take = first[pos[first] < cur]
    if not len(take):
        return
    i, r = images[take], seq_rec[take]
    fields = _zoo.label_fields("probs_topk", dst_codec, INT16_CLASSES, indices=data["idx"][r],
                               values=data["val"][r].astype(np.float32))
    _zoo.check_fields(dst_codec, fields, INT16_CLASSES, path)
    scratch.arrays["pos"][i, slot] = pos[take]
    for n, v in fields.items():
        scratch.arrays[f"soft_{n}"][i, slot] = v
    scratch.arrays["aug_external_seed"][i, slot] = data["seed"][r]
    scratch.arrays["aug_external_partner"][i, slot] = partner[take]
    scratch.arrays["aug_external_partner_seed"][i, slot] = pseed[take]
