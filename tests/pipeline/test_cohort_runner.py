"""Cohort scale-out on a real Dask LocalCluster (2 worker processes on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from PIL import Image

from ghist_core.pipeline.cohort import ManifestRow, run_cohort
from ghist_core.io.slide import open_slide
from ghist_core.project.store import Project


@pytest.fixture()
def cohort_slides(tmp_path, demo_slide):
    paths = []
    with open_slide(demo_slide) as s:
        for i, (x, y) in enumerate([(600, 1200), (1200, 1900)]):
            p = tmp_path / f"patient{i}.png"
            Image.fromarray(s.read_region((x, y), 0, (600, 600))).save(p)
            paths.append(p)
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide at all")
    return paths, bad


def test_cohort_on_local_cluster_survives_a_killed_worker(tmp_path, cohort_slides, tiny_ghist):
    (good_a, good_b), bad = cohort_slides
    rows = [ManifestRow(str(good_a), "P0", 0.499), ManifestRow(str(bad), "P9", None), ManifestRow(str(good_b), "P1", 0.499)]
    folder = tmp_path / "project"
    Project.create(folder)
    lines: list[str] = []
    out: dict = {}

    def go() -> None:
        out.update(run_cohort(rows, folder, n_workers=2, model_id=str(tiny_ghist), segmenter_id="classical",
                              device="cpu", echo=lines.append))

    thread = threading.Thread(target=go)
    thread.start()
    project = Project.open(folder)
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        runs = project.list_runs()
        active = runs[runs["status"] == "running"] if len(runs) else runs
        if len(active) and active["worker_pid"].notna().any():
            pid = int(active["worker_pid"].dropna().iloc[0])
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.1)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert killed is not None, "no run was seen running, so no worker could be killed"
    assert out["slides"] == 3 and out["finished"] == 2 and out["failed"] == 1
    assert out["stains_outside_tested_range"] == 0  # the classical segmenter: no stain check, none counted
    failed = [r for r in out["results"] if r["status"] == "failed"]
    assert failed[0]["slide"] == str(bad) and "slide" in failed[0]["error"].lower()
    slides = project.list_slides()
    assert sorted(slides["patient_id"]) == ["P0", "P1"]
    for r in out["results"]:
        if r["status"] == "finished":
            assert project.get_run(r["run_id"]).status == "finished" and r["n_cells"] > 0
    assert project.integrity_check() == "ok"


def test_a_cohort_row_runs_at_the_asked_nucleus_scale(tmp_path, cohort_slides, tiny_ghist):
    """``ghist cohort --nucleus-scale 1`` reaches each slide's run (what a Dask worker calls, here in
    process): the run records 1.0; a second row for the same slide asking for "auto" is not answered
    by it; a bad value is refused before any worker starts."""
    from ghist_core.cli import EXIT_INPUT, main
    from ghist_core.pipeline.cohort import predict_one
    from ghist_core.project.runs import run_nucleus_scale

    (good, _), _ = cohort_slides
    folder = str(tmp_path / "proj")
    row = ManifestRow(str(good), "P0", 0.499)
    first = predict_one(folder, row, str(tiny_ghist), "cpu", "nuclei-seg-stain", 1.0)
    second = predict_one(folder, row, str(tiny_ghist), "cpu", "nuclei-seg-stain", "auto")
    project = Project.open(folder)
    assert first["status"] == second["status"] == "finished" and first["run_id"] != second["run_id"]
    assert [run_nucleus_scale(project.get_run(r["run_id"]).params) for r in (first, second)] == [1.0, "auto"]
    # the learned segmenter's runs carry the stain check; the demo's stain is one it was tested on
    assert first["stain_within_tested_range"] is True and first["stain_note"] == ""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_path,patient_id\n{good},P0\n")
    assert main(["cohort", str(manifest), "--project", str(tmp_path / "other"), "--nucleus-scale", "huge"]) == EXIT_INPUT
    assert not (tmp_path / "other").exists()
