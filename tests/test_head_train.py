"""GHIST on frozen nucleus features: the training path equals the inference path, and the heads learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghist_core.model.head_train import (
    FeatureBank, HeadTrainConfig, PatchHead, _CellsBySpot, _ghist_cells, extract_bank, fit_heads, nuclear_ghist,
    predict_bank,
)
from ghist_core.model.her2st import SpotPack
from ghist_core.model.train import make_synthetic_cells

SEG_CARD = {"architecture": {"widths": [8, 16, 32], "blocks": [1, 1, 1], "head_width": 8, "n_types": 3,
                             "mpp": 0.5, "type_names": ["a", "b"]}}


def synthetic_pack(n_spots: int = 24, size: int = 64, seed: int = 0) -> SpotPack:
    """One spot per generated patch; every nucleus inside it; counts = sum of its cells' expression."""
    data, _ = make_synthetic_cells(n_patches=n_spots, size=size, n_genes=6, n_types=3, seed=seed)
    inst = data.instances.numpy()
    spot, label = np.nonzero(data.lut_morph_ok.numpy())
    expr = data.lut_expr.numpy()
    counts = np.einsum("plg->pg", expr) * 50.0
    totals = counts.sum(1) + 500.0
    ys, xs = np.mgrid[0:size, 0:size]
    cxy = np.zeros((len(spot), 2), np.float32)
    area = np.zeros(len(spot), np.float32)
    for j, (p, lab) in enumerate(zip(spot, label)):  # test data only
        m = inst[p] == lab
        cxy[j] = (xs[m].mean(), ys[m].mean())
        area[j] = m.sum() * 0.25
    types = data.lut_type.numpy()[spot, label]
    frac = np.stack([np.bincount(types[spot == p], minlength=3) for p in range(n_spots)]).astype(np.float32)
    frac /= frac.sum(1, keepdims=True)
    return SpotPack(
        genes=np.array([f"g{i}" for i in range(6)]), n_hvg=6, cell_types=np.array(["t0", "t1", "t2"]), mpp=0.5,
        jpeg_buf=np.zeros(0, np.uint8), jpeg_off=np.zeros(n_spots + 1, np.int64), instances=inst.astype(np.uint16),
        counts=counts.astype(np.float32), totals=totals.astype(np.float32), fractions=frac,
        features=np.zeros((n_spots, 4), np.float32), section=np.array(["S"] * n_spots), patient=np.array(["P"] * n_spots),
        array_xy=np.zeros((n_spots, 2), np.int32), cell_spot=spot.astype(np.int32), cell_label=label.astype(np.int32),
        cell_xy_px=cxy, cell_in_spot=np.ones(len(spot), bool),
        cell_morph=np.stack([np.log(area), np.zeros(len(spot)), np.ones(len(spot))], 1).astype(np.float32),
    ), data.images.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pack_and_bank():
    torch.manual_seed(0)
    pack, images = synthetic_pack()
    net = nuclear_ghist(pack, SEG_CARD, embed_dim=32)
    bank = extract_bank(pack, images, net, views=(0, 5), batch_size=8)
    return pack, images, bank


def test_cells_by_spot_gathers_every_cell_once() -> None:
    cell_spot = np.array([2, 0, 2, 1, 0, 2])
    rows, local = _CellsBySpot(cell_spot, 4).gather(np.array([2, 3, 0]))
    assert sorted(rows.tolist()) == [0, 1, 2, 4, 5]
    assert np.array_equal(cell_spot[rows], np.array([2, 3, 0])[local])


def test_bank_rows_follow_the_pack_and_views_differ(pack_and_bank) -> None:
    pack, _, bank = pack_and_bank
    assert bank.cell_feat.shape[:2] == (2, len(pack.cell_spot))
    assert np.isfinite(bank.cell_feat).all() and (np.abs(bank.cell_feat).sum(2) > 0).all()
    # a flipped view sees the same nuclei through other filters: features differ, rows still match the pack
    assert not np.allclose(bank.cell_feat[0], bank.cell_feat[1])


def test_training_path_equals_the_network_forward(pack_and_bank) -> None:
    """What the heads are trained on (cached features, per-patch context) is what ``forward`` computes."""
    pack, images, bank = pack_and_bank
    torch.manual_seed(0)
    net = nuclear_ghist(pack, SEG_CARD, embed_dim=32)  # same seed: the network the bank was made with
    net.cell_feat_mean.copy_(torch.from_numpy(bank.cell_feat[0].astype(np.float32).mean(0)))
    net.eval()
    spots = np.arange(6)
    with torch.no_grad():
        via_bank, rows, _ = _ghist_cells(net, pack, bank, _CellsBySpot(pack.cell_spot, pack.n_spots), spots,
                                         np.zeros(len(spots), np.int64))
        img = torch.from_numpy(np.ascontiguousarray(images[spots].transpose(0, 3, 1, 2)))
        out = net(img.float() / 255.0, torch.from_numpy(pack.instances[spots].astype(np.int32)))
    lut = {(int(s), int(l)): j for j, (s, l) in enumerate(zip(pack.cell_spot, pack.cell_label))}
    order = [lut[(int(b), int(l))] for b, l in zip(out["cell_batch"], out["cell_label"])]
    pos = {r: i for i, r in enumerate(rows.tolist())}
    idx = [pos[o] for o in order]
    np.testing.assert_allclose(out["expr"].numpy(), via_bank["expr"][idx].numpy(), rtol=2e-2, atol=1e-3)
    np.testing.assert_allclose(out["type_prob"].numpy(), via_bank["type_prob"][idx].numpy(), atol=1e-2)


def test_heads_learn_spot_expression_from_nucleus_colour(pack_and_bank) -> None:
    pack, _, bank = pack_and_bank
    torch.set_num_threads(1)
    tr, te = np.arange(16), np.arange(16, 24)
    y = pack.targets()
    res = fit_heads(pack, bank, tr, kind="ghist", seg_card=SEG_CARD, net_kw={"embed_dim": 32, "dropout": 0.0},
                    hcfg=HeadTrainConfig(epochs=40, batch_size=8, lr=3e-3, feat_noise=0.0), log=None)
    losses = [h["expr"] for h in res.history]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2])
    pred = predict_bank(res.model, pack, bank, tr)
    assert pred.shape == (len(tr), 6) and np.isfinite(pred).all() and (pred >= 0).all()
    r = [np.corrcoef(pred[:, g], y[tr, g])[0, 1] for g in range(6)]
    assert np.mean(r) > 0.5, r
    st = fit_heads(pack, bank, tr, kind="stnet", hcfg=HeadTrainConfig(epochs=5, batch_size=8), log=None)
    assert isinstance(st.model, PatchHead)
    assert predict_bank(st.model, pack, bank, te).shape == (len(te), 6)
    with pytest.raises(ValueError):
        fit_heads(pack, bank, tr, kind="ghist", seg_card=None)


def test_bank_cache_resumes_per_view(pack_and_bank, tmp_path) -> None:
    pack, images, bank = pack_and_bank
    torch.manual_seed(0)
    net = nuclear_ghist(pack, SEG_CARD, embed_dim=32)
    b1 = extract_bank(pack, images, net, views=(0,), cache_dir=tmp_path)
    assert (tmp_path / "view0.npz").exists()
    net2 = nuclear_ghist(pack, SEG_CARD, embed_dim=32)  # different random weights: the cache must win
    b2 = extract_bank(pack, images, net2, views=(0,), cache_dir=tmp_path)
    assert np.array_equal(b1.cell_feat, b2.cell_feat)
    FeatureBank.save(b1, tmp_path / "bank.npz")
    assert np.array_equal(FeatureBank.load(tmp_path / "bank.npz").patch_feat, b1.patch_feat)
