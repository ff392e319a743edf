"""Browser uploads on real files: staging to disk, adding (or finding) the slide, sweeping leftovers."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from ghist_core.errors import MissingMppError, SlideError
from ghist_core.project import Project, uploads
from project_fixtures import make_png, project  # noqa: F401 (pytest fixtures)


def test_staging_dir_is_stable_and_per_project(tmp_path: Path) -> None:
    a = uploads.staging_dir(tmp_path / "p1")
    assert a == uploads.staging_dir(str(tmp_path / "p1")) == uploads.staging_dir(tmp_path / "x" / ".." / "p1")
    assert a != uploads.staging_dir(tmp_path / "p2") and a.parent.name == "ghist-uploads"


def test_stage_upload_keeps_bytes_and_extension(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    fh = io.BytesIO(data)
    fh.read(100)  # a file object the browser layer already read from: staged from the start
    staged = uploads.stage_upload("scan.ome.tif", fh, tmp_path / "stage")
    assert staged.path.read_bytes() == data and staged.size_bytes == len(data)
    assert staged.path.name.endswith(".ome.tif") and staged.name == "scan.ome.tif"
    raw = uploads.stage_upload("a.PNG", b"abc", tmp_path / "stage")
    assert raw.path.suffix == ".PNG" and raw.path.read_bytes() == b"abc" and raw.path != staged.path
    uploads.discard_staged(raw)
    uploads.discard_staged(raw)  # twice is fine
    assert not raw.path.exists()


def test_add_staged_upload_tells_new_from_known_and_cleans_up(project: Project, make_png, tmp_path: Path) -> None:
    png = make_png(tmp_path / "a.png").read_bytes()
    first = uploads.upload_and_add(project, "Région 1.png", png, patient_id="P1", mpp=0.5)
    assert first.is_new and first.record.original_name == "Région 1.png" and first.record.patient_id == "P1"
    again = uploads.upload_and_add(project, "copy.png", io.BytesIO(png), patient_id=None, mpp=0.5)
    assert not again.is_new and again.record.slide_id == first.record.slide_id
    with pytest.raises(SlideError):
        uploads.upload_and_add(project, "x.svs", b"garbage" * 100, patient_id="P9")
    staged = uploads.stage_upload("b.png", make_png(tmp_path / "b.png", seed=2).read_bytes(),
                                  uploads.staging_dir(project.folder))
    with pytest.raises(MissingMppError):
        uploads.inspect_upload(staged.path)
    info = uploads.inspect_upload(staged.path, mpp=0.5, thumbnail_px=32)
    assert (info["width_px"], info["mpp"]) == (64, 0.5) and max(info["thumbnail"].shape[:2]) <= 32
    assert uploads.add_staged_upload(project, staged, patient_id="", mpp=0.5).is_new
    assert len(project.list_slides()) == 2
    assert not any(uploads.staging_dir(project.folder).glob("*"))  # every staged copy is gone


def test_sweep_removes_only_abandoned_uploads(tmp_path: Path) -> None:
    folder = tmp_path / "proj"
    stage = uploads.staging_dir(folder)
    old = uploads.stage_upload("old.svs", b"old", stage)
    fresh = uploads.stage_upload("new.svs", b"new", stage)
    other = stage / "notes.txt"  # not ours: never touched
    other.write_text("keep")
    past = time.time() - 2 * uploads.STALE_STAGED_S
    os.utime(old.path, (past, past))
    os.utime(other, (past, past))
    assert uploads.sweep_staged_uploads(folder) == [old.path]
    assert fresh.path.exists() and other.exists() and not old.path.exists()
    assert uploads.sweep_staged_uploads(tmp_path / "never-used") == []
    fresh.path.unlink()
    other.unlink()
