"""Robustness benchmark: hostile files, SIGKILLed workers, eight concurrent browser users.

Why: clinical labs feed GHIST Studio files from unknown scanners, share one server and
lose power mid-run. This measures, in one command, what the tests check on a small scale:

* ``hostile_files``: the generated corpus (``tests/hostile_corpus.py``, ≥ 120 cases) run in
  a memory-capped child process with a 20 s bound per case; each case's time and peak
  resident memory (``VmHWM``, reset before the case) are kept, and each is classed by outcome:
  typed error, correct result, crash, hang, memory over the stated bound, data left behind
  (a refused file left files or rows in the project), wrong pixels, script executed (an
  export kept a spreadsheet formula) or another wrong result.
* ``limits``: the resource-limit cases of issue #20 (XLSX declaring XFD1048576, quadratic
  delimiter sniffing, 1e6-row tables, the PH check on 1e6 rows, ``--mpp 250`` and 50 on the
  demo slide, HDF5 writes onto a full disk and past RLIMIT_FSIZE), each in a fresh child
  process with a 3 GB address-space cap and a 30 s bound, with its time, peak memory
  (``ru_maxrss``) and stated memory bound.
* ``kills``: ≥ 20 prediction-worker runs (``python -m ghist_core.pipeline.worker``) SIGKILLed at random
  moments, at the first checkpoint and while results are written; then
  ``PRAGMA integrity_check``, recorded results vs their sha256, resume, and the resumed
  ``.h5ad`` X compared bit for bit with an uninterrupted run.
* ``cli_recovery``: ``ghist predict`` SIGKILLed (after its first checkpoint and at random moments) and
  run again: resumed to the identical result, no second run, nothing left behind; and two
  ``ghist predict`` at once on one slide: one run.
* ``browser_checks``: the real-browser checks (``tests/app/test_hostile_browser.py``): no script
  and no remote fetch from data or cards; an upload's bytes leave the server's RAM once staged.
* ``concurrent_users``: 8 Playwright browser contexts against one ``streamlit run``.

Baselines measured in the same process: the control cases' (valid files) mean time per
case, and an uninterrupted run's time; ratios are printed against them.

Run: ``python bench/robustness.py`` (``--kills N``, ``--sessions N``, ``--skip-browser``,
``--skip-kills``, ``--only hostile,limits``: keep the other sections' previous figures).
Writes ``bench/results/robustness.json`` as ``{"hostile_files": {"cases", "typed_errors",
"correct_results", "crashes", "hangs", "memory_over_bound", "data_left_behind",
"wrong_pixels", "scripts_executed", "memory_bound_mb", "max_seconds", "max_peak_mb",
"per_case": [{"name", "kind", "outcome", "seconds", "peak_mb", "errors"}]}, "limits": {same
counts, "per_case": [... "bound_mb", "note"]}, "kills": {"runs", "integrity_ok",
"resumed_identical", "lost_results"}, "concurrent_users": {"sessions", "requests",
"errors"}}``. "crashes" counts crashes and wrong results of every kind, as before.
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


#: Stated memory bound of one hostile-file case (resident set, MB): opening a slide, its
#: thumbnail and two regions, or reading and validating a clinical table, and adding it to a
#: project. The child's address space is capped at ``hostile_corpus.MEMORY_LIMIT_MB``.
HOSTILE_MEMORY_BOUND_MB = 1536
#: Wall-clock bound of one ``limits`` case, its address-space cap and stated memory bound.
LIMIT_CASE_TIMEOUT_S = 30.0
LIMIT_AS_MB = 3072
_PEAK = "@@PEAK@@ "


def _reset_peak() -> None:
    try:  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve_hostile(root: Path) -> None:
    """Child: run hostile cases like ``hostile_corpus``'s own child, adding each case's peak RSS."""
    import traceback
    import warnings
    from dataclasses import asdict

    import hostile_corpus as hc

    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="hostile_work_"))
    for line in sys.stdin:
        if not line.strip():
            continue
        case = hc.Case(**json.loads(line))
        _reset_peak()
        t0 = time.perf_counter()
        try:
            runner = hc._run_slide_case if case.kind == "slide" else hc._run_clinical_case
            typed = runner(case, root, work)
            res = hc.Result(case.name, "typed_error" if typed else "ok", typed)
        except AssertionError as e:
            res = hc.Result(case.name, "wrong", [], str(e)[:500])
        except BaseException as e:  # noqa: BLE001
            res = hc.Result(case.name, "crash", [], f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc(limit=6)[-1500:]}")
        res.seconds = time.perf_counter() - t0
        # one line per case: the parent waits with select() on the pipe, so a second line already
        # read into its buffer would never wake it
        sys.stdout.write(_PEAK + json.dumps({"peak_mb": _peak_mb(), "result": asdict(res)}) + "\n")
        sys.stdout.flush()


def _classify(outcome: str, detail: str, peak_mb: float | None, bound_mb: float) -> str:
    """typed_error / ok / crash / hang / memory_over_bound / data_left_behind / wrong_pixels / script_executed / wrong."""
    if outcome == "wrong":
        d = detail.lower()
        if "left files or rows" in d or "left behind" in d:
            return "data_left_behind"
        if "pixels" in d or "region" in d or "thumbnail" in d:
            return "wrong_pixels"
        if "formula" in d:
            return "script_executed"
        return "wrong"
    if outcome in ("ok", "typed_error") and peak_mb is not None and peak_mb > bound_mb:
        return "memory_over_bound"
    return outcome


def _counts(per_case: list[dict]) -> dict:
    out = {k: sum(c["outcome"] == v for c in per_case) for k, v in (
        ("typed_errors", "typed_error"), ("correct_results", "ok"), ("hangs", "hang"),
        ("memory_over_bound", "memory_over_bound"), ("data_left_behind", "data_left_behind"),
        ("wrong_pixels", "wrong_pixels"), ("scripts_executed", "script_executed"))}
    out["crashes"] = sum(c["outcome"] in ("crash", "wrong", "data_left_behind", "wrong_pixels", "script_executed")
                         for c in per_case)
    out["max_seconds"] = round(max((c["seconds"] for c in per_case), default=0.0), 2)
    out["max_peak_mb"] = round(max((c["peak_mb"] or 0 for c in per_case), default=0.0), 1)
    return {"cases": len(per_case), **out}


def bench_hostile(work: Path) -> dict:
    import os
    import select
    import subprocess
    from dataclasses import asdict

    import hostile_corpus as hc
    from hostile_corpus import build_corpus, expectation_met

    from ghist_core.paths import shared_data_dir

    svs = shared_data_dir() / "slides" / "CMU-1-Small-Region.svs"
    root = work / "hostile"
    cases = build_corpus(root, svs)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))

    def start():
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-hostile", str(root)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=env, preexec_fn=hc._limit_memory(hc.MEMORY_LIMIT_MB), cwd=str(REPO))

    t_all = time.perf_counter()
    per_case, results = [], []
    proc = None
    fresh = True
    for case in cases:
        if proc is None or proc.poll() is not None:
            proc, fresh = start(), True
        timeout = hc.CASE_TIMEOUT_S + (15.0 if fresh else 0.0)
        fresh = False
        t0 = time.perf_counter()
        peak = None
        try:
            proc.stdin.write(json.dumps(asdict(case)) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        res = None
        while res is None:
            left = t0 + timeout - time.perf_counter()
            if left <= 0:
                proc.kill()
                proc.wait()
                res = hc.Result(case.name, "hang", [], f"no answer within {timeout:.0f} s", time.perf_counter() - t0)
                break
            ready, _, _ = select.select([proc.stdout.fileno()], [], [], left)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                rc = proc.wait()
                res = hc.Result(case.name, "crash", [], f"runner died (exit {rc})", time.perf_counter() - t0)
            elif line.startswith(_PEAK):
                msg = json.loads(line[len(_PEAK):])
                peak, res = msg["peak_mb"], hc.Result(**msg["result"])
        results.append(res)
        per_case.append({"name": case.name, "kind": case.kind, "expect": case.expect,
                         "outcome": _classify(res.outcome, res.detail, peak, HOSTILE_MEMORY_BOUND_MB),
                         "seconds": round(res.seconds, 3), "peak_mb": None if peak is None else round(peak, 1),
                         "errors": res.errors, **({"detail": res.detail[:300]} if res.failed else {})})
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    wall = time.perf_counter() - t_all
    summary = {**_counts(per_case), "memory_bound_mb": HOSTILE_MEMORY_BOUND_MB, "time_bound_s": hc.CASE_TIMEOUT_S}
    base = [r.seconds for c, r in zip(cases, results) if c.name.endswith("_control") and r.outcome == "ok"]
    hostile = [r.seconds for c, r in zip(cases, results) if not c.name.endswith("_control")]
    base_s = statistics.mean(base) if base else float("nan")
    print(f"hostile files: { {k: v for k, v in summary.items()} }  ({wall:.1f} s wall)")
    print(f"  time per hostile case: median {statistics.median(hostile):.2f} s, max {max(hostile):.2f} s; "
          f"ratio to valid-file baseline ({base_s:.2f} s): median x{statistics.median(hostile) / base_s:.2f}, "
          f"max x{max(hostile) / base_s:.2f}")
    for c, r, pc in zip(cases, results, per_case):
        if r.failed or not expectation_met(c, r) or pc["outcome"] == "memory_over_bound":
            print(f"  ! {c.name}: {pc['outcome']} {r.errors} {r.detail[:200]} ({pc['peak_mb']} MB)")
    summary["per_case"] = per_case
    return summary


# ---------------------------------------------------------------------------- limits (issue #20)
def _limit_case_code(name: str, work: Path) -> str:
    """Python run in a fresh child for one limits case; prints one JSON line {"outcome", "errors", "note"}."""
    return f"""
import errno, io, json, os, resource, shutil, signal, subprocess, sys, time
from pathlib import Path
work = Path({str(work)!r}); name = {name!r}
from ghist_core.errors import GhistError
def setup():
    import numpy as np, pandas as pd
    if name.startswith("xlsx"):
        import openpyxl
        wb = openpyxl.Workbook(write_only=name == "xlsx_1m_cells_accepted"); ws = wb.active if name != "xlsx_1m_cells_accepted" else wb.create_sheet()
        if name == "xlsx_1m_cells_accepted":
            ws.append([f"c{{j}}" for j in range(20)])
            for i in range(50_000): ws.append([f"P{{i}}"] + [i * 0.5] * 19)
        elif name == "xlsx_only_cell_at_xfd1048576":
            ws["XFD1048576"] = 1
        else:
            ws.append(["patient_id", "os_days", "vital_status"])
            for i in range(30): ws.append([f"P{{i}}", 10 + i, "dead" if i % 2 else "alive"])
            ws["A1048576" if name == "xlsx_value_at_a1048576" else "XFD1048576"] = "x"
        b = io.BytesIO(); wb.save(b); return b.getvalue()
    if name.startswith("csv_sniff"):
        n = 24 * 1024 if "24kb" in name else 180 * 1024
        row = '"a;\\t|b",12,"x;\\t|",dead\\n'
        return ("id,time,note,status\\n" + row * (n // len(row))).encode()
    if name == "csv_one_line_quotes_180kb":
        return ('"' + 'a,"b;' * (180 * 1024 // 5)).encode()
    if name == "csv_1e6_rows":
        return b"id,t,e\\n" + b"".join(b"P%d,%d,1\\n" % (i, i) for i in range(1_000_000))
    if name == "csv_100k_rows_49mb":
        cols = [f"v{{j}}" for j in range(55)]
        line = ",".join(["P0"] + ["123.4567"] * 54) + "\\n"
        return (",".join(cols) + "\\n" + line * 100_000).encode()
    if name in ("ph_check_1e6_rows", "fit_cox_100k_rows"):
        n = 1_000_000 if name.startswith("ph") else 100_000
        rng = np.random.default_rng(0); x = rng.normal(size=n)
        return pd.DataFrame({{"T": rng.exponential(10 * np.exp(-0.5 * x)).round(1) + 0.1,
                              "E": (rng.random(n) < 0.7).astype(int), "x": x, "g": (rng.random(n) < 0.5).astype(float)}})
    return None
data = setup()
def peak_mb():
    hwm = 0.0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # + a forked HDF5 writer
try:
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here: the operation, not building its input
except OSError:
    pass
resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_AS_MB} * 2**20, {LIMIT_AS_MB} * 2**20))
outcome, errors, note = "ok", [], ""
t0 = time.perf_counter()
try:
    if name.startswith(("xlsx", "csv")):
        from ghist_core.analysis.clinical import read_clinical_table
        df = read_clinical_table(data, name + (".xlsx" if name.startswith("xlsx") else ".csv"))
        note = f"read {{df.shape[0]}} x {{df.shape[1]}}, delimiter {{df.attrs.get('delimiter')!r}}"
    elif name == "ph_check_1e6_rows":
        from lifelines import CoxPHFitter
        from ghist_core.analysis.survival import ph_check, PH_MAX_N
        sub = data.sample(n=PH_MAX_N, random_state=1)
        cph = CoxPHFitter().fit(sub, "T", "E")  # any fitted model: above the bound ph_check refits on its subsample
        t0 = time.perf_counter()
        res = ph_check(cph, data, "T", "E", ["x", "g"])
        note = f"subsample {{res.attrs.get('subsample')}}, p = {{[round(v, 3) for v in res['p']]}}"
    elif name == "fit_cox_100k_rows":
        from ghist_core.analysis.survival import fit_cox
        res = fit_cox(data, "T", "E", ["x", "g"])
        note = f"HR {{[round(v, 3) for v in res.summary['HR']]}}; {{res.notes[-1] if res.notes else ''}}"
    elif name.startswith("demo_mpp"):
        from ghist_core.paths import DEMO_DIR
        from ghist_core.io.slide import open_slide
        from ghist_core.pipeline.blocks import PipelineConfig, plan_blocks
        from ghist_core.project.store import Project
        mpp = 250.0 if "250" in name else 50.0
        if mpp == 250.0:  # the CLI's path: the project refuses the slide, nothing recorded
            p = Project.create(work / ("proj_" + name))
            try:
                p.add_slide(DEMO_DIR / "CMU-1-Small-Region.svs", mpp=mpp)
            finally:
                c = p._conn(); note = f"slides recorded: {{c.execute('SELECT COUNT(*) FROM slides').fetchone()[0]}}"; p.close()
        else:
            with open_slide(DEMO_DIR / "CMU-1-Small-Region.svs", mpp=mpp) as s:
                plan_blocks(s, PipelineConfig())
    elif name.startswith("disk_full"):
        import anndata as ad, numpy as np
        from ghist_core.io.safe_h5 import write_h5_isolated
        folder = work / name; folder.mkdir(exist_ok=True)
        a = ad.AnnData(np.random.default_rng(0).random((20000, 300), dtype=np.float32))
        if name == "disk_full_rlimit_fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
        else:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True).returncode:
                print(json.dumps({{"outcome": "skipped", "errors": [], "note": "cannot mount a tmpfs here"}})); sys.exit(0)
            with open(folder / "filler", "wb") as fh:
                fh.write(bytes(shutil.disk_usage(folder).free - 6 * 2**20))
        try:
            write_h5_isolated(folder / "x.h5ad", lambda p: a.write_h5ad(p, compression="gzip"),
                              estimated_bytes=0 if name != "disk_full_checked_before" else 25 * 2**20,
                              margin_bytes=0 if name != "disk_full_checked_before" else 64 * 2**20)
        finally:
            left = sorted(p.name for p in folder.iterdir() if p.name != "filler")
            if name != "disk_full_rlimit_fsize":
                subprocess.run(["umount", "-l", str(folder)], capture_output=True)
            if left:
                print(json.dumps({{"outcome": "data_left_behind", "errors": [], "note": f"left {{left}}", "peak_mb": peak_mb()}})); sys.exit(0)
except GhistError as e:
    outcome, errors, note = "typed_error", [type(e).__name__], str(e)[:240]
print(json.dumps({{"outcome": outcome, "errors": errors, "note": note, "seconds": time.perf_counter() - t0,
                  "peak_mb": peak_mb()}}))
"""


#: case -> (expected outcome, stated memory bound in MB: peak RSS of the child during the operation,
#: interpreter, imports and the built input included)
LIMIT_CASES: dict[str, tuple[str, int]] = {
    "xlsx_xfd1048576_with_table": ("typed_error", 300),
    "xlsx_only_cell_at_xfd1048576": ("typed_error", 300),
    "xlsx_value_at_a1048576": ("typed_error", 300),
    "xlsx_1m_cells_accepted": ("ok", 1024),
    "csv_sniff_quotes_24kb": ("ok", 300),
    "csv_sniff_quotes_180kb": ("ok", 300),
    "csv_one_line_quotes_180kb": ("either", 300),
    "csv_1e6_rows": ("typed_error", 400),
    "csv_100k_rows_49mb": ("ok", 1536),
    "ph_check_1e6_rows": ("ok", 1024),
    "fit_cox_100k_rows": ("ok", 1024),
    "demo_mpp_250": ("typed_error", 600),
    "demo_mpp_50_block_plan": ("typed_error", 600),
    "disk_full_checked_before": ("typed_error", 600),
    "disk_full_during_hdf5_write": ("typed_error", 600),
    "disk_full_rlimit_fsize": ("typed_error", 600),
}


def bench_limits(work: Path) -> dict:
    import os
    import subprocess

    per_case = []
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name, (expect, bound) in LIMIT_CASES.items():
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _limit_case_code(name, work)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        try:
            out, err = proc.communicate(timeout=LIMIT_CASE_TIMEOUT_S + 60)  # + building the input
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            proc.returncode = None
        wall = time.perf_counter() - t0
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"outcome": "hang" if proc.returncode is None else "crash", "errors": [],
                 "note": f"exit {proc.returncode}: {err.strip()[-300:]}"}
        peak = float(r.get("peak_mb") or 0.0)  # the child's own peak RSS during the operation (VmHWM reset after setup)
        seconds = float(r.get("seconds", wall))
        outcome = r["outcome"]
        if outcome in ("ok", "typed_error") and seconds > LIMIT_CASE_TIMEOUT_S:
            outcome = "hang"
        if outcome in ("ok", "typed_error") and expect != "either" and outcome != expect:
            outcome = "wrong"
        outcome = _classify(outcome, "", peak, bound) if outcome in ("ok", "typed_error") else outcome
        per_case.append({"name": name, "expect": expect, "outcome": outcome, "seconds": round(seconds, 3),
                         "wall_s_incl_setup": round(wall, 2), "peak_mb": round(peak, 1), "bound_mb": bound,
                         "errors": r.get("errors", []), "note": r.get("note", "")[:240]})
        print(f"  {name:32s} {outcome:18s} {seconds:7.2f} s  peak {peak:7.1f} MB (bound {bound})  {r.get('note', '')[:110]}")
    summary = {**_counts([c for c in per_case if c["outcome"] != "skipped"]),
               "skipped": sum(c["outcome"] == "skipped" for c in per_case),
               "time_bound_s": LIMIT_CASE_TIMEOUT_S, "address_space_mb": LIMIT_AS_MB}
    print(f"limits: { {k: v for k, v in summary.items()} }")
    summary["per_case"] = per_case
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


def bench_cli(work: Path, n_kills: int, n_concurrent: int) -> dict:
    """``ghist predict`` crash recovery, as a user meets it: SIGKILL at random moments (and right after
    the first checkpoint), then the plain command again; and two ``ghist predict`` at once on one slide.

    Each case is classed: correct result (resumed: same run id, cells and expression bit-identical to an
    uninterrupted run; concurrent: one run, the other exits 4 "busy" or reports the finished run),
    not resumed (a second run was started), duplicate run, wrong result, data left behind (``*.part``,
    a ``running`` row with a dead pid), crash or hang (> 300 s).
    """
    import random
    import resource
    import signal
    import subprocess

    import anndata as ad
    import numpy as np
    from slide_factory import demo_crop_png
    from testkit import make_tiny_ghist

    from ghist_core.cli import EXIT_BUSY, EXIT_OK
    from ghist_core.paths import DEMO_DIR
    from ghist_core.project.store import Project

    slide = demo_crop_png(work / "cli_slide.png", DEMO_DIR / "CMU-1-Small-Region.svs", (600, 1000), 1100)  # 2 x 2 blocks
    model = work / "cli_tiny_ghist"
    model.mkdir()
    make_tiny_ghist(model, seed=0)
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def cmd(folder: Path) -> list[str]:
        return [sys.executable, "-m", "ghist_core.cli", "predict", str(slide), "--project", str(folder), "--mpp", "0.499",
                "--patient", "P1", "--model", str(model), "--segmenter", "classical", "--device", "cpu"]

    def last_json(text: str) -> dict:
        lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {}

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    def left_behind(folder: Path) -> list[str]:
        bad = [str(p.relative_to(folder)) for p in folder.rglob("*.part")]
        with Project.open(folder) as project:
            runs = project.list_runs()
            bad += [f"run {r} still {s}" for r, s in zip(runs["run_id"], runs["status"]) if s != "finished"]
        return bad

    t0 = time.perf_counter()
    ref_out = subprocess.run(cmd(work / "cli_ref"), capture_output=True, text=True, env=env, timeout=600)
    ref_s = time.perf_counter() - t0
    if ref_out.returncode != EXIT_OK:
        raise RuntimeError(f"the uninterrupted ghist predict failed: {ref_out.stderr[-2000:]}")
    ref = ad.read_h5ad(last_json(ref_out.stdout)["h5ad"])
    ref_ids, ref_x = ref.obs["cell_id"].to_numpy(), np.asarray(ref.X)
    rng = random.Random(7)
    per_case: list[dict] = []
    for i in range(n_kills):
        folder = work / f"cli_kill_{i}"
        mode = "after first checkpoint" if i == 0 else "random moment"
        delay = None if i == 0 else round(rng.uniform(0.5, 0.95 * ref_s), 2)
        errors: list[str] = []
        t = time.perf_counter()
        proc = subprocess.Popen(cmd(folder), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while proc.poll() is None and time.perf_counter() - t < 300:
            if delay is None and any(folder.glob("runs/*/blocks/block_*.h5ad")):
                break
            if delay is not None and time.perf_counter() - t >= delay:
                break
            time.sleep(0.01)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        try:
            out = subprocess.run(cmd(folder), capture_output=True, text=True, env=env, timeout=300)
        except subprocess.TimeoutExpired:
            per_case.append({"name": f"cli_kill_{i}", "kind": "cli", "mode": mode, "delay_s": delay, "outcome": "hang",
                             "seconds": round(time.perf_counter() - t, 2), "peak_mb": round(peak(), 1), "errors": []})
            continue
        line = last_json(out.stdout)
        with Project.open(folder) as project:
            n_runs = len(project.list_runs())
        if out.returncode != EXIT_OK or not line:
            outcome, errors = "crash", [out.stderr[-500:]]
        elif n_runs != 1:
            outcome = "not_resumed"
        else:
            a = ad.read_h5ad(line["h5ad"])
            same = np.array_equal(a.obs["cell_id"].to_numpy(), ref_ids) and np.array_equal(np.asarray(a.X), ref_x)
            outcome = "correct_result" if same else "wrong_result"
            errors = left_behind(folder)
            if errors and same:
                outcome = "data_left_behind"
        per_case.append({"name": f"cli_kill_{i}", "kind": "cli", "mode": mode, "delay_s": delay, "killed": killed,
                         "action_after": line.get("action"), "outcome": outcome,
                         "seconds": round(time.perf_counter() - t, 2), "peak_mb": round(peak(), 1), "errors": errors})
    for i in range(n_concurrent):
        folder = work / f"cli_two_{i}"
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        outs = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
        codes = sorted(rc for _, _, rc in outs)
        with Project.open(folder) as project:
            n_runs = len(project.list_runs())
        if codes not in ([EXIT_OK, EXIT_OK], [EXIT_OK, EXIT_BUSY]):
            outcome = "crash"
        elif n_runs != 1:
            outcome = "duplicate_run"
        else:
            outcome = "data_left_behind" if left_behind(folder) else "correct_result"
        per_case.append({"name": f"cli_two_at_once_{i}", "kind": "cli", "exit_codes": codes, "runs": n_runs,
                         "outcome": outcome, "seconds": round(time.perf_counter() - t, 2), "peak_mb": round(peak(), 1),
                         "errors": [err[-300:] for _, err, rc in outs if rc not in (EXIT_OK, EXIT_BUSY)]})
    counts: dict = {}
    for c in per_case:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    kills = [c for c in per_case if c["name"].startswith("cli_kill")]
    summary = {"cases": len(per_case), "by_outcome": counts, "uninterrupted_s": round(ref_s, 2),
               "kills": len(kills),
               # killed after the run was recorded: the next ghist predict resumed it (same run id)
               "resumed_identical": sum(c["outcome"] == "correct_result" and c.get("action_after") == "resumed" for c in kills),
               # killed before the run was recorded: the next one started it afresh (nothing to resume)
               "killed_before_the_run_existed_then_identical": sum(
                   c["outcome"] == "correct_result" and c.get("action_after") == "new" for c in kills),
               "duplicate_runs": counts.get("duplicate_run", 0) + counts.get("not_resumed", 0),
               "max_seconds": max(c["seconds"] for c in per_case), "max_peak_mb": max(c["peak_mb"] for c in per_case),
               "peak_mb_note": "peak_mb = the largest ru_maxrss of any ghist process so far (an upper bound per case)"}
    print(f"cli recovery: { {k: v for k, v in summary.items() if k != 'peak_mb_note'} }")
    summary["per_case"] = per_case
    return summary


def bench_browser_checks(work: Path) -> dict:
    """The real-browser checks of issue #20 (``tests/app/test_hostile_browser.py``): hostile card, gene,
    patient and clinical strings render as text, no script runs, nothing is fetched from elsewhere; an
    upload leaves the server's RAM once staged and "Remove" deletes its staged copy."""
    import re
    import subprocess

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-rA", "-p", "no:cacheprovider",
                          "tests/app/test_hostile_browser.py", "-o", "addopts="],
                         capture_output=True, text=True, cwd=REPO, timeout=1800)
    text = out.stdout + out.stderr
    passed = re.findall(r"^PASSED (tests/\S+::\S+)", text, flags=re.M)
    m = re.search(r"UPLOAD_RAM (\{.*\})", text)
    ram = json.loads(m.group(1).replace("'", '"')) if m else None
    xss_ok = any("test_hostile_data_runs_no_script_and_fetches_nothing" in t for t in passed)
    upload_ok = any("test_upload_bytes_leave_server_ram_once_staged" in t for t in passed)  # skipped = not measured
    res = {"pytest_exit": out.returncode, "summary_line": text.strip().splitlines()[-1] if text.strip() else "",
           "scripts_executed": 0 if xss_ok else None, "remote_fetches": 0 if xss_ok else None,
           "uploads_left_behind": 0 if upload_ok else None, "upload_ram_mb": ram if upload_ok else None,
           "seconds": round(time.perf_counter() - t, 1), "passed": passed}
    print(f"browser checks: exit {out.returncode}, {res['summary_line']}, upload RAM {ram}")
    return res


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
    ap.add_argument("--cli-kills", type=int, default=8)
    ap.add_argument("--cli-concurrent", type=int, default=4)
    ap.add_argument("--skip-browser", action="store_true", help="keep the previous concurrent_users figures")
    ap.add_argument("--skip-kills", action="store_true", help="keep the previous kills figures")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (hostile,limits,kills,cli,browser_checks,browser); "
                                                   "the others keep their previous figures")
    ap.add_argument("--serve-hostile", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_hostile is not None:
        _serve_hostile(args.serve_hostile)
        return 0
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    only = set(args.only.split(",")) if args.only else {"hostile", "limits", "kills", "cli", "browser_checks", "browser"}
    if args.skip_kills:
        only.discard("kills")
    if args.skip_browser:
        only.discard("browser")
    out = dict(previous)
    with tempfile.TemporaryDirectory(prefix="ghist_robustness_") as tmp:
        work = Path(tmp)
        if "hostile" in only:
            out["hostile_files"] = bench_hostile(work)
        if "limits" in only:
            out["limits"] = bench_limits(work)
        if "kills" in only:
            out["kills"] = bench_kills(work, args.kills)
        if "cli" in only:
            out["cli_recovery"] = bench_cli(work, args.cli_kills, args.cli_concurrent)
        if "browser_checks" in only:
            out["browser_checks"] = bench_browser_checks(work)
        if "browser" in only:
            out["concurrent_users"] = bench_browser(work, args.sessions)
    order = ["hostile_files", "limits", "kills", "cli_recovery", "browser_checks", "concurrent_users"]
    out = {k: out[k] for k in order if k in out} | {k: v for k, v in out.items() if k not in order}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
