"""Patients and slides: validating a slide, copying it into ``slides/`` and recording it.

Slides are content-addressed (``slides/<sha256[:12]>_<safe name>``): the same file added twice
(or by two sessions at once) is one slide, and two different files never share a name.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ghist_core.errors import CorruptSlideError, GhistError, SlideError, StoreError
from ghist_core.io.hashing import sha256_file
from ghist_core.project.db import ProjectDB, to_json, utc_now
from ghist_core.project.files import copy_verified, sanitize_filename, unlink_quiet
from ghist_core.project.results import run_dir_path

__all__ = ["SlideRecord", "add_slide", "get_slide", "list_slides", "add_patient", "list_patients"]


@dataclass(frozen=True)
class SlideRecord:
    """One slide in the project. ``path`` is relative to the project folder (POSIX style)."""

    slide_id: int
    path: str
    original_name: str
    sha256: str
    size_bytes: int
    mpp: float
    width: int
    height: int
    level_count: int
    format: str
    vendor: str | None
    patient_id: str | None
    added_at: str

    @property
    def name(self) -> str:
        """The name to show (the file's original name)."""
        return self.original_name

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.width, self.height)


# --------------------------------------------------------------------------------------------
# patients
# --------------------------------------------------------------------------------------------
def check_patient_id(patient_id: Any) -> str:
    pid = str(patient_id).strip() if patient_id is not None else ""
    if not pid or len(pid) > 200 or any(unicodedata.category(c) == "Cc" for c in pid):
        raise StoreError(f"{patient_id!r} is not a usable patient id (1–200 printable characters).")
    return pid


def _ensure_patient(c: sqlite3.Connection, pid: str, attrs: Mapping[str, Any] | None = None) -> None:
    row = c.execute("SELECT attrs FROM patients WHERE patient_id = ?", (pid,)).fetchone()
    if row is None:
        c.execute("INSERT INTO patients(patient_id, attrs, created_at) VALUES (?, ?, ?)",
                  (pid, to_json(dict(attrs or {})), utc_now()))
    elif attrs:
        merged = {**json.loads(row["attrs"]), **dict(attrs)}
        c.execute("UPDATE patients SET attrs = ? WHERE patient_id = ?", (to_json(merged), pid))


def add_patient(db: ProjectDB, patient_id: str, **attrs: Any) -> str:
    """Add a patient (or merge ``attrs`` into an existing one); returns the cleaned id."""
    pid = check_patient_id(patient_id)
    with db.tx() as c:
        _ensure_patient(c, pid, attrs)
    return pid


def list_patients(db: ProjectDB) -> pd.DataFrame:
    """One row per patient: ``patient_id``, ``n_slides``, ``created_at`` and one column per attribute."""
    rows = db.conn().execute(
        "SELECT p.patient_id, p.attrs, p.created_at, COUNT(s.slide_id) AS n_slides FROM patients p "
        "LEFT JOIN slides s ON s.patient_id = p.patient_id GROUP BY p.patient_id ORDER BY p.patient_id"
    ).fetchall()
    recs = [{"patient_id": r["patient_id"], "n_slides": r["n_slides"], "created_at": r["created_at"],
             **json.loads(r["attrs"])} for r in rows]
    return pd.DataFrame(recs, columns=None if recs else ["patient_id", "n_slides", "created_at"])


# --------------------------------------------------------------------------------------------
# slides
# --------------------------------------------------------------------------------------------
_SLIDE_COLS = ("slide_id, path, original_name, sha256, size_bytes, mpp, width, height, level_count, format, "
               "vendor, patient_id, added_at")


def slide_by_sha(db: ProjectDB, digest: str) -> SlideRecord | None:
    """The slide whose file has this sha256, if the project has it."""
    row = db.conn().execute(f"SELECT {_SLIDE_COLS} FROM slides WHERE sha256 = ?", (digest,)).fetchone()
    return SlideRecord(**dict(row)) if row else None


def get_slide(db: ProjectDB, slide_id: int) -> SlideRecord:
    row = db.conn().execute(f"SELECT {_SLIDE_COLS} FROM slides WHERE slide_id = ?", (int(slide_id),)).fetchone()
    if row is None:
        raise StoreError(f"There is no slide {slide_id} in this project.")
    return SlideRecord(**dict(row))


def _read_slide_facts(src: Path, display: str, mpp: float | None) -> dict:
    """Open the slide once and touch its pixels: anything unusable raises a typed ``SlideError``."""
    from ghist_core.io.slide import open_slide

    try:
        with open_slide(src, mpp=mpp) as s:
            s.thumbnail(256)  # touch the pixels: a truncated file fails here, not in the middle of a run
            return dict(width=int(s.dimensions[0]), height=int(s.dimensions[1]), mpp=float(s.mpp),
                        level_count=int(s.level_count), format=str(s.format),
                        vendor=None if getattr(s, "vendor", None) is None else str(s.vendor))
    except GhistError:
        raise
    except Exception as exc:  # a reader failing in an unexpected way means the file is unusable
        raise CorruptSlideError(
            f"'{display}' could not be read as a slide ({exc.__class__.__name__}). It may be damaged or "
            "incompletely uploaded; please upload it again."
        ) from exc


def add_slide(db: ProjectDB, source_path: str | os.PathLike, *, patient_id: str | None = None,
              original_name: str | None = None, mpp: float | None = None) -> tuple[SlideRecord, bool]:
    """Validate a slide, copy it into ``slides/`` and record it; returns ``(record, is_new)``.

    The same file twice gives the same record (``is_new`` False; a patient id is filled in if the
    slide had none). On any error the store and the folder are left exactly as they were.
    """
    src = Path(source_path)
    display = original_name if original_name is not None else src.name
    safe = sanitize_filename(display)
    pid = check_patient_id(patient_id) if patient_id is not None else None
    if not src.is_file():
        raise SlideError(f"The slide file '{src.name}' was not found.")
    digest = sha256_file(src)
    existing = slide_by_sha(db, digest)
    if existing is not None:
        if pid is not None and existing.patient_id is None:
            with db.tx() as c:
                _ensure_patient(c, pid)
                c.execute("UPDATE slides SET patient_id = ? WHERE slide_id = ?", (pid, existing.slide_id))
            return get_slide(db, existing.slide_id), False
        return existing, False
    info = _read_slide_facts(src, display, mpp)

    rel = f"slides/{digest[:12]}_{safe}"  # content-addressed: two different files never share a name
    target = db.abspath(rel)
    copy_verified(src, target, digest, display, changed_error=SlideError)
    try:
        with db.tx() as c:
            if pid is not None:
                _ensure_patient(c, pid)
            cur = c.execute(
                "INSERT INTO slides(patient_id, path, original_name, sha256, size_bytes, mpp, width, height, "
                "format, level_count, vendor, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (pid, rel, display, digest, src.stat().st_size, info["mpp"], info["width"], info["height"],
                 info["format"], info["level_count"], info["vendor"], utc_now()),
            )
            slide_id = int(cur.lastrowid)
    except sqlite3.IntegrityError:
        # another session added the same file meanwhile: theirs wins, the file is identical
        winner = slide_by_sha(db, digest)
        if winner is None:
            unlink_quiet(target)
            raise
        if winner.path != rel:
            unlink_quiet(target)
        return winner, False
    except BaseException:
        unlink_quiet(target)
        raise
    return get_slide(db, slide_id), True


def set_slide_patient(db: ProjectDB, slide_id: int, patient_id: str | None) -> None:
    pid = check_patient_id(patient_id) if patient_id is not None else None
    with db.tx() as c:
        if pid is not None:
            _ensure_patient(c, pid)
        if c.execute("UPDATE slides SET patient_id = ? WHERE slide_id = ?", (pid, int(slide_id))).rowcount == 0:
            raise StoreError(f"There is no slide {slide_id} in this project.")


def list_slides(db: ProjectDB) -> pd.DataFrame:
    """One row per slide with its latest run: ``run_id``, ``status``, ``progress``, ``n_cells``."""
    rows = db.conn().execute(
        "SELECT s.slide_id, s.original_name AS name, s.original_name, s.patient_id, s.path, s.sha256, "
        "s.size_bytes, s.mpp, s.width, s.height, s.level_count, s.format, s.vendor, s.added_at, "
        "r.run_id, r.status, r.stage, r.progress, r.n_cells, r.model_id, r.finished_at "
        "FROM slides s LEFT JOIN runs r ON r.run_id = "
        "(SELECT MAX(run_id) FROM runs WHERE slide_id = s.slide_id) ORDER BY s.slide_id"
    )
    cols = [d[0] for d in rows.description]
    df = pd.DataFrame([tuple(r) for r in rows.fetchall()], columns=cols)
    for col in ("run_id", "n_cells"):
        df[col] = df[col].astype("Int64")
    return df


def delete_slide(db: ProjectDB, slide_id: int) -> None:
    """Remove a slide, its runs and result rows; then its files (rows first: never a row without a file)."""
    rec = get_slide(db, slide_id)
    with db.tx() as c:
        run_ids = [r[0] for r in c.execute("SELECT run_id FROM runs WHERE slide_id = ?", (rec.slide_id,))]
        files = [r[0] for r in c.execute(
            "SELECT path FROM result_files WHERE run_id IN (SELECT run_id FROM runs WHERE slide_id = ?)",
            (rec.slide_id,))]
        c.execute("DELETE FROM slides WHERE slide_id = ?", (rec.slide_id,))
    for rel in [rec.path, *files]:
        unlink_quiet(db.abspath(rel))
    for rid in run_ids:
        shutil.rmtree(run_dir_path(db, rid), ignore_errors=True)
