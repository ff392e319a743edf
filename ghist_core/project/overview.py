"""What the Home and Upload pages show about a project: counts, slides by state, the latest runs.

Each page calls one of these instead of filtering tables itself, so "predicted", "not run yet"
and "active" mean the same everywhere (through :class:`~ghist_core.project.runs.RunStatus`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ghist_core.project.runs import RunStatus, run_answers_nucleus_scale, run_uncertainty

__all__ = ["ProjectOverview", "summary", "finished_slides", "slides_not_run", "latest_runs", "any_active",
           "TimeLeft", "time_left", "record_time_left", "clear_time_left", "ETA_FILE",
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


def share_text(share: float) -> str:
    """A share of cells as people read it: "12%", or "under 1%" where rounding would say 0% (the CLI
    and Gene maps say it the same way; here, because the CLI must not import the plotting extras)."""
    return f"{share:.0%}" if share >= 0.005 else "under 1%"


def wants_run(project, slide_id: int, *, uncertainty: bool = False, nucleus_scale: float | str | None = None) -> bool:
    """True when starting a run of the slide does something: it has no finished and no active run.

    An upload of a file already in the project runs it only then (no redundant second run). With
    ``uncertainty`` (the per-cell expression uncertainty asked for), a finished run counts only
    when it was made with it too (:func:`~ghist_core.project.runs.run_uncertainty`); with a
    ``nucleus_scale`` (None: any), only when made at that setting.
    """
    for _, run in project.list_runs(slide_id).iterrows():
        status = RunStatus(run["status"])
        if status.is_active:
            return False
        if status is RunStatus.FINISHED and (not uncertainty or run_uncertainty(run["params"])) \
                and run_answers_nucleus_scale(run["params"], nucleus_scale):
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


#: The run's time-left record, next to its checkpoints (``runs/<run_id>/eta.json``), written by the worker.
ETA_FILE = "eta.json"


@dataclass(frozen=True)
class TimeLeft:
    """Seconds left for a run as a range, recorded at ``at`` (epoch seconds).

    ``*_s`` hold at ``at``; they fall with the clock afterwards, down to ``floor_*_s`` (what is left
    once the running block's expected time is used up), and never rise between two records.
    ``settled``: enough blocks are measured for the range to be the measured spread alone.
    """

    low_s: float
    mid_s: float
    high_s: float
    floor_low_s: float = 0.0
    floor_mid_s: float = 0.0
    floor_high_s: float = 0.0
    at: float = 0.0
    settled: bool = False
    basis: str = "measured"
    blocks_done: int = 0
    blocks_total: int = 0

    def at_time(self, now: float | None = None) -> "TimeLeft":
        """The range ``now`` (never above the recorded one, never below the floors)."""
        gone = max(0.0, (time.time() if now is None else now) - self.at)
        return TimeLeft(max(self.floor_low_s, self.low_s - gone), max(self.floor_mid_s, self.mid_s - gone),
                        max(self.floor_high_s, self.high_s - gone), self.floor_low_s, self.floor_mid_s,
                        self.floor_high_s, self.at + gone, self.settled, self.basis, self.blocks_done,
                        self.blocks_total)

    def text(self) -> str:
        """'about 4–6 min left', 'about 40 s left', 'about 1 h 10 min – 1 h 30 min left'."""
        lo, hi = _fmt_span(self.low_s, down=True), _fmt_span(self.high_s, down=False)
        if lo == hi:
            return f"about {lo} left"
        if lo.endswith(" min") and hi.endswith(" min") and "h" not in lo + hi:
            return f"about {lo[:-4]}–{hi} left"
        if lo.endswith(" s") and hi.endswith(" s"):
            return f"about {lo[:-2]}–{hi} left"
        return f"about {lo} – {hi} left"


def _fmt_span(s: float, *, down: bool) -> str:
    """Seconds as '40 s' (below 1 min, to 10 s), 'N min' (below 1 h), 'H h MM min'; low bounds round down."""
    rnd = math.floor if down else math.ceil
    s = max(0.0, float(s))
    if s < 60:
        return f"{max(0, int(rnd(s / 10)) * 10)} s" if down or s > 0 else "0 s"
    m = int(rnd(s / 60))
    if m < 60:
        return f"{m} min"
    return f"{m // 60} h {m % 60:02d} min"


def record_time_left(run_dir: str | Path, estimate, *, now: float | None = None) -> None:
    """Write the worker's estimate (anything with :class:`TimeLeft`'s fields) for the pages to read."""
    from ghist_core.io.atomic import atomic_write_text

    fields = {k: getattr(estimate, k) for k in TimeLeft.__dataclass_fields__ if k != "at" and hasattr(estimate, k)}
    record = TimeLeft(**fields, at=time.time() if now is None else float(now))
    atomic_write_text(Path(run_dir) / ETA_FILE, json.dumps(asdict(record)))


def clear_time_left(run_dir: str | Path) -> None:
    """Forget a previous attempt's estimate (a resumed run starts a new one), and the temporary
    file of a write a killed worker left half done."""
    (Path(run_dir) / ETA_FILE).unlink(missing_ok=True)
    for part in Path(run_dir).glob(f".{ETA_FILE}.*.part"):
        part.unlink(missing_ok=True)


def time_left(project, run, now: float | None = None) -> TimeLeft | None:
    """The time left of an active run as a range: the worker's estimate from measured blocks
    (``runs/<id>/eta.json``) counted down to ``now``; None before it has one (the page says "estimating…")."""
    get = run.get if hasattr(run, "get") else (lambda k, d=None: getattr(run, k, d))
    rid = get("run_id")
    if rid is None or float(get("progress", 0.0) or 0.0) >= 1.0:
        return None
    from ghist_core.project.results import run_dir_path

    try:
        data = json.loads((run_dir_path(project.db, int(rid)) / ETA_FILE).read_text())
        record = TimeLeft(**{k: data[k] for k in TimeLeft.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return record.at_time(now)
