"""App timings in a real browser (Playwright + Debian Chromium) → bench/results/app.json.

1. Page switch with a 200,000-cell slide loaded: click a sidebar link, time until the new page's
   script has finished and its title is shown. Baseline: the same switches in an empty project,
   measured in the same process; the ratio says what a big slide costs.
2. Clicks to a gene map on the bundled demo: fresh project, "Run the demo" (real prediction in a
   worker process), "Open gene map", until the deck.gl map is drawn. Counts clicks and seconds.

3. Viewer pan/zoom, server side (what one click or zoom step costs before the browser draws):
   read the full-resolution window of the demo slide at 10×/20×/40× and build the close-up deck
   (nucleus outlines or points, viewport query on a 1M-cell index), with the JSON size sent.

4. ``--million``: the Gene maps page (AppTest, server side) on a finished 1,000,000-cell run over the
   1 Gpx synthetic slide of ``bench/pipeline.py --scaling``: whole slide (grid pyramid), zoom, pan;
   seconds per rerun and objects sent; sets "million_cells" in bench/results/app.json.

Run: ``python bench/app.py`` (about 2–4 minutes on 2 CPU cores); ``python bench/app.py --viewer``
runs part 3 only and updates its entry in bench/results/app.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from ghist_core.viz import palette  # noqa: E402
from ghist_core._keys import OBSM_NEIGHBOURHOOD, set_obsm_matrix  # noqa: E402
from ghist_core.pipeline.grid import DEFAULT_GRID_SIZES_UM, build_grid_pyramid, write_grid  # noqa: E402
from ghist_core.paths import DEMO_DIR  # noqa: E402
from browser_helpers import CHROMIUM, StreamlitServer, launch_browser, wait_app_idle  # noqa: E402

N_CELLS = 200_000
PAGES = [("Cell types & patients", "Cell types & patients"), ("Home", "GHIST Studio"),
         ("Models", "Models"), ("Upload & predict", "Upload & predict")]
REPEATS = 3


def synthetic_slide_prediction(n: int, w_um: float, h_um: float, n_genes: int = 280, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w_um, h_um], size=(n, 2))
    genes = (REPO.parent / "shared" / "data" / "ghist_demo" / "genes.txt")
    names = genes.read_text().split()[:n_genes] if genes.exists() else [f"G{i}" for i in range(n_genes)]
    X = rng.gamma(1.5, 0.6, size=(n, len(names))).astype(np.float32)
    obs = pd.DataFrame({"cell_id": np.arange(n, dtype=np.int64),
                        "cell_type": pd.Categorical(np.array(palette.CELL_TYPES)[rng.integers(0, 9, n)]),
                        "area_um2": rng.uniform(10, 80, n), "perimeter_um": rng.uniform(10, 40, n),
                        "eccentricity": rng.uniform(0, 1, n), "solidity": rng.uniform(0.7, 1, n)})
    nb = rng.dirichlet(np.ones(9), n)
    obs.index = [f"cell_{i}" for i in range(n)]
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=names))
    a.obsm["spatial"] = xy
    set_obsm_matrix(a, OBSM_NEIGHBOURHOOD, nb, palette.CELL_TYPES)
    a.uns["ghist"] = {"expression_units": "log1p counts (synthetic)"}
    return a


def make_big_demo_project(projects: Path) -> None:
    """The demo project, with a registered 200k-cell prediction on the demo slide."""
    from ghist_core.pipeline.blocks import results_dir
    from ghist_core.project.store import Project

    project = Project.open_or_create(projects / "demo", name="bench")
    rec = project.add_slide(DEMO_DIR / "CMU-1-Small-Region.svs", patient_id="DEMO-01")
    a = synthetic_slide_prediction(N_CELLS, rec.width * rec.mpp, rec.height * rec.mpp)
    run_id = project.start_run(rec.slide_id, model_id="synthetic", weights_sha256="", device="cpu", params={})
    out = results_dir(project, rec.slide_id)
    out.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(out / f"run_{run_id}.h5ad")
    write_grid(out / f"run_{run_id}.grid.h5", build_grid_pyramid(a))
    project.add_result_file(run_id, "h5ad", out / f"run_{run_id}.h5ad")
    project.add_result_file(run_id, "grid", out / f"run_{run_id}.grid.h5")
    project.finish_run(run_id, n_cells=N_CELLS, timings={})


def time_switch(page, link: str, title: str, timeout_ms: int = 120_000) -> float:
    t0 = time.perf_counter()
    page.locator('[data-testid="stSidebarNav"]').get_by_text(link, exact=True).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=timeout_ms)
    wait_app_idle(page, timeout_ms)
    return time.perf_counter() - t0


def page_switches(projects: Path, log: Path, *, with_map: bool) -> dict:
    from playwright.sync_api import sync_playwright

    out: dict = {}
    with StreamlitServer(projects, log) as server, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.get_by_role("heading", name="GHIST Studio").first.wait_for(timeout=120_000)
        wait_app_idle(page, 120_000)
        if with_map:  # load the 200k-cell slide once (first load reads the h5ad)
            out["first_gene_map_s"] = time_switch(page, "Gene maps", "Gene maps", 300_000)
            page.wait_for_selector('[data-testid="stDeckGlJsonChart"] canvas', timeout=300_000)
        for _ in range(REPEATS):
            for link, title in PAGES:
                out.setdefault(link, []).append(time_switch(page, link, title))
        if with_map:
            out["Gene maps (200k cells, revisit)"] = [time_switch(page, "Gene maps", "Gene maps", 300_000)
                                                      for _ in range(2)]
        browser.close()
    return out


def clicks_to_gene_map(projects: Path, log: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with StreamlitServer(projects, log) as server, sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        page.goto(server.url)
        clicks = 0
        page.get_by_role("button", name="Run the demo").click(timeout=120_000)
        clicks += 1
        t_run = time.perf_counter()
        open_btn = page.get_by_role("button", name="Open gene map")
        open_btn.or_(page.get_by_role("button", name="Resume")).first.wait_for(timeout=600_000)
        if not open_btn.count():
            err = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
            raise RuntimeError("demo run failed: " + " | ".join(err))
        open_btn.first.click()
        clicks += 1
        t_done = time.perf_counter()
        page.wait_for_selector('[data-testid="stDeckGlJsonChart"] canvas', timeout=120_000)
        wait_app_idle(page)
        t_map = time.perf_counter()
        page.screenshot(path=str(projects.parent / "gene_map.png"), full_page=True)
        browser.close()
    return {"clicks": clicks, "seconds_total": t_map - t0, "seconds_open_to_run_click": t_run - t0,
            "seconds_run": t_done - t_run, "seconds_map_render": t_map - t_done}


def viewer_timings(repeats: int = 5) -> dict:
    """Server-side cost of viewer pan/zoom steps on the demo slide (median seconds)."""
    from ghist_core._keys import OBSM_NUCLEUS_RAYS
    from ghist_core.io.slide import open_slide
    from ghist_core.viz import viewer

    slide_path = DEMO_DIR / "CMU-1-Small-Region.svs"
    out: dict = {"slide": slide_path.name}
    rng = np.random.default_rng(0)
    n = 1_000_000  # a big slide's worth of cells over 10 × 10 mm, for the index query
    xy = rng.uniform(0, 10_000, size=(n, 2))
    t = time.perf_counter()
    index = viewer.CellIndex(xy)
    out["index_build_1M_cells_s"] = round(time.perf_counter() - t, 3)
    qs = []
    for c in rng.uniform(500, 9500, size=(50, 2)):
        t = time.perf_counter()
        index.query((c[0] - 128, c[1] - 128, c[0] + 128, c[1] + 128))
        qs.append(time.perf_counter() - t)
    out["query_256um_window_1M_cells_ms"] = round(1000 * statistics.median(qs), 3)
    with open_slide(slide_path) as s:
        w_um, h_um = s.dimensions[0] * s.mpp, s.dimensions[1] * s.mpp
        dens = 1 / 80.0  # ~1 nucleus per 80 µm² of tissue
        m = int(w_um * h_um * dens)
        a = synthetic_slide_prediction(m, w_um, h_um, n_genes=50)
        a.obsm[OBSM_NUCLEUS_RAYS] = rng.uniform(2, 5, size=(m, 16))
        idx = viewer.CellIndex(a.obsm["spatial"])
        gene = str(a.var_names[0])
        for mag in (10, 20, 40):
            reads, builds, sizes, objs = [], [], [], []
            for k in range(repeats):  # a pan: a new centre every time
                centre = (w_um * (0.3 + 0.1 * k), h_um * (0.3 + 0.1 * k))
                t = time.perf_counter()
                win = viewer.read_window(s, centre, mag)
                reads.append(time.perf_counter() - t)
                t = time.perf_counter()
                gm = viewer.cell_view(a, gene, win, index=idx)
                text = gm.deck.to_json()
                builds.append(time.perf_counter() - t)
                sizes.append(len(text))
                objs.append(gm.n_objects)
            out[f"{mag}x"] = {"window_um": round(win.bounds_um[2] - win.bounds_um[0], 1), "image_px": list(win.rgb.shape[1::-1]),
                              "read_s": round(statistics.median(reads), 4), "deck_json_s": round(statistics.median(builds), 4),
                              "drawn_as": gm.mode, "objects": int(statistics.median(objs)),
                              "json_mb": round(statistics.median(sizes) / 1e6, 3)}
            print(f"viewer {mag:2d}x: {out[f'{mag}x']}")
    return out


MILLION = 1_000_000


def million_cells(slide_path: Path | None = None, n: int = MILLION, n_genes: int = 272) -> dict:
    """Gene maps page (AppTest, server side) on a finished 1M-cell run: whole slide through the grid
    pyramid, then zoom and pan (viewport-limited cells/outlines); seconds per rerun and objects sent."""
    import shutil

    import streamlit as st

    from ghist_core._keys import OBSM_NUCLEUS_RAYS, OBSM_TYPE_PROBABILITIES
    from ghist_core.project.store import Project
    from apptest_kit import open_page, register_prediction

    slide_path = slide_path or REPO / "tmp" / "scaling" / "slides" / "synthetic_1gpx.tif"
    if not slide_path.is_file():
        raise SystemExit(f"{slide_path} missing: build it with python bench/pipeline.py --scaling --scaling-sizes 1")
    out: dict = {"n_cells": n, "n_genes": n_genes, "loadavg_start": [round(v, 2) for v in os.getloadavg()],
                 "how": "AppTest of app.py -> pages/gene_maps.py (the page's own code and caches, no browser); "
                        "seconds = wall time of one at.run(); objects = data rows of the deck layers sent"}
    work = Path(tempfile.mkdtemp(prefix="ghist-bench-million-", dir=REPO / "tmp"))
    try:
        t = time.perf_counter()
        project = Project.open_or_create(work / "projects" / "million", name="million")
        rec = project.add_slide(slide_path, patient_id="BIG-01", mpp=0.25)
        w_um, h_um = rec.width * rec.mpp, rec.height * rec.mpp
        a = synthetic_slide_prediction(n, w_um, h_um, n_genes=n_genes)
        rng = np.random.default_rng(1)
        set_obsm_matrix(a, OBSM_NUCLEUS_RAYS, rng.uniform(2, 5, size=(n, 16)).astype(np.float32),
                        [f"ray_{k:02d}" for k in range(16)])
        set_obsm_matrix(a, OBSM_TYPE_PROBABILITIES, rng.dirichlet(np.ones(9), n).astype(np.float32), palette.CELL_TYPES)
        run_id = register_prediction(project, rec.slide_id, a, grid_sizes_um=DEFAULT_GRID_SIZES_UM)
        out["slide"] = {"name": slide_path.name, "width_px": rec.width, "height_px": rec.height, "mpp": rec.mpp,
                        "format": rec.format, "vendor": rec.vendor}
        out["setup_s"] = round(time.perf_counter() - t, 1)
        res = project.result_files(run_id)
        out["h5ad_bytes"], out["grid_bytes"] = res["h5ad"].stat().st_size, res["grid"].stat().st_size
        del a
        os.environ["GHIST_PROJECTS_DIR"] = str(work / "projects")
        os.chdir(REPO)
        st.cache_data.clear()
        st.cache_resource.clear()

        def sent(at) -> dict:
            specs = [json.loads(e.proto.json) for e in at.get("deck_gl_json_chart")]
            layers = [(layer["@@type"], len(layer.get("data") or []) if isinstance(layer.get("data"), list) else 1)
                      for sp in specs for layer in sp["layers"]]
            return {"layers": [f"{k}:{v}" for k, v in layers],
                    "objects": sum(v for k, v in layers if k != "BitmapLayer"),
                    "json_mb": round(sum(len(e.proto.json) for e in at.get("deck_gl_json_chart")) / 1e6, 3)}

        def timed(at, label: str, repeats: int = 1) -> None:
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                at.run()
                ts.append(time.perf_counter() - t0)
                assert not at.exception, [e.value for e in at.exception]
            out["steps"][label] = {"seconds": [round(v, 3) for v in ts], **sent(at),
                                   "loadavg": [round(v, 2) for v in os.getloadavg()]}
            print(f"million {label:34s} {ts} s  {out['steps'][label]['objects']} objects  "
                  f"{out['steps'][label]['json_mb']} MB")

        out["steps"] = {}
        t0 = time.perf_counter()
        at = open_page("pages/gene_maps.py", {"project_dir": str(project.folder)}, timeout=900)
        out["steps"]["first open (reads the h5ad and grid)"] = {"seconds": [round(time.perf_counter() - t0, 3)], **sent(at)}
        print("million first open", out["steps"]["first open (reads the h5ad and grid)"])
        timed(at, "whole slide, rerun", 3)
        import hashlib

        slide_key = f"{hashlib.sha1(str(project.folder).encode()).hexdigest()[:8]}_{rec.slide_id}"  # as the page keys it
        cx, cy = w_um / 2, h_um / 2
        for mag in ("10×", "20×", "40×"):
            at.session_state[f"gm_zoom_{slide_key}"] = mag
            timed(at, f"zoom to {mag} (first)")
            timed(at, f"{mag} rerun (cached)", 2)
        for k in range(3):  # pans at 40×: a new centre each time (new window read + viewport query)
            at.session_state[f"gm_cx_{slide_key}"] = cx + 150.0 * (k + 1)
            at.session_state[f"gm_cy_{slide_key}"] = cy - 100.0 * (k + 1)
            timed(at, f"pan at 40x #{k + 1}")
        at.session_state[f"gm_zoom_{slide_key}"] = "Whole slide"
        timed(at, "back to whole slide", 2)
        # where a pan's time goes: the same ghist_core calls the page makes, outside Streamlit (median of 5 pans)
        from ghist_core.pipeline.blocks import load_prediction
        from ghist_core.viz import viewer

        adata = load_prediction(project, rec.slide_id)
        index = viewer.CellIndex(adata.obsm["spatial"])
        gene = str(adata.var_names[0])
        parts: dict = {}
        for mag in (10, 20, 40):
            reads, builds = [], []
            for k in range(5):
                centre = (cx + 211.0 * (k + 1), cy + 97.0 * (k + 1))
                t0 = time.perf_counter()
                win = viewer.read_project_window(project, rec.slide_id, centre, mag)
                reads.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                gm = viewer.cell_view(adata, gene, win, index=index)
                gm.deck.to_json()
                builds.append(time.perf_counter() - t0)
            parts[f"{mag}x"] = {"read_window_s": round(statistics.median(reads), 3),
                                "cells_and_deck_json_s": round(statistics.median(builds), 3),
                                "objects": int(gm.n_objects), "drawn_as": gm.mode}
        parts["loadavg"] = [round(v, 2) for v in os.getloadavg()]
        out["pan_breakdown_direct_calls"] = parts
        print("million pan breakdown", parts)
        reruns = [v for k, v in out["steps"].items() if "rerun" in k or "pan" in k or "back" in k]
        out["max_rerun_s"] = max(max(v["seconds"]) for v in reruns)
        out["goal"] = "server-side rerun < 0.3 s; per-cell points only when zoomed in"
        out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    if "--million" in sys.argv:
        out = REPO / "bench" / "results" / "app.json"
        r = million_cells()
        results = json.loads(out.read_text()) if out.exists() else {}
        results["million_cells"] = r
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if "--viewer" in sys.argv:
        out = REPO / "bench" / "results" / "app.json"
        results = json.loads(out.read_text()) if out.exists() else {}
        results["viewer"] = viewer_timings()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"Chromium not found at {CHROMIUM}")
    results: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                 "platform": platform.platform(), "device": "CPU only (Chromium SwiftShader WebGL)",
                                 "load_average_at_start": list(os.getloadavg())}, "n_cells": N_CELLS}
    with tempfile.TemporaryDirectory(prefix="ghist-bench-app-") as tmp:
        tmp = Path(tmp)
        (tmp / "empty").mkdir()
        make_big_demo_project(tmp / "big")
        base = page_switches(tmp / "empty", tmp / "empty.log", with_map=False)
        big = page_switches(tmp / "big", tmp / "big.log", with_map=True)
        switch = {}
        for link, _ in PAGES:
            b, g = statistics.median(base[link]), statistics.median(big[link])
            switch[link] = {"baseline_empty_s": round(b, 3), "with_200k_s": round(g, 3), "ratio": round(g / b, 2)}
            print(f"switch to {link:24s} empty {b:6.3f} s  200k-cell slide {g:6.3f} s  ratio {g / b:5.2f}")
        results["page_switch"] = switch
        results["page_switch_max_s"] = max(v["with_200k_s"] for v in switch.values())
        results["gene_map_200k"] = {"first_load_s": round(big["first_gene_map_s"], 3),
                                    "revisit_s": [round(v, 3) for v in big["Gene maps (200k cells, revisit)"]]}
        print(f"gene map with 200k cells: first {big['first_gene_map_s']:.2f} s, "
              f"revisit {big['Gene maps (200k cells, revisit)']}")
        try:
            demo = clicks_to_gene_map(tmp / "demo_run", tmp / "demo.log")
        except Exception as exc:  # report, do not hide: the JSON says why it is missing
            demo = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        results["clicks_to_gene_map_demo"] = demo
        print("demo:", demo)
    results["viewer"] = viewer_timings()
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = REPO / "bench" / "results" / "app.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
