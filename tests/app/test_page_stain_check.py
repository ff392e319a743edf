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


def test_home_marks_the_slides_outside_and_counts_them(projects, tmp_path):
    """Home's slide table: a Stain column set only for the slide whose finished run's stain check said
    outside, and one warning counting such slides; none when no slide is outside."""
    from ghist_core.project import Project

    project = Project.open_or_create(tmp_path / "cohort")
    for i, record in enumerate(r for r, _ in CASES):
        png = write_png(tmp_path / f"h{i}.png", synthetic_he((160, 128), seed=i))
        rec = project.add_slide(png, patient_id=f"P{i}", mpp=1.0)
        a = synthetic_prediction(n=200, seed=1)
        if record is not None:
            a.uns["ghist"][K.GHIST_STAIN_CHECK] = record
        register_prediction(project, int(rec.slide_id), a)
    at = open_page_alone("pages/home.py", {"project_dir": str(project.folder)})
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert table["stain"].tolist() == ["", "", "outside the tested range"]
    (warning,) = [w.value for w in at.warning if "stain" in w.value]
    assert warning.startswith("1 slide(s) have a stain outside")

    other = Project.open_or_create(tmp_path / "fine")
    png = write_png(tmp_path / "f.png", synthetic_he((160, 128), seed=5))
    rec = other.add_slide(png, patient_id="Q", mpp=1.0)
    register_prediction(other, int(rec.slide_id), synthetic_prediction(n=200, seed=1))
    at = open_page_alone("pages/home.py", {"project_dir": str(other.folder)})
    assert not at.exception and not [w for w in at.warning if "stain" in w.value]
