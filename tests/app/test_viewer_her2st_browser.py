"""The close-up viewer on a real HER2ST section (and on the bundled demo slide) with a real prediction,
in a real browser.

A 700 × 700 px crop (≈ 480 µm square at 0.688 µm/px, the full-resolution her2st images' scale;
see ``../shared/data/her2st/README.md``) of section C3 around the middle of its spots, predicted
with the bundled learned segmenter and the bundled ``ghist-her2st`` model on the CPU (the model
reads the learned segmenter's per-nucleus inputs, so the classical segmenter cannot be used).
On Gene maps, ERBB2 at 40×: the page reports outlined nuclei and the close-up canvas carries
fine detail (its Laplacian variance is well above that of the same picture at a quarter of its
resolution, which is what an overview enlarged to 40× would show). Set
``GHIST_DOCS_SCREENSHOTS=1`` to refresh the README's figures ``docs/viewer_her2st.png`` and
``docs/viewer_demo.png`` (the page as shown).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from browser_helpers import REPO, StreamlitServer, canvas_image, choose_gene, open_gene_maps, require_chromium, set_zoom
from testkit import require_shared

pytestmark = [pytest.mark.browser, pytest.mark.slow]
HER2ST_MPP = 0.688  # µm/px of the full-resolution her2st JPEGs (README: 200 µm spot spacing)
SIDE_PX = 700


def laplacian_var(rgb: np.ndarray) -> float:
    g = rgb.astype(float).mean(axis=2)
    lap = g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def low_res(rgb: np.ndarray, factor: int = 4) -> np.ndarray:
    """``rgb`` at 1/``factor`` of its resolution, enlarged back to its size."""
    im = Image.fromarray(rgb)
    small = im.resize((max(1, im.width // factor), max(1, im.height // factor)), Image.BILINEAR)
    return np.asarray(small.resize(im.size, Image.BILINEAR))


def her2st_crop(her2st: Path, out: Path, section: str = "C3", side: int = SIDE_PX) -> Path:
    """A ``side``-px square of ``section``'s H&E around the median of its spots (tissue), as PNG."""
    spots = pd.read_csv(her2st / "spots" / f"{section}_selection.tsv", sep="\t")
    cx, cy = float(np.median(spots["pixel_x"])), float(np.median(spots["pixel_y"]))
    Image.MAX_IMAGE_PIXELS = None  # ~9,300 × 9,900 px
    with Image.open(her2st / "images" / f"{section}.jpg") as im:
        x0, y0 = int(cx - side / 2), int(cy - side / 2)
        im.crop((x0, y0, x0 + side, y0 + side)).convert("RGB").save(out)
    return out


def _close_up_outlines_real_nuclei(tmp_path: Path, crop: Path, mpp: float, patient: str, name: str,
                                   figure: str) -> None:
    """Predict ``crop`` with the bundled models, open Gene maps at 40× on ERBB2 and check the close-up."""
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    from ghist_core.pipeline.blocks import load_prediction, predict_slide
    from ghist_core.project.store import Project

    project = Project.open_or_create(tmp_path / "projects" / "demo", name=name)  # the app opens "demo" first
    rec = project.add_slide(crop, patient_id=patient, original_name=name, mpp=mpp)
    predict_slide(rec.slide_id, project, device="cpu")  # bundled learned segmenter + ghist-her2st
    adata = load_prediction(project, rec.slide_id)
    assert adata.n_obs > 50 and "ERBB2" in adata.var_names

    shots = tmp_path / "shots"
    shots.mkdir()
    with StreamlitServer(tmp_path / "projects", tmp_path / "streamlit.log") as server, sync_playwright() as p:
        browser, page = open_gene_maps(p, server, (1400, 1100))
        choose_gene(page, "ERBB2", include_unreliable=True)  # ERBB2 does not beat the floor
        set_zoom(page, "40×", tmp_path / "streamlit.log")
        expect(page.get_by_text("40× close-up").first).to_be_visible(timeout=60_000)
        label = page.get_by_text(re.compile(r"[\d,]+ nuclei outlined")).first
        expect(label).to_be_visible(timeout=60_000)
        n_outlined = int(re.search(r"([\d,]+) nuclei outlined", label.inner_text()).group(1).replace(",", ""))
        assert n_outlined > 0
        page.wait_for_timeout(2500)
        close = canvas_image(page)
        Image.fromarray(close).save(shots / "close_up.png")
        page.screenshot(path=str(shots / "viewer_page.png"), full_page=False)

        h, w = close.shape[:2]
        centre = close[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
        assert centre.std() > 10, "the close-up shows no tissue"
        lv_full, lv_low = laplacian_var(centre), laplacian_var(low_res(centre))
        assert lv_full > 2.0 * lv_low, (lv_full, lv_low)
        if os.environ.get("GHIST_DOCS_SCREENSHOTS"):
            shutil.copy(shots / "viewer_page.png", REPO / "docs" / figure)
        browser.close()


@pytest.mark.timeout(1200)
def test_close_up_of_a_her2st_section_outlines_real_nuclei(tmp_path):
    her2st = require_shared("her2st", "images", "C3.jpg").parent.parent
    crop = her2st_crop(her2st, tmp_path / "C3_crop.png")
    _close_up_outlines_real_nuclei(tmp_path, crop, HER2ST_MPP, "HER2ST-C", "C3 crop", "viewer_her2st.png")


@pytest.mark.timeout(1200)
def test_close_up_of_the_demo_slide_outlines_real_nuclei(tmp_path, demo_slide):
    """The same on the bundled demo slide (runs without the shared data): a 1,000 px square of tissue."""
    from ghist_core.io.slide import open_slide

    with open_slide(demo_slide) as s:
        mpp = s.mpp
        rgb = s.read_region((600, 900), 0, (1000, 1000))[..., :3]
    crop = tmp_path / "demo_crop.png"
    Image.fromarray(np.ascontiguousarray(rgb)).save(crop)
    _close_up_outlines_real_nuclei(tmp_path, crop, mpp, "DEMO-01", "CMU-1 region", "viewer_demo.png")
