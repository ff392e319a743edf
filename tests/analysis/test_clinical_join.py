"""Clinical patients without a predicted slide (QA, Cohort page): a grouping by a clinical
variable counts every clinical patient; groups and tests from predicted features only the
patients with slides, and the join says so."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ghist_core.analysis.compare import compare_features
from ghist_core.analysis.features import join_clinical
from ghist_core.analysis.groups import ByVariable, Threshold, make_risk_groups
from ghist_core.analysis.survival import compare_groups

FEATURES = pd.DataFrame({"prop_tumour": [0.2, 0.6, 0.3, 0.7]},
                        index=pd.Index(["P-001", "P-003", "P-004", "P-005"], name="patient_id"))
CLINICAL = pd.DataFrame({  # P-002, the only stage I patient, has no slide
    "patient_id": ["P-001", "P-002", "P-003", "P-004", "P-005"],
    "time": [10.0, 20.0, 5.0, 8.0, 3.0], "event": [1, 1, 1, 0, 1],
    "stage": ["Stage II", "Stage I", "Stage III", "Stage II", "Stage III"]})


def test_every_clinical_patient_is_kept_with_empty_features():
    joined = join_clinical(FEATURES, CLINICAL, keep_all_clinical=True)
    assert list(joined.table["patient_id"]) == list(CLINICAL["patient_id"])
    assert np.isnan(joined.table.set_index("patient_id").loc["P-002", "prop_tumour"])
    assert joined.n == 4 and joined.clinical_without_slides == ["P-002"]
    assert "only the 4 of 5 patients with predicted slides" in joined.feature_scope
    assert any("kept for clinical groupings" in m for m in joined.messages)
    # the default join still keeps only the patients with both, counted the same way
    inner = join_clinical(FEATURES, CLINICAL)
    assert inner.n == 4 and "P-002" not in set(inner.table["patient_id"])


def test_clinical_groups_use_everyone_feature_groups_only_patients_with_slides():
    table = join_clinical(FEATURES, CLINICAL, keep_all_clinical=True).table
    by_stage = make_risk_groups(table, ByVariable("stage"))
    res = compare_groups(by_stage.table, "time", "event", by_stage.column)
    assert res.n == 5
    assert res.groups.set_index("group")["n"].to_dict() == {"Stage I": 1, "Stage II": 2, "Stage III": 2}
    by_share = make_risk_groups(table, Threshold("prop_tumour", 0.4))
    res = compare_groups(by_share.table, "time", "event", by_share.column)
    assert res.n == 4 and "1 of 5 patients left out" in " ".join(res.notes)
    # feature tests between clinical groups compare (and count) only the patients with slides
    tests = compare_features(by_stage.table, by_stage.column, ["prop_tumour"])
    assert tests.n == {"Stage II": 2, "Stage III": 2}
