"""Input checks, resampling and the tiled whole-slide loop shared by every segmenter.

Seams: tiles overlap by ``overlap_px`` on every side; a nucleus is kept only from the tile
whose *core* (the tile minus its overlap margins) contains its centroid. Each centroid lies
in exactly one core, so there are no duplicates, and as long as a nucleus is smaller than
the overlap it lies wholly inside that tile, so there are no cut halves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ghist_core._types import ProgressCallback, ScaledReader, SlideLike
from ghist_core.errors import ModelInputError
from ghist_core.io.slide import check_mpp
from ghist_core.io.tiles import GridTile, TileGrid


class MppWarning(UserWarning):
    """The input's µm/px is far (more than 2x) from the resolution the segmenter works at."""


def check_rgb(rgb: object) -> np.ndarray:
    """An H x W x 3 uint8 array (RGBA drops alpha), or a ModelInputError that says what is wrong."""
    if not isinstance(rgb, np.ndarray):
        raise ModelInputError(f"The tile must be a numpy array, got {type(rgb).__name__}.")
    if rgb.ndim == 3 and rgb.shape[2] == 4:
        rgb = rgb[..., :3]
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ModelInputError(f"The tile must be an RGB image of shape H x W x 3, got shape {rgb.shape}.")
    if rgb.dtype != np.uint8:
        raise ModelInputError(f"The tile must be 8-bit (uint8) RGB, got {rgb.dtype}; convert it first "
                              "(e.g. scale 16-bit images to 0-255).")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ModelInputError(f"The tile is empty (shape {rgb.shape}).")
    return np.ascontiguousarray(rgb)


def warn_if_far(mpp: float, work_mpp: float, name: str) -> None:
    ratio = mpp / work_mpp
    if ratio > 2.0 or ratio < 0.5:
        warnings.warn(f"{name} works at {work_mpp} µm/px; this image is {mpp:.3g} µm/px "
                      f"({ratio:.2g}x), so it is resampled and results may be less accurate.",
                      MppWarning, stacklevel=3)


def resample_rgb(rgb: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of a uint8 RGB image (torch on CPU: fast, no extra deps)."""
    if rgb.shape[:2] == tuple(out_hw):
        return rgb
    t = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=out_hw, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resample_labels(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres mapped, no new ids)."""
    h, w = labels.shape
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return labels
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def working_shape(hw: tuple[int, int], mpp: float, work_mpp: float) -> tuple[int, int]:
    s = mpp / work_mpp
    return max(1, int(round(hw[0] * s))), max(1, int(round(hw[1] * s)))


def non_white_fraction(rgb: np.ndarray, *, white: int = 215) -> float:
    """The share of pixels darker than near-white in some channel (tissue, not glass or white padding)."""
    return float((rgb.min(axis=2) < white).mean()) if rgb.size else 0.0


def is_background(rgb: np.ndarray, *, white: int = 215, min_fraction: float = 0.01) -> bool:
    """True when (almost) no pixel is darker than near-white in any channel: glass or blank."""
    return non_white_fraction(rgb, white=white) < min_fraction


def is_featureless(rgb: np.ndarray, min_range: int = 12) -> bool:
    """True for a (nearly) uniform tile: every channel spans fewer than ``min_range`` grey levels.

    Such a tile (black, white or one flat colour, e.g. a scanner's fill or a blank array)
    has no nuclei; the network, never trained on it, can see some in pure black. An empty
    array counts as featureless.
    """
    flat = rgb.reshape(-1, rgb.shape[-1])
    if len(flat) == 0:
        return True
    return bool(np.all(flat.max(axis=0).astype(np.int16) - flat.min(axis=0) < min_range))


def _inside_slide(rgb: np.ndarray, spec: GridTile, width: int, height: int, seam_px: int = 3) -> np.ndarray:
    """The part of a working tile that lies on the slide (the rest was padded with white).

    A resampled read blends the padding into the slide's last pixels, so ``seam_px`` more are
    left out on each side where the slide ends inside the tile.
    """
    y0, x0 = max(0, -int(spec.read_y0)), max(0, -int(spec.read_x0))
    y1 = min(rgb.shape[0], int(height - spec.read_y0))
    x1 = min(rgb.shape[1], int(width - spec.read_x0))
    y0, x0 = y0 + (seam_px if y0 > 0 else 0), x0 + (seam_px if x0 > 0 else 0)
    y1, x1 = y1 - (seam_px if y1 < rgb.shape[0] else 0), x1 - (seam_px if x1 < rgb.shape[1] else 0)
    return rgb[y0:max(y0, y1), x0:max(x0, x1)]


@dataclass
class ArraySlide:
    """An in-memory RGB image behaving like a slide (for tests, benchmarks and big tiles)."""

    rgb: np.ndarray
    mpp: float

    @property
    def dimensions(self) -> tuple[int, int]:
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location
        w, h = size
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        H, W = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.rgb[y0:y1, x0:x1, :3]
        return out


def tile_grid(width: int, height: int, tile_px: int, overlap_px: int) -> TileGrid:
    """The segmenters' grid: ``tile_px`` tiles whose cores (``tile_px - 2*overlap``) partition the image."""
    if tile_px - 2 * overlap_px < 16:
        raise ModelInputError(f"tile_px ({tile_px}) must exceed twice the overlap ({overlap_px}) by at least 16.")
    return TileGrid.from_tile(width, height, tile_px, overlap_px)


def read_working_tile(slide: SlideLike, spec: GridTile, work_mpp: float) -> np.ndarray:
    """Read one tile at the working resolution (outside the slide reads as white)."""
    scale = work_mpp / float(slide.mpp)  # level-0 px per working px
    if scale != 1.0 and isinstance(slide, ScaledReader):
        try:
            loc = (int(round(spec.read_x0 * scale)), int(round(spec.read_y0 * scale)))
            return check_rgb(np.asarray(slide.read_region_mpp(loc, (spec.read_size, spec.read_size), work_mpp)))
        except (TypeError, NotImplementedError):
            pass
    x0 = int(math.floor(spec.read_x0 * scale))
    y0 = int(math.floor(spec.read_y0 * scale))
    n0 = int(math.ceil(spec.read_size * scale))
    W, H = slide.dimensions
    # clip the request to the slide and pad with white: readers differ outside bounds
    rx0, ry0 = max(x0, 0), max(y0, 0)
    rx1, ry1 = min(x0 + n0, W), min(y0 + n0, H)
    region = np.full((n0, n0, 3), 255, dtype=np.uint8)
    if rx1 > rx0 and ry1 > ry0:
        part = np.asarray(slide.read_region((rx0, ry0), 0, (rx1 - rx0, ry1 - ry0)))[..., :3]
        region[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0] = part
    return resample_rgb(region, (spec.read_size, spec.read_size))


def _drop_seam_twins(cells: pd.DataFrame, min_dist_um: float) -> pd.DataFrame:
    """Drop the second view of a nucleus that two tiles segmented slightly differently.

    Two tiles may cut a nucleus near their seam differently (one whole, one a part), and
    the two centroids then fall in different cores. Of two nuclei from different tiles
    whose centroids are closer than ``min_dist_um`` or than 0.8 x the larger one's
    equivalent radius (so they overlap), keep the larger. A KD-tree finds the pairs.
    """
    from scipy.spatial import cKDTree

    if len(cells) < 2:
        return cells
    xy = cells[["x_um", "y_um"]].to_numpy()
    r_eq = np.sqrt(cells["area_um2"].to_numpy() / np.pi)
    reach = max(min_dist_um, 0.8 * float(r_eq.max()))
    pairs = cKDTree(xy).query_pairs(reach, output_type="ndarray")
    if len(pairs) == 0:
        return cells
    tile = cells["_tile"].to_numpy()
    a, b = pairs[:, 0], pairs[:, 1]
    d = np.hypot(*(xy[a] - xy[b]).T)
    twin = (tile[a] != tile[b]) & (d < np.maximum(min_dist_um, 0.8 * np.maximum(r_eq[a], r_eq[b])))
    if not twin.any():
        return cells
    a, b = a[twin], b[twin]
    loser = np.where(r_eq[a] < r_eq[b], a, b)
    return cells.drop(index=cells.index[np.unique(loser)]).reset_index(drop=True)


def run_tiled(slide: SlideLike, work_mpp: float,
              segment_batch: Callable[[list[np.ndarray], float], list[pd.DataFrame]],
              *, tile_px: int, overlap_px: int, batch_size: int, progress: ProgressCallback | None = None,
              skip_background: bool = True, min_dist_um: float = 2.0) -> pd.DataFrame:
    """The whole-slide loop: read tiles, segment in batches, keep core nuclei, map to µm.

    ``segment_batch(tiles, mpp)`` takes working-resolution tiles and returns per-tile tables
    (pixel centroids ``x_px``/``y_px``, other measurements already in µm). Only one batch of
    tiles is in memory at a time. A slide within 2% of the working µm/px is read as it is
    (no resampling), so tiles line up pixel for pixel and seams are exact.
    """
    mpp = check_mpp(getattr(slide, "mpp", None))
    if abs(mpp / work_mpp - 1.0) < 0.02:
        work_mpp = mpp
    W, H = slide.dimensions
    ww, wh = working_shape((H, W), mpp, work_mpp)[::-1]
    specs = tile_grid(ww, wh, tile_px, overlap_px).tiles()
    frames: list[pd.DataFrame] = []
    batch: list[tuple[GridTile, np.ndarray]] = []
    done = 0

    def flush() -> None:
        if not batch:
            return
        tables = segment_batch([rgb for _, rgb in batch], work_mpp)
        for (spec, _), table in zip(batch, tables):
            gx = table["x_px"].to_numpy() + spec.read_x0
            gy = table["y_px"].to_numpy() + spec.read_y0
            keep = (gx >= spec.x0) & (gx < spec.x1) & (gy >= spec.y0) & (gy < spec.y1)
            t = table.loc[keep].copy()
            t["x_um"] = gx[keep] * work_mpp
            t["y_um"] = gy[keep] * work_mpp
            t["_tile"] = len(frames)
            # how far inside its core each centroid is (px): the seam tie-breaker below
            t["_margin"] = np.minimum.reduce([gx[keep] - spec.x0, spec.x1 - gx[keep],
                                              gy[keep] - spec.y0, spec.y1 - gy[keep]])
            frames.append(t)
        batch.clear()

    for spec in specs:
        rgb = read_working_tile(slide, spec, work_mpp)
        done += 1
        # a uniform slide area (black fill, one flat colour) holds no nuclei, and judging it on the
        # in-slide part only keeps the white padding beyond the edge from drawing a false edge
        if not (skip_background and (is_background(rgb) or is_featureless(_inside_slide(rgb, spec, ww, wh)))):
            batch.append((spec, rgb))
        if len(batch) >= batch_size:
            flush()
            if progress is not None:
                progress(done / len(specs), f"segmented {done} of {len(specs)} tiles")
    flush()
    if progress is not None:
        progress(1.0, f"segmented {len(specs)} of {len(specs)} tiles")
    if frames:
        cells = _drop_seam_twins(pd.concat(frames, ignore_index=True), min_dist_um)
    else:
        cells = segment_batch([np.full((tile_px, tile_px, 3), 255, np.uint8)], work_mpp)[0].iloc[:0].copy()
        cells["x_um"] = np.zeros(0)
        cells["y_um"] = np.zeros(0)
    cells = cells.drop(columns=[c for c in ("id", "x_px", "y_px", "cell_id", "_tile", "_margin") if c in cells.columns])
    cells.insert(0, "cell_id", np.arange(len(cells), dtype=np.int64))
    front = ["cell_id", "x_um", "y_um"]
    return cells[front + [c for c in cells.columns if c not in front]].reset_index(drop=True)
