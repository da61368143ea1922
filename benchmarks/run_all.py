"""Run the fast benchmark subset and regenerate ``benchmarks/RESULTS.md`` and ``benchmarks/figures/*.png``.

    python benchmarks/run_all.py            # what `make bench` runs
    python benchmarks/run_all.py --smoke    # tiny sizes, to check that everything still runs (writes to --out)

Runs, in this order: ``formats.py`` (storage and access against FKD / SRe2L / ReLabel layouts),
``reproduce.py --fast`` (the paper's claims on digits), ``codec_fidelity.py`` (size and KL per codec and
dtype, small default), then every entry of ``OTHERS`` (script, arguments, timeout, what it measures) as a
subprocess, whose ``--json`` tables or stdout are collected. A script that is missing, fails or times out is
reported as such in RESULTS.md. benchmarks/README.md describes every script and its targets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import codec_fidelity  # noqa: E402
import dataset_throughput  # noqa: E402
import formats  # noqa: E402
import reproduce  # noqa: E402

FORMATS_ARGS = ["--images", "512", "--crops", "8", "32", "200"]
REPRODUCE_ARGS = ["--fast"]
FIDELITY_ARGS = ["--images", "32", "--crops", "200", "--classes", "1000"]
SEEDED_SCALE = ("seeded crops (box and flip derived from the seed, not stored): the same scale table, "
                "what deriving them on every read costs")
READ_AT_32 = "cold random label reads at M = 32, 4,096 images, against FKD's per-image torch.load (issue 13)"
OTHERS = [  # (script, args, timeout s, takes --json, what it measures)
    ("generate_overhead.py", ["--images", "8", "--repeats", "1"], 150, False,
     "label generation throughput vs teacher-only forward"),
    ("dataset_throughput.py", ["--quick", "--runs", "5", "--label-store-images", "4000"], 600, True,
     "the loader table: TorchDataset (uint8 + DeviceLoader normaliser, float32) vs a plain PIL loader, % of the "
     "decode + crop limit"),
    ("dataset_profile.py", ["--quick"], 300, True,
     "TorchDataset item profile, limit, and crops/s vs a plain PIL loader on photo-sized JPEGs"),
    ("store_layout.py", ["--images", "512"], 120, True, "fkdstore layout vs other Zarr layouts and per-image files"),
    ("store_layout.py", ["--images", "4096", "--crops", "32", "--repeat", "5"], 300, True, READ_AT_32),
    ("read_breakdown.py", ["--repeat", "5"], 300, False,
     "where a cold read(i) spends its time at M = 32, and the per-image record what-if (issue 13)"),
    ("remote_read.py", ["--num-images", "100000", "--batches", "5"], 480, True,
     "reading from S3 (moto + 20 ms per request) vs local disk, and the TorchDataset label path"),
    ("labelmap_size.py", ["--images", "256"], 240, True,
     "label maps (ReLabel): fkdstore's bytes per image and at ImageNet-1K against ReLabel's per-image .pt files and "
     "the paper's Table 2 (issue 23)"),
    ("augment_size.py", ["--images", "256"], 300, True,
     "bytes per crop with augmentation records (RandAugment + Mixup/CutMix partner) at M = 200, C = 1000, MS top-5"),
    ("scale.py", ["--sizes", "10000,100000"], 900, True,
     "cost growth with N (write, verify, inspect, read_all, read_batch, label path), peak memory per operation"),
    ("scale.py", ["--sizes", "10000", "--seeded-crops"], 600, True, SEEDED_SCALE),
    ("import_sizes.py", ["--images", "256"], 240, True,
     "size after import against each label zoo's own files (ml-dr, TinyViT, SRe2L, LPQLD), and the largest label "
     "difference against the zoo's own loader"),
    ("sampled_size.py", [], 400, True,
     "sampled labels (S = 8, 16, 32 draws) against MS top-K at equal stored bytes: bytes per crop, TV and bias"),
    ("tail_temperature.py", [], 120, True,
     "top-K logits decoded at T != 1: the tail-mass error of the uniform tail against tail=\"mean\", with its bound"),
    ("ssl_precision.py", [], 120, True,
     "self-supervised heads at tau = 0.1-0.2: float16 log-softmax vs centred float16 vs float32 logits"),
    # no --baseline: a version before format 4.0 (e.g. a478b4e, before augmentation landed) cannot read the stores
    ("augment_throughput.py", [], 240, True,
     "TorchDataset replay crops/s with RandAugment / Mixup / CutMix records vs crop+flip only"),
]
SCALE_FULL = HERE / "scale_full.json"  # the ImageNet-1K run (`scale.py --full`), too long for make bench
SCALE_FULL_SEEDED = HERE / "scale_full_seeded.json"  # the same with `--seeded-crops`
FORMATS_TEXT = """\
Equivalent label sets: same images (ImageNet-like sizes and keys), same crops (`CropSampler`), same
teacher-like outputs (C = 1000). **fkdstore**: one store per codec, default layout. **FKD**: one `torch.save`
file per image `[coords (M,4), flip (M,), labels]` in FKD's fp16 mode (its smallest form; Table 2 used
float32). **SRe2L**: one `torch.save` file per (epoch, batch) with coords, flips, mix parameters and full fp16
logits. **ReLabel**: one `.pt` per image with a [2,5,15,15] float32 top-5 label map; reading RoI-aligns the crop
box on the densified map (own torch RoI-align via `grid_sample`) then softmax; its size does not depend on M.
Random read = labels of m stored crops of one random image, read and decoded to dense float32 (fkdstore's
chunk cache cleared before each read). Epoch read = every image's m crops, read only. Decode = that epoch to
dense float32 [B*m, C] on CPU, 256 images per batch (ReLabel: 32). Speeds are per process-CPU-second (user +
system, best of 3), single-threaded, so the other jobs on this shared machine do not distort the ratios. MS K=5
carries the FKD comparison, Full the SRe2L comparison. ImageNet-1K columns extrapolate per-image and per-crop
bytes to 1,281,167 images; fkdstore's file count there is computed from its layout rule, SRe2L's for batch 256."""

SMOKE = {
    "formats": ["--images", "16", "--crops", "4", "8", "--random-reads", "8", "--full-crops", "64"],
    "fidelity": ["--images", "4", "--crops", "8", "--classes", "100", "--whole-store-images", "8"],
    "reproduce": ["--epochs", "2", "--seeds", "2", "--teacher-epochs", "1", "--ms", "1", "2", "--size", "12",
                  "--teacher-width", "8", "--student-width", "4", "--m", "2"],
}


def run_script(name: str, args: list[str], timeout: int, json_path: Path | None) -> dict:
    path = HERE / name
    cmd = [sys.executable, f"benchmarks/{name}", *args]
    if not path.exists():
        return {"cmd": cmd, "status": "missing", "output": ""}
    if json_path is not None:
        cmd += ["--json", str(json_path)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        out = p.stdout + ("" if p.returncode == 0 else "\n" + p.stderr[-3000:])
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout}s"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    res = {"cmd": cmd, "status": status, "output": out.strip(), "seconds": time.perf_counter() - t}
    if json_path is not None and json_path.exists():
        try:
            res["json"] = json.loads(json_path.read_text())
        except ValueError:
            pass
    return res


def _drop_json(text: str) -> str:
    """Drop a pretty-printed JSON object (lines from "{" to "}") that a script echoes to stdout."""
    out, skip = [], False
    for line in text.splitlines():
        if line == "{":
            skip = True
        if not skip:
            out.append(line)
        if skip and line == "}":
            skip = False
    return "\n".join(out)


def _cmd(cmd: list[str]) -> str:
    return " ".join(["python" if c == sys.executable else c for c in cmd])


def _pct(x):
    return f"{100 * x:.2f}"


def verdicts(fm: dict | None, rp: dict | None) -> list[str]:
    L = []
    if fm:
        t = fm["targets"]
        if "size_vs_table2" in t:
            met = [formats.LABEL[k] for k, v in t["size_vs_table2"].items() if v["met"]]
            miss = {formats.LABEL[k]: v["ratio"] for k, v in t["size_vs_table2"].items() if not v["met"]}
            L.append(f"- **Size vs paper Table 2 (>= 2.5x smaller at M = 200):** met for {', '.join(met) or 'none'}"
                     + ("; **missed** for " + ", ".join(f"{k} ({v:.2f}x)" for k, v in miss.items()) if miss else "")
                     + ". Table 2 counts float32 values; fkdstore stores float16 probabilities and uint16 indices and "
                       "compresses them, so most of the gain is the narrower dtypes. Full vectors of float16 "
                       "probabilities barely compress, so Full cannot reach 2.5x below a float32 table without "
                       "lossy storage.")
        files = [(M, st, v["ratio"], v["met"]) for M, d in t["files"].items() for st, v in d.items()]
        fmiss = [f for f in files if not f[3]]
        L.append("- **Files (>= 100x fewer than one file per image, at ImageNet-1K):** "
                 + ("met for every M and codec measured" if not fmiss else
                    "missed for " + ", ".join(f"M={M} {formats.LABEL[st]} ({r:,.0f}x)" for M, st, r, _ in fmiss))
                 + f" (ratios {min(f[2] for f in files):,.0f}x to {max(f[2] for f in files):,.0f}x)."
                 + "".join(f" Cause for M={M} {formats.LABEL[st]}: the default layout targets 64 MB raw per shard, "
                           f"and a {M}-crop Full row is {M * fm['classes'] * 2 / 1e3:,.0f} KB per image, so shards "
                           f"hold {formats.fkdstore_layout_at(formats.IMAGENET_N, M, fm['classes'], st)[1]} images "
                           "and every per-crop array (boxes and flips too) gets that many shard files; larger shards "
                           "for wide rows (or a separate shard size for the small arrays) would fix it."
                           for M, st, r, _ in fmiss))
        rr = [(M, st, v["ratio"], v["met"]) for M, d in t["random_read"].items() for st, v in d.items()]
        rmiss = [f for f in rr if not f[3]]
        L.append("- **Random single-image read + decode faster than FKD's per-image torch.load:** "
                 + ("met everywhere" if not rmiss else
                    "**missed** for " + ", ".join(f"M={M} {formats.LABEL[st]} ({r:.2f}x)" for M, st, r, _ in rmiss)
                    + ", met for " + (", ".join(f"M={M} {formats.LABEL[st]} ({r:.2f}x)" for M, st, r, ok in rr if ok)
                                       or "none"))
                 + ". Both sides read from the page cache; fkdstore's chunk cache is cleared before every read, "
                   "so each read decompresses a whole inner chunk (several images). Reading a whole epoch "
                   "(the access pattern training has) is where the layout wins by orders of magnitude.")
    if rp:
        c = rp["claims"]
        if "fkd_matches_vanilla_kd" in c:
            v = c["fkd_matches_vanilla_kd"]
            L.append(f"- **FKD ≈ vanilla KD accuracy at a fraction of its time:** accuracy "
                     f"{'agrees' if v['agrees'] else '**disagrees**'} (FKD Full {_pct(v['fkd_acc'])}% vs vanilla KD "
                     f"{_pct(v['kd_acc'])}%, difference {100 * v['diff']:+.2f} points, tolerance "
                     f"±{100 * v['tolerance']:.2f}); training CPU time {v['time_ratio_fkd_over_kd']:.2f}x of vanilla "
                     f"KD (wall {v['wall_ratio_fkd_over_kd']:.2f}x) "
                     f"({v['time_ratio_with_generation']:.2f}x counting the one-off label generation for one run). "
                     + (f" With m = 1 (same lr schedule as vanilla KD) FKD Full reaches {_pct(v['fkd_m1_acc'])}% "
                        f"({100 * v['fkd_m1_diff']:+.2f} points, "
                        f"{'agrees' if v['fkd_m1_agrees'] else '**disagrees**'}) "
                        f"at {v['fkd_m1_time_ratio']:.2f}x the CPU time. " if "fkd_m1_acc" in v else " ")
                     + "The time saving is bounded by how expensive the teacher is relative to the student: here "
                     "the teacher is a small CNN whose forward costs about as much as FKD's per-crop replay "
                     "overhead, far less (relative to the student) than the paper's teachers, so the saving "
                     "comes mostly from m > 1 loading each image once for m crops.")
        if "region_beats_global" in c:
            v = c["region_beats_global"]
            L.append(f"- **Region-level labels beat a global label:** {'agrees' if v['agrees'] else '**disagrees**'} "
                     f"(FKD Full {_pct(v['region_acc'])}% vs global {_pct(v['global_acc'])}%, {100 * v['diff']:+.2f} "
                     "points, same crops and m).")
        if "m_does_not_hurt" in c:
            d = c["m_does_not_hurt"]
            L.append("- **m = 2..8 crops per image do not hurt:** "
                     + "; ".join(f"m={m}: {100 * v['diff_vs_m1']:+.2f} points vs m=1 "
                                 f"({'agrees' if v['agrees'] else '**disagrees**'}; {v['passes']} passes, last-pass lr "
                                 f"{v['final_lr_fraction']:.2f} x base), CPU time {v['time_ratio_vs_m1']:.2f}x"
                                 for m, v in d.items())
                     + ". Caveat: with the same effective epochs, m crops per pass leave E/m passes, and the "
                       "serrated cosine (constant within a pass, as in the paper) then never anneals far when E/m is "
                       "small (the last pass keeps the lr shown). The paper's 300+ epochs make this negligible; here "
                       "it confounds large m.")
        if "stored_mix_vs_train_time_mix" in c:
            v = c["stored_mix_vs_train_time_mix"]
            won = {"tie": "no difference beyond the seeds' spread", "stored": "stored mixing wins",
                   "train-time": "training-time mixing wins"}

            def mixpair(p):
                return (f"{won[p['verdict']]} ({_pct(p['stored_acc'])}% vs {_pct(p['train_time_acc'])}%, "
                        f"{100 * p['diff']:+.2f} points, tolerance ±{100 * p['tolerance']:.2f}; stored costs "
                        f"{p['cpu_ratio_stored_over_train_time']:.2f}x the training CPU time)")
            L.append(f"- **Mixup/CutMix stored (the teacher labels the mixed pixels) vs mixed at training time "
                     f"(FKD's way), E = {v['effective_epochs']}:** RandAugment(2) + mixing stored vs a plain store "
                     f"mixed at training time: {mixpair(v)}"
                     + "".join(f"; same augmentation ({k}): {mixpair(p)}" for k, p in v["same_augmentation"].items())
                     + ". Each stored mixed slot decodes and replays its partner, hence the time.")
        if "fkd_vs_relabel" in c:
            won = {"tie": "no difference beyond the seeds' spread", "FKD": "FKD wins", "ReLabel": "ReLabel wins"}
            rl = rp.get("relabel") or {}
            L.append(f"- **FKD's region labels vs ReLabel's label maps (the paper's central comparison), same teacher "
                     f"({rl.get('size')} x {rl.get('size')} maps, top-{rl.get('k')}), same crop budget:** "
                     + "; ".join(f"{k}: {won[p['verdict']]} ({_pct(p['fkd_acc'])}% vs {_pct(p['relabel_acc'])}%, "
                                 f"{100 * p['diff']:+.2f} points, tolerance ±{100 * p['tolerance']:.2f}; FKD's "
                                 f"training CPU time {p['cpu_ratio_fkd_over_relabel']:.2f}x)"
                                 for k, p in c["fkd_vs_relabel"].items()) + ".")
        if "temperature_rows" in c:
            L.append(temperature_verdict(c["temperature_rows"]))
        if "ssl_centred" in c:
            L.append(ssl_verdict(c["ssl_centred"]))
        if "kd_beats_no_kd" in c:
            v = c["kd_beats_no_kd"]
            L.append(f"- Context: vanilla KD vs no KD at this budget: {100 * v['diff']:+.2f} points "
                     f"({'KD helps' if v['agrees'] else 'KD does not help at this short schedule and tiny scale'}).")
    return L


def temperature_verdict(rows: dict) -> str:
    """Issue 27's line: Full vs MS top-K vs sampled at equal bytes per crop, trained at each T: which equal-bytes
    store wins on accuracy and on calibration (ECE), and whether beyond the seeds' spread."""
    def one(T, v):
        acc, ece = v["accuracy"], v["ece"]
        if not acc:
            return f"T = {T}: too few rows"
        r = v["rows"]
        full = r.get("Full")
        parts = ", ".join(f"{n} ({x['disk_bytes']:.1f} B) {_pct(x['acc_mean'])}% / ECE {_pct(x['ece_mean'])}%"
                          for n, x in r.items() if n != "Full")
        return (f"T = {T}: " + (f"Full {_pct(full['acc_mean'])}% / ECE {_pct(full['ece_mean'])}%; " if full else "")
                + parts + f"; accuracy: {_won(acc)}; calibration: {_won(ece)}")
    return ("- **Top-K vs sampled labels at equal stored bytes per crop (issue 27), accuracy / ECE over seeds:** "
            + "; ".join(one(T, v) for T, v in rows.items()) + ".")


def _won(v: dict) -> str:
    """``<best> wins over <runner-up>`` or ``<best> leads <runner-up> within the seeds' spread``, with the gap."""
    how = "wins over" if v["clear"] else "leads, within the seeds' spread,"
    return f"{v['best']} {how} {v['runner_up']} ({100 * v['gap']:.2f} points, tolerance ±{100 * v['tolerance']:.2f})"


def ssl_verdict(v: dict) -> str:
    """Issue 27's SSL line: float16 logits centred vs not for a D-wide head read at tau."""
    e, st = v["errors"], v["students"]
    cv = v.get("centred_vs_plain")
    words = {"tie": "no difference beyond the seeds' spread", "centred": "centred is better",
             "plain": "plain is better"}
    line = (f"- **Self-supervised head (D = {v['dim']}, tau = {v['tau']:g}) stored as float16 logits, centred vs not "
            f"(issue 27):** decoded error max |q/p - 1| {e['float16 centred']['max_rel']:.1e} centred vs "
            f"{e['float16']['max_rel']:.1e} not (mean TV {e['float16 centred']['tv']:.1e} vs "
            f"{e['float16']['tv']:.1e}), "
            f"{'within' if all(x['max_rel'] <= x['bound'] for n, x in e.items() if 'bound' in x) else '**outside**'} "
            "the float16 bound")
    if cv:
        c, u = st["float16 centred"], st["float16"]
        line += (f"; students (k-NN): {_pct(c['acc_mean'])}% centred vs {_pct(u['acc_mean'])}% not, "
                 f"{100 * cv['diff']:+.2f} points, {words[cv['verdict']]} (tolerance ±{100 * cv['tolerance']:.2f})")
    if "float32" in st:
        line += f"; float32 reference {_pct(st['float32']['acc_mean'])}%"
    return line + f"; the head itself {_pct(v['teacher_knn'])}%, an untrained student {_pct(v['random_student_knn'])}%."


FIDELITY_TEXT = """\
One store per codec and dtype, written with `fkdstore.write` from teacher-like outputs
(`fkdstore.report.teacher_like_probs`, C = 1000; logits codecs get `log p`), read back and decoded at T = 1.
KL is over ALL crops: `KL(teacher ‖ max(decoded, 1e-8))`, decoded values floored at 1e-8 (not
renormalised; a class the codec drops costs `p log(p / 1e-8)`), next to the fraction of crops whose unfloored
KL is infinite (a class with teacher mass decoded as exactly 0: hard, mr, float16 subnormal underflow).
q8 = one byte per value, log-odds grid rounded down (`fkdstore.codecs.quant`); full/logits-all q8 give
zero-coded classes a share of the missing mass (`quant.dequantize_row`)."""


def fidelity_verdict(rows: list[dict]) -> list[str]:
    """Issue 12's size targets: MS top-5 q8 <= 12 label bytes per crop, Full q8 <= 60 % of Full float16."""
    by = {r["codec"]: r for r in rows if "kl_floored_mean" in r}
    whole = {r["codec"]: r for r in rows if "kl_floored_mean" not in r}
    L = []
    ms8, ms16 = by.get("ms:k=5,dtype=q8"), by.get("ms:k=5")
    w8, w16 = whole.get("ms:k=5,dtype=q8"), whole.get("ms:k=5")
    if ms8 and ms16:
        b = ms8["label_bytes_per_crop"]
        line = (f"- **MS top-5 q8 <= 12 bytes per crop on disk (issue 12, at M = 200, C = 1000: see the command "
                f"below):** label fields {'met' if b <= 12 else '**missed**'} ({b:.2f} B; float16 "
                f"{ms16['label_bytes_per_crop']:.2f} B; KL {ms8['kl_floored_mean']:.5f} vs "
                f"{ms16['kl_floored_mean']:.5f} nats)")
        if w8 and w16:
            t, ts = w8["bytes_per_crop"], w8["seeded_bytes_per_crop"]
            line += (f"; whole store at N = {w8['images']} (box, flip, per-image arrays and metadata included): "
                     f"seeded crops (the default) {'met' if ts <= 12 else '**missed**'} ({ts:.2f} B; float16 "
                     f"{w16['seeded_bytes_per_crop']:.2f} B), stored crops {'met' if t <= 12 else 'missed'} "
                     f"({t:.2f} B; float16 {w16['bytes_per_crop']:.2f} B; box + flip {w8['box_bytes_per_crop']:.2f} B)")
        L.append(line + ".")
    f8, f16 = by.get("full:dtype=q8"), by.get("full:dtype=float16")
    if f8 and f16:
        rel = f8["label_bytes_per_crop"] / f16["label_bytes_per_crop"]
        L.append(f"- **Full q8 <= 60 % of Full float16:** {'met' if rel <= 0.6 else '**missed**'} ({rel:.1%}); "
                 f"KL {f8['kl_floored_mean']:.5f} nats, {f8['kl_inf_crops']} of {f8['crops']} crops with "
                 f"infinite KL.")
    return L


def others_verdicts(others: dict) -> list[str]:
    """Verdicts on the issue targets that the OTHERS scripts measure (from their --json results)."""
    def result(script, what=None):
        for r in others.values():
            if Path(r["cmd"][1]).name == script and (what is None or r.get("what") == what) and "json" in r:
                return r["json"]
        return None

    L = []
    if (d := result("store_layout.py", READ_AT_32)) is not None:
        q = d["read_ratio_vs_torch_load"]
        batch = q["fkdstore read_batch(256 random images), cold"]
        one = next(v for k, v in q.items() if k.startswith("fkdstore read(i,") and k.endswith("cold"))
        L.append(f"- **Cold random reads vs FKD's per-image torch.load at M = 32 (issue 13: read_batch(256) >= 10x, "
                 f"read(i) >= 5x):** read_batch {'met' if batch >= 10 else '**missed**'} ({batch:.1f}x); read(i) "
                 f"{'met' if one >= 5 else '**missed**'} ({one:.1f}x). read(i) decompresses and checks one inner "
                 "chunk of each of its 4 arrays; benchmarks/read_breakdown.py (below) measures the floor of those "
                 "checked C calls alone and prints the bound it sets on this ratio, and the bound a hypothetical "
                 "per-image record layout (all fields in one chunk) would give.")
    if (d := result("remote_read.py")) is not None:
        L.append(f"- **Epoch preload from S3 at 20 ms per request within 3x of local disk (issue 11):** "
                 f"{'met' if d['read_all_ratio'] <= 3 else '**missed**'} ({d['read_all_ratio']:.2f}x, "
                 f"{d['s3']['read_all_s']:.2f} s vs {d['local']['read_all_s']:.2f} s, {d['num_images']:,} images).")
        if "torch" in d:
            L.append(f"- **TorchDataset label path from S3 at 20 ms per request within 2x of local disk, per epoch and "
                     f"per batch (issue 25):** {'met' if d['torch_target_met'] else '**missed**'} (epoch "
                     f"{d['torch_epoch_ratio']:.2f}x, batch {d['torch_batch_ratio']:.2f}x; {d['num_images']:,} images, "
                     f"the epoch preloaded by set_epoch).")
    if (d := result("dataset_throughput.py")) is not None and "verdict" in d:
        L.append("- **Loader table (issue 25: m = 1 >= 1.0x, m = 4 >= 1.9x of the plain loader, >= 85 % of the decode "
                 "+ crop limit, crops per worker CPU-second; without the pool never slower than the plain loader):** "
                 f"{dataset_throughput.verdict_text(d['verdict'], d['targets'])}.")
    if (d := result("dataset_profile.py")) is not None:
        rows = {(r["output"], r["m"]): r for r in d["rows"] if r["loader"] == "TorchDataset"}
        m1, m4 = rows.get(("float32", 1)), rows.get(("float32", 4))
        if m1 and m4:
            L.append(f"- **TorchDataset vs a plain PIL loader, photo-sized JPEGs, 224 px float32, 2 workers (issue 16: "
                     f"m = 1 >= 0.97x, m = 4 >= 1.8x):** m = 1 {'met' if m1['ratio'] >= 0.97 else '**missed**'} "
                     f"({m1['ratio']:.2f}x wall, {m1['cpu_ratio']:.2f}x per CPU-s); m = 4 "
                     f"{'met' if m4['ratio'] >= 1.8 else '**missed**'} ({m4['ratio']:.2f}x wall, "
                     f"{m4['cpu_ratio']:.2f}x per CPU-s).")
    return L


def write_results(out: Path, fm, rp, others, cmds, figs, t_total, fd=None) -> None:
    rel = lambda p: os.path.relpath(p, out.parent)  # noqa: E731
    L = ["# fkdstore benchmark results", "",
         f"Generated by `make bench` (`python benchmarks/run_all.py`) on "
         f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
         f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs: load average at start "
         f"{cmds.get('load', '?')}), Python {platform.python_version()}, torch {_torch_version()}. CPU only. "
         f"Total {t_total / 60:.1f} min. Every comparison runs both sides in the same process on the same data; "
         "read the ratios, the absolute speeds are context only (the machine is shared and noisy).", "",
         "## Verdicts", ""]
    L += (verdicts(fm, rp) + (fidelity_verdict(fd) if fd else []) + others_verdicts(others)) or ["(no results)"]
    L += ["", "## Storage and access against the formats in use", "", f"Command: `{cmds['formats']}`", ""]
    if fm:
        L.append(FORMATS_TEXT)
        L.append(formats.to_markdown(fm))
    else:
        L.append("(failed: see the log of run_all.py)")
    L += ["", "## Reproduction of the paper's claims (digits, CPU)", "", f"Command: `{cmds['reproduce']}`", ""]
    L.append(reproduce.to_markdown(rp) if rp else "(failed)")
    L += ["", "## Label codecs: size and fidelity per codec and dtype", "", f"Command: `{cmds['fidelity']}`", ""]
    L += [FIDELITY_TEXT, "", codec_fidelity.table(fd)] if fd else ["(failed: see the log of run_all.py)"]
    L += ["", "## Label generation cost", ""]
    if rp:
        g = rp["generation"]
        L += ["| what | images x M | crops per CPU-s | teacher-only forward, crops per CPU-s | generation / forward |",
              "|---|---:|---:|---:|---:|",
              f"| `fkdstore.generate` on the digits teacher (reproduce.py, CPU, 1 thread, num_workers=0) | "
              f"{g['images']} x {g['M']} | {g['crops_per_s']:,.0f} | {g['teacher_forward_crops_per_s']:,.0f} | "
              f"{g['crops_per_s'] / g['teacher_forward_crops_per_s']:.2f}x |", "",
              "The digits teacher is tiny, so decoding, cropping and writing dominate; with an ImageNet-size teacher "
              "the forward dominates and the ratio approaches 1 (see generate_overhead.py below)."]
    for name, r in others.items():
        L += ["", f"### {name}", "", f"Command: `{_cmd(r['cmd'])}` — {r['status']}"
              + (f" ({r['seconds']:.0f} s)" if "seconds" in r else ""), ""]
        if "markdown" in r.get("json", {}):  # the script renders its own tables
            L += [r["json"]["description"], "", r["json"]["markdown"]]
        elif r["output"]:
            L += ["```text", _drop_json(r["output"])[-6000:], "```"]
        if name.startswith("scale.py"):
            L += scale_full_section(SCALE_FULL_SEEDED if SEEDED_SCALE in name else SCALE_FULL)
    if figs:
        L += ["", "## Figures", ""] + [f"![{p.stem}]({rel(p)})" for p in figs]
    out.write_text("\n".join(L) + "\n")


def scale_full_section(path: Path = SCALE_FULL) -> list[str]:
    """A recorded ImageNet-1K scale run (benchmarks/scale_full.json, or scale_full_seeded.json for seeded
    crops), which make bench does not repeat."""
    if not path.exists():
        return ["", f"ImageNet-1K size: not recorded yet (`python benchmarks/scale.py --full`, kept in {path.name})."]
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        return ["", f"ImageNet-1K size: {path.name} unreadable ({e})."]
    return ["", "#### Recorded run up to ImageNet-1K size (not repeated by make bench)", "",
            f"Command: `{d['command']}` (recorded in `benchmarks/{path.name}`).", "", d["description"], "",
            d["markdown"]]


def _torch_version():
    import torch

    return torch.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; skip the other scripts")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--figures", default=str(HERE / "figures"))
    ap.add_argument("--skip-others", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out, figdir = Path(a.out), Path(a.figures)
    fargs = SMOKE["formats"] if a.smoke else FORMATS_ARGS
    rargs = SMOKE["reproduce"] if a.smoke else REPRODUCE_ARGS
    dargs = SMOKE["fidelity"] if a.smoke else FIDELITY_ARGS
    cmds = {"formats": "python benchmarks/formats.py " + " ".join(fargs),
            "reproduce": "python benchmarks/reproduce.py " + " ".join(rargs),
            "fidelity": "python benchmarks/codec_fidelity.py " + " ".join(dargs),
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    fm = rp = None
    figs: list[Path] = []
    try:
        print(f"[run_all] {cmds['formats']}", flush=True)
        fm = formats.main(fargs)
        figs += formats.plot(fm, figdir)
    except Exception as e:  # keep going: the report says what failed
        print(f"[run_all] formats failed: {e!r}", file=sys.stderr)
    try:
        print(f"[run_all] {cmds['reproduce']}", flush=True)
        rp = reproduce.main(rargs)
        figs += reproduce.plot(rp, figdir)
    except Exception as e:
        print(f"[run_all] reproduce failed: {e!r}", file=sys.stderr)
    fd = None
    try:
        print(f"[run_all] {cmds['fidelity']}", flush=True)
        fd = codec_fidelity.main(dargs)
    except Exception as e:
        print(f"[run_all] codec_fidelity failed: {e!r}", file=sys.stderr)
    others = {}
    if not (a.smoke or a.skip_others):
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="fkd-runall-"))
        for name, args, timeout, takes_json, what in OTHERS:
            print(f"[run_all] {name} {' '.join(args)}", flush=True)
            r = run_script(name, args, timeout, tmp / f"{name}.json" if takes_json else None)
            r["what"] = what
            others[f"{name}: {what}"] = r
    write_results(out, fm, rp, others, cmds, figs, time.perf_counter() - t0, fd)
    print(f"[run_all] wrote {out} and {len(figs)} figures in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0 if (fm and rp) else 1


if __name__ == "__main__":
    sys.exit(main())
