"""Gene maps: predicted expression of 1–4 genes over the H&E, per cell or as a grid summary."""

from __future__ import annotations

import streamlit as st

from ghist_core._keys import OBS_CELL_TYPE
from ghist_core.viz import figures

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

run = project.latest_run(slide_id, status=RunStatus.FINISHED)
run_id = int(c.run_field(run, "run_id"))
adata = c.cached_prediction(str(project.folder), slide_id, run_id)
genes = list(map(str, adata.var_names))
units = figures.expression_units(adata)

# --- controls ----------------------------------------------------------------------------
prev = [g for g in (st.session_state[c.SELECTED_GENES] or []) if g in genes]
default = prev or [g for g in ("ERBB2", "ESR1", "EPCAM", "PTPRC") if g in genes][:1] or genes[:1]
with st.sidebar:
    st.subheader("Map settings")
    chosen = st.multiselect("Genes (type to search)", genes, default=default, max_selections=4, key="gm_genes",
                            help=f"{len(genes)} genes predicted by the model. Pick up to 4 to compare side by side.")
    auto_grid = adata.n_obs > figures.MAX_BROWSER_POINTS
    mode_label = st.radio("Show", ["Auto", "Each cell", "Grid summary"], index=0, key="gm_mode", horizontal=True,
                          help=f"Auto draws each cell up to {figures.AUTO_CELL_LIMIT:,} cells and beyond that an overview grid "
                               f"of at most {figures.AUTO_GRID_LIMIT:,} squares; 'Grid summary' uses finer squares; "
                               f"'Each cell' draws up to {figures.MAX_BROWSER_POINTS:,}.")
    colour_by = st.radio("Colour by", ["Expression", "Cell type"], key="gm_colour_by", horizontal=True)
    cmap = st.selectbox("Colour map", list(palette.EXPRESSION_MAPS), key="gm_cmap",
                        help="viridis and cividis stay readable with colour-vision deficiency and in greyscale.")
    present = palette.ordered_types(adata.obs[OBS_CELL_TYPE].astype(str).unique()) if OBS_CELL_TYPE in adata.obs else []
    keep_types = st.multiselect("Cell types shown", present, default=present, key="gm_types")
    show_he = st.toggle("H&E underneath", value=True, key="gm_he")
st.session_state[c.SELECTED_GENES] = chosen
mode = {"Auto": "auto", "Each cell": "cells", "Grid summary": "grid"}[mode_label]
if mode == "cells" and auto_grid:
    st.warning(f"{adata.n_obs:,} cells are more than a browser draws smoothly "
               f"(limit {figures.MAX_BROWSER_POINTS:,}); showing the grid summary instead.")

if not chosen:
    st.info("Pick at least one gene in the sidebar.")
    st.stop()
if present and not keep_types:
    st.info("Pick at least one cell type to show in the sidebar.")
    st.stop()

grids = c.cached_grid(str(project.folder), slide_id, run_id)
image, bounds = c.cached_overview(str(project.folder), slide_id) if show_he else (None, None)
if bounds is None:
    _, bounds = c.cached_overview(str(project.folder), slide_id)


@st.cache_resource(show_spinner="Drawing map…", max_entries=16)
def build_map(folder: str, slide: int, run: int, gene: str, mode: str, colour_by: str, cmap: str,
              types: tuple[str, ...], with_he: bool) -> figures.GeneMap:
    a = c.cached_prediction(folder, slide, run)
    g = c.cached_grid(folder, slide, run)
    img, bnd = c.cached_overview(folder, slide)
    return figures.gene_map(a, gene, image=img if with_he else None, bounds_um=bnd, grids=g, mode=mode,
                            colour_by="cell_type" if colour_by == "Cell type" else "expression",
                            colour_map=cmap, cell_types=list(types) if types else None)


@st.cache_data(show_spinner=False, max_entries=16)
def csv_bytes(folder: str, slide: int, run: int, gene: str, mode: str, colour_by: str, cmap: str,
              types: tuple[str, ...], with_he: bool) -> bytes:
    gm = build_map(folder, slide, run, gene, mode, colour_by, cmap, types, with_he)
    t = gm.table.rename(columns={"value": f"{gene} ({gm.units})"})
    return t.to_csv(index=False).encode("utf-8")


@st.cache_data(show_spinner=False, max_entries=16)
def png_bytes(folder: str, slide: int, run: int, gene: str, mode: str, colour_by: str, cmap: str,
              types: tuple[str, ...], with_he: bool) -> bytes:
    return figures.render_png(build_map(folder, slide, run, gene, mode, colour_by, cmap, types, with_he))


key_args = (str(project.folder), slide_id, run_id)
per_row = 1 if len(chosen) == 1 else 2
rows = [chosen[i:i + per_row] for i in range(0, len(chosen), per_row)]
maps: list[figures.GeneMap] = []
for row in rows:
    cols = st.columns(len(row))
    for col, gene in zip(cols, row):
        filt = tuple(keep_types) if len(keep_types) < len(present) else ()  # () = all types
        args = (*key_args, gene, mode, colour_by, cmap, filt, show_he)
        gm = build_map(*args)
        maps.append(gm)
        with col:
            what = (f"{gm.n_objects:,} cells" if gm.mode == "cells"
                    else f"{gm.n_objects:,} squares of {gm.grid_size_um:g} µm (mean of their cells)")
            st.markdown(f"**{plain(gene)}** · {what}")
            st.pydeck_chart(gm.deck, height=520 if per_row == 1 else 420, key=f"gm_deck_{gene}")
            st.plotly_chart(figures.colour_bar(gm), key=f"gm_bar_{gene}", config={"displayModeBar": False})
            d = st.columns(2)
            d[0].download_button("Map (PNG)", data=lambda a=args: png_bytes(*a), file_name=f"slide{slide_id}_{gene}_map.png",
                                 mime="image/png", key=f"gm_png_{gene}", icon=":material/image:", on_click="ignore")
            d[1].download_button("Table (CSV)", data=lambda a=args: csv_bytes(*a),
                                 file_name=f"slide{slide_id}_{gene}_{gm.mode}.csv", mime="text/csv",
                                 key=f"gm_csv_{gene}", icon=":material/table:", on_click="ignore")
st.caption(
    f"Coordinates in µm on the slide (x right, y down). Expression units: {plain(units)}. Colour limits: 1st–99th "
    "percentile of the values shown. Scroll to zoom, drag to pan; hover a cell for its values."
)
