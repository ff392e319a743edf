"""Classical (QuPath-style) segmenter on real H&E: plausible nuclei, empty glass, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ghist_core.errors import InvalidMppError, ModelInputError
from ghist_core.segmentation import ArraySlide, ClassicalSegmenter, load_segmenter
from ghist_core.segmentation.features import RAY_COLUMNS


@pytest.fixture(scope="module")
def monuseg_tile(shared_path):
    stem = shared_path("nuclei", "monuseg", "test") / "TCGA-2Z-A9J9-01A-01-TS1"
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


def test_measurements_of_known_shapes():
    from skimage.draw import disk, ellipse
    from skimage.measure import regionprops_table

    from ghist_core.segmentation.features import measure_instances

    inst = np.zeros((120, 160), np.int32)
    inst[disk((40, 40), 20)] = 1
    inst[ellipse(60, 110, 12, 30, rotation=0.3)] = 2
    inst[100:110, 10:14] = 3
    cells = measure_instances(inst, 0.5).set_index("id")
    ref = regionprops_table(inst, properties=("label", "area", "eccentricity", "centroid"))
    assert np.allclose(cells["area_um2"], ref["area"] * 0.25)
    assert np.allclose(cells["eccentricity"], ref["eccentricity"], atol=1e-6)
    assert np.allclose(cells["x_px"], ref["centroid-1"]) and np.allclose(cells["y_px"], ref["centroid-0"])
    rays = cells.loc[1, RAY_COLUMNS].to_numpy(float)
    assert np.allclose(rays, 10.0, atol=0.6)                        # radius 20 px = 10 µm
    assert cells.loc[1, "perimeter_um"] == pytest.approx(2 * np.pi * 10, rel=0.08)
    assert cells.loc[1, "solidity"] > 0.97
    # rectangle 4 x 10 px: rays along +x reach 1 µm, along +y 2.5 µm
    assert cells.loc[3, "ray_00"] == pytest.approx(1.0, abs=0.3)
    assert cells.loc[3, "ray_04"] == pytest.approx(2.5, abs=0.3)
