"""AppTest for the Cohort & survival page: demo on first start, HER2 and stage groupings,
the upload path (via the session key the uploader fills), feature groups without slides,
clinical groups that keep the patients without a predicted slide."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from apptest_kit import open_page_alone, register_prediction
from ghist_core.analysis.clinical import guess_mapping, load_demo_clinical, read_clinical_table, validate_survival
from ghist_core.analysis.groups import ByVariable, make_risk_groups
from ghist_core.analysis.survival import compare_groups
from ghist_core.paths import REPO_DIR
from prediction_factory import synthetic_prediction
from slide_factory import synthetic_he, write_png

PAGE = str(REPO_DIR / "pages" / "cohort.py")


def _arr(v):
    """Plotly JSON arrays may be base64-packed ({"dtype", "bdata"})."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
    return np.asarray(v)


def _figure(at, i=0) -> dict:
    return json.loads(at.get("plotly_chart")[i].proto.spec)


def _shown(elements) -> list[str]:
    """What the reader sees of markdown elements: data text is backslash-escaped (safe_text.plain)."""
    return [re.sub(r"\\(.)", r"\1", e.value) for e in elements]


def _metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    return open_page_alone("pages/cohort.py", timeout=60)


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
    assert any("her2_status = Negative" in m_ for m_ in _shown(at.markdown))
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
    problems = " ".join(_shown(at.markdown))
    assert "1 of 31 rows left out" in problems and "'zehn'" in problems


def test_feature_groups_need_slides(app):
    at = app
    at.radio(key="cohort_group_mode").set_value("Predicted feature: split").run()
    assert not at.exception
    assert any("need predicted slides" in i.value and "demo has no slides" in i.value
               for i in at.info)


# --------------------------------------------------------------------------- with a real store
def _add_prediction(project, png, pid: str, X, types, nbhd_tumour) -> None:
    """One slide of ``pid`` with a finished run whose .h5ad holds these predicted cells."""
    import anndata as ad
    import pandas as pd

    rec = project.add_slide(png, patient_id=pid, mpp=0.5)
    run = project.start_run(rec.slide_id, model_id="test", weights_sha256=None, device="cpu")
    n = len(types)
    adata = ad.AnnData(X=np.asarray(X, np.float32),
                       obs=pd.DataFrame({"cell_type": types, "nbhd_tumour": nbhd_tumour},
                                        index=np.arange(n).astype(str)),
                       var=pd.DataFrame(index=["ERBB2", "ESR1"]))
    out = project.run_dir(run) / "cells.h5ad"
    adata.write_h5ad(out)
    project.add_result_file(run, "h5ad", out)
    project.finish_run(run, n_cells=n)


def _predicted_project(folder, n_patients: int, rng) -> dict[str, float]:
    """A real project store with one small slide per patient and a finished run whose
    .h5ad holds predicted cells (tumour share differs by patient). Returns the shares."""
    from PIL import Image

    from ghist_core.project.store import Project

    project = Project.open_or_create(folder)
    shares = {}
    for i in range(n_patients):
        pid = f"PT-{i:03d}"
        png = folder.parent / f"slide_{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(png)
        share = float(rng.uniform(0.1, 0.7))
        types = np.where(rng.random(120) < share, "tumour", "stroma")
        _add_prediction(project, png, pid, rng.random((120, 2)), types, rng.random(120))
        shares[pid] = float((types == "tumour").mean())
    return shares


def test_groups_from_predicted_slides_in_the_store(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    projects = tmp_path / "projects"
    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(projects))
    shares = _predicted_project(projects / "demo", 36, rng)  # the page's default project
    # survival depends on the predicted tumour share; 4 clinical patients have no slide
    ids = list(shares) + [f"PT-9{i:02d}" for i in range(4)]
    x = np.array([shares.get(p, 0.4) for p in ids])
    t = rng.exponential(1 / (0.02 * np.exp(6 * x)))
    c_ = rng.uniform(20, 80, len(ids))
    csv = "patient,months,dead\n" + "".join(
        f"{p},{min(a, b):.2f},{int(a <= b)}\n" for p, a, b in zip(ids, t, c_))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["cohort_upload"] = ("cohort.csv", csv.encode())
    at.run()
    at.radio(key="cohort_source").set_value("My clinical table").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = " ".join(_shown(at.markdown)) + " ".join(_shown(at.caption))
    assert "4 of 40 patients have no predicted slide" in text
    assert "36 patients have both clinical data and predicted slides" in text
    at.radio(key="cohort_group_mode").set_value("Predicted feature: split").run()
    at.selectbox(key="cohort_feature").set_value("prop_tumour").run()
    assert not at.exception and not at.error
    m = _metrics(at)
    assert m["Patients"] == "36"
    fig = _figure(at)
    names = sorted(tr["name"] for tr in fig["data"] if "(n=" in tr.get("name", ""))
    v = np.array(list(shares.values()))
    n_low = int((v <= np.median(v)).sum())  # median split, ties go low (stated in the rule)
    assert names == [f"high (n={36 - n_low})", f"low (n={n_low})"]
    # the feature comparison section: tumour share differs between the median-split groups
    tests = [df.value for df in at.dataframe if "q_value" in df.value.columns][0]
    row = tests.set_index("feature").loc["prop_tumour"]
    assert row["test"] == "Mann–Whitney U" and row["p_value"] < 1e-3
    # expression features, a threshold split and k-means clusters on predicted features
    at.text_input(key="cohort_genes").set_value("ERBB2").run()
    assert "expr_ERBB2" in at.selectbox(key="cohort_feature").options
    at.text_input(key="cohort_genes").set_value("NOTAGENE").run()
    assert any("NOTAGENE" in w for w in _shown(at.warning))  # clear message, page still up
    at.text_input(key="cohort_genes").set_value("").run()
    at.selectbox(key="cohort_feature").set_value("prop_tumour").run()
    at.selectbox(key="cohort_split").set_value("threshold").run()
    at.number_input(key="cohort_threshold").set_value(0.4).run()
    assert _metrics(at)["Patients"] == "36"
    names = sorted(tr["name"] for tr in _figure(at)["data"] if "(n=" in tr.get("name", ""))
    n_le = int((v <= 0.4).sum())
    assert names == [f"> 0.4 (n={36 - n_le})", f"≤ 0.4 (n={n_le})"]
    at.radio(key="cohort_group_mode").set_value("Predicted features: k-means clusters").run()
    at.multiselect(key="cohort_km_feats").set_value(["prop_tumour"]).run()
    assert not at.exception and not at.error
    names = sorted(tr["name"] for tr in _figure(at)["data"] if "(n=" in tr.get("name", ""))
    assert [n_.split(" (")[0] for n_ in names] == ["cluster 1", "cluster 2"]
    assert any("k-means (k=2, seed=0" in cp for cp in _shown(at.caption))
    # the table can be kept in the project, unchanged
    at.button(key="cohort_save").click().run()
    assert any("Saved" in s.value for s in at.success)
    from ghist_core.project.store import Project

    saved = Project.open(projects / "demo").list_clinical_tables()
    assert len(saved) == 1 and saved.loc[0, "mapping"]["time"] == "months"
    path, _ = Project.open(projects / "demo").get_clinical_table(int(saved.loc[0, "table_id"]))
    assert path.read_bytes() == csv.encode()


def test_both_pages_pool_a_patients_slides_the_same_way(tmp_path, monkeypatch):
    """Issue #19.4: a patient with two slides of different cell counts gets one number on the
    Cell types page (differential expression) and on this page (feature tests)."""
    from PIL import Image

    from ghist_core.project.store import Project

    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    project = Project.open_or_create(tmp_path / "study")
    # ERBB2 per slide: P1 has 30 cells at 1.0 and 90 cells at 5.0 -> pooled 4.0 (slide means: 3.0)
    slides = [("P1", 30, 1.0), ("P1", 90, 5.0), ("P2", 50, 2.0), ("P3", 40, 0.5), ("P4", 60, 1.0)]
    for i, (pid, n, erbb2) in enumerate(slides):
        png = tmp_path / f"slide_{i}.png"
        Image.fromarray(np.full((48, 48, 3), 100 + 20 * i, np.uint8)).save(png)  # distinct files
        _add_prediction(project, png, pid, np.c_[np.full(n, erbb2), np.arange(n) % 3],
                        np.where(np.arange(n) % 4, "tumour", "stroma"), np.linspace(0, 1, n))
    csv = ("patient,months,dead,er_status\nP1,10,1,Positive\nP2,20,0,Positive\n"
           "P3,5,1,Negative\nP4,30,1,Negative\n")
    session = {"project_dir": str(project.folder)}

    cell_types = AppTest.from_file(str(REPO_DIR / "pages" / "cell_types.py"), default_timeout=60)
    for k, v in {**session, "ct_tab": "Differential expression"}.items():
        cell_types.session_state[k] = v
    cell_types.run()
    cell_types.get("file_uploader")[0].upload("clinical.csv", csv.encode(), "text/csv").run()
    assert not cell_types.exception, cell_types.exception
    de = [d.value for d in cell_types.dataframe if "log2fc" in d.value.columns]
    assert de, _shown(cell_types.warning)
    de = de[0]
    mean_pos = de.set_index("feature").loc["ERBB2", "mean_a"]

    cohort = AppTest.from_file(PAGE, default_timeout=60)
    for k, v in {**session, "cohort_upload": ("clinical.csv", csv.encode())}.items():
        cohort.session_state[k] = v
    cohort.run()
    cohort.radio(key="cohort_source").set_value("My clinical table").run()
    cohort.selectbox(key="cohort_group_var").set_value("er_status").run()
    cohort.text_input(key="cohort_genes").set_value("ERBB2").run()
    assert not cohort.exception, cohort.exception
    tests = [d.value for d in cohort.dataframe if "q_value" in d.value.columns][0]
    median_pos = tests.set_index("feature").loc["expr_ERBB2", "median_Positive"]
    # two patients per group: the median is their mean, so both pages show (4.0 + 2.0) / 2
    assert mean_pos == pytest.approx(3.0) and median_pos == pytest.approx(mean_pos)


def test_clinical_groups_keep_patients_without_slides(tmp_path, monkeypatch):
    """QA: once one clinical patient had a predicted slide, a clinical grouping counted only the
    patients with slides (stage I, whose patient has none, disappeared). Clinical groupings use
    every clinical patient; groups from predicted features only those with slides, and say so."""
    from ghist_core.project.store import Project

    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    project = Project.open_or_create(tmp_path / "study")
    for i, pid in enumerate(["P-001", "P-003"]):  # P-002 has no slide
        png = write_png(tmp_path / f"s{i}.png", synthetic_he((160, 128), seed=i))
        rec = project.add_slide(png, patient_id=pid, mpp=1.0)
        register_prediction(project, int(rec.slide_id), synthetic_prediction(n=200, seed=i),
                            grid_sizes_um=None)
    csv = b"patient,months,dead,stage\nP-001,10,1,Stage II\nP-002,20,1,Stage I\nP-003,5,1,Stage III\n"
    at = open_page_alone("pages/cohort.py", {"project_dir": str(project.folder),
                                             "cohort_upload": ("three.csv", csv)}, timeout=60)
    at.radio(key="cohort_source").set_value("My clinical table").run()
    assert not at.exception, [e.value for e in at.exception]
    text = " ".join(_shown(at.markdown)) + " ".join(_shown(at.caption))
    assert "1 of 3 patients have no predicted slide" in text
    assert "2 patients have both clinical data and predicted slides" in text
    assert at.selectbox(key="cohort_group_var").value == "stage"
    assert at.multiselect(key="cohort_levels").options == [
        "Stage I (n=1)", "Stage II (n=1)", "Stage III (n=1)"]
    assert _metrics(at)["Patients"] == "3"
    shown = [d.value for d in at.dataframe if "events" in d.value.columns][0]
    assert shown.set_index("group")["n"].to_dict() == {"Stage I": 1, "Stage II": 1, "Stage III": 1}
    # a grouping from predicted features: only the two patients with slides, said on the page
    at.radio(key="cohort_group_mode").set_value("Predicted feature: split").run()
    assert not at.exception, [e.value for e in at.exception]
    assert _metrics(at)["Patients"] == "2"
    assert any("only the 2 of 3 patients with predicted slides" in cp for cp in _shown(at.caption))


# --------------------------------------------------------------------------- real browser
@pytest.mark.browser
@pytest.mark.slow
def test_browser_upload_group_and_plot(tmp_path):
    """streamlit run app.py on 127.0.0.1 + Chromium: upload a CSV through the real file
    input, pick a grouping, see the KM plot and the numbers."""
    from playwright.sync_api import sync_playwright

    from browser_helpers import StreamlitServer, launch_browser, wait_app_idle

    rng = np.random.default_rng(5)
    n = 60
    grade = np.where(np.arange(n) % 2, "G3", "G1")
    t = rng.exponential(np.where(grade == "G3", 20.0, 60.0))
    c_ = rng.uniform(10, 90, n)
    csv_path = tmp_path / "my_cohort.csv"
    csv_path.write_text("patient_id;time_months;status;grade\n" + "".join(
        f"P{i:03d};{min(a, b):.1f};{'Dead' if a <= b else 'Alive'};{g}\n".replace(".", ",")
        for i, (a, b, g) in enumerate(zip(t, c_, grade))), encoding="cp1252")
    events = int((t <= c_).sum())
    with StreamlitServer(tmp_path / "projects", tmp_path / "streamlit.log") as server, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server.url + "/cohort")
        page.wait_for_selector('[data-testid="stMetric"]', timeout=90_000)
        page.get_by_text("My clinical table").click()
        page.wait_for_selector('[data-testid="stFileUploader"]', timeout=60_000)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(
            str(csv_path))
        page.wait_for_selector("text=patients usable", timeout=60_000)
        wait_app_idle(page)
        body = page.locator("body").inner_text()
        assert f"{n} patients usable, {events} events" in body
        metrics = page.locator('[data-testid="stMetric"]')
        page.wait_for_selector('.js-plotly-plot .scatterlayer', timeout=60_000)
        text = [" ".join(m.split()) for m in metrics.all_inner_texts()]
        assert f"Patients {n}" in text and f"Events {events}" in text, text
        legend = page.locator(".js-plotly-plot").first.locator(".legendtext").evaluate_all(
            "els => els.map(e => e.textContent)")
        assert sorted(legend) == ["G1 (n=30)", "G3 (n=30)"]
        page.screenshot(path=str(tmp_path / "cohort.png"), full_page=True)
        browser.close()



def test_another_table_starts_from_its_own_column_guesses(app):
    """The demo's time unit (days) must not stay selected for an uploaded table in months: its times
    would be read as days (keyed widgets keep their value across reruns)."""
    at = app
    assert at.selectbox(key="cohort_unit_in").value == "days"  # the demo: TCGA times in days
    rows = "".join(f"P{i:02d},{3 + i},{i % 2}\n" for i in range(20))
    at.radio(key="cohort_source").set_value("My clinical table")
    at.session_state["cohort_upload"] = ("months.csv", ("case,os_months,dead\n" + rows).encode())
    at.run()
    assert not at.exception
    assert at.selectbox(key="cohort_unit_in").value == "months"
    assert at.selectbox(key="cohort_pid").value == "case"
    at.selectbox(key="cohort_unit_in").set_value("weeks").run()  # the user's own choice stays
    at.run()
    assert at.selectbox(key="cohort_unit_in").value == "weeks"
