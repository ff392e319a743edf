"""``segment_tile(..., nucleus_scale=)``: segmenting as if the pixels were f x the stated µm/px
keeps the instances aligned with the input, measures in the true µm/px, and the "auto" check
keeps the stated scale on ordinary tissue and moves off it when nuclei look twice their size."""

from __future__ import annotations

import numpy as np
import pytest

from ghist_core.errors import ModelInputError
from ghist_core.io.slide import open_slide
from ghist_core.segmentation import load_segmenter
from ghist_core.segmentation.model import SCALE_FACTORS, SCALE_MIN_AREA_PX, foreground_certainty
from ghist_core.segmentation.tiling import resample_rgb


@pytest.fixture(scope="module")
def seg():
    return load_segmenter("nuclei-seg-stain", device="cpu")


@pytest.fixture(scope="module")
def region(demo_slide):
    """200 µm of the demo slide at its own 0.5 µm/px and the same tissue enlarged 2x (nuclei look
    twice their size when the stated µm/px is kept)."""
    with open_slide(demo_slide) as s:
        mpp = s.mpp
        rgb = np.ascontiguousarray(s.read_region((900, 1300), 0, (400, 400))[..., :3])
    return rgb, resample_rgb(rgb, (800, 800)), mpp


def test_the_default_is_the_check_and_keeps_factor_one_on_ordinary_tissue(seg, region):
    """Adopted by the pre-declared rule (docs/DECISIONS.md, session 12): the plain call checks the
    scale, and on the demo tissue as scanned it keeps the stated one, nucleus for nucleus."""
    assert seg.nucleus_scale == "auto"
    rgb, _, mpp = region
    a, ca = seg.segment_tile(rgb, mpp)
    b, cb = seg.segment_tile(rgb, mpp, nucleus_scale=1.0)
    assert np.array_equal(a, b) and ca.attrs["nucleus_scale"] == cb.attrs["nucleus_scale"] == 1.0


def test_a_factor_measures_in_the_true_mpp(seg, region):
    """The enlarged tile segmented with f = 1/2 finds about the same nuclei as the native tile,
    at twice the pixel positions and (in the stated µm/px) four times the area."""
    rgb, big, mpp = region
    inst1, c1 = seg.segment_tile(rgb, mpp)
    inst2, c2 = seg.segment_tile(big, mpp, nucleus_scale=0.5)
    assert inst2.shape == big.shape[:2] and c2.attrs["nucleus_scale"] == 0.5
    assert 0.8 < len(c2) / len(c1) < 1.25
    ratio = float(np.median(c2["area_um2"]) / np.median(c1["area_um2"]))
    assert 3.0 < ratio < 5.3, ratio
    # each native nucleus has a nucleus of the enlarged tile at twice its position (within 3 µm)
    p1 = c1[["x_um", "y_um"]].to_numpy() * 2
    p2 = c2[["x_um", "y_um"]].to_numpy()
    d = np.sqrt(((p1[:, None, :] - p2[None, :, :]) ** 2).sum(-1)).min(1)
    assert np.median(d) < 3.0


def test_auto_keeps_the_stated_scale_on_tissue_and_moves_for_large_nuclei(seg, region):
    rgb, big, mpp = region
    _, native = seg.segment_tile(rgb, mpp, nucleus_scale="auto")
    assert native.attrs["nucleus_scale"] == 1.0
    _, enlarged = seg.segment_tile(big, mpp, nucleus_scale="auto")
    assert enlarged.attrs["nucleus_scale"] in SCALE_FACTORS and enlarged.attrs["nucleus_scale"] < 1.0
    _, plain = seg.segment_tile(big, mpp, nucleus_scale=1.0)
    assert len(enlarged) < len(plain)  # the plain call cuts the large nuclei into more pieces


def test_the_segmenter_default_and_bad_factors(seg, region):
    rgb, _, mpp = region
    seg2 = __import__("copy").copy(seg)
    seg2.nucleus_scale = 0.5
    assert seg2.segment_tile(rgb[:128, :128], mpp)[1].attrs["nucleus_scale"] == 0.5
    assert seg.nucleus_scale == "auto"  # the copy's setting is its own
    for bad in ("bigger", -1, 0.0, float("nan"), 50, True, None.__class__):
        with pytest.raises(ModelInputError):
            seg.segment_tile(rgb[:64, :64], mpp, nucleus_scale=bad)
    inst, cells = seg.segment_tile(np.full((64, 64, 3), 255, np.uint8), mpp, nucleus_scale="auto")
    assert inst.max() == 0 and len(cells) == 0 and cells.attrs["nucleus_scale"] == 1.0
    with pytest.raises(ModelInputError):  # checked before the tile is found blank
        seg.segment_tile(np.full((64, 64, 3), 255, np.uint8), mpp, nucleus_scale="bigger")
    assert seg.segment_tile(np.full((64, 64, 3), 255, np.uint8), mpp, nucleus_scale=0.5)[1].attrs["nucleus_scale"] == 0.5


def test_certainty_is_higher_for_confident_maps():
    assert foreground_certainty(np.array([0.0, 1.0])) == 1.0
    assert foreground_certainty(np.array([0.1, 0.6, 0.8])) == pytest.approx(0.7)
    assert foreground_certainty(np.full((4, 4), 0.5)) == 0.0  # nothing called nucleus
    assert foreground_certainty(np.zeros((0,))) == 0.0


@pytest.mark.parametrize("area_px, gain, calls, factor", [
    (SCALE_MIN_AREA_PX - 1, 0.2, 1, 1.0),    # nuclei small at factor 1: nothing else is tried
    (SCALE_MIN_AREA_PX + 1, 0.005, 2, 1.0),  # tried, but the certainty gain is within the margin
    (SCALE_MIN_AREA_PX + 1, 0.02, 2, 2 / 3),  # tried and clearly surer: moves
])
def test_the_auto_rule_gate_and_margin(seg, region, monkeypatch, area_px, gain, calls, factor):
    """The rule itself, on stand-in maps: the area gate (working px at factor 1) and the margin."""
    import copy

    import pandas as pd

    from ghist_core.segmentation.model import SCALE_MARGIN

    assert gain != SCALE_MARGIN
    rgb, _, mpp = region
    s = copy.copy(seg)
    seen = []

    def maps_at(image, seg_mpp):
        f = seg_mpp / mpp
        seen.append(f)
        return (np.full((8, 8), 0.7 if f == 1.0 else 0.7 + gain, np.float32), None, None)

    def instances(maps, hw, true_mpp, seg_mpp, rgb=None):
        return np.zeros(hw, np.int32), pd.DataFrame({"area_um2": [area_px * s.mpp ** 2] * 3})

    monkeypatch.setattr(s, "_maps_at", maps_at)
    monkeypatch.setattr(s, "_instances", instances)
    _, cells = s.segment_tile(rgb, mpp, nucleus_scale="auto")
    assert len(seen) == calls and cells.attrs["nucleus_scale"] == pytest.approx(factor)


# --- the slide path: segment_slide(..., nucleus_scale=), per tile (in the app, per block) ---------

def _slide_cells(seg, rgb, mpp, scale):
    from ghist_core.segmentation import ArraySlide

    return seg.segment_slide(ArraySlide(rgb, mpp), nucleus_scale=scale)


def test_slide_auto_is_the_default_and_the_stated_scale_on_ordinary_tissue(seg, region):
    """Adopted by the pre-declared rule (docs/DECISIONS.md, session 13): the plain segment_slide call
    checks the scale; on the demo tissue as scanned it keeps factor 1, the same nuclei as asking
    for 1.0, each marked with the factor it was segmented at."""
    from ghist_core.segmentation import ArraySlide

    rgb, _, mpp = region
    a, b = seg.segment_slide(ArraySlide(rgb, mpp)), _slide_cells(seg, rgb, mpp, 1.0)
    assert len(a) == len(b) > 50
    assert np.allclose(a[["x_um", "y_um", "area_um2"]].to_numpy(), b[["x_um", "y_um", "area_um2"]].to_numpy())
    assert (a["nucleus_scale"] == 1.0).all() and (b["nucleus_scale"] == 1.0).all()


def test_slide_auto_moves_where_nuclei_look_twice_their_size(seg, region):
    """The 2x-enlarged tissue as a slide: "auto" segments it at 2/3 (fewer, larger pieces than the
    plain call, which cuts large nuclei up), the same as asking for 2/3 outright."""
    _, big, mpp = region
    auto, plain, fixed = (_slide_cells(seg, big, mpp, s) for s in ("auto", 1.0, SCALE_FACTORS[1]))
    assert np.allclose(auto["nucleus_scale"], SCALE_FACTORS[1])
    assert len(auto) < len(plain) and auto["area_um2"].median() > plain["area_um2"].median()
    assert len(auto) == len(fixed)
    assert np.allclose(auto[["x_um", "y_um"]].to_numpy(), fixed[["x_um", "y_um"]].to_numpy())


def test_slide_factor_keeps_positions_and_true_units(seg, region):
    """The enlarged tissue at factor 1/2 finds the native nuclei again at twice their positions and
    four times their area in the stated µm/px: coordinates and measurements are not in the shrunk
    image's pixels."""
    rgb, big, mpp = region
    c1, c2 = _slide_cells(seg, rgb, mpp, 1.0), _slide_cells(seg, big, mpp, 0.5)
    assert 0.8 < len(c2) / len(c1) < 1.25
    assert 3.0 < float(c2["area_um2"].median() / c1["area_um2"].median()) < 5.3
    assert c2["x_um"].max() <= big.shape[1] * mpp and c2["y_um"].max() <= big.shape[0] * mpp
    p1, p2 = c1[["x_um", "y_um"]].to_numpy() * 2, c2[["x_um", "y_um"]].to_numpy()
    assert np.median(np.sqrt(((p1[:, None, :] - p2[None, :, :]) ** 2).sum(-1)).min(1)) < 3.0


def test_slide_bad_factor_and_blank_slide(seg, region):
    rgb, _, mpp = region
    for bad in ("bigger", 0.0, float("nan"), True):
        with pytest.raises(ModelInputError):
            _slide_cells(seg, rgb, mpp, bad)
    for scale in ("auto", 0.5):
        blank = _slide_cells(seg, np.full((300, 300, 3), 255, np.uint8), mpp, scale)
        assert len(blank) == 0 and "x_um" in blank


def test_pipeline_config_resumes_an_old_run_at_the_stated_scale(tmp_path, monkeypatch):
    """A run recorded before the setting (by predict_slide, by the app's queue, or with no pipeline
    params at all) resumes as its first blocks were made (factor 1); what a new run records, the
    app's queued runs included, keeps the default."""
    from dataclasses import asdict

    from ghist_core.pipeline import worker
    from ghist_core.pipeline.blocks import PipelineConfig
    from ghist_core.project import Project
    from slide_factory import synthetic_he, write_png

    assert PipelineConfig().nucleus_scale == "auto"
    for old in ({"block_um": 512.0}, {"uncertainty": True}, None, {}):
        assert PipelineConfig.from_params(old).nucleus_scale == 1.0
    assert PipelineConfig.from_params(asdict(PipelineConfig())).nucleus_scale == "auto"
    assert PipelineConfig.from_params({"nucleus_scale": 1.0}).nucleus_scale == 1.0
    monkeypatch.setattr(worker, "_spawn", lambda *args, **kwargs: 0)  # recorded, not started
    project = Project.open_or_create(tmp_path / "p")
    rec = project.add_slide(write_png(tmp_path / "s.png", synthetic_he((64, 64), seed=0)), patient_id="P", mpp=0.5)
    run_id = worker.submit_run(project.folder, int(rec.slide_id))
    params = Project.open(project.folder).get_run(run_id).params["pipeline"]
    assert PipelineConfig.from_params(params).nucleus_scale == "auto" == params["nucleus_scale"]


def test_slide_factor_above_one_is_tiled_and_columns_keep_their_order(seg, region):
    """A factor above 1 enlarges each tile, so its maps are made tile by tile (not one huge pass);
    whatever the factor, the table's columns come in the same order."""
    rgb, _, mpp = region
    small = np.ascontiguousarray(rgb[:200, :200])
    calls = []
    original = seg.predict_maps
    seg.predict_maps = lambda image, **kw: calls.append(image.shape) or original(image, **kw)
    try:
        up = _slide_cells(seg, small, mpp, 4.0)
    finally:
        del seg.predict_maps
    assert calls and max(calls[0][:2]) > max(small.shape[:2])  # the enlarged tile went through the tiled path
    assert list(up.columns) == list(_slide_cells(seg, small, mpp, 1.0).columns) == \
        list(_slide_cells(seg, small, mpp, 2 / 3).columns)
    assert (up["nucleus_scale"] == 4.0).all() and up["x_um"].max() <= 200 * mpp


def test_a_certainty_trigger_can_switch_the_check_off(seg, region):
    """``scale_max_certainty`` (an option, off by default): at 0 no other factor is ever tried, so the
    enlarged tissue stays at the stated scale on both paths."""
    import copy

    _, big, mpp = region
    assert seg.scale_max_certainty == float("inf")
    off = copy.copy(seg)
    off.scale_max_certainty = 0.0
    assert off.segment_tile(big, mpp)[1].attrs["nucleus_scale"] == 1.0
    assert (_slide_cells(off, big, mpp, "auto")["nucleus_scale"] == 1.0).all()


def _probed(seg, share: float = 0.25):
    import copy

    probed = copy.copy(seg)
    probed.scale_probe = share
    return probed


def test_a_probe_window_gates_the_slide_check_without_changing_its_choice(seg, region, monkeypatch):
    """``scale_probe`` (docs/DECISIONS.md, session 14): on the enlarged tissue the window wins too, so
    the full check runs and every cell comes out as without the probe; on the tissue as scanned
    (area gate off, so that the full check is tried there) the window does not win, the full 2/3
    reading of the tile is never made, and the cells are the same as the full check's."""
    import copy

    from ghist_core.segmentation.model import LearnedSegmenter

    rgb, big, mpp = region
    full_checks = []
    real = LearnedSegmenter._better_scale
    monkeypatch.setattr(LearnedSegmenter, "_better_scale",
                        staticmethod(lambda *a: full_checks.append(1) or real(*a)))
    ungated = copy.copy(seg)
    ungated.scale_min_area_px = 0.0
    for base, image, probed_checks in ((seg, big, 1), (ungated, rgb, 0)):
        calls = []
        for model in (_probed(base), base):
            full_checks.clear()
            calls.append((_slide_cells(model, image, mpp, "auto"), len(full_checks)))
        (a, n_probed), (b, n_full) = calls
        assert len(a) == len(b) > 50
        assert np.allclose(a[["x_um", "y_um", "area_um2", "nucleus_scale"]].to_numpy(),
                           b[["x_um", "y_um", "area_um2", "nucleus_scale"]].to_numpy())
        assert (n_probed, n_full) == (probed_checks, 1)
    assert np.allclose(a["nucleus_scale"], 1.0)
    assert np.allclose(_slide_cells(_probed(seg), big, mpp, "auto")["nucleus_scale"], SCALE_FACTORS[1])


def test_the_probe_window_sits_on_the_nuclei_and_small_tiles_skip_it(seg, region, monkeypatch):
    """The window is placed where the factor-1 map has the most nucleus pixels (tissue in one corner of
    white glass: the window is there) and is at least PROBE_MIN_PX a side: a tile that small is its
    own window, so the probe defers to the full check without a pass of its own."""
    from ghist_core.segmentation.model import PROBE_MIN_PX

    rgb, _, mpp = region
    tile = np.full((1024, 1024, 3), 240, np.uint8)
    tile[-400:, -400:] = rgb
    npp = seg.predict_maps(tile)[0]
    seen = []
    probed = _probed(seg)
    monkeypatch.setattr(probed, "_block_maps_at", lambda window, seg_mpp: seen.append(window) or None)
    assert probed._probe_moves(tile, npp, mpp) is False  # no maps at any factor: nothing wins
    (window,) = seen
    assert window.shape[:2] == (PROBE_MIN_PX, PROBE_MIN_PX)
    assert window.mean() < 200  # tissue, not glass
    seen.clear()
    small = tile[-PROBE_MIN_PX:, -PROBE_MIN_PX:]
    assert probed._probe_moves(small, npp[-PROBE_MIN_PX:, -PROBE_MIN_PX:], mpp) is True and not seen
