"""Nuclei as QuPath detections (GeoJSON), to open the prediction in QuPath beside the slide.

QuPath reads a ``FeatureCollection`` whose features carry a ``Polygon`` in level-0 pixels,
``properties.objectType`` (``"detection"``), ``properties.classification`` (``name`` and an
RGB ``color``) and ``properties.measurements`` (a flat name → number mapping). Outlines are
the segmenter's star contour (16 rays in µm at angles 2πk/16 from +x towards +y) when the
prediction keeps it (``obsm["nucleus_rays_um"]``), else a 16-gon with the nucleus' area.
Coordinates are built for all cells at once with numpy; features are written in chunks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ghist_core import _keys as K
from ghist_core.export._common import (CHUNK_CELLS, cell_ids, cell_types, choose_genes, expression,
                                       measurement_columns, slide_mpp)
from ghist_core.io.atomic import atomic_path
from ghist_core.segmentation.features import N_RAYS
from ghist_core.segmentation.features import _ANGLES as _SEGMENTER_RAY_ANGLES
from ghist_core.viz.palette import cell_type_rgb

__all__ = ["N_RAYS", "RAY_ANGLES", "nucleus_polygons", "write_geojson", "OBJECT_TYPE"]

#: the angles of the star contour's rays (radians, from +x towards +y): the segmenter's own
RAY_ANGLES = _SEGMENTER_RAY_ANGLES
OBJECT_TYPE = "detection"
#: a ray never shorter than this many level-0 pixels, so every outline is a simple polygon with area
MIN_RAY_PX = 0.25
#: decimals of a pixel coordinate in the file (0.01 px: far below a pixel, keeps files small)
DECIMALS = 2
_FALLBACK_AREA_UM2 = 20.0


def _radii_um(adata: Any) -> np.ndarray:
    """cells × 16 ray lengths in µm: the stored star contour, else the radius of a regular
    16-gon whose area is ``area_um2`` (area = 8·r²·sin(π/8)), so areas survive the fallback."""
    rays = K.nucleus_rays(adata)
    if rays is not None and rays.shape == (adata.n_obs, N_RAYS):
        return np.nan_to_num(rays, nan=0.0)
    if "area_um2" in adata.obs:
        area = adata.obs["area_um2"].to_numpy(np.float64)
    else:
        area = np.full(adata.n_obs, np.nan)
    ok = np.isfinite(area) & (area > 0)
    fill = float(np.median(area[ok])) if ok.any() else _FALLBACK_AREA_UM2
    area = np.where(ok, area, fill)
    r = np.sqrt(area / (N_RAYS / 2 * np.sin(2 * np.pi / N_RAYS)))
    return np.repeat(r[:, None], N_RAYS, axis=1)


def nucleus_polygons(adata: Any, mpp: float | None = None) -> np.ndarray:
    """(cells, 17, 2) closed outlines in level-0 pixels of the slide (first vertex repeated last)."""
    mpp = slide_mpp(adata, mpp)
    centre = np.asarray(adata.obsm[K.OBSM_SPATIAL], dtype=np.float64) / mpp  # (n, 2) px
    r = np.maximum(_radii_um(adata) / mpp, MIN_RAY_PX)  # (n, 16) px
    ring = np.empty((adata.n_obs, N_RAYS + 1, 2), dtype=np.float64)
    ring[:, :N_RAYS, 0] = centre[:, 0, None] + r * np.cos(RAY_ANGLES)[None, :]
    ring[:, :N_RAYS, 1] = centre[:, 1, None] + r * np.sin(RAY_ANGLES)[None, :]
    ring[:, N_RAYS] = ring[:, 0]
    return ring


def _features(ring: np.ndarray, ids: np.ndarray, types: np.ndarray, rgb: np.ndarray,
              names: list[str], values: np.ndarray) -> list[dict]:
    """Feature dicts for one chunk (the coordinates come in already built and rounded)."""
    coords = np.round(ring, DECIMALS).tolist()
    vals = values.tolist()
    colours = rgb.tolist()
    return [
        {"type": "Feature",
         "geometry": {"type": "Polygon", "coordinates": [c]},
         "properties": {"objectType": OBJECT_TYPE, "name": f"{K.OBS_NAME_PREFIX}{i}",
                        "classification": {"name": t, "color": col},
                        "measurements": {n: v for n, v in zip(names, row) if v == v}}}  # NaN: left out
        for c, i, t, col, row in zip(coords, ids.tolist(), types.tolist(), colours, vals)
    ]


def write_geojson(adata: Any, path: str | os.PathLike, genes: Iterable[str] | None = None, *,
                  mpp: float | None = None, chunk_cells: int = CHUNK_CELLS) -> Path:
    """Every nucleus as a QuPath detection; measurements = morphology + the chosen genes.

    Returns the path written (atomically). Coordinates are level-0 pixels: µm / ``mpp``
    (the slide's µm per pixel, from ``uns["ghist"]["mpp"]`` unless given).
    """
    chosen = choose_genes(adata, genes)
    morph = measurement_columns(adata)
    names = [*morph, *chosen]
    rings = nucleus_polygons(adata, mpp)
    ids, types = cell_ids(adata), cell_types(adata)
    rgb = cell_type_rgb(types) if len(types) else np.zeros((0, 3), np.uint8)
    morph_values = adata.obs[morph].to_numpy(np.float64) if morph else np.zeros((adata.n_obs, 0))
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        first = True
        for start in range(0, adata.n_obs, chunk_cells):
            rows = slice(start, min(start + chunk_cells, adata.n_obs))
            values = np.concatenate([morph_values[rows], expression(adata, chosen, rows).astype(np.float64)], axis=1)
            feats = _features(rings[rows], ids[rows], types[rows], rgb[rows], names, values)
            text = json.dumps(feats, allow_nan=False, separators=(",", ":"))[1:-1]
            if text:
                fh.write(("" if first else ",") + "\n" + text)
                first = False
        fh.write("\n]}\n")
    return target
