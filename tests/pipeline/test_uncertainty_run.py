"""The whole-slide pipeline with ``uncertainty``: the column survives checkpoints, merge and grid; old runs resume."""

from __future__ import annotations

import threading
from dataclasses import asdict, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ghist_core import _keys as K
from ghist_core.errors import RunCancelledError
from ghist_core.pipeline.blocks import PipelineConfig, load_grid, predict_slide
from ghist_core.project.store import Project

SMALL = PipelineConfig(block_um=128.0, grid_sizes_um=(25.0, 100.0))
UNC = K.OBS_EXPRESSION_UNCERTAINTY


@pytest.fixture(scope="module")
def ensemble(tiny_ensemble: Path) -> Path:
    return tiny_ensemble


def _project(tmp_path: Path, png: Path, name: str) -> tuple[Project, int]:
    project = Project.create(tmp_path / name)
    return project, project.add_slide(png, patient_id="P-001", mpp=0.499).slide_id


def _cancel_after_first_block(project: Project, slide_id: int, model: Path, params: dict) -> int:
    """A run recorded with ``params`` and stopped after one block (its checkpoint kept)."""
    run_id = project.start_run(slide_id, model_id=str(model), weights_sha256="", device="cpu", params=params,
                               status="queued")
    cancel = threading.Event()

    def progress(event) -> None:
        if event.stage == "segment+predict" and event.fraction > 0:
            cancel.set()

    with pytest.raises(RunCancelledError):
        predict_slide(slide_id, project, model_id=str(model), segmenter_id="classical", device="cpu",
                      run_id=run_id, progress=progress, cancel=cancel)
    assert len(list((project.run_dir(run_id) / "blocks").glob("block_*.h5ad"))) >= 1
    return run_id


def test_uncertainty_reaches_the_merged_result_and_old_runs_resume(tmp_path, small_slide_png, ensemble):
    project, slide_id = _project(tmp_path, small_slide_png, "fresh")
    res = predict_slide(slide_id, project, model_id=str(ensemble), segmenter_id="classical", device="cpu",
                        config=replace(SMALL, uncertainty=True))
    a = ad.read_h5ad(res.h5ad_path)
    assert a.n_obs == res.n_cells > 20
    u = a.obs[UNC].to_numpy()
    assert u.dtype == np.float32 and np.isfinite(u).all() and (u >= 0).all() and (u > 0).any()
    g = a.uns["ghist"]
    assert g["params"]["pipeline"]["uncertainty"] is True and "3 ensemble members" in g[K.GHIST_UNCERTAINTY]
    # every block's cells carry their own value: the merged column equals each checkpoint's, in order
    blocks = sorted((project.run_dir(res.run_id) / "blocks").glob("block_*.h5ad"))
    parts = [b for b in (ad.read_h5ad(p) for p in blocks) if b.n_obs]
    assert len(parts) > 1
    np.testing.assert_array_equal(u, np.concatenate([b.obs[UNC].to_numpy() for b in parts]))
    # the grid squares hold the mean of their cells' uncertainty
    grid = load_grid(project, slide_id)[100.0]
    n = grid.obs["n_cells"].to_numpy()
    assert np.average(grid.obs[UNC].to_numpy(), weights=n) == pytest.approx(float(u.mean()), rel=1e-5)

    # an old run (recorded before the setting existed) resumes from its checkpoints, without the column
    old = {k: v for k, v in asdict(SMALL).items() if k != "uncertainty"}
    project2, slide2 = _project(tmp_path, small_slide_png, "old")
    run_id = _cancel_after_first_block(project2, slide2, ensemble, {"pipeline": old, "model_id": str(ensemble),
                                                                    "segmenter_id": "classical"})
    done = predict_slide(slide2, project2, model_id=str(ensemble), segmenter_id="classical", device="cpu", run_id=run_id)
    b = ad.read_h5ad(done.h5ad_path)
    assert UNC not in b.obs and K.GHIST_UNCERTAINTY not in b.uns["ghist"]
    assert b.uns["ghist"]["params"]["pipeline"]["uncertainty"] is False
    np.testing.assert_array_equal(b.X, a.X)  # X is member 0's with or without the option

    # resumed with the setting switched on: the blocks disagree, so the merge keeps no half-empty column
    project3, slide3 = _project(tmp_path, small_slide_png, "switched")
    run_id = _cancel_after_first_block(project3, slide3, ensemble, {"pipeline": asdict(SMALL), "model_id": str(ensemble),
                                                                    "segmenter_id": "classical"})
    mixed = predict_slide(slide3, project3, model_id=str(ensemble), segmenter_id="classical", device="cpu",
                          run_id=run_id, config=replace(SMALL, uncertainty=True))
    c = ad.read_h5ad(mixed.h5ad_path)
    assert UNC not in c.obs and c.uns["ghist"][K.GHIST_UNCERTAINTY].startswith("unavailable: some of this run's blocks")
    assert UNC not in load_grid(project3, slide3)[100.0].obs
    np.testing.assert_array_equal(c.X, a.X)
