"""Gene maps says when the segmenter's scale check segmented nuclei at another factor (they looked
larger than its training nuclei: large tumour nuclei, or a µm per pixel that is too large), and
says nothing when every nucleus was segmented as stated or the result predates the column."""

from __future__ import annotations

import numpy as np
import pytest

from ghist_core import _keys as K
from apptest_kit import open_page_alone, register_prediction
from prediction_factory import synthetic_prediction
from slide_factory import synthetic_he, write_png


def _project(tmp_path, factors: np.ndarray | None):
    from ghist_core.project import Project

    project = Project.open_or_create(tmp_path / "cohort")
    png = write_png(tmp_path / "s.png", synthetic_he((160, 128), seed=1))
    rec = project.add_slide(png, patient_id="P1", mpp=1.0)
    a = synthetic_prediction(n=400, seed=1)
    a.uns["ghist"]["mpp"] = 1.0
    if factors is not None:
        a.obs[K.OBS_NUCLEUS_SCALE] = factors.astype(np.float32)
    register_prediction(project, int(rec.slide_id), a)
    return project


def _infos(at) -> list[str]:
    return [i.value.replace("\\", "") for i in at.info]  # plain() escapes Markdown


@pytest.mark.parametrize("factors", [None, np.ones(400)])
def test_no_note_when_nothing_was_rescaled(projects, tmp_path, factors):
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(_project(tmp_path, factors).folder)})
    assert not at.exception, [e.value for e in at.exception]
    assert not [m for m in _infos(at) if "scale" in m]


def test_the_note_gives_the_share_the_factor_and_what_to_check(projects, tmp_path):
    factors = np.where(np.arange(400) < 100, 2.0 / 3.0, 1.0)
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(_project(tmp_path, factors).folder)})
    assert not at.exception, [e.value for e in at.exception]
    (note,) = [m for m in _infos(at) if "scale" in m]
    assert note.startswith("25% of the nuclei were segmented at 0.67× scale")
    assert "1 µm per pixel" in note and "Home page (Edit or delete)" in note


def test_a_factor_set_for_the_run_is_said_as_such(projects, tmp_path):
    """A run made at a fixed factor (``ghist predict --nucleus-scale 0.8``): every nucleus is at 0.8
    because it was asked; the note says so and does not suggest a wrong resolution."""
    from ghist_core.project import Project

    project = Project.open_or_create(tmp_path / "cohort")
    png = write_png(tmp_path / "s.png", synthetic_he((160, 128), seed=1))
    rec = project.add_slide(png, patient_id="P1", mpp=1.0)
    a = synthetic_prediction(n=400, seed=1)
    a.obs[K.OBS_NUCLEUS_SCALE] = np.full(400, 0.8, np.float32)
    a.uns["ghist"][K.GHIST_NUCLEUS_SCALE] = {"setting": 0.8, "cells_rescaled_fraction": 1.0}
    register_prediction(project, int(rec.slide_id), a)
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(project.folder)})
    assert not at.exception, [e.value for e in at.exception]
    (note,) = [m for m in _infos(at) if "scale" in m]
    assert note.startswith("100% of the nuclei were segmented at 0.8× scale, the factor set for this run")
    assert "resolution" not in note
