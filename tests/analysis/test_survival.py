"""Survival statistics (ghist_core.analysis.survival): hand-worked example, lifelines on the
real TCGA demo table, power on a generated cohort, null false-positive rate; the figures
drawn from the results (ghist_core.viz.survival_plots)."""

from __future__ import annotations

import warnings
from fractions import Fraction

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test, pairwise_logrank_test

from ghist_core.analysis.clinical import guess_mapping, load_demo_clinical, validate_survival
from ghist_core.analysis.features import patient_features
from ghist_core.analysis.groups import SplitAtQuantiles, make_risk_groups
from ghist_core.analysis.survival import compare_groups, fit_cox, rmst
from ghist_core.errors import SurvivalAnalysisError

# --------------------------------------------------------------------------- hand-worked
# Group A: 1, 3, 4+, 6   Group B: 2, 5, 7+, 8   (+ = censored)
#
# Kaplan–Meier, A: S(1) = 3/4; S(3) = 3/4 * 2/3 = 1/2; censored at 4; S(6) = 1/2 * 0/1 = 0
#               B: S(2) = 3/4; S(5) = 3/4 * 2/3 = 1/2; censored at 7; S(8) = 0.
# Medians (first time S <= 0.5): A = 3, B = 5.
# RMST to 6: A = 1*1 + 0.75*2 + 0.5*3 = 4.0 ; B = 1*2 + 0.75*3 + 0.5*1 = 4.75.
#
# Log-rank, event times of the pooled sample (nA, nB at risk, d deaths, who died):
#   t=1: 4,4,1 (A)  E_A = 4/8  V = 4*4*1*7/(8^2*7) = 1/4
#   t=2: 3,4,1 (B)  E_A = 3/7  V = 3*4*1*6/(7^2*6) = 12/49
#   t=3: 3,3,1 (A)  E_A = 3/6  V = 9/36 = 1/4
#   t=5: 1,3,1 (B)  E_A = 1/4  V = 3/16
#   t=6: 1,2,1 (A)  E_A = 1/3  V = 2/9
#   t=8: 0,1,1 (B)  E_A = 0    V = 0
# O_A = 3, E_A = 2.0119, V = 1.15462 → χ² = (O−E)²/V = 0.84559 (1 df), p = 0.3578.
HAND = pd.DataFrame({"t": [1, 3, 4, 6, 2, 5, 7, 8], "e": [1, 1, 0, 1, 1, 1, 0, 1],
                     "g": list("AAAABBBB")})


def test_hand_worked_km_and_logrank():
    res = compare_groups(HAND, "t", "e", "g", horizon=6)
    ea = Fraction(1, 2) + Fraction(3, 7) + Fraction(1, 2) + Fraction(1, 4) + Fraction(1, 3)
    v = Fraction(1, 4) + Fraction(12, 49) + Fraction(1, 4) + Fraction(3, 16) + Fraction(2, 9)
    chi2 = float((3 - ea) ** 2 / v)
    assert chi2 == pytest.approx(0.845587, abs=1e-6)
    assert res.test_statistic == pytest.approx(chi2, rel=1e-9)
    assert res.p_value == pytest.approx(0.3578, abs=1e-4)
    assert res.degrees_freedom == 1
    km = res.km_table()
    a = km[km["group"] == "A"].set_index("time")["survival"]
    b = km[km["group"] == "B"].set_index("time")["survival"]
    assert a.loc[[0, 1, 3, 4, 6]].tolist() == pytest.approx([1, 0.75, 0.5, 0.5, 0.0])
    assert b.loc[[0, 2, 5, 7, 8]].tolist() == pytest.approx([1, 0.75, 0.5, 0.5, 0.0])
    g = res.groups.set_index("group")
    assert g.loc["A", "median"] == 3 and g.loc["B", "median"] == 5
    assert g["n"].tolist() == [4, 4] and g["events"].tolist() == [3, 3]
    assert g.loc["A", "rmst"] == pytest.approx(4.0) and g.loc["B", "rmst"] == pytest.approx(4.75)
    # two groups: the one pair's test is the global test
    assert res.pairwise["p_value"].iloc[0] == pytest.approx(res.p_value)
    # numbers at risk under the plot: at t = 0 all 4 in each group, at t = 5 A has 1, B 3
    risk = res.at_risk_table([0, 5])
    assert risk.loc["A"].tolist() == [4, 1] and risk.loc["B"].tolist() == [4, 3]


# --------------------------------------------------------------------------- real TCGA demo
@pytest.fixture(scope="module")
def tcga() -> pd.DataFrame:
    df = load_demo_clinical()
    return validate_survival(df, guess_mapping(df)).table  # OS, days


def test_tcga_stage_logrank_and_counts(tcga):
    res = compare_groups(tcga, "time", "event", "stage_group")
    assert res.p_value < 1e-3
    sub = tcga.dropna(subset=["stage_group"])
    # counts shown equal the table's
    assert res.n == len(sub) == 1067 and res.events == int(sub["event"].sum()) == 140
    counts = sub.groupby("stage_group")["event"].agg(["size", "sum"])
    g = res.groups.set_index("group")
    assert g["n"].to_dict() == counts["size"].to_dict()
    assert g["events"].to_dict() == counts["sum"].to_dict()
    assert any("24" in n and "stage_group" in n for n in res.notes)  # left out, and said so
    # lifelines' own functions agree
    ref = multivariate_logrank_test(sub["time"], sub["stage_group"], sub["event"])
    assert res.test_statistic == pytest.approx(ref.test_statistic, rel=1e-9)
    assert res.p_value == pytest.approx(ref.p_value, rel=1e-6)
    st2 = sub[sub["stage_group"] == "Stage II"]
    kmf = KaplanMeierFitter().fit(st2["time"], st2["event"])
    km = res.km_table()
    mine = km[km["group"] == "Stage II"].set_index("time")["survival"]
    theirs = kmf.survival_function_.iloc[:, 0]
    assert np.allclose(mine.loc[theirs.index].to_numpy(), theirs.to_numpy())
    mine_ci = km.loc[km["group"] == "Stage II", ["ci_lower", "ci_upper"]].to_numpy()
    assert np.allclose(mine_ci, kmf.confidence_interval_.to_numpy())
    assert np.array_equal(km.loc[km["group"] == "Stage II", "at_risk"].to_numpy(),
                          kmf.event_table["at_risk"].to_numpy())
    ref_pw = pairwise_logrank_test(sub["time"], sub["stage_group"], sub["event"]).summary
    assert np.allclose(res.pairwise["test_statistic"], ref_pw["test_statistic"])
    assert np.allclose(res.pairwise["p_value"], ref_pw["p"])
    assert g.loc["Stage II", "median"] == kmf.median_survival_time_
    # pairwise Holm: Stage IV differs from Stage I after correction
    pw = res.pairwise.set_index(["group_a", "group_b"])
    assert pw.loc[("Stage I", "Stage IV"), "p_holm"] < 1e-3
    assert (res.pairwise["p_holm"] >= res.pairwise["p_value"]).all()


def test_tcga_raw_substages_match_readme(tcga):
    # README sanity table: 12 raw AJCC sub-stages incl. X: n 1,080, 147 deaths, χ² 111.9 (11)
    res = compare_groups(tcga, "time", "event", "ajcc_pathologic_tumor_stage")
    assert (res.n, res.events, res.degrees_freedom) == (1080, 147, 11)
    assert res.test_statistic == pytest.approx(111.9, abs=0.05)


def test_tcga_her2_and_figure(tcga):
    sub = tcga[tcga["her2_status"].isin(["Positive", "Negative"])]
    res = compare_groups(sub, "time", "event", "her2_status")
    # README sanity table: HER2 IHC Pos vs Neg, n = 725, 80 deaths, χ² ≈ 4.0, p ≈ 0.046
    assert res.n == 725 and res.events == 80
    assert res.test_statistic == pytest.approx(4.0, abs=0.1)
    fig = res.plot()
    names = [t.name for t in fig.data if t.name and "(n=" in t.name]
    assert sorted(names) == sorted(
        [f"{g} (n={n})" for g, n in sub["her2_status"].value_counts().items()])
    risk_traces = [t for t in fig.data if (t.name or "").startswith("at risk")]
    assert len(risk_traces) == 2
    assert int(risk_traces[0].text[0]) + int(risk_traces[1].text[0]) == 725


def test_tcga_cox_matches_lifelines(tcga):
    cox = fit_cox(tcga, "time", "event", ["age_at_initial_pathologic_diagnosis", "stage_group"])
    s = cox.summary.set_index("covariate")
    assert cox.n == 1067
    assert s.loc["age_at_initial_pathologic_diagnosis", "HR"] == pytest.approx(1.035, abs=1e-3)
    assert s.loc["stage_group=Stage IV", "HR"] == pytest.approx(12.0, rel=0.01)
    assert cox.reference_levels == {"stage_group": "Stage I"}
    # same model straight in lifelines
    d = tcga.dropna(subset=["age_at_initial_pathologic_diagnosis", "stage_group"])
    X = pd.get_dummies(d["stage_group"], drop_first=True, dtype=float)
    X["age"] = d["age_at_initial_pathologic_diagnosis"]
    X["time"], X["event"] = d["time"], d["event"]
    ref = CoxPHFitter().fit(X, "time", "event")
    assert s.loc["stage_group=Stage III", "HR"] == pytest.approx(
        ref.hazard_ratios_["Stage III"], rel=1e-6)
    assert set(cox.ph_check["covariate"]) == set(s.index)
    assert cox.ph_check["p"].between(0, 1).all()
    fig = cox.plot()
    assert list(fig.data[0].x) == pytest.approx(list(s["HR"][::-1]))
    uni = fit_cox(tcga, "time", "event", ["age_at_initial_pathologic_diagnosis", "stage_group"],
                  univariate=True)
    assert set(uni.summary["model"]) == {"age_at_initial_pathologic_diagnosis", "stage_group"}


def test_rmst_matches_lifelines_mean(tcga):
    from lifelines.utils import restricted_mean_survival_time

    sub = tcga[tcga["stage_group"] == "Stage III"]
    kmf = KaplanMeierFitter().fit(sub["time"], sub["event"])
    with warnings.catch_warnings():  # lifelines integrates numerically and may warn
        warnings.simplefilter("ignore")
        ref = restricted_mean_survival_time(kmf, t=1825)
    out = rmst(sub, "time", "event", 1825).iloc[0]
    assert out["rmst"] == pytest.approx(float(ref), rel=1e-3)
    assert out["ci_lower"] < out["rmst"] < out["ci_upper"]


def test_rmst_standard_error_without_censoring():
    """No censoring: RMST is the mean of min(T, τ) and its SE the usual SE of a mean."""
    rng = np.random.default_rng(2)
    t = rng.exponential(10, 400)
    d = pd.DataFrame({"t": t, "e": 1})
    out = rmst(d, "t", "e", 15.0).iloc[0]
    m = np.minimum(t, 15.0)
    assert out["rmst"] == pytest.approx(m.mean(), rel=1e-9)
    assert out["se"] == pytest.approx(m.std(ddof=0) / np.sqrt(len(m)), rel=1e-6)
    res = compare_groups(d.assign(g=np.arange(400) % 2), "t", "e", "g", horizon=1e3)
    assert any("past the last follow-up" in w for w in res.warnings)


# --------------------------------------------------------------------------- generated cohort
def _slide(rng, n_cells: int, p_tumour: float) -> ad.AnnData:
    types = np.where(rng.random(n_cells) < p_tumour, "tumour", "stroma")
    obs = pd.DataFrame({"cell_type": types, "nbhd_tumour": rng.random(n_cells)},
                       index=np.arange(n_cells).astype(str))
    return ad.AnnData(X=rng.random((n_cells, 2)).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=["ERBB2", "ESR1"]))


def test_generated_cohort_recovers_hazard_ratio():
    """Hazard = h0 * 2 ** (tumour proportion / 0.1): HR 2 per 10 percentage points."""
    rng = np.random.default_rng(7)
    n = 300
    p = rng.uniform(0.05, 0.6, n)
    slides = {f"P{i:03d}": _slide(rng, 150, p[i]) for i in range(n)}
    feats = patient_features(slides)
    x10 = feats["prop_tumour"].to_numpy() * 10  # units of 10 percentage points
    true_hr = 2.0
    t_event = rng.exponential(1.0 / (0.02 * true_hr ** x10))
    t_cens = rng.uniform(20, 120, n)
    table = pd.DataFrame({"patient_id": feats.index, "time": np.minimum(t_event, t_cens),
                          "event": (t_event <= t_cens).astype(int), "tumour_10pct": x10,
                          "prop_tumour": feats["prop_tumour"].to_numpy()})
    cox = fit_cox(table, "time", "event", ["tumour_10pct"])
    row = cox.summary.iloc[0]
    assert row["HR_lower"] <= true_hr <= row["HR_upper"]
    assert row["p"] < 1e-6
    groups = make_risk_groups(table, SplitAtQuantiles("prop_tumour", "median"))
    res = compare_groups(groups.table, "time", "event", groups.column)
    assert res.p_value < 0.05
    g = res.groups.set_index("group")
    assert g.loc["high", "median"] < g.loc["low", "median"]
    # proportions are counts/150, so ties at the median may shift a patient or two
    assert g["n"].sum() == 300 and abs(g.loc["low", "n"] - g.loc["high", "n"]) <= 6
    cut = groups.cutpoints[0]
    assert cut == pytest.approx(np.median(table["prop_tumour"]))
    assert (groups.table.loc[table["prop_tumour"] <= cut, "risk_group"] == "low").all()


def test_null_false_positive_rate():
    rng = np.random.default_rng(11)
    n, hits = 80, 0
    for _ in range(200):
        d = pd.DataFrame({"t": rng.exponential(10, n), "e": (rng.random(n) < 0.7).astype(int),
                          "g": rng.integers(0, 2, n)})
        hits += compare_groups(d, "t", "e", "g").p_value < 0.05
    assert hits / 200 <= 0.1


# --------------------------------------------------------------------------- bad input
def test_one_group_all_censored_and_no_event_group():
    d = HAND.assign(g="A")
    with pytest.raises(SurvivalAnalysisError, match="fewer than two groups"):
        compare_groups(d, "t", "e", "g")
    with pytest.raises(SurvivalAnalysisError, match="censored"):
        compare_groups(HAND.assign(e=0), "t", "e", "g")
    d = HAND.copy()
    d.loc[d["g"] == "B", "e"] = 0
    res = compare_groups(d, "t", "e", "g")  # still reported, with a warning
    assert res.groups.set_index("group").loc["B", "events"] == 0
    assert any("'B' has no events" in w for w in res.warnings)
    assert np.isinf(res.groups.set_index("group").loc["B", "median"])
    with pytest.raises(SurvivalAnalysisError, match="not numbers"):
        compare_groups(HAND.assign(t=["1", "x", 3, 4, 5, 6, 7, 8]), "t", "e", "g")
    with pytest.raises(SurvivalAnalysisError, match="0 \\(censored\\) or 1"):
        compare_groups(HAND.assign(e=2), "t", "e", "g")
    with pytest.raises(SurvivalAnalysisError, match="not in the table"):
        compare_groups(HAND, "t", "e", "nope")
    cox = fit_cox(d.assign(x=[2.0, 3, 1, 1, 4, 2, 3, 1]), "t", "e", ["g", "x"])
    assert not cox.summary.set_index("covariate").loc["g=B", "estimable"]
    assert any("No usable hazard ratio for: g=B" in w for w in cox.warnings)
    assert list(cox.plot().data[0].y) == ["x"]
    with pytest.raises(SurvivalAnalysisError, match="single value"):
        fit_cox(HAND.assign(c=1.0).assign(c="x"), "t", "e", ["c"])


def test_cox_reference_is_chosen_and_stated(tcga):
    # a chosen reference (Stage II) against lifelines fitted with the same dummies
    cox = fit_cox(tcga, "time", "event", ["stage_group"], reference={"stage_group": "Stage II"})
    assert cox.reference_levels == {"stage_group": "Stage II"}
    assert "relative to stage_group = Stage II" in cox.reference_text()
    s = cox.summary.set_index("covariate")
    assert list(s.index) == ["stage_group=Stage I", "stage_group=Stage III", "stage_group=Stage IV"]
    d = tcga.dropna(subset=["stage_group"])
    X = pd.get_dummies(d["stage_group"], dtype=float).drop(columns="Stage II")
    X["time"], X["event"] = d["time"], d["event"]
    ref = CoxPHFitter().fit(X, "time", "event")
    for lv in ("Stage I", "Stage III", "Stage IV"):
        assert s.loc[f"stage_group={lv}", "HR"] == pytest.approx(ref.hazard_ratios_[lv], rel=1e-6)
    # raw sub-stages as text: the default reference is the lowest stage, not the alphabetically first
    raw = fit_cox(tcga[tcga["ajcc_pathologic_tumor_stage"].isin(["Stage IIA", "Stage IA", "Stage IIIA"])],
                  "time", "event", ["ajcc_pathologic_tumor_stage"])
    assert raw.reference_levels == {"ajcc_pathologic_tumor_stage": "Stage IA"}
    with pytest.raises(SurvivalAnalysisError, match="reference level 'Stage V'"):
        fit_cox(tcga, "time", "event", ["stage_group"], reference={"stage_group": "Stage V"})


def test_forest_plot_says_when_nothing_is_estimable():
    from ghist_core.viz.survival_plots import NO_ESTIMATE_MESSAGE

    n = 30  # group B has no events: its hazard ratio runs off to 0
    df = pd.DataFrame({"time": np.arange(1.0, n + 1), "g": ["A"] * 15 + ["B"] * 15,
                       "event": [int(i % 2 == 0 and i < 15) for i in range(n)]})
    cox = fit_cox(df, "time", "event", ["g"])
    assert not cox.any_estimable
    fig = cox.plot()
    assert not fig.data  # no bare axes with nothing on them
    assert fig.layout.annotations[0].text == NO_ESTIMATE_MESSAGE
    assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False
    # an estimable fit draws the reference level at HR = 1, labelled
    df["time"] = np.r_[np.arange(1.0, 16), np.arange(1.5, 16)]  # interleaved follow-up
    df["event"] = [int(i % 3 == 0) for i in range(n)]
    cox = fit_cox(df, "time", "event", ["g"])
    fig = cox.plot()
    assert cox.any_estimable and list(fig.data[0].y) == ["g=B"]
    assert list(fig.data[1].y) == ["g=A (reference)"] and list(fig.data[1].x) == [1.0]
