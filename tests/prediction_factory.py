"""A synthetic but well-formed GHIST prediction (AnnData) for figure and page tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ghist_core import _keys as K
from ghist_core.viz import palette


def synthetic_prediction(n: int = 3000, genes=("ERBB2", "ESR1", "CD3E"), seed: int = 0) -> ad.AnnData:
    """A prediction following the pipeline's AnnData contract (cells × genes, µm coordinates)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [1000.0, 800.0], size=(n, 2))
    types = np.array(palette.CELL_TYPES)[rng.integers(0, 9, n)]
    X = rng.gamma(2.0, 1.0, size=(n, len(genes))).astype(np.float32)
    X[:, 0] = xy[:, 0] / 100.0  # ERBB2 rises left to right: a map must show it
    obs = pd.DataFrame({"cell_id": np.arange(n, dtype=np.int64), "cell_type": types,
                        "area_um2": rng.uniform(10, 80, n), "perimeter_um": rng.uniform(10, 40, n),
                        "eccentricity": rng.uniform(0, 1, n), "solidity": rng.uniform(0.7, 1, n)})
    nbhd = np.stack([rng.dirichlet(np.ones(9), n)[:, 0] for _ in palette.CELL_TYPES], axis=1)
    obs.index = obs.index.astype(str)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
    a.obsm[K.OBSM_SPATIAL] = xy
    K.set_obsm_matrix(a, K.OBSM_NEIGHBOURHOOD, nbhd, palette.CELL_TYPES)
    a.uns["ghist"] = {"expression_units": "log1p counts"}
    return a
