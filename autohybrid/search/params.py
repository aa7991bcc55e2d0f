"""The searched parameters and how a trial's parameters become an allocation.

Each group of layers (one layer, or a cluster of layers of one kind with similar sensitivity
profiles) gets three categorical parameters: a method, a keep level (fraction of the layer's
weight parameters) and, for low-rank + sparse, the share of that level given to the sparse
residual. Decoding is pure: parameters -> LayerSpec per layer, scaled down to the budget when
over it (the repair keeps every trial useful instead of wasting it outside the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from autohybrid.bisect import largest
from autohybrid.cost import allocation_cost, layer_cost
from autohybrid.inventory import Inventory, LayerInfo
from autohybrid.methods import HYBRID, METHODS, spec_at
from autohybrid.search_space import SearchSpace
from autohybrid.spec import LayerSpec

__all__ = ["Group", "ParamSpace", "LEVELS", "SHARES"]

LEVELS = (0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03)
SHARES = (0.25, 0.5, 0.75)
MIN_SCALE = 1e-3


@dataclass(frozen=True)
class Group:
    name: str
    kind: str
    layers: tuple[str, ...]
    methods: tuple[str, ...]


def group_layers(
    space: SearchSpace, inv: Inventory, table: pd.DataFrame | None, max_groups: int, seed: int
) -> list[Group]:
    """One group per layer when there are few; else k-means (scikit-learn) on each layer's
    sensitivity profile, within each layer kind, so methods stay meaningful per group."""
    layers = space.compressible(inv)
    methods = {la.name: _methods(space, la) for la in layers}
    if len(layers) <= max_groups or table is None or table.empty:
        return [Group(f"g{i:03d}", la.kind, (la.name,), methods[la.name])
                for i, la in enumerate(layers)]
    from sklearn.cluster import KMeans

    groups: list[Group] = []
    by_kind: dict[tuple, list[LayerInfo]] = {}
    for la in layers:
        by_kind.setdefault((la.kind, methods[la.name]), []).append(la)
    share = max_groups / len(layers)
    for (kind, meths), members in by_kind.items():
        k = max(1, min(len(members), round(share * len(members))))
        feats = _profiles(table, members, meths)
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(feats) \
            if k > 1 else np.zeros(len(members), dtype=int)
        for c in range(k):
            names = tuple(la.name for la, lab in zip(members, labels) if lab == c)
            if names:
                groups.append(Group("", kind, names, meths))
    groups.sort(key=lambda g: [la.name for la in layers].index(g.layers[0]))
    return [Group(f"g{i:03d}", g.kind, g.layers, g.methods) for i, g in enumerate(groups)]


def _methods(space: SearchSpace, layer: LayerInfo) -> tuple[str, ...]:
    names = {s.method for s in space.candidates(layer)}
    return ("dense", *[m for m in space.methods.get(layer.kind, []) if m in names])


PROFILE_AT = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # kept fractions of a layer's parameters


def _profiles(table: pd.DataFrame, members: list[LayerInfo], methods) -> np.ndarray:
    """One row of features per layer: the log KL of its candidates (table order) and its
    size. Where the layers' candidate lists differ in length (a rank or level that is the
    same spec as another for a small layer appears once), each method's log KL is
    interpolated at ``PROFILE_AT`` instead, so every row has the same features."""
    raw = [_profile(table, la) for la in members]
    if len({len(r) for r in raw}) == 1:
        return np.array(raw)
    return np.array([_profile_at(table, la, methods) for la in members])


def _profile(table: pd.DataFrame, layer: LayerInfo) -> np.ndarray:
    """log KL of the layer's candidates (table order), plus its size."""
    rows = table[table.layer == layer.name]
    return np.concatenate([np.log10(rows.kl.to_numpy(float) + 1e-6),
                           [np.log10(layer.params + 1)]])


def _profile_at(table: pd.DataFrame, layer: LayerInfo, methods) -> np.ndarray:
    """Per method of ``methods`` (dense aside), log KL at the kept fractions ``PROFILE_AT``,
    linear in the fraction between the table's candidates (flat beyond them); a method the
    table has no candidate of for this layer counts as its worst log KL; then the size."""
    rows = table[table.layer == layer.name]
    log_kl = np.log10(rows.kl.to_numpy(float) + 1e-6)
    worst = log_kl.max() if len(log_kl) else 0.0
    feats = []
    for m in methods:
        if m == "dense":
            continue
        mine = (rows.method == m).to_numpy()
        if not mine.any():
            feats += [worst] * len(PROFILE_AT)
            continue
        keep = rows.params.to_numpy(float)[mine] / max(layer.params, 1)
        order = np.argsort(keep)
        feats += list(np.interp(PROFILE_AT, keep[order], log_kl[mine][order]))
    return np.array([*feats, np.log10(layer.params + 1)])


class ParamSpace:
    """Suggests a trial's parameters and decodes them into per-layer specs."""

    def __init__(self, space: SearchSpace, inv: Inventory, groups: list[Group], metric: str,
                 latency=None):
        self.space, self.inv, self.groups, self.metric = space, inv, groups, metric
        self.latency = latency  # the LatencyTable, for metric "latency"

    def suggest(self, trial) -> dict:
        params = {}
        for g in self.groups:
            m = trial.suggest_categorical(f"{g.name}.method", list(g.methods))
            params[f"{g.name}.method"] = m
            if m != "dense":
                params[f"{g.name}.level"] = trial.suggest_categorical(f"{g.name}.level", LEVELS)
            if m == HYBRID:
                params[f"{g.name}.share"] = trial.suggest_categorical(f"{g.name}.share", SHARES)
        return params

    def spec(self, layer: LayerInfo, method: str, level: float, share: float = 0.5) -> LayerSpec:
        """The spec of ``method`` keeping about ``level`` of the layer's weight parameters
        (``methods.spec_at``, with this space's factorization, rank multiple and refine)."""
        return spec_at(layer, method, level, share,
                       factorization=self.space.factorizations.get(layer.kind),
                       rank_multiple=self.space.rank_multiple, refine=self.space.refine)

    def decode(self, params: dict, scale: float = 1.0) -> dict[str, LayerSpec]:
        layers = {}
        for g in self.groups:
            m = params[f"{g.name}.method"]
            level = min(1.0, params.get(f"{g.name}.level", 1.0) * scale)
            share = params.get(f"{g.name}.share", 0.5)
            for name in g.layers:
                spec = self.spec(self.inv[name], m, level, share)
                if spec.method != "dense":
                    layers[name] = spec
        return layers

    def cost(self, layers: dict[str, LayerSpec]):
        """The allocation's ``ModelCost`` (with predicted latency when there is a table)."""
        return allocation_cost(self.inv, layers, self.latency)

    def layer_cost(self, layer: LayerInfo, spec: LayerSpec) -> float:
        """One layer's cost in the search metric (params, MACs or predicted seconds)."""
        return getattr(layer_cost(layer, spec, self.latency), self.metric)

    def fraction(self, layers: dict[str, LayerSpec]) -> float:
        return self.cost(layers).fraction(self.metric)

    def repair(self, params: dict, budget: float) -> tuple[dict[str, LayerSpec], float]:
        """Decode ``params`` with every level multiplied by one factor, the largest that fits
        the budget (binary search; levels are capped at 1). The parameters thus say how the
        budget is shared between groups, the budget says how much there is. Returns
        (layers, scale); scale 0 means even the smallest levels do not fit."""
        if self.fraction(self.decode(params, MIN_SCALE)) > budget:
            return self.decode(params, MIN_SCALE), 0.0
        levels = [v for k, v in params.items() if k.endswith(".level")]
        top = 1.0 / min(levels) if levels else 1.0
        scale = largest(lambda x: self.fraction(self.decode(params, x)) <= budget, MIN_SCALE,
                        top, steps=24)
        return self.decode(params, scale), scale

    def params_for(self, layers: dict[str, LayerSpec]) -> dict:
        """The nearest parameters for an explicit allocation (used to enqueue warm starts)."""
        params = {}
        for g in self.groups:
            specs = [layers.get(n, LayerSpec()) for n in g.layers]
            kept = [_kept(self.inv[n], s) for n, s in zip(g.layers, specs)]
            method = _majority([_family(s, g) for s in specs])
            params[f"{g.name}.method"] = method
            if method != "dense":
                level = float(np.median(kept))
                params[f"{g.name}.level"] = min(LEVELS, key=lambda v: abs(np.log(v / level)))
            if method == HYBRID:
                params[f"{g.name}.share"] = 0.5
        return params


def _kept(layer: LayerInfo, spec: LayerSpec) -> float:
    if spec.method == "dense":
        return 1.0
    c = METHODS[spec.method].params(layer, spec) - (layer.out_chs if layer.bias else 0)
    return max(c, 1) / layer.weight_numel


def _family(spec: LayerSpec, g: Group) -> str:
    m = spec.method
    if m in g.methods:
        return m
    if METHODS.get(m) is not None and METHODS[m].lowrank:
        return next((x for x in g.methods if METHODS[x].lowrank), "sparse")
    return "sparse" if "sparse" in g.methods else "dense"


def _majority(values: list[str]) -> str:
    return max(dict.fromkeys(values), key=values.count)
