"""Exports and regions in the app (#19.2, #19.8): the Gene maps page prepares a slide's .h5ad /
CSV / Parquet / QuPath GeoJSON on disk and offers it; Home zips the whole project (one file per
finished slide); Cell types restricts the composition to the cells inside an uploaded QuPath
annotation; every figure names cell types by their display names ("T cells")."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from ghist_core.export import cells_in_regions, read_regions, write_geojson
from ghist_core.paths import REPO_DIR
from ghist_core.viz import palette
from apptest_kit import download, record_deferred_downloads, register_prediction
from prediction_factory import synthetic_prediction

N_CELLS = 400
GENES = ("ERBB2", "ESR1", "CD3E", "EPCAM")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.clip(np.array([225, 160, 200]) + rng.normal(0, 18, (800, 1000, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """Two slides with a finished (synthetic) prediction and one without a run, 1 µm per pixel."""
    import streamlit as st

    from ghist_core.project import uploads
    from ghist_core.project.store import Project

    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    monkeypatch.setenv("GHIST_EXPORT_DIR", str(tmp_path / "exports"))
    monkeypatch.chdir(REPO_DIR)
    st.cache_data.clear()
    st.cache_resource.clear()
    project = Project.open_or_create(tmp_path / "cohort")
    finished, adatas = [], {}
    for i, pid in enumerate(["P1", "P2", "P3"]):
        rec = uploads.upload_and_add(project, f"s{i}.png", _png(i), patient_id=pid, mpp=1.0).record
        if i == 2:  # no run: never exported
            continue
        a = synthetic_prediction(n=N_CELLS, genes=GENES, seed=i)
        register_prediction(project, rec.slide_id, a, grid_sizes_um=None)
        finished.append(int(rec.slide_id))
        adatas[int(rec.slide_id)] = a
    return project, finished, adatas


def _open(page: str, project) -> AppTest:
    at = AppTest.from_file(str(REPO_DIR / "pages" / page), default_timeout=120)
    at.session_state["project_dir"] = str(project.folder)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture(autouse=True)
def _record_deferred(monkeypatch):
    """AppTest drops its media manager after each run; keep the callables a click would run."""
    record_deferred_downloads(monkeypatch)


_download = download


def _buttons(at: AppTest) -> dict:
    return {b.key: b for b in at.button}


def _plotly(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def test_gene_maps_exports_open_in_their_tools(project, tmp_path):
    project, finished, adatas = project
    at = _open("gene_maps.py", project)
    sid = at.selectbox(key="gm_slide").value
    a = adatas[sid]
    at.multiselect(key="gm_genes").set_value(["ERBB2", "CD3E"]).run()
    assert "gm_export_download" not in {b.key for b in at.get("download_button")}  # nothing before Prepare

    # CSV of the genes chosen on the map
    at.radio(key="gm_export_fmt").set_value("csv").run()
    _buttons(at)["gm_export_prepare"].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    label, data = _download(at, "gm_export_download")
    assert label.startswith("Download slide_") and ("kB" in label or "MB" in label)
    table = pd.read_csv(io.BytesIO(data))
    assert len(table) == N_CELLS and {"ERBB2", "CD3E"} <= set(table.columns) and "ESR1" not in table.columns
    np.testing.assert_allclose(table["ERBB2"], a[:, "ERBB2"].X.ravel(), rtol=1e-5)
    assert any("pd.read_csv" in c.value for c in at.caption)

    # all genes as Parquet
    at.radio(key="gm_export_fmt").set_value("parquet").run()
    assert "gm_export_download" not in {b.key for b in at.get("download_button")}  # the CSV is not offered as Parquet
    at.radio(key="gm_export_genes").set_value("all").run()
    _buttons(at)["gm_export_prepare"].click().run()
    _, data = _download(at, "gm_export_download")
    assert set(GENES) <= set(pd.read_parquet(io.BytesIO(data)).columns)

    # QuPath GeoJSON: one detection per nucleus, classified by cell type
    at.radio(key="gm_export_fmt").set_value("geojson").run()
    at.radio(key="gm_export_genes").set_value("chosen").run()
    _buttons(at)["gm_export_prepare"].click().run()
    _, data = _download(at, "gm_export_download")
    doc = json.loads(data)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == N_CELLS
    props = doc["features"][0]["properties"]
    assert props["classification"]["name"] in palette.CELL_TYPES and "ERBB2" in props["measurements"]
    assert any("File ▸ Import objects" in c.value for c in at.caption)

    # .h5ad for scanpy, with the H&E in uns["spatial"]
    at.radio(key="gm_export_fmt").set_value("h5ad").run()
    assert at.radio(key="gm_export_genes").disabled
    _buttons(at)["gm_export_prepare"].click().run()
    assert not at.exception and not at.error
    _, data = _download(at, "gm_export_download")
    (tmp_path / "x.h5ad").write_bytes(data)
    got = ad.read_h5ad(tmp_path / "x.h5ad")
    assert got.n_obs == N_CELLS and list(got.var_names) == list(GENES)
    lib = next(iter(got.uns["spatial"].values()))
    assert lib["images"]["hires"].ndim == 3 and lib["scalefactors"]["tissue_hires_scalef"] > 0
    assert got.uns["ghist"]["mpp"] == pytest.approx(1.0)  # from the store: the run did not record it
    # a new file replaces the last one on disk: the folder holds one prepared file
    assert len(list((tmp_path / "exports" / "ghist-exports").glob("*/*"))) == 1


def test_home_zips_every_finished_slide(project, tmp_path):
    project, finished, adatas = project
    at = _open("home.py", project)
    at.radio(key="home_export_fmt").set_value("csv").run()
    at.text_input(key="home_export_genes").set_value("ESR1").run()
    _buttons(at)["home_export_prepare"].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    label, data = _download(at, "home_export_download")
    assert label.endswith(".zip (" + label.rsplit("(", 1)[1])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == sorted([*(f"slide_{s}.csv" for s in finished), "manifest.csv"])
        manifest = pd.read_csv(zf.open("manifest.csv"))  # which file is which slide and patient
        assert list(manifest["file"]) == [f"slide_{s}.csv" for s in finished]
        assert list(manifest["patient_id"]) == ["P1", "P2"] and list(manifest["slide_file"]) == ["s0.png", "s1.png"]
        assert list(manifest["n_cells"]) == [N_CELLS, N_CELLS]
        for s in finished:
            t = pd.read_csv(zf.open(f"slide_{s}.csv"))
            assert len(t) == N_CELLS and "ESR1" in t.columns and "ERBB2" not in t.columns
    # an unknown gene is a plain message, not a crash
    at.text_input(key="home_export_genes").set_value("NOTAGENE").run()
    _buttons(at)["home_export_prepare"].click().run()
    assert not at.exception and any("NOTAGENE" in e.value for e in at.error)


def _annotation(polygon_px: list[list[float]], hole_px: list[list[float]] | None = None) -> bytes:
    rings = [polygon_px] + ([hole_px] if hole_px else [])
    return json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
    }]}).encode()


def test_region_upload_restricts_the_composition(project):
    project, finished, adatas = project
    at = _open("cell_types.py", project)
    sid = at.selectbox(key="ct_region_slide").value
    a = adatas[sid]
    geo = _annotation([[0, 0], [500, 0], [500, 400], [0, 400], [0, 0]],
                      [[100, 100], [200, 100], [200, 200], [100, 200], [100, 100]])
    at.get("file_uploader")[0].upload("tumour.geojson", geo, "application/geo+json").run()
    assert not at.exception and not at.error, [e.value for e in at.error]

    # the test's own count: read_regions + point-in-polygon at 1 µm per pixel
    inside = cells_in_regions(np.asarray(a.obsm["spatial"]) / 1.0, read_regions(geo))
    expected = a.obs["cell_type"].astype(str)[inside].value_counts()
    assert 0 < inside.sum() < N_CELLS
    table = next(d.value for d in at.dataframe if "cells" in d.value.columns).set_index("cells")
    got = table.loc["inside the region"]
    assert {t: int(got[t]) for t in got.index if got[t]} == {t: int(n) for t, n in expected.items()}
    assert int(table.loc["whole slide"].sum()) == N_CELLS
    assert any(f"{int(inside.sum()):,} of the slide's {N_CELLS:,} cells" in m.value.replace("\\", "")
               for m in at.markdown)

    figs = _plotly(at)
    comp = next(f for f in figs if "Inside the region" in f["layout"]["title"]["text"])
    assert [t["name"] for t in comp["data"]] == [palette.cell_type_label(t) for t in palette.CELL_TYPES]
    assert "T cells" in [t["name"] for t in comp["data"]]
    heat = next(f for f in figs if "inside the region" in (f["layout"].get("title") or {}).get("text", ""))
    assert "T cells" in heat["data"][0]["y"]


def test_the_apps_own_detections_export_is_not_taken_as_a_region(project, tmp_path):
    """The slide's nuclei exported for QuPath (one outline per cell, objectType "detection") used to
    count as regions: 100 % of the cells 'inside'. Refused alone; ignored, and said, beside an annotation."""
    project, _, adatas = project
    at = _open("cell_types.py", project)
    sid = at.selectbox(key="ct_region_slide").value
    detections = write_geojson(adatas[sid], tmp_path / "cells.geojson", mpp=1.0).read_bytes()
    at.get("file_uploader")[0].upload("cells.geojson", detections, "application/geo+json").run()
    assert not at.exception
    errors = [e.value.replace("\\", "") for e in at.error]
    assert any(f"{N_CELLS} detection(s)" in e and "not regions" in e and "Export annotations from QuPath" in e
               for e in errors), errors
    assert not any("Inside the region" in (f["layout"].get("title") or {}).get("text", "") for f in _plotly(at))

    square = _annotation([[0, 0], [500, 0], [500, 400], [0, 400], [0, 0]])
    mixed = json.loads(detections)
    mixed["features"] += json.loads(square)["features"]
    at.get("file_uploader")[0].upload("mixed.geojson", json.dumps(mixed).encode(), "application/geo+json").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    inside = cells_in_regions(np.asarray(adatas[sid].obsm["spatial"]), read_regions(square))
    shown = [m.value.replace("\\", "") for m in at.markdown]
    assert any(f"{int(inside.sum()):,} of the slide's {N_CELLS:,} cells" in t and "1 region(s)" in t for t in shown), shown
    captions = [c.value.replace("\\", "") for c in at.caption]
    assert f"{N_CELLS} detection(s) (nucleus or cell outlines) in the file were ignored" in " ".join(captions), captions


@pytest.mark.parametrize("data, words", [
    (b"not json at all", "not valid JSON"),
    (json.dumps({"type": "FeatureCollection", "features": []}).encode(), "no Polygon"),
    (_annotation([[5000, 5000], [6000, 5000], [6000, 6000], [5000, 6000], [5000, 5000]]), "None of the slide's"),
])
def test_bad_region_file_is_a_plain_error(project, data, words):
    project, _, _ = project
    at = _open("cell_types.py", project)
    at.get("file_uploader")[0].upload("bad.geojson", data, "application/geo+json").run()
    assert not at.exception
    assert any(words in e.value.replace("\\", "") for e in at.error), [e.value for e in at.error]
    assert not any("Inside the region" in (f["layout"].get("title") or {}).get("text", "") for f in _plotly(at))
