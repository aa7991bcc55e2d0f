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
    cls = tqdm
    if progress is not False and not interactive():
        cls = _LogBar
        if total:
            kwargs.update(miniters=max(1, int(total * LOG_EVERY)), mininterval=0)
        else:
            kwargs.update(mininterval=LOG_SECONDS)
    return cls(iterable, total=total, desc=desc, disable=progress is False, **kwargs)


class _LogBar(tqdm):
    """A bar in a log: a postfix update waits for the next throttled line instead of
    writing one of its own (tqdm redraws on every ``set_postfix`` by default)."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=False):
        super().set_postfix_str(s, refresh=False)
