"""A prediction worker killed with SIGKILL at random moments loses nothing.

Each kill is checked the way a user would find the project afterwards: SQLite's own
``PRAGMA integrity_check`` is ``ok``; every recorded result file exists and matches its
recorded sha256 (so no half-written file is ever presented as a result; atomic ``*.part``
temporaries are not results); every block checkpoint on disk reads back; the run is
finished, resumable (queued/interrupted) or failed; resuming it ends with the same
``.h5ad`` expression matrix as an uninterrupted run.

``kill_loop`` is also what ``bench/robustness.py`` runs (≥ 20 kills); this test runs 3.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from ghist_core.io.hashing import sha256_file
from ghist_core.pipeline.blocks import PipelineConfig, predict_slide
from ghist_core.project.store import Project

#: Small blocks so the small test slide has several checkpoints to be killed between.
KILL_CONFIG = PipelineConfig(block_um=64.0, grid_sizes_um=(25.0, 100.0))


def make_kill_slide(folder: Path, demo_slide: Path, size_px: int = 320) -> Path:
    """A ``size_px`` square crop (0.499 µm/px, tissue-rich) of the demo slide, as PNG."""
    from PIL import Image

    from ghist_core.io.slide import open_slide

    out = Path(folder) / "kill_slide.png"
    with open_slide(demo_slide) as s:
        Image.fromarray(s.read_region((800, 1400), 0, (size_px, size_px))).save(out)
    return out
MODES = ("random", "after_first_block", "during_write")


@dataclass
class KillReport:
    """What one kill left behind and whether resuming repaired it."""

    run_id: int
    mode: str
    delay_s: float
    status_after_kill: str
    blocks_done: int
    part_files: int
    integrity_ok: bool
    results_ok: bool
    blocks_readable: bool
    state_ok: bool
    resumed_identical: bool
    lost: bool
    problems: list[str] = field(default_factory=list)


def check_results(project: Project) -> list[str]:
    """Problems with recorded result files (missing, or bytes differing from the recorded sha256)."""
    problems = []
    rows = project._conn().execute("SELECT run_id, kind, path, sha256 FROM result_files").fetchall()
    for r in rows:
        p = project.abspath(r["path"])
        if p.name.endswith(".part"):
            problems.append(f"run {r['run_id']} {r['kind']}: a temporary file is recorded as a result")
        elif not p.is_file():
            problems.append(f"run {r['run_id']} {r['kind']}: recorded file {r['path']} is missing")
        elif sha256_file(p) != r["sha256"]:
            problems.append(f"run {r['run_id']} {r['kind']}: {r['path']} does not match its recorded sha256")
    return problems


def check_blocks(run_dir: Path) -> list[str]:
    """Every checkpoint the resume would trust must read back whole."""
    problems = []
    for p in sorted((run_dir / "blocks").glob("block_*.h5ad")):
        try:
            ad.read_h5ad(p)
        except Exception as exc:  # noqa: BLE001 - any failure means a half-written checkpoint
            problems.append(f"checkpoint {p.name} is unreadable: {type(exc).__name__}")
    return problems


def _worker_env() -> dict[str, str]:
    """The worker computes with as many threads as this process: float sums then agree to the bit.

    (With a different thread count torch may sum convolutions in another order: 1-ulp
    differences. A real resume runs in a worker like the original one, so this is the fair
    comparison.)
    """
    import torch

    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    n = str(torch.get_num_threads())
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
    return env


def _spawn_worker(project: Project, slide_id: int, run_id: int, model_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ghist_core.pipeline.worker", str(project.folder), str(slide_id), str(run_id),
           "--device", "cpu", "--model", str(model_dir), "--segmenter", "classical"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env=_worker_env(), cwd=str(Path(__file__).resolve().parents[2]))


def _wait_running(project: Project, run_id: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> bool:
    """Wait until the worker has taken the run over (imports done); False if it ended first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        run = project.get_run(run_id)
        if run.status != "queued" and run.worker_pid == proc.pid:
            return True
        time.sleep(0.02)
    return False


def _kill_at(mode: str, rng: random.Random, project: Project, run_id: int, proc: subprocess.Popen,
             compute_s: float, slide_id: int) -> float:
    """SIGKILL the worker at a moment chosen by ``mode``; returns seconds after it took the run."""
    t0 = time.monotonic()
    run_dir = project.folder / "runs" / str(run_id)
    result = project.folder / "results" / f"slide_{slide_id}" / f"run_{run_id}.h5ad"
    if mode == "random":
        deadline = t0 + rng.uniform(0.0, compute_s * 1.1)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
    else:
        deadline = t0 + compute_s * 5 + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if mode == "after_first_block" and any((run_dir / "blocks").glob("block_*.h5ad")):
                break
            # this run's result being written (atomic_path's temporary), or just published
            if mode == "during_write" and (result.exists() or any(result.parent.glob(f".{result.name}.*.part"))):
                break
            time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.monotonic() - t0


def kill_loop(
    project: Project,
    slide_id: int,
    model_dir: Path,
    n_runs: int,
    *,
    seed: int = 0,
    config: PipelineConfig = KILL_CONFIG,
) -> tuple[list[KillReport], np.ndarray]:
    """Kill ``n_runs`` fresh worker runs (modes cycle through ``MODES``), check, resume, compare.

    Returns the reports and the reference expression matrix of an uninterrupted run.
    """
    rng = random.Random(seed)
    t = time.perf_counter()
    ref = predict_slide(slide_id, project, model_id=str(model_dir), segmenter_id="classical", device="cpu",
                        config=config)
    compute_s = time.perf_counter() - t
    ref_x = np.asarray(ad.read_h5ad(ref.h5ad_path).X)
    reports = []
    for i in range(n_runs):
        mode = MODES[i % len(MODES)]
        run_id = project.start_run(slide_id, model_id=str(model_dir), weights_sha256="", device="cpu",
                                   params={"pipeline": asdict(config), "model_id": str(model_dir),
                                           "segmenter_id": "classical"}, status="queued")
        proc = _spawn_worker(project, slide_id, run_id, model_dir)
        _wait_running(project, run_id, proc)
        delay = _kill_at(mode, rng, project, run_id, proc, compute_s, slide_id)
        run_dir = project.folder / "runs" / str(run_id)
        problems: list[str] = []
        integrity = project.integrity_check() == "ok"
        if not integrity:
            problems.append("PRAGMA integrity_check is not ok")
        project.mark_interrupted_runs(stale_after_s=0)
        status = project.get_run(run_id).status
        state_ok = status in ("finished", "queued", "interrupted", "failed", "cancelled")
        if not state_ok:
            problems.append(f"run left as {status!r}")
        res_problems = check_results(project)
        blk_problems = check_blocks(run_dir)
        problems += res_problems + blk_problems
        blocks_done = len(list((run_dir / "blocks").glob("block_*.h5ad")))
        parts = len(list(project.folder.rglob("*.part")))
        # resume (in this process: the run continues from its checkpoints)
        if status != "finished":
            predict_slide(slide_id, project, model_id=str(model_dir), segmenter_id="classical", device="cpu",
                          run_id=run_id)
        final = project.get_run(run_id)
        files = project.result_files(run_id)
        lost = final.status != "finished" or "h5ad" not in files or not files["h5ad"].is_file()
        identical = False
        if not lost:
            x = np.asarray(ad.read_h5ad(files["h5ad"]).X)
            identical = x.shape == ref_x.shape and np.array_equal(x, ref_x)
            if not identical:
                problems.append("resumed output differs from the uninterrupted run")
        post = check_results(project)
        if post:
            problems += [f"after resume: {p}" for p in post]
            lost = True
        reports.append(KillReport(run_id, mode, round(delay, 3), status, blocks_done, parts, integrity,
                                  not res_problems, not blk_problems, state_ok, identical, lost, problems))
    return reports, ref_x


def summarise_kills(reports: list[KillReport]) -> dict[str, int]:
    """The ``kills`` block of ``bench/results/robustness.json``."""
    return {
        "runs": len(reports),
        "integrity_ok": sum(r.integrity_ok for r in reports),
        "resumed_identical": sum(r.resumed_identical for r in reports),
        "lost_results": sum(r.lost for r in reports),
    }


def test_sigkilled_worker_loses_nothing(tmp_path: Path, demo_slide: Path, tiny_ghist: Path) -> None:
    project = Project.create(tmp_path / "proj")
    record = project.add_slide(make_kill_slide(tmp_path, demo_slide), mpp=0.499)
    reports, ref_x = kill_loop(project, record.slide_id, tiny_ghist, n_runs=3, seed=1)
    assert ref_x.shape[0] > 20  # the reference really predicted cells
    assert max(r.blocks_done for r in reports) >= 2  # there were checkpoints to lose
    bad = [r for r in reports if r.problems]
    assert not bad, "\n".join(f"run {r.run_id} ({r.mode}, {r.delay_s}s, {r.status_after_kill}): {r.problems}"
                              for r in bad)
    s = summarise_kills(reports)
    assert s == {"runs": 3, "integrity_ok": 3, "resumed_identical": 3, "lost_results": 0}
    # the kills landed at different stages: at least one mid-run (checkpoints but no result yet)
    assert any(r.status_after_kill in ("interrupted", "queued") for r in reports)
    assert project.integrity_check() == "ok"


def test_check_results_detects_a_damaged_result(tmp_path: Path, demo_slide: Path, tiny_ghist: Path) -> None:
    """The checker itself can fail: a result file overwritten after it was recorded is reported."""
    project = Project.create(tmp_path / "proj")
    record = project.add_slide(make_kill_slide(tmp_path, demo_slide, 200), mpp=0.499)
    res = predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                        device="cpu", config=KILL_CONFIG)
    assert check_results(project) == []
    data = res.h5ad_path.read_bytes()
    res.h5ad_path.write_bytes(data[: len(data) // 2])  # what a non-atomic writer killed mid-write leaves
    assert any("sha256" in p for p in check_results(project))
    res.h5ad_path.unlink()
    assert any("missing" in p for p in check_results(project))


def test_cancel_stops_the_worker_keeps_blocks_and_resume_finishes(tmp_path: Path, demo_slide: Path,
                                                                  tiny_ghist: Path) -> None:
    """The page's Cancel (``jobs.cancel_run``): the worker stops between blocks, the run is
    'cancelled' with no result, its finished blocks stay, and Resume completes it."""
    from ghist_core.pipeline import worker as jobs

    project = Project.create(tmp_path / "proj")
    record = project.add_slide(make_kill_slide(tmp_path, demo_slide, 640), mpp=0.499)  # 25 blocks of 64 µm
    run_id = project.start_run(record.slide_id, model_id=str(tiny_ghist), weights_sha256="", device="cpu",
                               params={"pipeline": asdict(KILL_CONFIG), "model_id": str(tiny_ghist),
                                       "segmenter_id": "classical"}, status="queued")
    proc = _spawn_worker(project, record.slide_id, run_id, tiny_ghist)
    assert _wait_running(project, run_id, proc)
    blocks = project.run_dir(run_id) / "blocks"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(blocks.glob("block_*.h5ad")):
        time.sleep(0.05)
    jobs.cancel_run(project.folder, run_id)
    assert proc.wait(timeout=120) == 1  # the worker ends by itself, reporting the stop
    run = project.get_run(run_id)
    assert run.status == "cancelled", (run.status, run.error)
    assert "h5ad" not in project.result_files(run_id)
    kept = len(list(blocks.glob("block_*.h5ad")))
    assert 1 <= kept < 25
    assert check_results(project) == [] and check_blocks(project.run_dir(run_id)) == []
    # Resume: the CANCEL mark is cleared and a new worker finishes from the kept blocks
    jobs.resume_run(project.folder, run_id, device="cpu")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and project.get_run(run_id).status in ("queued", "running"):
        time.sleep(0.2)
    run = project.get_run(run_id)
    assert run.status == "finished", (run.status, run.error)
    assert project.result_files(run_id)["h5ad"].is_file()
    assert check_results(project) == []


def test_a_run_records_the_models_neighbourhood_radius(tmp_path: Path, demo_slide: Path, tiny_ghist: Path) -> None:
    """The predicted-neighbourhood plot names the radius its numbers are for: the merged result keeps
    the model's (the blocks' own records are dropped in the merge)."""
    from ghist_core.analysis.neighbourhoods import model_radius_um
    from ghist_core.model import load_ghist

    project = Project.create(tmp_path / "proj")
    record = project.add_slide(make_kill_slide(tmp_path, demo_slide, 200), mpp=0.499)
    res = predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                        device="cpu", config=KILL_CONFIG)
    expected = load_ghist(str(tiny_ghist), device="cpu").net.cfg.nbhd_radius_um
    assert model_radius_um(ad.read_h5ad(res.h5ad_path, backed="r")) == float(expected)
