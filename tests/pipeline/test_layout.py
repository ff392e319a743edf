"""The result AnnData contract (ghist_core._keys) as the pipeline writes and reads it.

Real slides, real (tiny) models, real SQLite project; the old-layout file in ``data/`` was
written by the previous version (``prob_<type>`` / ``nbhd_<type>`` in ``obs``, no ``uns["spatial"]``).
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from ghist_core import _keys as K
from ghist_core.io.hashing import sha256_file
from ghist_core.pipeline.blocks import PipelineConfig, library_id_for, load_prediction, predict_slide
from ghist_core.project.store import Project

DATA = Path(__file__).parent / "data"
OLD_LAYOUT = DATA / "prediction_prob_nbhd_in_obs.h5ad"


class _CountingSha256:
    """hashlib.sha256 stand-in that records how many bytes each hasher consumed."""

    made: list["_CountingSha256"] = []
    _real = hashlib.sha256

    def __init__(self, data: bytes = b"", **kw) -> None:
        self._h = self._real(data, **kw)
        self.n_bytes = len(data)
        self.made.append(self)

    def update(self, data) -> None:
        self.n_bytes += len(data)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def digest(self) -> bytes:
        return self._h.digest()

    def copy(self):
        return self._h.copy()


@pytest.fixture(scope="module")
def crop_png(tmp_path_factory, demo_slide: Path) -> Path:
    """A 320 px square (160 µm at 0.499 µm/px), tissue-rich crop of the demo slide."""
    from PIL import Image

    from ghist_core.io.slide import open_slide

    out = tmp_path_factory.mktemp("layout_slide") / "crop.png"
    with open_slide(demo_slide) as s:
        Image.fromarray(s.read_region((700, 1300), 0, (320, 320))).save(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, crop_png: Path, tiny_ghist: Path):
    """The crop predicted in 1 block and in several (64 µm) blocks, counting whole-slide hashes during each run."""
    from ghist_core.model import load_ghist
    from ghist_core.segmentation import load_segmenter

    model = load_ghist(path=tiny_ghist / "ghist-her2st.safetensors", device="cpu")
    segmenter = load_segmenter(kind="classical")
    project = Project.create(tmp_path_factory.mktemp("layout") / "proj")
    slide_bytes = crop_png.stat().st_size
    out = {}
    for name, block_um in (("one", 512.0), ("many", 64.0)):
        record = project.add_slide(crop_png, patient_id=f"P-{name}", mpp=0.499)
        _CountingSha256.made.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hashlib, "sha256", _CountingSha256)
            result = predict_slide(record.slide_id, project, device="cpu", model=model, segmenter=segmenter,
                                   config=PipelineConfig(block_um=block_um, grid_sizes_um=(25.0, 100.0)))
            whole_slide_hashes = sum(h.n_bytes == slide_bytes for h in _CountingSha256.made)
            sha256_file(crop_png)  # the counter sees a whole-file hash (so it would see one per block)
            assert sum(h.n_bytes == slide_bytes for h in _CountingSha256.made) == whole_slide_hashes + 1
        n_blocks = len(list(project.run_dir(result.run_id).glob("blocks/*.h5ad")))
        out[name] = (project, record, result, whole_slide_hashes, n_blocks)
    return out


def test_slide_is_hashed_once_not_per_block(runs) -> None:
    """#18.1: the store hashed the slide when it was added; predicting it reads the file no more times,
    whatever the number of blocks, and the result still names the slide's sha256."""
    (_, rec1, res1, hashes_one, blocks_one), (_, rec9, res9, hashes_many, blocks_many) = runs["one"], runs["many"]
    assert blocks_one == 1 and blocks_many > 3
    assert hashes_one == hashes_many == 0
    for rec, res in ((rec1, res1), (rec9, res9)):
        assert ad.read_h5ad(res.h5ad_path).uns["ghist"]["slide_sha256"] == rec.sha256 != ""


def test_result_layout_matrices_in_obsm_and_spatial_image(runs) -> None:
    project, record, result, _, _ = runs["many"]
    a = ad.read_h5ad(result.h5ad_path)
    types = ["Malignant", "T", "Fibroblast"]
    assert a.n_obs == result.n_cells > 20
    assert not [c for c in a.obs.columns if c.startswith(("prob_", "nbhd_"))]
    probs, nbhd = K.type_probabilities(a), K.neighbourhood_composition(a)
    assert list(probs.columns) == list(nbhd.columns) == types and list(probs.index) == list(a.obs_names)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(nbhd.sum(1), 1.0, atol=1e-4)
    assert (a.obs["cell_type"].astype(str).to_numpy() == np.asarray(types)[probs.to_numpy().argmax(1)]).all()
    assert K.nucleus_rays(a).shape == (a.n_obs, 16) and (K.nucleus_rays(a) > 0).all()
    assert list(a.obs_names) == [f"cell_{i}" for i in a.obs["cell_id"]]
    # scanpy's spatial image: hires pixels per µm, since obsm["spatial"] is in µm
    lib = library_id_for(record.slide_id)
    spatial = a.uns["spatial"][lib]
    img = spatial["images"]["hires"]
    s = spatial["scalefactors"]["tissue_hires_scalef"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert s == pytest.approx(img.shape[1] / (320 * 0.499), rel=1e-6)
    assert 3.0 < spatial["scalefactors"]["spot_diameter_fullres"] < 20.0  # a nucleus, in µm
    # the overlay is right: nuclei (dark) sit under the cell centroids, darker than the image as a whole
    px = np.clip(np.round(a.obsm["spatial"] * s).astype(int), 0, np.array(img.shape[1::-1]) - 1)
    under_cells = img[px[:, 1], px[:, 0]].astype(float).mean()
    assert under_cells < img.astype(float).mean() - 15


def test_scanpy_spatial_plot_overlays_the_hires_image(runs) -> None:
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    _, record, result, _, _ = runs["one"]
    a = ad.read_h5ad(result.h5ad_path)
    lib = library_id_for(record.slide_id)
    with warnings.catch_warnings():  # scanpy points to squidpy for this plot; it still draws it
        warnings.simplefilter("ignore", FutureWarning)
        ax = sc.pl.spatial(a, img_key="hires", library_id=lib, color="ERBB2", show=False)[0]
    img = a.uns["spatial"][lib]["images"]["hires"]
    h, w = img.shape[:2]
    x0, x1 = ax.get_xlim()
    y1, y0 = ax.get_ylim()  # y points down
    xy = a.obsm["spatial"] * a.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"]
    # the H&E is drawn, the axes are in hires pixels (scanpy crops to the cells plus a margin)
    assert len(ax.images) == 1
    assert -0.1 * w <= x0 <= xy[:, 0].min() and xy[:, 0].max() <= x1 <= 1.1 * w
    assert -0.1 * h <= y0 <= xy[:, 1].min() and xy[:, 1].max() <= y1 <= 1.1 * h


def test_load_prediction_upgrades_a_result_of_the_previous_layout(tmp_path, demo_slide: Path) -> None:
    old = ad.read_h5ad(OLD_LAYOUT)
    prob_cols = [c for c in old.obs.columns if c.startswith("prob_")]
    nbhd_cols = [c for c in old.obs.columns if c.startswith("nbhd_")]
    assert len(prob_cols) == len(nbhd_cols) == 9 and "spatial" not in old.uns  # the file really is the old layout
    project = Project.create(tmp_path / "proj")
    record = project.add_slide(demo_slide, patient_id="DEMO-01")
    run_id = project.start_run(record.slide_id, model_id="bundled", weights_sha256="", device="cpu", params={})
    target = tmp_path / "proj" / "results" / "old.h5ad"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(OLD_LAYOUT, target)
    project.add_result_file(run_id, "h5ad", target)
    project.finish_run(run_id, n_cells=old.n_obs)

    a = load_prediction(project, record.slide_id)
    assert not [c for c in a.obs.columns if c.startswith(("prob_", "nbhd_"))]
    np.testing.assert_array_equal(a.obsm["cell_type_probabilities"], old.obs[prob_cols].to_numpy(np.float32))
    np.testing.assert_array_equal(a.obsm["neighbourhood_composition"], old.obs[nbhd_cols].to_numpy(np.float32))
    assert list(K.type_probabilities(a).columns) == [c[len("prob_"):] for c in prob_cols]
    assert list(K.neighbourhood_composition(a).columns) == [c[len("nbhd_"):] for c in nbhd_cols]
    np.testing.assert_array_equal(a.X, old.X)
    np.testing.assert_array_equal(a.obsm["spatial"], old.obsm["spatial"])
    assert (a.obs["cell_type"] == old.obs["cell_type"]).all()
    img = a.uns["spatial"][library_id_for(record.slide_id)]["images"]["hires"]
    assert max(img.shape[:2]) == 2000 and img.dtype == np.uint8
    # the accessors read the old layout directly too
    np.testing.assert_array_equal(K.type_probabilities(old).to_numpy(), a.obsm["cell_type_probabilities"])
