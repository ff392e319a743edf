"""Ensemble members in one weights file: per-cell expression uncertainty (their spread), X unchanged."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from ghist_core import _keys as K
from ghist_core.errors import WeightsFormatError
from ghist_core.model import GhistConfig, GhistNet, load_ghist
from ghist_core.model.predict import ENSEMBLE_RULE, UNCERTAINTY_UNAVAILABLE, GhistModel, save_ghist
from ghist_core.segmentation import ArraySlide
from ghist_core.weights.resolve import save_weights

TINY = dict(patch_px=64, widths=(8, 16, 32, 32), fpn_dim=16, embed_dim=32, dropout=0.0)
INPUTS = ("prob_x", "prob_y")
UNC = K.OBS_EXPRESSION_UNCERTAINTY


def _net(seed: int, **kw) -> GhistNet:
    """A tiny net whose gene outputs depend on its seed (random image weights of a visible size)."""
    cfg = GhistConfig(genes=[f"g{i}" for i in range(5)], cell_types=["t0", "t1"], **{**TINY, **kw})
    torch.manual_seed(seed)
    net = GhistNet(cfg).eval()
    torch.nn.init.normal_(net.resid_head.weight, std=0.3)
    return net


def _state(net: GhistNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def scene():
    """A 200 µm square with 80 dark nuclei on a pale background, several tiles and context neighbourhoods."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(225, 10, (400, 400, 3)), 0, 255).astype(np.uint8)
    xy = rng.uniform(4, 196, (80, 2))
    for cx, cy in xy / 0.5:
        rgb[int(cy) - 4:int(cy) + 4, int(cx) - 4:int(cx) + 4] = rng.integers(40, 160, 3)
    p = rng.uniform(0, 1, 80)
    cells = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1], "area_um2": 12.0, "cell_id": np.arange(80) + 10,
                          "prob_x": p, "prob_y": 1 - p})
    return ArraySlide(rgb, 0.5), cells


def test_members_are_saved_in_one_file_and_loaded_apart(tmp_path: Path) -> None:
    nets = [_net(s) for s in (0, 1, 2)]
    assert not [k for k in nets[0].state_dict() if re.match(r"^member\d+\.", k)]  # no clash with member names
    wp = save_ghist(nets[0], tmp_path, {"ensemble": {"rule": "seeds 0,1,2 of the same recipe"}}, members=nets)
    card = json.loads(wp.with_suffix(".json").read_text())
    assert card["ensemble"] == {"members": 3, "rule": "seeds 0,1,2 of the same recipe"}
    names = set(load_file(wp))
    assert "member1.encoder.stem.0.0.weight" in names and "member2.resid_head.weight" in names
    assert "encoder.stem.0.0.weight" in names and not any(n.startswith("member3.") for n in names)
    m = load_ghist(path=wp, device="cpu")
    assert len(m.members) == 3 and m.members[0] is m.net
    for got, want in zip(m.members, nets):
        for k, v in _state(want).items():
            assert torch.equal(got.state_dict()[k], v), k
    # a file without members loads as before: one member, no "ensemble" in its card
    one = save_ghist(nets[1], tmp_path / "one", {})
    single = load_ghist(path=one, device="cpu")
    assert len(single.members) == 1 and "ensemble" not in single.card
    assert save_ghist(nets[0], tmp_path / "r", {}, members=nets[1:]).with_suffix(".json").read_text().count(ENSEMBLE_RULE) == 1


@pytest.mark.parametrize("variant", [{}, {"cell_inputs": INPUTS, "tissue_skip": True, "density_prior": True,
                                          "spot_aggregate": "mean"}])
def test_uncertainty_leaves_x_alone_and_is_the_spread_of_the_members(tmp_path: Path, scene, variant: dict) -> None:
    slide, cells = scene
    nets = [_net(s, **variant) for s in (0, 1, 2)]
    m = load_ghist(path=save_ghist(nets[0], tmp_path, {}, members=nets[1:]), device="cpu")
    plain = m.predict(slide, cells, margin_px=8, batch_size=4)
    withu = m.predict(slide, cells, margin_px=8, batch_size=4, uncertainty=True)
    np.testing.assert_array_equal(withu.X, plain.X)  # member 0's prediction, bit for bit
    for key in (K.OBSM_TYPE_PROBABILITIES, K.OBSM_NEIGHBOURHOOD):
        np.testing.assert_array_equal(withu.obsm[key], plain.obsm[key])
    assert UNC not in plain.obs and K.GHIST_UNCERTAINTY not in plain.uns["ghist"]
    u = withu.obs[UNC].to_numpy()
    assert u.dtype == np.float32 and len(u) == len(cells) and np.isfinite(u).all() and (u >= 0).all()
    assert (u > 1e-4).all()  # the seeds differ, so every cell has some spread
    # the definition: mean over genes of the SD (ddof=1) across members of log1p(each member's own prediction)
    alone = np.stack([GhistModel(net, m.card).predict(slide, cells, margin_px=8, batch_size=4).X for net in m.members])
    assert not np.allclose(alone[1], alone[0])
    np.testing.assert_allclose(u, np.log1p(alone).std(0, ddof=1).mean(1), rtol=1e-4, atol=1e-7)
    # the same in other tile batches and head chunks (memory settings never change the answer)
    other = m.predict(slide, cells, margin_px=8, batch_size=1, chunk_cells=7, uncertainty=True)
    np.testing.assert_allclose(other.obs[UNC].to_numpy(), u, rtol=1e-4, atol=1e-7)
    g = withu.uns["ghist"]
    assert g["params"]["uncertainty"] is True and plain.uns["ghist"]["params"]["uncertainty"] is False
    assert "3 ensemble members" in g[K.GHIST_UNCERTAINTY] and "log1p" in g[K.GHIST_UNCERTAINTY]
    # a gene subset: the spread over those genes
    sub = m.predict(slide, cells, margin_px=8, batch_size=4, genes=["g1", "g3"], uncertainty=True)
    np.testing.assert_allclose(sub.obs[UNC].to_numpy(), np.log1p(alone[:, :, [1, 3]]).std(0, ddof=1).mean(1),
                               rtol=1e-4, atol=1e-7)


def test_identical_members_have_zero_spread(tmp_path: Path, scene) -> None:
    slide, cells = scene
    net = _net(0)
    m = load_ghist(path=save_ghist(net, tmp_path, {}, members=[copy.deepcopy(net), copy.deepcopy(net)]), device="cpu")
    a = m.predict(slide, cells, margin_px=8, uncertainty=True)
    assert len(m.members) == 3 and (a.obs[UNC].to_numpy() == 0).all()


def test_a_one_member_model_says_the_uncertainty_is_unavailable(tmp_path: Path, scene) -> None:
    slide, cells = scene
    m = load_ghist(path=save_ghist(_net(0), tmp_path, {}), device="cpu")
    a = m.predict(slide, cells, margin_px=8, uncertainty=True)
    assert UNC not in a.obs and a.uns["ghist"][K.GHIST_UNCERTAINTY] == UNCERTAINTY_UNAVAILABLE
    np.testing.assert_array_equal(a.X, m.predict(slide, cells, margin_px=8).X)
    assert m.predict_arrays(slide, cells, margin_px=8, uncertainty=True).uncertainty is None


def test_card_and_weights_must_agree_on_the_members(tmp_path: Path) -> None:
    net = _net(0)
    base = {"kind": "ghist", "name": "ghist-her2st", "config": net.cfg.to_dict()}
    # the card claims 3 members, the file holds only member 0
    wp = save_weights(_state(net), tmp_path / "a", "ghist-her2st", {**base, "ensemble": {"members": 3}}).weights_path
    with pytest.raises(WeightsFormatError, match="lists 3 ensemble members but the weights file holds 1"):
        load_ghist(path=wp, device="cpu")
    # the file holds members the card does not list
    state = {**_state(net), **{f"member1.{k}": v for k, v in _state(_net(1)).items()}}
    wp = save_weights(state, tmp_path / "b", "ghist-her2st", base).weights_path
    with pytest.raises(WeightsFormatError, match="member 1"):
        load_ghist(path=wp, device="cpu")
    # a member whose tensors do not fit the card's network
    bad = {**state, "member1.resid_head.weight": torch.zeros(2, 2)}
    wp = save_weights(bad, tmp_path / "c", "ghist-her2st", {**base, "ensemble": {"members": 2}}).weights_path
    with pytest.raises(WeightsFormatError, match="do not fit"):
        load_ghist(path=wp, device="cpu")
    for members in ("3", 0, True, None):
        wp = save_weights(_state(net), tmp_path / f"d{members}", "ghist-her2st",
                          {**base, "ensemble": {"members": members}}).weights_path
        with pytest.raises(WeightsFormatError, match="'members'"):
            load_ghist(path=wp, device="cpu")


def test_save_refuses_an_ensemble_of_other_recipes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="another configuration"):
        save_ghist(_net(0), tmp_path, {}, members=[_net(1, embed_dim=16)])
    with pytest.raises(ValueError, match="lists 2 members but 3"):
        save_ghist(_net(0), tmp_path, {"ensemble": {"members": 2}}, members=[_net(1), _net(2)])
    assert not list(tmp_path.iterdir())  # nothing written
