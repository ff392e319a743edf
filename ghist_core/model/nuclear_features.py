"""Frozen nucleus features from the bundled segmentation network, pooled per nucleus.

Why: HER2ST gives ~1,000 imaged spots, too few to train a CNN from scratch (our
from-scratch GHIST trailed a patch CNN). The nucleus segmenter was trained on CoNSeP and
MoNuSeg (other data, so no leakage), already separates epithelial, inflammatory and
spindle nuclei, and runs at the same 0.5 µm/px. Its encoder stages, decoder output and
type probabilities, averaged inside every nucleus mask, give each cell a rich descriptor;
GHIST's heads learn on top of them. Frozen features also make the heads trainable on a
CPU in minutes (features are computed once per view).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .pooling import pool_cells, relabel_batch

__all__ = ["NucleusFeatures"]


class NucleusFeatures(nn.Module):
    """Frozen SegNet → per-nucleus mean (and max) of every feature map + per-patch means.

    Per cell: mean inside the mask of each encoder stage (strides 1…16, nearest lookup at
    coarse stages so small nuclei still read their location), of the decoder output, of
    the type and foreground probabilities; the max of the decoder output and type
    probabilities; the mean RGB inside the mask; log area (µm²).
    Per patch: spatial mean of the three deepest stages and of the type probabilities.
    """

    def __init__(self, seg_arch: dict, mpp: float) -> None:
        super().__init__()
        from ghist_core.segmentation.model import SegNet, SegNetConfig

        self.seg_cfg = SegNetConfig.from_dict(dict(seg_arch))
        self.seg = SegNet(self.seg_cfg)
        self.mpp = float(mpp)
        for p in self.seg.parameters():
            p.requires_grad_(False)
        self.seg.eval()
        w = self.seg_cfg.widths
        k = self.seg_cfg.n_types
        self.cell_dim = sum(w) + 2 * (w[0] + k) + 1 + 3 + 1
        self.patch_dim = sum(w[-3:]) + k

    def train(self, mode: bool = True) -> "NucleusFeatures":
        super().train(mode)
        self.seg.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    @torch.no_grad()
    def forward(self, rgb01: torch.Tensor, instances: torch.Tensor) -> dict[str, torch.Tensor]:
        """``rgb01`` (B, 3, H, W) in 0..1, ``instances`` (B, H, W) → per-cell and per-patch features."""
        stages, dec = self.seg.encode_decode(rgb01.float())
        tp = self.seg.tp_head(dec).softmax(1)
        fg = torch.sigmoid(self.seg.np_head(dec))
        gmap, cell_batch, cell_label = relabel_batch(instances)
        n = int(cell_batch.numel())
        full = torch.cat([dec, tp], 1)
        both, n_pix, cen = pool_cells(full, gmap, n, reduce="mean+max", centroids=True)
        parts = [both]
        for f in [stages[0], fg, rgb01.float()] + stages[1:]:
            parts.append(pool_cells(f, gmap, n, reduce="mean")[0])
        area = (n_pix * self.mpp**2).clamp(min=1e-3).log().unsqueeze(1)
        cell_feat = torch.cat(parts + [area], 1)
        patch_feat = torch.cat([s.mean((2, 3)) for s in stages[-3:]] + [tp.mean((2, 3))], 1)
        return {"cell_feat": cell_feat, "cell_batch": cell_batch, "cell_label": cell_label,
                "centroid_px": cen, "n_pix": n_pix, "patch_feat": patch_feat}
