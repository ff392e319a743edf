"""Which run answers a request for the per-cell expression uncertainty: the worker's locked step
(``ghist predict``), the app's submitted runs and the upload's "wants a run".

The rule: a run made without the uncertainty never answers a request for it (a new run starts);
a run made with it also answers a request without it (its ``X`` is the same: member 0's)."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import pytest

from ghist_core import _keys as K
from ghist_core.pipeline import worker
from ghist_core.project import Project, overview
from ghist_core.project.runs import run_uncertainty

UNC = K.OBS_EXPRESSION_UNCERTAINTY


@pytest.fixture(scope="module")
def ensemble(tiny_ensemble: Path) -> Path:
    return tiny_ensemble


@pytest.mark.parametrize("params, expected", [
    ({}, False),  # a run recorded before the setting existed
    ({"model_id": None, "segmenter_id": "classical"}, False),  # submitted by the app before it
    ({"pipeline": {"block_um": 512.0}}, False),
    ({"pipeline": {"uncertainty": False}}, False),
    ({"pipeline": {"uncertainty": "yes"}}, False),  # only a JSON true counts
    ({"pipeline": None}, False),
    ({"pipeline": {"uncertainty": True}}, True),
])
def test_run_uncertainty_reads_old_runs_as_without(params, expected) -> None:
    assert run_uncertainty(params) is expected


def test_same_settings_compares_the_uncertainty() -> None:
    from ghist_core.paths import DEFAULT_SEGMENTER

    def run(uncertainty: bool | None) -> SimpleNamespace:
        pipeline = {} if uncertainty is None else {"pipeline": {"uncertainty": uncertainty}}
        return SimpleNamespace(params={"model_id": "m", "segmenter_id": None, "default_segmenter": DEFAULT_SEGMENTER,
                                       **pipeline})

    for old in (None, False):  # without: answers only a request without
        assert worker._same_settings(run(old), "m", None)
        assert not worker._same_settings(run(old), "m", None, uncertainty=True)
    assert worker._same_settings(run(True), "m", None, uncertainty=True)
    assert worker._same_settings(run(True), "m", None)  # with: answers both (same X)
    assert not worker._same_settings(run(True), "other", None, uncertainty=True)


def test_same_settings_does_not_reuse_an_auto_run_made_under_another_default() -> None:
    """"auto" meant nuclei-seg before the default segmenter changed: such a run (no default recorded)
    does not answer an "auto" request now; a run that named its segmenter still answers the same name."""
    from ghist_core.paths import DEFAULT_SEGMENTER

    old_auto = SimpleNamespace(params={"model_id": "m", "segmenter_id": None})
    assert DEFAULT_SEGMENTER != worker.PRE_STAIN_DEFAULT_SEGMENTER
    assert not worker._same_settings(old_auto, "m", None)
    named = SimpleNamespace(params={"model_id": "m", "segmenter_id": "nuclei-seg"})
    assert worker._same_settings(named, "m", "nuclei-seg")
    assert not worker._same_settings(named, "m", None)


def _project(tmp_path: Path, png: Path) -> tuple[Project, int]:
    project = Project.create(tmp_path / "proj")
    return project, project.add_slide(png, patient_id="P-001", mpp=0.499).slide_id


def _locked(project: Project, slide_id: int, model: Path, uncertainty: bool) -> worker.SlideRun:
    return worker.predict_slide_locked(project, slide_id, model_id=str(model), segmenter_id="classical",
                                       device="cpu", uncertainty=uncertainty)


def test_asking_for_uncertainty_starts_a_new_run_and_that_run_answers_both(tmp_path, small_slide_png, ensemble):
    project, slide_id = _project(tmp_path, small_slide_png)
    plain = _locked(project, slide_id, ensemble, uncertainty=False)
    assert plain.action == "new" and UNC not in ad.read_h5ad(plain.h5ad_path).obs
    assert worker.uncertainty_note(plain.h5ad_path) is None
    assert _locked(project, slide_id, ensemble, uncertainty=False).action == "existing"

    # newly asked for: the finished run without it is not reused
    asked = _locked(project, slide_id, ensemble, uncertainty=True)
    assert asked.action == "new" and asked.run_id != plain.run_id
    a = ad.read_h5ad(asked.h5ad_path)
    assert UNC in a.obs and (a.obs[UNC] > 0).any()
    assert run_uncertainty(project.get_run(asked.run_id).params)
    assert "3 ensemble members" in worker.uncertainty_note(asked.h5ad_path)

    # the run with it answers a request with it and one without it
    for uncertainty in (True, False):
        again = _locked(project, slide_id, ensemble, uncertainty=uncertainty)
        assert (again.action, again.run_id) == ("existing", asked.run_id)
    assert len(project.list_runs(slide_id)) == 2


def test_submitted_run_records_the_setting_and_its_worker_uses_it(tmp_path, small_slide_png, ensemble, monkeypatch):
    spawned: list[tuple] = []
    monkeypatch.setattr(worker, "_spawn", lambda *args, **kwargs: spawned.append(args) or 0)
    project, slide_id = _project(tmp_path, small_slide_png)
    assert overview.wants_run(project, slide_id) and overview.wants_run(project, slide_id, uncertainty=True)
    run_id = worker.submit_run(project.folder, slide_id, model_id=str(ensemble), device="cpu",
                               segmenter_id="classical")
    assert project.get_run(run_id).params["pipeline"] == {"uncertainty": False, "nucleus_scale": "auto"} and len(spawned) == 1
    project.fail_run(run_id, "stopped for the test")  # not active: the next submission records a new run

    run_id = worker.submit_run(project.folder, slide_id, model_id=str(ensemble), device="cpu",
                               segmenter_id="classical", uncertainty=True)
    assert project.get_run(run_id).params["pipeline"] == {"uncertainty": True, "nucleus_scale": "auto"} and len(spawned) == 2
    # what the spawned worker does with it (in this process: its main() would take over stdout)
    args = argparse.Namespace(project=str(project.folder), slide_id=slide_id, run_id=run_id, device="cpu",
                              model=str(ensemble), segmenter="classical")
    assert worker._work(project, args) == 0
    run = project.get_run(run_id)
    assert run.status == "finished" and run.params["pipeline"]["uncertainty"] is True
    assert UNC in ad.read_h5ad(project.result_files(run_id)["h5ad"]).obs
    # the upload's "wants a run": the finished run with it answers both
    assert not overview.wants_run(project, slide_id) and not overview.wants_run(project, slide_id, uncertainty=True)


def test_upload_wants_a_run_when_the_finished_one_lacks_the_uncertainty(tmp_path, small_slide_png) -> None:
    project, slide_id = _project(tmp_path, small_slide_png)
    run_id = project.start_run(slide_id, model_id="bundled", weights_sha256="", device="cpu",
                               params={"model_id": None, "segmenter_id": None})  # an old run: no setting
    project.finish_run(run_id, n_cells=0, timings={})
    assert not overview.wants_run(project, slide_id)
    assert overview.wants_run(project, slide_id, uncertainty=True)
