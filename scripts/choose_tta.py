"""Test-time augmentation for ``segment_tile``, chosen on the validation split (docs/DECISIONS.md,
session 13): mean AJI of the 66 native validation images (CoNSeP + MoNuSeg held out by source
tile, seed 0, as in training) with 1, 2, 4 and 8 flipped/transposed copies, as stated, the card's
thresholds. The pick: the highest mean, or the cheapest within 0.002 of it. No test image.

    python scripts/choose_tta.py [--model nuclei-seg-stain] [--out bench/results/segmentation_tta_choice.json]
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
from ghist_core.segmentation.model import TTA_COPIES  # noqa: E402
from ghist_core.training.segmentation_data import DATA_MPP, load_split, split_by_tile  # noqa: E402
from ghist_core.training.segmentation_metrics import seg_counts  # noqa: E402

TOLERANCE = 0.002


def pick(mean_aji: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The cheapest number of copies whose mean AJI is within ``tolerance`` of the best."""
    best = max(mean_aji.values())
    return min(k for k, v in mean_aji.items() if v >= best - tolerance)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-seg-stain")
    ap.add_argument("--data-root", default=str(shared_data_dir() / "nuclei"))
    ap.add_argument("--out", default=str(REPO_DIR / "bench" / "results" / "segmentation_tta_choice.json"))
    a = ap.parse_args(argv)
    seg = load_segmenter(a.model, device="cpu")
    seg.nucleus_scale = 1.0
    val = []
    for ds in ("consep", "monuseg"):
        val += split_by_tile(load_split(Path(a.data_root), ds, "train"), 0.15, 0)[1]
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
    res = {"rule": "docs/DECISIONS.md, session 13 (test-time augmentation)", "model": a.model,
           "weights_sha256": seg.card.get("sha256"), "images": len(val),
           "tiles": sorted({s.source_tile for s in val}), "copies": {str(k): r for k, r in rows.items()},
           "tolerance": TOLERANCE, "chosen_copies": chosen}
    atomic_write_text(Path(a.out), json.dumps(res, indent=1))
    print(f"chosen: {chosen} copies", flush=True)


if __name__ == "__main__":
    main()
