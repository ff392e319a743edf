"""GHIST Studio entry point: page setup and navigation only (run: ``streamlit run app.py``)."""

from pathlib import Path

import streamlit as st

if __name__ != "__main__":
    # Imported, not run as a page: ``streamlit run app.py`` finds ``app`` (an st.App) and imports this file
    # once in the server process; every browser session runs it as the page script (__name__ "__main__").
    # Why: with a pages/ folder next to this file, Streamlit gives every session the old pages/-folder
    # navigation (each file of pages/ a page of its own, run without this script: "app", "cell types", ...,
    # "common", narrow layout) until some session has called st.navigation below; see
    # PagesManager.uses_pages_directory in streamlit/runtime/pages_manager.py and its use in
    # runtime/scriptrunner/script_runner.py. So a bookmark of /cell_types opened first after a start got
    # that. The startup hook says, before any session, that this app's pages come from st.navigation.
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def _pages_from_navigation(_app):
        from streamlit.runtime.pages_manager import PagesManager

        PagesManager.uses_pages_directory = False
        yield

    app = st.App(__file__, lifespan=_pages_from_navigation)

else:
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
