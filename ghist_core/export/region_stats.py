"""A slide's cell-type composition (and observed neighbourhood) restricted to QuPath regions.

The cells counted are those whose centroid lies inside a region (:func:`region_mask`). The
observed neighbourhood of a cell inside counts its neighbours wherever they lie (a cell at
the region's edge keeps its real neighbours), and is averaged over the cells inside only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ghist_core._keys import OBS_CELL_TYPE
from ghist_core.analysis.neighbourhoods import NeighbourhoodMatrix, observed_neighbourhood
from ghist_core.errors import RegionFileError
from ghist_core.export.regions import Region, read_regions, region_mask

__all__ = ["RegionComposition", "region_composition", "INSIDE", "WHOLE_SLIDE"]

#: row names of :meth:`RegionComposition.counts_table`
INSIDE, WHOLE_SLIDE = "inside the region", "whole slide"


@dataclass
class RegionComposition:
    """Cells per type inside the regions of one slide, beside the whole slide's.

    Attributes
    ----------
    regions : the regions read from the file.
    mask : boolean over the slide's cells, True inside a region.
    counts : cells per type inside (every type of the slide, 0 where none).
    slide_counts : cells per type on the whole slide.
    neighbourhood : observed neighbourhood averaged over the cells inside (None without a radius).
    """

    regions: list[Region]
    mask: np.ndarray
    counts: pd.Series
    slide_counts: pd.Series
    neighbourhood: NeighbourhoodMatrix | None = None

    @property
    def n_inside(self) -> int:
        return int(self.mask.sum())

    @property
    def n_cells(self) -> int:
        return int(len(self.mask))

    def counts_table(self) -> pd.DataFrame:
        """Two rows (inside the region, whole slide) × cell types: counts, ready for a stacked bar."""
        t = pd.DataFrame([self.counts, self.slide_counts], index=[INSIDE, WHOLE_SLIDE]).fillna(0).astype(int)
        t.index.name = "cells"
        return t

    def describe(self) -> str:
        names = sorted({r.classification or r.name for r in self.regions if r.classification or r.name})
        which = f" ({', '.join(names[:5])}{' …' if len(names) > 5 else ''})" if names else ""
        n_poly = sum(len(r.polygons) for r in self.regions)
        return (f"{self.n_inside:,} of the slide's {self.n_cells:,} cells "
                f"({100 * self.n_inside / max(self.n_cells, 1):.1f} %) have their centre inside "
                f"{len(self.regions)} region(s){which}, {n_poly} polygon(s).")

    def __repr__(self) -> str:
        return f"<RegionComposition {self.n_inside} of {self.n_cells} cells inside {len(self.regions)} region(s)>"


def region_composition(adata: Any, source: str | os.PathLike | bytes | Sequence[Region], *,
                       mpp: float | None = None, classification: str | Sequence[str] | None = None,
                       radius_um: float | None = None) -> RegionComposition:
    """Composition of the cells inside the regions of ``source`` (a QuPath GeoJSON file, its
    bytes, or regions already read) and, with ``radius_um``, their observed neighbourhood.

    Raises ``RegionFileError`` for an unusable file and when no cell lies inside (regions
    drawn on another slide, or outside the predicted area)."""
    regions = list(source) if isinstance(source, (list, tuple)) else read_regions(source, classification=classification)
    mask = region_mask(adata, regions, mpp=mpp)
    if OBS_CELL_TYPE not in adata.obs:
        raise RegionFileError("This prediction has no cell types to count inside the region.")
    labels = adata.obs[OBS_CELL_TYPE].astype(str).to_numpy()
    types = sorted(set(labels))
    slide_counts = pd.Series(labels).value_counts().reindex(types, fill_value=0).astype(int)
    if not mask.any():
        raise RegionFileError(
            f"None of the slide's {len(mask):,} cells lies inside the {len(regions)} region(s) of the file. "
            "Were they drawn on this slide (QuPath coordinates are the slide's full-resolution pixels)?")
    counts = pd.Series(labels[mask]).value_counts().reindex(types, fill_value=0).astype(int)
    nbhd = None
    if radius_um is not None:
        frac = observed_neighbourhood(adata, float(radius_um))  # neighbours counted everywhere
        ok = mask & frac.notna().all(axis=1).to_numpy()
        matrix = frac[ok].groupby(labels[ok], sort=True).mean() * 100
        matrix.index.name, matrix.columns.name = "centre type", "neighbour type"
        n_cells = pd.Series(labels[ok]).value_counts().reindex(matrix.index).astype(int)
        nbhd = NeighbourhoodMatrix(matrix=matrix, kind="observed", radius_um=float(radius_um), n_cells=n_cells,
                                   n_isolated=int((mask & ~ok).sum()))
    return RegionComposition(regions, mask, counts, slide_counts, nbhd)
