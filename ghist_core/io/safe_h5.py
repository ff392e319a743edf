"""HDF5 result files written so that a full disk is a plain error, never a crash.

Why: HDF5 (through h5py) does not recover from ENOSPC: the write raises ``OSError``, then the
library's own clean-up at interpreter exit dereferences freed buffers and the process dies
with SIGSEGV (measured: exit 139 with 6–10 MB free on an 8 MB tmpfs), after having left a
half-written file. So every ``.h5ad``/grid write

1. checks the free space first: the uncompressed size of the data (an upper bound of the
   file) plus :data:`FREE_SPACE_MARGIN_BYTES` must be free, else :class:`DiskFullError`
   before a byte is written;
2. writes to a temporary file beside the target (``io.atomic.atomic_path``) in a forked
   child process, so whatever HDF5 does on a failure dies with the child;
3. publishes the file with an atomic rename only when the child exited cleanly; otherwise
   the temporary is removed and the failure is a :class:`DiskFullError` (no space) or
   :class:`StoreError` (anything else), with the target untouched.

Memory: the child shares the parent's pages (copy-on-write), so a write adds about the
encoder's buffers, not a second copy of the data. Where ``os.fork`` does not exist
(Windows) the write runs in-process, after the same free-space check.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ghist_core.errors import DiskFullError, StoreError
from ghist_core.io.atomic import atomic_path

__all__ = ["FREE_SPACE_MARGIN_BYTES", "check_free_space", "estimate_h5ad_bytes", "write_h5_isolated"]

#: Free space kept in reserve beyond the estimated file size (the database, logs and the
#: filesystem itself need room; HDF5 metadata and chunk overheads go beyond the raw data).
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def check_free_space(folder: str | os.PathLike, needed_bytes: int, *, what: str = "the results",
                     margin_bytes: int = FREE_SPACE_MARGIN_BYTES) -> None:
    """:class:`DiskFullError` unless ``needed_bytes`` + ``margin_bytes`` are free where ``folder`` lives."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < int(needed_bytes) + int(margin_bytes):
        raise DiskFullError(
            f"Not enough free disk space to write {what}: about {_mb(needed_bytes)} plus a "
            f"{_mb(margin_bytes)} reserve are needed, {_mb(free)} are free in {folder}. "
            "Free some space (or move the project to a larger disk) and run it again.")


def estimate_h5ad_bytes(adata) -> int:
    """Upper bound of an ``.h5ad``'s size: its arrays uncompressed, plus 1 MB of metadata."""
    total = 1 << 20

    def add(x) -> None:
        nonlocal total
        if hasattr(x, "data") and hasattr(x, "indices"):  # scipy sparse
            total += x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
        elif isinstance(x, np.ndarray):
            total += x.nbytes if x.dtype != object else 64 * x.size
        elif hasattr(x, "memory_usage"):  # DataFrame
            total += int(x.memory_usage(index=True, deep=True).sum())
        elif isinstance(x, dict):
            for v in x.values():
                add(v)

    add(adata.X)
    for m in (adata.obs, adata.var):
        add(m)
    for store in (adata.obsm, adata.varm, adata.layers, adata.obsp):
        for v in store.values():
            add(np.asarray(v) if not hasattr(v, "indices") else v)
    add(dict(adata.uns))
    return int(total)


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def write_h5_isolated(target: str | os.PathLike, writer: Callable[[Path], None], *, estimated_bytes: int,
                      what: str = "the results", margin_bytes: int = FREE_SPACE_MARGIN_BYTES) -> Path:
    """Check free space, run ``writer(tmp_path)`` in a child process, publish atomically.

    Raises :class:`DiskFullError` (before writing, or when the disk filled during the write)
    or :class:`StoreError` (the writer failed otherwise); then nothing is left at ``target``
    nor beside it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(target.parent, estimated_bytes, what=what, margin_bytes=margin_bytes)
    try:
        with atomic_path(target) as tmp:
            _run_writer(tmp, writer, what)
    except (DiskFullError, StoreError):
        _remove_nested_temporaries(target)
        raise
    except OSError as exc:  # fsync / rename on a full disk
        _remove_nested_temporaries(target)
        if exc.errno in _NO_SPACE:
            raise DiskFullError(f"The disk filled up while writing {what} ({exc.strerror}). Free some space "
                                "and run it again.") from None
        raise StoreError(f"Could not write {what} ({exc.strerror or exc}). Check the folder's permissions.") from None
    return target


def _remove_nested_temporaries(target: Path) -> None:
    """Temporaries a writer that itself writes atomically (``write_grid``) left beside ours."""
    for p in target.parent.glob(f".{target.name}.*"):
        try:
            p.unlink()
        except OSError:
            pass
    for p in target.parent.glob(f"..{target.name}.*"):
        try:
            p.unlink()
        except OSError:
            pass


def _at_file_size_limit(tmp: Path) -> bool:
    """Whether the file reached the process's RLIMIT_FSIZE (writes past it fail with EFBIG)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return soft != resource.RLIM_INFINITY and tmp.stat().st_size >= soft - (1 << 20)
    except (ImportError, OSError, ValueError):
        return False


def _run_writer(tmp: Path, writer: Callable[[Path], None], what: str) -> None:
    if not hasattr(os, "fork"):  # Windows: same checks, in-process
        try:
            writer(tmp)
        except OSError as exc:
            if exc.errno in _NO_SPACE or "No space left" in str(exc):
                raise DiskFullError(f"The disk filled up while writing {what}. Free some space and run it again.") from None
            raise
        return
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: write, report, leave without running any clean-up (HDF5's may crash)
        os.close(r)
        code, msg = 0, b""
        try:
            writer(tmp)
        except OSError as exc:
            full = exc.errno in _NO_SPACE or "No space left" in str(exc) or "errno = 28" in str(exc)
            code, msg = (28 if full else 1), f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:2000]
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
            code, msg = 1, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:2000]
        try:
            os.write(w, msg)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    message = b"".join(chunks).decode("utf-8", "replace").splitlines()[0][:300] if chunks else ""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return
    free = _free_bytes(tmp.parent)
    if (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 28) or 0 <= free < FREE_SPACE_MARGIN_BYTES \
            or _at_file_size_limit(tmp):
        where = ("this process's file-size limit (ulimit -f) was reached" if _at_file_size_limit(tmp)
                 else f"{_mb(max(free, 0))} free now")
        raise DiskFullError(
            f"The disk filled up while writing {what} ({where}); nothing was kept. "
            "Free some space and run it again.")
    how = (f"the writer process was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else message or f"the writer process exited with status {os.WEXITSTATUS(status)}")
    raise StoreError(f"Could not write {what}: {how}. Nothing was kept; check the disk and run it again.")
