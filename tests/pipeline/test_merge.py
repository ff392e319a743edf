"""Block checkpoints merged on disk equal the in-memory concatenation, old-layout blocks included."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core import _keys as K
from ghist_core.pipeline.grid import build_grid_pyramid
from ghist_core.pipeline.merge import summarise_blocks, write_merged_h5ad

GENES = ["ERBB2", "ESR1", "CD3E"]


def _block(index: int, n: int, types: list[str], rng, *, legacy: bool = False, present: list[str] | None = None) -> ad.AnnData:
    ids = index * 1_000_000 + np.arange(n)
    present = present or types
    obs = pd.DataFrame({"cell_id": ids, "cell_type": pd.Categorical(rng.choice(present, n), categories=present),
                        "area_um2": rng.uniform(10, 60, n)}, index=[f"cell_{i}" for i in range(n)])  # block-local names
    a = ad.AnnData(X=rng.random((n, len(GENES))).astype(np.float32), obs=obs, var=pd.DataFrame(index=GENES))
    a.obsm["spatial"] = rng.uniform(0, 300, (n, 2)) + [index * 300, 0]
    probs = rng.dirichlet(np.ones(len(types)), n).astype(np.float32)
    if legacy:  # a checkpoint written before the obsm layout: prob_<type> columns in obs
        for j, t in enumerate(types):
            a.obs[f"prob_{t}"] = probs[:, j]
    else:
        K.set_obsm_matrix(a, K.OBSM_TYPE_PROBABILITIES, probs, types)
    return a


def test_merged_file_equals_in_memory_concat(tmp_path: Path):
    rng = np.random.default_rng(0)
    types = ["epithelial", "immune", "stromal"]
    blocks = [_block(0, 40, types, rng), _block(1, 0, types, rng), _block(2, 55, types, rng, legacy=True),
              _block(3, 30, types, rng, present=types[:2])]  # a block whose categories lack a type
    paths = []
    for i, b in enumerate(blocks):
        p = tmp_path / f"block_{i:06d}.h5ad"
        b.write_h5ad(p)
        paths.append(p)
    summary = summarise_blocks(paths, (50.0, 100.0))
    assert summary.n_cells == 125 and len(summary.paths) == 3  # the empty block contributes nothing
    out = tmp_path / "merged.h5ad"
    write_merged_h5ad(summary, out, {"ghist": {"run_id": 7}})
    got = ad.read_h5ad(out)

    expected_parts = [K.upgrade_layout(ad.read_h5ad(p)) for p in paths]  # (already rewritten in the new layout)
    expected = ad.concat([e for e in expected_parts if e.n_obs], join="outer", merge="first", index_unique=None)
    assert list(got.obs_names) == K.obs_names_for(expected.obs["cell_id"].to_numpy())  # unique, slide-wide
    np.testing.assert_array_equal(got.X, expected.X)
    for key in expected.obsm:
        np.testing.assert_array_equal(got.obsm[key], expected.obsm[key])
    assert list(got.obs["cell_type"].cat.categories) == types
    assert (got.obs["cell_type"].astype(str).to_numpy() == expected.obs["cell_type"].astype(str).to_numpy()).all()
    assert list(got.var_names) == GENES and got.uns["ghist"]["run_id"] == 7
    assert list(got.uns["obsm_columns"][K.OBSM_TYPE_PROBABILITIES]) == types
    # the grid, summed block by block, equals the grid of the merged cells
    whole = build_grid_pyramid(got, (50.0, 100.0))
    for size, g in summary.grids.items():
        assert list(g.obs_names) == list(whole[size].obs_names)
        np.testing.assert_allclose(g.X, whole[size].X, rtol=1e-6)
    assert summary.median_area_um2 == float(np.median(got.obs["area_um2"]))


def test_no_cells_anywhere_gives_an_empty_result(tmp_path: Path):
    rng = np.random.default_rng(1)
    p = tmp_path / "block_000000.h5ad"
    _block(0, 0, ["a"], rng).write_h5ad(p)
    summary = summarise_blocks([p], (50.0,))
    write_merged_h5ad(summary, tmp_path / "m.h5ad", {"ghist": {"run_id": 1}})
    got = ad.read_h5ad(tmp_path / "m.h5ad")
    assert got.n_obs == 0 and got.uns["ghist"]["run_id"] == 1 and summary.grids[50.0].n_obs == 0


def test_blocks_of_two_versions_merge_on_what_they_share(tmp_path: Path):
    """A run resumed across versions: an older block without the nucleus outlines must not stop the merge;
    the result keeps the obsm matrices every block has. Blocks of different genes are refused."""
    from ghist_core.errors import StoreError

    rng = np.random.default_rng(2)
    types = ["a", "b"]
    old, new = _block(0, 20, types, rng), _block(1, 25, types, rng)
    K.set_obsm_matrix(new, K.OBSM_NUCLEUS_RAYS, rng.random((25, 16)).astype(np.float32), [f"ray_{i}" for i in range(16)])
    paths = [tmp_path / "block_000000.h5ad", tmp_path / "block_000001.h5ad"]
    old.write_h5ad(paths[0])
    new.write_h5ad(paths[1])
    summary = summarise_blocks(paths, (50.0,))
    write_merged_h5ad(summary, tmp_path / "m.h5ad", {})
    got = ad.read_h5ad(tmp_path / "m.h5ad")
    assert got.n_obs == 45 and K.OBSM_NUCLEUS_RAYS not in got.obsm and K.OBSM_TYPE_PROBABILITIES in got.obsm
    other = _block(2, 5, types, rng)
    other = ad.AnnData(X=other.X[:, :2], obs=other.obs, var=pd.DataFrame(index=GENES[:2]), obsm=dict(other.obsm))
    other.write_h5ad(tmp_path / "block_000002.h5ad")
    with pytest.raises(StoreError):
        summarise_blocks([*paths, tmp_path / "block_000002.h5ad"], (50.0,))


def test_obs_columns_every_block_has_are_carried_and_others_dropped(tmp_path: Path):
    """An optional per-cell column (``expression_uncertainty``) is copied when every block has it, and
    dropped (never half empty) when a resumed run's blocks disagree; the grid averages it per square."""
    rng = np.random.default_rng(3)
    unc = K.OBS_EXPRESSION_UNCERTAINTY
    blocks = [_block(i, n, ["a", "b"], rng) for i, n in enumerate((30, 0, 25))]
    for b in blocks:
        b.obs[unc] = rng.uniform(0, 1, b.n_obs).astype(np.float32)
    paths = [tmp_path / f"block_{i:06d}.h5ad" for i in range(3)]
    for b, p in zip(blocks, paths):
        b.write_h5ad(p)
    summary = summarise_blocks(paths, (100.0,))
    write_merged_h5ad(summary, tmp_path / "m.h5ad", {})
    got = ad.read_h5ad(tmp_path / "m.h5ad")
    want = np.concatenate([blocks[0].obs[unc], blocks[2].obs[unc]])
    assert got.obs[unc].dtype == np.float32
    np.testing.assert_array_equal(got.obs[unc].to_numpy(), want)
    g = summary.grids[100.0]
    assert np.average(g.obs[unc], weights=g.obs["n_cells"]) == pytest.approx(float(want.mean()), rel=1e-5)
    blocks[2].obs = blocks[2].obs.drop(columns=[unc])
    blocks[2].write_h5ad(paths[2])
    summary = summarise_blocks(paths, (100.0,))
    write_merged_h5ad(summary, tmp_path / "m2.h5ad", {})
    got = ad.read_h5ad(tmp_path / "m2.h5ad")
    assert unc not in got.obs and {"cell_id", "cell_type", "area_um2"} <= set(got.obs.columns)
    assert unc not in summary.grids[100.0].obs


def test_the_rescaled_share_is_counted_only_when_every_block_has_the_column(tmp_path: Path):
    """``obs["nucleus_scale"]``: counted over the blocks when all have it; a run whose older blocks
    lack it merges without the column and without a share (None), never a share of part of it."""
    from ghist_core.pipeline.blocks import nucleus_scale_record

    rng = np.random.default_rng(4)
    blocks = [_block(i, n, ["a", "b"], rng) for i, n in enumerate((30, 20))]
    blocks[0].obs[K.OBS_NUCLEUS_SCALE] = np.where(np.arange(30) < 12, 2 / 3, 1.0).astype(np.float32)
    blocks[1].obs[K.OBS_NUCLEUS_SCALE] = np.ones(20, np.float32)
    paths = [tmp_path / f"block_{i:06d}.h5ad" for i in range(2)]
    for b, p in zip(blocks, paths):
        b.write_h5ad(p)
    summary = summarise_blocks(paths, (100.0,))
    assert summary.n_rescaled == 12
    assert nucleus_scale_record("auto", summary)["cells_rescaled_fraction"] == pytest.approx(12 / 50, abs=1e-4)
    del blocks[1].obs[K.OBS_NUCLEUS_SCALE]  # a block made before the column
    blocks[1].write_h5ad(paths[1])
    summary = summarise_blocks(paths, (100.0,))
    assert summary.n_rescaled is None and K.OBS_NUCLEUS_SCALE not in summary.obs_keys
    record = nucleus_scale_record("auto", summary)
    assert "cells_rescaled_fraction" not in record and record["setting"] == "auto"
