"""QuPath GeoJSON of a real prediction: schema, valid polygons, areas in level-0 pixels."""

from __future__ import annotations

import json

import anndata as ad
import jsonschema
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import shape

from testkit import SMALL_SLIDE_MPP as MPP
from ghist_core import _keys as K
from ghist_core.errors import MissingMppError, UnknownGeneError
from ghist_core.export import nucleus_polygons, write_geojson
from ghist_core.viz.palette import cell_type_colour, hex_to_rgb

NUMBER = {"type": "number"}
POSITION = {"type": "array", "minItems": 2, "maxItems": 3, "items": NUMBER}
RING = {"type": "array", "minItems": 4, "items": POSITION}
SCHEMA = {  # the parts of RFC 7946 and QuPath's object properties that an import relies on
    "type": "object", "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {"type": "array", "items": {
            "type": "object", "required": ["type", "geometry", "properties"],
            "properties": {
                "type": {"const": "Feature"},
                "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                    "type": {"const": "Polygon"}, "coordinates": {"type": "array", "minItems": 1, "items": RING}}},
                "properties": {"type": "object", "required": ["objectType", "classification", "measurements"], "properties": {
                    "objectType": {"enum": ["detection", "cell", "annotation"]},
                    "classification": {"type": "object", "required": ["name", "color"], "properties": {
                        "name": {"type": "string"},
                        "color": {"type": "array", "minItems": 3, "maxItems": 3,
                                  "items": {"type": "integer", "minimum": 0, "maximum": 255}}}},
                    "measurements": {"type": "object", "additionalProperties": NUMBER}}},
            }}},
    },
}


def test_geojson_of_a_real_prediction_is_valid_qupath_and_round_trips(prediction, tmp_path):
    out = write_geojson(prediction, tmp_path / "cells.geojson", genes=["ERBB2", "CD3E"])
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, SCHEMA)
    feats = doc["features"]
    assert len(feats) == prediction.n_obs > 20
    polys = [shape(f["geometry"]) for f in feats]
    assert all(p.is_valid and p.area > 0 for p in polys)
    for f in feats:
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]  # closed
    # measurements: morphology + exactly the chosen genes, values as in the prediction
    m = pd.DataFrame([f["properties"]["measurements"] for f in feats])
    assert {"area_um2", "perimeter_um", "ERBB2", "CD3E"} <= set(m.columns) and "ESR1" not in m.columns
    np.testing.assert_allclose(m["ERBB2"], prediction[:, "ERBB2"].X.ravel(), rtol=1e-6)
    np.testing.assert_allclose(m["area_um2"], prediction.obs["area_um2"], rtol=1e-12)
    # classification: the cell type and its fixed palette colour
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert names == list(prediction.obs["cell_type"].astype(str))
    assert all(f["properties"]["classification"]["color"] == list(hex_to_rgb(cell_type_colour(n))) for f, n in zip(feats, names))
    # level-0 pixels: the outline lies around the centroid µm / mpp
    xy_px = prediction.obsm["spatial"] / MPP
    reps = np.array([[p.centroid.x, p.centroid.y] for p in polys])
    assert np.all(np.abs(reps - xy_px).max(1) < np.sqrt(prediction.obs["area_um2"].to_numpy()) / MPP)
    # area ≈ area_um2 / mpp². With the segmenter's star contour: each ray is the last inside sample on a
    # 0.5 px grid plus 0.5 px, so the outline is off by ≤ ~0.75 px along the boundary: |ΔA| ≤ 0.75 px × perimeter.
    # Without it (fallback): a 16-gon of exactly that area, off only by the 0.01 px rounding of coordinates.
    area_px = prediction.obs["area_um2"].to_numpy() / MPP**2
    got = np.array([p.area for p in polys])
    rays = K.nucleus_rays(prediction)
    if rays is not None:
        star = 0.5 * np.sin(2 * np.pi / 16) * (rays * np.roll(rays, -1, axis=1)).sum(1) / MPP**2
        np.testing.assert_allclose(got, star, rtol=5e-3)  # the polygon is exactly the stored star contour
        perimeter_px = prediction.obs["perimeter_um"].to_numpy() / MPP
        assert np.all(np.abs(got - area_px) <= 0.75 * perimeter_px)
    else:
        np.testing.assert_allclose(got, area_px, rtol=5e-3)


def _cells(**obs) -> ad.AnnData:
    n = len(next(iter(obs.values())))
    a = ad.AnnData(X=np.arange(n * 2, dtype=np.float32).reshape(n, 2),
                   obs=pd.DataFrame({"cell_id": np.arange(n), **obs}, index=[f"cell_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=["G1", "G2"]))
    a.obsm["spatial"] = np.column_stack([np.arange(n) * 50.0 + 10.0, np.full(n, 20.0)])
    a.uns["ghist"] = {"mpp": 0.25}
    return a


def test_outline_is_the_star_contour_in_pixels_or_an_equal_area_16_gon():
    a = _cells(cell_type=["T", "B"], area_um2=[30.0, 50.0])
    ring = nucleus_polygons(a)  # no rays stored: 16-gons with the nucleus area
    assert ring.shape == (2, 17, 2) and np.array_equal(ring[:, 0], ring[:, -1])
    areas = [shape({"type": "Polygon", "coordinates": [r.tolist()]}).area for r in ring]
    np.testing.assert_allclose(areas, np.array([30.0, 50.0]) / 0.25**2, rtol=1e-9)
    rays = np.full((2, 16), 2.0)
    rays[0, 0], rays[0, 4] = 5.0, 3.0  # ray 0 along +x, ray 4 along +y (image rows go down)
    a.obsm["nucleus_rays_um"] = rays
    ring = nucleus_polygons(a)
    np.testing.assert_allclose(ring[0, 0], [(10.0 + 5.0) / 0.25, 20.0 / 0.25])
    np.testing.assert_allclose(ring[0, 4], [10.0 / 0.25, (20.0 + 3.0) / 0.25], atol=1e-9)
    rays[1] = 0.0  # a degenerate contour still gives a small valid polygon
    assert shape({"type": "Polygon", "coordinates": [nucleus_polygons(a)[1].tolist()]}).is_valid


def test_geojson_needs_the_slide_mpp_and_known_genes(tmp_path):
    a = _cells(cell_type=["T", "B"], area_um2=[30.0, np.nan])
    del a.uns["ghist"]["mpp"]
    with pytest.raises(MissingMppError):
        write_geojson(a, tmp_path / "x.geojson")
    with pytest.raises(UnknownGeneError, match="NOPE"):
        write_geojson(a, tmp_path / "x.geojson", genes=["G1", "NOPE"], mpp=0.5)
    assert not (tmp_path / "x.geojson").exists()
    out = write_geojson(a, tmp_path / "x.geojson", mpp=0.5, chunk_cells=1)  # two chunks, NaN measurement left out
    feats = json.loads(out.read_text())["features"]
    assert len(feats) == 2 and "area_um2" not in feats[1]["properties"]["measurements"]
    assert feats[1]["properties"]["measurements"]["G2"] == 3.0
