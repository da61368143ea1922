"""PNG plots of a store's labels, crops and bytes (``fkdstore inspect STORE --plots DIR``). Pillow and numpy
only (default bitmap font; no matplotlib, no font files).

:func:`plot_data` turns :func:`fkdstore.report.inspect`'s dict and its crop sample
(:func:`fkdstore.report.crop_sample`) into the numbers of each plot; :func:`write_plots` draws them:

=====================  =======================================================================================
file                   what it shows
=====================  =======================================================================================
``confidence.png``     histogram of the decoded top-1 probability of the sampled crops (20 bins on [0, 1]),
                       marks at its mean and at the top-1 agreement with the ground truth
``entropy.png``        histogram of the decoded labels' entropy in nats (20 bins on [0, ln C])
``agreement.png``      top-1 agreement with the ground truth per ground-truth class (bars, up to
                       :data:`MAX_CLASS_BARS` classes; more: a histogram of the per-class agreement), with the
                       overall agreement as a line. Only for stores with ground-truth labels.
``crop_area.png``      histogram of box area / image area (25 bins on [0, 1]) against the sampler's
                       configured ``scale`` range (shaded)
``crop_aspect.png``    histogram of the boxes' aspect ratio width / height on a log axis against the
                       sampler's ``ratio`` range (shaded)
``bytes.png``          stored bytes per component: each array, and metadata (the rest of the total)
=====================  =======================================================================================

The sampler range comes from the header's crop sampler (seeded crops) or ``meta["sampler"]`` (not shaded
without one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import report as _report  # an import cycle (report draws with this module): names are looked up at call time

__all__ = ["PLOT_SIZE", "MAX_CLASS_BARS", "plot_data", "render", "write_plots"]

PLOT_SIZE = (640, 400)  # width, height of every plot
MAX_CLASS_BARS = 40
_LEFT, _TOP, _RIGHT, _BOTTOM = 64, 34, 20, 56  # margins around the plot area
_BAR, _BAND, _MARK, _GRID, _TEXT = (70, 130, 180), (255, 228, 190), (200, 30, 30), (225, 225, 225), (0, 0, 0)
_FONT = None


def font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font (no font file, no FreeType), loaded once."""
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default_imagefont()
    return _FONT


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """``text``, cut and ended with ``..`` when it is wider than ``width`` pixels."""
    if draw.textlength(text, font=font()) <= width:
        return text
    while text and draw.textlength(text + "..", font=font()) > width:
        text = text[:-1]
    return text + ".."


# ---------------------------------------------------------------------------------------------- data
def _hist(values: np.ndarray, edges: np.ndarray) -> list[int]:
    v = np.clip(np.asarray(values, np.float64), edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(int).tolist()


def _names(d: Mapping[str, Any]) -> list[str] | None:
    classes = (d.get("meta") or {}).get("classes")
    return list(classes) if isinstance(classes, list) and len(classes) == d["num_classes"] else None


def _sampler(d: Mapping[str, Any]) -> Mapping[str, Any] | None:
    cfg = d.get("crop_sampler") or d.get("sampler")
    return cfg if isinstance(cfg, Mapping) else None


def _hist_spec(title: str, xlabel: str, values: np.ndarray, edges: np.ndarray, marks=(), band=None,
               log_x: bool = False, ylabel: str = "crops") -> dict[str, Any]:
    return {"kind": "hist", "title": title, "xlabel": xlabel, "ylabel": ylabel, "edges": edges.tolist(),
            "counts": _hist(values, edges), "marks": [list(m) for m in marks], "band": band, "log_x": log_x}


def plot_data(d: Mapping[str, Any], crops: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """The numbers of each plot (module docstring), keyed by file stem.

    Histograms: ``{"kind": "hist", title, xlabel, ylabel, edges, counts, marks: [[x, text]], band: [lo, hi] |
    None, log_x}``; class bars: ``{"kind": "bars", title, ylabel, labels, values, counts, line: [y, text]}``;
    bytes: ``{"kind": "hbars", title, labels, values, texts}``. ``crop_aspect`` edges and band are natural logs of
    the ratio (``log_x``)."""
    out: dict[str, dict[str, Any]] = {}
    n = len(crops["image"])
    C = int(d["num_classes"])
    p1, ent, label, top1 = crops["top1_prob"], crops["entropy"], crops["label"], crops["top1"]
    known = label >= 0
    agree = float((top1[known] == label[known]).mean()) if known.any() else None
    edges = np.linspace(0.0, 1.0, 21)
    marks = [[float(p1.mean()), f"mean {p1.mean():.2f}"]] if n else []
    if agree is not None:
        marks.append([agree, f"top-1 = truth {agree:.2f}"])
    out["confidence"] = _hist_spec(f"decoded top-1 probability, {n} sampled crops", "top-1 probability", p1, edges,
                                   marks)
    top = math.log(C) if C > 1 else 1.0
    out["entropy"] = _hist_spec(f"entropy of the decoded labels, {n} sampled crops",
                                f"entropy (nats); ln C = {top:.2f}", ent, np.linspace(0.0, top, 21),
                                [[float(ent.mean()), f"mean {ent.mean():.2f}"]] if n else [])
    if known.any():
        classes, counts = np.unique(label[known], return_counts=True)
        hits = np.bincount(label[known], weights=(top1[known] == label[known]).astype(np.float64),
                           minlength=int(classes.max()) + 1)[classes]
        per = hits / counts
        title = f"top-1 = ground truth per class ({int(known.sum())} crops, {len(classes)} classes)"
        if len(classes) <= MAX_CLASS_BARS:
            names = _names(d)
            out["agreement"] = {"kind": "bars", "title": title, "ylabel": "agreement",
                                "labels": [names[c] if names else str(c) for c in classes.tolist()],
                                "values": per.tolist(), "counts": counts.tolist(),
                                "line": [agree, f"all {agree:.2f}"]}
        else:
            out["agreement"] = _hist_spec(title, "a class's top-1 agreement", per, np.linspace(0.0, 1.0, 21),
                                          [[agree, f"all {agree:.2f}"]], ylabel="classes")
    cfg = _sampler(d) or {}
    box, size = crops["box"].astype(np.float64), crops["size"].astype(np.float64)
    area = box[:, 2] * box[:, 3] / np.maximum(size[:, 0] * size[:, 1], 1) if n else np.zeros(0)
    scale = [float(v) for v in cfg["scale"]] if "scale" in cfg else None
    out["crop_area"] = _hist_spec("crop area / image area" + (f" (sampler scale {scale})" if scale else ""),
                                  "area fraction", area, np.linspace(0.0, 1.0, 26), band=scale)
    aspect = np.log(box[:, 3] / box[:, 2]) if n else np.zeros(0)
    ratio = [float(v) for v in cfg["ratio"]] if "ratio" in cfg else None
    ends = ([math.log(r) for r in ratio] if ratio else []) + ([float(aspect.min()), float(aspect.max())] if n else [])
    lo, hi = (min(ends), max(ends)) if ends else (-0.5, 0.5)
    lo, hi = (lo, hi) if hi - lo > 1e-6 else (lo - 0.5, hi + 0.5)
    pad = 0.1 * (hi - lo)
    title = "crop aspect ratio width / height" + (f" (sampler ratio {[round(r, 3) for r in ratio]})" if ratio else "")
    out["crop_aspect"] = _hist_spec(title, "width / height (log axis)", aspect, np.linspace(lo - pad, hi + pad, 26),
                                    band=[math.log(r) for r in ratio] if ratio else None, log_x=True)
    arrays = {k: int(a["stored_bytes"]) for k, a in d["arrays"].items()}
    total = int(d["total_bytes"])
    parts = {**arrays, "metadata and other": max(total - sum(arrays.values()), 0)}
    out["bytes"] = {"kind": "hbars", "title": f"stored bytes per component, total {_report.human_bytes(total)}",
                    "labels": list(parts), "values": list(parts.values()),
                    "texts": [f"{_report.human_bytes(b)} ({b / max(total, 1):.0%})" for b in parts.values()]}
    return out


# ---------------------------------------------------------------------------------------------- drawing
def _nice_ticks(top: float, steps: int = 5) -> list[float]:
    if top <= 0:
        return [0.0]
    raw = top / steps
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if abs(v - round(v)) < 1e-9:
        return f"{v:.0f}"
    return f"{v:.2g}" if abs(v) < 0.01 else f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"


def _frame(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, int, int, int]]:
    img = Image.new("RGB", PLOT_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), fit_text(draw, title, PLOT_SIZE[0] - 16), fill=_TEXT, font=font())
    return img, draw, (_LEFT, _TOP, PLOT_SIZE[0] - _RIGHT, PLOT_SIZE[1] - _BOTTOM)


def _y_axis(draw, area, ymax: float, label: str) -> float:
    x0, y0, x1, y1 = area
    ticks = _nice_ticks(ymax)
    top = max(ticks[-1], ymax) or 1.0
    for t in ticks:
        y = y1 - (y1 - y0) * t / top
        draw.line([(x0, y), (x1, y)], fill=_GRID)
        s = _fmt(t)
        draw.text((x0 - 6 - draw.textlength(s, font=font()), y - 5), s, fill=_TEXT, font=font())
    draw.text((8, y0 - 14), label, fill=_TEXT, font=font())
    return top


def _hist_image(p: Mapping[str, Any]) -> Image.Image:
    img, draw, (x0, y0, x1, y1) = _frame(p["title"])
    edges, counts = np.asarray(p["edges"]), p["counts"]
    lo, hi = float(edges[0]), float(edges[-1])

    def X(v: float) -> float:
        return x0 + (x1 - x0) * (min(max(v, lo), hi) - lo) / (hi - lo)

    if p.get("band"):
        draw.rectangle([X(p["band"][0]), y0, X(p["band"][1]), y1], fill=_BAND)
        draw.text((X(p["band"][0]) + 3, y0 + 2), "sampler range", fill=(150, 90, 0), font=font())
    top = _y_axis(draw, (x0, y0, x1, y1), max(counts) if counts else 1, p.get("ylabel", "crops"))
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if c:
            draw.rectangle([X(a) + 1, y1 - (y1 - y0) * c / top, X(b) - 1, y1], fill=_BAR)
    for v, _ in p["marks"]:
        draw.line([(X(v), y0), (X(v), y1)], fill=_MARK, width=2)
    for k, (v, text) in enumerate(p["marks"]):
        w = draw.textlength(text, font=font())
        at = (min(X(v) + 4, x1 - w), y0 + 14 + 13 * k)
        draw.rectangle([at[0] - 1, at[1] - 1, at[0] + w + 1, at[1] + 11], fill=(255, 255, 255))
        draw.text(at, text, fill=_MARK, font=font())
    draw.line([(x0, y1), (x1, y1)], fill=_TEXT)
    if p.get("log_x"):  # ratio units: the band's ends and 1 first, then evenly spaced ones that do not crowd them
        first = [*(p.get("band") or []), 0.0]
        ticks = [t for t in first if lo <= t <= hi] + list(np.linspace(lo, hi, 6))
    else:
        ticks = list(np.linspace(lo, hi, 6))
    drawn: list[float] = []
    for t in ticks:
        if any(abs(X(t) - X(u)) < 40 for u in drawn):
            continue
        drawn.append(t)
        s = _fmt(float(np.exp(t))) if p.get("log_x") else _fmt(float(t))
        draw.line([(X(t), y1), (X(t), y1 + 3)], fill=_TEXT)
        draw.text((X(t) - draw.textlength(s, font=font()) / 2, y1 + 6), s, fill=_TEXT, font=font())
    w = draw.textlength(p["xlabel"], font=font())
    draw.text(((x0 + x1 - w) / 2, y1 + 24), p["xlabel"], fill=_TEXT, font=font())
    return img


def _bars_image(p: Mapping[str, Any]) -> Image.Image:
    img, draw, (x0, y0, x1, y1) = _frame(p["title"])
    top = _y_axis(draw, (x0, y0, x1, y1), 1.0, p["ylabel"])
    n = len(p["values"])
    slot = (x1 - x0) / max(n, 1)
    every = max(1, math.ceil(36 / slot))  # room for a label of about 6 characters
    for k, (v, name) in enumerate(zip(p["values"], p["labels"])):
        a = x0 + k * slot
        gap = max(1, slot * 0.15)
        draw.rectangle([a + gap, y1 - (y1 - y0) * v / top, a + slot - gap, y1], fill=_BAR)
        if k % every == 0:
            s = fit_text(draw, name, slot * every - 2)
            draw.text((a + slot / 2 - draw.textlength(s, font=font()) / 2, y1 + 6), s, fill=_TEXT, font=font())
    y, text = p["line"]
    yy = y1 - (y1 - y0) * y / top
    draw.line([(x0, yy), (x1, yy)], fill=_MARK, width=2)
    draw.text((x1 - draw.textlength(text, font=font()), yy - 13), text, fill=_MARK, font=font())
    draw.line([(x0, y1), (x1, y1)], fill=_TEXT)
    draw.text(((x0 + x1) / 2 - 30, y1 + 24), "ground-truth class", fill=_TEXT, font=font())
    return img


def _hbars_image(p: Mapping[str, Any]) -> Image.Image:
    n = len(p["values"])
    row = 18
    height = max(PLOT_SIZE[1], _TOP + n * row + 20)
    img = Image.new("RGB", (PLOT_SIZE[0], height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), fit_text(draw, p["title"], PLOT_SIZE[0] - 16), fill=_TEXT, font=font())
    label_w, text_w = 150, 130
    x0, x1 = 8 + label_w, PLOT_SIZE[0] - text_w
    top = max(p["values"]) or 1
    for k, (name, v, text) in enumerate(zip(p["labels"], p["values"], p["texts"])):
        y = _TOP + k * row
        draw.text((8, y + 3), fit_text(draw, name, label_w - 6), fill=_TEXT, font=font())
        b = x0 + (x1 - x0) * v / top
        if v:
            draw.rectangle([x0, y + 2, max(b, x0 + 1), y + row - 3], fill=_BAR)
        draw.text((b + 5, y + 3), text, fill=_TEXT, font=font())
    return img


def render(p: Mapping[str, Any]) -> Image.Image:
    """One plot of :func:`plot_data` as an RGB image (:data:`PLOT_SIZE`; ``bytes`` grows with its rows)."""
    kind = p["kind"]
    if kind == "hist":
        return _hist_image(p)
    if kind == "bars":
        return _bars_image(p)
    if kind == "hbars":
        return _hbars_image(p)
    raise ValueError(f"plot kind must be one of ['hist', 'bars', 'hbars']. Got {kind!r}.")


def write_plots(d: Mapping[str, Any], crops: Mapping[str, np.ndarray], out_dir: str | os.PathLike) -> list[str]:
    """Draw every plot of :func:`plot_data` as ``out_dir/<name>.png`` (the folder is created); returns the
    paths written, in the order of the module docstring's table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, p in plot_data(d, crops).items():
        path = out / f"{name}.png"
        render(p).save(path)
        paths.append(str(path))
    return paths
