"""Full-resolution viewer: nucleus outlines, viewport queries, window reads, and the Gene maps page state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ghist_core._keys import OBSM_NUCLEUS_RAYS
from ghist_core.io.slide import open_slide
from ghist_core.viz import viewer
from prediction_factory import synthetic_prediction


def test_polygon_vertices_follow_the_rays():
    xy = np.array([[10.0, 20.0], [100.0, 5.0]])
    rays = np.tile(np.arange(1, 17, dtype=float), (2, 1))
    rays[1] *= 0.5
    poly = viewer.nucleus_polygons(xy, rays)
    assert poly.shape == (2, 16, 2)
    # ray 0 points along +x, ray 4 along +y (downwards on the slide), ray 8 along -x
    np.testing.assert_allclose(poly[0, 0], [11.0, 20.0])
    np.testing.assert_allclose(poly[0, 4], [10.0, 25.0], atol=1e-9)
    np.testing.assert_allclose(poly[0, 8], [10.0 - 9.0, 20.0], atol=1e-9)
    np.testing.assert_allclose(np.hypot(*(poly[1] - xy[1]).T), rays[1])
    with pytest.raises(ValueError):
        viewer.nucleus_polygons(xy, rays[:1])


def test_cell_index_returns_exactly_the_cells_in_the_box():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, [5000, 3000], size=(100_000, 2))
    idx = viewer.CellIndex(xy, bucket_um=50)
    for box in [(100, 200, 356, 456), (0, 0, 5000, 3000), (4990, 2990, 6000, 4000), (10, 10, 9, 20)]:
        got = idx.query(box)
        x0, y0, x1, y1 = box
        want = np.flatnonzero((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1))
        np.testing.assert_array_equal(got, want)
    assert len(viewer.CellIndex(np.zeros((0, 2))).query((0, 0, 1, 1))) == 0


def test_window_is_full_resolution_and_inside_the_slide(demo_slide):
    with open_slide(demo_slide) as s:
        w = viewer.read_window(s, (0.0, 0.0), 40)  # a corner: moved inside, not cut
        assert w.bounds_um[0] == 0 and w.bounds_um[1] == 0
        assert w.mpp == pytest.approx(s.mpp)  # 40× asks for more than the scan has: the scan's own pixels
        assert w.rgb.shape[1] == round((w.bounds_um[2] - w.bounds_um[0]) / s.mpp)
        w10 = viewer.read_window(s, (600, 700), 10)
        assert w10.mpp == pytest.approx(1.0) and max(w10.rgb.shape[:2]) <= viewer.WINDOW_PX
    # full resolution has more fine detail than the overview resized to the same window
    from PIL import Image
    with open_slide(demo_slide) as s:
        thumb = s.thumbnail(1536)
        scale = thumb.shape[1] / (s.dimensions[0] * s.mpp)
    x0, y0, x1, y1 = w.bounds_um
    crop = thumb[int(y0 * scale):int(y1 * scale), int(x0 * scale):int(x1 * scale)]
    blurred = np.asarray(Image.fromarray(crop).resize(w.rgb.shape[1::-1], Image.BILINEAR))
    assert laplacian_var(w.rgb) > 2 * laplacian_var(blurred)


def laplacian_var(rgb: np.ndarray) -> float:
    g = rgb.astype(float).mean(axis=2)
    lap = g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def _window(n=3000):
    rgb = np.full((200, 200, 3), 220, np.uint8)
    return viewer.Window(rgb, (100.0, 100.0, 300.0, 300.0), 1.0, 40, (200.0, 200.0))


def test_cell_view_draws_only_the_window_cells_as_outlines():
    a = synthetic_prediction(3000)
    rays = np.random.default_rng(0).uniform(2, 5, (3000, 16))
    a.obsm[OBSM_NUCLEUS_RAYS] = rays
    gm = viewer.cell_view(a, "ERBB2", _window(), layer_key="7")
    xy = np.asarray(a.obsm["spatial"])
    inside = np.flatnonzero((xy[:, 0] >= 100) & (xy[:, 0] <= 300) & (xy[:, 1] >= 100) & (xy[:, 1] <= 300))
    assert gm.mode == "outlines" and gm.n_objects == len(inside) > 0
    spec = json.loads(gm.deck.to_json())
    bitmap, poly = spec["layers"]
    assert bitmap["@@type"] == "BitmapLayer" and bitmap["id"] == "he-full-7"
    assert bitmap["bounds"] == [100.0, 300.0, 300.0, 100.0]
    assert poly["@@type"] == "PolygonLayer" and poly["getPolygon"].startswith("@@=[[px0,py0]")
    row = poly["data"][0]
    k = int(np.flatnonzero(a.obs["cell_id"].to_numpy() == row["i"])[0])
    vert = viewer.nucleus_polygons(xy[k:k + 1], rays[k:k + 1])[0]
    np.testing.assert_allclose([row["px3"], row["py3"]], vert[3], atol=0.01)
    assert spec["initialViewState"]["zoom"] == pytest.approx(viewer.zoom_for(40)) == pytest.approx(2.0)
    # below 20x, and without contours, points
    assert viewer.cell_view(a, "ERBB2", viewer.Window(_window().rgb, _window().bounds_um, 1.0, 10, (200, 200))).mode == "cells"
    del a.obsm[OBSM_NUCLEUS_RAYS]
    assert viewer.cell_view(a, "ERBB2", _window()).mode == "cells"


def test_cell_view_keeps_within_the_object_budget_and_filters_types():
    a = synthetic_prediction(20_000)
    a.obsm[OBSM_NUCLEUS_RAYS] = np.full((20_000, 16), 3.0)
    w = viewer.Window(np.zeros((10, 10, 3), np.uint8), (0, 0, 1000, 800), 1.0, 40, (500, 400))
    gm = viewer.cell_view(a, "ERBB2", w, max_objects=5000, max_outlines=1000)
    assert gm.n_objects == 5000 and gm.mode == "cells"  # too many outlines: points
    gm = viewer.cell_view(a, "ESR1", w, cell_types=["T"], vrange=(0.0, 1.0))
    assert set(gm.table["cell_type"]) == {"T"} and (gm.vmin, gm.vmax) == (0.0, 1.0)


def test_shared_range_spans_all_genes():
    a = synthetic_prediction(3000)
    lo, hi = viewer.shared_range(a, ["ERBB2", "ESR1"])
    for g in ("ERBB2", "ESR1"):
        v = np.asarray(a[:, g].X).ravel()
        assert lo <= np.percentile(v, 50) <= hi
    assert hi >= max(np.percentile(np.asarray(a[:, g].X).ravel(), 95) for g in ("ERBB2", "ESR1"))


# --- the page: per-slide state, close-up, one legend ----------------------------------------

@pytest.fixture
def two_slides(tmp_path, monkeypatch, demo_slide):
    from PIL import Image

    from apptest_kit import fresh_projects, register_prediction
    from ghist_core.project.store import Project

    fresh_projects(tmp_path, monkeypatch)

    project = Project.open_or_create(tmp_path / "study")
    with open_slide(demo_slide) as s:  # a second, different file: a PNG of part of the demo
        mpp = s.mpp
        Image.fromarray(s.read_region((0, 0), 0, (2200, 1700))).save(tmp_path / "part.png")
    ids = []
    for i, (path, m) in enumerate([(demo_slide, None), (tmp_path / "part.png", mpp)]):
        rec = project.add_slide(path, patient_id=f"P{i}", original_name=f"slide{i}{path.suffix}", mpp=m)
        a = synthetic_prediction(n=1200, genes=("ERBB2", "ESR1", "CD3E"), seed=i)
        a.obsm[OBSM_NUCLEUS_RAYS] = np.full((1200, 16), 3.0)
        register_prediction(project, rec.slide_id, a)
        ids.append(int(rec.slide_id))
    return project, ids


def _page(project):
    from apptest_kit import open_page

    return open_page("pages/gene_maps.py", {"project_dir": str(project.folder)})


def _cells(at) -> list[dict]:
    return [json.loads(e.proto.json)["layers"][-1]["data"] for e in at.get("deck_gl_json_chart")][0]


@pytest.mark.slow
def test_type_filter_stays_with_its_slide_and_close_up(two_slides):
    project, ids = two_slides
    at = _page(project)
    at.radio(key="gm_mode").set_value("Each cell").run()
    assert len(_cells(at)) == 1200
    at.multiselect(key="gm_types").set_value(["T"]).run()
    assert {d["t"] for d in _cells(at)} == {"T cells"}  # the tooltip's display name
    at.selectbox(key="gm_slide").set_value(ids[1]).run()
    assert not at.exception
    assert len(_cells(at)) == 1200  # the filter of slide 1 does not hide cells of slide 2
    spec = json.loads(at.get("deck_gl_json_chart")[0].proto.json)
    assert all(str(ids[1]) in layer["id"] for layer in spec["layers"])  # layers belong to the new slide
    at.selectbox(key="gm_slide").set_value(ids[0]).run()
    assert {d["t"] for d in _cells(at)} == {"T cells"}  # slide 1 keeps its own choice

    # close-up at 40x: the slide's pixels and nucleus outlines; two genes share one view
    zoom = [s for s in at.select_slider if s.key.startswith("gm_zoom_")][0]
    zoom.set_value("40×").run()
    at.multiselect(key="gm_genes").set_value(["ERBB2", "ESR1"]).run()
    at.radio(key="gm_scale").set_value("Shared by panels").run()
    assert not at.exception, [e.value for e in at.exception]
    specs = [json.loads(e.proto.json) for e in at.get("deck_gl_json_chart")]
    assert len(specs) == 2
    assert [s["layers"][-1]["@@type"] for s in specs] == ["PolygonLayer", "PolygonLayer"]
    assert specs[0]["initialViewState"] == specs[1]["initialViewState"]
    assert specs[0]["layers"][0]["bounds"] == specs[1]["layers"][0]["bounds"]
    bars = [json.loads(e.proto.spec) for e in at.get("plotly_chart")]
    assert bars[0]["layout"]["xaxis"]["range"] == bars[1]["layout"]["xaxis"]["range"]
    # cell-type colouring: one legend for the page, bars = cells shown per type
    at.radio(key="gm_colour_by").set_value("Cell type").run()
    legends = [json.loads(e.proto.spec) for e in at.get("plotly_chart")]
    assert len(legends) == 1
    n_drawn = len(specs[0]["layers"][-1]["data"])
    assert sum(legends[0]["data"][0]["x"]) == n_drawn or n_drawn == 0
