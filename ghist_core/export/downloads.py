"""Exports made on demand for a browser download: one slide's file, or the whole project as a zip.

Both are written to disk first (never built as one big string in memory): a slide's file
goes into its own folder under :func:`download_dir`, the project zip adds each slide's file
one at a time and deletes it before the next. Folders older than :data:`MAX_AGE_S` are
swept on the next export, so files a closed browser tab never fetched do not pile up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ghist_core.errors import ExportError
from ghist_core.export.slides import (FORMATS, MANIFEST_NAME, export_file_name, export_manifest, export_slide,
                                      finished_slides)
from ghist_core.io.atomic import atomic_path
from ghist_core.project import Project

__all__ = ["Download", "HOW_TO_OPEN", "MIME_TYPES", "download_dir", "prepare_slide_download",
           "prepare_project_zip", "write_project_zip", "sweep_downloads", "discard_download", "human_size"]

#: a prepared file not fetched after this long (seconds) is swept on the next export
MAX_AGE_S = 6 * 3600
_PREFIX = "ghist-export-"

MIME_TYPES: dict[str, str] = {
    "h5ad": "application/x-hdf5", "csv": "text/csv", "parquet": "application/vnd.apache.parquet",
    "geojson": "application/geo+json", "zip": "application/zip",
}
#: how to open each format, in one sentence (shown under the download button)
HOW_TO_OPEN: dict[str, str] = {
    "h5ad": "scanpy/squidpy: `adata = sc.read_h5ad(path)`, then "
            "`sc.pl.spatial(adata, color=\"ERBB2\", library_id=list(adata.uns[\"spatial\"])[0])` overlays the H&E "
            "(`obsm[\"spatial\"]` in µm; the scale factor is overview pixels per µm).",
    "csv": "Excel, R (`read.csv`) or pandas (`pd.read_csv`): one row per cell with its position (µm), type, "
           "type probabilities, morphology and the chosen genes.",
    "parquet": "pandas (`pd.read_parquet`), R (`arrow::read_parquet`) or any Arrow tool: the same table as "
               "the CSV, typed and compressed.",
    "geojson": "QuPath: open the slide, then File ▸ Import objects (or drag the file onto the viewer): each "
               "nucleus a detection classified by cell type, with morphology and the chosen genes as measurements.",
}
# already compressed inside (gzip HDF5, zstd Parquet): stored as they are in a zip
_STORED = {"h5ad", "parquet"}


@dataclass(frozen=True)
class Download:
    """A file prepared for download: where it is, the name to offer, its MIME type and size."""

    path: Path
    file_name: str
    mime: str
    n_bytes: int

    @property
    def size_text(self) -> str:
        return human_size(self.n_bytes)

    def read_bytes(self) -> bytes:
        """The file's bytes (read when the browser asks for them, not before)."""
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ExportError("The prepared file is gone (swept after a few hours, or the server restarted); "
                              "prepare it again.") from exc


def human_size(n_bytes: int) -> str:
    """``1.2 MB``-style size (decimal units, as browsers and file managers show them)."""
    n = float(n_bytes)
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def download_dir() -> Path:
    """Where prepared downloads live (``$GHIST_EXPORT_DIR``, else the system temp folder)."""
    root = Path(os.environ.get("GHIST_EXPORT_DIR") or tempfile.gettempdir()) / "ghist-exports"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sweep_downloads(max_age_s: float = MAX_AGE_S, *, now: float | None = None) -> int:
    """Delete prepared-download folders older than ``max_age_s``; returns how many."""
    now = time.time() if now is None else now
    n = 0
    for d in download_dir().glob(f"{_PREFIX}*"):
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        except OSError:
            continue
    return n


def discard_download(download: Download | None) -> None:
    """Delete a prepared file (and its folder) that is no longer offered."""
    if download is None:
        return
    folder = Path(download.path).parent
    if folder.parent == download_dir() and folder.name.startswith(_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def _new_folder() -> Path:
    sweep_downloads()
    return Path(tempfile.mkdtemp(prefix=_PREFIX, dir=download_dir()))


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")


def prepare_slide_download(project: Project, slide_id: int, fmt: str, *, genes: Iterable[str] | None = None,
                           adata: Any | None = None) -> Download:
    """Export a slide's latest finished prediction into a fresh folder of :func:`download_dir`
    (``adata``: that prediction when the caller holds it, read and never changed)."""
    _check(fmt)
    folder = _new_folder()
    name = export_file_name(slide_id, fmt)
    try:
        path = export_slide(project, slide_id, fmt, folder / name, genes=genes, adata=adata)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Download(path, name, MIME_TYPES[fmt], path.stat().st_size)


def write_project_zip(project: Project, fmt: str, out: str | os.PathLike, *, genes: Iterable[str] | None = None,
                      progress: Callable[[int, int, int], None] | None = None) -> Path:
    """Every slide with a finished run, one ``slide_<id>.<ext>`` per slide, into the zip ``out``, with
    ``manifest.csv`` (:func:`~ghist_core.export.slides.export_manifest`: which file is which slide and patient).

    Each slide is exported to a temporary file beside ``out``, added to the zip and deleted
    before the next, so the disk holds the zip plus one slide's file and memory holds
    neither. ``progress(done, total, slide_id)`` is called after each slide."""
    _check(fmt)
    slides = finished_slides(project)
    if not slides:
        raise ExportError("No slide of this project has a finished prediction to export yet.")
    genes = None if genes is None else list(genes)
    out = Path(out)
    method = zipfile.ZIP_STORED if fmt in _STORED else zipfile.ZIP_DEFLATED
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
            for i, sid in enumerate(slides):
                name = export_file_name(sid, fmt)
                part = out.parent / f".{out.name}.{name}"
                try:
                    export_slide(project, sid, fmt, part, genes=genes)
                    zf.write(part, arcname=name)
                finally:
                    part.unlink(missing_ok=True)
                if progress is not None:
                    progress(i + 1, len(slides), sid)
            zf.writestr(MANIFEST_NAME, export_manifest(project, slides, fmt).to_csv(index=False))
    return out


def prepare_project_zip(project: Project, fmt: str, *, genes: Iterable[str] | None = None,
                        progress: Callable[[int, int, int], None] | None = None) -> Download:
    """:func:`write_project_zip` into a fresh folder of :func:`download_dir`."""
    _check(fmt)
    folder = _new_folder()
    name = f"{_safe_stem(project)}_{fmt}.zip"
    try:
        path = write_project_zip(project, fmt, folder / name, genes=genes, progress=progress)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Download(path, name, MIME_TYPES["zip"], path.stat().st_size)


def _safe_stem(project: Project) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(project.folder).name)[:60].strip("_")
    return stem or "project"
