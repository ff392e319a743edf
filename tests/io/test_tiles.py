"""ghist_core.io.tiles.TileGrid: the one tile grid of the segmenters and the pipeline, and over real slides."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ghist_core.io.slide import open_slide
from ghist_core.io.tiles import TileGrid
from slide_factory import gradient_rgb, synthetic_he, write_pyramid_tiff


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


# --------------------------------------------------------------------------- over a slide
@pytest.fixture(scope="module")
def svs(svs_path: Path):
    with open_slide(svs_path) as s:
        yield s


@pytest.mark.parametrize(("target_mpp", "tile_px"), [(0.25, 512), (0.5, 256), (1.0, 256)])
def test_over_slide_tiles_shapes_positions(svs, target_mpp: float, tile_px: int) -> None:
    halo = 16
    core = tile_px - 2 * halo
    grid = TileGrid.over_slide(svs, tile_px, halo, target_mpp)
    w_um, h_um = svs.size_um
    assert grid.mpp == target_mpp and grid.core == core and grid.halo == halo
    assert grid.shape == (math.ceil(h_um / target_mpp / core), math.ceil(w_um / target_mpp / core))
    tiles = grid.tiles()
    # the cores reach exactly the far edges of the slide (µm = grid px x mpp)
    last = tiles[-1]
    assert (last.x1 * target_mpp, last.y1 * target_mpp) == pytest.approx((w_um, h_um))
    for t in (tiles[0], tiles[len(tiles) // 2], last):
        assert (t.x0, t.y0) == pytest.approx((t.col * core, t.row * core))
        rgb = grid.read(svs, t)
        assert rgb.shape == (tile_px, tile_px, 3) and rgb.dtype == np.uint8
    # a tile's pixels are the region at its read box (core origin minus the halo), in level-0 px
    t = tiles[grid.shape[1] + 1]
    loc = ((t.col * core - halo) * target_mpp / svs.mpp, (t.row * core - halo) * target_mpp / svs.mpp)
    assert np.array_equal(grid.read(svs, t), svs.read_region_mpp(loc, (tile_px, tile_px), target_mpp))
    # the first tile's halo lies beyond the slide: white, like glass (but for the resampling's last row)
    assert (grid.read(svs, tiles[0])[: halo - 1] == 255).all()


def test_over_slide_tissue_tiles_cover_all_tissue(svs) -> None:
    """Every tissue pixel of the thumbnail mask lies in the core of some kept tile: no gaps."""
    mask, (dx, dy) = svs.tissue_mask()
    assert 0.1 < mask.mean() < 0.8
    grid = TileGrid.over_slide(svs, 256, 0, 0.5)
    keep = grid.in_tissue(mask, (dx, dy), svs.mpp)
    assert 0 < keep.sum() < len(grid)  # glass is skipped
    covered = np.zeros_like(mask)
    f = grid.mpp / svs.mpp  # level-0 px per grid px
    for t in grid.iter(keep):
        x, y, x1, y1 = t.x0 * f, t.y0 * f, t.x1 * f, t.y1 * f
        covered[int(y // dy) : int(math.ceil(y1 / dy)), int(x // dx) : int(math.ceil(x1 / dx))] = True
    assert not (mask & ~covered).any()
    # and every kept tile holds stained pixels
    assert all(grid.read(svs, t).min() < 200 for t in grid.iter(keep))


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
@pytest.mark.parametrize("target_mpp", [0.25, 0.5, 1.0])
def test_generated_slide_tissue_tiles(tmp_path: Path, backend: str, target_mpp: float) -> None:
    rgb = synthetic_he((1200, 900), tissue_box_frac=(0.3, 0.2, 0.4, 0.5))
    p = write_pyramid_tiff(tmp_path / "he.tif", rgb, mpp=0.5, levels=3, layout="pages")
    with open_slide(p, backend=backend) as s:
        grid = TileGrid.over_slide(s, 128, 0, target_mpp)
        kept = grid.tiles(grid.in_tissue(*s.tissue_mask(), s.mpp))
        assert all(grid.read(s, t).shape == (128, 128, 3) for t in kept[:3])
    span_um = 128 * target_mpp
    # the tissue rectangle in µm
    tx0, ty0, tx1, ty1 = 0.3 * 1200 * 0.5, 0.2 * 900 * 0.5, 0.7 * 1200 * 0.5, 0.7 * 900 * 0.5
    want_cols = set(range(int(tx0 // span_um), int(math.ceil(tx1 / span_um))))
    want_rows = set(range(int(ty0 // span_um), int(math.ceil(ty1 / span_um))))
    got = {(t.col, t.row) for t in kept}
    # every tile over the tissue rectangle is there (no gaps) ...
    assert {(c, r) for c in want_cols for r in want_rows} <= got
    # ... and nothing far from it (one tile of slack for the thumbnail's blur)
    for c, r in got:
        assert min(want_cols) - 1 <= c <= max(want_cols) + 1 and min(want_rows) - 1 <= r <= max(want_rows) + 1
    for t in kept:
        assert (t.x0 * grid.mpp, t.y0 * grid.mpp) == pytest.approx((t.col * span_um, t.row * span_um))


def test_tiles_at_native_mpp_are_the_pixels_exactly(tmp_path: Path) -> None:
    """At the slide's own µm/px, tile (col, row) reads level-0 pixels from (col*core - halo, row*core - halo)."""
    rgb = gradient_rgb((700, 500))
    p = write_pyramid_tiff(tmp_path / "g.tif", rgb, mpp=0.5, levels=2)
    halo, core = 14, 100
    with open_slide(p) as s:
        grid = TileGrid.over_slide(s, 128, halo)
        assert grid.mpp == 0.5 and len(grid) == math.ceil(700 / core) * math.ceil(500 / core)
        canvas = np.full((500 + 2 * 128, 700 + 2 * 128, 3), 255, np.uint8)  # white margin all round
        canvas[128 : 128 + 500, 128 : 128 + 700] = rgb
        for t in grid:
            y, x = 128 + t.row * core - halo, 128 + t.col * core - halo
            assert np.array_equal(grid.read(s, t), canvas[y : y + 128, x : x + 128])
            assert (t.x0 * grid.mpp, t.y0 * grid.mpp) == (t.col * core * 0.5, t.row * core * 0.5)


def test_target_png_is_all_tissue(target_png: Path) -> None:
    with open_slide(target_png, mpp=0.5) as s:
        grid = TileGrid.over_slide(s, 256, 0, 0.5)
        assert len(grid) == 16 and grid.in_tissue(*s.tissue_mask(), s.mpp).all()


def test_blank_slide_has_no_tissue_tiles(tmp_path: Path) -> None:
    p = write_pyramid_tiff(tmp_path / "blank.tif", np.full((600, 600, 3), 242, np.uint8), mpp=0.5, levels=1)
    with open_slide(p) as s:
        grid = TileGrid.over_slide(s, 128, 0, 0.5)
        assert len(grid) == 25 and not grid.in_tissue(*s.tissue_mask(), s.mpp).any()


def test_slide_grid_with_its_own_mpp_by_default(svs_path: Path) -> None:
    with open_slide(svs_path, mpp=0.25) as s:  # a given mpp overrides the file's
        assert TileGrid.over_slide(s, 256, 0, 0.5).shape == (math.ceil(2967 * 0.25 / 128), math.ceil(2220 * 0.25 / 128))
        native = TileGrid.over_slide(s, 256)
        assert native.mpp == 0.25 and native.shape == (math.ceil(2967 / 256), math.ceil(2220 / 256))
