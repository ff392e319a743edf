"""Cells × chosen genes as a flat table (CSV for spreadsheets, Parquet for pandas/R/Arrow).

One row per cell: ``cell_id, x_um, y_um, cell_type``, the type probabilities
(``prob_<type>``), the morphology measurements, then the chosen genes. Written chunk by
chunk through :mod:`ghist_core.io.atomic`, so a whole slide never sits in memory as text
and a reader never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from ghist_core import _keys as K
from ghist_core.analysis.clinical import safe_csv_bytes
from ghist_core.errors import ExportError
from ghist_core.export._common import CHUNK_CELLS, cell_ids, cell_types, choose_genes, expression, measurement_columns
from ghist_core.io.atomic import atomic_path

__all__ = ["cell_table", "iter_cell_table", "write_csv", "write_parquet", "PROB_PREFIX"]

#: column prefix of the type probabilities in the table (the names researchers already know)
PROB_PREFIX = K.LEGACY_PROB_PREFIX


def iter_cell_table(adata: Any, genes: Iterable[str] | None = None, *, chunk_cells: int = CHUNK_CELLS) -> Iterator[pd.DataFrame]:
    """The table in row chunks of at most ``chunk_cells`` cells (same columns in every chunk)."""
    chosen = choose_genes(adata, genes)
    probs = K.type_probabilities(adata)
    morph = measurement_columns(adata)
    xy = np.asarray(adata.obsm[K.OBSM_SPATIAL], dtype=np.float64)
    ids, types = cell_ids(adata), cell_types(adata)
    fixed = ["cell_id", "x_um", "y_um", "cell_type", *[f"{PROB_PREFIX}{t}" for t in probs.columns], *morph]
    taken = set(fixed)
    gene_cols = [g if g not in taken else f"expr_{g}" for g in chosen]  # a gene never shadows a measurement
    p_all = probs.to_numpy(np.float32)
    for start in range(0, max(adata.n_obs, 1), chunk_cells):
        rows = slice(start, min(start + chunk_cells, adata.n_obs))
        parts = {"cell_id": ids[rows], "x_um": xy[rows, 0], "y_um": xy[rows, 1], "cell_type": types[rows]}
        p = p_all[rows]
        parts.update({f"{PROB_PREFIX}{t}": p[:, j] for j, t in enumerate(probs.columns)})
        parts.update({c: adata.obs[c].to_numpy()[rows] for c in morph})
        e = expression(adata, chosen, rows)
        parts.update({c: e[:, j] for j, c in enumerate(gene_cols)})
        yield pd.DataFrame(parts, columns=[*fixed, *gene_cols])


def cell_table(adata: Any, genes: Iterable[str] | None = None) -> pd.DataFrame:
    """The whole table in memory (for a page's download button or a notebook)."""
    return pd.concat(list(iter_cell_table(adata, genes)), ignore_index=True)


def write_csv(adata: Any, path: str | os.PathLike, genes: Iterable[str] | None = None, *,
              chunk_cells: int = CHUNK_CELLS) -> Path:
    """UTF-8 CSV; text cells a spreadsheet would run as a formula (= + - @ …) get a leading
    apostrophe, exactly as the clinical export does (:func:`safe_csv_bytes`)."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        for i, chunk in enumerate(iter_cell_table(adata, genes, chunk_cells=chunk_cells)):
            data = safe_csv_bytes(chunk)
            if i:  # the header once: drop the (identical) header of later chunks
                header = safe_csv_bytes(chunk.iloc[:0])
                data = data[len(header):]
            fh.write(data)
    return target


def write_parquet(adata: Any, path: str | os.PathLike, genes: Iterable[str] | None = None, *,
                  chunk_cells: int = CHUNK_CELLS) -> Path:
    """Parquet (one row group per chunk, zstd); typed columns, so no formula escaping is needed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow comes with streamlit; a bare install may lack it
        raise ExportError("Parquet export needs the 'pyarrow' package (pip install pyarrow); CSV works without it.") from exc
    target = Path(path)
    with atomic_path(target) as tmp:
        writer = None
        try:
            for chunk in iter_cell_table(adata, genes, chunk_cells=chunk_cells):
                table = pa.Table.from_pandas(chunk, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    return target
