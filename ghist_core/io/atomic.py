"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator


_TEMP_SUFFIX = ".part"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    On any error the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(target, text.encode(encoding))


def atomic_write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` (e.g. ``adata.write_h5ad``) and publish its file atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def remove_temporaries(folder: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporaries :func:`atomic_path` left in ``folder`` when its process was killed.

    Only files not modified for ``min_age_s`` go (a writer still running rewrites its file),
    so with 0 the caller must know no writer is alive. Returns what was deleted.
    """
    limit = time.time() - min_age_s
    gone = []
    for p in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        try:
            if p.stat().st_mtime <= limit:
                p.unlink()
                gone.append(p)
        except FileNotFoundError:  # another process removed it first
            pass
    return gone
