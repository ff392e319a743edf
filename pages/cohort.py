"""Cohort & survival: clinical table → risk groups → Kaplan–Meier, log-rank, Cox, export.

Thin page: widgets here, every number from ``ghist_core.analysis`` (clinical import,
patient features, risk groups, survival, feature tests), every figure from ``ghist_core.viz``.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from ghist_core.analysis.clinical import (
    TIME_UNITS,
    ColumnMapping,
    find_endpoints,
    guess_mapping,
    load_demo_clinical,
    pseudonymise_ids,
    read_clinical_table,
    safe_csv_bytes,
    validate_survival,
)
from ghist_core.analysis.compare import compare_features
from ghist_core.analysis.features import (
    POOLING_RULE,
    feature_columns,
    join_clinical,
    patient_features,
    predicted_slides_from_project,
)
from ghist_core.analysis.levels import describe_levels
from ghist_core.analysis.groups import (
    ByVariable,
    KMeansClusters,
    SplitAtQuantiles,
    Threshold,
    make_risk_groups,
)
from ghist_core.analysis.survival import compare_groups, fit_cox
from ghist_core.viz.plots import PLOTLY_EXPORT_CONFIG, PLOTLY_EXPORT_CONFIG_PNG
from ghist_core.viz.survival_plots import NO_ESTIMATE_MESSAGE
from ghist_core.errors import GhistError
from ghist_core.safe_text import plain
from pages import common as c

# Session keys of this page (set once).
LEVELS = "cohort_levels"  # groups to compare (widget)
LEVELS_FOR = "cohort_levels_for"  # the variable LEVELS belongs to
REFERENCE = "cohort_reference"  # reference group (widget)
COX_ADJUST = "cohort_cox_adjust"  # further Cox covariates (widget)
UPLOAD = "cohort_upload"  # (file name, bytes) of an uploaded clinical table
SALT = "cohort_pseudonym_salt"  # per-session secret for pseudonymised exports; never written
SOURCE_DEMO = "Demo: TCGA breast cancer (clinical only, no slides)"
SOURCE_UPLOAD = "My clinical table"
SOURCE_SAVED = "Saved in this project"
GROUP_CLINICAL = "Clinical variable"
GROUP_SPLIT = "Predicted feature: split"
GROUP_KMEANS = "Predicted features: k-means clusters"

c.init_session()
for key, default in ((UPLOAD, None), (SALT, secrets.token_hex(16))):
    if key not in st.session_state:
        st.session_state[key] = default

st.title("Cohort & survival")
st.caption("Kaplan–Meier curves, log-rank tests and Cox models across patients, with groups from "
           "clinical variables or from what GHIST predicts on each patient's slides.")


@st.cache_data(show_spinner=False, max_entries=8)
def load_table(data: bytes | None, name: str) -> pd.DataFrame:
    """Demo table when ``data`` is None, else the uploaded bytes (keyed by their content)."""
    return load_demo_clinical() if data is None else read_clinical_table(data, name)


@st.cache_data(show_spinner="Reading predicted slides…", max_entries=4)
def load_features(pairs: tuple[tuple[str, str], ...], genes: tuple[str, ...],
                  signature: tuple[str, ...]) -> pd.DataFrame:
    return patient_features([(p, Path(f)) for p, f in pairs], genes=list(genes),
                               signatures={"signature": list(signature)} if signature else None)


def gene_list(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(g.strip() for g in text.replace(";", ",").split(",") if g.strip()))


def csv_button(label: str, df: pd.DataFrame, file_name: str, key: str) -> None:
    """A CSV download with a stable key that does not rerun the page when clicked
    (``on_click="ignore"``): a rerun replaced the file the browser was about to fetch, so
    a quick second click got a 404."""
    st.download_button(label, safe_csv_bytes(df), file_name=file_name, mime="text/csv",
                       key=key, icon=":material/download:", on_click="ignore")


def show_figure(fig, key: str) -> None:
    fmt = st.session_state.get("cohort_image_format", "svg")
    cfg = dict(PLOTLY_EXPORT_CONFIG if fmt == "svg" else PLOTLY_EXPORT_CONFIG_PNG)
    cfg["toImageButtonOptions"] = {**cfg["toImageButtonOptions"], "filename": key}
    st.plotly_chart(fig, config=cfg, key=key)


def saved_tables() -> pd.DataFrame | None:
    """Clinical tables kept in the project store (None when there is no store or none)."""
    try:
        tables = c.open_project().list_clinical_tables()
    except (ImportError, AttributeError, GhistError, OSError) as exc:  # page works without a store
        st.caption(f"Project clinical tables unavailable ({plain(exc)}).")
        return None
    return tables if len(tables) else None


def project_slides() -> tuple[list[tuple[str, str]], list[str]]:
    """Predicted slides of the current project; never fails the page."""
    try:
        project = c.open_project()
        pairs, notes = predicted_slides_from_project(project)
        return [(p, str(f)) for p, f in pairs], notes
    except (ImportError, AttributeError, GhistError, OSError, KeyError, TypeError) as exc:
        return [], [f"The project's predicted slides could not be read ({exc})."]


# --- 1. clinical table ---------------------------------------------------------------------
with st.sidebar:
    st.subheader("Cohort")
    saved = saved_tables()
    sources = [SOURCE_DEMO, SOURCE_UPLOAD] + ([SOURCE_SAVED] if saved is not None else [])
    source = st.radio("Clinical data", sources, key="cohort_source")
    st.radio("Figure download format (camera button on each plot)", ["svg", "png"],
             key="cohort_image_format", horizontal=True,
             help="Plots are saved by your browser from the camera icon in their toolbar.")
    pseudo = st.toggle("Pseudonymise patient ids in downloads", key="cohort_pseudonymise",
                       help="Replaces ids by keyed hashes (P-…); the key lives only in this "
                            "browser session.")

saved_mapping: dict = {}
if source == SOURCE_UPLOAD:
    up = st.file_uploader("Clinical table (CSV, TSV or XLSX; one row per patient)",
                          type=["csv", "tsv", "txt", "xlsx"], key="cohort_uploader")
    if up is not None:
        st.session_state[UPLOAD] = (up.name, up.getvalue())
    if st.session_state[UPLOAD] is None:
        st.info("Upload a table with a patient id, a follow-up time and an event column "
                "(any encoding; comma, semicolon or tab separated). The file itself is kept "
                "unchanged.")
        st.stop()
    name, data = st.session_state[UPLOAD]
elif source == SOURCE_SAVED:
    labels = {f"{r.name} (#{r.table_id})": int(r.table_id) for r in saved.itertuples()}
    pick = st.selectbox("Saved clinical table", list(labels), key="cohort_saved_table")
    try:
        path, saved_mapping = c.open_project().get_clinical_table(labels[pick])
        name, data = path.name, path.read_bytes()
    except (GhistError, OSError) as exc:
        st.error(plain(exc))
        st.stop()
else:
    name, data = "tcga_brca_clinical.csv", None
    st.info(
        "**Demo cohort: TCGA breast cancer (BRCA), 1,097 patients.** It has survival endpoints "
        "(OS, DSS, DFI, PFI, in days) and receptor status (ER, PR, HER2) but **no slides here**, "
        "so groups from predicted compositions need your own predicted slides with patient ids. "
        "Source: TCGA Pan-Cancer Clinical Data Resource (Liu et al., Cell 2018) and TCGA Biotab "
        "receptor status; TCGA open-access data.", icon=":material/info:")

try:
    raw = load_table(data, name)
except GhistError as exc:
    st.error(plain(exc))
    st.stop()
st.caption(f"{plain(name)}: {len(raw)} rows × {raw.shape[1]} columns"
           + (f" · encoding {raw.attrs.get('encoding')}, delimiter {raw.attrs.get('delimiter')!r}"
              if raw.attrs.get("delimiter") else ""))

# --- 2. column mapping ---------------------------------------------------------------------
# Another table starts from its own guesses: keyed widgets keep their value across reruns, so the
# demo's "days" stayed selected for a table in months (its times were then read as days).
_table_id = (source, name, hashlib.sha256(data).hexdigest() if data is not None else "demo")
if st.session_state.get("cohort_table_id") != _table_id:
    for _k in ("cohort_pid", "cohort_endpoint", "cohort_time", "cohort_event", "cohort_unit_in"):
        st.session_state.pop(_k, None)
    st.session_state["cohort_table_id"] = _table_id
guess = guess_mapping(raw)
if source == SOURCE_SAVED and saved_mapping:  # the mapping saved with the table wins
    guess = ColumnMapping(**{**guess.to_dict(), **{k: v for k, v in saved_mapping.items()
                                                      if k in guess.to_dict() and v}})
endpoints = find_endpoints(raw)
cols = list(raw.columns)
with st.expander("Columns and endpoint", expanded=source == SOURCE_UPLOAD):
    a, b, d = st.columns(3)
    pid_col = a.selectbox("Patient id", cols, index=cols.index(guess.patient_id)
                          if guess.patient_id in cols else 0, key="cohort_pid")
    if endpoints:
        pairs = list(endpoints.values())
        ep = b.selectbox("Endpoint", list(endpoints), key="cohort_endpoint",
                         index=pairs.index((guess.time, guess.event))
                         if (guess.time, guess.event) in pairs else 0,
                         help="OS overall survival, DSS disease-specific, PFI progression-free "
                              "interval, DFI disease-free interval. TCGA-CDR recommends PFI and OS.")
        time_col, event_col = endpoints[ep]
        b.caption(f"time {plain(time_col)}, event {plain(event_col)}")
    else:
        time_col = b.selectbox("Time", cols, index=cols.index(guess.time) if guess.time in cols
                               else 0, key="cohort_time")
        event_col = b.selectbox("Event (1/0, Dead/Alive, yes/no, True/False)", cols,
                                index=cols.index(guess.event) if guess.event in cols else 0,
                                key="cohort_event")
        ep = event_col
    units = list(TIME_UNITS)
    unit_in = d.selectbox("Time unit in the file", units, index=units.index(guess.time_unit),
                          key="cohort_unit_in")
    unit_out = d.selectbox("Show times in", units, index=units.index("months"),
                           key="cohort_unit_out")
    st.caption("Event rule: 1, dead, deceased, died, yes, true = event; 0, alive, living, "
               "censored, no, false = censored; anything else is listed and left out.")

slides, slide_notes = project_slides()
try:
    checked = validate_survival(
        raw, ColumnMapping(pid_col, time_col, event_col, time_unit=unit_in), unit_in,
        out_unit=unit_out, slide_patient_ids=[p for p, _ in slides] if slides else None)
except GhistError as exc:
    st.error(plain(exc))
    st.stop()
table = checked.table
st.write(f"**{checked.n} patients usable, {checked.events} events** ({plain(ep)}; times in {unit_out}).")
if checked.problems:
    with st.expander(f"Checks on the table ({len(checked.problems)})",
                     expanded=source == SOURCE_UPLOAD):
        for p in checked.problems:
            st.markdown(f"- {plain(p)}")
        if len(checked.dropped):
            st.dataframe(checked.dropped, hide_index=True, height=200)
            dropped = checked.dropped.copy()
            if pseudo:
                dropped["patient_id"] = pseudonymise_ids(dropped["patient_id"],
                                                             st.session_state[SALT])
            csv_button("Left-out rows (CSV)", dropped, "left_out_rows.csv", "cohort_dl_dropped")
if source == SOURCE_UPLOAD:
    if st.button("Save table and mapping to the project", key="cohort_save"):
        try:
            project = c.open_project()
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(name).name
                path.write_bytes(data)
                project.add_clinical_table(path, name=Path(name).stem, original_name=name,
                                           mapping=checked.mapping.to_dict())
            st.success("Saved: the original file is kept unchanged in the project.")
        except (ImportError, AttributeError, GhistError, OSError) as exc:
            st.warning(f"Could not save to the project: {plain(exc)}")

# --- 3. predicted features ------------------------------------------------------------------
# every clinical patient stays in the table (features empty without a slide): clinical groupings
# count them all, groups from predicted features leave them out by their missing values
features = None
feature_scope = ""
if slides:
    st.caption(f"{len(slides)} predicted slide(s) in this project. {POOLING_RULE}")
    a, b = st.columns(2)
    genes = gene_list(a.text_input("Genes for mean predicted expression (comma-separated)",
                                   key="cohort_genes", placeholder="e.g. ERBB2, ESR1"))
    signature = gene_list(b.text_input("Signature: genes averaged into sig_signature",
                                       key="cohort_signature", placeholder="e.g. KRT8, KRT18"))
    try:
        feats = load_features(tuple(slides), genes, signature)
        joined = join_clinical(feats, table, "patient_id", keep_all_clinical=True)
        for m in joined.messages:
            st.caption(plain(m))
        if joined.n:
            features = feature_columns(feats)
            feature_scope = joined.feature_scope
            table = joined.table
    except GhistError as exc:
        st.warning(plain(exc))
for n in slide_notes[:5]:
    st.caption(plain(n))

# --- 4. groups ------------------------------------------------------------------------------
st.subheader("Risk groups")
modes = [GROUP_CLINICAL, GROUP_SPLIT, GROUP_KMEANS]
mode = st.radio("Group patients by", modes, key="cohort_group_mode", horizontal=True)
if mode != GROUP_CLINICAL and not features:
    st.info("Groups from predicted features need predicted slides whose patient ids match this "
            "table. " + ("The demo has no slides. " if source == SOURCE_DEMO else "")
            + "Predict slides on the Upload & predict page (set each slide's patient id), then "
            "come back. " + POOLING_RULE)
    st.stop()
if mode == GROUP_CLINICAL:
    candidates = [g for g in guess.groups if g in table.columns] or [
        c_ for c_ in raw.columns if c_ in table.columns
        and c_ not in (pid_col, time_col, event_col) and 2 <= table[c_].nunique() <= 20]
    if not candidates:
        st.info("This table has no column to group patients by (a column with 2–20 values). "
                "Choose a grouping from predicted features above, or add a clinical variable.")
        st.stop()
    default = "her2_status" if "her2_status" in candidates else candidates[0]
    var = st.selectbox("Variable", candidates, index=candidates.index(default),
                       key="cohort_group_var")
    table = table.assign(**{var: table[var].astype("string")})
    lv = describe_levels(table[var])
    # the group choices belong to the variable: a new variable starts with all its groups
    if st.session_state.get(LEVELS_FOR) != var or LEVELS not in st.session_state:
        st.session_state[LEVELS] = list(lv.levels)
        st.session_state.pop(REFERENCE, None)
        st.session_state[LEVELS_FOR] = var
    elif any(g not in lv.levels for g in st.session_state[LEVELS]):  # e.g. another endpoint
        st.session_state[LEVELS] = [g for g in st.session_state[LEVELS] if g in lv.levels]
    a, b = st.columns([3, 1])
    keep = a.multiselect("Groups to compare", lv.levels, key=LEVELS,
                         format_func=lambda g: f"{g} (n={lv.counts[g]})",
                         help="All groups by default"
                              + (", in their natural order." if lv.ordinal else "."))
    keep = [g for g in lv.levels if g in keep]  # natural order, whatever the clicking order
    if len(keep) < 2:
        st.warning("Choose at least two groups to compare.")
        st.stop()
    ref_default = describe_levels(table[var], among=keep).default_reference
    if st.session_state.get(REFERENCE) not in keep:
        st.session_state[REFERENCE] = ref_default
    ref = b.selectbox("Reference group", keep, key=REFERENCE,
                      help="Cox hazard ratios are relative to it. Default: "
                           + lv.reference_rule() + ".")
    st.caption(f"Comparing {len(keep)} of {len(lv.levels)} groups"
               + (" (natural order)" if lv.ordinal else "") + ": "
               + ", ".join(f"{plain(g)} (n={lv.counts[g]})" for g in keep)
               + f". Reference: {plain(ref)}.")
    rule = ByVariable(var, tuple(keep))
elif mode == GROUP_SPLIT:
    a, b = st.columns(2)
    feat = a.selectbox("Feature", features, key="cohort_feature")
    how = b.selectbox("Split", ["median", "tertiles", "threshold"], key="cohort_split")
    if how == "threshold":
        thr = st.number_input("Threshold", value=float(table[feat].median()),
                              key="cohort_threshold", format="%.4g")
        rule = Threshold(feat, thr)
    else:
        rule = SplitAtQuantiles(feat, how)
    st.caption(f"{feature_scope} {POOLING_RULE}")
else:
    a, b, d = st.columns([3, 1, 1])
    feats_k = a.multiselect("Features", features, default=[f for f in features
                            if f.startswith("prop_")] or features[:3], key="cohort_km_feats")
    k = b.number_input("k", 2, 8, 2, key="cohort_k")
    seed = d.number_input("seed", 0, 10_000, 0, key="cohort_seed")
    rule = KMeansClusters(int(k), tuple(feats_k), int(seed))
    st.caption(f"{feature_scope} {POOLING_RULE}")

try:
    group_col = (rule.column if isinstance(rule, ByVariable) else
                 "cluster" if isinstance(rule, KMeansClusters) else f"{rule.column} group")
    groups = make_risk_groups(table, rule, key_added=group_col)
    horizon = st.number_input(f"RMST horizon ({unit_out})", min_value=0.1,
                              value=float(round(5 * TIME_UNITS["years"] / TIME_UNITS[unit_out], 1)),
                              key="cohort_horizon")
    res = compare_groups(groups.table, "time", "event", groups.column, horizon=horizon,
                            time_unit=unit_out, title=f"{ep} by {group_col}")
except GhistError as exc:
    st.error(plain(exc))
    st.stop()

st.caption(f"Rule: {plain(groups.description)}")
c.show_messages(res.warnings, res.notes)  # notes cover patients without a group and without survival data
m1, m2, m3, m4 = st.columns(4)
m1.metric("Patients", res.n)
m2.metric("Events", res.events)
m3.metric("Log-rank χ²", f"{res.test_statistic:.2f}", help=f"{res.degrees_freedom} df")
m4.metric("p-value", f"{res.p_value:.3g}")
show_figure(res.plot(), "cohort_km")
csv_button("KM table (CSV)", res.km_table(), "km_curves.csv", "cohort_dl_km")

st.markdown("**Per group** (median survival with 95% CI; inf = not reached; RMST = mean "
            f"event-free time in the first {horizon:g} {unit_out})")
st.dataframe(res.groups.round(3), hide_index=True)
csv_button("Group table (CSV)", res.groups, "groups.csv", "cohort_dl_groups")
if len(res.pairwise) > 1:
    st.markdown("**Pairwise log-rank** (Holm-corrected p in `p_holm`)")
    st.dataframe(res.pairwise, hide_index=True)
    csv_button("Pairwise tests (CSV)", res.pairwise, "pairwise_logrank.csv", "cohort_dl_pairwise")
assign = groups.table[["patient_id", groups.column]].dropna()
if pseudo:
    assign = assign.assign(patient_id=pseudonymise_ids(assign["patient_id"],
                                                          st.session_state[SALT]).to_numpy())
csv_button("Patient groups (CSV)", assign, "patient_groups.csv", "cohort_dl_assign")

# --- 5. Cox ---------------------------------------------------------------------------------
st.subheader("Cox proportional hazards")
reference = {groups.column: ref} if isinstance(rule, ByVariable) else {}
adjust_options = [c_ for c_ in table.columns
                  if c_ not in ("patient_id", "time", "event", groups.column, pid_col, time_col,
                                event_col)
                  and (pd.api.types.is_numeric_dtype(table[c_])
                       or 2 <= table[c_].nunique() <= 20)]
if any(v not in adjust_options for v in st.session_state.get(COX_ADJUST, [])):
    st.session_state[COX_ADJUST] = [v for v in st.session_state[COX_ADJUST] if v in adjust_options]
a, b = st.columns([3, 1])
adjust = a.multiselect(f"Model: the grouping ({plain(groups.column)}), adjusted for", adjust_options,
                       key=COX_ADJUST, placeholder="nothing else (grouping only)",
                       help="The Cox model always contains the grouping chosen above, with its "
                            "reference group; add clinical or predicted covariates to adjust for.")
uni = b.toggle("One model per covariate (univariate)", key="cohort_cox_uni")
covs = [groups.column, *adjust]
try:
    cox = fit_cox(groups.table, "time", "event", covs, univariate=uni, reference=reference)
except GhistError as exc:
    st.error(plain(exc))
else:
    c.show_messages(cox.warnings, cox.notes)
    refs = cox.reference_levels
    st.markdown(f"**Covariates:** {', '.join(plain(c_) for c_ in covs)}. "
                + (("**Reference levels (HR = 1):** "
                    + ", ".join(f"{plain(k)} = {plain(v)}" for k, v in refs.items()) + ".")
                   if refs else ""))
    if cox.any_estimable:
        show_figure(cox.plot(), "cohort_forest")
    else:
        st.info(NO_ESTIMATE_MESSAGE, icon=":material/info:")
    st.dataframe(cox.summary.round(4), hide_index=True)
    csv_button("Hazard ratios (CSV)", cox.summary, "cox_hazard_ratios.csv", "cohort_dl_cox")
    st.markdown("**Proportional-hazards check** (Grambsch–Therneau test on rank time; "
                "p < 0.05: the hazard ratio changes over time)")
    st.dataframe(cox.ph_check, hide_index=True)
    csv_button("PH check (CSV)", cox.ph_check, "cox_ph_check.csv", "cohort_dl_ph")

# --- 6. patient comparison ------------------------------------------------------------------
if features:
    st.subheader("Predicted features between groups")
    try:
        fc = compare_features(groups.table, groups.column, features)
    except GhistError as exc:
        st.info(plain(exc))
    else:
        st.caption("Mann–Whitney U (2 groups) or Kruskal–Wallis (more), Benjamini–Hochberg "
                   "FDR over features.")
        c.show_messages(fc.warnings)
        show_figure(fc.plot(), "cohort_features")
        st.dataframe(fc.table, hide_index=True)
        csv_button("Feature tests (CSV)", fc.table, "feature_tests.csv", "cohort_dl_feats")

st.caption("Figures: use the camera icon on each plot (format chosen in the sidebar). Tables: the "
           "CSV buttons (cells that a spreadsheet could run as formulas are quoted).")
