"""Browser uploads: staged to disk outside the project, inspected, then added (or found already there).

A browser upload can be gigabytes, so it is written to a staging folder in chunks (constant
memory) before the store validates and copies it. A staged copy is a whole slide (its label
image included), so it never outlives its use: it is removed once added, refused or taken out
of the uploader, and the sweeps clear what a closed tab or a stopped server left behind:

* every staged file carries the pid of the process that staged it (the app server); when that
  process is gone the file is abandoned and goes at the next sweep, whatever its age;
* :func:`sweep_all_staged_uploads` runs when the app starts (once per server process),
  :func:`sweep_staged_uploads` after every add or discard and once per session; both also
  remove files untouched for ``STALE_STAGED_S``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from ghist_core.project import slides
from ghist_core.project.runs import pid_alive
from ghist_core.project.slides import SlideRecord

__all__ = ["StagedUpload", "AddedUpload", "staging_dir", "stage_upload", "inspect_upload", "add_staged_upload",
           "upload_and_add", "discard_staged", "sweep_staged_uploads", "sweep_all_staged_uploads", "staging_root"]

#: A staged upload untouched this long was abandoned (the tab closed before "Add to project").
STALE_STAGED_S = 24 * 3600.0
#: ``upload_p<pid>_<random><ext>``: the pid of the process that staged it.
_OWNED = re.compile(r"^upload_p(\d+)_")


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


def staging_root() -> Path:
    """``<system temp>/ghist-uploads``: every project's staging folder is inside."""
    return Path(tempfile.gettempdir()) / "ghist-uploads"


def staging_dir(project_folder: str | os.PathLike) -> Path:
    """The staging folder for uploads to one project (stable across processes and restarts)."""
    key = hashlib.sha256(str(Path(project_folder).expanduser().resolve()).encode("utf-8")).hexdigest()[:16]
    return staging_root() / key


def stage_upload(name: str, data: BinaryIO | bytes, folder: Path) -> StagedUpload:
    """Copy an upload to ``folder`` in chunks (constant memory), keeping its extension."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # only the app's account may list staged files
    suffix = "".join(Path(name).suffixes[-2:]) if name.lower().endswith(".ome.tif") else Path(name).suffix
    fd, tmp = tempfile.mkstemp(prefix=f"upload_p{os.getpid()}_", suffix=suffix, dir=folder)  # mode 0600
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

    A µm/px too coarse for the default analysis (more than ``MAX_UPSAMPLE_FACTOR`` x its working
    µm/px, e.g. 5 typed for a 0.5 µm/px scan) is refused here, as its run would fail at the first read.
    With ``name`` (the user's file name) error messages say it instead of the staged file's.
    """
    from ghist_core.errors import GhistError
    from ghist_core.io.slide import open_slide
    from ghist_core.segmentation.model import default_working_mpp

    try:
        with open_slide(path, mpp=mpp) as slide:
            slide.check_upsampling(default_working_mpp())
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


#: Below this side (µm) an image holds a handful of cells: it runs, but its numbers mean little.
SMALL_IMAGE_UM = 100.0


def small_image_note(info: Mapping[str, Any]) -> str | None:
    """What the upload card says about an image too small for compositions and maps (None otherwise).
    Why: a 40 x 40 px crop "finished" with 3 cells and nothing said that the result is anecdotal."""
    side = min(float(info.get("width_um") or 0.0), float(info.get("height_um") or 0.0))
    if side >= SMALL_IMAGE_UM:
        return None
    return (f"This image covers only {float(info['width_um']):.0f} × {float(info['height_um']):.0f} µm, room for a "
            f"few cells: it will run, but cell-type compositions, neighbourhoods and gene maps need a region of "
            f"at least a few hundred µm (whole slides or large crops).")


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
        discard_staged(staged)  # also sweeps the folder
    return AddedUpload(record, is_new)


def upload_and_add(project, name: str, data: BinaryIO | bytes, *, patient_id: str | None,
                   mpp: float | None = None) -> AddedUpload:
    """The upload page's whole path in one call: stage, validate, add."""
    staged = stage_upload(name, data, staging_dir(project.folder))
    return add_staged_upload(project, staged, patient_id=patient_id, mpp=mpp)


def discard_staged(staged: StagedUpload) -> None:
    """Remove a staged copy (the user took the file out of the uploader, or it was added), then
    sweep its folder of abandoned ones."""
    staged.path.unlink(missing_ok=True)
    _sweep_folder(staged.path.parent, STALE_STAGED_S)


def _abandoned(name: str, mtime: float, cutoff: float) -> bool:
    m = _OWNED.match(name)
    if m is not None and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
        return True  # the process that staged it (an app server) is gone: nobody can add it any more
    return mtime <= cutoff


def _sweep_folder(folder: Path, max_age_s: float) -> list[Path]:
    if not folder.is_dir():
        return []
    cutoff = time.time() - max_age_s
    gone = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and entry.name.startswith("upload_"):
            try:
                if _abandoned(entry.name, entry.stat(follow_symlinks=False).st_mtime, cutoff):
                    os.unlink(entry.path)
                    gone.append(Path(entry.path))
            except FileNotFoundError:  # another session swept it first
                pass
    return gone


def sweep_staged_uploads(project_folder: str | os.PathLike, max_age_s: float = STALE_STAGED_S) -> list[Path]:
    """Delete this project's staged uploads that are abandoned (their server process is gone) or
    not touched for ``max_age_s``; returns what went."""
    return _sweep_folder(staging_dir(project_folder), max_age_s)


def sweep_all_staged_uploads(max_age_s: float = STALE_STAGED_S) -> list[Path]:
    """:func:`sweep_staged_uploads` for every project's staging folder (the app runs it at start)."""
    root = staging_root()
    if not root.is_dir():
        return []
    gone = []
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            gone += _sweep_folder(Path(entry.path), max_age_s)
    return gone
