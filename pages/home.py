"""Home: the current project, its patients and slides; one click runs the bundled demo."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from ghist_core.errors import GhistError
from ghist_core.project import RunStatus, overview
from ghist_core.safe_text import plain
from pages import common as c

c.init_session()
c.ensure_demo_on_first_start()

st.title("GHIST Studio")
st.caption("Single-cell gene expression, cell types and neighbourhoods predicted from H&E slides "
           "(GHIST, Fu et al., Nature Methods 2025).")

# --- project chooser ------------------------------------------------------------------
with st.sidebar:
    st.subheader("Project")
    folder_in = st.text_input("Project folder", value=st.session_state[c.PROJECT_DIR], key="home_project_folder",
                              help="A folder on this computer. A new folder becomes a new, empty project.")
    cols = st.columns(2)
    if cols[0].button("Open / create", key="home_open_project", width="stretch"):
        try:
            c.open_project(folder_in)
        except (GhistError, OSError) as exc:
            st.error(plain(exc))
        else:
            st.session_state[c.PROJECT_DIR] = str(Path(folder_in).expanduser())
            st.session_state[c.SELECTED_SLIDE] = None
            st.rerun()
    if cols[1].button("Demo project", key="home_demo_project", width="stretch"):
        st.session_state[c.PROJECT_DIR] = str(c.demo_project_dir())
        c.ensure_demo_project(str(c.demo_project_dir()))
        st.rerun()

project = c.open_project_or_stop()

st.markdown(f"**Project folder:** {plain(project.folder)}")
slides = project.list_slides()
patients = project.list_patients()
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
        box.info("The demo is running.")
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
    shown = [col for col in ["thumbnail", "slide_id", "patient_id", "original_name", "width", "height", "mpp",
                             "status", "n_cells", "added_at"] if col in view.columns]
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
            "status": "Prediction",
            "n_cells": st.column_config.NumberColumn("Cells", format="localized"),
            "added_at": st.column_config.DatetimeColumn("Added (UTC)", format="YYYY-MM-DD HH:mm"),
        },
    )

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
