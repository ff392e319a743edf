"""Cohort survival timings → bench/results/cohort_survival.json.

``compare_groups`` computes KM curves and the multi-group + pairwise log-rank tests with
vectorised numpy (checked equal to lifelines in tests/analysis/test_survival.py). Baseline,
measured in the same process on the same data: lifelines' ``KaplanMeierFitter`` per group +
``multivariate_logrank_test`` + ``pairwise_logrank_test`` (what the page would otherwise call
on every rerun). Cohorts: the bundled TCGA BRCA table (OS by stage, 4 groups; by raw AJCC
stage, 12 groups) and a generated 20,000-patient, 4-group cohort.

Run: ``python bench/cohort_survival.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.analysis.clinical import guess_mapping, load_demo_clinical, validate_survival  # noqa: E402
from ghist_core.analysis.survival import compare_groups  # noqa: E402


def lifelines_baseline(df: pd.DataFrame, group: str) -> float:
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test, pairwise_logrank_test

    d = df.dropna(subset=[group])
    for g in d[group].unique():
        s = d[d[group] == g]
        KaplanMeierFitter().fit(s["time"], s["event"])
    r = multivariate_logrank_test(d["time"], d[group], d["event"])
    pairwise_logrank_test(d["time"], d[group], d["event"])
    return float(r.test_statistic)


def ours(df: pd.DataFrame, group: str) -> float:
    return compare_groups(df, "time", "event", group).test_statistic


def best_of(fn, *args, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    warnings.simplefilter("ignore")
    raw = load_demo_clinical()
    tcga = validate_survival(raw, guess_mapping(raw)).table
    rng = np.random.default_rng(0)
    n = 20_000
    g = rng.integers(0, 4, n)
    big = pd.DataFrame({"time": np.round(rng.exponential(50 / (1 + 0.2 * g)), 1),
                        "event": (rng.random(n) < 0.6).astype(int), "grp": g})
    cases = [("tcga_stage_4_groups", tcga, "stage_group"),
             ("tcga_ajcc_12_groups", tcga, "ajcc_pathologic_tumor_stage"),
             ("generated_20k_4_groups", big, "grp")]
    results = {}
    for name, df, col in cases:
        assert np.isclose(ours(df, col), lifelines_baseline(df, col), rtol=1e-9)
        base = best_of(lifelines_baseline, df, col)
        mine = best_of(ours, df, col)
        results[name] = {"n": int(df[col].notna().sum()), "groups": int(df[col].nunique()),
                         "lifelines_s": round(base, 4), "compare_groups_s": round(mine, 4),
                         "speedup": round(base / mine, 2)}
        print(f"{name:26s} lifelines {base:7.3f}s  compare_groups {mine:7.3f}s  "
              f"x{base / mine:5.1f}")
    out = {"bench": "cohort_survival", "python": platform.python_version(),
           "machine": platform.machine(), "note": "best of 5; same process; lifelines = "
           "KM per group + multivariate + pairwise log-rank", "results": results}
    path = REPO / "bench" / "results" / "cohort_survival.json"
    atomic_write_text(path, json.dumps(out, indent=2))
    print(f"wrote {path}")
    print("median speed-up:", statistics.median(r["speedup"] for r in results.values()))


if __name__ == "__main__":
    main()
