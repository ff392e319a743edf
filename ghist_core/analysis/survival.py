"""Survival statistics for cohorts: Kaplan–Meier, log-rank, Cox, RMST (lifelines underneath).

Why a module of its own: the page and the checks need one place where survival numbers
are computed and validated, so what the researcher sees is what the tests check. Numbers
only: the figures of these results are drawn by :mod:`ghist_core.viz.survival_plots`
(``result.plot()`` delegates there). Every function validates its input and raises
:class:`~ghist_core.errors.SurvivalAnalysisError` with a plain-language message instead
of letting lifelines fail deep inside.

Conventions: ``table`` is a pandas DataFrame with one row per patient; durations are
non-negative numbers in one time unit (say which with ``time_unit``); events are 0/1
(1 = the event happened, 0 = censored).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ghist_core.analysis.levels import natural_order
from ghist_core.analysis.multitest import holm
from ghist_core.errors import SurvivalAnalysisError

__all__ = ["GroupComparison", "CoxResult", "compare_groups", "fit_cox", "ph_check", "rmst", "PH_MAX_N"]


# --------------------------------------------------------------------------- input checks
def _clean_survival(
    table: pd.DataFrame, duration_col: str, event_col: str, extra_cols: Sequence[str] = ()
) -> tuple[pd.DataFrame, list[str]]:
    """Check durations/events and drop rows missing any needed column, saying how many."""
    if not isinstance(table, pd.DataFrame):
        raise SurvivalAnalysisError("The survival table must be a table (pandas DataFrame).")
    needed = [duration_col, event_col, *extra_cols]
    missing = [c for c in dict.fromkeys(needed) if c not in table.columns]
    if missing:
        raise SurvivalAnalysisError(
            f"Column(s) {', '.join(map(repr, missing))} are not in the table. "
            f"Available columns: {', '.join(map(str, table.columns[:30]))}."
        )
    df = table[list(dict.fromkeys(needed))].copy()
    notes: list[str] = []
    t = pd.to_numeric(df[duration_col], errors="coerce")
    bad_t = df[duration_col].notna() & t.isna()
    if bad_t.any():
        examples = ", ".join(map(repr, df.loc[bad_t, duration_col].astype(str).unique()[:3]))
        raise SurvivalAnalysisError(
            f"The time column {duration_col!r} has {int(bad_t.sum())} value(s) that are not "
            f"numbers (e.g. {examples}). Clean the clinical table first (the Cohort page "
            "does this for you when you import it)."
        )
    e = pd.to_numeric(df[event_col], errors="coerce")
    bad_e = (df[event_col].notna() & e.isna()) | (e.notna() & ~e.isin([0, 1]))
    if bad_e.any():
        examples = ", ".join(map(repr, df.loc[bad_e, event_col].astype(str).unique()[:3]))
        raise SurvivalAnalysisError(
            f"The event column {event_col!r} must be 0 (censored) or 1 (event); found "
            f"{examples}. Map it when importing the clinical table."
        )
    if (t < 0).any():
        raise SurvivalAnalysisError(
            f"The time column {duration_col!r} has {int((t < 0).sum())} negative time(s); "
            "survival times must be zero or more."
        )
    df[duration_col] = t.astype(float)
    df[event_col] = e
    na = df.isna().any(axis=1)
    if na.any():
        parts = []
        for c in dict.fromkeys(needed):
            k = int(df[c].isna().sum())
            if k:
                parts.append(f"{k} without {c!r}")
        notes.append(
            f"{int(na.sum())} of {len(df)} patients left out because a value is missing "
            f"({'; '.join(parts)})."
        )
        df = df.loc[~na]
    df[event_col] = df[event_col].astype(int)
    if df.empty:
        raise SurvivalAnalysisError("No patient has both a time and an event value to analyse.")
    return df, notes


# --------------------------------------------------------------------------- KM helpers
def _km_curve(t: np.ndarray, e: np.ndarray, alpha: float) -> pd.DataFrame:
    """KM estimate with the log(-log) ("exponential Greenwood") CI, one row per distinct
    time with 0 first — the same table and formulas as lifelines' KaplanMeierFitter
    (checked against it in the tests), vectorised so the page stays fast."""
    from scipy.stats import norm

    t = np.asarray(t, dtype=float)
    e = np.asarray(e, dtype=int)
    times, inv = np.unique(np.r_[0.0, t], return_inverse=True)
    inv = inv[1:]
    removed = np.bincount(inv, minlength=times.size)
    events = np.bincount(inv, weights=e, minlength=times.size).astype(int)
    at_risk = t.size - np.r_[0, np.cumsum(removed)[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        surv = np.cumprod(1.0 - np.where(at_risk > 0, events / at_risk, 0.0))
        var = events / (at_risk * (at_risk - events))
        var = np.cumsum(np.where(np.isfinite(var), var, 0.0))
        z = norm.ppf(1 - alpha / 2)
        v = np.log(surv)
        lower = np.exp(-np.exp(np.log(-v) - z * np.sqrt(var) / v))
        upper = np.exp(-np.exp(np.log(-v) + z * np.sqrt(var) / v))
    return pd.DataFrame({"time": times, "at_risk": at_risk, "events": events,
                         "censored": removed - events, "survival": surv,
                         "ci_lower": np.nan_to_num(lower, nan=1.0),
                         "ci_upper": np.nan_to_num(upper, nan=1.0)})


def _logrank(t: np.ndarray, e: np.ndarray, g: np.ndarray, levels: Sequence
             ) -> tuple[float, float, int]:
    """Multi-group log-rank test (χ², p, df) over all distinct event times (Peto & Peto;
    the same statistic as lifelines.statistics.multivariate_logrank_test)."""
    from scipy.stats import chi2

    ev_times = np.unique(t[e == 1])
    k = len(levels)
    if ev_times.size == 0:
        return 0.0, 1.0, k - 1
    n_jt = np.empty((k, ev_times.size))
    d_jt = np.empty((k, ev_times.size))
    for j, lv in enumerate(levels):  # loop over groups (a handful), not over patients
        tj = np.sort(t[g == lv])
        n_jt[j] = tj.size - np.searchsorted(tj, ev_times, side="left")
        dj = np.sort(t[(g == lv) & (e == 1)])
        d_jt[j] = np.searchsorted(dj, ev_times, side="right") - np.searchsorted(
            dj, ev_times, side="left")
    n_t, d_t = n_jt.sum(0), d_jt.sum(0)
    exp_ = (n_jt * d_t / n_t).sum(1)
    obs = d_jt.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(n_t > 1, d_t * (n_t - d_t) / (n_t ** 2 * (n_t - 1)), 0.0)
    V = np.diag((w * n_jt * n_t).sum(1)) - (w * n_jt) @ n_jt.T
    diff = (obs - exp_)[:-1]
    Vr = V[:-1, :-1]
    try:
        stat = float(diff @ np.linalg.solve(Vr, diff))
    except np.linalg.LinAlgError:
        stat = float(diff @ np.linalg.pinv(Vr) @ diff)
    return stat, float(chi2.sf(stat, k - 1)), k - 1


def _median_from_curve(times: np.ndarray, s: np.ndarray) -> float:
    """First time the curve reaches 0.5 or below (lifelines' definition); inf if never."""
    hit = np.flatnonzero(s <= 0.5)
    return float(times[hit[0]]) if hit.size else float("inf")


def _rmst_from_curve(
    times: np.ndarray, s: np.ndarray, at_risk: np.ndarray, events: np.ndarray, horizon: float
) -> tuple[float, float]:
    """Exact area under the KM step function up to ``horizon`` and its Greenwood variance.

    Var = Σ_{t_j ≤ τ} A_j² d_j / (n_j (n_j − d_j)), A_j = ∫_{t_j}^{τ} S(u) du
    (Klein & Moeschberger, eq. 4.5.2). Exact sums, no numerical integration.
    """
    keep = times <= horizon
    tt, ss = times[keep], s[keep]
    edges = np.append(tt, horizon)
    pieces = ss * np.diff(edges)  # S is constant on [t_i, t_{i+1})
    area = float(pieces.sum())
    tail = np.cumsum(pieces[::-1])[::-1]  # ∫_{t_i}^{τ} S
    # A_j for an event at t_j uses the area from t_j onward, with S after the drop
    a = tail
    d = events[keep].astype(float)
    n = at_risk[keep].astype(float)
    ok = (d > 0) & (n > d)
    var = float(np.sum(a[ok] ** 2 * d[ok] / (n[ok] * (n[ok] - d[ok]))))
    return area, var


def rmst(
    table: pd.DataFrame,
    duration_col: str,
    event_col: str,
    horizon: float,
    *,
    group_col: str | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Restricted mean survival time up to ``horizon`` (per group if ``group_col``).

    RMST is the average event-free time within the first ``horizon`` time units: it
    stays defined when the median is not reached. Returns columns ``group``, ``rmst``,
    ``se``, ``ci_lower``, ``ci_upper`` (normal approximation), ``horizon``.
    """
    from scipy.stats import norm

    if not np.isfinite(horizon) or horizon <= 0:
        raise SurvivalAnalysisError("The RMST horizon must be a positive time.")
    extra = [group_col] if group_col else []
    df, _ = _clean_survival(table, duration_col, event_col, extra)
    z = norm.ppf(1 - alpha / 2)
    rows = []
    groups = [None] if group_col is None else _ordered_levels(df[group_col])
    for g in groups:
        sub = df if g is None else df[df[group_col] == g]
        c = _km_curve(sub[duration_col].to_numpy(), sub[event_col].to_numpy(), alpha)
        area, var = _rmst_from_curve(
            c["time"].to_numpy(), c["survival"].to_numpy(), c["at_risk"].to_numpy(),
            c["events"].to_numpy(), horizon,
        )
        se = float(np.sqrt(var))
        rows.append({"group": "all" if g is None else g, "rmst": area, "se": se,
                     "ci_lower": area - z * se, "ci_upper": area + z * se, "horizon": horizon})
    return pd.DataFrame(rows)


def _ordered_levels(s: pd.Series) -> list:
    """Category order for categoricals, else natural order (stage I < II, G1 < G2, text)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        present = set(s.dropna().unique())
        return [c for c in s.cat.categories if c in present]
    return natural_order(s)


# --------------------------------------------------------------------------- group comparison
@dataclass
class GroupComparison:
    """Result of :func:`compare_groups` (lifelines-style: a result object, not a tuple).

    Attributes
    ----------
    test_statistic, p_value, degrees_freedom
        Multi-group log-rank test (for two groups: the ordinary log-rank test).
    groups
        One row per group: ``n``, ``events``, ``censored``, ``median`` and its CI
        (``median_lower``, ``median_upper``; inf = not reached), and ``rmst``,
        ``rmst_se`` when a horizon was given.
    pairwise
        Pairwise log-rank tests: ``group_a``, ``group_b``, ``test_statistic``, ``p_value``,
        ``p_holm`` (Holm-corrected over all pairs).
    curves
        Long KM table (see :meth:`km_table`).
    warnings
        Plain-language caveats (e.g. a group without events); also shown on the page.
    notes
        What was left out and why (patients with a missing value).
    """

    duration_col: str
    event_col: str
    group_col: str
    alpha: float
    test_statistic: float
    p_value: float
    degrees_freedom: int
    groups: pd.DataFrame
    pairwise: pd.DataFrame
    curves: pd.DataFrame
    durations_by_group: dict = field(repr=False, default_factory=dict)
    horizon: float | None = None
    time_unit: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    title: str | None = None

    @property
    def n(self) -> int:
        return int(self.groups["n"].sum())

    @property
    def events(self) -> int:
        return int(self.groups["events"].sum())

    @property
    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"test_statistic": [self.test_statistic], "p": [self.p_value],
             "degrees_freedom": [self.degrees_freedom], "n": [self.n], "events": [self.events]},
            index=[f"log-rank ({self.group_col})"],
        )

    def __repr__(self) -> str:
        return (f"<GroupComparison {self.group_col!r}: {len(self.groups)} groups, n={self.n}, "
                f"events={self.events}, chi2={self.test_statistic:.3g}, p={self.p_value:.3g}>")

    def km_table(self) -> pd.DataFrame:
        """The KM curves as one long table (group, time, at_risk, events, censored,
        survival, ci_lower, ci_upper) for CSV export beside the figure."""
        return self.curves.copy()

    def at_risk_table(self, times: Sequence[float] | None = None) -> pd.DataFrame:
        """Numbers still at risk (time ≥ t) per group at the given times."""
        times = np.asarray(self.risk_times() if times is None else times, dtype=float)
        data = {}
        for g, t in self.durations_by_group.items():
            data[str(g)] = (t[:, None] >= times[None, :]).sum(axis=0)
        return pd.DataFrame(data, index=pd.Index(times, name="time")).T

    def risk_times(self) -> np.ndarray:
        """Round times from 0 to the last follow-up at which numbers at risk are shown."""
        tmax = max(float(t.max()) for t in self.durations_by_group.values())
        step = _nice_step(tmax / 6)
        return np.arange(0, tmax + 1e-9, step)

    def plot(self, *, show_ci: bool = True, show_censors: bool = True):
        """KM curves with CI bands, censor ticks and numbers at risk beneath (a plotly
        figure from :func:`ghist_core.viz.survival_plots.km_plot`)."""
        from ghist_core.viz.survival_plots import km_plot

        return km_plot(self, show_ci=show_ci, show_censors=show_censors)


def _nice_step(x: float) -> float:
    if x <= 0 or not np.isfinite(x):
        return 1.0
    mag = 10 ** np.floor(np.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= x:
            return float(m * mag)
    return float(10 * mag)


def compare_groups(
    table: pd.DataFrame,
    duration_col: str,
    event_col: str,
    group_col: str,
    *,
    alpha: float = 0.05,
    horizon: float | None = None,
    time_unit: str | None = None,
    min_group_size: int = 1,
    title: str | None = None,
) -> GroupComparison:
    """Kaplan–Meier per group, multi-group log-rank, pairwise log-rank (Holm), medians, RMST.

    Patients with a missing time, event or group are left out and counted in ``.notes``.
    A group without events is kept (its curve stays at 1) and named in ``.warnings``.

    Raises
    ------
    SurvivalAnalysisError
        fewer than two groups, no events at all, unusable times/events.
    """
    df, notes = _clean_survival(table, duration_col, event_col, [group_col])
    levels = _ordered_levels(df[group_col])
    sizes = df[group_col].value_counts()
    small = [g for g in levels if sizes.get(g, 0) < min_group_size]
    if small:
        notes.append(f"Groups with fewer than {min_group_size} patients left out: "
                     + ", ".join(f"{g} (n={sizes[g]})" for g in small) + ".")
        df = df[~df[group_col].isin(small)]
        levels = [g for g in levels if g not in small]
    if len(levels) < 2:
        only = f" (only {levels[0]!r})" if levels else ""
        raise SurvivalAnalysisError(
            f"Grouping by {group_col!r} gives fewer than two groups{only} among the "
            f"{len(df)} usable patients; a comparison needs at least two groups."
        )
    if int(df[event_col].sum()) == 0:
        raise SurvivalAnalysisError(
            f"All {len(df)} patients are censored (no {event_col!r} events), so survival "
            "cannot be compared. Pick another endpoint or check the event coding."
        )
    warn: list[str] = []
    t_all = df[duration_col].to_numpy()
    e_all = df[event_col].to_numpy()
    g_all = df[group_col].to_numpy()
    stat, pval, dof = _logrank(t_all, e_all, g_all, levels)
    rows, curves, by_group = [], [], {}
    for g in levels:
        m = g_all == g
        t, e = t_all[m], e_all[m]
        by_group[g] = t
        c = _km_curve(t, e, alpha)
        c.insert(0, "group", g)
        curves.append(c)
        ev = int(e.sum())
        if ev == 0:
            warn.append(f"Group {g!r} has no events among {int(m.sum())} patients: its curve "
                        "stays at 1 and its median is not reached; the test still includes it.")
        times, s = c["time"].to_numpy(), c["survival"].to_numpy()
        row = {"group": g, "n": int(m.sum()), "events": ev, "censored": int(m.sum()) - ev,
               "median": _median_from_curve(times, s),
               # CI of the median: where the CI band crosses 0.5 (Brookmeyer–Crowley style,
               # the same rule as lifelines.utils.median_survival_times)
               "median_lower": _median_from_curve(times, c["ci_lower"].to_numpy()),
               "median_upper": _median_from_curve(times, c["ci_upper"].to_numpy())}
        if horizon is not None:
            if horizon > t.max():
                warn.append(f"RMST horizon {horizon:g} is past the last follow-up in group {g!r} "
                            f"({t.max():g}); its RMST carries the last survival level forward. "
                            "Choose a horizon every group reaches.")
            area, var = _rmst_from_curve(times, s, c["at_risk"].to_numpy(),
                                         c["events"].to_numpy(), float(horizon))
            row["rmst"] = area
            row["rmst_se"] = float(np.sqrt(var))
        rows.append(row)
    groups = pd.DataFrame(rows)
    pw = []
    for i, a in enumerate(levels):
        for b in levels[i + 1 :]:
            ma, mb = g_all == a, g_all == b
            if e_all[ma | mb].sum() == 0:
                pw.append({"group_a": a, "group_b": b, "test_statistic": 0.0, "p_value": 1.0})
                continue
            if len(levels) == 2:  # the global test is this pair's test
                st_ab, p_ab = stat, pval
            else:
                mab = ma | mb
                st_ab, p_ab, _ = _logrank(t_all[mab], e_all[mab], g_all[mab], [a, b])
            pw.append({"group_a": a, "group_b": b, "test_statistic": st_ab, "p_value": p_ab})
    pairwise = pd.DataFrame(pw)
    pairwise["p_holm"] = holm(pairwise["p_value"].to_numpy())
    return GroupComparison(
        duration_col=duration_col, event_col=event_col, group_col=group_col, alpha=alpha,
        test_statistic=stat, p_value=pval, degrees_freedom=dof, groups=groups, pairwise=pairwise,
        curves=pd.concat(curves, ignore_index=True), durations_by_group=by_group,
        horizon=horizon, time_unit=time_unit, warnings=warn, notes=notes, title=title,
    )


# --------------------------------------------------------------------------- Cox
@dataclass
class CoxResult:
    """Result of :func:`fit_cox`.

    Attributes
    ----------
    summary
        One row per model term: ``covariate``, ``HR``, ``HR_lower``, ``HR_upper``
        (95% CI unless ``alpha`` said otherwise), ``p``, ``coef``, ``se``, and ``model``
        (``"multivariate"`` or the covariate's name for univariate fits).
    ph_check
        Proportional-hazards test per term (lifelines ``proportional_hazard_test``,
        rank-transformed time; Grambsch–Therneau): ``covariate``, ``test_statistic``,
        ``p``, ``model``. A small p means the hazard ratio changes over time.
    n, events, concordance
        Patients and events used, Harrell's C (per model: a dict for univariate fits).
    reference_levels
        For categorical covariates: the reference level the HRs are relative to.
    notes, warnings
        What was left out and why; caveats.
    """

    summary: pd.DataFrame
    ph_check: pd.DataFrame
    n: int
    events: int
    concordance: float | dict
    univariate: bool
    reference_levels: dict
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    strata: list[str] | None = None

    def __repr__(self) -> str:
        kind = "univariate" if self.univariate else "multivariate"
        return f"<CoxResult {kind}: {len(self.summary)} terms, n={self.n}, events={self.events}>"

    @property
    def any_estimable(self) -> bool:
        """Whether at least one hazard ratio could be estimated (else the forest plot is a message)."""
        return bool(self.summary.get("estimable", pd.Series(True, index=self.summary.index)).any())

    def reference_text(self) -> str:
        """The reference level of each categorical covariate, in words (empty if none)."""
        return "; ".join(f"{c}: hazard ratios relative to {c} = {lv} (HR = 1)"
                         for c, lv in self.reference_levels.items())

    def plot(self):
        """Forest plot of the hazard ratios (:func:`ghist_core.viz.survival_plots.forest_plot`)."""
        from ghist_core.viz.survival_plots import forest_plot

        return forest_plot(self)


#: A Cox coefficient with a larger standard error (log-HR units) is not estimable: it
#: comes from a group without events or perfect separation (HR → 0 or ∞).
_MAX_SE = 5.0


def _design(df: pd.DataFrame, covariates: Sequence[str], reference: Mapping[str, Any] | None = None
            ) -> tuple[pd.DataFrame, dict, list[str]]:
    """Numeric covariates as they are; others one-hot against their reference level:
    ``reference[c]`` when given, else the first level (category order, else natural order)."""
    parts, refs, terms = [], {}, []
    reference = dict(reference or {})
    for c in covariates:
        s = df[c]
        if not isinstance(s.dtype, pd.CategoricalDtype) and c not in reference:
            num = pd.to_numeric(s, errors="coerce")
            if num.notna().sum() == s.notna().sum():
                parts.append(num.rename(c).astype(float))
                terms.append(c)
                continue
        levels = _ordered_levels(s)
        if len(levels) < 2:
            raise SurvivalAnalysisError(
                f"Covariate {c!r} has a single value ({levels[0] if levels else 'none'}) "
                "among the patients used, so it cannot have a hazard ratio.")
        if c in reference:
            match = [lv for lv in levels if str(lv) == str(reference[c])]
            if not match:
                raise SurvivalAnalysisError(
                    f"The reference level {reference[c]!r} of {c!r} has no patients among those "
                    f"used; choose one of {', '.join(map(str, levels))}.")
            levels = match + [lv for lv in levels if lv is not match[0]]
        refs[c] = levels[0]
        for lv in levels[1:]:
            name = f"{c}={lv}"
            parts.append((s == lv).astype(float).rename(name))
            terms.append(name)
    return pd.concat(parts, axis=1), refs, terms


def _fit_one(df: pd.DataFrame, duration_col: str, event_col: str, covariates: Sequence[str],
             strata: list[str] | None, alpha: float, penalizer: float, label: str,
             reference: Mapping[str, Any] | None = None):
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    X, refs, terms = _design(df, covariates, reference)
    for t in terms:
        if X[t].nunique() < 2:
            raise SurvivalAnalysisError(f"Term {t!r} is constant among the patients used.")
    data = pd.concat([df[[duration_col, event_col]].reset_index(drop=True),
                      X.reset_index(drop=True)], axis=1)
    if strata:
        data = pd.concat([data, df[strata].reset_index(drop=True)], axis=1)
    cph = CoxPHFitter(alpha=alpha, penalizer=penalizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph.fit(data, duration_col=duration_col, event_col=event_col, strata=strata)
    except (ConvergenceError, np.linalg.LinAlgError, ValueError) as exc:
        raise SurvivalAnalysisError(
            f"The Cox model ({label}) did not converge: usually a covariate separates events "
            "perfectly, a group has no events, or there are too few events for the number "
            f"of covariates. Try fewer covariates or a small penalizer. ({exc.__class__.__name__})"
        ) from None
    s = cph.summary
    lo_col = [c for c in s.columns if c.startswith("exp(coef) lower")][0]
    hi_col = [c for c in s.columns if c.startswith("exp(coef) upper")][0]
    summ = pd.DataFrame({
        "covariate": s.index.astype(str), "HR": s["exp(coef)"].to_numpy(),
        "HR_lower": s[lo_col].to_numpy(), "HR_upper": s[hi_col].to_numpy(),
        "p": s["p"].to_numpy(), "coef": s["coef"].to_numpy(), "se": s["se(coef)"].to_numpy(),
        "model": label,
    })
    ph_df = ph_check(cph, data, duration_col, event_col, terms, label=label, strata=strata,
                     alpha=alpha, penalizer=penalizer)
    return summ, ph_df, refs, float(cph.concordance_index_)


#: Above this many patients the proportional-hazards check runs on a seeded random subsample
#: of this size (lifelines' scaled Schoenfeld residuals grow faster than n: 160k rows took
#: 18 s, 1e6 rows 313 s). 20,000 patients keep the test's power for any clinically
#: relevant departure; ``ph_check.attrs`` says when it was used.
PH_MAX_N = 20_000
PH_SUBSAMPLE_SEED = 0


def ph_check(cph, data: pd.DataFrame, duration_col: str, event_col: str, terms: Sequence[str], *,
             label: str = "", strata: list[str] | None = None, alpha: float = 0.05,
             penalizer: float = 0.0, max_n: int | None = None) -> pd.DataFrame:
    """Grambsch–Therneau proportional-hazards test per term (rank-transformed time).

    Bounded: with more than ``max_n`` rows (default :data:`PH_MAX_N`) the model is refitted on a random subsample of
    ``max_n`` rows (seed :data:`PH_SUBSAMPLE_SEED`) and tested there, so the check costs
    at most what it costs on ``max_n`` patients. ``attrs["subsample"]`` is then
    ``{"n": max_n, "of": len(data), "seed": ...}`` (else absent); ``attrs["error"]`` holds
    why the test could not be computed (statistics are NaN then: a diagnostic never fails
    the fit).
    """
    from lifelines import CoxPHFitter
    from lifelines.statistics import proportional_hazard_test

    max_n = PH_MAX_N if max_n is None else int(max_n)
    attrs: dict = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, rows = cph, data
            if len(data) > max_n:
                rows = data.sample(n=int(max_n), random_state=PH_SUBSAMPLE_SEED).sort_index()
                attrs["subsample"] = {"n": int(max_n), "of": int(len(data)), "seed": PH_SUBSAMPLE_SEED}
                model = CoxPHFitter(alpha=alpha, penalizer=penalizer).fit(
                    rows, duration_col=duration_col, event_col=event_col, strata=strata)
            ph = proportional_hazard_test(model, rows, time_transform="rank").summary
        ph_df = pd.DataFrame({"covariate": ph.index.astype(str),
                              "test_statistic": ph["test_statistic"].to_numpy(),
                              "p": ph["p"].to_numpy(), "model": label})
    except Exception as exc:  # PH test is a diagnostic: report, do not fail the fit
        ph_df = pd.DataFrame({"covariate": list(terms), "test_statistic": np.nan, "p": np.nan,
                              "model": label})
        attrs["error"] = str(exc)
    ph_df.attrs.update(attrs)
    return ph_df


def fit_cox(
    table: pd.DataFrame,
    duration_col: str,
    event_col: str,
    covariates: Sequence[str],
    *,
    strata: Sequence[str] | None = None,
    univariate: bool = False,
    alpha: float = 0.05,
    penalizer: float = 0.0,
    reference: Mapping[str, Any] | None = None,
) -> CoxResult:
    """Cox proportional-hazards model(s) with hazard ratios, CIs and the PH check.

    ``univariate=False`` fits one model with all covariates (each HR adjusted for the
    others); ``univariate=True`` fits one model per covariate. Text covariates are one-hot
    coded against a reference level: ``reference[covariate]`` when given (e.g. the group
    the user chose), else their first level (category order, else natural order: Stage I
    before Stage II, text order for nominal values); ``.reference_levels`` says which.
    Patients missing
    any covariate are left out and counted in ``.notes`` (for univariate fits the same
    complete-case set is used, so the models are comparable).
    """
    covariates = list(dict.fromkeys(covariates))
    if not covariates:
        raise SurvivalAnalysisError("Choose at least one covariate for the Cox model.")
    strata = list(strata) if strata else None
    df, notes = _clean_survival(table, duration_col, event_col, [*covariates, *(strata or [])])
    ev = int(df[event_col].sum())
    if ev == 0:
        raise SurvivalAnalysisError(
            f"All {len(df)} patients are censored; a Cox model needs events.")
    warn = []
    if ev < 10 * len(covariates) and not univariate:
        warn.append(f"Only {ev} events for {len(covariates)} covariate(s): fewer than ~10 events "
                    "per covariate makes hazard ratios unstable.")
    if univariate:
        res = [_fit_one(df, duration_col, event_col, [c], strata, alpha, penalizer, c, reference)
               for c in covariates]
        summ = pd.concat([r[0] for r in res], ignore_index=True)
        ph = pd.concat([r[1] for r in res], ignore_index=True)
        refs = {k: v for r in res for k, v in r[2].items()}
        conc: float | dict = {c: r[3] for c, r in zip(covariates, res)}
    else:
        summ, ph, refs, conc = _fit_one(df, duration_col, event_col, covariates, strata,
                                        alpha, penalizer, "multivariate", reference)
    summ["estimable"] = (summ["se"] < _MAX_SE) & np.isfinite(summ["HR_upper"])
    if not summ["estimable"].all():
        warn.append("No usable hazard ratio for: " + ", ".join(summ.loc[~summ["estimable"],
                    "covariate"]) + " (a group without events, or a covariate that separates "
                    "events perfectly); it is left off the forest plot.")
    sub = next((r[1].attrs["subsample"] for r in (res if univariate else [(None, ph)])
                if "subsample" in r[1].attrs), None)
    if sub:
        ph.attrs["subsample"] = sub
        notes.append(f"Proportional-hazards check on a random subsample of {sub['n']:,} of "
                     f"{sub['of']:,} patients (seed {sub['seed']}), to keep it fast.")
    bad_ph = ph.loc[ph["p"] < 0.05, "covariate"].tolist()
    if bad_ph:
        warn.append("Proportional-hazards assumption questionable (p < 0.05) for: "
                    + ", ".join(bad_ph) + ". Consider stratifying on it or reporting RMST.")
    return CoxResult(summary=summ, ph_check=ph, n=len(df), events=ev, concordance=conc,
                     univariate=univariate, reference_levels=refs, alpha=alpha, notes=notes,
                     warnings=warn, strata=strata)
