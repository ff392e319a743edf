"""Merging a remainder class into a lineage for the nucleus ``type`` (CoNSeP's "other":
docs/DECISIONS.md, session 17): the merged type is never called, its probability joins its
target's, the probability columns stay, and a card naming a type that does not exist is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ghist_core.segmentation.features import (check_type_merge, decide_types, measure_instances, merge_type_names,
                                              merged_type_ids)

NAMES = ("other", "inflammatory", "epithelial", "spindle-shaped")


def test_merged_type_is_never_chosen_and_its_probability_joins_the_target():
    probs = np.array([[0.70, 0.10, 0.10, 0.10],   # "other" alone: goes to its target
                      [0.30, 0.35, 0.20, 0.15],   # inflammatory wins unmerged, other + epithelial win merged
                      [0.05, 0.10, 0.05, 0.80]])  # untouched
    assert [NAMES[i] for i in decide_types(probs, NAMES)] == ["other", "inflammatory", "spindle-shaped"]
    merged = [NAMES[i] for i in decide_types(probs, NAMES, merge={"other": "epithelial"})]
    assert merged == ["epithelial", "epithelial", "spindle-shaped"]
    # weights act before the merge: "other" down-weighted adds little to epithelial, so row 2 stays
    # inflammatory (weighting after the merge would have left 0.50 against 0.35)
    light = decide_types(probs, NAMES, weights=(0.1, 1, 1, 1), merge={"other": "epithelial"})
    assert [NAMES[i] for i in light] == ["epithelial", "inflammatory", "spindle-shaped"]
    assert decide_types(np.zeros((0, 4)), NAMES, merge={"other": "epithelial"}).shape == (0,)


def test_truth_ids_and_labels_merge_like_the_decision():
    assert merged_type_ids(NAMES, {"other": "spindle-shaped"}).tolist() == [0, 4, 2, 3, 4]
    assert merged_type_ids(NAMES, None).tolist() == [0, 1, 2, 3, 4]
    assert merge_type_names(["other", "epithelial"], {"other": "inflammatory"}).tolist() == ["inflammatory", "epithelial"]


@pytest.mark.parametrize("merge", [{"misc": "epithelial"}, {"other": "tumour"}, {"other": "other"},
                                   {"other": "epithelial", "epithelial": "spindle-shaped"}, ["other", "epithelial"]])
def test_a_merge_that_does_not_fit_the_types_is_refused(merge):
    with pytest.raises(ValueError, match="type_merge"):
        check_type_merge(merge, NAMES)


def test_measure_instances_keeps_the_probability_columns():
    inst = np.zeros((8, 8), np.int32)
    inst[2:5, 2:5] = 1
    tp = np.zeros((5, 8, 8), np.float32)
    tp[1], tp[3] = 0.6, 0.4  # "other" 0.6, "epithelial" 0.4
    cells = measure_instances(inst, 0.5, type_probs=tp, type_names=NAMES, type_merge={"other": "spindle-shaped"})
    assert cells["type"].tolist() == ["spindle-shaped"]  # 0.6 + 0 beats epithelial's 0.4
    assert cells["prob_other"].tolist() == pytest.approx([0.6]) and cells["prob_epithelial"].tolist() == pytest.approx([0.4])


def test_bundled_cards_merge_other_and_record_why():
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.segmentation import load_segmenter

    for name in ("nuclei-seg", "nuclei-seg-stain"):
        card = json.loads((BUNDLED_WEIGHTS_DIR / f"{name}.json").read_text())
        record = card["type_merge"]
        assert set(record["merge"]) == {"other"} and record["merge"]["other"] in NAMES[1:]
        assert "remainder" in record["reason"] and record["rule"].startswith("docs/DECISIONS.md, session 17")
        assert load_segmenter(name, device="cpu").post.type_merge == record["merge"]


def test_a_sealed_card_with_a_bad_merge_does_not_load(tmp_path):
    """A card sealed with a merge naming no type of the network: a typed error, not a crash later."""
    import shutil

    from ghist_core.errors import WeightsFormatError
    from ghist_core.io.hashing import sha256_file
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.segmentation import load_segmenter
    from ghist_core.weights.card import seal_card

    src = BUNDLED_WEIGHTS_DIR / "nuclei-seg-stain.safetensors"
    w = tmp_path / "bad-merge.safetensors"
    shutil.copyfile(src, w)
    card = json.loads(src.with_suffix(".json").read_text())
    card["name"] = "bad-merge"
    card["type_merge"] = {**card["type_merge"], "merge": {"other": "tumour"}}
    w.with_suffix(".json").write_text(json.dumps(seal_card(card, sha256_file(w))))
    with pytest.raises(WeightsFormatError, match="type_merge"):
        load_segmenter(str(w), device="cpu")


def test_the_benchmark_scores_the_merged_type_column_against_the_merged_truth(demo_slide):
    """Truth = the model's own nuclei, every one labelled "other": the four-class F1 of the network's
    decision stays as HoVer-Net scores it, and the merged F1 of "epithelial" (which "other" joins)
    is exactly the share of nuclei the ``type`` column calls epithelial (no other class has truth)."""
    from ghist_core.io.slide import open_slide
    from ghist_core.segmentation import load_segmenter
    from ghist_core.training.segmentation_data import NucleiSample
    from testkit import load_repo_script

    bench = load_repo_script("bench/segmentation.py")
    with open_slide(demo_slide) as s:
        rgb = np.ascontiguousarray(s.read_region((900, 1300), 0, (256, 256))[..., :3])
    seg = load_segmenter("nuclei-seg-stain", device="cpu")
    seg.nucleus_scale = 1.0
    inst, cells = seg.segment_tile(rgb, 0.25)
    types = np.ones(int(inst.max()) + 1, int)
    types[0] = 0
    res = bench.evaluate(seg, [NucleiSample("demo_000", "consep", "demo", rgb, inst, types)])
    assert res["f_d"] == 1.0 and res["type_merge"] == {"other": "epithelial"}
    assert set(res["per_type_f1_merged"]) == {"inflammatory", "epithelial", "spindle-shaped"}
    share = float((cells["type"] == "epithelial").mean())
    assert 0.0 < share < 1.0
    assert res["per_type_f1_merged"]["epithelial"] == pytest.approx(share, abs=1e-4)
    assert res["per_type_f1"]["other"] < res["per_type_f1_merged"]["epithelial"]
