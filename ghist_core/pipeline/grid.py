"""Multi-resolution grid summaries of a predicted slide.

A slide of a million cells cannot be sent to a browser as points; a grid of
squares (mean expression, cell-type counts, the mean of each map layer such as
``expression_uncertainty``) at a few sizes can, and the viewer picks the finest
level that stays under its point budget.
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


class GridAccumulator:
    """Grid summaries built block by block: per-square sums are kept, never the cells.

    Why: a gigapixel slide has millions of cells; the grid needs only sums per square, so memory
    grows with the number of squares (the tissue area at the grid's size), not with the cells, and
    the pipeline adds each block as it reads it back. Squares cut by block edges are summed at the end.
    """

    def __init__(self, sizes_um: tuple[float, ...], *, type_key: str = K.OBS_CELL_TYPE) -> None:
        for size in sizes_um:
            if size <= 0 or not np.isfinite(size):
                raise ModelInputError(f"Grid square size must be a positive number of µm, got {size}.")
        self.sizes = tuple(float(s) for s in sizes_um)
        self.type_key = type_key
        self.var: pd.DataFrame | None = None
        self.types: list[str] = []  # every block's categories, in order of first appearance
        # per size, per block: squares, expression sums, cell counts, type counts, type names, map-layer sums
        self._parts: dict[float, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str],
                                            dict[str, np.ndarray]]]] = {s: [] for s in self.sizes}

    def add(self, adata: ad.AnnData) -> None:
        """Add one block's cells (``obsm["spatial"]`` in µm, ``X`` the expression)."""
        if self.var is None or (self.var.shape[0] == 0 and adata.n_vars):  # the genes of the first block with any
            self.var = adata.var[[]].copy()
        if adata.n_obs == 0:
            return
        xy = np.asarray(adata.obsm[K.OBSM_SPATIAL], dtype=np.float64)
        X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        X = X.astype(np.float32, copy=False)  # sums of a block's few cells per square: float32 is exact enough
        if self.type_key in adata.obs:
            types = pd.Categorical(adata.obs[self.type_key])
            names = [str(c) for c in types.categories]
            self.types += [t for t in names if t not in self.types]
            onehot = sp.csr_matrix((np.ones(adata.n_obs), (np.arange(adata.n_obs), types.codes)),
                                   shape=(adata.n_obs, len(names))) if names else None
        else:
            names, onehot = [], None
        layers = {c: adata.obs[c].to_numpy(np.float64) for c in K.OBS_MAP_LAYERS if c in adata.obs}
        for size in self.sizes:
            keys = np.floor(xy / size).astype(np.int64)
            uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
            member = sp.csr_matrix((np.ones(adata.n_obs, np.float32), (inverse.ravel(), np.arange(adata.n_obs))),
                                   shape=(len(uniq), adata.n_obs))
            counts = (np.asarray((member @ onehot).todense(), dtype=np.int64) if onehot is not None
                      else np.zeros((len(uniq), 0), np.int64))
            self._parts[size].append((uniq, member @ X, np.asarray(member.sum(axis=1)).ravel(), counts, names,
                                      {c: member @ v for c, v in layers.items()}))

    def finish(self) -> dict[float, ad.AnnData]:
        """One AnnData per size: ``X`` = mean expression per non-empty square, ``obs`` = ``gx, gy``,
        ``x_um, y_um`` (square centre), ``n_cells``, ``count_<type>``, the mean of each map layer
        (:data:`ghist_core._keys.OBS_MAP_LAYERS`) every block had; ``uns["grid"]["size_um"]``."""
        var = self.var if self.var is not None else pd.DataFrame(index=pd.Index([], dtype=str))
        out = {}
        for size in self.sizes:  # one size at a time, its block sums freed as soon as it is done
            out[size] = self._finish_size(size, var)
            self._parts[size] = []
        return out

    def _finish_size(self, size: float, var: pd.DataFrame) -> ad.AnnData:
        parts = self._parts[size]
        n_genes = var.shape[0]
        if not parts:
            obs = pd.DataFrame({"gx": [], "gy": [], "x_um": [], "y_um": [], "n_cells": []})
            out = ad.AnnData(X=np.zeros((0, n_genes), np.float32), obs=obs, var=var.copy())
            out.obsm[K.OBSM_SPATIAL] = np.zeros((0, 2))
            out.uns[K.UNS_GRID] = {"size_um": float(size)}
            return out
        keys = np.concatenate([p[0] for p in parts])
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        combine = sp.csr_matrix((np.ones(len(keys), np.float32), (inverse, np.arange(len(keys)))),
                                shape=(len(uniq), len(keys)))
        n_cells = combine @ np.concatenate([p[2] for p in parts]).astype(np.float32)
        means = combine @ np.concatenate([p[1] for p in parts])
        means /= n_cells[:, None]
        col = {t: j for j, t in enumerate(self.types)}
        counts = np.zeros((len(keys), len(self.types)), np.int64)
        row = 0
        for _uniq, _sums, _n, c, names, _layers in parts:  # a loop over blocks, not cells
            if names:
                counts[row:row + len(c), [col[t] for t in names]] = c
            row += len(c)
        counts = np.asarray(combine @ counts).astype(np.int64) if len(self.types) else counts[:0]
        obs = pd.DataFrame({"gx": uniq[:, 0], "gy": uniq[:, 1], "x_um": (uniq[:, 0] + 0.5) * size,
                            "y_um": (uniq[:, 1] + 0.5) * size, "n_cells": np.rint(n_cells).astype(np.int64)})
        for j, name in enumerate(self.types):
            obs[f"{K.GRID_COUNT_PREFIX}{name}"] = counts[:, j]
        for c in K.OBS_MAP_LAYERS:
            if all(c in p[5] for p in parts):  # a layer only some blocks have would be a mean over part of a square
                obs[c] = (combine @ np.concatenate([p[5][c] for p in parts]) / n_cells).astype(np.float32)
        obs.index = [f"{a}_{b}" for a, b in uniq]
        out = ad.AnnData(X=means.astype(np.float32, copy=False), obs=obs, var=var.copy())
        out.obsm[K.OBSM_SPATIAL] = obs[["x_um", "y_um"]].to_numpy()
        out.uns[K.UNS_GRID] = {"size_um": float(size)}
        return out


def build_grid_summary(adata: ad.AnnData, size_um: float, *, type_key: str = K.OBS_CELL_TYPE) -> ad.AnnData:
    """Mean expression and cell-type counts per ``size_um`` square of one AnnData (see :class:`GridAccumulator`)."""
    acc = GridAccumulator((size_um,), type_key=type_key)
    acc.add(adata)
    return acc.finish()[float(size_um)]


def build_grid_pyramid(
    adata: ad.AnnData, sizes_um: tuple[float, ...] = DEFAULT_GRID_SIZES_UM
) -> dict[float, ad.AnnData]:
    acc = GridAccumulator(tuple(sizes_um))
    acc.add(adata)
    return acc.finish()


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
