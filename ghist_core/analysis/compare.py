"""Tests between groups of patients, one result schema for patient features and genes.

Why per patient: cells of one patient are not independent samples, so every test here
compares patients (features or expression already pooled per patient, see
:mod:`ghist_core.analysis.features`). Every result is a :class:`GroupTests` whose table
has the same core columns (``feature``, ``test``, ``statistic``, ``p_value``, ``q_value``)
with Benjamini–Hochberg from :mod:`ghist_core.analysis.multitest`::

    fc = compare_features(groups.table, groups.column, feature_columns(feats))
    de = differential_expression(patient_expression(slides), labels, group_a="Positive", group_b="Negative")
    de.table.head(), de.significant(0.05, 1.0), fc.plot()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
from scipy import sparse, stats

from ghist_core.analysis.levels import natural_order
from ghist_core.analysis.multitest import bh_fdr
from ghist_core.errors import ClinicalTableError, SurvivalAnalysisError

__all__ = ["GroupTests", "compare_features", "differential_expression", "compare_expression",
           "pseudobulk", "min_attainable_p"]

Method = Literal["mannwhitney", "welch"]
_TEST_NAMES = {"mannwhitney": "Mann–Whitney U", "welch": "Welch t"}


@dataclass
class GroupTests:
    """Per-feature tests between groups of patients.

    Attributes
    ----------
    table : DataFrame, one row per feature, sorted by p-value (untested last):
        ``feature``, ``test``, ``statistic``, ``p_value``, ``q_value`` (Benjamini–Hochberg
        over the features tested; NaN = not tested), then per group either
        ``median_<group>`` (:func:`compare_features`) or ``mean_a``, ``mean_b``, ``log2fc``
        (log2 (mean_a + pc) − log2 (mean_b + pc)) and ``neg_log10_q``
        (:func:`differential_expression`).
    group_col : column of ``data`` holding the group.
    groups : the groups compared, in order (``groups[0]`` is group A).
    n : patients per group.
    method : the test used.
    data : per-patient values of the features tested and the group (for plots).
    notes : what was matched or left out, in words.
    min_p : the smallest p-value the test can give with these group sizes
        (:func:`min_attainable_p`; 0 for Welch's t, which has no floor).
    warnings : caveats the reader must see, e.g. groups too small for any feature to
        reach q < alpha whatever the data.
    grouping : the variable the groups are values of (e.g. the clinical column ``er_status``;
        ``""`` when unknown).
    pseudocount : added to both means before their log2 ratio (``None``: no fold change).
    """

    table: pd.DataFrame
    group_col: str
    groups: list
    n: dict
    method: str
    data: pd.DataFrame = field(repr=False)
    notes: list[str] = field(default_factory=list)
    min_p: float = 0.0
    warnings: list[str] = field(default_factory=list)
    grouping: str = ""
    pseudocount: float | None = None

    def significant(self, alpha: float = 0.05, min_abs_log2fc: float = 0.0) -> pd.DataFrame:
        """Rows with q < ``alpha`` (and |log2FC| ≥ ``min_abs_log2fc`` where there is a fold change)."""
        t = self.table
        keep = t["q_value"] < alpha
        if "log2fc" in t:
            keep &= t["log2fc"].abs() >= min_abs_log2fc
        return t[keep]

    def labelled_table(self) -> pd.DataFrame:
        """:attr:`table` with the comparison written into every row (``grouping``, ``group_a``,
        ``group_b`` and ``log2fc_pseudocount``): a downloaded CSV has no screen around it to say
        whether ``mean_a`` and ``log2fc`` are of one group or the other."""
        t = self.table.copy()
        if "mean_a" not in t:  # feature tests: the medians are already named after their groups
            t.insert(t.columns.get_loc("q_value") + 1, "grouping", self.grouping)
            return t
        at = t.columns.get_loc("mean_a")
        labels = {"grouping": self.grouping, "group_a": self.groups[0], "group_b": self.groups[1]}
        for offset, (name, value) in enumerate(labels.items()):
            t.insert(at + offset, name, value)
        t.insert(t.columns.get_loc("log2fc") + 1, "log2fc_pseudocount", self.pseudocount)
        return t

    def log2fc_rule(self) -> str:
        """How ``log2fc`` is computed, in words: which group is over which, and its pseudocount."""
        if self.pseudocount is None:
            return ""
        a, b, pc = self.groups[0], self.groups[1], f"{self.pseudocount:g}"
        return (f"log2 FC = log2((mean in {a} + {pc}) / (mean in {b} + {pc})) of the patients' predicted "
                f"expression: above 0 is higher in {a}, below 0 higher in {b}. The {pc} added to both means "
                "(a pseudocount) keeps a gene predicted near 0 in one group finite, and pulls fold changes of "
                "genes near 0 towards 0.")

    def plot(self, top: int = 6):
        """Box plot per group of the ``top`` features by q-value
        (:func:`ghist_core.viz.plots.feature_boxes`)."""
        from ghist_core.viz.plots import feature_boxes

        return feature_boxes(self, top=top)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{g} (n={self.n[g]})" for g in self.groups)
        return (f"<GroupTests {sizes}: {self.method}, {len(self.table)} features, "
                f"{len(self.significant())} with q < 0.05>")


def min_attainable_p(test: str, sizes: Sequence[int]) -> float:
    """The smallest two-sided p-value ``test`` can return for groups of these sizes.

    Rank tests have a floor: with 2 and 2 patients the most extreme arrangement (every
    patient of one group above every patient of the other) is one of C(4, 2) = 6, so
    Mann–Whitney's exact p is at least 2/6 = 0.33 whatever the data. Computed by running
    the test itself (as the analysis runs it) on perfectly separated groups without ties.
    Welch's t-test has no floor (0 is returned).

    ``test`` is ``"mannwhitney"`` / ``"Mann–Whitney U"``, ``"kruskal"`` /
    ``"Kruskal–Wallis H"`` or ``"welch"`` / ``"Welch t"``.
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        return 1.0
    samples, start = [], 0
    for n in sizes:
        samples.append(np.arange(start, start + n, dtype=float))
        start += n
    name = str(test).lower()
    if name.startswith("mann"):
        if len(sizes) != 2:
            raise ValueError("Mann–Whitney U compares exactly two groups.")
        return float(stats.mannwhitneyu(samples[1], samples[0], alternative="two-sided",
                                        method="auto").pvalue)
    if name.startswith("kruskal"):
        return float(stats.kruskal(*samples).pvalue)
    if name.startswith("welch"):
        return 0.0
    raise ValueError(f"Unknown test {test!r}.")


def _floor_warning(test: str, n: dict, min_p: float, alpha: float, what: str) -> list[str]:
    """A warning when no ``what`` can reach q < alpha because p cannot go below ``min_p``."""
    if min_p < alpha:
        return []
    sizes = " and ".join(f"{k} (n={v})" for k, v in n.items())
    return [f"With {sizes}, the {test} test cannot give p below {min_p:.2g} even for perfectly "
            f"separated groups, so no {what} can reach q < {alpha:g} whatever the data: this "
            "comparison can only rank them. Add patients to the smaller group to test."]


def _levels(s: pd.Series) -> list:
    if isinstance(s.dtype, pd.CategoricalDtype):
        return [c for c in s.cat.categories if (s == c).any()]
    return natural_order(s)


def compare_features(table: pd.DataFrame, group_col: str, features: Sequence[str], *,
                     alpha: float = 0.05) -> GroupTests:
    """Does each feature differ between groups? Rank tests (no normality assumption):
    Mann–Whitney U for 2 groups, Kruskal–Wallis H for more; BH over the features tested.
    Patients without a group, or without any of the features (no predicted slide), are left
    out, so group sizes count only patients compared; an empty group or a constant feature is
    not tested (said in ``test``). ``.warnings`` says when the groups are too small for any
    feature to reach q < ``alpha`` (:func:`min_attainable_p`)."""
    if group_col not in table.columns:
        raise SurvivalAnalysisError(f"Column {group_col!r} is not in the table.")
    df = table[table[group_col].notna() & table[list(features)].notna().any(axis=1)]
    s = df[group_col]
    levels = _levels(s)
    if len(levels) < 2:
        raise SurvivalAnalysisError("Comparing features needs at least two groups.")
    rows = []
    for f in features:  # a handful of patient features; genes go through differential_expression
        x = pd.to_numeric(df[f], errors="coerce")
        samples = [x[s == g].dropna().to_numpy() for g in levels]
        row: dict[str, Any] = {"feature": f}
        if any(len(v) == 0 for v in samples) or np.ptp(np.concatenate(samples)) == 0:
            row.update(test="not tested (empty group or constant)", statistic=np.nan, p_value=np.nan)
        elif len(levels) == 2:
            r = stats.mannwhitneyu(samples[0], samples[1], alternative="two-sided")
            row.update(test="Mann–Whitney U", statistic=float(r.statistic), p_value=float(r.pvalue))
        else:
            r = stats.kruskal(*samples)
            row.update(test="Kruskal–Wallis H", statistic=float(r.statistic), p_value=float(r.pvalue))
        for g, v in zip(levels, samples):
            row[f"median_{g}"] = float(np.median(v)) if len(v) else np.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    out.insert(out.columns.get_loc("p_value") + 1, "q_value", bh_fdr(out["p_value"].to_numpy()))
    out = out.sort_values("p_value", na_position="last").reset_index(drop=True)
    n = {g: int((s == g).sum()) for g in levels}
    method = "Mann–Whitney U" if len(levels) == 2 else "Kruskal–Wallis H"
    floor = min_attainable_p(method, list(n.values()))
    return GroupTests(table=out, group_col=group_col, groups=levels, n=n, method=method,
                      data=df[[group_col, *features]].copy(), min_p=floor,
                      warnings=_floor_warning(method, n, floor, alpha, "feature"), grouping=str(group_col))


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


def differential_expression(
    values: pd.DataFrame,
    labels: pd.Series | Sequence,
    *,
    group_a: str,
    group_b: str,
    method: Method = "mannwhitney",
    pseudocount: float = 0.01,
    alpha: float = 0.05,
) -> GroupTests:
    """Test every gene (column of ``values``) between samples labelled ``group_a`` and ``group_b``.

    ``values`` is patients × genes (e.g. :func:`ghist_core.analysis.features.patient_expression`);
    ``labels`` is aligned to its rows (a Series indexed like ``values`` or a plain sequence).
    Samples with other labels are ignored; a named Series gives ``.grouping`` its name.
    ``log2fc`` is log2 ((mean_a + ``pseudocount``) / (mean_b + ``pseudocount``)), stated
    by ``.log2fc_rule()``. Two-sided Mann–Whitney U or Welch's t-test,
    vectorised over genes, then BH over genes; a gene constant everywhere gets p = 1.
    ``.min_p`` is the smallest p the test can give with these group sizes and ``.warnings``
    says when it is ≥ ``alpha`` (e.g. 2 vs 2 patients: Mann–Whitney p ≥ 0.33), so that no
    gene can be significant whatever the data.
    """
    if method not in _TEST_NAMES:
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
        "feature": values.columns.astype(str), "test": _TEST_NAMES[method],
        "statistic": stat, "p_value": p, "q_value": q,
        "mean_a": mean_a, "mean_b": mean_b, "log2fc": log2fc,
        "neg_log10_q": -np.log10(np.clip(q, 1e-300, None)),
    }).sort_values("p_value", kind="stable").reset_index(drop=True)
    data = values.loc[a_mask | b_mask].copy()
    data.columns = data.columns.astype(str)
    data.insert(0, "group", pd.Categorical(lab[a_mask | b_mask].astype(str),
                                           categories=[str(group_a), str(group_b)]))
    n = {str(group_a): n_a, str(group_b): n_b}
    floor = min_attainable_p(method, [n_a, n_b])
    grouping = str(labels.name) if isinstance(labels, pd.Series) and labels.name is not None else ""
    return GroupTests(table=table, group_col="group", groups=[str(group_a), str(group_b)],
                      n=n, method=_TEST_NAMES[method], data=data, min_p=floor,
                      warnings=_floor_warning(_TEST_NAMES[method], n, floor, alpha, "gene"),
                      grouping=grouping, pseudocount=float(pseudocount))


def compare_expression(
    expression: pd.DataFrame,
    clinical: pd.DataFrame,
    *,
    id_col: str,
    group_col: str,
    group_a: str,
    group_b: str,
    method: Method = "mannwhitney",
    alpha: float = 0.05,
) -> GroupTests:
    """Differential predicted expression between two groups of patients of a clinical table.

    ``expression`` is patients × genes indexed by patient id (from
    :func:`ghist_core.analysis.features.patient_expression`, so slides are pooled by the
    one pooling rule). Patients are matched on ``clinical[id_col]`` (as text, spaces
    stripped). A patient listed twice with the same group is counted once (said in
    ``notes``); listed twice with different groups is an error. ``notes[0]`` says how
    many patients with predictions were found in the table.
    """
    for col in (id_col, group_col):
        if col not in clinical.columns:
            raise ClinicalTableError(f"The clinical table has no {col!r} column.")
    lab = pd.DataFrame({"pid": clinical[id_col].astype(str).str.strip(),
                        "group": clinical[group_col]}).dropna(subset=["group"])
    lab["group"] = lab["group"].astype(str)
    lab = lab.drop_duplicates()
    clash = lab.loc[lab["pid"].duplicated(), "pid"].unique()
    if len(clash):
        raise ClinicalTableError(
            f"Patient(s) {', '.join(map(str, clash[:5]))} have more than one {group_col!r} value "
            "in the clinical table; correct the table so each patient has one group.")
    labels = lab.set_index("pid")["group"].rename(group_col)  # names .grouping of the result
    ids = expression.index.astype(str)
    matched = ids.intersection(labels.index)
    notes = [f"{len(expression)} patients with predictions, {len(matched)} of them in the clinical table."]
    dup = int(clinical[id_col].astype(str).str.strip().duplicated().sum())
    if dup:
        notes.append(f"{dup} repeated row(s) of the same patient in the clinical table were counted once.")
    values = expression.set_axis(ids, axis=0).loc[matched]
    res = differential_expression(values, labels.loc[matched], group_a=group_a, group_b=group_b,
                                  method=method, alpha=alpha)
    res.notes = notes + res.notes
    return res
