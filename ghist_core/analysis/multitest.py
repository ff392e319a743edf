"""Multiple-testing corrections, one owner: Benjamini–Hochberg (FDR) and Holm (FWER).

Why one module: the feature tests, the differential expression and the pairwise log-rank
tests all correct p-values; two hand-written copies of one formula drift apart.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["bh_fdr", "holm"]


def bh_fdr(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), as R's ``p.adjust(method="BH")``.

    NaN (an untested feature) stays NaN and is not counted in the number of tests.
    The arithmetic is scipy's ``false_discovery_control``, applied to the finite values.
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values (controls the family-wise error rate)."""
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out
