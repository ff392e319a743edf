"""The project store: one SQLite file per project folder, shared by app sessions and workers.

A project folder holds::

    project.sqlite        patients, slides, runs, result files, clinical tables (this module)
    slides/               copies of the slides, under sanitised names
    clinical/             clinical tables exactly as uploaded
    runs/<run_id>/        checkpoints of a run (pipeline's business)
    results/              result files (pipeline's business; recorded here)

Why it is built this way:

* **WAL + busy_timeout + one connection per thread (and per process)** so many Streamlit sessions
  and a background worker read and write the same file without "database is locked".
  Write transactions start with ``BEGIN IMMEDIATE`` so they queue instead of deadlocking.
* **Foreign keys ON** so a run can never point at a missing slide.
* **``PRAGMA user_version`` + an ordered list of migrations**, each applied with its version bump
  in one transaction: an old project is upgraded in place, a crash mid-upgrade changes nothing.
* **Files first, rows second, never the other way round**: a file is copied atomically
  (temp + ``os.replace``) before its row is committed, and removed if the row cannot be written,
  so a row never points at a half-written file. A worker killed mid-run leaves a ``running`` row
  whose pid is gone; :meth:`Project.mark_interrupted_runs` turns it into ``interrupted`` (resumable).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pandas as pd

from ghist_core.io.atomic import atomic_path, remove_temporaries
from ghist_core.io.hashing import sha256_file
from ghist_core.errors import (
    CorruptSlideError,
    GhistError,
    InvalidFileNameError,
    ProjectNotFoundError,
    SlideError,
    StoreError,
)

__all__ = [
    "Project",
    "SlideRecord",
    "RunRecord",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "sanitize_filename",
    "utc_now",
]

DB_NAME = "project.sqlite"
RUN_STATUSES = ("queued", "running", "finished", "failed", "interrupted", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
BUSY_TIMEOUT_MS = 60_000
#: A run on another machine whose heartbeat is older than this is considered dead.
STALE_HEARTBEAT_S = 15 * 60
_MAX_NAME = 120
_MAX_ERROR = 8000


def utc_now() -> str:
    """UTC timestamp, ISO 8601 with milliseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# file names
# --------------------------------------------------------------------------------------------
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MULTI_EXT = (".ome.tiff", ".ome.tif", ".tar.gz")


def sanitize_filename(name: str, *, max_len: int = _MAX_NAME) -> str:
    """A safe on-disk file name for an uploaded ``name`` (the original is kept for display).

    Refused (:class:`InvalidFileNameError`): empty names, paths (``/``, ``\\``, also when they only
    appear after Unicode NFKC normalisation, e.g. fullwidth ``／``), ``.``/``..``, control and
    bidirectional-override characters. Accepted names are NFKC-normalised, folded to ASCII
    (``Müller`` → ``Muller``; other letters become ``_``), reduced to ``[A-Za-z0-9._-]``, with no
    leading dot, no ``..``, no Windows device names, and capped at ``max_len`` characters with the
    extension kept.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidFileNameError("The file has no name. Please give it a name such as 'slide.svs'.")
    norm = unicodedata.normalize("NFKC", name).strip()
    bad = [c for c in norm if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co")]
    if bad:
        raise InvalidFileNameError(
            f"The file name {name!r} contains invisible or control characters ({', '.join(repr(c) for c in bad[:3])}). "
            "Rename the file using ordinary letters and digits."
        )
    if "/" in norm or "\\" in norm or norm in (".", "..") or norm.startswith("~"):
        raise InvalidFileNameError(
            f"{name!r} is a path, not a file name (it contains '/', '\\' or '..'). Upload the file itself, "
            "with a plain name such as 'slide.svs'."
        )
    lower = norm.lower()
    ext = next((e for e in _MULTI_EXT if lower.endswith(e)), None)
    if ext is None:
        stem, dot, ext_raw = norm.rpartition(".")
        ext, stem = (("." + ext_raw) if dot and stem else ""), (stem if dot and stem else norm)
    else:
        stem = norm[: -len(ext)]

    def fold(text: str) -> str:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
        text = re.sub(r"[^A-Za-z0-9._-]+", "_", text.encode("ascii", "replace").decode("ascii").replace("?", "_"))
        text = re.sub(r"\.{2,}", ".", re.sub(r"_{2,}", "_", text))
        return text

    ext = re.sub(r"[^a-z0-9.]", "", fold(ext).lower())[:16]
    stem = fold(stem).strip("._- ") or "file"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    stem = stem[: max(1, max_len - len(ext))].rstrip(".")
    return stem + ext


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class RunRecord:
    """One analysis run of one slide. ``params`` and ``timings`` are plain dicts (stored as JSON)."""

    run_id: int
    slide_id: int
    status: str
    model_id: str | None
    weights_sha256: str | None
    device: str | None
    params: dict
    stage: str | None
    progress: float
    message: str | None
    error: str | None
    n_cells: int | None
    timings: dict
    worker_pid: int | None
    worker_host: str | None
    heartbeat_at: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def is_resumable(self) -> bool:
        return self.status in ("interrupted", "failed", "cancelled", "queued")


# --------------------------------------------------------------------------------------------
# schema and migrations
# --------------------------------------------------------------------------------------------
def _exec_all(c: sqlite3.Connection, script: str) -> None:
    """Run several statements inside the current transaction (``executescript`` would COMMIT first)."""
    for stmt in script.split(";"):
        if stmt.strip():
            c.execute(stmt)


def _m1_initial(c: sqlite3.Connection) -> None:
    _exec_all(
        c,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE patients (
            patient_id TEXT PRIMARY KEY CHECK (length(patient_id) > 0),
            attrs      TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        );
        CREATE TABLE slides (
            slide_id      INTEGER PRIMARY KEY AUTOINCREMENT,
            patient_id    TEXT REFERENCES patients(patient_id) ON UPDATE CASCADE ON DELETE SET NULL,
            path          TEXT NOT NULL UNIQUE,
            original_name TEXT NOT NULL,
            sha256        TEXT NOT NULL UNIQUE,
            size_bytes    INTEGER NOT NULL,
            mpp           REAL NOT NULL CHECK (mpp > 0),
            width         INTEGER NOT NULL,
            height        INTEGER NOT NULL,
            format        TEXT NOT NULL,
            added_at      TEXT NOT NULL
        );
        CREATE TABLE runs (
            run_id         INTEGER PRIMARY KEY AUTOINCREMENT,
            slide_id       INTEGER NOT NULL REFERENCES slides(slide_id) ON DELETE CASCADE,
            status         TEXT NOT NULL CHECK (status IN ('queued','running','finished','failed','interrupted','cancelled')),
            model_id       TEXT,
            weights_sha256 TEXT,
            device         TEXT,
            params         TEXT NOT NULL DEFAULT '{}',
            stage          TEXT,
            progress       REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
            message        TEXT,
            error          TEXT,
            n_cells        INTEGER,
            timings        TEXT NOT NULL DEFAULT '{}',
            created_at     TEXT NOT NULL,
            started_at     TEXT,
            finished_at    TEXT
        );
        CREATE TABLE result_files (
            run_id     INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
            kind       TEXT NOT NULL,
            path       TEXT NOT NULL,
            sha256     TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (run_id, kind)
        );
        """
    )


def _m2_workers(c: sqlite3.Connection) -> None:
    """Worker pid/host and heartbeat (crash detection); slide pyramid facts; run lookups by slide."""
    _exec_all(
        c,
        """
        ALTER TABLE runs ADD COLUMN worker_pid INTEGER;
        ALTER TABLE runs ADD COLUMN worker_host TEXT;
        ALTER TABLE runs ADD COLUMN heartbeat_at TEXT;
        ALTER TABLE slides ADD COLUMN level_count INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE slides ADD COLUMN vendor TEXT;
        CREATE INDEX runs_by_slide ON runs(slide_id, run_id);
        CREATE INDEX runs_by_status ON runs(status);
        """
    )


def _m3_clinical(c: sqlite3.Connection) -> None:
    _exec_all(
        c,
        """
        CREATE TABLE clinical_tables (
            table_id      INTEGER PRIMARY KEY AUTOINCREMENT,
            name          TEXT NOT NULL,
            path          TEXT NOT NULL,
            original_name TEXT NOT NULL,
            sha256        TEXT NOT NULL,
            size_bytes    INTEGER NOT NULL,
            mapping       TEXT NOT NULL DEFAULT '{}',
            added_at      TEXT NOT NULL
        );
        """
    )


#: Ordered migrations; migration ``i`` (1-based) brings the schema from version ``i-1`` to ``i``.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_m1_initial, _m2_workers, _m3_clinical)
SCHEMA_VERSION = len(MIGRATIONS)


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a crash never corrupts, at worst loses the last commit


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Bring the schema to ``target`` (default: latest), each step with its version bump in one transaction.

    Returns the version reached. A database newer than this code raises :class:`StoreError`.
    """
    target = SCHEMA_VERSION if target is None else target
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"This project was saved by a newer GHIST Studio (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}). Update GHIST Studio to open it."
                )
            if version >= target:
                conn.execute("COMMIT")
                return version
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# --------------------------------------------------------------------------------------------
# the project
# --------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _json(obj: Any) -> str:
    return json.dumps(obj if obj is not None else {}, default=_json_default, sort_keys=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class Project:
    """A GHIST Studio project folder and its SQLite store.

    Safe to share between threads (each thread gets its own connection) and between processes
    (SQLite WAL + busy timeout). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike, *, _create: bool = False, name: str | None = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.db_path = self.folder / DB_NAME
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        if not self.db_path.is_file():
            if not _create:
                raise ProjectNotFoundError(
                    f"{self.folder} is not a GHIST Studio project (no {DB_NAME} in it). Create a project first."
                )
            self.folder.mkdir(parents=True, exist_ok=True)
        for sub in ("slides", "clinical", "runs", "results"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        try:
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"The project database at {self.db_path} cannot use write-ahead logging ({mode}).")
            migrate(conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(
                f"The project database {self.db_path} could not be opened ({exc}). It may be damaged or not a "
                "GHIST Studio project file."
            ) from exc
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (utc_now(),))
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('name', ?)", (name or self.folder.name,))
        self.sweep_stale_temp_files()

    #: a temporary file untouched this long belongs to a process that died mid-write
    STALE_TEMP_S = 3600.0

    def sweep_stale_temp_files(self, max_age_s: float | None = None) -> list[Path]:
        """Delete ``*.part`` temporaries (atomic writes) a killed process left in ``slides/``.

        A copy in progress rewrites its file every MiB, so only files not modified for
        ``STALE_TEMP_S`` go; they were never recorded, so nothing the user has is lost.
        """
        return remove_temporaries(self.folder / "slides", self.STALE_TEMP_S if max_age_s is None else max_age_s)

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
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
        return row[0] if row else self.folder.name

    @property
    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def __repr__(self) -> str:
        return f"Project({str(self.folder)!r})"

    # -- connections -----------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork)."""
        if self._closed:
            raise StoreError("This project has been closed.")
        held = getattr(self._local, "conn", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        # check_same_thread=False only so close() may close it from another thread; each connection is
        # used solely by the thread that made it (thread-local).
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        _configure(conn)
        self._local.conn = (os.getpid(), conn)
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that queues behind other writers (BEGIN IMMEDIATE) and rolls back on error."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"The project database is busy or not writable ({exc}). Try again.") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise StoreError(f"The project database could not be written ({exc}). Check free disk space.") from exc
            raise

    def close(self) -> None:
        """Close every connection this object opened."""
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
        self._closed = True

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the project folder (POSIX); outside the folder is an error."""
        p = Path(path)
        p = (p if p.is_absolute() else self.folder / p).resolve()
        try:
            return p.relative_to(self.folder).as_posix()
        except ValueError:
            raise StoreError(f"{p} is outside the project folder {self.folder}; results must live inside it.") from None

    def abspath(self, rel: str) -> Path:
        """Absolute path of a path stored relative to the project folder."""
        return self.folder / rel

    # -- patients --------------------------------------------------------------------------
    @staticmethod
    def _check_patient_id(patient_id: Any) -> str:
        pid = str(patient_id).strip() if patient_id is not None else ""
        if not pid or len(pid) > 200 or any(unicodedata.category(c) == "Cc" for c in pid):
            raise StoreError(f"{patient_id!r} is not a usable patient id (1–200 printable characters).")
        return pid

    def _ensure_patient(self, c: sqlite3.Connection, pid: str, attrs: Mapping[str, Any] | None = None) -> None:
        row = c.execute("SELECT attrs FROM patients WHERE patient_id = ?", (pid,)).fetchone()
        if row is None:
            c.execute("INSERT INTO patients(patient_id, attrs, created_at) VALUES (?, ?, ?)",
                      (pid, _json(dict(attrs or {})), utc_now()))
        elif attrs:
            merged = {**json.loads(row["attrs"]), **dict(attrs)}
            c.execute("UPDATE patients SET attrs = ? WHERE patient_id = ?", (_json(merged), pid))

    def add_patient(self, patient_id: str, **attrs: Any) -> str:
        """Add a patient (or merge ``attrs`` into an existing one); returns the cleaned id."""
        pid = self._check_patient_id(patient_id)
        with self._tx() as c:
            self._ensure_patient(c, pid, attrs)
        return pid

    def list_patients(self) -> pd.DataFrame:
        """One row per patient: ``patient_id``, ``n_slides``, ``created_at`` and one column per attribute."""
        rows = self._conn().execute(
            "SELECT p.patient_id, p.attrs, p.created_at, COUNT(s.slide_id) AS n_slides FROM patients p "
            "LEFT JOIN slides s ON s.patient_id = p.patient_id GROUP BY p.patient_id ORDER BY p.patient_id"
        ).fetchall()
        recs = [{"patient_id": r["patient_id"], "n_slides": r["n_slides"], "created_at": r["created_at"],
                 **json.loads(r["attrs"])} for r in rows]
        return pd.DataFrame(recs, columns=None if recs else ["patient_id", "n_slides", "created_at"])

    # -- slides ----------------------------------------------------------------------------
    def add_slide(
        self,
        source_path: str | os.PathLike,
        *,
        patient_id: str | None = None,
        original_name: str | None = None,
        mpp: float | None = None,
    ) -> SlideRecord:
        """Validate a slide, copy it into ``slides/`` and record it; the same file twice gives the same record.

        The slide is opened with :func:`ghist_core.io.slide.open_slide` first (typed ``SlideError`` on
        anything unusable: empty, not a slide, corrupt, missing/invalid µm per pixel). On any error the
        store and the folder are left exactly as they were.
        """
        from ghist_core.io.slide import open_slide

        src = Path(source_path)
        display = original_name if original_name is not None else src.name
        safe = sanitize_filename(display)
        pid = self._check_patient_id(patient_id) if patient_id is not None else None
        if not src.is_file():
            raise SlideError(f"The slide file '{src.name}' was not found.")
        digest = sha256_file(src)
        existing = self._slide_by_sha(digest)
        if existing is not None:
            if pid is not None and existing.patient_id is None:
                with self._tx() as c:
                    self._ensure_patient(c, pid)
                    c.execute("UPDATE slides SET patient_id = ? WHERE slide_id = ?", (pid, existing.slide_id))
                return self.get_slide(existing.slide_id)
            return existing
        try:
            with open_slide(src, mpp=mpp) as s:
                s.thumbnail(256)  # touch the pixels: a truncated file fails here, not in the middle of a run
                info = dict(width=int(s.dimensions[0]), height=int(s.dimensions[1]), mpp=float(s.mpp),
                            level_count=int(s.level_count), format=str(s.format),
                            vendor=None if getattr(s, "vendor", None) is None else str(s.vendor))
        except GhistError:
            raise
        except Exception as exc:  # a reader failing in an unexpected way means the file is unusable
            raise CorruptSlideError(
                f"'{display}' could not be read as a slide ({exc.__class__.__name__}). It may be damaged or "
                "incompletely uploaded; please upload it again."
            ) from exc

        rel = f"slides/{digest[:12]}_{safe}"  # content-addressed: two different files never share a name
        target = self.folder / rel
        try:
            with atomic_path(target) as tmp:
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    h = hashlib.sha256()
                    for chunk in iter(lambda: fin.read(1 << 20), b""):
                        h.update(chunk)
                        fout.write(chunk)
                if h.hexdigest() != digest:
                    raise SlideError(f"'{display}' changed while it was being copied; please upload it again.")
        except OSError as exc:
            raise StoreError(self._os_message(exc, f"copy '{display}' into the project")) from exc
        try:
            with self._tx() as c:
                if pid is not None:
                    self._ensure_patient(c, pid)
                cur = c.execute(
                    "INSERT INTO slides(patient_id, path, original_name, sha256, size_bytes, mpp, width, height, "
                    "format, level_count, vendor, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (pid, rel, display, digest, src.stat().st_size, info["mpp"], info["width"], info["height"],
                     info["format"], info["level_count"], info["vendor"], utc_now()),
                )
                slide_id = int(cur.lastrowid)
        except sqlite3.IntegrityError:
            # another session added the same file meanwhile: theirs wins, the file is identical
            winner = self._slide_by_sha(digest)
            if winner is None:
                self._unlink_quiet(target)
                raise
            if winner.path != rel:
                self._unlink_quiet(target)
            return winner
        except BaseException:
            self._unlink_quiet(target)
            raise
        return self.get_slide(slide_id)

    @staticmethod
    def _os_message(exc: OSError, doing: str) -> str:
        if exc.errno == errno.ENOSPC:
            return f"Could not {doing}: the disk is full. Free some space and try again."
        return f"Could not {doing} ({exc.strerror or exc})."

    @staticmethod
    def _unlink_quiet(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    _SLIDE_COLS = ("slide_id, path, original_name, sha256, size_bytes, mpp, width, height, level_count, format, "
                   "vendor, patient_id, added_at")

    def _slide_by_sha(self, digest: str) -> SlideRecord | None:
        row = self._conn().execute(f"SELECT {self._SLIDE_COLS} FROM slides WHERE sha256 = ?", (digest,)).fetchone()
        return SlideRecord(**dict(row)) if row else None

    def get_slide(self, slide_id: int) -> SlideRecord:
        row = self._conn().execute(f"SELECT {self._SLIDE_COLS} FROM slides WHERE slide_id = ?", (int(slide_id),)).fetchone()
        if row is None:
            raise StoreError(f"There is no slide {slide_id} in this project.")
        return SlideRecord(**dict(row))

    def slide_path(self, slide_id: int) -> Path:
        """Absolute path of the project's copy of the slide."""
        return self.abspath(self.get_slide(slide_id).path)

    def set_slide_patient(self, slide_id: int, patient_id: str | None) -> None:
        pid = self._check_patient_id(patient_id) if patient_id is not None else None
        with self._tx() as c:
            if pid is not None:
                self._ensure_patient(c, pid)
            if c.execute("UPDATE slides SET patient_id = ? WHERE slide_id = ?", (pid, int(slide_id))).rowcount == 0:
                raise StoreError(f"There is no slide {slide_id} in this project.")

    def list_slides(self) -> pd.DataFrame:
        """One row per slide with its latest run: ``run_id``, ``status``, ``progress``, ``n_cells``."""
        rows = self._conn().execute(
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

    def delete_slide(self, slide_id: int) -> None:
        """Remove a slide, its runs and result rows; then its files (rows first: never a row without a file)."""
        rec = self.get_slide(slide_id)
        with self._tx() as c:
            run_ids = [r[0] for r in c.execute("SELECT run_id FROM runs WHERE slide_id = ?", (rec.slide_id,))]
            files = [r[0] for r in c.execute(
                "SELECT path FROM result_files WHERE run_id IN (SELECT run_id FROM runs WHERE slide_id = ?)",
                (rec.slide_id,))]
            c.execute("DELETE FROM slides WHERE slide_id = ?", (rec.slide_id,))
        for rel in [rec.path, *files]:
            self._unlink_quiet(self.abspath(rel))
        for rid in run_ids:
            shutil.rmtree(self.folder / "runs" / str(rid), ignore_errors=True)

    # -- runs ------------------------------------------------------------------------------
    _RUN_COLS = tuple(f.name for f in fields(RunRecord))

    def _run_from_row(self, row: sqlite3.Row) -> RunRecord:
        d = dict(row)
        d["params"] = json.loads(d["params"] or "{}")
        d["timings"] = json.loads(d["timings"] or "{}")
        d["progress"] = float(d["progress"] or 0.0)
        return RunRecord(**{k: d[k] for k in self._RUN_COLS})

    def start_run(
        self,
        slide_id: int,
        *,
        model_id: str | None,
        weights_sha256: str | None,
        device: str | None,
        params: Mapping[str, Any] | None = None,
        status: str = "running",
    ) -> int:
        """Record a new run (``running`` by this process, or ``queued`` for a worker to pick up)."""
        if status not in ("running", "queued"):
            raise StoreError(f"A new run starts as 'running' or 'queued', not {status!r}.")
        now = utc_now()
        running = status == "running"
        with self._tx() as c:
            if c.execute("SELECT 1 FROM slides WHERE slide_id = ?", (int(slide_id),)).fetchone() is None:
                raise StoreError(f"There is no slide {slide_id} in this project.")
            cur = c.execute(
                "INSERT INTO runs(slide_id, status, model_id, weights_sha256, device, params, progress, created_at, "
                "started_at, worker_pid, worker_host, heartbeat_at) VALUES (?,?,?,?,?,?,0,?,?,?,?,?)",
                (int(slide_id), status, model_id, weights_sha256, device, _json(dict(params or {})), now,
                 now if running else None, os.getpid() if running else None,
                 socket.gethostname() if running else None, now if running else None),
            )
            return int(cur.lastrowid)

    def _set_run(self, run_id: int, sql: str, args: tuple, *, allowed: tuple[str, ...] | None = None,
                 ignore: tuple[str, ...] = ()) -> bool:
        """Update one run if its status is ``allowed``; statuses in ``ignore`` are left as they are (False)."""
        with self._tx() as c:
            row = c.execute("SELECT status FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
            if row is None:
                raise StoreError(f"There is no run {run_id} in this project.")
            if row[0] in ignore:
                return False
            if allowed is not None and row[0] not in allowed:
                raise StoreError(f"Run {run_id} is {row[0]}; it cannot be changed that way now.")
            c.execute(f"UPDATE runs SET {sql} WHERE run_id = ?", (*args, int(run_id)))
            return True

    def update_run(self, run_id: int, *, stage: str | None = None, progress: float | None = None,
                   message: str | None = None) -> None:
        """Record progress (0–1), stage and message; also refreshes the heartbeat."""
        sets, args = ["heartbeat_at = ?"], [utc_now()]
        if stage is not None:
            sets.append("stage = ?")
            args.append(str(stage))
        if progress is not None:
            p = float(progress)
            sets.append("progress = ?")
            args.append(min(max(p if p == p else 0.0, 0.0), 1.0))
        if message is not None:
            sets.append("message = ?")
            args.append(str(message)[:2000])
        self._set_run(run_id, ", ".join(sets), tuple(args))

    def heartbeat(self, run_id: int) -> None:
        """Say "this run's worker is alive" (and which process it is)."""
        self._set_run(run_id, "heartbeat_at = ?, worker_pid = ?, worker_host = ?",
                      (utc_now(), os.getpid(), socket.gethostname()))

    def resume_run(self, run_id: int) -> None:
        """This process takes the run over (from queued, interrupted, failed or cancelled) and runs it."""
        now = utc_now()
        self._set_run(
            run_id,
            "status = 'running', worker_pid = ?, worker_host = ?, heartbeat_at = ?, error = NULL, "
            "finished_at = NULL, started_at = COALESCE(started_at, ?)",
            (os.getpid(), socket.gethostname(), now, now),
            allowed=("queued", "interrupted", "failed", "cancelled", "running"),
        )

    def requeue_run(self, run_id: int) -> None:
        """Put a stopped run back in the queue for a new worker (its checkpoints are kept)."""
        self._set_run(run_id, "status = 'queued', worker_pid = NULL, worker_host = NULL, error = NULL, finished_at = NULL",
                      (), allowed=("queued", "interrupted", "failed", "cancelled"))

    def finish_run(self, run_id: int, *, n_cells: int, timings: Mapping[str, Any] | None = None) -> None:
        self._set_run(
            run_id,
            "status = 'finished', n_cells = ?, timings = ?, progress = 1, stage = 'done', error = NULL, "
            "finished_at = ?, heartbeat_at = ?",
            (int(n_cells), _json(dict(timings or {})), utc_now(), utc_now()),
            allowed=("running", "queued"),
        )

    def fail_run(self, run_id: int, error: str) -> bool:
        """Mark a run failed with a message for the user (the run can be resumed later).

        A run that already finished or was cancelled is left alone (returns False): this is called from
        error handlers, which must not raise a second error.
        """
        return self._set_run(run_id, "status = 'failed', error = ?, finished_at = ?",
                             (str(error)[:_MAX_ERROR], utc_now()), allowed=("running", "queued", "interrupted", "failed"),
                             ignore=("finished", "cancelled"))

    def cancel_run(self, run_id: int) -> bool:
        """Mark a run cancelled; a finished run stays finished (returns False)."""
        return self._set_run(run_id, "status = 'cancelled', finished_at = ?", (utc_now(),),
                             allowed=("running", "queued", "interrupted", "failed"), ignore=("finished", "cancelled"))

    def mark_interrupted_runs(self, *, stale_after_s: float = STALE_HEARTBEAT_S) -> list[int]:
        """Turn ``running`` runs whose worker is gone into ``interrupted`` (resumable); return their ids.

        A worker on this machine is gone when its pid no longer exists; a worker on another machine
        when its heartbeat is older than ``stale_after_s``.
        """
        host = socket.gethostname()
        cutoff = (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=stale_after_s)).isoformat(timespec="milliseconds")
        rows = self._conn().execute(
            "SELECT run_id, worker_pid, worker_host, heartbeat_at FROM runs WHERE status = 'running'"
        ).fetchall()
        dead = [
            r["run_id"] for r in rows
            if (r["worker_host"] == host and (r["worker_pid"] is None or not _pid_alive(int(r["worker_pid"]))))
            or (r["worker_host"] != host and (r["heartbeat_at"] or "") < cutoff)
        ]
        done = []
        for rid in dead:
            with self._tx() as c:  # re-check inside the transaction: the worker may have finished meanwhile
                cur = c.execute(
                    "UPDATE runs SET status = 'interrupted', message = 'The worker stopped unexpectedly; resume to "
                    "continue from the last checkpoint.' WHERE run_id = ? AND status = 'running'", (rid,))
                if cur.rowcount:
                    done.append(rid)
        return done

    def get_run(self, run_id: int) -> RunRecord:
        row = self._conn().execute(f"SELECT {', '.join(self._RUN_COLS)} FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
        if row is None:
            raise StoreError(f"There is no run {run_id} in this project.")
        return self._run_from_row(row)

    def latest_run(self, slide_id: int, status: str | None = None) -> RunRecord | None:
        """The slide's most recent run (optionally with a given status), or None."""
        q = f"SELECT {', '.join(self._RUN_COLS)} FROM runs WHERE slide_id = ?"
        args: tuple = (int(slide_id),)
        if status is not None:
            q += " AND status = ?"
            args += (status,)
        row = self._conn().execute(q + " ORDER BY run_id DESC LIMIT 1", args).fetchone()
        return self._run_from_row(row) if row else None

    def list_runs(self, slide_id: int | None = None) -> pd.DataFrame:
        """Runs (newest first) with their parameters and timings as dicts."""
        q = f"SELECT {', '.join(self._RUN_COLS)} FROM runs"
        args: tuple = ()
        if slide_id is not None:
            q += " WHERE slide_id = ?"
            args = (int(slide_id),)
        recs = [self._run_from_row(r).__dict__ for r in self._conn().execute(q + " ORDER BY run_id DESC", args)]
        df = pd.DataFrame(recs, columns=list(self._RUN_COLS))
        df["n_cells"] = df["n_cells"].astype("Int64")
        return df

    def run_dir(self, run_id: int) -> Path:
        """``runs/<run_id>/`` for the run's checkpoints (created on demand)."""
        self.get_run(run_id)
        d = self.folder / "runs" / str(int(run_id))
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- result files ----------------------------------------------------------------------
    def add_result_file(self, run_id: int, kind: str, path: str | os.PathLike) -> None:
        """Record a finished result file (already written atomically, inside the project folder)."""
        rel = self._rel(path)
        p = self.abspath(rel)
        if not p.is_file():
            raise StoreError(f"The result file {rel} does not exist.")
        digest, size = sha256_file(p), p.stat().st_size
        with self._tx() as c:
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (int(run_id),)).fetchone() is None:
                raise StoreError(f"There is no run {run_id} in this project.")
            c.execute("INSERT OR REPLACE INTO result_files(run_id, kind, path, sha256, size_bytes, created_at) "
                      "VALUES (?,?,?,?,?,?)", (int(run_id), str(kind), rel, digest, size, utc_now()))

    def result_files(self, run_id: int) -> dict[str, Path]:
        """``{kind: absolute path}`` of a run's result files."""
        rows = self._conn().execute("SELECT kind, path FROM result_files WHERE run_id = ? ORDER BY kind", (int(run_id),))
        return {r["kind"]: self.abspath(r["path"]) for r in rows}

    def result_file_info(self, run_id: int) -> pd.DataFrame:
        cur = self._conn().execute(
            "SELECT kind, path, sha256, size_bytes, created_at FROM result_files WHERE run_id = ? ORDER BY kind",
            (int(run_id),))
        return pd.DataFrame([tuple(r) for r in cur.fetchall()], columns=[d[0] for d in cur.description])

    # -- clinical tables -------------------------------------------------------------------
    def add_clinical_table(self, source_path: str | os.PathLike, *, name: str,
                           mapping: Mapping[str, Any] | None = None, original_name: str | None = None) -> int:
        """Keep an unchanged copy of a clinical table plus its column mapping (JSON); returns its id."""
        src = Path(source_path)
        display = original_name if original_name is not None else src.name
        safe = sanitize_filename(display)
        if not src.is_file():
            raise StoreError(f"The clinical table '{src.name}' was not found.")
        digest = sha256_file(src)
        rel = f"clinical/{digest[:12]}_{safe}"
        target = self.abspath(rel)
        created = not target.exists()
        try:
            if created:
                with atomic_path(target) as tmp:
                    shutil.copyfile(src, tmp)
                if sha256_file(target) != digest:
                    self._unlink_quiet(target)
                    raise StoreError(f"'{display}' changed while it was being copied; please upload it again.")
        except OSError as exc:
            raise StoreError(self._os_message(exc, f"copy '{display}' into the project")) from exc
        try:
            with self._tx() as c:
                cur = c.execute(
                    "INSERT INTO clinical_tables(name, path, original_name, sha256, size_bytes, mapping, added_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (str(name), rel, display, digest, src.stat().st_size, _json(dict(mapping or {})), utc_now()))
                return int(cur.lastrowid)
        except BaseException:
            if created:
                self._unlink_quiet(target)
            raise

    def set_clinical_mapping(self, table_id: int, mapping: Mapping[str, Any]) -> None:
        with self._tx() as c:
            if c.execute("UPDATE clinical_tables SET mapping = ? WHERE table_id = ?",
                         (_json(dict(mapping)), int(table_id))).rowcount == 0:
                raise StoreError(f"There is no clinical table {table_id} in this project.")

    def list_clinical_tables(self) -> pd.DataFrame:
        cur = self._conn().execute(
            "SELECT table_id, name, original_name, path, sha256, size_bytes, mapping, added_at FROM clinical_tables "
            "ORDER BY table_id")
        df = pd.DataFrame([tuple(r) for r in cur.fetchall()], columns=[d[0] for d in cur.description])
        df["mapping"] = [json.loads(m) for m in df["mapping"]]
        return df

    def get_clinical_table(self, table_id: int) -> tuple[Path, dict]:
        """``(absolute path of the unchanged file, mapping)``."""
        row = self._conn().execute("SELECT path, mapping FROM clinical_tables WHERE table_id = ?", (int(table_id),)).fetchone()
        if row is None:
            raise StoreError(f"There is no clinical table {table_id} in this project.")
        return self.abspath(row["path"]), json.loads(row["mapping"])

    # -- maintenance -----------------------------------------------------------------------
    def integrity_check(self) -> str:
        """SQLite's own consistency check (``"ok"`` when healthy)."""
        return str(self._conn().execute("PRAGMA integrity_check").fetchone()[0])
