"""Bad tiles for both segmenters: an empty table or a typed error, never a crash (issue #16).

Every case runs through ``load_segmenter()`` (learned, bundled weights) and
``load_segmenter(kind="classical")`` via the public ``segment_tile(rgb, mpp)``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from ghist_core.errors import GhistError, InvalidMppError, ModelInputError
from ghist_core.segmentation import MppWarning, load_segmenter


@pytest.fixture(scope="module", params=["learned", "nuclei-seg", "classical"])
def seg(request):
    """The default learned segmenter, the original one (which "auto" still runs for ghist-her2st), classical."""
    if request.param == "learned":
        return load_segmenter(device="cpu")
    if request.param == "nuclei-seg":
        return load_segmenter("nuclei-seg", device="cpu")
    return load_segmenter(kind="classical")


def _check_result(seg, rgb_shape, out) -> pd.DataFrame:
    inst, cells = out
    assert isinstance(inst, np.ndarray) and inst.dtype == np.int32 and inst.shape == tuple(rgb_shape[:2])
    assert isinstance(cells, pd.DataFrame)
    for col in ("cell_id", "x_px", "y_px", "x_um", "y_um", "area_um2", "type"):
        assert col in cells.columns
    assert len(cells) == int(inst.max())
    return cells


def _run(seg, rgb, mpp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        return seg.segment_tile(rgb, mpp)


# --- tiles without nuclei -----------------------------------------------------------------
@pytest.mark.parametrize("value", [255, 0, 240], ids=["white", "black", "near-white"])
def test_blank_tiles_give_an_empty_table(seg, value):
    rgb = np.full((256, 256, 3), value, np.uint8)
    cells = _check_result(seg, rgb.shape, _run(seg, rgb, 0.5))
    assert len(cells) == 0


def test_tile_without_nuclei_gives_an_empty_table(seg):
    """Smooth eosin-pink 'stroma' with gentle texture and no haematoxylin blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    wave = 6 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    base = np.array([236, 170, 205], float)  # pink
    rgb = np.clip(base + wave[..., None] + rng.normal(0, 2, (256, 256, 3)), 0, 255).astype(np.uint8)
    cells = _check_result(seg, rgb.shape, _run(seg, rgb, 0.5))
    assert len(cells) == 0


def test_noise_tile_does_not_crash(seg):
    rgb = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    _check_result(seg, rgb.shape, _run(seg, rgb, 0.5))


# --- tiles smaller than the model's field ---------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (5, 5), (15, 40), (31, 31), (33, 17), (64, 3)])
@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_tiny_tiles(seg, shape, mpp):
    rgb = np.full(shape + (3,), 200, np.uint8)
    rgb[shape[0] // 3:, shape[1] // 3:] = (90, 40, 130)  # a dark corner
    _check_result(seg, rgb.shape, _run(seg, rgb, mpp))


def test_rgba_drops_alpha_and_non_contiguous_views_work(seg):
    rng = np.random.default_rng(2)
    rgb = rng.integers(150, 256, (96, 128, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((96, 128, 1), 7, np.uint8)], axis=2)
    a = _run(seg, rgb, 0.5)
    b = _run(seg, rgba, 0.5)
    assert np.array_equal(a[0], b[0])
    view = rgb[::-1, ::2]
    _check_result(seg, view.shape, _run(seg, view, 0.5))
    fortran = np.asfortranarray(rgb)
    assert np.array_equal(_run(seg, fortran, 0.5)[0], a[0])


# --- arrays that are not 8-bit RGB -----------------------------------------------------------
BAD_ARRAYS = {
    "grey-2d": np.full((64, 64), 128, np.uint8),
    "one-channel": np.full((64, 64, 1), 128, np.uint8),
    "two-channels": np.full((64, 64, 2), 128, np.uint8),
    "five-channels": np.full((64, 64, 5), 128, np.uint8),
    "4-d batch": np.full((2, 64, 64, 3), 128, np.uint8),
    "float 0..1": np.full((64, 64, 3), 0.5, np.float32),
    "float nan": np.full((64, 64, 3), np.nan, np.float64),
    "uint16": np.full((64, 64, 3), 30000, np.uint16),
    "int64": np.full((64, 64, 3), 100, np.int64),
    "bool": np.ones((64, 64, 3), bool),
    "object": np.full((4, 4, 3), None, object),
    "empty": np.zeros((0, 0, 3), np.uint8),
    "zero rows": np.zeros((0, 32, 3), np.uint8),
    "scalar": np.array(3, np.uint8),
}


@pytest.mark.parametrize("name", list(BAD_ARRAYS))
def test_non_rgb_arrays_raise_a_typed_error(seg, name):
    with pytest.raises(ModelInputError) as err:
        seg.segment_tile(BAD_ARRAYS[name], 0.5)
    assert str(err.value)  # a message the app can show


@pytest.mark.parametrize("obj", [None, [[1, 2, 3]], "tile.png", 3.0], ids=["none", "list", "str", "float"])
def test_non_arrays_raise_a_typed_error(seg, obj):
    with pytest.raises(ModelInputError):
        seg.segment_tile(obj, 0.5)


# --- bad µm per pixel -------------------------------------------------------------------------
@pytest.mark.parametrize("mpp", [float("nan"), float("inf"), -float("inf"), -0.5, 0.0, 0, None, "0.5um", [0.5],
                                 np.float32("nan"), 1e-9, 1e6],
                         ids=["nan", "inf", "-inf", "negative", "zero", "int zero", "none", "str", "list",
                              "np nan", "tiny", "huge"])
def test_bad_mpp_raises_invalid_mpp(seg, mpp):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    with pytest.raises(InvalidMppError) as err:
        seg.segment_tile(rgb, mpp)
    assert isinstance(err.value, GhistError) and str(err.value)


@pytest.mark.parametrize("mpp", [np.float64(0.5), np.float32(0.25), "0.5", 1])
def test_numeric_mpp_forms_are_accepted(seg, mpp):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    _check_result(seg, rgb.shape, _run(seg, rgb, mpp))


@pytest.mark.parametrize("mpp", [0.5, 0.25, 0.8])
@pytest.mark.parametrize("value", [0, 255, (200, 120, 160)], ids=["black", "white", "flat pink"])
def test_blank_slide_gives_an_empty_cell_table(seg, value, mpp):
    """A uniform slide smaller than a tile is read padded with white (and resampled when its µm/px
    is not the segmenter's); uniformity is judged on the slide's own pixels away from the padding,
    so the black/white edge draws no nuclei (it drew 7 at 0.5 µm/px, 2 at 0.25)."""
    from ghist_core.segmentation import ArraySlide

    cells = seg.segment_slide(ArraySlide(np.full((300, 420, 3), value, np.uint8), mpp))
    assert len(cells) == 0 and {"cell_id", "x_um", "y_um"} <= set(cells.columns)
