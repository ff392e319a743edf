"""scripts/train_segmentation.py ``--type-weights balanced``: rare nucleus types count more in the type
cross-entropy (CoNSeP's "other" is a few % of nucleus pixels); plain training is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testkit import load_repo_script

train_seg = load_repo_script("scripts/train_segmentation.py")


def test_balanced_weights_favour_rare_types_and_leave_background_at_one():
    w = train_seg.balanced_type_weights(np.array([10_000, 20, 400, 400, 180]))  # bg, other, infl., epi., spindle
    assert w[0] == 1.0 and float(w[1:].mean()) == pytest.approx(1.0)
    assert float(w[1]) / float(w[2]) == pytest.approx(np.sqrt(400 / 20))  # 1/sqrt of the share
    assert float(w[1]) > float(w[4]) > float(w[2]) == pytest.approx(float(w[3]))
    assert float(train_seg.balanced_type_weights(np.array([1, 1, 10**6, 10**6, 10**6]))[1]) < 4.0  # bounded
    w0 = train_seg.balanced_type_weights(np.array([5, 0, 10, 10, 0]))  # absent types keep 1
    assert float(w0[1]) == float(w0[4]) == 1.0 and float(w0[2]) == pytest.approx(1.0)


def _outputs(n_types: int = 5, side: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inst = torch.zeros(2, side, side, dtype=torch.int32)
    inst[:, 4:10, 4:10] = 1
    types = torch.zeros(2, side, side, dtype=torch.long)
    types[0, 4:10, 4:10] = 1  # an "other" nucleus
    types[1, 4:10, 4:10] = 3
    out = (torch.randn(2, 1, side, side, generator=g), torch.randn(2, 2, side, side, generator=g),
           torch.randn(2, n_types, side, side, generator=g))
    return out, inst, types


def test_unit_weights_give_the_plain_loss_and_a_heavier_class_moves_it():
    out, inst, types = _outputs()
    plain = train_seg.losses(out, inst, types)
    ones = train_seg.losses(out, inst, types, torch.ones(5))
    assert float(ones["tp_ce"]) == pytest.approx(float(plain["tp_ce"]), rel=1e-6)
    assert float(ones["total"]) == pytest.approx(float(plain["total"]), rel=1e-6)
    heavy = torch.ones(5)
    heavy[1] = 5.0
    ce_other = torch.nn.functional.cross_entropy(out[2][:1], types[:1], reduction="none")[0, 4:10, 4:10].mean()
    weighted = float(train_seg.losses(out, inst, types, heavy)["tp_ce"])
    # a weighted mean moves towards the heavier class's own loss
    assert abs(weighted - float(ce_other)) < abs(float(plain["tp_ce"]) - float(ce_other))


def test_the_flag_reaches_the_config():
    assert train_seg.parse_config(["--type-weights", "balanced"]).type_weights == "balanced"
    assert train_seg.parse_config([]).type_weights == ""
