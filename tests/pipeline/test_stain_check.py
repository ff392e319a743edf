"""The stain check (ghist_core.pipeline.stain_check): a slide's stain against the range the nucleus
segmenter was trained and tested on. Real images: the demo slide, its tissue re-stained beyond the
bank's envelope; a real run records it, the CLI and Gene maps say it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ghist_core import _keys as K
from ghist_core.imaging.stain import macenko_restain, macenko_stains
from ghist_core.io.slide import open_slide
from ghist_core.pipeline.blocks import PipelineConfig, plan_blocks
from ghist_core.pipeline.stain_check import (AMOUNT_SLACK, ANGLE_SLACK_DEG, SAMPLE_PATCHES, StainEstimateError,
                                             StainRange, beyond_range_stains, check_stain, stain_check_record,
                                             stain_patches)
from ghist_core.training.stain_bank import load_stain_bank, stain_angle_deg


@pytest.fixture(scope="module")
def demo_patches(demo_slide):
    with open_slide(demo_slide) as s:
        return stain_patches(s, plan_blocks(s, PipelineConfig()))


def _turned(vector: np.ndarray, towards: np.ndarray, deg: float) -> np.ndarray:
    """``vector`` turned by ``deg`` degrees in the plane it spans with ``towards`` (unit, positive OD)."""
    v = vector / np.linalg.norm(vector)
    d = towards - (towards @ v) * v
    d /= np.linalg.norm(d)
    out = np.cos(np.radians(deg)) * v + np.sin(np.radians(deg)) * d
    assert (out > 0).all()
    return out / np.linalg.norm(out)


def test_every_stain_the_envelope_was_made_from_is_inside_it():
    bank = load_stain_bank()
    rng = StainRange.from_bank(bank)
    ref = bank.reference
    for role in ("train", "benchmark"):
        for m in bank.select(role):
            angle = stain_angle_deg(m.matrix, ref.matrix)
            amount = m.max_c / ref.max_c
            assert (angle <= np.array(rng.max_angle_deg) + 0.05).all(), m.name
            assert (np.array(rng.amount_low) - 0.005 <= amount).all() and (amount <= np.array(rng.amount_high) + 0.005).all()
    assert max(rng.max_angle_deg) > 15 and rng.amount_low[0] < 0.6 and rng.amount_high[1] > 2  # it is not a point


def test_the_benchmarks_beyond_range_stains_are_outside_the_envelope_in_one_way_each():
    """Each of them differs from the training reference in one stain and one property (angle or amount),
    by more than the check's slack; the same seed gives the same stains (both benchmarks score them)."""
    bank = load_stain_bank()
    env, ref = StainRange.from_bank(bank), bank.reference
    stains = beyond_range_stains(bank)
    assert len(stains) == 8 and len({m.name for m in stains}) == 8
    for m in stains:
        i = 0 if m.name.startswith("haematoxylin") else 1
        angle, amount = stain_angle_deg(m.matrix, ref.matrix), m.max_c / ref.max_c
        assert angle[1 - i] < 1e-3 and abs(amount[1 - i] - 1) < 1e-9, m.name  # the other stain untouched
        if "deg" in m.name:
            assert angle[i] > env.max_angle_deg[i] + ANGLE_SLACK_DEG + 4, m.name
            assert (m.matrix > 0).all() and np.allclose(np.linalg.norm(m.matrix, axis=1), 1)
        else:
            assert amount[i] < env.amount_low[i] / AMOUNT_SLACK or amount[i] > env.amount_high[i] * AMOUNT_SLACK, m.name
    again = beyond_range_stains(bank)
    assert all(np.array_equal(a.matrix, b.matrix) for a, b in zip(stains, again))


def test_patches_are_few_and_bounded_whatever_the_slide(demo_slide, demo_patches):
    assert 1 <= len(demo_patches) <= SAMPLE_PATCHES
    assert all(p.shape == (256, 256, 3) and p.dtype == np.uint8 for p in demo_patches)
    with open_slide(demo_slide) as s:
        blocks = plan_blocks(s, PipelineConfig())
        many = stain_patches(s, blocks * 50)  # 50x the blocks: still at most SAMPLE_PATCHES reads
        assert len(many) == SAMPLE_PATCHES and stain_patches(s, []) == []


def test_the_demo_slide_is_inside_and_says_nothing(demo_patches):
    check = check_stain(demo_patches)
    assert check.within_tested_range and check.note() is None and check.outside == []
    record = stain_check_record(demo_patches)
    assert record["within_tested_range"] is True and record["note"] == ""
    json.dumps(record)  # JSON types only (it goes into uns and the CLI line)


def test_a_stain_turned_beyond_the_envelope_is_flagged(demo_patches):
    """The demo tissue re-stained with its haematoxylin turned 10° past the widest tested angle (and slack):
    the check says which colour is how far off; the amounts alone (x4 eosin) are flagged too."""
    bank = load_stain_bank()
    rng = StainRange.from_bank(bank)
    ref = bank.reference
    source = macenko_stains(demo_patches)
    h = _turned(ref.matrix[0], ref.matrix[1] * 0.2 + np.array([0.0, 0.0, 1.0]),
                rng.max_angle_deg[0] + ANGLE_SLACK_DEG + 10)
    target = np.stack([h, ref.matrix[1]])
    turned = [macenko_restain(p, target, ref.max_c, source=source) for p in demo_patches]
    check = check_stain(turned)
    assert not check.within_tested_range
    # which stain the estimate names may swap this far out (Macenko calls the redder-absorbing vector H)
    assert any(r.startswith("its ") and "colour is" in r and "tested up to" in r for r in check.outside)
    note = check.note()
    assert "outside the range the nucleus segmenter was trained and tested on" in note and "before relying" in note

    heavy = [macenko_restain(p, ref.matrix, ref.max_c * np.array([1.0, 4.0]), source=source) for p in demo_patches]
    check = check_stain(heavy)
    assert not check.within_tested_range and any("its eosin is" in r and "strength" in r for r in check.outside)


def test_a_greyscale_image_is_flagged_as_perhaps_not_h_and_e(demo_patches):
    """Each stain vector of a greyscale export may sit inside the angle envelope, but the two coincide."""
    grey = [np.repeat(p.mean(axis=2, keepdims=True), 3, axis=2).round().astype(np.uint8) for p in demo_patches]
    check = check_stain(grey)
    assert check.separation_deg < 1 and not check.within_tested_range
    assert any("as in a grey or single-stain image" in r for r in check.outside)
    assert "?." not in (check.note() or "")
    assert check_stain(demo_patches).separation_deg > StainRange.from_bank().min_separation_deg


def test_blank_input_is_a_typed_error_and_an_unavailable_record():
    white = [np.full((64, 64, 3), 255, np.uint8)]
    with pytest.raises(StainEstimateError, match="could not be estimated"):
        check_stain(white)
    record = stain_check_record(white)
    assert "unavailable" in record and record["note"] == "" and "within_tested_range" not in record


def test_a_run_records_it_and_the_cli_says_it(tmp_path, small_slide_png, capsys):
    """``ghist predict`` with the learned segmenter: the demo crop as it is (inside: true, no note), and
    re-stained beyond the envelope (false, and the note on stderr); the merged result carries it."""
    import anndata as ad
    from PIL import Image

    from ghist_core.cli import EXIT_OK, main
    from testkit import make_tiny_ghist

    model = tmp_path / "typed_model"
    make_tiny_ghist(model, cell_inputs=("prob_other", "prob_inflammatory", "prob_epithelial", "prob_spindle-shaped"),
                    tissue_skip=True)
    rgb = np.asarray(Image.open(small_slide_png).convert("RGB"))
    ref = load_stain_bank().reference
    h = _turned(ref.matrix[0], ref.matrix[1] * 0.2 + np.array([0.0, 0.0, 1.0]), 40.0)
    odd = tmp_path / "odd_stain.png"
    Image.fromarray(macenko_restain(rgb, np.stack([h, ref.matrix[1]]), ref.max_c)).save(odd)
    lines = {}
    for name, path in (("as_is", small_slide_png), ("odd", odd)):
        argv = ["predict", str(path), "--project", str(tmp_path / "proj"), "--mpp", "0.499", "--model", str(model),
                "--device", "cpu"]
        assert main(argv) == EXIT_OK
        out, err = capsys.readouterr()
        lines[name] = (json.loads(out.strip().splitlines()[-1]), err)
        assert "Traceback" not in err
    line, err = lines["as_is"]
    assert line["stain_within_tested_range"] is True and "stain" not in err
    line, err = lines["odd"]
    assert line["stain_within_tested_range"] is False
    assert f"note: slide {line['slide_id']}: This slide's stain lies outside" in err and "colour is" in err
    record = ad.read_h5ad(line["h5ad"]).uns["ghist"][K.GHIST_STAIN_CHECK]
    assert not record["within_tested_range"] and max(record["angle_deg"].values()) > 28


def test_the_slide_record_never_fails_a_run(demo_slide):
    """No tissue blocks, or a slide that cannot be read at that point: the record says why, no exception."""
    from ghist_core.pipeline.stain_check import slide_stain_record

    with open_slide(demo_slide) as s:
        blocks = plan_blocks(s, PipelineConfig())
        assert "unavailable" in slide_stain_record(s, [])

        class Broken:
            dimensions, mpp = s.dimensions, s.mpp

            def read_region_mpp(self, *a, **k):
                raise OSError("disk gone")

        record = slide_stain_record(Broken(), blocks)
        assert record["note"] == "" and "disk gone" in record["unavailable"]
        assert slide_stain_record(s, blocks)["within_tested_range"] is True


def test_a_coarse_slide_is_read_at_its_own_resolution(demo_slide, tmp_path):
    """A slide coarser than 0.5 µm/px is not enlarged for the estimate: each patch covers 256 of its own
    pixels (twice the area a 0.5 µm/px patch would), and the demo's stain is still inside."""
    from PIL import Image

    with open_slide(demo_slide) as s:
        Image.fromarray(s.read_region_mpp((0, 0), (1000, 1000), 1.0)).save(tmp_path / "coarse.png")
    asked = []

    class Recording:  # the real slide, noting the resolution each read asks for
        def __init__(self, slide):
            self.slide, self.dimensions, self.mpp = slide, slide.dimensions, slide.mpp

        def read_region_mpp(self, loc, size, mpp):
            asked.append(mpp)
            return self.slide.read_region_mpp(loc, size, mpp)

    with open_slide(tmp_path / "coarse.png", mpp=1.0) as coarse:
        patches = stain_patches(Recording(coarse), plan_blocks(coarse, PipelineConfig()))
    assert patches and set(asked) == {1.0} and all(p.shape == (256, 256, 3) for p in patches)
    assert check_stain(patches).within_tested_range
