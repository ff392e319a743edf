"""Figure builders: plotly and pydeck objects the app pages only display.

Why here and not in the pages: the figures hold the decisions a reader relies on
(units, colour limits, palettes, how many points reach the browser), so they are
tested without a browser and reused by the CLI and notebooks.

Gene maps use deck.gl's ``OrthographicView`` in slide micrometres (x right, y down, the
slide's own orientation), the H&E overview as a ``BitmapLayer`` and cells as a
``ScatterplotLayer``. Beyond ``MAX_BROWSER_POINTS`` cells the map switches to the
grid summary (squares of mean expression from :mod:`ghist_core.pipeline.grid`), so the
browser never receives more than that many objects.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pydeck as pdk
from PIL import Image, ImageDraw, ImageFont
from pydeck.bindings.json_tools import default_serialize

from ghist_core import _keys as K
from ghist_core.project.overview import share_text
from ghist_core.safe_text import html_text
from ghist_core.viz import palette
from ghist_core.errors import UnknownGeneError

#: Most objects (points or squares) one map ever sends to the browser.
MAX_BROWSER_POINTS = 200_000
#: In "auto" mode, draw each cell up to this many and the grid summary beyond: deck.gl's JSON
#: path costs the browser about 0.2 ms per object on a CPU-only machine, so 50k keeps a map
#: interactive within seconds; "cells" can still be forced up to MAX_BROWSER_POINTS.
AUTO_CELL_LIMIT = 50_000
#: In "auto" mode the grid summary uses the finest square size with at most this many squares,
#: so opening a big slide stays near a second in a CPU-only browser; "Grid summary" goes finer.
AUTO_GRID_LIMIT = 10_000
#: what a map can show besides a gene, by its obs column (:data:`ghist_core._keys.OBS_MAP_LAYERS`):
#: its label and short units. Maps, close-ups and grid squares take the column name where a gene goes.
MAP_LAYERS: dict[str, tuple[str, str]] = {
    K.OBS_EXPRESSION_UNCERTAINTY: ("Expression uncertainty", "SD across seeds, log1p"),
}
ColourBy = Literal["expression", "cell_type"]
Mode = Literal["auto", "cells", "grid"]


def expression_units(adata) -> str:
    """Units of ``adata.X``: ``uns["ghist"]["expression_units"]`` (or the model card's), else a plain fallback."""
    g = adata.uns.get("ghist", {}) if hasattr(adata, "uns") else {}
    units = None
    if isinstance(g, Mapping):
        card = g.get("model_card") if isinstance(g.get("model_card"), Mapping) else {}
        units = g.get("expression_units") or card.get("expression_units")
    return str(units) if units else "model output units"


def nucleus_scale_note(adata) -> str | None:
    """What the page says when the segmenter's scale check segmented some nuclei at another factor
    (``obs["nucleus_scale"]``): they looked larger than its training nuclei, the sign of large tumour
    nuclei or of a µm per pixel that is too large. None when every nucleus was segmented as stated."""
    if not hasattr(adata, "obs") or K.OBS_NUCLEUS_SCALE not in adata.obs or not adata.n_obs:
        return None
    f = adata.obs[K.OBS_NUCLEUS_SCALE].to_numpy(np.float64)
    moved = np.isfinite(f) & (f != 1.0)  # NaN: a cell from a result without the column (concatenated)
    if not moved.any():
        return None
    factors = ", ".join(f"{v:.2g}" for v in np.unique(np.round(f[moved], 3)))
    share = moved.mean()
    part = share_text(share).capitalize()
    g = adata.uns.get(K.UNS_GHIST, {}) if isinstance(adata.uns.get(K.UNS_GHIST), Mapping) else {}
    record = g.get(K.GHIST_NUCLEUS_SCALE)
    setting = record.get("setting") if isinstance(record, Mapping) else None
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):  # a factor set for the run, no check
        return (f"{part} of the nuclei were segmented at {factors}× scale, the factor set for this run "
                f"(per cell in obs['{K.OBS_NUCLEUS_SCALE}']).")
    mpp = g.get("mpp")
    at = f" at {float(mpp):.3g} µm per pixel" if isinstance(mpp, (int, float)) else ""
    return (f"{part} of the nuclei were segmented at {factors}× scale: in those regions the nuclei looked "
            f"larger than the ones the segmenter was trained on, so it read the image shrunk (its scale check; "
            f"per cell in obs['{K.OBS_NUCLEUS_SCALE}']). Large tumour nuclei do this; so does a wrong resolution. "
            f"If this slide was not scanned{at}, correct its µm per pixel on the Home page (Edit or delete) "
            "and run it again.")


def stain_check_note(adata) -> str | None:
    """The run's stain note (``uns["ghist"]["stain_check"]["note"]``): set when the slide's stain lies
    outside the range the nucleus segmenter was trained and tested on; None otherwise."""
    g = adata.uns.get(K.UNS_GHIST) if hasattr(adata, "uns") else None
    record = g.get(K.GHIST_STAIN_CHECK) if isinstance(g, Mapping) else None
    note = record.get("note") if isinstance(record, Mapping) else None
    return str(note) if note else None


def units_label(units: str) -> str:
    """A short form of the units for axes and colour bars (the full sentence goes in captions)."""
    if len(units) <= 32:
        return units
    if "CP10k" in units:
        return "CP10k scale"
    return units[:29].rstrip() + "…"


def map_layers(adata) -> list[str]:
    """The map layers (:data:`MAP_LAYERS`) this prediction holds, to offer beside its genes."""
    return [c for c in MAP_LAYERS if c in adata.obs]


def value_name(name: str) -> str:
    """A gene's name, or a map layer's label ("Expression uncertainty"), for tooltips."""
    return MAP_LAYERS[name][0] if name in MAP_LAYERS else name


def value_label(name: str) -> str:
    """What a map of ``name`` shows, for titles: "ERBB2 predicted expression" or a layer's label."""
    return value_name(name) if name in MAP_LAYERS else f"{name} predicted expression"


def value_units(adata, name: str) -> str:
    """Short units of a map of ``name``: the expression's (:func:`units_label`) or the layer's own."""
    return MAP_LAYERS[name][1] if name in MAP_LAYERS else units_label(expression_units(adata))


def gene_values(adata, gene: str) -> np.ndarray:
    """Dense float vector of one gene's predicted expression, or of a map layer (:data:`MAP_LAYERS`,
    an obs column; a grid summary holds its mean per square). Raises UnknownGeneError."""
    if gene in MAP_LAYERS and gene not in adata.var_names:
        if gene not in adata.obs:
            raise UnknownGeneError(
                f"This prediction has no {MAP_LAYERS[gene][0].lower()}: it needs a model with several ensemble "
                "members, predicted with the uncertainty setting on.")
        return adata.obs[gene].to_numpy(np.float32)
    if gene not in adata.var_names:
        raise UnknownGeneError(f"The model does not predict {gene!r}. Pick a gene from the list.")
    j = int(adata.var_names.get_loc(gene))
    col = adata.X[:, j]
    col = col.toarray() if hasattr(col, "toarray") else np.asarray(col)
    return np.asarray(col, dtype=np.float32).reshape(-1)


def image_data_url(rgb: np.ndarray, fmt: str = "JPEG") -> str:
    """An RGB array as a ``data:`` URL, so the BitmapLayer needs no file server (JPEG: ~10× smaller)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format=fmt, quality=88)
    mime = "png" if fmt.upper() == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def choose_mode(n_cells: int, requested: Mode = "auto", limit: int = MAX_BROWSER_POINTS,
                auto_limit: int = AUTO_CELL_LIMIT) -> str:
    """``"cells"`` up to ``auto_limit`` cells in auto mode (``limit`` when cells are asked for), else ``"grid"``."""
    if requested == "grid":
        return "grid"
    if n_cells > (limit if requested == "cells" else min(limit, auto_limit)):
        return "grid"
    return "cells"


def pick_grid_size(grids: Mapping[float, object], limit: int = MAX_BROWSER_POINTS) -> float:
    """Finest grid whose number of squares is within ``limit``."""
    if not grids:
        raise ValueError("No grid summary is available for this slide.")
    for size in sorted(grids):
        if grids[size].n_obs <= limit:
            return float(size)
    return float(max(grids))


def initial_view(bounds_um: Sequence[float], width_px: int = 700, height_px: int = 520) -> pdk.ViewState:
    """Centre the whole slide in the view; zoom is log2(screen px per µm)."""
    x0, y0, x1, y1 = (float(b) for b in bounds_um)
    w, h = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
    zoom = math.log2(min(width_px / w, height_px / h) * 0.95)
    return pdk.ViewState(target=[(x0 + x1) / 2, (y0 + y1) / 2, 0], zoom=zoom, min_zoom=zoom - 2, max_zoom=6)


def _default(o):
    out = default_serialize(o)
    if isinstance(out, dict):
        for k in [k for k in out if k.startswith("_ghfast")]:
            del out[k]
    return out


class FastDeck(pdk.Deck):
    """A Deck whose JSON is compact and built once.

    pydeck pretty-prints with ``indent=2``, which forces Python's slow pure-Python JSON encoder
    (seconds for 200k points). Here layer data stay DataFrames until ``to_json``, which writes
    them with pandas' C encoder into a compact spec and keeps the string (Streamlit calls
    ``to_json`` on every rerun; cached decks then cost nothing).
    """

    def __init__(self, *args, frames: Mapping[str, pd.DataFrame] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._ghfast_frames = dict(frames or {})
        self._ghfast_json: str | None = None

    def to_json(self) -> str:  # noqa: D102
        if self._ghfast_json is None:
            text = json.dumps(self, default=_default, sort_keys=True, separators=(",", ":"))
            for token, frame in self._ghfast_frames.items():
                text = text.replace(json.dumps(token), frame.to_json(orient="records", double_precision=4), 1)
            self._ghfast_json = text
        return self._ghfast_json


@dataclass
class GeneMap:
    """One map: the deck plus what the page shows around it (colour bar, legend, table).

    ``table`` holds exactly the objects sent to the browser (cells or grid squares) with
    ``x_um``, ``y_um`` and the value, so CSV download and tests see the same data.
    """

    gene: str
    mode: str  # "cells" | "grid"
    colour_by: str
    units: str
    vmin: float
    vmax: float
    colour_map: str
    table: pd.DataFrame
    deck: pdk.Deck
    bounds_um: tuple[float, float, float, float]
    grid_size_um: float | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_objects(self) -> int:
        return len(self.table)


def _bounds_from(xy: np.ndarray, bounds_um: Sequence[float] | None) -> tuple[float, float, float, float]:
    if bounds_um is not None:
        b = tuple(float(v) for v in bounds_um)
        return b  # type: ignore[return-value]
    if len(xy) == 0:
        return (0.0, 0.0, 1.0, 1.0)
    return (0.0, 0.0, float(xy[:, 0].max()) * 1.02 + 1, float(xy[:, 1].max()) * 1.02 + 1)


def _cells_table(adata, gene: str, cell_types: Sequence[str] | None) -> pd.DataFrame:
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    obs = adata.obs
    t = pd.DataFrame({
        "cell_id": (obs["cell_id"].to_numpy() if "cell_id" in obs else np.arange(adata.n_obs)),
        "x_um": np.round(xy[:, 0], 1),
        "y_um": np.round(xy[:, 1], 1),
        "cell_type": (obs["cell_type"].astype(str).to_numpy() if "cell_type" in obs else "unknown"),
        "value": gene_values(adata, gene),
    })
    if cell_types is not None:
        t = t[t["cell_type"].isin(list(cell_types))]
    return t.reset_index(drop=True)


def _grid_table(grid, gene: str, cell_types: Sequence[str] | None) -> pd.DataFrame:
    obs = grid.obs
    t = pd.DataFrame({
        "x_um": obs["x_um"].to_numpy(float),
        "y_um": obs["y_um"].to_numpy(float),
        "n_cells": obs["n_cells"].to_numpy(np.int64),
        "value": gene_values(grid, gene),
    })
    counts = [c for c in obs.columns if c.startswith("count_")]
    if counts:
        names = np.array([c[len("count_"):] for c in counts])
        mat = obs[counts].to_numpy()
        t["cell_type"] = names[np.argmax(mat, axis=1)]  # majority type per square
        if cell_types is not None:
            keep = [i for i, n in enumerate(names) if n in set(cell_types)]
            t = t[mat[:, keep].sum(axis=1) > 0] if keep else t.iloc[:0]
    else:
        t["cell_type"] = "unknown"
    return t.reset_index(drop=True)


def gene_map(
    adata,
    gene: str,
    *,
    image: np.ndarray | None = None,
    bounds_um: Sequence[float] | None = None,
    grids: Mapping[float, object] | None = None,
    mode: Mode = "auto",
    colour_by: ColourBy = "expression",
    colour_map: str = "viridis",
    cell_types: Sequence[str] | None = None,
    vrange: tuple[float, float] | None = None,
    point_radius_um: float = 4.0,
    opacity: float = 0.85,
    view: pdk.ViewState | None = None,
    height_px: int = 520,
    limit: int = MAX_BROWSER_POINTS,
    layer_key: str = "",
) -> GeneMap:
    """Build one gene map of a predicted slide.

    ``gene`` may also be a map layer's obs column (:func:`map_layers`, e.g. ``"expression_uncertainty"``).
    ``image``/``bounds_um`` are the H&E overview and its extent ``(x0, y0, x1, y1)`` in µm;
    ``grids`` the grid summaries by square size (µm), used when ``mode`` resolves to grid.
    ``cell_types`` keeps only those types; ``colour_by="cell_type"`` colours by the fixed palette.
    ``layer_key`` (e.g. the slide id) goes into the layer ids, so deck.gl never keeps one
    slide's H&E under another slide's cells while the new image loads.
    """
    suffix = f"-{layer_key}" if layer_key else ""
    n = int(adata.n_obs)
    resolved = choose_mode(n, mode, limit, min(limit, AUTO_CELL_LIMIT))
    if resolved == "grid" and not grids:
        if n > limit:
            raise ValueError(f"{n:,} cells are too many to draw one by one and no grid summary exists.")
        resolved = "cells"
    grid_size = None
    if resolved == "cells":
        table = _cells_table(adata, gene, cell_types)
    else:
        grid_size = pick_grid_size(grids, min(limit, AUTO_GRID_LIMIT) if mode == "auto" else limit)
        table = _grid_table(grids[grid_size], gene, cell_types)

    units = value_units(adata, gene)
    name = value_name(gene)
    vmin, vmax = vrange if vrange is not None else palette.value_range(table["value"].to_numpy())
    if colour_by == "cell_type":
        rgb = palette.cell_type_rgb(table["cell_type"].to_numpy())
    else:
        rgb = palette.map_values(table["value"].to_numpy(), vmin, vmax, colour_map)
    alpha = int(round(255 * opacity))
    data = table.copy()
    data["value"] = data["value"].astype(float).round(3)
    data["r"], data["g"], data["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    # the tooltip shows the display name ("T cells"); names come from the model card: escaped for its HTML.
    # ``table`` (CSV, legend counts, PNG) keeps the short names.
    types = data["cell_type"].astype(str)
    data["cell_type"] = types.map({t: html_text(palette.cell_type_label(t)) for t in types.unique()})

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) if n else np.zeros((0, 2))
    bounds = _bounds_from(xy, bounds_um)
    layers: list[pdk.Layer] = []
    if image is not None:
        x0, y0, x1, y1 = bounds
        layers.append(pdk.Layer(
            "BitmapLayer", id=f"he{suffix}", image=pdk.types.String(image_data_url(image)),
            bounds=[x0, y1, x1, y0],  # left, bottom, right, top (y grows downwards)
            opacity=1.0, pickable=False,
        ))
    frames: dict[str, pd.DataFrame] = {}
    if resolved == "cells":
        frames["@@ghfast:cells"] = data[["cell_id", "x_um", "y_um", "cell_type", "value", "r", "g", "b"]].rename(
            columns={"cell_id": "i", "x_um": "x", "y_um": "y", "cell_type": "t", "value": "v"})
        layers.append(pdk.Layer(
            "ScatterplotLayer", id=f"cells{suffix}", data="@@ghfast:cells",
            get_position="[x, y]", get_fill_color=f"[r, g, b, {alpha}]", get_radius=point_radius_um,
            radius_units="common", radius_min_pixels=1, stroked=False, pickable=True,
        ))
        tooltip = {"html": f"<b>cell {{i}}</b> · {{t}}<br/>{html_text(name)}: {{v}} {html_text(units)}<br/>x {{x}} µm, y {{y}} µm"}
    else:
        half = grid_size / 2.0
        data["x0"] = data["x_um"] - half
        data["y0"] = data["y_um"] - half
        frames["@@ghfast:grid"] = data[["x0", "y0", "x_um", "y_um", "n_cells", "cell_type", "value", "r", "g", "b"]].rename(
            columns={"x_um": "x", "y_um": "y", "n_cells": "n", "cell_type": "t", "value": "v"})
        layers.append(pdk.Layer(
            "GridCellLayer", id=f"grid{suffix}", data="@@ghfast:grid",
            get_position="[x0, y0]", cell_size=grid_size, extruded=False, coverage=1.0,
            get_fill_color=f"[r, g, b, {alpha}]", pickable=True,
        ))
        tooltip = {"html": (f"<b>{grid_size:g} µm square</b> at x {{x}} µm, y {{y}} µm<br/>"
                            f"{{n}} cells, mostly {{t}}<br/>mean {html_text(name)}: {{v}} {html_text(units)}")}
    deck = FastDeck(
        frames=frames,
        layers=layers,
        views=[pdk.View(type="OrthographicView", controller=True)],
        initial_view_state=view or initial_view(bounds, height_px=height_px),
        map_style=None, map_provider=None,
        tooltip={**tooltip, "style": {"fontSize": "12px"}},
    )
    return GeneMap(gene, resolved, colour_by, units, float(vmin), float(vmax), colour_map,
                   table, deck, bounds, grid_size, image)


def colour_bar(gm: GeneMap, *, height: int = 90) -> go.Figure:
    """Horizontal colour bar for a gene map, ticks in expression units."""
    if gm.colour_by == "cell_type":
        return cell_type_legend(sorted(set(gm.table["cell_type"])))
    xs = np.linspace(gm.vmin, gm.vmax, 128)
    fig = go.Figure(go.Heatmap(
        z=[xs], x=xs, y=[""], colorscale=palette.plotly_colorscale(gm.colour_map),
        zmin=gm.vmin, zmax=gm.vmax, showscale=False, hoverinfo="x",
    ))
    fig.update_layout(
        height=height, margin=dict(l=10, r=10, t=5, b=50),
        xaxis=dict(title=f"{value_label(gm.gene)} ({gm.units})", range=[gm.vmin, gm.vmax]),
        yaxis=dict(showticklabels=False),
    )
    return fig


def cell_type_legend(types: Sequence[str], counts: Mapping[str, int] | None = None) -> go.Figure:
    """One legend of the fixed cell-type colours (display names, "T cells"); with ``counts`` (keyed by
    the short names) each bar is that type's number of cells."""
    ordered = palette.ordered_types(types)
    n = [int(counts.get(t, 0)) for t in ordered] if counts is not None else [1] * len(ordered)
    fig = go.Figure(go.Bar(
        x=n, y=[palette.cell_type_label(t) for t in ordered], orientation="h", marker_color=[palette.cell_type_colour(t) for t in ordered],
        text=[f"{v:,}" for v in n] if counts is not None else None, textposition="auto",
        hovertemplate="%{y}: %{x:,} cells<extra></extra>" if counts is not None else "%{y}<extra></extra>",
    ))
    fig.update_layout(height=40 + 22 * len(ordered), margin=dict(l=10, r=10, t=5, b=5),
                      xaxis=dict(visible=counts is not None, title="cells shown" if counts is not None else None),
                      yaxis=dict(title="cell type", autorange="reversed"))
    return fig


def type_counts(gm: "GeneMap") -> dict[str, int]:
    """Cells per type among the objects a map shows (grid squares count their majority type)."""
    if "n_cells" in gm.table and gm.mode == "grid":
        return {str(k): int(v) for k, v in gm.table.groupby("cell_type")["n_cells"].sum().items()}
    return {str(k): int(v) for k, v in gm.table["cell_type"].value_counts().items()}


def render_png(gm: GeneMap, *, width_px: int = 1200, point_px: int | None = None) -> bytes:
    """The map as a PNG drawn server-side from the same table (H&E, objects, colour bar, title)."""
    x0, y0, x1, y1 = gm.bounds_um
    scale = width_px / max(x1 - x0, 1e-6)
    height_px = max(1, int(round((y1 - y0) * scale)))
    if gm.image is not None:
        canvas = np.asarray(Image.fromarray(gm.image).convert("RGB").resize((width_px, height_px), Image.BILINEAR))
        canvas = canvas.copy()
    else:
        canvas = np.full((height_px, width_px, 3), 255, np.uint8)
    t = gm.table
    if len(t):
        if gm.colour_by == "cell_type":
            rgb = palette.cell_type_rgb(t["cell_type"].to_numpy())
        else:
            rgb = palette.map_values(t["value"].to_numpy(), gm.vmin, gm.vmax, gm.colour_map)
        px = np.rint((t["x_um"].to_numpy() - x0) * scale).astype(np.int64)
        py = np.rint((t["y_um"].to_numpy() - y0) * scale).astype(np.int64)
        if gm.mode == "grid":
            r = max(0, int(round(gm.grid_size_um * scale / 2)) - 1)
        else:
            r = point_px if point_px is not None else max(1, int(round(4.0 * scale)))
        offs = np.arange(-r, r + 1)
        for dy in offs:  # loop over the small stamp, not over cells
            for dx in offs:
                if gm.mode != "grid" and dx * dx + dy * dy > r * r:
                    continue
                xx, yy = px + dx, py + dy
                ok = (xx >= 0) & (xx < width_px) & (yy >= 0) & (yy < height_px)
                canvas[yy[ok], xx[ok]] = rgb[ok]
    # colour bar strip with labelled ends and a title
    bar_h, pad = 26, 44
    out = Image.new("RGB", (width_px, height_px + bar_h + pad + 24), "white")
    out.paste(Image.fromarray(canvas), (0, 24))
    draw = ImageDraw.Draw(out)
    try:
        font = ImageFont.load_default(size=14)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    # Pillow's bundled font lacks µ and dashes: keep the PNG's text ASCII ("um")
    title = (f"{value_label(gm.gene).replace(' predicted', ' - predicted')} ({gm.units})" if gm.colour_by == "expression"
             else f"{gm.gene} - cell types")
    draw.text((6, 4), title, fill="black", font=font)
    if gm.colour_by == "expression":
        lut = palette.colour_lut(gm.colour_map, n=max(2, width_px - 40))
        strip = np.repeat(lut[None, :, :], bar_h, axis=0)
        out.paste(Image.fromarray(strip), (20, 24 + height_px + 8))
        draw.text((20, 24 + height_px + bar_h + 10), f"{gm.vmin:.3g}", fill="black", font=font)
        label = f"{gm.vmax:.3g} {gm.units}"
        draw.text((width_px - 20 - draw.textlength(label, font=font), 24 + height_px + bar_h + 10), label,
                  fill="black", font=font)
    draw.text((6, out.height - 18), f"width shown: {width_px / scale:.0f} um", fill="black", font=font)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
