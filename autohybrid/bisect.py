"""One bisection: the largest value in an interval that a monotone test accepts.

Every "largest level that fits the budget" in the package (uniform allocations, the repair of a
trial to the budget, the rank for a parameter count, a local move's level) is this search.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["largest", "STEPS"]

STEPS = 30  # 2^-30 of the interval: below any level or rank the cost can tell apart


def largest(fits: Callable[[float], bool], lo: float, hi: float, steps: int = STEPS,
            log: bool = False, closed: bool = True) -> float:
    """The largest ``x`` in [lo, hi] with ``fits(x)``, for ``fits`` true up to some point and
    false after it; ``hi`` itself when it fits (``closed=False``: ``hi`` is never returned),
    ``lo`` when nothing above it does (the caller checks ``fits(lo)``). ``log``: bisect in
    log x (``lo`` > 0)."""
    if closed and fits(hi):
        return hi
    a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
    for _ in range(steps):
        mid = (a + b) / 2
        if fits(math.exp(mid) if log else mid):
            a = mid
        else:
            b = mid
    return math.exp(a) if log else a
