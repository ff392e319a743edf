"""Survival figures: Kaplan–Meier curves with numbers at risk, Cox forest plots.

Why apart from :mod:`ghist_core.analysis.survival`: the numbers are computed there and
tested without plotly; these builders only draw a result (``result.plot()`` calls them).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ghist_core.analysis.survival import CoxResult, GroupComparison
from ghist_core.viz import palette

__all__ = ["km_plot", "forest_plot", "NO_ESTIMATE_MESSAGE"]


def km_plot(res: GroupComparison, *, show_ci: bool = True, show_censors: bool = True) -> go.Figure:
    """KM curve per group with CI bands, censor ticks and numbers at risk beneath.

    The at-risk table is a second, shared-x panel (one text row per group, counts at
    the tick times) so it exports with the figure as one SVG/PNG."""
    groups = list(res.durations_by_group)
    colours = palette.group_colours(groups)
    risk_times = res.risk_times()
    unit = f" ({res.time_unit})" if res.time_unit else ""
    n_groups = len(groups)
    n_of = dict(zip(res.groups["group"], res.groups["n"]))
    top, bottom = {"xaxis": "x", "yaxis": "y"}, {"xaxis": "x2", "yaxis": "y2"}
    traces = []
    for i, g in enumerate(groups):
        c = res.curves[res.curves["group"] == g]
        x = c["time"].to_numpy()
        col = colours[g]
        if show_ci:
            traces.append(go.Scatter(x=x, y=c["ci_upper"].to_numpy(), mode="lines",
                                     line={"width": 0, "shape": "hv", "color": col},
                                     showlegend=False, hoverinfo="skip",
                                     legendgroup=str(g), **top))
            traces.append(go.Scatter(x=x, y=c["ci_lower"].to_numpy(), mode="lines",
                                     line={"width": 0, "shape": "hv", "color": col},
                                     fill="tonexty", fillcolor=palette.rgba(col, 0.18),
                                     showlegend=False, hoverinfo="skip",
                                     legendgroup=str(g), **top))
        traces.append(go.Scatter(
            x=x, y=c["survival"].to_numpy(), mode="lines", name=f"{g} (n={int(n_of[g])})",
            legendgroup=str(g), line={"shape": "hv", "color": col, "width": 2},
            customdata=np.c_[c["at_risk"], c["ci_lower"], c["ci_upper"]],
            hovertemplate=(f"{g}<br>t=%{{x:.4g}}{unit}<br>S=%{{y:.3f}} "
                           "(%{customdata[1]:.3f}–%{customdata[2]:.3f})"
                           "<br>at risk %{customdata[0]}<extra></extra>"), **top))
        if show_censors:
            cc = c[c["censored"] > 0]
            traces.append(go.Scatter(
                x=cc["time"].to_numpy(), y=cc["survival"].to_numpy(), mode="markers",
                showlegend=False, legendgroup=str(g), hoverinfo="skip",
                marker={"symbol": "line-ns-open", "size": 7, "color": col}, **top))
        t = res.durations_by_group[g]
        counts = (t[:, None] >= risk_times[None, :]).sum(axis=0)
        traces.append(go.Scatter(
            x=risk_times, y=[n_groups - 1 - i] * len(risk_times), mode="text",
            text=[str(int(k)) for k in counts], textfont={"color": col, "size": 11},
            showlegend=False, hoverinfo="skip", name=f"at risk: {g}", **bottom))
    p_txt = f"p = {res.p_value:.2g}" if res.p_value >= 1e-4 else f"p = {res.p_value:.1e}"
    layout = go.Layout(
        title=res.title or f"Kaplan–Meier by {res.group_col}",
        template="simple_white", legend={"title": {"text": res.group_col}},
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        height=520 + 18 * max(0, n_groups - 2),
        xaxis={"anchor": "y", "domain": [0, 1], "matches": "x2", "showticklabels": True},
        yaxis={"domain": [0.3, 1], "range": [0, 1.02], "title": {"text": "survival probability"}},
        xaxis2={"anchor": "y2", "domain": [0, 1], "title": {"text": f"time{unit}"}},
        yaxis2={"domain": [0, 0.22], "tickmode": "array", "tickvals": list(range(n_groups)),
                "ticktext": [str(g) for g in reversed(groups)],
                "range": [-0.6, n_groups - 0.4], "showgrid": False, "zeroline": False,
                "title": {"text": "at risk"}},
        annotations=[{"text": f"log-rank χ² = {res.test_statistic:.2f} "
                              f"(df {res.degrees_freedom}), {p_txt}",
                      "xref": "x domain", "yref": "y domain", "x": 0.02, "y": 0.04,
                      "showarrow": False, "xanchor": "left", "yanchor": "bottom",
                      "font": {"size": 12}}],
    )
    return go.Figure(data=traces, layout=layout)


#: Shown instead of bare axes when a Cox fit has no estimable hazard ratio.
NO_ESTIMATE_MESSAGE = ("No hazard ratio could be estimated: every term comes from a group "
                       "without events or separates events perfectly. Merge small groups, "
                       "choose another reference or another endpoint.")


def forest_plot(res: CoxResult) -> go.Figure:
    """Forest plot: HR (log scale) with CI per term, reference line at HR = 1, and each
    categorical covariate's reference level as a hollow marker at 1 labelled "(reference)".

    When no term is estimable the figure carries :data:`NO_ESTIMATE_MESSAGE` (axes hidden)."""
    s = res.summary.iloc[::-1]
    if "estimable" in s:
        s = s[s["estimable"]]
    if s.empty:
        fig = go.Figure()
        fig.add_annotation(text=NO_ESTIMATE_MESSAGE, x=0.5, y=0.5, xref="paper", yref="paper",
                           showarrow=False, font={"size": 13})
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        fig.update_layout(template="simple_white", height=200, title="No estimable hazard ratio",
                          margin={"l": 20, "r": 20, "t": 50, "b": 20})
        return fig
    refs = [f"{c}={lv} (reference)" for c, lv in reversed(list(res.reference_levels.items()))
            if any(str(t).startswith(f"{c}=") for t in s["covariate"])]
    labels = list(s["covariate"])
    text = [f"{h:.2f} ({lo:.2f}–{hi:.2f}), p={p:.2g}"
            for h, lo, hi, p in zip(s["HR"], s["HR_lower"], s["HR_upper"], s["p"])]
    colour = np.where(s["p"] < res.alpha, palette.OKABE_ITO[1], palette.OKABE_ITO[0])
    fig = go.Figure(go.Scatter(
        x=s["HR"], y=labels, mode="markers",
        marker={"symbol": "square", "size": 10, "color": colour},
        error_x={"type": "data", "symmetric": False, "array": s["HR_upper"] - s["HR"],
                 "arrayminus": s["HR"] - s["HR_lower"], "color": "#444", "thickness": 1.5},
        text=text, hovertemplate="%{y}: HR %{text}<extra></extra>", name="HR"))
    if refs:
        fig.add_trace(go.Scatter(
            x=[1.0] * len(refs), y=refs, mode="markers", name="reference",
            marker={"symbol": "square-open", "size": 10, "color": "#444"},
            hovertemplate="%{y}: HR = 1 by definition<extra></extra>"))
    rows = refs + labels
    fig.add_trace(go.Scatter(x=[1.0, 1.0], y=[rows[0], rows[-1]], mode="lines",
                             line={"dash": "dash", "color": "#888", "width": 1},
                             hoverinfo="skip", showlegend=False, name="HR = 1"))
    fig.update_yaxes(categoryorder="array", categoryarray=rows)
    lo = float(np.nanmin(np.r_[s["HR_lower"].to_numpy(), 1.0]))
    hi = float(np.nanmax(np.r_[s["HR_upper"].to_numpy(), 1.0]))
    lo = lo if np.isfinite(lo) and lo > 0 else 0.1
    hi = hi if np.isfinite(hi) and hi > 0 else 10.0
    ticks = [2.0 ** k for k in range(int(np.floor(np.log2(lo))), int(np.ceil(np.log2(hi))) + 1)]
    if len(ticks) > 9:
        ticks = ticks[:: int(np.ceil(len(ticks) / 9))]
    fig.update_xaxes(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    for y, t in zip(labels, text):
        fig.add_annotation(x=1.0, xref="paper", xanchor="left", y=y, text=t,
                           showarrow=False, font={"size": 11})
    for y in refs:
        fig.add_annotation(x=1.0, xref="paper", xanchor="left", y=y, text="1 (reference)",
                           showarrow=False, font={"size": 11, "color": "#666"})
    kind = "univariate Cox models" if res.univariate else "multivariate Cox model"
    level = int(round((1 - res.alpha) * 100))
    fig.update_xaxes(type="log", title_text=f"hazard ratio ({level}% CI, log scale)")
    fig.update_layout(template="simple_white", showlegend=False,
                      title=f"Hazard ratios, {kind} (n={res.n}, events={res.events})",
                      height=max(260, 60 + 34 * len(rows)),
                      margin={"l": 160, "r": 230, "t": 60, "b": 50})
    return fig
