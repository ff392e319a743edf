"""Files the project keeps: safe names for uploads and verified, atomic copies into the folder.

**Files first, rows second, never the other way round**: a file is copied atomically (temp +
``os.replace``) and its hash checked before its row is committed, and removed if the row cannot be
written, so a row never points at a half-written or different file.
"""

from __future__ import annotations

import errno
import hashlib
import re
import unicodedata
from pathlib import Path

from ghist_core.errors import GhistError, InvalidFileNameError, StoreError
from ghist_core.io.atomic import atomic_path

__all__ = ["sanitize_filename", "copy_verified", "unlink_quiet", "os_error_message"]

_MAX_NAME = 120

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_MULTI_EXT = (".ome.tiff", ".ome.tif", ".tar.gz")


def sanitize_filename(name: str, *, max_len: int = _MAX_NAME) -> str:
    """A safe on-disk file name for an uploaded ``name`` (the original is kept for display).

    Refused (:class:`InvalidFileNameError`): empty names, paths (``/``, ``\\``, also when they only
    appear after Unicode NFKC normalisation, e.g. fullwidth ``／``), ``.``/``..``, control and
    bidirectional-override characters. Accepted names are NFKC-normalised, folded to ASCII
    (``Müller`` → ``Muller``; other letters become ``_``), reduced to ``[A-Za-z0-9._-]``, with no
    leading dot, no ``..``, no Windows device names, and capped at ``max_len`` characters with the
    extension kept.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidFileNameError("The file has no name. Please give it a name such as 'slide.svs'.")
    norm = unicodedata.normalize("NFKC", name).strip()
    bad = [c for c in norm if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co")]
    if bad:
        raise InvalidFileNameError(
            f"The file name {name!r} contains invisible or control characters ({', '.join(repr(c) for c in bad[:3])}). "
            "Rename the file using ordinary letters and digits."
        )
    if "/" in norm or "\\" in norm or norm in (".", "..") or norm.startswith("~"):
        raise InvalidFileNameError(
            f"{name!r} is a path, not a file name (it contains '/', '\\' or '..'). Upload the file itself, "
            "with a plain name such as 'slide.svs'."
        )
    lower = norm.lower()
    ext = next((e for e in _MULTI_EXT if lower.endswith(e)), None)
    if ext is None:
        stem, dot, ext_raw = norm.rpartition(".")
        ext, stem = (("." + ext_raw) if dot and stem else ""), (stem if dot and stem else norm)
    else:
        stem = norm[: -len(ext)]

    def fold(text: str) -> str:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
        text = re.sub(r"[^A-Za-z0-9._-]+", "_", text.encode("ascii", "replace").decode("ascii").replace("?", "_"))
        text = re.sub(r"\.{2,}", ".", re.sub(r"_{2,}", "_", text))
        return text

    ext = re.sub(r"[^a-z0-9.]", "", fold(ext).lower())[:16]
    stem = fold(stem).strip("._- ") or "file"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    stem = stem[: max(1, max_len - len(ext))].rstrip(".")
    return stem + ext


def os_error_message(exc: OSError, doing: str) -> str:
    """A plain-language message for a failed file operation (disk full said as such)."""
    if exc.errno == errno.ENOSPC:
        return f"Could not {doing}: the disk is full. Free some space and try again."
    return f"Could not {doing} ({exc.strerror or exc})."


def unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def copy_verified(src: Path, target: Path, digest: str, display: str, *,
                  changed_error: type[GhistError] = StoreError) -> None:
    """Copy ``src`` to ``target`` atomically, hashing while copying; refuse a file that changed.

    ``digest`` is the sha256 the caller recorded before; a different hash of the bytes actually copied
    raises ``changed_error`` and leaves no ``target``. Disk errors raise :class:`StoreError`.
    """
    try:
        with atomic_path(target) as tmp:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                h = hashlib.sha256()
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    h.update(chunk)
                    fout.write(chunk)
            if h.hexdigest() != digest:
                raise changed_error(f"'{display}' changed while it was being copied; please upload it again.")
    except OSError as exc:
        raise StoreError(os_error_message(exc, f"copy '{display}' into the project")) from exc
