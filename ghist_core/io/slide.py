"""One slide reader over OpenSlide, tifffile and Pillow.

Why: clinicians bring SVS, NDPI, MRXS, OME-TIFF, plain TIFF, PNG and JPEG files.
Every later step (segmentation, GHIST, figures) wants the same thing: RGB pixels at a
known size in micrometres. ``open_slide`` picks a backend from the file's *content*
(never its name), and every ``Slide`` answers the same calls:

>>> with open_slide("CMU-1-Small-Region.svs") as s:            # doctest: +SKIP
...     rgb = s.read_region_mpp((1000, 1500), (256, 256), 0.5)

(Tiles over a slide: ``ghist_core.io.tiles.TileGrid.over_slide``, the one tile grid.)

Rules kept here:
- µm per pixel is explicit: from the file's metadata or given by the caller; never a
  guess. A file with no usable scale raises ``MissingMppError`` unless ``mpp=`` is given.
- Pixels returned are always uint8 H x W x 3 RGB. Greyscale is replicated to RGB;
  alpha is composited on white (glass); CMYK becomes RGB, palette images go through their
  colour map, MinIsWhite is inverted back; samples of more than 8 bits are scaled by their
  actual bit depth (TIFF MaxSampleValue, else BitsPerSample; PNG sBIT, else the smallest
  of 8/10/12/14/16 bits holding the image's maximum). Floating-point, signed, CIELab and
  other photometrics raise ``UnsupportedPixelFormatError`` (a guess gives wrong colours).
- Limits are checked on the header, before any pixel is decoded: TIFF page count
  (:data:`MAX_TIFF_PAGES`, by a bounded IFD walk), decoded size of one strip/tile
  (:data:`MAX_CHUNK_BYTES`), plain-image pixels (:data:`MAX_PLAIN_IMAGE_PIXELS`), PNG data
  that cannot fill the declared size, a file µm/px that makes the image larger than a glass
  slide (:data:`MAX_SLIDE_EXTENT_UM`), and analysis reads that would enlarge the image more
  than :data:`MAX_UPSAMPLE_FACTOR`.
- Memory stays bounded (measured, ``tests/hostile_corpus.py``): regions are read from the
  best pyramid level and, for TIFFs, only the tiles/strips that overlap the region are
  decoded (at most one chunk of <= 256 MiB plus a 32 MiB cache; uncompressed strips are
  read row by row); thumbnails are made in bands of ~32 Mpx of source. Plain images are
  never decoded to open them; a thumbnail of one over :data:`MAX_INPROCESS_PLAIN_PIXELS`
  is made by DCT reduction (JPEG) or in a child process capped at
  :data:`PREVIEW_MEMORY_BYTES` (PNG; a 16k x 16k PNG at the cap peaks at ~1.2 GB there), so the
  app process never holds it; region reads decode it once at <= 4 bytes/px (about 1 GB at
  the cap), which only the analysis worker does.
- Associated images (label, macro) are never read or exposed: labels can carry
  patient names.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ghist_core.imaging import tissue as _tissue
from ghist_core.io.hashing import sha256_file
from ghist_core.errors import (
    CorruptSlideError,
    EmptyFileError,
    ImageTooLargeError,
    InvalidMppError,
    MissingMppError,
    SlideError,
    UnsupportedPixelFormatError,
    UnsupportedSlideError,
)

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_HIGH_BIT_PLAIN_PIXELS",
    "MAX_INPROCESS_PLAIN_PIXELS",
    "MAX_PLAIN_IMAGE_PIXELS",
    "MAX_REGION_PIXELS",
    "MAX_SLIDE_EXTENT_UM",
    "MAX_TIFF_PAGES",
    "MAX_UPSAMPLE_FACTOR",
    "enlargement_over_limit",
    "PREVIEW_MEMORY_BYTES",
    "PREVIEW_TIMEOUT_S",
    "PLAUSIBLE_MPP_RANGE",
    "Slide",
    "open_slide",
    "read_image_array",
    "check_mpp",
    "check_tiff_integrity",
    "count_tiff_pages",
    "sniff_format",
]

#: Largest PNG/JPEG (width x height) we decode: 256 Mpx (16k x 16k), i.e. 0.8 GB as RGB.
#: Plain images are decoded whole, so anything bigger must come as a tiled (pyramidal) TIFF;
#: the cap was 500 Mpx, but a 22k x 22k PNG then needed 2.3 GB and ~17 s just for its preview.
MAX_PLAIN_IMAGE_PIXELS = 256_000_000
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

#: Largest physical side a slide's own µm/px may imply (10 cm: wider than any glass slide,
#: whose scan area is at most 75 x 25 mm). A file whose µm/px would make it bigger has a
#: wrong scale (e.g. 40 µm/px in the tags of a 20k px scan = 80 cm): it counts as missing,
#: and a value given for it is refused.
MAX_SLIDE_EXTENT_UM = 100_000.0

#: Largest enlargement an analysis read may ask for (``read_region_mpp``, tiles): reading a
#: 2 µm/px image at 0.5 µm/px is 4x; beyond that the pixels would be invented, so it is
#: refused (``InvalidMppError``) rather than run on blurred, upsampled tissue.
MAX_UPSAMPLE_FACTOR = 4.0

#: Most images (IFDs, "pages") a TIFF may hold. A slide has a handful (pyramid levels,
#: label, macro); counted by a bounded walk of the IFD chain *before* tifffile parses the
#: file, so a 50,000-page TIFF is refused in milliseconds instead of parsed for minutes.
MAX_TIFF_PAGES = 1_000

#: Largest decoded size of ONE TIFF strip or tile (256 MiB). Compressed strips and tiles are
#: decoded whole, so this bounds the memory of any read; a file whose chunks are bigger
#: (e.g. a 20k x 20k zlib TIFF written as one 1.2 GB strip) is refused before decoding, with
#: the command that converts it. Uncompressed strips are read row by row (no such limit).
MAX_CHUNK_BYTES = 256 * 1024 * 1024

#: Plain (PNG/JPEG) images up to this many pixels are decoded inside the calling process
#: (Pillow keeps <= 4 bytes/px: <= 256 MB). Bigger ones are never decoded to *open* them
#: (the header and a streaming check suffice); their ``thumbnail`` is made by a separate
#: process capped at :data:`PREVIEW_MEMORY_BYTES` of address space and
#: :data:`PREVIEW_TIMEOUT_S`, so the app process never holds the whole image. Reading their
#: regions (the analysis worker) decodes them once, at <= 4 bytes/px (<= 2 GB at the cap).
MAX_INPROCESS_PLAIN_PIXELS = 64_000_000
PREVIEW_MEMORY_BYTES = 3 * 1024 * 1024 * 1024
PREVIEW_TIMEOUT_S = 120.0

#: Plain images with more than 8 bits per sample (16-bit PNG) are decoded at 6 bytes/px and
#: scaled to 8 bits, so their cap is a third of :data:`MAX_PLAIN_IMAGE_PIXELS`.
MAX_HIGH_BIT_PLAIN_PIXELS = MAX_PLAIN_IMAGE_PIXELS // 3

_CONVERT_HINT = (
    "Convert it to a tiled pyramidal TIFF, which is read piece by piece, e.g. with libvips: "
    "'vips tiffsave INPUT out.tif --tile --pyramid --compression jpeg --Q 90 --tile-width 256 "
    "--tile-height 256' (or QuPath: File > Export images > OME TIFF, pyramidal)."
)

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


def _scale_to_8bit(arr: np.ndarray, max_value: int) -> np.ndarray:
    """Unsigned integer samples whose full scale is ``max_value`` as uint8 (rounded, clipped).

    ``max_value`` is the image's *actual* full scale: 2**bits - 1 for its significant bits
    (TIFF MaxSampleValue or BitsPerSample, PNG sBIT, see the readers), so 12-bit data in a
    16-bit container maps 4095 -> 255 instead of being cut to its top byte (<= 15).
    """
    if arr.dtype == np.uint8 and max_value == 255:
        return arr
    m = max(1, int(max_value))
    wide = np.minimum(arr.astype(np.uint32, copy=False), m)
    return ((wide * 255 + m // 2) // m).astype(np.uint8)


def _bits_for_max(v: int) -> int:
    """Smallest of 8, 10, 12, 14, 16 bits that holds ``v`` (for > 8-bit data without a bit depth)."""
    for bits in (8, 10, 12, 14, 16):
        if v < (1 << bits):
            return bits
    return 16


@dataclass(frozen=True)
class _Colour:
    """How one TIFF level's decoded samples become RGB (see :meth:`convert`).

    ``kind``: ``"grey" | "miniswhite" | "rgb" | "palette" | "cmyk"``; ``max_value``: the
    samples' full scale (MaxSampleValue, else 2**BitsPerSample - 1); ``lut``: 8-bit RGB of
    each palette index; ``alpha``: the samples after the colour ones hold opacity.
    """

    kind: str
    max_value: int = 255
    lut: np.ndarray | None = None
    alpha: bool = True

    def convert(self, arr: np.ndarray, where: str) -> np.ndarray:
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        if arr.ndim == 2:
            arr = arr[..., None]
        if self.kind == "palette":
            assert self.lut is not None
            idx = np.minimum(arr[..., 0], len(self.lut) - 1)
            return self.lut[idx]
        if arr.dtype.kind != "u":
            raise UnsupportedPixelFormatError(_pixel_format_message(arr.dtype, where))
        arr = _scale_to_8bit(arr, self.max_value)
        if self.kind == "miniswhite":  # 0 is white: invert the grey (not the opacity)
            arr = arr.copy()
            arr[..., 0] = 255 - arr[..., 0]
        elif self.kind == "cmyk":
            c, m, y, k = (arr[..., i].astype(np.uint16) for i in range(4))
            nk = 255 - k
            rgb = np.stack([((255 - v) * nk + 127) // 255 for v in (c, m, y)], axis=-1).astype(np.uint8)
            if self.alpha and arr.shape[-1] > 4:
                rgb = np.concatenate([rgb, arr[..., 4:5]], axis=-1)
            arr = rgb
        if not self.alpha and arr.shape[-1] in (2, 4) and self.kind in ("grey", "miniswhite", "rgb"):
            arr = arr[..., : arr.shape[-1] - 1]  # an extra sample that is not opacity
        return _to_rgb8(arr, where)


def _tiff_colour(page: Any, where: str) -> _Colour:
    """The colour rule of a TIFF page, or ``UnsupportedPixelFormatError`` for what we cannot map.

    MinIsBlack/RGB as they are; MinIsWhite inverted; Palette through its ColorMap (16-bit
    entries scaled to 8 bits; maps written with 8-bit entries kept); CMYK (InkSet 1) to RGB
    as R = (255 - C)(255 - K) / 255 (Pillow's formula); YCbCr only inside JPEG (decoded to
    RGB by the codec). Samples of more than 8 bits are scaled by MaxSampleValue when the
    file has it, else by 2**BitsPerSample - 1. Float samples, CIELab, LogLuv and other
    photometrics are refused: guessing them gives wrong colours without a warning.
    """
    photometric = int(getattr(page, "photometric", 1))
    bps = getattr(page, "bitspersample", 8)
    bps = int(bps[0] if isinstance(bps, tuple) else bps)
    dtype = np.dtype(page.dtype)
    if dtype.kind not in "ub" or bps > 16:
        raise UnsupportedPixelFormatError(_pixel_format_message(dtype, where))
    max_value = (1 << bps) - 1
    tags = page.tags
    if "MaxSampleValue" in tags:
        v = tags["MaxSampleValue"].value
        v = v[0] if isinstance(v, tuple) and v else v
        try:
            v = int(v)
        except (TypeError, ValueError):
            v = 0
        if 0 < v < max_value:
            max_value = v
    spp = int(getattr(page, "samplesperpixel", 1))
    compression = int(getattr(page, "compression", 1))
    if photometric == 1:
        return _Colour("grey", max_value)
    if photometric == 0:
        return _Colour("miniswhite", max_value)
    if photometric == 2 or (photometric == 6 and compression in (6, 7, 33003, 33005, 34712)):
        return _Colour("rgb", max_value)
    if photometric == 3:
        cmap = getattr(page, "colormap", None)
        if cmap is None or spp != 1:
            raise UnsupportedPixelFormatError(
                f"{where} is a palette (indexed-colour) image without a usable colour map; "
                "please export it as 8-bit RGB.")
        cmap = np.asarray(cmap, dtype=np.uint32)
        if cmap.ndim != 2 or cmap.shape[0] != 3:
            raise UnsupportedPixelFormatError(f"{where} has a malformed colour map; please export it as 8-bit RGB.")
        lut = cmap.T if int(cmap.max(initial=0)) <= 255 else (cmap.T + 128) // 257
        return _Colour("palette", max_value, lut=np.ascontiguousarray(lut.astype(np.uint8)))
    if photometric == 5:
        inkset = tags["InkSet"].value if "InkSet" in tags else 1
        if int(inkset if not isinstance(inkset, tuple) else inkset[0]) == 1 and spp in (4, 5):
            return _Colour("cmyk", max_value, alpha=spp == 5)
        raise UnsupportedPixelFormatError(
            f"{where} stores separated ink channels other than CMYK ({spp} inks); please export it as 8-bit RGB.")
    names = {4: "a transparency mask", 6: "uncompressed YCbCr", 8: "CIELab", 9: "ICCLab", 10: "ITULab",
             32844: "LogL", 32845: "LogLuv", 34892: "linear raw (camera)"}
    raise UnsupportedPixelFormatError(
        f"{where} stores its colours as {names.get(photometric, f'photometric type {photometric}')}, which "
        "GHIST Studio does not convert (a guess would give wrong colours). Please export it as 8-bit RGB.")


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


def _region_size(size_wh: tuple[int, int]) -> tuple[int, int]:
    """``(w, h)`` of a region read as ints: ``ValueError`` unless positive, ``ImageTooLargeError``
    beyond :data:`MAX_REGION_PIXELS`."""
    w, h = int(size_wh[0]), int(size_wh[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"region size must be positive, got {size_wh}")
    if w * h > MAX_REGION_PIXELS:
        raise ImageTooLargeError(
            f"A region of {w} x {h} pixels is too large to read at once "
            f"(limit {MAX_REGION_PIXELS:,} pixels); read it tile by tile instead."
        )
    return w, h


def enlargement_over_limit(mpp: float, target_mpp: float) -> float | None:
    """How many times reading a slide of ``mpp`` at ``target_mpp`` µm/px enlarges it, when that is
    over :data:`MAX_UPSAMPLE_FACTOR` (the analysis would run on invented pixels); None within it.
    One rule for :meth:`Slide.check_upsampling` and for a µm/px typed before any slide is read."""
    factor = float(mpp) / float(target_mpp)
    return factor if factor > MAX_UPSAMPLE_FACTOR * (1 + 1e-9) else None


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
    def _extent_mm(self, mpp_xy: tuple[float, float]) -> float:
        w0, h0 = self.level_dimensions[0]
        return max(w0 * mpp_xy[0], h0 * mpp_xy[1]) / 1000.0

    def _finish_init(self) -> None:
        limit_mm = MAX_SLIDE_EXTENT_UM / 1000.0
        wrong_file_scale = ""
        if self._file_mpp_xy is not None and self._extent_mm(self._file_mpp_xy) > limit_mm:
            # a scale that makes the image bigger than a glass slide is a wrong tag, not a fact
            wrong_file_scale = (
                f" (it records {self._file_mpp_xy[0]:.4g} µm/px, which would make this "
                f"{self.level_dimensions[0][0]:,} x {self.level_dimensions[0][1]:,} px image "
                f"{self._extent_mm(self._file_mpp_xy):,.0f} mm wide: larger than any glass slide, so the value is wrong)"
            )
            self._file_mpp_xy = None
        if self._mpp_given is not None:
            given = (self._mpp_given, self._mpp_given)
            if self._extent_mm(given) > limit_mm:
                self.close()
                raise InvalidMppError(
                    f"{self._mpp_given:g} µm per pixel would make '{self.path.name}' "
                    f"{self._extent_mm(given):,.0f} mm wide, larger than any glass slide "
                    f"(limit {limit_mm:.0f} mm). Enter the scan resolution (about 0.25 for 40x, 0.5 for 20x)."
                )
            self.mpp_xy = given
            self.mpp_source = "given"
        elif self._file_mpp_xy is not None:
            self.mpp_xy = self._file_mpp_xy
            self.mpp_source = "file"
        else:
            self.close()
            raise MissingMppError(
                f"'{self.path.name}' does not record how many micrometres one pixel spans "
                f"(µm/px){wrong_file_scale}, so cell sizes and positions cannot be measured. Give the scan's "
                "resolution (e.g. 0.25 µm/px for 40x, 0.5 µm/px for 20x)."
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
        return sha256_file(self.path, chunk_bytes)

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
        w, h = _region_size(size_wh)
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
        # margin as wide as the filter's reach on each axis, so neighbouring tiles join
        # without seams (per axis: a 1 x 500k px image must not get a 16k px margin in x)
        mx = math.ceil(max(lw / ow, 1.0)) + 1
        my = math.ceil(max(lh / oh, 1.0)) + 1
        rx0, ry0 = ix0 - mx, iy0 - my
        rx1, ry1 = math.ceil(lx + lw) + mx, math.ceil(ly + lh) + my
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
        w, h = _region_size(size_wh_at_target)
        self.check_upsampling(t)
        fx, fy = t / self.mpp_xy[0], t / self.mpp_xy[1]
        return self._read_scaled((location_xy_level0[0], location_xy_level0[1], w * fx, h * fy), (w, h))

    def check_upsampling(self, target_mpp: float) -> None:
        """``InvalidMppError`` when reading at ``target_mpp`` enlarges the slide more than
        :data:`MAX_UPSAMPLE_FACTOR` (e.g. a file claiming 40 µm/px analysed at 0.5 µm/px is
        80x): the analysis would run on invented pixels. Called by every analysis read."""
        t = float(target_mpp)
        factor = enlargement_over_limit(min(self.mpp_xy), t)
        if factor is not None:
            raise InvalidMppError(
                f"'{self.path.name}' is {min(self.mpp_xy):.4g} µm per pixel ({self.mpp_source} value); the "
                f"analysis works at {t:.4g} µm per pixel, which would enlarge the image {factor:.3g} times "
                f"(the limit is {MAX_UPSAMPLE_FACTOR:g}x). If the µm per pixel is wrong, enter the scan's "
                "real resolution (about 0.25 for 40x, 0.5 for 20x); otherwise the scan is too coarse for "
                "nucleus-level analysis."
            )

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

    # -- tissue ----------------------------------------------------------------------
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
            level_pages = [pg for lv in levels for pg in lv.pages]
            _check_data_within_file(path, level_pages)
            for pg in level_pages:
                if pg is not None:
                    _check_chunk_sizes(path, pg)
        except SlideError:
            self._close_tif()
            raise
        except Exception as e:  # tifffile raises many kinds on damaged files
            self._close_tif()
            raise CorruptSlideError(_corrupt_message(path, e)) from None
        self._series = series
        self._axes = axes
        where = f"'{path.name}'"
        try:
            self._colours = [_tiff_colour(lv.keyframe if hasattr(lv, "keyframe") else lv.pages[0], where)
                             for lv in levels]
        except SlideError:
            self._close_tif()
            raise
        except Exception as e:
            self._close_tif()
            raise CorruptSlideError(_corrupt_message(path, e)) from None
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
            unit = _tag_int(tags["ResolutionUnit"].value)  # a damaged file may hold a tuple or text
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

    def _chunked_page(self, level: int) -> Any | None:
        """The level's single interleaved TiffPage (tiled or stripped), or None (then zarr is used)."""
        if level not in self._tiled_pages:
            page = None
            lv = self._levels[level]
            pages = getattr(lv, "pages", None)
            if pages is not None and len(pages) == 1:
                pg = pages[0]
                if (
                    pg is not None and hasattr(pg, "dataoffsets") and pg.imagedepth == 1
                    and (not pg.is_tiled or pg.tiledepth == 1)
                    and (pg.planarconfig == 1 or pg.samplesperpixel == 1)
                    and not self._channel_first
                ):
                    page = pg
            self._tiled_pages[level] = page
        return self._tiled_pages[level]

    @staticmethod
    def _chunk_shape(page: Any) -> tuple[int, int]:
        """(rows, cols) of one tile, or of one strip (rows per strip x image width)."""
        if page.is_tiled:
            return int(page.tilelength), int(page.tilewidth)
        return min(int(page.rowsperstrip or page.imagelength), int(page.imagelength)), int(page.imagewidth)

    def _decoded_chunk(self, level: int, page: Any, index: int) -> np.ndarray:
        """One decoded TIFF tile or strip (rows x cols x samples, padded), from a small LRU cache.

        The cache keeps ``tile_cache_bytes`` and always the last chunk, so a strip (at most
        :data:`MAX_CHUNK_BYTES`, checked on open) is decoded once per band of reads.
        """
        key = (level, index)
        with self._cache_lock:
            hit = self._tile_cache.get(key)
            if hit is not None:
                self._tile_cache.move_to_end(key)
                return hit
        th, tw = self._chunk_shape(page)
        spp = int(page.samplesperpixel)
        offset, nbytes = int(page.dataoffsets[index]), int(page.databytecounts[index])
        dtype = np.dtype(page.dtype)
        if nbytes == 0:  # sparse tile: nothing scanned there, i.e. white glass in this level's colours
            colour = self._colours[level]
            white = 0 if colour.kind in ("miniswhite", "cmyk") else colour.max_value
            tile = np.full((th, tw, spp), white, dtype=np.uint16 if dtype.kind == "b" else dtype)
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
            arr = np.asarray(arr).reshape(-1, tw, spp)
            if arr.shape[0] < th:  # the last strip is shorter
                pad = np.zeros((th - arr.shape[0], tw, spp), dtype=arr.dtype)
                arr = np.concatenate([arr, pad], axis=0)
            tile = arr[:th]
        with self._cache_lock:
            self._tile_cache[key] = tile
            self._cache_bytes += tile.nbytes
            while self._cache_bytes > self.tile_cache_bytes and len(self._tile_cache) > 1:
                _, old = self._tile_cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return tile

    def _read_chunked(self, level: int, page: Any, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region from the tiles/strips that overlap it only (loop over chunks, not pixels)."""
        th, tw = self._chunk_shape(page)
        across = -(-int(page.imagewidth) // tw)
        out = np.empty((h, w, int(page.samplesperpixel)), dtype=np.dtype(page.dtype))
        for r in range(y // th, (y + h - 1) // th + 1):
            for c in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._decoded_chunk(level, page, r * across + c)
                ty0, tx0 = r * th, c * tw
                sy0, sx0 = max(y, ty0), max(x, tx0)
                sy1, sx1 = min(y + h, ty0 + th), min(x + w, tx0 + tw)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def _read_raw_rows(self, page: Any, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region of an uncompressed stripped page, read row by row from the file (no whole strip)."""
        spp = int(page.samplesperpixel)
        dtype = np.dtype(page.dtype).newbyteorder(self._tif.byteorder)
        px_bytes = spp * dtype.itemsize
        row_bytes = int(page.imagewidth) * px_bytes
        rps = min(int(page.rowsperstrip or page.imagelength), int(page.imagelength))
        out = np.empty((h, w, spp), dtype=dtype)
        fh = self._tif.filehandle
        offsets = page.dataoffsets
        with fh.lock:
            for i, row in enumerate(range(y, y + h)):
                strip, within = divmod(row, rps)
                fh.seek(int(offsets[strip]) + within * row_bytes + x * px_bytes)
                buf = fh.read(w * px_bytes)
                if len(buf) != w * px_bytes:
                    raise CorruptSlideError(_corrupt_message(self.path, EOFError("strip data cut short")))
                out[i] = np.frombuffer(buf, dtype=dtype).reshape(w, spp)
        return out.astype(dtype.newbyteorder("="), copy=False)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        where = f"'{self.path.name}'"
        page = self._chunked_page(level)
        try:
            if page is not None:
                arr = self._read_raw_rows(page, x, y, w, h) if _direct_strips(page) else \
                    self._read_chunked(level, page, x, y, w, h)
            else:
                z = self._store(level)
                if self._channel_first:
                    arr = np.moveaxis(np.asarray(z[:, y : y + h, x : x + w]), 0, -1)
                else:
                    arr = np.asarray(z[y : y + h, x : x + w])
        except SlideError:
            raise
        except Exception as e:
            raise CorruptSlideError(_corrupt_message(self.path, e)) from None
        return self._colours[level].convert(arr, where)

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


def count_tiff_pages(path: str | os.PathLike, limit: int = MAX_TIFF_PAGES) -> int:
    """Number of top-level IFDs (pages) in a TIFF, counting at most ``limit + 1``.

    Walks the IFD chain with plain reads (2 small reads per page: no tag parsing), stops at a
    loop, an offset outside the file or the end of the chain, so it costs milliseconds even
    for a 50,000-page file, where tifffile's full parse takes minutes.
    """
    import struct as _struct

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(16)
        if head[:2] not in (b"II", b"MM") or len(head) < 8:
            return 0
        e = "<" if head[:2] == b"II" else ">"
        big = _struct.unpack(e + "H", head[2:4])[0] == 43
        if big:
            if len(head) < 16:
                return 0
            off = _struct.unpack(e + "Q", head[8:16])[0]
            cnt_fmt, cnt_len, entry_len, next_fmt, next_len = "Q", 8, 20, "Q", 8
        else:
            off = _struct.unpack(e + "I", head[4:8])[0]
            cnt_fmt, cnt_len, entry_len, next_fmt, next_len = "H", 2, 12, "I", 4
        seen: set[int] = set()
        n = 0
        while 0 < off < size and off not in seen and n <= limit:
            seen.add(off)
            fh.seek(off)
            raw = fh.read(cnt_len)
            if len(raw) < cnt_len:
                break
            n += 1
            n_entries = _struct.unpack(e + cnt_fmt, raw)[0]
            nxt = off + cnt_len + n_entries * entry_len
            if nxt + next_len > size:
                break
            fh.seek(nxt)
            off = _struct.unpack(e + next_fmt, fh.read(next_len))[0]
        return n


def _check_page_count(path: Path) -> None:
    n = count_tiff_pages(path, MAX_TIFF_PAGES)
    if n > MAX_TIFF_PAGES:
        raise ImageTooLargeError(
            f"'{path.name}' holds more than {MAX_TIFF_PAGES:,} images (TIFF pages); a slide has a handful "
            "(its resolution levels, label and overview). It looks like an image stack or time series, "
            "which GHIST Studio does not read. Export the one brightfield image you want as a "
            "tiled pyramidal TIFF or in the scanner's own format."
        )


def check_tiff_integrity(path: str | os.PathLike, *, strict: bool = True) -> None:
    """Raise CorruptSlideError if a TIFF's directories or image data are damaged or cut short.

    Parses every directory (not the pixels): cheap even for large slides, and catches
    interrupted uploads before OpenSlide or tifffile would half-read them. ``strict=False``
    only counts structural damage (offsets past the end of the file), not tags tifffile
    finds unusual, so vendor formats OpenSlide understands are not refused.
    """
    import tifffile

    path = Path(path)
    _check_page_count(path)
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
            bps = getattr(page, "bitspersample", 8)
            bps = int(bps[0] if isinstance(bps, tuple) else bps)
            if bps < 8:  # bits packed, each row (of each plane) padded to a whole byte
                spp = int(getattr(page, "samplesperpixel", 1))
                w, h = int(page.imagewidth), int(page.imagelength)
                contig = int(getattr(page, "planarconfig", 1)) == 1
                need_bytes = h * ((w * (spp if contig else 1) * bps + 7) // 8) * (1 if contig else spp)
            else:
                need_bytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(page.dtype).itemsize
            if int(counts.sum()) < need_bytes:
                bad = f"its uncompressed pixel data ({int(counts.sum()):,} bytes) is smaller than the image it declares"
    if bad is not None:
        raise CorruptSlideError(_corrupt_message(path, ValueError(bad)))


def _direct_strips(page: Any) -> bool:
    """True when a page's strips are raw interleaved bytes we can read row by row from the file."""
    bps = getattr(page, "bitspersample", 8)
    bps = int(bps[0] if isinstance(bps, tuple) else bps)
    return bool(
        hasattr(page, "dataoffsets") and not page.is_tiled and int(page.compression) == 1
        and bps in (8, 16) and int(getattr(page, "fillorder", 1)) == 1 and int(getattr(page, "predictor", 1)) == 1
        and int(getattr(page, "imagedepth", 1)) == 1
        and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
        and np.dtype(page.dtype).itemsize * 8 == bps
    )


def _chunk_bytes(page: Any) -> int:
    """Decoded bytes of one strip or tile of ``page`` (from its header, nothing decoded)."""
    spp = int(page.samplesperpixel) if int(getattr(page, "planarconfig", 1)) == 1 else 1
    item = max(1, np.dtype(page.dtype).itemsize)
    if page.is_tiled:
        return int(page.tilewidth) * int(page.tilelength) * max(1, int(getattr(page, "tiledepth", 1))) * spp * item
    rows = min(int(getattr(page, "rowsperstrip", 0) or page.imagelength), int(page.imagelength))
    return rows * int(page.imagewidth) * max(1, int(getattr(page, "imagedepth", 1))) * spp * item


def _check_chunk_sizes(path: Path, page: Any) -> None:
    """``ImageTooLargeError`` when one strip/tile we would decode whole exceeds :data:`MAX_CHUNK_BYTES`.

    Checked on the header before any pixel is decoded: decoded size of one chunk, and the
    stored (compressed) byte count of the largest chunk.
    """
    kf = getattr(page, "keyframe", None) or page  # a TiffFrame shares its keyframe's layout
    if not hasattr(page, "dataoffsets") or _direct_strips(kf):
        return
    decoded = _chunk_bytes(kf)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    stored = int(counts.max()) if counts.size else 0
    if decoded > MAX_CHUNK_BYTES or stored > MAX_CHUNK_BYTES:
        what = "tiles" if kf.is_tiled else "strips"
        raise ImageTooLargeError(
            f"'{path.name}' stores its image in {what} of {max(decoded, stored) / 2**20:,.0f} MB that must each be "
            f"decoded whole; the limit is {MAX_CHUNK_BYTES / 2**20:,.0f} MB per strip or tile (to keep memory "
            f"bounded). {_CONVERT_HINT}"
        )


# --------------------------------------------------------------------------- Pillow
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


@dataclass(frozen=True)
class _PngHeader:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlace: int
    sbit: tuple[int, ...] | None  # significant bits per channel (sBIT chunk), if any

    def raw_bytes(self) -> int:
        """Size of the filtered scanlines the IDAT stream must inflate to (PNG spec, 7.2 / Adam7)."""
        bpp_bits = self.bit_depth * _PNG_CHANNELS.get(self.colour_type, 1)
        passes = _ADAM7 if self.interlace == 1 else ((0, 0, 1, 1),)
        total = 0
        for x0, y0, dx, dy in passes:
            pw = (self.width - x0 + dx - 1) // dx if self.width > x0 else 0
            ph = (self.height - y0 + dy - 1) // dy if self.height > y0 else 0
            if pw and ph:
                total += ph * (1 + (pw * bpp_bits + 7) // 8)
        return total


#: PNGs whose scanlines inflate to at most this many bytes are fully inflated (streamed,
#: discarded) when opened, so a file that declares more than it holds is refused on open;
#: bigger ones get the structural check only (their data is checked when decoded).
PNG_FULL_CHECK_BYTES = 256 * 1024 * 1024


def _scan_png(path: Path) -> _PngHeader:
    """Check a PNG's chunks (CRCs, end chunk) and, up to :data:`PNG_FULL_CHECK_BYTES`, that its
    image data inflates to the declared size.

    Streams the file (1 MiB reads, 16 MiB of inflated data at a time, nothing kept), so it
    runs in constant memory, and a file that declares more pixels than it holds (a cut-short
    upload, a decompression bomb's lie) is refused here, before anything is allocated.
    Raises ``CorruptSlideError`` (``ImageTooLargeError`` on a header over the pixel caps).
    """
    import struct as _struct

    def bad(why: str) -> CorruptSlideError:
        return CorruptSlideError(_corrupt_message(path, ValueError(why)))

    header: _PngHeader | None = None
    sbit: tuple[int, ...] | None = None
    inflater = zlib.decompressobj()
    inflated = 0
    need = 0
    full_check = True
    seen_end = False
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG_MAGIC:
            raise bad("not a PNG signature")
        while True:
            head = fh.read(8)
            if len(head) < 8:
                break
            length, kind = _struct.unpack(">I4s", head)
            if length > 0x7FFFFFFF:
                raise bad(f"chunk length {length} out of range")
            crc = zlib.crc32(kind)
            left = length
            body_start = b""
            while left:
                piece = fh.read(min(left, 1 << 20))
                if not piece:
                    raise bad("file cut short inside a chunk")
                left -= len(piece)
                crc = zlib.crc32(piece, crc)
                if kind == b"IDAT":
                    if header is None:
                        raise bad("image data before the header")
                    if not full_check:
                        continue
                    buf = piece
                    try:
                        while buf and inflated < need and not inflater.eof:
                            out = inflater.decompress(buf, 1 << 24)
                            inflated += len(out)
                            buf = inflater.unconsumed_tail
                    except zlib.error as e:
                        raise bad(f"damaged image data ({e})") from None
                elif len(body_start) < 64:
                    body_start += piece[: 64 - len(body_start)]
            tail = fh.read(4)
            if len(tail) < 4:
                raise bad("file cut short")
            if _struct.unpack(">I", tail)[0] != (crc & 0xFFFFFFFF):
                raise bad(f"broken checksum in the {kind.decode('latin-1', 'replace')} chunk")
            if kind == b"IHDR":
                if length != 13:
                    raise bad("malformed header")
                w, h, depth, ctype, _, _, interlace = _struct.unpack(">IIBBBBB", body_start[:13])
                if w == 0 or h == 0 or ctype not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
                    raise bad(f"declares an impossible image ({w} x {h}, depth {depth}, colour type {ctype})")
                header = _PngHeader(w, h, depth, ctype, interlace, None)
                if w * h > MAX_PLAIN_IMAGE_PIXELS:  # refused on its header, before any inflating
                    raise ImageTooLargeError(_too_large_message(path, (w, h)))
                if depth == 16 and w * h > MAX_HIGH_BIT_PLAIN_PIXELS:
                    raise ImageTooLargeError(_too_large_message(path, (w, h)).replace(
                        f"{MAX_PLAIN_IMAGE_PIXELS:,} pixels", f"{MAX_HIGH_BIT_PLAIN_PIXELS:,} pixels for 16-bit images"))
                need = header.raw_bytes()
                full_check = need <= PNG_FULL_CHECK_BYTES
            elif kind == b"sBIT":
                sbit = tuple(body_start[:length])
            elif kind == b"IEND":
                seen_end = True
                break
    if header is None:
        raise bad("no image header")
    if full_check and inflated < need:
        try:
            inflated += len(inflater.flush())
        except zlib.error as e:
            raise bad(f"damaged image data ({e})") from None
    if full_check and inflated < need:
        raise bad(f"its image data holds {inflated:,} of the {need:,} bytes its size needs (cut short)")
    if not seen_end:
        raise bad("file cut short (no end chunk)")
    return _PngHeader(header.width, header.height, header.bit_depth, header.colour_type, header.interlace, sbit)


def _pil_to_rgb(img: Image.Image, where: str) -> np.ndarray:
    """A decoded 8-bit Pillow image (or a crop of one) as uint8 RGB, alpha composited on white."""
    mode = img.mode
    if mode in {"RGB", "L", "RGBA", "LA"}:
        arr = np.asarray(img)
    elif mode in {"P", "PA"} or "transparency" in img.info:
        arr = np.asarray(img.convert("RGBA"))
    elif mode in {"1", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"}:
        arr = np.asarray(img.convert("RGBA" if mode in {"La", "RGBa"} else "RGB"))
    else:
        raise UnsupportedPixelFormatError(
            f"{where} uses the pixel mode {mode!r}, which GHIST Studio cannot "
            "convert to RGB. Please export it as an 8-bit RGB PNG or JPEG."
        )
    return _to_rgb8(arr, where)


class PillowSlide(Slide):
    """PNG / JPEG images.

    Opening reads the header and checks the data (PNG: chunk checksums and that the pixel
    data inflate to the declared size, streamed; JPEG: a 1/8-scale decode) without holding
    the image. Pixels are decoded on the first region read, once, and kept as Pillow holds
    them (<= 4 bytes/px, so <= 2 GB at :data:`MAX_PLAIN_IMAGE_PIXELS`); each region is
    converted to RGB on its own. ``thumbnail`` of an image over
    :data:`MAX_INPROCESS_PLAIN_PIXELS` that is not decoded yet is made without decoding it
    here: JPEG by DCT-domain reduction (1/2 to 1/8 scale, <= 1/4 of the memory), PNG in a
    child process capped at :data:`PREVIEW_MEMORY_BYTES` and :data:`PREVIEW_TIMEOUT_S`.

    16-bit PNGs are decoded with imagecodecs (Pillow keeps only the top byte of 16-bit RGB)
    and scaled to 8 bits by their actual bit depth: the sBIT chunk's significant bits when
    present, otherwise the smallest of 8/10/12/14/16 bits that holds the image's largest
    value (a brightfield image always has near-white glass, so 12-bit data written in a
    16-bit container is recognised rather than shown as near-black).
    """

    format: Backend = "pillow"
    #: Decode in this process whatever the size (set in the bounded preview child).
    _decode_here_always = False

    def __init__(self, path: Path, *, mpp_given: float | None) -> None:
        super().__init__(path, mpp_given=mpp_given)
        self._img: Image.Image | None = None
        self._pixels: np.ndarray | None = None
        self._decode_lock = threading.Lock()
        self._png: _PngHeader | None = None
        where = f"'{path.name}'"
        if sniff_format(path) == "png":
            self._png = _scan_png(path)  # before Pillow: bounded, and catches cut-short files
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
            if self._png is not None and self._png.sbit:
                self.properties["png.sBIT"] = ",".join(map(str, self._png.sbit))
            self.level_dimensions = ((int(w), int(h)),)
            if not self._high_bit():
                self._check_mode(img.mode)
            self._finish_init()  # MissingMppError / InvalidMppError before any decoding
            if self.vendor == "jpeg":
                self._check_jpeg(img, where)

    # -- checks ------------------------------------------------------------------------
    def _high_bit(self) -> bool:
        return self._png is not None and self._png.bit_depth == 16

    def _check_mode(self, mode: str) -> None:
        if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F", "I;32", "RGB;16"} or mode.startswith("I;"):
            dtype = "float32" if mode == "F" else ("int32" if mode == "I" else "uint16")
            raise UnsupportedPixelFormatError(_pixel_format_message(dtype, f"'{self.path.name}'"))
        if mode not in {"RGB", "L", "RGBA", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"}:
            raise UnsupportedPixelFormatError(
                f"'{self.path.name}' uses the pixel mode {mode!r}, which GHIST Studio cannot "
                "convert to RGB. Please export it as an 8-bit RGB PNG or JPEG."
            )

    def _check_jpeg(self, img: Image.Image, where: str) -> None:
        """Decode the whole JPEG at 1/8 scale (<= 1/64 of the memory): catches damaged data."""
        w, h = img.size
        try:
            img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else "RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
        except Exception as e:
            raise CorruptSlideError(_corrupt_message(self.path, e)) from None

    # -- decoding ------------------------------------------------------------------------
    def _decode(self) -> None:
        """Decode the whole image once (Pillow's own storage, or uint8 RGB for 16-bit PNGs)."""
        with self._decode_lock:
            if self._img is not None or self._pixels is not None:
                return
            where = f"'{self.path.name}'"
            try:
                if self._high_bit():
                    self._pixels = self._decode_16bit(where)
                    return
                img = Image.open(self.path)
                img.load()
            except SlideError:
                raise
            except MemoryError:
                raise ImageTooLargeError(_too_large_message(self.path, self.dimensions)) from None
            except Exception as e:
                raise CorruptSlideError(_corrupt_message(self.path, e)) from None
            self._img = img

    def _decode_16bit(self, where: str) -> np.ndarray:
        import imagecodecs

        arr = np.asarray(imagecodecs.png_decode(self.path.read_bytes()))
        if arr.dtype != np.uint16:
            raise UnsupportedPixelFormatError(_pixel_format_message(arr.dtype, where))
        if arr.ndim == 2:
            arr = arr[..., None]
        n_colour = arr.shape[2] - (1 if arr.shape[2] in (2, 4) else 0)
        assert self._png is not None
        if self._png.sbit and all(1 <= b <= 16 for b in self._png.sbit[:n_colour]):
            bits = max(self._png.sbit[:n_colour])
        else:
            bits = _bits_for_max(int(arr[..., :n_colour].max(initial=0)))
        self.properties["ghist.significant_bits"] = str(bits)
        out = np.empty(arr.shape, dtype=np.uint8)
        colour_max = (1 << bits) - 1
        for r0 in range(0, arr.shape[0], 1024):  # in bands: no full-size temporaries
            band = arr[r0 : r0 + 1024]
            out[r0 : r0 + 1024, :, :n_colour] = _scale_to_8bit(band[..., :n_colour], colour_max)
            if n_colour < arr.shape[2]:
                out[r0 : r0 + 1024, :, n_colour:] = _scale_to_8bit(band[..., n_colour:], 65535)
        del arr
        return _to_rgb8(out, where)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        self._decode()
        if self._pixels is not None:
            return self._pixels[y : y + h, x : x + w].copy()
        assert self._img is not None
        return _pil_to_rgb(self._img.crop((x, y, x + w, y + h)), f"'{self.path.name}'")

    # -- previews ------------------------------------------------------------------------
    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """As :meth:`Slide.thumbnail`, without decoding a big image in this process (see the class)."""
        self._check_open()
        w0, h0 = self.dimensions
        decoded = self._img is not None or self._pixels is not None
        if decoded or self._decode_here_always or w0 * h0 <= MAX_INPROCESS_PLAIN_PIXELS:
            return super().thumbnail(max_px)
        scale = min(1.0, float(max_px) / max(w0, h0))
        ow, oh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        if self.vendor == "jpeg":
            try:
                with Image.open(self.path) as img:
                    img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else "RGB", (ow, oh))
                    img.load()
                    small = img.resize((ow, oh), resample=Image.Resampling.BILINEAR, reducing_gap=None)
                    return _pil_to_rgb(small, f"'{self.path.name}'")
            except SlideError:
                raise
            except Exception as e:
                raise CorruptSlideError(_corrupt_message(self.path, e)) from None
        st_ = self.path.stat()
        key = (str(self.path.resolve()), st_.st_size, st_.st_mtime_ns, int(max_px))
        with _CHILD_THUMBS_LOCK:
            hit = _CHILD_THUMBS.get(key)
        if hit is None:
            hit = _thumbnail_in_child(self.path, self.mpp, max_px)
            with _CHILD_THUMBS_LOCK:
                _CHILD_THUMBS[key] = hit
                while len(_CHILD_THUMBS) > 16:
                    _CHILD_THUMBS.popitem(last=False)
        return hit.copy()

    def _close(self) -> None:
        if self._img is not None:
            self._img.close()
        self._img = None
        self._pixels = None


#: Thumbnails made by preview children, keyed by (file, size, mtime, max_px): opening the same
#: upload again (inspect, then add to the project) does not decode it again.
_CHILD_THUMBS: "OrderedDict[tuple[str, int, int, int], np.ndarray]" = OrderedDict()
_CHILD_THUMBS_LOCK = threading.Lock()

_CHILD_CODE = (
    "import sys; from ghist_core.io.slide import _thumbnail_child_main; "
    "sys.exit(_thumbnail_child_main(sys.argv[1:]))"
)


def _thumbnail_child_main(argv: list[str]) -> int:
    """Child side of :func:`_thumbnail_in_child`: decode here, write the thumbnail, report errors as JSON."""
    import json

    path, mpp, max_px, out = argv
    PillowSlide._decode_here_always = True
    try:
        with open_slide(path, mpp=float(mpp), backend="pillow") as s:
            np.save(out, s.thumbnail(int(max_px)))
    except SlideError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 3
    except MemoryError:
        print(json.dumps({"error": "MemoryError", "message": ""}))
        return 4
    return 0


def _thumbnail_in_child(path: Path, mpp: float, max_px: int) -> np.ndarray:
    """The thumbnail of a big plain image, decoded in a child process with bounded memory and time.

    The child's address space is capped at :data:`PREVIEW_MEMORY_BYTES` (``RLIMIT_AS``) and
    it is killed after :data:`PREVIEW_TIMEOUT_S`; only the thumbnail comes back. Errors come
    back as the same typed errors; running out of memory or time is ``ImageTooLargeError``.
    """
    import json
    import subprocess
    import sys
    import tempfile

    from ghist_core import errors as _errors

    def limit() -> None:  # runs in the child before exec
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = PREVIEW_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(PREVIEW_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
    too_big = ImageTooLargeError(
        f"'{path.name}' ({path.stat().st_size / 1e6:,.1f} MB file, {'{:,} x {:,}'.format(*_png_size(path))} pixels) "
        f"needs more than {PREVIEW_MEMORY_BYTES / 2**30:.0f} GB of memory or {PREVIEW_TIMEOUT_S:.0f} s to preview "
        f"as a plain image. {_CONVERT_HINT}"
    )
    with tempfile.TemporaryDirectory(prefix="ghist_thumb_") as tmp:
        out = Path(tmp) / "thumb.npy"
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD_CODE, str(path), repr(float(mpp)), str(int(max_px)), str(out)],
                capture_output=True, text=True, timeout=PREVIEW_TIMEOUT_S, env=env, preexec_fn=limit,
            )
        except subprocess.TimeoutExpired:
            raise too_big from None
        if proc.returncode == 0 and out.is_file():
            arr = np.load(out, allow_pickle=False)
            if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
                return arr
        report: dict[str, str] = {}
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                report = json.loads(line)
                break
            except ValueError:
                continue
        cls = getattr(_errors, report.get("error", ""), None)
        if isinstance(cls, type) and issubclass(cls, SlideError) and report.get("message"):
            raise cls(report["message"])
        raise too_big  # MemoryError, killed by the limit, or no answer


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    import struct as _struct

    return _struct.unpack(">II", head[16:24]) if len(head) >= 24 else (0, 0)


# --------------------------------------------------------------------------- factory
def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _rational(v: Any) -> float | None:
    if isinstance(v, tuple) and len(v) == 2:
        num, den = _float_or_none(v[0]), _float_or_none(v[1])
        return num / den if num is not None and den else None
    return _float_or_none(v)


def _tag_int(v: Any) -> int | None:
    """A TIFF tag value that should be one integer, or None (damaged files hold tuples, text...)."""
    if isinstance(v, (tuple, list)) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return None


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
        f"{MAX_PLAIN_IMAGE_PIXELS:,} pixels. Save large scans in the scanner's own format "
        f"(e.g. .svs) or as a tiled pyramidal TIFF. {_CONVERT_HINT}"
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
