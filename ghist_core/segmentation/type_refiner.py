"""A nucleus-level type decision from what the pixel type head never sees together: the nucleus'
own mean type probabilities, its shape, its stain and its neighbours (docs/DECISIONS.md,
session 14). A multinomial logistic regression whose numbers live in the segmenter's JSON card
(``type_refiner``): no pickled model. Only the ``type`` label changes; the ``prob_<type>``
columns stay the network's.

    features = nucleus_type_features(rgb, inst, cells, mpp, type_names)
    cells["type"] = TypeRefiner.from_dict(card["type_refiner"]).predict_names(features, type_names)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ghist_core.segmentation.features import RAY_COLUMNS

#: neighbourhood: up to this many nearest nuclei within this radius
NEIGHBOURS = 8
NEIGHBOUR_RADIUS_UM = 25.0
_EPS = 1e-4


def feature_names(type_names: tuple[str, ...]) -> list[str]:
    """The columns of :func:`nucleus_type_features`, in order (recorded in the card)."""
    return ([f"log_prob_{n}" for n in type_names]
            + ["log_area", "perimeter_ratio", "eccentricity", "solidity", "ray_spread"]
            + [f"{stat}_{c}" for stat in ("mean", "sd") for c in "rgb"]
            + [f"neighbour_prob_{n}" for n in type_names] + ["neighbours"])


def nucleus_type_features(rgb: np.ndarray, inst: np.ndarray, cells: pd.DataFrame, mpp: float,
                          type_names: tuple[str, ...]) -> np.ndarray:
    """One row per row of ``cells`` (``measure_instances`` of ``inst``, ids in ``cells["id"]``,
    centroids in ``x_px``/``y_px`` of ``inst``), columns :func:`feature_names`; vectorised (a
    labelled mean per channel, one k-d tree query)."""
    n = len(cells)
    names = feature_names(type_names)
    if n == 0:
        return np.zeros((0, len(names)), np.float64)
    probs = cells[[f"prob_{t}" for t in type_names]].to_numpy(np.float64)
    area = cells["area_um2"].to_numpy(np.float64)
    rays = cells[RAY_COLUMNS].to_numpy(np.float64)
    shape = np.column_stack([
        np.log(area + _EPS),
        cells["perimeter_um"].to_numpy(np.float64) / np.sqrt(area + _EPS),
        cells["eccentricity"].to_numpy(np.float64),
        cells["solidity"].to_numpy(np.float64),
        rays.std(axis=1) / (rays.mean(axis=1) + _EPS),
    ])
    ids = cells["id"].to_numpy()
    x = np.asarray(rgb, np.float64) / 255.0
    means = np.column_stack([ndimage.mean(x[..., c], labels=inst, index=ids) for c in range(3)])
    squares = np.column_stack([ndimage.mean(x[..., c] ** 2, labels=inst, index=ids) for c in range(3)])
    sds = np.sqrt(np.clip(squares - means ** 2, 0.0, None))
    xy = cells[["x_px", "y_px"]].to_numpy(np.float64) * mpp
    k = min(NEIGHBOURS + 1, n)
    dist, idx = cKDTree(xy).query(xy, k=k)
    dist, idx = np.atleast_2d(dist)[:, 1:], np.atleast_2d(idx)[:, 1:]  # drop each nucleus itself
    near = dist <= NEIGHBOUR_RADIUS_UM
    count = near.sum(axis=1)
    neighbour = (probs[idx] * near[..., None]).sum(axis=1) / np.maximum(count, 1)[:, None]
    return np.column_stack([np.log(probs + _EPS), shape, means, sds, neighbour, count.astype(np.float64)])


#: the features that read the nucleus' colour (left out by a refiner that must not depend on the stain)
STAIN_FEATURES = tuple(f"{stat}_{c}" for stat in ("mean", "sd") for c in "rgb")


@dataclass
class TypeRefiner:
    """Standardise, then multinomial logistic regression on ``feature_names`` (all of
    :func:`feature_names` or a subset); classes are type ids 1..K of ``type_names`` (0 is background)."""

    type_names: list[str]
    feature_names: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[list[float]]        # K x F
    intercept: list[float]         # K
    classes: list[int]             # the type id of each row of ``coef``

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Class scores from the full :func:`nucleus_type_features` matrix (this refiner's columns taken)."""
        every = feature_names(tuple(self.type_names))
        cols = [every.index(n) for n in self.feature_names]
        z = (np.asarray(features, np.float64)[:, cols] - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef).T + np.asarray(self.intercept)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Type id per nucleus (1..K) from the full feature matrix."""
        if len(features) == 0:
            return np.zeros(0, int)
        return np.asarray(self.classes)[self.scores(features).argmax(axis=1)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, type_names: tuple[str, ...] | None = None) -> "TypeRefiner":
        """From a card's ``type_refiner``; with ``type_names``, checked against the features and types
        this segmenter gives (a ValueError when they do not fit)."""
        r = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        f, k = len(r.feature_names), len(r.classes)
        coef = np.asarray(r.coef, np.float64)
        if coef.shape != (k, f) or len(r.mean) != f or len(r.scale) != f or len(r.intercept) != k \
                or not np.all(np.isfinite(coef)) or not np.all(np.asarray(r.scale, np.float64) > 0):
            raise ValueError("type_refiner: coefficients, mean, scale and intercept do not fit its features and classes")
        if not set(r.feature_names) <= set(feature_names(tuple(r.type_names))) \
                or not set(r.classes) <= set(range(1, len(r.type_names) + 1)):
            raise ValueError("type_refiner: its features or classes are not its types'")
        if type_names is not None and list(r.type_names) != list(type_names):
            raise ValueError("type_refiner: its features or classes are not this segmenter's")
        return r
