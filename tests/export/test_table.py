"""Cells × genes tables: CSV (formula-safe, streamed in chunks) and Parquet, from a real prediction."""

from __future__ import annotations

import io

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core import _keys as K
from ghist_core.errors import UnknownGeneError
from ghist_core.export import cell_table, write_csv, write_parquet


def test_csv_and_parquet_carry_ids_positions_types_probabilities_morphology_and_genes(prediction, tmp_path):
    csv = pd.read_csv(write_csv(prediction, tmp_path / "cells.csv"))
    pq = pd.read_parquet(write_parquet(prediction, tmp_path / "cells.parquet"))
    types = list(K.type_probabilities(prediction).columns)
    expected = ["cell_id", "x_um", "y_um", "cell_type", *[f"prob_{t}" for t in types]]
    assert list(csv.columns[:len(expected)]) == expected and list(pq.columns) == list(csv.columns)
    assert list(csv.columns[-5:]) == list(prediction.var_names)  # all genes by default, in the model's order
    assert {"area_um2", "perimeter_um", "eccentricity", "solidity"} <= set(csv.columns)
    assert len(csv) == len(pq) == prediction.n_obs
    np.testing.assert_array_equal(csv["cell_id"], prediction.obs["cell_id"])
    np.testing.assert_allclose(csv[["x_um", "y_um"]], prediction.obsm["spatial"])
    np.testing.assert_allclose(pq[list(prediction.var_names)], prediction.X, rtol=1e-6)
    np.testing.assert_allclose(csv[[f"prob_{t}" for t in types]], K.type_probabilities(prediction), rtol=1e-6)
    assert (csv["cell_type"] == prediction.obs["cell_type"].astype(str).to_numpy()).all()


def test_chosen_genes_only_and_unknown_genes_refused(prediction, tmp_path):
    t = cell_table(prediction, ["MKI67", "ERBB2"])
    assert list(t.columns[-2:]) == ["MKI67", "ERBB2"] and "ESR1" not in t.columns
    with pytest.raises(UnknownGeneError, match="NOT_A_GENE"):
        write_csv(prediction, tmp_path / "x.csv", ["ERBB2", "NOT_A_GENE"])
    assert not (tmp_path / "x.csv").exists()


def _hostile() -> ad.AnnData:
    types = ["=HYPERLINK(\"http://x\")", "+1", "-cmd", "@SUM(A1)", "T", "Malignant", "T"]
    a = ad.AnnData(X=np.arange(14, dtype=np.float32).reshape(7, 2),
                   obs=pd.DataFrame({"cell_id": np.arange(7), "cell_type": types, "area_um2": -np.arange(7.0)},
                                    index=[f"cell_{i}" for i in range(7)]),
                   var=pd.DataFrame(index=["=GENE", "G2"]))
    a.obsm["spatial"] = np.zeros((7, 2))
    return a


def test_csv_neutralises_formulas_but_keeps_numbers_and_streams_one_header(tmp_path):
    a = _hostile()
    whole = write_csv(a, tmp_path / "one.csv").read_bytes()
    chunked = write_csv(a, tmp_path / "many.csv", chunk_cells=3).read_bytes()
    assert chunked == whole and whole.count(b"cell_id") == 1
    back = pd.read_csv(io.BytesIO(whole))
    assert list(back["cell_type"][:4]) == ["'=HYPERLINK(\"http://x\")", "'+1", "'-cmd", "'@SUM(A1)"]
    assert "'=GENE" in back.columns  # a header cell is text too
    assert back["area_um2"].tolist() == (-np.arange(7.0)).tolist()  # negative numbers stay numbers
    # parquet is typed: nothing to neutralise, the values are as predicted
    pq = pd.read_parquet(write_parquet(a, tmp_path / "c.parquet", chunk_cells=3))
    assert pq["cell_type"].tolist()[0] == "=HYPERLINK(\"http://x\")" and len(pq) == 7
