"""Browser uploads: staged to disk outside the project, inspected, then added (or found already there).

A browser upload can be gigabytes, so it is written to a staging folder in chunks (constant
memory) before the store validates and copies it. The staged copy is removed once added or
refused; :func:`sweep_staged_uploads` clears copies a closed browser tab left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ghist_core.project import slides
from ghist_core.project.slides import SlideRecord

__all__ = ["StagedUpload", "AddedUpload", "staging_dir", "stage_upload", "inspect_upload", "add_staged_upload",
           "upload_and_add", "discard_staged", "sweep_staged_uploads"]

#: A staged upload untouched this long was abandoned (the tab closed before "Add to project").
STALE_STAGED_S = 24 * 3600.0


@dataclass(frozen=True)
class StagedUpload:
    """An uploaded file written to a staging folder outside the project until it is added."""

    name: str
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class AddedUpload:
    """The slide an upload became; ``is_new`` is False when the same file was already in the project."""

    record: SlideRecord
    is_new: bool


def staging_dir(project_folder: str | os.PathLike) -> Path:
    """The staging folder for uploads to one project (stable across processes and restarts)."""
    key = hashlib.sha256(str(Path(project_folder).expanduser().resolve()).encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "ghist-uploads" / key


def stage_upload(name: str, data: BinaryIO | bytes, folder: Path) -> StagedUpload:
    """Copy an upload to ``folder`` in chunks (constant memory), keeping its extension."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "".join(Path(name).suffixes[-2:]) if name.lower().endswith(".ome.tif") else Path(name).suffix
    fd, tmp = tempfile.mkstemp(prefix="upload_", suffix=suffix, dir=folder)
    with os.fdopen(fd, "wb") as out:
        if isinstance(data, (bytes, bytearray)):
            out.write(data)
        else:
            if hasattr(data, "seek"):
                data.seek(0)
            shutil.copyfileobj(data, out, length=1 << 22)
    p = Path(tmp)
    return StagedUpload(name, p, p.stat().st_size)


def inspect_upload(path: Path, mpp: float | None = None, *, thumbnail_px: int = 384,
                   name: str | None = None) -> dict[str, Any]:
    """A staged slide's info dict plus a small ``thumbnail`` (raises ``SlideError`` subclasses).

    With ``name`` (the user's file name) error messages say it instead of the staged file's.
    """
    from ghist_core.errors import GhistError
    from ghist_core.io.slide import open_slide

    try:
        with open_slide(path, mpp=mpp) as slide:
            info = dict(slide.info)
            info["thumbnail"] = slide.thumbnail(thumbnail_px)
            if name is not None:
                info["file_name"] = name
    except GhistError as exc:
        new = slides.renamed_error(exc, Path(path), name) if name is not None else exc
        if new is exc:
            raise
        raise new from None
    return info


def add_staged_upload(project, staged: StagedUpload, *, patient_id: str | None,
                      mpp: float | None = None) -> AddedUpload:
    """Validate and add a staged upload to ``project``; the staged copy is removed either way.

    The store validates, sanitises the name and copies atomically, so a bad file raises a typed
    ``GhistError`` and leaves the project as it was. A file already in the project (same sha256)
    is not copied again: ``is_new`` says which happened.
    """
    try:
        record, is_new = slides.add_slide(project.db, staged.path, patient_id=(patient_id or None),
                                          original_name=staged.name, mpp=mpp)
    finally:
        discard_staged(staged)
    return AddedUpload(record, is_new)


def upload_and_add(project, name: str, data: BinaryIO | bytes, *, patient_id: str | None,
                   mpp: float | None = None) -> AddedUpload:
    """The upload page's whole path in one call: stage, validate, add."""
    staged = stage_upload(name, data, staging_dir(project.folder))
    return add_staged_upload(project, staged, patient_id=patient_id, mpp=mpp)


def discard_staged(staged: StagedUpload) -> None:
    """Remove a staged copy (the user took the file out of the uploader, or it was added)."""
    staged.path.unlink(missing_ok=True)


def sweep_staged_uploads(project_folder: str | os.PathLike, max_age_s: float = STALE_STAGED_S) -> list[Path]:
    """Delete staged uploads for this project not touched for ``max_age_s``; returns what went."""
    folder = staging_dir(project_folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - max_age_s
    gone = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and entry.name.startswith("upload_"):
            try:
                if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    os.unlink(entry.path)
                    gone.append(Path(entry.path))
            except FileNotFoundError:  # another session swept it first
                pass
    return gone
