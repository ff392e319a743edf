"""Shared helpers for the pages under Streamlit's AppTest (``tests/app``): a fresh projects folder,
opening a page through the app's navigation or on its own, a finished prediction recorded
through the store's own API, and the bytes a download button gives on a click."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app.py")
TIMEOUT = 120


def fresh_projects(tmp_path: Path, monkeypatch: Any) -> Path:
    """An empty projects folder for the app (it creates the demo project there on first start),
    the repository as working directory and Streamlit's caches cleared."""
    import streamlit as st

    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    monkeypatch.chdir(REPO)
    st.cache_data.clear()
    st.cache_resource.clear()
    return tmp_path / "projects"


def _run(at: AppTest, session: dict | None) -> AppTest:
    for k, v in (session or {}).items():
        at.session_state[k] = v
    at.run()
    return at


def open_page(page: str, session: dict | None = None, *, timeout: float = TIMEOUT) -> AppTest:
    """``app.py`` run with ``session`` set first, then ``page`` (e.g. ``"pages/upload.py"``) chosen
    in its navigation; no exception allowed."""
    at = _run(AppTest.from_file(APP, default_timeout=timeout), session)
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page_alone(page: str, session: dict | None = None, *, timeout: float = TIMEOUT) -> AppTest:
    """One page file (``"pages/cohort.py"``) run on its own, without the app's navigation."""
    at = _run(AppTest.from_file(str(REPO / page), default_timeout=timeout), session)
    assert not at.exception, [e.value for e in at.exception]
    return at


def register_prediction(project: Any, slide_id: int, adata: Any, *,
                        grid_sizes_um: Iterable[float] | None = (25.0, 50.0, 100.0)) -> int:
    """Record a finished run whose prediction is ``adata`` (its ``.h5ad`` and, unless
    ``grid_sizes_um`` is None, its grid summaries) through the store's own API; returns the run id."""
    from ghist_core.pipeline.blocks import results_dir
    from ghist_core.pipeline.grid import build_grid_pyramid, write_grid

    run_id = project.start_run(int(slide_id), model_id="synthetic", weights_sha256="", device="cpu", params={})
    out = results_dir(project, int(slide_id))
    out.mkdir(parents=True, exist_ok=True)
    h5 = out / f"run_{run_id}.h5ad"
    adata.write_h5ad(h5)
    project.add_result_file(run_id, "h5ad", h5)
    if grid_sizes_um is not None:
        grid = out / f"run_{run_id}.grid.h5"
        write_grid(grid, build_grid_pyramid(adata, tuple(grid_sizes_um)))
        project.add_result_file(run_id, "grid", grid)
    project.finish_run(run_id, n_cells=int(adata.n_obs), timings={})
    return run_id


#: deferred downloads registered by the pages: file id -> the callable a click runs
_DEFERRED: dict[str, Any] = {}


def record_deferred_downloads(monkeypatch: Any) -> None:
    """AppTest drops its media manager after each run: keep the callables a download click would run
    (for :func:`download`); ``monkeypatch`` undoes it after the test."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    original = MediaFileManager.add_deferred
    _DEFERRED.clear()

    def add_deferred(self, data_callable, *args, **kwargs):
        file_id = original(self, data_callable, *args, **kwargs)
        _DEFERRED[file_id] = data_callable
        return file_id

    monkeypatch.setattr(MediaFileManager, "add_deferred", add_deferred)


def download(at: AppTest, key: str) -> tuple[str, bytes]:
    """(label, bytes) of a download button, fetched as the browser would on a click
    (:func:`record_deferred_downloads` first)."""
    button = next(b for b in at.get("download_button") if b.key == key)
    assert button.proto.ignore_rerun  # a click never reruns the page (the file stays the one offered)
    assert button.proto.deferred_file_id  # read from disk on the click, not held in memory before
    return button.proto.label, _DEFERRED[button.proto.deferred_file_id]()
