"""Cohort page state (#19.5): the Cox model follows the grouping and states its reference,
ordinal groups in natural order with a selectable reference, 'Groups to compare' shows what
is compared, a clear message when no hazard ratio is estimable, and CSV downloads that do
not rerun the page (a rerun replaced the file a quick second click fetched: 404)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from lifelines import CoxPHFitter

from apptest_kit import open_page_alone
from ghist_core.analysis.clinical import guess_mapping, load_demo_clinical, validate_survival
from ghist_core.viz.survival_plots import NO_ESTIMATE_MESSAGE

STAGES = ["Stage I", "Stage II", "Stage III", "Stage IV"]


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    return open_page_alone("pages/cohort.py", timeout=90)


@pytest.fixture(scope="module")
def demo_table() -> pd.DataFrame:
    raw = load_demo_clinical()
    return validate_survival(raw, guess_mapping(raw), "days", out_unit="months").table


def _shown(elements) -> list[str]:
    """What the reader sees: markdown escapes and bold markers removed."""
    return [re.sub(r"\\(.)", r"\1", e.value.replace("**", "")) for e in elements]


def _cox_table(at) -> pd.DataFrame:
    return [d.value for d in at.dataframe if "HR" in d.value.columns][0].set_index("covariate")


def _figures(at) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


def _forest(at) -> dict:
    return next(f for f in _figures(at) if "Hazard ratios" in f["layout"].get("title", {}).get("text", ""))


def _lifelines_hr(table: pd.DataFrame, var: str, reference: str) -> pd.Series:
    d = table.dropna(subset=[var])
    X = pd.get_dummies(d[var].astype(str), dtype=float).drop(columns=reference)
    X["time"], X["event"] = d["time"].to_numpy(), d["event"].to_numpy()
    return CoxPHFitter().fit(X, "time", "event").hazard_ratios_


def test_cox_follows_the_grouping_and_states_its_reference(app, demo_table):
    at = app
    assert at.selectbox(key="cohort_group_var").value == "her2_status"
    assert list(_cox_table(at).index) == ["her2_status=Equivocal", "her2_status=Indeterminate",
                                          "her2_status=Positive"]
    assert any("Reference levels (HR = 1): her2_status = Negative" in m for m in _shown(at.markdown))
    at.selectbox(key="cohort_group_var").set_value("stage_group").run()
    assert not at.exception and not at.error
    # the model is now stage, against Stage I (the lowest stage), said in words and on the plot
    cox = _cox_table(at)
    assert list(cox.index) == [f"stage_group={s}" for s in STAGES[1:]]
    md = " ".join(_shown(at.markdown))
    assert "Covariates: stage_group." in md and "Reference levels (HR = 1): stage_group = Stage I." in md
    assert "her2_status" not in md
    forest = _forest(at)
    assert list(forest["data"][1]["y"]) == ["stage_group=Stage I (reference)"]
    # the same numbers as lifelines fitted on the same table
    ref = _lifelines_hr(demo_table, "stage_group", "Stage I")
    for s in STAGES[1:]:
        assert cox.loc[f"stage_group={s}", "HR"] == pytest.approx(ref[s], abs=1e-4)


def test_stages_in_natural_order_and_reference_selectable(app, demo_table):
    at = app
    at.selectbox(key="cohort_group_var").set_value("stage_group").run()
    assert at.multiselect(key="cohort_levels").value == STAGES  # not by size (Stage II is largest)
    assert at.selectbox(key="cohort_reference").options == STAGES
    assert at.selectbox(key="cohort_reference").value == "Stage I"
    km = _figures(at)[0]
    assert [t["name"].split(" (n=")[0] for t in km["data"] if "(n=" in t.get("name", "")] == STAGES
    at.selectbox(key="cohort_reference").set_value("Stage II").run()
    assert not at.exception and not at.error
    cox = _cox_table(at)
    assert list(cox.index) == ["stage_group=Stage I", "stage_group=Stage III", "stage_group=Stage IV"]
    assert any("stage_group = Stage II" in m for m in _shown(at.markdown))
    ref = _lifelines_hr(demo_table, "stage_group", "Stage II")
    for s in ("Stage I", "Stage III", "Stage IV"):
        assert cox.loc[f"stage_group={s}", "HR"] == pytest.approx(ref[s], abs=1e-4)
    assert cox.loc["stage_group=Stage I", "HR"] < 1  # Stage I does better than Stage II
    # the KM legend keeps the natural order whatever the reference
    km = _figures(at)[0]
    assert [t["name"].split(" (n=")[0] for t in km["data"] if "(n=" in t.get("name", "")] == STAGES


def test_groups_to_compare_shows_what_is_compared(app):
    at = app
    her2 = ["Equivocal", "Indeterminate", "Negative", "Positive"]
    assert at.multiselect(key="cohort_levels").value == her2  # default: all, listed
    at.multiselect(key="cohort_levels").set_value(["Negative", "Positive"]).run()
    assert any(c.startswith("Comparing 2 of 4 groups: Negative (n=") for c in _shown(at.caption))
    at.selectbox(key="cohort_group_var").set_value("stage_group").run()
    # a new variable starts with all its groups selected, never an empty box
    assert at.multiselect(key="cohort_levels").value == STAGES
    caption = next(c for c in _shown(at.caption) if c.startswith("Comparing"))
    assert caption.startswith("Comparing 4 of 4 groups (natural order): Stage I (n=")
    assert caption.endswith("Reference: Stage I.")
    assert _metric(at, "Patients") == "1067"
    at.selectbox(key="cohort_group_var").set_value("her2_status").run()
    assert at.multiselect(key="cohort_levels").value == her2
    assert at.selectbox(key="cohort_reference").value == "Negative"  # nominal: the largest group
    at.multiselect(key="cohort_levels").set_value(["Positive"]).run()
    assert any("at least two groups" in w.value for w in at.warning)
    assert not at.metric  # nothing is compared, and nothing pretends to be


def _metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_no_estimable_hazard_ratio_gives_a_message(app):
    at = app
    rows = "".join(f"P{i:02d},{1 + i},{int(i < 15 and i % 2 == 0)},{'A' if i < 15 else 'B'}\n"
                   for i in range(30))
    at.radio(key="cohort_source").set_value("My clinical table")
    at.session_state["cohort_upload"] = ("groups.csv", ("id,months,dead,arm\n" + rows).encode())
    at.run()
    at.selectbox(key="cohort_unit_in").set_value("months").run()
    at.selectbox(key="cohort_group_var").set_value("arm").run()
    assert not at.exception and not at.error
    assert any(NO_ESTIMATE_MESSAGE in i.value for i in at.info)
    assert not any("Hazard ratios" in f["layout"].get("title", {}).get("text", "") for f in _figures(at))
    assert any("No usable hazard ratio for: arm=B" in w for w in _shown(at.warning))


def test_csv_downloads_keep_their_file_across_reruns(app):
    at = app
    keys = ["cohort_dl_dropped", "cohort_dl_km", "cohort_dl_groups", "cohort_dl_pairwise",
            "cohort_dl_assign", "cohort_dl_cox", "cohort_dl_ph"]
    buttons = {b.key: b for b in at.get("download_button")}
    assert list(buttons) == keys
    # a click does not rerun the page, so the file the browser fetches is not replaced
    assert all(b.proto.ignore_rerun for b in buttons.values())
    urls = {k: b.proto.url for k, b in buttons.items()}
    assert all(u for u in urls.values())
    at.run()  # any other rerun (a widget change elsewhere) serves the same file at the same URL
    assert {b.key: b.proto.url for b in at.get("download_button")} == urls
