"""``.h5ad`` export: opens in anndata with obsm matrices and an H&E image scanpy can draw under the cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from ghist_core import _keys as K
from ghist_core.errors import ExportError
from ghist_core.export import export_slide, prepare_h5ad
from ghist_core.project.store import Project


@pytest.fixture(scope="module")
def exported(predicted_project, tmp_path_factory):
    folder, slide_id = predicted_project
    out = tmp_path_factory.mktemp("h5ad") / "slide.h5ad"
    with Project.open(folder) as project:
        export_slide(project, slide_id, "h5ad", out)
    return out


def test_h5ad_opens_in_anndata_with_spatial_image_and_obsm_probabilities(exported, prediction):
    a = ad.read_h5ad(exported)
    assert a.shape == prediction.shape
    np.testing.assert_allclose(a.X, prediction.X)
    probs = a.obsm[K.OBSM_TYPE_PROBABILITIES]
    assert probs.shape == (a.n_obs, len(K.type_probabilities(prediction).columns))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert not any(str(c).startswith(K.LEGACY_PROB_PREFIX) for c in a.obs.columns)
    (lib, spatial), = a.uns[K.UNS_SPATIAL].items()
    img = spatial["images"][K.SPATIAL_IMAGE]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    scale = spatial["scalefactors"][K.SCALEF_HIRES]
    # the overview spans the slide: 700 px at 0.499 µm/px → obsm (µm) × scale lands inside the image
    assert scale * 700 * 0.499 == pytest.approx(img.shape[1], rel=0.01)
    xy_img = a.obsm["spatial"] * scale
    assert xy_img.min() >= 0 and (xy_img < [img.shape[1], img.shape[0]]).all()
    assert 2.0 < spatial["scalefactors"][K.SPOT_DIAMETER] < 20.0  # a nucleus, in µm


def test_prepare_without_an_image_or_slide_is_refused(prediction):
    bare = prediction.copy()
    bare.uns.pop(K.UNS_SPATIAL, None)
    with pytest.raises(ExportError, match="overview"):
        prepare_h5ad(bare)
    ready = prepare_h5ad(bare, overview=lambda: (np.zeros((10, 12, 3), np.uint8), 0.1))
    assert K.UNS_SPATIAL not in bare.uns  # the input is left alone
    assert ready.uns[K.UNS_SPATIAL][f"slide_{bare.uns['ghist']['slide_id']}"]["scalefactors"][K.SCALEF_HIRES] == 0.1


def test_scanpy_draws_a_gene_over_the_he(exported):
    sc = pytest.importorskip("scanpy", reason="scanpy is not installed (pip install scanpy)")
    import matplotlib

    matplotlib.use("Agg")
    a = ad.read_h5ad(exported)
    (lib,) = a.uns["spatial"]
    ax = sc.pl.spatial(a, img_key="hires", library_id=lib, color="ERBB2", show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    assert ax.images, "the H&E image was not drawn"
    assert ax.collections, "the cells were not drawn"
