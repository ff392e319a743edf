"""QuPath annotations → boolean masks over cells; bad files give typed, plain errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core.errors import RegionFileError
from ghist_core.export import cells_in_regions, read_regions, region_composition, region_mask, write_geojson
from ghist_core.export.regions import MAX_REGION_BYTES
from prediction_factory import synthetic_prediction

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
FAR = [[500, 500], [600, 500], [600, 600], [500, 500]]  # a triangle: x >= y side of the square's diagonal


def _collection(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def _annotation(geometry: dict, cls: str, name: str = "") -> dict:
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", "name": name, "classification": {"name": cls, "color": [255, 0, 0]}}}


@pytest.fixture()
def region_file(tmp_path):
    doc = _collection(
        _annotation({"type": "Polygon", "coordinates": [SQUARE, HOLE]}, "Tumor", "core"),
        _annotation({"type": "MultiPolygon", "coordinates": [[FAR]]}, "Stroma"),
        _annotation({"type": "Point", "coordinates": [5, 5]}, "Tumor"),  # points are skipped
    )
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps(doc))
    return path


def test_mask_is_point_in_polygon_with_holes_over_all_regions(region_file):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-50, 650, size=(20_000, 2))
    regions = read_regions(region_file)
    assert [r.classification for r in regions] == ["Tumor", "Stroma"] and regions[0].name == "core"
    x, y = pts[:, 0], pts[:, 1]
    in_square = (x > 0) & (x < 100) & (y > 0) & (y < 100) & ~((x > 40) & (x < 60) & (y > 40) & (y < 60))
    in_triangle = (x < 600) & (y > 500) & (y < x)
    np.testing.assert_array_equal(cells_in_regions(pts, regions), in_square | in_triangle)
    tumour = read_regions(region_file, classification="Tumor")
    np.testing.assert_array_equal(cells_in_regions(pts, tumour), in_square)


def test_region_mask_over_a_prediction_uses_the_slide_mpp(region_file):
    xy_um = np.array([[10.0, 10.0], [25.0, 25.0], [49.9, 1.0], [70.0, 70.0]])  # µm; mpp 0.5 → px = 2 × µm
    a = ad.AnnData(X=np.zeros((4, 1), np.float32), obs=pd.DataFrame(index=list("abcd")))
    a.obsm["spatial"] = xy_um
    a.uns["ghist"] = {"mpp": 0.5}
    # px (20,20) in; (50,50) in the hole; (99.8, 2) in; (140,140) outside
    assert region_mask(a, region_file).tolist() == [True, False, True, False]
    assert region_mask(a, region_file, mpp=1.0).tolist() == [True, True, True, True]  # px = µm: (25,25) and (70,70) in


def test_old_qupath_list_format_and_bare_geometry_are_read(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([_annotation({"type": "Polygon", "coordinates": [SQUARE]}, "Tumor")]))
    (tmp_path / "bare.json").write_text(json.dumps({"type": "Polygon", "coordinates": [SQUARE]}))
    for name in ("list.json", "bare.json"):
        assert cells_in_regions([[50, 50], [150, 50]], read_regions(tmp_path / name)).tolist() == [True, False]
    assert len(read_regions(json.dumps({"type": "Polygon", "coordinates": [SQUARE]}).encode())) == 1


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG not json", "not valid JSON"),
    (b'{"hello": 1}', "not GeoJSON"),
    (json.dumps(_collection(_annotation({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}, "T"))).encode(), "at least 4"),
    (json.dumps(_collection(_annotation({"type": "Polygon", "coordinates": [[[0, 0], ["a", 1], [1, 1], [0, 0]]]}, "T"))).encode(), "not a list of"),
    (json.dumps(_collection(_annotation({"type": "Polygon"}, "T"))).encode(), "no 'coordinates'"),
    (json.dumps(_collection(_annotation({"type": "Point", "coordinates": [1, 2]}, "T"))).encode(), "no Polygon"),
    (b'{"type": "FeatureCollection", "features": 3}', "no 'features' list"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_bad_region_files_raise_region_file_error(tmp_path, content, match):
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    with pytest.raises(RegionFileError, match=match):
        read_regions(path)


def test_region_files_over_the_limit_are_refused_before_reading(tmp_path, region_file):
    with pytest.raises(RegionFileError, match="refused"):
        read_regions(region_file, max_bytes=100)
    assert MAX_REGION_BYTES == 64 * 2**20
    with pytest.raises(RegionFileError, match="Tumour"):
        read_regions(region_file, classification="Tumour")
    with pytest.raises(RegionFileError, match="Cannot read"):
        read_regions(tmp_path / "missing.geojson")


@pytest.fixture()
def detections_file(tmp_path):
    """The app's own QuPath export of a prediction (40 nucleus outlines, objectType "detection"), 1 µm per px."""
    a = synthetic_prediction(n=40, seed=3)
    return a, write_geojson(a, tmp_path / "cells.geojson", mpp=1.0)


def test_a_file_of_detections_is_refused_as_regions(detections_file):
    """Nucleus outlines are not regions: each would 'contain' its own cell, so 100 % of the cells fell inside."""
    a, path = detections_file
    with pytest.raises(RegionFileError, match=r"40 detection\(s\) \(nucleus or cell outlines\).*not regions.*"
                                              r"Export annotations from QuPath"):
        read_regions(path)
    with pytest.raises(RegionFileError, match="detection"):
        region_composition(a, path.read_bytes(), mpp=1.0)


@pytest.mark.parametrize("kind", ["cell", "tile"])
def test_qupath_cells_and_tiles_are_detections_too(detections_file, kind):
    _, path = detections_file
    doc = json.loads(path.read_text())
    for feat in doc["features"]:
        feat["properties"]["objectType"] = kind
    with pytest.raises(RegionFileError, match="not regions"):
        read_regions(json.dumps(doc).encode())
    # before QuPath 0.3 the kind was the feature's id
    for feat in doc["features"]:
        del feat["properties"]["objectType"]
        feat["id"] = "PathCellObject"
    with pytest.raises(RegionFileError, match="not regions"):
        read_regions(json.dumps(doc).encode())


def test_annotations_among_detections_are_read_and_the_detections_counted(detections_file):
    a, path = detections_file
    doc = json.loads(path.read_text())
    square = [[0, 0], [500, 0], [500, 400], [0, 400], [0, 0]]
    doc["features"].append(_annotation({"type": "Polygon", "coordinates": [square]}, "Tumor", "core"))
    regions = read_regions(json.dumps(doc).encode())
    assert [(r.name, r.classification) for r in regions] == [("core", "Tumor")]
    assert regions.n_detections_ignored == 40
    assert regions.notes == ["40 detection(s) (nucleus or cell outlines) in the file were ignored: "
                             "only annotations are regions."]
    xy = np.asarray(a.obsm["spatial"])
    want = (xy[:, 0] < 500) & (xy[:, 1] < 400)
    res = region_composition(a, json.dumps(doc).encode(), mpp=1.0)
    assert res.n_inside == int(want.sum()) < a.n_obs and res.regions.notes == regions.notes
    annotation_only = json.dumps(_collection(doc["features"][-1])).encode()
    assert read_regions(annotation_only).notes == []  # no detection: nothing to say
