"""Patient features from predicted slides: one pooling rule, joining to clinical data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core._keys import upgrade_layout
from ghist_core.analysis.features import (
    POOLING_RULE,
    cell_type_counts,
    feature_columns,
    join_clinical,
    neighbourhood_by_type,
    patient_expression,
    patient_features,
    summarise_slide,
    tcga_patient_id,
)
from ghist_core.errors import UnknownGeneError


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


def test_one_pooling_rule_for_every_patient_number(slides, tmp_path):
    """Two slides of different cell counts: every function pools cells, never slide means."""
    s1, s2, _ = slides  # 3 cells with ERBB2 1, 3, 0 (slide mean 4/3) and 1 cell with ERBB2 4
    path = tmp_path / "s2.h5ad"
    s2.write_h5ad(path)
    pairs = [("P1", s1), ("P1", path)]
    expr = patient_expression(pairs)
    assert expr.loc["P1", "ERBB2"] == pytest.approx(8 / 4)  # not (4/3 + 4) / 2 = 2.67
    assert expr.loc["P1", "KRT8"] == pytest.approx((2 + 2 + 0 + 6) / 4)
    assert expr.attrs["n_cells"] == {"P1": 4}
    feats = patient_features(pairs, genes=["ERBB2", "KRT8"])
    np.testing.assert_allclose(feats.loc["P1", ["expr_ERBB2", "expr_KRT8"]].to_numpy(float),
                               expr.loc["P1", ["ERBB2", "KRT8"]].to_numpy(float))
    # cached per-slide summaries give the same numbers as the slides themselves
    summ = [("P1", summarise_slide(s1)), ("P1", summarise_slide(path))]
    pd.testing.assert_frame_equal(patient_expression(summ), expr)
    assert patient_features(summ, genes=["ERBB2"]).loc["P1", "expr_ERBB2"] == pytest.approx(2.0)
    counts = cell_type_counts([("P1", "a", s1), ("P1", "b", summ[1][1])], per="patient")
    assert counts.loc["P1"].to_dict() == {"stroma": 1, "tumour": 3}
    per_slide = cell_type_counts([("P1", "a", s1), ("P1", "b", s2)])
    assert per_slide.loc[("P1", "b")].to_dict() == {"stroma": 0, "tumour": 1}
    assert (counts.loc["P1"] / counts.loc["P1"].sum()).to_dict() == pytest.approx(
        {"stroma": feats.loc["P1", "prop_stroma"], "tumour": feats.loc["P1", "prop_tumour"]})
    assert expr.attrs["pooling_rule"] == POOLING_RULE


def test_gene_missing_on_one_slide_has_no_patient_mean(slides):
    s1, s2, _ = slides
    other = s2[:, ["ERBB2", "ESR1"]].copy()  # a model without KRT8
    expr = patient_expression([("P1", s1), ("P1", other)])
    assert np.isnan(expr.loc["P1", "KRT8"])  # never a mean over some of the cells
    assert expr.loc["P1", "ERBB2"] == pytest.approx(2.0)


def test_neighbourhoods_read_through_the_keys_in_both_layouts(slides):
    s1 = slides[0]
    legacy = neighbourhood_by_type(s1)
    assert legacy.loc["tumour", "tumour"] == pytest.approx(60.0)  # (0.5 + 0.7) / 2 in %
    modern = upgrade_layout(s1.copy())
    assert "nbhd_tumour" not in modern.obs
    pd.testing.assert_frame_equal(neighbourhood_by_type(modern), legacy)
    assert patient_features({"P1": modern}).loc["P1", "nbhd_tumour"] == pytest.approx(1.2 / 3)
    with pytest.raises(ValueError, match="no neighbourhood"):
        neighbourhood_by_type(ad.AnnData(X=np.asarray(s1.X), obs=s1.obs[["cell_type"]]))
