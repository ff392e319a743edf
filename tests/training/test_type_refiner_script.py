"""scripts/type_refiner.py on stand-in nuclei: the fit learns a separable signal, the scores follow
HoVer-Net's per-type F1 with unmatched predictions typed, and the card is written only for ADOPT."""

from __future__ import annotations

import numpy as np
import pytest

from testkit import load_repo_script

script = load_repo_script("scripts/type_refiner.py")


def _images(rng, n=400):
    """One image: true types 1..4, the features carry the type in one shape column plus noise."""
    names = script.ALL_FEATURES
    true = rng.integers(1, 5, n)
    f = rng.normal(size=(n, len(names)))
    f[:, names.index("eccentricity")] = true * 3.0
    current = np.full(n, 3)  # the current decision calls everything epithelial
    return [{"gt_m": true, "gt_u": np.zeros(0, int), "f_m": f, "f_u": np.zeros((0, len(names))),
             "cur_m": current, "cur_u": np.zeros(0, int)}]


def test_fit_learns_the_signal_and_beats_a_constant_decision():
    rng = np.random.default_rng(0)
    train, test = _images(rng), _images(rng)
    refiner = script.fit(train, 1.0, "balanced", script.FEATURE_SETS["no_stain"])
    assert refiner.feature_names == script.FEATURE_SETS["no_stain"] and refiner.classes == [1, 2, 3, 4]
    new, cur = script.scores(test, refiner.predict), script.scores(test)
    assert new["mean_type_f1"] > 0.9 > cur["mean_type_f1"]
    assert cur["per_type_f1"]["other"] == 0.0 and new["f_d"] == cur["f_d"]


def test_write_card_refuses_a_result_that_is_not_adopt(tmp_path):
    with pytest.raises(SystemExit, match="unchanged"):
        script.write_card({"weights_sha256": "0" * 64, "verdict": {"adopt": True}}, "nuclei-seg-stain")
    with pytest.raises(SystemExit, match="unchanged"):
        script.write_card({"weights_sha256": None, "verdict": {"adopt": False}}, "nuclei-seg-stain")
