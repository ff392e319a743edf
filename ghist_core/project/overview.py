"""What the Home and Upload pages show about a project: counts, slides by state, the latest runs.

Each page calls one of these instead of filtering tables itself, so "predicted", "not run yet"
and "active" mean the same everywhere (through :class:`~ghist_core.project.runs.RunStatus`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from ghist_core.project.runs import RunStatus

__all__ = ["ProjectOverview", "summary", "finished_slides", "slides_not_run", "latest_runs", "any_active", "time_left_s",
           "slide_table", "run_table", "patient_table", "wants_run", "NOT_RUN", "NONE_TEXT"]

#: What the Prediction column says for a slide without any run.
NOT_RUN = "not run yet"
#: What a table cell says when there is nothing to show (never "None" / "nan").
NONE_TEXT = "—"


@dataclass(frozen=True)
class ProjectOverview:
    """Headline counts; a slide counts as predicted when its latest run finished."""

    n_patients: int
    n_slides: int
    n_predicted: int
    n_cells: int


def summary(project) -> ProjectOverview:
    """Counts for the Home page."""
    slides = project.list_slides()
    done = slides["status"] == RunStatus.FINISHED.value
    cells = pd.to_numeric(slides["n_cells"], errors="coerce").fillna(0)
    return ProjectOverview(n_patients=len(project.list_patients()), n_slides=len(slides),
                           n_predicted=int(done.sum()), n_cells=int(cells.sum()))


def _count_text(n, show: bool = True) -> str:
    return f"{int(n):,}" if show and n is not None and not pd.isna(n) else NONE_TEXT


def slide_table(project) -> pd.DataFrame:
    """``list_slides`` plus text columns ready to show: ``prediction`` (status or "not run yet"),
    ``cells`` (count of the finished run, else "—") and ``patient`` ("—" without one)."""
    df = project.list_slides()
    df["prediction"] = [str(s) if isinstance(s, str) else NOT_RUN for s in df["status"]]
    df["cells"] = [_count_text(n, s == RunStatus.FINISHED.value) for n, s in zip(df["n_cells"], df["status"])]
    df["patient"] = [p if isinstance(p, str) and p else NONE_TEXT for p in df["patient_id"]]
    return df


def run_table(project, slide_id: int | None = None) -> pd.DataFrame:
    """``list_runs`` (newest first) plus ``cells`` text ("—" unless finished) and a one-line ``label``."""
    df = project.list_runs(slide_id)
    df["cells"] = [_count_text(n, s == RunStatus.FINISHED.value) for n, s in zip(df["n_cells"], df["status"])]
    df["label"] = [f"run {int(r)} · {s} · {c} cells · {str(t or '')[:16].replace('T', ' ')}"
                   for r, s, c, t in zip(df["run_id"], df["status"], df["cells"], df["created_at"])]
    return df


def patient_table(project) -> pd.DataFrame:
    """``list_patients`` with missing attribute values as "—"."""
    df = project.list_patients()
    for col in df.columns:
        if col not in ("n_slides", "created_at") and df[col].dtype == object:
            df[col] = [NONE_TEXT if v is None or (isinstance(v, float) and pd.isna(v)) else v for v in df[col]]
    return df


def wants_run(project, slide_id: int) -> bool:
    """True when starting a run of the slide does something: it has no finished and no active run.

    An upload of a file already in the project runs it only then (no redundant second run).
    """
    for _, run in project.list_runs(slide_id).iterrows():
        status = RunStatus(run["status"])
        if status is RunStatus.FINISHED or status.is_active:
            return False
    return True


def finished_slides(project) -> pd.DataFrame:
    """Slides whose latest run finished (the ones analysis pages can show)."""
    slides = project.list_slides()
    return slides[slides["status"] == RunStatus.FINISHED.value].reset_index(drop=True)


def slides_not_run(project) -> pd.DataFrame:
    """Slides that have no run at all."""
    slides = project.list_slides()
    return slides[slides["run_id"].isna()].reset_index(drop=True)


def latest_runs(project) -> pd.DataFrame:
    """Each slide's latest run, newest first (``list_runs`` columns)."""
    runs = project.list_runs()
    return runs.sort_values("run_id").groupby("slide_id").tail(1).sort_values("run_id", ascending=False)


def any_active(runs: pd.DataFrame) -> bool:
    """True while some run in ``runs`` is queued or running (the page then polls)."""
    active = [s.value for s in RunStatus if s.is_active]
    return bool(len(runs)) and bool(runs["status"].isin(active).any())


def time_left_s(run, now: float | None = None) -> float | None:
    """Seconds left for a run (record, row or dict), from elapsed time and overall progress.

    None until there is enough progress (3%) to say, and once the run is done.
    """
    get = run.get if hasattr(run, "get") else (lambda k, d=None: getattr(run, k, d))
    progress = float(get("progress", 0.0) or 0.0)
    started = get("started_at") or get("created_at")
    if started is None or progress < 0.03 or progress >= 1.0:
        return None
    t0 = _as_epoch(started)
    if t0 is None:
        return None
    elapsed = (now or time.time()) - t0
    return max(0.0, elapsed * (1.0 - progress) / progress)


def _as_epoch(value) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        ts = pd.Timestamp(value)
        if ts.tzinfo is None:
            ts = ts.tz_localize("UTC")
        return ts.timestamp()
    except (ValueError, TypeError):
        return None
