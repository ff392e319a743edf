"""Tissue detection on a slide thumbnail.

Why: most of a whole-slide image is empty glass. Finding tissue on a small
thumbnail (a few hundred thousand pixels) lets the tile iterator skip the glass
without ever decoding it at full resolution.

The mask is: (saturation above an Otsu threshold) OR (darker than an Otsu
threshold on grey), with both thresholds clamped to sensible ranges so that a
thumbnail that is almost all tissue (or almost all glass) is not split in half;
then small holes are filled and small specks removed. Everything is vectorised
(numpy / scipy.ndimage), no Python loop over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["TissueMaskConfig", "tissue_mask", "otsu_threshold", "boxes_in_tissue", "boxes_tissue_fraction", "tissue_fraction"]


@dataclass(frozen=True)
class TissueMaskConfig:
    """Settings of :func:`tissue_mask` (fractions of 0..1 scaled intensities)."""

    #: Saturation threshold is Otsu's, clamped to [min, max]: H&E tissue is at least a
    #: little coloured and glass is grey, so the threshold never goes outside this band.
    min_saturation: float = 0.04
    max_saturation: float = 0.15
    #: Grey-level threshold for "dark" tissue (e.g. dense nuclei, poorly stained areas),
    #: Otsu's clamped to at most this value; glass is brighter than this.
    max_dark_grey: float = 0.80
    #: Pixels darker than this are treated as scanner borders / pen / black fill, not tissue.
    black_grey: float = 0.06
    #: Remove tissue specks smaller than this fraction of the thumbnail's area.
    min_object_fraction: float = 5e-4
    #: Fill holes smaller than this fraction of the thumbnail's area.
    max_hole_fraction: float = 0.02
    #: Median filter size (thumbnail px) applied to the saturation channel against noise.
    smooth_px: int = 3


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold of ``values`` (any shape), computed from a histogram, vectorised."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return float(value_range[0] + value_range[1]) / 2.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop connected components smaller than ``min_px`` pixels (bincount, no loop)."""
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background components not touching the border and smaller than ``max_px``."""
    if max_px <= 0:
        return mask
    filled = ndi.binary_fill_holes(mask)
    holes = filled & ~mask
    if not holes.any():
        return mask
    labels, n = ndi.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes <= max_px
    fill[0] = False
    return mask | fill[labels]


def tissue_mask(rgb: np.ndarray, config: TissueMaskConfig | None = None) -> np.ndarray:
    """Boolean tissue mask (H x W) of an RGB thumbnail (uint8 H x W x 3).

    Tissue = saturated (Otsu on HSV saturation) or dark (Otsu on grey), but not black;
    then holes filled and small specks removed (sizes relative to the thumbnail).
    """
    cfg = config or TissueMaskConfig()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"tissue_mask expects an H x W x 3 RGB image, got shape {rgb.shape}")
    img = rgb[..., :3].astype(np.float32) / 255.0
    mx = img.max(axis=2)
    mn = img.min(axis=2)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    if cfg.smooth_px > 1:
        sat = ndi.median_filter(sat, size=cfg.smooth_px)
    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)

    t_sat = float(np.clip(otsu_threshold(sat), cfg.min_saturation, cfg.max_saturation))
    t_dark = min(otsu_threshold(grey), cfg.max_dark_grey)
    mask = ((sat > t_sat) | (grey < t_dark)) & (grey > cfg.black_grey)

    area = mask.size
    mask = _fill_small_holes(mask, int(cfg.max_hole_fraction * area))
    mask = _remove_small(mask, int(cfg.min_object_fraction * area))
    return mask


def tissue_fraction(mask: np.ndarray) -> float:
    """Fraction of the thumbnail covered by tissue (0..1)."""
    return float(np.mean(mask)) if mask.size else 0.0


def boxes_in_tissue(
    mask: np.ndarray,
    boxes_level0: np.ndarray,
    downsample_xy: tuple[float, float],
    min_fraction: float = 0.0,
) -> np.ndarray:
    """Which level-0 boxes ``(x, y, w, h)`` (N x 4) touch tissue in ``mask``.

    ``downsample_xy`` is level-0 pixels per mask pixel along x and y. A box is kept
    when the fraction of its mask pixels that are tissue is > ``min_fraction`` (so the
    default keeps any box with at least one tissue pixel); see :func:`boxes_tissue_fraction`.
    """
    frac = boxes_tissue_fraction(mask, boxes_level0, downsample_xy)
    return (frac > 0) & (frac > min_fraction)


def boxes_tissue_fraction(mask: np.ndarray, boxes_level0: np.ndarray, downsample_xy: tuple[float, float]) -> np.ndarray:
    """``(N,)`` fraction (0..1) of each level-0 box's mask pixels that are tissue.

    Uses a summed-area table: one vectorised lookup for all boxes (the pipeline's time-left
    estimate weighs each block by its tissue from this, once per slide).
    """
    boxes = np.asarray(boxes_level0, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    mh, mw = mask.shape
    sat = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    dx, dy = float(downsample_xy[0]), float(downsample_xy[1])
    x0 = np.clip(np.floor(boxes[:, 0] / dx), 0, mw).astype(np.int64)
    y0 = np.clip(np.floor(boxes[:, 1] / dy), 0, mh).astype(np.int64)
    x1 = np.clip(np.ceil((boxes[:, 0] + boxes[:, 2]) / dx), 0, mw).astype(np.int64)
    y1 = np.clip(np.ceil((boxes[:, 1] + boxes[:, 3]) / dy), 0, mh).astype(np.int64)
    x1 = np.maximum(x1, x0)
    y1 = np.maximum(y1, y0)
    count = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    n = (x1 - x0) * (y1 - y0)
    return np.divide(count, n, out=np.zeros(len(n), dtype=np.float64), where=n > 0)
