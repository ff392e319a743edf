"""A bookmark or a refreshed tab that opens a sub-page first on a freshly started server gets the app.

Streamlit serves the files of ``pages/`` as their own pages ("app", "cell types", ..., "common"),
each run without ``app.py`` (no wide layout, none of its navigation), to every session until some
session has run ``app.py``'s ``st.navigation``; ``app.py`` switches that off when the server
starts. Starts ``streamlit run app.py`` on 127.0.0.1 and drives Debian's Chromium: the first
request of the server is ``/cell_types?project=study1``.
"""

from __future__ import annotations

import re

import pytest

from browser_helpers import StreamlitServer, launch_browser, page_report, require_chromium, wait_app_idle
from ghist_core.project import Project

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NAV_LABELS = ["Home", "Upload & predict", "Gene maps", "Cell types & patients", "Cohort & survival", "Models"]


def nav_labels(page) -> list[str]:
    """The sidebar navigation's entries as shown (the label, without the icon's name)."""
    texts = page.locator('[data-testid="stSidebarNav"] a').all_inner_texts()
    return [t.strip().splitlines()[-1].strip() for t in texts if t.strip()]


@pytest.mark.timeout(240)
def test_a_sub_page_opened_first_after_a_start_shows_the_apps_navigation(tmp_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    projects = tmp_path / "projects"
    with Project.open_or_create(projects / "study1"):
        pass
    log = tmp_path / "streamlit.log"
    with StreamlitServer(projects, log) as server, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(server.url + "/cell_types?project=study1", wait_until="domcontentloaded")
            expect(page.locator('[data-testid="stSidebarNav"] a').first).to_be_visible(timeout=60_000)
            wait_app_idle(page)
            labels = nav_labels(page)
            assert labels == NAV_LABELS, labels  # not the files of pages/: "app", "cell types", "common", ...
            expect(page).to_have_url(re.compile(r"/cell_types\?project=study1$"))
            expect(page.get_by_role("heading", name="Cell types & patients").first).to_be_visible()
            width = page.locator('[data-testid="stMainBlockContainer"]').first.bounding_box()["width"]
            assert width > 1000, f"main column {width:.0f} px wide: not app.py's wide layout"

            page.get_by_role("link", name="Home").click()
            expect(page.get_by_text(re.compile(r"Project folder: .*study1"))).to_be_visible(timeout=60_000)
            wait_app_idle(page)
            assert nav_labels(page) == NAV_LABELS
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{page_report(page, log)}") from exc
        finally:
            browser.close()
