"""Gene maps and the run's box on Upload & predict warn when the run's stain check found the slide's
stain outside the range the nucleus segmenter was trained and tested on (``uns["ghist"]["stain_check"]``),
and say nothing otherwise."""

from __future__ import annotations

import pytest

from ghist_core import _keys as K
from apptest_kit import open_page_alone, register_prediction
from prediction_factory import synthetic_prediction
from slide_factory import synthetic_he, write_png


def _project_with(tmp_path, i: int, record: dict | None):
    from ghist_core.project import Project

    project = Project.open_or_create(tmp_path / f"cohort{i}")
    png = write_png(tmp_path / f"s{i}.png", synthetic_he((160, 128), seed=1))
    rec = project.add_slide(png, patient_id="P1", mpp=1.0)
    a = synthetic_prediction(n=200, seed=1)
    if record is not None:
        a.uns["ghist"][K.GHIST_STAIN_CHECK] = record
    register_prediction(project, int(rec.slide_id), a)
    return project


NOTE = "This slide's stain lies outside the range the nucleus segmenter was trained and tested on: x."
CASES = [(None, False), ({"within_tested_range": True, "note": ""}, False),
         ({"within_tested_range": False, "note": NOTE}, True)]


@pytest.mark.parametrize("page", ["pages/gene_maps.py", "pages/upload.py"])
def test_the_page_warns_only_when_outside(projects, tmp_path, page):
    for i, (record, warns) in enumerate(CASES):
        at = open_page_alone(page, {"project_dir": str(_project_with(tmp_path, i, record).folder)})
        assert not at.exception, [e.value for e in at.exception]
        shown = [w.value.replace("\\", "") for w in at.warning if "stain" in w.value]
        assert shown == ([NOTE] if warns else []), (record, shown)
