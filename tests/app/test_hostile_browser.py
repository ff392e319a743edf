"""Hostile data in a real browser: no script runs and nothing is fetched from anywhere (issue #20).

A project is prepared on disk whose patient id and clinical-table cells carry a markdown image
``![x](http://127.0.0.1:<canary>/p.png)`` and an ``<img src=http://127.0.0.1:<canary>/i.png
onerror=alert(7)>``, with a finished prediction whose (sealed) model card names a gene
``<img src=http://127.0.0.1:<canary>/g.png onerror=alert(7)>`` and gives ``expression_units``
``<img src=x onerror=alert(7)>``; the same model is in the Hugging Face cache, so the Models page
lists its card. The canary is a local HTTP server on another 127.0.0.1 port that records every
request it gets. Chromium opens Home, Upload, Gene maps (hovering cells to show the deck.gl
tooltip), Cell types, Cohort (the saved table) and Models; then:

* no ``dialog`` (``alert``) fired,
* the canary server got no request, and the page requested nothing from any host but the app
  (``page.on("request")``), nor the app's ``/x`` (the ``src=x`` of the ``onerror`` image),
* the hostile text is on screen as literal characters (escaped, not rendered), the tooltip included.

The second test measures what Streamlit does with an upload's bytes (docs/SECURITY.md §4a).
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from browser_helpers import CHROMIUM, StreamlitServer, choose_gene, free_port, launch_browser, wait_app_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]


# ------------------------------------------------------------------------------ the canary host
class Canary:
    """A local HTTP server that records every request (the "remote host"); stops itself after ``max_s``."""

    def __init__(self, max_s: float = 900.0) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                hits.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_PUT = do_OPTIONS = _record

            def log_message(self, *args) -> None:  # quiet
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(max_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "Canary":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def hostile_strings(port: int) -> dict[str, str]:
    host = f"http://127.0.0.1:{port}"
    return {
        "md": f"![x]({host}/p.png)",
        "html": f"<img src={host}/i.png onerror=alert(7)>",
        "gene": f"<img src={host}/g.png onerror=alert(7)>",
        "units": "<img src=x onerror=alert(7)>",  # short: the map shows units of up to 32 characters whole
    }


# ------------------------------------------------------------------------------ the project
def hostile_model(folder: Path, gene: str, units: str) -> Path:
    """A tiny real GHIST model whose sealed card names ``gene`` and gives ``units``."""
    import torch

    from ghist_core.model import GhistConfig, GhistNet
    from ghist_core.model.predict import save_ghist

    torch.manual_seed(0)
    cfg = GhistConfig(genes=[gene, "ESR1", "CD3E"], cell_types=["Malignant", "T", "Fibroblast"], widths=(8, 16, 32, 64),
                      fpn_dim=16, embed_dim=16, patch_px=128, use_reference=False)
    return save_ghist(GhistNet(cfg), folder, {"expression_units": units, "description": units,
                                              "training": {"data": f"none ({units})"}}, name="hostile")


def hf_cache_with(weights: Path, cache: Path) -> None:
    """The model in a Hugging Face cache layout (``models--ghist--hostile``), so the Models page lists it."""
    commit = "0" * 39 + "1"
    repo = cache / "models--ghist--hostile"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in (weights, weights.with_suffix(".json")):
        blob = repo / "blobs" / f.name.replace(".", "_")
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def hostile_project(projects: Path, demo_slide: Path, s: dict[str, str], weights: Path) -> str:
    """The app's default project with a hostile patient, clinical table and finished prediction; the patient id."""

    from ghist_core.model import load_ghist
    from ghist_core.pipeline.blocks import results_dir
    from ghist_core.pipeline.grid import build_grid_pyramid, write_grid
    from ghist_core.project.store import Project
    from prediction_factory import synthetic_prediction

    pid = f"{s['md']} {s['html']}"
    project = Project.open_or_create(projects / "demo", name="Demo")
    rec = project.add_slide(demo_slide, patient_id=pid, original_name=demo_slide.name)

    model = load_ghist(path=weights, device="cpu")
    a = synthetic_prediction(n=3000, genes=tuple(model.genes), seed=1)
    g = model.provenance({}, {})
    g["expression_units"] = model.card["expression_units"]  # a model whose units come from its card
    a.uns["ghist"] = g
    run_id = project.start_run(rec.slide_id, model_id="ghist/hostile", weights_sha256=model.weights_sha256,
                               device="cpu", params={})
    out = results_dir(project, rec.slide_id)
    out.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(out / f"run_{run_id}.h5ad")
    write_grid(out / f"run_{run_id}.grid.h5", build_grid_pyramid(a, (25.0, 50.0, 100.0)))
    project.add_result_file(run_id, "h5ad", out / f"run_{run_id}.h5ad")
    project.add_result_file(run_id, "grid", out / f"run_{run_id}.grid.h5")
    project.finish_run(run_id, n_cells=a.n_obs, timings={})

    # grades include the hostile strings (Kaplan-Meier groups: legend, tables); a hostile patient id too, not the
    # slide's (with no patient in common the page keeps the whole table, so every group is drawn)
    grades = ["G1", "G3", s["md"], s["html"]]
    rows = [f"P{i:02d},{10 + 3 * i},{'Dead' if i % 3 else 'Alive'},\"{grades[i % 4]}\"" for i in range(40)]
    rows.append(f'"{pid} (table)",40,Dead,"{s["md"]}"')
    csv = projects.parent / "cohort.csv"
    csv.write_text("patient_id,os_months,os_status,grade\n" + "\n".join(rows) + "\n")
    project.add_clinical_table(csv, name=f"cohort {s['md']}", original_name="cohort.csv",
                               mapping={"patient_id": "patient_id", "time": "os_months", "event": "os_status",
                                        "time_unit": "months"})
    return pid


# ------------------------------------------------------------------------------ the browser
def open_page(page, name: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=name).first.click()
    page.wait_for_timeout(800)
    wait_app_idle(page, 120_000)
    page.wait_for_timeout(1500)


def hover_cells(page) -> list[str]:
    """Move the mouse over the gene map until deck.gl shows tooltips; their text."""
    canvas = page.locator('[data-testid="stDeckGlJsonChart"] canvas').first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    seen: list[str] = []
    for fx in np.linspace(0.2, 0.8, 7):
        for fy in np.linspace(0.2, 0.8, 7):
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=3)
            page.wait_for_timeout(120)
            tip = page.locator(".deck-tooltip")
            if tip.count() and tip.first.is_visible():
                text = tip.first.inner_text()
                if text.strip():
                    seen.append(text)
        if len(seen) >= 5:
            break
    return seen


@pytest.mark.timeout(900)
def test_hostile_data_runs_no_script_and_fetches_nothing(tmp_path, demo_slide, monkeypatch):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (see scripts/run_tests.sh)")
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "shots"
    shots.mkdir()
    with Canary() as canary:
        s = hostile_strings(canary.port)
        weights = hostile_model(tmp_path / "model", s["gene"], s["units"])
        hf_cache_with(weights, tmp_path / "hf" / "hub")
        pid = hostile_project(tmp_path / "projects", demo_slide, s, weights)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # the server's environment
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        server = StreamlitServer(tmp_path / "projects", tmp_path / "streamlit.log")
        app = urlsplit(server.url).netloc
        dialogs: list[str] = []
        foreign: list[str] = []
        app_bad: list[str] = []
        shown: dict[str, str] = {}
        try:
            with sync_playwright() as p:
                browser = launch_browser(p)
                page = browser.new_page(viewport={"width": 1400, "height": 1100})

                def on_dialog(d) -> None:
                    dialogs.append(f"{d.type}: {d.message}")
                    d.dismiss()

                def on_request(r) -> None:
                    u = urlsplit(r.url)
                    if u.scheme in ("data", "blob", "about"):
                        return
                    if u.netloc != app:
                        foreign.append(r.url)
                    elif u.path.rstrip("/").endswith(("/x", "/p.png", "/i.png", "/g.png")):
                        app_bad.append(r.url)

                page.on("dialog", on_dialog)
                page.on("request", on_request)
                page.goto(server.url, wait_until="domcontentloaded")
                page.wait_for_selector('[data-testid="stSidebarNav"]', timeout=90_000)
                wait_app_idle(page, 120_000)
                page.wait_for_timeout(2000)
                shown["Home"] = page.inner_text("body")
                page.screenshot(path=str(shots / "home.png"), full_page=True)

                for name in ("Upload & predict", "Gene maps", "Cell types & patients", "Cohort & survival", "Models"):
                    open_page(page, name)
                    if name == "Gene maps":
                        page.wait_for_selector('[data-testid="stDeckGlJsonChart"] canvas', timeout=120_000)
                        choose_gene(page, "g.png onerror")  # the search box filters; Enter picks the hostile gene
                        wait_app_idle(page, 120_000)
                        page.wait_for_timeout(2500)
                        tips = hover_cells(page)
                        shown["tooltip"] = "\n".join(tips)
                        assert tips, "no deck.gl tooltip appeared over the cells"
                    if name == "Cohort & survival":
                        page.locator('[data-testid="stSidebar"]').get_by_text("Saved in this project").click()
                        wait_app_idle(page, 120_000)
                        page.wait_for_timeout(2500)
                    if name == "Models":
                        for exp in page.locator('[data-testid="stExpander"] summary').all()[:6]:
                            exp.click()
                        page.wait_for_timeout(1000)
                    shown[name] = page.inner_text("body")
                    page.screenshot(path=str(shots / f"{name.split()[0].lower()}.png"), full_page=True)
                page.wait_for_timeout(2000)  # late image loads
                browser.close()
        finally:
            server.stop()
        time.sleep(0.5)
        hits = list(canary.hits)

    # what a reader sees: safe_text.plain puts an invisible word joiner (U+2060) into URLs so they stay unlinked
    shown = {k: v.replace("\u2060", "") for k, v in shown.items()}
    everything = "\n".join(shown.values())
    assert dialogs == [], dialogs
    assert hits == [], f"the canary host was fetched: {hits}"
    assert foreign == [], f"the page fetched from other hosts: {foreign}"
    assert app_bad == [], app_bad
    # literal text: patient id (Upload lists it), clinical cell (Cohort), gene, units (map caption and tooltip)
    assert s["md"] in everything and s["html"] in everything, {k: len(v) for k, v in shown.items()}
    assert s["gene"] in shown["Gene maps"] and s["units"] in shown["Gene maps"]
    assert s["gene"] in shown["tooltip"] and s["units"] in shown["tooltip"], shown["tooltip"][:500]
    assert s["md"] in shown["Cohort & survival"] or s["html"] in shown["Cohort & survival"]
    assert pid  # the project was made with the hostile id


# ------------------------------------------------------------------------------ uploads in RAM
UPLOAD_MB = int(os.environ.get("GHIST_UPLOAD_MEASURE_MB", "300"))


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.timeout(600)
def test_upload_bytes_leave_server_ram_once_staged(tmp_path, monkeypatch):
    """Streamlit receives a ``st.file_uploader`` file as one ``bytes`` in RAM (``MemoryUploadedFileManager``)
    and would keep it there while the file is in the widget; a closed tab never gives it back (Streamlit
    1.67 drops a disconnected session from a TTL cache without ``AppSession.shutdown()``). The Upload page
    streams each file to a staging file on disk, drops its bytes from the manager at once and shows a
    fresh uploader. Measured through the real browser (docs/SECURITY.md §4a): after staging, the server's
    RSS is back near where it started; "Remove" deletes the staged copy; a second upload followed by a
    closed tab leaves no RAM behind once the session has ended.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (see scripts/run_tests.sh)")
    if shutil.disk_usage(tmp_path).free < 4 * UPLOAD_MB * 2**20:
        pytest.skip(f"needs {4 * UPLOAD_MB} MB free disk")
    import psutil
    from playwright.sync_api import expect, sync_playwright

    from ghist_core.project.uploads import staging_dir

    if psutil.virtual_memory().available < 6 * UPLOAD_MB * 2**20:
        pytest.skip(f"needs {6 * UPLOAD_MB} MB free memory")
    big = tmp_path / "big_upload.svs"
    with open(big, "wb") as f:  # not a slide: refused after staging, which is all this needs
        chunk = os.urandom(2**20)
        for _ in range(UPLOAD_MB):
            f.write(chunk)
    monkeypatch.setenv("STREAMLIT_SERVER_DISCONNECTED_SESSION_TTL", "5")
    staging = staging_dir(tmp_path / "projects" / "demo")  # the app's default project

    def staged_files() -> list[Path]:
        return sorted(staging.glob("upload_*")) if staging.is_dir() else []

    peak = [0.0]
    stop = threading.Event()
    numbers: dict[str, float] = {}
    with StreamlitServer(tmp_path / "projects", tmp_path / "streamlit.log") as server, sync_playwright() as p:
        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_mb(server.proc.pid))
                time.sleep(0.1)

        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(server.url, wait_until="domcontentloaded")
        page.wait_for_selector('[data-testid="stSidebarNav"]', timeout=90_000)
        wait_app_idle(page, 120_000)
        open_page(page, "Upload & predict")
        page.wait_for_selector('[data-testid="stFileUploaderDropzoneInput"]', state="attached", timeout=90_000)
        wait_app_idle(page, 120_000)
        page.wait_for_timeout(3000)
        numbers["before_mb"] = _rss_mb(server.proc.pid)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.monotonic()
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(big))
        card_remove = page.get_by_role("button", name="Remove", exact=True)
        expect(card_remove).to_be_visible(timeout=180_000)  # the staged card; the uploader is empty again
        wait_app_idle(page, 300_000)
        page.wait_for_timeout(3000)
        numbers["upload_s"] = time.monotonic() - t0
        numbers["staged_mb"] = _rss_mb(server.proc.pid)
        assert [f.stat().st_size for f in staged_files()] == [big.stat().st_size]
        assert page.get_by_text("big_upload.svs").first.is_visible()
        assert page.get_by_role("button", name=f"Remove {big.name}").count() == 0  # not held by the uploader
        page.screenshot(path=str(tmp_path / "uploaded.png"), full_page=True)
        card_remove.click()
        wait_app_idle(page, 120_000)
        page.wait_for_timeout(2000)
        assert staged_files() == []  # "Remove" deleted the staged copy
        assert page.get_by_text("big_upload.svs").count() == 0
        numbers["removed_mb"] = _rss_mb(server.proc.pid)
        # again, then close the tab without adding or removing it
        again = tmp_path / "big_upload_2.svs"
        os.link(big, again)
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(again))
        expect(page.get_by_role("button", name="Remove", exact=True)).to_be_visible(timeout=180_000)
        wait_app_idle(page, 180_000)
        page.wait_for_timeout(3000)
        numbers["staged_again_mb"] = _rss_mb(server.proc.pid)
        browser.close()
        time.sleep(15)  # > disconnectedSessionTTL (5 s) plus the runtime's cleanup tick
        numbers["session_ended_mb"] = _rss_mb(server.proc.pid)
        stop.set()
        t.join(2)
        numbers["peak_mb"] = peak[0]
    numbers["upload_mb"] = UPLOAD_MB
    print("UPLOAD_RAM", {k: round(v, 1) for k, v in numbers.items()})
    assert numbers["staged_mb"] - numbers["before_mb"] < 0.5 * UPLOAD_MB, numbers  # the bytes left RAM once staged
    assert numbers["staged_again_mb"] - numbers["before_mb"] < 0.5 * UPLOAD_MB, numbers
    assert numbers["session_ended_mb"] - numbers["before_mb"] < 0.5 * UPLOAD_MB, numbers
    assert numbers["peak_mb"] - numbers["before_mb"] < 3.5 * UPLOAD_MB, numbers  # while receiving: bounded
    # the closed tab's staged copy belongs to this (now stopped) server: the next start's sweep removes it
    assert len(staged_files()) <= 1
