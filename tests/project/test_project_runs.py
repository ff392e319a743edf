"""The run state machine on a real store: statuses, allowed moves, the one resumable rule, crashes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ghist_core.errors import RunStateError, StoreError
from ghist_core.project import Project, RunStatus, is_resumable
from ghist_core.project.runs import TRANSITIONS, check_transition
from project_fixtures import make_png, project, subprocess_env  # noqa: F401 (pytest fixtures)

S = RunStatus


@pytest.fixture
def slide_id(project: Project, make_png, tmp_path: Path) -> int:
    return project.add_slide(make_png(tmp_path / "a.png"), mpp=0.5, patient_id="P1").slide_id


def _force(project: Project, run_id: int, status: RunStatus) -> None:
    """Put a run in ``status`` directly (the state under test, however it was reached)."""
    project._conn().execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))


# ------------------------------------------------------------------------------------------
# the statuses and their moves
# ------------------------------------------------------------------------------------------
def test_statuses_are_the_database_strings() -> None:
    assert [s.value for s in S] == ["queued", "running", "finished", "failed", "interrupted", "cancelled"]
    assert S("finished") is S.FINISHED and S.FINISHED == "finished" and f"{S.FAILED}" == "failed"
    assert set(TRANSITIONS) == set(S) and TRANSITIONS[S.FINISHED] == frozenset()


def test_one_resumable_rule() -> None:
    """Resumable = stopped or never started; each such run can be taken over or requeued, nothing else can."""
    resumable = {s for s in S if s.is_resumable}
    assert resumable == {S.QUEUED, S.INTERRUPTED, S.FAILED, S.CANCELLED}
    assert {s for s in S if is_resumable(s)} == resumable == {s for s in S if is_resumable(s.value)}
    assert not is_resumable(None) and not is_resumable("paused") and not is_resumable("")
    for s in resumable:
        assert check_transition(s, S.RUNNING) and check_transition(s, S.QUEUED)
    for s in set(S) - resumable:
        with pytest.raises(RunStateError):
            check_transition(s, S.QUEUED)
    assert {s for s in S if s.is_active} == {S.QUEUED, S.RUNNING}


_MOVES = {  # target status -> the store call that asks for it
    S.QUEUED: lambda p, r: p.requeue_run(r),
    S.RUNNING: lambda p, r: p.resume_run(r),
    S.FINISHED: lambda p, r: p.finish_run(r, n_cells=3, timings={}),
    S.FAILED: lambda p, r: p.fail_run(r, "boom"),
    S.CANCELLED: lambda p, r: p.cancel_run(r),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, _MOVES)), ids=lambda s: s.value)
def test_store_enforces_the_transition_table(project: Project, slide_id: int, current: S, target: S) -> None:
    rid = project.start_run(slide_id, model_id="m", weights_sha256="s", device="cpu")
    _force(project, rid, current)
    settled = current in {S.FINISHED, S.CANCELLED} and target in {S.FAILED, S.CANCELLED}
    if settled:  # a late fail/cancel after the run ended that way: quietly nothing
        assert _MOVES[target](project, rid) is False
        assert project.get_run(rid).status is current
    elif target in TRANSITIONS[current]:
        _MOVES[target](project, rid)
        assert project.get_run(rid).status is target
    else:
        with pytest.raises(RunStateError, match=f"is {current.value}; it cannot become {target.value}"):
            _MOVES[target](project, rid)
        assert project.get_run(rid).status is current


def test_illegal_moves_raise_the_typed_error(project: Project, slide_id: int) -> None:
    rid = project.start_run(slide_id, model_id="m", weights_sha256="s", device="cpu")
    project.finish_run(rid, n_cells=1)
    for move in (project.requeue_run, project.resume_run):
        with pytest.raises(RunStateError, match="is finished") as info:
            move(rid)
        assert isinstance(info.value, StoreError)  # callers that catch store errors still catch it
    with pytest.raises(RunStateError):
        project.start_run(slide_id, model_id="m", weights_sha256="s", device="cpu", status="finished")
    with pytest.raises(RunStateError):
        project.start_run(slide_id, model_id="m", weights_sha256="s", device="cpu", status="paused")
    queued = project.start_run(slide_id, model_id="m", weights_sha256="s", device="cpu", status=S.QUEUED)
    project.resume_run(queued)
    with pytest.raises(RunStateError, match="is running; it cannot become queued"):
        project.requeue_run(queued)  # a live worker's run is never put back in the queue
    with pytest.raises(StoreError, match="no run 999"):
        project.cancel_run(999)


def test_run_lifecycle(project: Project, slide_id: int) -> None:
    sid = slide_id
    rid = project.start_run(sid, model_id="ghist-studio/ghist-her2st@main", weights_sha256="ab" * 32,
                            device="cpu", params={"tile_px": 512, "genes": ["ERBB2", "ESR1"]})
    project.update_run(rid, stage="segment", progress=0.4, message="tile 4/10")
    project.update_run(rid, progress=7.0)  # clamped
    r = project.get_run(rid)
    assert (r.status, r.stage, r.progress, r.worker_pid) == (S.RUNNING, "segment", 1.0, os.getpid())
    assert r.is_active and not r.is_resumable
    assert r.params == {"tile_px": 512, "genes": ["ERBB2", "ESR1"]} and r.created_at.endswith("+00:00")

    project.finish_run(rid, n_cells=1234, timings={"segment_s": 1.5})
    r = project.get_run(rid)
    assert (r.status, r.n_cells, r.timings, r.progress) == (S.FINISHED, 1234, {"segment_s": 1.5}, 1.0)
    assert project.fail_run(rid, "too late") is False and project.get_run(rid).status == "finished"
    assert project.cancel_run(rid) is False and project.get_run(rid).error is None
    with pytest.raises(StoreError, match="is finished"):
        project.requeue_run(rid)
    df = project.list_slides()
    assert (df.loc[0, "status"], df.loc[0, "n_cells"], df.loc[0, "run_id"]) == ("finished", 1234, rid)

    q = project.start_run(sid, model_id=None, weights_sha256=None, device="cuda", params={}, status="queued")
    assert project.get_run(q).worker_pid is None and project.mark_interrupted_runs() == []
    project.resume_run(q)
    project.fail_run(q, "Out of memory on the GPU.")
    assert project.latest_run(sid).status is S.FAILED and project.latest_run(sid).is_resumable
    assert project.latest_run(sid, status=S.FINISHED).run_id == rid
    project.requeue_run(q)
    assert project.get_run(q).status == "queued" and project.get_run(q).error is None
    project.cancel_run(q)
    runs = project.list_runs(sid)
    assert list(runs["status"]) == ["cancelled", "finished"] and all(type(s) is str for s in runs["status"])


# ------------------------------------------------------------------------------------------
# crashes and concurrency (real processes)
# ------------------------------------------------------------------------------------------
def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_sigkill_mid_run_leaves_store_consistent_and_run_resumable(project: Project, tmp_path: Path, make_png, subprocess_env) -> None:
    sid = project.add_slide(make_png(tmp_path / "a.png"), mpp=0.5).slide_id
    worker = subprocess.Popen(
        _py(
            f"""
            from ghist_core.io.atomic import atomic_write_bytes
            from ghist_core.project.store import Project
            p = Project.open({str(project.folder)!r})
            rid = p.start_run({sid}, model_id="m", weights_sha256="s", device="cpu", params={{}})
            print(rid, flush=True)
            i = 0
            while True:  # write as fast as possible until killed
                i += 1
                p.update_run(rid, stage="segment", progress=(i % 1000) / 1000, message=f"block {{i}}")
                p.add_patient(f"P{{i}}", block=i)
                f = p.run_dir(rid) / f"block_{{i % 7}}.npy"
                atomic_write_bytes(f, bytes(4096))
                p.add_result_file(rid, f"block{{i % 7}}", f)
            """
        ),
        stdout=subprocess.PIPE, text=True, env=subprocess_env,
    )
    rid = int(worker.stdout.readline())
    deadline = time.monotonic() + 60
    while project._conn().execute("SELECT COUNT(*) FROM patients").fetchone()[0] < 50:
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    worker.stdout.close()

    assert project.integrity_check() == "ok"
    assert project.get_run(rid).status == "running"  # nobody told the store: the worker just vanished
    assert project.mark_interrupted_runs() == [rid]
    r = project.get_run(rid)
    assert r.status is RunStatus.INTERRUPTED and r.is_resumable
    for kind, path in project.result_files(rid).items():  # every recorded file is whole
        assert path.stat().st_size == 4096, kind
    project.resume_run(rid)
    project.finish_run(rid, n_cells=0, timings={})
    assert project.get_run(rid).status == "finished" and project.mark_interrupted_runs() == []


def test_workers_on_other_machines_are_judged_by_heartbeat(project: Project, tmp_path: Path, make_png, subprocess_env) -> None:
    sid = project.add_slide(make_png(tmp_path / "a.png"), mpp=0.5).slide_id
    fresh, stale, mine = (project.start_run(sid, model_id="m", weights_sha256="s", device="cpu") for _ in range(3))
    old = "2020-01-01T00:00:00.000+00:00"
    c = project._conn()
    c.execute("UPDATE runs SET worker_host = 'gpu-node-7', worker_pid = 1 WHERE run_id IN (?, ?)", (fresh, stale))
    c.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", (old, stale))
    assert project.mark_interrupted_runs() == [stale]  # pid 1 means nothing on another host; its heartbeat does
    assert [project.get_run(r).status for r in (fresh, stale, mine)] == ["running", "interrupted", "running"]
    project.heartbeat(fresh)  # taken over by this process
    assert project.get_run(fresh).worker_pid == os.getpid() and project.mark_interrupted_runs() == []


def test_concurrent_writers_threads_and_processes(project: Project, tmp_path: Path, make_png, subprocess_env) -> None:
    sid = project.add_slide(make_png(tmp_path / "a.png"), mpp=0.5).slide_id
    n = 25
    code = f"""
        import sys
        from ghist_core.project.store import Project
        tag = sys.argv[1]
        with Project.open({str(project.folder)!r}) as p:
            for i in range({n}):
                p.add_patient(f"{{tag}}-{{i}}", i=i)
                rid = p.start_run({sid}, model_id=tag, weights_sha256="s", device="cpu", params={{"i": i}})
                p.update_run(rid, stage="predict", progress=0.5)
                p.finish_run(rid, n_cells=i, timings={{}})
                p.list_slides()
        """
    procs = [subprocess.Popen([*_py(code), f"proc{k}"], env=subprocess_env, stderr=subprocess.PIPE, text=True) for k in range(4)]
    errors: list[BaseException] = []

    def thread_writer(tag: str) -> None:
        try:
            for i in range(n):
                project.add_patient(f"{tag}-{i}", i=i)
                rid = project.start_run(sid, model_id=tag, weights_sha256="s", device="cpu", params={"i": i})
                project.update_run(rid, progress=0.5)
                project.finish_run(rid, n_cells=i, timings={})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(f"thread{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert not errors, errors
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    assert not any("locked" in err for _, err in results)
    assert project.integrity_check() == "ok"
    runs = project.list_runs()
    assert len(runs) == 8 * n and set(runs["status"]) == {"finished"}
    assert len(project.list_patients()) == 8 * n
    assert runs.groupby("model_id").size().to_dict() == {f"{k}{i}": n for k in ("proc", "thread") for i in range(4)}
