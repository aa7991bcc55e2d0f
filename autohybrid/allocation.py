"""Allocation: the per-layer plan, and the versioned YAML file that carries it between stages.

Keyed by qualified module names, carrying the model's identity and the fingerprint of its
layer inventory, validated against that inventory before anything is built from it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from autohybrid.bisect import largest
from autohybrid.cost import ModelCost, allocation_cost, normalize_metric
from autohybrid.exceptions import AllocationError, BudgetError, MethodError
from autohybrid.inventory import Inventory, LayerInfo
from autohybrid.io import atomic_write_text
from autohybrid.methods import (
    HYBRID,
    LOWRANK,
    METHODS,
    default_factorization,
    get_method,
    spec_at,
)
from autohybrid.spec import LayerSpec

__all__ = ["Allocation", "LayerSpec", "ALLOCATION_VERSION"]

ALLOCATION_VERSION = 1
_TOP_KEYS = {"version", "model", "fingerprint", "budget", "metric", "layers", "meta"}


@dataclass
class Allocation:
    """Which method, rank(s) and sparsity each layer gets. Unlisted layers stay dense."""

    layers: dict[str, LayerSpec]
    fingerprint: str
    model: dict = field(default_factory=dict)
    budget: float | None = None
    metric: str | None = None
    meta: dict = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def for_inventory(cls, inv: Inventory, layers: Mapping[str, LayerSpec], **kw) -> Allocation:
        model = {
            "name": inv.model_name,
            "num_classes": inv.num_classes,
            "input_size": list(inv.input_size),
            "kwargs": dict(inv.model_kwargs),
        }
        kept = {n: s for n, s in layers.items() if s.method != "dense"}
        return cls(layers=kept, fingerprint=inv.fingerprint, model=model, **kw)

    @classmethod
    def uniform(
        cls,
        inv: Inventory,
        method: str = HYBRID,
        budget: float = 0.5,
        metric: str = "params",
        sparse_share: float = 0.5,
        factorization: str | None = None,
    ) -> Allocation:
        """One per-layer compression level for every compressible layer, at the budget.

        Each layer keeps the same fraction ``x`` of its dense parameters: ``sparse`` keeps a
        density ``x``; a low-rank method picks the largest rank(s) within ``x``;
        ``lowrank+sparse`` gives ``1 - sparse_share`` of it to the low-rank part and the rest (at
        least ``sparse_share`` of it, as ranks round down) to the sparse residual. ``x`` is
        binary-searched so the model lands at or just under ``budget`` of ``metric``.
        ``method`` may be ``lowrank`` (the preferred factorization per layer kind) or a
        low-rank method name, which falls back to the preferred one where it does not apply.
        """
        metric = normalize_metric(metric)
        check_budget(budget)
        if method not in (*METHODS, LOWRANK):
            get_method(method)
        build = _uniform_builder(method, sparse_share, factorization)
        layers, frac = search_level(inv, build, budget, metric)
        alloc = cls.for_inventory(inv, layers, budget=budget, metric=metric)
        alloc.meta["uniform"] = {"method": method, "level": round(frac, 6)}
        return alloc

    # -- file -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {"version": ALLOCATION_VERSION, "model": self.model}
        d["fingerprint"] = self.fingerprint
        if self.budget is not None:
            d["budget"] = float(self.budget)
        if self.metric is not None:
            d["metric"] = self.metric
        if self.meta:
            d["meta"] = self.meta
        d["layers"] = {name: spec.to_dict() for name, spec in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, d, source: str = "allocation") -> Allocation:
        if not isinstance(d, dict):
            raise AllocationError(
                f"{source}: expected a mapping at the top, got {type(d).__name__}"
            )
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise AllocationError(
                f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}"
            )
        version = d.get("version")
        if version != ALLOCATION_VERSION:
            raise AllocationError(
                f"{source}: allocation version {version!r} is not supported; "
                f"this autohybrid reads version {ALLOCATION_VERSION}"
            )
        for key in ("fingerprint", "layers"):
            if key not in d:
                raise AllocationError(f"{source}: missing key {key!r}")
        if not isinstance(d["layers"], dict):
            raise AllocationError(f"{source}: 'layers' must map layer names to specs")
        layers = {}
        for name, spec in (d["layers"] or {}).items():
            if not isinstance(spec, dict):
                raise AllocationError(f"{source}: layer {name!r}: spec must be a mapping")
            try:
                layers[str(name)] = LayerSpec.from_dict(spec)
            except (TypeError, ValueError) as e:
                raise AllocationError(f"{source}: layer {name!r}: {e}") from None
        metric = d.get("metric")
        try:
            metric = normalize_metric(metric) if metric is not None else None
        except Exception as e:
            raise AllocationError(f"{source}: {e}") from None
        return cls(
            layers=layers,
            fingerprint=str(d["fingerprint"]),
            model=dict(d.get("model") or {}),
            budget=d.get("budget"),
            metric=metric,
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the YAML file atomically (a reader never sees half a file)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        return atomic_write_text(Path(path), text)

    @classmethod
    def load(cls, path: str | Path, inventory: Inventory | None = None) -> Allocation:
        """Read and check an allocation file; with ``inventory``, validate it for that model."""
        path = Path(path)
        if not path.is_file():
            raise AllocationError(f"allocation file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where else ""
            raise AllocationError(
                f"{path}: malformed YAML{at}; fix the file or re-export it"
            ) from None
        alloc = cls.from_dict(data, source=str(path))
        if inventory is not None:
            alloc.validate(inventory)
        return alloc

    # -- checks and cost ------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, ...] | None:
        size = self.model.get("input_size")
        return tuple(size) if size else None

    def validate(self, inv: Inventory) -> None:
        """Raise ``AllocationError`` naming the first layer and problem that does not fit."""
        if self.fingerprint != inv.fingerprint:
            raise AllocationError(
                f"allocation is for model {self.model.get('name')!r} (layer fingerprint "
                f"{self.fingerprint}), not this {inv.model_name!r} (fingerprint "
                f"{inv.fingerprint}); create the allocation for this model"
            )
        by_name = inv.by_name
        for name, spec in self.layers.items():
            layer = by_name.get(name)
            if layer is None:
                close = difflib.get_close_matches(name, list(by_name), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise AllocationError(f"layer {name!r} is not in the model{hint}")
            if not layer.supported:
                raise AllocationError(
                    f"layer {name!r} is a conv subclass or uses dynamic padding and cannot "
                    "be replaced; leave it dense"
                )
            try:
                get_method(spec.method).check(layer, spec)
            except MethodError as e:
                raise AllocationError(f"layer {name!r}: {e}") from None

    def cost(self, inv: Inventory) -> ModelCost:
        return allocation_cost(inv, self.layers)


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget {budget!r} is not a number; give a fraction such as 0.2")
    if not 0.0 < budget <= 1.0:
        raise BudgetError(
            f"budget {budget} is outside (0, 1]; it is the fraction of the dense model to keep"
        )
    return float(budget)


Builder = Callable[[LayerInfo, float], LayerSpec]


def search_level(
    inv: Inventory,
    build: Builder,
    budget: float,
    metric: str,
    lo: float = 1e-3,
    layers: list[LayerInfo] | None = None,
    latency=None,
) -> tuple[dict[str, LayerSpec], float]:
    """Largest level ``x`` in [lo, 1] whose allocation costs <= ``budget``; error if none.

    ``layers`` defaults to the inventory's compressible layers; ``latency``: the
    ``LatencyTable`` the ``latency`` metric needs."""
    targets = inv.compressible if layers is None else layers

    def at(x: float) -> tuple[dict[str, LayerSpec], float]:
        layers = {layer.name: build(layer, x) for layer in targets}
        return layers, allocation_cost(inv, layers, latency).fraction(metric)

    layers, frac = at(lo)
    if frac > budget:
        raise BudgetError(
            f"budget {budget} of {metric} cannot be reached: the smallest reachable fraction "
            f"with this method is {frac:.3f}; raise the budget or allow more methods"
        )
    x = largest(lambda v: at(v)[1] <= budget, lo, 1.0)
    return at(x)[0], x


def rank_for_params(layer: LayerInfo, factorization: str, target: float) -> tuple[int, ...]:
    """The largest rank (every rank at one ratio) whose factors hold <= ``target`` params
    (``LowRankMethod.rank_for_params``)."""
    return METHODS[factorization].rank_for_params(layer, target)


def _uniform_builder(method: str, sparse_share: float, factorization: str | None) -> Builder:
    """``x`` -> the layer's spec at keep level ``x`` (``methods.spec_at``); a low-rank
    ``method`` (or ``lowrank``) takes the preferred factorization where it does not apply,
    and a layer no factorization applies to stays dense."""

    def lowrank_name(layer: LayerInfo) -> str | None:
        want = factorization or (method if method in METHODS and METHODS[method].lowrank else None)
        if want and METHODS[want].applies_to(layer):
            return want
        return default_factorization(layer)

    def build(layer: LayerInfo, x: float) -> LayerSpec:
        if method in ("dense", "sparse"):
            return spec_at(layer, method, x)
        f = lowrank_name(layer)
        if method == HYBRID:
            return spec_at(layer, HYBRID, x, sparse_share, factorization=f)
        return spec_at(layer, f, x) if f is not None else LayerSpec()

    return build
