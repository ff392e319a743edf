"""Runs outside the Streamlit script: one detached worker process per run.

The app submits a run and returns at once; the worker records stage and
progress in the project store, so the page can poll it, a browser refresh
loses nothing, and a crashed worker leaves a run that can be resumed.
Cancelling drops a ``CANCEL`` file in the run's folder, which the worker checks
between blocks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ghist_core.errors import GhistError
from ghist_core.project import Project, RunStatus

CANCEL_FILE = "CANCEL"


def _spawn(project_folder: Path, run_id: int, slide_id: int, model_id: str | None, device: str,
           segmenter_id: str | None = None) -> int:
    cmd = [sys.executable, "-m", "ghist_core.pipeline.worker", str(project_folder), str(slide_id), str(run_id), "--device", device]
    if model_id:
        cmd += ["--model", model_id]
    if segmenter_id:
        cmd += ["--segmenter", segmenter_id]
    log = Project.open(project_folder).run_dir(run_id) / "worker.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def submit_run(project_folder: str | os.PathLike, slide_id: int, *, model_id: str | None = None, device: str = "auto",
               segmenter_id: str | None = None) -> int:
    """Record a new run for ``slide_id`` and start its worker; returns the run id."""
    project = Project.open(project_folder)
    slide = project.get_slide(slide_id)
    running = project.latest_run(slide.slide_id)
    if running is not None and running.is_active:
        return running.run_id  # never start a second run of a slide already running
    run_id = project.start_run(slide_id, model_id=model_id or "bundled", weights_sha256="", device=device,
                               params={"model_id": model_id, "segmenter_id": segmenter_id}, status=RunStatus.QUEUED)
    _spawn(Path(project_folder), run_id, slide_id, model_id, device, segmenter_id)
    return run_id


def resume_run(project_folder: str | os.PathLike, run_id: int, *, device: str = "auto") -> int:
    """Restart an interrupted, failed or cancelled run where its checkpoints stop."""
    project = Project.open(project_folder)
    run = project.get_run(run_id)
    if run.status is RunStatus.FINISHED:
        return run_id
    (project.run_dir(run_id) / CANCEL_FILE).unlink(missing_ok=True)
    project.requeue_run(run_id)
    _spawn(Path(project_folder), run_id, run.slide_id, run.model_id if run.model_id != "bundled" else None, device,
           run.params.get("segmenter_id"))
    return run_id


def cancel_run(project_folder: str | os.PathLike, run_id: int) -> None:
    project = Project.open(project_folder)
    (project.run_dir(run_id) / CANCEL_FILE).touch()


def _watch_cancel(run_dir: Path, event: threading.Event) -> None:
    while not event.is_set():
        if (run_dir / CANCEL_FILE).exists():
            event.set()
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    from ghist_core.pipeline.blocks import predict_slide

    parser = argparse.ArgumentParser(prog="python -m ghist_core.pipeline.worker", description="GHIST Studio run worker")
    parser.add_argument("project")
    parser.add_argument("slide_id", type=int)
    parser.add_argument("run_id", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--segmenter", default=None, help="segmenter weights id, or 'classical'")
    args = parser.parse_args(argv)
    project = Project.open(args.project)
    cancel = threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(project.run_dir(args.run_id), cancel), daemon=True)
    watcher.start()
    try:
        predict_slide(args.slide_id, project, model_id=args.model, segmenter_id=args.segmenter, device=args.device,
                      run_id=args.run_id, cancel=cancel)
    except GhistError as exc:
        print(f"run {args.run_id} stopped: {exc}", file=sys.stderr)
        _fail_if_pending(project, args.run_id, str(exc))
        return 1
    except Exception as exc:  # e.g. a model that fails to load: never leave a run 'queued' with no worker
        _fail_if_pending(project, args.run_id, f"Unexpected error: {type(exc).__name__}: {exc}")
        raise
    finally:
        cancel.set()
    return 0


def _fail_if_pending(project: Project, run_id: int, message: str) -> None:
    """Errors before the pipeline takes the run over (loading weights) would leave it 'queued' forever."""
    try:
        if project.get_run(run_id).is_active:
            project.fail_run(run_id, message)
    except GhistError:
        pass


if __name__ == "__main__":
    sys.exit(main())
