"""The teacher runner: label images with a teacher once and write an fkdstore store (``fkdstore generate``).

:func:`generate` lists the images, reads their sizes from the file headers, creates the store up front,
then runs the teacher over ``M`` random-resized crops per image:

* decoding and cropping happen in :class:`torch.utils.data.DataLoader` workers, one item per image
  (its ``M`` crops as uint8, made by :func:`fkdstore.transforms.replay_crops`, the crop function the
  training dataset calls too); the main process normalises on the device and runs the teacher under
  :func:`torch.inference_mode` (autocast and channels_last on CUDA), then ``softmax(logits / T)``, the
  codec, and :meth:`fkdstore.Writer.put_fields`;
* crops depend only on ``(seed, image index)`` (:class:`~fkdstore.transforms.CropSampler`), and teacher
  batches are groups of images aligned to storage shards, so batch size, worker count, process count and
  resumption do not change which crops are labelled;
* work is done shard by shard (a shard is written once, when all its images are labelled), so a run
  killed at any time (even ``kill -9``) is resumed by running the same call again: images already marked
  ``written`` are skipped and the final store equals an uninterrupted run's, array for array;
* under ``torchrun`` rank ``r`` of ``P`` takes shards ``r, r + P, ...``; rank 0 creates the store and is
  the only process that writes attributes; no two ranks touch the same file and there is no merge step.
  With torchrun's environment (``MASTER_ADDR``) a gloo process group is created if the caller has none
  (and destroyed at the end); with only ``RANK``/``WORLD_SIZE`` set, the other ranks poll until rank 0
  has created the store, and rank 0's ``history`` entry then counts only its own images.

Unreadable images: ``on_error="stop"`` (default) raises :class:`~fkdstore.images.ImageReadError` naming
the file; ``on_error="skip"`` leaves the image **unwritten** (its ``written`` flag stays 0, so the store
is incomplete and readers refuse it) and lists its key in ``meta["skipped"]``. A later run retries
skipped images (for example after the file was replaced by a readable copy) and refreshes the list.

Provenance goes into the store's ``meta``: teacher name, class and weight hashes, input size, mean/std,
interpolation, temperature, sampler config, class names; after each run (volatile keys, which a resumed
run may change) ``time_taken_s``, ``finished_at``, ``skipped`` and a ``history`` list of runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import schema as S
from . import store as _store
from .errors import FkdstoreError, SchemaMismatchError, ValidationError
from .images import ImageReadError, image_size, list_images, load_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, CropSampler, normalize, replay_crops

__all__ = ["generate", "add_cli", "load_teacher", "file_sha256", "state_sha256"]

DEFAULT_BATCH_SIZE = 256  # crops per teacher forward
ON_ERROR = ("stop", "skip")
GENERATOR = "fkdstore.generate"


# --------------------------------------------------------------------------------------------- helpers


def _dist_info() -> tuple[int, int]:
    """``(rank, world_size)``: from :mod:`torch.distributed` when initialised, else ``RANK``/``WORLD_SIZE``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ValidationError(f"RANK={rank} and WORLD_SIZE={world} must satisfy 0 <= RANK < WORLD_SIZE")
    return rank, world


class _Dist:
    """Collectives over torch.distributed when there is a process group (created here from torchrun's
    environment if the caller did not), else single-process no-ops / file polling."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.created = False
        self.rank, self.world = _dist_info()
        self.active = self.world > 1 and dist.is_available() and dist.is_initialized()
        if self.world > 1 and not self.active and dist.is_available() and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world)
            self.created = self.active = True
        self.group = None
        if self.active and dist.get_backend() != "gloo":  # object collectives on CPU tensors
            self.group = dist.new_group(backend="gloo")

    def barrier(self):
        if self.active:
            self.dist.barrier(group=self.group)

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self):
        if self.created:
            self.dist.destroy_process_group()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_sha256(module: torch.nn.Module) -> str:
    """Hex sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order): a fingerprint
    of the teacher's weights that does not depend on the device or memory format."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_state_dict(path: str) -> dict:
    p = str(path)
    if p.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValidationError(f"{p}: loading .safetensors needs the 'safetensors' package") from None
        return load_file(p)
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise ValidationError(f"{p}: expected a state dict, got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_teacher(spec: str, weights: str | None = None, kwargs: Mapping | None = None) -> torch.nn.Module:
    """Build a teacher from ``"module:factory"`` (``factory`` may be dotted), calling it with ``kwargs``,
    and load ``weights`` (.pt/.pth/.safetensors state dict, strict) when given."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValidationError(f"teacher must be 'MODULE:FACTORY', e.g. 'fkdstore.testing:tiny_cnn'. Got {spec!r}.")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValidationError(f"cannot import teacher module {mod_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValidationError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj(**dict(kwargs or {}))
    if not isinstance(model, torch.nn.Module):
        raise ValidationError(f"teacher factory {spec!r} must return a torch.nn.Module. Got {type(model).__name__}.")
    if weights:
        missing, unexpected = model.load_state_dict(_load_state_dict(weights), strict=False)
        if missing or unexpected:
            raise ValidationError(
                f"weights {weights} do not fit teacher {spec!r}: missing keys {list(missing)[:5]}, "
                f"unexpected keys {list(unexpected)[:5]}"
            )
    return model


def _logits(out) -> torch.Tensor:
    """Accept a tensor, a tuple/list whose first item is the logits, or an object with ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValidationError(f"teacher must return a logits tensor (B, C). Got {type(out).__name__}.")


def _scan_sizes(paths: Sequence[str], keys: Sequence[str], on_error: str, skipped: list[str]) -> np.ndarray:
    """(N, 2) (height, width) from the image headers, read with a few threads. An unreadable header
    raises with ``on_error="stop"``; with ``"skip"`` the image gets size (1, 1) and is recorded."""

    def one(i):
        try:
            return image_size(paths[i])
        except ImageReadError as e:
            if on_error == "stop":
                raise
            warnings.warn(f"skipping image: {e}", stacklevel=3)
            skipped.append(keys[i])
            return (1, 1)

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as ex:
        return np.asarray(list(ex.map(one, range(len(paths)), chunksize=256)), dtype=np.int64).reshape(-1, 2)


def _clear_interrupted_creation(path: Path) -> None:
    """Remove a store whose creation was killed before its header attribute was written (it holds only
    the group, our array names and no written flag), so a rerun can create it again. Anything else is
    left alone (and :func:`fkdstore.write` reports it)."""
    import shutil

    meta = path / "zarr.json"
    if not meta.exists():
        return
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return
    if S.ATTR_KEY in attrs:
        return
    ours = {S.IMAGE_KEY, S.IMAGE_SIZE, S.LABEL, S.WRITTEN, S.BOX, S.FLIP, S.AUG, S.SOFT_GROUP, "zarr.json"}
    if not {p.name for p in path.iterdir()} <= ours:
        return
    if (path / S.WRITTEN / "c").exists():
        return
    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------- loading


class _CropDataset(torch.utils.data.Dataset):
    """Item ``i``: image ``i``'s ``M`` crops as uint8 ``[M, 3, S, S]`` with their boxes and flips, or the
    read error (returned, not raised, so the main process decides between stop and skip)."""

    def __init__(self, paths, sizes, sampler: CropSampler, M: int, size: int, interpolation: str):
        self.paths, self.sizes, self.sampler = list(paths), np.asarray(sizes), sampler
        self.M, self.size, self.interpolation = M, size, interpolation

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        H, W = (int(v) for v in self.sizes[i])
        try:
            img = load_image(self.paths[i])
            if img.size != (W, H):
                raise ImageReadError(
                    f"image {self.paths[i]} decodes to height x width {img.size[1]} x {img.size[0]}, but its "
                    f"header (and the store) say {H} x {W}"
                )
        except (ImageReadError, OSError) as e:
            return i, None, None, None, f"{e}" if isinstance(e, ImageReadError) else f"cannot read image {self.paths[i]}: {e}"
        boxes, flips = self.sampler.sample(i, H, W, self.M)
        return i, boxes, flips, replay_crops(img, boxes, flips, self.size, self.interpolation), None


def _collate(items):
    ok = [it for it in items if it[4] is None]
    errors = [(it[0], it[4]) for it in items if it[4] is not None]
    if not ok:
        return np.zeros(0, np.int64), None, None, None, errors
    idx = np.asarray([it[0] for it in ok], dtype=np.int64)
    boxes = np.stack([it[1] for it in ok])
    flips = np.stack([it[2] for it in ok])
    crops = torch.stack([it[3] for it in ok])
    return idx, boxes, flips, crops, errors


def _worker_init(_):
    torch.set_num_threads(1)  # workers run Pillow; torch threads would only fight the teacher


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------------------------------- generate


def generate(
    teacher: torch.nn.Module,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    path: str | os.PathLike,
    *,
    crops_per_image: int,
    codec: Any,
    input_size: int = 224,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    temperature: float = 1.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    on_error: str = "stop",
    images_per_shard: int | None = None,
    num_classes: int | None = None,
    amp: bool = True,
    progress: bool = True,
    teacher_name: str | None = None,
    weights_sha256: str | None = None,
) -> _store.Reader:
    """Label ``images`` with ``teacher`` and write (or finish) the store at ``path``; return it opened.

    Args:
        teacher: a :class:`torch.nn.Module` returning logits ``(B, C)``; put in eval mode and moved to
            ``device`` (in place, as ``Module.to`` does).
        images: an image folder (class sub-folders give ``label``, as ImageFolder) or a list of files.
        path: the store. If it exists it must have been created by the same call (else
            :class:`SchemaMismatchError`, nothing written); its written images are kept (resume).
        crops_per_image: ``M``. codec: a codec, name or config (``"ms"``, ``get_codec("ms", k=5)``).
        input_size: side of the square crops fed to the teacher.
        batch_size: crops per teacher forward. Images are grouped ``max(1, batch_size // M)`` at a time,
            in groups aligned to storage shards.
        seed, scale, ratio, flip_p: the crop sampler (:class:`fkdstore.transforms.CropSampler`).
        temperature: labels are ``softmax(logits / temperature)``.
        mean, std, interpolation: input normalisation and the resampling filter of the crops.
        device: default ``"cuda"`` when available (``cuda:LOCAL_RANK`` under torchrun), else ``"cpu"``.
        num_workers: DataLoader workers decoding and cropping (default ``min(8, cpus - 1)``).
        on_error: ``"stop"`` raises on an unreadable image; ``"skip"`` leaves it unwritten and records its
            key in ``meta["skipped"]`` (the store then stays incomplete).
        images_per_shard: storage layout override (default from :func:`fkdstore.schema.default_layout`).
        num_classes: expected output width; default: the teacher's (measured on a probe batch).
        amp: on CUDA run the teacher under autocast (bf16 where supported, else fp16). Ignored on CPU.
        progress: show a tqdm bar (images/s, crops/s) and print a one-line summary (rank 0 only).
        teacher_name, weights_sha256: provenance; ``teacher_name`` defaults to the module's class path.

    Returns the :class:`fkdstore.Reader` of the store (``complete`` unless images were skipped).
    """
    t_start = time.perf_counter()
    M = _positive_int("crops_per_image", crops_per_image)
    S_in = _positive_int("input_size", input_size)
    bs = _positive_int("batch_size", batch_size)
    if num_workers is None:
        num_workers = _default_workers()
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValidationError(f"num_workers must be an integer >= 0. Got {num_workers!r}.")
    if on_error not in ON_ERROR:
        raise ValidationError(f"on_error must be one of {list(ON_ERROR)}. Got {on_error!r}.")
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValidationError(f"temperature must be a number > 0. Got {temperature!r}.") from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValidationError(f"temperature must be a finite number > 0. Got {temperature!r}.")
    if interpolation not in INTERPOLATIONS:
        raise ValidationError(f"interpolation must be one of {sorted(INTERPOLATIONS)}. Got {interpolation!r}.")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValidationError(f"mean and std must have 3 values, std > 0. Got mean={mean}, std={std}.")
    if not isinstance(teacher, torch.nn.Module):
        raise ValidationError(f"teacher must be a torch.nn.Module. Got {type(teacher).__name__}.")
    sampler = CropSampler(scale=tuple(scale), ratio=tuple(ratio), flip_p=flip_p, seed=seed)
    codec = _store._as_codec(codec)
    path = Path(path)

    listing = list_images(images)  # raises for an empty folder / list
    N = len(listing)

    dist = _Dist()
    rank, world = dist.rank, dist.world
    try:
        dev = _pick_device(device)
        teacher.eval()
        teacher.to(dev)
        use_cuda = dev.type == "cuda"
        if use_cuda:
            teacher.to(memory_format=torch.channels_last)
        amp_dtype = None
        if use_cuda and amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

        def forward(x_uint8: torch.Tensor) -> torch.Tensor:
            x = normalize(x_uint8.to(dev, non_blocking=True), mean, std)
            if use_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return _logits(teacher(x)).float()

        # Probe the output width before anything is written.
        with torch.inference_mode():
            width = _probe(forward, S_in)
        if num_classes is not None and int(num_classes) != width:
            raise ValidationError(f"teacher outputs {width} classes but num_classes={num_classes} was asked for")
        C = width
        if listing.classes and len(listing.classes) > C:
            raise ValidationError(
                f"the image folder has {len(listing.classes)} class folders but the teacher outputs {C} classes"
            )

        meta = {
            "generator": GENERATOR,
            "teacher": {
                "name": teacher_name or f"{type(teacher).__module__}.{type(teacher).__qualname__}",
                "class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
                "weights_sha256": weights_sha256,
                "state_sha256": state_sha256(teacher),
            },
            "input_size": S_in,
            "mean": mean,
            "std": std,
            "interpolation": interpolation,
            "temperature": temperature,
            "sampler": sampler.get_config(),
            "classes": list(listing.classes),
        }
        labels = np.asarray(listing.labels, dtype=np.int64)
        common = dict(
            num_images=N, crops_per_image=M, num_classes=C, codec=codec, image_keys=listing.keys,
            labels=labels, meta=meta, images_per_shard=images_per_shard,
        )
        header_skipped: list[str] = []

        # Rank 0 creates (or re-opens) the store; the others join once it exists.
        err = None
        writer = None
        if rank == 0:
            try:
                _clear_interrupted_creation(path)
                sizes = _existing_sizes(path, listing.keys)
                if sizes is None:
                    sizes = _scan_sizes(listing.paths, listing.keys, on_error, header_skipped)
                writer = _store.write(path, image_sizes=sizes, primary=True, **common)
            except BaseException as e:  # tell the other ranks, then raise here
                err = f"{type(e).__name__}: {e}"
                dist.broadcast(err)
                raise
        err = dist.broadcast(err)
        if err is not None:
            raise FkdstoreError(f"rank 0 could not create the store {path}: {err}")
        if rank != 0:
            if not dist.active:
                _wait_for_store(path)
            sizes = _existing_sizes(path, listing.keys)
            if sizes is None:
                raise SchemaMismatchError(f"store {path} exists but lists other images than this run")
            writer = _store.write(path, image_sizes=sizes, primary=False, **common)

        h = writer.header
        written0 = writer.written
        mine = [s for s in range(h.num_shards) if s % world == rank]
        per_group = max(1, bs // M)
        groups: list[list[int]] = []
        shard_last: dict[int, int] = {}  # group number -> shard it completes
        for s in mine:
            r = h.shard_range(s)
            todo = [i for i in r if not written0[i]]
            by_group: dict[int, list[int]] = {}
            for i in todo:
                by_group.setdefault((i - r.start) // per_group, []).append(i)
            if by_group:
                groups.extend(by_group.values())
                shard_last[len(groups) - 1] = s
        n_todo = sum(len(g) for g in groups)

        dataset = _CropDataset(listing.paths, writer._sizes, sampler, M, S_in, interpolation)
        loader = [] if not groups else torch.utils.data.DataLoader(
            dataset, batch_sampler=groups, num_workers=num_workers, collate_fn=_collate,
            pin_memory=use_cuda, worker_init_fn=_worker_init if num_workers else None,
            prefetch_factor=4 if num_workers else None,
        )
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_todo, unit="img", desc=f"labelling {path.name}", dynamic_ncols=True,
                       smoothing=0.05)
        skipped = list(header_skipped)
        done_images = 0
        t_loop = time.perf_counter()
        with torch.inference_mode():
            for g, (idx, boxes, flips, crops, errors) in enumerate(loader):
                for i, msg in errors:
                    if on_error == "stop":
                        raise ImageReadError(msg)
                    if listing.keys[i] not in skipped:
                        warnings.warn(f"skipping image: {msg}", stacklevel=2)
                        skipped.append(listing.keys[i])
                if len(idx):
                    B = len(idx)
                    x = crops.reshape(B * M, *crops.shape[2:])
                    logits = torch.cat([forward(x[j:j + bs]) for j in range(0, B * M, bs)])
                    if logits.ndim != 2 or logits.shape != (B * M, C):
                        raise ValidationError(
                            f"teacher output must have shape (crops, {C}) = ({B * M}, {C}). Got {tuple(logits.shape)}."
                        )
                    if not torch.isfinite(logits).all():
                        bad = [listing.keys[i] for i in idx[: 5]]
                        raise ValidationError(f"teacher returned non-finite logits for a batch of images {bad}...")
                    probs = torch.softmax(logits / temperature, dim=-1).reshape(B, M, C)
                    fields = codec.encode(probs)
                    writer.put_fields(idx, boxes, flips, fields)
                    done_images += B
                if g in shard_last:
                    writer.flush()  # a shard with skipped images: write what it has
                if bar is not None:
                    bar.update(len(idx) + len(errors))
                    el = max(time.perf_counter() - t_loop, 1e-9)
                    bar.set_postfix_str(f"{done_images * M / el:,.0f} crops/s", refresh=False)
        writer.close()
        if bar is not None:
            bar.close()

        # Everyone done: rank 0 records the run.
        dist.barrier()
        all_skipped = sorted({k for part in dist.gather(skipped) for k in part})
        per_rank = [int(n) for n in dist.gather(done_images)]
        done_all = sum(per_rank)
        elapsed = time.perf_counter() - t_start
        if rank == 0:
            old = _store.read_header(writer.group).meta  # the stored meta (history of earlier runs)
            run = {
                "finished_at": _now(), "time_taken_s": round(elapsed, 3), "images_labelled": done_all,
                "world_size": world, "images_per_rank": per_rank, "batch_size": bs, "num_workers": num_workers, "device": str(dev),
                "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
                "torch_version": torch.__version__,
            }
            writer.update_meta(
                time_taken_s=round(elapsed, 3), finished_at=run["finished_at"], skipped=all_skipped,
                history=list(old.get("history", [])) + [run],
            )
        dist.barrier()
        reader = _store.open(path)
        if progress and rank == 0:
            print(_summary(reader, path, done_all, N - int(written0.sum()) - done_all, elapsed, all_skipped),
                  file=sys.stderr, flush=True)
        return reader
    finally:
        dist.close()


def _positive_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValidationError(f"{name} must be an integer >= 1. Got {v!r}.")
    return int(v)


def _pick_device(device) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def _probe(forward, size: int) -> int:
    out = forward(torch.zeros((2, 3, size, size), dtype=torch.uint8))
    if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < 1:
        raise ValidationError(f"teacher must return logits of shape (B, C). For a batch of 2 it returned {tuple(out.shape)}.")
    return int(out.shape[1])


def _existing_sizes(path: Path, keys: Sequence[str]) -> np.ndarray | None:
    """Stored image sizes when ``path`` is a store listing exactly ``keys`` (skip the header scan)."""
    if not (path / "zarr.json").exists():
        return None
    try:
        with _store.open(path) as r:
            stored = r.group[S.IMAGE_KEY][:]
            sizes = r.group[S.IMAGE_SIZE][:]
    except FkdstoreError:
        return None
    if len(stored) != len(keys) or any(a != b for a, b in zip(stored, keys)):
        return None
    return np.asarray(sizes)


def _wait_for_store(path: Path, timeout: float = 3600.0) -> None:
    """Without a process group, non-zero ranks poll until rank 0 has written the store's header."""
    t0 = time.monotonic()
    while True:
        try:
            if S.ATTR_KEY in json.loads((path / "zarr.json").read_text()).get("attributes", {}):
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() - t0 > timeout:
            raise FkdstoreError(f"timed out waiting for rank 0 to create the store {path}")
        time.sleep(0.5)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _summary(reader, path, done, missing_after, elapsed, skipped) -> str:
    M = reader.crops_per_image
    written = int(reader.written.sum())
    stats = _store.storage_stats(path)
    per_crop = sum(d["bytes"] for k, d in stats.items() if k not in ("_total", ".") and k not in reader.header.per_image_arrays)
    bpc = per_crop / max(1, written * M)
    rate = done / elapsed if elapsed > 0 else 0.0
    state = "complete" if reader.complete else f"INCOMPLETE ({len(reader) - written} missing, {len(skipped)} skipped)"
    return (
        f"fkdstore generate: {done} images labelled ({written}/{len(reader)} in store, {state}), "
        f"{done * M} crops, {bpc:.1f} B/crop on disk, {elapsed:.1f} s ({rate:.1f} img/s, {rate * M:.0f} crops/s) "
        f"-> {path}"
    )


# --------------------------------------------------------------------------------------------- CLI

_EXAMPLES = """\
examples:
  # top-5 marginal-smoothing labels for 200 crops per image with a torchvision ResNet-50
  fkdstore generate --images /data/imagenet/train --teacher torchvision.models:resnet50 \\
      --teacher-kwargs '{"weights": "IMAGENET1K_V2"}' --out in1k_r50.fkd --crops 200 --codec ms --k 5

  # a local factory and a state dict; 8 GPUs (rank r labels shards r, r+8, ...)
  torchrun --nproc_per_node=8 -m fkdstore generate --images train/ --teacher mymodels:teacher \\
      --weights teacher.safetensors --out labels.fkd --crops 500 --codec ms --k 10 --input-size 224

  # rerun the same command after a crash: written images are kept, the rest are labelled
  fkdstore generate --images digits/ --teacher fkdstore.testing:tiny_cnn --out d.fkd --crops 8 \\
      --codec ms --k 3 --input-size 32 --device cpu
"""


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on an argparse ``subparsers`` object; sets ``func(args) -> exit code``."""
    p = subparsers.add_parser(
        "generate",
        help="label images with a teacher and write a label store",
        description="Run a teacher on M random-resized crops per image and write an fkdstore label store. "
        "Resumable (rerun the same command) and multi-process under torchrun.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("inputs and output")
    g.add_argument("--images", required=True, nargs="+", metavar="DIR|FILE",
                   help="an image folder (class sub-folders give labels) or a list of image files")
    g.add_argument("--teacher", required=True, metavar="MODULE:FACTORY",
                   help="importable callable returning the teacher module, e.g. fkdstore.testing:tiny_cnn")
    g.add_argument("--teacher-kwargs", default="{}", metavar="JSON", help="keyword arguments for the factory (JSON object)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="state dict to load (.pt/.pth; .safetensors if the package is installed); its sha256 is stored")
    g.add_argument("--out", required=True, metavar="PATH", help="the store to create or resume")
    g = p.add_argument_group("crops and labels")
    g.add_argument("--crops", "--crops-per-image", dest="crops_per_image", type=int, required=True, metavar="M",
                   help="crops per image")
    g.add_argument("--codec", default="ms", help="label codec: full, hard, smoothing, ms, mr (default: ms)")
    g.add_argument("--k", type=int, default=None, help="top-k for ms/mr (codec default: 5)")
    g.add_argument("--dtype", default=None, choices=["float16", "float32"], help="stored probability dtype (codec default)")
    g.add_argument("--num-classes", type=int, default=None, help="expected teacher output width (default: measured)")
    g.add_argument("--input-size", type=int, default=224)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"))
    g.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"))
    g.add_argument("--flip-p", type=float, default=0.5)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, metavar=("R", "G", "B"))
    g.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, metavar=("R", "G", "B"))
    g.add_argument("--interpolation", default="bilinear", choices=sorted(INTERPOLATIONS))
    g.add_argument("--images-per-shard", type=int, default=None, help="storage layout override")
    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="crops per teacher forward")
    g.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    g.add_argument("--num-workers", type=int, default=None, help="decoding workers (default: min(8, cpus - 1))")
    g.add_argument("--on-error", default="stop", choices=list(ON_ERROR),
                   help="unreadable image: stop with its path, or skip it (left unwritten, listed in meta['skipped'])")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast on CUDA")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--teacher-name", default=None, help="provenance name (default: the --teacher spec)")
    g.add_argument("--weights-sha256", default=None, help="provenance (default: sha256 of --weights)")
    p.set_defaults(func=_cli_main)
    return p


def _cli_main(args) -> int:
    try:
        kwargs = json.loads(args.teacher_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        print(f"fkdstore generate: error: --teacher-kwargs must be a JSON object ({e})", file=sys.stderr)
        return 2
    try:
        codec_kw = {k: v for k, v in (("k", args.k), ("dtype", args.dtype)) if v is not None}
        codec = _store._codecs.get_codec(args.codec, **codec_kw)
        teacher = load_teacher(args.teacher, args.weights, kwargs)
        sha = args.weights_sha256 or (file_sha256(args.weights) if args.weights else None)
        name = args.teacher_name or args.teacher + (f"({json.dumps(kwargs, sort_keys=True)})" if kwargs else "")
        images = args.images[0] if len(args.images) == 1 and os.path.isdir(args.images[0]) else args.images
        reader = generate(
            teacher, images, args.out, crops_per_image=args.crops_per_image, codec=codec,
            input_size=args.input_size, batch_size=args.batch_size, seed=args.seed, scale=tuple(args.scale),
            ratio=tuple(args.ratio), flip_p=args.flip_p, temperature=args.temperature, mean=tuple(args.mean),
            std=tuple(args.std), interpolation=args.interpolation, device=args.device,
            num_workers=args.num_workers, on_error=args.on_error, images_per_shard=args.images_per_shard,
            num_classes=args.num_classes, amp=args.amp, progress=args.progress, teacher_name=name,
            weights_sha256=sha,
        )
    except (FkdstoreError, FileNotFoundError, TypeError) as e:
        print(f"fkdstore generate: error: {e}", file=sys.stderr)
        return 2
    if not reader.complete:
        print(f"fkdstore generate: store {args.out} is incomplete: {int((~reader.written).sum())} images missing "
              f"(skipped: {len(reader.meta.get('skipped', []))})", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point: ``python -m fkdstore.generate --images ... --teacher ...``."""
    parser = argparse.ArgumentParser(prog="fkdstore")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "generate":
        argv = ["generate", *argv]
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
