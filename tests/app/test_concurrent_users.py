"""Eight people on one GHIST Studio server at once: uploads stay in their own projects.

One ``streamlit run app.py`` on 127.0.0.1 (temporary projects folder); eight Playwright
browser contexts (separate cookies and sessions) drive it *concurrently*: each opens a
project (sessions 0 and 1 share one, the others have their own), uploads its own slide
through the real upload endpoint (XSRF on), adds it, and browses every page. Afterwards:
no Streamlit exception on any page, no failed request, each session sees exactly the
uploads of its project, and each project database passes ``PRAGMA integrity_check``.

``run_sessions`` is also what ``bench/robustness.py`` runs for its ``concurrent_users``
figures (sessions, requests, errors).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, StreamlitServer  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
#: Navigation link -> the page's title.
PAGES = {"Home": "GHIST Studio", "Gene maps": "Gene maps", "Cell types & patients": "Cell types & patients",
         "Cohort & survival": "Cohort & survival", "Models": "Models", "Upload & predict": "Upload & predict"}
TIMEOUT_MS = 120_000


@dataclass
class Session:
    """One simulated user: which project, which upload, and what happened."""

    index: int
    project: str
    upload: Path
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    seen: dict[str, bool] = field(default_factory=dict)  # upload name -> visible in this session
    stale_media: int = 0  # 404s for images of superseded reruns (see on_response)


def make_uploads(folder: Path, n: int) -> list[Path]:
    """``n`` small, distinct TIFF slides (0.5 µm/px in the file, so no µm/px prompt)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        img = np.full((384, 512, 3), 240, np.uint8)
        img[64:320, 64:448] = (225, 130, 175)
        img[64:320, 64:448] -= rng.integers(0, 30, size=(256, 384, 1), dtype=np.uint8)
        p = folder / f"user{i}_slide.tif"
        tifffile.imwrite(p, img, photometric="rgb", tile=(128, 128), resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")
        out.append(p)
    return out


async def _idle(page) -> None:
    await page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=TIMEOUT_MS)


async def _goto(page, link: str) -> None:
    """Click a navigation link until its page's title shows (a click during a rerun can be lost)."""
    import re

    title = page.get_by_role("heading", level=1, name=re.compile("^" + re.escape(PAGES[link])))
    for attempt in range(4):
        await page.get_by_role("link", name=link, exact=True).first.click()
        try:
            await title.first.wait_for(state="visible", timeout=30_000)
            await _idle(page)
            return
        except Exception:  # noqa: BLE001 - retry the click
            if attempt == 3:
                raise


async def _upload(page, path: Path) -> None:
    """Put ``path`` in the file uploader and wait for the slide's card (size line)."""
    from playwright.async_api import expect

    await page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(path))
    await expect(page.get_by_text(path.name).first).to_be_visible(timeout=TIMEOUT_MS)  # its card (staged)
    await _idle(page)
    await expect(page.get_by_text("512 × 384 px")).to_be_visible(timeout=TIMEOUT_MS)


async def _check_no_exception(page, s: Session, where: str) -> None:
    exc = page.locator('[data-testid="stException"]')
    if await exc.count():
        s.errors.append(f"exception on {where}: {(await exc.first.inner_text())[:300]}")
    broken = await page.evaluate(
        "() => Array.from(document.images).filter(i => i.complete && i.offsetParent !== null"
        " && i.naturalWidth === 0 && i.src).map(i => i.src)")
    if broken:
        await page.wait_for_timeout(1500)  # an image may still be arriving: look again
        broken = await page.evaluate(
            "() => Array.from(document.images).filter(i => i.complete && i.offsetParent !== null"
            " && i.naturalWidth === 0 && i.src).map(i => i.src)")
        s.errors += [f"broken image on {where}: {b[:120]}" for b in broken]


async def _user(browser, url: str, s: Session, names: list[str], same_project: dict[str, bool]) -> None:
    from playwright.async_api import expect

    ctx = await browser.new_context(viewport={"width": 1300, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)  # eight sessions share a small CPU: be patient, not flaky
    page = await ctx.new_page()

    def on_request(_req) -> None:
        s.requests += 1

    def on_response(resp) -> None:
        if resp.status == 404 and "/media/" in resp.url:
            # An image of a superseded script run: Streamlit drops it on rerun (streamlit#1294,
            # #5834). Not an error as long as no *visible* image is broken (checked per page).
            s.stale_media += 1
        elif resp.status >= 400:
            s.errors.append(f"HTTP {resp.status} {resp.url}")

    def on_failed(req) -> None:
        s.errors.append(f"request failed: {req.url} ({req.failure})")

    page.on("request", on_request)
    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    try:
        await page.goto(url, wait_until="domcontentloaded")
        await expect(page.get_by_text("GHIST Studio").first).to_be_visible(timeout=TIMEOUT_MS)
        await _idle(page)
        folder = page.get_by_role("textbox", name="Project folder")
        await folder.fill(s.project)
        await folder.press("Enter")
        await _idle(page)
        await page.get_by_role("button", name="Open / create").click()
        await expect(page.get_by_text(Path(s.project).name).first).to_be_visible(timeout=TIMEOUT_MS)
        await _idle(page)
        await _goto(page, "Upload & predict")
        await _upload(page, s.upload)
        await page.get_by_role("textbox", name="Patient id").fill(f"U{s.index:02d}")
        await page.keyboard.press("Tab")
        await page.get_by_text("Run the prediction right away").click()  # no worker: this is about the server
        await _idle(page)
        await page.get_by_role("button", name="Add to project").click()
        added = re.compile(rf"(Added {re.escape(s.upload.name)} as slide|{re.escape(s.upload.name)}: added as slide)")
        await expect(page.get_by_text(added).first).to_be_visible(timeout=TIMEOUT_MS)
        await _idle(page)
        await _check_no_exception(page, s, "Upload & predict (after adding)")
        for name in PAGES:
            await _goto(page, name)
            await page.wait_for_timeout(300)
            await _idle(page)
            await _check_no_exception(page, s, name)
        # back on Upload & predict: the runs section lists the project's slides by name
        await expect(page.get_by_text(f"{s.upload.name}").first).to_be_visible(timeout=TIMEOUT_MS)
        body = await page.locator('[data-testid="stMain"]').inner_text()
        for other in names:
            s.seen[other] = other in body
            if s.seen[other] != same_project[other]:
                s.errors.append(f"{other} is {'visible' if s.seen[other] else 'missing'} in session {s.index}")
    except Exception as exc:  # noqa: BLE001 - a session that cannot finish its script is an error
        s.errors.append(f"session {s.index} did not finish: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            await page.screenshot(path=str(s.upload.with_suffix(".error.png")), full_page=True)
        except Exception:  # noqa: BLE001
            pass
    finally:
        await ctx.close()


async def _run_all(url: str, sessions: list[Session]) -> None:
    from playwright.async_api import async_playwright

    names = [s.upload.name for s in sessions]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            await asyncio.gather(*[
                _user(browser, url, s, names, {o.upload.name: o.project == s.project for o in sessions})
                for s in sessions])
        finally:
            await browser.close()


def run_sessions(work: Path, n_sessions: int = 8) -> tuple[list[Session], dict[str, str]]:
    """Run ``n_sessions`` concurrent users against one server; returns sessions and integrity per project."""
    from ghist_core.project.store import Project

    projects = work / "projects"
    uploads = work / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    files = make_uploads(uploads, n_sessions)
    sessions = [Session(i, str(projects / ("shared" if i < 2 else f"user{i}")), files[i]) for i in range(n_sessions)]
    server = StreamlitServer(projects, work / "streamlit.log", ready_timeout_s=90)
    try:
        asyncio.run(_run_all(server.url, sessions))
    finally:
        server.stop()
    integrity = {}
    for folder in sorted({s.project for s in sessions}):
        with Project.open(folder) as proj:
            integrity[Path(folder).name] = proj.integrity_check()
            names = sorted(proj.list_slides()["original_name"])
            want = sorted(s.upload.name for s in sessions if s.project == folder)
            if names != want:
                integrity[Path(folder).name] += f" (slides {names}, expected {want})"
    return sessions, integrity


@pytest.mark.timeout(600)
def test_eight_concurrent_users(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium (see scripts/run_tests.sh)")
    sessions, integrity = run_sessions(tmp_path, 8)
    errors = [e for s in sessions for e in s.errors]
    assert not errors, "\n".join(errors[:40]) + "\n--- server log ---\n" + \
        (tmp_path / "streamlit.log").read_text(errors="replace")[-3000:]
    assert all(v == "ok" for v in integrity.values()), integrity
    # sessions 0 and 1 share a project and see both uploads; everyone else sees only their own
    assert sessions[0].seen["user1_slide.tif"] and sessions[1].seen["user0_slide.tif"]
    for s in sessions[2:]:
        assert [n for n, v in s.seen.items() if v] == [s.upload.name]
    assert all(s.requests > 10 for s in sessions)
