"""File checksums: one streamed sha256 used for slides, results and weights alike."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 20  # 1 MiB: weights and slides can be large


def sha256_file(path: str | os.PathLike, chunk_bytes: int = _CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (1 MiB by default: constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()
