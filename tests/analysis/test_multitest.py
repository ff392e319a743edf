"""Multiple-testing corrections: BH and Holm against hand-worked values, scipy and their properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import false_discovery_control

from ghist_core.analysis.multitest import bh_fdr, holm


def test_bh_reference_values():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    q = bh_fdr(p)
    # hand-computed: sorted 0.005,0.01,0.03,0.04 -> 0.02,0.02,0.04,0.04
    np.testing.assert_allclose(q[:4], [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(q[4])  # untested: stays NaN and does not count as a test
    assert np.isnan(bh_fdr([np.nan, np.nan])).all() and bh_fdr([]).shape == (0,)


def test_bh_is_scipys_on_the_finite_values():
    rng = np.random.default_rng(0)
    p = rng.random(200) ** 3
    p[::17] = np.nan
    ok = np.isfinite(p)
    assert np.array_equal(bh_fdr(p)[ok], false_discovery_control(p[ok], method="bh"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60))
def test_bh_properties(ps):
    p = np.array(ps)
    q = bh_fdr(p)
    assert (q >= p - 1e-12).all() and (q <= 1).all()
    order = np.argsort(p, kind="stable")
    assert (np.diff(q[order]) >= -1e-12).all()


def test_holm_matches_definition():
    p = [0.01, 0.04, 0.03, 0.20]
    # sorted 0.01,0.03,0.04,0.20 → 4*.01=.04, 3*.03=.09, 2*.04=.08→max .09, 1*.2=.2
    assert holm(p).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([]).size == 0
