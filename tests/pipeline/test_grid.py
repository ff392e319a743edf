"""Grid summaries: per-square means and counts equal a direct computation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core.errors import ModelInputError
from ghist_core.pipeline.grid import build_grid_pyramid, build_grid_summary, pick_grid_level, read_grid, write_grid


def _cells(n: int = 500, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(
        X=rng.random((n, 4)).astype(np.float32),
        obs=pd.DataFrame({"cell_type": rng.choice(["T", "B", "Malignant"], n)}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=["ERBB2", "ESR1", "CD3E", "KRT5"]),
    )
    a.obsm["spatial"] = rng.random((n, 2)) * 300.0
    return a


def test_square_means_and_counts_match_direct_computation():
    a = _cells()
    g = build_grid_summary(a, 100.0)
    xy = a.obsm["spatial"]
    # Square (1, 2): cells with 100 <= x < 200 and 200 <= y < 300.
    inside = (xy[:, 0] >= 100) & (xy[:, 0] < 200) & (xy[:, 1] >= 200) & (xy[:, 1] < 300)
    row = g.obs.index.get_loc("1_2")
    np.testing.assert_allclose(g.X[row], a.X[inside].mean(axis=0), rtol=1e-5)
    assert g.obs["n_cells"].iloc[row] == inside.sum()
    assert g.obs["count_T"].iloc[row] == (a.obs["cell_type"][inside] == "T").sum()
    assert g.obs["n_cells"].sum() == a.n_obs
    assert g.obs.loc["1_2", "x_um"] == 150.0


def test_round_trip_and_level_choice(tmp_path):
    grids = build_grid_pyramid(_cells(), (25.0, 100.0))
    path = write_grid(tmp_path / "g.h5", grids)
    back = read_grid(path)
    assert set(back) == {25.0, 100.0}
    np.testing.assert_allclose(back[100.0].X, grids[100.0].X)
    assert list(back[25.0].var_names) == ["ERBB2", "ESR1", "CD3E", "KRT5"]
    assert pick_grid_level(back, max_points=10) == 100.0
    assert pick_grid_level(back, max_points=10**6) == 25.0


def test_empty_and_bad_size():
    empty = _cells()[:0].copy()
    assert build_grid_summary(empty, 50.0).n_obs == 0
    with pytest.raises(ModelInputError):
        build_grid_summary(_cells(), 0.0)


def test_block_by_block_accumulation_equals_the_whole_slide():
    """Blocks add up to the grid of the concatenated cells, squares cut by block edges included."""
    from ghist_core.pipeline.grid import GridAccumulator

    a = _cells(2000, seed=3)
    xy = a.obsm["spatial"]
    edges = [0, 70, 150, 230, 301]  # block edges that cut 25/50/100 µm squares
    acc = GridAccumulator((25.0, 50.0, 100.0))
    for x0, x1 in zip(edges[:-1], edges[1:]):
        block = a[(xy[:, 0] >= x0) & (xy[:, 0] < x1)].copy()
        block.obs["cell_type"] = pd.Categorical(block.obs["cell_type"])
        acc.add(block)
    acc.add(a[:0].copy())  # an empty block changes nothing
    whole = build_grid_pyramid(a, (25.0, 50.0, 100.0))
    for size, g in acc.finish().items():
        w = whole[size]
        assert list(g.obs_names) == list(w.obs_names)
        np.testing.assert_allclose(g.X, w.X, rtol=1e-6)
        for col in ["n_cells", "count_T", "count_B", "count_Malignant", "x_um", "y_um"]:
            assert (g.obs[col].to_numpy() == w.obs[col].to_numpy()).all(), col
        assert g.obs["n_cells"].sum() == a.n_obs
