"""The scale-shift block of bench/segmentation.py: zoomed images keep their truth aligned."""

from __future__ import annotations

from ghist_core.io.slide import open_slide
from ghist_core.segmentation import load_segmenter
from testkit import load_repo_script

bench = load_repo_script("bench/segmentation.py")


def test_scale_shift_keeps_the_truth_aligned_with_the_zoomed_image(demo_slide, tmp_path):
    """A one-image split whose truth is the classical segmenter's own nuclei: at zoom 1 it scores
    AJI 1; enlarged 2x and cropped, the truth is cropped the same way, so the classical segmenter
    still matches most of it (a shifted crop would score near 0); the summary names the worst zoom."""
    import numpy as np
    from PIL import Image

    from ghist_core.segmentation import ClassicalSegmenter

    with open_slide(demo_slide) as s:
        rgb = np.ascontiguousarray(s.read_region((600, 900), 0, (512, 512))[..., :3])
    classical = ClassicalSegmenter()
    inst = classical.segment_tile(rgb, 0.25)[0]
    folder = tmp_path / "monuseg" / "test"
    folder.mkdir(parents=True)
    Image.fromarray(rgb).save(folder / "demo.png")
    Image.fromarray(inst.astype(np.uint16)).save(folder / "demo.inst.png")
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    res = bench.scale_shift({"nuclei-seg-stain": seg, "classical": classical}, tmp_path, every={"monuseg": 1},
                            zooms=(2.0,))
    rows = res["datasets"]["monuseg"]["aji"]
    assert rows["1.0"]["classical"] == 1.0
    assert 0.3 < rows["2.0"]["classical"] < 1.0
    summary = res["datasets"]["monuseg"]["summary"]["nuclei-seg-stain"]
    assert summary["worst_zoom"] in rows and summary["worst_aji"] == min(r["nuclei-seg-stain"] for r in rows.values())
