"""ghist_core.imaging.stain on the TIAToolbox H&E target image and tiles of the real SVS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from ghist_core.imaging import stain
from ghist_core.io.slide import open_slide
from ghist_core.io.tiles import TileGrid


@pytest.fixture(scope="module")
def target(target_png: Path) -> np.ndarray:
    return np.asarray(Image.open(target_png).convert("RGB"))


@pytest.fixture(scope="module")
def svs_tile(svs_path: Path) -> np.ndarray:
    with open_slide(svs_path) as s:
        return s.read_region((700, 1400), 0, (512, 512))


@pytest.fixture(scope="module")
def macenko(target: np.ndarray) -> stain.MacenkoNormalizer:
    return stain.MacenkoNormalizer().fit(target)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


# --------------------------------------------------------------------------- HED
def test_hed_matrices_are_inverse_and_unit() -> None:
    assert np.allclose(np.linalg.norm(stain.RGB_FROM_HED, axis=1), 1.0)
    assert np.allclose(stain.RGB_FROM_HED @ stain.HED_FROM_RGB, np.eye(3))


def test_hed_round_trip_is_identity(target: np.ndarray) -> None:
    hed = stain.hed_deconvolve(target)
    assert hed.shape == target.shape and hed.dtype == np.float64
    back = stain.hed_reconstruct(hed)
    assert back.dtype == np.uint8
    assert np.abs(back.astype(int) - target).max() <= 1
    # float input in 0..1 gives the same stains
    assert np.allclose(stain.hed_deconvolve(target / 255.0), hed)


def test_hed_agrees_with_scikit_image(target: np.ndarray) -> None:
    ours = stain.hed_deconvolve(target)
    theirs = rgb2hed(target)
    for c in range(2):  # haematoxylin and eosin channels: same up to scale/offset
        assert np.corrcoef(ours[..., c].ravel(), theirs[..., c].ravel())[0, 1] > 0.99


def test_hed_channels_mean_what_they_say() -> None:
    pure_h = stain.od_to_rgb(np.array([[1.0, 0.0, 0.0]]) @ stain.RGB_FROM_HED)[0]
    pure_e = stain.od_to_rgb(np.array([[0.0, 1.0, 0.0]]) @ stain.RGB_FROM_HED)[0]
    assert pure_h[2] > pure_h[0]  # haematoxylin renders blue/purple
    assert pure_e[0] > pure_e[1]  # eosin renders pink
    assert stain.hed_deconvolve(np.array([[pure_h]], np.uint8))[0, 0].argmax() == 0
    assert stain.hed_deconvolve(np.array([[pure_e]], np.uint8))[0, 0].argmax() == 1
    assert np.allclose(stain.hed_deconvolve(np.full((1, 1, 3), 255, np.uint8)), 0.0)


def test_skimage_convention_is_scikit_image_exactly(target: np.ndarray, svs_tile: np.ndarray) -> None:
    for im in (target, svs_tile):
        assert np.array_equal(stain.hed_deconvolve(im, convention="skimage"), rgb2hed(im))
    with pytest.raises(ValueError, match="convention"):
        stain.hed_deconvolve(target, convention="log2")


def test_haematoxylin_od_is_log10_ruifrok(svs_tile: np.ndarray) -> None:
    """The classical segmenter's units: log10 OD, published vectors, float32, clipped at 0."""
    h = stain.haematoxylin_od(svs_tile)
    assert h.dtype == np.float32 and h.shape == svs_tile.shape[:2] and h.min() >= 0
    od = -np.log10(np.maximum(svs_tile.astype(np.float64), 1.0) / 255.0)
    ref = np.maximum(od @ np.linalg.inv(stain.RUIFROK_RGB_FROM_HED)[:, 0], 0.0)
    assert np.allclose(h, ref, atol=1e-5)
    # scikit-image's H channel is the same quantity in other units (ln OD / -ln 1e-6 instead of log10 OD)
    # (the two differ only for black channels: a floor of 1/255 against 1e-6)
    sk = rgb2hed(svs_tile)[..., 0]
    lit = svs_tile.min(axis=2) > 0
    assert np.allclose(h[lit] * np.log(10) / -np.log(1e-6), sk[lit], atol=1e-5)
    assert np.array_equal(stain.haematoxylin_od(np.full((2, 2, 3), 255, np.uint8)), np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("unit_vectors", [False, True])
def test_hed_jitter_torch_matches_numpy_formula(svs_tile: np.ndarray, unit_vectors: bool) -> None:
    torch = pytest.importorskip("torch")
    x = np.stack([svs_tile[:64, :64], svs_tile[64:128, :64]]).transpose(0, 3, 1, 2) / 255.0
    rng = np.random.default_rng(3)
    alpha, beta = rng.uniform(0.9, 1.1, (2, 3)), rng.uniform(-0.05, 0.05, (2, 3))
    got = stain.hed_jitter_torch(torch.tensor(x, dtype=torch.float32), torch.tensor(alpha, dtype=torch.float32),
                                 torch.tensor(beta, dtype=torch.float32), unit_vectors=unit_vectors).numpy()
    m = stain.RGB_FROM_HED if unit_vectors else stain.RUIFROK_RGB_FROM_HED
    od = -np.log(np.maximum(x, 1 / 255.0)).transpose(0, 2, 3, 1)
    ref = np.exp(-((od @ np.linalg.inv(m)) * alpha[:, None, None] + beta[:, None, None]) @ m).transpose(0, 3, 1, 2)
    assert np.allclose(got, ref, atol=1e-5)
    assert not np.allclose(got, x, atol=1e-2)  # it did change the colours
    same = stain.hed_jitter_torch(torch.tensor(x, dtype=torch.float32), torch.ones(2, 3), torch.zeros(2, 3)).numpy()
    assert np.allclose(same, np.maximum(x, 1 / 255.0), atol=1e-5)


# --------------------------------------------------------------------------- jitter
def test_hed_jitter_is_seeded_and_bounded(target: np.ndarray) -> None:
    tile = target[:256, :256]
    a = stain.hed_jitter(tile, sigma=0.1, bias=0.02, rng=7)
    b = stain.hed_jitter(tile, sigma=0.1, bias=0.02, rng=7)
    c = stain.hed_jitter(tile, sigma=0.1, bias=0.02, rng=8)
    assert a.dtype == np.uint8 and a.shape == tile.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(stain.hed_jitter(tile, 0.0, 0.0, rng=1), tile)
    # the H channel is scaled by a in [0.9, 1.1] plus a shift of at most 0.02
    h0 = stain.hed_deconvolve(tile)[..., 0].ravel()
    h1 = stain.hed_deconvolve(a)[..., 0].ravel()
    slope, intercept = np.polyfit(h0, h1, 1)
    assert 0.88 < slope < 1.12 and abs(intercept) < 0.03


def test_hed_jitter_batch_and_float(target: np.ndarray) -> None:
    batch = np.stack([target[:64, :64]] * 4)
    out = stain.hed_jitter(batch, sigma=0.2, bias=0.05, rng=np.random.default_rng(0))
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert len({out[i].tobytes() for i in range(4)}) == 4  # one draw per image
    f = stain.hed_jitter(target[:64, :64] / 255.0, sigma=0.1, bias=0.0, rng=0)
    assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0


# --------------------------------------------------------------------------- Macenko
def test_macenko_stain_vectors(macenko: stain.MacenkoNormalizer, target: np.ndarray) -> None:
    sm = macenko.stain_matrix_
    assert sm.shape == (2, 3)
    assert np.allclose(np.linalg.norm(sm, axis=1), 1.0)
    assert (sm > 0).all()  # optical densities are positive
    h, e = sm
    # haematoxylin absorbs more red light than eosin: H looks bluer than E
    assert h[0] > e[0]
    col_h, col_e = np.exp(-h), np.exp(-e)  # transmitted colour of each unit stain
    assert col_h[2] / col_h.sum() > col_e[2] / col_e.sum()
    assert 10 < _angle_deg(h, e) < 70
    # close to the textbook (Ruifrok & Johnston) directions
    assert _angle_deg(h, stain.RGB_FROM_HED[0]) < 20
    assert _angle_deg(e, stain.RGB_FROM_HED[1]) < 30
    assert macenko.max_concentrations_.shape == (2,) and (macenko.max_concentrations_ > 0).all()
    conc = macenko.concentrations(target)
    assert conc.shape == (1000, 1000, 2)
    assert np.allclose(np.percentile(conc.reshape(-1, 2)[stain.rgb_to_od(target).reshape(-1, 3).min(1) >= 0.15], 99, axis=0),
                       macenko.max_concentrations_, rtol=1e-6)


def test_macenko_target_to_itself_is_identity(target: np.ndarray, macenko: stain.MacenkoNormalizer) -> None:
    out = macenko.transform(target)
    assert out.dtype == np.uint8 and out.shape == target.shape
    diff = np.abs(out.astype(int) - target)
    assert diff.mean() < 3 and np.percentile(diff, 99) < 15


def test_macenko_moves_tile_towards_target(svs_tile: np.ndarray, macenko: stain.MacenkoNormalizer) -> None:
    before = stain.MacenkoNormalizer().fit(svs_tile)
    after = stain.MacenkoNormalizer().fit(macenko.transform(svs_tile))
    for k in range(2):
        assert _angle_deg(after.stain_matrix_[k], macenko.stain_matrix_[k]) < _angle_deg(
            before.stain_matrix_[k], macenko.stain_matrix_[k]
        )
    gap_before = np.abs(before.max_concentrations_ - macenko.max_concentrations_).sum()
    gap_after = np.abs(after.max_concentrations_ - macenko.max_concentrations_).sum()
    assert gap_after < gap_before


def test_macenko_undoes_stain_jitter(target: np.ndarray, macenko: stain.MacenkoNormalizer) -> None:
    jittered = stain.hed_jitter(target, sigma=0.3, bias=0.1, rng=3)
    before = np.abs(jittered.astype(int) - target).mean()
    after = np.abs(macenko.transform(jittered).astype(int) - target).mean()
    assert after < before / 2


def test_macenko_leaves_glass_alone(macenko: stain.MacenkoNormalizer) -> None:
    glass = np.full((64, 64, 3), 240, np.uint8)
    assert np.array_equal(macenko.transform(glass), glass)


def test_normalizers_need_fit() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        stain.MacenkoNormalizer().transform(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(RuntimeError, match="before fit"):
        stain.ReinhardNormalizer().transform(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="too little"):
        stain.MacenkoNormalizer().fit(np.full((32, 32, 3), 250, np.uint8))


# --------------------------------------------------------------------------- Reinhard
def test_reinhard_target_to_itself_is_identity(target: np.ndarray) -> None:
    r = stain.ReinhardNormalizer().fit(target)
    assert r.target_means_.shape == (3,) and (r.target_stds_ > 0).all()
    assert np.abs(r.transform(target).astype(int) - target).max() <= 1


def test_reinhard_matches_target_statistics(target: np.ndarray, svs_tile: np.ndarray) -> None:
    r = stain.ReinhardNormalizer().fit(target)
    out = r.transform(svs_tile)
    assert out.dtype == np.uint8 and out.shape == svs_tile.shape
    after = stain.ReinhardNormalizer().fit(out)
    before = stain.ReinhardNormalizer().fit(svs_tile)
    d_before = np.abs(before.target_means_ - r.target_means_).sum() + np.abs(before.target_stds_ - r.target_stds_).sum()
    d_after = np.abs(after.target_means_ - r.target_means_).sum() + np.abs(after.target_stds_ - r.target_stds_).sum()
    assert d_after < d_before / 10
    # and in plain RGB the mean colour moves towards the target's
    gap = lambda im: np.abs(im.reshape(-1, 3).mean(0) - target.reshape(-1, 3).mean(0)).sum()  # noqa: E731
    assert gap(out) < gap(svs_tile)


@pytest.mark.parametrize("cls", [stain.MacenkoNormalizer, stain.ReinhardNormalizer])
def test_normalizers_apply_tile_by_tile(target: np.ndarray, svs_path: Path, cls: type) -> None:
    norm = cls().fit(target)
    with open_slide(svs_path) as s:
        grid = TileGrid.over_slide(s, 256, 0, 1.0)
        for tile in grid.iter(grid.in_tissue(*s.tissue_mask(), s.mpp)):
            out = norm.transform(grid.read(s, tile))
            assert out.shape == (256, 256, 3) and out.dtype == np.uint8
