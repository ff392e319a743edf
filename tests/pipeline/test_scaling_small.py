"""The scaling benchmark's synthetic 40× slide (bench/pipeline.py ``make_gigapixel_tiff``), small: a real
tiled pyramidal TIFF that OpenSlide opens as a generic TIFF with the same pyramid our reader sees."""

from __future__ import annotations

import pytest

from testkit import load_repo_script


def _bench_pipeline():
    return load_repo_script("bench/pipeline.py")


def test_synthetic_pyramid_opens_through_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    from ghist_core.io.slide import open_slide

    path = _bench_pipeline().make_gigapixel_tiff(tmp_path / "s.tif", 0.005)  # 2048² px at 0.25 µm/px, 2 levels
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as o, open_slide(path) as s:
        assert o.dimensions == tuple(s.dimensions) == (2048, 2048)
        assert o.level_count == s.level_count == 2  # the reduced level is visible to OpenSlide too
        assert o.level_downsamples == pytest.approx(s.level_downsamples)
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.25) == s.mpp
        region = o.read_region((1024, 1024), 1, (256, 256)).convert("RGB")
        assert region.size == (256, 256) and min(region.getextrema()[0]) < 200  # tissue, not blank


def test_the_classical_baseline_runs_the_models_timing_twin(tmp_path, monkeypatch, demo_slide):
    """The bundled model refuses the classical segmenter's cells (it reads the learned one's types), so
    the bench's classical baseline runs a twin without cell inputs; it must really predict."""
    import json

    from ghist_core.pipeline.blocks import predict_slide
    from ghist_core.project.store import Project
    from slide_factory import demo_crop_png

    bench = _bench_pipeline()
    monkeypatch.setattr(bench, "SCALING_WORK", tmp_path / "scaling")
    assert bench._model_for(None) is None and bench._model_for("nuclei-seg") is None
    twin = bench._model_for("classical")
    card = json.loads((tmp_path / "scaling").joinpath(twin.rsplit("/", 1)[-1], "ghist-her2st.json").read_text())
    assert card["config"]["cell_inputs"] == []
    project = Project.create(tmp_path / "p")
    sid = project.add_slide(demo_crop_png(tmp_path / "c.png", demo_slide, (600, 1000), 400), mpp=0.499).slide_id
    result = predict_slide(sid, project, model_id=twin, segmenter_id="classical", device="cpu")
    assert result.n_cells > 10
