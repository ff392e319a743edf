"""How well predicted expression matches measured expression, gene by gene, and whether it is
gene-specific rather than one density map under many names.

All functions take ``(units × genes)`` matrices on the same scale (e.g. log1p CP10k per spot);
units are spots or cells. Constant columns give r = 0, never NaN, so a model that predicts a
flat gene scores zero rather than disappearing from a mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["pcc_per_gene", "partial_pcc_per_gene", "pc1_share", "gene_corr_fidelity", "PairedTest", "paired_wilcoxon",
           "specificity", "reliability_table", "BEAT_RULE"]


def pcc_per_gene(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r per column; 0 where either side is constant."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(y, np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    ok = den > 1e-12
    return np.where(ok, (p * t).sum(0) / np.where(ok, den, 1.0), 0.0)


def _residualise(m: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    """``m`` minus its least-squares fit on ``[1, covariate]`` (column by column)."""
    c = np.asarray(covariate, np.float64).reshape(len(m), -1)
    design = np.column_stack([np.ones(len(m)), c])
    coef, *_ = np.linalg.lstsq(design, m, rcond=None)
    return m - design @ coef


def partial_pcc_per_gene(pred: np.ndarray, y: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    """Pearson r per gene after regressing ``covariate`` (e.g. log nucleus count) out of both the
    prediction and the measurement: the signal *beyond* cellularity. A prediction that is only a
    function of the covariate (linear) scores 0."""
    p = _residualise(np.asarray(pred, np.float64), covariate)
    t = _residualise(np.asarray(y, np.float64), covariate)
    return pcc_per_gene(p, t)


def pc1_share(m: np.ndarray) -> float:
    """Share of the total variance (columns centred, not scaled) held by the first principal
    component: 1.0 when every gene is the same map up to scale."""
    x = np.asarray(m, np.float64)
    x = x - x.mean(0)
    if not np.isfinite(x).all() or (x**2).sum() <= 1e-24:
        return float("nan")
    s = np.linalg.svd(x, compute_uv=False)
    return float(s[0] ** 2 / (s**2).sum())


def gene_corr_fidelity(pred: np.ndarray, y: np.ndarray) -> float:
    """Pearson r between the upper triangles of the predicted and the measured gene–gene
    correlation matrices (genes constant on either side left out)."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(y, np.float64)
    keep = (p.std(0) > 1e-12) & (t.std(0) > 1e-12)
    if keep.sum() < 3:
        return float("nan")
    cp = np.corrcoef(p[:, keep], rowvar=False)
    ct = np.corrcoef(t[:, keep], rowvar=False)
    iu = np.triu_indices(int(keep.sum()), 1)
    return float(pcc_per_gene(cp[iu][:, None], ct[iu][:, None])[0])


@dataclass(frozen=True)
class PairedTest:
    """A paired per-gene comparison of method ``a`` against ``b`` (r of a minus r of b)."""

    n: int
    mean_diff: float
    median_diff: float
    n_a_better: int
    p_value: float
    statistic: float

    @property
    def ahead(self) -> bool:
        """``a`` is ahead at p < 0.01 (two-sided test, positive mean difference)."""
        return bool(self.mean_diff > 0 and self.p_value < 0.01)

    def to_dict(self) -> dict:
        return {"n_genes": self.n, "mean_diff": self.mean_diff, "median_diff": self.median_diff,
                "n_genes_a_better": self.n_a_better, "p_value": self.p_value, "statistic": self.statistic,
                "a_ahead_p_lt_0.01": self.ahead}


def paired_wilcoxon(r_a: np.ndarray, r_b: np.ndarray) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test over genes of ``r_a - r_b`` (zero differences dropped)."""
    from scipy.stats import wilcoxon

    d = np.asarray(r_a, np.float64) - np.asarray(r_b, np.float64)
    nz = d[np.abs(d) > 1e-12]
    if len(nz) < 2:
        stat, p = float("nan"), 1.0
    else:
        res = wilcoxon(nz, alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    return PairedTest(n=int(len(d)), mean_diff=float(d.mean()), median_diff=float(np.median(d)),
                      n_a_better=int((d > 0).sum()), p_value=p, statistic=stat)


def specificity(pred: np.ndarray, y: np.ndarray, covariate: np.ndarray) -> dict[str, float]:
    """The gene-specificity numbers of one held-out unit: PC1 share of prediction and of
    measurement, gene–gene correlation fidelity, mean partial r beyond ``covariate``."""
    return {"pc1_share_pred": pc1_share(pred), "pc1_share_measured": pc1_share(y),
            "gene_corr_fidelity": gene_corr_fidelity(pred, y),
            "partial_pcc_mean": float(partial_pcc_per_gene(pred, y, covariate).mean())}


#: how many of the held-out units a gene must win (with a positive mean difference) to beat the floor
BEAT_RULE = "beats the floor when its held-out r is higher than the floor's on at least {k} of the {n} units and higher on average"


def reliability_table(model_r: dict[str, np.ndarray], floor_r: dict[str, np.ndarray], names: list[str],
                      min_wins: int | None = None) -> dict[str, dict]:
    """Per name (gene or type): the model's held-out r (mean and range over units), the floor's
    mean, and whether the model beats it (``min_wins`` of the units, default all but two, and
    on average). ``model_r``/``floor_r``: unit → r per name, same units on both sides."""
    units = sorted(model_r)
    if set(units) != set(floor_r):
        raise ValueError(f"model and floor scored on different units: {sorted(model_r)} vs {sorted(floor_r)}")
    m = np.stack([np.asarray(model_r[u], np.float64) for u in units])
    f = np.stack([np.asarray(floor_r[u], np.float64) for u in units])
    k = max(1, len(units) - 2) if min_wins is None else int(min_wins)
    wins = (m > f).sum(0)
    beats = (wins >= k) & ((m - f).mean(0) > 0)
    return {n: {"pcc_mean": round(float(m[:, j].mean()), 4), "pcc_min": round(float(m[:, j].min()), 4),
                "pcc_max": round(float(m[:, j].max()), 4), "floor_pcc_mean": round(float(f[:, j].mean()), 4),
                "units_won": int(wins[j]), "beats_floor": bool(beats[j])} for j, n in enumerate(names)}
