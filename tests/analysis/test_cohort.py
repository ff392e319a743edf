"""Patient features, joining to clinical data, risk-group rules, feature comparison."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import kruskal, mannwhitneyu

from ghist_core.analysis.cohort import (
    ByVariable,
    KMeansClusters,
    SplitAtQuantiles,
    Threshold,
    compare_features,
    feature_columns,
    join_clinical,
    make_risk_groups,
    patient_features,
    tcga_patient_id,
)
from ghist_core.errors import SurvivalAnalysisError, UnknownGeneError


def _slide(types: list[str], nbhd: list[float], expr: np.ndarray) -> ad.AnnData:
    obs = pd.DataFrame({"cell_type": types, "nbhd_tumour": nbhd},
                       index=[str(i) for i in range(len(types))])
    return ad.AnnData(X=np.asarray(expr, np.float32), obs=obs,
                      var=pd.DataFrame(index=["ERBB2", "ESR1", "KRT8"]))


@pytest.fixture()
def slides():
    s1 = _slide(["tumour", "tumour", "stroma"], [0.5, 0.7, 0.0],
                [[1, 0, 2], [3, 0, 2], [0, 1, 0]])
    s2 = _slide(["tumour"], [0.9], [[4, 2, 6]])
    s3 = _slide(["immune", "stroma"], [0.1, 0.3], [[0, 2, 0], [0, 0, 2]])
    return s1, s2, s3


def test_patient_features_pool_cells(slides, tmp_path):
    s1, s2, s3 = slides
    path = tmp_path / "s3.h5ad"
    s3.write_h5ad(path)  # one patient from a file (read backed), one from memory
    f = patient_features([("P1", s1), ("P1", s2), ("P2", path)], genes=["ERBB2", "KRT8"],
                         signatures={"lum": ["ESR1", "KRT8"]})
    # P1 pools 4 cells: 3 tumour, 1 stroma (not the mean of 2/3 and 1/1)
    p1 = f.loc["P1"]
    assert (p1["n_slides"], p1["n_cells"]) == (2, 4)
    assert p1["prop_tumour"] == pytest.approx(3 / 4) and p1["prop_stroma"] == pytest.approx(1 / 4)
    assert p1["prop_immune"] == 0
    assert p1["nbhd_tumour"] == pytest.approx((0.5 + 0.7 + 0.0 + 0.9) / 4)
    assert p1["expr_ERBB2"] == pytest.approx((1 + 3 + 0 + 4) / 4)
    assert p1["sig_lum"] == pytest.approx(((0 + 0 + 1 + 2) / 4 + (2 + 2 + 0 + 6) / 4) / 2)
    p2 = f.loc["P2"]
    assert p2["prop_immune"] == pytest.approx(0.5) and p2["expr_KRT8"] == pytest.approx(1.0)
    assert set(feature_columns(f)) == {"prop_immune", "prop_stroma", "prop_tumour",
                                       "nbhd_tumour", "expr_ERBB2", "expr_KRT8", "sig_lum"}
    assert "pooled" in f.attrs["pooling_rule"]
    with pytest.raises(UnknownGeneError, match="MKI67"):
        patient_features({"P1": [s1]}, genes=["MKI67"])


def test_patient_without_cells_is_kept(slides):
    s1 = slides[0]
    f = patient_features({"P1": s1, "P9": s1[:0].copy()})
    assert f.loc["P9", "n_cells"] == 0 and np.isnan(f.loc["P9", "prop_tumour"])
    assert any("P9" in n for n in f.attrs["notes"])


def test_join_reports_who_is_dropped():
    feats = pd.DataFrame({"prop_tumour": [0.1, 0.2, 0.3]},
                         index=pd.Index(["TCGA-A2-A0CX-01Z-00-DX1", "TCGA-A2-A0D0-01Z", "X-9"],
                                        name="patient_id"))
    clin = pd.DataFrame({"patient_id": ["TCGA-A2-A0CX", "TCGA-A2-A0D0", "TCGA-B6-A0RE"],
                         "time": [1, 2, 3], "event": [1, 0, 1]})
    j = join_clinical(feats, clin, id_transform=tcga_patient_id)
    assert j.n == 2 and sorted(j.table["patient_id"]) == ["TCGA-A2-A0CX", "TCGA-A2-A0D0"]
    assert j.clinical_without_slides == ["TCGA-B6-A0RE"]
    assert j.slides_without_clinical == ["X-9"]
    assert "1 clinical patient(s) have no predicted slide" in " ".join(j.messages)
    none = join_clinical(feats, clin)  # without the TCGA rule nothing matches: said so
    assert none.n == 0 and any("No patient matched" in m for m in none.messages)


def test_rules_record_themselves():
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"x": np.r_[np.arange(12.0), np.nan], "y": rng.normal(size=13),
                      "her2": ["Positive", "Negative", None] + ["Negative"] * 10})
    g = make_risk_groups(t, SplitAtQuantiles("x", "tertiles"))
    assert g.table[g.column].value_counts().to_dict() == {"low": 4, "mid": 4, "high": 4}
    assert g.cutpoints == pytest.approx([np.quantile(np.arange(12.0), 1 / 3),
                                         np.quantile(np.arange(12.0), 2 / 3)])
    assert "tertiles" in g.description and "cut-points" in g.description
    assert any("1 of 13" in n for n in g.notes)
    g = make_risk_groups(t, Threshold("x", 2.5))
    assert g.table[g.column].value_counts().to_dict() == {"> 2.5": 9, "≤ 2.5": 3}
    assert g.rule_dict["rule"] == "Threshold" and g.rule_dict["value"] == 2.5
    g = make_risk_groups(t, ByVariable("her2"))
    assert list(g.table[g.column].cat.categories) == ["Negative", "Positive"]
    rule = KMeansClusters(k=2, features=("x", "y"), seed=3)
    a = make_risk_groups(t, rule)
    b = make_risk_groups(t, rule)
    assert a.table[a.column].astype(str).tolist() == b.table[b.column].astype(str).tolist()
    # cluster 1 has the lower mean of the first feature (stated numbering rule)
    m = a.table.groupby(a.column, observed=True)["x"].mean()
    assert m["cluster 1"] < m["cluster 2"]
    assert "seed=3" in a.description
    with pytest.raises(SurvivalAnalysisError, match="tied"):
        make_risk_groups(pd.DataFrame({"x": [1, 1, 1, 1, 2]}), SplitAtQuantiles("x", 3))
    with pytest.raises(SurvivalAnalysisError, match="k-means needs"):
        make_risk_groups(t, KMeansClusters(k=20, features=("x",)))


def test_compare_features_against_scipy():
    rng = np.random.default_rng(1)
    n = 60
    g = np.repeat(["a", "b", "c"], n // 3)
    t = pd.DataFrame({"g": g, "shift": rng.normal(size=n) + (g == "c") * 2.0,
                      "noise": rng.normal(size=n), "const": 1.0})
    fc = compare_features(t, "g", ["shift", "noise", "const"])
    tab = fc.table.set_index("feature")
    ref = kruskal(*[t.loc[t["g"] == k, "shift"] for k in "abc"])
    assert tab.loc["shift", "p"] == pytest.approx(ref.pvalue)
    assert tab.loc["shift", "test"] == "Kruskal–Wallis H"
    assert np.isnan(tab.loc["const", "p"])  # constant: not tested, said so
    # BH over the two tested features: q = p * m / rank, monotone
    p = tab.loc[["shift", "noise"], "p"].sort_values()
    assert tab.loc[p.index[0], "q_bh"] == pytest.approx(min(p.iloc[0] * 2, p.iloc[1]))
    assert tab.loc[p.index[1], "q_bh"] == pytest.approx(p.iloc[1])
    two = compare_features(t[t["g"] != "c"], "g", ["noise"])
    ref2 = mannwhitneyu(t.loc[t["g"] == "a", "noise"], t.loc[t["g"] == "b", "noise"])
    assert two.table.loc[0, "p"] == pytest.approx(ref2.pvalue)
    fig = fc.plot()
    assert {tr.name for tr in fig.data} == {"a", "b", "c"}
