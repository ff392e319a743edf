"""Plotly charts of analysis results: compositions, neighbourhoods, morphology, group tests.

Why here: analysis modules compute numbers and never import plotly; these builders draw
them with the fixed colours of :mod:`ghist_core.viz.palette`, so the pages only show the
figure. Cell types are shown by their display names (``palette.cell_type_label``: "T" →
"T cells"); the data keep the short names. Maps are in :mod:`ghist_core.viz.figures`, survival plots in
:mod:`ghist_core.viz.survival_plots`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ghist_core.viz import palette

if TYPE_CHECKING:
    from ghist_core.analysis.compare import GroupTests
    from ghist_core.analysis.neighbourhoods import NeighbourhoodMatrix

__all__ = [
    "PLOTLY_EXPORT_CONFIG", "PLOTLY_EXPORT_CONFIG_PNG", "MORPHOLOGY_UNITS", "MORPHOLOGY_LABELS",
    "composition_bars", "neighbourhood_heatmap", "morphology_violins", "volcano_plot", "feature_boxes",
]

#: Pass as ``st.plotly_chart(fig, config=PLOTLY_EXPORT_CONFIG)``: the camera button in the
#: plot's toolbar then saves an SVG (vector, for papers); PNG at 3x scale is the
#: ``PLOTLY_EXPORT_CONFIG_PNG`` variant. Both are rendered by the browser (no kaleido).
PLOTLY_EXPORT_CONFIG: dict = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "svg", "filename": "ghist_figure", "scale": 1},
}
PLOTLY_EXPORT_CONFIG_PNG: dict = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "png", "filename": "ghist_figure", "scale": 3},
}

#: Units of morphology columns (shown on axes).
MORPHOLOGY_UNITS: dict[str, str] = {
    "area_um2": "µm²",
    "perimeter_um": "µm",
    "eccentricity": "unitless, 0–1",
    "solidity": "unitless, 0–1",
}
MORPHOLOGY_LABELS: dict[str, str] = {
    "area_um2": "Nucleus area",
    "perimeter_um": "Nucleus perimeter",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
}

def composition_bars(counts: pd.DataFrame, *, percent: bool = True, title: str | None = None) -> go.Figure:
    """Stacked bars of cell-type composition (columns drawn in the fixed palette order);
    a two-level index (patient, slide) groups slides per patient."""
    counts = counts[palette.ordered_types(counts.columns)]
    values = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0) * 100 if percent else counts
    if isinstance(counts.index, pd.MultiIndex) and counts.index.nlevels == 2:
        x = [counts.index.get_level_values(0).astype(str).tolist(), counts.index.get_level_values(1).astype(str).tolist()]
        xtitle = f"{counts.index.names[0] or 'patient'} / {counts.index.names[1] or 'slide'}"
    else:
        x = counts.index.astype(str).tolist()
        xtitle = counts.index.name or "slide"
    fig = go.Figure()
    for t in counts.columns:
        fig.add_bar(
            x=x, y=values[t].to_numpy(), name=palette.cell_type_label(t), marker_color=palette.cell_type_colour(t),
            customdata=counts[t].to_numpy(),
            hovertemplate=f"{palette.cell_type_label(t)}: %{{y:.1f}}{' %' if percent else ''} "
                          "(%{customdata} cells)<extra></extra>",
        )
    fig.update_layout(
        barmode="stack", title=title, legend_title_text="cell type", height=420, legend_traceorder="normal",
        xaxis_title=xtitle, yaxis_title="cells (% of all cells)" if percent else "cells (count)",
        margin=dict(l=10, r=10, t=40 if title else 10, b=10),
    )
    return fig


def shared_percent_max(*matrices: pd.DataFrame | NeighbourhoodMatrix) -> float:
    """One colour-scale top (%) for heatmaps shown side by side. Why: each on its own scale, a nearly
    flat predicted composition (8-14 %) looked as structured as the observed one (0-80 %)."""
    values = [np.nanmax((m if isinstance(m, pd.DataFrame) else m.matrix).to_numpy(dtype=float), initial=0.0)
              for m in matrices]
    return float(max(values, default=0.0)) or 100.0


def neighbourhood_heatmap(matrix: pd.DataFrame | NeighbourhoodMatrix, *, colour_map: str = "viridis",
                          title: str | None = None, zmax: float | None = None) -> go.Figure:
    """Heatmap of a neighbourhood composition per cell type (types in palette order).

    ``matrix`` is a :class:`~ghist_core.analysis.neighbourhoods.NeighbourhoodMatrix` (its
    title says observed or predicted, and the radius, unless ``title`` is given) or a bare
    centre × neighbour table of % (then only ``title`` labels it). ``zmax``: the colour scale's top
    (% , :func:`shared_percent_max` for maps compared side by side); None: this matrix's own."""
    kind = None
    if not isinstance(matrix, pd.DataFrame):
        kind, title = matrix.kind, title or matrix.title
        matrix = matrix.matrix
    matrix = matrix.loc[palette.ordered_types(matrix.index), palette.ordered_types(matrix.columns)]
    what = f"{kind} " if kind else ""
    fig = go.Figure(go.Heatmap(
        z=matrix.to_numpy(), x=[palette.cell_type_label(c) for c in matrix.columns],
        y=[palette.cell_type_label(r) for r in matrix.index],
        colorscale=palette.plotly_colorscale(colour_map), zmin=0, zmax=zmax,
        colorbar=dict(title=f"mean % of<br>neighbours{'<br>(' + kind + ')' if kind else ''}"),
        hovertemplate=f"centre %{{y}}, neighbour %{{x}}: %{{z:.1f}} % ({what}mean)<extra></extra>",
    ))
    fig.update_layout(
        height=460, xaxis_title="neighbour cell type", yaxis_title="centre cell type", title=title,
        yaxis=dict(autorange="reversed"), margin=dict(l=10, r=10, t=40 if title else 10, b=10),
    )
    return fig


def morphology_violins(obs: pd.DataFrame, feature: str, *, type_key: str = "cell_type",
                       max_per_type: int = 5000, seed: int = 0) -> go.Figure:
    """Distribution of a morphology feature per cell type (subsampled per type for the browser)."""
    if feature not in obs.columns:
        raise ValueError(f"This prediction has no {feature!r} column.")
    rng = np.random.default_rng(seed)
    cat = pd.Categorical(obs[type_key].astype(str))
    codes = cat.codes.astype(np.int64)
    vals = obs[feature].to_numpy(float)
    # random subsample of at most max_per_type per type, vectorised: rank random keys within type
    order = np.lexsort((rng.random(len(vals)), codes))
    counts = np.bincount(codes, minlength=len(cat.categories))
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    keep = order[(np.arange(len(order)) - starts) < max_per_type]
    kept_codes = codes[keep]
    unit = MORPHOLOGY_UNITS.get(feature, "")
    label = MORPHOLOGY_LABELS.get(feature, feature)
    fig = go.Figure()
    for t in palette.ordered_types(cat.categories):
        sel = keep[kept_codes == cat.categories.get_loc(t)]
        fig.add_trace(go.Violin(
            x=np.full(len(sel), palette.cell_type_label(t)), y=vals[sel], name=palette.cell_type_label(t),
            line_color=palette.cell_type_colour(t),
            box_visible=True, meanline_visible=True, points=False, spanmode="hard",
        ))
    fig.update_layout(
        height=420, showlegend=False, xaxis_title="cell type",
        yaxis_title=f"{label} ({unit})" if unit else label, margin=dict(l=10, r=10, t=10, b=10),
    )
    return fig


def volcano_plot(result: GroupTests, *, alpha: float = 0.05, min_abs_log2fc: float = 0.5,
                 label_top: int = 10) -> go.Figure:
    """log2 fold change (x) against −log10 BH q (y) of a differential-expression result;
    colours mark q < alpha and |log2FC| ≥ threshold."""
    group_a, group_b = result.groups
    t = result.table.copy()
    sig = (t["q_value"] < alpha) & (t["log2fc"].abs() >= min_abs_log2fc)
    t["class"] = np.where(sig & (t["log2fc"] > 0), "up", np.where(sig, "down", "not significant"))
    fig = go.Figure()
    for cls, colour in palette.VOLCANO_COLOURS.items():
        s = t[t["class"] == cls]
        name = {"up": f"higher in {group_a}", "down": f"higher in {group_b}"}.get(cls, cls)
        fig.add_scatter(
            x=s["log2fc"], y=s["neg_log10_q"], mode="markers", name=name,
            marker=dict(color=colour, size=7, line=dict(width=0)), text=s["feature"],
            customdata=np.stack([s["p_value"], s["q_value"]], axis=1) if len(s) else None,
            hovertemplate="%{text}<br>log2FC %{x:.2f}<br>p %{customdata[0]:.2g}, q %{customdata[1]:.2g}<extra></extra>",
        )
    top = t[sig].nsmallest(label_top, "q_value")
    for _, row in top.iterrows():  # at most label_top annotations
        fig.add_annotation(x=row["log2fc"], y=row["neg_log10_q"], text=row["feature"], showarrow=False, yshift=10,
                           font=dict(size=10))
    fig.add_hline(y=-math.log10(alpha), line_dash="dot", line_color="#555555",
                  annotation_text=f"q = {alpha:g}", annotation_position="top left")
    for xv in (-min_abs_log2fc, min_abs_log2fc):
        if min_abs_log2fc > 0:
            fig.add_vline(x=xv, line_dash="dot", line_color="#555555")
    fig.update_layout(
        height=460, legend_title_text="",
        xaxis_title=(f"log2 fold change, {group_a} vs {group_b} (log2 ratio of mean predicted expression"
                     + (f", + {result.pseudocount:g} each" if result.pseudocount else "") + ")"),
        yaxis_title="−log10 q (Benjamini–Hochberg)", margin=dict(l=10, r=10, t=10, b=10),
    )
    return fig


def feature_boxes(result: GroupTests, top: int = 6) -> go.Figure:
    """Box plot (with points) per group for the ``top`` features by q-value."""
    table = result.table
    feats = table.sort_values("q_value")["feature"].head(top).tolist()
    if not feats:
        return go.Figure()
    cols = min(3, len(feats))
    rows = int(np.ceil(len(feats) / cols))
    q = table.set_index("feature").loc[feats, "q_value"]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{f} (q={v:.2g})" for f, v in zip(feats, q)])
    colours = palette.group_colours(result.groups)
    data, gcol = result.data, result.group_col
    for i, f in enumerate(feats):  # a handful of panels
        r, c = i // cols + 1, i % cols + 1
        for g in result.groups:
            y = data.loc[data[gcol] == g, f]
            fig.add_trace(go.Box(y=y, name=str(g), marker_color=colours[g], boxpoints="all", jitter=0.3,
                                 pointpos=0, showlegend=(i == 0), legendgroup=str(g)), row=r, col=c)
    fig.update_layout(template="simple_white", height=300 * rows, title=f"Patient features by {gcol}")
    return fig
