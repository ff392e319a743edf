"""End to end in a real browser: upload the SVS, wait for the run, draw gene maps.

Starts ``streamlit run app.py`` on 127.0.0.1 (free port, temporary project folder) and
drives Debian's Chromium through Playwright. Screenshots go to the test's tmp folder.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from browser_helpers import REPO, StreamlitServer, canvas_image, choose_gene, open_app, require_chromium, wait_app_idle  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_upload_run_and_gene_map(tmp_path, svs_path):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with StreamlitServer(tmp_path / "projects", tmp_path / "streamlit.log") as server, sync_playwright() as p:
        browser, page = open_app(p, server)
        page.screenshot(path=str(shots / "01_home.png"), full_page=True)

        # a new project, then upload the real SVS through the file input
        folder = page.get_by_role("textbox", name="Project folder")
        folder.fill(str(tmp_path / "projects" / "browser-study"))
        folder.press("Enter")
        wait_app_idle(page)
        page.get_by_role("button", name="Open / create").click()
        expect(page.get_by_text("browser-study").first).to_be_visible(timeout=30_000)
        wait_app_idle(page)
        page.get_by_role("link", name="Upload & predict").click()
        wait_app_idle(page)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(svs_path))
        expect(page.get_by_text("2,220 × 2,967 px")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("0.4990 µm per px")).to_be_visible()
        page.get_by_role("textbox", name="Patient id").fill("PT-001")
        page.keyboard.press("Tab")
        page.get_by_role("button", name="Add to project").click()
        # The transient "Added …" message is replaced on the next rerun by the lasting
        # confirmation line "<name>: added as slide 1 (patient PT-001)."; accept either.
        expect(page.get_by_text(re.compile(r"CMU-1-Small-Region\.svs:? (?:as|added as) slide 1 \(patient PT-001\)"))
               .first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(shots / "02_uploaded.png"), full_page=True)

        # wait for the worker to finish (the page polls the store)
        open_btn = page.get_by_role("button", name="Open gene map")
        ended = open_btn.or_(page.get_by_role("button", name="Resume"))
        expect(ended.first).to_be_visible(timeout=400_000)
        wait_app_idle(page)
        page.screenshot(path=str(shots / "03_finished.png"), full_page=True)
        if not open_btn.count():
            errors = page.locator('[data-testid="stAlertContentError"], [data-testid="stAlertContentWarning"]')
            pytest.fail("the run did not finish: " + " | ".join(errors.all_inner_texts()))
        open_btn.first.click(timeout=60_000)

        # gene maps: the deck.gl canvas draws tissue + cells
        page.wait_for_selector('[data-testid="stDeckGlJsonChart"] canvas', timeout=120_000)
        wait_app_idle(page)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(shots / "04_gene_map.png"), full_page=True)
        img1 = canvas_image(page)
        Image.fromarray(img1).save(shots / "04_canvas.png")
        h, w = img1.shape[:2]
        centre = img1[h // 4: 3 * h // 4, w // 4: 3 * w // 4].astype(int)
        background = np.array([255, 255, 255])
        non_bg = np.abs(centre - background).sum(axis=2) > 30
        assert non_bg.mean() > 0.2, f"the map's tissue area is mostly blank ({non_bg.mean():.1%} drawn)"

        first_gene = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').first.inner_text()
        other = "IGKC" if "IGKC" not in first_gene else "PTPRC"  # reliable in the bundled card; no other option matches the typed name
        choose_gene(page, other)
        wait_app_idle(page)
        page.wait_for_timeout(2500)
        img2 = canvas_image(page)
        Image.fromarray(img2).save(shots / "05_canvas_other_gene.png")
        page.screenshot(path=str(shots / "05_gene_map_other.png"), full_page=True)
        assert img2.shape == img1.shape
        changed = np.abs(img2.astype(int) - img1.astype(int)).sum(axis=2) > 30
        assert changed.sum() > 300, f"changing the gene did not change the map ({changed.sum()} pixels changed)"
        if os.environ.get("GHIST_SAVE_SCREENSHOT"):
            shutil.copy(shots / "04_gene_map.png", REPO / "docs" / "screenshot.png")
        browser.close()
