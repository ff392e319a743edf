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


def test_slide_scale_scores_the_slide_path_both_ways(demo_slide, tmp_path):
    """A one-image split whose truth is the model's own nuclei (segment_tile, as stated): through
    segment_slide at zoom 1 both settings find them again (centroids line up, in the image's µm);
    at zoom 2 the check moves most cells and matches the enlarged truth better than the stated
    scale, which cuts the large nuclei up; the block is written; no HER2ST folder, no HER2ST part."""
    import json

    import numpy as np
    from PIL import Image

    from ghist_core.segmentation.tiling import resample_rgb

    with open_slide(demo_slide) as s:  # 0.5 µm/px tissue enlarged 2x: nuclei at their size for 0.25 µm/px
        rgb = resample_rgb(np.ascontiguousarray(s.read_region((900, 1300), 0, (300, 300))[..., :3]), (600, 600))
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    truth = seg.segment_tile(rgb, 0.25, nucleus_scale=1.0)[0]
    folder = tmp_path / "monuseg" / "test"
    folder.mkdir(parents=True)
    Image.fromarray(rgb).save(folder / "demo.png")
    Image.fromarray(truth.astype(np.uint16)).save(folder / "demo.inst.png")
    (tmp_path / "consep" / "test").mkdir(parents=True)  # an empty set is skipped, not a crash
    out = tmp_path / "result.json"
    res = bench.slide_scale(seg, tmp_path, tmp_path / "no_her2st", zooms=(1.0, 2.0), out=out, speed_px=0)
    assert json.loads(out.read_text())["slide_scale"] == json.loads(json.dumps(res))
    one, two = res["datasets"]["monuseg"]["1.0"], res["datasets"]["monuseg"]["2.0"]
    assert one["as_stated"]["f1_detection"] > 0.9 and one["auto"]["f1_detection"] > 0.9
    assert one["auto"]["cells_moved"] == 0.0 and two["auto"]["cells_moved"] > 0.5
    assert two["auto"]["f1_detection"] > two["as_stated"]["f1_detection"]
    assert two["as_stated"]["count_ratio"] > two["auto"]["count_ratio"]
    assert "her2st" not in res and "speed" not in res and res["datasets"]["consep"]["n_images"] == 0


def test_whole_images_puts_consep_patches_back_with_distinct_ids(tmp_path):
    """Two patches of one source tile become one image: pixels in place, truth ids offset so the
    second patch's nuclei are not the first's."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "consep" / "test"
    folder.mkdir(parents=True)
    for k in range(2):
        rgb = np.full((256, 256, 3), 60 * (k + 1), np.uint8)
        inst = np.zeros((256, 256), np.uint16)
        inst[10:20, 10:20], inst[50:60, 50:60] = 1, 2
        Image.fromarray(rgb).save(folder / f"test_1_{k:03d}.png")
        Image.fromarray(inst).save(folder / f"test_1_{k:03d}.inst.png")
        (folder / f"test_1_{k:03d}.type.json").write_text('{"1": 1, "2": 3}')
    [(name, rgb, inst)] = bench._whole_images(tmp_path, "consep")
    assert name == "test_1" and rgb.shape == (1024, 1024, 3) and inst.shape == (1024, 1024)
    assert rgb[0, 0, 0] == 60 and rgb[0, 256, 0] == 120 and rgb[300, 0, 0] == 255
    assert inst[15, 15] == 1 and inst[15, 256 + 15] == 3 and sorted(np.unique(inst)) == [0, 1, 2, 3, 4]


def test_stain_scale_restains_then_enlarges_with_the_truth_aligned(demo_slide, tmp_path):
    """Stain and scale together (the external breast set's proxy): every benchmark stain at each zoom,
    the truth (the classical segmenter's own nuclei) zoomed with the image, so the classical segmenter
    still finds much of it; the summary compares the model with classical; the block is written."""
    import json

    import numpy as np
    from PIL import Image

    from ghist_core.segmentation import ClassicalSegmenter
    from ghist_core.training.stain_bank import load_stain_bank

    classical = ClassicalSegmenter()
    folder = tmp_path / "monuseg" / "test"
    folder.mkdir(parents=True)
    with open_slide(demo_slide) as s:
        rgb = np.ascontiguousarray(s.read_region((600, 900), 0, (384, 384))[..., :3])
    Image.fromarray(rgb).save(folder / "demo.png")
    Image.fromarray(classical.segment_tile(rgb, 0.25)[0].astype(np.uint16)).save(folder / "demo.inst.png")
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    out = tmp_path / "seg.json"
    res = bench.stain_scale({"nuclei-seg-stain": seg, "classical": classical}, tmp_path, every={"monuseg": 1},
                            out=out, zooms=(2.0,))
    rows = res["datasets"]["monuseg"]["aji"]
    assert list(rows) == [m.name for m in load_stain_bank().select("benchmark")]
    assert all(set(r) == {"2.0"} for r in rows.values())
    assert max(r["2.0"]["classical"] for r in rows.values()) > 0.3  # aligned truth: not near 0
    summary = res["datasets"]["monuseg"]["summary"]["nuclei-seg-stain"]
    assert summary["worst"][0] in rows and summary["worst_aji"] == min(r["2.0"]["nuclei-seg-stain"] for r in rows.values())
    assert json.loads(out.read_text())["stain_scale"] == json.loads(json.dumps(res))


def _classical_truth_split(demo_slide, tmp_path, side: int = 384):
    """A one-tile MoNuSeg-like split from the demo slide whose truth is the classical segmenter's own nuclei."""
    import numpy as np
    from PIL import Image

    from ghist_core.segmentation import ClassicalSegmenter

    classical = ClassicalSegmenter()
    folder = tmp_path / "monuseg" / "test"
    folder.mkdir(parents=True)
    with open_slide(demo_slide) as s:
        rgb = np.ascontiguousarray(s.read_region((600, 900), 0, (side, side))[..., :3])
    Image.fromarray(rgb).save(folder / "demo.png")
    Image.fromarray(classical.segment_tile(rgb, 0.25)[0].astype(np.uint16)).save(folder / "demo.inst.png")
    return classical


def test_scan_20x_scores_each_stain_at_both_resolutions_with_the_truth_downsampled(demo_slide, tmp_path):
    """The 20x proxy: as it is the classical segmenter finds its own truth (AJI 1 at 0.25 µm/px). It works
    at 0.5 µm/px itself, so with the image and the truth both halved it finds the same nuclei again
    (a truth misaligned with the halved image would score far lower); every benchmark stain is scored
    at both resolutions; the block is written as it goes."""
    import json

    from ghist_core.training.stain_bank import load_stain_bank

    classical = _classical_truth_split(demo_slide, tmp_path)
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    out = tmp_path / "seg.json"
    res = bench.scan_20x({"nuclei-seg-stain": seg, "classical": classical}, tmp_path, out=out, datasets=("monuseg",))
    rows = res["datasets"]["monuseg"]["aji"]
    assert list(rows) == ["original", *[m.name for m in load_stain_bank().select("benchmark")]]
    assert all(set(r) == {"0.25", "0.5"} for r in rows.values())
    assert rows["original"]["0.25"]["classical"] == 1.0 and rows["original"]["0.5"]["classical"] > 0.95
    summary = res["datasets"]["monuseg"]["summary"]["nuclei-seg-stain"]
    assert summary["worst_aji"] == min(r["0.5"]["nuclei-seg-stain"] for r in rows.values())
    assert json.loads(out.read_text())["scan_20x"] == json.loads(json.dumps(res))


def test_beyond_range_scores_the_stain_checks_outside_stains_against_the_original(demo_slide, tmp_path):
    """What the stain check's note means for the nuclei: the original row first (classical finds its own
    truth), then each beyond-the-range stain; the summary says where the model falls below classical."""
    import json

    from ghist_core.pipeline.stain_check import beyond_range_stains

    import numpy as np
    import pandas as pd

    class Blank:  # finds nothing: below classical under every stain
        card = {"sha256": "none"}

        def segment_tile(self, rgb, mpp):
            return np.zeros(rgb.shape[:2], np.int32), pd.DataFrame({"id": pd.Series([], dtype=int), "type": []})

    classical = _classical_truth_split(demo_slide, tmp_path)
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    out = tmp_path / "seg.json"
    res = bench.beyond_range({"nuclei-seg-stain": seg, "blank": Blank(), "classical": classical}, tmp_path,
                             every={"monuseg": 1}, out=out)
    assert res["datasets"]["monuseg"]["summary"]["blank"]["below_classical"] == sorted(
        m.name for m in beyond_range_stains())
    rows = res["datasets"]["monuseg"]["aji"]
    assert list(rows) == ["original", "training-reference", *[m.name for m in beyond_range_stains()]]
    assert rows["original"]["classical"] == 1.0
    assert min(r["classical"] for name, r in rows.items() if name != "original") < 1.0  # the stains change the image
    summary = res["datasets"]["monuseg"]["summary"]["nuclei-seg-stain"]
    assert set(summary["drop_vs_original"]) == set(summary["drop_vs_control"]) == set(rows) - {"original",
                                                                                             "training-reference"}
    assert json.loads(out.read_text())["beyond_range"] == json.loads(json.dumps(res))
