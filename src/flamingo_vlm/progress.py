"""Progress bars that stay readable where stderr is a log file, not a terminal.

tqdm redraws its bar in place with a carriage return up to ten times a second. Written to a file (a
job's log under nohup, Slurm or torchrun), each redraw stays, joined by ``\\r`` on one ever longer
line. There a bar is redrawn once a minute (the first and last states as always), in ASCII.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 60.0


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, redrawn at most once a minute where its output is not a
    terminal (the caller's ``mininterval`` holds on a terminal; its ``ascii`` everywhere)."""
    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs["mininterval"] = max(kwargs.get("mininterval") or 0.0, LOG_INTERVAL_S)
        kwargs["maxinterval"] = max(kwargs.get("maxinterval") or 0.0, LOG_INTERVAL_S)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)
