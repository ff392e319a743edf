"""One run per slide at a time: an operating-system lock file per slide under the project.

``locks/slide_<id>.lock`` is held (``flock``, exclusive) by the process that runs the slide:
``ghist predict``, a ``ghist cohort`` task or an app worker. The kernel releases it when that
process ends in any way (SIGKILL and power cut included), so a lock is never left behind and
never needs cleaning up; a second process either waits for it or is told, with
:class:`~ghist_core.errors.SlideBusyError`, which process holds it. The file only holds the
holder's pid and host (for that message), never a name or patient id.

The same kind of lock caps how many app workers compute at once on a machine
(:func:`take_worker_slot`): each worker uses every core and about a gigabyte, and two torch
processes sharing two cores each run many times slower than one after the other.

POSIX only (``fcntl``); a project on a network file system needs working ``flock`` there.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from ghist_core.errors import SlideBusyError, StoreError

__all__ = ["LOCK_DIR", "SlideLock", "WorkerSlot", "lock_path", "lock_slide", "lock_holder", "max_workers",
           "worker_slots_dir", "take_worker_slot"]

LOCK_DIR = "locks"


def lock_path(project_folder: str | os.PathLike, slide_id: int) -> Path:
    return Path(project_folder) / LOCK_DIR / f"slide_{int(slide_id)}.lock"


class HeldLock:
    """A held lock file; :meth:`release` (or leaving the ``with`` block, or the process ending) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - a forgotten lock is still freed
        self.release()


class SlideLock(HeldLock):
    """A held slide lock."""

    def __init__(self, path: Path, fd: int, slide_id: int) -> None:
        super().__init__(path, fd)
        self.slide_id = int(slide_id)


class WorkerSlot(HeldLock):
    """A held worker slot (``slot``: its number, from 0)."""

    def __init__(self, path: Path, fd: int, slot: int) -> None:
        super().__init__(path, fd)
        self.slot = int(slot)


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


# --------------------------------------------------------------------------------------------
# worker slots: how many app workers compute at once on this machine
# --------------------------------------------------------------------------------------------
MAX_WORKERS_ENV = "GHIST_MAX_WORKERS"
WORKER_SLOTS_ENV = "GHIST_WORKER_SLOTS_DIR"


def max_workers() -> int:
    """App workers that may compute at once (``GHIST_MAX_WORKERS``, default 1): a worker's network
    already uses every core (and a GPU, where there is one), so more at once only adds memory and
    contention; raise it on a machine with cores or GPUs to spare."""
    raw = os.environ.get(MAX_WORKERS_ENV, "").strip()
    try:
        n = int(raw) if raw else 1
    except ValueError:
        raise StoreError(f"{MAX_WORKERS_ENV}={raw!r} is not a whole number of workers (1 or more).") from None
    if n < 1:
        raise StoreError(f"{MAX_WORKERS_ENV}={raw!r}: at least one worker must be allowed.")
    return n


def worker_slots_dir() -> Path:
    """Where the slot lock files live: one folder per user and machine (``GHIST_WORKER_SLOTS_DIR``
    overrides it), so every project's workers share the cap."""
    override = os.environ.get(WORKER_SLOTS_ENV, "").strip()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(override) if override else Path(tempfile.gettempdir()) / f"ghist-worker-slots-{uid}"


def take_worker_slot(*, poll_s: float = 0.5, stop: Callable[[], bool] | None = None,
                     on_wait: Callable[[], None] | None = None) -> WorkerSlot | None:
    """Wait for one of :func:`max_workers` slots and hold it; None when ``stop()`` ended the wait.

    ``on_wait()`` is called once if every slot is taken. A slot is freed when its holder ends in any
    way (the kernel drops the ``flock``), so a crashed worker never blocks the queue.
    """
    folder = worker_slots_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"Could not create the worker-slot folder {folder} ({exc.strerror or exc}); set "
                         f"{WORKER_SLOTS_ENV} to a writable folder.") from exc
    told = False
    while True:
        for slot in range(max_workers()):
            path = folder / f"slot_{slot}.lock"
            try:
                fd = _try(path)
            except OSError as exc:
                raise StoreError(f"Could not take a worker slot in {folder} ({exc.strerror or exc}).") from exc
            if fd is not None:
                return WorkerSlot(path, fd, slot)
        if stop is not None and stop():
            return None
        if not told and on_wait is not None:
            on_wait()
            told = True
        time.sleep(poll_s)
