"""Method registry: name -> method object. Importing this module registers the built-ins."""

from autohybrid.methods import cp, dense, lowrank_sparse, sparse, svd, tt, tucker2  # noqa: F401
from autohybrid.methods.base import (
    METHODS,
    LowRankMethod,
    Method,
    get_method,
    register,
    rel_error,
)

__all__ = [
    "METHODS",
    "Method",
    "LowRankMethod",
    "get_method",
    "register",
    "rel_error",
    "applicable_methods",
    "default_factorization",
    "family",
    "LOWRANK",
    "HYBRID",
]

HYBRID = "lowrank+sparse"
LOWRANK = "lowrank"  # pseudo-method for allocation builders: the default factorization per kind

# Preferred low-rank factorization per layer kind, the first that applies wins.
_PREFERRED = {"linear": ("svd", "tt"), "pointwise": ("svd",), "conv": ("tucker2", "cp")}


def applicable_methods(layer) -> tuple[str, ...]:
    """Registered methods that apply to ``layer`` (none for excluded / unsupported layers)."""
    if not layer.supported:
        return ()
    return tuple(name for name, m in METHODS.items() if m.applies_to(layer))


def family(method: str) -> str:
    """``sparse``, ``lowrank+sparse``, ``lowrank`` (any factorization), or the name itself."""
    if method in (HYBRID, "sparse"):
        return method
    return LOWRANK if METHODS[method].lowrank else method


def default_factorization(layer) -> str | None:
    """The low-rank method used for ``layer`` when a builder says just 'low-rank'."""
    for name in _PREFERRED.get(layer.kind, ()):
        if name in METHODS and METHODS[name].applies_to(layer):
            return name
    return None
