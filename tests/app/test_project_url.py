"""The open project lives in the URL (``?project=study1``) so a page reload or a shared link keeps it;
a URL names only a project already in the projects folder, never a path, and never creates one."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import apptest_kit as kit
from ghist_core.project import Project
from test_home_upload import png_bytes, said

PATIENT = "MRN-55501234"
ORIGINAL = "Doe_Jane_1961-03-02_biopsy.png"
OTHER_PAGES = ["pages/upload.py", "pages/gene_maps.py", "pages/cell_types.py", "pages/cohort.py", "pages/models.py"]


def study1(projects: Path, tmp_path: Path) -> Project:
    """``study1`` in the projects folder: one slide (a patient id and a file name that must stay out of the URL)."""
    project = Project.open_or_create(projects / "study1")
    src = tmp_path / ORIGINAL
    src.write_bytes(png_bytes(4))
    project.add_slide(src, patient_id=PATIENT, mpp=0.5, original_name=ORIGINAL)
    return project


def new_session(query: dict[str, str]) -> AppTest:
    """A new browser session (a reload, a link) on the app's address with ``query``."""
    at = AppTest.from_file(kit.APP, default_timeout=kit.TIMEOUT)
    at.query_params.update(query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_reload_reopens_the_project_the_url_names(projects, tmp_path):
    study1(projects, tmp_path)
    at = new_session({"project": "study1"})
    assert at.session_state["project_dir"] == str(projects / "study1")
    assert {m.label: m.value for m in at.metric}["Slides"] == "1"
    assert at.dataframe[0].value["patient_id"].tolist() == [PATIENT]
    assert not at.info  # no "not found" message
    assert at.query_params == {"project": "study1"}


def test_the_url_names_the_open_project_on_every_page_and_nothing_else(projects, tmp_path):
    study1(projects, tmp_path)
    at = kit.open_page("pages/home.py")
    assert "project" not in at.query_params  # the demo: the bare address
    at.text_input(key="home_project_folder").set_value("study1")
    at.button(key="home_open_project").click().run()
    assert at.query_params == {"project": "study1"}
    for page in OTHER_PAGES:
        at.query_params.clear()  # Streamlit clears a URL's query when the user changes page
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert at.session_state["project_dir"] == str(projects / "study1"), page
        assert at.query_params == {"project": "study1"}, page  # no patient id, no file name
    at.query_params.clear()
    at.switch_page("pages/home.py").run()
    at.button(key="home_demo_project").click().run()
    assert "project" not in at.query_params


def test_a_project_opened_by_path_is_not_put_in_the_url(projects, tmp_path):
    at = kit.open_page("pages/home.py")
    at.text_input(key="home_project_folder").set_value(str(tmp_path / "elsewhere"))
    at.button(key="home_open_project").click().run()
    assert at.session_state["project_dir"] == str(tmp_path / "elsewhere")
    assert "project" not in at.query_params
    assert any("reload" in c.value for c in at.sidebar.caption)  # the user is told it will not survive one


@pytest.mark.parametrize("named", ["nope", "../outside", "elsewhere-abs", "~", "..", ".", "a\nb", "sub/study1"])
def test_a_url_never_opens_a_path_nor_creates_a_project(projects, tmp_path, named):
    outside = Project.open_or_create(tmp_path / "outside")  # a real project outside the projects folder
    outside.close()
    Project.open_or_create(projects / "sub" / "study1").close()
    value = str(tmp_path / "outside") if named == "elsewhere-abs" else named
    at = new_session({"project": value})
    assert at.session_state["project_dir"] == str(projects / "demo")
    assert {m.label: m.value for m in at.metric}["Slides"] == "1"  # the demo, created as on any first start
    assert any("not found" in i and "demo project" in i for i in said(at, "info"))
    assert "project" not in at.query_params
    assert sorted(p.name for p in projects.iterdir()) == ["demo", "sub"]  # nothing created
