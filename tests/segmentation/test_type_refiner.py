"""The nucleus-level type refiner (docs/DECISIONS.md, session 14): its features are the nuclei's own
(stain, shape, neighbours), its numbers live in the card, and it changes the ``type`` label only."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ghist_core.io.slide import open_slide
from ghist_core.segmentation import ArraySlide, load_segmenter
from ghist_core.segmentation.features import measure_instances
from ghist_core.segmentation.type_refiner import (NEIGHBOUR_RADIUS_UM, TypeRefiner, feature_names,
                                                  nucleus_type_features)

TYPES = ("other", "inflammatory", "epithelial", "spindle-shaped")


def _constant_refiner(type_id: int) -> TypeRefiner:
    """A refiner that calls every nucleus ``type_id`` (all weights 0, that class's intercept 1)."""
    f = len(feature_names(TYPES))
    return TypeRefiner(list(TYPES), feature_names(TYPES), [0.0] * f, [1.0] * f, [[0.0] * f for _ in TYPES],
                       [1.0 if k + 1 == type_id else 0.0 for k in range(len(TYPES))], [1, 2, 3, 4])


def test_features_are_each_nucleus_own_stain_shape_and_neighbours():
    """Three square nuclei: two close (neighbours of each other), one far; one painted red. The
    stain means are the nucleus' own pixels, the neighbour count follows the 25 µm radius."""
    inst = np.zeros((200, 200), np.int32)
    inst[10:20, 10:20], inst[10:20, 30:40], inst[150:160, 150:160] = 1, 2, 3
    rgb = np.full((200, 200, 3), 200, np.uint8)
    rgb[10:20, 10:20] = (255, 0, 0)
    probs = np.zeros((5, 200, 200), np.float32)
    probs[3] = 1.0  # epithelial everywhere
    cells = measure_instances(inst, 0.5, type_probs=probs, type_names=TYPES)
    x = nucleus_type_features(rgb, inst, cells, 0.5, TYPES)
    names = feature_names(TYPES)
    assert x.shape == (3, len(names)) and np.isfinite(x).all()
    col = {n: x[:, names.index(n)] for n in names}
    assert col["mean_r"][0] == pytest.approx(1.0) and col["mean_g"][0] == pytest.approx(0.0)
    assert col["mean_r"][2] == pytest.approx(200 / 255) and col["sd_r"][2] == pytest.approx(0.0, abs=1e-6)
    assert 20 * 0.5 <= NEIGHBOUR_RADIUS_UM  # the two close squares are 10 µm apart, the far one ~95 µm
    assert list(col["neighbours"]) == [1.0, 1.0, 0.0]
    assert col["neighbour_prob_epithelial"][0] == pytest.approx(1.0) and col["neighbour_prob_epithelial"][2] == 0.0
    assert nucleus_type_features(rgb, inst, cells.iloc[:0], 0.5, TYPES).shape == (0, len(names))


def test_predict_and_card_checks():
    r = _constant_refiner(3)
    x = np.random.default_rng(0).normal(size=(5, len(feature_names(TYPES))))
    assert list(r.predict(x)) == [3] * 5 and r.predict(x[:0]).shape == (0,)
    back = TypeRefiner.from_dict({**r.to_dict(), "what": "extra keys are provenance"}, TYPES)
    assert back == r
    bad_shape = {**r.to_dict(), "coef": [[0.0] * 3] * 4}
    with pytest.raises(ValueError, match="do not fit"):
        TypeRefiner.from_dict(bad_shape, TYPES)
    with pytest.raises(ValueError, match="not this segmenter's"):
        TypeRefiner.from_dict(r.to_dict(), ("a", "b", "c", "d"))
    with pytest.raises(ValueError):
        TypeRefiner.from_dict({**r.to_dict(), "scale": [0.0] * len(r.scale)}, TYPES)
    with pytest.raises(ValueError, match="not its types'"):
        TypeRefiner.from_dict({**r.to_dict(), "feature_names": ["no_such"] + r.feature_names[1:]}, TYPES)


def test_a_refiner_on_a_subset_reads_only_its_columns():
    """A refiner without the stain features: changing a nucleus' colour columns cannot move its type."""
    from ghist_core.segmentation.type_refiner import STAIN_FEATURES

    names = [n for n in feature_names(TYPES) if n not in STAIN_FEATURES]
    rng = np.random.default_rng(1)
    r = TypeRefiner(list(TYPES), names, [0.0] * len(names), [1.0] * len(names),
                    rng.normal(size=(4, len(names))).tolist(), [0.0] * 4, [1, 2, 3, 4])
    x = rng.normal(size=(50, len(feature_names(TYPES))))
    y = x.copy()
    y[:, [feature_names(TYPES).index(n) for n in STAIN_FEATURES]] = rng.normal(size=(50, 6)) * 10
    assert (r.predict(x) == r.predict(y)).all() and len(set(r.predict(x))) > 1


@pytest.fixture(scope="module")
def tissue(demo_slide):
    with open_slide(demo_slide) as s:
        return np.ascontiguousarray(s.read_region((900, 1300), 0, (400, 400))[..., :3]), s.mpp


def test_the_refiner_sets_the_type_label_only_on_both_paths(tissue):
    """A refiner that calls every nucleus "inflammatory": ``type`` says so on segment_tile and
    segment_slide, while the nuclei and the network's ``prob_<type>`` columns (which the expression
    model reads) are exactly as without it. The card's merge applies to a refiner's calls too."""
    rgb, mpp = tissue
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    refined = copy.copy(seg)
    refined.type_refiner = _constant_refiner(2)
    probs = [f"prob_{t}" for t in TYPES]
    for run in (lambda s: s.segment_tile(rgb, mpp, nucleus_scale=1.0)[1],
                lambda s: s.segment_slide(ArraySlide(rgb, mpp), nucleus_scale=1.0)):
        plain, other = run(seg), run(refined)
        assert len(plain) == len(other) > 50
        assert (other["type"] == "inflammatory").all() and (plain["type"] != "inflammatory").mean() > 0.5
        assert np.allclose(plain[probs + ["area_um2", "x_um"]].to_numpy(), other[probs + ["area_um2", "x_um"]].to_numpy())
    refined.type_refiner = _constant_refiner(1)  # "other", which the card merges into "epithelial"
    assert (refined.segment_tile(rgb, mpp, nucleus_scale=1.0)[1]["type"] == "epithelial").all()
    assert (refined.segment_slide(ArraySlide(rgb, mpp), nucleus_scale=1.0)["type"] == "epithelial").all()


def test_a_coarser_input_takes_the_refiners_types_too(tissue):
    """Input coarser than the model (1 µm/px): types come from the working map, refined there."""
    rgb, mpp = tissue
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    refined = copy.copy(seg)
    refined.type_refiner = _constant_refiner(4)
    from ghist_core.segmentation.tiling import resample_rgb

    small = resample_rgb(rgb, (200, 200))
    _, cells = refined.segment_tile(small, mpp * 2, nucleus_scale=1.0)
    assert len(cells) and (cells["type"] == "spindle-shaped").all()
    refined.type_refiner = _constant_refiner(1)  # "other": merged there as on the input's own scale
    _, cells = refined.segment_tile(small, mpp * 2, nucleus_scale=1.0)
    assert len(cells) and (cells["type"] == "epithelial").all()

