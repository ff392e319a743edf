"""AppTest for the Cohort & survival page: demo on first start, HER2 and stage groupings,
the upload path (via the session key the uploader fills), feature groups without slides."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from ghist_core.cohort import (
    ByVariable,
    compare_groups,
    guess_mapping,
    load_demo_clinical,
    make_risk_groups,
    read_clinical_table,
    validate_survival,
)

from ghist_core.paths import REPO_DIR

PAGE = str(REPO_DIR / "pages" / "cohort.py")


def _arr(v):
    """Plotly JSON arrays may be base64-packed ({"dtype", "bdata"})."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
    return np.asarray(v)


def _figure(at, i=0) -> dict:
    return json.loads(at.get("plotly_chart")[i].proto.spec)


def _metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_demo_her2_positive_vs_negative(app):
    at = app
    assert any("no slides here" in i.value for i in at.info)  # honest banner
    at.selectbox(key="cohort_group_var").set_value("her2_status").run()
    at.multiselect(key="cohort_levels").set_value(["Negative", "Positive"]).run()
    assert not at.exception and not at.error
    m = _metrics(at)
    # README sanity table: HER2 IHC Pos vs Neg: n = 725, 80 deaths, χ² 4.0 (1 df), p 0.046
    assert m["Patients"] == "725" and m["Events"] == "80"
    assert float(m["Log-rank χ²"]) == pytest.approx(4.0, abs=0.1)
    assert float(m["p-value"]) == pytest.approx(0.046, abs=0.002)
    # the figure shows the same curves as ghist_core computes on the same table
    raw = load_demo_clinical()
    t = validate_survival(raw, guess_mapping(raw), "days", out_unit="months").table
    g = make_risk_groups(t, ByVariable("her2_status", ("Negative", "Positive")))
    ref = compare_groups(g.table, "time", "event", g.column)
    n_by = t.loc[t["her2_status"].isin(["Negative", "Positive"]), "her2_status"].value_counts()
    assert n_by.sum() == 725
    fig = _figure(at)
    names = sorted(tr["name"] for tr in fig["data"] if "(n=" in tr.get("name", ""))
    assert names == [f"Negative (n={n_by['Negative']})", f"Positive (n={n_by['Positive']})"]
    pos = next(tr for tr in fig["data"] if tr.get("name") == f"Positive (n={n_by['Positive']})")
    km = ref.km_table()
    assert np.allclose(_arr(pos["y"]), km.loc[km["group"] == "Positive", "survival"])
    assert np.allclose(_arr(pos["x"]), km.loc[km["group"] == "Positive", "time"])
    risk = [tr for tr in fig["data"] if tr.get("name", "").startswith("at risk")]
    assert sum(int(tr["text"][0]) for tr in risk) == 725
    # group table, reference group (largest) and Cox forest plot
    shown = [df.value for df in at.dataframe if "events" in df.value.columns][0]
    assert shown.set_index("group")["n"].to_dict() == n_by.to_dict()
    assert shown["events"].sum() == 80
    assert any("her2_status = Negative" in c_.value for c_ in at.caption)
    forest = _figure(at, 1)
    assert "Hazard ratios" in forest["layout"]["title"]["text"]
    assert list(forest["data"][0]["y"]) == ["her2_status=Positive"]


def test_demo_stage_gives_strong_separation(app):
    at = app
    at.selectbox(key="cohort_group_var").set_value("stage_group").run()
    m = _metrics(at)
    assert m["Patients"] == "1067" and m["Events"] == "140"
    assert float(m["p-value"]) < 1e-3
    pw = [df.value for df in at.dataframe if "p_holm" in df.value.columns]
    assert len(pw) == 1 and len(pw[0]) == 6


def test_upload_path_cp1252_semicolon(app):
    at = app
    text = ("Patient;Zeit_Monate;Status;Grad\n"
            + "".join(f"P{i:02d};{3 + i * 1.5:.1f};{'Dead' if i % 3 else 'Alive'};"
                      f"{'G3' if i % 2 else 'G1'}\n".replace(".", ",") for i in range(30))
            + "P99;zehn;Dead;G1\n")
    data = text.encode("cp1252")
    # what the uploader feeds the page: the same call the page makes
    df = read_clinical_table(data, "kohorte.csv")
    assert df.attrs["encoding"] in ("utf-8", "cp1252") and df.attrs["delimiter"] == ";"
    at.radio(key="cohort_source").set_value("My clinical table")
    at.session_state["cohort_upload"] = ("kohorte.csv", data)
    at.run()
    assert not at.exception and not at.error
    # the guesses for a German table: id, time (first numeric), event (Dead/Alive codes)
    assert at.selectbox(key="cohort_pid").value == "Patient"
    assert at.selectbox(key="cohort_time").value == "Zeit_Monate"
    assert at.selectbox(key="cohort_event").value == "Status"
    at.selectbox(key="cohort_unit_in").set_value("months").run()
    at.selectbox(key="cohort_group_var").set_value("Grad").run()
    m = _metrics(at)
    assert m["Patients"] == "30"
    assert m["Events"] == str(sum(1 for i in range(30) if i % 3))
    problems = " ".join(md.value for md in at.markdown)
    assert "1 of 31 rows left out" in problems and "'zehn'" in problems


def test_feature_groups_need_slides(app):
    at = app
    at.radio(key="cohort_group_mode").set_value("Predicted feature: split").run()
    assert not at.exception
    assert any("need predicted slides" in i.value and "demo has no slides" in i.value
               for i in at.info)
