"""Tiny runs of the benchmark scripts' core functions, so they cannot rot (< 30 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

formats = pytest.importorskip("formats")
reproduce = pytest.importorskip("reproduce")
pytest.importorskip("sklearn")


def test_roi_align_matches_direct_bilinear_average():
    # A linear ramp map: RoI-align over any box returns the ramp's value at the box centre (bilinear is exact).
    h = w = formats.RELABEL_GRID
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    maps = torch.stack([yy, xx])[None]  # (1, 2, h, w): channel 0 = row index, 1 = column index
    boxes = torch.tensor([[[0.2, 0.3, 0.4, 0.5], [0.1, 0.1, 0.6, 0.3]]])
    out = formats.roi_align_1x1(maps, boxes)  # (1, 2, 2)
    cy = (boxes[0, :, 0] + boxes[0, :, 2] / 2) * h - 0.5  # pixel centres at integer coordinates
    cx = (boxes[0, :, 1] + boxes[0, :, 3] / 2) * w - 0.5
    assert torch.allclose(out[0, :, 0], cy, atol=1e-5)
    assert torch.allclose(out[0, :, 1], cx, atol=1e-5)


def test_relabel_decode_is_a_distribution():
    maps = torch.from_numpy(formats.relabel_maps(2, 50))
    boxes = torch.rand(2, 3, 4) * 0.5
    p = formats.relabel_decode(maps, boxes, 50)
    assert p.shape == (6, 50)
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-5)


def test_formats_tiny_run(tmp_path):
    out = formats.main(["--images", "8", "--crops", "4", "--classes", "40", "--random-reads", "4",
                        "--full-crops", "16", "--sre2l-batch", "4", "--out", str(tmp_path)])
    r = out["runs"][0]
    assert {"fkdstore/ms5", "fkd/ms5", "sre2l/full", "relabel/top5map"} <= set(r["size"])
    assert r["size"]["fkd/ms5"]["files"] == 8
    assert all(v > 0 for v in r["speed"]["random_images_per_s"].values())
    assert "files" in out["targets"]
    md = formats.to_markdown(out)
    assert "fkdstore" in md and "ReLabel" in md


def test_fkdstore_file_count_rule_matches_a_written_store(tmp_path):
    N, M, C = 40, 4, 30
    sizes = formats.image_sizes(N)
    boxes, flips = formats.crops(sizes, M)
    idx10, p10, full_p, _ = formats.make_labels(N, M, C, 1)
    p = tmp_path / "s"
    formats.write_fkdstore(p, "ms5", formats.fields_for("ms5", idx10, p10, full_p), boxes, flips, sizes,
                           formats.image_keys(N), C)
    from fkdstore.report import storage_stats

    st = storage_stats(p)
    assert formats.fkdstore_files_at(N, M, C, "ms5", st["."]["files"]) == st["_total"]["files"]


@pytest.mark.slow
def test_reproduce_tiny_run(tmp_path):
    """One tiny run over every row family of the reproduction (one teacher, one seed): the rows exist, the
    claims and verdicts are computed from them, the Markdown names each table."""
    run_all = pytest.importorskip("run_all")
    torch.manual_seed(0)
    res = reproduce.main(["--epochs", "2", "--seeds", "1", "--teacher-epochs", "1", "--ms", "1", "2", "--size", "12",
                          "--teacher-width", "8", "--student-width", "4", "--m", "2", "--temperatures", "4",
                          "--keeps", "--no-q8", "--ssl-dim", "16", "--per-class", "12",
                          "--only", "(a)", "(b)", "Full, m=1", "Full, m=2", "Hard", "MS K=3", "(d)", "(g)", "(h)",
                          "(i)", "(j)", "(k)", "(l)", "(m)", "(n)", "--work", str(tmp_path)])
    s = res["summary"]
    assert sorted({k[:3] for k in s}) == ["(a)", "(b)", "(c)", "(d)", "(g)", "(h)", "(i)", "(j)", "(k)", "(l)",
                                          "(m)", "(n)"]
    assert any(k.startswith("(c) FKD Full, m=2") for k in s) and any(k.startswith("(c) FKD MS K=3") for k in s)
    assert all(0.0 <= v["acc_mean"] <= 1.0 and np.isfinite(v["time_mean"]) for v in s.values())
    assert {"fkd_matches_vanilla_kd", "region_beats_global", "m_does_not_hurt"} <= set(res["claims"])
    md = reproduce.to_markdown(res)
    assert "vanilla KD" in md
    # (m): Full vs top-K vs sampled at T = 4, with ECE; (n): the SSL head's stores, centred vs not
    t4 = res["claims"]["temperature_rows"]["4"]
    assert {"Full", "MS K=3", "logits K=3 tail=mean"} <= set(t4["rows"])
    assert sum(n.startswith("sampled S=") for n in t4["rows"]) == 2  # decoded at 4 with logp, and drawn at 4
    assert all(0 <= r["ece_mean"] <= 1 and r["tv"] >= 0 for r in t4["rows"].values())
    assert t4["rows"]["Full"]["tv"] < 1e-5 < t4["rows"]["MS K=3"]["tv"]  # Full (float32 logits) is the reference
    ssl = res["claims"]["ssl_centred"]
    e = ssl["errors"]
    assert not any(x["has_labels"] for x in e.values())
    assert e["float16 centred"]["max_rel"] <= e["float16 centred"]["bound"] < e["float16"]["bound"]
    assert e["float16 centred"]["tv"] < e["float16"]["tv"]
    assert set(ssl["students"]) == {"float32", "float16", "float16 centred"}
    assert "Self-supervised head" in md and "| 4 | MS K=3 |" in md
    # (g)-(j): mixing stored vs at training time
    v = res["claims"]["stored_mix_vs_train_time_mix"]
    assert set(v["same_augmentation"]) == {"RandAugment(2)", "crop + flip only"}
    g = next(x for k, x in s.items() if k.startswith("(g)"))
    assert v["stored_acc"] == g["acc_mean"] and v["verdict"] in ("tie", "stored", "train-time")
    assert set(res["augment"]["generation"]) == {reproduce.AUGMENT_STORED, reproduce.AUGMENT_RA,
                                                 reproduce.AUGMENT_STORED[len(reproduce.AUGMENT_RA) + 1:]}
    assert "Mixing stored vs mixing at training time" in md
    # (k)/(l): ReLabel's maps against FKD's regions
    assert res["relabel"]["size"] == 3 and res["relabel"]["k"] == 3  # tiny_cnn at 12 px: a 3 x 3 class map
    fr = res["claims"]["fkd_vs_relabel"]
    assert "FKD Full vs ReLabel on FKD's crops" in fr
    assert all(p["verdict"] in ("tie", "FKD", "ReLabel") for p in fr.values())
    assert "FKD vs ReLabel (rows (k)/(l))" in md
    lines = run_all.verdicts(None, res)
    assert any("equal stored bytes per crop" in x for x in lines) and any("centred vs not" in x for x in lines)
    assert any("Mixup/CutMix stored" in x for x in lines) and any("ReLabel's label maps" in x for x in lines)


def test_codec_fidelity_tiny_run():
    codec_fidelity = pytest.importorskip("codec_fidelity")
    run_all = pytest.importorskip("run_all")
    rows = codec_fidelity.run(2, 4, 50, 0, specs=["full:dtype=float16", "full:dtype=q8", "ms:k=5", "ms:k=5,dtype=q8",
                                                  "mr:k=5"])
    by = {r["codec"]: r for r in rows}
    assert by["full:dtype=q8"]["kl_inf_crops"] == 0 and by["mr:k=5"]["kl_inf_crops"] == 8  # mr drops the tail
    assert all(np.isfinite(r["kl_floored_mean"]) for r in rows)
    assert by["ms:k=5,dtype=q8"]["raw_label_bytes"] == 15
    table = codec_fidelity.table(rows)
    assert "crops with KL = inf" in table and "`mr:k=5`" in table
    assert any("Full q8 <= 60 %" in line for line in run_all.fidelity_verdict(rows))


def test_train_time_mix_batches_mix_crops_and_stored_labels(tmp_path):
    import fkdstore
    from fkdstore.augment.batch import mix_params
    from fkdstore.testing import make_digits_folder, tiny_cnn

    folder = make_digits_folder(tmp_path / "d", size=8, per_class=2)
    store = tmp_path / "s.fkd"
    fkdstore.generate(tiny_cnn(10, width=4, seed=0).eval(), folder, store, crops_per_image=2, input_size=8,
                      codec={"name": "full", "dtype": "float32"}, num_workers=0, progress=False)
    plain = list(reproduce.fkd_batches(store, folder, 1, seed=3)(0))
    mix = (("mixup", 1.0, 1.0),)  # always applied: the result must be the documented mix of the plain batch
    mixed = list(reproduce.train_time_mix_batches(store, folder, 1, seed=3, mix=mix)(0))
    again = list(reproduce.train_time_mix_batches(store, folder, 1, seed=3, mix=mix)(0))
    assert len(plain) == len(mixed) > 0
    for (x0, i0), (x1, i1), (x2, i2) in zip(plain, mixed, again):
        lam, index, _ = mix_params(len(x0), tuple(x0.shape[2:]), mode="mixup", alpha=1.0, seed=3, step=0)
        y0 = i0["soft_labels"]
        assert torch.allclose(i1["soft_labels"], lam * y0 + (1 - lam) * y0[torch.from_numpy(index)], atol=1e-6)
        assert torch.allclose(i1["soft_labels"].sum(-1), torch.ones(len(x0)), atol=1e-5)
        assert torch.equal(x1, x2) and torch.equal(i1["soft_labels"], i2["soft_labels"])
        break
    assert not torch.equal(plain[0][0], mixed[0][0])
    off = list(reproduce.train_time_mix_batches(store, folder, 1, seed=3, mix=(("cutmix", 1.0, 0.0),))(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, off))  # p = 0: never mixed


def test_augment_throughput_tiny_run():
    import shutil
    import subprocess

    augment_throughput = pytest.importorskip("augment_throughput")
    git = shutil.which("git") and subprocess.run(["git", "-C", str(BENCH), "rev-parse", "HEAD"], capture_output=True)
    args = ["--images", "3", "--slots", "2", "--m", "2", "--crops", "4", "--runs", "1", "--output-size", "24"]
    if git and git.returncode == 0:
        args += ["--baseline", "HEAD"]  # committed fkdstore under another module name: same crops, a ratio
    res = augment_throughput.main(args)
    rows = {r["store"]: r for r in res["rows"]}
    assert set(augment_throughput.PIPELINES) <= set(rows)
    assert rows[augment_throughput.BASE_ROW]["ratio"] == 1.0
    assert all(r["crops_per_cpu_s"] > 0 for r in rows.values())
    if "--baseline" in args:
        assert res["current_over_baseline"]["cpu"] > 0
        assert "baseline" in augment_throughput.to_markdown(res)


def test_read_breakdown_tiny_run(capsys, tmp_path):
    """benchmarks/read_breakdown.py (issue 13's read(i) analysis, with the per-image record what-if) runs."""
    read_breakdown = pytest.importorskip("read_breakdown")
    read_breakdown.main(["--images", "96", "--crops", "8", "--repeat", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "read(i) bound" in out and "what-if record layout" in out and "record read(i) bound" in out


def test_codec_fidelity_whole_store_rows_and_verdict():
    codec_fidelity = pytest.importorskip("codec_fidelity")
    run_all = pytest.importorskip("run_all")
    rows = codec_fidelity.run(2, 4, 50, 0, specs=["ms:k=5", "ms:k=5,dtype=q8"])
    rows += codec_fidelity.run(3, 4, 50, 0, codec_fidelity.WHOLE_STORE_SPECS, fidelity=False)
    assert all(r["seeded_bytes_per_crop"] < r["bytes_per_crop"] for r in rows)  # no box/flip arrays
    assert "whole store, seeded crops (default)" in codec_fidelity.table(rows)
    line = run_all.fidelity_verdict(rows)[0]
    assert "whole store at N = 3" in line and "seeded crops (the default)" in line


TINY_LOADER = ["--slots", "8", "--output-size", "32", "--crops", "48", "--crops-per-batch", "16", "--workers", "0",
               "--runs", "1"]


def test_loader_table_tiny_run(capsys):
    """benchmarks/dataset_throughput.py (the loader table of RESULTS.md) runs: every output and m has a row, and
    the decode + crop limit is measured through the dataset's own image source."""
    dataset_throughput = pytest.importorskip("dataset_throughput")
    res = dataset_throughput.main(["--images", "6", *TINY_LOADER])
    capsys.readouterr()
    got = {(r["output"], r["loader"], r["m"]) for r in res["rows"]}
    for out in dataset_throughput.OUTPUTS:  # with and without the batch pool, against the plain loader of its dtype
        label, plain = dataset_throughput.LABEL[out], dataset_throughput.PLAIN[out]
        assert (dataset_throughput.LABEL[plain], "plain PIL", 1) in got
        assert {(label, "TorchDataset", m) for m in dataset_throughput.MS} <= got
    assert all(r["crops_per_s"] > 0 for r in res["rows"])
    assert set(res["verdict"]) >= {"pool", "no_pool", "never_slower"}
    assert "without it" in dataset_throughput.verdict_text(res["verdict"], res["targets"])
    assert all(res["limit_us"][str(m)]["decode"] > 0 and res["limit_us"][str(m)]["crop_resize"] > 0
               for m in dataset_throughput.MS)
    assert "verdict" in res


def test_loader_table_pairs_its_epochs():
    """Each run of the loader table times every loader once, in pairs: the plain loader opens and closes its dtype's
    group, and for each m the limit loader and the rows with and without the pool follow each other."""
    dataset_throughput = pytest.importorskip("dataset_throughput")
    order = dataset_throughput.schedule()
    for dtype in set(dataset_throughput.PLAIN.values()):
        at = [i for i, key in enumerate(order) if key == (dtype, 0)]
        assert len(at) == 2
        group = order[at[0] + 1:at[1]]
        rows = {o for o in dataset_throughput.OUTPUTS if dataset_throughput.PLAIN[o] == dtype}
        assert {k for k in group if k[0] != "limit"} == {(o, m) for o in rows for m in dataset_throughput.MS}
    for m in dataset_throughput.MS:
        i = order.index(("limit", m))
        assert set(order[i + 1:i + 3]) == {("uint8", m), ("uint8 no pool", m)}
    rows = {k for k in order if k[1] and k[0] != "limit"}
    assert len(rows) == len([k for k in order if k[1] and k[0] != "limit"])  # each row once per run


def test_loader_profile_tiny_run(capsys):
    """benchmarks/dataset_profile.py runs: each profile times the image source's decode inside the items."""
    dataset_profile = pytest.importorskip("dataset_profile")
    res = dataset_profile.main(["--images", "16", *TINY_LOADER])
    capsys.readouterr()
    assert res["profiles"] and all(p["inside_us"]["decode"] > 0 and p["alone_us"]["decode"] > 0
                                   for p in res["profiles"])
    assert res["rows"]


def test_generate_overhead_tiny_run(capsys):
    """benchmarks/generate_overhead.py runs (a 1000-class teacher on a 2-class folder: num_classes given)."""
    generate_overhead = pytest.importorskip("generate_overhead")
    generate_overhead.main(["--images", "2", "--crops", "2", "--input-size", "32", "--repeats", "1",
                            "--num-workers", "0"])
    out = capsys.readouterr().out
    assert "overhead ratio b/a" in out and "crops/s" in out
