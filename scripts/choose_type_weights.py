"""Per-type decision weights for the learned segmenter's nucleus type, chosen on the validation
split (docs/DECISIONS.md, session 13): the type of a nucleus becomes the argmax of its mean type
probabilities times a weight per type, correcting the training set's class prior (CoNSeP's
"other" is 1.9 % of the training nuclei, 6.4 % of the test nuclei). Nuclei, probabilities and F_d
are unchanged; only the ``type`` label moves.

    python scripts/choose_type_weights.py [--model nuclei-seg-stain] [--out bench/results/segmentation_type_weights.json]

The validation patches choose the weights (coordinate ascent on the mean per-type F1); the test
patches are segmented once and scored once, unweighted and with the chosen weights.
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
from ghist_core.training.segmentation_data import CONSEP_TYPES, DATA_MPP, load_split, split_by_tile  # noqa: E402
from ghist_core.training.segmentation_metrics import DetectionCounts, centroids, match_centroids  # noqa: E402

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


def scores(images: list[tuple], weights: np.ndarray) -> dict:
    """HoVer-Net per-type F1 and their mean with types = argmax(probabilities x weights)."""
    det = DetectionCounts()
    for gt_m, gt_u, p_m, p_u in images:
        det = det + DetectionCounts(gt_m, (p_m * weights).argmax(1) + 1 if len(p_m) else np.zeros(0, int),
                                    gt_u, (p_u * weights).argmax(1) + 1 if len(p_u) else np.zeros(0, int))
    f1 = {n: round(det.type_f1(i + 1), 4) for i, n in enumerate(CONSEP_TYPES)}
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-seg-stain")
    ap.add_argument("--data-root", default=str(shared_data_dir() / "nuclei"))
    ap.add_argument("--out", default=str(REPO_DIR / "bench" / "results" / "segmentation_type_weights.json"))
    a = ap.parse_args(argv)
    seg = load_segmenter(a.model, device="cpu")
    root = Path(a.data_root)
    _, val = split_by_tile(load_split(root, "consep", "train"), 0.15, 0)
    test = load_split(root, "consep", "test")
    t = time.perf_counter()
    val_images = matched(seg, val)
    weights, trace = choose(val_images)
    print(f"chosen weights {dict(zip(CONSEP_TYPES, weights.round(3)))} ({time.perf_counter() - t:.0f} s)", flush=True)
    test_images = matched(seg, test)
    ones = np.ones(len(CONSEP_TYPES))
    res = {
        "rule": "docs/DECISIONS.md, session 13 (per-type decision weights)",
        "model": a.model, "weights_sha256": seg.card.get("sha256"),
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
    atomic_write_text(Path(a.out), json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("chosen_weights", "test", "verdict")}, indent=1))


if __name__ == "__main__":
    main()
