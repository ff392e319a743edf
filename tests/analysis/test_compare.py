"""Tests between patient groups (ghist_core.analysis.compare): feature tests and differential
expression match scipy, share one table schema and one BH; clinical labels are matched loudly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.stats import kruskal, mannwhitneyu

from ghist_core.analysis.compare import compare_expression, compare_features, differential_expression, pseudobulk
from ghist_core.analysis.multitest import bh_fdr
from ghist_core.errors import ClinicalTableError

CORE = ["feature", "test", "statistic", "p_value", "q_value"]


def _data(seed=0, n=24, g=50):
    rng = np.random.default_rng(seed)
    vals = pd.DataFrame(rng.gamma(2, 1, (n, g)), columns=[f"G{i}" for i in range(g)],
                        index=[f"P{i}" for i in range(n)])
    labels = pd.Series(np.where(np.arange(n) < n // 2, "ER+", "ER-"), index=vals.index)
    vals.loc[labels == "ER+", "G3"] += 6.0
    return vals, labels


@pytest.mark.parametrize("method", ["mannwhitney", "welch"])
def test_matches_scipy_per_gene(method):
    vals, labels = _data()
    res = differential_expression(vals, labels, group_a="ER+", group_b="ER-", method=method)
    t = res.table.set_index("feature")
    a, b = vals[labels == "ER+"], vals[labels == "ER-"]
    for gene in ["G0", "G3", "G17"]:
        if method == "mannwhitney":
            r = stats.mannwhitneyu(a[gene], b[gene], alternative="two-sided")
        else:
            r = stats.ttest_ind(a[gene], b[gene], equal_var=False)
        assert t.loc[gene, "p_value"] == pytest.approx(r.pvalue)
        assert t.loc[gene, "log2fc"] == pytest.approx(np.log2(a[gene].mean() + 0.01) - np.log2(b[gene].mean() + 0.01))
    assert res.table.iloc[0]["feature"] == "G3" and res.table.iloc[0]["log2fc"] > 1.0
    assert res.n == {"ER+": 12, "ER-": 12} and res.groups == ["ER+", "ER-"]
    assert "G3" in set(res.significant()["feature"])
    assert "ER+" in repr(res)
    assert list(res.table.columns[:5]) == CORE
    np.testing.assert_array_equal(res.table["q_value"], bh_fdr(res.table["p_value"].to_numpy()))
    fig = res.plot(top=2)  # the same box plot as the feature tests
    assert {tr.name for tr in fig.data} == {"ER+", "ER-"}


def test_constant_gene_and_group_checks():
    vals, labels = _data()
    vals["FLAT"] = 1.0
    res = differential_expression(vals, labels, group_a="ER+", group_b="ER-")
    assert res.table.set_index("feature").loc["FLAT", "p_value"] == 1.0
    with pytest.raises(ClinicalTableError, match="at least 2 patients"):
        differential_expression(vals.iloc[:13], labels.iloc[:13], group_a="ER+", group_b="ER-")
    with pytest.raises(ClinicalTableError):
        differential_expression(vals, labels, group_a="ER+", group_b="ER+")
    with pytest.raises(ValueError):
        differential_expression(vals, labels, group_a="ER+", group_b="ER-", method="ttest")


def test_pseudobulk_means():
    X = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    pb = pseudobulk(X, ["b", "b", "a"], ["g1", "g2"])
    assert list(pb.index) == ["a", "b"]
    np.testing.assert_allclose(pb.loc["b"].to_numpy(), [2.0, 3.0])
    from scipy import sparse
    np.testing.assert_allclose(pseudobulk(sparse.csr_matrix(X), ["b", "b", "a"], ["g1", "g2"]).to_numpy(), pb.to_numpy())


def test_compare_features_against_scipy():
    rng = np.random.default_rng(1)
    n = 60
    g = np.repeat(["a", "b", "c"], n // 3)
    t = pd.DataFrame({"g": g, "shift": rng.normal(size=n) + (g == "c") * 2.0,
                      "noise": rng.normal(size=n), "const": 1.0})
    fc = compare_features(t, "g", ["shift", "noise", "const"])
    tab = fc.table.set_index("feature")
    ref = kruskal(*[t.loc[t["g"] == k, "shift"] for k in "abc"])
    assert tab.loc["shift", "p_value"] == pytest.approx(ref.pvalue)
    assert tab.loc["shift", "test"] == "Kruskal–Wallis H"
    assert np.isnan(tab.loc["const", "p_value"])  # constant: not tested, said so
    # BH over the two tested features: q = p * m / rank, monotone
    p = tab.loc[["shift", "noise"], "p_value"].sort_values()
    assert tab.loc[p.index[0], "q_value"] == pytest.approx(min(p.iloc[0] * 2, p.iloc[1]))
    assert tab.loc[p.index[1], "q_value"] == pytest.approx(p.iloc[1])
    two = compare_features(t[t["g"] != "c"], "g", ["noise"])
    ref2 = mannwhitneyu(t.loc[t["g"] == "a", "noise"], t.loc[t["g"] == "b", "noise"])
    assert two.table.loc[0, "p_value"] == pytest.approx(ref2.pvalue)
    assert list(fc.table.columns[:5]) == CORE and fc.n == {"a": 20, "b": 20, "c": 20}
    fig = fc.plot()
    assert {tr.name for tr in fig.data} == {"a", "b", "c"}


def test_compare_expression_matches_clinical_labels_loudly():
    vals, labels = _data(n=12, g=5)
    clin = pd.DataFrame({"pid": [f" {p} " for p in labels.index] + ["P0", "P99"],
                         "er": list(labels) + ["ER+", "ER-"]})  # P0 twice, same group; P99 has no slide
    res = compare_expression(vals, clin, id_col="pid", group_col="er", group_a="ER+", group_b="ER-")
    assert res.notes[0] == "12 patients with predictions, 12 of them in the clinical table."
    assert any("counted once" in n for n in res.notes)
    ref = differential_expression(vals, labels, group_a="ER+", group_b="ER-")
    pd.testing.assert_frame_equal(res.table, ref.table)
    clash = clin.assign(er=list(labels) + ["ER-", "ER-"])  # P0 now has both groups
    with pytest.raises(ClinicalTableError, match="P0"):
        compare_expression(vals, clash, id_col="pid", group_col="er", group_a="ER+", group_b="ER-")
    with pytest.raises(ClinicalTableError, match="nope"):
        compare_expression(vals, clin, id_col="pid", group_col="nope", group_a="ER+", group_b="ER-")


def test_minimum_attainable_p_floors():
    from itertools import combinations
    from math import comb

    from ghist_core.analysis.compare import min_attainable_p

    # 2 vs 2: the most extreme of C(4, 2) = 6 arrangements, two-sided: 2/6
    assert min_attainable_p("mannwhitney", [2, 2]) == pytest.approx(2 / comb(4, 2))
    assert min_attainable_p("Mann–Whitney U", [3, 3]) == pytest.approx(2 / comb(6, 3))
    # it is the smallest p the test returns over every arrangement of 5 patients (3 vs 2)
    vals = np.arange(5.0)
    ps = [mannwhitneyu(vals[list(a)], np.delete(vals, list(a)), alternative="two-sided").pvalue
          for a in combinations(range(5), 3)]
    assert min(ps) == pytest.approx(min_attainable_p("mannwhitney", [3, 2]))
    assert min_attainable_p("welch", [2, 2]) == 0.0
    assert min_attainable_p("kruskal", [2, 2, 2]) == pytest.approx(
        kruskal([0, 1], [2, 3], [4, 5]).pvalue)


def test_two_vs_two_warns_that_nothing_can_be_significant():
    vals, labels = _data(n=4, g=20)
    vals.loc[labels == "ER+"] += 100.0  # perfectly separated on every gene: still p = 1/3
    res = differential_expression(vals, labels, group_a="ER+", group_b="ER-")
    assert res.min_p == pytest.approx(1 / 3)
    assert res.table["p_value"].min() == pytest.approx(1 / 3)
    assert res.significant().empty
    assert len(res.warnings) == 1
    w = res.warnings[0]
    assert "ER+ (n=2) and ER- (n=2)" in w and "0.33" in w and "q < 0.05" in w
    # enough patients: no warning
    vals, labels = _data(n=12, g=20)
    assert differential_expression(vals, labels, group_a="ER+", group_b="ER-").warnings == []
    # Welch's t has no floor, so no such warning (its p can be small with 2 vs 2)
    vals, labels = _data(n=4, g=20)
    assert differential_expression(vals, labels, group_a="ER+", group_b="ER-", method="welch").warnings == []
    # the feature tests say the same for tiny groups
    t = pd.DataFrame({"g": ["a", "a", "b", "b"], "x": [1.0, 2.0, 3.0, 4.0]})
    fc = compare_features(t, "g", ["x"])
    assert fc.min_p == pytest.approx(1 / 3) and "no feature can reach" in fc.warnings[0]


def test_the_labelled_table_says_which_group_is_over_which():
    """A downloaded result named neither its groups nor its grouping: log2fc of high over low or of low over
    high could not be told apart once the file left the screen."""
    vals, labels = _data(n=12, g=5)
    clin = pd.DataFrame({"pid": labels.index, "grade": labels.map({"ER+": "high", "ER-": "low"})})
    res = compare_expression(vals, clin, id_col="pid", group_col="grade", group_a="low", group_b="high")
    t = res.labelled_table()
    assert list(t.columns) == ["feature", "test", "statistic", "p_value", "q_value", "grouping", "group_a", "group_b",
                               "mean_a", "mean_b", "log2fc", "log2fc_pseudocount", "neg_log10_q"]
    assert set(t["grouping"]) == {"grade"} and set(t["group_a"]) == {"low"} and set(t["group_b"]) == {"high"}
    pd.testing.assert_frame_equal(t[res.table.columns], res.table)  # the same numbers, labelled
    # every row carries what recomputes its log2fc from its own means, and in which direction
    low, high = vals[labels == "ER-"].mean(), vals[labels == "ER+"].mean()
    row = t.set_index("feature").loc["G3"]
    assert row["mean_a"] == pytest.approx(low["G3"]) and row["mean_b"] == pytest.approx(high["G3"])
    pc = row["log2fc_pseudocount"]
    assert pc == 0.01 and row["log2fc"] == pytest.approx(np.log2((row["mean_a"] + pc) / (row["mean_b"] + pc)))
    assert row["log2fc"] < 0  # G3 is higher in ER+ = high, here group B
    assert res.log2fc_rule().startswith("log2 FC = log2((mean in low + 0.01) / (mean in high + 0.01))")
    assert "above 0 is higher in low" in res.log2fc_rule() and "pseudocount" in res.log2fc_rule()
    # feature tests name their medians after the groups already; the grouping is written in too
    feats = compare_features(clin.assign(x=np.arange(12.0)), "grade", ["x"])
    assert {"grouping", "median_high", "median_low"} <= set(feats.labelled_table().columns)
    assert feats.log2fc_rule() == ""
