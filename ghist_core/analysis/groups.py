"""Risk groups: put each patient in a group by one recorded rule.

Why a rule object: a figure is only reproducible when the grouping is, so each rule is a
small frozen dataclass that describes itself (with its cut-points) and goes to JSON::

    groups = make_risk_groups(table, SplitAtQuantiles("prop_Malignant", "tertiles"))
    groups.table[groups.column], groups.description, groups.rule_dict
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ghist_core.analysis.levels import natural_order
from ghist_core.errors import SurvivalAnalysisError

__all__ = ["ByVariable", "SplitAtQuantiles", "Threshold", "KMeansClusters", "Rule", "RiskGroups",
           "make_risk_groups"]


@dataclass(frozen=True)
class ByVariable:
    """Groups are the values of a clinical (or any) column, optionally a chosen subset.

    Without ``levels`` the groups are in natural order
    (:func:`ghist_core.analysis.levels.natural_order`: stage I < II < III, G1 < G2,
    text order for nominal values); with ``levels`` in the order given."""

    column: str
    levels: tuple | None = None

    def describe(self) -> str:
        lv = f", levels {list(self.levels)}" if self.levels else ""
        return f"groups = values of {self.column!r}{lv}"


@dataclass(frozen=True)
class SplitAtQuantiles:
    """Split a numeric column at its median (q="median"), tertiles, quartiles or q groups."""

    column: str
    q: str | int = "median"

    @property
    def n_groups(self) -> int:
        named = {"median": 2, "tertiles": 3, "quartiles": 4}
        if isinstance(self.q, str):
            if self.q not in named:
                raise SurvivalAnalysisError(f"Unknown quantile split {self.q!r}; use median, "
                                            "tertiles, quartiles or a number of groups.")
            return named[self.q]
        return int(self.q)

    def describe(self) -> str:
        return f"{self.column!r} split at {self.q} ({self.n_groups} equal-sized groups)"


@dataclass(frozen=True)
class Threshold:
    """Two groups: column ≤ value and column > value."""

    column: str
    value: float

    def describe(self) -> str:
        return f"{self.column!r} ≤ {self.value:g} vs > {self.value:g}"


@dataclass(frozen=True)
class KMeansClusters:
    """k-means on the chosen features (z-scored if ``standardise``), fixed seed."""

    k: int
    features: tuple[str, ...]
    seed: int = 0
    standardise: bool = True

    def describe(self) -> str:
        z = "z-scored " if self.standardise else ""
        return (f"k-means (k={self.k}, seed={self.seed}, n_init=10) on {z}"
                f"{', '.join(self.features)}; clusters numbered by increasing mean of "
                f"{self.features[0]!r}")


Rule = ByVariable | SplitAtQuantiles | Threshold | KMeansClusters


@dataclass
class RiskGroups:
    """Result of :func:`make_risk_groups`: ``table`` with the group in ``column``,
    ``description`` (the rule in words, with cut-points: enough to redo the figure),
    ``rule`` (the dataclass; ``rule_dict`` for JSON), ``notes`` (patients without a group)."""

    table: pd.DataFrame
    column: str
    rule: Rule
    description: str
    notes: list[str] = field(default_factory=list)
    cutpoints: list[float] = field(default_factory=list)

    @property
    def rule_dict(self) -> dict:
        return {"rule": type(self.rule).__name__, **asdict(self.rule),
                "cutpoints": self.cutpoints, "description": self.description}


def _numeric(table: pd.DataFrame, col: str) -> pd.Series:
    if col not in table.columns:
        raise SurvivalAnalysisError(f"Column {col!r} is not in the table.")
    x = pd.to_numeric(table[col], errors="coerce")
    if x.notna().sum() == 0:
        raise SurvivalAnalysisError(f"Column {col!r} has no numbers to split.")
    return x


def make_risk_groups(table: pd.DataFrame, rule: Rule, *, key_added: str = "risk_group"
                     ) -> RiskGroups:
    """Assign each patient a group by ``rule``; patients the rule cannot place (missing
    value) get no group and are counted in ``notes``. Groups are an ordered categorical."""
    df = table.copy()
    cuts: list[float] = []
    desc = rule.describe()
    if isinstance(rule, ByVariable):
        if rule.column not in df.columns:
            raise SurvivalAnalysisError(f"Column {rule.column!r} is not in the table.")
        s = df[rule.column]
        if rule.levels:
            s = s.where(s.isin(rule.levels))
            cats = list(rule.levels)
        else:
            cats = natural_order(s)
        groups = pd.Categorical(s, categories=cats, ordered=True)
    elif isinstance(rule, SplitAtQuantiles):
        x = _numeric(df, rule.column)
        k = rule.n_groups
        if k < 2:
            raise SurvivalAnalysisError("A quantile split needs at least 2 groups.")
        labels = {2: ["low", "high"], 3: ["low", "mid", "high"]}.get(k, [f"Q{i + 1}" for i in range(k)])
        n_values = int(x.notna().sum())
        if n_values < k:  # not a question of ties: a threshold cannot help either
            raise SurvivalAnalysisError(
                f"Only {n_values} patient(s) have a value of {rule.column!r}; splitting into {k} groups "
                f"needs at least {k} (patients with predicted slides and clinical data).")
        try:
            groups, bins = pd.qcut(x, k, labels=labels, retbins=True)
        except ValueError:
            raise SurvivalAnalysisError(
                f"{rule.column!r} has too many tied values to split into {k} groups; use a "
                "threshold instead.") from None
        cuts = [float(b) for b in bins[1:-1]]
        desc += "; cut-points " + ", ".join(f"{c:.4g}" for c in cuts) + " (groups include upper cut)"
        groups = pd.Categorical(groups, categories=labels, ordered=True)
    elif isinstance(rule, Threshold):
        x = _numeric(df, rule.column)
        lo, hi = f"≤ {rule.value:g}", f"> {rule.value:g}"
        lab = np.where(x.isna(), None, np.where(x <= rule.value, lo, hi))
        groups = pd.Categorical(lab, categories=[lo, hi], ordered=True)
        cuts = [float(rule.value)]
    elif isinstance(rule, KMeansClusters):
        from sklearn.cluster import KMeans

        feats = list(rule.features)
        if not feats:
            raise SurvivalAnalysisError("Choose at least one feature for k-means.")
        X = pd.concat([_numeric(df, c) for c in feats], axis=1)
        ok = X.notna().all(axis=1).to_numpy()
        if rule.k < 2 or rule.k > ok.sum():
            raise SurvivalAnalysisError(
                f"k-means needs 2 ≤ k ≤ number of patients with all features ({int(ok.sum())}).")
        Z = X[ok].to_numpy(float)
        if rule.standardise:
            sd = Z.std(axis=0)
            Z = (Z - Z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            km = KMeans(n_clusters=rule.k, random_state=rule.seed, n_init=10).fit(Z)
        first = X[ok].iloc[:, 0].to_numpy(float)
        centre = np.array([first[km.labels_ == j].mean() for j in range(rule.k)])
        rank = np.empty(rule.k, int)
        rank[np.argsort(centre, kind="stable")] = np.arange(rule.k)
        labels = [f"cluster {i + 1}" for i in range(rule.k)]
        lab = np.full(len(df), None, dtype=object)
        lab[ok] = np.array(labels, dtype=object)[rank[km.labels_]]
        groups = pd.Categorical(lab, categories=labels, ordered=True)
    else:
        raise SurvivalAnalysisError(f"Unknown grouping rule {rule!r}.")
    df[key_added] = groups
    notes = []
    n_na = int(pd.isna(df[key_added]).sum())
    if n_na:
        notes.append(f"{n_na} of {len(df)} patients have no group under this rule (missing "
                     "value) and are left out of the comparison.")
    return RiskGroups(table=df, column=key_added, rule=rule, description=desc, notes=notes,
                      cutpoints=cuts)
