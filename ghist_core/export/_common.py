"""What every export needs from a prediction: the slide's µm/px, the genes asked for, and
which ``obs`` columns are per-cell measurements (morphology), read in one place."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ghist_core import _keys as K
from ghist_core.errors import MissingMppError, UnknownGeneError

#: rows per chunk when streaming a table or GeoJSON to disk (bounds memory on a whole slide)
CHUNK_CELLS = 50_000


def slide_mpp(adata: Any, mpp: float | None = None) -> float:
    """µm per level-0 pixel of the prediction's slide: ``mpp`` if given, else ``uns["ghist"]["mpp"]``."""
    value = mpp if mpp is not None else adata.uns.get(K.UNS_GHIST, {}).get("mpp")
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise MissingMppError(
            "This prediction does not record the slide's micrometres per pixel, so coordinates cannot be "
            "given in slide pixels. Pass the slide's µm per pixel (mpp) explicitly.")
    return value


def choose_genes(adata: Any, genes: Iterable[str] | None) -> list[str]:
    """The genes to export, in the order asked (all genes of the prediction by default)."""
    if genes is None:
        return [str(g) for g in adata.var_names]
    chosen = [str(g).strip() for g in genes if str(g).strip()]
    known = set(map(str, adata.var_names))
    missing = [g for g in chosen if g not in known]
    if missing:
        raise UnknownGeneError(
            f"Not predicted by this model: {', '.join(missing[:10])}"
            f"{' …' if len(missing) > 10 else ''}. Choose among the prediction's {len(known)} genes.")
    return list(dict.fromkeys(chosen))


def measurement_columns(adata: Any) -> list[str]:
    """Numeric per-cell ``obs`` columns other than ids and type/neighbourhood fractions: the morphology
    from segmentation (``area_um2``, ``perimeter_um`` …), predicted morphology and context counts."""
    skip = {K.OBS_CELL_ID}
    out = []
    for c in adata.obs.columns:
        name = str(c)
        if name in skip or name.startswith((K.LEGACY_PROB_PREFIX, K.LEGACY_NBHD_PREFIX)):
            continue
        dtype = adata.obs[c].dtype
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            out.append(name)
    return out


def cell_ids(adata: Any) -> np.ndarray:
    """``obs["cell_id"]`` (int64), or the row number when a result has none."""
    if K.OBS_CELL_ID in adata.obs:
        return adata.obs[K.OBS_CELL_ID].to_numpy(np.int64)
    return np.arange(adata.n_obs, dtype=np.int64)


def cell_types(adata: Any) -> np.ndarray:
    """``obs["cell_type"]`` as plain strings (``""`` where missing)."""
    if K.OBS_CELL_TYPE not in adata.obs:
        return np.full(adata.n_obs, "", dtype=object)
    return adata.obs[K.OBS_CELL_TYPE].astype(object).where(adata.obs[K.OBS_CELL_TYPE].notna(), "").astype(str).to_numpy(object)


def expression(adata: Any, genes: Sequence[str], rows: slice) -> np.ndarray:
    """Dense float32 expression of ``genes`` for the cells in ``rows`` (works for sparse ``X`` too)."""
    idx = adata.var_names.get_indexer(list(genes))
    block = adata.X[rows][:, idx] if len(idx) else np.zeros((len(range(adata.n_obs)[rows]), 0), np.float32)
    if hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=np.float32)
