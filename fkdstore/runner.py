"""The teacher runner: label images with a teacher once and write an fkdstore store (``fkdstore generate``).

:func:`generate` runs these steps, one function each:

1. :func:`resolve_images` lists the images (folder or file list) and their ground-truth labels;
2. :class:`~fkdstore.teacher.TeacherForward` readies the teacher and measures its output width
   (:func:`check_num_classes`) before anything is written;
3. :func:`open_or_create_store`: rank 0 reads the image sizes from the file headers (:func:`scan_sizes`,
   skipped when an existing store already lists the same images) and creates the store up front, or
   re-opens it to resume; the other ranks join once it exists;
4. :func:`plan_shards` picks the shards of this rank and the images still to label, grouped into teacher
   batches aligned to storage shards;
5. :func:`label_shards` runs the teacher over those batches: decoding and cropping happen in
   :class:`torch.utils.data.DataLoader` workers, one item per image (its ``M`` crops as uint8, made by
   :func:`fkdstore.transforms.replay_crops`, the crop function the training dataset calls too); the main
   process normalises on the device and runs the teacher under :func:`torch.inference_mode` (autocast
   and channels_last on CUDA), then ``softmax(logits / T)``, the codec, and
   :meth:`fkdstore.Writer.put_fields` (:func:`label_batch`);
6. :func:`record_run` gathers every rank's counts, and rank 0 appends the run to ``meta["history"]``;
   :func:`summary` is the one-line report.

Guarantees:

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
  has created the store, and rank 0's ``history`` entry then counts only its own images
  (:mod:`fkdstore.distributed`).

Unreadable images: ``on_error="stop"`` (default) raises :class:`~fkdstore.images.ImageReadError` naming
the file; ``on_error="skip"`` leaves the image **unwritten** (its ``written`` flag stays 0, so the store
is incomplete and readers refuse it) and lists its key in ``meta["skipped"]``. A later run retries
skipped images (for example after the file was replaced by a readable copy) and refreshes the list.

Provenance goes into the store's ``meta``: teacher name, class and weight hashes, input size, mean/std,
interpolation, temperature, sampler config, class names; after each run (volatile keys, which a resumed
run may change) ``time_taken_s``, ``finished_at``, ``skipped`` and a ``history`` list of runs.

The parameters of :func:`generate` fall into groups, each a small frozen dataclass validated on
construction: :class:`~fkdstore.transforms.CropSampler` (which crops), :class:`~fkdstore.teacher.TeacherInputs`
(what the teacher sees), :class:`LabelSpec` (what the store holds), :class:`Execution` (how this run
executes; never changes the stored values) and :class:`Provenance`. Seams for later work: the crops of an
image come from :class:`_CropDataset`'s ``crops`` object (anything with ``sample(index, H, W, M)``), where
an augmentation pipeline plugs in and where crops replayed from another store do (:class:`StoredCrops`,
``generate(..., crops_from=STORE)``: relabelling with a new teacher); every access to the output location
goes through :func:`open_or_create_store` and its three local-file helpers.

The command line (``fkdstore generate``) lives in :mod:`fkdstore.cli`.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import augment as _augment
from . import progress as _progress
from . import codecs as _codecs
from . import schema as S
from . import reader as _reader
from . import report as _report
from . import storage as _storage
from . import writer as _writer
from .distributed import Collectives, World, pick_device
from .errors import FkdstoreError, SchemaMismatchError, ValidationError
from .images import ImageList, ImageReadError, image_size, list_images, load_image
from .teacher import TeacherForward, TeacherInputs, state_sha256
from .seeded import SlotCropSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, CropSampler, replay_crops
from .validation import boolean, non_negative_int, positive_int

__all__ = ["generate", "LabelSpec", "Execution", "Provenance", "StoredCrops", "DEFAULT_BATCH_SIZE", "ON_ERROR"]

DEFAULT_BATCH_SIZE = 256  # crops per teacher forward
ON_ERROR = ("stop", "skip")
GENERATOR = "fkdstore.generate"


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class LabelSpec:
    """What the store holds: ``crops_per_image`` (M) soft labels per image, ``softmax(logits / temperature)``
    stored with ``codec`` (a codec, a name or a config dict; a codec with ``input == "logits"`` gets the
    logits, and then ``temperature`` must be 1); ``num_classes`` is the expected teacher width
    (``None``: measured), ``images_per_shard`` a storage layout override."""

    crops_per_image: int
    codec: Any
    temperature: float = 1.0
    num_classes: int | None = None
    images_per_shard: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "crops_per_image", positive_int("crops_per_image", self.crops_per_image))
        object.__setattr__(self, "codec", _codecs.as_codec(self.codec))
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float, np.number)):
            raise TypeError(f"temperature must be a number > 0. Got {self.temperature!r}.")
        t = float(self.temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValidationError(f"temperature must be a finite number > 0. Got {self.temperature!r}.")
        object.__setattr__(self, "temperature", t)
        if self.codec.input == "logits" and t != 1.0:
            raise ValidationError(
                f"temperature must be 1 with the {self.codec.name!r} codec: it stores the teacher's logits and the "
                f"temperature is chosen when decoding (decode(..., temperature=T), TorchDataset(..., temperature=T)). "
                f"Got {self.temperature!r}.")
        if self.num_classes is not None:
            object.__setattr__(self, "num_classes", positive_int("num_classes", self.num_classes))
        if self.images_per_shard is not None:
            object.__setattr__(self, "images_per_shard", positive_int("images_per_shard", self.images_per_shard))


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class Execution:
    """How this run executes; none of it changes the stored values. ``batch_size`` crops per teacher
    forward; ``device`` (``None``: this rank's GPU, else CPU); ``num_workers`` decoding processes
    (``None``: ``min(8, cpus - 1)``); ``on_error`` ``"stop"`` or ``"skip"``; ``amp`` autocast on CUDA;
    ``progress`` on rank 0 (:mod:`fkdstore.progress`: None = a bar on a terminal, a plain line every 30 s
    otherwise; True = a bar; False = nothing) and a summary line unless False."""

    batch_size: int = DEFAULT_BATCH_SIZE
    device: Any = None
    num_workers: int | None = None
    on_error: str = "stop"
    amp: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", positive_int("batch_size", self.batch_size))
        workers = _default_workers() if self.num_workers is None else non_negative_int("num_workers", self.num_workers)
        object.__setattr__(self, "num_workers", workers)
        if self.on_error not in ON_ERROR:
            raise ValidationError(f"on_error must be one of {list(ON_ERROR)}. Got {self.on_error!r}.")


@dataclass(frozen=True)
class Provenance:
    """Names recorded in ``meta["teacher"]``: ``teacher_name`` (default: the module's class path) and the
    sha256 of the weights file (``None`` when unknown)."""

    teacher_name: str | None = None
    weights_sha256: str | None = None

    def teacher_meta(self, teacher: torch.nn.Module) -> dict[str, Any]:
        cls = f"{type(teacher).__module__}.{type(teacher).__qualname__}"
        return {"name": self.teacher_name or cls, "class": cls, "weights_sha256": self.weights_sha256,
                "state_sha256": state_sha256(teacher)}


@dataclass(frozen=True)
class _Job:
    """Everything :func:`generate` was asked for, validated."""

    labels: LabelSpec
    sampler: CropSampler | SlotCropSampler
    inputs: TeacherInputs
    execution: Execution
    provenance: Provenance = field(default_factory=Provenance)
    augment: _augment.Pipeline = field(default_factory=_augment.Pipeline)
    seeded_crops: bool = False

    @property
    def images_per_batch(self) -> int:
        return max(1, self.execution.batch_size // self.labels.crops_per_image)


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
    progress: bool | None = None,
    teacher_name: str | None = None,
    weights_sha256: str | None = None,
    augment: Any = None,
    crops_from: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
    seeded_crops: bool = False,
) -> _reader.Reader:
    """Label ``images`` with ``teacher`` and write (or finish) the store at ``path``; return it opened.

    Args:
        teacher: a :class:`torch.nn.Module` returning logits ``(B, C)``; put in eval mode and moved to
            ``device`` (in place, as ``Module.to`` does).
        images: an image folder (class sub-folders give ``label``, as ImageFolder) or a list of files.
        path: the store: a folder or a URL (``s3://bucket/labels.fkd``, any fsspec scheme). If it exists it
            must have been created by the same call (else :class:`SchemaMismatchError`, nothing written);
            its written images are kept (resume). Under torchrun every rank passes the same location: rank 0
            creates the store, each rank writes its own shards (whole objects), so ranks on several nodes
            need no shared filesystem, only the same URL and credentials.
        crops_per_image: ``M``. codec: a codec, name or config (``"ms"``, ``get_codec("ms", k=5)``).
        input_size: side of the square crops fed to the teacher.
        batch_size: crops per teacher forward. Images are grouped ``max(1, batch_size // M)`` at a time,
            in groups aligned to storage shards.
        seed, scale, ratio, flip_p: the crop sampler (:class:`fkdstore.transforms.CropSampler`).
        temperature: labels are ``softmax(logits / temperature)``. Must be 1 for a codec that stores logits
            (``codec.input == "logits"``, e.g. ``"logits:k=5"``), whose temperature is chosen at load time.
        mean, std, interpolation: input normalisation and the resampling filter of the crops.
        device: default ``"cuda"`` when available (``cuda:LOCAL_RANK`` under torchrun), else ``"cpu"``.
        num_workers: DataLoader workers decoding and cropping (default ``min(8, cpus - 1)``).
        on_error: ``"stop"`` raises on an unreadable image; ``"skip"`` leaves it unwritten and records its
            key in ``meta["skipped"]`` (the store then stays incomplete).
        images_per_shard: storage layout override (default from :func:`fkdstore.schema.default_layout`).
        num_classes: expected output width; default: the teacher's (measured on a probe batch).
        amp: on CUDA run the teacher under autocast (bf16 where supported, else fp16). Ignored on CPU.
        progress: rank 0 reports progress (:mod:`fkdstore.progress`): None (default) a bar (images/s,
            crops/s) on a terminal and one plain line every 30 s otherwise (logs of batch jobs stay readable),
            True a bar, False nothing; and a one-line summary at the end unless False.
        teacher_name, weights_sha256: provenance; ``teacher_name`` defaults to the module's class path.
        augment: augmentation policies applied after the crop (:func:`fkdstore.augment.parse_augment`: a
            :class:`~fkdstore.augment.Pipeline`, a spec string such as ``"randaugment:num_ops=2;mixup"`` or a
            list of policy configs). Each slot's params are sampled from ``(seed, image, slot)`` only, stored
            as the store's ``aug/<column>`` arrays, and the teacher labels the augmented (for Mixup/CutMix:
            mixed, with the partner's crop and params) pixels; the pipeline config is the header's
            ``augment``. ``None``: crop and flip only.
        crops_from: relabel: an existing store whose stored crops (boxes, flips, aug columns, augment
            pipeline) are labelled instead of sampled ones (:class:`StoredCrops`); ``seed``, ``scale``,
            ``ratio`` and ``flip_p`` are then unused. ``images`` must list the source's image keys in its
            order and ``crops_per_image`` equal its ``M``; the source must be complete; image sizes come
            from the source (an image that changed since is an :class:`ImageReadError`). The new store
            carries the source's aug columns and augment pipeline, and the teacher sees each slot replayed
            from the source's stored params (``augment`` must then be None).
        storage_options: for a URL ``path`` and/or ``crops_from``, passed to fsspec (``{"endpoint_url": ...,
            "key": ...}``); credentials may instead come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...).
        seeded_crops: write a seeded-crops store (format 3.0, :mod:`fkdstore.seeded`): the crops are drawn by
            :class:`~fkdstore.seeded.SlotCropSampler` (RandomResizedCrop from a counter-based generator, so
            other crops than ``CropSampler``'s for the same seed) and not stored: reads derive them from the
            sampler config in the header (``seed``, ``scale``, ``ratio``, ``flip_p``). About 4.8 B per crop
            less at M = 200.
            With ``crops_from`` the output has seeded crops exactly when the source has (this flag must then
            stay False).

    Returns the :class:`fkdstore.Reader` of the store (``complete`` unless images were skipped).

    Raises :class:`TypeError` for an argument of the wrong type and
    :class:`~fkdstore.errors.ValidationError` for a bad value, before anything is written;
    :class:`~fkdstore.errors.StorageError` (one line) for a URL that cannot be reached (bad URL, missing
    bucket, refused credentials), before the teacher runs.
    """
    t_start = time.perf_counter()
    job = _Job(
        labels=LabelSpec(crops_per_image, codec, temperature, num_classes, images_per_shard),
        sampler=(SlotCropSampler if seeded_crops is True else CropSampler)(
            scale=tuple(scale), ratio=tuple(ratio), flip_p=flip_p, seed=seed),
        inputs=TeacherInputs(input_size, mean, std, interpolation),
        execution=Execution(batch_size, device, num_workers, on_error, amp, progress),
        provenance=Provenance(teacher_name, weights_sha256),
        augment=_augment.parse_augment(augment),
        seeded_crops=boolean("seeded_crops", seeded_crops),
    )
    if crops_from is not None and job.seeded_crops:
        raise ValidationError("seeded_crops must be False with crops_from: the output has seeded crops exactly when "
                              "the source store has (its crops cannot be re-drawn otherwise).")
    if isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path) and os.path.isfile(path):
        raise ValidationError(f"path must be a folder (new, empty, or a store to resume) or a URL. "
                              f"Got {os.fspath(path)!r}, which is a file.")
    if storage_options and not any(_storage.is_url(x) for x in (path, crops_from) if isinstance(x, (str, os.PathLike))):
        raise TypeError(f"storage_options apply to URLs only. Got local paths {path!r} and crops_from={crops_from!r}.")
    # StorageError here, before the teacher runs; the options serve whichever of path / crops_from is a URL
    out = _storage.as_store(path, read_only=False, storage_options=_storage.options_for(path, storage_options))
    return _run(teacher, images, out, job, t_start, crops_from,
                location=(path, _storage.options_for(path, storage_options)), crops_options=storage_options)


def _run(teacher: torch.nn.Module, images, out, job: _Job, t_start: float, crops_from=None, *,
         location, crops_options=None) -> _reader.Reader:
    """The steps listed in the module docstring, in order. ``out`` is the store (:func:`fkdstore.storage.as_store`),
    ``location`` the ``(path or URL, storage_options)`` it came from."""
    listing = resolve_images(images)
    if crops_from is not None and len(job.augment):
        raise ValidationError("augment must be None with crops_from: the crops, their augmentation params and the "
                              f"pipeline come from the source store. Got augment={job.augment.get_config()}.")
    stored = None if crops_from is None else StoredCrops.open(crops_from, listing.keys, job.labels.crops_per_image,
                                                               crops_options)
    forward = TeacherForward(teacher, job.inputs, pick_device(job.execution.device, World.detect()),
                             job.execution.amp)
    num_classes = check_num_classes(forward, job.labels.num_classes, listing)
    meta = provenance_meta(teacher, listing, job)
    if stored is not None:
        meta.update(stored.meta())
    with Collectives() as comm:
        writer, sizes, skipped = open_or_create_store(out, listing, job, num_classes, meta, comm,
                                                      stored=stored)
        plan = plan_shards(writer.header, writer.written, comm.world, job.images_per_batch)
        dataset = _CropDataset(listing.paths, sizes, job.sampler if stored is None else stored,
                               job.labels.crops_per_image, job.inputs,
                               augment=job.augment if stored is None else stored.pipeline, seed=job.sampler.seed)
        done = label_shards(forward, writer, dataset, plan, listing.keys, job, num_classes, skipped,
                            show_progress=job.execution.progress if comm.world.is_leader else False,
                            name=_storage.describe(out).rstrip("/").rsplit("/", 1)[-1])
        writer.close()
        done_all, all_skipped, elapsed = record_run(writer, comm, job, forward, done, skipped, t_start)
        reader = _reader.open(location[0], storage_options=location[1])  # picklable: reopens by URL in workers
        if job.execution.progress is not False and comm.world.is_leader:
            print(summary(reader, out, done_all, elapsed, all_skipped), file=sys.stderr, flush=True)
        return reader


# --------------------------------------------------------------------------------------------- 1-2 inputs


def resolve_images(images) -> ImageList:
    """The images to label, in store order, with their keys and ground-truth labels
    (:func:`fkdstore.images.list_images`; raises for a missing path or no images)."""
    return list_images(images)


def check_num_classes(forward: TeacherForward, expected: int | None, listing: ImageList) -> int:
    """The teacher's output width ``C``, checked against ``expected`` and the number of class folders.

    More class folders than outputs is refused. More outputs than class folders is refused too unless
    ``expected`` (``num_classes``) states the width: the folder's class indices (the store's ``label``) would
    otherwise silently disagree with the teacher's classes (e.g. an ImageNet teacher on a 10-class folder)."""
    width = forward.num_classes()
    if expected is not None and expected != width:
        raise ValidationError(f"teacher outputs {width} classes but num_classes={expected} was asked for")
    n = len(listing.classes)
    if n and n > width:
        raise ValidationError(
            f"the image folder must have at most as many class folders as the teacher has outputs: it has {n} "
            f"({_folders(listing.classes)}), the teacher outputs {width} classes (hidden folders such as "
            f".ipynb_checkpoints are not classes)")
    if n and width > n and expected is None:
        raise ValidationError(
            f"the teacher outputs {width} classes but the image folder has {n} class folders "
            f"({_folders(listing.classes)}): the folders' class indices (the store's labels) would not be the "
            f"teacher's. Pass num_classes={width} (--num-classes {width}) to label with this teacher anyway (its "
            f"classes a superset of the folders'), or use a teacher with {n} outputs")
    return width


def _folders(classes: Sequence[str], show: int = 8) -> str:
    """Class folder names for a message: the first ``show``, then how many more."""
    names = ", ".join(repr(c) for c in classes[:show])
    return names + (f", ... ({len(classes)} in all)" if len(classes) > show else "")


def provenance_meta(teacher: torch.nn.Module, listing: ImageList, job: _Job) -> dict[str, Any]:
    """The store's non-volatile ``meta``: a resumed run must reproduce it exactly."""
    return {
        "generator": GENERATOR,
        "teacher": job.provenance.teacher_meta(teacher),
        **job.inputs.meta(),
        "temperature": job.labels.temperature,
        "sampler": job.sampler.get_config(),
        "classes": list(listing.classes),
    }


def scan_sizes(paths: Sequence[str], keys: Sequence[str], on_error: str, skipped: list[str]) -> np.ndarray:
    """(N, 2) (height, width) from the image headers, read with a few threads. An unreadable header
    raises with ``on_error="stop"``; with ``"skip"`` the image gets size (1, 1) and its key is appended
    to ``skipped``."""

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


# --------------------------------------------------------------------------------------------- 3 the store


def open_or_create_store(out, listing: ImageList, job: _Job, num_classes: int, meta: dict,
                         comm: Collectives, *, stored: StoredCrops | None = None
                         ) -> tuple[_writer.Writer, np.ndarray, list[str]]:
    """Rank 0 creates (or re-opens, to resume) the store; the other ranks join once it exists.

    ``out`` is a Zarr store (a folder's or a URL's, :func:`fkdstore.storage.as_store`): every rank reaches
    it through the store API only, so ranks need no shared filesystem.

    Returns ``(writer, image sizes, keys skipped so far)``. A failure on rank 0 is broadcast, so every
    rank raises instead of waiting. An existing store must list the same images and parameters
    (:class:`SchemaMismatchError` otherwise, nothing written).

    An interrupted creation (killed before the header was written) is cleared by :func:`fkdstore.write`.
    ``stored`` (relabelling): the image sizes, aug columns and augment pipeline come from the source store.
    """
    labels = np.asarray(listing.labels, dtype=np.int64)
    spec = job.labels
    common = dict(
        num_images=len(listing), crops_per_image=spec.crops_per_image, num_classes=num_classes, codec=spec.codec,
        image_keys=listing.keys, labels=labels, meta=meta, images_per_shard=spec.images_per_shard,
        aug=[c.to_json() for c in job.augment.columns()], augment=job.augment.get_config(),
    )
    common["crop_sampler"] = job.sampler if job.seeded_crops else None
    if stored is not None:
        common.update(aug=stored.aug_columns, augment=stored.augment, crop_sampler=stored.crop_sampler)
    skipped: list[str] = []
    err = None
    writer = sizes = None
    if comm.world.is_leader:
        try:
            sizes = _existing_sizes(out, listing.keys)  # write() below clears an interrupted creation
            if sizes is None:
                sizes = stored.sizes if stored is not None else \
                    scan_sizes(listing.paths, listing.keys, job.execution.on_error, skipped)
            writer = _writer.write(out, image_sizes=sizes, primary=True, **common)
        except BaseException as e:  # tell the other ranks, then raise here
            comm.broadcast(f"{type(e).__name__}: {e}")
            raise
    err = comm.broadcast(err)
    if err is not None:
        raise FkdstoreError(f"rank 0 could not create the store {_storage.describe(out)}: {err}")
    if not comm.world.is_leader:
        if not comm.active:
            _wait_for_store(out)
        sizes = _existing_sizes(out, listing.keys)
        if sizes is None:
            raise SchemaMismatchError(f"store {_storage.describe(out)} exists but lists other images than this run")
        writer = _writer.write(out, image_sizes=sizes, primary=False, **common)
    return writer, np.asarray(sizes), skipped


def _existing_sizes(out, keys: Sequence[str]) -> np.ndarray | None:
    """Stored image sizes when ``out`` (a Zarr store, local or remote) is a store listing exactly ``keys``
    (skip the header scan)."""
    try:
        with _reader.open(out) as r:
            stored, sizes = r.image_keys, r.image_sizes
    except FkdstoreError:
        return None
    if len(stored) != len(keys) or any(a != b for a, b in zip(stored, keys)):
        return None
    return np.asarray(sizes)


def _wait_for_store(out, timeout: float = 3600.0) -> None:
    """Without a process group, non-zero ranks poll until rank 0 has written the store's header (``out``: a
    Zarr store, local or remote; one small GET of ``zarr.json`` per poll)."""
    t0 = time.monotonic()
    while True:
        try:
            _reader.open(out).close()
            return
        except FkdstoreError:
            pass
        if time.monotonic() - t0 > timeout:
            raise FkdstoreError(f"timed out waiting for rank 0 to create the store {_storage.describe(out)}")
        time.sleep(0.5)


# --------------------------------------------------------------------------------------------- 4 the plan


@dataclass(frozen=True)
class ShardPlan:
    """This rank's work: ``batches`` of image indices (each inside one shard, in shard order) and, for
    the last batch of each shard, the shard it completes (``shard_ends[batch number] = shard``)."""

    batches: list[list[int]]
    shard_ends: dict[int, int]

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.batches)


def plan_shards(header: S.Header, written: np.ndarray, world: World, images_per_batch: int) -> ShardPlan:
    """Rank ``r`` of ``P`` takes shards ``r, r + P, ...``; within a shard the unwritten images are grouped
    by position, ``images_per_batch`` at a time, so the grouping (and so every batch's content) does not
    depend on what an earlier, interrupted run already wrote."""
    batches: list[list[int]] = []
    shard_ends: dict[int, int] = {}
    for s in range(world.rank, header.num_shards, world.world_size):
        r = header.shard_range(s)
        by_group: dict[int, list[int]] = {}
        for i in r:
            if not written[i]:
                by_group.setdefault((i - r.start) // images_per_batch, []).append(i)
        if by_group:
            batches.extend(by_group.values())
            shard_ends[len(batches) - 1] = s
    return ShardPlan(batches, shard_ends)


# --------------------------------------------------------------------------------------------- 5 labelling


class _CropDataset(torch.utils.data.Dataset):
    """Item ``i``: image ``i``'s ``M`` crops as uint8 ``[M, 3, S, S]`` with their boxes and flips, or the
    read error (returned, not raised, so the main process decides between stop and skip).

    ``crops`` is anything with ``sample(index, height, width, M) -> (boxes, flips)``: the
    :class:`~fkdstore.transforms.CropSampler` today, crops replayed from another store or an
    augmentation pipeline (whose per-crop columns would travel next to boxes and flips) later.
    """

    def __init__(self, paths, sizes, crops, M: int, inputs: TeacherInputs, augment=None, seed: int = 0):
        self.paths, self.sizes, self.crops = list(paths), np.asarray(sizes), crops
        self.M, self.inputs = M, inputs
        self.augment = augment if augment is not None and len(augment) else None
        self.seed = seed  # of the augmentation params (the crop sampler's seed)

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
            msg = f"{e}" if isinstance(e, ImageReadError) else f"cannot read image {self.paths[i]}: {e}"
            return i, None, None, None, msg
        boxes, flips = self.crops.sample(i, H, W, self.M)
        if self.augment is None:
            crops = replay_crops(img, boxes, flips, self.inputs.size, self.inputs.interpolation)
            return i, boxes, flips, crops, None
        try:
            params, crops = self._augmented(i, img, boxes, flips)
        except (ImageReadError, OSError) as e:
            return i, None, None, None, f"image {self.paths[i]}: {e}"
        return i, boxes, flips, (crops, params), None

    def _params(self, i: int, slots) -> dict[str, np.ndarray]:
        """Slot params of image ``i``, sampled from ``(seed, i, slot)`` (the crop sampler's seed), or the
        stored ones when the crops come from a store (:meth:`StoredCrops.params`)."""
        if isinstance(self.crops, StoredCrops):
            return self.crops.params(i, slots)
        size = (self.inputs.size, self.inputs.size)
        return self.augment.sample(self.seed, i, slots, image_size=size, num_images=len(self.paths),
                                   crops_per_image=self.M)

    def _augmented(self, i: int, img, boxes, flips):
        """``(params, uint8 [M, 3, S, S])``: every slot replayed by :func:`fkdstore.augment.replay.replay_slots`;
        a mixing partner ``(j, t)`` (``t`` = the mixed slot) is image ``j`` decoded, its slot ``t``'s box/flip
        and sampled params."""
        from .augment.replay import Partner, replay_slots

        params = self._params(i, np.arange(self.M))
        decoded = {i: img}

        def partner(j: int, t: int) -> Partner:
            if j not in decoded:
                pimg = load_image(self.paths[j])
                Hj, Wj = (int(v) for v in self.sizes[j])
                if pimg.size != (Wj, Hj):
                    raise ImageReadError(f"mixing partner {self.paths[j]} decodes to height x width "
                                         f"{pimg.size[1]} x {pimg.size[0]}, but the store says {Hj} x {Wj}")
                decoded[j] = pimg
            Hj, Wj = (int(v) for v in self.sizes[j])
            pboxes, pflips = self.crops.sample(j, Hj, Wj, self.M)
            return Partner(decoded[j], pboxes[t], bool(pflips[t]), _augment.slot_params(self._params(j, [t]), 0))

        size = (self.inputs.size, self.inputs.size)
        hwc = replay_slots(self.augment, img, np.arange(self.M), boxes, flips, params, size,
                           self.inputs.interpolation, partner)
        return params, torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))


class StoredCrops:
    """The crops of an existing store, for relabelling (``generate(..., crops_from=STORE)``): the
    ``crops`` object of :class:`_CropDataset`. ``sample(i, H, W, M)`` returns image ``i``'s stored boxes
    and flips; :meth:`aug` its stored aug columns. Built with :meth:`open`, which checks the source."""

    def __init__(self, reader: _reader.Reader):
        self.reader = reader
        self.path = reader.path
        h = reader.header
        self.sizes = np.asarray(reader.image_sizes, dtype=np.int64)
        self.aug_columns = list(h.aug)
        self.augment = [dict(p) for p in h.augment]
        self.pipeline = _augment.Pipeline.from_config(self.augment) if self.augment else None
        self.crop_sampler = h.crop_sampler  # a seeded source gives a seeded output with the same sampler

    @classmethod
    def open(cls, location, keys: Sequence[str], crops_per_image: int, storage_options=None) -> StoredCrops:
        """Open the source store (a path, a URL with ``storage_options``, or a Reader) and refuse
        (:class:`ValidationError`, before anything is written) one whose
        image keys differ from ``keys`` (naming the first differing key), whose ``M`` differs, that is
        incomplete."""
        if isinstance(location, _reader.Reader):
            reader = location
        elif isinstance(location, (str, os.PathLike)):
            reader = _reader.open(location, storage_options=_storage.options_for(location, storage_options))
        else:
            raise TypeError(f"crops_from must be a store path or a Reader. Got {type(location).__name__}.")
        src = reader.image_keys
        if list(src) != list(keys):
            j = next((j for j, (a, b) in enumerate(zip(src, keys)) if a != b), min(len(src), len(keys)))
            a = repr(src[j]) if j < len(src) else "nothing (the source has only %d images)" % len(src)
            b = repr(keys[j]) if j < len(keys) else "nothing (the images list only %d)" % len(keys)
            raise ValidationError(f"images must be the crops_from store's images in its order: position {j} is "
                                  f"{a} in {reader.path} but {b} in the images given.")
        if reader.crops_per_image != crops_per_image:
            raise ValidationError(f"crops_per_image must equal the crops_from store's M={reader.crops_per_image}. "
                                  f"Got {crops_per_image}.")
        if not reader.complete:
            raise ValidationError(f"crops_from store {reader.path} is incomplete ({int((~reader.written).sum())} of "
                                  f"{reader.num_images} images not written); finish it first.")
        return cls(reader)

    def sample(self, index: int, height: int, width: int, num_crops: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.reader.read(index)
        return rec.box.astype(np.int64), rec.flip.astype(bool)

    def params(self, index: int, slots) -> dict[str, np.ndarray]:
        """Stored augmentation params of image ``index`` at ``slots`` ({column: (len(slots), ...)})."""
        return dict(self.reader.read(index, np.asarray(slots, dtype=np.int64)).aug)

    def aug(self, indices) -> dict[str, np.ndarray] | None:
        """The stored aug columns of images ``indices`` ({name: (B, M, ...)}), None when the store has none."""
        if not self.aug_columns:
            return None
        return dict(self.reader.read_batch(np.asarray(indices, dtype=np.int64)).aug)

    def meta(self) -> dict[str, Any]:
        """What the new store's ``meta`` records about the source (replaces the unused sampler config)."""
        m = self.reader.meta or {}
        return {"sampler": m.get("sampler"), "crops_from": {"path": str(self.path), "teacher": m.get("teacher")}}


def _collate(items):
    """``(indices, boxes, flips, crops, [(index, error message)], aug)`` of one batch of images; ``aug`` is
    ``{column: (B, M, *shape)}`` for an augmentation pipeline, else None."""
    ok = [it for it in items if it[4] is None]
    errors = [(it[0], it[4]) for it in items if it[4] is not None]
    if not ok:
        return np.zeros(0, np.int64), None, None, None, errors, None
    idx = np.asarray([it[0] for it in ok], dtype=np.int64)
    boxes = np.stack([it[1] for it in ok])
    flips = np.stack([it[2] for it in ok])
    aug = None
    if isinstance(ok[0][3], tuple):  # augmented items carry (crops, params)
        aug = {k: np.stack([it[3][1][k] for it in ok]) for k in ok[0][3][1]}
        crops = torch.stack([it[3][0] for it in ok])
    else:
        crops = torch.stack([it[3] for it in ok])
    return idx, boxes, flips, crops, errors, aug


def _worker_init(_):
    torch.set_num_threads(1)  # workers run Pillow; torch threads would only fight the teacher


def label_shards(forward: TeacherForward, writer: _writer.Writer, dataset: _CropDataset, plan: ShardPlan,
                 keys: Sequence[str], job: _Job, num_classes: int, skipped: list[str], *,
                 show_progress: bool | None, name: str) -> int:
    """Label every batch of ``plan`` and write it; returns the number of images labelled here.

    A shard is flushed after its last batch (so a shard with skipped images is written with what it has);
    unreadable images are raised (``on_error="stop"``) or appended to ``skipped``.
    """
    ex = job.execution
    loader = [] if not plan.batches else torch.utils.data.DataLoader(
        dataset, batch_sampler=plan.batches, num_workers=ex.num_workers, collate_fn=_collate,
        pin_memory=forward.use_cuda, worker_init_fn=_worker_init if ex.num_workers else None,
        prefetch_factor=4 if ex.num_workers else None,
    )
    bar = _progress.progress(show_progress, total=plan.num_images, unit="img", desc=f"labelling {name}",
                             dynamic_ncols=True, smoothing=0.05)
    M = job.labels.crops_per_image
    done = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for b, (idx, boxes, flips, crops, errors, aug) in enumerate(loader):
                _handle_read_errors(errors, keys, ex.on_error, skipped)
                if len(idx):
                    fields = label_batch(forward, crops, job, num_classes, [keys[i] for i in idx[:5]])
                    if aug is None and isinstance(dataset.crops, StoredCrops):
                        aug = dataset.crops.aug(idx)  # a source's aug columns without an augment pipeline
                    writer.put_fields(idx, boxes, flips, fields, aug=aug)
                    done += len(idx)
                if b in plan.shard_ends:
                    writer.flush()
                bar.update(len(idx) + len(errors))
                bar.set_postfix_str(f"{done * M / max(time.perf_counter() - t0, 1e-9):,.0f} crops/s")
    finally:
        bar.close()
    return done


def _handle_read_errors(errors: list[tuple[int, str]], keys: Sequence[str], on_error: str,
                        skipped: list[str]) -> None:
    for i, msg in errors:
        if on_error == "stop":
            raise ImageReadError(msg)
        if keys[i] not in skipped:
            warnings.warn(f"skipping image: {msg}", stacklevel=3)
            skipped.append(keys[i])


def label_batch(forward: TeacherForward, crops: torch.Tensor, job: _Job, num_classes: int,
                some_keys: Sequence[str]) -> dict[str, Any]:
    """Codec fields for a batch of images' crops ``[B, M, 3, S, S]`` (uint8): the teacher runs on at most
    ``batch_size`` crops at a time; labels are ``softmax(logits / temperature)``, encoded by the codec, or,
    for a codec whose ``input`` is ``"logits"``, the teacher's logits themselves (float32).
    ``some_keys`` name the batch in errors (non-finite or wrongly shaped teacher output)."""
    B, M = crops.shape[:2]
    bs, C = job.execution.batch_size, num_classes
    x = crops.reshape(B * M, *crops.shape[2:])
    logits = torch.cat([forward(x[j:j + bs]) for j in range(0, B * M, bs)])
    if logits.ndim != 2 or logits.shape != (B * M, C):
        raise ValidationError(
            f"teacher output must have shape (crops, {C}) = ({B * M}, {C}). Got {tuple(logits.shape)}."
        )
    if not torch.isfinite(logits).all():
        raise ValidationError(f"teacher returned non-finite logits for a batch of images {list(some_keys)}...")
    codec = job.labels.codec
    if codec.input == "logits":  # the temperature is chosen at load time (LabelSpec refuses one here)
        return codec.encode(logits.float().reshape(B, M, C))
    probs = torch.softmax(logits / job.labels.temperature, dim=-1).reshape(B, M, C)
    return codec.encode(probs)


# --------------------------------------------------------------------------------------------- 6 the record


def record_run(writer: _writer.Writer, comm: Collectives, job: _Job, forward: TeacherForward, done: int,
               skipped: list[str], t_start: float) -> tuple[int, list[str], float]:
    """After every rank finished: gather counts and skipped keys; rank 0 appends the run to
    ``meta["history"]`` and refreshes the volatile meta. Returns ``(images labelled by all ranks,
    skipped keys of all ranks, seconds since the start)``."""
    comm.barrier()
    all_skipped = sorted({k for part in comm.gather(skipped) for k in part})
    per_rank = [int(n) for n in comm.gather(done)]
    done_all = sum(per_rank)
    elapsed = time.perf_counter() - t_start
    if comm.world.is_leader:
        old = S.Header.from_json(writer.group.attrs[S.ATTR_KEY]).meta  # the stored meta (history of earlier runs)
        amp = forward.amp_dtype
        run = {
            "finished_at": _now(), "time_taken_s": round(elapsed, 3), "images_labelled": done_all,
            "world_size": comm.world.world_size, "images_per_rank": per_rank,
            "batch_size": job.execution.batch_size, "num_workers": job.execution.num_workers,
            "device": str(forward.device), "amp": str(amp).replace("torch.", "") if amp else None,
            "torch_version": torch.__version__,
        }
        writer.update_meta(
            time_taken_s=round(elapsed, 3), finished_at=run["finished_at"], skipped=all_skipped,
            history=list(old.get("history", [])) + [run],
        )
    comm.barrier()
    return done_all, all_skipped, elapsed


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def summary(reader: _reader.Reader, path, done: int, elapsed: float, skipped: list[str]) -> str:
    """One line: images labelled, store state, crops, bytes per crop on storage, time and throughput.
    ``path``: a folder or a Zarr store (local or remote: sizes from one listing through the store API)."""
    M = reader.crops_per_image
    written = int(reader.written.sum())
    stats = _report.storage_stats(path)
    per_crop = sum(d["bytes"] for k, d in stats.items() if k not in ("_total", ".") and k not in reader.header.per_image_arrays)
    bpc = per_crop / max(1, written * M)
    rate = done / elapsed if elapsed > 0 else 0.0
    state = "complete" if reader.complete else f"INCOMPLETE ({len(reader) - written} missing, {len(skipped)} skipped)"
    return (
        f"fkdstore generate: {done} images labelled ({written}/{len(reader)} in store, {state}), "
        f"{done * M} crops, {bpc:.1f} B/crop on disk, {elapsed:.1f} s ({rate:.1f} img/s, {rate * M:.0f} crops/s) "
        f"-> {_storage.describe(path) if not isinstance(path, (str, os.PathLike)) else path}"
    )
