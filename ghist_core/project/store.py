"""``Project``: one object for a project folder, delegating each job to its own module.

A project folder holds::

    project.sqlite        patients, slides, runs, result files, clinical tables   (db)
    slides/               copies of the slides, under sanitised names             (slides, files)
    clinical/             clinical tables exactly as uploaded                     (clinical_tables)
    runs/<run_id>/        checkpoints of a run (pipeline's business)              (results)
    results/              result files (pipeline's business; recorded here)       (results)

Run statuses and their moves are in :mod:`ghist_core.project.runs`; staging browser uploads in
:mod:`ghist_core.project.uploads`. Editing a slide (:meth:`Project.update_slide`: a new µm/px
deletes the slide's runs, which were computed at the old scale) and deleting slides, patients and
runs go through :mod:`ghist_core.project.deletions`: rows and a journal of files in one
transaction, then the files; opening a project finishes a deletion a killed process left half done. Safe to share between threads (each thread gets its own
connection) and between processes (SQLite WAL + busy timeout).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ghist_core.errors import ProjectNotFoundError, StoreError
from ghist_core.io.atomic import remove_temporaries
from ghist_core.project import clinical_tables, deletions, results, runs, slides
from ghist_core.project.db import DB_NAME, ProjectDB
from ghist_core.project.runs import STALE_HEARTBEAT_S, RunRecord, RunStatus
from ghist_core.project.slides import KEEP, SlideEdit, SlideRecord

__all__ = ["Project", "project_folder_for"]


def project_folder_for(text: str | os.PathLike) -> Path:
    """The folder a project chooser's text means.

    A plain name (``study1``: no ``/`` or ``\\``, not ``~``, ``.`` or ``..``) is a project under the
    projects folder (:func:`ghist_core.paths.default_project_dir`); anything else is a path
    (``~`` expanded; a relative path stays relative to the working folder). Empty text or control
    characters raise :class:`StoreError`.
    """
    from ghist_core.paths import default_project_dir

    raw = os.fspath(text)
    name = raw.strip()
    if not name:
        raise StoreError("Type a project name (e.g. study1) or a folder path.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise StoreError("A project name cannot contain control characters (such as a line break or tab).")
    is_path = ("/" in name or "\\" in name or name.startswith("~") or name in (".", "..")
               or os.path.isabs(name))
    return Path(name).expanduser() if is_path else default_project_dir() / name

#: The folders every project has.
_SUBFOLDERS = ("slides", "clinical", "runs", "results")


class Project:
    """A GHIST Studio project folder and its SQLite store. Use as a context manager or call :meth:`close`."""

    #: a temporary file untouched this long belongs to a process that died mid-write
    STALE_TEMP_S = 3600.0

    def __init__(self, folder: str | os.PathLike, *, _create: bool = False, name: str | None = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.db_path = self.folder / DB_NAME
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"{self.folder} is a file, not a folder; a project is a folder. Choose another path.")
        if not self.db_path.is_file():
            if not _create:
                raise ProjectNotFoundError(
                    f"{self.folder} is not a GHIST Studio project (no {DB_NAME} in it). Create a project first."
                )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for sub in _SUBFOLDERS:
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Could not create the project folder {self.folder} ({exc.strerror or exc}). "
                             "Check the path and its permissions.") from exc
        self.db = ProjectDB(self.folder, name=name)
        self.sweep_stale_temp_files()
        deletions.finish_pending_removals(self.db)  # deletions a killed process left half done

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, name: str | None = None) -> "Project":
        """Make a new project in ``folder`` (created if needed); an existing project is an error."""
        if (Path(folder).expanduser() / DB_NAME).exists():
            raise StoreError(f"{folder} already holds a GHIST Studio project; open it instead.")
        return cls(folder, _create=True, name=name)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Project":
        """Open an existing project (upgrading its schema if it is older); else ProjectNotFoundError."""
        return cls(folder)

    @classmethod
    def open_or_create(cls, folder: str | os.PathLike, name: str | None = None) -> "Project":
        """Open ``folder``'s project, creating it first if there is none (safe when processes race)."""
        return cls(folder, _create=True, name=name)

    @property
    def name(self) -> str:
        return self.db.meta("name") or self.folder.name

    @property
    def schema_version(self) -> int:
        return self.db.schema_version

    def __repr__(self) -> str:
        return f"Project({str(self.folder)!r})"

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (tests and maintenance read raw rows through it)."""
        return self.db.conn()

    def close(self) -> None:
        """Close every connection this object opened."""
        self.db.close()

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abspath(self, rel: str) -> Path:
        """Absolute path of a path stored relative to the project folder."""
        return self.db.abspath(rel)

    # -- maintenance -----------------------------------------------------------------------
    def integrity_check(self) -> str:
        """SQLite's own consistency check (``"ok"`` when healthy)."""
        return self.db.integrity_check()

    def sweep_stale_temp_files(self, max_age_s: float | None = None) -> list[Path]:
        """Delete ``*.part`` temporaries (atomic writes) a killed process left in ``slides/``,
        ``results/slide_*/``, ``runs/*/`` and ``runs/*/blocks/``.

        A copy in progress rewrites its file every MiB, so only files not modified for
        ``STALE_TEMP_S`` go; they were never recorded, so nothing the user has is lost.
        (A process holding a slide's lock sweeps that slide's folders at once.)
        """
        age = self.STALE_TEMP_S if max_age_s is None else max_age_s
        folders = [self.folder / "slides", *self.folder.glob("results/slide_*"), *self.folder.glob("runs/*"),
                   *self.folder.glob("runs/*/blocks")]
        return [p for f in folders if f.is_dir() for p in remove_temporaries(f, age)]

    # -- patients and slides ---------------------------------------------------------------
    def add_patient(self, patient_id: str, **attrs: Any) -> str:
        """Add a patient (or merge ``attrs`` into an existing one); returns the cleaned id."""
        return slides.add_patient(self.db, patient_id, **attrs)

    def list_patients(self) -> pd.DataFrame:
        return slides.list_patients(self.db)

    def add_slide(self, source_path: str | os.PathLike, *, patient_id: str | None = None,
                  original_name: str | None = None, mpp: float | None = None) -> SlideRecord:
        """Validate a slide, copy it into ``slides/`` and record it; the same file twice gives the same record."""
        return slides.add_slide(self.db, source_path, patient_id=patient_id, original_name=original_name, mpp=mpp)[0]

    def get_slide(self, slide_id: int) -> SlideRecord:
        return slides.get_slide(self.db, slide_id)

    def find_slide_for_file(self, path: str | os.PathLike) -> SlideRecord | None:
        """The slide already holding this file's bytes (same sha256), or None."""
        return slides.find_slide_for_file(self.db, path)

    def slide_path(self, slide_id: int) -> Path:
        """Absolute path of the project's copy of the slide."""
        return self.abspath(self.get_slide(slide_id).path)

    def set_slide_patient(self, slide_id: int, patient_id: str | None) -> None:
        slides.set_slide_patient(self.db, slide_id, patient_id)

    def plan_slide_edit(self, slide_id: int, *, mpp: Any = KEEP, patient_id: Any = KEEP) -> SlideEdit:
        """What :meth:`update_slide` would change, and which runs it would delete (nothing is changed)."""
        return slides.plan_slide_edit(self.db, slide_id, mpp=mpp, patient_id=patient_id)

    def update_slide(self, slide_id: int, *, mpp: Any = KEEP, patient_id: Any = KEEP) -> SlideEdit:
        """Change a slide's µm/px and/or patient; a new µm/px deletes its runs (results of the old scale)."""
        self.mark_interrupted_runs()  # a dead worker's run must not block the edit
        return slides.update_slide(self.db, slide_id, mpp=mpp, patient_id=patient_id)

    def list_slides(self) -> pd.DataFrame:
        """One row per slide with its latest run: ``run_id``, ``status``, ``progress``, ``n_cells``."""
        return slides.list_slides(self.db)

    def delete_slide(self, slide_id: int) -> None:
        """Remove a slide, its runs and every file of theirs (refused while one of its runs is active)."""
        self.mark_interrupted_runs()
        deletions.delete_slide(self.db, slide_id)

    def delete_patient(self, patient_id: str, *, with_slides: bool = True) -> None:
        """Remove a patient; ``with_slides`` removes their slides and runs too, else the slides stay unassigned."""
        self.mark_interrupted_runs()
        deletions.delete_patient(self.db, patient_id, with_slides=with_slides)

    # -- runs --------------------------------------------------------------------------------
    def start_run(self, slide_id: int, *, model_id: str | None, weights_sha256: str | None, device: str | None,
                  params: Mapping[str, Any] | None = None, status: str | RunStatus = RunStatus.RUNNING) -> int:
        """Record a new run (``running`` by this process, or ``queued`` for a worker to pick up)."""
        return runs.start_run(self.db, slide_id, model_id=model_id, weights_sha256=weights_sha256, device=device,
                              params=params, status=status)

    def update_run(self, run_id: int, *, stage: str | None = None, progress: float | None = None,
                   message: str | None = None) -> None:
        runs.update_run(self.db, run_id, stage=stage, progress=progress, message=message)

    def heartbeat(self, run_id: int) -> None:
        runs.heartbeat(self.db, run_id)

    def resume_run(self, run_id: int) -> None:
        runs.resume_run(self.db, run_id)

    def requeue_run(self, run_id: int) -> None:
        runs.requeue_run(self.db, run_id)

    def finish_run(self, run_id: int, *, n_cells: int, timings: Mapping[str, Any] | None = None) -> None:
        runs.finish_run(self.db, run_id, n_cells=n_cells, timings=timings)

    def fail_run(self, run_id: int, error: str) -> bool:
        return runs.fail_run(self.db, run_id, error)

    def cancel_run(self, run_id: int) -> bool:
        return runs.cancel_run(self.db, run_id)

    def mark_interrupted_runs(self, *, stale_after_s: float = STALE_HEARTBEAT_S) -> list[int]:
        return runs.mark_interrupted_runs(self.db, stale_after_s=stale_after_s)

    def get_run(self, run_id: int) -> RunRecord:
        return runs.get_run(self.db, run_id)

    def latest_run(self, slide_id: int, status: str | RunStatus | None = None) -> RunRecord | None:
        return runs.latest_run(self.db, slide_id, status)

    def list_runs(self, slide_id: int | None = None) -> pd.DataFrame:
        return runs.list_runs(self.db, slide_id)

    def delete_run(self, run_id: int) -> None:
        """Remove a run with its result files and checkpoints (refused while it is queued or running)."""
        self.mark_interrupted_runs()
        deletions.delete_run(self.db, run_id)

    def run_dir(self, run_id: int) -> Path:
        return results.run_dir(self.db, run_id)

    # -- result files ------------------------------------------------------------------------
    def add_result_file(self, run_id: int, kind: str, path: str | os.PathLike) -> None:
        results.add_result_file(self.db, run_id, kind, path)

    def result_files(self, run_id: int) -> dict[str, Path]:
        return results.result_files(self.db, run_id)

    def result_file_info(self, run_id: int) -> pd.DataFrame:
        return results.result_file_info(self.db, run_id)

    # -- clinical tables ---------------------------------------------------------------------
    def add_clinical_table(self, source_path: str | os.PathLike, *, name: str,
                           mapping: Mapping[str, Any] | None = None, original_name: str | None = None) -> int:
        return clinical_tables.add_clinical_table(self.db, source_path, name=name, mapping=mapping,
                                                  original_name=original_name)

    def set_clinical_mapping(self, table_id: int, mapping: Mapping[str, Any]) -> None:
        clinical_tables.set_clinical_mapping(self.db, table_id, mapping)

    def list_clinical_tables(self) -> pd.DataFrame:
        return clinical_tables.list_clinical_tables(self.db)

    def get_clinical_table(self, table_id: int) -> tuple[Path, dict]:
        return clinical_tables.get_clinical_table(self.db, table_id)
