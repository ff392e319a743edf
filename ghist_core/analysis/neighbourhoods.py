"""Neighbourhood composition per cell type: observed from the cell calls, or predicted.

Two different numbers share the name "neighbourhood", so each result says which it is:

- **observed** (:func:`observed_neighbourhood_by_type`): from the cell types the app called
  and the cell positions. For every cell, the fraction of each type among the *other* cells
  whose centroid lies within ``radius_um`` (inclusive) of its centroid; then averaged over
  the cells of each type. Isolated cells (no other cell within the radius) have no
  composition and are counted in ``n_isolated``. Pairs come from a k-d tree through
  :func:`ghist_core.model.pooling.radius_neighbour_mean` (the one neighbourhood definition
  of the package), so memory grows with the number of pairs, never with N².
- **predicted** (:func:`predicted_neighbourhood_by_type`): the model's neighbourhood head
  (``obsm["neighbourhood_composition"]``), an estimate from the histology of what the
  neighbourhood within the model's ``nbhd_radius_um`` looks like, averaged the same way.
  It can differ a lot from the observed one; it is not computed from the cell calls.

::

    obs = observed_neighbourhood_by_type(adata, radius_um=50)
    obs.matrix.loc["T", "T"]      # mean % of a T cell's neighbours within 50 µm that are T
    pred = predicted_neighbourhood_by_type(adata)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from ghist_core._keys import GHIST_PARAMS, OBS_CELL_TYPE, OBSM_SPATIAL, UNS_GHIST
from ghist_core.analysis.features import neighbourhood_by_type

__all__ = ["DEFAULT_RADIUS_UM", "NeighbourhoodMatrix", "observed_neighbourhood",
           "observed_neighbourhood_by_type", "predicted_neighbourhood_by_type", "model_radius_um"]

#: Default radius of the observed composition (µm): about 4–5 cell diameters, the radius
#: the bundled model's neighbourhood head is trained on.
DEFAULT_RADIUS_UM = 50.0


@dataclass
class NeighbourhoodMatrix:
    """Mean neighbourhood composition (%) of each neighbour type (columns) around the cells
    of each type (rows) on one slide.

    Attributes
    ----------
    matrix : centre type × neighbour type, mean % of neighbours (rows sum to 100).
    kind : ``"observed"`` (from the cell calls) or ``"predicted"`` (the model's head).
    radius_um : the neighbourhood radius in µm (None when a prediction did not record it).
    n_cells : per centre type, the cells averaged.
    n_isolated : observed only: cells left out because no other cell lies within the radius.
    """

    matrix: pd.DataFrame
    kind: Literal["observed", "predicted"]
    radius_um: float | None
    n_cells: pd.Series = field(default_factory=lambda: pd.Series(dtype=int))
    n_isolated: int = 0

    @property
    def title(self) -> str:
        r = f"within {self.radius_um:g} µm" if self.radius_um else "radius not recorded"
        if self.kind == "observed":
            return f"Observed: neighbours' cell types from the cell calls, {r}"
        return f"Predicted by the model's neighbourhood head, {r}"

    def describe(self) -> str:
        """How the numbers were made, in words (for a caption)."""
        r = f"{self.radius_um:g} µm" if self.radius_um else "the model's radius"
        if self.kind == "observed":
            iso = (f" {self.n_isolated} cell(s) with no other cell within {r} are left out."
                   if self.n_isolated else "")
            return (f"Observed: for each cell, the share of each cell type among the other cells "
                    f"whose centre lies within {r} (the cell itself excluded), averaged over the "
                    f"cells of each type (rows). Cell types are the app's calls.{iso}")
        return (f"Predicted: the model's neighbourhood head, its estimate from the histology of "
                f"the composition within {r}, averaged over the cells of each called type "
                "(rows). It is a prediction, not a count of the neighbouring cell calls.")

    def __repr__(self) -> str:
        return (f"<NeighbourhoodMatrix {self.kind}, radius={self.radius_um} µm, "
                f"{self.matrix.shape[0]} types, {int(self.n_cells.sum())} cells>")


def _types(adata: Any, cell_type_key: str) -> tuple[np.ndarray, list[str]]:
    s = adata.obs[cell_type_key]
    labels = s.astype(str).to_numpy()
    cats = ([str(c) for c in s.cat.categories] if isinstance(s.dtype, pd.CategoricalDtype)
            else sorted(set(labels)))
    return labels, sorted(set(cats))


def observed_neighbourhood(adata: Any, radius_um: float = DEFAULT_RADIUS_UM, *,
                           cell_type_key: str = OBS_CELL_TYPE) -> pd.DataFrame:
    """Per cell, the fraction of each cell type among the other cells within ``radius_um``.

    Returns cells × types (index = obs_names, columns = the types of ``obs[cell_type_key]``);
    rows of isolated cells (no other cell within the radius) are NaN.

    Raises
    ------
    ValueError
        no ``obsm["spatial"]`` or ``obs[cell_type_key]``, or a radius that is not positive.
    """
    from ghist_core.model.pooling import radius_neighbour_mean

    if not (np.isfinite(radius_um) and radius_um > 0):
        raise ValueError(f"The neighbourhood radius must be a positive number of µm, not {radius_um!r}.")
    if OBSM_SPATIAL not in adata.obsm or cell_type_key not in adata.obs:
        raise ValueError("This prediction has no cell positions or cell types to count neighbours from.")
    labels, types = _types(adata, cell_type_key)
    codes = pd.Categorical(labels, categories=types).codes
    onehot = np.zeros((len(labels), len(types)), dtype=np.float32)
    onehot[np.arange(len(labels)), codes] = 1.0
    xy = np.asarray(adata.obsm[OBSM_SPATIAL], dtype=np.float64)[:, :2]
    mean, count = radius_neighbour_mean(xy, onehot, float(radius_um))  # itself included
    others = count.astype(np.float64) - 1.0
    sums = mean.astype(np.float64) * count[:, None] - onehot  # the cell itself removed
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(others[:, None] > 0, np.clip(sums, 0, None) / others[:, None], np.nan)
    return pd.DataFrame(frac, index=adata.obs_names, columns=types)


def observed_neighbourhood_by_type(adata: Any, radius_um: float = DEFAULT_RADIUS_UM, *,
                                   cell_type_key: str = OBS_CELL_TYPE) -> NeighbourhoodMatrix:
    """Observed composition (%) around each cell type: :func:`observed_neighbourhood`
    averaged over the cells of each type that have at least one neighbour."""
    frac = observed_neighbourhood(adata, radius_um, cell_type_key=cell_type_key)
    labels = adata.obs[cell_type_key].astype(str).to_numpy()
    ok = frac.notna().all(axis=1).to_numpy()
    matrix = frac[ok].groupby(labels[ok], sort=True).mean() * 100
    matrix.index.name, matrix.columns.name = "centre type", "neighbour type"
    n_cells = pd.Series(labels[ok]).value_counts().reindex(matrix.index).astype(int)
    return NeighbourhoodMatrix(matrix=matrix, kind="observed", radius_um=float(radius_um),
                               n_cells=n_cells, n_isolated=int((~ok).sum()))


def model_radius_um(adata: Any) -> float | None:
    """The radius (µm) of the model's neighbourhood head recorded with a prediction, or None."""
    try:
        r = adata.uns[UNS_GHIST][GHIST_PARAMS]["nbhd_radius_um"]
        return float(r) if np.isfinite(float(r)) and float(r) > 0 else None
    except (KeyError, TypeError, ValueError):
        return None


def predicted_neighbourhood_by_type(adata: Any, *, cell_type_key: str = OBS_CELL_TYPE) -> NeighbourhoodMatrix:
    """The model's predicted composition (%) averaged over the cells of each called type.

    Raises ``ValueError`` when the prediction has no neighbourhood head output."""
    matrix = neighbourhood_by_type(adata, cell_type_key=cell_type_key)
    labels = adata.obs[cell_type_key].astype(str).to_numpy()
    matrix.index.name, matrix.columns.name = "centre type", "neighbour type"
    n_cells = pd.Series(labels).value_counts().reindex(matrix.index).astype(int)
    return NeighbourhoodMatrix(matrix=matrix, kind="predicted", radius_um=model_radius_um(adata),
                               n_cells=n_cells)
