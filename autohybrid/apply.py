"""apply(model, allocation) -> a new model of plain torch layers, compressed as allocated."""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from autohybrid.allocation import Allocation
from autohybrid.inventory import Inventory, inventory
from autohybrid.methods import get_method

__all__ = ["apply", "skeleton", "model_inventory"]


def model_inventory(model: nn.Module, alloc: Allocation) -> Inventory:
    """The inventory of ``model`` at the allocation's input size, with its identity."""
    own_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return inventory(
        model,
        input_size=alloc.input_size,
        model_name=own_name or alloc.model.get("name"),
        model_kwargs=alloc.model.get("kwargs"),
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def apply(
    model: nn.Module,
    alloc: Allocation,
    inv: Inventory | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Return a compressed copy of ``model``; ``model`` itself is left untouched.

    The allocation is validated against the model's inventory first. The relative
    reconstruction error of every compressed layer is kept in ``result.autohybrid_errors``.
    """
    inv = inv or model_inventory(model, alloc)
    alloc.validate(inv)
    small = copy.deepcopy(model)
    errors: dict[str, float] = {}
    todo = [(n, s) for n, s in alloc.layers.items() if s.method != "dense"]
    for name, spec in tqdm(
        todo, desc="compress", disable=None if progress is None else not progress, leave=False
    ):
        layer = inv[name]
        old = small.get_submodule(name)
        bias = old.bias.detach() if old.bias is not None else None
        new, err = get_method(spec.method).compress(old.weight.detach(), bias, layer, spec)
        new.train(old.training)
        replace_module(small, name, new)
        errors[name] = err
    small.autohybrid_errors = errors
    return small


def skeleton(model: nn.Module, alloc: Allocation, inv: Inventory | None = None) -> nn.Module:
    """``model`` with every allocated layer swapped for an uninitialised replacement of the
    right structure: what ``load`` fills from a saved state dict (no decomposition runs)."""
    inv = inv or model_inventory(model, alloc)
    alloc.validate(inv)
    for name, spec in alloc.layers.items():
        if spec.method != "dense":
            replace_module(model, name, get_method(spec.method).skeleton(inv[name], spec))
    return model
