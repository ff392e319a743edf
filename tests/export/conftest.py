"""A real small project with one finished prediction (tiny GHIST, classical segmenter), made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from ghist_core.pipeline.blocks import PipelineConfig, load_prediction, predict_slide
from ghist_core.project.store import Project

from testkit import SMALL_SLIDE_MPP as MPP
SMALL = PipelineConfig(block_um=128.0, grid_sizes_um=(25.0, 100.0))


@pytest.fixture(scope="session")
def predicted_project(tmp_path_factory, small_slide_png, tiny_ghist) -> tuple[Path, int]:
    """(project folder, slide id) of a 700 × 700 px crop predicted once; a second slide has no run."""
    folder = tmp_path_factory.mktemp("export_project") / "proj"
    project = Project.create(folder)
    record = project.add_slide(small_slide_png, patient_id="P-001", mpp=MPP)
    predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                  device="cpu", config=SMALL)
    project.close()
    return folder, record.slide_id


@pytest.fixture()
def prediction(predicted_project):
    folder, slide_id = predicted_project
    with Project.open(folder) as project:
        return load_prediction(project, slide_id)
