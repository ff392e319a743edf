"""The pre-declared switch rule (scripts/check_switch_rule.py) judges two protocol results by the
thresholds written in docs/DECISIONS.md, and can say KEEP."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from testkit import load_repo_script

rule = load_repo_script("scripts/check_switch_rule.py")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "results" / "her2st.json"


def test_a_result_against_itself_switches_and_a_worse_one_keeps(tmp_path):
    res = json.loads(BENCH.read_text())
    ok, lines = rule.check(res, res)
    assert ok and len(lines) == 3

    worse = copy.deepcopy(res)
    worse["lopo"]["model"]["mean_pcc"] -= 0.011  # just past the allowed drop
    ok, lines = rule.check(res, worse)
    assert not ok and ": False" in lines[1]

    behind = copy.deepcopy(res)
    behind["loso"]["wilcoxon_p_vs_floor"] = 0.02
    assert not rule.check(res, behind)[0]

    (tmp_path / "a.json").write_text(json.dumps(res))
    (tmp_path / "b.json").write_text(json.dumps(worse))
    assert rule.main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert rule.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
