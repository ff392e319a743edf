"""A cohort of slides on Dask distributed: one task per slide.

A ``LocalCluster`` by default, or any running scheduler by address, so a lab's
cluster (or Dask on Kubernetes / SLURM through dask-jobqueue) runs the same
code. A task is idempotent: it adds the slide (deduplicated by sha256), returns
a finished run if there is one, and otherwise resumes the slide's latest run
when it is resumable (``RunStatus.is_resumable``: queued, interrupted, failed or
cancelled) from its checkpoints, so a task retried after a worker died loses nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ghist_core.errors import ClinicalTableError, GhistError
from ghist_core.project import Project, RunStatus


@dataclass(frozen=True)
class ManifestRow:
    slide_path: str
    patient_id: str | None
    mpp: float | None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Rows of ``slide_path, patient_id[, mpp]``; relative paths are relative to the manifest."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ClinicalTableError(f"Could not read the manifest {path.name}: {exc}") from exc
    table.columns = [c.strip().lower() for c in table.columns]
    if "slide_path" not in table.columns:
        raise ClinicalTableError(f"The manifest {path.name} needs a 'slide_path' column (found: {', '.join(table.columns)}).")
    rows = []
    for _, r in table.iterrows():  # a manifest is tens to hundreds of rows, not a hot path
        slide = Path(str(r["slide_path"]).strip())
        if not slide.is_absolute():
            slide = path.parent / slide
        mpp = r.get("mpp")
        rows.append(ManifestRow(str(slide), (r.get("patient_id") or None), float(mpp) if isinstance(mpp, str) and mpp.strip() else None))
    return rows


def predict_one(project_folder: str, row: ManifestRow, model_id: str | None, device: str,
                segmenter_id: str | None = None, nucleus_scale: float | str | None = None) -> dict:
    """One slide, start to finish (runs on a Dask worker); input errors come back as a failed row.
    ``nucleus_scale``: as ``ghist predict --nucleus-scale`` (None: the default, any existing run)."""
    try:
        return _predict_one(project_folder, row, model_id, device, segmenter_id, nucleus_scale)
    except GhistError as exc:  # bad input: retrying cannot help, so report instead of raising
        return {"slide": row.slide_path, "status": RunStatus.FAILED, "error": str(exc)}


def _predict_one(project_folder: str, row: ManifestRow, model_id: str | None, device: str,
                 segmenter_id: str | None, nucleus_scale: float | str | None = None) -> dict:
    from ghist_core.pipeline.worker import predict_slide_locked, stain_check

    project = Project.open_or_create(project_folder)
    record = project.add_slide(row.slide_path, patient_id=row.patient_id, mpp=row.mpp)
    # the slide's lock: a duplicate row, a retried task or a `ghist predict` on the same slide waits, then
    # finds the finished run (or resumes the interrupted one) instead of computing it twice
    done = predict_slide_locked(project, record.slide_id, model_id=model_id, segmenter_id=segmenter_id,
                                device=device, wait=True, nucleus_scale=nucleus_scale)
    stain = stain_check(done.h5ad_path) or {}
    return {"slide": row.slide_path, "slide_id": record.slide_id, "run_id": done.run_id, "n_cells": done.n_cells,
            "status": RunStatus.FINISHED,
            **({"stain_within_tested_range": bool(stain["within_tested_range"]), "stain_note": stain.get("note", "")}
               if "within_tested_range" in stain else {})}


def run_cohort(
    rows: list[ManifestRow],
    project_folder: str | os.PathLike,
    *,
    scheduler: str | None = None,
    n_workers: int = 2,
    model_id: str | None = None,
    segmenter_id: str | None = None,
    device: str = "auto",
    nucleus_scale: float | str | None = None,
    retries: int = 2,
    echo: Callable[[str], None] = print,
) -> dict:
    """Submit every slide, report each as it finishes; a failed slide does not stop the rest."""
    from dask.distributed import Client, LocalCluster, as_completed

    Project.open_or_create(project_folder)  # create once, before workers race to do it
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    results: list[dict] = []
    try:
        futures = {
            client.submit(predict_one, str(project_folder), row, model_id, device, segmenter_id, nucleus_scale,
                          retries=retries, pure=False,
                          key=f"ghist-slide-{i}-{Path(row.slide_path).name}"): row
            for i, row in enumerate(rows)
        }
        for future in as_completed(futures):
            row = futures[future]
            try:
                out = future.result()
                if out["status"] == RunStatus.FINISHED:
                    echo(f"finished {row.slide_path}: {out['n_cells']} cells")
                    if out.get("stain_note"):
                        echo(f"note: {row.slide_path}: {out['stain_note']}")
                else:
                    echo(f"failed {row.slide_path}: {out['error']}")
            except Exception as exc:  # a worker-side crash: report it, keep going
                out = {"slide": row.slide_path, "status": RunStatus.FAILED, "error": f"{type(exc).__name__}: {exc}"}
                echo(f"failed {row.slide_path}: {out['error']}")
            results.append(out)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    finished = sum(r["status"] == RunStatus.FINISHED for r in results)
    untested = sum(r.get("stain_within_tested_range") is False for r in results)
    return {"slides": len(rows), "finished": finished, "failed": len(rows) - finished,
            "stains_outside_tested_range": untested, "results": results}
