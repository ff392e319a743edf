"""Plotly charts of analysis results: the data each sends is what the analysis computed,
in the fixed palette order and colours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ghist_core._keys import neighbourhood_composition
from ghist_core.analysis.compare import compare_features, differential_expression
from ghist_core.analysis.features import cell_type_counts, neighbourhood_by_type
from ghist_core.viz import palette, plots
from prediction_factory import synthetic_prediction


def test_composition_neighbourhood_morphology():
    a = synthetic_prediction()
    obs = a.obs.assign(patient="P1", slide=np.where(np.arange(a.n_obs) % 2, "s1", "s2"))
    slides = [("P1", s, a[obs["slide"].to_numpy() == s]) for s in ("s1", "s2")]
    counts = cell_type_counts(slides)
    assert counts.to_numpy().sum() == a.n_obs
    assert list(counts.columns) == sorted(palette.CELL_TYPES)  # analysis sorts, the figure orders
    fig = plots.composition_bars(counts)
    # display names ("T cells") in the legend; the data keep the short names
    assert [tr.name for tr in fig.data] == [palette.cell_type_label(t) for t in palette.CELL_TYPES]
    assert fig.data[-1].name == "T cells" and fig.data[-1].hovertemplate.startswith("T cells:")
    assert fig.layout.barmode == "stack" and "%" in fig.layout.yaxis.title.text
    total = np.sum([np.asarray(tr.y) for tr in fig.data], axis=0)
    np.testing.assert_allclose(total, 100.0)
    assert fig.data[5].marker.color == palette.CELL_TYPE_COLOURS["Malignant"]
    m = neighbourhood_by_type(a)
    assert m.shape == (9, 9)
    expected = neighbourhood_composition(a).loc[(a.obs.cell_type == "T").to_numpy(), "B"].mean() * 100
    assert m.loc["T", "B"] == pytest.approx(expected)
    hm = plots.neighbourhood_heatmap(m)
    assert hm.layout.xaxis.title.text == "neighbour cell type"
    assert "T cells" in hm.data[0].x and "T cells" in hm.data[0].y and "T" not in hm.data[0].y
    v = plots.morphology_violins(a.obs, "area_um2", max_per_type=50)
    assert "µm²" in v.layout.yaxis.title.text
    assert all(len(tr.y) <= 50 for tr in v.data) and len(v.data) == 9
    assert v.data[-1].name == "T cells" and set(v.data[-1].x) == {"T cells"}


def test_volcano_from_differential():
    rng = np.random.default_rng(1)
    vals = pd.DataFrame(rng.normal(5, 1, (20, 30)), columns=[f"G{i}" for i in range(30)],
                        index=[f"P{i}" for i in range(20)])
    labels = pd.Series(["pos"] * 10 + ["neg"] * 10, index=vals.index)
    vals.iloc[:10, 0] += 4
    res = differential_expression(vals, labels, group_a="pos", group_b="neg")
    fig = plots.volcano_plot(res)
    up = [tr for tr in fig.data if tr.name == "higher in pos"][0]
    assert "G0" in list(up.text)
    assert "q" in fig.layout.yaxis.title.text and "log2" in fig.layout.xaxis.title.text


def test_feature_boxes_show_each_group_in_its_colour():
    rng = np.random.default_rng(2)
    t = pd.DataFrame({"g": np.repeat(["low", "high"], 10), "x": rng.normal(size=20), "y": rng.normal(size=20)})
    fc = compare_features(t, "g", ["x", "y"])
    fig = plots.feature_boxes(fc, top=1)
    assert [tr.name for tr in fig.data] == fc.groups
    colours = palette.group_colours(fc.groups)
    assert [tr.marker.color for tr in fig.data] == [colours[g] for g in fc.groups]
    y = t.loc[t["g"] == fc.groups[0], fc.table.sort_values("q_value")["feature"].iloc[0]]
    np.testing.assert_allclose(np.asarray(fig.data[0].y, float), y.to_numpy())


def test_group_colours_are_okabe_ito_in_order():
    c = palette.group_colours(["a", "b", "c"] + [str(i) for i in range(7)])
    assert c["a"] == palette.OKABE_ITO[0] == "#0072B2" and c["b"] == "#D55E00"
    assert c["5"] == palette.OKABE_ITO[0] and c["6"] == palette.OKABE_ITO[1]  # cycles after 8
    assert palette.rgba("#0072B2", 0.5) == "rgba(0,114,178,0.5)"


def test_neighbourhood_heatmaps_say_observed_or_predicted():
    from ghist_core.analysis.neighbourhoods import observed_neighbourhood_by_type, predicted_neighbourhood_by_type

    a = synthetic_prediction(n=600)
    a.uns["ghist"]["params"] = {"nbhd_radius_um": 50.0}
    obs = observed_neighbourhood_by_type(a, 30.0)
    pred = predicted_neighbourhood_by_type(a)
    fo, fp = plots.neighbourhood_heatmap(obs), plots.neighbourhood_heatmap(pred)
    assert fo.layout.title.text.startswith("Observed") and "30 µm" in fo.layout.title.text
    assert fp.layout.title.text.startswith("Predicted by the model") and "50 µm" in fp.layout.title.text
    assert "(observed)" in fo.data[0].colorbar.title.text and "(predicted)" in fp.data[0].colorbar.title.text
    order = palette.ordered_types(obs.matrix.index)
    np.testing.assert_allclose(np.asarray(fo.data[0].z), obs.matrix.loc[order, order].to_numpy())
    assert list(fo.data[0].y) == [palette.cell_type_label(t) for t in order]


def test_heatmaps_side_by_side_share_one_colour_scale():
    """A nearly flat predicted composition must not look as structured as the observed one."""
    from ghist_core.analysis.neighbourhoods import observed_neighbourhood_by_type, predicted_neighbourhood_by_type

    a = synthetic_prediction(n=600)
    obs, pred = observed_neighbourhood_by_type(a, 30.0), predicted_neighbourhood_by_type(a)
    top = plots.shared_percent_max(obs, pred)
    assert top == pytest.approx(max(np.nanmax(obs.matrix.to_numpy()), np.nanmax(pred.matrix.to_numpy())))
    fo, fp = (plots.neighbourhood_heatmap(m, zmax=top) for m in (obs, pred))
    assert fo.data[0].zmax == fp.data[0].zmax == top and fo.data[0].zmin == fp.data[0].zmin == 0
    assert plots.neighbourhood_heatmap(pred).data[0].zmax is None  # alone: its own range
