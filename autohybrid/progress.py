"""What a long loop shows: a live bar on a terminal, a few lines in a log.

On a terminal every loop draws a tqdm bar and the search a rich progress display. Where
stderr is not a terminal (CI, ``nohup``, a cluster job's log file), a bar that redraws on
every step leaves a line per step, thousands per run; there a loop writes a line per
``LOG_EVERY`` of its length (or every ``LOG_SECONDS`` when the length is unknown), and the
search a line per trial.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console
from tqdm.auto import tqdm

__all__ = ["console", "bar", "interactive", "LOG_EVERY", "LOG_SECONDS"]

console = Console(stderr=True)
LOG_EVERY = 0.05  # of a loop's length, between two lines of a non-interactive log
LOG_SECONDS = 30.0


def interactive() -> bool:
    """Whether stderr is a terminal a bar can redraw in place."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        progress: bool | None = True, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable``; ``progress=False`` hides it. Off a terminal it is
    throttled to a line per few percent (``LOG_EVERY``)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if progress is not False and not interactive():
        if total:
            kwargs.update(miniters=max(1, int(total * LOG_EVERY)), mininterval=0)
        else:
            kwargs.update(mininterval=LOG_SECONDS)
    return tqdm(iterable, total=total, desc=desc, disable=progress is False, **kwargs)
