"""ghist_core.imaging.tissue: thumbnail tissue masks and which tiles touch tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ghist_core.io.slide import open_slide
from ghist_core.imaging.tissue import TissueMaskConfig, boxes_in_tissue, otsu_threshold, tissue_fraction, tissue_mask
from slide_factory import GLASS_RGB, STROMA_RGB, synthetic_he


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_otsu_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.03, 5000), rng.normal(0.7, 0.03, 3000)])
    t = otsu_threshold(np.clip(v, 0, 1))
    assert 0.3 < t < 0.6


@pytest.mark.parametrize("box", [(0.2, 0.25, 0.5, 0.5), (0.05, 0.1, 0.3, 0.8)])
def test_mask_finds_the_tissue_rectangle(box: tuple[float, float, float, float]) -> None:
    rgb = synthetic_he((400, 300), tissue_box_frac=box)
    truth = np.zeros((300, 400), bool)
    truth[int(box[1] * 300) : int((box[1] + box[3]) * 300), int(box[0] * 400) : int((box[0] + box[2]) * 400)] = True
    mask = tissue_mask(rgb)
    assert mask.dtype == bool and mask.shape == (300, 400)
    assert _iou(mask, truth) > 0.95


def test_all_tissue_is_not_split_in_half() -> None:
    """Otsu on an all-tissue image would split stroma from nuclei; the clamps prevent it."""
    rgb = synthetic_he((300, 300), tissue_box_frac=(0.0, 0.0, 1.0, 1.0))
    assert tissue_fraction(tissue_mask(rgb)) > 0.98


def test_glass_only_is_empty() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(np.array(GLASS_RGB) + rng.normal(0, 2, (200, 250, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(glass).sum() == 0


def test_black_border_is_not_tissue() -> None:
    rgb = synthetic_he((300, 200))
    rgb[:, :20] = 0  # scanner border / black fill
    mask = tissue_mask(rgb)
    assert not mask[:, :20].any()


def test_small_specks_removed_and_small_holes_filled() -> None:
    rgb = np.full((400, 400, 3), GLASS_RGB, np.uint8)
    rgb[100:300, 100:300] = STROMA_RGB
    rgb[190:200, 190:200] = GLASS_RGB  # a small hole (100 px) inside tissue
    rgb[20:23, 20:23] = STROMA_RGB  # a 9 px speck (dust)
    mask = tissue_mask(rgb, TissueMaskConfig(smooth_px=1))
    assert mask[190:200, 190:200].all()
    assert not mask[20:23, 20:23].any()
    # a big hole (a lumen, > 2% of the image) is kept open
    rgb[150:250, 150:250] = GLASS_RGB
    mask = tissue_mask(rgb, TissueMaskConfig(smooth_px=1))
    assert not mask[160:240, 160:240].any()


def test_mask_on_real_svs(svs_path: Path) -> None:
    with open_slide(svs_path) as s:
        thumb = s.thumbnail(512)
    mask = tissue_mask(thumb)
    assert 0.15 < mask.mean() < 0.7
    # top-left corner of this slide is glass, the centre column has tissue
    assert not mask[:40, :40].any()
    grey = thumb.mean(axis=2)
    assert grey[mask].mean() < grey[~mask].mean() - 40  # tissue is darker than what is left out


def test_boxes_in_tissue_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((60, 80)) > 0.97
    ds = (4.0, 5.0)
    boxes = np.column_stack(
        [rng.uniform(-20, 330, 300), rng.uniform(-20, 310, 300), rng.uniform(1, 60, 300), rng.uniform(1, 60, 300)]
    )
    got = boxes_in_tissue(mask, boxes, ds)
    want = []
    for x, y, w, h in boxes:
        x0, y0 = max(0, int(np.floor(x / ds[0]))), max(0, int(np.floor(y / ds[1])))
        x1, y1 = min(80, int(np.ceil((x + w) / ds[0]))), min(60, int(np.ceil((y + h) / ds[1])))
        want.append(x1 > x0 and y1 > y0 and bool(mask[y0:y1, x0:x1].any()))
    assert got.tolist() == want
    assert boxes_in_tissue(mask, np.zeros((0, 4)), ds).shape == (0,)


def test_min_fraction_threshold() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    boxes = np.array([[0, 0, 10, 10], [0, 0, 1, 1]], float)
    assert boxes_in_tissue(mask, boxes, (1.0, 1.0)).tolist() == [True, True]
    assert boxes_in_tissue(mask, boxes, (1.0, 1.0), min_fraction=0.5).tolist() == [False, True]


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10), np.uint8))
