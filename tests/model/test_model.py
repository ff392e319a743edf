"""GHIST model: training on generated data, the reference, weights round trip, slide prediction."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ghist_core._keys import neighbourhood_composition, type_probabilities
from ghist_core.errors import ModelInputError, UnknownGeneError, WeightsIntegrityError
from ghist_core.model import GhistConfig, GhistNet, load_ghist
from ghist_core.model.predict import GhistModel, save_ghist
from ghist_core.training.reference import CELL_TYPES, ReferenceProfiles, fit_gene_profiles, load_reference, nnls_deconvolve
from ghist_core.training.ghist import (
    PatchData, Trainer, TrainConfig, make_synthetic_cells, pearson_per_gene, predict_spots,
)
from ghist_core.io.hashing import sha256_file
from ghist_core.paths import BUNDLED_WEIGHTS_DIR
from ghist_core.segmentation import ArraySlide, MppWarning

TINY = dict(patch_px=64, widths=(8, 16, 32, 32), fpn_dim=16, embed_dim=32, dropout=0.0)


def _tiny_net(n_genes: int = 6, n_types: int = 3, **kw) -> GhistNet:
    cfg = GhistConfig(genes=[f"g{i}" for i in range(n_genes)], cell_types=[f"t{i}" for i in range(n_types)],
                      **{**TINY, **kw})
    torch.manual_seed(0)
    return GhistNet(cfg)


def _cell_corr(net: GhistNet, data: PatchData) -> float:
    net.eval()
    with torch.no_grad():
        o = net(data.images, data.instances)
    tgt = data.lut_expr[o["cell_batch"], o["cell_label"]]
    return float(pearson_per_gene(torch.log1p(o["expr"]), torch.log1p(tgt)).mean())


def test_cell_level_training_learns_colour_function(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data, _ = make_synthetic_cells(n_patches=16, size=64, seed=1)
    net = _tiny_net(use_reference=False)
    before = _cell_corr(net, data)
    cfg = TrainConfig(mode="cell", epochs=30, batch_size=8, lr=1e-2, augment=False,
                      checkpoint_dir=str(tmp_path / "ck"), log_path=str(tmp_path / "log.jsonl"))
    (tmp_path / "ck").mkdir()
    tr = Trainer(cfg, log=None)
    tr.fit(net, data)
    after = _cell_corr(net, data)
    losses = [h["loss"] for h in tr.history_]
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:2])
    assert after > before + 0.25 and after > 0.3
    # checkpoints and logs every epoch; resuming a finished run trains no further epochs
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 30
    state = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert state["epoch"] == 30
    tr2 = Trainer(cfg, log=None)
    tr2.fit(_tiny_net(use_reference=False), data)
    assert len(tr2.history_) == 30 and len((tmp_path / "log.jsonl").read_text().splitlines()) == 30


@pytest.mark.parametrize("aggregate,tissue_skip", [("sum", False), ("mean", True)])
def test_spot_level_weak_training_loss_falls(aggregate: str, tissue_skip: bool) -> None:
    """Only the sum (or mean) over each patch's cells is seen; the per-cell model must still fit it."""
    torch.set_num_threads(1)
    data, _ = make_synthetic_cells(n_patches=16, size=64, seed=2)
    in_spot = data.lut_morph_ok.clone()  # every nucleus of the patch
    total = (data.lut_expr * in_spot.unsqueeze(-1)).sum(1)
    n = in_spot.sum(1, keepdim=True).clamp(min=1)
    spot = torch.log1p(total if aggregate == "sum" else total / n)
    data.spot_target = spot
    data.fractions = torch.full((len(data), 3), 1 / 3)
    data.lut_in_spot = in_spot
    net = _tiny_net(spot_aggregate=aggregate, tissue_skip=tissue_skip)
    pred0 = predict_spots(net, data, batch_size=8, tta=False)
    tr = Trainer(TrainConfig(mode="spot", epochs=15, batch_size=8, lr=5e-3, augment=True), log=None)
    tr.fit(net, data)
    pred1 = predict_spots(net, data, batch_size=8, tta=True)
    err0 = float(((pred0 - spot.numpy()) ** 2).mean())
    err1 = float(((pred1 - spot.numpy()) ** 2).mean())
    assert tr.history_[-1]["expr"] < 0.5 * tr.history_[0]["expr"]
    assert err1 < 0.5 * err0
    assert np.isfinite(pred1).all()
    if tissue_skip:  # the patch path learnt something (it starts at zero)
        assert float(net.tissue_head[-1].weight.detach().abs().sum()) > 0


def test_reference_profiles_and_nnls_recover_known_mixtures(shared_data: Path) -> None:
    ref = load_reference(shared_data / "ghist_demo")
    assert ref.cell_types == list(CELL_TYPES) and ref.profiles.shape == (9, 280)
    assert int(ref.n_cells.sum()) == 5508
    # marker sanity: ERBB2 highest in malignant, CD3E in T cells (as the data README states)
    assert CELL_TYPES[int(ref.profiles[:, ref.genes.index("ERBB2")].argmax())] == "Malignant"
    assert CELL_TYPES[int(ref.profiles[:, ref.genes.index("CD3E")].argmax())] == "T"
    rng = np.random.default_rng(0)
    frac = rng.dirichlet(np.ones(9) * 0.7, size=40)
    counts = frac @ (ref.profiles * 20)  # noise-free mixtures of the reference
    est = nnls_deconvolve(counts, ref)
    # library-size normalisation and per-gene rescaling distort the mixture slightly (the estimate is
    # in units of each type's share of the spot profile), so recovery is close, not exact
    assert est.shape == (40, 9) and np.allclose(est.sum(1), 1.0)
    assert np.corrcoef(est.ravel(), frac.ravel())[0, 1] > 0.95
    assert np.abs(est - frac).max() < 0.15
    # an unrelated profile (a shuffled mixture) is recovered far worse: the test can fail
    bad = nnls_deconvolve(counts[:, rng.permutation(counts.shape[1])], ref)
    assert np.corrcoef(bad.ravel(), frac.ravel())[0, 1] < 0.8
    prof = fit_gene_profiles(frac, frac @ ref.profiles[:, :5])
    np.testing.assert_allclose(prof, ref.profiles[:, :5], atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"spot_aggregate": "mean", "tissue_skip": True},
                                     {"spot_aggregate": "mean", "tissue_skip": True, "fpn_smooth": False},
                                     {"spot_aggregate": "mean", "tissue_skip": True, "density_prior": True,
                                      "use_reference": False}])
def test_save_load_round_trip_and_integrity(tmp_path: Path, variant: dict) -> None:
    net = _tiny_net(n_genes=4, n_types=2, **variant).eval()
    if variant:  # make the patch path matter, so a load that dropped it would differ
        torch.nn.init.normal_(net.tissue_head[-1].weight)
    if variant.get("density_prior"):
        torch.nn.init.normal_(net.prior_head.weight)
    wp = save_ghist(net, tmp_path, {"genes": net.cfg.genes, "note": "test"})
    card = json.loads(wp.with_suffix(".json").read_text())
    assert card["kind"] == "ghist" and len(card["sha256"]) == 64 and card["config"]["genes"] == net.cfg.genes
    m = load_ghist(path=wp, device="cpu")
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    inst = torch.zeros(2, 64, 64, dtype=torch.int32)
    inst[0, 5:12, 5:12] = 1
    inst[1, 30:40, 30:38] = 4
    with torch.no_grad():
        a = net(x, inst)["expr"]
        b = m.net(x, inst)["expr"]
    torch.testing.assert_close(a, b)
    assert m.net.cfg.spot_aggregate == variant.get("spot_aggregate", "sum")
    assert ("mean over the cells" in m.provenance({}, {})["expression_units"]) == bool(variant)
    raw = bytearray(wp.read_bytes())
    raw[-1] ^= 0xFF
    wp.write_bytes(bytes(raw))
    with pytest.raises(WeightsIntegrityError):
        load_ghist(path=wp, device="cpu")


# --------------------------------------------------------------------------------------------
# the committed weights on the demo slide
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled() -> GhistModel:
    return load_ghist(device="cpu")


@pytest.fixture(scope="module")
def demo_region(demo_slide: Path):
    """A 160 µm square of the demo slide, its nuclei from the bundled learned segmenter (µm on the slide),
    with the per-nucleus type probabilities a model may read."""
    from ghist_core.segmentation import load_segmenter
    from ghist_core.io.slide import open_slide

    slide = open_slide(demo_slide)
    x0, y0 = 400.0, 500.0  # µm
    rgb = slide.read_region_mpp((x0 / slide.mpp, y0 / slide.mpp), (320, 320), 0.5)
    _, cells = load_segmenter(device="cpu").segment_tile(rgb, 0.5)
    cells["x_um"] += x0
    cells["y_um"] += y0
    cells["cell_id"] = np.arange(len(cells), dtype=np.int64) + 100
    return slide, cells


def test_bundled_weights_predict_on_demo_region(bundled: GhistModel, demo_region) -> None:
    slide, cells = demo_region
    assert len(cells) > 20
    card = json.loads((BUNDLED_WEIGHTS_DIR / "ghist-her2st.json").read_text())
    a = bundled.predict(slide, cells, batch_size=4)
    assert a.shape == (len(cells), len(card["genes"]))
    assert list(a.var_names) == card["genes"]
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all() and (a.X >= 0).all()
    assert a.X.std(0).max() > 0  # cells differ
    probs = type_probabilities(a)
    assert list(probs.columns) == card["cell_types"] and list(probs.index) == list(a.obs_names)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    nb = neighbourhood_composition(a)
    assert list(nb.columns) == card["cell_types"]
    np.testing.assert_allclose(nb.sum(1), 1.0, atol=1e-4)
    assert not [c for c in a.obs.columns if c.startswith(("prob_", "nbhd_"))]  # matrices live in obsm, not obs
    assert set(a.obs["cell_type"].astype(str)) <= set(card["cell_types"])
    assert (a.obs["cell_type"].astype(str).to_numpy() == probs.columns[probs.to_numpy().argmax(1)]).all()
    rays = a.obsm["nucleus_rays_um"]  # the segmentation's star contours reach the result
    np.testing.assert_allclose(rays, cells[[f"ray_{k:02d}" for k in range(16)]].clip(0, 40), rtol=1e-6)
    assert list(a.uns["obsm_columns"]["nucleus_rays_um"]) == [f"ray_{k:02d}" for k in range(16)]
    for c in ("area_um2", "eccentricity", "pred_area_um2", "cell_id"):
        assert c in a.obs
    assert a.obs["cell_id"].tolist() == cells["cell_id"].tolist()
    np.testing.assert_allclose(a.obsm["spatial"], cells[["x_um", "y_um"]].to_numpy())
    u = a.uns["ghist"]
    assert u["weights_sha256"] == card["sha256"] and u["slide_sha256"] == sha256_file(slide.path)
    assert u["model_card"]["mpp"] == card["mpp"] == bundled.mpp and "expression_units" in u
    # tiling and batching do not change results (bounded memory, same answer)
    b = bundled.predict(slide, cells, batch_size=1)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-4, atol=1e-5)
    # a gene subset returns exactly those columns
    sub = bundled.predict(slide, cells.iloc[:10], genes=["ERBB2", card["genes"][0]], slide_sha256="known")
    assert list(sub.var_names) == ["ERBB2", card["genes"][0]]
    assert sub.uns["ghist"]["slide_sha256"] == "known"  # a caller that knows the hash saves a whole-file read


def test_bad_inputs_give_clear_errors(bundled: GhistModel, demo_region) -> None:
    slide, cells = demo_region
    empty = bundled.predict(slide, cells.iloc[:0])
    assert empty.shape == (0, len(bundled.genes)) and list(empty.var_names) == bundled.genes
    assert empty.obsm["cell_type_probabilities"].shape == (0, len(bundled.cell_types))
    assert list(type_probabilities(empty).columns) == bundled.cell_types
    outside = cells.iloc[:5].copy()
    outside.loc[outside.index[0], "x_um"] = 1e7
    with pytest.raises(ModelInputError, match="outside the slide"):
        bundled.predict(slide, outside)
    with pytest.warns(UserWarning, match="outside the slide"):
        kept = bundled.predict(slide, outside, on_outside="drop")
    assert kept.n_obs == 4
    with pytest.raises(UnknownGeneError, match="NOTAGENE"):
        bundled.predict(slide, cells, genes=["ERBB2", "NOTAGENE"])
    with pytest.raises(ModelInputError):
        bundled.predict(slide, pd.DataFrame({"x": [1.0]}))


def test_far_mpp_is_resampled_with_a_warning(bundled: GhistModel) -> None:
    rng = np.random.default_rng(0)
    rgb = np.full((400, 400, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:400, 0:400]
    cen = rng.uniform(30, 370, (12, 2))
    for cx, cy in cen:  # a dozen dark nuclei on pale tissue
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < 14 ** 2] = (80, 40, 120)
    fine = bundled.mpp / 4  # 4× finer than the model reads tissue
    slide = ArraySlide(rgb, fine)
    cells = pd.DataFrame({"x_um": cen[:, 0] * fine, "y_um": cen[:, 1] * fine})
    for k in range(16):
        cells[f"ray_{k:02d}"] = 14 * fine
    for name in bundled.cell_inputs:  # e.g. the learned segmenter's type probabilities
        cells[name] = 1.0 / len(bundled.cell_inputs)
    with pytest.warns(MppWarning):
        a = bundled.predict(slide, cells)
    assert a.n_obs == 12 and np.isfinite(a.X).all() and (a.X >= 0).all()
    with warnings.catch_warnings():  # within 2× (and a 0.499 µm/px scan for a 1 µm/px model) is no warning
        warnings.simplefilter("error", MppWarning)
        for near in (bundled.mpp * 0.8, bundled.mpp / (1.0 / 0.499)):
            bundled.predict(ArraySlide(rgb, near), cells.assign(x_um=cen[:, 0] * near, y_um=cen[:, 1] * near))


def test_spot_pack_coarsened_keeps_nuclei_and_averages_pixels() -> None:
    """Training at 2× the µm/px: pixels are box means, nuclei keep their labels, µm stay µm."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    pack = _pack()
    small, img2 = pack.coarsened(images, 2)
    assert small.mpp == 1.0 and small.instances.shape == (2, 8, 8) and img2.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(img2[0, 0, 0], images[0, :2, :2].reshape(-1, 3).mean(0), atol=0.5)
    assert set(np.unique(small.instances[0])) == {0, 1, 2} and set(np.unique(small.instances[1])) == {0, 3}
    np.testing.assert_allclose(small.cell_xy_px * small.mpp, pack.cell_xy_px * pack.mpp)
    assert pack.coarsened(images, 1)[0] is pack
    with pytest.raises(ValueError):
        pack.coarsened(images, 3)


def _pack(instances: np.ndarray | None = None, cell_spot=(0, 0, 1), cell_label=(1, 2, 3), mpp: float = 0.5, **extra):
    """A SpotPack of a few patches (default: two 16 px patches, three nuclei) with dummy targets."""
    from ghist_core.training.her2st import SpotPack

    if instances is None:
        instances = np.zeros((2, 16, 16), np.uint16)
        instances[0, 2:8, 2:8] = 1
        instances[0, 10:14, 9:15] = 2
        instances[1, 4:12, 4:12] = 3
    s, n = len(instances), len(cell_spot)
    z = np.zeros(s)
    return SpotPack(genes=np.array(["a"]), n_hvg=1, cell_types=np.array(["t"]), mpp=mpp,
                    jpeg_buf=np.zeros(0, np.uint8), jpeg_off=np.zeros(s + 1, np.int64), instances=instances,
                    counts=np.ones((s, 1)), totals=np.ones(s), fractions=np.ones((s, 1)), features=z[:, None],
                    section=np.array(["s"] * s), patient=np.array(["p"] * s), array_xy=np.zeros((s, 2)),
                    cell_spot=np.asarray(cell_spot), cell_label=np.asarray(cell_label),
                    cell_xy_px=np.array([[5.0, 5.0], [12.0, 12.0], [8.0, 8.0]]) if n == 3 else np.zeros((n, 2)),
                    cell_in_spot=np.ones(n, bool), cell_morph=np.zeros((n, 3)), **extra)


def test_spot_pack_cell_inputs_round_trip_and_lookup(tmp_path: Path) -> None:
    """Per-nucleus inputs survive save/load, reach the right (patch, label) and fail clearly when absent."""
    vals = np.array([[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]], np.float32)
    pack = _pack(cell_inputs=vals, cell_input_names=np.array(["prob_a", "prob_b"]))
    pack.save(tmp_path / "p.npz")
    back = type(pack).load(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.cell_input_columns(["prob_b", "prob_a"]), vals[:, ::-1])
    images = np.zeros((2, 16, 16, 3), np.uint8)
    data = PatchData.from_pack(back, np.array([1, 0]), images, np.zeros(3), np.ones(3), ("prob_b",))
    assert data.lut_inputs.shape == (2, 4, 1)  # patches in the order asked, labels up to 3
    assert float(data.lut_inputs[0, 3, 0]) == pytest.approx(0.5)
    assert float(data.lut_inputs[1, 1, 0]) == pytest.approx(0.9) and float(data.lut_inputs[1, 2, 0]) == pytest.approx(0.3)
    old = _pack()  # a pack written before cell inputs existed still loads
    old.save(tmp_path / "old.npz")
    with pytest.raises(KeyError, match="prepare_her2st"):
        type(pack).load(tmp_path / "old.npz").cell_input_columns(["prob_a"])
    # which segmenter gave the inputs survives too; a pack from before it was recorded used nuclei-seg
    from ghist_core.paths import DEFAULT_SEGMENTER
    from ghist_core.training.her2st import PROTOCOL_SEGMENTER, UNRECORDED_PACK_SEGMENTER

    assert back.cell_input_segmenter == UNRECORDED_PACK_SEGMENTER == "nuclei-seg"
    assert PROTOCOL_SEGMENTER == DEFAULT_SEGMENTER == "nuclei-seg-stain"  # new packs: the app's default
    pack.cell_input_segmenter = "nuclei-seg-stain"
    pack.save(tmp_path / "p2.npz")
    assert type(pack).load(tmp_path / "p2.npz").cell_input_segmenter == "nuclei-seg-stain"
    assert type(pack).load(tmp_path / "old.npz").cell_input_segmenter == ""  # no inputs, no segmenter


def test_cell_inputs_reach_their_own_cells_and_are_required(tmp_path: Path) -> None:
    """A model that reads the segmenter's type probabilities: a cell's output follows its own inputs,
    the inputs survive save/load, and a cell table without them is a clear error."""
    names = ["prob_x", "prob_y"]
    net = _tiny_net(n_genes=3, n_types=2, cell_inputs=tuple(names), tissue_skip=True, spot_aggregate="mean").eval()
    torch.nn.init.normal_(net.tissue_head[-1].weight)
    rgb = np.full((256, 256, 3), 230, np.uint8)
    xy = np.array([[6.0, 6.0], [16.0, 18.0], [110.0, 110.0]])  # µm: two in one tile, the third far away
    for cx, cy in xy / 0.5:
        rgb[int(cy) - 4:int(cy) + 4, int(cx) - 4:int(cx) + 4] = (90, 40, 120)
    slide = ArraySlide(rgb, 0.5)
    cells = pd.DataFrame({"x_um": xy[:, 0], "y_um": xy[:, 1], "area_um2": 12.0,
                          "prob_x": [0.9, 0.2, 0.5], "prob_y": [0.1, 0.8, 0.5]})
    m = load_ghist(path=save_ghist(net, tmp_path, {"genes": net.cfg.genes}), device="cpu")
    assert tuple(m.net.cfg.cell_inputs) == tuple(names)
    a = m.predict(slide, cells, margin_px=8)
    flipped = cells.assign(prob_x=[0.1, 0.2, 0.5], prob_y=[0.9, 0.8, 0.5])  # only the first cell changes
    b = m.predict(slide, flipped, margin_px=8)
    assert np.abs(a.X[0] - b.X[0]).max() > 1e-4
    np.testing.assert_allclose(a.X[2], b.X[2], rtol=1e-5, atol=1e-6)  # another tile, beyond the context radius
    order = [2, 1, 0]  # row order does not matter: each cell keeps its own inputs within its tile
    c = m.predict(slide, cells.iloc[order].reset_index(drop=True), margin_px=8)
    np.testing.assert_allclose(c.X, a.X[order], rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelInputError, match="learned segmenter"):
        m.predict(slide, cells.drop(columns=["prob_y"]))
    with pytest.raises(ModelInputError, match="non-finite"):
        m.predict(slide, cells.assign(prob_x=[np.nan, 0.2, 0.5]))


def test_image_dropout_leaves_only_the_priors_and_only_in_training() -> None:
    """With every patch's image terms dropped, expression follows nucleus counts alone; eval is unaffected."""
    net = _tiny_net(n_genes=3, n_types=2, spot_aggregate="mean", tissue_skip=True, density_prior=True,
                    use_reference=False, image_dropout=1.0)
    torch.nn.init.normal_(net.prior_head.weight)
    inst = torch.zeros(1, 64, 64, dtype=torch.int32)
    inst[0, 5:12, 5:12] = 1
    inst[0, 30:40, 30:38] = 2
    a_img, b_img = torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.full((1, 3, 64, 64), 200, dtype=torch.uint8)
    net.train()
    with torch.no_grad():
        torch.testing.assert_close(net(a_img, inst)["expr"], net(b_img, inst)["expr"])
        net.eval()
        assert (net(a_img, inst)["expr"] - net(b_img, inst)["expr"]).abs().max() > 1e-4


def test_pack_nucleus_types_match_the_segmenter_cell_table(demo_slide: Path) -> None:
    """The per-nucleus inputs a pack trains on are the very columns the learned segmenter's table gives at inference."""
    from ghist_core.training.her2st import nucleus_type_inputs
    from ghist_core.segmentation import ClassicalSegmenter, load_segmenter
    from ghist_core.segmentation.features import measure_instances
    from ghist_core.io.slide import open_slide

    seg = load_segmenter(device="cpu")
    with open_slide(demo_slide) as slide:
        rgbs = np.stack([slide.read_region_mpp((x / slide.mpp, 500 / slide.mpp), (128, 128), seg.mpp) for x in (300.0, 420.0)])
    insts, spots, labels = [], [], []
    for i, rgb in enumerate(rgbs):  # nuclei from another segmenter, as in the pack
        inst, cells = ClassicalSegmenter().segment_tile(rgb, seg.mpp)
        present = np.unique(inst[inst > 0])
        insts.append(inst.astype(np.uint16))
        spots.append(np.full(len(present), i))
        labels.append(present)
    assert sum(len(x) for x in labels) > 10
    pack = _pack(np.stack(insts), np.concatenate(spots), np.concatenate(labels), mpp=seg.mpp)
    n = len(pack.cell_spot)
    vals, names = nucleus_type_inputs(pack, rgbs, seg, batch=1)
    assert names == [f"prob_{t}" for t in seg.type_names] and vals.shape == (n, len(names))
    np.testing.assert_allclose(vals.sum(1), 1.0, atol=1e-5)
    for i, rgb in enumerate(rgbs):
        _, _, tp = seg.predict_batch(rgb[None])
        table = measure_instances(pack.instances[i].astype(np.int32), seg.mpp, type_probs=tp[0], type_names=seg.type_names)
        rows = pack.cell_spot == i
        np.testing.assert_allclose(vals[rows], table[names].to_numpy(), atol=1e-5)
    assert vals.std(0).max() > 0.01  # nuclei differ: the test could fail


def test_spot_covariates_count_and_mean_types_per_spot() -> None:
    """The baselines' inputs: log(1 + nuclei in the spot) and the mean of their type probabilities."""
    from ghist_core.training.her2st import spot_covariates

    vals = np.array([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]], np.float32)
    pack = _pack(cell_inputs=vals, cell_input_names=np.array(["prob_a", "prob_b"]))
    pack.cell_in_spot = np.array([True, True, False])  # the third nucleus (spot 1) is outside its spot
    cov, names = spot_covariates(pack, ["prob_b"])
    assert names == ["log1p_nuclei_in_spot", "mean_prob_b"]
    np.testing.assert_allclose(cov[:, 0], [np.log(3), 0.0])
    np.testing.assert_allclose(cov[:, 1], [0.6, 0.0])  # spot 1 has no nucleus inside: 0, not NaN
    assert spot_covariates(pack)[0].shape == (2, 1)


def test_patch_regressor_reads_covariates_and_types_come_out_per_spot() -> None:
    """The ST-Net-like baseline with the model's inputs uses them; GHIST's spot type composition sums to 1."""
    from ghist_core.model.network import PatchRegressor

    torch.manual_seed(0)
    reg = PatchRegressor(3, (4, 8), n_covariates=2).eval()
    img = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    a = reg(img, torch.zeros(2, 2))
    b = reg(img, torch.tensor([[3.0, -1.0], [0.0, 2.0]]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="covariates"):
        reg(img)
    assert PatchRegressor(3, (4, 8))(img).shape == (2, 3)  # without covariates: as before
    data, _ = make_synthetic_cells(n_patches=4, size=64, seed=3)
    data.lut_in_spot = data.lut_morph_ok.clone()
    expr, comp = predict_spots(_tiny_net(), data, batch_size=2, tta=False, types=True)
    assert expr.shape[0] == comp.shape[0] == 4 and comp.shape[1] == 3
    np.testing.assert_allclose(comp.sum(1), 1.0, atol=1e-5)
    with pytest.raises(TypeError):
        predict_spots(reg, PatchData(images=img, instances=torch.zeros(2, 32, 32, dtype=torch.int32),
                                     extras={"covariates": torch.zeros(2, 2)}), types=True)
