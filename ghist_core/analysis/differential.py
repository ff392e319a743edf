"""Differential predicted expression between two groups of patients (e.g. ER+ vs ER−).

Why per patient: cells of one patient are not independent samples, so cells are first
averaged per patient ("pseudobulk") and the test compares patients. Every gene is tested
at once (vectorised over the gene axis), p-values are corrected with Benjamini–Hochberg.

    res = differential_expression(pseudobulk(X, patient_ids, genes), labels,
                                  group_a="Positive", group_b="Negative")
    res.table_  # gene, mean_a, mean_b, log2fc, statistic, p_value, q_value, neg_log10_q
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from scipy import sparse, stats

from ghist_core.errors import ClinicalTableError

Method = Literal["mannwhitney", "welch"]


def bh_fdr(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN stays NaN and is not counted."""
    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(ranked, 0.0, 1.0)
    q[ok] = out
    return q


def pseudobulk(X: np.ndarray | sparse.spmatrix, groups: Sequence, genes: Sequence[str]) -> pd.DataFrame:
    """Mean expression per group (rows) and gene (columns) via one sparse matrix product."""
    labels = pd.Index(pd.Series(np.asarray(groups)).astype(str))
    codes, uniques = pd.factorize(labels, sort=True)
    n = len(codes)
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    ind = sparse.csr_matrix((np.ones(n, dtype=dtype), (codes, np.arange(n))), shape=(len(uniques), n))
    sums = ind @ X  # float32 stays float32: no 2× copy of a large matrix
    sums = np.asarray(sums.todense() if sparse.issparse(sums) else sums, dtype=float)
    counts = np.bincount(codes, minlength=len(uniques)).astype(float)
    return pd.DataFrame(sums / counts[:, None], index=pd.Index(uniques, name="group"), columns=list(genes))


@dataclass
class DifferentialResult:
    """Result of :func:`differential_expression`.

    Attributes
    ----------
    table_ : DataFrame, one row per gene, sorted by p-value: ``gene``, ``mean_a``, ``mean_b``,
        ``log2fc`` (log2 (mean_a + pc) − log2 (mean_b + pc)), ``statistic``, ``p_value``,
        ``q_value`` (BH), ``neg_log10_q``.
    """

    group_a: str
    group_b: str
    n_a: int
    n_b: int
    method: str
    pseudocount: float
    table_: pd.DataFrame = field(repr=False)

    def significant(self, alpha: float = 0.05, min_abs_log2fc: float = 0.0) -> pd.DataFrame:
        t = self.table_
        return t[(t["q_value"] < alpha) & (t["log2fc"].abs() >= min_abs_log2fc)]

    def __repr__(self) -> str:
        return (f"<DifferentialResult {self.group_a} (n={self.n_a}) vs {self.group_b} (n={self.n_b}), "
                f"{self.method}, {len(self.table_)} genes, {len(self.significant())} with q < 0.05>")


def differential_expression(
    values: pd.DataFrame,
    labels: pd.Series | Sequence,
    *,
    group_a: str,
    group_b: str,
    method: Method = "mannwhitney",
    pseudocount: float = 0.01,
) -> DifferentialResult:
    """Test every gene (column of ``values``) between samples labelled ``group_a`` and ``group_b``.

    ``values`` is samples × genes (e.g. from :func:`pseudobulk`); ``labels`` is aligned to its
    rows (a Series indexed like ``values`` or a plain sequence). Samples with other labels
    are ignored. Mann–Whitney U (two-sided) or Welch's t-test, then BH over genes.
    """
    if method not in ("mannwhitney", "welch"):
        raise ValueError(f"Unknown method {method!r}: use 'mannwhitney' or 'welch'.")
    if isinstance(labels, pd.Series):
        lab = labels.reindex(values.index).astype("string")
    else:
        lab = pd.Series(list(labels), index=values.index, dtype="string")
    a_mask = (lab == str(group_a)).fillna(False).to_numpy(bool)
    b_mask = (lab == str(group_b)).fillna(False).to_numpy(bool)
    n_a, n_b = int(a_mask.sum()), int(b_mask.sum())
    if str(group_a) == str(group_b):
        raise ClinicalTableError("Choose two different groups to compare.")
    if n_a < 2 or n_b < 2:
        raise ClinicalTableError(
            f"Each group needs at least 2 patients with predictions: {group_a!s} has {n_a}, "
            f"{group_b!s} has {n_b}. Add slides for more patients or choose other groups."
        )
    X = values.to_numpy(dtype=float)
    A, B = X[a_mask], X[b_mask]
    mean_a, mean_b = A.mean(axis=0), B.mean(axis=0)
    with np.errstate(all="ignore"):
        if method == "mannwhitney":
            res = stats.mannwhitneyu(A, B, alternative="two-sided", axis=0, method="auto")
        else:
            res = stats.ttest_ind(A, B, equal_var=False, axis=0)
        stat = np.asarray(res.statistic, dtype=float)
        p = np.asarray(res.pvalue, dtype=float)
        # constant genes (no variation anywhere) carry no evidence: p = 1, not NaN
        const = np.ptp(np.vstack([A, B]), axis=0) == 0
        p = np.where(const, 1.0, p)
        log2fc = np.log2(np.clip(mean_a, 0, None) + pseudocount) - np.log2(np.clip(mean_b, 0, None) + pseudocount)
    q = bh_fdr(p)
    table = pd.DataFrame({
        "gene": values.columns.astype(str),
        "mean_a": mean_a, "mean_b": mean_b, "log2fc": log2fc,
        "statistic": stat, "p_value": p, "q_value": q,
        "neg_log10_q": -np.log10(np.clip(q, 1e-300, None)),
    }).sort_values("p_value", kind="stable").reset_index(drop=True)
    return DifferentialResult(str(group_a), str(group_b), n_a, n_b, method, pseudocount, table)
