"""Method registry: name -> method object. Importing this module registers the built-ins."""

from autohybrid.methods import cp, dense, lowrank_sparse, sparse, svd, tt, tucker2  # noqa: F401
from autohybrid.methods.base import (
    MAX_SPARSITY,
    METHODS,
    LowRankMethod,
    Method,
    applicable_methods,
    get_method,
    register,
    rel_error,
    round_rank,
    unregister,
)

__all__ = [
    "METHODS",
    "Method",
    "LowRankMethod",
    "get_method",
    "register",
    "unregister",
    "rel_error",
    "round_rank",
    "MAX_SPARSITY",
    "spec_at",
    "label",
    "color",
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


def spec_at(layer, method: str, keep: float, share: float = 0.5, **options):
    """``method``'s spec keeping about ``keep`` of ``layer``'s weight parameters
    (``Method.spec_at``), the sparse one where ``method`` cannot express it for this layer
    (a factorization that does not apply); dense at ``keep >= 1``."""
    if method == "dense" or keep >= 1.0:
        return METHODS["dense"].spec_at(layer, keep)
    spec = get_method(method).spec_at(layer, keep, share, **options)
    return spec if spec is not None else METHODS["sparse"].spec_at(layer, keep)


def label(spec) -> str:
    """A few words for ``spec`` (``Method.label``)."""
    return get_method(spec.method).label(spec)


def color(method: str) -> str:
    """The plot colour of ``method`` (``Method.color``)."""
    return METHODS[method].color if method in METHODS else "#000000"


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
