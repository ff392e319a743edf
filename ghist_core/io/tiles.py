"""The one tile-grid definition: square cores that partition an image, each read with a halo.

Why one: the segmenters' tiled loop and the pipeline's checkpointed blocks cut a slide the
same way (a nucleus belongs to the tile whose *core* holds its centroid; the *halo* around
the core is read too so nuclei on the edge are whole). Cores start at the origin, step by
their side in row-major order (the order checkpoints and results follow), and the last
row/column is clipped to the image, so every pixel is in exactly one core.

Units are grid pixels at ``mpp`` µm/px: the segmenters use working-resolution pixels, the
pipeline a 1 µm lattice (``mpp=1.0``, i.e. µm). Integer sizes give integer coordinates.

Over a whole slide: ``grid = TileGrid.over_slide(slide, tile_px, halo_px, mpp)``, keep the
tiles with tissue with ``grid.in_tissue(*slide.tissue_mask(), slide.mpp)``, and read each with
``grid.read(slide, tile)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from ghist_core.io.slide import Slide

__all__ = ["TileGrid", "GridTile", "evenly_spaced"]


@dataclass(frozen=True)
class GridTile:
    """One tile: its core ``(x0, y0, w, h)`` (clipped to the image) and the read box around it."""

    index: int
    col: int
    row: int
    x0: float
    y0: float
    w: float
    h: float
    read_x0: float  # top-left of the read box: core origin minus the halo (may be negative)
    read_y0: float
    read_size: float  # side of the read box, core + 2 x halo (never clipped)

    @property
    def x1(self) -> float:
        """Right edge of the core (exclusive)."""
        return self.x0 + self.w

    @property
    def y1(self) -> float:
        """Bottom edge of the core (exclusive)."""
        return self.y0 + self.h


@dataclass(frozen=True)
class TileGrid:
    """Square tiles over a ``width`` x ``height`` image whose cores partition it.

    Parameters
    ----------
    width, height
        Image size in grid pixels.
    core
        Side of the part each tile owns.
    halo
        Margin read around the core on every side (``core + 2 * halo`` is the tile read).
    mpp
        µm per grid pixel (``x_um = origin_um[0] + x * mpp``).
    origin_um
        Where grid pixel (0, 0) lies on the slide, µm.
    """

    width: float
    height: float
    core: float
    halo: float = 0
    mpp: float = 1.0
    origin_um: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not self.core > 0:
            raise ValueError(f"the tile core must be positive, got {self.core}")
        if self.halo < 0:
            raise ValueError(f"the halo must not be negative, got {self.halo}")

    @classmethod
    def from_tile(cls, width: int, height: int, tile_px: int, halo_px: int, **kw) -> "TileGrid":
        """A grid of ``tile_px`` tiles read with ``halo_px`` on every side (core ``tile_px - 2 halo_px``)."""
        return cls(width, height, tile_px - 2 * halo_px, halo_px, **kw)

    @classmethod
    def over_slide(cls, slide: "Slide", tile_px: int, halo_px: int = 0, mpp: float | None = None) -> "TileGrid":
        """``tile_px`` tiles (``halo_px`` of it on every side) covering ``slide`` at ``mpp`` µm/px.

        ``mpp`` defaults to the slide's own; ``InvalidMppError`` for a non-positive or
        non-finite one, or one that would enlarge the slide more than it allows
        (``Slide.check_upsampling``). Grid pixel (0, 0) is the slide's top-left corner.
        """
        from ghist_core.io.slide import check_mpp

        t = float(slide.mpp) if mpp is None else check_mpp(mpp, "target µm per pixel", plausible=False)
        slide.check_upsampling(t)
        w_um, h_um = slide.size_um
        # rounded so a slide exactly N tiles wide does not get an extra sliver column from float error
        return cls.from_tile(round(w_um / t, 6), round(h_um / t, 6), int(tile_px), int(halo_px), mpp=t)

    def _starts(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(0, self.width, self.core), np.arange(0, self.height, self.core)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        xs, ys = self._starts()
        return len(ys), len(xs)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def cores(self) -> np.ndarray:
        """``(N, 4)`` core boxes ``(x, y, w, h)`` in grid pixels, row-major, clipped to the image."""
        xs0, ys0 = self._starts()
        ys, xs = np.meshgrid(ys0, xs0, indexing="ij")
        xs, ys = xs.ravel(), ys.ravel()
        ws, hs = np.minimum(self.core, self.width - xs), np.minimum(self.core, self.height - ys)
        return np.stack([xs, ys, ws, hs], axis=1)

    def in_tissue(self, mask: np.ndarray, downsample: tuple[float, float], level0_mpp: float,
                  *, min_fraction: float = 0.0) -> np.ndarray:
        """``(N,)`` bool: cores with tissue on a thumbnail mask (``Slide.tissue_mask``) of a slide at ``level0_mpp``."""
        from ghist_core.imaging.tissue import boxes_in_tissue

        boxes = self.cores()
        if self.mpp != 1.0 or self.origin_um != (0.0, 0.0):
            boxes = boxes * self.mpp + np.array([self.origin_um[0], self.origin_um[1], 0.0, 0.0])
        return boxes_in_tissue(mask, boxes / level0_mpp, downsample, min_fraction=min_fraction)

    def read(self, slide: "Slide", tile: GridTile) -> np.ndarray:
        """uint8 RGB of ``tile``'s read box (core + halo, ``read_size`` square) at ``mpp`` µm/px.

        Parts beyond the slide are white. The grid must lie on ``slide`` (e.g. :meth:`over_slide`).
        """
        x_um = self.origin_um[0] + tile.read_x0 * self.mpp
        y_um = self.origin_um[1] + tile.read_y0 * self.mpp
        mx, my = slide.mpp_xy
        n = int(round(tile.read_size))
        return slide.read_region_mpp((x_um / mx, y_um / my), (n, n), self.mpp)

    def tiles(self, keep: np.ndarray | None = None) -> list[GridTile]:
        """The tiles (those where ``keep`` is True), indexed 0, 1, 2, ... in row-major order."""
        return list(self.iter(keep))

    def iter(self, keep: np.ndarray | None = None) -> Iterator[GridTile]:
        """Tiles one at a time (see :meth:`tiles`)."""
        rows, cols = self.shape
        boxes = self.cores().tolist()  # Python ints for integer grids, floats otherwise
        size = self.core + 2 * self.halo
        i = 0
        for k, (x, y, w, h) in enumerate(boxes):
            if keep is not None and not keep[k]:
                continue
            yield GridTile(i, k % cols, k // cols, x, y, w, h, x - self.halo, y - self.halo, size)
            i += 1

    def __iter__(self) -> Iterator[GridTile]:
        return self.iter()


def evenly_spaced(n_items: int, k: int) -> np.ndarray:
    """Indices of at most ``k`` of ``n_items`` things (tiles, blocks, spots) spread evenly from the first
    to the last: a fixed-size sample of a slide, whatever its size."""
    if n_items <= 0 or k <= 0:
        return np.zeros(0, int)
    return np.unique(np.linspace(0, n_items - 1, min(k, n_items)).round().astype(int))
