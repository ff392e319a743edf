"""The pages show how far each gene and cell type can be trusted (issue #17 item 4): the Gene maps
picker offers reliable genes first (unreliable ones only on request, marked), the Cell types page
marks types and differential-expression rows; a card without reliability changes nothing."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ghist_core.model import NOT_RELIABLE
from apptest_kit import open_page_alone, register_prediction
from prediction_factory import synthetic_prediction

GENES = ("ERBB2", "ESR1", "CD3E", "EPCAM", "MKI67")
CARD = {
    "name": "tested-model",
    "gene_reliability": {
        "rule": "held-out Pearson r per gene on HER2ST; beats the floor when its mean is higher",
        "floor": "ridge on nucleus count chosen by inner cross-validation",
        "units": ["B4", "C"],
        "genes": {  # MKI67 is not listed: unknown
            "ERBB2": {"pcc_mean": 0.30, "pcc_min": 0.1, "pcc_max": 0.4, "floor_pcc_mean": 0.35, "beats_floor": False},
            "ESR1": {"pcc_mean": 0.05, "pcc_min": -0.1, "pcc_max": 0.2, "floor_pcc_mean": 0.1, "beats_floor": False},
            "CD3E": {"pcc_mean": 0.20, "pcc_min": 0.1, "pcc_max": 0.3, "floor_pcc_mean": 0.1, "beats_floor": True},
            "EPCAM": {"pcc_mean": 0.35, "pcc_min": 0.2, "pcc_max": 0.5, "floor_pcc_mean": 0.1, "beats_floor": True},
        },
    },
    "type_reliability": {
        "rule": "held-out per-spot agreement with the reference deconvolution",
        "types": {"Malignant": {"pcc_mean": 0.4, "baseline_pcc_mean": 0.2, "beats_baseline": True},
                  "T": {"pcc_mean": 0.1, "baseline_pcc_mean": 0.15, "beats_baseline": False}},
    },
}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _project(tmp_path, card: dict | None):
    """Four patients (ESR1 higher in P1 and P2), each slide predicted by a model with ``card``."""
    from ghist_core.project import uploads
    from ghist_core.project.store import Project

    project = Project.open_or_create(tmp_path / "cohort")
    for i, pid in enumerate(["P1", "P2", "P3", "P4"]):
        rec = uploads.upload_and_add(project, f"s{i}.png", _png(i), patient_id=pid, mpp=1.0).record
        a = synthetic_prediction(n=600, genes=GENES, seed=i)
        if pid in ("P1", "P2"):
            a.X[:, 1] += 3.0
        if card is not None:
            a.uns["ghist"]["model_card"] = card
        register_prediction(project, int(rec.slide_id), a)
    clin = tmp_path / "clinical.csv"
    pd.DataFrame({"patient_id": ["P1", "P2", "P3", "P4"],
                  "er_status": ["Positive", "Positive", "Negative", "Negative"]}).to_csv(clin, index=False)
    return project, clin


def _captions(at) -> str:
    return " ".join(c.value.replace("\\", "") for c in at.caption)


def test_gene_picker_offers_reliable_genes_unless_asked(projects, tmp_path) -> None:
    project, _ = _project(tmp_path, CARD)
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(project.folder)})
    genes = at.multiselect(key="gm_genes")
    # reliable only, best held-out r first; the first map is a reliable gene (ERBB2, the usual first, is not)
    assert genes.options == ["EPCAM · r 0.35", "CD3E · r 0.20"]
    assert genes.value == ["EPCAM"]
    assert "r = 0.35 (0.20–0.50) · beats cell density" in _captions(at)
    assert NOT_RELIABLE not in _captions(at)
    assert any("reliable" in e.label for e in at.expander)

    at.toggle(key="gm_show_unreliable").set_value(True).run()
    assert not at.exception
    genes = at.multiselect(key="gm_genes")
    assert genes.options == ["EPCAM · r 0.35", "CD3E · r 0.20", "ERBB2 · not reliable", "ESR1 · not reliable",
                             "MKI67 · reliability unknown"]
    assert genes.value == ["EPCAM"]  # the choice is kept
    genes.set_value(["EPCAM", "ERBB2"]).run()
    assert not at.exception
    assert len(at.get("deck_gl_json_chart")) == 2
    assert f"{NOT_RELIABLE} (r = 0.30; cell density alone 0.35)" in _captions(at)

    at.toggle(key="gm_show_unreliable").set_value(False).run()  # hidden again: ERBB2 leaves the choice
    assert not at.exception
    assert at.multiselect(key="gm_genes").value == ["EPCAM"]
    assert NOT_RELIABLE not in _captions(at)


def test_gene_picker_without_reliability_offers_every_gene(projects, tmp_path) -> None:
    project, _ = _project(tmp_path, {"name": "old card"})
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(project.folder)})
    genes = at.multiselect(key="gm_genes")
    assert genes.options == list(GENES) and genes.value == ["ERBB2"]
    assert not [t for t in at.toggle if t.key == "gm_show_unreliable"]
    assert "reliability unknown for this model" in _captions(at).lower()
    assert NOT_RELIABLE not in _captions(at) and "beats cell density" not in _captions(at)


@pytest.mark.parametrize("card", [CARD, None], ids=["with reliability", "without"])
def test_cell_types_page_marks_types_and_tested_genes(projects, tmp_path, card) -> None:
    project, clin = _project(tmp_path, card)
    at = open_page_alone("pages/cell_types.py", {"project_dir": str(project.folder)})
    if card:
        assert "Reliable cell types (held-out r of their composition): Malignant 0.40" in _captions(at)
        assert "(no better than the baseline): T 0.10" in _captions(at)
    else:
        assert "Cell types: reliability unknown for this model." in _captions(at)

    at.session_state["ct_tab"] = "Differential expression"
    at.run()
    at.get("file_uploader")[0].upload("clinical.csv", clin.read_bytes(), "text/csv").run()
    at.radio(key="ct_method").set_value("welch").run()
    at.slider(key="ct_fc").set_value(0.0).run()
    assert not at.exception
    table = [d.value for d in at.dataframe if "log2fc" in d.value.columns][0]
    marks = dict(zip(table["feature"], table["reliability"]))
    summary = " ".join(m.value for m in at.markdown if "genes with q" in m.value)
    if card:
        assert marks == {"ERBB2": "not reliable", "ESR1": "not reliable", "CD3E": "reliable", "EPCAM": "reliable",
                         "MKI67": "unknown"}
        # ESR1 (3 higher in two patients) is the one significant gene, and it is not reliable
        assert "**1** genes with q" in summary and "**0** of them reliable" in summary
    else:
        assert set(marks.values()) == {"unknown"}
        assert "reliability unknown for this model" in summary
