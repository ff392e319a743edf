"""The pre-declared switch rule (scripts/check_switch_rule.py) judges two protocol results by the
thresholds written in docs/DECISIONS.md, and can say KEEP."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from testkit import load_repo_script

rule = load_repo_script("scripts/check_switch_rule.py")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "results" / "her2st.json"


def test_a_result_against_itself_switches_and_a_worse_one_keeps(tmp_path):
    res = json.loads(BENCH.read_text())
    ok, lines = rule.check(res, res)
    assert ok and len(lines) == 3

    worse = copy.deepcopy(res)
    worse["lopo"]["model"]["mean_pcc"] -= 0.011  # just past the allowed drop
    ok, lines = rule.check(res, worse)
    assert not ok and ": False" in lines[1]

    behind = copy.deepcopy(res)
    behind["loso"]["wilcoxon_p_vs_floor"] = 0.02
    assert not rule.check(res, behind)[0]

    (tmp_path / "a.json").write_text(json.dumps(res))
    (tmp_path / "b.json").write_text(json.dumps(worse))
    assert rule.main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert rule.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1


def test_the_rule_counts_reliable_genes_and_reports_a_missing_test():
    res = json.loads(BENCH.read_text())
    fewer = copy.deepcopy(res)
    for split in ("loso", "lopo"):  # every gene now loses to the floor on every unit
        for unit in fewer[split]["floor"]["per_unit"].values():
            unit["per_gene"] = {g: 1.0 for g in unit["per_gene"]}
    ok, lines = rule.check(res, fewer)
    assert not ok and lines[2].startswith("genes beating the floor: 0/") and lines[2].endswith("False")
    untested = copy.deepcopy(res)
    untested["lopo"]["wilcoxon_p_vs_floor"] = None
    ok, lines = rule.check(res, untested)
    assert not ok and "p none" in lines[1].lower()


def _tiny_pack(folder: Path, segmenter: str, name: str = "p.npz"):
    """A two-spot pack saved and loaded for real, its nucleus types from ``segmenter`` ("" = not recorded)."""
    import numpy as np

    from ghist_core.training.her2st import SpotPack

    s, n = 2, 2
    z = np.zeros(s)
    pack = SpotPack(genes=np.array(["a"]), n_hvg=1, cell_types=np.array(["t"]), mpp=0.5,
                    jpeg_buf=np.zeros(0, np.uint8), jpeg_off=np.zeros(s + 1, np.int64),
                    instances=np.ones((s, 8, 8), np.uint16), counts=np.ones((s, 1)), totals=np.ones(s),
                    fractions=np.ones((s, 1)), features=z[:, None], section=np.array(["s"] * s),
                    patient=np.array(["p"] * s), array_xy=np.zeros((s, 2)), cell_spot=np.arange(n),
                    cell_label=np.ones(n, int), cell_xy_px=np.zeros((n, 2)), cell_in_spot=np.ones(n, bool),
                    cell_morph=np.zeros((n, 3)), cell_inputs=np.full((n, 1), 0.5, np.float32),
                    cell_input_names=np.array(["prob_t"]), cell_input_segmenter=segmenter)
    pack.save(folder / name)
    return SpotPack.load(folder / name)


def test_a_pack_of_another_segmenter_is_refused(tmp_path):
    """A real saved pack says whose nucleus types it holds: the check passes for that segmenter or
    no claim, raises the typed error otherwise, and the two scripts turn it into a clear exit."""
    import pytest

    from ghist_core.training.her2st import PackSegmenterError

    pack = _tiny_pack(tmp_path, "nuclei-seg-stain")
    pack.require_segmenter("nuclei-seg-stain", path="p.npz", wanted_by="x")
    pack.require_segmenter(None, path="p.npz", wanted_by="x")  # an older result names no segmenter: no claim
    with pytest.raises(PackSegmenterError, match="holds nuclei-seg-stain's nucleus types"):
        pack.require_segmenter("nuclei-seg", path="p.npz", wanted_by="x")
    old = _tiny_pack(tmp_path, "", name="old.npz")
    assert old.cell_input_segmenter == "nuclei-seg"  # packs from before the field: the segmenter of that time
    bench = load_repo_script("bench/her2st.py")
    bench._require_training_pack(pack, {"segmenter": "nuclei-seg-stain"}, "p")
    with pytest.raises(SystemExit, match="the model was trained on nuclei-seg's"):
        bench._require_training_pack(pack, {"segmenter": "nuclei-seg"}, "p")


def test_the_bundled_card_is_the_committed_protocols_model():
    """The card's reliability, metrics and segmenter are what the committed protocol result gives."""
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR

    train = load_repo_script("scripts/train_ghist.py")
    res = json.loads(BENCH.read_text())
    card = json.loads((BUNDLED_WEIGHTS_DIR / "ghist-her2st.json").read_text())

    def genes(block):
        g = block["genes"]
        return json.loads(g) if isinstance(g, str) else g

    expected = train.reliability_from_bench(res)
    assert genes(card["gene_reliability"]) == genes(expected["gene_reliability"])
    assert card["segmenter"] == res["protocol"]["pack"]["cell_input_segmenter"]
    for split in ("loso", "lopo"):
        assert card["metrics"][split]["model_mean_pcc"] == res[split]["model"]["mean_pcc"]
        assert card["metrics"][split]["model_seeds"] == res[split]["model"]["seeds"]
