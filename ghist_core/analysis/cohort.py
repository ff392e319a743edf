"""Cohort analysis: predicted slides → patient features → risk groups → survival.

Why: GHIST's clinical claim is that what it predicts from H&E (cell-type composition,
neighbourhoods, expression) separates patients by outcome. This module turns a project's
predicted slides into one row per patient, joins them to a clinical table (saying who
was dropped and why), forms risk groups by a recorded rule, and compares groups.

Survival statistics live in :mod:`ghist_core.analysis.survival` and clinical import in
:mod:`ghist_core.analysis.clinical`; the names a caller needs are re-exported here::

    from ghist_core.analysis.cohort import compare_groups, fit_cox, make_risk_groups, SplitAtQuantiles
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ghist_core.analysis.clinical import (  # noqa: F401  (re-exported)
    ColumnMapping,
    SurvivalTable,
    guess_mapping,
    load_demo_clinical,
    pseudonymise_ids,
    read_clinical_table,
    safe_csv_bytes,
    validate_survival,
)
from ghist_core.errors import SurvivalAnalysisError, UnknownGeneError
from ghist_core.analysis.survival import (  # noqa: F401  (re-exported)
    OKABE_ITO,
    PLOTLY_EXPORT_CONFIG,
    PLOTLY_EXPORT_CONFIG_PNG,
    CoxResult,
    GroupComparison,
    compare_groups,
    fit_cox,
    group_colours,
    rmst,
)

__all__ = [
    # patient features and joining
    "POOLING_RULE", "patient_features", "feature_columns", "join_clinical", "JoinResult",
    "tcga_patient_id", "predicted_slides_from_project",
    # risk groups and comparisons
    "ByVariable", "SplitAtQuantiles", "Threshold", "KMeansClusters", "make_risk_groups",
    "RiskGroups", "compare_features", "FeatureComparison",
    # re-exported from ghist_core.analysis.survival
    "compare_groups", "GroupComparison", "fit_cox", "CoxResult", "rmst", "group_colours",
    "OKABE_ITO", "PLOTLY_EXPORT_CONFIG", "PLOTLY_EXPORT_CONFIG_PNG",
    # re-exported from ghist_core.analysis.clinical
    "read_clinical_table", "guess_mapping", "validate_survival", "ColumnMapping",
    "SurvivalTable", "load_demo_clinical", "safe_csv_bytes", "pseudonymise_ids",
]

#: Rule used to combine several slides of one patient (shown in the UI).
POOLING_RULE = (
    "Several slides of one patient are pooled: their cells are counted together, so "
    "proportions are (cells of a type over all the patient's cells) and means are over all "
    "the patient's cells — a slide with more cells weighs more."
)

SlideLike = Any  # anndata.AnnData or a path to an .h5ad file


# --------------------------------------------------------------------------- patient features
def _pairs(slides) -> list[tuple[str, SlideLike]]:
    if isinstance(slides, Mapping):
        out = []
        for pid, v in slides.items():
            many = v if isinstance(v, (list, tuple)) else [v]
            out.extend((str(pid), s) for s in many)
        return out
    out = []
    for item in slides:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise SurvivalAnalysisError(
                "patient_features needs (patient_id, slide) pairs or a {patient_id: slides} "
                "mapping.")
        out.append((str(item[0]), item[1]))
    return out


def _open(slide: SlideLike):
    import anndata as ad

    if isinstance(slide, (str, os.PathLike)):
        p = Path(slide)
        if not p.is_file():
            raise SurvivalAnalysisError(f"Predicted slide {str(p)!r} not found.")
        return ad.read_h5ad(p, backed="r"), str(p.name)
    return slide, "in-memory slide"


def _column_sums(X, idx: np.ndarray) -> np.ndarray:
    sub = X[:, idx]
    if hasattr(sub, "toarray"):
        sub = sub.toarray()
    return np.asarray(sub, dtype=np.float64).sum(axis=0).ravel()


def patient_features(
    slides,
    *,
    genes: Sequence[str] = (),
    signatures: Mapping[str, Sequence[str]] | None = None,
    cell_type_key: str = "cell_type",
) -> pd.DataFrame:
    """One row per patient from predicted slides (AnnData or .h5ad paths).

    ``slides`` is a ``{patient_id: slide or [slides]}`` mapping or ``(patient_id, slide)``
    pairs. Several slides of one patient are pooled (see :data:`POOLING_RULE`).

    Returns a DataFrame indexed by ``patient_id`` with ``n_slides``, ``n_cells``,
    ``prop_<type>`` (fraction of the patient's cells of that ``obs[cell_type_key]``),
    ``nbhd_<type>`` (mean of the per-cell neighbourhood fraction ``obs["nbhd_<type>"]``),
    ``expr_<gene>`` (mean predicted expression) and ``sig_<name>`` (mean over cells of the
    per-cell mean of the signature's genes). A patient whose slides have no cells keeps a
    row with ``n_cells`` 0 and missing features (listed in ``attrs["notes"]``).
    """
    pairs = _pairs(slides)
    if not pairs:
        raise SurvivalAnalysisError("No predicted slides were given.")
    signatures = dict(signatures or {})
    all_genes = list(dict.fromkeys([*genes, *(g for gs in signatures.values() for g in gs)]))
    acc: dict[str, dict] = {}
    notes: list[str] = []
    for pid, slide in pairs:
        adata, label = _open(slide)
        try:
            a = acc.setdefault(pid, {"n_slides": 0, "n_cells": 0, "types": {}, "nbhd": {},
                                     "genes": np.zeros(len(all_genes))})
            a["n_slides"] += 1
            n = adata.n_obs
            a["n_cells"] += n
            if n == 0:
                notes.append(f"{label} of patient {pid} has no cells.")
                continue
            if cell_type_key in adata.obs:
                vc = adata.obs[cell_type_key].astype(str).value_counts()
                for t, k in vc.items():
                    a["types"][t] = a["types"].get(t, 0) + int(k)
            nb_cols = [c for c in adata.obs.columns if str(c).startswith("nbhd_")]
            if nb_cols:
                sums = adata.obs[nb_cols].astype(float).sum(axis=0)
                for c, v in sums.items():
                    a["nbhd"][c] = a["nbhd"].get(c, 0.0) + float(v)
            if all_genes:
                names = pd.Index(adata.var_names.astype(str))
                missing = [g for g in all_genes if g not in names]
                if missing:
                    raise UnknownGeneError(
                        f"{label} (patient {pid}) has no prediction for: "
                        f"{', '.join(missing[:10])}. Choose genes the model predicts.")
                idx = names.get_indexer(all_genes)
                order = np.argsort(idx)  # backed h5ad needs increasing indices
                sums = np.empty(len(all_genes))
                sums[order] = _column_sums(adata.X, idx[order])
                a["genes"] += sums
        finally:
            if getattr(adata, "isbacked", False):
                adata.file.close()
    types = sorted({t for a in acc.values() for t in a["types"]})
    nbhds = sorted({c for a in acc.values() for c in a["nbhd"]})
    rows = {}
    for pid, a in acc.items():
        n = a["n_cells"]
        row: dict[str, float] = {"n_slides": a["n_slides"], "n_cells": n}
        total_typed = sum(a["types"].values())
        for t in types:
            row[f"prop_{t}"] = a["types"].get(t, 0) / total_typed if total_typed else np.nan
        for c in nbhds:
            row[c] = a["nbhd"].get(c, 0.0) / n if n else np.nan
        means = a["genes"] / n if n else np.full(len(all_genes), np.nan)
        for g in genes:
            row[f"expr_{g}"] = means[all_genes.index(g)]
        for name, gs in signatures.items():
            row[f"sig_{name}"] = float(np.mean([means[all_genes.index(g)] for g in gs]))
        rows[pid] = row
        if n == 0:
            notes.append(f"Patient {pid} has no cells in any slide: features are missing.")
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "patient_id"
    out["n_slides"] = out["n_slides"].astype(int)
    out["n_cells"] = out["n_cells"].astype(int)
    out.attrs["notes"] = notes
    out.attrs["pooling_rule"] = POOLING_RULE
    return out


def feature_columns(features: pd.DataFrame) -> list[str]:
    """Columns of a patient-feature table that can be grouped or compared."""
    return [c for c in features.columns if str(c).startswith(("prop_", "nbhd_", "expr_", "sig_"))]


def tcga_patient_id(slide_or_sample_id: str) -> str:
    """TCGA slide/sample barcode → patient barcode (first 12 characters, upper case)."""
    return str(slide_or_sample_id).strip().upper()[:12]


@dataclass
class JoinResult:
    """Clinical rows joined to patient features.

    Attributes: ``table`` (one row per patient with both), ``clinical_without_slides`` and
    ``slides_without_clinical`` (patient ids), ``messages`` (plain-language report).
    """

    table: pd.DataFrame
    clinical_without_slides: list[str]
    slides_without_clinical: list[str]
    messages: list[str]
    n_clinical: int
    n_features: int

    @property
    def n(self) -> int:
        return len(self.table)


def join_clinical(
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    id_col: str = "patient_id",
    *,
    id_transform: Callable[[str], str] | None = None,
) -> JoinResult:
    """Inner-join patient features (indexed by patient id) to a clinical table.

    Ids are compared after stripping spaces (and ``id_transform``, e.g.
    :func:`tcga_patient_id`, on both sides). Nobody is dropped silently: the result lists
    clinical patients without slides and slide patients without clinical data.
    """
    if id_col not in clinical.columns:
        raise SurvivalAnalysisError(f"The clinical table has no {id_col!r} column.")
    norm = (lambda s: id_transform(str(s).strip())) if id_transform else (lambda s: str(s).strip())
    cl = clinical.copy()
    cl["_pid"] = cl[id_col].map(norm)
    feat = features.copy()
    feat.index = feat.index.map(norm)
    if feat.index.duplicated().any():
        raise SurvivalAnalysisError(
            "Several feature rows map to the same patient id after normalisation: "
            + ", ".join(feat.index[feat.index.duplicated()].unique()[:5]))
    if cl["_pid"].duplicated().any():
        raise SurvivalAnalysisError(
            "The clinical table has duplicate patient ids: "
            + ", ".join(cl.loc[cl["_pid"].duplicated(), "_pid"].unique()[:5])
            + ". Validate it first (duplicates are resolved there).")
    clash = [c for c in feat.columns if c in cl.columns]
    feat = feat.rename(columns={c: f"{c}_slide" for c in clash})
    table = cl.merge(feat, left_on="_pid", right_index=True, how="inner")
    table[id_col] = table["_pid"]
    table = table.drop(columns="_pid").reset_index(drop=True)
    no_slide = sorted(set(cl["_pid"]) - set(feat.index))
    no_clin = sorted(set(feat.index) - set(cl["_pid"]))
    msgs = [f"{len(table)} patients have both clinical data and predicted slides "
            f"({len(cl)} in the clinical table, {len(feat)} with slides)."]
    if no_slide:
        msgs.append(f"{len(no_slide)} clinical patient(s) have no predicted slide and are not in "
                    f"composition-based analyses (e.g. {', '.join(no_slide[:3])}).")
    if no_clin:
        msgs.append(f"{len(no_clin)} patient(s) with slides are not in the clinical table "
                    f"(e.g. {', '.join(no_clin[:3])}); check the ids match.")
    if table.empty:
        msgs.append("No patient matched: check that the patient id column holds the same ids "
                    "as the slides' patient ids.")
    return JoinResult(table=table, clinical_without_slides=no_slide,
                      slides_without_clinical=no_clin, messages=msgs, n_clinical=len(cl),
                      n_features=len(feat))


# --------------------------------------------------------------------------- risk-group rules
@dataclass(frozen=True)
class ByVariable:
    """Groups are the values of a clinical (or any) column, optionally a chosen subset."""

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
            vals = s.dropna().unique().tolist()
            try:
                cats = sorted(vals)
            except TypeError:
                cats = sorted(vals, key=str)
        groups = pd.Categorical(s, categories=cats, ordered=True)
    elif isinstance(rule, SplitAtQuantiles):
        x = _numeric(df, rule.column)
        k = rule.n_groups
        if k < 2:
            raise SurvivalAnalysisError("A quantile split needs at least 2 groups.")
        labels = {2: ["low", "high"], 3: ["low", "mid", "high"]}.get(k, [f"Q{i + 1}" for i in range(k)])
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


# --------------------------------------------------------------------------- feature comparison
@dataclass
class FeatureComparison:
    """Per-feature test between groups: ``table`` with ``feature``, ``test``
    (Mann–Whitney U for 2 groups, Kruskal–Wallis for more), ``statistic``, ``p``,
    ``q_bh`` (Benjamini–Hochberg FDR over the features tested), ``median_<group>``."""

    table: pd.DataFrame
    group_col: str
    data: pd.DataFrame = field(repr=False)
    levels: list = field(default_factory=list)

    def plot(self, top: int = 6) -> go.Figure:
        """Box plot (with points) per group for the ``top`` features by q-value."""
        feats = self.table.sort_values("q_bh")["feature"].head(top).tolist()
        if not feats:
            return go.Figure()
        cols = min(3, len(feats))
        rows = int(np.ceil(len(feats) / cols))
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[
            f"{f} (q={q:.2g})" for f, q in
            zip(feats, self.table.set_index("feature").loc[feats, "q_bh"])])
        colours = group_colours(self.levels)
        for i, f in enumerate(feats):
            r, c = i // cols + 1, i % cols + 1
            for g in self.levels:
                y = self.data.loc[self.data[self.group_col] == g, f]
                fig.add_trace(go.Box(y=y, name=str(g), marker_color=colours[g],
                                     boxpoints="all", jitter=0.3, pointpos=0,
                                     showlegend=(i == 0), legendgroup=str(g)), row=r, col=c)
        fig.update_layout(template="simple_white", height=300 * rows,
                          title=f"Patient features by {self.group_col}")
        return fig


def compare_features(table: pd.DataFrame, group_col: str, features: Sequence[str]
                     ) -> FeatureComparison:
    """Does each feature differ between groups? Rank tests (no normality assumption),
    BH-FDR across features. Patients without a group are left out."""
    from scipy.stats import false_discovery_control, kruskal, mannwhitneyu

    if group_col not in table.columns:
        raise SurvivalAnalysisError(f"Column {group_col!r} is not in the table.")
    df = table[table[group_col].notna()]
    s = df[group_col]
    if isinstance(s.dtype, pd.CategoricalDtype):
        levels = [c for c in s.cat.categories if (s == c).any()]
    else:
        levels = sorted(s.unique().tolist(), key=str)
    if len(levels) < 2:
        raise SurvivalAnalysisError("Comparing features needs at least two groups.")
    rows = []
    for f in features:
        x = pd.to_numeric(df[f], errors="coerce")
        samples = [x[s == g].dropna().to_numpy() for g in levels]
        row: dict[str, Any] = {"feature": f}
        if any(len(v) == 0 for v in samples) or np.ptp(np.concatenate(samples)) == 0:
            row.update(test="not tested (empty group or constant)", statistic=np.nan, p=np.nan)
        elif len(levels) == 2:
            r = mannwhitneyu(samples[0], samples[1], alternative="two-sided")
            row.update(test="Mann–Whitney U", statistic=float(r.statistic), p=float(r.pvalue))
        else:
            r = kruskal(*samples)
            row.update(test="Kruskal–Wallis H", statistic=float(r.statistic), p=float(r.pvalue))
        for g, v in zip(levels, samples):
            row[f"median_{g}"] = float(np.median(v)) if len(v) else np.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    ok = out["p"].notna()
    out["q_bh"] = np.nan
    if ok.any():
        out.loc[ok, "q_bh"] = false_discovery_control(out.loc[ok, "p"].to_numpy(), method="bh")
    out = out.sort_values("p", na_position="last").reset_index(drop=True)
    return FeatureComparison(table=out, group_col=group_col,
                             data=df[[group_col, *features]].copy(), levels=levels)


# --------------------------------------------------------------------------- project store glue
def predicted_slides_from_project(project) -> tuple[list[tuple[str, Path]], list[str]]:
    """(patient_id, .h5ad path) for every slide of a ``ghist_core.project.store.Project`` with a
    finished run, plus notes on slides that could not be used (no patient id, no run).

    Reads the store through its public calls (``list_slides``, ``latest_run``,
    ``result_files``) and accepts records as DataFrame rows, dicts or objects."""
    slides = project.list_slides()
    records = slides.to_dict("records") if isinstance(slides, pd.DataFrame) else list(slides or [])
    pairs: list[tuple[str, Path]] = []
    notes: list[str] = []

    def get(rec, k):
        v = rec.get(k) if isinstance(rec, Mapping) else getattr(rec, k, None)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    for rec in records:
        sid = get(rec, "slide_id")
        pid = get(rec, "patient_id")
        name = get(rec, "original_name") or get(rec, "name") or f"slide {sid}"
        if not pid:
            notes.append(f"Slide {name} has no patient id; set one to use it here.")
            continue
        try:
            run = project.latest_run(sid, status="finished")
        except TypeError:
            run = project.latest_run(sid)
        if run is None or (get(run, "status") or "finished") != "finished":
            notes.append(f"Slide {name} (patient {pid}) has no finished prediction.")
            continue
        files = project.result_files(get(run, "run_id"))
        if isinstance(files, Mapping):
            h5 = [Path(files["h5ad"])] if "h5ad" in files else []
        else:
            h5 = [Path(p) for p in (files or []) if str(p).endswith(".h5ad")]
        if not h5 or not h5[0].is_file():
            notes.append(f"Slide {name} (patient {pid}) has no .h5ad result file.")
            continue
        pairs.append((str(pid), h5[0]))
    return pairs, notes
