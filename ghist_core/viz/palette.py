"""Every colour the app draws with, in one place: cell types, expression maps, survival
groups, volcano classes.

Why fixed: a reader compares figures across pages, slides and papers; "Malignant" must be
the same colour in the map, the stacked bars and the heatmap legend every time.

Cell types use Paul Tol's *muted* qualitative scheme (9 colours, designed to stay
distinguishable for deuteranopia, protanopia and tritanopia; Tol P., "Colour Schemes",
SRON/EPS/TN/09-002, 2021). Unknown types fall back to Tol's pale grey ``#DDDDDD``.
Expression uses viridis (default) or cividis (optimised for colour-vision deficiency;
Nuñez et al., PLoS ONE 2018), perceptually uniform and readable in greyscale. Groups of
patients (Kaplan–Meier curves, feature box plots) take Okabe & Ito's colours in order;
the volcano plot's up/down classes use Paul Tol's *bright* red and blue.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: The 9 GHIST cell types in the order of the GHIST breast config.
CELL_TYPES: tuple[str, ...] = (
    "B", "Myeloid", "Endothelial", "Fibroblast", "Macrophage",
    "Malignant", "Epithelial", "Plasma", "T",
)

#: Paul Tol "muted": rose, indigo, sand, green, cyan, wine, teal, olive, purple.
CELL_TYPE_COLOURS: dict[str, str] = {
    "B": "#88CCEE",            # cyan
    "Myeloid": "#DDCC77",      # sand
    "Endothelial": "#117733",  # green
    "Fibroblast": "#999933",   # olive
    "Macrophage": "#AA4499",   # purple
    "Malignant": "#CC6677",    # rose
    "Epithelial": "#332288",   # indigo
    "Plasma": "#44AA99",       # teal
    "T": "#882255",            # wine
}
#: How each type is named to users (legends, tables, captions); the data keeps the short names.
CELL_TYPE_LABELS: dict[str, str] = {
    "B": "B cells",
    "Myeloid": "Myeloid cells",
    "Endothelial": "Endothelial cells",
    "Fibroblast": "Fibroblasts",
    "Macrophage": "Macrophages",
    "Malignant": "Malignant cells",
    "Epithelial": "Epithelial cells",
    "Plasma": "Plasma cells",
    "T": "T cells",
}


def cell_type_label(cell_type) -> str:
    """The display name of a cell type ("T" → "T cells"); other names are shown as they are."""
    return CELL_TYPE_LABELS.get(str(cell_type), str(cell_type))


#: Colour for any type outside the 9 (e.g. "Unknown").
OTHER_COLOUR = "#DDDDDD"

#: Okabe & Ito (2008) colour-blind-safe palette, fixed order; groups take colours in order.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
#: Volcano plot classes (Tol bright red / blue, pale grey).
VOLCANO_COLOURS: dict[str, str] = {"up": "#EE6677", "down": "#4477AA", "not significant": "#BBBBBB"}

# 9 anchor colours of each map (from matplotlib's published tables, evenly spaced 0..1).
_ANCHORS: dict[str, list[str]] = {
    "viridis": ["#440154", "#472D7B", "#3B528B", "#2C728E", "#21918C",
                "#28AE80", "#5EC962", "#ADDC30", "#FDE725"],
    "cividis": ["#00224E", "#1A386F", "#434E6C", "#61656F", "#7D7C78",
                "#9B9476", "#BCAE6C", "#DEC958", "#FEE838"],
}
EXPRESSION_MAPS: tuple[str, ...] = tuple(_ANCHORS)


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgba(colour: str, alpha: float) -> str:
    """``"#RRGGBB"`` as a CSS ``rgba(r,g,b,alpha)`` string (translucent bands)."""
    r, g, b = hex_to_rgb(colour)
    return f"rgba({r},{g},{b},{alpha})"


def group_colours(groups: Iterable) -> dict:
    """Fixed Okabe–Ito colour per group, in the order given (cycles after 8 groups)."""
    return {g: OKABE_ITO[i % len(OKABE_ITO)] for i, g in enumerate(groups)}


def cell_type_colour(cell_type: str) -> str:
    """Hex colour of a cell type (grey for unknown types)."""
    return CELL_TYPE_COLOURS.get(str(cell_type), OTHER_COLOUR)


def cell_type_rgb(types: Iterable[str] | np.ndarray) -> np.ndarray:
    """(n, 3) uint8 RGB for a vector of cell-type labels, vectorised over unique labels."""
    arr = np.asarray(list(types) if not isinstance(types, np.ndarray) else types).astype(str)
    uniq, inv = np.unique(arr, return_inverse=True)
    lut = np.array([hex_to_rgb(cell_type_colour(u)) for u in uniq], dtype=np.uint8).reshape(-1, 3)
    return lut[inv.reshape(-1)]


def ordered_types(types: Iterable[str]) -> list[str]:
    """The 9 GHIST types first in their fixed order, then any others alphabetically."""
    present = {str(t) for t in types}
    known = [t for t in CELL_TYPES if t in present]
    return known + sorted(present - set(CELL_TYPES))


def colour_lut(name: str = "viridis", n: int = 256) -> np.ndarray:
    """(n, 3) uint8 look-up table interpolated from the map's anchors."""
    if name not in _ANCHORS:
        raise ValueError(f"Unknown colour map {name!r}; use one of {', '.join(EXPRESSION_MAPS)}.")
    anchors = np.array([hex_to_rgb(c) for c in _ANCHORS[name]], dtype=float)
    pos = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, n)
    lut = np.stack([np.interp(t, pos, anchors[:, k]) for k in range(3)], axis=1)
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)


def plotly_colorscale(name: str = "viridis") -> list[list]:
    """The same map as a plotly colourscale, so plotly and deck.gl figures agree."""
    if name not in _ANCHORS:
        raise ValueError(f"Unknown colour map {name!r}; use one of {', '.join(EXPRESSION_MAPS)}.")
    anchors = _ANCHORS[name]
    return [[i / (len(anchors) - 1), c] for i, c in enumerate(anchors)]


def value_range(values: np.ndarray, *, robust: bool = True) -> tuple[float, float]:
    """Colour limits: 1st-99th percentile by default so one outlier cell does not wash out the map."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (np.percentile(v, [1, 99]) if robust else (v.min(), v.max()))
    if not hi > lo:
        hi = lo + 1e-6 if lo == 0 else lo + abs(lo) * 1e-6
    return float(lo), float(hi)


def map_values(values: np.ndarray, vmin: float, vmax: float, name: str = "viridis") -> np.ndarray:
    """(n, 3) uint8 colours for values, clipped to [vmin, vmax]; NaN maps to grey."""
    v = np.asarray(values, dtype=float)
    lut = colour_lut(name)
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((v - vmin) / span, 0.0, 1.0)
    idx = np.nan_to_num(t * (len(lut) - 1), nan=0.0).astype(np.int64)
    out = lut[idx]
    nan = ~np.isfinite(v)
    if nan.any():
        out[nan] = hex_to_rgb(OTHER_COLOUR)
    return out
