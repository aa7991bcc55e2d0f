"""Cost math: params, MACs and storage bytes of layers and allocations, from numbers alone.

``layer_cost`` and ``allocation_cost`` are pure functions of ``LayerInfo`` / ``LayerSpec``.
``cost`` measures a built model (parameters stored, ``FlopCounterMode`` MACs with sparse
branches counted by nonzeros) so tests can prove the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autohybrid.exceptions import ConfigError
from autohybrid.inventory import Inventory, LayerInfo, model_input_size
from autohybrid.methods import get_method
from autohybrid.spec import LayerSpec

__all__ = ["Cost", "ModelCost", "layer_cost", "allocation_cost", "cost", "normalize_metric"]

METRICS = ("params", "macs", "latency")


def normalize_metric(metric: str) -> str:
    """``params``, ``macs`` (``flops`` is accepted for MACs, as users say it) or ``latency``
    (measured on the target runtime, ``autohybrid.latency``)."""
    m = {"flops": "macs", "flop": "macs", "mac": "macs", "param": "params",
         "time": "latency", "speed": "latency"}.get(metric, metric)
    if m not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use 'params', 'flops' (MACs) or "
                          "'latency' (measured on --runtime)")
    return m


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    storage_bytes: int = 0
    latency: float | None = None  # seconds on the latency table's runtime


def layer_cost(layer: LayerInfo, spec: LayerSpec, latency=None) -> Cost:
    """A layer's cost; with ``latency`` (a ``LatencyTable``) also its predicted seconds."""
    m = get_method(spec.method)
    seconds = latency.layer_seconds(layer, spec) if latency is not None else None
    return Cost(m.params(layer, spec), m.macs(layer, spec), m.storage_bytes(layer, spec),
                seconds)


@dataclass(frozen=True)
class ModelCost:
    """A whole model's cost beside the dense model's."""

    params: int
    macs: int
    storage_bytes: int
    dense_params: int
    dense_macs: int
    latency: float | None = None  # predicted seconds (with a latency table)
    dense_latency: float | None = None

    @property
    def params_fraction(self) -> float:
        return self.params / self.dense_params

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.dense_macs

    @property
    def latency_fraction(self) -> float | None:
        return None if self.latency is None else self.latency / self.dense_latency

    def fraction(self, metric: str) -> float:
        m = normalize_metric(metric)
        if m == "latency":
            if self.latency is None:
                raise ConfigError("a latency fraction needs the latency table: "
                                  "allocation_cost(inv, layers, latency=table)")
            return self.latency_fraction
        return self.params_fraction if m == "params" else self.macs_fraction

    def __str__(self) -> str:
        return (
            f"{self.params:,} params ({self.params_fraction:.3f} of dense), "
            f"{self.macs:,} MACs ({self.macs_fraction:.3f}), {self.storage_bytes / 1e6:.2f} MB"
        )


def allocation_cost(inv: Inventory, layers: Mapping[str, LayerSpec], latency=None
                    ) -> ModelCost:
    """Cost of the model with ``layers`` compressed; unlisted layers (and non-conv/linear
    parameters and ops) stay as in the dense model. With ``latency`` (a ``LatencyTable``
    of this model) also its predicted seconds."""
    params, macs = inv.total_params, inv.total_macs
    storage = 4 * inv.total_params
    by_name = inv.by_name
    for name, spec in layers.items():
        layer = by_name[name]
        c = layer_cost(layer, spec)
        params += c.params - layer.params
        macs += c.macs - layer.macs
        storage += c.storage_bytes - 4 * layer.params
    if latency is None:
        return ModelCost(params, macs, storage, inv.total_params, inv.total_macs)
    return ModelCost(params, macs, storage, inv.total_params, inv.total_macs,
                     latency.predict(inv, layers), latency.reference_s)


@dataclass(frozen=True)
class MeasuredCost:
    params: int
    macs: int


@torch.no_grad()
def cost(model: nn.Module, input_size: Sequence[int] | None = None) -> MeasuredCost:
    """Measure a built model: parameters actually stored, and MACs from ``FlopCounterMode``.

    A sparse branch executes densely on CPU, so its MACs are replaced by nonzeros x output
    positions, the count a sparse kernel would run.
    """
    from autohybrid.layers import _SparseBase

    input_size = tuple(input_size or model_input_size(model))
    dense_minus_sparse = 0
    hooks = []

    def hook(mod, args, out):
        nonlocal dense_minus_sparse
        positions = out.numel() // out.shape[0] // mod.shape[0]
        numel = 1
        for s in mod.shape:
            numel *= s
        dense_minus_sparse += (numel - mod.nnz) * positions

    for m in model.modules():
        if isinstance(m, _SparseBase):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return MeasuredCost(params, counter.get_total_flops() // 2 - dense_minus_sparse)
