"""A run's checkpoints are stamped with the weights that made them: a run resumed after the
weights changed would merge two models' cells into one result, so it is refused (the app's
Resume) or left as it is while a new run starts (``ghist predict`` / the worker's resume-or-new)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ghist_core.errors import RunCancelledError, RunWeightsChangedError
from ghist_core.pipeline.blocks import MADE_BY_FILE, check_made_by, predict_slide
from ghist_core.pipeline.worker import predict_slide_locked
from ghist_core.project import Project
from slide_factory import demo_crop_png


def test_stamp_is_written_once_and_checked(tmp_path: Path) -> None:
    stamp = {"weights_sha256": "a" * 64, "segmenter": "classical", "segmenter_sha256": ""}
    check_made_by(tmp_path / "run", stamp)
    assert json.loads((tmp_path / "run" / MADE_BY_FILE).read_text()) == stamp
    check_made_by(tmp_path / "run", dict(stamp))  # the same weights resume
    with pytest.raises(RunWeightsChangedError, match="start a new run"):
        check_made_by(tmp_path / "run", {**stamp, "weights_sha256": "b" * 64})
    with pytest.raises(RunWeightsChangedError, match="segmenter"):
        check_made_by(tmp_path / "run", {**stamp, "segmenter": "nuclei-seg-stain"})


def test_a_run_made_by_other_weights_is_not_resumed(tmp_path: Path, demo_slide: Path, tiny_ghist: Path) -> None:
    png = demo_crop_png(tmp_path / "crop.png", demo_slide, (600, 1000), 1100)  # 2 x 2 blocks
    project = Project.create(tmp_path / "proj")
    slide_id = project.add_slide(png, mpp=0.499).slide_id
    cancel = threading.Event()
    cancel.set()  # stops before the first block: a cancelled, resumable run, already stamped
    with pytest.raises(RunCancelledError):
        predict_slide(slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu",
                      cancel=cancel)
    (old,) = project.list_runs()["run_id"].tolist()
    stamp_path = project.run_dir(old) / MADE_BY_FILE
    stamp = json.loads(stamp_path.read_text())
    assert stamp["segmenter"] == "classical-watershed" and len(stamp["weights_sha256"]) == 64
    stamp_path.write_text(json.dumps({**stamp, "weights_sha256": "0" * 64}))  # as if the weights were updated since

    with pytest.raises(RunWeightsChangedError):  # the app's Resume of that very run
        predict_slide(slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu", run_id=old)
    run = project.get_run(old)
    assert run.status == "failed" and "other weights" in (run.error or "")

    done = predict_slide_locked(project, slide_id, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu")
    assert done.action == "new" and done.run_id != old and done.n_cells > 20
    assert json.loads(stamp_path.read_text())["weights_sha256"] == "0" * 64  # the old run is left as it was
    assert json.loads((project.run_dir(done.run_id) / MADE_BY_FILE).read_text()) == stamp
