"""ghist_core.io.slide on the real Aperio SVS and on small slides written here with tifffile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ghist_core.errors import MissingMppError, SlideError
from ghist_core.io.slide import Slide, open_slide
from slide_factory import gradient_rgb, pyramid, synthetic_he, write_flat_tiff, write_png, write_pyramid_tiff

SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


# --------------------------------------------------------------------------- real SVS
@pytest.fixture(scope="module")
def svs(svs_path: Path):
    with open_slide(svs_path) as s:
        yield s


def test_svs_metadata(svs: Slide) -> None:
    assert svs.format == "openslide"
    assert svs.vendor == "aperio"
    assert svs.dimensions == (2220, 2967)
    assert svs.level_count == 1
    assert svs.level_dimensions == ((2220, 2967),)
    assert svs.level_downsamples == (1.0,)
    assert svs.mpp == pytest.approx(0.499)
    assert svs.mpp_source == "file"
    assert svs.objective_power == 20.0
    assert svs.properties["openslide.vendor"] == "aperio"
    assert svs.size_um == pytest.approx((2220 * 0.499, 2967 * 0.499))


def test_svs_info_has_no_associated_images(svs: Slide) -> None:
    info = svs.info
    for key in ("format", "vendor", "width_px", "height_px", "mpp", "level_count", "objective_power"):
        assert key in info
    assert (info["width_px"], info["height_px"]) == (2220, 2967)
    # the file does hold a label and a macro image; none of it may reach the UI
    text = json.dumps(info).lower()  # also proves it is plain JSON-able data
    assert "label" not in text and "macro" not in text and "associated" not in text
    assert not hasattr(svs, "associated_images")


def test_svs_sha256_streamed(svs: Slide) -> None:
    assert svs.sha256() == SVS_SHA256
    assert svs.sha256(chunk_bytes=4096) == SVS_SHA256


def test_svs_read_region_and_white_outside(svs: Slide) -> None:
    r = svs.read_region((1000, 1500), 0, (300, 200))
    assert r.shape == (200, 300, 3) and r.dtype == np.uint8
    assert r.std() > 10  # real tissue, not a blank
    edge = svs.read_region((2220 - 50, 2967 - 40), 0, (100, 80))
    assert np.array_equal(edge[40:, :], np.full((40, 100, 3), 255, np.uint8))
    assert np.array_equal(edge[:, 50:], np.full((80, 50, 3), 255, np.uint8))
    assert np.array_equal(edge[:40, :50], svs.read_region((2170, 2927), 0, (50, 40)))


def test_svs_openslide_and_tifffile_agree(svs_path: Path, svs: Slide) -> None:
    with open_slide(svs_path, backend="tifffile") as t:
        assert t.format == "tifffile" and t.vendor == "aperio"
        assert t.dimensions == svs.dimensions
        assert t.mpp == pytest.approx(svs.mpp)
        a = svs.read_region((480, 720), 0, (500, 400)).astype(int)
        b = t.read_region((480, 720), 0, (500, 400)).astype(int)
        assert np.abs(a - b).mean() < 1.0  # same JPEG tiles, maybe another libjpeg


@pytest.mark.parametrize("target_mpp", [0.25, 0.5, 1.0])
def test_svs_read_region_mpp_shapes_and_scale(svs: Slide, target_mpp: float) -> None:
    out = svs.read_region_mpp((600.0, 900.0), (200, 150), target_mpp)
    assert out.shape == (150, 200, 3) and out.dtype == np.uint8
    # the same area read at level 0 and resized must look the same
    f = target_mpp / svs.mpp
    w0, h0 = round(200 * f), round(150 * f)
    ref = np.asarray(Image.fromarray(svs.read_region((600, 900), 0, (w0, h0))).resize((200, 150), Image.BILINEAR))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6


def test_svs_thumbnail(svs: Slide) -> None:
    th = svs.thumbnail(512)
    assert th.dtype == np.uint8 and max(th.shape[:2]) == 512
    assert th.shape[0] / th.shape[1] == pytest.approx(2967 / 2220, rel=0.01)
    # never upscaled
    assert svs.thumbnail(10_000).shape[:2] == (2967, 2220)


def test_explicit_mpp_overrides_file(svs_path: Path) -> None:
    with open_slide(svs_path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "given"
        assert s.size_um == pytest.approx((2220 * 0.25, 2967 * 0.25))


def test_closed_slide_refuses_reads(svs_path: Path) -> None:
    with open_slide(svs_path) as s:
        pass
    with pytest.raises(SlideError, match="closed"):
        s.read_region((0, 0), 0, (10, 10))


# --------------------------------------------------------------------------- generated TIFFs
LAYOUTS = [
    pytest.param("subifds", False, "tifffile", id="subifd-pyramid-tifffile"),
    pytest.param("pages", False, "tifffile", id="page-pyramid-tifffile"),
    pytest.param("pages", False, "openslide", id="page-pyramid-openslide"),
    pytest.param("subifds", True, "tifffile", id="ome-tiff"),
]


@pytest.mark.parametrize(("layout", "ome", "backend"), LAYOUTS)
def test_pyramid_tiff_levels_and_exact_pixels(tmp_path: Path, layout: str, ome: bool, backend: str) -> None:
    rgb = gradient_rgb((1000, 800))
    p = write_pyramid_tiff(tmp_path / "g.tif", rgb, mpp=0.5, levels=3, layout=layout, ome=ome)
    with open_slide(p, backend=backend if backend == "openslide" else None) as s:
        assert s.format == backend
        assert s.vendor == ("ome-tiff" if ome else "generic-tiff")
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "file"
        assert s.level_dimensions == ((1000, 800), (500, 400), (250, 200))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert np.array_equal(s.read_region((300, 200), 0, (64, 48)), rgb[200:248, 300:364])
        lv1 = pyramid(rgb, 2)[1]
        assert np.array_equal(s.read_region((300, 200), 1, (64, 48)), lv1[100:148, 150:214])
        # at 1 µm/px, aligned tiles come straight from level 1 (best level, no resampling)
        assert s.best_level_for_downsample((2.0, 2.0)) == 1
        assert np.array_equal(s.read_region_mpp((300, 200), (64, 48), 1.0), lv1[100:148, 150:214])
        # at 0.25 µm/px (upsampled) and 0.75 µm/px the shapes are right
        assert s.read_region_mpp((300, 200), (64, 48), 0.25).shape == (48, 64, 3)
        assert s.read_region_mpp((300, 200), (64, 48), 0.75).shape == (48, 64, 3)


@pytest.mark.parametrize(("unit", "mpp"), [("CENTIMETER", 0.25), ("INCH", 0.2527), ("MICROMETER", 1.0)])
def test_mpp_from_resolution_tags(tmp_path: Path, unit: str, mpp: float) -> None:
    p = write_pyramid_tiff(tmp_path / "r.tif", gradient_rgb((300, 200)), mpp=mpp, levels=1, resolution_unit=unit)
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(mpp, rel=1e-6)


@pytest.mark.parametrize("ome", [False, True], ids=["tiff", "ome-tiff"])
def test_tiff_without_resolution_needs_mpp(tmp_path: Path, ome: bool) -> None:
    p = write_pyramid_tiff(tmp_path / "n.tif", gradient_rgb((300, 200)), mpp=None, levels=2, ome=ome)
    with pytest.raises(MissingMppError, match="µm/px"):
        open_slide(p)
    with open_slide(p, mpp=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_source == "given" and s.level_count == 2


def test_flat_strip_tiff_thumbnail_in_bands(tmp_path: Path) -> None:
    rgb = gradient_rgb((1500, 1100))
    p = write_flat_tiff(tmp_path / "flat.tif", rgb, mpp=0.5)
    with open_slide(p) as s:
        assert s.level_count == 1
        th = s.thumbnail(300)
        assert th.shape == (220, 300, 3)
        ref = np.asarray(Image.fromarray(rgb).resize((300, 220), Image.BILINEAR)).astype(int)
        assert np.abs(th.astype(int) - ref).mean() < 3


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_plain_image_needs_and_uses_mpp(tmp_path: Path, fmt: str) -> None:
    rgb = synthetic_he((400, 300))
    p = tmp_path / f"im.{fmt}"
    Image.fromarray(rgb).save(p, quality=95) if fmt == "jpeg" else write_png(p, rgb)
    with pytest.raises(MissingMppError):
        open_slide(p)
    with open_slide(p, mpp=0.5) as s:
        assert s.format == "pillow" and s.vendor == fmt and s.dimensions == (400, 300)
        assert s.read_region_mpp((0, 0), (64, 64), 1.0).shape == (64, 64, 3)
        if fmt == "png":
            assert np.array_equal(s.read_region((10, 20), 0, (30, 40)), rgb[20:60, 10:40])


def test_planar_ome_tiff_reads_as_rgb(tmp_path: Path) -> None:
    """OME-TIFF stored as separate colour planes (axes CYX) reads the same as interleaved."""
    import tifffile

    rgb = gradient_rgb((300, 200))
    p = tmp_path / "planar.ome.tif"
    tifffile.imwrite(
        p, np.moveaxis(rgb, -1, 0), ome=True, photometric="rgb", planarconfig="separate",
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    with open_slide(p) as s:
        assert s.dimensions == (300, 200) and s.mpp == 0.5
        assert np.array_equal(s.read_region((0, 0), 0, (300, 200)), rgb)


def test_tiled_reads_match_whole_level_and_cache_is_bounded(tmp_path: Path) -> None:
    rgb = gradient_rgb((900, 700))
    p = write_pyramid_tiff(tmp_path / "t.tif", rgb, mpp=0.5, levels=1, tile=128)
    with open_slide(p) as s:
        s.tile_cache_bytes = 5 * 128 * 128 * 3  # five tiles
        rng = np.random.default_rng(0)
        for _ in range(30):
            x, y = int(rng.integers(-50, 900)), int(rng.integers(-50, 700))
            w, h = int(rng.integers(1, 400)), int(rng.integers(1, 400))
            got = s.read_region((x, y), 0, (w, h))
            want = np.full((h, w, 3), 255, np.uint8)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, 900), min(y + h, 700)
            if x1 > x0 and y1 > y0:
                want[y0 - y : y1 - y, x0 - x : x1 - x] = rgb[y0:y1, x0:x1]
            assert np.array_equal(got, want)
            assert s._cache_bytes <= max(s.tile_cache_bytes, 128 * 128 * 3)


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_concurrent_reads_are_correct(tmp_path: Path, backend: str) -> None:
    """Readers in several threads (e.g. a data loader) get the right pixels."""
    from concurrent.futures import ThreadPoolExecutor

    rgb = gradient_rgb((1024, 768))
    p = write_pyramid_tiff(tmp_path / "c.tif", rgb, mpp=0.5, levels=2, tile=128, layout="pages")
    rng = np.random.default_rng(1)
    boxes = [(int(rng.integers(0, 900)), int(rng.integers(0, 650)), int(rng.integers(8, 120)), int(rng.integers(8, 110)))
             for _ in range(200)]
    with open_slide(p, backend=backend) as s:
        s.tile_cache_bytes = 8 * 128 * 128 * 3  # small cache: lots of eviction under contention

        def check(box: tuple[int, int, int, int]) -> bool:
            x, y, w, h = box
            return bool(np.array_equal(s.read_region((x, y), 0, (w, h)), rgb[y : y + h, x : x + w]))

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(check, boxes))


@pytest.mark.parametrize("target_mpp", [0.3, 1.0, 2.0])
def test_tiles_join_without_seams(svs: Slide, target_mpp: float) -> None:
    """4 x 4 small reads at a target µm/px stitch into the same image as one big read."""
    big = svs.read_region_mpp((400.0, 800.0), (256, 256), target_mpp)
    f = target_mpp / svs.mpp
    stitched = np.zeros_like(big)
    for r in range(4):
        for c in range(4):
            stitched[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64] = svs.read_region_mpp(
                (400.0 + c * 64 * f, 800.0 + r * 64 * f), (64, 64), target_mpp
            )
    diff = np.abs(stitched.astype(int) - big)
    assert diff.max() <= 1 and diff.mean() < 0.01
