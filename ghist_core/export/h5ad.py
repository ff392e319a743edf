"""The prediction as ``.h5ad`` that scanpy/squidpy open with the H&E underneath.

Guarantees, whatever layout the run was written in: type probabilities and neighbourhood
fractions as ``obsm`` matrices (:func:`ghist_core._keys.upgrade_layout`), and
``uns["spatial"][library_id]`` with an overview image and scale factors, so
``sc.pl.spatial(adata, img_key="hires", library_id=...)`` works. ``obsm["spatial"]`` stays in
µm; ``tissue_hires_scalef`` is the overview's pixels per µm.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ghist_core import _keys as K
from ghist_core.errors import ExportError
from ghist_core.io.atomic import atomic_write_with

__all__ = ["prepare_h5ad", "write_h5ad", "library_id_for", "nucleus_diameter_um"]

#: spot size drawn by scanpy when nothing better is known (a typical nucleus, µm)
DEFAULT_SPOT_UM = 8.0


def library_id_for(adata: Any) -> str:
    """The ``uns["spatial"]`` key: the one already there, else ``slide_<slide_id>``."""
    spatial = adata.uns.get(K.UNS_SPATIAL)
    if isinstance(spatial, dict) and len(spatial) >= 1:
        return str(next(iter(spatial)))
    slide_id = adata.uns.get(K.UNS_GHIST, {}).get("slide_id")
    return f"slide_{slide_id}" if slide_id is not None else "slide"


def nucleus_diameter_um(adata: Any) -> float:
    """Median nucleus diameter (from ``area_um2``): the spot size scanpy draws per cell."""
    if "area_um2" in adata.obs and adata.n_obs:
        area = adata.obs["area_um2"].to_numpy(np.float64)
        area = area[np.isfinite(area) & (area > 0)]
        if area.size:
            return float(2.0 * np.sqrt(np.median(area) / np.pi))
    return DEFAULT_SPOT_UM


def _has_image(adata: Any) -> bool:
    spatial = adata.uns.get(K.UNS_SPATIAL)
    if not isinstance(spatial, dict) or not spatial:
        return False
    lib = next(iter(spatial.values()))
    return (isinstance(lib, dict) and K.SPATIAL_IMAGE in lib.get("images", {})
            and K.SCALEF_HIRES in lib.get("scalefactors", {}))


def prepare_h5ad(adata: Any, *, overview: Callable[[], tuple[np.ndarray, float]] | None = None, copy: bool = True) -> Any:
    """``adata`` in the current layout with ``uns["spatial"]`` present.

    ``overview()`` returns ``(rgb, pixels_per_µm)`` of an H&E overview; it is called only
    when the prediction has no image yet. Raises ``ExportError`` when it has none and no
    ``overview`` is given. Returns the (copied, unless ``copy=False``) AnnData.
    """
    adata = adata.copy() if copy else adata
    K.upgrade_layout(adata)
    if not _has_image(adata):
        if overview is None:
            raise ExportError("This prediction has no H&E overview image for scanpy, and the slide was not given to "
                              "make one. Export it from its project (ghist export --project ...).")
        rgb, px_per_um = overview()
        K.set_spatial_image(adata, library_id_for(adata), rgb, px_per_um, nucleus_diameter_um(adata))
    return adata


def write_h5ad(adata: Any, path: str | os.PathLike, *, overview: Callable[[], tuple[np.ndarray, float]] | None = None,
               mpp: float | None = None) -> Path:
    """Write :func:`prepare_h5ad` of ``adata`` to ``path`` (gzip, atomically); returns the path.

    ``mpp`` (the slide's µm per level-0 pixel) is recorded in the copy's ``uns["ghist"]["mpp"]``
    when the prediction lacks it (older results); ``adata`` itself is never changed."""
    out = prepare_h5ad(adata, overview=overview)
    if mpp is not None:
        ghist = out.uns.get(K.UNS_GHIST)
        ghist = dict(ghist) if isinstance(ghist, dict) else {}
        if not ghist.get("mpp"):
            out.uns[K.UNS_GHIST] = {**ghist, "mpp": float(mpp)}
    return atomic_write_with(Path(path), lambda p: out.write_h5ad(p, compression="gzip"))
