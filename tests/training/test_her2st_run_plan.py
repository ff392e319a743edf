"""bench/her2st.py run: which CNN jobs it trains (the protocol's folds, no duplicate LOPO B, resume)."""

from __future__ import annotations

import numpy as np

from testkit import load_repo_script

bench = load_repo_script("bench/her2st.py")


def _fold_names() -> list[str]:
    section = np.array(["B4", "C2", "C3", "C4", "C5", "C6"]).repeat(3)
    patient = np.array([s[0] for s in section])
    return list(bench.folds(section, patient))


def test_default_jobs_are_the_scored_folds_and_the_final_fit(tmp_path):
    names = _fold_names()
    assert "lopo_B" in names  # a fold that exists, but LOPO B is LOSO B4: scored once
    jobs = bench.plan_jobs(names, tmp_path, ["ghist", "stnet"], [0, 1])
    folds = {f for _, f, _ in jobs}
    assert folds == {*bench.OUTER_UNITS, "final"} and "lopo_B" not in folds
    assert ("final" in {f for _, f, k in jobs if k == "ghist"}) and not any(f == "final" for _, f, k in jobs if k == "stnet")
    assert len(jobs) == 2 * (7 + 1) + 2 * 7
    first_final = min(i for i, j in enumerate(jobs) if j[1] == "final")
    assert all(j[1] == "final" for j in jobs[first_final:])  # held-out folds of every seed first


def test_finished_jobs_are_skipped_and_only_is_honoured(tmp_path):
    names = _fold_names()
    (tmp_path / "ghist_s0").mkdir()
    (tmp_path / "ghist_s0" / "loso_B4__ghist.json").write_text("{}")
    jobs = bench.plan_jobs(names, tmp_path, ["ghist"], [0])
    assert (0, "loso_B4", "ghist") not in jobs and (0, "loso_C2", "ghist") in jobs
    assert bench.plan_jobs(names, tmp_path, ["ghist"], [0], ["lopo_B", "nope"]) == [(0, "lopo_B", "ghist")]
