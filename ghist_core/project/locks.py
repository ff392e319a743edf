"""One run per slide at a time: an operating-system lock file per slide under the project.

``locks/slide_<id>.lock`` is held (``flock``, exclusive) by the process that runs the slide:
``ghist predict``, a ``ghist cohort`` task or an app worker. The kernel releases it when that
process ends in any way (SIGKILL and power cut included), so a lock is never left behind and
never needs cleaning up; a second process either waits for it or is told, with
:class:`~ghist_core.errors.SlideBusyError`, which process holds it. The file only holds the
holder's pid and host (for that message), never a name or patient id.

POSIX only (``fcntl``); a project on a network file system needs working ``flock`` there.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

from ghist_core.errors import SlideBusyError, StoreError

__all__ = ["LOCK_DIR", "SlideLock", "lock_path", "lock_slide", "lock_holder"]

LOCK_DIR = "locks"


def lock_path(project_folder: str | os.PathLike, slide_id: int) -> Path:
    return Path(project_folder) / LOCK_DIR / f"slide_{int(slide_id)}.lock"


class SlideLock:
    """A held slide lock; :meth:`release` (or leaving the ``with`` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int, slide_id: int) -> None:
        self.path, self._fd, self.slide_id = path, fd, int(slide_id)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "SlideLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - a forgotten lock is still freed
        self.release()


def _try(path: Path) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by child processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode("ascii", "replace"))
    return fd


def lock_holder(project_folder: str | os.PathLike, slide_id: int) -> int | None:
    """The pid written by the process that holds (or last held) the slide's lock, if any."""
    try:
        first = lock_path(project_folder, slide_id).read_text(encoding="ascii", errors="replace").split()
        return int(first[0]) if first else None
    except (OSError, ValueError):
        return None


def lock_slide(project_folder: str | os.PathLike, slide_id: int, *, wait: bool = False, poll_s: float = 0.2,
               stop: Callable[[], bool] | None = None, on_wait: Callable[[int | None], None] | None = None) -> SlideLock:
    """Take the slide's lock. Held elsewhere: ``SlideBusyError`` at once, or with ``wait`` poll until free.

    While waiting, ``on_wait(holder_pid)`` is called once and ``stop()`` between polls; when it
    returns True the wait ends with ``SlideBusyError``.
    """
    path = lock_path(project_folder, slide_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"Could not create the project's lock folder ({exc.strerror or exc}). "
                         "Check that the project folder is writable.") from exc
    told = False
    while True:
        try:
            fd = _try(path)
        except OSError as exc:
            raise StoreError(f"Could not lock slide {slide_id} ({exc.strerror or exc}). "
                             "Check that the project folder is writable.") from exc
        if fd is not None:
            return SlideLock(path, fd, slide_id)
        holder = lock_holder(project_folder, slide_id)
        if not wait or (stop is not None and stop()):
            who = f" (process {holder})" if holder else ""
            raise SlideBusyError(f"Slide {slide_id} is being analysed by another process{who}; only one run of a "
                                 "slide runs at a time. Wait for it to finish: its run is recorded in the project.")
        if not told and on_wait is not None:
            on_wait(holder)
            told = True
        time.sleep(poll_s)
