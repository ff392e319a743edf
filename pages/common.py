"""Session-state keys and small helpers shared by every page (UI only, no analysis).

The helpers here open the project and cache what pages read (``st.cache_resource`` for
predictions and models, ``st.cache_data`` for tables), so each page stays a thin layer of
widgets over one ``ghist_core`` call. Uploads are staged by ``ghist_core.project.uploads``;
run statuses are ``ghist_core.project.RunStatus``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from ghist_core.errors import GhistError
from ghist_core.paths import DEFAULT_SEGMENTER, DEMO_DIR, default_project_dir
from ghist_core.project import Project, overview
from ghist_core.project.store import project_folder_for
from ghist_core.project.uploads import inspect_upload
from ghist_core.safe_text import plain

# Session keys, set once; every page uses these names.
PROJECT_DIR = "project_dir"
SELECTED_SLIDE = "selected_slide_id"
DEVICE = "device"
MODEL_ID = "model_id"
SELECTED_GENES = "selected_genes"
SEGMENTER = "segmenter"
WATCHED_RUNS = "watched_run_ids"
#: The URL's query parameter naming the open project (``?project=study1``): a reload or a link keeps it.
PROJECT_PARAM = "project"

#: File types the uploader accepts (``ome.tif`` is covered by ``tif``).
UPLOAD_TYPES = ["svs", "ndpi", "tif", "tiff", "png", "jpg", "jpeg"]
DEMO_PATIENT = "DEMO-01"
DEMO_SLIDE = DEMO_DIR / "CMU-1-Small-Region.svs"
#: How often live progress is polled from the store (seconds).
POLL_S = 1.0


def demo_project_dir() -> Path:
    return default_project_dir() / "demo"


def init_session() -> None:
    """Fill missing session keys with their defaults (safe to call on every rerun).

    A new session (a page reload, a link) opens the project its URL names, else the demo; every run
    then puts the open project back in the URL, which Streamlit clears when the user changes page."""
    if PROJECT_DIR not in st.session_state:
        st.session_state[PROJECT_DIR] = str(_project_named_in_url() or demo_project_dir())
    defaults = {
        SELECTED_SLIDE: None,
        DEVICE: "auto",
        MODEL_ID: None,
        SELECTED_GENES: None,
        SEGMENTER: "auto",
        WATCHED_RUNS: [],
    }
    for key, value in defaults.items():
        if key not in st.session_state:
            st.session_state[key] = value
    _name_project_in_url(url_name(st.session_state[PROJECT_DIR]))


def url_name(folder: str | os.PathLike) -> str | None:
    """The name a project has in the URL: a project in the projects folder has its folder's name; the demo
    (the bare address) and a project opened by a path elsewhere have none (a URL never holds a path)."""
    folder = Path(folder)
    if folder.parent != default_project_dir() or folder == demo_project_dir():
        return None
    return folder.name


def _name_project_in_url(name: str | None) -> None:
    if st.query_params.get(PROJECT_PARAM) == name:
        return
    if name is None:
        del st.query_params[PROJECT_PARAM]
    else:
        st.query_params[PROJECT_PARAM] = name


def _project_named_in_url() -> Path | None:
    """The project a new session's URL names, read as the sidebar reads a typed name
    (:func:`project_folder_for`) but only a plain name of a project already in the projects folder:
    a URL anyone can send must not open a path on the server nor create a project."""
    name = st.query_params.get(PROJECT_PARAM)
    if not name or name.strip() == demo_project_dir().name:
        return None
    try:
        folder = project_folder_for(name)
        if url_name(folder) == name.strip():  # a plain name, not a path
            Project.open(folder).close()  # an existing project, else ProjectNotFoundError
            return folder
    except (GhistError, OSError):
        pass
    st.info(f"Project “{plain(name)}” not found in the projects folder {plain(default_project_dir())}: "
            "showing the demo project. Open or create a project in the sidebar.", icon=":material/info:")
    return None


def project_key(folder: str | os.PathLike) -> str:
    """A short tag of a project for the keys of widgets that show its data: Streamlit keeps a keyed widget's
    value across reruns and ignores a new ``value=``, so a key holding only a slide id would show one
    project's values for the same slide id in the next (and a Save would write them there)."""
    return hashlib.sha1(str(folder).encode()).hexdigest()[:8]


def project_dir() -> Path:
    init_session()
    return Path(st.session_state[PROJECT_DIR])


def open_project(folder: str | os.PathLike | None = None):
    """The current project (created if the folder is new). Cheap: one SQLite open per rerun."""
    return Project.open_or_create(Path(folder) if folder else project_dir())


@st.cache_resource(show_spinner=False)
def ensure_demo_project(folder: str) -> str:
    """Create the bundled demo project (demo slide, patient DEMO-01) once per folder."""
    project = Project.open_or_create(Path(folder), name="Demo (CMU-1 small region)")
    if len(project.list_slides()) == 0 and DEMO_SLIDE.exists():
        project.add_slide(DEMO_SLIDE, patient_id=DEMO_PATIENT, original_name=DEMO_SLIDE.name)
    return folder


def ensure_demo_on_first_start() -> None:
    """On the first start the demo project exists, whatever page the user lands on."""
    init_session()
    if Path(st.session_state[PROJECT_DIR]) == demo_project_dir():
        ensure_demo_project(str(demo_project_dir()))


# --- cached reads ------------------------------------------------------------------------

@st.cache_resource(show_spinner="Loading prediction…", max_entries=4)
def cached_prediction(folder: str, slide_id: int, run_id: int):
    """The slide's AnnData, shared (read-only) across reruns and sessions; keyed by run."""
    from ghist_core.pipeline.blocks import load_prediction

    adata = load_prediction(open_project(folder), slide_id)
    g = adata.uns.setdefault("ghist", {})
    if isinstance(g, dict) and not g.get("expression_units"):
        try:  # older runs did not record the units; they are the model's
            from ghist_core.model.predict import EXPRESSION_UNITS

            g["expression_units"] = EXPRESSION_UNITS
        except ImportError:
            pass
    return adata


@st.cache_resource(show_spinner=False, max_entries=4)
def cached_grid(folder: str, slide_id: int, run_id: int):
    from ghist_core.pipeline.blocks import load_grid

    try:
        return load_grid(open_project(folder), slide_id)
    except (GhistError, OSError, KeyError):
        return None


@st.cache_data(show_spinner=False, max_entries=32)
def cached_overview(folder: str, slide_id: int, max_px: int = 1536) -> tuple[np.ndarray, tuple[float, ...]]:
    from ghist_core.pipeline.blocks import slide_overview_image

    return slide_overview_image(open_project(folder), slide_id, max_px)


@st.cache_data(show_spinner=False, max_entries=256)
def thumbnail_data_url(path: str, mtime: float, max_px: int = 96) -> str | None:
    """Small JPEG thumbnail as a data URL for table image columns (None if unreadable)."""
    from PIL import Image

    try:
        info = inspect_upload(Path(path))
    except GhistError:
        try:
            from ghist_core.io.slide import open_slide

            with open_slide(Path(path), mpp=1.0) as s:
                thumb = s.thumbnail(max_px)
        except Exception:
            return None
    else:
        thumb = info["thumbnail"]
    im = Image.fromarray(thumb)
    im.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def stain_note(h5ad) -> str:
    """A finished run's stain note ("" when its slide's stain is inside the tested range, or the run has
    no stain check), read once per result file: pages redraw every run's row on each poll."""
    if not h5ad:
        return ""
    path = Path(h5ad)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return ""
    return _stain_note_of(str(path), stamp)


@st.cache_data(show_spinner=False, max_entries=1024)
def _stain_note_of(path: str, mtime_ns: int) -> str:  # mtime: a rewritten file is read again
    from ghist_core.pipeline.worker import stain_check

    record = stain_check(path)
    return str(record.get("note") or "") if record else ""


@st.cache_data(show_spinner=False)
def cached_clinical(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_csv(path)


def release_upload(uploaded: Any) -> None:
    """Drop an ``st.file_uploader`` file's bytes from the server's memory (the page has staged it to disk).

    Streamlit keeps every upload as one ``bytes`` in its in-memory file manager until the user removes
    it from the widget, and a closed tab never does (docs/SECURITY.md §4a); ``st.chat_input`` frees its
    files the same way once read.
    """
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    file_id = getattr(uploaded, "file_id", None)
    if ctx is not None and file_id and isinstance(ctx.uploaded_file_mgr, MemoryUploadedFileManager):
        ctx.uploaded_file_mgr.remove_file(session_id=ctx.session_id, file_id=file_id)


@st.cache_resource(show_spinner=False)
def cached_models() -> list[dict]:
    from ghist_core.weights import resolve as weights

    return weights.list_models()


# --- runs --------------------------------------------------------------------------------

def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def run_field(run: Any, name: str, default: Any = None) -> Any:
    """Read a field of a run record (dataclass, row or dict) without caring which."""
    return _get(run, name, default)


def segmenter_id() -> str | None:
    """The nuclei segmenter for new runs: ``None`` ("auto": the learned model the expression model
    was trained on, else the default one; ``weights.card.run_segmenter``), a bundled learned
    model's name, or ``"classical"``.

    With BatchNorm folded and one forward pass per 512 µm block it segments the demo in
    ~20 s on 2 CPU cores (bench/results/pipeline.json), so the better segmenter is also the
    default on a CPU; "classical" (QuPath-style) stays available and is ~2x faster there.
    """
    init_session()
    choice = st.session_state[SEGMENTER]
    return None if choice in ("auto", None) else str(choice)


def submit(project, slide_id: int, *, uncertainty: bool = False, nucleus_scale: float | str | None = None) -> int:
    """Start a run of a slide with the session's model, device and segmenter (one worker process);
    ``uncertainty`` also records each cell's expression uncertainty (the model's members' spread);
    ``nucleus_scale`` (None: the default scale check) the learned segmenter's scale setting."""
    from ghist_core.pipeline import worker as jobs

    run_id = jobs.submit_run(project.folder, int(slide_id), model_id=st.session_state[MODEL_ID],
                             device=st.session_state[DEVICE], segmenter_id=segmenter_id(),
                             uncertainty=uncertainty, nucleus_scale=nucleus_scale)
    st.session_state[WATCHED_RUNS] = list({*st.session_state[WATCHED_RUNS], run_id})
    return run_id


def slide_label(row: Any) -> str:
    name = _get(row, "original_name") or _get(row, "name") or f"slide {_get(row, 'slide_id')}"
    patient = _get(row, "patient_id")
    return f"{name} · {patient}" if patient else str(name)


def open_project_or_stop():
    """The session's project; a clear message (and nothing else) when it cannot be opened."""
    try:
        return open_project()
    except GhistError as exc:
        st.error(str(exc))
        st.stop()


def finished_slides_or_stop(project, hint: str = "") -> pd.DataFrame:
    """Slides with a finished prediction; otherwise a pointer to the Upload & predict page."""
    done = overview.finished_slides(project)
    if len(done) == 0:
        st.info(f"No slide has a finished prediction yet. Run one on the Upload & predict page{hint}.")
        st.page_link("pages/upload.py", label="Upload & predict", icon=":material/upload_file:")
        st.stop()
    return done


def show_messages(warnings=(), notes=()) -> None:
    """A result's warnings (yellow boxes) and notes (captions), data text shown as text."""
    for w in warnings:
        st.warning(plain(w), icon=":material/warning:")
    for n in notes:
        st.caption(plain(n))


def offer_prepared_download(state_key: str, tag: Any, button_key: str) -> None:
    """The download button of a file made by a 'Prepare' button earlier, while its choices (``tag``) still hold."""
    ready = st.session_state.get(state_key)
    if ready and ready["tag"] == tag:
        made = ready["download"]
        st.download_button(f"Download {made.file_name} ({made.size_text})", data=made.read_bytes,
                           file_name=made.file_name, mime=made.mime, key=button_key,
                           icon=":material/download:", on_click="ignore", type="primary")


def keep_prepared_download(state_key: str, tag: Any, made: Any) -> None:
    """Remember a newly prepared download (the previous one's file is deleted)."""
    from ghist_core import export

    old = st.session_state.get(state_key)
    export.discard_download(old["download"] if old else None)
    st.session_state[state_key] = {"tag": tag, "download": made}
