"""A browser reload keeps the open project (README: "a browser refresh loses nothing"), on any page.

Starts ``streamlit run app.py`` on 127.0.0.1 with a projects folder holding ``study1`` and drives
Debian's Chromium: open study1 in the sidebar, reload, change page through the navigation, reload
again; the address names the project and nothing else; an unknown name shows the demo and says so.
"""

from __future__ import annotations

import re

import pytest

from browser_helpers import StreamlitServer, open_app, page_report, require_chromium, wait_app_idle, wait_rerun
from ghist_core.project import Project
from test_home_upload import png_bytes

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PATIENT = "MRN-55501234"
ORIGINAL = "Doe_Jane_1961-03-02_biopsy.png"


def reload(page) -> None:
    """F5: a new Streamlit session on the same address."""
    from playwright.sync_api import expect

    page.reload(wait_until="domcontentloaded")
    expect(page.get_by_role("link", name="Home")).to_be_visible(timeout=60_000)
    wait_rerun(page)


@pytest.mark.timeout(300)
def test_a_reload_keeps_the_open_project_on_every_page(tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    projects = tmp_path / "projects"
    src = tmp_path / ORIGINAL
    src.write_bytes(png_bytes(4))
    with Project.open_or_create(projects / "study1") as study:
        study.add_slide(src, patient_id=PATIENT, mpp=0.5, original_name=ORIGINAL)
    log = tmp_path / "streamlit.log"
    study_folder = re.compile(r"Project folder: .*study1")
    with StreamlitServer(projects, log) as server, sync_playwright() as p:
        browser, page = open_app(p, server)
        try:
            box = page.get_by_role("textbox", name="Project folder")
            box.fill("study1")
            box.press("Enter")
            wait_app_idle(page)
            page.get_by_role("button", name="Open / create").click()
            expect(page.get_by_text(study_folder)).to_be_visible(timeout=30_000)
            wait_app_idle(page)
            expect(page).to_have_url(re.compile(r"[?&]project=study1$"))

            reload(page)
            expect(page.get_by_text(study_folder)).to_be_visible(timeout=30_000)

            page.get_by_role("link", name="Upload & predict").click()
            expect(page).to_have_url(re.compile(r"/upload\?project=study1$"), timeout=30_000)
            wait_app_idle(page)
            reload(page)
            expect(page).to_have_url(re.compile(r"/upload\?project=study1$"), timeout=30_000)
            page.get_by_role("link", name="Home").click()
            expect(page.get_by_text(study_folder)).to_be_visible(timeout=30_000)
            assert PATIENT not in page.url and "Doe" not in page.url

            # a name the projects folder does not hold: the demo, said so, nothing created
            page.goto(server.url + "/?project=nope", wait_until="domcontentloaded")
            expect(page.get_by_text(re.compile(r"not found in the projects folder"))).to_be_visible(timeout=60_000)
            expect(page.get_by_text(re.compile(r"Project folder: .*demo"))).to_be_visible()
            wait_app_idle(page)
            assert "project=" not in page.url
            assert not (projects / "nope").exists()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{page_report(page, log)}") from exc
        finally:
            browser.close()
