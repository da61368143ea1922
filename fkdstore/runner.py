"""The teacher runner: label images with a teacher once and write an fkdstore store (``fkdstore generate``).

:func:`generate` runs these steps, one function each:

1. :func:`resolve_images` finds the images (any :mod:`fkdstore.sources` source: a folder, a file list, a URL
   prefix, tar shards, a ``datasets.Dataset``, a mapping) and their ground-truth labels;
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

* crops depend only on ``(seed, image index, slot)`` (:class:`~fkdstore.seeded.SlotCropSampler`), and teacher
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
skipped images (for example after the file was replaced by a readable copy) and refreshes the list; an
image whose header could not be read when the store was created (recorded as 1 x 1) gets its size read
again and set first (:func:`retry_skipped_sizes`).

Replay parameters (input size, interpolation, mean, std) go into the checksummed header; provenance goes
into the store's ``meta``: teacher name, class and weight hashes, temperature, class names (and, for stored
crops, the sampler config); after each run (volatile keys, which a resumed
run may change) ``time_taken_s``, ``finished_at``, ``skipped`` and a ``history`` list of runs.

The parameters of :func:`generate` fall into groups, each a small frozen dataclass validated on
construction: :class:`LabelSpec` (what the store holds, which crops), :class:`~fkdstore.transforms.Replay`
(what the teacher sees), :class:`Execution` (how this run executes; never changes the stored values) and
:class:`Provenance`; :func:`generate` takes them as objects or their fields as keywords. Seams for later work:
the crops of an image come from :class:`_CropDataset`'s ``crops`` object (anything with
``sample(index, H, W, M)``), where an augmentation pipeline plugs in and where crops replayed from another
store do (:class:`StoredCrops`, ``generate(..., crops_from=STORE)``: relabelling with a new teacher); every
access to the output location goes through :func:`open_or_create_store` and its three local-file helpers.

The command line (``fkdstore generate``) lives in :mod:`fkdstore.cli`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import augment as _augment
from . import codecs as _codecs
from . import progress as _progress
from . import reader as _reader
from . import report as _report
from . import schema as S
from . import storage as _storage
from . import writer as _writer
from .augment.replay import Partner, replay_slots
from .distributed import Collectives, World, pick_device
from .errors import FkdstoreError, SchemaMismatchError, ValidationError
from .images import ImageReadError
from .labelmap import LabelMapSpec
from .labelmap_torch import topk_maps
from .seeded import SlotCropSampler
from .sources import ImageSource, as_source
from .teacher import TeacherForward, state_sha256
from .transforms import Replay, crop_resize, replay_crops
from .validation import boolean, non_negative_int, positive_int

__all__ = ["generate", "LabelSpec", "Execution", "Provenance", "StoredCrops", "DEFAULT_BATCH_SIZE", "ON_ERROR"]

DEFAULT_BATCH_SIZE = 256  # crops per teacher forward
ON_ERROR = ("stop", "skip")
GENERATOR = "fkdstore.generate"


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class LabelSpec:
    """What the store holds, one of two record kinds (spec section 1.3):

    * crop regions (FKD): ``crops_per_image`` (M) soft labels per image, ``softmax(logits / temperature)``
      stored with ``codec`` (a codec, a name or a config dict; a codec with ``input == "logits"`` gets the
      logits, and then ``temperature`` must be 1); the crops drawn by ``crop_sampler`` (a
      :class:`~fkdstore.seeded.SlotCropSampler`) and derived from it on read, or stored when ``store_crops``;
      ``augment`` the policies applied after the crop (:func:`fkdstore.augment.parse_augment`);
    * label maps (ReLabel): ``label_map``, a :class:`~fkdstore.labelmap.LabelMapSpec` (or its config): the
      teacher runs once on each whole image resized to the replay ``input_size`` and must return a class map
      ``[B, C, S, S]`` (``S = label_map.size``; e.g. :func:`fkdstore.labelmap_torch.spatial_teacher`); the
      top ``K`` classes of every cell are stored (:func:`fkdstore.labelmap_torch.topk_maps`). Mutually
      exclusive with ``crops_per_image``, ``codec``, ``crop_sampler``, ``store_crops`` and ``augment``, and
      ``temperature`` stays 1 (the label map's own ``temperature`` is its replay temperature).

    Both: ``num_classes`` the expected teacher width (``None``: measured); ``images_per_shard`` a storage
    layout override; ``class_labels`` whether the store's ``label`` takes the source's ground-truth classes
    (class sub-folders, a ``.cls`` member, a label column). ``False`` stores none (``label`` all -1,
    ``has_labels`` false, ``meta["classes"]`` empty), for a teacher whose outputs are not the source's classes
    (a self-supervised embedding head of width ``D``, e.g. on ImageNet's 1000 class folders); a source without
    labels (a flat folder, a file list) gives the same store either way."""

    crops_per_image: int | None = None
    codec: Any = None
    label_map: Any = None
    temperature: float = 1.0
    crop_sampler: SlotCropSampler = field(default_factory=SlotCropSampler)
    store_crops: bool = False
    augment: Any = None
    num_classes: int | None = None
    images_per_shard: int | None = None
    class_labels: bool = True

    def __post_init__(self) -> None:
        if self.label_map is not None:
            self._check_label_map()
        else:
            if self.crops_per_image is None or self.codec is None:
                missing = [n for n in ("crops_per_image", "codec") if getattr(self, n) is None]
                raise ValidationError(f"generate needs crops_per_image and codec (FKD crop regions) or label_map "
                                      f"(ReLabel label maps). Got no {' and no '.join(missing)}.")
            object.__setattr__(self, "crops_per_image", positive_int("crops_per_image", self.crops_per_image))
            object.__setattr__(self, "codec", _codecs.as_codec(self.codec))
        object.__setattr__(self, "temperature", _codecs.parse_temperature(self.temperature))
        if self.codec is not None and self.codec.input == "logits" and self.temperature != 1.0:
            raise ValidationError(
                f"temperature must be 1 with the {self.codec.name!r} codec: it stores the teacher's logits and the "
                f"temperature is chosen when decoding (decode(..., temperature=T), TorchDataset(..., temperature=T)). "
                f"Got {self.temperature!r}.")
        if not isinstance(self.crop_sampler, SlotCropSampler):
            raise TypeError(f"crop_sampler must be a SlotCropSampler. Got {type(self.crop_sampler).__name__}.")
        object.__setattr__(self, "store_crops", boolean("store_crops", self.store_crops))
        object.__setattr__(self, "augment", _augment.parse_augment(self.augment))
        if self.num_classes is not None:
            object.__setattr__(self, "num_classes", positive_int("num_classes", self.num_classes))
        if self.images_per_shard is not None:
            object.__setattr__(self, "images_per_shard", positive_int("images_per_shard", self.images_per_shard))
        object.__setattr__(self, "class_labels", boolean("class_labels", self.class_labels))

    def _check_label_map(self) -> None:
        spec = self.label_map
        if isinstance(spec, Mapping):
            spec = LabelMapSpec.from_config(spec)
        elif not isinstance(spec, LabelMapSpec):
            raise TypeError(f"label_map must be a LabelMapSpec or its config. Got {type(spec).__name__}.")
        object.__setattr__(self, "label_map", spec)
        given = [f"{n}={getattr(self, n)!r}" for n in ("crops_per_image", "codec") if getattr(self, n) is not None]
        defaults = (("crop_sampler", SlotCropSampler()), ("store_crops", False))
        given += [f"{n}={getattr(self, n)!r}" for n, default in defaults if getattr(self, n) != default]
        if len(_augment.parse_augment(self.augment)):
            given.append(f"augment={self.augment!r}")
        if given:
            raise ValidationError(f"label_map is mutually exclusive with crops_per_image, codec, crop_sampler, "
                                  f"store_crops and augment: a label-map store holds one map per whole image, "
                                  f"crops are drawn at training time. Got {', '.join(given)}.")
        if self.temperature != 1.0:
            raise ValidationError(f"temperature must be 1 with label_map: the map stores raw scores; the replay "
                                  f"temperature is LabelMapSpec(temperature=...). Got {self.temperature!r}.")

    @property
    def kind(self) -> str:
        """The record kind this spec writes: ``"label_map"`` or ``"regions"``."""
        return S.LABEL_MAP if self.label_map is not None else S.REGIONS

    @property
    def M(self) -> int:
        """``crops_per_image`` of a crop-regions spec (validated); FormatError naming the kind for a label map."""
        if self.crops_per_image is None:
            raise S.kind_error(self.kind, S.REGIONS)
        return self.crops_per_image


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True, kw_only=True)
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

    @property
    def workers(self) -> int:
        """``num_workers`` resolved (``__post_init__`` replaced ``None`` by the default)."""
        return _default_workers() if self.num_workers is None else self.num_workers


@dataclass(frozen=True, kw_only=True)
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
    replay: Replay
    execution: Execution
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def sampler(self) -> SlotCropSampler:
        return self.labels.crop_sampler

    @property
    def augment(self) -> _augment.Pipeline:
        return self.labels.augment

    @property
    def images_per_batch(self) -> int:
        """Images per teacher batch: ``batch_size`` whole images (label maps), else ``batch_size // M``."""
        if self.labels.kind == S.LABEL_MAP:
            return self.execution.batch_size
        return max(1, self.execution.batch_size // self.labels.M)

    @property
    def work(self) -> type[_RegionWork] | type[_MapWork]:
        """The record kind's labelling steps (:data:`_WORK`)."""
        return _WORK[self.labels.kind]


_CONFIGS = {"labels": LabelSpec, "replay": Replay, "run": Execution, "provenance": Provenance}
# the flat keyword form of generate(): each option belongs to exactly one config object
_OPTIONS = {f.name: name for name, cls in _CONFIGS.items() for f in dataclasses.fields(cls)}


def option_default(name: str) -> Any:
    """The default of one of :func:`generate`'s flat options (a field of a config object); the config's
    field is its one home. A field without a default returns ``dataclasses.MISSING``."""
    f = next(f for f in dataclasses.fields(_CONFIGS[_OPTIONS[name]]) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _configs(given: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The four config objects of :func:`generate` from its config arguments and flat options."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"generate() got unknown options {unknown}; options are the fields of LabelSpec, Replay, "
                        f"Execution and Provenance: {sorted(_OPTIONS)}")
    out = {}
    for name, cls in _CONFIGS.items():
        mine = {k: v for k, v in options.items() if _OPTIONS[k] == name}
        obj = given.get(name)
        if obj is not None:
            if not isinstance(obj, cls):
                raise TypeError(f"{name} must be a {cls.__name__}. Got {type(obj).__name__}.")
            if mine:
                raise TypeError(f"give either {name}={cls.__name__}(...) or its fields {sorted(mine)}, not both")
            out[name] = obj
        else:
            out[name] = cls(**mine)
    return out


# --------------------------------------------------------------------------------------------- generate


def generate(
    teacher: torch.nn.Module,
    images: Any,
    path: str | os.PathLike,
    *,
    labels: LabelSpec | None = None,
    replay: Replay | None = None,
    run: Execution | None = None,
    provenance: Provenance | None = None,
    crops_from: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> _reader.Reader:
    """Label ``images`` with ``teacher`` and write (or finish) the store at ``path``; return it opened.

    The parameters come as four config objects, or as their fields given directly (the short form for the
    common case, ``generate(teacher, "train/", "labels.zarr", crops_per_image=8, codec="ms:k=5",
    input_size=32)``; an object and its fields together are refused):

    * ``labels``: :class:`LabelSpec`: ``crops_per_image`` (M), ``codec``, ``temperature`` (labels are
      ``softmax(logits / temperature)``; 1 for a codec that stores logits, whose temperature is chosen at
      load time), ``crop_sampler`` (a :class:`~fkdstore.seeded.SlotCropSampler`, default seed 0; its crops
      are derived on read, or stored with ``store_crops=True``), ``augment`` (policies after the crop:
      :func:`fkdstore.augment.parse_augment`; each slot's params are sampled from ``(seed, image, slot)``,
      stored as ``aug/<column>``, and the teacher labels the augmented — for Mixup/CutMix mixed — pixels),
      ``num_classes`` (expected teacher width; default measured), ``images_per_shard`` (layout override);
      or, instead of crop regions, ``label_map`` (a :class:`~fkdstore.labelmap.LabelMapSpec`: ReLabel's label
      maps, ``generate(spatial_teacher(model), "train/", "maps.zarr", label_map=LabelMapSpec(size=15, k=5,
      box_order="xy"), input_size=475)``: the teacher runs once per whole image resized to ``input_size`` and
      returns class maps ``[B, C, S, S]``; the top-K of every cell is stored; training pools them per crop);
    * ``replay``: :class:`~fkdstore.transforms.Replay`: ``input_size`` (the teacher's input, default 224),
      ``interpolation``, ``mean``, ``std``; recorded in the header, what training replays;
    * ``run``: :class:`Execution`: ``batch_size`` (crops, or whole images for label maps, per teacher forward;
      images are grouped ``max(1, batch_size // M)`` at a time, aligned to storage shards), ``device`` (default
      cuda when available, ``cuda:LOCAL_RANK`` under torchrun, else cpu), ``num_workers`` (decoding workers, default
      ``min(8, cpus - 1)``), ``on_error`` (``"stop"`` raises on an unreadable image; ``"skip"`` leaves it
      unwritten, listed in ``meta["skipped"]``, and a later run retries it), ``amp`` (autocast on CUDA),
      ``progress`` (None: a bar on a terminal, periodic lines otherwise, and a summary line; rank 0 only);
    * ``provenance``: :class:`Provenance`: ``teacher_name``, ``weights_sha256``.

    Args:
        teacher: a :class:`torch.nn.Module` returning logits ``(B, C)`` (for ``label_map``: class maps
            ``(B, C, S, S)`` of raw scores); put in eval mode and moved to the device (in place, as
            ``Module.to`` does).
        images: an image folder (class sub-folders give ``label``, as ImageFolder), a list of files, a URL prefix
            (``s3://bucket/train/``, with ``storage_options``), WebDataset tar shards, a ``datasets.Dataset``,
            a mapping of key -> image or an :class:`fkdstore.sources.ImageSource`
            (:func:`fkdstore.sources.as_source`); the store's ``image_keys`` are the source's keys, in order.
            Remote images are fetched ahead of decoding, a teacher batch at a time.
        path: the store: a folder or a URL (``s3://bucket/labels.zarr``, any fsspec scheme). If it exists it
            must have been created by the same call (else :class:`SchemaMismatchError`, nothing written);
            its written images are kept (resume). Under torchrun every rank passes the same location: rank 0
            creates the store, each rank writes its own shards (whole objects), so ranks on several nodes
            need no shared filesystem, only the same URL and credentials.
        crops_from: relabel: an existing store whose crops (boxes, flips, aug columns, augment pipeline, crop
            sampler) are labelled instead of sampled ones (:class:`StoredCrops`; ``crop_sampler`` and
            ``augment`` are then unused and must stay default). ``images`` must list the source's image keys
            in its order and ``crops_per_image`` equal its ``M``; the source must be complete; image sizes
            come from the source.
        storage_options: for a URL ``path``, ``crops_from`` and/or ``images``, passed to fsspec; credentials
            may instead come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...).

    Returns the :class:`fkdstore.Reader` of the store (``complete`` unless images were skipped).

    Raises :class:`TypeError` for an argument of the wrong type and
    :class:`~fkdstore.errors.ValidationError` for a bad value, before anything is written;
    :class:`~fkdstore.errors.StorageError` (one line) for a URL that cannot be reached, before the teacher runs.
    """
    t_start = time.perf_counter()
    cfg = _configs({"labels": labels, "replay": replay, "run": run, "provenance": provenance}, options)
    job = _Job(labels=cfg["labels"], replay=cfg["replay"], execution=cfg["run"], provenance=cfg["provenance"])
    _check_locations(job, images, path, crops_from, storage_options)
    # StorageError here, before the teacher runs; the options serve whichever of path / crops_from is a URL
    out = _storage.as_store(path, read_only=False, storage_options=_storage.options_for(path, storage_options))
    return _run(teacher, images, out, job, t_start, crops_from,
                location=(path, _storage.options_for(path, storage_options)), crops_options=storage_options,
                images_options=_storage.options_for(images, storage_options))


def _check_locations(job: _Job, images, path, crops_from, storage_options) -> None:
    """:func:`generate`'s checks of where the images, the output and the crops come from, before anything is
    opened: ``crops_from`` only for crop regions with the default sampler, ``path`` not a file,
    ``storage_options`` only with a URL among them."""
    if crops_from is not None and job.labels.kind == S.LABEL_MAP:
        raise ValidationError("crops_from applies to crop regions: a label map is made from the whole image. Got "
                              "label_map with crops_from.")
    if crops_from is not None and (job.labels.crop_sampler != SlotCropSampler() or job.labels.store_crops):
        raise ValidationError("crop_sampler and store_crops must stay default with crops_from: the crops, and "
                              "whether they are seeded, come from the source store.")
    if isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path) and os.path.isfile(path):
        raise ValidationError(f"path must be a folder (new, empty, or a store to resume) or a URL. "
                              f"Got {os.fspath(path)!r}, which is a file.")
    locations = [x for x in (path, crops_from, images) if isinstance(x, (str, os.PathLike))]
    if storage_options and not any(_storage.is_url(x) for x in locations):
        raise TypeError(f"storage_options apply to URLs only. Got local paths {path!r} and crops_from={crops_from!r}.")


def _run(teacher: torch.nn.Module, images, out, job: _Job, t_start: float, crops_from=None, *,
         location, crops_options=None, images_options=None) -> _reader.Reader:
    """The steps listed in the module docstring, in order. ``out`` is the store (:func:`fkdstore.storage.as_store`),
    ``location`` the ``(path or URL, storage_options)`` it came from."""
    listing = resolve_images(images, storage_options=images_options)
    if not job.labels.class_labels:
        listing = listing.without_labels()
    if crops_from is not None and len(job.augment):
        raise ValidationError("augment must be None with crops_from: the crops, their augmentation params and the "
                              f"pipeline come from the source store. Got augment={job.augment.get_config()}.")
    stored = None if crops_from is None else StoredCrops.open(crops_from, listing.keys, job.labels.M,
                                                               crops_options)
    forward = TeacherForward(teacher, job.replay, pick_device(job.execution.device, World.detect()),
                             job.execution.amp)
    num_classes = check_num_classes(forward, job.labels.num_classes, listing, job)
    meta = provenance_meta(teacher, listing, job)
    if stored is not None:
        meta.update(stored.meta())
    with Collectives() as comm:
        writer, sizes, skipped = open_or_create_store(out, listing, job, num_classes, meta, comm,
                                                      stored=stored)
        plan = plan_shards(writer.header, writer.written, comm.world, job.images_per_batch)
        dataset = job.work.dataset(listing, sizes, job, stored)
        done = label_shards(forward, writer, dataset, plan, listing.keys, job, num_classes, skipped,
                            show_progress=job.execution.progress is not False and comm.world.is_leader,
                            name=_storage.describe(out).rstrip("/").rsplit("/", 1)[-1])
        writer.close()
        done_all, all_skipped, elapsed = record_run(writer, comm, job, forward, done, skipped, t_start)
        reader = _reader.open(location[0], storage_options=location[1])  # picklable: reopens by URL in workers
        if job.execution.progress is not False and comm.world.is_leader:
            print(summary(reader, out, done_all, elapsed, all_skipped), file=sys.stderr, flush=True)
        return reader


# --------------------------------------------------------------------------------------------- 1-2 inputs


def resolve_images(images, storage_options=None) -> ImageSource:
    """The images to label, in store order, with their keys and ground-truth labels
    (:func:`fkdstore.sources.as_source`; raises for a missing path or no images)."""
    return as_source(images, storage_options=storage_options)


def check_num_classes(forward: TeacherForward, expected: int | None, listing: ImageSource,
                      job: _Job | None = None) -> int:
    """The teacher's output width ``C``, checked against ``expected`` and the number of class folders (for a
    label-map ``job`` also the class map's shape: :meth:`_MapWork.num_classes`).

    More class folders than outputs is refused. More outputs than class folders is refused too unless
    ``expected`` (``num_classes``) states the width: the folder's class indices (the store's ``label``) would
    otherwise silently disagree with the teacher's classes (e.g. an ImageNet teacher on a 10-class folder).
    A ground-truth class (any source's ``labels``) of ``C`` or more is refused. The messages point to
    ``class_labels=False`` for a teacher whose outputs are not classes (a source without labels passes)."""
    width = forward.num_classes() if job is None else job.work.num_classes(forward, job)
    if expected is not None and expected != width:
        raise ValidationError(f"teacher outputs {width} classes but num_classes={expected} was asked for")
    n = len(listing.classes)
    if n and n > width:
        raise ValidationError(
            f"the image folder must have at most as many class folders as the teacher has outputs: it has {n} "
            f"({_folders(listing.classes)}), the teacher outputs {width} classes (hidden folders such as "
            f".ipynb_checkpoints are not classes). {_NO_LABELS_HINT}")
    if n and width > n and expected is None:
        raise ValidationError(
            f"the teacher outputs {width} classes but the image folder has {n} class folders "
            f"({_folders(listing.classes)}): the folders' class indices (the store's labels) would not be the "
            f"teacher's. Pass num_classes={width} (--num-classes {width}) to label with this teacher anyway (its "
            f"classes a superset of the folders'), or use a teacher with {n} outputs. {_NO_LABELS_HINT}")
    top = max(listing.labels, default=-1)
    if top >= width:
        i = listing.labels.index(top)
        raise ValidationError(
            f"the images' ground-truth classes must be teacher outputs, in [0, {width}): {listing.name(i)} has "
            f"class {top}. {_NO_LABELS_HINT}")
    return width


_NO_LABELS_HINT = ("If the teacher's outputs are not these classes (a self-supervised embedding head), pass "
                   "class_labels=False (--no-class-labels) to store no ground-truth labels")


def _folders(classes: Sequence[str], show: int = 8) -> str:
    """Class folder names for a message: the first ``show``, then how many more."""
    names = ", ".join(repr(c) for c in classes[:show])
    return names + (f", ... ({len(classes)} in all)" if len(classes) > show else "")


def provenance_meta(teacher: torch.nn.Module, listing: ImageSource, job: _Job) -> dict[str, Any]:
    """The store's non-volatile ``meta``: a resumed run must reproduce it exactly."""
    return {
        "generator": GENERATOR,
        "teacher": job.provenance.teacher_meta(teacher),
        "temperature": job.labels.temperature,
        "classes": list(listing.classes),
        # label maps: what the teacher saw (the header's replay says how: the whole image resized)
        **({"label_map_input": "whole image"} if job.labels.kind == S.LABEL_MAP else {}),
        # stored crops: which sampler drew them (seeded crops carry it in the header)
        **({"sampler": job.sampler.get_config()} if job.labels.store_crops else {}),
    }


def scan_sizes(source: ImageSource, on_error: str, skipped: list[str]) -> np.ndarray:
    """(N, 2) (height, width) from the image headers (:meth:`~fkdstore.sources.ImageSource.header_sizes`: a
    few threads, or concurrent requests for a remote source). An unreadable header raises with
    ``on_error="stop"``; with ``"skip"`` the image gets size (1, 1) and its key is appended to ``skipped``."""
    out = []
    for key, got in zip(source.keys, source.header_sizes()):
        if isinstance(got, ImageReadError):
            if on_error == "stop":
                raise got
            warnings.warn(f"skipping image: {got}", stacklevel=3)
            skipped.append(key)
            got = (1, 1)
        out.append(got)
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------- 3 the store


def open_or_create_store(out, listing: ImageSource, job: _Job, num_classes: int, meta: dict,
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
    common: dict[str, Any] = dict(
        num_images=len(listing), num_classes=num_classes, image_keys=listing.keys, labels=labels, meta=meta,
        images_per_shard=spec.images_per_shard, replay=job.replay, **job.work.records(job),
    )
    if stored is not None:
        common.update(aug=stored.aug_columns, augment=stored.augment, crop_sampler=stored.crop_sampler)
    skipped: list[str] = []
    if comm.world.is_leader:
        try:
            writer, sizes = _create_store(out, listing, job, common, stored, skipped)
        except BaseException as e:  # tell the other ranks, then raise here
            comm.broadcast(f"{type(e).__name__}: {e}")
            raise
        comm.broadcast(None)
        return writer, sizes, skipped
    err = comm.broadcast(None)
    if err is not None:
        raise FkdstoreError(f"rank 0 could not create the store {_storage.describe(out)}: {err}")
    if not comm.active:
        _wait_for_store(out)
    existing = _existing_sizes(out, listing.keys)
    if existing is None:
        raise SchemaMismatchError(f"store {_storage.describe(out)} exists but lists other images than this run")
    return _writer.write(out, image_sizes=existing, primary=False, **common), np.asarray(existing), skipped


def _create_store(out, listing: ImageSource, job: _Job, common: dict[str, Any], stored: StoredCrops | None,
                  skipped: list[str]) -> tuple[_writer.Writer, np.ndarray]:
    """Rank 0's half of :func:`open_or_create_store`: the writer and the image sizes (stored ones on a resume,
    whose skipped images are retried; the source store's when relabelling; else the header scan)."""
    sizes = _existing_sizes(out, listing.keys)  # write() below clears an interrupted creation
    resumed = sizes is not None
    if sizes is None:
        sizes = stored.sizes if stored is not None else scan_sizes(listing, job.execution.on_error, skipped)
    writer = _writer.write(out, image_sizes=sizes, primary=True, **common)
    if resumed and stored is None:
        sizes = retry_skipped_sizes(writer, listing, job.execution.on_error, skipped)
    return writer, np.asarray(sizes)


def retry_skipped_sizes(writer: _writer.Writer, source: ImageSource, on_error: str, skipped: list[str]) -> np.ndarray:
    """On a resume: the images a run skipped at the header scan (recorded as 1 x 1, unwritten) or listed in
    ``meta["skipped"]``, still unwritten, have their headers read again; those readable now (a file replaced by
    a readable copy) get their true size in the store (:meth:`fkdstore.writer.Writer.set_image_sizes`), so
    this run labels them. One still unreadable raises with ``on_error="stop"``, else stays skipped. Returns
    the store's image sizes."""
    sizes = writer.image_sizes
    listed = set(writer.header.meta.get("skipped") or [])
    keys = source.keys
    todo = [i for i in np.flatnonzero(~writer.written).tolist() if (sizes[i] == 1).all() or keys[i] in listed]
    if not todo:
        return sizes
    fix, new = [], []
    for i, got in zip(todo, source.header_sizes(todo)):
        if isinstance(got, ImageReadError):
            if on_error == "stop":
                raise got
            if keys[i] not in skipped:
                warnings.warn(f"skipping image: {got}", stacklevel=3)
                skipped.append(keys[i])
            continue
        if tuple(int(v) for v in got) != tuple(int(v) for v in sizes[i]):
            fix.append(i)
            new.append(got)
    if fix:
        writer.set_image_sizes(np.asarray(fix, np.int64), np.asarray(new, np.int64).reshape(-1, 2))
    return writer.image_sizes


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


class _SourceDataset(torch.utils.data.Dataset):
    """The images of ``source`` (:class:`fkdstore.sources.ImageSource`) with their stored ``sizes``
    ``(N, 2)``, each teacher batch announced to the source first (:meth:`__getitems__`: a remote source
    fetches the batch's bytes ahead of decoding)."""

    def __init__(self, source: ImageSource, sizes):
        self.source, self.sizes = source, np.asarray(sizes)

    def __len__(self):
        return len(self.source)

    def __getitems__(self, indices):
        self.source.prefetch(indices)
        return [self[i] for i in indices]

    def _size(self, i: int) -> tuple[int, int]:
        H, W = (int(v) for v in self.sizes[i])
        return H, W

    def _decode(self, i: int, what: str = "image", recorded: str = "its header (and the store) say"):
        """Image ``i`` decoded; :class:`ImageReadError` when its size is not the recorded one."""
        H, W = self._size(i)
        img = self.source.load(i)
        if img.size != (W, H):
            raise ImageReadError(f"{what} {self.source.name(i)} decodes to height x width {img.size[1]} x "
                                 f"{img.size[0]}, but {recorded} {H} x {W}")
        return img

    def _read(self, i: int):
        """``(image, None)``, or ``(None, message)`` when image ``i`` cannot be read (returned, not raised, so
        the main process decides between stop and skip)."""
        try:
            return self._decode(i), None
        except (ImageReadError, OSError) as e:
            return None, f"{e}" if isinstance(e, ImageReadError) else f"cannot read image {self.source.name(i)}: {e}"


class _CropDataset(_SourceDataset):
    """Item ``i``: image ``i``'s ``M`` crops as uint8 ``[M, 3, S, S]`` with their boxes and flips, or the
    read error (returned, not raised, so the main process decides between stop and skip). Images come
    from ``source`` (:class:`fkdstore.sources.ImageSource`), each teacher batch announced to it first
    (:meth:`__getitems__`: a remote source fetches the batch's bytes ahead of decoding).

    ``crops`` is anything with ``sample(index, height, width, M) -> (boxes, flips)``: the
    :class:`~fkdstore.seeded.SlotCropSampler`, crops replayed from another store or an
    augmentation pipeline (whose per-crop columns would travel next to boxes and flips) later.
    """

    def __init__(self, source: ImageSource, sizes, crops, M: int, replay: Replay, augment=None, seed: int = 0):
        super().__init__(source, sizes)
        self.crops, self.M, self.replay = crops, M, replay
        self.augment: _augment.Pipeline | None = augment if augment is not None and len(augment) else None
        self.seed = seed  # of the augmentation params (the crop sampler's seed)

    def __getitem__(self, i):
        img, msg = self._read(i)
        if img is None:
            return i, None, None, None, msg
        boxes, flips = self.crops.sample(i, *self._size(i), self.M)
        if self.augment is None:
            crops = replay_crops(img, boxes, flips, self.replay.input_size, self.replay.interpolation)
            return i, boxes, flips, crops, None
        try:
            params, crops = self._augmented(self.augment, i, img, boxes, flips)
        except (ImageReadError, OSError) as e:
            return i, None, None, None, f"image {self.source.name(i)}: {e}"
        return i, boxes, flips, (crops, params), None

    def _params(self, pipeline: _augment.Pipeline, i: int, slots) -> dict[str, np.ndarray]:
        """Slot params of image ``i``, sampled by ``pipeline`` from ``(seed, i, slot)`` (the crop sampler's
        seed), or the stored ones when the crops come from a store (:meth:`StoredCrops.params`)."""
        if isinstance(self.crops, StoredCrops):
            return self.crops.params(i, slots)
        return pipeline.sample(self.seed, i, slots, image_size=self.replay.input_size, num_images=len(self.source),
                               crops_per_image=self.M)

    def _augmented(self, pipeline: _augment.Pipeline, i: int, img, boxes, flips):
        """``(params, uint8 [M, 3, S, S])``: every slot replayed by :func:`fkdstore.augment.replay.replay_slots`;
        a mixing partner ``(j, t)`` (``t`` = the mixed slot) is image ``j`` decoded, its slot ``t``'s box/flip
        and sampled params."""
        params = self._params(pipeline, i, np.arange(self.M))
        decoded = {i: img}

        def partner(j: int, t: int) -> Partner:
            if j not in decoded:
                decoded[j] = self._decode(j, "mixing partner", "the store says")
            pboxes, pflips = self.crops.sample(j, *self._size(j), self.M)
            params_t = _augment.slot_params(self._params(pipeline, j, [t]), 0)
            return Partner(decoded[j], pboxes[t], bool(pflips[t]), params_t)

        hwc = replay_slots(pipeline, img, range(self.M), boxes, flips, params, self.replay.input_size,
                           self.replay.interpolation, partner)
        return params, torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))


class StoredCrops:
    """The crops of an existing store, for relabelling (``generate(..., crops_from=STORE)``): the
    ``crops`` object of :class:`_CropDataset`. ``sample(i, H, W, M)`` returns image ``i``'s stored boxes
    and flips; :meth:`aug` its stored aug columns. Built with :meth:`open`, which checks the source."""

    def __init__(self, reader: _reader.Reader):
        self.reader = _reader.as_regions(reader)
        self.path = reader.path
        h = reader.header
        self.sizes = np.asarray(reader.image_sizes, dtype=np.int64)
        self.aug_columns = list(h.aug)
        self.augment = h.augment
        self.pipeline = h.augment if len(h.augment) else None
        self.crop_sampler = h.sampler  # a seeded source gives a seeded output with the same sampler

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
            a = repr(src[j]) if j < len(src) else f"nothing (the source has only {len(src)} images)"
            b = repr(keys[j]) if j < len(keys) else f"nothing (the images list only {len(keys)})"
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
        """What the new store's ``meta`` records about the source."""
        m = self.reader.meta or {}
        return {**({"sampler": m["sampler"]} if "sampler" in m else {}),
                "crops_from": {"path": str(self.path), "teacher": m.get("teacher")}}


def _collate(items):
    """``(indices, [(index, error message)], (boxes, flips, crops, aug))`` of one batch of images; ``aug`` is
    ``{column: (B, M, *shape)}`` for an augmentation pipeline, else None."""
    ok = [it for it in items if it[4] is None]
    errors = [(it[0], it[4]) for it in items if it[4] is not None]
    if not ok:
        return np.zeros(0, np.int64), errors, (None, None, None, None)
    idx = np.asarray([it[0] for it in ok], dtype=np.int64)
    boxes = np.stack([it[1] for it in ok])
    flips = np.stack([it[2] for it in ok])
    aug = None
    if isinstance(ok[0][3], tuple):  # augmented items carry (crops, params)
        aug = {k: np.stack([it[3][1][k] for it in ok]) for k in ok[0][3][1]}
        crops = torch.stack([it[3][0] for it in ok])
    else:
        crops = torch.stack([it[3] for it in ok])
    return idx, errors, (boxes, flips, crops, aug)


def _worker_init(_):
    torch.set_num_threads(1)  # workers run Pillow; torch threads would only fight the teacher


def label_shards(forward: TeacherForward, writer: _writer.Writer, dataset: torch.utils.data.Dataset,
                 plan: ShardPlan, keys: Sequence[str], job: _Job, num_classes: int, skipped: list[str], *,
                 show_progress: bool | None, name: str) -> int:
    """Label every batch of ``plan`` and write it; returns the number of images labelled here.

    The record kind's steps (:attr:`_Job.work`) batch the dataset's items (``collate``: image indices, read
    errors, the rest) and label and write a batch (``put``). A shard is flushed after its last batch (so a
    shard with skipped images is written with what it has); unreadable images are raised
    (``on_error="stop"``) or appended to ``skipped``.
    """
    ex, work = job.execution, job.work
    loader: Iterable[Any] = [] if not plan.batches else torch.utils.data.DataLoader(
        dataset, batch_sampler=plan.batches, num_workers=ex.workers, collate_fn=work.collate,
        pin_memory=forward.use_cuda, worker_init_fn=_worker_init if ex.workers else None,
        prefetch_factor=4 if ex.workers else None,
    )
    bar = _progress.progress(ex.progress if show_progress else False, total=plan.num_images, unit="img",
                             desc=f"labelling {name}", dynamic_ncols=True, smoothing=0.05)
    per_image, unit = work.records_per_image(job), work.unit
    done = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for b, (idx, errors, rest) in enumerate(loader):
                _handle_read_errors(errors, keys, ex.on_error, skipped)
                if len(idx):
                    work.put(forward, writer, dataset, idx, rest, job, num_classes, keys)
                    done += len(idx)
                if b in plan.shard_ends:
                    writer.flush()
                bar.update(len(idx) + len(errors))
                bar.set_postfix_str(f"{done * per_image / max(time.perf_counter() - t0, 1e-9):,.0f} {unit}/s")
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
                some_keys: Sequence[str], images: np.ndarray) -> dict[str, Any]:
    """Codec fields for a batch of images' crops ``[B, M, 3, S, S]`` (uint8): the teacher runs on at most
    ``batch_size`` crops at a time; labels are ``softmax(logits / temperature)``, encoded by the codec, or,
    for a codec whose ``input`` is ``"logits"``, the teacher's logits themselves (float32).
    ``some_keys`` name the batch in errors (non-finite or wrongly shaped teacher output); ``images`` are the
    batch's image indices: a codec that draws (``sampled``) draws crop ``(i, s)`` from
    :func:`fkdstore.codecs.crop_keys` ``(i, s)``, so its labels do not depend on batching or resumption."""
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
    keys = _codecs.crop_keys(np.asarray(images, np.int64)[:, None], np.arange(M)[None, :])
    if codec.input == "logits":  # the temperature is chosen at load time (LabelSpec refuses one here)
        return codec.encode(logits.float().reshape(B, M, C), keys=keys)
    probs = torch.softmax(logits / job.labels.temperature, dim=-1).reshape(B, M, C)
    return codec.encode(probs, keys=keys)


# --------------------------------------------------------------------------------------------- 5b label maps


class _ImageDataset(_SourceDataset):
    """Item ``i``: image ``i`` whole, resized to the replay ``input_size`` (:func:`fkdstore.transforms.crop_resize`
    of the box covering the image, so a crop slot that covers the whole image gives the same pixels), uint8
    ``[3, h, w]``, or the read error (returned, not raised). Label maps are made from these (ReLabel runs its
    teacher on the whole image)."""

    def __init__(self, source: ImageSource, sizes, replay: Replay):
        super().__init__(source, sizes)
        self.replay = replay

    def __getitem__(self, i):
        img, msg = self._read(i)
        if img is None:
            return i, None, msg
        H, W = self._size(i)
        return i, crop_resize(img, (0, 0, H, W), False, self.replay.input_size, self.replay.interpolation), None


def _collate_images(items):
    """``(indices, [(index, error message)], images [B, 3, h, w] uint8 or None)`` of one batch."""
    ok = [it for it in items if it[2] is None]
    errors = [(it[0], it[2]) for it in items if it[2] is not None]
    if not ok:
        return np.zeros(0, np.int64), errors, None
    return np.asarray([it[0] for it in ok], dtype=np.int64), errors, torch.stack([it[1] for it in ok])


def label_maps(forward: TeacherForward, images: torch.Tensor, job: _Job, num_classes: int,
               some_keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K label maps ``(indices, scores)``, each ``[B, K, S, S]``, of whole images ``[B, 3, h, w]`` (uint8):
    the teacher runs on at most ``batch_size`` images at a time and must return class maps ``[B, C, S, S]``
    (raw scores; :func:`fkdstore.labelmap_torch.topk_maps` keeps the top ``K`` per cell). ``some_keys`` name
    the batch in errors (wrong shape, non-finite scores)."""
    spec, bs, B = job.labels.label_map, job.execution.batch_size, len(images)
    maps = torch.cat([forward(images[j:j + bs]) for j in range(0, B, bs)])
    want = (B, num_classes, spec.size, spec.size)
    if tuple(maps.shape) != want:
        raise ValidationError(f"teacher output must be class maps of shape (images, C, S, S) = {want}. "
                              f"Got {tuple(maps.shape)}.")
    if not torch.isfinite(maps).all():
        raise ValidationError(f"teacher returned non-finite scores for a batch of images {list(some_keys)}...")
    return topk_maps(maps, spec.k)


class _RegionWork:
    """Labelling steps of crop regions (FKD): M crops per image, the codec's soft labels (``put_fields``)."""

    unit = "crops"

    @staticmethod
    def records(job: _Job) -> dict[str, Any]:
        """:func:`fkdstore.write` arguments of the record kind."""
        spec = job.labels
        return {"crops_per_image": spec.crops_per_image, "codec": spec.codec, "augment": job.augment,
                "crop_sampler": None if spec.store_crops else job.sampler}

    @staticmethod
    def records_per_image(job: _Job) -> int:
        return job.labels.M

    @staticmethod
    def num_classes(forward: TeacherForward, job: _Job) -> int:
        return forward.num_classes()

    @staticmethod
    def dataset(listing: ImageSource, sizes, job: _Job, stored: StoredCrops | None) -> _CropDataset:
        return _CropDataset(listing, sizes, job.sampler if stored is None else stored, job.labels.M,
                            job.replay, augment=job.augment if stored is None else stored.pipeline,
                            seed=job.sampler.seed)

    collate = staticmethod(_collate)

    @staticmethod
    def put(forward, writer, dataset, idx, rest, job, num_classes, keys) -> None:
        boxes, flips, crops, aug = rest
        fields = label_batch(forward, crops, job, num_classes, [keys[i] for i in idx[:5]], idx)
        if aug is None and isinstance(dataset.crops, StoredCrops):
            aug = dataset.crops.aug(idx)  # a source's aug columns without an augment pipeline
        writer.put_fields(idx, boxes, flips, fields, aug=aug)


class _MapWork:
    """Labelling steps of label maps (ReLabel): the whole image once, its top-K class map (``put_maps``)."""

    unit = "images"

    @staticmethod
    def records(job: _Job) -> dict[str, Any]:
        return {"label_map": job.labels.label_map}

    @staticmethod
    def records_per_image(job: _Job) -> int:
        return 1

    @staticmethod
    def num_classes(forward: TeacherForward, job: _Job) -> int:
        """``C`` of the teacher's class map, measured on 2 black images at the input size; the map must be
        ``[2, C, S, S]`` with ``S = label_map.size`` and ``C >= K`` (ValidationError otherwise, nothing
        written)."""
        spec, size = job.labels.label_map, job.replay.input_size
        with torch.inference_mode():
            out = forward(torch.zeros((2, 3, *size), dtype=torch.uint8))
        if out.ndim != 4 or out.shape[0] != 2:
            raise ValidationError(
                f"a label-map teacher must return class maps [B, C, h, w] (e.g. "
                f"fkdstore.labelmap_torch.spatial_teacher(model): the classifier as a 1x1 conv over the last "
                f"feature map). For a batch of 2 images of {size[0]} x {size[1]} it returned {tuple(out.shape)}.")
        if tuple(out.shape[2:]) != (spec.size, spec.size):
            raise ValidationError(
                f"label_map.size must equal the teacher's class-map side: at input_size {size[0]} x {size[1]} the "
                f"teacher returns {out.shape[2]} x {out.shape[3]} maps. Got label_map.size={spec.size}; change "
                f"the size or the input_size.")
        return spec.check_num_classes(int(out.shape[1]))

    @staticmethod
    def dataset(listing: ImageSource, sizes, job: _Job, stored) -> _ImageDataset:
        return _ImageDataset(listing, sizes, job.replay)

    collate = staticmethod(_collate_images)

    @staticmethod
    def put(forward, writer, dataset, idx, images, job, num_classes, keys) -> None:
        indices, scores = label_maps(forward, images, job, num_classes, [keys[i] for i in idx[:5]])
        writer.put_maps(idx, indices, scores)


_WORK: dict[str, type[_RegionWork] | type[_MapWork]] = {S.REGIONS: _RegionWork, S.LABEL_MAP: _MapWork}
"""The record kind's labelling steps: write arguments, teacher check, dataset, batching, label + write."""


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
        old = S.parse_header(writer.group.attrs[S.ATTR_KEY]).meta  # the stored meta (history of earlier runs)
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
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def summary(reader: _reader.Reader, path, done: int, elapsed: float, skipped: list[str]) -> str:
    """One line: images labelled, store state, records (crops or maps), bytes per record on storage, time
    and throughput. ``path``: a folder or a Zarr store (local or remote: sizes from one listing through the
    store API)."""
    M = reader.header.records.records_per_image
    unit = "crops" if reader.header.kind == S.REGIONS else "maps"
    written = int(reader.written.sum())
    stats = _report.storage_stats(path)
    per_record = sum(d["bytes"] for k, d in stats.items()
                     if k not in ("_total", ".") and k not in reader.header.per_image_arrays)
    bpr = per_record / max(1, written * M)
    rate = done / elapsed if elapsed > 0 else 0.0
    state = "complete" if reader.complete else f"INCOMPLETE ({len(reader) - written} missing, {len(skipped)} skipped)"
    return (
        f"fkdstore generate: {done} images labelled ({written}/{len(reader)} in store, {state}), "
        f"{done * M} {unit}, {bpr:.1f} B/{unit[:-1]} on disk, {elapsed:.1f} s ({rate:.1f} img/s, "
        f"{rate * M:.0f} {unit}/s) -> {_storage.describe(path) if not isinstance(path, (str, os.PathLike)) else path}"
    )
