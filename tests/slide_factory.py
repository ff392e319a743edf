"""Small slides written on the fly for tests (tifffile, Pillow).

Why: the real SVS has one level and fixed metadata; these helpers write pyramidal and
flat TIFFs, OME-TIFFs and PNGs with or without a µm/px so every reader path and every
bad-input case can be exercised in ``tmp_path``. Used by tests of other modules too.

>>> rgb = synthetic_he((1024, 768))                                   # doctest: +SKIP
>>> write_pyramid_tiff(tmp_path / "s.tif", rgb, mpp=0.5, levels=3)    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import tifffile
from PIL import Image

#: Typical H&E colours (RGB): haematoxylin-rich nuclei, eosin-rich stroma, glass.
NUCLEUS_RGB = (80, 50, 140)
STROMA_RGB = (225, 130, 175)
GLASS_RGB = (245, 245, 245)


def synthetic_he(
    size_wh: tuple[int, int],
    *,
    seed: int = 0,
    tissue_box_frac: tuple[float, float, float, float] = (0.2, 0.25, 0.5, 0.5),
    nuclei_per_mpx: float = 400.0,
    nucleus_radius_px: float = 6.0,
) -> np.ndarray:
    """uint8 RGB: glass with one rectangle of pink stroma holding purple round nuclei.

    ``tissue_box_frac`` is (x, y, w, h) of the tissue as fractions of the image, so tests
    know exactly where tissue is. Nuclei are drawn vectorised (distance to nearest seed).
    """
    w, h = size_wh
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = GLASS_RGB
    bx, by, bw, bh = tissue_box_frac
    x0, y0 = int(bx * w), int(by * h)
    x1, y1 = int((bx + bw) * w), int((by + bh) * h)
    region = img[y0:y1, x0:x1]
    rh, rw = region.shape[:2]
    if rh == 0 or rw == 0:
        return img
    noise = rng.normal(0, 6, size=(rh, rw, 1))
    region[:] = np.clip(np.array(STROMA_RGB, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    n = max(1, int(nuclei_per_mpx * rw * rh / 1e6))
    cy = rng.uniform(0, rh, n)
    cx = rng.uniform(0, rw, n)
    # rasterise nuclei on a coarse grid of seeds: label each pixel with its nearest seed
    from scipy.spatial import cKDTree

    yy, xx = np.mgrid[0:rh, 0:rw]
    d, _ = cKDTree(np.stack([cy, cx], 1)).query(np.stack([yy.ravel(), xx.ravel()], 1), k=1)
    inside = (d.reshape(rh, rw) <= nucleus_radius_px)
    region[inside] = NUCLEUS_RGB
    return img


def gradient_rgb(size_wh: tuple[int, int]) -> np.ndarray:
    """uint8 RGB whose pixel (x, y) encodes its position: R = x % 256, G = y % 256, B = (x//256 + 7*(y//256)) % 256.

    Lets tests check that a region read from (x, y) really comes from (x, y).
    """
    w, h = size_wh
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, (xx // 256 + 7 * (yy // 256)) % 256], axis=-1).astype(np.uint8)


def _downsample2(rgb: np.ndarray) -> np.ndarray:
    """2x box downsample (crops an odd last row/column)."""
    h, w = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2
    a = rgb[:h, :w].astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8)


def pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    """[level0, level0 / 2, level0 / 4, ...] with ``levels`` entries."""
    out = [rgb]
    for _ in range(levels - 1):
        out.append(_downsample2(out[-1]))
    return out


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float | None = 0.5,
    levels: int = 3,
    tile: int = 256,
    layout: Literal["subifds", "pages"] = "subifds",
    compression: str | None = None,
    ome: bool = False,
    resolution_unit: Literal["CENTIMETER", "INCH", "MICROMETER"] = "CENTIMETER",
) -> Path:
    """Write a tiled pyramidal TIFF (or OME-TIFF) of ``rgb``; returns the path.

    ``mpp=None`` writes no usable scale (ResolutionUnit NONE / no PhysicalSize);
    ``layout="pages"`` writes each level as its own page (the layout OpenSlide's
    generic-TIFF reader understands); ``"subifds"`` nests levels in SubIFDs.
    """
    path = Path(path)
    levs = pyramid(rgb, levels)
    kw: dict = dict(photometric="rgb", tile=(tile, tile), compression=compression)
    res_kw: dict = {}
    if mpp is not None and not ome:
        per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0, "MICROMETER": 1.0}[resolution_unit]
        res_kw = dict(resolution=(per_unit / mpp, per_unit / mpp), resolutionunit=resolution_unit)
    metadata: dict | None = None
    if ome:
        metadata = {"axes": "YXS"}
        if mpp is not None:
            metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as tw:
        if layout == "subifds":
            tw.write(levs[0], subifds=levels - 1, metadata=metadata, **kw, **res_kw)
            for lv in levs[1:]:
                tw.write(lv, subfiletype=1, metadata=None, **kw)
        else:
            tw.write(levs[0], metadata=metadata, **kw, **res_kw)
            for i, lv in enumerate(levs[1:], start=1):
                lres: dict = {}
                if res_kw:
                    r = res_kw["resolution"]
                    lres = dict(resolution=(r[0] / 2**i, r[1] / 2**i), resolutionunit=resolution_unit)
                tw.write(lv, subfiletype=1, metadata=None, **kw, **lres)
    return path


def write_flat_tiff(
    path: str | Path, image: np.ndarray, *, mpp: float | None = 0.5, tile: int | None = None,
    photometric: str | None = None,
) -> Path:
    """Write a single-level TIFF (strips unless ``tile``), any dtype/channels."""
    path = Path(path)
    kw: dict = {}
    if mpp is not None:
        kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    if tile:
        kw["tile"] = (tile, tile)
    if photometric is None:
        photometric = "rgb" if image.ndim == 3 and image.shape[2] in (3, 4) else "minisblack"
    extrasamples = None
    if image.ndim == 3 and image.shape[2] == 4:
        extrasamples = ["unassalpha"]
    tifffile.imwrite(path, image, photometric=photometric, extrasamples=extrasamples, **kw)
    return path


def write_png(path: str | Path, image: np.ndarray, mode: str | None = None) -> Path:
    """Write ``image`` as PNG with Pillow (mode inferred unless given)."""
    path = Path(path)
    Image.fromarray(image, mode=mode).save(path) if mode else Image.fromarray(image).save(path)
    return path


def _procedural_tile(x0: int, y0: int, w: int, h: int, scale: float) -> np.ndarray:
    """Deterministic H&E-like texture at level-0 position (x0, y0) * scale (no state)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx = (xx + x0) * scale
    gy = (yy + y0) * scale
    wave = np.sin(gx / 37.0) * np.cos(gy / 41.0) + 0.5 * np.sin((gx + gy) / 13.0)
    nuc = wave > 0.9
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[:] = STROMA_RGB
    out[nuc] = NUCLEUS_RGB
    return out


def write_large_pyramid_tiff(
    path: str | Path, size_px: int, *, mpp: float = 0.25, tile: int = 512, levels: int = 4,
    compression: str = "jpeg",
) -> Path:
    """Write a square ``size_px`` tiled pyramidal TIFF without holding it in memory.

    Tiles are generated one at a time from a procedural texture, so a 16k x 16k slide
    is written with a few MB of RAM. Used by the slide I/O benchmark.
    """
    path = Path(path)

    def tiles(n: int, scale: float) -> Iterator[np.ndarray]:
        for ty in range(0, n, tile):
            for tx in range(0, n, tile):
                yield _procedural_tile(tx, ty, tile, tile, scale)

    sizes = [size_px // 2**i for i in range(levels)]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, n in enumerate(sizes):
            res = 1e4 / (mpp * 2**i)
            tw.write(
                tiles(n, float(2**i)), shape=(n, n, 3), dtype=np.uint8, photometric="rgb",
                tile=(tile, tile), compression=compression, subfiletype=1 if i else 0,
                resolution=(res, res), resolutionunit="CENTIMETER",
            )
    return path


# --------------------------------------------------------------------------- colour formats
def rgb_to_cmyk(rgb: np.ndarray, *, black: bool = False) -> np.ndarray:
    """uint8 CMYK of ``rgb``: C = 255 - R (K = 0), or with ``black`` the grey part moved to K
    (C = (255 - R - K) * 255 / (255 - K)), which reads back within 1 level."""
    inv = 255 - rgb.astype(np.int32)
    if not black:
        return np.concatenate([inv, np.zeros(rgb.shape[:2] + (1,), np.int32)], axis=2).astype(np.uint8)
    k = inv.min(axis=2, keepdims=True)
    den = np.maximum(255 - k, 1)
    cmy = np.where(k < 255, np.rint((inv - k) * 255 / den), 0)
    return np.concatenate([cmy, k], axis=2).astype(np.uint8)


def write_tiff_photometric(path: str | Path, data: np.ndarray, photometric: str, *, mpp: float = 0.5,
                           **kw) -> Path:
    """A strip TIFF with an explicit photometric (``separated``, ``palette``, ``miniswhite``...)."""
    path = Path(path)
    tifffile.imwrite(path, data, photometric=photometric, resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER", **kw)
    return path


def write_png16(path: str | Path, data: np.ndarray, *, sbit: int | None = None) -> Path:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA) via imagecodecs, optionally with an sBIT chunk."""
    import struct
    import zlib

    import imagecodecs

    raw = imagecodecs.png_encode(np.ascontiguousarray(data.astype(np.uint16)))
    if sbit is not None:
        channels = 1 if data.ndim == 2 else data.shape[2]
        body = bytes([sbit] * channels)
        chunk = struct.pack(">I", len(body)) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body) & 0xFFFFFFFF)
        at = 8 + 25  # after the signature and IHDR
        raw = raw[:at] + chunk + raw[at:]
    path = Path(path)
    path.write_bytes(raw)
    return path


def write_tiff_page_chain(path: str | Path, n_pages: int, *, side: int = 4) -> Path:
    """A classic TIFF of ``n_pages`` tiny grey pages in one IFD chain, written by hand (fast for 50k pages)."""
    import struct

    entries_per = 9
    ifd_len = 2 + 12 * entries_per + 4
    pixels = bytes(side * side)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    data_off = 8 + n_pages * ifd_len
    for i in range(n_pages):
        nxt = 8 + (i + 1) * ifd_len if i + 1 < n_pages else 0
        tags = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                (273, 4, 1, data_off), (277, 3, 1, 1), (278, 3, 1, side), (279, 4, 1, len(pixels))]
        out += struct.pack("<H", entries_per)
        for tag, typ, count, val in tags:
            out += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
        out += struct.pack("<I", nxt)
    out += pixels
    path = Path(path)
    path.write_bytes(bytes(out))
    return path


def demo_crop_png(out: str | Path, demo_slide: str | Path, xy: tuple[int, int], size: int) -> Path:
    """A ``size`` x ``size`` px crop of the demo slide at level-0 ``xy``, saved as a PNG (which states no µm per pixel)."""
    from ghist_core.io.slide import open_slide

    with open_slide(demo_slide) as s:
        Image.fromarray(s.read_region(xy, 0, (size, size))).save(out)
    return Path(out)
