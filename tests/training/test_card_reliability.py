"""The card's per-gene and per-type reliability, made from a protocol result (bench/her2st.json shape)."""

import json

import numpy as np

from ghist_core.model.reliability import Reliability
from testkit import load_repo_script


def _script():
    return load_repo_script("scripts/train_ghist.py")


def _protocol(model_gain: dict[str, float]) -> dict:
    """A protocol result with 7 units where each gene's model r = floor r + its gain."""
    genes = list(model_gain)
    rng = np.random.default_rng(0)

    def unit(gain_scale: float, floor_r: np.ndarray) -> dict:
        return {"mean_pcc": 0.2, "per_gene": {g: float(floor_r[i] + gain_scale * model_gain[g]) for i, g in enumerate(genes)}}

    floors = {u: rng.uniform(0.1, 0.3, len(genes)) for u in ("B4", "C2", "C3", "C4", "C5", "C6", "C")}
    res = {}
    for split, units in (("loso", ("B4", "C2", "C3", "C4", "C5", "C6")), ("lopo", ("B", "C"))):
        src = {u: ("B4" if u == "B" else u) for u in units}
        res[split] = {"model": {"complete": True, "per_unit": {u: unit(1.0, floors[s]) for u, s in src.items()}},
                      "floor": {"per_unit": {u: unit(0.0, floors[s]) for u, s in src.items()}}}
    types = ["T", "Malignant"]
    res["types"] = {m: {"per_unit": {u: {"per_type": {"T": 0.3 + d, "Malignant": 0.5 - d}} for u in floors}}
                    for m, d in (("model", 0.1), ("ridge_count", 0.0))}
    assert types
    return res


def test_card_reliability_round_trips_into_what_the_app_reads():
    mod = _script()
    fields = mod.reliability_from_bench(_protocol({"ERBB2": 0.05, "ESR1": -0.02, "MKI67": 0.0}))
    card = {"name": "ghist-her2st", **fields}
    rel = Reliability.from_card(json.loads(json.dumps(card)))
    assert rel.known
    assert rel.is_reliable("ERBB2") and not rel.is_reliable("ESR1") and not rel.is_reliable("MKI67")
    assert rel.gene("ERBB2").pcc_mean > rel.gene("ERBB2").floor_pcc_mean
    assert set(json.loads(fields["gene_reliability"]["genes"])) == {"ERBB2", "ESR1", "MKI67"}
    assert fields["gene_reliability"]["units"] == sorted(["B4", "C2", "C3", "C4", "C5", "C6", "C"])
    assert rel.reliable_types(["T", "Malignant"]) == ["T"]
