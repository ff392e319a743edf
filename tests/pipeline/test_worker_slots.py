"""The app's workers compute one (``GHIST_MAX_WORKERS``) at a time per machine: a run submitted
while another computes waits as *queued*, says why, and starts when the other ends."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import pytest

from ghist_core.errors import StoreError
from ghist_core.project.locks import max_workers, take_worker_slot
from ghist_core.project.store import Project
from test_crash_resume import KILL_CONFIG, _spawn_worker, make_kill_slide


def test_slots_cap_holders_and_free_on_release(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GHIST_WORKER_SLOTS_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("GHIST_MAX_WORKERS", "2")
    a, b = take_worker_slot(), take_worker_slot()
    assert {a.slot, b.slot} == {0, 1}
    waited = []
    assert take_worker_slot(poll_s=0.01, stop=lambda: len(waited) > 0, on_wait=lambda: waited.append(1)) is None
    assert waited == [1]  # told once, then stopped
    a.release()
    c = take_worker_slot(stop=lambda: True)
    assert c is not None and c.slot == 0
    b.release(), c.release()


@pytest.mark.parametrize("raw", ["0", "-1", "two"])
def test_a_bad_worker_limit_is_a_clear_error(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("GHIST_MAX_WORKERS", raw)
    with pytest.raises(StoreError, match="GHIST_MAX_WORKERS"):
        max_workers()


def test_a_second_slides_run_waits_queued_then_finishes(tmp_path: Path, demo_slide: Path, tiny_ghist: Path,
                                                         monkeypatch) -> None:
    """A slot held here (as a computing worker would) keeps a submitted run queued with the reason
    in its message; once freed, the worker takes the run and finishes it."""
    monkeypatch.setenv("GHIST_WORKER_SLOTS_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("GHIST_MAX_WORKERS", "1")
    project = Project.create(tmp_path / "proj")
    record = project.add_slide(make_kill_slide(tmp_path, demo_slide, 200), mpp=0.499)
    run_id = project.start_run(record.slide_id, model_id=str(tiny_ghist), weights_sha256="", device="cpu",
                               params={"pipeline": asdict(KILL_CONFIG), "model_id": str(tiny_ghist),
                                       "segmenter_id": "classical"}, status="queued")
    held = take_worker_slot()
    proc = _spawn_worker(project, record.slide_id, run_id, tiny_ghist)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Queued" not in (project.get_run(run_id).message or ""):
            assert proc.poll() is None, "the worker ended instead of waiting for a slot"
            time.sleep(0.05)
        run = project.get_run(run_id)
        assert run.status == "queued" and "GHIST_MAX_WORKERS" in run.message
        time.sleep(1.0)
        assert project.get_run(run_id).status == "queued"  # still waiting while the slot is held
        held.release()
        assert proc.wait(timeout=300) == 0
    finally:
        held.release()
        if proc.poll() is None:
            proc.kill()
    assert project.get_run(run_id).status == "finished"


def test_cancel_while_queued_ends_the_waiting_worker(tmp_path: Path, demo_slide: Path, tiny_ghist: Path,
                                                     monkeypatch) -> None:
    from ghist_core.pipeline import worker as jobs

    monkeypatch.setenv("GHIST_WORKER_SLOTS_DIR", str(tmp_path / "slots"))
    project = Project.create(tmp_path / "proj")
    record = project.add_slide(make_kill_slide(tmp_path, demo_slide, 200), mpp=0.499)
    run_id = project.start_run(record.slide_id, model_id=str(tiny_ghist), weights_sha256="", device="cpu",
                               params={"pipeline": asdict(KILL_CONFIG)}, status="queued")
    with take_worker_slot():
        proc = _spawn_worker(project, record.slide_id, run_id, tiny_ghist)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "Queued" not in (project.get_run(run_id).message or ""):
                time.sleep(0.05)
            jobs.cancel_run(project.folder, run_id)
            assert proc.wait(timeout=60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
    assert project.get_run(run_id).status == "cancelled"
    assert not (project.folder / "results").exists() or not any((project.folder / "results").rglob("*.h5ad"))
