"""Patients and slides: validating a slide, copying it into ``slides/`` and recording it.

Slides are content-addressed (``slides/<sha256[:12]>_<safe name>``): the same file added twice
(or by two sessions at once) is one slide, and two different files never share a name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ghist_core.errors import CorruptSlideError, GhistError, SlideError, StoreError
from ghist_core.io.hashing import sha256_file
from ghist_core.project import deletions
from ghist_core.project.db import ProjectDB, to_json, utc_now
from ghist_core.project.files import copy_verified, sanitize_filename, unlink_quiet

__all__ = ["SlideRecord", "SlideEdit", "KEEP", "add_slide", "get_slide", "list_slides", "add_patient",
           "list_patients", "plan_slide_edit", "update_slide", "upload_differences", "delete_slide"]


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


def find_slide_for_file(db: ProjectDB, path: str | os.PathLike) -> SlideRecord | None:
    """The slide that holds exactly this file's bytes, if the project has one (hashes the file)."""
    return slide_by_sha(db, sha256_file(Path(path)))


def get_slide(db: ProjectDB, slide_id: int) -> SlideRecord:
    row = db.conn().execute(f"SELECT {_SLIDE_COLS} FROM slides WHERE slide_id = ?", (int(slide_id),)).fetchone()
    if row is None:
        raise StoreError(f"There is no slide {slide_id} in this project.")
    return SlideRecord(**dict(row))


def renamed_error(exc: GhistError, src: Path, display: str) -> GhistError:
    """``exc`` (same type) with the staged file's name and path replaced by the user's ``display`` name.

    Uploads are staged under temporary names (``upload_x1y2.png``); messages name the file the
    user chose, never the temporary one.
    """
    msg = str(exc)
    for name in (str(src.resolve()), str(src), src.name):
        msg = msg.replace(name, display)
    msg = msg.replace(f" (looked in {src.parent})", "")
    if src.parent != Path("."):  # a bare file name has no folder to hide ("." would hit every full stop)
        msg = msg.replace(str(src.parent), "the upload")
    if msg == str(exc):
        return exc
    try:
        new = type(exc)(msg)
    except TypeError:  # an error class with another signature: keep it as it is
        return exc
    return new


def _read_slide_facts(src: Path, display: str, mpp: float | None) -> dict:
    """Open the slide once and touch its pixels: anything unusable raises a typed ``SlideError``."""
    from ghist_core.io.slide import open_slide

    try:
        with open_slide(src, mpp=mpp) as s:
            s.thumbnail(256)  # touch the pixels: a truncated file fails here, not in the middle of a run
            return dict(width=int(s.dimensions[0]), height=int(s.dimensions[1]), mpp=float(s.mpp),
                        level_count=int(s.level_count), format=str(s.format),
                        vendor=None if getattr(s, "vendor", None) is None else str(s.vendor))
    except GhistError as exc:
        new = renamed_error(exc, src, display)
        if new is exc:
            raise
        raise new from None  # the chained original would name the temporary file again
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
        raise SlideError(f"The slide file '{display}' was not found.")
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
    """Remove a slide, its runs and their files (see :mod:`ghist_core.project.deletions`)."""
    deletions.delete_slide(db, slide_id)


# --------------------------------------------------------------------------------------------
# editing a slide's µm/px and patient id
# --------------------------------------------------------------------------------------------
class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: "leave this field as it is" for :func:`plan_slide_edit` / :func:`update_slide`.
KEEP: Any = _Keep()


@dataclass(frozen=True)
class SlideEdit:
    """What changing a slide would do; shown to the user before they confirm.

    ``run_ids`` are the slide's runs that a new µm/px invalidates: every cell position, size and
    prediction was computed at the old scale, so they are deleted with their files (the maps
    never show results of the old µm/px; the slide becomes "not run yet").
    """

    slide_id: int
    old_mpp: float
    new_mpp: float
    old_patient_id: str | None
    new_patient_id: str | None
    run_ids: tuple[int, ...]

    @property
    def mpp_changed(self) -> bool:
        return not _same_mpp(self.old_mpp, self.new_mpp)

    @property
    def patient_changed(self) -> bool:
        return self.old_patient_id != self.new_patient_id

    @property
    def changed(self) -> bool:
        return self.mpp_changed or self.patient_changed

    @property
    def invalidates_runs(self) -> bool:
        """True when confirming deletes runs (the µm/px changes and the slide has runs)."""
        return self.mpp_changed and bool(self.run_ids)

    def describe(self) -> str:
        """The change in words, for the confirmation (plain text; escape before markdown)."""
        parts = []
        if self.mpp_changed:
            parts.append(f"µm per pixel {self.old_mpp:.4g} → {self.new_mpp:.4g}")
        if self.patient_changed:
            parts.append(f"patient {self.old_patient_id or '—'} → {self.new_patient_id or '—'}")
        text = f"Slide {self.slide_id}: " + ("; ".join(parts) if parts else "no change") + "."
        if self.invalidates_runs:
            n = len(self.run_ids)
            text += (f" Its {n} run{'s' if n != 1 else ''} (computed at {self.old_mpp:.4g} µm/px) will be deleted "
                     "with their results; run the slide again afterwards.")
        return text


def _same_mpp(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))


def plan_slide_edit(db: ProjectDB, slide_id: int, *, mpp: Any = KEEP, patient_id: Any = KEEP) -> SlideEdit:
    """What :func:`update_slide` with these values would change (validates them; changes nothing).

    ``mpp=None`` keeps the µm/px too (an upload of a file that states its own); ``patient_id=None``
    removes the slide's patient.
    """
    from ghist_core.io.slide import check_mpp

    rec = get_slide(db, slide_id)
    new_mpp = rec.mpp if mpp is KEEP or mpp is None else check_mpp(mpp)
    if new_mpp != rec.mpp:
        _check_analysable(new_mpp)
    new_pid = rec.patient_id if patient_id is KEEP else (check_patient_id(patient_id) if patient_id is not None else None)
    run_ids = tuple(r[0] for r in db.conn().execute(
        "SELECT run_id FROM runs WHERE slide_id = ? ORDER BY run_id", (rec.slide_id,)))
    return SlideEdit(rec.slide_id, rec.mpp, new_mpp, rec.patient_id, new_pid, run_ids)


def _check_analysable(mpp: float) -> None:
    """A µm/px no run could use is refused when it is entered, not when a run fails on it: the
    default analysis reads at :func:`~ghist_core.segmentation.model.default_working_mpp` and enlarges
    a slide at most ``MAX_UPSAMPLE_FACTOR`` times (the upload card checks the same)."""
    from ghist_core.errors import InvalidMppError
    from ghist_core.io.slide import MAX_UPSAMPLE_FACTOR, enlargement_over_limit
    from ghist_core.segmentation.model import default_working_mpp

    if enlargement_over_limit(mpp, default_working_mpp()) is not None:
        coarsest = MAX_UPSAMPLE_FACTOR * default_working_mpp()
        raise InvalidMppError(
            f"{mpp:.4g} µm per pixel is coarser than the analysis can use (at most {coarsest:.4g}: it reads "
            f"slides at {default_working_mpp():.4g} µm per pixel and enlarges them at most "
            f"{MAX_UPSAMPLE_FACTOR:g}x). Scans are usually about 0.25 (40x) or 0.5 (20x) µm per pixel.")


def update_slide_rows(db: ProjectDB, edit: SlideEdit) -> tuple[SlideEdit, str | None]:
    """Step 1 of :func:`update_slide`: the new values, and the invalidated runs' rows gone, in one transaction.

    Returns the edit as applied and the journal token of the runs' files (None when no run went).
    """
    sid = edit.slide_id
    with deletions.slides_locked(db, [sid] if edit.mpp_changed else []), db.tx() as c:
        row = c.execute("SELECT mpp, patient_id FROM slides WHERE slide_id = ?", (sid,)).fetchone()
        if row is None:
            raise StoreError(f"There is no slide {sid} in this project.")
        run_ids = tuple(r[0] for r in c.execute("SELECT run_id FROM runs WHERE slide_id = ? ORDER BY run_id", (sid,)))
        edit = SlideEdit(sid, float(row["mpp"]), edit.new_mpp, row["patient_id"], edit.new_patient_id, run_ids)
        token = None
        if edit.mpp_changed:
            deletions.refuse_active_runs(c, "slide_id = ?", (sid,), f"slide {sid}")
            files, dirs = deletions.journal_runs(c, db, run_ids)
            c.execute("DELETE FROM runs WHERE slide_id = ?", (sid,))
            token = deletions.journal(c, files, dirs) if run_ids else None
            c.execute("UPDATE slides SET mpp = ? WHERE slide_id = ?", (edit.new_mpp, sid))
        if edit.patient_changed:
            if edit.new_patient_id is not None:
                _ensure_patient(c, edit.new_patient_id)
            c.execute("UPDATE slides SET patient_id = ? WHERE slide_id = ?", (edit.new_patient_id, sid))
            if edit.old_patient_id is not None:
                _drop_if_empty(c, edit.old_patient_id)
    return edit, token


def _drop_if_empty(c: sqlite3.Connection, pid: str) -> None:
    """Remove a patient left with no slide and no attributes: a slide moved to another patient id
    (usually a typo fixed) should not leave a patient that counts but holds nothing. One with
    attributes (clinical data someone entered) stays."""
    c.execute("DELETE FROM patients WHERE patient_id = ? AND attrs = ? AND NOT EXISTS "
              "(SELECT 1 FROM slides WHERE patient_id = ?)", (pid, to_json({}), pid))


def update_slide(db: ProjectDB, slide_id: int, *, mpp: Any = KEEP, patient_id: Any = KEEP) -> SlideEdit:
    """Change a slide's µm/px and/or patient id; a new µm/px deletes the slide's runs and their files.

    Refused (:class:`RunStateError`) while one of its runs is queued or running and the µm/px changes.
    Returns the :class:`SlideEdit` that was applied (``run_ids``: the runs that were deleted when
    ``mpp_changed``).
    """
    edit, token = update_slide_rows(db, plan_slide_edit(db, slide_id, mpp=mpp, patient_id=patient_id))
    if token is not None:
        deletions.finish_removal(db, token)
    return edit


def upload_differences(record: SlideRecord, *, mpp: float | None, patient_id: str | None) -> list[str]:
    """How an upload of a file already in the project differs from its slide (empty: it does not).

    A given µm/px that differs, or a patient id other than the slide's (a slide without one simply
    takes it on upload), each give one plain sentence for the "update the slide?" question.
    """
    out = []
    if mpp is not None and not _same_mpp(record.mpp, mpp):
        out.append(f"µm per pixel: the project has {record.mpp:.4g}, this upload says {float(mpp):.4g}")
    pid = (patient_id or "").strip() or None
    if pid is not None and record.patient_id is not None and pid != record.patient_id:
        out.append(f"patient id: the project has {record.patient_id}, this upload says {pid}")
    return out
