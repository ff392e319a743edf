"""Classical (QuPath-style) segmenter on real H&E: plausible nuclei, empty glass, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ghist_core.errors import InvalidMppError, ModelInputError
from ghist_core.segmentation import ArraySlide, ClassicalSegmenter, load_segmenter
from ghist_core.segmentation.features import RAY_COLUMNS


@pytest.fixture(scope="module")
def monuseg_tile(shared_data):
    stem = shared_data / "nuclei" / "monuseg" / "test" / "TCGA-2Z-A9J9-01A-01-TS1"
    img = np.asarray(Image.open(f"{stem}.png").convert("RGB"))
    gt = np.asarray(Image.open(f"{stem}.inst.png")).astype(np.int32)
    return img, gt


def test_classical_finds_plausible_nuclei(monuseg_tile):
    img, gt = monuseg_tile
    seg = load_segmenter(kind="classical")
    inst, cells = seg.segment_tile(img, 0.25)
    assert inst.shape == img.shape[:2] and inst.dtype == np.int32
    n_gt = int(gt.max())
    assert 0.4 * n_gt < len(cells) < 1.5 * n_gt
    assert set(np.unique(inst)[1:]) == set(cells["id"])
    # most detected nuclei lie on annotated nuclear pixels
    on_gt = gt[np.rint(cells["y_px"]).astype(int), np.rint(cells["x_px"]).astype(int)] > 0
    assert on_gt.mean() > 0.6
    assert (cells["area_um2"] > 5).all() and (cells["area_um2"] < 500).all()
    assert set(RAY_COLUMNS) <= set(cells.columns)
    rays = cells[RAY_COLUMNS].to_numpy()
    assert np.all(rays >= 0) and np.median(rays) > 1.0  # µm


@pytest.mark.parametrize("fill", [255, 0, 240])
def test_blank_tiles_are_empty(fill):
    seg = ClassicalSegmenter()
    rgb = np.full((200, 300, 3), fill, np.uint8)
    inst, cells = seg.segment_tile(rgb, 0.5)
    if fill != 0:  # black is not glass, but must not crash
        assert inst.max() == 0 and len(cells) == 0
    assert inst.shape == (200, 300)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32),
                                 np.zeros((10, 10, 2), np.uint8), [[1, 2, 3]]])
def test_bad_input_raises_typed_error(bad):
    with pytest.raises(ModelInputError):
        ClassicalSegmenter().segment_tile(bad, 0.5)


@pytest.mark.parametrize("mpp", [0, -1, float("nan"), "x"])
def test_bad_mpp_raises(mpp):
    with pytest.raises(InvalidMppError):
        ClassicalSegmenter().segment_tile(np.zeros((10, 10, 3), np.uint8), mpp)


def test_classical_slide_tiled_matches_one_pass(monuseg_tile):
    img, _ = monuseg_tile
    seg = ClassicalSegmenter()
    slide = ArraySlide(img, 0.25)
    one = seg.segment_slide(slide, tile_px=1024, overlap_px=48)   # whole region in one tile
    tiled = seg.segment_slide(slide, tile_px=192, overlap_px=40)
    assert abs(len(tiled) - len(one)) <= max(2, 0.03 * len(one))
    assert tiled["cell_id"].is_unique
    xy = tiled[["x_um", "y_um"]].to_numpy()
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 2.0
