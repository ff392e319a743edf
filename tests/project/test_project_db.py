"""The project's SQLite file on real files: pragmas, schema, migrations, a damaged or newer file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ghist_core.errors import ProjectNotFoundError, StoreError
from ghist_core.project import Project, RunStatus, db
from ghist_core.project.db import SCHEMA_VERSION
from project_fixtures import make_png, project  # noqa: F401 (pytest fixtures)


def test_create_open_wal_foreign_keys(tmp_path: Path, project: Project) -> None:
    assert project.name == "Test project" and project.schema_version == SCHEMA_VERSION == 3
    raw = sqlite3.connect(project.db_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()
    c = project._conn()
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert c.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        c.execute("INSERT INTO runs(slide_id, status, created_at) VALUES (999, 'queued', 'now')")
    with pytest.raises(StoreError, match="no slide 999"):
        project.start_run(999, model_id="m", weights_sha256="s", device="cpu", params={})
    with pytest.raises(ProjectNotFoundError, match="not a GHIST Studio project"):
        Project.open(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="already holds"):
        Project.create(project.folder)
    with Project.open(project.folder) as again:
        assert again.name == "Test project"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "project.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="could not be opened"):
        Project.open(tmp_path / "junk")


def test_schema_accepts_every_run_status_and_nothing_else(project: Project, make_png, tmp_path: Path) -> None:
    """RunStatus and the schema's CHECK constraint name the same statuses (the DB keeps the strings)."""
    sid = project.add_slide(make_png(tmp_path / "a.png"), mpp=0.5).slide_id
    c = project._conn()
    for status in RunStatus:
        c.execute("INSERT INTO runs(slide_id, status, created_at) VALUES (?, ?, 'now')", (sid, status))
    assert sorted(r[0] for r in c.execute("SELECT status FROM runs")) == sorted(s.value for s in RunStatus)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        c.execute("INSERT INTO runs(slide_id, status, created_at) VALUES (?, 'paused', 'now')", (sid,))


def test_migration_from_version_1_keeps_data(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    conn = sqlite3.connect(folder / "project.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    assert db.migrate(conn, target=1) == 1
    conn.execute("INSERT INTO meta VALUES ('name', 'Old one')")
    conn.execute("INSERT INTO patients VALUES ('P1', '{\"age\": 61}', '2024-01-01T00:00:00+00:00')")
    conn.execute(
        "INSERT INTO slides(patient_id, path, original_name, sha256, size_bytes, mpp, width, height, format, added_at) "
        "VALUES ('P1', 'slides/a.svs', 'a.svs', 'abc', 10, 0.5, 100, 200, 'openslide', '2024-01-01T00:00:00+00:00')"
    )
    conn.execute("INSERT INTO runs(slide_id, status, progress, created_at) VALUES (1, 'finished', 1, '2024-01-01')")
    assert "worker_pid" not in [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    conn.close()

    with Project.open(folder) as p:
        assert p.schema_version == SCHEMA_VERSION
        assert p.name == "Old one"
        s = p.get_slide(1)
        assert (s.patient_id, s.width, s.height, s.level_count, s.vendor) == ("P1", 100, 200, 1, None)
        r = p.get_run(1)
        assert r.status is RunStatus.FINISHED and r.worker_pid is None
        assert p.list_patients().loc[0, "age"] == 61
        assert p.list_clinical_tables().empty  # table added by migration 3


def test_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    db.migrate(conn, target=2)

    def broken(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE half_done (x INTEGER)")
        c.execute("ALTER TABLE no_such_table ADD COLUMN y")

    monkeypatch.setattr(db, "MIGRATIONS", (*db.MIGRATIONS[:2], broken))
    with pytest.raises(sqlite3.OperationalError):
        db.migrate(conn, target=3)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    (tmp_path / "db.sqlite").rename(tmp_path / "project.sqlite")
    with pytest.raises(StoreError, match="newer GHIST Studio"):
        Project.open(tmp_path)


def test_processes_creating_one_project_at_once_all_open_it(tmp_path: Path) -> None:
    """Two ``ghist predict`` on a new project create it at the same moment: SQLite answers the switch to
    WAL with "database is locked" at once (no busy handler), which used to fail one of them with
    "may be damaged" (found by bench/robustness.py's cli_recovery). Eight processes released together."""
    import os
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    for trial in range(4):
        folder, go = tmp_path / f"p{trial}", tmp_path / f"go{trial}"
        code = ("import os, time\nfrom ghist_core.project.store import Project\n"
                f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
                f"Project.open_or_create({str(folder)!r}).close()\n")
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(8)]
        time.sleep(2.5)  # all imported and waiting
        go.write_text("go")
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), [e.strip().splitlines()[-1] for e in errors if e.strip()]
        with Project.open(folder) as project:
            assert project.schema_version == SCHEMA_VERSION
