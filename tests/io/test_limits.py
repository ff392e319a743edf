"""Resource limits of ``ghist_core.io.slide`` checked before decoding, and bounded previews.

Why: a 1.5 MB PNG can declare 22k x 22k pixels, a 1 MB TIFF one 1.2 GB zlib strip, a TIFF
50,000 pages, a tag 40 µm/px; each once cost gigabytes, minutes or an 80x upsampled
analysis. Every limit here is tested on a real file (small where the limit can be lowered
for the test, full size in ``tests/hostile_corpus.py``).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import ghist_core.io.slide as slide_mod
from ghist_core.errors import CorruptSlideError, ImageTooLargeError, InvalidMppError, MissingMppError
from ghist_core.io.slide import MAX_TIFF_PAGES, count_tiff_pages, open_slide
from ghist_core.io.tiles import TileGrid
from slide_factory import synthetic_he, write_tiff_page_chain


# --------------------------------------------------------------------------- page count
def test_page_count_is_bounded_and_refused(tmp_path: Path) -> None:
    p = write_tiff_page_chain(tmp_path / "stack.tif", MAX_TIFF_PAGES + 500)
    assert count_tiff_pages(p) == MAX_TIFF_PAGES + 1  # stops counting past the limit
    assert count_tiff_pages(p, limit=10_000) == MAX_TIFF_PAGES + 500
    with pytest.raises(ImageTooLargeError, match="more than 1,000 images"):
        open_slide(p, mpp=0.5)


def test_page_count_survives_loops_and_bad_offsets(tmp_path: Path) -> None:
    p = write_tiff_page_chain(tmp_path / "three.tif", 3)
    data = bytearray(p.read_bytes())
    ifd_len = 2 + 12 * 9 + 4
    last_next = 8 + 3 * ifd_len - 4
    data[last_next:last_next + 4] = struct.pack("<I", 8)  # the last page points back at the first
    p.write_bytes(bytes(data))
    assert count_tiff_pages(p) == 3
    data[4:8] = struct.pack("<I", 10**9)  # first IFD past the end
    p.write_bytes(bytes(data))
    assert count_tiff_pages(p) == 0


def test_a_slide_with_few_pages_is_counted_exactly(svs_path: Path) -> None:
    with tifffile.TiffFile(svs_path) as t:
        assert count_tiff_pages(svs_path) == len(t.pages)


# --------------------------------------------------------------------------- strips and tiles
def test_huge_compressed_strip_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = synthetic_he((400, 300))
    p = tmp_path / "one_strip.tif"
    tifffile.imwrite(p, img, photometric="rgb", compression="zlib", rowsperstrip=300,
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    monkeypatch.setattr(slide_mod, "MAX_CHUNK_BYTES", 100_000)  # one strip is 360 kB decoded
    with pytest.raises(ImageTooLargeError, match="vips tiffsave") as e:
        open_slide(p)
    assert "strips of" in str(e.value)


def test_strips_are_decoded_once_per_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = synthetic_he((600, 500), seed=2)
    p = tmp_path / "strips.tif"
    tifffile.imwrite(p, img, photometric="rgb", compression="zlib", rowsperstrip=64,
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        calls = []
        page = s._chunked_page(0)
        real = page.decode

        def counting(*a, **k):  # noqa: ANN002
            calls.append(a[1])
            return real(*a, **k)

        monkeypatch.setattr(page, "decode", counting)
        assert np.array_equal(s.read_region((17, 33), 0, (500, 400)), img[33:433, 17:517])
        s.thumbnail(100)
    n_strips = -(-500 // 64)
    assert len(calls) <= 2 * n_strips  # read + thumbnail; never a strip per pixel row or per band


def test_uncompressed_single_strip_read_by_rows(tmp_path: Path) -> None:
    img = synthetic_he((700, 400), seed=4)
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, img, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(p) as t:
        assert len(t.pages[0].dataoffsets) == 1  # one strip of the whole image
    with open_slide(p) as s:
        assert s._chunked_page(0) is not None and slide_mod._direct_strips(s._chunked_page(0))
        assert np.array_equal(s.read_region((650, 390), 0, (100, 20))[:10, :50], img[390:400, 650:700])
        assert np.array_equal(s.read_region((1, 2), 0, (64, 64)), img[2:66, 1:65])


# --------------------------------------------------------------------------- µm per pixel
def _tiff_with_mpp(path: Path, w: int, h: int, mpp: float) -> Path:
    tifffile.imwrite(path, np.full((h, w, 3), 230, np.uint8), photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def test_file_mpp_larger_than_a_glass_slide_counts_as_missing(tmp_path: Path) -> None:
    p = _tiff_with_mpp(tmp_path / "coarse.tif", 3000, 20, 40.0)  # 120 mm wide
    with pytest.raises(MissingMppError, match="larger than any glass slide"):
        open_slide(p)
    with pytest.raises(InvalidMppError, match="larger than any glass slide"):
        open_slide(p, mpp=40.0)
    with open_slide(p, mpp=0.5) as s:
        assert s.mpp == 0.5


def test_analysis_never_upsamples_more_than_the_limit(tmp_path: Path) -> None:
    p = _tiff_with_mpp(tmp_path / "overview.tif", 200, 150, 40.0)  # 8 mm: a plausible overview image
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(40.0)
        with pytest.raises(InvalidMppError, match="80 times"):
            s.read_region_mpp((0, 0), (64, 64), 0.5)
        with pytest.raises(InvalidMppError, match="enlarge"):
            TileGrid.over_slide(s, 256, 0, 0.5)
        assert s.read_region_mpp((0, 0), (16, 16), 10.0).shape == (16, 16, 3)  # exactly 4x is allowed
        s.thumbnail(64)  # previews are not analysis reads


# --------------------------------------------------------------------------- plain images
def _png(path: Path, img: np.ndarray) -> Path:
    Image.fromarray(img).save(path)
    return path


def test_declared_size_larger_than_data_is_refused_on_open(tmp_path: Path) -> None:
    """The fuzz find: IHDR 1 x 517,821 with 64 bytes of data once allocated 24 GiB."""
    def chunk(k: bytes, b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 517821, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    p = tmp_path / "tall.png"
    p.write_bytes(data)
    with pytest.raises(CorruptSlideError, match="cut short"):
        open_slide(p, mpp=0.5)


def test_thumbnail_of_a_very_thin_image(tmp_path: Path) -> None:
    """The thumbnail margin is per axis: a 2 x 300,000 image reads a few MB, not gigabytes."""
    img = np.full((300_000, 2, 3), 200, np.uint8)
    img[150_000:] = 40
    p = _png(tmp_path / "thin.png", img)
    with open_slide(p, mpp=0.25) as s:
        th = s.thumbnail(64)
    assert th.shape == (64, 1, 3)
    assert th[5, 0, 0] >= 200 and th[-5, 0, 0] < 120  # (edges blend with the white beyond them)


def test_open_does_not_decode_a_plain_image(tmp_path: Path) -> None:
    img = synthetic_he((300, 200))
    with open_slide(_png(tmp_path / "a.png", img), mpp=0.5) as s:
        assert s._img is None and s._pixels is None  # header and streaming check only
        assert s.info["width_px"] == 300
        assert np.array_equal(s.read_region((0, 0), 0, (300, 200)), img)


def test_big_png_thumbnail_made_in_a_capped_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = synthetic_he((900, 700), seed=5)
    p = _png(tmp_path / "big.png", img)
    with open_slide(p, mpp=0.5) as s:
        here = s.thumbnail(128)  # small: decoded here
    monkeypatch.setattr(slide_mod, "MAX_INPROCESS_PLAIN_PIXELS", 10_000)
    with open_slide(p, mpp=0.5) as s:
        there = s.thumbnail(128)
        assert s._img is None and s._pixels is None  # this process never decoded it
    assert np.array_equal(here, there)


def test_big_png_child_over_its_memory_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _png(tmp_path / "big.png", synthetic_he((400, 300)))
    monkeypatch.setattr(slide_mod, "MAX_INPROCESS_PLAIN_PIXELS", 10_000)
    monkeypatch.setattr(slide_mod, "PREVIEW_MEMORY_BYTES", 64 * 1024 * 1024)  # not even Python fits
    with open_slide(p, mpp=0.5) as s, pytest.raises(ImageTooLargeError, match="memory"):
        s.thumbnail(64)


def test_child_reports_typed_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _png(tmp_path / "big.png", synthetic_he((400, 300)))
    monkeypatch.setattr(slide_mod, "MAX_INPROCESS_PLAIN_PIXELS", 10_000)
    with open_slide(p, mpp=0.5) as s:
        p.write_bytes(p.read_bytes()[:200])  # cut short after it was opened
        with pytest.raises(CorruptSlideError):
            s.thumbnail(64)


def test_big_jpeg_thumbnail_by_dct_reduction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = synthetic_he((1600, 1200), seed=6)
    p = tmp_path / "big.jpg"
    Image.fromarray(img).save(p, quality=95)
    with open_slide(p, mpp=0.5) as s:
        here = s.thumbnail(200)
    monkeypatch.setattr(slide_mod, "MAX_INPROCESS_PLAIN_PIXELS", 10_000)
    with open_slide(p, mpp=0.5) as s:
        reduced = s.thumbnail(200)
        assert s._img is None
    assert reduced.shape == here.shape
    assert np.abs(reduced.astype(int) - here).mean() < 3


def test_truncated_jpeg_refused_on_open(tmp_path: Path) -> None:
    p = tmp_path / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(synthetic_he((400, 300))).save(buf, format="JPEG", quality=90)
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CorruptSlideError):
        open_slide(p, mpp=0.5)
