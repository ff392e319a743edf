"""Vectorised nucleus pooling, spot sums and star rasterisation against slow references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghist_core.model.pooling import (
    pool_cells, radius_neighbour_mean, rasterise_stars, relabel_batch, segment_mean, segment_sum,
)


def _random_masks(rng: np.random.Generator, b: int = 3, size: int = 48, per: int = 9) -> torch.Tensor:
    maps = []
    for _ in range(b):
        cen = rng.uniform(3, size - 3, (per, 2))
        rays = rng.uniform(1.0, 5.0, (per, 16))
        labels = rng.choice(np.arange(1, 200), per, replace=False)  # arbitrary, non-contiguous labels
        maps.append(rasterise_stars(cen, rays, (size, size), labels))
    return torch.from_numpy(np.stack(maps))


def _slow_pool(feats: torch.Tensor, inst: torch.Tensor):
    """One cell at a time, in (image, label) order."""
    b, c, h, w = feats.shape
    hh, ww = inst.shape[-2:]
    means, maxs, cents = [], [], []
    for bi in range(b):
        for lab in sorted(set(inst[bi].unique().tolist()) - {0}):
            ys, xs = torch.nonzero(inst[bi] == lab, as_tuple=True)
            v = feats[bi][:, ys * h // hh, xs * w // ww]
            means.append(v.mean(1))
            maxs.append(v.max(1).values)
            cents.append(torch.stack([xs.float().mean(), ys.float().mean()]))
    return torch.stack(means), torch.stack(maxs), torch.stack(cents)


@pytest.mark.parametrize("stride", [1, 4])
def test_pool_cells_equals_slow_reference(stride: int) -> None:
    rng = np.random.default_rng(stride)
    inst = _random_masks(rng)
    feats = torch.from_numpy(rng.normal(size=(3, 5, 48 // stride, 48 // stride)).astype(np.float32))
    gmap, cb, cl = relabel_batch(inst)
    n = int(cb.numel())
    both, n_pix, cen = pool_cells(feats, gmap, n, reduce="mean+max", centroids=True)
    m_ref, x_ref, c_ref = _slow_pool(feats, inst)
    assert n == len(m_ref)
    torch.testing.assert_close(both[:, :5], m_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:, 5:], x_ref)
    torch.testing.assert_close(cen, c_ref, atol=1e-4, rtol=1e-5)
    mean_only, _ = pool_cells(feats, gmap, n)
    torch.testing.assert_close(mean_only, m_ref, atol=1e-5, rtol=1e-5)
    # cell_batch/cell_label name every cell: the label's own pixels are what was pooled
    for i in [0, n // 2, n - 1]:
        assert int(n_pix[i]) == int((inst[cb[i]] == cl[i]).sum())


def test_relabel_batch_orders_by_image_then_label() -> None:
    x = torch.tensor([[[0, 7, 7], [3, 0, 0]], [[0, 0, 2], [2, 0, 9]]])
    g, cb, cl = relabel_batch(x)
    assert cb.tolist() == [0, 0, 1, 1]
    assert cl.tolist() == [3, 7, 2, 9]
    assert g.tolist() == [[[0, 2, 2], [1, 0, 0]], [[0, 0, 3], [3, 0, 4]]]


def test_spot_aggregation_equals_hand_sum() -> None:
    expr = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    spot = torch.tensor([0, 1, 0, -1, 1])  # cell 3 lies in no spot
    s = segment_sum(expr, spot, 3)
    assert s.tolist() == [[6.0, 8.0], [12.0, 14.0], [0.0, 0.0]]
    m = segment_mean(expr, spot, 3)
    assert m.tolist() == [[3.0, 4.0], [6.0, 7.0], [0.0, 0.0]]


def test_radius_neighbour_mean_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    xy = torch.from_numpy(rng.uniform(0, 100, (60, 2)).astype(np.float32))
    v = torch.from_numpy(rng.normal(size=(60, 4)).astype(np.float32))
    grp = torch.from_numpy(rng.integers(0, 2, 60))
    out, cnt = radius_neighbour_mean(xy, v, 20.0, group=grp)
    d = torch.cdist(xy.double(), xy.double())
    adj = (d <= 20.0) & (grp[:, None] == grp[None, :])
    ref = (adj.float() @ v) / adj.sum(1, keepdim=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cnt.tolist() == adj.sum(1).float().tolist()
    assert 1 < float(cnt.mean()) < 60  # some neighbours, not everyone


def test_radius_neighbour_mean_one_definition_for_training_and_inference() -> None:
    """numpy (slide inference) and torch (training) give the same numbers; torch keeps gradients."""
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 300, (500, 2))
    v = rng.normal(size=(500, 8)).astype(np.float32)
    m_np, c_np = radius_neighbour_mean(xy, v, 40.0)
    assert isinstance(m_np, np.ndarray) and m_np.dtype == np.float32 and c_np.dtype == np.float32
    vt = torch.from_numpy(v).requires_grad_(True)
    m_t, c_t = radius_neighbour_mean(torch.from_numpy(xy), vt, 40.0)
    np.testing.assert_allclose(m_t.detach().numpy(), m_np, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(c_t.numpy(), c_np)
    m_t.sum().backward()
    assert vt.grad is not None and torch.isfinite(vt.grad).all()
    # an isolated cell is its own neighbourhood
    far = np.vstack([xy, [[10_000.0, 10_000.0]]])
    m_far, c_far = radius_neighbour_mean(far, np.vstack([v, np.full((1, 8), 7.0, np.float32)]), 40.0)
    assert c_far[-1] == 1 and np.allclose(m_far[-1], 7.0)
    empty, c0 = radius_neighbour_mean(np.zeros((0, 2)), np.zeros((0, 3), np.float32), 40.0)
    assert empty.shape == (0, 3) and c0.shape == (0,)


def test_rasterise_stars_circle_area_and_overlap() -> None:
    img = rasterise_stars(np.array([[20.0, 20.0]]), np.full((1, 16), 6.0), (40, 40))
    area = int((img == 1).sum())
    assert abs(area - np.pi * 36) < 0.12 * np.pi * 36  # a 16-gon of radius 6 ≈ circle area
    # two overlapping discs: every drawn pixel goes to the cell it is deeper inside
    img2 = rasterise_stars(np.array([[15.0, 20.0], [22.0, 20.0]]), np.full((2, 16), 5.0), (40, 40))
    assert img2[20, 15] == 1 and img2[20, 22] == 2
    assert rasterise_stars(np.zeros((0, 2)), np.zeros((0, 16)), (8, 8)).sum() == 0
