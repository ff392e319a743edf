"""Stain check benchmark: does the app's "stain outside the tested range" note (``ghist_core.pipeline.stain_check``)
stay quiet on real H&E the segmenter was tested on, and speak on stains beyond that range?

    python bench/stain_check.py          # writes bench/results/stain_check.json

Groups (each source image is one "slide": its patches pooled, as the pipeline pools a slide's patches):
1. real images as they are: CoNSeP and MoNuSeg *test* tiles (never in the stain bank), the six HER2ST
   sections (12 spot-centred 256 px patches at 0.5 µm/px each), the bundled demo slide (the pipeline's
   own sampling) and the TIAToolbox target image;
2. the test tiles re-stained to each of the 8 stain-shift benchmark stains (tested: should stay quiet);
3. the test tiles re-stained beyond the envelope: one stain vector turned past the widest tested angle,
   or one stain's amount outside the tested span (should speak);
4. not H&E: the test tiles as greyscale, and re-stained to haematoxylin + DAB (immunohistochemistry).
The baseline is saying nothing (flag rate 0 everywhere); the check's worth is group 3's rate at
group 1's and 2's cost. The re-staining keeps the residual optical density (the stain-shift benchmark's
protocol 2); group-3 targets are built from the training reference, seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.imaging.stain import RUIFROK_RGB_FROM_HED  # noqa: E402
from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.paths import REPO_DIR, shared_data_dir  # noqa: E402
from ghist_core.pipeline.stain_check import (ANGLE_SLACK_DEG, AMOUNT_SLACK, PATCH_MPP, PATCH_PX,  # noqa: E402
                                             SAMPLE_PATCHES, StainRange, beyond_range_stains, check_stain)
from ghist_core.training.stain_bank import (StainMember, image_stains, load_stain_bank, restain_image,  # noqa: E402
                                            stain_angle_deg)

RESULTS = REPO_DIR / "bench" / "results" / "stain_check.json"


def test_slides(root: Path) -> dict[str, list[np.ndarray]]:
    """CoNSeP (patches grouped by source tile) and MoNuSeg test images, at the pipeline's 0.5 µm/px."""
    from ghist_core.training.segmentation_data import load_split

    slides: dict[str, list[np.ndarray]] = defaultdict(list)
    for ds in ("consep", "monuseg"):
        for s in load_split(root, ds, "test", mpp=PATCH_MPP):
            slides[f"{ds}/{s.source_tile}"].append(s.rgb)
    return dict(slides)


def her2st_slides(root: Path, n: int = SAMPLE_PATCHES) -> dict[str, list[np.ndarray]]:
    from ghist_core.training.her2st import spot_regions

    out: dict[str, list[np.ndarray]] = defaultdict(list)
    for section, rgb in spot_regions(root, n, PATCH_MPP, PATCH_PX):
        out[f"her2st/{section}"].append(rgb)
    return dict(out)


def other_slides(slides_dir: Path) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    from ghist_core.io.slide import open_slide
    from ghist_core.pipeline.blocks import PipelineConfig, plan_blocks
    from ghist_core.pipeline.stain_check import stain_patches

    out = {}
    demo = REPO_DIR / "demo" / "CMU-1-Small-Region.svs"
    if demo.exists():
        with open_slide(demo) as s:
            out["demo/CMU-1-Small-Region"] = stain_patches(s, plan_blocks(s, PipelineConfig()))
    tia = slides_dir / "tiatoolbox_target_image.png"
    if tia.exists():
        out["slides/tiatoolbox-target"] = [np.asarray(Image.open(tia).convert("RGB"))]
    return out


def flag(images: list[np.ndarray], bank) -> dict:
    c = check_stain(images, bank)
    return {"flagged": not c.within_tested_range, "angle_deg": list(c.angle_deg), "amount": list(c.amount),
            "reasons": c.outside}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=shared_data_dir() / "nuclei")
    ap.add_argument("--her2st-root", type=Path, default=shared_data_dir() / "her2st")
    ap.add_argument("--slides", type=Path, default=shared_data_dir() / "slides")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    bank = load_stain_bank()
    beyond = beyond_range_stains(bank)
    tests = test_slides(a.data_root)
    real = {**tests, **(her2st_slides(a.her2st_root) if (a.her2st_root / "images").is_dir() else {}),
            **other_slides(a.slides)}
    groups: dict[str, dict] = {"as_they_are": {name: flag(imgs, bank) for name, imgs in real.items()}}
    own = {name: image_stains(imgs) for name, imgs in tests.items()}
    for label, targets in (("benchmark_stains", bank.select("benchmark")), ("beyond_the_range", beyond)):
        rows = {}
        for target in targets:
            for name, imgs in tests.items():
                rows[f"{target.name} | {name}"] = flag([restain_image(im, target, own[name]) for im in imgs], bank)
        groups[label] = rows
        print(f"{label}: {sum(r['flagged'] for r in rows.values())} of {len(rows)} flagged "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # not H&E at all: a greyscale export, and an H-DAB (immunohistochemistry) stain
    dab = StainMember("h-dab", "synthetic", "", "other", np.stack([bank.reference.matrix[0], RUIFROK_RGB_FROM_HED[2]
                                                                   / np.linalg.norm(RUIFROK_RGB_FROM_HED[2])]).tolist(),
                      bank.reference.max_c.tolist())
    grey = lambda im: np.repeat(im.mean(axis=2, keepdims=True), 3, axis=2).round().astype(np.uint8)  # noqa: E731
    rows = {}
    for name, imgs in tests.items():
        rows[f"greyscale | {name}"] = flag([grey(im) for im in imgs], bank)
        rows[f"h-dab | {name}"] = flag([restain_image(im, dab, own[name]) for im in imgs], bank)
    groups["not_h_and_e"] = rows
    summary = {g: {"slides": len(rows), "flagged": sum(r["flagged"] for r in rows.values()),
                   "flag_rate": round(float(np.mean([r["flagged"] for r in rows.values()])), 4) if rows else None}
               for g, rows in groups.items()}
    rate = lambda group, prefix: round(float(np.mean([r["flagged"] for k, r in groups[group].items()  # noqa: E731
                                                      if k.startswith(f"{prefix} |")])), 4)
    per_target = {t.name: rate("beyond_the_range", t.name) for t in beyond}
    per_target.update({kind: rate("not_h_and_e", kind) for kind in ("greyscale", "h-dab")})
    env = StainRange.from_bank(bank)
    res = {"what": __doc__.split("\n\n")[0], "envelope": {"max_angle_deg": env.max_angle_deg, "min_separation_deg": env.min_separation_deg, "amount_low": env.amount_low,
                                                          "amount_high": env.amount_high,
                                                          "slack": {"angle_deg": ANGLE_SLACK_DEG, "amount_factor": AMOUNT_SLACK}},
           "baseline": "say nothing: flag rate 0 in every group", "summary": summary,
           "beyond_the_range_flag_rate_per_target": per_target,
           "target_angles_deg": {t.name: [round(float(v), 1) for v in stain_angle_deg(t.matrix, bank.reference.matrix)]
                                 for t in beyond},
           "groups": groups, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(a.out, json.dumps(res, indent=1))
    print(json.dumps({"summary": summary, "per_target": per_target}, indent=1))


if __name__ == "__main__":
    main()
