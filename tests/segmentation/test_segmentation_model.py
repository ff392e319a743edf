"""The bundled learned nucleus model: loads from the repo, segments real H&E, survives bad input, seams."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from ghist_core.errors import ModelInputError, WeightsIntegrityError, WeightsNotFoundError
from ghist_core.paths import BUNDLED_WEIGHTS_DIR, DEFAULT_SEGMENTER
from ghist_core.segmentation import ArraySlide, MppWarning, load_segmenter
from ghist_core.segmentation.features import RAY_COLUMNS
from ghist_core.io.hashing import sha256_file
from ghist_core.io.slide import open_slide

WEIGHTS = BUNDLED_WEIGHTS_DIR / f"{DEFAULT_SEGMENTER}.safetensors"
BUNDLED = ["nuclei-seg", "nuclei-seg-stain"]


@pytest.fixture(scope="module")
def seg():
    return load_segmenter(device="cpu")


@pytest.fixture(scope="module")
def demo_region(demo_slide):
    with open_slide(demo_slide) as s:
        mpp = s.mpp
        rgb = s.read_region((900, 1300), 0, (400, 400))
    return rgb, mpp


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_and_card(name):
    weights = BUNDLED_WEIGHTS_DIR / f"{name}.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert weights.stat().st_size < 30e6
    assert card["sha256"] == sha256_file(weights)
    for key in ("architecture", "postprocess", "mpp", "type_names", "data", "command", "metrics"):
        assert key in card
    assert card["kind"] == "segmentation"


def test_the_default_segmenter_is_the_stain_robust_one(seg):
    """load_segmenter() with no name gives DEFAULT_SEGMENTER, whose card records its stain-bank training."""
    assert seg.card["name"] == DEFAULT_SEGMENTER == "nuclei-seg-stain"
    assert "stain_bank" in seg.card and seg.card["base_model"]["name"] == "nuclei-seg"


def test_type_is_the_weighted_argmax_of_the_probabilities(seg, demo_region):
    """The default card's per-type decision weights (chosen on the validation split, docs/DECISIONS.md,
    session 13) decide the type label, "other" merged into its lineage (session 17); the
    probabilities stay the network's. Without weights or merge the label is the plain argmax; on
    stand-in probabilities a weight flips a label."""
    import copy
    import dataclasses

    from ghist_core.segmentation.features import measure_instances

    rgb, mpp = demo_region
    w = np.asarray(seg.post.type_weights, np.float64)
    assert len(w) == len(seg.type_names) and seg.card["postprocess"]["type_weights"] == list(w)
    _, cells = seg.segment_tile(rgb, mpp)
    probs = cells[[f"prob_{t}" for t in seg.type_names]].to_numpy()
    names = np.asarray(seg.type_names, dtype=object)
    weighted = probs * w
    weighted[:, 2] += weighted[:, 0]  # "other" joins "epithelial" (the card's merge)
    assert seg.post.type_merge == {"other": "epithelial"}
    assert (cells["type"].to_numpy() == names[1:][weighted[:, 1:].argmax(1)]).all()
    plain = copy.copy(seg)
    plain.post = dataclasses.replace(seg.post, type_weights=None, type_merge=None)
    _, cells_plain = plain.segment_tile(rgb, mpp)
    assert np.allclose(cells_plain[[f"prob_{t}" for t in seg.type_names]].to_numpy(), probs)
    assert (cells_plain["type"].to_numpy() == names[probs.argmax(1)]).all()
    # on stand-in probabilities a weight flips the label
    inst = np.zeros((8, 8), np.int32)
    inst[2:5, 2:5] = 1
    tp = np.zeros((3, 8, 8), np.float32)
    tp[1], tp[2] = 0.4, 0.6  # background 0; type "a" 0.4, type "b" 0.6
    assert measure_instances(inst, 0.5, type_probs=tp, type_names=("a", "b"))["type"].tolist() == ["b"]
    assert measure_instances(inst, 0.5, type_probs=tp, type_names=("a", "b"),
                             type_weights=(2.0, 1.0))["type"].tolist() == ["a"]


def test_segments_demo_tile(seg, demo_region):
    rgb, mpp = demo_region
    inst, cells = seg.segment_tile(rgb, mpp)
    assert inst.shape == rgb.shape[:2] and inst.dtype == np.int32
    # 200 x 200 µm of tissue holds tens to a few hundred nuclei
    assert 20 <= len(cells) <= 800
    assert sorted(cells["id"]) == list(range(1, int(inst.max()) + 1))
    assert set(cells["type"]) <= set(seg.type_names) - {"other"}  # merged (docs/DECISIONS.md, session 17)
    probs = cells[[f"prob_{t}" for t in seg.type_names]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert cells["area_um2"].between(1, 600).all()
    assert set(RAY_COLUMNS) <= set(cells.columns)
    # nuclei are darker (more haematoxylin) than the tile on average
    nuc = rgb[inst > 0].mean()
    assert nuc < rgb[inst == 0].mean() - 10


def test_blank_and_tiny_tiles(seg):
    inst, cells = seg.segment_tile(np.full((300, 200, 3), 255, np.uint8), 0.5)
    assert inst.shape == (300, 200) and inst.max() == 0 and len(cells) == 0
    inst, cells = seg.segment_tile(np.full((10, 7, 3), 200, np.uint8), 0.5)   # smaller than the field
    assert inst.shape == (10, 7)
    inst, cells = seg.segment_tile(np.full((1, 1, 3), 255, np.uint8), 0.25)
    assert inst.shape == (1, 1) and len(cells) == 0


@pytest.mark.parametrize("bad", [np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.uint16),
                                 np.zeros((64, 64, 3), np.float64), np.zeros((64, 64, 5), np.uint8), "tile"])
def test_bad_input(seg, bad):
    with pytest.raises(ModelInputError):
        seg.segment_tile(bad, 0.5)


def test_far_mpp_warns_and_still_works(seg, demo_region):
    rgb, mpp = demo_region
    with pytest.warns(MppWarning):
        inst, cells = seg.segment_tile(rgb[:128, :128], 2.0)
    assert inst.shape == (128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MppWarning)
        seg.segment_tile(rgb[:64, :64], 0.3)   # within 2x: no warning


def test_missing_and_tampered_weights(tmp_path):
    with pytest.raises(WeightsNotFoundError):
        load_segmenter(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(WEIGHTS.read_bytes()[:-8] + b"\0" * 8)
    bad.with_suffix(".json").write_text(WEIGHTS.with_suffix(".json").read_text())
    with pytest.raises(WeightsIntegrityError):
        load_segmenter(str(bad))


def test_seams_tiled_equals_one_pass(seg, demo_region):
    rgb, mpp = demo_region
    slide = ArraySlide(rgb, mpp)
    one = seg.segment_slide(slide, tile_px=608, overlap_px=96, device="cpu")   # the 400 px region in one tile
    progress = []
    tiled = seg.segment_slide(slide, tile_px=448, overlap_px=96, batch_size=4,
                              progress=lambda f, m: progress.append(f), device="cpu")
    assert progress and progress[-1] == 1.0 and all(0 <= f <= 1 for f in progress)
    assert len(one) > 20
    assert abs(len(tiled) - len(one)) <= 0.01 * len(one)
    assert tiled["cell_id"].is_unique
    xy = tiled[["x_um", "y_um"]].to_numpy()
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 2.0
    # the same nuclei: almost every one-pass centroid has a tiled one within 2 µm
    o = one[["x_um", "y_um"]].to_numpy()
    dd = np.hypot(o[:, None, 0] - xy[None, :, 0], o[:, None, 1] - xy[None, :, 1]).min(axis=1)
    assert (dd < 2.0).mean() > 0.95


def test_cpu_batch_size_changes_speed_not_nuclei(seg, demo_region):
    """The CPU runs one tile per forward pass (faster there: bench/segmentation.py); a batch of 8,
    the GPU's size, must give the same nuclei."""
    rgb, mpp = demo_region
    slide = ArraySlide(rgb, mpp)
    assert seg.batch_size == (8 if seg.device.type == "cuda" else 1)
    default = seg.segment_slide(slide, tile_px=448, overlap_px=96)
    eight = seg.segment_slide(slide, tile_px=448, overlap_px=96, batch_size=8)
    assert len(default) > 20 and len(default) == len(eight)
    a, b = default[["x_um", "y_um"]].to_numpy(), eight[["x_um", "y_um"]].to_numpy()
    nearest = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1]).min(axis=1)
    assert (nearest < 0.5).mean() >= 0.99
    assert (default["type"].to_numpy() == eight["type"].to_numpy()).mean() >= 0.99


def test_test_time_augmentation_maps_each_view_back(seg, demo_region):
    """Two copies = the mean of the plain maps and of the left-right mirrored tile's maps mirrored
    back, with the horizontal HV channel negated (done here by hand in numpy); a transposed view
    comes back with H and V swapped; segment_tile keeps one pass unless asked (validation chose 1)."""
    rgb, _ = demo_region
    tile = np.ascontiguousarray(rgb[:160, :192, :3])
    n1, h1, t1 = seg.predict_batch(tile[None])
    nm, hm, tm = seg.predict_batch(np.ascontiguousarray(tile[:, ::-1])[None])
    hm_back = hm[:, :, :, ::-1] * np.array([-1.0, 1.0], np.float32)[None, :, None, None]
    n2, h2, t2 = seg.predict_batch(tile[None], tta=2)
    assert np.allclose(n2, (n1 + nm[:, :, ::-1]) / 2, atol=1e-5)
    inside = (np.abs(h1) < 1) & (np.abs(hm_back) < 1)  # each pass is clamped to -1..1 after, not before, the mean
    assert inside.mean() > 0.9 and np.allclose(h2[inside], ((h1 + hm_back) / 2)[inside], atol=1e-5)
    assert np.allclose(t2, (t1 + tm[:, :, :, ::-1]) / 2, atol=1e-5)
    # the transposed view by hand: maps of tile.T, transposed back, H and V swapped
    from ghist_core.segmentation.model import TTA_VIEWS, _unview_maps

    import torch

    assert TTA_VIEWS[4] == (True, False, False)
    nt, ht, tt = seg.predict_batch(np.ascontiguousarray(tile.transpose(1, 0, 2))[None])
    back = _unview_maps(torch.from_numpy(nt)[:, None], torch.from_numpy(ht), torch.from_numpy(tt), TTA_VIEWS[4])
    assert np.allclose(back[0][:, 0].numpy(), nt.transpose(0, 2, 1))
    assert np.allclose(back[1].numpy(), ht[:, ::-1].transpose(0, 1, 3, 2))
    assert seg.tta == 1
    with pytest.raises(ModelInputError):
        seg.predict_batch(tile[None], tta=3)


def test_a_cards_postprocess_holds_every_setting_but_the_merge():
    """One list says what a card's ``postprocess`` holds: every watershed and type setting, never the
    merge (its own ``type_merge`` record carries it, with its reason); both directions use it."""
    import dataclasses

    from ghist_core.segmentation.postprocess import PostProcessConfig

    names = {f.name for f in dataclasses.fields(PostProcessConfig)}
    assert set(PostProcessConfig.CARD_FIELDS) == names - {"type_merge"}
    post = PostProcessConfig(np_threshold=0.6, type_merge={"other": "epithelial"})
    assert set(post.to_dict()) == set(PostProcessConfig.CARD_FIELDS)
    back = PostProcessConfig.from_card({**post.to_dict(), "type_merge": {"other": "spindle-shaped"}})
    assert back.np_threshold == 0.6 and back.type_merge is None
