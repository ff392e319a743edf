"""Differential expression: matches scipy per gene, BH matches its definition, groups checked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ghist_core.analysis.differential import bh_fdr, differential_expression, pseudobulk
from ghist_core.errors import ClinicalTableError


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
    t = res.table_.set_index("gene")
    a, b = vals[labels == "ER+"], vals[labels == "ER-"]
    for gene in ["G0", "G3", "G17"]:
        if method == "mannwhitney":
            r = stats.mannwhitneyu(a[gene], b[gene], alternative="two-sided")
        else:
            r = stats.ttest_ind(a[gene], b[gene], equal_var=False)
        assert t.loc[gene, "p_value"] == pytest.approx(r.pvalue)
        assert t.loc[gene, "log2fc"] == pytest.approx(np.log2(a[gene].mean() + 0.01) - np.log2(b[gene].mean() + 0.01))
    assert res.table_.iloc[0]["gene"] == "G3" and res.table_.iloc[0]["log2fc"] > 1.0
    assert res.n_a == res.n_b == 12
    assert "G3" in set(res.significant()["gene"])
    assert "ER+" in repr(res)


def test_bh_reference_values():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    q = bh_fdr(p)
    # hand-computed: sorted 0.005,0.01,0.03,0.04 -> 0.02,0.02,0.04,0.04
    np.testing.assert_allclose(q[:4], [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(q[4])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60))
def test_bh_properties(ps):
    p = np.array(ps)
    q = bh_fdr(p)
    assert (q >= p - 1e-12).all() and (q <= 1).all()
    order = np.argsort(p, kind="stable")
    assert (np.diff(q[order]) >= -1e-12).all()


def test_constant_gene_and_group_checks():
    vals, labels = _data()
    vals["FLAT"] = 1.0
    res = differential_expression(vals, labels, group_a="ER+", group_b="ER-")
    assert res.table_.set_index("gene").loc["FLAT", "p_value"] == 1.0
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
