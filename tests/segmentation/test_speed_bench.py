"""The speed block of bench/segmentation.py measures what it says: the API at the segmenter's own
batch size, and the app's whole pipeline on a real tiled TIFF (no timings asserted)."""

from __future__ import annotations

import pytest

from ghist_core.io.slide import open_slide
from ghist_core.segmentation import load_segmenter
from testkit import load_repo_script

bench = load_repo_script("bench/segmentation.py")


@pytest.fixture(scope="module")
def region(demo_slide):
    with open_slide(demo_slide) as s:
        return s.read_region((600, 900), 0, (1024, 1024)), s.mpp


def test_app_speed_runs_the_whole_pipeline_per_segmenter(region, tmp_path):
    rgb, mpp = region
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    app = bench.app_speed({"nuclei-seg-stain": seg}, rgb, tmp_path, mpp=mpp)
    row = app["nuclei-seg-stain"]
    assert app["model"] == "ghist-her2st" and app["mpx"] == round(1024 * 1024 / 1e6, 2)
    assert row["n_cells"] > 100  # the demo region is cellular: the run really segmented it
    assert 0 < row["segment_s"] < row["total_s"] and row["predict_s"] > 0
    assert row["segmentation_mpx_per_s"] > row["whole_run_mpx_per_s"] > 0


def test_api_speed_reports_the_batch_it_ran(region):
    rgb, mpp = region
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    assert bench.speed(seg, rgb[:600, :600])["batch_size"] == seg.batch_size == 1
    assert bench.speed(seg, rgb[:600, :600], batch_size=8)["batch_size"] == 8

