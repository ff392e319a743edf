"""``ghist predict`` after a crash, beside another ``ghist predict``, and with stale temporaries.

Real processes, real SIGKILL, real SQLite: a killed ``ghist predict`` is resumed by the next one
(same run id, the same cells and expression as an uninterrupted run); two at once on one slide
make one run; the slide lock is honoured by the CLI (exit 4, or ``--wait``) and by the app's
worker; ``*.part`` files a killed writer left in ``results/`` and ``runs/`` are swept; and the
CLI's and the worker's output never name the file or the patient.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ghist_core.cli import EXIT_BUSY, EXIT_INPUT, EXIT_OK
from ghist_core.project import Project
from ghist_core.project.locks import lock_slide
from slide_factory import demo_crop_png

REPO = Path(__file__).resolve().parents[2]
NAME = "Jane_Doe_1970-01-01.png"
PATIENT = "DOE-JANE-19700101"
IDENTIFYING = [NAME, "Jane_Doe", "Jane", PATIENT]


def _env() -> dict[str, str]:
    """Every ghist process computes with the same thread count: float sums agree to the bit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(slide: Path, project: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ghist_core.cli", "predict", str(slide), "--project", str(project), "--mpp", "0.499",
            "--patient", PATIENT, "--model", str(model), "--segmenter", "classical", "--device", "cpu", *extra]


def _ghist(slide: Path, project: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(slide, project, model, *extra), capture_output=True, text=True, env=_env(),
                          cwd=str(slide.parent), timeout=600)


def _json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _no_names(*texts: str) -> None:
    for text in texts:
        for ident in IDENTIFYING:
            assert ident not in text, (ident, text[-2000:])


@pytest.fixture(scope="module")
def slide(tmp_path_factory, demo_slide: Path) -> Path:
    """A 1100 px crop of the demo (0.499 µm/px: 2 x 2 blocks of 512 µm) named like a patient."""
    return demo_crop_png(tmp_path_factory.mktemp("slide") / NAME, demo_slide, (600, 1000), 1100)


@pytest.fixture(scope="module")
def small(tmp_path_factory, demo_slide: Path) -> Path:
    """A 400 px crop (one block), same identifying name, for the tests that need no checkpoints."""
    return demo_crop_png(tmp_path_factory.mktemp("small") / NAME, demo_slide, (800, 1400), 400)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slide: Path, tiny_ghist: Path) -> tuple[np.ndarray, np.ndarray]:
    """Cell ids and expression of an uninterrupted ``ghist predict``."""
    out = _ghist(slide, tmp_path_factory.mktemp("ref") / "proj", tiny_ghist)
    assert out.returncode == EXIT_OK, out.stderr[-3000:]
    _no_names(out.stderr)
    a = ad.read_h5ad(_json(out.stdout)["h5ad"])
    assert a.n_obs > 20
    return a.obs["cell_id"].to_numpy(), np.asarray(a.X)


def test_sigkilled_predict_is_resumed_by_the_next_one(tmp_path: Path, slide: Path, tiny_ghist: Path,
                                                      reference) -> None:
    folder = tmp_path / "proj"
    proc = subprocess.Popen(_cmd(slide, folder, tiny_ghist), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), cwd=str(slide.parent))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # kill after the first checkpoint
        if any(folder.glob("runs/*/blocks/block_*.h5ad")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "ghist predict ended before its first checkpoint could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    with Project.open(folder) as project:
        (killed,) = project.list_runs()["run_id"].tolist()
        assert project.get_run(killed).status == "running"  # what a SIGKILL leaves: a dead pid
        done_before = len(list(project.run_dir(killed).glob("blocks/block_*.h5ad")))
        assert done_before >= 1

    out = _ghist(slide, folder, tiny_ghist)
    assert out.returncode == EXIT_OK, out.stderr[-3000:]
    line = _json(out.stdout)
    assert line["run_id"] == killed and line["action"] == "resumed"
    assert f"{done_before} of 4 blocks already done" in out.stderr or done_before == 4
    _no_names(out.stderr)
    with Project.open(folder) as project:
        assert project.list_runs()["run_id"].tolist() == [killed]  # no second run
        assert project.get_run(killed).status == "finished"
        assert not list(folder.rglob("*.part"))
    a = ad.read_h5ad(line["h5ad"])
    ids, x = reference
    assert np.array_equal(a.obs["cell_id"].to_numpy(), ids)
    assert np.array_equal(np.asarray(a.X), x)

    again = _ghist(slide, folder, tiny_ghist)  # finished: reported, not recomputed
    assert again.returncode == EXIT_OK and _json(again.stdout)["action"] == "existing"
    fresh = _ghist(slide, folder, tiny_ghist, "--new-run")
    assert fresh.returncode == EXIT_OK and _json(fresh.stdout)["run_id"] != killed


def test_two_concurrent_predicts_make_one_run(tmp_path: Path, small: Path, tiny_ghist: Path) -> None:
    folder = tmp_path / "proj"
    procs = [subprocess.Popen(_cmd(small, folder, tiny_ghist), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=str(small.parent)) for _ in range(2)]
    outs = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in outs)
    assert codes in ([EXIT_OK, EXIT_OK], [EXIT_OK, EXIT_BUSY]), [(rc, err[-1500:]) for _, err, rc in outs]
    for out, err, rc in outs:
        _no_names(err)  # (a success line on stdout echoes the path the user gave, for scripts)
        if rc == EXIT_BUSY:
            _no_names(out)
            assert "another process" in err and _json(out)["status"] == "busy"
    with Project.open(folder) as project:
        runs = project.list_runs()
        assert len(runs) == 1 and runs["status"].tolist() == ["finished"]
    assert len({_json(o)["run_id"] for o, _, rc in outs if rc == EXIT_OK}) == 1


def test_a_held_slide_lock_is_respected_by_cli_and_worker(tmp_path: Path, small: Path, tiny_ghist: Path) -> None:
    """Deterministic: this test holds the slide's lock like a running `ghist predict` would."""
    from ghist_core.pipeline import worker as jobs

    folder = tmp_path / "proj"
    with Project.create(folder) as project:
        rec = project.add_slide(small, patient_id=PATIENT, mpp=0.499)
    lock = lock_slide(folder, rec.slide_id)
    try:
        out = _ghist(small, folder, tiny_ghist)
        assert out.returncode == EXIT_BUSY, out.stderr[-2000:]
        assert f"error: slide {rec.slide_id}: " in out.stderr and "--wait" in out.stderr
        _no_names(out.stdout, out.stderr)
        with Project.open(folder) as project:
            assert project.list_runs().empty  # nothing started
            # the app's worker waits for the lock instead of running beside it
            run_id = jobs.submit_run(folder, rec.slide_id, model_id=str(tiny_ghist), segmenter_id="classical",
                                     device="cpu")
            assert jobs.submit_run(folder, rec.slide_id, model_id=str(tiny_ghist), segmenter_id="classical",
                                   device="cpu") == run_id  # one active run per slide
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "Waiting" not in (project.get_run(run_id).message or ""):
                time.sleep(0.1)
            assert project.get_run(run_id).status == "queued"
            assert "Waiting" in (project.get_run(run_id).message or "")
    finally:
        lock.release()
    with Project.open(folder) as project:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and project.get_run(run_id).status in ("queued", "running"):
            time.sleep(0.2)
        run = project.get_run(run_id)
        assert run.status == "finished", (run.status, run.error)
        assert len(project.list_runs()) == 1
    waited = _ghist(small, folder, tiny_ghist, "--wait")  # the finished app run is reused
    assert waited.returncode == EXIT_OK and _json(waited.stdout)["run_id"] == run_id


def test_part_files_under_results_and_runs_are_swept(tmp_path: Path, small: Path, tiny_ghist: Path) -> None:
    folder = tmp_path / "proj"
    first = _ghist(small, folder, tiny_ghist)
    assert first.returncode == EXIT_OK, first.stderr[-2000:]
    line = _json(first.stdout)
    rid, sid = line["run_id"], line["slide_id"]
    # what kills during the final write and during a checkpoint leave behind
    planted = [folder / "results" / f"slide_{sid}" / f".run_{rid}.h5ad.k1ll3d.part",
               folder / "runs" / str(rid) / "blocks" / ".block_000001.h5ad.k1ll3d.part"]
    for p in planted:
        p.write_bytes(b"half a file")
    again = _ghist(small, folder, tiny_ghist)  # holds the slide lock: sweeps its temporaries at once
    assert again.returncode == EXIT_OK
    assert not [p for p in planted if p.exists()]
    # opening the project sweeps old ones anywhere (no lock needed: nobody writes for an hour)
    for p in planted:
        p.write_bytes(b"half a file")
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    fresh = folder / "results" / f"slide_{sid}" / ".run_99.h5ad.writing.part"
    fresh.write_bytes(b"a writer still at work")
    Project.open(folder).close()
    assert not [p for p in planted if p.exists()] and fresh.exists()


def test_error_paths_never_name_the_file_or_patient(tmp_path: Path, small: Path, tiny_ghist: Path) -> None:
    """A slide whose project copy is damaged: the CLI's stderr and JSON, and the app worker's log,
    say "slide N", never the file name or the patient id."""
    from ghist_core.pipeline import worker as jobs

    folder = tmp_path / "proj"
    with Project.create(folder) as project:
        rec = project.add_slide(small, patient_id=PATIENT, mpp=0.499)
        copy = project.slide_path(rec.slide_id)
    assert "Jane_Doe" in copy.name  # the sanitised name is in the copy's name
    copy.write_bytes(copy.read_bytes()[:200])  # truncated
    out = subprocess.run([sys.executable, "-m", "ghist_core.cli", "predict", str(copy), "--project", str(folder),
                          "--model", str(tiny_ghist), "--segmenter", "classical", "--device", "cpu"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == EXIT_INPUT and "Traceback" not in out.stderr
    _no_names(out.stdout, out.stderr)
    assert _json(out.stdout)["status"] == "failed"
    with Project.open(folder) as project:
        run_id = jobs.submit_run(folder, rec.slide_id, model_id=str(tiny_ghist), segmenter_id="classical",
                                 device="cpu")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and project.get_run(run_id).status in ("queued", "running"):
            time.sleep(0.2)
        run = project.get_run(run_id)
        assert run.status == "failed", run.status
        log = (project.run_dir(run_id) / "worker.log").read_text(errors="replace")
    assert f"slide {rec.slide_id}" in log or "stopped" in log, log
    _no_names(log)
