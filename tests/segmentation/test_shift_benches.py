"""The stain- and scale-shift blocks of bench/segmentation.py: the truth stays aligned, shifts are grouped and scored."""

from __future__ import annotations

from ghist_core.io.slide import open_slide
from ghist_core.segmentation import load_segmenter
from testkit import load_repo_script

bench = load_repo_script("bench/segmentation.py")


def test_scale_shift_keeps_the_truth_aligned_with_the_zoomed_image(demo_slide, tmp_path):
    """A one-image split whose truth is the classical segmenter's own nuclei: at zoom 1 it scores
    AJI 1; enlarged 2x and cropped, the truth is cropped the same way, so the classical segmenter
    still matches most of it (a shifted crop would score near 0); the summary names the worst zoom;
    the block is in the result file."""
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
    out = tmp_path / "result.json"
    res = bench.scale_shift({"nuclei-seg-stain": seg, "classical": classical}, tmp_path, every={"monuseg": 1},
                            zooms=(2.0,), out=out)
    import json

    assert json.loads(out.read_text())["scale_shift"] == json.loads(json.dumps(res))  # written as it went
    rows = res["datasets"]["monuseg"]["aji"]
    assert rows["1.0"]["classical"] == 1.0
    assert 0.3 < rows["2.0"]["classical"] < 1.0
    summary = res["datasets"]["monuseg"]["summary"]["nuclei-seg-stain"]
    assert summary["worst_zoom"] in rows and summary["worst_aji"] == min(r["nuclei-seg-stain"] for r in rows.values())


def test_stain_shift_fits_each_source_image_once_and_scores_every_shift(demo_slide, tmp_path):
    """A CoNSeP-like split of two source tiles cut into two patches each (truth: the classical
    segmenter's own nuclei): the benchmark groups patches by source tile, scores the control and
    every benchmark stain, and writes its block as it goes."""
    import json

    import numpy as np
    from PIL import Image

    from ghist_core.segmentation import ClassicalSegmenter
    from ghist_core.training.stain_bank import load_stain_bank

    classical = ClassicalSegmenter()
    folder = tmp_path / "consep" / "test"
    folder.mkdir(parents=True)
    with open_slide(demo_slide) as s:
        for tile, (x, y) in {"tileA": (600, 900), "tileB": (1200, 1300)}.items():
            region = np.ascontiguousarray(s.read_region((x, y), 0, (512, 256))[..., :3])
            for k in (1, 2):
                rgb = np.ascontiguousarray(region[:, (k - 1) * 256:k * 256])
                Image.fromarray(rgb).save(folder / f"{tile}_{k:03d}.png")
                Image.fromarray(classical.segment_tile(rgb, 0.25)[0].astype(np.uint16)).save(
                    folder / f"{tile}_{k:03d}.inst.png")
    out = tmp_path / "seg.json"
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    res = bench.stain_shift({"nuclei-seg-stain": seg, "classical": classical}, tmp_path, every={"consep": 2},
                            out=out, ttn=False)
    block = res["datasets"]["consep"]
    assert block["names"] == ["tileA_001", "tileB_001"] and block["n_source_images"] == 2
    assert block["scores"]["original"]["classical"]["aji"] == 1.0
    assert set(block["controls"]["own_stains_per_patch"]) == {"nuclei-seg-stain", "classical"}
    shifts = [m.name for m in load_stain_bank().select("benchmark")]
    assert list(block["scores"]) == ["original", *shifts]
    assert min(row["classical"]["aji"] for name, row in block["scores"].items() if name != "original") < 1.0
    assert block["summary"]["nuclei-seg-stain"]["worst_shift"] in shifts
    written = json.loads(out.read_text())["stain_shift"]
    assert written["protocol"]["version"] == 2 and written["datasets"]["consep"]["names"] == block["names"]
