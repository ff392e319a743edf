"""A run's checkpoints are stamped with the weights that made them: a run resumed after the
weights changed would merge two models' cells into one result, so it is refused (the app's
Resume) or left as it is while a new run starts (``ghist predict`` / the worker's resume-or-new)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ghist_core.errors import RunCancelledError, RunWeightsChangedError
from ghist_core.pipeline.blocks import MADE_BY_FILE, check_made_by, predict_slide, stamp_made_by
from ghist_core.pipeline.worker import predict_slide_locked
from ghist_core.project import Project
from slide_factory import demo_crop_png

REPO = Path(__file__).resolve().parents[2]


def _block(run_dir: Path) -> None:
    (run_dir / "blocks").mkdir(parents=True, exist_ok=True)
    (run_dir / "blocks" / "block_000000.h5ad").write_bytes(b"a checkpoint")


def test_stamp_is_checked_once_a_block_exists(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stamp = {"weights_sha256": "a" * 64, "segmenter": "classical", "segmenter_sha256": ""}
    other = {**stamp, "weights_sha256": "b" * 64}
    stamp_made_by(run, stamp)
    assert json.loads((run / MADE_BY_FILE).read_text()) == stamp
    check_made_by(run, other)  # no checkpoint yet: nothing to mix
    stamp_made_by(run, other)  # re-stamped by whoever makes the first block
    assert json.loads((run / MADE_BY_FILE).read_text()) == other
    _block(run)
    stamp_made_by(run, stamp)  # kept once a block exists
    check_made_by(run, dict(other))  # the same weights resume
    with pytest.raises(RunWeightsChangedError, match="start a new run"):
        check_made_by(run, stamp)
    with pytest.raises(RunWeightsChangedError, match="segmenter"):
        check_made_by(run, {**other, "segmenter": "nuclei-seg-stain"})


def test_an_unstamped_run_is_judged_by_the_weights_the_store_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _block(run)
    stamp = {"weights_sha256": "a" * 64, "segmenter": "classical", "segmenter_sha256": ""}
    check_made_by(run, stamp)  # nothing recorded: nothing to judge by
    check_made_by(run, stamp, "a" * 64)
    with pytest.raises(RunWeightsChangedError):
        check_made_by(run, stamp, "c" * 64)


def _run_with_one_block(project: Project, slide_id: int, model: Path) -> int:
    """A run cancelled once its first block is checkpointed (resumable, stamped, one block)."""
    cancel = threading.Event()

    def progress(*_args, **_kw) -> None:
        if any(project.folder.glob("runs/*/blocks/block_*.h5ad")):
            cancel.set()

    with pytest.raises(RunCancelledError):
        predict_slide(slide_id, project, model_id=str(model), segmenter_id="classical", device="cpu",
                      cancel=cancel, progress=progress)
    return int(project.list_runs()["run_id"].max())


def test_a_run_made_by_other_weights_is_not_resumed(tmp_path: Path, demo_slide: Path, tiny_ghist: Path) -> None:
    png = demo_crop_png(tmp_path / "crop.png", demo_slide, (600, 1000), 1100)  # 2 x 2 blocks
    project = Project.create(tmp_path / "proj")
    slide_id = project.add_slide(png, mpp=0.499).slide_id
    old = _run_with_one_block(project, slide_id, tiny_ghist)
    stamp_path = project.run_dir(old) / MADE_BY_FILE
    stamp = json.loads(stamp_path.read_text())
    assert stamp["segmenter"] == "classical-watershed" and len(stamp["weights_sha256"]) == 64
    stamp_path.write_text(json.dumps({**stamp, "weights_sha256": "0" * 64}))  # as if the weights were updated since

    with pytest.raises(RunWeightsChangedError):  # resuming that very run
        predict_slide(slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu", run_id=old)
    assert project.get_run(old).status == "cancelled"  # refused before the run changed state

    done = predict_slide_locked(project, slide_id, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu")
    assert done.action == "new" and done.run_id != old and done.n_cells > 20
    assert project.get_run(old).status == "cancelled"  # left as it was, its blocks too
    assert json.loads(stamp_path.read_text())["weights_sha256"] == "0" * 64
    assert len(list(project.run_dir(old).glob("blocks/block_*.h5ad"))) >= 1
    assert json.loads((project.run_dir(done.run_id) / MADE_BY_FILE).read_text()) == stamp


def test_ghist_predict_marks_an_unfinished_run_of_other_weights_failed(tmp_path: Path, demo_slide: Path,
                                                                         tiny_ghist: Path) -> None:
    """An unfinished (resumable) run made by other weights: ``predict_slide_locked`` says why it is not
    resumed on the run itself, keeps its blocks and finishes a new run."""
    png = demo_crop_png(tmp_path / "crop.png", demo_slide, (600, 1000), 1100)
    project = Project.create(tmp_path / "proj")
    slide_id = project.add_slide(png, mpp=0.499).slide_id
    old = _run_with_one_block(project, slide_id, tiny_ghist)
    stamp_path = project.run_dir(old) / MADE_BY_FILE
    stamp_path.write_text(json.dumps({**json.loads(stamp_path.read_text()), "weights_sha256": "0" * 64}))
    project.requeue_run(old)  # resumable again, as after a crash
    done = predict_slide_locked(project, slide_id, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu")
    assert done.action == "new" and done.run_id != old and done.n_cells > 20
    run = project.get_run(old)
    assert run.status == "failed" and "other weights" in run.error and "A new run was started" in run.error
    assert len(list(project.run_dir(old).glob("blocks/block_*.h5ad"))) >= 1


def test_the_apps_resume_of_such_a_run_starts_a_new_one(tmp_path: Path, demo_slide: Path, tiny_ghist: Path) -> None:
    """The app's Resume spawns a worker for the run: it says why it is not resumed and runs a new one."""
    png = demo_crop_png(tmp_path / "crop.png", demo_slide, (600, 1000), 1100)
    project = Project.create(tmp_path / "proj")
    slide_id = project.add_slide(png, mpp=0.499).slide_id
    old = _run_with_one_block(project, slide_id, tiny_ghist)
    stamp_path = project.run_dir(old) / MADE_BY_FILE
    stamp_path.write_text(json.dumps({**json.loads(stamp_path.read_text()), "segmenter": "nuclei-seg"}))
    project.requeue_run(old)  # what worker.resume_run does before it spawns the worker
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "ghist_core.pipeline.worker", str(project.folder), str(slide_id),
                          str(old), "--model", str(tiny_ghist), "--segmenter", "classical", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = project.get_run(old)
    assert run.status == "failed" and "other weights" in run.error and "A new run was started" in run.error
    new = project.latest_run(slide_id)
    assert new.run_id != old and new.status == "finished" and new.n_cells > 20


def test_a_finished_run_made_by_other_weights_is_kept_but_not_reused(tmp_path: Path, demo_slide: Path,
                                                                     tiny_ghist: Path) -> None:
    """After a model update ``ghist predict`` makes a new run; the old result stays as it was."""
    from ghist_core.pipeline.blocks import stamp_now

    png = demo_crop_png(tmp_path / "crop.png", demo_slide, (600, 1000), 600)  # one block
    project = Project.create(tmp_path / "proj")
    slide_id = project.add_slide(png, mpp=0.499).slide_id
    kw = dict(model_id=str(tiny_ghist), segmenter_id="classical", device="cpu")
    first = predict_slide_locked(project, slide_id, **kw)
    stamp_path = project.run_dir(first.run_id) / MADE_BY_FILE
    assert json.loads(stamp_path.read_text()) == stamp_now(str(tiny_ghist), "classical")  # what a run records
    assert predict_slide_locked(project, slide_id, **kw).action == "existing"

    stamp_path.write_text(json.dumps({**json.loads(stamp_path.read_text()), "weights_sha256": "0" * 64}))
    second = predict_slide_locked(project, slide_id, **kw)
    assert second.action == "new" and second.run_id != first.run_id
    assert project.get_run(first.run_id).status == "finished" and first.h5ad_path.is_file()  # kept as it was

    # a run from before stamps: judged by the weights the store recorded for it
    (project.run_dir(second.run_id) / MADE_BY_FILE).unlink()
    assert predict_slide_locked(project, slide_id, **kw).action == "existing"
    with project.db.tx() as c:
        c.execute("UPDATE runs SET weights_sha256 = ? WHERE run_id = ?", ("1" * 64, second.run_id))
    assert predict_slide_locked(project, slide_id, **kw).action == "new"


def test_stamp_now_is_what_a_run_of_the_bundled_model_records(tmp_path: Path, demo_slide: Path) -> None:
    """"auto" with the bundled model: the learned segmenter its card names, read from the cards alone."""
    from ghist_core.pipeline.blocks import stamp_now
    from ghist_core.weights.card import run_segmenter

    png = demo_crop_png(tmp_path / "crop.png", demo_slide, (600, 1000), 300)
    project = Project.create(tmp_path / "proj")
    slide_id = project.add_slide(png, mpp=0.499).slide_id
    done = predict_slide_locked(project, slide_id, device="cpu")
    recorded = json.loads((project.run_dir(done.run_id) / MADE_BY_FILE).read_text())
    now = stamp_now(None, None)
    assert recorded == now and len(now["segmenter_sha256"]) == 64
    from ghist_core.model import load_ghist

    assert now["segmenter"] == run_segmenter(None, load_ghist(device="cpu").card)
    assert predict_slide_locked(project, slide_id, device="cpu").action == "existing"
