"""Patient features from predicted slides, with ONE rule for pooling a patient's slides.

Why one rule: a patient with two slides must get the same number on every page. Each
slide is first reduced to sums over its cells (:class:`SlideSummary`); a patient adds the
sums of all their slides and divides by all their cells (:data:`POOLING_RULE`). Pages
cache the per-slide summaries and call :func:`patient_features`,
:func:`patient_expression` or :func:`cell_type_counts` on them::

    feats = patient_features([("P1", "a.h5ad"), ("P1", "b.h5ad"), ("P2", adata)], genes=["ERBB2"])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from ghist_core._keys import OBS_CELL_TYPE, neighbourhood_composition
from ghist_core.errors import SurvivalAnalysisError, UnknownGeneError
from ghist_core.project.runs import RunStatus

__all__ = [
    "POOLING_RULE", "SlideSummary", "summarise_slide", "patient_features", "patient_expression",
    "cell_type_counts", "neighbourhood_by_type", "feature_columns", "join_clinical", "JoinResult",
    "tcga_patient_id", "predicted_slides_from_project",
]

#: The one rule that combines several slides of one patient (shown in the UI).
POOLING_RULE = (
    "Several slides of one patient are pooled: their cells are counted together, so "
    "proportions are (cells of a type over all the patient's cells) and means are over all "
    "the patient's cells — a slide with more cells weighs more."
)

#: An AnnData, a path to an .h5ad file (read backed), or an already computed SlideSummary.
SlideLike = Any

#: Rows read at once when summing a slide's expression (bounded memory on big slides).
_ROW_BLOCK = 65_536


@dataclass
class SlideSummary:
    """Sums over one predicted slide's cells: all that pooling slides into a patient needs.

    Attributes
    ----------
    label : where it came from (file name), for messages.
    n_cells : number of cells.
    type_counts : cells per ``obs["cell_type"]`` value.
    nbhd_sums : per type, the sum over cells of the neighbourhood fraction of that type.
    gene_sums : per gene, the sum over cells of the predicted expression (float64).
    """

    label: str
    n_cells: int
    type_counts: pd.Series
    nbhd_sums: pd.Series
    gene_sums: pd.Series


def _column_sums(X, idx: np.ndarray, n_rows: int) -> np.ndarray:
    """Float64 column sums of ``X[:, idx]`` (``idx`` increasing), a block of rows at a time."""
    out = np.zeros(len(idx))
    every = len(idx) == X.shape[1] and np.array_equal(idx, np.arange(len(idx)))
    for r0 in range(0, n_rows, _ROW_BLOCK):  # a few blocks per slide, not a loop over cells
        sub = X[r0:r0 + _ROW_BLOCK]
        sub = sub if every else sub[:, idx]
        if hasattr(sub, "toarray"):
            sub = sub.toarray()
        out += np.asarray(sub, dtype=np.float64).sum(axis=0).ravel()
    return out


def summarise_slide(slide: SlideLike, *, genes: Sequence[str] | None = None,
                    cell_type_key: str = OBS_CELL_TYPE) -> SlideSummary:
    """Reduce one predicted slide (AnnData or .h5ad path) to the sums pooling needs.

    ``genes=None`` sums every gene; otherwise only those (``UnknownGeneError`` names the
    ones the slide does not predict). Neighbourhoods are read through
    :func:`ghist_core._keys.neighbourhood_composition` (either result layout).
    """
    if isinstance(slide, SlideSummary):
        return slide
    import anndata as ad

    if isinstance(slide, (str, os.PathLike)):
        p = Path(slide)
        if not p.is_file():
            raise SurvivalAnalysisError(f"Predicted slide {str(p)!r} not found.")
        adata, label = ad.read_h5ad(p, backed="r"), p.name
    else:
        adata, label = slide, "in-memory slide"
    try:
        names = pd.Index(adata.var_names.astype(str))
        wanted = list(names) if genes is None else list(dict.fromkeys(map(str, genes)))
        missing = [g for g in wanted if g not in names]
        if missing:
            raise UnknownGeneError(f"{label} has no prediction for: {', '.join(missing[:10])}. "
                                   "Choose genes the model predicts.")
        idx = names.get_indexer(wanted)
        order = np.argsort(idx)  # backed h5ad needs increasing indices
        sums = np.empty(len(wanted))
        sums[order] = _column_sums(adata.X, idx[order], adata.n_obs) if wanted else []
        if cell_type_key in adata.obs:
            counts = adata.obs[cell_type_key].astype(str).value_counts().astype(np.int64)
        else:
            counts = pd.Series(dtype=np.int64)
        nbhd = neighbourhood_composition(adata)
        nbhd_sums = pd.Series(nbhd.to_numpy(np.float64).sum(axis=0), index=nbhd.columns.astype(str))
        return SlideSummary(label=label, n_cells=int(adata.n_obs), type_counts=counts,
                            nbhd_sums=nbhd_sums, gene_sums=pd.Series(sums, index=wanted))
    finally:
        if getattr(adata, "isbacked", False):
            adata.file.close()


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
                "Patient features need (patient_id, slide) pairs or a {patient_id: slides} "
                "mapping.")
        out.append((str(item[0]), item[1]))
    if not out:
        raise SurvivalAnalysisError("No predicted slides were given.")
    return out


@dataclass
class _Patient:
    n_slides: int = 0
    n_cells: int = 0
    types: pd.Series = field(default_factory=lambda: pd.Series(dtype=np.int64))
    nbhd: pd.Series = field(default_factory=lambda: pd.Series(dtype=float))
    genes: pd.Series | None = None

    def add(self, s: SlideSummary) -> None:
        """The pooling rule: add every sum; means are taken once, over all cells."""
        self.n_slides += 1
        self.n_cells += s.n_cells
        self.types = self.types.add(s.type_counts, fill_value=0)
        self.nbhd = self.nbhd.add(s.nbhd_sums, fill_value=0)
        # a gene one slide does not predict has no patient mean (NaN), never a partial one
        self.genes = s.gene_sums.copy() if self.genes is None else self.genes.add(s.gene_sums)


def _pool(slides, genes: Sequence[str] | None, cell_type_key: str, notes: list[str]
          ) -> dict[str, _Patient]:
    acc: dict[str, _Patient] = {}
    for pid, slide in _pairs(slides):
        try:
            s = summarise_slide(slide, genes=genes, cell_type_key=cell_type_key)
        except UnknownGeneError as exc:
            raise UnknownGeneError(f"Patient {pid}: {exc}") from None
        if s.n_cells == 0:
            notes.append(f"{s.label} of patient {pid} has no cells.")
        acc.setdefault(pid, _Patient()).add(s)
    return acc


def _means(p: _Patient, genes: Sequence[str]) -> np.ndarray:
    if not p.n_cells:
        return np.full(len(genes), np.nan)
    return p.genes.reindex(list(genes)).to_numpy(float) / p.n_cells


def patient_features(
    slides,
    *,
    genes: Sequence[str] = (),
    signatures: Mapping[str, Sequence[str]] | None = None,
    cell_type_key: str = OBS_CELL_TYPE,
) -> pd.DataFrame:
    """One row per patient from predicted slides, pooled by :data:`POOLING_RULE`.

    ``slides`` is a ``{patient_id: slide or [slides]}`` mapping or ``(patient_id, slide)``
    pairs; a slide is an AnnData, an .h5ad path or a :class:`SlideSummary`. A patient's
    slides are pooled cell by cell: every number below is over all the patient's cells
    (a slide of 3,000 cells weighs three times one of 1,000), never a mean of slide means.

    Returns a DataFrame indexed by ``patient_id`` with ``n_slides``, ``n_cells``,
    ``prop_<type>`` (fraction of the patient's cells of that ``obs[cell_type_key]``),
    ``nbhd_<type>`` (mean of the per-cell neighbourhood fraction of that type),
    ``expr_<gene>`` (mean predicted expression) and ``sig_<name>`` (mean over the
    signature's genes of their patient means). A patient whose slides have no cells keeps a
    row with ``n_cells`` 0 and missing features (listed in ``attrs["notes"]``).
    """
    signatures = dict(signatures or {})
    all_genes = list(dict.fromkeys([*genes, *(g for gs in signatures.values() for g in gs)]))
    notes: list[str] = []
    acc = _pool(slides, all_genes, cell_type_key, notes)
    types = sorted({t for p in acc.values() for t in p.types.index})
    nbhds = sorted({t for p in acc.values() for t in p.nbhd.index})
    rows = {}
    for pid, p in acc.items():
        n = p.n_cells
        row: dict[str, float] = {"n_slides": p.n_slides, "n_cells": n}
        total_typed = float(p.types.sum())
        for t in types:
            row[f"prop_{t}"] = p.types.get(t, 0) / total_typed if total_typed else np.nan
        for t in nbhds:
            row[f"nbhd_{t}"] = p.nbhd.get(t, 0.0) / n if n else np.nan
        means = dict(zip(all_genes, _means(p, all_genes)))
        for g in genes:
            row[f"expr_{g}"] = means[g]
        for name, gs in signatures.items():
            row[f"sig_{name}"] = float(np.mean([means[g] for g in gs]))
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


def patient_expression(slides, *, genes: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean predicted expression per patient (rows) and gene (columns), by :data:`POOLING_RULE`.

    The same numbers as :func:`patient_features`' ``expr_<gene>`` (same pooling), for every
    gene at once (``genes=None``); a gene that one of a patient's slides does not predict
    is NaN for that patient. ``attrs["n_cells"]`` holds each patient's cell count.
    """
    notes: list[str] = []
    acc = _pool(slides, genes, OBS_CELL_TYPE, notes)
    cols = list(genes) if genes is not None else list(dict.fromkeys(
        g for p in acc.values() for g in p.genes.index))
    out = pd.DataFrame({pid: _means(p, cols) for pid, p in acc.items()}, index=cols).T
    out.index.name = "patient_id"
    out.attrs["n_cells"] = {pid: p.n_cells for pid, p in acc.items()}
    out.attrs["notes"] = notes
    out.attrs["pooling_rule"] = POOLING_RULE
    return out


def cell_type_counts(slides: Sequence[tuple[str, str, SlideLike]], *,
                     per: Literal["slide", "patient"] = "slide") -> pd.DataFrame:
    """Cells of each type (columns, sorted) per slide or per patient.

    ``slides`` are ``(patient_id, slide_label, slide)`` triples. ``per="slide"`` indexes rows
    by ``(patient, slide)``; ``per="patient"`` pools each patient's slides
    (:data:`POOLING_RULE`: counts add up).
    """
    rows, keys = [], []
    for pid, label, slide in slides:
        rows.append(summarise_slide(slide, genes=[]).type_counts)
        keys.append((str(pid), str(label)))
    if not rows:
        raise SurvivalAnalysisError("No predicted slides were given.")
    counts = pd.DataFrame(rows).fillna(0).astype(np.int64)
    counts = counts[sorted(counts.columns)]
    counts.index = pd.MultiIndex.from_tuples(keys, names=["patient", "slide"])
    if per == "patient":
        counts = counts.groupby(level="patient").sum()
    elif per != "slide":
        raise ValueError(f"per must be 'slide' or 'patient', not {per!r}.")
    return counts


def neighbourhood_by_type(adata, *, cell_type_key: str = OBS_CELL_TYPE) -> pd.DataFrame:
    """Mean neighbourhood fraction (%) of each neighbour type (columns) around each cell
    type (rows) on one slide; raises ``ValueError`` when the prediction has none."""
    nb = neighbourhood_composition(adata)
    if nb.shape[1] == 0:
        raise ValueError("This prediction has no neighbourhood composition.")
    types = adata.obs[cell_type_key].astype(str).to_numpy()
    return nb.groupby(types, sort=True).mean() * 100


def feature_columns(features: pd.DataFrame) -> list[str]:
    """Columns of a patient-feature table that can be grouped or compared."""
    return [c for c in features.columns if str(c).startswith(("prop_", "nbhd_", "expr_", "sig_"))]


def tcga_patient_id(slide_or_sample_id: str) -> str:
    """TCGA slide/sample barcode → patient barcode (first 12 characters, upper case)."""
    return str(slide_or_sample_id).strip().upper()[:12]


@dataclass
class JoinResult:
    """Clinical rows joined to patient features.

    Attributes: ``table`` (one row per patient with both; with ``keep_all_clinical`` one row
    per clinical patient, features empty for those without slides), ``clinical_without_slides``
    and ``slides_without_clinical`` (patient ids), ``messages`` (plain-language report).
    """

    table: pd.DataFrame
    clinical_without_slides: list[str]
    slides_without_clinical: list[str]
    messages: list[str]
    n_clinical: int
    n_features: int

    @property
    def n(self) -> int:
        """Patients with both clinical data and predicted slides."""
        return self.n_clinical - len(self.clinical_without_slides)

    @property
    def feature_scope(self) -> str:
        """Who groups and tests from predicted features can use, for the page to say under
        such a grouping (clinical groupings keep every clinical patient)."""
        if not self.clinical_without_slides:
            return f"All {self.n} patients have predicted slides."
        return (f"Groups from predicted features use only the {self.n} of {self.n_clinical} "
                f"patients with predicted slides ({len(self.clinical_without_slides)} without a "
                "slide left out; clinical groupings keep every patient).")


def join_clinical(
    features: pd.DataFrame,
    clinical: pd.DataFrame,
    id_col: str = "patient_id",
    *,
    id_transform: Callable[[str], str] | None = None,
    keep_all_clinical: bool = False,
) -> JoinResult:
    """Join patient features (indexed by patient id) to a clinical table: patients with both,
    or with ``keep_all_clinical`` every clinical patient (features empty without a slide).

    Why keep them: groupings by a clinical variable must count every clinical patient, while
    groups from predicted features leave out, by their missing values, those without slides.
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
    table = cl.merge(feat, left_on="_pid", right_index=True,
                     how="left" if keep_all_clinical else "inner")
    table[id_col] = table["_pid"]
    table = table.drop(columns="_pid").reset_index(drop=True)
    no_slide = sorted(set(cl["_pid"]) - set(feat.index))
    no_clin = sorted(set(feat.index) - set(cl["_pid"]))
    n_both = len(cl) - len(no_slide)
    msgs = [f"{n_both} patients have both clinical data and predicted slides "
            f"({len(cl)} in the clinical table, {len(feat)} with slides)."]
    if no_slide:
        kept = "are kept for clinical groupings but are " if keep_all_clinical else "are "
        msgs.append(f"{len(no_slide)} clinical patient(s) have no predicted slide and {kept}not "
                    f"in composition-based analyses (e.g. {', '.join(no_slide[:3])}).")
    if no_clin:
        msgs.append(f"{len(no_clin)} patient(s) with slides are not in the clinical table "
                    f"(e.g. {', '.join(no_clin[:3])}); check the ids match.")
    if not n_both:
        msgs.append("No patient matched: check that the patient id column holds the same ids "
                    "as the slides' patient ids.")
    return JoinResult(table=table, clinical_without_slides=no_slide,
                      slides_without_clinical=no_clin, messages=msgs, n_clinical=len(cl),
                      n_features=len(feat))



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
            run = project.latest_run(sid, status=RunStatus.FINISHED)
        except TypeError:
            run = project.latest_run(sid)
        if run is None or (get(run, "status") or RunStatus.FINISHED) != RunStatus.FINISHED:
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
