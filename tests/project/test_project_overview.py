"""What Home and Upload show, computed on a real store: counts, slides by state, latest runs."""

from __future__ import annotations

from pathlib import Path

from ghist_core.project import Project, RunStatus, overview
from project_fixtures import make_png, project  # noqa: F401 (pytest fixtures)


def test_counts_and_slides_by_state(project: Project, make_png, tmp_path: Path) -> None:
    empty = overview.summary(project)
    assert (empty.n_patients, empty.n_slides, empty.n_predicted, empty.n_cells) == (0, 0, 0, 0)
    assert overview.finished_slides(project).empty and overview.slides_not_run(project).empty
    assert not overview.any_active(project.list_runs()) and overview.latest_runs(project).empty

    a, b, c = (project.add_slide(make_png(tmp_path / f"{n}.png", seed=i), mpp=0.5, patient_id=p).slide_id
               for i, (n, p) in enumerate([("a", "P1"), ("b", "P1"), ("c", "P2")]))
    old = project.start_run(a, model_id="m", weights_sha256="s", device="cpu")
    project.finish_run(old, n_cells=100)
    new = project.start_run(a, model_id="m", weights_sha256="s", device="cpu")
    project.finish_run(new, n_cells=120)
    queued = project.start_run(b, model_id="m", weights_sha256="s", device="cpu", status=RunStatus.QUEUED)

    s = overview.summary(project)
    assert (s.n_patients, s.n_slides, s.n_predicted, s.n_cells) == (2, 3, 1, 120)  # latest runs only
    assert list(overview.finished_slides(project)["slide_id"]) == [a]
    assert list(overview.slides_not_run(project)["slide_id"]) == [c]
    latest = overview.latest_runs(project)
    assert list(latest["run_id"]) == [queued, new]
    assert overview.any_active(latest)
    project.cancel_run(queued)
    assert not overview.any_active(project.list_runs())
    assert list(overview.finished_slides(project)["slide_id"]) == [a]


