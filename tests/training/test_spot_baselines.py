"""Spot baselines: ridge, gene programs, and choices made on training data only."""

import numpy as np
import pytest

from ghist_core.training.spot_baselines import (
    ALPHAS, RidgeSpec, choose, fit_predict, gene_programs, inner_folds, inner_scores,
)


def _data(seed=0, n=240, genes=30):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    programs = np.linalg.qr(rng.normal(size=(genes, 3)))[0].T  # 3 orthonormal programs
    y = (x[:, :3] @ rng.normal(size=(3, 3))) @ programs * 3 + 0.3 * rng.normal(size=(n, genes))
    section = np.repeat(np.array(["S1", "S2", "S3", "S4"]), n // 4)
    xy = rng.integers(0, 30, size=(n, 2))
    return x, y, section, xy, programs


def test_ridge_recovers_linear_signal():
    x, y, *_ = _data()
    tr, te = np.arange(180), np.arange(180, 240)
    p = fit_predict(RidgeSpec("r", (0, 1, 2, 3, 4), alpha=0.1), x, y, tr, te)
    assert np.corrcoef(p.ravel(), y[te].ravel())[0, 1] > 0.9
    flat = fit_predict(RidgeSpec("r", (3, 4), alpha=0.1), x, y, tr, te)  # uninformative columns
    assert np.corrcoef(flat.ravel(), y[te].ravel())[0, 1] < 0.5


def test_programs_put_predictions_on_the_basis():
    x, y, section, xy, programs = _data()
    basis = gene_programs(y[:180])
    assert np.allclose(basis @ basis.T, np.eye(len(basis)), atol=1e-8)
    tr, te = np.arange(180), np.arange(180, 240)
    p = fit_predict(RidgeSpec("p", (0, 1, 2, 3, 4), alpha=0.1, programs=3), x, y, tr, te, basis)
    centred = p - y[tr].mean(0)
    assert np.allclose(centred, centred @ basis[:3].T @ basis[:3], atol=1e-8)  # rank 3, in the programs
    with pytest.raises(ValueError):
        fit_predict(RidgeSpec("p", (0,), programs=3), x, y, tr, te)


def test_inner_folds_never_touch_other_sections():
    x, y, section, xy, _ = _data()
    tr = np.flatnonzero(section != "S4")
    f = inner_folds(tr, section, xy)
    assert len(f) == 3
    for a, b in f:
        assert set(a) | set(b) == set(tr) and not set(a) & set(b)
        assert len(set(section[b])) == 1
    one = np.flatnonzero(section == "S1")
    blocks = inner_folds(one, section, xy)
    assert 2 <= len(blocks) <= 4 and sum(len(b) for _, b in blocks) == len(one)


def test_choice_prefers_informative_features_on_training_data():
    x, y, section, xy, _ = _data()
    tr = np.flatnonzero(section != "S4")
    folds = inner_folds(tr, section, xy)
    specs = [RidgeSpec("noise", (3, 4), alpha=a) for a in ALPHAS] + [RidgeSpec("signal", (0, 1, 2), alpha=a) for a in ALPHAS]
    res = inner_scores(specs, x, y, folds, np.arange(y.shape[1]))
    best = choose(res, specs)
    assert best.name == "signal" and res.score[best] > 0.5
    assert res.per_gene[best].shape == (y.shape[1],)
