"""scripts/choose_on_validation.py: the TTA pick and the per-type weight search, on stand-in data."""

from __future__ import annotations

import numpy as np

from testkit import load_repo_script

choose = load_repo_script("scripts/choose_on_validation.py")


def test_tta_pick_is_the_cheapest_within_the_tolerance():
    assert choose.pick({1: 0.480, 2: 0.4815, 4: 0.485, 8: 0.490}) == 8
    assert choose.pick({1: 0.4885, 2: 0.489, 4: 0.4895, 8: 0.490}) == 1
    assert choose.pick({1: 0.50, 2: 0.47, 4: 0.48, 8: 0.49}) == 1


def test_type_weights_correct_an_under_called_class():
    """Matched nuclei of true type 1 ("other") whose probabilities put it second: the search finds a
    weight that calls them "other" and raises the mean type F1; weights 1 are the plain argmax."""
    rng = np.random.default_rng(0)
    n = 200
    true = rng.integers(1, 5, n)
    probs = np.full((n, 4), 0.1)
    probs[np.arange(n), true - 1] = 0.7
    other = true == 1
    probs[other] = [0.3, 0.1, 0.5, 0.1]  # "other" nuclei look epithelial by a margin a weight can undo
    images = [(true, np.zeros(0, int), probs, np.zeros((0, 4)))]
    plain = choose.scores(images, np.ones(4))
    assert plain["per_type_f1"]["other"] == 0.0
    weights, trace = choose.choose(images)
    assert weights[choose.FIXED] == 1.0 and weights[0] > 5 / 3 and trace
    best = choose.scores(images, weights)
    assert best["per_type_f1"]["other"] > 0.9 and best["mean_type_f1"] > plain["mean_type_f1"]
    assert best["f_d"] == plain["f_d"]  # detection does not move


def test_scale_gate_scoring_and_pick():
    """Stand-in rows: an image moves only when its factor-1 median passes the gate and the 2/3 reading
    is surer by more than the margin; the pick is the largest gate that keeps the x2 gain."""
    from ghist_core.segmentation.model import SCALE_MARGIN

    sure = 0.7 + 2 * SCALE_MARGIN
    x1 = [{"aji": [0.6, 0.5], "cert": [0.7, 0.7], "median_px": 90.0}]  # not surer at 2/3: never moves
    x2 = [{"aji": [0.3, 0.5], "cert": [0.7, sure], "median_px": 70.0},  # pieces of large nuclei: small median
          {"aji": [0.3, 0.5], "cert": [0.7, sure], "median_px": 300.0}]
    assert choose.gate_aji(x2, 60.0) == 0.5 and choose.gate_aji(x2, 100.0) == 0.4 and choose.gate_aji(x1, 60.0) == 0.6
    gate, table = choose.pick_gate({1.0: x1, 2.0: x2}, gates=(60.0, 100.0))
    assert gate == 60.0 and table[100.0]["2.0"] < table[60.0]["2.0"]
    x2_big = [{"aji": [0.3, 0.5], "cert": [0.7, sure], "median_px": 300.0}]
    assert choose.pick_gate({1.0: x1, 2.0: x2_big}, gates=(60.0, 100.0))[0] == 100.0


def test_certainty_trigger_pick():
    """The lowest trigger that keeps the x1.5/x2 gains: unsure tiles (certainty 0.6) still move,
    confident ones (0.95) are skipped."""
    from ghist_core.segmentation.model import SCALE_MARGIN

    x1 = [{"aji": [0.6, 0.5], "cert": [0.95, 0.95], "median_px": 90.0}]
    x2 = [{"aji": [0.3, 0.5], "cert": [0.6, 0.6 + 2 * SCALE_MARGIN], "median_px": 90.0}]
    c, table = choose.pick_trigger({1.0: x1, 2.0: x2}, 60.0, triggers=(0.5, 0.8, float("inf")))
    assert c == 0.8 and table[0.8]["x1_checked_share"] == 0.0 and table[float("inf")]["x1_checked_share"] == 1.0
    assert table[0.5]["2.0"] < table[0.8]["2.0"]


def test_smallest_setting_within_the_tie_wins():
    """The blend's alpha: the least change unless something is better by more than the tie."""
    assert choose.pick_smallest({0.0: 0.400, 0.25: 0.405, 0.5: 0.4095, 0.75: 0.4100, 1.0: 0.401}) == 0.5
    assert choose.pick_smallest({0.0: 0.410, 0.25: 0.4095, 0.5: 0.40}) == 0.0
    assert choose.pick_smallest({0.0: 0.39, 1.0: 0.41}) == 1.0


def test_type_merge_scores_relabel_the_truth_and_leave_the_merged_class_out():
    """Stand-in nuclei: true "other" ones that the network calls epithelial count for "epithelial"
    once merged there, and against it when merged elsewhere; the merged class is not scored."""
    true = np.array([1, 1, 1, 3, 3, 2, 4])
    probs = np.array([[0.2, 0.1, 0.6, 0.1]] * 5 + [[0.1, 0.8, 0.05, 0.05], [0.1, 0.05, 0.05, 0.8]])
    images = [(true, np.zeros(0, int), probs, np.zeros((0, 4)))]
    into_epi = choose.scores(images, np.ones(4), {"other": "epithelial"})
    into_spindle = choose.scores(images, np.ones(4), {"other": "spindle-shaped"})
    assert set(into_epi["per_type_f1"]) == {"inflammatory", "epithelial", "spindle-shaped"}
    assert into_epi["per_type_f1"]["epithelial"] == 1.0
    assert into_spindle["per_type_f1"]["epithelial"] < 1.0 and into_spindle["per_type_f1"]["spindle-shaped"] < 1.0
    assert choose.scores(images, np.ones(4))["per_type_f1"]["other"] == 0.0  # unmerged: never called


def test_merge_target_ties_to_epithelial_and_the_veto_fires_past_its_margin():
    tie = {"inflammatory": {"mean_type_f1": 0.5}, "epithelial": {"mean_type_f1": 0.5},
           "spindle-shaped": {"mean_type_f1": 0.4}}
    assert choose.pick_merge_target(tie) == "epithelial"
    assert choose.pick_merge_target({**tie, "spindle-shaped": {"mean_type_f1": 0.51}}) == "spindle-shaped"
    unmerged = {"per_type_f1": {"other": 0.1, "inflammatory": 0.6, "epithelial": 0.6, "spindle-shaped": 0.5}}
    ok = {"per_type_f1": {"inflammatory": 0.585, "epithelial": 0.7, "spindle-shaped": 0.49}}
    assert choose.merge_verdict(unmerged, ok, "epithelial")["adopt"]
    bad = {"per_type_f1": {**ok["per_type_f1"], "spindle-shaped": 0.47}}
    verdict = choose.merge_verdict(unmerged, bad, "epithelial")
    assert not verdict["adopt"] and not verdict["spindle-shaped_f1_within_0.02"] and "epithelial_f1_within_0.02" not in verdict
