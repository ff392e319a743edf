"""Single-cell reference: cell-type expression profiles and NNLS deconvolution of spots.

GHIST anchors predicted expression on a single-cell reference (expression = mixture of
type profiles + residual). Our reference is the GHIST demo Xenium breast table (5,508
cells × 280 genes, nine labelled types; ``shared/data/ghist_demo``, GPL-3 data, no code
copied). It gives (1) type profiles, (2) per-spot type fractions of HER2ST spots by
non-negative least squares, which are the type head's weak targets, and (3) via those
fractions, type profiles for *every* predicted gene (``fit_gene_profiles``), fitted on
training spots only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import nnls

__all__ = [
    "CELL_TYPES",
    "ReferenceProfiles",
    "load_reference",
    "nnls_deconvolve",
    "fit_gene_profiles",
]

#: The nine GHIST breast cell types, in the demo's ``ct_idx`` order.
CELL_TYPES: tuple[str, ...] = (
    "B", "Myeloid", "Endothelial", "Fibroblast", "Macrophage",
    "Malignant", "Epithelial", "Plasma", "T",
)


@dataclass
class ReferenceProfiles:
    """Mean expression per cell type (``profiles``: K types × genes, counts per cell)."""

    cell_types: list[str]
    genes: list[str]
    profiles: np.ndarray
    n_cells: np.ndarray

    def subset(self, genes: list[str]) -> "ReferenceProfiles":
        """Profiles restricted to ``genes`` (all must be present)."""
        idx = [self.genes.index(g) for g in genes]
        return ReferenceProfiles(self.cell_types, list(genes), self.profiles[:, idx], self.n_cells)


def load_reference(demo_dir: str | Path) -> ReferenceProfiles:
    """Type profiles from the GHIST demo Xenium cells (mean raw counts per type and gene)."""
    demo_dir = Path(demo_dir)
    expr = pd.read_csv(demo_dir / "expr_mat_breast_demo.csv", index_col=0)
    expr = expr.drop(columns=[c for c in ("cell_id",) if c in expr.columns])
    ct = pd.read_csv(demo_dir / "cell_types_breast_demo.csv", index_col="c_ids")["ct_idx"]
    ct = ct.reindex(expr.index)
    x = expr.to_numpy(dtype=np.float64)
    lab = ct.to_numpy(dtype=np.int64)
    k = len(CELL_TYPES)
    onehot = np.eye(k)[lab]
    n = onehot.sum(0)
    profiles = (onehot.T @ x) / np.maximum(n, 1)[:, None]
    return ReferenceProfiles(list(CELL_TYPES), list(expr.columns), profiles, n)


def _gene_scale(ref: np.ndarray, spots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide every gene by its mean so platform-specific gene efficiencies cancel."""
    rs = ref.mean(0)
    ss = spots.mean(0)
    return ref / np.maximum(rs, 1e-9), spots / np.maximum(ss, 1e-9)


def nnls_deconvolve(spot_counts: np.ndarray, ref: ReferenceProfiles) -> np.ndarray:
    """Cell-type fractions of each spot by NNLS on the shared genes.

    Rule: counts are divided by spot library size; every gene of both reference and spots is
    then divided by its own mean (cancels Xenium vs ST capture differences per gene);
    ``w = argmin ||R^T w - y||, w >= 0`` per spot; fractions = ``w / sum(w)`` (uniform if 0).

    Parameters
    ----------
    spot_counts
        ``(S, G)`` counts of the genes ``ref.genes`` (same order).
    """
    y = np.asarray(spot_counts, dtype=np.float64)
    y = y / np.maximum(y.sum(1, keepdims=True), 1e-9)
    r = ref.profiles / np.maximum(ref.profiles.sum(1, keepdims=True), 1e-9)
    r, y = _gene_scale(r, y)
    a = r.T  # G × K
    out = np.zeros((y.shape[0], r.shape[0]))
    for i in range(y.shape[0]):  # spots, not cells; a few thousand tiny solves
        out[i] = nnls(a, y[i])[0]
    s = out.sum(1, keepdims=True)
    out = np.where(s > 0, out / np.where(s > 0, s, 1), 1.0 / r.shape[0])
    return out


def fit_gene_profiles(fractions: np.ndarray, expression: np.ndarray) -> np.ndarray:
    """Per-type profiles for any genes: ``expression ≈ fractions @ P`` with ``P >= 0`` (NNLS per gene).

    Parameters
    ----------
    fractions
        ``(S, K)`` type fractions of training spots.
    expression
        ``(S, G)`` linear-scale expression of the same spots.

    Returns
    -------
    ``(K, G)`` profiles.
    """
    f = np.asarray(fractions, dtype=np.float64)
    e = np.asarray(expression, dtype=np.float64)
    out = np.zeros((f.shape[1], e.shape[1]))
    for g in range(e.shape[1]):  # genes (hundreds), each a K-variable solve
        out[:, g] = nnls(f, e[:, g])[0]
    return out
