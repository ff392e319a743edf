"""The full-resolution viewer in a real browser: a 40× close-up shows the slide's own detail.

The demo slide with a prediction whose cells are real nuclei (classical segmenter) in a band right
of the centre, so the slide's centre shows H&E only: there the 40× close-up is compared with the
whole-slide map zoomed to about the same scale in the browser (the ~1,500 px overview,
enlarged): the close-up's Laplacian variance (fine detail) must be well above it. Set
``GHIST_DOCS_SCREENSHOTS=1`` to refresh ``docs/viewer.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from apptest_kit import register_prediction
from browser_helpers import REPO, StreamlitServer, canvas_image, open_gene_maps, require_chromium, set_zoom, wait_app_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]
BAND_UM = (720.0, 980.0)  # cells only in this x band (right of the centre, in tissue)


def laplacian_var(rgb: np.ndarray) -> float:
    g = rgb.astype(float).mean(axis=2)
    lap = g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def demo_with_nuclei(projects: Path, demo_slide: Path) -> None:
    """The demo project with a prediction of the real nuclei in the band."""
    import anndata as ad

    from ghist_core import _keys as K
    from ghist_core.io.slide import open_slide
    from ghist_core.project.store import Project
    from ghist_core.segmentation import load_segmenter
    from ghist_core.viz import palette

    project = Project.open_or_create(projects / "demo", name="Demo")
    rec = project.add_slide(demo_slide, patient_id="DEMO-01", original_name=demo_slide.name)
    with open_slide(project.slide_path(rec.slide_id), mpp=rec.mpp) as s:
        h_um = s.dimensions[1] * s.mpp
        x0, x1 = BAND_UM
        rgb = s.read_region_mpp((x0 / s.mpp, 0), (int((x1 - x0) / s.mpp), int(h_um / s.mpp)), s.mpp)
        _, cells = load_segmenter(kind="classical").segment_tile(rgb, s.mpp)
    n = len(cells)
    assert n > 100
    xy = cells[["x_um", "y_um"]].to_numpy(float) + [BAND_UM[0], 0.0]
    rng = np.random.default_rng(0)
    X = np.stack([xy[:, 1] / 300 + rng.gamma(2, 0.3, n), rng.gamma(2, 1, n)], 1).astype(np.float32)
    obs = pd.DataFrame({"cell_id": np.arange(n), "cell_type": np.array(palette.CELL_TYPES)[rng.integers(0, 4, n)]},
                       index=[f"cell_{i}" for i in range(n)])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["ERBB2", "ESR1"]))
    a.obsm[K.OBSM_SPATIAL] = xy
    a.obsm[K.OBSM_NUCLEUS_RAYS] = cells[[f"ray_{k:02d}" for k in range(16)]].to_numpy(float)
    a.uns["ghist"] = {"expression_units": "log1p counts (synthetic values, real nuclei)"}
    register_prediction(project, rec.slide_id, a)


@pytest.mark.timeout(600)
def test_close_up_shows_full_resolution_detail(tmp_path, demo_slide):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    demo_with_nuclei(tmp_path / "projects", demo_slide)
    shots = tmp_path / "shots"
    shots.mkdir()
    with StreamlitServer(tmp_path / "projects", tmp_path / "streamlit.log") as server, sync_playwright() as p:
        browser, page = open_gene_maps(p, server, (1400, 1100))
        page.wait_for_timeout(2000)

        # the whole-slide map, zoomed in the browser about the slide centre to ~40x
        canvas = page.locator('[data-testid="stDeckGlJsonChart"] canvas').first
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(7):
            page.mouse.wheel(0, -100)
            page.wait_for_timeout(150)
        page.wait_for_timeout(1500)
        overview = canvas_image(page)
        Image.fromarray(overview).save(shots / "overview_zoomed.png")

        set_zoom(page, "40×", tmp_path / "streamlit.log")
        expect(page.get_by_text("40× close-up").first).to_be_visible(timeout=60_000)
        page.wait_for_timeout(2500)
        close = canvas_image(page)
        Image.fromarray(close).save(shots / "close_up.png")
        h, w = close.shape[:2]
        centre = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))
        lv_close, lv_over = laplacian_var(close[centre]), laplacian_var(overview[centre])
        assert close[centre].std() > 10, "the close-up shows no tissue"
        assert lv_close > 2.0 * lv_over, (lv_close, lv_over)

        # nuclei outlined where the cells are: centre the close-up in the band
        x = page.get_by_role("spinbutton", name="centre x (µm)")
        x.fill(str(sum(BAND_UM) / 2))
        x.press("Enter")
        wait_app_idle(page)
        expect(page.get_by_text("nuclei outlined").first).to_be_visible(timeout=60_000)
        page.wait_for_timeout(2500)
        outlined = canvas_image(page)
        Image.fromarray(outlined).save(shots / "outlines.png")
        page.screenshot(path=str(shots / "viewer_page.png"), full_page=False)
        assert not np.array_equal(outlined, close)
        if os.environ.get("GHIST_DOCS_SCREENSHOTS"):
            shutil.copy(shots / "viewer_page.png", REPO / "docs" / "viewer.png")
        browser.close()
