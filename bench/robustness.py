"""Robustness benchmark: hostile files, SIGKILLed workers, eight concurrent browser users.

Why: clinical labs feed GHIST Studio files from unknown scanners, share one server and
lose power mid-run. This measures, in one command, what the tests check on a small scale:

* ``hostile_files``: the generated corpus (``tests/hostile_corpus.py``, ≥ 120 cases) run in
  a memory-capped child process with a 20 s bound per case: how many ended in a typed
  error, a correct result, a crash (incl. a wrong result) or a hang.
* ``kills``: ≥ 20 prediction-worker runs (``python -m ghist_core.pipeline.worker``) SIGKILLed at random
  moments, at the first checkpoint and while results are written; then
  ``PRAGMA integrity_check``, recorded results vs their sha256, resume, and the resumed
  ``.h5ad`` X compared bit for bit with an uninterrupted run.
* ``concurrent_users``: 8 Playwright browser contexts against one ``streamlit run``.

Baselines measured in the same process: the control cases' (valid files) mean time per
case, and an uninterrupted run's time; ratios are printed against them.

Run: ``python bench/robustness.py`` (``--kills N``, ``--sessions N``, ``--skip-browser``).
Writes ``bench/results/robustness.json`` as ``{"hostile_files": {"cases", "typed_errors",
"correct_results", "crashes", "hangs"}, "kills": {"runs", "integrity_ok",
"resumed_identical", "lost_results"}, "concurrent_users": {"sessions", "requests",
"errors"}}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

RESULTS = REPO / "bench" / "results" / "robustness.json"


def bench_hostile(work: Path) -> dict[str, int]:
    from hostile_corpus import build_corpus, expectation_met, run_corpus, summarise

    from ghist_core.paths import shared_data_dir

    svs = shared_data_dir() / "slides" / "CMU-1-Small-Region.svs"
    cases = build_corpus(work / "hostile", svs)
    t0 = time.perf_counter()
    results = run_corpus(cases, work / "hostile")
    wall = time.perf_counter() - t0
    summary = summarise(results)
    base = [r.seconds for c, r in zip(cases, results) if c.name.endswith("_control") and r.outcome == "ok"]
    hostile = [r.seconds for c, r in zip(cases, results) if not c.name.endswith("_control")]
    base_s = statistics.mean(base) if base else float("nan")
    print(f"hostile files: {summary}  ({wall:.1f} s wall)")
    print(f"  time per hostile case: median {statistics.median(hostile):.2f} s, max {max(hostile):.2f} s; "
          f"ratio to valid-file baseline ({base_s:.2f} s): median x{statistics.median(hostile) / base_s:.2f}, "
          f"max x{max(hostile) / base_s:.2f}")
    for c, r in zip(cases, results):
        if r.failed or not expectation_met(c, r):
            print(f"  ! {c.name}: {r.outcome} {r.errors} {r.detail[:200]}")
    return summary


def bench_kills(work: Path, n_runs: int) -> dict[str, int]:
    from testkit import make_tiny_ghist
    from test_crash_resume import kill_loop, make_kill_slide, summarise_kills

    from ghist_core.paths import BUNDLED_WEIGHTS_DIR, DEMO_DIR
    from ghist_core.project.store import Project

    if (BUNDLED_WEIGHTS_DIR / "ghist-her2st.safetensors").exists():
        model_dir, which = BUNDLED_WEIGHTS_DIR, "bundled GHIST weights"
    else:
        model_dir = work / "tiny_ghist"
        model_dir.mkdir()
        make_tiny_ghist(model_dir, seed=0)
        which = "tiny random GHIST (seed 0; no bundled weights)"
    project = Project.create(work / "kill_project")
    record = project.add_slide(make_kill_slide(work, DEMO_DIR / "CMU-1-Small-Region.svs"), mpp=0.499)
    t0 = time.perf_counter()
    reports, _ = kill_loop(project, record.slide_id, model_dir, n_runs, seed=7)
    wall = time.perf_counter() - t0
    s = summarise_kills(reports)
    print(f"kills ({which}, classical segmenter): {s}  ({wall:.0f} s wall)")
    by_status: dict[str, int] = {}
    for r in reports:
        by_status[r.status_after_kill] = by_status.get(r.status_after_kill, 0) + 1
    print(f"  state right after the kill: {by_status}; checkpoints on disk per kill: "
          f"{[r.blocks_done for r in reports]}; leftover *.part temporaries seen: {sum(r.part_files for r in reports)}")
    for r in reports:
        if r.problems:
            print(f"  ! run {r.run_id} ({r.mode}, {r.delay_s}s): {r.problems}")
    project.close()
    return s


def bench_browser(work: Path, n_sessions: int) -> dict[str, int]:
    from test_concurrent_users import run_sessions

    t0 = time.perf_counter()
    sessions, integrity = run_sessions(work / "browser", n_sessions)
    wall = time.perf_counter() - t0
    errors = [e for s in sessions for e in s.errors]
    errors += [f"project {k}: integrity {v}" for k, v in integrity.items() if v != "ok"]
    out = {"sessions": len(sessions), "requests": sum(s.requests for s in sessions), "errors": len(errors)}
    print(f"concurrent users: {out}  ({wall:.0f} s wall; projects: {integrity}; "
          f"404s for images of superseded reruns, not counted: {sum(s.stale_media for s in sessions)})")
    for e in errors[:20]:
        print(f"  ! {e[:300]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--skip-browser", action="store_true", help="keep the previous concurrent_users figures")
    args = ap.parse_args(argv)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory(prefix="ghist_robustness_") as tmp:
        work = Path(tmp)
        out = {"hostile_files": bench_hostile(work), "kills": bench_kills(work, args.kills)}
        if args.skip_browser and "concurrent_users" in previous:
            out["concurrent_users"] = previous["concurrent_users"]
        else:
            out["concurrent_users"] = bench_browser(work, args.sessions)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
