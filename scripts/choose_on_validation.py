"""Inference options of the learned segmenter chosen on the validation split only (the training
script's held-out source tiles, ``validation_samples``); the test images are scored once, after.
Rules: docs/DECISIONS.md, session 13.

    python scripts/choose_on_validation.py type-weights [--model nuclei-seg-stain] [--out ...]
    python scripts/choose_on_validation.py type-merge [--model nuclei-seg-stain] [--out ...]
    python scripts/choose_on_validation.py tta [--model nuclei-seg-stain] [--out ...]
    python scripts/choose_on_validation.py watershed [--model nuclei-seg-stain] [--out ...]
    python scripts/choose_on_validation.py scale-picker [--model nuclei-seg-stain] [--out ...]

``type-weights``: per-type decision weights for the nucleus type (the argmax of the mean type
probabilities times a weight per type), a correction of the training set's class prior (CoNSeP's
"other" is 1.9 % of the training nuclei, 6.4 % of the test nuclei); coordinate ascent on the mean
per-type F1 of the validation patches, then the test patches scored once, unweighted and weighted.
Nuclei, probabilities and F_d do not move. Writes ``bench/results/segmentation_type_weights.json``.

``type-merge``: the lineage CoNSeP's "other" (a remainder class) joins in the nucleus type, chosen on
the validation patches by the mean per-type F1 of the three merged classes; the test patches scored
once, merged and not (rule: docs/DECISIONS.md, session 17). Writes
``bench/results/segmentation_type_merge.json``; ``scripts/package_segmentation.py --type-merge``
puts an adopted merge into the card.

``tta``: test-time augmentation for ``segment_tile``: mean validation AJI with 1, 2, 4 and 8
flipped/transposed copies, as stated, the card's thresholds; the pick is the highest mean or the
cheapest within 0.002 of it. Writes ``bench/results/segmentation_tta_choice.json``.

``scale-picker``: a learned decision for the nucleus-scale check (a small tree ensemble over both
readings' certainty, median nucleus area and density), chosen among the candidates of
docs/DECISIONS.md, session 18 by leave-one-source-tile-out AJI on the validation images in 4 stain
copies at zooms 0.67-2, then refitted on all of them. Writes
``bench/results/segmentation_scale_picker_choice.json`` (its ``picker`` is what a card carries).

``watershed``: the five watershed settings on a grid, on the training script's selection data
(validation images as they are and re-stained), by the mean per-image AJI. Writes
``bench/results/segmentation_watershed_choice.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.paths import REPO_DIR, shared_data_dir  # noqa: E402
from ghist_core.segmentation import load_segmenter  # noqa: E402
from ghist_core.segmentation.features import decide_types, merged_type_ids  # noqa: E402
from ghist_core.segmentation.model import TTA_COPIES  # noqa: E402
from ghist_core.training.segmentation_data import CONSEP_TYPES, DATA_MPP, load_split, validation_samples  # noqa: E402
from ghist_core.training.segmentation_metrics import (DetectionCounts, centroids, match_centroids,  # noqa: E402
                                                      seg_counts)

RESULTS = REPO_DIR / "bench" / "results"
#: a setting within this of the best validation score counts as tied; the simplest setting wins
TIE = 0.001


# --- type-weights ---------------------------------------------------------------------------
HOVERNET_RADIUS_PX = 12  # at 0.25 µm/px, as bench/segmentation.py
LOG2_GRID = np.arange(-2.0, 4.01, 0.5)
FIXED = CONSEP_TYPES.index("epithelial")  # the weights are scale-free: one type stays at 1
SWEEPS = 3


def matched(seg, samples) -> list[tuple]:
    """Per image: (true types of matched, true types of unmatched, probabilities of matched and of
    unmatched predictions), from one segmentation at the stated scale."""
    out = []
    cols = [f"prob_{n}" for n in CONSEP_TYPES]
    for s in samples:
        inst, cells = seg.segment_tile(s.rgb, DATA_MPP, nucleus_scale=1.0)
        gi, gc = centroids(s.inst)
        pi, pc = centroids(inst)
        ia, ib = match_centroids(gc, pc, HOVERNET_RADIUS_PX)
        probs = cells.set_index("id").loc[pi, cols].to_numpy(np.float64) if len(pi) else np.zeros((0, 4))
        gt = s.types[gi]
        ua, ub = np.setdiff1d(np.arange(len(gi)), ia), np.setdiff1d(np.arange(len(pi)), ib)
        out.append((gt[ia], gt[ua], probs[ib], probs[ub]))
    return out


def scores(images: list[tuple], weights: np.ndarray, merge: dict[str, str] | None = None) -> dict:
    """HoVer-Net per-type F1 and their mean with types = ``decide_types`` (argmax of probabilities x
    weights; a type in ``merge`` joins its target, in the truth too, and is not scored)."""
    merge = merge or {}
    truth = merged_type_ids(CONSEP_TYPES, merge)
    det = DetectionCounts()
    for gt_m, gt_u, p_m, p_u in images:
        det = det + DetectionCounts(truth[gt_m], decide_types(p_m, CONSEP_TYPES, weights, merge) + 1,
                                    truth[gt_u], decide_types(p_u, CONSEP_TYPES, weights, merge) + 1)
    f1 = {n: round(det.type_f1(i + 1), 4) for i, n in enumerate(CONSEP_TYPES) if n not in merge}
    return {"per_type_f1": f1, "mean_type_f1": round(float(np.mean(list(f1.values()))), 4), "f_d": round(det.f1, 4)}


def choose(images: list[tuple]) -> tuple[np.ndarray, list[dict]]:
    """Coordinate ascent over log2 weights (one type fixed at 1), ties to the smaller |k|."""
    k = np.zeros(len(CONSEP_TYPES))
    trace = []
    for sweep in range(SWEEPS):
        for t in range(len(CONSEP_TYPES)):
            if t == FIXED:
                continue
            best = None
            for v in sorted(LOG2_GRID, key=abs):
                trial = k.copy()
                trial[t] = v
                m = scores(images, 2.0 ** trial)["mean_type_f1"]
                if best is None or m > best[0] + 1e-12:
                    best = (m, v)
            k[t] = best[1]
            trace.append({"sweep": sweep, "type": CONSEP_TYPES[t], "log2_weight": float(best[1]), "mean_type_f1": best[0]})
    return 2.0 ** k, trace



def run_type_weights(seg, root: Path, out: Path) -> dict:
    val = validation_samples(root, ("consep",))
    test = load_split(root, "consep", "test")
    t = time.perf_counter()
    val_images = matched(seg, val)
    weights, trace = choose(val_images)
    print(f"chosen weights {dict(zip(CONSEP_TYPES, weights.round(3)))} ({time.perf_counter() - t:.0f} s)", flush=True)
    test_images = matched(seg, test)
    ones = np.ones(len(CONSEP_TYPES))
    res = {
        "rule": "docs/DECISIONS.md, session 13 (per-type decision weights)",
        "model": seg.card.get("name"), "weights_sha256": seg.card.get("sha256"),
        "validation": {"images": len(val), "tiles": sorted({s.source_tile for s in val}),
                       "unweighted": scores(val_images, ones), "chosen": scores(val_images, weights), "trace": trace},
        "chosen_weights": {n: float(w) for n, w in zip(CONSEP_TYPES, weights)},
        "test": {"images": len(test), "unweighted": scores(test_images, ones), "chosen": scores(test_images, weights)},
    }
    u, c = res["test"]["unweighted"], res["test"]["chosen"]
    res["verdict"] = {
        "other_f1_higher": c["per_type_f1"]["other"] > u["per_type_f1"]["other"],
        "mean_type_f1_higher": c["mean_type_f1"] > u["mean_type_f1"],
        "no_type_down_more_than_0.02": all(c["per_type_f1"][n] >= u["per_type_f1"][n] - 0.02 for n in CONSEP_TYPES),
    }
    res["verdict"]["adopt"] = all(res["verdict"].values())
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("chosen_weights", "test", "verdict")}, indent=1))
    return res


# --- type-merge -----------------------------------------------------------------------------
MERGED = "other"
LINEAGES = tuple(n for n in CONSEP_TYPES if n != MERGED)
MERGE_TIE = "epithelial"  # the rule's tie-break
MERGE_VETO = 0.02
MERGE_REASON = ("CoNSeP's 'other' (miscellaneous) is a remainder (necrotic, mitotic and uncategorised nuclei), "
                "2.4 % of the 18,216 training nuclei (two thirds in 3 of 27 source tiles); 79 % of its test nuclei "
                "lie in one source tile, so its F1 is one image's")


def pick_merge_target(candidates: dict[str, dict]) -> str:
    """The lineage whose merged classes have the highest mean per-type F1; ties to :data:`MERGE_TIE`."""
    return max(candidates, key=lambda d: (candidates[d]["mean_type_f1"], d == MERGE_TIE))


def merge_verdict(unmerged: dict, merged: dict, target: str) -> dict:
    """The rule's veto: every lineage the merge leaves alone keeps its test F1 within :data:`MERGE_VETO`."""
    verdict = {f"{n}_f1_within_{MERGE_VETO}": merged["per_type_f1"][n] >= unmerged["per_type_f1"][n] - MERGE_VETO
               for n in LINEAGES if n != target}
    return {**verdict, "adopt": all(verdict.values())}


def run_type_merge(seg, root: Path, out: Path) -> dict:
    """The lineage CoNSeP's "other" joins, chosen on the validation patches by the mean per-type F1
    of the three merged classes (the card's type weights kept); the test patches scored once."""
    weights = np.asarray(seg.post.type_weights if seg.post.type_weights is not None else np.ones(len(CONSEP_TYPES)))
    val = validation_samples(root, ("consep",))
    test = load_split(root, "consep", "test")
    t = time.perf_counter()
    val_images = matched(seg, val)
    candidates = {dst: scores(val_images, weights, {MERGED: dst}) for dst in LINEAGES}
    chosen = pick_merge_target(candidates)
    print(f"validation {({d: c['mean_type_f1'] for d, c in candidates.items()})}: {MERGED} -> {chosen} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    test_images = matched(seg, test)
    unmerged, merged = scores(test_images, weights), scores(test_images, weights, {MERGED: chosen})
    res = {
        "rule": "docs/DECISIONS.md, session 17 (merge CoNSeP's 'other' into a lineage)",
        "model": seg.card.get("name"), "weights_sha256": seg.card.get("sha256"), "type_weights": weights.tolist(),
        "validation": {"images": len(val), "tiles": sorted({s.source_tile for s in val}),
                       "true_other_nuclei": int(sum((s.types[1:] == 1).sum() for s in val)),
                       "unmerged": scores(val_images, weights), "candidates": candidates},
        "chosen": {MERGED: chosen}, "reason": MERGE_REASON,
        "test": {"images": len(test), "unmerged": unmerged, "merged": merged},
        "verdict": merge_verdict(unmerged, merged, chosen),
    }
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("chosen", "test", "verdict")}, indent=1))
    return res


# --- tta ------------------------------------------------------------------------------------
TOLERANCE = 0.002


def pick(mean_aji: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The cheapest number of copies whose mean AJI is within ``tolerance`` of the best."""
    best = max(mean_aji.values())
    return min(k for k, v in mean_aji.items() if v >= best - tolerance)



def run_tta(seg, root: Path, out: Path) -> dict:
    seg.nucleus_scale = 1.0
    val = validation_samples(root, ("consep", "monuseg"))
    rows = {}
    for k in TTA_COPIES:
        seg.tta = k
        t = time.perf_counter()
        per = {ds: [seg_counts(s.inst, seg.segment_tile(s.rgb, DATA_MPP)[0]).aji for s in val if s.dataset == ds]
               for ds in ("consep", "monuseg")}
        allv = per["consep"] + per["monuseg"]
        rows[k] = {"mean_aji": round(float(np.mean(allv)), 4),
                   **{f"{ds}_mean_aji": round(float(np.mean(v)), 4) for ds, v in per.items()},
                   "seconds": round(time.perf_counter() - t, 1)}
        print(k, rows[k], flush=True)
    chosen = pick({k: r["mean_aji"] for k, r in rows.items()})
    res = {"rule": "docs/DECISIONS.md, session 13 (test-time augmentation)", "model": seg.card.get("name"),
           "weights_sha256": seg.card.get("sha256"), "images": len(val),
           "tiles": sorted({s.source_tile for s in val}), "copies": {str(k): r for k, r in rows.items()},
           "tolerance": TOLERANCE, "chosen_copies": chosen}
    prev = json.loads(out.read_text()) if out.exists() else {}
    atomic_write_text(out, json.dumps({**prev, **res}, indent=1))  # keeps a recorded second design
    print(f"chosen: {chosen} copies", flush=True)
    return res


# --- watershed ------------------------------------------------------------------------------
WATERSHED_GRID = {"np_threshold": (0.4, 0.5), "marker_threshold": (0.01, 0.02, 0.03), "sigma_px": (0.7, 1.0, 1.5),
                  "min_marker_um2": (0.5, 1.0, 2.0), "min_area_um2": (2.0, 4.0, 8.0)}


def run_watershed(seg, root: Path, out: Path, restained: int = 3, workers: int = 2) -> dict:
    """Every setting of :data:`WATERSHED_GRID` on the training script's own selection data (the
    validation images as they are and re-stained to its ``restained`` far training-role stains),
    maps made once; the best mean per-image AJI over the copies wins, ties to the card's setting."""
    import dataclasses
    import itertools
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(REPO_DIR / "scripts"))
    import train_segmentation as training

    seg.nucleus_scale = 1.0
    card_post = seg.post
    t = time.perf_counter()
    maps = training.set_maps(seg, training.restained_validation(validation_samples(root), restained))
    print(f"maps of {sum(len(m) for m in maps.values())} images ({time.perf_counter() - t:.0f} s)", flush=True)
    keys = list(WATERSHED_GRID)
    rows = []
    with ProcessPoolExecutor(workers) as pool:
        for values in itertools.product(*WATERSHED_GRID.values()):
            post = dataclasses.replace(card_post, **dict(zip(keys, values)))
            sc = training.evaluate_sets(maps, seg, post, pool)
            rows.append({**dict(zip(keys, values)), "aji_mean": round(sc["aji_mean"], 4), "aji": round(sc["aji"], 4),
                         "pq": round(sc["pq"], 4), "is_card": all(getattr(post, k) == getattr(card_post, k) for k in keys)})
            print(rows[-1], flush=True)
    seg.post = card_post
    best = max(rows, key=lambda r: (r["aji_mean"], r["is_card"]))
    card_row = next((r for r in rows if r["is_card"]), None)
    res = {"rule": "docs/DECISIONS.md, session 13 (wider watershed tuning)", "model": seg.card.get("name"),
           "weights_sha256": seg.card.get("sha256"), "criterion": "mean over the copies of the mean per-image AJI",
           "copies": list(maps), "images_per_copy": len(next(iter(maps.values()))),
           "card": {k: getattr(card_post, k) for k in keys}, "card_row": card_row,
           "chosen": {k: best[k] for k in keys}, "chosen_row": best, "grid": rows}
    atomic_write_text(out, json.dumps(res, indent=1))
    print(f"chosen {res['chosen']} ({best['aji_mean']}; card {card_row and card_row['aji_mean']})", flush=True)
    return res


# --- scale-gate ----------------------------------------------------------------------------
GATES_PX = (60.0, 80.0, 100.0, 120.0, 160.0, 200.0)
GATE_ZOOMS = (0.67, 1.0, 1.25, 1.5, 2.0)


def gate_rows(seg, samples) -> list[dict]:
    """Per image: both readings' AJI and foreground certainty and the factor-1 median nucleus area
    (working px), so any gate can be scored without segmenting again."""
    from ghist_core.segmentation.model import SCALE_FACTORS, foreground_certainty

    rows = []
    for s in samples:
        hw = s.inst.shape
        row = {}
        for f in SCALE_FACTORS:
            maps = seg._maps_at(s.rgb, DATA_MPP * f)
            if maps is None:
                break
            inst, cells = seg._instances(maps, hw, DATA_MPP, DATA_MPP * f)
            row[f] = (seg_counts(s.inst, inst).aji, foreground_certainty(maps[0]),
                      float(cells["area_um2"].median()) / seg.mpp ** 2 if len(cells) else 0.0)
        if len(row) == len(SCALE_FACTORS):
            rows.append({"aji": [row[f][0] for f in SCALE_FACTORS], "cert": [row[f][1] for f in SCALE_FACTORS],
                         "median_px": row[1.0][2]})
    return rows


def gate_aji(rows: list[dict], gate: float, max_certainty: float = float("inf")) -> float:
    """Mean AJI of the check's choices with area gate ``gate`` and, optionally, trying the 2/3 reading
    only when the factor-1 certainty is below ``max_certainty`` (margin and factors as in the model)."""
    from ghist_core.segmentation.model import SCALE_MARGIN

    if not rows:
        return float("nan")
    out = []
    for r in rows:
        tried = r["median_px"] >= gate and r["cert"][0] < max_certainty
        moved = tried and r["cert"][1] > r["cert"][0] + SCALE_MARGIN
        out.append(r["aji"][1] if moved else r["aji"][0])
    return float(np.mean(out))


def pick_gate(by_zoom: dict[float, list[dict]], gates=GATES_PX) -> tuple[float, dict]:
    """The largest gate within 0.002 of the lowest's mean AJI overall and 0.005 at x1.5 and x2."""
    every = [r for rows in by_zoom.values() for r in rows]
    table = {g: {"all": gate_aji(every, g), **{str(z): gate_aji(rows, g) for z, rows in by_zoom.items()}} for g in gates}
    base = table[gates[0]]
    ok = [g for g in gates if table[g]["all"] >= base["all"] - 0.002
          and all(table[g][str(z)] >= base[str(z)] - 0.005 for z in (1.5, 2.0) if str(z) in base)]
    return max(ok), table


TRIGGERS = (0.80, 0.825, 0.85, 0.875, 0.90, 0.925, 0.95, float("inf"))


def pick_trigger(by_zoom: dict[float, list[dict]], gate: float, triggers=TRIGGERS) -> tuple[float, dict]:
    """The lowest certainty trigger within 0.002 of no trigger's mean AJI overall and 0.005 at x1.5 and
    x2, with each trigger's share of x1 images that would be checked."""
    every = [r for rows in by_zoom.values() for r in rows]
    x1 = by_zoom.get(1.0, [])
    table = {c: {"all": gate_aji(every, gate, c), **{str(z): gate_aji(rows, gate, c) for z, rows in by_zoom.items()},
                 "x1_checked_share": float(np.mean([r["median_px"] >= gate and r["cert"][0] < c for r in x1])) if x1
                 else float("nan")} for c in triggers}
    base = table[float("inf")]
    ok = [c for c in triggers if table[c]["all"] >= base["all"] - 0.002
          and all(table[c][str(z)] >= base[str(z)] - 0.005 for z in (1.5, 2.0) if str(z) in base)]
    return min(ok), table


def _zoomed_validation(root: Path, restained: int, zooms) -> tuple[list[str], object]:
    """The names of the validation copies (as they are and re-stained: the training script's
    selection data) and a generator of ``(zoom, {copy: its samples zoomed})`` over ``zooms``."""
    sys.path.insert(0, str(REPO_DIR / "scripts"))
    sys.path.insert(0, str(REPO_DIR / "bench"))
    import train_segmentation as training
    from segmentation import zoom_sample

    sets = training.restained_validation(validation_samples(root), restained)
    return list(sets), ((z, {copy: [zoom_sample(s, z) for s in samples] for copy, samples in sets.items()})
                        for z in zooms)


def _gate_data(seg, root: Path, restained: int) -> tuple[list[str], dict[float, list[dict]]]:
    """``gate_rows`` of the validation images in every stain copy and zoom."""
    copies, zoomed = _zoomed_validation(root, restained, GATE_ZOOMS)
    by_zoom: dict[float, list[dict]] = {}
    t = time.perf_counter()
    for z, sets in zoomed:
        by_zoom[z] = [r for samples in sets.values() for r in gate_rows(seg, samples)]
        print(f"zoom {z}: {len(by_zoom[z])} images ({time.perf_counter() - t:.0f} s)", flush=True)
    return copies, by_zoom


def run_scale_trigger(seg, root: Path, out: Path, restained: int = 3) -> dict:
    from ghist_core.segmentation.model import SCALE_MIN_AREA_PX

    copies, by_zoom = _gate_data(seg, root, restained)
    chosen, table = pick_trigger(by_zoom, SCALE_MIN_AREA_PX)
    name = lambda c: "none" if c == float("inf") else str(c)
    res = {"rule": "docs/DECISIONS.md, session 13 (certainty trigger)", "model": seg.card.get("name"),
           "weights_sha256": seg.card.get("sha256"), "copies": copies, "zooms": list(GATE_ZOOMS),
           "gate_px": SCALE_MIN_AREA_PX,
           "by_trigger": {name(c): {k: round(v, 4) for k, v in row.items()} for c, row in table.items()},
           "chosen_trigger": name(chosen)}
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps(res, indent=1), flush=True)
    return res


def run_scale_gate(seg, root: Path, out: Path, restained: int = 3) -> dict:
    copies, by_zoom = _gate_data(seg, root, restained)
    chosen, table = pick_gate(by_zoom)
    x1 = by_zoom.get(1.0, [])
    res = {"rule": "docs/DECISIONS.md, session 13 (scale-check area gate)", "model": seg.card.get("name"),
           "weights_sha256": seg.card.get("sha256"), "copies": copies, "zooms": list(GATE_ZOOMS),
           "mean_aji_by_gate": {str(g): {k: round(v, 4) for k, v in row.items()} for g, row in table.items()},
           "x1_checked_share_by_gate": {str(g): round(float(np.mean([r["median_px"] >= g for r in x1])), 4) if x1 else None
                                        for g in GATES_PX},
           "chosen_gate_px": chosen}
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps(res, indent=1), flush=True)
    return res


# --- scale-picker (docs/DECISIONS.md, session 18) ------------------------------------------------
PICKER_ZOOMS = (0.67, 1.0, 1.5, 2.0)
PICKER_MARGINS = (0.0, 0.01, 0.02, 0.03)
#: (kind, trees, learning rate, depth, min leaf): the candidates the rule names
PICKER_CANDIDATES = ([("boosted", n, lr, 2, 1) for n, lr in ((50, 0.05), (100, 0.05), (200, 0.05), (20, 0.1), (30, 0.1))]
                     + [("tree", 1, 1.0, d, leaf) for d in (2, 3, 4) for leaf in (10, 20, 40)])


def picker_rows(seg, samples, zoom: float, copy: str) -> list[dict]:
    """Per image: AJI at factor 1 and at the picker's factor (2/3) and the picker's features."""
    from ghist_core.segmentation.model import SCALE_FACTORS
    from ghist_core.segmentation.scale_picker import scale_picker_features

    f = min(SCALE_FACTORS)
    rows = []
    for s in samples:
        hw = s.inst.shape
        aji, readings = [], []
        for factor in (1.0, f):
            maps = seg._maps_at(s.rgb, DATA_MPP * factor)
            if maps is None:
                break
            inst, cells = seg._instances(maps, hw, DATA_MPP, DATA_MPP * factor, s.rgb)
            aji.append(seg_counts(s.inst, inst).aji)
            readings.append((maps[0], cells))
        # a tile with no nucleus at factor 1 stays there whatever the picker says (as segment_tile does)
        if len(readings) == 2 and len(readings[0][1]):
            rows.append({"name": s.name, "dataset": s.dataset, "tile": s.source_tile, "zoom": zoom, "copy": copy,
                         "aji": aji, "x": scale_picker_features(s.rgb, DATA_MPP, seg.mpp, readings)[0].tolist()})
    return rows


def _picker_model(kind: str, n: int, lr: float, depth: int, leaf: int):
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.tree import DecisionTreeRegressor

    if kind == "boosted":
        return GradientBoostingRegressor(n_estimators=n, max_depth=depth, learning_rate=lr, subsample=0.8, random_state=0)
    return DecisionTreeRegressor(max_depth=depth, min_samples_leaf=leaf, random_state=0)


def picker_cross_validation(rows: list[dict], candidate: tuple, margin: float) -> dict:
    """Leave-one-source-tile-out: each tile's rows decided by a picker fitted on the other tiles.
    The mean AJI over all rows, per (dataset, zoom), and the per-dataset change against factor 1 at
    x1 and x0.67 (the rule's guard)."""
    tiles = np.array([r["tile"] for r in rows])
    x = np.array([r["x"] for r in rows])
    aji = np.array([r["aji"] for r in rows])
    moved = np.zeros(len(rows), bool)
    for t in np.unique(tiles):
        held = tiles == t
        model = _picker_model(*candidate).fit(x[~held], aji[~held, 1] - aji[~held, 0])
        moved[held] = model.predict(x[held]) > margin
    return _score_choice(rows, moved)


def hand_rule_cv(rows: list[dict]) -> dict:
    """The hand rule's choices on the same rows (area gate, certainty margin), scored as
    :func:`picker_cross_validation` scores a picker (nothing is fitted, so no folds)."""
    from ghist_core.segmentation.model import SCALE_MARGIN, SCALE_MIN_AREA_PX
    from ghist_core.segmentation.scale_picker import FEATURES

    cert1, certf, area1 = (FEATURES.index(k) for k in ("cert_1", "cert_f", "log_median_area_1"))
    x = np.array([r["x"] for r in rows])
    moved = (np.expm1(x[:, area1]) >= SCALE_MIN_AREA_PX) & (x[:, certf] > x[:, cert1] + SCALE_MARGIN)
    return _score_choice(rows, moved)


def _score_choice(rows: list[dict], moved: np.ndarray) -> dict:
    aji = np.array([r["aji"] for r in rows])
    chosen = np.where(moved, aji[:, 1], aji[:, 0])
    cells: dict[str, dict] = {}
    guard = []
    for ds in sorted({r["dataset"] for r in rows}):
        for z in PICKER_ZOOMS:
            sel = np.array([r["dataset"] == ds and r["zoom"] == z for r in rows])
            if sel.any():
                cells.setdefault(ds, {})[str(z)] = round(float(chosen[sel].mean()), 4)
                if z in (0.67, 1.0):
                    guard.append(float((chosen[sel] - aji[sel, 0]).mean()))
    return {"mean_aji": round(float(chosen.mean()), 4), "by_dataset_zoom": cells,
            "worst_change_x1_x067": round(min(guard), 4), "moved_share": round(float(moved.mean()), 4)}


def pick_picker(table: list[dict], tie: float = TIE, guard: float = -0.005) -> dict | None:
    """The rule's choice: the highest cross-validated mean AJI among candidates whose guard holds;
    within ``tie`` of it, the fewest trees, then the shallowest, then the largest margin. None when
    no candidate keeps the guard (the rule then keeps the hand rule)."""
    ok = [r for r in table if r["cv"]["worst_change_x1_x067"] >= guard]
    if not ok:
        return None
    best = max(r["cv"]["mean_aji"] for r in ok)
    near = [r for r in ok if r["cv"]["mean_aji"] >= best - tie]
    return min(near, key=lambda r: (r["trees"], r["depth"], -r["margin"]))


def run_scale_picker(seg, root: Path, out: Path, restained: int = 3) -> dict:
    from ghist_core.segmentation.model import SCALE_FACTORS
    from ghist_core.segmentation.scale_picker import ScalePicker

    copies, zoomed = _zoomed_validation(root, restained, PICKER_ZOOMS)
    rows, t = [], time.perf_counter()
    for z, sets in zoomed:
        n_images = len(sets["original"])
        for copy, samples in sets.items():
            rows += picker_rows(seg, samples, z, copy)
        print(f"zoom {z}: {len(rows)} rows ({time.perf_counter() - t:.0f} s)", flush=True)
    table = []
    for cand in PICKER_CANDIDATES:
        for margin in PICKER_MARGINS:
            kind, n, lr, depth, leaf = cand
            table.append({"kind": kind, "trees": n, "learning_rate": lr, "depth": depth, "min_leaf": leaf,
                          "margin": margin, "cv": picker_cross_validation(rows, cand, margin)})
    chosen = pick_picker(table)
    aji = np.array([r["aji"] for r in rows])
    data = (f"{len(rows)} rows: the {n_images} validation images (source tiles "
            f"{sorted({r['tile'] for r in rows})}) as they are and re-stained to {copies[1:]}, at zooms "
            f"{list(PICKER_ZOOMS)}; no test image")
    picker = None
    if chosen is not None:
        cand = (chosen["kind"], chosen["trees"], chosen["learning_rate"], chosen["depth"], chosen["min_leaf"])
        model = _picker_model(*cand).fit(np.array([r["x"] for r in rows]), aji[:, 1] - aji[:, 0])
        picker = ScalePicker.from_sklearn(model, min(SCALE_FACTORS), chosen["margin"], provenance={
            "rule": "docs/DECISIONS.md, session 18", "data": data,
            "candidate": {k: v for k, v in chosen.items() if k != "cv"},
            "cross_validation": chosen["cv"], "segmenter_sha256": seg.card.get("sha256")}).to_dict()
    hand = {"factor_1": _score_choice(rows, np.zeros(len(rows), bool)), "best_of_two": _score_choice(rows, aji[:, 1] > aji[:, 0]),
            "hand_rule": hand_rule_cv(rows)}
    res = {"rule": "docs/DECISIONS.md, session 18 (scale picker)", "model": seg.card.get("name"),
           "weights_sha256": seg.card.get("sha256"), "data": data, "reference": hand, "candidates": table,
           "chosen": chosen, "picker": picker}
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("reference", "chosen")}, indent=1), flush=True)
    return res


# --- scores with the scale check over every copy and zoom (scripts/blend_segmenters.py) ---------


def check_aji(seg, by_zoom: dict[float, list[dict]]) -> dict:
    """Mean validation AJI of the scale check's choices (``seg``'s own gate and trigger, as
    ``segment_tile`` runs it), over every zoom ("all") and per zoom."""
    gate, trigger = seg.scale_min_area_px, seg.scale_max_certainty
    every = [r for rows in by_zoom.values() for r in rows]
    return {"all": round(gate_aji(every, gate, trigger), 4),
            **{str(z): round(gate_aji(rows, gate, trigger), 4) for z, rows in by_zoom.items()}}


def pick_smallest(scores: dict[float, float], tie: float = TIE) -> float:
    """The smallest setting whose score is within ``tie`` of the best (the least change wins ties)."""
    scored = {k: s for k, s in scores.items() if np.isfinite(s)}  # NaN: nothing was scored at that setting
    if not scored:
        raise ValueError("no setting has a score")
    best = max(scored.values())
    return min(k for k, s in scored.items() if s >= best - tie)


JOBS = {"type-weights": (run_type_weights, "segmentation_type_weights.json"),
        "type-merge": (run_type_merge, "segmentation_type_merge.json"),
        "scale-gate": (run_scale_gate, "segmentation_scale_gate_choice.json"),
        "scale-trigger": (run_scale_trigger, "segmentation_scale_trigger_choice.json"),
        "scale-picker": (run_scale_picker, "segmentation_scale_picker_choice.json"),
        "tta": (run_tta, "segmentation_tta_choice.json"),
        "watershed": (run_watershed, "segmentation_watershed_choice.json")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", choices=sorted(JOBS))
    ap.add_argument("--model", default="nuclei-seg-stain")
    ap.add_argument("--data-root", default=str(shared_data_dir() / "nuclei"))
    ap.add_argument("--out", default=None, help="default: bench/results/<the job's file>")
    a = ap.parse_args(argv)
    run, name = JOBS[a.job]
    run(load_segmenter(a.model, device="cpu"), Path(a.data_root), Path(a.out) if a.out else RESULTS / name)


if __name__ == "__main__":
    main()
