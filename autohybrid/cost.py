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

METRICS = ("params", "macs")


def normalize_metric(metric: str) -> str:
    """``params`` or ``macs`` (``flops`` is accepted for MACs, as users say it)."""
    m = {"flops": "macs", "flop": "macs", "mac": "macs", "param": "params"}.get(metric, metric)
    if m not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use 'params' or 'flops' (MACs)")
    return m


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    storage_bytes: int = 0


def layer_cost(layer: LayerInfo, spec: LayerSpec) -> Cost:
    m = get_method(spec.method)
    return Cost(m.params(layer, spec), m.macs(layer, spec), m.storage_bytes(layer, spec))


@dataclass(frozen=True)
class ModelCost:
    """A whole model's cost beside the dense model's."""

    params: int
    macs: int
    storage_bytes: int
    dense_params: int
    dense_macs: int

    @property
    def params_fraction(self) -> float:
        return self.params / self.dense_params

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.dense_macs

    def fraction(self, metric: str) -> float:
        return self.params_fraction if normalize_metric(metric) == "params" else self.macs_fraction

    def __str__(self) -> str:
        return (
            f"{self.params:,} params ({self.params_fraction:.3f} of dense), "
            f"{self.macs:,} MACs ({self.macs_fraction:.3f}), {self.storage_bytes / 1e6:.2f} MB"
        )


def allocation_cost(inv: Inventory, layers: Mapping[str, LayerSpec]) -> ModelCost:
    """Cost of the model with ``layers`` compressed; unlisted layers (and non-conv/linear
    parameters and ops) stay as in the dense model."""
    params, macs = inv.total_params, inv.total_macs
    storage = 4 * inv.total_params
    by_name = inv.by_name
    for name, spec in layers.items():
        layer = by_name[name]
        c = layer_cost(layer, spec)
        params += c.params - layer.params
        macs += c.macs - layer.macs
        storage += c.storage_bytes - 4 * layer.params
    return ModelCost(params, macs, storage, inv.total_params, inv.total_macs)


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
