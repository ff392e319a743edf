"""Patient privacy: labels, file names, patient ids, tokens and the browser session.

Rules tested here (and stated in docs/SECURITY.md):

* The slide **label and macro** images (which often show a patient's name) are never read,
  shown, extracted or exported: ``Slide`` has no way to reach them, thumbnails and
  overviews come from the tissue image, the tifffile backend skips those series, and no
  image file other than the slide itself appears in the project. The project keeps the
  uploaded slide file byte for byte (its sha256 is the provenance of every result), so the
  label stays *inside* that copy, unread.
* **Uploaded names** are sanitised before they touch the file system: paths, ``..``,
  control and bidirectional characters are refused; everything lands in ``slides/``.
* **Exports can pseudonymise** patient ids with a keyed hash whose key lives only in the
  browser session.
* **Logs** (Python logging at DEBUG, the worker's log file, stdout/stderr) never contain the
  patient id or the original file name on the normal path; **HF tokens** are never logged
  and never written into the project folder or the Hub cache.
* Streamlit's **XSRF protection** stays on; error details are not shown to the browser.
"""

from __future__ import annotations

import json
import logging
import re
import time
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from ghist_core.analysis.clinical import load_demo_clinical, pseudonymise_ids, safe_csv_bytes, validate_survival, guess_mapping
from ghist_core.errors import InvalidFileNameError
from ghist_core.io.slide import open_slide
from ghist_core.project import Project, sanitize_filename

REPO = Path(__file__).resolve().parents[2]
PATIENT = "MRN-55501234"
ORIGINAL = "Doe_Jane_1961-03-02_biopsy.png"
TOKEN = "hf_privacytest_" + "q" * 24
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".ndpi", ".bmp", ".gif", ".webp"}


def _crop(folder: Path, demo_slide: Path, size: int = 320) -> Path:
    from PIL import Image

    out = folder / "crop.png"
    with open_slide(demo_slide) as s:
        Image.fromarray(s.read_region((800, 1400), 0, (size, size))).save(out)
    return out


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def _strings(obj: object) -> list[str]:
    """Every string inside nested dicts / lists / arrays (for scanning AnnData ``uns``)."""
    out: list[str] = []
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, bytes):
        out.append(obj.decode("utf-8", "replace"))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += [str(k)] + _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _strings(v)
    elif isinstance(obj, np.ndarray) and obj.dtype.kind in "OUS":
        for v in obj.ravel():
            out += _strings(v)
    return out


# --------------------------------------------------------------------------- label / macro
def test_label_and_macro_are_never_exposed(svs_path: Path, tmp_path: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(svs_path)) as o:
        assoc = {k: np.asarray(v.convert("RGB")) for k, v in o.associated_images.items() if k in ("label", "macro")}
        main = np.asarray(o.get_thumbnail((256, 256)).convert("RGB")).astype(float)
    assert {"label", "macro"} <= set(assoc)  # the test slide really has both
    for backend in ("openslide", "tifffile"):
        with open_slide(svs_path, backend=backend) as s:
            assert s.dimensions == (2220, 2967), backend  # the tissue image, not the label/macro
            for attr in ("associated_images", "label", "macro", "label_image", "macro_image"):
                assert not hasattr(s, attr), (backend, attr)
            info = s.info
            json.dumps(info)  # plain numbers and text only: no pixel data rides along
            assert not any("label" in k or "macro" in k for k in info)
            th = s.thumbnail(256).astype(float)
            assert th.shape == main.shape
            assert np.abs(th - main).mean() < 6, backend  # the thumbnail is the tissue
            for name, img in assoc.items():  # and it is not the label or macro, even resized
                from PIL import Image

                resized = np.asarray(Image.fromarray(img).resize((th.shape[1], th.shape[0]))).astype(float)
                assert np.abs(th - resized).mean() > 20, (backend, name)
    # the project: one slide file (the upload, byte for byte) and no other image
    with Project.create(tmp_path / "p") as p:
        rec = p.add_slide(svs_path, original_name="CMU-1-Small-Region.svs")
        from ghist_core.pipeline.blocks import slide_overview_image

        thumb, bounds = slide_overview_image(p, rec.slide_id, 256)
        assert np.abs(thumb.astype(float) - main).mean() < 6
        images = [f for f in _files(p.folder) if f.suffix.lower() in _IMAGE_EXT]
        assert [f.relative_to(p.folder).as_posix() for f in images] == [rec.path]
        assert images[0].read_bytes() == svs_path.read_bytes()


# --------------------------------------------------------------------------- file names
@pytest.mark.parametrize("name", ["../../../etc/cron.d/evil.svs", "/etc/passwd", "..", "C:\\Users\\x\\slide.svs",
                                  "slide\u202egpj.svs", "line\nbreak.svs", "\uff0e\uff0e\uff0fslide.svs", "", "   "])
def test_path_like_upload_names_are_refused(name: str, tmp_path: Path, demo_slide: Path) -> None:
    with pytest.raises(InvalidFileNameError):
        sanitize_filename(name)
    with Project.create(tmp_path / "p") as p:
        with pytest.raises(InvalidFileNameError):
            p.add_slide(demo_slide, original_name=name)
        assert not any((p.folder / "slides").iterdir())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p"]  # nothing written beside the project


@pytest.mark.parametrize("name", ["Müller Hans (2).svs", ".htaccess.svs", "CON.svs", "x" * 400 + ".svs",
                                  "a..b.svs", "tumour;rm -rf ~;.svs", "$(reboot).svs", "%2e%2e%2fslide.svs"])
def test_odd_upload_names_land_safely_in_slides(name: str, tmp_path: Path, demo_slide: Path) -> None:
    with Project.create(tmp_path / "p") as p:
        rec = p.add_slide(demo_slide, original_name=name)
        stored = (p.folder / rec.path).resolve()
        assert stored.parent == (p.folder / "slides").resolve()
        assert re.fullmatch(r"[A-Za-z0-9._-]+", stored.name) and ".." not in stored.name
        assert not stored.name.startswith(".") and len(stored.name) <= 140
        assert rec.original_name == name  # the original is kept for display only, in the database


# --------------------------------------------------------------------------- pseudonymised exports
def test_exports_can_pseudonymise_patient_ids() -> None:
    df = load_demo_clinical()
    checked = validate_survival(df, guess_mapping(df))
    ids = checked.table["patient_id"].astype(str)
    salt = "session-secret-1"
    export = checked.table.assign(patient_id=pseudonymise_ids(ids, salt).to_numpy())
    data = safe_csv_bytes(export).decode("utf-8")
    assert not any(i in data for i in ids)  # no raw id survives in the file
    again = pseudonymise_ids(ids, salt)
    assert (again.to_numpy() == export["patient_id"].to_numpy()).all()  # stable within a session
    other = pseudonymise_ids(ids, "session-secret-2")
    assert not (other.to_numpy() == again.to_numpy()).any()  # a new key gives unlinkable ids
    import hashlib

    plain = ids.map(lambda s: "P-" + hashlib.sha256(s.encode()).hexdigest()[:10])
    assert not (plain.to_numpy() == again.to_numpy()).any()  # not recoverable by hashing known ids
    assert again.is_unique


def test_cohort_page_key_is_random_per_session_and_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GHIST_PROJECTS_DIR", str(tmp_path / "projects"))
    monkeypatch.chdir(REPO)
    salts = []
    for _ in range(2):
        at = AppTest.from_file(str(REPO / "pages" / "cohort.py"), default_timeout=120).run()
        assert not at.exception, [e.value for e in at.exception]
        salts.append(at.session_state["cohort_pseudonym_salt"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", s) for s in salts) and salts[0] != salts[1]
    for f in _files(tmp_path):
        data = f.read_bytes()
        assert not any(s.encode() in data for s in salts), f


# --------------------------------------------------------------------------- logs and tokens
@pytest.fixture()
def private_hub(tmp_path: Path):
    from testkit import make_tiny_ghist
    from ghist_core.testing.hub import HubServer

    folder = tmp_path / "hub_repo"
    folder.mkdir()
    make_tiny_ghist(folder)
    with HubServer(require_token=TOKEN) as server:
        server.add_repo("lab/private-ghist", folder)
        yield server


def test_logs_and_files_hold_no_identifiers_or_token(tmp_path: Path, demo_slide: Path, private_hub,
                                                     monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                     capfd: pytest.CaptureFixture) -> None:
    """Upload with a patient id and an identifying name, predict with a private Hub model (HF_TOKEN).

    Rule checked: the patient id and the original file name appear only in the project
    database (for display); the token appears nowhere on disk and in no log.
    """
    from ghist_core.pipeline import worker as jobs
    from ghist_core.weights.resolve import resolve_weights

    hf_home = tmp_path / "hf_home"
    for k in [k for k in list(__import__("os").environ) if k.startswith(("HF_", "HUGGING"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", private_hub.url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(tmp_path / "no_bundled"))
    caplog.set_level(logging.DEBUG)  # everything, including huggingface_hub / urllib3 / tifffile
    for name in ("huggingface_hub", "urllib3", "filelock", "ghist_core"):
        logging.getLogger(name).setLevel(logging.DEBUG)

    crop = _crop(tmp_path, demo_slide)
    project = Project.create(tmp_path / "proj")
    rec = project.add_slide(crop, patient_id=PATIENT, original_name=ORIGINAL, mpp=0.499)
    resolved = resolve_weights("lab/private-ghist", name="ghist-her2st", kind="ghist")  # in-process, logged
    assert any(r["auth"] for r in private_hub.requests)  # the token was really used
    run_id = jobs.submit_run(project.folder, rec.slide_id, model_id="lab/private-ghist", segmenter_id="classical",
                             device="cpu")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and project.get_run(run_id).status in ("queued", "running"):
        time.sleep(0.2)
    run = project.get_run(run_id)
    log = (project.folder / "runs" / str(run_id) / "worker.log").read_text(errors="replace")
    assert run.status == "finished", (run.status, run.error, log[-2000:])
    assert run.weights_sha256 is not None
    assert resolved.sha256 == ad.read_h5ad(project.result_files(run_id)["h5ad"]).uns["ghist"]["weights_sha256"]

    identifying = [PATIENT, ORIGINAL, "Doe_Jane", "Jane"]
    # 1. logs: Python logging (DEBUG, all libraries), the worker's log file, our stdout/stderr
    out, err = capfd.readouterr()
    for source, text in (("logging", caplog.text), ("worker.log", log), ("stdout", out), ("stderr", err)):
        assert TOKEN not in text, source
        for ident in identifying:
            assert ident not in text, (source, ident)
    # 2. files: the token is in no file of the project or the Hub cache
    for f in _files(project.folder) + _files(hf_home):
        assert TOKEN.encode() not in f.read_bytes(), f
    # 3. the patient id and original name are in the database only (never in result files or paths)
    for f in _files(project.folder):
        rel = f.relative_to(project.folder).as_posix()
        assert PATIENT not in rel
        if f.name.startswith("project.sqlite"):
            continue
        if f.suffix in (".h5ad", ".h5"):
            continue  # compressed: checked through AnnData below
        data = f.read_bytes()
        assert PATIENT.encode() not in data and ORIGINAL.encode() not in data, rel
    result = ad.read_h5ad(project.result_files(run_id)["h5ad"])
    texts = _strings(dict(result.uns)) + list(result.obs_names) + [str(c) for c in result.obs.columns]
    for col in result.obs.columns:
        if result.obs[col].dtype == object or isinstance(result.obs[col].dtype, pd.CategoricalDtype):
            texts += [str(v) for v in pd.unique(result.obs[col].astype(str))]
    assert not [t for t in texts if PATIENT in t or ORIGINAL in t or "Doe_Jane" in t]


def test_streamlit_config_keeps_xsrf_on_and_hides_error_details() -> None:
    cfg = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    server = cfg.get("server", {})
    assert server.get("enableXsrfProtection", True) is True
    # Streamlit turns XSRF off when CORS protection is off; both must stay on
    assert server.get("enableCORS", True) is True
    assert cfg.get("client", {}).get("showErrorDetails", "full") in ("none", False, "false")
    assert cfg.get("browser", {}).get("gatherUsageStats") is False
    assert server.get("address") == "127.0.0.1"  # loopback unless docs/SECURITY.md §1's switch is used
    # no launcher or script switches protection off behind the config's back
    offenders = []
    for p in list(REPO.glob("*.py")) + list(REPO.glob("scripts/*")) + list(REPO.glob("*.sh")) + list(REPO.glob(".ci/*")):
        if p.is_file():
            text = p.read_text(errors="replace")
            if re.search(r"enableXsrfProtection[\"'=\s]*(false|False|0)", text) or \
                    re.search(r"enableCORS[\"'=\s]*(false|False|0)", text):
                offenders.append(p.name)
    assert not offenders
    # secrets (OIDC client secret, cookie secret) are never committed
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ".streamlit/secrets.toml" not in tracked


# --------------------------------------------------------------------------- staged uploads
def test_staged_uploads_are_deleted_when_added_cancelled_or_abandoned(tmp_path: Path, demo_slide: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A staged upload is a whole slide (label included): it goes once added, once taken out of the
    uploader, and, when the app server that staged it is gone, at the next start (any age)."""
    import subprocess
    import sys

    from ghist_core.project import uploads

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert uploads.staging_root().is_relative_to(tmp_path)
    png = _crop(tmp_path, demo_slide, 200).read_bytes()
    with Project.create(tmp_path / "p") as project:
        stage = uploads.staging_dir(project.folder)
        added = uploads.upload_and_add(project, ORIGINAL, png, patient_id=PATIENT, mpp=0.499)
        assert added.is_new and not list(stage.iterdir())  # added: gone
        staged = uploads.stage_upload(ORIGINAL, png, stage)
        assert oct(staged.path.stat().st_mode & 0o777) == "0o600" and ORIGINAL not in staged.path.name
        uploads.discard_staged(staged)  # taken out of the uploader: gone
        assert not list(stage.iterdir())
        # a server process stages an upload, then stops (killed, or the tab's session just ended with it)
        code = ("import sys; from pathlib import Path; from ghist_core.project import uploads; "
                "uploads.stage_upload(sys.argv[1], Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]))")
        (tmp_path / "slide.bin").write_bytes(png)
        subprocess.run([sys.executable, "-c", code, ORIGINAL, str(tmp_path / "slide.bin"), str(stage)], check=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        mine = uploads.stage_upload("mine.png", png, stage)  # this (live) process's: kept
        assert len(list(stage.iterdir())) == 2
        gone = uploads.sweep_all_staged_uploads()  # what app.py runs once per server start
        assert len(gone) == 1 and mine.path.exists() and gone[0] != mine.path
        uploads.discard_staged(mine)
        assert not list(stage.iterdir())


def test_server_listens_on_loopback_only_by_default(tmp_path: Path) -> None:
    """`streamlit run app.py` with only the repository's config: bound to 127.0.0.1, not 0.0.0.0/::."""
    import os
    import subprocess
    import sys

    from browser_helpers import free_port, stop_process

    port = free_port()
    env = {**os.environ, "GHIST_PROJECTS_DIR": str(tmp_path / "projects"), "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("STREAMLIT_SERVER_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.headless", "true"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        listening: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not listening and proc.poll() is None:
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                for line in Path(table).read_text().splitlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    addr, p = local.split(":")
                    if int(p, 16) == port and state == "0A":  # LISTEN
                        listening.add(addr)
            time.sleep(0.3)
        assert listening, "the server did not start listening"
        assert listening == {"0100007F"}, listening  # 127.0.0.1 only (no 0.0.0.0, no ::)
    finally:
        stop_process(proc)
