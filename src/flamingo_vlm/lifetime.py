"""A worker that ``torchrun`` started dies with it.

``torchrun`` starts every worker in a session of its own (``start_new_session``), so a ``kill -9``
of ``torchrun`` (or its own crash) reached none of them: they trained on, orphaned, holding the
output directory and the accelerators. On Linux a worker asks the kernel for SIGKILL when its parent
dies (``prctl(PR_SET_PDEATHSIG)``), as the first thing the command does; ``torchrun`` ending
normally stops its workers first, so only a launcher that died without doing so triggers it. A
launcher already gone by then (the worker was re-parented) ends the worker at once.

Standard library only: this runs before torch is imported.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["die_with_launcher", "launched_by_torchrun"]

PR_SET_PDEATHSIG = 1


def launched_by_torchrun(environ=None) -> bool:
    """Whether this process is a worker that ``torchrun`` (torch.distributed.elastic) started."""
    return "TORCHELASTIC_RUN_ID" in (environ if environ is not None else os.environ)


def die_with_launcher(environ=None, *, sig: int = signal.SIGKILL) -> bool:
    """Under ``torchrun`` on Linux: have this process receive ``sig`` when its parent (the
    launcher) dies. Returns whether it was set. A launcher that is already gone ends this process."""
    if sys.platform != "linux" or not launched_by_torchrun(environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the request: nobody will stop this worker
        os.kill(os.getpid(), sig)
    return True
