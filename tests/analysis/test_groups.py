"""Risk-group rules: each rule assigns groups reproducibly and records itself."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ghist_core.analysis.groups import ByVariable, KMeansClusters, SplitAtQuantiles, Threshold, make_risk_groups
from ghist_core.errors import SurvivalAnalysisError


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


@pytest.mark.parametrize(("n", "k"), [(1, 2), (2, 3)])
def test_a_split_of_too_few_patients_says_so_not_ties(n: int, k: int) -> None:
    """One patient with a predicted slide: the message names the count, not 'tied values' (a
    threshold would not help either)."""
    table = pd.DataFrame({"prop_B": [0.2 * (i + 1) for i in range(n)] + [np.nan] * 3})
    with pytest.raises(SurvivalAnalysisError, match=f"Only {n} patient.*needs at least {k}"):
        make_risk_groups(table, SplitAtQuantiles("prop_B", k))
