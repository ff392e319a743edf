"""A real Streamlit server on 127.0.0.1 and Debian Chromium via Playwright, for browser tests and bench/app.py."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Terminate ``proc`` (a server this test started), killing it if it is still there after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StreamlitServer:
    """``streamlit run app.py`` on 127.0.0.1 with its own project folder; stopped on exit."""

    def __init__(self, projects_dir: Path, log_path: Path, port: int | None = None, ready_timeout_s: float = 60.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GHIST_PROJECTS_DIR": str(projects_dir), "PYTHONPATH": str(REPO)}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
             "--server.port", str(self.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_ready(ready_timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        import urllib.request

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("streamlit did not become healthy")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def __enter__(self) -> "StreamlitServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def require_chromium() -> None:
    """Fail (not skip) when Debian's Chromium is missing: the browser tests must run."""
    import pytest

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (see scripts/run_tests.sh)")


def open_app(p, server: StreamlitServer, viewport: tuple[int, int] = (1400, 1000)):
    """Chromium (Playwright ``p``) on the app's home page, the title shown and the script idle: ``(browser, page)``."""
    from playwright.sync_api import expect

    browser = launch_browser(p)
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.goto(server.url, wait_until="domcontentloaded")
    expect(page.get_by_text("GHIST Studio").first).to_be_visible(timeout=60_000)
    wait_app_idle(page)
    return browser, page


def open_gene_maps(p, server: StreamlitServer, viewport: tuple[int, int] = (1400, 1100)):
    """Chromium on the Gene maps page with its map drawn and the script idle: ``(browser, page)``."""
    browser, page = open_app(p, server, viewport)
    page.get_by_role("link", name="Gene maps").click()
    page.wait_for_selector('[data-testid="stDeckGlJsonChart"] canvas', timeout=120_000)
    wait_app_idle(page)
    return browser, page


def wait_app_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)


def wait_rerun(page, start_ms: int = 2_000, timeout_ms: int = 60_000) -> None:
    """After an input: give the rerun it triggers up to ``start_ms`` to begin, then wait until it ends
    (``wait_app_idle`` alone can return before the rerun has started)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_selector('[data-testid="stApp"][data-test-script-state="running"]', timeout=start_ms)
    except PlaywrightTimeout:
        pass  # it finished already, or the input triggered none
    wait_app_idle(page, timeout_ms)


def page_report(page, log_path: Path | None = None, chars: int = 3_000) -> str:
    """What the page shows (its main text, any exception box) and the server log's tail, for a failure message."""
    parts = []
    for sel in ('[data-testid="stException"]', '[data-testid="stSidebar"]', '[data-testid="stMain"]'):
        try:
            loc = page.locator(sel)
            if loc.count():
                parts.append(f"--- {sel}:\n{loc.first.inner_text(timeout=5_000)[:chars]}")
        except Exception as e:  # noqa: BLE001 (a report must not hide the failure it reports)
            parts.append(f"--- {sel}: unreadable ({e})")
    if log_path is not None and Path(log_path).exists():
        parts.append(f"--- server log tail:\n{Path(log_path).read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


ZOOM_LABELS = ["Whole slide", "5×", "10×", "20×", "40×"]


def set_zoom(page, label: str, log_path: Path | None = None) -> None:
    """Move the Gene maps sidebar's Zoom slider to ``label`` with the keyboard (Home = whole slide)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    wait_rerun(page)
    thumb = page.locator('[data-testid="stSidebar"]').get_by_role("slider").first
    try:
        thumb.wait_for(state="attached", timeout=90_000)
    except PlaywrightTimeout as e:
        raise AssertionError("no Zoom slider in the sidebar; the page shows:\n" + page_report(page, log_path)) from e
    thumb.focus()
    thumb.press("Home")
    for _ in range(ZOOM_LABELS.index(label)):
        thumb.press("ArrowRight")
    wait_rerun(page)


def canvas_image(page, index: int = 0) -> np.ndarray:
    """Screenshot of the n-th deck.gl map (the element, as the user sees it)."""
    el = page.locator('[data-testid="stDeckGlJsonChart"]').nth(index)
    el.scroll_into_view_if_needed()
    png = el.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def choose_gene(page, gene: str, include_unreliable: bool = False) -> None:
    """Replace the gene selection in the sidebar multiselect with ``gene``; ``include_unreliable``
    first switches on "Show genes that are not reliable" (when the model has reliability)."""
    toggle = page.locator('[data-testid="stSidebar"] [data-testid="stCheckbox"]').filter(
        has_text="Show genes that are not reliable")
    if include_unreliable and toggle.count() and not toggle.first.locator("input").is_checked():
        toggle.first.locator("label").first.click()
        wait_rerun(page)
    box = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').first
    clear = box.locator('[data-testid="stMultiSelectClearAll"], [aria-label="Clear all"], svg[title="Clear all"]')
    if clear.count():
        clear.first.click()
    else:  # remove the chips one by one
        for _ in range(4):
            x = box.locator('[data-testid="stMultiSelectTag"] [role="presentation"], span[role="button"]')
            if not x.count():
                break
            x.first.click()
    box.locator("input").first.fill(gene)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    wait_rerun(page)


