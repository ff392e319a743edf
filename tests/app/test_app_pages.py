"""Every page under Streamlit's AppTest: real uploads, a real demo prediction, figure data checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from ghist_core.viz import palette
from apptest_kit import REPO, open_page, register_prediction
from prediction_factory import synthetic_prediction


def elements(at: AppTest, kind: str):
    return at.get(kind)


def deck_specs(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.json) for e in at.get("deck_gl_json_chart")]


def arr(v) -> np.ndarray:
    """A plotly JSON array: a list, or plotly 6's typed array ``{"dtype", "bdata"}``."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).astype(float)
    return np.asarray(v, dtype=float)


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("plotly_chart")]


# --- Home ----------------------------------------------------------------------------------

def test_home_creates_demo_project(projects):
    at = open_page("pages/home.py")
    from ghist_core.project.store import Project

    project = Project.open_or_create(projects / "demo")
    slides = project.list_slides()
    assert len(slides) == 1 and slides.iloc[0]["patient_id"] == "DEMO-01"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Slides"] == "1" and metrics["Patients"] == "1"
    assert any(b.label == "Run the demo" for b in at.button)
    tables = at.dataframe
    assert "DEMO-01" in tables[0].value["patient_id"].tolist()
    # a second start does not add the demo twice
    open_page("pages/home.py")
    assert len(project.list_slides()) == 1


def test_home_switches_project(projects, tmp_path):
    at = open_page("pages/home.py")
    at.text_input(key="home_project_folder").set_value(str(tmp_path / "other"))
    at.button(key="home_open_project").click().run()
    assert not at.exception
    assert at.session_state["project_dir"] == str(tmp_path / "other")
    assert {m.label: m.value for m in at.metric}["Slides"] == "0"
    assert (tmp_path / "other").is_dir()


# --- Upload & predict --------------------------------------------------------------------

def test_upload_real_svs_through_the_page(projects, svs_path, tmp_path):
    at = open_page("pages/upload.py", {"project_dir": str(tmp_path / "p")})
    up = at.get("file_uploader")[0]
    assert set(["svs", "ndpi", "tiff", "png", "jpg"]) <= {t.lstrip(".") for t in up.allowed_type}
    up.upload(svs_path.name, svs_path.read_bytes(), "application/octet-stream")
    at.run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "2,220 × 2,967 px" in text and "0.4990 µm per px" in text
    patient = [t for t in at.text_input if t.label == "Patient id"][0]
    patient.set_value("PT-001")
    [cb for cb in at.checkbox if cb.label.startswith("Run the prediction")][0].set_value(False)
    [b for b in at.button if b.label == "Add to project"][0].click().run()
    assert not at.exception
    assert any("as slide" in s.value for s in at.success)
    from ghist_core.project.store import Project

    project = Project.open_or_create(tmp_path / "p")
    slides = project.list_slides()
    assert len(slides) == 1 and slides["patient_id"].tolist() == ["PT-001"]
    assert slides["status"].isna().all()  # not run: the box was unticked
    # a rerun of the page does not add it again or start anything
    at.run()
    assert len(project.list_slides()) == 1 and len(project.list_runs()) == 0
    assert not [b for b in at.button if b.label == "Add to project"]
    assert any("added as slide" in s.value for s in at.success)


@pytest.mark.parametrize("name,data", [
    ("broken.svs", b"this is not a slide at all" * 10),
    ("empty.tiff", b""),
    ("fake.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
], ids=["text-as-svs", "empty-tiff", "truncated-png"])
def test_bad_upload_shows_error_and_leaves_project(projects, name, data):
    at = open_page("pages/upload.py")
    from ghist_core.project.store import Project

    before = len(Project.open_or_create(projects / "demo").list_slides())
    at.get("file_uploader")[0].upload(name, data).run()
    assert not at.exception
    assert at.error and all(len(e.value) > 20 for e in at.error)
    assert not [b for b in at.button if b.label == "Add to project"]
    assert len(Project.open_or_create(projects / "demo").list_slides()) == before


def test_png_without_mpp_asks_for_it(projects, demo_png_1000):
    target_png = demo_png_1000  # any 1000 x 1000 PNG without µm per pixel
    at = open_page("pages/upload.py")
    at.get("file_uploader")[0].upload(target_png.name, target_png.read_bytes(), "image/png").run()
    assert not at.exception
    assert at.warning and "µm" in at.warning[0].value
    mpp = [n for n in at.number_input if "µm per pixel" in n.label][0]
    assert not [b for b in at.button if b.label == "Add to project"]
    mpp.set_value(0.5).run()
    text = " ".join(m.value for m in at.markdown)
    assert "1,000 × 1,000 px" in text and "0.5000 µm per px" in text


def test_upload_helper_is_the_page_path(projects, svs_path, tmp_path):
    """The function the page calls, on the real SVS: validated copy inside the project."""
    from ghist_core.errors import SlideError
    from ghist_core.project import uploads
    from ghist_core.project.store import Project

    project = Project.open_or_create(tmp_path / "p")
    with open(svs_path, "rb") as fh:
        rec = uploads.upload_and_add(project, "my slide (1).svs", fh, patient_id="P9").record
    slides = project.list_slides()
    assert len(slides) == 1 and slides.iloc[0]["patient_id"] == "P9"
    stored = project.folder / rec.path if not Path(rec.path).is_absolute() else Path(rec.path)
    assert stored.stat().st_size == svs_path.stat().st_size
    with pytest.raises(SlideError):
        uploads.upload_and_add(project, "x.svs", b"garbage" * 100, patient_id="P9")
    assert len(project.list_slides()) == 1
    assert not any(uploads.staging_dir(project.folder).glob("*"))  # staged copies are cleaned up


# --- analysis pages with predictions ----------------------------------------------------------

def he_like_png(seed: int, size=(1000, 800)) -> bytes:
    """A distinct pink-purple H&E-like PNG (1 µm/px), so each upload is a different slide."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.array([225, 160, 200], float)
    img = base + rng.normal(0, 18, (size[1], size[0], 3))
    img[rng.random((size[1], size[0])) < 0.08] = [90, 60, 150]
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def predicted_project(projects, tmp_path, svs_path):
    """Four patients (2 ER+, 2 ER−) with synthetic predictions registered in a real project."""
    from ghist_core.project import uploads
    from ghist_core.project.store import Project

    project = Project.open_or_create(tmp_path / "cohort")
    ids = []
    for i, pid in enumerate(["P1", "P2", "P3", "P4"]):
        rec = uploads.upload_and_add(project, f"slide{i}.png", he_like_png(seed=i), patient_id=pid, mpp=1.0).record
        a = synthetic_prediction(n=1500, genes=("ERBB2", "ESR1", "CD3E", "EPCAM"), seed=i)
        if pid in ("P1", "P2"):
            a.X[:, 1] += 3.0  # ESR1 higher in the ER+ patients
        register_prediction(project, int(rec.slide_id), a)
        ids.append(int(rec.slide_id))
    clin = tmp_path / "clinical.csv"
    pd.DataFrame({"patient_id": ["P1", "P2", "P3", "P4", "P5"],
                  "er_status": ["Positive", "Positive", "Negative", "Negative", "Negative"]}).to_csv(clin, index=False)
    return project, ids, clin


def test_gene_maps_page(predicted_project):
    project, ids, _ = predicted_project
    at = open_page("pages/gene_maps.py", {"project_dir": str(project.folder)})
    assert at.selectbox(key="gm_slide").value == ids[0]
    genes = at.multiselect(key="gm_genes")
    assert genes.value == ["ERBB2"] and "ESR1" in genes.options
    specs = deck_specs(at)
    assert len(specs) == 1
    layers = {layer["@@type"]: layer for layer in specs[0]["layers"]}
    assert specs[0]["views"][0]["@@type"] == "OrthographicView"
    assert "BitmapLayer" in layers and len(layers["ScatterplotLayer"]["data"]) == 1500
    bar = plotly_specs(at)[0]
    assert "ERBB2" in bar["layout"]["xaxis"]["title"]["text"] and "log1p counts" in bar["layout"]["xaxis"]["title"]["text"]
    # side by side: two genes -> two decks with different colours for the same cell
    genes.set_value(["ERBB2", "CD3E"]).run()
    assert not at.exception
    specs = deck_specs(at)
    assert len(specs) == 2
    c1 = [(d["r"], d["g"], d["b"]) for d in specs[0]["layers"][-1]["data"][:200]]
    c2 = [(d["r"], d["g"], d["b"]) for d in specs[1]["layers"][-1]["data"][:200]]
    assert c1 != c2
    # grid summary and cell-type colouring
    at.radio(key="gm_mode").set_value("Grid summary").run()
    assert not at.exception
    assert deck_specs(at)[0]["layers"][-1]["@@type"] == "GridCellLayer"
    at.radio(key="gm_mode").set_value("Each cell").run()
    at.radio(key="gm_colour_by").set_value("Cell type").run()
    row = deck_specs(at)[0]["layers"][-1]["data"][0]
    short = {palette.cell_type_label(t): t for t in palette.CELL_TYPES}  # tooltips show display names
    assert (row["r"], row["g"], row["b"]) == palette.hex_to_rgb(palette.CELL_TYPE_COLOURS[short[row["t"]]])
    at.multiselect(key="gm_types").set_value(["T"]).run()
    assert {d["t"] for d in deck_specs(at)[0]["layers"][-1]["data"]} == {"T cells"}
    assert len(at.get("download_button")) == 4


def test_cell_types_page(predicted_project):
    project, ids, clin = predicted_project
    at = open_page("pages/cell_types.py", {"project_dir": str(project.folder)})
    figs = plotly_specs(at)
    comp = figs[0]
    assert comp["layout"]["barmode"] == "stack" and "%" in comp["layout"]["yaxis"]["title"]["text"]
    assert [t["name"] for t in comp["data"]] == [palette.cell_type_label(t) for t in palette.CELL_TYPES]
    assert "T cells" in [t["name"] for t in comp["data"]]
    totals = np.sum([arr(t["y"]) for t in comp["data"]], axis=0)
    np.testing.assert_allclose(totals, 100.0)
    # lazy tabs: only the open tab is computed and sent
    assert not any(f["layout"].get("xaxis", {}).get("title", {}).get("text") == "neighbour cell type" for f in figs)
    at.session_state["ct_tab"] = "Neighbourhoods"
    figs = plotly_specs(at.run())
    assert any(f["layout"].get("xaxis", {}).get("title", {}).get("text") == "neighbour cell type" for f in figs)
    at.session_state["ct_tab"] = "Morphology"
    figs = plotly_specs(at.run())
    assert any("µm²" in f["layout"].get("yaxis", {}).get("title", {}).get("text", "") for f in figs)
    # differential expression from an uploaded clinical table
    at.session_state["ct_tab"] = "Differential expression"
    at.run()
    at.get("file_uploader")[0].upload("clinical.csv", clin.read_bytes(), "text/csv").run()
    assert not at.exception
    assert at.selectbox(key="ct_id_col").value == "patient_id"
    assert at.selectbox(key="ct_group_col").value == "er_status"
    volcano = [f for f in plotly_specs(at) if "Benjamini" in f["layout"].get("yaxis", {}).get("title", {}).get("text", "")]
    assert volcano, ("no volcano plot", [w.value for w in at.warning], [e.value for e in at.error])
    table = [d.value for d in at.dataframe if "log2fc" in d.value.columns][0]
    top = table.iloc[0]
    assert top["feature"] == "ESR1" and top["log2fc"] > 0
    shown = [c.value.replace("\\", "") for c in at.caption]  # data text in captions is markdown-escaped
    assert "2 of them" not in " ".join(shown)  # all 4 matched
    assert any("4 patients with predictions, 4 of them" in c for c in shown)


def _tiny_model(folder: Path, name: str = "tiny-ghist") -> None:
    import torch

    from ghist_core.weights.resolve import save_weights

    card = {"kind": "ghist", "genes": ["ERBB2", "ESR1", "CD3E"], "cell_types": list(palette.CELL_TYPES),
            "training_data": "synthetic (test)", "metrics": {"median_gene_pearson_r": 0.1},
            "description": "A tiny test model."}
    save_weights({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder, name, card)


def test_models_page(projects, tmp_path, monkeypatch):
    bundled = tmp_path / "weights"
    _tiny_model(bundled)
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(bundled))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    at = open_page("pages/models.py")
    import torch

    metrics = {m.label: m.value for m in at.metric}
    assert metrics["CUDA GPU"] == ("available" if torch.cuda.is_available() else "not available")
    assert metrics["Genes"] == "3" and metrics["Cell types"] == "9"
    assert at.radio(key="models_device").options[:2] == ["auto", "cpu"]
    table = at.dataframe[0].value
    assert table["name"].tolist() == ["tiny-ghist"] and table["source"].tolist() == ["bundled"]
    at.button(key="models_verify").click().run()
    assert not at.exception
    assert at.success and "match the sha256" in at.success[0].value
    # damage the weights: verify must say so
    w = bundled / "tiny-ghist.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    at.button(key="models_verify").click().run()
    assert at.error and "do not match" in at.error[0].value


def test_models_page_pulls_from_hub(projects, tmp_path, monkeypatch):
    from ghist_core.testing.hub import HubServer

    repo = tmp_path / "repo"
    _tiny_model(repo, "hub-ghist")
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(tmp_path / "no_bundled"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with HubServer() as hub:
        hub.add_repo("lab/tiny", repo)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        at = open_page("pages/models.py")
        assert any("No models installed" in i.value for i in at.info)
        at.text_input(key="models_pull_id").set_value("lab/tiny")
        at.button(key="models_pull").click().run()
        assert not at.exception
        assert at.success and "hub-ghist" in at.success[0].value.replace("\\", "")  # names are markdown-escaped
        at.run()
        table = at.dataframe[0].value
        assert table["name"].tolist() == ["hub-ghist"] and table["source"].tolist() == ["cache"]
        at.text_input(key="models_pull_id").set_value("lab/does-not-exist")
        at.button(key="models_pull").click().run()
        assert not at.exception and at.error


def test_cohort_page_in_navigation(projects):
    at = open_page("pages/home.py")
    if (REPO / "pages" / "cohort.py").exists():
        at.switch_page("pages/cohort.py").run()
        assert not at.exception, [e.value for e in at.exception]


# --- the real thing: the demo slide through the worker, a crash, a resume, the maps ---------------

def _wait_run(project, run_id: int, until, timeout_s: float = 400.0):
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        run = project.get_run(run_id)
        if until(run):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} stuck at {project.get_run(run_id)}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_prediction_crash_resume_and_maps(projects):
    """One click runs the demo in a worker; a killed worker is resumed from the page; maps show it."""
    import os
    import signal

    from ghist_core.project.store import Project

    at = open_page("pages/home.py")
    at.button(key="home_run_demo").click().run()
    assert not at.exception, [e.value for e in at.exception]
    project = Project.open(projects / "demo")
    runs = project.list_runs()
    assert len(runs) == 1
    run_id = int(runs.iloc[0]["run_id"])
    # the click switched to the Upload & predict page, which shows the live run
    assert any(f"run {run_id}" in m.value for m in at.markdown)

    # crash: kill the worker once it has made progress (checkpoints exist)
    run = _wait_run(project, run_id, lambda r: r.status != "queued" and (r.progress > 0.05 or r.status != "running"))
    if run.status == "running":
        os.kill(int(run.worker_pid), signal.SIGKILL)
        _wait_run(project, run_id, lambda r: not _alive(r.worker_pid), 30)
        at.run()  # the page notices the dead worker and offers to resume
        assert project.get_run(run_id).status == "interrupted"
        at.button(key=f"resume_{run_id}").click().run()
        assert not at.exception
    run = _wait_run(project, run_id, lambda r: r.status not in ("queued", "running"))
    assert run.status == "finished", run.error
    assert run.n_cells > 100

    # reruns never restart a finished run; the page offers the map instead
    at.run()
    at.switch_page("pages/home.py").run()
    assert len(project.list_runs()) == 1
    assert [b for b in at.button if b.label == "Open the demo gene map"]
    assert not [b for b in at.button if b.label == "Run the demo"]

    at.switch_page("pages/gene_maps.py").run()
    assert not at.exception, [e.value for e in at.exception]
    spec = deck_specs(at)[0]
    cells = spec["layers"][-1]
    assert cells["@@type"] == "ScatterplotLayer" and len(cells["data"]) == run.n_cells
    xs = np.array([d["x"] for d in cells["data"]])
    assert 0 <= xs.min() and xs.max() <= 2220 * 0.4991  # µm, inside the slide
    at.switch_page("pages/cell_types.py").run()
    assert not at.exception, [e.value for e in at.exception]
    comp = plotly_specs(at)[0]
    total_cells = sum(arr(t["customdata"]).sum() for t in comp["data"])
    assert total_cells == run.n_cells


def _alive(pid) -> bool:
    import os

    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); check its state
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_upload_page_warns_when_the_model_needs_the_learned_segmenter(projects, tmp_path, monkeypatch):
    """A model that reads nucleus-type probabilities: choosing the classical segmenter is flagged before any run."""
    from testkit import make_tiny_ghist

    bundled = tmp_path / "weights"
    make_tiny_ghist(bundled, cell_inputs=("prob_other", "prob_inflammatory", "prob_epithelial", "prob_spindle-shaped"))
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(bundled))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    at = open_page("pages/upload.py")
    assert not [w for w in at.warning if "learned segmenter" in w.value]
    at.radio(key="upload_segmenter").set_value("classical").run()
    assert not at.exception
    assert [w for w in at.warning if "learned segmenter" in w.value]
    at.radio(key="upload_segmenter").set_value("auto").run()
    assert not [w for w in at.warning if "learned segmenter" in w.value]


def test_upload_page_offers_each_bundled_segmenter_and_says_what_auto_runs(projects):
    """The bundled GHIST model was trained on nuclei-seg-stain's nucleus types: "auto" says it runs
    nuclei-seg-stain, both learned models are offered by name, and choosing the other one says what changes."""
    at = open_page("pages/upload.py")
    radio = at.radio(key="upload_segmenter")
    assert list(radio.options) == ["auto (nuclei-seg-stain)", "learned nuclei-seg", "learned nuclei-seg-stain (stain-robust)",
                                   "fast classical"] or list(radio.options) == [
        "auto (nuclei-seg-stain)", "learned nuclei-seg-stain (stain-robust)", "learned nuclei-seg", "fast classical"]
    assert not [i for i in at.info if "trained on the nucleus types" in i.value]
    radio.set_value("nuclei-seg").run()
    assert not at.exception
    note = [i.value for i in at.info if "trained on the nucleus types of nuclei-seg-stain" in i.value]
    assert note and "less well on slides from other labs" in note[0]  # nuclei-seg is not the stain-robust one
    at.radio(key="upload_segmenter").set_value("nuclei-seg-stain").run()
    assert not [i for i in at.info if "trained on the nucleus types" in i.value]


def test_models_page_shows_the_bundled_cards_own_fields(projects, tmp_path, monkeypatch):
    """The bundled cards name their data, licence and a segmenter's nucleus types under their own keys
    (data / training, licence_note, type_names): the page showed 'Cell types 0' and no training data."""
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR

    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(BUNDLED_WEIGHTS_DIR))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    at = open_page("pages/models.py")
    assert not at.exception
    shown = {m.label: [] for m in at.metric}
    for m in at.metric:
        shown[m.label].append(m.value)
    seg_types = len(json.loads((BUNDLED_WEIGHTS_DIR / "nuclei-seg-stain.json").read_text())["type_names"])
    assert str(seg_types) in shown["Cell types"] and "0" not in shown["Cell types"]
    bold = [m.value for m in at.markdown]
    assert bold.count("**Training data**") == 3 and "**Licence**" in bold
