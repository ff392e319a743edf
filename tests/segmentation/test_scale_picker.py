"""The learned scale-check decision (``ScalePicker``, docs/DECISIONS.md session 18): its trees
predict exactly what scikit-learn's did, a bad record is refused, and a segmenter with one
segments each tile at the reading it picks, in ``segment_tile`` and ``segment_slide`` alike."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from ghist_core.errors import WeightsFormatError
from ghist_core.io.slide import open_slide
from ghist_core.segmentation import ArraySlide, load_segmenter
from ghist_core.segmentation.model import SCALE_FACTORS
from ghist_core.segmentation.scale_picker import (FEATURES, ScalePicker, Tree, picker_features,
                                                  reading_stats)

F = min(SCALE_FACTORS)


def _constant(gain: float, margin: float = 0.0) -> ScalePicker:
    """A picker whose prediction is ``gain`` for every tile (one leaf)."""
    return ScalePicker(F, margin, 0.0, 1.0, (Tree((-2,), (-2.0,), (-1,), (-1,), (gain,)),))


@pytest.fixture(scope="module")
def fitted():
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(FEATURES)))
    y = np.sin(2 * x[:, 2]) + 0.5 * (x[:, 5] > 0.3) + 0.05 * rng.normal(size=len(x))
    return x, [GradientBoostingRegressor(n_estimators=60, max_depth=2, learning_rate=0.05, subsample=0.8,
                                         random_state=0).fit(x, y),
               DecisionTreeRegressor(max_depth=4, min_samples_leaf=10, random_state=0).fit(x, y)]


def test_the_card_record_predicts_what_scikit_learn_did(fitted):
    x, models = fitted
    for model in models:
        picker = ScalePicker.from_dict(json.loads(json.dumps(ScalePicker.from_sklearn(model, F, 0.01).to_dict())))
        np.testing.assert_allclose(picker.predict_gain(x), model.predict(x), rtol=0, atol=1e-12)
        gains = model.predict(x[:20])
        assert [picker.moves(row[None]) for row in x[:20]] == list(gains > 0.01)


@pytest.mark.parametrize("spoil, word", [
    (lambda d: d.update(features=list(FEATURES)[:-1]), "features"),
    (lambda d: d["trees"][0]["left"].__setitem__(0, 999), "outside"),
    (lambda d: d["trees"][0]["value"].__setitem__(0, float("nan")), "non-finite"),
    (lambda d: d["trees"][0]["threshold"].pop(), "length"),
    (lambda d: d.update(factor=1.5), "factor"),
    (lambda d: d["trees"][0]["feature"].__setitem__(0, 0.5), "whole numbers"),
    (lambda d: d["trees"][0]["left"].__setitem__(0, 0), "loops"),
    (lambda d: d.update(trees=[]), "non-empty"),
    (lambda d: d["trees"][0].pop("value"), "incomplete"),
    (lambda d: d["trees"][0]["feature"].__setitem__(-1, 2 ** 70), "out of range"),
    (lambda d: d["trees"][0].update(threshold="123"), "numbers"),
])
def test_a_bad_record_is_refused(fitted, spoil, word):
    d = ScalePicker.from_sklearn(fitted[1][1], F, 0.01).to_dict()
    spoil(d)
    with pytest.raises(ValueError, match=word if word != "length" else "differ in length"):
        ScalePicker.from_dict(d)


def test_a_feature_on_a_threshold_goes_where_scikit_learn_sends_it():
    """scikit-learn compares float32 inputs: a value a hair above a threshold that rounds onto it in
    float32 goes left there, and must here too."""
    from sklearn.tree import DecisionTreeRegressor

    x = np.zeros((2, len(FEATURES)))
    x[1, 0] = 1.0
    model = DecisionTreeRegressor(max_depth=1).fit(x, [0.0, 1.0])
    probe = np.zeros((1, len(FEATURES)))
    probe[0, 0] = float(model.tree_.threshold[0]) + 1e-10
    assert ScalePicker.from_sklearn(model, F, 0.0).predict_gain(probe)[0] == model.predict(probe)[0] == 0.0


@pytest.mark.parametrize("record", [[], 0, "x", {"features": list(FEATURES), "trees": [[1, 2]]}])
def test_a_record_of_another_shape_is_refused(record):
    with pytest.raises(ValueError, match="scale_picker"):
        ScalePicker.from_dict(record)


def test_glass_and_white_padding_do_not_dilute_the_density(region, seg):
    """The same tissue with half a tile of white beside it (an edge tile's padding, a block at the
    tissue's edge) gives the picker the same row."""
    from ghist_core.segmentation.scale_picker import scale_picker_features

    rgb, mpp = region
    tissue = rgb[:, :150]
    padded = np.concatenate([tissue, np.full_like(tissue, 255)], axis=1)
    _, cells = seg.segment_tile(tissue, mpp, nucleus_scale=1.0)
    np_map = np.ones(tissue.shape[:2], np.float32)
    rows = [scale_picker_features(im, mpp, seg.mpp, ((np_map, cells), (np_map, cells))) for im in (tissue, padded)]
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-12)


class _Recording(ScalePicker):
    """A picker that never moves and keeps the rows it was asked about."""

    def moves(self, x):
        self.provenance.setdefault("rows", []).append(np.asarray(x)[0].tolist())
        return False


def test_the_choice_job_and_segment_tile_give_the_picker_the_same_row(seg, region):
    """What the picker was chosen on (scripts/choose_on_validation.py picker_rows) is what it reads
    at run time: same readings, same units, same tissue area."""
    from ghist_core.training.segmentation_data import DATA_MPP, NucleiSample
    from testkit import load_repo_script

    choose = load_repo_script("scripts/choose_on_validation.py")
    rgb, _ = region
    sample = NucleiSample("train_1_000", "consep", "train_1", rgb, np.zeros(rgb.shape[:2], np.int32), None)
    job = choose.picker_rows(seg, [sample], 1.0, "original")[0]["x"]
    recording = _Recording(F, 0.0, 0.0, 1.0, _constant(0.0).trees, provenance={})
    picked = copy.copy(seg)
    picked.scale_picker = recording
    picked.segment_tile(rgb, DATA_MPP)
    np.testing.assert_allclose(recording.provenance["rows"][0], job, rtol=1e-9)


def test_density_and_median_area_do_not_depend_on_the_tile_size():
    areas = np.array([20.0, 25.0, 30.0, 40.0])
    small = reading_stats(0.8, areas, 0.5, 1e4)
    large = reading_stats(0.8, np.tile(areas, 4), 0.5, 4e4)  # the same tissue, a tile twice the side
    assert small == large and small.median_area_px == pytest.approx(27.5 / 0.25) and small.density == 4.0
    x = picker_features(small, reading_stats(0.9, areas * 2, 0.5, 1e4))
    assert x.shape == (1, len(FEATURES)) and x[0, FEATURES.index("d_log_density")] == 0.0
    assert x[0, FEATURES.index("d_cert")] == pytest.approx(0.1)
    empty = reading_stats(0.0, np.zeros(0), 0.5, 1e4)
    assert empty.median_area_px == 0.0 and empty.density == 0.0


@pytest.fixture(scope="module")
def seg():
    return load_segmenter("nuclei-seg-stain", device="cpu")


@pytest.fixture(scope="module")
def region(demo_slide):
    with open_slide(demo_slide) as s:
        return np.ascontiguousarray(s.read_region((900, 1300), 0, (300, 300))[..., :3]), s.mpp


def test_segment_tile_takes_the_reading_the_picker_picks(seg, region):
    rgb, mpp = region
    for gain, factor in ((1.0, F), (-1.0, 1.0)):
        picked = copy.copy(seg)
        picked.scale_picker = _constant(gain)
        inst, cells = picked.segment_tile(rgb, mpp)
        ref_inst, ref_cells = seg.segment_tile(rgb, mpp, nucleus_scale=factor)
        assert cells.attrs["nucleus_scale"] == factor
        assert np.array_equal(inst, ref_inst) and len(cells) == len(ref_cells)
    fixed = copy.copy(seg)
    fixed.scale_picker = _constant(1.0)
    _, cells = fixed.segment_tile(rgb, mpp, nucleus_scale=1.0)  # a fixed factor is not checked
    assert cells.attrs["nucleus_scale"] == 1.0


def test_segment_slide_takes_the_reading_the_picker_picks_per_tile(seg, region):
    rgb, mpp = region
    slide = ArraySlide(np.concatenate([rgb, rgb], axis=1), mpp)
    for gain, factor in ((1.0, F), (-1.0, 1.0)):
        picked = copy.copy(seg)
        picked.scale_picker = _constant(gain)
        cells = picked.segment_slide(slide, tile_px=256, overlap_px=32)
        ref = seg.segment_slide(slide, tile_px=256, overlap_px=32, nucleus_scale=factor)
        assert len(cells) and np.allclose(cells["nucleus_scale"].to_numpy(np.float64), factor, atol=1e-6)
        assert len(cells) == len(ref)


def test_a_sealed_card_with_a_bad_picker_does_not_load(tmp_path, fitted):
    from ghist_core.io.hashing import sha256_file
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.weights.card import seal_card

    src = BUNDLED_WEIGHTS_DIR / "nuclei-seg-stain.safetensors"
    for name, spoil in (("good-picker", lambda d: None), ("bad-picker", lambda d: d.update(factor=2.0))):
        w = tmp_path / f"{name}.safetensors"
        shutil.copyfile(src, w)
        card = json.loads(src.with_suffix(".json").read_text())
        record = ScalePicker.from_sklearn(fitted[1][1], F, 0.02).to_dict()
        spoil(record)
        card.update(name=name, scale_picker=record)
        w.with_suffix(".json").write_text(json.dumps(seal_card(card, sha256_file(w))))
    assert load_segmenter(str(tmp_path / "good-picker.safetensors"), device="cpu").scale_picker.margin == 0.02
    with pytest.raises(WeightsFormatError, match="scale_picker"):
        load_segmenter(str(tmp_path / "bad-picker.safetensors"), device="cpu")


def test_the_rule_picks_the_best_guarded_candidate_and_the_simplest_in_a_tie():
    """scripts/choose_on_validation.py scale-picker: the guard (x1 and x0.67 within -0.005 of factor 1)
    first, then the best cross-validated AJI, ties within 0.001 to fewer trees, shallower, larger margin;
    None when no candidate keeps the guard (the hand rule stays)."""
    from testkit import load_repo_script

    choose = load_repo_script("scripts/choose_on_validation.py")

    def row(trees, depth, margin, aji, guard):
        return {"trees": trees, "depth": depth, "margin": margin, "cv": {"mean_aji": aji, "worst_change_x1_x067": guard}}

    table = [row(200, 2, 0.0, 0.400, -0.010),   # best, but breaks the guard
             row(100, 2, 0.0, 0.380, -0.001),
             row(1, 4, 0.0, 0.3795, 0.0),       # within 0.001: fewer trees wins
             row(1, 4, 0.02, 0.3792, 0.0),      # ... and then the larger margin
             row(1, 2, 0.0, 0.370, 0.0)]
    assert choose.pick_picker(table) is table[3]
    assert choose.pick_picker([table[0]]) is None
