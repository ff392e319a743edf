"""Every AnnData key GHIST writes or reads, and accessors that read both result layouts.

One owner for the result contract: modules and pages import these names instead of
spelling ``"prob_"`` or ``"spatial"`` themselves, so a key changes in one place.

Layout (cells × genes)
----------------------
``X``                                   predicted expression (units in ``uns["ghist"]["expression_units"]``)
``obs["cell_id"]``, ``obs["cell_type"]``  id unique per slide; most probable type (categorical)
``obs["expression_uncertainty"]``       optional (``uncertainty=True`` and a model with ensemble members):
                                        mean over the genes of the SD across the members of log1p(expression)
``obsm["spatial"]``                     centroid ``(x_um, y_um)`` in µm on the slide
``obsm["cell_type_probabilities"]``     cells × types, rows sum to 1
``obsm["neighbourhood_composition"]``   cells × types, fraction of each type within ``nbhd_radius_um``
``obsm["nucleus_rays_um"]``             cells × 16 star contour (µm from the centroid at angles 2πk/16)
``uns["obsm_columns"][<obsm key>]``     the column names of each named obsm matrix
``uns["ghist"]``                        provenance: model card, weights/slide sha256, params, timings;
                                        ``uns["ghist"]["uncertainty"]`` when it was asked for: what the
                                        column holds, or why it is absent
``uns["spatial"][library_id]``          scanpy/squidpy image: ``images["hires"]`` (uint8 RGB) and
                                        ``scalefactors`` (``tissue_hires_scalef`` = hires px per µm,
                                        ``spot_diameter_fullres`` in µm)

Results written before this layout kept one ``obs`` column per type (``prob_<type>``,
``nbhd_<type>``); the accessors read those too and :func:`upgrade_layout` converts them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "OBS_CELL_ID", "OBS_CELL_TYPE", "OBS_N_CONTEXT", "OBS_NAME_PREFIX", "OBS_EXPRESSION_UNCERTAINTY",
    "OBS_MAP_LAYERS",
    "OBSM_SPATIAL", "OBSM_TYPE_PROBABILITIES", "OBSM_NEIGHBOURHOOD", "OBSM_NUCLEUS_RAYS",
    "UNS_GHIST", "UNS_SPATIAL", "UNS_OBSM_COLUMNS", "SPATIAL_IMAGE", "SCALEF_HIRES", "SPOT_DIAMETER",
    "GHIST_EXPRESSION_UNITS", "GHIST_SLIDE_SHA256", "GHIST_WEIGHTS_SHA256", "GHIST_MODEL_CARD",
    "GHIST_PARAMS", "GHIST_TIMINGS", "GHIST_UNCERTAINTY", "GHIST_NUCLEUS_SCALE", "GHIST_STAIN_CHECK", "OBS_NUCLEUS_SCALE", "UNS_GRID", "GRID_COUNT_PREFIX", "LEGACY_PROB_PREFIX", "LEGACY_NBHD_PREFIX",
    "obs_names_for", "obsm_columns", "set_obsm_matrix", "type_probabilities", "neighbourhood_composition",
    "nucleus_rays", "set_spatial_image", "upgrade_layout",
]

# obs
OBS_CELL_ID = "cell_id"
OBS_CELL_TYPE = "cell_type"
OBS_N_CONTEXT = "n_context_cells"
OBS_NAME_PREFIX = "cell_"  # obs_names are f"cell_{cell_id}"
#: per cell, how much the model's ensemble members (seeds) disagree: the mean over the genes of the
#: standard deviation across members of log1p(predicted expression); ≥ 0, 0 where they agree
OBS_EXPRESSION_UNCERTAINTY = "expression_uncertainty"
OBS_NUCLEUS_SCALE = "nucleus_scale"  # per cell: the factor its nucleus was segmented at (1: as stated)
#: obs columns a map may colour cells by instead of a gene (the grid summary averages them per square)
OBS_MAP_LAYERS: tuple[str, ...] = (OBS_EXPRESSION_UNCERTAINTY,)

# obsm
OBSM_SPATIAL = "spatial"
OBSM_TYPE_PROBABILITIES = "cell_type_probabilities"
OBSM_NEIGHBOURHOOD = "neighbourhood_composition"
OBSM_NUCLEUS_RAYS = "nucleus_rays_um"

# uns
UNS_GHIST = "ghist"
UNS_SPATIAL = "spatial"
UNS_OBSM_COLUMNS = "obsm_columns"
SPATIAL_IMAGE = "hires"
SCALEF_HIRES = "tissue_hires_scalef"
SPOT_DIAMETER = "spot_diameter_fullres"

# uns["ghist"]
GHIST_EXPRESSION_UNITS = "expression_units"
GHIST_SLIDE_SHA256 = "slide_sha256"
GHIST_WEIGHTS_SHA256 = "weights_sha256"
GHIST_MODEL_CARD = "model_card"
GHIST_PARAMS = "params"
GHIST_TIMINGS = "timings"
GHIST_UNCERTAINTY = "uncertainty"  # what obs["expression_uncertainty"] holds, or why it is absent
GHIST_NUCLEUS_SCALE = "nucleus_scale"  # the scale check's setting, rule and share of cells it moved
GHIST_STAIN_CHECK = "stain_check"  # the slide's stain against the range the segmenter was tested on

# grid summaries (pipeline.grid): one row per square
UNS_GRID = "grid"                 # {"size_um": side of a square}
GRID_COUNT_PREFIX = "count_"      # obs["count_<type>"]: cells of that type in the square

# the layout before obsm matrices: one obs column per type
LEGACY_PROB_PREFIX = "prob_"
LEGACY_NBHD_PREFIX = "nbhd_"
_LEGACY = {OBSM_TYPE_PROBABILITIES: LEGACY_PROB_PREFIX, OBSM_NEIGHBOURHOOD: LEGACY_NBHD_PREFIX}


def obs_names_for(cell_ids: np.ndarray) -> list[str]:
    """``cell_<id>`` for each cell id (the obs_names of every prediction)."""
    return list(np.char.add(OBS_NAME_PREFIX, np.asarray(cell_ids, dtype=np.int64).astype(str)).astype(object))


def obsm_columns(adata: Any, key: str) -> list[str]:
    """Column names of ``obsm[key]`` from ``uns["obsm_columns"]``.

    Falls back to the ``cell_type`` categories when they match the width (e.g. after a
    concat that dropped ``uns``), else to ``"0".."k-1"``.
    """
    k = np.asarray(adata.obsm[key]).shape[1]
    names = adata.uns.get(UNS_OBSM_COLUMNS, {}).get(key) if hasattr(adata.uns, "get") else None
    if names is not None and len(names) == k:
        return [str(c) for c in names]
    if OBS_CELL_TYPE in adata.obs and hasattr(adata.obs[OBS_CELL_TYPE], "cat"):
        cats = list(adata.obs[OBS_CELL_TYPE].cat.categories)
        if len(cats) == k:
            return [str(c) for c in cats]
    return [str(j) for j in range(k)]


def set_obsm_matrix(adata: Any, key: str, values: np.ndarray, columns: Sequence[str]) -> None:
    """Write ``obsm[key]`` and record its column names in ``uns["obsm_columns"]`` (in place)."""
    values = np.asarray(values)
    if values.shape != (adata.n_obs, len(columns)):
        raise ValueError(f"obsm[{key!r}] needs shape {(adata.n_obs, len(columns))}, got {values.shape}.")
    adata.obsm[key] = values
    cols = dict(adata.uns.get(UNS_OBSM_COLUMNS, {}))
    cols[key] = [str(c) for c in columns]
    adata.uns[UNS_OBSM_COLUMNS] = cols


def _matrix(adata: Any, key: str) -> pd.DataFrame:
    if key in adata.obsm:
        return pd.DataFrame(np.asarray(adata.obsm[key]), index=adata.obs_names, columns=obsm_columns(adata, key))
    prefix = _LEGACY[key]
    legacy = [c for c in adata.obs.columns if str(c).startswith(prefix)]
    out = adata.obs[legacy].astype(np.float32) if legacy else pd.DataFrame(index=adata.obs_names)
    out.columns = [str(c)[len(prefix):] for c in legacy]
    return out


def type_probabilities(adata: Any) -> pd.DataFrame:
    """Per-cell type probabilities (index = obs_names, columns = type names); no columns if absent."""
    return _matrix(adata, OBSM_TYPE_PROBABILITIES)


def neighbourhood_composition(adata: Any) -> pd.DataFrame:
    """Per-cell neighbourhood fraction of each type (index = obs_names, columns = type names); no columns if absent."""
    return _matrix(adata, OBSM_NEIGHBOURHOOD)


def nucleus_rays(adata: Any) -> np.ndarray | None:
    """cells × 16 star contour in µm (``obsm["nucleus_rays_um"]``), or ``None`` when not stored."""
    return np.asarray(adata.obsm[OBSM_NUCLEUS_RAYS], dtype=np.float64) if OBSM_NUCLEUS_RAYS in adata.obsm else None


def set_spatial_image(adata: Any, library_id: str, hires: np.ndarray, hires_px_per_um: float,
                      spot_diameter_um: float) -> None:
    """Attach an H&E overview so ``sc.pl.spatial(adata, img_key="hires", library_id=...)`` overlays it.

    ``obsm["spatial"]`` stays in µm, so scanpy's "full resolution" unit is the µm and
    ``tissue_hires_scalef`` is the overview's pixels per µm.
    """
    adata.uns[UNS_SPATIAL] = {str(library_id): {
        "images": {SPATIAL_IMAGE: np.ascontiguousarray(np.asarray(hires, dtype=np.uint8)[..., :3])},
        "scalefactors": {SCALEF_HIRES: float(hires_px_per_um), SPOT_DIAMETER: float(spot_diameter_um)},
        "metadata": {"units": "um"},
    }}


def upgrade_layout(adata: Any) -> Any:
    """Move ``prob_<type>`` / ``nbhd_<type>`` obs columns into their obsm matrices (in place; returns ``adata``).

    A result already in the current layout is returned unchanged.
    """
    for key, prefix in _LEGACY.items():
        legacy = [c for c in adata.obs.columns if str(c).startswith(prefix)]
        if not legacy or key in adata.obsm:
            continue
        values = adata.obs[legacy].to_numpy(np.float32)
        adata.obs = adata.obs.drop(columns=legacy)
        set_obsm_matrix(adata, key, values, [str(c)[len(prefix):] for c in legacy])
    return adata
