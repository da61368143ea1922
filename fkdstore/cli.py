"""The ``fkdstore`` command line. It only parses arguments and calls the library.

Subcommands: ``inspect``, ``estimate``, ``verify``, ``convert``, ``import-fkd`` (and ``generate`` when
:mod:`fkdstore.generate` is installed: it registers itself through ``add_cli(subparsers)``, which must add
one parser and ``set_defaults(func=handler)`` with ``handler(args) -> int``).

Exit codes: 0 success; 1 an error, or ``verify`` found problems; 2 bad command-line usage.
Errors print as one line, ``fkdstore: error: <message>``; ``--debug`` (anywhere on the line) prints the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from . import __version__

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- handlers
def _cmd_inspect(args) -> int:
    from . import report

    d = report.inspect(args.path, sample=args.sample, seed=args.seed)
    _out(json.dumps(d, indent=2, sort_keys=False) if args.json else report.format_inspect(d))
    return EXIT_OK


def _cmd_estimate(args) -> int:
    from . import report

    e = report.estimate_bytes(args.images, args.crops, args.classes, args.codec, args.k, max_side=args.max_side)
    if args.json:
        e["paper_table2"] = report.paper_table2(e["codec"])
        _out(json.dumps(e, indent=2))
    else:
        _out(report.format_estimate(e, paper=args.paper))
    return EXIT_OK


def _cmd_verify(args) -> int:
    from . import verify

    problems = verify.verify(args.path, progress=args.progress)
    if args.json:
        _out(json.dumps({"path": args.path, "ok": not problems, "problems": problems}, indent=2))
    else:
        _out(verify.summary(args.path, problems))
    return EXIT_OK if not problems else EXIT_ERROR


def _cmd_convert(args) -> int:
    from . import convert, report

    r = convert.convert(args.src, args.dst, args.codec, k=args.k, progress=args.progress)
    _out(f"converted {r['images']:,} images {_cfg(r['from'])} -> {_cfg(r['to'])}: "
         f"{report.human_bytes(r['bytes_before'])} -> {report.human_bytes(r['bytes_after'])}"
         + (f" ({r['missing']:,} images were not written in the source)" if r["missing"] else ""))
    return EXIT_OK


def _cmd_import_fkd(args) -> int:
    from . import convert, report

    r = convert.import_fkd(args.src, args.dst, args.images, codec=args.codec, k=args.k, num_classes=args.classes,
                           trust_pickle=args.trust_pickle, progress=args.progress, log=_err)
    _out(f"imported {r['files']:,} FKD label files ({r['crops_per_image']} crops each, {r['num_classes']} classes, "
         f"coords {r['coords_dtype']}) as {_cfg(r['codec'])}: "
         f"{report.human_bytes(r['bytes_before'])} in {r['files']:,} files -> {report.human_bytes(r['bytes_after'])}")
    if r["images_without_labels"]:
        _out(f"  {r['images_without_labels']:,} images in the image folder have no label file and were left out")
    if r["boxes_clamped"]:
        _out(f"  {r['boxes_clamped']:,} boxes reached outside their image after FKD's rounding and were clipped")
    return EXIT_OK


def _cfg(cfg: dict) -> str:
    return cfg["name"] + (f" K={cfg['k']}" if "k" in cfg else "")


# --------------------------------------------------------------------------------------------- parser
INSPECT_HELP = """\
Show what a store holds: arrays (shape, dtype, chunk and shard shape, stored bytes, compression ratio),
total size, bytes per crop, files, completion, codec, sampler and teacher provenance, label statistics on
a seeded sample of crops, and the size at ImageNet-1K scale next to the paper's Table 2.

--json prints one object with the keys: path, format, format_version, library_version, codec,
num_images, crops_per_image, num_classes, aug, has_labels, images_per_chunk, images_per_shard,
images_written, complete, missing_ranges, arrays{name: shape, dtype, chunks, shards, raw_bytes,
stored_bytes, files, compression_ratio}, total_bytes, total_files, bytes_per_crop, label_bytes_per_crop,
box_bytes_per_crop, meta, sampler, teacher, label_stats{sampled_crops, seed, kept_mass_mean,
entropy_mean_nats, top1_agreement, distinct_top1}, imagenet_extrapolation{num_images, crops_per_image,
bytes, paper_formula_bytes, paper_table2} (sizes in bytes; see fkdstore.report).

examples:
  fkdstore inspect labels.fkd
  fkdstore inspect labels.fkd --json --sample 10000 --seed 1 > stats.json
"""

ESTIMATE_HELP = """\
Predict a store's size before writing it. By default this library's layout: raw bytes of each array times
a compression ratio measured on stores written from teacher-like distributions (fkdstore.report.CALIBRATION),
plus index and metadata overhead. --paper instead applies the paper's Table 2 formula, every value float32:
images x crops x (4 coordinates + 1 flip + L label values) x 4 bytes, L = 1 hard, 2 smoothing, 2K ms/mr,
C full. The paper prints GiB as "GB".

examples:
  fkdstore estimate --images 1281167 --crops 200 --classes 1000 --codec ms --k 5
  fkdstore estimate --images 1200000 --crops 200 --classes 1000 --codec smoothing --paper
"""

VERIFY_HELP = """\
Read every chunk of a store (crc32c checksums), check every image is written, boxes lie inside the recorded
image sizes, decoded distributions are valid and attributes agree with the arrays. Exit code 0 when clean;
1 with the list of every problem found (a corrupted chunk is named by array, shard file and chunk).

examples:
  fkdstore verify labels.fkd
  fkdstore verify labels.fkd --json
"""

CONVERT_HELP = """\
Re-encode a store into a leaner codec without the teacher: full -> ms/mr top-K -> smoothing -> hard, and
ms <-> mr at the same or smaller K (both keep the raw top-K probabilities, so this is exact). Boxes, flips,
aug, keys, sizes, labels and provenance are copied; the conversion is appended to meta["history"].
Conversions that need information the source lacks (hard -> smoothing, ms K=5 -> K=10, smoothing -> ms K=5,
anything -> full) are refused with the reason.

examples:
  fkdstore convert labels-full.fkd labels-ms5.fkd --codec ms --k 5
  fkdstore convert labels-ms10.fkd labels-mr5.fkd --codec mr --k 5
  fkdstore convert labels-ms5.fkd labels-hard.fkd --codec hard
"""

IMPORT_HELP = """\
Import FKD's release layout: one torch.save file per image at SRC/<class>/<stem>.tar (or .pth.tar; SRC may
also be the root above the split folder), each [coords (M,4) normalised (top/H, left/W, h/H, w/W),
flip (M,), labels ((M,2,K) top-K, (M,2) smoothing or (M,) hard)]. Each file is matched to the image
IMAGES/<class>/<stem>.* whose size turns the coordinates into integer pixel boxes with FKD's own replay
rule (Pillow crop rounding). Pass --classes 1000 for ImageNet-1K: without it the class count is the largest
stored index + 1, found by an extra pass. Files are loaded with torch.load(weights_only=True), which
executes no code; --trust-pickle allows arbitrary pickles (runs code from the files: trusted input only).

examples:
  fkdstore import-fkd FKD_soft_label_500crops_marginal_smoothing_k_5/imagenet/train labels.fkd \\
      --images /data/imagenet/train --classes 1000
  fkdstore import-fkd fkd_labels/ labels-mr.fkd --images imgs/ --codec mr --k 3 --classes 1000
"""


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p = argparse.ArgumentParser(
        prog="fkdstore", formatter_class=_Formatter, parents=[common],
        description="Zarr v3 store for Fast Knowledge Distillation soft labels.",
        epilog="run 'fkdstore COMMAND --help' for a command's options and examples",
    )
    p.add_argument("--version", action="version", version=f"fkdstore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_, desc):
        return sub.add_parser(name, help=help_, description=desc, formatter_class=_Formatter, parents=[common])

    q = add("inspect", "show a store's arrays, sizes, provenance and label statistics", INSPECT_HELP)
    q.add_argument("path", help="store folder")
    q.add_argument("--json", action="store_true", help="print one JSON object (keys above)")
    q.add_argument("--sample", type=_nonneg_int, default=4096, help="crops sampled for label statistics (default 4096)")
    q.add_argument("--seed", type=int, default=0, help="seed of the crop sample (default 0)")
    q.set_defaults(func=_cmd_inspect)

    q = add("estimate", "predict a store's size (this layout, or the paper's formula)", ESTIMATE_HELP)
    q.add_argument("--images", type=_pos_int, required=True, help="number of images N")
    q.add_argument("--crops", type=_pos_int, required=True, help="crops per image M")
    q.add_argument("--classes", type=_pos_int, required=True, help="number of classes C")
    q.add_argument("--codec", required=True,
                   help="codec name or spec: full, hard, smoothing, ms, mr, logits; e.g. ms:k=5,dtype=q8")
    q.add_argument("--k", type=_pos_int, default=None, help="top-K for ms/mr/logits (same as k= in the spec; default 5)")
    q.add_argument("--max-side", type=_pos_int, default=500, help="largest image side in pixels (box dtype; default 500)")
    q.add_argument("--paper", action="store_true", help="use the paper's float32 formula (Table 2)")
    q.add_argument("--json", action="store_true", help="print the estimate as JSON (both figures)")
    q.set_defaults(func=_cmd_estimate)

    q = add("verify", "read and check every chunk; exit 1 with the problems found", VERIFY_HELP)
    q.add_argument("path", help="store folder")
    q.add_argument("--json", action="store_true", help="print {path, ok, problems} as JSON")
    q.add_argument("--progress", action="store_true", help="show a progress bar")
    q.set_defaults(func=_cmd_verify)

    q = add("convert", "re-encode a store into a leaner codec without the teacher", CONVERT_HELP)
    q.add_argument("src", help="source store")
    q.add_argument("dst", help="new store (must not exist)")
    q.add_argument("--codec", required=True,
                   help="target codec name or spec: full, ms, mr, smoothing, hard, logits; e.g. ms:k=5,dtype=q8")
    q.add_argument("--k", type=_pos_int, default=None, help="top-K for ms/mr (default: the source's K, else 5)")
    q.add_argument("--progress", action="store_true", help="show a progress bar")
    q.set_defaults(func=_cmd_convert)

    q = add("import-fkd", "import FKD's per-image torch.save label files", IMPORT_HELP)
    q.add_argument("src", help="FKD label folder (<split> folder or the root above it)")
    q.add_argument("dst", help="new store (must not exist)")
    q.add_argument("--images", required=True, help="image folder the labels were made from (<class>/<stem>.<ext>)")
    q.add_argument("--codec", choices=["ms", "mr", "hard", "smoothing"], default=None,
                   help="codec to store (default: what the files hold; top-K files -> ms)")
    q.add_argument("--k", type=_pos_int, default=None, help="keep the top K <= the files' K (ms/mr)")
    q.add_argument("--classes", type=_pos_int, default=None, help="number of classes (1000 for ImageNet-1K)")
    q.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False: executes code in the files, trusted input only")
    q.add_argument("--progress", action="store_true", help="show a progress bar")
    q.set_defaults(func=_cmd_import_fkd)

    from .generate import add_cli as _add_generate_cli  # the teacher-runner owns its flags

    _add_generate_cli(sub)
    return p, sub


def _int_at_least(minimum: int, what: str):
    """argparse type: an integer >= ``minimum``, with the rule in the error message."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"must be a {what} integer. Got {s!r}.")
        return v

    return parse


_pos_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


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
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _err("fkdstore: interrupted")
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        else:
            _err(f"fkdstore: error: {_one_line(e)} (run with --debug for the traceback)")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
