"""The per-cell expression uncertainty in the app: Upload & predict asks for it (only for a model with
ensemble members) and records it in the runs it starts; Gene maps offers it as one more panel, only
when the prediction holds it, with its own colour range, its own caption and working downloads."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ghist_core import _keys as K
from apptest_kit import download, open_page, open_page_alone, record_deferred_downloads, register_prediction
from prediction_factory import synthetic_prediction
from slide_factory import synthetic_he, write_png

UNC = K.OBS_EXPRESSION_UNCERTAINTY
GENES = ("ERBB2", "ESR1", "CD3E")
#: ERBB2 and ESR1 are not reliable, CD3E is: the uncertainty panel must take no part in this
CARD = {
    "name": "tested-ensemble",
    "ensemble": {"members": 3, "rule": "other seeds of the same recipe"},
    "gene_reliability": {
        "rule": "held-out Pearson r per gene", "floor": "cell density", "units": ["A", "B"],
        "genes": {"ERBB2": {"pcc_mean": 0.1, "pcc_min": 0.0, "pcc_max": 0.2, "floor_pcc_mean": 0.2, "beats_floor": False},
                  "ESR1": {"pcc_mean": 0.0, "pcc_min": -0.1, "pcc_max": 0.1, "floor_pcc_mean": 0.1, "beats_floor": False},
                  "CD3E": {"pcc_mean": 0.3, "pcc_min": 0.2, "pcc_max": 0.4, "floor_pcc_mean": 0.1, "beats_floor": True}},
    },
}


# --- Upload & predict ---------------------------------------------------------------------------
@pytest.fixture
def spawned(monkeypatch) -> list[tuple]:
    """No worker process: the runs a page submits are only recorded (``_spawn``'s arguments kept)."""
    from ghist_core.pipeline import worker

    calls: list[tuple] = []
    monkeypatch.setattr(worker, "_spawn", lambda *args, **kwargs: calls.append(args) or 0)
    return calls


def _models(tmp_path, monkeypatch, members: int) -> None:
    """The bundled folder holds one tiny GHIST model with ``members`` ensemble members; no cached ones."""
    from testkit import make_tiny_ghist

    make_tiny_ghist(tmp_path / "weights", members=members)
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def _run_the_waiting_slide(at) -> dict:
    """Press "Run" for the (demo) slide that has no run yet; the params of the run it recorded."""
    from ghist_core.project import Project

    (button,) = [b for b in at.button if str(b.key).startswith("run_")]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    runs = Project.open(at.session_state["project_dir"]).list_runs()
    assert len(runs) == 1
    return runs.iloc[0]["params"]


def test_upload_uncertainty_is_disabled_for_a_one_member_model(projects, tmp_path, monkeypatch, spawned):
    _models(tmp_path, monkeypatch, members=1)
    at = open_page("pages/upload.py", {"upload_uncertainty": True})  # even if ticked before, it cannot stay on
    box = at.checkbox(key="upload_uncertainty")
    assert box.label == "Per-cell uncertainty (about 3× slower prediction)"
    assert box.proto.disabled and box.value is False
    assert "one member" in box.proto.help
    params = _run_the_waiting_slide(at)
    assert params["pipeline"] == {"uncertainty": False, "nucleus_scale": "auto"} and len(spawned) == 1


def test_upload_uncertainty_is_recorded_in_the_run_it_starts(projects, tmp_path, monkeypatch, spawned):
    from ghist_core.pipeline.blocks import PipelineConfig

    _models(tmp_path, monkeypatch, members=3)
    at = open_page("pages/upload.py")
    box = at.checkbox(key="upload_uncertainty")
    assert not box.proto.disabled and box.value is False  # off unless asked: it costs ~3× the expression step
    assert "3 members" in box.proto.help and "different random seeds" in box.proto.help
    box.check().run()
    assert not at.exception
    params = _run_the_waiting_slide(at)
    assert params["pipeline"] == {"uncertainty": True, "nucleus_scale": "auto"} and len(spawned) == 1
    assert PipelineConfig.from_params(params["pipeline"]).uncertainty  # what the worker's pipeline reads
    at.run()  # the run's line says it was asked for
    assert any("with per-cell uncertainty" in m.value for m in at.markdown)


# --- Gene maps ------------------------------------------------------------------------------------
def _project(tmp_path, with_uncertainty: bool):
    """One slide whose finished prediction (600 cells) holds the uncertainty column or not."""
    from ghist_core.project import Project

    project = Project.open_or_create(tmp_path / "cohort")
    png = write_png(tmp_path / "s.png", synthetic_he((160, 128), seed=1))
    rec = project.add_slide(png, patient_id="P1", mpp=1.0)
    a = synthetic_prediction(n=600, genes=GENES, seed=1)
    a.uns["ghist"]["model_card"] = CARD
    if with_uncertainty:  # small values (SD of log1p): far below the genes' range
        a.obs[UNC] = np.random.default_rng(2).uniform(0.01, 0.2, a.n_obs).astype(np.float32)
    register_prediction(project, int(rec.slide_id), a)
    return project, a


def _captions(at) -> list[str]:
    return [c.value.replace("\\", "") for c in at.caption]


def _bar_ranges(at) -> dict[str, list[float]]:
    """Each colour bar's x range by the start of its title ("CD3E predicted expression", "Expression uncertainty")."""
    out = {}
    for e in at.get("plotly_chart"):
        x = json.loads(e.proto.spec)["layout"]["xaxis"]
        out[x["title"]["text"].split(" (")[0]] = x["range"]
    return out


def test_gene_maps_offers_no_uncertainty_without_the_column(projects, tmp_path):
    project, _ = _project(tmp_path, with_uncertainty=False)
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(project.folder)})
    assert not [b for b in at.checkbox if b.key == f"gm_layer_{UNC}"]
    assert len(at.get("deck_gl_json_chart")) == 1


def test_gene_maps_adds_the_uncertainty_panel(projects, tmp_path, monkeypatch):
    record_deferred_downloads(monkeypatch)
    project, a = _project(tmp_path, with_uncertainty=True)
    at = open_page_alone("pages/gene_maps.py", {"project_dir": str(project.folder)})
    assert at.multiselect(key="gm_genes").value == ["CD3E"]  # the reliable gene; not the layer
    assert all(UNC not in str(o) for o in at.multiselect(key="gm_genes").options)
    box = at.checkbox(key=f"gm_layer_{UNC}")
    assert box.label == "Add the uncertainty map" and box.value is False
    assert len(at.get("deck_gl_json_chart")) == 1

    at.toggle(key="gm_show_unreliable").set_value(True).run()
    at.multiselect(key="gm_genes").set_value(["CD3E", "ERBB2"]).run()
    at.radio(key="gm_scale").set_value("Shared by panels").run()
    at.checkbox(key=f"gm_layer_{UNC}").check().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("deck_gl_json_chart")) == 3  # the two genes, then the uncertainty
    titles = [m.value for m in at.markdown if m.value.startswith("**")]
    assert [t.split("**")[1] for t in titles[-3:]] == ["CD3E", "ERBB2", "Expression uncertainty"]
    # its caption explains it; the reliability captions are the genes' only (one reliable, one not)
    captions = _captions(at)
    panel_captions = captions[:next(i for i, c in enumerate(captions) if c.startswith("Coordinates in µm"))]
    assert len(panel_captions) == 3, panel_captions  # one each: no reliability line under the uncertainty
    assert panel_captions[0].startswith("r = 0.30") and "not reliable" in panel_captions[1]
    assert "3 models trained with different seeds disagree in each cell" in panel_captions[2]
    assert "reliab" not in panel_captions[2] and "cell density" not in panel_captions[2]
    # shared by the gene panels, its own for the uncertainty (other units)
    ranges = _bar_ranges(at)
    assert ranges["CD3E predicted expression"] == ranges["ERBB2 predicted expression"]
    lo, hi = ranges["Expression uncertainty"]
    assert 0.0 <= lo < hi <= 0.2 < ranges["CD3E predicted expression"][1]

    # its downloads work like a gene's
    _, png = download(at, f"gm_png_{UNC}")
    assert Image.open(io.BytesIO(png)).size[0] > 100
    _, csv = download(at, f"gm_csv_{UNC}")
    table = pd.read_csv(io.BytesIO(csv))
    column = f"{UNC} (SD across seeds, log1p)"
    assert len(table) == a.n_obs and column in table.columns
    np.testing.assert_allclose(np.sort(table[column].to_numpy()), np.sort(a.obs[UNC].to_numpy()), rtol=1e-5)

    # the close-up draws it too
    at.select_slider[0].set_value("20×").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("deck_gl_json_chart")) == 3


def test_upload_nucleus_scale_check_is_on_unless_unticked_and_recorded(projects, tmp_path, monkeypatch, spawned):
    """The scale check box is ticked by default (a run started so records "auto": the two tests above);
    unticked, the run records
    1.0 (the stated µm/px), the worker's pipeline reads it, and the run's line says the check was off."""
    from ghist_core.pipeline.blocks import PipelineConfig

    _models(tmp_path, monkeypatch, members=1)
    at = open_page("pages/upload.py")
    box = at.checkbox(key="upload_nucleus_scale")
    assert box.value is True and "2/3 scale" in box.proto.help
    box.uncheck().run()
    assert not at.exception
    params = _run_the_waiting_slide(at)
    assert params["pipeline"] == {"uncertainty": False, "nucleus_scale": 1.0} and len(spawned) == 1
    assert PipelineConfig.from_params(params["pipeline"]).nucleus_scale == 1.0
    at.run()
    assert any("nucleus scale check off" in m.value for m in at.markdown)


def test_wants_run_counts_a_finished_run_only_at_the_asked_scale(tmp_path):
    """An upload asking for the stated scale (check off) is not answered by a finished run made with
    the check, nor the other way round; asking for neither (the default) takes any finished run, and
    a run recorded before the setting counts as made at the stated scale."""
    from ghist_core.project import Project
    from ghist_core.project.overview import wants_run

    project = Project.open_or_create(tmp_path / "p")
    cases = (({"pipeline": {"uncertainty": False, "nucleus_scale": "auto"}}, False, True),
             ({"pipeline": {"uncertainty": False}}, True, False))
    for k, (params, auto_wanted, stated_wanted) in enumerate(cases):
        png = write_png(tmp_path / f"s{k}.png", synthetic_he((64, 64), seed=k))
        sid = int(project.add_slide(png, patient_id="P1", mpp=0.5).slide_id)
        assert wants_run(project, sid) and wants_run(project, sid, nucleus_scale=1.0)
        run_id = project.start_run(sid, model_id="bundled", weights_sha256="", device="cpu", params=params)
        project.finish_run(run_id, n_cells=0, timings={})
        assert not wants_run(project, sid)
        assert wants_run(project, sid, nucleus_scale="auto") is auto_wanted
        assert wants_run(project, sid, nucleus_scale=1.0) is stated_wanted
