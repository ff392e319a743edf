"""Fit and judge the nucleus-level type refiner (docs/DECISIONS.md, session 14).

Fit on the nuclei of the CoNSeP *train* images outside the validation tiles (matched to a true
nucleus within 12 px), choose C and the class weights on the validation patches by the mean
HoVer-Net per-type F1, then score the test patches once against the card's current decision.
``--design 2``: the fit images also re-stained to 3 random training-role stains each, the choice
(also of the feature set: with or without the stain features) on the validation patches as they
are and re-stained to 3 training-role stains. ``--stress``: the veto check of the refiner in
``--out`` (stain shifts, the slide path); ``--write-card``: it goes into the bundled card.

    python scripts/type_refiner.py [--design 1|2] [--stress | --write-card] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.paths import REPO_DIR, shared_data_dir  # noqa: E402
from ghist_core.segmentation import load_segmenter  # noqa: E402
from ghist_core.segmentation.type_refiner import (STAIN_FEATURES, TypeRefiner, feature_names,  # noqa: E402
                                                  nucleus_type_features)
from ghist_core.training.segmentation_data import (CONSEP_TYPES, DATA_MPP, VALIDATION_FRACTION,  # noqa: E402
                                                    load_split, split_by_tile)
from ghist_core.training.segmentation_metrics import DetectionCounts, centroids, match_centroids  # noqa: E402
from ghist_core.training.stain_bank import restain_samples, source_tile_stains  # noqa: E402

HOVERNET_RADIUS_PX = 12  # at 0.25 µm/px, as bench/segmentation.py
C_GRID = (0.01, 0.1, 1.0, 10.0)
CLASS_WEIGHTS = (None, "balanced")
ALL_FEATURES = feature_names(CONSEP_TYPES)
FEATURE_SETS = {"all": ALL_FEATURES, "no_stain": [n for n in ALL_FEATURES if n not in STAIN_FEATURES]}
FIT_RESTAINS = 3  # design 2: training-role stains per fit image


def image_rows(seg, samples) -> list[dict]:
    """Per image: true types of matched / unmatched true nuclei, features and current type ids of
    matched / unmatched predictions (one segmentation at the stated scale)."""
    out = []
    ids_of = {n: i + 1 for i, n in enumerate(CONSEP_TYPES)}
    for s in samples:
        inst, cells = seg.segment_tile(s.rgb, DATA_MPP, nucleus_scale=1.0)
        feats = nucleus_type_features(s.rgb, inst, cells, DATA_MPP, CONSEP_TYPES)
        gi, gc = centroids(s.inst)
        pi, pc = centroids(inst)
        ia, ib = match_centroids(gc, pc, HOVERNET_RADIUS_PX)
        row_of = {int(i): k for k, i in enumerate(cells["id"].to_numpy())}
        rows = np.array([row_of[int(i)] for i in pi], int)
        f = feats[rows] if len(rows) else np.zeros((0, feats.shape[1]))
        current = np.array([ids_of.get(t, 0) for t in cells["type"]], int)[rows] if len(rows) else np.zeros(0, int)
        ua, ub = np.setdiff1d(np.arange(len(gi)), ia), np.setdiff1d(np.arange(len(pi)), ib)
        gt = s.types[gi]
        out.append({"gt_m": gt[ia], "gt_u": gt[ua], "f_m": f[ib], "f_u": f[ub],
                    "cur_m": current[ib], "cur_u": current[ub]})
    return out


def scores(images: list[dict], predict=None) -> dict:
    """HoVer-Net per-type F1, their mean and F_d; ``predict`` None: the current decision."""
    det = DetectionCounts()
    for im in images:
        pm = im["cur_m"] if predict is None else predict(im["f_m"])
        pu = im["cur_u"] if predict is None else predict(im["f_u"])
        det = det + DetectionCounts(im["gt_m"], pm, im["gt_u"], pu)
    f1 = {n: round(det.type_f1(i + 1), 4) for i, n in enumerate(CONSEP_TYPES)}
    return {"per_type_f1": f1, "mean_type_f1": round(float(np.mean(list(f1.values()))), 4), "f_d": round(det.f1, 4)}


def fit(images: list[dict], c: float, class_weight, names: list[str] = ALL_FEATURES) -> TypeRefiner:
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([im["f_m"] for im in images])[:, [ALL_FEATURES.index(n) for n in names]]
    y = np.concatenate([im["gt_m"] for im in images])
    keep = y > 0
    x, y = x[keep], y[keep]
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(C=c, class_weight=class_weight, max_iter=5000).fit((x - mean) / scale, y)
    return TypeRefiner(list(CONSEP_TYPES), list(names), mean.tolist(), scale.tolist(), lr.coef_.tolist(),
                       lr.intercept_.tolist(), [int(v) for v in lr.classes_])


def design_two_data(seg, fit_s, val_s) -> tuple[list[dict], dict[str, list[dict]]]:
    """Fit rows: the fit images as they are and each re-stained to FIT_RESTAINS random training-role
    members (seed 0); validation: as they are and re-stained to the 3 training-role members farthest
    from the reference (the training script's ``--val-restain 3`` copies)."""
    sys.path.insert(0, str(REPO_DIR / "scripts"))
    import train_segmentation as training
    from ghist_core.training.stain_bank import load_stain_bank

    bank = load_stain_bank().select("train")
    rng = np.random.default_rng(0)
    own = source_tile_stains(fit_s)
    fit_images = image_rows(seg, fit_s)
    for _ in range(FIT_RESTAINS):
        picks = [bank[i] for i in rng.integers(len(bank), size=len(fit_s))]
        fit_images += image_rows(seg, restain_samples(fit_s, picks, own))
    val_sets = {name: image_rows(seg, samples) for name, samples in training.restained_validation(val_s, 3).items()}
    return fit_images, val_sets


def slide_path_scores(seg, samples) -> dict:
    """Per-type F1 through ``segment_slide`` (the app's path: tiles at the working µm/px, so the
    refiner's features are measured there, not at the input's 0.25 µm/px), each patch a slide."""
    from ghist_core.segmentation import ArraySlide

    ids_of = {n: i + 1 for i, n in enumerate(CONSEP_TYPES)}
    det = DetectionCounts()
    for s in samples:
        cells = seg.segment_slide(ArraySlide(s.rgb, DATA_MPP), nucleus_scale=1.0)
        gi, gc = centroids(s.inst)
        pc = cells[["x_um", "y_um"]].to_numpy() / DATA_MPP
        pt = np.array([ids_of.get(v, 0) for v in cells["type"]], int)
        ia, ib = match_centroids(gc, pc, HOVERNET_RADIUS_PX)
        gt = s.types[gi]
        det = det + DetectionCounts(gt[ia], pt[ib], gt[np.setdiff1d(np.arange(len(gi)), ia)],
                                    pt[np.setdiff1d(np.arange(len(pc)), ib)])
    f1 = {n: round(det.type_f1(i + 1), 4) for i, n in enumerate(CONSEP_TYPES)}
    return {"per_type_f1": f1, "mean_type_f1": round(float(np.mean(list(f1.values()))), 4), "f_d": round(det.f1, 4)}


def stress(seg, refiner: TypeRefiner, root: Path) -> dict:
    """Trying to break the refiner before it is adopted: the CoNSeP test patches re-stained to the
    stain-shift benchmark's 8 stains (as its protocol 2: stains estimated per source tile, residual
    kept), and the app's slide path. Current decision vs refiner, same segmentation."""
    import copy

    from ghist_core.training.stain_bank import load_stain_bank

    test = load_split(root, "consep", "test")
    own = source_tile_stains(test)
    out: dict = {"stain_shift": {}}
    for shift in load_stain_bank().select("benchmark"):
        images = image_rows(seg, restain_samples(test, [shift] * len(test), own))
        out["stain_shift"][shift.name] = {"current": scores(images), "refiner": scores(images, refiner.predict)}
        print(shift.name, {k: v["per_type_f1"]["other"] for k, v in out["stain_shift"][shift.name].items()}, flush=True)
    refined = copy.copy(seg)
    refined.type_refiner = refiner
    out["slide_path"] = {"current": slide_path_scores(seg, test), "refiner": slide_path_scores(refined, test)}
    print("slide path", out["slide_path"], flush=True)
    rows = list(out["stain_shift"].values())
    out["summary"] = {
        "stain_shifts_other_f1_higher": sum(r["refiner"]["per_type_f1"]["other"] > r["current"]["per_type_f1"]["other"]
                                            for r in rows),
        "stain_shifts_mean_f1_higher": sum(r["refiner"]["mean_type_f1"] > r["current"]["mean_type_f1"] for r in rows),
        "stain_shifts": len(rows),
        "worst_mean_f1_change": round(min(r["refiner"]["mean_type_f1"] - r["current"]["mean_type_f1"] for r in rows), 4),
        "slide_path_mean_f1_change": round(out["slide_path"]["refiner"]["mean_type_f1"]
                                           - out["slide_path"]["current"]["mean_type_f1"], 4)}
    return out


def write_card(res: dict, model: str) -> dict:
    """The card of the bundled ``model`` with ``type_refiner`` (numbers, data, choice, scores), re-sealed;
    refused unless the result scored these weights and its verdict is ADOPT."""
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.weights.card import seal_card

    path = BUNDLED_WEIGHTS_DIR / f"{model}.json"
    card = json.loads(path.read_text())
    if res.get("weights_sha256") != card.get("sha256") or not res.get("verdict", {}).get("adopt"):
        raise SystemExit("the result is for other weights, or its verdict is not ADOPT: the card is unchanged")
    card["type_refiner"] = {
        **res["refiner"],
        "what": "nucleus-level type decision (multinomial logistic regression on standardised features); "
                "replaces the argmax of the weighted type probabilities for the type label only",
        "rule": res["rule"], "command": "python scripts/type_refiner.py",
        "data": "CoNSeP train split, source tiles outside the training script's validation tiles (seed 0), "
                "nuclei matched within 12 px at 0.25 um/px",
        "fit": res["fit"], "chosen_on_validation": res["validation"]["chosen"],
        "validation": {"tiles": res["validation"]["tiles"], "current": res["validation"]["current"]},
        "test": res["test"], "stress_summary": (res.get("stress") or {}).get("summary"),
        "results": "bench/results/segmentation_type_refiner.json"}
    atomic_write_text(path, json.dumps(seal_card(card, card["sha256"]), indent=1))
    print(f"wrote {path}", flush=True)
    return card


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-seg-stain")
    ap.add_argument("--data-root", default=str(shared_data_dir() / "nuclei"))
    ap.add_argument("--design", type=int, choices=(1, 2), default=1)
    ap.add_argument("--out", default=None, help="default: bench/results/segmentation_type_refiner[_v2].json")
    ap.add_argument("--write-card", action="store_true",
                    help="put the refiner of --out (verdict ADOPT) into the bundled segmenter's card, re-sealed")
    ap.add_argument("--stress", action="store_true",
                    help="only the checks after the fit (stain shifts, the slide path) of the refiner in --out")
    a = ap.parse_args(argv)
    a.out = a.out or str(REPO_DIR / "bench" / "results" /
                         f"segmentation_type_refiner{'' if a.design == 1 else '_v2'}.json")
    seg = load_segmenter(a.model, device="cpu")
    seg.type_refiner = None  # the current decision is the baseline, whatever the card holds
    seg.post.type_merge = None  # both decisions over the four CoNSeP classes (a merge is decided after)
    root = Path(a.data_root)
    if a.write_card:
        return write_card(json.loads(Path(a.out).read_text()), a.model)
    if a.stress:
        res = json.loads(Path(a.out).read_text())
        res["stress"] = stress(seg, TypeRefiner.from_dict(res["refiner"], CONSEP_TYPES), root)
        atomic_write_text(Path(a.out), json.dumps(res, indent=1))
        print(json.dumps(res["stress"]["summary"], indent=1), flush=True)
        return res
    t = time.perf_counter()
    fit_s, val_s = split_by_tile(load_split(root, "consep", "train"), VALIDATION_FRACTION, 0)
    if a.design == 1:
        fit_images, val_sets = image_rows(seg, fit_s), {"original": image_rows(seg, val_s)}
        feature_sets = {"all": ALL_FEATURES}
    else:
        fit_images, val_sets = design_two_data(seg, fit_s, val_s)
        feature_sets = FEATURE_SETS
    print(f"fit {len(fit_images)} images, validation {len(val_s)} x {len(val_sets)} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    grid = []
    best = None
    for fs, names in feature_sets.items():
        for cw in CLASS_WEIGHTS:
            for c in C_GRID:
                ref = fit(fit_images, c, cw, names)
                per = {copy: scores(images, ref.predict) for copy, images in val_sets.items()}
                mean = round(float(np.mean([sc["mean_type_f1"] for sc in per.values()])), 4)
                grid.append({"features": fs, "C": c, "class_weight": cw, "mean_type_f1": mean,
                             **({"per_type_f1": per["original"]["per_type_f1"]} if len(per) == 1 else
                                {"per_copy": {k: v["mean_type_f1"] for k, v in per.items()}})})
                print(grid[-1], flush=True)
                if best is None or mean > best[0]:
                    best = (mean, fs, c, cw, ref)
    val_current = {copy: scores(images) for copy, images in val_sets.items()}
    val_current = val_current["original"] if len(val_current) == 1 else {
        "mean_type_f1": round(float(np.mean([v["mean_type_f1"] for v in val_current.values()])), 4),
        "per_copy": val_current}
    _, fs, c, cw, refiner = best
    test_images = image_rows(seg, load_split(root, "consep", "test"))
    cur, new = scores(test_images), scores(test_images, refiner.predict)
    verdict = {"other_f1_higher": new["per_type_f1"]["other"] > cur["per_type_f1"]["other"],
               "mean_type_f1_higher": new["mean_type_f1"] > cur["mean_type_f1"],
               "no_type_down_more_than_0.02": all(new["per_type_f1"][n] >= cur["per_type_f1"][n] - 0.02
                                                  for n in CONSEP_TYPES)}
    verdict["adopt"] = all(verdict.values())
    n_fit = int(sum(int((im["gt_m"] > 0).sum()) for im in fit_images))
    res = {"rule": "docs/DECISIONS.md, session 14 (type refiner" + (", second design)" if a.design == 2 else ")"),
           "model": seg.card.get("name"),
           "weights_sha256": seg.card.get("sha256"),
           "fit": {"images": len(fit_s), "copies_per_image": 1 if a.design == 1 else 1 + FIT_RESTAINS, "nuclei": n_fit,
                   "by_type": {n: int(sum(int((im["gt_m"] == i + 1).sum()) for im in fit_images))
                               for i, n in enumerate(CONSEP_TYPES)}},
           "design": a.design,
           "validation": {"images": len(val_s), "tiles": sorted({s.source_tile for s in val_s}),
                          "copies": list(val_sets), "current": val_current, "grid": grid,
                          "chosen": {"features": fs, "C": c, "class_weight": cw}},
           "test": {"images": len(test_images), "current": cur, "refiner": new},
           "verdict": verdict, "refiner": refiner.to_dict(), "seconds": round(time.perf_counter() - t, 1)}
    atomic_write_text(Path(a.out), json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("validation", "test", "verdict")}, indent=1), flush=True)
    return res


if __name__ == "__main__":
    main()
