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

from dataclasses import dataclass

from autohybrid.bisect import largest
from autohybrid.inventory import LayerInfo
from autohybrid.methods import HYBRID, label
from autohybrid.search.params import LEVELS, MIN_SCALE, SHARES, ParamSpace
from autohybrid.search.surrogate import Surrogate
from autohybrid.spec import LayerSpec

__all__ = ["Move", "moves", "apply_move"]

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
        return f"{self.layer} -> {label(self.spec)}"


def _largest_fitting(ps: ParamSpace, layer: LayerInfo, method: str, share: float,
                     allowed: float) -> LayerSpec | None:
    """``ps.spec(layer, method, level, share)`` at the largest level whose cost in the search
    metric is at most ``allowed`` (binary search in log level); None when none fits."""
    def spec(level: float) -> LayerSpec:
        return ps.spec(layer, method, level, share)

    def fits(level: float) -> bool:
        return ps.layer_cost(layer, spec(level)) <= allowed

    if not fits(LOWEST):
        return None
    return spec(largest(fits, LOWEST, 1.0, log=True, closed=False))  # below 1: dense


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
    total = ps.cost(layers)
    slack = budget * getattr(total, f"dense_{ps.metric}") - getattr(total, ps.metric)
    out: list[Move] = []
    for g in ps.groups:
        for name in g.layers:
            layer = ps.inv[name]
            old = layers.get(name, LayerSpec())
            allowed = ps.layer_cost(layer, old) + max(slack, 0.0)
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
