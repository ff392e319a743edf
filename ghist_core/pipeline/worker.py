"""Runs outside the Streamlit script: one detached worker process per run, and the locked
"predict this slide" step shared by the worker, ``ghist predict`` and ``ghist cohort``.

The app submits a run and returns at once; the worker records stage and
progress in the project store, so the page can poll it, a browser refresh
loses nothing, and a crashed worker leaves a run that can be resumed.
Cancelling drops a ``CANCEL`` file in the run's folder, which the worker checks
between blocks.

One run per slide at a time: every process that computes a slide holds its lock
(:mod:`ghist_core.project.locks`) for the whole run, and a new run is only recorded when
the slide has no active one (:func:`ghist_core.project.runs.claim_run`).

Privacy: the worker's log (``runs/<id>/worker.log``, its stdout and stderr) names the
slide by its id: the original file name, the stored copy's name and the patient id are
replaced wherever they would appear (error messages, warnings, tracebacks).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ghist_core import _keys as K
from ghist_core.errors import GhistError, RunWeightsChangedError, SlideBusyError
from ghist_core.io.atomic import remove_temporaries
from ghist_core.paths import DEFAULT_SEGMENTER
from ghist_core.project import Project, RunStatus
from ghist_core.project import runs as run_store
from ghist_core.project.locks import lock_slide, max_workers, take_worker_slot
from ghist_core.project.runs import run_answers_nucleus_scale, run_uncertainty

_log = logging.getLogger(__name__)

CANCEL_FILE = "CANCEL"
#: The worker's exit status when it found its run taken over by another process (nothing to do).
WORKER_EXIT_BUSY = 4


# --------------------------------------------------------------------------------------------
# privacy: names never reach logs or error output
# --------------------------------------------------------------------------------------------
def identifying_strings(record, *extra: str | os.PathLike | None) -> list[str]:
    """Strings that would identify a patient in a message about this slide: its original name,
    the stored copy's name, the sanitised name inside it, their stems (unless a plain short word
    such as ``slide``), its patient id, and ``extra`` (paths as the user gave them)."""
    names: list[str] = []
    for value in (getattr(record, "original_name", None), getattr(record, "path", None), *extra):
        if value:
            p = Path(str(value))
            names += [str(value), str(p.expanduser().absolute()), p.name]
            sha = getattr(record, "sha256", "") or ""
            if sha and p.name.startswith(sha[:12] + "_"):
                names.append(p.name[13:])  # slides/<sha12>_<sanitised original name>
    for name in list(names):
        stem = Path(name).stem
        if len(stem) >= 8 or (len(stem) >= 3 and not stem.isalpha()):
            names.append(stem)
    pid = getattr(record, "patient_id", None)
    if pid and len(pid) >= 3:
        names.append(pid)
    return sorted({s for s in names if s and len(s) >= 3}, key=len, reverse=True)


def redact(text: str, names: Iterable[str], placeholder: str) -> str:
    """``text`` with every occurrence of ``names`` (longest first) replaced by ``placeholder``."""
    names = [n for n in names if n]
    if not names or not text:
        return text
    pattern = re.compile("|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)))
    return pattern.sub(placeholder, text)


class _RedactingStream(io.TextIOBase):
    """A text stream that redacts identifying strings before writing to the real one."""

    def __init__(self, target, names: list[str], placeholder: str) -> None:
        self._target, self._names, self._placeholder = target, names, placeholder

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._target.write(redact(s, self._names, self._placeholder))
        return len(s)

    def flush(self) -> None:
        self._target.flush()

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return False


# --------------------------------------------------------------------------------------------
# the locked step: resume or start a slide's run, one process at a time
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideRun:
    """What :func:`predict_slide_locked` did: ``action`` is ``"new"``, ``"resumed"`` or ``"existing"``
    (a finished run with the same model and segmenter, and the uncertainty if asked, was already there)."""

    slide_id: int
    run_id: int
    n_cells: int | None
    h5ad_path: Path | None
    action: str


#: "auto" before runs recorded the default segmenter (session 8): runs without the field used it
PRE_STAIN_DEFAULT_SEGMENTER = "nuclei-seg"


def checked_nucleus_scale(value: object) -> float | str | None:
    """A requested ``nucleus_scale``: None (no request), "auto" or a factor as a float; anything else
    a ModelInputError before a run is recorded (``segmentation.model.check_nucleus_scale``)."""
    if value is None:
        return None
    from ghist_core.segmentation.model import check_nucleus_scale

    return check_nucleus_scale(value)


def _same_settings(run, model_id: str | None, segmenter_id: str | None, uncertainty: bool = False,
                   nucleus_scale: float | str | None = None) -> bool:
    """Whether ``run`` answers a request for this model, segmenter and uncertainty setting.

    A run with the uncertainty satisfies a request without it (its ``X`` is the same by design:
    member 0's prediction; the extra column costs nothing to keep), so it is reused or resumed;
    a run without it never satisfies a request with it. A ``nucleus_scale`` asked for explicitly
    must be the run's (:func:`~ghist_core.project.runs.run_nucleus_scale`: 1.0 for a run recorded
    before the setting); None asks for none in particular.
    """
    same_auto = segmenter_id is not None or (  # "auto" means what it meant when the run was made
        run.params.get("default_segmenter", PRE_STAIN_DEFAULT_SEGMENTER) == DEFAULT_SEGMENTER)
    # the classical segmenter has no scale
    same_scale = segmenter_id == "classical" or run_answers_nucleus_scale(run.params, nucleus_scale)
    return (run.params.get("model_id") == model_id and run.params.get("segmenter_id") == segmenter_id
            and same_auto and same_scale and (run_uncertainty(run.params) or not uncertainty))


def _made_by_current_weights(project: Project, run, model_id: str | None, segmenter_id: str | None) -> bool:
    """Whether a finished ``run`` was made by the weights a new run would use now.

    After the bundled model or segmenter changed (an update; "auto" picking another segmenter), the
    old result is kept but is no longer the answer to a new request. When the weights cannot be
    resolved now (offline, say) the run counts as current: a run to replace it could not start either.
    """
    from ghist_core.pipeline.blocks import made_by_changes, read_made_by, stamp_now

    try:
        now = stamp_now(model_id, segmenter_id)
    except GhistError:
        return True
    return not made_by_changes(read_made_by(project.run_dir(run.run_id), run.weights_sha256 or ""), now)


def ghist_uns_entry(h5ad_path: str | os.PathLike | None, key: str):
    """``uns["ghist"][key]`` of a finished run's ``.h5ad``, read without loading the cells; None when
    absent or unreadable."""
    if h5ad_path is None:
        return None
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(h5ad_path, "r") as f:
            node = f.get(f"uns/ghist/{key}")
            return read_elem(node) if node is not None else None
    except (OSError, KeyError, ValueError, TypeError):
        return None


def uncertainty_note(h5ad_path: str | os.PathLike | None) -> str | None:
    """``uns["ghist"]["uncertainty"]`` of a finished run's ``.h5ad`` (what its uncertainty column holds,
    or why it is absent); None when the run did not ask for it."""
    value = ghist_uns_entry(h5ad_path, K.GHIST_UNCERTAINTY)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if value is not None else None


def stain_check(h5ad_path: str | os.PathLike | None) -> dict | None:
    """``uns["ghist"]["stain_check"]`` of a finished run (the slide's stain against the range the
    segmenter was tested on, :mod:`ghist_core.pipeline.stain_check`); None when the run has none
    (classical segmenter, or made before session 15)."""
    value = ghist_uns_entry(h5ad_path, K.GHIST_STAIN_CHECK)
    return value if isinstance(value, dict) else None


def rescaled_share(h5ad_path: str | os.PathLike | None) -> float | None:
    """The share of a finished run's nuclei that the scale check segmented at another factor
    (``uns["ghist"]["nucleus_scale"]``); None when the run has no such record (classical segmenter,
    or made before the check) or did not run the check (a fixed factor, which moves every nucleus
    because it was asked to)."""
    value = ghist_uns_entry(h5ad_path, K.GHIST_NUCLEUS_SCALE)
    try:
        if not isinstance(value, dict) or value.get("setting") != "auto":
            return None
        return float(value["cells_rescaled_fraction"])
    except (KeyError, TypeError, ValueError):
        return None


def sweep_slide_temporaries(project: Project, slide_id: int) -> list[Path]:
    """Delete every ``*.part`` a killed writer left for this slide (results and checkpoints).

    Only call while holding the slide's lock: then no writer of this slide is alive.
    """
    from ghist_core.pipeline.blocks import results_dir

    folders = [results_dir(project, slide_id)]
    for rid in project.list_runs(slide_id)["run_id"]:
        d = project.folder / "runs" / str(int(rid))
        folders += [d, d / "blocks"]
    return [p for f in folders if f.is_dir() for p in remove_temporaries(f, 0.0)]


def predict_slide_locked(project: Project, slide_id: int, *, model_id: str | None = None,
                         segmenter_id: str | None = None, device: str = "auto", progress=None,
                         new_run: bool = False, wait: bool = False,
                         on_wait: Callable[[int | None], None] | None = None,
                         uncertainty: bool = False, nucleus_scale: float | str | None = None) -> SlideRun:
    """Predict a slide already in the project, holding its lock; resume rather than redo.

    Under the lock: runs whose worker died become ``interrupted``; the slide's stale ``*.part``
    files are swept; then the slide's latest run with the same model and segmenter is reused
    when finished, resumed from its checkpoints when resumable, and otherwise (or with
    ``new_run``) a new run starts. A finished run made by other weights than a new run would use
    (an update of the model or segmenter) is kept but not reused; an unfinished one is marked
    failed with that reason (its files stay; a cancelled one stays cancelled) and a new run starts.
    Another process running the slide: ``SlideBusyError`` (or, with ``wait``, wait for it).

    ``uncertainty`` asks for ``obs["expression_uncertainty"]`` (``PipelineConfig.uncertainty``): a
    latest run made without it is then not reused nor resumed (a new run starts), while a run made
    with it also answers a request without it (see :func:`_same_settings`). A resumed run keeps the
    settings it was recorded with. ``nucleus_scale`` (None: ``PipelineConfig``'s default for a new
    run, any for an existing one): the learned segmenter's scale setting; a run made at another is
    neither reused nor resumed.
    """
    from ghist_core.pipeline.blocks import PipelineConfig

    nucleus_scale = checked_nucleus_scale(nucleus_scale)
    with lock_slide(project.folder, slide_id, wait=wait, on_wait=on_wait):
        project.mark_interrupted_runs()
        sweep_slide_temporaries(project, slide_id)
        latest = project.latest_run(slide_id)
        if latest is not None and latest.status is RunStatus.RUNNING:  # alive, but not holding the lock
            raise SlideBusyError(f"Slide {slide_id} is being analysed by another process (run {latest.run_id}, "
                                 f"process {latest.worker_pid}); wait for it to finish.")
        same = latest is not None and _same_settings(latest, model_id, segmenter_id, uncertainty, nucleus_scale)
        if same and not new_run and latest.status is RunStatus.FINISHED and _made_by_current_weights(
                project, latest, model_id, segmenter_id):
            h5ad = project.result_files(latest.run_id).get("h5ad")
            if h5ad is not None and h5ad.is_file():
                return SlideRun(slide_id, latest.run_id, latest.n_cells, h5ad, "existing")
        resume = latest.run_id if same and not new_run and latest.is_resumable else None
        if resume is not None:
            (project.folder / "runs" / str(resume) / CANCEL_FILE).unlink(missing_ok=True)
        config = PipelineConfig(uncertainty=bool(uncertainty),
                                **({} if nucleus_scale is None else {"nucleus_scale": nucleus_scale}))
        result, resumed = _resume_or_start(project, slide_id, resume, config,
                                           model_id=model_id, segmenter_id=segmenter_id, device=device,
                                           progress=progress)
        return SlideRun(slide_id, result.run_id, result.n_cells, result.h5ad_path, "resumed" if resumed else "new")


def _resume_or_start(project: Project, slide_id: int, run_id: int | None, new_config, **kw):
    """``(result, resumed)``: run ``run_id`` to the end from its checkpoints, or, when it is None or its
    checkpoints were made by other weights than the ones now in use, a new run with ``new_config``.

    The one place both the worker and :func:`predict_slide_locked` decide that; a run that cannot be
    resumed is marked failed with the reason (its files stay), so the project says why it stopped.
    ``kw``: :func:`~ghist_core.pipeline.blocks.predict_slide`'s other arguments.
    """
    from ghist_core.pipeline.blocks import predict_slide

    if run_id is not None:
        try:
            return predict_slide(slide_id, project, run_id=run_id, **kw), True
        except RunWeightsChangedError as exc:  # made by other weights: a new run starts
            project.fail_run(run_id, f"{exc} A new run was started.")  # no-op for a cancelled run
            _log.warning("run %s not resumed: %s Starting a new run.", run_id, exc)
    return predict_slide(slide_id, project, config=new_config, **kw), False


# --------------------------------------------------------------------------------------------
# the app's side: submit, resume, cancel
# --------------------------------------------------------------------------------------------
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
               segmenter_id: str | None = None, uncertainty: bool = False,
               nucleus_scale: float | str | None = None) -> int:
    """Record a new run for ``slide_id`` and start its worker; returns the run id.

    A slide that already has an active run (a worker of the app, ``ghist predict`` or a cohort
    task) gets no second one: its run id is returned. ``uncertainty`` and the pipeline's
    ``nucleus_scale`` are recorded in the run's params (``{"pipeline": {...}}``), from which the
    worker's pipeline takes its settings (so a resumed run keeps them); ``nucleus_scale`` None: the
    pipeline's default.
    """
    from ghist_core.pipeline.blocks import PipelineConfig

    nucleus_scale = checked_nucleus_scale(nucleus_scale)
    project = Project.open(project_folder)
    slide = project.get_slide(slide_id)
    project.mark_interrupted_runs()
    params = {"model_id": model_id, "segmenter_id": segmenter_id, "default_segmenter": DEFAULT_SEGMENTER,
              "pipeline": {"uncertainty": bool(uncertainty),
                           "nucleus_scale": PipelineConfig().nucleus_scale if nucleus_scale is None else nucleus_scale}}
    run_id, created = run_store.claim_run(
        project.db, slide.slide_id, model_id=model_id or "bundled", weights_sha256="", device=device,
        params=params, status=RunStatus.QUEUED)
    if created:
        _spawn(Path(project_folder), run_id, slide_id, model_id, device, segmenter_id)
    return run_id


def resume_run(project_folder: str | os.PathLike, run_id: int, *, device: str = "auto") -> int:
    """Restart an interrupted, failed or cancelled run where its checkpoints stop."""
    project = Project.open(project_folder)
    run = project.get_run(run_id)
    if run.status is RunStatus.FINISHED or run.is_active:
        return run_id  # finished, or a worker has it already
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


# --------------------------------------------------------------------------------------------
# the worker process
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghist_core.pipeline.worker", description="GHIST Studio run worker")
    parser.add_argument("project")
    parser.add_argument("slide_id", type=int)
    parser.add_argument("run_id", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--segmenter", default=None, help="segmenter weights id, or 'classical'")
    args = parser.parse_args(argv)
    project = Project.open(args.project)
    try:
        names = identifying_strings(project.get_slide(args.slide_id))
    except GhistError:
        names = []
    placeholder = f"slide {args.slide_id}"
    sys.stdout = _RedactingStream(sys.stdout, names, placeholder)
    sys.stderr = _RedactingStream(sys.stderr, names, placeholder)
    try:
        return _work(project, args)
    except Exception as exc:  # e.g. a model that fails to load: never leave a run 'queued' with no worker
        _fail_if_pending(project, args.run_id, f"Unexpected error: {type(exc).__name__}: {exc}")
        sys.stderr.write(redact("".join(traceback.format_exception(exc)), names, placeholder))
        sys.stderr.flush()
        return 1


def _work(project: Project, args: argparse.Namespace) -> int:
    from ghist_core.pipeline.blocks import PipelineConfig

    run_dir = project.run_dir(args.run_id)
    cancel = threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(run_dir, cancel), daemon=True)
    watcher.start()
    try:
        try:  # one run per slide: wait while another process (ghist predict, another worker) runs it
            lock = lock_slide(project.folder, args.slide_id, wait=True, stop=cancel.is_set,
                              on_wait=lambda pid: project.update_run(
                                  args.run_id, message="Waiting for another run of this slide to finish."))
        except SlideBusyError:  # cancelled while waiting
            project.cancel_run(args.run_id)
            print(f"run {args.run_id} cancelled while waiting for the slide", file=sys.stderr)
            return 1
        with lock:
            project.mark_interrupted_runs()
            run = project.get_run(args.run_id)
            if run.status is RunStatus.FINISHED:
                print(f"run {args.run_id} was finished by another process", file=sys.stderr)
                return 0
            if run.status is RunStatus.RUNNING:  # a live process that does not hold the lock has it
                print(f"run {args.run_id} is run by process {run.worker_pid}; nothing to do", file=sys.stderr)
                return WORKER_EXIT_BUSY
            slot = take_worker_slot(stop=cancel.is_set, on_wait=lambda: project.update_run(
                args.run_id, message=_QUEUE_MESSAGE.format(n=max_workers())))
            if slot is None:  # cancelled while queued
                project.cancel_run(args.run_id)
                print(f"run {args.run_id} cancelled while queued", file=sys.stderr)
                return 1
            with slot:
                sweep_slide_temporaries(project, args.slide_id)
                _resume_or_start(project, args.slide_id, args.run_id,
                                 PipelineConfig.from_params(run.params.get("pipeline")),
                                 model_id=args.model, segmenter_id=args.segmenter, device=args.device, cancel=cancel)
    except GhistError as exc:
        print(f"run {args.run_id} stopped: {exc}", file=sys.stderr)
        _fail_if_pending(project, args.run_id, str(exc))
        return 1
    finally:
        cancel.set()
    return 0


_QUEUE_MESSAGE = ("Queued: {n} run(s) at a time compute on this machine (each uses every core); this one starts "
                  "when one ends. GHIST_MAX_WORKERS raises the limit.")


def _fail_if_pending(project: Project, run_id: int, message: str) -> None:
    """Errors before the pipeline takes the run over (loading weights) would leave it 'queued' forever."""
    try:
        if project.get_run(run_id).is_active:
            project.fail_run(run_id, message)
    except GhistError:
        pass


if __name__ == "__main__":
    sys.exit(main())
