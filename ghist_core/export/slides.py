"""Export a project's predictions: one slide, or every slide with a finished run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from ghist_core import _keys as K
from ghist_core.errors import ExportError
from ghist_core.export.geojson import write_geojson
from ghist_core.export.h5ad import write_h5ad
from ghist_core.export.table import write_csv, write_parquet
from ghist_core.pipeline.blocks import load_prediction, slide_overview_image
from ghist_core.project import Project, RunStatus

__all__ = ["FORMATS", "export_slide", "export_project", "finished_slides", "export_file_name"]

#: format → file extension
FORMATS: dict[str, str] = {"h5ad": ".h5ad", "csv": ".csv", "parquet": ".parquet", "geojson": ".geojson"}
#: longest side of the H&E overview put into an ``.h5ad`` that has none
OVERVIEW_MAX_PX = 2000


def finished_slides(project: Project) -> list[int]:
    """Slide ids with at least one finished run, in slide order."""
    ids = [int(s) for s in project.list_slides()["slide_id"]]
    return [s for s in ids if project.latest_run(s, status=RunStatus.FINISHED) is not None]


def export_file_name(slide_id: int, fmt: str) -> str:
    """``slide_<id>.<ext>``: unique per slide and safe on every OS (the id is the project's)."""
    return f"slide_{int(slide_id)}{FORMATS[fmt]}"


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
    return [export_slide(project, s, fmt, out_dir / export_file_name(s, fmt), genes=genes) for s in slides]
