"""Looking at a store: ``fkdstore show`` contact sheets (tiles are TorchDataset's pixels, cut out of the PNG at
their documented positions), ``inspect`` warnings (class-order mismatch, normalisation, fallback crops),
``inspect --plots`` and ``inspect --image KEY``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import fkdstore
from fkdstore import diagnose, generate, plots, report, show
from fkdstore.cli import main
from fkdstore.images import list_images
from fkdstore.pytorch import TorchDataset
from fkdstore.seeded import SlotCropSampler
from fkdstore.testing import RandomCropDataset, make_digits_folder, tiny_cnn
from fkdstore.transforms import Replay, normalize

SIZE = 16
SCALE = (0.35, 1.0)
GEN = dict(crops_per_image=6, input_size=SIZE, crop_sampler=SlotCropSampler(scale=SCALE), store_crops=True,
           num_workers=0, progress=False, batch_size=256)
MIXUP = "color_jitter:brightness=0.4,hue=0.1;mixup:alpha=0.4,p=0.8"


class Permuted(torch.nn.Module):
    """A teacher whose output classes are in another order than the image folder's."""

    def __init__(self, teacher, perm):
        super().__init__()
        self.teacher, self.perm = teacher, torch.as_tensor(perm)

    def forward(self, x):
        return self.teacher(x)[:, self.perm]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("digits"), size=SIZE, per_class=8)  # 80 images


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    return make_digits_folder(tmp_path_factory.mktemp("few"), size=SIZE, per_class=2)  # 20 images


@pytest.fixture(scope="module")
def teacher(digits):
    """Softmax regression on random-resized crops of the digits, trained with label smoothing: small, fast and
    about calibrated on crops (on its store: top-1 agreement 0.46, mean top-1 probability 0.51)."""
    ds = RandomCropDataset(digits, SIZE, scale=SCALE, seed=7, epochs=4)
    xs, ys = [], []
    for e in range(4):
        ds.epoch = e
        for i in range(len(ds)):
            x, y = ds[i]
            xs.append(x)
            ys.append(y)
    x, y = normalize(torch.stack(xs)), torch.tensor(ys)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-2, weight_decay=1e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def stores(digits, few_digits, teacher, tmp_path_factory):
    """Stores of ``digits``, but ``mixup``: of ``few_digits`` (replaying mixed slots is the slow part)."""
    root = tmp_path_factory.mktemp("stores")
    perm = np.roll(np.arange(10), 3)  # no class keeps its index
    made = {
        "plain": dict(teacher=teacher, codec="ms:k=3"),
        "permuted": dict(teacher=Permuted(teacher, perm), codec="ms:k=3"),
        "mixup": dict(teacher=tiny_cnn(10, width=4), codec="ms:k=3", augment=MIXUP, input_size=12),
        "seeded": dict(teacher=teacher, codec="full", store_crops=False),
    }
    out = {}
    for name, kw in made.items():
        kw = {**GEN, **kw}
        generate(kw.pop("teacher"), few_digits if name == "mixup" else digits, root / name, **kw)
        out[name] = root / name
    return out


# ---------------------------------------------------------------------------------------------- the sheet
def _replays(store, digits):
    """Every slot of every image as TorchDataset(normalize=False) returns it (one item = all M slots)."""
    ds = TorchDataset(store, digits, crops_per_sample=fkdstore.open(store).crops_per_image, normalize=False)
    out = {}
    for item in range(len(ds)):
        it = ds[item]
        for row, s in enumerate(it["slots"].tolist()):
            out[(int(it["index"]), s)] = (it["crops"][row].permute(1, 2, 0).numpy(), it)
    return out


@pytest.mark.parametrize("name", ["plain", "mixup"])
def test_sheet_tiles_are_torchdataset_replays(stores, digits, few_digits, name, tmp_path):
    images = few_digits if name == "mixup" else digits
    png = show.write_sheet(stores[name], images, tmp_path / "sheet.png", grid="3x4", seed=3)
    layout, cells = show.sheet_info(png)
    assert (layout.rows, layout.cols) == (3, 4) and len(cells) == 12
    assert len({(c["index"], c["slot"]) for c in cells}) == 12
    sheet = np.asarray(Image.open(png).convert("RGB"))
    assert sheet.shape[:2] == layout.size[::-1]
    replays = _replays(stores[name], images)
    z = layout.zoom
    H, W = layout.crop_height, layout.crop_width
    assert (H, W) == ((12, 12) if name == "mixup" else (SIZE, SIZE)) and z == -(-128 // H)
    keys = fkdstore.open(stores[name]).image_keys
    mixed = 0
    for n, cell in enumerate(cells):
        left, top, right, bottom = layout.crop_rect(n)
        assert (right - left, bottom - top) == (W * z, H * z)
        tile = sheet[top:bottom, left:right]
        want, item = replays[(cell["index"], cell["slot"])]
        assert np.array_equal(tile[::z, ::z], want), (n, cell)
        assert np.array_equal(tile, np.repeat(np.repeat(want, z, 0), z, 1))
        assert cell["key"] == keys[cell["index"]]
        l, t, r, b = layout.image_rect(n)  # the box is drawn in the image panel, right of the tile
        assert l >= right and (sheet[t:b, l:r] == show._BOX).all(-1).any()
        if name == "mixup":
            row = item["slots"].tolist().index(cell["slot"])
            l, t, r, b = layout.partner_rect(n, 0)
            has_partner_box = (sheet[t:b, l:r] == show._PARTNER_BOX).all(-1).any()
            assert has_partner_box == bool(item["mixed"][row])
            mixed += bool(item["mixed"][row])
    if name == "mixup":
        assert layout.mixing == 1 and mixed >= 3  # the sheet shows mixed slots (p=0.8)
    cells_rects = [layout.cell_rect(n) for n in range(12)]
    for n, (l, t, r, b) in enumerate(layout.tile_rects()):  # every tile inside its own cell
        cl, ct, cr, cb = cells_rects[n]
        assert cl < l and ct < t and r < cr and b < cb


def test_sheet_cells_follow_keys_slots_and_seed(stores, digits):
    r = fkdstore.open(stores["plain"])
    k0, k1 = r.image_keys[5], r.image_keys[40]
    sheet = show.contact_sheet(stores["plain"], digits, keys=[k0, 40], slots=[4, 0])
    layout, cells = show.sheet_info(sheet)
    assert [(c["index"], c["slot"]) for c in cells] == [(5, 4), (5, 0), (40, 4), (40, 0)]
    assert [c["key"] for c in cells] == [k0, k0, k1, k1] and (layout.rows, layout.cols) == (1, 4)
    one = show.sheet_info(show.contact_sheet(stores["plain"], digits, keys=[k1]))[1]
    assert {c["index"] for c in one} == {40} and len({c["slot"] for c in one}) == 6  # all M = 6 slots of it
    a = show.choose_cells(np.arange(80), 6, 16, seed=1)
    assert a == show.choose_cells(np.arange(80), 6, 16, seed=1) != show.choose_cells(np.arange(80), 6, 16, seed=2)
    assert len(set(a)) == 16 and len({i for i, _ in a}) == 16
    with pytest.raises(fkdstore.ValidationError, match="must be one of the store's image keys"):
        show.contact_sheet(stores["plain"], digits, keys=["nope.png"])
    with pytest.raises(fkdstore.ValidationError, match=r"slot \(of 6 per image\) must be an integer in \[0, 5\]"):
        show.contact_sheet(stores["plain"], digits, slots=[6])


def test_sheet_class_names(stores, digits, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit {c}\n" for c in range(10)) + "\n")
    assert diagnose.read_names(names) == [f"digit {c}" for c in range(10)]
    assert show._names(names, list_images(digits), {}, 10)[3] == "digit 3"
    assert show._names(None, list_images(digits), {}, 10) == [str(c) for c in range(10)]  # the class folders
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(fkdstore.ValidationError, match="every one of the store's 10 classes"):
        show.contact_sheet(stores["plain"], digits, names=short)


def test_cli_show(stores, digits, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["show", str(stores["plain"]), "--images", str(digits), "--out", str(out), "--grid", "2x3",
                 "--seed", "1"]) == 0
    assert f"wrote {out}: 6 crops in 2 x 3 cells" in capsys.readouterr().out
    cells = show.sheet_info(out)[1]
    assert len(cells) == 6 and cells == show.sheet_info(show.contact_sheet(stores["plain"], digits, grid=(2, 3),
                                                                           seed=1))[1]
    assert main(["show", str(stores["plain"]), "--images", str(digits), "--out", str(out), "--image", "3", "7",
                 "--slots", "1", "2"]) == 0
    assert [(c["index"], c["slot"]) for c in show.sheet_info(out)[1]] == [(3, 1), (3, 2), (7, 1), (7, 2)]
    assert main(["show", str(stores["plain"]), "--images", str(digits), "--grid", "4"]) == 2
    assert "grid must be 'ROWSxCOLS'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- warnings
def test_permuted_class_order_warns_and_the_correct_one_does_not(stores, capsys):
    good, bad = report.inspect(stores["plain"]), report.inspect(stores["permuted"])
    assert good["warnings"] == []
    (w,) = bad["warnings"]
    assert w["code"] == "top1_agreement" and w["crops"] == 480
    assert w["agreement"] == bad["label_stats"]["top1_agreement"] < diagnose.AGREEMENT_FACTOR * w["expected"]
    assert good["label_stats"]["top1_agreement"] >= diagnose.AGREEMENT_FACTOR * good["label_stats"]["top1_prob_mean"]
    assert "class-order mismatch" in w["message"]
    assert "warning    [top1_agreement] teacher top-1 = ground truth on" in report.format_inspect(bad)
    assert "warnings   none" in report.format_inspect(good)
    assert main(["inspect", str(stores["permuted"]), "--json"]) == 0
    assert [w["code"] for w in json.loads(capsys.readouterr().out)["warnings"]] == ["top1_agreement"]
    for doc in (report.__doc__, main.__globals__["INSPECT_HELP"]):
        assert "warnings" in doc and "top1_agreement" in doc


def _crops(label, top1, prob):
    n = len(label)
    return {"image": np.arange(n), "label": np.asarray(label), "top1": np.asarray(top1),
            "top1_prob": np.full(n, prob), "box": np.zeros((n, 4), np.int64), "size": np.ones((n, 2), np.int64)}


def test_agreement_rule_boundaries():
    label = np.arange(200) % 10

    def right(k):  # the first k crops agree with the label, the others do not
        return np.where(np.arange(200) < k, label, (label + 1) % 10)

    assert diagnose.agreement_warning(_crops(label, right(80), 0.8)) is None  # a = 0.4 = 0.5 * c
    w = diagnose.agreement_warning(_crops(label, right(79), 0.8))
    assert w["agreement"] == pytest.approx(0.395) and w["expected"] == pytest.approx(0.8)
    assert diagnose.agreement_warning(_crops(label[:99], right(0)[:99], 0.9)) is None  # too few crops
    unknown = np.full(200, -1)
    assert diagnose.agreement_warning(_crops(unknown, right(0), 0.9)) is None
    # hard labels: chance = 0.1 here, bound = 0.1 + 3 * sqrt(0.09 / 200) = 0.1636
    assert diagnose.agreement_warning(_crops(label, right(33), 1.0), has_probs=False) is None
    w = diagnose.agreement_warning(_crops(label, right(32), 1.0), has_probs=False)
    assert w["chance"] == pytest.approx(0.1) and w["agreement"] == pytest.approx(0.16) and w["expected"] is None


def test_hard_label_store_warns_only_when_permuted(tmp_path):
    rng = np.random.default_rng(0)
    N, M, C = 60, 4, 10
    labels = rng.integers(0, C, N)
    probs = report.teacher_like_probs(rng, N, M, C, labels)
    sizes = np.full((N, 2), 32)
    boxes, flips = zip(*(SlotCropSampler(seed=0).sample(i, 32, 32, M) for i in range(N)))
    codes = {}
    for name, p in {"right": probs, "permuted": probs[..., np.roll(np.arange(C), 1)]}.items():
        with fkdstore.write(tmp_path / name, num_images=N, crops_per_image=M, num_classes=C, codec="hard",
                            image_keys=[f"{i}.png" for i in range(N)], image_sizes=sizes, labels=labels) as w:
            w.put(np.arange(N), np.stack(boxes), np.stack(flips), p)
        codes[name] = [w["code"] for w in report.inspect(tmp_path / name)["warnings"]]
    assert codes == {"right": [], "permuted": ["top1_agreement"]}


@pytest.mark.parametrize("mean, std, needle", [
    ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], None),
    ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], None),
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], None),
    ([0.485, 0.456, 0.406], [58.395, 57.12, 57.375], "std must lie in [0.05, 1.0] (pixels are divided by 255 first)"),
    ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], "mean must lie in [0.0, 1.0]"),
    ([0.229, 0.224, 0.225], [0.485, 0.456, 0.406], "ImageNet's swapped"),
    ([0.406, 0.456, 0.485], [0.225, 0.224, 0.229], "BGR order"),
    ([0.5, 0.5], [0.5, 0.5, 0.5], "3 finite numbers"),
    ([0.5, 0.5, 0.5], [0.001, 0.5, 0.5], "std must lie in [0.05, 1.0]"),
])
def test_normalization_rule(mean, std, needle):
    w = diagnose.normalization_warning({"mean": mean, "std": std})
    if needle is None:
        assert w is None
    else:
        assert w["code"] == "normalization" and needle in w["message"] and f"std={std!r}" in w["message"]
    assert diagnose.normalization_warning({}) is None


def test_normalization_and_fallback_warnings_through_inspect(tmp_path):
    N, M, C = 40, 5, 4
    rng = np.random.default_rng(1)
    sizes = np.stack([rng.integers(20, 40, N), rng.integers(20, 40, N)], 1)
    tall = SlotCropSampler(scale=(0.9, 1.0), ratio=(3.5, 4.0), seed=0)  # wide crops of area ~ the image: never fit
    ok = SlotCropSampler(seed=0)
    probs = rng.dirichlet(np.ones(C), (N, M)).astype(np.float32)
    found = {}
    for name, sampler, replay in [("ok", ok, None), ("fallback", tall, None),
                                  ("bgr", ok, Replay(mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229)))]:
        boxes, flips = zip(*(sampler.sample(i, int(sizes[i, 0]), int(sizes[i, 1]), M) for i in range(N)))
        assert diagnose.fallback_mask(np.stack(boxes).reshape(-1, 4), np.repeat(sizes, M, 0),
                                      sampler.ratio).all() == (name == "fallback")
        with fkdstore.write(tmp_path / name, num_images=N, crops_per_image=M, num_classes=C, codec="full",
                            image_keys=[f"{i}.png" for i in range(N)], image_sizes=sizes,
                            meta={"sampler": sampler.get_config()}, replay=replay) as w:
            w.put(np.arange(N), np.stack(boxes), np.stack(flips), probs)
        found[name] = report.inspect(tmp_path / name)["warnings"]
    assert found["ok"] == []
    (w,) = found["fallback"]
    assert w["code"] == "fallback_crops" and w["fraction"] == 1.0 and w["crops"] == N * M
    assert [w["code"] for w in found["bgr"]] == ["normalization"]


def test_fallback_rule_reads_a_seeded_stores_crop_sampler(tmp_path):
    N, M = 30, 4
    sampler = SlotCropSampler(scale=(0.9, 1.0), ratio=(3.5, 4.0), seed=0)
    with fkdstore.write(tmp_path / "s", num_images=N, crops_per_image=M, num_classes=3, codec="full",
                        image_keys=[f"{i}.png" for i in range(N)], image_sizes=np.full((N, 2), 24),
                        crop_sampler=sampler) as w:
        w.put(np.arange(N), None, None, np.full((N, M, 3), 1 / 3, np.float32))
    r = fkdstore.open(tmp_path / "s")
    assert r.header.seeded and "sampler" not in r.meta
    assert diagnose.sampler_config(r.header) == sampler.get_config()
    assert [w["code"] for w in report.inspect(tmp_path / "s")["warnings"]] == ["fallback_crops"]


# ---------------------------------------------------------------------------------------------- plots
@pytest.mark.parametrize("name", ["plain", "seeded"])
def test_inspect_plots(stores, name, tmp_path, capsys):
    assert main(["inspect", str(stores[name]), "--plots", str(tmp_path / "p")]) == 0
    assert "plots      " in capsys.readouterr().out
    d = report.inspect(stores[name], plots=tmp_path / "q")
    stems = ["confidence", "entropy", "agreement", "crop_area", "crop_aspect", "bytes"]
    assert [p.rsplit("/", 1)[1] for p in d["plots"]] == [f"{s}.png" for s in stems]
    for path in d["plots"]:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width == plots.PLOT_SIZE[0]
            px = np.asarray(img.convert("RGB"))
            assert (px == plots._BAR).all(-1).sum() > 100  # bars were drawn
    r = fkdstore.open(stores[name])
    crops = report.crop_sample(r)
    data = plots.plot_data(d, crops)
    n = len(crops["image"])
    assert n == d["label_stats"]["sampled_crops"] == 480
    for stem in ("confidence", "entropy", "crop_area", "crop_aspect"):
        assert sum(data[stem]["counts"]) == n
    cfg = r.header.sampler.get_config() if name == "seeded" else r.meta["sampler"]
    assert data["crop_area"]["band"] == list(SCALE) == cfg["scale"]
    assert data["crop_aspect"]["band"] == pytest.approx(np.log(cfg["ratio"]).tolist())
    area = crops["box"][:, 2] * crops["box"][:, 3] / (crops["size"][:, 0] * crops["size"][:, 1])
    assert data["crop_area"]["counts"] == np.histogram(area, np.linspace(0, 1, 26))[0].tolist()
    agree = data["agreement"]
    for label, value, count in zip(agree["labels"], agree["values"], agree["counts"]):
        sel = crops["label"] == int(label)
        assert count == sel.sum() and value == pytest.approx((crops["top1"][sel] == int(label)).mean())
    assert sum(data["bytes"]["values"]) == d["total_bytes"]


# ---------------------------------------------------------------------------------------------- one image
def test_inspect_image_dump(stores, capsys):
    path = stores["mixup"]
    r = fkdstore.open(path)
    key = r.image_keys[9]
    assert main(["inspect", str(path), "--image", key, "--json", "--top-k", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    rec = r.read(9)
    dist = r.decode(rec.fields)
    assert (d["index"], d["key"], d["label"]) == (9, key, int(r.labels[9]))
    assert d["size"] == r.image_sizes[9].tolist() and len(d["slots"]) == r.crops_per_image
    for s, e in enumerate(d["slots"]):
        assert e["slot"] == s and e["box"] == rec.box[s].tolist() and e["flip"] == bool(rec.flip[s])
        assert e["aug"] == {k: v[s].tolist() for k, v in rec.aug.items()}
        top = np.argsort(-dist[s], kind="stable")[:2]
        assert [c for c, _ in e["top"]] == top.tolist()
        assert [p for _, p in e["top"]] == pytest.approx(dist[s, top].tolist())
        partner = int(rec.aug["mixup_partner"][s])
        assert [m["partner"] for m in e["mix"]] == ([partner] if partner >= 0 else [])
        assert e["lam"] + sum(m["weight"] for m in e["mix"]) == pytest.approx(1.0)
    assert main(["inspect", str(path), "--image", "9"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"image 9 {key!r}: ") and text.count("own weight") == r.crops_per_image
    assert f"{tuple(rec.box[0].tolist())}" in text and "mixup_partner=" in text
    assert main(["inspect", str(path), "--image", "missing.png"]) == 1
    assert "image must be one of the store's image keys or an index in [0, 20). Got 'missing.png'" in \
        capsys.readouterr().err


def test_inspect_plots_and_image_need_no_torch(stores, few_digits, tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any "import torch" raises ImportError, as without torch
        from fkdstore.cli import main
        assert main(["inspect", sys.argv[1], "--plots", sys.argv[2]]) == 0
        assert main(["inspect", sys.argv[1], "--image", "0", "--json"]) == 0
        assert main(["show", sys.argv[1], "--images", sys.argv[3]]) == 1  # show needs torch: one error line
    """)
    argv = [sys.executable, "-c", code, str(stores["mixup"]), str(tmp_path / "p"), str(few_digits)]
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "p").glob("*.png"))) == 6
    assert res.stderr.strip().splitlines()[-1].startswith("fkdstore: error: ")
