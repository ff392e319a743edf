"""GHIST Studio entry point: page setup and navigation only (run: ``streamlit run app.py``)."""

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="GHIST Studio", page_icon="🔬", layout="wide", initial_sidebar_state="expanded")


@st.cache_resource(show_spinner=False)
def _on_server_start() -> int:
    """Once per server process: delete staged uploads a stopped server or closed tab left behind
    (whole slides, label images included; docs/SECURITY.md §2)."""
    from ghist_core.project.uploads import sweep_all_staged_uploads

    return len(sweep_all_staged_uploads())


_on_server_start()

_HERE = Path(__file__).resolve().parent
_pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/upload.py", title="Upload & predict", icon=":material/upload_file:", url_path="upload"),
    st.Page("pages/gene_maps.py", title="Gene maps", icon=":material/map:", url_path="gene_maps"),
    st.Page("pages/cell_types.py", title="Cell types & patients", icon=":material/bar_chart:", url_path="cell_types"),
]
if (_HERE / "pages" / "cohort.py").exists():
    _pages.append(st.Page("pages/cohort.py", title="Cohort & survival", icon=":material/monitoring:", url_path="cohort"))
_pages.append(st.Page("pages/models.py", title="Models", icon=":material/memory:", url_path="models"))

st.navigation(_pages).run()
