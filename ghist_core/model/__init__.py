"""The GHIST model: per-cell expression, cell type, neighbourhood and morphology from H&E.

``load_ghist()`` gives a ready :class:`GhistModel`; ``model.predict(slide, cells)`` returns an
AnnData (cells × genes). Training lives in :mod:`ghist_core.training`. How far each gene and
cell type can be trusted (the card's held-out reliability): :class:`Reliability`.
"""

from __future__ import annotations

from ghist_core.model.network import GhistConfig, GhistNet, PatchRegressor
from ghist_core.model.reliability import NOT_RELIABLE, GeneReliability, Reliability, TypeReliability

__all__ = ["GhistConfig", "GhistNet", "PatchRegressor", "GhistModel", "load_ghist",
           "NOT_RELIABLE", "GeneReliability", "TypeReliability", "Reliability"]


def __getattr__(name: str):  # predict pulls in anndata; keep training imports light
    if name in ("GhistModel", "load_ghist"):
        from ghist_core.model import predict

        return getattr(predict, name)
    raise AttributeError(name)
