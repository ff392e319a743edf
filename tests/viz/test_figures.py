"""Figure builders: the data each figure sends is what the prediction says, with units."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ghist_core.errors import UnknownGeneError
from ghist_core.pipeline.grid import build_grid_pyramid
from ghist_core.viz import figures, palette
from prediction_factory import synthetic_prediction


def test_palette_fixed_and_distinct():
    assert set(palette.CELL_TYPE_COLOURS) == set(palette.CELL_TYPES)
    assert len(set(palette.CELL_TYPE_COLOURS.values())) == 9
    rgb = palette.cell_type_rgb(np.array(["Malignant", "T", "Malignant", "weird"]))
    assert rgb.shape == (4, 3) and (rgb[0] == rgb[2]).all()
    assert tuple(rgb[0]) == palette.hex_to_rgb(palette.CELL_TYPE_COLOURS["Malignant"])
    assert tuple(rgb[3]) == palette.hex_to_rgb(palette.OTHER_COLOUR)
    lut = palette.colour_lut("viridis")
    assert tuple(lut[0]) == (0x44, 0x01, 0x54) and tuple(lut[-1]) == (0xFD, 0xE7, 0x25)
    c = palette.map_values(np.array([0.0, 1.0, np.nan, 5.0]), 0.0, 1.0, "cividis")
    assert tuple(c[1]) == tuple(c[3]) == palette.hex_to_rgb("#FEE838")
    with pytest.raises(ValueError):
        palette.colour_lut("jet")


def test_gene_map_cells_layers_and_units():
    a = synthetic_prediction()
    img = np.full((80, 100, 3), 230, np.uint8)
    gm = figures.gene_map(a, "ERBB2", image=img, bounds_um=(0, 0, 1000, 800))
    assert gm.mode == "cells" and gm.n_objects == a.n_obs
    np.testing.assert_allclose(gm.table["value"].to_numpy(), a[:, "ERBB2"].X.ravel(), rtol=1e-6)
    spec = json.loads(gm.deck.to_json())
    assert spec["views"][0]["@@type"] == "OrthographicView"
    types = [layer["@@type"] for layer in spec["layers"]]
    assert types == ["BitmapLayer", "ScatterplotLayer"]
    assert spec["layers"][0]["bounds"] == [0.0, 800.0, 1000.0, 0.0]
    assert spec["layers"][0]["image"].startswith("data:image/jpeg;base64,")
    assert len(spec["layers"][1]["data"]) == a.n_obs
    assert "log1p counts" in gm.deck._tooltip["html"]  # streamlit reads _tooltip
    # colour follows value: the right half is brighter (viridis yellow has higher R+G)
    t = gm.table
    right = t["x_um"] > 700
    bar = figures.colour_bar(gm)
    assert "log1p counts" in bar.layout.xaxis.title.text and "ERBB2" in bar.layout.xaxis.title.text
    assert bar.data[0].zmin == pytest.approx(gm.vmin)
    png = figures.render_png(gm, width_px=400)
    im = np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB"))
    assert im.shape[1] == 400
    # pixels in the map differ between left and right side because ERBB2 rises with x
    band = im[24 + 100: 24 + 200]
    assert band[:, 300:380].mean() != pytest.approx(band[:, 20:100].mean(), abs=5)
    assert right.sum() > 0


def test_gene_map_switches_to_grid_beyond_limit():
    a = synthetic_prediction(n=5000)
    grids = build_grid_pyramid(a, (25.0, 50.0, 100.0))
    gm = figures.gene_map(a, "ESR1", grids=grids, limit=1000)
    assert gm.mode == "grid" and gm.n_objects <= 1000
    assert gm.grid_size_um == figures.pick_grid_size(grids, 1000)
    spec = json.loads(gm.deck.to_json())
    assert spec["layers"][-1]["@@type"] == "GridCellLayer"
    assert spec["layers"][-1]["cellSize"] == gm.grid_size_um
    # the grid mean equals the mean of the cells in the square
    g = grids[gm.grid_size_um]
    row = g.obs.iloc[0]
    s = gm.grid_size_um
    xy = a.obsm["spatial"]
    inside = (np.floor(xy[:, 0] / s) == row["gx"]) & (np.floor(xy[:, 1] / s) == row["gy"])
    v = gm.table.loc[(gm.table.x_um == row["x_um"]) & (gm.table.y_um == row["y_um"]), "value"].item()
    assert v == pytest.approx(a[inside, "ESR1"].X.mean(), rel=1e-5)
    with pytest.raises(ValueError):
        figures.gene_map(a, "ESR1", limit=1000)  # too many cells and no grid


def test_gene_map_cell_type_filter_and_unknown_gene():
    a = synthetic_prediction()
    gm = figures.gene_map(a, "CD3E", colour_by="cell_type", cell_types=["T", "B"])
    assert set(gm.table["cell_type"]) == {"T", "B"}
    spec = json.loads(gm.deck.to_json())
    row = spec["layers"][-1]["data"][0]
    short = {palette.cell_type_label(t): t for t in palette.CELL_TYPES}  # tooltips show display names
    assert row["t"] in ("T cells", "B cells")
    assert (row["r"], row["g"], row["b"]) == palette.hex_to_rgb(palette.CELL_TYPE_COLOURS[short[row["t"]]])
    legend = figures.colour_bar(gm)
    assert list(legend.data[0].y) == ["B cells", "T cells"]
    with pytest.raises(UnknownGeneError):
        figures.gene_map(a, "NOTAGENE")


def test_mode_limits():
    assert figures.choose_mode(10_000) == "cells"
    assert figures.choose_mode(figures.AUTO_CELL_LIMIT + 1) == "grid"
    assert figures.choose_mode(figures.AUTO_CELL_LIMIT + 1, "cells") == "cells"
    assert figures.choose_mode(figures.MAX_BROWSER_POINTS + 1, "cells") == "grid"
    assert figures.choose_mode(10, "grid") == "grid"


def test_units_label_short_on_axes():
    long = ("per-cell expression on the CP10k scale of a HER2ST spot: the sum over the cells of a 100 µm spot "
            "approximates the spot's counts per 10,000")
    a = synthetic_prediction(n=200)
    a.uns["ghist"] = {"model_card": {"expression_units": long}}
    assert figures.expression_units(a) == long
    gm = figures.gene_map(a, "ERBB2")
    assert gm.units == "CP10k scale"
    assert figures.colour_bar(gm).layout.xaxis.title.text == "ERBB2 predicted expression (CP10k scale)"


def test_expression_uncertainty_is_a_layer_of_maps_squares_and_close_ups():
    """The obs column ``expression_uncertainty`` goes where a gene goes: cells, grid squares (their mean), close-ups."""
    from ghist_core import _keys as K
    from ghist_core.viz import viewer

    unc = K.OBS_EXPRESSION_UNCERTAINTY
    a = synthetic_prediction(n=5000)
    assert figures.map_layers(a) == []
    with pytest.raises(UnknownGeneError, match="no expression uncertainty"):
        figures.gene_map(a, unc)
    u = (a.obsm["spatial"][:, 1] / 800.0).astype(np.float32)  # rises top to bottom
    a.obs[unc] = u
    assert figures.map_layers(a) == [unc]
    gm = figures.gene_map(a, unc, mode="cells")
    np.testing.assert_array_equal(gm.table["value"].to_numpy(), u)
    assert gm.units == "SD across seeds, log1p" and gm.gene == unc
    assert "Expression uncertainty" in gm.deck._tooltip["html"]
    assert figures.colour_bar(gm).layout.xaxis.title.text == "Expression uncertainty (SD across seeds, log1p)"
    assert figures.render_png(gm, width_px=300)[:4] == b"\x89PNG"
    grids = build_grid_pyramid(a, (50.0, 100.0))
    sq = figures.gene_map(a, unc, grids=grids, limit=1000)
    assert sq.mode == "grid"
    row = grids[sq.grid_size_um].obs.iloc[3]
    s, xy = sq.grid_size_um, a.obsm["spatial"]
    inside = (np.floor(xy[:, 0] / s) == row["gx"]) & (np.floor(xy[:, 1] / s) == row["gy"])
    v = sq.table.loc[(sq.table.x_um == row["x_um"]) & (sq.table.y_um == row["y_um"]), "value"].item()
    assert v == pytest.approx(float(u[inside].mean()), rel=1e-5)
    w = viewer.Window(np.zeros((10, 10, 3), np.uint8), (100.0, 100.0, 300.0, 300.0), 1.0, 40, (200.0, 200.0))
    close = viewer.cell_view(a, unc, w)
    ids = close.table["cell_id"].to_numpy()
    np.testing.assert_allclose(close.table["value"].to_numpy(), u[np.searchsorted(a.obs["cell_id"].to_numpy(), ids)])
    assert close.units == "SD across seeds, log1p"
