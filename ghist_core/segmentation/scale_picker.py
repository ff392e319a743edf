"""A learned decision for the nucleus-scale check (docs/DECISIONS.md, session 18).

The check reads a tile twice, as stated (factor 1) and as if its pixels were larger (factor 2/3:
nuclei reach the network smaller), and keeps one reading. Under a stain shift the hand rule
(area gate, then a certainty margin) rarely moves, because enlarged nuclei read at factor 1
come out as fragments as small as normal nuclei. This picker looks at both readings together
(foreground certainty, median nucleus area, nucleus density, and how each changes between the
readings) and predicts how much AJI the second reading gains; it moves when that exceeds a margin.

The model is a small ensemble of regression trees whose arrays live in the segmenter's JSON card
(``scale_picker``): no pickled model, no scikit-learn at prediction time.

    x = scale_picker_features(rgb, mpp, work_mpp, ((np_prob_1, cells_1), (np_prob_f, cells_f)))
    moved = ScalePicker.from_dict(card["scale_picker"]).moves(x)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: the columns of :func:`picker_features`, in order (recorded in the card)
FEATURES = ("cert_1", "cert_f", "d_cert", "log_median_area_1", "log_median_area_f", "d_log_median_area",
            "log_density_1", "log_density_f", "d_log_density")


@dataclass(frozen=True)
class ReadingStats:
    """What the picker needs of one reading of a tile: the network's foreground certainty, the
    median nucleus area in the model's working px, nuclei per 10,000 µm² of tissue."""

    certainty: float
    median_area_px: float
    density: float


def tissue_area_um2(rgb: np.ndarray, mpp: float) -> float:
    """The tile's area not near-white (µm²): glass, and the white padding of an edge tile, left out
    (at least 1 % of the tile, the share below which a tile counts as background)."""
    from ghist_core.segmentation.tiling import non_white_fraction

    return rgb.shape[0] * rgb.shape[1] * mpp * mpp * max(non_white_fraction(rgb), 0.01)


def reading_stats(certainty: float, areas_um2: np.ndarray, work_mpp: float, tissue_um2: float) -> ReadingStats:
    """:class:`ReadingStats` from a reading's certainty and its nuclei's areas (µm², the true
    µm/px); density per tissue area (:func:`tissue_area_um2`), not count, so tiles of any size and
    tissue share compare."""
    areas = np.asarray(areas_um2, np.float64)
    median = float(np.median(areas)) / work_mpp ** 2 if len(areas) else 0.0
    return ReadingStats(float(certainty), median, len(areas) / max(tissue_um2, 1e-9) * 1e4)


def picker_features(at_1: ReadingStats, at_f: ReadingStats) -> np.ndarray:
    """One row of :data:`FEATURES` (1 x 9) from the two readings."""
    lm1, lmf = np.log1p(at_1.median_area_px), np.log1p(at_f.median_area_px)
    ld1, ldf = np.log1p(at_1.density), np.log1p(at_f.density)
    return np.array([[at_1.certainty, at_f.certainty, at_f.certainty - at_1.certainty,
                      lm1, lmf, lmf - lm1, ld1, ldf, ldf - ld1]], np.float64)


def scale_picker_features(rgb: np.ndarray, mpp: float, work_mpp: float, readings) -> np.ndarray:
    """The picker's row for a tile ``rgb`` (at ``mpp``) read twice by a model working at ``work_mpp``:
    ``readings`` = ((np_prob, cells) at factor 1, (np_prob, cells) at the picker's factor), cells with
    ``area_um2``. The one place both the segmenter and the choice job (scripts/choose_on_validation.py)
    make it, so what the picker was chosen on is what it reads."""
    tissue = tissue_area_um2(rgb, mpp)
    stats = [reading_stats(foreground_certainty(npp), cells["area_um2"].to_numpy(), work_mpp, tissue)
             for npp, cells in readings]
    return picker_features(*stats)


def foreground_certainty(np_prob: np.ndarray) -> float:
    """Mean nuclear-pixel probability over the pixels called nucleus (p > 0.5); 0 when none.
    Higher when nuclei reach the network at the size it was trained on."""
    p = np.asarray(np_prob, np.float32)
    fg = p > 0.5
    return float(p[fg].mean()) if fg.any() else 0.0


@dataclass(frozen=True)
class Tree:
    """One regression tree as flat arrays (scikit-learn's layout): node ``i`` splits on
    ``feature[i] <= threshold[i]`` into ``left[i]`` / ``right[i]``; a leaf has ``left[i] == -1``."""

    feature: tuple[int, ...]
    threshold: tuple[float, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    value: tuple[float, ...]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Leaf values for the rows of ``x``, all rows descending together (depth steps, not rows)."""
        x = np.asarray(x, np.float32).astype(np.float64)  # scikit-learn compares float32 inputs
        feat, thr = np.asarray(self.feature), np.asarray(self.threshold)
        left, right, value = np.asarray(self.left), np.asarray(self.right), np.asarray(self.value)
        node = np.zeros(len(x), np.int64)
        rows = np.arange(len(x))
        for _ in range(len(feat)):  # children have larger indices (checked on loading): a leaf within len steps
            inner = left[node] >= 0
            if not inner.any():
                break
            go_left = x[rows, np.where(inner, feat[node], 0)] <= thr[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)
        return value[node]


def _ints(values) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError("scale_picker: a tree's feature and child indices must be whole numbers")
    try:
        return tuple(int(v) for v in np.asarray(values, np.int64))
    except OverflowError:
        raise ValueError("scale_picker: a tree's index is out of range") from None


def _reals(values) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError("scale_picker: a tree's thresholds and values must be numbers")
    return tuple(float(v) for v in values)


def _checked_tree(t: dict) -> Tree:
    """A tree record made safe to walk: equal lengths, whole-number indices, finite numbers, each
    inner node's children after it (scikit-learn's order, so every walk ends at a leaf)."""
    try:
        tree = Tree(_ints(t["feature"]), _reals(t["threshold"]), _ints(t["left"]), _ints(t["right"]), _reals(t["value"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"scale_picker: a tree record is incomplete ({exc})") from None
    n = len(tree.feature)
    if n == 0 or any(len(a) != n for a in (tree.threshold, tree.left, tree.right, tree.value)):
        raise ValueError("scale_picker: a tree's arrays differ in length")
    idx = np.arange(n)
    left, right, feat = np.asarray(tree.left), np.asarray(tree.right), np.asarray(tree.feature)
    inner = left >= 0
    if (np.any(inner & ((left <= idx) | (left >= n) | (right <= idx) | (right >= n)))
            or np.any(~inner & ((left != -1) | (right != -1)))
            or np.any(inner & ((feat < 0) | (feat >= len(FEATURES)))) or np.any(feat < -2) or np.any(feat >= len(FEATURES))
            or not np.all(np.isfinite(np.asarray(tree.value)))
            or not np.all(np.isfinite(np.asarray(tree.threshold)[inner]))):
        raise ValueError("scale_picker: a tree points outside itself, loops, or holds a non-finite number")
    return tree


@dataclass(frozen=True)
class ScalePicker:
    """``base + learning_rate * sum(tree predictions)``: the predicted AJI gain of reading the tile at
    ``factor`` instead of 1; :meth:`moves` when it exceeds ``margin``."""

    factor: float
    margin: float
    base: float
    learning_rate: float
    trees: tuple[Tree, ...]
    features: tuple[str, ...] = FEATURES
    #: how it was chosen (cross-validation table, data): carried, not used
    provenance: dict = field(default_factory=dict, compare=False)

    def predict_gain(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, np.float64))
        return self.base + self.learning_rate * sum((t.predict(x) for t in self.trees), np.zeros(len(x)))

    def moves(self, x: np.ndarray) -> bool:
        """True when the second reading is predicted to gain more than ``margin`` (one row)."""
        return bool(self.predict_gain(x)[0] > self.margin)

    def to_dict(self) -> dict:
        return {"factor": self.factor, "margin": self.margin, "base": self.base, "learning_rate": self.learning_rate,
                "features": list(self.features), "provenance": self.provenance,
                "trees": [{k: list(getattr(t, k)) for k in ("feature", "threshold", "left", "right", "value")}
                          for t in self.trees]}

    @classmethod
    def from_dict(cls, d: dict) -> "ScalePicker":
        """From a card's ``scale_picker``; a ValueError when it does not describe a picker of these
        features (wrong feature list, arrays of unequal length, a child or feature out of range,
        a non-finite number, a factor outside (0, 1))."""
        if not isinstance(d, dict):
            raise ValueError("scale_picker must be a record (a JSON object)")
        if list(d.get("features", [])) != list(FEATURES):
            raise ValueError(f"scale_picker: its features must be {list(FEATURES)}")
        if not isinstance(d.get("trees"), list) or not d["trees"] or not all(isinstance(t, dict) for t in d["trees"]):
            raise ValueError("scale_picker: trees must be a non-empty list of records")
        trees = [_checked_tree(t) for t in d["trees"]]
        numbers = [float(d[k]) for k in ("factor", "margin", "base", "learning_rate")]
        if not all(np.isfinite(numbers)) or not 0.0 < numbers[0] < 1.0:
            raise ValueError("scale_picker: factor must lie in (0, 1) and every number be finite")
        return cls(*numbers, trees=tuple(trees), provenance=dict(d.get("provenance") or {}))

    @classmethod
    def from_sklearn(cls, model, factor: float, margin: float, provenance: dict | None = None) -> "ScalePicker":
        """From a fitted ``GradientBoostingRegressor`` (squared error) or ``DecisionTreeRegressor``."""
        if hasattr(model, "estimators_"):
            base = float(np.ravel(model.init_.constant_)[0]) if hasattr(model.init_, "constant_") else \
                float(model.init_.predict(np.zeros((1, model.n_features_in_)))[0])
            estimators, rate = [e[0] for e in model.estimators_], float(model.learning_rate)
        else:
            base, estimators, rate = 0.0, [model], 1.0
        trees = tuple(Tree(tuple(int(v) for v in e.tree_.feature), tuple(float(v) for v in e.tree_.threshold),
                           tuple(int(v) for v in e.tree_.children_left), tuple(int(v) for v in e.tree_.children_right),
                           tuple(float(v) for v in e.tree_.value[:, 0, 0])) for e in estimators)
        return cls(float(factor), float(margin), base, rate, trees, provenance=dict(provenance or {}))
