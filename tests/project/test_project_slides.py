"""Patients and slides on real files: validation, content-addressed copies, dedup, clean refusal."""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ghist_core.errors import (
    EmptyFileError,
    ImageTooLargeError,
    InvalidFileNameError,
    InvalidMppError,
    MissingMppError,
    SlideError,
    StoreError,
    UnsupportedPixelFormatError,
    UnsupportedSlideError,
)
from ghist_core.project import Project
from ghist_core.project import slides
from project_fixtures import make_png, project, snapshot  # noqa: F401 (pytest fixtures)

SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # from slides/README.md


def test_add_real_svs_dedupes_and_keeps_original_name(project: Project, svs_path: Path, snapshot) -> None:
    rec = project.add_slide(svs_path, patient_id="TCGA-A1", original_name="Gewebe Müller 日本.svs")
    assert (rec.width, rec.height, rec.level_count) == (2220, 2967, 1)
    assert rec.mpp == pytest.approx(0.499) and rec.format == "openslide" and rec.vendor == "aperio"
    assert rec.sha256 == SVS_SHA256 and rec.size_bytes == svs_path.stat().st_size
    assert rec.original_name == "Gewebe Müller 日本.svs" and rec.path == f"slides/{SVS_SHA256[:12]}_Gewebe_Muller.svs"
    stored = project.slide_path(rec.slide_id)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == SVS_SHA256
    assert not list((project.folder / "slides").glob("*.part"))
    before = snapshot(project)
    again = project.add_slide(svs_path, original_name="another name.svs")
    assert again == rec and snapshot(project) == before
    df = project.list_slides()
    assert df.loc[0, "name"] == "Gewebe Müller 日本.svs" and df.loc[0, "patient_id"] == "TCGA-A1"
    assert list(project.list_patients()["patient_id"]) == ["TCGA-A1"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bad_inputs(tmp: Path, svs: Path, make_png) -> list[tuple[str, Path, dict, type]]:
    empty = tmp / "empty.svs"
    empty.write_bytes(b"")
    text = tmp / "notes.svs"
    text.write_text("Patient notes, not a slide.\n" * 50)
    truncated = tmp / "truncated.svs"
    truncated.write_bytes(svs.read_bytes()[: 300_000])
    png = make_png(tmp / "region.png")
    bomb = tmp / "bomb.png"  # a 4e10-pixel PNG header in a few hundred bytes
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b"")
    )
    f32 = tmp / "f32.tif"  # float samples are refused (16-bit ones are scaled: tests/io/test_pixel_formats.py)
    tifffile.imwrite(f32, np.full((32, 32, 3), 0.5, dtype=np.float32))
    return [
        ("decompression bomb", bomb, {"mpp": 0.5}, ImageTooLargeError),
        ("float tiff", f32, {"mpp": 0.5}, UnsupportedPixelFormatError),
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
    project: Project, svs_path: Path, tmp_path: Path, snapshot, make_png
) -> None:
    project.add_slide(svs_path, patient_id="P0")  # a store with content to lose
    before = snapshot(project)
    for label, path, kwargs, err in _bad_inputs(tmp_path, svs_path, make_png):
        with pytest.raises(err) as info:
            project.add_slide(path, patient_id="P-new", **kwargs)
        assert str(info.value) and "Traceback" not in str(info.value), label
        assert snapshot(project) == before, label
    assert project.integrity_check() == "ok"
    # a good PNG with an explicit mpp and a unicode name is accepted
    rec = project.add_slide(make_png(tmp_path / "ok.png"), mpp=0.5, original_name="Région 1.png")
    assert rec.path.endswith("_Region_1.png") and rec.mpp == 0.5


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


def test_add_slide_says_whether_the_file_is_new(project: Project, make_png, tmp_path: Path) -> None:
    """The same bytes under another name are the slide already there; a patient id fills a gap only."""
    a = make_png(tmp_path / "a.png")
    rec, is_new = slides.add_slide(project.db, a, mpp=0.5)
    assert is_new and rec.patient_id is None
    copy = tmp_path / "renamed.png"
    copy.write_bytes(a.read_bytes())
    again, is_new = slides.add_slide(project.db, copy, mpp=0.5, patient_id="P7")
    assert not is_new and again.slide_id == rec.slide_id and again.patient_id == "P7"
    _, is_new = slides.add_slide(project.db, make_png(tmp_path / "b.png", seed=1), mpp=0.5)
    assert is_new and len(project.list_slides()) == 2
    project.set_slide_patient(rec.slide_id, None)
    assert project.get_slide(rec.slide_id).patient_id is None
    with pytest.raises(StoreError, match="not a usable patient id"):
        project.add_patient("  ")


def test_errors_on_a_relative_upload_path_keep_their_full_stops(make_png, tmp_path: Path, monkeypatch) -> None:
    """A staged file given as a bare name (its folder is "."): only its name is replaced, never every "."."""
    monkeypatch.chdir(tmp_path)
    make_png(tmp_path / "upload_x1y2.png")
    with pytest.raises(MissingMppError) as err:
        slides._read_slide_facts(Path("upload_x1y2.png"), "biopsy 3.png", None)  # a PNG has no µm per pixel
    msg = str(err.value)
    assert "biopsy 3.png" in msg and "upload_x1y2" not in msg
    assert "the upload" not in msg and "0.25" in msg  # numbers and sentences intact
    # a staging folder is still hidden, with or without the "(looked in ...)" note
    missing = SlideError(f"The slide file 'upload_x1y2.png' was not found (looked in {tmp_path}).")
    assert str(slides.renamed_error(missing, tmp_path / "upload_x1y2.png", "biopsy 3.png")) == (
        "The slide file 'biopsy 3.png' was not found.")
    bare = SlideError("The slide file 'upload_x1y2.png' was not found (looked in .). Upload it again.")
    assert str(slides.renamed_error(bare, Path("upload_x1y2.png"), "biopsy 3.png")) == (
        "The slide file 'biopsy 3.png' was not found. Upload it again.")
    inside = SlideError(f"Could not read {tmp_path}/upload_x1y2.png.")
    assert str(slides.renamed_error(inside, tmp_path / "upload_x1y2.png", "b.png")) == "Could not read b.png."
