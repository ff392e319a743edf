"""Simple spot-level predictors of expression and their nested choice by inner cross-validation.

The floors a model must beat get the same inputs as the model (nucleus count, the nuclei's
type probabilities, the patch's colour), and every choice they make (ridge strength, feature
set, number of gene programs) is made on the training sections only: an inner leave-one-
section-out split, or spatial blocks when a single section is all there is to train on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ghist_core.training.expression_metrics import pcc_per_gene

__all__ = ["ALPHAS", "RidgeSpec", "fit_predict", "inner_folds", "inner_scores", "choose", "gene_programs"]

#: ridge strengths tried by the inner cross-validation (features are standardised)
ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 5, 13))


@dataclass(frozen=True)
class RidgeSpec:
    """A ridge on some feature columns, optionally through ``k`` gene programs (a fixed basis)."""

    name: str
    columns: tuple[int, ...]
    alpha: float = 1.0
    programs: int = 0  # 0 = predict every gene directly

    def with_(self, **kw) -> "RidgeSpec":
        return RidgeSpec(**{**self.__dict__, **kw})


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form ridge on standardised ``x`` with an unpenalised intercept."""
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mu) / sd
    ym = y.mean(0)
    a = z.T @ z + alpha * np.eye(z.shape[1])
    w = np.linalg.solve(a, z.T @ (y - ym))
    return mu, sd, w, ym


def fit_predict(spec: RidgeSpec, features: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray,
                basis: np.ndarray | None = None) -> np.ndarray:
    """Fit ``spec`` on rows ``tr`` and predict rows ``te`` (every column of ``y``).

    With ``spec.programs = k`` the ridge predicts the scores of the first ``k`` rows of ``basis``
    (programs × genes, orthonormal rows, learned elsewhere) and the genes are rebuilt from them,
    so predictions live on the co-expression the programs describe.
    """
    x = features[:, list(spec.columns)].astype(np.float64)
    yt = y[tr].astype(np.float64)
    if spec.programs:
        if basis is None:
            raise ValueError(f"{spec.name}: gene programs asked for but no basis given")
        b = basis[: spec.programs]
        ym = yt.mean(0)
        scores = (yt - ym) @ b.T
        mu, sd, w, sm = _ridge(x[tr], scores, spec.alpha)
        return ym + (((x[te] - mu) / sd) @ w + sm) @ b
    mu, sd, w, ym = _ridge(x[tr], yt, spec.alpha)
    return ((x[te] - mu) / sd) @ w + ym


def inner_folds(train_idx: np.ndarray, section: np.ndarray, xy: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner splits of the training spots: leave one training section out; with a single training
    section, its 2 × 2 spatial blocks (split at the median array x and y), one held out at a time."""
    train_idx = np.asarray(train_idx)
    secs = sorted(set(section[train_idx].tolist()))
    if len(secs) >= 2:
        return [(train_idx[section[train_idx] != s], train_idx[section[train_idx] == s]) for s in secs]
    p = xy[train_idx].astype(np.float64)
    block = (p[:, 0] > np.median(p[:, 0])).astype(int) * 2 + (p[:, 1] > np.median(p[:, 1])).astype(int)
    return [(train_idx[block != b], train_idx[block == b]) for b in range(4) if (block == b).any()]


@dataclass
class InnerResult:
    """Inner-CV scores: ``score[spec]`` = mean over inner folds of the mean r over ``genes``;
    ``per_gene[spec]`` = r per gene (all genes) averaged over inner folds."""

    score: dict[RidgeSpec, float] = field(default_factory=dict)
    per_gene: dict[RidgeSpec, np.ndarray] = field(default_factory=dict)


def inner_scores(specs: list[RidgeSpec], features: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                 genes: np.ndarray, basis: np.ndarray | None = None) -> InnerResult:
    """Score every spec on every inner fold (training data only)."""
    res = InnerResult()
    for spec in specs:
        rs = [pcc_per_gene(fit_predict(spec, features, y, a, b, basis), y[b]) for a, b in folds]
        r = np.mean(rs, 0)
        res.per_gene[spec] = r
        res.score[spec] = float(np.mean([x[genes].mean() for x in rs]))
    return res


def choose(inner: InnerResult, candidates: list[RidgeSpec]) -> RidgeSpec:
    """The candidate with the best inner score (ties: the first, i.e. the simplest listed first)."""
    best = max(inner.score[c] for c in candidates)
    return next(c for c in candidates if inner.score[c] >= best - 1e-12)


def gene_programs(log_expr: np.ndarray, k: int | None = None) -> np.ndarray:
    """Orthonormal gene programs (principal axes, programs × genes) of ``log_expr`` (units × genes),
    e.g. log1p CP10k of the sections that have no image: they teach which genes go together."""
    x = np.asarray(log_expr, np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return vt if k is None else vt[:k]
