"""Model weights: find them, fetch them from the Hugging Face Hub, and refuse them unless verified.

A model called ``N`` is two files side by side: ``N.safetensors`` (the tensors) and ``N.json``
(its card, which holds the ``sha256`` of the safetensors file). They live in one of:

1. an explicit local folder (``model_id`` is an existing directory),
2. the bundled ``weights/`` folder (``GHIST_WEIGHTS_DIR`` or ``weights_dir=`` overrides it),
3. the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``),
4. the Hub itself, downloaded with ``huggingface_hub`` (``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and
   ``HF_TOKEN`` are honoured; ``owner/repo@revision`` pins a branch, tag or commit).

Every file is hashed against its card before it is used. A mismatch raises
:class:`~ghist_core.errors.WeightsIntegrityError`; Hub files are re-downloaded once first.
Weights are only ever read with ``safetensors`` (no pickle). The Hub token is never logged or stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ghist_core import paths
from ghist_core._types import ProgressCallback
from ghist_core.io.atomic import atomic_path, atomic_write_text
from ghist_core.io.hashing import sha256_file
from ghist_core.errors import (
    WeightsError,
    WeightsFormatError,
    WeightsIntegrityError,
    WeightsNotFoundError,
)
from ghist_core.weights.card import card_file_hashes, read_card, seal_card

if TYPE_CHECKING:  # torch is heavy; import it only where tensors are made
    import torch

__all__ = [
    "ResolvedWeights",
    "resolve_weights",
    "resolve_file",
    "load_state_dict",
    "save_weights",
    "list_models",
    "pull",
    "verify",
    "parse_model_id",
    "sha256_file",
    "bundled_weights_dir",
    "DEFAULT_REVISION",
]

DEFAULT_REVISION = "main"
CARD_SUFFIX = ".json"
WEIGHTS_SUFFIX = ".safetensors"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Progress callback: ``progress(fraction, message)`` (``ghist_core._types.ProgressCallback``), after each file.
Progress = ProgressCallback


@dataclass(frozen=True)
class ResolvedWeights:
    """A verified weights file and its card, with where it came from.

    ``model_id`` is ``owner/repo@revision`` for Hub models (the revision as asked; ``commit``
    holds the exact commit it resolved to) or the folder for local and bundled ones.
    """

    name: str
    weights_path: Path
    card: dict
    sha256: str
    source: str  # "local" | "bundled" | "cache" | "hub"
    model_id: str
    commit: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        return str(self.card.get("kind", ""))


# --------------------------------------------------------------------------------------------
# cards (read, shape and seal: ghist_core.weights.card)
# --------------------------------------------------------------------------------------------
def _check_files(folder: Path, name: str, card: Mapping[str, Any], *, where: str) -> str:
    """Hash every file the card lists (in ``folder``); return the weights sha256 or raise."""
    expected = card_file_hashes(card, name)
    for fname, digest in expected.items():
        fpath = folder / fname
        if not fpath.is_file():
            raise WeightsNotFoundError(f"{fname} is listed in the card of '{name}' but is missing from {where}.")
        actual = sha256_file(fpath)
        if actual != digest:
            raise WeightsIntegrityError(
                f"The weights file {fname} from {where} is damaged or was changed: its sha256 is "
                f"{actual[:12]}… but the model card says {digest[:12]}…. It will not be loaded. "
                "Delete it and download the model again (`ghist weights pull`)."
            )
    return expected[f"{name}{WEIGHTS_SUFFIX}"]


def _check_kind(card: Mapping[str, Any], name: str, kind: str | None) -> None:
    if kind is not None and card.get("kind") != kind:
        raise WeightsFormatError(
            f"The weights '{name}' are a '{card.get('kind')}' model, but a '{kind}' model is needed here. "
            "Pick weights made for this step."
        )


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise WeightsNotFoundError(f"'{name}' is not a valid model name (letters, digits, '.', '_', '-').")
    return name


# --------------------------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------------------------
def bundled_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The bundled weights folder: ``weights_dir`` if given, else ``$GHIST_WEIGHTS_DIR``, else ``weights/``."""
    if weights_dir is not None:
        return Path(weights_dir)
    env = os.environ.get("GHIST_WEIGHTS_DIR")
    return Path(env) if env else paths.BUNDLED_WEIGHTS_DIR


def parse_model_id(model_id: str) -> tuple[str, str]:
    """Split ``owner/repo@revision`` into ``(repo_id, revision)``; revision defaults to ``main``."""
    repo_id, _, revision = model_id.strip().partition("@")
    revision = revision or DEFAULT_REVISION
    if not _REPO_RE.fullmatch(repo_id) or ".." in repo_id:
        raise WeightsNotFoundError(
            f"'{model_id}' is neither an existing folder nor a Hub model id of the form owner/repo@revision."
        )
    return repo_id, revision


def _is_local_path(model_id: str) -> bool:
    """A folder if it exists, or looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``C:\\x``)."""
    if Path(model_id).expanduser().is_dir():
        return True
    if model_id.startswith((".", "/", "~")) or "\\" in model_id or re.match(r"^[A-Za-z]:", model_id):
        return True
    repo_part = model_id.partition("@")[0]  # a revision may contain '/' (refs/pr/1)
    return repo_part.count("/") > 1


@dataclass(frozen=True)
class _HubSettings:
    """Hub settings read from the environment at call time (not at import time)."""

    endpoint: str | None
    offline: bool
    cache_dir: str | None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_settings() -> _HubSettings:
    endpoint = os.environ.get("HF_ENDPOINT")
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    cache_dir = os.environ.get("HF_HUB_CACHE")
    if not cache_dir and os.environ.get("HF_HOME"):
        cache_dir = os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return _HubSettings(endpoint.rstrip("/") if endpoint else None, offline, cache_dir)


def _fallback_hint(name: str, weights_dir: Path) -> str:
    if (weights_dir / f"{name}{WEIGHTS_SUFFIX}").is_file():
        return (
            f"The bundled weights in {weights_dir} include '{name}': run without a model id "
            "(drop --model) to use them."
        )
    return (
        f"The bundled weights folder is {weights_dir} (set GHIST_WEIGHTS_DIR to use another); it has no "
        f"'{name}' yet. Put {name}.safetensors and {name}.json there, or go online and run "
        "`ghist weights pull`."
    )


# --------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------
def _resolve_folder(folder: Path, name: str, kind: str | None, source: str) -> ResolvedWeights:
    card_path = folder / f"{name}{CARD_SUFFIX}"
    weights_path = folder / f"{name}{WEIGHTS_SUFFIX}"
    if not card_path.is_file() or not weights_path.is_file():
        raise WeightsNotFoundError(
            f"No model '{name}' in {folder}: expected {weights_path.name} and {card_path.name} side by side."
        )
    card = read_card(card_path)
    _check_kind(card, name, kind)
    digest = _check_files(folder, name, card, where=f"{source} folder {folder}")
    return ResolvedWeights(name, weights_path, card, digest, source, str(folder))


def _hub_download(repo_id: str, filename: str, revision: str, s: _HubSettings, **kw: Any) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=s.cache_dir,
            endpoint=s.endpoint,
            **kw,
        )
    )


def _commit_of(snapshot_file: Path) -> str | None:
    """The commit a cached file belongs to (``…/snapshots/<commit>/<file>``)."""
    parts = snapshot_file.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _COMMIT_RE.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """A failed connection as the installed huggingface_hub raises it: through ``requests`` (before 1.0)
    an ``OSError``, through ``httpx`` or its fork ``httpx2`` (1.0 on) a ``TransportError``, which is not
    one; an offline pull then ended in a traceback."""
    import importlib

    out: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            out.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _translate_hub_error(exc: BaseException, model_id: str, name: str | None, s: _HubSettings) -> WeightsError:
    """Turn a huggingface_hub / network exception into a plain-language WeightsError (``name`` None: a
    whole-repository pull)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = (_fallback_hint(name, bundled_weights_dir()) if name is not None else
            f"The bundled models in {bundled_weights_dir()} and any cached ones still work (`ghist weights list`).")
    what = f"Model '{name}' from '{model_id}'" if name is not None else f"'{model_id}'"
    if isinstance(exc, RevisionNotFoundError):
        msg = f"The revision in '{model_id}' does not exist on the Hub. Check the branch, tag or commit."
    elif isinstance(exc, GatedRepoError):
        msg = f"'{model_id}' is gated on the Hub: accept its terms and set HF_TOKEN."
    elif isinstance(exc, RepositoryNotFoundError):
        msg = (
            f"The Hub has no model repository '{model_id}' (or it is private: set HF_TOKEN to a token that "
            "can read it)."
        )
    elif isinstance(exc, RemoteEntryNotFoundError):
        msg = (f"The Hub repository '{model_id}' has no model '{name}'." if name is not None else
               f"The Hub repository '{model_id}' lacks a file it lists.")
    elif isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and s.offline:
        msg = (
            f"{what} is not in the local Hugging Face cache and offline mode is on "
            "(HF_HUB_OFFLINE=1), so it cannot be downloaded."
        )
    elif isinstance(exc, (LocalEntryNotFoundError, HfHubHTTPError, *_network_errors())):
        cached = " is not in the local Hugging Face cache and" if name is not None else ":"
        msg = f"{what}{cached} the Hub ({s.endpoint or 'huggingface.co'}) could not be reached ({exc.__class__.__name__})."
    else:
        msg = f"{what} could not be fetched ({exc.__class__.__name__})."
    return WeightsNotFoundError(f"{msg} {hint}")


def _resolve_hub(model_id: str, name: str, kind: str | None) -> ResolvedWeights:
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = parse_model_id(model_id)
    shown_id = f"{repo_id}@{revision}"
    s = _hub_settings()
    card_name, weights_name = f"{name}{CARD_SUFFIX}", f"{name}{WEIGHTS_SUFFIX}"

    def fetch(local_only: bool) -> tuple[Path, Path, str]:
        card_path = _hub_download(repo_id, card_name, revision, s, local_files_only=local_only)
        commit = _commit_of(card_path) or revision  # same commit for the weights as for the card
        weights_path = _hub_download(repo_id, weights_name, commit, s, local_files_only=local_only)
        return card_path, weights_path, commit

    try:  # 1) the cache, with no network at all
        card_path, weights_path, commit = fetch(True)
        source = "cache"
    except ValueError as exc:  # huggingface_hub's HFValidationError: a malformed id or revision
        raise WeightsNotFoundError(f"'{shown_id}' is not a valid Hub model id ({exc}).") from None
    except (LocalEntryNotFoundError, EntryNotFoundError) as cache_miss:
        if s.offline:
            raise _translate_hub_error(cache_miss, shown_id, name, s) from None
        try:  # 2) the Hub
            card_path, weights_path, commit = fetch(False)
        except (HfHubHTTPError, EntryNotFoundError, ValueError, *_network_errors()) as exc:
            raise _translate_hub_error(exc, shown_id, name, s) from None
        source = "hub"

    try:
        card = read_card(card_path)
    except WeightsError:
        if s.offline:
            raise
        # A damaged or edited card in the cache: one forced re-download of the card, then a final check.
        try:
            card_path = _hub_download(repo_id, card_name, commit, s, force_download=True)
        except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as exc:
            raise _translate_hub_error(exc, shown_id, name, s) from None
        card = read_card(card_path)
        source = "hub"
    _check_kind(card, name, kind)
    folder = weights_path.parent
    try:
        digest = _check_files(folder, name, card, where=f"the Hugging Face cache ({shown_id})")
    except WeightsIntegrityError:
        if s.offline:
            raise
        # One forced re-download of every file the card vouches for, then a final check.
        try:
            for fname in card_file_hashes(card, name):
                _hub_download(repo_id, fname, commit, s, force_download=True)
        except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as exc:
            raise _translate_hub_error(exc, shown_id, name, s) from None
        source = "hub"
        digest = _check_files(folder, name, card, where=f"the Hub ({shown_id}, downloaded twice)")
    return ResolvedWeights(name, weights_path, card, digest, source, shown_id, commit=_commit_of(weights_path))


def resolve_weights(
    model_id: str | None = None,
    *,
    name: str,
    kind: str | None = None,
    weights_dir: str | os.PathLike | None = None,
) -> ResolvedWeights:
    """Find model ``name`` and verify it against its card.

    Parameters
    ----------
    model_id
        ``None`` (bundled weights, then the project's default Hub repo), an existing local folder, or
        ``owner/repo[@revision]``.
    name
        The model's file stem, e.g. ``"ghist-her2st"`` or ``"nuclei-seg"``.
    kind
        If given, the card's ``kind`` must match (guards against weights of the wrong kind).
    weights_dir
        Overrides the bundled folder (else ``$GHIST_WEIGHTS_DIR``, else ``weights/``).

    Raises
    ------
    WeightsNotFoundError, WeightsIntegrityError, WeightsFormatError
    """
    _validate_name(name)
    if model_id is None or str(model_id).strip() == "":
        bundled = bundled_weights_dir(weights_dir)
        if (bundled / f"{name}{WEIGHTS_SUFFIX}").is_file() or (bundled / f"{name}{CARD_SUFFIX}").is_file():
            return _resolve_folder(bundled, name, kind, "bundled")
        return _resolve_hub(paths.DEFAULT_MODEL_REPO, name, kind)
    model_id = str(model_id)
    if _is_local_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(f"The weights folder {folder} does not exist.")
        return _resolve_folder(folder.resolve(), name, kind, "local")
    return _resolve_hub(model_id, name, kind)


def resolve_file(weights_path: str | os.PathLike, *, kind: str | None = None) -> ResolvedWeights:
    """Verify ``<name>.safetensors`` at any path against the sealed card beside it (``<name>.json``).

    The one check for loaders given a file rather than a model id (``load_ghist(path=...)``, the
    learned segmenter): same card reading, seal and sha256 checks as :func:`resolve_weights`.
    """
    path = Path(weights_path).expanduser()
    if path.suffix != WEIGHTS_SUFFIX:
        raise WeightsNotFoundError(f"{path.name} is not a {WEIGHTS_SUFFIX} file; only safetensors weights are loaded.")
    name = _validate_name(path.name[: -len(WEIGHTS_SUFFIX)])
    return _resolve_folder(path.parent.resolve(), name, kind, "local")


def load_state_dict(resolved: ResolvedWeights) -> dict[str, "torch.Tensor"]:
    """Read the tensors with safetensors (never pickle), re-checking the sha256 on the very bytes loaded.

    Hashing the bytes that are parsed closes the gap between "verified" and "loaded".
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        data = Path(resolved.weights_path).read_bytes()
    except OSError as exc:
        raise WeightsNotFoundError(f"The weights file {resolved.weights_path} could not be read: {exc}.") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != resolved.sha256:
        raise WeightsIntegrityError(
            f"The weights file {Path(resolved.weights_path).name} changed after it was checked (sha256 "
            f"{actual[:12]}… instead of {resolved.sha256[:12]}…). It will not be loaded."
        )
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsFormatError(
            f"{Path(resolved.weights_path).name} is not a valid safetensors file ({exc}). "
            "Only safetensors weights are accepted."
        ) from exc


def save_weights(
    state_dict: Mapping[str, "torch.Tensor"],
    folder: str | os.PathLike,
    name: str,
    card: Mapping[str, Any],
) -> ResolvedWeights:
    """Write ``<name>.safetensors`` and its sealed card (sha256, size, ``files``, seal) atomically.

    Used by training scripts and tests so every card is made the same way.
    """
    from safetensors.torch import save_file

    _validate_name(name)
    folder = Path(folder)
    weights_path = folder / f"{name}{WEIGHTS_SUFFIX}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"name": name, "kind": str(card.get("kind", ""))})
    digest = sha256_file(weights_path)
    full = dict(card)
    full.setdefault("name", name)
    full["sha256"] = digest
    full["size"] = weights_path.stat().st_size
    files = dict(full.get("files") or {}) if isinstance(full.get("files"), Mapping) else {}
    files[weights_path.name] = {"sha256": digest, "size": full["size"]}
    full["files"] = files
    full = seal_card(full, digest)
    atomic_write_text(folder / f"{name}{CARD_SUFFIX}", json.dumps(full, indent=2, sort_keys=True) + "\n")
    return ResolvedWeights(name, weights_path, full, digest, "local", str(folder))


# --------------------------------------------------------------------------------------------
# listing, pulling, verifying
# --------------------------------------------------------------------------------------------
def _cards_in(folder: Path) -> Iterable[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    out = []
    for card_path in sorted(folder.glob(f"*{CARD_SUFFIX}")):
        stem = card_path.name[: -len(CARD_SUFFIX)]
        if (folder / f"{stem}{WEIGHTS_SUFFIX}").exists() and _NAME_RE.fullmatch(stem):
            out.append((stem, card_path))
    return out


def _summary(name: str, card_path: Path, source: str, model_id: str, commit: str | None = None) -> dict:
    """One row of :func:`list_models`; a bad card gives an empty ``card`` and its reason in ``error``."""
    error = None
    try:
        card = read_card(card_path)
    except WeightsError as exc:
        card, error = {}, str(exc)
    weights_path = card_path.with_name(f"{name}{WEIGHTS_SUFFIX}")
    return {
        "name": name,
        "kind": card.get("kind"),
        "source": source,
        "model_id": model_id,
        "commit": commit,
        "path": str(weights_path),
        "card_path": str(card_path),
        "sha256": card.get("sha256"),
        "size": weights_path.stat().st_size if weights_path.exists() else None,
        "card": card,
        "error": error,
    }


def _cached_snapshots(repo_filter: str | None = None) -> list[tuple[str, str, list[str], Path]]:
    """``(repo_id, commit, refs, snapshot_folder)`` for cached model repos, without network."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    s = _hub_settings()
    try:
        info = scan_cache_dir(s.cache_dir)
    except (CacheNotFound, OSError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or (repo_filter is not None and repo.repo_id != repo_filter):
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            out.append((repo.repo_id, rev.commit_hash, sorted(rev.refs), Path(rev.snapshot_path)))
    return out


def list_models(*, weights_dir: str | os.PathLike | None = None) -> list[dict]:
    """Bundled and cached models with their cards (no network), for the Models page and `ghist weights list`.

    Each entry (JSON-serialisable): ``name, kind, source ("bundled"|"cache"), model_id, commit, path,
    card_path, sha256, size, card, error``; ``error`` is ``None``, or says why the card cannot be
    trusted (malformed, unsealed or edited), in which case ``card`` is empty.
    """
    bundled = bundled_weights_dir(weights_dir)
    out = [_summary(n, p, "bundled", str(bundled)) for n, p in _cards_in(bundled)]
    for repo_id, commit, refs, snap in _cached_snapshots():
        rev = refs[0] if refs else commit
        for n, p in _cards_in(snap):
            out.append(_summary(n, p, "cache", f"{repo_id}@{rev}", commit))
    return out


def pull(model_id: str | None = None, progress: Progress | None = None) -> list[ResolvedWeights]:
    """Download every model of a Hub repo (default: the project's repo) into the cache and verify it.

    The revision is resolved to one commit first, so all files come from the same commit.
    ``progress(fraction, message)`` is called after each file (the message names it: "x.json (2 of 4 files)").
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    model_id = model_id or paths.DEFAULT_MODEL_REPO
    repo_id, revision = parse_model_id(model_id)
    shown_id = f"{repo_id}@{revision}"
    s = _hub_settings()
    if s.offline:
        raise WeightsNotFoundError(
            f"Cannot pull '{shown_id}': offline mode is on (HF_HUB_OFFLINE=1). Unset it to download, or use the "
            f"cached and bundled models (`ghist weights list`). {_fallback_hint('ghist-her2st', bundled_weights_dir())}"
        )
    try:
        api = HfApi(endpoint=s.endpoint)
        commit = api.model_info(repo_id, revision=revision).sha or revision
        files = sorted(
            f.path
            for f in api.list_repo_tree(repo_id, revision=commit, recursive=False)
            if getattr(f, "size", None) is not None
        )
    except (HfHubHTTPError, ValueError, *_network_errors()) as exc:
        raise _translate_hub_error(exc, shown_id, None, s) from None
    names = sorted(
        f[: -len(CARD_SUFFIX)]
        for f in files
        if f.endswith(CARD_SUFFIX) and f"{f[: -len(CARD_SUFFIX)]}{WEIGHTS_SUFFIX}" in files
        and _NAME_RE.fullmatch(f[: -len(CARD_SUFFIX)])  # a model name, never a path or markup
    )
    if not names:
        raise WeightsNotFoundError(f"The Hub repository '{shown_id}' holds no models (<name>.safetensors + <name>.json).")
    wanted = [f for n in names for f in (f"{n}{CARD_SUFFIX}", f"{n}{WEIGHTS_SUFFIX}")]
    if "README.md" in files:
        wanted.append("README.md")
    try:
        for i, fname in enumerate(wanted, 1):
            # The first file goes by the revision name so the cache records the ref (branch/tag -> commit).
            got = _hub_download(repo_id, fname, revision if i == 1 else commit, s)
            if i == 1 and _commit_of(got) not in (None, commit):
                raise WeightsNotFoundError(f"'{shown_id}' changed on the Hub during the pull; run it again.")
            if progress is not None:
                progress(i / len(wanted), f"{fname} ({i} of {len(wanted)} files)")
    except (HfHubHTTPError, EntryNotFoundError, ValueError, *_network_errors()) as exc:
        raise _translate_hub_error(exc, shown_id, None, s) from None
    resolved = []
    for n in names:
        r = _resolve_hub(f"{repo_id}@{commit}", n, None)  # cached now; re-downloads once if damaged
        resolved.append(
            ResolvedWeights(r.name, r.weights_path, r.card, r.sha256, "hub", shown_id, commit=r.commit)
        )
    return resolved


def _verify_folder(folder: Path, name: str, card_path: Path, source: str, model_id: str) -> list[dict]:
    base = dict(name=name, model_id=model_id, source=source)
    try:
        card = read_card(card_path)
        files = card_file_hashes(card, name)
    except WeightsError as exc:
        status = "mismatch" if isinstance(exc, WeightsIntegrityError) else "bad card"
        return [dict(base, file=card_path.name, expected=None, actual=None, ok=False, status=status, message=str(exc))]
    rows = [dict(base, file=card_path.name, expected=card["card_sha256"], actual=card["card_sha256"], ok=True,
                 status="ok", message="")]
    for fname, digest in files.items():
        fpath = folder / fname
        if not fpath.is_file():
            rows.append(dict(base, file=fname, expected=digest, actual=None, ok=False, status="missing",
                             message=f"{fname} is missing"))
            continue
        actual = sha256_file(fpath)
        ok = actual == digest
        rows.append(dict(base, file=fname, expected=digest, actual=actual, ok=ok, status="ok" if ok else "mismatch",
                         message="" if ok else f"{fname}: sha256 {actual[:12]}… != card {digest[:12]}…"))
    return rows


def verify(model_id: str | None = None, *, weights_dir: str | os.PathLike | None = None) -> list[dict]:
    """Re-hash every file of the bundled and cached models (or of one model id); never downloads.

    Returns one dict per file, the card first: ``name, model_id, source, file, expected, actual, ok,
    status, message`` with ``status`` one of ``ok``, ``mismatch`` (a file, or the card's seal),
    ``missing``, ``bad card`` (malformed).
    """
    rows: list[dict] = []
    if model_id is None:
        bundled = bundled_weights_dir(weights_dir)
        for n, p in _cards_in(bundled):
            rows += _verify_folder(bundled, n, p, "bundled", str(bundled))
        snaps = _cached_snapshots()
    elif _is_local_path(str(model_id)):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(f"The weights folder {folder} does not exist.")
        for n, p in _cards_in(folder):
            rows += _verify_folder(folder, n, p, "local", str(folder))
        return rows
    else:
        repo_id, revision = parse_model_id(str(model_id))
        snaps = [
            t for t in _cached_snapshots(repo_id)
            if revision in t[2] or t[1] == revision or (len(revision) >= 7 and t[1].startswith(revision))
        ]
        if not snaps:
            raise WeightsNotFoundError(
                f"'{repo_id}@{revision}' is not in the local Hugging Face cache; run `ghist weights pull {model_id}` first."
            )
    for repo_id, commit, refs, snap in snaps:
        rev = refs[0] if refs else commit
        for n, p in _cards_in(snap):
            rows += _verify_folder(snap, n, p, "cache", f"{repo_id}@{rev}")
    return rows
