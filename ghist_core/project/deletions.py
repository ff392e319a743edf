"""Removing slides, patients and runs so that rows and files stay consistent even if killed midway.

A deletion is two steps with a journal between them:

1. **One transaction** deletes the rows (a slide's runs and result rows go with it, by foreign
   key) *and* writes a journal entry into ``meta`` (key ``pending_removal:<token>``) listing the
   files and run folders that now belong to nobody. Killed before the commit: nothing changed.
   After the commit the project no longer shows the slide/run anywhere: no page can reach a
   half-deleted thing.
2. The listed files are removed (each ``unlink`` is atomic; a run folder is renamed aside, then
   removed), then the journal entry is dropped.

Killed during step 2, the entry stays; :func:`finish_pending_removals` (run whenever a project is
opened) removes what is left. A file that a row uses again by then (the same slide uploaded again
meanwhile: slide files are content-addressed) is kept.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ghist_core.errors import RunStateError, StoreError
from ghist_core.project.db import ProjectDB
from ghist_core.project.files import unlink_quiet
from ghist_core.project.results import run_dir_path
from ghist_core.project.runs import RunStatus

__all__ = ["JOURNAL_PREFIX", "delete_slide", "delete_patient", "delete_run", "refuse_active_runs", "journal_runs",
           "journal", "finish_removal", "finish_pending_removals", "pending_removals"]

JOURNAL_PREFIX = "pending_removal:"


def journal_runs(c: sqlite3.Connection, db: ProjectDB, run_ids: Iterable[int]) -> tuple[list[str], list[str]]:
    """The result files and run folders (relative paths) of ``run_ids``, read inside the caller's transaction."""
    ids = [int(r) for r in run_ids]
    files: list[str] = []
    for rid in ids:
        files += [r[0] for r in c.execute("SELECT path FROM result_files WHERE run_id = ?", (rid,))]
    dirs = [db.rel(run_dir_path(db, rid)) for rid in ids]
    return files, dirs


def journal(c: sqlite3.Connection, files: Iterable[str], dirs: Iterable[str] = ()) -> str:
    """Record, inside the caller's transaction, the files and folders to remove once it commits."""
    token = uuid.uuid4().hex
    c.execute("INSERT INTO meta(key, value) VALUES (?, ?)",
              (JOURNAL_PREFIX + token, json.dumps({"files": sorted(set(files)), "dirs": sorted(set(dirs))})))
    return token


def _inside(db: ProjectDB, rel: str) -> Path | None:
    """The absolute path of a journalled relative path, or None when it would leave the project folder."""
    p = (db.folder / rel).resolve()
    try:
        p.relative_to(db.folder.resolve())
    except ValueError:
        return None
    return p if p != db.folder.resolve() else None


def _in_use(db: ProjectDB, rel: str) -> bool:
    c = db.conn()
    return (c.execute("SELECT 1 FROM slides WHERE path = ?", (rel,)).fetchone() is not None
            or c.execute("SELECT 1 FROM result_files WHERE path = ?", (rel,)).fetchone() is not None)


def finish_removal(db: ProjectDB, token: str) -> None:
    """Step 2 for one journal entry: remove its files and folders, then drop the entry (idempotent)."""
    key = JOURNAL_PREFIX + token
    row = db.conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return
    try:
        entry = json.loads(row[0])
    except ValueError:
        entry = {}
    for rel in entry.get("files", []):
        p = _inside(db, rel)
        if p is not None and not _in_use(db, rel):
            unlink_quiet(p)
            _drop_empty_parent(db, p)
    for rel in entry.get("dirs", []):
        p = _inside(db, rel)
        if p is None:
            continue
        if p.is_dir():
            aside = p.with_name(f".{p.name}.removing")
            try:
                p.replace(aside)  # atomic: the folder is gone under its name at once
            except OSError:
                aside = p
            shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(p.with_name(f".{p.name}.removing"), ignore_errors=True)
    with db.tx() as c:
        c.execute("DELETE FROM meta WHERE key = ?", (key,))


def _drop_empty_parent(db: ProjectDB, p: Path) -> None:
    """``results/slide_<id>/`` goes once its last result file went (the top folders stay)."""
    parent = p.parent
    if parent.parent.resolve() == (db.folder / "results").resolve():
        try:
            parent.rmdir()
        except OSError:
            pass


def pending_removals(db: ProjectDB) -> list[str]:
    """Tokens of deletions whose files are not all removed yet."""
    rows = db.conn().execute("SELECT key FROM meta WHERE key LIKE ?", (JOURNAL_PREFIX + "%",)).fetchall()
    return [r[0][len(JOURNAL_PREFIX):] for r in rows]


def finish_pending_removals(db: ProjectDB) -> int:
    """Finish every deletion a killed process left half done; returns how many there were."""
    tokens = pending_removals(db)
    for token in tokens:
        finish_removal(db, token)
    return len(tokens)


# --------------------------------------------------------------------------------------------
# the deletions themselves (step 1 in ``_rows`` functions, so tests can stop between the steps)
# --------------------------------------------------------------------------------------------
_ACTIVE = tuple(s.value for s in RunStatus if s.is_active)


@contextmanager
def slides_locked(db: ProjectDB, slide_ids: Iterable[int]) -> Iterator[None]:
    """Hold the slides' run locks (:mod:`ghist_core.project.locks`) while their rows change.

    A process computing one of these slides holds its lock for the whole run, also before its run
    row exists: then this raises ``SlideBusyError`` at once instead of deleting under it.
    """
    try:
        from ghist_core.project.locks import lock_slide
    except ImportError:  # a build without per-slide locks: the active-run check below still applies
        yield
        return
    with ExitStack() as stack:
        for sid in sorted({int(s) for s in slide_ids}):
            stack.enter_context(lock_slide(db.folder, sid))
        yield


def refuse_active_runs(c: sqlite3.Connection, where: str, args: tuple, what: str) -> None:
    """Raise :class:`RunStateError` when a run matching ``where`` is queued or running (its worker writes files)."""
    row = c.execute(f"SELECT run_id FROM runs WHERE ({where}) AND status IN ({','.join('?' * len(_ACTIVE))}) "
                    "ORDER BY run_id LIMIT 1", (*args, *_ACTIVE)).fetchone()
    if row is not None:
        raise RunStateError(f"Run {row[0]} of {what} is still queued or running. Cancel it on the Upload & predict "
                            "page (or wait until it ends), then try again.")


def _slide_rows(c: sqlite3.Connection, db: ProjectDB, slide_ids: list[int]) -> tuple[list[str], list[str]]:
    """Delete slides (their runs and result rows go by foreign key); return their files and run folders."""
    files: list[str] = []
    dirs: list[str] = []
    for sid in slide_ids:
        row = c.execute("SELECT path FROM slides WHERE slide_id = ?", (sid,)).fetchone()
        if row is None:
            raise StoreError(f"There is no slide {sid} in this project.")
        run_ids = [r[0] for r in c.execute("SELECT run_id FROM runs WHERE slide_id = ?", (sid,))]
        f, d = journal_runs(c, db, run_ids)
        files += [row[0], *f]
        dirs += d
        c.execute("DELETE FROM slides WHERE slide_id = ?", (sid,))
    return files, dirs


def delete_slide_rows(db: ProjectDB, slide_id: int) -> str:
    """Step 1 of :func:`delete_slide`: rows gone and files journalled, in one transaction; returns the token."""
    sid = int(slide_id)
    with slides_locked(db, [sid]), db.tx() as c:
        refuse_active_runs(c, "slide_id = ?", (sid,), f"slide {sid}")
        files, dirs = _slide_rows(c, db, [sid])
        return journal(c, files, dirs)


def delete_slide(db: ProjectDB, slide_id: int) -> None:
    """Remove a slide, its runs, their result files and the slide's copy (refused while a run is active)."""
    finish_removal(db, delete_slide_rows(db, slide_id))


def delete_patient_rows(db: ProjectDB, patient_id: str, *, with_slides: bool = True) -> str:
    """Step 1 of :func:`delete_patient`; returns the journal token."""
    sids = [r[0] for r in db.conn().execute("SELECT slide_id FROM slides WHERE patient_id = ?", (patient_id,))]
    with slides_locked(db, sids if with_slides else []), db.tx() as c:
        if c.execute("SELECT 1 FROM patients WHERE patient_id = ?", (patient_id,)).fetchone() is None:
            raise StoreError(f"There is no patient {patient_id!r} in this project.")
        files: list[str] = []
        dirs: list[str] = []
        if with_slides:
            refuse_active_runs(c, "slide_id IN (SELECT slide_id FROM slides WHERE patient_id = ?)", (patient_id,),
                               f"patient {patient_id}'s slides")
            sids = [r[0] for r in c.execute("SELECT slide_id FROM slides WHERE patient_id = ?", (patient_id,))]
            files, dirs = _slide_rows(c, db, sids)
        c.execute("DELETE FROM patients WHERE patient_id = ?", (patient_id,))  # kept slides lose the id (SET NULL)
        return journal(c, files, dirs)


def delete_patient(db: ProjectDB, patient_id: str, *, with_slides: bool = True) -> None:
    """Remove a patient; with ``with_slides`` their slides and runs too, else the slides stay without a patient."""
    finish_removal(db, delete_patient_rows(db, patient_id, with_slides=with_slides))


def delete_run_rows(db: ProjectDB, run_id: int) -> str:
    """Step 1 of :func:`delete_run`; returns the journal token."""
    rid = int(run_id)
    row = db.conn().execute("SELECT slide_id FROM runs WHERE run_id = ?", (rid,)).fetchone()
    if row is None:
        raise StoreError(f"There is no run {rid} in this project.")
    with slides_locked(db, [row[0]]), db.tx() as c:
        if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (rid,)).fetchone() is None:
            raise StoreError(f"There is no run {rid} in this project.")
        refuse_active_runs(c, "run_id = ?", (rid,), "this slide")
        files, dirs = journal_runs(c, db, [rid])
        c.execute("DELETE FROM runs WHERE run_id = ?", (rid,))
        return journal(c, files, dirs)


def delete_run(db: ProjectDB, run_id: int) -> None:
    """Remove a stopped or finished run with its result files and checkpoints (refused while it is active)."""
    finish_removal(db, delete_run_rows(db, run_id))
