"""Cell types & patients: compositions, neighbourhoods, morphology, differential expression."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ghist_core.analysis.clinical import load_demo_clinical, read_clinical_table, safe_csv_bytes
from ghist_core.analysis.compare import compare_expression
from ghist_core.analysis.features import (
    POOLING_RULE,
    SlideSummary,
    cell_type_counts,
    patient_expression,
    summarise_slide,
)
from ghist_core.analysis.neighbourhoods import (
    DEFAULT_RADIUS_UM,
    model_radius_um,
    observed_neighbourhood_by_type,
    predicted_neighbourhood_by_type,
)
from ghist_core.errors import GhistError
from ghist_core.export import MAX_REGION_BYTES, RegionComposition, region_composition
from ghist_core.model.reliability import Reliability
from ghist_core.project import RunStatus
from ghist_core.viz import plots
from ghist_core.safe_text import plain
from pages import common as c

c.init_session()
c.ensure_demo_on_first_start()

st.title("Cell types & patients")
project = c.open_project_or_stop()

done = c.finished_slides_or_stop(project)

folder = str(project.folder)
run_of = {int(r["slide_id"]): int(c.run_field(project.latest_run(int(r["slide_id"]), status=RunStatus.FINISHED), "run_id"))
          for _, r in done.iterrows()}
patient_of = {int(r["slide_id"]): (str(r["patient_id"]) if pd.notna(r.get("patient_id")) else f"slide {r['slide_id']}")
              for _, r in done.iterrows()}
label_of = {int(r["slide_id"]): c.slide_label(r) for _, r in done.iterrows()}


@st.cache_data(show_spinner=False, max_entries=512)
def slide_summary(folder: str, slide_id: int, run_id: int) -> SlideSummary:
    """Per-slide sums (cells per type, expression sums); patients pool them by one rule."""
    return summarise_slide(c.cached_prediction(folder, slide_id, run_id))


@st.cache_data(show_spinner=False, max_entries=512)
def run_reliability(folder: str, slide_id: int, run_id: int) -> Reliability:
    """The held-out reliability in the card of the model that made this run (read without the cells)."""
    return Reliability.from_h5ad(c.open_project(folder).result_files(run_id).get("h5ad", ""))


def model_reliability() -> Reliability:
    """The reliability all finished slides share (unknown, with a caption, when several models made them)."""
    rel, n_models = Reliability.shared(run_reliability(folder, s, run_of[s]) for s in ids)
    if n_models > 1:
        st.caption(f"These slides were predicted by {n_models} models with different held-out tests, so no "
                   "gene or cell type is marked reliable here; the Gene maps page shows each slide's own.")
    return rel


def summaries() -> list[tuple[str, str, SlideSummary]]:
    """(patient, slide label, summary) of every finished slide."""
    return [(patient_of[s], label_of[s].split(" · ")[0], slide_summary(folder, s, run_of[s])) for s in ids]


@st.cache_resource(show_spinner=False, max_entries=64)
def predicted_nbhd(folder: str, slide_id: int, run_id: int):
    """The model's predicted neighbourhood per cell type (or the reason there is none)."""
    try:
        return predicted_neighbourhood_by_type(c.cached_prediction(folder, slide_id, run_id))
    except ValueError as exc:
        return str(exc)


@st.cache_resource(show_spinner="Counting each cell's neighbours…", max_entries=64)
def observed_nbhd(folder: str, slide_id: int, run_id: int, radius_um: float):
    """The observed neighbourhood per cell type from the cell calls (or the reason there is none)."""
    try:
        return observed_neighbourhood_by_type(c.cached_prediction(folder, slide_id, run_id), radius_um)
    except ValueError as exc:
        return str(exc)


@st.cache_resource(show_spinner=False, max_entries=64)
def morph_figure(folder: str, slide_id: int, run_id: int, feature: str):
    return plots.morphology_violins(c.cached_prediction(folder, slide_id, run_id).obs, feature, max_per_type=2000)


@st.cache_data(show_spinner=False, max_entries=8)
def clinical_table(data: bytes | None, name: str | None) -> pd.DataFrame:
    """The uploaded clinical table, or the bundled TCGA BRCA one (parsed once)."""
    return read_clinical_table(data, filename=name) if data is not None else load_demo_clinical()


@st.cache_data(show_spinner="Testing every gene…", max_entries=32)
def de_result(expression: pd.DataFrame, table: pd.DataFrame, id_col: str, grp_col: str, ga: str, gb: str,
              method: str):
    return compare_expression(expression, table, id_col=id_col, group_col=grp_col, group_a=ga, group_b=gb,
                              method=method)


@st.cache_resource(show_spinner=False, max_entries=32)
def composition_figure(counts: pd.DataFrame, percent: bool, title: str):
    return plots.composition_bars(counts, percent=percent, title=title)


def composition_tab() -> None:
    """Stacked bars per slide and per patient, and the counts table."""
    counts = cell_type_counts(summaries(), per="slide")
    percent = st.toggle("Show percentages", value=True, key="ct_percent")
    st.plotly_chart(composition_figure(counts, percent, "Cell-type composition per slide"), key="ct_comp_slides")
    by_patient = cell_type_counts(summaries(), per="patient")
    patients_sel = st.multiselect("Compare patients side by side", list(by_patient.index),
                                  default=list(by_patient.index)[:6], key="ct_patients")
    if patients_sel:
        st.plotly_chart(composition_figure(by_patient.loc[patients_sel], percent,
                                           "Cell-type composition per patient (all slides pooled)"),
                        key="ct_comp_patients")
        st.caption(POOLING_RULE)
    st.caption(plain(model_reliability().describe_types([str(t) for t in counts.columns])))
    st.dataframe(counts.reset_index(), hide_index=True, key="ct_counts_table")
    region_section()


@st.cache_data(show_spinner="Finding the cells inside the region…", max_entries=8)
def region_result(folder: str, slide_id: int, run_id: int, data: bytes, radius_um: float) -> RegionComposition:
    """The composition (and observed neighbourhood) of the cells inside the uploaded regions."""
    adata = c.cached_prediction(folder, slide_id, run_id)
    return region_composition(adata, data, mpp=float(c.open_project(folder).get_slide(slide_id).mpp),
                              radius_um=radius_um)


def region_section() -> None:
    """Upload QuPath annotations; composition and neighbourhood of the cells inside them only."""
    st.subheader("Restrict to a region")
    st.caption("Draw the region in QuPath (tumour, stroma, invasive margin…) on the same slide, then File ▸ "
               "Export objects ▸ GeoJSON with the annotations only. Cells count when their centre lies inside "
               "a polygon (holes excluded).")
    rc = st.columns(2)
    sid = rc[0].selectbox("Slide", ids, format_func=lambda i: label_of[i], key="ct_region_slide")
    radius = rc[1].number_input("Neighbourhood radius (µm)", min_value=5.0, max_value=500.0, step=5.0,
                                value=float(model_radius_um(c.cached_prediction(folder, sid, run_of[sid]))
                                            or DEFAULT_RADIUS_UM), key="ct_region_radius")
    up = st.file_uploader("QuPath annotations (GeoJSON)", type=["geojson", "json"], key="ct_region_file",
                          max_upload_size=MAX_REGION_BYTES // 2**20)
    if up is None:
        return
    try:
        res = region_result(folder, sid, run_of[sid], up.getvalue(), float(radius))
    except GhistError as exc:
        st.error(plain(exc))
        return
    st.markdown(plain(res.describe()))
    c.show_messages(notes=res.regions.notes)  # e.g. detections in the file, ignored
    table = res.counts_table()
    st.plotly_chart(composition_figure(table, st.session_state.get("ct_percent", True),
                                       f"Inside the region vs the whole slide ({label_of[sid].split(' · ')[0]})"),
                    key="ct_region_comp")
    st.dataframe(table.reset_index(), hide_index=True, key="ct_region_table")
    if res.neighbourhood is not None and len(res.neighbourhood.matrix):
        st.plotly_chart(plots.neighbourhood_heatmap(
            res.neighbourhood, title=f"Observed neighbourhood of the cells inside the region, within {float(radius):g} µm"),
            key="ct_region_nbhd")
        st.caption(plain(res.neighbourhood.describe()) + " Only cells inside the region are averaged; their "
                   "neighbours are counted wherever they lie.")


ids = list(run_of)


def neighbourhood_tab() -> None:
    """Observed (from the cell calls) and predicted (model head) neighbour composition per type."""
    sid = st.selectbox("Slide", ids, format_func=lambda i: label_of[i], key="ct_nbhd_slide")
    model_r = model_radius_um(c.cached_prediction(folder, sid, run_of[sid]))
    radius = st.number_input(
        "Neighbourhood radius (µm)", min_value=5.0, max_value=500.0, step=5.0,
        value=float(model_r or DEFAULT_RADIUS_UM), key="ct_nbhd_radius",
        help="Observed composition: the other cells whose centre lies within this distance of a "
             f"cell's centre. Default {model_r or DEFAULT_RADIUS_UM:g} µm"
             + (", the radius of the model's neighbourhood head." if model_r else "."))
    obs = observed_nbhd(folder, sid, run_of[sid], float(radius))
    pred = predicted_nbhd(folder, sid, run_of[sid])
    shown = [m for m in (obs, pred) if not isinstance(m, str)]
    zmax = plots.shared_percent_max(*shown) if shown else None
    if len(shown) == 2:
        st.caption(f"Both maps share one colour scale (0–{zmax:.0f} %), so their contrasts compare.")
    for column, matrix, key in zip(st.columns(2), (obs, pred), ("ct_nbhd_observed", "ct_nbhd")):
        with column:
            if isinstance(matrix, str):  # why there is no map
                st.info(plain(matrix))
                continue
            st.plotly_chart(plots.neighbourhood_heatmap(matrix, zmax=zmax), key=key)
            st.caption(plain(matrix.describe()))
    if not isinstance(pred, str) and pred.radius_um and abs(pred.radius_um - float(radius)) > 1e-9:
        st.caption(f"The two maps use different radii ({float(radius):g} µm observed, "
                   f"{pred.radius_um:g} µm predicted).")


def morphology_tab() -> None:
    """Nucleus morphology per predicted type of one slide."""
    sid_m = st.selectbox("Slide", ids, format_func=lambda i: label_of[i], key="ct_morph_slide")
    a = c.cached_prediction(folder, sid_m, run_of[sid_m])
    feats = [f for f in plots.MORPHOLOGY_UNITS if f in a.obs.columns]
    if not feats:
        st.info("This prediction has no morphology columns.")
    else:
        feat = st.selectbox("Feature", feats, key="ct_feature",
                            format_func=lambda f: f"{plots.MORPHOLOGY_LABELS[f]} ({plots.MORPHOLOGY_UNITS[f]})")
        st.plotly_chart(morph_figure(folder, sid_m, run_of[sid_m], feat), key="ct_morph")
        st.caption("Violins show up to 2,000 randomly chosen nuclei per cell type; the box marks the quartiles.")


def differential_tab() -> None:
    """Predicted expression of two groups of patients from a clinical table."""
    st.markdown("Compare predicted expression between two groups of patients defined by a clinical table. "
                "Cells are averaged per patient first (all of a patient's slides pooled); genes are tested "
                "with a two-sided Mann–Whitney U or Welch's t-test and corrected for multiple testing (Benjamini–Hochberg).")
    up = st.file_uploader("Clinical table (CSV, TSV or XLSX); the bundled TCGA BRCA table is used otherwise",
                          type=["csv", "tsv", "txt", "xlsx"], key="ct_clinical")
    try:
        table = clinical_table(up.getvalue() if up else None, up.name if up else None)
    except GhistError as exc:
        st.error(plain(exc))
        st.stop()
    cols = list(table.columns)
    guess_id = next((col for col in cols if col.lower() in ("patient_id", "bcr_patient_barcode", "patient")), cols[0])
    cc = st.columns(3)
    id_col = cc[0].selectbox("Patient id column", cols, index=cols.index(guess_id), key="ct_id_col")
    cat_cols = [col for col in cols if col != id_col and 2 <= table[col].nunique() <= 12]
    guess_grp = "er_status" if "er_status" in cat_cols else (cat_cols[0] if cat_cols else None)
    if guess_grp is None:
        st.info("The table has no column with 2–12 distinct values to form groups.")
        st.stop()
    grp_col = cc[1].selectbox("Group by", cat_cols, index=cat_cols.index(guess_grp), key="ct_group_col")
    method = cc[2].radio("Test", ["mannwhitney", "welch"], key="ct_method",
                         format_func=lambda m: {"mannwhitney": "Mann–Whitney U", "welch": "Welch t"}[m])
    levels = sorted(table[grp_col].dropna().astype(str).unique())
    gc = st.columns(2)
    ga = gc[0].selectbox("Group A", levels, index=levels.index("Positive") if "Positive" in levels else 0, key="ct_ga")
    gb = gc[1].selectbox("Group B", levels,
                         index=levels.index("Negative") if "Negative" in levels else min(1, len(levels) - 1), key="ct_gb")
    expression = patient_expression([(p, summary) for p, _, summary in summaries()])
    try:
        res = de_result(expression, table, id_col, grp_col, ga, gb, method)
    except GhistError as exc:
        st.warning(plain(exc))
    else:
        c.show_messages(res.warnings, res.notes)
        fc = st.slider("Minimum |log2 fold change| to highlight", 0.0, 3.0, 0.5, 0.1, key="ct_fc")
        st.plotly_chart(plots.volcano_plot(res, min_abs_log2fc=fc), key="ct_volcano")
        st.caption(plain(res.log2fc_rule()))
        significant = res.significant(0.05, fc)["feature"].astype(str).tolist()
        rel = model_reliability()
        reliable = (f", **{len(rel.reliable_genes(significant))}** of them reliable (held-out prediction better "
                    "than cell density alone)" if rel.known else ", reliability unknown for this model")
        st.markdown(f"**{len(significant)}** genes with q < 0.05 and |log2FC| ≥ {fc:g} "
                    f"({plain(ga)}: {res.n[ga]} patients, {plain(gb)}: {res.n[gb]} patients){reliable}.")
        table = rel.annotate(res.table, gene_col="feature")
        st.dataframe(table, hide_index=True, key="ct_de_table", column_config={
            "feature": st.column_config.TextColumn("gene"),
            "mean_a": st.column_config.NumberColumn(f"mean {ga}", format="%.3f"),
            "mean_b": st.column_config.NumberColumn(f"mean {gb}", format="%.3f"),
            "log2fc": st.column_config.NumberColumn(f"log2 FC, {ga} vs {gb}", format="%.2f"),
            "p_value": st.column_config.NumberColumn("p", format="%.2e"),
            "q_value": st.column_config.NumberColumn("q (BH)", format="%.2e"),
            "reliability": st.column_config.TextColumn(
                "reliability", help="reliable: the model's held-out prediction of this gene beat cell density "
                                    "alone; not reliable: it did not; unknown: the model card does not say."),
        })
        # the file names the groups and the grouping itself: away from this screen, mean_a and log2fc say nothing
        labelled = rel.annotate(res.labelled_table(), gene_col="feature")
        st.download_button("Results (CSV)", data=lambda: safe_csv_bytes(labelled), file_name="differential.csv",
                           mime="text/csv", key="ct_de_csv", on_click="ignore")


# lazy tabs: only the open tab runs and is sent, so a large slide does not slow every page switch
_tabs = st.tabs(["Composition", "Neighbourhoods", "Morphology", "Differential expression"], key="ct_tab",
                on_change="rerun")
for _tab, _render in zip(_tabs, (composition_tab, neighbourhood_tab, morphology_tab, differential_tab)):
    if _tab.open:
        with _tab:
            _render()
