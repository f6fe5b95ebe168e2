"""An exclusive hold on an output directory, so two runs cannot write the same files at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DirectoryBusy", "exclusive_directory"]


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
