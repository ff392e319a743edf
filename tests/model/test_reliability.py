"""The model card's held-out reliability per gene and cell type (issue #17 item 4): read from
a card, its JSON text or a prediction; anything missing or malformed reads as unknown."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core.model import NOT_RELIABLE, GeneReliability, Reliability
from ghist_core.model.reliability import TYPE_NOT_RELIABLE, UNKNOWN


def reliability_card() -> dict:
    """A card with both fields, in the schema the HER2ST benchmark writes."""
    return {
        "name": "test-model",
        "gene_reliability": {
            "rule": "held-out Pearson r per gene on HER2ST; beats the floor when its mean is higher",
            "floor": "ridge on nucleus count (+ types, + colour) chosen by inner cross-validation",
            "units": ["B4", "C2", "C3", "C4", "C5", "C6", "C"],
            "genes": {
                "ERBB2": {"pcc_mean": 0.21, "pcc_min": 0.05, "pcc_max": 0.4, "floor_pcc_mean": 0.18,
                          "beats_floor": True},
                "ESR1": {"pcc_mean": 0.30, "pcc_min": 0.1, "pcc_max": 0.5, "floor_pcc_mean": 0.35,
                         "beats_floor": False},
                "CD3E": {"pcc_mean": 0.12, "pcc_min": -0.02, "pcc_max": 0.3, "floor_pcc_mean": 0.2,
                         "beats_floor": False},
                "EPCAM": {"pcc_mean": 0.35, "pcc_min": 0.2, "pcc_max": 0.45, "floor_pcc_mean": 0.1,
                          "beats_floor": True},
            },
        },
        "type_reliability": {
            "rule": "held-out per-spot agreement with the reference deconvolution",
            "types": {"Malignant": {"pcc_mean": 0.4, "baseline_pcc_mean": 0.2, "beats_baseline": True},
                      "T": {"pcc_mean": 0.1, "baseline_pcc_mean": 0.15, "beats_baseline": False},
                      "B": {"pcc_mean": 0.25, "baseline_pcc_mean": 0.1, "beats_baseline": True}},
        },
    }


GENES = ["CD3E", "ERBB2", "MKI67", "ESR1", "EPCAM"]  # MKI67: not in the card


@pytest.fixture
def rel() -> Reliability:
    return Reliability.from_card(reliability_card())


def test_reads_every_field_of_the_schema(rel: Reliability) -> None:
    assert rel.known and rel.types_known
    assert rel.gene("ERBB2") == GeneReliability("ERBB2", 0.21, 0.05, 0.4, 0.18, True)
    assert rel.gene("MKI67") is None
    assert rel.units == ("B4", "C2", "C3", "C4", "C5", "C6", "C")
    assert rel.floor.startswith("ridge on nucleus count") and "HER2ST" in rel.rule
    assert rel.types["Malignant"].baseline_pcc_mean == 0.2 and not rel.types["T"].beats_baseline
    assert "2 of 4 genes" in repr(rel)


def test_reliable_genes_keep_the_order_given(rel: Reliability) -> None:
    assert rel.reliable_genes(GENES) == ["ERBB2", "EPCAM"]
    assert rel.reliable_genes(["EPCAM", "ESR1", "ERBB2"]) == ["EPCAM", "ERBB2"]
    assert rel.is_reliable("ERBB2") and not rel.is_reliable("ESR1") and not rel.is_reliable("MKI67")


def test_sorted_genes_reliable_first_then_by_r_unknown_last(rel: Reliability) -> None:
    # ESR1 has the higher r but does not beat its floor: it comes after every reliable gene
    assert rel.sorted_genes(GENES) == ["EPCAM", "ERBB2", "ESR1", "CD3E", "MKI67"]
    assert rel.gene_choices(GENES) == ["EPCAM", "ERBB2"]
    assert rel.gene_choices(GENES, include_unreliable=True) == ["EPCAM", "ERBB2", "ESR1", "CD3E", "MKI67"]


def test_labels(rel: Reliability) -> None:
    assert rel.label("ERBB2") == "r = 0.21 (0.05–0.40) · beats cell density"
    assert rel.label("ESR1").startswith(NOT_RELIABLE) and "0.30" in rel.label("ESR1")
    assert rel.label("MKI67") == "reliability unknown for this gene"
    assert rel.option_label("ERBB2") == "ERBB2 · r 0.21"
    assert rel.option_label("ESR1") == "ESR1 · not reliable"
    assert rel.option_label("MKI67") == "MKI67 · reliability unknown"
    assert rel.type_label("Malignant") == "r = 0.40 · beats the baseline (0.20)"
    assert rel.type_label("T").startswith(TYPE_NOT_RELIABLE)
    assert rel.reliable_types(["T", "Malignant", "Myeloid", "B"]) == ["Malignant", "B"]
    text = rel.describe_types(["Malignant", "T", "B", "Myeloid"])
    assert "Malignant 0.40, B 0.25" in text and "(no better than the baseline): T 0.10" in text
    assert "Not tested: Myeloid" in text
    assert "cell density" in rel.describe() and "B4, C2" in rel.describe()


def test_a_label_without_the_range_leaves_it_out() -> None:
    card = {"gene_reliability": {"genes": {"X": {"pcc_mean": 0.5, "beats_floor": True}}}}
    assert Reliability.from_card(card).label("X") == "r = 0.50 · beats cell density"


def test_annotate_adds_a_reliability_column(rel: Reliability) -> None:
    table = pd.DataFrame({"feature": ["ESR1", "ERBB2", "MKI67"], "p_value": [0.01, 0.02, 0.5]})
    out = rel.annotate(table)
    assert out["reliability"].tolist() == ["not reliable", "reliable", "unknown"]
    assert "reliability" not in table  # a copy
    assert Reliability().annotate(table, key_added="r")["r"].tolist() == ["unknown"] * 3
    assert len(rel.annotate(table.iloc[:0])) == 0


def test_the_card_and_its_fields_may_be_json_text(rel: Reliability) -> None:
    card = reliability_card()
    assert Reliability.from_card(json.dumps(card)) == rel
    assert Reliability.from_card(json.dumps(card).encode()) == rel
    as_text = {k: json.dumps(v) if k.endswith("_reliability") else v for k, v in card.items()}
    assert Reliability.from_card(as_text) == rel
    card["gene_reliability"]["genes"] = json.dumps(card["gene_reliability"]["genes"])
    assert Reliability.from_card(card) == rel


def test_a_prediction_carries_the_card_through_h5ad(tmp_path, rel: Reliability) -> None:
    """After an .h5ad round trip numbers are numpy scalars and lists are arrays: still read."""
    a = ad.AnnData(np.zeros((2, 5), np.float32), var=pd.DataFrame(index=GENES))
    a.uns["ghist"] = {"model_card": reliability_card(), "expression_units": "x"}
    a.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert Reliability.from_adata(back) == rel
    assert Reliability.from_h5ad(tmp_path / "p.h5ad") == rel
    a.uns["ghist"] = json.dumps({"model_card": reliability_card()})
    assert Reliability.from_adata(a) == rel


@pytest.mark.parametrize("card", [
    None, {}, "not json", b"\xff", 42, ["a"],
    {"name": "old card, no reliability"},
    {"gene_reliability": None},
    {"gene_reliability": "{broken"},
    {"gene_reliability": {"genes": []}},
    {"gene_reliability": {"genes": "nope"}},
    {"gene_reliability": {"genes": {"ERBB2": {"pcc_mean": "high", "beats_floor": True}}}},
    {"gene_reliability": {"genes": {"ERBB2": {"pcc_mean": float("nan"), "beats_floor": True}}}},
    {"gene_reliability": {"genes": {"ERBB2": {"pcc_mean": 0.2}}}},  # no verdict: no claim
    {"gene_reliability": {"genes": {"ERBB2": {"pcc_mean": 0.2, "beats_floor": "maybe"}}}},
    {"gene_reliability": {"genes": {"ERBB2": 0.2}, "units": 7}},
])
def test_missing_or_malformed_reads_as_unknown(card) -> None:
    rel = Reliability.from_card(card)
    assert not rel.known and not rel.types_known
    assert rel.reliable_genes(GENES) == []
    assert rel.sorted_genes(GENES) == GENES and rel.gene_choices(GENES) == GENES
    assert rel.label("ERBB2") == UNKNOWN and rel.option_label("ERBB2") == "ERBB2"
    assert rel.type_label("T") == UNKNOWN and UNKNOWN in rel.describe_types()
    assert repr(rel) == "<Reliability unknown>"


def test_a_bad_record_drops_only_itself() -> None:
    card = reliability_card()
    card["gene_reliability"]["genes"]["ESR1"] = {"pcc_mean": None, "beats_floor": True}
    card["gene_reliability"]["genes"]["CD3E"]["pcc_min"] = "n/a"
    card["gene_reliability"]["units"] = "B4"
    card["type_reliability"]["types"] = {"T": "junk", "B": {"pcc_mean": 0.2, "beats_baseline": 1}}
    rel = Reliability.from_card(card)
    assert rel.gene("ESR1") is None and rel.gene("CD3E").pcc_min is None and rel.units == ()
    assert list(rel.types) == ["B"] and rel.types["B"].beats_baseline


def test_genes_may_be_a_list_of_records() -> None:
    card = {"gene_reliability": {"genes": [{"gene": "ERBB2", "pcc_mean": 0.2, "beats_floor": "true"},
                                           {"pcc_mean": 0.3, "beats_floor": True}]}}
    assert list(Reliability.from_card(card).genes) == ["ERBB2"]


@pytest.mark.parametrize("adata", [None, object(), ad.AnnData(np.zeros((1, 1), np.float32))])
def test_a_prediction_without_a_card_is_unknown(adata) -> None:
    assert not Reliability.from_adata(adata).known


def test_an_unreadable_file_is_unknown(tmp_path) -> None:
    (tmp_path / "bad.h5ad").write_bytes(b"not hdf5")
    assert not Reliability.from_h5ad(tmp_path / "bad.h5ad").known
    assert not Reliability.from_h5ad(tmp_path / "missing.h5ad").known


def test_shared_is_the_one_reliability_of_several_predictions(rel: Reliability) -> None:
    same = Reliability.from_card(reliability_card())
    assert Reliability.shared([rel, same]) == (rel, 1)
    other, n = Reliability.shared([rel, Reliability()])
    assert n == 2 and not other.known
    assert Reliability.shared([]) == (Reliability(), 0)
