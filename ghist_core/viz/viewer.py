"""Full-resolution cell viewer: the slide's own pixels under nucleus outlines.

The whole-slide gene map (:func:`ghist_core.viz.figures.gene_map`) draws cells over a
~1,500 px overview; this module is the close-up. :func:`read_window` reads one window of the
project's copy of the slide at the magnification asked for (up to the scan's own resolution)
through :class:`ghist_core.io.slide.Slide`; :func:`cell_view` draws it as a deck.gl
``BitmapLayer`` in slide µm with the cells *inside that window only* (a :class:`CellIndex`
query), as nucleus outlines (``PolygonLayer`` from the 16-ray star contours) from
:data:`OUTLINE_MIN_MAGNIFICATION` up and as points below it.

Why a window read per view and not a tile server: Streamlit's deck.gl JSON renderer cannot
express a ``TileLayer`` that draws image tiles (``renderSubLayers`` must be a JavaScript
function), and serving a tile cache through Streamlit's static folder would put the patient's
slide on an unauthenticated URL and image files in the project (docs/SECURITY.md). One JPEG of
at most :data:`WINDOW_PX`² pixels travels over the app's own websocket instead; the timings are
in ``bench/results/app.json`` (``viewer``).

Every panel of a page gets the same window and view state, so side-by-side genes stay
zoom-linked, and may share one colour scale (:func:`shared_range`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pydeck as pdk

from ghist_core._keys import OBS_CELL_TYPE, OBSM_SPATIAL, nucleus_rays
from ghist_core.safe_text import html_text
from ghist_core.viz import palette
from ghist_core.viz.figures import FastDeck, GeneMap, gene_values, image_data_url, value_name, value_units

#: Longest side, in screen pixels, of the window read around the centre (a margin around a
#: ~700 px panel, so a little panning still shows tissue).
WINDOW_PX = 1024
#: Magnifications offered (objective-style: 40× = 0.25 µm per screen pixel).
MAGNIFICATIONS = (5, 10, 20, 40)
#: From this magnification up nuclei are drawn as outlines, below it as points.
OUTLINE_MIN_MAGNIFICATION = 20
#: Most nucleus outlines (16 vertices each) one panel sends; beyond, points are drawn.
MAX_OUTLINES = 25_000
#: Most objects one panel sends at all (the page's browser budget is ~200k over 4 panels).
MAX_VIEW_OBJECTS = 50_000


def um_per_screen_px(magnification: float) -> float:
    """µm per screen pixel at an objective-style magnification (10× = 1 µm/px)."""
    return 10.0 / float(magnification)


def zoom_for(magnification: float) -> float:
    """deck.gl ``OrthographicView`` zoom (log2 screen px per µm) for a magnification."""
    return math.log2(1.0 / um_per_screen_px(magnification))


# --- geometry ----------------------------------------------------------------------------

def ray_angles(n_rays: int) -> np.ndarray:
    """Angles of the star contour: 2πk/n from +x towards +y (the segmentation's convention)."""
    return 2.0 * np.pi * np.arange(n_rays) / n_rays


def nucleus_polygons(xy_um: np.ndarray, rays_um: np.ndarray) -> np.ndarray:
    """Vertices ``(n, n_rays, 2)`` in µm of each nucleus' star contour (vectorised).

    Vertex *k* of cell *i* is ``xy[i] + rays[i, k] · (cos θk, sin θk)``.
    """
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    r = np.asarray(rays_um, dtype=np.float64)
    if r.ndim != 2 or len(r) != len(xy):
        raise ValueError(f"rays must be cells × rays matching {len(xy)} centroids, got shape {r.shape}")
    th = ray_angles(r.shape[1])
    out = np.empty((len(xy), r.shape[1], 2))
    out[..., 0] = xy[:, :1] + r * np.cos(th)[None, :]
    out[..., 1] = xy[:, 1:] + r * np.sin(th)[None, :]
    return out


class CellIndex:
    """Bucketed spatial index of cell centroids for viewport queries.

    Cells are sorted by (row of ``bucket_um``-high bands, x); a query binary-searches the
    x range inside each band it touches, so its cost follows the cells in view, not the slide.
    """

    def __init__(self, xy_um: np.ndarray, bucket_um: float = 64.0):
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        self.bucket_um = float(bucket_um)
        self.n = len(xy)
        band = np.floor(xy[:, 1] / self.bucket_um).astype(np.int64) if self.n else np.zeros(0, np.int64)
        self.order = np.lexsort((xy[:, 0], band))
        self._band = band[self.order]
        self._x = xy[self.order, 0]
        self._y = xy[self.order, 1]

    def query(self, bounds_um: Sequence[float]) -> np.ndarray:
        """Indices (into the original order, ascending) of the cells with centroid inside ``(x0, y0, x1, y1)``."""
        x0, y0, x1, y1 = (float(b) for b in bounds_um)
        if self.n == 0 or x1 < x0 or y1 < y0:
            return np.zeros(0, np.int64)
        b0, b1 = math.floor(y0 / self.bucket_um), math.floor(y1 / self.bucket_um)
        lo = np.searchsorted(self._band, b0, "left")
        hi = np.searchsorted(self._band, b1, "right")
        bands = np.arange(b0, b1 + 1)
        starts = np.searchsorted(self._band[lo:hi], bands, "left") + lo
        ends = np.searchsorted(self._band[lo:hi], bands, "right") + lo
        parts = []
        for s, e in zip(starts, ends):  # one step per band in view (a few), not per cell
            a = s + np.searchsorted(self._x[s:e], x0, "left")
            b = s + np.searchsorted(self._x[s:e], x1, "right")
            parts.append(np.arange(a, b))
        pos = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        pos = pos[(self._y[pos] >= y0) & (self._y[pos] <= y1)]
        return np.sort(self.order[pos])


# --- the full-resolution window ----------------------------------------------------------

@dataclass
class Window:
    """One read of the slide: ``rgb`` covers ``bounds_um`` ``(x0, y0, x1, y1)`` at ``mpp`` µm per image pixel."""

    rgb: np.ndarray = field(repr=False)
    bounds_um: tuple[float, float, float, float]
    mpp: float
    magnification: float
    centre_um: tuple[float, float]

    @property
    def data_url(self) -> str:
        if not hasattr(self, "_url"):
            self._url = image_data_url(self.rgb)
        return self._url


def window_bounds(centre_um: Sequence[float], magnification: float, slide_wh_um: Sequence[float],
                  window_px: int = WINDOW_PX) -> tuple[float, float, float, float]:
    """The µm box of ``window_px`` screen pixels around ``centre_um``, moved (not shrunk) inside the slide."""
    side = window_px * um_per_screen_px(magnification)
    w_um, h_um = float(slide_wh_um[0]), float(slide_wh_um[1])
    sw, sh = min(side, w_um), min(side, h_um)
    cx = min(max(float(centre_um[0]), sw / 2), w_um - sw / 2)
    cy = min(max(float(centre_um[1]), sh / 2), h_um - sh / 2)
    return (cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2)


def read_window(slide, centre_um: Sequence[float], magnification: float = 40,
                window_px: int = WINDOW_PX) -> Window:
    """Read the window around ``centre_um`` (µm) at ``magnification`` from an open :class:`Slide`.

    Pixels come at ``max(slide.mpp, µm per screen px)``: the scan's full resolution when the
    view asks for more (a 0.5 µm/px scan at 40× is drawn 2× enlarged by the browser), never
    more pixels than the screen shows.
    """
    w_um, h_um = slide.dimensions[0] * slide.mpp, slide.dimensions[1] * slide.mpp
    x0, y0, x1, y1 = window_bounds(centre_um, magnification, (w_um, h_um), window_px)
    mpp = max(float(slide.mpp), um_per_screen_px(magnification))
    size = (max(1, int(round((x1 - x0) / mpp))), max(1, int(round((y1 - y0) / mpp))))
    rgb = slide.read_region_mpp((x0 / slide.mpp, y0 / slide.mpp), size, mpp)
    return Window(np.ascontiguousarray(rgb[..., :3]), (x0, y0, x1, y1), mpp, float(magnification),
                  ((x0 + x1) / 2, (y0 + y1) / 2))


def read_project_window(project, slide_id: int, centre_um: Sequence[float], magnification: float = 40,
                        window_px: int = WINDOW_PX) -> Window:
    """:func:`read_window` on the project's copy of a slide (its recorded µm per pixel)."""
    from ghist_core.io.slide import open_slide

    record = project.get_slide(int(slide_id))
    with open_slide(project.slide_path(int(slide_id)), mpp=record.mpp) as slide:
        return read_window(slide, centre_um, magnification, window_px)


# --- colour scales -----------------------------------------------------------------------

def shared_range(adata, genes: Sequence[str], index: np.ndarray | None = None) -> tuple[float, float]:
    """One colour range (1st–99th percentile) over all ``genes`` (and cells ``index``), for panels that share a scale."""
    vals = [gene_values(adata, g) for g in genes]
    v = np.concatenate([x if index is None else x[index] for x in vals]) if vals else np.zeros(0)
    return palette.value_range(v)


# --- the close-up map --------------------------------------------------------------------

def cell_view(
    adata,
    gene: str,
    window: Window,
    *,
    index: CellIndex | None = None,
    colour_by: str = "expression",
    colour_map: str = "viridis",
    cell_types: Sequence[str] | None = None,
    vrange: tuple[float, float] | None = None,
    outlines: bool | None = None,
    layer_key: str = "",
    with_image: bool = True,
    max_outlines: int = MAX_OUTLINES,
    max_objects: int = MAX_VIEW_OBJECTS,
    opacity: float = 0.9,
) -> GeneMap:
    """A deck of the full-resolution ``window`` with the cells inside it coloured by ``gene`` or type.

    ``gene`` may also be a map layer's obs column (``figures.map_layers``, e.g. ``"expression_uncertainty"``).

    Outlines from :data:`OUTLINE_MIN_MAGNIFICATION` up (``outlines`` forces either way) when the
    prediction stores the star contours, points otherwise; never more than ``max_objects``
    objects (an even subsample beyond, recorded in the table). ``layer_key`` (e.g. the slide
    id) goes into the layer ids, so deck.gl never reuses one slide's image for another.
    """
    xy = np.asarray(adata.obsm[OBSM_SPATIAL], dtype=np.float64)
    idx = (index or CellIndex(xy)).query(window.bounds_um)
    col = adata.obs[OBS_CELL_TYPE] if OBS_CELL_TYPE in adata.obs else None

    def types_of(rows: np.ndarray) -> np.ndarray:  # only the window's cells: str over 1M cells costs 0.2 s a pan
        return (col.iloc[rows].astype(str).to_numpy() if col is not None
                else np.full(len(rows), "unknown", dtype=object))

    if cell_types is not None:
        idx = idx[np.isin(types_of(idx), list(cell_types))]
    if len(idx) > max_objects:  # an even subsample keeps the browser within its budget
        idx = idx[np.linspace(0, len(idx) - 1, max_objects).astype(np.int64)]
    values = gene_values(adata, gene)[idx]
    rays = nucleus_rays(adata)
    draw_outlines = (window.magnification >= OUTLINE_MIN_MAGNIFICATION) if outlines is None else bool(outlines)
    draw_outlines = draw_outlines and rays is not None and len(idx) <= max_outlines

    units = value_units(adata, gene)
    name = value_name(gene)
    vmin, vmax = vrange if vrange is not None else palette.value_range(values)
    t = types_of(idx)
    rgb = (palette.cell_type_rgb(t) if colour_by == "cell_type"
           else palette.map_values(values, vmin, vmax, colour_map))
    cell_ids = adata.obs["cell_id"].to_numpy()[idx] if "cell_id" in adata.obs else idx
    table = pd.DataFrame({"cell_id": cell_ids, "x_um": np.round(xy[idx, 0], 1), "y_um": np.round(xy[idx, 1], 1),
                          "cell_type": t, "value": values})
    data = pd.DataFrame({"i": cell_ids, "x": table["x_um"], "y": table["y_um"],
                         "t": pd.Series(t).map({s: html_text(palette.cell_type_label(s)) for s in set(t)}).to_numpy(),
                         "v": np.round(values.astype(float), 3),
                         "r": rgb[:, 0], "g": rgb[:, 1], "b": rgb[:, 2]})
    x0, y0, x1, y1 = window.bounds_um
    suffix = f"-{layer_key}" if layer_key else ""
    layers = [pdk.Layer("BitmapLayer", id=f"he-full{suffix}", image=pdk.types.String(window.data_url),
                        bounds=[x0, y1, x1, y0], opacity=1.0, pickable=False)] if with_image else []
    frames: dict[str, pd.DataFrame] = {}
    if draw_outlines:
        poly = np.round(nucleus_polygons(xy[idx], rays[idx]), 2)
        k = poly.shape[1]
        for j in range(k):  # one column per vertex (16), each a whole-array operation
            data[f"px{j}"] = poly[:, j, 0]
            data[f"py{j}"] = poly[:, j, 1]
        ring = ",".join(f"[px{j},py{j}]" for j in range(k))
        frames["@@ghfast:outlines"] = data
        layers.append(pdk.Layer(
            "PolygonLayer", id=f"nuclei{suffix}", data="@@ghfast:outlines", get_polygon=f"[{ring}]",
            filled=True, stroked=True, get_fill_color=f"[r, g, b, {int(0.25 * 255)}]",
            get_line_color=f"[r, g, b, {int(round(255 * opacity))}]", get_line_width=2,
            line_width_units=pdk.types.String("pixels"), pickable=True,
        ))
    else:
        frames["@@ghfast:points"] = data
        layers.append(pdk.Layer(
            "ScatterplotLayer", id=f"cells{suffix}", data="@@ghfast:points", get_position="[x, y]",
            get_fill_color=f"[r, g, b, {int(round(255 * opacity))}]", get_radius=3.0, radius_units=pdk.types.String("common"),
            radius_min_pixels=2, stroked=False, pickable=True,
        ))
    tooltip = {"html": f"<b>cell {{i}}</b> · {{t}}<br/>{html_text(name)}: {{v}} {html_text(units)}<br/>x {{x}} µm, y {{y}} µm",
               "style": {"fontSize": "12px"}}
    cx, cy = window.centre_um
    deck = FastDeck(
        frames=frames, layers=layers, views=[pdk.View(type="OrthographicView", controller=True)],
        initial_view_state=pdk.ViewState(target=[cx, cy, 0], zoom=zoom_for(window.magnification),
                                         min_zoom=zoom_for(window.magnification) - 2, max_zoom=6),
        map_style=None, map_provider=None, tooltip=tooltip,
    )
    return GeneMap(gene, "outlines" if draw_outlines else "cells", colour_by, units, float(vmin), float(vmax),
                 colour_map, table, deck, window.bounds_um, None, window.rgb if with_image else None)
