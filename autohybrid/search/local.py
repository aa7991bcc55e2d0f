"""Local search: one-layer, equal-cost moves around the best trial found so far.

The sampled trials of a short study are rarely better than its warm starts (the benchmarks in
``benchmarks/RESULTS.md``: on the CIFAR ResNets and MobileNetV3 every chosen trial was a warm
start). What they miss are small moves around a good allocation: give one layer another
method (sparse -> low-rank + sparse, svd -> sparse, another sparse share) at the largest level
the budget still allows, leave the rest as it is. ``moves`` lists those moves, ranked by the
surrogate's first-order prediction of the change in quality; the study evaluates them one at
a time as ordinary trials and keeps whatever measures best.

Pure functions of the parameter space, an allocation and the surrogate: no model, no study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autohybrid.cost import allocation_cost, layer_cost
from autohybrid.inventory import LayerInfo
from autohybrid.methods import HYBRID
from autohybrid.search.params import LEVELS, MIN_SCALE, SHARES, ParamSpace
from autohybrid.search.surrogate import Surrogate
from autohybrid.spec import LayerSpec

__all__ = ["Move", "moves", "apply_move", "describe"]

LOWEST = LEVELS[-1] * MIN_SCALE


@dataclass(frozen=True)
class Move:
    """Replace ``layer``'s spec by ``spec``; ``predicted`` is the surrogate's change in
    quality (negative: predicted better)."""

    layer: str
    spec: LayerSpec
    predicted: float

    @property
    def shape(self) -> str:
        """The layer, method and ranks, without the sparsity the budget's slack decides."""
        method, factorization, rank = _shape(self.spec)
        return f"{self.layer}:{method}:{factorization}:{list(rank)}"

    @property
    def label(self) -> str:
        return f"{self.layer} -> {describe(self.spec)}"


def describe(spec: LayerSpec) -> str:
    """A short human-readable form: ``sparse 0.83``, ``svd (12,)``, ``L+S tucker2 (4, 4) 0.95``."""
    if spec.method == "dense":
        return "dense"
    if spec.method == "sparse":
        return f"sparse {spec.sparsity:.3f}"
    if spec.method == HYBRID:
        return f"L+S {spec.factorization} {tuple(spec.rank)} {spec.sparsity:.3f}"
    return f"{spec.method} {tuple(spec.rank)}"


def _cost(layer: LayerInfo, spec: LayerSpec, metric: str) -> int:
    return getattr(layer_cost(layer, spec), metric)


def _largest_fitting(ps: ParamSpace, layer: LayerInfo, method: str, share: float,
                     allowed: float) -> LayerSpec | None:
    """``ps.spec(layer, method, level, share)`` at the largest level whose cost in the search
    metric is at most ``allowed`` (binary search in log level); None when none fits."""
    def spec(level: float) -> LayerSpec:
        return ps.spec(layer, method, level, share)

    if _cost(layer, spec(LOWEST), ps.metric) > allowed:
        return None
    lo, hi = math.log(LOWEST), 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if _cost(layer, spec(math.exp(mid)), ps.metric) <= allowed:
            lo = mid
        else:
            hi = mid
    return spec(math.exp(lo))


def _shape(spec: LayerSpec) -> tuple:
    """Method and ranks, without the sparsity. Two specs of one shape differ only in how
    much of the budget's slack the layer spends: a level change, not a method change."""
    return spec.method, spec.factorization, tuple(spec.rank)


def moves(ps: ParamSpace, layers: dict[str, LayerSpec], budget: float,
          surrogate: Surrogate) -> list[Move]:
    """Every one-layer change of method (or of the low-rank part of a low-rank + sparse
    layer) that keeps ``layers`` within ``budget``, ranked best predicted first. The new spec
    takes the layer's current cost plus the allocation's slack (so the move is cost-neutral
    up to what the budget leaves free)."""
    total = allocation_cost(ps.inv, layers)
    slack = budget * getattr(total, f"dense_{ps.metric}") - getattr(total, ps.metric)
    out: list[Move] = []
    for g in ps.groups:
        for name in g.layers:
            layer = ps.inv[name]
            old = layers.get(name, LayerSpec())
            allowed = _cost(layer, old, ps.metric) + max(slack, 0.0)
            before = surrogate.additive({name: old})
            seen = {old}
            for method in g.methods[1:]:
                for share in (SHARES if method == HYBRID else (0.5,)):
                    spec = _largest_fitting(ps, layer, method, share, allowed)
                    if spec is None or spec in seen or _shape(spec) == _shape(old):
                        continue
                    seen.add(spec)
                    out.append(Move(name, spec, surrogate.additive({name: spec}) - before))
    out.sort(key=lambda m: (m.predicted, m.layer, m.label))
    return out


def apply_move(layers: dict[str, LayerSpec], move: Move) -> dict[str, LayerSpec]:
    """``layers`` with ``move`` applied (dense specs are left out, as everywhere)."""
    out = {n: s for n, s in layers.items() if n != move.layer}
    if move.spec.method != "dense":
        out[move.layer] = move.spec
    return out
