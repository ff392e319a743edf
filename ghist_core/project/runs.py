"""The run state machine: every status, every allowed move, and the one rule for "resumable".

A run is born ``queued`` (a worker will pick it up) or ``running`` (this process runs it).
Statuses and moves live here only; the store, the worker, the cohort runner and the pages ask
:class:`RunStatus` instead of comparing strings, so the rules cannot drift apart.

A worker killed mid-run leaves a ``running`` row whose pid is gone; :func:`mark_interrupted_runs`
turns it into ``interrupted`` (resumable). The database keeps the plain status strings
(``RunStatus`` is a ``str``), so existing projects open unchanged.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sqlite3
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Mapping

import pandas as pd

from ghist_core.errors import RunStateError, StoreError
from ghist_core.project.db import ProjectDB, to_json, utc_now

__all__ = ["RunStatus", "RunRecord", "TRANSITIONS", "check_transition", "is_resumable", "STALE_HEARTBEAT_S",
           "claim_run", "pid_alive", "run_uncertainty", "run_nucleus_scale", "run_answers_nucleus_scale",
           "PRE_CHECK_NUCLEUS_SCALE"]

#: A run on another machine whose heartbeat is older than this is considered dead.
STALE_HEARTBEAT_S = 15 * 60
_MAX_ERROR = 8000


class RunStatus(str, Enum):
    """Where a run is in its life. Compares equal to its database string (``RunStatus.FINISHED == "finished"``)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # f-strings and messages show "finished", not "RunStatus.FINISHED"
        return self.value

    @property
    def is_active(self) -> bool:
        """A worker has it or will pick it up: no second run of the slide may start."""
        return self in _ACTIVE

    @property
    def is_resumable(self) -> bool:
        """It stopped (or never started) before finishing; resuming continues from its checkpoints."""
        return self in _RESUMABLE


_S = RunStatus
_ACTIVE = frozenset({_S.QUEUED, _S.RUNNING})
_RESUMABLE = frozenset({_S.QUEUED, _S.INTERRUPTED, _S.FAILED, _S.CANCELLED})
#: Statuses a new run may start in.
INITIAL = frozenset({_S.QUEUED, _S.RUNNING})

#: ``TRANSITIONS[current]`` = the statuses a run in ``current`` may move to. A finished run is final.
TRANSITIONS: Mapping[RunStatus, frozenset[RunStatus]] = {
    _S.QUEUED: frozenset({_S.QUEUED, _S.RUNNING, _S.FINISHED, _S.FAILED, _S.CANCELLED}),
    _S.RUNNING: frozenset({_S.RUNNING, _S.FINISHED, _S.FAILED, _S.CANCELLED, _S.INTERRUPTED}),
    _S.INTERRUPTED: frozenset({_S.QUEUED, _S.RUNNING, _S.FAILED, _S.CANCELLED}),
    _S.FAILED: frozenset({_S.QUEUED, _S.RUNNING, _S.FAILED, _S.CANCELLED}),
    _S.CANCELLED: frozenset({_S.QUEUED, _S.RUNNING}),
    _S.FINISHED: frozenset(),
}
#: Stop requests (fail, cancel) that come after the run already ended this way are no-ops, not
#: errors: they come from error handlers and a cancel button, which must not raise a second error.
_SETTLED: Mapping[RunStatus, frozenset[RunStatus]] = {
    _S.FAILED: frozenset({_S.FINISHED, _S.CANCELLED}),
    _S.CANCELLED: frozenset({_S.FINISHED, _S.CANCELLED}),
}


def is_resumable(status: str | RunStatus | None) -> bool:
    """The one rule: a run with this status can be resumed (``None``/unknown: no run, so no)."""
    try:
        return RunStatus(status).is_resumable
    except ValueError:
        return False


def check_transition(current: str | RunStatus, target: RunStatus, *, run_id: int | None = None) -> bool:
    """True when a run in ``current`` may move to ``target``; False when the move is a harmless no-op.

    Raises :class:`RunStateError` for a move the state machine forbids (e.g. requeueing a finished run).
    """
    cur = RunStatus(current)
    if cur in _SETTLED.get(target, ()):
        return False
    if target not in TRANSITIONS[cur]:
        which = f"Run {run_id}" if run_id is not None else "The run"
        raise RunStateError(f"{which} is {cur}; it cannot become {target} now.")
    return True


@dataclass(frozen=True)
class RunRecord:
    """One analysis run of one slide. ``params`` and ``timings`` are plain dicts (stored as JSON)."""

    run_id: int
    slide_id: int
    status: RunStatus
    model_id: str | None
    weights_sha256: str | None
    device: str | None
    params: dict
    stage: str | None
    progress: float
    message: str | None
    error: str | None
    n_cells: int | None
    timings: dict
    worker_pid: int | None
    worker_host: str | None
    heartbeat_at: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    @property
    def is_active(self) -> bool:
        return self.status.is_active

    @property
    def is_resumable(self) -> bool:
        return self.status.is_resumable


def run_uncertainty(params: Mapping[str, Any] | None) -> bool:
    """Whether a run was asked for the per-cell expression uncertainty: its params hold
    ``{"pipeline": {"uncertainty": true}}`` (the pipeline's ``PipelineConfig.uncertainty``). A run
    recorded without the setting (before it existed, or not asked) reads as False."""
    pipeline = params.get("pipeline") if isinstance(params, Mapping) else None
    return isinstance(pipeline, Mapping) and pipeline.get("uncertainty") is True


#: the nucleus scale of a run recorded before runs held the setting (session 13): its blocks were
#: segmented as the slide's µm/px says
PRE_CHECK_NUCLEUS_SCALE = 1.0


def run_nucleus_scale(params: Mapping[str, Any] | None) -> float | str:
    """The learned segmenter's ``nucleus_scale`` a run was made with (``{"pipeline": {"nucleus_scale":
    ...}}``, ``PipelineConfig.nucleus_scale``): "auto" or a factor; :data:`PRE_CHECK_NUCLEUS_SCALE` for a
    run recorded without it."""
    pipeline = params.get("pipeline") if isinstance(params, Mapping) else None
    value = pipeline.get("nucleus_scale") if isinstance(pipeline, Mapping) else None
    return PRE_CHECK_NUCLEUS_SCALE if value is None else value if value == "auto" else float(value)


def run_answers_nucleus_scale(params: Mapping[str, Any] | None, requested: float | str | None) -> bool:
    """Whether a run made with ``params`` answers a request for ``requested`` (None: no setting asked
    for, any run does; else the run's :func:`run_nucleus_scale` must be it)."""
    return requested is None or run_nucleus_scale(params) == requested


_RUN_COLS = tuple(f.name for f in fields(RunRecord))
_SELECT = f"SELECT {', '.join(_RUN_COLS)} FROM runs"


def _from_row(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    d["status"] = RunStatus(d["status"])
    d["params"] = json.loads(d["params"] or "{}")
    d["timings"] = json.loads(d["timings"] or "{}")
    d["progress"] = float(d["progress"] or 0.0)
    return RunRecord(**{k: d[k] for k in _RUN_COLS})


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def get_run(db: ProjectDB, run_id: int) -> RunRecord:
    row = db.conn().execute(f"{_SELECT} WHERE run_id = ?", (int(run_id),)).fetchone()
    if row is None:
        raise StoreError(f"There is no run {run_id} in this project.")
    return _from_row(row)


def latest_run(db: ProjectDB, slide_id: int, status: str | RunStatus | None = None) -> RunRecord | None:
    """The slide's most recent run (optionally with a given status), or None."""
    q, args = f"{_SELECT} WHERE slide_id = ?", (int(slide_id),)
    if status is not None:
        q += " AND status = ?"
        args += (RunStatus(status).value,)
    row = db.conn().execute(q + " ORDER BY run_id DESC LIMIT 1", args).fetchone()
    return _from_row(row) if row else None


def list_runs(db: ProjectDB, slide_id: int | None = None) -> pd.DataFrame:
    """Runs (newest first) with their parameters and timings as dicts; ``status`` as plain strings."""
    q, args = _SELECT, ()
    if slide_id is not None:
        q += " WHERE slide_id = ?"
        args = (int(slide_id),)
    recs = []
    for r in db.conn().execute(q + " ORDER BY run_id DESC", args):
        d = _from_row(r).__dict__
        d["status"] = d["status"].value
        recs.append(d)
    df = pd.DataFrame(recs, columns=list(_RUN_COLS))
    df["n_cells"] = df["n_cells"].astype("Int64")
    return df


# --------------------------------------------------------------------------------------------
# moving through the state machine
# --------------------------------------------------------------------------------------------
def _check_initial(status: str | RunStatus) -> RunStatus:
    try:
        st = RunStatus(status)
    except ValueError:
        st = None
    if st not in INITIAL:
        raise RunStateError(f"A new run starts as 'running' or 'queued', not {status!r}.")
    return st


def _insert_run(c: sqlite3.Connection, slide_id: int, st: RunStatus, model_id: str | None,
                weights_sha256: str | None, device: str | None, params: Mapping[str, Any] | None) -> int:
    if c.execute("SELECT 1 FROM slides WHERE slide_id = ?", (int(slide_id),)).fetchone() is None:
        raise StoreError(f"There is no slide {slide_id} in this project.")
    now = utc_now()
    running = st is RunStatus.RUNNING
    cur = c.execute(
        "INSERT INTO runs(slide_id, status, model_id, weights_sha256, device, params, progress, created_at, "
        "started_at, worker_pid, worker_host, heartbeat_at) VALUES (?,?,?,?,?,?,0,?,?,?,?,?)",
        (int(slide_id), st.value, model_id, weights_sha256, device, to_json(dict(params or {})), now,
         now if running else None, os.getpid() if running else None,
         socket.gethostname() if running else None, now if running else None),
    )
    return int(cur.lastrowid)


def start_run(db: ProjectDB, slide_id: int, *, model_id: str | None, weights_sha256: str | None,
              device: str | None, params: Mapping[str, Any] | None = None,
              status: str | RunStatus = RunStatus.RUNNING) -> int:
    """Record a new run (``running`` by this process, or ``queued`` for a worker to pick up)."""
    st = _check_initial(status)
    with db.tx() as c:
        return _insert_run(c, slide_id, st, model_id, weights_sha256, device, params)


def claim_run(db: ProjectDB, slide_id: int, *, model_id: str | None, weights_sha256: str | None,
              device: str | None, params: Mapping[str, Any] | None = None,
              status: str | RunStatus = RunStatus.QUEUED) -> tuple[int, bool]:
    """Record a new run unless the slide already has an active one: ``(run_id, created)``.

    Check and insert happen in one write transaction (``BEGIN IMMEDIATE``), so two sessions
    pressing "Run" at once get the same run. Call :func:`mark_interrupted_runs` first so a
    dead worker's ``running`` row does not count as active.
    """
    st = _check_initial(status)
    with db.tx() as c:
        row = c.execute("SELECT run_id FROM runs WHERE slide_id = ? AND status IN (?, ?) ORDER BY run_id DESC "
                        "LIMIT 1", (int(slide_id), RunStatus.QUEUED.value, RunStatus.RUNNING.value)).fetchone()
        if row is not None:
            return int(row[0]), False
        return _insert_run(c, slide_id, st, model_id, weights_sha256, device, params), True


def _update(db: ProjectDB, run_id: int, sets: str, args: tuple, *, to: RunStatus | None = None) -> bool:
    """Update one run; with ``to``, only if the state machine allows the move (False: a no-op)."""
    with db.tx() as c:
        row = c.execute("SELECT status FROM runs WHERE run_id = ?", (int(run_id),)).fetchone()
        if row is None:
            raise StoreError(f"There is no run {run_id} in this project.")
        if to is not None:
            if not check_transition(row[0], to, run_id=int(run_id)):
                return False
            sets, args = f"status = ?, {sets}", (to.value, *args)
        c.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*args, int(run_id)))
        return True


def update_run(db: ProjectDB, run_id: int, *, stage: str | None = None, progress: float | None = None,
               message: str | None = None) -> None:
    """Record progress (0–1), stage and message; also refreshes the heartbeat."""
    sets, args = ["heartbeat_at = ?"], [utc_now()]
    if stage is not None:
        sets.append("stage = ?")
        args.append(str(stage))
    if progress is not None:
        p = float(progress)
        sets.append("progress = ?")
        args.append(min(max(p if p == p else 0.0, 0.0), 1.0))
    if message is not None:
        sets.append("message = ?")
        args.append(str(message)[:2000])
    _update(db, run_id, ", ".join(sets), tuple(args))


def heartbeat(db: ProjectDB, run_id: int) -> None:
    """Say "this run's worker is alive" (and which process it is)."""
    _update(db, run_id, "heartbeat_at = ?, worker_pid = ?, worker_host = ?", (utc_now(), os.getpid(), socket.gethostname()))


def resume_run(db: ProjectDB, run_id: int) -> None:
    """This process takes the run over (from a resumable status, or a running one it inherits) and runs it."""
    now = utc_now()
    _update(db, run_id, "worker_pid = ?, worker_host = ?, heartbeat_at = ?, error = NULL, finished_at = NULL, "
            "started_at = COALESCE(started_at, ?)", (os.getpid(), socket.gethostname(), now, now), to=RunStatus.RUNNING)


def requeue_run(db: ProjectDB, run_id: int) -> None:
    """Put a stopped run back in the queue for a new worker (its checkpoints are kept)."""
    _update(db, run_id, "worker_pid = NULL, worker_host = NULL, error = NULL, finished_at = NULL", (),
            to=RunStatus.QUEUED)


def finish_run(db: ProjectDB, run_id: int, *, n_cells: int, timings: Mapping[str, Any] | None = None) -> None:
    _update(db, run_id, "n_cells = ?, timings = ?, progress = 1, stage = 'done', error = NULL, finished_at = ?, "
            "heartbeat_at = ?", (int(n_cells), to_json(dict(timings or {})), utc_now(), utc_now()), to=RunStatus.FINISHED)


def fail_run(db: ProjectDB, run_id: int, error: str) -> bool:
    """Mark a run failed with a message for the user (the run can be resumed later).

    A run that already finished or was cancelled is left alone (returns False): this is called from
    error handlers, which must not raise a second error.
    """
    return _update(db, run_id, "error = ?, finished_at = ?", (str(error)[:_MAX_ERROR], utc_now()), to=RunStatus.FAILED)


def cancel_run(db: ProjectDB, run_id: int) -> bool:
    """Mark a run cancelled; a finished (or already cancelled) run stays as it is (returns False)."""
    return _update(db, run_id, "finished_at = ?", (utc_now(),), to=RunStatus.CANCELLED)


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` on this machine exists and is not a zombie."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def mark_interrupted_runs(db: ProjectDB, *, stale_after_s: float = STALE_HEARTBEAT_S) -> list[int]:
    """Turn ``running`` runs whose worker is gone into ``interrupted`` (resumable); return their ids.

    A worker on this machine is gone when its pid no longer exists; a worker on another machine
    when its heartbeat is older than ``stale_after_s``.
    """
    host = socket.gethostname()
    cutoff = (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=stale_after_s)).isoformat(timespec="milliseconds")
    rows = db.conn().execute(
        "SELECT run_id, worker_pid, worker_host, heartbeat_at FROM runs WHERE status = ?", (RunStatus.RUNNING.value,)
    ).fetchall()
    dead = [
        r["run_id"] for r in rows
        if (r["worker_host"] == host and (r["worker_pid"] is None or not pid_alive(int(r["worker_pid"]))))
        or (r["worker_host"] != host and (r["heartbeat_at"] or "") < cutoff)
    ]
    check_transition(RunStatus.RUNNING, RunStatus.INTERRUPTED)
    done = []
    for rid in dead:
        with db.tx() as c:  # re-check inside the transaction: the worker may have finished meanwhile
            cur = c.execute(
                "UPDATE runs SET status = ?, message = 'The worker stopped unexpectedly; resume to continue from "
                "the last checkpoint.' WHERE run_id = ? AND status = ?",
                (RunStatus.INTERRUPTED.value, rid, RunStatus.RUNNING.value))
            if cur.rowcount:
                done.append(rid)
    return done
