"""Gene maps warns when the run's stain check found the slide's stain outside the range the nucleus
segmenter was trained and tested on (``uns["ghist"]["stain_check"]``), and says nothing otherwise."""

from __future__ import annotations

from ghist_core import _keys as K
from apptest_kit import open_page_alone, register_prediction
from prediction_factory import synthetic_prediction
from slide_factory import synthetic_he, write_png


def test_gene_maps_warns_only_when_outside(projects, tmp_path):
    from ghist_core.project import Project

    def stain_warnings(i: int, record: dict | None) -> list[str]:
        project = Project.open_or_create(tmp_path / f"cohort{i}")
        png = write_png(tmp_path / f"s{i}.png", synthetic_he((160, 128), seed=1))
        rec = project.add_slide(png, patient_id="P1", mpp=1.0)
        a = synthetic_prediction(n=200, seed=1)
        if record is not None:
            a.uns["ghist"][K.GHIST_STAIN_CHECK] = record
        register_prediction(project, int(rec.slide_id), a)
        at = open_page_alone("pages/gene_maps.py", {"project_dir": str(project.folder)})
        assert not at.exception, [e.value for e in at.exception]
        return [w.value.replace("\\", "") for w in at.warning if "stain" in w.value]

    assert stain_warnings(0, None) == [] and stain_warnings(1, {"within_tested_range": True, "note": ""}) == []
    note = "This slide's stain lies outside the range the nucleus segmenter was trained and tested on: x."
    (shown,) = stain_warnings(2, {"within_tested_range": False, "note": note})
    assert shown.startswith("This slide's stain lies outside")
