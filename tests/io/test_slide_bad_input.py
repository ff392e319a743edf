"""Bad input to ghist_core.io.slide: each case raises the right typed error with a clear message."""

from __future__ import annotations

import math
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ghist_core.errors import (CorruptSlideError, EmptyFileError, GhistError, ImageTooLargeError, InvalidMppError,
                               MissingMppError, SlideError, UnsupportedPixelFormatError, UnsupportedSlideError)
from ghist_core.io.slide import MAX_PLAIN_IMAGE_PIXELS, open_slide, read_image_array
from ghist_core.io.tiles import TileGrid
from slide_factory import gradient_rgb, synthetic_he, write_flat_tiff, write_png


def _plain_message(err: BaseException, name: str) -> None:
    """A message a clinician can act on: names the file, no traceback, no repr noise."""
    msg = str(err)
    assert name in msg
    assert "Traceback" not in msg and len(msg) < 600


# --------------------------------------------------------------------------- empty / not a slide
def test_zero_byte_upload(tmp_path: Path) -> None:
    p = tmp_path / "upload.svs"
    p.write_bytes(b"")
    with pytest.raises(EmptyFileError, match="empty") as e:
        open_slide(p)
    _plain_message(e.value, "upload.svs")


def test_text_file_renamed_svs(tmp_path: Path) -> None:
    p = tmp_path / "notes.svs"
    p.write_text("Patient 12: biopsy received 3 March.\nThis is not a slide.\n", encoding="utf-8")
    with pytest.raises(UnsupportedSlideError, match="text file") as e:
        open_slide(p)
    _plain_message(e.value, "notes.svs")
    assert "svs" in str(e.value).lower()  # tells which formats are supported


def test_random_bytes_renamed_tif(tmp_path: Path) -> None:
    p = tmp_path / "x.tif"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedSlideError):
        open_slide(p)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(UnsupportedSlideError, match="folder"):
        open_slide(tmp_path)


# --------------------------------------------------------------------------- truncated / damaged
@pytest.mark.parametrize("keep_fraction", [0.001, 0.3, 0.66, 0.9999])
def test_truncated_svs_fails_on_open(svs_path: Path, tmp_path: Path, keep_fraction: float) -> None:
    data = svs_path.read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CorruptSlideError) as e:
        open_slide(p)
    _plain_message(e.value, "cut.svs")
    assert "damaged" in str(e.value) or "cut short" in str(e.value)


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_damaged_svs_tiles_fail_on_first_read(svs_path: Path, tmp_path: Path, backend: str) -> None:
    """Headers intact but tile data overwritten: opening works, reading the tile raises."""
    data = bytearray(svs_path.read_bytes())
    with tifffile.TiffFile(svs_path) as t:
        page = t.pages[0]
        off, n = page.dataoffsets[40], page.databytecounts[40]  # tile 40 of the 10 x 13 grid
    data[off : off + n] = b"\x00" * n
    p = tmp_path / "damaged.svs"
    p.write_bytes(bytes(data))
    with open_slide(p, backend=backend) as s:
        assert s.dimensions == (2220, 2967)
        s.read_region((0, 0), 0, (240, 240))  # an intact tile reads fine
        col, row = 40 % 10, 40 // 10
        with pytest.raises(CorruptSlideError, match="damaged") as e:
            s.read_region((col * 240 + 10, row * 240 + 10), 0, (50, 50))
    _plain_message(e.value, "damaged.svs")


def test_truncated_tiled_tiff_detected_on_open(tmp_path: Path) -> None:
    p = write_flat_tiff(tmp_path / "flat.tif", gradient_rgb((1024, 1024)), mpp=0.5, tile=256)
    data = p.read_bytes()
    cut = tmp_path / "flat_cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSlideError, match="cut short"):
        open_slide(cut)


def test_truncated_png(tmp_path: Path) -> None:
    p = write_png(tmp_path / "a.png", synthetic_he((300, 200)))
    data = p.read_bytes()
    cut = tmp_path / "b.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSlideError):
        open_slide(cut, mpp=0.5)


# --------------------------------------------------------------------------- decompression bomb
def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height RGB pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [30_000, 60_000])
def test_png_decompression_bomb(tmp_path: Path, side: int) -> None:
    assert side * side > MAX_PLAIN_IMAGE_PIXELS
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(side, side))
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="too large") as e:
        open_slide(p, mpp=0.5)
    with pytest.raises(ImageTooLargeError):
        read_image_array(p)
    assert time.perf_counter() - t0 < 30  # refused from the header; nothing decoded
    _plain_message(e.value, "bomb.png")


def test_read_image_array_limit_and_rules(tmp_path: Path, demo_png_1000: Path) -> None:
    target_png = demo_png_1000  # any 1000 x 1000 RGB PNG
    ref = read_image_array(target_png)
    assert ref.shape == (1000, 1000, 3) and ref.dtype == np.uint8
    assert np.array_equal(ref, np.asarray(Image.open(target_png).convert("RGB")))
    with pytest.raises(ImageTooLargeError, match="999,999"):
        read_image_array(target_png, max_pixels=999_999)
    grey = write_png(tmp_path / "g.png", np.full((10, 12), 7, np.uint8))
    assert read_image_array(grey).shape == (10, 12, 3)
    empty = tmp_path / "e.png"
    empty.write_bytes(b"")
    with pytest.raises(EmptyFileError):
        read_image_array(empty)


# --------------------------------------------------------------------------- pixel formats
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_float_and_signed_tiff_are_refused(tmp_path: Path, dtype: type) -> None:
    img = np.zeros((200, 300, 3), dtype=dtype)
    p = write_flat_tiff(tmp_path / "deep.tif", img, mpp=0.5)
    with pytest.raises(UnsupportedPixelFormatError, match="8-bit"):
        open_slide(p)


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[..., :3] = (200, 40, 100)
    rgba[:, :20, 3] = 0  # transparent -> white
    rgba[:, 20:40, 3] = 255  # opaque -> the colour
    rgba[:, 40:, 3] = 128  # half -> halfway to white
    p = write_png(tmp_path / "alpha.png", rgba)
    with open_slide(p, mpp=0.5) as s:
        out = s.read_region((0, 0), 0, (60, 50))
    assert np.all(out[:, :20] == 255)
    assert np.all(out[:, 20:40] == (200, 40, 100))
    expect = np.rint((np.array([200, 40, 100]) * 128 + 255 * 127) / 255)
    assert np.abs(out[:, 40:].astype(int) - expect).max() <= 1


def test_rgba_tiff_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 30
    rgba[:32, :, 3] = 0
    rgba[32:, :, 3] = 255
    p = write_flat_tiff(tmp_path / "alpha.tif", rgba, mpp=0.5)
    with open_slide(p) as s:
        out = s.read_region((0, 0), 0, (64, 64))
    assert np.all(out[:32] == 255) and np.all(out[32:] == 30)


@pytest.mark.parametrize("writer", ["png", "tiff", "palette-png"])
def test_greyscale_is_replicated_to_rgb(tmp_path: Path, writer: str) -> None:
    grey = (np.arange(80 * 90) % 251).astype(np.uint8).reshape(80, 90)
    if writer == "png":
        p = write_png(tmp_path / "g.png", grey)
    elif writer == "tiff":
        p = write_flat_tiff(tmp_path / "g.tif", grey, mpp=0.5)
    else:
        p = tmp_path / "p.png"
        Image.fromarray(grey).convert("P").save(p)
    with open_slide(p, mpp=0.5) as s:
        out = s.read_region((0, 0), 0, (90, 80))
    assert out.shape == (80, 90, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    if writer != "palette-png":
        assert np.array_equal(out[..., 0], grey)


def test_multichannel_and_stacks_are_refused(tmp_path: Path) -> None:
    five = np.zeros((5, 64, 64), np.uint8)
    p = tmp_path / "five.ome.tif"
    tifffile.imwrite(p, five, ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.raises(UnsupportedPixelFormatError, match="channels"):
        open_slide(p).read_region((0, 0), 0, (8, 8))
    stack = np.zeros((4, 3, 64, 64), np.uint8)
    q = tmp_path / "stack.ome.tif"
    tifffile.imwrite(q, stack, ome=True, metadata={"axes": "ZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.raises(UnsupportedSlideError, match="multi-dimensional"):
        open_slide(q)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name",
    ["slide ünïcødé 日本語.svs", "..hidden..svs", "a'b\"c;rm -rf.svs", "Ωμέγα – 2024 (copy).svs"],
)
def test_unusual_file_names_open(svs_path: Path, tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    shutil.copyfile(svs_path, p)
    with open_slide(p) as s:
        assert s.dimensions == (2220, 2967)
        assert s.info["file_name"] == name


def test_dotdot_path_is_just_a_path(svs_path: Path, tmp_path: Path) -> None:
    """The reader opens what the path names; cleaning upload names is the store's job."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copyfile(svs_path, tmp_path / "a" / "slide.svs")
    p = tmp_path / "a" / "b" / ".." / "slide.svs"
    with open_slide(str(p)) as s:
        assert s.dimensions == (2220, 2967)
    png = tmp_path / "a" / "b" / "..." / "日本.png"
    png.parent.mkdir()
    write_png(png, synthetic_he((100, 80)))
    with open_slide(png, mpp=0.5) as s:
        assert s.dimensions == (100, 80)


# --------------------------------------------------------------------------- mpp values
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, -1, math.nan, math.inf, -math.inf, "abc", None.__class__, True])
def test_invalid_mpp_is_refused(svs_path: Path, bad: object) -> None:
    with pytest.raises(InvalidMppError) as e:
        open_slide(svs_path, mpp=bad)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError) and isinstance(e.value, GhistError)
    assert "positive number" in str(e.value) or "must be a number" in str(e.value)


@pytest.mark.parametrize("value", [0.01, 60.0, 353.0])
def test_implausible_mpp_is_refused_everywhere(svs_path: Path, value: float) -> None:
    """One range for every check: open_slide, check_mpp and the segmenters agree."""
    from ghist_core.io.slide import PLAUSIBLE_MPP_RANGE, check_mpp
    from ghist_core.segmentation import ClassicalSegmenter

    assert not PLAUSIBLE_MPP_RANGE[0] <= value <= PLAUSIBLE_MPP_RANGE[1]
    with pytest.raises(InvalidMppError, match="plausible range"):
        open_slide(svs_path, mpp=value)
    with pytest.raises(InvalidMppError, match="plausible range"):
        check_mpp(value)
    with pytest.raises(InvalidMppError, match="plausible range"):
        ClassicalSegmenter().segment_tile(np.zeros((16, 16, 3), np.uint8), value)
    assert check_mpp(value, plausible=False) == value  # a resampling target may be any scale
    for edge in PLAUSIBLE_MPP_RANGE:
        assert check_mpp(edge) == edge


@pytest.mark.parametrize("bad", [0, -0.25, math.nan, math.inf])
def test_invalid_target_mpp_is_refused(svs_path: Path, bad: float) -> None:
    with open_slide(svs_path) as s:
        with pytest.raises(InvalidMppError):
            s.read_region_mpp((0, 0), (10, 10), bad)
        with pytest.raises(InvalidMppError):
            TileGrid.over_slide(s, 256, 0, bad)


def test_placeholder_resolution_is_not_an_mpp(tmp_path: Path) -> None:
    """72 dpi (353 µm/px) is what many tools write by default: not a microscope scale."""
    p = tmp_path / "dpi72.tif"
    tifffile.imwrite(p, gradient_rgb((200, 100)), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(MissingMppError, match="micrometres"):
        open_slide(p)


def test_missing_mpp_message_is_actionable(tmp_path: Path) -> None:
    p = write_png(tmp_path / "scan.png", synthetic_he((100, 80)))
    with pytest.raises(MissingMppError) as e:
        open_slide(p)
    _plain_message(e.value, "scan.png")
    assert "0.25" in str(e.value) and "0.5" in str(e.value)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (100_000, 100_000)], ids=["zero", "negative", "too-large"])
def test_region_size_is_checked_by_both_reads(svs_path: Path, size: tuple[int, int]) -> None:
    """``read_region`` and ``read_region_mpp`` refuse the same sizes, before allocating anything."""
    err = ImageTooLargeError if size[0] > 0 and size[1] > 0 else ValueError
    match = "too large to read at once" if err is ImageTooLargeError else "must be positive"
    with open_slide(svs_path) as s:
        with pytest.raises(err, match=match):
            s.read_region((0, 0), 0, size)
        with pytest.raises(err, match=match):
            s.read_region_mpp((0, 0), size, 0.5)
