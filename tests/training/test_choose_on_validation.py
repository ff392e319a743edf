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
