"""The project's SQLite file: connections, pragmas, migrations, write transactions.

Why it is built this way:

* **WAL + busy_timeout + one connection per thread (and per process)** so many Streamlit sessions
  and a background worker read and write the same file without "database is locked".
  Write transactions start with ``BEGIN IMMEDIATE`` so they queue instead of deadlocking.
* **Foreign keys ON** so a run can never point at a missing slide.
* **``PRAGMA user_version`` + an ordered list of migrations**, each applied with its version bump
  in one transaction: an old project is upgraded in place, a crash mid-upgrade changes nothing.
  Migrations are history: their SQL (status names included) never changes once released.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ghist_core.errors import StoreError

__all__ = ["DB_NAME", "MIGRATIONS", "SCHEMA_VERSION", "ProjectDB", "migrate", "to_json", "utc_now"]

DB_NAME = "project.sqlite"
BUSY_TIMEOUT_MS = 60_000


def utc_now() -> str:
    """UTC timestamp, ISO 8601 with milliseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def to_json(obj: Any) -> str:
    """JSON text for a params/attrs/mapping column (numpy scalars, paths and sets allowed)."""
    return json.dumps(obj if obj is not None else {}, default=_json_default, sort_keys=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


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


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock (worth waiting for)."""
    return "locked" in str(exc) or "busy" in str(exc)


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
# connections
# --------------------------------------------------------------------------------------------
class ProjectDB:
    """The SQLite file of one project folder, with one connection per thread (and per process).

    Opening it switches the file to WAL, brings the schema up to date and records the project's
    name once. Paths in rows are relative to ``folder`` (:meth:`rel`, :meth:`abspath`).
    """

    def __init__(self, folder: Path, *, name: str | None = None) -> None:
        self.folder = folder
        self.path = folder / DB_NAME
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn = self.conn()
                # switching a new file to WAL answers "locked" at once, without the busy handler, while
                # another process creates the same project: retried below until the busy timeout
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"The project database at {self.path} cannot use write-ahead logging ({mode}).")
                migrate(conn)
                break
            except sqlite3.DatabaseError as exc:
                busy = isinstance(exc, sqlite3.OperationalError) and _is_busy(exc)
                if busy and time.monotonic() < deadline:
                    time.sleep(0.02 + 0.08 * random.random())
                    continue
                self.close()
                if busy:
                    raise StoreError(f"The project database {self.path} stayed busy for {BUSY_TIMEOUT_MS / 1000:.0f} s "
                                     "(another process is creating or upgrading it). Try again.") from exc
                raise StoreError(
                    f"The project database {self.path} could not be opened ({exc}). It may be damaged or not a "
                    "GHIST Studio project file."
                ) from exc
        with self.tx() as c:
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (utc_now(),))
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('name', ?)", (name or folder.name,))

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork)."""
        if self._closed:
            raise StoreError("This project has been closed.")
        held = getattr(self._local, "conn", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        # check_same_thread=False only so close() may close it from another thread; each connection is
        # used solely by the thread that made it (thread-local).
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        _configure(conn)
        self._local.conn = (os.getpid(), conn)
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that queues behind other writers (BEGIN IMMEDIATE) and rolls back on error."""
        conn = self.conn()
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

    def meta(self, key: str) -> str | None:
        row = self.conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def schema_version(self) -> int:
        return int(self.conn().execute("PRAGMA user_version").fetchone()[0])

    def integrity_check(self) -> str:
        """SQLite's own consistency check (``"ok"`` when healthy)."""
        return str(self.conn().execute("PRAGMA integrity_check").fetchone()[0])

    # -- paths stored in rows ---------------------------------------------------------------
    def rel(self, path: str | os.PathLike) -> str:
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
