"""Progress bars that suit where the output goes.

On a terminal a bar redraws in place as usual. Written to a log, CI or ``nohup`` (stderr not a
terminal), every redraw would be a line of its own, so the bar then prints at most once every
``LOG_INTERVAL`` seconds, and once at the end.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


def progress(*args, **kwargs) -> tqdm:
    """``tqdm(*args, **kwargs)``, quiet between ``LOG_INTERVAL`` seconds when stderr is not a terminal."""
    if not _is_terminal(kwargs.get("file") or sys.stderr):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL * 4)
    return tqdm(*args, **kwargs)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
