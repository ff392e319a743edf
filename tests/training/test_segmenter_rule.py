"""The pre-declared segmenter adoption rule (scripts/check_segmenter_rule.py) judges one
bench/segmentation.py result by the thresholds written in docs/DECISIONS.md, can say KEEP, and
refuses a result that lacks what it needs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from testkit import load_repo_script

rule = load_repo_script("scripts/check_segmenter_rule.py")
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
BENCH = RESULTS / "segmentation.json"


def _as_candidate(res: dict, src: str, name: str) -> dict:
    """``res`` with a copy of model ``src``'s rows under ``name`` in every block the rule reads."""
    out = copy.deepcopy(res)
    out["accuracy"][name] = copy.deepcopy(res["accuracy"][src])
    out["her2st_counts"][name] = copy.deepcopy(res["her2st_counts"][src])
    for ds in rule.SETS:
        for row in out["stain_shift"]["datasets"][ds]["scores"].values():
            row[name] = copy.deepcopy(row[src])
        for row in out["scale_shift"]["datasets"][ds]["aji"].values():
            row[name] = row[src]
    return out


def test_the_committed_result_is_judged_criterion_by_criterion():
    """On the committed run, nuclei-seg-stain against nuclei-seg: in the session-11 run it was better
    under every stain shift and worse at 2x zoom."""
    res = json.loads(BENCH.read_text())
    ok, lines = rule.check(res, "nuclei-seg", "nuclei-seg-stain")
    assert [ln.split()[0] for ln in lines] == ["PASS"] * 6 + ["FAIL"] * 2 and not ok


def test_a_copy_of_the_incumbent_keeps_and_a_clear_improvement_adopts(tmp_path):
    res = _as_candidate(json.loads(BENCH.read_text()), "nuclei-seg-stain", "cand")
    ok, lines = rule.check(res, "nuclei-seg-stain", "cand")
    assert not ok and sum(ln.startswith("FAIL") for ln in lines) == 1 and "'other' F1" in \
        next(ln for ln in lines if ln.startswith("FAIL"))  # equal is not higher

    better = copy.deepcopy(res)
    better["accuracy"]["cand"]["consep"]["per_type_f1"]["other"] += 0.01
    better["accuracy"]["cand"]["consep"]["aji"] -= 0.004  # within the allowed 0.005
    assert rule.check(better, "nuclei-seg-stain", "cand")[0]

    worse = copy.deepcopy(better)
    worse["accuracy"]["cand"]["monuseg"]["aji"] -= 0.006
    assert not rule.check(worse, "nuclei-seg-stain", "cand")[0]
    pale = copy.deepcopy(better)
    pale["stain_shift"]["datasets"]["consep"]["scores"]["cmu1-svs"]["cand"]["aji"] -= 0.2
    ok, lines = rule.check(pale, "nuclei-seg-stain", "cand")
    assert not ok and any(ln.startswith("FAIL  2. consep") and "cmu1-svs" in ln for ln in lines)

    (tmp_path / "good.json").write_text(json.dumps(better))
    (tmp_path / "bad.json").write_text(json.dumps(worse))
    assert rule.main([str(tmp_path / "good.json"), "--candidate", "cand"]) == 0
    assert rule.main([str(tmp_path / "bad.json"), "--candidate", "cand"]) == 1


def test_a_result_missing_a_block_or_model_cannot_be_judged(tmp_path, capsys):
    res = _as_candidate(json.loads(BENCH.read_text()), "nuclei-seg-stain", "cand")
    del res["scale_shift"]
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert rule.main([str(tmp_path / "r.json"), "--candidate", "cand"]) == 2
    assert "missing scale_shift" in capsys.readouterr().err
    assert rule.main([str(BENCH), "--candidate", "not-scored"]) == 2
    old = _as_candidate(json.loads(BENCH.read_text()), "nuclei-seg-stain", "cand")
    old["stain_shift"]["protocol"]["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert rule.main([str(tmp_path / "v1.json"), "--candidate", "cand"]) == 2


def test_the_wide_fine_tune_verdict_is_the_one_reported():
    """bench/results/segmentation_candidate_wide.json, as docs/DECISIONS.md (session 12) reports it:
    criteria 1 (both sets), 2 (MoNuSeg) and 3 fail; 2 (CoNSeP), 4 and 5 pass."""
    res = json.loads((RESULTS / "segmentation_candidate_wide.json").read_text())
    ok, lines = rule.check(res, "nuclei-seg-stain", "nuclei-seg-wide")
    assert not ok
    assert [ln.split()[0] for ln in lines] == ["FAIL", "FAIL", "PASS", "FAIL", "FAIL", "PASS", "PASS", "PASS"]


def test_a_result_cut_short_cannot_be_judged(tmp_path):
    """A killed run leaves the zooms and shifts it finished: the rule refuses it instead of judging
    the rows that happen to be there."""
    res = _as_candidate(json.loads(BENCH.read_text()), "nuclei-seg-stain", "cand")
    short = copy.deepcopy(res)
    del short["scale_shift"]["datasets"]["monuseg"]["aji"]["2.0"]
    (tmp_path / "s.json").write_text(json.dumps(short))
    assert rule.main([str(tmp_path / "s.json"), "--candidate", "cand"]) == 2
    short = copy.deepcopy(res)
    del short["stain_shift"]["datasets"]["consep"]["scores"]["synthetic-pink"]
    (tmp_path / "t.json").write_text(json.dumps(short))
    assert rule.main([str(tmp_path / "t.json"), "--candidate", "cand"]) == 2


def test_criterion_six_reads_the_stain_scale_block_with_the_check():
    """Session 14's criterion 6: the worst (stain, zoom) AJI of the '+auto-scale' rows; a candidate worse
    in one cell fails it, and a block without every cell cannot be judged."""
    res = json.loads(BENCH.read_text())
    block = json.loads((RESULTS / "segmentation_stain_scale.json").read_text())["stain_scale"]
    for ds in rule.SETS:
        for by_zoom in block["datasets"][ds]["aji"].values():
            for row in by_zoom.values():
                row["cand+auto-scale"] = row["nuclei-seg-stain+auto-scale"]
    res["stain_scale"] = block
    worst, cell = rule.worst_stain_scale_aji(res, "consep", "nuclei-seg-stain")
    assert worst == block["datasets"]["consep"]["summary"]["nuclei-seg-stain+auto-scale"]["worst_aji"]
    assert cell == "{} x{}".format(*block["datasets"]["consep"]["summary"]["nuclei-seg-stain+auto-scale"]["worst"])
    res = _as_candidate(res, "nuclei-seg-stain", "cand")
    res["accuracy"]["cand"]["consep"]["per_type_f1"]["other"] += 0.01
    assert rule.check(res, "nuclei-seg-stain", "cand", stain_scale=True)[0]
    res["stain_scale"]["datasets"]["monuseg"]["aji"]["synthetic-pale"]["2.0"]["cand+auto-scale"] -= 0.3
    ok, lines = rule.check(res, "nuclei-seg-stain", "cand", stain_scale=True)
    assert not ok and lines[-1].startswith("FAIL  6. monuseg") and "synthetic-pale x2.0" in lines[-1]
    del res["stain_scale"]["datasets"]["consep"]["aji"]["cmu1-svs"]
    try:
        rule.check(res, "nuclei-seg-stain", "cand", stain_scale=True)
    except rule.RuleInputError as exc:
        assert "did not finish" in str(exc)
    else:
        raise AssertionError("an unfinished block was judged")


def test_criterion_four_can_be_read_on_held_out_sections_only(tmp_path):
    """Session 17: a candidate that saw C2-C5 (unlabelled) is judged on B4 and C6 alone; a drop on
    those sections fails it even when the pooled agreement would pass, and the seen ones are ignored."""
    better = _as_candidate(json.loads(BENCH.read_text()), "nuclei-seg-stain", "cand")
    better["accuracy"]["cand"]["consep"]["per_type_f1"]["other"] += 0.01
    seen = copy.deepcopy(better)
    for s in ("C2", "C3", "C4", "C5"):
        seen["her2st_counts"]["cand"]["sections"][s]["spearman"] -= 0.5  # ignored when read on B4/C6
    assert rule.check(seen, "nuclei-seg-stain", "cand", her2st_sections=("B4", "C6"))[0]
    held = copy.deepcopy(better)
    held["her2st_counts"]["cand"]["sections"]["C6"]["spearman"] -= 0.3  # mean over B4, C6 drops 0.15
    ok, lines = rule.check(held, "nuclei-seg-stain", "cand", her2st_sections=("B4", "C6"))
    assert not ok and any(ln.startswith("FAIL  4.") and "B4, C6" in ln for ln in lines)
    assert rule.check(held, "nuclei-seg-stain", "cand")[0]  # pooled: unchanged, passes
    (tmp_path / "held.json").write_text(json.dumps(held))
    assert rule.main([str(tmp_path / "held.json"), "--candidate", "cand", "--her2st-sections", "B4,C6"]) == 1
