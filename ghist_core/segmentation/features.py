"""Per-nucleus measurements from an instance map, vectorised over all nuclei at once.

Why not ``regionprops``: it builds one Python object per nucleus, which costs minutes on a
whole slide. Here every measurement is a ``bincount`` / fancy-indexing pass over the map,
so a tile with thousands of nuclei is measured in milliseconds.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

N_RAYS = 16
RAY_COLUMNS = [f"ray_{k:02d}" for k in range(N_RAYS)]
_ANGLES = 2.0 * np.pi * np.arange(N_RAYS) / N_RAYS
_COS = np.cos(_ANGLES)
_SIN = np.sin(_ANGLES)


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Map instance ids to 1..N in ascending order (0 stays background), as int32."""
    ids, inverse = np.unique(instances, return_inverse=True)
    inverse = inverse.reshape(instances.shape).astype(np.int32)
    if ids.size and ids[0] == 0:
        return inverse
    return inverse + 1


def _star_rays(instances: np.ndarray, cx: np.ndarray, cy: np.ndarray, labels: np.ndarray,
               radius: np.ndarray, max_elems: int = 4_000_000) -> np.ndarray:
    """Distance (px) from each centroid to the outermost pixel of its own nucleus along 16 rays.

    Samples every ray at 0.5 px steps up to the nucleus' own bounding radius; chunked so
    that memory stays bounded even when one object is huge.
    """
    h, w = instances.shape
    n = labels.size
    rays = np.zeros((n, N_RAYS), dtype=np.float32)
    if n == 0:
        return rays
    order = np.argsort(radius)  # chunks of similar size keep the sample grid tight
    start = 0
    while start < n:
        r_max = float(radius[order[min(n - 1, start)]])
        steps = max(2, int(np.ceil(r_max / 0.5)) + 2)
        chunk = max(1, max_elems // (N_RAYS * steps))
        idx = order[start:start + chunk]
        steps = max(2, int(np.ceil(float(radius[idx].max()) / 0.5)) + 2)
        r = np.arange(steps, dtype=np.float32) * 0.5
        px = cx[idx, None, None] + r[None, None, :] * _COS[None, :, None]
        py = cy[idx, None, None] + r[None, None, :] * _SIN[None, :, None]
        ix = np.rint(px).astype(np.int64)
        iy = np.rint(py).astype(np.int64)
        valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        ix = np.clip(ix, 0, w - 1)
        iy = np.clip(iy, 0, h - 1)
        inside = valid & (instances[iy, ix] == labels[idx, None, None])
        last = np.where(inside, r[None, None, :], -1.0).max(axis=2)
        rays[idx] = np.where(last >= 0, last + 0.5, 0.0)
        start += chunk
    return rays


def _polygon_area(xs: np.ndarray, ys: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Shoelace area of each row's polygon; ``keep`` drops vertices (they are skipped)."""
    if keep is None:
        keep = np.ones(xs.shape, dtype=bool)
    n, k = xs.shape
    # next kept vertex for each position (cyclic): scan a doubled array from the right
    pos = np.where(np.tile(keep, 2), np.tile(np.arange(k), 2)[None, :] + np.repeat([0, k], k)[None, :], 2 * k + k)
    nxt = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1]
    # next kept after position j is nxt[j + 1]
    nxt_idx = nxt[:, 1:k + 1] % k
    rows = np.arange(n)[:, None]
    x2 = xs[rows, nxt_idx]
    y2 = ys[rows, nxt_idx]
    cross = np.where(keep, xs * y2 - x2 * ys, 0.0)
    return 0.5 * np.abs(cross.sum(axis=1))


def _hull_keep(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Vertices of each star polygon that lie on its convex hull.

    A reflex vertex of a simple polygon is never a hull vertex, so removing all reflex
    vertices at once and repeating until none is left yields the hull (at most 16 rounds,
    each vectorised over all nuclei).
    """
    n, k = xs.shape
    keep = np.ones((n, k), dtype=bool)
    rows = np.arange(n)[:, None]
    base = np.tile(np.arange(k), 3)[None, :]
    for _ in range(k):
        # previous / next kept vertex of every position (cyclic) via running max/min
        kept3 = np.tile(keep, 3)
        prev_pos = np.where(kept3, base + np.repeat([0, k, 2 * k], k)[None, :], -1)
        prev_pos = np.maximum.accumulate(prev_pos, axis=1)
        next_pos = np.where(kept3, base + np.repeat([0, k, 2 * k], k)[None, :], 10 * k)
        next_pos = np.minimum.accumulate(next_pos[:, ::-1], axis=1)[:, ::-1]
        prv = prev_pos[:, k - 1:2 * k - 1] % k
        nxt = next_pos[:, k + 1:2 * k + 1] % k
        ax, ay = xs[rows, prv], ys[rows, prv]
        bx, by = xs[rows, nxt], ys[rows, nxt]
        cross = (xs - ax) * (by - ys) - (ys - ay) * (bx - xs)
        # polygon vertices go counter-clockwise in (x, y-down) maths => convex where cross > 0
        reflex = keep & (cross < -1e-9) & (keep.sum(axis=1, keepdims=True) > 3)
        if not reflex.any():
            break
        keep &= ~reflex
    return keep


def label_type_probabilities(labels: np.ndarray, type_probs: np.ndarray, n_labels: int) -> np.ndarray:
    """Per label value ``0..n_labels-1``: the mean type probability over its pixels, renormalised
    over the nucleus types (channel 0, background, dropped); ``type_probs`` is C × ``labels.shape``."""
    flat = labels.ravel()
    sums = np.stack([np.bincount(flat, weights=type_probs[k].ravel().astype(np.float64), minlength=n_labels)
                     for k in range(1, type_probs.shape[0])], axis=1)
    return sums / np.maximum(sums.sum(axis=1, keepdims=True), 1e-12)


def check_type_merge(merge: Mapping[str, str] | None, type_names: Sequence[str]) -> dict[str, str]:
    """``merge`` ({merged type: the type it joins}) checked against ``type_names`` (ValueError)."""
    if merge is not None and not isinstance(merge, Mapping):
        raise ValueError(f"type_merge must map a type to the type it joins, not {type(merge).__name__}")
    merge = dict(merge or {})
    names = list(type_names)
    for src, dst in merge.items():
        if src not in names or dst not in names or dst in merge or src == dst:
            raise ValueError(f"type_merge {src!r} -> {dst!r} does not fit the types {names} "
                             "(both must be types, and a target cannot itself be merged)")
    return merge


def merged_type_ids(type_names: Sequence[str], merge: Mapping[str, str] | None) -> np.ndarray:
    """Lookup table type id -> its id after ``merge`` (ids 1..K index ``type_names``; 0, no type,
    stays 0), so a truth map can be merged the way :func:`decide_types` merges the calls."""
    names = list(type_names)
    table = np.arange(len(names) + 1)
    for src, dst in check_type_merge(merge, names).items():
        table[names.index(src) + 1] = names.index(dst) + 1
    return table


def merge_type_names(types: Sequence[str], merge: Mapping[str, str] | None) -> np.ndarray:
    """Type labels with every merged type replaced by the type it joins (for labels decided
    elsewhere, e.g. a type refiner's)."""
    merge = dict(merge or {})
    return np.asarray([merge.get(t, t) for t in types], dtype=object)


def decide_types(probs: np.ndarray, type_names: Sequence[str], weights: Sequence[float] | None = None,
                 merge: Mapping[str, str] | None = None) -> np.ndarray:
    """Index into ``type_names`` of each row's type: the argmax of ``probs`` (n x types) times
    ``weights``. A type in ``merge`` is never chosen: its weighted probability joins its target's
    first (CoNSeP's "other" is a remainder, not a lineage: docs/DECISIONS.md, session 17)."""
    decide = np.asarray(probs, np.float64) * (np.asarray(weights, np.float64) if weights is not None else 1.0)
    names = list(type_names)
    for src, dst in check_type_merge(merge, names).items():
        i, j = names.index(src), names.index(dst)
        decide[:, j] = decide[:, j] + decide[:, i]
        decide[:, i] = -np.inf
    return decide.argmax(axis=1) if len(decide) else np.zeros(0, np.int64)


def measure_instances(instances: np.ndarray, mpp: float, *, type_probs: np.ndarray | None = None,
                      type_names: Sequence[str] = (), type_weights: Sequence[float] | None = None,
                      type_merge: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per instance of ``instances`` (int labels, 0 = background).

    Columns: ``id``, ``x_px``, ``y_px``, ``area_um2``, ``perimeter_um``, ``eccentricity``,
    ``solidity``, ``type``, ``prob_<type>`` (when ``type_probs`` of shape C x H x W with
    background at index 0 is given; ``type`` by :func:`decide_types` with ``type_weights`` and
    ``type_merge``) and ``ray_00`` .. ``ray_15`` in µm.

    Perimeter is the Crofton-style estimate (pixel-edge count x π/4); solidity is the area of
    the 16-ray star polygon over the area of its convex hull.
    """
    instances = np.asarray(instances)
    h, w = instances.shape
    flat = instances.ravel().astype(np.int64)
    n_max = int(flat.max()) if flat.size else 0
    counts = np.bincount(flat, minlength=n_max + 1)
    labels = np.nonzero(counts)[0]
    labels = labels[labels > 0]
    cols: dict[str, np.ndarray] = {}
    if labels.size == 0:
        frame = pd.DataFrame({"id": np.zeros(0, np.int64), "x_px": [], "y_px": [], "area_um2": [],
                              "perimeter_um": [], "eccentricity": [], "solidity": [],
                              "type": pd.Series([], dtype=object)})
        for name in type_names:
            frame[f"prob_{name}"] = np.zeros(0)
        for c in RAY_COLUMNS:
            frame[c] = np.zeros(0)
        return frame
    yy, xx = np.divmod(np.arange(flat.size, dtype=np.int64), w)
    area = counts[labels].astype(np.float64)
    sx = np.bincount(flat, weights=xx, minlength=n_max + 1)[labels]
    sy = np.bincount(flat, weights=yy, minlength=n_max + 1)[labels]
    cx, cy = sx / area, sy / area
    sxx = np.bincount(flat, weights=xx.astype(np.float64) ** 2, minlength=n_max + 1)[labels] / area - cx**2
    syy = np.bincount(flat, weights=yy.astype(np.float64) ** 2, minlength=n_max + 1)[labels] / area - cy**2
    sxy = np.bincount(flat, weights=(xx * yy).astype(np.float64), minlength=n_max + 1)[labels] / area - cx * cy
    tr = sxx + syy
    disc = np.sqrt(np.maximum(((sxx - syy) / 2) ** 2 + sxy**2, 0))
    l1, l2 = tr / 2 + disc, tr / 2 - disc
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - np.maximum(l2, 0) / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)

    # perimeter: count label changes between 4-neighbours (borders of the map count too)
    padded = np.pad(instances, 1)
    edges = np.zeros(n_max + 1, dtype=np.float64)
    for a, b in ((padded[1:, :], padded[:-1, :]), (padded[:, 1:], padded[:, :-1])):
        diff = a != b
        edges += np.bincount(a[diff].astype(np.int64), minlength=n_max + 1)[: n_max + 1]
        edges += np.bincount(b[diff].astype(np.int64), minlength=n_max + 1)[: n_max + 1]
    perim = edges[labels] * (np.pi / 4.0)

    # bounding radius for the ray sampler
    big = np.iinfo(np.int64).max
    minx = np.full(n_max + 1, big)
    maxx = np.full(n_max + 1, -1)
    miny = np.full(n_max + 1, big)
    maxy = np.full(n_max + 1, -1)
    fg = flat > 0
    np.minimum.at(minx, flat[fg], xx[fg])
    np.maximum.at(maxx, flat[fg], xx[fg])
    np.minimum.at(miny, flat[fg], yy[fg])
    np.maximum.at(maxy, flat[fg], yy[fg])
    rx = np.maximum(maxx[labels] - cx, cx - minx[labels])
    ry = np.maximum(maxy[labels] - cy, cy - miny[labels])
    radius = np.hypot(rx, ry) + 1.0
    rays = _star_rays(instances, cx, cy, labels, radius)
    vx = rays * _COS[None, :]
    vy = rays * _SIN[None, :]
    star_area = _polygon_area(vx, vy)
    hull_area = _polygon_area(vx, vy, _hull_keep(vx, vy))
    solidity = np.where(hull_area > 0, np.clip(star_area / np.where(hull_area > 0, hull_area, 1), 0, 1), 1.0)

    cols["id"] = labels.astype(np.int64)
    cols["x_px"] = cx
    cols["y_px"] = cy
    cols["area_um2"] = area * mpp * mpp
    cols["perimeter_um"] = perim * mpp
    cols["eccentricity"] = ecc
    cols["solidity"] = solidity
    frame = pd.DataFrame(cols)
    if type_probs is not None and len(type_names):
        probs = label_type_probabilities(flat, type_probs, n_max + 1)[labels]
        frame["type"] = np.asarray(type_names, dtype=object)[decide_types(probs, type_names, type_weights, type_merge)]
        for k, name in enumerate(type_names):
            frame[f"prob_{name}"] = probs[:, k]
    else:
        frame["type"] = "nucleus"
    ray_frame = pd.DataFrame(rays.astype(np.float64) * mpp, columns=RAY_COLUMNS)
    return pd.concat([frame, ray_frame], axis=1)
