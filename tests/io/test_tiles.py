"""ghist_core.io.tiles.TileGrid: the one tile grid of the segmenters and the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ghist_core.io.slide import open_slide
from ghist_core.io.tiles import TileGrid


@pytest.mark.parametrize("width,height,core,halo", [(1000, 700, 256, 0), (1000, 700, 928, 48), (97, 31, 16, 5),
                                                    (1234.5, 600.25, 512.0, 24.0)])
def test_cores_partition_the_image_row_major(width, height, core, halo) -> None:
    grid = TileGrid(width, height, core, halo)
    tiles = grid.tiles()
    rows, cols = grid.shape
    assert len(tiles) == len(grid) == rows * cols == int(np.ceil(width / core)) * int(np.ceil(height / core))
    # every pixel centre in exactly one core
    px, py = np.meshgrid(np.arange(0.5, width, 7.3), np.arange(0.5, height, 5.1))
    hits = sum(((px >= t.x0) & (px < t.x1) & (py >= t.y0) & (py < t.y1)).astype(int) for t in tiles)
    assert (hits == 1).all()
    # row-major, indexed 0..N-1, read box = core grown by the halo (never clipped)
    assert [(t.row, t.col) for t in tiles] == [(r, c) for r in range(rows) for c in range(cols)]
    assert [t.index for t in tiles] == list(range(len(tiles)))
    for t in tiles:
        assert (t.read_x0, t.read_y0, t.read_size) == (t.x0 - halo, t.y0 - halo, core + 2 * halo)
        assert t.x1 <= width and t.y1 <= height
    assert np.array_equal(grid.cores(), np.array([[t.x0, t.y0, t.w, t.h] for t in tiles]))


def test_integer_grids_give_integer_coordinates() -> None:
    t = TileGrid.from_tile(3000, 2000, 1024, 48).tiles()[-1]
    assert all(type(v) is int for v in (t.x0, t.y0, t.w, t.h, t.read_x0, t.read_y0, t.read_size))
    assert t.read_size == 1024 and t.x0 == 3 * 928 and t.x1 == 3000 and t.read_x0 == 3 * 928 - 48


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="core"):
        TileGrid(100, 100, 0)
    with pytest.raises(ValueError, match="halo"):
        TileGrid(100, 100, 10, -1)


def test_tissue_filter_on_a_real_slide(svs_path: Path) -> None:
    with open_slide(svs_path) as s:
        w_um, h_um = s.size_um
        mask, ds = s.tissue_mask(1024)
        grid = TileGrid(w_um, h_um, 100.0, mpp=1.0)
        keep = grid.in_tissue(mask, ds, s.mpp, min_fraction=0.3)
        assert keep.dtype == bool and 0 < keep.sum() < len(grid)
        kept = grid.tiles(keep)
        assert [t.index for t in kept] == list(range(int(keep.sum())))
        # the same grid in 0.5 µm pixels selects the same tiles
        fine = TileGrid(w_um / 0.5, h_um / 0.5, 200.0, mpp=0.5)
        assert np.array_equal(fine.in_tissue(mask, ds, s.mpp, min_fraction=0.3), keep)
