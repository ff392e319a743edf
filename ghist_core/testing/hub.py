"""A small Hugging Face Hub-compatible HTTP server, so tests and benches exercise real downloads.

It serves folders as model repositories at fixed commits, speaking the parts of the Hub protocol
that ``huggingface_hub`` (``hf_hub_download``, ``snapshot_download``, ``HfApi.model_info``,
``list_repo_tree``/``list_repo_files``) relies on:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob
  id for small files; for LFS-like files ``X-Linked-Etag`` = sha256 and ``X-Linked-Size`` as the
  real Hub sends), ``Content-Length``, ``Accept-Ranges`` and ``Range`` → 206;
* ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}`` (``sha``, ``siblings``);
* ``GET /api/models/{repo_id}/tree/{revision}[/{path}]`` (``recursive``);
* 404s with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``; 401 when a token is
  required and missing/wrong.

Test knobs: :meth:`HubServer.corrupt` serves a damaged copy of a file, :attr:`HubServer.requests`
records every request (method, path, range, whether an Authorization header was sent: never its
value). Binds 127.0.0.1 only, on a free port. Standard library only.

Run by hand: ``python -m ghist_core.testing.hub weights/ --repo ghist-studio/ghist-her2st``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "folder_commit"]

#: Files served the way the Hub serves Git-LFS files (sha256 ETag in X-Linked-Etag).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".h5ad", ".npz", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024


def _git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob: sha1 of ``b"blob <len>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _File:
    path: str  # posix path in the repo
    disk: Path
    size: int
    sha256: str
    blob_id: str  # git oid of the file (or of its LFS pointer)
    lfs: bool
    pointer_size: int


@dataclass
class _Repo:
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)  # commit -> path -> file
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    last_modified: dict[str, str] = field(default_factory=dict)


def _scan(folder: Path) -> dict[str, _File]:
    files: dict[str, _File] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        lfs = p.name.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        pointer = _lfs_pointer(sha, len(data))
        rel = p.relative_to(folder).as_posix()
        files[rel] = _File(
            rel, p, len(data), sha, _git_blob_oid(pointer if lfs else data), lfs, len(pointer)
        )
    return files


def folder_commit(folder: str | Path) -> str:
    """A deterministic 40-hex "commit" for a folder's content (sha1 over paths and sha256s)."""
    h = hashlib.sha1()
    for rel, f in _scan(Path(folder)).items():
        h.update(f"{rel}\0{f.sha256}\n".encode())
    return h.hexdigest()


class HubServer:
    """Serve folders as Hub model repos on ``http://127.0.0.1:<port>``.

    Examples
    --------
    >>> with HubServer() as hub:                              # doctest: +SKIP
    ...     sha = hub.add_repo("me/model", "weights/")
    ...     os.environ["HF_ENDPOINT"] = hub.url
    """

    def __init__(self, *, require_token: str | None = None) -> None:
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._corrupt: dict[tuple[str, str], int | None] = {}
        self._token_sha = hashlib.sha256(require_token.encode()).digest() if require_token else None
        self.requests: list[dict[str, Any]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- repos -----------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revision: str | list[str] = "main",
        commit: str | None = None,
    ) -> str:
        """Publish ``folder`` as a commit of ``repo_id`` and point ``revision`` (branch/tag) at it.

        Returns the 40-hex commit id. Call again with another folder to add a newer commit.
        """
        folder = Path(folder)
        files = _scan(folder)
        commit = commit or folder_commit(folder)
        if len(commit) != 40:
            raise ValueError("commit must be 40 hex characters")
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            repo.commits[commit] = files
            repo.last_modified[commit] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            for ref in [revision] if isinstance(revision, str) else revision:
                repo.refs[ref] = commit
        return commit

    def corrupt(self, repo_id: str, filename: str, times: int | None = None) -> None:
        """Serve ``filename`` with one byte flipped (same size) for the next ``times`` GETs (None: always)."""
        with self._lock:
            self._corrupt[(repo_id, filename)] = times

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many requests matched ``method`` and had ``contains`` in their path."""
        with self._lock:
            return sum(
                1 for r in self.requests if (method is None or r["method"] == method) and contains in r["path"]
            )

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lookups used by the handler -------------------------------------------------------
    def _lookup(self, repo_id: str, revision: str | None) -> tuple[str | None, _Repo | None, str | None]:
        """Return (error_code, repo, commit)."""
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            return "RepoNotFound", None, None
        revision = revision or "main"
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            return "RevisionNotFound", repo, None
        return None, repo, commit

    def _take_corruption(self, repo_id: str, filename: str) -> bool:
        with self._lock:
            key = (repo_id, filename)
            if key not in self._corrupt:
                return False
            left = self._corrupt[key]
            if left is None:
                return True
            if left <= 0:
                del self._corrupt[key]
                return False
            self._corrupt[key] = left - 1
            return True

    def _authorised(self, header: str | None) -> bool:
        if self._token_sha is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(hashlib.sha256(header[7:].encode()).digest(), self._token_sha)

    def _known_repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos, key=len, reverse=True)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "ghist-hubserver/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    # -- plumbing --------------------------------------------------------------------------
    def _record(self) -> None:
        with self.hub._lock:
            self.hub.requests.append(
                {
                    "method": self.command,
                    "path": urlsplit(self.path).path,
                    "range": self.headers.get("Range"),
                    "auth": self.headers.get("Authorization") is not None,
                }
            )

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", *, length: int | None = None) -> None:
        """Send a response; ``length`` lets HEAD announce the file size without a body."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        headers.update(extra or {})
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _split_repo(self, parts: list[str]) -> tuple[str | None, list[str]]:
        """Match the longest known repo id at the start of ``parts`` (ids have 1 or 2 segments)."""
        for n in (2, 1):
            if len(parts) >= n and "/".join(parts[:n]) in self.hub._known_repo_ids():
                return "/".join(parts[:n]), parts[n:]
        return None, parts

    # -- verbs -----------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._record()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._error(501, None, "This test server is read-only: uploads are not supported.")

    def _dispatch(self) -> None:
        self._record()
        if not self.hub._authorised(self.headers.get("Authorization")):
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            return
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.strip("/").split("/")] if split.path.strip("/") else []
        query = parse_qs(split.query)
        if parts[:2] == ["api", "models"]:
            self._api(parts[2:], query)
        elif "resolve" in parts:
            self._resolve(parts)
        else:
            self._error(404, None, "Not found")

    def _resolve(self, parts: list[str]) -> None:
        i = parts.index("resolve")
        repo_id, rest = "/".join(parts[:i]), parts[i + 1 :]
        if not rest:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        revision, filename = rest[0], "/".join(rest[1:])
        err, repo, commit = self.hub._lookup(repo_id, revision)
        if err == "RepoNotFound":
            self._error(404, err, "Repository not found")
            return
        if err == "RevisionNotFound" or repo is None or commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return
        f = repo.commits[commit].get(filename)
        if f is None:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            return
        headers = {
            "X-Repo-Commit": commit,
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.sha256}"' if f.lfs else f'"{f.blob_id}"',
            "Content-Disposition": f'inline; filename*=UTF-8\'\'{Path(filename).name}; filename="{Path(filename).name}";',
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if self.command == "HEAD":
            self._send(200, b"", headers, "application/octet-stream", length=f.size)
            return
        data = f.disk.read_bytes()
        if self.hub._take_corruption(repo_id, filename) and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].split(",")[0].partition("-")
            start = int(start_s) if start_s else max(len(data) - int(end_s), 0)
            end = int(end_s) if (end_s and start_s) else len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data):
                self._error(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, "application/octet-stream")

    def _api(self, parts: list[str], query: dict[str, list[str]]) -> None:
        repo_id, rest = self._split_repo(parts)
        if repo_id is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        if not rest or rest[0] == "revision":
            revision = rest[1] if len(rest) > 1 else "main"
            err, repo, commit = self.hub._lookup(repo_id, revision)
            if err or repo is None or commit is None:
                self._error(404, err, "Invalid rev id: " + revision if err == "RevisionNotFound" else "Repository not found")
                return
            files = repo.commits[commit]
            body = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": commit,
                "lastModified": repo.last_modified[commit],
                "createdAt": repo.last_modified[commit],
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["safetensors", "ghist"],
                "library_name": "ghist-studio",
                "siblings": [
                    {
                        "rfilename": f.path,
                        "size": f.size,
                        "blobId": f.blob_id,
                        **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}} if f.lfs else {}),
                    }
                    for f in files.values()
                ],
            }
            self._send(200, json.dumps(body).encode())
            return
        if rest[0] == "tree" and len(rest) >= 2:
            revision, sub = rest[1], "/".join(rest[2:]).strip("/")
            err, repo, commit = self.hub._lookup(repo_id, revision)
            if err or repo is None or commit is None:
                self._error(404, err, "Invalid rev id: " + revision)
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            files = repo.commits[commit]
            prefix = f"{sub}/" if sub else ""
            if sub and not any(p.startswith(prefix) for p in files):
                self._error(404, "EntryNotFound", f"{sub} does not exist on \"{revision}\"", {"X-Repo-Commit": commit})
                return
            entries: list[dict[str, Any]] = []
            dirs: set[str] = set()
            for p, f in files.items():
                if not p.startswith(prefix):
                    continue
                tail = p[len(prefix) :]
                segs = tail.split("/")
                for k in range(1, len(segs)):  # folders on the way
                    d = prefix + "/".join(segs[:k])
                    if (recursive or k == 1) and d not in dirs:
                        dirs.add(d)
                        entries.append({"type": "directory", "oid": _git_blob_oid(d.encode()), "size": 0, "path": d})
                if recursive or len(segs) == 1:
                    e: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": p}
                    if f.lfs:
                        e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                    entries.append(e)
            self._send(200, json.dumps(entries).encode(), {"X-Repo-Commit": commit})
            return
        self._error(404, None, "Not found")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a folder as a Hugging Face Hub model repo on 127.0.0.1.")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--repo", default="ghist-studio/ghist-her2st")
    ap.add_argument("--revision", default="main")
    args = ap.parse_args(argv)
    hub = HubServer().start()
    commit = hub.add_repo(args.repo, args.folder, revision=args.revision)
    print(f"HF_ENDPOINT={hub.url}  repo={args.repo}@{args.revision}  commit={commit}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
