"""Gene maps: predicted expression of 1–4 genes over the H&E, per cell or as a grid summary,
and a full-resolution close-up (the slide's own pixels, nucleus outlines) at 5×–40×; a prediction
with a per-cell expression uncertainty can add it as one more panel."""

from __future__ import annotations

from functools import partial

import streamlit as st

from ghist_core import export
from ghist_core._keys import OBS_CELL_TYPE
from ghist_core.errors import GhistError
from ghist_core.model.reliability import Reliability
from ghist_core.viz import figures, viewer

from ghist_core.viz import palette
from ghist_core.project import RunStatus
from ghist_core.safe_text import plain
from pages import common as c

c.init_session()
c.ensure_demo_on_first_start()

st.title("Gene maps")
project = c.open_project_or_stop()

done = c.finished_slides_or_stop(project, " (the demo takes about a minute)")

ids = [int(s) for s in done["slide_id"]]
labels = {int(r["slide_id"]): c.slide_label(r) for _, r in done.iterrows()}
sel = st.session_state[c.SELECTED_SLIDE]
slide_id = st.selectbox("Slide", ids, index=ids.index(sel) if sel in ids else 0, format_func=lambda i: labels[i],
                        key="gm_slide")
st.session_state[c.SELECTED_SLIDE] = slide_id

# every choice tied to a slide (type filter, zoom, centre) is kept per project and slide
slide_key = f"{c.project_key(project.folder)}_{slide_id}"
TYPES_BY_SLIDE, TYPES_FOR = "gm_types_by_slide", "gm_types_for"
ZOOMS = ["Whole slide", *[f"{m}×" for m in viewer.MAGNIFICATIONS]]
_, bounds = c.cached_overview(str(project.folder), slide_id)

run = project.latest_run(slide_id, status=RunStatus.FINISHED)
run_id = int(c.run_field(run, "run_id"))
adata = c.cached_prediction(str(project.folder), slide_id, run_id)
genes = list(map(str, adata.var_names))
units = figures.expression_units(adata)
rel = Reliability.from_adata(adata)  # the card's held-out test per gene; unknown for older models
layers = figures.map_layers(adata)  # e.g. expression_uncertainty: drawn like a gene, but not a gene
if (scale_note := figures.nucleus_scale_note(adata)) is not None:
    st.info(plain(scale_note), icon=":material/straighten:")
if (stain_note := figures.stain_check_note(adata)) is not None:
    st.warning(plain(stain_note), icon=":material/palette:")


def _members_text(a) -> str:
    """How many models the uncertainty compares ("3 models"), from the card's ensemble count."""
    card = (a.uns.get("ghist") or {}).get("model_card") if isinstance(a.uns.get("ghist"), dict) else None
    ens = card.get("ensemble") if isinstance(card, dict) else None
    k = ens.get("members") if isinstance(ens, dict) else None
    try:
        k = int(k)
    except (TypeError, ValueError):
        k = 0
    return f"{k} models" if k > 1 else "several models"


LAYER_CHECKBOXES = {"expression_uncertainty": "Add the uncertainty map"}
LAYER_CAPTIONS = {
    "expression_uncertainty": (
        f"How much {_members_text(adata)} trained with different seeds disagree in each cell (standard deviation "
        "of their log1p expression, averaged over the genes): higher = less certain. It keeps its own colour range "
        "(other units than expression)."),
}

# --- controls ----------------------------------------------------------------------------
with st.sidebar:
    st.subheader("Map settings")
    show_unreliable = rel.known and st.toggle(
        "Show genes that are not reliable", value=False, key="gm_show_unreliable",
        help="Also offer the genes whose held-out prediction was no better than cell density alone; each is "
             "marked 'not reliable'.")
    offered = rel.gene_choices(genes, include_unreliable=show_unreliable)
    prev = [g for g in (st.session_state[c.SELECTED_GENES] or []) if g in offered]
    preferred = [g for g in ("ERBB2", "ESR1", "EPCAM", "PTPRC") if g in genes]
    if rel.known:  # the first map is of a reliable gene: a named one if reliable, else the best
        preferred = rel.reliable_genes(preferred) or rel.reliable_genes(offered)
    default = prev or preferred[:1] or offered[:1]
    n_reliable = len(rel.reliable_genes(genes))
    chosen = st.multiselect("Genes (type to search)", offered, default=default, max_selections=4, key="gm_genes",
                            format_func=rel.option_label,
                            help=(f"{len(genes)} genes predicted by the model, {n_reliable} of them reliable "
                                  "(the number is the held-out r). " if rel.known else
                                  f"{len(genes)} genes predicted by the model. ")
                                 + "Pick up to 4 to compare side by side.")
    add_layers = []
    for layer in layers:  # not a gene: outside the picker, the 4-gene limit and the reliability
        if st.checkbox(LAYER_CHECKBOXES.get(layer, f"Add the {figures.value_name(layer).lower()} map"),
                       key=f"gm_layer_{layer}",
                       help=f"One more panel after the genes: {LAYER_CAPTIONS.get(layer, figures.value_name(layer))}"):
            add_layers.append(layer)
    if not rel.known:
        st.caption(plain(rel.describe()))
    else:
        if not offered:
            st.info("No gene of this model beat the cell-density baseline on held-out tissue. Switch on "
                    "'Show genes that are not reliable' to see them anyway.")
        with st.expander("What does 'reliable' mean?"):
            st.markdown(plain(rel.describe()))
    auto_grid = adata.n_obs > figures.MAX_BROWSER_POINTS
    mode_label = st.radio("Show", ["Auto", "Each cell", "Grid summary"], index=0, key="gm_mode", horizontal=True,
                          help=f"Auto draws each cell up to {figures.AUTO_CELL_LIMIT:,} cells and beyond that an overview grid "
                               f"of at most {figures.AUTO_GRID_LIMIT:,} squares; 'Grid summary' uses finer squares; "
                               f"'Each cell' draws up to {figures.MAX_BROWSER_POINTS:,}.")
    colour_by = st.radio("Colour by", ["Expression", "Cell type"], key="gm_colour_by", horizontal=True)
    cmap = st.selectbox("Colour map", list(palette.EXPRESSION_MAPS), key="gm_cmap",
                        help="viridis and cividis stay readable with colour-vision deficiency and in greyscale.")
    # the distinct values first, then str (str over a 1M-cell column costs 0.2 s on every rerun)
    present = palette.ordered_types([str(v) for v in adata.obs[OBS_CELL_TYPE].unique()]) if OBS_CELL_TYPE in adata.obs else []
    # the type filter belongs to this slide: restore this slide's choice (all types the first time)
    if st.session_state.get(TYPES_FOR) != slide_key:
        saved = st.session_state.setdefault(TYPES_BY_SLIDE, {}).get(slide_key)
        st.session_state["gm_types"] = [t for t in saved if t in present] if saved is not None else list(present)
        st.session_state[TYPES_FOR] = slide_key
    keep_types = st.multiselect("Cell types shown", present, key="gm_types")
    st.session_state.setdefault(TYPES_BY_SLIDE, {})[slide_key] = list(keep_types)
    show_he = st.toggle("H&E underneath", value=True, key="gm_he")
    scale = st.radio("Colour scale", ["Per panel", "Shared by panels", "Fixed"], key="gm_scale", horizontal=True,
                     help="'Shared by panels' uses one range over all genes shown; 'Fixed' keeps the limits you "
                          "enter for every gene and every slide.")
    if scale == "Fixed":
        lim = st.columns(2)
        fixed = (lim[0].number_input("min", value=0.0, key="gm_vmin"), lim[1].number_input("max", value=5.0, key="gm_vmax"))
    st.subheader("Close-up")
    zoom_key, cx_key, cy_key = (f"gm_zoom_{slide_key}", f"gm_cx_{slide_key}", f"gm_cy_{slide_key}")
    for k, v in ((zoom_key, ZOOMS[0]), (cx_key, float(bounds[2]) / 2), (cy_key, float(bounds[3]) / 2)):
        st.session_state.setdefault(k, v)
    st.select_slider("Zoom", ZOOMS, key=zoom_key,
                     help="5×–40× read the slide at full resolution around the centre below (40× = 0.25 µm per "
                          "screen pixel) and outline each nucleus from 20×. Click a cell on any map to centre there.")
    xc = st.columns(2)
    xc[0].number_input("centre x (µm)", min_value=0.0, max_value=float(bounds[2]),
                       step=50.0, format="%.0f", key=cx_key)
    xc[1].number_input("centre y (µm)", min_value=0.0, max_value=float(bounds[3]),
                       step=50.0, format="%.0f", key=cy_key)
st.session_state[c.SELECTED_GENES] = chosen
mode = {"Auto": "auto", "Each cell": "cells", "Grid summary": "grid"}[mode_label]
if mode == "cells" and auto_grid:
    st.warning(f"{adata.n_obs:,} cells are more than a browser draws smoothly "
               f"(limit {figures.MAX_BROWSER_POINTS:,}); showing the grid summary instead.")

if not chosen:
    st.info("Pick at least one gene in the sidebar.")
    st.stop()
panels = [*chosen, *add_layers]  # the genes, then the map layers asked for
if present and not keep_types:
    st.info("Pick at least one cell type to show in the sidebar.")
    st.stop()

mag = {f"{m}×": m for m in viewer.MAGNIFICATIONS}.get(st.session_state[zoom_key])


@st.cache_resource(show_spinner="Drawing map…", max_entries=16)
def build_map(folder: str, slide: int, run: int, gene: str, mode: str, colour_by: str, cmap: str,
              types: tuple[str, ...], with_he: bool, vrange: tuple[float, float] | None = None) -> figures.GeneMap:
    a = c.cached_prediction(folder, slide, run)
    g = c.cached_grid(folder, slide, run)
    img, bnd = c.cached_overview(folder, slide)
    return figures.gene_map(a, gene, image=img if with_he else None, bounds_um=bnd, grids=g, mode=mode,
                            colour_by="cell_type" if colour_by == "Cell type" else "expression",
                            colour_map=cmap, cell_types=list(types) if types else None, vrange=vrange,
                            layer_key=str(slide))


@st.cache_resource(show_spinner=False, max_entries=4)
def cell_index(folder: str, slide: int, run: int) -> viewer.CellIndex:
    return viewer.CellIndex(c.cached_prediction(folder, slide, run).obsm["spatial"])


@st.cache_resource(show_spinner="Reading the slide at full resolution…", max_entries=8)
def read_window(folder: str, slide: int, cx: float, cy: float, mag: int) -> viewer.Window:
    return viewer.read_project_window(c.open_project(folder), slide, (cx, cy), mag)


@st.cache_resource(show_spinner="Drawing nuclei…", max_entries=16)
def build_view(folder: str, slide: int, run: int, gene: str, cx: float, cy: float, mag: int, colour_by: str,
               cmap: str, types: tuple[str, ...], with_he: bool, vrange: tuple[float, float] | None = None
               ) -> figures.GeneMap:
    return viewer.cell_view(c.cached_prediction(folder, slide, run), gene, read_window(folder, slide, cx, cy, mag),
                            index=cell_index(folder, slide, run),
                            colour_by="cell_type" if colour_by == "Cell type" else "expression", colour_map=cmap,
                            cell_types=list(types) if types else None, vrange=vrange, layer_key=str(slide),
                            with_image=with_he)


@st.cache_data(show_spinner=False, max_entries=16)
def csv_bytes(*args) -> bytes:
    gm = draw(*args)
    gene = args[4]
    t = gm.table.rename(columns={"value": f"{gene} ({gm.units})"})
    return t.to_csv(index=False).encode("utf-8")


@st.cache_data(show_spinner=False, max_entries=16)
def png_bytes(*args) -> bytes:
    return figures.render_png(draw(*args))


def draw(*args) -> figures.GeneMap:
    """The whole-slide map or, when zoomed in, the full-resolution close-up (``args`` say which)."""
    return build_view(*args[:3], *args[4:]) if args[3] == "view" else build_map(*args[:3], *args[4:])


def recentre(chart_key: str) -> None:
    """A click on a cell or square centres the close-up there (40× when the whole slide was shown)."""
    objs = (st.session_state.get(chart_key) or {}).get("selection", {}).get("objects", {})
    hit = next((o[0] for o in objs.values() if o), None)
    if hit and "x" in hit and "y" in hit:
        st.session_state[cx_key] = float(min(max(hit["x"], 0.0), bounds[2]))
        st.session_state[cy_key] = float(min(max(hit["y"], 0.0), bounds[3]))
        if st.session_state[zoom_key] == "Whole slide":
            st.session_state[zoom_key] = ZOOMS[-1]


key_args = (str(project.folder), slide_id, run_id)
filt = tuple(keep_types) if len(keep_types) < len(present) else ()  # () = all types
cx, cy = float(st.session_state[cx_key]), float(st.session_state[cy_key])
if mag:
    view_args = (cx, cy, mag)
    win = read_window(str(project.folder), slide_id, cx, cy, mag)
    shared_over = cell_index(*key_args).query(win.bounds_um)
    panel_h_um = (520 if len(panels) == 1 else 420) * viewer.um_per_screen_px(mag)
    st.caption(f"{mag}× close-up around x {win.centre_um[0]:.0f}, y {win.centre_um[1]:.0f} µm: each panel shows "
               f"about {panel_h_um:.0f} µm top to bottom; the {win.bounds_um[2] - win.bounds_um[0]:.0f} × "
               f"{win.bounds_um[3] - win.bounds_um[1]:.0f} µm around it are loaded (pan to see them; counts "
               f"below are for that area), read from the slide at {win.mpp:.3g} µm per pixel. Every panel "
               "shows the same place.")
else:
    view_args, shared_over = None, None
vrange = None  # the genes' range; a map layer (other units) always keeps its own
if scale == "Fixed":
    vrange = (float(min(fixed)), float(max(fixed)) if fixed[1] != fixed[0] else float(fixed[0]) + 1e-6)
elif scale == "Shared by panels" and colour_by == "Expression":
    vrange = viewer.shared_range(adata, chosen, shared_over)
per_row = 1 if len(panels) == 1 else 2
rows = [panels[i:i + per_row] for i in range(0, len(panels), per_row)]
maps: list[figures.GeneMap] = []
for row in rows:
    cols = st.columns(len(row))
    for col, gene in zip(cols, row):
        is_layer = gene in add_layers
        own = None if is_layer else vrange
        if view_args:
            args = (*key_args, "view", gene, *view_args, colour_by, cmap, filt, show_he, own)
        else:
            args = (*key_args, "map", gene, mode, colour_by, cmap, filt, show_he, own)
        gm = draw(*args)
        maps.append(gm)
        with col:
            what = {"cells": f"{gm.n_objects:,} cells", "outlines": f"{gm.n_objects:,} nuclei outlined in the loaded area"}.get(
                gm.mode, f"{gm.n_objects:,} squares of {gm.grid_size_um or 0:g} µm (mean of their cells)")
            st.markdown(f"**{plain(figures.value_name(gene))}** · {what}")
            if is_layer:
                st.caption(plain(LAYER_CAPTIONS.get(gene, figures.value_name(gene))))
            elif rel.known:
                note = plain(rel.label(gene))
                st.caption(note if rel.is_reliable(gene) else f":material/warning: {note}")
            # keyed by slide and view: a new slide or place is a new chart, never the old image under new cells
            view_tag = f"{mag}_{cx:.0f}_{cy:.0f}" if mag else "all"
            chart_key = f"gm_deck_{slide_key}_{gene}_{view_tag}"
            st.pydeck_chart(gm.deck, height=520 if per_row == 1 else 420, key=chart_key,
                            on_select=partial(recentre, chart_key), selection_mode="single-object")
            if gm.colour_by != "cell_type":
                st.plotly_chart(figures.colour_bar(gm), key=f"gm_bar_{gene}", config={"displayModeBar": False})
            d = st.columns(2)
            d[0].download_button("Map (PNG)", data=lambda a=args: png_bytes(*a), file_name=f"slide{slide_id}_{gene}_map.png",
                                 mime="image/png", key=f"gm_png_{gene}", icon=":material/image:", on_click="ignore")
            d[1].download_button("Table (CSV)", data=lambda a=args: csv_bytes(*a),
                                 file_name=f"slide{slide_id}_{gene}_{gm.mode}.csv", mime="text/csv",
                                 key=f"gm_csv_{gene}", icon=":material/table:", on_click="ignore")
if colour_by == "Cell type" and maps:  # one legend for all panels: the same cells, the same colours
    st.plotly_chart(figures.cell_type_legend(list(maps[0].table["cell_type"].unique()), figures.type_counts(maps[0])),
                    key="gm_legend", config={"displayModeBar": False})
st.caption(
    f"Coordinates in µm on the slide (x right, y down). Expression units: {plain(units)}. Colour limits: 1st–99th "
    "percentile of the values shown. Scroll to zoom, drag to pan; hover a cell for its values."
)

# --- export this slide -------------------------------------------------------------------------
#: what the last "Prepare" made: {"tag": (slide, run, format, genes), "download": export.Download}
EXPORT_READY = "gm_export_ready"
EXPORT_NAMES = {"h5ad": ".h5ad (scanpy / squidpy)", "csv": "CSV (cells × genes)",
                "parquet": "Parquet (cells × genes)", "geojson": "QuPath GeoJSON"}
st.subheader("Export this slide")
ex = st.columns(2)
fmt = ex[0].radio("Format", list(EXPORT_NAMES), format_func=EXPORT_NAMES.get, key="gm_export_fmt",
                  help="Each file is made on the server when you press Prepare, then offered for download.")
gene_choice = ex[1].radio("Genes", ["chosen", "all"], key="gm_export_genes", disabled=fmt == "h5ad",
                          format_func=lambda g: (f"The {len(chosen)} shown above ({plain(', '.join(chosen))})" if g == "chosen"
                                                 else f"All {len(genes)} predicted genes"),
                          help="The .h5ad always holds every gene. The table and QuPath measurements hold the "
                               "genes chosen here.")
export_genes = None if fmt == "h5ad" or gene_choice == "all" else list(chosen)
export_tag = (slide_key, run_id, fmt, tuple(export_genes) if export_genes is not None else None)
if st.button(f"Prepare {EXPORT_NAMES[fmt]}", key="gm_export_prepare", icon=":material/build:"):
    with st.spinner(f"Writing {EXPORT_NAMES[fmt]} for {adata.n_obs:,} cells…"):
        try:
            made = export.prepare_slide_download(project, slide_id, fmt, genes=export_genes, adata=adata)
        except GhistError as exc:
            st.error(plain(exc))
        else:
            c.keep_prepared_download(EXPORT_READY, export_tag, made)
c.offer_prepared_download(EXPORT_READY, export_tag, "gm_export_download")
st.caption(f"How to open it: {export.HOW_TO_OPEN[fmt]}")
