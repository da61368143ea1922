"""The ``fkdstore`` command line. It only parses arguments and calls the library.

Subcommands: ``inspect``, ``estimate``, ``verify``, ``convert``, ``import`` (``fkd``, ``mldr``, ``tinyvit``,
``sre2l``, ``relabel``), ``import-fkd`` (= ``import fkd``), ``prune``, ``ensemble``, ``generate``, ``show``. Every
command's code is here; the library modules hold no argparse code. Only ``generate``, ``show`` and ``import`` need
torch (the importers load ``torch.save`` files), and they import it when they run (``generate`` also for its
``--help``), so ``fkdstore --version``, ``inspect``, ``estimate``, ``verify``, ``convert``, ``prune`` and
``ensemble`` start without importing torch.

Exit codes (every command):

* ``0``: success.
* ``1``: the command ran and failed or found problems: a library error (bad store, schema mismatch,
  a value the library rejects, a missing file, ...), ``verify`` found problems, or ``generate`` left
  the store incomplete (skipped images).
* ``2``: usage or bad input on the command line, rejected before anything runs: an unknown option, a
  missing argument, a value of the wrong form (not an integer, an integer out of range, not a JSON
  object), a codec or augment spec the library refuses, a local path that does not exist (a store, an
  image folder, weights), ``--out`` naming a file, a ``--teacher`` that does not import, ``--device cuda``
  without CUDA. Integer options are checked by the same functions as the library's keyword arguments
  (:mod:`fkdstore.validation`), specs by the library's own parsers.
* ``130``: interrupted (Ctrl-C); ``generate`` says how many images are written and that rerunning the same
  command resumes.

Errors print as one line, ``fkdstore: error: <message>`` (bad input: ``fkdstore COMMAND: error: <option>
<value>: <message>``); ``--debug`` (anywhere on the line) prints the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import traceback
from typing import Any

from . import __version__
from .errors import FkdstoreError, ValidationError
from .validation import non_negative_int, positive_int

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """A sub-command parser whose epilog may be computed when help is shown (``lazy_epilog``), so that building
    the parser (every run, ``--version`` included) imports nothing heavy."""

    def __init__(self, *args, lazy_epilog=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy_epilog = lazy_epilog

    def format_help(self) -> str:
        if self._lazy_epilog is not None and self.epilog is None:
            self.epilog = self._lazy_epilog()
        return super().format_help()


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _BadInput(Exception):
    """A value on the command line the library refuses, found before anything runs (exit code 2)."""


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _must_exist(path, what: str) -> None:
    """A local ``path`` (not a URL) must exist; the message names it and says so."""
    if not _is_url(path) and not os.path.exists(path):
        raise _BadInput(f"{what} {str(path)!r} does not exist")


def _checked(option: str, value, parse):
    """``parse(value)``, a library parser; its ValidationError/TypeError becomes bad input naming the option
    and the value as typed."""
    try:
        return parse(value)
    except (ValidationError, TypeError) as e:
        raise _BadInput(f"{option} {value!r}: {e}") from None


def _codec_arg(option: str, spec: str, k=None):
    from .codecs import as_codec

    return _checked(option, spec, lambda v: as_codec(v, k=k))


# --------------------------------------------------------------------------------------------- handlers
def _cmd_inspect(args) -> int:
    from . import report

    _must_exist(args.path, "store")
    if args.image is not None:
        from . import diagnose, reader

        r = reader.open(args.path, storage_options=args.storage_options)
        kind = report.kind_report(r.header.kind)  # crop slots, or the image's label map
        d = kind.image(r, args.image, top_k=args.top_k)
        names = diagnose.store_names(r, args.names)
        _out(json.dumps(d, indent=2) if args.json else kind.format_image(d, names))
        return EXIT_OK
    d = report.inspect(args.path, sample=args.sample, seed=args.seed, storage_options=args.storage_options,
                       plots=args.plots)
    _out(json.dumps(d, indent=2, sort_keys=False) if args.json else report.format_inspect(d))
    return EXIT_OK


def _cmd_show(args) -> int:
    from .show import write_sheet  # torch: imported only when this command runs

    images = args.images[0] if len(args.images) == 1 and os.path.isdir(args.images[0]) else args.images
    out = write_sheet(args.path, images, args.out, grid=args.grid, keys=args.keys, slots=args.slots, seed=args.seed,
                      names=args.names, top_k=args.top_k, zoom=args.zoom, storage_options=args.storage_options)
    from .show import sheet_info

    layout, cells = sheet_info(out)
    _out(f"wrote {out}: {len(cells)} crops in {layout.rows} x {layout.cols} cells, {layout.size[0]} x "
         f"{layout.size[1]} px")
    return EXIT_OK


def _cmd_estimate(args) -> int:
    from . import report

    if (args.label_map is None) == (args.crops is None or args.codec is None):
        _err("fkdstore estimate: error: give --crops M and --codec (FKD crop regions) or --label-map S,K[,dtype] "
             "(ReLabel label maps)")
        return EXIT_USAGE
    if args.label_map is None:
        _codec_arg("--codec", args.codec, args.k)
    if args.label_map is not None:
        from . import report_maps

        e = report_maps.estimate_map_bytes(args.num_images, args.num_classes,
                                           report_maps.parse_map_shape(args.label_map))
        if args.json:
            m = e["label_map"]
            e["paper_table2"] = report_maps._paper_figures(m["size"], m["k"], e["num_classes"])
    else:
        e = report.estimate_bytes(args.num_images, args.crops, args.num_classes, args.codec, args.k,
                                  max_side=args.max_side, store_crops=args.store_crops)
        if args.json:
            e["paper_table2"] = report.paper_table2(e["codec"])
    _out(json.dumps(e, indent=2) if args.json else report.format_estimate(e, paper=args.paper))
    return EXIT_OK


def _cmd_verify(args) -> int:
    from . import verification

    _must_exist(args.path, "store")
    problems = verification.verify(args.path, progress=args.progress, storage_options=args.storage_options)
    if args.json:
        _out(json.dumps({"path": args.path, "ok": not problems, "problems": problems}, indent=2))
    else:
        _out(verification.summary(args.path, problems))
    return EXIT_OK if not problems else EXIT_ERROR


def _cmd_convert(args) -> int:
    from . import conversion, report

    _must_exist(args.src, "source store")
    _codec_arg("--codec", args.codec)
    _check_out(args.dst)
    r = conversion.convert(args.src, args.dst, args.codec, k=args.k, progress=args.progress,
                        storage_options=args.storage_options)
    _out(f"converted {r['images']:,} images {_cfg(r['from'])} -> {_cfg(r['to'])}: "
         f"{report.human_bytes(r['bytes_before'])} -> {report.human_bytes(r['bytes_after'])}"
         + (f" ({r['missing']:,} images were not written in the source)" if r["missing"] else ""))
    return EXIT_OK


def _cmd_import_fkd(args) -> int:
    from . import importers, report

    _must_exist(args.src, "FKD label folder")
    _must_exist(args.images, "--images folder")
    _check_out(args.dst)
    r = importers.import_fkd(args.src, args.dst, args.images, codec=args.codec, k=args.k, num_classes=args.num_classes,
                           trust_pickle=args.trust_pickle, progress=args.progress, log=_err,
                           storage_options=args.storage_options)
    _out(f"imported {r['files']:,} FKD label files ({r['crops_per_image']} crops each, {r['num_classes']} classes, "
         f"coords {r['coords_dtype']}) as {_cfg(r['codec'])}: "
         f"{report.human_bytes(r['bytes_before'])} in {r['files']:,} files -> {report.human_bytes(r['bytes_after'])}")
    if r["images_without_labels"]:
        _out(f"  {r['images_without_labels']:,} images in the image folder have no label file and were left out")
    if r["boxes_clamped"]:
        _out(f"  {r['boxes_clamped']:,} boxes reached outside their image after FKD's rounding and were clipped")
    return EXIT_OK


ZOO_NAMES = {"fkd": "FKD label files", "mldr": "ml-dr record files", "tinyvit": "TinyViT logits files",
             "sre2l": "SRe2L/LPLD batch files"}


def _cmd_import(args) -> int:
    from . import importers, report

    if args.kind == "fkd":
        return _cmd_import_fkd(args)
    if args.kind == "relabel":
        return _cmd_import_relabel(args)
    _must_exist(args.src, f"{ZOO_NAMES[args.kind][:-6]} folder")
    _check_out(args.dst)
    common = dict(codec=args.codec, k=args.k, num_classes=args.num_classes, order=args.order,
                  progress=args.progress, log=_err, storage_options=args.storage_options)
    if args.kind == "mldr":
        r = importers.import_mldr(args.src, args.dst, args.images, densify=args.densify,
                                  trust_pickle=args.trust_pickle, **common)
    elif args.kind == "tinyvit":
        r = importers.import_tinyvit(args.src, args.dst, args.images, epochs=args.epochs, mixing=args.mixing,
                                     keys=args.keys, input_size=args.input_size, timm_config=args.timm_config,
                                     scratch_dir=args.scratch_dir, **common)
    else:
        r = importers.import_sre2l(args.src, args.dst, args.images, fkd_seed=args.fkd_seed,
                                   batch_size=args.batch_size, epochs=args.epochs, tail=args.tail,
                                   input_size=args.input_size, interpolation=args.interpolation,
                                   trust_pickle=args.trust_pickle, scratch_dir=args.scratch_dir, **common)
    _out(f"imported {r['files']:,} {ZOO_NAMES[args.kind]} ({r['images']:,} images x {r['crops_per_image']} crops, "
         f"{r['num_classes']} classes) as {_cfg(r['codec'])}: {report.human_bytes(r['bytes_before'])} -> "
         f"{report.human_bytes(r['bytes_after'])}" + (" (resumed)" if r.get("resumed") else ""))
    _import_details(r)
    return EXIT_OK


def _import_details(r: dict) -> None:
    """The lines after an import's summary: what was carried into which column, notes, what was skipped."""
    for what, col in r["carried"].items():
        _out(f"  carried  {what} -> {col}")
    for flag in r["flags"]:
        _out(f"  note     {flag}")
    for what, n in r["skipped"].items():
        if n:
            _out(f"  skipped  {n:,} {what.replace('_', ' ')}")


def _check_out(out: str, what: str = "the output") -> None:
    """An output store location: a URL, a new path, or a folder (an existing file is refused)."""
    if not _is_url(out) and os.path.isfile(out):
        raise _BadInput(f"{what} {out!r} is a file; give a folder (new, empty, or a store to resume) or a URL")


def _cmd_import_relabel(args) -> int:
    from . import importers, report

    _must_exist(args.src, "label map folder")
    _check_out(args.dst)
    r = importers.import_relabel(args.src, args.dst, args.images, system=args.system, num_classes=args.num_classes,
                                 missing=args.missing, progress=args.progress, log=_err,
                                 storage_options=args.storage_options, **map_replay_options(args))
    spec = r["label_map"]
    _out(f"imported {r['files']:,} {args.system} label maps ({r['images']:,} images, K={spec['k']}, S={spec['size']}, "
         f"{spec['dtype']}, {r['num_classes']} classes) as a label-map store: "
         f"{report.human_bytes(r['bytes_before'])} -> {report.human_bytes(r['bytes_after'])}"
         + (" (resumed)" if r.get("resumed") else ""))
    _import_details(r)
    return EXIT_OK


def _cmd_generate(args) -> int:
    try:
        import torch  # noqa: F401 - only to say what is missing before anything else
    except ImportError as e:
        raise FkdstoreError(f"fkdstore generate needs PyTorch, which does not import here ({e}); install it with "
                            "pip install 'fkdstore[torch]'") from None
    from .runner import generate
    from .teacher import file_sha256, load_teacher

    # bad input first (exit 2), before the teacher is built or anything is written
    label_map = getattr(args, "label_map", False)
    usage = _generate_usage(args, label_map)
    if usage:
        _err(f"fkdstore generate: error: {usage}")
        return EXIT_USAGE
    codec = None if label_map else _generate_codec(args)
    _check_generate_inputs(args)

    kwargs = args.teacher_kwargs
    teacher = load_teacher(args.teacher, args.weights, kwargs)
    options = generate_options(args)
    options.setdefault("teacher_name", args.teacher + (f"({json.dumps(kwargs, sort_keys=True)})" if kwargs else ""))
    if args.weights and "weights_sha256" not in options:
        options["weights_sha256"] = file_sha256(args.weights)
    one = args.images[0] if len(args.images) == 1 else None  # a folder or a URL prefix; else files or tar shards
    images = one if one is not None and (os.path.isdir(one) or "://" in one) else args.images
    try:
        if label_map:
            teacher, spec = _label_map_spec(teacher, args, options)
            reader = generate(teacher, images, args.out, label_map=spec, **options)
        else:
            reader = generate(teacher, images, args.out, crops_per_image=args.crops_per_image, codec=codec, **options)
    except KeyboardInterrupt:
        _err(f"fkdstore generate: interrupted; {_written_summary(args.out, options.get('storage_options'))}")
        return EXIT_INTERRUPTED
    if not reader.complete:
        _err(f"fkdstore generate: store {args.out} is incomplete: {int((~reader.written).sum())} images missing "
             f"(skipped: {len(reader.meta.get('skipped', []))})")
        return EXIT_ERROR
    return EXIT_OK


def _generate_usage(args, label_map: bool) -> str | None:
    """What is wrong with ``generate``'s choice of record kind (``--crops`` or ``--label-map``), or None."""
    if label_map == ("crops_per_image" in args):
        return "give --crops M (FKD crop regions) or --label-map (ReLabel label maps), exactly one"
    given = [f"--{n}" for n in ("codec", "k", "dtype") if n in args] if label_map else []
    if given:
        return f"{', '.join(given)} apply to crop regions; with --label-map use --map-k, --map-dtype"
    return None


def _generate_codec(args):
    """``generate``'s codec: ``--codec`` (a name or a spec such as ``"ms:k=5,dtype=q8"``, default ms) with
    ``--k`` and ``--dtype``."""
    from .codecs import as_codec

    codec = _codec_arg("--codec", getattr(args, "codec", "ms"), getattr(args, "k", None))
    if getattr(args, "dtype", None) is not None:
        codec = as_codec({**codec.get_config(), "dtype": args.dtype})
    return codec


def _check_generate_inputs(args) -> None:
    """``generate``'s paths, augment spec, teacher factory, output and device, checked before the teacher is
    built (:class:`_BadInput`, exit 2)."""
    from .augment import parse_augment
    from .distributed import World, pick_device
    from .teacher import resolve_factory

    for path in args.images:
        _must_exist(path, "--images")
    if getattr(args, "augment", None):
        _checked("--augment", args.augment, parse_augment)
    _checked("--teacher", args.teacher, resolve_factory)
    if args.weights:
        _must_exist(args.weights, "--weights")
    if getattr(args, "crops_from", None):
        _must_exist(args.crops_from, "--crops-from store")
    _check_out(args.out, "--out")
    if getattr(args, "device", None) is not None:
        _checked("--device", args.device, lambda d: pick_device(d, World.detect()))


def _written_summary(out: str, storage_options) -> str:
    """How much of the store ``out`` is written, and how to go on (after an interrupted ``generate``)."""
    from . import reader

    try:
        with reader.open(out, storage_options=storage_options) as r:
            done, total = int(r.written.sum()), r.num_images
    except Exception:  # noqa: BLE001 - not created yet, or unreadable: say what can be said
        return f"the store {out} was not created yet; rerun the same command to start again"
    return (f"{done:,} of {total:,} images are written in {out} (whole shards only); rerun the same command to "
            f"resume: written images are kept, the rest are labelled")


def _label_map_spec(teacher, args, options: dict):
    """``(teacher, LabelMapSpec)`` of ``generate --label-map``: the teacher as a label-map teacher
    (:func:`fkdstore.labelmap_torch.spatial_teacher`, or as given when it is not a recognised classifier) and
    the spec from the options, ``--map-size`` defaulting to the side of its class map at the input size."""
    from .labelmap import LabelMapSpec
    from .labelmap_torch import class_map_shape, spatial_teacher
    from .runner import option_default

    teacher = spatial_teacher(teacher, passthrough=True)
    size = getattr(args, "map_size", None)
    if size is None:
        _, h, w = class_map_shape(teacher, options.get("input_size", option_default("input_size")))
        size = h if h == w else None
        if size is None:
            raise ValidationError(f"the teacher's class map is {h} x {w}, not square; give --map-size")
    spec = LabelMapSpec(size=size, k=getattr(args, "map_k", None) or 5, dtype=getattr(args, "map_dtype", None)
                        or "float32", box_order=map_replay_options(args).pop("box_order", "xy"),
                        **{k: v for k, v in map_replay_options(args).items() if k != "box_order"})
    return teacher, spec


def _cmd_prune(args) -> int:
    from . import conversion, report

    _must_exist(args.src, "source store")
    _check_out(args.dst)
    r = conversion.prune(args.src, args.dst, keep=args.keep, seed=args.seed, rule=args.rule, progress=args.progress,
                      storage_options=args.storage_options)
    _out(f"pruned {r['images']:,} images to {r['crops_per_image']} of {r['crops_per_image_before']} slots each "
         f"(rule {r['rule']}" + (f", seed {r['seed']}" if r["rule"] == "random" else "") + "): "
         f"{report.human_bytes(r['bytes_before'])} -> {report.human_bytes(r['bytes_after'])}"
         + (f" ({r['missing']:,} images were not written in the source)" if r["missing"] else ""))
    return EXIT_OK


def _cmd_ensemble(args) -> int:
    from . import conversion, report

    if len(args.stores) < 3:
        _err(f"fkdstore ensemble: error: give at least two stores and then OUT. Got {len(args.stores)} path(s).")
        return EXIT_USAGE
    for src in args.stores[:-1]:
        _must_exist(src, "store")
    if args.codec is not None:
        _codec_arg("--codec", args.codec)
    _check_out(args.stores[-1])
    r = conversion.ensemble(args.stores[:-1], args.stores[-1], codec=args.codec, progress=args.progress,
                         storage_options=args.storage_options)
    _out(f"ensembled {len(r['sources'])} stores over {r['images']:,} images as {_cfg(r['codec'])}: "
         f"{report.human_bytes(r['bytes_after'])} -> {args.stores[-1]}"
         + (f" ({r['missing']:,} images were not written in the sources)" if r["missing"] else ""))
    return EXIT_OK


# generate's options passed through to fkdstore.generate() under the same name, only when given: the
# library's signature is the one home of their defaults (shown in ``fkdstore generate --help``).
GENERATE_OPTIONS = (
    "input_size", "batch_size", "temperature", "mean", "std", "interpolation", "device", "num_workers",
    "on_error", "images_per_shard", "num_classes", "amp", "progress", "teacher_name", "weights_sha256",
    "augment", "crops_from", "storage_options", "store_crops", "class_labels",
)
SAMPLER_OPTIONS = ("seed", "scale", "ratio", "flip_p")  # fields of the crop sampler (SlotCropSampler)


def generate_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`fkdstore.generate` given on the command line (sequences as tuples);
    ``--seed``, ``--scale``, ``--ratio``, ``--flip-p`` build its ``crop_sampler``."""
    out = {}
    for name in GENERATE_OPTIONS:
        if hasattr(args, name):  # given (generate's options default to SUPPRESS)
            v = getattr(args, name)
            out[name] = tuple(v) if isinstance(v, list) else v
    sampler: dict[str, Any] = {n: tuple(v) if isinstance(v, list) else v for n in SAMPLER_OPTIONS
               if (v := getattr(args, n, None)) is not None}
    if sampler:
        from .seeded import SlotCropSampler

        out["crop_sampler"] = SlotCropSampler(**sampler)
    return out


def _cfg(cfg: dict) -> str:
    return cfg["name"] + (f" K={cfg['k']}" if cfg.get("k") is not None else "")


# --------------------------------------------------------------------------------------------- parser
INSPECT_HELP = """\
Show what a store holds: arrays (shape, dtype, chunk and shard shape, stored bytes, compression ratio),
total size, bytes per crop, files, completion, codec, sampler and teacher provenance, label statistics on
a seeded sample of crops, and the size at ImageNet-1K scale next to the paper's Table 2.

--json prints one object with the keys: path, format, format_version, kind (the record kind: regions or label_map),
store_id, library_version, codec (the codec config: name and parameters), crops ("stored" or "seeded"),
crop_sampler, num_images, crops_per_image, num_classes, aug (the augmentation columns), augment (the policy
configs), replay, pixel_replay, has_labels, images_per_chunk, images_per_shard, images_written, complete,
missing_ranges, arrays{name: shape, dtype, chunks, shards, raw_bytes, stored_bytes, files, compression_ratio},
total_bytes, total_files, bytes_per_crop, label_bytes_per_crop, box_bytes_per_crop, aug_bytes_per_crop, meta,
sampler, teacher, label_stats{sampled_crops, seed, kept_mass_mean, entropy_mean_nats, top1_agreement,
top1_agreement_crops, distinct_top1, top1_prob_mean}, compatibility (data types some Zarr readers lack: dtype,
arrays, note), warnings[{code, message, ...}], imagenet_extrapolation{num_images, crops_per_image, bytes,
paper_formula_bytes, paper_table2}, and with --plots: plots (sizes in bytes; see fkdstore.report).

warnings (text: "warning" lines; JSON: the "warnings" list; rules and thresholds in fkdstore.diagnose):
  top1_agreement  teacher top-1 = ground truth on fewer than half as many sampled crops as the mean top-1
                  probability (hard labels: not above chance): a likely class-order or preprocessing mismatch
  normalization   meta mean/std outside [0, 1] / [0.05, 1] (e.g. given in 0-255 units), swapped, or BGR
  fallback_crops  over 10% of sampled crops are RandomResizedCrop's centre-crop fallback

--plots DIR writes PNG plots there (Pillow): confidence.png and entropy.png (histograms of the sampled
crops' decoded top-1 probability and entropy), agreement.png (top-1 agreement per ground-truth class),
crop_area.png and crop_aspect.png (box area fraction and aspect ratio against the sampler's scale and ratio
ranges), bytes.png (stored bytes per component); see fkdstore.plots.

--image KEY prints one image's slots instead (KEY: an image key of the store, or an index): box, flip,
augmentation params, mixing partners and the top-K classes with their probabilities (--json: the
fkdstore.diagnose.image_slots dict).

examples:
  fkdstore inspect labels.zarr
  fkdstore inspect labels.zarr --json --sample 10000 --seed 1 > stats.json
  fkdstore inspect labels.zarr --plots plots/
  fkdstore inspect labels.zarr --image n01440764/n01440764_10026.JPEG --top-k 5 --names classes.txt
"""

SHOW_HELP = """\
Draw a contact sheet (PNG) of replayed crops with their soft labels: for chosen or random images and slots,
each crop exactly as TorchDataset(normalize=False) returns it (augmentation and mixing included), the
image with the crop's box, the partner image for mixed slots, the image key, slot, flip, box, ground-truth
class, the top-K classes with their probabilities and, for mixed slots, lam and the partner's class and
weight. Class names: --names FILE (one per line, line c names class c), else the image folder's class
folders, else the store's meta["classes"]. Needs torch. The PNG's "fkdstore-sheet" text chunk records the
layout and the (image, slot) of every cell (fkdstore.show.sheet_info); tile positions: fkdstore.show.

examples:
  fkdstore show labels.zarr --images /data/imagenet/train --out sheet.png
  fkdstore show labels.zarr --images train/ --grid 2x6 --image n01440764/n01440764_10026.JPEG --seed 1
  fkdstore show labels.zarr --images train/ --image 0 17 --slots 0 1 2 --names classes.txt
"""

ESTIMATE_HELP = """\
Predict a store's size before writing it. By default this library's layout: raw bytes of each array times
a compression ratio measured on stores written from teacher-like distributions (fkdstore.report.CALIBRATION),
plus index and metadata overhead. --paper instead applies the paper's Table 2 formula, every value float32:
images x crops x (4 coordinates + 1 flip + L label values) x 4 bytes, L = 1 hard, 2 smoothing, 2K ms/mr,
C full. The paper prints GiB as "GB".

Label maps (ReLabel): --label-map S,K[,DTYPE] instead of --crops and --codec: K x S x S uint16 class ids and
float32 (or float16) scores per image (ratios fkdstore.report_maps.MAP_CALIBRATION), next to ReLabel's
per-image .pt files; --paper gives Table 2's ReLabel columns: full maps N x S x S x C x 4 bytes (~1 TB) and
top-K maps N x S x S x 2K x 4 bytes (10 GB), with fkdstore's size for the same top-K maps.

examples:
  fkdstore estimate --num-images 1281167 --crops 200 --num-classes 1000 --codec ms --k 5
  fkdstore estimate --num-images 1200000 --crops 200 --num-classes 1000 --codec smoothing --paper
  fkdstore estimate --num-images 1200000 --num-classes 1000 --label-map 15,5 --paper
"""

VERIFY_HELP = """\
Read every chunk of a store (crc32c checksums), check every image is written, boxes lie inside the recorded
image sizes, decoded distributions are valid and attributes agree with the arrays. Exit code 0 when clean;
1 with the list of every problem found (a corrupted chunk is named by array, shard file and chunk).

examples:
  fkdstore verify labels.zarr
  fkdstore verify labels.zarr --json
"""

CONVERT_HELP = """\
Re-encode a store into a leaner codec without the teacher: full -> ms/mr top-K -> smoothing -> hard, and
ms <-> mr at the same or smaller K (both keep the raw top-K probabilities, so this is exact). Boxes, flips,
aug, keys, sizes, labels and provenance are copied; the conversion is appended to meta["history"].
Conversions that need information the source lacks (hard -> smoothing, ms K=5 -> K=10, smoothing -> ms K=5,
anything -> full) are refused with the reason.

examples:
  fkdstore convert labels-full.zarr labels-ms5.zarr --codec ms --k 5
  fkdstore convert labels-ms10.zarr labels-mr5.zarr --codec mr --k 5
  fkdstore convert labels-ms5.zarr labels-hard.zarr --codec hard
"""

IMPORT_HELP = """\
Import FKD's release layout: one torch.save file per image at SRC/<class>/<stem>.tar (or .pth.tar; SRC may
also be the root above the split folder), each [coords (M,4) normalised (top/H, left/W, h/H, w/W),
flip (M,), labels ((M,2,K) top-K, (M,2) smoothing or (M,) hard)]. Each file is matched to the image
IMAGES/<class>/<stem>.* whose size turns the coordinates into integer pixel boxes with FKD's own replay
rule (Pillow crop rounding). Pass --num-classes 1000 for ImageNet-1K: without it the class count is the largest
stored index + 1, found by an extra pass. Files are loaded with torch.load(weights_only=True), which
executes no code; --trust-pickle allows arbitrary pickles (runs code from the files: trusted input only).

examples:
  fkdstore import-fkd FKD_soft_label_500crops_marginal_smoothing_k_5/imagenet/train labels.zarr \\
      --images /data/imagenet/train --num-classes 1000
  fkdstore import-fkd fkd_labels/ labels-mr.zarr --images imgs/ --codec mr --k 3 --num-classes 1000
"""


IMPORT_ZOO_HELP = """\
Import a label set written by another system into a new store, bound to the images by key (so it trains at
any batch size, worker count or rank count), with every augmentation parameter the files hold as a column
that fkdstore replays with the same pixels as the system's own loader (or refused, naming it). Streaming
with bounded memory; a rerun after a kill continues the store it left; an error removes the store it made.
Pickled files are loaded with torch.load(weights_only=True) (or a loader as restricted), which executes no
code; --trust-pickle allows arbitrary pickles (trusted input only). Kinds:

  fkd      FKD's release (one .tar per image; same as 'fkdstore import-fkd')
  mldr     Apple ml-dr: SRC holds config.pth.tar and {id}.pth.tar per dataset index (NS records each);
           several SRC folders merge (their records add up per image)
  tinyvit  TinyViT (microsoft/Cream): SRC holds logits_top{K}_epoch{E}/rank{R}-keys.txt + -values.bin;
           the 4-byte seeds replay timm's pipeline, which fkdstore cannot: the store keeps them (policy
           external_seed) and TorchDataset needs external_replay=; labels load as usual
  sre2l    SRe2L / CDA (epoch_{e}/batch_{b}.tar, bound by torch's RandomSampler order seeded --fkd-seed),
           LPLD (plus sampler_indices_epoch.json), LPQLD (flat batch_{n}.tar + sampler_indices_batch.json)
  relabel  ReLabel (naver-ai/relabel_imagenet) or, with --system tokenlabeling, TokenLabeling label maps:
           SRC/<synset>/<stem>.pt per image, a [2, K, S, S] tensor (top-K scores, class ids as floats);
           a label-map store (TorchDataset pools each crop's label from it)

examples:
  fkdstore import mldr reinforced_data/ labels.fkd --images /data/imagenet/training
  fkdstore import tinyvit teacher_logits/ in22k.fkd --images /data/in22k --keys stem --num-classes 21841
  fkdstore import sre2l FKD_cutmix_fp16/ sre2l.fkd --images syn_data/ --fkd-seed 42
  fkdstore import sre2l FKD_cutmix_fp16_LPQLD/ lpqld.fkd --images syn_data/ --num-classes 1000 --tail renorm
  fkdstore import relabel imagenet_efficientnet_l2_sz475_top5/ relabel.zarr --images /data/imagenet/train
  fkdstore import relabel token_labels/ tl.zarr --images /data/imagenet/train --system tokenlabeling
  fkdstore import fkd FKD_soft_label_500crops_marginal_smoothing_k_5/imagenet/train labels.fkd \\
      --images /data/imagenet/train --num-classes 1000
"""


PRUNE_HELP = """\
Write a smaller store keeping M' = max(1, round(M * KEEP)) of each image's M crop slots: boxes, flips, aug
columns and label fields of the kept slots are copied bit for bit (in slot order); keys, sizes, labels,
codec and provenance are copied and the prune is appended to meta["history"]. TorchDataset on the result
samples among the M' kept slots. Rules: random (seeded per image from (--seed, image index) only) or
confident (the slots whose decoded soft label has the lowest entropy, ties by slot index). Only written
images are copied. Refused (exit 1, nothing written): KEEP not in (0, 1], a store whose augment pipeline
mixes slots (mixup, cutmix), a destination that exists and is not empty.

examples:
  fkdstore prune labels.zarr labels-quarter.zarr --keep 0.25 --seed 0
  fkdstore prune labels.zarr labels-confident.zarr --keep 0.5 --rule confident
"""

ENSEMBLE_HELP = """\
Average the decoded soft labels of stores that share crops (the same image keys, sizes, M, boxes, flips and
aug columns: e.g. a store and its relabelling by another teacher, made with fkdstore generate --crops-from)
and write the mean, re-encoded with --codec (default: the first store's codec), to OUT (the last argument).
Stores whose crops differ are refused (exit 1, nothing written), naming the first differing image index,
key, slot and array (box, flip or aug/<name>). The ensemble is appended to meta["history"] with the sources
and their teachers.

examples:
  fkdstore generate --images train/ --teacher m:teacher2 --out b.zarr --crops-from a.zarr --crops 200 --codec full
  fkdstore ensemble a.zarr b.zarr ab.zarr --codec ms:k=10
"""


STORAGE_HELP = """
stores on object storage:
  Every store argument may be a URL instead of a folder: s3://BUCKET/PATH (installed with fkdstore[s3]),
  or gs://, az://, ... with the fsspec package for that scheme. Credentials come from the environment,
  as for the cloud's own tools, and are best kept there (not on the command line, where ps and the shell
  history show them):
    s3://  AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or AWS_PROFILE; an
           S3-compatible server (MinIO, Ceph, ...) via AWS_ENDPOINT_URL
    gs://  GOOGLE_APPLICATION_CREDENTIALS
    az://  AZURE_STORAGE_ACCOUNT_NAME + AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN)
  --storage-options JSON passes fsspec options for the URL(s), e.g. '{"endpoint_url": "http://minio:9000",
  "profile": "labels"}'. A bad URL, a missing bucket or refused credentials end with one error line.
"""


def _add_storage_options(q) -> None:
    """``--storage-options JSON``: the one spelling of fsspec options for every command that takes a store
    (no explicit default: None, or absent under ``generate``'s ``argument_default=SUPPRESS``)."""
    q.add_argument("--storage-options", type=_json_object, metavar="JSON",
                   help="fsspec options for store URLs, a JSON object (endpoint_url, profile, ...); "
                        "credentials: see 'stores on object storage' above")


def _add_progress(q) -> None:
    """``--progress`` / ``--no-progress`` of the commands that report progress (default None: automatic)."""
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress: a bar on a terminal, periodic lines otherwise (default); --no-progress: none")


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``fkdstore`` parser and its sub-command action (one ``_add_<command>`` function per command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p = argparse.ArgumentParser(
        prog="fkdstore", formatter_class=_Formatter, parents=[common],
        description="Zarr v3 store for Fast Knowledge Distillation soft labels.",
        epilog="run 'fkdstore COMMAND --help' for a command's options and examples",
    )
    p.add_argument("--version", action="version", version=f"fkdstore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, help_, desc):
        return sub.add_parser(name, help=help_, description=desc, formatter_class=_Formatter, parents=[common])

    _add_inspect(add)
    _add_show(add)
    _add_estimate(add)
    _add_verify(add)
    _add_convert(add)
    _add_import_fkd(add)
    _add_import(add)
    _add_prune(add)
    _add_ensemble(add)
    _add_generate(sub, common)
    return p, sub


def _add_inspect(add) -> None:
    """``fkdstore inspect PATH``."""
    q = add("inspect", "show a store's arrays, sizes, provenance and label statistics", INSPECT_HELP + STORAGE_HELP)
    q.add_argument("path", help="store folder or URL")
    _add_storage_options(q)
    q.add_argument("--json", action="store_true", help="print one JSON object (keys above)")
    q.add_argument("--sample", type=_nonneg_int, default=4096, help="crops sampled for label statistics (default 4096)")
    q.add_argument("--seed", type=int, default=0, help="seed of the crop sample (default 0)")
    q.add_argument("--plots", metavar="DIR", default=None, help="also write PNG plots into DIR (see above)")
    q.add_argument("--image", metavar="KEY", default=None, help="print this image's slots instead (a key or an index)")
    q.add_argument("--top-k", type=_pos_int, default=5, help="classes per slot with --image (default 5)")
    q.add_argument("--names", metavar="FILE", default=None,
                   help="class names with --image, one per line (default: the store's meta['classes'])")
    q.set_defaults(func=_cmd_inspect)


def _add_show(add) -> None:
    """``fkdstore show PATH --images ...``."""
    q = add("show", "draw replayed crops with their soft labels (a PNG contact sheet)", SHOW_HELP + STORAGE_HELP)
    q.add_argument("path", help="store folder or URL")
    q.add_argument("--images", required=True, nargs="+", metavar="DIR|FILE",
                   help="the image folder (or files) the store was made from")
    q.add_argument("--out", default="sheet.png", metavar="PNG", help="the sheet to write (default sheet.png)")
    q.add_argument("--grid", type=_grid, default=None, metavar="RxC",
                   help="rows x columns of crops (default 4x4, or fewer when fewer are asked for)")
    q.add_argument("--image", dest="keys", nargs="+", action="extend", default=None, metavar="KEY",
                   help="images to show (keys or indices; default: random written images)")
    q.add_argument("--slots", nargs="+", action="extend", type=_nonneg_int, default=None, metavar="S",
                   help="slots to show of each image (default: random)")
    q.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the random images and slots (default 0)")
    q.add_argument("--names", metavar="FILE", default=None, help="class names, one per line")
    q.add_argument("--top-k", type=_pos_int, default=3, help="classes listed per crop (default 3)")
    q.add_argument("--zoom", type=_pos_int, default=None,
                   help="repeat each crop pixel ZxZ (default: crops of at least 128 px)")
    _add_storage_options(q)
    q.set_defaults(func=_cmd_show)


def _add_estimate(add) -> None:
    """``fkdstore estimate --num-images N --num-classes C ...``."""
    q = add("estimate", "predict a store's size (this layout, or the paper's formula)", ESTIMATE_HELP)
    q.add_argument("--num-images", type=_pos_int, metavar="N", required=True, help="number of images N")
    q.add_argument("--crops", type=_pos_int, help="crops per image M (crop regions)")
    q.add_argument("--num-classes", type=_pos_int, metavar="C", required=True, help="number of classes C")
    q.add_argument("--codec", help="codec name or spec: full, hard, smoothing, ms, mr, logits; e.g. ms:k=5,dtype=q8")
    q.add_argument("--label-map", metavar="S,K[,DTYPE]",
                   help="label maps instead of crops: S x S cells, top-K per cell, float32 (default) or float16 "
                        "scores, e.g. 15,5 (ReLabel)")
    q.add_argument("--k", type=_pos_int, default=None,
                   help="top-K for ms/mr/logits (same as k= in the spec; default 5)")
    q.add_argument("--max-side", type=_pos_int, default=500,
                   help="largest image side in pixels (box dtype; default 500)")
    q.add_argument("--paper", action="store_true", help="use the paper's float32 formula (Table 2)")
    q.add_argument("--store-crops", action="store_true",
                   help="box and flip stored (default: derived from the crop sampler, not stored)")
    q.add_argument("--json", action="store_true", help="print the estimate as JSON (both figures)")
    q.set_defaults(func=_cmd_estimate)


def _add_verify(add) -> None:
    """``fkdstore verify PATH``."""
    q = add("verify", "read and check every chunk; exit 1 with the problems found", VERIFY_HELP + STORAGE_HELP)
    q.add_argument("path", help="store folder or URL")
    _add_storage_options(q)
    q.add_argument("--json", action="store_true", help="print {path, ok, problems} as JSON")
    _add_progress(q)
    q.set_defaults(func=_cmd_verify)


def _add_convert(add) -> None:
    """``fkdstore convert SRC DST --codec SPEC``."""
    q = add("convert", "re-encode a store into a leaner codec without the teacher", CONVERT_HELP + STORAGE_HELP)
    q.add_argument("src", help="source store (folder or URL)")
    q.add_argument("dst", help="new store, folder or URL (must not exist or be empty)")
    _add_storage_options(q)
    q.add_argument("--codec", required=True,
                   help="target codec name or spec: full, ms, mr, smoothing, hard, logits; e.g. ms:k=5,dtype=q8")
    q.add_argument("--k", type=_pos_int, default=None, help="top-K for ms/mr (default: the source's K, else 5)")
    _add_progress(q)
    q.set_defaults(func=_cmd_convert)


def _add_import_fkd(add) -> None:
    """``fkdstore import-fkd SRC DST --images IMGS``."""
    q = add("import-fkd", "import FKD's per-image torch.save label files", IMPORT_HELP + STORAGE_HELP)
    q.add_argument("src", help="FKD label folder (<split> folder or the root above it)")
    q.add_argument("dst", help="new store, folder or URL (must not exist or be empty)")
    _add_storage_options(q)
    q.add_argument("--images", required=True, help="image folder the labels were made from (<class>/<stem>.<ext>)")
    q.add_argument("--codec", choices=["ms", "mr", "hard", "smoothing"], default=None,
                   help="codec to store (default: what the files hold; top-K files -> ms)")
    q.add_argument("--k", type=_pos_int, default=None, help="keep the top K <= the files' K (ms/mr)")
    q.add_argument("--num-classes", type=_pos_int, default=None, help="number of classes (1000 for ImageNet-1K)")
    q.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False: executes code in the files, trusted input only")
    _add_progress(q)
    q.set_defaults(func=_cmd_import_fkd)


def _add_prune(add) -> None:
    """``fkdstore prune SRC DST --keep FRACTION``."""
    q = add("prune", "keep a fraction of each image's crop slots (a smaller store)", PRUNE_HELP)
    q.add_argument("src", help="source store")
    q.add_argument("dst", help="new store (must not exist)")
    q.add_argument("--keep", type=_fraction, required=True, metavar="FRACTION",
                   help="fraction of the slots to keep, in (0, 1]: M' = max(1, round(M * FRACTION))")
    q.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the random rule (default 0)")
    q.add_argument("--rule", choices=["random", "confident"], default="random",
                   help="which slots: random (seeded per image) or confident (lowest entropy); default random")
    _add_progress(q)
    _add_storage_options(q)
    q.set_defaults(func=_cmd_prune)


def _add_ensemble(add) -> None:
    """``fkdstore ensemble STORE STORE ... OUT``."""
    q = add("ensemble", "average the soft labels of stores that share crops", ENSEMBLE_HELP)
    q.add_argument("stores", nargs="+", metavar="STORE", help="two or more source stores, then the new store OUT")
    q.add_argument("--codec", default=None,
                   help="codec of OUT, a name or spec (e.g. full, ms:k=5,dtype=q8); default: the first store's")
    _add_progress(q)
    _add_storage_options(q)
    q.set_defaults(func=_cmd_ensemble)


def _add_import(add) -> None:
    """``fkdstore import KIND SRC DST --images IMGS ...`` (KIND: fkd, mldr, tinyvit, sre2l, relabel)."""
    top = add("import", "import another system's label set (fkd, mldr, tinyvit, sre2l, relabel)",
              IMPORT_ZOO_HELP + STORAGE_HELP)
    kinds = top.add_subparsers(dest="kind", metavar="KIND", required=True)
    _add_import_relabel(kinds)

    for name, help_ in (("fkd", "FKD's release files"), ("mldr", "Apple ml-dr reinforcement files"),
                        ("tinyvit", "TinyViT saved logits"), ("sre2l", "SRe2L / LPLD / LPQLD batch files")):
        q = kinds.add_parser(name, help=help_, description=IMPORT_ZOO_HELP + STORAGE_HELP, formatter_class=_Formatter)
        if name == "mldr":
            q.add_argument("src", nargs="+", help="ml-dr folder(s) holding config.pth.tar and {id}.pth.tar")
        else:
            q.add_argument("src", help="the label folder")
        q.add_argument("dst", help="new store, folder or URL (must not exist or be empty; or the store a killed "
                                   "run of the same import left, which is continued)")
        _add_storage_options(q)
        q.add_argument("--images", required=True, help="the image folder the labels were made for")
        q.add_argument("--codec", default=None, help="codec name or spec (default: what keeps the stored labels)")
        q.add_argument("--k", type=_pos_int, default=None, help="keep the top K (at most the files' K)")
        q.add_argument("--num-classes", type=_pos_int, default=None, help="number of classes (1000 for ImageNet-1K)")
        _add_progress(q)
        if name != "tinyvit":
            q.add_argument("--trust-pickle", action="store_true",
                           help="load with weights_only=False: executes code in the files, trusted input only")
        if name == "fkd":
            q.set_defaults(func=_cmd_import)
            continue
        q.add_argument("--order", choices=["imagefolder", "listing"], default="imagefolder",
                       help="dataset index of an image: torchvision ImageFolder's (default) or the listed order")
        if name == "mldr":
            q.add_argument("--densify", choices=["smooth", "zeros"], default="smooth",
                           help="the training run's label rule (default smooth, ml-dr's published config)")
        if name in ("tinyvit", "sre2l"):
            q.add_argument("--input-size", type=_pos_int, default=224, help="crop side the teacher saw (default 224)")
            q.add_argument("--scratch-dir", default=None,
                           help="folder for the temporary image-major copy (default: the system's temp folder)")
        if name == "tinyvit":
            q.add_argument("--epochs", type=int, nargs="+", default=None, help="epoch numbers to import (default all)")
            q.add_argument("--mixing", action=argparse.BooleanOptionalAction, default=True,
                           help="the run mixed sampler pairs (TinyViT's default); --no-mixing for a run without")
            q.add_argument("--keys", choices=["auto", "index", "stem"], default="auto",
                           help="keys are dataset indices or image names (default: auto)")
            q.add_argument("--timm-config", type=_json_object, default=None, metavar="JSON",
                           help="the run's augmentation settings, kept in meta['import'] for the external replay")
        if name == "sre2l":
            q.add_argument("--fkd-seed", type=_nonneg_int, default=42, help="the run's --fkd-seed (default 42)")
            q.add_argument("--batch-size", type=_pos_int, default=None, help="default: the first file's rows")
            q.add_argument("--epochs", type=_pos_int, default=None, help="import the first N epochs only")
            q.add_argument("--tail", choices=["renorm", "fill"], default=None,
                           help="top-K logits files: renorm (MR, default without a fill logit) or fill (MRS)")
            q.add_argument("--interpolation", type=_Choice("fkdstore.transforms", "INTERPOLATIONS"),
                           default="bilinear", help="crop resampling filter (default bilinear)")
        q.set_defaults(func=_cmd_import)


def _add_import_relabel(kinds) -> None:
    """``fkdstore import relabel SRC DST --images IMGS`` (a label-map store; options of LabelMapSpec)."""
    q = kinds.add_parser("relabel", help="ReLabel / TokenLabeling per-image label maps (.pt)",
                         description=IMPORT_ZOO_HELP + STORAGE_HELP, formatter_class=_Formatter)
    q.add_argument("src", help="the label-map folder (<synset>/<stem>.pt)")
    q.add_argument("dst", help="new store, folder or URL (must not exist or be empty; or the store a killed "
                               "run of the same import left, which is continued)")
    _add_storage_options(q)
    q.add_argument("--images", required=True, help="the image folder the maps were made for")
    q.add_argument("--system", choices=["relabel", "tokenlabeling"], default="relabel",
                   help="published replay settings to start from (default relabel: box (top, left, bottom, right) "
                        "order, 1 label per crop, flip ignored; tokenlabeling: a grid of S x S token labels, "
                        "flipped with the image)")
    q.add_argument("--num-classes", type=_pos_int, default=1000, help="number of classes (default 1000)")
    q.add_argument("--missing", choices=["error", "skip"], default="error",
                   help="images without a map: stop before writing (default) or leave them out of the store")
    _add_map_replay(q)
    _add_progress(q)
    q.set_defaults(func=_cmd_import)


def _add_map_replay(q, *, layout: bool = False) -> None:
    """Options of :class:`fkdstore.labelmap.LabelMapSpec` (replay fields; ``layout``: also S, K, dtype), each
    defaulting to None (= the preset's or the spec's default)."""
    if layout:
        q.add_argument("--map-size", type=_pos_int, metavar="S",
                       help="label map side S (default: the side of the teacher's class map at --input-size)")
        q.add_argument("--map-k", type=_pos_int, metavar="K", help="classes kept per map cell (default 5)")
        q.add_argument("--map-dtype", choices=["float16", "float32"], help="stored score dtype (default float32)")
    q.add_argument("--box-order", choices=["xy", "yx"],
                   help="crop -> RoI axis order: xy (geometric) or yx (ReLabel's published (top, left, bottom, "
                        "right))" + (" (default xy)" if layout else ""))
    q.add_argument("--box-offset", type=float, metavar="O", help="added to box * S (default -0.5)")
    q.add_argument("--grid", type=_pos_int, metavar="G", help="output label grid G x G (1: one label per crop)")
    q.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="the label follows the crop's horizontal flip (default: " + ("yes" if layout else "the "
                        "system's: no for relabel, yes for tokenlabeling") + ")")
    q.add_argument("--map-temperature", type=float, metavar="T", help="replay temperature: softmax(pooled / T)")
    q.add_argument("--sampling-ratio", type=int, metavar="R", help="RoIAlign samples per bin (-1: adaptive)")
    q.add_argument("--fill", type=float, metavar="F", help="score of the classes a cell does not keep (default 0)")


MAP_REPLAY_OPTIONS = {"box_order": "box_order", "box_offset": "box_offset", "grid": "grid", "flip": "flip",
                      "map_temperature": "temperature", "sampling_ratio": "sampling_ratio", "fill": "fill"}
"""CLI option -> :class:`fkdstore.labelmap.LabelMapSpec` field (given ones only)."""


def map_replay_options(args: argparse.Namespace) -> dict:
    """The :class:`~fkdstore.labelmap.LabelMapSpec` fields given on the command line."""
    return {field: getattr(args, opt) for opt, field in MAP_REPLAY_OPTIONS.items()
            if getattr(args, opt, None) is not None}


GENERATE_HELP = """\
Run a teacher on M random-resized crops per image and write an fkdstore label store (or, with --label-map,
on each whole image once, storing its top-K label map: ReLabel). Resumable (rerun the
same command after a crash: written images are kept, the rest are labelled) and multi-process under
torchrun (rank r of P labels shards r, r+P, ...). Options left out take fkdstore.generate()'s defaults.
Exit code 0 when the store is complete; 1 on an error or when images were skipped (--on-error skip).

examples:
  # top-5 marginal-smoothing labels for 200 crops per image with a torchvision ResNet-50
  fkdstore generate --images /data/imagenet/train --teacher torchvision.models:resnet50 \\
      --teacher-kwargs '{"weights": "IMAGENET1K_V2"}' --out in1k_r50.zarr --crops 200 --codec ms --k 5

  # a local factory and a state dict; 8 GPUs (rank r labels shards r, r+8, ...)
  torchrun --nproc_per_node=8 -m fkdstore generate --images train/ --teacher mymodels:teacher \\
      --weights teacher.safetensors --out labels.zarr --crops 500 --codec ms --k 10 --input-size 224

  # rerun the same command after a crash: written images are kept, the rest are labelled
  fkdstore generate --images digits/ --teacher fkdstore.testing:tiny_cnn --out d.zarr --crops 8 \\
      --codec ms --k 3 --input-size 32 --device cpu

  # RandAugment + a Mixup partner per crop: the teacher labels the mixed pixels, training replays them
  fkdstore generate --images train/ --teacher torchvision.models:resnet50 --out aug.zarr --crops 200 \\
      --augment "randaugment:num_ops=2,magnitude=9;mixup:alpha=0.2"

  # ReLabel's label maps: the classifier as a 1x1 conv over the last feature map of each whole image at
  # 448 px (a 14 x 14 map for a ResNet), top-5 per cell; TorchDataset pools each training crop's label
  fkdstore generate --images train/ --teacher torchvision.models:resnet50 --out maps.zarr --label-map \\
      --input-size 448 --map-k 5
"""


def _augment_help() -> str:
    """The ``--augment`` grammar: :func:`fkdstore.augment.parse_augment`'s docstring (one home), as plain
    text (:func:`_plain`)."""
    from .augment import parse_augment

    doc = _plain(inspect.getdoc(parse_augment) or "")
    return "augment SPEC (--augment):\n" + "\n".join("  " + line for line in doc.splitlines())


def _plain(text: str) -> str:
    """reStructuredText markup of a docstring as plain text: roles (``:class:`~a.B``` -> ``B``), double back
    quotes, and a trailing ``::`` before a literal block (-> ``:``)."""
    text = re.sub(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", lambda m: m.group(1).rsplit(".", 1)[-1]
                  if "~" in m.group(0) else m.group(1), text)
    text = text.replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.M)


class _GenerateHelp(_Formatter):
    """Shows fkdstore.generate()'s defaults next to the options that feed it (imports it: help only)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.help is argparse.SUPPRESS:
            return text
        if isinstance(action.type, _Choice):
            text += f"; one of {', '.join(action.type.names())}"
        if action.dest in GENERATE_OPTIONS and action.dest not in ("teacher_name", "weights_sha256", "crops_from",
                                                                   "storage_options"):
            from .runner import option_default

            default = option_default(action.dest)
            if default is not dataclasses.MISSING:
                text += f" (default: {default!r})"
        elif action.dest in SAMPLER_OPTIONS:
            from .seeded import SlotCropSampler

            text += f" (default: {getattr(SlotCropSampler(), action.dest)!r})"
        return text.replace("%", "%%")


class _Choice:
    """argparse type: one of the names in ``module.attr``, looked up when an option is parsed (or its help
    shown), so that the library's list stays the one home and building the parser imports nothing."""

    def __init__(self, module: str, attr: str):
        self.module, self.attr = module, attr

    def names(self) -> list[str]:
        return sorted(getattr(importlib.import_module(self.module), self.attr))

    def __call__(self, s: str) -> str:
        if s not in self.names():
            raise argparse.ArgumentTypeError(f"must be one of {self.names()}. Got {s!r}.")
        return s


def _add_generate(sub, common) -> None:
    q = sub.add_parser("generate", help="label images with a teacher and write a label store",
                       description=GENERATE_HELP + STORAGE_HELP, lazy_epilog=_augment_help,
                       formatter_class=_GenerateHelp, parents=[common],
                       argument_default=argparse.SUPPRESS)
    _add_generate_inputs(q)
    _add_generate_labels(q)
    _add_generate_label_maps(q)
    _add_generate_execution(q)
    q.set_defaults(func=_cmd_generate)


def _add_generate_inputs(q) -> None:
    """``generate``'s options: images, teacher, weights and the output store."""
    g = q.add_argument_group("inputs and output")
    g.add_argument("--images", required=True, nargs="+", metavar="DIR|FILE|URL",
                   help="an image folder (class sub-folders give labels), a list of image files, a URL prefix "
                        "(s3://bucket/train/, with --storage-options) or WebDataset tar shards (files, a URL, "
                        "shard-{000000..000009}.tar)")
    g.add_argument("--teacher", required=True, metavar="MODULE:FACTORY",
                   help="importable callable returning the teacher module, e.g. fkdstore.testing:tiny_cnn")
    g.add_argument("--teacher-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments for the factory (a JSON object)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="state dict to load (.pt/.pth; .safetensors if the package is installed); its sha256 is stored")
    g.add_argument("--out", required=True, metavar="PATH|URL",
                   help="the store to create or resume: a folder or a URL (every torchrun rank: the same one)")
    g.add_argument("--crops-from", metavar="STORE",
                   help="relabel: label the crops stored in STORE (same images and --crops) instead of sampling")
    _add_storage_options(g)


def _add_generate_labels(q) -> None:
    """``generate``'s options: what is stored: crops, codec, sampler, replay, augmentation."""
    g = q.add_argument_group("crops and labels")
    g.add_argument("--crops", "--crops-per-image", dest="crops_per_image", type=_pos_int,
                   metavar="M", help="crops per image (FKD crop regions; or --label-map)")
    g.add_argument("--codec", help="label codec name or spec: full, hard, smoothing, ms, mr, logits, sampled; "
                                   "e.g. ms:k=5,dtype=q8, logits:centred=true, sampled:s=16,logp=true (default: ms)")
    g.add_argument("--k", type=_pos_int, help="top-k for ms/mr (codec default: 5)")
    g.add_argument("--dtype", choices=["float16", "float32", "q8"], help="stored probability dtype (codec default)")
    g.add_argument("--num-classes", type=_pos_int, metavar="C",
                   help="expected teacher output width (None: measured); state it to label a class-folder tree that "
                        "has fewer class folders than the teacher has outputs")
    g.add_argument("--class-labels", action=argparse.BooleanOptionalAction,
                   help="store the images' ground-truth classes (class sub-folders, .cls members); "
                        "--no-class-labels: none (label -1, has_labels false), for a teacher whose outputs are not "
                        "those classes (a self-supervised head: --codec logits:centred=true)")
    g.add_argument("--input-size", type=_pos_int, metavar="S", help="side of the square crops fed to the teacher")
    g.add_argument("--seed", type=_nonneg_int, metavar="N", help="crop sampler seed")
    g.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="crop area range")
    g.add_argument("--ratio", type=float, nargs=2, metavar=("MIN", "MAX"), help="crop aspect ratio range")
    g.add_argument("--flip-p", type=float, metavar="P", help="horizontal flip probability")
    g.add_argument("--store-crops", action="store_true",
                   help="store the boxes and flips (default: derived from the sampler on read, not stored); for "
                        "readers that cannot run the slot sampler")
    g.add_argument("--temperature", type=float, metavar="T", help="labels are softmax(logits / temperature)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation mean")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="input normalisation std")
    g.add_argument("--interpolation", type=_Choice("fkdstore.transforms", "INTERPOLATIONS"), metavar="NAME",
                   help="crop resampling filter")
    g.add_argument("--images-per-shard", type=_pos_int, metavar="N", help="storage layout override")
    g.add_argument("--augment", metavar="SPEC",
                   help="augmentation policies after the crop; the teacher labels the augmented (mixed) pixels, "
                        "params are stored per crop. SPEC grammar: see 'augment SPEC' below")


def _add_generate_label_maps(q) -> None:
    """``generate``'s options: the label-map record kind (``--label-map``)."""
    g = q.add_argument_group("label maps (ReLabel): --label-map instead of --crops")
    g.add_argument("--label-map", action="store_true",
                   help="run the teacher once per whole image (resized to --input-size) and store the top-K "
                        "classes of every cell of its class map; a classifier is applied as a 1x1 conv over its "
                        "last feature map (fkdstore.labelmap_torch.spatial_teacher)")
    _add_map_replay(g, layout=True)


def _add_generate_execution(q) -> None:
    """``generate``'s options: how the run executes, and provenance."""
    g = q.add_argument_group("execution")
    g.add_argument("--batch-size", type=_pos_int, metavar="N", help="crops per teacher forward")
    g.add_argument("--device", help="None: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    g.add_argument("--num-workers", type=_nonneg_int, metavar="N", help="decoding workers (None: min(8, cpus - 1))")
    g.add_argument("--on-error", type=_Choice("fkdstore.runner", "ON_ERROR"), metavar="WHAT",
                   help="unreadable image: stop with its path, or skip it (left unwritten, listed in meta['skipped'])")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="autocast on CUDA")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress: a bar on a terminal, a plain line every 30 s otherwise (None: auto); --no-progress: "
                        "none, and no summary line")
    g.add_argument("--teacher-name", metavar="NAME",
                   help="provenance name (default: the --teacher spec and its kwargs)")
    g.add_argument("--weights-sha256", metavar="HEX", help="provenance (default: sha256 of --weights)")


def _int_type(check):
    """argparse type: an integer accepted by ``check`` (a :mod:`fkdstore.validation` function), so the
    option and the keyword argument it feeds share one rule and one message."""

    def parse(s: str) -> int:
        v: int | str
        try:
            v = int(s)
        except ValueError:
            v = s
        try:
            return check("value", v)
        except (TypeError, ValidationError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


_pos_int = _int_type(positive_int)


def _fraction(s: str) -> float:
    """argparse type: a number in (0, 1] (``prune --keep``)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1]. Got {s!r}.") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1]. Got {s!r}.")
    return v
_nonneg_int = _int_type(non_negative_int)


def _grid(s: str) -> tuple[int, int]:
    """argparse type: ``RxC`` (:func:`fkdstore.show.parse_grid`)."""
    from .show import parse_grid

    try:
        return parse_grid(s)
    except (TypeError, ValidationError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(s: str) -> dict:
    """argparse type: a JSON object."""
    try:
        v = json.loads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object. Got {s!r} ({e}).") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object. Got {s!r}.")
    return v


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) and e.filename:
        msg = f"{e.strerror or type(e).__name__}: {e.filename}"
    return msg


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser, _ = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors
            return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        try:
            return int(args.func(args) or 0)
        except _BadInput as e:
            if debug:
                traceback.print_exc()
            _err(f"fkdstore {args.command}: error: {e}")
            return EXIT_USAGE
    except KeyboardInterrupt:
        _err("fkdstore: interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        else:
            _err(f"fkdstore: error: {_one_line(e)} (run with --debug for the traceback)")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
