"""Colour and bit-depth rules of ``ghist_core.io.slide``, each against a known reference image.

Why: a CMYK TIFF read as RGBA, a palette TIFF read as grey indices, a MinIsWhite scan read
inverted or 12-bit data cut to its top byte give an image that looks like "no tissue" or
runs the analysis on wrong colours without a word. Each format is written here from a known
RGB/grey reference and must read back as that reference (or be refused by name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ghist_core.errors import UnsupportedPixelFormatError
from ghist_core.io.slide import open_slide
from slide_factory import rgb_to_cmyk, synthetic_he, write_png16, write_tiff_photometric


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    """The reference: H&E-like RGB plus a full 0..255 ramp on the top rows (every level used)."""
    img = synthetic_he((160, 120), seed=3)
    img[:4] = np.repeat(np.repeat(np.arange(160, dtype=np.int32)[None, :, None] * 255 // 159, 4, 0), 3, 2)
    return img


def _whole(path: Path, **kw) -> np.ndarray:
    with open_slide(path, **kw) as s:
        w, h = s.dimensions
        return s.read_region((0, 0), 0, (w, h))


# --------------------------------------------------------------------------- CMYK
def test_cmyk_tiff_reads_as_rgb(tmp_path: Path, ref: np.ndarray) -> None:
    p = write_tiff_photometric(tmp_path / "cmyk.tif", rgb_to_cmyk(ref), "separated")
    got = _whole(p)
    assert np.array_equal(got, ref)  # exact: C = 255 - R with K = 0
    # the old reading (CMYK taken as RGBA) was far off; make sure the test could tell
    assert np.abs(rgb_to_cmyk(ref)[..., :3].astype(int) - ref).mean() > 40


def test_cmyk_with_black_ink_reads_within_one_level(tmp_path: Path, ref: np.ndarray) -> None:
    cmyk = rgb_to_cmyk(ref, black=True)
    assert cmyk[..., 3].max() > 100  # the K channel really carries the grey part
    got = _whole(write_tiff_photometric(tmp_path / "cmyk_k.tif", cmyk, "separated"))
    assert np.abs(got.astype(int) - ref).max() <= 1
    pil = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB"))
    assert np.abs(got.astype(int) - pil).max() <= 1  # same formula as Pillow's


def test_cmyk_tiled_zlib_and_thumbnail(tmp_path: Path, ref: np.ndarray) -> None:
    p = write_tiff_photometric(tmp_path / "cmyk_tiled.tif", rgb_to_cmyk(ref), "separated", tile=(32, 32),
                               compression="zlib")
    with open_slide(p) as s:
        assert np.array_equal(s.read_region((10, 20), 0, (100, 70)), ref[20:90, 10:110])
        th = s.thumbnail(40)
    assert abs(float(th.mean()) - float(ref.mean())) < 3


def test_other_inks_are_refused(tmp_path: Path) -> None:
    data = np.zeros((32, 32, 4), np.uint8)  # InkSet 2: four named inks that are not CMYK
    p = write_tiff_photometric(tmp_path / "inks.tif", data, "separated", extratags=[(332, 3, 1, 2, True)])
    with pytest.raises(UnsupportedPixelFormatError, match="8-bit RGB"):
        open_slide(p)


# --------------------------------------------------------------------------- palette
@pytest.mark.parametrize("entries", ["16bit", "8bit"])
def test_palette_tiff_reads_through_its_colormap(tmp_path: Path, ref: np.ndarray, entries: str) -> None:
    pal_img = Image.fromarray(ref).quantize(colors=200, method=Image.Quantize.MEDIANCUT)
    idx = np.asarray(pal_img)
    palette = np.array(pal_img.getpalette()[: 3 * 256] + [0] * (768 - len(pal_img.getpalette()[:768])),
                       np.uint16).reshape(256, 3)
    want = palette[idx].astype(np.uint8)
    cmap = palette.T * (257 if entries == "16bit" else 1)
    p = write_tiff_photometric(tmp_path / f"pal_{entries}.tif", idx, "palette", colormap=cmap.astype(np.uint16))
    got = _whole(p)
    assert np.array_equal(got, want)
    assert np.abs(got.astype(int) - ref).mean() < 6  # and it is the picture, not grey indices
    assert not np.array_equal(got[..., 0], idx)


# --------------------------------------------------------------------------- MinIsWhite
def test_miniswhite_grey_is_inverted_back(tmp_path: Path, ref: np.ndarray) -> None:
    grey = ref[..., 1]
    p = write_tiff_photometric(tmp_path / "miw.tif", 255 - grey, "miniswhite")
    got = _whole(p)
    assert np.array_equal(got, np.repeat(grey[..., None], 3, axis=2))


def test_miniswhite_bilevel(tmp_path: Path) -> None:
    bits = np.zeros((40, 64), bool)
    bits[:, 32:] = True  # 1 = black in MinIsWhite
    p = write_tiff_photometric(tmp_path / "miw1.tif", bits, "miniswhite")
    got = _whole(p)
    assert np.all(got[:, :32] == 255) and np.all(got[:, 32:] == 0)


# --------------------------------------------------------------------------- > 8 bits
def test_16bit_tiff_scaled_by_its_bit_depth(tmp_path: Path, ref: np.ndarray) -> None:
    p = write_tiff_photometric(tmp_path / "rgb16.tif", ref.astype(np.uint16) * 257, "rgb")
    assert np.array_equal(_whole(p), ref)


def test_12bit_tiff_scaled_by_max_sample_value(tmp_path: Path, ref: np.ndarray) -> None:
    data = np.rint(ref.astype(np.float64) * 4095 / 255).astype(np.uint16)
    p = write_tiff_photometric(tmp_path / "rgb12.tif", data, "rgb", extratags=[(281, 3, 1, 4095, True)],
                               tile=(32, 32), compression="zlib")
    got = _whole(p)
    assert np.array_equal(got, ref)
    assert got.max() == 255  # not cut to the top byte (<= 15)


def test_16bit_big_endian_uncompressed_strips(tmp_path: Path, ref: np.ndarray) -> None:
    p = tmp_path / "be16.tif"
    tifffile.imwrite(p, ref.astype(np.uint16) * 257, photometric="rgb", byteorder=">", rowsperstrip=7,
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert np.array_equal(s.read_region((3, 5), 0, (50, 40)), ref[5:45, 3:53])


@pytest.mark.parametrize("sbit", [None, 12])
def test_12bit_data_in_16bit_png(tmp_path: Path, ref: np.ndarray, sbit: int | None) -> None:
    """Raw 12-bit camera values in a 16-bit PNG: scaled by 4095 (sBIT, or inferred), not cut to <= 15."""
    data = np.rint(ref.astype(np.float64) * 4095 / 255).astype(np.uint16)
    p = write_png16(tmp_path / "rgb12.png", data, sbit=sbit)
    assert np.asarray(Image.open(p)).max() <= 15  # what Pillow alone makes of it
    with open_slide(p, mpp=0.5) as s:
        got = s.read_region((0, 0), 0, s.dimensions)
        assert s.properties["ghist.significant_bits"] == "12"
    assert np.array_equal(got, ref)


def test_full_16bit_png_rgb_and_grey(tmp_path: Path, ref: np.ndarray) -> None:
    assert np.array_equal(_whole(write_png16(tmp_path / "rgb16.png", ref.astype(np.uint16) * 257), mpp=0.5), ref)
    grey = ref[..., 0]
    got = _whole(write_png16(tmp_path / "g16.png", grey.astype(np.uint16) * 257), mpp=0.5)
    assert np.array_equal(got, np.repeat(grey[..., None], 3, axis=2))


def test_16bit_png_with_alpha_composited_on_white(tmp_path: Path, ref: np.ndarray) -> None:
    rgba = np.concatenate([ref.astype(np.uint16) * 257, np.zeros(ref.shape[:2] + (1,), np.uint16)], axis=2)
    rgba[:60, :, 3] = 65535
    got = _whole(write_png16(tmp_path / "rgba16.png", rgba), mpp=0.5)
    assert np.array_equal(got[:60], ref[:60]) and np.all(got[60:] == 255)


def test_float_tiff_is_refused(tmp_path: Path, ref: np.ndarray) -> None:
    p = write_tiff_photometric(tmp_path / "f.tif", ref.astype(np.float32) / 255, "rgb")
    with pytest.raises(UnsupportedPixelFormatError, match="8-bit"):
        open_slide(p)


def test_cielab_tiff_is_refused_by_name(tmp_path: Path, ref: np.ndarray) -> None:
    p = write_tiff_photometric(tmp_path / "lab.tif", ref, "cielab")
    with pytest.raises(UnsupportedPixelFormatError, match="CIELab"):
        open_slide(p)
