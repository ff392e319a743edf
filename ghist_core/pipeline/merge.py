"""Block checkpoints → one result, in memory bounded by a block.

Why: a gigapixel slide has one to a few million cells. Loading every block's checkpoint and
concatenating them (then averaging them onto the grid) held all the cells twice in RAM, so the
pipeline's peak memory grew with the slide. Here the checkpoints are read one at a time (for the
grid sums and the slide-wide numbers), and the ``.h5ad`` is written with h5py, each block's arrays
copied into the output in turn (``anndata``'s own ``concat_on_disk`` goes through dask, which hangs
in the forked HDF5 writer when the run is itself a dask-distributed task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from ghist_core import _keys as K
from ghist_core.errors import StoreError
from ghist_core.pipeline.grid import GridAccumulator

__all__ = ["BlockSummary", "summarise_blocks", "write_merged_h5ad", "median_nucleus_area"]


def median_nucleus_area(area_um2: np.ndarray) -> float | None:
    """Median of the finite, positive nucleus areas (µm²); None when there are none."""
    area = np.asarray(area_um2, dtype=np.float64)
    area = area[np.isfinite(area) & (area > 0)]
    return float(np.median(area)) if len(area) else None


@dataclass
class BlockSummary:
    """What the final result needs from all blocks, gathered one block at a time."""

    paths: list[Path]  # the checkpoints that hold cells, in block order
    n_cells: int
    grids: dict[float, ad.AnnData]
    median_area_um2: float | None
    obsm_columns: dict = field(default_factory=dict)
    empty_path: Path | None = None  # a checkpoint to copy the layout from when no block has cells
    bytes_on_disk: int = 0
    obsm_keys: list[str] = field(default_factory=list)  # the obsm matrices every block with cells has
    obs_keys: list[str] | None = None  # the obs columns every block with cells has (None: each block's all)
    #: cells the scale check segmented at a factor other than 1 (obs "nucleus_scale"); None when some
    #: block with cells lacks the column (made before it), so the merged result has no such column
    n_rescaled: int | None = 0


def _current_layout(path: Path) -> ad.AnnData:
    """A checkpoint in the current layout with unique ``cell_<id>`` names; rewritten in place (in the
    isolated HDF5 writer) if it was not, as blocks written by an older version: one block in memory."""
    from ghist_core.io.safe_h5 import estimate_h5ad_bytes, write_h5_isolated

    a = ad.read_h5ad(path)
    columns = set(a.obs.columns)
    a = K.upgrade_layout(a)
    renamed = False
    if K.OBS_CELL_ID in a.obs and a.n_obs:
        names = K.obs_names_for(a.obs[K.OBS_CELL_ID].to_numpy())
        if list(a.obs_names) != names:
            a.obs_names = names
            renamed = True
    if renamed or set(a.obs.columns) != columns:
        write_h5_isolated(path, lambda p: a.write_h5ad(p), estimated_bytes=estimate_h5ad_bytes(a),
                          what=f"the upgraded checkpoint {path.name}")
    return a


def summarise_blocks(paths: list[Path], grid_sizes_um: tuple[float, ...]) -> BlockSummary:
    """Read each checkpoint once: grid sums, cell count, nucleus areas, the obsm column names."""
    acc = GridAccumulator(tuple(grid_sizes_um))
    areas: list[np.ndarray] = []
    keep: list[Path] = []
    obsm_columns: dict = {}
    obsm_keys: set[str] | None = None
    obs_keys: list[str] | None = None
    genes: list[str] | None = None
    n = n_rescaled = 0
    size = 0
    for p in paths:
        a = _current_layout(p)
        size += p.stat().st_size
        acc.add(a)
        if not obsm_columns:
            obsm_columns = dict(a.uns.get(K.UNS_OBSM_COLUMNS, {}))
        if a.n_obs and a.n_vars:
            if genes is None:
                genes = list(a.var_names)
            elif list(a.var_names) != genes:
                raise StoreError(f"The run's checkpoints disagree on the genes ({p.name}): they were written by "
                                 "different models. Start a new run.")
            keep.append(p)
            n += a.n_obs
            obsm_keys = set(a.obsm) if obsm_keys is None else obsm_keys & set(a.obsm)  # what every block has
            # likewise the obs columns: a run resumed with another setting (e.g. uncertainty) never gets a half-empty column
            obs_keys = list(a.obs.columns) if obs_keys is None else [c for c in obs_keys if c in a.obs.columns]
            if "area_um2" in a.obs:
                areas.append(a.obs["area_um2"].to_numpy(np.float64))
            if K.OBS_NUCLEUS_SCALE in a.obs:
                n_rescaled += int((a.obs[K.OBS_NUCLEUS_SCALE].to_numpy() != 1.0).sum())
        del a
    if obs_keys is not None and K.OBS_NUCLEUS_SCALE not in obs_keys and n_rescaled:
        n_rescaled = None
    keys = sorted(obsm_keys or ())
    return BlockSummary(paths=keep, n_cells=n, grids=acc.finish(),
                        median_area_um2=median_nucleus_area(np.concatenate(areas) if areas else np.zeros(0)),
                        obsm_columns={k: v for k, v in obsm_columns.items() if not keep or k in keys},
                        empty_path=paths[0] if paths else None, bytes_on_disk=size, obsm_keys=keys, obs_keys=obs_keys,
                        n_rescaled=n_rescaled)


def _concat_obs(paths: list[Path], columns: list[str] | None = None) -> pd.DataFrame:
    """The blocks' ``obs`` tables stacked (small: a few numbers per cell), ``columns`` of them (default
    all); categorical columns keep one category list, the union in order of first appearance."""
    from anndata.io import read_elem

    frames = []
    for p in paths:
        with h5py.File(p, "r") as f:
            frame = read_elem(f["obs"])
        frames.append(frame if columns is None else frame[columns])
    categorical = {c for f in frames for c in f.columns if isinstance(f[c].dtype, pd.CategoricalDtype)}
    cats = {c: list(dict.fromkeys(v for f in frames if c in f for v in f[c].cat.categories)) for c in categorical}
    for f in frames:
        for c in categorical & set(f.columns):
            f[c] = f[c].astype(object)
    obs = pd.concat(frames)
    for c in categorical:
        obs[c] = pd.Categorical(obs[c], categories=cats[c])
    return obs


def _stack_rows(target: h5py.Group, key: str, paths: list[Path], source_key: str, n_rows: int) -> None:
    """``target[key]`` = the blocks' ``source_key`` arrays stacked by rows (``n_rows`` > 0), copied one block at a time."""
    with h5py.File(paths[0], "r") as f:
        first = f[source_key]
        shape, dtype = first.shape, first.dtype
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    chunk_rows = max(1, min(n_rows, (1 << 20) // row_bytes))  # about 1 MB per chunk
    out = target.create_dataset(key, shape=(n_rows, *shape[1:]), dtype=dtype, chunks=(chunk_rows, *shape[1:]),
                                compression="gzip")
    row = 0
    for p in paths:
        with h5py.File(p, "r") as f:
            block = f[source_key][()]
        out[row:row + len(block)] = block
        row += len(block)
    out.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def write_merged_h5ad(summary: BlockSummary, out: Path, uns: dict) -> None:
    """The slide's ``.h5ad`` at ``out``: the blocks' cells copied into it one block at a time
    (``X`` and every ``obsm`` matrix gzip-compressed in 1 MB chunks), then ``uns``."""
    from anndata.io import read_elem, write_elem

    full = {**({K.UNS_OBSM_COLUMNS: summary.obsm_columns} if summary.obsm_columns else {}), **uns}
    if not summary.paths:  # no cells anywhere: the first block's (empty) layout, or an empty AnnData
        a = ad.read_h5ad(summary.empty_path) if summary.empty_path is not None else ad.AnnData()
        a.uns.clear()
        a.uns.update(full)
        a.write_h5ad(out)
        return
    paths = summary.paths
    with h5py.File(paths[0], "r") as f:
        var = read_elem(f["var"])
    obsm_keys = summary.obsm_keys
    obs = _concat_obs(paths, summary.obs_keys)
    with h5py.File(out, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        _stack_rows(f, "X", paths, "X", len(obs))
        write_elem(f, "obsm", {})
        for key in obsm_keys:
            _stack_rows(f["obsm"], key, paths, f"obsm/{key}", len(obs))
        for empty in ("varm", "layers", "obsp", "varp"):
            write_elem(f, empty, {})
        write_elem(f, "uns", full)
