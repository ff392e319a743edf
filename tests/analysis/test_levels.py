"""Natural order of grouping values: stages, TNM, grades and scores by meaning, not by text or size."""

from __future__ import annotations

import pandas as pd
import pytest

from ghist_core.analysis.groups import ByVariable, make_risk_groups
from ghist_core.analysis.levels import describe_levels, natural_order, ordinal_scheme


@pytest.mark.parametrize("values, expected, scheme", [
    (["Stage IIB", "Stage X", "Stage I", "Stage IIA", "Stage IV", "Stage IA", "Stage III", "Stage II"],
     ["Stage I", "Stage IA", "Stage II", "Stage IIA", "Stage IIB", "Stage III", "Stage IV", "Stage X"], "stage"),
    (["III", "I", "IV", "II"], ["I", "II", "III", "IV"], "stage"),
    (["T3", "T1", "T2", "T1a", "Tis", "TX", "T4"], ["Tis", "T1", "T1a", "T2", "T3", "T4", "TX"], "tnm_T"),
    (["G3", "G1", "G2"], ["G1", "G2", "G3"], "grade"),
    (["Grade 2", "Grade 3", "Grade 1", "Not reported"], ["Grade 1", "Grade 2", "Grade 3", "Not reported"], "grade"),
    (["high", "low", "intermediate"], ["low", "intermediate", "high"], "grade"),
    (["3+", "0", "1+", "2+"], ["0", "1+", "2+", "3+"], "score"),
    (["10", "2", "1", "unknown"], ["1", "2", "10", "unknown"], "number"),
    (["Positive", "Negative", "Equivocal"], ["Equivocal", "Negative", "Positive"], None),
])
def test_natural_order(values, expected, scheme):
    assert natural_order(values) == expected
    assert ordinal_scheme(values) == scheme


def test_sorting_by_text_or_size_would_differ():
    stages = ["Stage II"] * 6 + ["Stage I"] * 2 + ["Stage III"] * 3 + ["Stage IV"]
    assert sorted(set(stages), key=stages.count, reverse=True)[0] == "Stage II"  # the old default
    lv = describe_levels(pd.Series(stages + [None]))
    assert lv.levels == ["Stage I", "Stage II", "Stage III", "Stage IV"]
    assert lv.counts == {"Stage I": 2, "Stage II": 6, "Stage III": 3, "Stage IV": 1}
    assert lv.ordinal and lv.default_reference == "Stage I"
    assert describe_levels(stages, among=["Stage III", "Stage IV"]).default_reference == "Stage III"
    # nominal: the largest group is the default reference
    her2 = ["Negative"] * 5 + ["Positive"] * 2 + ["Equivocal"] * 3
    lv = describe_levels(her2)
    assert not lv.ordinal and lv.default_reference == "Negative"
    assert lv.levels == ["Equivocal", "Negative", "Positive"]


def test_risk_groups_use_natural_order():
    t = pd.DataFrame({"stage": ["Stage IIIA", "Stage IIB", "Stage I", "Stage IIA", None]})
    g = make_risk_groups(t, ByVariable("stage"))
    assert list(g.table[g.column].cat.categories) == ["Stage I", "Stage IIA", "Stage IIB", "Stage IIIA"]
