"""Cell types page (#19.3, #19.8): the neighbourhood tab shows the observed composition
(from the cell calls, radius chosen by the user) beside the model's predicted one, each
labelled; differential expression warns when the groups are too small to ever be significant."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from ghist_core.analysis.neighbourhoods import observed_neighbourhood_by_type, predicted_neighbourhood_by_type
from ghist_core.paths import REPO_DIR
from ghist_core.viz import palette
from apptest_kit import download, record_deferred_downloads, register_prediction
from prediction_factory import synthetic_prediction

PAGE = str(REPO_DIR / "pages" / "cell_types.py")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _arr(v) -> np.ndarray:
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).astype(float)
    return np.asarray(v, dtype=float)


def _z(fig: dict) -> np.ndarray:
    z = fig["data"][0]["z"]
    if isinstance(z, dict):  # a packed 2-D array, shape "rows, cols"
        return _arr(z).reshape([int(n) for n in str(z["shape"]).split(",")])
    return np.array([_arr(r) for r in z])


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """Two ER+ and two ER− patients, one synthetic prediction each, in a real project store."""
    import streamlit as st

    from ghist_core.project import uploads
    from ghist_core.project.store import Project

    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    st.cache_data.clear()
    st.cache_resource.clear()
    project = Project.open_or_create(tmp_path / "cohort")
    adatas = {}
    for i, pid in enumerate(["P1", "P2", "P3", "P4"]):
        rec = uploads.upload_and_add(project, f"s{i}.png", _png(i), patient_id=pid, mpp=1.0).record
        a = synthetic_prediction(n=600, seed=i)
        register_prediction(project, rec.slide_id, a, grid_sizes_um=None)
        adatas[pid] = a
    clin = pd.DataFrame({"patient_id": ["P1", "P2", "P3", "P4"],
                         "er_status": ["Positive", "Positive", "Negative", "Negative"]})
    return project, adatas, clin.to_csv(index=False).encode()


def _open(project) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=90)
    at.session_state["project_dir"] = str(project.folder)
    at.run()
    assert not at.exception, at.exception
    return at


def _heatmaps(at) -> dict[str, dict]:
    figs = [json.loads(e.proto.spec) for e in at.get("plotly_chart")]
    return {f["layout"]["title"]["text"].split(":")[0].split(" by")[0]: f
            for f in figs if f["data"] and f["data"][0]["type"] == "heatmap"}


def test_observed_and_predicted_neighbourhoods_side_by_side(project):
    proj, adatas, _ = project
    at = _open(proj)
    at.session_state["ct_tab"] = "Neighbourhoods"
    at.run()
    assert not at.exception
    assert at.number_input(key="ct_nbhd_radius").value == 50.0  # documented default
    maps = _heatmaps(at)
    assert set(maps) == {"Observed", "Predicted"}
    obs, pred = maps["Observed"], maps["Predicted"]
    assert "within 50 µm" in obs["layout"]["title"]["text"] and "cell calls" in obs["layout"]["title"]["text"]
    assert "model's neighbourhood head" in pred["layout"]["title"]["text"]
    # the first slide in the selectbox is P1's: the numbers are ghist_core's on that prediction
    a = adatas["P1"]
    order = palette.ordered_types(a.obs["cell_type"].unique())
    want = observed_neighbourhood_by_type(a, 50.0).matrix.loc[order, order].to_numpy()
    np.testing.assert_allclose(_z(obs), want, atol=1e-4)
    want_pred = predicted_neighbourhood_by_type(a).matrix.loc[order, order].to_numpy()
    np.testing.assert_allclose(_z(pred), want_pred, atol=1e-4)
    assert not np.allclose(_z(obs), _z(pred), atol=1.0)  # two different things, both labelled
    top = max(np.nanmax(want), np.nanmax(want_pred))  # one colour scale, so their contrasts compare
    assert obs["data"][0]["zmax"] == pytest.approx(top, abs=1e-3) == pred["data"][0]["zmax"]
    captions = " ".join(re.sub(r"\\(.)", r"\1", c.value) for c in at.caption)
    assert "itself excluded" in captions and "not a count of the neighbouring cell calls" in captions
    # the user changes the radius: the observed map is recomputed for it
    at.number_input(key="ct_nbhd_radius").set_value(80.0).run()
    obs80 = _heatmaps(at)["Observed"]
    assert "within 80 µm" in obs80["layout"]["title"]["text"]
    want80 = observed_neighbourhood_by_type(a, 80.0).matrix.loc[order, order].to_numpy()
    np.testing.assert_allclose(_z(obs80), want80, atol=1e-4)


def test_two_vs_two_differential_expression_warns(project):
    proj, _, clin = project
    at = _open(proj)
    at.session_state["ct_tab"] = "Differential expression"
    at.run()
    at.get("file_uploader")[0].upload("clinical.csv", clin, "text/csv").run()
    assert not at.exception
    warnings = [re.sub(r"\\(.)", r"\1", w.value) for w in at.warning]
    assert any("Positive (n=2) and Negative (n=2)" in w and "cannot give p below 0.33" in w
               and "q < 0.05" in w for w in warnings), warnings
    button = at.get("download_button")[0]
    assert button.key == "ct_de_csv" and button.proto.ignore_rerun


def test_differential_csv_names_its_groups_and_the_direction(project, monkeypatch):
    """The downloaded CSV had mean_a, mean_b and log2fc but no group: once away from the screen nobody could
    tell Positive over Negative from Negative over Positive. It now carries both groups and the grouping."""
    record_deferred_downloads(monkeypatch)
    proj, _, clin = project
    at = _open(proj)
    at.session_state["ct_tab"] = "Differential expression"
    at.run()
    at.get("file_uploader")[0].upload("clinical.csv", clin, "text/csv").run()
    at.selectbox(key="ct_ga").set_value("Negative").run()  # A and B the other way round from the default
    at.selectbox(key="ct_gb").set_value("Positive").run()
    assert not at.exception
    shown = next(d.value for d in at.dataframe if "log2fc" in d.value.columns)
    _, data = download(at, "ct_de_csv")
    csv = pd.read_csv(io.BytesIO(data))
    assert {"grouping", "group_a", "group_b", "log2fc_pseudocount", "reliability"} <= set(csv.columns)
    assert set(csv["grouping"]) == {"er_status"}
    assert set(csv["group_a"]) == {"Negative"} and set(csv["group_b"]) == {"Positive"}
    pd.testing.assert_frame_equal(csv[list(shown.columns)], shown, check_dtype=False)  # the screen's numbers
    pc = csv["log2fc_pseudocount"].iloc[0]
    np.testing.assert_allclose(csv["log2fc"], np.log2((csv["mean_a"] + pc) / (csv["mean_b"] + pc)), rtol=1e-6)
    captions = " ".join(re.sub(r"\\(.)", r"\1", c.value) for c in at.caption)
    assert f"log2 FC = log2((mean in Negative + {pc:g}) / (mean in Positive + {pc:g}))" in captions, captions
