"""Weights resolution against a real Hub-compatible server on 127.0.0.1 (no mocks of huggingface_hub).

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME when it is imported, so every Hub
scenario runs in a fresh Python subprocess with its environment set; the server runs here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ghist_core import paths
from ghist_core.errors import WeightsFormatError, WeightsIntegrityError, WeightsNotFoundError
from ghist_core.testing.hub import HubServer
from ghist_core.weights.card import seal_card
from ghist_core.weights.resolve import (
    list_models,
    load_state_dict,
    parse_model_id,
    resolve_weights,
    save_weights,
    sha256_file,
    verify,
)

REPO = "ghist-test/tiny-models"
TOKEN = "hf_testtoken_" + "x" * 20


def _make_models(folder: Path, seed: int) -> dict[str, str]:
    """Two tiny real models (a 'ghist' and a 'segmentation' one); returns name -> sha256."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, kind in (("tiny-ghist", "ghist"), ("tiny-seg", "segmentation")):
        r = save_weights(
            {"w": torch.randn(8, 4, generator=g), "b": torch.randn(8, generator=g)},
            folder,
            name,
            {"kind": kind, "metrics": {"pearson": 0.1 * seed}, "training": {"seed": seed}},
        )
        out[name] = r.sha256
    return out


def _run(code: str, env: dict[str, str], timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON line as its last output."""
    prelude = textwrap.dedent(
        """
        import json, sys
        from ghist_core.weights import resolve as W
        from ghist_core.errors import GhistError
        def emit(obj):
            print(json.dumps(obj, default=str))
        def attempt(fn):
            try:
                return {"ok": fn()}
            except GhistError as e:
                return {"error": type(e).__name__, "message": str(e)}
        def rw(r):
            return {"name": r.name, "sha256": r.sha256, "source": r.source, "model_id": r.model_id,
                    "commit": r.commit, "path": str(r.weights_path), "kind": r.card.get("kind")}
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=paths.REPO_DIR,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr  # the token is never printed or logged
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub(tmp_path: Path):
    """A Hub with two commits of REPO: 'v1' (old) and 'main' (new)."""
    old, new = tmp_path / "repo_v1", tmp_path / "repo_v2"
    sha_old, sha_new = _make_models(old, 1), _make_models(new, 2)
    with HubServer() as server:
        c_old = server.add_repo(REPO, old, revision=["v1", "refs/pr/1"])
        c_new = server.add_repo(REPO, new, revision="main")
        server.meta = {"old": sha_old, "new": sha_new, "c_old": c_old, "c_new": c_new}  # type: ignore[attr-defined]
        yield server


def _env(tmp_path: Path, hub: HubServer | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        GHIST_WEIGHTS_DIR=str(tmp_path / "bundled"),
        PYTHONPATH=str(paths.REPO_DIR),
    )
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------
# local and bundled folders (no network involved)
# ------------------------------------------------------------------------------------------
def test_local_folder_resolve_and_load(tmp_path: Path) -> None:
    shas = _make_models(tmp_path / "m", 3)
    r = resolve_weights(str(tmp_path / "m"), name="tiny-ghist", kind="ghist")
    assert r.source == "local" and r.sha256 == shas["tiny-ghist"] == sha256_file(r.weights_path)
    sd = load_state_dict(r)
    assert set(sd) == {"w", "b"} and sd["w"].shape == (8, 4)
    with pytest.raises(WeightsFormatError, match="segmentation"):
        resolve_weights(str(tmp_path / "m"), name="tiny-seg", kind="ghist")
    with pytest.raises(WeightsNotFoundError, match="No model 'absent'"):
        resolve_weights(str(tmp_path / "m"), name="absent")


def test_bundled_dir_override_and_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tmp_path / "bundled"
    shas = _make_models(bundled, 4)
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(bundled))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    r = resolve_weights(name="tiny-seg")
    assert (r.source, r.sha256, r.model_id) == ("bundled", shas["tiny-seg"], str(bundled))
    listed = json.loads(json.dumps(list_models()))  # plain JSON for `ghist weights list`
    assert [(m["name"], m["kind"], m["source"]) for m in listed] == [
        ("tiny-ghist", "ghist", "bundled"), ("tiny-seg", "segmentation", "bundled")
    ]
    # one flipped byte: refused, with a message saying what to do
    data = bytearray(r.weights_path.read_bytes())
    data[-1] ^= 0x01
    r.weights_path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="damaged or was changed"):
        resolve_weights(name="tiny-seg")
    rows = {row["name"]: row for row in verify()}
    assert rows["tiny-seg"]["status"] == "mismatch" and rows["tiny-ghist"]["status"] == "ok"
    # load_state_dict re-hashes the bytes it parses: a file swapped after resolution is refused
    ok = resolve_weights(name="tiny-ghist")
    ok.weights_path.write_bytes(r.weights_path.read_bytes())
    with pytest.raises(WeightsIntegrityError, match="changed after it was checked"):
        load_state_dict(ok)


def test_card_without_sha_and_non_safetensors_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _make_models(folder, 5)
    card = json.loads((folder / "tiny-ghist.json").read_text())
    del card["sha256"], card["files"]
    (folder / "tiny-ghist.json").write_text(json.dumps(card))
    with pytest.raises(WeightsIntegrityError, match="no valid sha256"):
        resolve_weights(str(folder), name="tiny-ghist")
    # a pickle-style file dressed as safetensors, with a matching sha256 in its card: never unpickled
    bogus = b"\x80\x04\x95" + b"not safetensors" * 10
    (folder / "evil.safetensors").write_bytes(bogus)
    (folder / "evil.json").write_text(json.dumps(seal_card({"name": "evil", "kind": "ghist"}, hashlib.sha256(bogus).hexdigest())))
    r = resolve_weights(str(folder), name="evil")
    with pytest.raises(WeightsFormatError, match="not a valid safetensors"):
        load_state_dict(r)


def test_parse_model_id() -> None:
    assert parse_model_id("a/b") == ("a/b", "main")
    assert parse_model_id("owner/repo@v1.2") == ("owner/repo", "v1.2")
    with pytest.raises(WeightsNotFoundError):
        parse_model_id("not a repo id")


# ------------------------------------------------------------------------------------------
# the Hub, through a real server
# ------------------------------------------------------------------------------------------
def test_download_verify_then_cache(tmp_path: Path, hub: HubServer) -> None:
    env = _env(tmp_path, hub)
    out = _run(
        f"""
        a = W.resolve_weights("{REPO}", name="tiny-ghist", kind="ghist")
        b = W.resolve_weights("{REPO}", name="tiny-ghist")
        sd = W.load_state_dict(b)
        emit({{"a": rw(a), "b": rw(b), "keys": sorted(sd)}})
        """,
        env,
    )
    a, b = out["a"], out["b"]
    assert a["source"] == "hub" and b["source"] == "cache"
    assert a["sha256"] == b["sha256"] == hub.meta["new"]["tiny-ghist"]  # type: ignore[attr-defined]
    assert a["commit"] == hub.meta["c_new"] and a["model_id"] == f"{REPO}@main"  # type: ignore[attr-defined]
    assert out["keys"] == ["b", "w"]
    # the HEAD carried X-Repo-Commit and ETag (else huggingface_hub refuses); the file came over GET once
    assert hub.count("HEAD", "/resolve/") == 2
    assert hub.count("GET", "tiny-ghist.safetensors") == 1
    assert sha256_file(a["path"]) == a["sha256"]


def test_revision_pinning(tmp_path: Path, hub: HubServer) -> None:
    m = hub.meta  # type: ignore[attr-defined]
    out = _run(
        f"""
        emit({{rev: rw(W.resolve_weights("{REPO}@" + rev, name="tiny-seg"))
               for rev in ("main", "v1", "refs/pr/1", "{m['c_old']}")}})
        """,
        _env(tmp_path, hub),
    )
    assert out["main"]["sha256"] == m["new"]["tiny-seg"]
    assert out["v1"]["sha256"] == out["refs/pr/1"]["sha256"] == m["old"]["tiny-seg"] != m["new"]["tiny-seg"]
    assert out[m["c_old"]]["sha256"] == m["old"]["tiny-seg"] and out[m["c_old"]]["commit"] == m["c_old"]
    bad = _run(f'emit(attempt(lambda: W.resolve_weights("{REPO}@nope", name="tiny-seg")))', _env(tmp_path, hub))
    assert bad["error"] == "WeightsNotFoundError" and "revision" in bad["message"]
    missing = _run('emit(attempt(lambda: W.resolve_weights("ghist-test/absent", name="tiny-seg")))', _env(tmp_path, hub))
    assert missing["error"] == "WeightsNotFoundError" and "no model repository" in missing["message"]


def test_offline_with_prefilled_cache_needs_no_server(tmp_path: Path, hub: HubServer) -> None:
    env = _env(tmp_path, hub)
    _run(f'emit(rw(W.resolve_weights("{REPO}@v1", name="tiny-ghist")))', env)
    hub.stop()  # nothing listens any more
    before = len(hub.requests)
    offline = _run(
        f'emit(rw(W.resolve_weights("{REPO}@v1", name="tiny-ghist")))', dict(env, HF_HUB_OFFLINE="1")
    )
    assert offline["source"] == "cache" and offline["sha256"] == hub.meta["old"]["tiny-ghist"]  # type: ignore[attr-defined]
    assert len(hub.requests) == before


def test_offline_empty_cache_names_the_bundled_fallback(tmp_path: Path) -> None:
    env = _env(tmp_path, None, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    out = _run(f'emit(attempt(lambda: W.resolve_weights("{REPO}", name="tiny-ghist")))', env)
    assert out["error"] == "WeightsNotFoundError"
    assert "offline" in out["message"] and str(tmp_path / "bundled") in out["message"]
    assert "GHIST_WEIGHTS_DIR" in out["message"]
    # default model id (None): bundled folder empty -> the project's repo -> same clear error
    out = _run('emit(attempt(lambda: W.resolve_weights(name="tiny-ghist")))', env)
    assert out["error"] == "WeightsNotFoundError" and paths.DEFAULT_MODEL_REPO in out["message"]


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released): a Hub that cannot be reached."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_hub_is_a_plain_message_not_a_traceback(tmp_path: Path) -> None:
    """Online mode, no network: newer huggingface_hub raises httpx errors, which are not OSErrors, so a
    pull ended in a traceback (CLI) or the generic error box (Models page)."""
    env = _env(tmp_path, None, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    out = _run(f'emit(attempt(lambda: W.pull("{REPO}")))', env)
    assert out["error"] == "WeightsNotFoundError", out
    assert "could not be reached" in out["message"] and "'*'" not in out["message"]
    assert "ghist weights list" in out["message"]
    out = _run(f'emit(attempt(lambda: W.resolve_weights("{REPO}", name="tiny-ghist")))', env)
    assert out["error"] == "WeightsNotFoundError" and "could not be reached" in out["message"]
    cli = subprocess.run([sys.executable, "-m", "ghist_core.cli", "weights", "pull", REPO], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 3 and "Traceback" not in cli.stderr and "could not be reached" in cli.stderr


def test_corrupted_download_is_fetched_again_once(tmp_path: Path, hub: HubServer) -> None:
    env = _env(tmp_path, hub)
    hub.corrupt(REPO, "tiny-ghist.safetensors", times=1)  # a transient glitch
    out = _run(f'emit(rw(W.resolve_weights("{REPO}", name="tiny-ghist")))', env)
    assert out["sha256"] == hub.meta["new"]["tiny-ghist"] and out["source"] == "hub"  # type: ignore[attr-defined]
    assert hub.count("GET", "tiny-ghist.safetensors") == 2

    hub.corrupt(REPO, "tiny-seg.safetensors", times=None)  # always damaged
    out = _run(f'emit(attempt(lambda: W.resolve_weights("{REPO}", name="tiny-seg")))', env)
    assert out["error"] == "WeightsIntegrityError" and "downloaded twice" in out["message"]
    assert hub.count("GET", "tiny-seg.safetensors") == 2  # exactly one retry, then failure


def test_pull_list_and_verify(tmp_path: Path, hub: HubServer) -> None:
    env = _env(tmp_path, hub)
    out = _run(
        f"""
        steps = []
        pulled = W.pull("{REPO}@v1", progress=lambda f, msg: steps.append([f, msg]))
        emit({{"pulled": [rw(r) for r in pulled], "steps": steps,
               "listed": [(m["name"], m["source"], m["model_id"], m["kind"]) for m in W.list_models()],
               "verify": W.verify("{REPO}@v1")}})
        """,
        env,
    )
    m = hub.meta  # type: ignore[attr-defined]
    assert {p["name"]: p["sha256"] for p in out["pulled"]} == m["old"]
    assert all(p["commit"] == m["c_old"] for p in out["pulled"])
    assert out["steps"][-1][0] == 1.0 and out["steps"][-1][1].endswith("(4 of 4 files)")  # 2 models x (card + weights)
    assert [f for f, _ in out["steps"]] == sorted(f for f, _ in out["steps"])
    assert sorted(out["listed"]) == [
        ["tiny-ghist", "cache", f"{REPO}@v1", "ghist"], ["tiny-seg", "cache", f"{REPO}@v1", "segmentation"]
    ]
    assert [r["status"] for r in out["verify"]] == ["ok"] * 4  # per model: its card, then its weights
    assert hub.count("GET", "/tree/") == 1 and hub.count("GET", "/api/models/") >= 2

    # damage the cached blob: verify reports it; resolving re-downloads it once and succeeds
    blob = Path(next(p["path"] for p in out["pulled"] if p["name"] == "tiny-seg")).resolve()
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    out = _run(
        f"""
        before = W.verify("{REPO}@v1")
        r = W.resolve_weights("{REPO}@v1", name="tiny-seg")
        emit({{"before": before, "after": W.verify(), "r": rw(r)}})
        """,
        env,
    )
    assert {r["name"]: r["status"] for r in out["before"]} == {"tiny-ghist": "ok", "tiny-seg": "mismatch"}
    assert all(r["ok"] for r in out["after"]) and out["r"]["source"] == "hub"


def test_snapshot_download_and_tree_api_against_server(tmp_path: Path, hub: HubServer) -> None:
    """The server speaks enough of the Hub protocol for huggingface_hub's own high-level calls."""
    out = _run(
        f"""
        from huggingface_hub import snapshot_download, list_repo_files, HfApi
        snap = snapshot_download("{REPO}", revision="v1")
        info = HfApi().model_info("{REPO}", files_metadata=True)
        emit({{"files": sorted(list_repo_files("{REPO}")), "snap": snap, "sha": info.sha,
               "lfs": {{s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}}}})
        """,
        _env(tmp_path, hub),
    )
    m = hub.meta  # type: ignore[attr-defined]
    assert out["files"] == ["tiny-ghist.json", "tiny-ghist.safetensors", "tiny-seg.json", "tiny-seg.safetensors"]
    assert out["sha"] == m["c_new"] and out["snap"].endswith(m["c_old"])
    assert out["lfs"]["tiny-seg.safetensors"] == m["new"]["tiny-seg"]
    assert sha256_file(Path(out["snap"]) / "tiny-seg.safetensors") == m["old"]["tiny-seg"]


def test_token_is_sent_but_never_stored(tmp_path: Path) -> None:
    folder = tmp_path / "private"
    shas = _make_models(folder, 6)
    with HubServer(require_token=TOKEN) as private:
        private.add_repo(REPO, folder)
        denied = _run(
            f'emit(attempt(lambda: W.resolve_weights("{REPO}", name="tiny-ghist")))', _env(tmp_path, private)
        )
        assert denied["error"] == "WeightsNotFoundError" and "HF_TOKEN" in denied["message"]
        ok = _run(
            f'emit(rw(W.resolve_weights("{REPO}", name="tiny-ghist")))', _env(tmp_path, private, HF_TOKEN=TOKEN)
        )
        assert ok["sha256"] == shas["tiny-ghist"]
        assert any(r["auth"] for r in private.requests)
    for p in (tmp_path / "hf_home").rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert TOKEN.encode() not in p.read_bytes(), p


# ------------------------------------------------------------------------------------------
# scripts/publish_weights.py (dry run: the folder that would be uploaded)
# ------------------------------------------------------------------------------------------
def _publish(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(paths.REPO_DIR / "scripts" / "publish_weights.py"), *args],
        env=env, capture_output=True, text=True, timeout=60, cwd=paths.REPO_DIR,
    )


def test_publish_dry_run_writes_verified_files_and_card(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    src = tmp_path / "weights"
    g = torch.Generator().manual_seed(0)
    save_weights({"w": torch.randn(4, 4, generator=g)}, src, "ghist-her2st",
                 {"kind": "ghist", "license": "cc-by-4.0", "metrics": {"pearson": 0.31},
                  "training": {"datasets": ["her2st"], "epochs": 2}})
    save_weights({"w": torch.randn(2, generator=g)}, src, "nuclei-seg",
                 {"kind": "segmentation", "license": "cc-by-4.0", "metrics": {"aji": 0.55},
                  "training": {"datasets": ["consep", "monuseg"]}})
    out = tmp_path / "staged"
    proc = _publish(["--weights-dir", str(src), "--dry-run", str(out), "--repo", REPO], _env(tmp_path, None))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "ghist-her2st.json", "ghist-her2st.safetensors", "nuclei-seg.json", "nuclei-seg.safetensors"
    ]
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["license"] == "cc-by-4.0"
    assert meta["datasets"] == ["consep", "her2st", "monuseg"]
    assert meta["metrics"] == ["aji", "pearson"] and "safetensors" in meta["tags"]
    # the staged folder is itself a valid weights folder
    assert [r["status"] for r in verify(str(out))] == ["ok"] * 4

    # a damaged file is never published
    (src / "nuclei-seg.safetensors").write_bytes(b"\0" * 8)
    proc = _publish(["--weights-dir", str(src), "--dry-run", str(tmp_path / "staged2")], _env(tmp_path, None))
    assert proc.returncode == 2 and "refusing to publish" in proc.stderr
    assert not (tmp_path / "staged2").exists()


def test_hubserver_speaks_the_hub_protocol(tmp_path: Path) -> None:
    """Headers huggingface_hub depends on, Range requests and the Hub's error codes, checked directly."""
    import urllib.error
    import urllib.request

    folder = tmp_path / "repo"
    shas = _make_models(folder, 7)
    (folder / "notes.txt").write_text("small file, not LFS\n")
    with HubServer() as server:
        commit = server.add_repo(REPO, folder)

        def call(path: str, method: str = "GET", **headers: str):
            req = urllib.request.Request(server.url + path, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as err:
                return err.code, dict(err.headers), err.read()

        status, h, body = call(f"/{REPO}/resolve/main/tiny-seg.safetensors", "HEAD")
        size = (folder / "tiny-seg.safetensors").stat().st_size
        assert status == 200 and body == b"" and h["X-Repo-Commit"] == commit
        assert h["X-Linked-Etag"] == f'"{shas["tiny-seg"]}"' and int(h["X-Linked-Size"]) == int(h["Content-Length"]) == size
        status, h, _ = call(f"/{REPO}/resolve/{commit}/notes.txt", "HEAD")
        blob = (folder / "notes.txt").read_bytes()
        assert status == 200 and "X-Linked-Etag" not in h
        assert h["ETag"] == '"' + hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest() + '"'  # git blob id
        status, h, body = call(f"/{REPO}/resolve/main/notes.txt", Range="bytes=6-9")
        assert status == 206 and body == blob[6:10] and h["Content-Range"] == f"bytes 6-9/{len(blob)}"
        assert call(f"/{REPO}/resolve/main/absent.bin", "HEAD")[1]["X-Error-Code"] == "EntryNotFound"
        assert call(f"/{REPO}/resolve/nope/notes.txt", "HEAD")[1]["X-Error-Code"] == "RevisionNotFound"
        assert call("/someone/else/resolve/main/x", "HEAD")[1]["X-Error-Code"] == "RepoNotFound"
        status, _, body = call(f"/api/models/{REPO}/tree/main")
        assert status == 200 and {e["path"] for e in json.loads(body)} == {
            "notes.txt", "tiny-ghist.json", "tiny-ghist.safetensors", "tiny-seg.json", "tiny-seg.safetensors"
        }
        assert server.count("HEAD") == 5 and server.count("GET", "/tree/") == 1
