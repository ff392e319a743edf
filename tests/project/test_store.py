"""The SQLite project store, on real files: schema, migrations, slides, runs, crashes, concurrency."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ghist_core import paths

from ghist_core.project import store
from ghist_core.errors import (
    EmptyFileError,
    ImageTooLargeError,
    InvalidFileNameError,
    InvalidMppError,
    MissingMppError,
    ProjectNotFoundError,
    SlideError,
    StoreError,
    UnsupportedPixelFormatError,
    UnsupportedSlideError,
)
from ghist_core.project.store import SCHEMA_VERSION, Project, sanitize_filename

SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # from slides/README.md


def _snapshot(project: Project) -> tuple:
    """Row counts of every table and the full folder listing with file hashes."""
    c = project._conn()
    tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    counts = {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in sorted(tables)}
    listing = sorted(
        (p.relative_to(project.folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in project.folder.rglob("*")
        if not p.name.startswith("project.sqlite")  # the db and its -wal/-shm files change on reads
    )
    return counts, listing


def _png(path: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Project:
    with Project.create(tmp_path / "proj", name="Test project") as p:
        yield p


# ------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------
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


def test_migration_from_version_1_keeps_data(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    conn = sqlite3.connect(folder / "project.sqlite", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    assert store.migrate(conn, target=1) == 1
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
        assert r.status == "finished" and r.worker_pid is None
        assert p.list_patients().loc[0, "age"] == 61
        assert p.list_clinical_tables().empty  # table added by migration 3


def test_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    store.migrate(conn, target=2)

    def broken(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE half_done (x INTEGER)")
        c.execute("ALTER TABLE no_such_table ADD COLUMN y")

    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS[:2], broken))
    with pytest.raises(sqlite3.OperationalError):
        store.migrate(conn, target=3)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    (tmp_path / "db.sqlite").rename(tmp_path / "project.sqlite")
    with pytest.raises(StoreError, match="newer GHIST Studio"):
        Project.open(tmp_path)


# ------------------------------------------------------------------------------------------
# file names
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("CMU-1.svs", "CMU-1.svs"),
        ("Gewebe Müller (2).SVS", "Gewebe_Muller_2.svs"),
        ("日本語.ndpi", "file.ndpi"),
        ("ｓｌｉｄｅ１.tif", "slide1.tif"),  # fullwidth letters: NFKC
        ("..hidden.svs", "hidden.svs"),
        ("a....b.svs", "a.b.svs"),
        ("scan.ome.tiff", "scan.ome.tiff"),
        ("CON.svs", "_CON.svs"),
        ("x" * 300 + ".svs", "x" * 116 + ".svs"),
    ],
)
def test_sanitize_filename_accepts(name: str, safe: str) -> None:
    out = sanitize_filename(name)
    assert out == safe
    assert len(out) <= 120 and "/" not in out and ".." not in out and not out.startswith(".")


@pytest.mark.parametrize(
    "name",
    ["", "   ", "../../etc/passwd.svs", "/abs/slide.svs", "C:\\Users\\slide.svs", "..", "．．／evil.svs",
     "evil\u202egvs.svs", "nul\x00byte.svs", "tab\tname.svs"],
)
def test_sanitize_filename_refuses(name: str) -> None:
    with pytest.raises(InvalidFileNameError):
        sanitize_filename(name)


# ------------------------------------------------------------------------------------------
# slides
# ------------------------------------------------------------------------------------------
def test_add_real_svs_dedupes_and_keeps_original_name(project: Project, svs_path: Path) -> None:
    rec = project.add_slide(svs_path, patient_id="TCGA-A1", original_name="Gewebe Müller 日本.svs")
    assert (rec.width, rec.height, rec.level_count) == (2220, 2967, 1)
    assert rec.mpp == pytest.approx(0.499) and rec.format == "openslide" and rec.vendor == "aperio"
    assert rec.sha256 == SVS_SHA256 and rec.size_bytes == svs_path.stat().st_size
    assert rec.original_name == "Gewebe Müller 日本.svs" and rec.path == f"slides/{SVS_SHA256[:12]}_Gewebe_Muller.svs"
    stored = project.slide_path(rec.slide_id)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == SVS_SHA256
    assert not list((project.folder / "slides").glob("*.part"))
    before = _snapshot(project)
    again = project.add_slide(svs_path, original_name="another name.svs")
    assert again == rec and _snapshot(project) == before
    df = project.list_slides()
    assert df.loc[0, "name"] == "Gewebe Müller 日本.svs" and df.loc[0, "patient_id"] == "TCGA-A1"
    assert list(project.list_patients()["patient_id"]) == ["TCGA-A1"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bad_inputs(tmp: Path, svs: Path) -> list[tuple[str, Path, dict, type]]:
    empty = tmp / "empty.svs"
    empty.write_bytes(b"")
    text = tmp / "notes.svs"
    text.write_text("Patient notes, not a slide.\n" * 50)
    truncated = tmp / "truncated.svs"
    truncated.write_bytes(svs.read_bytes()[: 300_000])
    png = _png(tmp / "region.png")
    bomb = tmp / "bomb.png"  # a 4e10-pixel PNG header in a few hundred bytes
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b"")
    )
    u16 = tmp / "u16.tif"
    tifffile.imwrite(u16, np.full((32, 32, 3), 40000, dtype=np.uint16))
    return [
        ("decompression bomb", bomb, {"mpp": 0.5}, ImageTooLargeError),
        ("16-bit tiff", u16, {"mpp": 0.5}, UnsupportedPixelFormatError),
        ("zero-byte", empty, {}, EmptyFileError),
        ("text renamed .svs", text, {}, UnsupportedSlideError),
        ("truncated svs", truncated, {}, SlideError),
        ("png without mpp", png, {}, MissingMppError),
        ("mpp zero", png, {"mpp": 0}, InvalidMppError),
        ("mpp negative", png, {"mpp": -0.5}, InvalidMppError),
        ("name with ../", png, {"mpp": 0.5, "original_name": "../../slides/evil.png"}, InvalidFileNameError),
        ("fullwidth ../", png, {"mpp": 0.5, "original_name": "．．／evil.png"}, InvalidFileNameError),
        ("bidi override", png, {"mpp": 0.5, "original_name": "scan\u202egnp.exe"}, InvalidFileNameError),
    ]


def test_bad_inputs_raise_typed_errors_and_leave_store_unchanged(
    project: Project, svs_path: Path, tmp_path: Path
) -> None:
    project.add_slide(svs_path, patient_id="P0")  # a store with content to lose
    before = _snapshot(project)
    for label, path, kwargs, err in _bad_inputs(tmp_path, svs_path):
        with pytest.raises(err) as info:
            project.add_slide(path, patient_id="P-new", **kwargs)
        assert str(info.value) and "Traceback" not in str(info.value), label
        assert _snapshot(project) == before, label
    assert project.integrity_check() == "ok"
    # a good PNG with an explicit mpp and a unicode name is accepted
    rec = project.add_slide(_png(tmp_path / "ok.png"), mpp=0.5, original_name="Région 1.png")
    assert rec.path.endswith("_Region_1.png") and rec.mpp == 0.5


# ------------------------------------------------------------------------------------------
# runs, result files, clinical tables
# ------------------------------------------------------------------------------------------
def test_run_lifecycle_and_result_files(project: Project, tmp_path: Path) -> None:
    sid = project.add_slide(_png(tmp_path / "a.png"), mpp=0.5, patient_id="P1").slide_id
    rid = project.start_run(sid, model_id="ghist-studio/ghist-her2st@main", weights_sha256="ab" * 32,
                            device="cpu", params={"tile_px": 512, "genes": ["ERBB2", "ESR1"]})
    project.update_run(rid, stage="segment", progress=0.4, message="tile 4/10")
    project.update_run(rid, progress=7.0)  # clamped
    r = project.get_run(rid)
    assert (r.status, r.stage, r.progress, r.worker_pid) == ("running", "segment", 1.0, os.getpid())
    assert r.params == {"tile_px": 512, "genes": ["ERBB2", "ESR1"]} and r.created_at.endswith("+00:00")
    assert project.run_dir(rid) == project.folder / "runs" / str(rid) and project.run_dir(rid).is_dir()

    out = project.folder / "results" / "a.h5ad"
    out.write_bytes(b"result bytes")
    project.add_result_file(rid, "h5ad", out)
    with pytest.raises(StoreError, match="outside the project folder"):
        project.add_result_file(rid, "grid", _png(tmp_path / "outside.png"))
    assert project.result_files(rid) == {"h5ad": out}
    info = project.result_file_info(rid)
    assert info.loc[0, "path"] == "results/a.h5ad" and info.loc[0, "sha256"] == hashlib.sha256(b"result bytes").hexdigest()

    project.finish_run(rid, n_cells=1234, timings={"segment_s": np.float64(1.5)})
    r = project.get_run(rid)
    assert (r.status, r.n_cells, r.timings, r.progress) == ("finished", 1234, {"segment_s": 1.5}, 1.0)
    assert project.fail_run(rid, "too late") is False and project.get_run(rid).status == "finished"
    assert project.cancel_run(rid) is False and project.get_run(rid).error is None
    with pytest.raises(StoreError, match="is finished"):
        project.requeue_run(rid)
    df = project.list_slides()
    assert (df.loc[0, "status"], df.loc[0, "n_cells"], df.loc[0, "run_id"]) == ("finished", 1234, rid)

    q = project.start_run(sid, model_id=None, weights_sha256=None, device="cuda", params={}, status="queued")
    assert project.get_run(q).worker_pid is None and project.mark_interrupted_runs() == []
    project.resume_run(q)
    project.fail_run(q, "Out of memory on the GPU.")
    assert project.latest_run(sid).status == "failed" and project.latest_run(sid, status="finished").run_id == rid
    project.requeue_run(q)
    assert project.get_run(q).status == "queued" and project.get_run(q).error is None
    project.cancel_run(q)
    assert list(project.list_runs(sid)["status"]) == ["cancelled", "finished"]

    project.delete_slide(sid)
    assert project.list_slides().empty and project.list_runs().empty
    assert not out.exists() and not (project.folder / "runs" / str(rid)).exists()
    assert not list((project.folder / "slides").iterdir())
    with pytest.raises(StoreError, match="no slide"):
        project.get_slide(sid)


def test_clinical_table_kept_unchanged(project: Project, shared_data: Path) -> None:
    src = shared_data / "clinical" / "tcga_brca_clinical.csv"
    mapping = {"patient_id": "bcr_patient_barcode", "time": "OS.time", "event": "OS"}
    tid = project.add_clinical_table(src, name="TCGA BRCA", mapping=mapping)
    path, got = project.get_clinical_table(tid)
    assert path.read_bytes() == src.read_bytes() and got == mapping
    project.set_clinical_mapping(tid, {**mapping, "group": "ER"})
    df = project.list_clinical_tables()
    assert df.loc[0, "name"] == "TCGA BRCA" and df.loc[0, "mapping"]["group"] == "ER"
    before = _snapshot(project)
    with pytest.raises(InvalidFileNameError):
        project.add_clinical_table(src, name="x", original_name="../clinical.csv")
    assert _snapshot(project) == before


# ------------------------------------------------------------------------------------------
# crashes and concurrency (real processes)
# ------------------------------------------------------------------------------------------
def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(paths.REPO_DIR))


def test_sigkill_mid_run_leaves_store_consistent_and_run_resumable(project: Project, tmp_path: Path) -> None:
    sid = project.add_slide(_png(tmp_path / "a.png"), mpp=0.5).slide_id
    worker = subprocess.Popen(
        _py(
            f"""
            from ghist_core.io.atomic import atomic_write_bytes
            from ghist_core.project.store import Project
            p = Project.open({str(project.folder)!r})
            rid = p.start_run({sid}, model_id="m", weights_sha256="s", device="cpu", params={{}})
            print(rid, flush=True)
            i = 0
            while True:  # write as fast as possible until killed
                i += 1
                p.update_run(rid, stage="segment", progress=(i % 1000) / 1000, message=f"block {{i}}")
                p.add_patient(f"P{{i}}", block=i)
                f = p.run_dir(rid) / f"block_{{i % 7}}.npy"
                atomic_write_bytes(f, bytes(4096))
                p.add_result_file(rid, f"block{{i % 7}}", f)
            """
        ),
        stdout=subprocess.PIPE, text=True, env=_env(),
    )
    rid = int(worker.stdout.readline())
    deadline = time.monotonic() + 60
    while project._conn().execute("SELECT COUNT(*) FROM patients").fetchone()[0] < 50:
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    worker.stdout.close()

    assert project.integrity_check() == "ok"
    assert project.get_run(rid).status == "running"  # nobody told the store: the worker just vanished
    assert project.mark_interrupted_runs() == [rid]
    r = project.get_run(rid)
    assert r.status == "interrupted" and r.is_resumable
    for kind, path in project.result_files(rid).items():  # every recorded file is whole
        assert path.stat().st_size == 4096, kind
    project.resume_run(rid)
    project.finish_run(rid, n_cells=0, timings={})
    assert project.get_run(rid).status == "finished" and project.mark_interrupted_runs() == []


def test_workers_on_other_machines_are_judged_by_heartbeat(project: Project, tmp_path: Path) -> None:
    sid = project.add_slide(_png(tmp_path / "a.png"), mpp=0.5).slide_id
    fresh, stale, mine = (project.start_run(sid, model_id="m", weights_sha256="s", device="cpu") for _ in range(3))
    old = "2020-01-01T00:00:00.000+00:00"
    c = project._conn()
    c.execute("UPDATE runs SET worker_host = 'gpu-node-7', worker_pid = 1 WHERE run_id IN (?, ?)", (fresh, stale))
    c.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", (old, stale))
    assert project.mark_interrupted_runs() == [stale]  # pid 1 means nothing on another host; its heartbeat does
    assert [project.get_run(r).status for r in (fresh, stale, mine)] == ["running", "interrupted", "running"]
    project.heartbeat(fresh)  # taken over by this process
    assert project.get_run(fresh).worker_pid == os.getpid() and project.mark_interrupted_runs() == []


def test_concurrent_writers_threads_and_processes(project: Project, tmp_path: Path) -> None:
    sid = project.add_slide(_png(tmp_path / "a.png"), mpp=0.5).slide_id
    n = 25
    code = f"""
        import sys
        from ghist_core.project.store import Project
        tag = sys.argv[1]
        with Project.open({str(project.folder)!r}) as p:
            for i in range({n}):
                p.add_patient(f"{{tag}}-{{i}}", i=i)
                rid = p.start_run({sid}, model_id=tag, weights_sha256="s", device="cpu", params={{"i": i}})
                p.update_run(rid, stage="predict", progress=0.5)
                p.finish_run(rid, n_cells=i, timings={{}})
                p.list_slides()
        """
    procs = [subprocess.Popen([*_py(code), f"proc{k}"], env=_env(), stderr=subprocess.PIPE, text=True) for k in range(4)]
    errors: list[BaseException] = []

    def thread_writer(tag: str) -> None:
        try:
            for i in range(n):
                project.add_patient(f"{tag}-{i}", i=i)
                rid = project.start_run(sid, model_id=tag, weights_sha256="s", device="cpu", params={"i": i})
                project.update_run(rid, progress=0.5)
                project.finish_run(rid, n_cells=i, timings={})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(f"thread{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert not errors, errors
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    assert not any("locked" in err for _, err in results)
    assert project.integrity_check() == "ok"
    runs = project.list_runs()
    assert len(runs) == 8 * n and set(runs["status"]) == {"finished"}
    assert len(project.list_patients()) == 8 * n
    assert runs.groupby("model_id").size().to_dict() == {f"{k}{i}": n for k in ("proc", "thread") for i in range(4)}


def test_opening_a_project_sweeps_temporaries_a_killed_copy_left(project: Project) -> None:
    """A SIGKILL during add_slide leaves slides/.NAME.XXXX.part; an hour later it is swept on open."""
    slides = project.folder / "slides"
    stale = slides / ".abc123_slide.svs.k2j4.part"
    fresh = slides / ".def456_slide.svs.x9q1.part"
    kept = slides / "abc123_slide.svs"
    for p in (stale, fresh, kept):
        p.write_bytes(b"partial")
    old = time.time() - 2 * Project.STALE_TEMP_S
    os.utime(stale, (old, old))
    os.utime(kept, (old, old))
    Project.open(project.folder).close()
    assert not stale.exists()
    assert fresh.exists() and kept.exists()  # a copy still being written, and real files, stay
    assert project.sweep_stale_temp_files(max_age_s=0) == [fresh]
