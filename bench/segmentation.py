"""Nucleus segmentation benchmark: learned model vs the classical baseline, same run.

Quality on the official *test* splits (CoNSeP: 224 patches of 256 px, MoNuSeg: 14 tiles of
1000 px, both 0.25 µm/px): AJI, PQ (DQ, SQ), Dice as the mean over images (HoVer-Net's
protocol, per image) and pooled over all images of the split; detection F1 with centroids
matched within 6 µm (24 px); F_d and per-type F1 with HoVer-Net's radius of 12 px at
0.25 µm/px (3 µm) and weights. Speed: megapixels (input, 0.25 µm/px) per second end to end
(``segment_slide``: reading, network, watershed, measurements) on a mosaic of real H&E
patches, learned vs classical in the same process.

    python bench/segmentation.py                     # everything on this machine's CPU
    python bench/segmentation.py --speed-only --device cuda --mosaic-px 8192 --out speed.json
    python bench/segmentation.py --stain-shift       # AJI/PQ under stain shifts (issue #16)

Stain shift (``--stain-shift``, ``bench/results/segmentation_stain_shift.json``): the test
images re-stained (Macenko, ``imaging.stain.macenko_restain``) to each ``"benchmark"`` member
of the stain bank (``weights/stain_bank.json``: sections and slides whose stains are not in
the training sets, plus four synthetic extremes), scored for the model and the classical
baseline, each also with test-time Macenko normalisation to the training reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.paths import REPO_DIR, shared_data_dir  # noqa: E402
from ghist_core.segmentation import ArraySlide, ClassicalSegmenter, load_segmenter  # noqa: E402
from ghist_core.training.segmentation_data import CONSEP_TYPES, DATA_MPP, load_split  # noqa: E402
from ghist_core.training.segmentation_metrics import DetectionCounts, SegCounts, detection_counts, seg_counts  # noqa: E402
from ghist_core.io.hashing import sha256_file  # noqa: E402

RESULTS = REPO_DIR / "bench" / "results" / "segmentation.json"
STAIN_SHIFT_RESULTS = REPO_DIR / "bench" / "results" / "segmentation_stain_shift.json"
CUDA_RESULTS = REPO_DIR / "bench" / "results" / "segmentation_cuda.json"
DET_RADIUS_UM = 6.0
HOVERNET_RADIUS_PX = 12  # at 0.25 µm/px


def evaluate(seg, samples) -> dict:
    """Scores of one segmenter on one split (per-image mean and pooled)."""
    per, pooled = [], SegCounts()
    det6, det_hn = DetectionCounts(), DetectionCounts()
    name_to_int = {n: i + 1 for i, n in enumerate(CONSEP_TYPES)}
    for s in samples:
        inst, cells = seg.segment_tile(s.rgb, DATA_MPP)
        c = seg_counts(s.inst, inst)
        per.append(c)
        pooled = pooled + c
        pred_types = np.zeros(int(inst.max()) + 1, int)
        if len(cells):
            pred_types[cells["id"].to_numpy()] = [name_to_int.get(t, 0) for t in cells["type"]]
        det6 = det6 + detection_counts(s.inst, inst, DET_RADIUS_UM / DATA_MPP)
        det_hn = det_hn + detection_counts(s.inst, inst, HOVERNET_RADIUS_PX, s.types, pred_types)
    mean = {k: float(np.mean([c.scores()[k] for c in per])) for k in ("aji", "pq", "dq", "sq", "dice")}
    out = {**{k: round(v, 4) for k, v in mean.items()},
           "f1_detection": round(det6.f1, 4), "f_d": round(det_hn.f1, 4),
           "pooled": {k: round(v, 4) for k, v in pooled.scores().items()},
           "n_images": len(samples), "n_true": int(pooled.tp + pooled.fn), "n_pred": int(pooled.tp + pooled.fp)}
    if samples and samples[0].types is not None:
        out["per_type_f1"] = None  # the classical baseline has no classifier
    if samples and samples[0].types is not None and getattr(seg, "type_names", ()):
        out["per_type_f1"] = {n: round(det_hn.type_f1(i + 1), 4) for i, n in enumerate(CONSEP_TYPES)}
    return out


def mosaic(root: Path, side_px: int, seed: int = 0) -> np.ndarray:
    """A square of real 256 px CoNSeP patches (0.25 µm/px), as a stand-in for a 40x slide region."""
    files = sorted((root / "consep").glob("*/*.inst.png"))
    from PIL import Image

    rng = np.random.default_rng(seed)
    n = side_px // 256
    img = np.zeros((n * 256, n * 256, 3), np.uint8)
    picks = rng.choice(len(files), size=n * n, replace=len(files) < n * n)
    cache: dict[int, np.ndarray] = {}
    for k, i in enumerate(picks):
        if i not in cache:
            stem = str(files[i])[: -len(".inst.png")]
            path = stem + (".png" if Path(stem + ".png").exists() else ".jpg")
            cache[i] = np.asarray(Image.open(path).convert("RGB"))
        y, x = divmod(k, n)
        img[y * 256:(y + 1) * 256, x * 256:(x + 1) * 256] = cache[i]
    return img


def speed(seg, rgb: np.ndarray, **kw) -> dict:
    slide = ArraySlide(rgb, DATA_MPP)
    t = time.perf_counter()
    cells = seg.segment_slide(slide, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    mpx = rgb.shape[0] * rgb.shape[1] / 1e6
    return {"mpx_per_s": round(mpx / dt, 3), "seconds": round(dt, 2), "mpx": round(mpx, 2), "n_cells": len(cells)}


def stain_shift(model, classical, root: Path, *, every: dict[str, int], out: Path, ttn: bool = True) -> dict:
    """AJI / PQ per stain shift for the model and the classical baseline (+ test-time normalisation).

    Subsets: every k-th image of each test split (the same images for every method and
    shift). The JSON is rewritten after each (dataset, shift), so a killed run keeps what it has.
    """
    from dataclasses import replace

    from ghist_core.imaging.stain import macenko_restain
    from ghist_core.training.stain_bank import load_stain_bank, stain_angle_deg

    bank = load_stain_bank()
    ref = bank.reference
    shifts = bank.select("benchmark")
    keys = ("aji", "pq", "dq", "sq", "dice", "f1_detection", "n_pred", "n_true")
    methods = {"model": model, "classical": classical}
    res: dict = {"protocol": {
        "shift": "each test image re-stained with imaging.stain.macenko_restain to a benchmark member's stain "
                 "matrix and max concentrations (its own stains estimated per image)",
        "ttn": "test-time normalisation: each image re-stained to the bank's training reference "
               "(median of the CoNSeP + MoNuSeg train members) before segmentation",
        "subset": {ds: f"every {k}-th image of the sorted test split (start 0)" for ds, k in every.items()},
        "scores": "mean over images (HoVer-Net protocol), as in segmentation.json",
        "goal": "model worst-case AJI drop <= 0.03 and model AJI >= classical + 0.10 on every shift",
        "drops": "against the un-normalised original images of the same method (for *_ttn rows too)",
        "caveat": "the shifts are Macenko re-stainings, which Macenko test-time normalisation can undo almost "
                  "exactly; real lab/scanner differences are not only a 2-stain change, so *_ttn rows flatter TTN"},
        "weights_sha256": model.card.get("sha256"), "reference": {"stain_matrix": ref.stain_matrix,
                                                                 "max_concentrations": ref.max_concentrations},
        "shifts": {m.name: {"source": m.source, "licence": m.licence,
                            "angle_to_reference_deg": np.round(stain_angle_deg(m.matrix, ref.matrix), 1).tolist(),
                            "max_concentrations": m.max_concentrations} for m in shifts},
        "datasets": {}}
    for ds, k in every.items():
        samples = load_split(root, ds, "test")[::k]
        block = res["datasets"][ds] = {"n_images": len(samples), "names": [s.name for s in samples], "scores": {}}
        for shift in [None] + shifts:
            name = "original" if shift is None else shift.name
            t = time.perf_counter()
            imgs = [s.rgb if shift is None else macenko_restain(s.rgb, shift.matrix, shift.max_c) for s in samples]
            variants = {"": imgs}
            if ttn:
                variants["_ttn"] = [macenko_restain(im, ref.matrix, ref.max_c) for im in imgs]
            row = {}
            for suffix, ims in variants.items():
                cur = [replace(s, rgb=im) for s, im in zip(samples, ims)]
                for mname, seg in methods.items():
                    r = evaluate(seg, cur)
                    row[mname + suffix] = {key: r[key] for key in keys}
            block["scores"][name] = row
            print(f"{ds} {name}: " + ", ".join(f"{m} AJI {v['aji']:.3f} PQ {v['pq']:.3f}" for m, v in row.items())
                  + f" ({time.perf_counter() - t:.0f} s)", flush=True)
            _stain_shift_summary(res)
            atomic_write_text(out, json.dumps(res, indent=1))
    return res


def _stain_shift_summary(res: dict) -> None:
    """Drops vs the original images, the worst shift per method, and the issue's goals."""
    for ds, block in res["datasets"].items():
        sc = block["scores"]
        if "original" not in sc:
            continue
        summ = block["summary"] = {}
        for method in sc["original"]:
            # drops are against the *un-normalised* original, so a normalisation that costs accuracy on
            # the original images shows up as a drop too
            plain = method.removesuffix("_ttn")
            base = sc["original"][plain]["aji"]
            drops = {name: round(base - row[method]["aji"], 4) for name, row in sc.items()
                     if name != "original" or method != plain}
            if not drops:
                continue
            worst = max(drops, key=drops.get)
            summ[method] = {"aji_original": sc["original"][method]["aji"], "aji_drop_vs_unnormalised_original": drops,
                            "worst_shift": worst, "worst_aji": sc[worst][method]["aji"], "worst_aji_drop": drops[worst],
                            "worst_pq": min(row[method]["pq"] for name, row in sc.items() if name != "original")}
        for suffix in ("", "_ttn"):
            m, c = "model" + suffix, "classical" + suffix
            if m in summ and c in summ:
                margins = {name: round(row[m]["aji"] - row[c]["aji"], 4) for name, row in sc.items()}
                summ["goal" + suffix] = {"worst_drop_le_0.03": summ[m]["worst_aji_drop"] <= 0.03,
                                         "model_minus_classical_aji": margins,
                                         "ge_classical_plus_0.10_everywhere": min(margins.values()) >= 0.10}
        if "model_ttn" in sc["original"]:
            summ["ttn_gain_model_aji"] = {name: round(row["model_ttn"]["aji"] - row["model"]["aji"], 4)
                                          for name, row in sc.items()}
    gains = [b["summary"].get("ttn_gain_model_aji") for b in res["datasets"].values() if "summary" in b]
    if gains and all(gains):
        # the rule for wiring TTN into segment_tile: it helps on every shift and costs nothing unshifted
        res["ttn_helps_everywhere"] = all(v > 0 for g in gains for k, v in g.items() if k != "original") and \
            all(g["original"] >= -0.005 for g in gains)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(shared_data_dir() / "nuclei"))
    ap.add_argument("--weights", default=None, help="safetensors file (card beside it); default: bundled")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--mosaic-px", type=int, default=1856)  # one 1024 px tile core at 0.5 µm/px
    ap.add_argument("--classical-mosaic-px", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help=f"default {RESULTS.name} ({STAIN_SHIFT_RESULTS.name} with --stain-shift)")
    ap.add_argument("--stain-shift", action="store_true", help="the stain-shift benchmark only")
    ap.add_argument("--consep-every", type=int, default=4, help="stain shift: every k-th CoNSeP test patch")
    ap.add_argument("--monuseg-every", type=int, default=2, help="stain shift: every k-th MoNuSeg test tile")
    ap.add_argument("--no-ttn", action="store_true", help="stain shift: skip test-time normalisation")
    a = ap.parse_args(argv)
    root = Path(a.data_root)
    model = load_segmenter(a.weights, device=a.device)
    classical = ClassicalSegmenter()
    if a.stain_shift:
        stain_shift(model, classical, root, every={"consep": a.consep_every, "monuseg": a.monuseg_every},
                    out=Path(a.out or STAIN_SHIFT_RESULTS), ttn=not a.no_ttn)
        return
    a.out = a.out or str(RESULTS)
    device_name = torch.cuda.get_device_name(0) if model.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"model {model!r}; device {device_name}", flush=True)

    rgb = mosaic(root, a.mosaic_px)
    if model.device.type == "cuda":  # warm-up: cudnn autotune, allocator
        model.segment_slide(ArraySlide(rgb[:2048, :2048], DATA_MPP), batch_size=a.batch_size)
    sp_model = speed(model, rgb, batch_size=a.batch_size)
    crgb = rgb[: a.classical_mosaic_px, : a.classical_mosaic_px] if a.classical_mosaic_px else rgb
    sp_classical = speed(classical, crgb)
    ratio = sp_model["mpx_per_s"] / sp_classical["mpx_per_s"]
    print(f"speed: model {sp_model}, classical {sp_classical}, ratio model/classical {ratio:.2f}", flush=True)
    key = "cuda" if model.device.type == "cuda" else "cpu"
    speed_block = {"device": device_name, "model": sp_model, "classical": sp_classical,
                   "ratio_model_to_classical": round(ratio, 3), "input_mpp": DATA_MPP}
    if a.speed_only:  # refresh this device's speed inside an existing results file, else a file of its own
        out = Path(a.out)
        prev = json.loads(out.read_text()) if out.exists() else {}
        if "speed" in prev:
            prev["speed"][key] = speed_block
        else:
            prev = {key: speed_block}
        atomic_write_text(out, json.dumps(prev, indent=1))
        return

    results: dict = {"model": {}, "classical": {}}
    for ds in ("consep", "monuseg"):
        samples = load_split(root, ds, "test")
        for name, seg in (("model", model), ("classical", classical)):
            t = time.perf_counter()
            results[name][ds] = evaluate(seg, samples)
            print(f"{ds} {name}: {results[name][ds]} ({time.perf_counter() - t:.0f} s)", flush=True)
        r = results["model"][ds]["aji"] - results["classical"][ds]["aji"]
        print(f"{ds}: AJI model - classical = {r:+.3f}", flush=True)
    cuda = json.loads(CUDA_RESULTS.read_text()).get("cuda") if CUDA_RESULTS.exists() else None
    for name in ("model", "classical"):
        results[name]["mpx_per_s"] = {"cpu": speed_block[name]["mpx_per_s"],
                                      "cuda": cuda[name]["mpx_per_s"] if cuda else None}
    weights = Path(a.weights) if a.weights else REPO_DIR / "weights" / "nuclei-seg.safetensors"
    results.update({
        "device": f"cpu: {device_name}" + (f"; cuda: {cuda['device']}" if cuda else ""),
        "weights_sha256": sha256_file(weights),
        "speed": {"cpu": speed_block, "cuda": cuda},
        "protocol": {"input_mpp": DATA_MPP, "model_mpp": model.mpp,
                     "aji_pq_dice": "mean over images (HoVer-Net protocol); 'pooled' = counts summed over all images",
                     "f1_detection_radius_um": DET_RADIUS_UM, "f_d_radius_px_at_0.25": HOVERNET_RADIUS_PX,
                     "per_type_f1": "HoVer-Net weights (2, 2, 1, 1), radius 12 px",
                     "consep_note": "our CoNSeP copy is 256 px JPEG-derived patches, not the 1000 px tiles: "
                                    "published per-tile figures are a close, not identical, reference",
                     "speed": "megapixels of 0.25 µm/px input per second, segment_slide end to end",
                     "cuda_note": "CUDA figures: H100 80GB, 67 Mpx mosaic, measured with overlap_px=48; "
                                  "the default is now 96 px (exact seams), about 1.24x more network work per Mpx"},
        "reference_hovernet": {"consep": {"aji": 0.547, "pq": 0.547, "dice": 0.853, "f_d": 0.748},
                               "monuseg": {"aji": 0.618}},
    })
    atomic_write_text(a.out, json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
