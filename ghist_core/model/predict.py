"""Slide-level GHIST inference: tiles at the model's µm/px → per-cell AnnData.

Cells (the segmentation table, centroids and star contours in µm) are grouped into tiles
whose *cores* partition the slide; each tile is read with a margin so that nuclei on a core
edge are whole. Nuclei are drawn back from their star contours, encoder features pooled
inside them, batched on the device, then the neighbourhood context (mean embedding of the
cells within ``context_radius_um``, over the whole input, on the CPU with a k-d tree) and
the heads run in fixed-size chunks. Memory is bounded by the batch size and chunk size,
not by the slide. Inference runs in float32 without TF32 so CPU and CUDA agree.

A weights file may also hold an *ensemble*: other seeds of the same recipe, stored as
``member<k>.<tensor>`` (k ≥ 1) and counted in the card's ``"ensemble"``. Member 0 is the model
(``X``); the others only measure its spread, ``obs["expression_uncertainty"]``, when a
prediction asks for it (``uncertainty=True``), computed in the same tiles and chunks.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ghist_core._types import ProgressCallback, ScaledReader
from ghist_core import _keys as K
from ghist_core.errors import ModelInputError, UnknownGeneError, WeightsFormatError
from ghist_core.io.hashing import sha256_file
from ghist_core.weights.card import ensemble_size

from ghist_core.model.network import GhistConfig, GhistNet
from ghist_core.model.pooling import N_RAYS, radius_neighbour_mean, rasterise_stars

__all__ = ["GhistModel", "CellPredictions", "load_ghist", "save_ghist", "MODEL_NAME", "EXPRESSION_UNITS",
           "ENSEMBLE_RULE", "UNCERTAINTY_UNAVAILABLE"]

MODEL_NAME = "ghist-her2st"
EXPRESSION_UNITS = (
    "per-cell expression on the CP10k scale of a HER2ST spot: the sum over the cells of a 100 µm spot "
    "approximates the spot's counts per 10,000 (log1p of that sum ≈ log1p CP10k); non-negative"
)
#: the units of a model trained with ``spot_aggregate="mean"``
EXPRESSION_UNITS_MEAN = (
    "per-cell expression profile in counts per 10,000 (CP10k): the mean over the cells of a 100 µm "
    "spot approximates the spot's CP10k (log1p of that mean ≈ log1p CP10k); non-negative"
)


def expression_units_for(spot_aggregate: str) -> str:
    """What one cell's predicted value means, for a model trained with this ``spot_aggregate``."""
    return EXPRESSION_UNITS_MEAN if spot_aggregate == "mean" else EXPRESSION_UNITS


#: the card's ``"ensemble"`` rule when the caller gives none
ENSEMBLE_RULE = "other seeds of the same recipe; member 0 is the model, the others only measure its spread"
#: ``uns["ghist"]["uncertainty"]`` when it was asked of a model without ensemble members
UNCERTAINTY_UNAVAILABLE = "unavailable: the model has one member"
_MEMBER_KEY = re.compile(r"^member(\d+)\.(.+)$")  # tensor names of ensemble member k ≥ 1

RAY_COLUMNS = [f"ray_{k:02d}" for k in range(N_RAYS)]
MORPH_COLUMNS = ("area_um2", "perimeter_um", "eccentricity", "solidity")
#: the segmenter's per-cell columns copied to ``obs`` as they are when present (the factor each
#: nucleus was segmented at: ``LearnedSegmenter.segment_slide(..., nucleus_scale=)``)
SEGMENTATION_COLUMNS = (K.OBS_NUCLEUS_SCALE,)


@contextlib.contextmanager
def _exact_float32() -> Iterable[None]:
    """Turn TF32 off for the duration (CUDA convolutions/matmuls otherwise round to 10 bits)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _read_tile(slide: Any, x0_um: float, y0_um: float, size: int, mpp: float) -> np.ndarray:
    """``size``² RGB at ``mpp`` whose top-left is ``(x0_um, y0_um)`` on the slide (white outside)."""
    smpp = float(slide.mpp)
    loc = (x0_um / smpp, y0_um / smpp)
    if isinstance(slide, ScaledReader):
        rgb = np.asarray(slide.read_region_mpp(loc, (size, size), mpp))
    else:  # minimal slide-like objects: level-0 read, then resample
        from PIL import Image

        n0 = int(np.ceil(size * mpp / smpp))
        x, y = int(np.floor(loc[0])), int(np.floor(loc[1]))
        raw = np.asarray(slide.read_region((x, y), 0, (n0, n0)))[..., :3]
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(raw)).resize((size, size), Image.Resampling.BILINEAR))
    if rgb.shape[:2] != (size, size):
        raise ModelInputError(f"The slide returned a {rgb.shape[1]}×{rgb.shape[0]} region where {size}×{size} was asked for.")
    return np.ascontiguousarray(rgb[..., :3])


class GhistModel:
    """A loaded GHIST network with its card; ``predict(slide, cells)`` → AnnData.

    Attributes
    ----------
    net : GhistNet (eval mode, on ``device``): ensemble member 0, the model
    members : tuple[GhistNet, ...], every ensemble member, ``net`` first (just ``(net,)`` for most
        weights); the others stay on the CPU until a prediction with ``uncertainty=True`` needs them
    card : dict, the JSON model card
    weights_sha256 : str
    genes, cell_types : list[str]
    mpp, patch_px : the encoder's input scale and tile size
    """

    def __init__(self, net: GhistNet, card: Mapping[str, Any], weights_sha256: str = "", device: str | torch.device = "cpu",
                 members: Sequence[GhistNet] = ()) -> None:
        self.net = net.eval()
        self._others = tuple(m.eval() for m in members)  # members 1.. (on the CPU until used)
        self._others_moved = False
        self.card = dict(card)
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.net.to(self.device)
        cfg = net.cfg
        self.genes = list(cfg.genes)
        self.cell_types = list(cfg.cell_types)
        self.mpp = float(cfg.mpp)
        self.patch_px = int(cfg.patch_px)
        c = self.card.get("config", {})
        self._morph_mean = np.asarray(c.get("morph_mean", [0.0] * len(cfg.morph_features)), np.float32)
        self._morph_std = np.asarray(c.get("morph_std", [1.0] * len(cfg.morph_features)), np.float32)

    @property
    def cell_inputs(self) -> tuple[str, ...]:
        """Segmentation-table columns this model reads per cell besides the pixels (may be empty)."""
        return tuple(self.net.cfg.cell_inputs)

    def __repr__(self) -> str:
        return (f"<GhistModel {self.card.get('name', MODEL_NAME)}: {len(self.genes)} genes, {len(self.cell_types)} cell types, "
                f"{self.mpp} µm/px, device={self.device}>")

    def to(self, device: str | torch.device) -> "GhistModel":
        self.device = torch.device(device)
        self.net.to(self.device)
        if self._others_moved:
            for m in self._others:
                m.to(self.device)
        return self

    @property
    def members(self) -> tuple[GhistNet, ...]:
        """Every ensemble member, the model (``net``) first."""
        return (self.net, *self._others)

    def _nets(self, uncertainty: bool) -> list[GhistNet]:
        """The members one prediction runs: all of them (on the device) for ``uncertainty``, else the model."""
        if not (uncertainty and self._others):
            return [self.net]
        for m in self._others:
            m.to(self.device)
        self._others_moved = True
        return [self.net, *self._others]

    def uncertainty_note(self) -> str:
        """``uns["ghist"]["uncertainty"]`` of a prediction that asked for it: what the column holds, or why it is absent."""
        if not self._others:
            return UNCERTAINTY_UNAVAILABLE
        rule = (self.card.get("ensemble") or {}).get("rule", ENSEMBLE_RULE)
        return (f"obs['{K.OBS_EXPRESSION_UNCERTAINTY}']: per cell, the mean over the genes of the standard deviation "
                f"(ddof=1) across the {len(self.members)} ensemble members of log1p(predicted expression); "
                f"X is member 0's prediction. Members: {rule}")

    # ------------------------------------------------------------------------------------
    def _check_genes(self, genes: Iterable[str] | None) -> list[int]:
        if genes is None:
            return list(range(len(self.genes)))
        genes = list(genes)
        missing = [g for g in genes if g not in self.genes]
        if missing:
            raise UnknownGeneError(
                f"This model does not predict {', '.join(missing[:10])}"
                f"{' …' if len(missing) > 10 else ''}. It predicts {len(self.genes)} genes, e.g. "
                f"{', '.join(self.genes[:8])}; see model.genes for the full list."
            )
        return [self.genes.index(g) for g in genes]

    def provenance(self, params: Mapping[str, Any], timings: Mapping[str, float], slide_sha256: str = "") -> dict:
        """``uns["ghist"]``: what made this prediction (card, weights and slide sha256, settings, timings)."""
        out = {K.GHIST_MODEL_CARD: json.loads(json.dumps(self.card)), K.GHIST_WEIGHTS_SHA256: self.weights_sha256,
               K.GHIST_SLIDE_SHA256: slide_sha256, K.GHIST_PARAMS: dict(params), K.GHIST_TIMINGS: dict(timings),
               K.GHIST_EXPRESSION_UNITS: expression_units_for(self.net.cfg.spot_aggregate)}
        if params.get("uncertainty"):
            out[K.GHIST_UNCERTAINTY] = self.uncertainty_note()
        return out

    # ------------------------------------------------------------------------------------
    def predict(self, slide: Any, cells: pd.DataFrame, progress: ProgressCallback | None = None, batch_size: int = 16,
                *, slide_sha256: str | None = None, **options: Any):
        """Per-cell expression, type, neighbourhood and morphology for ``cells`` of ``slide``.

        :meth:`predict_arrays` (the same arguments: ``slide``, ``cells``, ``progress``, ``batch_size``
        and the keyword ``options`` ``genes``, ``margin_px``, ``on_outside``, ``chunk_cells``,
        ``uncertainty``), then
        :meth:`to_anndata`, then :meth:`provenance` in ``uns``.

        Parameters
        ----------
        slide_sha256
            The slide file's sha256 when the caller already knows it (the project store does):
            hashing a whole slide costs a full read, so callers predicting block by block pass it.
            ``None`` hashes the file once here (``""`` for a slide without a file).

        Returns
        -------
        AnnData (cells × genes), see :mod:`ghist_core._keys`: ``X`` float32 ≥ 0 (see
        ``uns['ghist']['expression_units']``); ``obs``: ``cell_id``, ``cell_type``, the
        segmentation's morphology columns, ``pred_<morph>``, ``n_context_cells`` (and
        ``expression_uncertainty`` with ``uncertainty=True`` and ensemble members);
        ``obsm``: ``spatial`` (x_um, y_um), ``cell_type_probabilities``,
        ``neighbourhood_composition`` (composition within ``nbhd_radius_um``), ``nucleus_rays_um``
        (the contour features were pooled inside), column names in ``uns['obsm_columns']``;
        ``uns['ghist']``: ``model_card``, ``weights_sha256``, ``slide_sha256``, ``params``,
        ``timings``, ``expression_units`` (and ``uncertainty`` when it was asked for).
        """
        pred = self.predict_arrays(slide, cells, progress, batch_size, **options)
        a = self.to_anndata(pred)
        a.uns[K.UNS_GHIST] = self.provenance(pred.params, pred.timings,
                                             _slide_sha256(slide) if slide_sha256 is None else str(slide_sha256))
        return a

    def predict_arrays(
        self,
        slide: Any,
        cells: pd.DataFrame,
        progress: ProgressCallback | None = None,
        batch_size: int = 16,
        *,
        genes: Iterable[str] | None = None,
        margin_px: int = 32,
        on_outside: str = "error",
        chunk_cells: int = 65536,
        uncertainty: bool = False,
    ) -> "CellPredictions":
        """The network's per-cell outputs as arrays (what :meth:`predict` puts in an AnnData).

        Parameters
        ----------
        slide
            A ``ghist_core.io.slide.Slide`` (or anything with ``mpp``, ``dimensions`` and
            ``read_region_mpp`` / ``read_region``).
        cells
            The segmentation table: ``x_um``, ``y_um`` and ``ray_00..ray_15`` (µm); without rays
            a disc of ``area_um2`` (else 3 µm radius) is used. ``cell_id`` kept when present.
        progress
            ``progress(fraction, message)`` after each batch of tiles.
        batch_size
            Tiles per forward pass (device memory).
        genes
            Subset of ``model.genes`` to return (``UnknownGeneError`` for others).
        margin_px
            Pixels (at the model's µm/px) read around each tile's core, so nuclei on its edge are whole.
        on_outside
            ``"error"`` (default: ``ModelInputError``) or ``"drop"`` (warn and skip) for cells
            whose centre lies outside the slide.
        chunk_cells
            Cells per chunk of the context and head computation (memory).
        uncertainty
            Also run the other ensemble members and return, per cell, the mean over the returned
            genes of the standard deviation (ddof=1) across all members of log1p(expression)
            (``CellPredictions.uncertainty``). ``expression`` stays member 0's, identical to a
            prediction without it. A model with one member returns no uncertainty (``None``).
        """
        t_start = time.perf_counter()
        gene_idx = self._check_genes(genes)
        if on_outside not in ("error", "drop"):
            raise ValueError("on_outside must be 'error' or 'drop'")
        cfg = self.net.cfg
        params = {"batch_size": int(batch_size), "margin_px": int(margin_px), "mpp": self.mpp, "patch_px": self.patch_px,
                  "context_radius_um": cfg.context_radius_um, "nbhd_radius_um": cfg.nbhd_radius_um,
                  "device": str(self.device), "n_cells_input": int(len(cells)) if cells is not None else 0,
                  "uncertainty": bool(uncertainty)}
        if cells is None or len(cells) == 0:
            return self._no_cells(cells, gene_idx, params)
        if not isinstance(cells, pd.DataFrame) or not {"x_um", "y_um"} <= set(cells.columns):
            raise ModelInputError("The cell table needs x_um and y_um columns (the segmentation table).")
        cells = self._cells_on_slide(slide, cells, on_outside, params)
        if len(cells) == 0:
            return self._no_cells(cells, gene_idx, params)
        n = len(cells)
        xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
        cell_inputs = _cell_input_values(cells, tuple(cfg.cell_inputs))
        if all(c in cells.columns for c in RAY_COLUMNS):
            rays_um = cells[RAY_COLUMNS].to_numpy(np.float64)
        else:
            r = np.sqrt(cells["area_um2"].to_numpy(np.float64) / np.pi) if "area_um2" in cells else np.full(n, 3.0)
            rays_um = np.repeat(r[:, None], N_RAYS, 1)
        rays_um = np.nan_to_num(np.clip(rays_um, 0.0, 40.0))
        nets = self._nets(uncertainty)
        t_enc = time.perf_counter()
        emb, tile_feat, tile_of, n_tiles, pooled = self._encode(nets, slide, xy, rays_um, cell_inputs, margin_px,
                                                                batch_size, progress)
        t_heads = time.perf_counter()
        out = self._heads(nets, xy, emb, tile_feat, tile_of, cell_inputs, gene_idx, chunk_cells)
        params["n_tiles"] = int(n_tiles)
        params["n_cells_without_mask"] = int((~pooled).sum())
        timings = {"encode_s": t_heads - t_enc, "heads_s": time.perf_counter() - t_heads, "total_s": time.perf_counter() - t_start}
        return CellPredictions(cells=cells, xy=xy, rays_um=rays_um, gene_idx=gene_idx, params=params, timings=timings, **out)

    def _cells_on_slide(self, slide: Any, cells: pd.DataFrame, on_outside: str, params: dict) -> pd.DataFrame:
        """Check the slide's scale against the model's and drop (or refuse) cells outside the slide."""
        smpp = float(slide.mpp)
        if not np.isfinite(smpp) or smpp <= 0:
            raise ModelInputError(f"The slide's µm per pixel ({smpp}) is not usable.")
        ratio = self.mpp / smpp
        # beyond 2×, with 5% slack: a 0.499 µm/px scan read at 1 µm/px is the 2× coarsening the
        # bundled model was trained with (0.5 µm/px patches box-averaged to 1 µm/px)
        if ratio > 2.0 * 1.05 or ratio < 1 / (2.0 * 1.05):
            from ghist_core.segmentation.tiling import MppWarning

            warnings.warn(
                f"The slide is at {smpp:.3g} µm/px but the model reads tissue at {self.mpp:.3g} µm/px; "
                f"regions are resampled by {ratio:.2g}×, which can make predictions less reliable.",
                MppWarning, stacklevel=4)
        xy = cells[["x_um", "y_um"]].to_numpy(np.float64)
        w_um, h_um = slide.dimensions[0] * smpp, slide.dimensions[1] * smpp
        bad = ~np.isfinite(xy).all(1) | (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w_um) | (xy[:, 1] >= h_um)
        if not bad.any():
            return cells
        msg = (f"{int(bad.sum())} of {len(cells)} cells lie outside the slide ({w_um:.0f} × {h_um:.0f} µm); "
               "were they segmented on another slide or at another µm per pixel?")
        if on_outside == "error":
            raise ModelInputError(msg + " Pass on_outside='drop' to skip them.")
        warnings.warn(msg + " They were skipped.", UserWarning, stacklevel=4)
        params["n_cells_outside_dropped"] = int(bad.sum())
        return cells.loc[~bad].reset_index(drop=True)

    def _encode(self, nets: Sequence[GhistNet], slide: Any, xy: np.ndarray, rays_um: np.ndarray,
                cell_inputs: np.ndarray | None, margin_px: int, batch_size: int, progress: ProgressCallback | None):
        """Encoder features pooled inside each nucleus, tile batch by tile batch (tiles whose cores partition the plane).

        Each tile batch is read and rasterised once and goes through every net of ``nets``.
        Returns ``(emb, tile_feat, tile_of, n_tiles, pooled)``: per net, per-cell embeddings and
        per-tile features; each cell's tile, the tile count and which cells got a mask.
        """
        cfg = self.net.cfg
        n = len(xy)
        core_px = self.patch_px - 2 * margin_px
        if core_px < 32:
            raise ModelInputError(f"margin_px={margin_px} leaves no core in a {self.patch_px} px tile.")
        core_um = core_px * self.mpp
        tx = np.floor(xy[:, 0] / core_um).astype(np.int64)
        ty = np.floor(xy[:, 1] / core_um).astype(np.int64)
        keys, tile_of = np.unique(np.stack([ty, tx], 1), axis=0, return_inverse=True)
        tile_of = tile_of.ravel()
        order = np.argsort(tile_of, kind="stable")
        bounds = np.searchsorted(tile_of[order], np.arange(len(keys) + 1))
        emb = [torch.zeros(n, cfg.embed_dim, dtype=torch.float32) for _ in nets]
        tile_feat = [torch.zeros(len(keys), cfg.widths[-1] + len(cfg.cell_inputs), dtype=torch.float32)  # per tile
                     for _ in nets]
        pooled = np.zeros(n, bool)
        with torch.no_grad(), _exact_float32():
            for b0 in range(0, len(keys), batch_size):  # batches of tiles
                tiles = range(b0, min(b0 + batch_size, len(keys)))
                imgs, insts, rows = [], [], []
                for t in tiles:
                    ix = order[bounds[t]:bounds[t + 1]]
                    x0 = keys[t, 1] * core_um - margin_px * self.mpp
                    y0 = keys[t, 0] * core_um - margin_px * self.mpp
                    imgs.append(_read_tile(slide, x0, y0, self.patch_px, self.mpp))
                    cen = np.stack([(xy[ix, 0] - x0) / self.mpp, (xy[ix, 1] - y0) / self.mpp], 1)
                    insts.append(rasterise_stars(cen, rays_um[ix] / self.mpp, (self.patch_px, self.patch_px)))
                    rows.append(ix)
                img = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).to(self.device)
                inst = torch.from_numpy(np.stack(insts)).to(self.device)
                flat = np.concatenate(rows)
                lens = np.array([len(r) for r in rows])
                starts = np.concatenate([[0], np.cumsum(lens)])
                lut = None
                if cell_inputs is not None:  # (tile, label) → that cell's inputs; label = position + 1
                    lut_np = np.zeros((len(rows), int(lens.max()) + 1, cell_inputs.shape[1]), np.float32)
                    lut_np[np.repeat(np.arange(len(rows)), lens), np.arange(len(flat)) - np.repeat(starts[:-1], lens) + 1] = cell_inputs[flat]
                    lut = torch.from_numpy(lut_np).to(self.device)
                for m, net in enumerate(nets):
                    out = net.cell_embeddings(net.normalise(img), inst, lut)
                    cb = out["cell_batch"].cpu().numpy()
                    cl = out["cell_label"].cpu().numpy()
                    gidx = flat[starts[cb] + cl - 1]
                    emb[m][torch.from_numpy(gidx)] = out["emb"].float().cpu()
                    tile_feat[m][b0:b0 + len(rows)] = out["patch_feat"].float().cpu()
                pooled[gidx] = True
                if progress is not None:
                    progress(min(1.0, (b0 + len(tiles)) / len(keys)), f"{b0 + len(tiles)} of {len(keys)} tiles")
        return emb, tile_feat, tile_of, len(keys), pooled

    def _heads(self, nets: Sequence[GhistNet], xy: np.ndarray, emb: list[torch.Tensor], tile_feat: list[torch.Tensor],
               tile_of: np.ndarray, cell_inputs: np.ndarray | None, gene_idx: list[int], chunk_cells: int
               ) -> dict[str, np.ndarray | None]:
        """Neighbourhood context (CPU k-d tree over all cells), then the heads in ``chunk_cells`` chunks.

        Every output is member 0's; with more ``nets``, each chunk also runs the others and keeps
        only the per-cell spread of log1p(expression) (Welford over the members: two chunk-sized
        buffers whatever their number, exactly 0 where they agree).
        """
        cfg = self.net.cfg
        n, d = emb[0].shape
        k = len(nets)
        # one k-d tree for every member's context: the sparse mean is column by column, so member 0's
        # columns are the same numbers as when it runs alone
        values = [e.numpy() for e in emb] + ([] if cell_inputs is None else [cell_inputs])
        ctx, cnt = radius_neighbour_mean(xy, values[0] if len(values) == 1 else np.concatenate(values, 1),
                                         cfg.context_radius_um)
        ctx_inputs = None if cell_inputs is None else np.ascontiguousarray(ctx[:, k * d:])
        rows_of = (lambda a, s: None if a is None else torch.from_numpy(a[s:s + chunk_cells]).to(self.device))  # noqa: E731
        res: dict[str, list[np.ndarray]] = {"expr": [], "type_prob": [], "nbhd": [], "morph": [], "spread": []}
        with torch.no_grad(), _exact_float32():
            for s in range(0, n, chunk_cells):
                count, tiles = rows_of(cnt, s), torch.from_numpy(tile_of[s:s + chunk_cells])
                inputs, ctx_in = rows_of(cell_inputs, s), rows_of(ctx_inputs, s)
                mean = m2 = None
                for m, net in enumerate(nets):
                    own_ctx = np.ascontiguousarray(ctx[s:s + chunk_cells, m * d:(m + 1) * d])  # this member's columns
                    o = net.heads(emb[m][s:s + chunk_cells].to(self.device), torch.from_numpy(own_ctx).to(self.device),
                                  count, tile_feat[m][tiles].to(self.device), inputs, ctx_in)
                    expr = o["expr"][:, gene_idx].clamp(min=0).float()
                    if m == 0:
                        res["expr"].append(expr.cpu().numpy())
                        res["type_prob"].append(o["type_prob"].float().cpu().numpy())
                        res["nbhd"].append(o["nbhd_logits"].softmax(1).float().cpu().numpy())
                        res["morph"].append(o["morph"].float().cpu().numpy())
                    if k > 1:
                        x = torch.log1p(expr)
                        if mean is None:
                            mean, m2 = x, torch.zeros_like(x)
                        else:
                            delta = x - mean
                            mean = mean + delta / (m + 1)
                            m2 = m2 + delta * (x - mean)
                    del o, expr
                if k > 1:
                    res["spread"].append((m2 / (k - 1)).clamp(min=0).sqrt().mean(1).cpu().numpy())
                del mean, m2
        return {"expression": np.concatenate(res["expr"]).astype(np.float32),
                "type_probabilities": np.concatenate(res["type_prob"]).astype(np.float32),
                "neighbourhood": np.concatenate(res["nbhd"]).astype(np.float32),
                "morphology": np.concatenate(res["morph"]) * self._morph_std + self._morph_mean,
                "n_context": cnt,
                "uncertainty": np.concatenate(res["spread"]).astype(np.float32) if k > 1 else None}

    def _no_cells(self, cells: pd.DataFrame | None, gene_idx: list[int], params: dict) -> "CellPredictions":
        k, m = len(self.cell_types), len(self.net.cfg.morph_features)
        empty = cells.iloc[:0] if isinstance(cells, pd.DataFrame) else pd.DataFrame()
        return CellPredictions(cells=empty, xy=np.zeros((0, 2)), rays_um=np.zeros((0, N_RAYS)), gene_idx=gene_idx,
                               expression=np.zeros((0, len(gene_idx)), np.float32),
                               type_probabilities=np.zeros((0, k), np.float32), neighbourhood=np.zeros((0, k), np.float32),
                               morphology=np.zeros((0, m), np.float32), n_context=np.zeros(0, np.float32),
                               params=params, timings={})

    def to_anndata(self, pred: "CellPredictions"):
        """The result AnnData of :meth:`predict_arrays` (layout in :mod:`ghist_core._keys`), without ``uns["ghist"]``."""
        import anndata as ad

        n, cells = len(pred.xy), pred.cells
        obs = pd.DataFrame(index=pd.RangeIndex(n).astype(str))
        obs[K.OBS_CELL_ID] = (cells["cell_id"].to_numpy(np.int64) if "cell_id" in cells else np.arange(n, dtype=np.int64))
        codes = pred.type_probabilities.argmax(1) if n else np.zeros(0, np.int64)
        obs[K.OBS_CELL_TYPE] = pd.Categorical(np.asarray(self.cell_types)[codes], categories=self.cell_types)
        if n:  # an empty result keeps only the columns every result has
            for c in MORPH_COLUMNS:
                if c in cells.columns:
                    obs[c] = cells[c].to_numpy(np.float64)
            for c in SEGMENTATION_COLUMNS:
                if c in cells.columns:
                    obs[c] = cells[c].to_numpy(np.float32)
            for j, name in enumerate(self.net.cfg.morph_features):
                v = pred.morphology[:, j]
                if name == "log_area_um2":
                    obs["pred_area_um2"] = np.exp(v).astype(np.float32)
                else:
                    obs[f"pred_{name}"] = v.astype(np.float32)
            obs[K.OBS_N_CONTEXT] = pred.n_context.astype(np.int32)
            if pred.uncertainty is not None:
                obs[K.OBS_EXPRESSION_UNCERTAINTY] = pred.uncertainty.astype(np.float32)
            obs.index = K.obs_names_for(obs[K.OBS_CELL_ID])
            if not obs.index.is_unique:
                obs.index = pd.RangeIndex(n).astype(str)
        a = ad.AnnData(X=pred.expression, obs=obs, var=pd.DataFrame(index=[self.genes[i] for i in pred.gene_idx]))
        a.obsm[K.OBSM_SPATIAL] = pred.xy.astype(np.float64)
        K.set_obsm_matrix(a, K.OBSM_TYPE_PROBABILITIES, pred.type_probabilities.astype(np.float32), self.cell_types)
        K.set_obsm_matrix(a, K.OBSM_NEIGHBOURHOOD, pred.neighbourhood.astype(np.float32), self.cell_types)
        K.set_obsm_matrix(a, K.OBSM_NUCLEUS_RAYS, pred.rays_um.astype(np.float32), RAY_COLUMNS)
        return a


@dataclass
class CellPredictions:
    """Per-cell outputs of one :meth:`GhistModel.predict_arrays` call (rows follow ``cells``)."""

    cells: pd.DataFrame               # the input rows kept (cells outside the slide dropped)
    xy: np.ndarray                    # (n, 2) centroids, µm
    rays_um: np.ndarray               # (n, 16) star contour the features were pooled inside
    gene_idx: list[int]               # columns of ``model.genes`` in ``expression``
    expression: np.ndarray            # (n, genes) float32 ≥ 0
    type_probabilities: np.ndarray    # (n, types) float32, rows sum to 1
    neighbourhood: np.ndarray         # (n, types) float32 composition within nbhd_radius_um
    morphology: np.ndarray            # (n, morph features), in their own units
    n_context: np.ndarray             # (n,) cells within context_radius_um (self included)
    uncertainty: np.ndarray | None = None  # (n,) spread across the ensemble members (uncertainty=True), else None
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _slide_sha256(slide: Any) -> str:
    """The slide file's sha256 (a full read), or "" for a slide without a file."""
    path = getattr(slide, "path", None)
    if path is None or not Path(path).is_file():
        return ""
    return sha256_file(path)


def _cell_input_values(cells: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray | None:
    """The segmentation-table columns a model reads per cell, checked (finite, present)."""
    if not names:
        return None
    missing = [c for c in names if c not in cells.columns]
    if missing:
        raise ModelInputError(
            f"This model also reads the nucleus-type probabilities of the learned segmenter ({', '.join(missing)}), "
            "which the cell table lacks: segment the slide with the learned segmenter (not the classical one).")
    vals = cells[list(names)].to_numpy(np.float64)
    if not np.isfinite(vals).all():
        raise ModelInputError(f"The cell table has missing or non-finite values in {', '.join(names)}.")
    return vals.astype(np.float32)


# --------------------------------------------------------------------------------------------
# loading and saving
# --------------------------------------------------------------------------------------------
def _net_from(state: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> GhistNet:
    if "config" not in card:
        raise WeightsFormatError("The model card has no 'config' section; these are not GHIST weights.")
    try:
        cfg = GhistConfig.from_dict(dict(card["config"]))
        if int(cfg.patch_px) < 1 or not float(cfg.mpp) > 0:  # read by GhistModel, not by the network
            raise ValueError(f"patch_px {cfg.patch_px!r} and mpp {cfg.mpp!r} must be positive numbers")
        net = GhistNet(cfg)
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError, RuntimeError) as exc:  # wrong types
        raise WeightsFormatError(f"The model card describes no usable GHIST network ({str(exc)[:200]}).") from None
    state = dict(state)
    for k, v in net.state_dict().items():  # BatchNorm step counters are not saved
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsFormatError(f"The weights do not fit the GHIST network described by their card: {str(exc)[:300]}") from exc
    return net.eval()


def _split_members(state: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The state dict of each ensemble member, member 0 first (its tensors are the unprefixed ones)."""
    k = ensemble_size(card)
    parts: dict[int, dict[str, torch.Tensor]] = {0: {}}
    for name, tensor in state.items():
        hit = _MEMBER_KEY.match(name)
        if hit is None:
            parts[0][name] = tensor
            continue
        i = int(hit.group(1))
        if not 1 <= i < k:
            raise WeightsFormatError(f"The weights hold tensors of ensemble member {i} ({name}), but the model card "
                                     f"lists {k} member{'s' if k != 1 else ''}: the card and the weights do not belong together.")
        parts.setdefault(i, {})[hit.group(2)] = tensor
    missing = [i for i in range(1, k) if i not in parts]
    if missing:
        raise WeightsFormatError(f"The model card lists {k} ensemble members but the weights file holds {k - len(missing)} "
                                 f"(no tensors named member{missing[0]}.*): the card and the weights do not belong together.")
    return [parts[i] for i in range(k)]


def load_ghist(model_id: str | None = None, device: str = "auto", *, path: str | Path | None = None) -> GhistModel:
    """Load GHIST weights (safetensors + JSON card, sha256-checked) ready to ``predict``.

    ``path`` points at a ``.safetensors`` file with its card beside it; otherwise
    ``model_id`` is resolved by :func:`ghist_core.weights.resolve.resolve_weights` (``None`` =
    the bundled ``ghist-her2st``, then the project's Hub repo). An ensemble's other members
    (``model.members[1:]``) are checked now and kept on the CPU until ``uncertainty=True`` asks for them.
    """
    from ghist_core.device import pick_device
    from ghist_core.weights.resolve import load_state_dict, resolve_file, resolve_weights

    dev = pick_device(device)

    if path is not None:
        wp = Path(path)
        cp = wp.with_suffix(".json")
        if not wp.exists() or not cp.exists():
            from ghist_core.errors import WeightsNotFoundError

            raise WeightsNotFoundError(f"GHIST weights need {wp.name} and {cp.name} side by side in {wp.parent}.")
        r = resolve_file(wp)  # card read safely, seal and sha256 checked: unverified weights never load
    else:
        r = resolve_weights(model_id, name=MODEL_NAME, kind="ghist")
    parts = _split_members(load_state_dict(r), r.card)  # safetensors only, re-hashed as it is parsed
    nets = [_net_from(p, r.card) for p in parts]
    return GhistModel(nets[0], r.card, r.sha256, dev, members=nets[1:])


def _tensors(net: GhistNet, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def save_ghist(net: GhistNet, folder: str | Path, card: Mapping[str, Any], name: str = MODEL_NAME, *,
               members: Sequence[GhistNet] | None = None) -> Path:
    """Write ``<name>.safetensors`` + ``<name>.json`` (sealed card with config); returns the weights path.

    ``members``: the ensemble's other members (other seeds of ``net``'s recipe, same config;
    ``net`` itself is skipped if listed), stored in the same file as ``member<k>.<tensor>``
    (k = 1, 2, …) and counted in the card's ``"ensemble"`` (``members``, and ``rule`` from
    ``card["ensemble"]`` or :data:`ENSEMBLE_RULE`). They only measure the model's spread.
    """
    others = [m for m in (members or ()) if m is not net]
    ens = card.get("ensemble")
    claimed = ens.get("members") if isinstance(ens, Mapping) else None
    if claimed is not None and claimed != 1 + len(others):
        raise ValueError(f"The card's ensemble lists {claimed} members but {1 + len(others)} were given.")
    state = _tensors(net)
    for k, m in enumerate(others, start=1):
        if m.cfg.to_dict() != net.cfg.to_dict():
            raise ValueError(f"Ensemble member {k} has another configuration than member 0; members must be "
                             "seeds of one recipe.")
        state.update(_tensors(m, f"member{k}."))
    full = {"kind": "ghist", "name": name, **dict(card)}
    full["config"] = {**net.cfg.to_dict(), **dict(card.get("config", {}))}
    if others:
        full["ensemble"] = {"rule": ENSEMBLE_RULE, **(dict(ens) if isinstance(ens, Mapping) else {}),
                            "members": 1 + len(others)}
    from ghist_core.weights.resolve import save_weights

    return save_weights(state, folder, name, full).weights_path  # sealed card: sha256, card_sha256, integrity
