"""One slide reader over OpenSlide, tifffile and Pillow.

Why: clinicians bring SVS, NDPI, MRXS, OME-TIFF, plain TIFF, PNG and JPEG files.
Every later step (segmentation, GHIST, figures) wants the same thing: RGB pixels at a
known size in micrometres. ``open_slide`` picks a backend from the file's *content*
(never its name), and every ``Slide`` answers the same calls:

>>> with open_slide("CMU-1-Small-Region.svs") as s:            # doctest: +SKIP
...     for tile in s.iter_tiles(tile_px=256, target_mpp=0.5):
...         ...

Rules kept here:
- µm per pixel is explicit: from the file's metadata or given by the caller; never a
  guess. A file with no usable scale raises ``MissingMppError`` unless ``mpp=`` is given.
- Pixels returned are always uint8 H x W x 3 RGB. Greyscale is replicated to RGB;
  alpha is composited on white (glass); 16-bit and floating-point images raise
  ``UnsupportedPixelFormatError`` (we do not guess their intensity range).
- Memory stays bounded: regions are read from the best pyramid level and, for TIFFs,
  only the tiles/strips that overlap the region are decoded.
- Associated images (label, macro) are never read or exposed: labels can carry
  patient names.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from PIL import Image

from ghist_core.imaging import tissue as _tissue
from ghist_core.errors import (
    CorruptSlideError,
    EmptyFileError,
    ImageTooLargeError,
    InvalidMppError,
    MissingMppError,
    NoTissueError,
    SlideError,
    UnsupportedPixelFormatError,
    UnsupportedSlideError,
)

__all__ = [
    "MAX_PLAIN_IMAGE_PIXELS",
    "MAX_REGION_PIXELS",
    "PLAUSIBLE_MPP_RANGE",
    "Slide",
    "Tile",
    "TileSpec",
    "open_slide",
    "read_image_array",
    "check_mpp",
    "check_tiff_integrity",
    "sniff_format",
]

#: Largest PNG/JPEG (width x height) we decode: 500 Mpx, i.e. 1.5 GB as RGB. Plain
#: images are decoded whole, so anything bigger must come as a tiled (pyramidal) TIFF.
MAX_PLAIN_IMAGE_PIXELS = 500_000_000
# Pillow's own bomb guard warns above MAX_IMAGE_PIXELS and refuses above twice that;
# align it with ours so both agree (we refuse first, with a clearer message).
Image.MAX_IMAGE_PIXELS = MAX_PLAIN_IMAGE_PIXELS

#: Largest single region ``read_region`` will allocate (1.5 Gpx, 4.5 GB as RGB).
MAX_REGION_PIXELS = 1_500_000_000

#: The one plausible µm/px range for brightfield images (from beyond an 80x scan to a
#: 1x overview). A value read from a file outside it is a placeholder (e.g. the 72-dpi
#: default many tools write = 353 µm/px) and counts as missing; a value a person or a
#: caller gives outside it is refused by :func:`check_mpp`.
PLAUSIBLE_MPP_RANGE = (0.02, 50.0)

Backend = Literal["openslide", "tifffile", "pillow"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SUPPORTED_TEXT = (
    "GHIST Studio reads whole-slide images (Aperio .svs, Hamamatsu .ndpi, 3DHISTECH .mrxs, "
    "Leica .scn, Philips/generic tiled TIFF, OME-TIFF) and plain PNG/JPEG images "
    "(for those you must enter the micrometres per pixel)."
)


# --------------------------------------------------------------------------- helpers
def check_mpp(value: Any, what: str = "µm per pixel", *, plausible: bool = True) -> float:
    """``value`` as a float if it is a usable µm/px, else ``InvalidMppError``.

    Usable: a finite positive number and, with ``plausible`` (the default, for a slide's
    or an image's own scale), inside :data:`PLAUSIBLE_MPP_RANGE`. Resampling targets
    (``read_region_mpp``) pass ``plausible=False``: an overview may be read at any scale.
    """
    if isinstance(value, bool):
        raise InvalidMppError(f"The {what} must be a number such as 0.5, not {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidMppError(f"The {what} must be a number such as 0.5, not {value!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise InvalidMppError(
            f"The {what} must be a positive number (for example 0.25 for a 40x scan or 0.5 "
            f"for 20x); got {value!r}."
        )
    lo, hi = PLAUSIBLE_MPP_RANGE
    if plausible and not lo <= v <= hi:
        raise InvalidMppError(
            f"The {what} {v:g} is outside the plausible range {lo:g}–{hi:g} for brightfield images "
            "(a 40x scan is about 0.25, 20x about 0.5)."
        )
    return v


def sniff_format(path: str | os.PathLike) -> str:
    """Kind of file from its first bytes: ``"tiff" | "png" | "jpeg" | "unknown"``."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[:8] == _PNG_MAGIC:
        return "png"
    if head[:3] == _JPEG_MAGIC:
        return "jpeg"
    return "unknown"


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend an RGBA (or grey+alpha) uint8 image on white; returns uint8 RGB/grey."""
    colour = rgba[..., :-1]
    alpha = rgba[..., -1:]
    if alpha.min() == 255:
        return np.ascontiguousarray(colour)
    a = alpha.astype(np.uint16)
    out = (colour.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb8(arr: np.ndarray, where: str) -> np.ndarray:
    """Any 8-bit grey / grey+alpha / RGB / RGBA array (H x W [x C]) to uint8 RGB."""
    if arr.dtype != np.uint8:
        raise UnsupportedPixelFormatError(_pixel_format_message(arr.dtype, where))
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    if c == 2 or c == 4:
        arr = _composite_on_white(arr)
        c -= 1
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 3:
        return np.ascontiguousarray(arr)
    raise UnsupportedPixelFormatError(
        f"{where} has {arr.shape[2]} channels per pixel; GHIST Studio needs a brightfield "
        "RGB (H&E) image. Multi-channel fluorescence images are not supported."
    )


def _pixel_format_message(dtype: Any, where: str) -> str:
    return (
        f"{where} stores {np.dtype(dtype).name} pixels; GHIST Studio needs 8-bit RGB "
        "(as brightfield scanners write). 16-bit and floating-point images are not "
        "converted automatically because their brightness range is ambiguous: please "
        "export the image as 8-bit RGB and upload it again."
    )


def _plausible_mpp(v: float | None) -> float | None:
    """A µm/px read from a file, or None when it is missing or a placeholder."""
    try:
        return check_mpp(v)
    except InvalidMppError:
        return None


# --------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class TileSpec:
    """Where a tile lies, before its pixels are read.

    ``box_level0`` is ``(x, y, w, h)`` in level-0 pixels (floats: tiles at a target
    µm/px need not fall on whole level-0 pixels).
    """

    index: int
    col: int
    row: int
    x_um: float
    y_um: float
    mpp: float
    size_px: int
    box_level0: tuple[float, float, float, float]


@dataclass
class Tile:
    """One tile of a slide: ``rgb`` is uint8 H x W x 3 at ``mpp`` µm/px.

    ``x_um``, ``y_um``: top-left corner on the slide in µm; ``col``, ``row``: grid
    index; ``index``: position in the iteration (0, 1, 2, ...). Tiles are always
    ``tile_px`` square; parts beyond the slide edge are white (like glass).
    """

    rgb: np.ndarray
    mpp: float
    x_um: float
    y_um: float
    col: int
    row: int
    index: int
    box_level0: tuple[float, float, float, float] = field(default=(0.0, 0.0, 0.0, 0.0))

    @property
    def size_um(self) -> tuple[float, float]:
        """(width, height) of the tile in µm."""
        return (self.rgb.shape[1] * self.mpp, self.rgb.shape[0] * self.mpp)


# --------------------------------------------------------------------------- Slide
class Slide:
    """A whole-slide (or plain) image with a known µm/px.

    Attributes
    ----------
    path, format (backend: ``"openslide" | "tifffile" | "pillow"``), vendor,
    dimensions (w, h at level 0), mpp (µm/px at level 0, x), mpp_xy, mpp_source
    (``"file"`` or ``"given"``), level_count, level_dimensions, level_downsamples,
    properties (raw metadata dict), objective_power (float or None).
    """

    format: Backend

    def __init__(self, path: Path, *, mpp_given: float | None) -> None:
        self.path = Path(path)
        self._mpp_given = mpp_given
        self._closed = False
        self._tissue_cache: dict[tuple[int, Any], tuple[np.ndarray, tuple[float, float]]] = {}
        # set by each backend's __init__ before _finish_init()
        self.vendor: str = "unknown"
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.properties: dict[str, str] = {}
        self.objective_power: float | None = None
        self._file_mpp_xy: tuple[float, float] | None = None

    # -- set-up shared by backends ---------------------------------------------
    def _finish_init(self) -> None:
        if self._mpp_given is not None:
            self.mpp_xy = (self._mpp_given, self._mpp_given)
            self.mpp_source = "given"
        elif self._file_mpp_xy is not None:
            self.mpp_xy = self._file_mpp_xy
            self.mpp_source = "file"
        else:
            self.close()
            raise MissingMppError(
                f"'{self.path.name}' does not record how many micrometres one pixel spans "
                "(µm/px), so cell sizes and positions cannot be measured. Enter the scan "
                "resolution (e.g. 0.25 µm/px for 40x, 0.5 µm/px for 20x) and open it again."
            )
        self.mpp = float(self.mpp_xy[0])
        w0, h0 = self.level_dimensions[0]
        self._ds_xy = tuple((w0 / w, h0 / h) for (w, h) in self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Mean of the x and y downsample of each level relative to level 0."""
        return tuple((dx + dy) / 2.0 for dx, dy in self._ds_xy)

    @property
    def size_um(self) -> tuple[float, float]:
        """(width, height) of level 0 in µm."""
        return (self.dimensions[0] * self.mpp_xy[0], self.dimensions[1] * self.mpp_xy[1])

    @property
    def info(self) -> dict[str, Any]:
        """Plain summary for display. Never includes associated (label/macro) images."""
        w, h = self.dimensions
        return {
            "file_name": self.path.name,
            "file_size_bytes": self.path.stat().st_size if self.path.exists() else None,
            "format": self.format,
            "vendor": self.vendor,
            "width_px": int(w),
            "height_px": int(h),
            "mpp": float(self.mpp),
            "mpp_y": float(self.mpp_xy[1]),
            "mpp_source": self.mpp_source,
            "width_um": float(w * self.mpp_xy[0]),
            "height_um": float(h * self.mpp_xy[1]),
            "level_count": int(self.level_count),
            "level_dimensions": [list(map(int, d)) for d in self.level_dimensions],
            "level_downsamples": [float(d) for d in self.level_downsamples],
            "objective_power": self.objective_power,
        }

    def sha256(self, chunk_bytes: int = 1 << 20) -> str:
        """SHA-256 of the slide file, read in chunks (constant memory)."""
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(chunk_bytes), b""):
                h.update(chunk)
        return h.hexdigest()

    def __repr__(self) -> str:
        w, h = self.dimensions if self.level_dimensions else (0, 0)
        mpp = getattr(self, "mpp", float("nan"))
        return (
            f"<Slide {self.path.name!r} {self.format}/{self.vendor} {w}x{h}px "
            f"{mpp:.4g} µm/px, {self.level_count} level(s)>"
        )

    # -- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def _close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- backend primitive ----------------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB h x w x 3 of ``level`` at level pixel (x, y); white beyond edges."""
        raise NotImplementedError

    def _read_level_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like ``_read_level`` but clips to the level and pads the rest with white."""
        lw, lh = self.level_dimensions[level]
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, lw), min(y + h, lh)
        if cx0 == x and cy0 == y and cx1 == x + w and cy1 == y + h:
            return self._read_level(level, x, y, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        return out

    # -- public reads -----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"The slide '{self.path.name}' has been closed; open it again to read it.")

    def read_region(
        self, location_xy_level0: tuple[int, int], level: int, size_wh: tuple[int, int]
    ) -> np.ndarray:
        """uint8 RGB (h x w x 3) of ``size_wh`` pixels at ``level``, top-left given in level-0 px.

        Same convention as OpenSlide. Areas beyond the slide are white.
        """
        self._check_open()
        if not 0 <= level < self.level_count:
            raise ValueError(f"level must be in 0..{self.level_count - 1}, got {level}")
        w, h = int(size_wh[0]), int(size_wh[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size_wh}")
        if w * h > MAX_REGION_PIXELS:
            raise ImageTooLargeError(
                f"A region of {w} x {h} pixels is too large to read at once "
                f"(limit {MAX_REGION_PIXELS:,} pixels); read it tile by tile instead."
            )
        dx, dy = self._ds_xy[level]
        x = int(math.floor(location_xy_level0[0] / dx))
        y = int(math.floor(location_xy_level0[1] / dy))
        return self._read_level_padded(level, x, y, w, h)

    def best_level_for_downsample(self, downsample_xy: tuple[float, float]) -> int:
        """Coarsest level whose downsample is <= the wanted one on both axes (tolerance 1%)."""
        best = 0
        for i, (dx, dy) in enumerate(self._ds_xy):
            if dx <= downsample_xy[0] * 1.01 and dy <= downsample_xy[1] * 1.01:
                if dx >= self._ds_xy[best][0]:
                    best = i
        return best

    def _read_scaled(
        self, box_level0: tuple[float, float, float, float], out_wh: tuple[int, int]
    ) -> np.ndarray:
        """Resample the level-0 box ``(x, y, w, h)`` (floats) to ``out_wh`` pixels.

        Reads from the best pyramid level, then resizes with Pillow's antialiased
        bilinear filter using a sub-pixel source box (so neighbouring boxes join exactly).
        """
        x0, y0, bw, bh = (float(v) for v in box_level0)
        ow, oh = int(out_wh[0]), int(out_wh[1])
        level = self.best_level_for_downsample((bw / ow, bh / oh))
        dx, dy = self._ds_xy[level]
        lx, ly, lw, lh = x0 / dx, y0 / dy, bw / dx, bh / dy
        ix0, iy0 = math.floor(lx), math.floor(ly)
        if (
            abs(lw - ow) < 1e-6 and abs(lh - oh) < 1e-6
            and abs(lx - ix0) < 1e-6 and abs(ly - iy0) < 1e-6
        ):
            return self._read_level_padded(level, ix0, iy0, ow, oh)
        # margin as wide as the filter's reach, so neighbouring tiles join without seams
        m = math.ceil(max(lw / ow, lh / oh, 1.0)) + 1
        rx0, ry0 = ix0 - m, iy0 - m
        rx1, ry1 = math.ceil(lx + lw) + m, math.ceil(ly + lh) + m
        region = self._read_level_padded(level, rx0, ry0, rx1 - rx0, ry1 - ry0)
        img = Image.fromarray(region)
        box = (lx - rx0, ly - ry0, lx - rx0 + lw, ly - ry0 + lh)
        out = img.resize((ow, oh), resample=Image.Resampling.BILINEAR, box=box)
        return np.asarray(out)

    def read_region_mpp(
        self,
        location_xy_level0: tuple[float, float],
        size_wh_at_target: tuple[int, int],
        target_mpp: float,
    ) -> np.ndarray:
        """uint8 RGB of ``size_wh_at_target`` pixels at ``target_mpp`` µm/px.

        ``location_xy_level0`` is the top-left corner in level-0 pixels (floats allowed).
        """
        self._check_open()
        t = check_mpp(target_mpp, "target µm per pixel", plausible=False)
        w, h = int(size_wh_at_target[0]), int(size_wh_at_target[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size_wh_at_target}")
        if w * h > MAX_REGION_PIXELS:
            raise ImageTooLargeError(
                f"A region of {w} x {h} pixels is too large to read at once "
                f"(limit {MAX_REGION_PIXELS:,} pixels); read it tile by tile instead."
            )
        fx, fy = t / self.mpp_xy[0], t / self.mpp_xy[1]
        return self._read_scaled((location_xy_level0[0], location_xy_level0[1], w * fx, h * fy), (w, h))

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """uint8 RGB overview whose longer side is ``max_px`` (never upscaled).

        Read in horizontal bands from the best level, so memory stays bounded even for
        single-level gigapixel TIFFs.
        """
        self._check_open()
        w0, h0 = self.dimensions
        scale = min(1.0, float(max_px) / max(w0, h0))
        ow, oh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        sx, sy = w0 / ow, h0 / oh
        level = self.best_level_for_downsample((sx, sy))
        lw, lh = self.level_dimensions[level]
        if lw * lh > MAX_PLAIN_IMAGE_PIXELS:  # no overview level: every pixel would be decoded
            raise ImageTooLargeError(
                f"'{self.path.name}' has no reduced-resolution (pyramid) levels and is too large to "
                f"preview ({lw:,} x {lh:,} pixels; limit {MAX_PLAIN_IMAGE_PIXELS:,} without a pyramid). "
                "Save it as a tiled pyramidal TIFF or in the scanner's own format (e.g. .svs)."
            )
        # rows of output per band so that a band's source is ~ 32 Mpx at most
        src_rows_per_out = sy / self._ds_xy[level][1]
        band = max(1, int(32_000_000 / max(1.0, lw * src_rows_per_out)))
        parts = []
        for r0 in range(0, oh, band):
            r1 = min(oh, r0 + band)
            parts.append(self._read_scaled((0.0, r0 * sy, float(w0), (r1 - r0) * sy), (ow, r1 - r0)))
        return np.concatenate(parts, axis=0)

    # -- tissue and tiles ------------------------------------------------------------
    def tissue_mask(
        self, max_px: int = 1024, config: _tissue.TissueMaskConfig | None = None
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """(mask, (downsample_x, downsample_y)) of the thumbnail tissue mask (cached)."""
        key = (max_px, config)
        if key not in self._tissue_cache:
            thumb = self.thumbnail(max_px)
            mask = _tissue.tissue_mask(thumb, config)
            ds = (self.dimensions[0] / mask.shape[1], self.dimensions[1] / mask.shape[0])
            self._tissue_cache[key] = (mask, ds)
        return self._tissue_cache[key]

    def _grid(
        self, tile_px: int, overlap_px: int, target_mpp: float | None, tissue_only: bool, thumbnail_px: int
    ) -> tuple[int, float, np.ndarray, np.ndarray, np.ndarray]:
        """(tile_px, mpp, cols, rows, boxes N x 4) of the tile grid, as compact arrays."""
        tile_px, overlap_px = int(tile_px), int(overlap_px)
        if tile_px <= 0:
            raise ValueError(f"tile_px must be positive, got {tile_px}")
        if not 0 <= overlap_px < tile_px:
            raise ValueError(f"overlap_px must be in 0..tile_px-1, got {overlap_px}")
        t = self.mpp if target_mpp is None else check_mpp(target_mpp, "target µm per pixel")
        stride = tile_px - overlap_px
        w_um, h_um = self.size_um
        w_t, h_t = w_um / t, h_um / t  # slide size in target pixels
        n_cols = max(1, math.ceil((w_t - overlap_px) / stride - 1e-9))
        n_rows = max(1, math.ceil((h_t - overlap_px) / stride - 1e-9))
        cols, rows = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
        cols, rows = cols.ravel(), rows.ravel()
        mx, my = self.mpp_xy
        x_um, y_um = cols * (stride * t), rows * (stride * t)
        boxes = np.stack(
            [x_um / mx, y_um / my, np.full(x_um.shape, tile_px * t / mx), np.full(y_um.shape, tile_px * t / my)],
            axis=1,
        )
        if tissue_only:
            mask, ds = self.tissue_mask(thumbnail_px)
            keep = _tissue.boxes_in_tissue(mask, boxes, ds)
            if not keep.any():
                raise NoTissueError(
                    f"No tissue was found on '{self.path.name}'. Check that it is a brightfield "
                    "H&E slide and not an empty or overexposed scan."
                )
            cols, rows, boxes = cols[keep], rows[keep], boxes[keep]
        return tile_px, t, cols, rows, boxes

    @staticmethod
    def _spec(i: int, tile_px: int, t: float, stride: int, c: int, r: int, box: np.ndarray) -> TileSpec:
        return TileSpec(
            index=i, col=int(c), row=int(r), x_um=float(c * (stride * t)), y_um=float(r * (stride * t)),
            mpp=float(t), size_px=tile_px, box_level0=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
        )

    def tile_grid(
        self,
        tile_px: int = 512,
        overlap_px: int = 0,
        target_mpp: float | None = None,
        tissue_only: bool = True,
        *,
        thumbnail_px: int = 1024,
    ) -> list[TileSpec]:
        """The tiles ``iter_tiles`` would yield, without reading pixels (for progress bars).

        Tiles are ``tile_px`` square at ``target_mpp`` (default: the slide's mpp) and
        step by ``tile_px - overlap_px``; the grid covers the whole slide. With
        ``tissue_only`` tiles whose footprint touches no tissue on the thumbnail mask
        are skipped, and a slide with no tissue at all raises ``NoTissueError``.
        """
        return list(self._iter_specs(tile_px, overlap_px, target_mpp, tissue_only, thumbnail_px))

    def _iter_specs(
        self, tile_px: int, overlap_px: int, target_mpp: float | None, tissue_only: bool, thumbnail_px: int
    ) -> Iterator[TileSpec]:
        """``TileSpec`` s made one at a time from the vectorised grid (none kept by ``iter_tiles``)."""
        tile_px, t, cols, rows, boxes = self._grid(tile_px, overlap_px, target_mpp, tissue_only, thumbnail_px)
        stride = tile_px - int(overlap_px)
        for i, (c, r, b) in enumerate(zip(cols, rows, boxes)):
            yield self._spec(i, tile_px, t, stride, c, r, b)

    def n_tiles(
        self, tile_px: int = 512, overlap_px: int = 0, target_mpp: float | None = None, tissue_only: bool = True,
        *, thumbnail_px: int = 1024,
    ) -> int:
        """How many tiles ``iter_tiles`` with the same arguments yields."""
        return int(len(self._grid(tile_px, overlap_px, target_mpp, tissue_only, thumbnail_px)[2]))

    def read_tile(self, spec: TileSpec) -> Tile:
        """Read the pixels of one ``TileSpec``."""
        self._check_open()
        rgb = self._read_scaled(spec.box_level0, (spec.size_px, spec.size_px))
        return Tile(
            rgb=rgb, mpp=spec.mpp, x_um=spec.x_um, y_um=spec.y_um, col=spec.col, row=spec.row,
            index=spec.index, box_level0=spec.box_level0,
        )

    def iter_tiles(
        self,
        tile_px: int = 512,
        overlap_px: int = 0,
        target_mpp: float | None = None,
        tissue_only: bool = True,
        *,
        thumbnail_px: int = 1024,
    ) -> Iterator[Tile]:
        """Stream ``Tile`` s (``tile_px`` square at ``target_mpp``), one at a time.

        Only the current tile (plus a bounded cache of decoded source tiles) is in
        memory, so peak memory does not grow with the slide. See ``tile_grid``.
        """
        for spec in self._iter_specs(tile_px, overlap_px, target_mpp, tissue_only, thumbnail_px):
            yield self.read_tile(spec)


# --------------------------------------------------------------------------- OpenSlide
class OpenSlideSlide(Slide):
    """SVS, NDPI, MRXS, SCN, VMS, BIF and other formats OpenSlide reads."""

    format: Backend = "openslide"

    def __init__(self, path: Path, *, mpp_given: float | None) -> None:
        super().__init__(path, mpp_given=mpp_given)
        import openslide

        self._openslide = openslide
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise UnsupportedSlideError(f"'{path.name}' is not a slide format GHIST Studio can read. {_SUPPORTED_TEXT}") from None
        except (openslide.OpenSlideError, OSError) as e:
            raise CorruptSlideError(_corrupt_message(path, e)) from None
        osr = self._osr
        self.properties = {k: v for k, v in osr.properties.items()}
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.level_dimensions = tuple(tuple(map(int, d)) for d in osr.level_dimensions)  # type: ignore[misc]
        mx = _float_or_none(self.properties.get(openslide.PROPERTY_NAME_MPP_X))
        my = _float_or_none(self.properties.get(openslide.PROPERTY_NAME_MPP_Y))
        mx, my = _plausible_mpp(mx), _plausible_mpp(my)
        if mx is not None:
            self._file_mpp_xy = (mx, my if my is not None else mx)
        self.objective_power = _float_or_none(self.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self._finish_init()

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        dx, dy = self._ds_xy[level]
        # OpenSlide takes the top-left in level-0 px; its own downsample may differ
        # slightly from our w0/w ratio, so use its value to land on the same level pixel.
        ds = self._osr.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        try:
            img = self._osr.read_region(loc, level, (w, h))
        except self._openslide.OpenSlideError as e:
            raise CorruptSlideError(_corrupt_message(self.path, e)) from None
        return _composite_on_white(np.asarray(img))

    def _close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()


# --------------------------------------------------------------------------- tifffile
class TiffSlide(Slide):
    """OME-TIFF, plain / pyramidal TIFF (SubIFDs or page pyramids), via tifffile.

    Regions are read through tifffile's zarr store, which decodes only the tiles or
    strips that overlap the region.
    """

    format: Backend = "tifffile"
    #: Decoded TIFF tiles kept for reuse by neighbouring / overlapping reads.
    tile_cache_bytes: int = 32 * 1024 * 1024

    def __init__(self, path: Path, *, mpp_given: float | None) -> None:
        super().__init__(path, mpp_given=mpp_given)
        import tifffile

        try:
            with _TifffileComplaints() as complaints:
                self._tif = tifffile.TiffFile(str(path))
                self._tif.filehandle.set_lock(True)  # tiles may be read from several threads
                series = self._pick_series(self._tif, path)
                levels = list(series.levels) if series.levels else [series]
                axes = series.axes
            if complaints.messages:
                raise CorruptSlideError(_corrupt_message(path, RuntimeError(complaints.messages[0])))
            _check_data_within_file(path, [pg for lv in levels for pg in lv.pages])
        except SlideError:
            self._close_tif()
            raise
        except Exception as e:  # tifffile raises many kinds on damaged files
            self._close_tif()
            raise CorruptSlideError(_corrupt_message(path, e)) from None
        self._series = series
        self._axes = axes
        if series.dtype != np.uint8:
            self._close_tif()
            raise UnsupportedPixelFormatError(_pixel_format_message(series.dtype, f"'{path.name}'"))
        allowed = {"YX", "YXS", "CYX", "YXC", "SYX"}
        if axes not in allowed:
            self._close_tif()
            raise UnsupportedSlideError(
                f"'{path.name}' holds a multi-dimensional image (axes {axes}, shape {series.shape}); "
                "GHIST Studio reads single-plane brightfield RGB slides."
            )
        self._channel_first = axes in ("CYX", "SYX")
        dims = []
        for lv in levels:
            shp = lv.shape
            hh, ww = (shp[1], shp[2]) if self._channel_first else (shp[0], shp[1])
            dims.append((int(ww), int(hh)))
        self.level_dimensions = tuple(dims)
        self._levels = levels
        self._stores: dict[int, Any] = {}
        self._tiled_pages: dict[int, Any] = {}
        self._tile_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self.properties = self._collect_properties()
        self.vendor = self._vendor()
        self._file_mpp_xy = self._find_mpp()
        self._finish_init()

    @staticmethod
    def _pick_series(tif: Any, path: Path) -> Any:
        skip = {"label", "macro", "thumbnail", "overview"}
        for s in tif.series:
            if (s.name or "").strip().lower() not in skip:
                return s
        raise CorruptSlideError(
            f"'{path.name}' looks like a TIFF slide but no readable image was found in it: it is "
            "probably damaged or incompletely uploaded/copied. Please copy the original file again."
        )

    def _vendor(self) -> str:
        t = self._tif
        if t.is_ome:
            return "ome-tiff"
        if t.is_svs:
            return "aperio"
        if t.is_ndpi:
            return "hamamatsu"
        if getattr(t, "is_imagej", False):
            return "imagej"
        return "generic-tiff"

    def _collect_properties(self) -> dict[str, str]:
        props: dict[str, str] = {"tifffile.series": self._series.name or "", "tifffile.axes": self._axes}
        page = self._tif.pages.first
        for tag in page.tags.values():
            if tag.name in {"TileOffsets", "TileByteCounts", "StripOffsets", "StripByteCounts", "JPEGTables"}:
                continue
            v = tag.value
            s = str(v)
            if len(s) <= 4000:
                props[f"tiff.{tag.name}"] = s
        return props

    def _find_mpp(self) -> tuple[float, float] | None:
        t = self._tif
        if t.is_ome and t.ome_metadata:
            got = _ome_mpp(t.ome_metadata)
            if got is not None:
                return got
        page = t.pages.first
        desc = page.description or ""
        if t.is_svs:
            m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
            if m:
                v = _plausible_mpp(_float_or_none(m.group(1)))
                if v is not None:
                    mag = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
                    self.objective_power = _float_or_none(mag.group(1)) if mag else None
                    return (v, v)
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            unit = int(tags["ResolutionUnit"].value)
            um_per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(unit)
            if unit == 1 and getattr(t, "is_imagej", False):
                ij = t.imagej_metadata or {}
                if str(ij.get("unit", "")).lower() in {"micron", "µm", "um", "\\u00B5m"}:
                    um_per_unit = 1.0
            if um_per_unit is not None:
                xr = _rational(tags["XResolution"].value)
                yr = _rational(tags["YResolution"].value) if "YResolution" in tags else xr
                if xr and yr:
                    mx, my = _plausible_mpp(um_per_unit / xr), _plausible_mpp(um_per_unit / yr)
                    if mx is not None and my is not None:
                        return (mx, my)
        return None

    def _store(self, level: int) -> Any:
        if level not in self._stores:
            try:
                import zarr

                self._stores[level] = zarr.open(self._series.aszarr(level=level), mode="r")
            except ImportError:  # pragma: no cover - zarr ships with anndata
                self._stores[level] = self._levels[level].asarray()
        return self._stores[level]

    def _tiled_page(self, level: int) -> Any | None:
        """The level's single tiled, interleaved TiffPage, or None (then zarr is used)."""
        if level not in self._tiled_pages:
            page = None
            lv = self._levels[level]
            pages = getattr(lv, "pages", None)
            if pages is not None and len(pages) == 1:
                pg = pages[0]
                if (
                    pg is not None and hasattr(pg, "tilewidth") and pg.is_tiled
                    and pg.imagedepth == 1 and pg.tiledepth == 1
                    and (pg.planarconfig == 1 or pg.samplesperpixel == 1)
                    and not self._channel_first
                ):
                    page = pg
            self._tiled_pages[level] = page
        return self._tiled_pages[level]

    def _decoded_tile(self, level: int, page: Any, index: int) -> np.ndarray:
        """One decoded TIFF tile (th x tw x samples), from a small LRU cache."""
        key = (level, index)
        with self._cache_lock:
            hit = self._tile_cache.get(key)
            if hit is not None:
                self._tile_cache.move_to_end(key)
                return hit
        th, tw, spp = page.tilelength, page.tilewidth, page.samplesperpixel
        offset, nbytes = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if nbytes == 0:  # sparse tile: nothing scanned there
            tile = np.full((th, tw, spp), 255, dtype=np.uint8)
        else:
            fh = self._tif.filehandle
            with fh.lock:
                fh.seek(offset)
                data = fh.read(nbytes)
            if len(data) != nbytes:
                raise CorruptSlideError(_corrupt_message(self.path, EOFError("tile data cut short")))
            arr, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            if arr is None:
                raise CorruptSlideError(_corrupt_message(self.path, ValueError("tile could not be decoded")))
            tile = np.asarray(arr).reshape(th, tw, spp)
        with self._cache_lock:
            self._tile_cache[key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > self.tile_cache_bytes and len(self._tile_cache) > 1:
                _, old = self._tile_cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return tile

    def _read_tiled(self, level: int, page: Any, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region from the tiles that overlap it only (loop over tiles, not pixels)."""
        th, tw = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tw)
        out = np.empty((h, w, page.samplesperpixel), dtype=np.uint8)
        for r in range(y // th, (y + h - 1) // th + 1):
            for c in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._decoded_tile(level, page, r * across + c)
                ty0, tx0 = r * th, c * tw
                sy0, sx0 = max(y, ty0), max(x, tx0)
                sy1, sx1 = min(y + h, ty0 + th), min(x + w, tx0 + tw)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._tiled_page(level)
        if page is not None:
            try:
                arr = self._read_tiled(level, page, x, y, w, h)
            except SlideError:
                raise
            except Exception as e:
                raise CorruptSlideError(_corrupt_message(self.path, e)) from None
            return _to_rgb8(arr, f"'{self.path.name}'")
        z = self._store(level)
        try:
            if self._channel_first:
                arr = np.moveaxis(np.asarray(z[:, y : y + h, x : x + w]), 0, -1)
            else:
                arr = np.asarray(z[y : y + h, x : x + w])
        except SlideError:
            raise
        except Exception as e:
            raise CorruptSlideError(_corrupt_message(self.path, e)) from None
        return _to_rgb8(arr, f"'{self.path.name}'")

    def _close_tif(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None

    def _close(self) -> None:
        self._stores = {}
        self._tile_cache = OrderedDict()
        self._close_tif()


class _TifffileComplaints(logging.Handler):
    """Collects what tifffile logs while parsing: it logs (not raises) on damaged files."""

    _PATTERN = re.compile(r"invalid|missing|corrupt|truncat|raised|out of range|beyond", re.I)
    #: Only damage to the file's structure (offsets past the end): used before OpenSlide,
    #: which reads vendor TIFFs that tifffile may find unusual but that are not damaged.
    STRUCTURAL = re.compile(r"offset|truncat|corrupt|beyond|end of file", re.I)

    def __init__(self, pattern: re.Pattern[str] | None = None) -> None:
        super().__init__(level=logging.WARNING)
        if pattern is not None:
            self._PATTERN = pattern
        self.messages: list[str] = []
        self._logger = logging.getLogger("tifffile")

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if self._PATTERN.search(msg):
            self.messages.append(msg)

    def __enter__(self) -> "_TifffileComplaints":
        self._old_propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False  # keep tifffile's noise off the console
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._old_propagate


def check_tiff_integrity(path: str | os.PathLike, *, strict: bool = True) -> None:
    """Raise CorruptSlideError if a TIFF's directories or image data are damaged or cut short.

    Parses every directory (not the pixels): cheap even for large slides, and catches
    interrupted uploads before OpenSlide or tifffile would half-read them. ``strict=False``
    only counts structural damage (offsets past the end of the file), not tags tifffile
    finds unusual, so vendor formats OpenSlide understands are not refused.
    """
    import tifffile

    path = Path(path)
    try:
        pattern = None if strict else _TifffileComplaints.STRUCTURAL
        with _TifffileComplaints(pattern) as complaints, tifffile.TiffFile(str(path)) as tif:
            n_pages = len(tif.pages)  # len() stops at circular IFD chains; iterating would loop forever
            pages = [pg for pg in (tif.pages[i] for i in range(n_pages)) if pg is not None]
            if not pages:
                raise CorruptSlideError(
                    f"'{path.name}' looks like a TIFF slide but no readable image was found in it: it "
                    "is probably damaged or incompletely uploaded/copied. Please copy the original file again."
                )
            _check_data_within_file(path, pages)
    except SlideError:
        raise
    except Exception as e:
        raise CorruptSlideError(_corrupt_message(path, e)) from None
    if complaints.messages:
        raise CorruptSlideError(_corrupt_message(path, RuntimeError(complaints.messages[0])))


def _check_data_within_file(path: Path, pages: list[Any]) -> None:
    """Raise CorruptSlideError when any page's tile/strip data lies past the end of the file."""
    size = path.stat().st_size
    for page in pages:
        if page is None or not hasattr(page, "dataoffsets"):
            continue
        offs = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        _check_page_layout(path, page, counts)
        if offs.size and int((offs + counts).max()) > size:
            raise CorruptSlideError(
                f"'{path.name}' is cut short: the image data it announces goes beyond the end of "
                f"the file ({size:,} bytes). The upload or copy was probably interrupted; "
                "please copy the original file again."
            )


def _check_page_layout(path: Path, page: Any, counts: np.ndarray) -> None:
    """Raise CorruptSlideError when a page's header contradicts itself (a file that lies).

    Empty dimensions or tiles, fewer tiles/strips than the image needs, or uncompressed
    data smaller than the declared image: such files would otherwise divide by zero or
    make a reader allocate the (huge) declared size from a few bytes.
    """
    shape = tuple(int(v) for v in (getattr(page, "shape", None) or ()))
    bad = None
    if not shape or min(shape) <= 0:
        bad = f"it declares an empty image ({shape})"
    elif getattr(page, "is_tiled", False) and (int(page.tilewidth) <= 0 or int(page.tilelength) <= 0):
        bad = f"it declares tiles of {page.tilewidth} x {page.tilelength} pixels"
    else:
        try:
            needed = int(np.prod(page.chunked))
        except Exception:  # tifffile cannot even lay the chunks out
            needed = -1
        if needed < 0 or counts.size < needed:
            bad = f"it lists {counts.size} tiles/strips where its size needs {needed}"
        elif int(getattr(page, "compression", 0)) == 1 and counts.size and counts.all():
            need_bytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(page.dtype).itemsize
            if int(counts.sum()) < need_bytes:
                bad = f"its uncompressed pixel data ({int(counts.sum()):,} bytes) is smaller than the image it declares"
    if bad is not None:
        raise CorruptSlideError(_corrupt_message(path, ValueError(bad)))


# --------------------------------------------------------------------------- Pillow
class PillowSlide(Slide):
    """PNG / JPEG images (decoded whole, so bounded by ``MAX_PLAIN_IMAGE_PIXELS``)."""

    format: Backend = "pillow"

    def __init__(self, path: Path, *, mpp_given: float | None) -> None:
        super().__init__(path, mpp_given=mpp_given)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLargeError(_too_large_message(path, None)) from None
        except Exception as e:
            raise CorruptSlideError(_corrupt_message(path, e)) from None
        with img:
            w, h = img.size
            if w * h > MAX_PLAIN_IMAGE_PIXELS:
                raise ImageTooLargeError(_too_large_message(path, (w, h)))
            self.vendor = (img.format or "image").lower()
            self.properties = {f"pil.{k}": str(v) for k, v in img.info.items() if isinstance(v, (str, int, float, tuple))}
            self.properties["pil.mode"] = img.mode
            self.level_dimensions = ((int(w), int(h)),)
            # Check the unit before the (possibly costly) decode, and before asking for mpp.
            self._check_mode(img.mode)
            if mpp_given is None:
                self._finish_init()  # raises MissingMppError
            try:
                img.load()
            except Exception as e:
                raise CorruptSlideError(_corrupt_message(path, e)) from None
            self._pixels = self._to_array(img)
        self._finish_init()

    def _check_mode(self, mode: str) -> None:
        if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F", "I;32", "RGB;16"} or mode.startswith("I;"):
            dtype = "float32" if mode == "F" else ("int32" if mode == "I" else "uint16")
            raise UnsupportedPixelFormatError(_pixel_format_message(dtype, f"'{self.path.name}'"))

    def _to_array(self, img: Image.Image) -> np.ndarray:
        mode = img.mode
        if mode in {"RGB", "L", "RGBA", "LA"}:
            arr = np.asarray(img)
        elif mode in {"P", "PA"} or "transparency" in img.info:
            arr = np.asarray(img.convert("RGBA"))
        elif mode in {"1", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"}:
            arr = np.asarray(img.convert("RGBA" if mode in {"La", "RGBa"} else "RGB"))
        else:
            raise UnsupportedPixelFormatError(
                f"'{self.path.name}' uses the pixel mode {mode!r}, which GHIST Studio cannot "
                "convert to RGB. Please export it as an 8-bit RGB PNG or JPEG."
            )
        return _to_rgb8(arr, f"'{self.path.name}'")

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._pixels[y : y + h, x : x + w].copy()

    def _close(self) -> None:
        self._pixels = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- factory
def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _rational(v: Any) -> float | None:
    if isinstance(v, tuple) and len(v) == 2:
        return v[0] / v[1] if v[1] else None
    return _float_or_none(v)


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Pixels element, in µm."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    to_um = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            out = []
            for ax in ("X", "Y"):
                v = _float_or_none(el.get(f"PhysicalSize{ax}"))
                unit = el.get(f"PhysicalSize{ax}Unit", "µm")
                f = to_um.get(unit)
                out.append(_plausible_mpp(v * f) if v is not None and f is not None else None)
            if out[0] is not None:
                return (out[0], out[1] if out[1] is not None else out[0])
            return None
    return None


def _corrupt_message(path: Path, err: BaseException) -> str:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (
        f"'{path.name}' looks like a slide image but could not be read: it may be damaged or "
        f"incompletely uploaded/copied. Please copy the original file again. (Detail: {detail})"
    )


def _too_large_message(path: Path, wh: tuple[int, int] | None) -> str:
    size = f" ({wh[0]:,} x {wh[1]:,} pixels)" if wh else ""
    return (
        f"'{path.name}' is too large to open as a plain image{size}; the limit is "
        f"{MAX_PLAIN_IMAGE_PIXELS:,} pixels. Save large scans as a tiled pyramidal TIFF "
        "or in the scanner's own format (e.g. .svs), which are read piece by piece."
    )


def open_slide(
    path: str | os.PathLike, mpp: float | None = None, *, backend: Backend | None = None
) -> Slide:
    """Open a slide with the right backend, chosen from the file's content.

    Parameters
    ----------
    path
        The slide file (any name; path cleaning is the project store's job).
    mpp
        µm per pixel at level 0. Overrides the file's value; required when the file
        has none (PNG/JPEG always). Must be finite and > 0.
    backend
        Force ``"openslide"``, ``"tifffile"`` or ``"pillow"`` (default: automatic:
        OpenSlide for vendor formats, tifffile for other TIFFs, Pillow for PNG/JPEG).

    Raises
    ------
    EmptyFileError, UnsupportedSlideError, CorruptSlideError, ImageTooLargeError,
    UnsupportedPixelFormatError, MissingMppError, InvalidMppError, SlideError (missing file).
    """
    mpp_given = None if mpp is None else check_mpp(mpp)
    p = Path(path)
    if not p.exists():
        raise SlideError(f"The slide file '{p.name}' was not found (looked in {p.parent}).")
    if p.is_dir():
        raise UnsupportedSlideError(f"'{p.name}' is a folder, not a slide file.")
    if p.stat().st_size == 0:
        raise EmptyFileError(
            f"'{p.name}' is empty (0 bytes): the upload or copy did not complete. Please upload it again."
        )
    kind = sniff_format(p)
    if backend is None:
        backend = _choose_backend(p, kind)
    if kind == "tiff" and backend in ("openslide", "tifffile"):
        check_tiff_integrity(p, strict=backend == "tifffile")
    if backend == "openslide":
        return OpenSlideSlide(p, mpp_given=mpp_given)
    if backend == "tifffile":
        if kind != "tiff":
            raise UnsupportedSlideError(f"'{p.name}' is not a TIFF file. {_SUPPORTED_TEXT}")
        return TiffSlide(p, mpp_given=mpp_given)
    if backend == "pillow":
        if kind not in {"png", "jpeg"}:
            raise UnsupportedSlideError(f"'{p.name}' is not a PNG or JPEG image. {_SUPPORTED_TEXT}")
        return PillowSlide(p, mpp_given=mpp_given)
    raise ValueError(f"unknown backend {backend!r}")


def read_image_array(path: str | os.PathLike, max_pixels: int = MAX_PLAIN_IMAGE_PIXELS) -> np.ndarray:
    """A whole (small) image as uint8 H x W x 3 RGB, with the same safety rules as slides.

    For reference images (stain targets), thumbnails and other plain pictures where no
    µm/px is needed. Refuses images over ``max_pixels`` (``ImageTooLargeError``), empty,
    damaged or non-image files, and 16-bit/float pixels; greyscale becomes RGB and
    transparency is composited on white. Use ``open_slide`` for anything slide-sized.
    """
    # The scale is irrelevant here; a placeholder lets every backend's checks run.
    with open_slide(path, mpp=1.0) as s:
        w, h = s.dimensions
        if w * h > max_pixels:
            raise ImageTooLargeError(_too_large_message(s.path, (w, h)).replace(
                f"{MAX_PLAIN_IMAGE_PIXELS:,}", f"{max_pixels:,}"))
        return s.read_region((0, 0), 0, (w, h))


def _choose_backend(p: Path, kind: str) -> Backend:
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(p))
    except Exception:
        vendor = None
    if vendor is not None and vendor != "generic-tiff":
        return "openslide"
    if kind == "tiff":
        return "tifffile"
    if kind in {"png", "jpeg"}:
        return "pillow"
    if vendor == "generic-tiff":  # pragma: no cover - generic TIFF always has TIFF magic
        return "openslide"
    what = "a text file" if _looks_like_text(p) else "an unrecognised file"
    raise UnsupportedSlideError(
        f"'{p.name}' is {what}, not a slide image (its name may say otherwise). {_SUPPORTED_TEXT}"
    )


def _looks_like_text(p: Path) -> bool:
    with open(p, "rb") as fh:
        head = fh.read(4096)
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
