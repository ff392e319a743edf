"""Multi-resolution grid summaries of a predicted slide.

A slide of a million cells cannot be sent to a browser as points; a grid of
squares (mean expression, cell-type counts) at a few sizes can, and the viewer
picks the finest level that stays under its point budget.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ghist_core import _keys as K
from ghist_core.io.atomic import atomic_path
from ghist_core.errors import ModelInputError

#: Square sizes (µm) written for every slide, fine to coarse.
DEFAULT_GRID_SIZES_UM: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0, 400.0)


def build_grid_summary(adata: ad.AnnData, size_um: float, *, type_key: str = K.OBS_CELL_TYPE) -> ad.AnnData:
    """Mean expression and cell-type counts per ``size_um`` square (vectorised).

    Returns an AnnData with one row per non-empty square: ``X`` = mean expression
    of its cells, ``obs`` = ``gx, gy`` (grid index), ``x_um, y_um`` (square
    centre), ``n_cells`` and ``count_<type>`` per cell type; ``obsm["spatial"]``
    = square centres; ``uns["grid"]`` = ``{"size_um": size_um}``.
    """
    if size_um <= 0 or not np.isfinite(size_um):
        raise ModelInputError(f"Grid square size must be a positive number of µm, got {size_um}.")
    xy = np.asarray(adata.obsm[K.OBSM_SPATIAL], dtype=np.float64)
    n_genes = adata.n_vars
    types = (
        pd.Categorical(adata.obs[type_key]) if type_key in adata.obs and adata.n_obs else pd.Categorical([])
    )
    if adata.n_obs == 0:
        obs = pd.DataFrame({"gx": [], "gy": [], "x_um": [], "y_um": [], "n_cells": []})
        out = ad.AnnData(X=np.zeros((0, n_genes), np.float32), obs=obs, var=adata.var[[]].copy())
        out.obsm[K.OBSM_SPATIAL] = np.zeros((0, 2))
        out.uns[K.UNS_GRID] = {"size_um": float(size_um)}
        return out
    gx = np.floor(xy[:, 0] / size_um).astype(np.int64)
    gy = np.floor(xy[:, 1] / size_um).astype(np.int64)
    keys = np.stack([gx, gy], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    n_sq = len(uniq)
    # Sparse indicator (squares x cells) turns every per-square sum into one matmul.
    member = sp.csr_matrix(
        (np.ones(adata.n_obs, np.float64), (inverse, np.arange(adata.n_obs))), shape=(n_sq, adata.n_obs)
    )
    n_cells = np.asarray(member.sum(axis=1)).ravel()
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    means = (member @ X.astype(np.float64)) / n_cells[:, None]
    obs = pd.DataFrame(
        {
            "gx": uniq[:, 0],
            "gy": uniq[:, 1],
            "x_um": (uniq[:, 0] + 0.5) * size_um,
            "y_um": (uniq[:, 1] + 0.5) * size_um,
            "n_cells": n_cells.astype(np.int64),
        }
    )
    if len(types.categories):
        onehot = sp.csr_matrix(
            (np.ones(adata.n_obs), (np.arange(adata.n_obs), types.codes)),
            shape=(adata.n_obs, len(types.categories)),
        )
        counts = np.asarray((member @ onehot).todense()).astype(np.int64)
        for j, name in enumerate(types.categories):
            obs[f"{K.GRID_COUNT_PREFIX}{name}"] = counts[:, j]
    obs.index = [f"{a}_{b}" for a, b in uniq]
    out = ad.AnnData(X=means.astype(np.float32), obs=obs, var=adata.var[[]].copy())
    out.obsm[K.OBSM_SPATIAL] = obs[["x_um", "y_um"]].to_numpy()
    out.uns[K.UNS_GRID] = {"size_um": float(size_um)}
    return out


def build_grid_pyramid(
    adata: ad.AnnData, sizes_um: tuple[float, ...] = DEFAULT_GRID_SIZES_UM
) -> dict[float, ad.AnnData]:
    return {float(s): build_grid_summary(adata, s) for s in sizes_um}


def write_grid(path: str | Path, grids: dict[float, ad.AnnData]) -> Path:
    """One HDF5 file, one ``.h5ad``-style group per size, written atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["sizes_um"] = np.array(sorted(grids), dtype=np.float64)
            for size, g in grids.items():
                grp = fh.create_group(f"size_{size:g}")
                grp.create_dataset("X", data=np.asarray(g.X, np.float32), compression="gzip")
                grp.create_dataset("var_names", data=np.array(g.var_names, dtype="S"))
                for col in g.obs.columns:
                    grp.create_dataset(f"obs/{col}", data=g.obs[col].to_numpy())
    return Path(path)


def read_grid(path: str | Path) -> dict[float, ad.AnnData]:
    grids: dict[float, ad.AnnData] = {}
    with h5py.File(path, "r") as fh:
        for size in fh.attrs["sizes_um"]:
            grp = fh[f"size_{size:g}"]
            obs = pd.DataFrame({k: grp[f"obs/{k}"][()] for k in grp["obs"].keys()}) if "obs" in grp else pd.DataFrame()
            obs.index = obs.index.astype(str)
            var = pd.DataFrame(index=[v.decode() for v in grp["var_names"][()]])
            g = ad.AnnData(X=grp["X"][()], obs=obs, var=var)
            if len(obs):
                g.obsm[K.OBSM_SPATIAL] = obs[["x_um", "y_um"]].to_numpy()
            g.uns[K.UNS_GRID] = {"size_um": float(size)}
            grids[float(size)] = g
    return grids


def pick_grid_level(grids: dict[float, ad.AnnData], max_points: int = 200_000) -> float:
    """The finest square size whose number of squares stays within ``max_points``."""
    for size in sorted(grids):
        if grids[size].n_obs <= max_points:
            return size
    return max(grids)
