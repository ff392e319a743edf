"""``predict_slide`` refuses a slide its reads would enlarge beyond ``MAX_UPSAMPLE_FACTOR`` before a run is recorded.

A slide recorded at 10 µm/px analysed at the segmenter's 0.5 µm/px would be enlarged 20 times:
the nuclei found would be invented. Before, the first block's read refused it, after the run had
started; now ``Slide.check_upsampling`` runs first, like the block-plan check.
"""

from __future__ import annotations

import pytest

from ghist_core.errors import InvalidMppError
from ghist_core.io.slide import MAX_UPSAMPLE_FACTOR
from ghist_core.pipeline import blocks
from ghist_core.project.store import Project


class _Started(Exception):
    """Raised in place of recording a run: the checks before it passed."""


def _predict(project: Project, slide_id: int, tiny_ghist) -> None:
    blocks.predict_slide(slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu")


def test_predict_slide_refuses_an_implausible_upsampling_before_recording_a_run(tmp_path, small_slide_png, tiny_ghist):
    project = Project.create(tmp_path / "proj")
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=10.0)  # 7 mm: a plausible overview scan
    with pytest.raises(InvalidMppError, match=r"enlarge the image 20 times"):
        _predict(project, record.slide_id, tiny_ghist)
    assert project.latest_run(record.slide_id) is None
    assert not (project.folder / "runs").exists() or not any((project.folder / "runs").iterdir())


def test_predict_slide_allows_upsampling_up_to_the_limit(tmp_path, small_slide_png, tiny_ghist, monkeypatch):
    project = Project.create(tmp_path / "proj")
    # the classical segmenter works at 0.5 µm/px: exactly the limit is allowed
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=0.5 * MAX_UPSAMPLE_FACTOR)

    def started(*args, **kwargs):
        raise _Started

    monkeypatch.setattr(Project, "start_run", started)
    with pytest.raises(_Started):
        _predict(project, record.slide_id, tiny_ghist)
