"""Export a project's predictions: one slide, or every slide with a finished run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from ghist_core import _keys as K
from ghist_core.errors import ExportError
from ghist_core.io.atomic import atomic_write_text
from ghist_core.export.geojson import write_geojson
from ghist_core.export.h5ad import write_h5ad
from ghist_core.export.table import write_csv, write_parquet
from ghist_core.pipeline.blocks import load_prediction, slide_overview_image
from ghist_core.project import Project, RunStatus

__all__ = ["FORMATS", "MANIFEST_NAME", "export_slide", "export_project", "finished_slides", "export_file_name",
           "export_manifest"]

#: format → file extension
FORMATS: dict[str, str] = {"h5ad": ".h5ad", "csv": ".csv", "parquet": ".parquet", "geojson": ".geojson"}
#: longest side of the H&E overview put into an ``.h5ad`` that has none
OVERVIEW_MAX_PX = 2000
#: the table beside a project export saying which file is which slide and patient
MANIFEST_NAME = "manifest.csv"


def finished_slides(project: Project) -> list[int]:
    """Slide ids with at least one finished run, in slide order."""
    ids = [int(s) for s in project.list_slides()["slide_id"]]
    return [s for s in ids if project.latest_run(s, status=RunStatus.FINISHED) is not None]


def export_file_name(slide_id: int, fmt: str) -> str:
    """``slide_<id>.<ext>``: unique per slide and safe on every OS (the id is the project's)."""
    return f"slide_{int(slide_id)}{FORMATS[fmt]}"


def export_manifest(project: Project, slide_ids: Iterable[int], fmt: str):
    """One row per exported file: its slide, the file the user uploaded, the patient, µm/px and the
    run it holds. Why: the files are named ``slide_<id>`` (safe everywhere), so without this table
    nobody can tell whose cells a file holds without going back to the app."""
    import pandas as pd

    rows = []
    for sid in slide_ids:
        rec = project.get_slide(int(sid))
        run = project.latest_run(int(sid), status=RunStatus.FINISHED)
        rows.append({"file": export_file_name(sid, fmt), "slide_id": int(sid), "slide_file": rec.name,
                     "patient_id": rec.patient_id or "", "mpp": float(rec.mpp),
                     "run_id": int(run.run_id) if run is not None else None,
                     "n_cells": int(run.n_cells) if run is not None and run.n_cells is not None else None,
                     "finished_at": (run.finished_at or "") if run is not None else ""})
    return pd.DataFrame(rows, columns=["file", "slide_id", "slide_file", "patient_id", "mpp", "run_id", "n_cells",
                                       "finished_at"])


def export_slide(project: Project, slide_id: int, fmt: str, out: str | os.PathLike, *,
                 genes: Iterable[str] | None = None, adata: Any | None = None) -> Path:
    """Write the latest finished prediction of a slide to ``out`` in ``fmt`` (see :data:`FORMATS`).

    ``adata`` is that prediction when the caller holds it already (the app's cached copy):
    it is read, never changed, and the slide is not loaded a second time."""
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if adata is None:
        adata = load_prediction(project, slide_id)
    ghist = adata.uns.get(K.UNS_GHIST, {})
    # older results do not record the slide's µm/px: the store knows it
    mpp = None if isinstance(ghist, dict) and ghist.get("mpp") else float(project.get_slide(slide_id).mpp)
    if fmt == "h5ad":
        def overview():
            rgb, (_, _, right_um, _) = slide_overview_image(project, slide_id, max_px=OVERVIEW_MAX_PX)
            return rgb, rgb.shape[1] / right_um

        return write_h5ad(adata, out, overview=overview, mpp=mpp)
    if fmt == "geojson":
        return write_geojson(adata, out, genes, mpp=mpp)
    if fmt == "csv":
        return write_csv(adata, out, genes)
    return write_parquet(adata, out, genes)


def export_project(project: Project, fmt: str, out_dir: str | os.PathLike, *,
                   genes: Iterable[str] | None = None) -> list[Path]:
    """Every slide with a finished run into ``out_dir`` (one file per slide); returns the paths."""
    slides = finished_slides(project)
    if not slides:
        raise ExportError("No slide of this project has a finished prediction to export yet.")
    out_dir = Path(out_dir)
    genes = None if genes is None else list(genes)
    paths = [export_slide(project, s, fmt, out_dir / export_file_name(s, fmt), genes=genes) for s in slides]
    manifest = out_dir / MANIFEST_NAME
    atomic_write_text(manifest, export_manifest(project, slides, fmt).to_csv(index=False))
    return [*paths, manifest]
