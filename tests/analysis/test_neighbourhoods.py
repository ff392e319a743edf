"""Observed neighbourhood composition from the cell calls, against a hand-computed layout,
and the predicted one labelled as such."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core import _keys as K
from ghist_core.analysis.neighbourhoods import (
    observed_neighbourhood,
    observed_neighbourhood_by_type,
    predicted_neighbourhood_by_type,
)


def _cells(xy, types, nbhd=None) -> ad.AnnData:
    a = ad.AnnData(X=np.zeros((len(types), 1), np.float32),
                   obs=pd.DataFrame({"cell_type": types}, index=[f"cell_{i}" for i in range(len(types))]),
                   var=pd.DataFrame(index=["G"]))
    a.obsm[K.OBSM_SPATIAL] = np.asarray(xy, float)
    if nbhd is not None:
        K.set_obsm_matrix(a, K.OBSM_NEIGHBOURHOOD, np.asarray(nbhd, np.float32), ["B", "Malignant", "T"])
    return a


#: Five cells (µm). Pair distances: c0–c1 10, c0–c2 30, c0–c4 40, c1–c2 31.6, c1–c4 30,
#: c2–c4 exactly 50 (inclusive), c3 more than 100 from everyone.
XY = [(0, 0), (10, 0), (0, 30), (100, 100), (40, 0)]
TYPES = ["T", "T", "B", "Malignant", "Malignant"]


def test_hand_computed_layout_at_50_um():
    a = _cells(XY, TYPES)
    per_cell = observed_neighbourhood(a, 50.0)
    third, two = 1 / 3, 2 / 3
    expected = pd.DataFrame(
        [[third, third, third],   # c0: c1 (T), c2 (B), c4 (Malignant); itself excluded
         [third, third, third],   # c1: c0, c2, c4
         [0.0, third, two],       # c2: c0 (T), c1 (T), c4 (Malignant) at exactly 50 µm
         [np.nan] * 3,            # c3: nobody within 50 µm
         [third, 0.0, two]],      # c4: c0, c1 (T), c2 (B)
        index=a.obs_names, columns=["B", "Malignant", "T"])
    pd.testing.assert_frame_equal(per_cell, expected, atol=1e-6, check_dtype=False)
    res = observed_neighbourhood_by_type(a, 50.0)
    assert res.kind == "observed" and res.radius_um == 50.0
    assert res.n_isolated == 1  # c3, the lone Malignant cell far away
    assert res.n_cells.to_dict() == {"B": 1, "Malignant": 1, "T": 2}
    m = res.matrix
    assert m.loc["T"].to_numpy() == pytest.approx([100 / 3] * 3, abs=1e-4)
    assert m.loc["B"].to_numpy() == pytest.approx([0, 100 / 3, 200 / 3], abs=1e-4)
    assert m.loc["Malignant"].to_numpy() == pytest.approx([100 / 3, 0, 200 / 3], abs=1e-4)
    assert np.allclose(m.sum(axis=1), 100)
    assert "Observed" in res.title and "50 µm" in res.title
    assert "itself excluded" in res.describe() and "1 cell(s)" in res.describe()


def test_radius_changes_the_neighbours():
    a = _cells(XY, TYPES)
    m = observed_neighbourhood_by_type(a, 20.0).matrix  # only c0–c1 are that close
    assert list(m.index) == ["T"] and m.loc["T", "T"] == pytest.approx(100)
    m = observed_neighbourhood_by_type(a, 35.0).matrix  # c2–c4 (50 µm) no longer neighbours
    assert m.loc["B"].to_numpy() == pytest.approx([0, 0, 100], abs=1e-4)
    with pytest.raises(ValueError, match="positive"):
        observed_neighbourhood(a, 0.0)


def test_matches_brute_force_on_a_random_slide():
    rng = np.random.default_rng(3)
    n = 400
    xy = rng.uniform(0, 300, (n, 2))
    types = np.array(["B", "Malignant", "T"])[rng.integers(0, 3, n)]
    a = _cells(xy, types)
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    near = (d <= 40.0) & ~np.eye(n, dtype=bool)
    onehot = (types[:, None] == np.array(["B", "Malignant", "T"])[None, :]).astype(float)
    with np.errstate(invalid="ignore"):
        brute = near.astype(float) @ onehot / near.sum(1, keepdims=True)
    got = observed_neighbourhood(a, 40.0).to_numpy()
    assert np.array_equal(np.isnan(got), np.isnan(brute))
    np.testing.assert_allclose(got[~np.isnan(got)], brute[~np.isnan(brute)], atol=1e-5)


def test_predicted_is_the_model_head_and_says_so():
    nbhd = [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]]
    a = _cells(XY, TYPES, nbhd)
    a.uns[K.UNS_GHIST] = {K.GHIST_PARAMS: {"nbhd_radius_um": 50.0}}
    pred = predicted_neighbourhood_by_type(a)
    assert pred.kind == "predicted" and pred.radius_um == 50.0
    assert pred.matrix.loc["T", "T"] == pytest.approx((0.7 + 0.4) / 2 * 100)
    assert "Predicted" in pred.title and "model" in pred.title
    obs = observed_neighbourhood_by_type(a, 50.0)
    assert obs.matrix.loc["T", "T"] != pytest.approx(pred.matrix.loc["T", "T"])  # two different numbers
