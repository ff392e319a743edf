"""Home: the current project, its patients and slides; one click runs the bundled demo."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from ghist_core import export
from ghist_core.errors import GhistError
from ghist_core.paths import default_project_dir
from ghist_core.project import RunStatus, overview
from ghist_core.project.store import project_folder_for
from ghist_core.safe_text import plain
from pages import common as c

c.init_session()
c.ensure_demo_on_first_start()
#: the edit or deletion waiting for the user's "yes" (one at a time)
CONFIRM = "home_confirm"
#: what the last edit or deletion did, shown once after the rerun
DONE = "home_done"

st.title("GHIST Studio")
st.caption("Single-cell gene expression, cell types and neighbourhoods predicted from H&E slides "
           "(GHIST, Fu et al., Nature Methods 2025).")

# --- project chooser ------------------------------------------------------------------
def _switch_to(folder: Path) -> None:
    """Open another project: nothing chosen or asked in the last one carries over (the next page run
    puts the project in the URL)."""
    st.session_state[c.PROJECT_DIR] = str(folder)
    st.session_state[c.SELECTED_SLIDE] = None
    st.session_state.pop(CONFIRM, None)
    st.rerun()


with st.sidebar:
    st.subheader("Project")
    folder_in = st.text_input("Project folder", value=st.session_state[c.PROJECT_DIR], key="home_project_folder",
                              help="A project name (e.g. study1, kept in the projects folder "
                                   f"{default_project_dir()}) or a folder path. A new one becomes a new, empty project.")
    cols = st.columns(2)
    if cols[0].button("Open / create", key="home_open_project", width="stretch"):
        try:
            target = project_folder_for(folder_in)
            c.open_project(target)
        except (GhistError, OSError) as exc:
            st.error(plain(exc))
        else:
            _switch_to(target)
    if cols[1].button("Demo project", key="home_demo_project", width="stretch"):
        c.ensure_demo_project(str(c.demo_project_dir()))
        _switch_to(c.demo_project_dir())
    opened = Path(st.session_state[c.PROJECT_DIR])
    if opened != c.demo_project_dir() and c.url_name(opened) is None:
        st.caption("Opened by its path, outside the projects folder: the page address cannot name it, so a page "
                   "reload or a new tab shows the demo project. Type the path again to come back.")

project = c.open_project_or_stop()

st.markdown(f"**Project folder:** {plain(project.folder)}")
slides = overview.slide_table(project)
patients = overview.patient_table(project)
counts = overview.summary(project)

m = st.columns(4)
m[0].metric("Patients", counts.n_patients)
m[1].metric("Slides", counts.n_slides)
m[2].metric("Slides predicted", counts.n_predicted)
m[3].metric("Cells predicted", f"{counts.n_cells:,}")

# --- demo: one click to run, one click to the map -----------------------------------------
is_demo = Path(project.folder).resolve() == c.demo_project_dir().resolve()
if is_demo and len(slides):
    demo = slides.iloc[0]
    demo_status = RunStatus(demo["status"]) if isinstance(demo["status"], str) else None
    box = st.container(border=True)
    box.markdown("**Demo slide** — CMU-1 small region (Aperio SVS, 2220 × 2967 px, 0.499 µm/px), patient DEMO-01.")
    if demo_status is RunStatus.FINISHED:
        st.session_state[c.SELECTED_SLIDE] = int(demo["slide_id"])
        if box.button("Open the demo gene map", type="primary", key="home_open_demo_map", icon=":material/map:"):
            st.switch_page("pages/gene_maps.py")
    elif demo_status is not None and demo_status.is_active:
        left = overview.time_left(project, project.latest_run(int(demo["slide_id"])))
        box.info("The demo is running" + (f": {left.text()}." if left is not None else "."))
        if box.button("Watch progress", key="home_watch_demo"):
            st.switch_page("pages/upload.py")
    else:
        if box.button("Run the demo", type="primary", key="home_run_demo", icon=":material/play_arrow:"):
            try:
                c.submit(project, int(demo["slide_id"]))
            except GhistError as exc:
                box.error(plain(exc))
            else:
                st.session_state[c.SELECTED_SLIDE] = int(demo["slide_id"])
                st.switch_page("pages/upload.py")

# --- slides and patients -----------------------------------------------------------------
st.subheader("Slides")
if len(slides) == 0:
    st.info("This project has no slides yet. Add one on the Upload & predict page.")
    st.page_link("pages/upload.py", label="Upload a slide", icon=":material/upload_file:")
else:
    view = slides.copy()
    view["added_at"] = pd.to_datetime(view["added_at"], errors="coerce", utc=True)
    paths = [project.folder / p if not Path(p).is_absolute() else Path(p) for p in view["path"].astype(str)]
    view.insert(0, "thumbnail", [c.thumbnail_data_url(str(p), p.stat().st_mtime if p.exists() else 0.0) for p in paths])
    view["patient_id"] = view["patient"]
    view["stain"] = [  # the latest finished run's stain check (Upload & predict and Gene maps give the note)
        "outside the tested range" if s == RunStatus.FINISHED.value and c.stain_note(
            project.result_files(int(r)).get("h5ad")) else ""
        for s, r in zip(view["status"], view["run_id"])]
    shown = [col for col in ["thumbnail", "slide_id", "patient_id", "original_name", "width", "height", "mpp",
                             "prediction", "cells", "stain", "added_at"] if col in view.columns]
    st.dataframe(
        view[shown], hide_index=True, width="stretch", key="home_slides",
        column_config={
            "thumbnail": st.column_config.ImageColumn("Slide", width="small"),
            "slide_id": st.column_config.NumberColumn("ID", format="%d"),
            "patient_id": "Patient",
            "original_name": "File",
            "width": st.column_config.NumberColumn("Width (px)", format="%d"),
            "height": st.column_config.NumberColumn("Height (px)", format="%d"),
            "mpp": st.column_config.NumberColumn("µm per px", format="%.3f"),
            "prediction": "Prediction",
            "cells": "Cells",
            "stain": st.column_config.TextColumn(
                "Stain", help="Set when the slide's stain lies outside the range the nucleus segmenter was trained "
                              "and tested on: check its nuclei in the Gene maps close-up before trusting counts."),
            "added_at": st.column_config.DatetimeColumn("Added (UTC)", format="YYYY-MM-DD HH:mm"),
        },
    )
    if any(view["stain"]):
        st.warning(f"{sum(map(bool, view['stain']))} slide(s) have a stain outside the range the nucleus segmenter "
                   "was tested on (column Stain): check their nuclei before comparing them with the others.",
                   icon=":material/palette:")

st.subheader("Patients")
if len(patients):
    pview = patients.copy()
    if "created_at" in pview:
        pview["created_at"] = pd.to_datetime(pview["created_at"], errors="coerce", utc=True)
    st.dataframe(pview, hide_index=True, width="stretch", key="home_patients", column_config={
        "patient_id": "Patient", "n_slides": st.column_config.NumberColumn("Slides", format="%d"),
        "created_at": st.column_config.DatetimeColumn("Added (UTC)", format="YYYY-MM-DD HH:mm"),
    })
else:
    st.caption("No patients yet.")


# --- export the whole project ---------------------------------------------------------------
#: the last project zip prepared: {"tag": (folder, format, genes), "download": export.Download}
PROJECT_EXPORT = "home_export_ready"
EXPORT_NAMES = {"h5ad": ".h5ad (scanpy / squidpy)", "csv": "CSV (cells × genes)",
                "parquet": "Parquet (cells × genes)", "geojson": "QuPath GeoJSON"}
n_done = int(counts.n_predicted)
if n_done:
    st.subheader("Export the whole project")
    xc = st.columns(2)
    zfmt = xc[0].radio("Format", list(EXPORT_NAMES), format_func=EXPORT_NAMES.get, key="home_export_fmt",
                       help="One file per slide with a finished prediction, all in one .zip.")
    default_genes = ", ".join(st.session_state.get(c.SELECTED_GENES) or [])
    genes_text = xc[1].text_input("Genes (comma-separated; empty = all)", value=default_genes,
                                  key="home_export_genes", disabled=zfmt == "h5ad",
                                  help="The .h5ad always holds every gene; tables and QuPath measurements "
                                       "hold the genes listed here.")
    zgenes = None if zfmt == "h5ad" or not genes_text.strip() else [g.strip() for g in genes_text.split(",") if g.strip()]
    ztag = (str(project.folder), zfmt, tuple(zgenes) if zgenes is not None else None)
    if st.button(f"Prepare the project as {EXPORT_NAMES[zfmt]} (.zip)", key="home_export_prepare",
                 icon=":material/folder_zip:"):
        bar = st.progress(0.0, text="Exporting…")
        try:
            made = export.prepare_project_zip(
                project, zfmt, genes=zgenes,
                progress=lambda done, total, sid: bar.progress(done / total, text=f"Slide {sid} done ({done} of {total})"))
        except GhistError as exc:
            st.error(plain(exc))
        else:
            c.keep_prepared_download(PROJECT_EXPORT, ztag, made)
        finally:
            bar.empty()
    c.offer_prepared_download(PROJECT_EXPORT, ztag, "home_export_download")
    st.caption(f"{n_done} slide{'s' if n_done != 1 else ''} with a finished prediction, one file each "
               f"(`slide_ID{export.FORMATS[zfmt]}`, ID as in the table above). "
               f"How to open them: {export.HOW_TO_OPEN[zfmt]}")


# --- edit and delete ------------------------------------------------------------------------
def _ask(action: str, **what) -> None:
    st.session_state[CONFIRM] = {"action": action, **what}
    st.rerun()


def _done(text: str) -> None:
    st.session_state.pop(CONFIRM, None)
    st.session_state[DONE] = text
    st.rerun()


if st.session_state.get(DONE):
    st.success(plain(st.session_state.pop(DONE)), icon=":material/check_circle:")

if len(slides) or len(patients):
    st.subheader("Edit or delete")
    confirm = st.session_state.get(CONFIRM)
    if confirm:  # one question at a time, with the consequences spelled out
        box = st.container(border=True)
        box.warning(plain(confirm["text"]), icon=":material/warning:")
        b = box.columns(2)
        if b[0].button(confirm["yes"], type="primary", key="home_confirm_yes"):
            try:
                act = confirm["action"]
                if act == "edit_slide":
                    edit = project.update_slide(confirm["slide_id"], mpp=confirm["mpp"], patient_id=confirm["patient"])
                    n = len(edit.run_ids) if edit.mpp_changed else 0
                    msg = f"Slide {edit.slide_id} updated."
                    if n:
                        msg += (f" Its {n} run{'s were' if n != 1 else ' was'} deleted: results computed at "
                                f"{edit.old_mpp:.4g} µm/px are no longer shown. Run the slide again on Upload & predict.")
                elif act == "delete_slide":
                    project.delete_slide(confirm["slide_id"])
                    msg = f"Slide {confirm['slide_id']} deleted, with its runs and files."
                elif act == "delete_patient":
                    project.delete_patient(confirm["patient_id"], with_slides=confirm["with_slides"])
                    msg = f"Patient {confirm['patient_id']} deleted" + (
                        ", with their slides and runs." if confirm["with_slides"] else "; their slides are kept.")
                else:
                    project.delete_run(confirm["run_id"])
                    msg = f"Run {confirm['run_id']} deleted, with its results."
            except GhistError as exc:
                st.session_state.pop(CONFIRM, None)
                box.error(plain(exc))
            else:
                if act in ("delete_slide", "delete_patient"):
                    st.session_state[c.SELECTED_SLIDE] = None
                _done(msg)
        if b[1].button("Cancel", key="home_confirm_no"):
            st.session_state.pop(CONFIRM, None)
            st.rerun()

    in_project = c.project_key(project.folder)  # in every key below: their values are this project's
    tab_slide, tab_patient = st.tabs(["Slide", "Patient"])
    with tab_slide:
        if len(slides):
            labels = {int(r["slide_id"]): f"{r['slide_id']} · {c.slide_label(r)}" for _, r in slides.iterrows()}
            sid = st.selectbox("Slide", list(labels), format_func=lambda i: labels[i], key=f"home_edit_slide_{in_project}")
            row = slides[slides["slide_id"] == sid].iloc[0]
            e = st.columns(2)
            new_mpp = e[0].number_input("µm per pixel", min_value=0.01, max_value=50.0, value=float(row["mpp"]),
                                        step=0.01, format="%.4f", key=f"home_mpp_{in_project}_{sid}",
                                        help="A new value deletes the slide's runs: they were computed at the old one.")
            new_pid = e[1].text_input("Patient id", value=row["patient_id"] if isinstance(row["patient_id"], str) else "", key=f"home_patient_{in_project}_{sid}")
            b = st.columns(2)
            if b[0].button("Save changes", key="home_save_slide", icon=":material/save:"):
                try:
                    edit = project.plan_slide_edit(sid, mpp=new_mpp, patient_id=new_pid.strip() or None)
                except GhistError as exc:
                    st.error(plain(exc))
                else:
                    if not edit.changed:
                        st.info("Nothing to change.")
                    elif edit.invalidates_runs:
                        _ask("edit_slide", slide_id=sid, mpp=new_mpp, patient=edit.new_patient_id,
                             text=edit.describe(), yes=f"Update slide {sid} and delete its runs")
                    else:
                        try:
                            project.update_slide(sid, mpp=new_mpp, patient_id=edit.new_patient_id)
                        except GhistError as exc:
                            st.error(plain(exc))
                        else:
                            _done(edit.describe())
            if b[1].button("Delete slide…", key="home_delete_slide", icon=":material/delete:"):
                n = len(project.list_runs(sid))
                _ask("delete_slide", slide_id=sid, yes=f"Delete slide {sid}",
                     text=f"Delete slide {sid} ({c.slide_label(row)}) with its {n} run{'s' if n != 1 else ''}, "
                          "their results and the project's copy of the file? This cannot be undone.")
            runs = overview.run_table(project, sid)
            if len(runs):
                r = st.columns([3, 1])
                run_labels = dict(zip(runs["run_id"].astype(int), runs["label"]))
                rid = r[0].selectbox("Run of this slide", list(run_labels), format_func=lambda i: run_labels[i],
                                     key=f"home_run_{in_project}_{sid}")
                if r[1].button("Delete run…", key="home_delete_run", icon=":material/delete:"):
                    _ask("delete_run", run_id=int(rid), yes=f"Delete run {rid}",
                         text=f"Delete {run_labels[rid]} with its results and checkpoints? This cannot be undone.")
        else:
            st.caption("No slides.")
    with tab_patient:
        if len(patients):
            pid = st.selectbox("Patient", patients["patient_id"].tolist(), key=f"home_edit_patient_{in_project}")
            n_sl = int(patients.loc[patients["patient_id"] == pid, "n_slides"].iloc[0])
            with_slides = st.checkbox(f"Also delete their {n_sl} slide{'s' if n_sl != 1 else ''} and runs",
                                      value=True, key=f"home_patient_with_slides_{in_project}", disabled=n_sl == 0)
            if st.button("Delete patient…", key="home_delete_patient", icon=":material/delete:"):
                what = (f"and their {n_sl} slide{'s' if n_sl != 1 else ''} with every run and result"
                        if with_slides and n_sl else "(their slides are kept, without a patient)" if n_sl else "")
                _ask("delete_patient", patient_id=pid, with_slides=bool(with_slides and n_sl), yes=f"Delete patient {pid}",
                     text=f"Delete patient {pid} {what}? This cannot be undone.")
        else:
            st.caption("No patients.")
