"""An exclusive hold on an output directory, so two runs cannot write the same files at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DirectoryBusy", "exclusive_directory", "hold_for_job"]


class DirectoryBusy(RuntimeError):
    """Another process is writing to the same directory."""


@contextlib.contextmanager
def exclusive_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<path>/.lock`` for the duration, so two resumable runs (an evaluation, a training run)
    cannot write the same files at once. The lock is an OS file lock (``flock``), released when the
    holder exits or dies, so a crashed run leaves nothing to clean up. Raises :class:`DirectoryBusy`
    naming the holder's pid."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield path
        return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryBusy(f"{path} is in use by another run (pid {holder}); wait for it to finish, "
                                f"or write to a different output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


def hold_for_job(stack: contextlib.ExitStack, path: str | os.PathLike, *, is_main: bool,
                 broadcast: Callable[[object], object]) -> None:
    """Enter :func:`exclusive_directory` on ``stack`` for a job of one or more ranks: rank 0 holds
    the lock and every rank raises :class:`DirectoryBusy` alike (``broadcast`` sends rank 0's value
    to all), so no rank is left waiting in a collective."""
    busy = None
    if is_main:
        try:
            stack.enter_context(exclusive_directory(path))
        except DirectoryBusy as e:
            busy = str(e)
    busy = broadcast(busy)
    if busy:
        raise DirectoryBusy(busy)
