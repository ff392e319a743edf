"""End-to-end pipeline: real slide, real segmenter, real (tiny) GHIST network, real store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import anndata as ad
import numpy as np
import pytest

from ghist_core.errors import NoTissueError, StoreError

from ghist_core.pipeline.blocks import PipelineConfig, load_grid, load_prediction, predict_slide
from ghist_core.project.store import Project

SMALL = PipelineConfig(block_um=128.0, grid_sizes_um=(25.0, 100.0))


def _project_with_slide(tmp_path, png, name="proj"):
    project = Project.create(tmp_path / name)
    record = project.add_slide(png, patient_id="P-001", mpp=0.499)
    return project, record


def test_predict_slide_writes_h5ad_grid_and_records_the_run(tmp_path, small_slide_png, tiny_ghist):
    project, record = _project_with_slide(tmp_path, small_slide_png)
    events = []
    result = predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical",
                           device="cpu", config=SMALL, progress=events.append)
    assert result.n_cells > 20
    adata = ad.read_h5ad(result.h5ad_path)
    assert adata.n_obs == result.n_cells and list(adata.var_names) == ["ERBB2", "ESR1", "CD3E", "KRT5", "MKI67"]
    assert np.isfinite(adata.X).all() and (adata.X >= 0).all()
    xy = adata.obsm["spatial"]
    assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= 700 * 0.499 and xy[:, 1].max() <= 700 * 0.499
    assert adata.obs["cell_id"].is_unique
    assert {"cell_type", "area_um2"} <= set(adata.obs.columns)
    meta = adata.uns["ghist"]
    assert meta["slide_sha256"] == record.sha256 and len(meta["weights_sha256"]) == 64
    assert meta["timings"]["total_s"] > 0
    assert "expression_units" in meta
    assert "nucleus_scale" not in meta and "nucleus_scale" not in adata.obs  # the classical segmenter has no scale check
    # the store knows about it, and the loaders find it
    run = project.get_run(result.run_id)
    assert run.status == "finished" and run.n_cells == result.n_cells
    assert set(project.result_files(result.run_id)) == {"h5ad", "grid"}
    assert load_prediction(project, record.slide_id).n_obs == result.n_cells
    grids = load_grid(project, record.slide_id)
    assert grids[100.0].obs["n_cells"].sum() == result.n_cells
    # progress reached the end, monotonically
    overall = [e.overall for e in events]
    assert overall[-1] == 1.0 and all(b >= a - 1e-9 for a, b in zip(overall, overall[1:]))
    assert {e.stage for e in events} >= {"open", "segment+predict", "write"}


def test_model_reading_nucleus_types_needs_the_learned_segmenter(tmp_path, small_slide_png):
    """A model that reads the learned segmenter's per-nucleus type probabilities: with the classical
    segmenter the run is refused before it starts (clear message); with the learned one it runs."""
    from testkit import make_tiny_ghist

    from ghist_core.errors import ModelInputError

    names = ("prob_other", "prob_inflammatory", "prob_epithelial", "prob_spindle-shaped")
    model_dir = tmp_path / "typed_model"
    make_tiny_ghist(model_dir, cell_inputs=names, tissue_skip=True)
    project, record = _project_with_slide(tmp_path, small_slide_png)
    with pytest.raises(ModelInputError, match="learned segmenter"):
        predict_slide(record.slide_id, project, model_id=str(model_dir), segmenter_id="classical", device="cpu",
                      config=SMALL)
    assert project.latest_run(record.slide_id) is None  # nothing was started, nothing to clean up
    result = predict_slide(record.slide_id, project, model_id=str(model_dir), device="cpu", config=SMALL)
    adata = ad.read_h5ad(result.h5ad_path)
    assert adata.n_obs == result.n_cells > 20 and np.isfinite(adata.X).all()
    assert list(adata.uns["ghist"]["model_card"]["config"]["cell_inputs"]) == list(names)
    # the learned segmenter's scale check: on by default, recorded per cell and for the run
    scale = adata.uns["ghist"]["nucleus_scale"]
    assert scale["setting"] == "auto" and scale["rule"]["factors"][0] == 1.0
    assert scale["cells_rescaled_fraction"] == pytest.approx(float((adata.obs["nucleus_scale"] != 1.0).mean()))
    # "auto" (no segmenter named): the default learned segmenter for a card that names none ...
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR, DEFAULT_SEGMENTER

    def sha(name):
        return json.loads((BUNDLED_WEIGHTS_DIR / f"{name}.json").read_text())["sha256"]

    assert adata.uns["ghist"]["segmenter_sha256"] == sha(DEFAULT_SEGMENTER)
    # ... and the segmenter whose types the model was trained on when its card names one
    from ghist_core.weights.card import seal_card

    card_path = next(model_dir.glob("*.json"))
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps(seal_card({**card, "segmenter": "nuclei-seg"}, card["sha256"])))
    pinned = predict_slide(record.slide_id, project, model_id=str(model_dir), device="cpu", config=SMALL)
    assert ad.read_h5ad(pinned.h5ad_path).uns["ghist"]["segmenter_sha256"] == sha("nuclei-seg") != sha(DEFAULT_SEGMENTER)


def test_blank_slide_fails_cleanly_and_is_recorded(tmp_path, tiny_ghist):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 400), (245, 245, 245)).save(blank)
    project, record = _project_with_slide(tmp_path, blank)
    with pytest.raises(NoTissueError):
        predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu", config=SMALL)
    run = project.latest_run(record.slide_id)
    assert run.status == "failed" and "tissue" in run.error.lower()
    assert not list((project.folder / "results").rglob("*.h5ad")) if (project.folder / "results").exists() else True
    with pytest.raises(StoreError):
        load_prediction(project, record.slide_id)


def test_killed_worker_resumes_to_identical_output(tmp_path, small_slide_png, tiny_ghist):
    project, record = _project_with_slide(tmp_path, small_slide_png)
    # reference: an uninterrupted run in this process
    ref = predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu", config=SMALL)
    # a worker process, killed once it has checkpointed some blocks
    run_id = project.start_run(record.slide_id, model_id=str(tiny_ghist), weights_sha256="", device="cpu",
                               params={"pipeline": asdict(SMALL)}, status="queued")
    worker = subprocess.Popen([sys.executable, "-m", "ghist_core.pipeline.worker", str(project.folder), str(record.slide_id), str(run_id),
                               "--device", "cpu", "--model", str(tiny_ghist), "--segmenter", "classical"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = project.run_dir(run_id) / "blocks"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(blocks.glob("*.h5ad"))) < 2 and worker.poll() is None:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    n_before = len(list(blocks.glob("*.h5ad")))
    assert n_before >= 1
    assert project.mark_interrupted_runs(stale_after_s=0) == [run_id] or project.get_run(run_id).status == "finished"
    if project.get_run(run_id).status != "finished":
        res = predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu",
                            config=SMALL, run_id=run_id)
        path = res.h5ad_path
    else:  # the worker finished before the kill landed; still compare
        path = project.result_files(run_id)["h5ad"]
    a, b = ad.read_h5ad(ref.h5ad_path), ad.read_h5ad(path)
    assert a.n_obs == b.n_obs
    np.testing.assert_array_equal(a.obs["cell_id"].to_numpy(), b.obs["cell_id"].to_numpy())
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    assert not list(project.folder.rglob("*.part"))


def test_large_looking_nuclei_are_segmented_at_a_smaller_scale_and_the_run_says_so(tmp_path, small_slide_png):
    """The demo tissue enlarged 2x but stated at the original µm/px (nuclei look twice their size, as
    large tumour nuclei or a wrong µm/px make them look): the app's run segments them at 2/3,
    records the factor per cell and the share in uns, and the page's note says what to check. The
    same slide with the check turned off (nucleus_scale 1.0) cuts them into more pieces."""
    from PIL import Image
    from testkit import make_tiny_ghist

    from ghist_core.segmentation.model import SCALE_FACTORS
    from ghist_core.viz.figures import nucleus_scale_note

    big = tmp_path / "enlarged.png"
    with Image.open(small_slide_png) as im:
        im.convert("RGB").resize((im.width * 2, im.height * 2), Image.Resampling.BILINEAR).save(big)
    model_dir = tmp_path / "typed_model"
    make_tiny_ghist(model_dir, cell_inputs=("prob_other", "prob_inflammatory", "prob_epithelial",
                                            "prob_spindle-shaped"), tissue_skip=True)
    project, record = _project_with_slide(tmp_path, big)
    config = PipelineConfig(block_um=256.0, grid_sizes_um=(100.0,))
    auto = ad.read_h5ad(predict_slide(record.slide_id, project, model_id=str(model_dir), device="cpu",
                                      config=config).h5ad_path)
    moved = auto.obs["nucleus_scale"].to_numpy() != 1.0
    assert moved.mean() > 0.5 and np.allclose(auto.obs["nucleus_scale"].to_numpy()[moved], SCALE_FACTORS[1])
    assert auto.uns["ghist"]["nucleus_scale"]["cells_rescaled_fraction"] == pytest.approx(float(moved.mean()), abs=1e-4)
    note = nucleus_scale_note(auto)
    assert note is not None and "0.67× scale" in note and "µm per pixel" in note
    plain = ad.read_h5ad(predict_slide(record.slide_id, project, model_id=str(model_dir), device="cpu",
                                       config=PipelineConfig(block_um=256.0, grid_sizes_um=(100.0,),
                                                             nucleus_scale=1.0)).h5ad_path)
    assert (plain.obs["nucleus_scale"] == 1.0).all() and nucleus_scale_note(plain) is None
    record_plain = plain.uns["ghist"]["nucleus_scale"]
    assert record_plain["setting"] == 1.0 and record_plain["cells_rescaled_fraction"] == 0.0
    assert plain.n_obs > auto.n_obs
