"""Expression metrics: r per gene, signal beyond a covariate, one-map detection, paired test."""

import numpy as np
import pytest

from ghist_core.training.expression_metrics import (
    gene_corr_fidelity, paired_wilcoxon, partial_pcc_per_gene, pc1_share, pcc_per_gene, specificity,
)


def test_pcc_per_gene_matches_numpy_and_constant_is_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    b[:, 3] = 1.0
    r = pcc_per_gene(a, b)
    for j in range(3):
        assert r[j] == pytest.approx(np.corrcoef(a[:, j], b[:, j])[0, 1])
    assert r[3] == 0.0


def test_partial_pcc_removes_cellularity():
    rng = np.random.default_rng(1)
    count = rng.normal(size=400)
    own = rng.normal(size=(400, 3))
    y = count[:, None] * 2.0 + own
    density_only = np.repeat(count[:, None], 3, 1) * 5.0 + 1.0  # "one map": only the covariate
    specific = count[:, None] + own + 0.1 * rng.normal(size=(400, 3))
    assert pcc_per_gene(density_only, y).mean() > 0.8  # looks good without the correction
    assert np.abs(partial_pcc_per_gene(density_only, y, count)).max() < 1e-6
    assert partial_pcc_per_gene(specific, y, count).mean() > 0.9


def test_pc1_share_one_map_vs_independent_genes():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(300, 1)) @ rng.uniform(0.5, 2, size=(1, 20))
    assert pc1_share(m) == pytest.approx(1.0)
    assert pc1_share(rng.normal(size=(3000, 20))) < 0.1
    assert np.isnan(pc1_share(np.ones((5, 3))))


def test_gene_corr_fidelity():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 3))
    y = np.column_stack([z[:, 0], z[:, 0] + z[:, 1], z[:, 2], z[:, 1] - z[:, 2]])
    assert gene_corr_fidelity(y + 0.01 * rng.normal(size=y.shape), y) > 0.99
    one_map = np.repeat(z[:, :1], 4, 1) + 0.01 * rng.normal(size=(500, 4))
    assert gene_corr_fidelity(one_map, y) < 0.6


def test_paired_wilcoxon_direction_and_significance():
    rng = np.random.default_rng(4)
    base = rng.uniform(0, 0.4, 250)
    better = paired_wilcoxon(base + 0.05 + 0.01 * rng.normal(size=250), base)
    assert better.ahead and better.p_value < 1e-10 and better.n_a_better > 240
    same = paired_wilcoxon(base + 0.01 * rng.normal(size=250), base)
    assert not same.ahead
    worse = paired_wilcoxon(base - 0.05, base)
    assert not worse.ahead and worse.p_value < 1e-10 and worse.mean_diff < 0
    assert paired_wilcoxon(base, base).p_value == 1.0
    assert set(better.to_dict()) >= {"p_value", "mean_diff", "a_ahead_p_lt_0.01"}


def test_specificity_keys():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(100, 6))
    s = specificity(y, y, rng.normal(size=100))
    assert s["pc1_share_pred"] == pytest.approx(s["pc1_share_measured"])
    assert s["gene_corr_fidelity"] == pytest.approx(1.0)
    assert s["partial_pcc_mean"] == pytest.approx(1.0)


def test_reliability_table_needs_most_units_and_a_positive_mean():
    from ghist_core.training.expression_metrics import reliability_table

    units = [f"u{i}" for i in range(7)]
    floor = {u: np.array([0.2, 0.2, 0.2]) for u in units}
    model = {u: np.array([0.3, 0.25 if i < 4 else 0.1, 0.21 if i < 6 else -0.5]) for i, u in enumerate(units)}
    t = reliability_table(model, floor, ["good", "half", "wins_but_worse_on_average"])
    assert t["good"]["beats_floor"] and t["good"]["units_won"] == 7 and t["good"]["pcc_mean"] == pytest.approx(0.3)
    assert not t["half"]["beats_floor"] and t["half"]["units_won"] == 4
    assert t["wins_but_worse_on_average"]["units_won"] == 6 and not t["wins_but_worse_on_average"]["beats_floor"]
    assert t["half"]["pcc_min"] == pytest.approx(0.1) and t["half"]["pcc_max"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        reliability_table(model, {"u0": floor["u0"]}, ["a", "b", "c"])
