"""Checks that a store's labels fit its images (``fkdstore inspect`` warnings) and one image's slots
(``fkdstore inspect --image KEY``). numpy only (no torch, no Pillow).

Warnings. :func:`store_warnings` returns a list of ``{"code", "message", ...numbers}`` dicts, the ``warnings``
key of :func:`fkdstore.report.inspect` (and ``fkdstore inspect --json``); ``format_inspect`` prints each as a
``warning`` line. The statistical rules use the seeded crop sample of the label statistics
(:func:`fkdstore.report.crop_sample`) and need at least :data:`MIN_CROPS` crops (with a ground-truth label,
for the first rule); with fewer they are not checked. The rules:

``top1_agreement``: the teacher's top-1 class disagrees with the ground truth far more than its own
    confidence says, the mark of a class-order mismatch between teacher and image folder (or of a
    preprocessing mismatch: wrong mean/std, BGR input, another input size). On the ``n`` sampled crops that
    have a ground-truth label, let ``a`` be the fraction whose decoded top-1 class is the ground truth and
    ``c`` the mean decoded top-1 probability. A calibrated teacher agrees with the ground truth about as
    often as it is confident (``a ~ c``; random crops that miss the object lower both), so the rule is
    ``a < AGREEMENT_FACTOR * c`` (half). A hard-label store (``codec.has_probs`` false) stores no confidence
    (its decoded top-1 probability is always 1); there the rule is that the agreement is not above chance:
    ``a <= chance + 3 * sqrt(chance * (1 - chance) / n)``, with ``chance = sum_k P(label = k) P(top-1 = k)``
    over the sample (the agreement of a top-1 unrelated to the label).
``normalization``: the header's ``replay`` ``mean`` / ``std`` (the teacher's input normalisation, applied to pixels
    divided by 255) are not 3 numbers each with every mean in ``MEAN_RANGE`` = [0, 1] and every std in
    ``STD_RANGE`` = [0.05, 1] (a value above 1 is named as given in 0-255 units), or they are ImageNet's
    with mean and std swapped, or ImageNet's mean in BGR order (fkdstore feeds RGB). Not checked when the
    store records no mean/std.
``fallback_crops``: more than ``FALLBACK_FRACTION`` (10 %) of the sampled crops have exactly the box
    RandomResizedCrop falls back to after 10 failed attempts: the centre crop with sides
    :func:`fkdstore.transforms.fallback_sides` ``(H, W, ratio)`` at ``((H - h) // 2, (W - w) // 2)``, with
    ``ratio`` from the store's crop sampler config (the header's for seeded crops, else
    ``meta["sampler"]``; not checked without one). The teacher then labelled many copies of one crop (a scale
    or ratio range the image sizes cannot meet). A whole-image crop of an image whose aspect ratio lies in
    the range also equals its fallback box, which random draws hit rarely: hence a threshold, not zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .augment.replay import mix_weights
from .errors import ValidationError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Replay, fallback_sides
from .validation import positive_int

__all__ = [
    "MIN_CROPS", "AGREEMENT_FACTOR", "FALLBACK_FRACTION", "MEAN_RANGE", "STD_RANGE", "store_warnings",
    "agreement_warning", "normalization_warning", "fallback_warning", "fallback_mask", "sampler_config",
    "find_image", "image_slots", "format_image_slots", "read_names", "store_names", "class_name",
]

MIN_CROPS = 100  # sampled crops a statistical warning needs
AGREEMENT_FACTOR = 0.5  # warn when top-1 agreement < AGREEMENT_FACTOR * mean top-1 probability
FALLBACK_FRACTION = 0.10  # warn when more sampled crops than this equal their image's fallback box
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (0.05, 1.0)


def _warning(code: str, message: str, **values) -> dict[str, Any]:
    return {"code": code, "message": message, **values}


# ---------------------------------------------------------------------------------------------- rules
def agreement_warning(crops: Mapping[str, np.ndarray], has_probs: bool = True,
                      teacher: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``top1_agreement`` rule (module docstring) on a :func:`fkdstore.report.crop_sample` sample, or None.

    ``has_probs``: the codec stores the teacher's probabilities (False for ``hard``). ``teacher``: the
    store's ``meta["teacher"]``, named in the message."""
    known = np.asarray(crops["label"]) >= 0
    n = int(known.sum())
    if n < MIN_CROPS:
        return None
    label, top1 = np.asarray(crops["label"])[known], np.asarray(crops["top1"])[known]
    a = float((top1 == label).mean())
    c = float(np.asarray(crops["top1_prob"], np.float64)[known].mean())
    k = int(max(label.max(), top1.max())) + 1
    chance = float(np.dot(np.bincount(label, minlength=k) / n, np.bincount(top1, minlength=k) / n))
    who = f" (teacher {teacher.get('name')!r})" if isinstance(teacher, Mapping) and teacher.get("name") else ""
    hint = ("likely a class-order mismatch between the teacher's outputs and the image folder's classes "
            "(or a preprocessing mismatch: mean/std, RGB/BGR, input size)")
    if has_probs:
        if a >= AGREEMENT_FACTOR * c:
            return None
        return _warning("top1_agreement",
                        f"teacher top-1 = ground truth on {a:.1%} of {n} sampled crops, but its mean top-1 "
                        f"probability is {c:.1%}{who}: a calibrated teacher agrees about as often as it is confident "
                        f"(rule: agreement >= {AGREEMENT_FACTOR} x mean top-1 probability); {hint}",
                        agreement=a, expected=c, chance=chance, crops=n)
    bound = chance + 3.0 * math.sqrt(chance * (1.0 - chance) / n)
    if a > bound:
        return None
    return _warning("top1_agreement",
                    f"teacher top-1 = ground truth on {a:.1%} of {n} sampled crops{who}, not above the {chance:.1%} "
                    f"of a top-1 unrelated to the labels (rule for hard labels: agreement > chance + 3 standard "
                    f"errors = {bound:.1%}); {hint}", agreement=a, expected=None, chance=chance, crops=n)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= 1e-3 for x, y in zip(a, b))


def normalization_warning(replay: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``normalization`` rule (module docstring) on a store's replay parameters (the header's
    ``replay`` object), or None."""
    if not replay or ("mean" not in replay and "std" not in replay):
        return None
    mean: Any = replay.get("mean")  # as stored: checked here
    std: Any = replay.get("std")
    try:
        m = [float(v) for v in mean]
        s = [float(v) for v in std]
    except (TypeError, ValueError):
        m = s = []
    problems = []
    if len(m) != 3 or len(s) != 3 or not all(math.isfinite(v) for v in m + s):
        problems.append("mean and std must be 3 finite numbers each")
    else:
        if max(s) > STD_RANGE[1]:
            problems.append(f"std must lie in {list(STD_RANGE)} (pixels are divided by 255 first); it looks given "
                            f"in 0-255 units (divide by 255)")
        elif min(s) < STD_RANGE[0]:
            problems.append(f"std must lie in {list(STD_RANGE)}")
        if max(m) > MEAN_RANGE[1]:
            problems.append(f"mean must lie in {list(MEAN_RANGE)} (pixels are divided by 255 first); it looks given "
                            f"in 0-255 units (divide by 255)")
        elif min(m) < MEAN_RANGE[0]:
            problems.append(f"mean must lie in {list(MEAN_RANGE)}")
        if _close(m, IMAGENET_STD) and _close(s, IMAGENET_MEAN):
            problems.append("mean and std are ImageNet's swapped")
        if _close(m, IMAGENET_MEAN[::-1]):
            problems.append("mean is ImageNet's in BGR order; fkdstore feeds the teacher RGB crops")
    if not problems:
        return None
    return _warning("normalization", f"normalisation looks wrong: {'; '.join(problems)}. Got mean={mean!r}, "
                    f"std={std!r} (replay)", mean=mean, std=std)


def sampler_config(header) -> dict[str, Any] | None:
    """The store's crop sampler config: the header's (seeded crops), else ``meta["sampler"]`` (stored crops
    drawn by the teacher-runner; None when neither is a config object)."""
    cfg = header.sampler.get_config() if header.seeded else header.meta.get("sampler")
    return dict(cfg) if isinstance(cfg, Mapping) else None


def fallback_mask(boxes: np.ndarray, sizes: np.ndarray, ratio: Sequence[float]) -> np.ndarray:
    """Which boxes ``(n, 4)`` (top, left, height, width) equal their image's RandomResizedCrop fallback
    (centre crop of :func:`fkdstore.transforms.fallback_sides`) for image sizes ``(n, 2)`` (height, width)."""
    boxes, sizes = np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(sizes, np.int64).reshape(-1, 2)
    if len(boxes) == 0:
        return np.zeros(0, bool)
    H, W = sizes[:, 0], sizes[:, 1]
    h, w = fallback_sides(H, W, (float(ratio[0]), float(ratio[1])))
    want = np.stack([(H - h) // 2, (W - w) // 2, h, w], 1)
    return (boxes == want).all(1)


def fallback_warning(crops: Mapping[str, np.ndarray], sampler: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``fallback_crops`` rule (module docstring) on a crop sample, or None."""
    n = len(crops["image"])
    if n < MIN_CROPS or not sampler or "ratio" not in sampler:
        return None
    hit = fallback_mask(crops["box"], crops["size"], sampler["ratio"])
    frac = float(hit.mean())
    if frac <= FALLBACK_FRACTION:
        return None
    return _warning("fallback_crops",
                    f"{frac:.1%} of {n} sampled crops are RandomResizedCrop's centre-crop fallback (at most "
                    f"{FALLBACK_FRACTION:.0%} expected): the sampler's scale {sampler.get('scale')} and ratio "
                    f"{sampler.get('ratio')} cannot be met for these image sizes, so the teacher labelled the "
                    f"same centre crop many times", fraction=frac, count=int(hit.sum()), crops=n)


def store_warnings(header, codec, crops: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every warning of the module docstring for a store (its :class:`~fkdstore.schema.Header`, codec and
    :func:`fkdstore.report.crop_sample`), in the order top1_agreement, normalization, fallback_crops."""
    meta = header.meta or {}
    replay = None if header.replay is None else header.replay.get_config()
    found = [agreement_warning(crops, bool(getattr(codec, "has_probs", True)), meta.get("teacher")),
             normalization_warning(replay), fallback_warning(crops, sampler_config(header))]
    return [w for w in found if w is not None]


# ---------------------------------------------------------------------------------------------- one image
def find_image(reader, image: str | int) -> int:
    """The store index of ``image``: a key of the store (exact), else an index ``0 <= i < N`` (an int or
    a decimal string). Raises :class:`ValidationError` naming the image otherwise."""
    N = reader.num_images
    if isinstance(image, str):
        keys = reader.image_keys
        if image in keys:
            return keys.index(image)
        if not image.strip().lstrip("-").isdigit():
            raise ValidationError(f"image must be one of the store's image keys or an index in [0, {N}). "
                                  f"Got {image!r} (e.g. {keys[0]!r}).")
        image = int(image)
    if isinstance(image, bool) or not isinstance(image, (int, np.integer)) or not 0 <= image < N:
        raise ValidationError(f"image must be one of the store's image keys or an index in [0, {N}). Got {image!r}.")
    return int(image)


def read_names(path) -> list[str]:
    """Class names from a text file, one per line (line ``c`` names class ``c``; trailing empty lines are
    dropped, other lines are stripped of surrounding whitespace)."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValidationError(f"a names file must hold one class name per line. Got an empty file {path}.")
    return names


def store_names(reader, names=None) -> list[str] | None:
    """Class names for a store's output classes: the file ``names`` (:func:`read_names`), else the store's
    ``meta["classes"]`` (the image folder's classes at generation), else None."""
    if names is not None:
        return read_names(names)
    classes = (reader.meta or {}).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def class_name(c: int, names: Sequence[str] | None) -> str:
    """``names[c]`` when known, else ``"class c"`` (``"unknown"`` for ``c < 0``)."""
    if c < 0:
        return "unknown"
    return names[c] if names is not None and c < len(names) and names[c] else f"class {c}"


def image_slots(reader, image: str | int, *, top_k: int = 5, slots: Sequence[int] | None = None) -> dict[str, Any]:
    """One image's slots as a JSON-serialisable dict (``fkdstore inspect --image KEY --json``)::

        {index, key, size: [H, W], label, slots: [{slot, box: [top, left, height, width], flip,
         aug: {column: value}, top: [[class, prob], ...], mix: [{policy, partner, partner_key, weight}],
         lam}]}

    ``top``: the ``top_k`` classes of the decoded soft label, most probable first; ``aug`` the stored
    augmentation params (empty without a pipeline); ``mix`` one entry per mixing policy that mixed the slot
    (partner image, its key and its weight in the label) and ``lam`` the weight of the image's own pixels
    (1.0 unmixed; absent without mixing policies). ``slots``: all (default) or these.
    """

    top_k = positive_int("top_k", top_k)
    i = find_image(reader, image)
    M, C = reader.crops_per_image, reader.num_classes
    sl = np.arange(M) if slots is None else np.asarray(slots, np.int64).reshape(-1)
    rec = reader.read(i, sl)
    dist = np.asarray(reader.decode(rec.fields), np.float64)
    k = min(top_k, C)
    order = np.argsort(-dist, axis=-1, kind="stable")[:, :k]
    pipeline = reader.header.augment
    mixing = pipeline.mixing
    if mixing:
        size = (reader.header.replay or Replay()).input_size
        lam, pidx, pw = mix_weights(pipeline, rec.aug, size)
    out = []
    for r, s in enumerate(sl.tolist()):
        entry = {"slot": int(s), "box": [int(v) for v in rec.box[r]], "flip": bool(rec.flip[r]),
                 "aug": {name: np.asarray(v[r]).tolist() for name, v in rec.aug.items()},
                 "top": [[int(c), float(dist[r, c])] for c in order[r]]}
        if mixing:
            entry["lam"] = float(lam[r])
            entry["mix"] = [{"policy": p.name, "partner": j, "partner_key": reader.image_key(j),
                             "weight": float(pw[r, q])} for q, p in enumerate(mixing) if (j := int(pidx[r, q])) >= 0]
        out.append(entry)
    H, W = (int(v) for v in reader.image_sizes[i])
    return {"index": i, "key": reader.image_key(i), "size": [H, W], "label": int(reader.labels[i]), "slots": out}


def format_image_slots(d: Mapping[str, Any], names: Sequence[str] | None = None) -> str:
    """Text rendering of :func:`image_slots`: a header line, then one line per slot."""
    H, W = d["size"]
    L = [f"image {d['index']} {d['key']!r}: {H} x {W} px, ground truth {_label(d['label'], names)}, "
         f"{len(d['slots'])} slots",
         f"{'slot':>5}  {'box (top, left, h, w)':<24}{'flip':<6}top classes (probability)"]
    for e in d["slots"]:
        top = ", ".join(f"{_label(c, names)} {p:.3f}" for c, p in e["top"])
        L.append(f"{e['slot']:>5}  {str(tuple(e['box'])):<24}{'yes' if e['flip'] else 'no':<6}{top}")
        if e["aug"]:
            L.append(f"{'':>7}aug {', '.join(f'{k}={_short(v)}' for k, v in e['aug'].items())}")
        if "lam" in e:
            mix = "; ".join(f"{m['policy']} partner {m['partner']} {m['partner_key']!r} weight {m['weight']:.3f}"
                            for m in e["mix"]) or "not mixed"
            L.append(f"{'':>7}own weight {e['lam']:.3f}; {mix}")
    return "\n".join(L)


def _label(c: int, names: Sequence[str] | None) -> str:
    """``"c"``, or ``"c (name)"`` when the name says more than the index."""
    if c < 0:
        return "unknown"
    name = class_name(c, names)
    return str(c) if name in (str(c), f"class {c}") else f"{c} ({name})"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)
