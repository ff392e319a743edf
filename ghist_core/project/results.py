"""Result files of runs and the runs' checkpoint folders (``runs/<run_id>/``).

The pipeline writes a result atomically inside the project folder, then records it here with its
sha256 and size, so a recorded file is always whole and can be checked later.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ghist_core.errors import StoreError
from ghist_core.io.hashing import sha256_file
from ghist_core.project.db import ProjectDB, utc_now

__all__ = ["run_dir", "run_dir_path", "add_result_file", "result_files", "result_file_info"]


def _check_run(c, run_id: int) -> None:
    if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (int(run_id),)).fetchone() is None:
        raise StoreError(f"There is no run {run_id} in this project.")


def run_dir_path(db: ProjectDB, run_id: int) -> Path:
    """Where a run's checkpoints live (not created)."""
    return db.folder / "runs" / str(int(run_id))


def run_dir(db: ProjectDB, run_id: int) -> Path:
    """``runs/<run_id>/`` for the run's checkpoints (created on demand; the run must exist)."""
    _check_run(db.conn(), run_id)
    d = run_dir_path(db, run_id)
    d.mkdir(parents=True, exist_ok=True)
    return d


def add_result_file(db: ProjectDB, run_id: int, kind: str, path: str | os.PathLike) -> None:
    """Record a finished result file (already written atomically, inside the project folder)."""
    rel = db.rel(path)
    p = db.abspath(rel)
    if not p.is_file():
        raise StoreError(f"The result file {rel} does not exist.")
    digest, size = sha256_file(p), p.stat().st_size
    with db.tx() as c:
        _check_run(c, run_id)
        c.execute("INSERT OR REPLACE INTO result_files(run_id, kind, path, sha256, size_bytes, created_at) "
                  "VALUES (?,?,?,?,?,?)", (int(run_id), str(kind), rel, digest, size, utc_now()))


def result_files(db: ProjectDB, run_id: int) -> dict[str, Path]:
    """``{kind: absolute path}`` of a run's result files."""
    rows = db.conn().execute("SELECT kind, path FROM result_files WHERE run_id = ? ORDER BY kind", (int(run_id),))
    return {r["kind"]: db.abspath(r["path"]) for r in rows}


def result_file_info(db: ProjectDB, run_id: int) -> pd.DataFrame:
    cur = db.conn().execute(
        "SELECT kind, path, sha256, size_bytes, created_at FROM result_files WHERE run_id = ? ORDER BY kind",
        (int(run_id),))
    return pd.DataFrame([tuple(r) for r in cur.fetchall()], columns=[d[0] for d in cur.description])
